/* Unit tests for the receiver's store (SQLite), its JSON read side and its config table. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <sqlite3.h>

#include <cistern/codec.h>
#include <cistern/err.h>

#include "api.h"
#include "recv_config.h"
#include "store/store.h"

#define EPOCH UINT64_C(0x1234567890abcdef)

struct fixture {
    char dir[64];
    char path[128];
    struct recv_store *st;
};

static int setup(void **state)
{
    struct fixture *f = calloc(1, sizeof *f);
    struct recv_store_opts o = {0};
    char err[256];

    assert_non_null(f);
    snprintf(f->dir, sizeof f->dir, "/tmp/test_recv_store.XXXXXX");
    assert_non_null(mkdtemp(f->dir));
    snprintf(f->path, sizeof f->path, "%s/store.db", f->dir);
    o.path = f->path;
    o.busy_timeout_ms = 1000;
    assert_int_equal(recv_store_sqlite.open(&o, &f->st, err, sizeof err), 0);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    struct fixture *f = *state;
    char p[160];

    recv_store_sqlite.close(f->st);
    snprintf(p, sizeof p, "%s/store.db", f->dir);
    unlink(p);
    snprintf(p, sizeof p, "%s/store.db-wal", f->dir);
    unlink(p);
    snprintf(p, sizeof p, "%s/store.db-shm", f->dir);
    unlink(p);
    rmdir(f->dir);
    free(f);
    return 0;
}

/* Encode a batch for AGENT of two segments: seqs FIRST..FIRST+N1-1 and the next N2, with one
 * loss entry; decode it into OUT the way the receiver does. */
static void make_batch(const char *agent, uint64_t epoch, uint64_t first, size_t n1, size_t n2,
                       struct cis_decoded_batch *out)
{
    struct cis_record recs[64];
    char payloads[64][32];
    struct cis_segment segs[2];
    uint8_t *data[2] = {NULL, NULL}, *buf = NULL;
    size_t dlen[2], blen = 0;
    Cistern__V1__LossEntry loss = CISTERN__V1__LOSS_ENTRY__INIT;
    const Cistern__V1__LossEntry *losses[1] = {&loss};
    struct cis_batch_meta meta = {.agent_id = agent, .epoch = epoch, .created_ms = 1000,
                                  .spool_depth = 7, .oldest_pending_ms = 5,
                                  .losses = losses, .nlosses = 1};
    struct cis_decode_limits lim = {.max_decompressed = 1 << 20, .max_records = 1000};
    char why[128];

    assert_true(n1 + n2 <= 64);
    for (size_t i = 0; i < n1 + n2; i++) {
        snprintf(payloads[i], sizeof payloads[i], "{\"v\":%zu}", i);
        recs[i] = (struct cis_record){.seq = first + i, .ts_ms = 1700000000000 + (int64_t)i,
                                      .stream = "sensors/t", .content_type = "application/json",
                                      .payload = (const uint8_t *)payloads[i],
                                      .payload_len = strlen(payloads[i])};
    }
    /* one binary payload, which the API must return as base64 */
    recs[0].payload = (const uint8_t *)"\xff\x00\x01";
    recs[0].payload_len = 3;
    loss.reason = "evicted_full";
    loss.epoch = epoch;
    loss.first_seq = 1;
    loss.last_seq = 3;
    loss.count = 3;
    loss.ts_ms = 99;
    loss.detail = "spool full";
    loss.id = 1;

    assert_int_equal(cis_segment_encode(recs, n1, 1, 3, &segs[0], &data[0], &dlen[0]), 0);
    segs[0].data = data[0];
    segs[0].data_len = dlen[0];
    assert_int_equal(cis_segment_encode(recs + n1, n2, 0, 3, &segs[1], &data[1], &dlen[1]), 0);
    segs[1].data = data[1];
    segs[1].data_len = dlen[1];
    assert_int_equal(cis_batch_encode(&meta, segs, 2, &buf, &blen), 0);
    memset(out, 0, sizeof *out);
    assert_int_equal(cis_batch_decode(buf, blen, &lim, out, why, sizeof why), 0);
    assert_int_equal(recv_batch_check(out, why, sizeof why), 0);
    free(data[0]);
    free(data[1]);
    free(buf);
}

static void test_put_twice_dedups(void **state)
{
    struct fixture *f = *state;
    struct cis_decoded_batch b;
    struct recv_put_result r = {0};
    struct recv_buf out = {0};

    make_batch("gw-1", EPOCH, 10, 3, 2, &b);
    assert_int_equal(recv_store_sqlite.put_batch(f->st, &b, 5000, &r), 0);
    assert_int_equal(r.accepted, 5);
    assert_int_equal(r.duplicates, 0);
    recv_api_ingest_answer(&b, &r, &out);
    assert_string_equal(out.p, "{\"accepted\":5,\"duplicates\":0,\"acked\":[[\"1311768467294899695\","
                               "10,12],[\"1311768467294899695\",13,14]]}");
    recv_buf_free(&out);

    memset(&r, 0, sizeof r);
    assert_int_equal(recv_store_sqlite.put_batch(f->st, &b, 6000, &r), 0);
    assert_int_equal(r.accepted, 0);
    assert_int_equal(r.duplicates, 5);
    cis_batch_free(&b);

    /* overlapping batch: 2 old, 3 new */
    make_batch("gw-1", EPOCH, 13, 2, 3, &b);
    assert_int_equal(recv_store_sqlite.put_batch(f->st, &b, 7000, &r), 0);
    assert_int_equal(r.accepted, 3);
    assert_int_equal(r.duplicates, 2);
    cis_batch_free(&b);
}

static void test_agents_and_losses(void **state)
{
    struct fixture *f = *state;
    struct cis_decoded_batch b;
    struct recv_put_result r;
    struct recv_buf out = {0};
    sqlite3 *db;
    sqlite3_stmt *st;

    make_batch("gw-2", EPOCH, 1, 2, 2, &b);
    assert_int_equal(recv_store_sqlite.put_batch(f->st, &b, 5000, &r), 0);
    assert_int_equal(recv_store_sqlite.put_batch(f->st, &b, 9000, &r), 0);
    cis_batch_free(&b);
    make_batch("gw-1", EPOCH, 1, 1, 1, &b);
    assert_int_equal(recv_store_sqlite.put_batch(f->st, &b, 6000, &r), 0);
    cis_batch_free(&b);

    assert_int_equal(recv_api_agents(&recv_store_sqlite, f->st, &out), 0);
    assert_string_equal(out.p,
                        "{\"agents\":[{\"id\":\"gw-1\",\"first_seen_ms\":6000,\"last_seen_ms\":6000,"
                        "\"spool_depth\":7,\"oldest_pending_ms\":5,\"records\":2},"
                        "{\"id\":\"gw-2\",\"first_seen_ms\":5000,\"last_seen_ms\":9000,"
                        "\"spool_depth\":7,\"oldest_pending_ms\":5,\"records\":4}]}");
    recv_buf_free(&out);

    /* the loss entry is stored once per agent, although it came twice */
    assert_int_equal(sqlite3_open_v2(f->path, &db, SQLITE_OPEN_READONLY, NULL), SQLITE_OK);
    assert_int_equal(sqlite3_prepare_v2(db,
                                        "SELECT agent_id, epoch, id, reason, first_seq, last_seq,"
                                        " count, detail FROM losses ORDER BY agent_id",
                                        -1, &st, NULL),
                     SQLITE_OK);
    assert_int_equal(sqlite3_step(st), SQLITE_ROW);
    assert_string_equal((const char *)sqlite3_column_text(st, 0), "gw-1");
    assert_int_equal(sqlite3_step(st), SQLITE_ROW);
    assert_string_equal((const char *)sqlite3_column_text(st, 0), "gw-2");
    assert_true((uint64_t)sqlite3_column_int64(st, 1) == EPOCH);
    assert_int_equal(sqlite3_column_int64(st, 2), 1);
    assert_string_equal((const char *)sqlite3_column_text(st, 3), "evicted_full");
    assert_int_equal(sqlite3_column_int64(st, 6), 3);
    assert_string_equal((const char *)sqlite3_column_text(st, 7), "spool full");
    assert_int_equal(sqlite3_step(st), SQLITE_DONE);
    sqlite3_finalize(st);
    sqlite3_close(db);
}

static void test_records_paging(void **state)
{
    struct fixture *f = *state;
    struct cis_decoded_batch b;
    struct recv_put_result r;
    struct recv_buf out = {0};
    struct recv_records_query q = {.agent_id = "gw-1"};
    char why[128];

    make_batch("gw-1", EPOCH, 1, 3, 2, &b);
    assert_int_equal(recv_store_sqlite.put_batch(f->st, &b, 5000, &r), 0);
    cis_batch_free(&b);
    make_batch("gw-1", 5, 1, 1, 1, &b); /* a second, smaller epoch sorts first */
    assert_int_equal(recv_store_sqlite.put_batch(f->st, &b, 5000, &r), 0);
    cis_batch_free(&b);

    assert_int_equal(recv_api_parse_records_query("0", "2", NULL, &q, why, sizeof why), 0);
    assert_int_equal(recv_api_records(&recv_store_sqlite, f->st, &q, &out), 0);
    assert_string_equal(out.p, "{\"records\":[{\"epoch\":\"5\",\"seq\":1,\"ts\":1700000000000,"
                               "\"stream\":\"sensors/t\",\"content_type\":\"application/json\","
                               "\"payload\":\"/wAB\",\"payload_base64\":true},"
                               "{\"epoch\":\"5\",\"seq\":2,\"ts\":1700000000001,"
                               "\"stream\":\"sensors/t\",\"content_type\":\"application/json\","
                               "\"payload\":\"{\\\"v\\\":1}\"}],\"next_after\":2}");
    recv_buf_free(&out);

    assert_int_equal(recv_api_parse_records_query("2", "10", "1311768467294899695", &q, why,
                                                  sizeof why), 0);
    assert_int_equal(recv_api_records(&recv_store_sqlite, f->st, &q, &out), 0);
    assert_non_null(strstr(out.p, "\"seq\":3,"));
    assert_non_null(strstr(out.p, "\"seq\":5,"));
    assert_null(strstr(out.p, "\"seq\":2,"));
    assert_non_null(strstr(out.p, "\"next_after\":5}"));
    recv_buf_free(&out);

    /* past the end: empty list, next_after stays */
    assert_int_equal(recv_api_parse_records_query("99", NULL, NULL, &q, why, sizeof why), 0);
    assert_int_equal(q.limit, 100);
    assert_int_equal(recv_api_records(&recv_store_sqlite, f->st, &q, &out), 0);
    assert_string_equal(out.p, "{\"records\":[],\"next_after\":99}");
    recv_buf_free(&out);

    q.agent_id = "nobody";
    assert_int_equal(recv_api_records(&recv_store_sqlite, f->st, &q, &out), CIS_ENOTFOUND);
    recv_buf_free(&out);

    assert_int_equal(recv_api_parse_records_query("x", NULL, NULL, &q, why, sizeof why),
                     CIS_EINVAL);
    assert_int_equal(recv_api_parse_records_query(NULL, "0", NULL, &q, why, sizeof why),
                     CIS_EINVAL);
    assert_int_equal(recv_api_parse_records_query(NULL, "10001", NULL, &q, why, sizeof why),
                     CIS_EINVAL);
    assert_int_equal(recv_api_parse_records_query(NULL, NULL, "-1", &q, why, sizeof why),
                     CIS_EINVAL);
    assert_int_equal(recv_api_parse_records_query(NULL, NULL, "9223372036854775808", &q, why,
                                                  sizeof why), CIS_EINVAL);
    assert_int_equal(recv_store_sqlite.health(f->st), 0);
}

static void test_epoch_top_bit_rejected(void **state)
{
    struct cis_decoded_batch b;
    char why[128];

    (void)state;
    make_batch("gw-1", EPOCH, 1, 1, 1, &b);
    b.pb->header->epoch = UINT64_C(0x8000000000000001);
    assert_int_equal(recv_batch_check(&b, why, sizeof why), CIS_EDECODE);
    b.pb->header->epoch = EPOCH;
    b.pb->header->losses[0]->epoch = UINT64_MAX;
    assert_int_equal(recv_batch_check(&b, why, sizeof why), CIS_EDECODE);
    cis_batch_free(&b);
}

static void test_json_helpers(void **state)
{
    struct recv_buf b = {0};

    (void)state;
    recv_buf_json_str(&b, "a\"b\\c\n\x01\xc3\xa9\xff", 10);
    assert_string_equal(b.p, "\"a\\\"b\\\\c\\n\\u0001\xc3\xa9\\ufffd\"");
    recv_buf_free(&b);
    recv_buf_base64(&b, (const uint8_t *)"foobar", 6);
    recv_buf_add(&b, " ", 1);
    recv_buf_base64(&b, (const uint8_t *)"fooba", 5);
    recv_buf_add(&b, " ", 1);
    recv_buf_base64(&b, (const uint8_t *)"foob", 4);
    recv_buf_add(&b, " ", 1);
    recv_buf_base64(&b, (const uint8_t *)"", 0);
    assert_string_equal(b.p, "Zm9vYmFy Zm9vYmE= Zm9vYg== ");
    recv_buf_free(&b);
    assert_true(recv_utf8_valid((const uint8_t *)"h\xc3\xa9llo \xf0\x9f\x98\x80", 11));
    assert_false(recv_utf8_valid((const uint8_t *)"\xc0\xaf", 2));         /* overlong */
    assert_false(recv_utf8_valid((const uint8_t *)"\xed\xa0\x80", 3));     /* surrogate */
    assert_false(recv_utf8_valid((const uint8_t *)"\xf4\x90\x80\x80", 4)); /* > U+10FFFF */
    assert_false(recv_utf8_valid((const uint8_t *)"\xe2\x82", 2));         /* truncated */
    recv_json_error(&b, "certificate CN 'a' may not send for agent 'b'");
    assert_string_equal(b.p, "{\"error\":\"certificate CN 'a' may not send for agent 'b'\"}");
    recv_buf_free(&b);
}

static void write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

static void test_config(void **state)
{
    struct fixture *f = *state;
    struct recv_config cfg;
    char path[160], err[512], host[64], why[64], shipped[4096];
    unsigned port;
    const char *src = __FILE__, *cut = strstr(src, "tests/unit/");

    /* the shipped example passes as it is */
    assert_non_null(cut);
    snprintf(shipped, sizeof shipped, "%.*sconfigs/receiver.yaml", (int)(cut - src), src);
    assert_int_equal(recv_config_load(shipped, &cfg, err, sizeof err), 0);
    assert_string_equal(cfg.listen_http, "0.0.0.0:8443");
    assert_true(cfg.max_body == 8u << 20);
    assert_int_equal(cfg.connection_timeout_ms, 30000);
    recv_config_free(&cfg);

    snprintf(path, sizeof path, "%s/r.yaml", f->dir);
    write_file(path, "listen:\n  http: 127.0.0.1:0\n");
    assert_int_not_equal(recv_config_load(path, &cfg, err, sizeof err), 0);
    assert_non_null(strstr(err, "listen.tls.cert_file"));

    write_file(path, "listen:\n  http: 127.0.0.1:0\n  insecure_plain_http: true\n");
    assert_int_equal(recv_config_load(path, &cfg, err, sizeof err), 0);
    recv_config_free(&cfg);

    write_file(path, "listen:\n  http: 127.0.0.1:0\n  insecure_plain_http: true\n"
                     "store:\n  type: postgres\n");
    assert_int_not_equal(recv_config_load(path, &cfg, err, sizeof err), 0);
    assert_non_null(strstr(err, "store.type"));
    unlink(path);

    assert_int_equal(cis_parse_hostport("[::1]:8443", host, sizeof host, &port, why, sizeof why),
                     0);
    assert_string_equal(host, "::1");
    assert_int_equal(port, 8443);
    assert_int_not_equal(cis_parse_hostport("::1:80", host, sizeof host, &port, why, sizeof why),
                         0);
    assert_int_not_equal(cis_parse_hostport("h:99999", host, sizeof host, &port, why, sizeof why),
                         0);
    assert_int_not_equal(cis_parse_hostport("h", host, sizeof host, &port, why, sizeof why), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_put_twice_dedups, setup, teardown),
        cmocka_unit_test_setup_teardown(test_agents_and_losses, setup, teardown),
        cmocka_unit_test_setup_teardown(test_records_paging, setup, teardown),
        cmocka_unit_test(test_epoch_top_bit_rejected),
        cmocka_unit_test(test_json_helpers),
        cmocka_unit_test_setup_teardown(test_config, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
