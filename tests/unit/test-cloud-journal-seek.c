/* SPDX-License-Identifier: Apache-2.0 */
/* Unit tests for the journal's seek samples (cloud/journal-seek.c): a
 * sample about every step, and the offset found for an id is never past
 * the event after it and at most about a step before it. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "cloud/journal-seek.h"

static void test_empty(void **state) {
        JournalSeek s = {};

        assert_int_equal(journal_seek_find(&s, 0), 0);
        assert_int_equal(journal_seek_find(&s, 12345), 0);
        journal_seek_clear(&s);
}

/* Events of 1000 bytes after a 100-byte header: event id i starts at
 * 100 + (i - first) * 1000. */
static void test_find(void **state) {
        const uint64_t first = 500, n = 10000, size = 1000;
        JournalSeek s = {};

        for (uint64_t i = 0; i < n; i++)
                journal_seek_note(&s, first + i, 100 + i * size);
        /* About one sample per step, not one per event. */
        assert_true(s.n >= n * size / JOURNAL_SEEK_STEP && s.n <= n * size / JOURNAL_SEEK_STEP + 2);
        for (uint64_t after = 0; after < first + n + 10; after += 7) {
                uint64_t off = journal_seek_find(&s, after), want;

                if (after + 1 <= first) {
                        assert_int_equal(off, after + 1 == first ? 100 : 0);
                        continue;
                }
                want = after + 1 < first + n ? 100 + (after + 1 - first) * size : 100 + n * size;
                assert_true(off <= want);
                assert_true(want - off <= JOURNAL_SEEK_STEP + size);
        }
        journal_seek_clear(&s);
        assert_int_equal(s.n, 0);
        assert_int_equal(journal_seek_find(&s, first + 10), 0);
}

/* Samples only go forward: a smaller id or offset is ignored. */
static void test_monotonic(void **state) {
        JournalSeek s = {};

        journal_seek_note(&s, 10, 0);
        journal_seek_note(&s, 5, 10 * JOURNAL_SEEK_STEP);
        journal_seek_note(&s, 20, 10);
        assert_int_equal(s.n, 1);
        journal_seek_note(&s, 30, 2 * JOURNAL_SEEK_STEP);
        assert_int_equal(s.n, 2);
        assert_int_equal(journal_seek_find(&s, 28), 0);
        assert_int_equal(journal_seek_find(&s, 29), 2 * JOURNAL_SEEK_STEP);
        journal_seek_clear(&s);
}

int main(int argc, char *argv[]) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_empty),
                cmocka_unit_test(test_find),
                cmocka_unit_test(test_monotonic),
        };

        /* One test, or those a glob matches: test-foo NAME (HACKING.md). */
        if (argc > 1)
                cmocka_set_test_filter(argv[1]);
        return cmocka_run_group_tests(tests, NULL, NULL);
}
