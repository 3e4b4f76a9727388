/* SPDX-License-Identifier: Apache-2.0 */
/* The cloud's SQLite database (store.h). */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <time.h>

#include "log.h"
#include "store.h"
#include "util.h"

struct Store {
        sqlite3 *db;
        sd_event *event;
        sd_event_source *batch_timer;
        bool in_batch;
        sqlite3_stmt *audit_insert;
        sd_event_source *prune_timer;
        uint64_t audit_max_records;
        unsigned audit_max_days;
        StoreHooks hooks;
};

#define STORE_PRUNE_USEC (60 * 1000000ULL)

int store_error(Store *s, int code, const char *what) {
        int r;

        switch (code & 0xff) {
        case SQLITE_NOMEM:
                r = -ENOMEM;
                break;
        case SQLITE_FULL:
                r = -ENOSPC;
                break;
        case SQLITE_BUSY:
        case SQLITE_LOCKED:
                r = -EBUSY;
                break;
        default:
                r = -EIO;
        }
        log_error("Cloud database: %s failed: %s.", what, s && s->db ? sqlite3_errmsg(s->db) : sqlite3_errstr(code));
        return r;
}

static int store_exec(Store *s, const char *sql, const char *what) {
        int rc = sqlite3_exec(s->db, sql, NULL, NULL, NULL);

        return rc == SQLITE_OK ? 0 : store_error(s, rc, what);
}

void store_set_hooks(Store *s, const StoreHooks *hooks) {
        s->hooks = hooks ? *hooks : (StoreHooks){};
}

int store_commit(Store *s) {
        int r;

        if (!s->in_batch)
                return 0;
        if (s->hooks.committing) {
                r = s->hooks.committing(s->hooks.userdata);
                if (r < 0) {
                        /* Open still: the timer tries again. */
                        (void)sd_event_source_set_time_relative(s->batch_timer, STORE_BATCH_MSEC * 1000ULL);
                        (void)sd_event_source_set_enabled(s->batch_timer, SD_EVENT_ONESHOT);
                        return r;
                }
        }
        r = store_exec(s, "COMMIT", "committing");
        if (r < 0 && !sqlite3_get_autocommit(s->db)) {
                /* Not rolled back (SQLITE_BUSY): the batch is open still,
                 * the timer tries again. */
                (void)sd_event_source_set_time_relative(s->batch_timer, STORE_BATCH_MSEC * 1000ULL);
                (void)sd_event_source_set_enabled(s->batch_timer, SD_EVENT_ONESHOT);
        } else {
                s->in_batch = false;
                (void)sd_event_source_set_enabled(s->batch_timer, SD_EVENT_OFF);
        }
        if (s->hooks.committed)
                s->hooks.committed(s->hooks.userdata, r);
        return r;
}

int store_rollback(Store *s) {
        int r = 0;

        if (!s->in_batch)
                return 0;
        s->in_batch = false;
        (void)sd_event_source_set_enabled(s->batch_timer, SD_EVENT_OFF);
        if (!sqlite3_get_autocommit(s->db))
                r = store_exec(s, "ROLLBACK", "rolling back");
        if (s->hooks.committed)
                s->hooks.committed(s->hooks.userdata, -ECANCELED);
        return r;
}

static int store_batch_cb(sd_event_source *src, uint64_t usec, void *userdata) {
        (void)store_commit(userdata);
        return 0;
}

int store_batch(Store *s) {
        int r;

        if (s->in_batch) {
                if (!s->hooks.batch_full || !s->hooks.batch_full(s->hooks.userdata))
                        return 0;
                r = store_commit(s);
                if (r < 0)
                        return r;
        }
        r = store_exec(s, "BEGIN", "starting a transaction");
        if (r < 0)
                return r;
        s->in_batch = true;
        (void)sd_event_source_set_time_relative(s->batch_timer, STORE_BATCH_MSEC * 1000ULL);
        (void)sd_event_source_set_enabled(s->batch_timer, SD_EVENT_ONESHOT);
        return 0;
}

sqlite3 *store_db(Store *s) { return s->db; }

static int store_version(Store *s, const char *component, int64_t *ret) {
        sqlite3_stmt *st = NULL;
        int rc;

        rc = sqlite3_prepare_v2(s->db, "SELECT version FROM schema WHERE component = ?", -1, &st, NULL);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_text(st, 1, component, -1, SQLITE_STATIC);
        if (rc == SQLITE_OK) {
                rc = sqlite3_step(st);
                *ret = rc == SQLITE_ROW ? sqlite3_column_int64(st, 0) : 0;
                rc = rc == SQLITE_ROW || rc == SQLITE_DONE ? SQLITE_OK : rc;
        }
        sqlite3_finalize(st);
        return rc == SQLITE_OK ? 0 : store_error(s, rc, "reading the schema version");
}

int store_migrate(Store *s, const char *component, const char *const *steps, size_t n_steps) {
        int64_t v;
        int r;

        r = store_commit(s);
        if (r < 0)
                return r;
        r = store_version(s, component, &v);
        if (r < 0)
                return r;
        if (v > (int64_t)n_steps) {
                log_error("Cloud database: the '%s' tables are at version %" PRId64 ", newer than this "
                          "tether-cloudd knows (%zu); refusing to touch them.",
                          component, v, n_steps);
                return -EPROTO;
        }
        for (; v < (int64_t)n_steps; v++) {
                sqlite3_stmt *st = NULL;
                int rc;

                r = store_exec(s, "BEGIN IMMEDIATE", "starting a schema change");
                if (r < 0)
                        return r;
                rc = sqlite3_exec(s->db, steps[v], NULL, NULL, NULL);
                if (rc == SQLITE_OK)
                        rc = sqlite3_prepare_v2(s->db,
                                                "INSERT INTO schema (component, version) VALUES (?, ?) "
                                                "ON CONFLICT (component) DO UPDATE SET version = excluded.version",
                                                -1, &st, NULL);
                if (rc == SQLITE_OK)
                        rc = sqlite3_bind_text(st, 1, component, -1, SQLITE_STATIC);
                if (rc == SQLITE_OK)
                        rc = sqlite3_bind_int64(st, 2, v + 1);
                if (rc == SQLITE_OK)
                        rc = sqlite3_step(st) == SQLITE_DONE ? SQLITE_OK : sqlite3_errcode(s->db);
                sqlite3_finalize(st);
                if (rc != SQLITE_OK) {
                        r = store_error(s, rc, "a schema change");
                        (void)sqlite3_exec(s->db, "ROLLBACK", NULL, NULL, NULL);
                        return r;
                }
                r = store_exec(s, "COMMIT", "committing a schema change");
                if (r < 0)
                        return r;
        }
        return 0;
}

static const char *const audit_schema[] = {
        "CREATE TABLE audit ("
        "  id INTEGER PRIMARY KEY AUTOINCREMENT,"
        "  time_usec INTEGER NOT NULL,"
        "  actor TEXT NOT NULL,"
        "  action TEXT NOT NULL,"
        "  target TEXT,"
        "  detail TEXT,"
        "  address TEXT);"
        "CREATE INDEX audit_target ON audit (target, id);",
};

static uint64_t realtime_usec(void) {
        struct timespec ts;

        clock_gettime(CLOCK_REALTIME, &ts);
        return (uint64_t)ts.tv_sec * 1000000ULL + (uint64_t)ts.tv_nsec / 1000ULL;
}

int store_audit(Store *s, const char *actor, const char *action, const char *target, json_t *detail,
                const char *address) {
        _cleanup_free_ char *text = NULL;
        sqlite3_stmt *st = s->audit_insert;
        int rc, r;

        if (detail) {
                text = json_dumps(detail, JSON_COMPACT);
                if (!text)
                        return -ENOMEM;
        }
        r = store_batch(s);
        if (r < 0)
                return r;
        rc = sqlite3_bind_int64(st, 1, (sqlite3_int64)realtime_usec());
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_text(st, 2, actor, -1, SQLITE_STATIC);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_text(st, 3, action, -1, SQLITE_STATIC);
        if (rc == SQLITE_OK)
                rc = target ? sqlite3_bind_text(st, 4, target, -1, SQLITE_STATIC) : sqlite3_bind_null(st, 4);
        if (rc == SQLITE_OK)
                rc = text ? sqlite3_bind_text(st, 5, text, -1, SQLITE_STATIC) : sqlite3_bind_null(st, 5);
        if (rc == SQLITE_OK)
                rc = address ? sqlite3_bind_text(st, 6, address, -1, SQLITE_STATIC) : sqlite3_bind_null(st, 6);
        if (rc == SQLITE_OK)
                rc = sqlite3_step(st) == SQLITE_DONE ? SQLITE_OK : sqlite3_errcode(s->db);
        sqlite3_reset(st);
        sqlite3_clear_bindings(st);
        if (rc != SQLITE_OK)
                return store_error(s, rc, "writing the audit log");
        return 0;
}

static json_t *column_json(sqlite3_stmt *st, int i) {
        const char *t = (const char *)sqlite3_column_text(st, i);

        return t ? json_string(t) : json_null();
}

int store_audit_query(Store *s, int64_t after_id, unsigned limit, const char *action_prefix, const char *target,
                      json_t **ret) {
        sqlite3_stmt *st = NULL;
        json_t *a = json_array();
        int rc;

        if (!a)
                return -ENOMEM;
        /* The prefix is compared with substr(), not LIKE: '%' and '_' in
         * it are plain characters. */
        rc = sqlite3_prepare_v2(s->db,
                                "SELECT id, time_usec, actor, action, target, detail, address FROM audit "
                                "WHERE id > ?1 AND (?2 IS NULL OR substr(action, 1, length(?2)) = ?2) "
                                "AND (?3 IS NULL OR target = ?3) ORDER BY id LIMIT ?4",
                                -1, &st, NULL);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_int64(st, 1, after_id);
        if (rc == SQLITE_OK)
                rc = action_prefix ? sqlite3_bind_text(st, 2, action_prefix, -1, SQLITE_STATIC)
                                   : sqlite3_bind_null(st, 2);
        if (rc == SQLITE_OK)
                rc = target ? sqlite3_bind_text(st, 3, target, -1, SQLITE_STATIC) : sqlite3_bind_null(st, 3);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_int64(st, 4, limit);
        while (rc == SQLITE_OK && (rc = sqlite3_step(st)) == SQLITE_ROW) {
                uint64_t usec = (uint64_t)sqlite3_column_int64(st, 1);
                time_t t = (time_t)(usec / 1000000ULL);
                const char *detail = (const char *)sqlite3_column_text(st, 5);
                char when[64];
                struct tm tm;
                json_t *o;

                gmtime_r(&t, &tm);
                snprintf(when, sizeof(when), "%04d-%02d-%02dT%02d:%02d:%02d.%03uZ", tm.tm_year + 1900,
                         tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                         (unsigned)(usec % 1000000ULL / 1000U));
                o = json_pack("{s:I, s:s, s:o, s:o, s:o, s:o, s:o}", "id",
                              (json_int_t)sqlite3_column_int64(st, 0), "time", when, "actor", column_json(st, 2),
                              "action", column_json(st, 3), "target", column_json(st, 4), "detail",
                              detail ? json_loads(detail, JSON_DECODE_ANY, NULL) ?: json_string(detail)
                                     : json_null(),
                              "address", column_json(st, 6));
                if (!o || json_array_append_new(a, o) < 0) {
                        sqlite3_finalize(st);
                        json_decref(a);
                        return -ENOMEM;
                }
                rc = SQLITE_OK;
        }
        sqlite3_finalize(st);
        if (rc != SQLITE_DONE) {
                json_decref(a);
                return store_error(s, rc, "reading the audit log");
        }
        *ret = a;
        return 0;
}

static int64_t store_delete(Store *s, const char *sql, int64_t arg, const char *what) {
        sqlite3_stmt *st = NULL;
        int rc;

        rc = sqlite3_prepare_v2(s->db, sql, -1, &st, NULL);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_int64(st, 1, arg);
        if (rc == SQLITE_OK)
                rc = sqlite3_step(st) == SQLITE_DONE ? SQLITE_OK : sqlite3_errcode(s->db);
        sqlite3_finalize(st);
        if (rc != SQLITE_OK)
                return store_error(s, rc, what);
        return sqlite3_changes64(s->db);
}

int64_t store_audit_prune(Store *s) {
        int64_t by_count = 0, by_age = 0;
        int r;

        r = store_batch(s);
        if (r < 0)
                return r;
        if (s->audit_max_records > 0)
                by_count = store_delete(s, "DELETE FROM audit WHERE id <= (SELECT max(id) FROM audit) - ?1",
                                        (int64_t)s->audit_max_records, "pruning the audit log");
        if (by_count >= 0 && s->audit_max_days > 0)
                by_age = store_delete(s, "DELETE FROM audit WHERE time_usec < ?1",
                                      (int64_t)(realtime_usec() - (uint64_t)s->audit_max_days * 86400ULL * 1000000ULL),
                                      "pruning the audit log");
        if (by_count < 0 || by_age < 0)
                return by_count < 0 ? by_count : by_age;
        r = store_commit(s);
        if (r < 0)
                return r;
        if (by_count > 0)
                log_warning("Audit log: deleted the %" PRId64 " oldest record(s) beyond AuditMaxRecords=%" PRIu64 ".",
                            by_count, s->audit_max_records);
        return by_count + by_age;
}

static int store_prune_cb(sd_event_source *src, uint64_t usec, void *userdata) {
        (void)store_audit_prune(userdata);
        (void)sd_event_source_set_time_relative(src, STORE_PRUNE_USEC);
        return 0;
}

void store_audit_set_retention(Store *s, uint64_t max_records, unsigned max_days) {
        s->audit_max_records = max_records;
        s->audit_max_days = max_days;
        (void)sd_event_source_set_time_relative(s->prune_timer, STORE_PRUNE_USEC);
        (void)sd_event_source_set_enabled(s->prune_timer,
                                          max_records > 0 || max_days > 0 ? SD_EVENT_ON : SD_EVENT_OFF);
}

Store *store_free(Store *s) {
        if (!s)
                return NULL;
        if (s->db)
                (void)store_commit(s);
        sqlite3_finalize(s->audit_insert);
        sd_event_source_disable_unref(s->batch_timer);
        sd_event_source_disable_unref(s->prune_timer);
        if (s->db)
                (void)sqlite3_close_v2(s->db);
        free(s);
        return NULL;
}

int store_open(sd_event *event, const char *dir, Store **ret) {
        _cleanup_(store_freep) Store *s = NULL;
        _cleanup_free_ char *path = NULL;
        int rc, r;

        if (asprintf(&path, "%s/%s", dir, STORE_FILE) < 0)
                return log_error_errno(-ENOMEM, "Out of memory.");
        s = calloc(1, sizeof(*s));
        if (!s)
                return log_error_errno(-ENOMEM, "Out of memory.");
        s->event = event;
        rc = sqlite3_open_v2(path, &s->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX,
                             NULL);
        if (rc != SQLITE_OK) {
                log_error("Cannot open the cloud database '%s': %s.", path,
                          s->db ? sqlite3_errmsg(s->db) : sqlite3_errstr(rc));
                return -EIO;
        }
        /* A second tether-cloudd on the same directory fails here rather
         * than waiting: the journal's lock already says who holds it. */
        (void)sqlite3_busy_timeout(s->db, 2000);
        (void)sqlite3_extended_result_codes(s->db, 1);
        r = store_exec(s, "PRAGMA journal_mode = WAL", "setting WAL mode");
        if (r >= 0)
                r = store_exec(s, "PRAGMA synchronous = NORMAL", "setting synchronous=NORMAL");
        if (r >= 0)
                r = store_exec(s, "PRAGMA foreign_keys = ON", "enabling foreign keys");
        if (r >= 0)
                r = store_exec(s, "CREATE TABLE IF NOT EXISTS schema (component TEXT PRIMARY KEY, version INTEGER NOT NULL)",
                               "creating the schema table");
        if (r >= 0)
                r = store_migrate(s, "audit", audit_schema, ELEMENTSOF(audit_schema));
        if (r < 0) {
                log_error("Cannot use the cloud database '%s'.", path);
                return r;
        }
        rc = sqlite3_prepare_v3(s->db,
                                "INSERT INTO audit (time_usec, actor, action, target, detail, address) "
                                "VALUES (?, ?, ?, ?, ?, ?)",
                                -1, SQLITE_PREPARE_PERSISTENT, &s->audit_insert, NULL);
        if (rc != SQLITE_OK)
                return store_error(s, rc, "preparing the audit log");
        r = sd_event_add_time(event, &s->batch_timer, CLOCK_MONOTONIC, UINT64_MAX, 10 * 1000ULL, store_batch_cb, s);
        if (r < 0)
                return log_error_errno(r, "Failed to set up the cloud database's commit timer: %m");
        (void)sd_event_source_set_enabled(s->batch_timer, SD_EVENT_OFF);
        r = sd_event_add_time_relative(event, &s->prune_timer, CLOCK_MONOTONIC, STORE_PRUNE_USEC, 1000000ULL,
                                       store_prune_cb, s);
        if (r < 0)
                return log_error_errno(r, "Failed to set up the audit log's pruning: %m");
        (void)sd_event_source_set_enabled(s->prune_timer, SD_EVENT_OFF);
        *ret = TAKE_PTR(s);
        return 0;
}
