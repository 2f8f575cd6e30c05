/* Unit tests for the receiver's device registry cache (registry.c) over the SQLite store. */
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include <cistern/backoff.h>
#include <cistern/err.h>

#include "registry.h"
#include "store/store.h"

struct fixture {
    char dir[64];
    char path[128];
    struct recv_store *st;  /* what the registry reads */
    struct recv_store *st2; /* a second handle on the same file: another process's changes */
};

static int setup(void **state)
{
    struct fixture *f = calloc(1, sizeof *f);
    struct recv_store_opts o = {0};
    char err[256];

    assert_non_null(f);
    snprintf(f->dir, sizeof f->dir, "/tmp/test_recv_registry.XXXXXX");
    assert_non_null(mkdtemp(f->dir));
    snprintf(f->path, sizeof f->path, "%s/store.db", f->dir);
    o.path = f->path;
    o.busy_timeout_ms = 5000;
    assert_int_equal(recv_store_sqlite.open(&o, &f->st, err, sizeof err), 0);
    assert_int_equal(recv_store_sqlite.open(&o, &f->st2, err, sizeof err), 0);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    struct fixture *f = *state;
    char p[200];

    recv_store_sqlite.close(f->st);
    recv_store_sqlite.close(f->st2);
    unlink(f->path);
    snprintf(p, sizeof p, "%s-wal", f->path);
    unlink(p);
    snprintf(p, sizeof p, "%s-shm", f->path);
    unlink(p);
    assert_int_equal(rmdir(f->dir), 0);
    free(f);
    return 0;
}

static void sleep_ms(long ms)
{
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0)
        ;
}

/* Register ID through handle ST with fingerprint byte FB (0: no key) and ENABLED. */
static void add(struct recv_store *st, const char *id, uint8_t fb, int enabled, int replace)
{
    struct recv_device d;

    memset(&d, 0, sizeof d);
    snprintf(d.id, sizeof d.id, "%s", id);
    if (fb) {
        d.has_fpr = 1;
        memset(d.fpr, fb, sizeof d.fpr);
    } else {
        d.secret_len = CIS_HMAC_SECRET_MIN;
        memset(d.secret, 's', d.secret_len);
    }
    d.enabled = enabled;
    assert_int_equal(recv_store_sqlite.device_put(st, &d, replace, 1000), 0);
}

/* ---- a store that counts its device_get calls, and fails on demand ---- */

static int get_calls;
static int get_fail;                  /* the next calls fail with CIS_EDB */
static struct recv_store *fake_known; /* when set, device_get asks the real store */

static int counting_get(struct recv_store *s, const char *id, struct recv_device *out)
{
    get_calls++;
    if (get_fail)
        return CIS_EDB;
    if (fake_known != NULL)
        return recv_store_sqlite.device_get(fake_known, id, out);
    (void)s;
    return CIS_ENOTFOUND;
}

static struct recv_store_ops counting_ops(void)
{
    struct recv_store_ops ops = recv_store_sqlite;
    ops.device_get = counting_get;
    get_calls = 0;
    get_fail = 0;
    fake_known = NULL;
    return ops;
}

/* ---- tests ---- */

static void test_new_checks(void **state)
{
    struct fixture *f = *state;
    struct recv_registry *r = (struct recv_registry *)1;

    assert_int_equal(recv_registry_new(&recv_store_sqlite, f->st, 0, &r), CIS_EINVAL);
    assert_null(r);
    assert_int_equal(recv_registry_new(&recv_store_sqlite, f->st, RECV_REGISTRY_TTL_MAX_MS + 1, &r),
                     CIS_EINVAL);
    assert_int_equal(recv_registry_new(NULL, f->st, 1000, &r), CIS_EINVAL);
    assert_int_equal(recv_registry_new(&recv_store_sqlite, f->st, RECV_REGISTRY_TTL_MAX_MS, &r), 0);
    recv_registry_free(r);
    recv_registry_free(NULL);
}

/* Hits are served from memory: the store is asked once per id. */
static void test_hits_cached(void **state)
{
    struct fixture *f = *state;
    struct recv_store_ops ops = counting_ops();
    struct recv_registry *r;
    struct recv_device d;

    add(f->st, "gw-1", 0x11, 1, 0);
    add(f->st, "gw-off", 0x22, 0, 0);
    fake_known = f->st;
    assert_int_equal(recv_registry_new(&ops, f->st, 5000, &r), 0);

    for (int i = 0; i < 5; i++) {
        memset(&d, 0, sizeof d);
        assert_int_equal(recv_registry_lookup(r, "gw-1", &d), 0);
        assert_string_equal(d.id, "gw-1");
        assert_int_equal(d.has_fpr, 1);
        assert_int_equal(d.fpr[0], 0x11);
        assert_int_equal(d.enabled, 1);
    }
    assert_int_equal(get_calls, 1);

    /* a revoked device is found too: the caller decides */
    assert_int_equal(recv_registry_lookup(r, "gw-off", &d), 0);
    assert_int_equal(d.enabled, 0);
    assert_int_equal(d.fpr[0], 0x22);
    assert_int_equal(recv_registry_lookup(r, "gw-off", &d), 0);
    assert_int_equal(get_calls, 2);

    /* ids that cannot be registered cost no query */
    assert_int_equal(recv_registry_lookup(r, "", &d), CIS_ENOTFOUND);
    assert_int_equal(get_calls, 2);
    recv_registry_free(r);
}

/* A change made by another process (a second handle) is seen once the entry is older than the
 * TTL, and not before: found entries and not-found entries alike. */
static void test_ttl_against_second_handle(void **state)
{
    struct fixture *f = *state;
    struct recv_registry *slow, *fast;
    struct recv_device d;

    add(f->st, "gw-t", 0x31, 1, 0);
    /* a long TTL for "still cached" (no timing can make it fail), a short one for "seen" */
    assert_int_equal(recv_registry_new(&recv_store_sqlite, f->st, 5000, &slow), 0);
    assert_int_equal(recv_registry_new(&recv_store_sqlite, f->st, 50, &fast), 0);
    assert_int_equal(recv_registry_lookup(slow, "gw-t", &d), 0);
    assert_int_equal(d.enabled, 1);
    assert_int_equal(recv_registry_lookup(fast, "gw-t", &d), 0);
    assert_int_equal(recv_registry_lookup(slow, "gw-new", &d), CIS_ENOTFOUND);
    assert_int_equal(recv_registry_lookup(fast, "gw-new", &d), CIS_ENOTFOUND);

    /* `device revoke gw-t`, `device add gw-new`, elsewhere */
    assert_int_equal(recv_store_sqlite.device_set_enabled(f->st2, "gw-t", 0, 2000), 0);
    add(f->st2, "gw-new", 0x41, 1, 0);

    /* the long-TTL cache still answers from memory */
    assert_int_equal(recv_registry_lookup(slow, "gw-t", &d), 0);
    assert_int_equal(d.enabled, 1);
    assert_int_equal(recv_registry_lookup(slow, "gw-new", &d), CIS_ENOTFOUND);

    /* past the short TTL the store is asked again */
    sleep_ms(120);
    assert_int_equal(recv_registry_lookup(fast, "gw-t", &d), 0);
    assert_int_equal(d.enabled, 0);
    assert_int_equal(d.changed_ms, 2000);
    memset(&d, 0, sizeof d);
    assert_int_equal(recv_registry_lookup(fast, "gw-new", &d), 0);
    assert_int_equal(d.enabled, 1);
    assert_int_equal(d.fpr[0], 0x41);

    /* replaced credentials show the same way */
    add(f->st2, "gw-new", 0x42, 1, 1);
    sleep_ms(120);
    assert_int_equal(recv_registry_lookup(fast, "gw-new", &d), 0);
    assert_int_equal(d.fpr[0], 0x42);

    recv_registry_free(slow);
    recv_registry_free(fast);
}

/* Unknown ids are cached: a flood from one costs one query per TTL. */
static void test_not_found_cached(void **state)
{
    struct fixture *f = *state;
    struct recv_store_ops ops = counting_ops();
    struct recv_registry *r;
    struct recv_device d;

    assert_int_equal(recv_registry_new(&ops, f->st, 5000, &r), 0);
    for (int i = 0; i < 100; i++)
        assert_int_equal(recv_registry_lookup(r, "gw-unknown", &d), CIS_ENOTFOUND);
    assert_int_equal(get_calls, 1);
    recv_registry_free(r);
}

/* A store error is reported and not cached: the next lookup asks again, and a stale entry is
 * not served in its place. */
static void test_errors_not_cached(void **state)
{
    struct fixture *f = *state;
    struct recv_store_ops ops = counting_ops();
    struct recv_registry *r;
    struct recv_device d;

    add(f->st, "gw-e", 0x51, 1, 0);
    fake_known = f->st;
    assert_int_equal(recv_registry_new(&ops, f->st, 50, &r), 0);

    get_fail = 1;
    assert_int_equal(recv_registry_lookup(r, "gw-e", &d), CIS_EDB);
    assert_int_equal(recv_registry_lookup(r, "gw-e", &d), CIS_EDB);
    assert_int_equal(get_calls, 2);
    get_fail = 0;
    assert_int_equal(recv_registry_lookup(r, "gw-e", &d), 0);
    assert_int_equal(d.fpr[0], 0x51);
    assert_int_equal(get_calls, 3);

    /* expired, and the store fails: an error, not the old entry */
    sleep_ms(120);
    get_fail = 1;
    assert_int_equal(recv_registry_lookup(r, "gw-e", &d), CIS_EDB);
    assert_int_equal(get_calls, 4);
    get_fail = 0;
    assert_int_equal(recv_registry_lookup(r, "gw-e", &d), 0);
    assert_int_equal(get_calls, 5);
    recv_registry_free(r);
}

/* Past 65536 entries, none expired, the cache is emptied and keeps working. Entries expire
 * after the largest TTL (5 s); should filling the table take longer than that (valgrind on a
 * loaded machine), some may have expired, and only what holds either way is checked. */
static void test_bounded(void **state)
{
    struct fixture *f = *state;
    struct recv_store_ops ops = counting_ops();
    struct recv_registry *r;
    struct recv_device d;
    char id[32];
    int64_t t0 = cis_mono_ms();
    int fast;

    assert_int_equal(recv_registry_new(&ops, f->st, RECV_REGISTRY_TTL_MAX_MS, &r), 0);
    for (int i = 0; i < 65536; i++) {
        snprintf(id, sizeof id, "flood-%d", i);
        assert_int_equal(recv_registry_lookup(r, id, &d), CIS_ENOTFOUND);
    }
    assert_int_equal(get_calls, 65536);
    fast = cis_mono_ms() - t0 < RECV_REGISTRY_TTL_MAX_MS - 500;
    if (fast) {
        /* all still cached */
        assert_int_equal(recv_registry_lookup(r, "flood-0", &d), CIS_ENOTFOUND);
        assert_int_equal(recv_registry_lookup(r, "flood-65535", &d), CIS_ENOTFOUND);
        assert_int_equal(get_calls, 65536);
    }
    /* one more: the table is full; nothing has expired (when fast), so all go */
    assert_int_equal(recv_registry_lookup(r, "flood-65536", &d), CIS_ENOTFOUND);
    assert_int_equal(get_calls, 65537);
    fast = fast && cis_mono_ms() - t0 < RECV_REGISTRY_TTL_MAX_MS - 500;
    /* the newest entry is cached */
    assert_int_equal(recv_registry_lookup(r, "flood-65536", &d), CIS_ENOTFOUND);
    assert_int_equal(get_calls, 65537);
    if (fast) {
        /* the others are gone, the newest of them too */
        assert_int_equal(recv_registry_lookup(r, "flood-65535", &d), CIS_ENOTFOUND);
        assert_int_equal(get_calls, 65538);
        assert_int_equal(recv_registry_lookup(r, "flood-0", &d), CIS_ENOTFOUND);
        assert_int_equal(get_calls, 65539);
    }
    recv_registry_free(r);
}

struct worker {
    struct recv_registry *r;
    int errors;
};

static void *lookup_worker(void *arg)
{
    struct worker *w = arg;
    struct recv_device d;
    char id[32];

    for (int i = 0; i < 2000; i++) {
        snprintf(id, sizeof id, "gw-%d", i % 8);
        int rc = recv_registry_lookup(w->r, id, &d);
        if (i % 8 < 4 ? (rc != 0 || strcmp(d.id, id) != 0) : rc != CIS_ENOTFOUND)
            w->errors++;
    }
    return NULL;
}

/* Lookups from several threads at once (the HTTP ingest's), with a short TTL so that entries
 * are replaced while others read them: every answer is right (and sanitizers see the locking). */
static void test_threads(void **state)
{
    struct fixture *f = *state;
    struct recv_registry *r;
    struct worker w[4];
    pthread_t t[4];
    char id[32];

    for (int i = 0; i < 4; i++) {
        snprintf(id, sizeof id, "gw-%d", i);
        add(f->st, id, (uint8_t)(i + 1), 1, 0);
    }
    assert_int_equal(recv_registry_new(&recv_store_sqlite, f->st, 1, &r), 0);
    for (int i = 0; i < 4; i++) {
        w[i] = (struct worker){.r = r};
        assert_int_equal(pthread_create(&t[i], NULL, lookup_worker, &w[i]), 0);
    }
    for (int i = 0; i < 4; i++) {
        pthread_join(t[i], NULL);
        assert_int_equal(w[i].errors, 0);
    }
    recv_registry_free(r);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_new_checks, setup, teardown),
        cmocka_unit_test_setup_teardown(test_hits_cached, setup, teardown),
        cmocka_unit_test_setup_teardown(test_ttl_against_second_handle, setup, teardown),
        cmocka_unit_test_setup_teardown(test_not_found_cached, setup, teardown),
        cmocka_unit_test_setup_teardown(test_errors_not_cached, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bounded, setup, teardown),
        cmocka_unit_test_setup_teardown(test_threads, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
