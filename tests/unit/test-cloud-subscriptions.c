/* SPDX-License-Identifier: Apache-2.0 */
/* Unit tests for the subscription index (cloud/subscriptions.c): the
 * matches are exactly proto_prefix_match()'s, scopes, per-owner counts and
 * removal, changes from inside a match, and that a match does not look at
 * subscriptions that cannot match. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "cloud/subscriptions.h"

typedef struct Seen {
        char names[64][16];
        size_t n;
} Seen;

/* userdata is a label (a string) in these tests. */
static bool collect(Sub *s, void *userdata, void *ctx) {
        Seen *seen = ctx;

        assert_true(seen->n < 64);
        snprintf(seen->names[seen->n++], 16, "%s", (const char *)userdata);
        return true;
}

static int cmp(const void *a, const void *b) { return strcmp(a, b); }

/* The labels matched, sorted, joined by spaces. */
static void match(SubIndex *x, const char *scope, const char *name, char *out, size_t size) {
        Seen seen = {};
        size_t n = sub_index_match(x, scope, name, collect, &seen);

        assert_int_equal(n, seen.n);
        qsort(seen.names, seen.n, sizeof(seen.names[0]), cmp);
        out[0] = 0;
        for (size_t i = 0; i < seen.n; i++) {
                if (i > 0)
                        strncat(out, " ", size - strlen(out) - 1);
                strncat(out, seen.names[i], size - strlen(out) - 1);
        }
}

#define assert_match(x, scope, name, expected)                    \
        do {                                                      \
                char _buf[1024];                                  \
                match(x, scope, name, _buf, sizeof(_buf));        \
                assert_string_equal(_buf, expected);              \
        } while (0)

static int owner_a, owner_b, owner_c;

static void test_prefix_semantics(void **state) {
        SubIndex *x = sub_index_new(NULL);

        assert_non_null(x);
        assert_int_equal(sub_index_add(x, &owner_a, NULL, "", (void *)"all", NULL), 0);
        assert_int_equal(sub_index_add(x, &owner_a, NULL, "temp", (void *)"temp", NULL), 0);
        assert_int_equal(sub_index_add(x, &owner_b, NULL, "temp/", (void *)"temp/", NULL), 0);
        assert_int_equal(sub_index_add(x, &owner_b, "", "temp/kitchen", (void *)"kitchen", NULL), 0);
        assert_int_equal(sub_index_add(x, &owner_c, NULL, "temperature-long-prefix", (void *)"long", NULL), 0);

        assert_match(x, NULL, "temp", "all temp");
        assert_match(x, NULL, "temp/kitchen", "all kitchen temp temp/");
        assert_match(x, NULL, "temp/kitchen/2", "all kitchen temp temp/");
        assert_match(x, NULL, "tem", "all");
        assert_match(x, NULL, "humidity", "all");
        assert_match(x, NULL, "temperature", "all temp");
        assert_match(x, NULL, "temperature-long-prefix!", "all long temp");
        /* Case and bytes count: no folding. */
        assert_match(x, NULL, "Temp", "all");
        assert_int_equal(sub_index_size(x), 5);
        sub_index_free(x);
}

static void test_scopes(void **state) {
        SubIndex *x = sub_index_new(NULL);

        assert_int_equal(sub_index_add(x, &owner_a, NULL, "t", (void *)"any", NULL), 0);
        assert_int_equal(sub_index_add(x, &owner_b, "dev-1", "t", (void *)"dev1", NULL), 0);
        assert_int_equal(sub_index_add(x, &owner_b, "dev-1", "", (void *)"dev1-all", NULL), 0);
        assert_int_equal(sub_index_add(x, &owner_c, "dev-2", "t", (void *)"dev2", NULL), 0);
        /* The scope and the prefix do not run into each other. */
        assert_int_equal(sub_index_add(x, &owner_c, "dev-1t", "", (void *)"dev1t", NULL), 0);

        assert_match(x, NULL, "temp", "any");
        assert_match(x, "", "temp", "any");
        assert_match(x, "dev-1", "temp", "any dev1 dev1-all");
        assert_match(x, "dev-1", "x", "dev1-all");
        assert_match(x, "dev-2", "temp", "any dev2");
        assert_match(x, "dev-1t", "x", "dev1t");
        assert_match(x, "dev-3", "temp", "any");
        sub_index_free(x);
}

static void test_owner_counts_and_removal(void **state) {
        SubIndex *x = sub_index_new(NULL);
        Sub *s1, *s2;

        assert_int_equal(sub_index_add(x, &owner_a, NULL, "a", (void *)"a1", &s1), 0);
        assert_int_equal(sub_index_add(x, &owner_a, NULL, "a", (void *)"a2", &s2), 0);
        assert_int_equal(sub_index_add(x, &owner_a, NULL, "b", (void *)"a3", NULL), 0);
        assert_int_equal(sub_index_add(x, &owner_b, NULL, "a", (void *)"b1", NULL), 0);
        assert_int_equal(sub_index_count(x, &owner_a), 3);
        assert_int_equal(sub_index_count(x, &owner_b), 1);
        assert_int_equal(sub_index_count(x, &owner_c), 0);
        assert_string_equal(sub_prefix(s1), "a");

        sub_index_remove(x, s1);
        assert_int_equal(sub_index_count(x, &owner_a), 2);
        assert_match(x, NULL, "a", "a2 b1");

        assert_int_equal(sub_index_remove_owner(x, &owner_a), 2);
        assert_int_equal(sub_index_count(x, &owner_a), 0);
        assert_null(sub_index_owner_first(x, &owner_a));
        assert_match(x, NULL, "a", "b1");
        assert_match(x, NULL, "b", "");
        assert_int_equal(sub_index_remove_owner(x, &owner_a), 0);
        assert_int_equal(sub_index_size(x), 1);
        sub_index_remove(x, NULL);

        /* Again after everything went: nodes and owners come back. */
        assert_int_equal(sub_index_remove_owner(x, &owner_b), 1);
        assert_int_equal(sub_index_size(x), 0);
        assert_match(x, NULL, "a", "");
        assert_int_equal(sub_index_add(x, &owner_a, NULL, "a", (void *)"again", NULL), 0);
        assert_match(x, NULL, "a", "again");
        sub_index_free(x);
}

static void test_owner_iteration(void **state) {
        SubIndex *x = sub_index_new(NULL);
        size_t n = 0;

        for (int i = 0; i < 10; i++) {
                char p[8];

                snprintf(p, sizeof(p), "p%d", i);
                assert_int_equal(sub_index_add(x, &owner_a, NULL, p, NULL, NULL), 0);
        }
        assert_int_equal(sub_index_add(x, &owner_b, NULL, "p1", NULL, NULL), 0);
        for (Sub *s = sub_index_owner_first(x, &owner_a); s; s = sub_owner_next(s))
                n++;
        assert_int_equal(n, 10);
        sub_index_free(x);
}

typedef struct Reentry {
        SubIndex *x;
        int visits;
} Reentry;

/* Removes every subscription of owners a, b and c (itself among them)
 * and adds one for c that matches too. */
static bool remove_others(Sub *s, void *userdata, void *ctx) {
        Reentry *r = ctx;

        r->visits++;
        (void)sub_index_remove_owner(r->x, &owner_a);
        (void)sub_index_remove_owner(r->x, &owner_b);
        (void)sub_index_remove_owner(r->x, &owner_c);
        assert_int_equal(sub_index_add(r->x, &owner_c, NULL, "", (void *)&owner_c, NULL), 0);
        return true;
}

static void test_changes_during_match(void **state) {
        SubIndex *x = sub_index_new(NULL);
        Reentry r = { .x = x };

        assert_int_equal(sub_index_add(x, &owner_a, NULL, "e", (void *)&owner_a, NULL), 0);
        assert_int_equal(sub_index_add(x, &owner_b, NULL, "e", (void *)&owner_b, NULL), 0);
        assert_int_equal(sub_index_add(x, &owner_b, NULL, "ev", (void *)&owner_b, NULL), 0);
        /* The first visit removes the others and itself: no more visits,
         * and the subscription added meanwhile is not visited either. */
        assert_int_equal(sub_index_match(x, NULL, "event", remove_others, &r), 1);
        assert_int_equal(r.visits, 1);
        assert_int_equal(sub_index_size(x), 1);
        r.visits = 0;
        assert_int_equal(sub_index_match(x, NULL, "event", remove_others, &r), 1);
        sub_index_free(x);
}

static bool stop_at_first(Sub *s, void *userdata, void *ctx) {
        (*(int *)ctx)++;
        return false;
}

static void test_stop(void **state) {
        SubIndex *x = sub_index_new(NULL);
        int n = 0;

        assert_int_equal(sub_index_add(x, &owner_a, NULL, "", NULL, NULL), 0);
        assert_int_equal(sub_index_add(x, &owner_b, NULL, "a", NULL, NULL), 0);
        assert_int_equal(sub_index_add(x, &owner_c, "d", "a", NULL, NULL), 0);
        (void)sub_index_match(x, "d", "abc", stop_at_first, &n);
        assert_int_equal(n, 1);
        sub_index_free(x);
}

static int counter;
static bool count_visit(Sub *s, void *userdata, void *ctx) {
        counter++;
        return true;
}

/* Many subscribers, few match: the visits are the matches only, and
 * every one of 10,000 owners with its own prefix is found. */
static void test_many(void **state) {
        SubIndex *x = sub_index_new(NULL);
        static int owners[10000];
        char p[32];

        for (int i = 0; i < 10000; i++) {
                snprintf(p, sizeof(p), "dev/%d/", i);
                assert_int_equal(sub_index_add(x, &owners[i], NULL, p, NULL, NULL), 0);
                assert_int_equal(sub_index_add(x, &owners[i], NULL, "all/", NULL, NULL), 0);
        }
        assert_int_equal(sub_index_size(x), 20000);
        for (int i = 0; i < 10000; i += 97) {
                counter = 0;
                snprintf(p, sizeof(p), "dev/%d/temp", i);
                assert_int_equal(sub_index_match(x, NULL, p, count_visit, NULL), 1);
                assert_int_equal(counter, 1);
                assert_int_equal(sub_index_count(x, &owners[i]), 2);
        }
        counter = 0;
        assert_int_equal(sub_index_match(x, NULL, "all/x", count_visit, NULL), 10000);
        for (int i = 0; i < 10000; i++)
                assert_int_equal(sub_index_remove_owner(x, &owners[i]), 2);
        assert_int_equal(sub_index_size(x), 0);
        sub_index_free(x);
}

static int freed;
static void count_free(void *p) {
        freed++;
        free(p);
}

static bool remove_visited(Sub *s, void *userdata, void *ctx) {
        /* Removed during the match: userdata stays valid until after. */
        sub_index_remove(ctx, s);
        assert_string_equal(userdata, "three");
        return true;
}

static void test_free_userdata(void **state) {
        SubIndex *x = sub_index_new(count_free);
        Sub *s;

        /* Under ASan or valgrind a leak or a use after free here fails. */
        freed = 0;
        assert_int_equal(sub_index_add(x, &owner_a, NULL, "a", strdup("one"), &s), 0);
        assert_int_equal(sub_index_add(x, &owner_b, "s", "", strdup("two"), NULL), 0);
        assert_int_equal(sub_index_add(x, &owner_c, NULL, "x", strdup("three"), NULL), 0);
        sub_index_remove(x, s);
        assert_int_equal(freed, 1);
        assert_int_equal(sub_index_match(x, NULL, "xyz", remove_visited, x), 1);
        assert_int_equal(freed, 2);
        assert_null(sub_index_free(x));
        assert_int_equal(freed, 3);
        assert_null(sub_index_free(NULL));
}

int main(int argc, char *argv[]) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_prefix_semantics),
                cmocka_unit_test(test_scopes),
                cmocka_unit_test(test_owner_counts_and_removal),
                cmocka_unit_test(test_owner_iteration),
                cmocka_unit_test(test_changes_during_match),
                cmocka_unit_test(test_stop),
                cmocka_unit_test(test_many),
                cmocka_unit_test(test_free_userdata),
        };

        /* One test, or those a glob matches: test-foo NAME (HACKING.md). */
        if (argc > 1)
                cmocka_set_test_filter(argv[1]);
        return cmocka_run_group_tests(tests, NULL, NULL);
}
