/* Receiver per-client rate limit: token buckets in a chained hash table under one mutex. */
#include "ingest/ratelimit.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include <cistern/err.h>
#include <cistern/log.h>

#define NBUCKETS 1024

struct entry {
    struct entry *next;
    double tokens;
    int64_t last_ms;
    char key[];
};

struct recv_rate {
    pthread_mutex_t mu;
    double rate, burst;
    size_t max_keys, nkeys;
    int full_logged; /* "table full" was logged; reset once it has room again */
    struct entry *tab[NBUCKETS];
};

static size_t hash_key(const char *s)
{
    size_t h = 2166136261u; /* FNV-1a */

    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 16777619u;
    return h % NBUCKETS;
}

static void refill(const struct recv_rate *rl, struct entry *e, int64_t now_ms)
{
    if (now_ms > e->last_ms) {
        e->tokens += (double)(now_ms - e->last_ms) * rl->rate / 1000.0;
        if (e->tokens > rl->burst)
            e->tokens = rl->burst;
        e->last_ms = now_ms;
    }
}

/* Forget every key whose bucket is full again: it has been idle for burst/rate seconds, and a
 * new entry would start exactly where it is. Called with the mutex held. */
static void prune(struct recv_rate *rl, int64_t now_ms)
{
    for (size_t i = 0; i < NBUCKETS; i++) {
        struct entry **pp = &rl->tab[i];
        while (*pp != NULL) {
            struct entry *e = *pp;
            refill(rl, e, now_ms);
            if (e->tokens >= rl->burst) {
                *pp = e->next;
                free(e);
                rl->nkeys--;
            } else {
                pp = &e->next;
            }
        }
    }
}

int recv_rate_create(int64_t rate, int64_t burst, size_t max_keys, struct recv_rate **out)
{
    struct recv_rate *rl;

    *out = NULL;
    if (rate <= 0 || burst <= 0 || max_keys == 0)
        return CIS_EINVAL;
    rl = calloc(1, sizeof *rl);
    if (rl == NULL)
        return CIS_ENOMEM;
    if (pthread_mutex_init(&rl->mu, NULL) != 0) {
        free(rl);
        return CIS_ENOMEM;
    }
    rl->rate = (double)rate;
    rl->burst = (double)burst;
    rl->max_keys = max_keys;
    *out = rl;
    return 0;
}

void recv_rate_destroy(struct recv_rate *rl)
{
    if (rl == NULL)
        return;
    for (size_t i = 0; i < NBUCKETS; i++) {
        struct entry *e = rl->tab[i];
        while (e != NULL) {
            struct entry *next = e->next;
            free(e);
            e = next;
        }
    }
    pthread_mutex_destroy(&rl->mu);
    free(rl);
}

int64_t recv_rate_take(struct recv_rate *rl, const char *key, int64_t now_ms)
{
    size_t b = hash_key(key), klen;
    struct entry *e;
    int64_t wait = 0;

    pthread_mutex_lock(&rl->mu);
    for (e = rl->tab[b]; e != NULL; e = e->next)
        if (strcmp(e->key, key) == 0)
            break;
    if (e == NULL) {
        if (rl->nkeys >= rl->max_keys)
            prune(rl, now_ms);
        if (rl->nkeys >= rl->max_keys) {
            /* Every tracked key is busy: let this one through rather than refuse a client
             * for others' traffic. Logged once until there is room again. */
            if (!rl->full_logged)
                cis_warn("[http] rate limit table full (%zu clients sending at once): new "
                         "clients are not rate limited until some go quiet", rl->nkeys);
            rl->full_logged = 1;
            goto out;
        }
        rl->full_logged = 0;
        klen = strlen(key);
        e = malloc(sizeof *e + klen + 1);
        if (e == NULL)
            goto out; /* out of memory: not a reason to refuse the client */
        memcpy(e->key, key, klen + 1);
        e->tokens = rl->burst;
        e->last_ms = now_ms;
        e->next = rl->tab[b];
        rl->tab[b] = e;
        rl->nkeys++;
    }
    refill(rl, e, now_ms);
    if (e->tokens >= 1.0) {
        e->tokens -= 1.0;
    } else {
        wait = (int64_t)((1.0 - e->tokens) * 1000.0 / rl->rate) + 1;
        if (wait < 1)
            wait = 1;
    }
out:
    pthread_mutex_unlock(&rl->mu);
    return wait;
}

size_t recv_rate_keys(struct recv_rate *rl)
{
    size_t n;

    pthread_mutex_lock(&rl->mu);
    n = rl->nkeys;
    pthread_mutex_unlock(&rl->mu);
    return n;
}
