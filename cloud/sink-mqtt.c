/* SPDX-License-Identifier: Apache-2.0 */
/* The MQTT bridge sink of the outbound integrations (integrations.h,
 * docs/integrations.md "MQTT bridges"): one broker connection made with
 * libmosquitto, driven by the cloud's sd-event loop (the socket in an IO
 * source, mosquitto_loop_read/write on its events, mosquitto_loop_misc
 * every second for the keepalive; libmosquitto's own thread is never
 * started).
 *
 * Guarantees:
 * - Every event taken by send() gets exactly one integration_sent(),
 *   always from this sink's own defer source, never from within send()
 *   nor from inside a libmosquitto callback: 0 when the broker
 *   acknowledged it (QoS 1: its PUBACK; QoS 0: once libmosquitto wrote it
 *   to the socket), -ENOTCONN ("broker connection lost") for every event
 *   in flight when the connection ends, -EPROTO when an MQTT 5 broker
 *   answered with a failure reason code.
 * - At most SINK_MQTT_WINDOW events in flight (-EAGAIN beyond); while not
 *   connected send() takes nothing (-ENOTCONN) and the core backs off.
 * - Each connection is its own libmosquitto object with a clean session:
 *   after a disconnect nothing libmosquitto still queued is resent by it
 *   (the core resends, with the same idempotency key), and no late PUBACK
 *   of an old connection can be matched to a new event.
 * - Any error (TCP, TLS, CONNACK refusal, keepalive, no CONNACK within
 *   SINK_MQTT_CONNECT_TIMEOUT_USEC) ends the connection; the next attempt
 *   comes after 1 s, doubling to 60 s, back to 1 s after a CONNACK.
 * - Inbound (Subscribe=): subscribed at QoS 1 after every CONNACK; a
 *   message becomes integration_publish(). A broker cannot flood the
 *   devices and the journal: at most SINK_MQTT_INBOUND_RATE messages a
 *   second on average, SINK_MQTT_INBOUND_BURST at once, become events;
 *   the others are dropped and counted (inbound_limited). Messages that
 *   are not UTF-8 or that the core refuses (too big, bad name) are dropped
 *   and counted too; every such log line is rate-limited to one per
 *   SINK_MQTT_LOG_INTERVAL_USEC per bridge.
 *
 * Not done: libmosquitto 2.0.11's mosquitto_connect_async() resolves
 * Host= with a blocking getaddrinfo() (lib/net_mosq.c,
 * net__try_connect_tcp(), called from mosquitto__reconnect()), so a slow
 * DNS server stalls the loop for that long on each attempt; the docs
 * advise a numeric address or a local caching resolver. libmosquitto
 * reads a whole packet into memory before handing it over (up to MQTT's
 * 256 MB): the broker is trusted not to send huge messages. */
#include <errno.h>
#include <inttypes.h>
#include <mosquitto.h>
#include <netdb.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "integrations.h"
#include "log.h"
#include "util.h"

#define SINK_MQTT_WINDOW 64
#define SINK_MQTT_USEC_PER_SEC 1000000ULL
#define SINK_MQTT_BACKOFF_MIN_USEC (1 * SINK_MQTT_USEC_PER_SEC)
#define SINK_MQTT_BACKOFF_MAX_USEC (60 * SINK_MQTT_USEC_PER_SEC)
#define SINK_MQTT_KEEPALIVE_SEC 60
#define SINK_MQTT_CONNECT_TIMEOUT_USEC (30 * SINK_MQTT_USEC_PER_SEC)
#define SINK_MQTT_LOG_INTERVAL_USEC (10 * SINK_MQTT_USEC_PER_SEC)
#define SINK_MQTT_WHY_MAX 96
#define SINK_MQTT_TOPIC_MAX 65535 /* MQTT's limit on a topic's length in bytes */
#define SINK_MQTT_INBOUND_RATE 100  /* inbound messages a second that become events, on average */
#define SINK_MQTT_INBOUND_BURST 200 /* ... and at once */
#define SINK_MQTT_INBOUND_COST_USEC (SINK_MQTT_USEC_PER_SEC / SINK_MQTT_INBOUND_RATE)

typedef enum SlotState {
        SLOT_FREE,
        SLOT_IN_FLIGHT, /* handed to libmosquitto, waiting for on_publish */
        SLOT_DONE,      /* answer known, integration_sent() pending in the defer source */
} SlotState;

typedef struct Slot {
        SlotState state;
        uint64_t id;
        int mid;
        int error;
        char why[SINK_MQTT_WHY_MAX];
} Slot;

typedef enum ConnState {
        CONN_DOWN,       /* no libmosquitto object; the retry timer runs */
        CONN_CONNECTING, /* TCP/TLS/CONNECT sent, no CONNACK yet */
        CONN_UP,
} ConnState;

typedef struct SinkMqtt {
        sd_event *event;
        const IntegrationConfig *config; /* borrowed */
        Integration *owner;              /* borrowed */
        char *client_id;
        unsigned port;
        size_t fixed_levels;  /* Subscribe='s leading levels without a wildcard */
        bool filter_wildcard; /* Subscribe= has a + or # */

        struct mosquitto *mosq; /* the current connection's, NULL when CONN_DOWN */
        ConnState state;
        bool broken; /* the connection ended; dropped by the next post() */
        char broken_why[SINK_MQTT_WHY_MAX];
        char tls_error[SINK_MQTT_WHY_MAX]; /* libmosquitto's last error log line of this attempt */
        uint64_t connect_deadline;
        uint64_t backoff_usec;

        sd_event_source *io;    /* mosquitto_socket() while connected or connecting */
        sd_event_source *misc;  /* 1 s: mosquitto_loop_misc(), the connect deadline */
        sd_event_source *retry; /* the next connection attempt, while CONN_DOWN */
        sd_event_source *post;  /* defer: drops a broken connection, reports SLOT_DONE */

        Slot slots[SINK_MQTT_WINDOW];
        unsigned in_flight; /* slots not SLOT_FREE */

        uint64_t inbound, inbound_dropped, inbound_limited;
        /* The inbound rate's token bucket: the credit, in microseconds of
         * SINK_MQTT_INBOUND_COST_USEC per message, as of inbound_at. */
        uint64_t inbound_credit_usec, inbound_at;
        uint64_t last_log_usec;
        unsigned log_suppressed;
} SinkMqtt;

static void sink_mqtt_free(void *userdata);
static int connect_start(SinkMqtt *s);

static const char *sink_name(const SinkMqtt *s) { return s->config->name; }

/* At most one line per SINK_MQTT_LOG_INTERVAL_USEC for what a broker or a
 * bad message can repeat at will. */
_printf_(2, 3) static void log_limited(SinkMqtt *s, const char *fmt, ...) {
        uint64_t now = now_usec();
        char line[512];
        va_list ap;

        if (s->last_log_usec && now - s->last_log_usec < SINK_MQTT_LOG_INTERVAL_USEC) {
                s->log_suppressed++;
                return;
        }
        va_start(ap, fmt);
        vsnprintf(line, sizeof(line), fmt, ap);
        va_end(ap);
        if (s->log_suppressed)
                log_warning("Integration '%s': %s (%u similar lines suppressed)", sink_name(s), line,
                            s->log_suppressed);
        else
                log_warning("Integration '%s': %s", sink_name(s), line);
        s->last_log_usec = now;
        s->log_suppressed = 0;
}

static void post_arm(SinkMqtt *s) { (void)sd_event_source_set_enabled(s->post, SD_EVENT_ONESHOT); }

static void slot_done(SinkMqtt *s, Slot *slot, int error, const char *why) {
        slot->state = SLOT_DONE;
        slot->error = error;
        snprintf(slot->why, sizeof(slot->why), "%s", why ? why : "");
        post_arm(s);
}

/* The connection ended (called from libmosquitto callbacks too: only
 * marks it; post() drops it). The first reason wins. */
static void conn_break(SinkMqtt *s, const char *why) {
        if (!s->broken) {
                s->broken = true;
                snprintf(s->broken_why, sizeof(s->broken_why), "%s", why);
        }
        post_arm(s);
}

static const char *mosq_reason(SinkMqtt *s, int rc, char *buf, size_t size) {
        if (s->tls_error[0] && (rc == MOSQ_ERR_TLS || rc == MOSQ_ERR_CONN_LOST || rc == MOSQ_ERR_ERRNO))
                return s->tls_error;
        if (rc == MOSQ_ERR_ERRNO) {
                snprintf(buf, size, "%s", strerror(errno));
                return buf;
        }
        if (rc == MOSQ_ERR_EAI) {
                snprintf(buf, size, "cannot resolve '%s': %s", s->config->host, gai_strerror(errno));
                return buf;
        }
        return mosquitto_strerror(rc);
}

static void update_events(SinkMqtt *s) {
        if (!s->io || !s->mosq)
                return;
        (void)sd_event_source_set_io_events(s->io, EPOLLIN | (mosquitto_want_write(s->mosq) ? EPOLLOUT : 0));
}

/* Drop the current connection: every event in flight fails with
 * -ENOTCONN, the next attempt is scheduled. Never called from inside a
 * libmosquitto callback (it destroys the object). */
static void conn_drop(SinkMqtt *s, const char *why) {
        for (size_t i = 0; i < ELEMENTSOF(s->slots); i++)
                if (s->slots[i].state == SLOT_IN_FLIGHT)
                        slot_done(s, &s->slots[i], -ENOTCONN, "broker connection lost");
        s->io = sd_event_source_disable_unref(s->io);
        if (s->mosq) {
                mosquitto_destroy(s->mosq);
                s->mosq = NULL;
        }
        if (s->state == CONN_UP)
                log_warning("Integration '%s': connection to the broker %s:%u lost: %s.", sink_name(s),
                            s->config->host, s->port, why);
        else
                log_limited(s, "cannot connect to the broker %s:%u: %s; next attempt in %llu s", s->config->host,
                            s->port, why, (unsigned long long)(s->backoff_usec / SINK_MQTT_USEC_PER_SEC));
        s->state = CONN_DOWN;
        s->broken = false;
        (void)sd_event_source_set_time_relative(s->retry, s->backoff_usec);
        (void)sd_event_source_set_enabled(s->retry, SD_EVENT_ONESHOT);
        s->backoff_usec = s->backoff_usec * 2 > SINK_MQTT_BACKOFF_MAX_USEC ? SINK_MQTT_BACKOFF_MAX_USEC
                                                                            : s->backoff_usec * 2;
}

static int on_post(sd_event_source *source, void *userdata) {
        SinkMqtt *s = userdata;

        if (s->broken)
                conn_drop(s, s->broken_why);
        /* integration_sent() may call send() again, which may take the slot
         * just freed: free it before. */
        for (size_t i = 0; i < ELEMENTSOF(s->slots); i++) {
                Slot *slot = &s->slots[i];
                uint64_t id;
                int error;
                char why[SINK_MQTT_WHY_MAX];

                if (slot->state != SLOT_DONE)
                        continue;
                id = slot->id;
                error = slot->error;
                memcpy(why, slot->why, sizeof(why));
                slot->state = SLOT_FREE;
                s->in_flight--;
                integration_sent(s->owner, id, error, error < 0 ? why : NULL);
        }
        return 0;
}

/* libmosquitto callbacks: they run inside mosquitto_loop_*() and
 * mosquitto_publish() (QoS 0: written at once), on the loop's thread. */

static void on_log(struct mosquitto *mosq, void *userdata, int level, const char *str) {
        SinkMqtt *s = userdata;

        if (level & (MOSQ_LOG_ERR | MOSQ_LOG_WARNING))
                snprintf(s->tls_error, sizeof(s->tls_error), "%s", str);
        log_debug("Integration '%s': libmosquitto: %s", sink_name(s), str);
}

static void on_connect(struct mosquitto *mosq, void *userdata, int rc, int flags, const mosquitto_property *props) {
        SinkMqtt *s = userdata;
        char why[SINK_MQTT_WHY_MAX];
        int r;

        if (rc != 0) {
                snprintf(why, sizeof(why), "the broker refused the connection: %s",
                         s->config->protocol == 5 ? mosquitto_reason_string(rc) : mosquitto_connack_string(rc));
                conn_break(s, why);
                return;
        }
        s->state = CONN_UP;
        s->backoff_usec = SINK_MQTT_BACKOFF_MIN_USEC;
        s->last_log_usec = 0;
        log_info("Integration '%s': connected to the broker %s:%u as '%s'.", sink_name(s), s->config->host, s->port,
                 s->client_id);
        /* Deliveries that failed while the broker was away go again now,
         * not after the integration's backoff. */
        integration_ready(s->owner);
        if (s->config->subscribe) {
                r = mosquitto_subscribe(mosq, NULL, s->config->subscribe, 1);
                if (r != MOSQ_ERR_SUCCESS)
                        conn_break(s, mosquitto_strerror(r));
        }
}

static void on_disconnect(struct mosquitto *mosq, void *userdata, int rc, const mosquitto_property *props) {
        SinkMqtt *s = userdata;
        char why[SINK_MQTT_WHY_MAX];

        if (s->config->protocol == 5 && rc > 0 && rc < 256 && rc >= 128)
                snprintf(why, sizeof(why), "the broker disconnected: %s", mosquitto_reason_string(rc));
        else
                snprintf(why, sizeof(why), "%s", rc == 0 ? "disconnected" : "connection lost");
        conn_break(s, why);
}

static void on_publish(struct mosquitto *mosq, void *userdata, int mid, int reason, const mosquitto_property *props) {
        SinkMqtt *s = userdata;
        char why[SINK_MQTT_WHY_MAX];

        for (size_t i = 0; i < ELEMENTSOF(s->slots); i++) {
                Slot *slot = &s->slots[i];

                if (slot->state != SLOT_IN_FLIGHT || slot->mid != mid)
                        continue;
                if (reason >= 128) {
                        /* MQTT 5: the broker took the PUBLISH but refused it
                         * (not authorized, quota exceeded, ...). */
                        snprintf(why, sizeof(why), "PUBACK: %s", mosquitto_reason_string(reason));
                        slot_done(s, slot, -EPROTO, why);
                } else
                        slot_done(s, slot, 0, NULL);
                return;
        }
}

static void on_subscribe(struct mosquitto *mosq, void *userdata, int mid, int n, const int *granted,
                         const mosquitto_property *props) {
        SinkMqtt *s = userdata;

        if (n >= 1 && granted[0] >= 128)
                log_limited(s, "the broker refused the subscription to '%s' (reason %d)", s->config->subscribe,
                            granted[0]);
        else
                log_info("Integration '%s': subscribed to '%s'.", sink_name(s), s->config->subscribe);
}

/* The event name a message on topic gets (without InboundPrefix=): the
 * topic after Subscribe='s leading levels without a wildcard ("a/b/#",
 * "a/b/led/on": "led/on"); a filter without wildcard, or a topic that is
 * only the fixed part ("a/b" matches "a/b/#"): its last level. Points
 * into topic. */
static const char *inbound_name(const SinkMqtt *s, const char *topic) {
        const char *p = topic, *last = strrchr(topic, '/');

        if (s->filter_wildcard)
                for (size_t i = 0; i < s->fixed_levels; i++) {
                        p = strchr(p, '/');
                        if (!p)
                                break;
                        p++;
                }
        if (!s->filter_wildcard || !p)
                return last ? last + 1 : topic;
        return p;
}

/* Whether one more inbound message may become an event now (takes its
 * share of the bucket if so). */
static bool inbound_allowed(SinkMqtt *s) {
        const uint64_t max = (uint64_t)SINK_MQTT_INBOUND_BURST * SINK_MQTT_INBOUND_COST_USEC;
        uint64_t now = now_usec();

        if (now > s->inbound_at) {
                uint64_t gained = now - s->inbound_at;

                s->inbound_credit_usec = gained >= max - s->inbound_credit_usec ? max : s->inbound_credit_usec + gained;
                s->inbound_at = now;
        }
        if (s->inbound_credit_usec < SINK_MQTT_INBOUND_COST_USEC)
                return false;
        s->inbound_credit_usec -= SINK_MQTT_INBOUND_COST_USEC;
        return true;
}

static void on_message(struct mosquitto *mosq, void *userdata, const struct mosquitto_message *m,
                       const mosquitto_property *props) {
        SinkMqtt *s = userdata;
        const char *name;
        int r;

        s->inbound++;
        if (!inbound_allowed(s)) {
                s->inbound_dropped++;
                s->inbound_limited++;
                log_limited(s, "the broker sends more than %u messages a second (%u at once): dropped the message "
                            "on '%s' (%" PRIu64 " dropped so far for the rate)",
                            SINK_MQTT_INBOUND_RATE, SINK_MQTT_INBOUND_BURST, m->topic, s->inbound_limited);
                return;
        }
        if (m->payloadlen < 0 ||
            (m->payloadlen > 0 && mosquitto_validate_utf8(m->payload, m->payloadlen) != MOSQ_ERR_SUCCESS)) {
                s->inbound_dropped++;
                log_limited(s, "dropped the broker message on '%s': its payload is not UTF-8", m->topic);
                return;
        }
        name = inbound_name(s, m->topic);
        r = integration_publish(s->owner, name, m->payload ? m->payload : "", (size_t)m->payloadlen);
        if (r < 0) {
                s->inbound_dropped++;
                errno = -r;
                log_limited(s, "dropped the broker message on '%s' (event name '%s', %d bytes): %m", m->topic, name,
                            m->payloadlen);
        }
}

/* Loop sources. */

static void after_loop_call(SinkMqtt *s, int rc) {
        char buf[SINK_MQTT_WHY_MAX];

        if (rc != MOSQ_ERR_SUCCESS && !s->broken)
                conn_break(s, mosq_reason(s, rc, buf, sizeof(buf)));
        if (s->broken)
                (void)sd_event_source_set_enabled(s->io, SD_EVENT_OFF); /* post() drops it */
        else
                update_events(s);
}

static int on_io(sd_event_source *source, int fd, uint32_t revents, void *userdata) {
        SinkMqtt *s = userdata;
        int rc, err = 0;
        socklen_t len = sizeof(err);

        if (revents & EPOLLERR) {
                /* A failed connect(): libmosquitto's TLS step treats the
                 * error as "try again" and would be called forever. */
                if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) == 0 && err != 0) {
                        conn_break(s, strerror(err));
                        after_loop_call(s, MOSQ_ERR_SUCCESS);
                        return 0;
                }
        }
        /* Always read first: while the TLS handshake runs, reading is what
         * advances it (whether the socket wants reading or writing). */
        rc = mosquitto_loop_read(s->mosq, 1);
        if (rc == MOSQ_ERR_SUCCESS && !s->broken && (revents & EPOLLOUT) && mosquitto_want_write(s->mosq))
                rc = mosquitto_loop_write(s->mosq, 1);
        if (rc == MOSQ_ERR_SUCCESS && !s->broken && (revents & EPOLLHUP))
                /* While connecting, a refused connect() often shows only
                 * as a hang-up: the TLS handshake's first write took the
                 * socket's error. */
                conn_break(s, s->state == CONN_UP ? "connection closed by the broker"
                              : s->tls_error[0]   ? s->tls_error
                                                  : "connection refused or closed before CONNACK");
        after_loop_call(s, rc);
        return 0;
}

static int on_misc(sd_event_source *source, uint64_t usec, void *userdata) {
        SinkMqtt *s = userdata;

        (void)sd_event_source_set_time_relative(source, SINK_MQTT_USEC_PER_SEC);
        if (!s->mosq || s->broken)
                return 0;
        if (s->state == CONN_CONNECTING && now_usec() > s->connect_deadline) {
                conn_break(s, s->tls_error[0] ? s->tls_error : "no CONNACK in time");
                after_loop_call(s, MOSQ_ERR_SUCCESS);
                return 0;
        }
        after_loop_call(s, mosquitto_loop_misc(s->mosq));
        return 0;
}

static int on_retry(sd_event_source *source, uint64_t usec, void *userdata) {
        SinkMqtt *s = userdata;

        (void)connect_start(s);
        return 0;
}

/* No passphrase prompt on the terminal for an encrypted KeyFile=: fail. */
static int no_passphrase(char *buf, int size, int rwflag, void *userdata) { return 0; }

static int connect_start(SinkMqtt *s) {
        const IntegrationConfig *c = s->config;
        char buf[SINK_MQTT_WHY_MAX];
        int rc, r, fd;

        s->tls_error[0] = '\0';
        s->broken = false;
        s->mosq = mosquitto_new(s->client_id, true, s);
        if (!s->mosq) {
                conn_break(s, "out of memory");
                return -ENOMEM;
        }
        mosquitto_log_callback_set(s->mosq, on_log);
        mosquitto_connect_v5_callback_set(s->mosq, on_connect);
        mosquitto_disconnect_v5_callback_set(s->mosq, on_disconnect);
        mosquitto_publish_v5_callback_set(s->mosq, on_publish);
        mosquitto_subscribe_v5_callback_set(s->mosq, on_subscribe);
        mosquitto_message_v5_callback_set(s->mosq, on_message);
        rc = mosquitto_int_option(s->mosq, MOSQ_OPT_PROTOCOL_VERSION,
                                  c->protocol == 5 ? MQTT_PROTOCOL_V5 : MQTT_PROTOCOL_V311);
        if (rc == MOSQ_ERR_SUCCESS)
                rc = mosquitto_max_inflight_messages_set(s->mosq, SINK_MQTT_WINDOW);
        if (rc == MOSQ_ERR_SUCCESS && c->ca_file) {
                rc = mosquitto_tls_set(s->mosq, c->ca_file, NULL, c->cert_file, c->key_file, no_passphrase);
                if (rc != MOSQ_ERR_SUCCESS) {
                        snprintf(buf, sizeof(buf), "TLS files: %s", mosquitto_strerror(rc));
                        conn_break(s, buf);
                        return -EINVAL;
                }
        }
        if (rc == MOSQ_ERR_SUCCESS && c->user)
                rc = mosquitto_username_pw_set(s->mosq, c->user, c->password);
        if (rc == MOSQ_ERR_SUCCESS) {
                /* Resolves Host= synchronously (see the top of this file). */
                rc = mosquitto_connect_async(s->mosq, c->host, (int)s->port, SINK_MQTT_KEEPALIVE_SEC);
                if (rc == MOSQ_ERR_CONN_PENDING)
                        rc = MOSQ_ERR_SUCCESS;
        }
        fd = rc == MOSQ_ERR_SUCCESS ? mosquitto_socket(s->mosq) : -1;
        if (rc != MOSQ_ERR_SUCCESS || fd < 0) {
                conn_break(s, rc == MOSQ_ERR_SUCCESS ? "no socket" : mosq_reason(s, rc, buf, sizeof(buf)));
                return -ENOTCONN;
        }
        r = sd_event_add_io(s->event, &s->io, fd, EPOLLIN | EPOLLOUT, on_io, s);
        if (r < 0) {
                conn_break(s, strerror(-r));
                return r;
        }
        s->state = CONN_CONNECTING;
        s->connect_deadline = now_usec() + SINK_MQTT_CONNECT_TIMEOUT_USEC;
        update_events(s);
        return 0;
}

/* The template with {device} {event} {name} filled in; '+', '#' in what
 * is filled in (a wildcard is no valid character of a topic one publishes
 * to) become '_'. -ENAMETOOLONG past MQTT's limit, -EINVAL when the result
 * is no valid topic (not UTF-8, say), -ENOMEM. */
static int topic_build(const SinkMqtt *s, const ProtoEvent *e, char **ret) {
        _cleanup_free_ char *buf = NULL;
        size_t size = 0;
        _cleanup_fclose_ FILE *f = open_memstream(&buf, &size);
        const char *t = s->config->topic ? s->config->topic : "tether/{device}/{event}";

        if (!f)
                return -ENOMEM;
        while (*t) {
                const char *v = NULL;

                if (startswith(t, "{device}"))
                        v = e->coreid ? e->coreid : "", t += strlen("{device}");
                else if (startswith(t, "{event}"))
                        v = e->name ? e->name : "", t += strlen("{event}");
                else if (startswith(t, "{name}"))
                        v = s->config->name, t += strlen("{name}");
                if (v) {
                        for (; *v; v++)
                                fputc(*v == '+' || *v == '#' ? '_' : *v, f);
                } else
                        fputc(*t++, f);
        }
        if (fflush(f) != 0 || ferror(f))
                return -ENOMEM;
        fclose(TAKE_PTR(f));
        if (size > SINK_MQTT_TOPIC_MAX)
                return -ENAMETOOLONG;
        if (mosquitto_pub_topic_check2(buf, size) != MOSQ_ERR_SUCCESS ||
            mosquitto_validate_utf8(buf, (int)size) != MOSQ_ERR_SUCCESS)
                return -EINVAL;
        *ret = TAKE_PTR(buf);
        return 0;
}

static int sink_mqtt_send(void *userdata, uint64_t id, const char *key, const ProtoEvent *e, const char *body,
                          size_t len) {
        SinkMqtt *s = userdata;
        _cleanup_free_ char *topic = NULL;
        Slot *slot = NULL;
        int r, rc;

        if (s->state != CONN_UP || s->broken || !s->mosq)
                return -ENOTCONN;
        for (size_t i = 0; i < ELEMENTSOF(s->slots) && !slot; i++)
                if (s->slots[i].state == SLOT_FREE)
                        slot = &s->slots[i];
        if (!slot)
                return -EAGAIN;
        if (len > INT32_MAX)
                return -E2BIG;
        r = topic_build(s, e, &topic);
        if (r < 0)
                return r;
        *slot = (Slot){ .state = SLOT_IN_FLIGHT, .id = id };
        s->in_flight++;
        /* &slot->mid is written before the packet goes out, so a QoS 0
         * on_publish() from inside this call finds the slot. */
        rc = mosquitto_publish(s->mosq, &slot->mid, topic, (int)len, body, (int)s->config->qos, false);
        if (rc != MOSQ_ERR_SUCCESS) {
                char buf[SINK_MQTT_WHY_MAX];

                slot->state = SLOT_FREE;
                s->in_flight--;
                switch (rc) {
                case MOSQ_ERR_NOMEM:
                        return -ENOMEM;
                case MOSQ_ERR_PAYLOAD_SIZE:
                case MOSQ_ERR_OVERSIZE_PACKET:
                        return -E2BIG;
                case MOSQ_ERR_MALFORMED_UTF8:
                case MOSQ_ERR_INVAL:
                        return -EINVAL;
                default:
                        conn_break(s, mosq_reason(s, rc, buf, sizeof(buf)));
                        return -ENOTCONN;
                }
        }
        update_events(s);
        return 0;
}

static void sink_mqtt_describe(void *userdata, json_t *obj) {
        SinkMqtt *s = userdata;

        json_object_set_new(obj, "host", json_string(s->config->host));
        json_object_set_new(obj, "port", json_integer(s->port));
        json_object_set_new(obj, "client_id", json_string(s->client_id));
        json_object_set_new(obj, "connected", json_boolean(s->state == CONN_UP && !s->broken));
        json_object_set_new(obj, "in_flight", json_integer(s->in_flight));
        json_object_set_new(obj, "inbound", json_integer((json_int_t)s->inbound));
        json_object_set_new(obj, "inbound_dropped", json_integer((json_int_t)s->inbound_dropped));
        json_object_set_new(obj, "inbound_limited", json_integer((json_int_t)s->inbound_limited));
}

static int sink_mqtt_new(sd_event *event, const IntegrationConfig *config, const char *node, Integration *owner,
                         void **ret) {
        SinkMqtt *s;
        _cleanup_free_ char *probe = NULL;
        int r;

        if (!config->host)
                return log_error_errno(-EINVAL, "Integration '%s': Host= is missing.", config->name);
        if (config->qos > 1)
                return log_error_errno(-EINVAL, "Integration '%s': QoS= must be 0 or 1.", config->name);
        if (config->subscribe && mosquitto_sub_topic_check(config->subscribe) != MOSQ_ERR_SUCCESS)
                return log_error_errno(-EINVAL, "Integration '%s': Subscribe='%s' is no valid MQTT topic filter.",
                                       config->name, config->subscribe);

        s = calloc(1, sizeof(*s));
        if (!s)
                return -ENOMEM;
        s->event = sd_event_ref(event);
        s->config = config;
        s->owner = owner;
        s->port = config->port ? config->port : config->ca_file ? 8883 : 1883;
        s->backoff_usec = SINK_MQTT_BACKOFF_MIN_USEC;
        s->inbound_credit_usec = (uint64_t)SINK_MQTT_INBOUND_BURST * SINK_MQTT_INBOUND_COST_USEC;
        s->inbound_at = now_usec();
        if (config->client_id)
                s->client_id = strdup(config->client_id);
        else if (asprintf(&s->client_id, "tether-%s", node ? node : "cloudd") < 0)
                s->client_id = NULL;
        if (!s->client_id) {
                sink_mqtt_free(s);
                return -ENOMEM;
        }
        /* The template must make a valid topic (a wildcard in Topic= itself
         * would fail every event forever). */
        r = topic_build(s, &(ProtoEvent){ .name = "e", .coreid = "d" }, &probe);
        if (r < 0) {
                sink_mqtt_free(s);
                return log_error_errno(r, "Integration '%s': Topic='%s' does not make a valid MQTT topic.",
                                       config->name, config->topic ? config->topic : "");
        }
        if (config->subscribe) {
                const char *p = config->subscribe;
                bool fixed = true;

                /* A shared subscription's "$share/GROUP/" is no part of the topics. */
                if (startswith(p, "$share/")) {
                        p = strchr(p + strlen("$share/"), '/');
                        p = p ? p + 1 : "";
                }
                for (const char *level = p; level; level = strchr(level, '/') ? strchr(level, '/') + 1 : NULL) {
                        if (level[0] == '+' || level[0] == '#') {
                                fixed = false;
                                s->filter_wildcard = true;
                        } else if (fixed)
                                s->fixed_levels++;
                }
        }

        /* Refcounted in libmosquitto 2.0; never undone with
         * mosquitto_lib_cleanup(), whose CONF_modules_unload() would reach
         * into the OpenSSL the rest of the process uses. */
        mosquitto_lib_init();
        r = sd_event_add_defer(event, &s->post, on_post, s);
        if (r >= 0)
                r = sd_event_source_set_enabled(s->post, SD_EVENT_OFF);
        if (r >= 0)
                r = sd_event_add_time_relative(event, &s->misc, CLOCK_MONOTONIC, SINK_MQTT_USEC_PER_SEC,
                                               100 * 1000, on_misc, s);
        if (r >= 0)
                r = sd_event_source_set_enabled(s->misc, SD_EVENT_ON);
        /* The first attempt from the loop: new() must not call back into
         * the owner, and a failure is handled like any later one. */
        if (r >= 0)
                r = sd_event_add_time_relative(event, &s->retry, CLOCK_MONOTONIC, 0, 0, on_retry, s);
        if (r < 0) {
                sink_mqtt_free(s);
                return log_error_errno(r, "Integration '%s': cannot set up the loop sources: %m", config->name);
        }
        *ret = s;
        return 0;
}

static void sink_mqtt_free(void *userdata) {
        SinkMqtt *s = userdata;

        if (!s)
                return;
        s->io = sd_event_source_disable_unref(s->io);
        s->misc = sd_event_source_disable_unref(s->misc);
        s->retry = sd_event_source_disable_unref(s->retry);
        s->post = sd_event_source_disable_unref(s->post);
        if (s->mosq) {
                /* A clean DISCONNECT if it can go out at once; no waiting. */
                if (s->state == CONN_UP) {
                        (void)mosquitto_disconnect(s->mosq);
                        (void)mosquitto_loop_write(s->mosq, 1);
                }
                mosquitto_destroy(s->mosq);
        }
        free(s->client_id);
        sd_event_unref(s->event);
        free(s);
}

const SinkOps sink_mqtt_ops = {
        .kind = "mqtt",
        .new = sink_mqtt_new,
        .free = sink_mqtt_free,
        .send = sink_mqtt_send,
        .describe = sink_mqtt_describe,
};
