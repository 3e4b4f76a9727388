/* SPDX-License-Identifier: Apache-2.0 */
/* The HTTP API (api.h): libmicrohttpd in external epoll mode on the
 * sd-event loop, Particle Cloud API shapes (docs/protocol.md,
 * docs/cloud.md). Requests waiting for a device and idle event streams are
 * suspended, and resumed when the answer, a timeout or an event arrives. */
#include "config.h"

#include <inttypes.h>
#include <microhttpd.h>
#include <netdb.h>
#include <stdarg.h>

#include "api-request.h"
#include "api.h"
#include "campaigns.h"
#include "cluster.h"
#include "console.h"
#include "log.h"
#include "mhd-log.h"
#include "ota-journal.h"
#include "ratelimit.h"
#include "stats.h"
#include "subscriptions.h"
#include "tunnel.h"
#include "util.h"

#define USEC_PER_SEC 1000000ULL
#define USEC_PER_MSEC 1000ULL
/* particle-api-js drops an event stream after 15 s without data. */
#define API_SSE_KEEPALIVE_USEC (10 * USEC_PER_SEC)
/* Bytes queued per live stream; past this it catches up from the journal
 * at its own pace (docs/cloud.md, "Slow subscribers"). */
#define API_SSE_QUEUE_MAX (1024 * 1024)
#define API_SSE_BLOCK 16384
/* Journal bytes a stream catching up reads in one turn, matching or not:
 * a stream that matches little does not hold the loop for the whole
 * journal (JournalMaxBytes may be 2 GiB). */
#define API_SSE_CATCH_UP_TURN (256 * 1024)
/* Connections closed for a late header, and requests answered 429, are
 * logged at most this often. */
#define API_HEADER_LOG_USEC (10 * USEC_PER_SEC)
#define API_RATE_LOG_USEC (10 * USEC_PER_SEC)
/* HTTPS: TLS 1.2 and 1.3 only (GnuTLS priority string; libmicrohttpd in
 * Debian uses GnuTLS), and how large the PEM files may be. */
#define API_TLS_PRIORITIES "NORMAL:-VERS-ALL:+VERS-TLS1.3:+VERS-TLS1.2"
#define API_PEM_MAX (1024 * 1024)
/* Client addresses (or tokens) with a bucket at once, per limit. */
#define API_RATE_KEYS_MAX 65536
/* Request bodies held at once, all connections together: past this a
 * request is answered 503 and its body is read and dropped. */
#define API_BODY_TOTAL_MAX (8 * 1024 * 1024)
#define API_DIAG_MAX 256
/* Rounds in a row that MHD may be run at once, without I/O in between,
 * before it waits a millisecond (api_update_timer()). */
#define API_BUSY_ROUNDS_MAX 64
/* Of those, how many run at the loop's usual priority (api_update_timer()). */
#define API_PROMPT_ROUNDS 4
#define API_AUDIT_TARGET_MAX 256 /* bytes of a URL or name kept in the audit log */

/* One TCP connection (MHD's socket context), alive from accept to close,
 * across the requests it carries. */
typedef struct ApiConn {
        Api *api;
        int fd;
        /* Waiting for a request's header, in one of the Api's two lists
         * (each in deadline order): the first request's (HeaderTimeoutSec
         * from accept) or a later one's on a kept-alive connection
         * (IdleTimeoutSec + HeaderTimeoutSec from the last answer). */
        struct ApiConn *prev, *next;
        int wait_list; /* -1: not waiting */
        uint64_t deadline; /* CLOCK_MONOTONIC µs */
        /* The lowest string MHD unescaped in the current request that held
         * %00 or %2F, and that escape: the path is below its arguments in
         * MHD's buffer, so the path was bad if this is the URL. Cleared by
         * api_handler() for each request (MHD answers a request it could
         * not parse itself and closes the connection). */
        const char *bad_escape_at;
        const char *bad_escape;
} ApiConn;

typedef struct ApiRequest {
        Api *api;
        struct MHD_Connection *connection;
        struct ApiRequest *prev, *next;

        char *body;
        size_t body_len;
        bool body_too_large;
        /* Bytes its body may have: the Api's body_max, or more for a
         * campaign from a token given outside the body (CAMPAIGN_BODY_MAX). */
        size_t body_limit;
        bool body_overload; /* API_BODY_TOTAL_MAX reached while it came in */
        bool authorized;    /* token from the header or query checked and good */
        TokenAuth auth;     /* who it is, once authorized */
        /* A mutating request (POST, PUT, DELETE) goes to the audit log
         * when it completes (api_audit()): what and to what. */
        const char *audit_action;
        char *audit_target;
        json_t *audit_detail;

        bool dispatched;
        bool suspended;
        struct MHD_Response *response; /* ready to queue */
        unsigned status;

        /* a call to a device */
        DeviceCall *call;
        Device *device;
        char *name;
        bool is_function;
        uint64_t call_started; /* CLOCK_MONOTONIC µs, for its latency */

        /* an event stream */
        bool sse;
        bool dropped; /* end the stream with an error */
        bool ending;  /* end the stream cleanly (shutdown, token revoked) */
        /* auth is checked again after a reload, a revocation and every
         * keep-alive (api_end_revoked_streams()). */
        char *prefix;
        char *filter_id; /* only events from this device */
        Sub *sub;        /* in the Api's streams, once the stream is open */
        char *buf;
        size_t buf_off, buf_len, buf_cap;
        /* Every event up to this journal id is queued or does not match. */
        uint64_t last_id;
        /* Replaying the journal (after Last-Event-ID, or because the
         * stream fell behind): live events are not pushed until the
         * cursor reaches the end. */
        bool catching_up;
        bool replay_started;
        bool resumed; /* catching up from a client's Last-Event-ID */
        JournalCursor cursor;

        /* A request for a device another cluster node holds, sent there. */
        ClusterForward *forward;
        bool forward_leader;        /* to the node leading the campaigns, not a device's */
        /* A request from another cluster node (no MHD connection): the
         * answer goes back through rpc (api_rpc()). */
        ClusterRpc *rpc;
        json_t *rpc_body;

        /* /v1/ota/...: handled by ota.c */
        bool ota;
        OtaRequest *ota_state;

        /* /v1/devices/ID/{tunnel,logs,tunnels}: handled by tunnel.c */
        TunnelRoute tunnel_route;
        char tunnel_device[PROTO_DEVICE_ID_MAX + 1];
        uint32_t tunnel_sid; /* DOWN and UP: the stream (0: none) */
        TunnelStream *tunnel;
} ApiRequest;

struct Api {
        sd_event *event;
        const CloudConfig *config;
        Store *store;
        Tokens *tokens;
        Registry *registry;
        Provision *provision;
        Journal *journal;
        Devices *devices;
        Events *events;
        Ota *ota;
        struct MHD_Daemon *daemon;
        sd_event_source *io, *timer, *defer, *resume, *keepalive;
        unsigned busy_rounds; /* MHD run at once in a row (api_update_timer()) */
        /* Connections waiting for a request's header (ApiConn), oldest
         * deadline first: [0] new ones, [1] kept alive after an answer. */
        ApiConn *waiting[2], *waiting_tail[2];
        sd_event_source *header_timer;
        unsigned header_closed; /* since the last log line */
        uint64_t header_logged; /* when that was */
        /* Rate limits (NULL: off): requests by address and by token, 401s
         * by address. */
        RateLimit *rate_address, *rate_token, *rate_auth_failures;
        unsigned rate_refused; /* since the last log line */
        uint64_t rate_logged;
        /* HTTPS: [API] Certificate= and Key=, read at start; MHD keeps
         * pointers to them. */
        char *cert_pem, *key_pem;
        size_t key_pem_len;
        ApiRequest *requests;
        ApiRequest *rpcs;  /* requests from other cluster nodes */
        Cluster *cluster;  /* NULL: a single node */
        Integrations *integrations; /* borrowed (api_set_integrations()) */
        Campaigns *campaigns;       /* borrowed (api_set_campaigns()) */
        Console *console;           /* NULL: [API] Console= is empty or cannot be opened */
        Tunnels *tunnels;           /* borrowed (api_set_tunnels()); NULL: none */
        SubIndex *streams; /* open event streams by prefix and device */
        size_t body_max;
        size_t body_total; /* bytes in all requests' body buffers */
        unsigned n_streams;
        bool running;
        bool stopping;
};

/* ---- loop integration --------------------------------------------------- */

static void api_update_timer(Api *api) {
        MHD_UNSIGNED_LONG_LONG ms;

        if (MHD_get_timeout(api->daemon, &ms) != MHD_YES) {
                api->busy_rounds = 0;
                (void)sd_event_source_set_enabled(api->timer, SD_EVENT_OFF);
        } else if (ms == 0 && api->busy_rounds++ < API_BUSY_ROUNDS_MAX) {
                /* MHD has work now (e.g. the next request on a kept-alive
                 * connection): a timer, even with 1 ms accuracy, adds up to
                 * a millisecond per round. */
                (void)sd_event_source_set_enabled(api->timer, SD_EVENT_OFF);
                /* The first rounds at the loop's usual priority: the
                 * answer to a call is sent in one of them, and at idle
                 * priority it would wait until nothing else is pending,
                 * which a busy tunnel or event stream makes never. Later
                 * rounds at idle priority (api_new() says why). */
                (void)sd_event_source_set_priority(api->defer, api->busy_rounds <= API_PROMPT_ROUNDS
                                                                       ? SD_EVENT_PRIORITY_NORMAL
                                                                       : SD_EVENT_PRIORITY_IDLE);
                (void)sd_event_source_set_enabled(api->defer, SD_EVENT_ONESHOT);
        } else {
                /* MHD 0.9.75 also says "now", round after round, for a TLS
                 * connection whose first record came in part (it keeps the
                 * socket marked ready after reading nothing): past
                 * API_BUSY_ROUNDS_MAX rounds without I/O, a millisecond's
                 * wait rather than a loop that takes a CPU. */
                if (ms == 0)
                        ms = 1;
                else
                        api->busy_rounds = 0;
                (void)sd_event_source_set_time_relative(api->timer, (uint64_t)ms * USEC_PER_MSEC);
                (void)sd_event_source_set_enabled(api->timer, SD_EVENT_ONESHOT);
        }
}

static void api_run(Api *api) {
        (void)MHD_run(api->daemon);
        api_update_timer(api);
}

static int api_io_cb(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        Api *api = userdata;

        api->busy_rounds = 0;
        api_run(api);
        return 0;
}

static int api_timer_cb(sd_event_source *s, uint64_t usec, void *userdata) {
        api_run(userdata);
        return 0;
}

static int api_defer_cb(sd_event_source *s, void *userdata) {
        api_run(userdata);
        return 0;
}

/* MHD must run after a resume, not only when a socket wakes it: at the
 * priority of the loop's other sources (api->resume), so that an answer
 * from a device is sent in turn while devices keep the loop busy (a wave
 * of renewals), not once nothing else is pending, as api->defer would.
 * It is enabled only by what happens elsewhere (a device answered, an
 * event), never by its own run, so it cannot hold the loop. */
static void api_schedule(Api *api) {
        (void)sd_event_source_set_enabled(api->resume, SD_EVENT_ONESHOT);
}

void api_kick(Api *api) {
        if (api && api->resume)
                api_schedule(api);
}

static void api_rpc_finish(ApiRequest *req);
static json_t *api_registry_fields(Api *api, json_t *j, bool details);

static void api_resume(ApiRequest *req) {
        if (!req->suspended)
                return;
        req->suspended = false;
        if (req->rpc) {
                api_rpc_finish(req);
                return;
        }
        MHD_resume_connection(req->connection);
        api_schedule(req->api);
}

/* ---- connections ------------------------------------------------------- */

static ApiConn *api_conn(struct MHD_Connection *connection) {
        const union MHD_ConnectionInfo *ci = MHD_get_connection_info(connection, MHD_CONNECTION_INFO_SOCKET_CONTEXT);

        return ci ? ci->socket_context : NULL;
}

static void api_header_timer_update(Api *api) {
        uint64_t next = UINT64_MAX;

        for (int k = 0; k < 2; k++)
                if (api->waiting[k] && api->waiting[k]->deadline < next)
                        next = api->waiting[k]->deadline;
        /* Closed ones not logged yet (one line per API_HEADER_LOG_USEC):
         * logged then, even when no connection waits any more. */
        if (api->header_closed > 0 && api->header_logged + API_HEADER_LOG_USEC < next)
                next = api->header_logged + API_HEADER_LOG_USEC;
        if (next == UINT64_MAX) {
                (void)sd_event_source_set_enabled(api->header_timer, SD_EVENT_OFF);
                return;
        }
        (void)sd_event_source_set_time(api->header_timer, next);
        (void)sd_event_source_set_enabled(api->header_timer, SD_EVENT_ONESHOT);
}

static void api_conn_unwait(ApiConn *conn) {
        Api *api = conn->api;
        int k = conn->wait_list;

        if (k < 0)
                return;
        if (conn->prev)
                conn->prev->next = conn->next;
        else
                api->waiting[k] = conn->next;
        if (conn->next)
                conn->next->prev = conn->prev;
        else
                api->waiting_tail[k] = conn->prev;
        conn->prev = conn->next = NULL;
        conn->wait_list = -1;
}

/* Wait for a request's header until now + timeout_sec, at the tail of list
 * k (every entry there was given the same timeout, so it stays in order). */
static void api_conn_wait(ApiConn *conn, int k, unsigned timeout_sec) {
        Api *api = conn->api;

        api_conn_unwait(conn);
        conn->deadline = now_usec() + (uint64_t)timeout_sec * USEC_PER_SEC;
        conn->wait_list = k;
        conn->prev = api->waiting_tail[k];
        if (conn->prev)
                conn->prev->next = conn;
        else
                api->waiting[k] = conn;
        api->waiting_tail[k] = conn;
        if (conn == api->waiting[k])
                api_header_timer_update(api);
}

/* A connection past its header deadline: shut its socket down, and MHD
 * closes it when it next reads (end of file). MHD's own timeout is one of
 * idleness, which a client sending a byte now and then never reaches. */
static int api_header_timer_cb(sd_event_source *s, uint64_t usec, void *userdata) {
        Api *api = userdata;
        uint64_t now = now_usec();

        for (int k = 0; k < 2; k++)
                while (api->waiting[k] && api->waiting[k]->deadline <= now) {
                        ApiConn *conn = api->waiting[k];

                        api_conn_unwait(conn);
                        (void)shutdown(conn->fd, SHUT_RDWR);
                        api->header_closed++;
                        stats_api_refused(STATS_API_HEADER_TIMEOUT);
                }
        if (api->header_closed > 0 && now - api->header_logged >= API_HEADER_LOG_USEC) {
                log_notice("Closed %u API connection(s) that sent no complete request header within "
                           "HeaderTimeoutSec=%u s.",
                           api->header_closed, api->config->header_timeout_sec);
                api->header_closed = 0;
                api->header_logged = now;
        }
        api_header_timer_update(api);
        api_schedule(api);
        return 0;
}

static void api_notify_connection(void *cls, struct MHD_Connection *connection, void **socket_context,
                                  enum MHD_ConnectionNotificationCode code) {
        Api *api = cls;
        ApiConn *conn = *socket_context;

        if (code == MHD_CONNECTION_NOTIFY_STARTED) {
                const union MHD_ConnectionInfo *ci =
                        MHD_get_connection_info(connection, MHD_CONNECTION_INFO_CONNECTION_FD);

                /* Without one (OOM) the connection works, unchecked for
                 * escapes: api_handler() then refuses its requests. */
                conn = calloc(1, sizeof(*conn));
                if (conn) {
                        conn->api = api;
                        conn->fd = ci ? ci->connect_fd : -1;
                        conn->wait_list = -1;
                        if (conn->fd >= 0)
                                api_conn_wait(conn, 0, api->config->header_timeout_sec);
                }
                *socket_context = conn;
        } else if (code == MHD_CONNECTION_NOTIFY_CLOSED) {
                if (conn)
                        api_conn_unwait(conn);
                free(conn);
                *socket_context = NULL;
        }
}

/* MHD decodes the path before the router sees it: "%2F" would become a
 * segment separator and "%00" would end the path early. MHD's own decoding
 * (MHD_http_unescape()), noting where such escapes were. */
static size_t api_unescape(void *cls, struct MHD_Connection *connection, char *s) {
        ApiConn *conn = api_conn(connection);
        const char *bad = api_bad_escape(s);

        if (conn && bad && (!conn->bad_escape_at || s < conn->bad_escape_at)) {
                conn->bad_escape_at = s;
                conn->bad_escape = bad;
        }
        return MHD_http_unescape(s);
}

/* ---- responses ----------------------------------------------------------- */

/* Takes the reference to j. Sets req->response, or leaves it NULL on OOM
 * (the connection is then closed). */
static void api_set_json(ApiRequest *req, unsigned status, json_t *j) {
        struct MHD_Response *resp;
        char *s;

        if (!j)
                return;
        if (req->rpc) {
                json_decref(req->rpc_body);
                req->rpc_body = j;
                req->status = status;
                return;
        }
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

/* The token outside the body (api_outside_token()), from the request. */
static void api_input_token(struct MHD_Connection *connection, ApiInput *in) {
        in->authorization = MHD_lookup_connection_value(connection, MHD_HEADER_KIND, MHD_HTTP_HEADER_AUTHORIZATION);
        in->query_token_present = MHD_lookup_connection_value_n(connection, MHD_GET_ARGUMENT_KIND, "access_token",
                                                                strlen("access_token"), &in->query_token,
                                                                &in->query_token_len) == MHD_YES;
}

/* Who the token in the Authorization header or the access_token query
 * parameter is (req->auth): 0, or what tokens_check() says (-ENOKEY also
 * for no token there). */
static int api_connection_authenticate(ApiRequest *req) {
        ApiInput in = {};
        const char *token;

        api_input_token(req->connection, &in);
        if (!api_outside_token(&in, &token))
                return -ENOKEY;
        return tokens_check(req->api->tokens, token, &req->auth);
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
        stats_call_done(req->is_function, error, code, req->call_started);
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

/* The checks of a call or variable read before it goes anywhere (here or
 * to another node): 0 and the argument ("" for none; it points into
 * params or buf), or -EINVAL with the answer set. */
static int api_call_check(ApiRequest *req, const char *name, bool function, json_t *params, const char **ret_arg,
                          size_t *ret_len, char buf[static 32]) {
        Api *api = req->api;
        const char *arg = "";
        size_t arg_len = 0;
        int r;

        if (proto_name_check(name, strlen(name), PROTO_NAME_FUNCTION) < 0) {
                api_set_errorf(req, MHD_HTTP_BAD_REQUEST, "Invalid %s name", function ? "function" : "variable");
                return -EINVAL;
        }
        if (function) {
                r = api_param(params, "args", &arg, &arg_len, buf);
                if (r == 0)
                        r = api_param(params, "arg", &arg, &arg_len, buf);
                if (r < 0) {
                        api_set_error(req, MHD_HTTP_BAD_REQUEST, "The argument must be text, a number or a boolean",
                                      NULL);
                        return -EINVAL;
                }
                if (r == 0) {
                        arg = "";
                        arg_len = 0;
                }
        }
        if (arg_len > api->config->max_payload) {
                api_set_errorf(req, MHD_HTTP_CONTENT_TOO_LARGE, "Argument longer than %u bytes",
                               api->config->max_payload);
                return -EINVAL;
        }
        if (proto_utf8_check(arg, arg_len) < 0) {
                api_set_error(req, MHD_HTTP_BAD_REQUEST, "Argument is not UTF-8 text", NULL);
                return -EINVAL;
        }
        *ret_arg = arg;
        *ret_len = arg_len;
        return 0;
}

static void api_device_call(ApiRequest *req, Device *d, const char *name, bool function, json_t *params) {
        const char *arg;
        size_t arg_len;
        char buf[32];
        int r;

        if (api_call_check(req, name, function, params, &arg, &arg_len, buf) < 0)
                return;
        req->name = strdup(name);
        if (!req->name)
                return;
        req->device = d;
        req->is_function = function;
        req->call_started = now_usec();
        r = devices_call(d, function ? COAP_REQUEST_CODE_POST : COAP_REQUEST_CODE_GET,
                         function ? PROTO_PATH_FUNCTION : PROTO_PATH_VARIABLE, name, arg, arg_len, api_call_done,
                         req, &req->call);
        if (r < 0)
                stats_call_done(function, r, 0, 0);
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
                if (req->connection)
                        MHD_suspend_connection(req->connection);
                req->suspended = true;
        }
}

/* ---- cluster: requests for devices on other nodes ----------------------------- */

static void api_forward_done(void *userdata, int error, unsigned status, json_t *body) {
        ApiRequest *req = userdata;
        const char *id = req->name ?: "";

        req->forward = NULL;
        if (error == 0)
                api_set_json(req, status, json_incref(body));
        else if (req->forward_leader)
                api_set_errorf(req, MHD_HTTP_SERVICE_UNAVAILABLE,
                               "Cannot reach the cluster node that leads the campaigns: %s; try again",
                               strerror(-error));
        else if (error == -ETIMEDOUT)
                api_set_errorf(req, MHD_HTTP_GATEWAY_TIMEOUT, "Timed out waiting for device '%s'", id);
        else if (error == -EHOSTUNREACH)
                api_set_errorf(req, MHD_HTTP_SERVICE_UNAVAILABLE, "Device '%s' went offline", id);
        else
                api_set_errorf(req, MHD_HTTP_SERVICE_UNAVAILABLE,
                               "Cannot reach the cluster node of device '%s': %s", id, strerror(-error));
        api_resume(req);
}

/* The device is held by node: send the request there and answer what it
 * answers (docs/cluster.md, "Requests"). */
static void api_forward(ApiRequest *req, const char *node, const char *op, const char *device, const char *name,
                        json_t *params) {
        Api *api = req->api;
        _cleanup_free_ char *arg_text = NULL;
        _cleanup_(json_decrefp) json_t *ota_params = NULL;
        const char *arg = NULL;
        size_t arg_len = 0;
        char buf[32];
        int r;

        if (streq(op, "ota")) {
                /* Only what an OTA job is made of (ota_api_start_job()):
                 * never a token that came in the body. */
                ota_params = json_object();
                if (!ota_params)
                        return;
                if (json_object_get(params, "manifest"))
                        json_object_set(ota_params, "manifest", json_object_get(params, "manifest"));
                if (json_object_get(params, "file"))
                        json_object_set_new(ota_params, "file", json_true());
        } else if (streq(op, "campaign")) {
                /* Who asked, for the audit of the campaign's events. */
                if (asprintf(&arg_text, "token:%s", req->auth.id) < 0) {
                        arg_text = NULL;
                        return;
                }
                req->forward_leader = true;
        } else if (streq(op, "call") || streq(op, "var")) {
                /* As this node would check them: the same answers. */
                if (api_call_check(req, name, streq(op, "call"), params, &arg, &arg_len, buf) < 0)
                        return;
                if (streq(op, "call") && !(arg_text = strndup(arg, arg_len)))
                        return;
        }
        /* The device's ID, for the error texts of api_forward_done(). */
        free(req->name);
        req->name = strdup(device);
        if (!req->name)
                return;
        r = cluster_forward(api->cluster, node, op, device, name, arg_text, ota_params,
                            (api->config->call_timeout_sec + 2) * USEC_PER_SEC, api_forward_done, req, &req->forward);
        if (r == -EMSGSIZE) {
                api_set_error(req, MHD_HTTP_CONTENT_TOO_LARGE, "Request too large to route to another node", NULL);
                return;
        }
        if (r < 0) {
                api_set_errorf(req, MHD_HTTP_SERVICE_UNAVAILABLE, "Cannot reach the cluster node of device '%s': %s",
                               device, strerror(-r));
                return;
        }
        MHD_suspend_connection(req->connection);
        req->suspended = true;
}

/* The live node other than this one that holds the device, or NULL. */
static const char *api_device_elsewhere(Api *api, const char *device, Device *d) {
        if (!api->cluster || (d && device_connected(d)))
                return NULL;
        return cluster_device_node(api->cluster, device);
}

static void api_rpc_finish(ApiRequest *req) {
        Api *api = req->api;

        cluster_rpc_answer(req->rpc, req->status ?: MHD_HTTP_INTERNAL_SERVER_ERROR,
                           req->rpc_body ?: json_pack("{s:b, s:s}", "ok", 0, "error", "Out of memory"));
        req->rpc_body = NULL;
        if (req->prev)
                req->prev->next = req->next;
        else
                api->rpcs = req->next;
        if (req->next)
                req->next->prev = req->prev;
        devices_call_cancel(req->call);
        free(req->name);
        free(req);
}

void api_rpc(Api *api, ClusterRpc *rpc, const char *op, const char *device, const char *name, const char *arg,
             json_t *params) {
        json_t *call_params;
        ApiRequest *req;
        Device *d;

        req = calloc(1, sizeof(*req));
        if (!req) {
                cluster_rpc_answer(rpc, MHD_HTTP_SERVICE_UNAVAILABLE, json_pack("{s:b, s:s}", "ok", 0, "error",
                                                                               "Out of memory; try again"));
                return;
        }
        req->api = api;
        req->rpc = rpc;
        req->next = api->rpcs;
        if (api->rpcs)
                api->rpcs->prev = req;
        api->rpcs = req;
        d = devices_find(api->devices, device);
        if (streq(op, "campaign")) {
                /* An action another node was asked for: this node leads
                 * (campaigns_api_action() answers 503 if no longer). */
                json_t *body = NULL;
                unsigned status = api->campaigns ? campaigns_api_action(api->campaigns, device, name ?: "",
                                                                        arg ?: "cluster", &body)
                                                 : MHD_HTTP_SERVICE_UNAVAILABLE;

                api_set_json(req, status, body);
        } else if (streq(op, "ota") && d) {
                /* As PUT /v1/devices/ID here: ota_api_start_job() answers
                 * for a device that left this node meanwhile too. */
                json_t *body = NULL;
                unsigned status = ota_api_start_job(api->ota, d, params, &body);

                api_set_json(req, status, body);
        } else if (!d)
                api_set_error(req, MHD_HTTP_NOT_FOUND, "Device not found", NULL);
        else if (streq(op, "device"))
                /* What this node knows of it, online here or not: as a
                 * GET /v1/devices/ID here would answer. */
                api_set_json(req, MHD_HTTP_OK, api_registry_fields(api, device_to_json(d, true), true));
        else if (!device_connected(d))
                /* It left this node since the other one looked. */
                api_set_errorf(req, MHD_HTTP_SERVICE_UNAVAILABLE, "Device '%s' is offline", device);
        else if (!name)
                api_set_error(req, MHD_HTTP_BAD_REQUEST, "Malformed cluster request", NULL);
        else {
                call_params = json_pack("{s:s?}", "arg", arg);
                api_device_call(req, d, name, streq(op, "call"), call_params);
                json_decref(call_params);
        }
        if (!req->suspended) {
                req->suspended = true;
                api_resume(req);
        }
}

void api_set_cluster(Api *api, Cluster *cluster) { api->cluster = cluster; }

void api_set_integrations(Api *api, Integrations *integrations) { api->integrations = integrations; }

void api_set_campaigns(Api *api, Campaigns *campaigns) { api->campaigns = campaigns; }

void api_set_tunnels(Api *api, Tunnels *tunnels) { api->tunnels = tunnels; }

/* ---- publish ----------------------------------------------------------------- */

static void api_publish(ApiRequest *req, json_t *params) {
        Api *api = req->api;
        _cleanup_free_ char *data = NULL;
        char published_at[32];
        const char *error;
        unsigned status;
        ApiPublish in;
        ProtoEvent e;
        int r;

        /* An event from the API goes to every subscribed device: a token
         * restricted to some may not publish (docs/cloud.md). */
        if (tokens_restricted(&req->auth)) {
                api_set_json(req, MHD_HTTP_FORBIDDEN,
                             json_pack("{s:b, s:s, s:s}", "ok", 0, "error", "insufficient_scope", "error_description",
                                       "A token restricted to devices or tags may not publish events"));
                return;
        }
        if (api_parse_publish(params, api->config->max_payload, &in, &status, &error) < 0) {
                if (status == MHD_HTTP_CONTENT_TOO_LARGE)
                        api_set_errorf(req, status, "Event data longer than %u bytes", api->config->max_payload);
                else
                        api_set_error(req, status, error, NULL);
                return;
        }
        if (in.data && !(data = strndup(in.data, in.data_len)))
                return;
        proto_timestamp_now(published_at);
        e = (ProtoEvent){
                .name = in.name,
                .data = data,
                .ttl = in.ttl,
                .private_ = in.private_,
                .published_at = published_at,
                .coreid = (char *)"api",
        };
        r = events_store(api->events, &e, NULL, 0, 0, NULL);
        if (r < 0) {
                log_warning_errno(r, "Failed to store an event from the API: %m");
                stats_event_dropped(STATS_DROPPED_STORE_FAILED);
                api_set_errorf(req, MHD_HTTP_SERVICE_UNAVAILABLE, "Cannot store the event now: %s", strerror(-r));
                return;
        }
        stats_event_in(STATS_FROM_API);
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

static void api_sse_catch_up(ApiRequest *req);

static ssize_t api_sse_reader(void *cls, uint64_t pos, char *buf, size_t max) {
        ApiRequest *req = cls;
        size_t n = req->buf_len - req->buf_off;

        if (req->dropped)
                return MHD_CONTENT_READER_END_WITH_ERROR;
        if (n == 0 && req->catching_up) {
                api_sse_catch_up(req);
                if (req->dropped)
                        return MHD_CONTENT_READER_END_WITH_ERROR;
                n = req->buf_len - req->buf_off;
                if (n == 0 && req->catching_up && !req->api->stopping) {
                        /* Its turn read nothing it wants: the other sources
                         * of the loop go first, then the next turn (MHD
                         * runs again from the defer source). */
                        MHD_suspend_connection(req->connection);
                        req->suspended = true;
                        api_resume(req);
                        return 0;
                }
        }
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

static void api_sse_client(ApiRequest *req, char host[static NI_MAXHOST]) {
        const union MHD_ConnectionInfo *ci =
                MHD_get_connection_info(req->connection, MHD_CONNECTION_INFO_CLIENT_ADDRESS);

        strcpy(host, "?");
        if (ci && ci->client_addr)
                (void)getnameinfo(ci->client_addr,
                                  ci->client_addr->sa_family == AF_INET6 ? sizeof(struct sockaddr_in6)
                                                                         : sizeof(struct sockaddr_in),
                                  host, NI_MAXHOST, NULL, 0, NI_NUMERICHOST);
}

/* Queue a comment (keep-alive) for the stream. */
static void api_sse_push(ApiRequest *req, const char *s, size_t n) {
        if (req->dropped)
                return;
        if (api_sse_append(req, s, n) < 0)
                req->dropped = true;
        api_resume(req);
}

/* Queue event id (msg, n bytes) for a live stream. A stream that has not
 * read API_SSE_QUEUE_MAX bytes already gets nothing more queued: it
 * catches up from the journal after the last event it was given, as fast
 * as it reads, and then goes live again. */
static bool api_sse_push_event(ApiRequest *req, const char *msg, size_t n, uint64_t id) {
        Api *api = req->api;
        char host[NI_MAXHOST];
        bool queued = false;

        if (req->dropped)
                return false;
        if (req->buf_len - req->buf_off + n > API_SSE_QUEUE_MAX) {
                /* Events come in id order, and every one since last_id
                 * that matched was queued: those before this one did not
                 * match. Reading from last_id would count them as lost if
                 * the journal dropped them meanwhile. */
                req->last_id = id - 1;
                api_sse_client(req, host);
                log_notice("Event stream client %s fell more than %u bytes behind: it reads from the event "
                           "journal after id %" PRIu64 " until it catches up.",
                           host, API_SSE_QUEUE_MAX, req->last_id);
                journal_cursor_init(&req->cursor, api->journal, req->last_id);
                req->catching_up = true;
                req->replay_started = false;
                req->resumed = false;
        } else if (api_sse_append(req, msg, n) < 0) {
                api_sse_client(req, host);
                log_warning("Out of memory for event stream client %s, dropping it.", host);
                req->dropped = true;
        } else {
                req->last_id = id;
                queued = true;
        }
        api_resume(req);
        return queued;
}

/* Whether a restricted token's stream may carry e: an event of a device
 * it reaches now (its tags as they are: a device whose tags changed since
 * the stream opened is judged by its new ones), never one from the API
 * (coreid "api", which is no device ID). dev is e's device, its tags read
 * once for all the streams e goes to. */
static bool api_sse_reaches(ApiRequest *req, const ProtoEvent *e, TokenDevice *dev) {
        if (!tokens_restricted(&req->auth))
                return true;
        if (!e->coreid || streq(e->coreid, "api"))
                return false;
        return tokens_may_reach_device(req->api->tokens, &req->auth, dev);
}

static bool api_sse_matches(ApiRequest *req, const ProtoEvent *e) {
        TokenDevice dev = { .id = e->coreid };
        bool r;

        if (!proto_prefix_match(req->prefix, e->name))
                return false;
        if (req->filter_id && !(e->coreid && streq(req->filter_id, e->coreid) && !streq(e->coreid, "api")))
                return false;
        r = api_sse_reaches(req, e, &dev);
        token_device_done(&dev);
        return r;
}

/* One SSE message; the id lets a client resume (Last-Event-ID). */
static int api_sse_format(Api *api, const ProtoEvent *e, uint64_t id, char **ret) {
        _cleanup_free_ char *json = NULL;
        json_t *j;
        int n;

        /* Particle's shape, plus received_at (docs/protocol.md, "Event time"). */
        j = json_pack("{s:s?, s:I, s:s?, s:s?, s:s?}", "data", e->data, "ttl", (json_int_t)e->ttl,
                      "published_at", e->published_at, "coreid", e->coreid, "received_at",
                      e->received_at ?: e->published_at);
        if (j && e->private_ && json_object_set_new(j, "private", json_true()) < 0) {
                json_decref(j);
                j = NULL;
        }
        if (!j)
                return -ENOMEM;
        json = json_dumps(j, JSON_COMPACT);
        json_decref(j);
        if (!json)
                return -ENOMEM;
        n = asprintf(ret, "id: %016" PRIx64 "-%" PRIu64 "\nevent: %s\ndata: %s\n\n", journal_epoch(api->journal), id,
                     e->name, json);
        return n < 0 ? -ENOMEM : n;
}

/* The explicit notice that events this stream should have had are gone
 * from the journal: how many, and the id of the first one still there
 * (docs/cloud.md, "Slow subscribers"). No id: line, so a client's
 * Last-Event-ID stays at the last event it got. */
static int api_sse_lost(ApiRequest *req, uint64_t lost, uint64_t first_id) {
        Api *api = req->api;
        char msg[160];
        int n = snprintf(msg, sizeof(msg),
                         "event: tether/stream/lost\ndata: {\"lost\":%" PRIu64 ",\"first_id\":\"%016" PRIx64
                         "-%" PRIu64 "\"}\n\n",
                         lost, journal_epoch(api->journal), first_id);

        return api_sse_append(req, msg, (size_t)n);
}

/* Fill the stream's buffer from the journal, reading at most about
 * API_SSE_CATCH_UP_TURN bytes of it; at its end, go live. */
static void api_sse_catch_up(ApiRequest *req) {
        Api *api = req->api;
        uint64_t read = 0;

        while (req->catching_up && req->buf_len - req->buf_off < API_SSE_BLOCK && read < API_SSE_CATCH_UP_TURN) {
                _cleanup_free_ char *msg = NULL;
                uint64_t want = req->cursor.last_id + 1, id;
                uint64_t generation = req->cursor.generation, offset = req->cursor.offset;
                ProtoEvent e;
                int n, r;

                r = journal_cursor_next(&req->cursor, &e, &id);
                /* After a seek (a new cursor, a rewrite) the offset moved
                 * by the seek, not by reading: count a record then. */
                read += req->cursor.generation == generation && req->cursor.offset > offset
                                ? req->cursor.offset - offset
                                : 1;
                if (r <= 0) {
                        if (r < 0)
                                log_warning_errno(r, "Failed to read the event journal for a stream: %m");
                        req->last_id = req->cursor.last_id;
                        req->catching_up = false;
                        journal_cursor_done(&req->cursor);
                        return;
                }
                /* Ids grow by one per event: a gap is events the journal
                 * dropped (JournalMaxBytes) before this stream read them. */
                if (id > want) {
                        if (!req->replay_started && req->resumed) {
                                char note[96];
                                int k = snprintf(note, sizeof(note),
                                                 ":%" PRIu64 " event(s) before this are no longer in the journal\n\n",
                                                 id - want);

                                if (api_sse_append(req, note, (size_t)k) < 0)
                                        req->dropped = true;
                        }
                        if (api_sse_lost(req, id - want, id) < 0)
                                req->dropped = true;
                        stats_event_dropped(STATS_DROPPED_STREAM_BEHIND);
                }
                req->replay_started = true;
                n = api_sse_matches(req, &e) ? api_sse_format(api, &e, id, &msg) : 0;
                proto_event_done(&e);
                if (n > 0 && api_sse_append(req, msg, (size_t)n) < 0)
                        req->dropped = true;
                else if (n > 0)
                        stats_event_out(STATS_TO_STREAM);
        }
}

typedef struct ApiDelivery {
        Api *api;
        const ProtoEvent *e;
        uint64_t id;
        char *msg; /* formatted once, for the first stream */
        int n;
        TokenDevice dev; /* its device's tags, read once */
} ApiDelivery;

static bool api_deliver_one(Sub *sub, void *userdata, void *ctx) {
        ApiDelivery *dl = ctx;
        ApiRequest *req = userdata;

        if (req->ending || req->catching_up)
                return true;
        if (!api_sse_reaches(req, dl->e, &dl->dev))
                return true;
        if (!dl->msg && (dl->n = api_sse_format(dl->api, dl->e, dl->id, &dl->msg)) < 0) {
                dl->msg = NULL;
                return false;
        }
        if (api_sse_push_event(req, dl->msg, (size_t)dl->n, dl->id))
                stats_event_out(STATS_TO_STREAM);
        return true;
}

void api_deliver_event(Api *api, const ProtoEvent *e, uint64_t id) {
        ApiDelivery dl = { .api = api, .e = e, .id = id, .dev = { .id = e->coreid } };

        if (!api || !api->streams)
                return;
        /* The streams whose prefix matches, unfiltered or filtered on the
         * publishing device (API events have no device). */
        (void)sub_index_match(api->streams, e->coreid && !streq(e->coreid, "api") ? e->coreid : NULL, e->name,
                              api_deliver_one, &dl);
        free(dl.msg);
        token_device_done(&dl.dev);
}

unsigned api_end_revoked_streams(Api *api) {
        unsigned n = tunnels_end_revoked(api->tunnels, api->tokens);

        for (ApiRequest *req = api->requests; req; req = req->next) {
                if (!req->sse || req->ending || req->dropped || tokens_recheck(api->tokens, &req->auth) == 0)
                        continue;
                /* What is queued already goes out, then the end of the
                 * stream; nothing new is queued (api_deliver_event()). */
                req->ending = true;
                if (req->catching_up) {
                        req->catching_up = false;
                        journal_cursor_done(&req->cursor);
                }
                api_resume(req);
                n++;
        }
        return n;
}

void api_token_changed(Api *api, const char *id) {
        unsigned n;
        int r;

        r = tokens_refresh(api->tokens, id);
        if (r < 0)
                log_warning_errno(r, "Cannot read the API token '%s' another node changed: %m", id);
        n = api_end_revoked_streams(api);
        if (n > 0)
                log_info("Closed %u event stream(s) whose token was revoked on another node.", n);
}

static int api_keepalive_cb(sd_event_source *s, uint64_t usec, void *userdata) {
        Api *api = userdata;
        unsigned n;

        /* A token that expired since the last round ends its streams. */
        n = api_end_revoked_streams(api);
        if (n > 0)
                log_info("Closed %u event stream(s) whose token expired.", n);
        for (ApiRequest *req = api->requests; req; req = req->next)
                if (req->sse && !req->ending && req->buf_len == req->buf_off)
                        api_sse_push(req, ":\n\n", 3);
        (void)sd_event_source_set_time_relative(s, API_SSE_KEEPALIVE_USEC);
        return 0;
}

static enum MHD_Result api_too_many(ApiRequest *req, StatsApiRefused reason, uint64_t wait_usec, const char *what);

static enum MHD_Result api_stream(ApiRequest *req, const ApiParsed *p) {
        Api *api = req->api;
        const char *prefix = p->prefix, *device = p->stream_device ? p->device : NULL;
        struct MHD_Response *resp;
        enum MHD_Result ret;

        if (proto_name_check(prefix, strlen(prefix), PROTO_NAME_PREFIX) < 0) {
                api_set_error(req, MHD_HTTP_BAD_REQUEST, "Invalid event prefix", NULL);
                return api_queue(req);
        }
        /* One token cannot hold every connection with streams opened from
         * many addresses. A scan, but only when a stream opens. */
        if (api->config->max_streams_per_token > 0) {
                unsigned open = 0;

                for (ApiRequest *r = api->requests; r; r = r->next)
                        if (r->sse && !r->ending && !r->dropped && streq(r->auth.id, req->auth.id))
                                open++;
                if (open >= api->config->max_streams_per_token) {
                        char what[128];

                        snprintf(what, sizeof(what), "Too many event streams open with this token (MaxStreamsPerToken=%u)",
                                 api->config->max_streams_per_token);
                        return api_too_many(req, STATS_API_STREAMS_TOKEN, API_SSE_KEEPALIVE_USEC, what);
                }
        }
        req->prefix = strdup(prefix);
        if (!req->prefix || (device && !(req->filter_id = strdup(device))))
                return MHD_NO;
        if (api_sse_append(req, ":ok\n\n", 5) < 0)
                return MHD_NO;
        /* An id past the journal's last one was never given: it is no
         * place in the journal (a cursor would read it all for nothing). */
        if (p->has_last_event_id && p->last_epoch == journal_epoch(api->journal) &&
            p->last_id <= journal_last_id(api->journal)) {
                journal_cursor_init(&req->cursor, api->journal, p->last_id);
                req->catching_up = true;
                req->resumed = true;
        } else {
                _cleanup_free_ char *here = NULL;
                const char *note = "";
                int n;

                /* An id without data moves the client's Last-Event-ID to
                 * "now" (WHATWG SSE dispatch): if this stream breaks before
                 * the first event, a reconnect still misses nothing. */
                if (p->has_last_event_id)
                        note = p->last_epoch != journal_epoch(api->journal)
                                       ? ":Last-Event-ID is from another journal\n"
                                       : ":Last-Event-ID is past the end of the journal\n";
                n = asprintf(&here, "%sid: %016" PRIx64 "-%" PRIu64 "\n\n", note,
                             journal_epoch(api->journal), journal_last_id(api->journal));
                if (n < 0 || api_sse_append(req, here, (size_t)n) < 0)
                        return MHD_NO;
                req->last_id = journal_last_id(api->journal);
        }
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
                api->n_streams++;
                stats_stream_opened(1);
                if (sub_index_add(api->streams, req, req->filter_id, req->prefix, req, &req->sub) < 0)
                        return MHD_NO;
        }
        return ret;
}

/* ---- rate limits ------------------------------------------------------------ */

/* The key a client address is limited by: an IPv4 address (also when
 * mapped into IPv6), or an IPv6 address's /64, what one host usually has
 * to itself. 0 if there is no address (a Unix socket). */
static size_t api_address_key(struct MHD_Connection *connection, uint8_t key[static 16]) {
        const union MHD_ConnectionInfo *ci = MHD_get_connection_info(connection, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
        const struct sockaddr *sa = ci ? ci->client_addr : NULL;

        if (sa && sa->sa_family == AF_INET) {
                memcpy(key, &((const struct sockaddr_in *)sa)->sin_addr, 4);
                return 4;
        }
        if (sa && sa->sa_family == AF_INET6) {
                const struct in6_addr *a = &((const struct sockaddr_in6 *)sa)->sin6_addr;

                if (IN6_IS_ADDR_V4MAPPED(a)) {
                        memcpy(key, a->s6_addr + 12, 4);
                        return 4;
                }
                memcpy(key, a->s6_addr, 8);
                return 8;
        }
        return 0;
}

/* Answer 429 with Retry-After (whole seconds, at least 1) and count it. */
static enum MHD_Result api_too_many(ApiRequest *req, StatsApiRefused reason, uint64_t wait_usec, const char *what) {
        Api *api = req->api;
        uint64_t sec = (wait_usec + USEC_PER_SEC - 1) / USEC_PER_SEC, now = now_usec();
        char retry[24];

        if (sec == 0)
                sec = 1;
        stats_api_refused(reason);
        api->rate_refused++;
        if (now - api->rate_logged >= API_RATE_LOG_USEC) {
                char host[NI_MAXHOST];

                api_sse_client(req, host);
                log_notice("Answered %u API request(s) 429 Too Many Requests (rate limits in [API]); the last: %s "
                           "from %s.",
                           api->rate_refused, what, host);
                api->rate_refused = 0;
                api->rate_logged = now;
        }
        api_set_json(req, MHD_HTTP_TOO_MANY_REQUESTS,
                     json_pack("{s:b, s:s, s:s, s:I}", "ok", 0, "error", "rate_limited", "error_description", what,
                               "retry_after", (json_int_t)sec));
        if (!req->response)
                return MHD_NO;
        snprintf(retry, sizeof(retry), "%" PRIu64, sec);
        (void)MHD_add_response_header(req->response, MHD_HTTP_HEADER_RETRY_AFTER, retry);
        return api_queue(req);
}

/* The limits a request meets before anything else: its address's bucket
 * (every request) and, for a valid token in the header or query, the
 * token's bucket. MHD_YES to go on (*ret_done false), else the answer is
 * queued and *ret_done is true. */
static enum MHD_Result api_rate_limit(ApiRequest *req, bool *ret_done) {
        Api *api = req->api;
        uint8_t key[16], digest[CONFIG_TOKEN_DIGEST_SIZE];
        size_t len = api_address_key(req->connection, key);
        uint64_t now = now_usec(), wait;
        const char *token;
        ApiInput in = {};

        *ret_done = true;
        if (len > 0 && api->rate_address && (wait = ratelimit_take(api->rate_address, key, len, now)) > 0)
                return api_too_many(req, STATS_API_RATE_ADDRESS, wait, "Too many requests from this address");
        /* By the token's digest, before it is looked up: a wrong token
         * has a bucket too, but AuthFailuresPerAddress stops it first. */
        api_input_token(req->connection, &in);
        if (api->rate_token && api_outside_token(&in, &token) && cloud_config_token_digest(token, digest) == 0 &&
            (wait = ratelimit_take(api->rate_token, digest, sizeof(digest), now)) > 0)
                return api_too_many(req, STATS_API_RATE_TOKEN, wait, "Too many requests with this token");
        *ret_done = false;
        return MHD_YES;
}

/* A token that could only be in the body, found good (req->auth): its
 * bucket. True if the request is answered 429 (*ret). */
static bool api_rate_limit_body_token(ApiRequest *req, enum MHD_Result *ret) {
        Api *api = req->api;
        uint64_t wait;

        if (!api->rate_token ||
            (wait = ratelimit_take(api->rate_token, req->auth.digest, sizeof(req->auth.digest), now_usec())) == 0)
                return false;
        *ret = api_too_many(req, STATS_API_RATE_TOKEN, wait, "Too many requests with this token");
        return true;
}

/* A request about to be answered 401: one from its address's 401 bucket.
 * 0, or the µs until the bucket has one again (answer 429 instead). */
static uint64_t api_rate_auth_failed(ApiRequest *req) {
        Api *api = req->api;
        uint8_t key[16];
        size_t len;

        if (!api->rate_auth_failures)
                return 0;
        len = api_address_key(req->connection, key);
        return len > 0 ? ratelimit_take(api->rate_auth_failures, key, len, now_usec()) : 0;
}

/* ---- routing --------------------------------------------------------------------- */

static void api_body_free(ApiRequest *req) {
        Api *api = req->api;

        api->body_total -= req->body_len;
        free(req->body);
        req->body = NULL;
        req->body_len = 0;
}

/* 401 for what tokens_check() said (r), or 429 once the address is past
 * AuthFailuresPerAddress. */
static enum MHD_Result api_unauthorized(ApiRequest *req, int r) {
        uint64_t wait;

        /* Past AuthFailuresPerAddress, 429: guessing tokens is slowed
         * down, valid tokens from the same address are not. */
        wait = api_rate_auth_failed(req);
        if (wait > 0)
                return api_too_many(req, STATS_API_RATE_AUTH, wait,
                                    "Too many requests with a missing or invalid token from this address");
        api_set_json(req, MHD_HTTP_UNAUTHORIZED,
                     json_pack("{s:b, s:s, s:s}", "ok", 0, "error", "invalid_token", "error_description",
                               r == -EKEYEXPIRED   ? "The access token has expired"
                               : r == -EKEYREVOKED ? "The access token has been revoked"
                                                   : "The access token was not found or is invalid"));
        return api_queue(req);
}

/* Sets a 403 and returns false unless the request's token holds need. */
static bool api_allowed(ApiRequest *req, unsigned need) {
        char text[96];

        if (scope_allows(req->auth.scopes, need))
                return true;
        snprintf(text, sizeof(text), "This access token lacks the scope '%s'", scope_name(need));
        api_set_json(req, MHD_HTTP_FORBIDDEN,
                     json_pack("{s:b, s:s, s:s, s:s}", "ok", 0, "error", "insufficient_scope", "error_description",
                               text, "scope", scope_name(need)));
        return false;
}

/* Sets a 403 and returns false unless the request's token may reach the
 * device. Before looking the device up (but for its tags, which an
 * unknown device does not have): the answer says nothing of whether it
 * exists. A registry that cannot be read reaches no device by its tags. */
static bool api_may_reach(ApiRequest *req, const char *device) {
        if (tokens_may_reach(req->api->tokens, &req->auth, device))
                return true;
        api_set_json(req, MHD_HTTP_FORBIDDEN,
                     json_pack("{s:b, s:s, s:s}", "ok", 0, "error", "insufficient_scope", "error_description",
                               "This access token is restricted to other devices"));
        return false;
}

static bool api_mutating(const char *method) {
        return !streq(method, MHD_HTTP_METHOD_GET) && !streq(method, MHD_HTTP_METHOD_HEAD) &&
               !streq(method, MHD_HTTP_METHOD_OPTIONS);
}

/* Note an authorized mutating request for the audit log: action (static),
 * target (copied, cut to API_AUDIT_TARGET_MAX bytes; may be NULL), detail
 * (taken; may be NULL). Written with its status when it completes. */
/* The first len bytes of target, clean UTF-8, with every control
 * character (C0, DEL, C1) written as its UTF-8 bytes in %XX escapes, as in
 * a URL: a client chooses the target (the URL, a name in the body), and
 * "tether audit" prints it as it is, so a newline would make a record of
 * its own and an escape sequence would reach the operator's terminal. */
static char *api_audit_text(const char *target, size_t len) {
        char *out = malloc(len * 3 + 1), *o = out;

        if (!out)
                return NULL;
        for (size_t i = 0; i < len; i++) {
                unsigned char c = (unsigned char)target[i];
                bool c1 = c == 0xc2 && i + 1 < len && (unsigned char)target[i + 1] >= 0x80 &&
                          (unsigned char)target[i + 1] <= 0x9f;

                if (c < 0x20 || c == 0x7f || c1) {
                        o += sprintf(o, "%%%02X", c);
                        if (c1)
                                o += sprintf(o, "%%%02X", (unsigned char)target[++i]);
                } else
                        *o++ = (char)c;
        }
        *o = 0;
        return out;
}

static void api_audit_begin(ApiRequest *req, const char *action, const char *target, json_t *detail) {
        size_t len = target ? strlen(target) : 0;

        req->audit_action = action;
        free(req->audit_target);
        /* Clean UTF-8 or nothing: the log is read back as JSON. A URL or a
         * form field may hold any bytes. */
        if (len > API_AUDIT_TARGET_MAX) {
                len = API_AUDIT_TARGET_MAX;
                for (size_t k = 0; k < 3 && len > 0 && ((unsigned char)target[len] & 0xc0) == 0x80; k++)
                        len--;
        }
        req->audit_target = !target                                 ? NULL
                             : proto_utf8_check(target, len) == 0 ? api_audit_text(target, len)
                                                                    : strdup("(not UTF-8)");
        json_decref(req->audit_detail);
        req->audit_detail = detail;
}

/* The audit record of a request noted by api_audit_begin(), with the
 * status it was answered (0: none, the connection ended first). */
static void api_audit(ApiRequest *req) {
        const union MHD_ConnectionInfo *ci = MHD_get_connection_info(req->connection, MHD_CONNECTION_INFO_HTTP_STATUS);
        unsigned status = ci ? ci->http_status : 0;
        char actor[TOKENS_ID_MAX + 8], host[NI_MAXHOST];
        json_t *detail = req->audit_detail ?: json_object();

        req->audit_detail = NULL;
        snprintf(actor, sizeof(actor), "token:%s", req->auth.id);
        api_sse_client(req, host);
        if (detail)
                (void)json_object_set_new(detail, "status", json_integer(status));
        (void)store_audit(req->api->store, actor, req->audit_action, req->audit_target, detail, host);
        json_decref(detail);
        req->audit_action = NULL;
}

/* A query parameter: NULL when absent, "" when it has no value or one
 * with a NUL byte (never valid where this is used). */
static const char *api_query_arg(ApiRequest *req, const char *key) {
        const char *v = NULL;
        size_t n = 0;

        if (MHD_lookup_connection_value_n(req->connection, MHD_GET_ARGUMENT_KIND, key, strlen(key), &v, &n) != MHD_YES)
                return NULL;
        return v && strlen(v) == n ? v : "";
}

/* Whether PUT /v1/devices/ID params ask for an OTA job (the compatible
 * form of POST /v1/ota/jobs) rather than name, notes or tags. */
static bool api_update_is_ota(json_t *params) {
        return params && (json_object_get(params, "manifest") || json_object_get(params, "file"));
}

/* The filters of GET /v1/devices, from every query argument. */
typedef struct ApiFilterArgs {
        InventoryFilter f;
        bool failed;
        char err[INVENTORY_ERROR_MAX];
} ApiFilterArgs;

static enum MHD_Result api_filter_arg(void *cls, enum MHD_ValueKind kind, const char *key, size_t key_size,
                                     const char *value, size_t value_size) {
        ApiFilterArgs *fa = cls;

        (void)kind;
        if (!key || fa->failed || strlen(key) != key_size)
                return MHD_YES;
        /* A value holding a NUL byte is no filter's: "" is refused. */
        if (inventory_filter_add(&fa->f, key, value && strlen(value) != value_size ? "" : value, fa->err) < 0)
                fa->failed = true;
        return MHD_YES;
}

/* What a mutating request is, for the audit log. */
static void api_audit_route(ApiRequest *req, const ApiParsed *p, const char *url, const char *method) {
        json_t *name = p->params ? json_object_get(p->params, "name") : NULL;

        switch (p->route) {
        case API_ROUTE_CALL:
                api_audit_begin(req, "device.call", p->device, json_pack("{s:s}", "function", p->name));
                break;
        case API_ROUTE_UPDATE:
                /* device.update: its detail (the changed fields) once known. */
                api_audit_begin(req, api_update_is_ota(p->params) ? "ota.job" : "device.update", p->device, NULL);
                break;
        case API_ROUTE_OTA_JOB: {
                json_t *device = p->params ? json_object_get(p->params, "device") : NULL;

                api_audit_begin(req, "ota.job", json_is_string(device) ? json_string_value(device) : NULL, NULL);
                break;
        }
        case API_ROUTE_PUBLISH:
                api_audit_begin(req, "event.publish", json_is_string(name) ? json_string_value(name) : NULL, NULL);
                break;
        case API_ROUTE_TOKENS:
                api_audit_begin(req, "token.create", NULL, NULL);
                break;
        case API_ROUTE_TOKEN:
                api_audit_begin(req, "token.revoke", p->name, NULL);
                break;
        case API_ROUTE_REGISTER: {
                json_t *id = p->params ? json_object_get(p->params, "id") : NULL;

                api_audit_begin(req, "device.register", json_is_string(id) ? json_string_value(id) : NULL, NULL);
                break;
        }
        case API_ROUTE_REVOKE: {
                json_t *reason = p->params ? json_object_get(p->params, "reason") : NULL;

                api_audit_begin(req, "device.revoke", p->device,
                                json_is_string(reason) && proto_utf8_check(json_string_value(reason),
                                                                           json_string_length(reason)) == 0
                                        ? json_pack("{s:O}", "reason", reason)
                                        : NULL);
                break;
        }
        case API_ROUTE_UNREVOKE:
                api_audit_begin(req, "device.unrevoke", p->device, NULL);
                break;
        case API_ROUTE_PROVISIONS:
        case API_ROUTE_PROVISION:
                /* Another method (405) creates or revokes nothing. */
                if (p->route == API_ROUTE_PROVISIONS && streq(method, MHD_HTTP_METHOD_POST))
                        api_audit_begin(req, "provision.create", NULL, NULL);
                else if (p->route == API_ROUTE_PROVISION && streq(method, MHD_HTTP_METHOD_DELETE))
                        api_audit_begin(req, "provision.revoke", p->name, NULL);
                else
                        api_audit_begin(req, "api.request", url, json_pack("{s:s}", "method", method));
                break;
        case API_ROUTE_WEBHOOKS:
        case API_ROUTE_WEBHOOK:
                /* The name, once known (a created one may be generated). */
                if (p->route == API_ROUTE_WEBHOOKS && streq(method, MHD_HTTP_METHOD_POST))
                        api_audit_begin(req, "webhook.create", NULL, NULL);
                else if (p->route == API_ROUTE_WEBHOOK && streq(method, MHD_HTTP_METHOD_DELETE))
                        api_audit_begin(req, "webhook.delete", p->name, NULL);
                else
                        api_audit_begin(req, "api.request", url, json_pack("{s:s}", "method", method));
                break;
        case API_ROUTE_CAMPAIGNS:
        case API_ROUTE_CAMPAIGN:
                /* The id once known (api_campaigns()). */
                if (p->route == API_ROUTE_CAMPAIGNS && streq(method, MHD_HTTP_METHOD_POST))
                        api_audit_begin(req, "campaign.create", NULL, NULL);
                else if (p->route == API_ROUTE_CAMPAIGN && p->sub && streq(method, MHD_HTTP_METHOD_POST) &&
                         (streq(p->sub, "pause") || streq(p->sub, "resume") || streq(p->sub, "abort")))
                        api_audit_begin(req, streq(p->sub, "pause")    ? "campaign.pause"
                                             : streq(p->sub, "resume") ? "campaign.resume"
                                                                       : "campaign.abort",
                                        NULL, NULL);
                else
                        api_audit_begin(req, "api.request", url, json_pack("{s:s}", "method", method));
                break;
        case API_ROUTE_NOT_FOUND:
        case API_ROUTE_DEVICE_BAD_METHOD:
        case API_ROUTE_NO_DEVICE:
                /* Matched nothing, so changed nothing: not audited, or any
                 * token could fill the log with made-up paths. */
                break;
        default:
                api_audit_begin(req, "api.request", url, json_pack("{s:s}", "method", method));
                break;
        }
}

/* /v1/tokens[/ID] and /v1/audit (admin, checked). */
static void api_admin(ApiRequest *req, const ApiParsed *p, const char *method) {
        bool get = streq(method, MHD_HTTP_METHOD_GET) || streq(method, MHD_HTTP_METHOD_HEAD);
        Api *api = req->api;
        json_t *body = NULL;
        unsigned status;

        if (p->route == API_ROUTE_AUDIT && get)
                status = api_audit_query(api->store, api_query_arg(req, "after"), api_query_arg(req, "limit"),
                                         api_query_arg(req, "action"), api_query_arg(req, "target"), &body);
        else if (p->route == API_ROUTE_TOKENS && get)
                status = api_tokens_list(api->tokens, &body);
        else if (p->route == API_ROUTE_TOKENS && streq(method, MHD_HTTP_METHOD_POST)) {
                char actor[TOKENS_ID_MAX + 8], id[TOKENS_ID_MAX + 1] = "";
                json_t *none = NULL;

                snprintf(actor, sizeof(actor), "token:%s", req->auth.id);
                if (!p->params && !(none = json_object()))
                        return;
                status = api_tokens_create(api->tokens, p->params ?: none, actor, id, &body);
                json_decref(none);
                if (status == MHD_HTTP_OK) {
                        api_audit_begin(req, "token.create", id,
                                        json_pack("{s:O?, s:O?, s:O?, s:O?}", "scopes",
                                                  json_object_get(body, "scopes"), "expires_at",
                                                  json_object_get(body, "expires_at"), "devices",
                                                  json_object_get(body, "devices"), "tags",
                                                  json_object_get(body, "tags")));
                }
        } else if (p->route == API_ROUTE_TOKEN && streq(method, MHD_HTTP_METHOD_DELETE)) {
                status = api_tokens_revoke(api->tokens, p->name, &body);
                if (status == MHD_HTTP_OK) {
                        unsigned n = api_end_revoked_streams(api);

                        log_info("API token '%s' revoked by 'token:%s'; closed %u event stream(s) opened with it.",
                                 p->name, req->auth.id, n);
                }
        } else {
                api_set_error(req, MHD_HTTP_METHOD_NOT_ALLOWED, "Method not allowed", NULL);
                return;
        }
        api_set_json(req, status, body);
}

/* /v1/provision[/ID] (provision:write or admin, checked). */
static void api_provision(ApiRequest *req, const ApiParsed *p, const char *method) {
        bool get = streq(method, MHD_HTTP_METHOD_GET) || streq(method, MHD_HTTP_METHOD_HEAD);
        char actor[TOKENS_ID_MAX + 8];
        Api *api = req->api;
        json_t *body = NULL;
        unsigned status;

        /* A token restricted to some devices must not make tokens that
         * let new devices in (with tags of its choosing). */
        if (tokens_restricted(&req->auth)) {
                api_set_error(req, MHD_HTTP_FORBIDDEN,
                              "A token restricted to devices may not manage provisioning tokens", NULL);
                return;
        }
        snprintf(actor, sizeof(actor), "token:%s", req->auth.id);
        if (p->route == API_ROUTE_PROVISIONS && get)
                status = api_provision_list(api->provision, &body);
        else if (p->route == API_ROUTE_PROVISIONS && streq(method, MHD_HTTP_METHOD_POST)) {
                char id[PROVISION_ID_MAX + 1] = "";
                json_t *none = NULL;

                if (!p->params && !(none = json_object()))
                        return;
                status = api_provision_create(api->provision, p->params ?: none, actor, id, &body);
                json_decref(none);
                /* What the token allows, never the token. */
                if (status == MHD_HTTP_CREATED)
                        api_audit_begin(req, "provision.create", id,
                                        json_pack("{s:O?, s:O?, s:O?, s:O?}", "uses_max",
                                                  json_object_get(body, "uses_max"), "expires_at",
                                                  json_object_get(body, "expires_at"), "tags",
                                                  json_object_get(body, "tags"), "name",
                                                  json_object_get(body, "name")));
        } else if (p->route == API_ROUTE_PROVISION && get)
                status = api_provision_get(api->provision, p->name, &body);
        else if (p->route == API_ROUTE_PROVISION && streq(method, MHD_HTTP_METHOD_DELETE)) {
                status = api_provision_revoke(api->provision, p->name, actor, &body);
                if (status == MHD_HTTP_OK)
                        log_info("Provisioning token '%s' revoked by '%s'.", p->name, actor);
        } else {
                api_set_error(req, MHD_HTTP_METHOD_NOT_ALLOWED, "Method not allowed", NULL);
                return;
        }
        api_set_json(req, status, body);
}

/* /v1/webhooks[/NAME], /v1/integrations (admin, checked). */
static void api_webhooks(ApiRequest *req, const ApiParsed *p, const char *method) {
        bool get = streq(method, MHD_HTTP_METHOD_GET) || streq(method, MHD_HTTP_METHOD_HEAD);
        Api *api = req->api;
        json_t *body = NULL;
        unsigned status;

        if (p->route == API_ROUTE_INTEGRATIONS && get)
                status = api_integrations_list(api->integrations, api->store, NULL, &body);
        else if (p->route == API_ROUTE_WEBHOOKS && get)
                status = api_integrations_list(api->integrations, api->store, "webhook", &body);
        else if (p->route == API_ROUTE_WEBHOOKS && streq(method, MHD_HTTP_METHOD_POST)) {
                char actor[TOKENS_ID_MAX + 8], name[INTEGRATION_NAME_MAX + 1] = "";
                json_t *none = NULL;

                snprintf(actor, sizeof(actor), "token:%s", req->auth.id);
                if (!p->params && !(none = json_object()))
                        return;
                status = api_webhooks_create(api->integrations, api->store, p->params ?: none, actor, name, &body);
                json_decref(none);
                /* What it sends where, never its secret; the URL as the
                 * webhook shows it (without credentials). */
                if (status == MHD_HTTP_CREATED) {
                        api_audit_begin(req, "webhook.create", name,
                                        json_pack("{s:O?, s:O?, s:O?}", "url", json_object_get(body, "url"), "prefix",
                                                  json_object_get(body, "prefix"), "tag",
                                                  json_object_get(body, "tag")));
                        log_info("Webhook '%s' created by '%s'.", name, actor);
                }
        } else if (p->route == API_ROUTE_WEBHOOK && get)
                status = api_webhook_get(api->integrations, api->store, p->name, &body);
        else if (p->route == API_ROUTE_WEBHOOK && streq(method, MHD_HTTP_METHOD_DELETE)) {
                status = api_webhooks_delete(api->integrations, api->store, p->name, &body);
                if (status == MHD_HTTP_OK)
                        log_info("Webhook '%s' deleted by 'token:%s'.", p->name, req->auth.id);
        } else {
                api_set_error(req, MHD_HTTP_METHOD_NOT_ALLOWED, "Method not allowed", NULL);
                return;
        }
        api_set_json(req, status, body);
}

/* /v1/campaigns[/ID[/devices|pause|resume|abort]] (ota:write, checked). A
 * campaign reaches any device: tokens restricted to devices may not. */
static void api_campaigns(ApiRequest *req, const ApiParsed *p, const char *method) {
        bool get = streq(method, MHD_HTTP_METHOD_GET) || streq(method, MHD_HTTP_METHOD_HEAD);
        bool post = streq(method, MHD_HTTP_METHOD_POST);
        char actor[TOKENS_ID_MAX + 8], id[CAMPAIGN_ID_LEN + 2] = "";
        Api *api = req->api;
        json_t *body = NULL;
        unsigned status;

        snprintf(actor, sizeof(actor), "token:%s", req->auth.id);
        if (tokens_restricted(&req->auth)) {
                api_set_error(req, MHD_HTTP_FORBIDDEN, "A token restricted to devices may not use campaigns", NULL);
                return;
        }
        if (!api->campaigns) {
                api_set_error(req, MHD_HTTP_SERVICE_UNAVAILABLE, "Campaigns are not available", NULL);
                return;
        }
        if (p->route == API_ROUTE_CAMPAIGN) {
                size_t n = strcspn(p->name, "/");

                /* Longer than an id: no such campaign (404 below). */
                snprintf(id, sizeof(id), "%.*s", (int)(n < sizeof(id) - 1 ? n : sizeof(id) - 1), p->name);
                if (req->audit_action && !req->audit_target) {
                        req->audit_target = api_audit_text(id, strlen(id));
                }
        }
        if (p->route == API_ROUTE_CAMPAIGNS && get)
                status = campaigns_api_list(api->campaigns, &body);
        else if (p->route == API_ROUTE_CAMPAIGNS && post) {
                char created[CAMPAIGN_ID_LEN + 1] = "";
                json_t *none = NULL;

                if (!p->params && !(none = json_object()))
                        return;
                status = campaigns_api_create(api->campaigns, p->params ?: none, actor, &body, created);
                json_decref(none);
                if (status == MHD_HTTP_CREATED) {
                        json_t *c = json_object_get(body, "campaign");

                        api_audit_begin(req, "campaign.create", created,
                                        json_pack("{s:O?, s:O?, s:O?, s:O?, s:O?, s:O?}", "name",
                                                  json_object_get(c, "name"), "target", json_object_get(c, "target"),
                                                  "package", json_object_get(c, "package"), "version",
                                                  json_object_get(c, "version"), "devices",
                                                  json_object_get(c, "devices"), "max_failure_rate",
                                                  json_object_get(c, "max_failure_rate")));
                }
        } else if (p->route == API_ROUTE_CAMPAIGN && get && !p->sub)
                status = campaigns_api_get(api->campaigns, id, &body);
        else if (p->route == API_ROUTE_CAMPAIGN && get && streq(p->sub, "devices"))
                status = campaigns_api_devices(api->campaigns, id, api_query_arg(req, "page"),
                                               api_query_arg(req, "per_page"), &body);
        else if (p->route == API_ROUTE_CAMPAIGN && post && p->sub &&
                 (streq(p->sub, "pause") || streq(p->sub, "resume") || streq(p->sub, "abort"))) {
                /* In a cluster the node that leads the campaigns acts
                 * (docs/cluster.md, "Campaigns"). */
                const char *leader = api->cluster ? cluster_leader(api->cluster) : NULL;

                if (api->cluster && !leader) {
                        api_set_error(req, MHD_HTTP_SERVICE_UNAVAILABLE,
                                      "No cluster node leads the campaigns yet; try again", NULL);
                        return;
                }
                if (leader && !streq(leader, cluster_node(api->cluster))) {
                        api_forward(req, leader, "campaign", id, p->sub, NULL);
                        return;
                }
                status = campaigns_api_action(api->campaigns, id, p->sub, actor, &body);
        }
        else if (p->route == API_ROUTE_CAMPAIGN && p->sub && !streq(p->sub, "devices") && !streq(p->sub, "pause") &&
                 !streq(p->sub, "resume") && !streq(p->sub, "abort")) {
                api_set_error(req, MHD_HTTP_NOT_FOUND, "Not found", NULL);
                return;
        } else {
                api_set_error(req, MHD_HTTP_METHOD_NOT_ALLOWED, "Method not allowed", NULL);
                return;
        }
        api_set_json(req, status, body);
}

/* ---- the device registry ------------------------------------------------------ */

/* Who makes the request, as the audit log names it. */
static const char *api_actor(const ApiRequest *req, char buf[static TOKENS_ID_MAX + 8]) {
        snprintf(buf, TOKENS_ID_MAX + 8, "token:%s", req->auth.id);
        return buf;
}

/* Add the registry's fields to a device object, or to each device of a
 * list (an array, or a page {"devices": [...]}). NULL on OOM (j freed). */
static json_t *api_registry_fields(Api *api, json_t *j, bool details) {
        json_t *list = json_is_array(j) ? j : json_object_get(j, "devices"), *d;
        size_t i;

        if (!j)
                return NULL;
        if (!list) {
                if (registry_device_json(api->registry, json_string_value(json_object_get(j, "id")), j, details) < 0)
                        goto fail;
                return j;
        }
        json_array_foreach(list, i, d)
                if (registry_device_json(api->registry, json_string_value(json_object_get(d, "id")), d, details) < 0)
                        goto fail;
        return j;
fail:
        json_decref(j);
        return NULL;
}

/* Whether params hold one of the inventory fields. */
static bool api_update_has_inventory(json_t *params) {
        return params && (json_object_get(params, "name") || json_object_get(params, "notes") ||
                          json_object_get(params, "tags"));
}

/* PUT /v1/devices/ID with name, notes or tags (docs/fleet.md): any node
 * (the registry is replicated), online or not. */
static void api_device_update(ApiRequest *req, const char *id, json_t *params) {
        Api *api = req->api;
        _cleanup_(json_decrefp) json_t *state = NULL;
        char actor[TOKENS_ID_MAX + 8], err[INVENTORY_ERROR_MAX] = "";
        InventoryUpdate u;
        json_t *tags = params ? json_object_get(params, "tags") : NULL;
        int r;

        if (!api_allowed(req, SCOPE_DEVICES_WRITE))
                return;
        /* A form carries the merge patch as JSON text. */
        if (json_is_string(tags)) {
                json_t *t = json_loadb(json_string_value(tags), json_string_length(tags), JSON_REJECT_DUPLICATES, NULL);

                if (!json_is_object(t)) {
                        json_decref(t);
                        api_set_error(req, MHD_HTTP_BAD_REQUEST,
                                      "\"tags\" must be a JSON object of names to a string (set) or null (remove)",
                                      NULL);
                        return;
                }
                if (json_object_set_new(params, "tags", t) < 0)
                        return;
        }
        if (inventory_parse_update(params, &u, err) < 0) {
                api_set_error(req, MHD_HTTP_BAD_REQUEST, err, NULL);
                return;
        }
        if (inventory_update_empty(&u)) {
                api_set_error(req, MHD_HTTP_BAD_REQUEST, "nothing to change: name, notes or tags", NULL);
                return;
        }
        /* Tags decide what restricted tokens reach: a restricted token
         * may not move devices into or out of anyone's reach. */
        if (u.tags && tokens_restricted(&req->auth)) {
                api_set_json(req, MHD_HTTP_FORBIDDEN,
                             json_pack("{s:b, s:s, s:s}", "ok", 0, "error", "insufficient_scope", "error_description",
                                       "A token restricted to devices may not change tags"));
                return;
        }
        r = registry_update(api->registry, id, &u, api_actor(req, actor), &state, err);
        if (r == -ENOENT)
                api_set_error(req, MHD_HTTP_NOT_FOUND, "Device not found", NULL);
        else if (r == -EEXIST && tokens_restricted(&req->auth))
                /* Not which device holds it: that one may be out of reach. */
                api_set_errorf(req, MHD_HTTP_CONFLICT, "name '%s' is taken by another device", u.name ?: "");
        else if (r == -EEXIST)
                api_set_error(req, MHD_HTTP_CONFLICT, err, NULL);
        else if (r == -EINVAL)
                api_set_error(req, MHD_HTTP_BAD_REQUEST, err, NULL);
        else if (r < 0)
                api_set_errorf(req, MHD_HTTP_SERVICE_UNAVAILABLE, "Cannot update the device now: %s", strerror(-r));
        else {
                json_t *changed = json_object_get(state, "changed");

                api_audit_begin(req, "device.update", id, json_deep_copy(changed));
                if (json_object_size(changed) > 0)
                        log_info("Device '%s' updated by '%s'.", id, actor);
                api_set_json(req, MHD_HTTP_OK,
                             json_pack("{s:b, s:s, s:O, s:O, s:O, s:O}", "ok", 1, "id", id, "name",
                                       json_object_get(state, "name") ?: json_null(), "notes",
                                       json_object_get(state, "notes") ?: json_null(), "tags",
                                       json_object_get(state, "tags"), "updated_at",
                                       json_object_get(state, "updated_at") ?: json_null()));
        }
}

/* POST /v1/devices {"id": ID}: what Registration=enrolled admits. */
static void api_register(ApiRequest *req, json_t *params) {
        Api *api = req->api;
        char actor[TOKENS_ID_MAX + 8], buf[32];
        const char *id = NULL;
        size_t len = 0;
        bool created = false;
        int r;

        r = api_param_text(params, "id", &id, &len, buf);
        if (r == 0) {
                api_set_error(req, MHD_HTTP_BAD_REQUEST, "Device id is required", NULL);
                return;
        }
        if (r < 0 || id == buf || proto_name_check(id, len, PROTO_NAME_DEVICE) < 0) {
                api_set_error(req, MHD_HTTP_BAD_REQUEST, "Invalid device id", NULL);
                return;
        }
        r = registry_register(api->registry, id, api_actor(req, actor), &created);
        if (r < 0) {
                api_set_errorf(req, MHD_HTTP_SERVICE_UNAVAILABLE, "Cannot register the device now: %s", strerror(-r));
                return;
        }
        api_set_json(req, created ? MHD_HTTP_CREATED : MHD_HTTP_OK,
                     json_pack("{s:b, s:s, s:b}", "ok", 1, "id", id, "created", created));
}

/* PUT (revoke) or DELETE (unrevoke) /v1/devices/ID/revocation. */
static void api_revocation(ApiRequest *req, const char *id, bool revoke, json_t *params) {
        Api *api = req->api;
        const char *reason = NULL, *error;
        char actor[TOKENS_ID_MAX + 8];
        bool changed = false;
        int r;

        if (revoke && api_parse_reason(params, &reason, &error) < 0) {
                api_set_error(req, MHD_HTTP_BAD_REQUEST, error, NULL);
                return;
        }
        r = revoke ? registry_revoke(api->registry, id, reason, api_actor(req, actor), &changed)
                   : registry_unrevoke(api->registry, id, api_actor(req, actor), &changed);
        if (r == -ENOENT) {
                api_set_error(req, MHD_HTTP_NOT_FOUND, "Device not found", NULL);
                return;
        }
        if (r < 0) {
                api_set_errorf(req, MHD_HTTP_SERVICE_UNAVAILABLE, "Cannot %s the device now: %s",
                               revoke ? "revoke" : "unrevoke", strerror(-r));
                return;
        }
        api_set_json(req, MHD_HTTP_OK,
                     json_pack("{s:b, s:s, s:b, s:b}", "ok", 1, "id", id, "revoked", revoke, "changed", changed));
}

static enum MHD_Result api_dispatch(ApiRequest *req, const char *url, const char *method) {
        Api *api = req->api;
        _cleanup_(api_parsed_done) ApiParsed p = {};
        ApiInput in = {
                .method = method,
                .url = url,
                .content_type = MHD_lookup_connection_value(req->connection, MHD_HEADER_KIND,
                                                            MHD_HTTP_HEADER_CONTENT_TYPE),
                .last_event_id = MHD_lookup_connection_value(req->connection, MHD_HEADER_KIND, "Last-Event-ID"),
                .body = req->body,
                .body_len = req->body_len,
        };
        enum MHD_Result ret;
        Device *d;

        if (req->body_too_large) {
                api_set_errorf(req, MHD_HTTP_CONTENT_TOO_LARGE, "Request body larger than %zu bytes", req->body_limit);
                return api_queue(req);
        }
        if (req->body_overload) {
                api_set_error(req, MHD_HTTP_SERVICE_UNAVAILABLE, "Too many requests in progress; try again", NULL);
                return api_queue(req);
        }
        /* A token in the header or the query was checked before the body
         * came in (api_handler); otherwise it can only be in the body. */
        api_input_token(req->connection, &in);
        if (api_parse_request(&in, &p) < 0)
                return MHD_NO;
        /* Parsed: a call may now wait for its device without the body. */
        api_body_free(req);
        if (!req->authorized) {
                int r = tokens_check(api->tokens, p.token, &req->auth);

                if (r < 0)
                        return api_unauthorized(req, r);
                req->authorized = true;
                /* A token in the body: its bucket, now it is known. */
                if (api_rate_limit_body_token(req, &ret))
                        return ret;
        }
        if (api_mutating(method))
                api_audit_route(req, &p, url, method);
        if (!api_allowed(req, api_route_scope(p.route)))
                return api_queue(req);
        if (p.route == API_ROUTE_OTA_JOB) {
                json_t *device = p.params ? json_object_get(p.params, "device") : NULL;

                if (!json_is_string(device) || json_string_length(device) > PROTO_DEVICE_ID_MAX ||
                    proto_name_check(json_string_value(device), json_string_length(device), PROTO_NAME_DEVICE) < 0) {
                        api_set_error(req, MHD_HTTP_BAD_REQUEST,
                                      device ? "\"device\" must be a device ID" : "\"device\" is required", NULL);
                        return api_queue(req);
                }
                memcpy(p.device, json_string_value(device), json_string_length(device) + 1);
        }
        if ((p.route == API_ROUTE_STREAM && p.stream_device) || p.route == API_ROUTE_DEVICE ||
            p.route == API_ROUTE_OTA_JOB ||
            p.route == API_ROUTE_CALL || p.route == API_ROUTE_READ || p.route == API_ROUTE_UPDATE) {
                if (!api_may_reach(req, p.device))
                        return api_queue(req);
        }
        switch (p.route) {
        case API_ROUTE_BAD_BODY:
                api_set_error(req, MHD_HTTP_BAD_REQUEST, p.body_error, NULL);
                break;
        case API_ROUTE_STREAM:
                return api_stream(req, &p);
        case API_ROUTE_LIST: {
                ApiFilterArgs fa = { .err = "" };
                const char *error;
                ApiPage page;

                inventory_filter_init(&fa.f);
                (void)MHD_get_connection_values_n(req->connection, MHD_GET_ARGUMENT_KIND, api_filter_arg, &fa);
                if (api_parse_page(api_query_arg(req, "page"), api_query_arg(req, "per_page"), &page, &error) < 0)
                        api_set_error(req, MHD_HTTP_BAD_REQUEST, error, NULL);
                else if (fa.failed)
                        api_set_error(req, MHD_HTTP_BAD_REQUEST, fa.err, NULL);
                else if (fa.f.any) {
                        json_t *list = NULL;
                        int r = api_devices_list_filtered(api->devices, api->registry, &req->auth, &fa.f, &page,
                                                          &list);

                        if (r == -EIO)
                                api_set_error(req, MHD_HTTP_SERVICE_UNAVAILABLE,
                                              "Cannot read the device registry now", NULL);
                        else if (r == 0)
                                api_set_json(req, MHD_HTTP_OK, list);
                } else if (tokens_restricted(&req->auth)) {
                        json_t *list = NULL;
                        int r = api_devices_list_restricted(api->devices, api->registry, &req->auth, &page, &list);

                        if (r == -EIO)
                                api_set_error(req, MHD_HTTP_SERVICE_UNAVAILABLE,
                                              "Cannot read the device registry now", NULL);
                        else if (r == 0)
                                api_set_json(req, MHD_HTTP_OK, api_registry_fields(api, list, false));
                } else
                        api_set_json(req, MHD_HTTP_OK,
                                     api_registry_fields(api, api_devices_list(api->devices, &page), false));
                break;
        }
        case API_ROUTE_REGISTER:
                api_register(req, p.params);
                break;
        case API_ROUTE_REVOKE:
        case API_ROUTE_UNREVOKE:
                api_revocation(req, p.device, p.route == API_ROUTE_REVOKE, p.params);
                break;
        case API_ROUTE_PUBLISH:
                api_publish(req, p.params);
                break;
        case API_ROUTE_DEVICE:
        case API_ROUTE_CALL:
        case API_ROUTE_READ: {
                const char *node;

                d = devices_find(api->devices, p.device);
                node = api_device_elsewhere(api, p.device, d);
                if (node) {
                        api_forward(req, node,
                                    p.route == API_ROUTE_DEVICE ? "device" : p.route == API_ROUTE_CALL ? "call" : "var",
                                    p.device, p.name, p.params);
                        if (req->suspended)
                                return MHD_YES;
                } else if (!d)
                        api_set_error(req, MHD_HTTP_NOT_FOUND, "Device not found", NULL);
                else if (p.route == API_ROUTE_DEVICE)
                        api_set_json(req, MHD_HTTP_OK, api_registry_fields(api, device_to_json(d, true), true));
                else {
                        api_device_call(req, d, p.name, p.route == API_ROUTE_CALL, p.params);
                        if (req->suspended)
                                return MHD_YES;
                }
                break;
        }
        case API_ROUTE_UPDATE:
        case API_ROUTE_OTA_JOB: {
                /* Particle's "update the device": name, notes, tags; or
                 * (compatible form of POST /v1/ota/jobs) an OTA job. */
                json_t *body = NULL;
                const char *node;
                unsigned status;

                if (p.route == API_ROUTE_UPDATE && !api_update_is_ota(p.params)) {
                        api_device_update(req, p.device, p.params);
                        break;
                }
                if (p.route == API_ROUTE_UPDATE && !api_allowed(req, SCOPE_OTA_WRITE))
                        break;
                if (p.route == API_ROUTE_UPDATE && api_update_has_inventory(p.params)) {
                        api_set_error(req, MHD_HTTP_BAD_REQUEST,
                                      "Send \"manifest\" alone: name, notes and tags are changed by a request of "
                                      "their own",
                                      NULL);
                        break;
                }
                d = devices_find(api->devices, p.device);
                node = api_device_elsewhere(api, p.device, d);
                if (node) {
                        /* The node holding the device sends the job and
                         * drives it; every node has it (ota.h). */
                        api_forward(req, node, "ota", p.device, NULL, p.params);
                        if (req->suspended)
                                return MHD_YES;
                        break;
                }
                if (!d) {
                        api_set_error(req, MHD_HTTP_NOT_FOUND, "Device not found", NULL);
                        break;
                }
                status = ota_api_start_job(api->ota, d, p.params, &body);
                api_set_json(req, status, body);
                break;
        }
        case API_ROUTE_NO_DEVICE:
                api_set_error(req, MHD_HTTP_NOT_FOUND, "Device not found", NULL);
                break;
        case API_ROUTE_TOKEN_CURRENT: {
                json_t *j = tokens_auth_to_json(&req->auth);

                if (j && json_object_set_new(j, "ok", json_true()) < 0) {
                        json_decref(j);
                        j = NULL;
                }
                api_set_json(req, MHD_HTTP_OK, j);
                break;
        }
        case API_ROUTE_TOKENS:
        case API_ROUTE_TOKEN:
        case API_ROUTE_AUDIT:
                api_admin(req, &p, method);
                break;
        case API_ROUTE_PROVISIONS:
        case API_ROUTE_PROVISION:
                api_provision(req, &p, method);
                break;
        case API_ROUTE_WEBHOOKS:
        case API_ROUTE_WEBHOOK:
        case API_ROUTE_INTEGRATIONS:
                api_webhooks(req, &p, method);
                break;
        case API_ROUTE_CAMPAIGNS:
        case API_ROUTE_CAMPAIGN:
                api_campaigns(req, &p, method);
                if (req->suspended)
                        return MHD_YES; /* an action sent to the leader (api_forward()) */
                break;
        case API_ROUTE_DEVICE_BAD_METHOD:
                /* Without looking the device up: any good token reaches
                 * this route (a restricted one, one without devices:read),
                 * and the answer must not say whether the device exists. */
        case API_ROUTE_NOT_FOUND:
        default:
                api_set_error(req, MHD_HTTP_NOT_FOUND, "Not found", NULL);
                break;
        }
        return api_queue(req);
}

/* GET /metrics (docs/cloud.md, "Metrics"): a token with metrics:read (a
 * TokenFile= token is admin, a MetricsTokenFile= one has metrics:read),
 * in the header or the query. */
static enum MHD_Result api_metrics(ApiRequest *req, const char *method) {
        Api *api = req->api;
        struct MHD_Response *resp;
        uint64_t lag = 0;
        char *text;
        size_t len;
        int k;

        k = api_connection_authenticate(req);
        if (k < 0)
                return api_unauthorized(req, k);
        if (!api_allowed(req, SCOPE_METRICS_READ))
                return api_queue(req);
        if (!streq(method, "GET") && !streq(method, "HEAD")) {
                api_set_error(req, MHD_HTTP_METHOD_NOT_ALLOWED, "Method not allowed", NULL);
                return api_queue(req);
        }
        for (ApiRequest *r = api->requests; r; r = r->next)
                if (r->sse && r->buf_len - r->buf_off > lag)
                        lag = r->buf_len - r->buf_off;
        if (stats_render(lag, &text, &len) < 0)
                return MHD_NO;
        resp = MHD_create_response_from_buffer(len, text, MHD_RESPMEM_MUST_FREE);
        if (!resp) {
                free(text);
                return MHD_NO;
        }
        (void)MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8");
        req->response = resp;
        req->status = MHD_HTTP_OK;
        return api_queue(req);
}

/* /console and below (console.h): public files, no token. */
static enum MHD_Result api_console(ApiRequest *req, const char *url, const char *method) {
        const char *inm =
                MHD_lookup_connection_value(req->connection, MHD_HEADER_KIND, MHD_HTTP_HEADER_IF_NONE_MATCH);
        struct MHD_Response *resp;
        unsigned status;

        if (console_respond(req->api->console, url, method, inm, &resp, &status) < 0)
                return MHD_NO;
        req->response = resp;
        req->status = status;
        return api_queue(req);
}

static enum MHD_Result api_handler(void *cls, struct MHD_Connection *connection, const char *url,
                                   const char *method, const char *version, const char *upload_data,
                                   size_t *upload_data_size, void **con_cls) {
        Api *api = cls;
        ApiRequest *req = *con_cls;

        if (!req) {
                const char *cl, *token;
                ApiInput in = {};
                ApiConn *conn;
                enum MHD_Result ret;
                bool bad_path, done;

                req = calloc(1, sizeof(*req));
                if (!req)
                        return MHD_NO;
                req->api = api;
                req->connection = connection;
                req->next = api->requests;
                if (api->requests)
                        api->requests->prev = req;
                api->requests = req;
                *con_cls = req;
                conn = api_conn(connection);
                if (!conn) {
                        api_set_error(req, MHD_HTTP_SERVICE_UNAVAILABLE, "Out of memory; try again", NULL);
                        return api_queue(req);
                }
                api_conn_unwait(conn);
                ret = api_rate_limit(req, &done);
                if (done) {
                        conn->bad_escape_at = NULL;
                        return ret;
                }
                bad_path = conn->bad_escape_at == url;
                conn->bad_escape_at = NULL;
                if (bad_path) {
                        stats_api_refused(STATS_API_BAD_PATH);
                        api_set_errorf(req, MHD_HTTP_BAD_REQUEST,
                                       "The path holds '%s', an encoded %s, which no API path may hold", conn->bad_escape,
                                       streq(conn->bad_escape, "%00") ? "NUL byte" : "'/'");
                        return api_queue(req);
                }
                /* POST /v1/ota/jobs is the Api's: like PUT /v1/devices/ID,
                 * forwarded to the node of the device in cluster mode. */
                if (ota_api_owns(url) && !(streq(url, "/v1/ota/jobs") && streq(method, MHD_HTTP_METHOD_POST))) {
                        int r;

                        /* Artifact uploads stream to disk: no body limit here. */
                        req->ota = true;
                        r = api_connection_authenticate(req);
                        if (r < 0)
                                return api_unauthorized(req, r);
                        if (api_mutating(method))
                                api_audit_begin(req, startswith(url, "/v1/ota/artifacts/") ? "ota.upload" : "api.request",
                                                url, json_pack("{s:s}", "method", method));
                        if (!api_allowed(req, SCOPE_OTA_WRITE))
                                return api_queue(req);
                        /* The job list names every device's jobs. */
                        if (tokens_restricted(&req->auth) && (streq(url, "/v1/ota/jobs") || streq(url, "/v1/ota"))) {
                                api_set_error(req, MHD_HTTP_FORBIDDEN,
                                              "A token restricted to devices may not list OTA jobs", NULL);
                                return api_queue(req);
                        }
                        /* A job of another device answers as a job that
                         * does not exist would (an id no job has: job ids
                         * are random), telling nothing of it. */
                        if (tokens_restricted(&req->auth) && startswith(url, "/v1/ota/jobs/")) {
                                const char *owner = ota_job_device(api->ota, url + strlen("/v1/ota/jobs/"));
                                static char none[] = "/v1/ota/jobs/" OTA_JOB_ID_NONE;

                                if (owner && !tokens_may_reach(api->tokens, &req->auth, owner))
                                        url = none;
                        }
                        return (enum MHD_Result)ota_api_handler(api->ota, connection, url, method, upload_data,
                                                                upload_data_size, &req->ota_state);
                }
                if (streq(url, "/metrics"))
                        return api_metrics(req, method);
                if (console_owns(url))
                        return api_console(req, url, method);
                /* Tunnels and log streams: the token from the header (or
                 * the query), its scope and device checked here, the rest
                 * in tunnel.c (which reads the body of an `up` itself). */
                if (api->tunnels && (req->tunnel_route = tunnel_route(url, req->tunnel_device, &req->tunnel_sid)) !=
                                            TUNNEL_ROUTE_NONE) {
                        int r = api_connection_authenticate(req);

                        if (r < 0)
                                return api_unauthorized(req, r);
                        req->authorized = true;
                        if (!api_allowed(req, tunnel_route_scope(req->tunnel_route)) ||
                            !api_may_reach(req, req->tunnel_device))
                                return api_queue(req);
                        if (req->tunnel_route == TUNNEL_ROUTE_DOWN || req->tunnel_route == TUNNEL_ROUTE_UP) {
                                /* Attached now, before a byte of the body:
                                 * a refusal can still be answered. */
                                char host[NI_MAXHOST];

                                api_sse_client(req, host);
                                return tunnel_api_handler(api->tunnels, connection, req->tunnel_route,
                                                          req->tunnel_device, req->tunnel_sid, method, &req->auth,
                                                          host, upload_data, upload_data_size, &req->tunnel);
                        }
                        return MHD_YES;
                }
                /* A token in the header or the query is checked before a
                 * byte of the body is read; only a request whose token can
                 * only be in its body has the body buffered first. */
                api_input_token(connection, &in);
                if (api_outside_token(&in, &token)) {
                        int r = tokens_check(api->tokens, token, &req->auth);

                        if (r < 0)
                                return api_unauthorized(req, r);
                        req->authorized = true;
                }
                /* A campaign names up to CAMPAIGN_DEVICES_MAX devices in
                 * its manifests: a larger body, only for a token that was
                 * checked before it (and that may write OTA). */
                req->body_limit = api->body_max;
                if (req->authorized && streq(url, "/v1/campaigns") && streq(method, MHD_HTTP_METHOD_POST) &&
                    scope_allows(req->auth.scopes, SCOPE_OTA_WRITE))
                        req->body_limit = CAMPAIGN_BODY_MAX;
                /* Refuse a declared oversize body before it is sent. */
                cl = MHD_lookup_connection_value(connection, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
                if (cl && strtoull(cl, NULL, 10) > req->body_limit) {
                        api_set_errorf(req, MHD_HTTP_CONTENT_TOO_LARGE, "Request body larger than %zu bytes",
                                       req->body_limit);
                        return api_queue(req);
                }
                return MHD_YES;
        }
        if (req->tunnel_route != TUNNEL_ROUTE_NONE) {
                char host[NI_MAXHOST];

                if (req->response)
                        return api_queue(req);
                if ((req->tunnel_route == TUNNEL_ROUTE_DOWN || req->tunnel_route == TUNNEL_ROUTE_UP) &&
                    !req->tunnel) {
                        /* Refused at the first call: its answer is queued. */
                        *upload_data_size = 0;
                        return MHD_YES;
                }
                /* Only a new stream records the client's address (not
                 * every chunk of an up body). */
                if (req->tunnel)
                        strcpy(host, "?");
                else
                        api_sse_client(req, host);
                return tunnel_api_handler(api->tunnels, connection, req->tunnel_route, req->tunnel_device,
                                          req->tunnel_sid, method, &req->auth, host, upload_data, upload_data_size,
                                          &req->tunnel);
        }
        if (req->ota)
                return req->response ? api_queue(req)
                                     : (enum MHD_Result)ota_api_handler(api->ota, connection, url, method, upload_data,
                                                                        upload_data_size, &req->ota_state);
        if (*upload_data_size > 0) {
                size_t n = *upload_data_size;

                *upload_data_size = 0;
                if (req->body_too_large || req->body_overload)
                        return MHD_YES;
                if (req->body_len + n > req->body_limit) {
                        /* Keep reading, keep nothing; 413 once it is over. */
                        req->body_too_large = true;
                        api_body_free(req);
                        return MHD_YES;
                }
                /* A campaign's larger body has room of its own. */
                if (api->body_total + n >
                    API_BODY_TOTAL_MAX + (req->body_limit > api->body_max ? CAMPAIGN_BODY_MAX : 0)) {
                        /* Keep reading, keep nothing; 503 once it is over. */
                        if (!req->body_overload)
                                log_warning("Request bodies in progress hold %zu bytes; answering 503.", api->body_total);
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
                        api->body_total += n;
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
        if (api->stopping) {
                /* Nothing may be suspended once MHD_stop_daemon() runs. */
                api_set_error(req, MHD_HTTP_SERVICE_UNAVAILABLE, "Shutting down", NULL);
                return api_queue(req);
        }
        return api_dispatch(req, url, method);
}

static void api_request_free(ApiRequest *req) {
        Api *api = req->api;

        if (req->audit_action)
                api_audit(req);

        if (req->prev)
                req->prev->next = req->next;
        else
                api->requests = req->next;
        if (req->next)
                req->next->prev = req->prev;
        if (req->sse) {
                api->n_streams--;
                stats_stream_opened(-1);
        }
        if (req->sub)
                sub_index_remove(api->streams, req->sub);
        devices_call_cancel(req->call);
        cluster_forward_cancel(req->forward);
        journal_cursor_done(&req->cursor);
        ota_api_request_free(req->ota_state);
        tunnel_api_request_free(req->tunnel, req->connection);
        if (req->response)
                MHD_destroy_response(req->response);
        api_body_free(req);
        free(req->name);
        free(req->prefix);
        free(req->filter_id);
        free(req->buf);
        free(req->audit_target);
        json_decref(req->audit_detail);
        free(req);
}

static void api_completed(void *cls, struct MHD_Connection *connection, void **con_cls,
                          enum MHD_RequestTerminationCode toe) {
        ApiRequest *req = *con_cls;

        ApiConn *conn = api_conn(connection);
        Api *api = cls;

        /* A kept-alive connection's next request: idle, then its header. */
        if (conn && conn->fd >= 0 && toe == MHD_REQUEST_TERMINATED_COMPLETED_OK && !api->stopping)
                api_conn_wait(conn, 1, api->config->idle_timeout_sec + api->config->header_timeout_sec);
        if (!req)
                return;
        *con_cls = NULL;
        api_request_free(req);
}

static void api_mhd_log(void *cls, const char *fmt, va_list ap) {
        Api *api = cls;

        mhd_log(api->running, "", fmt, ap);
}

Api *api_free(Api *api) {
        if (!api)
                return NULL;
        if (api->daemon) {
                api->stopping = true;
                ota_api_shutdown(api->ota);
                /* Upgraded connections close before MHD stops. */
                tunnels_api_shutdown(api->tunnels);
                /* MHD must not be stopped with suspended connections. */
                while (api->rpcs) {
                        ApiRequest *req = api->rpcs;

                        devices_call_cancel(req->call);
                        req->call = NULL;
                        if (!req->rpc_body)
                                api_set_error(req, MHD_HTTP_SERVICE_UNAVAILABLE, "Shutting down", NULL);
                        req->suspended = true;
                        api_resume(req);
                }
                for (ApiRequest *req = api->requests; req; req = req->next) {
                        devices_call_cancel(req->call);
                        req->call = NULL;
                        cluster_forward_cancel(req->forward);
                        req->forward = NULL;
                        if (req->sse) {
                                /* A replay would take turns, suspended
                                 * between them: it ends here. */
                                req->ending = true;
                                if (req->catching_up) {
                                        req->catching_up = false;
                                        journal_cursor_done(&req->cursor);
                                }
                        } else if (req->suspended && !req->response)
                                api_set_error(req, MHD_HTTP_SERVICE_UNAVAILABLE, "Shutting down", NULL);
                        api_resume(req);
                }
                (void)MHD_run(api->daemon);
                MHD_stop_daemon(api->daemon);
                api->daemon = NULL;
        }
        api->streams = sub_index_free(api->streams);
        api->console = console_free(api->console);
        api->tokens = tokens_free(api->tokens);
        api->io = sd_event_source_disable_unref(api->io);
        api->timer = sd_event_source_disable_unref(api->timer);
        api->defer = sd_event_source_disable_unref(api->defer);
        api->resume = sd_event_source_disable_unref(api->resume);
        api->keepalive = sd_event_source_disable_unref(api->keepalive);
        api->header_timer = sd_event_source_disable_unref(api->header_timer);
        ratelimit_free(api->rate_address);
        ratelimit_free(api->rate_token);
        ratelimit_free(api->rate_auth_failures);
        free(api->cert_pem);
        if (api->key_pem)
                explicit_bzero(api->key_pem, api->key_pem_len);
        free(api->key_pem);
        free(api);
        return NULL;
}

/* TokensHooks.device_tags: the registry's. */
static int api_device_tags(void *userdata, const char *id, json_t **ret) {
        Api *api = userdata;

        return registry_tags(api->registry, id, ret);
}

int api_new(sd_event *event, const CloudConfig *config, Store *store, Registry *registry, Provision *provision,
            Journal *journal, Devices *devices, Events *events, Ota *ota, unsigned *ret_port, Api **ret) {
        _cleanup_(api_freep) Api *api = NULL;
        const union MHD_DaemonInfo *info;
        struct sockaddr_storage ss;
        socklen_t sl;
        unsigned flags = MHD_USE_EPOLL | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_ERROR_LOG | MHD_ALLOW_UPGRADE;
        struct MHD_OptionItem tls[4] = { { MHD_OPTION_END, 0, NULL } };
        unsigned port;
        int r, fd;

        api = calloc(1, sizeof(*api));
        if (!api)
                return log_error_errno(-ENOMEM, "Failed to start the HTTP API: %m");
        api->event = event;
        api->config = config;
        api->store = store;
        api->registry = registry;
        api->provision = provision;
        api->journal = journal;
        api->devices = devices;
        api->events = events;
        api->ota = ota;
        /* Room for a MaxPayload argument even when every byte is escaped. */
        api->body_max = (size_t)config->max_payload * 3 + 4096;
        api->streams = sub_index_new(NULL);
        if (!api->streams)
                return log_error_errno(-ENOMEM, "Failed to start the HTTP API: %m");
        r = console_new(config->console_dir, &api->console);
        /* The API runs without it: the console is an extra (and a build
         * run from its tree has none installed at the default place). */
        if (r == -ENOENT && streq(config->console_dir, CONSOLEDIR))
                log_info("No web console in '%s': /console/ answers 404.", config->console_dir);
        else if (r < 0)
                log_warning_errno(r, "Cannot open [API] Console= directory '%s', the web console is off: %m",
                                  config->console_dir);
        r = tokens_open(store, config, &(TokensHooks){ .userdata = api, .device_tags = api_device_tags },
                        &api->tokens);
        if (r < 0)
                return r;
        r = 0;
        if (config->rate_address > 0)
                r = ratelimit_new(config->rate_address, config->rate_address_burst, API_RATE_KEYS_MAX,
                                  &api->rate_address);
        if (r >= 0 && config->rate_token > 0)
                r = ratelimit_new(config->rate_token, config->rate_token_burst, API_RATE_KEYS_MAX, &api->rate_token);
        if (r >= 0 && config->rate_auth_failures > 0)
                r = ratelimit_new(config->rate_auth_failures, config->rate_auth_failures_burst, API_RATE_KEYS_MAX,
                                  &api->rate_auth_failures);
        if (r < 0)
                return log_error_errno(r, "Failed to start the HTTP API: %m");

        r = cloud_config_resolve_address(config->api_listen, config->api_port, &ss, &sl);
        if (r < 0)
                return log_error_errno(r, "Invalid [API] Listen= address '%s'.", config->api_listen);
        if (ss.ss_family == AF_INET6)
                flags |= MHD_USE_DUAL_STACK;
        if (config->api_cert_file) {
                size_t len;

                if (!MHD_is_feature_supported(MHD_FEATURE_TLS))
                        return log_error_errno(-EOPNOTSUPP, "libmicrohttpd was built without TLS: cannot serve the "
                                                            "API over HTTPS ([API] Certificate=).");
                r = ota_read_file(config->api_cert_file, API_PEM_MAX, &api->cert_pem, &len);
                if (r < 0)
                        return log_error_errno(r, "Cannot read [API] Certificate= '%s': %m", config->api_cert_file);
                r = ota_read_file(config->api_key_file, API_PEM_MAX, &api->key_pem, &api->key_pem_len);
                if (r < 0)
                        return log_error_errno(r, "Cannot read [API] Key= '%s': %m", config->api_key_file);
                tls[0] = (struct MHD_OptionItem){ MHD_OPTION_HTTPS_MEM_CERT, 0, api->cert_pem };
                tls[1] = (struct MHD_OptionItem){ MHD_OPTION_HTTPS_MEM_KEY, 0, api->key_pem };
                tls[2] = (struct MHD_OptionItem){ MHD_OPTION_HTTPS_PRIORITIES, 0, (void *)API_TLS_PRIORITIES };
                tls[3] = (struct MHD_OptionItem){ MHD_OPTION_END, 0, NULL };
                flags |= MHD_USE_TLS;
        }
        api->daemon = MHD_start_daemon(flags, (uint16_t)config->api_port, NULL, NULL, api_handler, api,
                                      MHD_OPTION_EXTERNAL_LOGGER, api_mhd_log, api,
                                      MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&ss,
                                      MHD_OPTION_NOTIFY_COMPLETED, api_completed, api,
                                      MHD_OPTION_NOTIFY_CONNECTION, api_notify_connection, api,
                                      MHD_OPTION_UNESCAPE_CALLBACK, api_unescape, api,
                                      MHD_OPTION_CONNECTION_TIMEOUT, config->idle_timeout_sec,
                                      MHD_OPTION_LISTEN_BACKLOG_SIZE, (unsigned)1024,
                                      MHD_OPTION_CONNECTION_LIMIT, config->max_connections,
                                      MHD_OPTION_PER_IP_CONNECTION_LIMIT, config->max_connections_per_ip,
                                      MHD_OPTION_ARRAY, tls, MHD_OPTION_END);
        if (!api->daemon && config->api_cert_file)
                /* libmicrohttpd logged why (the key, the certificate). */
                return log_error_errno(-EADDRNOTAVAIL,
                                       "Failed to start the HTTPS API on '%s' port %u with certificate '%s' and key "
                                       "'%s'.",
                                       config->api_listen, config->api_port, config->api_cert_file,
                                       config->api_key_file);
        if (!api->daemon)
                return log_error_errno(-EADDRNOTAVAIL, "Failed to start the HTTP API on '%s' port %u.",
                                       config->api_listen, config->api_port);
        info = MHD_get_daemon_info(api->daemon, MHD_DAEMON_INFO_BIND_PORT);
        if (!info)
                return log_error_errno(-EIO, "Cannot get the HTTP API port.");
        port = info->port;
        info = MHD_get_daemon_info(api->daemon, MHD_DAEMON_INFO_EPOLL_FD);
        if (!info)
                return log_error_errno(-EIO, "Cannot get the HTTP API epoll fd.");
        fd = info->epoll_fd;

        r = sd_event_add_io(event, &api->io, fd, EPOLLIN, api_io_cb, api);
        if (r >= 0)
                r = sd_event_add_time(event, &api->timer, CLOCK_MONOTONIC, 0, USEC_PER_MSEC, api_timer_cb, api);
        if (r >= 0)
                r = sd_event_source_set_enabled(api->timer, SD_EVENT_OFF);
        if (r >= 0)
                r = sd_event_add_defer(event, &api->defer, api_defer_cb, api);
        /* Below the loop's other sources: sd-event dispatches the oldest
         * pending source of the best priority, and a defer source that
         * enables itself again while it runs is always as old as any I/O
         * or timer, so at one priority it could run alone round after
         * round (devices unheard, timers late). */
        if (r >= 0)
                r = sd_event_source_set_priority(api->defer, SD_EVENT_PRIORITY_IDLE);
        if (r >= 0)
                r = sd_event_source_set_enabled(api->defer, SD_EVENT_OFF);
        if (r >= 0)
                r = sd_event_add_defer(event, &api->resume, api_defer_cb, api);
        if (r >= 0)
                r = sd_event_source_set_enabled(api->resume, SD_EVENT_OFF);
        if (r >= 0)
                r = sd_event_add_time_relative(event, &api->keepalive, CLOCK_MONOTONIC, API_SSE_KEEPALIVE_USEC,
                                               100 * USEC_PER_MSEC, api_keepalive_cb, api);
        if (r >= 0)
                r = sd_event_source_set_enabled(api->keepalive, SD_EVENT_ON);
        if (r >= 0)
                r = sd_event_add_time(event, &api->header_timer, CLOCK_MONOTONIC, 0, 100 * USEC_PER_MSEC,
                                      api_header_timer_cb, api);
        if (r >= 0)
                api_header_timer_update(api);
        if (r < 0)
                return log_error_errno(r, "Failed to add HTTP event sources: %m");
        api_update_timer(api);
        api->running = true;
        *ret_port = port;
        *ret = TAKE_PTR(api);
        return 0;
}
