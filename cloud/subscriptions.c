/* SPDX-License-Identifier: Apache-2.0 */
/* The subscription index (cloud/subscriptions.h): a hash table of
 * (scope, prefix) nodes, each with its subscriptions, and a hash table of
 * owners, each with its subscriptions and their count. Removals during a
 * match only mark and queue; the match frees them when it is over. */
#include "config.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include "subscriptions.h"

typedef struct SubNode SubNode;
typedef struct SubOwner SubOwner;

struct Sub {
        SubNode *node;
        SubOwner *owner; /* NULL once removed */
        void *userdata;
        uint64_t gen; /* index generation when added */
        bool dead;    /* removed during a match, freed after it */
        Sub *node_prev, *node_next;
        Sub *owner_prev, *owner_next;
        Sub *dead_next;
};

/* The subscriptions to one prefix in one scope. key is "SCOPE\0PREFIX". */
struct SubNode {
        uint64_t hash;
        size_t scope_len, prefix_len;
        Sub *subs;
        SubNode *hash_next;
        char key[];
};

struct SubOwner {
        const void *key;
        Sub *subs;
        size_t n;
        SubOwner *hash_next;
};

struct SubIndex {
        SubNode **nodes;
        size_t n_node_buckets, n_nodes;
        SubOwner **owners;
        size_t n_owner_buckets, n_owners;
        size_t n_subs;
        uint64_t seed;
        uint64_t gen;
        unsigned matching; /* sub_index_match() on the stack */
        Sub *dead;
        void (*free_userdata)(void *);
};

#define SUB_FNV_PRIME 0x100000001b3ULL

static inline uint64_t sub_step(uint64_t h, uint8_t b) { return (h ^ b) * SUB_FNV_PRIME; }

/* Spread the FNV state over the bucket bits. */
static inline uint64_t sub_mix(uint64_t h) {
        h ^= h >> 33;
        h *= 0xff51afd7ed558ccdULL;
        h ^= h >> 33;
        return h;
}

static uint64_t sub_hash_scope(const SubIndex *x, const char *scope, size_t len) {
        uint64_t h = x->seed;

        for (size_t i = 0; i < len; i++)
                h = sub_step(h, (uint8_t)scope[i]);
        return sub_step(h, 0);
}

static uint64_t sub_hash_key(const SubIndex *x, const char *scope, size_t scope_len, const char *prefix,
                             size_t prefix_len) {
        uint64_t h = sub_hash_scope(x, scope, scope_len);

        for (size_t i = 0; i < prefix_len; i++)
                h = sub_step(h, (uint8_t)prefix[i]);
        return h;
}

static uint64_t sub_hash_pointer(const void *p) { return sub_mix((uint64_t)(uintptr_t)p); }

SubIndex *sub_index_new(void (*free_userdata)(void *)) {
        SubIndex *x = calloc(1, sizeof(*x));

        if (!x)
                return NULL;
        x->free_userdata = free_userdata;
        /* A seed per index: bucket chains are not chosen by whoever picks
         * the prefixes. */
        if (getrandom(&x->seed, sizeof(x->seed), GRND_NONBLOCK) != (ssize_t)sizeof(x->seed))
                x->seed = sub_mix((uint64_t)(uintptr_t)x ^ 0xcbf29ce484222325ULL);
        x->seed ^= 0xcbf29ce484222325ULL;
        return x;
}

/* ---- tables ------------------------------------------------------------------ */

static int sub_nodes_grow(SubIndex *x) {
        size_t n = x->n_node_buckets ? x->n_node_buckets * 2 : 64;
        SubNode **b = calloc(n, sizeof(*b));

        if (!b)
                return -ENOMEM;
        for (size_t i = 0; i < x->n_node_buckets; i++)
                for (SubNode *node = x->nodes[i], *next; node; node = next) {
                        size_t k = sub_mix(node->hash) & (n - 1);

                        next = node->hash_next;
                        node->hash_next = b[k];
                        b[k] = node;
                }
        free(x->nodes);
        x->nodes = b;
        x->n_node_buckets = n;
        return 0;
}

static int sub_owners_grow(SubIndex *x) {
        size_t n = x->n_owner_buckets ? x->n_owner_buckets * 2 : 64;
        SubOwner **b = calloc(n, sizeof(*b));

        if (!b)
                return -ENOMEM;
        for (size_t i = 0; i < x->n_owner_buckets; i++)
                for (SubOwner *o = x->owners[i], *next; o; o = next) {
                        size_t k = sub_hash_pointer(o->key) & (n - 1);

                        next = o->hash_next;
                        o->hash_next = b[k];
                        b[k] = o;
                }
        free(x->owners);
        x->owners = b;
        x->n_owner_buckets = n;
        return 0;
}

static SubNode *sub_node_find(const SubIndex *x, uint64_t h, const char *scope, size_t scope_len,
                              const char *prefix, size_t prefix_len) {
        if (x->n_node_buckets == 0)
                return NULL;
        for (SubNode *node = x->nodes[sub_mix(h) & (x->n_node_buckets - 1)]; node; node = node->hash_next)
                if (node->hash == h && node->scope_len == scope_len && node->prefix_len == prefix_len &&
                    memcmp(node->key, scope, scope_len) == 0 &&
                    memcmp(node->key + scope_len + 1, prefix, prefix_len) == 0)
                        return node;
        return NULL;
}

static void sub_node_unlink(SubIndex *x, SubNode *node) {
        for (SubNode **p = &x->nodes[sub_mix(node->hash) & (x->n_node_buckets - 1)]; *p; p = &(*p)->hash_next)
                if (*p == node) {
                        *p = node->hash_next;
                        break;
                }
        x->n_nodes--;
        free(node);
}

static SubOwner *sub_owner_find(const SubIndex *x, const void *key) {
        if (x->n_owner_buckets == 0)
                return NULL;
        for (SubOwner *o = x->owners[sub_hash_pointer(key) & (x->n_owner_buckets - 1)]; o; o = o->hash_next)
                if (o->key == key)
                        return o;
        return NULL;
}

static void sub_owner_unlink(SubIndex *x, SubOwner *o) {
        for (SubOwner **p = &x->owners[sub_hash_pointer(o->key) & (x->n_owner_buckets - 1)]; *p;
             p = &(*p)->hash_next)
                if (*p == o) {
                        *p = o->hash_next;
                        break;
                }
        x->n_owners--;
        free(o);
}

/* ---- adding and removing ------------------------------------------------------ */

int sub_index_add(SubIndex *x, const void *owner, const char *scope, const char *prefix, void *userdata,
                  Sub **ret_sub) {
        size_t scope_len = scope ? strlen(scope) : 0, prefix_len = strlen(prefix);
        uint64_t h = sub_hash_key(x, scope ?: "", scope_len, prefix, prefix_len);
        SubNode *node;
        SubOwner *o;
        Sub *s;

        /* Make room first: nothing changes on failure. */
        if (x->n_nodes >= x->n_node_buckets && sub_nodes_grow(x) < 0)
                return -ENOMEM;
        if (x->n_owners >= x->n_owner_buckets && sub_owners_grow(x) < 0)
                return -ENOMEM;
        s = calloc(1, sizeof(*s));
        if (!s)
                return -ENOMEM;
        node = sub_node_find(x, h, scope ?: "", scope_len, prefix, prefix_len);
        if (!node) {
                size_t i;

                node = malloc(sizeof(*node) + scope_len + 1 + prefix_len + 1);
                if (!node) {
                        free(s);
                        return -ENOMEM;
                }
                *node = (SubNode){ .hash = h, .scope_len = scope_len, .prefix_len = prefix_len };
                memcpy(node->key, scope ?: "", scope_len);
                node->key[scope_len] = 0;
                memcpy(node->key + scope_len + 1, prefix, prefix_len + 1);
                i = sub_mix(h) & (x->n_node_buckets - 1);
                node->hash_next = x->nodes[i];
                x->nodes[i] = node;
                x->n_nodes++;
        }
        o = sub_owner_find(x, owner);
        if (!o) {
                size_t i;

                o = calloc(1, sizeof(*o));
                if (!o) {
                        if (!node->subs)
                                sub_node_unlink(x, node);
                        free(s);
                        return -ENOMEM;
                }
                o->key = owner;
                i = sub_hash_pointer(owner) & (x->n_owner_buckets - 1);
                o->hash_next = x->owners[i];
                x->owners[i] = o;
                x->n_owners++;
        }
        s->node = node;
        s->owner = o;
        s->userdata = userdata;
        s->gen = x->gen;
        s->node_next = node->subs;
        if (node->subs)
                node->subs->node_prev = s;
        node->subs = s;
        s->owner_next = o->subs;
        if (o->subs)
                o->subs->owner_prev = s;
        o->subs = s;
        o->n++;
        x->n_subs++;
        if (ret_sub)
                *ret_sub = s;
        return 0;
}

/* Out of the node's list; the node goes with its last subscription. */
static void sub_free(SubIndex *x, Sub *s) {
        SubNode *node = s->node;

        if (s->node_prev)
                s->node_prev->node_next = s->node_next;
        else
                node->subs = s->node_next;
        if (s->node_next)
                s->node_next->node_prev = s->node_prev;
        if (!node->subs)
                sub_node_unlink(x, node);
        if (x->free_userdata)
                x->free_userdata(s->userdata);
        free(s);
}

void sub_index_remove(SubIndex *x, Sub *s) {
        SubOwner *o;

        if (!s || s->dead)
                return;
        o = s->owner;
        if (s->owner_prev)
                s->owner_prev->owner_next = s->owner_next;
        else
                o->subs = s->owner_next;
        if (s->owner_next)
                s->owner_next->owner_prev = s->owner_prev;
        s->owner = NULL;
        if (--o->n == 0)
                sub_owner_unlink(x, o);
        x->n_subs--;
        if (x->matching > 0) {
                /* A match may be standing on it: free it after. */
                s->dead = true;
                s->dead_next = x->dead;
                x->dead = s;
        } else
                sub_free(x, s);
}

size_t sub_index_remove_owner(SubIndex *x, const void *owner) {
        SubOwner *o = sub_owner_find(x, owner);
        size_t n;

        if (!o)
                return 0;
        n = o->n;
        /* The owner record goes with the last one. */
        for (size_t i = 0; i < n; i++)
                sub_index_remove(x, o->subs);
        return n;
}

size_t sub_index_count(const SubIndex *x, const void *owner) {
        const SubOwner *o = sub_owner_find(x, owner);

        return o ? o->n : 0;
}

size_t sub_index_size(const SubIndex *x) { return x->n_subs; }

Sub *sub_index_owner_first(const SubIndex *x, const void *owner) {
        const SubOwner *o = sub_owner_find(x, owner);

        return o ? o->subs : NULL;
}

Sub *sub_owner_next(const Sub *s) { return s->owner_next; }

const char *sub_prefix(const Sub *s) { return s->node->key + s->node->scope_len + 1; }

void *sub_userdata(const Sub *s) { return s->userdata; }

void sub_set_userdata(Sub *s, void *userdata) { s->userdata = userdata; }

SubIndex *sub_index_free(SubIndex *x) {
        if (!x)
                return NULL;
        for (size_t i = 0; i < x->n_node_buckets; i++)
                for (SubNode *node = x->nodes[i], *next; node; node = next) {
                        next = node->hash_next;
                        for (Sub *s = node->subs, *sn; s; s = sn) {
                                sn = s->node_next;
                                if (x->free_userdata)
                                        x->free_userdata(s->userdata);
                                free(s);
                        }
                        free(node);
                }
        for (size_t i = 0; i < x->n_owner_buckets; i++)
                for (SubOwner *o = x->owners[i], *next; o; o = next) {
                        next = o->hash_next;
                        free(o);
                }
        free(x->nodes);
        free(x->owners);
        free(x);
        return NULL;
}

/* ---- matching ----------------------------------------------------------------- */

/* Visits one node's live subscriptions added before the match began.
 * Returns false when fn asked to stop. */
static bool sub_visit_node(SubNode *node, uint64_t limit, sub_visit_fn fn, void *ctx, size_t *n) {
        for (Sub *s = node->subs; s; s = s->node_next) {
                if (s->dead || s->gen > limit)
                        continue;
                (*n)++;
                if (!fn(s, s->userdata, ctx))
                        return false;
        }
        return true;
}

static bool sub_match_scope(SubIndex *x, const char *scope, size_t scope_len, const char *name, size_t name_len,
                            uint64_t limit, sub_visit_fn fn, void *ctx, size_t *n) {
        uint64_t h = sub_hash_scope(x, scope, scope_len);

        for (size_t k = 0;; k++) {
                SubNode *node = sub_node_find(x, h, scope, scope_len, name, k);

                if (node && !sub_visit_node(node, limit, fn, ctx, n))
                        return false;
                if (k == name_len)
                        return true;
                h = sub_step(h, (uint8_t)name[k]);
        }
}

size_t sub_index_match(SubIndex *x, const char *scope, const char *name, sub_visit_fn fn, void *ctx) {
        size_t name_len = strlen(name), n = 0;
        uint64_t limit;

        if (x->n_subs == 0)
                return 0;
        limit = x->gen++;
        x->matching++;
        if (sub_match_scope(x, "", 0, name, name_len, limit, fn, ctx, &n) && scope && *scope)
                (void)sub_match_scope(x, scope, strlen(scope), name, name_len, limit, fn, ctx, &n);
        if (--x->matching == 0)
                while (x->dead) {
                        Sub *s = x->dead;

                        x->dead = s->dead_next;
                        sub_free(x, s);
                }
        return n;
}
