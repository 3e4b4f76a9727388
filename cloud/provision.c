/* SPDX-License-Identifier: Apache-2.0 */
/* Provisioning tokens (provision.h). The table is the truth: nothing is
 * cached, so every check and every use reads what is committed, and a
 * use is one conditional UPDATE whose effect is checked. */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "log.h"
#include "proto.h"
#include "provision.h"
#include "util.h"

#define PROVISION_DEAD_SLACK 100  /* dead tokens past PROVISION_DEAD_MAX before they are deleted */
#define PROVISION_SECRET_BYTES 20 /* 160 bits, 40 hex digits */
#define PROVISION_DIGEST_SIZE 32  /* SHA-256 */
#define PROVISION_TOKEN_LEN (sizeof(PROVISION_PREFIX) - 1 + 2 * PROVISION_SECRET_BYTES)

struct Provision {
        Store *store;
        /* Prepared once: an enrollment looks its token up twice and
         * takes a use. */
        sqlite3_stmt *find, *use;
};

static const char *const provision_schema[] = {
        "CREATE TABLE provision_tokens ("
        "  id TEXT PRIMARY KEY,"             /* prov- and 8 hex digits of the digest */
        "  digest BLOB NOT NULL UNIQUE,"     /* SHA-256 of the token, never the token */
        "  name TEXT NOT NULL,"
        "  uses_max INTEGER NOT NULL,"
        "  uses INTEGER NOT NULL DEFAULT 0,"
        "  expires_at INTEGER NOT NULL,"     /* Unix seconds */
        "  tags TEXT NOT NULL,"              /* JSON object of strings */
        "  created_at INTEGER NOT NULL,"
        "  created_by TEXT,"
        "  revoked_at INTEGER,"
        "  revoked_by TEXT);",
};

#define PROVISION_COLUMNS \
        "id, digest, name, uses_max, uses, expires_at, tags, created_at, created_by, revoked_at, revoked_by"

/* One row, as read. */
typedef struct ProvisionRow {
        char id[PROVISION_ID_MAX + 1];
        uint8_t digest[PROVISION_DIGEST_SIZE];
        bool has_digest;
        const char *name, *tags, *created_by, *revoked_by; /* into the statement */
        int64_t uses_max, uses, expires_at, created_at, revoked_at;
} ProvisionRow;

static int64_t provision_now(void) {
        return (int64_t)time(NULL);
}

Provision *provision_free(Provision *p) {
        if (!p)
                return NULL;
        sqlite3_finalize(p->find);
        sqlite3_finalize(p->use);
        free(p);
        return NULL;
}

int provision_open(Store *store, Provision **ret) {
        _cleanup_(provision_freep) Provision *p = NULL;
        sqlite3_stmt *st = NULL;
        int64_t n = 0;
        int rc, r;

        p = calloc(1, sizeof(*p));
        if (!p)
                return log_error_errno(-ENOMEM, "Out of memory.");
        p->store = store;
        r = store_migrate(store, "provision", provision_schema, ELEMENTSOF(provision_schema));
        if (r < 0)
                return r;
        rc = sqlite3_prepare_v2(store_db(store), "SELECT count(*) FROM provision_tokens", -1, &st, NULL);
        if (rc == SQLITE_OK && (rc = sqlite3_step(st)) == SQLITE_ROW) {
                n = sqlite3_column_int64(st, 0);
                rc = SQLITE_OK;
        }
        sqlite3_finalize(st);
        if (rc != SQLITE_OK)
                return store_error(store, rc, "counting the provisioning tokens");
        if (n > 0)
                log_info("The cloud database holds %" PRId64 " provisioning token(s).", n);
        rc = sqlite3_prepare_v3(store_db(store), "SELECT " PROVISION_COLUMNS " FROM provision_tokens WHERE digest = ?",
                                -1, SQLITE_PREPARE_PERSISTENT, &p->find, NULL);
        /* The conditions again, in the statement: whatever ran since the
         * check, a use is taken only while one is left. */
        if (rc == SQLITE_OK)
                rc = sqlite3_prepare_v3(store_db(store),
                                        "UPDATE provision_tokens SET uses = uses + 1 WHERE id = ?1 AND uses < uses_max "
                                        "AND revoked_at IS NULL AND expires_at > ?2",
                                        -1, SQLITE_PREPARE_PERSISTENT, &p->use, NULL);
        if (rc != SQLITE_OK)
                return store_error(store, rc, "preparing the provisioning tokens' statements");
        *ret = TAKE_PTR(p);
        return 0;
}

static int sha256(const char *text, size_t len, uint8_t out[static PROVISION_DIGEST_SIZE]) {
        unsigned n = 0;

        if (EVP_Digest(text, len, out, &n, EVP_sha256(), NULL) != 1 || n != PROVISION_DIGEST_SIZE)
                return -EIO;
        return 0;
}

static void id_of(const uint8_t digest[static PROVISION_DIGEST_SIZE], char out[static PROVISION_ID_MAX + 1]) {
        memcpy(out, "prov-", 5);
        hex_encode(digest, 4, out + 5);
}

/* Whether token has the shape of one: the prefix and 40 lowercase hex
 * digits, nothing else. */
static bool token_well_formed(const char *token) {
        size_t n = strlen(PROVISION_PREFIX);

        if (!token || strncmp(token, PROVISION_PREFIX, n) != 0 || strlen(token) != PROVISION_TOKEN_LEN)
                return false;
        for (const char *c = token + n; *c; c++)
                if (!((*c >= '0' && *c <= '9') || (*c >= 'a' && *c <= 'f')))
                        return false;
        return true;
}

bool provision_tag_value_valid(const char *s, size_t len) {
        return len <= PROVISION_TAG_VALUE_MAX && proto_text_clean(s, len, SIZE_MAX);
}

int provision_tags_check(json_t *tags, char err[static PROVISION_REASON_MAX]) {
        const char *key;
        json_t *v;

        if (!tags || json_is_null(tags))
                return 0;
        if (!json_is_object(tags)) {
                snprintf(err, PROVISION_REASON_MAX, "\"tags\" must be a JSON object of names to text values");
                return -EINVAL;
        }
        if (json_object_size(tags) > PROVISION_TAGS_MAX) {
                snprintf(err, PROVISION_REASON_MAX, "\"tags\" holds %zu tags, at most %u are allowed",
                         json_object_size(tags), (unsigned)PROVISION_TAGS_MAX);
                return -EINVAL;
        }
        json_object_foreach(tags, key, v) {
                size_t klen = strlen(key);

                if (klen > PROVISION_TAG_KEY_MAX || proto_name_check(key, klen, PROTO_NAME_FUNCTION) < 0) {
                        snprintf(err, PROVISION_REASON_MAX,
                                 "Invalid tag name in \"tags\": names are [A-Za-z0-9_.-]{1,%u}",
                                 (unsigned)PROVISION_TAG_KEY_MAX);
                        return -EINVAL;
                }
                if (!json_is_string(v)) {
                        snprintf(err, PROVISION_REASON_MAX, "The value of tag '%s' must be a string", key);
                        return -EINVAL;
                }
                if (json_string_length(v) > PROVISION_TAG_VALUE_MAX) {
                        snprintf(err, PROVISION_REASON_MAX, "The value of tag '%s' is longer than %u bytes", key,
                                 (unsigned)PROVISION_TAG_VALUE_MAX);
                        return -EINVAL;
                }
                if (!proto_text_clean(json_string_value(v), json_string_length(v), SIZE_MAX)) {
                        snprintf(err, PROVISION_REASON_MAX,
                                 "The value of tag '%s' must be UTF-8 text without control characters", key);
                        return -EINVAL;
                }
        }
        return 0;
}

static int64_t column_int(sqlite3_stmt *st, int i) {
        return sqlite3_column_type(st, i) == SQLITE_NULL ? 0 : (int64_t)sqlite3_column_int64(st, i);
}

/* The row st stands on (PROVISION_COLUMNS); false for a malformed one. */
static bool row_read(sqlite3_stmt *st, ProvisionRow *ret) {
        const char *id = (const char *)sqlite3_column_text(st, 0);
        const void *digest = sqlite3_column_blob(st, 1);
        ProvisionRow row = {};

        if (!id || strlen(id) > PROVISION_ID_MAX)
                return false;
        memcpy(row.id, id, strlen(id) + 1);
        if (digest && sqlite3_column_bytes(st, 1) == PROVISION_DIGEST_SIZE) {
                memcpy(row.digest, digest, PROVISION_DIGEST_SIZE);
                row.has_digest = true;
        }
        row.name = (const char *)sqlite3_column_text(st, 2) ?: "";
        row.uses_max = column_int(st, 3);
        row.uses = column_int(st, 4);
        row.expires_at = column_int(st, 5);
        row.tags = (const char *)sqlite3_column_text(st, 6);
        row.created_at = column_int(st, 7);
        row.created_by = (const char *)sqlite3_column_text(st, 8);
        row.revoked_at = column_int(st, 9);
        row.revoked_by = (const char *)sqlite3_column_text(st, 10);
        *ret = row;
        return true;
}

/* 0 (usable now) or the error provision_check() returns for the row. */
static int row_state(const ProvisionRow *row, int64_t now) {
        if (row->revoked_at)
                return -EKEYREVOKED;
        if (row->uses >= row->uses_max)
                return -EUSERS;
        if (now >= row->expires_at)
                return -EKEYEXPIRED;
        return 0;
}

static const char *state_name(int state) {
        return state == -EKEYREVOKED ? "revoked" : state == -EUSERS ? "used-up" : state == -EKEYEXPIRED ? "expired"
                                                                                                        : "active";
}

static json_t *time_json(int64_t sec) {
        time_t tt = (time_t)sec;
        struct tm tm;
        char buf[32];

        if (!sec || !gmtime_r(&tt, &tm))
                return json_null();
        strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%SZ", &tm);
        return json_string(buf);
}

/* The tags of a row: a new object (empty for a malformed column). */
static json_t *tags_json(const char *text) {
        json_t *t = text ? json_loads(text, JSON_REJECT_DUPLICATES, NULL) : NULL;

        if (json_is_object(t))
                return t;
        json_decref(t);
        return json_object();
}

static json_t *row_to_json(const ProvisionRow *row, int64_t now) {
        return json_pack("{s:s, s:s, s:I, s:I, s:o, s:o, s:o, s:s?, s:o, s:s?, s:s}", "id", row->id, "name",
                         row->name, "uses_max", (json_int_t)row->uses_max, "uses", (json_int_t)row->uses,
                         "expires_at", time_json(row->expires_at), "tags", tags_json(row->tags), "created_at",
                         time_json(row->created_at), "created_by", row->created_by, "revoked_at",
                         time_json(row->revoked_at), "revoked_by", row->revoked_by, "state",
                         state_name(row_state(row, now)));
}

/* Run a prepared SELECT of PROVISION_COLUMNS: each row to append (into
 * array) or, for array == NULL, the first row's JSON into *ret_one. */
static int provision_select(Provision *p, sqlite3_stmt *st, json_t *array, json_t **ret_one, const char *what) {
        int64_t now = provision_now();
        int rc;

        while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
                ProvisionRow row;
                json_t *j;

                if (!row_read(st, &row))
                        continue;
                j = row_to_json(&row, now);
                if (!j)
                        return -ENOMEM;
                if (!array) {
                        *ret_one = j;
                        return 0;
                }
                if (json_array_append_new(array, j) < 0)
                        return -ENOMEM;
        }
        if (rc != SQLITE_DONE)
                return store_error(p->store, rc, what);
        return 0;
}

json_t *provision_get_json(Provision *p, const char *id) {
        sqlite3_stmt *st = NULL;
        json_t *j = NULL;
        int rc;

        if (!id || strlen(id) > PROVISION_ID_MAX)
                return NULL;
        rc = sqlite3_prepare_v2(store_db(p->store), "SELECT " PROVISION_COLUMNS " FROM provision_tokens WHERE id = ?",
                                -1, &st, NULL);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
        if (rc == SQLITE_OK)
                (void)provision_select(p, st, NULL, &j, "reading a provisioning token");
        else
                (void)store_error(p->store, rc, "reading a provisioning token");
        sqlite3_finalize(st);
        return j;
}

json_t *provision_to_json(Provision *p) {
        sqlite3_stmt *st = NULL;
        json_t *a = json_array();
        int rc, r;

        if (!a)
                return NULL;
        rc = sqlite3_prepare_v2(store_db(p->store),
                                "SELECT " PROVISION_COLUMNS " FROM provision_tokens ORDER BY created_at, rowid", -1,
                                &st, NULL);
        if (rc == SQLITE_OK)
                r = provision_select(p, st, a, NULL, "listing the provisioning tokens");
        else
                r = store_error(p->store, rc, "listing the provisioning tokens");
        sqlite3_finalize(st);
        if (r < 0) {
                json_decref(a);
                return NULL;
        }
        return a;
}

/* The live tokens (neither revoked, used up nor expired) and all of them,
 * in one scan. */
static int provision_count(Provision *p, int64_t now, int64_t *ret_live, int64_t *ret_all) {
        sqlite3_stmt *st = NULL;
        int rc;

        rc = sqlite3_prepare_v2(store_db(p->store),
                                "SELECT count(*), total(revoked_at IS NULL AND uses < uses_max AND expires_at > ?) "
                                "FROM provision_tokens",
                                -1, &st, NULL);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_int64(st, 1, now);
        if (rc == SQLITE_OK && (rc = sqlite3_step(st)) == SQLITE_ROW) {
                *ret_all = sqlite3_column_int64(st, 0);
                *ret_live = sqlite3_column_int64(st, 1);
                rc = SQLITE_OK;
        }
        sqlite3_finalize(st);
        return rc == SQLITE_OK ? 0 : store_error(p->store, rc, "counting the provisioning tokens");
}

/* Delete the dead tokens (revoked, used up, expired) but the newest
 * PROVISION_DEAD_MAX. Tokens that die at once (expires_in 1, revoked,
 * uses 1) cost their maker nothing, and kept for ever they would make
 * every creation's count and every list read them all, on the loop: a
 * provision:write holder, no admin, could stall the cloud. Called once
 * PROVISION_DEAD_SLACK more have died (not a second scan per creation). A device
 * refused with a deleted token is told "provisioning token unknown"; the
 * audit log keeps what the token was. Inside the caller's batch. */
static int provision_prune(Provision *p, int64_t now) {
        sqlite3_stmt *st = NULL;
        int rc;

        rc = sqlite3_prepare_v2(store_db(p->store),
                                "DELETE FROM provision_tokens WHERE rowid IN (SELECT rowid FROM provision_tokens "
                                "WHERE revoked_at IS NOT NULL OR uses >= uses_max OR expires_at <= ?1 "
                                "ORDER BY rowid DESC LIMIT -1 OFFSET ?2)",
                                -1, &st, NULL);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_int64(st, 1, now);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_int64(st, 2, PROVISION_DEAD_MAX);
        if (rc == SQLITE_OK)
                rc = sqlite3_step(st) == SQLITE_DONE ? SQLITE_OK : sqlite3_errcode(store_db(p->store));
        sqlite3_finalize(st);
        return rc == SQLITE_OK ? 0 : store_error(p->store, rc, "deleting dead provisioning tokens");
}

static void clear_freep(char **s) {
        if (*s)
                OPENSSL_clear_free(*s, strlen(*s));
}

int provision_create(Provision *p, const ProvisionSpec *spec, char **ret_secret, json_t **ret_json) {
        _cleanup_(clear_freep) char *secret = NULL;
        _cleanup_free_ char *tags = NULL;
        char err[PROVISION_REASON_MAX];
        const char *name = spec->name ?: "";
        int64_t now = provision_now(), live = 0, all = 0;
        uint8_t rnd[PROVISION_SECRET_BYTES];
        ProvisionRow row = {};
        sqlite3_stmt *st = NULL;
        json_t *j;
        int rc = SQLITE_OK, r;

        if (spec->uses_max < 1 || spec->uses_max > PROVISION_USES_MAX || spec->expires_at <= now ||
            spec->expires_at > now + PROVISION_LIFETIME_MAX || strlen(name) > PROVISION_NAME_MAX ||
            !proto_text_clean(name, strlen(name), SIZE_MAX) || provision_tags_check(spec->tags, err) < 0)
                return -EINVAL;
        r = provision_count(p, now, &live, &all);
        if (r < 0)
                return r;
        if (live >= PROVISION_LIVE_MAX)
                return -EUSERS;
        tags = spec->tags && !json_is_null(spec->tags) ? json_dumps(spec->tags, JSON_COMPACT | JSON_SORT_KEYS)
                                                       : strdup("{}");
        secret = malloc(PROVISION_TOKEN_LEN + 1);
        if (!tags || !secret)
                return -ENOMEM;
        r = store_batch(p->store);
        if (r < 0)
                return r;
        if (all - live >= PROVISION_DEAD_MAX + PROVISION_DEAD_SLACK) {
                r = provision_prune(p, now);
                if (r < 0)
                        return r;
        }
        /* An id is 32 bits of the digest: a new token whose id (or digest)
         * is taken is drawn again. */
        for (unsigned attempt = 0;; attempt++) {
                bool taken = false;

                if (attempt >= 8)
                        return -EEXIST;
                if (RAND_bytes(rnd, sizeof(rnd)) != 1)
                        return -EIO;
                strcpy(secret, PROVISION_PREFIX);
                hex_encode(rnd, sizeof(rnd), secret + strlen(PROVISION_PREFIX));
                OPENSSL_cleanse(rnd, sizeof(rnd));
                r = sha256(secret, strlen(secret), row.digest);
                if (r < 0)
                        return r;
                id_of(row.digest, row.id);
                rc = sqlite3_prepare_v2(store_db(p->store),
                                        "INSERT INTO provision_tokens (id, digest, name, uses_max, uses, expires_at, "
                                        "tags, created_at, created_by) VALUES (?, ?, ?, ?, 0, ?, ?, ?, ?)",
                                        -1, &st, NULL);
                if (rc == SQLITE_OK)
                        rc = sqlite3_bind_text(st, 1, row.id, -1, SQLITE_STATIC);
                if (rc == SQLITE_OK)
                        rc = sqlite3_bind_blob(st, 2, row.digest, PROVISION_DIGEST_SIZE, SQLITE_STATIC);
                if (rc == SQLITE_OK)
                        rc = sqlite3_bind_text(st, 3, name, -1, SQLITE_STATIC);
                if (rc == SQLITE_OK)
                        rc = sqlite3_bind_int64(st, 4, spec->uses_max);
                if (rc == SQLITE_OK)
                        rc = sqlite3_bind_int64(st, 5, spec->expires_at);
                if (rc == SQLITE_OK)
                        rc = sqlite3_bind_text(st, 6, tags, -1, SQLITE_STATIC);
                if (rc == SQLITE_OK)
                        rc = sqlite3_bind_int64(st, 7, now);
                if (rc == SQLITE_OK)
                        rc = spec->created_by ? sqlite3_bind_text(st, 8, spec->created_by, -1, SQLITE_STATIC)
                                              : sqlite3_bind_null(st, 8);
                if (rc == SQLITE_OK && sqlite3_step(st) != SQLITE_DONE) {
                        rc = sqlite3_errcode(store_db(p->store));
                        taken = sqlite3_extended_errcode(store_db(p->store)) == SQLITE_CONSTRAINT_PRIMARYKEY ||
                                sqlite3_extended_errcode(store_db(p->store)) == SQLITE_CONSTRAINT_UNIQUE;
                }
                sqlite3_finalize(st);
                st = NULL;
                if (!taken)
                        break;
        }
        OPENSSL_cleanse(row.digest, sizeof(row.digest));
        if (rc != SQLITE_OK)
                return store_error(p->store, rc, "storing a provisioning token");
        r = store_commit(p->store);
        if (r < 0)
                /* Not on disk for sure: not handed out. Should the row be
                 * committed with a later batch, it is a token nobody
                 * holds. */
                return r;
        row.name = name;
        row.uses_max = spec->uses_max;
        row.expires_at = spec->expires_at;
        row.tags = tags;
        row.created_at = now;
        row.created_by = spec->created_by;
        j = row_to_json(&row, now);
        if (!j)
                return -ENOMEM;
        *ret_secret = TAKE_PTR(secret);
        *ret_json = j;
        return 0;
}

/* UPDATE or such by id (sql, or the prepared statement prepared): the
 * number of rows changed, or a negative errno. */
static int provision_update(Provision *p, const char *sql, sqlite3_stmt *prepared, const char *id, int64_t now,
                            const char *actor, const char *what) {
        sqlite3_stmt *st = prepared;
        int rc, r;

        r = store_batch(p->store);
        if (r < 0)
                return r;
        rc = st ? SQLITE_OK : sqlite3_prepare_v2(store_db(p->store), sql, -1, &st, NULL);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_int64(st, 2, now);
        if (rc == SQLITE_OK && sqlite3_bind_parameter_count(st) >= 3)
                rc = actor ? sqlite3_bind_text(st, 3, actor, -1, SQLITE_STATIC) : sqlite3_bind_null(st, 3);
        if (rc == SQLITE_OK)
                rc = sqlite3_step(st) == SQLITE_DONE ? SQLITE_OK : sqlite3_errcode(store_db(p->store));
        if (prepared) {
                sqlite3_reset(st);
                sqlite3_clear_bindings(st);
        } else
                sqlite3_finalize(st);
        if (rc != SQLITE_OK)
                return store_error(p->store, rc, what);
        return sqlite3_changes(store_db(p->store));
}

int provision_revoke(Provision *p, const char *id, const char *actor) {
        json_t *j = provision_get_json(p, id);
        bool revoked;
        int r;

        if (!j)
                return -ENOENT;
        revoked = !json_is_null(json_object_get(j, "revoked_at"));
        json_decref(j);
        if (revoked)
                return -EALREADY;
        r = provision_update(p,
                             "UPDATE provision_tokens SET revoked_at = ?2, revoked_by = ?3 WHERE id = ?1 AND "
                             "revoked_at IS NULL",
                             NULL, id, provision_now(), actor, "revoking a provisioning token");
        if (r < 0)
                return r;
        if (r == 0)
                return -EALREADY;
        return store_commit(p->store);
}

/* The row of token, by the digest of its text: 1 found, 0 not, or a
 * negative errno. */
static int provision_find(Provision *p, const char *token, ProvisionRow *ret, json_t **ret_tags) {
        uint8_t digest[PROVISION_DIGEST_SIZE];
        sqlite3_stmt *st = p->find;
        ProvisionRow row = {};
        int rc, r = 0;

        if (!token_well_formed(token))
                return 0;
        r = sha256(token, strlen(token), digest);
        if (r < 0)
                return r;
        rc = sqlite3_bind_blob(st, 1, digest, sizeof(digest), SQLITE_STATIC);
        if (rc == SQLITE_OK)
                rc = sqlite3_step(st);
        if (rc == SQLITE_ROW) {
                /* The lookup is by the digest of a secret, not the secret;
                 * the comparison that decides is constant-time all the
                 * same. */
                if (row_read(st, &row) && row.has_digest &&
                    CRYPTO_memcmp(row.digest, digest, PROVISION_DIGEST_SIZE) == 0) {
                        if (ret_tags && !(*ret_tags = tags_json(row.tags)))
                                r = -ENOMEM;
                        else {
                                row.name = row.tags = row.created_by = row.revoked_by = NULL;
                                *ret = row;
                                r = 1;
                        }
                }
        } else if (rc != SQLITE_DONE)
                r = store_error(p->store, rc, "looking up a provisioning token");
        sqlite3_reset(st);
        sqlite3_clear_bindings(st);
        OPENSSL_cleanse(digest, sizeof(digest));
        return r;
}

static int provision_reason(int state, const ProvisionRow *row, char reason[static PROVISION_REASON_MAX]) {
        switch (state) {
        case -ENOKEY:
                snprintf(reason, PROVISION_REASON_MAX, "provisioning token unknown");
                break;
        case -EKEYREVOKED:
                snprintf(reason, PROVISION_REASON_MAX, "provisioning token revoked");
                break;
        case -EUSERS:
                snprintf(reason, PROVISION_REASON_MAX, "provisioning token used up (%" PRId64 " of %" PRId64 " uses)",
                         row->uses, row->uses_max);
                break;
        case -EKEYEXPIRED:
                snprintf(reason, PROVISION_REASON_MAX, "provisioning token expired");
                break;
        default:
                break;
        }
        return state;
}

int provision_check(Provision *p, const char *token, char ret_id[static PROVISION_ID_MAX + 1], json_t **ret_tags,
                    char reason[static PROVISION_REASON_MAX]) {
        json_t *tags = NULL;
        ProvisionRow row = {};
        int r;

        r = provision_find(p, token, &row, ret_tags ? &tags : NULL);
        if (r < 0)
                return r;
        if (r == 0)
                return provision_reason(-ENOKEY, NULL, reason);
        memcpy(ret_id, row.id, sizeof(row.id));
        r = row_state(&row, provision_now());
        if (r < 0) {
                json_decref(tags);
                return provision_reason(r, &row, reason);
        }
        if (ret_tags)
                *ret_tags = tags;
        return 0;
}

int provision_consume(Provision *p, const char *token, const char *device_id,
                      char ret_id[static PROVISION_ID_MAX + 1], json_t **ret_tags,
                      char reason[static PROVISION_REASON_MAX]) {
        char id[PROVISION_ID_MAX + 1];
        json_t *tags = NULL;
        int r;

        r = provision_check(p, token, id, ret_tags ? &tags : NULL, reason);
        if (r == -EKEYREVOKED || r == -EUSERS || r == -EKEYEXPIRED)
                memcpy(ret_id, id, sizeof(id));
        if (r < 0)
                return r;
        /* p->use checks the conditions again. */
        r = provision_update(p, NULL, p->use, id, provision_now(), NULL, "using a provisioning token");
        if (r == 0) {
                /* Taken meanwhile: say why, from the row as it is now. */
                json_decref(tags);
                tags = NULL;
                memcpy(ret_id, id, sizeof(id));
                r = provision_check(p, token, id, NULL, reason);
                if (r < 0)
                        return r;
                snprintf(reason, PROVISION_REASON_MAX, "provisioning token used up");
                return -EUSERS;
        }
        if (r > 0)
                r = store_commit(p->store);
        if (r < 0) {
                json_decref(tags);
                return r;
        }
        (void)device_id;
        memcpy(ret_id, id, sizeof(id));
        if (ret_tags)
                *ret_tags = tags;
        return 0;
}
