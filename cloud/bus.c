/* SPDX-License-Identifier: Apache-2.0 */
/* The NATS connection on the sd-event loop (bus.h).
 *
 * Threads: libnats calls on_nats_msg() (each subscription's delivery
 * thread) and the connection callbacks (its callback thread), which push
 * Items on the Bus's queue under b->lock and write the eventfd; on_wake() pops them on
 * the loop's thread and runs the callbacks. Everything else of the Bus is
 * the loop thread's.
 *
 * Lifetimes across threads: a BusSub whose natsSubscription has a message
 * handler stays allocated until libnats calls on_sub_complete() (after its
 * last handler call), and the Bus until every such completion and the
 * connection's closed callback ran (b->libnats_refs, waited for in
 * bus_free()). A BusSub freed by its owner, or a Bus being freed, is marked
 * under b->lock, so handlers still running drop what they got instead of
 * queuing it, and what was queued already is dropped there too.
 *
 * Requests: one subscription to "_INBOX.<nuid>.*"; each request gets a
 * token (the last subject token of its reply subject), a slot in
 * b->requests and an sd-event timer. A reply whose token is no longer in the
 * table (timed out, cancelled) is dropped. */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <limits.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "bus.h"
#include "log.h"
#include "util.h"

/* Per server on connect (libnats tries each once). */
#define BUS_CONNECT_TIMEOUT_MS 2000
#define BUS_RECONNECT_WAIT_MS 1000
/* A dead server is noticed after about PING_INTERVAL * (MAX_PINGS_OUT + 1). */
#define BUS_PING_INTERVAL_MS 4000
#define BUS_MAX_PINGS_OUT 2
/* Callbacks run per wake-up before the loop gets to other sources. */
#define BUS_DISPATCH_BATCH 256
#define BUS_REQUEST_BUCKETS 1024
/* How long bus_free() waits for libnats to finish with the Bus. */
#define BUS_CLOSE_WAIT_SEC 10
/* The acknowledgement of bus_kv_put()/bus_kv_delete(). */
#define BUS_KV_ACK_TIMEOUT_USEC (10ULL * 1000000ULL)
/* The timers of requests: how late they may fire. */
#define BUS_TIMER_ACCURACY_USEC 1000ULL
#define BUS_SUBJECT_MAX 1024

typedef enum SubKind {
        SUB_CORE,
        SUB_INBOX,
        SUB_FOLLOW,
        SUB_KV,
} SubKind;

typedef enum ItemKind {
        ITEM_MSG,
        ITEM_CONNECTION,
} ItemKind;

typedef struct Item {
        struct Item *next;
        ItemKind kind;
        BusSub *sub;  /* ITEM_MSG */
        natsMsg *msg; /* ITEM_MSG */
        bool up;      /* ITEM_CONNECTION */
} Item;

typedef struct BusFollow BusFollow;

struct BusSub {
        Bus *bus;
        SubKind kind;
        bus_msg_fn msg_fn;
        bus_kv_fn kv_fn;
        void *userdata;
        natsSubscription *sub;
        BusFollow *follow; /* SUB_FOLLOW */
        /* SUB_KV: the follow of the bucket's stream behind the watch, the
         * stream info request that tells whether it is empty, the length
         * of "$KV.BUCKET." and whether the initial values are in. */
        BusSub *kv_follow;
        BusRequest *kv_info;
        size_t kv_prefix_len;
        bool kv_loaded;
        BusSub *prev, *next; /* b->subs */
        /* Under b->lock: */
        bool dead;
        unsigned refs; /* the owner's, and libnats' until on_sub_complete() */
};

#define BUS_KV_INFO_TIMEOUT_USEC (10 * 1000000ULL)

typedef enum RequestKind {
        REQUEST_PLAIN,  /* bus_request() */
        REQUEST_JS_ACK, /* bus_js_publish_async() */
        REQUEST_KV,     /* bus_kv_put(), bus_kv_delete(): log failures */
} RequestKind;

struct BusRequest {
        Bus *bus;
        RequestKind kind;
        uint64_t token;
        BusRequest *prev, *next; /* b->requests[token % BUS_REQUEST_BUCKETS] */
        sd_event_source *timer;
        bus_reply_fn reply_fn;
        bus_ack_fn ack_fn;
        void *userdata;
        char *subject;
};

typedef struct BusBucket {
        struct BusBucket *next;
        kvStore *kv;
} BusBucket;

struct Bus {
        unsigned n_ref; /* the owner's, and on_wake()'s while it dispatches */
        bool freed;
        sd_event *event;
        sd_event_source *wake;
        int wake_fd;
        BusHooks hooks;
        char *servers;
        natsConnection *nc;
        jsCtx *js;
        BusSub *subs;
        BusSub *inbox;
        char *inbox_prefix; /* "_INBOX.<nuid>." */
        uint64_t next_token;
        BusRequest *requests[BUS_REQUEST_BUCKETS];
        BusBucket *buckets;
        /* Unsubscribed and not yet destroyed (sub_park()): libnats' reader
         * thread may still hold a pointer to one without a reference. The
         * first n_barrier of them were parked before barrier was sent. */
        natsSubscription **parked;
        size_t n_parked, n_barrier;
        BusRequest *barrier;
        sd_event_source *barrier_retry;

        pthread_mutex_t lock;
        pthread_cond_t cond;
        /* Under lock: */
        Item *head, *tail;
        bool closing;
        unsigned libnats_refs;
};

#ifndef MIN
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#endif

static void follow_msg(BusSub *s, natsMsg *msg);
static void follows_connection(Bus *b, bool up);
static void follow_abandon(BusSub *s);
static void follow_free(BusFollow *f, bool cancel);

/* ---- errors ----------------------------------------------------------------- */

static int errno_from_nats(natsStatus s) {
        switch (s) {
        case NATS_OK:
                return 0;
        case NATS_TIMEOUT:
                return -ETIMEDOUT;
        case NATS_NO_RESPONDERS:
                return -EHOSTUNREACH;
        case NATS_NO_MEMORY:
                return -ENOMEM;
        case NATS_INVALID_ARG:
        case NATS_INVALID_SUBJECT:
                return -EINVAL;
        case NATS_MAX_PAYLOAD:
                return -EMSGSIZE;
        case NATS_CONNECTION_CLOSED:
        case NATS_CONNECTION_DISCONNECTED:
        case NATS_NOT_YET_CONNECTED:
        case NATS_NO_SERVER:
        case NATS_STALE_CONNECTION:
                return -ENOTCONN;
        default:
                return -EIO;
        }
}

/* The text of libnats' last error on this thread, for log lines. */
static const char *nats_error_text(natsStatus s) {
        natsStatus last = NATS_OK;
        const char *text = nats_GetLastError(&last);

        if (text && *text) {
                /* "(conn.c:2088): No server available ...": the text only. */
                const char *p = text[0] == '(' ? strstr(text, "): ") : NULL;

                return p ? p + 3 : text;
        }
        return natsStatus_GetText(s);
}

/* errno_from_nats(), and logs the errors that are not one of the expected
 * ones (-EIO) with what. */
static int bus_error(natsStatus s, const char *what, const char *name) {
        int r = errno_from_nats(s);

        if (r == -EIO)
                log_warning("NATS: %s '%s' failed: %s", what, name, nats_error_text(s));
        return r;
}

static bool bus_name_valid(const char *s);

/* ---- the queue to the loop ---------------------------------------------------- */

static void item_free(Item *it) {
        if (!it)
                return;
        natsMsg_Destroy(it->msg);
        free(it);
}

static void wake_loop_locked(Bus *b) {
        uint64_t one = 1;

        /* Cannot fail short of an overflow of the counter, which a
         * pending wake-up covers anyway. */
        (void)!write(b->wake_fd, &one, sizeof(one));
}

/* Any thread. Takes msg (destroyed when not queued). */
static void queue_push(Bus *b, ItemKind kind, BusSub *s, natsMsg *msg, bool up) {
        Item *it = calloc(1, sizeof(*it));

        if (!it) {
                log_error("NATS: out of memory, a message was dropped");
                natsMsg_Destroy(msg);
                return;
        }
        it->kind = kind;
        it->sub = s;
        it->msg = msg;
        it->up = up;

        pthread_mutex_lock(&b->lock);
        if (b->closing || (s && s->dead)) {
                pthread_mutex_unlock(&b->lock);
                item_free(it);
                return;
        }
        if (b->tail)
                b->tail->next = it;
        else {
                b->head = it;
                wake_loop_locked(b);
        }
        b->tail = it;
        pthread_mutex_unlock(&b->lock);
}

static Item *queue_pop(Bus *b) {
        Item *it;

        pthread_mutex_lock(&b->lock);
        it = b->head;
        if (it) {
                b->head = it->next;
                if (!b->head)
                        b->tail = NULL;
                it->next = NULL;
        }
        pthread_mutex_unlock(&b->lock);
        return it;
}

/* Drop what is queued for s (NULL: everything). Under b->lock. */
static void queue_drop_locked(Bus *b, const BusSub *s) {
        Item **p = &b->head, *last = NULL;

        while (*p) {
                Item *it = *p;

                if (!s || it->sub == s) {
                        *p = it->next;
                        item_free(it);
                } else {
                        last = it;
                        p = &it->next;
                }
        }
        b->tail = last;
}

/* ---- libnats' threads --------------------------------------------------------- */

static void on_nats_msg(natsConnection *nc _unused_, natsSubscription *sub _unused_, natsMsg *msg, void *closure) {
        BusSub *s = closure;

        queue_push(s->bus, ITEM_MSG, s, msg, false);
}

static void on_sub_complete(void *closure) {
        BusSub *s = closure;
        Bus *b = s->bus;
        bool free_it;

        pthread_mutex_lock(&b->lock);
        free_it = --s->refs == 0;
        if (--b->libnats_refs == 0)
                pthread_cond_broadcast(&b->cond);
        pthread_mutex_unlock(&b->lock);
        /* b may be gone from here on. */
        if (free_it)
                free(s);
}

static void on_disconnected(natsConnection *nc _unused_, void *closure) {
        queue_push(closure, ITEM_CONNECTION, NULL, NULL, false);
}

static void on_reconnected(natsConnection *nc _unused_, void *closure) {
        queue_push(closure, ITEM_CONNECTION, NULL, NULL, true);
}

static void on_closed(natsConnection *nc _unused_, void *closure) {
        Bus *b = closure;

        /* Not from bus_free(): libnats gave up (it does after repeated
         * authentication errors); tell the loop. */
        queue_push(b, ITEM_CONNECTION, NULL, NULL, false);
        pthread_mutex_lock(&b->lock);
        if (--b->libnats_refs == 0)
                pthread_cond_broadcast(&b->cond);
        pthread_mutex_unlock(&b->lock);
}

static void on_nats_error(natsConnection *nc _unused_, natsSubscription *sub, natsStatus err, void *closure _unused_) {
        /* log_*() is safe from any thread (one stdio call per line). */
        log_warning("NATS: %s%s%s", natsStatus_GetText(err), sub ? " on subscription " : "",
                    sub ? natsSubscription_GetSubject(sub) : "");
}

/* ---- requests ----------------------------------------------------------------- */

static BusRequest **request_slot(Bus *b, uint64_t token) {
        return &b->requests[token % BUS_REQUEST_BUCKETS];
}

static void request_unlink(BusRequest *r) {
        Bus *b = r->bus;

        if (r->prev)
                r->prev->next = r->next;
        else
                *request_slot(b, r->token) = r->next;
        if (r->next)
                r->next->prev = r->prev;
        r->prev = r->next = NULL;
}

static void request_free(BusRequest *r) {
        sd_event_source_disable_unref(r->timer);
        free(r->subject);
        free(r);
}

void bus_request_cancel(BusRequest *r) {
        if (!r)
                return;
        request_unlink(r);
        request_free(r);
}

/* A JetStream publish acknowledgement: {"stream","seq","duplicate"} or
 * {"error":{"code","err_code","description"}}. */
static int parse_pub_ack(natsMsg *msg, const char *subject, uint64_t *ret_seq, bool *ret_duplicate) {
        json_t *ack, *err, *seq;
        json_error_t e;
        int r = 0;

        ack = json_loadb(natsMsg_GetData(msg), (size_t)natsMsg_GetDataLength(msg), 0, &e);
        if (!json_is_object(ack)) {
                log_warning("NATS: malformed JetStream acknowledgement for '%s'", subject);
                json_decref(ack);
                return -EIO;
        }
        err = json_object_get(ack, "error");
        seq = json_object_get(ack, "seq");
        if (err) {
                const char *text = json_string_value(json_object_get(err, "description"));

                log_warning("NATS: JetStream refused the message for '%s': %s (error %" JSON_INTEGER_FORMAT ")",
                            subject, text ? text : "no description",
                            json_integer_value(json_object_get(err, "err_code")));
                r = -EIO;
        } else if (!json_is_integer(seq) || json_integer_value(seq) <= 0 ||
                   !json_is_string(json_object_get(ack, "stream"))) {
                log_warning("NATS: malformed JetStream acknowledgement for '%s'", subject);
                r = -EIO;
        } else {
                *ret_seq = (uint64_t)json_integer_value(seq);
                *ret_duplicate = json_is_true(json_object_get(ack, "duplicate"));
        }
        json_decref(ack);
        return r;
}

/* Take r out of the table and run what it was for; msg (error 0) is the
 * reply, still the caller's. */
static void request_complete(BusRequest *r, int error, natsMsg *msg) {
        RequestKind kind = r->kind;
        bus_reply_fn reply_fn = r->reply_fn;
        bus_ack_fn ack_fn = r->ack_fn;
        void *userdata = r->userdata;
        uint64_t seq = 0;
        bool duplicate = false;

        request_unlink(r);
        if (error == 0 && natsMsg_IsNoResponders(msg))
                error = -EHOSTUNREACH;
        if (error == 0 && kind != REQUEST_PLAIN)
                error = parse_pub_ack(msg, r->subject, &seq, &duplicate);
        if (error != 0 && kind == REQUEST_KV)
                log_warning("NATS: key-value update '%s' failed: %s", r->subject, strerror(-error));
        request_free(r);

        switch (kind) {
        case REQUEST_PLAIN:
                reply_fn(userdata, error, error == 0 ? msg : NULL);
                break;
        case REQUEST_JS_ACK:
                ack_fn(userdata, error, seq, duplicate);
                break;
        case REQUEST_KV:
                break;
        }
}

static int on_request_timer(sd_event_source *src _unused_, uint64_t usec _unused_, void *userdata) {
        request_complete(userdata, -ETIMEDOUT, NULL);
        return 0;
}

static void handle_reply(Bus *b, natsMsg *msg) {
        const char *subject = natsMsg_GetSubject(msg), *p;
        uint64_t token = 0;

        if (!subject || !startswith(subject, b->inbox_prefix))
                return;
        p = subject + strlen(b->inbox_prefix);
        if (*p < '0' || *p > '9')
                return;
        for (; *p; p++) {
                if (*p < '0' || *p > '9' || token > (UINT64_MAX - 9) / 10)
                        return;
                token = token * 10 + (uint64_t)(*p - '0');
        }
        for (BusRequest *r = *request_slot(b, token); r; r = r->next)
                if (r->token == token) {
                        request_complete(r, 0, msg);
                        return;
                }
        /* Timed out or cancelled already. */
}

/* The connection dropped: the replies of the requests sent until now are
 * lost (a new connection has a new inbox interest only for new ones), so
 * fail them now rather than at their timeouts. */
static void requests_fail_all(Bus *b, int error) {
        uint64_t limit = b->next_token;

        for (size_t i = 0; i < BUS_REQUEST_BUCKETS && !b->freed; i++) {
                BusRequest *r;

                /* A callback may cancel or start requests: look again
                 * after each. */
                do {
                        for (r = b->requests[i]; r && r->token >= limit; r = r->next)
                                ;
                        if (r)
                                request_complete(r, error, NULL);
                } while (r && !b->freed);
        }
}

/* A subject to publish to: tokens of printable ASCII other than blanks,
 * none empty; wildcard tokens only if wildcards. NATS' text protocol takes
 * a blank for a field separator, so what is not checked here could forge
 * a reply subject. */
static bool subject_valid(const char *subject, bool wildcards) {
        const char *p = subject;

        if (!subject || !*subject || strlen(subject) >= BUS_SUBJECT_MAX)
                return false;
        for (;;) {
                const char *end = strchrnul(p, '.');

                if (end == p)
                        return false;
                for (const char *c = p; c < end; c++)
                        if (*c <= ' ' || *c >= 127)
                                return false;
                if (!wildcards && end - p == 1 && (*p == '*' || *p == '>'))
                        return false;
                if (*p == '>' && end - p == 1 && *end)
                        return false; /* '>' only last */
                if (!*end)
                        return true;
                p = end + 1;
        }
}

/* Header names are tokens without ':'; values have no line ends. */
static bool header_valid(const char *name, const char *value) {
        if (!name || !*name || !value)
                return false;
        for (const char *c = name; *c; c++)
                if (*c <= ' ' || *c >= 127 || *c == ':')
                        return false;
        for (const char *c = value; *c; c++)
                if (*c == '\r' || *c == '\n')
                        return false;
        return true;
}

static int append_headers(natsMsg *m, const char *const *headers) {
        for (size_t i = 0; headers && headers[i]; i += 2) {
                natsStatus s;

                if (!header_valid(headers[i], headers[i + 1]))
                        return -EINVAL;
                s = natsMsgHeader_Add(m, headers[i], headers[i + 1]);
                if (s != NATS_OK)
                        return bus_error(s, "setting header", headers[i]);
        }
        return 0;
}

static int msg_new(const char *subject, const char *reply, const char *const *headers, const void *data,
                   size_t len, natsMsg **ret) {
        natsMsg *m = NULL;
        natsStatus s;
        int r;

        if (len > INT_MAX || (!data && len > 0) || !subject_valid(subject, false))
                return -EINVAL;
        s = natsMsg_Create(&m, subject, reply, data, (int)len);
        if (s != NATS_OK)
                return bus_error(s, "creating a message for", subject);
        r = append_headers(m, headers);
        if (r < 0) {
                natsMsg_Destroy(m);
                return r;
        }
        *ret = m;
        return 0;
}

static int request_start(Bus *b, RequestKind kind, const char *subject, const char *const *headers,
                         const void *data, size_t len, uint64_t timeout_usec, bus_reply_fn reply_fn,
                         bus_ack_fn ack_fn, void *userdata, BusRequest **ret) {
        char reply[128];
        BusRequest *r;
        natsMsg *m = NULL;
        natsStatus s;
        int k;

        if (!bus_connected(b))
                return -ENOTCONN;
        r = calloc(1, sizeof(*r));
        if (!r)
                return -ENOMEM;
        r->bus = b;
        r->kind = kind;
        r->token = b->next_token++;
        r->reply_fn = reply_fn;
        r->ack_fn = ack_fn;
        r->userdata = userdata;
        r->subject = strdup(subject);
        if (!r->subject) {
                free(r);
                return -ENOMEM;
        }
        (void)snprintf(reply, sizeof(reply), "%s%" PRIu64, b->inbox_prefix, r->token);

        k = sd_event_add_time_relative(b->event, &r->timer, CLOCK_MONOTONIC, timeout_usec, BUS_TIMER_ACCURACY_USEC,
                                       on_request_timer, r);
        if (k >= 0)
                k = msg_new(subject, reply, headers, data, len, &m);
        if (k >= 0) {
                s = natsConnection_PublishMsg(b->nc, m);
                natsMsg_Destroy(m);
                k = bus_error(s, "publishing to", subject);
        }
        if (k < 0) {
                request_free(r);
                return k;
        }

        r->next = *request_slot(b, r->token);
        if (r->next)
                r->next->prev = r;
        *request_slot(b, r->token) = r;
        if (ret)
                *ret = r;
        return 0;
}

int bus_request(Bus *b, const char *subject, const char *const *headers, const void *data, size_t len,
                uint64_t timeout_usec, bus_reply_fn fn, void *userdata, BusRequest **ret) {
        if (!b || !subject || !fn)
                return -EINVAL;
        return request_start(b, REQUEST_PLAIN, subject, headers, data, len, timeout_usec, fn, NULL, userdata, ret);
}

int bus_js_publish_async(Bus *b, const char *subject, const char *const *headers, const void *data, size_t len,
                         uint64_t timeout_usec, bus_ack_fn fn, void *userdata, BusRequest **ret) {
        if (!b || !subject || !fn)
                return -EINVAL;
        return request_start(b, REQUEST_JS_ACK, subject, headers, data, len, timeout_usec, NULL, fn, userdata,
                             ret);
}

/* ---- the loop's side -------------------------------------------------------- */

static Bus *bus_unref(Bus *b);

static void dispatch(Bus *b, Item *it) {
        BusSub *s = it->sub;

        switch (it->kind) {
        case ITEM_CONNECTION:
                if (!it->up) {
                        log_warning("NATS: disconnected, reconnecting");
                        requests_fail_all(b, -ENOTCONN);
                } else {
                        char url[256] = "";

                        (void)natsConnection_GetConnectedUrl(b->nc, url, sizeof(url));
                        log_notice("NATS: reconnected to %s", url);
                }
                if (!b->freed)
                        follows_connection(b, it->up);
                if (!b->freed && b->hooks.connection)
                        b->hooks.connection(b->hooks.userdata, it->up);
                break;
        case ITEM_MSG:
                if (s->kind == SUB_INBOX)
                        handle_reply(b, it->msg);
                else if (s->kind == SUB_FOLLOW)
                        follow_msg(s, it->msg);
                else
                        s->msg_fn(s->userdata, it->msg);
                break;
        }
}

static int on_wake(sd_event_source *src _unused_, int fd _unused_, uint32_t revents _unused_, void *userdata) {
        Bus *b = userdata;
        uint64_t n;

        (void)!read(b->wake_fd, &n, sizeof(n));
        b->n_ref++;
        for (unsigned i = 0; i < BUS_DISPATCH_BATCH && !b->freed; i++) {
                Item *it = queue_pop(b);

                if (!it)
                        break;
                dispatch(b, it);
                item_free(it);
        }
        if (!b->freed) {
                /* More than a batch: come back after the other sources. */
                pthread_mutex_lock(&b->lock);
                if (b->head)
                        wake_loop_locked(b);
                pthread_mutex_unlock(&b->lock);
        }
        bus_unref(b);
        return 0;
}

/* ---- unsubscribed subscriptions -------------------------------------------------- */

/* libnats 3.4.1's reader thread looks a message's subscription up under
 * the connection's lock and locks the subscription only after dropping it
 * (natsConn_processMsg() in its src/conn.c), holding no reference in
 * between: natsSubscription_Destroy() right after Unsubscribe() can free
 * it under that thread. So an unsubscribed one is parked, and destroyed
 * once a request sent after it was answered: the reader thread handles
 * what it reads in order, so by then it is done with every message it
 * read before the answer. No one answers the barrier's subject; the
 * server's "no responders" status is the answer. */
#define BUS_BARRIER_TIMEOUT_USEC (5ULL * 1000000ULL)
#define BUS_BARRIER_RETRY_USEC (1ULL * 1000000ULL)

static void barrier_send(Bus *b);

static void parked_destroy(Bus *b, size_t n) {
        for (size_t i = 0; i < n; i++)
                natsSubscription_Destroy(b->parked[i]);
        if (n < b->n_parked)
                memmove(b->parked, b->parked + n, (b->n_parked - n) * sizeof(*b->parked));
        b->n_parked -= n;
}

static void barrier_done(void *userdata, int error, natsMsg *reply _unused_) {
        Bus *b = userdata;

        b->barrier = NULL;
        /* An answer of any kind went through the reader thread; a timeout
         * or a lost connection proves nothing: try again later. */
        if (error == 0 || error == -EHOSTUNREACH)
                parked_destroy(b, b->n_barrier);
        b->n_barrier = 0;
        if (b->n_parked == 0 || b->freed)
                return;
        if (error == 0 || error == -EHOSTUNREACH)
                barrier_send(b);
        else
                (void)sd_event_source_set_enabled(b->barrier_retry, SD_EVENT_ONESHOT);
}

static int barrier_retry_cb(sd_event_source *src _unused_, uint64_t usec _unused_, void *userdata) {
        barrier_send(userdata);
        return 0;
}

static void barrier_send(Bus *b) {
        char subject[BUS_SUBJECT_MAX];
        int r;

        if (b->barrier || b->n_parked == 0 || b->freed)
                return;
        if (!b->barrier_retry) {
                r = sd_event_add_time_relative(b->event, &b->barrier_retry, CLOCK_MONOTONIC, BUS_BARRIER_RETRY_USEC,
                                               BUS_TIMER_ACCURACY_USEC, barrier_retry_cb, b);
                if (r < 0)
                        return; /* parked until bus_free() */
                (void)sd_event_source_set_enabled(b->barrier_retry, SD_EVENT_OFF);
        }
        /* "_INBOX.<nuid>." -> "_TETHER.barrier.<nuid>": a subject of ours alone. */
        (void)snprintf(subject, sizeof(subject), "_TETHER.barrier.%.*s", (int)strlen(b->inbox_prefix) - 8,
                       b->inbox_prefix + 7);
        b->n_barrier = b->n_parked;
        r = bus_request(b, subject, NULL, "", 0, BUS_BARRIER_TIMEOUT_USEC, barrier_done, b, &b->barrier);
        if (r < 0) {
                b->barrier = NULL;
                b->n_barrier = 0;
                (void)sd_event_source_set_time_relative(b->barrier_retry, BUS_BARRIER_RETRY_USEC);
                (void)sd_event_source_set_enabled(b->barrier_retry, SD_EVENT_ONESHOT);
        }
}

/* Unsubscribe sub and destroy it once that is safe (above). On OOM it
 * is left to libnats until bus_free() (a small leak beats a crash). */
static void sub_park(Bus *b, natsSubscription *sub) {
        natsSubscription **p;

        (void)natsSubscription_Unsubscribe(sub);
        p = realloc(b->parked, (b->n_parked + 1) * sizeof(*p));
        if (!p) {
                log_warning("NATS: out of memory; an unsubscribed subscription stays allocated");
                return;
        }
        b->parked = p;
        b->parked[b->n_parked++] = sub;
        barrier_send(b);
}

size_t bus_parked(const Bus *b) {
        return b ? b->n_parked : 0;
}

/* ---- subscriptions ------------------------------------------------------------- */

static BusSub *sub_new(Bus *b, SubKind kind, void *userdata) {
        BusSub *s = calloc(1, sizeof(*s));

        if (!s)
                return NULL;
        s->bus = b;
        s->kind = kind;
        s->userdata = userdata;
        s->refs = 1;
        return s;
}

/* After s->sub was created with on_nats_msg: libnats' reference. On
 * failure s is left to libnats (dead, never freed: the case needs the
 * connection closed under us, which only bus_free() does). */
static int sub_attach(BusSub *s) {
        Bus *b = s->bus;
        natsStatus st;

        pthread_mutex_lock(&b->lock);
        s->refs++;
        b->libnats_refs++;
        pthread_mutex_unlock(&b->lock);
        st = natsSubscription_SetOnCompleteCB(s->sub, on_sub_complete, s);
        if (st != NATS_OK) {
                pthread_mutex_lock(&b->lock);
                s->dead = true;
                b->libnats_refs--;
                pthread_mutex_unlock(&b->lock);
                sub_park(b, s->sub);
                return bus_error(st, "subscribing to", "a subject");
        }
        s->next = b->subs;
        if (s->next)
                s->next->prev = s;
        b->subs = s;
        return 0;
}

BusSub *bus_sub_free(BusSub *s) {
        Bus *b;
        bool free_it;

        if (!s)
                return NULL;
        b = s->bus;
        if (s->prev)
                s->prev->next = s->next;
        else if (b->subs == s)
                b->subs = s->next;
        if (s->next)
                s->next->prev = s->prev;

        pthread_mutex_lock(&b->lock);
        s->dead = true;
        queue_drop_locked(b, s);
        pthread_mutex_unlock(&b->lock);

        if (s->sub)
                sub_park(b, s->sub);
        if (s->follow) {
                follow_abandon(s);
                follow_free(s->follow, true);
                s->follow = NULL;
        }
        s->kv_follow = bus_sub_free(s->kv_follow);
        bus_request_cancel(s->kv_info);
        s->kv_info = NULL;

        pthread_mutex_lock(&b->lock);
        free_it = --s->refs == 0;
        pthread_mutex_unlock(&b->lock);
        if (free_it)
                free(s);
        return NULL;
}

int bus_subscribe(Bus *b, const char *subject, const char *queue, bus_msg_fn fn, void *userdata, BusSub **ret) {
        BusSub *s;
        natsStatus st;

        if (!b || !subject_valid(subject, true) || (queue && !subject_valid(queue, false)) || !fn || !ret)
                return -EINVAL;
        s = sub_new(b, SUB_CORE, userdata);
        if (!s)
                return -ENOMEM;
        s->msg_fn = fn;
        if (queue)
                st = natsConnection_QueueSubscribe(&s->sub, b->nc, subject, queue, on_nats_msg, s);
        else
                st = natsConnection_Subscribe(&s->sub, b->nc, subject, on_nats_msg, s);
        if (st != NATS_OK) {
                free(s);
                return bus_error(st, "subscribing to", subject);
        }
        /* Nothing is dropped between libnats and the Bus's queue. */
        (void)natsSubscription_SetPendingLimits(s->sub, -1, -1);
        st = sub_attach(s);
        if (st < 0)
                return st;
        *ret = s;
        return 0;
}

/* ---- publishing ----------------------------------------------------------------- */

int bus_publish(Bus *b, const char *subject, const char *const *headers, const void *data, size_t len) {
        natsMsg *m = NULL;
        natsStatus s;
        int r;

        if (!b || !subject)
                return -EINVAL;
        r = msg_new(subject, NULL, headers, data, len, &m);
        if (r < 0)
                return r;
        s = natsConnection_PublishMsg(b->nc, m);
        natsMsg_Destroy(m);
        return bus_error(s, "publishing to", subject);
}

int bus_respond(Bus *b, natsMsg *request, const void *data, size_t len) {
        const char *reply;
        natsStatus s;

        if (!b || !request || len > INT_MAX || (!data && len > 0))
                return -EINVAL;
        reply = natsMsg_GetReply(request);
        if (!reply || !subject_valid(reply, false))
                return -EINVAL;
        s = natsConnection_Publish(b->nc, reply, data, (int)len);
        return bus_error(s, "answering on", reply);
}

/* ---- JetStream ------------------------------------------------------------------- */

int bus_stream_ensure(Bus *b, jsStreamConfig *config, int64_t *ret_created_ns) {
        jsStreamInfo *si = NULL;
        jsErrCode jerr = 0;
        natsStatus s;

        if (!b || !config || !config->Name)
                return -EINVAL;
        if (!bus_connected(b))
                return -ENOTCONN;
        s = js_AddStream(&si, b->js, config, NULL, &jerr);
        if (s != NATS_OK && jerr == JSStreamNameExistErr) {
                /* It exists with other settings: take ours. */
                jerr = 0;
                s = js_UpdateStream(&si, b->js, config, NULL, &jerr);
        }
        if (s != NATS_OK) {
                int r = errno_from_nats(s);

                log_error("NATS: cannot create or update stream '%s': %s", config->Name, nats_error_text(s));
                return r == 0 ? -EIO : r;
        }
        if (ret_created_ns)
                *ret_created_ns = si->Created;
        jsStreamInfo_Destroy(si);
        return 0;
}

int bus_js_publish(Bus *b, const char *subject, const char *const *headers, const void *data, size_t len,
                   uint64_t timeout_usec, uint64_t *ret_seq, bool *ret_duplicate) {
        jsPubOptions po;
        jsPubAck *pa = NULL;
        jsErrCode jerr = 0;
        natsMsg *m = NULL;
        natsStatus s;
        int r;

        if (!b || !subject)
                return -EINVAL;
        if (!bus_connected(b))
                return -ENOTCONN;
        r = msg_new(subject, NULL, headers, data, len, &m);
        if (r < 0)
                return r;
        jsPubOptions_Init(&po);
        po.MaxWait = (int64_t)((timeout_usec + 999) / 1000);
        if (po.MaxWait <= 0)
                po.MaxWait = 1;
        s = js_PublishMsg(&pa, b->js, m, &po, &jerr);
        natsMsg_Destroy(m);
        if (s != NATS_OK) {
                r = errno_from_nats(s);
                if (r == -EIO)
                        log_warning("NATS: JetStream publish to '%s' failed: %s (error %d)", subject,
                                    nats_error_text(s), (int)jerr);
                return r;
        }
        if (ret_seq)
                *ret_seq = pa->Sequence;
        if (ret_duplicate)
                *ret_duplicate = pa->Duplicate;
        jsPubAck_Destroy(pa);
        return 0;
}

/* ---- stream follows --------------------------------------------------------------
 *
 * An ephemeral pull consumer per follow, driven by the loop through the
 * JetStream API over core NATS: created from the next expected stream
 * sequence (f->next_seq) with $JS.API.CONSUMER.CREATE, then pulled with
 * $JS.API.CONSUMER.MSG.NEXT, one pull of at most BUS_FOLLOW_BATCH messages
 * outstanding, answered on "<the follow's inbox>.<pull number>" (answers
 * to older pulls are dropped). Messages carry their consumer and stream
 * sequences in their reply subject ($JS.ACK...): a consumer sequence that
 * is not the next one (something was lost on the way) or a pull without
 * an answer (the consumer's server is gone) abandons the consumer and
 * creates a new one from f->next_seq; a stream sequence below it (a
 * duplicate) is dropped. A status (404, 408: the pull expired) ends a
 * pull; the next one is sent. A reconnect creates a new consumer too (a
 * pull may have been lost). Abandoned consumers are deleted (best effort)
 * and expire on the server after BUS_FOLLOW_INACTIVE_NS anyway. */

/* Messages per pull (bounds what is queued for the loop per follow). */
#define BUS_FOLLOW_BATCH 256
/* A pull expires on the server after this; without any answer within it
 * plus BUS_FOLLOW_GRACE_USEC the consumer is taken for lost. */
#define BUS_FOLLOW_EXPIRES_USEC (3ULL * 1000000ULL)
#define BUS_FOLLOW_GRACE_USEC (3ULL * 1000000ULL)
#define BUS_FOLLOW_API_TIMEOUT_USEC (5ULL * 1000000ULL)
#define BUS_FOLLOW_INACTIVE_NS (30LL * 1000000000LL)
/* Retries after failures: from the first, doubled, up to the last. */
#define BUS_FOLLOW_RETRY_MIN_USEC (100ULL * 1000ULL)
#define BUS_FOLLOW_RETRY_MAX_USEC (5ULL * 1000000ULL)

struct BusFollow {
        char *stream;
        char *filter;       /* NULL: all */
        char *inbox;        /* "_INBOX.<nuid>"; pulls are answered on "<inbox>.<pull>" */
        char *consumer;     /* the current consumer's name; NULL: none */
        uint64_t next_seq;  /* the next stream sequence fn may get */
        uint64_t cseq;      /* the consumer sequence of the last message of consumer */
        uint64_t pull;      /* the number of the outstanding pull; 0: none */
        unsigned pull_left; /* messages it may still bring */
        unsigned failures;  /* in a row: the retry's backoff */
        BusRequest *create;
        sd_event_source *timer; /* the pull's deadline, or the next try to create */
};

static void follow_create(BusSub *s);

static void sub_ref(BusSub *s) {
        pthread_mutex_lock(&s->bus->lock);
        s->refs++;
        pthread_mutex_unlock(&s->bus->lock);
}

/* false: s is gone or being freed (bus_sub_free() ran). */
static bool sub_unref(BusSub *s) {
        bool free_it, dead;

        pthread_mutex_lock(&s->bus->lock);
        free_it = --s->refs == 0;
        dead = s->dead;
        pthread_mutex_unlock(&s->bus->lock);
        if (free_it)
                free(s);
        return !free_it && !dead;
}

static void follow_delete_done(void *userdata _unused_, int error _unused_, natsMsg *reply _unused_) {
}

/* Forget the consumer (deleted on the server if we can say so) and
 * whatever was under way with it. */
static void follow_abandon(BusSub *s) {
        BusFollow *f = s->follow;

        f->create = (bus_request_cancel(f->create), NULL);
        (void)sd_event_source_set_enabled(f->timer, SD_EVENT_OFF);
        f->pull = 0;
        if (f->consumer && bus_connected(s->bus)) {
                char subject[BUS_SUBJECT_MAX];

                (void)snprintf(subject, sizeof(subject), "$JS.API.CONSUMER.DELETE.%s.%s", f->stream, f->consumer);
                (void)bus_request(s->bus, subject, NULL, "", 0, BUS_FOLLOW_API_TIMEOUT_USEC, follow_delete_done, NULL,
                                  NULL);
        }
        free(f->consumer);
        f->consumer = NULL;
}

static void follow_timer_at(BusSub *s, uint64_t usec) {
        (void)sd_event_source_set_time_relative(s->follow->timer, usec);
        (void)sd_event_source_set_enabled(s->follow->timer, SD_EVENT_ONESHOT);
}

/* Start over from f->next_seq: at once, or after the backoff when it
 * failed. While disconnected, the reconnect does (follows_reconnected()). */
static void follow_restart(BusSub *s, bool failed) {
        BusFollow *f = s->follow;

        follow_abandon(s);
        if (!failed) {
                f->failures = 0;
                if (bus_connected(s->bus))
                        follow_create(s);
                return;
        }
        uint64_t delay = BUS_FOLLOW_RETRY_MIN_USEC;

        for (unsigned i = 0; i < f->failures && delay < BUS_FOLLOW_RETRY_MAX_USEC; i++)
                delay *= 2;
        if (f->failures < UINT_MAX)
                f->failures++;
        follow_timer_at(s, MIN(delay, BUS_FOLLOW_RETRY_MAX_USEC));
}

static void follow_pull(BusSub *s) {
        BusFollow *f = s->follow;
        char subject[BUS_SUBJECT_MAX], reply[128], body[96];
        natsStatus st;
        int n;

        f->pull = s->bus->next_token++;
        f->pull_left = BUS_FOLLOW_BATCH;
        (void)snprintf(subject, sizeof(subject), "$JS.API.CONSUMER.MSG.NEXT.%s.%s", f->stream, f->consumer);
        (void)snprintf(reply, sizeof(reply), "%s.%" PRIu64, f->inbox, f->pull);
        n = snprintf(body, sizeof(body), "{\"batch\":%u,\"expires\":%" PRIu64 "}", BUS_FOLLOW_BATCH,
                     (uint64_t)(BUS_FOLLOW_EXPIRES_USEC * 1000ULL));
        st = natsConnection_PublishRequest(s->bus->nc, subject, reply, body, n);
        if (st != NATS_OK) {
                log_debug("NATS: cannot pull from stream '%s': %s", f->stream, nats_error_text(st));
                follow_restart(s, true);
                return;
        }
        follow_timer_at(s, BUS_FOLLOW_EXPIRES_USEC + BUS_FOLLOW_GRACE_USEC);
}

static void follow_created(void *userdata, int error, natsMsg *reply) {
        BusSub *s = userdata;
        BusFollow *f = s->follow;
        json_t *j = NULL, *err, *name;

        f->create = NULL;
        if (error < 0) {
                if (error == -ENOTCONN)
                        return; /* the reconnect starts over */
                log_warning("NATS: cannot create a consumer on stream '%s': %s", f->stream, strerror(-error));
                follow_restart(s, true);
                return;
        }
        j = json_loadb(natsMsg_GetData(reply), (size_t)natsMsg_GetDataLength(reply), 0, NULL);
        err = json_object_get(j, "error");
        name = json_object_get(j, "name");
        if (err || !json_is_string(name) || !bus_name_valid(json_string_value(name)) ||
            strlen(json_string_value(name)) > 64) {
                const char *text = json_string_value(json_object_get(err, "description"));

                log_warning("NATS: cannot create a consumer on stream '%s': %s", f->stream,
                            text ? text : "malformed answer");
                json_decref(j);
                follow_restart(s, true);
                return;
        }
        f->consumer = strdup(json_string_value(name));
        json_decref(j);
        if (!f->consumer) {
                follow_restart(s, true);
                return;
        }
        f->cseq = 0;
        follow_pull(s);
}

static void follow_create(BusSub *s) {
        BusFollow *f = s->follow;
        char subject[BUS_SUBJECT_MAX];
        _cleanup_free_ char *body = NULL;
        json_t *config;
        int r;

        config = json_pack("{s:s, s:I, s:s, s:I, s:i, s:b}", "deliver_policy", "by_start_sequence", "opt_start_seq",
                           (json_int_t)MIN(f->next_seq, (uint64_t)INT64_MAX), "ack_policy", "none",
                           "inactive_threshold", (json_int_t)BUS_FOLLOW_INACTIVE_NS, "num_replicas", 1,
                           "mem_storage", 1);
        if (config && f->filter && json_object_set_new(config, "filter_subject", json_string(f->filter)) < 0)
                config = (json_decref(config), NULL);
        if (config) {
                /* "o" takes config; the request object is ours to drop. */
                json_t *req = json_pack("{s:s, s:o}", "stream_name", f->stream, "config", config);

                body = req ? json_dumps(req, JSON_COMPACT) : NULL;
                json_decref(req);
        }
        if (!body) {
                follow_restart(s, true);
                return;
        }
        (void)snprintf(subject, sizeof(subject), "$JS.API.CONSUMER.CREATE.%s", f->stream);
        r = bus_request(s->bus, subject, NULL, body, strlen(body), BUS_FOLLOW_API_TIMEOUT_USEC, follow_created, s,
                        &f->create);
        if (r < 0 && r != -ENOTCONN)
                follow_restart(s, true);
}

static bool follow_queued(BusSub *s) {
        bool queued = false;

        pthread_mutex_lock(&s->bus->lock);
        for (Item *it = s->bus->head; it && !queued; it = it->next)
                queued = it->sub == s;
        pthread_mutex_unlock(&s->bus->lock);
        return queued;
}

static int on_follow_timer(sd_event_source *src _unused_, uint64_t usec _unused_, void *userdata) {
        BusSub *s = userdata;
        BusFollow *f = s->follow;

        if (!f->consumer) {
                if (bus_connected(s->bus))
                        follow_create(s);
                return 0;
        }
        if (follow_queued(s)) {
                /* Answers are waiting for the loop: no verdict yet. */
                follow_timer_at(s, BUS_FOLLOW_GRACE_USEC);
                return 0;
        }
        log_notice("NATS: no answer from the consumer of stream '%s', creating a new one from %" PRIu64, f->stream,
                   f->next_seq);
        follow_restart(s, true);
        return 0;
}

/* A message on the follow's inbox. */
static void follow_msg(BusSub *s, natsMsg *msg) {
        BusFollow *f = s->follow;
        const char *subject = natsMsg_GetSubject(msg), *status = NULL;
        jsMsgMetaData *meta = NULL;
        uint64_t pull = 0, sseq, cseq;
        size_t n = strlen(f->inbox);
        bool ok;

        if (f->pull == 0)
                return;
        if (natsMsgHeader_Get(msg, "Status", &status) == NATS_OK && status) {
                /* On "<inbox>.<pull>": only about the outstanding pull. */
                if (!subject || strncmp(subject, f->inbox, n) != 0 || subject[n] != '.')
                        return;
                for (const char *p = subject + n + 1; *p; p++) {
                        if (*p < '0' || *p > '9' || pull > (UINT64_MAX - 9) / 10)
                                return;
                        pull = pull * 10 + (uint64_t)(*p - '0');
                }
                if (pull != f->pull)
                        return;
                if (streq(status, "404") || streq(status, "408")) {
                        /* Expired, or nothing there: the next pull. */
                        f->failures = 0;
                        follow_pull(s);
                } else if (streq(status, "100")) {
                        /* A heartbeat. */
                } else {
                        const char *text = NULL;

                        (void)natsMsgHeader_Get(msg, "Description", &text);
                        log_notice("NATS: the consumer of stream '%s' answered %s %s, creating a new one from "
                                   "%" PRIu64, f->stream, status, text ? text : "", f->next_seq);
                        follow_restart(s, true);
                }
                return;
        }

        /* A message, with its own subject: its consumer tells whose. */
        if (natsMsg_GetMetaData(&meta, msg) != NATS_OK)
                return; /* not from JetStream; no one else knows this inbox */
        ok = meta->Stream && streq(meta->Stream, f->stream) && meta->Consumer && f->consumer &&
             streq(meta->Consumer, f->consumer);
        sseq = meta->Sequence.Stream;
        cseq = meta->Sequence.Consumer;
        jsMsgMetaData_Destroy(meta);
        if (!ok)
                return;
        if (cseq != f->cseq + 1) {
                log_notice("NATS: message(s) of stream '%s' lost on the way, following again from %" PRIu64,
                           f->stream, f->next_seq);
                follow_restart(s, false);
                return;
        }
        f->cseq = cseq;
        if (f->pull_left > 0)
                f->pull_left--;
        if (sseq >= f->next_seq) {
                f->next_seq = sseq + 1;
                f->failures = 0;
                sub_ref(s);
                s->msg_fn(s->userdata, msg);
                if (!sub_unref(s))
                        return;
        }
        if (f->pull_left == 0)
                follow_pull(s);
}

/* The connection is back (up) or gone: start over from f->next_seq. */
static void follows_connection(Bus *b, bool up) {
        for (BusSub *s = b->subs; s; s = s->next)
                if (s->kind == SUB_FOLLOW) {
                        if (up)
                                follow_restart(s, false);
                        else
                                follow_abandon(s);
                }
}

/* Without bus_request_cancel() of f->create when the requests are gone
 * already (bus_free()). */
static void follow_free(BusFollow *f, bool cancel) {
        if (!f)
                return;
        if (cancel)
                bus_request_cancel(f->create);
        sd_event_source_disable_unref(f->timer);
        free(f->stream);
        free(f->filter);
        free(f->inbox);
        free(f->consumer);
        free(f);
}

int bus_stream_follow(Bus *b, const char *stream, const char *filter, uint64_t start_seq, bus_msg_fn fn,
                      void *userdata, BusSub **ret) {
        natsInbox *inbox = NULL;
        _cleanup_free_ char *wild = NULL;
        BusFollow *f;
        BusSub *s;
        natsStatus st;
        int r;

        if (!b || !bus_name_valid(stream) || strlen(stream) > 255 || (filter && !subject_valid(filter, true)) || !fn ||
            !ret)
                return -EINVAL;
        if (!bus_connected(b))
                return -ENOTCONN;
        s = sub_new(b, SUB_FOLLOW, userdata);
        f = calloc(1, sizeof(*f));
        if (!s || !f) {
                free(s);
                free(f);
                return -ENOMEM;
        }
        s->msg_fn = fn;
        s->follow = f;
        f->next_seq = start_seq > 0 ? start_seq : 1;
        f->stream = strdup(stream);
        f->filter = filter ? strdup(filter) : NULL;
        st = natsInbox_Create(&inbox);
        if (st == NATS_OK) {
                f->inbox = strdup((const char *)inbox);
                natsInbox_Destroy(inbox);
        }
        if (!f->stream || (filter && !f->filter) || !f->inbox || asprintf(&wild, "%s.*", f->inbox) < 0) {
                wild = NULL;
                r = st != NATS_OK ? bus_error(st, "creating", "an inbox") : -ENOMEM;
                goto fail;
        }
        r = sd_event_add_time(b->event, &f->timer, CLOCK_MONOTONIC, 0, BUS_TIMER_ACCURACY_USEC, on_follow_timer, s);
        if (r < 0)
                goto fail;
        (void)sd_event_source_set_enabled(f->timer, SD_EVENT_OFF);
        (void)sd_event_source_set_description(f->timer, "bus-follow");
        st = natsConnection_Subscribe(&s->sub, b->nc, wild, on_nats_msg, s);
        if (st != NATS_OK) {
                r = bus_error(st, "subscribing to", wild);
                goto fail;
        }
        (void)natsSubscription_SetPendingLimits(s->sub, -1, -1);
        r = sub_attach(s);
        if (r < 0) {
                /* s is libnats' now; f is not. */
                s->follow = NULL;
                follow_free(f, true);
                return r;
        }
        follow_create(s);
        *ret = s;
        return 0;
fail:
        follow_free(f, true);
        free(s);
        return r;
}

uint64_t bus_msg_seq(natsMsg *msg) {
        jsMsgMetaData *meta = NULL;
        uint64_t seq;

        if (!msg)
                return 0;
        if (natsMsg_GetMetaData(&meta, msg) == NATS_OK) {
                seq = meta->Sequence.Stream;
                jsMsgMetaData_Destroy(meta);
                return seq;
        }
        /* A message got with js_GetMsg() and the like. */
        return natsMsg_GetSequence(msg);
}

const char *bus_msg_header(natsMsg *msg, const char *name) {
        const char *value = NULL;

        if (!msg || !name || natsMsgHeader_Get(msg, name, &value) != NATS_OK)
                return NULL;
        return value;
}

/* ---- key-value buckets --------------------------------------------------------- */

/* Bucket names and keys as the cloud uses them: [A-Za-z0-9_-]+ (a subset
 * of what NATS allows, so a key is one subject token). */
static bool bus_name_valid(const char *s) {
        if (!s || !*s)
                return false;
        for (; *s; s++)
                if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9') || *s == '_' ||
                      *s == '-'))
                        return false;
        return true;
}

static kvStore *bucket_find(Bus *b, const char *bucket) {
        for (BusBucket *k = b->buckets; k; k = k->next)
                if (streq(kvStore_Bucket(k->kv), bucket))
                        return k->kv;
        return NULL;
}

static int bucket_add(Bus *b, kvStore *kv) {
        BusBucket *k = calloc(1, sizeof(*k));

        if (!k) {
                kvStore_Destroy(kv);
                return -ENOMEM;
        }
        k->kv = kv;
        k->next = b->buckets;
        b->buckets = k;
        return 0;
}

int bus_kv_ensure(Bus *b, const char *bucket, unsigned replicas, uint64_t ttl_usec) {
        kvConfig c;
        kvStore *kv = NULL;
        natsStatus s;

        if (!b || !bus_name_valid(bucket) || replicas > 5 || ttl_usec > (uint64_t)INT64_MAX / 1000)
                return -EINVAL;
        if (!bus_connected(b))
                return -ENOTCONN;
        if (bucket_find(b, bucket))
                return 0;
        kvConfig_Init(&c);
        c.Bucket = bucket;
        c.History = 1;
        /* Nanoseconds (it becomes the stream's MaxAge), whatever the name says. */
        c.TTL = (int64_t)(ttl_usec * 1000);
        c.StorageType = js_FileStorage;
        c.Replicas = replicas > 0 ? (int)replicas : 1;
        s = js_CreateKeyValue(&kv, b->js, &c);
        if (s != NATS_OK) {
                natsStatus bind = js_KeyValue(&kv, b->js, bucket);

                if (bind != NATS_OK) {
                        int r = errno_from_nats(s);

                        log_error("NATS: cannot create key-value bucket '%s': %s", bucket, nats_error_text(s));
                        return r == 0 ? -EIO : r;
                }
                log_warning("NATS: key-value bucket '%s' exists with other settings, using it as it is", bucket);
        }
        return bucket_add(b, kv);
}

static int bus_kv_update(Bus *b, const char *bucket, const char *key, const char *const *headers, const void *value,
                         size_t len) {
        char subject[BUS_SUBJECT_MAX];

        if (!b || !bus_name_valid(bucket) || !bus_name_valid(key))
                return -EINVAL;
        if ((size_t)snprintf(subject, sizeof(subject), "$KV.%s.%s", bucket, key) >= sizeof(subject))
                return -EINVAL;
        return request_start(b, REQUEST_KV, subject, headers, value, len, BUS_KV_ACK_TIMEOUT_USEC, NULL, NULL, NULL,
                             NULL);
}

int bus_kv_put(Bus *b, const char *bucket, const char *key, const void *value, size_t len) {
        return bus_kv_update(b, bucket, key, NULL, value, len);
}

int bus_kv_delete(Bus *b, const char *bucket, const char *key) {
        static const char *const headers[] = { "KV-Operation", "DEL", NULL };

        return bus_kv_update(b, bucket, key, headers, NULL, 0);
}

/* The watch of a bucket is a follow of its stream ("KV_BUCKET", subjects
 * "$KV.BUCKET.KEY"; a deletion or purge is a message with the header
 * KV-Operation), so it recovers from a lost server as every follow does
 * (libnats' own watcher rides on an ordered push consumer, which stalls
 * for tens of seconds after one). The initial values are in when a
 * message comes with nothing pending after it, or at once when the
 * stream info says it is empty. */
static void kv_loaded(BusSub *s) {
        if (s->kv_loaded)
                return;
        s->kv_loaded = true;
        s->kv_fn(s->userdata, NULL, NULL, 0, 0, 0);
}

static void kv_follow_msg(void *userdata, natsMsg *msg) {
        BusSub *s = userdata;
        const char *subject = natsMsg_GetSubject(msg), *op = bus_msg_header(msg, "KV-Operation");
        jsMsgMetaData *meta = NULL;
        bool pending = true;
        int64_t time_ns = 0;

        if (natsMsg_GetMetaData(&meta, msg) == NATS_OK) {
                pending = meta->NumPending > 0;
                time_ns = meta->Timestamp > 0 ? meta->Timestamp : 0;
                jsMsgMetaData_Destroy(meta);
        }
        if (subject && strlen(subject) > s->kv_prefix_len) {
                if (op && (streq(op, "DEL") || streq(op, "PURGE")))
                        s->kv_fn(s->userdata, subject + s->kv_prefix_len, NULL, 0, bus_msg_seq(msg), time_ns);
                else
                        s->kv_fn(s->userdata, subject + s->kv_prefix_len, natsMsg_GetData(msg),
                                 (size_t)natsMsg_GetDataLength(msg), bus_msg_seq(msg), time_ns);
        }
        if (!pending)
                kv_loaded(s);
}

static void kv_info_reply(void *userdata, int error, natsMsg *reply) {
        BusSub *s = userdata;
        json_t *j, *msgs;

        s->kv_info = NULL;
        if (error < 0)
                return;
        j = json_loadb(natsMsg_GetData(reply), (size_t)natsMsg_GetDataLength(reply), 0, NULL);
        msgs = json_object_get(json_object_get(j, "state"), "messages");
        if (json_is_integer(msgs) && json_integer_value(msgs) == 0)
                kv_loaded(s);
        json_decref(j);
}

int bus_kv_watch(Bus *b, const char *bucket, bus_kv_fn fn, void *userdata, BusSub **ret) {
        char stream[128], filter[128], info[160];
        BusSub *s;
        int r;

        if (!b || !bus_name_valid(bucket) || !fn || !ret || strlen(bucket) > 64)
                return -EINVAL;
        if (!bus_connected(b))
                return -ENOTCONN;
        snprintf(stream, sizeof(stream), "KV_%s", bucket);
        snprintf(filter, sizeof(filter), "$KV.%s.>", bucket);
        snprintf(info, sizeof(info), "$JS.API.STREAM.INFO.KV_%s", bucket);
        s = sub_new(b, SUB_KV, userdata);
        if (!s)
                return -ENOMEM;
        s->kv_fn = fn;
        s->kv_prefix_len = strlen(filter) - 1;
        r = bus_stream_follow(b, stream, filter, 1, kv_follow_msg, s, &s->kv_follow);
        if (r >= 0)
                r = bus_request(b, info, NULL, "", 0, BUS_KV_INFO_TIMEOUT_USEC, kv_info_reply, s, &s->kv_info);
        if (r < 0) {
                s->kv_follow = bus_sub_free(s->kv_follow);
                free(s);
                log_error_errno(r, "NATS: cannot watch key-value bucket '%s': %m", bucket);
                return r;
        }
        s->next = b->subs;
        if (s->next)
                s->next->prev = s;
        b->subs = s;
        *ret = s;
        return 0;
}

/* ---- the Bus ------------------------------------------------------------------------ */

static Bus *bus_unref(Bus *b) {
        if (!b || --b->n_ref > 0)
                return NULL;
        pthread_mutex_destroy(&b->lock);
        pthread_cond_destroy(&b->cond);
        free(b);
        return NULL;
}

/* Close the connection and wait until libnats is done with the Bus.
 * false: it was not within BUS_CLOSE_WAIT_SEC (the Bus must stay
 * allocated). */
static bool bus_close(Bus *b) {
        struct timespec deadline;
        bool done;

        pthread_mutex_lock(&b->lock);
        b->closing = true;
        for (BusSub *s = b->subs; s; s = s->next)
                s->dead = true;
        queue_drop_locked(b, NULL);
        pthread_mutex_unlock(&b->lock);

        if (b->nc)
                natsConnection_Close(b->nc);

        clock_gettime(CLOCK_MONOTONIC, &deadline);
        deadline.tv_sec += BUS_CLOSE_WAIT_SEC;
        pthread_mutex_lock(&b->lock);
        while (b->libnats_refs > 0)
                if (pthread_cond_timedwait(&b->cond, &b->lock, &deadline) == ETIMEDOUT)
                        break;
        done = b->libnats_refs == 0;
        queue_drop_locked(b, NULL);
        pthread_mutex_unlock(&b->lock);
        return done;
}

Bus *bus_free(Bus *b) {
        if (!b || b->freed)
                return NULL;
        b->freed = true;

        for (size_t i = 0; i < BUS_REQUEST_BUCKETS; i++)
                while (b->requests[i])
                        bus_request_cancel(b->requests[i]);
        if (!bus_close(b)) {
                /* Freeing what libnats may still touch would be worse. */
                log_error("NATS: the client library did not let go of the connection, leaking it");
                return NULL;
        }

        while (b->subs) {
                BusSub *s = b->subs;

                b->subs = s->next;
                /* Its request was cancelled with the others. */
                follow_free(s->follow, false);
                s->follow = NULL;
                natsSubscription_Destroy(s->sub);
                /* Freed by on_sub_complete() when libnats held it. */
                if (--s->refs == 0)
                        free(s);
        }
        /* The connection is closed: no reader thread is left. */
        b->barrier = NULL; /* cancelled with the other requests */
        b->n_barrier = 0;
        parked_destroy(b, b->n_parked);
        free(b->parked);
        b->barrier_retry = sd_event_source_disable_unref(b->barrier_retry);
        while (b->buckets) {
                BusBucket *k = b->buckets;

                b->buckets = k->next;
                kvStore_Destroy(k->kv);
                free(k);
        }
        jsCtx_Destroy(b->js);
        natsConnection_Destroy(b->nc);
        sd_event_source_disable_unref(b->wake);
        if (b->wake_fd >= 0)
                close(b->wake_fd);
        free(b->inbox_prefix);
        free(b->servers);
        return bus_unref(b);
}

bool bus_connected(Bus *b) {
        return b && b->nc && natsConnection_Status(b->nc) == NATS_CONN_STATUS_CONNECTED;
}

jsCtx *bus_js(Bus *b) {
        return b ? b->js : NULL;
}

natsConnection *bus_connection(Bus *b) {
        return b ? b->nc : NULL;
}

static int bus_options(Bus *b, const BusConfig *config, natsOptions **ret) {
        _cleanup_free_ char *copy = NULL;
        _cleanup_free_ const char **urls = NULL;
        natsOptions *o = NULL;
        size_t n = 0, max = 1;
        char *save = NULL;
        natsStatus s;

        copy = strdup(config->servers);
        if (!copy)
                return -ENOMEM;
        for (const char *p = copy; *p; p++)
                max += *p == ',' || *p == ' ' || *p == '\t';
        urls = calloc(max, sizeof(*urls));
        if (!urls)
                return -ENOMEM;
        for (char *t = strtok_r(copy, ", \t", &save); t; t = strtok_r(NULL, ", \t", &save))
                urls[n++] = t;
        if (n == 0 || n > INT_MAX)
                return -EINVAL;

        s = natsOptions_Create(&o);
        if (s == NATS_OK)
                s = natsOptions_SetServers(o, urls, (int)n);
        if (s == NATS_OK && config->name)
                s = natsOptions_SetName(o, config->name);
        if (s == NATS_OK && config->user)
                s = natsOptions_SetUserInfo(o, config->user, config->password);
        if (s == NATS_OK && config->ca_file) {
                s = natsOptions_SetSecure(o, true);
                if (s == NATS_OK)
                        s = natsOptions_LoadCATrustedCertificates(o, config->ca_file);
        }
        if (s == NATS_OK)
                s = natsOptions_SetTimeout(o, BUS_CONNECT_TIMEOUT_MS);
        /* Write each message at once: libnats otherwise leaves it in its
         * buffer for the flusher thread, which adds about a millisecond to
         * every hop of a routed call. */
        if (s == NATS_OK)
                s = natsOptions_SetSendAsap(o, true);
        if (s == NATS_OK)
                s = natsOptions_SetMaxReconnect(o, -1);
        if (s == NATS_OK)
                s = natsOptions_SetReconnectWait(o, BUS_RECONNECT_WAIT_MS);
        if (s == NATS_OK)
                s = natsOptions_SetPingInterval(o, BUS_PING_INTERVAL_MS);
        if (s == NATS_OK)
                s = natsOptions_SetMaxPingsOut(o, BUS_MAX_PINGS_OUT);
        if (s == NATS_OK)
                s = natsOptions_SetFailRequestsOnDisconnect(o, true);
        if (s == NATS_OK)
                s = natsOptions_SetDisconnectedCB(o, on_disconnected, b);
        if (s == NATS_OK)
                s = natsOptions_SetReconnectedCB(o, on_reconnected, b);
        if (s == NATS_OK)
                s = natsOptions_SetClosedCB(o, on_closed, b);
        if (s == NATS_OK)
                s = natsOptions_SetErrorHandler(o, on_nats_error, b);
        if (s != NATS_OK) {
                int r = errno_from_nats(s);

                log_error("NATS: bad connection settings: %s", nats_error_text(s));
                natsOptions_Destroy(o);
                return r == 0 ? -EINVAL : r;
        }
        *ret = o;
        return 0;
}

static int bus_inbox(Bus *b) {
        natsInbox *inbox = NULL;
        char subject[128];
        BusSub *s;
        natsStatus st;
        int r;

        st = natsInbox_Create(&inbox);
        if (st != NATS_OK)
                return bus_error(st, "creating", "an inbox");
        r = asprintf(&b->inbox_prefix, "%s.", (const char *)inbox);
        (void)snprintf(subject, sizeof(subject), "%s.*", (const char *)inbox);
        natsInbox_Destroy(inbox);
        if (r < 0) {
                b->inbox_prefix = NULL;
                return -ENOMEM;
        }
        s = sub_new(b, SUB_INBOX, b);
        if (!s)
                return -ENOMEM;
        st = natsConnection_Subscribe(&s->sub, b->nc, subject, on_nats_msg, s);
        if (st != NATS_OK) {
                free(s);
                return bus_error(st, "subscribing to", subject);
        }
        (void)natsSubscription_SetPendingLimits(s->sub, -1, -1);
        r = sub_attach(s);
        if (r < 0)
                return r;
        b->inbox = s;
        return 0;
}

int bus_new(sd_event *event, const BusConfig *config, const BusHooks *hooks, Bus **ret) {
        natsOptions *opts = NULL;
        pthread_condattr_t ca;
        natsStatus s;
        Bus *b;
        int r;

        if (!event || !config || !config->servers || !ret)
                return -EINVAL;
        b = calloc(1, sizeof(*b));
        if (!b)
                return -ENOMEM;
        b->n_ref = 1;
        b->event = event;
        b->wake_fd = -1;
        if (hooks)
                b->hooks = *hooks;
        pthread_mutex_init(&b->lock, NULL);
        pthread_condattr_init(&ca);
        pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
        pthread_cond_init(&b->cond, &ca);
        pthread_condattr_destroy(&ca);

        b->servers = strdup(config->servers);
        if (!b->servers) {
                r = -ENOMEM;
                goto fail;
        }
        b->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (b->wake_fd < 0) {
                r = log_error_errno(errno, "NATS: eventfd: %m");
                goto fail;
        }
        r = sd_event_add_io(event, &b->wake, b->wake_fd, EPOLLIN, on_wake, b);
        if (r < 0)
                goto fail;
        (void)sd_event_source_set_description(b->wake, "bus-wake");

        r = bus_options(b, config, &opts);
        if (r < 0)
                goto fail;
        s = natsConnection_Connect(&b->nc, opts);
        natsOptions_Destroy(opts);
        if (s != NATS_OK) {
                log_error("NATS: cannot connect to '%s': %s", config->servers, nats_error_text(s));
                b->nc = NULL;
                r = -ENOTCONN;
                goto fail;
        }
        pthread_mutex_lock(&b->lock);
        b->libnats_refs++; /* on_closed() */
        pthread_mutex_unlock(&b->lock);

        s = natsConnection_JetStream(&b->js, b->nc, NULL);
        if (s != NATS_OK) {
                r = bus_error(s, "opening JetStream on", config->servers);
                goto fail;
        }
        r = bus_inbox(b);
        if (r < 0)
                goto fail;
        *ret = b;
        return 0;
fail:
        bus_free(b);
        return r;
}

/* ---- subjects ------------------------------------------------------------------------- */

static bool subject_byte_plain(unsigned char c) {
        return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '-';
}

int bus_subject_append_name(char *buf, size_t size, const char *name) {
        static const char hex[] = "0123456789ABCDEF";
        size_t start, need = 0;
        bool part_empty = true;
        char *p;

        if (!buf || !name || size == 0)
                return -EINVAL;
        start = strnlen(buf, size);
        if (start >= size)
                return -EINVAL;
        /* A separator after what is there unless it ends with one. */
        if (start > 0 && buf[start - 1] != '.')
                need++;
        for (const unsigned char *c = (const unsigned char *)name;; c++) {
                if (*c == '/' || *c == 0) {
                        need += part_empty; /* "%" */
                        if (*c == 0)
                                break;
                        need++; /* '.' */
                        part_empty = true;
                        continue;
                }
                part_empty = false;
                need += subject_byte_plain(*c) ? 1 : 3;
        }
        if (need >= size - start)
                return -ENOBUFS;

        p = buf + start;
        if (start > 0 && buf[start - 1] != '.')
                *p++ = '.';
        part_empty = true;
        for (const unsigned char *c = (const unsigned char *)name;; c++) {
                if (*c == '/' || *c == 0) {
                        if (part_empty)
                                *p++ = '%';
                        if (*c == 0)
                                break;
                        *p++ = '.';
                        part_empty = true;
                        continue;
                }
                part_empty = false;
                if (subject_byte_plain(*c))
                        *p++ = (char)*c;
                else {
                        *p++ = '%';
                        *p++ = hex[*c >> 4];
                        *p++ = hex[*c & 15];
                }
        }
        *p = 0;
        return 0;
}

static int hex_digit(char c) {
        if (c >= '0' && c <= '9')
                return c - '0';
        if (c >= 'A' && c <= 'F')
                return c - 'A' + 10;
        return -1; /* lower case too: one spelling per name */
}

int bus_subject_name(const char *subject, unsigned skip, char *buf, size_t size) {
        const char *p = subject;
        size_t n = 0;

        if (!subject || !buf || size == 0)
                return -EINVAL;
        for (unsigned i = 0; i < skip; i++) {
                p = strchr(p, '.');
                if (!p)
                        return -EINVAL;
                p++;
        }
        for (;;) {
                const char *end = strchrnul(p, '.');

                if (end == p)
                        return -EINVAL; /* an empty token */
                if (end - p == 1 && *p == '%') {
                        /* An empty part. */
                } else
                        for (const char *c = p; c < end; c++) {
                                int hi, lo;
                                unsigned char byte;

                                if (subject_byte_plain((unsigned char)*c))
                                        byte = (unsigned char)*c;
                                else if (*c == '%' && end - c >= 3 && (hi = hex_digit(c[1])) >= 0 &&
                                         (lo = hex_digit(c[2])) >= 0) {
                                        byte = (unsigned char)(hi << 4 | lo);
                                        /* Only what the encoding writes so. */
                                        if (byte == 0 || byte == '/' || subject_byte_plain(byte))
                                                return -EINVAL;
                                        c += 2;
                                } else
                                        return -EINVAL;
                                if (n + 1 >= size)
                                        return -ENOBUFS;
                                buf[n++] = (char)byte;
                        }
                if (*end == 0)
                        break;
                if (n + 1 >= size)
                        return -ENOBUFS;
                buf[n++] = '/';
                p = end + 1;
        }
        buf[n] = 0;
        return 0;
}
