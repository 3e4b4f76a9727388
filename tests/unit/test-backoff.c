/* SPDX-License-Identifier: Apache-2.0 */
/* Unit tests for the agent's connect delays (agent/backoff.c): the
 * reconnect backoff's exponential steps, cap and jitter bounds, and the
 * first connect's delay over 0..StartJitterSec, with the random number
 * chosen by the test (0, the middle, BACKOFF_RANDOM_MAX, out of range). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "agent/backoff.h"

#define MID (BACKOFF_RANDOM_MAX / 2)

static void test_delay_steps_and_jitter(void **state) {
        (void)state;
        /* failures 0..6 with min 1 s, max 60 s: d = 1, 2, 4, ..., 60 s. */
        static const uint64_t d[] = { 1000, 2000, 4000, 8000, 16000, 32000, 60000 };

        for (unsigned i = 0; i < sizeof(d) / sizeof(d[0]); i++) {
                assert_int_equal(backoff_delay_ms(1000, 60000, i, 0), d[i] / 2);
                assert_int_equal(backoff_delay_ms(1000, 60000, i, BACKOFF_RANDOM_MAX), d[i]);
                uint64_t m = backoff_delay_ms(1000, 60000, i, MID);
                assert_true(m >= d[i] * 3 / 4 - 1 && m <= d[i] * 3 / 4 + 1);
        }
}

static void test_delay_cap_and_overflow(void **state) {
        (void)state;
        for (unsigned n = 6; n < 200; n++) {
                assert_int_equal(backoff_delay_ms(1000, 60000, n, BACKOFF_RANDOM_MAX), 60000);
                assert_int_equal(backoff_delay_ms(1000, 60000, n, 0), 30000);
        }
        /* A huge minimum must not wrap around when shifted. */
        assert_int_equal(backoff_delay_ms(UINT64_C(1) << 62, UINT64_MAX, 5, BACKOFF_RANDOM_MAX), UINT64_MAX);
        assert_int_equal(backoff_delay_ms(UINT64_C(3) << 40, UINT64_C(1) << 50, 63, 0), UINT64_C(1) << 49);
        /* min == max: a constant delay, still jittered over its upper half. */
        assert_int_equal(backoff_delay_ms(200, 200, 0, 0), 100);
        assert_int_equal(backoff_delay_ms(200, 200, 9, BACKOFF_RANDOM_MAX), 200);
        /* Odd d: the fixed part rounds up, the sum never passes d. */
        assert_int_equal(backoff_delay_ms(15, 15, 0, 0), 8);
        assert_int_equal(backoff_delay_ms(15, 15, 0, BACKOFF_RANDOM_MAX), 15);
}

static void test_start_delay(void **state) {
        (void)state;
        assert_int_equal(backoff_start_delay_ms(0, MID), 0);
        assert_int_equal(backoff_start_delay_ms(5000, 0), 0);
        assert_int_equal(backoff_start_delay_ms(5000, BACKOFF_RANDOM_MAX), 5000);
        assert_int_equal(backoff_start_delay_ms(5000, UINT32_MAX), 5000); /* clamped */
        uint64_t m = backoff_start_delay_ms(5000, MID);
        assert_true(m >= 2499 && m <= 2500);
        /* Monotonic in the random number: spread over the whole window. */
        uint64_t prev = 0;
        for (uint32_t r = 0; r < BACKOFF_RANDOM_MAX - BACKOFF_RANDOM_MAX / 64; r += BACKOFF_RANDOM_MAX / 64) {
                uint64_t v = backoff_start_delay_ms(5000, r);

                assert_true(v >= prev && v <= 5000);
                prev = v;
        }
        assert_true(prev >= 4900);
        /* Beyond 2^32 ms the arithmetic switches to double. */
        assert_int_equal(backoff_start_delay_ms(UINT64_C(1) << 40, BACKOFF_RANDOM_MAX), UINT64_C(1) << 40);
}

int main(int argc, char **argv) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_delay_steps_and_jitter),
                cmocka_unit_test(test_delay_cap_and_overflow),
                cmocka_unit_test(test_start_delay),
        };
        /* One test, or those a glob matches: test-foo NAME (HACKING.md). */
        if (argc > 1)
                cmocka_set_test_filter(argv[1]);
        return cmocka_run_group_tests(tests, NULL, NULL);
}
