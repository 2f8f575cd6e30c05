/* Receiver MQTT ingest on Paho MQTT C async (MQTT 5): the connection state machine and the
 * batches both run on our own thread (capped jittered backoff; batch -> shared ingest -> ack on
 * the Response Topic after the store committed); Paho's threads only queue and signal. */
#include "ingest/mqtt.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include <MQTTAsync.h>

#include <cistern/backoff.h>
#include <cistern/err.h>
#include <cistern/log.h>
#include <cistern/paho.h>

#define BACKOFF_INITIAL_MS 1000
#define BACKOFF_MAX_MS 30000
#define CONNECT_TIMEOUT_S 20
#define DISCONNECT_TIMEOUT_MS 2000 /* on stop, let acks in flight get their PUBACK */
#define STOP_WAIT_MS 10000
#define STATS_INTERVAL_MS (5 * 60 * 1000)
#define STABLE_MS 2000 /* dropped sooner than this after connecting: say what may cause it */
#define MAX_BUFFERED 1024
#define MAX_WORK 256                        /* batches waiting for the store */
#define MAX_WORK_BYTES (UINT64_C(64) << 20) /* and their bytes, at most */
#define ACK_CONTENT_TYPE "application/json"
#define ACK_PUBACK_WAIT_MS 5000 /* the next ack waits this long at most for the last's PUBACK */

/* A batch handed from Paho's receive thread to ours. */
struct work {
    struct work *next;
    char *topic;            /* Paho's: MQTTAsync_free */
    size_t topic_len;
    MQTTAsync_message *msg; /* Paho's: MQTTAsync_freeMessage */
};

/* The context of one Paho client's callbacks. After a lost connection the next attempt uses a
 * new client (see client_replace); callbacks still coming from an older one carry an old GEN and
 * change nothing. */
struct conn {
    struct recv_mqtt *m;
    unsigned gen;
    int poisoned; /* under m->mu: Paho failed to write one of this client's PUBLISHes */
};

/* Where the connection is. Only this module's thread starts a connect or a subscribe; Paho's
 * callbacks only move the state and wake the thread. */
enum conn_state {
    ST_IDLE,        /* not connected; the next attempt is due at next_ms */
    ST_CONNECTING,  /* MQTTAsync_connect issued, its callback not yet called */
    ST_NEED_SUB,    /* connected; subscribe at next_ms */
    ST_SUBSCRIBING, /* MQTTAsync_subscribe issued */
    ST_READY,       /* subscribed: batches flow */
};

struct recv_mqtt {
    MQTTAsync cli;       /* the current client; replaced only by our thread */
    struct conn *conn;   /* its callbacks' context */
    int paho_held;       /* cis_paho_hold() taken: released after the last client */
    struct recv_ingest_ctx ingest;
    char *url, *client_id, *prefix, *filter, *username, *password, *ca, *cert, *key;
    int keepalive_s;
    unsigned session_expiry_s;

    pthread_t thread;
    int thread_started;
    /* Lock order: Paho calls our callbacks holding its own mutex, and they take MU. So MU is
     * never held while calling into Paho. */
    pthread_mutex_t mu;
    pthread_cond_t cv; /* CLOCK_MONOTONIC */
    /* everything below is under MU */
    enum conn_state state;
    unsigned gen;       /* conn->gen of the current client */
    int replace_client; /* it lost its connection: the next attempt takes a new one */
    int stopping;
    int64_t next_ms;
    int quiet;          /* a failure was logged: more failures before READY go to debug */
    int session_present;
    int64_t ready_at;   /* when the subscription last succeeded */
    int disconnect_done;
    int in_callback;    /* messageArrived calls running */
    int ack_busy;       /* an ack PUBLISH has no PUBACK yet: the next waits (see publish_ack) */
    int64_t ack_deadline;
    struct work *work, **work_tail; /* FIFO: filled by messageArrived, drained by our thread */
    size_t nwork;
    uint64_t work_bytes;
    int overflowing;    /* the queue was full: new batches are being dropped */
    int store_failing;  /* the last batch was answered "retry" */
    int warned_unanswered;
    char tls_error[256]; /* the last OpenSSL error of the current attempt */
    struct cis_backoff bo;
    struct recv_mqtt_stats stats, stats_logged;
    int64_t stats_at;
};

/* ---- the pure parts ---- */

int recv_mqtt_topic_agent(const char *prefix, const char *topic, size_t len, char *agent,
                          size_t agentlen)
{
    static const char suffix[] = "/batch";
    size_t plen = strlen(prefix), slen = sizeof suffix - 1, n;
    const char *id;

    if (len <= plen + 1 + slen || memcmp(topic, prefix, plen) != 0 || topic[plen] != '/' ||
        memcmp(topic + len - slen, suffix, slen) != 0)
        return -1;
    id = topic + plen + 1;
    n = len - plen - 1 - slen;
    if (n == 0 || n >= agentlen)
        return -1;
    for (size_t i = 0; i < n; i++)
        if (id[i] == '/' || id[i] == '+' || id[i] == '#' || id[i] == '\0')
            return -1;
    memcpy(agent, id, n);
    agent[n] = '\0';
    return 0;
}

void recv_mqtt_ack_json(int status, const struct recv_ingest_result *res, const char *why,
                        struct recv_buf *out)
{
    if (status == RECV_INGEST_OK && res != NULL && res->answer.p != NULL &&
        res->answer.len > 1 && res->answer.p[0] == '{') {
        /* The same answer as HTTP's 200 body, with the status in front. */
        recv_buf_add(out, "{\"status\":\"ok\",", 15);
        recv_buf_add(out, res->answer.p + 1, res->answer.len - 1);
        return;
    }
    recv_buf_addf(out, "{\"status\":\"%s\",\"error\":",
                  status == RECV_INGEST_REJECTED ? "rejected"
                  /* retry: the store failed, or the device may not deliver now (unregistered,
                   * revoked, another key): the agent keeps the batch. ok without an answer:
                   * out of memory. */
                                                 : "retry");
    recv_buf_json_str(out, why ? why : "", why ? strlen(why) : 0);
    recv_buf_add(out, "}", 1);
}

/* ---- state changes (called with MU held) ---- */

static void wake(struct recv_mqtt *m)
{
    pthread_cond_signal(&m->cv);
}

/* Schedule the next attempt with the next backoff delay; returns the delay. */
static int64_t schedule(struct recv_mqtt *m)
{
    int64_t d = cis_backoff_next(&m->bo);

    m->next_ms = cis_mono_ms() + d;
    wake(m);
    return d;
}

static void connect_failed(struct recv_mqtt *m, const char *why)
{
    int64_t d;

    m->state = ST_IDLE;
    if (m->stopping)
        return;
    d = schedule(m);
    if (!m->quiet) {
        cis_warn("[mqtt] cannot connect to %s: %s%s%s; retrying with backoff", m->url, why,
                 m->tls_error[0] ? "; TLS: " : "", m->tls_error);
        m->quiet = 1;
    } else {
        cis_debug("[mqtt] connect to %s failed: %s%s%s; next attempt in %" PRId64 " ms", m->url,
                  why, m->tls_error[0] ? "; TLS: " : "", m->tls_error, d);
    }
}

static void subscribe_failed(struct recv_mqtt *m, const char *why)
{
    int64_t d;

    if (m->state != ST_SUBSCRIBING)
        return;
    m->state = ST_NEED_SUB;
    if (m->stopping)
        return;
    d = schedule(m);
    if (!m->quiet) {
        cis_warn("[mqtt] subscribe to %s refused: %s; retrying with backoff (check the broker's "
                 "ACL for this receiver)",
                 m->filter, why);
        m->quiet = 1;
    } else {
        cis_debug("[mqtt] subscribe to %s refused: %s; next attempt in %" PRId64 " ms", m->filter,
                  why, d);
    }
}

/* The connection is gone (whatever said so first: connectionLost, a DISCONNECT from the
 * broker). Ignored when we were not connected. */
static void lost(struct recv_mqtt *m, const char *why)
{
    int was_ready = m->state == ST_READY;
    int stable = was_ready && cis_mono_ms() - m->ready_at >= STABLE_MS;

    if (m->state == ST_IDLE || m->state == ST_CONNECTING)
        return;
    m->state = ST_IDLE;
    m->replace_client = 1;
    if (m->stopping)
        return;
    schedule(m);
    if (was_ready || !m->quiet)
        cis_warn("[mqtt] connection to %s lost: %s%s%s%s; reconnecting with backoff", m->url, why,
                 stable ? "" : " soon after connecting (if this repeats, check that no other "
                               "receiver uses client id '",
                 stable ? "" : m->client_id, stable ? "" : "')");
    else
        cis_debug("[mqtt] connection to %s lost again: %s", m->url, why);
    m->quiet = 1;
}

/* ---- Paho callbacks (Paho's threads) ---- */

static int on_ssl_error(const char *str, size_t len, void *ctx)
{
    struct recv_mqtt *m = ((struct conn *)ctx)->m;

    while (len > 0 && (str[len - 1] == '\n' || str[len - 1] == '\r'))
        len--;
    pthread_mutex_lock(&m->mu);
    snprintf(m->tls_error, sizeof m->tls_error, "%.*s", (int)len, str);
    pthread_mutex_unlock(&m->mu);
    return 0;
}

/* A short reason from a Paho failure. */
static const char *failure_why(const MQTTAsync_failureData5 *f, char *buf, size_t len)
{
    if (f == NULL)
        return "unknown error";
    if (f->reasonCode >= MQTTREASONCODE_UNSPECIFIED_ERROR) {
        snprintf(buf, len, "%s (reason code %d)", MQTTReasonCode_toString(f->reasonCode),
                 (int)f->reasonCode);
    } else if (f->message != NULL) {
        snprintf(buf, len, "%s", f->message);
    } else {
        const char *s = MQTTAsync_strerror(f->code);
        snprintf(buf, len, "%s", s ? s : "unknown error");
    }
    return buf;
}

static void on_connect_ok(void *ctx, MQTTAsync_successData5 *resp)
{
    struct conn *c = ctx;
    struct recv_mqtt *m = c->m;

    pthread_mutex_lock(&m->mu);
    if (c->gen == m->gen && m->state == ST_CONNECTING) {
        m->state = ST_NEED_SUB;
        m->next_ms = cis_mono_ms();
        m->session_present = resp ? resp->alt.connect.sessionPresent : 0;
        wake(m);
    }
    pthread_mutex_unlock(&m->mu);
}

static void on_connect_fail(void *ctx, MQTTAsync_failureData5 *resp)
{
    struct conn *c = ctx;
    struct recv_mqtt *m = c->m;
    char buf[256];

    failure_why(resp, buf, sizeof buf);
    pthread_mutex_lock(&m->mu);
    if (c->gen == m->gen && m->state == ST_CONNECTING)
        connect_failed(m, buf);
    pthread_mutex_unlock(&m->mu);
}

static void on_subscribe_ok(void *ctx, MQTTAsync_successData5 *resp)
{
    struct conn *c = ctx;
    struct recv_mqtt *m = c->m;
    int granted = resp ? (int)resp->reasonCode : 1;
    char buf[128];

    pthread_mutex_lock(&m->mu);
    if (c->gen != m->gen || m->state != ST_SUBSCRIBING) {
        pthread_mutex_unlock(&m->mu);
        return;
    }
    if (granted >= MQTTREASONCODE_UNSPECIFIED_ERROR) {
        snprintf(buf, sizeof buf, "%s (reason code %d)",
                 MQTTReasonCode_toString((enum MQTTReasonCodes)granted), granted);
        subscribe_failed(m, buf);
        pthread_mutex_unlock(&m->mu);
        return;
    }
    m->state = ST_READY;
    m->quiet = 0;
    m->ready_at = cis_mono_ms();
    /* Reconnect fast after a broker restart. (Two receivers sharing a client id take the
     * session from each other at this pace; the loss line says what to check.) */
    cis_backoff_reset(&m->bo);
    cis_info("[mqtt] connected to %s as '%s' (%s session); subscribed to %s", m->url,
             m->client_id, m->session_present ? "resumed" : "new", m->filter);
    if (granted == 0)
        cis_warn("[mqtt] the broker granted QoS 0 on %s: batches may be dropped on the way "
                 "(agents re-send what is not acknowledged); allow QoS 1",
                 m->filter);
    pthread_mutex_unlock(&m->mu);
}

static void on_subscribe_fail(void *ctx, MQTTAsync_failureData5 *resp)
{
    struct conn *c = ctx;
    struct recv_mqtt *m = c->m;
    char buf[256];

    failure_why(resp, buf, sizeof buf);
    pthread_mutex_lock(&m->mu);
    if (c->gen == m->gen)
        subscribe_failed(m, buf);
    pthread_mutex_unlock(&m->mu);
}

static void on_connection_lost(void *ctx, char *cause)
{
    struct conn *c = ctx;
    struct recv_mqtt *m = c->m;

    pthread_mutex_lock(&m->mu);
    if (c->gen == m->gen)
        lost(m, cause != NULL && cause[0] != '\0' ? cause : "connection closed");
    pthread_mutex_unlock(&m->mu);
}

/* MQTT 5: the broker sent DISCONNECT. Paho does not call connectionLost then. */
static void on_disconnected(void *ctx, MQTTProperties *props, enum MQTTReasonCodes rc)
{
    struct conn *c = ctx;
    struct recv_mqtt *m = c->m;
    char buf[320];

    (void)props;
    if (rc == MQTTREASONCODE_SESSION_TAKEN_OVER)
        snprintf(buf, sizeof buf,
                 "the broker says: %s: another client connected with client id '%s' (every "
                 "receiver needs its own mqtt.client_id)",
                 MQTTReasonCode_toString(rc), m->client_id);
    else
        snprintf(buf, sizeof buf, "the broker says: %s (reason code %d)",
                 MQTTReasonCode_toString(rc), (int)rc);
    pthread_mutex_lock(&m->mu);
    if (c->gen == m->gen)
        lost(m, buf);
    pthread_mutex_unlock(&m->mu);
}

static void on_disconnect_done(void *ctx, MQTTAsync_successData5 *resp)
{
    struct recv_mqtt *m = ((struct conn *)ctx)->m;

    (void)resp;
    pthread_mutex_lock(&m->mu);
    m->disconnect_done = 1;
    wake(m);
    pthread_mutex_unlock(&m->mu);
}

static void on_disconnect_fail(void *ctx, MQTTAsync_failureData5 *resp)
{
    (void)resp;
    on_disconnect_done(ctx, NULL);
}

/* An ack's PUBACK (or its failure): the next ack may go. Only one is in flight, so no token
 * is compared (the PUBACK may even come before MQTTAsync_sendMessage returns its token). */
static void ack_done(struct conn *c)
{
    struct recv_mqtt *m = c->m;
    pthread_mutex_lock(&m->mu);
    if (c->gen == m->gen && m->ack_busy) {
        m->ack_busy = 0;
        wake(m);
    }
    pthread_mutex_unlock(&m->mu);
}

static void on_ack_ok(void *ctx, MQTTAsync_successData5 *resp)
{
    (void)resp;
    ack_done(ctx);
}

static void on_ack_fail(void *ctx, MQTTAsync_failureData5 *resp)
{
    struct conn *c = ctx;
    char buf[256];

    ack_done(c);

    /* A refusal by the broker comes with its reason code (>= 0x80). MQTTASYNC_FAILURE (Paho's
     * SOCKET_ERROR) means Paho could not write the PUBLISH on a breaking connection, and then
     * (1.3.12) keeps freed memory in this client's in-flight list: the client must never be
     * reconnected nor destroyed (see client_close). A PUBLISH flushed with a lost connection
     * (MQTTASYNC_OPERATION_INCOMPLETE and the like) leaves nothing behind. */
    if (resp == NULL || (resp->reasonCode < MQTTREASONCODE_UNSPECIFIED_ERROR &&
                         resp->code == MQTTASYNC_FAILURE)) {
        pthread_mutex_lock(&c->m->mu);
        c->poisoned = 1;
        pthread_mutex_unlock(&c->m->mu);
    }
    /* The agent re-sends the batch after its timeout; the store's unique key makes that
     * harmless. A lost connection is logged by its own callback. */
    cis_debug("[mqtt] ack not delivered: %s", failure_why(resp, buf, sizeof buf));
}

/* 1 when the Content Type property S (LEN bytes) names the signed batch type (parameters after
 * ';' allowed). */
static int content_type_ok(const char *s, size_t len)
{
    size_t n = strlen(CIS_SIGNED_BATCH_CONTENT_TYPE);

    if (s == NULL || len < n || strncasecmp(s, CIS_SIGNED_BATCH_CONTENT_TYPE, n) != 0)
        return 0;
    for (; n < len && (s[n] == ' ' || s[n] == '\t'); n++)
        ;
    return n == len || s[n] == ';';
}

int recv_mqtt_handle(const struct recv_ingest_ctx *ctx, const char *prefix, const char *topic,
                     size_t topic_len, const char *content_type, size_t ct_len,
                     const uint8_t *payload, size_t len, struct recv_mqtt_outcome *out)
{
    static const uint8_t empty[1];
    int tshow = (int)(topic_len > 200 ? 200 : topic_len);

    memset(out, 0, sizeof *out);
    if (recv_mqtt_topic_agent(prefix, topic, topic_len, out->agent, sizeof out->agent) != 0) {
        snprintf(out->why, sizeof out->why, "topic '%.*s' is not %s/<agent_id>/batch", tshow,
                 topic, prefix);
        out->agent[0] = '\0';
        out->status = RECV_INGEST_REJECTED;
    } else if (content_type != NULL && !content_type_ok(content_type, ct_len)) {
        snprintf(out->why, sizeof out->why, "Content Type must be " CIS_SIGNED_BATCH_CONTENT_TYPE
                 " (unsigned batches are not accepted)");
        out->status = RECV_INGEST_REJECTED;
    } else {
        /* The broker's ACL binds the topic to the gateway's identity; the batch must say the
         * same agent id, whatever the broker let through. */
        out->status = recv_ingest_batch(ctx, len > 0 ? payload : empty, len, out->agent,
                                        &out->res, out->why, sizeof out->why);
    }
    recv_mqtt_ack_json(out->status, &out->res, out->why, &out->ack);
    return out->status;
}

void recv_mqtt_outcome_free(struct recv_mqtt_outcome *o)
{
    if (o == NULL)
        return;
    recv_ingest_result_free(&o->res);
    recv_buf_free(&o->ack);
}

/* Publish ACK (the payload recv_mqtt_handle built) to TOPIC (QoS 1) with the batch's correlation
 * data CD copied. On our thread, without MU. One at a time: the next batch is handled once this
 * ack has its PUBACK (or ACK_PUBACK_WAIT_MS passed, or the connection went), because Paho
 * 1.3.12 leaves freed memory in a client whose PUBLISH write failed (see client_close). A
 * write fails on a connection the broker reset before Paho's reader noticed; one ack at a time
 * means fewer writes meet that moment, and the ack that meets it gets no PUBACK, so no second
 * one follows it (docs/protocol.md has the measured rates). */
static void publish_ack(struct recv_mqtt *m, const char *topic, const MQTTProperty *cd,
                        const struct recv_buf *ack)
{
    MQTTAsync_message am = MQTTAsync_message_initializer;
    MQTTAsync_responseOptions ro = MQTTAsync_responseOptions_initializer;
    MQTTProperty p;
    int rc;

    if (ack->oom || ack->p == NULL)
        goto nomem;
    /* MQTTProperties_add copies the bytes: the batch's own properties stay Paho's. */
    if (cd != NULL) {
        memset(&p, 0, sizeof p);
        p.identifier = MQTTPROPERTY_CODE_CORRELATION_DATA;
        p.value.data = cd->value.data;
        if (MQTTProperties_add(&am.properties, &p) != 0)
            goto nomem;
    }
    memset(&p, 0, sizeof p);
    p.identifier = MQTTPROPERTY_CODE_CONTENT_TYPE;
    p.value.data.data = (char *)ACK_CONTENT_TYPE;
    p.value.data.len = (int)strlen(ACK_CONTENT_TYPE);
    if (MQTTProperties_add(&am.properties, &p) != 0)
        goto nomem;
    am.payload = ack->p;
    am.payloadlen = (int)ack->len;
    am.qos = 1;
    am.retained = 0;
    ro.onSuccess5 = on_ack_ok;
    ro.onFailure5 = on_ack_fail;
    ro.context = m->conn;
    /* Busy before the call: its PUBACK may come back before MQTTAsync_sendMessage returns. */
    pthread_mutex_lock(&m->mu);
    m->ack_busy = 1;
    m->ack_deadline = cis_mono_ms() + ACK_PUBACK_WAIT_MS;
    pthread_mutex_unlock(&m->mu);
    rc = MQTTAsync_sendMessage(m->cli, topic, &am, &ro); /* copies what it keeps */
    if (rc != MQTTASYNC_SUCCESS) {
        pthread_mutex_lock(&m->mu);
        m->ack_busy = 0;
        pthread_mutex_unlock(&m->mu);
    }
    if (rc != MQTTASYNC_SUCCESS)
        cis_debug("[mqtt] cannot publish the ack to %s: %s; the agent will re-send", topic,
                  MQTTAsync_strerror(rc));
    goto out;
nomem:
    cis_warn("[mqtt] out of memory building an ack for %s; the agent will re-send", topic);
out:
    MQTTProperties_free(&am.properties);
}

/* One batch, on our thread: recv_mqtt_handle (the topic's agent id, the Content Type, the
 * shared ingest: decode, check, the batch's agent id against the topic's, store in one
 * transaction), count, and answer. */
static void handle_batch(struct recv_mqtt *m, const char *topic, size_t tlen,
                         MQTTAsync_message *msg)
{
    char ack_topic[512];
    const MQTTProperty *rt, *cd, *ct;
    struct recv_mqtt_outcome o;
    int status, answerable = 0, log_unanswered = 0, log_store = 0;
    int tshow = (int)(tlen > 200 ? 200 : tlen);

    rt = MQTTProperties_getProperty(&msg->properties, MQTTPROPERTY_CODE_RESPONSE_TOPIC);
    cd = MQTTProperties_getProperty(&msg->properties, MQTTPROPERTY_CODE_CORRELATION_DATA);
    ct = MQTTProperties_getProperty(&msg->properties, MQTTPROPERTY_CODE_CONTENT_TYPE);
    status = recv_mqtt_handle(
        &m->ingest, m->prefix, topic, tlen,
        ct == NULL ? NULL : ct->value.data.data != NULL ? ct->value.data.data : "",
        ct != NULL && ct->value.data.len > 0 ? (size_t)ct->value.data.len : 0, msg->payload,
        msg->payloadlen > 0 ? (size_t)msg->payloadlen : 0, &o);

    /* Answer only on the sender's own ack topic: the receiver may write every agent's ack
     * topic, and must not be made to write on another agent's behalf. */
    if (o.agent[0] != '\0' && rt != NULL) {
        int n = snprintf(ack_topic, sizeof ack_topic, "%s/%s/ack", m->prefix, o.agent);
        answerable = n > 0 && (size_t)n < sizeof ack_topic && rt->value.data.len == n &&
                     memcmp(rt->value.data.data, ack_topic, (size_t)n) == 0;
    }

    pthread_mutex_lock(&m->mu);
    m->stats.batches++;
    if (status == RECV_INGEST_OK) {
        m->stats.accepted += o.res.accepted;
        m->stats.duplicates += o.res.duplicates;
        if (m->store_failing)
            log_store = -1;
        m->store_failing = 0;
    } else if (status == RECV_INGEST_RETRY) {
        m->stats.retry++;
        if (!m->store_failing)
            log_store = 1;
        m->store_failing = 1;
    } else if (status == RECV_INGEST_UNAUTHORIZED) {
        m->stats.retry++; /* logged by the ingest, once per reason */
    } else {
        m->stats.rejected++;
    }
    if (!answerable) {
        m->stats.unanswered++;
        log_unanswered = !m->warned_unanswered;
        m->warned_unanswered = 1;
    }
    pthread_mutex_unlock(&m->mu);

    if (status == RECV_INGEST_OK)
        cis_debug("[mqtt] batch from %s epoch %" PRIu64 ": %" PRIu64 " accepted, %" PRIu64
                  " duplicates",
                  o.res.agent_id, o.res.epoch, o.res.accepted, o.res.duplicates);
    else if (status == RECV_INGEST_REJECTED)
        cis_debug("[mqtt] batch on %.*s rejected: %s", tshow, topic, o.why);
    if (log_store > 0)
        cis_warn("[mqtt] store failing: %s; answering \"retry\" until it recovers", o.why);
    else if (log_store < 0)
        cis_info("[mqtt] store recovered: batches are stored again");
    if (log_unanswered)
        cis_warn("[mqtt] a batch on %.*s has %s: it was %s but its sender cannot be acknowledged "
                 "and will re-send it (logged once; see the counters)",
                 tshow, topic,
                 rt == NULL ? "no Response Topic" : "a Response Topic other than its ack topic",
                 status == RECV_INGEST_OK ? "stored" : "not stored");
    else if (!answerable)
        cis_debug("[mqtt] batch on %.*s cannot be acknowledged (no usable Response Topic)", tshow,
                  topic);

    if (answerable)
        publish_ack(m, ack_topic, cd, &o.ack);
    recv_mqtt_outcome_free(&o);
}

static void work_free(struct work *w)
{
    if (w == NULL)
        return;
    MQTTAsync_freeMessage(&w->msg);
    MQTTAsync_free(w->topic);
    free(w);
}

/* messageArrived, on Paho's receive thread: hand the batch to our thread and return at once
 * (1: handled; Paho has already acknowledged it to the broker, the end-to-end ack is ours).
 * Storing here would keep this thread from its poll for a whole commit, and meanwhile it cannot
 * notice that the connection died: our acks would then more often be written to a dead socket,
 * which Paho 1.3.12 handles badly (see client_close).
 *
 * When the queue is full the batch is dropped, neither stored nor answered: its agent sends it
 * again after forward.timeout. */
static int on_message(void *ctx, char *topic, int topic_len, MQTTAsync_message *msg)
{
    struct conn *c = ctx;
    struct recv_mqtt *m = c->m;
    uint64_t len = msg->payloadlen > 0 ? (uint64_t)msg->payloadlen : 0;
    struct work *w = calloc(1, sizeof *w);
    int log_full = 0, log_ok = 0, queued = 0;

    pthread_mutex_lock(&m->mu);
    m->in_callback++;
    if (w != NULL && !m->stopping && c->gen == m->gen &&
        (m->nwork == 0 || (m->nwork < MAX_WORK && m->work_bytes + len <= MAX_WORK_BYTES))) {
        w->topic = topic;
        w->topic_len = topic_len > 0 ? (size_t)topic_len : strlen(topic);
        w->msg = msg;
        *m->work_tail = w;
        m->work_tail = &w->next;
        m->nwork++;
        m->work_bytes += len;
        log_ok = m->overflowing;
        m->overflowing = 0;
        queued = 1;
        wake(m);
    } else if (w != NULL && !m->stopping && c->gen == m->gen) {
        m->stats.batches++;
        m->stats.unanswered++;
        log_full = !m->overflowing;
        m->overflowing = 1;
    }
    pthread_mutex_unlock(&m->mu);

    if (log_full)
        cis_warn("[mqtt] %d batches or %" PRIu64 " MiB wait for the store: new batches are "
                 "dropped until it catches up (their agents send them again)",
                 MAX_WORK, (uint64_t)(MAX_WORK_BYTES >> 20));
    if (log_ok)
        cis_info("[mqtt] the store caught up: taking batches again");
    if (!queued) {
        if (w == NULL)
            cis_warn("[mqtt] out of memory: a batch was dropped (its agent sends it again)");
        free(w);
        MQTTAsync_freeMessage(&msg);
        MQTTAsync_free(topic);
    }
    pthread_mutex_lock(&m->mu);
    m->in_callback--;
    wake(m);
    pthread_mutex_unlock(&m->mu);
    return 1;
}

/* ---- Paho clients: one per connection ---- */

static void noop_lost(void *ctx, char *cause)
{
    (void)ctx;
    (void)cause;
}

static int noop_message(void *ctx, char *topic, int topic_len, MQTTAsync_message *msg)
{
    (void)ctx;
    (void)topic_len;
    MQTTAsync_freeMessage(&msg);
    MQTTAsync_free(topic);
    return 1;
}

/* Let go of client CLI (disconnected) and its context C. Accepts NULL. */
static void client_close(struct recv_mqtt *m, MQTTAsync cli, struct conn *c)
{
    int poisoned;

    if (cli == NULL)
        return;
    pthread_mutex_lock(&m->mu);
    poisoned = c->poisoned;
    pthread_mutex_unlock(&m->mu);
    if (poisoned) {
        /* Paho 1.3.12: when the write of a QoS 1 PUBLISH fails on a breaking connection, Paho
         * reports the failure and frees the message's topic and payload, yet keeps the message
         * to send again (paho.mqtt.c issues 1621, 1622). Reconnecting this client would send
         * freed memory, destroying it would free it twice. So it is left to Paho, disconnected
         * and inert, with its context: a few KiB once per such failure rather than a corrupt
         * heap. */
        cis_info("[mqtt] Paho failed to write an ack on the breaking connection: its client is "
                 "set aside (a few KiB kept; Paho 1.3.12 bug)");
        MQTTAsync_setCallbacks(cli, NULL, noop_lost, noop_message, NULL);
        MQTTAsync_setDisconnected(cli, NULL, NULL);
        return;
    }
    MQTTAsync_destroy(&cli);
    free(c);
}

/* Make a new client (same client id: the broker's session goes on) the current one, then let
 * go of the old one. The new one is made first: Paho resets its heap bookkeeping when its last
 * client is destroyed, and the batches still queued were allocated under the current one.
 * From our thread (or start), without MU. Returns 0, or CIS_E* with a reason in WHY. */
static int client_replace(struct recv_mqtt *m, char *why, size_t whylen)
{
    MQTTAsync_createOptions cr = MQTTAsync_createOptions_initializer5;
    MQTTAsync cli = NULL, old_cli = m->cli;
    struct conn *c = calloc(1, sizeof *c), *old_c = m->conn;
    int rc;

    if (c == NULL) {
        snprintf(why, whylen, "out of memory");
        return CIS_ENOMEM;
    }
    c->m = m;
    pthread_mutex_lock(&m->mu);
    c->gen = m->gen + 1;
    pthread_mutex_unlock(&m->mu);
    /* Persistence NONE: nothing on disk; the broker's session is what persists. */
    cr.sendWhileDisconnected = 0;
    cr.maxBufferedMessages = MAX_BUFFERED;
    rc = MQTTAsync_createWithOptions(&cli, m->url, m->client_id, MQTTCLIENT_PERSISTENCE_NONE,
                                     NULL, &cr);
    if (rc != MQTTASYNC_SUCCESS) {
        snprintf(why, whylen, "cannot create an MQTT client for %s: %s", m->url,
                 MQTTAsync_strerror(rc));
        free(c);
        return CIS_EINVAL;
    }
    if ((rc = MQTTAsync_setCallbacks(cli, c, on_connection_lost, on_message, NULL)) !=
            MQTTASYNC_SUCCESS ||
        (rc = MQTTAsync_setDisconnected(cli, c, on_disconnected)) != MQTTASYNC_SUCCESS) {
        snprintf(why, whylen, "cannot set up the MQTT client: %s", MQTTAsync_strerror(rc));
        MQTTAsync_destroy(&cli);
        free(c);
        return CIS_EIO;
    }
    pthread_mutex_lock(&m->mu);
    m->cli = cli;
    m->conn = c;
    m->gen = c->gen;
    m->replace_client = 0;
    pthread_mutex_unlock(&m->mu);
    client_close(m, old_cli, old_c);
    return 0;
}

/* ---- our thread: connect, subscribe, back off ---- */

static int start_connect(struct recv_mqtt *m)
{
    MQTTAsync_connectOptions co = MQTTAsync_connectOptions_initializer5;
    MQTTAsync_SSLOptions ssl = MQTTAsync_SSLOptions_initializer;
    MQTTProperties props = MQTTProperties_initializer;
    MQTTProperty p;
    int rc;

    memset(&p, 0, sizeof p);
    p.identifier = MQTTPROPERTY_CODE_SESSION_EXPIRY_INTERVAL;
    p.value.integer4 = m->session_expiry_s;
    if (MQTTProperties_add(&props, &p) != 0)
        return MQTTASYNC_FAILURE;
    /* TLS verification is always on: the broker's certificate and its host name. */
    ssl.trustStore = m->ca;
    ssl.keyStore = m->cert;
    ssl.privateKey = m->key;
    ssl.enableServerCertAuth = 1;
    ssl.verify = 1;
    ssl.ssl_error_cb = on_ssl_error;
    ssl.ssl_error_context = m->conn;
    co.keepAliveInterval = m->keepalive_s;
    /* A persistent session: batches published while this receiver is away wait in the
     * broker for it, and its subscription survives. */
    co.cleanstart = 0;
    co.connectProperties = &props;
    co.connectTimeout = CONNECT_TIMEOUT_S;
    co.retryInterval = 0;
    co.automaticReconnect = 0; /* reconnects are ours, with our backoff and logs */
    co.ssl = &ssl;
    co.username = m->username;
    co.password = m->password;
    co.onSuccess5 = on_connect_ok;
    co.onFailure5 = on_connect_fail;
    co.context = m->conn;
    rc = MQTTAsync_connect(m->cli, &co); /* copies what it keeps */
    MQTTProperties_free(&props);
    return rc;
}

static int start_subscribe(struct recv_mqtt *m)
{
    MQTTAsync_responseOptions ro = MQTTAsync_responseOptions_initializer;

    /* noLocal stays 0: it is a protocol error on a shared subscription. */
    ro.onSuccess5 = on_subscribe_ok;
    ro.onFailure5 = on_subscribe_fail;
    ro.context = m->conn;
    return MQTTAsync_subscribe(m->cli, m->filter, 1, &ro);
}

/* Log the counters since the last such line, when there were any. With MU held. */
static void log_stats(struct recv_mqtt *m)
{
    struct recv_mqtt_stats d = {
        .batches = m->stats.batches - m->stats_logged.batches,
        .accepted = m->stats.accepted - m->stats_logged.accepted,
        .duplicates = m->stats.duplicates - m->stats_logged.duplicates,
        .rejected = m->stats.rejected - m->stats_logged.rejected,
        .retry = m->stats.retry - m->stats_logged.retry,
        .unanswered = m->stats.unanswered - m->stats_logged.unanswered,
    };

    if (d.batches == 0)
        return;
    cis_info("[mqtt] last %d min: %" PRIu64 " batches: %" PRIu64 " records accepted, %" PRIu64
             " duplicates; %" PRIu64 " batches rejected, %" PRIu64 " answered retry, %" PRIu64
             " unanswered",
             STATS_INTERVAL_MS / 60000, d.batches, d.accepted, d.duplicates, d.rejected, d.retry,
             d.unanswered);
    m->stats_logged = m->stats;
}

static void wait_until(struct recv_mqtt *m, int64_t deadline_ms)
{
    struct timespec ts;

    if (deadline_ms < 0) {
        pthread_cond_wait(&m->cv, &m->mu);
        return;
    }
    cis_mono_timespec(deadline_ms, &ts);
    pthread_cond_timedwait(&m->cv, &m->mu, &ts);
}

/* Take the oldest batch off the queue, store and answer it. Called with MU held; releases it
 * meanwhile. */
static void handle_next(struct recv_mqtt *m)
{
    struct work *w = m->work;

    m->work = w->next;
    if (m->work == NULL)
        m->work_tail = &m->work;
    m->nwork--;
    m->work_bytes -= w->msg->payloadlen > 0 ? (uint64_t)w->msg->payloadlen : 0;
    pthread_mutex_unlock(&m->mu);
    handle_batch(m, w->topic, w->topic_len, w->msg);
    work_free(w);
    pthread_mutex_lock(&m->mu);
}

static void *run(void *arg)
{
    struct recv_mqtt *m = arg;
    int rc;

    pthread_mutex_lock(&m->mu);
    while (!m->stopping) {
        int64_t now = cis_mono_ms(), deadline;

        if (m->state == ST_IDLE && now >= m->next_ms) {
            /* After a lost connection, a new client: the old one's unacknowledged acks are not
             * worth sending again (the agents re-send their batches), and it may hold a broken
             * one (see client_close). The session at the broker belongs to the client id. */
            int replace = m->replace_client || m->conn->poisoned;
            char why[256];

            m->state = ST_CONNECTING;
            m->tls_error[0] = '\0';
            pthread_mutex_unlock(&m->mu);
            rc = replace ? client_replace(m, why, sizeof why) : 0;
            if (rc == 0 && (rc = start_connect(m)) != MQTTASYNC_SUCCESS)
                snprintf(why, sizeof why, "%s", MQTTAsync_strerror(rc));
            pthread_mutex_lock(&m->mu);
            if (rc != 0 && m->state == ST_CONNECTING)
                connect_failed(m, why);
            continue;
        }
        if (m->work != NULL) {
            /* The last ack first gets its PUBACK (see publish_ack). */
            if (m->ack_busy && m->state == ST_READY && now < m->ack_deadline) {
                wait_until(m, m->ack_deadline);
                continue;
            }
            m->ack_busy = 0;
            handle_next(m);
            continue;
        }
        if (m->state == ST_NEED_SUB && now >= m->next_ms) {
            m->state = ST_SUBSCRIBING;
            pthread_mutex_unlock(&m->mu);
            rc = start_subscribe(m);
            pthread_mutex_lock(&m->mu);
            if (rc != MQTTASYNC_SUCCESS)
                subscribe_failed(m, MQTTAsync_strerror(rc));
            continue;
        }
        if (now - m->stats_at >= STATS_INTERVAL_MS) {
            log_stats(m);
            m->stats_at = now;
        }
        deadline = m->stats_at + STATS_INTERVAL_MS;
        if ((m->state == ST_IDLE || m->state == ST_NEED_SUB) && m->next_ms < deadline)
            deadline = m->next_ms;
        wait_until(m, deadline);
    }
    pthread_mutex_unlock(&m->mu);
    return NULL;
}

/* ---- start / stop ---- */

static char *dup_or_null(const char *s, int *oom)
{
    char *d;

    if (s == NULL || s[0] == '\0')
        return NULL;
    d = strdup(s);
    if (d == NULL)
        *oom = 1;
    return d;
}

static int readable(const char *key, const char *path, char *err, size_t errlen)
{
    FILE *f;

    if (path == NULL)
        return 0;
    f = fopen(path, "rb");
    if (f == NULL) {
        snprintf(err, errlen, "%s: %s: %s", key, path, strerror(errno));
        return CIS_EIO;
    }
    fclose(f);
    return 0;
}

/* Free the batches still queued; returns how many. */
static size_t drop_work(struct recv_mqtt *m)
{
    struct work *w;
    size_t n = 0;

    pthread_mutex_lock(&m->mu);
    while ((w = m->work) != NULL) {
        m->work = w->next;
        work_free(w);
        n++;
    }
    m->work_tail = &m->work;
    m->nwork = 0;
    m->work_bytes = 0;
    pthread_mutex_unlock(&m->mu);
    return n;
}

static void destroy(struct recv_mqtt *m)
{
    drop_work(m); /* before the last client goes: see client_replace */
    client_close(m, m->cli, m->conn);
    m->cli = NULL;
    m->conn = NULL;
    if (m->paho_held)
        cis_paho_release();
    pthread_cond_destroy(&m->cv);
    pthread_mutex_destroy(&m->mu);
    free(m->url);
    free(m->client_id);
    free(m->prefix);
    free(m->filter);
    free(m->username);
    free(m->password);
    free(m->ca);
    free(m->cert);
    free(m->key);
    free(m);
}

int recv_mqtt_start(const struct recv_config *cfg, const struct recv_store_ops *ops,
                    struct recv_store *st, struct recv_registry *reg, struct recv_mqtt **out,
                    char *err, size_t errlen)
{
    pthread_condattr_t ca;
    struct recv_mqtt *m;
    size_t flen;
    int oom = 0, rc;

    *out = NULL;
    if (cfg->mqtt_url == NULL || cfg->mqtt_client_id == NULL) {
        snprintf(err, errlen, "mqtt.url and mqtt.client_id are required");
        return CIS_EINVAL;
    }
    if ((rc = readable("mqtt.tls.ca_file", cfg->mqtt_ca_file, err, errlen)) ||
        (rc = readable("mqtt.tls.cert_file", cfg->mqtt_cert_file, err, errlen)) ||
        (rc = readable("mqtt.tls.key_file", cfg->mqtt_key_file, err, errlen)))
        return rc;
    m = calloc(1, sizeof *m);
    if (m == NULL) {
        snprintf(err, errlen, "out of memory");
        return CIS_ENOMEM;
    }
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&m->cv, &ca);
    pthread_condattr_destroy(&ca);
    pthread_mutex_init(&m->mu, NULL);

    m->url = dup_or_null(cfg->mqtt_url, &oom);
    m->client_id = dup_or_null(cfg->mqtt_client_id, &oom);
    m->prefix = dup_or_null(cfg->mqtt_topic_prefix ? cfg->mqtt_topic_prefix : "cistern/v1", &oom);
    m->username = dup_or_null(cfg->mqtt_username, &oom);
    m->password = dup_or_null(cfg->mqtt_password, &oom);
    m->ca = dup_or_null(cfg->mqtt_ca_file, &oom);
    m->cert = dup_or_null(cfg->mqtt_cert_file, &oom);
    m->key = dup_or_null(cfg->mqtt_key_file, &oom);
    if (!oom && m->prefix != NULL) {
        const char *g = cfg->mqtt_group ? cfg->mqtt_group : "cistern";
        flen = strlen("$share///+/batch") + strlen(g) + strlen(m->prefix) + 1;
        m->filter = malloc(flen);
        if (m->filter != NULL)
            snprintf(m->filter, flen, "$share/%s/%s/+/batch", g, m->prefix);
    }
    if (oom || m->url == NULL || m->client_id == NULL || m->prefix == NULL || m->filter == NULL) {
        snprintf(err, errlen, "out of memory");
        rc = CIS_ENOMEM;
        goto out;
    }
    m->keepalive_s = (int)(cfg->mqtt_keepalive_ms / 1000);
    if (m->keepalive_s < 1)
        m->keepalive_s = 1;
    m->session_expiry_s = (unsigned)(cfg->mqtt_session_expiry_ms / 1000);
    if (m->session_expiry_s < 1)
        m->session_expiry_s = 1;
    m->ingest = (struct recv_ingest_ctx){
        .ops = ops,
        .st = st,
        .reg = reg,
        .max_body = cfg->max_body,
        .limits = {.max_decompressed = (size_t)cfg->max_decompressed,
                   .max_records = (size_t)cfg->max_records},
        .identity_name = "topic agent id",
    };
    cis_backoff_init(&m->bo, BACKOFF_INITIAL_MS, BACKOFF_MAX_MS);
    m->work_tail = &m->work;
    m->state = ST_IDLE;
    m->next_ms = cis_mono_ms();
    m->stats_at = m->next_ms;

    /* Paho's global state lives as long as the ingest: see cistern/paho.h. */
    if (cis_paho_hold() != 0) {
        snprintf(err, errlen, "out of memory");
        rc = CIS_ENOMEM;
        goto out;
    }
    m->paho_held = 1;
    /* The first client now, so that a URL Paho cannot use stops the start. */
    rc = client_replace(m, err, errlen);
    if (rc != 0)
        goto out;
    if (pthread_create(&m->thread, NULL, run, m) != 0) {
        snprintf(err, errlen, "cannot start the MQTT thread: %s", strerror(errno));
        rc = CIS_EIO;
        goto out;
    }
    m->thread_started = 1;
    cis_info("[mqtt] connecting to %s as '%s', subscription %s", m->url, m->client_id,
             m->filter);
    *out = m;
    return 0;
out:
    destroy(m);
    return rc;
}

void recv_mqtt_get_stats(struct recv_mqtt *m, struct recv_mqtt_stats *out)
{
    pthread_mutex_lock(&m->mu);
    *out = m->stats;
    pthread_mutex_unlock(&m->mu);
}

void recv_mqtt_stop(struct recv_mqtt *m)
{
    MQTTAsync_disconnectOptions dop = MQTTAsync_disconnectOptions_initializer5;
    int64_t deadline;
    size_t dropped;

    if (m == NULL)
        return;
    pthread_mutex_lock(&m->mu);
    m->stopping = 1;
    wake(m);
    pthread_mutex_unlock(&m->mu);
    if (m->thread_started)
        pthread_join(m->thread, NULL);
    /* Received but not stored: unanswered, so their agents send them again. */
    dropped = drop_work(m);
    if (dropped > 0)
        cis_info("[mqtt] %zu batches received but not stored before the stop; their agents "
                 "send them again", dropped);

    /* A normal DISCONNECT keeps the session: batches published from now on wait in the broker
     * for the next start (or go to the other receivers of the group). */
    dop.timeout = DISCONNECT_TIMEOUT_MS;
    dop.onSuccess5 = on_disconnect_done;
    dop.onFailure5 = on_disconnect_fail;
    dop.context = m->conn;
    deadline = cis_mono_ms() + STOP_WAIT_MS;
    pthread_mutex_lock(&m->mu);
    m->disconnect_done = 0;
    pthread_mutex_unlock(&m->mu);
    if (MQTTAsync_disconnect(m->cli, &dop) == MQTTASYNC_SUCCESS) {
        pthread_mutex_lock(&m->mu);
        while (!m->disconnect_done && cis_mono_ms() < deadline)
            wait_until(m, deadline);
        pthread_mutex_unlock(&m->mu);
    }
    /* A messageArrived still running finishes before the client goes away. */
    pthread_mutex_lock(&m->mu);
    while (m->in_callback > 0 && cis_mono_ms() < deadline)
        wait_until(m, deadline);
    cis_info("[mqtt] stopped: %" PRIu64 " batches: %" PRIu64 " records accepted, %" PRIu64
             " duplicates; %" PRIu64 " batches rejected, %" PRIu64 " answered retry, %" PRIu64
             " unanswered",
             m->stats.batches, m->stats.accepted, m->stats.duplicates, m->stats.rejected,
             m->stats.retry, m->stats.unanswered);
    pthread_mutex_unlock(&m->mu);
    destroy(m);
}
