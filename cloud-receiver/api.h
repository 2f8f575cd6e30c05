/* Receiver read side: JSON building (escape, base64, UTF-8 check) and the JSON bodies of
 * GET /v1/agents, GET /v1/agents/{id}/records, .../gaps, .../losses and the ingest answer. No HTTP
 * here, so tests can check the bytes without a network. */
#ifndef RECV_API_H
#define RECV_API_H

#include <stddef.h>
#include <stdint.h>

#include "store/store.h"

/* A growable byte buffer. On allocation failure it sets oom and ignores further appends. */
struct recv_buf {
    char *p; /* NUL-terminated when non-NULL; malloc'd, owned by the buffer */
    size_t len, cap;
    int oom;
};

/* Append bytes / a formatted string to B. */
void recv_buf_add(struct recv_buf *b, const char *s, size_t n);
void recv_buf_addf(struct recv_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Append S (N bytes) as a JSON string with quotes. Invalid UTF-8 becomes U+FFFD. */
void recv_buf_json_str(struct recv_buf *b, const char *s, size_t n);
/* Append S (N bytes) as standard base64 (with padding). */
void recv_buf_base64(struct recv_buf *b, const uint8_t *s, size_t n);
/* Take the buffer's memory (caller frees); B is left empty. NULL after oom. */
char *recv_buf_take(struct recv_buf *b, size_t *len);
void recv_buf_free(struct recv_buf *b);

/* 1 when S (N bytes) is valid UTF-8 (no overlongs, surrogates or code points > U+10FFFF). */
int recv_utf8_valid(const uint8_t *s, size_t n);

/* {"error":"MSG"} into B. */
void recv_json_error(struct recv_buf *b, const char *msg);

/* {"agents":[...]} from the store into B. Returns 0 or the store's CIS_E* code. */
int recv_api_agents(const struct recv_store_ops *ops, struct recv_store *st, struct recv_buf *b);

/* {"records":[...],"next_after":SEQ} for Q into B. Returns 0, CIS_ENOTFOUND or CIS_E*. */
int recv_api_records(const struct recv_store_ops *ops, struct recv_store *st,
                     const struct recv_records_query *q, struct recv_buf *b);

/* Parse the query parameters of GET /v1/agents/{id}/records (any may be NULL) into Q
 * (agent_id is left alone). Returns 0, or CIS_EINVAL with a reason in WHY. */
int recv_api_parse_records_query(const char *after, const char *limit, const char *epoch,
                                 struct recv_records_query *q, char *why, size_t whylen);

/* {"agent_id":ID,"epochs":[{"epoch":"E","received":N,"highest_seq":M,"gaps":[{"first_seq":a,
 * "last_seq":b,"count":n,"status":"dropped at the edge: REASON"|"not yet received",
 * "reason":"REASON"|null},...],"truncated":false},...]} for Q into B.
 * Returns 0, CIS_ENOTFOUND (unknown agent) or CIS_E*. */
int recv_api_gaps(const struct recv_store_ops *ops, struct recv_store *st,
                  const struct recv_gaps_query *q, struct recv_buf *b);

/* Parse the query parameter of GET /v1/agents/{id}/gaps (EPOCH may be NULL: every epoch) into
 * Q (agent_id is left alone). Returns 0, or CIS_EINVAL with a reason in WHY. */
int recv_api_parse_gaps_query(const char *epoch, struct recv_gaps_query *q, char *why,
                              size_t whylen);

/* {"agent_id":ID,"losses":[{"origin_epoch":"..","id":n,"reason":"..","epoch":"..",
 * "first_seq":a,"last_seq":b,"count":n,"ts_ms":t,"detail":".."|null,"received_ms":t},...]}:
 * every ledger entry of AGENT_ID in received order, into B.
 * Returns 0, CIS_ENOTFOUND (unknown agent) or CIS_E*. */
int recv_api_losses(const struct recv_store_ops *ops, struct recv_store *st, const char *agent_id,
                    struct recv_buf *b);

/* The ingest answer: {"accepted":N,"duplicates":M,"acked":[["EPOCH",first,last],...]}. */
void recv_api_ingest_answer(const struct cis_decoded_batch *b, const struct recv_put_result *r,
                            struct recv_buf *out);

#define RECV_RECORDS_LIMIT_DEFAULT 100
#define RECV_RECORDS_LIMIT_MAX 10000

#endif
