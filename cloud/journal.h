/* SPDX-License-Identifier: Apache-2.0 */
/* The event journal (journal.c, prefix journal_): every event the cloud
 * routes is first appended to the file StateDirectory/events.journal, with
 * an id that grows by one per event (in cluster mode: the id the cluster's
 * stream gave it, journal_append_at()). The journal knows, per device and
 * epoch, the highest sequence number delivered (docs/protocol.md,
 * "Delivery"), and SSE streams read it back to replay what a client missed
 * (Last-Event-ID). Bounded by JournalMaxBytes: when it is rewritten the
 * newest events are kept, but no device's beyond DeviceJournalShare=
 * percent while others' fit (a flooding device's older events go first;
 * journal.c, journal_compact()).
 *
 * A Journal depends on no other cloud module: it owns its files (and their
 * lock, so one cloud uses a state directory at a time) and one timer on the
 * sd-event loop for batched fdatasync(). Errors are negative errno values;
 * ret_* parameters are untouched on failure. */
#pragma once

#include <stdbool.h>
#include <stdint.h>
#include <systemd/sd-event.h>

#include "cloud-config.h"
#include "proto.h"

typedef struct Journal Journal;

/* Open (or create, or recover) the journal in config->state_dir. event and
 * config are borrowed and must outlive the Journal. Logs what went wrong;
 * *ret is the caller's (journal_free()). */
int journal_new(sd_event *event, const CloudConfig *config, Journal **ret);
/* Syncs and closes. NULL is fine; returns NULL. */
Journal *journal_free(Journal *j);
static inline void journal_freep(Journal **j) { journal_free(*j); }

/* Whether this device's event (epoch, seq) was delivered already. */
bool journal_seen(Journal *j, const char *device, uint64_t epoch, uint64_t seq);
/* The highest seq delivered for the device in this epoch, 0 if none. */
uint64_t journal_last_seq(Journal *j, const char *device, uint64_t epoch);
/* Append e (seq 0: no sequence number, not de-duplicated). *ret_id is
 * its id. A negative errno (-ENOSPC...) when it could not be written:
 * then nothing changed. */
int journal_append(Journal *j, const ProtoEvent *e, uint64_t epoch, uint64_t seq, uint64_t *ret_id);
/* Append e with the id id, which must be above journal_last_id() (gaps
 * are allowed: a cursor's reader sees them as events the journal no
 * longer has); otherwise as journal_append(), and -EINVAL for an id
 * that does not grow. For a journal that caches another's events with
 * their ids (cluster mode, cloud/journal-nats.h). */
int journal_append_at(Journal *j, const ProtoEvent *e, uint64_t epoch, uint64_t seq, uint64_t id);
/* The journal's epoch: random, made with the file (or the one given to
 * journal_reset()); ids from a journal with another epoch mean nothing
 * here. */
uint64_t journal_epoch(Journal *j);
/* The id of the last event appended (0: none yet). */
uint64_t journal_last_id(Journal *j);
/* Start afresh with this epoch: no events (the next id is 1), no device
 * states; the file that had events is kept as events.journal.old (one
 * such file, the last one), for people, never read again. Only while no
 * cursor is open (cursors would skip the new ids): at startup. On
 * failure the Journal takes no more appends (-EBADF) and has no events
 * or device states; free it. */
int journal_reset(Journal *j, uint64_t epoch);

/* Keep the events above after_id when the file is compacted (a backlog
 * that readers such as the outbound integrations, integrations.h, have
 * not acknowledged yet), up to [Events] BacklogMaxMB= of them, the newest
 * first: past that, the oldest go and a reader sees a gap in the ids.
 * JOURNAL_RETAIN_NONE (the default): no backlog, the file is bounded by
 * JournalMaxBytes alone. */
#define JOURNAL_RETAIN_NONE UINT64_MAX
void journal_retain(Journal *j, uint64_t after_id);

/* Reading the journal in order, from after a given id. A cursor borrows
 * its Journal: journal_cursor_done() it before journal_free(). */
typedef struct JournalCursor {
        Journal *journal;
        uint64_t generation; /* of the file the offset is in; 0: seek */
        uint64_t offset;
        uint64_t last_id;
        uint8_t *buf; /* a window of the file */
        uint64_t buf_off;
        size_t buf_len, buf_cap;
} JournalCursor;

void journal_cursor_init(JournalCursor *c, Journal *j, uint64_t after_id);
void journal_cursor_done(JournalCursor *c);
/* 1 and the next event (the caller proto_event_done()s it) with its id;
 * 0 at the end of the journal; negative errno on a read error. */
int journal_cursor_next(JournalCursor *c, ProtoEvent *ret, uint64_t *ret_id);
