/* The device side of tether-cloudd: the libcoap TLS server on the sd-event
 * loop, the device registry, and requests from the cloud to devices.
 * See LIBCOAP-NOTES.md for the libcoap 4.3.1 behaviour relied on here:
 * server sessions are freed by libcoap only once nobody holds a reference
 * and their state is NONE; over TCP responses are matched by token only and
 * unanswered requests never time out, so the pending table is ours. */
#include "config.h"

#include <dirent.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/ssl.h>
#include <systemd/sd-daemon.h>

#include "cloud.h"
#include "log.h"
#include "tls.h"
#include "util.h"

#define USEC_PER_SEC 1000000ULL
#define USEC_PER_MSEC 1000ULL
#define DEVICES_LISTEN_BACKLOG 4096
#define DEVICES_DIAG_MAX 120

typedef struct Conn Conn;

struct DeviceCall {
        Device *device;
        uint64_t token;
        sd_event_source *timer;
        device_call_fn cb;
        void *userdata;
        DeviceCall *prev, *next;
};

struct Device {
        char *id;
        Conn *conn;       /* bound connection, NULL while offline */
        json_t *describe; /* last GET /d answer, or NULL */
        uint64_t last_heard; /* CLOCK_REALTIME µs of the last message */
        uint64_t last_rx;    /* CLOCK_MONOTONIC µs of the last message */
        uint64_t next_ping;  /* CLOCK_MONOTONIC µs */
        char last_ip[INET6_ADDRSTRLEN];
        sd_event_source *ping_timer;
        sd_event_source *describe_defer;
        DeviceCall *calls; /* pending requests to this device */
        Device *hash_next;
        Device *list_next;
};

/* One per libcoap server session, from SERVER_SESSION_NEW to _DEL. */
struct Conn {
        coap_session_t *session;
        Device *device;  /* set once established and bound */
        bool referenced; /* we hold a coap_session_reference() */
        bool closing;    /* queued for closing from the loop */
        Conn *hash_next;
        Conn *close_next;
};

static struct {
        sd_event *event;
        const CloudConfig *config;
        coap_context_t *ctx;
        coap_dtls_pki_t pki;
        TlsFiles tls_files;
        bool listener_nodelay;
        sd_event_source *io, *kick, *timer, *close_defer;

        Device **dev_buckets;
        size_t dev_nbuckets, n_devices;
        Device *dev_head, *dev_tail;
        unsigned n_online;

        Conn **conn_buckets;
        size_t conn_nbuckets, n_conns;
        Conn *close_queue;

        uint64_t next_token;
} devices;

/* ---- small helpers --------------------------------------------------- */

static uint64_t realtime_usec(void) {
        struct timespec ts;

        clock_gettime(CLOCK_REALTIME, &ts);
        return (uint64_t)ts.tv_sec * USEC_PER_SEC + (uint64_t)ts.tv_nsec / 1000;
}

static void format_timestamp(uint64_t usec, char buf[static 32]) {
        time_t sec = (time_t)(usec / USEC_PER_SEC);
        struct tm tm;
        char date[24];

        gmtime_r(&sec, &tm);
        strftime(date, sizeof(date), "%Y-%m-%dT%H:%M:%S", &tm);
        snprintf(buf, 32, "%.20s.%03uZ", date, (unsigned)(usec % USEC_PER_SEC / 1000));
}

/* "1.2.3.4" into ip and "1.2.3.4:5" / "[::1]:5" into addr. */
static void format_address(const coap_address_t *a, char ip[static INET6_ADDRSTRLEN],
                           char addr[static INET6_ADDRSTRLEN + 8]) {
        char host[INET6_ADDRSTRLEN] = "?", serv[8] = "?";
        const char *h = host;

        if (a)
                (void)getnameinfo(&a->addr.sa, a->size, host, sizeof(host), serv, sizeof(serv),
                                  NI_NUMERICHOST | NI_NUMERICSERV);
        if (startswith(h, "::ffff:") && strchr(h, '.'))
                h += 7;
        snprintf(ip, INET6_ADDRSTRLEN, "%.45s", h);
        snprintf(addr, INET6_ADDRSTRLEN + 8, strchr(h, ':') ? "[%.45s]:%.5s" : "%.45s:%.5s", h, serv);
}

static uint64_t hash_string(const char *s) {
        uint64_t h = 0xcbf29ce484222325ULL;

        for (; *s; s++)
                h = (h ^ (uint8_t)*s) * 0x100000001b3ULL;
        return h;
}

static uint64_t hash_pointer(const void *p) {
        uint64_t h = (uint64_t)(uintptr_t)p;

        h ^= h >> 33;
        h *= 0xff51afd7ed558ccdULL;
        h ^= h >> 33;
        return h;
}

/* ---- registry: devices by id, connections by session ----------------- */

static int dev_table_grow(void) {
        size_t n = devices.dev_nbuckets ? devices.dev_nbuckets * 2 : 64;
        Device **b = calloc(n, sizeof(*b));

        if (!b)
                return -ENOMEM;
        for (Device *d = devices.dev_head; d; d = d->list_next) {
                size_t i = hash_string(d->id) & (n - 1);
                d->hash_next = b[i];
                b[i] = d;
        }
        free(devices.dev_buckets);
        devices.dev_buckets = b;
        devices.dev_nbuckets = n;
        return 0;
}

Device *devices_find(const char *id) {
        if (!id || devices.dev_nbuckets == 0)
                return NULL;
        for (Device *d = devices.dev_buckets[hash_string(id) & (devices.dev_nbuckets - 1)]; d;
             d = d->hash_next)
                if (streq(d->id, id))
                        return d;
        return NULL;
}

static Device *device_new(const char *id) {
        Device *d;
        size_t i;

        if (devices.n_devices >= devices.dev_nbuckets && dev_table_grow() < 0)
                return NULL;
        d = calloc(1, sizeof(*d));
        if (!d)
                return NULL;
        d->id = strdup(id);
        if (!d->id) {
                free(d);
                return NULL;
        }
        i = hash_string(id) & (devices.dev_nbuckets - 1);
        d->hash_next = devices.dev_buckets[i];
        devices.dev_buckets[i] = d;
        if (devices.dev_tail)
                devices.dev_tail->list_next = d;
        else
                devices.dev_head = d;
        devices.dev_tail = d;
        devices.n_devices++;
        return d;
}

static int conn_table_grow(void) {
        size_t n = devices.conn_nbuckets ? devices.conn_nbuckets * 2 : 64;
        Conn **b = calloc(n, sizeof(*b));

        if (!b)
                return -ENOMEM;
        for (size_t k = 0; k < devices.conn_nbuckets; k++) {
                Conn *c = devices.conn_buckets[k], *next;
                for (; c; c = next) {
                        size_t i = hash_pointer(c->session) & (n - 1);
                        next = c->hash_next;
                        c->hash_next = b[i];
                        b[i] = c;
                }
        }
        free(devices.conn_buckets);
        devices.conn_buckets = b;
        devices.conn_nbuckets = n;
        return 0;
}

static Conn *conn_find(const coap_session_t *session) {
        if (devices.conn_nbuckets == 0)
                return NULL;
        for (Conn *c = devices.conn_buckets[hash_pointer(session) & (devices.conn_nbuckets - 1)]; c;
             c = c->hash_next)
                if (c->session == session)
                        return c;
        return NULL;
}

static Conn *conn_new(coap_session_t *session) {
        Conn *c;
        size_t i;

        if (devices.n_conns >= devices.conn_nbuckets && conn_table_grow() < 0)
                return NULL;
        c = calloc(1, sizeof(*c));
        if (!c)
                return NULL;
        c->session = session;
        i = hash_pointer(session) & (devices.conn_nbuckets - 1);
        c->hash_next = devices.conn_buckets[i];
        devices.conn_buckets[i] = c;
        devices.n_conns++;
        return c;
}

/* Unlink and free; the caller has dealt with the session reference. */
static void conn_free(Conn *c) {
        Conn **p;

        if (!c)
                return;
        for (p = &devices.conn_buckets[hash_pointer(c->session) & (devices.conn_nbuckets - 1)]; *p;
             p = &(*p)->hash_next)
                if (*p == c) {
                        *p = c->hash_next;
                        break;
                }
        if (c->closing)
                for (p = &devices.close_queue; *p; p = &(*p)->close_next)
                        if (*p == c) {
                                *p = c->close_next;
                                break;
                        }
        devices.n_conns--;
        free(c);
}

const char *device_id(const Device *d) { return d->id; }

bool device_connected(const Device *d) { return d->conn != NULL; }

coap_session_t *device_session(const Device *d) {
        if (!d->conn || coap_session_get_state(d->conn->session) != COAP_SESSION_STATE_ESTABLISHED)
                return NULL;
        return d->conn->session;
}

unsigned devices_online_count(void) { return devices.n_online; }

json_t *device_to_json(const Device *d, bool details) {
        char heard[32];
        json_t *j;

        format_timestamp(d->last_heard, heard);
        j = json_pack("{s:s, s:s, s:n, s:s?, s:s, s:i, s:b, s:b, s:i, s:b, s:n, s:s}", "id", d->id, "name", d->id,
                      "last_app", "last_ip_address", d->last_ip[0] ? d->last_ip : NULL, "last_heard", heard,
                      "product_id", 0, "online", d->conn != NULL, "connected", d->conn != NULL,
                      "platform_id", 0, "cellular", 0, "notes", "status", "normal");
        if (!j || !details)
                return j;
        {
                json_t *f = d->describe ? json_object_get(d->describe, "functions") : NULL;
                json_t *v = d->describe ? json_object_get(d->describe, "variables") : NULL;

                if (json_object_set_new(j, "functions", f ? json_deep_copy(f) : json_array()) < 0 ||
                    json_object_set_new(j, "variables", v ? json_deep_copy(v) : json_object()) < 0) {
                        json_decref(j);
                        return NULL;
                }
        }
        return j;
}

json_t *devices_to_json(void) {
        json_t *a = json_array();

        if (!a)
                return NULL;
        for (Device *d = devices.dev_head; d; d = d->list_next)
                if (json_array_append_new(a, device_to_json(d, false)) < 0) {
                        json_decref(a);
                        return NULL;
                }
        return a;
}

/* ---- the libcoap loop on sd-event ------------------------------------ */

static void devices_arm_timer(void) {
        coap_tick_t now;
        unsigned ms;

        /* libcoap's own timerfd sits in the epoll fd we watch; this timer
         * only makes sure nothing is missed after we act from outside. */
        coap_ticks(&now);
        ms = coap_io_prepare_epoll(devices.ctx, now);
        if (ms > 0) {
                (void)sd_event_source_set_time_relative(devices.timer, (uint64_t)ms * USEC_PER_MSEC);
                (void)sd_event_source_set_enabled(devices.timer, SD_EVENT_ONESHOT);
        } else
                (void)sd_event_source_set_enabled(devices.timer, SD_EVENT_OFF);
}

static int devices_io_cb(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        coap_io_process(devices.ctx, COAP_IO_NO_WAIT);
        return 0;
}

static int devices_timer_cb(sd_event_source *s, uint64_t usec, void *userdata) {
        coap_io_process(devices.ctx, COAP_IO_NO_WAIT);
        devices_arm_timer();
        return 0;
}

static int devices_kick_cb(sd_event_source *s, void *userdata) {
        coap_io_process(devices.ctx, COAP_IO_NO_WAIT);
        devices_arm_timer();
        return 0;
}

void devices_kick(void) {
        if (devices.kick)
                (void)sd_event_source_set_enabled(devices.kick, SD_EVENT_ONESHOT);
}

/* ---- pending calls ----------------------------------------------------- */

static void call_unlink(DeviceCall *c) {
        if (c->prev)
                c->prev->next = c->next;
        else
                c->device->calls = c->next;
        if (c->next)
                c->next->prev = c->prev;
        c->prev = c->next = NULL;
        c->timer = sd_event_source_disable_unref(c->timer);
}

void devices_call_cancel(DeviceCall *c) {
        if (!c)
                return;
        call_unlink(c);
        free(c);
}

/* Unlink, free and run the callback (which may start new calls). */
static void call_complete(DeviceCall *c, int error, unsigned code, const uint8_t *data, size_t len) {
        device_call_fn cb = c->cb;
        void *userdata = c->userdata;

        devices_call_cancel(c);
        cb(error, code, data, len, userdata);
}

static int call_timeout_cb(sd_event_source *s, uint64_t usec, void *userdata) {
        DeviceCall *c = userdata;

        log_debug("Request to device '%s' timed out.", c->device->id);
        call_complete(c, -ETIMEDOUT, 0, NULL, 0);
        return 0;
}

int devices_call(Device *d, coap_pdu_code_t method, const char *path0, const char *name,
                 const void *payload, size_t len, device_call_fn cb, void *userdata,
                 DeviceCall **ret_call) {
        coap_session_t *session = device_session(d);
        Conn *conn = d->conn;
        uint8_t token[8];
        size_t token_len;
        DeviceCall *c;
        coap_pdu_t *pdu;
        int r;

        if (!session)
                return -ENOTCONN;
        c = calloc(1, sizeof(*c));
        if (!c)
                return -ENOMEM;
        c->device = d;
        c->cb = cb;
        c->userdata = userdata;
        c->token = ++devices.next_token;
        token_len = coap_encode_var_safe8(token, sizeof(token), c->token);

        pdu = coap_pdu_init(COAP_MESSAGE_CON, method, coap_new_message_id(session),
                            coap_session_max_pdu_size(session));
        if (!pdu) {
                free(c);
                return -ENOMEM;
        }
        if (!coap_add_token(pdu, token_len, token) ||
            !coap_add_option(pdu, COAP_OPTION_URI_PATH, strlen(path0), (const uint8_t *)path0) ||
            (name && !coap_add_option(pdu, COAP_OPTION_URI_PATH, strlen(name), (const uint8_t *)name)) ||
            (len > 0 && !coap_add_data(pdu, len, payload))) {
                coap_delete_pdu(pdu);
                free(c);
                return -E2BIG;
        }
        r = sd_event_add_time_relative(devices.event, &c->timer, CLOCK_MONOTONIC,
                                       (uint64_t)devices.config->call_timeout_sec * USEC_PER_SEC,
                                       10 * USEC_PER_MSEC, call_timeout_cb, c);
        if (r < 0) {
                coap_delete_pdu(pdu);
                free(c);
                return r;
        }
        if (coap_send(session, pdu) == COAP_INVALID_MID) {
                sd_event_source_disable_unref(c->timer);
                free(c);
                devices_kick();
                return -EIO;
        }
        devices_kick();
        /* A failed write may have closed the session inside coap_send(). */
        if (d->conn != conn) {
                sd_event_source_disable_unref(c->timer);
                free(c);
                return -ENOTCONN;
        }
        c->next = d->calls;
        if (d->calls)
                d->calls->prev = c;
        d->calls = c;
        if (ret_call)
                *ret_call = c;
        return 0;
}

/* ---- device lifecycle -------------------------------------------------- */

static void devices_notify_status(const char *key, const char *id) {
        (void)sd_notifyf(0, "STATUS=%u devices online\n%s=%s", devices.n_online, key, id);
}

static void device_seen(Device *d) {
        d->last_rx = now_usec();
        d->last_heard = realtime_usec();
}

static void device_arm_ping(Device *d) {
        uint64_t deadline = d->last_rx + (uint64_t)devices.config->device_timeout_sec * USEC_PER_SEC;
        uint64_t next = d->next_ping < deadline ? d->next_ping : deadline;

        (void)sd_event_source_set_time(d->ping_timer, next);
        (void)sd_event_source_set_enabled(d->ping_timer, SD_EVENT_ONESHOT);
}

static void conn_queue_close(Conn *c) {
        if (c->closing)
                return;
        c->closing = true;
        c->close_next = devices.close_queue;
        devices.close_queue = c;
        (void)sd_event_source_set_enabled(devices.close_defer, SD_EVENT_ONESHOT);
}

/* The device's session is gone or replaced: answer its pending calls,
 * drop its subscriptions, report it offline. The session reference stays
 * with the Conn (released when libcoap reports the close). */
static void device_unbind(Device *d, const char *reason) {
        Conn *c = d->conn;

        if (!c)
                return;
        d->conn = NULL;
        c->device = NULL;
        devices.n_online--;
        d->ping_timer = sd_event_source_disable_unref(d->ping_timer);
        d->describe_defer = sd_event_source_disable_unref(d->describe_defer);
        events_device_gone(d);
        log_info("Device '%s' disconnected (%s).", d->id, reason);
        devices_notify_status("X_TETHER_OFFLINE", d->id);
        /* Callbacks may start new calls on this device: they fail at once. */
        while (d->calls)
                call_complete(d->calls, -ENOTCONN, 0, NULL, 0);
}

static int device_ping_cb(sd_event_source *s, uint64_t usec, void *userdata) {
        Device *d = userdata;
        uint64_t now = now_usec();
        coap_session_t *session;

        if (!d->conn)
                return 0;
        session = d->conn->session;
        if (now >= d->last_rx + (uint64_t)devices.config->device_timeout_sec * USEC_PER_SEC) {
                log_warning("Device '%s' silent for %us, closing its session.", d->id,
                            devices.config->device_timeout_sec);
                device_unbind(d, "timed out");
                if (coap_session_get_state(session) != COAP_SESSION_STATE_NONE)
                        coap_session_disconnected(session, COAP_NACK_NOT_DELIVERABLE);
                devices_kick();
                return 0;
        }
        if (now >= d->next_ping) {
                if (coap_session_get_state(session) == COAP_SESSION_STATE_ESTABLISHED)
                        (void)coap_session_send_ping(session);
                d->next_ping = now + (uint64_t)devices.config->ping_sec * USEC_PER_SEC;
                devices_kick();
        }
        device_arm_ping(d);
        return 0;
}

static void describe_done(int error, unsigned code, const uint8_t *data, size_t len, void *userdata) {
        Device *d = userdata;
        json_t *j = NULL;
        int r;

        if (error == -ENOTCONN)
                return; /* went offline; logged there */
        if (error < 0)
                log_warning_errno(error, "Device '%s' did not answer GET /d: %m", d->id);
        else if (code != COAP_RESPONSE_CODE_CONTENT)
                log_warning("Device '%s' answered GET /d with %u.%02u.", d->id, code >> 5, code & 0x1f);
        else if ((r = proto_describe_decode(data, len, &j)) < 0)
                log_warning_errno(r, "Device '%s' sent an invalid describe document: %m", d->id);
        else {
                json_decref(d->describe);
                d->describe = j;
                log_debug("Device '%s' describe cached (%zu functions, %zu variables).", d->id,
                          json_array_size(json_object_get(j, "functions")),
                          json_object_size(json_object_get(j, "variables")));
        }
        if (d->conn)
                devices_notify_status("X_TETHER_ONLINE", d->id);
}

static int describe_defer_cb(sd_event_source *s, void *userdata) {
        Device *d = userdata;
        int r;

        d->describe_defer = sd_event_source_disable_unref(d->describe_defer);
        r = devices_call(d, COAP_REQUEST_CODE_GET, PROTO_PATH_DESCRIBE, NULL, NULL, 0, describe_done, d,
                         NULL);
        if (r < 0) {
                log_warning_errno(r, "Failed to send GET /d to device '%s': %m", d->id);
                if (d->conn)
                        devices_notify_status("X_TETHER_ONLINE", d->id);
        }
        return 0;
}

/* COAP_EVENT_SESSION_CONNECTED: TLS and CSM done, the peer is known. No
 * PDU is built here (LIBCOAP-NOTES Trap B); GET /d goes out from a defer. */
static void conn_bind(Conn *c) {
        const char *id = tls_session_peer_id(c->session);
        char ip[INET6_ADDRSTRLEN], addr[INET6_ADDRSTRLEN + 8];
        Device *d;
        int r;

        format_address(coap_session_get_addr_remote(c->session), ip, addr);
        if (!id) {
                log_warning("Session from %s has no device identity, closing it.", addr);
                conn_queue_close(c);
                return;
        }
        d = devices_find(id) ?: device_new(id);
        if (!d) {
                log_error("Out of memory registering device '%s'.", id);
                conn_queue_close(c);
                return;
        }
        if (d->conn) {
                Conn *old = d->conn;

                device_unbind(d, "replaced by a new session");
                conn_queue_close(old);
        }
        r = sd_event_add_time(devices.event, &d->ping_timer, CLOCK_MONOTONIC, 0, 100 * USEC_PER_MSEC,
                              device_ping_cb, d);
        if (r >= 0)
                r = sd_event_add_defer(devices.event, &d->describe_defer, describe_defer_cb, d);
        if (r < 0) {
                log_error_errno(r, "Failed to set up device '%s': %m", id);
                d->ping_timer = sd_event_source_disable_unref(d->ping_timer);
                conn_queue_close(c);
                return;
        }
        coap_session_reference(c->session);
        c->referenced = true;
        c->device = d;
        d->conn = c;
        devices.n_online++;
        snprintf(d->last_ip, sizeof(d->last_ip), "%s", ip);
        device_seen(d);
        d->next_ping = d->last_rx + (uint64_t)devices.config->ping_sec * USEC_PER_SEC;
        device_arm_ping(d);
        log_info("Device '%s' connected from %s.", d->id, addr);
        (void)sd_notifyf(0, "STATUS=%u devices online", devices.n_online);
}

static int devices_close_cb(sd_event_source *s, void *userdata) {
        while (devices.close_queue) {
                Conn *c = devices.close_queue;

                devices.close_queue = c->close_next;
                c->closing = false;
                if (c->device)
                        device_unbind(c->device, "closed");
                /* Our event handler releases the reference on the close. */
                if (coap_session_get_state(c->session) != COAP_SESSION_STATE_NONE)
                        coap_session_disconnected(c->session, COAP_NACK_NOT_DELIVERABLE);
                else if (c->referenced) {
                        c->referenced = false;
                        coap_session_release(c->session);
                }
        }
        devices_kick();
        return 0;
}

static void conn_setup_socket(coap_session_t *session) {
        coap_tls_library_t lib;
        void *tls = coap_session_get_tls(session, &lib);
        int r;

        /* Idle sessions then hold no OpenSSL read/write buffers. */
        if (tls && lib == COAP_TLS_LIBRARY_OPENSSL)
                SSL_set_mode((SSL *)tls, SSL_MODE_RELEASE_BUFFERS);
        /* Accepted sockets inherit TCP_NODELAY from the listener when we could
         * set it there; otherwise find this socket (costs a /proc scan). */
        if (!devices.listener_nodelay && (r = tls_session_set_nodelay(session)) < 0)
                log_debug_errno(r, "Failed to set TCP_NODELAY: %m");
}

static int devices_event_handler(coap_session_t *session, const coap_event_t event) {
        Conn *c;

        switch (event) {
        case COAP_EVENT_SERVER_SESSION_NEW:
                if (!conn_new(session)) {
                        log_error("Out of memory accepting a session.");
                        return 0;
                }
                conn_setup_socket(session);
                break;
        case COAP_EVENT_SESSION_CONNECTED:
                c = conn_find(session);
                if (c && !c->device && !c->closing)
                        conn_bind(c);
                break;
        case COAP_EVENT_DTLS_CLOSED:
        case COAP_EVENT_DTLS_ERROR:
        case COAP_EVENT_TCP_CLOSED:
        case COAP_EVENT_TCP_FAILED:
        case COAP_EVENT_SESSION_CLOSED:
        case COAP_EVENT_SESSION_FAILED:
                c = conn_find(session);
                if (!c)
                        break;
                if (c->device)
                        device_unbind(c->device, event == COAP_EVENT_DTLS_ERROR ? "TLS error" : "connection closed");
                if (c->referenced && coap_session_get_state(session) == COAP_SESSION_STATE_NONE) {
                        /* libcoap frees server sessions only from its own
                         * loop, so releasing here is safe. */
                        c->referenced = false;
                        coap_session_release(session);
                }
                break;
        case COAP_EVENT_SERVER_SESSION_DEL:
                c = conn_find(session);
                if (c && c->device)
                        device_unbind(c->device, "session deleted");
                conn_free(c);
                tls_session_forget(session);
                break;
        default:
                break;
        }
        return 0;
}

/* ---- requests from devices -------------------------------------------- */

static void devices_reply(coap_pdu_t *response, coap_pdu_code_t code, const char *fmt, ...) _printf_(3, 4);

static void devices_reply(coap_pdu_t *response, coap_pdu_code_t code, const char *fmt, ...) {
        char text[DEVICES_DIAG_MAX];
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
        coap_add_option(response, COAP_OPTION_CONTENT_FORMAT,
                        coap_encode_var_safe(buf, sizeof(buf), PROTO_CF_TEXT), buf);
        coap_add_data(response, (size_t)n, (const uint8_t *)text);
}

static void devices_request_handler(coap_resource_t *resource, coap_session_t *session,
                                    const coap_pdu_t *request, const coap_string_t *query,
                                    coap_pdu_t *response) {
        char first[16] = "", rest[TETHER_EVENT_NAME_MAX + 2] = "";
        size_t rest_len = 0;
        coap_opt_iterator_t it;
        coap_opt_filter_t filter;
        coap_opt_t *opt;
        unsigned nseg = 0;
        bool too_long = false;
        Conn *c = conn_find(session);
        Device *d = c ? c->device : NULL;

        if (!d) {
                devices_reply(response, COAP_RESPONSE_CODE(503), "session not ready");
                return;
        }
        device_seen(d);

        coap_option_filter_clear(&filter);
        coap_option_filter_set(&filter, COAP_OPTION_URI_PATH);
        coap_option_iterator_init(request, &it, &filter);
        while ((opt = coap_option_next(&it))) {
                const char *v = (const char *)coap_opt_value(opt);
                size_t n = coap_opt_length(opt);

                if (nseg++ == 0) {
                        if (n >= sizeof(first))
                                too_long = true;
                        else
                                memcpy(first, v, n);
                        continue;
                }
                if (rest_len + (nseg > 2) + n >= sizeof(rest)) {
                        too_long = true;
                        continue;
                }
                if (nseg > 2)
                        rest[rest_len++] = '/';
                memcpy(rest + rest_len, v, n);
                rest_len += n;
                rest[rest_len] = 0;
        }
        if (streq(first, PROTO_PATH_DESCRIBE) && nseg == 1) {
                /* The device's describe data changed (it reloaded): fetch it again. */
                if (coap_pdu_get_code(request) != COAP_REQUEST_CODE_POST) {
                        devices_reply(response, COAP_RESPONSE_CODE(405), "use POST on /d");
                        return;
                }
                if (!d->describe_defer &&
                    sd_event_add_defer(devices.event, &d->describe_defer, describe_defer_cb, d) < 0) {
                        devices_reply(response, COAP_RESPONSE_CODE(500), "cannot schedule describe");
                        return;
                }
                coap_pdu_set_code(response, COAP_RESPONSE_CODE(204));
                return;
        }
        if (streq(first, PROTO_PATH_EVENT) && !too_long) {
                if (memchr(rest, 0, rest_len)) {
                        devices_reply(response, COAP_RESPONSE_CODE(400), "malformed name");
                        return;
                }
                switch (coap_pdu_get_code(request)) {
                case COAP_REQUEST_CODE_GET:
                case COAP_REQUEST_CODE_POST:
                        events_handle_request(d, session, request, rest, response);
                        return;
                default:
                        devices_reply(response, COAP_RESPONSE_CODE(405), "method not allowed");
                        return;
                }
        }
        if (streq(first, PROTO_PATH_EVENT))
                devices_reply(response, COAP_RESPONSE_CODE(400), "name too long");
        else if (streq(first, PROTO_PATH_OTA) && nseg == 2 && !too_long)
                ota_device_request(d, request, rest, response);
        else
                devices_reply(response, COAP_RESPONSE_CODE(404), "unknown resource");
}

static coap_response_t devices_response_handler(coap_session_t *session, const coap_pdu_t *sent,
                                                const coap_pdu_t *received, const coap_mid_t mid) {
        Conn *c = conn_find(session);
        Device *d = c ? c->device : NULL;
        coap_bin_const_t token = coap_pdu_get_token(received);
        const uint8_t *data = NULL;
        size_t len = 0;
        uint64_t t;

        if (!d)
                return COAP_RESPONSE_OK;
        device_seen(d);
        if (token.length == 0 || token.length > 8)
                return COAP_RESPONSE_OK;
        t = coap_decode_var_bytes8(token.s, token.length);
        for (DeviceCall *call = d->calls; call; call = call->next)
                if (call->token == t) {
                        (void)coap_get_data(received, &len, &data);
                        call_complete(call, 0, coap_pdu_get_code(received), data, len);
                        return COAP_RESPONSE_OK;
                }
        log_debug("Device '%s' answered an unknown or expired request.", d->id);
        return COAP_RESPONSE_OK;
}

static void devices_pong_handler(coap_session_t *session, const coap_pdu_t *received, const coap_mid_t mid) {
        Conn *c = conn_find(session);

        if (c && c->device)
                device_seen(c->device);
}

/* ---- setup and teardown ------------------------------------------------ */

static void devices_coap_log(coap_log_t level, const char *message) {
        size_t n = strlen(message);

        while (n > 0 && (message[n - 1] == '\n' || message[n - 1] == '\r'))
                n--;
        log_internal(level > LOG_DEBUG ? LOG_DEBUG : level, 0, "libcoap: %.*s", (int)n, message);
}

/* libcoap 4.3.1 has no accessor for the endpoint's socket; find the
 * listening socket it just made (the only one in the process so far). */
static int devices_find_listener(const struct sockaddr_storage *want, unsigned port) {
        struct dirent *de;
        DIR *dir;
        int found = -ENOENT;

        dir = opendir("/proc/self/fd");
        if (!dir)
                return -errno;
        while ((de = readdir(dir))) {
                struct sockaddr_storage sa = {};
                socklen_t sl = sizeof(sa), ol;
                int fd = atoi(de->d_name), v = 0;

                if (de->d_name[0] == '.' || fd == dirfd(dir))
                        continue;
                ol = sizeof(v);
                if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &v, &ol) < 0 || !v)
                        continue;
                if (getsockname(fd, (struct sockaddr *)&sa, &sl) < 0 || sa.ss_family != want->ss_family)
                        continue;
                if (port != 0 && ((sa.ss_family == AF_INET && ntohs(((struct sockaddr_in *)&sa)->sin_port) != port) ||
                                  (sa.ss_family == AF_INET6 && ntohs(((struct sockaddr_in6 *)&sa)->sin6_port) != port)))
                        continue;
                if (fd > found)
                        found = fd;
        }
        closedir(dir);
        return found;
}

int devices_start(sd_event *event, const CloudConfig *config, unsigned *ret_port) {
        struct sockaddr_storage ss;
        socklen_t sl;
        coap_address_t addr;
        coap_endpoint_t *ep;
        coap_resource_t *res;
        const char *bad = NULL;
        int r, fd, one = 1;

        devices.event = event;
        devices.config = config;
        devices.next_token = 0;
        devices.tls_files = (TlsFiles){ config->ca_file, config->cert_file, config->key_file };
        r = tls_files_check(&devices.tls_files, &bad);
        if (r < 0)
                return log_error_errno(r, "Cannot read TLS file '%s': %m", bad);

        coap_startup();
        coap_set_log_handler(devices_coap_log);
        coap_set_log_level(log_get_max_level() >= LOG_DEBUG ? LOG_INFO : LOG_WARNING);
        coap_dtls_set_log_level(log_get_max_level() >= LOG_DEBUG ? LOG_INFO : LOG_WARNING);
        if (!coap_tls_is_supported())
                return log_error_errno(-EOPNOTSUPP, "libcoap was built without TLS support.");

        devices.ctx = coap_new_context(NULL);
        if (!devices.ctx)
                return log_error_errno(-ENOMEM, "Failed to create the CoAP context.");
        tls_pki_init(&devices.pki, &devices.tls_files, NULL);
        if (!coap_context_set_pki(devices.ctx, &devices.pki))
                return log_error_errno(-EINVAL, "Failed to load the server certificate '%s', key '%s' or CA '%s'.",
                                       config->cert_file, config->key_file, config->ca_file);
        coap_register_event_handler(devices.ctx, devices_event_handler);
        coap_register_response_handler(devices.ctx, devices_response_handler);
        coap_register_pong_handler(devices.ctx, devices_pong_handler);
        coap_register_ping_handler(devices.ctx, devices_pong_handler);

        res = coap_resource_unknown_init(devices_request_handler);
        if (!res)
                return log_error_errno(-ENOMEM, "Failed to create the CoAP resource.");
        coap_register_request_handler(res, COAP_REQUEST_GET, devices_request_handler);
        coap_register_request_handler(res, COAP_REQUEST_POST, devices_request_handler);
        coap_register_request_handler(res, COAP_REQUEST_DELETE, devices_request_handler);
        coap_add_resource(devices.ctx, res);

        r = config_resolve_address(config->coap_listen, config->coap_port, &ss, &sl);
        if (r < 0)
                return log_error_errno(r, "Invalid [Cloud] Listen= address '%s'.", config->coap_listen);
        coap_address_init(&addr);
        memcpy(&addr.addr, &ss, sl);
        addr.size = sl;
        ep = coap_new_endpoint(devices.ctx, &addr, COAP_PROTO_TLS);
        if (!ep)
                return log_error_errno(-EADDRNOTAVAIL, "Failed to listen on '%s' port %u.", config->coap_listen,
                                       config->coap_port);

        fd = devices_find_listener(&ss, config->coap_port);
        if (fd < 0)
                return log_error_errno(fd, "Cannot find the CoAP listening socket: %m");
        /* libcoap listens with a backlog of 5: connect storms overflow it. */
        if (listen(fd, DEVICES_LISTEN_BACKLOG) < 0)
                log_warning_errno(errno, "Failed to raise the listen backlog: %m");
        devices.listener_nodelay = setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) == 0;
        sl = sizeof(ss);
        if (getsockname(fd, (struct sockaddr *)&ss, &sl) < 0)
                return log_error_errno(errno, "getsockname() failed: %m");
        *ret_port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                                   : ((struct sockaddr_in *)&ss)->sin_port);

        r = sd_event_add_io(event, &devices.io, coap_context_get_coap_fd(devices.ctx), EPOLLIN, devices_io_cb,
                            NULL);
        if (r >= 0)
                r = sd_event_add_time(event, &devices.timer, CLOCK_MONOTONIC, 0, USEC_PER_MSEC,
                                      devices_timer_cb, NULL);
        if (r >= 0)
                r = sd_event_source_set_enabled(devices.timer, SD_EVENT_OFF);
        if (r >= 0)
                r = sd_event_add_defer(event, &devices.kick, devices_kick_cb, NULL);
        if (r >= 0)
                r = sd_event_source_set_enabled(devices.kick, SD_EVENT_OFF);
        if (r >= 0)
                r = sd_event_add_defer(event, &devices.close_defer, devices_close_cb, NULL);
        if (r >= 0)
                r = sd_event_source_set_enabled(devices.close_defer, SD_EVENT_OFF);
        if (r < 0)
                return log_error_errno(r, "Failed to add CoAP event sources: %m");
        return 0;
}

void devices_stop(void) {
        Device *d, *next_d;

        if (!devices.event)
                return;

        for (d = devices.dev_head; d; d = d->list_next) {
                while (d->calls)
                        devices_call_cancel(d->calls);
                if (d->conn) {
                        d->conn->device = NULL;
                        d->conn = NULL;
                        events_device_gone(d);
                }
        }
        if (devices.ctx)
                coap_register_event_handler(devices.ctx, NULL);
        for (size_t k = 0; k < devices.conn_nbuckets; k++)
                while (devices.conn_buckets[k]) {
                        Conn *c = devices.conn_buckets[k];

                        if (c->referenced)
                                coap_session_release(c->session);
                        tls_session_forget(c->session);
                        c->closing = false;
                        conn_free(c);
                }
        devices.close_queue = NULL;
        for (d = devices.dev_head; d; d = next_d) {
                next_d = d->list_next;
                sd_event_source_disable_unref(d->ping_timer);
                sd_event_source_disable_unref(d->describe_defer);
                json_decref(d->describe);
                free(d->id);
                free(d);
        }
        free(devices.dev_buckets);
        free(devices.conn_buckets);
        devices.io = sd_event_source_disable_unref(devices.io);
        devices.timer = sd_event_source_disable_unref(devices.timer);
        devices.kick = sd_event_source_disable_unref(devices.kick);
        devices.close_defer = sd_event_source_disable_unref(devices.close_defer);
        if (devices.ctx)
                coap_free_context(devices.ctx);
        coap_cleanup();
        memset(&devices, 0, sizeof(devices));
}
