/* Receiver per-client rate limit: one token bucket per key (a client certificate CN). */
#ifndef RECV_RATELIMIT_H
#define RECV_RATELIMIT_H

#include <stddef.h>
#include <stdint.h>

struct recv_rate;

/* A limiter that lets each key take RATE tokens per second, up to BURST at once (a new key
 * starts with a full bucket). At most MAX_KEYS keys are tracked: when the table is full, keys
 * whose bucket has refilled (idle ones) are forgotten; if none has, a new key is let through
 * untracked (the keys are authenticated identities, so their number is the fleet's size).
 * Returns 0 and *OUT (caller frees with recv_rate_destroy), or CIS_EINVAL / CIS_ENOMEM. */
int recv_rate_create(int64_t rate, int64_t burst, size_t max_keys, struct recv_rate **out);

/* Accepts NULL. */
void recv_rate_destroy(struct recv_rate *rl);

/* Take one token for KEY (borrowed, copied when new) at NOW_MS (a monotonic clock).
 * Returns 0 when taken, else the milliseconds until a token will be there (>= 1).
 * Thread-safe. */
int64_t recv_rate_take(struct recv_rate *rl, const char *key, int64_t now_ms);

/* The number of keys tracked (for tests). Thread-safe. */
size_t recv_rate_keys(struct recv_rate *rl);

#endif
