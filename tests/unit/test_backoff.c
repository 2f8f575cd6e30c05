/* Unit tests for the jittered exponential backoff and the clocks. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "cistern/backoff.h"

static void grows_and_caps(void **state)
{
    struct cis_backoff b;
    int64_t base = 100;
    cis_backoff_init(&b, 100, 1000);
    for (int i = 0; i < 20; i++) {
        int64_t d = cis_backoff_next(&b);
        /* Each delay is in [cur/2, cur], where cur doubles from 100 and stops at 1000. */
        assert_in_range(d, base / 2, base);
        base = base * 2 > 1000 ? 1000 : base * 2;
    }
    assert_int_equal(b.cur_ms, 1000);
}

static void reset_starts_over(void **state)
{
    struct cis_backoff b;
    cis_backoff_init(&b, 50, 10000);
    for (int i = 0; i < 8; i++)
        cis_backoff_next(&b);
    cis_backoff_reset(&b);
    assert_in_range(cis_backoff_next(&b), 25, 50);
}

static void jitter_varies(void **state)
{
    struct cis_backoff b;
    int distinct = 0;
    int64_t first = -1;
    for (int i = 0; i < 50; i++) {
        cis_backoff_init(&b, 10000, 10000);
        int64_t d = cis_backoff_next(&b);
        if (first < 0)
            first = d;
        else if (d != first)
            distinct = 1;
    }
    assert_true(distinct);
}

static void bad_bounds_clamped(void **state)
{
    struct cis_backoff b;
    cis_backoff_init(&b, 0, -5);
    assert_int_equal(b.initial_ms, 1);
    assert_int_equal(b.max_ms, 1);
    assert_in_range(cis_backoff_next(&b), 0, 1);
}

static void monotonic_advances(void **state)
{
    int64_t a = cis_mono_ms(), w = cis_wall_ms();
    assert_true(cis_mono_ms() >= a);
    assert_true(w > 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(grows_and_caps),
        cmocka_unit_test(reset_starts_over),
        cmocka_unit_test(jitter_varies),
        cmocka_unit_test(bad_bounds_clamped),
        cmocka_unit_test(monotonic_advances),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
