/* Unit tests for the receiver's per-client rate limit (token buckets) and the limits.* keys
 * that configure the ingest limits. No network: the clock is passed in. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include <cistern/err.h>

#include "ingest/ratelimit.h"
#include "recv_config.h"

static void burst_then_refused(void **state)
{
    struct recv_rate *rl = NULL;
    int64_t t = 1000000;
    (void)state;

    assert_int_equal(recv_rate_create(5, 10, 100, &rl), 0);
    for (int i = 0; i < 10; i++)
        assert_int_equal(recv_rate_take(rl, "gw-1", t), 0);
    /* bucket empty: one token comes back in 1/5 s */
    int64_t wait = recv_rate_take(rl, "gw-1", t);
    assert_true(wait >= 199 && wait <= 201);
    /* a refusal takes nothing: 100 ms later half a token, still refused, 100 ms to go */
    wait = recv_rate_take(rl, "gw-1", t + 100);
    assert_true(wait >= 99 && wait <= 101);
    assert_int_equal(recv_rate_take(rl, "gw-1", t + 200), 0);
    assert_true(recv_rate_take(rl, "gw-1", t + 200) > 0);
    /* another key has its own bucket */
    assert_int_equal(recv_rate_take(rl, "gw-2", t + 200), 0);
    /* a long pause refills to the burst, not beyond */
    t += 3600 * 1000;
    for (int i = 0; i < 10; i++)
        assert_int_equal(recv_rate_take(rl, "gw-1", t), 0);
    assert_true(recv_rate_take(rl, "gw-1", t) > 0);
    assert_int_equal(recv_rate_keys(rl), 2);
    recv_rate_destroy(rl);
}

static void steady_rate_is_held(void **state)
{
    struct recv_rate *rl = NULL;
    int taken = 0;
    (void)state;

    /* a client asking every millisecond for 10 s gets burst + rate * 10 s, no more */
    assert_int_equal(recv_rate_create(50, 100, 100, &rl), 0);
    for (int64_t t = 0; t < 10000; t++)
        if (recv_rate_take(rl, "gw-busy", t) == 0)
            taken++;
    assert_true(taken >= 100 + 50 * 10 - 1 && taken <= 100 + 50 * 10);
    recv_rate_destroy(rl);
}

static void full_table_forgets_idle_keys(void **state)
{
    struct recv_rate *rl = NULL;
    char key[32];
    (void)state;

    assert_int_equal(recv_rate_create(1, 2, 4, &rl), 0);
    for (int i = 0; i < 4; i++) {
        snprintf(key, sizeof key, "gw-%d", i);
        assert_int_equal(recv_rate_take(rl, key, 0), 0);
        assert_int_equal(recv_rate_take(rl, key, 0), 0);
    }
    assert_int_equal(recv_rate_keys(rl), 4);
    /* all four busy (buckets empty): a fifth is let through, untracked */
    assert_int_equal(recv_rate_take(rl, "gw-new", 0), 0);
    assert_int_equal(recv_rate_keys(rl), 4);
    /* gw-0..3 still limited */
    assert_true(recv_rate_take(rl, "gw-0", 0) > 0);
    /* 10 s later every bucket is full again: the idle keys are forgotten for the new one */
    assert_int_equal(recv_rate_take(rl, "gw-new", 10000), 0);
    assert_int_equal(recv_rate_keys(rl), 1);
    recv_rate_destroy(rl);
}

static void create_rejects_bad_arguments(void **state)
{
    struct recv_rate *rl = (struct recv_rate *)1;
    (void)state;

    assert_int_equal(recv_rate_create(0, 1, 1, &rl), CIS_EINVAL);
    assert_null(rl);
    assert_int_equal(recv_rate_create(1, 0, 1, &rl), CIS_EINVAL);
    assert_int_equal(recv_rate_create(1, 1, 0, &rl), CIS_EINVAL);
    recv_rate_destroy(NULL);
}

static int load(const char *yaml, struct recv_config *cfg, char *err, size_t errlen)
{
    char path[] = "/tmp/cistern-test-limits-XXXXXX";
    int fd = mkstemp(path), rc;
    FILE *f;

    assert_true(fd >= 0);
    f = fdopen(fd, "w");
    assert_non_null(f);
    fputs(yaml, f);
    fclose(f);
    rc = recv_config_load(path, cfg, err, errlen);
    unlink(path);
    return rc;
}

#define BASE "listen:\n  http: 127.0.0.1:8443\n  insecure_plain_http: true\n" \
             "store:\n  path: /tmp/x.db\n"

static void limits_defaults(void **state)
{
    struct recv_config cfg;
    char err[512] = "";
    (void)state;

    assert_int_equal(load(BASE, &cfg, err, sizeof err), 0);
    assert_int_equal(cfg.max_header_size, 32 * 1024);
    assert_int_equal(cfg.max_connections_per_ip, 0);
    assert_int_equal(cfg.request_timeout_ms, 60000);
    assert_int_equal(cfg.connection_timeout_ms, 30000);
    assert_int_equal(cfg.rate, 50);
    assert_int_equal(cfg.rate_burst, 100);
    recv_config_free(&cfg);

    assert_int_equal(load(BASE "limits:\n  max_header_size: 8KiB\n  max_connections_per_ip: 4\n"
                               "  request_timeout: 5s\n  rate: 0\n  rate_burst: 3\n",
                          &cfg, err, sizeof err), 0);
    assert_int_equal(cfg.max_header_size, 8 * 1024);
    assert_int_equal(cfg.max_connections_per_ip, 4);
    assert_int_equal(cfg.request_timeout_ms, 5000);
    assert_int_equal(cfg.rate, 0);
    assert_int_equal(cfg.rate_burst, 3);
    recv_config_free(&cfg);
}

static void limits_out_of_range(void **state)
{
    static const struct {
        const char *yaml, *key;
    } bad[] = {
        {BASE "limits:\n  max_header_size: 1KiB\n", "limits.max_header_size"},
        {BASE "limits:\n  max_connections_per_ip: -1\n", "limits.max_connections_per_ip"},
        {BASE "limits:\n  request_timeout: 10ms\n", "limits.request_timeout"},
        {BASE "limits:\n  rate: -5\n", "limits.rate"},
        {BASE "limits:\n  rate_burst: 0\n", "limits.rate_burst"},
    };
    struct recv_config cfg;
    char err[512];
    (void)state;

    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        err[0] = '\0';
        assert_int_not_equal(load(bad[i].yaml, &cfg, err, sizeof err), 0);
        if (strstr(err, bad[i].key) == NULL)
            fail_msg("error for %s does not name it: %s", bad[i].key, err);
        recv_config_free(&cfg);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(burst_then_refused),
        cmocka_unit_test(steady_rate_is_held),
        cmocka_unit_test(full_table_forgets_idle_keys),
        cmocka_unit_test(create_rejects_bad_arguments),
        cmocka_unit_test(limits_defaults),
        cmocka_unit_test(limits_out_of_range),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
