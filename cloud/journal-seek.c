/* SPDX-License-Identifier: Apache-2.0 */
/* Samples of the event journal's (id, offset) pairs (journal-seek.h). */
#include "config.h"

#include <stdlib.h>

#include "journal-seek.h"

void journal_seek_note(JournalSeek *s, uint64_t id, uint64_t offset) {
        if (s->n > 0 && (offset < s->v[s->n - 1].offset + JOURNAL_SEEK_STEP || id <= s->v[s->n - 1].id))
                return;
        if (s->n == s->cap) {
                size_t cap = s->cap ? s->cap * 2 : 64;
                JournalSeekSample *v = reallocarray(s->v, cap, sizeof(*v));

                if (!v)
                        return;
                s->v = v;
                s->cap = cap;
        }
        s->v[s->n++] = (JournalSeekSample){ .id = id, .offset = offset };
}

uint64_t journal_seek_find(const JournalSeek *s, uint64_t after_id) {
        size_t lo = 0, hi = s->n;

        /* The first sample with an id past after_id + 1: the one before
         * it starts at or before the event wanted. */
        while (lo < hi) {
                size_t mid = lo + (hi - lo) / 2;

                if (s->v[mid].id <= after_id + 1)
                        lo = mid + 1;
                else
                        hi = mid;
        }
        return lo == 0 ? 0 : s->v[lo - 1].offset;
}

void journal_seek_clear(JournalSeek *s) {
        free(s->v);
        *s = (JournalSeek){};
}
