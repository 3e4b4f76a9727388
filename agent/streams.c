/* SPDX-License-Identifier: Apache-2.0 */
#include <coap3/coap.h>
#include <errno.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "journal-stream.h"
#include "log.h"
#include "proto.h"
#include "stream-proto.h"
#include "streams.h"
#include "util.h"

/* How long the cloud has to answer one of our messages. */
#define STREAMS_ANSWER_TIMEOUT_MS 60000
/* A tunnel's connect to its target. */
#define STREAMS_CONNECT_TIMEOUT_MS 30000
/* Below this much link budget a socket is not read (unless nothing is
 * in flight), so that a full link is not fed one small message at a time. */
#define STREAMS_READ_MIN 4096
/* A buffer of cloud→device data starts this small and doubles up to the
 * window. */
#define STREAMS_BUFFER_MIN 16384

typedef struct Stream Stream;

struct Stream {
        Streams *owner;
        Stream *next;
        uint32_t sid;
        StreamKind kind;
        char what[STREAM_ADDR_TEXT_MAX]; /* the target's text (tunnel) */
        StreamAddr target;
        char **units; /* log: what was asked for (NULL-terminated; empty: the default set) */
        uint32_t window; /* ours, as announced at open */
        uint64_t idle_usec; /* [Tunnel] IdleSec= at open */

        /* device → cloud */
        uint64_t sent;        /* payload bytes sent */
        uint64_t peer_ack;    /* the cloud's latest ack= */
        uint32_t peer_window; /* the cloud's window */
        /* cloud → device */
        uint64_t received; /* payload bytes received */
        uint64_t consumed; /* of which written to the socket */
        uint64_t ack_sent; /* the latest ack= we sent */
        uint8_t *buf;      /* received, not yet written: buf[start..start+len); NULL when empty */
        size_t buf_start, buf_len, buf_cap;

        int fd;
        sd_event_source *io;
        sd_event_source *timer; /* connect timeout, then idle */
        uint64_t last_activity; /* CLOCK_MONOTONIC µs */
        bool connecting, open_sent, local_eof, fin_sent, fin_received, shut_wr;

        JournalStream *journal;

        /* Ending: the DELETE's reason, sent from the pump, then freed. */
        char *close_reason;
};

struct Streams {
        sd_event *event;
        Conn *conn;
        const Config *config;
        Stream *streams;
        size_t inflight; /* stream messages sent and not answered, this session: payload + PROTO_STREAM_MESSAGE_COST each */
        uint64_t epoch;  /* counts sessions: answers from an earlier one are ignored */
        sd_event_source *pump;
        uint8_t *rbuf; /* PROTO_STREAM_CHUNK_MAX, while any tunnel is open */
        StreamsStats stats;
};

/* One message of ours waiting for its answer. */
typedef struct Sent {
        Streams *owner;
        uint64_t epoch;
        uint32_t sid;
        size_t len;
        bool fin;
} Sent;

static void stream_update_io(Stream *st);
static void stream_fail(Stream *st, const char *fmt, ...) _printf_(2, 3);

static Stream *stream_find(Streams *s, uint32_t sid) {
        for (Stream *st = s->streams; st; st = st->next)
                if (st->sid == sid)
                        return st;
        return NULL;
}

static void schedule_pump(Streams *s) {
        sd_event_source_set_enabled(s->pump, SD_EVENT_ONESHOT);
}

static void strv_free(char **v) {
        for (char **p = v; p && *p; p++)
                free(*p);
        free(v);
}

static void stream_close_local(Stream *st) {
        st->io = sd_event_source_disable_unref(st->io);
        st->timer = sd_event_source_disable_unref(st->timer);
        if (st->fd >= 0)
                close(st->fd);
        st->fd = -1;
        st->journal = journal_stream_free(st->journal);
        free(st->buf);
        st->buf = NULL;
        st->buf_start = st->buf_len = st->buf_cap = 0;
}

static void stream_destroy(Stream *st) {
        Streams *s = st->owner;
        bool tunnels = false;

        for (Stream **p = &s->streams; *p; p = &(*p)->next)
                if (*p == st) {
                        *p = st->next;
                        break;
                }
        stream_close_local(st);
        strv_free(st->units);
        free(st->close_reason);
        free(st);
        s->stats.open--;
        for (Stream *o = s->streams; o; o = o->next)
                tunnels = tunnels || o->kind == STREAM_TUNNEL;
        if (!tunnels) {
                free(s->rbuf);
                s->rbuf = NULL;
        }
}

/* What may be sent on st now: its credit, the link's budget, one chunk. */
static size_t stream_room(Stream *st) {
        Streams *s = st->owner;
        uint64_t credit = st->peer_ack + st->peer_window - st->sent;
        size_t link = s->inflight + PROTO_STREAM_MESSAGE_COST >= PROTO_STREAM_INFLIGHT_MAX
                              ? 0
                              : PROTO_STREAM_INFLIGHT_MAX - s->inflight - PROTO_STREAM_MESSAGE_COST;
        size_t room = credit < link ? (size_t)credit : link;

        if (s->inflight > 0 && link < STREAMS_READ_MIN && credit >= STREAMS_READ_MIN)
                return 0;
        return room < PROTO_STREAM_CHUNK_MAX ? room : PROTO_STREAM_CHUNK_MAX;
}

static bool stream_ack_due(Stream *st) {
        uint64_t unacked = st->consumed - st->ack_sent;

        return unacked > 0 && (unacked >= st->window / 4 || st->buf_len == 0);
}

static void on_answer(int error, unsigned code, const uint8_t *data, size_t len, uint32_t retry_sec,
                      void *userdata) {
        Sent *m = userdata;
        Streams *s = m->owner;
        Stream *st;

        if (m->epoch != s->epoch) {
                free(m);
                return;
        }
        s->inflight -= m->len + PROTO_STREAM_MESSAGE_COST < s->inflight ? m->len + PROTO_STREAM_MESSAGE_COST
                                                                         : s->inflight;
        st = stream_find(s, m->sid);
        if (st && error < 0) {
                /* The session went (every stream goes with it) or the cloud
                 * stopped answering: drop our side. */
                log_warning("Stream %" PRIu32 " ended: %s", st->sid,
                            error == -ETIMEDOUT ? "the cloud did not answer" : "connection lost");
                stream_destroy(st);
                st = NULL;
        } else if (st && code == COAP_RESPONSE_CODE(404)) {
                log_info("Stream %" PRIu32 " ended: the cloud no longer has it", st->sid);
                stream_destroy(st);
                st = NULL;
        } else if (st && COAP_RESPONSE_CLASS(code) != 2) {
                bool clean = len > 0 && proto_text_clean((const char *)data, len, 256);

                log_warning("Stream %" PRIu32 " ended: the cloud refused a message with %d.%02d: %.*s", st->sid,
                            COAP_RESPONSE_CLASS(code), code & 0x1f, clean ? (int)len : 0,
                            clean ? (const char *)data : "");
                stream_destroy(st);
                st = NULL;
        } else if (st && m->fin && st->kind == STREAM_LOG) {
                /* A log stream is done once its last message is taken: the
                 * cloud has nothing to send on it. */
                stream_destroy(st);
                st = NULL;
        }
        free(m);
        /* The link budget grew: streams that waited for it may go on. */
        for (Stream *o = s->streams; o; o = o->next)
                stream_update_io(o);
        schedule_pump(s);
}

/* POST /t/{sid} with data and the options due (ack, fin, open). */
static int stream_send(Stream *st, const void *data, size_t len, bool fin, bool open) {
        Streams *s = st->owner;
        char query[64] = "", rest[16];
        Sent *m;
        int r;

        if (st->consumed > st->ack_sent)
                snprintf(query, sizeof(query), "ack=%" PRIu64, st->consumed);
        if (fin)
                strcat(query, query[0] ? "&fin" : "fin");
        if (open)
                strcat(query, query[0] ? "&open" : "open");
        m = calloc(1, sizeof(*m));
        if (!m)
                return -ENOMEM;
        *m = (Sent){ .owner = s, .epoch = s->epoch, .sid = st->sid, .len = len, .fin = fin };
        snprintf(rest, sizeof(rest), "%" PRIu32, st->sid);
        r = conn_request_query(s->conn, COAP_REQUEST_CODE_POST, PROTO_PATH_STREAM, rest, query, data, len,
                               PROTO_CF_OCTETS, STREAMS_ANSWER_TIMEOUT_MS, on_answer, m);
        if (r < 0) {
                free(m);
                return r;
        }
        st->ack_sent = st->consumed;
        st->sent += len;
        s->inflight += len + PROTO_STREAM_MESSAGE_COST;
        s->stats.bytes_out += len;
        if (fin)
                st->fin_sent = true;
        if (len > 0)
                st->last_activity = now_usec();
        return 0;
}

static void on_delete_answer(int error, unsigned code, const uint8_t *data, size_t len, uint32_t retry_sec,
                             void *userdata) {
}

/* DELETE /t/{sid} with the reason, and forget the stream. */
static void stream_reset(Stream *st, const char *reason) {
        char rest[16];

        snprintf(rest, sizeof(rest), "%" PRIu32, st->sid);
        (void)conn_request_query(st->owner->conn, COAP_REQUEST_CODE_DELETE, PROTO_PATH_STREAM, rest, NULL, reason,
                                 strlen(reason), PROTO_CF_TEXT, STREAMS_ANSWER_TIMEOUT_MS, on_delete_answer, NULL);
        stream_destroy(st);
}

/* End st with a reason: the local side now, the DELETE from the pump
 * (never from within libcoap's handler). */
static void stream_fail(Stream *st, const char *fmt, ...) {
        char reason[256];
        va_list ap;

        if (st->close_reason)
                return;
        va_start(ap, fmt);
        vsnprintf(reason, sizeof(reason), fmt, ap);
        va_end(ap);
        log_info("Stream %" PRIu32 " (%s) ended: %s", st->sid, st->kind == STREAM_TUNNEL ? st->what : "logs", reason);
        stream_close_local(st);
        st->close_reason = strdup(reason);
        if (!st->close_reason) {
                stream_destroy(st);
                return;
        }
        schedule_pump(st->owner);
}

/* Gone gracefully: both fins, everything written. */
static bool stream_maybe_done(Stream *st) {
        if (st->kind != STREAM_TUNNEL || st->close_reason || !st->fin_sent || !st->fin_received || st->buf_len > 0)
                return false;
        log_info("Stream %" PRIu32 " (%s) closed (%" PRIu64 " bytes in, %" PRIu64 " out)", st->sid, st->what,
                 st->received, st->sent);
        stream_destroy(st);
        return true;
}

static void stream_update_io(Stream *st) {
        uint32_t events = 0;

        if (!st->io)
                return;
        if (st->connecting)
                events = EPOLLOUT;
        else {
                if (st->open_sent && !st->local_eof && !st->fin_sent && stream_room(st) > 0)
                        events |= EPOLLIN;
                if (st->buf_len > 0)
                        events |= EPOLLOUT;
        }
        if (events == 0) {
                sd_event_source_set_enabled(st->io, SD_EVENT_OFF);
                return;
        }
        sd_event_source_set_io_events(st->io, events);
        sd_event_source_set_enabled(st->io, SD_EVENT_ON);
}

/* Write what is buffered; -errno on a socket error. */
static int stream_flush(Stream *st) {
        while (st->buf_len > 0) {
                ssize_t n = write(st->fd, st->buf + st->buf_start, st->buf_len);

                if (n < 0)
                        return errno == EAGAIN || errno == EINTR ? 0 : -errno;
                st->buf_start += (size_t)n;
                st->buf_len -= (size_t)n;
                st->consumed += (uint64_t)n;
        }
        /* Nothing buffered, nothing held: an idle stream costs little. */
        free(st->buf);
        st->buf = NULL;
        st->buf_start = st->buf_cap = 0;
        if (st->fin_received && !st->shut_wr) {
                st->shut_wr = true;
                (void)shutdown(st->fd, SHUT_WR);
        }
        return 0;
}

/* Keep n bytes; the credit check guarantees they fit in the window. */
static int stream_buffer(Stream *st, const uint8_t *data, size_t n) {
        if (st->buf_cap - st->buf_start - st->buf_len < n) {
                if (st->buf_start > 0) {
                        memmove(st->buf, st->buf + st->buf_start, st->buf_len);
                        st->buf_start = 0;
                }
                if (st->buf_cap - st->buf_len < n) {
                        size_t cap = st->buf_cap ? st->buf_cap * 2 : STREAMS_BUFFER_MIN;
                        uint8_t *b;

                        while (cap < st->buf_len + n)
                                cap *= 2;
                        if (cap > st->window)
                                cap = st->window;
                        if (cap < st->buf_len + n)
                                return -ENOBUFS;
                        b = realloc(st->buf, cap);
                        if (!b)
                                return -ENOMEM;
                        st->buf = b;
                        st->buf_cap = cap;
                }
        }
        memcpy(st->buf + st->buf_start + st->buf_len, data, n);
        st->buf_len += n;
        return 0;
}

/* Cloud→device bytes: to the socket at once if it takes them, the rest
 * buffered until it is writable. */
static int stream_deliver(Stream *st, const uint8_t *data, size_t n) {
        if (!st->connecting && st->buf_len == 0) {
                ssize_t w = write(st->fd, data, n);

                if (w < 0 && errno != EAGAIN && errno != EINTR)
                        return -errno;
                if (w > 0) {
                        st->consumed += (uint64_t)w;
                        data += w;
                        n -= (size_t)w;
                }
        }
        return n > 0 ? stream_buffer(st, data, n) : 0;
}

static void stream_connected(Stream *st) {
        st->connecting = false;
        st->last_activity = now_usec();
        if (stream_send(st, NULL, 0, false, true) < 0) {
                stream_destroy(st);
                return;
        }
        st->open_sent = true;
        log_info("Stream %" PRIu32 ": connected to %s", st->sid, st->what);
        /* From now on the timer watches for idleness. */
        sd_event_source_set_time(st->timer, st->last_activity + st->idle_usec);
        sd_event_source_set_enabled(st->timer, SD_EVENT_ONESHOT);
        if (stream_flush(st) < 0) {
                stream_fail(st, "connection closed by %s", st->what);
                return;
        }
        if (!stream_maybe_done(st))
                stream_update_io(st);
}

static int on_socket(sd_event_source *src, int fd, uint32_t revents, void *userdata) {
        Stream *st = userdata;
        Streams *s = st->owner;

        if (st->connecting) {
                int err = 0;
                socklen_t l = sizeof(err);

                if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &l) < 0)
                        err = errno;
                if (err == 0 && !(revents & (EPOLLERR | EPOLLHUP))) {
                        stream_connected(st);
                        return 0;
                }
                stream_fail(st, "connect to %s failed: %s", st->what, strerror(err ?: ECONNREFUSED));
                return 0;
        }
        if (revents & EPOLLERR) {
                stream_fail(st, "connection closed by %s", st->what);
                return 0;
        }
        if (revents & EPOLLOUT) {
                bool had = st->buf_len > 0;

                if (stream_flush(st) < 0) {
                        stream_fail(st, "connection closed by %s", st->what);
                        return 0;
                }
                if (had)
                        st->last_activity = now_usec();
                if (stream_ack_due(st))
                        schedule_pump(s);
                if (stream_maybe_done(st))
                        return 0;
        }
        if (revents & (EPOLLIN | EPOLLHUP)) {
                size_t room = stream_room(st);
                ssize_t n;

                if (room > 0 && st->open_sent && !st->local_eof && !st->fin_sent) {
                        if (!s->rbuf) {
                                s->rbuf = malloc(PROTO_STREAM_CHUNK_MAX);
                                if (!s->rbuf) {
                                        stream_fail(st, "out of memory");
                                        return 0;
                                }
                        }
                        n = read(fd, s->rbuf, room);
                        if (n < 0 && errno != EAGAIN && errno != EINTR) {
                                stream_fail(st, "connection closed by %s", st->what);
                                return 0;
                        }
                        if (n == 0) {
                                st->local_eof = true;
                                if (stream_send(st, NULL, 0, true, false) < 0) {
                                        stream_destroy(st);
                                        return 0;
                                }
                                if (stream_maybe_done(st))
                                        return 0;
                        } else if (n > 0 && stream_send(st, s->rbuf, (size_t)n, false, false) < 0) {
                                stream_destroy(st);
                                return 0;
                        }
                }
        }
        stream_update_io(st);
        return 0;
}

static int on_timer(sd_event_source *src, uint64_t usec, void *userdata) {
        Stream *st = userdata;
        uint64_t idle = st->idle_usec, now = now_usec();

        if (st->connecting) {
                stream_fail(st, "connect to %s failed: %s", st->what, strerror(ETIMEDOUT));
                return 0;
        }
        if (now - st->last_activity >= idle) {
                stream_fail(st, "idle for %" PRIu64 " s", idle / 1000000);
                return 0;
        }
        sd_event_source_set_time(src, st->last_activity + idle);
        sd_event_source_set_enabled(src, SD_EVENT_ONESHOT);
        return 0;
}

/* The journal's hooks. */
static size_t journal_room(void *userdata) {
        Stream *st = userdata;

        return st->close_reason ? 0 : stream_room(st);
}

static int journal_send(void *userdata, const void *data, size_t len, bool fin) {
        Stream *st = userdata;
        int r = stream_send(st, data, len, fin, false);

        /* Not stream_fail(): that would free the reader calling us. */
        if (r < 0 && !st->close_reason) {
                st->close_reason = strdup("cannot send");
                schedule_pump(st->owner);
        }
        return r;
}

static void journal_failed(void *userdata, const char *reason) {
        stream_fail(userdata, "%s", reason);
}

static int on_pump(sd_event_source *src, void *userdata) {
        Streams *s = userdata;
        Stream *next;

        for (Stream *st = s->streams; st; st = next) {
                next = st->next;
                if (st->close_reason) {
                        _cleanup_free_ char *reason = TAKE_PTR(st->close_reason);
                        stream_reset(st, reason);
                        continue;
                }
                if (stream_ack_due(st) && stream_send(st, NULL, 0, false, false) < 0) {
                        stream_destroy(st);
                        continue;
                }
                if (st->journal)
                        journal_stream_kick(st->journal);
        }
        return 0;
}

static Stream *stream_new(Streams *s, uint32_t sid, const StreamOpen *o) {
        Stream *st = calloc(1, sizeof(*st));

        if (!st)
                return NULL;
        st->owner = s;
        st->sid = sid;
        st->kind = o->kind;
        st->fd = -1;
        st->window = s->config->tunnel_window;
        st->idle_usec = s->config->tunnel_idle_ms * 1000;
        st->peer_window = o->window;
        st->target = o->target;
        st->last_activity = now_usec();
        stream_addr_text(&o->target, st->what);
        st->units = calloc(o->n_units + 1, sizeof(char *));
        if (!st->units) {
                free(st);
                return NULL;
        }
        for (size_t i = 0; i < o->n_units; i++)
                if (!(st->units[i] = strdup(o->units[i]))) {
                        strv_free(st->units);
                        free(st);
                        return NULL;
                }
        st->next = s->streams;
        s->streams = st;
        s->stats.open++;
        return st;
}

static int tunnel_start(Stream *st) {
        Streams *s = st->owner;
        struct sockaddr_storage sa;
        socklen_t salen = stream_addr_sockaddr(&st->target, &sa);
        int r;

        st->fd = socket(st->target.family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, IPPROTO_TCP);
        if (st->fd < 0)
                return -errno;
        (void)setsockopt(st->fd, IPPROTO_TCP, TCP_NODELAY, &(int){ 1 }, sizeof(int));
        st->connecting = true;
        r = sd_event_add_io(s->event, &st->io, st->fd, EPOLLOUT, on_socket, st);
        if (r < 0)
                return r;
        r = sd_event_add_time(s->event, &st->timer, CLOCK_MONOTONIC, now_usec() + STREAMS_CONNECT_TIMEOUT_MS * 1000,
                              1000000, on_timer, st);
        if (r < 0)
                return r;
        if (connect(st->fd, (struct sockaddr *)&sa, salen) < 0 && errno != EINPROGRESS) {
                /* The outcome goes to the cloud as a DELETE after the 2.01. */
                stream_fail(st, "connect to %s failed: %s", st->what, strerror(errno));
                return 0;
        }
        return 0;
}

static bool units_allowed(const Config *cfg, char *const *units, char bad[static 64]) {
        for (; units && *units; units++)
                if (!stream_unit_allowed(cfg->logs_units, *units)) {
                        snprintf(bad, 64, "%s", *units);
                        return false;
                }
        return true;
}

#define ANSWER(a, ...) snprintf((a)->text, sizeof((a)->text), __VA_ARGS__)

static unsigned handle_open(Streams *s, uint32_t sid, const uint8_t *data, size_t len, ConnStreamAnswer *a) {
        _cleanup_(stream_open_done) StreamOpen o = {};
        const Config *cfg = s->config;
        char error[200] = "", bad[64];
        Stream *st;
        int r;

        r = stream_open_parse(data, len, &o, error, sizeof(error));
        if (r == -ENOMEM)
                return ANSWER(a, "out of memory"), COAP_RESPONSE_CODE(500);
        if (r < 0)
                return ANSWER(a, "%s", error), COAP_RESPONSE_CODE(400);
        if (stream_find(s, sid))
                return ANSWER(a, "stream %" PRIu32 " is in use", sid), COAP_RESPONSE_CODE(409);
        if (o.kind == STREAM_TUNNEL && cfg->n_tunnel_allow == 0)
                return ANSWER(a, "tunnels are off on this device ([Tunnel] Allow= is empty)"), COAP_RESPONSE_CODE(403);
        if (o.kind == STREAM_TUNNEL && !stream_addr_allowed(cfg->tunnel_allow, cfg->n_tunnel_allow, &o.target))
                return ANSWER(a, "target %s is not in [Tunnel] Allow=",
                              stream_addr_text(&o.target, (char[STREAM_ADDR_TEXT_MAX]){})),
                       COAP_RESPONSE_CODE(403);
        if (o.kind == STREAM_LOG && !cfg->logs_enabled)
                return ANSWER(a, "log streams are off on this device ([Logs] Enabled=no)"), COAP_RESPONSE_CODE(403);
        if (o.kind == STREAM_LOG && !units_allowed(cfg, o.units, bad))
                return ANSWER(a, "unit %s is not in [Logs] Units=", bad), COAP_RESPONSE_CODE(403);
        if (s->stats.open >= cfg->tunnel_max_streams) {
                a->max_age = 1;
                return ANSWER(a, "too many streams (MaxStreams=%u)", cfg->tunnel_max_streams),
                       COAP_RESPONSE_CODE(429);
        }
        st = stream_new(s, sid, &o);
        if (!st)
                return ANSWER(a, "out of memory"), COAP_RESPONSE_CODE(500);
        if (o.kind == STREAM_TUNNEL) {
                r = tunnel_start(st);
                if (r < 0) {
                        stream_destroy(st);
                        return ANSWER(a, "cannot start a tunnel: %s", strerror(-r)), COAP_RESPONSE_CODE(503);
                }
                log_info("Stream %" PRIu32 ": tunnel to %s opened", sid, st->what);
        } else {
                r = journal_stream_new(s->event, cfg->logs_directory, st->units, &o,
                                       &(JournalStreamHooks){ .userdata = st,
                                                              .room = journal_room,
                                                              .send = journal_send,
                                                              .failed = journal_failed },
                                       &st->journal, error, sizeof(error));
                if (r < 0) {
                        stream_destroy(st);
                        return ANSWER(a, "%s", error), COAP_RESPONSE_CODE(503);
                }
                log_info("Stream %" PRIu32 ": log stream opened", sid);
        }
        s->stats.opened++;
        a->json = true;
        ANSWER(a, "{\"window\":%" PRIu32 "}", st->window);
        return COAP_RESPONSE_CODE(201);
}

/* A protocol error: 4.00 with the text, and the stream reset with it. */
static unsigned protocol_error(Stream *st, ConnStreamAnswer *a, const char *text) {
        ANSWER(a, "%s", text);
        stream_fail(st, "%s", text);
        return COAP_RESPONSE_CODE(400);
}

static unsigned handle_data(Streams *s, uint32_t sid, const char *query, size_t query_len, const uint8_t *data,
                            size_t len, ConnStreamAnswer *a) {
        Stream *st = stream_find(s, sid);
        StreamQuery q;
        int r;

        if (!st || st->close_reason)
                return ANSWER(a, "no stream %" PRIu32, sid), COAP_RESPONSE_CODE(404);
        if (stream_query_parse(query, query_len, &q) < 0)
                return protocol_error(st, a, "malformed query");
        if (q.open)
                return protocol_error(st, a, "open is sent by the device only");
        if (q.have_ack) {
                if (q.ack < st->peer_ack || q.ack > st->sent)
                        return protocol_error(st, a, "ack out of range");
                st->peer_ack = q.ack;
        }
        if (len > 0) {
                if (st->kind != STREAM_TUNNEL)
                        return protocol_error(st, a, "data on a log stream");
                if (st->fin_received)
                        return protocol_error(st, a, "data after fin");
                if (len > PROTO_STREAM_CHUNK_MAX)
                        return protocol_error(st, a, "data message over 32768 bytes");
                if (st->received + len > st->ack_sent + st->window)
                        return protocol_error(st, a, "window exceeded");
                st->received += len;
                s->stats.bytes_in += len;
                st->last_activity = now_usec();
                r = stream_deliver(st, data, len);
                if (r < 0) {
                        stream_fail(st, r == -ENOMEM || r == -ENOBUFS ? "out of memory" : "connection closed by %s",
                                    st->what);
                        return COAP_RESPONSE_CODE(204);
                }
        }
        if (q.fin) {
                if (st->fin_received)
                        return protocol_error(st, a, "fin twice");
                st->fin_received = true;
                if (st->kind == STREAM_TUNNEL && !st->connecting && st->buf_len == 0 && !st->shut_wr) {
                        st->shut_wr = true;
                        (void)shutdown(st->fd, SHUT_WR);
                }
        }
        if (stream_ack_due(st) || (st->journal && q.have_ack))
                schedule_pump(s);
        if (st->kind == STREAM_LOG && st->fin_sent && st->fin_received) {
                stream_destroy(st);
                return COAP_RESPONSE_CODE(204);
        }
        if (!stream_maybe_done(st))
                stream_update_io(st);
        return COAP_RESPONSE_CODE(204);
}

unsigned streams_request(Streams *s, unsigned method, uint32_t sid, const char *query, size_t query_len,
                         const uint8_t *data, size_t len, ConnStreamAnswer *a) {
        Stream *st;
        unsigned code;

        switch (method) {
        case COAP_REQUEST_CODE_PUT:
                code = handle_open(s, sid, data, len, a);
                if (COAP_RESPONSE_CLASS(code) != 2) {
                        s->stats.refused++;
                        log_info("Stream %" PRIu32 " refused (%d.%02d): %s", sid, COAP_RESPONSE_CLASS(code),
                                 code & 0x1f, a->text);
                }
                return code;
        case COAP_REQUEST_CODE_POST:
                return handle_data(s, sid, query, query_len, data, len, a);
        case COAP_REQUEST_CODE_DELETE:
                st = stream_find(s, sid);
                if (!st || st->close_reason)
                        return ANSWER(a, "no stream %" PRIu32, sid), COAP_RESPONSE_CODE(404);
                /* The reason goes to the log only if it is clean text. */
                if (len > 0 && !proto_text_clean((const char *)data, len, 256))
                        len = 0;
                log_info("Stream %" PRIu32 " (%s) closed by the cloud: %.*s", sid,
                         st->kind == STREAM_TUNNEL ? st->what : "logs", (int)len,
                         len ? (const char *)data : "no reason given");
                stream_destroy(st);
                return COAP_RESPONSE_CODE(202);
        default:
                return ANSWER(a, "use PUT, POST or DELETE on /t/SID"), COAP_RESPONSE_CODE(405);
        }
}

void streams_connection_changed(Streams *s, bool connected) {
        if (connected)
                return;
        if (s->streams)
                log_info("Connection to the cloud lost: ending %" PRIu64 " stream(s)", s->stats.open);
        while (s->streams)
                stream_destroy(s->streams);
        s->inflight = 0;
        s->epoch++;
}

void streams_reconfigure(Streams *s, const Config *cfg) {
        s->config = cfg;
        for (Stream *st = s->streams; st; st = st->next) {
                char bad[64];

                if (st->close_reason)
                        continue;
                if (st->kind == STREAM_TUNNEL ? !stream_addr_allowed(cfg->tunnel_allow, cfg->n_tunnel_allow, &st->target)
                                              : !cfg->logs_enabled || !units_allowed(cfg, st->units, bad))
                        stream_fail(st, "no longer allowed");
        }
}

const StreamsStats *streams_stats(Streams *s) {
        return &s->stats;
}

int streams_new(sd_event *event, Conn *conn, const Config *cfg, Streams **ret) {
        _cleanup_(streams_freep) Streams *s = calloc(1, sizeof(Streams));
        int r;

        if (!s)
                return -ENOMEM;
        s->event = sd_event_ref(event);
        s->conn = conn;
        s->config = cfg;
        r = sd_event_add_defer(event, &s->pump, on_pump, s);
        if (r < 0)
                return r;
        sd_event_source_set_enabled(s->pump, SD_EVENT_OFF);
        *ret = TAKE_PTR(s);
        return 0;
}

Streams *streams_free(Streams *s) {
        if (!s)
                return NULL;
        while (s->streams)
                stream_destroy(s->streams);
        sd_event_source_disable_unref(s->pump);
        free(s->rbuf);
        sd_event_unref(s->event);
        free(s);
        return NULL;
}
