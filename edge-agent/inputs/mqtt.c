/* Input "mqtt": subscribes to topic filters on a (usually local) broker through a persistent
 * MQTT v5 session, and stores each message as one record whose stream is its topic. A QoS 1
 * message is acknowledged to the broker (PUBACK) only after its record's spool transaction has
 * committed.
 *
 * What that rests on, in Paho MQTT C 1.3.12 (async), checked in its source and by experiment:
 * - While its in-memory queue is empty, Paho calls messageArrived on its receive thread as
 *   soon as a PUBLISH is read, and sends the PUBACK right after the callback returns, whatever
 *   it returns. Nothing else delays a PUBACK. Returning 0 is not a refusal: Paho queues the
 *   message in memory and PUBACKs it at once, and while that queue is not empty it PUBACKs
 *   every further message on receipt, before any callback. So on_message() never returns 0
 *   (the queue stays empty), and it blocks until the loop thread reports the commit.
 * - The callback runs holding Paho's process-wide lock. While it blocks, any MQTTAsync_* call
 *   that takes the lock (connect, subscribe, send, isConnected, destroy...) blocks in every thread,
 *   for every client. The loop thread must commit the record, so here it calls such functions
 *   only while this client has no connection (no callback of ours can be running);
 *   MQTTAsync_disconnect only queues a command and does not take the lock.
 * - A block is bounded by the hold time (HOLD_MS). When the commit has not succeeded by then
 *   (the spool refuses, or the loop is stuck), the callback shuts the connection down under
 *   Paho (shutdown(2) on its socket, which Paho then reports as lost) before it returns, so the
 *   PUBACK Paho writes next goes nowhere: the message stays unacknowledged at the broker, which
 *   sends it again after the reconnect. The copy held here is still stored when the spool
 *   allows: a duplicate at worst, never a loss. Should no socket to the broker be found, the
 *   callback waits instead until the broker must have closed the silent connection for its
 *   keep-alive (MQTT 5, 3.1.2.10; mosquitto 2.0 checks only every few seconds). */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <MQTTAsync.h>

#include "agent.h"
#include "cistern/backoff.h"
#include "cistern/config.h"
#include "cistern/err.h"
#include "cistern/log.h"
#include "cistern/paho.h"

#define KEEPALIVE_S 10         /* asked of the broker */
/* How long a message waits for its commit before its connection is dropped: far above a
 * commit's time even on a slow SD card, and as short as can be, since Paho's lock is held
 * meanwhile. */
#define HOLD_MS 5000
#define ADDRS_MAX 8            /* the broker's addresses, to find our connections to it */
#define CONNECT_TIMEOUT_S 10
#define RECONNECT_INITIAL_MS 1000
#define RECONNECT_MAX_MS 30000
#define RETRY_INITIAL_MS 100   /* a message the spool refused is submitted again after this */
#define RETRY_MAX_MS 5000
#define NOTED_MAX 32           /* topics remembered for "log once per topic" */
#define EVENTS_MAX 16
#define RECEIVE_MAX 1          /* Receive Maximum asked of the broker */
#define ARRIVAL_MAX 10000      /* ack: on_arrival: unstored messages held in memory at most */
#define DESTROY_WAIT_MS 3000   /* for the disconnect to complete when the loop is gone */

/* A message handed from on_message (Paho's thread) to the loop thread. */
enum entry_state { E_QUEUED, E_SUBMITTED, E_RETRY, E_DONE, E_DROPPED };

struct mqtt_input;

struct entry {
    struct entry *next;
    struct mqtt_input *owner;
    MQTTAsync_message *msg; /* owned: Paho's message, freed with the entry */
    char *topic;            /* owned: Paho's topic string (NUL-terminated) */
    int state;              /* enum entry_state */
    int waiting;            /* on_message blocks on it; 0: released, the loop frees it */
    int64_t retry_at;       /* E_RETRY: monotonic ms of the next submission */
};

/* What Paho's callbacks tell the loop thread, which logs and acts on it. */
enum ev_type {
    EV_CONNECTED,
    EV_CONNECT_FAILED,
    EV_SUBSCRIBED,
    EV_SUB_FAILED,
    EV_LOST,
    EV_DISCONNECTED,
    EV_RELEASED, /* a message was released unstored after the hold time */
};

struct event {
    int type;
    int session_present;
    int granted, refused, downgraded; /* EV_SUBSCRIBED: counts of topic filters */
    char why[256];
};

/* The link as the loop thread drives it. */
enum link_state { L_DOWN, L_CONNECTING, L_UP, L_STOPPING, L_STOPPED };

struct mqtt_input {
    struct agent_input *in;
    MQTTAsync client;
    int paho_held; /* cis_paho_hold() taken: released after the client is destroyed */
    char *client_id;
    int tls;
    MQTTProperties connect_props;
    struct sockaddr_storage addrs[ADDRS_MAX]; /* the broker's; read by Paho's threads */
    size_t naddrs;
    MQTTSubscribe_options *sub_opts;
    int *qoss;
    int wake[2]; /* Paho's threads write a byte; the loop reads */

    /* loop thread only */
    int state;          /* enum link_state */
    int stopped;
    int ever_up;        /* a connection reached the subscribed state once */
    int session_present;
    int down_logged;    /* this outage is logged: further failed attempts are quiet */
    int refusing;       /* the CIS_E* code of the spool's refusals, logged once; 0: none */
    int released_logged;
    char down_why[256];
    struct cis_backoff reconnect, retry;
    int64_t next_attempt;

    /* shared with Paho's threads: under mu */
    pthread_mutex_t mu;
    pthread_cond_t cond;
    struct entry *entries;
    size_t nwaiting, nreleased;
    struct event events[EVENTS_MAX];
    size_t ev_head, ev_len;
    uint64_t refused_pending; /* to add to the agent's refused counter */
    int keepalive_s;          /* in force on the connection; 0: none (the broker's choice) */
    int unbounded;            /* a callback waits with nothing to bound it (see on_message) */
    int stop_requested;
    int closing;              /* destroy has begun: the loop is gone */
    int paho_closed;          /* no connection and none being made */
    char tls_err[192];
    char server_reason[128];  /* why the connection ends, when known before Paho reports it */
    char *noted[NOTED_MAX];   /* topics already logged as empty or refused */
    size_t nnoted;
    int noted_full;
};

/* ---- shared helpers (any thread) ---- */

static void wake_loop(struct mqtt_input *s)
{
    if (write(s->wake[1], "x", 1) < 0) {
        /* EAGAIN: the pipe is full, a wake-up is already pending */
    }
}

/* Caller holds mu. A full ring drops its oldest event: the newest say where the link is. */
static struct event *push_event(struct mqtt_input *s, int type)
{
    struct event *ev;
    if (s->ev_len == EVENTS_MAX) {
        s->ev_head = (s->ev_head + 1) % EVENTS_MAX;
        s->ev_len--;
    }
    ev = &s->events[(s->ev_head + s->ev_len++) % EVENTS_MAX];
    memset(ev, 0, sizeof(*ev));
    ev->type = type;
    return ev;
}

static void post_event(struct mqtt_input *s, int type, const char *why)
{
    pthread_mutex_lock(&s->mu);
    struct event *ev = push_event(s, type);
    if (why)
        snprintf(ev->why, sizeof(ev->why), "%s", why);
    pthread_mutex_unlock(&s->mu);
    wake_loop(s);
}

static void entry_free(struct entry *e)
{
    MQTTAsync_freeMessage(&e->msg);
    MQTTAsync_free(e->topic);
    free(e);
}

/* Caller holds mu. */
static void entry_unlink(struct mqtt_input *s, struct entry *e)
{
    for (struct entry **pp = &s->entries; *pp; pp = &(*pp)->next) {
        if (*pp == e) {
            *pp = e->next;
            return;
        }
    }
}

/* Explain a failed connect or subscribe in the words a technician can act on. */
static void describe_failure(struct mqtt_input *s, const MQTTAsync_failureData5 *r, char *buf,
                             size_t n)
{
    const char *what = NULL;
    if (r && r->reasonCode >= MQTTREASONCODE_UNSPECIFIED_ERROR)
        snprintf(buf, n, "the broker refused: %s", MQTTReasonCode_toString(r->reasonCode));
    else if (r && r->message)
        snprintf(buf, n, "%s", r->message);
    else if (r && (what = MQTTAsync_strerror(r->code)) != NULL)
        snprintf(buf, n, "%s", what);
    else
        snprintf(buf, n, "failed (code %d)", r ? r->code : 0);
    pthread_mutex_lock(&s->mu);
    if (s->tls_err[0]) {
        size_t len = strlen(buf);
        snprintf(buf + len, n - len, "; TLS: %s", s->tls_err);
        s->tls_err[0] = '\0';
    }
    pthread_mutex_unlock(&s->mu);
}

/* ---- Paho's callbacks (Paho's threads: no agent_* call, no spool) ---- */

/* OpenSSL's error lines read "<thread>:error:<code>:<library>:<function>:<reason>:<file>:
 * <line>:<data>": keep the reason (and data), which is what a technician can act on. */
static int on_tls_error(const char *str, size_t len, void *u)
{
    struct mqtt_input *s = u;
    const char *f[9] = {0};
    size_t n = 0, flen[9] = {0};
    const char *p = str, *end = str + len;

    while (len && (str[len - 1] == '\n' || str[len - 1] == '\r'))
        end = str + --len;
    while (n < 9 && p <= end) {
        const char *c = memchr(p, ':', (size_t)(end - p));
        f[n] = p;
        flen[n++] = (size_t)((c ? c : end) - p);
        if (!c)
            break;
        p = c + 1;
    }
    pthread_mutex_lock(&s->mu);
    if (n >= 6 && flen[1] == 5 && memcmp(f[1], "error", 5) == 0)
        snprintf(s->tls_err, sizeof(s->tls_err), "%.*s%s%.*s", (int)flen[5], f[5],
                 n >= 9 && flen[8] ? ": " : "", n >= 9 ? (int)flen[8] : 0, n >= 9 ? f[8] : "");
    else
        snprintf(s->tls_err, sizeof(s->tls_err), "%.*s", (int)len, str);
    pthread_mutex_unlock(&s->mu);
    return 1;
}

static void on_subscribed(void *ctx, MQTTAsync_successData5 *r)
{
    struct mqtt_input *s = ctx;
    const struct cis_strlist *topics = &s->in->cfg->topics;
    int n = (int)topics->n;

    pthread_mutex_lock(&s->mu);
    struct event *ev = push_event(s, EV_SUBSCRIBED);
    for (int i = 0; i < n; i++) {
        /* One filter: the granted QoS is the reason code; several: an array of them. */
        int rc = n == 1 ? (int)r->reasonCode
                 : r->alt.sub.reasonCodes && i < r->alt.sub.reasonCodeCount
                     ? (int)r->alt.sub.reasonCodes[i]
                     : (int)r->reasonCode;
        if (rc >= MQTTREASONCODE_UNSPECIFIED_ERROR) {
            if (ev->refused++ == 0)
                snprintf(ev->why, sizeof(ev->why), "\"%s\": %s", topics->v[i],
                         MQTTReasonCode_toString((enum MQTTReasonCodes)rc));
        } else {
            ev->granted++;
            if (rc < s->qoss[i])
                ev->downgraded++;
        }
    }
    pthread_mutex_unlock(&s->mu);
    wake_loop(s);
}

static void on_subscribe_failed(void *ctx, MQTTAsync_failureData5 *r)
{
    struct mqtt_input *s = ctx;
    char why[256];
    describe_failure(s, r, why, sizeof(why));
    post_event(s, EV_SUB_FAILED, why);
}

static void on_disconnect_done(void *ctx, MQTTAsync_successData5 *r)
{
    struct mqtt_input *s = ctx;
    pthread_mutex_lock(&s->mu);
    s->paho_closed = 1;
    push_event(s, EV_DISCONNECTED);
    pthread_cond_broadcast(&s->cond);
    pthread_mutex_unlock(&s->mu);
    wake_loop(s);
}

static void on_disconnect_failed(void *ctx, MQTTAsync_failureData5 *r)
{
    on_disconnect_done(ctx, NULL);
}

/* Queue a DISCONNECT. It does not take Paho's lock, so any thread may call it at any time. */
static void request_disconnect(struct mqtt_input *s)
{
    MQTTAsync_disconnectOptions d = MQTTAsync_disconnectOptions_initializer5;
    d.onSuccess5 = on_disconnect_done;
    d.onFailure5 = on_disconnect_failed;
    d.context = s;
    if (MQTTAsync_disconnect(s->client, &d) != MQTTASYNC_SUCCESS) {
        /* Not connected: a connect still in progress ends in on_connected (which disconnects
         * when stop_requested) or on_connect_failed; a lost connection was reported already. */
    }
}

static void on_connected(void *ctx, MQTTAsync_successData5 *r)
{
    struct mqtt_input *s = ctx;
    const struct cis_strlist *topics = &s->in->cfg->topics;
    MQTTAsync_responseOptions ro = MQTTAsync_responseOptions_initializer;
    int stop, keepalive = KEEPALIVE_S;

    /* The broker may impose its own keep-alive (Server Keep Alive; 0: none). */
    if (MQTTProperties_hasProperty(&r->properties, MQTTPROPERTY_CODE_SERVER_KEEP_ALIVE))
        keepalive = MQTTProperties_getNumericValue(&r->properties,
                                                   MQTTPROPERTY_CODE_SERVER_KEEP_ALIVE);
    pthread_mutex_lock(&s->mu);
    s->keepalive_s = keepalive;
    s->server_reason[0] = '\0';
    s->tls_err[0] = '\0';
    stop = s->stop_requested;
    push_event(s, EV_CONNECTED)->session_present = r->alt.connect.sessionPresent;
    pthread_mutex_unlock(&s->mu);
    wake_loop(s);
    if (stop) {
        request_disconnect(s);
        return;
    }
    /* Subscribe on every connect: a session may be new (first start, or the broker lost it),
     * and the config may name filters the session does not have. retainHandling 1: retained
     * messages come only with a new subscription, not again at each reconnect. */
    ro.onSuccess5 = on_subscribed;
    ro.onFailure5 = on_subscribe_failed;
    ro.context = s;
    if (topics->n == 1) {
        ro.subscribeOptions = s->sub_opts[0];
    } else {
        ro.subscribeOptionsCount = (int)topics->n;
        ro.subscribeOptionsList = s->sub_opts;
    }
    int rc = MQTTAsync_subscribeMany(s->client, (int)topics->n, topics->v, s->qoss, &ro);
    if (rc != MQTTASYNC_SUCCESS) {
        const char *what = MQTTAsync_strerror(rc);
        post_event(s, EV_SUB_FAILED, what ? what : "subscribe failed");
    }
}

static void on_connect_failed(void *ctx, MQTTAsync_failureData5 *r)
{
    struct mqtt_input *s = ctx;
    char why[256];
    describe_failure(s, r, why, sizeof(why));
    pthread_mutex_lock(&s->mu);
    s->paho_closed = 1;
    snprintf(push_event(s, EV_CONNECT_FAILED)->why, sizeof(s->events[0].why), "%s", why);
    pthread_cond_broadcast(&s->cond);
    pthread_mutex_unlock(&s->mu);
    wake_loop(s);
}

/* The broker sent a DISCONNECT (e.g. another client took over our client id). */
static void on_server_disconnect(void *ctx, MQTTProperties *props, enum MQTTReasonCodes rc)
{
    struct mqtt_input *s = ctx;
    pthread_mutex_lock(&s->mu);
    snprintf(s->server_reason, sizeof(s->server_reason), "the broker disconnected us: %s",
             MQTTReasonCode_toString(rc));
    pthread_mutex_unlock(&s->mu);
}

static void on_lost(void *ctx, char *cause)
{
    struct mqtt_input *s = ctx;
    pthread_mutex_lock(&s->mu);
    s->paho_closed = 1;
    /* Paho passes no cause; say what we know. */
    snprintf(push_event(s, EV_LOST)->why, sizeof(s->events[0].why), "%s",
             s->server_reason[0] ? s->server_reason
             : cause             ? cause
                                 : "the broker or the network closed it");
    s->server_reason[0] = '\0';
    pthread_cond_broadcast(&s->cond);
    pthread_mutex_unlock(&s->mu);
    wake_loop(s);
}

/* Caller holds mu. Log a message that cannot be stored once per topic (a publisher that sends
 * them usually sends many), and count the refused ones for the loop to add. */
static void note_skipped(struct mqtt_input *s, const char *topic, const char *why, int refuse)
{
    size_t i;
    if (refuse)
        s->refused_pending++;
    for (i = 0; i < s->nnoted; i++)
        if (strcmp(s->noted[i], topic) == 0)
            return;
    if (s->nnoted < NOTED_MAX && (s->noted[s->nnoted] = strdup(topic)) != NULL) {
        s->nnoted++;
        cis_warn("[mqtt] %s: a message on \"%s\" is %s; acknowledged and not stored (logged once "
                 "per topic)",
                 s->in->cfg->name, topic, why);
    } else if (!s->noted_full) {
        s->noted_full = 1;
        cis_warn("[mqtt] %s: a message on \"%s\" is %s; acknowledged and not stored (no more "
                 "topics are logged)",
                 s->in->cfg->name, topic, why);
    }
}

static int same_peer(const struct sockaddr_storage *a, const struct sockaddr_storage *b)
{
    if (a->ss_family != b->ss_family)
        return 0;
    if (a->ss_family == AF_INET) {
        const struct sockaddr_in *x = (const void *)a, *y = (const void *)b;
        return x->sin_port == y->sin_port && x->sin_addr.s_addr == y->sin_addr.s_addr;
    }
    if (a->ss_family == AF_INET6) {
        const struct sockaddr_in6 *x = (const void *)a, *y = (const void *)b;
        return x->sin6_port == y->sin6_port &&
               memcmp(&x->sin6_addr, &y->sin6_addr, sizeof(x->sin6_addr)) == 0;
    }
    return 0;
}

/* Shut down (not close: the descriptors stay Paho's, who reports the connections lost and
 * closes them) every TCP connection of this process to the input's broker, so that nothing
 * more is written on them. Returns how many. Another client of this process on the same
 * broker loses its connection too: it reconnects, and what it had not acknowledged comes
 * again; nothing is lost. */
static int drop_connection(struct mqtt_input *s)
{
    DIR *d = opendir("/proc/self/fd");
    struct dirent *de;
    int n = 0;
    if (!d)
        return 0;
    while ((de = readdir(d)) != NULL) {
        char *end;
        long fd = strtol(de->d_name, &end, 10);
        struct sockaddr_storage peer;
        socklen_t len = sizeof(peer);
        struct stat st;
        if (*end || end == de->d_name || fd == dirfd(d) || fstat((int)fd, &st) != 0 ||
            !S_ISSOCK(st.st_mode) || getpeername((int)fd, (struct sockaddr *)&peer, &len) != 0)
            continue;
        for (size_t i = 0; i < s->naddrs; i++) {
            if (same_peer(&peer, &s->addrs[i])) {
                if (shutdown((int)fd, SHUT_RDWR) == 0)
                    n++;
                break;
            }
        }
    }
    closedir(d);
    return n;
}

/* Caller holds mu. Wait until E is stored (or dropped), DEADLINE (monotonic ms; -1: none), or
 * destroy (the loop is gone: nothing will store it). */
static void wait_entry(struct mqtt_input *s, struct entry *e, int64_t deadline)
{
    while (e->state != E_DONE && e->state != E_DROPPED && !s->closing) {
        if (deadline < 0) {
            pthread_cond_wait(&s->cond, &s->mu);
        } else {
            struct timespec ts;
            if (cis_mono_ms() >= deadline)
                return;
            cis_mono_timespec(deadline, &ts);
            pthread_cond_timedwait(&s->cond, &s->mu, &ts);
        }
    }
}

/* Paho's receive thread, one message at a time. Returns 1 (never 0: see the top of the file)
 * once the record committed, or once the message is released unstored with its connection
 * dropped, so that the PUBACK Paho sends next cannot reach the broker. */
static int on_message(void *ctx, char *topic, int topic_len, MQTTAsync_message *m)
{
    struct mqtt_input *s = ctx;
    size_t len = m->payloadlen > 0 ? (size_t)m->payloadlen : 0;
    const char *skip = NULL;
    int refuse = 0, released = 0;
    char why[96];
    struct entry *e;
    int64_t started = cis_mono_ms();

    if (topic_len > 0 && memchr(topic, '\0', (size_t)topic_len)) {
        skip = "under a topic that contains a NUL byte (MQTT forbids it)";
        refuse = 1;
    } else if (len == 0) {
        /* Not a record (a record has at least one byte) and nothing is lost: often the
         * clearing of a retained message. Not counted as refused. */
        skip = "empty";
    } else if (len > s->in->cfg->max_line) {
        /* It could never be stored, and MQTT has no way to tell the publisher: acknowledge it,
         * or the broker would deliver it again forever. */
        snprintf(why, sizeof(why), "%zu bytes, over max_line (%llu)", len,
                 (unsigned long long)s->in->cfg->max_line);
        skip = why;
        refuse = 1;
    }
    if (skip) {
        pthread_mutex_lock(&s->mu);
        note_skipped(s, topic, skip, refuse);
        pthread_mutex_unlock(&s->mu);
        if (refuse)
            wake_loop(s);
        MQTTAsync_freeMessage(&m);
        MQTTAsync_free(topic);
        return 1;
    }

    /* Out of memory: wait for memory, within the hold time like any other wait. */
    while ((e = calloc(1, sizeof(*e))) == NULL && cis_mono_ms() < started + HOLD_MS)
        usleep(10000);
    pthread_mutex_lock(&s->mu);
    if (e && s->in->cfg->ack == AGENT_INPUT_ACK_ON_ARRIVAL && s->nreleased < ARRIVAL_MAX) {
        /* ack: on_arrival: the loop owns the copy and stores it with the next group commit
         * (retrying while the spool refuses); Paho PUBACKs when we return. Beyond ARRIVAL_MAX
         * unstored messages, hold like after_commit: memory stays bounded. */
        *e = (struct entry){.owner = s, .msg = m, .topic = topic, .state = E_QUEUED};
        struct entry **pp = &s->entries;
        while (*pp)
            pp = &(*pp)->next;
        *pp = e;
        s->nreleased++;
        pthread_mutex_unlock(&s->mu);
        wake_loop(s);
        return 1;
    }
    if (e) {
        *e = (struct entry){.owner = s, .msg = m, .topic = topic, .state = E_QUEUED, .waiting = 1};
        struct entry **pp = &s->entries;
        while (*pp)
            pp = &(*pp)->next;
        *pp = e;
        s->nwaiting++;
        wake_loop(s);
        wait_entry(s, e, started + HOLD_MS);
    }
    if (!e || (e->state != E_DONE && e->state != E_DROPPED)) {
        /* Not stored within the hold time: drop the connection before Paho PUBACKs it. */
        snprintf(s->server_reason, sizeof(s->server_reason),
                 "closed here, to keep a message that could not be stored unacknowledged");
        pthread_mutex_unlock(&s->mu);
        int dropped = drop_connection(s);
        pthread_mutex_lock(&s->mu);
        if (!dropped) {
            /* No socket found (the broker's address did not resolve as Paho's did): rely on
             * the broker closing the silent connection, at most 1.5 x keep-alive after our
             * last packet, which came before this callback; mosquitto 2.0 checks every 5 s. */
            int64_t until = s->keepalive_s > 0 ? started + s->keepalive_s * 2000LL + 10000 : -1;
            s->unbounded += until < 0;
            if (e)
                wait_entry(s, e, until);
            else if (until > cis_mono_ms())
                usleep((useconds_t)(until - cis_mono_ms()) * 1000);
            s->unbounded -= until < 0;
        }
    }
    if (e) {
        s->nwaiting--;
        if (e->state == E_DONE || e->state == E_DROPPED || s->closing) {
            /* Stored; or the loop is gone and nobody will store it (the broker sends it
             * again after the next start). */
            entry_unlink(s, e);
        } else {
            /* Released unstored: the loop keeps the copy and stores it when the spool allows. */
            e->waiting = 0;
            s->nreleased++;
            released = 1;
            snprintf(push_event(s, EV_RELEASED)->why, sizeof(s->events[0].why), "%s", topic);
        }
        pthread_cond_broadcast(&s->cond); /* destroy may wait for nwaiting to reach 0 */
    }
    pthread_mutex_unlock(&s->mu);
    if (released) {
        wake_loop(s);
    } else if (e) {
        entry_free(e); /* it owns Paho's message and topic since it was queued */
    } else {
        MQTTAsync_freeMessage(&m);
        MQTTAsync_free(topic);
    }
    return 1;
}

/* ---- the loop thread ---- */

/* The spool's answer for one record (ingest_commit, loop thread). */
static void on_ack(void *ctx, uint64_t token, int status, uint64_t seq)
{
    struct entry *e = ctx;
    struct mqtt_input *s = e->owner;
    struct agent_counters *c = agent_counters(s->in->agent);
    int qos = e->msg->qos, held = 0;
    char topic[160];

    snprintf(topic, sizeof(topic), "%s", e->topic);
    pthread_mutex_lock(&s->mu);
    if (status == 0) {
        e->state = E_DONE;
    } else if (qos == 0) {
        /* QoS 0: the broker would not send it again; there is nothing to hold it for. */
        e->state = E_DROPPED;
    } else {
        /* Held and submitted again, not refused: count messages, not attempts. */
        e->state = E_RETRY;
        e->retry_at = cis_mono_ms() + cis_backoff_next(&s->retry);
        if (c->produced)
            c->produced--;
        if (c->refused)
            c->refused--;
        held = 1;
    }
    if (e->waiting) {
        pthread_cond_broadcast(&s->cond);
    } else if (e->state != E_RETRY) {
        entry_unlink(s, e);
        s->nreleased--;
        entry_free(e);
    }
    pthread_mutex_unlock(&s->mu);

    if (status == 0) {
        cis_backoff_reset(&s->retry);
        if (s->refusing)
            cis_info("[mqtt] %s: the spool takes messages again; acknowledging to the broker "
                     "again",
                     s->in->cfg->name);
        s->refusing = 0;
    } else if (s->refusing != status) {
        s->refusing = status;
        if (held)
            cis_warn("[mqtt] %s: the spool refuses records (%s); the message on \"%s\" is held "
                     "unacknowledged and retried, and the broker keeps the ones after it",
                     s->in->cfg->name, cis_strerror(status), topic);
        else
            cis_warn("[mqtt] %s: the spool refuses records (%s); QoS 0 messages are dropped "
                     "(counted as refused) until it takes them again",
                     s->in->cfg->name, cis_strerror(status));
    }
}

/* Submit what on_message queued and what is due for another try. */
static void submit_due(struct mqtt_input *s, int64_t now)
{
    int soon = 0;
    pthread_mutex_lock(&s->mu);
    for (struct entry *e = s->entries; e; e = e->next) {
        if (e->state != E_QUEUED && !(e->state == E_RETRY && now >= e->retry_at))
            continue;
        if (agent_ingest_submit_stream(s->in->agent, s->in->cfg, e->topic,
                                       (const uint8_t *)e->msg->payload,
                                       (size_t)e->msg->payloadlen, on_ack, e, 0) == 0) {
            e->state = E_SUBMITTED;
            soon |= e->waiting; /* on_arrival entries ride the group commit */
        } else {
            e->state = E_RETRY; /* out of memory */
            e->retry_at = now + RETRY_INITIAL_MS;
        }
    }
    pthread_mutex_unlock(&s->mu);
    /* The publisher's next message waits for this commit: do not wait for commit_interval. */
    if (soon)
        agent_ingest_commit_soon(s->in->agent);
}

/* The broker's addresses, as Paho will connect to them, for drop_connection(). Loop thread,
 * while no callback of ours runs (before a connect). */
static void resolve_broker(struct mqtt_input *s)
{
    const char *url = s->in->cfg->url, *hp = strstr(url, "://");
    char hostport[300], host[256], port[8], why[128];
    unsigned portnum;
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICSERV}, *res = NULL;

    hp = hp ? hp + 3 : url;
    snprintf(hostport, sizeof(hostport), "%.*s", (int)strcspn(hp, "/"), hp);
    if (cis_parse_hostport(hostport, host, sizeof(host), &portnum, why, sizeof(why)) != 0) {
        /* No port: the scheme's default, as Paho does. */
        snprintf(host, sizeof(host), "%.*s", (int)strcspn(hostport + (hostport[0] == '['), "]"),
                 hostport + (hostport[0] == '['));
        portnum = s->tls ? 8883 : 1883;
    }
    snprintf(port, sizeof(port), "%u", portnum);
    if (getaddrinfo(host, port, &hints, &res) != 0)
        return; /* Paho will say what is wrong; retried before the next connect */
    s->naddrs = 0;
    for (struct addrinfo *ai = res; ai && s->naddrs < ADDRS_MAX; ai = ai->ai_next) {
        if (ai->ai_addrlen <= sizeof(s->addrs[0]))
            memcpy(&s->addrs[s->naddrs++], ai->ai_addr, ai->ai_addrlen);
    }
    freeaddrinfo(res);
}

static void connect_now(struct mqtt_input *s)
{
    const struct agent_input_cfg *cfg = s->in->cfg;
    MQTTAsync_connectOptions o = MQTTAsync_connectOptions_initializer5;
    MQTTAsync_SSLOptions ssl = MQTTAsync_SSLOptions_initializer;
    int rc;

    o.keepAliveInterval = KEEPALIVE_S;
    o.cleanstart = 0; /* resume the session: what was published while we were away waits */
    o.connectProperties = &s->connect_props;
    o.connectTimeout = CONNECT_TIMEOUT_S;
    o.automaticReconnect = 0; /* the loop reconnects, with our backoff and our logging */
    o.username = cfg->username;
    o.password = cfg->password;
    o.onSuccess5 = on_connected;
    o.onFailure5 = on_connect_failed;
    o.context = s;
    if (s->tls) {
        ssl.trustStore = cfg->ca_file; /* NULL: the system's CAs */
        ssl.keyStore = cfg->cert_file;
        ssl.privateKey = cfg->key_file;
        ssl.enableServerCertAuth = 1; /* verification is always on */
        ssl.verify = 1;               /* and the host name must match the certificate */
        ssl.ssl_error_cb = on_tls_error;
        ssl.ssl_error_context = s;
        o.ssl = &ssl;
    }
    if (s->naddrs == 0)
        resolve_broker(s);
    pthread_mutex_lock(&s->mu);
    s->paho_closed = 0;
    pthread_mutex_unlock(&s->mu);
    s->state = L_CONNECTING;
    /* Takes Paho's lock: safe only because this client has no connection now. */
    rc = MQTTAsync_connect(s->client, &o);
    if (rc != MQTTASYNC_SUCCESS) {
        const char *what = MQTTAsync_strerror(rc);
        pthread_mutex_lock(&s->mu);
        s->paho_closed = 1;
        snprintf(push_event(s, EV_CONNECT_FAILED)->why, sizeof(s->events[0].why), "%s",
                 what ? what : "connect failed");
        pthread_mutex_unlock(&s->mu);
        wake_loop(s);
    }
}

/* The connection is gone (LOST) or the attempt failed: try again after the backoff. */
static void went_down(struct mqtt_input *s, int64_t now, int lost, const char *why)
{
    const char *name = s->in->cfg->name, *url = s->in->cfg->url;
    s->state = s->stopped ? L_STOPPED : L_DOWN;
    s->next_attempt = now + cis_backoff_next(&s->reconnect);
    if (s->stopped)
        return;
    /* One line per outage; a failed attempt adds one only when its reason differs from the
     * previous attempt's (e.g. the broker is back but refuses us). */
    if (lost) {
        cis_warn("[mqtt] %s: connection to %s lost: %s; reconnecting with backoff", name, url, why);
        s->down_logged = 1;
        s->down_why[0] = '\0';
        return;
    }
    if (!s->down_logged || (s->down_why[0] && strcmp(s->down_why, why) != 0))
        cis_warn("[mqtt] %s: cannot connect to %s: %s; retrying with backoff", name, url, why);
    else
        cis_debug("[mqtt] %s: still cannot connect to %s: %s", name, url, why);
    s->down_logged = 1;
    snprintf(s->down_why, sizeof(s->down_why), "%s", why);
}

static void handle_event(struct mqtt_input *s, const struct event *ev, int64_t now)
{
    const char *name = s->in->cfg->name, *url = s->in->cfg->url;
    switch (ev->type) {
    case EV_CONNECTED:
        if (s->state == L_CONNECTING)
            s->state = s->stopped ? L_STOPPING : L_UP;
        s->session_present = ev->session_present;
        break;
    case EV_SUBSCRIBED:
        cis_backoff_reset(&s->reconnect);
        s->down_logged = 0;
        s->down_why[0] = '\0';
        cis_info("[mqtt] %s: connected to %s as %s (%s); subscribed to %d topic filter(s)", name,
                 url, s->client_id,
                 s->session_present ? "session resumed" : "new session", ev->granted);
        if (!s->session_present && s->ever_up)
            cis_warn("[mqtt] %s: the broker had no session for %s: messages published while we "
                     "were disconnected were not kept (broker restarted without persistence, or "
                     "session_expiry too short)",
                     name, s->client_id);
        if (ev->refused)
            cis_error("[mqtt] %s: the broker refused %d topic filter(s), first %s; nothing "
                      "arrives on them",
                      name, ev->refused, ev->why);
        if (ev->downgraded)
            cis_warn("[mqtt] %s: the broker granted %d topic filter(s) a lower QoS than asked: "
                     "their messages are not acknowledged, nor kept while we are away",
                     name, ev->downgraded);
        s->ever_up = 1;
        break;
    case EV_SUB_FAILED:
        s->down_logged = 0; /* connected all the same: the next outage is news */
        cis_error("[mqtt] %s: cannot subscribe on %s: %s; nothing arrives until the next "
                  "reconnect",
                  name, url, ev->why);
        break;
    case EV_CONNECT_FAILED:
        went_down(s, now, 0, ev->why);
        break;
    case EV_LOST:
        went_down(s, now, 1, ev->why);
        break;
    case EV_DISCONNECTED:
        if (s->state != L_STOPPED)
            cis_info("[mqtt] %s: disconnected from %s", name, url);
        s->state = L_STOPPED;
        break;
    case EV_RELEASED:
        if (!s->released_logged)
            cis_warn("[mqtt] %s: a message on \"%s\" was not committed within %d s: connection "
                     "dropped so that it stays unacknowledged (the broker sends it again); the "
                     "copy here is stored when the spool allows, so it may be stored twice",
                     name, ev->why, HOLD_MS / 1000);
        s->released_logged = 1;
        break;
    }
}

/* Everything Paho's threads left for the loop: events, counts, messages to submit. */
static void pump(struct mqtt_input *s, int64_t now)
{
    struct event evs[EVENTS_MAX];
    size_t n = 0;
    uint64_t refused;

    pthread_mutex_lock(&s->mu);
    while (s->ev_len) {
        evs[n++] = s->events[s->ev_head];
        s->ev_head = (s->ev_head + 1) % EVENTS_MAX;
        s->ev_len--;
    }
    refused = s->refused_pending;
    s->refused_pending = 0;
    if (s->nreleased == 0)
        s->released_logged = 0;
    pthread_mutex_unlock(&s->mu);

    agent_counters(s->in->agent)->refused += refused;
    for (size_t i = 0; i < n; i++)
        handle_event(s, &evs[i], now);
    submit_due(s, now);
}

static void on_wake(void *ctx, int fd, short revents)
{
    struct mqtt_input *s = ctx;
    char buf[64];
    while (read(fd, buf, sizeof(buf)) > 0) {
    }
    pump(s, cis_mono_ms());
}

static int mqtt_start(struct agent_input *in)
{
    const struct agent_input_cfg *cfg = in->cfg;
    struct mqtt_input *s = calloc(1, sizeof(*s));
    MQTTAsync_createOptions co = MQTTAsync_createOptions_initializer5;
    pthread_condattr_t ca;
    struct agent_runtime rt;
    char topics[512];
    size_t off = 0;
    int rc;

    if (!s)
        return CIS_ENOMEM;
    in->priv = s;
    s->in = in;
    s->wake[0] = s->wake[1] = -1;
    s->paho_closed = 1;
    s->keepalive_s = KEEPALIVE_S;
    pthread_mutex_init(&s->mu, NULL);
    /* Timed waits on the monotonic clock: a wall-clock step must not stretch a hold. */
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&s->cond, &ca);
    pthread_condattr_destroy(&ca);
    cis_backoff_init(&s->reconnect, RECONNECT_INITIAL_MS, RECONNECT_MAX_MS);
    cis_backoff_init(&s->retry, RETRY_INITIAL_MS, RETRY_MAX_MS);
    if (pipe2(s->wake, O_NONBLOCK | O_CLOEXEC) < 0) {
        cis_error("[mqtt] %s: pipe: %s", cfg->name, strerror(errno));
        return CIS_EIO;
    }

    s->tls = strncmp(cfg->url, "ssl://", 6) == 0 || strncmp(cfg->url, "mqtts://", 8) == 0;
    if (!s->tls && (cfg->ca_file || cfg->cert_file))
        cis_warn("[mqtt] %s: ca_file/cert_file are ignored: %s is not ssl:// or mqtts://",
                 cfg->name, cfg->url);
    if (cfg->client_id) {
        s->client_id = strdup(cfg->client_id);
    } else {
        agent_runtime(in->agent, &rt);
        if (asprintf(&s->client_id, "%s-%s", rt.agent_id ? rt.agent_id : "cistern", cfg->name) < 0)
            s->client_id = NULL;
    }
    s->qoss = calloc(cfg->topics.n, sizeof(*s->qoss));
    s->sub_opts = calloc(cfg->topics.n, sizeof(*s->sub_opts));
    if (!s->client_id || !s->qoss || !s->sub_opts)
        return CIS_ENOMEM;
    for (size_t i = 0; i < cfg->topics.n; i++) {
        s->qoss[i] = (int)cfg->qos;
        s->sub_opts[i] = (MQTTSubscribe_options)MQTTSubscribe_options_initializer;
        s->sub_opts[i].retainHandling = 1;
        off += (size_t)snprintf(topics + off, off < sizeof(topics) ? sizeof(topics) - off : 0,
                                "%s%s", i ? ", " : "", cfg->topics.v[i]);
        if (off >= sizeof(topics))
            off = sizeof(topics) - 1;
    }
    if (cis_paho_hold() != 0)
        return CIS_ENOMEM;
    s->paho_held = 1;
    rc = MQTTAsync_createWithOptions(&s->client, cfg->url, s->client_id,
                                     MQTTCLIENT_PERSISTENCE_NONE, NULL, &co);
    if (rc != MQTTASYNC_SUCCESS) {
        const char *what = MQTTAsync_strerror(rc);
        cis_error("[mqtt] %s: cannot use url %s: %s", cfg->name, cfg->url,
                  what ? what : "invalid");
        s->client = NULL;
        return CIS_EINVAL;
    }
    if (MQTTAsync_setCallbacks(s->client, s, on_lost, on_message, NULL) != MQTTASYNC_SUCCESS ||
        MQTTAsync_setDisconnected(s->client, s, on_server_disconnect) != MQTTASYNC_SUCCESS) {
        cis_error("[mqtt] %s: cannot set Paho callbacks", cfg->name);
        return CIS_EIO;
    }
    /* After the first MQTTAsync_create*: Paho's allocations before it are not freed. */
    {
        /* The broker keeps the session (subscriptions and queued QoS 1 messages) this long
         * after we disconnect. */
        MQTTProperty p = {.identifier = MQTTPROPERTY_CODE_SESSION_EXPIRY_INTERVAL};
        p.value.integer4 = (unsigned int)(cfg->session_expiry_ms / 1000);
        if (MQTTProperties_add(&s->connect_props, &p) != 0)
            return CIS_ENOMEM;
        /* One unacknowledged message at a time: each is committed before the next is worth
         * having, and a broker that pushes ahead (mosquitto does, thousands) turns every
         * crash into that many duplicates, their PUBACKs lost with the connection. */
        p.identifier = MQTTPROPERTY_CODE_RECEIVE_MAXIMUM;
        p.value.integer2 = RECEIVE_MAX;
        if (MQTTProperties_add(&s->connect_props, &p) != 0)
            return CIS_ENOMEM;
    }

    if (agent_loop_watch(in->agent, s->wake[0], POLLIN, on_wake, s) != 0)
        return CIS_ENOMEM;
    cis_info("[mqtt] %s: connecting to %s as %s; topics %s at QoS %d", cfg->name, cfg->url,
             s->client_id, topics, (int)cfg->qos);
    connect_now(s);
    return 0;
}

static int64_t mqtt_tick(struct agent_input *in, int64_t now)
{
    struct mqtt_input *s = in->priv;
    int64_t next = -1;
    size_t released;

    pump(s, now);
    pthread_mutex_lock(&s->mu);
    released = s->nreleased;
    for (struct entry *e = s->entries; e; e = e->next)
        if (e->state == E_RETRY && (next < 0 || e->retry_at < next))
            next = e->retry_at;
    pthread_mutex_unlock(&s->mu);
    /* A message released unstored means the spool refuses: reconnecting now would only
     * hold the next one for the whole hold time again. Wait until it is stored. */
    if (s->state == L_DOWN && !s->stopped && released == 0) {
        if (now >= s->next_attempt)
            connect_now(s);
        else if (next < 0 || s->next_attempt < next)
            next = s->next_attempt;
    }
    return next;
}

static void mqtt_stop(struct agent_input *in)
{
    struct mqtt_input *s = in->priv;
    if (!s)
        return;
    s->stopped = 1;
    pthread_mutex_lock(&s->mu);
    s->stop_requested = 1;
    pthread_mutex_unlock(&s->mu);
    /* No UNSUBSCRIBE: the session keeps the subscriptions, so the broker queues what is
     * published while the agent is down. A message being handled now is committed by the
     * shutdown's commits and then acknowledged; the DISCONNECT goes out after it. */
    switch (s->state) {
    case L_UP:
    case L_CONNECTING:
        /* While connecting, this fails unless the CONNACK just came, and then on_connected
         * (which saw no stop_requested) did not disconnect: this does. */
        s->state = L_STOPPING;
        request_disconnect(s);
        break;
    case L_DOWN:
        s->state = L_STOPPED;
        break;
    default:
        break;
    }
}

static int mqtt_idle(struct agent_input *in)
{
    struct mqtt_input *s = in->priv;
    int idle;
    if (!s)
        return 1;
    pump(s, cis_mono_ms());
    pthread_mutex_lock(&s->mu);
    idle = s->nwaiting == 0 && s->paho_closed;
    /* on_arrival: what was acknowledged is stored before the agent stops, unless the spool
     * refuses it (then it is lost at exit: the documented window) */
    for (struct entry *e = s->entries; e && idle; e = e->next)
        idle = e->waiting || e->state == E_RETRY;
    pthread_mutex_unlock(&s->mu);
    return idle;
}

static void mqtt_destroy(struct agent_input *in)
{
    struct mqtt_input *s = in->priv;
    int clean, unbounded;
    if (!s)
        return;
    in->priv = NULL;
    if (s->wake[0] >= 0)
        agent_loop_unwatch(in->agent, s->wake[0]);
    if (s->client) {
        int64_t until;
        pthread_mutex_lock(&s->mu);
        s->closing = 1;
        s->stop_requested = 1;
        pthread_mutex_unlock(&s->mu);
        request_disconnect(s);
        /* MQTTAsync_destroy takes Paho's lock: call it once no callback of ours runs, i.e. the
         * connection is closed and no message is held. closing makes a held message give up
         * at once: it drops the connection, unstored and unacknowledged (the broker keeps it). */
        pthread_mutex_lock(&s->mu);
        pthread_cond_broadcast(&s->cond);
        until = cis_mono_ms() + DESTROY_WAIT_MS;
        while (!(s->nwaiting == 0 && s->paho_closed) && cis_mono_ms() < until) {
            struct timespec ts;
            cis_mono_timespec(cis_mono_ms() + 100 < until ? cis_mono_ms() + 100 : until, &ts);
            pthread_cond_timedwait(&s->cond, &s->mu, &ts);
        }
        clean = s->nwaiting == 0 && s->paho_closed;
        unbounded = s->unbounded > 0;
        pthread_mutex_unlock(&s->mu);
        if (!clean && unbounded) {
            /* A callback may block for good (no connection to drop was found and the broker
             * runs no keep-alive), and MQTTAsync_destroy would wait for it: leave everything as
             * it is. The process is exiting; the broker still holds what we did not store. */
            cis_warn("[mqtt] %s: exiting with a message held and not stored; it was not "
                     "acknowledged and arrives after the next start",
                     in->cfg->name);
            return;
        }
    }
    /* Before MQTTAsync_destroy, which frees Paho's global state with its last client. Released
     * messages still unstored: the broker sends them again after the next start. A held one
     * (not clean) belongs to its callback, which frees it. */
    size_t lost = 0;
    pthread_mutex_lock(&s->mu);
    for (struct entry **pp = &s->entries; *pp;) {
        struct entry *e = *pp;
        if (e->waiting) {
            pp = &e->next;
            continue;
        }
        *pp = e->next;
        lost += in->cfg->ack == AGENT_INPUT_ACK_ON_ARRIVAL;
        entry_free(e);
    }
    pthread_mutex_unlock(&s->mu);
    if (lost)
        cis_error("[mqtt] %s: %zu message(s) acknowledged on arrival (ack: on_arrival) could not "
                  "be stored before exit: they are lost",
                  in->cfg->name, lost);
    MQTTProperties_free(&s->connect_props);
    /* Not clean: MQTTAsync_destroy closes the connection itself, after any callback of ours
     * (bounded: see on_message) has returned. */
    if (s->client)
        MQTTAsync_destroy(&s->client);
    if (s->paho_held)
        cis_paho_release();
    for (size_t i = 0; i < s->nnoted; i++)
        free(s->noted[i]);
    if (s->wake[0] >= 0)
        close(s->wake[0]);
    if (s->wake[1] >= 0)
        close(s->wake[1]);
    pthread_cond_destroy(&s->cond);
    pthread_mutex_destroy(&s->mu);
    free(s->qoss);
    free(s->sub_opts);
    free(s->client_id);
    free(s);
}

const struct agent_input_ops agent_input_mqtt = {
    .name = "mqtt",
    .start = mqtt_start,
    .tick = mqtt_tick,
    .stop = mqtt_stop,
    .idle = mqtt_idle,
    .destroy = mqtt_destroy,
};
