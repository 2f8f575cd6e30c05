/* The agent's event loop, ingest queue and plugin interfaces (inputs, transports).
 * Everything runs on one thread: the loop owns the spool's only connection, so no SQLite
 * write ever happens on a network callback thread. */
#ifndef AGENT_H
#define AGENT_H

#include <poll.h>
#include <stddef.h>
#include <stdio.h>
#include <stdint.h>

#include "agent_config.h"
#include "cistern/codec.h"

struct agent;
struct agent_spool;

/* ---- event loop ---- */

typedef void (*agent_fd_cb)(void *ctx, int fd, short revents);

/* Watch FD for EVENTS (POLLIN/POLLOUT); CB runs on the loop thread. One watch per fd;
 * watching an fd again replaces its events, callback and context. */
int agent_loop_watch(struct agent *a, int fd, short events, agent_fd_cb cb, void *ctx);
void agent_loop_unwatch(struct agent *a, int fd);

/* ---- ingest: records from inputs, group-committed to the spool ---- */

/* Called on the loop thread once the record's spool transaction has committed (STATUS 0, SEQ
 * its seq) or failed (STATUS a CIS_E* code, nothing stored). It must not submit records. */
typedef void (*agent_ack_cb)(void *ctx, uint64_t token, int status, uint64_t seq);

/* Queue one record for the next group commit. The payload is copied. ACK (may be NULL) is
 * called exactly once for the record. Returns 0, or CIS_ENOMEM. */
int agent_ingest_submit(struct agent *a, const struct agent_input_cfg *src, const uint8_t *payload,
                        size_t len, agent_ack_cb ack, void *ctx, uint64_t token);

/* Commit what is queued at the next loop turn instead of waiting for commit_interval: for a
 * source that cannot send more until it has its answer (the mqtt input). Loop thread only,
 * like every agent_* call: other threads (Paho's) hand work over through a pipe they
 * watch with agent_loop_watch(). */
void agent_ingest_commit_soon(struct agent *a);

/* The same, with the record's stream given (e.g. the MQTT topic it came on) instead of the
 * input's name. STREAM is copied. */
int agent_ingest_submit_stream(struct agent *a, const struct agent_input_cfg *src,
                               const char *stream, const uint8_t *payload, size_t len,
                               agent_ack_cb ack, void *ctx, uint64_t token);

/* True while the ingest queue is over its bound: inputs stop reading until it drains. */
int agent_ingest_full(const struct agent *a);

/* ---- inputs ---- */

struct agent_input {
    const struct agent_input_ops *ops;
    const struct agent_input_cfg *cfg; /* borrowed from the config */
    struct agent *agent;
    void *priv;
};

struct agent_input_ops {
    const char *name;
    /* Open listeners etc. and register fds with the loop. */
    int (*start)(struct agent_input *in);
    /* Called every loop iteration; returns the next monotonic deadline (ms) it wants a call
     * at, or -1. */
    int64_t (*tick)(struct agent_input *in, int64_t now);
    /* Stop taking new records (close listeners, stop reading); answers still owed are sent. */
    void (*stop)(struct agent_input *in);
    /* 1 when nothing is owed to sources any more (all answers written). */
    int (*idle)(struct agent_input *in);
    void (*destroy)(struct agent_input *in);
};

extern const struct agent_input_ops agent_input_socket;
extern const struct agent_input_ops agent_input_demo;
/* Subscribes on a local broker; a message is acknowledged (PUBACK) only after its record's
 * spool commit. */
extern const struct agent_input_ops agent_input_mqtt;

/* ---- transports ---- */

/* The result of one send. */
struct agent_send_result {
    int status;          /* 0 delivered (2xx); CIS_EAGAIN retry; CIS_EINVAL rejected for good */
    long code;           /* HTTP status, 0 on network error */
    int64_t retry_after_ms; /* from Retry-After, or 0 */
    char reason[256];    /* receiver's or transport's words */
};

typedef void (*agent_sent_cb)(void *ctx, uint64_t token, const struct agent_send_result *r);

struct agent_transport_ops {
    const char *name;
    int (*create)(struct agent *a, const struct agent_config *cfg, agent_sent_cb cb, void *ctx,
                  void **out);
    /* Send BODY (takes ownership; freed by the transport). CB is called once, later, on the
     * loop thread, with TOKEN. */
    int (*send)(void *t, uint8_t *body, size_t len, uint64_t token);
    /* Called every loop iteration; returns the next monotonic deadline it wants, or -1. */
    int64_t (*tick)(void *t, int64_t now);
    /* Abort every send still running (each gets its callback with CIS_EAGAIN). */
    void (*abort_all)(void *t);
    void (*destroy)(void *t);
};

/* The earlier of two deadlines as tick() returns them (monotonic ms, -1 for none). */
static inline int64_t agent_deadline_min(int64_t a, int64_t b)
{
    if (a < 0)
        return b;
    if (b < 0)
        return a;
    return a < b ? a : b;
}

extern const struct agent_transport_ops agent_transport_https;
/* MQTT v5 through a broker: result on the receiver's end-to-end ack (or PUBACK with
 * forward.mqtt.ack: broker). */
extern const struct agent_transport_ops agent_transport_mqtt;

/* ---- forwarder ---- */

struct agent_forwarder;

int agent_forwarder_create(struct agent *a, const struct agent_config *cfg,
                           struct agent_spool *spool, struct agent_forwarder **out);
/* Start sends that are due; returns the next monotonic deadline (ms) or -1. With DRAINING
 * (shutdown), everything committed is due at once, until the receiver fails. */
int64_t agent_forwarder_tick(struct agent_forwarder *f, int64_t now, int draining);
/* New records were committed to the spool. */
void agent_forwarder_notify(struct agent_forwarder *f, int64_t now);
size_t agent_forwarder_in_flight(const struct agent_forwarder *f);
/* 1 when nothing is in flight and there is nothing more to send now: the spool is empty, or
 * the receiver is failing. Used to end a shutdown early. */
int agent_forwarder_idle(const struct agent_forwarder *f);
/* Abort sends still in flight (their segments return to pending). */
void agent_forwarder_abort(struct agent_forwarder *f);
void agent_forwarder_destroy(struct agent_forwarder *f);

/* Replace the spool after a runtime recovery (agent_spool_recover()); every send must have been
 * aborted first (agent_forwarder_abort()). */
void agent_forwarder_set_spool(struct agent_forwarder *f, struct agent_spool *spool);

/* The uplink as the forwarder last saw it, for `status`. */
enum agent_link_state { AGENT_LINK_UNKNOWN = 0, AGENT_LINK_UP = 1, AGENT_LINK_DOWN = 2 };

struct agent_link {
    int state;                    /* enum agent_link_state: UNKNOWN until the first answer */
    char last_error[256];         /* the last failed attempt's words; "" if none since start */
    int64_t last_error_wall_ms;   /* 0: none since start */
    int64_t last_success_wall_ms; /* last 2xx; 0: none since start */
    uint64_t consecutive_failures;
    size_t in_flight;             /* batches being sent now */
};

void agent_forwarder_link(const struct agent_forwarder *f, struct agent_link *out);

/* ---- spool health, reported by whoever called the spool ---- */

/* A spool call returned RC. CIS_ECORRUPT makes the loop quarantine the spool and open a fresh
 * one at its next turn (agent_spool_recover()); other codes are ignored here. */
void agent_spool_failed(struct agent *a, int rc);

/* ---- status: the control socket the agent serves, and the command that reads it ---- */

/* Listen on the Unix socket PATH (mode 0660, a stale socket file is replaced); each connection
 * gets one JSON object (agent_status_json) and is closed. Returns 0 or CIS_EIO (logged once;
 * the agent runs on without it). */
struct agent_control;
int agent_control_start(struct agent *a, const char *path, struct agent_control **out);
void agent_control_stop(struct agent_control *c);

/* What the running agent knows beyond the spool file, for the control socket. */
struct agent_runtime {
    const char *agent_id;
    int64_t started_wall_ms;
    struct agent_link link;
    struct agent_counters *counters;
    int spool_full;   /* last commit failed: max_size reached (reject_new) */
    int disk_full;    /* last commit failed: no space left on the device */
};
void agent_runtime(struct agent *a, struct agent_runtime *out);

/* Write S as a JSON string (quoted; control characters escaped, invalid UTF-8 replaced by
 * U+FFFD); NULL is written as null. Shared by the control socket and `status --json`. */
void agent_json_str(FILE *f, const char *s);

/* `cistern-agent status [-c FILE] [--json] [--watch] [--interval DUR]`: ARGV[0] is "status".
 * Returns the process exit status. */
int agent_status_main(int argc, char **argv);

struct agent_counters {
    uint64_t produced;  /* records taken from inputs */
    uint64_t spooled;   /* records committed to the spool */
    uint64_t delivered; /* records acknowledged by the receiver */
    uint64_t rejected;  /* records ledgered as rejected */
    uint64_t refused;   /* records answered ERR (invalid, or could not be committed) */
};

struct agent_counters *agent_counters(struct agent *a);

#endif
