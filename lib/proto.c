/* SPDX-License-Identifier: Apache-2.0 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "proto.h"
#include "util.h"

static bool name_char_ok(char c, ProtoNameKind kind) {
        if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
            c == '-')
                return true;
        if (c == '.')
                return kind != PROTO_NAME_DEVICE && kind != PROTO_NAME_PLUGIN;
        if (c == '/')
                return kind == PROTO_NAME_EVENT || kind == PROTO_NAME_PREFIX;
        return false;
}

/* Device ids that would be ambiguous in the API: "api" is the coreid of
 * events published through the API, "events" is a path under /v1/devices.
 * proto_device_id_problem() names them. */
static const char *const reserved_device_ids[] = { "api", "events" };

int proto_name_check(const char *name, size_t len, ProtoNameKind kind) {
        size_t max = (kind == PROTO_NAME_EVENT || kind == PROTO_NAME_PREFIX) ? TETHER_EVENT_NAME_MAX
                     : kind == PROTO_NAME_DEVICE || kind == PROTO_NAME_PLUGIN ? PROTO_DEVICE_ID_MAX
                                                                             : TETHER_NAME_MAX;
        if (!name)
                return -EINVAL;
        if (len == 0)
                return kind == PROTO_NAME_PREFIX ? 0 : -EINVAL;
        if (len > max)
                return -ENAMETOOLONG;
        for (size_t i = 0; i < len; i++) {
                if (!name_char_ok(name[i], kind))
                        return -EINVAL;
                /* Event names map onto Uri-Path segments: no empty ones. */
                if (name[i] == '/' && (i == 0 || name[i - 1] == '/'))
                        return -EINVAL;
        }
        if (kind == PROTO_NAME_EVENT && name[len - 1] == '/')
                return -EINVAL;
        if (kind == PROTO_NAME_DEVICE)
                for (size_t i = 0; i < ELEMENTSOF(reserved_device_ids); i++)
                        if (len == strlen(reserved_device_ids[i]) && memcmp(name, reserved_device_ids[i], len) == 0)
                                return -EADDRINUSE;
        return 0;
}

bool proto_event_name_reserved(const char *name, bool device) {
        if (strncmp(name, PROTO_EVENT_CLOUD_PREFIX, strlen(PROTO_EVENT_CLOUD_PREFIX)) != 0)
                return false;
        return !device || strncmp(name, PROTO_EVENT_AGENT_PREFIX, strlen(PROTO_EVENT_AGENT_PREFIX)) != 0;
}

const char *proto_device_id_problem(int error) {
        _Static_assert(PROTO_DEVICE_ID_MAX == 64, "the pattern below names the limit");

        if (error == -EADDRINUSE)
                return "'api' and 'events' are reserved by the API";
        return "must match [A-Za-z0-9_-]{1,64}";
}

bool proto_prefix_match(const char *prefix, const char *name) {
        return strncmp(name, prefix, strlen(prefix)) == 0;
}

int proto_utf8_check(const char *buf, size_t len) {
        const unsigned char *s = (const unsigned char *)buf;
        size_t i = 0;

        while (i < len) {
                unsigned char c = s[i];
                size_t n;
                uint32_t cp;

                if (c == 0)
                        return -EILSEQ;
                if (c < 0x80) {
                        i++;
                        continue;
                }
                if ((c & 0xe0) == 0xc0)
                        n = 1, cp = c & 0x1f;
                else if ((c & 0xf0) == 0xe0)
                        n = 2, cp = c & 0x0f;
                else if ((c & 0xf8) == 0xf0)
                        n = 3, cp = c & 0x07;
                else
                        return -EILSEQ;
                if (i + n >= len)
                        return -EILSEQ;
                for (size_t k = 1; k <= n; k++) {
                        if ((s[i + k] & 0xc0) != 0x80)
                                return -EILSEQ;
                        cp = (cp << 6) | (s[i + k] & 0x3f);
                }
                /* Overlong forms, surrogates and out-of-range code points. */
                if ((n == 1 && cp < 0x80) || (n == 2 && cp < 0x800) || (n == 3 && cp < 0x10000) ||
                    cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
                        return -EILSEQ;
                i += n + 1;
        }
        return 0;
}

static const char *const type_names[] = {
        [TETHER_TYPE_BOOL] = "bool",
        [TETHER_TYPE_INT32] = "int32",
        [TETHER_TYPE_DOUBLE] = "double",
        [TETHER_TYPE_STRING] = "string",
};

const char *proto_type_to_string(uint32_t type) {
        if (type >= ELEMENTSOF(type_names) || !type_names[type])
                return NULL;
        return type_names[type];
}

uint32_t proto_type_from_string(const char *s) {
        for (uint32_t t = 1; t < ELEMENTSOF(type_names); t++)
                if (s && streq(s, type_names[t]))
                        return t;
        return 0;
}

int proto_result_format(int32_t value, char buf[static 12]) {
        return snprintf(buf, 12, "%" PRId32, value);
}

int proto_result_parse(const uint8_t *buf, size_t len, int32_t *ret_value) {
        int64_t v = 0;
        bool neg = false;
        size_t i = 0;

        if (!buf || len == 0 || len > 11)
                return -EBADMSG;
        if (buf[0] == '-') {
                neg = true;
                i = 1;
                if (len == 1)
                        return -EBADMSG;
        }
        for (; i < len; i++) {
                if (buf[i] < '0' || buf[i] > '9')
                        return -EBADMSG;
                v = v * 10 + (buf[i] - '0');
        }
        if (neg)
                v = -v;
        if (v < INT32_MIN || v > INT32_MAX)
                return -EBADMSG;
        *ret_value = (int32_t)v;
        return 0;
}

static int json_dump_take(json_t *j, char **ret, size_t *ret_len) {
        char *s = json_dumps(j, JSON_COMPACT | JSON_ENCODE_ANY | JSON_REAL_PRECISION(17));

        json_decref(j);
        if (!s)
                return -ENOMEM;
        if (ret_len)
                *ret_len = strlen(s);
        *ret = s;
        return 0;
}

int proto_value_encode(const struct tether_value *v, char **ret, size_t *ret_len) {
        json_t *j;

        switch (v->type) {
        case TETHER_TYPE_BOOL:
                j = json_boolean(v->b);
                break;
        case TETHER_TYPE_INT32:
                j = json_integer(v->i);
                break;
        case TETHER_TYPE_DOUBLE:
                j = json_real(v->d);
                if (!j)
                        return -ERANGE; /* NaN and infinities have no JSON form */
                break;
        case TETHER_TYPE_STRING:
                if (!v->s)
                        return -EINVAL;
                j = json_string(v->s);
                if (!j)
                        return -EILSEQ;
                break;
        default:
                return -EINVAL;
        }
        if (!j)
                return -ENOMEM;
        return json_dump_take(j, ret, ret_len);
}

int proto_value_decode(const uint8_t *buf, size_t len, json_t **ret_json, uint32_t *ret_type) {
        json_t *j;
        uint32_t t;

        if (!buf)
                return -EBADMSG;
        j = json_loadb((const char *)buf, len, JSON_DECODE_ANY | JSON_REJECT_DUPLICATES, NULL);
        if (!j)
                return -EBADMSG;
        if (json_is_boolean(j))
                t = TETHER_TYPE_BOOL;
        else if (json_is_integer(j) && json_integer_value(j) >= INT32_MIN &&
                 json_integer_value(j) <= INT32_MAX)
                t = TETHER_TYPE_INT32;
        else if (json_is_real(j))
                t = TETHER_TYPE_DOUBLE;
        else if (json_is_string(j))
                t = TETHER_TYPE_STRING;
        else {
                json_decref(j);
                return -EBADMSG;
        }
        *ret_json = j;
        *ret_type = t;
        return 0;
}

void proto_event_done(ProtoEvent *e) {
        if (!e)
                return;
        free(e->name);
        free(e->data);
        free(e->published_at);
        free(e->coreid);
        free(e->received_at);
        memset(e, 0, sizeof(*e));
}

int proto_event_encode(const ProtoEvent *e, char **ret, size_t *ret_len) {
        json_t *j;

        if (!e->name || proto_name_check(e->name, strlen(e->name), PROTO_NAME_EVENT) < 0)
                return -EINVAL;
        j = json_pack("{s:s, s:s?, s:I, s:s?, s:s?, s:s?}", "name", e->name, "data", e->data, "ttl",
                      (json_int_t)e->ttl, "published_at", e->published_at, "coreid", e->coreid, "received_at",
                      e->received_at ?: e->published_at);
        if (!j)
                return -EINVAL;
        if (e->private_ && json_object_set_new(j, "private", json_true()) < 0) {
                json_decref(j);
                return -ENOMEM;
        }
        return json_dump_take(j, ret, ret_len);
}

int proto_event_decode(const uint8_t *buf, size_t len, ProtoEvent *ret) {
        const char *name = NULL, *data = NULL, *at = NULL, *coreid = NULL, *received = NULL;
        json_int_t ttl = PROTO_DEFAULT_TTL;
        json_t *j, *data_json = NULL;
        int priv = 0;
        ProtoEvent e = {};
        int r = -EBADMSG;

        if (!buf)
                return -EBADMSG;
        j = json_loadb((const char *)buf, len, JSON_REJECT_DUPLICATES, NULL);
        if (!j)
                return -EBADMSG;
        /* data is null for an event without data (proto_event_encode()). */
        if (json_unpack(j, "{s:s, s?o, s?I, s?s, s?s, s?b, s?s}", "name", &name, "data", &data_json, "ttl", &ttl,
                        "published_at", &at, "coreid", &coreid, "private", &priv, "received_at",
                        &received) < 0)
                goto out;
        if (data_json && !json_is_null(data_json)) {
                if (!json_is_string(data_json))
                        goto out;
                data = json_string_value(data_json);
        }
        if (proto_name_check(name, strlen(name), PROTO_NAME_EVENT) < 0 || ttl < 0 || ttl > UINT32_MAX)
                goto out;
        r = -ENOMEM;
        e.name = strdup(name);
        e.data = data ? strdup(data) : NULL;
        e.published_at = at ? strdup(at) : NULL;
        e.coreid = coreid ? strdup(coreid) : NULL;
        e.received_at = received ? strdup(received) : NULL;
        if (!e.name || (data && !e.data) || (at && !e.published_at) || (coreid && !e.coreid) ||
            (received && !e.received_at)) {
                proto_event_done(&e);
                goto out;
        }
        e.ttl = (uint32_t)ttl;
        e.private_ = priv;
        *ret = e;
        r = 0;
out:
        json_decref(j);
        return r;
}

static bool json_is_string_array(json_t *a) {
        size_t i;
        json_t *v;

        if (!json_is_array(a))
                return false;
        json_array_foreach(a, i, v) if (!json_is_string(v)) return false;
        return true;
}

bool proto_text_clean(const char *s, size_t len, size_t max) {
        if (len > max || memchr(s, 0, len) || proto_utf8_check(s, len) < 0)
                return false;
        for (size_t i = 0; i < len; i++) {
                unsigned char c = (unsigned char)s[i];

                if (c < 0x20 || c == 0x7f)
                        return false;
                if (c == 0xc2 && i + 1 < len && (unsigned char)s[i + 1] >= 0x80 && (unsigned char)s[i + 1] <= 0x9f)
                        return false;
        }
        return true;
}

bool proto_package_name_valid(const char *s, size_t len) {
        if (len < 2 || len > PROTO_PACKAGE_NAME_MAX)
                return false;
        for (size_t i = 0; i < len; i++) {
                char c = s[i];

                if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || (i > 0 && strchr("+.-", c) && c)))
                        return false;
        }
        return true;
}

bool proto_package_version_valid(const char *s, size_t len) {
        if (len < 1 || len > PROTO_PACKAGE_VERSION_MAX)
                return false;
        for (size_t i = 0; i < len; i++) {
                char c = s[i];

                if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                      (strchr(".+~:-", c) && c)))
                        return false;
        }
        return true;
}

/* The describe document's "system", checked: a new object holding what
 * is well-formed of it, or NULL when it is not an object at all. */
static json_t *describe_system(json_t *sys) {
        static const char *const texts[] = { "os", "arch", "kernel" };
        json_t *out, *pk, *v;
        const char *key;

        if (!json_is_object(sys) || !(out = json_object()))
                return NULL;
        for (size_t i = 0; i < sizeof(texts) / sizeof(texts[0]); i++) {
                v = json_object_get(sys, texts[i]);
                if (json_is_string(v) && proto_text_clean(json_string_value(v), json_string_length(v),
                                                          PROTO_SYSTEM_TEXT_MAX))
                        (void)json_object_set(out, texts[i], v);
        }
        pk = json_object_get(sys, "packages");
        if (json_is_object(pk) && json_object_size(pk) <= PROTO_SYSTEM_PACKAGES_MAX) {
                json_t *p = json_object();

                json_object_foreach(pk, key, v)
                        if (p && proto_package_name_valid(key, strlen(key)) && json_is_string(v) &&
                            proto_package_version_valid(json_string_value(v), json_string_length(v)))
                                (void)json_object_set(p, key, v);
                if (p)
                        (void)json_object_set_new(out, "packages", p);
        }
        return out;
}

int proto_describe_decode(const uint8_t *buf, size_t len, json_t **ret) {
        json_t *j, *functions, *variables, *plugins, *events, *units, *v;
        const char *key;
        size_t i;

        if (!buf)
                return -EBADMSG;
        j = json_loadb((const char *)buf, len, JSON_REJECT_DUPLICATES, NULL);
        if (!j)
                return -EBADMSG;
        if (!json_is_object(j) || !json_is_string(json_object_get(j, "agent")) ||
            !json_is_string(json_object_get(j, "version")))
                goto bad;
        functions = json_object_get(j, "functions");
        variables = json_object_get(j, "variables");
        plugins = json_object_get(j, "plugins");
        events = json_object_get(j, "events");
        if (!json_is_string_array(functions) || !json_is_object(variables) || !json_is_array(plugins) ||
            (events && !json_is_string_array(events)))
                goto bad;
        json_array_foreach(functions, i, v) {
                const char *s = json_string_value(v);
                if (proto_name_check(s, strlen(s), PROTO_NAME_FUNCTION) < 0)
                        goto bad;
        }
        json_object_foreach(variables, key, v) {
                if (proto_name_check(key, strlen(key), PROTO_NAME_VARIABLE) < 0 ||
                    proto_type_from_string(json_string_value(v)) == 0)
                        goto bad;
        }
        json_array_foreach(plugins, i, v) {
                if (!json_is_object(v) || !json_is_string(json_object_get(v, "name")))
                        goto bad;
        }
        /* Optional (ABI 1.1 agents): units of variables, {name: unit}. */
        units = json_object_get(j, "units");
        if (units) {
                void *tmp;

                if (!json_is_object(units))
                        goto bad;
                json_object_foreach_safe(units, tmp, key, v) {
                        if (!json_object_get(variables, key) || !json_is_string(v) ||
                            json_string_length(v) > PROTO_UNIT_MAX)
                                goto bad;
                        /* Shown as they are (tether describe): a unit with
                         * control characters or bad UTF-8 is left out. */
                        if (!proto_text_clean(json_string_value(v), json_string_length(v), PROTO_UNIT_MAX))
                                (void)json_object_del(units, key);
                }
        }
        /* Optional (inventory): what the agent runs on. */
        if (json_object_get(j, "system")) {
                json_t *sys = describe_system(json_object_get(j, "system"));

                if (sys)
                        (void)json_object_set_new(j, "system", sys);
                else
                        (void)json_object_del(j, "system");
        }
        *ret = j;
        return 0;
bad:
        json_decref(j);
        return -EBADMSG;
}

static bool has_prefix(const uint8_t *opt, size_t len, const char *prefix, size_t *ret_plen) {
        size_t n = strlen(prefix);

        if (len < n || memcmp(opt, prefix, n) != 0)
                return false;
        *ret_plen = n;
        return true;
}

/* 1 to 20 decimal digits, no sign, below 2^64. */
static int parse_decimal(const uint8_t *p, size_t len, uint64_t *ret) {
        uint64_t v = 0;

        if (len == 0 || len > 20)
                return -EINVAL;
        for (size_t i = 0; i < len; i++) {
                unsigned d = (unsigned)p[i] - '0';

                if (d > 9 || v > (UINT64_MAX - d) / 10)
                        return -EINVAL;
                v = v * 10 + d;
        }
        *ret = v;
        return 0;
}

int proto_publish_query_add(ProtoPublishQuery *q, const uint8_t *opt, size_t len) {
        size_t n;

        if (len == strlen(PROTO_QUERY_PRIVATE) && memcmp(opt, PROTO_QUERY_PRIVATE, len) == 0) {
                q->private_ = true;
                return 0;
        }
        if (has_prefix(opt, len, PROTO_QUERY_SEQ, &n)) {
                uint64_t v;

                if (q->has_seq || parse_decimal(opt + n, len - n, &v) < 0 || v == 0)
                        return -EINVAL;
                q->seq = v;
                q->has_seq = true;
                return 0;
        }
        if (has_prefix(opt, len, PROTO_QUERY_TIME, &n)) {
                uint64_t v;

                if (q->has_time || parse_decimal(opt + n, len - n, &v) < 0)
                        return -EINVAL;
                q->time_ms = v;
                q->has_time = true;
                return 0;
        }
        if (has_prefix(opt, len, PROTO_QUERY_EPOCH, &n)) {
                uint64_t v = 0;

                if (q->has_epoch || len == n || len - n > 16)
                        return -EINVAL;
                for (size_t i = n; i < len; i++) {
                        uint8_t c = opt[i];
                        unsigned d = c >= '0' && c <= '9'   ? (unsigned)(c - '0')
                                     : c >= 'a' && c <= 'f' ? (unsigned)(c - 'a' + 10)
                                     : c >= 'A' && c <= 'F' ? (unsigned)(c - 'A' + 10)
                                                            : 16;

                        if (d > 15)
                                return -EINVAL;
                        v = v << 4 | d;
                }
                q->epoch = v;
                q->has_epoch = true;
                return 0;
        }
        return 0;
}

int proto_publish_query_check(const ProtoPublishQuery *q) {
        return q->has_seq == q->has_epoch ? 0 : -EINVAL;
}

int proto_timestamp_format(uint64_t ms, char buf[static 32]) {
        /* 9999-12-31T23:59:59.999Z: four-digit years only. */
        const uint64_t max = UINT64_C(253402300799999);
        time_t sec;
        struct tm tm;
        char date[24];

        if (ms > max)
                return -ERANGE;
        sec = (time_t)(ms / 1000);
        if (!gmtime_r(&sec, &tm))
                return -ERANGE;
        strftime(date, sizeof(date), "%Y-%m-%dT%H:%M:%S", &tm);
        snprintf(buf, 32, "%.20s.%03uZ", date, (unsigned)(ms % 1000));
        return 0;
}

uint64_t proto_time_now_ms(void) {
        struct timespec ts;

        if (clock_gettime(CLOCK_REALTIME, &ts) < 0 || ts.tv_sec < 0)
                return 0;
        return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

void proto_timestamp_now(char buf[static 32]) {
        if (proto_timestamp_format(proto_time_now_ms(), buf) < 0)
                snprintf(buf, 32, "9999-12-31T23:59:59.999Z");
}

const char *proto_publish_time_problem(uint64_t device_ms, uint64_t now_ms) {
        _Static_assert(PROTO_TIME_SKEW_MS == 60000 && PROTO_TIME_MAX_AGE_MS == UINT64_C(2592000000),
                       "the reasons below name the limits");

        if (device_ms < PROTO_TIME_FLOOR_MS)
                return "before 2025-01-01T00:00:00Z";
        if (device_ms > now_ms && device_ms - now_ms > PROTO_TIME_SKEW_MS)
                return "more than 60 s ahead of the cloud's clock";
        if (device_ms < now_ms && now_ms - device_ms > PROTO_TIME_MAX_AGE_MS)
                return "more than 30 days behind the cloud's clock";
        return NULL;
}
