/* SPDX-License-Identifier: Apache-2.0 */
/* One log stream's reader: the system journal (or, for tests, a journal
 * directory: [Logs] Directory=) filtered by _SYSTEMD_UNIT=, formatted as
 * NDJSON (docs/protocol.md, "Log stream payload"): the backlog first
 * (lines, since), then, when following, new entries as they come.
 *
 * It produces only as much as its owner says may be sent (the room hook),
 * so it never buffers more than one formatted entry (at most about
 * 100 KiB: a message is cut to 16 KiB before escaping) and one message;
 * both are allocated only while needed. It reads at most
 * JOURNAL_STREAM_BATCH entries per turn of the loop and goes on from a
 * defer source. It owns its sd_journal, its event sources and buffers;
 * it does not log. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <systemd/sd-event.h>

#include "stream-proto.h"

#define JOURNAL_STREAM_BATCH 256

typedef struct JournalStream JournalStream;

typedef struct JournalStreamHooks {
        void *userdata;
        /* How many bytes may be sent now (0: none; at most
         * PROTO_STREAM_CHUNK_MAX is used per message). */
        size_t (*room)(void *userdata);
        /* Send data (len <= what room said; may be 0 with fin); fin: the
         * stream's last message. Negative errno: the stream is gone, the
         * reader stops (its owner frees it). */
        int (*send)(void *userdata, const void *data, size_t len, bool fin);
        /* Reading failed ("journal error: ..."); the owner frees the reader. */
        void (*failed)(void *userdata, const char *reason);
} JournalStreamHooks;

/* Open the journal (directory NULL or "": the local system journal) for
 * units (NULL-terminated; none: STREAM_DEFAULT_UNITS) from o's since, lines
 * and follow, and start producing. On failure a negative errno and a text
 * for the cloud in error ("cannot read the journal: Permission denied"). */
int journal_stream_new(sd_event *event, const char *directory, char *const *units, const StreamOpen *o,
                       const JournalStreamHooks *hooks, JournalStream **ret, char *error, size_t error_size);
JournalStream *journal_stream_free(JournalStream *j);
static inline void journal_stream_freep(JournalStream **j) { journal_stream_free(*j); }
/* There may be room now (credit came): go on producing (from the loop,
 * never inside this call). */
void journal_stream_kick(JournalStream *j);
