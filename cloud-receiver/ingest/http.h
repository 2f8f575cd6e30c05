/* Receiver HTTP(S) ingest and read API on libmicrohttpd: mTLS client identity, routing,
 * POST /v1/batches, and the GET routes. */
#ifndef RECV_HTTP_H
#define RECV_HTTP_H

#include <stddef.h>

#include "recv_config.h"
#include "store/store.h"

struct recv_http;

/* Start the listeners CFG names (listen.http, and listen.api when set), serving from the
 * store OPS/ST (borrowed: both must outlive the server). TLS key, certificate and client CA
 * are read into memory here. On success *OUT is the server and the bound addresses are
 * logged ("[http] listening on HOST:PORT"). Returns 0, or CIS_E* with a reason in ERR. */
int recv_http_start(const struct recv_config *cfg, const struct recv_store_ops *ops,
                    struct recv_store *st, struct recv_http **out, char *err, size_t errlen);

/* The bound address of the ingest listener ("127.0.0.1:8443", "[::1]:8443"); borrowed. */
const char *recv_http_address(const struct recv_http *h);
/* The bound address of the API listener, or NULL when there is none; borrowed. */
const char *recv_http_api_address(const struct recv_http *h);

/* Stop accepting, let requests in progress finish (up to GRACE_MS), then stop and free.
 * Accepts NULL. */
void recv_http_stop(struct recv_http *h, int grace_ms);

#endif
