/* SPDX-License-Identifier: Apache-2.0 */
/* The API's admin requests (api.h, docs/cloud.md "Tokens and scopes" and
 * "Audit log"): POST/GET /v1/tokens, DELETE /v1/tokens/ID, GET /v1/audit,
 * and the device list of a token restricted to devices. Parameters are
 * checked here, the tokens themselves are tokens.c's. Every answer is a
 * status and a JSON body; nothing here logs but what the modules it
 * calls log. */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <microhttpd.h>
#include <openssl/crypto.h>
#include <time.h>

#include "api-request.h"
#include "api.h"
#include "util.h"

#define API_AUDIT_DEFAULT_LIMIT 100
#define API_AUDIT_MAX_LIMIT 1000
#define API_AUDIT_ARG_MAX 256

/* A whole number in plain decimal (no sign, no blanks): 0 or -EINVAL. */
static int api_number(const char *s, size_t len, int64_t *ret) {
        char *end;
        long long n;

        if (!s || !*s || strlen(s) != len || !(*s >= '0' && *s <= '9'))
                return -EINVAL;
        errno = 0;
        n = strtoll(s, &end, 10);
        if (errno || *end)
                return -EINVAL;
        *ret = n;
        return 0;
}

/* A whole number of seconds from a JSON integer or a decimal string (what
 * a form holds): 0 or -EINVAL. */
static int api_seconds(json_t *v, int64_t *ret) {
        if (json_is_integer(v)) {
                *ret = (int64_t)json_integer_value(v);
                return 0;
        }
        if (!json_is_string(v))
                return -EINVAL;
        return api_number(json_string_value(v), json_string_length(v), ret);
}

/* A list of names (device IDs or tag restrictions) from a JSON array of
 * strings, one name each, or a string of names (what a form holds)
 * separated by any of seps, blanks around each dropped; the strings are
 * copied into *pool (one NUL-separated buffer) and *ret points into it. */
typedef struct NameList {
        char *pool;
        const char *v[TOKENS_RESTRICT_MAX];
        size_t n;
} NameList;

static void name_list_done(NameList *l) {
        free(l->pool);
}

static bool device_id_valid(const char *s, size_t len) {
        return proto_name_check(s, len, PROTO_NAME_DEVICE) == 0;
}

/* NAME or NAME=VALUE (tokens.h): the name and the value of a
 * provisioning token's tag (provision.h). */
static bool tag_restriction_valid(const char *s, size_t len) {
        const char *eq = memchr(s, '=', len);
        size_t n = eq ? (size_t)(eq - s) : len;

        if (n > PROVISION_TAG_KEY_MAX || proto_name_check(s, n, PROTO_NAME_FUNCTION) < 0)
                return false;
        return !eq || provision_tag_value_valid(eq + 1, len - n - 1);
}

static int name_list_add(NameList *l, size_t *used, const char *s, size_t len, bool (*valid)(const char *, size_t),
                         const char *what, const char *rule, json_t **ret_body, unsigned *ret_status) {
        if (!valid(s, len)) {
                *ret_status = api_fail(ret_body, MHD_HTTP_BAD_REQUEST, "Invalid entry in \"%s\": %s", what, rule);
                return -EINVAL;
        }
        /* The same entry again is the same device or tag: once (a device
         * listed twice would be listed, and counted, twice). */
        for (size_t i = 0; i < l->n; i++)
                if (strlen(l->v[i]) == len && memcmp(l->v[i], s, len) == 0)
                        return 0;
        if (l->n >= TOKENS_RESTRICT_MAX) {
                *ret_status = api_fail(ret_body, MHD_HTTP_BAD_REQUEST, "At most %u entries in \"%s\"",
                                       TOKENS_RESTRICT_MAX, what);
                return -EINVAL;
        }
        memcpy(l->pool + *used, s, len);
        l->pool[*used + len] = 0;
        l->v[l->n++] = l->pool + *used;
        *used += len + 1;
        return 0;
}

static int name_list_parse(json_t *v, const char *seps, bool (*valid)(const char *, size_t), const char *what,
                           const char *rule, NameList *l, json_t **ret_body, unsigned *ret_status) {
        size_t cap = 0, used = 0, i;
        json_t *x;
        int r;

        if (!v || json_is_null(v))
                return 0;
        /* Everything in one buffer: the total of the input is the bound. */
        if (json_is_string(v))
                cap = json_string_length(v) + 1;
        else if (json_is_array(v)) {
                json_array_foreach(v, i, x) {
                        if (!json_is_string(x)) {
                                *ret_status = api_fail(ret_body, MHD_HTTP_BAD_REQUEST,
                                                       "\"%s\" must be an array of strings", what);
                                return -EINVAL;
                        }
                        cap += json_string_length(x) + 1;
                }
        } else {
                *ret_status = api_fail(ret_body, MHD_HTTP_BAD_REQUEST,
                                       "\"%s\" must be an array of strings or a string of them separated by commas",
                                       what);
                return -EINVAL;
        }
        l->pool = malloc(cap + 1);
        if (!l->pool)
                return -ENOMEM;
        if (json_is_array(v)) {
                json_array_foreach(v, i, x) {
                        r = name_list_add(l, &used, json_string_value(x), json_string_length(x), valid, what, rule,
                                          ret_body, ret_status);
                        if (r < 0)
                                return r;
                }
                return 0;
        }
        for (const char *s = json_string_value(v), *end = s + json_string_length(v); s < end;) {
                const char *e = s, *next;

                while (e < end && !memchr(seps, *e, strlen(seps)))
                        e++;
                next = e + 1;
                while (s < e && (*s == ' ' || *s == '\t'))
                        s++;
                while (e > s && (e[-1] == ' ' || e[-1] == '\t'))
                        e--;
                if (e > s) {
                        r = name_list_add(l, &used, s, (size_t)(e - s), valid, what, rule, ret_body, ret_status);
                        if (r < 0)
                                return r;
                }
                s = next;
        }
        return 0;
}

/* A restriction given with no entry in it ([] or a string of separators:
 * a form's field left empty, a script's empty variable) would make a
 * token that reaches every device, the opposite of what was asked: 400. */
static int name_list_nonempty(json_t *v, const NameList *l, const char *what, json_t **ret_body,
                              unsigned *ret_status) {
        if (!v || json_is_null(v) || l->n > 0)
                return 0;
        *ret_status = api_fail(ret_body, MHD_HTTP_BAD_REQUEST,
                               "\"%s\" holds no entry: leave it out (or null) for a token not restricted to devices",
                               what);
        return -EINVAL;
}

unsigned api_tokens_create(Tokens *t, json_t *params, const char *actor, char ret_id[static TOKENS_ID_MAX + 1],
                           json_t **ret_body) {
        static const char *const known[] = { "name",    "scopes", "expires_in", "expires_at",
                                             "devices", "tags",   "access_token" };
        _cleanup_(name_list_done) NameList devices = {}, tags = {};
        char err[SCOPE_ERROR_MAX], *secret = NULL;
        TokenSpec spec = { .name = "", .created_by = actor };
        const char *key;
        unsigned status = 0;
        json_t *v, *j;
        int64_t now = (int64_t)time(NULL), n;
        int r;

        json_object_foreach(params, key, v) {
                bool ok = false;

                for (size_t i = 0; i < ELEMENTSOF(known); i++)
                        ok |= streq(key, known[i]);
                if (!ok)
                        return api_fail(ret_body, MHD_HTTP_BAD_REQUEST,
                                        "Unknown parameter (known: name, scopes, expires_in, expires_at, devices, "
                                        "tags)");
        }
        v = json_object_get(params, "name");
        if (v && !json_is_null(v)) {
                if (!json_is_string(v) || json_string_length(v) > TOKENS_NAME_MAX ||
                    proto_utf8_check(json_string_value(v), json_string_length(v)) < 0)
                        return api_fail(ret_body, MHD_HTTP_BAD_REQUEST,
                                        "\"name\" must be UTF-8 text of at most %u bytes", TOKENS_NAME_MAX);
                for (const char *c = json_string_value(v); *c; c++)
                        if ((unsigned char)*c < 0x20 || *c == 0x7f)
                                return api_fail(ret_body, MHD_HTTP_BAD_REQUEST,
                                                "\"name\" must not hold control characters");
                spec.name = json_string_value(v);
        }
        v = json_object_get(params, "scopes");
        if (!v)
                return api_fail(ret_body, MHD_HTTP_BAD_REQUEST, "\"scopes\" is required");
        if (scope_parse_json(v, &spec.scopes, err) < 0)
                return api_fail(ret_body, MHD_HTTP_BAD_REQUEST, "%s", err);
        if (json_object_get(params, "expires_in") && json_object_get(params, "expires_at"))
                return api_fail(ret_body, MHD_HTTP_BAD_REQUEST, "Give \"expires_in\" or \"expires_at\", not both");
        if ((v = json_object_get(params, "expires_in"))) {
                if (api_seconds(v, &n) < 0 || n < 1 || n > TOKENS_LIFETIME_MAX)
                        return api_fail(ret_body, MHD_HTTP_BAD_REQUEST,
                                        "\"expires_in\" must be whole seconds from 1 to %lld", TOKENS_LIFETIME_MAX);
                spec.expires_at = now + n;
        } else if ((v = json_object_get(params, "expires_at"))) {
                if (api_seconds(v, &n) < 0 || n <= now || n > now + TOKENS_LIFETIME_MAX)
                        return api_fail(ret_body, MHD_HTTP_BAD_REQUEST,
                                        "\"expires_at\" must be a Unix time in seconds, in the future, at most "
                                        "%lld seconds from now",
                                        TOKENS_LIFETIME_MAX);
                spec.expires_at = n;
        }
        r = name_list_parse(json_object_get(params, "devices"), ", \t", device_id_valid, "devices",
                            "device IDs are [A-Za-z0-9_-]{1,64}", &devices, ret_body, &status);
        if (r == 0)
                r = name_list_parse(json_object_get(params, "tags"), ",", tag_restriction_valid, "tags",
                                    "a tag is NAME or NAME=VALUE, names [A-Za-z0-9_.-]{1,64}, values text of at "
                                    "most 256 bytes without control characters",
                                    &tags, ret_body, &status);
        if (r == 0)
                r = name_list_nonempty(json_object_get(params, "devices"), &devices, "devices", ret_body, &status);
        if (r == 0)
                r = name_list_nonempty(json_object_get(params, "tags"), &tags, "tags", ret_body, &status);
        if (r == -ENOMEM) {
                *ret_body = NULL;
                return MHD_HTTP_INTERNAL_SERVER_ERROR;
        }
        if (r < 0)
                return status;
        spec.devices = devices.v;
        spec.n_devices = devices.n;
        spec.tags = tags.v;
        spec.n_tags = tags.n;
        /* An admin token may make tokens for every device: restricting
         * it would restrict nothing. */
        if ((spec.scopes & SCOPE_ADMIN) && (spec.n_devices || spec.n_tags))
                return api_fail(ret_body, MHD_HTTP_BAD_REQUEST,
                                "An admin token cannot be restricted to devices or tags");
        /* Nor one that lets new devices in: it is refused on
         * /v1/provision, say so now. */
        if ((spec.scopes & SCOPE_PROVISION_WRITE) && (spec.n_devices || spec.n_tags))
                return api_fail(ret_body, MHD_HTTP_BAD_REQUEST,
                                "A provision:write token cannot be restricted to devices or tags");
        /* Nor one that publishes: an event from the API goes to every
         * subscribed device, those it may not reach too. */
        if ((spec.scopes & SCOPE_EVENTS_PUBLISH) && (spec.n_devices || spec.n_tags))
                return api_fail(ret_body, MHD_HTTP_BAD_REQUEST,
                                "An events:publish token cannot be restricted to devices or tags (its events would "
                                "reach every subscribed device)");
        r = tokens_create(t, &spec, &secret, &j);
        if (r == -EUSERS)
                return api_fail(ret_body, MHD_HTTP_CONFLICT,
                                "Too many live tokens (%u); revoke some first", TOKENS_LIVE_MAX);
        if (r < 0)
                return api_fail(ret_body, MHD_HTTP_SERVICE_UNAVAILABLE, "Cannot store the token now: %s",
                                strerror(-r));
        snprintf(ret_id, TOKENS_ID_MAX + 1, "%s", json_string_value(json_object_get(j, "id")));
        if (json_object_set_new(j, "token", json_string(secret)) < 0 || json_object_set_new(j, "ok", json_true()) < 0) {
                json_decref(j);
                j = NULL;
        }
        OPENSSL_clear_free(secret, strlen(secret));
        *ret_body = j;
        return MHD_HTTP_OK;
}

unsigned api_tokens_list(Tokens *t, json_t **ret_body) {
        *ret_body = tokens_to_json(t);
        return MHD_HTTP_OK;
}

unsigned api_tokens_revoke(Tokens *t, const char *id, json_t **ret_body) {
        int r;

        if (startswith(id, "file-") || startswith(id, "metrics-"))
                return api_fail(ret_body, MHD_HTTP_BAD_REQUEST,
                                "Tokens of TokenFile= and MetricsTokenFile= are revoked by removing them from the "
                                "file and reloading tether-cloudd");
        r = tokens_revoke(t, id);
        if (r == -ENOENT)
                return api_fail(ret_body, MHD_HTTP_NOT_FOUND, "No token with this id");
        if (r == -EALREADY)
                return api_fail(ret_body, MHD_HTTP_CONFLICT, "The token is already revoked");
        if (r < 0)
                return api_fail(ret_body, MHD_HTTP_SERVICE_UNAVAILABLE, "Cannot revoke the token now: %s",
                                strerror(-r));
        *ret_body = json_pack("{s:b, s:s}", "ok", 1, "id", id);
        return MHD_HTTP_OK;
}

unsigned api_audit_query(Store *s, const char *after, const char *limit, const char *action, const char *target,
                         json_t **ret_body) {
        int64_t after_id = 0, n = API_AUDIT_DEFAULT_LIMIT;
        json_t *records;
        int r;

        if (after && api_number(after, strlen(after), &after_id) < 0)
                return api_fail(ret_body, MHD_HTTP_BAD_REQUEST, "after must be a record id (a whole number)");
        if (limit && (api_number(limit, strlen(limit), &n) < 0 || n < 1 || n > API_AUDIT_MAX_LIMIT))
                return api_fail(ret_body, MHD_HTTP_BAD_REQUEST, "limit must be a whole number from 1 to %u",
                                API_AUDIT_MAX_LIMIT);
        if ((action && strlen(action) > API_AUDIT_ARG_MAX) || (target && strlen(target) > API_AUDIT_ARG_MAX))
                return api_fail(ret_body, MHD_HTTP_BAD_REQUEST, "action and target are at most %u bytes",
                                API_AUDIT_ARG_MAX);
        r = store_audit_query(s, after_id, (unsigned)n, action && *action ? action : NULL,
                              target && *target ? target : NULL, &records);
        if (r < 0)
                return api_fail(ret_body, MHD_HTTP_SERVICE_UNAVAILABLE, "Cannot read the audit log now: %s",
                                strerror(-r));
        *ret_body = records;
        return MHD_HTTP_OK;
}

/* The restricted device list being built: the devices of the page, and
 * how many the token reaches in all. */
typedef struct RestrictedList {
        Devices *devs;
        const ApiPage *page;
        const char *const *ids; /* the token's device IDs */
        size_t n_ids, first, total;
        json_t *a;
        bool failed; /* out of memory */
} RestrictedList;

static void restricted_add(RestrictedList *l, Device *d) {
        if (l->total >= l->first && (!l->page->paged || l->total - l->first < l->page->per_page) && !l->failed &&
            json_array_append_new(l->a, device_to_json(d, false)) < 0)
                l->failed = true;
        l->total++;
}

/* A device of the token's tags: unless it is listed by ID already. */
static void restricted_tagged(void *userdata, const char *id) {
        RestrictedList *l = userdata;
        Device *d;

        for (size_t i = 0; i < l->n_ids; i++)
                if (streq(l->ids[i], id))
                        return;
        d = devices_find(l->devs, id);
        if (d)
                restricted_add(l, d);
}

int api_devices_list_restricted(Devices *devs, Registry *reg, const TokenAuth *auth, const ApiPage *p, json_t **ret) {
        RestrictedList l = { .devs = devs, .page = p };
        const char *match = tokens_tag_match(auth);
        json_t *j;
        int r = 0;

        l.n_ids = tokens_devices(auth, &l.ids);
        l.a = json_array();
        if (!l.a)
                return -ENOMEM;
        /* Where the page starts, without computing (page - 1) * per_page
         * when it cannot be reached (it may not fit a 32-bit size_t). */
        l.first = p->paged ? (p->page - 1 > SIZE_MAX / p->per_page ? SIZE_MAX : (p->page - 1) * p->per_page) : 0;
        for (size_t i = 0; i < l.n_ids; i++) {
                Device *d = devices_find(devs, l.ids[i]);
                bool again = false;

                /* Once, also for a token stored before duplicates were
                 * dropped at its creation. */
                for (size_t k = 0; k < i && !again; k++)
                        again = streq(l.ids[k], l.ids[i]);
                if (d && !again)
                        restricted_add(&l, d);
        }
        /* One query for the devices of its tags, however many there are. */
        if (match)
                r = registry_foreach_tagged(reg, match, restricted_tagged, &l);
        if (r >= 0 && l.failed)
                r = -ENOMEM;
        if (r < 0) {
                json_decref(l.a);
                return r;
        }
        if (!p->paged) {
                *ret = l.a;
                return 0;
        }
        j = api_page_json(l.a, l.total, p);
        if (!j)
                return -ENOMEM;
        *ret = j;
        return 0;
}
