/* SPDX-License-Identifier: Apache-2.0 */
/* Tunnels and log streams (tunnel.h): the stream engine between a
 * device's session and HTTP clients. */
#include "config.h"

#include <assert.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netdb.h>
#include <openssl/crypto.h>
#include <openssl/rand.h>
#include <stdarg.h>
#include <sys/epoll.h>
#include <sys/socket.h>

#include "log.h"
#include "scopes.h"
#include "tunnel.h"
#include "util.h"

#define USEC_PER_SEC 1000000ULL
#define TUNNEL_HASH_SIZE 256
#define TUNNEL_LOGS_BLOCK 16384
#define TUNNEL_UPGRADE "tether-tunnel"
#define TUNNEL_DOWN_BLOCK 65536
#define TUNNEL_KEY_HEADER "Tether-Stream-Key"
#define TUNNEL_KEY_BYTES 32
/* An up body is sent on in messages of at least this much (or what MHD
 * has): room freed a few bytes at a time would otherwise make messages of
 * a few bytes, whose overhead fills the device's queue. A quarter of the
 * smallest window: credit always grows to it. */
#define TUNNEL_UP_MIN_SEND ((size_t)PROTO_STREAM_WINDOW_MIN / 4)

static uint64_t now_realtime_usec(void) {
        struct timespec ts;

        (void)clock_gettime(CLOCK_REALTIME, &ts);
        return (uint64_t)ts.tv_sec * USEC_PER_SEC + (uint64_t)ts.tv_nsec / 1000;
}


typedef struct Link Link;
typedef struct Msg Msg;

typedef enum StreamState {
        STREAM_OPENING,    /* PUT /t/SID sent, no answer yet */
        STREAM_CONNECTING, /* tunnel: 2.01, waiting for the device's `open` */
        STREAM_OPEN,       /* the client has its 101/200: data flows */
        STREAM_ENDED,      /* the device side is gone (the HTTP side may still close) */
} StreamState;

/* The streams of one device and its link budget (PROTO_STREAM_INFLIGHT_MAX):
 * alive while it has a stream or a message in flight. */
struct Link {
        Tunnels *t;
        Device *device;
        TunnelStream *streams;
        unsigned n_streams;
        size_t inflight; /* messages sent on /t/..., not answered: payload + PROTO_STREAM_MESSAGE_COST each */
        Msg *msgs;
        Link *prev, *next;
};

/* A request to the device on /t/SID in flight. */
struct Msg {
        Link *link;
        TunnelStream *stream; /* NULL once it ended */
        DeviceCall *call;
        size_t len;
        Msg *prev, *next;
};

struct TunnelStream {
        Tunnels *t;
        Link *link; /* NULL once the device side ended */
        TunnelStream *link_prev, *link_next;
        TunnelStream *hash_next;
        TunnelStream *all_prev, *all_next;
        uint32_t sid;
        char sid_text[12];
        bool logs;
        char device[PROTO_DEVICE_ID_MAX + 1];
        char target[TUNNEL_TARGET_MAX];
        json_t *units; /* log streams: the array asked for */
        TokenAuth auth;
        char token[TOKENS_ID_MAX + 8]; /* "token:ID", as the audit log names it */
        char host[NI_MAXHOST];
        uint64_t opened_at; /* CLOCK_REALTIME µs */
        StreamState state;
        bool device_opened; /* the device sent `open` */
        bool announced;     /* opened event and audit record written */
        DeviceCall *open_call;
        sd_event_source *timer; /* the open deadline, then idleness (tunnels) */
        uint64_t last_active;   /* CLOCK_MONOTONIC µs */
        char reason[TUNNEL_REASON_MAX];

        /* HTTP side */
        struct MHD_Connection *connection; /* NULL once MHD completed the request */
        bool suspended;
        struct MHD_Response *response; /* to queue on the next handler call */
        unsigned status;
        struct MHD_UpgradeResponseHandle *urh;
        int fd;
        sd_event_source *io;
        bool client_eof;
        bool shut_wr;
        char *extra;    /* bytes the client sent with the request head, not yet sent on */
        size_t extra_off, extra_len;
        /* the split transport: two requests instead of an upgrade */
        bool split;
        char key[2 * TUNNEL_KEY_BYTES + 1]; /* lowercase hex, from the 201 on */
        struct MHD_Connection *down, *up;  /* the attached requests, until MHD completes them */
        bool down_attached, up_attached;   /* ever: one of each per stream */
        bool down_suspended, up_suspended;
        /* While suspended MHD does not poll a request's socket: these see
         * the client go away. */
        sd_event_source *down_watch, *up_watch;
        sd_event_source *logs_watch; /* a log stream's client, while its response waits for entries */
        bool down_done; /* the down body ended normally (after the device's fin) */
        bool up_done;   /* the up body ended: fin sent */
        uint64_t up_bytes;
        size_t up_pending; /* bytes MHD holds for the suspended up request */

        /* cloud → device */
        uint32_t peer_window;
        uint64_t sent, peer_ack;
        bool fin_sent;
        /* device → cloud */
        uint32_t window;
        uint64_t received, consumed, acked;
        bool fin_received;
        uint8_t *buf; /* window bytes, allocated when needed */
        size_t buf_off, buf_len;
};

typedef struct Closed {
        char device[PROTO_DEVICE_ID_MAX + 1];
        uint32_t sid;
        bool logs;
        char target[TUNNEL_TARGET_MAX];
        char *units; /* JSON text */
        char token[TOKENS_ID_MAX + 8];
        uint64_t opened_at, closed_at;
        uint64_t bytes_in, bytes_out;
        char reason[TUNNEL_REASON_MAX];
} Closed;

struct Tunnels {
        sd_event *event;
        const CloudConfig *config;
        Devices *devices;
        Store *store;
        TunnelsHooks hooks;
        TunnelStream *hash[TUNNEL_HASH_SIZE];
        TunnelStream *all;
        Link *links;
        unsigned n_streams;
        uint32_t next_sid;
        Closed history[TUNNEL_HISTORY_MAX];
        size_t history_next, history_len;
        bool stopping;
};

static void stream_end(TunnelStream *s, const char *reason, bool send_delete);
static void stream_update_io(TunnelStream *s);
static void stream_maybe_free(TunnelStream *s);
static void stream_split_wake(TunnelStream *s);

/* ---- helpers ------------------------------------------------------------ */

static unsigned stream_hash(const Device *d, uint32_t sid) {
        uint64_t k = (uint64_t)(uintptr_t)d ^ ((uint64_t)sid * 0x9e3779b97f4a7c15ULL);

        return (unsigned)((k ^ (k >> 29)) % TUNNEL_HASH_SIZE);
}

static TunnelStream *stream_find(Tunnels *t, const Device *d, uint32_t sid) {
        for (TunnelStream *s = t->hash[stream_hash(d, sid)]; s; s = s->hash_next)
                if (s->link && s->link->device == d && s->sid == sid)
                        return s;
        return NULL;
}

static Link *link_find(Tunnels *t, const Device *d) {
        for (Link *l = t->links; l; l = l->next)
                if (l->device == d)
                        return l;
        return NULL;
}

static void link_maybe_free(Link *l) {
        Tunnels *t = l->t;

        if (l->streams || l->msgs)
                return;
        if (l->prev)
                l->prev->next = l->next;
        else
                t->links = l->next;
        if (l->next)
                l->next->prev = l->prev;
        free(l);
}

/* Clean UTF-8 text of at most TUNNEL_REASON_MAX - 1 bytes from a device,
 * control characters replaced by blanks; "" if it is not UTF-8. */
static void copy_reason(const uint8_t *data, size_t len, char out[static TUNNEL_REASON_MAX]) {
        out[0] = 0;
        if (!data || len == 0)
                return;
        if (len >= TUNNEL_REASON_MAX) {
                len = TUNNEL_REASON_MAX - 1;
                for (size_t k = 0; k < 3 && len > 0 && (data[len] & 0xc0) == 0x80; k++)
                        len--;
        }
        if (proto_utf8_check((const char *)data, len) < 0)
                return;
        for (size_t i = 0; i < len; i++) {
                /* C0, DEL and C1 (U+0080..U+009F, 0xC2 0x80..0x9F: CSI
                 * is one of them) never reach an operator's terminal. */
                if (data[i] == 0xc2 && i + 1 < len && data[i + 1] >= 0x80 && data[i + 1] <= 0x9f) {
                        out[i] = out[i + 1] = ' ';
                        i++;
                        continue;
                }
                out[i] = data[i] < 0x20 || data[i] == 0x7f ? ' ' : (char)data[i];
        }
        out[len] = 0;
}

static json_t *error_json(const char *text) {
        return json_pack("{s:b, s:s}", "ok", 0, "error", text);
}

static struct MHD_Response *json_response(json_t *j) {
        struct MHD_Response *resp;
        char *s;

        if (!j)
                return NULL;
        s = json_dumps(j, JSON_COMPACT);
        json_decref(j);
        if (!s)
                return NULL;
        resp = MHD_create_response_from_buffer(strlen(s), s, MHD_RESPMEM_MUST_FREE);
        if (!resp) {
                free(s);
                return NULL;
        }
        (void)MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "application/json");
        return resp;
}

static enum MHD_Result queue_json(struct MHD_Connection *connection, unsigned status, json_t *j) {
        struct MHD_Response *resp = json_response(j);
        enum MHD_Result ret;

        if (!resp)
                return MHD_NO;
        if (status == MHD_HTTP_UPGRADE_REQUIRED) {
                (void)MHD_add_response_header(resp, MHD_HTTP_HEADER_UPGRADE, TUNNEL_UPGRADE);
                (void)MHD_add_response_header(resp, MHD_HTTP_HEADER_CONNECTION, "Upgrade");
        }
        ret = MHD_queue_response(connection, status, resp);
        MHD_destroy_response(resp);
        return ret;
}

static enum MHD_Result queue_error(struct MHD_Connection *connection, unsigned status, const char *fmt, ...)
        _printf_(3, 4);
static enum MHD_Result queue_error(struct MHD_Connection *connection, unsigned status, const char *fmt, ...) {
        char text[TUNNEL_REASON_MAX + 160];
        va_list ap;

        va_start(ap, fmt);
        vsnprintf(text, sizeof(text), fmt, ap);
        va_end(ap);
        return queue_json(connection, status, error_json(text));
}

static void stream_resume(TunnelStream *s) {
        s->logs_watch = sd_event_source_disable_unref(s->logs_watch);
        if (!s->suspended || !s->connection)
                return;
        s->suspended = false;
        MHD_resume_connection(s->connection);
        s->t->hooks.kick_api(s->t->hooks.userdata);
}

/* The answer the client gets on the next call of the access handler. */
static void stream_set_answer(TunnelStream *s, unsigned status, json_t *j) {
        struct MHD_Response *resp = json_response(j);

        if (s->response)
                MHD_destroy_response(s->response);
        s->response = resp;
        s->status = status;
        stream_resume(s);
}

static void stream_set_error(TunnelStream *s, unsigned status, const char *fmt, ...) _printf_(3, 4);
static void stream_set_error(TunnelStream *s, unsigned status, const char *fmt, ...) {
        char text[TUNNEL_REASON_MAX + 160];
        va_list ap;

        va_start(ap, fmt);
        vsnprintf(text, sizeof(text), fmt, ap);
        va_end(ap);
        stream_set_answer(s, status, error_json(text));
}

/* ---- events, audit and history ------------------------------------------ */

static json_t *stream_json(const TunnelStream *s, bool with_reason) {
        json_t *j = json_pack("{s:I, s:s, s:I, s:I}", "stream", (json_int_t)s->sid, "token", s->token, "bytes_in",
                              (json_int_t)s->received, "bytes_out", (json_int_t)s->sent);

        if (!j)
                return NULL;
        if (s->logs)
                (void)json_object_set(j, "units", s->units);
        else
                (void)json_object_set_new(j, "target", json_string(s->target));
        if (with_reason)
                (void)json_object_set_new(j, "reason", json_string(s->reason));
        return j;
}

static void stream_audit(TunnelStream *s, const char *action, unsigned status, bool with_reason) {
        json_t *detail = stream_json(s, with_reason);

        if (detail && status)
                (void)json_object_set_new(detail, "status", json_integer(status));
        (void)store_audit(s->t->store, s->token, action, s->device, detail, s->host);
        json_decref(detail);
}

/* The stream is open for the client (101 or 200): its event and record. */
static void stream_announce(TunnelStream *s, unsigned status) {
        Tunnels *t = s->t;

        s->announced = true;
        stream_audit(s, s->logs ? "logs.read" : "tunnel.open", status, false);
        t->hooks.publish(t->hooks.userdata, "tether/tunnel/opened", s->device, stream_json(s, false));
        log_info("Device '%s': %s %" PRIu32 " opened (%s, %s).", s->device, s->logs ? "log stream" : "tunnel", s->sid,
                 s->logs ? "journal" : s->target, s->token);
}

static void history_add(Tunnels *t, const TunnelStream *s) {
        Closed *c = &t->history[t->history_next];

        free(c->units);
        *c = (Closed){ .sid = s->sid, .logs = s->logs, .opened_at = s->opened_at, .closed_at = now_realtime_usec(),
                       .bytes_in = s->received, .bytes_out = s->sent };
        memcpy(c->device, s->device, sizeof(c->device));
        memcpy(c->target, s->target, sizeof(c->target));
        memcpy(c->token, s->token, sizeof(c->token));
        memcpy(c->reason, s->reason, sizeof(c->reason));
        c->units = s->units ? json_dumps(s->units, JSON_COMPACT) : NULL;
        t->history_next = (t->history_next + 1) % TUNNEL_HISTORY_MAX;
        if (t->history_len < TUNNEL_HISTORY_MAX)
                t->history_len++;
}

/* ---- messages to the device ---------------------------------------------- */

static void msg_free(Msg *m) {
        Link *l = m->link;

        if (m->prev)
                m->prev->next = m->next;
        else
                l->msgs = m->next;
        if (m->next)
                m->next->prev = m->prev;
        l->inflight -= m->len;
        free(m);
}

static void msg_done(int error, unsigned code, const uint8_t *data, size_t len, void *userdata) {
        Msg *m = userdata;
        Link *l = m->link;
        TunnelStream *s = m->stream;

        /* m stays linked (keeping its link alive) until the end. */
        m->call = NULL;
        l->inflight -= m->len;
        m->len = 0;
        if (s && s->link) {
                char text[TUNNEL_REASON_MAX];

                if (error == -ETIMEDOUT)
                        stream_end(s, "the device did not answer", false);
                else if (error < 0)
                        stream_end(s, "device disconnected", false);
                else if (code == COAP_RESPONSE_CODE(404))
                        /* The device ended it: it drops its side silently. */
                        stream_end(s, s->reason[0] ? s->reason : "ended by the device", false);
                else if (code >> 5 != 2) {
                        copy_reason(data, len, text);
                        stream_end(s, text[0] ? text : "refused by the device", false);
                }
        }
        /* The budget grew: the link's streams may read their clients again. */
        for (TunnelStream *x = l->streams; x; x = x->link_next)
                stream_update_io(x);
        msg_free(m);
        link_maybe_free(l);
}

/* POST/DELETE /t/SID to the device; len payload bytes and
 * PROTO_STREAM_MESSAGE_COST count against the link budget until answered. */
static int stream_send(TunnelStream *s, coap_pdu_code_t method, const char *const *query, int cf, const void *data,
                       size_t len) {
        Link *l = s->link;
        Msg *m;
        int r;

        if (!l)
                return -ENOTCONN;
        m = calloc(1, sizeof(*m));
        if (!m)
                return -ENOMEM;
        m->link = l;
        m->stream = s;
        m->len = len + PROTO_STREAM_MESSAGE_COST;
        r = devices_request(l->device, method, PROTO_PATH_STREAM, s->sid_text, query, cf, data, len, msg_done, m,
                            &m->call);
        if (r < 0) {
                free(m);
                return r;
        }
        m->next = l->msgs;
        if (l->msgs)
                l->msgs->prev = m;
        l->msgs = m;
        l->inflight += m->len;
        return 0;
}

/* Data (len bytes, may be 0) with ack= of what was consumed, and fin. */
static int stream_send_data(TunnelStream *s, const void *data, size_t len, bool fin) {
        char ack[32];
        const char *query[3];
        size_t n = 0;
        int r;

        if (s->consumed > s->acked) {
                snprintf(ack, sizeof(ack), "ack=%" PRIu64, s->consumed);
                query[n++] = ack;
        }
        if (fin)
                query[n++] = "fin";
        query[n] = NULL;
        if (len == 0 && n == 0)
                return 0;
        r = stream_send(s, COAP_REQUEST_CODE_POST, query, len > 0 ? PROTO_CF_OCTETS : -1, data, len);
        if (r < 0)
                return r;
        s->acked = s->consumed;
        s->sent += len;
        if (fin)
                s->fin_sent = true;
        return 0;
}

/* Ack when a quarter of the window was consumed since the last ack, or
 * when the buffer ran empty with something unacked. */
static void stream_maybe_ack(TunnelStream *s) {
        uint64_t unacked = s->consumed - s->acked;

        if (!s->link || unacked == 0)
                return;
        if (unacked >= s->window / 4 || s->buf_len == 0) {
                int r = stream_send_data(s, NULL, 0, false);

                if (r < 0 && r != -ENOBUFS)
                        stream_end(s, "cannot send to the device", false);
        }
}

/* ---- the end of a stream ---------------------------------------------------- */

static void stream_close_client(TunnelStream *s) {
        s->io = sd_event_source_disable_unref(s->io);
        if (s->urh) {
                struct MHD_UpgradeResponseHandle *urh = s->urh;

                s->urh = NULL;
                s->fd = -1;
                (void)MHD_upgrade_action(urh, MHD_UPGRADE_ACTION_CLOSE);
                s->t->hooks.kick_api(s->t->hooks.userdata);
        }
}

/* The device side ends now (a DELETE with reason unless send_delete is
 * false); the client gets its answer or its connection closes. */
static void stream_end(TunnelStream *s, const char *reason, bool send_delete) {
        Tunnels *t = s->t;
        Link *l = s->link;
        TunnelStream **pp;

        if (!l)
                return;
        if (reason && reason != s->reason)
                snprintf(s->reason, sizeof(s->reason), "%s", reason);
        if (send_delete)
                (void)stream_send(s, COAP_REQUEST_CODE_DELETE, NULL, PROTO_CF_TEXT, s->reason, strlen(s->reason));
        devices_call_cancel(s->open_call);
        s->open_call = NULL;
        s->timer = sd_event_source_disable_unref(s->timer);
        for (Msg *m = l->msgs; m; m = m->next)
                if (m->stream == s)
                        m->stream = NULL;
        for (pp = &t->hash[stream_hash(l->device, s->sid)]; *pp; pp = &(*pp)->hash_next)
                if (*pp == s) {
                        *pp = s->hash_next;
                        break;
                }
        if (s->link_prev)
                s->link_prev->link_next = s->link_next;
        else
                l->streams = s->link_next;
        if (s->link_next)
                s->link_next->link_prev = s->link_prev;
        l->n_streams--;
        t->n_streams--;
        s->link = NULL;
        link_maybe_free(l);

        if (s->announced) {
                stream_audit(s, "tunnel.close", 0, true);
                t->hooks.publish(t->hooks.userdata, "tether/tunnel/closed", s->device, stream_json(s, true));
                log_info("Device '%s': %s %" PRIu32 " closed: %s (%" PRIu64 " bytes in, %" PRIu64 " out).", s->device,
                         s->logs ? "log stream" : "tunnel", s->sid, s->reason, s->received, s->sent);
                history_add(t, s);
        }
        s->state = STREAM_ENDED;

        /* The client's side. A split stream's attached requests end: the
         * down body cut short (unless it got everything), the up answered
         * 410. */
        if (s->split)
                stream_split_wake(s);
        if (!s->connection)
                return;
        if (!s->announced) {
                if (!s->response)
                        stream_set_error(s, MHD_HTTP_BAD_GATEWAY, "Stream to device '%s' ended: %s", s->device,
                                         s->reason);
                return;
        }
        if (s->logs) {
                stream_resume(s); /* the reader ends the response */
                return;
        }
        if (s->split)
                return; /* the open request has its 201 */
        /* A tunnel: what the device sent and the client has not read yet
         * is discarded, as the protocol says of data in flight. */
        stream_close_client(s);
}

static void stream_maybe_free(TunnelStream *s) {
        Tunnels *t = s->t;

        if (s->link || s->connection || s->urh || s->down || s->up)
                return;
        if (s->all_prev)
                s->all_prev->all_next = s->all_next;
        else
                t->all = s->all_next;
        if (s->all_next)
                s->all_next->all_prev = s->all_prev;
        if (s->response)
                MHD_destroy_response(s->response);
        (void)sd_event_source_disable_unref(s->down_watch);
        (void)sd_event_source_disable_unref(s->up_watch);
        (void)sd_event_source_disable_unref(s->logs_watch);
        json_decref(s->units);
        free(s->extra);
        free(s->buf);
        free(s);
}

/* Graceful: both fins, everything delivered. */
static void stream_check_done(TunnelStream *s) {
        if (!s->link || !s->fin_sent || !s->fin_received || s->buf_len > 0 || s->extra_len > s->extra_off)
                return;
        stream_end(s, "closed", false);
}

/* ---- the device's data -------------------------------------------------- */

static int stream_buffer(TunnelStream *s, const uint8_t *data, size_t len) {
        if (len == 0)
                return 0;
        if (!s->buf) {
                s->buf = malloc(s->window);
                if (!s->buf)
                        return -ENOMEM;
                s->buf_off = s->buf_len = 0;
        }
        if (s->buf_off + s->buf_len + len > s->window) {
                memmove(s->buf, s->buf + s->buf_off, s->buf_len);
                s->buf_off = 0;
        }
        /* The credit check keeps what is unconsumed within the window. */
        assert(s->buf_len + len <= s->window);
        memcpy(s->buf + s->buf_off + s->buf_len, data, len);
        s->buf_len += len;
        return 0;
}

static void stream_consumed(TunnelStream *s, size_t n) {
        s->buf_off += n;
        s->buf_len -= n;
        s->consumed += n;
        if (s->buf_len == 0) {
                /* An idle stream costs little. */
                free(s->buf);
                s->buf = NULL;
                s->buf_off = 0;
        }
        stream_maybe_ack(s);
}

/* Write what is buffered to the client's socket. */
static void stream_flush_client(TunnelStream *s) {
        while (s->fd >= 0 && s->buf_len > 0) {
                ssize_t n = send(s->fd, s->buf + s->buf_off, s->buf_len, MSG_NOSIGNAL | MSG_DONTWAIT);

                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
                        break;
                if (n <= 0) {
                        stream_end(s, "closed by the client", true);
                        return;
                }
                s->last_active = now_usec();
                stream_consumed(s, (size_t)n);
                if (!s->link)
                        return;
        }
        if (s->fd >= 0 && s->buf_len == 0 && s->fin_received && !s->shut_wr) {
                (void)shutdown(s->fd, SHUT_WR);
                s->shut_wr = true;
        }
        stream_check_done(s);
}

static void stream_deliver(TunnelStream *s, const uint8_t *data, size_t len) {
        if (stream_buffer(s, data, len) < 0) {
                stream_end(s, "out of memory", true);
                return;
        }
        if (s->logs) {
                stream_resume(s);
                return;
        }
        if (s->split) {
                stream_split_wake(s);
                return;
        }
        stream_flush_client(s);
        if (s->link)
                stream_update_io(s);
}

/* ---- the client's socket (tunnels) ---------------------------------------- */

static size_t stream_send_room(TunnelStream *s) {
        uint64_t credit = s->peer_ack + s->peer_window - s->sent;
        size_t room = PROTO_STREAM_CHUNK_MAX;

        if (!s->link || s->link->inflight + PROTO_STREAM_MESSAGE_COST >= PROTO_STREAM_INFLIGHT_MAX)
                return 0;
        if (room > PROTO_STREAM_INFLIGHT_MAX - s->link->inflight - PROTO_STREAM_MESSAGE_COST)
                room = PROTO_STREAM_INFLIGHT_MAX - s->link->inflight - PROTO_STREAM_MESSAGE_COST;
        if (credit < room)
                room = (size_t)credit;
        return room;
}

static void resume_connection(TunnelStream *s, struct MHD_Connection *connection, bool *suspended,
                              sd_event_source **watch) {
        *watch = sd_event_source_disable_unref(*watch);
        if (!*suspended || !connection)
                return;
        *suspended = false;
        MHD_resume_connection(connection);
        s->t->hooks.kick_api(s->t->hooks.userdata);
}

static int stream_watch_cb(sd_event_source *es, int fd, uint32_t revents, void *userdata) {
        TunnelStream *s = userdata;

        if (s->link)
                stream_end(s, s->t->stopping ? "shutting down" : "closed by the client", true);
        return 0;
}

/* A split half waits (suspended) for bytes or room; its socket is watched
 * for the client's end meanwhile. */
static void suspend_connection(TunnelStream *s, struct MHD_Connection *connection, bool *suspended,
                               sd_event_source **watch) {
        const union MHD_ConnectionInfo *ci;

        if (*suspended)
                return;
        ci = MHD_get_connection_info(connection, MHD_CONNECTION_INFO_CONNECTION_FD);
        MHD_suspend_connection(connection);
        *suspended = true;
        if (ci && ci->connect_fd >= 0 && !*watch)
                (void)sd_event_add_io(s->t->event, watch, ci->connect_fd, EPOLLRDHUP, stream_watch_cb, s);
}

/* A split stream's requests run again when they can make progress: the
 * down one with bytes to give, the device's fin or the stream's end; the
 * up one with room to send or the stream's end. */
static size_t up_min_send(size_t pending) {
        if (pending == 0)
                return 1;
        return pending < TUNNEL_UP_MIN_SEND ? pending : TUNNEL_UP_MIN_SEND;
}

static void stream_split_wake(TunnelStream *s) {
        if (s->down && s->down_suspended && (s->buf_len > 0 || s->fin_received || !s->link))
                resume_connection(s, s->down, &s->down_suspended, &s->down_watch);
        if (s->up && s->up_suspended &&
            (!s->link || stream_send_room(s) >= up_min_send(s->up_pending)))
                resume_connection(s, s->up, &s->up_suspended, &s->up_watch);
}

static void stream_update_io(TunnelStream *s) {
        uint32_t events = 0;

        if (s->split) {
                stream_split_wake(s);
                return;
        }
        if (!s->io)
                return;
        if (s->link && s->state == STREAM_OPEN && !s->client_eof && !s->fin_sent && stream_send_room(s) > 0)
                events |= EPOLLIN;
        if (s->buf_len > 0)
                events |= EPOLLOUT;
        if (events == 0) {
                (void)sd_event_source_set_enabled(s->io, SD_EVENT_OFF);
                return;
        }
        (void)sd_event_source_set_io_events(s->io, events);
        (void)sd_event_source_set_enabled(s->io, SD_EVENT_ON);
}

/* Send what the client sent with its request head first. */
static void stream_send_extra(TunnelStream *s) {
        while (s->link && s->extra_off < s->extra_len) {
                size_t n = stream_send_room(s);

                if (n == 0)
                        return;
                if (n > s->extra_len - s->extra_off)
                        n = s->extra_len - s->extra_off;
                if (stream_send_data(s, s->extra + s->extra_off, n, false) < 0)
                        return;
                s->extra_off += n;
        }
}

static void stream_read_client(TunnelStream *s) {
        uint8_t buf[PROTO_STREAM_CHUNK_MAX];
        size_t room;
        ssize_t n;
        int r;

        stream_send_extra(s);
        if (s->extra_off < s->extra_len)
                return;
        room = stream_send_room(s);
        if (room == 0 || s->client_eof || s->fin_sent)
                return;
        n = recv(s->fd, buf, room, MSG_DONTWAIT);
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
                return;
        if (n < 0) {
                stream_end(s, "closed by the client", true);
                return;
        }
        s->last_active = now_usec();
        if (n == 0)
                s->client_eof = true;
        r = stream_send_data(s, buf, (size_t)n, n == 0);
        if (r == -ENOBUFS)
                /* The device reads nothing: what the client sent is lost,
                 * so is the stream. */
                stream_end(s, "the device is not reading", true);
        else if (r < 0)
                stream_end(s, "cannot send to the device", false);
        else
                stream_check_done(s);
}

static int stream_io_cb(sd_event_source *es, int fd, uint32_t revents, void *userdata) {
        TunnelStream *s = userdata;

        if (revents & EPOLLOUT)
                stream_flush_client(s);
        if (s->link && (revents & (EPOLLIN | EPOLLHUP | EPOLLERR)))
                stream_read_client(s);
        if (s->link)
                stream_update_io(s);
        else
                s->io = sd_event_source_disable_unref(s->io);
        return 0;
}

static int stream_idle_cb(sd_event_source *es, uint64_t usec, void *userdata) {
        TunnelStream *s = userdata;
        uint64_t idle = (uint64_t)s->t->config->tunnel_idle_sec * USEC_PER_SEC, now = now_usec();

        if (now - s->last_active >= idle) {
                stream_end(s, "client idle", true);
                return 0;
        }
        (void)sd_event_source_set_time(es, s->last_active + idle);
        (void)sd_event_source_set_enabled(es, SD_EVENT_ONESHOT);
        return 0;
}

static void stream_upgraded(void *cls, struct MHD_Connection *connection, void *con_cls, const char *extra_in,
                            size_t extra_in_size, MHD_socket sock, struct MHD_UpgradeResponseHandle *urh) {
        TunnelStream *s = cls;
        int flags, r;

        s->urh = urh;
        s->fd = sock;
        if (!s->link) {
                stream_close_client(s);
                return;
        }
        flags = fcntl(sock, F_GETFL);
        if (flags < 0 || fcntl(sock, F_SETFL, flags | O_NONBLOCK) < 0) {
                stream_end(s, "cannot use the client's socket", true);
                return;
        }
        if (extra_in_size > 0) {
                s->extra = malloc(extra_in_size);
                if (!s->extra) {
                        stream_end(s, "out of memory", true);
                        return;
                }
                memcpy(s->extra, extra_in, extra_in_size);
                s->extra_len = extra_in_size;
        }
        r = sd_event_add_io(s->t->event, &s->io, sock, EPOLLIN, stream_io_cb, s);
        if (r < 0) {
                stream_end(s, "cannot watch the client's socket", true);
                return;
        }
        s->last_active = now_usec();
        r = sd_event_add_time(s->t->event, &s->timer, CLOCK_MONOTONIC,
                              s->last_active + (uint64_t)s->t->config->tunnel_idle_sec * USEC_PER_SEC, USEC_PER_SEC,
                              stream_idle_cb, s);
        if (r < 0) {
                stream_end(s, "cannot arm the idle timer", true);
                return;
        }
        stream_send_extra(s);
        stream_flush_client(s);
        if (s->link)
                stream_update_io(s);
}

/* ---- the split transport ------------------------------------------------------ */

static int stream_attach_timeout_cb(sd_event_source *es, uint64_t usec, void *userdata) {
        TunnelStream *s = userdata;

        s->timer = sd_event_source_disable_unref(s->timer);
        stream_end(s, "client did not attach", true);
        return 0;
}

/* The tunnel is connected on the device: the client gets its 201 with
 * the key, and AttachSec to attach both halves. */
static void stream_split_ready(TunnelStream *s) {
        unsigned attach = s->t->config->tunnel_attach_sec;
        uint8_t rnd[TUNNEL_KEY_BYTES];
        struct MHD_Response *resp;
        int r;

        s->timer = sd_event_source_disable_unref(s->timer);
        if (RAND_bytes(rnd, sizeof(rnd)) != 1) {
                stream_set_error(s, MHD_HTTP_SERVICE_UNAVAILABLE, "Cannot make a stream key");
                stream_end(s, "no random bytes", true);
                return;
        }
        hex_encode(rnd, sizeof(rnd), s->key);
        OPENSSL_cleanse(rnd, sizeof(rnd));
        r = sd_event_add_time_relative(s->t->event, &s->timer, CLOCK_MONOTONIC, (uint64_t)attach * USEC_PER_SEC,
                                       USEC_PER_SEC / 100, stream_attach_timeout_cb, s);
        if (r < 0) {
                stream_set_error(s, MHD_HTTP_SERVICE_UNAVAILABLE, "Cannot wait for the client");
                stream_end(s, "cannot wait", true);
                return;
        }
        resp = json_response(json_pack("{s:b, s:I, s:s, s:I}", "ok", 1, "stream", (json_int_t)s->sid, "key", s->key,
                                       "attach_within", (json_int_t)attach));
        if (!resp) {
                stream_end(s, "out of memory", true);
                return;
        }
        (void)MHD_add_response_header(resp, "Tether-Stream", s->sid_text);
        (void)MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store");
        if (s->response)
                MHD_destroy_response(s->response);
        s->response = resp;
        s->status = MHD_HTTP_CREATED;
        s->state = STREAM_OPEN;
        stream_announce(s, MHD_HTTP_CREATED);
        stream_resume(s);
}

/* Both halves are attached: from now on the idle timer. */
static void stream_split_attached(TunnelStream *s) {
        int r;

        if (!s->link || !s->down_attached || !s->up_attached)
                return;
        s->timer = sd_event_source_disable_unref(s->timer);
        s->last_active = now_usec();
        r = sd_event_add_time(s->t->event, &s->timer, CLOCK_MONOTONIC,
                              s->last_active + (uint64_t)s->t->config->tunnel_idle_sec * USEC_PER_SEC, USEC_PER_SEC,
                              stream_idle_cb, s);
        if (r < 0)
                stream_end(s, "cannot arm the idle timer", true);
}

/* The down body: the device's bytes as MHD takes them (credit flows back
 * from here); the end after the device's fin, cut short on a reset. */
static ssize_t stream_down_reader(void *cls, uint64_t pos, char *out, size_t max) {
        TunnelStream *s = cls;
        size_t n = s->buf_len;

        if (n == 0 && s->fin_received) {
                s->down_done = true;
                stream_check_done(s);
                return MHD_CONTENT_READER_END_OF_STREAM;
        }
        /* Reset: what the client has not read yet is discarded. */
        if (!s->link || s->t->stopping)
                return MHD_CONTENT_READER_END_WITH_ERROR;
        if (n == 0) {
                suspend_connection(s, s->down, &s->down_suspended, &s->down_watch);
                return 0;
        }
        if (n > max)
                n = max;
        memcpy(out, s->buf + s->buf_off, n);
        s->last_active = now_usec();
        stream_consumed(s, n);
        return (ssize_t)n;
}

/* The up body: bytes are taken only within the room to send (the
 * device's credit, the link budget); otherwise the request waits
 * suspended with the rest unconsumed in MHD's read buffer. After the
 * stream's end the rest is read and dropped. */
static enum MHD_Result stream_up_data(TunnelStream *s, struct MHD_Connection *connection, const char *data,
                                      size_t *size) {
        int r;

        if (*size > 0) {
                while (*size > 0 && s->link && !s->up_done) {
                        size_t n = stream_send_room(s);

                        if (n < up_min_send(*size)) {
                                s->up_pending = *size;
                                suspend_connection(s, connection, &s->up_suspended, &s->up_watch);
                                return MHD_YES;
                        }
                        if (n > *size)
                                n = *size;
                        r = stream_send_data(s, data, n, false);
                        if (r == -ENOBUFS)
                                stream_end(s, "the device is not reading", true);
                        else if (r < 0)
                                stream_end(s, "cannot send to the device", false);
                        if (r < 0)
                                break;
                        s->last_active = now_usec();
                        s->up_bytes += n;
                        data += n;
                        *size -= n;
                }
                *size = 0;
                return MHD_YES;
        }
        /* The end of the body: fin, when it may be sent. */
        if (s->link && !s->up_done) {
                if (stream_send_room(s) == 0) {
                        s->up_pending = 0;
                        suspend_connection(s, connection, &s->up_suspended, &s->up_watch);
                        return MHD_YES;
                }
                r = stream_send_data(s, NULL, 0, true);
                if (r == -ENOBUFS)
                        stream_end(s, "the device is not reading", true);
                else if (r < 0)
                        stream_end(s, "cannot send to the device", false);
                else {
                        s->up_done = true;
                        s->last_active = now_usec();
                        stream_check_done(s);
                }
        }
        if (s->up_done)
                return queue_json(connection, MHD_HTTP_OK,
                                  json_pack("{s:b, s:I}", "ok", 1, "bytes", (json_int_t)s->up_bytes));
        return queue_error(connection, MHD_HTTP_GONE, "stream ended: %s", s->reason);
}

static const Closed *history_find(Tunnels *t, const char *device, uint32_t sid) {
        for (size_t i = 0; i < t->history_len; i++) {
                const Closed *c = &t->history[(t->history_next + TUNNEL_HISTORY_MAX - 1 - i) % TUNNEL_HISTORY_MAX];

                if (c->sid == sid && streq(c->device, device))
                        return c;
        }
        return NULL;
}

/* GET .../tunnels/SID/down or POST .../tunnels/SID/up: the checks, then
 * the request is the stream's half. */
static enum MHD_Result tunnel_attach(Tunnels *t, struct MHD_Connection *connection, TunnelRoute route,
                                     const char *device, uint32_t sid, const char *method, const TokenAuth *auth,
                                     TunnelStream **state) {
        bool down = route == TUNNEL_ROUTE_DOWN;
        const char *key = MHD_lookup_connection_value(connection, MHD_HEADER_KIND, TUNNEL_KEY_HEADER);
        char actor[TOKENS_ID_MAX + 8];
        struct MHD_Response *resp;
        TunnelStream *s = NULL;
        enum MHD_Result ret;
        Device *d;

        if (!streq(method, down ? MHD_HTTP_METHOD_GET : MHD_HTTP_METHOD_POST))
                return queue_error(connection, MHD_HTTP_METHOD_NOT_ALLOWED, down ? "Use GET" : "Use POST");
        snprintf(actor, sizeof(actor), "token:%s", auth->id);
        d = devices_find(t->devices, device);
        if (d && sid > 0)
                s = stream_find(t, d, sid);
        if (!s || !s->split || !s->announced) {
                /* Ended: its reason, for the token that opened it. */
                const Closed *c = sid > 0 ? history_find(t, device, sid) : NULL;

                if (c && streq(c->token, actor))
                        return queue_error(connection, MHD_HTTP_GONE, "stream ended: %s", c->reason);
                return queue_error(connection, MHD_HTTP_NOT_FOUND, "No stream %" PRIu32 " to device '%s' to attach to",
                                   sid, device);
        }
        if (!streq(s->token, actor))
                return queue_error(connection, MHD_HTTP_FORBIDDEN, "The stream was opened with another token");
        if (!key || strlen(key) != strlen(s->key) || CRYPTO_memcmp(key, s->key, strlen(s->key)) != 0)
                return queue_error(connection, MHD_HTTP_FORBIDDEN, "Wrong or missing " TUNNEL_KEY_HEADER);
        if (down ? s->down_attached : s->up_attached)
                return queue_error(connection, MHD_HTTP_CONFLICT, "The stream's %s is attached already",
                                   down ? "down" : "up");
        if (down) {
                resp = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, TUNNEL_DOWN_BLOCK, stream_down_reader, s,
                                                         NULL);
                if (!resp)
                        return MHD_NO;
                (void)MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "application/octet-stream");
                (void)MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store");
                (void)MHD_add_response_header(resp, "X-Accel-Buffering", "no");
                (void)MHD_add_response_header(resp, "Tether-Stream", s->sid_text);
                ret = MHD_queue_response(connection, MHD_HTTP_OK, resp);
                MHD_destroy_response(resp);
                if (ret != MHD_YES)
                        return ret;
                s->down = connection;
                s->down_attached = true;
        } else {
                s->up = connection;
                s->up_attached = true;
        }
        *state = s;
        stream_split_attached(s);
        return MHD_YES;
}

/* The tunnel is connected on the device: the client gets its 101. */
static void stream_tunnel_ready(TunnelStream *s) {
        struct MHD_Response *resp;

        if (s->split) {
                stream_split_ready(s);
                return;
        }
        resp = MHD_create_response_for_upgrade(stream_upgraded, s);
        s->timer = sd_event_source_disable_unref(s->timer);
        if (!resp) {
                stream_end(s, "out of memory", true);
                return;
        }
        (void)MHD_add_response_header(resp, MHD_HTTP_HEADER_UPGRADE, TUNNEL_UPGRADE);
        (void)MHD_add_response_header(resp, MHD_HTTP_HEADER_CONNECTION, "Upgrade");
        (void)MHD_add_response_header(resp, "Tether-Stream", s->sid_text);
        if (s->response)
                MHD_destroy_response(s->response);
        s->response = resp;
        s->status = MHD_HTTP_SWITCHING_PROTOCOLS;
        s->state = STREAM_OPEN;
        stream_announce(s, MHD_HTTP_SWITCHING_PROTOCOLS);
        stream_resume(s);
}

/* ---- log streams: the HTTP response ----------------------------------------- */

static ssize_t stream_logs_reader(void *cls, uint64_t pos, char *out, size_t max) {
        TunnelStream *s = cls;
        size_t n = s->buf_len;

        if (n == 0) {
                if (s->fin_received) {
                        stream_check_done(s);
                        return MHD_CONTENT_READER_END_OF_STREAM;
                }
                if (!s->link || s->t->stopping)
                        return MHD_CONTENT_READER_END_WITH_ERROR;
                /* MHD polls no suspended connection: the client's
                 * socket is watched meanwhile, so that one who left ends
                 * a quiet follow stream (and frees its slot) at once. */
                suspend_connection(s, s->connection, &s->suspended, &s->logs_watch);
                return 0;
        }
        if (n > max)
                n = max;
        memcpy(out, s->buf + s->buf_off, n);
        stream_consumed(s, n);
        return (ssize_t)n;
}

static void stream_logs_ready(TunnelStream *s) {
        struct MHD_Response *resp =
                MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, TUNNEL_LOGS_BLOCK, stream_logs_reader, s, NULL);

        if (!resp) {
                stream_end(s, "out of memory", true);
                return;
        }
        (void)MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "application/x-ndjson");
        (void)MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
        (void)MHD_add_response_header(resp, "X-Accel-Buffering", "no");
        (void)MHD_add_response_header(resp, "Tether-Stream", s->sid_text);
        if (s->response)
                MHD_destroy_response(s->response);
        s->response = resp;
        s->status = MHD_HTTP_OK;
        s->state = STREAM_OPEN;
        stream_announce(s, MHD_HTTP_OK);
        /* The cloud sends nothing on a log stream. */
        if (stream_send_data(s, NULL, 0, true) < 0)
                stream_end(s, "cannot send to the device", false);
        stream_resume(s);
}

/* ---- opening ---------------------------------------------------------------- */

static int stream_open_timeout_cb(sd_event_source *es, uint64_t usec, void *userdata) {
        TunnelStream *s = userdata;

        s->timer = sd_event_source_disable_unref(s->timer);
        stream_set_error(s, MHD_HTTP_GATEWAY_TIMEOUT, "Timed out waiting for device '%s' to connect to %s",
                         s->device, s->target);
        stream_end(s, "no answer in time", true);
        return 0;
}

static void stream_open_done(int error, unsigned code, const uint8_t *data, size_t len, void *userdata) {
        TunnelStream *s = userdata;
        char text[TUNNEL_REASON_MAX];
        unsigned cls = code >> 5;
        int r;

        s->open_call = NULL;
        copy_reason(data, len, text);
        if (error == -ETIMEDOUT) {
                stream_set_error(s, MHD_HTTP_GATEWAY_TIMEOUT, "Timed out waiting for device '%s'", s->device);
                stream_end(s, "no answer in time", true);
                return;
        }
        if (error < 0) {
                stream_set_error(s, MHD_HTTP_SERVICE_UNAVAILABLE, "Device '%s' went offline", s->device);
                stream_end(s, "device disconnected", false);
                return;
        }
        if (code == COAP_RESPONSE_CODE(201)) {
                r = tunnel_parse_open_answer(data, len, &s->peer_window);
                if (r < 0) {
                        stream_set_error(s, MHD_HTTP_BAD_GATEWAY, "Device '%s' sent an invalid answer", s->device);
                        stream_end(s, "invalid answer to the open", true);
                        return;
                }
                if (s->logs) {
                        stream_logs_ready(s);
                        return;
                }
                s->state = STREAM_CONNECTING;
                if (s->device_opened) {
                        stream_tunnel_ready(s);
                        return;
                }
                r = sd_event_add_time_relative(s->t->event, &s->timer, CLOCK_MONOTONIC,
                                               (uint64_t)s->t->config->call_timeout_sec * USEC_PER_SEC,
                                               USEC_PER_SEC / 100, stream_open_timeout_cb, s);
                if (r < 0) {
                        stream_set_error(s, MHD_HTTP_SERVICE_UNAVAILABLE, "Cannot wait for device '%s'", s->device);
                        stream_end(s, "cannot wait", true);
                }
                return;
        }
        /* Refused: the device has no stream. */
        if (code == COAP_RESPONSE_CODE(404))
                stream_set_error(s, MHD_HTTP_NOT_IMPLEMENTED,
                                 "The agent on device '%s' is too old for %s (it has no streams); update it",
                                 s->device, s->logs ? "log streams" : "tunnels");
        else if (code == COAP_RESPONSE_CODE(403))
                stream_set_error(s, MHD_HTTP_FORBIDDEN, "%s", text[0] ? text : "refused by the device");
        else if (code == COAP_RESPONSE_CODE(429))
                stream_set_error(s, MHD_HTTP_TOO_MANY_REQUESTS, "%s", text[0] ? text : "too many streams");
        else if (code == COAP_RESPONSE_CODE(400))
                stream_set_error(s, MHD_HTTP_BAD_REQUEST, "%s", text[0] ? text : "refused by the device");
        else if (code == COAP_RESPONSE_CODE(503))
                stream_set_error(s, MHD_HTTP_SERVICE_UNAVAILABLE, "%s", text[0] ? text : "device busy");
        else
                stream_set_error(s, MHD_HTTP_BAD_GATEWAY, "Device '%s' answered %u.%02u%s%s", s->device, cls,
                                 code & 0x1f, text[0] ? ": " : "", text);
        if (text[0])
                snprintf(s->reason, sizeof(s->reason), "%s", text);
        else
                snprintf(s->reason, sizeof(s->reason), "refused (%u.%02u)", cls, code & 0x1f);
        stream_end(s, s->reason, false);
}

/* ---- the device's requests on /t/SID ------------------------------------------- */

static void reply(coap_pdu_t *response, unsigned code, const char *fmt, ...) _printf_(3, 4);
static void reply(coap_pdu_t *response, unsigned code, const char *fmt, ...) {
        char text[TUNNEL_REASON_MAX];
        uint8_t buf[4];
        va_list ap;
        int n;

        coap_pdu_set_code(response, code);
        va_start(ap, fmt);
        n = vsnprintf(text, sizeof(text), fmt, ap);
        va_end(ap);
        if (n <= 0)
                return;
        if ((size_t)n >= sizeof(text))
                n = sizeof(text) - 1;
        (void)coap_add_option(response, COAP_OPTION_CONTENT_FORMAT,
                              coap_encode_var_safe(buf, sizeof(buf), PROTO_CF_TEXT), buf);
        (void)coap_add_data(response, (size_t)n, (const uint8_t *)text);
}

/* A protocol error: 4.00 with text, and the stream is reset. */
static void protocol_error(TunnelStream *s, coap_pdu_t *response, const char *text) {
        reply(response, COAP_RESPONSE_CODE(400), "%s", text);
        if (!s->announced && s->connection && !s->response)
                stream_set_error(s, MHD_HTTP_BAD_GATEWAY, "Device '%s' broke the stream protocol: %s", s->device,
                                 text);
        stream_end(s, text, true);
}

static void stream_device_post(TunnelStream *s, const coap_pdu_t *request, coap_pdu_t *response) {
        TunnelQuery q = {};
        coap_opt_iterator_t it;
        coap_opt_filter_t filter;
        coap_opt_t *opt;
        const uint8_t *data = NULL;
        size_t len = 0;
        unsigned nopt = 0;

        coap_option_filter_clear(&filter);
        coap_option_filter_set(&filter, COAP_OPTION_URI_QUERY);
        coap_option_iterator_init(request, &it, &filter);
        while ((opt = coap_option_next(&it))) {
                if (++nopt > TUNNEL_QUERY_OPTIONS_MAX ||
                    tunnel_query_add(&q, (const char *)coap_opt_value(opt), coap_opt_length(opt)) < 0) {
                        protocol_error(s, response, "malformed query");
                        return;
                }
        }
        if (!coap_get_data(request, &len, &data))
                len = 0;
        if (len > PROTO_STREAM_CHUNK_MAX) {
                protocol_error(s, response, "data message too large");
                return;
        }
        if (q.open) {
                if (s->logs) {
                        protocol_error(s, response, "open on a log stream");
                        return;
                }
                if (s->device_opened) {
                        protocol_error(s, response, "open twice");
                        return;
                }
        }
        if (len > 0 && !s->logs && !s->device_opened && !q.open) {
                protocol_error(s, response, "data before open");
                return;
        }
        if (s->fin_received && (len > 0 || q.fin || q.open)) {
                protocol_error(s, response, "data after fin");
                return;
        }
        if (s->received + len > s->acked + s->window) {
                protocol_error(s, response, "window exceeded");
                return;
        }
        if (q.has_ack && (q.ack < s->peer_ack || q.ack > s->sent)) {
                protocol_error(s, response, "bad ack");
                return;
        }
        coap_pdu_set_code(response, COAP_RESPONSE_CODE(204));
        if (q.has_ack)
                s->peer_ack = q.ack;
        s->received += len;
        if (len > 0)
                s->last_active = now_usec();
        if (q.fin)
                s->fin_received = true;
        if (q.open) {
                s->device_opened = true;
                if (s->state == STREAM_CONNECTING)
                        stream_tunnel_ready(s);
        }
        if (len > 0 || q.fin)
                stream_deliver(s, data, len);
        else
                stream_check_done(s);
        if (s->link)
                stream_update_io(s);
}

void tunnels_device_request(Tunnels *t, Device *d, const coap_pdu_t *request, const char *sid_text,
                            coap_pdu_t *response) {
        coap_pdu_code_t method = coap_pdu_get_code(request);
        TunnelStream *s;
        uint32_t sid;

        if (tunnel_parse_sid(sid_text, &sid) < 0) {
                reply(response, COAP_RESPONSE_CODE(404), "no stream");
                return;
        }
        s = stream_find(t, d, sid);
        if (!s) {
                reply(response, COAP_RESPONSE_CODE(404), "no stream %" PRIu32, sid);
                return;
        }
        switch (method) {
        case COAP_REQUEST_CODE_POST:
                stream_device_post(s, request, response);
                return;
        case COAP_REQUEST_CODE_DELETE: {
                const uint8_t *data = NULL;
                char text[TUNNEL_REASON_MAX];
                size_t len = 0;

                if (!coap_get_data(request, &len, &data))
                        len = 0;
                copy_reason(data, len, text);
                coap_pdu_set_code(response, COAP_RESPONSE_CODE(202));
                if (!s->announced && s->connection) {
                        /* A tunnel whose connect failed, or a stream the
                         * device gave up before the client had it. */
                        if (s->logs)
                                stream_set_error(s, MHD_HTTP_BAD_GATEWAY, "Device '%s' ended the log stream: %s",
                                                 s->device, text[0] ? text : "no reason given");
                        else
                                stream_set_error(s, MHD_HTTP_BAD_GATEWAY, "%s",
                                                 text[0] ? text : "the device could not connect");
                }
                stream_end(s, text[0] ? text : "ended by the device", false);
                return;
        }
        default:
                reply(response, COAP_RESPONSE_CODE(405), "streams are opened by the cloud");
                return;
        }
}

void tunnels_device_gone(Tunnels *t, const Device *d) {
        Link *l;

        /* The link may go with its last stream: looked up each time. */
        while ((l = link_find(t, d)) && l->streams) {
                TunnelStream *s = l->streams;

                if (!s->announced && s->connection && !s->response)
                        stream_set_error(s, MHD_HTTP_SERVICE_UNAVAILABLE, "Device '%s' went offline", s->device);
                stream_end(s, "device disconnected", false);
        }
}

/* ---- HTTP --------------------------------------------------------------------- */

unsigned tunnel_route_scope(TunnelRoute route) {
        switch (route) {
        case TUNNEL_ROUTE_OPEN:
        case TUNNEL_ROUTE_DOWN:
        case TUNNEL_ROUTE_UP:
                return SCOPE_TUNNELS_OPEN;
        case TUNNEL_ROUTE_LOGS:
                return SCOPE_LOGS_READ;
        default:
                return SCOPE_DEVICES_READ;
        }
}

static bool header_has_token(const char *value, const char *token) {
        size_t n = strlen(token);

        for (const char *p = value; p && *p;) {
                p += strspn(p, " \t,");
                size_t k = strcspn(p, ",");
                size_t e = k;

                while (e > 0 && (p[e - 1] == ' ' || p[e - 1] == '\t'))
                        e--;
                if (e == n && strncasecmp(p, token, n) == 0)
                        return true;
                p += k;
        }
        return false;
}

static json_t *closed_json(const Closed *c) {
        json_t *j = json_pack("{s:I, s:s, s:s, s:I, s:I, s:I, s:I, s:s}", "sid", (json_int_t)c->sid, "kind",
                              c->logs ? "logs" : "tunnel", "token", c->token, "opened_at",
                              (json_int_t)(c->opened_at / USEC_PER_SEC), "closed_at",
                              (json_int_t)(c->closed_at / USEC_PER_SEC), "bytes_in", (json_int_t)c->bytes_in,
                              "bytes_out", (json_int_t)c->bytes_out, "reason", c->reason);

        if (!j)
                return NULL;
        if (c->logs)
                (void)json_object_set_new(j, "units", c->units ? json_loads(c->units, 0, NULL) : json_array());
        else
                (void)json_object_set_new(j, "target", json_string(c->target));
        return j;
}

static enum MHD_Result tunnel_list(Tunnels *t, struct MHD_Connection *connection, const char *device) {
        json_t *open = json_array(), *closed = json_array();
        size_t found = 0;

        if (!open || !closed) {
                json_decref(open);
                json_decref(closed);
                return MHD_NO;
        }
        for (TunnelStream *s = t->all; s; s = s->all_next) {
                json_t *j;

                if (!s->link || !s->announced || !streq(s->device, device))
                        continue;
                j = json_pack("{s:I, s:s, s:s, s:I, s:I, s:I}", "sid", (json_int_t)s->sid, "kind",
                              s->logs ? "logs" : "tunnel", "token", s->token, "opened_at",
                              (json_int_t)(s->opened_at / USEC_PER_SEC), "bytes_in", (json_int_t)s->received,
                              "bytes_out", (json_int_t)s->sent);
                if (j && s->logs)
                        (void)json_object_set(j, "units", s->units);
                else if (j)
                        (void)json_object_set_new(j, "target", json_string(s->target));
                if (j)
                        (void)json_array_append_new(open, j);
        }
        /* Newest first. */
        for (size_t i = 0; i < t->history_len && found < TUNNEL_HISTORY_DEVICE; i++) {
                const Closed *c = &t->history[(t->history_next + TUNNEL_HISTORY_MAX - 1 - i) % TUNNEL_HISTORY_MAX];

                if (!streq(c->device, device))
                        continue;
                found++;
                (void)json_array_append_new(closed, closed_json(c));
        }
        return queue_json(connection, MHD_HTTP_OK,
                          json_pack("{s:b, s:s, s:o, s:o}", "ok", 1, "device", device, "open", open, "closed", closed));
}

typedef struct UnitArgs {
        json_t *units;
        bool bad;
        bool too_many;
} UnitArgs;

static enum MHD_Result unit_arg(void *cls, enum MHD_ValueKind kind, const char *key, size_t key_size,
                                const char *value, size_t value_size) {
        UnitArgs *a = cls;

        if (key_size != 4 || memcmp(key, "unit", 4) != 0)
                return MHD_YES;
        if (json_array_size(a->units) >= TUNNEL_UNITS_MAX) {
                a->too_many = true;
                return MHD_NO;
        }
        if (!value || strlen(value) != value_size || tunnel_check_unit(value) < 0) {
                a->bad = true;
                return MHD_NO;
        }
        if (json_array_append_new(a->units, json_string(value)) < 0) {
                a->bad = true;
                return MHD_NO;
        }
        return MHD_YES;
}

/* A query parameter: NULL when absent, "" when it has no value or one
 * with a NUL byte. */
static const char *query_arg(struct MHD_Connection *connection, const char *key) {
        const char *v = NULL;
        size_t n = 0;

        if (MHD_lookup_connection_value_n(connection, MHD_GET_ARGUMENT_KIND, key, strlen(key), &v, &n) != MHD_YES)
                return NULL;
        return v && strlen(v) == n ? v : "";
}

static TunnelStream *stream_new(Tunnels *t, Link *l, bool logs, const char *device, const TokenAuth *auth,
                                const char *host) {
        TunnelStream *s = calloc(1, sizeof(*s));
        unsigned h;

        if (!s)
                return NULL;
        s->t = t;
        s->logs = logs;
        s->fd = -1;
        s->window = PROTO_STREAM_WINDOW_DEFAULT;
        s->auth = *auth;
        snprintf(s->token, sizeof(s->token), "token:%s", auth->id);
        snprintf(s->host, sizeof(s->host), "%s", host ? host : "?");
        snprintf(s->device, sizeof(s->device), "%s", device);
        s->opened_at = now_realtime_usec();
        /* Never reused in a session: ids count up for the cloud's life
         * (2^32 streams), and one still open on the device is skipped. */
        do {
                s->sid = ++t->next_sid;
        } while (s->sid == 0 || stream_find(t, l->device, s->sid));
        snprintf(s->sid_text, sizeof(s->sid_text), "%" PRIu32, s->sid);
        s->link = l;
        s->link_next = l->streams;
        if (l->streams)
                l->streams->link_prev = s;
        l->streams = s;
        l->n_streams++;
        t->n_streams++;
        h = stream_hash(l->device, s->sid);
        s->hash_next = t->hash[h];
        t->hash[h] = s;
        s->all_next = t->all;
        if (t->all)
                t->all->all_prev = s;
        t->all = s;
        return s;
}

static enum MHD_Result tunnel_start(Tunnels *t, struct MHD_Connection *connection, TunnelRoute route,
                                    const char *device, const TokenAuth *auth, const char *host,
                                    TunnelStream **state) {
        bool logs = route == TUNNEL_ROUTE_LOGS, split = false;
        char target[TUNNEL_TARGET_MAX] = "";
        _cleanup_(json_decrefp) json_t *body = NULL;
        json_t *units = NULL;
        _cleanup_free_ char *text = NULL;
        TunnelStream *s;
        Device *d;
        Link *l;
        int r;

        if (!logs) {
                const char *conn = MHD_lookup_connection_value(connection, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONNECTION);
                const char *upgrade = MHD_lookup_connection_value(connection, MHD_HEADER_KIND, MHD_HTTP_HEADER_UPGRADE);
                const char *arg = query_arg(connection, "target");

                /* With the Upgrade headers: the upgrade; with none: the
                 * split transport; another upgrade: 426. */
                split = !upgrade && !(conn && header_has_token(conn, "upgrade"));
                if (!split && (!conn || !header_has_token(conn, "upgrade") || !upgrade ||
                               !header_has_token(upgrade, TUNNEL_UPGRADE)))
                        return queue_error(connection, MHD_HTTP_UPGRADE_REQUIRED,
                                           "A tunnel upgrade needs 'Connection: Upgrade' and 'Upgrade: " TUNNEL_UPGRADE
                                           "' (or neither, for two plain requests)");
                if (!arg || !*arg)
                        return queue_error(connection, MHD_HTTP_BAD_REQUEST, "target=HOST:PORT is required");
                if (tunnel_parse_target(arg, target) < 0)
                        return queue_error(connection, MHD_HTTP_BAD_REQUEST,
                                           "Invalid target: IPV4:PORT or [IPV6]:PORT (numeric, port 1-65535)");
                body = json_pack("{s:s, s:i}", "target", target, "window", PROTO_STREAM_WINDOW_DEFAULT);
        } else {
                UnitArgs ua = { .units = json_array() };
                const char *since = query_arg(connection, "since"), *lines = query_arg(connection, "lines"),
                           *follow = query_arg(connection, "follow");
                uint64_t since_usec = 0;
                unsigned n_lines = 0;
                json_t *journal;

                if (!ua.units)
                        return MHD_NO;
                (void)MHD_get_connection_values_n(connection, MHD_GET_ARGUMENT_KIND, unit_arg, &ua);
                if (ua.too_many || ua.bad) {
                        json_decref(ua.units);
                        return ua.too_many ? queue_error(connection, MHD_HTTP_BAD_REQUEST, "At most %u units",
                                                         TUNNEL_UNITS_MAX)
                                           : queue_error(connection, MHD_HTTP_BAD_REQUEST,
                                                         "Invalid unit name (e.g. tetherd.service)");
                }
                units = ua.units;
                if (since && tunnel_parse_since(since, &since_usec) < 0) {
                        json_decref(units);
                        return queue_error(connection, MHD_HTTP_BAD_REQUEST,
                                           "since must be an RFC 3339 time or Unix seconds");
                }
                if (lines && tunnel_parse_lines(lines, &n_lines) < 0) {
                        json_decref(units);
                        return queue_error(connection, MHD_HTTP_BAD_REQUEST, "lines must be 0-%u",
                                           TUNNEL_LINES_MAX);
                }
                if (follow && !streq(follow, "1") && !streq(follow, "0") && !streq(follow, "true") &&
                    !streq(follow, "false") && *follow) {
                        json_decref(units);
                        return queue_error(connection, MHD_HTTP_BAD_REQUEST, "follow must be 1 or 0");
                }
                journal = json_pack("{s:O, s:b}", "units", units,
                                    "follow", follow && (streq(follow, "1") || streq(follow, "true") || !*follow));
                if (journal && since)
                        (void)json_object_set_new(journal, "since", json_integer((json_int_t)since_usec));
                if (journal && lines)
                        (void)json_object_set_new(journal, "lines", json_integer(n_lines));
                body = journal ? json_pack("{s:o, s:i}", "journal", journal, "window", PROTO_STREAM_WINDOW_DEFAULT)
                               : NULL;
        }
        if (!body) {
                json_decref(units);
                return MHD_NO;
        }

        d = devices_find(t->devices, device);
        if (!d) {
                json_decref(units);
                return queue_error(connection, MHD_HTTP_NOT_FOUND, "Device '%s' not found", device);
        }
        if (device_elsewhere(d)) {
                char msg[256];

                json_decref(units);
                snprintf(msg, sizeof(msg),
                         "Device '%s' is connected to cluster node '%s': open %s through that node's API", device,
                         device_elsewhere(d), logs ? "log streams" : "tunnels");
                return queue_json(connection, MHD_HTTP_MISDIRECTED_REQUEST,
                                  json_pack("{s:b, s:s, s:s}", "ok", 0, "error", msg, "node", device_elsewhere(d)));
        }
        if (!device_session(d)) {
                json_decref(units);
                return queue_error(connection, MHD_HTTP_CONFLICT, "Device '%s' is offline", device);
        }
        if (t->n_streams >= t->config->tunnel_max_streams) {
                json_decref(units);
                return queue_error(connection, MHD_HTTP_TOO_MANY_REQUESTS,
                                   "Too many streams open on this cloud (MaxStreams=%u)", t->config->tunnel_max_streams);
        }
        l = link_find(t, d);
        if (l && l->n_streams >= t->config->tunnel_max_per_device) {
                json_decref(units);
                return queue_error(connection, MHD_HTTP_TOO_MANY_REQUESTS,
                                   "Too many streams open to device '%s' (MaxStreamsPerDevice=%u)", device,
                                   t->config->tunnel_max_per_device);
        }
        if (!l) {
                l = calloc(1, sizeof(*l));
                if (!l) {
                        json_decref(units);
                        return MHD_NO;
                }
                l->t = t;
                l->device = d;
                l->next = t->links;
                if (t->links)
                        t->links->prev = l;
                t->links = l;
        }
        s = stream_new(t, l, logs, device, auth, host);
        if (!s) {
                json_decref(units);
                link_maybe_free(l);
                return MHD_NO;
        }
        s->connection = connection;
        s->split = split;
        s->units = units;
        memcpy(s->target, target, sizeof(target));
        text = json_dumps(body, JSON_COMPACT);
        r = text ? devices_request(d, COAP_REQUEST_CODE_PUT, PROTO_PATH_STREAM, s->sid_text, NULL, PROTO_CF_JSON, text,
                                   strlen(text), stream_open_done, s, &s->open_call)
                 : -ENOMEM;
        if (r < 0) {
                enum MHD_Result ret;

                s->connection = NULL;
                snprintf(s->reason, sizeof(s->reason), "not sent: %s", strerror(-r));
                stream_end(s, s->reason, false);
                stream_maybe_free(s);
                if (r == -ENOTCONN)
                        ret = queue_error(connection, MHD_HTTP_CONFLICT, "Device '%s' is offline", device);
                else if (r == -ENOBUFS)
                        ret = queue_error(connection, MHD_HTTP_SERVICE_UNAVAILABLE,
                                          "Device '%s' is not reading what is sent to it; try again later", device);
                else
                        ret = queue_error(connection, MHD_HTTP_SERVICE_UNAVAILABLE,
                                          "Cannot send to device '%s': %s", device, strerror(-r));
                return ret;
        }
        MHD_suspend_connection(connection);
        s->suspended = true;
        *state = s;
        return MHD_YES;
}

enum MHD_Result tunnel_api_handler(Tunnels *t, struct MHD_Connection *connection, TunnelRoute route,
                                   const char *device, uint32_t sid, const char *method, const TokenAuth *auth,
                                   const char *host, const char *upload_data, size_t *upload_data_size,
                                   TunnelStream **state) {
        TunnelStream *s = *state;

        if (s && route == TUNNEL_ROUTE_UP)
                return stream_up_data(s, connection, upload_data, upload_data_size);
        if (s && route == TUNNEL_ROUTE_DOWN) {
                *upload_data_size = 0;
                return MHD_YES; /* its response is queued */
        }
        if (*upload_data_size > 0) {
                /* No route here takes a body: read and dropped. */
                *upload_data_size = 0;
                return MHD_YES;
        }
        if (s) {
                enum MHD_Result ret;

                if (!s->response)
                        return MHD_YES;
                ret = MHD_queue_response(connection, s->status, s->response);
                MHD_destroy_response(s->response);
                s->response = NULL;
                return ret;
        }
        if (t->stopping)
                return queue_error(connection, MHD_HTTP_SERVICE_UNAVAILABLE, "Shutting down");
        if (proto_name_check(device, strlen(device), PROTO_NAME_DEVICE) < 0)
                return queue_error(connection, MHD_HTTP_NOT_FOUND, "Device not found");
        switch (route) {
        case TUNNEL_ROUTE_LIST:
                if (!streq(method, MHD_HTTP_METHOD_GET))
                        return queue_error(connection, MHD_HTTP_METHOD_NOT_ALLOWED, "Use GET");
                if (!devices_find(t->devices, device))
                        return queue_error(connection, MHD_HTTP_NOT_FOUND, "Device '%s' not found", device);
                return tunnel_list(t, connection, device);
        case TUNNEL_ROUTE_OPEN:
                if (!streq(method, MHD_HTTP_METHOD_POST))
                        return queue_error(connection, MHD_HTTP_METHOD_NOT_ALLOWED, "Use POST");
                return tunnel_start(t, connection, route, device, auth, host, state);
        case TUNNEL_ROUTE_LOGS:
                if (!streq(method, MHD_HTTP_METHOD_GET))
                        return queue_error(connection, MHD_HTTP_METHOD_NOT_ALLOWED, "Use GET");
                return tunnel_start(t, connection, route, device, auth, host, state);
        case TUNNEL_ROUTE_DOWN:
        case TUNNEL_ROUTE_UP:
                return tunnel_attach(t, connection, route, device, sid, method, auth, state);
        default:
                return MHD_NO;
        }
}

void tunnel_api_request_free(TunnelStream *s, const struct MHD_Connection *connection) {
        bool done;

        if (!s)
                return;
        if (s->split && connection && connection == s->down) {
                s->down = NULL;
                s->down_suspended = false;
                s->down_watch = sd_event_source_disable_unref(s->down_watch);
                done = s->down_done;
        } else if (s->split && connection && connection == s->up) {
                s->up = NULL;
                s->up_suspended = false;
                s->up_watch = sd_event_source_disable_unref(s->up_watch);
                done = s->up_done;
        } else {
                s->connection = NULL;
                s->suspended = false;
                /* A split stream's client has its 201: it attaches, or
                 * the stream ends at the attach deadline. */
                done = s->split && s->announced;
        }
        if (s->link && !done)
                stream_end(s, s->t->stopping ? "shutting down" : "closed by the client", true);
        stream_close_client(s);
        stream_maybe_free(s);
}

void tunnels_api_shutdown(Tunnels *t) {
        if (!t)
                return;
        t->stopping = true;
        for (TunnelStream *s = t->all, *next; s; s = next) {
                next = s->all_next;
                if (s->link && !s->announced && s->connection && !s->response)
                        stream_set_error(s, MHD_HTTP_SERVICE_UNAVAILABLE, "Shutting down");
                stream_end(s, "shutting down", true);
                stream_close_client(s);
                stream_resume(s);
        }
}

unsigned tunnels_end_revoked(Tunnels *t, Tokens *tokens) {
        unsigned n = 0;

        if (!t)
                return 0;
        for (TunnelStream *s = t->all, *next; s; s = next) {
                next = s->all_next;
                bool revoked;

                if (!s->link)
                        continue;
                revoked = tokens_recheck(tokens, &s->auth) != 0;
                /* A token restricted by tags reaches the device no more
                 * once its tags changed: as for an open now, so for one
                 * that is open. */
                if (!revoked && tokens_may_reach(tokens, &s->auth, s->device))
                        continue;
                if (!s->announced && s->connection && !s->response)
                        stream_set_error(s, revoked ? MHD_HTTP_UNAUTHORIZED : MHD_HTTP_FORBIDDEN,
                                         revoked ? "The access token has been revoked"
                                                 : "The access token no longer reaches the device");
                stream_end(s, revoked ? "token revoked" : "token no longer reaches the device", true);
                n++;
        }
        return n;
}

unsigned tunnels_count(Tunnels *t) { return t ? t->n_streams : 0; }

/* ---- the object ---------------------------------------------------------------- */

int tunnels_new(sd_event *event, const CloudConfig *config, Devices *devices, Store *store,
                const TunnelsHooks *hooks, Tunnels **ret) {
        Tunnels *t = calloc(1, sizeof(*t));

        if (!t)
                return -ENOMEM;
        t->event = event;
        t->config = config;
        t->devices = devices;
        t->store = store;
        t->hooks = *hooks;
        *ret = t;
        return 0;
}

Tunnels *tunnels_free(Tunnels *t) {
        if (!t)
                return NULL;
        t->stopping = true;
        for (TunnelStream *s = t->all, *next; s; s = next) {
                next = s->all_next;
                stream_end(s, "shutting down", true);
                stream_close_client(s);
        }
        while (t->links) {
                Link *l = t->links;

                while (l->msgs) {
                        Msg *m = l->msgs;

                        devices_call_cancel(m->call);
                        msg_free(m);
                }
                link_maybe_free(l);
        }
        while (t->all) {
                TunnelStream *s = t->all;

                s->connection = s->down = s->up = NULL;
                stream_maybe_free(s);
        }
        for (size_t i = 0; i < TUNNEL_HISTORY_MAX; i++)
                free(t->history[i].units);
        free(t);
        return NULL;
}
