/* SPDX-License-Identifier: Apache-2.0 */
/* Where to start reading the event journal for an id: samples of (event
 * id, file offset) about every JOURNAL_SEEK_STEP bytes, in the order of
 * the file (ids grow with offsets). A reader that has to find its place
 * (a stream that resumes or falls behind, a cursor after the file was
 * rewritten) starts at the last sample at or before its id and reads at
 * most about one step to get there, not the whole file. No logging, no
 * I/O. */
#pragma once

#include <stddef.h>
#include <stdint.h>

#define JOURNAL_SEEK_STEP (256u * 1024)

typedef struct JournalSeekSample {
        uint64_t id, offset;
} JournalSeekSample;

typedef struct JournalSeek {
        JournalSeekSample *v;
        size_t n, cap;
} JournalSeek;

/* The event id starts at offset (both grow from call to call): kept when
 * it is a step or more past the last sample. Out of memory only means a
 * coarser index. */
void journal_seek_note(JournalSeek *s, uint64_t id, uint64_t offset);
/* The offset to read from to find the events after after_id: the last
 * sample with an id <= after_id + 1, or 0. */
uint64_t journal_seek_find(const JournalSeek *s, uint64_t after_id);
/* Forget the samples (keeps nothing allocated). */
void journal_seek_clear(JournalSeek *s);
