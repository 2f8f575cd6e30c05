/* Receiver MQTT ingest (Paho MQTT C async, MQTT 5): a persistent session on a shared
 * subscription $share/<group>/<prefix>/+/batch, each batch stored through the shared ingest and
 * answered on its Response Topic only after the store committed (docs/protocol.md, "MQTT"). */
#ifndef RECV_MQTT_H
#define RECV_MQTT_H

#include <stddef.h>
#include <stdint.h>

#include "api.h"
#include "ingest/ingest.h"
#include "recv_config.h"
#include "store/store.h"

struct recv_mqtt;

/* Counters since start, for the logs. */
struct recv_mqtt_stats {
    uint64_t batches;    /* batch messages handled */
    uint64_t accepted;   /* records newly stored */
    uint64_t duplicates; /* records that were already stored */
    uint64_t rejected;   /* batches refused (answered "rejected" when possible) */
    uint64_t retry;      /* batches the store could not take, or from a device that may not
                          * deliver now (answered "retry") */
    uint64_t unanswered; /* batches without a usable Response Topic: no ack could be sent */
};

/* Start MQTT ingest as CFG's mqtt.* keys say (mqtt.url must be set), storing through OPS/ST
 * after the device registry REG has said yes (borrowed: all must outlive it; the store must be
 * thread-safe). The strings of CFG are
 * copied. Checks that the TLS files can be read, creates the Paho client and one thread that
 * connects, subscribes, reconnects with capped, jittered backoff, and stores and answers the
 * batches Paho hands over. It does not wait for the broker: a receiver may start before its
 * broker, and says so in the log. On success *OUT is the ingest (release with recv_mqtt_stop).
 * Returns 0, or CIS_E* with a reason in ERR. */
int recv_mqtt_start(const struct recv_config *cfg, const struct recv_store_ops *ops,
                    struct recv_store *st, struct recv_registry *reg, struct recv_mqtt **out,
                    char *err, size_t errlen);

/* Stop: no more reconnects or batches (those received but not yet stored are dropped: their
 * agents send them again), disconnect from the broker (the session and the batches queued in it
 * stay there for the next start), log the counters, free everything. Accepts NULL. */
void recv_mqtt_stop(struct recv_mqtt *m);

/* A snapshot of the counters. */
void recv_mqtt_get_stats(struct recv_mqtt *m, struct recv_mqtt_stats *out);

/* ---- the pure parts, exposed for tests ---- */

/* The agent id in TOPIC (LEN bytes, not NUL-terminated) when it is PREFIX/<agent_id>/batch
 * with a non-empty agent id holding no '/', '+', '#' or NUL; copied into AGENT (NUL-terminated).
 * Returns 0, or -1 when the topic does not parse or the id does not fit AGENTLEN. */
int recv_mqtt_topic_agent(const char *prefix, const char *topic, size_t len, char *agent,
                          size_t agentlen);

/* The ack payload for an ingest outcome STATUS (enum recv_ingest_status) into OUT:
 * {"status":"ok","accepted":N,"duplicates":M,"acked":[...]} from RES's answer when ok,
 * {"status":"rejected","error":WHY} or {"status":"retry","error":WHY} otherwise. */
void recv_mqtt_ack_json(int status, const struct recv_ingest_result *res, const char *why,
                        struct recv_buf *out);

/* What recv_mqtt_handle() made of one batch message. */
struct recv_mqtt_outcome {
    int status;                        /* enum recv_ingest_status */
    char agent[RECV_INGEST_AGENT_MAX]; /* the topic's agent id; "" when the topic does not parse */
    char why[600];                     /* the reason for a rejection or a retry, "" when ok */
    struct recv_ingest_result res;     /* the ingest's (zeroed when it did not run) */
    struct recv_buf ack;               /* the ack payload, recv_mqtt_ack_json(); oom flag when
                                        * it could not be built */
};

/* One batch message, without Paho: the agent id from TOPIC (TOPIC_LEN bytes, not
 * NUL-terminated) under PREFIX, the Content Type property CONTENT_TYPE (CT_LEN bytes; NULL when
 * the message has none) checked, then the shared ingest with the topic's agent id as the
 * identity (decode, check, store), and the ack payload built. PAYLOAD (LEN bytes) is borrowed.
 * OUT is always initialised; release it with recv_mqtt_outcome_free(). Whether the ack can be
 * sent (the Response Topic) is the caller's business. Thread-safe when CTX's store is.
 * Returns OUT->status (enum recv_ingest_status). */
int recv_mqtt_handle(const struct recv_ingest_ctx *ctx, const char *prefix, const char *topic,
                     size_t topic_len, const char *content_type, size_t ct_len,
                     const uint8_t *payload, size_t len, struct recv_mqtt_outcome *out);

/* Free what recv_mqtt_handle() left in O. Accepts NULL and a zeroed outcome. */
void recv_mqtt_outcome_free(struct recv_mqtt_outcome *o);

#endif
