/* SPDX-License-Identifier: Apache-2.0 */
/* The webhooks made through the API (webhooks.h): the table webhooks. */
#include "config.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "util.h"
#include "webhooks.h"

static const char *const webhooks_schema[] = {
        "CREATE TABLE webhooks ("
        "  name TEXT PRIMARY KEY,"     /* [A-Za-z0-9_-]{1,64}, unique across all integrations */
        "  url TEXT NOT NULL,"         /* as given: it may hold credentials (user:password@) */
        "  prefix TEXT,"               /* event name prefix; NULL: every event */
        "  tag TEXT,"                  /* KEY or KEY=VALUE; NULL: every device */
        "  secret TEXT NOT NULL,"      /* the HMAC-SHA256 key */
        "  timeout INTEGER NOT NULL,"  /* seconds per request */
        "  ca_file TEXT,"              /* the receiver's CA; NULL: the system's (the API sets none) */
        "  created_at INTEGER NOT NULL," /* Unix seconds */
        "  created_by TEXT);",
};

#define WEBHOOKS_COLUMNS "name, url, prefix, tag, secret, timeout, ca_file"

int webhooks_open(Store *store) {
        return store_migrate(store, "webhooks", webhooks_schema, ELEMENTSOF(webhooks_schema));
}

static int bind_text_or_null(sqlite3_stmt *st, int i, const char *s) {
        return s && *s ? sqlite3_bind_text(st, i, s, -1, SQLITE_STATIC) : sqlite3_bind_null(st, i);
}

/* One statement about one name, run to its end: the number of rows it
 * changed, or a negative errno (-EEXIST for a primary key in use). */
static int webhooks_exec_name(Store *store, const char *sql, const char *name, const char *what) {
        sqlite3 *db = store_db(store);
        sqlite3_stmt *st = NULL;
        int rc;

        rc = sqlite3_prepare_v2(db, sql, -1, &st, NULL);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_text(st, 1, name, -1, SQLITE_STATIC);
        if (rc == SQLITE_OK)
                rc = sqlite3_step(st) == SQLITE_DONE ? SQLITE_OK : sqlite3_errcode(db);
        sqlite3_finalize(st);
        if (rc != SQLITE_OK)
                return store_error(store, rc, what);
        return sqlite3_changes(db);
}

/* A COMMIT that failed and left the batch open (store_commit()) would
 * commit the change later, after the client was told it failed: take it
 * back out of the open batch. */
static void webhooks_undo(Store *store, const char *sql, const char *name) {
        if (sqlite3_get_autocommit(store_db(store)))
                return;
        (void)webhooks_exec_name(store, sql, name, "taking back an uncommitted webhook change");
}

int webhooks_create(Store *store, const IntegrationConfig *c, const char *actor) {
        sqlite3 *db = store_db(store);
        sqlite3_stmt *st = NULL;
        bool taken = false;
        int rc, r;

        if (!c || !c->name || !c->url || !c->secret || c->kind != INTEGRATION_WEBHOOK)
                return -EINVAL;
        r = store_batch(store);
        if (r < 0)
                return r;
        rc = sqlite3_prepare_v2(db,
                                "INSERT INTO webhooks (" WEBHOOKS_COLUMNS ", created_at, created_by) "
                                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                -1, &st, NULL);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_text(st, 1, c->name, -1, SQLITE_STATIC);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_text(st, 2, c->url, -1, SQLITE_STATIC);
        if (rc == SQLITE_OK)
                rc = bind_text_or_null(st, 3, c->prefix);
        if (rc == SQLITE_OK)
                rc = bind_text_or_null(st, 4, c->tag);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_text(st, 5, c->secret, -1, SQLITE_STATIC);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_int64(st, 6, c->timeout_sec);
        if (rc == SQLITE_OK)
                rc = bind_text_or_null(st, 7, c->ca_file);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_int64(st, 8, (sqlite3_int64)time(NULL));
        if (rc == SQLITE_OK)
                rc = bind_text_or_null(st, 9, actor);
        if (rc == SQLITE_OK && sqlite3_step(st) != SQLITE_DONE) {
                rc = sqlite3_errcode(db);
                taken = sqlite3_extended_errcode(db) == SQLITE_CONSTRAINT_PRIMARYKEY;
        }
        sqlite3_finalize(st);
        if (taken)
                return -EEXIST;
        if (rc != SQLITE_OK)
                return store_error(store, rc, "storing a webhook");
        r = store_commit(store);
        if (r < 0) {
                webhooks_undo(store, "DELETE FROM webhooks WHERE name = ?", c->name);
                return r;
        }
        return 0;
}

int webhooks_delete(Store *store, const char *name) {
        int r;

        r = store_batch(store);
        if (r < 0)
                return r;
        r = webhooks_exec_name(store, "DELETE FROM webhooks WHERE name = ?", name, "deleting a webhook");
        if (r < 0)
                return r;
        if (r == 0)
                return -ENOENT;
        /* A failed COMMIT leaves the row deleted in the open batch: the
         * integration is gone from this node already (the caller removes
         * it), so the deletion may as well be committed later. */
        return store_commit(store);
}

static char *column_dup(sqlite3_stmt *st, int i, bool *oom) {
        const unsigned char *s = sqlite3_column_text(st, i);
        char *d;

        if (!s)
                return NULL;
        d = strdup((const char *)s);
        if (!d)
                *oom = true;
        return d;
}

/* The configuration of the current row of a SELECT of WEBHOOKS_COLUMNS;
 * NULL on OOM or for a row without a name, URL or secret. */
static IntegrationConfig *row_config(sqlite3_stmt *st, bool *oom) {
        _cleanup_(integration_config_freep) IntegrationConfig *c = calloc(1, sizeof(*c));
        sqlite3_int64 timeout;

        if (!c) {
                *oom = true;
                return NULL;
        }
        c->kind = INTEGRATION_WEBHOOK;
        c->from_api = true;
        c->name = column_dup(st, 0, oom);
        c->url = column_dup(st, 1, oom);
        c->prefix = column_dup(st, 2, oom);
        c->tag = column_dup(st, 3, oom);
        c->secret = column_dup(st, 4, oom);
        timeout = sqlite3_column_int64(st, 5);
        c->timeout_sec = timeout > 0 && timeout <= 300 ? (unsigned)timeout : 10;
        c->ca_file = column_dup(st, 6, oom);
        if (*oom || !c->name || !c->url || !c->secret)
                return NULL;
        return TAKE_PTR(c);
}

int webhooks_get(Store *store, const char *name, IntegrationConfig **ret) {
        sqlite3 *db = store_db(store);
        IntegrationConfig *c = NULL;
        sqlite3_stmt *st = NULL;
        bool oom = false;
        int rc;

        rc = sqlite3_prepare_v2(db, "SELECT " WEBHOOKS_COLUMNS " FROM webhooks WHERE name = ?", -1, &st, NULL);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_text(st, 1, name, -1, SQLITE_STATIC);
        if (rc == SQLITE_OK) {
                rc = sqlite3_step(st);
                if (rc == SQLITE_ROW) {
                        c = row_config(st, &oom);
                        rc = SQLITE_OK;
                } else if (rc == SQLITE_DONE)
                        rc = SQLITE_OK;
        }
        sqlite3_finalize(st);
        if (rc != SQLITE_OK)
                return store_error(store, rc, "reading a webhook");
        if (oom)
                return -ENOMEM;
        if (!c)
                return -ENOENT;
        *ret = c;
        return 0;
}

int webhooks_foreach(Store *store, int (*f)(void *userdata, IntegrationConfig *c), void *userdata) {
        sqlite3 *db = store_db(store);
        IntegrationConfig **all = NULL;
        sqlite3_stmt *st = NULL;
        size_t n = 0, i;
        bool oom = false;
        int rc, r = 0;

        /* Every row read first, the statement done: f may write to the
         * Store (an integration's cursor), which a pending read would
         * keep from committing. */
        rc = sqlite3_prepare_v2(db, "SELECT " WEBHOOKS_COLUMNS " FROM webhooks ORDER BY name", -1, &st, NULL);
        while (rc == SQLITE_OK && (rc = sqlite3_step(st)) == SQLITE_ROW) {
                IntegrationConfig *c = row_config(st, &oom), **a;

                rc = SQLITE_OK;
                if (oom)
                        break;
                if (!c)
                        continue;
                a = reallocarray(all, n + 1, sizeof(*all));
                if (!a) {
                        integration_config_free(c);
                        oom = true;
                        break;
                }
                all = a;
                all[n++] = c;
        }
        if (rc == SQLITE_DONE)
                rc = SQLITE_OK;
        sqlite3_finalize(st);
        if (rc != SQLITE_OK)
                r = store_error(store, rc, "reading the webhooks");
        else if (oom)
                r = -ENOMEM;
        for (i = 0; i < n; i++) {
                if (r < 0) {
                        integration_config_free(all[i]);
                        continue;
                }
                r = f(userdata, all[i]);
                if (r > 0)
                        r = 0;
        }
        free(all);
        return r;
}

static json_t *time_json(sqlite3_int64 sec) {
        time_t tt = (time_t)sec;
        struct tm tm;
        char buf[32];

        if (sec <= 0 || !gmtime_r(&tt, &tm))
                return json_null();
        strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%SZ", &tm);
        return json_string(buf);
}

int webhooks_annotate(Store *store, json_t *array) {
        sqlite3 *db = store_db(store);
        sqlite3_stmt *st = NULL;
        json_t *o;
        size_t i;
        int rc;

        rc = sqlite3_prepare_v2(db, "SELECT created_at, created_by FROM webhooks WHERE name = ?", -1, &st, NULL);
        json_array_foreach(array, i, o) {
                const char *name = json_string_value(json_object_get(o, "name"));
                const char *source = json_string_value(json_object_get(o, "source"));

                if (rc != SQLITE_OK)
                        break;
                if (!name || !source || !streq(source, "api"))
                        continue;
                sqlite3_reset(st);
                rc = sqlite3_bind_text(st, 1, name, -1, SQLITE_STATIC);
                if (rc != SQLITE_OK)
                        break;
                rc = sqlite3_step(st);
                if (rc == SQLITE_DONE) {
                        rc = SQLITE_OK;
                        continue;
                }
                if (rc != SQLITE_ROW)
                        break;
                rc = SQLITE_OK;
                if (json_object_set_new(o, "created_at", time_json(sqlite3_column_int64(st, 0))) < 0 ||
                    json_object_set_new(o, "created_by",
                                        sqlite3_column_text(st, 1)
                                                ? json_string((const char *)sqlite3_column_text(st, 1))
                                                : json_null()) < 0) {
                        sqlite3_finalize(st);
                        return -ENOMEM;
                }
        }
        sqlite3_finalize(st);
        if (rc != SQLITE_OK)
                return store_error(store, rc, "reading the webhooks");
        return 0;
}
