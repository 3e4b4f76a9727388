/* SPDX-License-Identifier: Apache-2.0 */
/* Token buckets by key (ratelimit.h): a hash table with chaining, the
 * bucket count a power of two at least max_keys. */
#include "config.h"

#include <errno.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#include "ratelimit.h"
#include "util.h"

#define USEC_PER_SEC 1000000ULL

typedef struct Bucket {
        struct Bucket *next;
        uint64_t updated; /* µs: when tokens was last brought up to date */
        uint64_t tokens;  /* in millionths of a token (µtokens) */
        uint8_t key_len;
        uint8_t key[RATELIMIT_KEY_MAX];
} Bucket;

struct RateLimit {
        uint64_t rate;  /* tokens per second */
        uint64_t burst; /* µtokens */
        uint64_t seed[2];
        Bucket **table;
        size_t mask;
        size_t n, max;
        uint64_t untracked;
        /* A full table was swept and nothing freed: not again before this
         * (each sweep walks the whole table). */
        uint64_t next_sweep;
};

RateLimit *ratelimit_free(RateLimit *rl) {
        if (!rl)
                return NULL;
        for (size_t i = 0; rl->table && i <= rl->mask; i++)
                for (Bucket *b = rl->table[i], *next; b; b = next) {
                        next = b->next;
                        free(b);
                }
        free(rl->table);
        free(rl);
        return NULL;
}

int ratelimit_new(unsigned rate, unsigned burst, size_t max_keys, RateLimit **ret) {
        _cleanup_(ratelimit_freep) RateLimit *rl = NULL;
        size_t size = 16;

        if (rate == 0 || burst == 0 || max_keys == 0 || max_keys > SIZE_MAX / 4)
                return -EINVAL;
        rl = calloc(1, sizeof(*rl));
        if (!rl)
                return -ENOMEM;
        rl->rate = rate;
        rl->burst = (uint64_t)burst * USEC_PER_SEC;
        rl->max = max_keys;
        while (size < max_keys)
                size *= 2;
        rl->table = calloc(size, sizeof(*rl->table));
        if (!rl->table)
                return -ENOMEM;
        rl->mask = size - 1;
        if (getrandom(rl->seed, sizeof(rl->seed), GRND_NONBLOCK) != sizeof(rl->seed)) {
                /* Early at boot: weaker, but the table still works. */
                rl->seed[0] = now_usec() ^ (uintptr_t)rl;
                rl->seed[1] = (uint64_t)getpid() << 32 ^ (uintptr_t)rl->table;
        }
        *ret = TAKE_PTR(rl);
        return 0;
}

static uint64_t mix(uint64_t h) {
        h ^= h >> 33;
        h *= 0xff51afd7ed558ccdULL;
        h ^= h >> 33;
        h *= 0xc4ceb9fe1a85ec53ULL;
        h ^= h >> 33;
        return h;
}

/* A seeded hash of up to 32 bytes, 8 at a time through a 64-bit finalizer
 * (MurmurHash3's): without the seed, which keys collide is not known. */
static size_t ratelimit_hash(const RateLimit *rl, const uint8_t *key, size_t len) {
        uint64_t h = rl->seed[0] ^ len;

        for (size_t i = 0; i < len; i += 8) {
                uint64_t w = 0;

                memcpy(&w, key + i, len - i < 8 ? len - i : 8);
                h = mix(h ^ w ^ rl->seed[1]);
        }
        return (size_t)mix(h ^ rl->seed[1]);
}

/* Bring b's tokens up to now; true if it is full (as good as none). */
static bool bucket_refill(const RateLimit *rl, Bucket *b, uint64_t now) {
        if (now > b->updated) {
                uint64_t dt = now - b->updated;
                /* dt * rate µtokens, saturating at the burst. */
                uint64_t add = dt > rl->burst / rl->rate ? rl->burst : dt * rl->rate;

                b->tokens = rl->burst - b->tokens <= add ? rl->burst : b->tokens + add;
                b->updated = now;
        }
        return b->tokens >= rl->burst;
}

/* Drop every full bucket; how many were dropped. */
static size_t ratelimit_sweep(RateLimit *rl, uint64_t now) {
        size_t dropped = 0;

        for (size_t i = 0; i <= rl->mask; i++)
                for (Bucket **p = &rl->table[i]; *p;) {
                        Bucket *b = *p;

                        if (bucket_refill(rl, b, now)) {
                                *p = b->next;
                                free(b);
                                rl->n--;
                                dropped++;
                        } else
                                p = &b->next;
                }
        return dropped;
}

static Bucket *ratelimit_find(RateLimit *rl, const void *key, size_t key_len, size_t *ret_index) {
        size_t i = ratelimit_hash(rl, key, key_len) & rl->mask;

        *ret_index = i;
        for (Bucket *b = rl->table[i]; b; b = b->next)
                if (b->key_len == key_len && memcmp(b->key, key, key_len) == 0)
                        return b;
        return NULL;
}

/* 0 if b has a whole token, else the µs until it will (rounded up). */
static uint64_t bucket_wait(const RateLimit *rl, const Bucket *b) {
        if (b->tokens >= USEC_PER_SEC)
                return 0;
        return (USEC_PER_SEC - b->tokens + rl->rate - 1) / rl->rate;
}

uint64_t ratelimit_take(RateLimit *rl, const void *key, size_t key_len, uint64_t now_usec) {
        uint64_t wait;
        size_t i;
        Bucket *b;

        if (key_len > RATELIMIT_KEY_MAX)
                key_len = RATELIMIT_KEY_MAX;
        b = ratelimit_find(rl, key, key_len, &i);
        if (!b) {
                if (rl->n >= rl->max &&
                    (now_usec < rl->next_sweep || ratelimit_sweep(rl, now_usec) == 0)) {
                        if (now_usec >= rl->next_sweep)
                                rl->next_sweep = now_usec + USEC_PER_SEC / 10;
                        rl->untracked++;
                        return 0;
                }
                b = calloc(1, sizeof(*b));
                if (!b) {
                        rl->untracked++;
                        return 0;
                }
                b->key_len = (uint8_t)key_len;
                memcpy(b->key, key, key_len);
                b->tokens = rl->burst;
                b->updated = now_usec;
                b->next = rl->table[i];
                rl->table[i] = b;
                rl->n++;
        } else
                (void)bucket_refill(rl, b, now_usec);
        wait = bucket_wait(rl, b);
        if (wait == 0)
                b->tokens -= USEC_PER_SEC;
        return wait;
}

size_t ratelimit_keys(const RateLimit *rl) {
        return rl->n;
}

uint64_t ratelimit_untracked(const RateLimit *rl) {
        return rl->untracked;
}
