/* Monotonic/wall clocks and capped, jittered exponential backoff. */
#include "cistern/backoff.h"

#include <sys/random.h>
#include <time.h>

int64_t cis_mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void cis_mono_timespec(int64_t mono_ms, struct timespec *ts)
{
    ts->tv_sec = (time_t)(mono_ms / 1000);
    ts->tv_nsec = (long)(mono_ms % 1000) * 1000000L;
}

int64_t cis_wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static uint64_t xorshift(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

void cis_backoff_init(struct cis_backoff *b, int64_t initial_ms, int64_t max_ms)
{
    if (initial_ms < 1)
        initial_ms = 1;
    if (max_ms < initial_ms)
        max_ms = initial_ms;
    b->initial_ms = initial_ms;
    b->max_ms = max_ms;
    b->cur_ms = initial_ms;
    if (getrandom(&b->rng, sizeof(b->rng), GRND_NONBLOCK) != (ssize_t)sizeof(b->rng))
        b->rng = (uint64_t)cis_mono_ms() * 0x9E3779B97F4A7C15ull;
    if (b->rng == 0)
        b->rng = 0x9E3779B97F4A7C15ull;
}

int64_t cis_backoff_next(struct cis_backoff *b)
{
    int64_t cur = b->cur_ms;
    int64_t half = cur / 2;
    /* Jitter in [cur/2, cur]: many agents coming back after one outage spread out. */
    int64_t d = half + (int64_t)(xorshift(&b->rng) % (uint64_t)(cur - half + 1));
    b->cur_ms = cur > b->max_ms / 2 ? b->max_ms : cur * 2;
    return d;
}

void cis_backoff_reset(struct cis_backoff *b)
{
    b->cur_ms = b->initial_ms;
}
