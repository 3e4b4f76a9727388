/* SPDX-License-Identifier: Apache-2.0 */
/* How long the agent waits before connecting: the reconnect backoff and
 * the random delay of the first connect after start. Pure functions: the
 * caller draws the random number (uniform in 0..BACKOFF_RANDOM_MAX, what
 * random() returns), so tests choose it. */
#pragma once

#include <stdint.h>

#define BACKOFF_RANDOM_MAX UINT32_C(0x7fffffff)

/* Delay before reconnect attempt failures+1, in ms: equal jitter, d/2 fixed
 * and d/2 scaled by rnd, where d = min(max_ms, min_ms * 2^failures). */
uint64_t backoff_delay_ms(uint64_t min_ms, uint64_t max_ms, unsigned failures, uint32_t rnd);

/* Delay before the first connect, in ms: 0..max_ms scaled by rnd. */
uint64_t backoff_start_delay_ms(uint64_t max_ms, uint32_t rnd);
