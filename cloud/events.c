/* SPDX-License-Identifier: Apache-2.0 */
/* Events (events.h): device publishes (POST /e/{name}), device
 * subscriptions (GET /e/{prefix} with Observe) and the router that feeds
 * SSE clients and subscribed devices, both through EventsHooks. Notifications are PDUs we build ourselves: libcoap's
 * observe machinery coalesces notifications and would lose events. */
#include "config.h"

#include <inttypes.h>

#include "events.h"
#include "log.h"
#include "stats.h"
#include "subscriptions.h"
#include "util.h"

/* One device subscription; its prefix and owner (the device) are in the
 * index (subscriptions.h), whose userdata it is: the index frees it, after
 * the routing on the stack if there is one. */
typedef struct Subscription {
        Device *device;
        Sub *sub;
        uint8_t token[8];
        size_t token_len;
        uint32_t seq; /* Observe sequence, 24 bits */
} Subscription;

/* At most one line about devices' insane clocks this often. */
#define EVENTS_CLOCK_LOG_USEC (60ULL * 1000000)
/* At most one line per device about its rate limits this often. */
#define EVENTS_QUOTA_LOG_USEC (60ULL * 1000000)
/* The longest retry time a 4.29 names. */
#define EVENTS_QUOTA_WAIT_MAX_SEC 3600

/* A device's publishing limits ([Events] DeviceEventRate= and the like):
 * two token buckets, events and bytes, kept for as long as the Events (a
 * reconnect does not refill them). When an event with a sequence number
 * is refused (4.29), later ones of the same epoch are refused too until
 * it comes again: the journal keeps the highest seq delivered
 * (journal_seen()), so letting a later one through first would make the
 * refused one a "duplicate" when it is resent. A device sends the oldest
 * event it has first on a new session, so one past the held event there
 * means that it gave the held one up (an agent's Overflow=drop-oldest):
 * the hold ends, else the device would be refused for good. */
typedef struct EventsQuota {
        const Device *device;
        double events, bytes; /* tokens */
        uint64_t at;          /* CLOCK_MONOTONIC of the last refill */
        uint64_t held_epoch, held_seq;
        bool held;
        bool held_reconnected; /* the device's session ended while held */
        uint64_t logged_at, refused; /* refusals since the last log line */
        struct EventsQuota *next;
} EventsQuota;

struct Events {
        const CloudConfig *config;
        Journal *journal;
        EventsHooks hooks;
        SubIndex *subs; /* device subscriptions by prefix */
        uint64_t clock_logged_at; /* CLOCK_MONOTONIC */
        uint64_t clock_unlogged;  /* insane times since that line */
        EventsQuota **quotas;     /* by device pointer; nquotas buckets, a power of two */
        size_t nquotas, n_quotas;
};

int events_new(const CloudConfig *config, Journal *journal, const EventsHooks *hooks, Events **ret) {
        Events *ev = calloc(1, sizeof(*ev));

        if (!ev)
                return -ENOMEM;
        ev->config = config;
        ev->journal = journal;
        ev->hooks = *hooks;
        ev->subs = sub_index_new(free);
        if (!ev->subs) {
                free(ev);
                return -ENOMEM;
        }
        *ret = ev;
        return 0;
}

static const char *device_id(Events *ev, const Device *d) {
        return ev->hooks.device_id(ev->hooks.userdata, d);
}

static EventsQuota *quota_find(Events *ev, const Device *d);

void events_device_gone(Events *ev, const Device *d) {
        EventsQuota *q = quota_find(ev, d);

        /* Safe while routing: the index frees them after. */
        (void)sub_index_remove_owner(ev->subs, d);
        if (q && q->held)
                q->held_reconnected = true;
}

Events *events_free(Events *ev) {
        if (!ev)
                return NULL;
        for (size_t k = 0; k < ev->nquotas; k++)
                for (EventsQuota *q = ev->quotas[k], *next; q; q = next) {
                        next = q->next;
                        free(q);
                }
        free(ev->quotas);
        sub_index_free(ev->subs);
        free(ev);
        return NULL;
}

static void events_reply(coap_pdu_t *response, coap_pdu_code_t code, const char *text) {
        uint8_t buf[4];

        coap_pdu_set_code(response, code);
        if (!text)
                return;
        coap_add_option(response, COAP_OPTION_CONTENT_FORMAT,
                        coap_encode_var_safe(buf, sizeof(buf), PROTO_CF_TEXT), buf);
        coap_add_data(response, strlen(text), (const uint8_t *)text);
}

/* ---- per-device limits ------------------------------------------------- */

static size_t quota_hash(const Device *d, size_t n) {
        return (size_t)(((uintptr_t)d >> 4) * UINT64_C(0x9E3779B97F4A7C15) >> 17) & (n - 1);
}

static EventsQuota *quota_find(Events *ev, const Device *d) {
        if (ev->nquotas > 0)
                for (EventsQuota *q = ev->quotas[quota_hash(d, ev->nquotas)]; q; q = q->next)
                        if (q->device == d)
                                return q;
        return NULL;
}

static EventsQuota *quota_get(Events *ev, const Device *d) {
        EventsQuota *q = quota_find(ev, d);
        size_t i;

        if (q)
                return q;
        if (ev->n_quotas >= ev->nquotas) {
                size_t n = ev->nquotas ? ev->nquotas * 2 : 64;
                EventsQuota **b = calloc(n, sizeof(*b));

                if (!b)
                        return NULL;
                for (size_t k = 0; k < ev->nquotas; k++)
                        for (EventsQuota *p = ev->quotas[k], *next; p; p = next) {
                                next = p->next;
                                i = quota_hash(p->device, n);
                                p->next = b[i];
                                b[i] = p;
                        }
                free(ev->quotas);
                ev->quotas = b;
                ev->nquotas = n;
        }
        q = calloc(1, sizeof(*q));
        if (!q)
                return NULL;
        /* A device starts with full buckets. */
        *q = (EventsQuota){ .device = d, .events = ev->config->device_event_burst,
                            .bytes = ev->config->device_byte_burst, .at = now_usec() };
        i = quota_hash(d, ev->nquotas);
        q->next = ev->quotas[i];
        ev->quotas[i] = q;
        ev->n_quotas++;
        return q;
}

/* Seconds until a bucket holding have tokens (rate per second) holds
 * need; 0 if it does now. */
static double quota_wait(double have, double need, unsigned rate) {
        return rate == 0 || have >= need ? 0 : (need - have) / rate;
}

/* Refill q's buckets for the time since the last refill. */
static void quota_refill(const CloudConfig *cfg, EventsQuota *q, uint64_t now) {
        if (now > q->at) {
                double dt = (double)(now - q->at) / 1e6;

                q->events += dt * cfg->device_event_rate;
                if (cfg->device_event_rate == 0 || q->events > cfg->device_event_burst)
                        q->events = cfg->device_event_burst;
                q->bytes += dt * cfg->device_byte_rate;
                if (cfg->device_byte_rate == 0 || q->bytes > cfg->device_byte_burst)
                        q->bytes = cfg->device_byte_burst;
                q->at = now;
        }
}

/* Seconds until q has one event and cost bytes; 0 if it has them now. */
static double quota_need(const CloudConfig *cfg, const EventsQuota *q, size_t cost) {
        double wait = quota_wait(q->events, 1, cfg->device_event_rate);

        if (quota_wait(q->bytes, (double)cost, cfg->device_byte_rate) > wait)
                wait = quota_wait(q->bytes, (double)cost, cfg->device_byte_rate);
        return wait;
}

static void quota_charge(const CloudConfig *cfg, EventsQuota *q, size_t cost) {
        if (cfg->device_event_rate > 0)
                q->events -= 1;
        if (cfg->device_byte_rate > 0)
                q->bytes -= (double)cost;
}

/* A refusal after waiting wait seconds: count it, log one line per device
 * and EVENTS_QUOTA_LOG_USEC, return the seconds for Max-Age (at least 1). */
static unsigned quota_refuse(Events *ev, const Device *d, EventsQuota *q, uint64_t now, double wait) {
        const CloudConfig *cfg = ev->config;
        unsigned sec = wait >= EVENTS_QUOTA_WAIT_MAX_SEC ? EVENTS_QUOTA_WAIT_MAX_SEC : (unsigned)wait + 1;

        q->refused++;
        if (q->logged_at == 0 || now - q->logged_at >= EVENTS_QUOTA_LOG_USEC) {
                log_notice("Device '%s' is past its publishing limits (%u events/s, %u bytes/s): refused %" PRIu64
                           " event(s) or OTA report(s) with 4.29 since the last message, retry in %u s.",
                           device_id(ev, d), cfg->device_event_rate, cfg->device_byte_rate, q->refused, sec);
                q->logged_at = now;
                q->refused = 0;
        }
        return sec;
}

/* May device d publish an event of cost bytes (sequence number seq of
 * epoch, if has_seq) now? 0 and the tokens are taken, or the seconds it
 * should wait (at least 1) and nothing is taken. Out of memory lets the
 * event through: a limit is no reason to lose it. */
static unsigned events_quota_take(Events *ev, const Device *d, bool has_seq, uint64_t epoch, uint64_t seq,
                                  size_t cost) {
        const CloudConfig *cfg = ev->config;
        double wait;
        uint64_t now;
        EventsQuota *q;

        if (cfg->device_event_rate == 0 && cfg->device_byte_rate == 0)
                return 0;
        q = quota_get(ev, d);
        if (!q)
                return 0;
        now = now_usec();
        quota_refill(cfg, q, now);
        if (q->held && (!has_seq || epoch != q->held_epoch))
                q->held = false; /* another outbox: nothing of the old one can overtake */
        if (q->held && q->held_reconnected) {
                /* The first event of a new session is the oldest the device has. */
                q->held_reconnected = false;
                if (seq > q->held_seq) {
                        log_info("Device '%s' went on with event %" PRIu64 " (epoch %016" PRIx64 ") on a new "
                                 "session: it no longer has event %" PRIu64 ", which was refused with 4.29; "
                                 "later events are no longer held back for it.",
                                 device_id(ev, d), seq, epoch, q->held_seq);
                        q->held = false;
                }
        }
        wait = quota_need(cfg, q, cost);
        if (wait <= 0 && !(q->held && seq > q->held_seq)) {
                quota_charge(cfg, q, cost);
                q->held = false;
                return 0;
        }
        if (has_seq && (!q->held || seq < q->held_seq)) {
                q->held = true;
                q->held_epoch = epoch;
                q->held_seq = seq;
        }
        return quota_refuse(ev, d, q, now, wait);
}

unsigned events_device_charge(Events *ev, const Device *d, size_t cost) {
        const CloudConfig *cfg = ev->config;
        EventsQuota *q;
        uint64_t now;
        double wait;

        if (cfg->device_event_rate == 0 && cfg->device_byte_rate == 0)
                return 0;
        q = quota_get(ev, d);
        if (!q)
                return 0;
        /* More than a burst could never pass. */
        if (cfg->device_byte_rate > 0 && cost > cfg->device_byte_burst)
                cost = cfg->device_byte_burst;
        now = now_usec();
        quota_refill(cfg, q, now);
        /* Not an event of the outbox: the hold (EventsQuota) is not its
         * business, it neither waits for it nor ends it. */
        wait = quota_need(cfg, q, cost);
        if (wait <= 0) {
                quota_charge(cfg, q, cost);
                return 0;
        }
        return quota_refuse(ev, d, q, now, wait);
}

static int events_query(const coap_pdu_t *request, ProtoPublishQuery *ret) {
        ProtoPublishQuery q = {};
        coap_opt_iterator_t it;
        coap_opt_filter_t filter;
        coap_opt_t *opt;

        coap_option_filter_clear(&filter);
        coap_option_filter_set(&filter, COAP_OPTION_URI_QUERY);
        coap_option_iterator_init(request, &it, &filter);
        while ((opt = coap_option_next(&it)))
                if (proto_publish_query_add(&q, coap_opt_value(opt), coap_opt_length(opt)) < 0)
                        return -EINVAL;
        if (proto_publish_query_check(&q) < 0)
                return -EINVAL;
        *ret = q;
        return 0;
}

/* When the event happened: the device's publish time if it sent one and
 * it is sane, else the time it arrived (now_ms, also received_at).
 * docs/protocol.md, "Event time". */
static void events_time(Events *ev, const Device *d, const ProtoPublishQuery *q, uint64_t now_ms,
                        char published_at[static 32], char received_at[static 32]) {
        const char *problem;
        uint64_t now;

        if (proto_timestamp_format(now_ms, received_at) < 0)
                snprintf(received_at, 32, "9999-12-31T23:59:59.999Z"); /* a cloud clock past 9999 */
        memcpy(published_at, received_at, 32);
        if (!q->has_time)
                return;
        problem = proto_publish_time_problem(q->time_ms, now_ms);
        if (!problem && proto_timestamp_format(q->time_ms, published_at) == 0)
                return;
        /* A device with a bad clock stamps every event with it: say so
         * now and then, not for each event. */
        ev->clock_unlogged++;
        now = now_usec();
        if (ev->clock_logged_at != 0 && now - ev->clock_logged_at < EVENTS_CLOCK_LOG_USEC)
                return;
        log_notice("Device '%s' published an event with time=%" PRIu64 " (ms), %s: using the time it arrived "
                   "instead (%" PRIu64 " such event(s) since the last message).",
                   device_id(ev, d), q->time_ms, problem ?: "out of range", ev->clock_unlogged);
        ev->clock_logged_at = now;
        ev->clock_unlogged = 0;
}

static void events_publish(Events *ev, Device *d, const coap_pdu_t *request, const char *name,
                           coap_pdu_t *response) {
        _cleanup_free_ char *data = NULL;
        char published_at[32], received_at[32];
        const uint8_t *payload = NULL;
        ProtoPublishQuery q;
        coap_opt_iterator_t it;
        coap_opt_t *opt;
        bool duplicate = false;
        size_t len = 0;
        unsigned wait;
        ProtoEvent e;
        int r;

        r = proto_name_check(name, strlen(name), PROTO_NAME_EVENT);
        if (r < 0) {
                events_reply(response, COAP_RESPONSE_CODE(400),
                             r == -ENAMETOOLONG ? "event name too long" : "invalid event name");
                return;
        }
        if (proto_event_name_reserved(name, true)) {
                /* tether/ota/JOB and the like would pass for the cloud's
                 * own: refused for good, nothing stored or routed. */
                log_debug("Device '%s' published '%s', a name reserved for the cloud: refused.", device_id(ev, d),
                          name);
                stats_event_dropped(STATS_DROPPED_RESERVED_NAME);
                events_reply(response, COAP_RESPONSE_CODE(403),
                             "event names under " PROTO_EVENT_CLOUD_PREFIX " are reserved for the cloud");
                return;
        }
        if (events_query(request, &q) < 0) {
                events_reply(response, COAP_RESPONSE_CODE(400), "invalid seq=, epoch= or time=");
                return;
        }
        if (q.has_seq && journal_seen(ev->journal, device_id(ev, d), q.epoch, q.seq)) {
                /* A resend of what we already delivered (its receipt was
                 * lost with a connection): the receipt again, no routing. */
                log_info("Device '%s' resent event %" PRIu64 " (epoch %016" PRIx64 "), already delivered.",
                         device_id(ev, d), q.seq, q.epoch);
                stats_event_dropped(STATS_DROPPED_DUPLICATE);
                events_reply(response, COAP_RESPONSE_CODE(201), "duplicate");
                return;
        }
        (void)coap_get_data(request, &len, &payload);
        if (len > ev->config->max_payload) {
                events_reply(response, COAP_RESPONSE_CODE(413), "event data too large");
                return;
        }
        if (proto_utf8_check((const char *)payload, len) < 0) {
                events_reply(response, COAP_RESPONSE_CODE(400), "event data is not UTF-8 text");
                return;
        }
        wait = events_quota_take(ev, d, q.has_seq, q.epoch, q.seq, len + strlen(name));
        if (wait > 0) {
                /* RFC 8516: retry after Max-Age seconds. The agent keeps the
                 * event and sends it again then (agent/conn.c). */
                uint8_t buf[4];

                stats_event_dropped(STATS_DROPPED_RATE_LIMITED);
                coap_pdu_set_code(response, COAP_RESPONSE_CODE(429));
                coap_add_option(response, COAP_OPTION_CONTENT_FORMAT,
                                coap_encode_var_safe(buf, sizeof(buf), PROTO_CF_TEXT), buf);
                coap_add_option(response, COAP_OPTION_MAXAGE, coap_encode_var_safe(buf, sizeof(buf), wait), buf);
                coap_add_data(response, strlen("publishing too fast: retry later"),
                              (const uint8_t *)"publishing too fast: retry later");
                return;
        }
        data = malloc(len + 1);
        if (!data) {
                events_reply(response, COAP_RESPONSE_CODE(500), "out of memory");
                return;
        }
        if (len > 0)
                memcpy(data, payload, len);
        data[len] = 0;

        events_time(ev, d, &q, proto_time_now_ms(), published_at, received_at);
        e = (ProtoEvent){
                .name = (char *)name,
                .data = data,
                .ttl = PROTO_DEFAULT_TTL,
                .private_ = q.private_,
                .published_at = published_at,
                .coreid = (char *)device_id(ev, d),
                .received_at = received_at,
        };
        opt = coap_check_option(request, COAP_OPTION_MAXAGE, &it);
        if (opt)
                e.ttl = coap_decode_var_bytes(coap_opt_value(opt), coap_opt_length(opt));

        /* With a store of its own (cluster mode) the journal may lag
         * behind what was stored: no such guess there. */
        if (q.has_seq && !ev->hooks.store) {
                uint64_t last = journal_last_seq(ev->journal, device_id(ev, d), q.epoch);

                /* Numbers the device never sent: its outbox dropped them
                 * (Overflow=drop-oldest) or we refused them. */
                if (last > 0 && q.seq > last + 1)
                        log_info("Device '%s' skipped event(s) %" PRIu64 "..%" PRIu64 " (epoch %016" PRIx64
                                 "): dropped by the device or refused.",
                                 device_id(ev, d), last + 1, q.seq - 1, q.epoch);
        }
        r = events_store(ev, &e, d, q.epoch, q.has_seq ? q.seq : 0, &duplicate);
        if (r < 0) {
                /* Not stored, not routed: the device keeps it and sends it
                 * again. Nothing later on this session may overtake it. */
                log_warning_errno(r, "Failed to store an event from device '%s', closing its session: %m",
                                  device_id(ev, d));
                stats_event_dropped(STATS_DROPPED_STORE_FAILED);
                events_reply(response, COAP_RESPONSE_CODE(503), "cannot store the event now");
                ev->hooks.disconnect(ev->hooks.userdata, d, "event journal write failed");
                return;
        }
        if (duplicate) {
                /* The cluster's journal had it (stored through another
                 * node, which the local copy did not show yet). */
                log_info("Device '%s' resent event %" PRIu64 " (epoch %016" PRIx64 "), already delivered.",
                         device_id(ev, d), q.seq, q.epoch);
                stats_event_dropped(STATS_DROPPED_DUPLICATE);
                events_reply(response, COAP_RESPONSE_CODE(201), "duplicate");
                return;
        }
        stats_event_in(STATS_FROM_DEVICE);
        coap_pdu_set_code(response, COAP_RESPONSE_CODE(201));
}

int events_store(Events *ev, const ProtoEvent *e, const Device *source, uint64_t epoch, uint64_t seq,
                 bool *ret_duplicate) {
        bool duplicate = false;
        uint64_t id;
        int r;

        if (ev->hooks.store) {
                r = ev->hooks.store(ev->hooks.userdata, e, epoch, seq, &duplicate);
                if (r < 0)
                        return r;
        } else {
                r = journal_append(ev->journal, e, epoch, seq, &id);
                if (r < 0)
                        return r;
                events_route(ev, e, source, id);
        }
        if (ret_duplicate)
                *ret_duplicate = duplicate;
        return 0;
}

/* The device's subscription with this token: among its own (at most
 * MaxSubscriptions), not among everyone's. */
static Subscription *events_find(Events *ev, const Device *d, coap_bin_const_t token) {
        for (Sub *i = sub_index_owner_first(ev->subs, d); i; i = sub_owner_next(i)) {
                Subscription *s = sub_userdata(i);

                if (s->token_len == token.length && memcmp(s->token, token.s, token.length) == 0)
                        return s;
        }
        return NULL;
}

static void events_subscribe(Events *ev, Device *d, const coap_pdu_t *request, const char *prefix,
                             coap_pdu_t *response) {
        coap_bin_const_t token = coap_pdu_get_token(request);
        coap_opt_iterator_t it;
        coap_opt_t *opt;
        Subscription *s, *old;
        unsigned action;
        uint8_t buf[4];

        opt = coap_check_option(request, COAP_OPTION_OBSERVE, &it);
        if (!opt) {
                events_reply(response, COAP_RESPONSE_CODE(400), "subscribe with Observe 0, cancel with Observe 1");
                return;
        }
        action = coap_decode_var_bytes(coap_opt_value(opt), coap_opt_length(opt));
        if (action == COAP_OBSERVE_CANCEL) {
                s = events_find(ev, d, token);
                if (s) {
                        log_debug("Device '%s' unsubscribed from '%s'.", device_id(ev, d), sub_prefix(s->sub));
                        sub_index_remove(ev->subs, s->sub);
                }
                coap_pdu_set_code(response, COAP_RESPONSE_CODE(205));
                return;
        }
        if (action != COAP_OBSERVE_ESTABLISH) {
                events_reply(response, COAP_RESPONSE_CODE(400), "bad Observe value");
                return;
        }
        if (proto_name_check(prefix, strlen(prefix), PROTO_NAME_PREFIX) < 0) {
                events_reply(response, COAP_RESPONSE_CODE(400), "invalid event prefix");
                return;
        }
        if (token.length > sizeof(s->token)) {
                events_reply(response, COAP_RESPONSE_CODE(400), "bad token");
                return;
        }
        /* Same token again: the subscription now has this prefix (a new
         * one in its place, with its Observe sequence). */
        old = events_find(ev, d, token);
        if (!old && sub_index_count(ev->subs, d) >= ev->config->max_subscriptions) {
                events_reply(response, COAP_RESPONSE_CODE(403), "subscription limit reached");
                return;
        }
        s = calloc(1, sizeof(*s));
        if (!s) {
                events_reply(response, COAP_RESPONSE_CODE(500), "out of memory");
                return;
        }
        s->device = d;
        s->token_len = token.length;
        memcpy(s->token, token.s, token.length);
        s->seq = old ? old->seq : 0;
        if (sub_index_add(ev->subs, d, NULL, prefix, s, &s->sub) < 0) {
                free(s);
                events_reply(response, COAP_RESPONSE_CODE(500), "out of memory");
                return;
        }
        if (old)
                sub_index_remove(ev->subs, old->sub);
        s->seq = (s->seq + 1) & 0xffffff;
        log_debug("Device '%s' subscribed to '%s'.", device_id(ev, d), prefix);
        coap_pdu_set_code(response, COAP_RESPONSE_CODE(205));
        coap_add_option(response, COAP_OPTION_OBSERVE, coap_encode_var_safe(buf, sizeof(buf), s->seq), buf);
}

void events_handle_request(Events *ev, Device *d, const coap_pdu_t *request, const char *path,
                           coap_pdu_t *response) {
        if (coap_pdu_get_code(request) == COAP_REQUEST_CODE_POST)
                events_publish(ev, d, request, path, response);
        else
                events_subscribe(ev, d, request, path, response);
}

typedef struct EventsRouting {
        Events *ev;
        const ProtoEvent *e;
        const Device *source;
        char *json; /* encoded once, for the first match */
        size_t len;
        bool sent;
} EventsRouting;

static bool events_route_one(Sub *sub, void *userdata, void *ctx) {
        EventsRouting *ro = ctx;
        Events *ev = ro->ev;
        Subscription *s = userdata;
        uint32_t seq = (s->seq + 1) & 0xffffff;
        Device *d = s->device;
        int r;

        if (d == ro->source)
                return true;
        if (!ro->json) {
                r = proto_event_encode(ro->e, &ro->json, &ro->len);
                if (r < 0) {
                        log_error_errno(r, "Failed to encode event '%s': %m", ro->e->name);
                        return false;
                }
        }
        /* notify may close the device's session, which removes its
         * subscriptions: s stays valid until the match is over (the index
         * frees it then), d for as long as the registry (devices.h). */
        r = ev->hooks.notify(ev->hooks.userdata, d, s->token, s->token_len, seq, ro->json, ro->len);
        if (r == -ENOTCONN)
                return true; /* no established session (yet): nothing sent */
        s->seq = seq;
        if (r < 0 && ev->hooks.undeliverable)
                ev->hooks.undeliverable(ev->hooks.userdata, d, ro->e->name, ro->len, r);
        else if (r >= 0)
                stats_event_out(STATS_TO_DEVICE);
        ro->sent = true;
        return true;
}

void events_route(Events *ev, const ProtoEvent *e, const Device *source, uint64_t id) {
        EventsRouting ro = { .ev = ev, .e = e, .source = source };

        if (ev->hooks.deliver_to_streams)
                ev->hooks.deliver_to_streams(ev->hooks.userdata, e, id);

        /* A device's private event is for the owner's API streams only:
         * no other device gets it (docs/protocol.md, "Events"); nor do the
         * cloud's own private events about a device (tether/device/...,
         * published with that device's coreid and no source). Private
         * events from the API (the owner's, coreid "api") go to every
         * device. */
        if (e->private_ && (source || !e->coreid || !streq(e->coreid, "api")))
                return;
        /* The matching subscriptions only (subscriptions.h). */
        (void)sub_index_match(ev->subs, NULL, e->name, events_route_one, &ro);
        free(ro.json);
        if (ro.sent && ev->hooks.flush)
                ev->hooks.flush(ev->hooks.userdata);
}
