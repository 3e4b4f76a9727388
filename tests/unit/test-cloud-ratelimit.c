/* SPDX-License-Identifier: Apache-2.0 */
/* Unit tests for the token buckets of cloud/ratelimit.c: burst then rate,
 * the wait it reports, keys apart, and the bounded table (full buckets
 * dropped for new keys, untracked keys let through when none is full). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "cloud/ratelimit.h"
#include "util.h"

#define SEC 1000000ULL

static void test_burst_then_rate(void **state) {
        _cleanup_(ratelimit_freep) RateLimit *rl = NULL;
        uint64_t t = 5 * SEC;
        unsigned ok = 0;

        assert_int_equal(ratelimit_new(10, 20, 16, &rl), 0);
        for (int i = 0; i < 20; i++)
                assert_int_equal(ratelimit_take(rl, "a", 1, t), 0);
        /* Empty: the next token comes in 1/10 s. */
        assert_int_equal(ratelimit_take(rl, "a", 1, t), SEC / 10);
        assert_int_equal(ratelimit_take(rl, "a", 1, t + SEC / 20), SEC / 20);
        assert_int_equal(ratelimit_take(rl, "a", 1, t + SEC / 10), 0);
        /* Over 10 s at 1,000 tries a second: 10 a second get through. */
        for (uint64_t u = t + SEC / 10 + 1000; u < t + SEC / 10 + 10 * SEC; u += 1000)
                ok += ratelimit_take(rl, "a", 1, u) == 0;
        assert_in_range(ok, 99, 101);
        /* Another key is not touched. */
        assert_int_equal(ratelimit_take(rl, "b", 1, t), 0);
        /* A long pause refills to the burst, not beyond. */
        t += 1000 * SEC;
        for (int i = 0; i < 20; i++)
                assert_int_equal(ratelimit_take(rl, "a", 1, t), 0);
        assert_true(ratelimit_take(rl, "a", 1, t) > 0);
}

static void test_bounded_table(void **state) {
        _cleanup_(ratelimit_freep) RateLimit *rl = NULL;
        uint64_t t = SEC;
        uint32_t k;

        assert_int_equal(ratelimit_new(1, 2, 4, &rl), 0);
        for (k = 0; k < 4; k++)
                assert_int_equal(ratelimit_take(rl, &k, sizeof(k), t), 0);
        assert_int_equal(ratelimit_keys(rl), 4);
        /* No bucket is full: a fifth key goes through untracked. */
        k = 4;
        assert_int_equal(ratelimit_take(rl, &k, sizeof(k), t), 0);
        assert_int_equal(ratelimit_untracked(rl), 1);
        assert_int_equal(ratelimit_keys(rl), 4);
        /* Once they refilled they make room. */
        t += 10 * SEC;
        assert_int_equal(ratelimit_take(rl, &k, sizeof(k), t), 0);
        assert_int_equal(ratelimit_keys(rl), 1);
        assert_int_equal(ratelimit_take(rl, &k, sizeof(k), t), 0);
        assert_int_equal(ratelimit_take(rl, &k, sizeof(k), t), SEC);
}

static void test_bad_arguments(void **state) {
        RateLimit *rl = NULL;

        assert_int_equal(ratelimit_new(0, 1, 1, &rl), -EINVAL);
        assert_int_equal(ratelimit_new(1, 0, 1, &rl), -EINVAL);
        assert_int_equal(ratelimit_new(1, 1, 0, &rl), -EINVAL);
        assert_null(rl);
        assert_null(ratelimit_free(NULL));
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_burst_then_rate),
                cmocka_unit_test(test_bounded_table),
                cmocka_unit_test(test_bad_arguments),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
