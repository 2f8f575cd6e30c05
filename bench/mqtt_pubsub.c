/* B3's do-it-yourself baseline client (bench/mqtt_bridge.py): a publisher on the "edge"
 * mosquitto and a subscriber on the "cloud" mosquitto it is bridged to.
 *
 * The subscriber runs in a child process (its own Paho instance: Paho's async library
 * serialises every client of a process on one global mutex, which would make the two ends
 * slow each other down), connects first (clean session, QoS 1 on sensors/#) and tells the
 * parent, over a pipe, once its SUBACK came. Then the publisher sends N records, one ~100-byte
 * JSON payload per message at QoS 1 (every payload is formatted before the clock starts),
 * keeping up to WINDOW messages unacknowledged: Paho's in-flight limit (maxInflight) and its
 * command queue (maxBufferedMessages) are both sized from WINDOW, so the library never
 * refuses a send. The clock (CLOCK_MONOTONIC, one clock for both processes) runs from the
 * first publish to the N-th distinct record received, counted by the record's "n" field (a
 * redelivery is counted as a duplicate, not as progress).
 *
 * Usage: mqtt_pubsub EDGE_URL CLOUD_URL N [--window W] [--mqtt 5|311] [--topic T]
 *                    [--timeout SECONDS]
 *        mqtt_pubsub --dump N [--offset O]   (print records O..O+N-1, one per line:
 *                                             bench/mqtt_bridge.py compares them with
 *                                             bench/e2e.py's payload())
 * Prints "pub: ..." and "sub: ..." detail lines, then
 * "records=N received=N dups=D seconds=S rec_per_s=R". Exits 1, saying why, when a connection
 * fails or is lost, a publish is refused, or not every record arrived before the timeout (or
 * with no progress for 120 s). */
#include <MQTTAsync.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAYLOAD_MAX 128
#define DEFAULT_WINDOW 300
#define DEFAULT_TIMEOUT_S 600
#define STALL_S 120 /* no progress at all for this long is a failure, whatever the timeout */

struct bench {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int mqtt5;
    long n;
    /* the connect/subscribe handshakes: 0 pending, 1 done, -1 failed */
    int pub_conn, sub_conn, sub_ack;
    int recv_max; /* the edge broker's Receive Maximum (MQTT 5 CONNACK), 0 if none */
    char error[256]; /* the first failure, "" while none */
    /* publisher */
    long acked, unacked;
    long wake_below; /* the main thread waits for unacked to drop below this; 0: not waiting */
    double t_acked; /* when the N-th PUBACK came */
    /* subscriber */
    unsigned char *seen; /* one byte per record n */
    long distinct, dups, foreign, received;
    double t_received; /* when the N-th distinct record came */
    int sub_done;      /* the parent: the subscriber process's final counts are in */
};

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int parse_long(const char *s, long *out)
{
    char *end;
    errno = 0;
    *out = strtol(s, &end, 10);
    return end != s && *end == '\0' && errno == 0 && *out > 0 ? 0 : -1;
}

/* The ~100-byte JSON sensor record i, as bench/e2e.py payload(), bench/feed.c and
 * bench/baseline_sqlite.c make it: keep them in sync (bench/mqtt_bridge.py checks this one
 * against e2e.py's before it runs). Returns its length. */
static int payload(char *buf, size_t cap, long i)
{
    return snprintf(buf, cap,
                    "{\"sensor\":\"s-%03ld\",\"n\":%09ld,\"temp_c\":%5.2f,\"humidity\":%4.1f,"
                    "\"pad\":\"xxxxxxxxxxxxxxxxxxxxxxxxxxxx\"}",
                    i % 64, i, 18.0 + (double)(i % 800) / 100.0, 40.0 + (double)(i % 300) / 10.0);
}

/* Record the first failure and wake the main thread. Caller holds b->mu. */
static void fail_locked(struct bench *b, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void fail_locked(struct bench *b, const char *fmt, ...)
{
    va_list ap;
    if (!b->error[0]) {
        va_start(ap, fmt);
        vsnprintf(b->error, sizeof(b->error), fmt, ap);
        va_end(ap);
    }
    pthread_cond_broadcast(&b->cv);
}

/* -- Paho callbacks (its threads): each takes the lock, updates counters, signals. ---------- */

static void set_flag(struct bench *b, int *flag, int v)
{
    pthread_mutex_lock(&b->mu);
    *flag = v;
    pthread_cond_broadcast(&b->cv);
    pthread_mutex_unlock(&b->mu);
}

static void pub_conn_ok(void *ctx, MQTTAsync_successData *d)
{
    struct bench *b = ctx;
    set_flag(b, &b->pub_conn, 1);
}

static void pub_conn_ok5(void *ctx, MQTTAsync_successData5 *d)
{
    struct bench *b = ctx;
    int rm = MQTTProperties_hasProperty(&d->properties, MQTTPROPERTY_CODE_RECEIVE_MAXIMUM)
                 ? MQTTProperties_getNumericValue(&d->properties,
                                                  MQTTPROPERTY_CODE_RECEIVE_MAXIMUM)
                 : 0;
    pthread_mutex_lock(&b->mu);
    b->recv_max = rm;
    b->pub_conn = 1;
    pthread_cond_broadcast(&b->cv);
    pthread_mutex_unlock(&b->mu);
}

static void conn_fail_common(struct bench *b, int *flag, const char *who, int code,
                             const char *msg)
{
    pthread_mutex_lock(&b->mu);
    *flag = -1;
    fail_locked(b, "%s: connect failed: %d %s", who, code, msg ? msg : "");
    pthread_mutex_unlock(&b->mu);
}

static void pub_conn_fail(void *ctx, MQTTAsync_failureData *d)
{
    struct bench *b = ctx;
    conn_fail_common(b, &b->pub_conn, "publisher", d ? d->code : 0, d ? d->message : NULL);
}

static void pub_conn_fail5(void *ctx, MQTTAsync_failureData5 *d)
{
    struct bench *b = ctx;
    conn_fail_common(b, &b->pub_conn, "publisher", d ? d->reasonCode : 0, d ? d->message : NULL);
}

static void sub_conn_ok(void *ctx, MQTTAsync_successData *d)
{
    struct bench *b = ctx;
    set_flag(b, &b->sub_conn, 1);
}

static void sub_conn_ok5(void *ctx, MQTTAsync_successData5 *d)
{
    struct bench *b = ctx;
    set_flag(b, &b->sub_conn, 1);
}

static void sub_conn_fail(void *ctx, MQTTAsync_failureData *d)
{
    struct bench *b = ctx;
    conn_fail_common(b, &b->sub_conn, "subscriber", d ? d->code : 0, d ? d->message : NULL);
}

static void sub_conn_fail5(void *ctx, MQTTAsync_failureData5 *d)
{
    struct bench *b = ctx;
    conn_fail_common(b, &b->sub_conn, "subscriber", d ? d->reasonCode : 0,
                     d ? d->message : NULL);
}

static void suback_common(struct bench *b, int granted)
{
    pthread_mutex_lock(&b->mu);
    if (granted == 1) {
        b->sub_ack = 1;
        pthread_cond_broadcast(&b->cv);
    } else {
        b->sub_ack = -1;
        fail_locked(b, "subscriber: SUBACK granted %d, not QoS 1", granted);
    }
    pthread_mutex_unlock(&b->mu);
}

static void sub_ok(void *ctx, MQTTAsync_successData *d)
{
    suback_common(ctx, d->alt.qos);
}

static void sub_ok5(void *ctx, MQTTAsync_successData5 *d)
{
    suback_common(ctx, d->reasonCode);
}

static void sub_fail(void *ctx, MQTTAsync_failureData *d)
{
    suback_common(ctx, d ? 0x80 + d->code : 0x80);
}

static void sub_fail5(void *ctx, MQTTAsync_failureData5 *d)
{
    suback_common(ctx, d ? d->reasonCode : 0x80);
}

/* A PUBACK from the edge broker (all it tells is that the edge broker holds the message). */
static void pub_done(struct bench *b, int ok, int code)
{
    pthread_mutex_lock(&b->mu);
    b->unacked--;
    if (ok) {
        if (++b->acked == b->n)
            b->t_acked = now_s();
    } else {
        fail_locked(b, "publisher: a publish failed (code %d)", code);
    }
    /* Wake the publishing thread only once half its window is free (or at the end): one
     * wake-up per PUBACK would cost the baseline more than Paho does. */
    if (b->wake_below && (b->unacked < b->wake_below || b->acked == b->n))
        pthread_cond_broadcast(&b->cv);
    pthread_mutex_unlock(&b->mu);
}

static void pub_ok(void *ctx, MQTTAsync_successData *d)
{
    pub_done(ctx, 1, 0);
}

static void pub_ok5(void *ctx, MQTTAsync_successData5 *d)
{
    pub_done(ctx, 1, 0);
}

static void pub_fail(void *ctx, MQTTAsync_failureData *d)
{
    pub_done(ctx, 0, d ? d->code : 0);
}

static void pub_fail5(void *ctx, MQTTAsync_failureData5 *d)
{
    pub_done(ctx, 0, d ? d->reasonCode : 0);
}

static void pub_lost(void *ctx, char *cause)
{
    struct bench *b = ctx;
    pthread_mutex_lock(&b->mu);
    fail_locked(b, "publisher: connection to the edge broker lost: %s", cause ? cause : "?");
    pthread_mutex_unlock(&b->mu);
}

static void sub_lost(void *ctx, char *cause)
{
    struct bench *b = ctx;
    pthread_mutex_lock(&b->mu);
    fail_locked(b, "subscriber: connection to the cloud broker lost: %s", cause ? cause : "?");
    pthread_mutex_unlock(&b->mu);
}

static int pub_message(void *ctx, char *topic, int topic_len, MQTTAsync_message *m)
{
    MQTTAsync_freeMessage(&m);
    MQTTAsync_free(topic);
    return 1;
}

/* The record number in a payload ("n":<digits>), or -1 when there is none. */
static long record_n(const char *p, size_t len)
{
    static const char key[] = "\"n\":";
    const char *k = memmem(p, len, key, sizeof(key) - 1);
    long v = 0;
    size_t i;

    if (!k)
        return -1;
    i = (size_t)(k - p) + sizeof(key) - 1;
    if (i >= len || p[i] < '0' || p[i] > '9')
        return -1;
    for (; i < len && p[i] >= '0' && p[i] <= '9'; i++) {
        if (v > 100000000000L)
            return -1;
        v = v * 10 + (p[i] - '0');
    }
    return v;
}

static int sub_message(void *ctx, char *topic, int topic_len, MQTTAsync_message *m)
{
    struct bench *b = ctx;
    long n = record_n(m->payload, (size_t)m->payloadlen);

    pthread_mutex_lock(&b->mu);
    b->received++;
    if (n < 0 || n >= b->n) {
        b->foreign++;
    } else if (b->seen[n]) {
        b->dups++;
    } else {
        b->seen[n] = 1;
        if (++b->distinct == b->n) {
            b->t_received = now_s();
            pthread_cond_broadcast(&b->cv);
        }
    }
    pthread_mutex_unlock(&b->mu);
    MQTTAsync_freeMessage(&m);
    MQTTAsync_free(topic);
    return 1;
}

/* -- main thread --------------------------------------------------------------------------- */

/* Wait on b->cv until DEADLINE (monotonic seconds). Caller holds b->mu. */
static void wait_until(struct bench *b, double deadline)
{
    struct timespec ts;
    double t = deadline < now_s() + 1.0 ? deadline : now_s() + 1.0;
    ts.tv_sec = (time_t)t;
    ts.tv_nsec = (long)((t - (double)ts.tv_sec) * 1e9);
    pthread_cond_timedwait(&b->cv, &b->mu, &ts);
}

/* Wait for *FLAG to leave 0 or for an error, up to 30 s. Returns 0 when it became 1. */
static int wait_flag(struct bench *b, int *flag, const char *what)
{
    double deadline = now_s() + 30.0;
    int rc;
    pthread_mutex_lock(&b->mu);
    while (*flag == 0 && !b->error[0] && now_s() < deadline)
        wait_until(b, deadline);
    if (*flag == 0 && !b->error[0])
        fail_locked(b, "%s: no answer after 30 s", what);
    rc = *flag == 1 && !b->error[0] ? 0 : -1;
    pthread_mutex_unlock(&b->mu);
    return rc;
}

static int client_new(struct bench *b, MQTTAsync *c, const char *url, const char *id, int window,
                      MQTTAsync_messageArrived *on_msg, MQTTAsync_connectionLost *on_lost)
{
    MQTTAsync_createOptions copt = MQTTAsync_createOptions_initializer;
    int rc;

    copt.MQTTVersion = b->mqtt5 ? MQTTVERSION_5 : MQTTVERSION_3_1_1;
    /* Paho's command queue holds every publish not yet written; our window never exceeds it,
     * so a send is never refused for want of room. */
    copt.maxBufferedMessages = window + 16;
    rc = MQTTAsync_createWithOptions(c, url, id, MQTTCLIENT_PERSISTENCE_NONE, NULL, &copt);
    if (rc != MQTTASYNC_SUCCESS) {
        fprintf(stderr, "mqtt_pubsub: cannot create a client for %s: %s\n", url,
                MQTTAsync_strerror(rc));
        return -1;
    }
    rc = MQTTAsync_setCallbacks(*c, b, on_lost, on_msg, NULL);
    if (rc != MQTTASYNC_SUCCESS) {
        fprintf(stderr, "mqtt_pubsub: cannot set callbacks: %s\n", MQTTAsync_strerror(rc));
        return -1;
    }
    return 0;
}

static int client_connect(struct bench *b, MQTTAsync c, int window, int *flag, const char *who,
                          MQTTAsync_onSuccess *ok, MQTTAsync_onFailure *fail,
                          MQTTAsync_onSuccess5 *ok5, MQTTAsync_onFailure5 *fail5)
{
    MQTTAsync_connectOptions co = MQTTAsync_connectOptions_initializer;
    MQTTAsync_connectOptions co5 = MQTTAsync_connectOptions_initializer5;
    MQTTAsync_connectOptions *o = b->mqtt5 ? &co5 : &co;
    int rc;

    o->keepAliveInterval = 60;
    o->maxInflight = window;
    o->context = b;
    if (b->mqtt5) {
        o->cleanstart = 1;
        o->onSuccess5 = ok5;
        o->onFailure5 = fail5;
    } else {
        o->cleansession = 1;
        o->onSuccess = ok;
        o->onFailure = fail;
    }
    rc = MQTTAsync_connect(c, o);
    if (rc != MQTTASYNC_SUCCESS) {
        fprintf(stderr, "mqtt_pubsub: %s: cannot start connecting: %s\n", who,
                MQTTAsync_strerror(rc));
        return -1;
    }
    return wait_flag(b, flag, who);
}

/* Disconnect cleanly (nothing is left to flush) and destroy; accepts a NULL client. */
static void client_close(MQTTAsync *c)
{
    MQTTAsync_disconnectOptions d = MQTTAsync_disconnectOptions_initializer;
    struct timespec pause = {0, 10 * 1000 * 1000};

    if (!*c)
        return;
    d.timeout = 0;
    if (MQTTAsync_isConnected(*c) && MQTTAsync_disconnect(*c, &d) == MQTTASYNC_SUCCESS) {
        /* the DISCONNECT is sent by Paho's thread: give it up to 5 s before destroy */
        for (int k = 0; k < 500 && MQTTAsync_isConnected(*c); k++)
            nanosleep(&pause, NULL);
    }
    MQTTAsync_destroy(c);
}

static void usage(void)
{
    fprintf(stderr, "usage: mqtt_pubsub EDGE_URL CLOUD_URL N [--window W] [--mqtt 5|311] "
                    "[--topic T] [--timeout SECONDS]\n"
                    "       mqtt_pubsub --dump N [--offset O]\n");
}

static void bench_init(struct bench *b)
{
    pthread_condattr_t ca;
    pthread_mutex_init(&b->mu, NULL);
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&b->cv, &ca);
    pthread_condattr_destroy(&ca);
}

/* Write all of LINE to FD; -1 when the reader is gone. */
static int write_line(int fd, const char *line)
{
    size_t len = strlen(line), done = 0;
    while (done < len) {
        ssize_t w = write(fd, line + done, len - done);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return -1;
        done += (size_t)w;
    }
    return 0;
}

/* The child: subscribe on the cloud broker, then report to the parent over FD, one line each:
 * "ready", "progress DISTINCT DUPS RECEIVED" every second, and at the end
 * "done DISTINCT DUPS RECEIVED FOREIGN T_RECEIVED" or "error WHY". Returns its exit status. */
static int subscriber(const char *url, long n, int mqtt5, int fd)
{
    struct bench b = {.mqtt5 = mqtt5, .n = n};
    MQTTAsync sub = NULL;
    MQTTAsync_responseOptions ro = MQTTAsync_responseOptions_initializer;
    char line[512];
    int rc, status = 1;

    bench_init(&b);
    b.seen = calloc((size_t)n, 1);
    if (!b.seen) {
        snprintf(b.error, sizeof(b.error), "out of memory for %ld records", n);
        goto out;
    }
    if (client_new(&b, &sub, url, "bench-sub", DEFAULT_WINDOW, sub_message, sub_lost) != 0) {
        snprintf(b.error, sizeof(b.error), "cannot create the Paho client");
        goto out;
    }
    if (client_connect(&b, sub, DEFAULT_WINDOW, &b.sub_conn, "subscriber (cloud broker)",
                       sub_conn_ok, sub_conn_fail, sub_conn_ok5, sub_conn_fail5) != 0)
        goto out;
    ro.context = &b;
    if (mqtt5) {
        ro.onSuccess5 = sub_ok5;
        ro.onFailure5 = sub_fail5;
    } else {
        ro.onSuccess = sub_ok;
        ro.onFailure = sub_fail;
    }
    rc = MQTTAsync_subscribe(sub, "sensors/#", 1, &ro);
    if (rc != MQTTASYNC_SUCCESS) {
        snprintf(b.error, sizeof(b.error), "subscriber: cannot subscribe: %s",
                 MQTTAsync_strerror(rc));
        goto out;
    }
    if (wait_flag(&b, &b.sub_ack, "subscriber SUBACK") != 0 || write_line(fd, "ready\n") != 0)
        goto out;

    pthread_mutex_lock(&b.mu);
    while (!b.error[0] && b.distinct < n) {
        double next = now_s() + 1.0;
        while (!b.error[0] && b.distinct < n && now_s() < next)
            wait_until(&b, next);
        if (b.error[0] || b.distinct >= n)
            break;
        snprintf(line, sizeof(line), "progress %ld %ld %ld\n", b.distinct, b.dups, b.received);
        pthread_mutex_unlock(&b.mu);
        rc = write_line(fd, line); /* the parent gone: stop */
        pthread_mutex_lock(&b.mu);
        if (rc != 0)
            fail_locked(&b, "the parent is gone");
    }
    if (!b.error[0]) {
        snprintf(line, sizeof(line), "done %ld %ld %ld %ld %.9f\n", b.distinct, b.dups,
                 b.received, b.foreign, b.t_received);
        status = 0;
    }
    pthread_mutex_unlock(&b.mu);
    if (status == 0 && write_line(fd, line) != 0)
        status = 1;

out:
    if (status != 0 && b.error[0]) {
        snprintf(line, sizeof(line), "error %s\n", b.error);
        write_line(fd, line);
    }
    client_close(&sub);
    free(b.seen);
    return status;
}

/* The parent's reader of the child's lines: fills B's subscriber fields, flags the child's
 * "ready" in sub_ack, its "done" in sub_done, and an error or an early EOF in error. */
struct reader {
    struct bench *b;
    int fd;
};

static void *reader_main(void *arg)
{
    struct reader *r = arg;
    struct bench *b = r->b;
    char buf[1024];
    size_t used = 0;
    int finished = 0;

    while (!finished) {
        ssize_t got = read(r->fd, buf + used, sizeof(buf) - 1 - used);
        char *nl;
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0)
            break;
        used += (size_t)got;
        buf[used] = '\0';
        while (!finished && (nl = strchr(buf, '\n')) != NULL) {
            long d, du, rc, fo;
            double t;
            *nl = '\0';
            pthread_mutex_lock(&b->mu);
            if (strcmp(buf, "ready") == 0) {
                b->sub_ack = 1;
            } else if (sscanf(buf, "progress %ld %ld %ld", &d, &du, &rc) == 3) {
                b->distinct = d;
                b->dups = du;
                b->received = rc;
            } else if (sscanf(buf, "done %ld %ld %ld %ld %lf", &d, &du, &rc, &fo, &t) == 5) {
                b->distinct = d;
                b->dups = du;
                b->received = rc;
                b->foreign = fo;
                b->t_received = t;
                b->sub_done = 1;
                finished = 1;
            } else if (strncmp(buf, "error ", 6) == 0) {
                fail_locked(b, "%s", buf + 6);
                finished = 1;
            } else {
                fail_locked(b, "subscriber process: unexpected line \"%.100s\"", buf);
                finished = 1;
            }
            pthread_cond_broadcast(&b->cv);
            pthread_mutex_unlock(&b->mu);
            used -= (size_t)(nl + 1 - buf);
            memmove(buf, nl + 1, used + 1);
        }
        if (used >= sizeof(buf) - 1)
            used = 0; /* a line this long is not ours: drop it */
    }
    if (!finished) {
        pthread_mutex_lock(&b->mu);
        fail_locked(b, "the subscriber process ended without a result");
        pthread_mutex_unlock(&b->mu);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    struct bench b = {.mqtt5 = 1};
    MQTTAsync pub = NULL;
    const char *topic = "sensors/bench";
    long window = DEFAULT_WINDOW, timeout = DEFAULT_TIMEOUT_S, i, sent = 0;
    char *buf = NULL, tmp[PAYLOAD_MAX];
    int *len = NULL, rc, exit_code = 1, fds[2] = {-1, -1}, reader_started = 0;
    size_t *off = NULL, total = 0;
    double t0 = 0, deadline, last_progress;
    long last_seen = -1;
    pid_t child = -1;
    pthread_t reader_thread;
    struct reader rd;

    if (argc >= 3 && strcmp(argv[1], "--dump") == 0) {
        long count, first = 0;
        if (parse_long(argv[2], &count) != 0 ||
            (argc == 5 && (strcmp(argv[3], "--offset") != 0 ||
                           (strcmp(argv[4], "0") != 0 && parse_long(argv[4], &first) != 0))) ||
            (argc != 3 && argc != 5)) {
            usage();
            return 2;
        }
        for (i = first; i < first + count; i++) {
            payload(tmp, sizeof(tmp), i);
            printf("%s\n", tmp);
        }
        return 0;
    }
    if (argc < 4 || parse_long(argv[3], &b.n) != 0) {
        usage();
        return 2;
    }
    for (int a = 4; a < argc; a += 2) {
        if (a + 1 >= argc) {
            usage();
            return 2;
        }
        if (strcmp(argv[a], "--window") == 0 && parse_long(argv[a + 1], &window) == 0 &&
            window <= 65535) {
            continue;
        } else if (strcmp(argv[a], "--timeout") == 0 && parse_long(argv[a + 1], &timeout) == 0) {
            continue;
        } else if (strcmp(argv[a], "--topic") == 0) {
            topic = argv[a + 1];
        } else if (strcmp(argv[a], "--mqtt") == 0 &&
                   (strcmp(argv[a + 1], "5") == 0 || strcmp(argv[a + 1], "311") == 0)) {
            b.mqtt5 = strcmp(argv[a + 1], "5") == 0;
        } else {
            usage();
            return 2;
        }
    }
    /* a subscriber whose parent is gone fails its write (EPIPE) rather than dies of it */
    signal(SIGPIPE, SIG_IGN);
    fflush(stdout);
    if (pipe(fds) != 0) {
        perror("mqtt_pubsub: pipe");
        return 1;
    }
    /* Fork before any Paho call: the child gets no copy of Paho's threads or state. */
    child = fork();
    if (child < 0) {
        perror("mqtt_pubsub: fork");
        return 1;
    }
    if (child == 0) {
        close(fds[0]);
        prctl(PR_SET_PDEATHSIG, SIGTERM); /* never outlive the parent */
        _exit(subscriber(argv[2], b.n, b.mqtt5, fds[1]));
    }
    close(fds[1]);
    fds[1] = -1;

    bench_init(&b);
    rd.b = &b;
    rd.fd = fds[0];
    if (pthread_create(&reader_thread, NULL, reader_main, &rd) != 0) {
        fprintf(stderr, "mqtt_pubsub: cannot start a thread\n");
        goto out;
    }
    reader_started = 1;

    /* Every payload exists before the clock starts: the timed part is MQTT alone. */
    off = malloc((size_t)b.n * sizeof(*off));
    len = malloc((size_t)b.n * sizeof(*len));
    buf = malloc((size_t)b.n * PAYLOAD_MAX);
    if (!off || !len || !buf) {
        fprintf(stderr, "mqtt_pubsub: out of memory for %ld records\n", b.n);
        goto out;
    }
    for (i = 0; i < b.n; i++) {
        off[i] = total;
        len[i] = payload(buf + total, PAYLOAD_MAX, i);
        total += (size_t)len[i];
    }

    if (wait_flag(&b, &b.sub_ack, "the subscriber process's SUBACK") != 0) {
        pthread_mutex_lock(&b.mu);
        fprintf(stderr, "mqtt_pubsub: %s\n", b.error);
        pthread_mutex_unlock(&b.mu);
        goto out;
    }
    if (client_new(&b, &pub, argv[1], "bench-pub", (int)window, pub_message, pub_lost) != 0)
        goto out;
    if (client_connect(&b, pub, (int)window, &b.pub_conn, "publisher (edge broker)", pub_conn_ok,
                       pub_conn_fail, pub_conn_ok5, pub_conn_fail5) != 0) {
        pthread_mutex_lock(&b.mu);
        fprintf(stderr, "mqtt_pubsub: %s\n", b.error);
        pthread_mutex_unlock(&b.mu);
        goto out;
    }

    t0 = now_s();
    deadline = t0 + (double)timeout;
    last_progress = t0;
    pthread_mutex_lock(&b.mu);
    while (!b.error[0] && (sent < b.n || !b.sub_done || b.acked < b.n)) {
        double t = now_s();
        if (b.distinct + b.acked != last_seen) {
            last_seen = b.distinct + b.acked;
            last_progress = t;
        }
        if (t >= deadline || t - last_progress >= STALL_S) {
            fail_locked(&b, "%s: %ld of %ld records received, %ld of %ld sent, %ld PUBACKs",
                        t >= deadline ? "timed out" : "no progress for 120 s", b.distinct, b.n,
                        sent, b.n, b.acked);
            break;
        }
        if (sent < b.n && b.unacked < window) {
            MQTTAsync_responseOptions ro = MQTTAsync_responseOptions_initializer;
            MQTTAsync_message msg = MQTTAsync_message_initializer;
            ro.context = &b;
            if (b.mqtt5) {
                ro.onSuccess5 = pub_ok5;
                ro.onFailure5 = pub_fail5;
            } else {
                ro.onSuccess = pub_ok;
                ro.onFailure = pub_fail;
            }
            msg.payload = buf + off[sent];
            msg.payloadlen = len[sent];
            msg.qos = 1;
            b.unacked++;
            /* Paho copies the payload and may call back at once: not under our lock. */
            pthread_mutex_unlock(&b.mu);
            rc = MQTTAsync_sendMessage(pub, topic, &msg, &ro);
            pthread_mutex_lock(&b.mu);
            if (rc != MQTTASYNC_SUCCESS) {
                b.unacked--;
                fail_locked(&b, "publisher: send of record %ld refused: %s", sent,
                            MQTTAsync_strerror(rc));
                break;
            }
            sent++;
            continue;
        }
        b.wake_below = sent < b.n ? (window + 1) / 2 : 1;
        wait_until(&b, deadline);
        b.wake_below = 0;
    }
    if (b.error[0]) {
        fprintf(stderr, "mqtt_pubsub: %s (%ld of %ld received, %ld sent, %ld PUBACKs)\n",
                b.error, b.distinct, b.n, sent, b.acked);
        pthread_mutex_unlock(&b.mu);
        goto out;
    }
    {
        double secs = b.t_received - t0;
        char rm[16] = "none";
        if (b.recv_max > 0)
            snprintf(rm, sizeof(rm), "%d", b.recv_max);
        printf("pub: mqtt=%s window=%ld edge_receive_maximum=%s pubacks=%ld puback_seconds=%.3f "
               "puback_rec_per_s=%.0f\n",
               b.mqtt5 ? "5" : "3.1.1", window, rm, b.acked, b.t_acked - t0,
               (double)b.n / (b.t_acked - t0));
        printf("sub: received=%ld distinct=%ld dups=%ld foreign=%ld\n", b.received, b.distinct,
               b.dups, b.foreign);
        printf("records=%ld received=%ld dups=%ld seconds=%.3f rec_per_s=%.0f\n", b.n,
               b.distinct, b.dups, secs, (double)b.n / secs);
        exit_code = b.foreign ? 1 : 0;
        if (b.foreign)
            fprintf(stderr, "mqtt_pubsub: %ld messages on sensors/# were not our records\n",
                    b.foreign);
    }
    pthread_mutex_unlock(&b.mu);

out:
    client_close(&pub);
    if (child > 0) {
        int st;
        if (exit_code != 0)
            kill(child, SIGTERM);
        while (waitpid(child, &st, 0) < 0 && errno == EINTR)
            ;
        if (exit_code == 0 && !(WIFEXITED(st) && WEXITSTATUS(st) == 0)) {
            fprintf(stderr, "mqtt_pubsub: the subscriber process failed (status %d)\n", st);
            exit_code = 1;
        }
    }
    if (reader_started)
        pthread_join(reader_thread, NULL); /* EOF once the child is gone */
    if (fds[0] >= 0)
        close(fds[0]);
    pthread_cond_destroy(&b.cv);
    pthread_mutex_destroy(&b.mu);
    free(off);
    free(len);
    free(buf);
    fflush(stdout);
    return exit_code;
}
