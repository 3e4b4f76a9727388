/* SPDX-License-Identifier: Apache-2.0 */
#include "backoff.h"

/* x * rnd / BACKOFF_RANDOM_MAX, rnd clamped to BACKOFF_RANDOM_MAX; exact
 * below 2^32 ms (49 days), never more than x. */
static uint64_t scale(uint64_t x, uint32_t rnd) {
        if (rnd > BACKOFF_RANDOM_MAX)
                rnd = BACKOFF_RANDOM_MAX;
        if (x <= UINT32_MAX)
                return x * rnd / BACKOFF_RANDOM_MAX;
        /* Rounded in double: never past x (nor to 2^64). */
        double v = (double)x * rnd / BACKOFF_RANDOM_MAX;

        return v >= (double)x ? x : (uint64_t)v;
}

uint64_t backoff_delay_ms(uint64_t min_ms, uint64_t max_ms, unsigned failures, uint32_t rnd) {
        uint64_t d = failures < 64 && min_ms <= (max_ms >> failures) ? min_ms << failures : max_ms;

        return d - d / 2 + scale(d / 2, rnd);
}

uint64_t backoff_start_delay_ms(uint64_t max_ms, uint32_t rnd) {
        return scale(max_ms, rnd);
}
