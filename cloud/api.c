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
/* Idle time before MHD closes a connection (event streams send a comment
 * every 10 s; suspended requests do not time out). */
#define API_CONNECTION_TIMEOUT_SEC 30
#define API_CONNECTION_LIMIT 4096 /* MHD's default is FD_SETSIZE - 4 */
/* Request bodies held at once, all connections together: past this a
 * request is answered 503 and its body is read and dropped. */
#define API_BODY_TOTAL_MAX (8 * 1024 * 1024)
#define API_DIAG_MAX 256

typedef struct ApiRequest {
        struct MHD_Connection *connection;
        struct ApiRequest *prev, *next;

        char *body;
        size_t body_len;
        bool body_too_large;
        bool body_overload; /* API_BODY_TOTAL_MAX reached while it came in */
        bool authorized;    /* token from the header or query checked and good */

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
} ApiRequest;

static struct {
        sd_event *event;
        const CloudConfig *config;
        struct MHD_Daemon *daemon;
        sd_event_source *io, *timer, *defer, *keepalive;
        ApiRequest *requests;
        size_t body_max;
        size_t body_total; /* bytes in all requests' body buffers */
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

/* A parameter as text: strings as they are (they may hold NUL bytes: check
 * *ret_len), numbers and booleans in their JSON spelling. Returns 1, 0 if
 * absent or null, -EINVAL for an array or object. buf holds the text for
 * non-strings. */
static int api_param(json_t *params, const char *key, const char **ret, size_t *ret_len, char buf[static 32]) {
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

/* A parameter that must be plain text (no NUL byte): 1, 0 if absent, -EINVAL. */
static int api_param_text(json_t *params, const char *key, const char **ret, size_t *ret_len, char buf[static 32]) {
        int r = api_param(params, key, ret, ret_len, buf);

        if (r > 0 && memchr(*ret, 0, *ret_len))
                return -EINVAL;
        return r;
}

/* The token from the Authorization header or the query string. Returns
 * true if either is present (then *ret_token is the token, or NULL if it
 * is unusable: another scheme, NUL bytes), false if the token can only be
 * in the body. */
static bool api_token_outside_body(struct MHD_Connection *connection, const char **ret_token) {
        const char *h = MHD_lookup_connection_value(connection, MHD_HEADER_KIND, MHD_HTTP_HEADER_AUTHORIZATION);
        const char *t = NULL;
        size_t n = 0;

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
        if (MHD_lookup_connection_value_n(connection, MHD_GET_ARGUMENT_KIND, "access_token",
                                          strlen("access_token"), &t, &n) == MHD_YES) {
                *ret_token = t && strlen(t) == n ? t : NULL;
                return true;
        }
        return false;
}

static const char *api_token(ApiRequest *req, json_t *params) {
        const char *t;
        json_t *v;

        if (api_token_outside_body(req->connection, &t))
                return t;
        v = params ? json_object_get(params, "access_token") : NULL;
        if (json_is_string(v) && !memchr(json_string_value(v), 0, json_string_length(v)))
                return json_string_value(v);
        return NULL;
}

/* ---- device calls --------------------------------------------------------- */

/* The device's diagnostic as a C string: cut to fit at a character
 * boundary, empty unless it is clean UTF-8 text. */
static void api_copy_diag(const uint8_t *data, size_t len, char out[static API_DIAG_MAX]) {
        out[0] = 0;
        if (!data || len == 0)
                return;
        if (len >= API_DIAG_MAX) {
                /* data[len] is the first byte left out: if it continues a
                 * character, leave out that character's first bytes too. */
                len = API_DIAG_MAX - 1;
                for (size_t k = 0; k < 3 && len > 0 && (data[len] & 0xc0) == 0x80; k++)
                        len--;
        }
        if (proto_utf8_check((const char *)data, len) < 0)
                return;
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
        else if (error == -ECONNRESET)
                api_set_errorf(req, MHD_HTTP_SERVICE_UNAVAILABLE,
                               "Device '%s' reconnected before answering; the request was lost", id);
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
                /* 5.03 is the device saying "busy, try again": pass that on. */
                api_set_error(req,
                              code == COAP_RESPONSE_CODE(503) ? MHD_HTTP_SERVICE_UNAVAILABLE : MHD_HTTP_BAD_GATEWAY,
                              diag[0] ? diag : text, diag[0] ? text : NULL);
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
        if (function) {
                r = api_param(params, "args", &arg, &arg_len, buf);
                if (r == 0)
                        r = api_param(params, "arg", &arg, &arg_len, buf);
                if (r < 0) {
                        api_set_error(req, MHD_HTTP_BAD_REQUEST, "The argument must be text, a number or a boolean",
                                      NULL);
                        return;
                }
        }
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
        else if (r == -ENOBUFS)
                api_set_errorf(req, MHD_HTTP_SERVICE_UNAVAILABLE,
                               "Device '%s' is not reading what is sent to it; try again later", device_id(d));
        else if (r == -E2BIG)
                api_set_error(req, MHD_HTTP_CONTENT_TOO_LARGE, "Request too large for the device", NULL);
        else if (r < 0)
                api_set_errorf(req, MHD_HTTP_SERVICE_UNAVAILABLE, "Failed to send the request to device '%s': %s",
                               device_id(d), strerror(-r));
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
        int r;

        r = api_param_text(params, "name", &name, &name_len, buf);
        if (r == 0) {
                api_set_error(req, MHD_HTTP_BAD_REQUEST, "Event name is required", NULL);
                return;
        }
        if (r < 0 || proto_name_check(name, name_len, PROTO_NAME_EVENT) < 0) {
                api_set_error(req, MHD_HTTP_BAD_REQUEST, "Invalid event name", NULL);
                return;
        }
        r = api_param(params, "data", &data, &data_len, buf);
        if (r < 0) {
                api_set_error(req, MHD_HTTP_BAD_REQUEST, "Event data must be text, a number or a boolean", NULL);
                return;
        }
        if (r > 0) {
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
        r = api_param_text(params, "private", &s, &len, buf);
        if (r < 0 || (r > 0 && !api_parse_bool(s, &priv))) {
                api_set_error(req, MHD_HTTP_BAD_REQUEST, "Invalid value for private", NULL);
                return;
        }
        r = api_param_text(params, "ttl", &s, &len, buf);
        if (r < 0) {
                api_set_error(req, MHD_HTTP_BAD_REQUEST, "Invalid value for ttl", NULL);
                return;
        }
        if (r > 0) {
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
        j = json_pack("{s:s?, s:I, s:s, s:s}", "data", e->data, "ttl", (json_int_t)e->ttl, "published_at",
                      e->published_at, "coreid", e->coreid);
        if (j && e->private_ && json_object_set_new(j, "private", json_true()) < 0) {
                json_decref(j);
                j = NULL;
        }
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

static void api_body_free(ApiRequest *req) {
        api.body_total -= req->body_len;
        free(req->body);
        req->body = NULL;
        req->body_len = 0;
}

static enum MHD_Result api_unauthorized(ApiRequest *req) {
        api_set_json(req, MHD_HTTP_UNAUTHORIZED,
                     json_pack("{s:b, s:s, s:s}", "ok", 0, "error", "invalid_token", "error_description",
                               "The access token was not found or is invalid"));
        return api_queue(req);
}

static enum MHD_Result api_dispatch(ApiRequest *req, const char *url, const char *method) {
        _cleanup_(json_decrefp) json_t *params = NULL;
        bool get = streq(method, MHD_HTTP_METHOD_GET) || streq(method, MHD_HTTP_METHOD_HEAD);
        bool post = streq(method, MHD_HTTP_METHOD_POST);
        const char *rest, *prefix;

        if (req->body_too_large) {
                api_set_errorf(req, MHD_HTTP_CONTENT_TOO_LARGE, "Request body larger than %zu bytes", api.body_max);
                return api_queue(req);
        }
        if (req->body_overload) {
                api_set_error(req, MHD_HTTP_SERVICE_UNAVAILABLE, "Too many requests in progress; try again", NULL);
                return api_queue(req);
        }
        if (req->body_len > 0) {
                const char *ct = MHD_lookup_connection_value(req->connection, MHD_HEADER_KIND,
                                                              MHD_HTTP_HEADER_CONTENT_TYPE);

                if (ct && strncasecmp(ct, "application/json", 16) == 0) {
                        params = json_loadb(req->body, req->body_len, JSON_REJECT_DUPLICATES, NULL);
                        if (!json_is_object(params)) {
                                if (!req->authorized && !config_token_valid(api.config, api_token(req, NULL)))
                                        return api_unauthorized(req);
                                api_set_error(req, MHD_HTTP_BAD_REQUEST, "Body is not a JSON object", NULL);
                                return api_queue(req);
                        }
                } else
                        params = api_parse_form(req->body, req->body_len);
                if (!params)
                        return MHD_NO;
                /* Parsed: a call may now wait for its device without it. */
                api_body_free(req);
        }
        if (!req->authorized && !config_token_valid(api.config, api_token(req, params)))
                return api_unauthorized(req);

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
}

static enum MHD_Result api_handler(void *cls, struct MHD_Connection *connection, const char *url,
                                   const char *method, const char *version, const char *upload_data,
                                   size_t *upload_data_size, void **con_cls) {
        ApiRequest *req = *con_cls;

        if (!req) {
                const char *cl, *token;

                req = calloc(1, sizeof(*req));
                if (!req)
                        return MHD_NO;
                req->connection = connection;
                req->next = api.requests;
                if (api.requests)
                        api.requests->prev = req;
                api.requests = req;
                *con_cls = req;
                /* A token in the header or the query is checked before a
                 * byte of the body is read; only a request whose token can
                 * only be in its body has the body buffered first. */
                if (api_token_outside_body(connection, &token)) {
                        if (!config_token_valid(api.config, token))
                                return api_unauthorized(req);
                        req->authorized = true;
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
        if (*upload_data_size > 0) {
                size_t n = *upload_data_size;

                *upload_data_size = 0;
                if (req->body_too_large || req->body_overload)
                        return MHD_YES;
                if (req->body_len + n > api.body_max) {
                        /* Keep reading, keep nothing; 413 once it is over. */
                        req->body_too_large = true;
                        api_body_free(req);
                        return MHD_YES;
                }
                if (api.body_total + n > API_BODY_TOTAL_MAX) {
                        /* Keep reading, keep nothing; 503 once it is over. */
                        if (!req->body_overload)
                                log_warning("Request bodies in progress hold %zu bytes; answering 503.", api.body_total);
                        req->body_overload = true;
                        api_body_free(req);
                        return MHD_YES;
                }
                {
                        char *b = realloc(req->body, req->body_len + n + 1);

                        if (!b)
                                return MHD_NO;
                        memcpy(b + req->body_len, upload_data, n);
                        req->body = b;
                        req->body_len += n;
                        api.body_total += n;
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
        if (req->response)
                MHD_destroy_response(req->response);
        api_body_free(req);
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
                                      MHD_OPTION_CONNECTION_LIMIT, (unsigned)API_CONNECTION_LIMIT,
                                      MHD_OPTION_PER_IP_CONNECTION_LIMIT, config->max_connections_per_ip,
                                      MHD_OPTION_END);
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
