/* SPDX-License-Identifier: Apache-2.0 */
/* Parsing and routing of HTTP API requests (api-request.h):
 * pure functions of the request's method, URL, a few headers and body,
 * so they can be fuzzed without a server. api.c acts on the result. */
#include "config.h"

#include <inttypes.h>
#include <malloc.h>
#include <microhttpd.h>
#include <pthread.h>
#include <stdarg.h>
#include <time.h>

#include "api-request.h"
#include "util.h"

/* ---- parsing a body within a memory budget ---------------------------------
 *
 * A body's JSON (or form) values cost jansson many times their text: 32 MiB
 * of "0," are 16 million values, about 700 MB. While a budget is set (on
 * this thread), jansson's allocations count against it and fail once it is
 * spent, so the parse fails instead of the cloud growing. The functions
 * wrap malloc and free: memory from before or after a budget is the same. */

typedef struct ParseBudget {
        bool active, over;
        size_t used, limit;
} ParseBudget;

static __thread ParseBudget budget;

static void *budget_malloc(size_t n) {
        void *p = malloc(n);

        if (p && budget.active) {
                budget.used += malloc_usable_size(p);
                if (budget.used > budget.limit) {
                        budget.used -= malloc_usable_size(p);
                        budget.over = true;
                        free(p);
                        return NULL;
                }
        }
        return p;
}

static void budget_free(void *p) {
        if (p && budget.active) {
                size_t n = malloc_usable_size(p);

                budget.used -= n < budget.used ? n : budget.used;
        }
        free(p);
}

static void budget_install(void) {
        json_set_alloc_funcs(budget_malloc, budget_free);
}

static void budget_begin(size_t body_len) {
        static pthread_once_t once = PTHREAD_ONCE_INIT;

        (void)pthread_once(&once, budget_install);
        budget.active = true;
        budget.over = false;
        budget.used = 0;
        budget.limit = API_PARSE_MEMORY_MAX(body_len);
}

/* Whether the budget ran out. */
static bool budget_end(void) {
        budget.active = false;
        return budget.over;
}

static int hexval(char c) {
        if (c >= '0' && c <= '9')
                return c - '0';
        if (c >= 'a' && c <= 'f')
                return c - 'a' + 10;
        if (c >= 'A' && c <= 'F')
                return c - 'A' + 10;
        return -1;
}

json_t *api_parse_form(const char *body, size_t len) {
        json_t *o = json_object();
        const char *p = body, *end = body + len;

        if (!o)
                return NULL;
        while (p < end) {
                const char *amp = memchr(p, '&', end - p) ?: end;
                const char *eq = memchr(p, '=', amp - p);
                _cleanup_free_ char *key = NULL, *val = NULL;
                size_t klen = 0, vlen = 0;
                char *out[2] = { NULL, NULL };
                size_t *outlen[2] = { &klen, &vlen };
                const char *from[2] = { p, eq ? eq + 1 : amp }, *to[2] = { eq ?: amp, amp };

                for (int k = 0; k < 2; k++) {
                        char *o2 = malloc(to[k] - from[k] + 1);
                        size_t n = 0;

                        if (!o2) {
                                free(out[0]);
                                goto fail;
                        }
                        for (const char *q = from[k]; q < to[k]; q++) {
                                if (*q == '+')
                                        o2[n++] = ' ';
                                else if (*q == '%' && to[k] - q >= 3 && hexval(q[1]) >= 0 && hexval(q[2]) >= 0) {
                                        o2[n++] = (char)(hexval(q[1]) * 16 + hexval(q[2]));
                                        q += 2;
                                } else
                                        o2[n++] = *q;
                        }
                        o2[n] = 0;
                        out[k] = o2;
                        *outlen[k] = n;
                }
                key = out[0];
                val = out[1];
                if (klen > 0 && !memchr(key, 0, klen) &&
                    json_object_set_new_nocheck(o, key, json_stringn_nocheck(val, vlen)) < 0)
                        goto fail;
                p = amp + 1;
        }
        return o;
fail:
        json_decref(o);
        return NULL;
}

int api_param(json_t *params, const char *key, const char **ret, size_t *ret_len, char buf[static 32]) {
        json_t *v = params ? json_object_get(params, key) : NULL;

        if (!v || json_is_null(v))
                return 0;
        if (json_is_string(v)) {
                *ret = json_string_value(v);
                *ret_len = json_string_length(v);
                return 1;
        }
        if (json_is_integer(v))
                snprintf(buf, 32, "%" JSON_INTEGER_FORMAT, json_integer_value(v));
        else if (json_is_real(v))
                snprintf(buf, 32, "%.17g", json_real_value(v));
        else if (json_is_boolean(v))
                snprintf(buf, 32, "%s", json_is_true(v) ? "true" : "false");
        else
                return -EINVAL;
        *ret = buf;
        *ret_len = strlen(buf);
        return 1;
}

int api_param_text(json_t *params, const char *key, const char **ret, size_t *ret_len, char buf[static 32]) {
        int r = api_param(params, key, ret, ret_len, buf);

        if (r > 0 && memchr(*ret, 0, *ret_len))
                return -EINVAL;
        return r;
}

bool api_outside_token(const ApiInput *in, const char **ret_token) {
        const char *h = in->authorization;

        if (h) {
                if (strncasecmp(h, "Bearer ", 7) != 0) {
                        *ret_token = NULL;
                        return true;
                }
                for (h += 7; *h == ' '; h++)
                        ;
                *ret_token = h;
                return true;
        }
        if (in->query_token_present) {
                *ret_token = in->query_token && strlen(in->query_token) == in->query_token_len ? in->query_token
                                                                                                 : NULL;
                return true;
        }
        return false;
}

/* Where the PREFIX of an event stream's path starts in the raw path (its
 * literal slashes), or NULL if it is no stream path. */
static const char *raw_stream_prefix(const char *path) {
        const char *rest, *slash;

        if (startswith(path, "/v1/events/"))
                return path + strlen("/v1/events/");
        if (startswith(path, "/v1/devices/events/"))
                return path + strlen("/v1/devices/events/");
        if (!startswith(path, "/v1/devices/"))
                return NULL;
        rest = path + strlen("/v1/devices/");
        slash = strchr(rest, '/');
        if (!slash || memchr(rest, '%', slash - rest) || !startswith(slash, "/events/"))
                return NULL;
        return slash + strlen("/events/");
}

const char *api_bad_escape(const char *path) {
        const char *prefix = NULL;
        bool prefix_known = false;

        for (const char *p = strchr(path, '%'); p; p = strchr(p + 1, '%')) {
                if (p[1] == '0' && p[2] == '0')
                        return "%00";
                if (p[1] != '2' || (p[2] != 'F' && p[2] != 'f'))
                        continue;
                if (!prefix_known) {
                        prefix = raw_stream_prefix(path);
                        prefix_known = true;
                }
                if (!prefix || p < prefix)
                        return p[2] == 'F' ? "%2F" : "%2f";
        }
        return NULL;
}

/* What jansson found wrong with a JSON body, for the client: its text
 * (which may quote the body: cut to printable ASCII) and where. */
static void json_body_error(const json_error_t *e, char *out, size_t size) {
        char text[JSON_ERROR_TEXT_LENGTH];
        size_t i;

        if (json_error_code(e) == json_error_null_character) {
                snprintf(out, size,
                         "Invalid JSON body: a string holds a NUL character (\\u0000), which no parameter may "
                         "hold (line %d, column %d)",
                         e->line, e->column);
                return;
        }
        for (i = 0; i < sizeof(text) - 1 && e->text[i]; i++)
                text[i] = e->text[i] >= 0x20 && e->text[i] < 0x7f ? e->text[i] : '?';
        text[i] = 0;
        snprintf(out, size, "Invalid JSON body: %s (line %d, column %d)", text, e->line, e->column);
}

static const char *json_type_name(const json_t *j) {
        switch (json_typeof(j)) {
        case JSON_ARRAY:
                return "an array";
        case JSON_STRING:
                return "a string";
        case JSON_INTEGER:
        case JSON_REAL:
                return "a number";
        case JSON_TRUE:
        case JSON_FALSE:
                return "a boolean";
        case JSON_NULL:
                return "null";
        default:
                return "not an object";
        }
}

static bool parse_bool(const char *s, bool *ret) {
        if (streq(s, "true") || streq(s, "1") || streq(s, "yes")) {
                *ret = true;
                return true;
        }
        if (streq(s, "false") || streq(s, "0") || streq(s, "no") || !*s) {
                *ret = false;
                return true;
        }
        return false;
}

int api_parse_last_event_id(const char *s, uint64_t *ret_epoch, uint64_t *ret_id) {
        uint64_t epoch = 0, id = 0;
        size_t n = 0;

        for (; hexval(*s) >= 0; s++, n++) {
                if (n >= 16)
                        return -EINVAL;
                epoch = epoch << 4 | (uint64_t)hexval(*s);
        }
        if (n == 0 || *s++ != '-' || !*s)
                return -EINVAL;
        for (n = 0; *s; s++, n++) {
                unsigned d = (unsigned)*s - '0';

                if (d > 9 || n >= 20 || id > (UINT64_MAX - d) / 10)
                        return -EINVAL;
                id = id * 10 + d;
        }
        *ret_epoch = epoch;
        *ret_id = id;
        return 0;
}

/* "events" or "events/PREFIX": *ret_prefix is the prefix ("" for all). */
static bool match_events(const char *path, const char **ret_prefix) {
        if (streq(path, "events")) {
                *ret_prefix = "";
                return true;
        }
        if (startswith(path, "events/")) {
                *ret_prefix = path + 7;
                return true;
        }
        return false;
}

void api_parsed_done(ApiParsed *p) {
        json_decref(p->params);
        *p = (ApiParsed){};
}

int api_parse_request(const ApiInput *in, ApiParsed *ret) {
        bool get = streq(in->method, MHD_HTTP_METHOD_GET) || streq(in->method, MHD_HTTP_METHOD_HEAD);
        bool post = streq(in->method, MHD_HTTP_METHOD_POST), put = streq(in->method, MHD_HTTP_METHOD_PUT);
        bool delete = streq(in->method, MHD_HTTP_METHOD_DELETE);
        ApiParsed p = { .route = API_ROUTE_NOT_FOUND };
        const char *rest, *prefix, *slash;
        size_t n;

        if (in->body_len > 0) {
                bool over;

                budget_begin(in->body_len);
                if (in->content_type && strncasecmp(in->content_type, "application/json", 16) == 0) {
                        json_error_t e;

                        p.params = json_loadb(in->body, in->body_len, JSON_REJECT_DUPLICATES, &e);
                        if (!p.params) {
                                json_body_error(&e, p.body_error, sizeof(p.body_error));
                                p.route = API_ROUTE_BAD_BODY;
                        } else if (!json_is_object(p.params)) {
                                snprintf(p.body_error, sizeof(p.body_error),
                                         "The JSON body must be an object of parameters, not %s",
                                         json_type_name(p.params));
                                json_decref(p.params);
                                p.params = NULL;
                                p.route = API_ROUTE_BAD_BODY;
                        }
                } else
                        p.params = api_parse_form(in->body, in->body_len);
                over = budget_end();
                if (over) {
                        json_decref(p.params);
                        p.params = NULL;
                        snprintf(p.body_error, sizeof(p.body_error),
                                 "The body holds more values than this cloud parses from %zu bytes", in->body_len);
                        p.route = API_ROUTE_BAD_BODY;
                } else if (!p.params && p.route != API_ROUTE_BAD_BODY)
                        return -ENOMEM;
        }

        /* The token: Authorization header, then ?access_token=, then the body. */
        if (!api_outside_token(in, &p.token)) {
                json_t *v = p.params ? json_object_get(p.params, "access_token") : NULL;

                if (json_is_string(v) && !memchr(json_string_value(v), 0, json_string_length(v)))
                        p.token = json_string_value(v);
        }
        if (in->last_event_id && api_parse_last_event_id(in->last_event_id, &p.last_epoch, &p.last_id) == 0)
                p.has_last_event_id = true;
        if (p.route == API_ROUTE_BAD_BODY)
                goto done;

        if (!startswith(in->url, "/v1/"))
                goto done;
        rest = in->url + 4;
        if (streq(rest, "tokens") || streq(rest, "audit")) {
                p.route = streq(rest, "audit") ? API_ROUTE_AUDIT : API_ROUTE_TOKENS;
                goto done;
        }
        if (streq(rest, "access_tokens/current")) {
                if (get)
                        p.route = API_ROUTE_TOKEN_CURRENT;
                goto done;
        }
        if (startswith(rest, "tokens/") && rest[7] && !strchr(rest + 7, '/')) {
                p.route = API_ROUTE_TOKEN;
                p.name = rest + 7;
                goto done;
        }
        if (streq(rest, "provision")) {
                p.route = API_ROUTE_PROVISIONS;
                goto done;
        }
        if (startswith(rest, "provision/") && rest[10] && !strchr(rest + 10, '/')) {
                p.route = API_ROUTE_PROVISION;
                p.name = rest + 10;
                goto done;
        }
        /* The rest of /v1/ota/... is the Ota's (ota.h): only this one
         * reaches here (api.c), to be forwarded in cluster mode like
         * PUT /v1/devices/ID. */
        if (streq(rest, "ota/jobs")) {
                if (post)
                        p.route = API_ROUTE_OTA_JOB;
                goto done;
        }
        if (streq(rest, "webhooks") || streq(rest, "integrations")) {
                p.route = streq(rest, "webhooks") ? API_ROUTE_WEBHOOKS : API_ROUTE_INTEGRATIONS;
                goto done;
        }
        if (startswith(rest, "webhooks/") && rest[9] && !strchr(rest + 9, '/')) {
                p.route = API_ROUTE_WEBHOOK;
                p.name = rest + 9;
                goto done;
        }
        if (streq(rest, "campaigns")) {
                p.route = API_ROUTE_CAMPAIGNS;
                goto done;
        }
        if (startswith(rest, "campaigns/") && rest[10]) {
                const char *cslash = strchr(rest + 10, '/');

                /* ID or ID/WORD, nothing deeper. */
                if (!cslash || (cslash[1] && !strchr(cslash + 1, '/'))) {
                        p.route = API_ROUTE_CAMPAIGN;
                        p.name = rest + 10;
                        p.sub = cslash ? cslash + 1 : NULL;
                }
                goto done;
        }
        if (match_events(rest, &prefix)) {
                if (get) {
                        p.route = API_ROUTE_STREAM;
                        p.prefix = prefix;
                }
                goto done;
        }
        if (streq(rest, "devices")) {
                if (get)
                        p.route = API_ROUTE_LIST;
                else if (post)
                        p.route = API_ROUTE_REGISTER;
                goto done;
        }
        if (!startswith(rest, "devices/"))
                goto done;
        rest += 8;
        if (match_events(rest, &prefix)) {
                if (get) {
                        p.route = API_ROUTE_STREAM;
                        p.prefix = prefix;
                } else if (post && streq(rest, "events"))
                        p.route = API_ROUTE_PUBLISH;
                goto done;
        }
        slash = strchr(rest, '/');
        n = slash ? (size_t)(slash - rest) : strlen(rest);
        if (n == 0 || n > PROTO_DEVICE_ID_MAX) {
                p.route = API_ROUTE_NO_DEVICE;
                goto done;
        }
        memcpy(p.device, rest, n);
        p.device[n] = 0;
        rest = slash ? slash + 1 : "";
        /* A device's stream may open before it ever connected. */
        if (get && match_events(rest, &prefix) && proto_name_check(p.device, n, PROTO_NAME_DEVICE) == 0) {
                p.route = API_ROUTE_STREAM;
                p.prefix = prefix;
                p.stream_device = true;
                goto done;
        }
        if (!*rest) {
                p.route = get ? API_ROUTE_DEVICE : put ? API_ROUTE_UPDATE : API_ROUTE_DEVICE_BAD_METHOD;
                goto done;
        }
        /* Tether's own: PUT and DELETE are no Particle call or read. */
        if (streq(rest, "revocation") && (put || delete)) {
                p.route = proto_name_check(p.device, n, PROTO_NAME_DEVICE) < 0 ? API_ROUTE_NO_DEVICE
                          : put                                              ? API_ROUTE_REVOKE
                                                                             : API_ROUTE_UNREVOKE;
                goto done;
        }
        if (strchr(rest, '/') || (!get && !post)) {
                p.route = API_ROUTE_DEVICE_BAD_METHOD;
                goto done;
        }
        p.route = post ? API_ROUTE_CALL : API_ROUTE_READ;
        p.name = rest;
done:
        *ret = p;
        return 0;
}

unsigned api_route_scope(ApiRoute route) {
        switch (route) {
        case API_ROUTE_LIST:
        case API_ROUTE_DEVICE:
        case API_ROUTE_READ:
                return SCOPE_DEVICES_READ;
        case API_ROUTE_CALL:
                return SCOPE_FUNCTIONS_CALL;
        case API_ROUTE_STREAM:
                return SCOPE_EVENTS_READ;
        case API_ROUTE_PUBLISH:
                return SCOPE_EVENTS_PUBLISH;
        case API_ROUTE_OTA_JOB:
        case API_ROUTE_CAMPAIGNS:
        case API_ROUTE_CAMPAIGN:
                return SCOPE_OTA_WRITE;
        case API_ROUTE_UPDATE:
                /* ota:write with "manifest", devices:write with name,
                 * notes or tags: the Api checks once it knows which. */
                return 0;
        case API_ROUTE_TOKENS:
        case API_ROUTE_TOKEN:
        case API_ROUTE_AUDIT:
        case API_ROUTE_REGISTER:
        case API_ROUTE_REVOKE:
        case API_ROUTE_UNREVOKE:
        case API_ROUTE_WEBHOOKS:
        case API_ROUTE_WEBHOOK:
        case API_ROUTE_INTEGRATIONS:
                return SCOPE_ADMIN;
        case API_ROUTE_PROVISIONS:
        case API_ROUTE_PROVISION:
                return SCOPE_PROVISION_WRITE;
        case API_ROUTE_TOKEN_CURRENT: /* any valid token may ask what it may do */
        case API_ROUTE_NOT_FOUND:
        case API_ROUTE_BAD_BODY:
        case API_ROUTE_NO_DEVICE:
        case API_ROUTE_DEVICE_BAD_METHOD:
        default:
                return 0;
        }
}

int api_parse_reason(json_t *params, const char **ret, const char **ret_error) {
        json_t *v = params ? json_object_get(params, "reason") : NULL;
        const char *s;
        size_t len;

        if (!v || json_is_null(v)) {
                *ret = NULL;
                return 0;
        }
        if (!json_is_string(v)) {
                *ret_error = "reason must be text";
                return -EINVAL;
        }
        s = json_string_value(v);
        len = json_string_length(v);
        if (len > API_REASON_MAX) {
                *ret_error = "reason is longer than 160 bytes";
                return -EINVAL;
        }
        if (proto_utf8_check(s, len) < 0) {
                *ret_error = "reason must be UTF-8 text";
                return -EINVAL;
        }
        for (size_t i = 0; i < len; i++)
                if ((uint8_t)s[i] < 0x20 || s[i] == 0x7f) {
                        *ret_error = "reason must not hold control characters";
                        return -EINVAL;
                }
        *ret = len > 0 ? s : NULL;
        return 0;
}

int api_parse_publish(json_t *params, unsigned max_payload, ApiPublish *ret, unsigned *ret_status,
                      const char **ret_error) {
        const char *name, *data = NULL, *s;
        size_t name_len, data_len = 0, len;
        char buf[32];
        ApiPublish out = { .ttl = PROTO_DEFAULT_TTL };
        int r;

#define FAIL(status, text)                 \
        do {                               \
                *ret_status = (status);    \
                *ret_error = (text);       \
                return -EINVAL;            \
        } while (0)

        r = api_param_text(params, "name", &name, &name_len, buf);
        if (r == 0)
                FAIL(MHD_HTTP_BAD_REQUEST, "Event name is required");
        if (r < 0 || proto_name_check(name, name_len, PROTO_NAME_EVENT) < 0)
                FAIL(MHD_HTTP_BAD_REQUEST, "Invalid event name");
        memcpy(out.name, name, name_len);
        out.name[name_len] = 0;
        if (proto_event_name_reserved(out.name, false))
                FAIL(MHD_HTTP_FORBIDDEN, "Event names under " PROTO_EVENT_CLOUD_PREFIX " are reserved for the cloud");
        r = api_param(params, "data", &data, &data_len, buf);
        if (r < 0)
                FAIL(MHD_HTTP_BAD_REQUEST, "Event data must be text, a number or a boolean");
        if (r > 0) {
                if (data_len > max_payload)
                        FAIL(MHD_HTTP_CONTENT_TOO_LARGE, "Event data too long");
                if (proto_utf8_check(data, data_len) < 0)
                        FAIL(MHD_HTTP_BAD_REQUEST, "Event data is not UTF-8 text");
                if (data == buf) {
                        /* A number or boolean, spelled out in buf. */
                        memcpy(out.data_buf, buf, sizeof(out.data_buf));
                        data = out.data_buf;
                }
                out.data = data;
                out.data_len = data_len;
        }
        r = api_param_text(params, "private", &s, &len, buf);
        if (r < 0 || (r > 0 && !parse_bool(s, &out.private_)))
                FAIL(MHD_HTTP_BAD_REQUEST, "Invalid value for private");
        r = api_param_text(params, "ttl", &s, &len, buf);
        if (r < 0)
                FAIL(MHD_HTTP_BAD_REQUEST, "Invalid value for ttl");
        if (r > 0) {
                char *end;
                unsigned long v;

                errno = 0;
                v = strtoul(s, &end, 10);
                if (!*s || *end || errno || *s == '-' || v > UINT32_MAX)
                        FAIL(MHD_HTTP_BAD_REQUEST, "Invalid value for ttl");
                out.ttl = (uint32_t)v;
        }
#undef FAIL
        *ret = out;
        return 0;
}

unsigned api_fail(json_t **ret_body, unsigned status, const char *fmt, ...) {
        char text[256];
        va_list ap;

        va_start(ap, fmt);
        vsnprintf(text, sizeof(text), fmt, ap);
        va_end(ap);
        *ret_body = json_pack("{s:b, s:s}", "ok", 0, "error", text);
        return status;
}

/* An RFC 3339 time ("2030-01-31T12:00:00Z", "...T12:00:00.5+02:00",
 * a lowercase t or z too) in Unix seconds (fractions dropped): 0 or
 * -EINVAL. A leap second (":60") is refused. */
int api_parse_rfc3339(const char *s, size_t len, int64_t *ret) {
        struct tm tm = {}, check;
        const char *e;
        long offset = 0;
        time_t t;

        if (len != strlen(s) || len < 20 || len > 40 || (s[10] != 'T' && s[10] != 't'))
                return -EINVAL;
        /* Every field its two (four) digits: strptime() would also take
         * blanks and single digits ("2030-01- 1T 0:00:00Z"). */
        for (size_t i = 0; i < 19; i++) {
                static const char shape[] = "0000-00-00T00:00:00"; /* 0: a digit; T checked above */

                if (shape[i] == '0' ? !(s[i] >= '0' && s[i] <= '9') : i != 10 && s[i] != shape[i])
                        return -EINVAL;
        }
        e = strptime(s, "%Y-%m-%d", &tm);
        if (e != s + 10)
                return -EINVAL;
        e = strptime(s + 11, "%H:%M:%S", &tm);
        if (e != s + 19 || tm.tm_year < 70 || tm.tm_year > 8099 - 1900)
                return -EINVAL;
        if (*e == '.') {
                if (!(e[1] >= '0' && e[1] <= '9'))
                        return -EINVAL;
                for (e++; *e >= '0' && *e <= '9'; e++)
                        ;
        }
        if ((*e == 'Z' || *e == 'z') && !e[1])
                offset = 0;
        else if ((*e == '+' || *e == '-') && strlen(e) == 6 && e[1] >= '0' && e[1] <= '2' && e[2] >= '0' &&
                 e[2] <= '9' && e[3] == ':' && e[4] >= '0' && e[4] <= '5' && e[5] >= '0' && e[5] <= '9') {
                offset = ((e[1] - '0') * 10 + (e[2] - '0')) * 3600L + ((e[4] - '0') * 10 + (e[5] - '0')) * 60L;
                if (offset > 23 * 3600L + 59 * 60L)
                        return -EINVAL;
                if (*e == '-')
                        offset = -offset;
        } else
                return -EINVAL;
        check = tm;
        t = timegm(&tm);
        /* timegm() moves Feb 30 to March: a date that moved was none. */
        if (t == (time_t)-1 || tm.tm_mday != check.tm_mday || tm.tm_mon != check.tm_mon ||
            tm.tm_hour != check.tm_hour || tm.tm_min != check.tm_min || tm.tm_sec != check.tm_sec)
                return -EINVAL;
        *ret = (int64_t)t - offset;
        return 0;
}
