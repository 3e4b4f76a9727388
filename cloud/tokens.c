/* SPDX-License-Identifier: Apache-2.0 */
/* API tokens (tokens.h): the token files' and the database's. */
#include "config.h"

#include <errno.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <sys/random.h>
#include <time.h>

#include "log.h"
#include "tokens.h"
#include "util.h"

#define TOKENS_ID_BYTES 8
#define TOKENS_SECRET_BYTES 32
/* A token's last use is written at most this often (seconds). */
#define TOKENS_LAST_USED_STEP 60

struct Token {
        char id[TOKENS_ID_BYTES * 2 + 1];
        uint8_t digest[CONFIG_TOKEN_DIGEST_SIZE];
        char *name;
        unsigned scopes;
        char **devices, **tags;
        size_t n_devices, n_tags;
        char *tag_match; /* tokens_tag_match(); NULL without tags */
        char *created_by;
        int64_t created, expires, last_used, last_used_stored, revoked; /* Unix seconds; 0: none */
};

struct Tokens {
        Store *store;
        const CloudConfig *config;
        TokensHooks hooks;
        Token **all;       /* oldest first */
        Token **by_digest; /* the same, sorted by digest */
        size_t n;
};

static const char *const tokens_schema[] = {
        "CREATE TABLE tokens ("
        "  id TEXT PRIMARY KEY,"
        "  digest BLOB NOT NULL UNIQUE," /* SHA-256 of the token */
        "  name TEXT NOT NULL,"
        "  scopes TEXT NOT NULL,"        /* names separated by spaces */
        "  devices TEXT,"                /* JSON array of device IDs, or NULL */
        "  tags TEXT,"                   /* JSON array of tags, or NULL */
        "  created INTEGER NOT NULL,"    /* Unix seconds */
        "  expires INTEGER,"
        "  last_used INTEGER,"
        "  revoked INTEGER,"
        "  created_by TEXT);",
};

static int64_t tokens_now(void) {
        return (int64_t)time(NULL);
}

static void strv_free(char **v, size_t n) {
        for (size_t i = 0; i < n; i++)
                free(v[i]);
        free(v);
}

static void token_free(Token *k) {
        if (!k)
                return;
        free(k->name);
        free(k->created_by);
        strv_free(k->devices, k->n_devices);
        strv_free(k->tags, k->n_tags);
        free(k->tag_match);
        OPENSSL_cleanse(k->digest, sizeof(k->digest));
        free(k);
}

Tokens *tokens_free(Tokens *t) {
        if (!t)
                return NULL;
        for (size_t i = 0; i < t->n; i++)
                token_free(t->all[i]);
        free(t->all);
        free(t->by_digest);
        free(t);
        return NULL;
}

static int strv_copy(const char *const *v, size_t n, char ***ret) {
        char **c = n ? calloc(n, sizeof(char *)) : NULL;

        if (n && !c)
                return -ENOMEM;
        for (size_t i = 0; i < n; i++)
                if (!(c[i] = strdup(v[i]))) {
                        strv_free(c, i);
                        return -ENOMEM;
                }
        *ret = c;
        return 0;
}

/* A JSON array of strings (text from the database) into a string vector;
 * anything else is an empty one. */
static int strv_from_json_text(const char *text, char ***ret, size_t *ret_n) {
        json_t *a = text ? json_loads(text, 0, NULL) : NULL;
        const char **v = NULL;
        size_t n = 0, i;
        json_t *x;
        int r;

        if (json_is_array(a)) {
                v = calloc(json_array_size(a) + 1, sizeof(char *));
                if (!v) {
                        json_decref(a);
                        return -ENOMEM;
                }
                json_array_foreach(a, i, x)
                        if (json_is_string(x))
                                v[n++] = json_string_value(x);
        }
        r = strv_copy(v, n, ret);
        free(v);
        json_decref(a);
        if (r < 0)
                return r;
        *ret_n = n;
        return 0;
}

static json_t *strv_to_json(char **v, size_t n) {
        json_t *a = json_array();

        for (size_t i = 0; a && i < n; i++)
                if (json_array_append_new(a, json_string(v[i])) < 0) {
                        json_decref(a);
                        return NULL;
                }
        return a;
}

/* A tag restriction's name (its first len bytes) and value (NULL: any). */
static const char *tag_split(const char *tag, size_t *ret_len) {
        const char *eq = strchr(tag, '=');

        *ret_len = eq ? (size_t)(eq - tag) : strlen(tag);
        return eq ? eq + 1 : NULL;
}

/* k->tag_match from k->tags: [[name, value or null], ...]. */
static int token_tag_match(Token *k) {
        json_t *a;

        if (k->n_tags == 0)
                return 0;
        a = json_array();
        for (size_t i = 0; a && i < k->n_tags; i++) {
                size_t len;
                const char *value = tag_split(k->tags[i], &len);

                if (json_array_append_new(a, json_pack("[s#, s?]", k->tags[i], len, value)) < 0) {
                        json_decref(a);
                        a = NULL;
                }
        }
        k->tag_match = a ? json_dumps(a, JSON_COMPACT) : NULL;
        json_decref(a);
        return k->tag_match ? 0 : -ENOMEM;
}

static int digest_cmp(const void *a, const void *b) {
        const Token *x = *(Token *const *)a, *y = *(Token *const *)b;

        return memcmp(x->digest, y->digest, CONFIG_TOKEN_DIGEST_SIZE);
}

/* Append k (taken) to both arrays. */
static int tokens_add(Tokens *t, Token *k) {
        Token **all = reallocarray(t->all, t->n + 1, sizeof(Token *)), **by;
        size_t lo = 0, hi = t->n;

        if (!all) {
                token_free(k);
                return -ENOMEM;
        }
        t->all = all;
        by = reallocarray(t->by_digest, t->n + 1, sizeof(Token *));
        if (!by) {
                token_free(k);
                return -ENOMEM;
        }
        t->by_digest = by;
        while (lo < hi) {
                size_t mid = lo + (hi - lo) / 2;

                if (memcmp(by[mid]->digest, k->digest, CONFIG_TOKEN_DIGEST_SIZE) < 0)
                        lo = mid + 1;
                else
                        hi = mid;
        }
        memmove(by + lo + 1, by + lo, (t->n - lo) * sizeof(Token *));
        by[lo] = k;
        all[t->n++] = k;
        return 0;
}

static int64_t column_time(sqlite3_stmt *st, int i) {
        return sqlite3_column_type(st, i) == SQLITE_NULL ? 0 : (int64_t)sqlite3_column_int64(st, i);
}

#define TOKENS_COLUMNS "id, digest, name, scopes, devices, tags, created, expires, last_used, revoked, created_by"

/* A Token from a row of TOKENS_COLUMNS: 0 and *ret, -EBADMSG for a
 * malformed row (logged), -ENOMEM. */
static int token_from_row(sqlite3_stmt *st, Token **ret) {
        const char *id = (const char *)sqlite3_column_text(st, 0);
        const void *digest = sqlite3_column_blob(st, 1);
        const char *scopes = (const char *)sqlite3_column_text(st, 3);
        const char *by = (const char *)sqlite3_column_text(st, 10);
        Token *k;

        if (!id || strlen(id) != TOKENS_ID_BYTES * 2 || !digest ||
            sqlite3_column_bytes(st, 1) != CONFIG_TOKEN_DIGEST_SIZE) {
                log_warning("Cloud database: skipping a malformed API token record.");
                return -EBADMSG;
        }
        k = calloc(1, sizeof(*k));
        if (!k)
                return -ENOMEM;
        memcpy(k->id, id, sizeof(k->id));
        memcpy(k->digest, digest, CONFIG_TOKEN_DIGEST_SIZE);
        k->name = strdup((const char *)sqlite3_column_text(st, 2) ?: "");
        k->created_by = by ? strdup(by) : NULL;
        /* Scopes by name: one this program does not know (a newer
         * one wrote it) is not granted. */
        for (const char *s = scopes ?: ""; *s;) {
                size_t n = strcspn(s, " ");
                unsigned bit;

                if (n > 0 && scope_parse(s, n, &bit) == 0)
                        k->scopes |= bit;
                else if (n > 0)
                        log_warning("Cloud database: API token '%s' has the unknown scope '%.*s'; "
                                    "it is not granted.",
                                    k->id, (int)n, s);
                s += n;
                s += strspn(s, " ");
        }
        k->created = column_time(st, 6);
        k->expires = column_time(st, 7);
        k->last_used = k->last_used_stored = column_time(st, 8);
        k->revoked = column_time(st, 9);
        if (!k->name || (by && !k->created_by) ||
            strv_from_json_text((const char *)sqlite3_column_text(st, 4), &k->devices, &k->n_devices) < 0 ||
            strv_from_json_text((const char *)sqlite3_column_text(st, 5), &k->tags, &k->n_tags) < 0 ||
            token_tag_match(k) < 0) {
                token_free(k);
                return -ENOMEM;
        }
        *ret = k;
        return 0;
}

static int tokens_load(Tokens *t) {
        sqlite3 *db = store_db(t->store);
        sqlite3_stmt *st = NULL;
        int rc, r = 0;

        rc = sqlite3_prepare_v2(db, "SELECT " TOKENS_COLUMNS " FROM tokens ORDER BY rowid", -1, &st, NULL);
        while (rc == SQLITE_OK && (rc = sqlite3_step(st)) == SQLITE_ROW) {
                Token *k;

                rc = SQLITE_OK;
                r = token_from_row(st, &k);
                if (r == -EBADMSG) {
                        r = 0;
                        continue;
                }
                if (r < 0)
                        break;
                r = tokens_add(t, k);
                if (r < 0)
                        break;
        }
        sqlite3_finalize(st);
        if (r < 0)
                return log_error_errno(r, "Failed to load the API tokens: %m");
        if (rc != SQLITE_DONE)
                return store_error(t->store, rc, "reading the API tokens");
        /* Digests are unique in the table: the order is total. (No array
         * at all while there are no tokens: qsort() must not see NULL.) */
        if (t->n > 1)
                qsort(t->by_digest, t->n, sizeof(Token *), digest_cmp);
        return 0;
}

int tokens_open(Store *store, const CloudConfig *config, const TokensHooks *hooks, Tokens **ret) {
        _cleanup_(tokens_freep) Tokens *t = NULL;
        int r;

        t = calloc(1, sizeof(*t));
        if (!t)
                return log_error_errno(-ENOMEM, "Out of memory.");
        t->store = store;
        t->config = config;
        t->hooks = *hooks;
        r = store_migrate(store, "tokens", tokens_schema, ELEMENTSOF(tokens_schema));
        if (r < 0)
                return r;
        r = tokens_load(t);
        if (r < 0)
                return r;
        if (t->n > 0)
                log_info("Loaded %zu API token(s) from the cloud database.", t->n);
        *ret = TAKE_PTR(t);
        return 0;
}

static Token *tokens_find_digest(Tokens *t, const uint8_t digest[static CONFIG_TOKEN_DIGEST_SIZE]) {
        size_t lo = 0, hi = t->n;

        /* The digest of a secret, not the secret: where the search stops
         * tells nothing about any token. */
        while (lo < hi) {
                size_t mid = lo + (hi - lo) / 2;
                int c = memcmp(t->by_digest[mid]->digest, digest, CONFIG_TOKEN_DIGEST_SIZE);

                if (c == 0)
                        return t->by_digest[mid];
                if (c < 0)
                        lo = mid + 1;
                else
                        hi = mid;
        }
        return NULL;
}

static Token *tokens_find_id(Tokens *t, const char *id) {
        for (size_t i = 0; i < t->n; i++)
                if (streq(t->all[i]->id, id))
                        return t->all[i];
        return NULL;
}

static int token_state(const Token *k, int64_t now) {
        if (k->revoked)
                return -EKEYREVOKED;
        if (k->expires && now >= k->expires)
                return -EKEYEXPIRED;
        return 0;
}

static void tokens_note_use(Tokens *t, Token *k, int64_t now) {
        sqlite3_stmt *st = NULL;
        int rc;

        k->last_used = now;
        if (now - k->last_used_stored < TOKENS_LAST_USED_STEP)
                return;
        k->last_used_stored = now;
        /* Losing this to a crash loses a minute of "last used": batched. */
        if (store_batch(t->store) < 0)
                return;
        rc = sqlite3_prepare_v2(store_db(t->store), "UPDATE tokens SET last_used = ? WHERE id = ?", -1, &st, NULL);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_int64(st, 1, now);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_text(st, 2, k->id, -1, SQLITE_STATIC);
        if (rc == SQLITE_OK)
                rc = sqlite3_step(st) == SQLITE_DONE ? SQLITE_OK : sqlite3_errcode(store_db(t->store));
        sqlite3_finalize(st);
        if (rc != SQLITE_OK)
                (void)store_error(t->store, rc, "noting an API token's last use");
}

int tokens_check(Tokens *t, const char *token, TokenAuth *ret) {
        TokenAuth a = {};
        Token *k;
        int r;

        if (!token || !*token || cloud_config_token_digest(token, a.digest) < 0)
                return -ENOKEY;
        if (cloud_config_token_digest_valid(t->config, a.digest)) {
                memcpy(a.id, "file-", 5);
                hex_encode(a.digest, 4, a.id + 5);
                a.scopes = SCOPE_ADMIN;
                *ret = a;
                return 0;
        }
        if (cloud_config_metrics_token_digest_valid(t->config, a.digest)) {
                memcpy(a.id, "metrics-", 8);
                hex_encode(a.digest, 4, a.id + 8);
                a.scopes = SCOPE_METRICS_READ;
                *ret = a;
                return 0;
        }
        k = tokens_find_digest(t, a.digest);
        if (!k)
                return -ENOKEY;
        memcpy(a.id, k->id, sizeof(k->id));
        a.scopes = k->scopes;
        a.token = k;
        r = token_state(k, tokens_now());
        if (r == 0)
                tokens_note_use(t, k, tokens_now());
        *ret = a;
        return r;
}

int tokens_recheck(Tokens *t, const TokenAuth *auth) {
        if (auth->token)
                return token_state(auth->token, tokens_now());
        if (auth->scopes & SCOPE_ADMIN)
                return cloud_config_token_digest_valid(t->config, auth->digest) ? 0 : -ENOKEY;
        return cloud_config_metrics_token_digest_valid(t->config, auth->digest) ? 0 : -ENOKEY;
}

bool tokens_restricted(const TokenAuth *auth) {
        return auth->token && (auth->token->n_devices > 0 || auth->token->n_tags > 0);
}

bool tokens_may_reach_device(Tokens *t, const TokenAuth *auth, TokenDevice *d) {
        const Token *k = auth->token;

        if (!tokens_restricted(auth))
                return true;
        if (!d->id)
                return false;
        for (size_t i = 0; i < k->n_devices; i++)
                if (streq(k->devices[i], d->id))
                        return true;
        if (k->n_tags == 0)
                return false;
        if (!d->tags_read) {
                d->tags_read = true;
                if (t->hooks.device_tags(t->hooks.userdata, d->id, &d->tags) < 0)
                        d->tags = NULL;
        }
        if (!json_is_object(d->tags))
                return false;
        for (size_t i = 0; i < k->n_tags; i++) {
                size_t len;
                const char *value = tag_split(k->tags[i], &len);
                json_t *v = json_object_getn(d->tags, k->tags[i], len);

                /* Tags are strings (provision.h); anything else matches
                 * nothing, not even NAME alone. */
                if (!json_is_string(v))
                        continue;
                if (!value || (json_string_length(v) == strlen(value) &&
                               memcmp(json_string_value(v), value, strlen(value)) == 0))
                        return true;
        }
        return false;
}

bool tokens_may_reach(Tokens *t, const TokenAuth *auth, const char *id) {
        TokenDevice d = { .id = id };
        bool r = tokens_may_reach_device(t, auth, &d);

        token_device_done(&d);
        return r;
}

size_t tokens_devices(const TokenAuth *auth, const char *const **ret) {
        if (!auth->token) {
                *ret = NULL;
                return 0;
        }
        *ret = (const char *const *)auth->token->devices;
        return auth->token->n_devices;
}

const char *tokens_tag_match(const TokenAuth *auth) {
        return auth->token ? auth->token->tag_match : NULL;
}

static void format_time(int64_t sec, char out[static 32]) {
        time_t tt = (time_t)sec;
        struct tm tm;

        gmtime_r(&tt, &tm);
        strftime(out, 32, "%Y-%m-%dT%H:%M:%SZ", &tm);
}

static json_t *time_json(int64_t sec) {
        char buf[32];

        if (!sec)
                return json_null();
        format_time(sec, buf);
        return json_string(buf);
}

static json_t *token_to_json(const Token *k, int64_t now) {
        int s = token_state(k, now);

        return json_pack("{s:s, s:s, s:o, s:o, s:o, s:o, s:o, s:o, s:o, s:s?, s:s}", "id", k->id, "name", k->name,
                         "scopes", scope_to_json(k->scopes), "devices", strv_to_json(k->devices, k->n_devices),
                         "tags", strv_to_json(k->tags, k->n_tags), "created_at", time_json(k->created),
                         "expires_at", time_json(k->expires), "last_used_at", time_json(k->last_used),
                         "revoked_at", time_json(k->revoked), "created_by", k->created_by, "state",
                         s == -EKEYREVOKED ? "revoked" : s == -EKEYEXPIRED ? "expired" : "active");
}

json_t *tokens_to_json(Tokens *t) {
        int64_t now = tokens_now();
        json_t *a = json_array();

        for (size_t i = 0; a && i < t->n; i++)
                if (json_array_append_new(a, token_to_json(t->all[i], now)) < 0) {
                        json_decref(a);
                        return NULL;
                }
        return a;
}

json_t *tokens_auth_to_json(const TokenAuth *auth) {
        const Token *k = auth->token;
        const char *name = k                                  ? k->name
                           : startswith(auth->id, "metrics-") ? "[API] MetricsTokenFile="
                                                              : "[API] TokenFile=";

        return json_pack("{s:s, s:s, s:o, s:o, s:o, s:o}", "id", auth->id, "name", name, "scopes",
                         scope_to_json(auth->scopes), "expires_at", k ? time_json(k->expires) : json_null(),
                         "devices", k && k->n_devices ? strv_to_json(k->devices, k->n_devices) : json_null(),
                         "tags", k && k->n_tags ? strv_to_json(k->tags, k->n_tags) : json_null());
}

static char *strv_json_text(const char *const *v, size_t n) {
        json_t *a;
        char *s;

        if (n == 0)
                return NULL;
        a = json_array();
        for (size_t i = 0; a && i < n; i++)
                if (json_array_append_new(a, json_string(v[i])) < 0) {
                        json_decref(a);
                        return NULL;
                }
        s = a ? json_dumps(a, JSON_COMPACT) : NULL;
        json_decref(a);
        return s;
}

static void clear_freep(char **p) {
        if (*p)
                OPENSSL_clear_free(*p, strlen(*p));
}

int tokens_create(Tokens *t, const TokenSpec *spec, char **ret_secret, json_t **ret_json) {
        _cleanup_free_ char *devices = NULL, *tags = NULL;
        _cleanup_(clear_freep) char *secret = NULL;
        uint8_t id_bytes[TOKENS_ID_BYTES], rnd[TOKENS_SECRET_BYTES];
        char scopes[192];
        int64_t now = tokens_now();
        size_t live = 0;
        sqlite3_stmt *st = NULL;
        json_t *j;
        Token *k;
        int rc, r;

        for (size_t i = 0; i < t->n; i++)
                live += token_state(t->all[i], now) == 0;
        if (live >= TOKENS_LIVE_MAX)
                return -EUSERS;
        if ((spec->n_devices && !(devices = strv_json_text(spec->devices, spec->n_devices))) ||
            (spec->n_tags && !(tags = strv_json_text(spec->tags, spec->n_tags))))
                return -ENOMEM;
        k = calloc(1, sizeof(*k));
        if (!k)
                return -ENOMEM;
        do {
                if (getrandom(id_bytes, sizeof(id_bytes), 0) != sizeof(id_bytes)) {
                        token_free(k);
                        return -EIO;
                }
                hex_encode(id_bytes, sizeof(id_bytes), k->id);
        } while (tokens_find_id(t, k->id));
        secret = malloc(strlen(TOKENS_PREFIX) + 2 * sizeof(rnd) + 1);
        if (!secret || getrandom(rnd, sizeof(rnd), 0) != sizeof(rnd)) {
                token_free(k);
                return secret ? -EIO : -ENOMEM;
        }
        strcpy(secret, TOKENS_PREFIX);
        hex_encode(rnd, sizeof(rnd), secret + strlen(TOKENS_PREFIX));
        OPENSSL_cleanse(rnd, sizeof(rnd));
        r = cloud_config_token_digest(secret, k->digest);
        if (r < 0) {
                token_free(k);
                return r;
        }
        k->name = strdup(spec->name ?: "");
        k->created_by = spec->created_by ? strdup(spec->created_by) : NULL;
        k->scopes = spec->scopes;
        k->created = now;
        k->expires = spec->expires_at;
        if (!k->name || (spec->created_by && !k->created_by) ||
            strv_copy(spec->devices, spec->n_devices, &k->devices) < 0) {
                token_free(k);
                return -ENOMEM;
        }
        k->n_devices = spec->n_devices;
        if (strv_copy(spec->tags, spec->n_tags, &k->tags) < 0) {
                token_free(k);
                return -ENOMEM;
        }
        k->n_tags = spec->n_tags;
        if (token_tag_match(k) < 0) {
                token_free(k);
                return -ENOMEM;
        }

        r = store_batch(t->store);
        if (r < 0) {
                token_free(k);
                return r;
        }
        rc = sqlite3_prepare_v2(store_db(t->store),
                                "INSERT INTO tokens (id, digest, name, scopes, devices, tags, created, expires, "
                                "created_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                -1, &st, NULL);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_text(st, 1, k->id, -1, SQLITE_STATIC);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_blob(st, 2, k->digest, CONFIG_TOKEN_DIGEST_SIZE, SQLITE_STATIC);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_text(st, 3, k->name, -1, SQLITE_STATIC);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_text(st, 4, scope_to_text(k->scopes, scopes, sizeof(scopes)), -1, SQLITE_STATIC);
        if (rc == SQLITE_OK)
                rc = devices ? sqlite3_bind_text(st, 5, devices, -1, SQLITE_STATIC) : sqlite3_bind_null(st, 5);
        if (rc == SQLITE_OK)
                rc = tags ? sqlite3_bind_text(st, 6, tags, -1, SQLITE_STATIC) : sqlite3_bind_null(st, 6);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_int64(st, 7, now);
        if (rc == SQLITE_OK)
                rc = k->expires ? sqlite3_bind_int64(st, 8, k->expires) : sqlite3_bind_null(st, 8);
        if (rc == SQLITE_OK)
                rc = k->created_by ? sqlite3_bind_text(st, 9, k->created_by, -1, SQLITE_STATIC)
                                   : sqlite3_bind_null(st, 9);
        if (rc == SQLITE_OK)
                rc = sqlite3_step(st) == SQLITE_DONE ? SQLITE_OK : sqlite3_errcode(store_db(t->store));
        sqlite3_finalize(st);
        if (rc != SQLITE_OK) {
                token_free(k);
                return store_error(t->store, rc, "storing an API token");
        }
        r = store_commit(t->store);
        if (r < 0) {
                /* Not on disk for sure: not handed out. The row may yet be
                 * committed with a later batch; it is then a token nobody
                 * holds. */
                token_free(k);
                return r;
        }
        j = token_to_json(k, now);
        if (!j) {
                token_free(k);
                return -ENOMEM;
        }
        r = tokens_add(t, k);
        if (r < 0) {
                json_decref(j);
                return r;
        }
        *ret_secret = TAKE_PTR(secret);
        *ret_json = j;
        return 0;
}

int tokens_revoke(Tokens *t, const char *id) {
        Token *k = tokens_find_id(t, id);
        int64_t now = tokens_now();
        sqlite3_stmt *st = NULL;
        int rc, r;

        if (!k)
                return -ENOENT;
        if (k->revoked)
                return -EALREADY;
        r = store_batch(t->store);
        if (r < 0)
                return r;
        rc = sqlite3_prepare_v2(store_db(t->store), "UPDATE tokens SET revoked = ? WHERE id = ?", -1, &st, NULL);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_int64(st, 1, now);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_text(st, 2, k->id, -1, SQLITE_STATIC);
        if (rc == SQLITE_OK)
                rc = sqlite3_step(st) == SQLITE_DONE ? SQLITE_OK : sqlite3_errcode(store_db(t->store));
        sqlite3_finalize(st);
        if (rc != SQLITE_OK)
                return store_error(t->store, rc, "revoking an API token");
        /* Refused from now on even if the commit fails (it is retried
         * with the next batch). */
        k->revoked = now;
        return store_commit(t->store);
}

int tokens_refresh(Tokens *t, const char *id) {
        Token *k = tokens_find_id(t, id), *n = NULL;
        sqlite3_stmt *st = NULL;
        int rc, r = 0;

        rc = sqlite3_prepare_v2(store_db(t->store), "SELECT " TOKENS_COLUMNS " FROM tokens WHERE id = ?", -1, &st,
                                NULL);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
        if (rc == SQLITE_OK && (rc = sqlite3_step(st)) == SQLITE_ROW) {
                rc = SQLITE_DONE;
                if (k) {
                        /* What may change of a token: the rest is fixed at
                         * its creation (and borrowed by TokenAuths). */
                        int64_t used = column_time(st, 8);

                        k->revoked = column_time(st, 9);
                        k->expires = column_time(st, 7);
                        if (used > k->last_used)
                                k->last_used = used;
                        if (used > k->last_used_stored)
                                k->last_used_stored = used;
                } else {
                        r = token_from_row(st, &n);
                        if (r == 0 && tokens_find_digest(t, n->digest)) {
                                token_free(n);
                                r = -EEXIST;
                        } else if (r == 0)
                                r = tokens_add(t, n);
                }
        } else if (rc == SQLITE_DONE && k && !k->revoked)
                /* Gone from the table: refused from now on (the record
                 * stays, TokenAuths may point to it). */
                k->revoked = tokens_now();
        sqlite3_finalize(st);
        if (rc != SQLITE_DONE)
                return store_error(t->store, rc, "reading an API token");
        return r == -EBADMSG || r == -EEXIST ? 0 : r;
}
