/* The HTTP API: libmicrohttpd in external epoll mode on the sd-event loop,
 * Particle Cloud API shapes (docs/protocol.md, docs/cloud.md). Requests
 * waiting for a device and idle event streams are suspended, and resumed
 * when the answer, a timeout or an event arrives. */
#include "config.h"

#include <microhttpd.h>
#include <netdb.h>
#include <stdarg.h>

#include "cloud.h"
#include "log.h"
#include "util.h"

#define USEC_PER_SEC 1000000ULL
#define USEC_PER_MSEC 1000ULL
/* particle-api-js drops an event stream after 15 s without data. */
#define API_SSE_KEEPALIVE_USEC (10 * USEC_PER_SEC)
#define API_SSE_QUEUE_MAX (1024 * 1024) /* bytes queued per stream before we drop it */
#define API_SSE_BLOCK 16384
#define API_CONNECTION_TIMEOUT_SEC 120
#define API_CONNECTION_LIMIT 4096 /* MHD's default is FD_SETSIZE - 4 */
#define API_DIAG_MAX 256

typedef struct ApiRequest {
        struct MHD_Connection *connection;
        struct ApiRequest *prev, *next;

        char *body;
        size_t body_len;
        bool body_too_large;

        bool dispatched;
        bool suspended;
        struct MHD_Response *response; /* ready to queue */
        unsigned status;

        /* a call to a device */
        DeviceCall *call;
        Device *device;
        char *name;
        bool is_function;

        /* an event stream */
        bool sse;
        bool dropped; /* end the stream with an error */
        bool ending;  /* end the stream cleanly (shutdown) */
        char *prefix;
        char *filter_id; /* only events from this device */
        char *buf;
        size_t buf_off, buf_len, buf_cap;

        /* /v1/ota/...: handled by ota.c */
        bool ota;
        OtaRequest *ota_state;
} ApiRequest;

static struct {
        sd_event *event;
        const CloudConfig *config;
        struct MHD_Daemon *daemon;
        sd_event_source *io, *timer, *defer, *keepalive;
        ApiRequest *requests;
        size_t body_max;
        unsigned n_streams;
        bool running;
        bool stopping;
} api;

/* ---- loop integration --------------------------------------------------- */

static void api_update_timer(void) {
        MHD_UNSIGNED_LONG_LONG ms;

        if (MHD_get_timeout(api.daemon, &ms) != MHD_YES)
                (void)sd_event_source_set_enabled(api.timer, SD_EVENT_OFF);
        else if (ms == 0) {
                /* MHD has work now (e.g. the next request on a kept-alive
                 * connection): a timer, even with 1 ms accuracy, adds up to
                 * a millisecond per round. */
                (void)sd_event_source_set_enabled(api.timer, SD_EVENT_OFF);
                (void)sd_event_source_set_enabled(api.defer, SD_EVENT_ONESHOT);
        } else {
                (void)sd_event_source_set_time_relative(api.timer, (uint64_t)ms * USEC_PER_MSEC);
                (void)sd_event_source_set_enabled(api.timer, SD_EVENT_ONESHOT);
        }
}

static void api_run(void) {
        (void)MHD_run(api.daemon);
        api_update_timer();
}

static int api_io_cb(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        api_run();
        return 0;
}

static int api_timer_cb(sd_event_source *s, uint64_t usec, void *userdata) {
        api_run();
        return 0;
}

static int api_defer_cb(sd_event_source *s, void *userdata) {
        api_run();
        return 0;
}

/* MHD must run after a resume, not only when a socket wakes it. */
static void api_schedule(void) {
        (void)sd_event_source_set_enabled(api.defer, SD_EVENT_ONESHOT);
}

void api_kick(void) {
        if (api.defer)
                api_schedule();
}

static void api_resume(ApiRequest *req) {
        if (!req->suspended)
                return;
        req->suspended = false;
        MHD_resume_connection(req->connection);
        api_schedule();
}

/* ---- responses ----------------------------------------------------------- */

/* Takes the reference to j. Sets req->response, or leaves it NULL on OOM
 * (the connection is then closed). */
static void api_set_json(ApiRequest *req, unsigned status, json_t *j) {
        struct MHD_Response *resp;
        char *s;

        if (!j)
                return;
        s = json_dumps(j, JSON_COMPACT | JSON_REAL_PRECISION(17));
        json_decref(j);
        if (!s)
                return;
        resp = MHD_create_response_from_buffer(strlen(s), s, MHD_RESPMEM_MUST_FREE);
        if (!resp) {
                free(s);
                return;
        }
        (void)MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "application/json");
        if (status == MHD_HTTP_UNAUTHORIZED)
                (void)MHD_add_response_header(resp, MHD_HTTP_HEADER_WWW_AUTHENTICATE,
                                              "Bearer realm=\"tether\", error=\"invalid_token\"");
        if (req->response)
                MHD_destroy_response(req->response);
        req->response = resp;
        req->status = status;
}

static void api_set_error(ApiRequest *req, unsigned status, const char *error, const char *info) {
        json_t *j = json_pack("{s:b, s:s}", "ok", 0, "error", error);

        if (j && info && json_object_set_new(j, "info", json_string(info)) < 0) {
                json_decref(j);
                j = NULL;
        }
        api_set_json(req, status, j);
}

static void api_set_errorf(ApiRequest *req, unsigned status, const char *fmt, ...) _printf_(3, 4);
static void api_set_errorf(ApiRequest *req, unsigned status, const char *fmt, ...) {
        char text[API_DIAG_MAX + 128];
        va_list ap;

        va_start(ap, fmt);
        vsnprintf(text, sizeof(text), fmt, ap);
        va_end(ap);
        api_set_error(req, status, text, NULL);
}

static enum MHD_Result api_queue(ApiRequest *req) {
        enum MHD_Result ret;

        if (!req->response)
                return MHD_NO;
        ret = MHD_queue_response(req->connection, req->status, req->response);
        MHD_destroy_response(req->response);
        req->response = NULL;
        return ret;
}

/* ---- request parameters --------------------------------------------------- */

static int hexval(char c) {
        if (c >= '0' && c <= '9')
                return c - '0';
        if (c >= 'a' && c <= 'f')
                return c - 'a' + 10;
        if (c >= 'A' && c <= 'F')
                return c - 'A' + 10;
        return -1;
}

/* application/x-www-form-urlencoded into a JSON object of strings (not
 * checked for UTF-8 here: every use checks). */
static json_t *api_parse_form(const char *body, size_t len) {
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

                        if (!o2)
                                goto fail;
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

/* A parameter as text: strings as they are, numbers and booleans in their
 * JSON spelling. Returns false if absent or null. buf holds the text for
 * non-strings. */
static bool api_param(json_t *params, const char *key, const char **ret, size_t *ret_len, char buf[static 32]) {
        json_t *v = params ? json_object_get(params, key) : NULL;

        if (!v || json_is_null(v))
                return false;
        if (json_is_string(v)) {
                *ret = json_string_value(v);
                *ret_len = json_string_length(v);
                return true;
        }
        if (json_is_integer(v))
                snprintf(buf, 32, "%" JSON_INTEGER_FORMAT, json_integer_value(v));
        else if (json_is_real(v))
                snprintf(buf, 32, "%.17g", json_real_value(v));
        else if (json_is_boolean(v))
                snprintf(buf, 32, "%s", json_is_true(v) ? "true" : "false");
        else
                return false;
        *ret = buf;
        *ret_len = strlen(buf);
        return true;
}

static const char *api_token(ApiRequest *req, json_t *params) {
        const char *h = MHD_lookup_connection_value(req->connection, MHD_HEADER_KIND,
                                                    MHD_HTTP_HEADER_AUTHORIZATION);
        const char *t;
        json_t *v;

        if (h) {
                if (strncasecmp(h, "Bearer ", 7) != 0)
                        return NULL;
                for (h += 7; *h == ' '; h++)
                        ;
                return h;
        }
        t = MHD_lookup_connection_value(req->connection, MHD_GET_ARGUMENT_KIND, "access_token");
        if (t)
                return t;
        v = params ? json_object_get(params, "access_token") : NULL;
        if (json_is_string(v) && !memchr(json_string_value(v), 0, json_string_length(v)))
                return json_string_value(v);
        return NULL;
}

bool api_connection_authorized(struct MHD_Connection *connection) {
        ApiRequest req = { .connection = connection };

        return config_token_valid(api.config, api_token(&req, NULL));
}

/* ---- device calls --------------------------------------------------------- */

static void api_copy_diag(const uint8_t *data, size_t len, char out[static API_DIAG_MAX]) {
        if (len >= API_DIAG_MAX)
                len = API_DIAG_MAX - 1;
        /* Cut at a character boundary, then accept only clean text. */
        while (len > 0 && (data[len - 1] & 0xc0) == 0x80 && proto_utf8_check((const char *)data, len) < 0)
                len--;
        if (proto_utf8_check((const char *)data, len) < 0)
                len = 0;
        memcpy(out, data, len);
        out[len] = 0;
}

static void api_call_done(int error, unsigned code, const uint8_t *data, size_t len, void *userdata) {
        ApiRequest *req = userdata;
        const char *kind = req->is_function ? "Function" : "Variable";
        const char *id = device_id(req->device);
        char diag[API_DIAG_MAX], heard[32];
        unsigned cls = code >> 5;
        int r;

        req->call = NULL;
        api_copy_diag(data, len, diag);
        if (error == -ETIMEDOUT)
                api_set_errorf(req, MHD_HTTP_GATEWAY_TIMEOUT, "Timed out waiting for device '%s'", id);
        else if (error < 0)
                api_set_errorf(req, MHD_HTTP_SERVICE_UNAVAILABLE, "Device '%s' went offline", id);
        else if (cls == 2 && req->is_function) {
                int32_t v;

                if (proto_result_parse(data, len, &v) < 0)
                        api_set_error(req, MHD_HTTP_BAD_GATEWAY, "Device sent an invalid function result", NULL);
                else
                        api_set_json(req, MHD_HTTP_OK,
                                     json_pack("{s:s, s:s, s:b, s:i}", "id", id, "name", id, "connected", 1,
                                               "return_value", (int)v));
        } else if (cls == 2) {
                json_t *value;
                uint32_t type;

                r = proto_value_decode(data, len, &value, &type);
                if (r < 0)
                        api_set_error(req, MHD_HTTP_BAD_GATEWAY, "Device sent an invalid variable value", NULL);
                else {
                        proto_timestamp_now(heard);
                        api_set_json(req, MHD_HTTP_OK,
                                     json_pack("{s:s, s:s, s:o, s:{s:s, s:b, s:s}}", "cmd", "VarReturn", "name",
                                               req->name, "result", value, "coreInfo", "deviceID", id,
                                               "connected", 1, "last_heard", heard));
                }
        } else if (code == COAP_RESPONSE_CODE(404)) {
                char text[TETHER_NAME_MAX + 32];

                snprintf(text, sizeof(text), "%s '%s' not found", kind, req->name);
                api_set_error(req, MHD_HTTP_NOT_FOUND, text, diag[0] ? diag : NULL);
        } else if (code == COAP_RESPONSE_CODE(413))
                api_set_error(req, MHD_HTTP_CONTENT_TOO_LARGE, diag[0] ? diag : "Argument too large", NULL);
        else if (cls == 4)
                api_set_error(req, MHD_HTTP_BAD_REQUEST, diag[0] ? diag : "Device rejected the request", NULL);
        else {
                char text[64];

                snprintf(text, sizeof(text), "Device error %u.%02u", cls, code & 0x1f);
                api_set_error(req, MHD_HTTP_BAD_GATEWAY, diag[0] ? diag : text, diag[0] ? text : NULL);
        }
        api_resume(req);
}

static void api_device_call(ApiRequest *req, Device *d, const char *name, bool function, json_t *params) {
        const char *arg = "";
        size_t arg_len = 0;
        char buf[32];
        int r;

        if (proto_name_check(name, strlen(name), PROTO_NAME_FUNCTION) < 0) {
                api_set_errorf(req, MHD_HTTP_BAD_REQUEST, "Invalid %s name", function ? "function" : "variable");
                return;
        }
        if (function && !api_param(params, "args", &arg, &arg_len, buf))
                (void)api_param(params, "arg", &arg, &arg_len, buf);
        if (arg_len > api.config->max_payload) {
                api_set_errorf(req, MHD_HTTP_CONTENT_TOO_LARGE, "Argument longer than %u bytes",
                               api.config->max_payload);
                return;
        }
        if (proto_utf8_check(arg, arg_len) < 0) {
                api_set_error(req, MHD_HTTP_BAD_REQUEST, "Argument is not UTF-8 text", NULL);
                return;
        }
        req->name = strdup(name);
        if (!req->name)
                return;
        req->device = d;
        req->is_function = function;
        r = devices_call(d, function ? COAP_REQUEST_CODE_POST : COAP_REQUEST_CODE_GET,
                         function ? PROTO_PATH_FUNCTION : PROTO_PATH_VARIABLE, name, arg, arg_len, api_call_done,
                         req, &req->call);
        if (r == -ENOTCONN)
                api_set_errorf(req, MHD_HTTP_SERVICE_UNAVAILABLE, "Device '%s' is offline", device_id(d));
        else if (r == -E2BIG)
                api_set_error(req, MHD_HTTP_CONTENT_TOO_LARGE, "Request too large for the device", NULL);
        else if (r < 0)
                api_set_errorf(req, MHD_HTTP_INTERNAL_SERVER_ERROR, "Failed to send the request: %s", strerror(-r));
        else {
                MHD_suspend_connection(req->connection);
                req->suspended = true;
        }
}

/* ---- publish ----------------------------------------------------------------- */

static bool api_parse_bool(const char *s, bool *ret) {
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

static void api_publish(ApiRequest *req, json_t *params) {
        const char *name, *data = NULL, *s;
        size_t name_len, data_len = 0, len;
        char buf[32], published_at[32];
        _cleanup_free_ char *name_copy = NULL, *data_copy = NULL;
        bool priv = false;
        unsigned ttl = PROTO_DEFAULT_TTL;
        ProtoEvent e;

        if (!api_param(params, "name", &name, &name_len, buf)) {
                api_set_error(req, MHD_HTTP_BAD_REQUEST, "Event name is required", NULL);
                return;
        }
        if (memchr(name, 0, name_len) || proto_name_check(name, name_len, PROTO_NAME_EVENT) < 0) {
                api_set_error(req, MHD_HTTP_BAD_REQUEST, "Invalid event name", NULL);
                return;
        }
        if (api_param(params, "data", &data, &data_len, buf)) {
                if (data_len > api.config->max_payload) {
                        api_set_errorf(req, MHD_HTTP_CONTENT_TOO_LARGE, "Event data longer than %u bytes",
                                       api.config->max_payload);
                        return;
                }
                if (proto_utf8_check(data, data_len) < 0) {
                        api_set_error(req, MHD_HTTP_BAD_REQUEST, "Event data is not UTF-8 text", NULL);
                        return;
                }
                data_copy = strndup(data, data_len);
                if (!data_copy)
                        return;
        }
        if (api_param(params, "private", &s, &len, buf) && !api_parse_bool(s, &priv)) {
                api_set_error(req, MHD_HTTP_BAD_REQUEST, "Invalid value for private", NULL);
                return;
        }
        if (api_param(params, "ttl", &s, &len, buf)) {
                char *end;
                unsigned long v;

                errno = 0;
                v = strtoul(s, &end, 10);
                if (!*s || *end || errno || *s == '-' || v > UINT32_MAX) {
                        api_set_error(req, MHD_HTTP_BAD_REQUEST, "Invalid value for ttl", NULL);
                        return;
                }
                ttl = (unsigned)v;
        }
        name_copy = strndup(name, name_len);
        if (!name_copy)
                return;
        proto_timestamp_now(published_at);
        e = (ProtoEvent){
                .name = name_copy,
                .data = data_copy,
                .ttl = ttl,
                .private_ = priv,
                .published_at = published_at,
                .coreid = (char *)"api",
        };
        events_route(&e, NULL);
        api_set_json(req, MHD_HTTP_OK, json_pack("{s:b}", "ok", 1));
}

/* ---- event streams ------------------------------------------------------------ */

static int api_sse_append(ApiRequest *req, const char *s, size_t n) {
        if (req->buf_off > 0 && req->buf_off == req->buf_len)
                req->buf_off = req->buf_len = 0;
        if (req->buf_len + n > req->buf_cap) {
                size_t cap;
                char *b;

                if (req->buf_off > 0) {
                        memmove(req->buf, req->buf + req->buf_off, req->buf_len - req->buf_off);
                        req->buf_len -= req->buf_off;
                        req->buf_off = 0;
                }
                cap = req->buf_cap ?: 1024;
                while (cap < req->buf_len + n)
                        cap *= 2;
                if (cap != req->buf_cap) {
                        b = realloc(req->buf, cap);
                        if (!b)
                                return -ENOMEM;
                        req->buf = b;
                        req->buf_cap = cap;
                }
        }
        memcpy(req->buf + req->buf_len, s, n);
        req->buf_len += n;
        return 0;
}

static ssize_t api_sse_reader(void *cls, uint64_t pos, char *buf, size_t max) {
        ApiRequest *req = cls;
        size_t n = req->buf_len - req->buf_off;

        if (req->dropped)
                return MHD_CONTENT_READER_END_WITH_ERROR;
        if (n == 0) {
                if (req->ending)
                        return MHD_CONTENT_READER_END_OF_STREAM;
                if (!req->suspended) {
                        MHD_suspend_connection(req->connection);
                        req->suspended = true;
                }
                return 0;
        }
        if (n > max)
                n = max;
        memcpy(buf, req->buf + req->buf_off, n);
        req->buf_off += n;
        if (req->buf_off == req->buf_len)
                req->buf_off = req->buf_len = 0;
        return (ssize_t)n;
}

static void api_sse_push(ApiRequest *req, const char *s, size_t n) {
        if (req->dropped)
                return;
        if (req->buf_len - req->buf_off + n > API_SSE_QUEUE_MAX || api_sse_append(req, s, n) < 0) {
                const union MHD_ConnectionInfo *ci =
                        MHD_get_connection_info(req->connection, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
                char host[NI_MAXHOST] = "?";

                if (ci && ci->client_addr)
                        (void)getnameinfo(ci->client_addr,
                                          ci->client_addr->sa_family == AF_INET6 ? sizeof(struct sockaddr_in6)
                                                                                 : sizeof(struct sockaddr_in),
                                          host, sizeof(host), NULL, 0, NI_NUMERICHOST);
                log_warning("Event stream client %s fell more than %u bytes behind, dropping it.", host,
                            API_SSE_QUEUE_MAX);
                req->dropped = true;
        }
        api_resume(req);
}

void api_deliver_event(const ProtoEvent *e) {
        _cleanup_free_ char *msg = NULL, *json = NULL;
        json_t *j;
        int n;

        if (api.n_streams == 0)
                return;
        j = json_pack("{s:s?, s:i, s:s, s:s}", "data", e->data, "ttl", (json_int_t)e->ttl, "published_at",
                      e->published_at, "coreid", e->coreid);
        if (!j)
                return;
        json = json_dumps(j, JSON_COMPACT);
        json_decref(j);
        if (!json)
                return;
        n = asprintf(&msg, "event: %s\ndata: %s\n\n", e->name, json);
        if (n < 0) {
                msg = NULL;
                return;
        }
        for (ApiRequest *req = api.requests; req; req = req->next) {
                if (!req->sse || !proto_prefix_match(req->prefix, e->name))
                        continue;
                if (req->filter_id && !(e->coreid && streq(req->filter_id, e->coreid) && !streq(e->coreid, "api")))
                        continue;
                api_sse_push(req, msg, (size_t)n);
        }
}

static int api_keepalive_cb(sd_event_source *s, uint64_t usec, void *userdata) {
        for (ApiRequest *req = api.requests; req; req = req->next)
                if (req->sse && req->buf_len == req->buf_off)
                        api_sse_push(req, ":\n\n", 3);
        (void)sd_event_source_set_time_relative(s, API_SSE_KEEPALIVE_USEC);
        return 0;
}

static enum MHD_Result api_stream(ApiRequest *req, const char *prefix, const char *device) {
        struct MHD_Response *resp;
        enum MHD_Result ret;

        if (proto_name_check(prefix, strlen(prefix), PROTO_NAME_PREFIX) < 0) {
                api_set_error(req, MHD_HTTP_BAD_REQUEST, "Invalid event prefix", NULL);
                return api_queue(req);
        }
        req->prefix = strdup(prefix);
        if (!req->prefix || (device && !(req->filter_id = strdup(device))))
                return MHD_NO;
        if (api_sse_append(req, ":ok\n\n", 5) < 0)
                return MHD_NO;
        resp = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, API_SSE_BLOCK, api_sse_reader, req, NULL);
        if (!resp)
                return MHD_NO;
        (void)MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "text/event-stream");
        (void)MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
        (void)MHD_add_response_header(resp, "X-Accel-Buffering", "no");
        ret = MHD_queue_response(req->connection, MHD_HTTP_OK, resp);
        MHD_destroy_response(resp);
        if (ret == MHD_YES) {
                req->sse = true;
                api.n_streams++;
        }
        return ret;
}

/* ---- routing --------------------------------------------------------------------- */

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

static enum MHD_Result api_dispatch(ApiRequest *req, const char *url, const char *method) {
        _cleanup_(json_decrefp) json_t *params = NULL;
        bool get = streq(method, MHD_HTTP_METHOD_GET) || streq(method, MHD_HTTP_METHOD_HEAD);
        bool post = streq(method, MHD_HTTP_METHOD_POST), put = streq(method, MHD_HTTP_METHOD_PUT);
        const char *rest, *prefix;

        if (req->body_too_large) {
                api_set_errorf(req, MHD_HTTP_CONTENT_TOO_LARGE, "Request body larger than %zu bytes", api.body_max);
                return api_queue(req);
        }
        if (req->body_len > 0) {
                const char *ct = MHD_lookup_connection_value(req->connection, MHD_HEADER_KIND,
                                                              MHD_HTTP_HEADER_CONTENT_TYPE);

                if (ct && strncasecmp(ct, "application/json", 16) == 0) {
                        params = json_loadb(req->body, req->body_len, JSON_REJECT_DUPLICATES, NULL);
                        if (!json_is_object(params)) {
                                if (!config_token_valid(api.config, api_token(req, NULL)))
                                        goto unauthorized;
                                api_set_error(req, MHD_HTTP_BAD_REQUEST, "Body is not a JSON object", NULL);
                                return api_queue(req);
                        }
                } else
                        params = api_parse_form(req->body, req->body_len);
                if (!params)
                        return MHD_NO;
        }
        if (!config_token_valid(api.config, api_token(req, params)))
                goto unauthorized;

        if (!startswith(url, "/v1/"))
                goto not_found;
        rest = url + 4;

        if (match_events(rest, &prefix)) {
                if (!get)
                        goto not_found;
                return api_stream(req, prefix, NULL);
        }
        if (streq(rest, "devices")) {
                if (!get)
                        goto not_found;
                api_set_json(req, MHD_HTTP_OK, devices_to_json());
                return api_queue(req);
        }
        if (!startswith(rest, "devices/"))
                goto not_found;
        rest += 8;
        if (match_events(rest, &prefix)) {
                if (get)
                        return api_stream(req, prefix, NULL);
                if (post && streq(rest, "events")) {
                        api_publish(req, params);
                        return api_queue(req);
                }
                goto not_found;
        }
        {
                const char *slash = strchr(rest, '/');
                char id[PROTO_DEVICE_ID_MAX + 1];
                size_t n = slash ? (size_t)(slash - rest) : strlen(rest);
                Device *d;

                if (n == 0 || n > PROTO_DEVICE_ID_MAX)
                        goto no_device;
                memcpy(id, rest, n);
                id[n] = 0;
                rest = slash ? slash + 1 : "";
                /* A device's stream may open before it ever connected. */
                if (get && match_events(rest, &prefix) &&
                    proto_name_check(id, strlen(id), PROTO_NAME_DEVICE) == 0)
                        return api_stream(req, prefix, id);
                d = devices_find(id);
                if (!d)
                        goto no_device;
                if (!*rest && put) {
                        /* Particle's "update the device": here, start an OTA job. */
                        json_t *body = NULL;
                        unsigned status = ota_api_start_job(d, params, &body);

                        api_set_json(req, status, body);
                        return api_queue(req);
                }
                if (!*rest) {
                        if (!get)
                                goto not_found;
                        api_set_json(req, MHD_HTTP_OK, device_to_json(d, true));
                        return api_queue(req);
                }
                if (strchr(rest, '/') || (!get && !post))
                        goto not_found;
                api_device_call(req, d, rest, post, params);
                if (req->suspended)
                        return MHD_YES;
                return api_queue(req);
        }

no_device:
        api_set_error(req, MHD_HTTP_NOT_FOUND, "Device not found", NULL);
        return api_queue(req);
not_found:
        api_set_error(req, MHD_HTTP_NOT_FOUND, "Not found", NULL);
        return api_queue(req);
unauthorized:
        api_set_json(req, MHD_HTTP_UNAUTHORIZED,
                     json_pack("{s:b, s:s, s:s}", "ok", 0, "error", "invalid_token", "error_description",
                               "The access token was not found or is invalid"));
        return api_queue(req);
}

static enum MHD_Result api_handler(void *cls, struct MHD_Connection *connection, const char *url,
                                   const char *method, const char *version, const char *upload_data,
                                   size_t *upload_data_size, void **con_cls) {
        ApiRequest *req = *con_cls;

        if (!req) {
                const char *cl;

                req = calloc(1, sizeof(*req));
                if (!req)
                        return MHD_NO;
                req->connection = connection;
                req->next = api.requests;
                if (api.requests)
                        api.requests->prev = req;
                api.requests = req;
                *con_cls = req;
                if (ota_api_owns(url)) {
                        /* Artifact uploads stream to disk: no body limit here. */
                        req->ota = true;
                        if (!api_connection_authorized(connection))
                                goto unauthorized;
                        return (enum MHD_Result)ota_api_handler(connection, url, method, upload_data,
                                                                upload_data_size, &req->ota_state);
                }
                /* Refuse a declared oversize body before it is sent. */
                cl = MHD_lookup_connection_value(connection, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
                if (cl && strtoull(cl, NULL, 10) > api.body_max) {
                        api_set_errorf(req, MHD_HTTP_CONTENT_TOO_LARGE, "Request body larger than %zu bytes",
                                       api.body_max);
                        return api_queue(req);
                }
                return MHD_YES;
        }
        if (req->ota)
                return req->response ? api_queue(req)
                                     : (enum MHD_Result)ota_api_handler(connection, url, method, upload_data,
                                                                        upload_data_size, &req->ota_state);
        if (*upload_data_size > 0) {
                size_t n = *upload_data_size;

                *upload_data_size = 0;
                if (req->body_too_large)
                        return MHD_YES;
                if (req->body_len + n > api.body_max) {
                        /* Keep reading, keep nothing; 413 once it is over. */
                        req->body_too_large = true;
                        free(req->body);
                        req->body = NULL;
                        req->body_len = 0;
                        return MHD_YES;
                }
                {
                        char *b = realloc(req->body, req->body_len + n + 1);

                        if (!b)
                                return MHD_NO;
                        memcpy(b + req->body_len, upload_data, n);
                        req->body = b;
                        req->body_len += n;
                        b[req->body_len] = 0;
                }
                return MHD_YES;
        }
        if (req->response)
                return api_queue(req);
        if (req->call || req->suspended || req->sse)
                return MHD_YES;
        if (req->dispatched)
                return MHD_NO; /* the answer could not be built (OOM) */
        req->dispatched = true;
        if (api.stopping) {
                /* Nothing may be suspended once MHD_stop_daemon() runs. */
                api_set_error(req, MHD_HTTP_SERVICE_UNAVAILABLE, "Shutting down", NULL);
                return api_queue(req);
        }
        return api_dispatch(req, url, method);
unauthorized:
        api_set_json(req, MHD_HTTP_UNAUTHORIZED,
                     json_pack("{s:b, s:s, s:s}", "ok", 0, "error", "invalid_token", "error_description",
                               "The access token was not found or is invalid"));
        return api_queue(req);
}

static void api_request_free(ApiRequest *req) {
        if (req->prev)
                req->prev->next = req->next;
        else
                api.requests = req->next;
        if (req->next)
                req->next->prev = req->prev;
        if (req->sse)
                api.n_streams--;
        devices_call_cancel(req->call);
        ota_api_request_free(req->ota_state);
        if (req->response)
                MHD_destroy_response(req->response);
        free(req->body);
        free(req->name);
        free(req->prefix);
        free(req->filter_id);
        free(req->buf);
        free(req);
}

static void api_completed(void *cls, struct MHD_Connection *connection, void **con_cls,
                          enum MHD_RequestTerminationCode toe) {
        ApiRequest *req = *con_cls;

        if (!req)
                return;
        *con_cls = NULL;
        api_request_free(req);
}

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wformat-nonliteral"
static void api_mhd_log(void *cls, const char *fmt, va_list ap) {
        char buf[512];
        size_t n;

        vsnprintf(buf, sizeof(buf), fmt, ap);
        n = strlen(buf);
        while (n > 0 && buf[n - 1] == '\n')
                buf[--n] = 0;
        /* Once running, MHD mostly reports clients that went away. */
        log_internal(api.running ? LOG_DEBUG : LOG_WARNING, 0, "libmicrohttpd: %s", buf);
}
#pragma GCC diagnostic pop

int api_start(sd_event *event, const CloudConfig *config, unsigned *ret_port) {
        const union MHD_DaemonInfo *info;
        struct sockaddr_storage ss;
        socklen_t sl;
        unsigned flags = MHD_USE_EPOLL | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_ERROR_LOG;
        int r, fd;

        api.event = event;
        api.config = config;
        /* Room for a MaxPayload argument even when every byte is escaped. */
        api.body_max = (size_t)config->max_payload * 3 + 4096;

        r = config_resolve_address(config->api_listen, config->api_port, &ss, &sl);
        if (r < 0)
                return log_error_errno(r, "Invalid [API] Listen= address '%s'.", config->api_listen);
        if (ss.ss_family == AF_INET6)
                flags |= MHD_USE_DUAL_STACK;
        api.daemon = MHD_start_daemon(flags, (uint16_t)config->api_port, NULL, NULL, api_handler, NULL,
                                      MHD_OPTION_EXTERNAL_LOGGER, api_mhd_log, NULL,
                                      MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&ss,
                                      MHD_OPTION_NOTIFY_COMPLETED, api_completed, NULL,
                                      MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)API_CONNECTION_TIMEOUT_SEC,
                                      MHD_OPTION_LISTEN_BACKLOG_SIZE, (unsigned)1024,
                                      MHD_OPTION_CONNECTION_LIMIT, (unsigned)API_CONNECTION_LIMIT, MHD_OPTION_END);
        if (!api.daemon)
                return log_error_errno(-EADDRNOTAVAIL, "Failed to start the HTTP API on '%s' port %u.",
                                       config->api_listen, config->api_port);
        info = MHD_get_daemon_info(api.daemon, MHD_DAEMON_INFO_BIND_PORT);
        if (!info)
                return log_error_errno(-EIO, "Cannot get the HTTP API port.");
        *ret_port = info->port;
        info = MHD_get_daemon_info(api.daemon, MHD_DAEMON_INFO_EPOLL_FD);
        if (!info)
                return log_error_errno(-EIO, "Cannot get the HTTP API epoll fd.");
        fd = info->epoll_fd;

        r = sd_event_add_io(event, &api.io, fd, EPOLLIN, api_io_cb, NULL);
        if (r >= 0)
                r = sd_event_add_time(event, &api.timer, CLOCK_MONOTONIC, 0, USEC_PER_MSEC, api_timer_cb, NULL);
        if (r >= 0)
                r = sd_event_source_set_enabled(api.timer, SD_EVENT_OFF);
        if (r >= 0)
                r = sd_event_add_defer(event, &api.defer, api_defer_cb, NULL);
        if (r >= 0)
                r = sd_event_source_set_enabled(api.defer, SD_EVENT_OFF);
        if (r >= 0)
                r = sd_event_add_time_relative(event, &api.keepalive, CLOCK_MONOTONIC, API_SSE_KEEPALIVE_USEC,
                                               100 * USEC_PER_MSEC, api_keepalive_cb, NULL);
        if (r >= 0)
                r = sd_event_source_set_enabled(api.keepalive, SD_EVENT_ON);
        if (r < 0)
                return log_error_errno(r, "Failed to add HTTP event sources: %m");
        api_update_timer();
        api.running = true;
        return 0;
}

void api_stop(void) {
        if (api.daemon) {
                api.stopping = true;
                ota_api_shutdown();
                /* MHD must not be stopped with suspended connections. */
                for (ApiRequest *req = api.requests; req; req = req->next) {
                        devices_call_cancel(req->call);
                        req->call = NULL;
                        if (req->sse)
                                req->ending = true;
                        else if (req->suspended && !req->response)
                                api_set_error(req, MHD_HTTP_SERVICE_UNAVAILABLE, "Shutting down", NULL);
                        api_resume(req);
                }
                (void)MHD_run(api.daemon);
                MHD_stop_daemon(api.daemon);
                api.daemon = NULL;
        }
        api.io = sd_event_source_disable_unref(api.io);
        api.timer = sd_event_source_disable_unref(api.timer);
        api.defer = sd_event_source_disable_unref(api.defer);
        api.keepalive = sd_event_source_disable_unref(api.keepalive);
}
