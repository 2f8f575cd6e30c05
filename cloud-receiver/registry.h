/* The device registry as the ingest sees it: lookups in the store's registry, cached in memory
 * for at most a TTL, so that a `cistern-receiver device revoke` (another process, writing the
 * same store) takes effect on a running receiver within that time. Unknown ids are cached too:
 * a flood of batches from an unregistered id costs one store query per TTL. */
#ifndef RECV_REGISTRY_H
#define RECV_REGISTRY_H

#include <stdint.h>

#include "store/store.h"

/* The default and the largest TTL: a revocation reaches running receivers within 5 s. */
#define RECV_REGISTRY_TTL_MS 2000
#define RECV_REGISTRY_TTL_MAX_MS 5000

struct recv_registry;

/* A cache over OPS/ST (borrowed; the store must outlive it) whose entries live TTL_MS
 * (1..RECV_REGISTRY_TTL_MAX_MS). Returns 0 or CIS_ENOMEM / CIS_EINVAL. */
int recv_registry_new(const struct recv_store_ops *ops, struct recv_store *st, int64_t ttl_ms,
                      struct recv_registry **out);

/* Accepts NULL. */
void recv_registry_free(struct recv_registry *r);

/* Look ID up: from the cache when its entry (found or not found) is younger than the TTL, from
 * the store otherwise. Returns 0 with OUT filled (enabled or not: the caller decides),
 * CIS_ENOTFOUND when ID is not registered, or CIS_EDB when the store cannot answer (nothing is
 * cached then). Thread-safe. */
int recv_registry_lookup(struct recv_registry *r, const char *id, struct recv_device *out);

#endif
