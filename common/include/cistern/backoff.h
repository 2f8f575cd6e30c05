/* Monotonic time and capped, jittered exponential backoff. */
#ifndef CISTERN_BACKOFF_H
#define CISTERN_BACKOFF_H

#include <stdint.h>

/* Milliseconds on CLOCK_MONOTONIC: for deadlines and backoff, never for identity. */
int64_t cis_mono_ms(void);
struct timespec;
/* The cis_mono_ms() instant MONO_MS as a timespec, for pthread_cond_timedwait on a condition
 * variable whose clock is CLOCK_MONOTONIC. */
void cis_mono_timespec(int64_t mono_ms, struct timespec *ts);
/* Milliseconds since 1970 on CLOCK_REALTIME: recorded for information only. */
int64_t cis_wall_ms(void);

struct cis_backoff {
    int64_t initial_ms; /* first delay */
    int64_t max_ms;     /* cap */
    int64_t cur_ms;     /* un-jittered delay the next call to _next() is based on */
    uint64_t rng;       /* xorshift state; seeded by _init */
};

/* Set up B with the given bounds (initial >= 1, max >= initial). */
void cis_backoff_init(struct cis_backoff *b, int64_t initial_ms, int64_t max_ms);
/* The next delay: "full jitter" in [cur/2, cur], then cur doubles up to max. */
int64_t cis_backoff_next(struct cis_backoff *b);
/* After a success: the next failure starts again from initial. */
void cis_backoff_reset(struct cis_backoff *b);

#endif
