/* Receiver HTTP(S) ingest and read API on libmicrohttpd: mTLS client identity, routing,
 * POST /v1/batches, and the GET routes. */
#ifndef RECV_HTTP_H
#define RECV_HTTP_H

#include <stddef.h>
#include <stdint.h>

#include "api.h"
#include "ingest/ingest.h"
#include "recv_config.h"
#include "store/store.h"

struct recv_http;

/* Start the listeners CFG names (listen.http, and listen.api when set), serving from the
 * store OPS/ST with the device registry REG (borrowed: all must outlive the server). TLS key, certificate and client CA
 * are read into memory here. On success *OUT is the server and the bound addresses are
 * logged ("[http] listening on HOST:PORT"). Returns 0, or CIS_E* with a reason in ERR. */
int recv_http_start(const struct recv_config *cfg, const struct recv_store_ops *ops,
                    struct recv_store *st, struct recv_registry *reg, struct recv_http **out,
                    char *err, size_t errlen);

/* The bound address of the ingest listener ("127.0.0.1:8443", "[::1]:8443"); borrowed. */
const char *recv_http_address(const struct recv_http *h);
/* The bound address of the API listener, or NULL when there is none; borrowed. */
const char *recv_http_api_address(const struct recv_http *h);

/* Stop accepting, let requests in progress finish (up to GRACE_MS), then stop and free.
 * Accepts NULL. */
void recv_http_stop(struct recv_http *h, int grace_ms);

/* POST /v1/batches once its body is in, without the network: the Content-Type check (415), the
 * size check against CTX's max_body (413), then recv_ingest_batch() (decode, check, IDENTITY,
 * NULL on plain HTTP, against the batch's agent id, store) and the status that says what became
 * of it: 200, 400, 403, 413, or 503 (the caller adds "Retry-After: 5"). CONTENT_TYPE may be NULL
 * (no header); BODY (LEN bytes) is borrowed. ANSWER receives the JSON body to send (the ingest
 * answer, or {"error":...}); caller frees it with recv_buf_free (its oom flag set: none could be
 * built). Thread-safe when CTX's store is. Returns the HTTP status. */
int recv_http_batch(const struct recv_ingest_ctx *ctx, const char *content_type,
                    const uint8_t *body, size_t len, const char *identity, struct recv_buf *answer);

#endif
