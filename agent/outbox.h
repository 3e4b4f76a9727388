/* SPDX-License-Identifier: Apache-2.0 */
/* The outbox: the agent's bounded, persistent queue of events for the
 * cloud. An event is written to the file DIR/outbox before outbox_append()
 * returns, so what a producer was told is accepted survives a crash of the
 * agent; fsync is batched (outbox_sync(), called on a timer by the owner)
 * unless the limits ask for a sync per event. Events leave the queue in
 * order when outbox_ack() reports the cloud's receipt.
 *
 * Every event gets a sequence number, increasing by one per event, and the
 * outbox has an epoch: a random number made when the file is created. The
 * pair (epoch, seq) identifies an event to the cloud, which drops resends
 * it has already delivered (docs/protocol.md, "Delivery"). Every event
 * also keeps the wall-clock time of its outbox_append(), which the cloud
 * reports as its publish time when it finds it sane (docs/protocol.md,
 * "Event time").
 *
 * File I/O and queue logic only: no logging, no event loop. Errors are
 * negative errno values. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "record.h"

#define OUTBOX_FILE "outbox"
/* A record's type byte, then its fields (lib/record.h frames them). */
#define OUTBOX_MAGIC 0x31424f54u /* "TOB1" on disk */

typedef struct Outbox Outbox;

typedef enum OutboxOverflow {
        OUTBOX_REJECT,      /* a full outbox refuses new events: -ENOBUFS */
        OUTBOX_DROP_OLDEST, /* ...or drops the oldest ones, counted */
} OutboxOverflow;

typedef struct OutboxLimits {
        size_t max_events;
        uint64_t max_bytes; /* on-disk size of the queued events */
        OutboxOverflow overflow;
        bool sync_always; /* fdatasync() inside every outbox_append() */
} OutboxLimits;

/* An event read back from the outbox; the pointers stay valid until the
 * next call on the outbox. name is NUL terminated; data has data_len
 * bytes followed by a NUL. */
typedef struct OutboxEvent {
        uint64_t seq;
        const char *name;
        const char *data;
        size_t data_len;
        uint32_t ttl;
        uint32_t flags;
        /* Wall clock at outbox_append(), ms since 1970-01-01T00:00:00Z;
         * 0: unknown (written by an agent that did not keep it). */
        uint64_t time_ms;
} OutboxEvent;

typedef struct OutboxStats {
        uint64_t appended;     /* accepted since open */
        uint64_t acked;        /* removed by outbox_ack() */
        uint64_t dropped;      /* removed by Overflow=drop-oldest */
        uint64_t rejected;     /* refused with -ENOBUFS */
        uint64_t write_errors; /* appends that failed to write (disk full...) */
        uint64_t unreadable;   /* queued events that could not be read back */
        uint64_t compactions;
        /* Found by outbox_open(). */
        uint64_t recovered;      /* events waiting in the file */
        size_t damaged_bytes;    /* skipped as damaged or torn */
        size_t damaged_places;   /* separate damaged stretches */
        uint64_t first_damage;   /* offset of the first, if any */
        bool recreated;          /* the file was unusable and set aside */
} OutboxStats;

/* Open (creating DIR and the file if missing) and recover the queue. The
 * file is locked: a second outbox on the same DIR gets -EBUSY. dir and
 * limits are copied. */
int outbox_open(const char *dir, const OutboxLimits *limits, Outbox **ret);
/* Syncs what is pending, then closes. NULL is fine. */
Outbox *outbox_free(Outbox *o);
static inline void outbox_freep(Outbox **o) { outbox_free(*o); }

/* New limits apply to later appends; events already queued stay. */
void outbox_set_limits(Outbox *o, const OutboxLimits *limits);

/* Append an event (name NUL terminated, data of data_len bytes, may be
 * NULL when data_len is 0), stamped with the wall clock (CLOCK_REALTIME)
 * of now. Nothing is checked but sizes: names and data are the caller's
 * business. On success *ret_seq (may be NULL) is its
 * sequence number. -ENOBUFS: full and Overflow=reject; -E2BIG: one event
 * larger than MaxBytes; a write error (-ENOSPC, -EIO...) leaves the queue
 * as it was. */
int outbox_append(Outbox *o, const char *name, const char *data, size_t data_len, uint32_t ttl,
                  uint32_t flags, uint64_t *ret_seq);
/* The first queued event with seq > after. 0 on success, -ENOENT when
 * there is none. Events that cannot be read back (damaged since they were
 * written) are dropped and counted in stats.unreadable. */
int outbox_next(Outbox *o, uint64_t after, OutboxEvent *ret);
/* The cloud has the event: remove it. -ENOENT if it is not queued (it was
 * dropped or acknowledged already). */
int outbox_ack(Outbox *o, uint64_t seq);
/* Persist what is pending: the acknowledgement record, fdatasync(), and a
 * compaction when the file holds more garbage than events. */
int outbox_sync(Outbox *o);
/* Whether outbox_sync() has something to do. */
bool outbox_dirty(const Outbox *o);

size_t outbox_count(const Outbox *o);
uint64_t outbox_bytes(const Outbox *o);
uint64_t outbox_epoch(const Outbox *o);
/* The sequence number the next appended event will get. */
uint64_t outbox_next_seq(const Outbox *o);
const OutboxStats *outbox_stats(const Outbox *o);

/* Test seam: the function that writes appended records (default pwrite).
 * A test makes it write part of a record to play a torn write. */
typedef record_pwrite_fn outbox_pwrite_fn;
void outbox_set_pwrite(Outbox *o, outbox_pwrite_fn fn);
