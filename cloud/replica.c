/* SPDX-License-Identifier: Apache-2.0 */
/* The cluster's shared state through TETHER_STATE (replica.h). */
#include "config.h"

/* The session extension's declarations: Debian's libsqlite3 is built with
 * it, the header shows it only on request (before its first inclusion). */
#define SQLITE_ENABLE_SESSION 1
#define SQLITE_ENABLE_PREUPDATE_HOOK 1
#include <sqlite3.h>

#include <errno.h>
#include <inttypes.h>
#include <string.h>
#include <sys/random.h>

#include "log.h"
#include "replica.h"
#include "util.h"

/* The replicated tables: each must have a PRIMARY KEY (sessions ignore
 * tables without one) and be created by its module before replica_new().
 * Adding a table to replication is one line here (its rows already in a
 * database are exported once, see replica_export()). */
static const char *const replica_tables[] = {
        "devices",          /* registry.c */
        "tokens",           /* tokens.c */
        "provision_tokens", /* provision.c */
        "ota_jobs",         /* ota.c */
        "webhooks",         /* webhooks.c */
        /* A campaign's devices before its row: a node that applies the row
         * has its devices (campaigns.c writes them in that order too). */
        "campaign_devices", /* campaigns.c */
        "campaigns",        /* campaigns.c */
};

/* A batch whose changeset may be larger is committed before more joins it
 * (StoreHooks.batch_full); an export's changesets are cut at this size. */
#define REPLICA_CHANGESET_MAX (256 * 1024)
/* Room for the headers next to a changeset in NATS's max_payload. */
#define REPLICA_HEADER_ROOM 1024
#define REPLICA_PUBLISH_TIMEOUT_USEC (5ULL * 1000000ULL)
#define REPLICA_RETRY_MIN_USEC (500ULL * 1000ULL)
#define REPLICA_RETRY_MAX_USEC (30ULL * 1000000ULL)
/* How long the stream remembers a Nats-Msg-Id: a changeset published again
 * after a lost acknowledgement within this time is stored once. */
#define REPLICA_DUPLICATE_WINDOW_NSEC (3600LL * 1000000000LL)
#define REPLICA_NODE_MAX 32
#define REPLICA_KEY_MAX 512

static const char *const replica_schema[] = {
        /* One row: which stream this database follows (its creation time,
         * the same on every node), how far it applied it, and this
         * database's incarnation (random: Nats-Msg-Ids of a node whose
         * database was made anew do not collide with its old ones). */
        "CREATE TABLE replica_state ("
        "  id INTEGER PRIMARY KEY CHECK (id = 1),"
        "  stream_created_ns INTEGER NOT NULL,"
        "  applied_seq INTEGER NOT NULL,"
        "  incarnation TEXT NOT NULL);"
        /* Changesets committed here and not yet acknowledged by JetStream,
         * in commit order; ids are never reused (AUTOINCREMENT). */
        "CREATE TABLE replica_outbox ("
        "  id INTEGER PRIMARY KEY AUTOINCREMENT,"
        "  changeset BLOB NOT NULL,"
        "  export INTEGER NOT NULL DEFAULT 0);"
        /* The replicated tables whose rows went to the stream (named by its
         * creation time) as an export. */
        "CREATE TABLE replica_exported ("
        "  name TEXT PRIMARY KEY,"
        "  stream_created_ns INTEGER NOT NULL);",
};

struct Replica {
        sd_event *event;
        Store *store;
        Bus *bus;
        char node[REPLICA_NODE_MAX + 1];
        char subject[sizeof(REPLICA_SUBJECT_PREFIX) + REPLICA_NODE_MAX];
        char incarnation[17];
        ReplicaHooks hooks;

        sqlite3_session *session;
        bool attached; /* to the Store's commits */

        /* The outbox: rows up to committed_max are committed; the open
         * transaction added pending_max (0: none). */
        int64_t committed_max, pending_max;
        BusRequest *in_flight;
        int64_t in_flight_id;
        sd_event_source *retry;
        uint64_t retry_usec;
        bool failing; /* the last publish failed: logged once until one works */

        BusSub *follow;
        /* A changeset could not be applied for a reason that may pass: the
         * follow is stopped, the timer follows again from applied_seq + 1. */
        bool follow_broken;
        sd_event_source *follow_retry;
        uint64_t follow_retry_usec;
        int64_t stream_created_ns;
        uint64_t applied_seq;
        uint64_t ready_seq; /* the stream's last sequence at replica_new() */
        bool ready;

        ReplicaStats stats;
};

static bool replica_table_known(const char *name) {
        for (size_t i = 0; i < ELEMENTSOF(replica_tables); i++)
                if (streq(replica_tables[i], name))
                        return true;
        return false;
}

static int replica_exec(Replica *r, const char *sql, const char *what) {
        int rc = sqlite3_exec(store_db(r->store), sql, NULL, NULL, NULL);

        return rc == SQLITE_OK ? 0 : store_error(r->store, rc, what);
}

/* ---- recording ------------------------------------------------------------ */

/* A session on the main database recording the replicated tables. */
static int replica_session_new(Replica *r, sqlite3_session **ret) {
        sqlite3_session *s = NULL;
        int rc, on = 1;

        rc = sqlite3session_create(store_db(r->store), "main", &s);
        if (rc == SQLITE_OK)
                rc = sqlite3session_object_config(s, SQLITE_SESSION_OBJCONFIG_SIZE, &on);
        for (size_t i = 0; rc == SQLITE_OK && i < ELEMENTSOF(replica_tables); i++)
                rc = sqlite3session_attach(s, replica_tables[i]);
        if (rc != SQLITE_OK) {
                if (s)
                        sqlite3session_delete(s);
                return store_error(r->store, rc, "recording the replicated tables");
        }
        *ret = s;
        return 0;
}

static int replica_outbox_add(Replica *r, const void *data, int len, bool export, int64_t *ret_id) {
        sqlite3 *db = store_db(r->store);
        sqlite3_stmt *st = NULL;
        int rc;

        rc = sqlite3_prepare_v2(db, "INSERT INTO replica_outbox (changeset, export) VALUES (?, ?)", -1, &st, NULL);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_blob(st, 1, data, len, SQLITE_STATIC);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_int(st, 2, export);
        if (rc == SQLITE_OK)
                rc = sqlite3_step(st) == SQLITE_DONE ? SQLITE_OK : sqlite3_errcode(db);
        sqlite3_finalize(st);
        if (rc != SQLITE_OK)
                return store_error(r->store, rc, "queueing a changeset for the cluster");
        *ret_id = sqlite3_last_insert_rowid(db);
        return 0;
}

/* StoreHooks.committing: the transaction's changeset into the outbox, in
 * the transaction; the next one is recorded by a new session. */
static int replica_committing(void *userdata) {
        Replica *r = userdata;
        sqlite3_session *next = NULL;
        void *data = NULL;
        int len = 0, rc, k;
        int64_t id;

        if (sqlite3session_isempty(r->session))
                return 0;
        /* The new session first: failing here leaves everything as it was. */
        k = replica_session_new(r, &next);
        if (k < 0)
                return k;
        rc = sqlite3session_changeset(r->session, &len, &data);
        if (rc != SQLITE_OK) {
                sqlite3session_delete(next);
                return store_error(r->store, rc, "taking the changeset of a commit");
        }
        /* An empty changeset may come in a buffer too: freed either way. */
        k = len > 0 ? replica_outbox_add(r, data, len, false, &id) : 0;
        sqlite3_free(data);
        if (k < 0) {
                sqlite3session_delete(next);
                return k;
        }
        if (len > 0)
                r->pending_max = id;
        sqlite3session_delete(r->session);
        r->session = next;
        return 0;
}

static void replica_publish_next(Replica *r);

static void replica_committed(void *userdata, int result) {
        Replica *r = userdata;

        if (result >= 0) {
                if (r->pending_max > r->committed_max)
                        r->committed_max = r->pending_max;
                r->pending_max = 0;
                replica_publish_next(r);
        } else if (sqlite3_get_autocommit(store_db(r->store)))
                /* Rolled back: its outbox row went with it. */
                r->pending_max = 0;
}

static bool replica_batch_full(void *userdata) {
        Replica *r = userdata;

        return sqlite3session_changeset_size(r->session) >= REPLICA_CHANGESET_MAX;
}

/* ---- publishing ------------------------------------------------------------- */

static int replica_retry_cb(sd_event_source *s, uint64_t usec, void *userdata) {
        replica_publish_next(userdata);
        return 0;
}

static void replica_retry_later(Replica *r) {
        r->retry_usec = r->retry_usec == 0                          ? REPLICA_RETRY_MIN_USEC
                        : r->retry_usec * 2 > REPLICA_RETRY_MAX_USEC ? REPLICA_RETRY_MAX_USEC
                                                                     : r->retry_usec * 2;
        (void)sd_event_source_set_time_relative(r->retry, r->retry_usec);
        (void)sd_event_source_set_enabled(r->retry, SD_EVENT_ONESHOT);
}

static int replica_outbox_delete(Replica *r, int64_t id) {
        sqlite3 *db = store_db(r->store);
        sqlite3_stmt *st = NULL;
        int rc, k;

        /* In the batch: a crash before it commits publishes it again, with
         * the same Nats-Msg-Id. */
        k = store_batch(r->store);
        if (k < 0)
                return k;
        rc = sqlite3_prepare_v2(db, "DELETE FROM replica_outbox WHERE id = ?", -1, &st, NULL);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_int64(st, 1, id);
        if (rc == SQLITE_OK)
                rc = sqlite3_step(st) == SQLITE_DONE ? SQLITE_OK : sqlite3_errcode(db);
        sqlite3_finalize(st);
        return rc == SQLITE_OK ? 0 : store_error(r->store, rc, "removing a published changeset");
}

static void replica_ack_cb(void *userdata, int error, uint64_t seq, bool duplicate) {
        Replica *r = userdata;
        int64_t id = r->in_flight_id;

        r->in_flight = NULL;
        r->in_flight_id = 0;
        if (error < 0) {
                if (!r->failing)
                        log_warning_errno(error, "Cluster state: cannot publish change set %" PRId64 " (%m); "
                                          "it stays queued and is sent again.", id);
                r->failing = true;
                replica_retry_later(r);
                return;
        }
        if (r->failing)
                log_notice("Cluster state: publishing again (change set %" PRId64 " is stream sequence %" PRIu64 ").",
                           id, seq);
        r->failing = false;
        r->retry_usec = 0;
        r->stats.published++;
        log_debug("Cluster state: change set %" PRId64 " is stream sequence %" PRIu64 "%s.", id, seq,
                  duplicate ? " (a duplicate)" : "");
        if (replica_outbox_delete(r, id) < 0) {
                /* Still queued: sent again later, stored once (its
                 * Nats-Msg-Id) if within the stream's duplicate window. */
                replica_retry_later(r);
                return;
        }
        replica_publish_next(r);
}

static size_t replica_payload_max(Replica *r) {
        int64_t max = natsConnection_GetMaxPayload(bus_connection(r->bus));

        return max > REPLICA_HEADER_ROOM ? (size_t)(max - REPLICA_HEADER_ROOM) : 0;
}

static void replica_publish_next(Replica *r) {
        sqlite3 *db = store_db(r->store);
        sqlite3_stmt *st = NULL;
        int rc, k;

        if (r->in_flight || !r->bus)
                return;
        (void)sd_event_source_set_enabled(r->retry, SD_EVENT_OFF);
        rc = sqlite3_prepare_v2(db,
                                "SELECT id, changeset, export FROM replica_outbox WHERE id <= ? ORDER BY id LIMIT 1",
                                -1, &st, NULL);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_int64(st, 1, r->committed_max);
        while (rc == SQLITE_OK && (rc = sqlite3_step(st)) == SQLITE_ROW) {
                int64_t id = sqlite3_column_int64(st, 0);
                const void *data = sqlite3_column_blob(st, 1);
                size_t len = (size_t)sqlite3_column_bytes(st, 1), max = replica_payload_max(r);
                char msg_id[REPLICA_NODE_MAX + 64];
                const char *headers[] = { "Tether-Node", r->node, "Nats-Msg-Id", msg_id,
                                          sqlite3_column_int(st, 2) ? "Tether-Export" : NULL, "1", NULL };

                if (max > 0 && len > max) {
                        /* Cannot be sent whole, and a changeset is applied
                         * whole or not at all: said loudly, then dropped
                         * (keeping it would stop every later one). The
                         * batch limit makes this need a single statement
                         * that changed more than NATS's max_payload. */
                        log_error("Cluster state: change set %" PRId64 " has %zu bytes, more than NATS's "
                                  "max_payload allows (%zu); it is NOT replicated. Other nodes miss that change "
                                  "until its rows change again.",
                                  id, len, max);
                        r->stats.dropped++;
                        sqlite3_finalize(st);
                        st = NULL;
                        if (replica_outbox_delete(r, id) < 0) {
                                replica_retry_later(r);
                                return;
                        }
                        if (r->in_flight) /* the delete committed a full batch, which published */
                                return;
                        rc = sqlite3_prepare_v2(db,
                                                "SELECT id, changeset, export FROM replica_outbox WHERE id <= ? "
                                                "ORDER BY id LIMIT 1",
                                                -1, &st, NULL);
                        if (rc == SQLITE_OK)
                                rc = sqlite3_bind_int64(st, 1, r->committed_max);
                        continue;
                }
                snprintf(msg_id, sizeof(msg_id), "%s:%s:%" PRId64, r->node, r->incarnation, id);
                k = bus_js_publish_async(r->bus, r->subject, headers, data, len, REPLICA_PUBLISH_TIMEOUT_USEC,
                                         replica_ack_cb, r, &r->in_flight);
                if (k < 0) {
                        r->in_flight = NULL;
                        if (!r->failing)
                                log_warning_errno(k, "Cluster state: cannot publish change set %" PRId64 " (%m); "
                                                  "it stays queued and is sent again.", id);
                        r->failing = true;
                        replica_retry_later(r);
                } else
                        r->in_flight_id = id;
                rc = SQLITE_DONE;
                break;
        }
        sqlite3_finalize(st);
        if (rc != SQLITE_DONE) {
                (void)store_error(r->store, rc, "reading the changesets to publish");
                replica_retry_later(r);
        }
}

void replica_kick(Replica *r) {
        if (!r || r->in_flight)
                return;
        r->retry_usec = 0;
        replica_publish_next(r);
}

/* ---- applying ----------------------------------------------------------------- */

/* An INSERT of a row that is here already (replica_conflict()): its values,
 * applied after the changeset as an update of the columns it gives a value
 * (replica_merge()). */
typedef struct Merge {
        struct Merge *next;
        const char *table; /* one of replica_tables */
        int n;             /* columns in the changeset */
        unsigned char *pk; /* n flags: part of the primary key */
        sqlite3_value **v; /* n values (copies) */
} Merge;

typedef struct ApplyContext {
        Replica *r;
        bool own;
        uint64_t seq;
        /* Changes whose conflict showed that the row already is as the
         * change would make it (an own changeset coming back). */
        size_t confirmed;
        Merge *merges; /* in reverse order (it does not matter: one change per row) */
        int error;     /* negative errno: the changeset is not applied now */
} ApplyContext;

static Merge *merge_free(Merge *m) {
        if (!m)
                return NULL;
        for (int i = 0; m->v && i < m->n; i++)
                sqlite3_value_free(m->v[i]);
        free(m->v);
        free(m->pk);
        free(m);
        return NULL;
}

static void merges_free(ApplyContext *ctx) {
        while (ctx->merges) {
                Merge *m = ctx->merges;

                ctx->merges = m->next;
                merge_free(m);
        }
}

static int replica_filter(void *userdata, const char *table) {
        return replica_table_known(table);
}

static bool value_same(sqlite3_value *a, sqlite3_value *b) {
        int t = sqlite3_value_type(a);

        if (t != sqlite3_value_type(b))
                return false;
        switch (t) {
        case SQLITE_NULL:
                return true;
        case SQLITE_INTEGER:
                return sqlite3_value_int64(a) == sqlite3_value_int64(b);
        case SQLITE_FLOAT:
                return sqlite3_value_double(a) == sqlite3_value_double(b);
        default: {
                int n = sqlite3_value_bytes(a);
                const void *pa = t == SQLITE_BLOB ? sqlite3_value_blob(a) : (const void *)sqlite3_value_text(a);
                const void *pb = t == SQLITE_BLOB ? sqlite3_value_blob(b) : (const void *)sqlite3_value_text(b);

                return n == sqlite3_value_bytes(b) && (n == 0 || (pa && pb && memcmp(pa, pb, (size_t)n) == 0));
        }
        }
}

/* Whether the conflicting row already holds every new value of the change
 * (an INSERT or UPDATE): applying it would change nothing. An INSERT's
 * NULL is no value (replica_conflict()). */
static bool change_is_present(sqlite3_changeset_iter *it) {
        const char *table;
        int n, op, indirect;

        if (sqlite3changeset_op(it, &table, &n, &op, &indirect) != SQLITE_OK || op == SQLITE_DELETE)
                return false;
        for (int i = 0; i < n; i++) {
                sqlite3_value *nv = NULL, *cv = NULL;

                if (sqlite3changeset_new(it, i, &nv) != SQLITE_OK)
                        return false;
                if (!nv) /* an UPDATE leaves this column as it is */
                        continue;
                if (op == SQLITE_INSERT && sqlite3_value_type(nv) == SQLITE_NULL)
                        continue;
                if (sqlite3changeset_conflict(it, i, &cv) != SQLITE_OK || !cv || !value_same(nv, cv))
                        return false;
        }
        return true;
}

/* Keep the values of an INSERT whose row is here, for replica_merge(). */
static int merge_add(ApplyContext *ctx, sqlite3_changeset_iter *it, const char *table, int n) {
        Merge *m = NULL;
        unsigned char *pk = NULL;
        int npk = 0;

        for (size_t i = 0; i < ELEMENTSOF(replica_tables); i++)
                if (streq(replica_tables[i], table)) {
                        m = calloc(1, sizeof(*m));
                        if (!m)
                                return -ENOMEM;
                        m->table = replica_tables[i];
                        break;
                }
        if (!m)
                return -EINVAL; /* replica_filter() let no other table through */
        m->n = n;
        m->pk = calloc((size_t)n, 1);
        m->v = calloc((size_t)n, sizeof(*m->v));
        if (!m->pk || !m->v || sqlite3changeset_pk(it, &pk, &npk) != SQLITE_OK || npk != n) {
                merge_free(m);
                return -ENOMEM;
        }
        memcpy(m->pk, pk, (size_t)n);
        for (int i = 0; i < n; i++) {
                sqlite3_value *v = NULL;

                if (sqlite3changeset_new(it, i, &v) != SQLITE_OK || !v || !(m->v[i] = sqlite3_value_dup(v))) {
                        merge_free(m);
                        return -ENOMEM;
                }
        }
        m->next = ctx->merges;
        ctx->merges = m;
        return 0;
}

static int replica_conflict(void *userdata, int type, sqlite3_changeset_iter *it) {
        ApplyContext *ctx = userdata;
        const char *table = "?";
        int n, op, indirect, k;

        (void)sqlite3changeset_op(it, &table, &n, &op, &indirect);
        switch (type) {
        case SQLITE_CHANGESET_DATA:
        case SQLITE_CHANGESET_CONFLICT:
                if (change_is_present(it)) {
                        ctx->confirmed++;
                        return SQLITE_CHANGESET_OMIT;
                }
                ctx->r->stats.replaced++;
                if (op != SQLITE_INSERT)
                        /* An UPDATE: only the columns it changed. */
                        return SQLITE_CHANGESET_REPLACE;
                /* An INSERT of a row that is here: its node did not have the
                 * row when it made it, so it is concurrent with the change
                 * that made the row here and with every change of it since.
                 * Its NULLs are columns its node knew nothing of, not values
                 * it chose: replacing the row would bring them back over
                 * what an earlier change set (a device revoked on one node
                 * while another registers it as it connects). Its values
                 * replace the row's, column by column, as an UPDATE's do. */
                k = merge_add(ctx, it, table, n);
                if (k < 0) {
                        ctx->error = k;
                        return SQLITE_CHANGESET_ABORT;
                }
                return SQLITE_CHANGESET_OMIT;
        default:
                log_debug("Cluster state: sequence %" PRIu64 ": a change of table '%s' is left out (%s).", ctx->seq,
                          table,
                          type == SQLITE_CHANGESET_NOTFOUND     ? "its row is not here"
                          : type == SQLITE_CHANGESET_CONSTRAINT ? "a constraint fails"
                          : type == SQLITE_CHANGESET_FOREIGN_KEY ? "a foreign key fails"
                                                                 : "a conflict");
                ctx->r->stats.omitted++;
                return SQLITE_CHANGESET_OMIT;
        }
}

/* Report every change of the changeset (of the replicated tables). */
static void replica_report(Replica *r, const void *data, int len) {
        sqlite3_changeset_iter *it = NULL;
        int rc;

        if (!r->hooks.applied)
                return;
        rc = sqlite3changeset_start(&it, len, (void *)data);
        while (rc == SQLITE_OK && sqlite3changeset_next(it) == SQLITE_ROW) {
                const char *table;
                unsigned char *pk = NULL;
                int n, op, indirect, npk;
                sqlite3_value *v = NULL;
                char key[REPLICA_KEY_MAX];

                if (sqlite3changeset_op(it, &table, &n, &op, &indirect) != SQLITE_OK || !replica_table_known(table) ||
                    sqlite3changeset_pk(it, &pk, &npk) != SQLITE_OK)
                        continue;
                key[0] = 0;
                for (int i = 0; i < npk; i++)
                        if (pk[i]) {
                                if (op == SQLITE_INSERT)
                                        (void)sqlite3changeset_new(it, i, &v);
                                else
                                        (void)sqlite3changeset_old(it, i, &v);
                                if (v && sqlite3_value_text(v))
                                        snprintf(key, sizeof(key), "%s", (const char *)sqlite3_value_text(v));
                                break;
                        }
                r->hooks.applied(r->hooks.userdata, table,
                                 op == SQLITE_INSERT ? REPLICA_INSERT : op == SQLITE_DELETE ? REPLICA_DELETE : REPLICA_UPDATE,
                                 key);
        }
        sqlite3changeset_finalize(it);
}

static int changeset_count(const void *data, int len, size_t *ret) {
        sqlite3_changeset_iter *it = NULL;
        size_t n = 0;
        int rc;

        rc = sqlite3changeset_start(&it, len, (void *)data);
        while (rc == SQLITE_OK && (rc = sqlite3changeset_next(it)) == SQLITE_ROW)
                n++, rc = SQLITE_OK;
        if (it) {
                int rc2 = sqlite3changeset_finalize(it);

                if (rc == SQLITE_DONE)
                        rc = rc2;
        }
        if (rc != SQLITE_OK && rc != SQLITE_DONE)
                return rc;
        *ret = n;
        return SQLITE_OK;
}

static int replica_save_seq(Replica *r, uint64_t seq) {
        sqlite3 *db = store_db(r->store);
        sqlite3_stmt *st = NULL;
        int rc;

        rc = sqlite3_prepare_v2(db, "UPDATE replica_state SET applied_seq = ? WHERE id = 1", -1, &st, NULL);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_int64(st, 1, (sqlite3_int64)seq);
        if (rc == SQLITE_OK)
                rc = sqlite3_step(st) == SQLITE_DONE ? SQLITE_OK : sqlite3_errcode(db);
        sqlite3_finalize(st);
        return rc == SQLITE_OK ? 0 : store_error(r->store, rc, "recording the applied stream sequence");
}

/* Apply a Merge: UPDATE its table SET every column it has a value for
 * (not NULL), WHERE its primary key. */
static int replica_merge(Replica *r, const Merge *m) {
        sqlite3 *db = store_db(r->store);
        sqlite3_stmt *st = NULL;
        char *sql = NULL, *set = NULL, *where = NULL;
        int rc, cid = 0;

        rc = sqlite3_prepare_v2(db, "SELECT name FROM pragma_table_info(?) ORDER BY cid", -1, &st, NULL);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_text(st, 1, m->table, -1, SQLITE_STATIC);
        while (rc == SQLITE_OK && cid < m->n && (rc = sqlite3_step(st)) == SQLITE_ROW) {
                const char *name = (const char *)sqlite3_column_text(st, 0);
                char **part = m->pk[cid] ? &where : &set;
                const char *sep;
                char *p;

                rc = SQLITE_OK;
                if (!m->pk[cid] && sqlite3_value_type(m->v[cid]) == SQLITE_NULL) {
                        cid++;
                        continue;
                }
                sep = !*part ? "" : m->pk[cid] ? " AND " : ", ";
                p = sqlite3_mprintf("%z%s\"%w\" = ?%d", *part, sep, name ?: "", cid + 1);
                if (!p)
                        rc = SQLITE_NOMEM;
                *part = p;
                cid++;
        }
        if (rc == SQLITE_DONE)
                rc = cid == m->n ? SQLITE_OK : SQLITE_SCHEMA; /* fewer columns here than in the changeset */
        sqlite3_finalize(st);
        st = NULL;
        if (rc == SQLITE_OK && set && where) {
                sql = sqlite3_mprintf("UPDATE main.\"%w\" SET %s WHERE %s", m->table, set, where);
                rc = sql ? sqlite3_prepare_v2(db, sql, -1, &st, NULL) : SQLITE_NOMEM;
                for (int i = 0; rc == SQLITE_OK && i < m->n; i++)
                        if (m->pk[i] || sqlite3_value_type(m->v[i]) != SQLITE_NULL)
                                rc = sqlite3_bind_value(st, i + 1, m->v[i]);
                if (rc == SQLITE_OK)
                        rc = sqlite3_step(st) == SQLITE_DONE ? SQLITE_OK : sqlite3_errcode(db);
                sqlite3_finalize(st);
        } else if (rc == SQLITE_OK && !where)
                rc = SQLITE_SCHEMA; /* no primary key column: not a table of ours */
        sqlite3_free(sql);
        sqlite3_free(set);
        sqlite3_free(where);
        return rc;
}

/* Whether a failed SQLite call may succeed later with the same input (a
 * lock, memory, the disk), rather than never (a malformed changeset, one
 * that does not fit the schema). */
static bool sqlite_transient(int rc) {
        switch (rc & 0xff) {
        case SQLITE_BUSY:
        case SQLITE_LOCKED:
        case SQLITE_NOMEM:
        case SQLITE_IOERR:
        case SQLITE_FULL:
        case SQLITE_CANTOPEN:
        case SQLITE_PROTOCOL:
        case SQLITE_INTERRUPT:
        case SQLITE_READONLY:
                return true;
        default:
                return false;
        }
}

/* Apply the changeset at stream sequence seq (len 0: nothing to apply)
 * and record seq as applied, in one commit. 0 when seq is taken (applied,
 * or skipped because it can never apply: logged, counted as failed); a
 * negative errno when nothing of it was done and it must be tried again
 * (logged by the caller). */
static int replica_apply(Replica *r, const char *node, const void *data, int len, bool export, uint64_t seq) {
        ApplyContext ctx = { .r = r, .own = streq(node, r->node), .seq = seq };
        sqlite3 *db = store_db(r->store);
        size_t changes = 0;
        int rc, failed = SQLITE_OK, k;

        /* What this node changed so far is committed (and its changeset
         * taken) first: the session must not hold a row the changeset
         * touches, or its next changeset would carry the applied values
         * as this node's own. The batch then holds what is done here
         * only, so that it can be rolled back whole. */
        k = store_commit(r->store);
        if (k >= 0)
                k = store_batch(r->store);
        if (k < 0)
                return k;
        if (len > 0) {
                rc = changeset_count(data, len, &changes);
                if (rc != SQLITE_OK && !sqlite_transient(rc)) {
                        failed = rc; /* malformed: the sequence is taken all the same */
                        rc = SQLITE_OK;
                }
                if (rc != SQLITE_OK)
                        return store_error(r->store, rc, "reading a change set of the cluster");
        }
        (void)sqlite3session_enable(r->session, 0);
        /* The changeset, its merges and the sequence as one: all or
         * nothing. */
        rc = sqlite3_exec(db, "SAVEPOINT replica_apply", NULL, NULL, NULL);
        if (rc == SQLITE_OK) {
                if (len > 0 && failed == SQLITE_OK) {
                        rc = sqlite3changeset_apply(db, len, (void *)data, replica_filter, replica_conflict, &ctx);
                        for (Merge *m = ctx.merges; rc == SQLITE_OK && m; m = m->next) {
                                int mrc = replica_merge(r, m);

                                if ((mrc & 0xff) == SQLITE_CONSTRAINT) {
                                        log_debug("Cluster state: sequence %" PRIu64 ": a change of table '%s' is "
                                                  "left out (a constraint fails).",
                                                  seq, m->table);
                                        r->stats.omitted++;
                                } else
                                        rc = mrc;
                        }
                        if (rc != SQLITE_OK && ctx.error == 0 && !sqlite_transient(rc)) {
                                /* It never will apply: undo what of it was
                                 * done, take the sequence. */
                                (void)sqlite3_exec(db, "ROLLBACK TO replica_apply", NULL, NULL, NULL);
                                failed = rc;
                                rc = SQLITE_OK;
                        }
                }
                if (ctx.error < 0)
                        k = ctx.error;
                else if (rc != SQLITE_OK)
                        /* SQLite's message is gone with the changeset's own savepoint. */
                        k = store_error(NULL, rc, "applying a change set of the cluster");
                else
                        k = replica_save_seq(r, seq);
                if (k < 0)
                        (void)sqlite3_exec(db, "ROLLBACK TO replica_apply", NULL, NULL, NULL);
                (void)sqlite3_exec(db, "RELEASE replica_apply", NULL, NULL, NULL);
        } else
                k = store_error(r->store, rc, "applying a change set of the cluster");
        (void)sqlite3session_enable(r->session, 1);
        merges_free(&ctx);
        if (k < 0)
                return k;
        k = store_commit(r->store);
        if (k < 0) {
                /* Still open (the COMMIT was refused, not rolled back): it
                 * holds this changeset only; try it again later. */
                (void)store_rollback(r->store);
                return k;
        }
        r->applied_seq = seq;
        r->stats.applied_seq = seq;
        if (failed != SQLITE_OK) {
                r->stats.failed++;
                log_warning("Cluster state: the change set at stream sequence %" PRIu64 " from node '%s' cannot be "
                            "applied (%s); skipped.",
                            seq, node, sqlite3_errstr(failed));
                return 0;
        }
        if (len == 0)
                return 0;
        r->stats.applied++;
        if (export && !ctx.own)
                log_info("Cluster state: applied rows node '%s' held before it joined (stream sequence %" PRIu64 ").",
                         node, seq);
        /* An own changeset that only confirms what is here (the usual
         * case) changed nothing. */
        if (!(ctx.own && ctx.confirmed == changes))
                replica_report(r, data, len);
        return 0;
}

static int replica_follow_start(Replica *r);

static int replica_follow_retry_cb(sd_event_source *s, uint64_t usec, void *userdata) {
        Replica *r = userdata;
        int k;

        r->follow = bus_sub_free(r->follow);
        k = replica_follow_start(r);
        if (k < 0) {
                log_warning_errno(k, "Cluster state: cannot follow the stream %s again, retrying: %m",
                                  REPLICA_STREAM);
                r->follow_retry_usec = r->follow_retry_usec * 2 > REPLICA_RETRY_MAX_USEC ? REPLICA_RETRY_MAX_USEC
                                                                                       : r->follow_retry_usec * 2;
                (void)sd_event_source_set_time_relative(r->follow_retry, r->follow_retry_usec);
                (void)sd_event_source_set_enabled(r->follow_retry, SD_EVENT_ONESHOT);
                return 0;
        }
        r->follow_broken = false;
        log_info("Cluster state: following the stream %s again from sequence %" PRIu64 ".", REPLICA_STREAM,
                 r->applied_seq + 1);
        return 0;
}

/* Nothing after seq may be applied before it: stop, and follow the stream
 * again from it after a backoff. */
static void replica_follow_later(Replica *r, uint64_t seq, int error) {
        r->stats.retried++;
        r->follow_broken = true;
        r->follow_retry_usec = r->follow_retry_usec == 0                          ? REPLICA_RETRY_MIN_USEC
                               : r->follow_retry_usec * 2 > REPLICA_RETRY_MAX_USEC ? REPLICA_RETRY_MAX_USEC
                                                                                   : r->follow_retry_usec * 2;
        log_warning_errno(error,
                          "Cluster state: cannot apply stream sequence %" PRIu64 " now (%m); trying it again in "
                          "%" PRIu64 " ms.",
                          seq, r->follow_retry_usec / 1000);
        (void)sd_event_source_set_time_relative(r->follow_retry, r->follow_retry_usec);
        (void)sd_event_source_set_enabled(r->follow_retry, SD_EVENT_ONESHOT);
}

static void replica_msg_cb(void *userdata, natsMsg *msg) {
        Replica *r = userdata;
        uint64_t seq = bus_msg_seq(msg);
        const char *node = bus_msg_header(msg, "Tether-Node");
        const char *export = bus_msg_header(msg, "Tether-Export");
        int len = natsMsg_GetDataLength(msg), k;

        if (r->follow_broken || seq == 0 || seq <= r->applied_seq)
                return;
        if (!node) {
                const char *subject = natsMsg_GetSubject(msg) ?: "";

                node = strncmp(subject, REPLICA_SUBJECT_PREFIX, strlen(REPLICA_SUBJECT_PREFIX)) == 0
                               ? subject + strlen(REPLICA_SUBJECT_PREFIX)
                               : "?";
        }
        k = replica_apply(r, node, len > 0 ? natsMsg_GetData(msg) : NULL, len > 0 ? len : 0,
                          export && streq(export, "1"), seq);
        if (k < 0)
                return replica_follow_later(r, seq, k);
        r->follow_retry_usec = 0;
        if (!r->ready && r->applied_seq >= r->ready_seq) {
                r->ready = true;
                log_info("Cluster state: caught up with the stream (sequence %" PRIu64 ").", r->applied_seq);
                if (r->hooks.ready)
                        r->hooks.ready(r->hooks.userdata);
        }
}

static int replica_follow_start(Replica *r) {
        return bus_stream_follow(r->bus, REPLICA_STREAM, NULL, r->applied_seq + 1, replica_msg_cb, r, &r->follow);
}

/* ---- joining ------------------------------------------------------------------- */

/* The rows of table as INSERTs, into the outbox as export changesets of
 * about REPLICA_CHANGESET_MAX: a session on the attached empty copy
 * replica_scratch.<table> records them being copied there, row by row. */
static int replica_export_table(Replica *r, const char *table, size_t *ret_rows) {
        sqlite3 *db = store_db(r->store);
        _cleanup_free_ char *create = NULL, *copy = NULL, *clear = NULL;
        sqlite3_stmt *st = NULL, *rows = NULL, *ins = NULL;
        sqlite3_session *s = NULL;
        const char *sql, *paren;
        size_t n = 0;
        int rc, k = 0, on = 1;

        rc = sqlite3_prepare_v2(db, "SELECT sql FROM main.sqlite_master WHERE type = 'table' AND name = ?", -1, &st,
                                NULL);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_text(st, 1, table, -1, SQLITE_STATIC);
        if (rc == SQLITE_OK && (rc = sqlite3_step(st)) == SQLITE_ROW) {
                /* "CREATE TABLE name (columns...)": the same columns, in
                 * the same order, with the same primary key. */
                sql = (const char *)sqlite3_column_text(st, 0);
                paren = sql ? strchr(sql, '(') : NULL;
                if (paren && asprintf(&create, "CREATE TABLE replica_scratch.\"%s\" %s", table, paren) < 0)
                        create = NULL;
                rc = create ? SQLITE_OK : SQLITE_NOMEM;
        } else if (rc == SQLITE_DONE)
                rc = SQLITE_ERROR;
        sqlite3_finalize(st);
        if (rc != SQLITE_OK)
                return store_error(r->store, rc, "reading a replicated table's definition");
        if (asprintf(&copy, "INSERT INTO replica_scratch.\"%s\" SELECT * FROM main.\"%s\" WHERE rowid = ?", table,
                     table) < 0 ||
            asprintf(&clear, "DELETE FROM replica_scratch.\"%s\"", table) < 0)
                return -ENOMEM;
        rc = sqlite3_exec(db, create, NULL, NULL, NULL);
        if (rc != SQLITE_OK)
                return store_error(r->store, rc, "preparing the export of a replicated table");
        {
                _cleanup_free_ char *q = NULL;

                if (asprintf(&q, "SELECT rowid FROM main.\"%s\" ORDER BY rowid", table) < 0)
                        return -ENOMEM;
                rc = sqlite3_prepare_v2(db, q, -1, &rows, NULL);
        }
        if (rc == SQLITE_OK)
                rc = sqlite3_prepare_v2(db, copy, -1, &ins, NULL);
        while (rc == SQLITE_OK) {
                bool more;

                if (!s) {
                        rc = sqlite3session_create(db, "replica_scratch", &s);
                        if (rc == SQLITE_OK)
                                rc = sqlite3session_object_config(s, SQLITE_SESSION_OBJCONFIG_SIZE, &on);
                        if (rc == SQLITE_OK)
                                rc = sqlite3session_attach(s, table);
                        if (rc != SQLITE_OK)
                                break;
                }
                rc = sqlite3_step(rows);
                more = rc == SQLITE_ROW;
                if (!more && rc != SQLITE_DONE)
                        break;
                rc = SQLITE_OK;
                if (more) {
                        rc = sqlite3_bind_int64(ins, 1, sqlite3_column_int64(rows, 0));
                        if (rc == SQLITE_OK)
                                rc = sqlite3_step(ins) == SQLITE_DONE ? SQLITE_OK : sqlite3_errcode(db);
                        sqlite3_reset(ins);
                        if (rc != SQLITE_OK)
                                break;
                        n++;
                }
                if (!more || sqlite3session_changeset_size(s) >= REPLICA_CHANGESET_MAX) {
                        void *data = NULL;
                        int len = 0;
                        int64_t id;

                        rc = sqlite3session_changeset(s, &len, &data);
                        if (rc != SQLITE_OK)
                                break;
                        if (len > 0) {
                                k = replica_outbox_add(r, data, len, true, &id);
                                r->pending_max = id;
                        }
                        sqlite3_free(data);
                        sqlite3session_delete(s);
                        s = NULL;
                        if (k < 0)
                                break;
                        rc = sqlite3_exec(db, clear, NULL, NULL, NULL);
                        if (!more)
                                break;
                }
        }
        if (s)
                sqlite3session_delete(s);
        sqlite3_finalize(rows);
        sqlite3_finalize(ins);
        if (k < 0)
                return k;
        if (rc != SQLITE_OK)
                return store_error(r->store, rc, "exporting a replicated table");
        *ret_rows = n;
        return 0;
}

/* Whether table went to this stream already. */
static int replica_exported(Replica *r, const char *table, bool *ret) {
        sqlite3_stmt *st = NULL;
        int rc;

        rc = sqlite3_prepare_v2(store_db(r->store),
                                "SELECT 1 FROM replica_exported WHERE name = ? AND stream_created_ns = ?", -1, &st,
                                NULL);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_text(st, 1, table, -1, SQLITE_STATIC);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_int64(st, 2, r->stream_created_ns);
        if (rc == SQLITE_OK) {
                rc = sqlite3_step(st);
                *ret = rc == SQLITE_ROW;
                rc = rc == SQLITE_ROW || rc == SQLITE_DONE ? SQLITE_OK : rc;
        }
        sqlite3_finalize(st);
        return rc == SQLITE_OK ? 0 : store_error(r->store, rc, "reading what was exported");
}

static int replica_mark_exported(Replica *r, const char *table) {
        sqlite3_stmt *st = NULL;
        int rc;

        rc = sqlite3_prepare_v2(store_db(r->store),
                                "INSERT INTO replica_exported (name, stream_created_ns) VALUES (?1, ?2) "
                                "ON CONFLICT (name) DO UPDATE SET stream_created_ns = ?2",
                                -1, &st, NULL);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_text(st, 1, table, -1, SQLITE_STATIC);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_int64(st, 2, r->stream_created_ns);
        if (rc == SQLITE_OK)
                rc = sqlite3_step(st) == SQLITE_DONE ? SQLITE_OK : sqlite3_errcode(store_db(r->store));
        sqlite3_finalize(st);
        return rc == SQLITE_OK ? 0 : store_error(r->store, rc, "recording an export");
}

/* Export every replicated table that did not go to this stream yet, in
 * one transaction with the record that it did. */
static int replica_export(Replica *r) {
        bool attached = false;
        size_t total = 0;
        int k;

        for (size_t i = 0; i < ELEMENTSOF(replica_tables); i++) {
                bool done;
                size_t rows = 0;

                k = replica_exported(r, replica_tables[i], &done);
                if (k < 0)
                        goto fail;
                if (done)
                        continue;
                if (!attached) {
                        /* ATTACH is refused inside a transaction. */
                        k = replica_exec(r, "ATTACH DATABASE ':memory:' AS replica_scratch",
                                         "preparing an export");
                        if (k < 0)
                                return k;
                        attached = true;
                        k = replica_exec(r, "BEGIN IMMEDIATE", "starting an export");
                        if (k < 0)
                                goto fail;
                }
                k = replica_export_table(r, replica_tables[i], &rows);
                if (k >= 0)
                        k = replica_mark_exported(r, replica_tables[i]);
                if (k < 0) {
                        (void)sqlite3_exec(store_db(r->store), "ROLLBACK", NULL, NULL, NULL);
                        r->pending_max = 0;
                        goto fail;
                }
                if (rows > 0)
                        log_info("Cluster state: publishing the %zu row(s) of table '%s' this node held before it "
                                 "joined the stream.",
                                 rows, replica_tables[i]);
                total += rows;
        }
        if (!attached)
                return 0;
        k = replica_exec(r, "COMMIT", "committing an export");
        if (k < 0) {
                (void)sqlite3_exec(store_db(r->store), "ROLLBACK", NULL, NULL, NULL);
                r->pending_max = 0;
                goto fail;
        }
        if (r->pending_max > r->committed_max)
                r->committed_max = r->pending_max;
        r->pending_max = 0;
        k = 0;
fail:
        if (attached)
                (void)sqlite3_exec(store_db(r->store), "DETACH DATABASE replica_scratch", NULL, NULL, NULL);
        return k;
}

/* ---- the object ------------------------------------------------------------- */

/* Read the state row; a new one (stream changed, or none): sequence 0,
 * the outbox emptied (the export carries what it held). */
static int replica_load_state(Replica *r) {
        sqlite3 *db = store_db(r->store);
        sqlite3_stmt *st = NULL;
        int64_t created = 0, seq = 0;
        bool found = false;
        int rc, k;

        rc = sqlite3_prepare_v2(db, "SELECT stream_created_ns, applied_seq, incarnation FROM replica_state", -1, &st,
                                NULL);
        if (rc == SQLITE_OK && (rc = sqlite3_step(st)) == SQLITE_ROW) {
                const char *inc = (const char *)sqlite3_column_text(st, 2);

                found = true;
                created = sqlite3_column_int64(st, 0);
                seq = sqlite3_column_int64(st, 1);
                snprintf(r->incarnation, sizeof(r->incarnation), "%s", inc ?: "");
                rc = SQLITE_OK;
        } else if (rc == SQLITE_DONE)
                rc = SQLITE_OK;
        sqlite3_finalize(st);
        if (rc != SQLITE_OK)
                return store_error(r->store, rc, "reading the cluster state's position");
        if (found && created == r->stream_created_ns && seq >= 0) {
                r->applied_seq = (uint64_t)seq;
                return 0;
        }
        if (found)
                log_notice("Cluster state: the stream %s is not the one this database followed (created %" PRId64
                           " ns, not %" PRId64 "): applying it from its start and publishing this node's rows.",
                           REPLICA_STREAM, r->stream_created_ns, created);
        if (!r->incarnation[0]) {
                uint8_t b[8];

                if (getrandom(b, sizeof(b), 0) != sizeof(b))
                        return -errno;
                hex_encode(b, sizeof(b), r->incarnation);
        }
        k = replica_exec(r, "BEGIN IMMEDIATE", "resetting the cluster state's position");
        if (k < 0)
                return k;
        k = replica_exec(r, "DELETE FROM replica_outbox", "resetting the cluster state's position");
        if (k >= 0) {
                rc = sqlite3_prepare_v2(db,
                                        "INSERT OR REPLACE INTO replica_state (id, stream_created_ns, applied_seq, "
                                        "incarnation) VALUES (1, ?, 0, ?)",
                                        -1, &st, NULL);
                if (rc == SQLITE_OK)
                        rc = sqlite3_bind_int64(st, 1, r->stream_created_ns);
                if (rc == SQLITE_OK)
                        rc = sqlite3_bind_text(st, 2, r->incarnation, -1, SQLITE_STATIC);
                if (rc == SQLITE_OK)
                        rc = sqlite3_step(st) == SQLITE_DONE ? SQLITE_OK : sqlite3_errcode(db);
                sqlite3_finalize(st);
                k = rc == SQLITE_OK ? 0 : store_error(r->store, rc, "resetting the cluster state's position");
        }
        if (k >= 0)
                k = replica_exec(r, "COMMIT", "resetting the cluster state's position");
        if (k < 0) {
                (void)sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
                return k;
        }
        r->applied_seq = 0;
        return 0;
}

/* Every replicated table exists and has a primary key. */
static int replica_check_tables(Replica *r) {
        for (size_t i = 0; i < ELEMENTSOF(replica_tables); i++) {
                sqlite3_stmt *st = NULL;
                int64_t n = -1;
                int rc;

                rc = sqlite3_prepare_v2(store_db(r->store),
                                        "SELECT count(*), sum(pk > 0) FROM pragma_table_info(?)", -1, &st, NULL);
                if (rc == SQLITE_OK)
                        rc = sqlite3_bind_text(st, 1, replica_tables[i], -1, SQLITE_STATIC);
                if (rc == SQLITE_OK && (rc = sqlite3_step(st)) == SQLITE_ROW) {
                        n = sqlite3_column_int64(st, 0) > 0 ? sqlite3_column_int64(st, 1) : -1;
                        rc = SQLITE_OK;
                }
                sqlite3_finalize(st);
                if (rc != SQLITE_OK)
                        return store_error(r->store, rc, "checking the replicated tables");
                if (n <= 0) {
                        log_error("Cluster state: the table '%s' %s.", replica_tables[i],
                                  n < 0 ? "does not exist" : "has no primary key; it cannot be replicated");
                        return -EINVAL;
                }
        }
        return 0;
}

static int replica_count_outbox(Replica *r, int64_t *ret_max, uint64_t *ret_n) {
        sqlite3_stmt *st = NULL;
        int rc;

        rc = sqlite3_prepare_v2(store_db(r->store), "SELECT coalesce(max(id), 0), count(*) FROM replica_outbox", -1,
                                &st, NULL);
        if (rc == SQLITE_OK && (rc = sqlite3_step(st)) == SQLITE_ROW) {
                if (ret_max)
                        *ret_max = sqlite3_column_int64(st, 0);
                *ret_n = (uint64_t)sqlite3_column_int64(st, 1);
                rc = SQLITE_OK;
        }
        sqlite3_finalize(st);
        return rc == SQLITE_OK ? 0 : store_error(r->store, rc, "reading the changesets to publish");
}

static int replica_stream_last_seq(Replica *r, uint64_t *ret) {
        jsStreamInfo *si = NULL;
        jsErrCode jerr = 0;
        natsStatus s;

        s = js_GetStreamInfo(&si, bus_js(r->bus), REPLICA_STREAM, NULL, &jerr);
        if (s != NATS_OK) {
                log_error("Cluster state: cannot read the state of stream %s: %s.", REPLICA_STREAM,
                          natsStatus_GetText(s));
                return s == NATS_TIMEOUT ? -ETIMEDOUT : s == NATS_CONNECTION_CLOSED ? -ENOTCONN : -EIO;
        }
        *ret = si->State.LastSeq;
        jsStreamInfo_Destroy(si);
        return 0;
}

static bool node_valid(const char *node) {
        size_t n = node ? strlen(node) : 0;

        if (n == 0 || n > REPLICA_NODE_MAX)
                return false;
        for (size_t i = 0; i < n; i++)
                if (!strchr("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-", node[i]))
                        return false;
        return true;
}

Replica *replica_free(Replica *r) {
        if (!r)
                return NULL;
        /* Nothing is published from here on (the loop may be gone): an
         * unacknowledged changeset stays in the outbox for the next run. */
        bus_request_cancel(r->in_flight);
        r->in_flight = NULL;
        r->bus = NULL;
        if (r->attached) {
                /* The last batch's changeset into the outbox. */
                (void)store_commit(r->store);
                store_set_hooks(r->store, NULL);
        }
        bus_sub_free(r->follow);
        sd_event_source_disable_unref(r->follow_retry);
        sd_event_source_disable_unref(r->retry);
        if (r->session)
                sqlite3session_delete(r->session);
        free(r);
        return NULL;
}

int replica_new(sd_event *event, Store *store, Bus *bus, const char *node, unsigned replicas,
                const ReplicaHooks *hooks, Replica **ret) {
        _cleanup_(replica_freep) Replica *r = NULL;
        const char *subjects[] = { REPLICA_SUBJECT_PREFIX ">" };
        jsStreamConfig cfg;
        uint64_t last = 0, queued = 0;
        int k;

        if (!node_valid(node))
                return log_error_errno(-EINVAL, "Cluster state: invalid node name '%s'.", node ?: "");
        r = calloc(1, sizeof(*r));
        if (!r)
                return log_error_errno(-ENOMEM, "Out of memory.");
        r->event = event;
        r->store = store;
        r->bus = bus;
        r->hooks = hooks ? *hooks : (ReplicaHooks){};
        snprintf(r->node, sizeof(r->node), "%s", node);
        snprintf(r->subject, sizeof(r->subject), REPLICA_SUBJECT_PREFIX "%s", node);

        k = store_migrate(store, "replica", replica_schema, ELEMENTSOF(replica_schema));
        if (k < 0)
                return k;
        k = replica_check_tables(r);
        if (k < 0)
                return k;
        k = store_commit(store);
        if (k < 0)
                return k;

        jsStreamConfig_Init(&cfg);
        cfg.Name = REPLICA_STREAM;
        cfg.Subjects = subjects;
        cfg.SubjectsLen = ELEMENTSOF(subjects);
        cfg.Storage = js_FileStorage;
        cfg.Retention = js_LimitsPolicy;
        /* Every changeset is kept: a node that joins replays them all. */
        cfg.MaxBytes = -1;
        cfg.MaxMsgs = -1;
        cfg.Replicas = (int64_t)(replicas ? replicas : 1);
        cfg.Duplicates = REPLICA_DUPLICATE_WINDOW_NSEC;
        k = bus_stream_ensure(bus, &cfg, &r->stream_created_ns);
        if (k < 0)
                return log_error_errno(k, "Cluster state: cannot set up the stream %s: %m", REPLICA_STREAM);
        k = replica_load_state(r);
        if (k < 0)
                return k;
        k = replica_export(r);
        if (k < 0)
                return log_error_errno(k, "Cluster state: cannot export this node's rows: %m");
        k = replica_count_outbox(r, &r->committed_max, &queued);
        if (k < 0)
                return k;
        k = replica_session_new(r, &r->session);
        if (k < 0)
                return k;
        store_set_hooks(store, &(StoreHooks){ .userdata = r,
                                              .committing = replica_committing,
                                              .committed = replica_committed,
                                              .batch_full = replica_batch_full });
        r->attached = true;
        k = sd_event_add_time(event, &r->retry, CLOCK_MONOTONIC, UINT64_MAX, 100 * 1000ULL, replica_retry_cb, r);
        if (k < 0)
                return log_error_errno(k, "Cluster state: cannot set up a timer: %m");
        (void)sd_event_source_set_enabled(r->retry, SD_EVENT_OFF);
        k = sd_event_add_time(event, &r->follow_retry, CLOCK_MONOTONIC, UINT64_MAX, 100 * 1000ULL,
                              replica_follow_retry_cb, r);
        if (k < 0)
                return log_error_errno(k, "Cluster state: cannot set up a timer: %m");
        (void)sd_event_source_set_enabled(r->follow_retry, SD_EVENT_OFF);

        k = replica_stream_last_seq(r, &last);
        if (k < 0)
                return k;
        r->ready_seq = last;
        r->ready = r->applied_seq >= last;
        r->stats.applied_seq = r->applied_seq;
        if (r->applied_seq > last)
                log_warning("Cluster state: this database applied the stream %s up to sequence %" PRIu64
                            ", beyond its end (%" PRIu64 "): were messages purged?",
                            REPLICA_STREAM, r->applied_seq, last);
        k = replica_follow_start(r);
        if (k < 0)
                return log_error_errno(k, "Cluster state: cannot follow the stream %s: %m", REPLICA_STREAM);
        log_info("Cluster state: node '%s' follows %s from sequence %" PRIu64 " (the stream is at %" PRIu64
                 "); %" PRIu64 " change set(s) to publish.",
                 r->node, REPLICA_STREAM, r->applied_seq + 1, last, queued);
        replica_publish_next(r);
        *ret = TAKE_PTR(r);
        return 0;
}

bool replica_ready(Replica *r) {
        return r->ready;
}

void replica_stats(Replica *r, ReplicaStats *ret) {
        ReplicaStats s = r->stats;

        if (replica_count_outbox(r, NULL, &s.queued) < 0)
                s.queued = 0;
        *ret = s;
}
