/* SPDX-License-Identifier: Apache-2.0 */
#include <arpa/inet.h>
#include <coap3/coap.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <netdb.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <signal.h>

#include "backoff.h"
#include "conn.h"
#include "log.h"
#include "outbox.h"
#include "proto.h"
#include "resolver.h"
#include "tls.h"
#include "util.h"

/* Publishes in flight at once: enough to keep a loopback link busy,
 * bounded so a stalled cloud cannot make us buffer without limit. */
#define CONN_WINDOW 32
#define TOKEN_MAX 8
/* Acknowledgement records and compaction when SyncIntervalSec=0 (each
 * append syncs by itself then). */
#define CONN_SYNC_DEFAULT_MS 100
/* At most one line about a full or failing outbox this often. */
#define CONN_OUTBOX_LOG_MS 10000

typedef enum ConnState {
        CONN_IDLE,
        CONN_RESOLVING,
        CONN_CONNECTING, /* TCP + TLS + CSM */
        CONN_CONNECTED,  /* established, requests may flow */
        CONN_BACKOFF,
} ConnState;

typedef struct Token {
        uint8_t len;
        uint8_t s[TOKEN_MAX];
} Token;

/* A publish request on the wire, waiting for the cloud's receipt. */
typedef struct InFlight {
        uint64_t seq; /* 0: free slot */
        Token token;
} InFlight;

/* A request of ours waiting for its answer (conn_request()). */
typedef struct Pending {
        struct Pending *next;
        Conn *conn;
        Token token;
        sd_event_source *timer;
        conn_request_fn cb;
        conn_block_fn block_cb; /* instead of cb: conn_request_block2() */
        void *userdata;
} Pending;

typedef struct Subscription {
        char *prefix;
        Token token;
        bool confirmed;
} Subscription;

struct Conn {
        sd_event *event;
        Registry *registry;
        const Config *config;
        ConnHooks hooks;

        coap_context_t *ctx;
        coap_session_t *session;
        ConnState state;
        /* conn_start() or conn_retry_now() was called: until then (a device
         * not enrolled yet) nothing, a reload included, starts a connect. */
        bool started;

        /* Strings libcoap keeps pointers to while a session lives: our
         * copies of [Cloud] Host='s entries (the name of the current one is
         * the certificate's expected name and the SNI) and of the files. */
        ConfigHost hosts[CONFIG_HOSTS_MAX];
        size_t n_hosts;
        /* The entry being tried, connected to, or tried last. Each attempt
         * starts from the first: a device goes back to the preferred node
         * whenever it connects again. Nothing about an entry or an address
         * that worked is remembered across attempts. */
        size_t host_index;
        char host_text[CONFIG_HOST_TEXT_MAX]; /* "name:port" of hosts[host_index] */
        /* This attempt failed for a reason no other entry changes (our own
         * files): back off without trying the next. */
        bool attempt_doomed;
        TlsFiles files;
        TlsHostCheck host_check;
        coap_dtls_pki_t pki;
        /* The last TLS session, in memory only, offered on the next connect
         * to the same host:port with the same files (lib/tls.h). */
        TlsResume *resume;

        sd_event_source *io_source;
        sd_event_source *kick_source;     /* defer: run libcoap after we queued output */
        sd_event_source *flush_source;    /* defer: start sending after connect (Trap B) */
        sd_event_source *teardown_source; /* defer: drop a dead session outside libcoap */
        sd_event_source *timer_source;    /* connect timeout, keepalive, backoff */
        /* Name resolution (agent/resolver.h), signalled with
         * CONN_RESOLVE_SIGNAL. */
        Resolver *resolver;
        /* What the current entry's lookup returned, in getaddrinfo's order.
         * A failure to connect to one address (TCP, TLS, CSM or the connect
         * timeout) moves on to addr_next; when none is left, to the next
         * entry (its lookup); only when the last entry failed do we back
         * off. */
        struct addrinfo *addrs;
        struct addrinfo *addr_next;
        char address_ip[INET6_ADDRSTRLEN]; /* the address being tried */
        char address[INET6_ADDRSTRLEN + 8]; /* the same with the port: "[::1]:5684" */
        char device_id[PROTO_DEVICE_ID_MAX + 1]; /* our certificate's CN, "" until read */

        unsigned failures;
        uint64_t connected_at;
        uint64_t last_rx;
        uint64_t ping_sent; /* 0 = none outstanding */
        char *teardown_reason;
        bool closing; /* a teardown is pending: receipts are not trusted */

        Outbox *outbox;
        InFlight in_flight[CONN_WINDOW];
        size_t n_in_flight;
        uint64_t sent_through; /* highest seq sent on this session */
        sd_event_source *sync_source; /* timer: outbox_sync() */
        /* The cloud answered 4.29 (too many requests) to event hold_seq (0:
         * none): nothing more is sent until hold_source fires, Max-Age
         * seconds later; then hold_seq and what followed it go again. */
        uint64_t hold_seq;
        sd_event_source *hold_source;
        /* What has been said in the log about a full or failing outbox. */
        uint64_t outbox_logged_at;
        uint64_t logged_dropped, logged_rejected, logged_write_errors, logged_refused;
        int last_write_error;
        uint64_t refused; /* events the cloud refused for good (4.xx) */
        ConnStats stats;

        Subscription *subs;
        size_t n_subs;
        uint64_t describe_generation;

        Pending *pending;
};

static void conn_schedule(Conn *c);
static void conn_teardown(Conn *c, const char *reason);
static void addrs_free(Conn *c);

static uint64_t now_ms(void) {
        return now_usec() / 1000;
}

static void set_state(Conn *c, ConnState s, const char *status) {
        bool was = c->state == CONN_CONNECTED;

        c->state = s;
        if (c->hooks.state_changed && (status || was != (s == CONN_CONNECTED)))
                c->hooks.state_changed(c->hooks.userdata, s == CONN_CONNECTED, status ? status : "");
}

/* --- driving libcoap from sd-event ------------------------------------- */

static void coap_process(Conn *c) {
        coap_io_process(c->ctx, COAP_IO_NO_WAIT);
}

static int on_coap_io(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        coap_process(userdata);
        return 0;
}

static int on_kick(sd_event_source *s, void *userdata) {
        coap_process(userdata);
        return 0;
}

/* Output queued from outside a libcoap callback is written by the next
 * coap_io_process(); run it once the current handler returns. */
static void kick(Conn *c) {
        sd_event_source_set_enabled(c->kick_source, SD_EVENT_ONESHOT);
}

/* --- outgoing requests ------------------------------------------------- */

static bool token_eq(const Token *t, coap_bin_const_t b) {
        return t->len == b.length && memcmp(t->s, b.s, b.length) == 0;
}

static coap_pdu_t *new_request(Conn *c, coap_pdu_code_t code, Token *ret_token) {
        coap_pdu_t *pdu = coap_new_pdu(COAP_MESSAGE_CON, code, c->session);
        size_t len = 0;

        if (!pdu)
                return NULL;
        coap_session_new_token(c->session, &len, ret_token->s);
        ret_token->len = (uint8_t)len;
        if (!coap_add_token(pdu, len, ret_token->s)) {
                coap_delete_pdu(pdu);
                return NULL;
        }
        return pdu;
}

/* Uri-Path "first" then one option per '/'-separated segment of rest. */
static int add_path(coap_pdu_t *pdu, const char *first, const char *rest) {
        const char *p = rest;

        if (!coap_add_option(pdu, COAP_OPTION_URI_PATH, strlen(first), (const uint8_t *)first))
                return -ENOMEM;
        while (p && *p) {
                const char *slash = strchr(p, '/');
                size_t n = slash ? (size_t)(slash - p) : strlen(p);

                if (n > 0 && !coap_add_option(pdu, COAP_OPTION_URI_PATH, n, (const uint8_t *)p))
                        return -ENOMEM;
                p = slash ? slash + 1 : NULL;
        }
        /* A prefix "gpio/" must not match "gpiox": keep its trailing slash
         * as an empty last segment. */
        if (rest && *rest && rest[strlen(rest) - 1] == '/' &&
            !coap_add_option(pdu, COAP_OPTION_URI_PATH, 0, NULL))
                return -ENOMEM;
        return 0;
}

static int send_event(Conn *c, const OutboxEvent *e, Token *ret_token) {
        char seq[32], epoch[32], stamp[32];
        uint8_t buf[4];
        coap_pdu_t *pdu = new_request(c, COAP_REQUEST_CODE_POST, ret_token);

        if (!pdu)
                return -ENOMEM;
        snprintf(seq, sizeof(seq), PROTO_QUERY_SEQ "%" PRIu64, e->seq);
        snprintf(epoch, sizeof(epoch), PROTO_QUERY_EPOCH "%016" PRIx64, outbox_epoch(c->outbox));
        /* When it was published; events queued by an agent that did not
         * keep the time go without (the cloud then uses its own). */
        snprintf(stamp, sizeof(stamp), PROTO_QUERY_TIME "%" PRIu64, e->time_ms);
        if (add_path(pdu, PROTO_PATH_EVENT, e->name) < 0 ||
            !coap_add_option(pdu, COAP_OPTION_MAXAGE, coap_encode_var_safe(buf, sizeof(buf), e->ttl), buf) ||
            ((e->flags & TETHER_EVENT_PRIVATE) &&
             !coap_add_option(pdu, COAP_OPTION_URI_QUERY, strlen(PROTO_QUERY_PRIVATE),
                              (const uint8_t *)PROTO_QUERY_PRIVATE)) ||
            !coap_add_option(pdu, COAP_OPTION_URI_QUERY, strlen(seq), (const uint8_t *)seq) ||
            !coap_add_option(pdu, COAP_OPTION_URI_QUERY, strlen(epoch), (const uint8_t *)epoch) ||
            (e->time_ms > 0 &&
             !coap_add_option(pdu, COAP_OPTION_URI_QUERY, strlen(stamp), (const uint8_t *)stamp)) ||
            (e->data_len > 0 && !coap_add_data(pdu, e->data_len, (const uint8_t *)e->data))) {
                coap_delete_pdu(pdu);
                return -ENOMEM;
        }
        if (coap_send(c->session, pdu) == COAP_INVALID_MID)
                return -EIO;
        return 0;
}

static void in_flight_clear(Conn *c) {
        memset(c->in_flight, 0, sizeof(c->in_flight));
        c->n_in_flight = 0;
        c->sent_through = 0;
        c->hold_seq = 0;
        sd_event_source_set_enabled(c->hold_source, SD_EVENT_OFF);
}

/* Send queued events, oldest first, until the window is full. */
static void flush_queue(Conn *c) {
        size_t slot = 0;

        if (c->state != CONN_CONNECTED || c->hold_seq != 0)
                return;
        while (c->n_in_flight < CONN_WINDOW) {
                OutboxEvent e;
                int r = outbox_next(c->outbox, c->sent_through, &e);

                if (r == -ENOENT)
                        break;
                if (r < 0) {
                        log_warning_errno(r, "Failed to read the outbox: %m");
                        break;
                }
                while (c->in_flight[slot].seq != 0)
                        slot++;
                if (send_event(c, &e, &c->in_flight[slot].token) < 0) {
                        conn_teardown(c, "failed to send an event");
                        return;
                }
                c->in_flight[slot].seq = e.seq;
                c->n_in_flight++;
                c->sent_through = e.seq;
        }
        kick(c);
}

static InFlight *in_flight_take(Conn *c, coap_bin_const_t token) {
        for (size_t i = 0; i < CONN_WINDOW; i++)
                if (c->in_flight[i].seq != 0 && token_eq(&c->in_flight[i].token, token)) {
                        c->n_in_flight--;
                        return &c->in_flight[i];
                }
        return NULL;
}

static void schedule_sync(Conn *c) {
        uint64_t ms = c->config->outbox_sync_ms ?: CONN_SYNC_DEFAULT_MS;
        int enabled = SD_EVENT_OFF;

        if (!outbox_dirty(c->outbox))
                return;
        (void)sd_event_source_get_enabled(c->sync_source, &enabled);
        if (enabled != SD_EVENT_OFF)
                return;
        sd_event_source_set_time(c->sync_source, (now_ms() + ms) * 1000);
        sd_event_source_set_enabled(c->sync_source, SD_EVENT_ONESHOT);
}

/* The cloud said 4.29 to event seq: wait max_age seconds, then send it
 * and what followed it again (the cloud refuses what follows a refused
 * event until it comes again, so nothing overtakes it; docs/protocol.md,
 * "Publish"). */
static void hold_events(Conn *c, uint64_t seq, uint32_t max_age, const uint8_t *data, size_t len) {
        uint64_t until = now_usec() + (uint64_t)max_age * 1000000, at = 0;
        int enabled = SD_EVENT_OFF;

        if (c->hold_seq == 0)
                log_notice("Cloud asked to slow down (4.29: %.*s): event %" PRIu64 " and later wait %" PRIu32 " s",
                           (int)len, (const char *)data, seq, max_age);
        if (c->hold_seq == 0 || seq < c->hold_seq)
                c->hold_seq = seq;
        c->stats.events_held++;
        (void)sd_event_source_get_enabled(c->hold_source, &enabled);
        (void)sd_event_source_get_time(c->hold_source, &at);
        if (enabled == SD_EVENT_OFF || at < until) {
                sd_event_source_set_time(c->hold_source, until);
                sd_event_source_set_enabled(c->hold_source, SD_EVENT_ONESHOT);
        }
}

static int on_hold(sd_event_source *s, uint64_t usec, void *userdata) {
        Conn *c = userdata;
        OutboxEvent e;

        if (c->hold_seq == 0)
                return 0;
        if (outbox_next(c->outbox, c->hold_seq - 1, &e) < 0 || e.seq != c->hold_seq) {
                /* Dropped while it waited (Overflow=drop-oldest): the cloud
                 * refuses what follows it on this session until it comes,
                 * so go on on a new one, where the first event ends that
                 * (docs/protocol.md, "Publish"). */
                log_notice("Event %" PRIu64 ", held back after a 4.29, left the outbox meanwhile: reconnecting "
                           "so that the cloud takes the events after it",
                           c->hold_seq);
                conn_teardown(c, "the event the cloud waits for was dropped from the outbox");
                return 0;
        }
        /* What is still out from hold_seq on goes again: a late answer to
         * it finds no slot and is ignored (a 2.01 means the cloud has it,
         * and the resend is answered as a duplicate). */
        for (size_t i = 0; i < CONN_WINDOW; i++)
                if (c->in_flight[i].seq >= c->hold_seq) {
                        c->in_flight[i].seq = 0;
                        c->n_in_flight--;
                }
        c->sent_through = c->hold_seq - 1;
        c->hold_seq = 0;
        flush_queue(c);
        return 0;
}

/* One line, now and then, about events the outbox could not keep: never
 * silent, never a flood. */
static void report_outbox(Conn *c, bool force) {
        const OutboxStats *st = outbox_stats(c->outbox);
        uint64_t now = now_ms();

        if (st->dropped == c->logged_dropped && st->rejected == c->logged_rejected &&
            st->write_errors == c->logged_write_errors && c->refused == c->logged_refused)
                return;
        if (!force && c->outbox_logged_at != 0 && now - c->outbox_logged_at < CONN_OUTBOX_LOG_MS)
                return;
        if (st->dropped != c->logged_dropped)
                log_warning("Outbox full: dropped the %" PRIu64 " oldest event(s) (%" PRIu64 " in all)",
                            st->dropped - c->logged_dropped, st->dropped);
        if (st->rejected != c->logged_rejected)
                log_warning("Outbox full: refused %" PRIu64 " new event(s) (%" PRIu64 " in all)",
                            st->rejected - c->logged_rejected, st->rejected);
        if (st->write_errors != c->logged_write_errors)
                log_warning_errno(c->last_write_error,
                                  "Failed to write %" PRIu64 " event(s) to the outbox (%" PRIu64 " in all): %m",
                                  st->write_errors - c->logged_write_errors, st->write_errors);
        if (c->refused != c->logged_refused)
                log_warning("The cloud refused %" PRIu64 " event(s) for good (%" PRIu64 " in all)",
                            c->refused - c->logged_refused, c->refused);
        c->logged_dropped = st->dropped;
        c->logged_rejected = st->rejected;
        c->logged_write_errors = st->write_errors;
        c->logged_refused = c->refused;
        c->outbox_logged_at = now;
}

static void queue_changed(Conn *c) {
        if (c->hooks.queue_changed)
                c->hooks.queue_changed(c->hooks.userdata, outbox_count(c->outbox));
}

int conn_publish(Conn *c, const char *name, const char *data, uint32_t ttl, uint32_t flags) {
        size_t len = data ? strlen(data) : 0;
        int r;

        if (!name)
                return -EINVAL;
        r = proto_name_check(name, strlen(name), PROTO_NAME_EVENT);
        if (r < 0)
                return r;
        if (len > c->config->max_payload)
                return -E2BIG;
        if (data && proto_utf8_check(data, len) < 0)
                return -EINVAL;
        r = outbox_append(c->outbox, name, data, len, ttl ? ttl : PROTO_DEFAULT_TTL, flags, NULL);
        if (r < 0) {
                if (r != -ENOBUFS && r != -E2BIG)
                        c->last_write_error = r;
                report_outbox(c, false);
                return r;
        }
        c->stats.events_published++;
        report_outbox(c, false);
        schedule_sync(c);
        queue_changed(c);
        if (c->state == CONN_CONNECTED && c->n_in_flight < CONN_WINDOW)
                flush_queue(c);
        return 0;
}

size_t conn_queued(Conn *c) {
        return outbox_count(c->outbox);
}

const ConnStats *conn_stats(Conn *c) {
        return &c->stats;
}

uint64_t conn_connected_ms(Conn *c) {
        return c->stats.connected_ms + (c->state == CONN_CONNECTED ? now_ms() - c->connected_at : 0);
}

const char *conn_served_name(ConnServed s) {
        static const char *const names[_CONN_SERVED_MAX] = {
                [CONN_SERVED_OK] = "ok",
                [CONN_SERVED_NOT_FOUND] = "not_found",
                [CONN_SERVED_REJECTED] = "rejected",
                [CONN_SERVED_BUSY] = "busy",
                [CONN_SERVED_ERROR] = "error",
        };

        return s < _CONN_SERVED_MAX ? names[s] : NULL;
}

/* Count a function call or variable read answered with resp's code. */
static void count_served(Conn *c, bool function, const coap_pdu_t *resp) {
        coap_pdu_code_t code = coap_pdu_get_code(resp);
        unsigned cls = COAP_RESPONSE_CLASS(code);
        ConnServed s = cls == 2                                     ? CONN_SERVED_OK
                       : code == COAP_RESPONSE_CODE_NOT_FOUND         ? CONN_SERVED_NOT_FOUND
                       : cls == 4                                     ? CONN_SERVED_REJECTED
                       : code == COAP_RESPONSE_CODE_SERVICE_UNAVAILABLE ? CONN_SERVED_BUSY
                                                                      : CONN_SERVED_ERROR;

        (function ? c->stats.calls : c->stats.reads)[s]++;
}

static int on_sync(sd_event_source *s, uint64_t usec, void *userdata) {
        Conn *c = userdata;
        int r = outbox_sync(c->outbox);

        if (r < 0)
                log_warning_errno(r, "Failed to sync the outbox: %m");
        report_outbox(c, false);
        schedule_sync(c);
        return 0;
}

static int send_subscribe(Conn *c, Subscription *s, bool cancel) {
        uint8_t buf[4];
        coap_pdu_t *pdu;

        if (cancel) {
                pdu = coap_new_pdu(COAP_MESSAGE_CON, COAP_REQUEST_CODE_GET, c->session);
                if (pdu && !coap_add_token(pdu, s->token.len, s->token.s)) {
                        coap_delete_pdu(pdu);
                        pdu = NULL;
                }
        } else
                pdu = new_request(c, COAP_REQUEST_CODE_GET, &s->token);
        if (!pdu)
                return -ENOMEM;
        if (!coap_add_option(pdu, COAP_OPTION_OBSERVE,
                             coap_encode_var_safe(buf, sizeof(buf),
                                                  cancel ? COAP_OBSERVE_CANCEL : COAP_OBSERVE_ESTABLISH),
                             buf) ||
            add_path(pdu, PROTO_PATH_EVENT, s->prefix) < 0) {
                coap_delete_pdu(pdu);
                return -ENOMEM;
        }
        s->confirmed = false;
        return coap_send(c->session, pdu) == COAP_INVALID_MID ? -EIO : 0;
}

static void subs_free(Conn *c) {
        for (size_t i = 0; i < c->n_subs; i++)
                free(c->subs[i].prefix);
        free(c->subs);
        c->subs = NULL;
        c->n_subs = 0;
}

/* Make the cloud's view match the registry: cancel prefixes no longer
 * wanted, subscribe new ones. On a fresh connection nothing is known to
 * the cloud, so everything is (re)subscribed. */
static void sync_subscriptions(Conn *c, bool fresh) {
        const char *const *prefixes;
        size_t n = registry_prefixes(c->registry, &prefixes);
        Subscription *next = calloc(n + 1, sizeof(Subscription));

        if (!next) {
                log_error("Out of memory while updating subscriptions");
                return;
        }
        for (size_t i = 0; i < n; i++) {
                Subscription *old = NULL;

                for (size_t k = 0; k < c->n_subs && !fresh && !old; k++)
                        if (c->subs[k].prefix && streq(c->subs[k].prefix, prefixes[i]))
                                old = &c->subs[k];
                if (old) {
                        next[i] = *old;
                        old->prefix = NULL; /* moved */
                        continue;
                }
                next[i].prefix = strdup(prefixes[i]);
                if (!next[i].prefix || send_subscribe(c, &next[i], false) < 0)
                        log_warning("Failed to subscribe to '%s'", prefixes[i]);
        }
        for (size_t k = 0; k < c->n_subs && !fresh; k++)
                if (c->subs[k].prefix && send_subscribe(c, &c->subs[k], true) < 0)
                        log_warning("Failed to unsubscribe from '%s'", c->subs[k].prefix);
        subs_free(c);
        c->subs = next;
        c->n_subs = n;
        kick(c);
}

static void send_describe_changed(Conn *c) {
        Token t;
        coap_pdu_t *pdu = new_request(c, COAP_REQUEST_CODE_POST, &t);

        if (!pdu)
                return;
        if (add_path(pdu, PROTO_PATH_DESCRIBE, NULL) < 0 || coap_send(c->session, pdu) == COAP_INVALID_MID)
                log_warning("Failed to tell the cloud that the describe data changed");
        kick(c);
}

void conn_registry_changed(Conn *c) {
        if (c->state != CONN_CONNECTED)
                return;
        sync_subscriptions(c, false);
        if (registry_generation(c->registry) != c->describe_generation) {
                c->describe_generation = registry_generation(c->registry);
                send_describe_changed(c);
        }
}

void conn_describe_changed(Conn *c) {
        if (c->state == CONN_CONNECTED)
                send_describe_changed(c);
}

/* Answer q with an error and free it. */
static void pending_fail(Pending *q, int error) {
        if (q->block_cb)
                q->block_cb(error, 0, NULL, NULL, 0, 0, q->userdata);
        else
                q->cb(error, 0, NULL, 0, 0, q->userdata);
        free(q);
}

static int on_request_timeout(sd_event_source *s, uint64_t usec, void *userdata) {
        Pending *q = userdata;
        Conn *c = q->conn;

        for (Pending **p = &c->pending; *p; p = &(*p)->next)
                if (*p == q) {
                        *p = q->next;
                        break;
                }
        sd_event_source_disable_unref(q->timer);
        pending_fail(q, -ETIMEDOUT);
        return 0;
}

/* One Uri-Query option per '&'-separated part of query. */
static int add_query(coap_pdu_t *pdu, const char *query) {
        const char *p = query;

        while (p && *p) {
                const char *amp = strchr(p, '&');
                size_t n = amp ? (size_t)(amp - p) : strlen(p);

                if (n > 0 && !coap_add_option(pdu, COAP_OPTION_URI_QUERY, n, (const uint8_t *)p))
                        return -ENOMEM;
                p = amp ? amp + 1 : NULL;
        }
        return 0;
}

static int request_send(Conn *c, unsigned method, const char *path0, const char *rest, const char *query,
                        const void *payload, size_t len, int content_format, int64_t block2, uint64_t timeout_ms,
                        conn_request_fn cb, conn_block_fn block_cb, void *userdata) {
        Pending *q;
        coap_pdu_t *pdu;
        uint8_t cf[2], b2[4];
        int r;

        if (c->state != CONN_CONNECTED || !c->session)
                return -ENOTCONN;
        q = calloc(1, sizeof(*q));
        if (!q)
                return -ENOMEM;
        pdu = new_request(c, (coap_pdu_code_t)method, &q->token);
        if (!pdu) {
                free(q);
                return -ENOMEM;
        }
        if (add_path(pdu, path0, rest) < 0 || add_query(pdu, query) < 0 ||
            (block2 >= 0 &&
             !coap_add_option(pdu, COAP_OPTION_BLOCK2, coap_encode_var_safe(b2, sizeof(b2), (unsigned)block2), b2)) ||
            (content_format >= 0 &&
             !coap_add_option(pdu, COAP_OPTION_CONTENT_FORMAT,
                              coap_encode_var_safe(cf, sizeof(cf), (unsigned)content_format), cf)) ||
            (len > 0 && !coap_add_data(pdu, len, payload))) {
                coap_delete_pdu(pdu);
                free(q);
                return -E2BIG;
        }
        r = sd_event_add_time_relative(c->event, &q->timer, CLOCK_MONOTONIC, timeout_ms * 1000, 10000,
                                       on_request_timeout, q);
        if (r < 0) {
                coap_delete_pdu(pdu);
                free(q);
                return r;
        }
        if (coap_send(c->session, pdu) == COAP_INVALID_MID) {
                sd_event_source_disable_unref(q->timer);
                free(q);
                return -EIO;
        }
        q->conn = c;
        q->cb = cb;
        q->block_cb = block_cb;
        q->userdata = userdata;
        q->next = c->pending;
        c->pending = q;
        kick(c);
        return 0;
}

int conn_request(Conn *c, unsigned method, const char *path0, const char *rest, const void *payload, size_t len,
                 int content_format, uint64_t timeout_ms, conn_request_fn cb, void *userdata) {
        return request_send(c, method, path0, rest, NULL, payload, len, content_format, -1, timeout_ms, cb, NULL,
                            userdata);
}

int conn_request_query(Conn *c, unsigned method, const char *path0, const char *rest, const char *query,
                       const void *payload, size_t len, int content_format, uint64_t timeout_ms, conn_request_fn cb,
                       void *userdata) {
        return request_send(c, method, path0, rest, query, payload, len, content_format, -1, timeout_ms, cb, NULL,
                            userdata);
}

int conn_request_block2(Conn *c, const char *path0, const char *rest, uint32_t num, unsigned szx, uint64_t timeout_ms,
                        conn_block_fn cb, void *userdata) {
        if (szx > 7 || num >= (1u << 20))
                return -EINVAL;
        return request_send(c, COAP_REQUEST_CODE_GET, path0, rest, NULL, NULL, 0, -1, (int64_t)(num << 4 | szx),
                            timeout_ms, NULL, cb, userdata);
}

/* The Block2, Size2 and ETag options of a response. */
static void block_options(const coap_pdu_t *rcvd, ConnBlock *ret) {
        coap_opt_iterator_t it;
        coap_opt_t *opt;

        *ret = (ConnBlock){};
        opt = coap_check_option(rcvd, COAP_OPTION_BLOCK2, &it);
        if (opt && coap_opt_length(opt) <= 3) {
                unsigned v = coap_decode_var_bytes(coap_opt_value(opt), coap_opt_length(opt));

                ret->have_block2 = true;
                ret->num = v >> 4;
                ret->more = v & 8;
                ret->szx = v & 7;
        }
        opt = coap_check_option(rcvd, COAP_OPTION_SIZE2, &it);
        if (opt && coap_opt_length(opt) <= 8) {
                ret->have_size2 = true;
                ret->size2 = coap_decode_var_bytes8(coap_opt_value(opt), coap_opt_length(opt));
        }
        opt = coap_check_option(rcvd, COAP_OPTION_ETAG, &it);
        if (opt && coap_opt_length(opt) <= sizeof(ret->etag)) {
                ret->etag_len = coap_opt_length(opt);
                memcpy(ret->etag, coap_opt_value(opt), ret->etag_len);
        }
}

/* --- incoming ---------------------------------------------------------- */

/* A 4.29's retry time: RFC 8516, after Max-Age seconds (absent: 60),
 * kept within 1..3600. The same for a 5.03 (RFC 7252: Max-Age, default
 * 60, says when to try again). */
static uint32_t retry_after(const coap_pdu_t *rcvd) {
        coap_opt_iterator_t it;
        coap_opt_t *opt = coap_check_option(rcvd, COAP_OPTION_MAXAGE, &it);
        uint32_t max_age = opt ? coap_decode_var_bytes(coap_opt_value(opt), coap_opt_length(opt)) : 60;

        return max_age < 1 ? 1 : max_age > 3600 ? 3600 : max_age;
}

static coap_response_t on_response(coap_session_t *session, const coap_pdu_t *sent, const coap_pdu_t *rcvd,
                                   const coap_mid_t mid) {
        Conn *c = coap_session_get_app_data(session);
        coap_bin_const_t token = coap_pdu_get_token(rcvd);
        coap_pdu_code_t code = coap_pdu_get_code(rcvd);
        const uint8_t *data = NULL;
        size_t len = 0;
        uint32_t retry;
        InFlight *f;

        if (!c || session != c->session)
                return COAP_RESPONSE_OK;
        c->last_rx = now_ms();
        (void)coap_get_data(rcvd, &len, &data);

        for (Pending **p = &c->pending; *p; p = &(*p)->next) {
                Pending *q = *p;

                if (!token_eq(&q->token, token))
                        continue;
                *p = q->next;
                sd_event_source_disable_unref(q->timer);
                retry = code == COAP_RESPONSE_CODE(429) || code == COAP_RESPONSE_CODE(503) ? retry_after(rcvd) : 0;
                if (q->block_cb) {
                        ConnBlock b;

                        block_options(rcvd, &b);
                        q->block_cb(0, code, &b, data, len, retry, q->userdata);
                } else
                        q->cb(0, code, data, len, retry, q->userdata);
                free(q);
                return COAP_RESPONSE_OK;
        }

        f = in_flight_take(c, token);
        if (f) {
                uint64_t seq = f->seq;

                f->seq = 0;
                /* After a 5.xx nothing later on this session counts: the
                 * event it refused must go first on the next one. */
                if (c->closing)
                        return COAP_RESPONSE_OK;
                if (code == COAP_RESPONSE_CODE(429)) {
                        hold_events(c, seq, retry_after(rcvd), data, len);
                        return COAP_RESPONSE_OK;
                }
                if (c->hold_seq != 0 && seq > c->hold_seq)
                        /* Sent after the one held back: goes again after it. */
                        return COAP_RESPONSE_OK;
                if (COAP_RESPONSE_CLASS(code) == 5) {
                        /* The cloud could not store it (its disk, say): the
                         * event stays queued and goes again, in order, on
                         * a new connection. */
                        log_warning("Cloud could not take event %" PRIu64 " (%d.%02d: %.*s), reconnecting", seq,
                                    COAP_RESPONSE_CLASS(code), code & 0x1f, (int)len, (const char *)data);
                        conn_teardown(c, "the cloud could not take an event");
                        return COAP_RESPONSE_OK;
                }
                if (COAP_RESPONSE_CLASS(code) != 2) {
                        /* Refused for good (bad name, too large): retrying
                         * cannot help, so it is dropped and counted. */
                        OutboxEvent e;
                        bool known = outbox_next(c->outbox, seq - 1, &e) == 0 && e.seq == seq;

                        log_warning("Cloud refused event '%s' with %d.%02d: %.*s", known ? e.name : "?",
                                    COAP_RESPONSE_CLASS(code), code & 0x1f, (int)len, (const char *)data);
                        c->refused++;
                        c->stats.events_refused++;
                } else
                        c->stats.events_acked++;
                (void)outbox_ack(c->outbox, seq);
                schedule_sync(c);
                queue_changed(c);
                flush_queue(c);
                return COAP_RESPONSE_OK;
        }

        for (size_t i = 0; i < c->n_subs; i++) {
                Subscription *s = &c->subs[i];
                coap_opt_iterator_t it;
                ProtoEvent ev = {};

                if (!token_eq(&s->token, token))
                        continue;
                if (COAP_RESPONSE_CLASS(code) != 2) {
                        log_warning("Cloud refused subscription '%s' with %d.%02d: %.*s", s->prefix,
                                    COAP_RESPONSE_CLASS(code), code & 0x1f, (int)len, (const char *)data);
                        return COAP_RESPONSE_OK;
                }
                if (!s->confirmed && len == 0) {
                        s->confirmed = coap_check_option(rcvd, COAP_OPTION_OBSERVE, &it) != NULL;
                        return COAP_RESPONSE_OK;
                }
                if (proto_event_decode(data, len, &ev) < 0) {
                        log_warning("Ignoring malformed event notification for '%s'", s->prefix);
                        return COAP_RESPONSE_OK;
                }
                registry_dispatch(c->registry, ev.name, ev.data);
                proto_event_done(&ev);
                return COAP_RESPONSE_OK;
        }
        return COAP_RESPONSE_OK;
}

static void respond_text(coap_pdu_t *resp, coap_pdu_code_t code, const char *fmt, ...) _printf_(3, 4);
static void respond_text(coap_pdu_t *resp, coap_pdu_code_t code, const char *fmt, ...) {
        char buf[256];
        uint8_t cf[2];
        va_list ap;
        int n;

        va_start(ap, fmt);
        n = vsnprintf(buf, sizeof(buf), fmt, ap);
        va_end(ap);
        if (n < 0)
                n = 0;
        if ((size_t)n >= sizeof(buf))
                n = sizeof(buf) - 1;
        coap_pdu_set_code(resp, code);
        coap_add_option(resp, COAP_OPTION_CONTENT_FORMAT, coap_encode_var_safe(cf, sizeof(cf), PROTO_CF_TEXT),
                        cf);
        coap_add_data(resp, (size_t)n, (const uint8_t *)buf);
}

static void respond_data(coap_pdu_t *resp, coap_pdu_code_t code, unsigned format, const char *data,
                         size_t len) {
        uint8_t cf[2];

        coap_pdu_set_code(resp, code);
        coap_add_option(resp, COAP_OPTION_CONTENT_FORMAT, coap_encode_var_safe(cf, sizeof(cf), format), cf);
        coap_add_data(resp, len, (const uint8_t *)data);
}

static void handle_call(Conn *c, const char *name, const coap_pdu_t *req, coap_pdu_t *resp) {
        _cleanup_free_ char *arg = NULL;
        const uint8_t *data = NULL;
        char result[12];
        int32_t value;
        size_t len = 0;
        int r;

        (void)coap_get_data(req, &len, &data);
        if (len > c->config->max_payload)
                return respond_text(resp, COAP_RESPONSE_CODE_REQUEST_TOO_LARGE,
                                    "argument is %zu bytes, the limit is %zu", len, c->config->max_payload);
        if (proto_utf8_check((const char *)data, len) < 0)
                return respond_text(resp, COAP_RESPONSE_CODE_BAD_REQUEST, "argument is not UTF-8 text");
        arg = strndup(len ? (const char *)data : "", len);
        if (!arg)
                return respond_text(resp, COAP_RESPONSE_CODE_INTERNAL_ERROR, "out of memory");

        if (!registry_has_function(c->registry, name))
                return respond_text(resp, COAP_RESPONSE_CODE_NOT_FOUND, "unknown function '%s'", name);
        r = registry_call(c->registry, name, arg, &value);
        if (r == -EINVAL)
                return respond_text(resp, COAP_RESPONSE_CODE_BAD_REQUEST, "function '%s' rejected the argument",
                                    name);
        if (r == -EBUSY)
                return respond_text(resp, COAP_RESPONSE_CODE_SERVICE_UNAVAILABLE, "function '%s' is busy", name);
        if (r < 0) {
                log_warning_errno(r, "Function '%s' failed: %m", name);
                return respond_text(resp, COAP_RESPONSE_CODE_INTERNAL_ERROR, "function '%s' failed: %s", name,
                                    strerror(-r));
        }
        r = proto_result_format(value, result);
        respond_data(resp, COAP_RESPONSE_CODE_CHANGED, PROTO_CF_TEXT, result, (size_t)r);
}

static void handle_read(Conn *c, const char *name, coap_pdu_t *resp) {
        _cleanup_free_ char *value = NULL;
        size_t len;
        int r;

        if (!registry_has_variable(c->registry, name))
                return respond_text(resp, COAP_RESPONSE_CODE_NOT_FOUND, "unknown variable '%s'", name);
        r = registry_read(c->registry, name, &value, &len);
        if (r == -EBUSY)
                return respond_text(resp, COAP_RESPONSE_CODE_SERVICE_UNAVAILABLE, "variable '%s' is busy", name);
        if (r < 0) {
                log_warning_errno(r, "Reading variable '%s' failed: %m", name);
                return respond_text(resp, COAP_RESPONSE_CODE_INTERNAL_ERROR, "reading variable '%s' failed: %s",
                                    name, strerror(-r));
        }
        if (len > c->config->max_payload)
                return respond_text(resp, COAP_RESPONSE_CODE_INTERNAL_ERROR,
                                    "variable '%s' is %zu bytes, over the limit of %zu", name, len,
                                    c->config->max_payload);
        respond_data(resp, COAP_RESPONSE_CODE_CONTENT, PROTO_CF_JSON, value, len);
}

static void handle_describe(Conn *c, coap_pdu_t *resp) {
        _cleanup_free_ char *d = NULL;
        size_t len;
        int r;

        r = c->hooks.describe(c->hooks.userdata, &d, &len);
        if (r < 0)
                return respond_text(resp, COAP_RESPONSE_CODE_INTERNAL_ERROR, "describe failed: %s",
                                    strerror(-r));
        respond_data(resp, COAP_RESPONSE_CODE_CONTENT, PROTO_CF_JSON, d, len);
}

/* The sid of "/t/{sid}": decimal 1..4294967295 without leading zeros; 0
 * for anything else. */
static uint32_t stream_sid(const char *s) {
        uint64_t v = 0;
        size_t n = strlen(s);

        if (n == 0 || n > 10 || s[0] == '0' || strspn(s, "0123456789") != n)
                return 0;
        for (size_t i = 0; i < n; i++)
                v = v * 10 + (uint64_t)(s[i] - '0');
        return v > UINT32_MAX ? 0 : (uint32_t)v;
}

static void handle_stream(Conn *c, coap_pdu_code_t method, uint32_t sid, const coap_pdu_t *req,
                          const coap_string_t *query, coap_pdu_t *resp) {
        ConnStreamAnswer a = {};
        const uint8_t *data = NULL;
        size_t len = 0;
        unsigned code;

        if (method != COAP_REQUEST_CODE_PUT && method != COAP_REQUEST_CODE_POST && method != COAP_REQUEST_CODE_DELETE)
                return respond_text(resp, COAP_RESPONSE_CODE_NOT_ALLOWED, "use PUT, POST or DELETE on /t/SID");
        (void)coap_get_data(req, &len, &data);
        code = c->hooks.stream_request(c->hooks.userdata, method, sid, query ? (const char *)query->s : NULL,
                                       query ? query->length : 0, data, len, &a);
        coap_pdu_set_code(resp, (coap_pdu_code_t)code);
        /* Options in their numeric order: Content-Format (12), Max-Age (14). */
        if (a.text[0]) {
                uint8_t cf[2];

                coap_add_option(resp, COAP_OPTION_CONTENT_FORMAT,
                                coap_encode_var_safe(cf, sizeof(cf), a.json ? PROTO_CF_JSON : PROTO_CF_TEXT), cf);
        }
        if (a.max_age > 0) {
                uint8_t buf[4];

                coap_add_option(resp, COAP_OPTION_MAXAGE, coap_encode_var_safe(buf, sizeof(buf), a.max_age), buf);
        }
        if (a.text[0])
                coap_add_data(resp, strnlen(a.text, sizeof(a.text)), (const uint8_t *)a.text);
}

static void on_request(coap_resource_t *resource, coap_session_t *session, const coap_pdu_t *req,
                       const coap_string_t *query, coap_pdu_t *resp) {
        Conn *c = coap_session_get_app_data(session);
        coap_pdu_code_t method = coap_pdu_get_code(req);
        coap_string_t *path = coap_get_uri_path(req);
        _cleanup_free_ char *p = NULL;
        const char *name;

        /* A request from the cloud does not prove it reads what we send:
         * only Pongs and responses to our requests count as liveness. */
        if (!c)
                return respond_text(resp, COAP_RESPONSE_CODE_SERVICE_UNAVAILABLE, "not ready");
        if (!path)
                return respond_text(resp, COAP_RESPONSE_CODE_BAD_REQUEST, "no path");
        p = strndup((const char *)path->s, path->length);
        coap_delete_string(path);
        if (!p)
                return respond_text(resp, COAP_RESPONSE_CODE_INTERNAL_ERROR, "out of memory");

        if (streq(p, PROTO_PATH_DESCRIBE))
                return method == COAP_REQUEST_CODE_GET
                               ? handle_describe(c, resp)
                               : respond_text(resp, COAP_RESPONSE_CODE_NOT_ALLOWED, "use GET on /d");
        if (startswith(p, PROTO_PATH_OTA "/") && !strchr(p + 2, '/') && c->hooks.ota_request) {
                const uint8_t *data = NULL;
                size_t len = 0;
                char text[256] = "";
                unsigned code;

                if (method != COAP_REQUEST_CODE_POST)
                        return respond_text(resp, COAP_RESPONSE_CODE_NOT_ALLOWED, "use POST on /o/JOB");
                (void)coap_get_data(req, &len, &data);
                code = c->hooks.ota_request(c->hooks.userdata, p + 2, data, len, text, sizeof(text));
                if (text[0])
                        return respond_text(resp, (coap_pdu_code_t)code, "%s", text);
                coap_pdu_set_code(resp, (coap_pdu_code_t)code);
                return;
        }

        if (startswith(p, PROTO_PATH_STREAM "/")) {
                uint32_t sid = stream_sid(p + strlen(PROTO_PATH_STREAM "/"));

                if (sid != 0 && c->hooks.stream_request)
                        return handle_stream(c, method, sid, req, query, resp);
        }
        if (startswith(p, PROTO_PATH_FUNCTION "/") || startswith(p, PROTO_PATH_VARIABLE "/")) {
                bool is_fn = p[0] == PROTO_PATH_FUNCTION[0];

                name = p + 2;
                if (proto_name_check(name, strlen(name), PROTO_NAME_FUNCTION) < 0)
                        respond_text(resp, COAP_RESPONSE_CODE_BAD_REQUEST, "invalid name '%.64s'", name);
                else if (is_fn && method == COAP_REQUEST_CODE_POST)
                        handle_call(c, name, req, resp);
                else if (is_fn)
                        respond_text(resp, COAP_RESPONSE_CODE_NOT_ALLOWED, "use POST to call a function");
                else if (method == COAP_REQUEST_CODE_GET)
                        handle_read(c, name, resp);
                else
                        respond_text(resp, COAP_RESPONSE_CODE_NOT_ALLOWED, "use GET to read a variable");
                count_served(c, is_fn, resp);
                return;
        }
        respond_text(resp, COAP_RESPONSE_CODE_NOT_FOUND, "no resource '%.64s'", p);
}

static void on_pong(coap_session_t *session, const coap_pdu_t *rcvd, const coap_mid_t mid) {
        Conn *c = coap_session_get_app_data(session);

        if (c && session == c->session)
                c->last_rx = now_ms();
}

/* --- connection lifecycle ---------------------------------------------- */

static void arm_timer(Conn *c, uint64_t at_ms) {
        sd_event_source_set_time(c->timer_source, at_ms * 1000);
        sd_event_source_set_enabled(c->timer_source, SD_EVENT_ONESHOT);
}

/* Our device id is the CN of our certificate, as the cloud sees it. Read
 * again on every connection: the certificate may have been renewed. */
static void read_device_id(Conn *c) {
        FILE *f = fopen(c->files.cert_file, "re");
        X509 *x = f ? PEM_read_X509(f, NULL, NULL, NULL) : NULL;
        char cn[PROTO_DEVICE_ID_MAX + 1];
        int n = x ? X509_NAME_get_text_by_NID(X509_get_subject_name(x), NID_commonName, cn, sizeof(cn)) : -1;

        if (n > 0 && proto_name_check(cn, (size_t)n, PROTO_NAME_DEVICE) >= 0)
                memcpy(c->device_id, cn, (size_t)n + 1);
        X509_free(x);
        if (f)
                fclose(f);
}

const char *conn_device_id(Conn *c) {
        if (!c->device_id[0])
                read_device_id(c);
        return c->device_id[0] ? c->device_id : NULL;
}

static int on_flush(sd_event_source *s, void *userdata) {
        Conn *c = userdata;
        char status[CONFIG_HOST_TEXT_MAX + INET6_ADDRSTRLEN + 32];

        if (c->state != CONN_CONNECTING || !c->session ||
            coap_session_get_state(c->session) != COAP_SESSION_STATE_ESTABLISHED)
                return 0;
        c->connected_at = c->last_rx = now_ms();
        c->stats.handshakes_completed++;
        c->stats.resumed = tls_session_resumed(c->session);
        if (c->stats.resumed)
                c->stats.handshakes_resumed++;
        c->ping_sent = 0;
        addrs_free(c);
        if (streq(c->hosts[c->host_index].name, c->address_ip))
                snprintf(status, sizeof(status), "Connected to %s", c->host_text);
        else
                snprintf(status, sizeof(status), "Connected to %s (%s)", c->host_text, c->address_ip);
        read_device_id(c);
        log_struct(LOG_INFO,
                   &(LogFields){ .message_id = LOG_MESSAGE_CLOUD_CONNECTED, .device_id = conn_device_id(c),
                                 .peer = c->address },
                   "%s", status);
        set_state(c, CONN_CONNECTED, status);
        arm_timer(c, c->last_rx + c->config->keepalive_ms);
        c->describe_generation = registry_generation(c->registry);
        sync_subscriptions(c, true);
        /* Everything not acknowledged when the last connection died is sent
         * again, in order; the cloud drops what it already delivered. */
        in_flight_clear(c);
        flush_queue(c);
        return 0;
}

static int on_coap_event(coap_session_t *session, const coap_event_t event) {
        Conn *c = coap_session_get_app_data(session);

        if (!c || session != c->session)
                return 0;
        switch (event) {
        case COAP_EVENT_TCP_CONNECTED:
                (void)tls_session_set_nodelay(session);
                break;
        case COAP_EVENT_SESSION_CONNECTED:
                /* Too early to build PDUs here (docs/design/libcoap.md, trap B). */
                sd_event_source_set_enabled(c->flush_source, SD_EVENT_ONESHOT);
                break;
        case COAP_EVENT_DTLS_ERROR:
                if (c->host_check.failure[0])
                        conn_teardown(c, c->host_check.failure);
                else
                        conn_teardown(c, "TLS handshake failed: certificate refused by either side");
                break;
        case COAP_EVENT_TCP_FAILED:
                conn_teardown(c, "TCP connection failed");
                break;
        case COAP_EVENT_TCP_CLOSED:
        case COAP_EVENT_DTLS_CLOSED:
        case COAP_EVENT_SESSION_CLOSED:
        case COAP_EVENT_SESSION_FAILED:
                conn_teardown(c, "connection closed by peer");
                break;
        default:
                break;
        }
        return 0;
}

static void addrs_free(Conn *c) {
        if (c->addrs)
                freeaddrinfo(c->addrs);
        c->addrs = c->addr_next = NULL;
}

/* Remember which address we are connecting to, for the log. */
static void set_address(Conn *c, const struct sockaddr *sa) {
        uint16_t port = c->hosts[c->host_index].port;
        struct sockaddr_in6 sin6;
        struct sockaddr_in sin;

        if (sa->sa_family == AF_INET6) {
                memcpy(&sin6, sa, sizeof(sin6));
                if (!inet_ntop(AF_INET6, &sin6.sin6_addr, c->address_ip, sizeof(c->address_ip)))
                        strcpy(c->address_ip, "?");
                snprintf(c->address, sizeof(c->address), "[%s]:%u", c->address_ip, port);
        } else {
                memcpy(&sin, sa, sizeof(sin));
                if (!inet_ntop(AF_INET, &sin.sin_addr, c->address_ip, sizeof(c->address_ip)))
                        strcpy(c->address_ip, "?");
                snprintf(c->address, sizeof(c->address), "%s:%u", c->address_ip, port);
        }
}

static int connect_to(Conn *c, const struct sockaddr *sa, socklen_t salen) {
        coap_address_t dst;

        coap_address_init(&dst);
        memcpy(&dst.addr, sa, salen);
        dst.size = salen;
        if (sa->sa_family == AF_INET)
                dst.addr.sin.sin_port = htons(c->hosts[c->host_index].port);
        else
                dst.addr.sin6.sin6_port = htons(c->hosts[c->host_index].port);

        /* The certificate must name the entry this address came from. */
        c->host_check.host = c->hosts[c->host_index].name;
        tls_resume_target(c->resume, c->host_text, &c->files);
        tls_pki_init(&c->pki, &c->files, &c->host_check);
        c->session = coap_new_client_session_pki(c->ctx, NULL, &dst, COAP_PROTO_TLS, &c->pki);
        if (!c->session)
                return -ECONNREFUSED;
        coap_session_set_app_data(c->session, c);
        set_state(c, CONN_CONNECTING, NULL);
        arm_timer(c, now_ms() + c->config->connect_timeout_ms);
        kick(c);
        return 0;
}

/* Start connecting to the next resolved address a session can be made
 * for. 0 if one is being connected to; -ENOENT if none is left (then
 * c->address names the last one tried). */
static int connect_next(Conn *c) {
        while (c->addr_next) {
                struct addrinfo *ai = c->addr_next;

                c->addr_next = ai->ai_next;
                if ((ai->ai_family != AF_INET && ai->ai_family != AF_INET6) ||
                    ai->ai_addrlen > sizeof(((coap_address_t *)NULL)->addr))
                        continue;
                set_address(c, ai->ai_addr);
                if (connect_to(c, ai->ai_addr, ai->ai_addrlen) == 0)
                        return 0;
                if (c->addr_next)
                        log_warning("Failed to connect to %s at %s (cannot create a session), trying the next "
                                    "address",
                                    c->host_text, c->address);
        }
        return -ENOENT;
}

static void on_resolved(void *userdata, int ret, struct addrinfo *ai) {
        Conn *c = userdata;
        char reason[300];

        if (c->state != CONN_RESOLVING) {
                if (ai)
                        freeaddrinfo(ai);
                return;
        }
        if (ret != 0) {
                snprintf(reason, sizeof(reason), "cannot resolve '%s': %s", c->hosts[c->host_index].name,
                         gai_strerror(ret));
                conn_teardown(c, reason);
                return;
        }
        addrs_free(c);
        c->addrs = c->addr_next = ai;
        strcpy(c->address, "no usable address");
        if (connect_next(c) < 0) {
                snprintf(reason, sizeof(reason), "%s: cannot create a session", c->address);
                conn_teardown(c, reason);
        }
}

static void set_host(Conn *c, size_t i) {
        c->host_index = i;
        config_host_text(&c->hosts[i], c->host_text);
}

/* Look up the current entry's name; a failure goes through
 * conn_teardown(). */
static int resolve_host(Conn *c) {
        int r;

        set_state(c, CONN_RESOLVING, NULL);
        arm_timer(c, now_ms() + c->config->connect_timeout_ms);
        r = resolver_start(c->resolver, c->hosts[c->host_index].name);
        if (r < 0) {
                conn_teardown(c, r == -ENOMEM ? "out of memory" : "cannot start name resolution");
                return r;
        }
        return 0;
}

static int begin_connect(Conn *c) {
        const char *path;
        int r;

        /* An attempt has begun from here on: every failure below goes
         * through conn_teardown() and the backoff, which ignores failures
         * in CONN_IDLE and CONN_BACKOFF (the states we are called in). */
        set_state(c, CONN_RESOLVING, NULL);
        c->stats.connect_attempts++;
        set_host(c, 0);
        c->attempt_doomed = false;
        r = tls_files_check(&c->files, &path);
        if (r < 0) {
                char reason[512];
                snprintf(reason, sizeof(reason), "cannot read '%s': %s", path, strerror(-r));
                c->attempt_doomed = true;
                conn_teardown(c, reason);
                return r;
        }
        return resolve_host(c);
}

/* Answer every request still waiting: the connection they went out on is
 * gone. Callbacks may start new requests; those fail at once. */
static void fail_pending(Conn *c) {
        Pending *list = TAKE_PTR(c->pending);

        while (list) {
                Pending *q = list;

                list = q->next;
                sd_event_source_disable_unref(q->timer);
                pending_fail(q, -ENOTCONN);
        }
}

static void drop_session(Conn *c) {
        coap_session_t *s = c->session;

        c->session = NULL;
        c->closing = false;
        fail_pending(c);
        if (s) {
                coap_session_set_no_observe_cancel(s);
                coap_session_release(s);
        }
        in_flight_clear(c);
        for (size_t i = 0; i < c->n_subs; i++)
                c->subs[i].confirmed = false;
}

static int on_teardown(sd_event_source *s, void *userdata) {
        Conn *c = userdata;
        const char *why = c->teardown_reason ? c->teardown_reason : "unknown reason";
        uint64_t delay;
        char reason[512], status[512 + 2 * CONFIG_HOST_TEXT_MAX + 64];
        bool was_connected = c->state == CONN_CONNECTED;

        if (c->state == CONN_CONNECTED && now_ms() - c->connected_at >= c->config->stable_ms)
                c->failures = 0;
        if (was_connected) {
                c->stats.reconnects++;
                c->stats.connected_ms += now_ms() - c->connected_at;
        } else if (c->state == CONN_CONNECTING)
                c->stats.handshakes_failed++;
        /* A lookup that timed out must not write into the next one's request. */
        resolver_cancel(c->resolver);
        if (c->state != CONN_CONNECTING)
                snprintf(reason, sizeof(reason), "%s", why);
        else if (!c->addr_next)
                snprintf(reason, sizeof(reason), "%s: %s", c->address, why);
        else {
                /* This address failed; the next one gets its own attempt
                 * (and ConnectTimeoutSec) right away, without a backoff. */
                log_warning("Failed to connect to %s at %s (%s), trying the next address", c->host_text, c->address,
                            why);
                drop_session(c);
                free(c->teardown_reason);
                c->teardown_reason = NULL;
                if (connect_next(c) == 0)
                        return 0;
                snprintf(reason, sizeof(reason), "%s: cannot create a session", c->address);
        }
        drop_session(c);
        addrs_free(c);
        if ((c->state == CONN_RESOLVING || c->state == CONN_CONNECTING) && !c->attempt_doomed &&
            c->host_index + 1 < c->n_hosts) {
                /* This entry failed; the next one gets its lookup and its
                 * addresses right away, without a backoff. */
                char failed[CONFIG_HOST_TEXT_MAX];

                free(c->teardown_reason);
                c->teardown_reason = NULL;
                memcpy(failed, c->host_text, sizeof(failed));
                set_host(c, c->host_index + 1);
                log_warning("Failed to connect to %s (%s), trying the next host, %s", failed, reason, c->host_text);
                snprintf(status, sizeof(status), "Connecting to %s (%s failed: %s)", c->host_text, failed, reason);
                set_state(c, CONN_RESOLVING, status);
                resolve_host(c);
                return 0;
        }
        delay = backoff_delay_ms(c->config->reconnect_min_ms, c->config->reconnect_max_ms, c->failures,
                                 (uint32_t)random());
        c->failures++;
        snprintf(status, sizeof(status), "Disconnected from %s (%s); retrying in %.1f s", c->host_text, reason,
                 delay / 1000.0);
        if (was_connected)
                log_struct(LOG_WARNING,
                           &(LogFields){ .message_id = LOG_MESSAGE_CLOUD_DISCONNECTED, .device_id = conn_device_id(c),
                                         .peer = c->address },
                           "%s", status);
        else
                log_warning("%s", status);
        set_state(c, CONN_BACKOFF, status);
        arm_timer(c, now_ms() + delay);
        return 0;
}

/* Never release a session inside a libcoap callback: defer it. */
static void conn_teardown(Conn *c, const char *reason) {
        if (c->state == CONN_BACKOFF || c->state == CONN_IDLE)
                return;
        c->closing = true;
        if (!c->teardown_reason) {
                free(c->teardown_reason);
                c->teardown_reason = strdup(reason);
        }
        sd_event_source_set_enabled(c->teardown_source, SD_EVENT_ONESHOT);
}

static int on_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        Conn *c = userdata;
        uint64_t now = now_ms();

        switch (c->state) {
        case CONN_BACKOFF:
        case CONN_IDLE:
                free(c->teardown_reason);
                c->teardown_reason = NULL;
                begin_connect(c);
                break;
        case CONN_RESOLVING:
                conn_teardown(c, "name lookup timed out");
                break;
        case CONN_CONNECTING:
                conn_teardown(c, "connect timed out");
                break;
        case CONN_CONNECTED:
                if (c->ping_sent && c->last_rx < c->ping_sent) {
                        if (now >= c->ping_sent + c->config->keepalive_timeout_ms) {
                                conn_teardown(c, "keepalive timed out");
                                break;
                        }
                        arm_timer(c, c->ping_sent + c->config->keepalive_timeout_ms);
                        break;
                }
                c->ping_sent = 0;
                if (now >= c->last_rx + c->config->keepalive_ms) {
                        if (coap_session_send_ping(c->session) == COAP_INVALID_MID) {
                                conn_teardown(c, "failed to send keepalive");
                                break;
                        }
                        c->ping_sent = now;
                        kick(c);
                        arm_timer(c, now + c->config->keepalive_timeout_ms);
                } else
                        arm_timer(c, c->last_rx + c->config->keepalive_ms);
                break;
        }
        return 0;
}

static void conn_schedule(Conn *c) {
        arm_timer(c, now_ms());
}

static int copy_settings(Conn *c, const Config *cfg) {
        char *ca = strdup(cfg->ca_file), *cert = strdup(cfg->cert_file), *key = strdup(cfg->key_file);

        if (cfg->n_cloud_hosts == 0 || cfg->n_cloud_hosts > CONFIG_HOSTS_MAX) {
                free(ca), free(cert), free(key);
                return -EINVAL;
        }
        if (!ca || !cert || !key) {
                free(ca), free(cert), free(key);
                return -ENOMEM;
        }
        free((char *)c->files.ca_file);
        free((char *)c->files.cert_file);
        free((char *)c->files.key_file);
        memcpy(c->hosts, cfg->cloud_hosts, sizeof(c->hosts));
        c->n_hosts = cfg->n_cloud_hosts;
        set_host(c, 0);
        c->files = (TlsFiles){ .ca_file = ca, .cert_file = cert, .key_file = key };
        return 0;
}

static void coap_log_to_ours(coap_log_t level, const char *message) {
        size_t n = strlen(message);

        while (n > 0 && message[n - 1] == '\n')
                n--;
        log_internal(level <= LOG_ERR ? LOG_WARNING : LOG_DEBUG, 0, "libcoap: %.*s", (int)n, message);
}

int conn_new(sd_event *event, Registry *reg, Outbox *outbox, const Config *cfg, const ConnHooks *hooks,
             Conn **ret) {
        _cleanup_(conn_freep) Conn *c = NULL;
        coap_resource_t *unknown;
        int r;

        c = calloc(1, sizeof(*c));
        if (!c)
                return -ENOMEM;
        c->event = sd_event_ref(event);
        c->registry = reg;
        c->outbox = outbox;
        c->config = cfg;
        c->hooks = *hooks;
        r = copy_settings(c, cfg);
        if (r < 0)
                return r;

        coap_startup();
        coap_set_log_handler(coap_log_to_ours);
        coap_set_log_level(getenv("TETHER_COAP_DEBUG") ? LOG_DEBUG : LOG_ERR);
        coap_dtls_set_log_level(getenv("TETHER_COAP_DEBUG") ? LOG_DEBUG : LOG_ERR);
        c->ctx = coap_new_context(NULL);
        if (!c->ctx)
                return -ENOMEM;
        r = tls_resume_new(&c->resume);
        if (r < 0)
                return r;
        (void)tls_resume_attach(c->resume, c->ctx);
        coap_register_response_handler(c->ctx, on_response);
        coap_register_event_handler(c->ctx, on_coap_event);
        coap_register_pong_handler(c->ctx, on_pong);
        /* The cloud's requests land on one catch-all resource. */
        unknown = coap_resource_unknown_init(NULL);
        if (!unknown)
                return -ENOMEM;
        coap_register_request_handler(unknown, COAP_REQUEST_GET, on_request);
        coap_register_request_handler(unknown, COAP_REQUEST_POST, on_request);
        coap_register_request_handler(unknown, COAP_REQUEST_PUT, on_request);
        coap_register_request_handler(unknown, COAP_REQUEST_DELETE, on_request);
        coap_add_resource(c->ctx, unknown);

        r = sd_event_add_io(event, &c->io_source, coap_context_get_coap_fd(c->ctx), EPOLLIN, on_coap_io, c);
        if (r < 0)
                return r;
        r = sd_event_add_defer(event, &c->kick_source, on_kick, c);
        if (r >= 0)
                r = sd_event_add_defer(event, &c->flush_source, on_flush, c);
        if (r >= 0)
                r = sd_event_add_defer(event, &c->teardown_source, on_teardown, c);
        if (r >= 0)
                r = sd_event_add_time(event, &c->timer_source, CLOCK_MONOTONIC, 0, 1000, on_timer, c);
        if (r >= 0)
                r = sd_event_add_time(event, &c->sync_source, CLOCK_MONOTONIC, 0, 1000, on_sync, c);
        if (r >= 0)
                r = sd_event_add_time(event, &c->hold_source, CLOCK_MONOTONIC, 0, 100000, on_hold, c);
        if (r < 0)
                return r;
        sd_event_source_set_enabled(c->sync_source, SD_EVENT_OFF);
        sd_event_source_set_enabled(c->hold_source, SD_EVENT_OFF);
        sd_event_source_set_enabled(c->kick_source, SD_EVENT_OFF);
        sd_event_source_set_enabled(c->flush_source, SD_EVENT_OFF);
        sd_event_source_set_enabled(c->teardown_source, SD_EVENT_OFF);
        sd_event_source_set_enabled(c->timer_source, SD_EVENT_OFF);
        /* Let libcoap's socket work come before deferred work. */
        sd_event_source_set_priority(c->teardown_source, SD_EVENT_PRIORITY_IDLE);

        r = resolver_new(event, CONN_RESOLVE_SIGNAL, on_resolved, c, &c->resolver);
        if (r < 0)
                return r;
        *ret = TAKE_PTR(c);
        return 0;
}

/* The first connect waits a random part of StartJitterSec, so that devices
 * powered on together (a site's power cut) do not all connect at once. */
int conn_start(Conn *c) {
        uint64_t delay = backoff_start_delay_ms(c->config->start_jitter_ms, (uint32_t)random());
        char status[512];

        c->state = CONN_IDLE;
        c->started = true;
        if (delay == 0) {
                conn_schedule(c);
                return 0;
        }
        snprintf(status, sizeof(status), "Connecting to %s in %.1f s (StartJitterSec=%.1f)", c->host_text,
                 delay / 1000.0, c->config->start_jitter_ms / 1000.0);
        log_info("%s", status);
        set_state(c, CONN_IDLE, status);
        arm_timer(c, now_ms() + delay);
        return 0;
}

int conn_reconfigure(Conn *c, const Config *cfg) {
        bool changed = config_cloud_changed(c->config, cfg);
        char hosts[CONFIG_HOSTS_MAX * (CONFIG_HOST_TEXT_MAX + 2)];
        int r;

        c->config = cfg;
        if (!changed)
                return 0;
        if (c->started)
                log_info("Cloud settings changed, reconnecting to %s",
                         config_hosts_text(cfg, hosts, sizeof(hosts)));
        resolver_cancel(c->resolver);
        drop_session(c);
        addrs_free(c);
        r = copy_settings(c, cfg);
        if (r < 0)
                return r;
        c->failures = 0;
        if (!c->started)
                return 0; /* not enrolled: the new settings wait for conn_retry_now() */
        set_state(c, CONN_IDLE, "Reconnecting (configuration changed)");
        conn_schedule(c);
        return 0;
}

void conn_retry_now(Conn *c) {
        if (c->state != CONN_IDLE && c->state != CONN_BACKOFF)
                return;
        c->started = true;
        c->failures = 0;
        free(c->teardown_reason);
        c->teardown_reason = NULL;
        conn_schedule(c);
}

const ConfigHost *conn_host(Conn *c, size_t *ret_index) {
        if (ret_index)
                *ret_index = c->host_index;
        return &c->hosts[c->host_index];
}

bool conn_is_connected(Conn *c) {
        return c && c->state == CONN_CONNECTED;
}

bool conn_bert_allowed(Conn *c) {
        coap_pdu_t *probe;
        coap_block_b_t b;
        uint8_t buf[4];
        bool r;

        if (!conn_is_connected(c) || !c->session)
                return false;
        /* libcoap 4.3.1 keeps what the CSMs said in the session and has no
         * getter for it; coap_get_block_b() reads a Block2 option with
         * SZX 7 as BERT exactly when both CSMs allowed it (0 otherwise). */
        probe = coap_pdu_init(COAP_MESSAGE_CON, COAP_RESPONSE_CODE_CONTENT, 0, 16);
        if (!probe)
                return false;
        r = coap_add_option(probe, COAP_OPTION_BLOCK2, coap_encode_var_safe(buf, sizeof(buf), 7), buf) &&
            coap_get_block_b(c->session, probe, COAP_OPTION_BLOCK2, &b) == 1 && b.bert;
        coap_delete_pdu(probe);
        return r;
}

Conn *conn_free(Conn *c) {
        if (!c)
                return NULL;
        resolver_free(c->resolver);
        drop_session(c);
        addrs_free(c);
        if (c->ctx)
                coap_free_context(c->ctx);
        tls_resume_free(c->resume); /* after the context, whose SSL_CTX points to it */
        sd_event_source_disable_unref(c->io_source);
        sd_event_source_disable_unref(c->kick_source);
        sd_event_source_disable_unref(c->flush_source);
        sd_event_source_disable_unref(c->teardown_source);
        sd_event_source_disable_unref(c->timer_source);
        sd_event_source_disable_unref(c->sync_source);
        sd_event_source_disable_unref(c->hold_source);
        if (c->outbox) {
                int r = outbox_sync(c->outbox);
                if (r < 0)
                        log_warning_errno(r, "Failed to sync the outbox: %m");
                report_outbox(c, true);
        }
        subs_free(c);
        free((char *)c->files.ca_file);
        free((char *)c->files.cert_file);
        free((char *)c->files.key_file);
        free(c->teardown_reason);
        sd_event_unref(c->event);
        free(c);
        return NULL;
}
