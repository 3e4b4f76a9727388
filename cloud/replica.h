/* SPDX-License-Identifier: Apache-2.0 */
/* The cluster's shared state (replica.c, prefix replica_; docs/cluster.md,
 * "Shared state"): the tables every node must agree on (the device
 * registry, API tokens, provisioning tokens, OTA jobs, webhooks,
 * campaigns; the list is replica.c's) are replicated between tether-cloudd nodes through the
 * JetStream stream TETHER_STATE, as SQLite changesets (the session
 * extension).
 *
 * Publishing. While a Replica is attached to the Store, a session object
 * records every change to those tables; when the Store commits (StoreHooks),
 * the changeset of what the transaction changed is written to the table
 * replica_outbox in the same transaction, so a commit and its changeset
 * are on disk together or not at all: nothing committed is lost to a crash
 * before it was published. The outbox is published in order, one
 * changeset in flight at a time (asynchronously: the loop never waits for
 * NATS), on subject tether.state.<node> with the headers Tether-Node and
 * Nats-Msg-Id (<node>:<incarnation>:<outbox id>, so a changeset sent
 * again after a lost acknowledgement is stored once); a row leaves the
 * outbox once JetStream acknowledged it. While NATS is unreachable the
 * outbox grows on disk and is retried with a backoff (and at once by
 * replica_kick()).
 *
 * Applying. The Replica follows the stream from the last sequence it
 * applied (kept in the Store, updated in the transaction that applies)
 * and applies every changeset in stream order, its own included, with
 * recording off: conflicts are resolved as data -> replace (an UPDATE's
 * changed columns), conflict -> the INSERT's values that are not NULL
 * replace the row's (its node did not have the row: its NULLs are no
 * values, and never undo what a concurrent change set),
 * not-found/constraint/foreign-key -> omit, so the stream's order decides
 * and every node that applied the stream up to a sequence holds the same
 * rows (a node's own changes show before their changeset is in the
 * stream; a concurrent older change of the same column may override them
 * for the moment until their own changeset comes back). A change that
 * only confirms what the node holds is not reported; every other change
 * is, after its commit, through ReplicaHooks.applied (modules that keep
 * state in memory learn about it there). Changesets may touch the
 * replicated tables only; anything else in them is ignored.
 *
 * Joining. A database that holds rows of a replicated table the stream
 * never had from it (a single node becoming a cluster, a table newly
 * replicated, a stream that was deleted and made anew) publishes them once,
 * as an export (header Tether-Export: 1): changesets of the rows as
 * INSERTs, queued in the outbox in the transaction that records the
 * export. They are applied like any other changeset: where the cluster
 * has a row of the same key, the exported row's values (not NULL)
 * replace the row's, on every node (the joining node too, once its export
 * comes back from the stream).
 *
 * Used from the loop's thread only. Errors are negative errno values;
 * ret_* parameters are untouched on failure. */
#pragma once

#include <stdbool.h>
#include <stdint.h>
#include <systemd/sd-event.h>

#include "bus.h"
#include "store.h"

#define REPLICA_STREAM "TETHER_STATE"
#define REPLICA_SUBJECT_PREFIX "tether.state."

typedef struct Replica Replica;

typedef enum ReplicaOp {
        REPLICA_INSERT,
        REPLICA_UPDATE,
        REPLICA_DELETE,
} ReplicaOp;

typedef struct ReplicaHooks {
        void *userdata;
        /* A row of table (the table's name in the Store) whose primary
         * key is key (the text of its first column: for campaign_devices
         * the campaign's id) was changed by the stream: op as the
         * changeset says; the row as it is now is committed in the Store.
         * May be NULL. */
        void (*applied)(void *userdata, const char *table, ReplicaOp op, const char *key);
        /* The Replica has applied the stream as far as it went when the
         * Replica was made: this node's tables say what the cluster's do.
         * Runs once, and not at all if that was so at once (then
         * replica_ready() is true after replica_new()). May be NULL. */
        void (*ready)(void *userdata);
} ReplicaHooks;

/* Create the stream TETHER_STATE (or update it: replicas copies,
 * subjects) and the Replica's tables in store, export what the stream
 * lacks of this database, attach to the store's commits and follow the
 * stream. Synchronous (the stream's creation and its state are asked for
 * with the Bus's timeouts); -ENOTCONN and the Bus's errors when NATS does
 * not answer. Call it after every module created its tables. event,
 * store and bus are borrowed and must outlive the Replica; node (the
 * node's name, [Cluster] Node=) is copied; hooks is copied. Logs what
 * failed. */
int replica_new(sd_event *event, Store *store, Bus *bus, const char *node, unsigned replicas,
                const ReplicaHooks *hooks, Replica **ret);
/* Commit the Store's batch (its changeset goes to the outbox, published
 * by the next run), detach from the Store, stop following. NULL is
 * fine. */
Replica *replica_free(Replica *r);
static inline void replica_freep(Replica **r) { replica_free(*r); }

/* Whether the stream was applied as far as it went at replica_new(). */
bool replica_ready(Replica *r);
/* Publish what waits now (the Bus reconnected), not after the backoff. */
void replica_kick(Replica *r);

typedef struct ReplicaStats {
        uint64_t applied_seq;   /* the last stream sequence applied */
        uint64_t applied;       /* changesets applied (own ones included) */
        uint64_t failed;        /* changesets that can never be applied (malformed, schema): skipped */
        uint64_t retried;       /* times a changeset could not be applied for a reason that may pass
                                 * (a lock, the disk): the stream is followed again from it */
        uint64_t replaced;      /* conflicts resolved by taking the stream's values */
        uint64_t omitted;       /* changes left out (not found, constraint, an export's row) */
        uint64_t published;     /* changesets JetStream acknowledged */
        uint64_t dropped;       /* changesets too large for NATS, logged and not published */
        uint64_t queued;        /* changesets in the outbox now */
} ReplicaStats;
void replica_stats(Replica *r, ReplicaStats *ret);
