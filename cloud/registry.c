/* SPDX-License-Identifier: Apache-2.0 */
/* The persistent device registry (registry.h). */
#include "config.h"

#include <inttypes.h>
#include <time.h>

#include "log.h"
#include "proto.h"
#include "inventory.h"
#include "registry.h"
#include "util.h"

/* One step per schema version, never edited once released. A row exists
 * for every device that connected, was registered or was revoked;
 * registered_usec is what Registration=enrolled admits. */
static const char *const registry_schema[] = {
        "CREATE TABLE devices ("
        "  id TEXT PRIMARY KEY NOT NULL,"
        "  added_usec INTEGER NOT NULL,"
        "  registered_usec INTEGER,"
        "  registered_by TEXT,"
        "  first_connected_usec INTEGER,"
        "  last_connected_usec INTEGER,"
        "  last_heard_usec INTEGER,"
        "  last_address TEXT,"
        "  cert_serial TEXT,"
        "  cert_fingerprint TEXT,"
        "  cert_not_after INTEGER,"
        "  revoked_usec INTEGER,"
        "  revoked_reason TEXT,"
        "  revoked_by TEXT);",
        /* Enrollment (enroll.h): the tags of the provisioning token, and the
         * certificate the cloud issued or the device last connected with:
         * its validity, when and how it was issued, its public key
         * (tls_pubkey_sha256(); '' once unrevoke cleared it, NULL when not
         * known, as for a device last seen before this step) and its
         * issuer (RFC 2253 text, as TlsPeer.issuer: which CA, for a CA
         * rollover). cert_newest_not_before: the latest notBefore of a
         * certificate the device connected with; an older certificate of
         * the device is refused (a copied key whose certificate the real
         * device has renewed and used since). */
        "ALTER TABLE devices ADD COLUMN tags TEXT;"
        "ALTER TABLE devices ADD COLUMN cert_not_before INTEGER;"
        "ALTER TABLE devices ADD COLUMN cert_issued_usec INTEGER;"
        "ALTER TABLE devices ADD COLUMN cert_issued_how TEXT;"
        "ALTER TABLE devices ADD COLUMN cert_pubkey TEXT;"
        "ALTER TABLE devices ADD COLUMN cert_issuer TEXT;"
        "ALTER TABLE devices ADD COLUMN cert_newest_not_before INTEGER;",
        /* The device's last describe document (its GET /d answer, compact
         * JSON with sorted keys, as proto_describe_decode() accepted it),
         * so that an offline device still shows what it offers after a
         * restart; NULL until it answered one. */
        "ALTER TABLE devices ADD COLUMN describe TEXT;",
        /* Inventory (docs/fleet.md): the operator's name for the device
         * (unique among devices, checked by registry_update() rather than
         * by a UNIQUE index: in cluster mode a constraint that fails on
         * one node but not another would leave the copies different), its
         * notes, and when either or the tags last changed through the
         * API. */
        "ALTER TABLE devices ADD COLUMN name TEXT;"
        "ALTER TABLE devices ADD COLUMN notes TEXT;"
        "ALTER TABLE devices ADD COLUMN updated_usec INTEGER;"
        "CREATE INDEX devices_name ON devices (name) WHERE name IS NOT NULL;",
};

enum {
        STMT_GET,
        STMT_CONNECTED,
        STMT_DISCONNECTED,
        STMT_REGISTER,
        STMT_REVOKE,
        STMT_UNREVOKE,
        STMT_ENROLLED,
        STMT_RENEWED,
        STMT_TAGS,
        STMT_TAGGED,
        STMT_DESCRIBED,
        STMT_NAME_TAKEN,
        STMT_UPDATE,
        STMT_DESCRIBE_GET,
        _STMT_MAX,
};

static const char *const registry_sql[_STMT_MAX] = {
        [STMT_GET] = "SELECT registered_usec, registered_by, first_connected_usec, last_connected_usec, "
                     "cert_serial, cert_fingerprint, cert_not_after, revoked_usec, revoked_reason, revoked_by, "
                     "tags, cert_not_before, cert_issued_usec, cert_issued_how, cert_pubkey, cert_issuer, "
                     "cert_newest_not_before, name, notes, updated_usec FROM devices WHERE id = ?1",
        [STMT_CONNECTED] = "INSERT INTO devices (id, added_usec, registered_usec, registered_by, first_connected_usec, "
                           "last_connected_usec, last_heard_usec, last_address, cert_serial, cert_fingerprint, "
                           "cert_not_after, cert_not_before, cert_pubkey, cert_issuer, cert_newest_not_before) "
                           "VALUES (?1, ?2, ?2, 'self', ?2, ?2, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?7) "
                           "ON CONFLICT (id) DO UPDATE SET "
                           "cert_newest_not_before = max(coalesce(cert_newest_not_before, 0), "
                           "coalesce(excluded.cert_not_before, 0)), "
                           /* Issued by the cloud: only while it is the same certificate. */
                           "cert_issued_usec = CASE WHEN cert_fingerprint IS excluded.cert_fingerprint "
                           "THEN cert_issued_usec END, "
                           "cert_issued_how = CASE WHEN cert_fingerprint IS excluded.cert_fingerprint "
                           "THEN cert_issued_how END, "
                           "cert_not_before = excluded.cert_not_before, cert_pubkey = excluded.cert_pubkey, "
                           "cert_issuer = excluded.cert_issuer, "
                           "registered_usec = coalesce(registered_usec, excluded.registered_usec), "
                           "registered_by = coalesce(registered_by, excluded.registered_by), "
                           "first_connected_usec = coalesce(first_connected_usec, excluded.first_connected_usec), "
                           "last_connected_usec = excluded.last_connected_usec, "
                           "last_heard_usec = excluded.last_heard_usec, last_address = excluded.last_address, "
                           "cert_serial = excluded.cert_serial, cert_fingerprint = excluded.cert_fingerprint, "
                           "cert_not_after = excluded.cert_not_after",
        [STMT_DISCONNECTED] = "UPDATE devices SET last_heard_usec = ?2 WHERE id = ?1",
        [STMT_REGISTER] = "INSERT INTO devices (id, added_usec, registered_usec, registered_by) "
                          "VALUES (?1, ?2, ?2, ?3) ON CONFLICT (id) DO UPDATE SET "
                          "registered_usec = coalesce(registered_usec, excluded.registered_usec), "
                          "registered_by = coalesce(registered_by, excluded.registered_by)",
        [STMT_REVOKE] = "INSERT INTO devices (id, added_usec, revoked_usec, revoked_reason, revoked_by) "
                        "VALUES (?1, ?2, ?2, ?3, ?4) ON CONFLICT (id) DO UPDATE SET "
                        "revoked_usec = excluded.revoked_usec, revoked_reason = excluded.revoked_reason, "
                        "revoked_by = excluded.revoked_by",
        /* The recorded key goes too (docs/security.md, "Enrollment"): the
         * operator's way to let a reflashed device enroll again under its ID. */
        [STMT_UNREVOKE] = "UPDATE devices SET revoked_usec = NULL, revoked_reason = NULL, revoked_by = NULL, "
                          "cert_pubkey = '' WHERE id = ?1",
        [STMT_ENROLLED] = "INSERT INTO devices (id, added_usec, registered_usec, registered_by, tags, cert_serial, "
                          "cert_fingerprint, cert_not_before, cert_not_after, cert_issued_usec, cert_issued_how, "
                          "cert_pubkey, cert_issuer) VALUES (?1, ?2, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?2, ?9, ?10, ?11) "
                          "ON CONFLICT (id) DO UPDATE SET "
                          "registered_usec = coalesce(registered_usec, excluded.registered_usec), "
                          "registered_by = coalesce(registered_by, excluded.registered_by), "
                          "tags = coalesce(excluded.tags, tags), cert_serial = excluded.cert_serial, "
                          "cert_fingerprint = excluded.cert_fingerprint, cert_not_before = excluded.cert_not_before, "
                          "cert_not_after = excluded.cert_not_after, cert_issued_usec = excluded.cert_issued_usec, "
                          "cert_issued_how = excluded.cert_issued_how, cert_pubkey = excluded.cert_pubkey, "
                          "cert_issuer = excluded.cert_issuer",
        [STMT_RENEWED] = "UPDATE devices SET cert_serial = ?5, cert_fingerprint = ?6, cert_not_before = ?7, "
                         "cert_not_after = ?8, cert_issued_usec = ?2, cert_issued_how = ?9, cert_pubkey = ?10, "
                         "cert_issuer = ?11 "
                         "WHERE id = ?1",
        [STMT_TAGS] = "SELECT tags FROM devices WHERE id = ?1",
        /* ?1: a JSON array of [name, value or null] pairs; a device whose
         * tags hold any of them. A malformed tags column matches nothing
         * (json_each() would fail the whole query). */
        [STMT_TAGGED] = "SELECT d.id FROM devices AS d WHERE d.tags IS NOT NULL AND EXISTS ("
                        "SELECT 1 FROM json_each(?1) AS m, "
                        "json_each(CASE WHEN json_valid(d.tags) THEN d.tags ELSE '{}' END) AS t "
                        "WHERE t.key = m.value ->> 0 AND t.type = 'text' "
                        "AND (m.value ->> 1 IS NULL OR t.value = m.value ->> 1)) ORDER BY d.rowid",
        [STMT_DESCRIBED] = "UPDATE devices SET describe = ?2 WHERE id = ?1",
        /* Another device whose name, or whose id, is ?1. */
        [STMT_NAME_TAKEN] = "SELECT id FROM devices WHERE (name = ?1 OR id = ?1) AND id != ?2 LIMIT 1",
        [STMT_UPDATE] = "UPDATE devices SET name = ?2, notes = ?3, tags = ?4, updated_usec = ?5 WHERE id = ?1",
        [STMT_DESCRIBE_GET] = "SELECT describe FROM devices WHERE id = ?1",
};

struct Registry {
        Store *store;
        char *path; /* the database file, for RegistryReader; NULL in memory */
        RegistryPolicy policy;
        RegistryHooks hooks;
        sqlite3_stmt *stmt[_STMT_MAX];
};

/* What STMT_GET reads of one device. */
typedef struct RegistryRow {
        bool registered, revoked;
        char reason[192];
        int64_t newest_not_before; /* 0: none known */
} RegistryRow;

static uint64_t realtime_usec(void) {
        struct timespec ts;

        clock_gettime(CLOCK_REALTIME, &ts);
        return (uint64_t)ts.tv_sec * 1000000ULL + (uint64_t)ts.tv_nsec / 1000ULL;
}

static int bind_text(sqlite3_stmt *st, int i, const char *s) {
        return s ? sqlite3_bind_text(st, i, s, -1, SQLITE_STATIC) : sqlite3_bind_null(st, i);
}

/* Run a statement that returns no rows; the bindings are cleared. */
static int registry_step(Registry *reg, sqlite3_stmt *st, int rc, const char *what) {
        if (rc == SQLITE_OK)
                rc = sqlite3_step(st) == SQLITE_DONE ? SQLITE_OK : sqlite3_errcode(store_db(reg->store));
        sqlite3_reset(st);
        sqlite3_clear_bindings(st);
        return rc == SQLITE_OK ? 0 : store_error(reg->store, rc, what);
}

/* STMT_GET for id, positioned on its row: 1 (the caller resets it), 0 if
 * there is none (reset here), or a negative errno. */
static int registry_get(Registry *reg, const char *id) {
        sqlite3_stmt *st = reg->stmt[STMT_GET];
        int rc = sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);

        if (rc == SQLITE_OK) {
                rc = sqlite3_step(st);
                if (rc == SQLITE_ROW)
                        return 1;
        }
        sqlite3_reset(st);
        sqlite3_clear_bindings(st);
        return rc == SQLITE_DONE ? 0 : store_error(reg->store, rc, "reading the device registry");
}

static void registry_get_done(Registry *reg) {
        sqlite3_reset(reg->stmt[STMT_GET]);
        sqlite3_clear_bindings(reg->stmt[STMT_GET]);
}

/* 1 and *ret for a known device, 0 for an unknown one, or -errno. */
static int registry_row(Registry *reg, const char *id, RegistryRow *ret) {
        sqlite3_stmt *st = reg->stmt[STMT_GET];
        RegistryRow row = {};
        int r = registry_get(reg, id);

        if (r <= 0)
                return r;
        row.registered = sqlite3_column_type(st, 0) != SQLITE_NULL;
        row.revoked = sqlite3_column_type(st, 7) != SQLITE_NULL;
        snprintf(row.reason, sizeof(row.reason), "%s", (const char *)sqlite3_column_text(st, 8) ?: "");
        row.newest_not_before = sqlite3_column_int64(st, 16);
        registry_get_done(reg);
        *ret = row;
        return 1;
}

/* registry_check() on what registry_row() returned (r, row). */
static int registry_decide(RegistryPolicy policy, int r, const RegistryRow *row_, const TlsPeer *peer, char *reason,
                           size_t reason_size) {
        RegistryRow row = *row_;

        if (r < 0) {
                snprintf(reason, reason_size, "the device registry cannot be read");
                return r;
        }
        if (r > 0 && row.revoked) {
                snprintf(reason, reason_size, "device '%s' is revoked%s%s%s", peer->id, row.reason[0] ? " (" : "",
                         row.reason, row.reason[0] ? ")" : "");
                return -EPERM;
        }
        /* A certificate older than one the device has connected with: the
         * device renewed (with a new key) and uses the new one; whoever
         * still has the old key is not the device. A renewal whose answer
         * was lost leaves the old certificate usable: the new one was
         * never connected with. */
        if (r > 0 && peer->not_before > 0 && peer->not_before < row.newest_not_before) {
                snprintf(reason, reason_size,
                         "device '%s' has connected with a newer certificate since this one (valid from %" PRId64
                         ") was issued: it is superseded",
                         peer->id, peer->not_before);
                return -EPERM;
        }
        if (policy == REGISTRY_ENROLLED && (r == 0 || !row.registered)) {
                snprintf(reason, reason_size, "device '%s' is not registered (Registration=enrolled)", peer->id);
                return -EPERM;
        }
        return 0;
}

int registry_check(Registry *reg, const TlsPeer *peer, char *reason, size_t reason_size) {
        RegistryRow row = {};
        int r = registry_row(reg, peer->id, &row);

        return registry_decide(reg->policy, r, &row, peer, reason, reason_size);
}

/* ---- RegistryReader ---- */

struct RegistryReader {
        sqlite3 *db;
        sqlite3_stmt *get;
        RegistryPolicy policy;
};

int registry_reader_new(Registry *reg, RegistryReader **ret) {
        const char *path = reg->path;
        RegistryReader *rd;
        int rc;

        if (!path)
                return -EOPNOTSUPP; /* a database in memory has no second connection */
        rd = calloc(1, sizeof(*rd));
        if (!rd)
                return -ENOMEM;
        rd->policy = reg->policy;
        rc = sqlite3_open_v2(path, &rd->db, SQLITE_OPEN_READONLY | SQLITE_OPEN_NOMUTEX, NULL);
        if (rc == SQLITE_OK) {
                (void)sqlite3_busy_timeout(rd->db, 2000);
                rc = sqlite3_prepare_v3(rd->db, registry_sql[STMT_GET], -1, SQLITE_PREPARE_PERSISTENT, &rd->get,
                                        NULL);
        }
        if (rc != SQLITE_OK) {
                registry_reader_free(rd);
                return -EIO;
        }
        *ret = rd;
        return 0;
}

RegistryReader *registry_reader_free(RegistryReader *rd) {
        if (!rd)
                return NULL;
        sqlite3_finalize(rd->get);
        if (rd->db)
                (void)sqlite3_close_v2(rd->db);
        free(rd);
        return NULL;
}

int registry_reader_check(RegistryReader *rd, const TlsPeer *peer, char *reason, size_t reason_size) {
        sqlite3_stmt *st = rd->get;
        RegistryRow row = {};
        int rc = sqlite3_bind_text(st, 1, peer->id, -1, SQLITE_STATIC), r;

        if (rc == SQLITE_OK)
                rc = sqlite3_step(st);
        if (rc == SQLITE_ROW) {
                row.registered = sqlite3_column_type(st, 0) != SQLITE_NULL;
                row.revoked = sqlite3_column_type(st, 7) != SQLITE_NULL;
                snprintf(row.reason, sizeof(row.reason), "%s", (const char *)sqlite3_column_text(st, 8) ?: "");
                row.newest_not_before = sqlite3_column_int64(st, 16);
                r = 1;
        } else
                r = rc == SQLITE_DONE ? 0 : -EIO;
        sqlite3_reset(st);
        sqlite3_clear_bindings(st);
        return registry_decide(rd->policy, r, &row, peer, reason, reason_size);
}

int registry_connected(Registry *reg, const TlsPeer *peer, const char *address) {
        sqlite3_stmt *st = reg->stmt[STMT_CONNECTED];
        int rc, r;

        r = store_batch(reg->store);
        if (r < 0)
                return r;
        rc = sqlite3_bind_text(st, 1, peer->id, -1, SQLITE_STATIC);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_int64(st, 2, (sqlite3_int64)realtime_usec());
        if (rc == SQLITE_OK)
                rc = bind_text(st, 3, address);
        if (rc == SQLITE_OK)
                rc = bind_text(st, 4, peer->serial[0] ? peer->serial : NULL);
        if (rc == SQLITE_OK)
                rc = bind_text(st, 5, peer->fingerprint[0] ? peer->fingerprint : NULL);
        if (rc == SQLITE_OK)
                rc = peer->not_after ? sqlite3_bind_int64(st, 6, peer->not_after) : sqlite3_bind_null(st, 6);
        if (rc == SQLITE_OK)
                rc = peer->not_before ? sqlite3_bind_int64(st, 7, peer->not_before) : sqlite3_bind_null(st, 7);
        if (rc == SQLITE_OK)
                rc = bind_text(st, 8, peer->pubkey[0] ? peer->pubkey : NULL);
        if (rc == SQLITE_OK)
                rc = bind_text(st, 9, peer->issuer[0] ? peer->issuer : NULL);
        return registry_step(reg, st, rc, "recording a connection in the device registry");
}

int registry_described(Registry *reg, const char *id, const char *describe) {
        sqlite3_stmt *st = reg->stmt[STMT_DESCRIBED];
        bool too_big = strlen(describe) > REGISTRY_DESCRIBE_MAX;
        int rc, r;

        r = store_batch(reg->store);
        if (r < 0)
                return r;
        rc = sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
        if (rc == SQLITE_OK)
                rc = bind_text(st, 2, too_big ? NULL : describe);
        r = registry_step(reg, st, rc, "recording a describe document in the device registry");
        return r < 0 ? r : too_big ? -E2BIG : 0;
}

int registry_disconnected(Registry *reg, const char *id, uint64_t last_heard_usec) {
        sqlite3_stmt *st = reg->stmt[STMT_DISCONNECTED];
        int rc, r;

        r = store_batch(reg->store);
        if (r < 0)
                return r;
        rc = sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_int64(st, 2, (sqlite3_int64)last_heard_usec);
        return registry_step(reg, st, rc, "recording a disconnection in the device registry");
}

static bool registry_id_valid(const char *id) {
        return id && proto_name_check(id, strlen(id), PROTO_NAME_DEVICE) == 0;
}

int registry_register(Registry *reg, const char *id, const char *actor, bool *ret_created) {
        sqlite3_stmt *st = reg->stmt[STMT_REGISTER];
        RegistryRow row = {};
        int rc, r, known;

        if (!registry_id_valid(id))
                return -EINVAL;
        known = registry_row(reg, id, &row);
        if (known < 0)
                return known;
        r = store_batch(reg->store);
        if (r < 0)
                return r;
        rc = sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_int64(st, 2, (sqlite3_int64)realtime_usec());
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_text(st, 3, actor, -1, SQLITE_STATIC);
        r = registry_step(reg, st, rc, "registering a device");
        if (r >= 0)
                r = store_commit(reg->store);
        if (r < 0)
                return r;
        if (!known)
                reg->hooks.added(reg->hooks.userdata, id);
        if (ret_created)
                *ret_created = !known || !row.registered;
        return 0;
}

int registry_revoke(Registry *reg, const char *id, const char *reason, const char *actor, bool *ret_changed) {
        sqlite3_stmt *st = reg->stmt[STMT_REVOKE];
        RegistryRow row = {};
        int rc, r, known;

        if (!registry_id_valid(id))
                return -EINVAL;
        known = registry_row(reg, id, &row);
        if (known < 0)
                return known;
        if (known && row.revoked) {
                if (ret_changed)
                        *ret_changed = false;
                return 0;
        }
        r = store_batch(reg->store);
        if (r < 0)
                return r;
        rc = sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_int64(st, 2, (sqlite3_int64)realtime_usec());
        if (rc == SQLITE_OK)
                rc = bind_text(st, 3, reason);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_text(st, 4, actor, -1, SQLITE_STATIC);
        r = registry_step(reg, st, rc, "revoking a device");
        if (r >= 0)
                r = store_commit(reg->store);
        if (r < 0)
                return r;
        if (!known)
                reg->hooks.added(reg->hooks.userdata, id);
        reg->hooks.revoked(reg->hooks.userdata, id, reason, actor);
        if (ret_changed)
                *ret_changed = true;
        return 0;
}

int registry_unrevoke(Registry *reg, const char *id, const char *actor, bool *ret_changed) {
        sqlite3_stmt *st = reg->stmt[STMT_UNREVOKE];
        RegistryRow row = {};
        int rc, r, known;

        if (!registry_id_valid(id))
                return -EINVAL;
        known = registry_row(reg, id, &row);
        if (known < 0)
                return known;
        if (!known)
                return -ENOENT;
        if (!row.revoked) {
                if (ret_changed)
                        *ret_changed = false;
                return 0;
        }
        r = store_batch(reg->store);
        if (r < 0)
                return r;
        rc = sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
        r = registry_step(reg, st, rc, "unrevoking a device");
        if (r >= 0)
                r = store_commit(reg->store);
        if (r < 0)
                return r;
        reg->hooks.unrevoked(reg->hooks.userdata, id, actor);
        if (ret_changed)
                *ret_changed = true;
        return 0;
}

int registry_identity(Registry *reg, const char *id, RegistryIdentity *ret) {
        sqlite3_stmt *st = reg->stmt[STMT_GET];
        RegistryIdentity ident = {};
        int r = registry_get(reg, id);

        if (r < 0)
                return r;
        if (r > 0) {
                const char *key = (const char *)sqlite3_column_text(st, 14);

                ident.known = true;
                ident.registered = sqlite3_column_type(st, 0) != SQLITE_NULL;
                snprintf(ident.registered_by, sizeof(ident.registered_by), "%s",
                         (const char *)sqlite3_column_text(st, 1) ?: "");
                ident.revoked = sqlite3_column_type(st, 7) != SQLITE_NULL;
                snprintf(ident.revoked_reason, sizeof(ident.revoked_reason), "%s",
                         (const char *)sqlite3_column_text(st, 8) ?: "");
                if (key)
                        snprintf(ident.pubkey, sizeof(ident.pubkey), "%s", key);
                /* A certificate seen before keys were recorded counts as
                 * another key: nobody can prove it is theirs. */
                ident.has_key = key ? key[0] != 0 : sqlite3_column_type(st, 5) != SQLITE_NULL;
                registry_get_done(reg);
        }
        *ret = ident;
        return 0;
}

int registry_issued(Registry *reg, const char *id, const RegistryCert *cert, bool enroll, const char *actor,
                    json_t *tags) {
        sqlite3_stmt *st = reg->stmt[enroll ? STMT_ENROLLED : STMT_RENEWED];
        _cleanup_free_ char *tags_text = NULL;
        RegistryRow row = {};
        int rc, r, known;

        if (!registry_id_valid(id))
                return -EINVAL;
        if (enroll && tags && json_object_size(tags) > 0) {
                tags_text = json_dumps(tags, JSON_COMPACT | JSON_SORT_KEYS);
                if (!tags_text)
                        return -ENOMEM;
        }
        known = registry_row(reg, id, &row);
        if (known < 0)
                return known;
        if (!enroll && !known)
                return -ENOENT;
        r = store_batch(reg->store);
        if (r < 0)
                return r;
        rc = sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_int64(st, 2, (sqlite3_int64)realtime_usec());
        if (rc == SQLITE_OK && enroll)
                rc = bind_text(st, 3, actor);
        if (rc == SQLITE_OK && enroll)
                rc = bind_text(st, 4, tags_text);
        if (rc == SQLITE_OK)
                rc = bind_text(st, 5, cert->serial);
        if (rc == SQLITE_OK)
                rc = bind_text(st, 6, cert->fingerprint);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_int64(st, 7, cert->not_before);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_int64(st, 8, cert->not_after);
        if (rc == SQLITE_OK)
                rc = bind_text(st, 9, cert->how);
        if (rc == SQLITE_OK)
                rc = bind_text(st, 10, cert->pubkey);
        if (rc == SQLITE_OK)
                rc = bind_text(st, 11, cert->issuer && cert->issuer[0] ? cert->issuer : NULL);
        r = registry_step(reg, st, rc, enroll ? "recording an enrollment" : "recording a renewal");
        /* An enrollment is on disk before its certificate is handed out;
         * a renewal joins the batch (a fleet renewing at once is one
         * commit per STORE_BATCH_MSEC; lost in a crash, the record comes
         * back when the device connects with the new certificate). */
        if (r >= 0 && enroll)
                r = store_commit(reg->store);
        if (r < 0)
                return r;
        if (!known)
                reg->hooks.added(reg->hooks.userdata, id);
        return 0;
}

int64_t registry_renew_after(int64_t not_before, int64_t not_after) {
        return not_before + (not_after - not_before) / 3 * 2;
}

const char *registry_cert_state(int64_t not_before, int64_t not_after, int64_t now) {
        if (now >= not_after)
                return "expired";
        if (not_before > 0 && now >= registry_renew_after(not_before, not_after))
                return "renew-due";
        return "valid";
}

static void unix_time_text(int64_t t, char buf[static 32]) {
        time_t tt = (time_t)t;
        struct tm tm;

        buf[0] = 0;
        if (t > 0 && gmtime_r(&tt, &tm))
                strftime(buf, 32, "%Y-%m-%dT%H:%M:%SZ", &tm);
}

/* A time column as RFC 3339 UTC text, or JSON null. */
static json_t *column_time(sqlite3_stmt *st, int i) {
        uint64_t usec;
        time_t t;
        struct tm tm;
        char buf[64];

        if (sqlite3_column_type(st, i) == SQLITE_NULL)
                return json_null();
        usec = (uint64_t)sqlite3_column_int64(st, i);
        t = (time_t)(usec / 1000000ULL);
        gmtime_r(&t, &tm);
        snprintf(buf, sizeof(buf), "%04d-%02d-%02dT%02d:%02d:%02d.%03uZ", tm.tm_year + 1900, tm.tm_mon + 1,
                 tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, (unsigned)(usec % 1000000ULL / 1000U));
        return json_string(buf);
}

static json_t *column_text(sqlite3_stmt *st, int i) {
        const char *t = (const char *)sqlite3_column_text(st, i);

        return t ? json_string(t) : json_null();
}

int registry_device_json(Registry *reg, const char *id, json_t *j, bool details) {
        sqlite3_stmt *st = reg->stmt[STMT_GET];
        json_t *cert = NULL;
        bool revoked;
        int r = registry_get(reg, id), k = 0;

        if (r < 0)
                return r;
        revoked = r > 0 && sqlite3_column_type(st, 7) != SQLITE_NULL;
        k |= json_object_set_new(j, "status", json_string(revoked ? "revoked" : "normal"));
        k |= json_object_set_new(j, "revoked", json_boolean(revoked));
        if (r > 0 && sqlite3_column_type(st, 5) != SQLITE_NULL) {
                int64_t nb = sqlite3_column_int64(st, 11), na = sqlite3_column_int64(st, 6);
                const char *state = na > 0 ? registry_cert_state(nb, na, (int64_t)time(NULL)) : NULL;
                char t_nb[32], t_na[32], t_ra[32];

                unix_time_text(nb, t_nb);
                unix_time_text(na, t_na);
                unix_time_text(nb > 0 && na > 0 ? registry_renew_after(nb, na) : 0, t_ra);
                if (details)
                        cert = json_pack("{s:o, s:o, s:o, s:s?, s:s?, s:s?, s:o, s:o, s:s?}", "serial",
                                         column_text(st, 4), "fingerprint", column_text(st, 5), "issuer",
                                         column_text(st, 15), "not_before", t_nb[0] ? t_nb : NULL, "not_after",
                                         t_na[0] ? t_na : NULL, "renew_after", t_ra[0] ? t_ra : NULL, "issued_at",
                                         column_time(st, 12), "issued_by", column_text(st, 13), "state", state);
                else
                        cert = json_pack("{s:s?, s:s?}", "not_after", t_na[0] ? t_na : NULL, "state", state);
                k |= cert ? json_object_set_new(j, "certificate", cert) : -1;
        }
        /* Inventory: for every device, known to the registry or not. */
        {
                const char *tags = r > 0 ? (const char *)sqlite3_column_text(st, 10) : NULL;
                json_t *t = tags ? json_loads(tags, 0, NULL) : NULL;

                k |= json_object_set_new(j, "tags", json_is_object(t) ? t : (json_decref(t), json_object()));
                k |= json_object_set_new(j, "name", r > 0 ? column_text(st, 17) : json_null());
                k |= json_object_set_new(j, "notes", r > 0 ? column_text(st, 18) : json_null());
        }
        if (r > 0 && details) {
                k |= json_object_set_new(j, "updated_at", column_time(st, 19));
                k |= json_object_set_new(j, "registered_at", column_time(st, 0));
                k |= json_object_set_new(j, "registered_by", column_text(st, 1));
                k |= json_object_set_new(j, "first_connected", column_time(st, 2));
                k |= json_object_set_new(j, "last_connected", column_time(st, 3));
                if (revoked) {
                        k |= json_object_set_new(j, "revoked_at", column_time(st, 7));
                        k |= json_object_set_new(j, "revoked_reason", column_text(st, 8));
                        k |= json_object_set_new(j, "revoked_by", column_text(st, 9));
                }
        }
        if (r > 0)
                registry_get_done(reg);
        return k ? -ENOMEM : 0;
}

/* Whether another device is named name or has it as its id: 1 and its
 * id in holder, 0, or -EIO. */
static int registry_name_taken(Registry *reg, const char *id, const char *name,
                               char holder[static PROTO_DEVICE_ID_MAX + 1]) {
        sqlite3_stmt *st = reg->stmt[STMT_NAME_TAKEN];
        int rc, taken = 0;

        rc = sqlite3_bind_text(st, 1, name, -1, SQLITE_STATIC);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_text(st, 2, id, -1, SQLITE_STATIC);
        if (rc == SQLITE_OK && (rc = sqlite3_step(st)) == SQLITE_ROW) {
                snprintf(holder, PROTO_DEVICE_ID_MAX + 1, "%s", (const char *)sqlite3_column_text(st, 0) ?: "");
                taken = 1;
                rc = SQLITE_DONE;
        }
        sqlite3_reset(st);
        sqlite3_clear_bindings(st);
        return rc == SQLITE_DONE ? taken : store_error(reg->store, rc, "reading the device names");
}

static bool text_same(const char *a, const char *b) {
        return a == b || (a && b && streq(a, b));
}

int registry_update(Registry *reg, const char *id, const InventoryUpdate *u, const char *actor, json_t **ret_state,
                    char err[static INVENTORY_ERROR_MAX]) {
        sqlite3_stmt *st = reg->stmt[STMT_GET];
        _cleanup_free_ char *old_name = NULL, *old_notes = NULL, *tags_text = NULL;
        _cleanup_(json_decrefp) json_t *old_tags = NULL, *new_tags = NULL, *changed = NULL, *state = NULL;
        char holder[PROTO_DEVICE_ID_MAX + 1], updated[64];
        const char *name, *notes;
        uint64_t now = realtime_usec(), old_updated;
        int rc, r;

        r = registry_get(reg, id);
        if (r <= 0)
                return r < 0 ? r : -ENOENT;
        if (sqlite3_column_type(st, 17) != SQLITE_NULL && !(old_name = strdup((const char *)sqlite3_column_text(st, 17))))
                r = -ENOMEM;
        if (sqlite3_column_type(st, 18) != SQLITE_NULL && !(old_notes = strdup((const char *)sqlite3_column_text(st, 18))))
                r = -ENOMEM;
        if (sqlite3_column_type(st, 10) != SQLITE_NULL)
                old_tags = json_loads((const char *)sqlite3_column_text(st, 10), 0, NULL);
        old_updated = (uint64_t)sqlite3_column_int64(st, 19);
        registry_get_done(reg);
        if (r < 0)
                return r;
        if (!json_is_object(old_tags)) {
                json_decref(old_tags);
                old_tags = json_object();
                if (!old_tags)
                        return -ENOMEM;
        }
        name = u->has_name ? u->name : old_name;
        notes = u->has_notes ? u->notes : old_notes;
        if (u->tags) {
                r = inventory_tags_merge(old_tags, u->tags, &new_tags, err);
                if (r < 0)
                        return r;
        } else
                new_tags = json_incref(old_tags);
        changed = json_object();
        if (!changed)
                return -ENOMEM;
        if (!text_same(name, old_name)) {
                if (name) {
                        r = registry_name_taken(reg, id, name, holder);
                        if (r < 0)
                                return r;
                        if (r > 0) {
                                snprintf(err, INVENTORY_ERROR_MAX, "name '%s' is taken by device %s", name, holder);
                                return -EEXIST;
                        }
                }
                if (json_object_set_new(changed, "name", name ? json_string(name) : json_null()) < 0)
                        return -ENOMEM;
        }
        if (!text_same(notes, old_notes) && json_object_set_new(changed, "notes", notes ? json_string(notes) : json_null()) < 0)
                return -ENOMEM;
        if (!json_equal(new_tags, old_tags) && json_object_set(changed, "tags", new_tags) < 0)
                return -ENOMEM;
        if (json_object_size(changed) > 0) {
                st = reg->stmt[STMT_UPDATE];
                if (json_object_size(new_tags) > 0 &&
                    !(tags_text = json_dumps(new_tags, JSON_COMPACT | JSON_SORT_KEYS)))
                        return -ENOMEM;
                r = store_batch(reg->store);
                if (r < 0)
                        return r;
                rc = sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
                if (rc == SQLITE_OK)
                        rc = bind_text(st, 2, name);
                if (rc == SQLITE_OK)
                        rc = bind_text(st, 3, notes);
                if (rc == SQLITE_OK)
                        rc = bind_text(st, 4, tags_text);
                if (rc == SQLITE_OK)
                        rc = sqlite3_bind_int64(st, 5, (sqlite3_int64)now);
                r = registry_step(reg, st, rc, "updating a device's name, notes or tags");
                if (r >= 0)
                        r = store_commit(reg->store);
                if (r < 0)
                        return r;
        }
        if (json_object_size(changed) == 0)
                now = old_updated;
        updated[0] = 0;
        if (now > 0) {
                time_t t = (time_t)(now / 1000000ULL);
                struct tm tm;

                gmtime_r(&t, &tm);
                snprintf(updated, sizeof(updated), "%04d-%02d-%02dT%02d:%02d:%02d.%03uZ", tm.tm_year + 1900,
                         tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                         (unsigned)(now % 1000000ULL / 1000U));
        }
        state = json_pack("{s:s?, s:s?, s:O, s:O, s:s?}", "name", name, "notes", notes, "tags", new_tags, "changed",
                          changed, "updated_at", updated[0] ? updated : NULL);
        if (!state)
                return -ENOMEM;
        if (json_object_size(changed) > 0)
                reg->hooks.updated(reg->hooks.userdata, id, changed, actor);
        *ret_state = TAKE_PTR(state);
        return 0;
}

int registry_describe_doc(Registry *reg, const char *id, char **ret) {
        sqlite3_stmt *st = reg->stmt[STMT_DESCRIBE_GET];
        char *doc = NULL;
        int rc;

        rc = sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
        if (rc == SQLITE_OK && (rc = sqlite3_step(st)) == SQLITE_ROW) {
                const char *text = (const char *)sqlite3_column_text(st, 0);

                rc = text && !(doc = strdup(text)) ? SQLITE_NOMEM : SQLITE_DONE;
        }
        sqlite3_reset(st);
        sqlite3_clear_bindings(st);
        if (rc == SQLITE_NOMEM)
                return -ENOMEM;
        if (rc != SQLITE_DONE)
                return store_error(reg->store, rc, "reading a device's describe document");
        *ret = doc;
        return 0;
}

int registry_tags(Registry *reg, const char *id, json_t **ret) {
        sqlite3_stmt *st = reg->stmt[STMT_TAGS];
        json_t *tags = NULL;
        int rc;

        rc = sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
        if (rc == SQLITE_OK && (rc = sqlite3_step(st)) == SQLITE_ROW) {
                const char *text = (const char *)sqlite3_column_text(st, 0);

                tags = text ? json_loads(text, 0, NULL) : NULL;
                if (tags && (!json_is_object(tags) || json_object_size(tags) == 0)) {
                        json_decref(tags);
                        tags = NULL;
                }
                rc = SQLITE_DONE;
        }
        sqlite3_reset(st);
        sqlite3_clear_bindings(st);
        if (rc != SQLITE_DONE)
                return store_error(reg->store, rc, "reading a device's tags");
        *ret = tags;
        return 0;
}

int registry_foreach_tagged(Registry *reg, const char *match, registry_id_fn fn, void *userdata) {
        sqlite3_stmt *st = reg->stmt[STMT_TAGGED];
        int rc;

        rc = sqlite3_bind_text(st, 1, match, -1, SQLITE_STATIC);
        while (rc == SQLITE_OK && (rc = sqlite3_step(st)) == SQLITE_ROW) {
                const char *id = (const char *)sqlite3_column_text(st, 0);

                if (id)
                        fn(userdata, id);
                rc = SQLITE_OK;
        }
        sqlite3_reset(st);
        sqlite3_clear_bindings(st);
        return rc == SQLITE_DONE ? 0 : store_error(reg->store, rc, "reading the devices of some tags");
}

int registry_foreach(Registry *reg, registry_foreach_fn fn, void *userdata) {
        sqlite3_stmt *st = NULL;
        int rc;

        rc = sqlite3_prepare_v2(store_db(reg->store),
                                "SELECT id, last_heard_usec, last_address, describe FROM devices ORDER BY rowid", -1,
                                &st, NULL);
        while (rc == SQLITE_OK && (rc = sqlite3_step(st)) == SQLITE_ROW) {
                fn(userdata, (const char *)sqlite3_column_text(st, 0), (uint64_t)sqlite3_column_int64(st, 1),
                   (const char *)sqlite3_column_text(st, 2), (const char *)sqlite3_column_text(st, 3));
                rc = SQLITE_OK;
        }
        sqlite3_finalize(st);
        return rc == SQLITE_DONE ? 0 : store_error(reg->store, rc, "reading the device registry");
}

Registry *registry_free(Registry *reg) {
        if (!reg)
                return NULL;
        for (size_t i = 0; i < _STMT_MAX; i++)
                sqlite3_finalize(reg->stmt[i]);
        free(reg->path);
        free(reg);
        return NULL;
}

int registry_new(Store *store, RegistryPolicy policy, const RegistryHooks *hooks, Registry **ret) {
        _cleanup_(registry_freep) Registry *reg = NULL;
        int r;

        reg = calloc(1, sizeof(*reg));
        if (!reg)
                return log_error_errno(-ENOMEM, "Out of memory.");
        reg->store = store;
        reg->policy = policy;
        reg->hooks = *hooks;
        {
                const char *path = sqlite3_db_filename(store_db(store), "main");

                if (path && *path && !(reg->path = strdup(path)))
                        return log_error_errno(-ENOMEM, "Out of memory.");
        }
        r = store_migrate(store, "registry", registry_schema, ELEMENTSOF(registry_schema));
        if (r < 0)
                return log_error_errno(r, "Cannot set up the device registry in the cloud database.");
        for (size_t i = 0; i < _STMT_MAX; i++) {
                int rc = sqlite3_prepare_v3(store_db(store), registry_sql[i], -1, SQLITE_PREPARE_PERSISTENT,
                                            &reg->stmt[i], NULL);

                if (rc != SQLITE_OK)
                        return store_error(store, rc, "preparing the device registry's statements");
        }
        *ret = TAKE_PTR(reg);
        return 0;
}
