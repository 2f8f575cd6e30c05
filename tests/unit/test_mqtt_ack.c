/* Unit tests for the agent's mqtt transport without a broker (edge-agent/transports/mqtt.c,
 * included whole so its static parts can be reached): the correlation data, the ack parser,
 * and the loop side, driven with the events Paho's callbacks would queue. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "../../edge-agent/transports/mqtt.c"

/* ---- stubs for what main.c provides ---- */

static int watched_fd = -1;

int agent_loop_watch(struct agent *a, int fd, short events, agent_fd_cb cb, void *ctx)
{
    watched_fd = fd;
    return 0;
}

void agent_loop_unwatch(struct agent *a, int fd)
{
    if (fd == watched_fd)
        watched_fd = -1;
}

/* ---- the forwarder's side: results as they arrive ---- */

#define MAX_RESULTS 16

static struct {
    size_t n;
    uint64_t token[MAX_RESULTS];
    struct agent_send_result r[MAX_RESULTS];
} got;

static void sent_cb(void *ctx, uint64_t token, const struct agent_send_result *r)
{
    assert_true(got.n < MAX_RESULTS);
    got.token[got.n] = token;
    got.r[got.n] = *r;
    got.n++;
}

static const uint8_t RUN[RUN_ID_LEN] = {0xA1, 0xB2, 0xC3, 0xD4, 0xE5, 0xF6, 0x07, 0x18};
static const int64_t NOW = 1000000;

static struct agent_config cfg;
static struct conn conn; /* the context Paho's callbacks get */

/* A transport in state STATE, without a Paho client: sends must not reach Paho. */
static struct mqtt *make(int state, int end_to_end)
{
    struct mqtt *h = NULL;
    memset(&got, 0, sizeof(got));
    cfg = (struct agent_config){
        .id = "gw-7",
        .url = "ssl://broker.example:8883",
        .timeout_ms = 5000,
        .retry_initial_ms = 1000,
        .retry_max_ms = 300000,
        .retry_unreachable_max_ms = 2000,
        .mqtt_topic_prefix = "cistern/v1",
        .mqtt_ack = end_to_end ? AGENT_MQTT_ACK_END_TO_END : AGENT_MQTT_ACK_BROKER,
    };
    assert_int_equal(mqtt_new(NULL, &cfg, sent_cb, NULL, &h), 0);
    assert_int_equal(watched_fd, h->wake[0]);
    memcpy(h->run_id, RUN, sizeof(RUN));
    h->state = state;
    conn = (struct conn){.h = h, .gen = h->gen};
    return h;
}

static void done(struct mqtt *h)
{
    mqtt_free(h);
    assert_int_equal(watched_fd, -1);
}

/* A batch as send() leaves it once published. */
static void add_pending(struct mqtt *h, uint64_t token, int msgid, int64_t deadline)
{
    struct batch *b = calloc(1, sizeof(*b));
    assert_non_null(b);
    b->token = token;
    b->msgid = msgid;
    b->deadline = deadline;
    b->next = h->pending;
    h->pending = b;
}

static size_t npending(const struct mqtt *h)
{
    size_t n = 0;
    for (const struct batch *b = h->pending; b; b = b->next)
        n++;
    return n;
}

/* An ack as on_message() queues it, from the client whose callbacks get C. */
static void push_ack_from(struct conn *c, const uint8_t run[RUN_ID_LEN], uint64_t token,
                          const char *json)
{
    struct ev *e = ev_new(c, EV_ACK);
    assert_non_null(e);
    corr_encode(e->corr, run, token);
    e->corr_len = CORR_LEN;
    e->payload = strdup(json);
    e->len = strlen(json);
    ev_push(c->h, e);
}

static void push_ack(struct mqtt *h, const uint8_t run[RUN_ID_LEN], uint64_t token,
                     const char *json)
{
    assert_ptr_equal(conn.h, h);
    push_ack_from(&conn, run, token, json);
}

static int woken(struct mqtt *h)
{
    char buf[64];
    return read(h->wake[0], buf, sizeof(buf)) > 0;
}

/* ---- correlation data ---- */

static void corr_is_run_id_then_token_big_endian(void **state)
{
    uint8_t c[CORR_LEN];
    const uint8_t want[CORR_LEN] = {0xA1, 0xB2, 0xC3, 0xD4, 0xE5, 0xF6, 0x07, 0x18,
                                    0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08};
    uint64_t t = 0;
    corr_encode(c, RUN, 0x0102030405060708ull);
    assert_memory_equal(c, want, CORR_LEN);
    assert_int_equal(corr_decode(c, CORR_LEN, RUN, &t), 0);
    assert_true(t == 0x0102030405060708ull);
    corr_encode(c, RUN, UINT64_MAX);
    assert_int_equal(corr_decode(c, CORR_LEN, RUN, &t), 0);
    assert_true(t == UINT64_MAX);
}

static void corr_of_another_run_or_length_is_not_ours(void **state)
{
    uint8_t c[CORR_LEN + 1] = {0};
    uint8_t other[RUN_ID_LEN];
    uint64_t t = 42;
    memcpy(other, RUN, sizeof(other));
    other[7] ^= 1;
    corr_encode(c, other, 5);
    assert_int_equal(corr_decode(c, CORR_LEN, RUN, &t), CIS_ENOTFOUND);
    corr_encode(c, RUN, 5);
    assert_int_equal(corr_decode(c, CORR_LEN - 1, RUN, &t), CIS_EINVAL);
    assert_int_equal(corr_decode(c, CORR_LEN + 1, RUN, &t), CIS_EINVAL);
    assert_int_equal(corr_decode(NULL, 0, RUN, &t), CIS_EINVAL);
    assert_true(t == 42); /* untouched on failure */
}

/* ---- ack payloads ---- */

static int parse(const char *s, struct agent_send_result *r)
{
    return ack_parse(s, strlen(s), r);
}

static void ack_ok(void **state)
{
    struct agent_send_result r;
    const char *ok = "{\"status\":\"ok\",\"accepted\":3,\"duplicates\":0,"
                     "\"acked\":[[\"1311768467294899695\",1,3]],"
                     "\"x\":{\"y\":[true,false,null,-1.5e3]}}";
    assert_int_equal(parse(ok, &r), 0);
    assert_int_equal(r.status, 0);
    assert_string_equal(r.reason, ok);
    assert_int_equal(parse(" \r\n\t{ \"status\" : \"ok\" } \n", &r), 0);
    assert_int_equal(r.status, 0);
}

static void ack_rejected_carries_the_error(void **state)
{
    struct agent_send_result r;
    assert_int_equal(parse("{\"error\":\"agent id \\\"gw-2\\\" is not the topic's\","
                           "\"status\":\"rejected\"}", &r), 0);
    assert_int_equal(r.status, CIS_EINVAL);
    assert_string_equal(r.reason, "agent id \"gw-2\" is not the topic's");
    assert_int_equal(parse("{\"status\":\"rejected\"}", &r), 0);
    assert_int_equal(r.status, CIS_EINVAL);
    assert_true(r.reason[0] != '\0');
    /* Escapes are resolved; control characters cannot reach a log line or the ledger. */
    assert_int_equal(
        parse("{\"status\":\"rejected\",\"error\":\"caf\\u00e9\\nline\\t\\u0001x\\/\"}", &r), 0);
    assert_string_equal(r.reason, "caf\xc3\xa9 line  x/");
}

static void ack_retry_is_eagain(void **state)
{
    struct agent_send_result r;
    assert_int_equal(parse("{\"status\":\"retry\",\"error\":\"store busy\"}", &r), 0);
    assert_int_equal(r.status, CIS_EAGAIN);
    assert_string_equal(r.reason, "the receiver asks to retry: store busy");
}

static void ack_long_error_is_cut(void **state)
{
    struct agent_send_result r;
    char buf[1200];
    int n = snprintf(buf, sizeof(buf), "{\"status\":\"rejected\",\"error\":\"");
    memset(buf + n, 'e', 1000);
    snprintf(buf + n + 1000, sizeof(buf) - (size_t)n - 1000, "\"}");
    assert_int_equal(parse(buf, &r), 0);
    assert_int_equal(strlen(r.reason), sizeof(r.reason) - 1);
}

static void ack_reads_only_len_bytes(void **state)
{
    struct agent_send_result r;
    const char *s = "{\"status\":\"ok\"}GARBAGE";
    assert_int_equal(ack_parse(s, 15, &r), 0);
    assert_int_equal(r.status, 0);
    assert_int_equal(ack_parse(s, 14, &r), CIS_EDECODE);
}

static void ack_malformed(void **state)
{
    static const char *const bad[] = {
        "", " ", "{", "}", "[]", "null", "\"ok\"", "{\"status\":\"ok\"",
        "{\"status\":\"ok\"}x", "{\"status\":\"ok\"}}", "{\"status\":1}", "{\"status\":null}",
        "{\"status\":\"done\"}", "{\"status\":\"OK\"}", "{\"accepted\":1}", "{}",
        "{\"status\":\"ok\",}", "{,\"status\":\"ok\"}", "{'status':'ok'}", "{status:\"ok\"}",
        "{\"status\" \"ok\"}", "{\"status\":\"o\nk\"}", "{\"status\":\"ok\",\"n\":01}",
        "{\"status\":\"ok\",\"n\":1.}", "{\"status\":\"ok\",\"n\":-}",
        "{\"status\":\"ok\",\"n\":1e}",
        "{\"status\":\"ok\",\"n\":tru}", "{\"status\":\"ok\",\"e\":\"\\x\"}",
        "{\"status\":\"ok\",\"e\":\"\\u12\"}", "{\"status\":\"ok\",\"a\":[1,]}",
        "{\"status\":\"ok\",\"a\":[1 2]}", "{\"status\":\"ok\",\"o\":{\"k\"}}",
        "{\"status\":\"rejected\",\"error\":\"unterminated}",
    };
    struct agent_send_result r;
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        memset(&r, 0x55, sizeof(r));
        if (parse(bad[i], &r) != CIS_EDECODE)
            fail_msg("accepted as an ack: %s", bad[i]);
        assert_int_equal(r.status, 0);
        assert_int_equal(r.reason[0], '\0');
    }
}

static void ack_nesting_is_bounded(void **state)
{
    struct agent_send_result r;
    char deep[256], ok[256];
    size_t n = 0;
    /* 100 levels: refused, without recursing that deep. */
    n += (size_t)snprintf(deep, sizeof(deep), "{\"status\":\"ok\",\"a\":");
    for (int i = 0; i < 100 && n < sizeof(deep) - 1; i++)
        deep[n++] = '[';
    deep[n] = '\0';
    assert_int_equal(parse(deep, &r), CIS_EDECODE);
    /* A few levels are fine. */
    snprintf(ok, sizeof(ok), "{\"status\":\"ok\",\"a\":[[[[{\"b\":[[]]}]]]]}");
    assert_int_equal(parse(ok, &r), 0);
}

/* ---- the loop side ---- */

static void send_while_down_answers_at_the_next_tick(void **state)
{
    struct mqtt *h = make(ST_IDLE, 1);
    snprintf(h->down_reason, sizeof(h->down_reason),
             "TLS handshake failed: certificate verify failed");
    assert_int_equal(mqtt_send(h, malloc(8), 8, 7), 0);
    /* Never from inside send: the forwarder is in the middle of its own loop. */
    assert_int_equal(got.n, 0);
    assert_true(woken(h));
    mqtt_tick(h, NOW);
    assert_int_equal(got.n, 1);
    assert_true(got.token[0] == 7);
    assert_int_equal(got.r[0].status, CIS_EAGAIN);
    assert_string_equal(got.r[0].reason, "not connected to the broker: "
                                         "TLS handshake failed: certificate verify failed");
    done(h);
}

static void ack_ok_delivers_and_others_are_ignored(void **state)
{
    struct mqtt *h = make(ST_UP, 1);
    uint8_t other[RUN_ID_LEN];
    memcpy(other, RUN, sizeof(other));
    other[0] ^= 0xFF;
    add_pending(h, 5, 11, NOW + 5000);
    add_pending(h, 6, 12, NOW + 5000);
    push_ack(h, other, 5, "{\"status\":\"ok\"}");      /* an earlier run's ack for "5" */
    push_ack(h, RUN, 99, "{\"status\":\"ok\"}");       /* a token no longer waiting */
    push_ack(h, RUN, 6, "{\"status\":\"ok\",\"accepted\":4}");
    assert_int_equal(mqtt_tick(h, NOW), NOW + 5000); /* next: batch 5's deadline */
    assert_int_equal(got.n, 1);
    assert_true(got.token[0] == 6);
    assert_int_equal(got.r[0].status, 0);
    assert_int_equal(npending(h), 1);
    assert_true(h->pending->token == 5);
    done(h);
}

static void malformed_ack_waits_for_the_deadline(void **state)
{
    struct mqtt *h = make(ST_UP, 1);
    add_pending(h, 3, 1, NOW + 5000);
    push_ack(h, RUN, 3, "{\"status\":");
    mqtt_tick(h, NOW);
    assert_int_equal(got.n, 0);
    assert_int_equal(npending(h), 1);
    mqtt_tick(h, NOW + 5000);
    assert_int_equal(got.n, 1);
    assert_int_equal(got.r[0].status, CIS_EAGAIN);
    assert_int_equal(got.r[0].code, 0);
    assert_string_equal(got.r[0].reason,
                        "no ack from a receiver within 5s (is a cistern-receiver subscribed?)");
    assert_int_equal(npending(h), 0);
    done(h);
}

static void rejected_and_retry_answers(void **state)
{
    struct mqtt *h = make(ST_UP, 1);
    add_pending(h, 1, 1, NOW + 5000);
    add_pending(h, 2, 2, NOW + 5000);
    push_ack(h, RUN, 1, "{\"status\":\"rejected\",\"error\":\"bad signature\"}");
    push_ack(h, RUN, 2, "{\"status\":\"retry\",\"error\":\"store busy\"}");
    mqtt_tick(h, NOW);
    assert_int_equal(got.n, 2);
    assert_int_equal(got.r[0].status, CIS_EINVAL);
    assert_string_equal(got.r[0].reason, "bad signature");
    assert_int_equal(got.r[1].status, CIS_EAGAIN);
    assert_true(got.r[1].code != 0); /* an answer: the forwarder backs off in full */
    done(h);
}

static void broker_refusal_is_eagain_never_einval(void **state)
{
    struct mqtt *h = make(ST_UP, 1);
    MQTTAsync_successData5 ok = MQTTAsync_successData5_initializer;
    MQTTAsync_failureData5 no = MQTTAsync_failureData5_initializer;
    add_pending(h, 1, 21, NOW + 5000);
    add_pending(h, 2, 22, NOW + 5000);
    add_pending(h, 3, 23, NOW + 5000);
    no.token = 21;
    no.reasonCode = MQTTREASONCODE_NOT_AUTHORIZED;
    on_pub_fail(&conn, &no);
    ok.token = 22;
    ok.reasonCode = MQTTREASONCODE_NOT_AUTHORIZED; /* some brokers report it on success */
    on_pub_ok(&conn, &ok);
    ok.token = 23;
    ok.reasonCode = MQTTREASONCODE_SUCCESS; /* end-to-end: a PUBACK is not the answer */
    on_pub_ok(&conn, &ok);
    mqtt_tick(h, NOW);
    assert_int_equal(got.n, 2);
    for (size_t i = 0; i < 2; i++) {
        assert_int_equal(got.r[i].status, CIS_EAGAIN);
        assert_string_equal(got.r[i].reason, "broker refused the batch: not authorized (check "
                                             "the broker's ACL for cistern/v1/gw-7/batch)");
    }
    assert_int_equal(npending(h), 1);
    assert_true(h->pending->token == 3);
    done(h);
}

static void ack_broker_takes_the_puback(void **state)
{
    struct mqtt *h = make(ST_UP, 0);
    MQTTAsync_successData5 ok = MQTTAsync_successData5_initializer;
    add_pending(h, 1, 31, NOW + 5000);
    add_pending(h, 2, 32, NOW + 5000);
    ok.token = 31;
    on_pub_ok(&conn, &ok);
    /* "No matching subscribers": the broker dropped it, so not even ack: broker counts it. */
    ok.token = 32;
    ok.reasonCode = MQTTREASONCODE_NO_MATCHING_SUBSCRIBERS;
    on_pub_ok(&conn, &ok);
    mqtt_tick(h, NOW);
    assert_int_equal(got.n, 2);
    assert_true(got.token[0] == 1);
    assert_int_equal(got.r[0].status, 0);
    assert_true(got.token[1] == 2);
    assert_int_equal(got.r[1].status, CIS_EAGAIN);
    assert_non_null(strstr(got.r[1].reason, "no subscriber"));
    done(h);
}

static void paho_write_failure_is_not_a_refusal(void **state)
{
    struct mqtt *h = make(ST_UP, 1);
    MQTTAsync_failureData5 f = MQTTAsync_failureData5_initializer;
    add_pending(h, 1, 41, NOW + 5000);
    /* What Paho reports when the socket breaks under a PUBLISH: no reason code. */
    f.token = 41;
    f.code = MQTTASYNC_FAILURE;
    on_pub_fail(&conn, &f);
    mqtt_tick(h, NOW);
    assert_int_equal(got.n, 1);
    assert_int_equal(got.r[0].status, CIS_EAGAIN);
    assert_null(strstr(got.r[0].reason, "refused"));
    assert_string_equal(h->refused, "");
    /* That client is not reused after the loss that follows (Paho 1.3.12 keeps the message
     * with freed memory). */
    assert_true(h->poisoned);
    on_lost(&conn, NULL);
    mqtt_tick(h, NOW);
    assert_int_equal(h->state, ST_IDLE);
    assert_true(h->replace_client);
    done(h);
}

static void events_of_a_replaced_client_are_ignored(void **state)
{
    struct mqtt *h = make(ST_UP, 1);
    MQTTAsync_failureData5 f = MQTTAsync_failureData5_initializer;
    struct conn old = conn;
    add_pending(h, 5, 51, NOW + 5000);
    h->gen++; /* as client_open() does for the next client */
    conn.gen = h->gen;
    on_lost(&old, NULL);
    f.token = 51;
    f.reasonCode = MQTTREASONCODE_NOT_AUTHORIZED;
    on_pub_fail(&old, &f);
    push_ack_from(&old, RUN, 5, "{\"status\":\"rejected\"}");
    mqtt_tick(h, NOW);
    assert_int_equal(got.n, 0);
    assert_int_equal(h->state, ST_UP);
    assert_int_equal(npending(h), 1);
    push_ack(h, RUN, 5, "{\"status\":\"ok\"}");
    mqtt_tick(h, NOW);
    assert_int_equal(got.n, 1);
    assert_int_equal(got.r[0].status, 0);
    done(h);
}

static void connection_lost_fails_every_batch_and_schedules_a_reconnect(void **state)
{
    struct mqtt *h = make(ST_UP, 1);
    add_pending(h, 1, 1, NOW + 5000);
    add_pending(h, 2, 2, NOW + 5000);
    on_lost(&conn, NULL);
    int64_t next = mqtt_tick(h, NOW);
    assert_int_equal(got.n, 2);
    assert_int_equal(got.r[0].status, CIS_EAGAIN);
    assert_int_equal(got.r[1].status, CIS_EAGAIN);
    assert_int_equal(npending(h), 0);
    assert_int_equal(h->state, ST_IDLE);
    /* Capped by forward.retry.unreachable_max: delivery resumes soon after the broker returns. */
    assert_in_range(next, NOW + 1, NOW + cfg.retry_unreachable_max_ms);
    assert_int_equal(next, h->reconnect_at);
    assert_true(h->replace_client);
    /* A second loss report of the same connection changes nothing. */
    on_lost(&conn, NULL);
    mqtt_tick(h, NOW);
    assert_int_equal(got.n, 2);
    assert_int_equal(h->reconnect_at, next);
    done(h);
}

static void connect_failures_in_words(void **state)
{
    struct mqtt *h = make(ST_CONNECTING, 1);
    MQTTAsync_failureData5 f = MQTTAsync_failureData5_initializer;
    /* As OpenSSL 3's ERR_print_errors_cb hands it over. */
    const char *tls = "40E7:error:0A000086:SSL routines:tls_post_process_server_certificate:"
                      "certificate verify failed:../ssl/statem/statem_clnt.c:1889:\n";

    /* Paho 1.3 gives an MQTT 5 CONNACK refusal as the return code. */
    f.code = MQTTREASONCODE_NOT_AUTHORIZED;
    f.message = "CONNACK return code";
    on_connect_fail(&conn, &f);
    mqtt_tick(h, NOW);
    assert_int_equal(h->state, ST_IDLE);
    assert_non_null(strstr(h->down_reason, "broker refused the connection: not authorized"));

    h->state = ST_CONNECTING;
    h->logged[0] = '\0';
    on_ssl_error(tls, strlen(tls), &conn);
    f = (MQTTAsync_failureData5)MQTTAsync_failureData5_initializer;
    f.code = MQTTASYNC_FAILURE;
    f.message = "TCP/TLS connect failure";
    on_connect_fail(&conn, &f);
    mqtt_tick(h, NOW);
    assert_string_equal(h->down_reason, "TLS handshake failed: certificate verify failed");
    /* A stale failure (we are not connecting) is ignored. */
    on_connect_fail(&conn, &f);
    h->down_reason[0] = '\0';
    mqtt_tick(h, NOW);
    assert_string_equal(h->down_reason, "");
    done(h);
}

static void abort_all_answers_everything_at_once(void **state)
{
    struct mqtt *h = make(ST_UP, 1);
    add_pending(h, 1, 1, NOW + 5000);
    h->state = ST_IDLE;
    assert_int_equal(mqtt_send(h, malloc(4), 4, 2), 0); /* queued: not connected */
    h->state = ST_UP;
    mqtt_abort_all(h);
    assert_int_equal(got.n, 2);
    assert_int_equal(got.r[0].status, CIS_EAGAIN);
    assert_int_equal(got.r[1].status, CIS_EAGAIN);
    assert_int_equal(npending(h), 0);
    assert_null(h->done);
    done(h);
}

static void agent_id_must_fit_a_topic(void **state)
{
    struct mqtt *h = NULL;
    cfg = (struct agent_config){.id = "gw/7", .mqtt_topic_prefix = "cistern/v1"};
    assert_int_equal(mqtt_new(NULL, &cfg, sent_cb, NULL, &h), CIS_ECONFIG);
    cfg.id = "gw+";
    assert_int_equal(mqtt_new(NULL, &cfg, sent_cb, NULL, &h), CIS_ECONFIG);
    assert_null(h);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(corr_is_run_id_then_token_big_endian),
        cmocka_unit_test(corr_of_another_run_or_length_is_not_ours),
        cmocka_unit_test(ack_ok),
        cmocka_unit_test(ack_rejected_carries_the_error),
        cmocka_unit_test(ack_retry_is_eagain),
        cmocka_unit_test(ack_long_error_is_cut),
        cmocka_unit_test(ack_reads_only_len_bytes),
        cmocka_unit_test(ack_malformed),
        cmocka_unit_test(ack_nesting_is_bounded),
        cmocka_unit_test(send_while_down_answers_at_the_next_tick),
        cmocka_unit_test(ack_ok_delivers_and_others_are_ignored),
        cmocka_unit_test(malformed_ack_waits_for_the_deadline),
        cmocka_unit_test(rejected_and_retry_answers),
        cmocka_unit_test(broker_refusal_is_eagain_never_einval),
        cmocka_unit_test(ack_broker_takes_the_puback),
        cmocka_unit_test(paho_write_failure_is_not_a_refusal),
        cmocka_unit_test(events_of_a_replaced_client_are_ignored),
        cmocka_unit_test(connection_lost_fails_every_batch_and_schedules_a_reconnect),
        cmocka_unit_test(connect_failures_in_words),
        cmocka_unit_test(abort_all_answers_everything_at_once),
        cmocka_unit_test(agent_id_must_fit_a_topic),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
