/* SPDX-License-Identifier: Apache-2.0 */
/* The cloud's persistent state (store.c, prefix store_): one SQLite
 * database, StateDirectory/cloud.db, in WAL mode, embedded (no server to
 * run). A Store is owned by the Cloud and used only from the loop's thread.
 *
 * Modules keep their own tables in it (the device registry, API tokens)
 * and create or upgrade them with store_migrate(): each module names its
 * schema steps, and a step runs once, in order, in one transaction with
 * the record that it ran. The audit log is the Store's own table.
 *
 * Writes on the hot path (a device connecting, during a storm of ten
 * thousand) go through store_batch(): they join one open transaction that
 * is committed within STORE_BATCH_MSEC, or at once by store_commit() (which
 * mutations that must be on disk before an answer use: revocation, tokens). Durability is SQLite's synchronous=NORMAL in WAL mode:
 * a committed transaction survives the process crashing; a power cut may
 * lose the last commits before a checkpoint, never corrupt the file.
 * Errors are negative errno values (-EIO for an SQLite error, logged with
 * SQLite's message); ret_* parameters are untouched on failure. */
#pragma once

#include <jansson.h>
#include <sqlite3.h>
#include <stdbool.h>
#include <stdint.h>
#include <systemd/sd-event.h>

#define STORE_FILE "cloud.db"
#define STORE_BATCH_MSEC 100

typedef struct Store Store;

/* Open (or create) dir/cloud.db; event is borrowed (the batch timer) and
 * must outlive the Store. Logs what failed. */
int store_open(sd_event *event, const char *dir, Store **ret);
/* Commit what is batched and close the database. NULL is fine. */
Store *store_free(Store *s);
static inline void store_freep(Store **s) { store_free(*s); }

/* The connection, for the modules' own prepared statements. */
sqlite3 *store_db(Store *s);

/* Bring component's tables to n_steps: run steps[v..n_steps-1] (SQL text,
 * several statements allowed) where v is the number that ran before, each
 * in its own transaction. -EPROTO if the database is of a newer version
 * (more steps ran than this program knows). */
int store_migrate(Store *s, const char *component, const char *const *steps, size_t n_steps);

/* Join the batch: after this, statements run inside one transaction that
 * is committed within STORE_BATCH_MSEC. */
int store_batch(Store *s);
/* Commit the batch now, if one is open. When the COMMIT fails and
 * SQLite did not roll the transaction back (SQLITE_BUSY), the batch stays
 * open and the timer commits it later. */
int store_commit(Store *s);
/* Roll the open batch back, if one is open: everything that joined it is
 * lost (StoreHooks.committed runs with -ECANCELED). For a caller that
 * committed the batch just before and knows it holds its own statements
 * only. */
int store_rollback(Store *s);
/* What a Store tells the one module that watches its commits (the
 * Replica, replica.h: it records the changes of the replicated tables
 * with a session object and queues each commit's changeset). */
typedef struct StoreHooks {
        void *userdata;
        /* The batch is about to be committed (store_commit(), the batch
         * timer): runs inside its transaction, so what it writes commits
         * with it, atomically. A negative errno: nothing is committed now;
         * the batch stays open and is committed by the next store_commit()
         * or the timer. */
        int (*committing)(void *userdata);
        /* The COMMIT ran: result 0, or its error (SQLite may have rolled
         * the transaction back: sqlite3_get_autocommit() tells). */
        void (*committed)(void *userdata, int result);
        /* Whether the open batch holds enough that it should be committed
         * before more joins it: store_batch() then commits it and opens a
         * new one (a statement that joins one batch after another such
         * call is then in the next transaction). May be NULL. */
        bool (*batch_full)(void *userdata);
} StoreHooks;
/* Attach hooks (copied), or detach them (NULL). */
void store_set_hooks(Store *s, const StoreHooks *hooks);

/* Log SQLite's message for a failed statement and return -EIO (-ENOMEM,
 * -ENOSPC, -EBUSY where SQLite says so). what names the statement. */
int store_error(Store *s, int sqlite_code, const char *what);

/* The audit log: who (actor: "token:NAME", "device:ID", "cloud") did what
 * (action: "device.revoke", "token.create", ...) to what (target, may be
 * NULL), with detail (a JSON object, borrowed, may be NULL) and the peer's
 * address (may be NULL). Joins the batch (a record per function call must
 * not cost a commit each): on disk within STORE_BATCH_MSEC, or at once
 * with the caller's store_commit(). */
int store_audit(Store *s, const char *actor, const char *action, const char *target, json_t *detail,
                const char *address);
/* Keep at most max_records audit records and none older than max_days
 * (0: no such limit): from now on, the oldest beyond either are deleted
 * once a minute, and a warning says how many went for the count (a flood
 * of requests pushing older records out is itself in the log). */
void store_audit_set_retention(Store *s, uint64_t max_records, unsigned max_days);
/* Delete what the retention allows now; the number deleted. */
int64_t store_audit_prune(Store *s);

/* Audit records with id > after_id, oldest first, at most limit, where
 * action starts with action_prefix and target equals target (either may be
 * NULL: any): a new JSON array of {"id", "time", "actor", "action",
 * "target", "detail", "address"} ("time" in RFC 3339 UTC). */
int store_audit_query(Store *s, int64_t after_id, unsigned limit, const char *action_prefix, const char *target,
                      json_t **ret);
