/* Transport "mqtt": publishes each batch at QoS 1 to <prefix>/<agent.id>/batch through a broker
 * (Paho MQTT C async, MQTT 5) and reports its result on the receiver's end-to-end ack (or on the
 * broker's PUBACK with forward.mqtt.ack: broker). Paho calls back on its own threads: those
 * callbacks only queue events (under a mutex) and wake the agent's loop through a pipe; all the
 * rest, and every call into the forwarder, runs on the loop thread, but for the diagnosis of a
 * refused broker certificate, made on a worker thread (struct diag). */
#include <MQTTAsync.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#include "agent.h"
#include "cistern/sign.h"
#include "cistern/backoff.h"
#include "cistern/err.h"
#include "cistern/log.h"
#include "cistern/paho.h"
#include "tls_diag.h"

#define RUN_ID_LEN 8
#define CORR_LEN 16          /* run id, then the batch token (big-endian u64) */
#define ACK_MAX 4096         /* an ack is a small JSON object: anything longer is not one */
#define JSON_MAX_DEPTH 32
#define DISCONNECT_WAIT_MS 2000
#define CONNECT_TIMEOUT_MAX_MS 10000
#define DIAG_TIMEOUT_MAX_MS 10000 /* both handshakes of a certificate diagnosis (struct diag) */
#define PUBLISH_MAX (256u * 1024 * 1024 - 64 * 1024) /* MQTT's packet limit, less the header */

/* ---- events handed from Paho's threads to the loop ---- */

enum ev_type {
    EV_CONNECTED,         /* CONNACK success; flag: session present */
    EV_CONNECT_FAILED,    /* reason: CONNACK code; rc, text: Paho's words */
    EV_LOST,              /* the connection broke */
    EV_SERVER_DISCONNECT, /* the broker sent DISCONNECT; reason */
    EV_SUBACK,            /* reason: granted QoS or a refusal (>= 0x80) */
    EV_PUBACK,            /* msgid; reason; flag: Paho reported a failure (rc, text) */
    EV_ACK,               /* a message on the ack topic: corr, payload */
};

struct ev {
    struct ev *next;
    unsigned gen; /* the client it came from (struct conn) */
    int type;
    int reason; /* MQTT reason code */
    int rc;     /* Paho's return code, 0 if none */
    int msgid;
    int flag;
    uint8_t corr[CORR_LEN];
    size_t corr_len; /* as received: anything but CORR_LEN is not ours */
    char *payload;   /* EV_ACK: a copy, NUL-terminated */
    size_t len;
    int too_long;    /* EV_ACK: over ACK_MAX, not copied */
    char text[160];
};

/* ---- the transport ---- */

enum conn_state {
    ST_IDLE,        /* not connected; next attempt at reconnect_at */
    ST_CONNECTING,  /* CONNECT sent, waiting for CONNACK */
    ST_SUBSCRIBING, /* connected, waiting for the ack topic's SUBACK */
    ST_NOSUB,       /* connected, but the broker refused the ack topic: retry at resubscribe_at */
    ST_UP,          /* batches can go */
};

/* The diagnosis of a connect failure that Paho words too vaguely: OpenSSL's "certificate verify
 * failed" names no check, and Paho's own "connect failure" is also what a certificate without the
 * broker's host name gets. A worker thread asks the broker again with libcurl (tls_diag.c),
 * which says which check fails and reads the certificate's dates and names. Its handshakes
 * block, and the loop must not: the loop starts the worker and joins it; the worker hands its
 * result back under the transport's mutex and wakes the loop.
 *
 * "certificate verify failed" is diagnosed once, until the failure changes or the link comes
 * up. A "connect failure" is diagnosed at each attempt: Paho says the same of a broker that is
 * down, so the words of an earlier diagnosis may no longer hold. Either way the log says a
 * failure once (link_failed, diag_collect). */
struct diag {
    struct mqtt *h;
    pthread_t thread;
    atomic_int stop;            /* set at the end: the worker returns within about a second */
    char *url;                  /* the broker as https://host:port (curl_free) */
    struct agent_tls_peer peer; /* borrows url and the config */
    char failure[256];          /* the failure diagnosed, as connect_failed() words it */
    /* Set by the worker, under h->mu. */
    int done;
    int rc; /* agent_tls_diagnose()'s */
    char words[400];
};

/* The context of one Paho client's callbacks. The client is replaced after a lost connection
 * (see client_close); events still queued from an earlier one carry an old GEN and are dropped. */
struct conn {
    struct mqtt *h;
    unsigned gen;
};

/* A batch handed to send(): first on the pending list (published, waiting for its answer),
 * then on the done list with its result, until the next tick gives that to the forwarder. The
 * node is made in send(), so that finishing a batch never needs memory. */
struct batch {
    struct batch *next;
    uint64_t token;
    int msgid;        /* Paho's token for the PUBLISH (its packet id) */
    int64_t deadline; /* monotonic ms: no answer by then, the batch failed */
    uint8_t *body;    /* on the queue: the batch, not yet handed to Paho (owned) */
    size_t len;
    struct agent_send_result r;
};

struct mqtt {
    struct agent *a;
    const struct agent_config *cfg;
    agent_sent_cb cb;
    void *ctx;
    MQTTAsync client;     /* NULL between clients */
    struct conn *conn;    /* the context of client's callbacks */
    unsigned gen;         /* conn->gen of the current client */
    int replace_client;   /* it lost its connection: the next attempt takes a new one */
    int poisoned;         /* Paho failed to write one of its PUBLISHes (see client_close) */
    const char *client_id;
    char *batch_topic, *ack_topic;
    uint8_t run_id[RUN_ID_LEN];
    int end_to_end;
    MQTTAsync_SSLOptions ssl;

    /* Shared with Paho's threads: only under mu. */
    pthread_mutex_t mu;
    struct ev *evq, **evq_tail;
    int lost_event;       /* an event could not be queued (no memory): start the link afresh */
    char tls_err[200];    /* the first OpenSSL error of the current connection attempt */
    int disconnect_done;  /* our DISCONNECT completed (destroy waits for it) */

    int wake[2]; /* pipe, set up once: a byte from any thread wakes the loop */

    /* Loop thread only. */
    int state; /* enum conn_state */
    int64_t reconnect_at;
    int64_t resubscribe_at;
    int session_present; /* from the last CONNACK, for the log line once subscribed */
    struct cis_backoff bo;
    char down_reason[512]; /* why no batch can go now */
    char logged[512];      /* the link failure last logged: the same again goes to debug */
    /* Certificate diagnoses (struct diag). Loop thread only, but diag's result (see there). */
    struct diag *diag;     /* the worker, running or done and not yet collected; or NULL */
    char failure[256];     /* the current connect failure, while a diagnosis may tell more */
    char diag_for[256];    /* the failure the last diagnosis was about, or "" */
    char diag_why[512];    /* the reason it gave (the failure's own words if it found none) */
    int diag_keep;         /* it holds until the failure changes (see struct diag) */
    char waiting[512];     /* the reason given while the worker runs */
    char refused[256];     /* the broker's last refusal of a batch logged; "" while it accepts */
    int warned_malformed;
    struct batch *pending;
    struct batch *done, **done_tail;
    /* One PUBLISH at a time goes to Paho: the next waits for the broker's PUBACK of the last
     * (see publish_next). The window of batches waiting for the receiver's ack is not
     * narrowed by this: a PUBACK comes after one round trip to the broker. */
    struct batch *queue, **queue_tail;
    int pub_busy;  /* a PUBLISH handed to Paho has no PUBACK yet */
    int pub_msgid; /* its token */
};

static void publish_next(struct mqtt *h);

/* ---- pure helpers (tests/unit/test_mqtt_ack.c) ---- */

/* Write the 16 bytes of correlation data: RUN_ID, then TOKEN big-endian. */
static void corr_encode(uint8_t out[CORR_LEN], const uint8_t run_id[RUN_ID_LEN], uint64_t token)
{
    memcpy(out, run_id, RUN_ID_LEN);
    for (int i = 0; i < 8; i++)
        out[RUN_ID_LEN + i] = (uint8_t)(token >> (56 - 8 * i));
}

/* Read correlation data DATA (LEN bytes, borrowed). Returns 0 with *TOKEN set when it carries
 * RUN_ID, CIS_ENOTFOUND when it comes from another run of the agent, CIS_EINVAL when it is not
 * 16 bytes. */
static int corr_decode(const uint8_t *data, size_t len, const uint8_t run_id[RUN_ID_LEN],
                       uint64_t *token)
{
    uint64_t t = 0;
    if (!data || len != CORR_LEN)
        return CIS_EINVAL;
    if (memcmp(data, run_id, RUN_ID_LEN) != 0)
        return CIS_ENOTFOUND;
    for (int i = 0; i < 8; i++)
        t = t << 8 | data[RUN_ID_LEN + i];
    *token = t;
    return 0;
}

struct json {
    const char *p, *end;
};

static void j_ws(struct json *j)
{
    while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r'))
        j->p++;
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* A JSON string at j->p. Its text (escapes resolved, control characters made spaces, cut to
 * OUTLEN - 1 bytes) goes to OUT when OUT is not NULL. Returns 0, or -1 if malformed. */
static int j_string(struct json *j, char *out, size_t outlen)
{
    size_t n = 0;
    if (j->p >= j->end || *j->p != '"')
        return -1;
    j->p++;
    while (j->p < j->end) {
        unsigned char c = (unsigned char)*j->p++;
        unsigned char buf[3];
        size_t blen = 1;
        if (c == '"') {
            if (out)
                out[n] = '\0';
            return 0;
        }
        if (c < 0x20)
            return -1;
        buf[0] = c;
        if (c == '\\') {
            if (j->p >= j->end)
                return -1;
            c = (unsigned char)*j->p++;
            switch (c) {
            case '"': case '\\': case '/': buf[0] = c; break;
            case 'b': case 'f': case 'n': case 'r': case 't': buf[0] = ' '; break;
            case 'u': {
                unsigned cp = 0;
                if (j->end - j->p < 4)
                    return -1;
                for (int i = 0; i < 4; i++) {
                    int v = hexval(j->p[i]);
                    if (v < 0)
                        return -1;
                    cp = cp << 4 | (unsigned)v;
                }
                j->p += 4;
                if (cp >= 0xD800 && cp <= 0xDFFF)
                    cp = 0xFFFD; /* surrogate halves: not worth pairing for a log line */
                if (cp < 0x20) {
                    buf[0] = ' ';
                } else if (cp < 0x80) {
                    buf[0] = (unsigned char)cp;
                } else if (cp < 0x800) {
                    buf[0] = (unsigned char)(0xC0 | cp >> 6);
                    buf[1] = (unsigned char)(0x80 | (cp & 0x3F));
                    blen = 2;
                } else {
                    buf[0] = (unsigned char)(0xE0 | cp >> 12);
                    buf[1] = (unsigned char)(0x80 | (cp >> 6 & 0x3F));
                    buf[2] = (unsigned char)(0x80 | (cp & 0x3F));
                    blen = 3;
                }
                break;
            }
            default: return -1;
            }
        }
        if (out && n + blen < outlen) {
            memcpy(out + n, buf, blen);
            n += blen;
        }
    }
    return -1;
}

static int j_number(struct json *j)
{
    const char *s;
    if (j->p < j->end && *j->p == '-')
        j->p++;
    if (j->p >= j->end)
        return -1;
    if (*j->p == '0') {
        j->p++;
    } else if (*j->p >= '1' && *j->p <= '9') {
        while (j->p < j->end && *j->p >= '0' && *j->p <= '9')
            j->p++;
    } else {
        return -1;
    }
    if (j->p < j->end && *j->p == '.') {
        s = ++j->p;
        while (j->p < j->end && *j->p >= '0' && *j->p <= '9')
            j->p++;
        if (j->p == s)
            return -1;
    }
    if (j->p < j->end && (*j->p == 'e' || *j->p == 'E')) {
        j->p++;
        if (j->p < j->end && (*j->p == '+' || *j->p == '-'))
            j->p++;
        s = j->p;
        while (j->p < j->end && *j->p >= '0' && *j->p <= '9')
            j->p++;
        if (j->p == s)
            return -1;
    }
    return 0;
}

static int j_literal(struct json *j, const char *word)
{
    size_t n = strlen(word);
    if ((size_t)(j->end - j->p) < n || memcmp(j->p, word, n) != 0)
        return -1;
    j->p += n;
    return 0;
}

/* Skip one JSON value, checking its syntax. Returns 0, or -1 if malformed or nested too deep. */
static int j_skip(struct json *j, int depth)
{
    char close;
    j_ws(j);
    if (j->p >= j->end || depth > JSON_MAX_DEPTH)
        return -1;
    switch (*j->p) {
    case '"': return j_string(j, NULL, 0);
    case 't': return j_literal(j, "true");
    case 'f': return j_literal(j, "false");
    case 'n': return j_literal(j, "null");
    case '{':
    case '[':
        close = *j->p == '{' ? '}' : ']';
        j->p++;
        j_ws(j);
        if (j->p < j->end && *j->p == close) {
            j->p++;
            return 0;
        }
        for (;;) {
            if (close == '}') {
                j_ws(j);
                if (j_string(j, NULL, 0) != 0)
                    return -1;
                j_ws(j);
                if (j->p >= j->end || *j->p++ != ':')
                    return -1;
            }
            if (j_skip(j, depth + 1) != 0)
                return -1;
            j_ws(j);
            if (j->p >= j->end)
                return -1;
            if (*j->p == close) {
                j->p++;
                return 0;
            }
            if (*j->p++ != ',')
                return -1;
        }
    default: return j_number(j);
    }
}

/* Parse an ack payload (LEN bytes, not NUL-terminated, untrusted) into R: "ok" gives status 0,
 * "rejected" CIS_EINVAL with the receiver's "error" as reason, "retry" CIS_EAGAIN. Returns 0, or
 * CIS_EDECODE when PAYLOAD is not one JSON object with a known "status" (R is then zeroed). */
static int ack_parse(const char *payload, size_t len, struct agent_send_result *r)
{
    struct json j = {payload, payload + len};
    char key[32], status[16] = "", error[sizeof(r->reason)] = "";
    int have_status = 0;

    memset(r, 0, sizeof(*r));
    if (!payload)
        return CIS_EDECODE;
    j_ws(&j);
    if (j.p >= j.end || *j.p++ != '{')
        return CIS_EDECODE;
    j_ws(&j);
    if (j.p < j.end && *j.p == '}') {
        j.p++;
    } else {
        for (;;) {
            j_ws(&j);
            if (j_string(&j, key, sizeof(key)) != 0)
                return CIS_EDECODE;
            j_ws(&j);
            if (j.p >= j.end || *j.p++ != ':')
                return CIS_EDECODE;
            j_ws(&j);
            if (strcmp(key, "status") == 0) {
                if (j_string(&j, status, sizeof(status)) != 0)
                    return CIS_EDECODE; /* not a string: not an ack we understand */
                have_status = 1;
            } else if (strcmp(key, "error") == 0 && j.p < j.end && *j.p == '"') {
                if (j_string(&j, error, sizeof(error)) != 0)
                    return CIS_EDECODE;
            } else if (j_skip(&j, 1) != 0) {
                return CIS_EDECODE;
            }
            j_ws(&j);
            if (j.p >= j.end)
                return CIS_EDECODE;
            if (*j.p == '}') {
                j.p++;
                break;
            }
            if (*j.p++ != ',')
                return CIS_EDECODE;
        }
    }
    j_ws(&j);
    if (j.p != j.end || !have_status)
        return CIS_EDECODE;
    if (strcmp(status, "ok") == 0) {
        r->status = 0;
        size_t n = len < sizeof(r->reason) ? len : sizeof(r->reason) - 1;
        snprintf(r->reason, sizeof(r->reason), "%.*s", (int)n, payload);
    } else if (strcmp(status, "rejected") == 0) {
        r->status = CIS_EINVAL;
        snprintf(r->reason, sizeof(r->reason), "%s",
                 error[0] ? error : "rejected by the receiver (no reason given)");
    } else if (strcmp(status, "retry") == 0) {
        r->status = CIS_EAGAIN;
        snprintf(r->reason, sizeof(r->reason), "the receiver asks to retry%s%s",
                 error[0] ? ": " : "", error);
    } else {
        return CIS_EDECODE;
    }
    return 0;
}

/* ---- Paho's threads: queue an event and wake the loop, nothing else ---- */

static void wake_loop(struct mqtt *h)
{
    if (write(h->wake[1], "x", 1) < 0) {
        /* full: a wake-up is already pending */
    }
}

static struct ev *ev_new(struct conn *c, int type)
{
    struct mqtt *h = c->h;
    struct ev *e = calloc(1, sizeof(*e));
    if (!e) {
        /* Losing a state change would leave us out of step with Paho: the loop starts the
         * link afresh instead. */
        pthread_mutex_lock(&h->mu);
        h->lost_event = 1;
        pthread_mutex_unlock(&h->mu);
        wake_loop(h);
        return NULL;
    }
    e->gen = c->gen;
    e->type = type;
    return e;
}

static void ev_push(struct mqtt *h, struct ev *e)
{
    pthread_mutex_lock(&h->mu);
    *h->evq_tail = e;
    h->evq_tail = &e->next;
    pthread_mutex_unlock(&h->mu);
    wake_loop(h);
}

static void on_connect_ok(void *ctx, MQTTAsync_successData5 *d)
{
    struct conn *c = ctx;
    struct ev *e = ev_new(c, EV_CONNECTED);
    if (!e)
        return;
    e->flag = d ? d->alt.connect.sessionPresent : 0;
    ev_push(c->h, e);
}

static void on_connect_fail(void *ctx, MQTTAsync_failureData5 *d)
{
    struct conn *c = ctx;
    struct ev *e = ev_new(c, EV_CONNECT_FAILED);
    if (!e)
        return;
    if (d) {
        e->reason = (int)d->reasonCode;
        e->rc = d->code;
        if (d->message)
            snprintf(e->text, sizeof(e->text), "%s", d->message);
    }
    ev_push(c->h, e);
}

static void on_lost(void *ctx, char *cause)
{
    struct conn *c = ctx;
    struct ev *e = ev_new(c, EV_LOST);
    if (!e)
        return;
    if (cause)
        snprintf(e->text, sizeof(e->text), "%s", cause);
    ev_push(c->h, e);
}

static void on_server_disconnect(void *ctx, MQTTProperties *props, enum MQTTReasonCodes rc)
{
    struct conn *c = ctx;
    struct ev *e = ev_new(c, EV_SERVER_DISCONNECT);
    if (!e)
        return;
    e->reason = (int)rc;
    ev_push(c->h, e);
}

static void on_sub_ok(void *ctx, MQTTAsync_successData5 *d)
{
    struct conn *c = ctx;
    struct ev *e = ev_new(c, EV_SUBACK);
    if (!e)
        return;
    e->reason = d ? (int)d->reasonCode : 0;
    ev_push(c->h, e);
}

static void on_sub_fail(void *ctx, MQTTAsync_failureData5 *d)
{
    struct conn *c = ctx;
    struct ev *e = ev_new(c, EV_SUBACK);
    if (!e)
        return;
    e->reason = d && d->reasonCode >= 0x80 ? (int)d->reasonCode : MQTTREASONCODE_UNSPECIFIED_ERROR;
    e->rc = d ? d->code : 0;
    if (d && d->message)
        snprintf(e->text, sizeof(e->text), "%s", d->message);
    ev_push(c->h, e);
}

static void on_pub_ok(void *ctx, MQTTAsync_successData5 *d)
{
    struct conn *c = ctx;
    struct ev *e;
    if (!d)
        return;
    if (!(e = ev_new(c, EV_PUBACK)))
        return;
    e->msgid = d->token;
    e->reason = (int)d->reasonCode;
    ev_push(c->h, e);
}

static void on_pub_fail(void *ctx, MQTTAsync_failureData5 *d)
{
    struct conn *c = ctx;
    struct ev *e;
    if (!d)
        return;
    if (!(e = ev_new(c, EV_PUBACK)))
        return;
    e->msgid = d->token;
    e->reason = (int)d->reasonCode;
    e->rc = d->code;
    e->flag = 1;
    if (d->message)
        snprintf(e->text, sizeof(e->text), "%s", d->message);
    ev_push(c->h, e);
}

static int on_message(void *ctx, char *topic, int topic_len, MQTTAsync_message *m)
{
    struct conn *c = ctx;
    struct ev *e = ev_new(c, EV_ACK);
    if (e) {
        MQTTProperty *p = MQTTProperties_getProperty(&m->properties,
                                                     MQTTPROPERTY_CODE_CORRELATION_DATA);
        if (p && p->value.data.len >= 0) {
            e->corr_len = (size_t)p->value.data.len;
            if (e->corr_len == CORR_LEN)
                memcpy(e->corr, p->value.data.data, CORR_LEN);
        }
        if (m->payloadlen < 0 || m->payloadlen > ACK_MAX) {
            e->too_long = 1;
        } else if ((e->payload = malloc((size_t)m->payloadlen + 1)) != NULL) {
            memcpy(e->payload, m->payload, (size_t)m->payloadlen);
            e->payload[m->payloadlen] = '\0';
            e->len = (size_t)m->payloadlen;
        } else {
            /* No copy: the batch times out and is sent again, which is safe. */
            free(e);
            e = NULL;
        }
        if (e)
            ev_push(c->h, e);
    }
    /* Taken in every case: an ack that cannot be handled now is worth nothing later either. */
    MQTTAsync_freeMessage(&m);
    MQTTAsync_free(topic);
    return 1;
}

static void on_disconnect_done(struct mqtt *h)
{
    pthread_mutex_lock(&h->mu);
    h->disconnect_done = 1;
    pthread_mutex_unlock(&h->mu);
    wake_loop(h);
}

static void on_disc_ok(void *ctx, MQTTAsync_successData5 *d)
{
    on_disconnect_done(((struct conn *)ctx)->h);
}

static void on_disc_fail(void *ctx, MQTTAsync_failureData5 *d)
{
    on_disconnect_done(((struct conn *)ctx)->h);
}

/* OpenSSL's error queue, one line per error: keep the first of the attempt, the cause. */
static int on_ssl_error(const char *str, size_t len, void *ctx)
{
    struct mqtt *h = ((struct conn *)ctx)->h;
    pthread_mutex_lock(&h->mu);
    if (!h->tls_err[0])
        snprintf(h->tls_err, sizeof(h->tls_err), "%.*s", (int)len, str);
    pthread_mutex_unlock(&h->mu);
    return 1;
}

/* ---- loop thread ---- */

static void on_wake(void *ctx, int fd, short revents)
{
    char buf[64];
    /* Only empty the pipe: the events are handled in tick, which runs next. */
    while (read(fd, buf, sizeof(buf)) > 0) {
    }
}

static void fmt_ms(char *out, size_t outlen, int64_t ms)
{
    if (ms % 1000 == 0)
        snprintf(out, outlen, "%llds", (long long)(ms / 1000));
    else
        snprintf(out, outlen, "%lldms", (long long)ms);
}

/* A reason code in words, lower case, e.g. "not authorized". */
static void reason_str(char *out, size_t outlen, int rc)
{
    const char *s = MQTTReasonCode_toString((enum MQTTReasonCodes)rc);
    if (!s)
        snprintf(out, outlen, "reason code 0x%02x", (unsigned)rc);
    else
        snprintf(out, outlen, "%s", s);
    if (out[0] >= 'A' && out[0] <= 'Z' && !(out[1] >= 'A' && out[1] <= 'Z'))
        out[0] = (char)(out[0] - 'A' + 'a');
}

/* "error:0A000086:SSL routines:tls_post_process_server_certificate:certificate verify failed:
 * ../ssl/statem/statem_clnt.c:1889:" → "certificate verify failed". */
static void tls_reason(char *out, size_t outlen, const char *line)
{
    const char *f[9];
    size_t n = 0;
    const char *p = line;
    f[n++] = p;
    while (n < 9 && (p = strchr(p, ':')) != NULL)
        f[n++] = ++p;
    if (n >= 7 && strncmp(f[1], "error:", 6) == 0) {
        /* thread:error:code:library:function:reason:file:line:data */
        size_t rlen = (size_t)(f[6] - f[5] - 1);
        const char *data = n == 9 ? f[8] : "";
        size_t dlen = strcspn(data, "\n");
        snprintf(out, outlen, "%.*s%s%.*s%s", (int)rlen, f[5], dlen ? " (" : "", (int)dlen, data,
                 dlen ? ")" : "");
        return;
    }
    snprintf(out, outlen, "%.*s", (int)strcspn(line, "\n"), line);
}

static void finish(struct mqtt *h, struct batch *b, int status, long code, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));

/* Give B (taken off the pending list, or new) its result, for the next tick; wake the loop so
 * that the tick comes at once. */
static void finish(struct mqtt *h, struct batch *b, int status, long code, const char *fmt, ...)
{
    va_list ap;
    memset(&b->r, 0, sizeof(b->r));
    b->r.status = status;
    b->r.code = code;
    va_start(ap, fmt);
    vsnprintf(b->r.reason, sizeof(b->r.reason), fmt, ap);
    va_end(ap);
    b->next = NULL;
    *h->done_tail = b;
    h->done_tail = &b->next;
    wake_loop(h);
}

static struct batch *pending_take(struct mqtt *h, int by_msgid, uint64_t key)
{
    for (struct batch **pp = &h->pending; *pp; pp = &(*pp)->next) {
        struct batch *p = *pp;
        if (by_msgid ? (uint64_t)p->msgid == key : p->token == key) {
            *pp = p->next;
            return p;
        }
    }
    return NULL;
}

/* Every batch in flight fails with CIS_EAGAIN: the forwarder sends them again once we are back.
 * Their acks may still come later (the persistent session keeps them): unknown tokens then. */
static void fail_all(struct mqtt *h, const char *why)
{
    while (h->pending) {
        struct batch *p = h->pending;
        h->pending = p->next;
        finish(h, p, CIS_EAGAIN, 0, "%s", why);
    }
    while (h->queue) {
        struct batch *q = h->queue;
        h->queue = q->next;
        free(q->body);
        q->body = NULL;
        finish(h, q, CIS_EAGAIN, 0, "%s", why);
    }
    h->queue_tail = &h->queue;
    h->pub_busy = 0;
}

/* The link is down for WHY: the batches in flight fail, the next attempt is scheduled. Logs
 * nothing (link_failed does). Returns the delay to the next attempt. */
static int64_t link_down(struct mqtt *h, int64_t now, const char *why, int was_connected)
{
    int64_t delay = cis_backoff_next(&h->bo);
    snprintf(h->down_reason, sizeof(h->down_reason), "%s", why);
    h->failure[0] = '\0';
    fail_all(h, why);
    h->state = ST_IDLE;
    h->reconnect_at = now + delay;
    h->resubscribe_at = -1;
    if (was_connected)
        h->replace_client = 1;
    return delay;
}

/* A failure of the link: logged when it differs from the last one, so a broker that stays
 * down makes one line, not one per attempt. */
static void link_failed(struct mqtt *h, int64_t now, const char *why, int was_connected)
{
    int64_t delay = link_down(h, now, why, was_connected);
    if (was_connected) {
        cis_warn("[mqtt] connection lost: %s; reconnecting with backoff", why);
        snprintf(h->logged, sizeof(h->logged), "%s", why);
    } else if (strcmp(h->logged, why) != 0) {
        cis_warn("[mqtt] cannot connect to %s: %s; retrying with backoff", h->cfg->url, why);
        snprintf(h->logged, sizeof(h->logged), "%s", why);
    } else {
        cis_debug("[mqtt] cannot connect to %s: %s (next attempt in %lld ms)", h->cfg->url, why,
                  (long long)delay);
    }
}

/* ---- certificate diagnoses (struct diag) ---- */

/* Log a connect failure's words unless they were the last logged (as link_failed does). */
static void log_once(struct mqtt *h, const char *why)
{
    if (strcmp(h->logged, why) != 0) {
        cis_warn("[mqtt] cannot connect to %s: %s; retrying with backoff", h->cfg->url, why);
        snprintf(h->logged, sizeof(h->logged), "%s", why);
    }
}

/* The worker: both handshakes, then the result handed back under h->mu. */
static void *diag_main(void *arg)
{
    struct diag *d = arg;
    char words[sizeof(d->words)];
    int rc = agent_tls_diagnose(&d->peer, NULL, &d->stop, words, sizeof(words));

    pthread_mutex_lock(&d->h->mu);
    d->rc = rc;
    memcpy(d->words, words, sizeof(words));
    d->done = 1;
    pthread_mutex_unlock(&d->h->mu);
    wake_loop(d->h);
    return NULL;
}

/* The broker's address as an https:// URL, for libcurl to make the TLS handshake Paho makes
 * (the MQTT scheme adds nothing to TLS; without a port, MQTT over TLS's 8883). Caller frees
 * with curl_free; NULL if it does not parse. */
static char *diag_url(const char *url)
{
    CURLU *u = curl_url();
    char *out = NULL, *port = NULL;

    if (u && curl_url_set(u, CURLUPART_URL, url, CURLU_NON_SUPPORT_SCHEME) == CURLUE_OK &&
        curl_url_set(u, CURLUPART_SCHEME, "https", 0) == CURLUE_OK) {
        if (curl_url_get(u, CURLUPART_PORT, &port, 0) != CURLUE_OK)
            curl_url_set(u, CURLUPART_PORT, "8883", 0);
        if (curl_url_get(u, CURLUPART_URL, &out, 0) != CURLUE_OK)
            out = NULL;
    }
    curl_free(port);
    curl_url_cleanup(u);
    return out;
}

/* Start a worker that diagnoses FAILURE (connect_failed's words). Returns 0, or CIS_E* (then
 * there is none). */
static int diag_start(struct mqtt *h, const char *failure)
{
    const struct agent_config *cfg = h->cfg;
    struct diag *d = calloc(1, sizeof(*d));
    sigset_t all, old;
    int rc;

    if (!d)
        return CIS_ENOMEM;
    d->h = h;
    atomic_init(&d->stop, 0);
    snprintf(d->failure, sizeof(d->failure), "%s", failure);
    d->url = diag_url(cfg->url);
    if (!d->url) {
        free(d);
        return CIS_EINVAL;
    }
    d->peer = (struct agent_tls_peer){
        .kind = "broker",
        .url = d->url,
        .ca_file = cfg->ca_file,
        /* The broker may require one (ours does), as it does of Paho. */
        .cert_file = cfg->cert_file,
        .key_file = cfg->key_file,
        .ca_key = "forward.tls.ca_file",
        .cert_key = "forward.tls.cert_file",
        .url_key = "forward.url",
        .timeout_ms = cfg->timeout_ms < DIAG_TIMEOUT_MAX_MS ? cfg->timeout_ms : DIAG_TIMEOUT_MAX_MS,
    };
    /* Signals are the loop's business (their handlers only write to a pipe): the worker takes
     * none, so none interrupts its handshakes. */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    rc = pthread_create(&d->thread, NULL, diag_main, d);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        cis_debug("[mqtt] cannot start the certificate diagnosis: %s", strerror(rc));
        curl_free(d->url);
        free(d);
        return CIS_EIO;
    }
    cis_debug("[mqtt] asking %s which check of its certificate fails (%s)", d->url, d->failure);
    h->diag = d;
    return 0;
}

/* Stop the worker, if any (within about a second), wait for it, and free it. */
static void diag_free(struct mqtt *h)
{
    struct diag *d = h->diag;

    if (!d)
        return;
    atomic_store(&d->stop, 1);
    pthread_join(d->thread, NULL);
    curl_free(d->url);
    free(d);
    h->diag = NULL;
}

/* A connect failure that a diagnosis can put in better words, WHY being Paho's: with the words
 * of the last diagnosis of the same failure if they hold (diag_keep); else the link goes down
 * without a log line, a worker asks the broker, and diag_collect logs its words once. */
static void link_failed_diagnosed(struct mqtt *h, int64_t now, const char *why)
{
    int same = strcmp(h->diag_for, why) == 0;

    if (same && h->diag_keep) {
        link_failed(h, now, h->diag_why, 0);
    } else if (h->diag || diag_start(h, why) == 0) {
        /* Until the worker answers, the last words for this failure stand. (Busy with an
         * earlier failure: diag_collect starts this one's.) */
        link_down(h, now, same ? h->diag_why : why, 0);
        snprintf(h->waiting, sizeof(h->waiting), "%s", h->down_reason);
    } else {
        link_failed(h, now, why, 0);
        return;
    }
    snprintf(h->failure, sizeof(h->failure), "%s", why);
}

/* Take the worker's result, once it has one. While the link is still down for the failure it
 * diagnosed, its words become the reason, logged once (the same words again go to debug, as in
 * link_failed). Words are used only when they explain Paho's failure: a diagnosis that finds
 * another (the broker was down for Paho and is up now, or the other way round) is about another
 * state of the broker, and the next failure tells which. */
static void diag_collect(struct mqtt *h)
{
    struct diag *d = h->diag;
    char why[sizeof(h->diag_why)], failure[sizeof(d->failure)];
    int done, verify_failed, explains;

    if (!d)
        return;
    pthread_mutex_lock(&h->mu);
    done = d->done;
    pthread_mutex_unlock(&h->mu);
    if (!done)
        return;
    snprintf(failure, sizeof(failure), "%s", d->failure);
    verify_failed = strstr(failure, "certificate verify failed") != NULL;
    explains = d->rc == (verify_failed ? AGENT_TLS_CERT : AGENT_TLS_NAME);
    if (explains && verify_failed)
        /* OpenSSL's words after ours: those are what a search finds, in old logs too. */
        snprintf(why, sizeof(why), "%s (OpenSSL: certificate verify failed)", d->words);
    else if (explains)
        snprintf(why, sizeof(why), "%s", d->words);
    else
        snprintf(why, sizeof(why), "%s", failure);
    snprintf(h->diag_for, sizeof(h->diag_for), "%s", failure);
    snprintf(h->diag_why, sizeof(h->diag_why), "%s", why);
    h->diag_keep = verify_failed && (explains || d->rc == AGENT_TLS_PASSES);
    cis_debug("[mqtt] certificate diagnosis (%d): %s", d->rc, d->rc > 0 ? d->words : "-");
    diag_free(h);
    if (h->state != ST_IDLE && h->state != ST_CONNECTING)
        return; /* connected meanwhile */
    if (strcmp(h->failure, failure) != 0) {
        /* The link has failed otherwise since: that failure's turn (its link_down left it
         * unlogged). */
        if (h->failure[0] && diag_start(h, h->failure) != 0)
            log_once(h, h->failure);
        return;
    }
    if (strcmp(why, h->waiting) != 0)
        snprintf(h->down_reason, sizeof(h->down_reason), "%s", why);
    log_once(h, why);
}

/* A new Paho client for the next connection (same client id, so the broker's session goes
 * on). Returns 0, or CIS_E* with WHY filled. */
static int client_open(struct mqtt *h, char *why, size_t whylen)
{
    MQTTAsync_createOptions copt = MQTTAsync_createOptions_initializer5;
    struct conn *c = calloc(1, sizeof(*c));
    int rc;

    if (!c) {
        snprintf(why, whylen, "cannot create an MQTT client: %s", cis_strerror(CIS_ENOMEM));
        return CIS_ENOMEM;
    }
    c->h = h;
    c->gen = h->gen + 1;
    copt.sendWhileDisconnected = 0;
    copt.maxBufferedMessages = (int)(h->cfg->in_flight * 4 > 100 ? h->cfg->in_flight * 4 : 100);
    /* MQTTCLIENT_PERSISTENCE_NONE: the spool is our persistence; Paho writes nothing to flash. */
    rc = MQTTAsync_createWithOptions(&h->client, h->cfg->url, h->client_id,
                                     MQTTCLIENT_PERSISTENCE_NONE, NULL, &copt);
    if (rc != MQTTASYNC_SUCCESS) {
        snprintf(why, whylen, "cannot create an MQTT client for %s: %s", h->cfg->url,
                 MQTTAsync_strerror(rc));
        h->client = NULL;
        free(c);
        return CIS_EINVAL;
    }
    if (MQTTAsync_setCallbacks(h->client, c, on_lost, on_message, NULL) != MQTTASYNC_SUCCESS ||
        MQTTAsync_setDisconnected(h->client, c, on_server_disconnect) != MQTTASYNC_SUCCESS) {
        snprintf(why, whylen, "cannot set the MQTT client's callbacks");
        MQTTAsync_destroy(&h->client);
        free(c);
        return CIS_EIO;
    }
    h->conn = c;
    h->gen = c->gen;
    h->ssl.ssl_error_context = c;
    h->replace_client = 0;
    h->poisoned = 0;
    return 0;
}

static void noop_lost(void *ctx, char *cause)
{
}

static int noop_message(void *ctx, char *topic, int topic_len, MQTTAsync_message *m)
{
    MQTTAsync_freeMessage(&m);
    MQTTAsync_free(topic);
    return 1;
}

/* Let go of the Paho client, between two connections or at the end. It must be disconnected. */
static void client_close(struct mqtt *h)
{
    if (!h->client)
        return;
    if (h->poisoned) {
        /* Paho 1.3.12: when the write of a QoS 1 PUBLISH fails on a breaking connection, Paho
         * reports the failure and frees the message's topic and payload, yet keeps the message
         * to send again: reconnecting this client sends freed memory (valgrind: invalid reads
         * in MQTTAsync_rcv), destroying it frees that memory a second time. So it is left to
         * Paho as it is, disconnected and inert: a few KiB once per such failure, rather than
         * a corrupt heap. The next connection uses a new client. */
        cis_info("[mqtt] Paho failed to write a PUBLISH on the breaking connection: its client "
                 "is set aside (a few KiB kept; Paho 1.3.12 bug)");
        /* Nothing of it may reach h again (it is not connected, so nothing should come). */
        MQTTAsync_setCallbacks(h->client, NULL, noop_lost, noop_message, NULL);
        MQTTAsync_setDisconnected(h->client, NULL, NULL);
    } else {
        MQTTAsync_destroy(&h->client);
        free(h->conn);
    }
    h->client = NULL;
    h->conn = NULL;
}

static void start_connect(struct mqtt *h, int64_t now)
{
    MQTTAsync_connectOptions co = MQTTAsync_connectOptions_initializer5;
    int64_t cto = h->cfg->timeout_ms < CONNECT_TIMEOUT_MAX_MS ? h->cfg->timeout_ms
                                                               : CONNECT_TIMEOUT_MAX_MS;
    MQTTProperties props = MQTTProperties_initializer;
    MQTTProperty prop;
    char why[200];
    int rc;

    /* After a lost connection, a new client: Paho's own would send its unacknowledged
     * PUBLISHes again, which the forwarder re-sends anyway (they failed with the connection),
     * and it may hold a broken one (see client_close). The broker's session is kept all the
     * same: it belongs to the client id. */
    if (h->client && h->replace_client)
        client_close(h);
    if (!h->client && client_open(h, why, sizeof(why)) != 0) {
        h->state = ST_CONNECTING;
        link_failed(h, now, why, 0);
        return;
    }
    pthread_mutex_lock(&h->mu);
    h->tls_err[0] = '\0';
    pthread_mutex_unlock(&h->mu);
    co.keepAliveInterval = (int)(h->cfg->mqtt_keepalive_ms / 1000);
    /* A persistent session: acks published while we are away wait in the broker. */
    co.cleansession = 0;
    co.cleanstart = 0;
    co.connectProperties = &props;
    co.connectTimeout = (int)((cto + 999) / 1000);
    co.retryInterval = 0;
    /* We reconnect ourselves, from the loop, with our backoff and our log lines. */
    co.automaticReconnect = 0;
    co.ssl = &h->ssl;
    co.username = h->cfg->mqtt_username;
    co.password = h->cfg->mqtt_password;
    co.onSuccess5 = on_connect_ok;
    co.onFailure5 = on_connect_fail;
    co.context = h->conn;
    prop.identifier = MQTTPROPERTY_CODE_SESSION_EXPIRY_INTERVAL;
    prop.value.integer4 = (unsigned int)(h->cfg->mqtt_session_expiry_ms / 1000);
    /* Paho allocates properties on its own heap, whose bookkeeping restarts when the process's
     * last client is destroyed: a block kept across that is never freed. So they live only
     * for this call (Paho keeps a copy). */
    MQTTProperties_add(&props, &prop);
    h->state = ST_CONNECTING;
    h->reconnect_at = -1;
    rc = MQTTAsync_connect(h->client, &co);
    MQTTProperties_free(&props);
    if (rc != MQTTASYNC_SUCCESS) {
        snprintf(why, sizeof(why), "cannot start a connection: %s", MQTTAsync_strerror(rc));
        link_failed(h, now, why, 0);
    }
}

static void start_subscribe(struct mqtt *h, int64_t now)
{
    MQTTAsync_responseOptions ro = MQTTAsync_responseOptions_initializer;
    int rc;
    ro.onSuccess5 = on_sub_ok;
    ro.onFailure5 = on_sub_fail;
    ro.context = h->conn;
    h->state = ST_SUBSCRIBING;
    h->resubscribe_at = -1;
    rc = MQTTAsync_subscribe(h->client, h->ack_topic, 1, &ro);
    if (rc != MQTTASYNC_SUCCESS) {
        /* Not connected any more: the loss event follows and reconnects. */
        cis_debug("[mqtt] subscribe to %s: %s", h->ack_topic, MQTTAsync_strerror(rc));
        h->state = ST_NOSUB;
        h->resubscribe_at = now + cis_backoff_next(&h->bo);
    }
}

static void link_up(struct mqtt *h, int session_present)
{
    cis_info("[mqtt] connected to %s as %s (%s); batches go to %s", h->cfg->url, h->client_id,
             session_present ? "session resumed" : "new session", h->batch_topic);
    cis_backoff_reset(&h->bo);
    h->logged[0] = '\0';
    h->down_reason[0] = '\0';
    /* The broker's certificate may be another by the next failure. */
    h->failure[0] = '\0';
    h->diag_for[0] = '\0';
    h->diag_keep = 0;
    h->state = ST_UP;
}

static void connect_failed(struct mqtt *h, int64_t now, const struct ev *e)
{
    char why[256], rs[96], tls[200];
    int connack, diagnose = 0;

    pthread_mutex_lock(&h->mu);
    snprintf(tls, sizeof(tls), "%s", h->tls_err);
    pthread_mutex_unlock(&h->mu);
    cis_debug("[mqtt] connect failed: reason %d, rc %d, \"%s\", TLS \"%.*s\"", e->reason, e->rc,
              e->text, (int)strcspn(tls, "\n"), tls);
    /* Paho 1.3 puts an MQTT 5 CONNACK's refusal in the return code, not in reasonCode. */
    connack = e->reason >= 0x80 ? e->reason : e->rc >= 0x80 && e->rc <= 0xFF ? e->rc : 0;
    if (connack) {
        reason_str(rs, sizeof(rs), connack);
        snprintf(why, sizeof(why), "broker refused the connection: %s", rs);
        if (connack == MQTTREASONCODE_NOT_AUTHORIZED ||
            connack == MQTTREASONCODE_BAD_USER_NAME_OR_PASSWORD ||
            connack == MQTTREASONCODE_CLIENT_IDENTIFIER_NOT_VALID)
            snprintf(why + strlen(why), sizeof(why) - strlen(why),
                     " (check the client certificate, forward.mqtt.username/password and the "
                     "client id \"%s\")", h->client_id);
    } else if (tls[0]) {
        char t[160];
        tls_reason(t, sizeof(t), tls);
        snprintf(why, sizeof(why), "TLS handshake failed: %s", t);
        diagnose = strstr(t, "certificate verify failed") != NULL;
    } else if (strstr(e->text, "completion")) {
        /* With TLS 1.3 the broker checks our certificate after the handshake has completed on
         * our side: its refusal reaches us as a reset connection, without an OpenSSL error. */
        snprintf(why, sizeof(why), "the broker closed the connection after the TLS handshake "
                 "(%s): does it trust our client certificate (forward.tls.cert_file)?", e->text);
    } else if (strstr(e->text, "connect failure")) {
        /* Paho gives these words to a refused port, a reset, and a certificate that does not
         * name the host (its own check, after OpenSSL's): name all three, until a diagnosis
         * tells (link_failed_diagnosed). */
        snprintf(why, sizeof(why), "%s: is the broker running and the port open, and does its "
                 "certificate name the host in forward.url?", e->text);
        diagnose = 1;
    } else if (e->text[0]) {
        snprintf(why, sizeof(why), "%s%s", e->text,
                 strstr(e->text, "timeout") ? " (is the broker running, is the port open?)" : "");
    } else {
        /* Paho says no more than "failure" when the host name does not resolve. */
        snprintf(why, sizeof(why), "%s (can the host in forward.url be resolved?)",
                 MQTTAsync_strerror(e->rc));
    }
    if (diagnose)
        link_failed_diagnosed(h, now, why);
    else
        link_failed(h, now, why, 0);
}

static void got_puback(struct mqtt *h, const struct ev *e)
{
    struct batch *p;
    char rs[96];

    if (h->pub_busy && e->msgid == h->pub_msgid)
        h->pub_busy = 0; /* whatever the outcome, the next PUBLISH may go (publish_next) */
    if (e->flag && e->reason < 0x80) {
        /* Not the broker's answer: Paho could not write the PUBLISH, the connection is
         * breaking (its loss follows). Not a refusal either, so nothing is logged here. Only
         * a failed write (MQTTASYNC_FAILURE, Paho's SOCKET_ERROR) leaves freed memory in the
         * client (see client_close); a PUBLISH flushed with a lost connection does not. */
        if (e->rc == MQTTASYNC_FAILURE) {
            cis_debug("[mqtt] Paho failed to write a PUBLISH: this client will be set aside");
            h->poisoned = 1;
        }
        p = pending_take(h, 1, (uint64_t)e->msgid);
        if (p)
            finish(h, p, CIS_EAGAIN, 0, "the batch could not be sent to the broker (%s)",
                   e->text[0] ? e->text : MQTTAsync_strerror(e->rc));
        return;
    }
    if (e->reason < 0x80 && e->reason != MQTTREASONCODE_NO_MATCHING_SUBSCRIBERS) {
        if (h->refused[0]) {
            cis_info("[mqtt] the broker accepts batches again");
            h->refused[0] = '\0';
        }
        if (h->end_to_end)
            return; /* taken by the broker: now the receiver's ack counts */
        p = pending_take(h, 1, (uint64_t)e->msgid);
        /* ack: broker, documented as weaker: the broker took it, nobody has stored it. */
        if (p)
            finish(h, p, 0, 0, "PUBACK from the broker");
        return;
    }
    p = pending_take(h, 1, (uint64_t)e->msgid);
    if (e->reason == MQTTREASONCODE_NO_MATCHING_SUBSCRIBERS) {
        /* The broker took it and dropped it: nobody will store it, nor answer. Never a
         * success, even with ack: broker. */
        snprintf(rs, sizeof(rs), "no subscriber");
        if (p)
            finish(h, p, CIS_EAGAIN, 0,
                   "the broker has no subscriber for %s (is a cistern-receiver subscribed?)",
                   h->batch_topic);
    } else {
        reason_str(rs, sizeof(rs), e->reason);
        /* CIS_EAGAIN, never CIS_EINVAL: a broker's misconfiguration must not ledger records as
         * lost. They stay in the spool until the ACL is fixed. */
        if (p)
            finish(h, p, CIS_EAGAIN, 0,
                   "broker refused the batch: %s (check the broker's ACL for %s)", rs,
                   h->batch_topic);
    }
    if (strcmp(h->refused, rs) != 0) {
        if (e->reason == MQTTREASONCODE_NO_MATCHING_SUBSCRIBERS)
            cis_warn("[mqtt] the broker has no subscriber for %s (is a cistern-receiver "
                     "subscribed?); batches stay in the spool", h->batch_topic);
        else
            cis_warn("[mqtt] broker refused a batch: %s (check the broker's ACL for %s); "
                     "batches stay in the spool", rs, h->batch_topic);
        snprintf(h->refused, sizeof(h->refused), "%s", rs);
    }
}

static void got_ack(struct mqtt *h, const struct ev *e)
{
    struct agent_send_result r;
    struct batch *p;
    uint64_t token;
    int rc = corr_decode(e->corr, e->corr_len, h->run_id, &token);

    if (rc == CIS_ENOTFOUND) {
        /* From an earlier run, kept by the persistent session: its batch is sent again anyway. */
        cis_debug("[mqtt] ack from an earlier run of the agent ignored");
        return;
    }
    if (rc) {
        cis_debug("[mqtt] message on %s without our correlation data (%zu bytes) ignored",
                  h->ack_topic, e->corr_len);
        return;
    }
    p = pending_take(h, 0, token);
    if (!p) {
        /* Timed out, or failed on a lost connection, and already sent again. */
        cis_debug("[mqtt] ack for batch %llu, which is no longer waiting, ignored",
                  (unsigned long long)token);
        return;
    }
    if (e->too_long || ack_parse(e->payload, e->len, &r) != 0) {
        /* The batch keeps waiting: its deadline re-sends it. */
        if (!h->warned_malformed)
            cis_warn("[mqtt] malformed ack for batch %llu ignored (%s); this warning is not "
                     "repeated", (unsigned long long)token,
                     e->too_long ? "too long" : "not {\"status\":\"ok|rejected|retry\"}");
        else
            cis_debug("[mqtt] malformed ack for batch %llu ignored", (unsigned long long)token);
        h->warned_malformed = 1;
        p->next = h->pending;
        h->pending = p;
        return;
    }
    /* The receiver answered: it is up and struggling, so the forwarder backs off in full, as
     * for an HTTP 503 (code 0 would mean "unreachable": short retries). */
    if (r.status == CIS_EAGAIN)
        r.code = 503;
    finish(h, p, r.status, r.code, "%s", r.reason);
}

static void handle_event(struct mqtt *h, int64_t now, const struct ev *e)
{
    char why[256], rs[96];
    int connected = h->state == ST_SUBSCRIBING || h->state == ST_NOSUB || h->state == ST_UP;

    if (e->gen != h->gen) {
        /* From a client already replaced: its batches failed with its connection. */
        cis_debug("[mqtt] event %d of an earlier client ignored", e->type);
        return;
    }
    switch (e->type) {
    case EV_CONNECTED:
        if (h->state != ST_CONNECTING)
            break;
        h->session_present = e->flag;
        if (h->end_to_end) {
            /* Batches wait for the SUBACK: an ack must have somewhere to arrive. */
            cis_debug("[mqtt] connected; subscribing to %s", h->ack_topic);
            start_subscribe(h, now);
        } else {
            link_up(h, e->flag);
        }
        break;
    case EV_CONNECT_FAILED:
        if (h->state == ST_CONNECTING)
            connect_failed(h, now, e);
        break;
    case EV_SERVER_DISCONNECT:
        reason_str(rs, sizeof(rs), e->reason);
        if (connected) {
            snprintf(why, sizeof(why), "the broker disconnected us: %s%s", rs,
                     e->reason == MQTTREASONCODE_SESSION_TAKEN_OVER
                         ? " (another client uses the same client id?)" : "");
            link_failed(h, now, why, 1);
        }
        break;
    case EV_LOST:
        if (!connected)
            break; /* already handled: the broker's DISCONNECT came first */
        snprintf(why, sizeof(why), "%s", e->text[0] ? e->text : "the broker closed the connection");
        link_failed(h, now, why, 1);
        break;
    case EV_SUBACK:
        if (h->state != ST_SUBSCRIBING)
            break;
        if (e->reason < 0x80) {
            link_up(h, h->session_present);
            break;
        }
        reason_str(rs, sizeof(rs), e->reason);
        snprintf(h->down_reason, sizeof(h->down_reason),
                 "broker refused the subscription to %s: %s (check the broker's ACL)",
                 h->ack_topic, rs);
        if (strcmp(h->logged, h->down_reason) != 0) {
            cis_warn("[mqtt] %s; without it no ack can arrive, so batches wait; retrying with "
                     "backoff", h->down_reason);
            snprintf(h->logged, sizeof(h->logged), "%s", h->down_reason);
        }
        h->state = ST_NOSUB;
        h->resubscribe_at = now + cis_backoff_next(&h->bo);
        break;
    case EV_PUBACK: got_puback(h, e); break;
    case EV_ACK: got_ack(h, e); break;
    }
}

static void deliver(struct mqtt *h)
{
    while (h->done) {
        struct batch *b = h->done;
        h->done = b->next;
        if (!h->done)
            h->done_tail = &h->done;
        h->cb(h->ctx, b->token, &b->r);
        free(b);
    }
}

static int64_t mqtt_tick(void *t, int64_t now)
{
    struct mqtt *h = t;
    struct ev *q;
    int lost;
    int64_t next = -1;
    char tmo[32];

    pthread_mutex_lock(&h->mu);
    q = h->evq;
    h->evq = NULL;
    h->evq_tail = &h->evq;
    lost = h->lost_event;
    h->lost_event = 0;
    pthread_mutex_unlock(&h->mu);
    while (q) {
        struct ev *e = q;
        q = e->next;
        handle_event(h, now, e);
        free(e->payload);
        free(e);
    }
    diag_collect(h);
    if (lost && h->state != ST_IDLE) {
        cis_error("[mqtt] out of memory on Paho's thread: an event was lost; reconnecting");
        MQTTAsync_disconnect(h->client, NULL);
        link_failed(h, now, "out of memory", h->state != ST_CONNECTING);
        /* A new client, and the old one set aside: the lost event may have been a failed
         * PUBLISH (see client_close). */
        h->replace_client = 1;
        h->poisoned = 1;
    }

    fmt_ms(tmo, sizeof(tmo), h->cfg->timeout_ms);
    for (struct batch **pp = &h->pending; *pp;) {
        struct batch *p = *pp;
        if (now < p->deadline) {
            next = agent_deadline_min(next, p->deadline);
            pp = &p->next;
            continue;
        }
        *pp = p->next;
        if (h->pub_busy && p->msgid == h->pub_msgid)
            h->pub_busy = 0; /* no PUBACK in time either: the next may go */
        /* The receiver may have died between the broker's PUBACK and its commit: the batch
         * goes again, and the receiver's dedup makes that harmless. */
        if (h->end_to_end)
            finish(h, p, CIS_EAGAIN, 0,
                   "no ack from a receiver within %s (is a cistern-receiver subscribed?)", tmo);
        else
            finish(h, p, CIS_EAGAIN, 0, "no PUBACK from the broker within %s", tmo);
    }
    for (struct batch **pp = &h->queue; *pp;) {
        struct batch *b = *pp;
        if (now < b->deadline) {
            next = agent_deadline_min(next, b->deadline);
            pp = &b->next;
            continue;
        }
        *pp = b->next;
        free(b->body);
        b->body = NULL;
        finish(h, b, CIS_EAGAIN, 0, "no PUBACK from the broker within %s for the batch "
               "before it", tmo);
    }
    h->queue_tail = &h->queue;
    while (*h->queue_tail)
        h->queue_tail = &(*h->queue_tail)->next;
    publish_next(h);
    if (h->state == ST_IDLE && h->reconnect_at >= 0 && now >= h->reconnect_at)
        start_connect(h, now);
    if (h->state == ST_NOSUB && h->resubscribe_at >= 0 && now >= h->resubscribe_at)
        start_subscribe(h, now);
    if (h->state == ST_IDLE)
        next = agent_deadline_min(next, h->reconnect_at);
    if (h->state == ST_NOSUB)
        next = agent_deadline_min(next, h->resubscribe_at);
    deliver(h);
    return next;
}

/* Hand the batch at the head of the queue to Paho, unless a PUBLISH is still waiting for its
 * PUBACK. One at a time, because of Paho 1.3.12: when the write of a QoS 1 PUBLISH fails, its
 * client keeps freed memory and must be set aside for good (see client_close), a leak of a few
 * KiB. A write fails on a connection that the broker reset before Paho's reader noticed (it
 * went away after something was written to it, or was killed with bytes of ours unread). With
 * one PUBLISH at a time, fewer writes meet that moment, and the PUBLISH that meets it gets no
 * PUBACK, so no second one follows it there (docs/protocol.md has the measured rates). */
static void publish_next(struct mqtt *h)
{
    while (!h->pub_busy && h->queue && h->state == ST_UP) {
        MQTTAsync_message m = MQTTAsync_message_initializer;
        MQTTAsync_responseOptions ro = MQTTAsync_responseOptions_initializer;
        MQTTProperty prop;
        uint8_t corr[CORR_LEN];
        struct batch *p = h->queue;
        int rc;

        h->queue = p->next;
        if (!h->queue)
            h->queue_tail = &h->queue;
        p->next = NULL;
        corr_encode(corr, h->run_id, p->token);
        prop.identifier = MQTTPROPERTY_CODE_CONTENT_TYPE;
        prop.value.data.data = (char *)CIS_SIGNED_BATCH_CONTENT_TYPE;
        prop.value.data.len = (int)strlen(CIS_SIGNED_BATCH_CONTENT_TYPE);
        rc = MQTTProperties_add(&m.properties, &prop);
        prop.identifier = MQTTPROPERTY_CODE_RESPONSE_TOPIC;
        prop.value.data.data = h->ack_topic;
        prop.value.data.len = (int)strlen(h->ack_topic);
        rc = rc ? rc : MQTTProperties_add(&m.properties, &prop);
        prop.identifier = MQTTPROPERTY_CODE_CORRELATION_DATA;
        prop.value.data.data = (char *)corr;
        prop.value.data.len = CORR_LEN;
        rc = rc ? rc : MQTTProperties_add(&m.properties, &prop);
        if (rc) {
            MQTTProperties_free(&m.properties);
            free(p->body);
            p->body = NULL;
            finish(h, p, CIS_EAGAIN, 0, "cannot publish to the broker: %s",
                   cis_strerror(CIS_ENOMEM));
            continue;
        }
        m.payload = p->body;
        m.payloadlen = (int)p->len;
        m.qos = 1;
        m.retained = 0;
        ro.onSuccess5 = on_pub_ok;
        ro.onFailure5 = on_pub_fail;
        ro.context = h->conn;
        /* Paho copies the topic, payload and properties. */
        rc = MQTTAsync_sendMessage(h->client, h->batch_topic, &m, &ro);
        MQTTProperties_free(&m.properties);
        free(p->body);
        p->body = NULL;
        if (rc != MQTTASYNC_SUCCESS) {
            finish(h, p, CIS_EAGAIN, 0, "cannot publish to the broker: %s",
                   MQTTAsync_strerror(rc));
            continue;
        }
        p->msgid = ro.token;
        h->pub_busy = 1;
        h->pub_msgid = ro.token;
        p->next = h->pending;
        h->pending = p;
    }
}

static int mqtt_send(void *t, uint8_t *body, size_t len, uint64_t token)
{
    struct mqtt *h = t;
    struct batch *p;

    if (len > PUBLISH_MAX) {
        free(body);
        return CIS_ETOOBIG;
    }
    p = calloc(1, sizeof(*p));
    if (!p) {
        free(body);
        return CIS_ENOMEM;
    }
    p->token = token;
    if (h->state != ST_UP) {
        /* The answer comes at the next tick: the forwarder is inside its own loop now. */
        finish(h, p, CIS_EAGAIN, 0, "not connected to the broker%s%s",
               h->down_reason[0] ? ": " : "", h->down_reason);
        free(body);
        return 0;
    }
    p->body = body;
    p->len = len;
    /* The answer's clock starts now: a batch queued behind a PUBACK that does not come fails
     * in time like the rest. */
    p->deadline = cis_mono_ms() + h->cfg->timeout_ms;
    *h->queue_tail = p;
    h->queue_tail = &p->next;
    publish_next(h);
    return 0;
}

static void mqtt_abort_all(void *t)
{
    struct mqtt *h = t;
    fail_all(h, "aborted");
    deliver(h);
}

/* Free everything but the Paho client (client_close first). */
static void mqtt_free(struct mqtt *h)
{
    /* First: the worker uses the mutex and the pipe. */
    diag_free(h);
    while (h->pending) {
        struct batch *p = h->pending;
        h->pending = p->next;
        free(p);
    }
    while (h->done) {
        struct batch *b = h->done;
        h->done = b->next;
        free(b);
    }
    while (h->queue) {
        struct batch *q = h->queue;
        h->queue = q->next;
        free(q->body);
        free(q);
    }
    while (h->evq) {
        struct ev *e = h->evq;
        h->evq = e->next;
        free(e->payload);
        free(e);
    }
    if (h->wake[0] >= 0) {
        agent_loop_unwatch(h->a, h->wake[0]);
        close(h->wake[0]);
        close(h->wake[1]);
    }
    pthread_mutex_destroy(&h->mu);
    free(h->batch_topic);
    free(h->ack_topic);
    free(h);
}

static void mqtt_destroy(void *t)
{
    struct mqtt *h = t;
    if (!h)
        return;
    if (h->client) {
        if (MQTTAsync_isConnected(h->client)) {
            MQTTAsync_disconnectOptions dopt = MQTTAsync_disconnectOptions_initializer5;
            int64_t until = cis_mono_ms() + DISCONNECT_WAIT_MS;
            dopt.timeout = 100;
            dopt.onSuccess5 = on_disc_ok;
            dopt.onFailure5 = on_disc_fail;
            dopt.context = h->conn;
            /* A clean DISCONNECT keeps the session (and acks for us) at the broker. Wait for
             * it, briefly, so no Paho callback is still running when h is freed. */
            if (MQTTAsync_disconnect(h->client, &dopt) == MQTTASYNC_SUCCESS) {
                for (;;) {
                    int64_t now = cis_mono_ms();
                    int done;
                    pthread_mutex_lock(&h->mu);
                    done = h->disconnect_done;
                    pthread_mutex_unlock(&h->mu);
                    if (done || now >= until)
                        break;
                    poll(&(struct pollfd){.fd = h->wake[0], .events = POLLIN}, 1,
                         (int)(until - now));
                    on_wake(h, h->wake[0], POLLIN);
                }
            }
        }
    }
    client_close(h);
    mqtt_free(h);
    cis_paho_release();
}

static int topic_safe(const char *s)
{
    return s[0] && !strpbrk(s, "/+#");
}

/* Everything but the Paho client: state, topics, run id, and the wake-up pipe watched by the
 * loop. Free with mqtt_free(). Tests use it to drive the loop side without a broker. */
static int mqtt_new(struct agent *a, const struct agent_config *cfg, agent_sent_cb cb, void *ctx,
                    struct mqtt **out)
{
    struct mqtt *h;
    size_t tlen;
    int rc;

    if (!topic_safe(cfg->id)) {
        cis_error("[mqtt] agent.id \"%s\" cannot be part of a topic: no '/', '+' or '#'", cfg->id);
        return CIS_ECONFIG;
    }
    h = calloc(1, sizeof(*h));
    if (!h)
        return CIS_ENOMEM;
    h->a = a;
    h->cfg = cfg;
    h->cb = cb;
    h->ctx = ctx;
    h->wake[0] = h->wake[1] = -1;
    h->evq_tail = &h->evq;
    h->done_tail = &h->done;
    h->queue_tail = &h->queue;
    h->state = ST_IDLE;
    h->reconnect_at = -1;
    h->resubscribe_at = -1;
    h->end_to_end = cfg->mqtt_ack == AGENT_MQTT_ACK_END_TO_END;
    h->client_id = cfg->mqtt_client_id && cfg->mqtt_client_id[0] ? cfg->mqtt_client_id : cfg->id;
    pthread_mutex_init(&h->mu, NULL);
    /* The backoff between connection attempts is capped like the forwarder's for an unreachable
     * receiver: trying costs a down broker nothing, and delivery resumes soon after it returns. */
    cis_backoff_init(&h->bo, cfg->retry_initial_ms,
                     cfg->retry_unreachable_max_ms < cfg->retry_max_ms
                         ? cfg->retry_unreachable_max_ms : cfg->retry_max_ms);
    tlen = strlen(cfg->mqtt_topic_prefix) + strlen(cfg->id) + sizeof("/batch") + 1;
    h->batch_topic = malloc(tlen);
    h->ack_topic = malloc(tlen);
    if (!h->batch_topic || !h->ack_topic) {
        rc = CIS_ENOMEM;
        goto fail;
    }
    snprintf(h->batch_topic, tlen, "%s/%s/batch", cfg->mqtt_topic_prefix, cfg->id);
    snprintf(h->ack_topic, tlen, "%s/%s/ack", cfg->mqtt_topic_prefix, cfg->id);

    /* The run id tells our acks from those of an earlier run still held by the session. It only
     * has to differ between runs: no need to wait for the entropy pool at boot. */
    if (getrandom(h->run_id, sizeof(h->run_id), GRND_NONBLOCK) != (ssize_t)sizeof(h->run_id)) {
        uint64_t x = (uint64_t)cis_wall_ms() * 0x9E3779B97F4A7C15ull ^ (uint64_t)cis_mono_ms() ^
                     (uint64_t)getpid() << 32;
        memcpy(h->run_id, &x, sizeof(h->run_id));
    }

    if (pipe2(h->wake, O_NONBLOCK | O_CLOEXEC) < 0) {
        cis_error("[mqtt] pipe: %s", strerror(errno));
        h->wake[0] = h->wake[1] = -1;
        rc = CIS_EIO;
        goto fail;
    }
    rc = agent_loop_watch(a, h->wake[0], POLLIN, on_wake, h);
    if (rc) {
        close(h->wake[0]);
        close(h->wake[1]);
        h->wake[0] = h->wake[1] = -1;
        goto fail;
    }
    *out = h;
    return 0;
fail:
    mqtt_free(h);
    return rc;
}

static int mqtt_create(struct agent *a, const struct agent_config *cfg, agent_sent_cb cb,
                       void *ctx, void **out)
{
    struct mqtt *h;
    char why[200];
    int rc = mqtt_new(a, cfg, cb, ctx, &h);

    if (rc)
        return rc;
    h->ssl = (MQTTAsync_SSLOptions)MQTTAsync_SSLOptions_initializer;
    h->ssl.trustStore = cfg->ca_file; /* NULL: the system's CAs */
    h->ssl.keyStore = cfg->cert_file;
    h->ssl.privateKey = cfg->key_file;
    /* Verification is always on, host name included: there is no switch to turn it off. */
    h->ssl.enableServerCertAuth = 1;
    h->ssl.verify = 1;
    h->ssl.ssl_error_cb = on_ssl_error;
    /* Paho's global state lives as long as the transport: see cistern/paho.h. */
    rc = cis_paho_hold();
    if (rc) {
        mqtt_free(h);
        return rc;
    }
    /* The first client now, so that a URL Paho cannot use stops the start. */
    rc = client_open(h, why, sizeof(why));
    if (rc) {
        cis_error("[mqtt] %s", why);
        mqtt_free(h);
        cis_paho_release();
        return rc;
    }
    cis_debug("[mqtt] run id %02x%02x%02x%02x%02x%02x%02x%02x", h->run_id[0], h->run_id[1],
              h->run_id[2], h->run_id[3], h->run_id[4], h->run_id[5], h->run_id[6], h->run_id[7]);
    start_connect(h, cis_mono_ms());
    *out = h;
    return 0;
}

const struct agent_transport_ops agent_transport_mqtt = {
    .name = "mqtt",
    .create = mqtt_create,
    .send = mqtt_send,
    .tick = mqtt_tick,
    .abort_all = mqtt_abort_all,
    .destroy = mqtt_destroy,
};
