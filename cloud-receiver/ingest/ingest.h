/* Receiver batch ingest shared by every transport (HTTP, MQTT): decode the signed envelope,
 * match its agent id against the sender's identity and the device registry, verify the
 * signature, then decode the batch within the limits, store it in one transaction and build the
 * answer. No network here, so tests can drive it directly. */
#ifndef RECV_INGEST_H
#define RECV_INGEST_H

#include <stddef.h>
#include <stdint.h>

#include <cistern/codec.h>

#include "api.h"
#include "registry.h"
#include "store/store.h"

/* What became of one batch. */
enum recv_ingest_status {
    RECV_INGEST_OK = 0,       /* the store committed it; the answer is in the result */
    RECV_INGEST_REJECTED = 1, /* the sender's fault, nothing stored: it must not be sent again */
    RECV_INGEST_RETRY = 2,    /* the store failed or is busy, nothing committed: send it later */
    RECV_INGEST_UNAUTHORIZED = 3, /* the agent may not deliver now: not registered, revoked, or
                                   * signing with a key the registry does not hold. Nothing
                                   * stored; the batch is fine, the agent keeps it and retries
                                   * (HTTP 401, MQTT "retry") until the operator acts */
};

/* Why a batch was rejected (transports map it to their own answer, e.g. an HTTP status). */
enum recv_ingest_reject {
    RECV_REJECT_NONE = 0,
    RECV_REJECT_MALFORMED, /* not a valid batch (HTTP 400) */
    RECV_REJECT_TOO_BIG,   /* over a size or record limit (HTTP 413) */
    RECV_REJECT_IDENTITY,  /* its agent id is not the sender's identity (HTTP 403) */
    RECV_REJECT_SIGNATURE, /* its signature does not verify: changed after signing (HTTP 400) */
};

/* Everything a transport hands the ingest; borrowed, shared by all threads (read-only). */
struct recv_ingest_ctx {
    const struct recv_store_ops *ops;
    struct recv_store *st;         /* thread-safe store */
    struct recv_registry *reg;     /* the device registry (thread-safe cache over ST) */
    uint64_t max_body;             /* largest batch in bytes; 0: the transport enforces it */
    struct cis_decode_limits limits;
    const char *identity_name;     /* the identity in messages: "certificate CN", "topic" */
};

#define RECV_INGEST_AGENT_MAX 256

struct recv_ingest_result {
    enum recv_ingest_reject reject; /* RECV_REJECT_NONE unless rejected */
    int code;                       /* the CIS_E* behind a rejection or a retry, 0 when ok */
    char agent_id[RECV_INGEST_AGENT_MAX]; /* the batch's agent id once decoded ("" before),
                                           * truncated: for logs */
    uint64_t epoch;                 /* the batch's epoch once decoded */
    uint64_t accepted, duplicates;  /* records, when ok */
    int replay;                     /* when ok: the batch had records and none was new */
    struct recv_buf answer;         /* when ok: {"accepted":N,"duplicates":M,"acked":[...]};
                                     * owned by the result (recv_ingest_result_free) */
};

/* Ingest one signed batch: BODY (LEN bytes, borrowed) is decoded as a SignedBatch, its agent
 * id compared with IDENTITY (NULL: no identity to match, e.g. plain HTTP behind a proxy: the
 * signature alone then says who sent it), looked up in the registry (unknown or revoked:
 * RECV_INGEST_UNAUTHORIZED), its signature verified with the registered key or secret, and only
 * then the inner batch decoded within CTX's limits, checked (recv_batch_check, and its agent id
 * must be the envelope's), and stored in one transaction. On success RES->answer holds the
 * JSON answer listing the committed ranges. RES is always initialised by this function and the
 * caller releases it with recv_ingest_result_free(). WHY receives the reason for a rejection or
 * a retry (meant for the sender). Thread-safe when CTX's store is.
 * Returns a enum recv_ingest_status. */
int recv_ingest_batch(const struct recv_ingest_ctx *ctx, const uint8_t *body, size_t len,
                      const char *identity, struct recv_ingest_result *res, char *why,
                      size_t whylen);

/* Free what recv_ingest_batch() left in RES. Accepts NULL and a zeroed result. */
void recv_ingest_result_free(struct recv_ingest_result *res);

/* 1 when a refusal of WHO for WHY is due in the log: once per (WHO, WHY) every 10 minutes. A
 * gateway retries every few seconds; its operator needs the first line, not a flood.
 * Thread-safe. */
int recv_log_due(const char *who, const char *why);

/* Log WHY, the refusal of a device (unregistered, revoked, another key, a bad signature), as a
 * warning once per reason every 10 minutes, at debug level in between. */
void recv_ingest_log_refusal(const char *why);

#endif
