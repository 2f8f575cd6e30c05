/* The device registry cache (registry.h): a mutex-protected hash table of the store's answers,
 * each trusted for at most the TTL. */
#include "registry.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include <cistern/backoff.h>
#include <cistern/err.h>
#include <cistern/log.h>

/* A flood of made-up ids must not grow the cache without bound: past this many entries the
 * expired ones go, and if none has expired, all of them (the store answers again). */
#define REGISTRY_MAX_ENTRIES 65536
#define REGISTRY_BUCKETS 8192 /* a power of two; chains of 8 at the most entries */

struct entry {
    struct entry *next;
    int64_t stamp_ms; /* cis_mono_ms() when the store query that filled it started */
    uint32_t hash;
    struct recv_device *dev; /* NULL: ID is not registered */
    char id[];               /* NUL-terminated */
};

struct recv_registry {
    const struct recv_store_ops *ops;
    struct recv_store *st;
    int64_t ttl_ms;
    pthread_mutex_t lock; /* guards everything below */
    struct entry **buckets;
    size_t count;
    int failing; /* the last store query failed: logged once until one succeeds */
};

/* FNV-1a: ids are short and not chosen to collide with a secret seed in mind; a chain that
 * grows long costs lookups, never correctness, and the table is bounded anyway. */
static uint32_t registry_hash(const char *id)
{
    uint32_t h = 2166136261u;
    for (const unsigned char *p = (const unsigned char *)id; *p; p++) {
        h ^= *p;
        h *= 16777619u;
    }
    return h;
}

/* Free E, wiping the secret it holds. Accepts NULL. */
static void entry_free(struct entry *e)
{
    if (e == NULL)
        return;
    if (e->dev != NULL) {
        explicit_bzero(e->dev, sizeof *e->dev);
        free(e->dev);
    }
    free(e);
}

/* With the lock held: the entry for ID, or NULL; *LINK is where it hangs (for unlinking). */
static struct entry *registry_find(struct recv_registry *r, const char *id, uint32_t hash,
                                   struct entry ***link)
{
    struct entry **pp = &r->buckets[hash & (REGISTRY_BUCKETS - 1)];

    for (; *pp != NULL; pp = &(*pp)->next) {
        if ((*pp)->hash == hash && strcmp((*pp)->id, id) == 0) {
            if (link != NULL)
                *link = pp;
            return *pp;
        }
    }
    return NULL;
}

/* With the lock held: drop the entries older than the TTL at NOW_MS, or every entry when
 * EVERYTHING is set. */
static void registry_prune(struct recv_registry *r, int64_t now_ms, int everything)
{
    for (size_t b = 0; b < REGISTRY_BUCKETS; b++) {
        struct entry **pp = &r->buckets[b];
        while (*pp != NULL) {
            struct entry *e = *pp;
            if (everything || now_ms - e->stamp_ms >= r->ttl_ms) {
                *pp = e->next;
                entry_free(e);
                r->count--;
            } else {
                pp = &e->next;
            }
        }
    }
}

/* With the lock held: remember the store's answer for ID (DEV, or NULL for "not registered"),
 * obtained by a query that started at STAMP_MS. An answer older than the one already cached
 * (two threads asked at once, the later query finished first) is dropped. On OOM nothing is
 * cached, which only costs a store query next time. */
static void registry_put(struct recv_registry *r, const char *id, uint32_t hash,
                         const struct recv_device *dev, int64_t stamp_ms)
{
    struct entry *e = registry_find(r, id, hash, NULL);
    struct recv_device *copy = NULL;
    size_t idlen;

    if (e != NULL && e->stamp_ms > stamp_ms)
        return;
    if (dev != NULL) {
        copy = malloc(sizeof *copy);
        if (copy == NULL)
            return;
        *copy = *dev;
    }
    if (e != NULL) {
        if (e->dev != NULL) {
            explicit_bzero(e->dev, sizeof *e->dev);
            free(e->dev);
        }
        e->dev = copy;
        e->stamp_ms = stamp_ms;
        return;
    }
    if (r->count >= REGISTRY_MAX_ENTRIES) {
        registry_prune(r, cis_mono_ms(), 0);
        if (r->count >= REGISTRY_MAX_ENTRIES) {
            cis_debug("[registry] %d ids cached, none expired: cache emptied",
                      REGISTRY_MAX_ENTRIES);
            registry_prune(r, 0, 1);
        }
    }
    idlen = strlen(id);
    e = malloc(sizeof *e + idlen + 1);
    if (e == NULL) {
        if (copy != NULL) {
            explicit_bzero(copy, sizeof *copy);
            free(copy);
        }
        return;
    }
    e->stamp_ms = stamp_ms;
    e->hash = hash;
    e->dev = copy;
    memcpy(e->id, id, idlen + 1);
    e->next = r->buckets[hash & (REGISTRY_BUCKETS - 1)];
    r->buckets[hash & (REGISTRY_BUCKETS - 1)] = e;
    r->count++;
}

int recv_registry_new(const struct recv_store_ops *ops, struct recv_store *st, int64_t ttl_ms,
                      struct recv_registry **out)
{
    struct recv_registry *r;

    *out = NULL;
    if (ops == NULL || ops->device_get == NULL || ttl_ms < 1 || ttl_ms > RECV_REGISTRY_TTL_MAX_MS)
        return CIS_EINVAL;
    r = calloc(1, sizeof *r);
    if (r == NULL)
        return CIS_ENOMEM;
    r->buckets = calloc(REGISTRY_BUCKETS, sizeof *r->buckets);
    if (r->buckets == NULL) {
        free(r);
        return CIS_ENOMEM;
    }
    r->ops = ops;
    r->st = st;
    r->ttl_ms = ttl_ms;
    pthread_mutex_init(&r->lock, NULL);
    *out = r;
    return 0;
}

void recv_registry_free(struct recv_registry *r)
{
    if (r == NULL)
        return;
    registry_prune(r, 0, 1);
    free(r->buckets);
    pthread_mutex_destroy(&r->lock);
    free(r);
}

int recv_registry_lookup(struct recv_registry *r, const char *id, struct recv_device *out)
{
    struct recv_device dev;
    struct entry *e;
    uint32_t hash;
    int64_t now;
    size_t idlen = strnlen(id, RECV_DEVICE_ID_MAX);
    int rc;

    /* No such id can be registered; not worth a query or a cache entry. */
    if (idlen == 0 || idlen == RECV_DEVICE_ID_MAX)
        return CIS_ENOTFOUND;
    hash = registry_hash(id);

    pthread_mutex_lock(&r->lock);
    now = cis_mono_ms();
    e = registry_find(r, id, hash, NULL);
    if (e != NULL && now - e->stamp_ms < r->ttl_ms) {
        rc = e->dev != NULL ? 0 : CIS_ENOTFOUND;
        if (e->dev != NULL)
            *out = *e->dev;
        pthread_mutex_unlock(&r->lock);
        return rc;
    }
    pthread_mutex_unlock(&r->lock);

    /* The query runs unlocked, so a slow store does not hold up lookups of cached ids. The
     * entry is stamped with the time the query started: its answer is at least that fresh,
     * so a revocation committed before then is applied within the TTL. */
    rc = r->ops->device_get(r->st, id, &dev);

    pthread_mutex_lock(&r->lock);
    if (rc == 0 || rc == CIS_ENOTFOUND) {
        registry_put(r, id, hash, rc == 0 ? &dev : NULL, now);
        if (r->failing)
            cis_info("[registry] the store answers device lookups again");
        r->failing = 0;
    } else {
        /* Not cached: the next lookup asks the store again. */
        if (!r->failing)
            cis_warn("[registry] the store cannot look devices up (%s); batches cannot be"
                     " verified until it can",
                     cis_strerror(rc));
        r->failing = 1;
        rc = CIS_EDB;
    }
    pthread_mutex_unlock(&r->lock);
    if (rc == 0)
        *out = dev;
    explicit_bzero(&dev, sizeof dev);
    return rc;
}
