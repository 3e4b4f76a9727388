/* SPDX-License-Identifier: Apache-2.0 */
/* Token buckets by key (ratelimit.c, prefix ratelimit_): what the HTTP API
 * limits requests per client address and per token with. Each key has a
 * bucket of burst tokens refilled at rate per second; a request takes one.
 * Pure: the caller passes the time (CLOCK_MONOTONIC µs), nothing is logged
 * and no loop is touched.
 *
 * Memory is bounded: at most max_keys buckets. A bucket that has refilled
 * is the same as none and is dropped when room is needed; when every
 * bucket is in use a new key is let through untracked (and counted), since
 * refusing it would let whoever fills the table lock out every new
 * client. Keys are hashed with a seed drawn at creation, so a client cannot
 * choose keys that collide. Errors are negative errno values; ret_*
 * parameters are untouched on failure. */
#pragma once

#include <stddef.h>
#include <stdint.h>

#define RATELIMIT_KEY_MAX 32

typedef struct RateLimit RateLimit;

/* rate: tokens per second (> 0), burst: the bucket's size (>= 1), max_keys:
 * buckets kept at most (>= 1). -EINVAL, -ENOMEM. */
int ratelimit_new(unsigned rate, unsigned burst, size_t max_keys, RateLimit **ret);
RateLimit *ratelimit_free(RateLimit *rl);
static inline void ratelimit_freep(RateLimit **rl) { ratelimit_free(*rl); }

/* Take one token from key's bucket (key_len at most RATELIMIT_KEY_MAX)
 * at now_usec. Returns 0 if there was one, else how many µs until there
 * will be (> 0; nothing taken). */
uint64_t ratelimit_take(RateLimit *rl, const void *key, size_t key_len, uint64_t now_usec);

/* Buckets held now, and keys let through untracked because the table was
 * full (since creation). */
size_t ratelimit_keys(const RateLimit *rl);
uint64_t ratelimit_untracked(const RateLimit *rl);
