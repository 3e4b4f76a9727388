/* SPDX-License-Identifier: Apache-2.0 */
/* A thread that fdatasync()s the event journal when asked, so the loop that
 * appends events never waits for the disk (journal.c, SyncIntervalMsec=).
 *
 * Guarantees: journal_syncer_request() never blocks on I/O; it hands the
 * thread a dup() of the descriptor, so the file may be replaced or closed
 * by the caller at once. Requests made while a sync runs are merged into
 * one more sync after it (group commit): every byte written before a
 * request is on disk once a sync that started after it ends. Each finished
 * sync is reported to the stats (stats_journal_synced()) with the events
 * and bytes it covered. journal_syncer_free() waits for the sync running
 * and the one asked for, then joins the thread. Library-like: failures of
 * fdatasync() are logged once per episode, not returned. */
#pragma once

#include <stddef.h>
#include <stdint.h>

typedef struct JournalSyncer JournalSyncer;

/* Start the thread. -errno (pthread_create's error as negative errno). */
int journal_syncer_new(JournalSyncer **ret);
/* Finish what was asked, stop the thread and free; NULL is fine. */
JournalSyncer *journal_syncer_free(JournalSyncer *s);
static inline void journal_syncer_freep(JournalSyncer **s) { journal_syncer_free(*s); }

/* Sync fd's data soon; events and bytes are what was appended since the
 * last request (for the unsynced gauges). 0, or -errno if fd could not be
 * duplicated (the caller then syncs inline). */
int journal_syncer_request(JournalSyncer *s, int fd, uint64_t events, uint64_t bytes);
