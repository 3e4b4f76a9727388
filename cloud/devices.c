/* SPDX-License-Identifier: Apache-2.0 */
/* The device side of tether-cloudd: the libcoap TLS server on the sd-event
 * loop, the device registry, and requests from the cloud to devices.
 * Sessions are spread over SessionShards libcoap contexts (Shard), all in
 * this one thread and loop, all listening on the same address and port
 * with SO_REUSEPORT (our sockets dup'ed in the place of libcoap's), so
 * libcoap's walk over every session of a context on each wakeup covers a
 * share of them; the registry, admission and calls are global, and every
 * context's app data is the Devices ("Session shards" in the document
 * below). With SessionShards=1 the one context keeps libcoap's listener.
 * See docs/design/libcoap.md for the libcoap 4.3.1 behaviour relied on here:
 * server sessions are freed by libcoap only once nobody holds a reference
 * and their state is NONE; over TCP responses are matched by token only and
 * unanswered requests never time out, so the pending table is ours.
 *
 * libcoap queues without limit whatever cannot be written at once (its
 * per-session delay queue), so we count what we hand it for each device and
 * what the device has provably read: all bytes before a Ping it answered or
 * a request it answered (TCP delivers in order). A device that has not
 * read MaxQueuedBytes gets no more events or calls until it catches up;
 * one that keeps sending requests regardless is disconnected. Only those
 * answers prove that a device is alive, never what it sends on its own. */
#include "config.h"

#include <dirent.h>
#include <dlfcn.h>
#include <inttypes.h>
#include <malloc.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/ssl.h>
#include <pthread.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <systemd/sd-daemon.h>

#include "devices.h"
#include "handshakes.h"
#include "listener.h"
#include "proto.h"
#include "log.h"
#include "stats.h"
#include "ticket-keys.h"
#include "tls.h"
#include "util.h"

#define USEC_PER_SEC 1000000ULL
#define USEC_PER_MSEC 1000ULL
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define DEVICES_LISTEN_BACKLOG 4096
#define DEVICES_DIAG_MAX 120
/* Counted per message on top of its payload: header, token, options and
 * libcoap's own bookkeeping for a queued PDU. */
#define DEVICES_MSG_OVERHEAD 128
/* At most one warning per kind in this many µs when clients misbehave in bulk. */
#define DEVICES_WARN_INTERVAL (10 * USEC_PER_SEC)

typedef struct Session Session;
typedef struct Describe Describe;
typedef struct Shard Shard;

struct DeviceCall {
        Device *device;
        uint64_t token;
        uint64_t tx_mark; /* the device's tx_bytes once this request was queued */
        sd_event_source *timer;
        device_call_fn cb;
        void *userdata;
        DeviceCall *prev, *next;
};

struct Device {
        Devices *devices; /* the registry it is in */
        char *id;
        Session *conn;       /* bound connection, NULL while offline */
        char *elsewhere;     /* the cluster node holding its session, or NULL */
        Describe *describe; /* last GET /d answer (shared), or NULL */
        uint64_t last_heard; /* CLOCK_REALTIME µs of the last message */
        uint64_t last_alive; /* CLOCK_MONOTONIC µs of the last Pong or answer to us */
        uint64_t next_ping;  /* CLOCK_MONOTONIC µs */
        /* Bytes handed to libcoap for the session (with DEVICES_MSG_OVERHEAD
         * per message) and how many of them the device has provably read. */
        uint64_t tx_bytes, tx_read;
        uint64_t ping_mark;    /* tx_bytes when the outstanding Ping went out */
        bool ping_outstanding; /* at most one Ping in flight */
        bool warned_too_big;   /* logged that its Max-Message-Size is too small */
        uint64_t dropped_events; /* since it stopped reading */
        char last_ip[INET6_ADDRSTRLEN];
        char last_addr[INET6_ADDRSTRLEN + 8]; /* with the port, for the log */
        int64_t cert_not_after; /* the bound session's certificate (Unix seconds; 0: unknown) */
        sd_event_source *ping_timer;
        sd_event_source *describe_defer;
        DeviceCall *describe_call; /* the GET /d in flight, or NULL */
        bool describe_again;       /* POST /d while it was in flight */
        bool online_notified;      /* X_TETHER_ONLINE sent for this session */
        DeviceCall *calls; /* pending requests to this device */
        /* Another session for this ID while one is bound (device_conflict()). */
        Session *contender;        /* waiting for the liveness check, or NULL */
        uint64_t check_since;      /* CLOCK_MONOTONIC µs the check began; 0: none runs */
        sd_event_source *check_timer;
        uint64_t conflict_window;  /* CLOCK_MONOTONIC µs the counting window began */
        unsigned conflicts;        /* in the window */
        uint64_t conflicts_quiet;  /* not logged in the window (damping) */
        Device *hash_next;
        Device *list_next;
};

/* One per libcoap server session, from SERVER_SESSION_NEW to _DEL. */
struct Session {
        Devices *devices;
        Shard *shard; /* whose context holds the session */
        coap_session_t *session;
        Device *device;  /* set once established and bound */
        bool referenced; /* we hold a coap_session_reference() */
        bool refused;    /* its failed handshake was counted (session_refused()) */
        bool settled;    /* bound to a device once, or closed by the cloud */
        bool closing;    /* queued for closing from the loop */
        bool unbound;    /* on the unbound list (accepted, no device yet) */
        bool refused_request; /* a request arrived while it was a contender */
        bool anonymous;  /* an enrollment session: no certificate, never a device */
        unsigned requests; /* requests on an enrollment session */
        unsigned pings;    /* Pings on an enrollment session */
        Device *contends; /* the device whose ID it waits for (Device.contender) */
        uint64_t accepted; /* CLOCK_MONOTONIC µs */
        Session *hash_next;
        Session *close_next;
        Session *unbound_prev, *unbound_next; /* oldest first */
};

/* Refused handshakes, logged per address (session_refused()). */
#define DEVICES_REFUSAL_SLOTS 256
#define DEVICES_REFUSAL_INTERVAL (60 * USEC_PER_SEC)
#define DEVICES_REFUSAL_BURST 20
typedef struct RefusalSlot {
        char ip[INET6_ADDRSTRLEN];
        uint64_t key, logged, suppressed;
} RefusalSlot;

/* Counts events of one kind and logs them at most every DEVICES_WARN_INTERVAL. */
typedef struct WarnLimit {
        uint64_t last;
        uint64_t suppressed;
} WarnLimit;

/* A connection whose TLS handshake a handshake thread finished, waiting
 * for libcoap to accept it on its shard (HandshakeThreads=). */
typedef struct Handoff Handoff;
struct Handoff {
        Handoff *next;
        int fd;
        SSL *ssl;
        uint64_t accepted; /* CLOCK_MONOTONIC µs of the accept() */
        struct sockaddr_storage peer;
        socklen_t peer_len;
};

/* One libcoap context with its own listener (all on the same address and
 * port with SO_REUSEPORT when there are several, or an eventfd with
 * HandshakeThreads=), epoll fd and session scan: libcoap walks only the
 * sessions of one shard. */
struct Shard {
        Devices *devices;
        unsigned index;
        coap_context_t *ctx;
        /* accept paused at MaxHandshakes. With handshake threads, an
         * eventfd stands in for the listening socket: readable while
         * handoffs wait (under handoff_lock, with the list). */
        ListenerPause listener;
        pthread_mutex_t handoff_lock;
        bool handoff_lock_init;
        Handoff *handoff_head, *handoff_tail;
        sd_event_source *io, *timer;
        uint64_t last_scan; /* CLOCK_MONOTONIC µs of the last coap_io_prepare_epoll() */
        bool kick_due;      /* dispatch from devs->kick */
        size_t n_sessions;
};

struct Devices {
        sd_event *event;
        const CloudConfig *config;
        DevicesHooks hooks;
        Shard *shards; /* SessionShards of them; all share this Devices as app data */
        unsigned n_shards;
        coap_dtls_pki_t pki;
        TlsFiles tls_files;
        TlsServerKeys *tls_keys; /* what devs->pki points into */
        TicketKeys *tickets;     /* NULL: TicketKeySec=0, no resumption */
        char *tickets_path;      /* StateDirectory/ticket-keys */
        sd_event_source *tickets_timer;
        bool listener_nodelay;
        bool coap_started;      /* coap_startup() was called */
        bool listener_pausable; /* every shard's listener can be paused */
        bool listener_paused;
        /* HandshakeThreads=: the listening socket and the threads accepting
         * from it, which hand connections to the shards in turn. */
        Handshakes *handshakes;
        int hs_listen_fd;
        unsigned handoff_next; /* atomic */
        sd_event_source *kick, *close_defer;

        Device **dev_buckets;
        size_t dev_nbuckets, n_devices;
        Device *dev_head, *dev_tail;
        /* Every device in the order first seen (devices live until
         * devices_free()): a page of the listing is a slice of it. */
        Device **dev_order;
        size_t dev_order_cap;
        unsigned n_online;

        Session **conn_buckets;
        size_t conn_nbuckets, n_conns;
        Session *close_queue;

        /* Sessions without a device yet, oldest first, for HandshakeTimeoutSec
         * and MaxHandshakes. */
        Session *unbound_head, *unbound_tail;
        size_t n_unbound;
        sd_event_source *handshake_timer;
        sd_event_source *admission_timer; /* when the oldest may be displaced */
        sd_event_source *expiry_timer;    /* closes sessions whose certificate expired */
        sd_event_source *trim_timer;      /* devices_trim_cb() */
        uint64_t churn;                   /* sessions bound or freed, ever */
        uint64_t churn_seen, churn_trimmed;
        size_t n_enrolling;               /* enrollment sessions open */
        uint64_t bind_usec_avg;           /* accept to bound, recent devices */
        WarnLimit warn_handshake_timeout, warn_handshake_full, warn_handshake_evicted;
        pthread_mutex_t refusal_lock; /* the handshake threads log refusals too */
        RefusalSlot refusals[DEVICES_REFUSAL_SLOTS];
        uint64_t refusal_window, refusal_logged, refusal_unlogged;
        uint64_t hard_queue_limit; /* unread bytes at which a device is dropped */

        uint64_t next_token;

        /* Describe documents, one copy per distinct content. */
        Describe **describe_buckets;
        size_t describe_nbuckets, n_describes;
};

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

/* ---- describe documents, shared between devices ----------------------- */

/* A fleet runs few distinct agent setups, so most devices send the same
 * describe document: devices whose documents are equal (same JSON, keys
 * sorted) share one parsed copy, counted here. */
struct Describe {
        json_t *doc;
        char *key; /* the compact, key-sorted text */
        uint64_t hash;
        size_t users;
        Describe *next;
};

static int describe_table_grow(Devices *devs) {
        size_t n = devs->describe_nbuckets ? devs->describe_nbuckets * 2 : 16;
        Describe **b = calloc(n, sizeof(*b));

        if (!b)
                return -ENOMEM;
        for (size_t i = 0; i < devs->describe_nbuckets; i++)
                for (Describe *ds = devs->describe_buckets[i], *next; ds; ds = next) {
                        next = ds->next;
                        ds->next = b[ds->hash & (n - 1)];
                        b[ds->hash & (n - 1)] = ds;
                }
        free(devs->describe_buckets);
        devs->describe_buckets = b;
        devs->describe_nbuckets = n;
        return 0;
}

/* The shared copy of doc (taken, also on failure); NULL on OOM. */
static Describe *describe_intern(Devices *devs, json_t *doc) {
        _cleanup_free_ char *key = json_dumps(doc, JSON_COMPACT | JSON_SORT_KEYS);
        Describe *ds;
        uint64_t h;

        if (!key || (devs->n_describes >= devs->describe_nbuckets && describe_table_grow(devs) < 0)) {
                json_decref(doc);
                return NULL;
        }
        h = hash_string(key);
        for (ds = devs->describe_buckets[h & (devs->describe_nbuckets - 1)]; ds; ds = ds->next)
                if (ds->hash == h && streq(ds->key, key)) {
                        json_decref(doc);
                        ds->users++;
                        return ds;
                }
        ds = calloc(1, sizeof(*ds));
        if (!ds) {
                json_decref(doc);
                return NULL;
        }
        *ds = (Describe){ .doc = doc, .key = TAKE_PTR(key), .hash = h, .users = 1 };
        ds->next = devs->describe_buckets[h & (devs->describe_nbuckets - 1)];
        devs->describe_buckets[h & (devs->describe_nbuckets - 1)] = ds;
        devs->n_describes++;
        return ds;
}

static void describe_release(Devices *devs, Describe *ds) {
        Describe **p;

        if (!ds || --ds->users > 0)
                return;
        for (p = &devs->describe_buckets[ds->hash & (devs->describe_nbuckets - 1)]; *p != ds; p = &(*p)->next)
                ;
        *p = ds->next;
        devs->n_describes--;
        json_decref(ds->doc);
        free(ds->key);
        free(ds);
}

/* ---- registry: devices by id, connections by session ----------------- */

static int dev_table_grow(Devices *devs) {
        size_t n = devs->dev_nbuckets ? devs->dev_nbuckets * 2 : 64;
        Device **b = calloc(n, sizeof(*b));

        if (!b)
                return -ENOMEM;
        for (Device *d = devs->dev_head; d; d = d->list_next) {
                size_t i = hash_string(d->id) & (n - 1);
                d->hash_next = b[i];
                b[i] = d;
        }
        free(devs->dev_buckets);
        devs->dev_buckets = b;
        devs->dev_nbuckets = n;
        return 0;
}

Device *devices_find(Devices *devs, const char *id) {
        if (!id || devs->dev_nbuckets == 0)
                return NULL;
        for (Device *d = devs->dev_buckets[hash_string(id) & (devs->dev_nbuckets - 1)]; d;
             d = d->hash_next)
                if (streq(d->id, id))
                        return d;
        return NULL;
}

static Device *device_new(Devices *devs, const char *id) {
        Device *d;
        size_t i;

        if (devs->n_devices >= devs->dev_nbuckets && dev_table_grow(devs) < 0)
                return NULL;
        if (devs->n_devices >= devs->dev_order_cap) {
                size_t cap = devs->dev_order_cap ? devs->dev_order_cap * 2 : 64;
                Device **o = reallocarray(devs->dev_order, cap, sizeof(*o));

                if (!o)
                        return NULL;
                devs->dev_order = o;
                devs->dev_order_cap = cap;
        }
        d = calloc(1, sizeof(*d));
        if (!d)
                return NULL;
        d->devices = devs;
        d->id = strdup(id);
        if (!d->id) {
                free(d);
                return NULL;
        }
        i = hash_string(id) & (devs->dev_nbuckets - 1);
        d->hash_next = devs->dev_buckets[i];
        devs->dev_buckets[i] = d;
        if (devs->dev_tail)
                devs->dev_tail->list_next = d;
        else
                devs->dev_head = d;
        devs->dev_tail = d;
        devs->dev_order[devs->n_devices++] = d;
        return d;
}

Device *devices_add(Devices *devs, const char *id, uint64_t last_heard_usec, const char *last_ip) {
        Device *d = devices_find(devs, id);

        if (d)
                return d;
        d = device_new(devs, id);
        if (!d)
                return NULL;
        d->last_heard = last_heard_usec;
        if (last_ip)
                snprintf(d->last_ip, sizeof(d->last_ip), "%s", last_ip);
        return d;
}

static int session_table_grow(Devices *devs) {
        size_t n = devs->conn_nbuckets ? devs->conn_nbuckets * 2 : 64;
        Session **b = calloc(n, sizeof(*b));

        if (!b)
                return -ENOMEM;
        for (size_t k = 0; k < devs->conn_nbuckets; k++) {
                Session *c = devs->conn_buckets[k], *next;
                for (; c; c = next) {
                        size_t i = hash_pointer(c->session) & (n - 1);
                        next = c->hash_next;
                        c->hash_next = b[i];
                        b[i] = c;
                }
        }
        free(devs->conn_buckets);
        devs->conn_buckets = b;
        devs->conn_nbuckets = n;
        return 0;
}

static Session *session_find(Devices *devs, const coap_session_t *session) {
        if (devs->conn_nbuckets == 0)
                return NULL;
        for (Session *c = devs->conn_buckets[hash_pointer(session) & (devs->conn_nbuckets - 1)]; c;
             c = c->hash_next)
                if (c->session == session)
                        return c;
        return NULL;
}

static Session *session_new(Devices *devs, Shard *shard, coap_session_t *session) {
        Session *c;
        size_t i;

        if (devs->n_conns >= devs->conn_nbuckets && session_table_grow(devs) < 0)
                return NULL;
        c = calloc(1, sizeof(*c));
        if (!c)
                return NULL;
        c->devices = devs;
        c->shard = shard;
        c->session = session;
        i = hash_pointer(session) & (devs->conn_nbuckets - 1);
        c->hash_next = devs->conn_buckets[i];
        devs->conn_buckets[i] = c;
        devs->n_conns++;
        shard->n_sessions++;
        stats_shard_sessions(shard->index, 1);
        return c;
}

/* Stop (paused=true) or resume accepting on every shard's listener. On a
 * failure to pause, all are resumed again. 0 or -errno. */
static int devices_listeners_pause(Devices *devs, bool paused) {
        int r = 0;

        for (unsigned i = 0; i < devs->n_shards; i++) {
                int k = listener_pause_set(&devs->shards[i].listener, paused);

                if (k < 0 && r == 0)
                        r = k;
        }
        if (r < 0 && paused) {
                for (unsigned i = 0; i < devs->n_shards; i++)
                        (void)listener_pause_set(&devs->shards[i].listener, false);
                paused = false;
        }
        devs->listener_paused = paused;
        return r;
}

static void session_unbound_remove(Session *c) {
        Devices *devs = c->devices;
        if (!c->unbound)
                return;
        if (c->unbound_prev)
                c->unbound_prev->unbound_next = c->unbound_next;
        else
                devs->unbound_head = c->unbound_next;
        if (c->unbound_next)
                c->unbound_next->unbound_prev = c->unbound_prev;
        else
                devs->unbound_tail = c->unbound_prev;
        c->unbound_prev = c->unbound_next = NULL;
        c->unbound = false;
        devs->n_unbound--;
        if (devs->listener_paused && devs->n_unbound < devs->config->max_handshakes) {
                (void)devices_listeners_pause(devs, false);
                (void)sd_event_source_set_enabled(devs->admission_timer, SD_EVENT_OFF);
        }
}

static void session_unbound_add(Session *c) {
        Devices *devs = c->devices;
        /* Set already for a connection a handshake thread accepted. */
        if (!c->accepted)
                c->accepted = now_usec();
        c->unbound = true;
        c->unbound_prev = devs->unbound_tail;
        if (devs->unbound_tail)
                devs->unbound_tail->unbound_next = c;
        else
                devs->unbound_head = c;
        devs->unbound_tail = c;
        devs->n_unbound++;
}

/* ---- Handing freed memory back ----
 *
 * A TLS handshake allocates several times what its connection keeps
 * (OpenSSL's handshake buffers, key shares, certificate parsing), and in a
 * storm thousands of them interleave: once it is over, the long-lived
 * connections sit among free chunks that glibc keeps, so the process
 * holds megabytes it no longer uses (measured: docs/design/benchmarks.md,
 * "Memory per device"). Once connections have stopped coming and going
 * for DEVICES_TRIM_QUIET_SEC, after at least DEVICES_TRIM_MIN_CHURN of
 * them, malloc_trim() gives the free pages of every arena back. Never
 * while a storm goes on, at most once per quiet spell. */
#define DEVICES_TRIM_QUIET_SEC 2
#define DEVICES_TRIM_MIN_CHURN 64

static void devices_churn(Devices *devs) {
        int on = SD_EVENT_OFF;

        devs->churn++;
        if (!devs->trim_timer || sd_event_source_get_enabled(devs->trim_timer, &on) < 0 || on != SD_EVENT_OFF)
                return;
        devs->churn_seen = devs->churn;
        if (sd_event_source_set_time_relative(devs->trim_timer, DEVICES_TRIM_QUIET_SEC * USEC_PER_SEC) >= 0)
                (void)sd_event_source_set_enabled(devs->trim_timer, SD_EVENT_ONESHOT);
}

static int devices_trim_cb(sd_event_source *s, uint64_t usec, void *userdata) {
        Devices *devs = userdata;
        uint64_t t0, n;
        int released;

        if (devs->churn != devs->churn_seen) {
                /* Still coming and going: look again after a quiet spell. */
                devs->churn_seen = devs->churn;
                if (sd_event_source_set_time_relative(s, DEVICES_TRIM_QUIET_SEC * USEC_PER_SEC) >= 0)
                        (void)sd_event_source_set_enabled(s, SD_EVENT_ONESHOT);
                return 0;
        }
        n = devs->churn - devs->churn_trimmed;
        if (n < DEVICES_TRIM_MIN_CHURN)
                return 0;
        devs->churn_trimmed = devs->churn;
        t0 = (uint64_t)now_usec();
        released = malloc_trim(0);
        stats_memory_trim();
        t0 = (uint64_t)now_usec() - t0;
        /* Said where operators look when it held the loop up noticeably. */
        log_internal(t0 >= 50 * USEC_PER_MSEC ? LOG_INFO : LOG_DEBUG, 0,
                     "Handed the heap's free memory back to the system after %" PRIu64 " connections came or "
                     "went (%s, %" PRIu64 " ms).", n, released ? "some released" : "nothing to release",
                     t0 / (uint64_t)USEC_PER_MSEC);
        return 0;
}

/* Unlink and free; the caller has dealt with the session reference. */
static void session_free(Session *c) {
        Devices *devs;
        Session **p;

        if (!c)
                return;
        devs = c->devices;
        session_unbound_remove(c);
        if (c->anonymous) {
                devs->n_enrolling--;
                stats_enrollment_sessions(-1);
        }
        if (c->contends) {
                /* The check goes on: a session that does not answer it is
                 * closed even when its contender is gone. */
                c->contends->contender = NULL;
                c->contends = NULL;
        }
        for (p = &devs->conn_buckets[hash_pointer(c->session) & (devs->conn_nbuckets - 1)]; *p;
             p = &(*p)->hash_next)
                if (*p == c) {
                        *p = c->hash_next;
                        break;
                }
        if (c->closing)
                for (p = &devs->close_queue; *p; p = &(*p)->close_next)
                        if (*p == c) {
                                *p = c->close_next;
                                break;
                        }
        devs->n_conns--;
        c->shard->n_sessions--;
        stats_shard_sessions(c->shard->index, -1);
        free(c);
        devices_churn(devs);
}

int device_restore_describe(Device *d, const char *doc) {
        Devices *devs = d->devices;
        json_t *j = NULL;
        Describe *ds;
        int r;

        r = proto_describe_decode((const uint8_t *)doc, strlen(doc), &j);
        if (r < 0)
                return r;
        ds = describe_intern(devs, j);
        if (!ds)
                return -ENOMEM;
        describe_release(devs, d->describe);
        d->describe = ds;
        return 0;
}

const char *device_id(const Device *d) { return d->id; }

uint64_t device_last_heard(const Device *d) { return d->last_heard; }

const char *device_last_ip(const Device *d) { return d->last_ip; }

bool device_connected(const Device *d) { return d->conn != NULL; }

coap_session_t *device_session(const Device *d) {
        if (!d->conn || coap_session_get_state(d->conn->session) != COAP_SESSION_STATE_ESTABLISHED)
                return NULL;
        return d->conn->session;
}

unsigned devices_online_count(Devices *devs) { return devs->n_online; }

json_t *device_to_json(const Device *d, bool details) {
        char heard[32];
        json_t *j;

        format_timestamp(d->last_heard, heard);
        /* A device known from the registry may never have been heard. */
        j = json_pack("{s:s, s:s, s:n, s:s?, s:s?, s:i, s:b, s:b, s:i, s:b, s:n, s:s}", "id", d->id, "name", d->id,
                      "last_app", "last_ip_address", d->last_ip[0] ? d->last_ip : NULL, "last_heard",
                      d->last_heard ? heard : NULL,
                      "product_id", 0, "online", d->conn || d->elsewhere, "connected", d->conn || d->elsewhere,
                      "platform_id", 0, "cellular", 0, "notes", "status", "normal");
        if (!j)
                return NULL;
        /* What the agent runs on (its describe document's "system",
         * checked by proto_describe_decode()), null until it said. */
        {
                json_t *sys = d->describe ? json_object_get(d->describe->doc, "system") : NULL;

                if (json_object_set_new(j, "system", sys ? json_deep_copy(sys) : json_null()) < 0) {
                        json_decref(j);
                        return NULL;
                }
        }
        if (!details)
                return j;
        {
                json_t *doc = d->describe ? d->describe->doc : NULL;
                json_t *f = doc ? json_object_get(doc, "functions") : NULL;
                json_t *v = doc ? json_object_get(doc, "variables") : NULL;
                json_t *u = doc ? json_object_get(doc, "units") : NULL;

                if (json_object_set_new(j, "functions", f ? json_deep_copy(f) : json_array()) < 0 ||
                    json_object_set_new(j, "variables", v ? json_deep_copy(v) : json_object()) < 0 ||
                    (u && json_object_set_new(j, "units", json_deep_copy(u)) < 0)) {
                        json_decref(j);
                        return NULL;
                }
        }
        return j;
}

int device_set_elsewhere(Device *d, const char *node) {
        char *n = NULL;

        if (node && d->elsewhere && streq(node, d->elsewhere))
                return 0;
        if (node && !(n = strdup(node)))
                return -ENOMEM;
        free(d->elsewhere);
        d->elsewhere = n;
        return 0;
}

const char *device_elsewhere(const Device *d) { return d->elsewhere; }

json_t *devices_to_json(Devices *devs) {
        json_t *a = json_array();

        if (!a)
                return NULL;
        for (Device *d = devs->dev_head; d; d = d->list_next)
                if (json_array_append_new(a, device_to_json(d, false)) < 0) {
                        json_decref(a);
                        return NULL;
                }
        return a;
}

size_t devices_count(Devices *devs) { return devs->n_devices; }

Device *devices_at(Devices *devs, size_t i) { return i < devs->n_devices ? devs->dev_order[i] : NULL; }

json_t *devices_page_to_json(Devices *devs, size_t offset, size_t limit) {
        json_t *a = json_array();

        if (!a)
                return NULL;
        for (size_t i = offset; i < devs->n_devices && i - offset < limit; i++)
                if (json_array_append_new(a, device_to_json(devs->dev_order[i], false)) < 0) {
                        json_decref(a);
                        return NULL;
                }
        return a;
}

/* ---- the libcoap loop on sd-event ------------------------------------ */

/* libcoap's coap_io_process() starts with coap_io_prepare_epoll(), which
 * walks every session of the context (idle timeouts, freeing closed
 * sessions, block-transfer timers) before it looks at the one socket that
 * is ready: with 10,000 sessions that walk, not the request, was most of
 * the cost of a call (docs/design/libcoap.md, "The session scan"). So the
 * cloud drives the two halves itself, for each shard: I/O is dispatched with
 * coap_io_do_epoll() on exactly the sockets epoll reports, and the walk
 * (the "scan") runs when libcoap's own timer asks for it, or once after
 * activity, but at most every DEVICES_SCAN_INTERVAL. coap_io_do_epoll()
 * still ends with the same walk of its own context on every call, which
 * is why sessions are spread over shards. Nothing the scan does
 * for a TLS-over-TCP server is urgent: TCP has no retransmissions, closed
 * sessions are only freed a little later, and idle timeouts are seconds. */
#define DEVICES_SCAN_INTERVAL (100 * USEC_PER_MSEC)
/* One dispatch of a shard stops after DEVICES_DISPATCH_USEC: a request
 * on a session can cost a millisecond or more (a handshake, a renewal's
 * signature), and during a wave of them the loop's other sources (the
 * HTTP API and its answers, the other shards) get their turn in between.
 * It takes what epoll reports DEVICES_EPOLL_FIRST sockets at a time, twice
 * as many each time (up to DEVICES_EPOLL_BATCH) while that went quickly:
 * every coap_io_do_epoll() ends with the walk, so cheap requests are
 * handed over in large batches, costly ones in small ones. libcoap's
 * epoll is level-triggered: what is left is reported again, and the
 * shard's source is pending again at the next turn of the loop. */
#define DEVICES_EPOLL_FIRST 8
#define DEVICES_EPOLL_BATCH 64
#define DEVICES_DISPATCH_USEC (4 * USEC_PER_MSEC)

/* coap_io_do_epoll() ends with coap_io_prepare_epoll(), the walk above,
 * on every call: with 10,000 sessions over 16 shards that walk was a
 * quarter of the cloud's CPU while it served calls. libcoap calls it
 * through its PLT, like any function it exports, so the definition below,
 * in the program, is the one the dynamic linker binds that call to (as
 * lib/tls-framing.c does for SSL_read()). While a shard is dispatched it
 * returns at once: the walk then runs only from shard_scan(), which calls
 * libcoap's own, after activity (at most every DEVICES_SCAN_INTERVAL) and
 * when libcoap's timerfd fires. Any other caller gets libcoap's. */
typedef unsigned int (*PrepareEpollFn)(coap_context_t *ctx, coap_tick_t now);
static bool devices_dispatching;
/* The shard coap_io_do_epoll() runs for, on the loop's thread (accept()). */
static _Thread_local Shard *dispatching_shard;
/* What accept() below handed to libcoap, for COAP_EVENT_SERVER_SESSION_NEW. */
static _Thread_local uint64_t adopted_accepted;

static PrepareEpollFn libcoap_prepare_epoll(void) {
        static PrepareEpollFn fn;

        if (!fn) {
                *(void **)&fn = dlsym(RTLD_NEXT, "coap_io_prepare_epoll");
                /* libcoap linked in statically: ours is not defined then. */
                if (!fn) {
                        log_error("libcoap's coap_io_prepare_epoll() is not found: %s", dlerror());
                        abort();
                }
        }
        return fn;
}

__attribute__((visibility("default"))) unsigned int coap_io_prepare_epoll(coap_context_t *ctx, coap_tick_t now) {
        if (devices_dispatching) {
                stats_session_walk(true);
                return 0;
        }
        return libcoap_prepare_epoll()(ctx, now);
}

/* ---- Handshakes on threads (HandshakeThreads=) ----
 *
 * A handshake thread (cloud/handshakes.c) hands a finished connection to
 * the shards in turn: it queues it and makes the shard's eventfd, which
 * stands in libcoap's epoll set where its endpoint's listening socket
 * was, readable. libcoap then calls accept() on it, which this program
 * defines (libcoap calls it through its PLT, as coap_io_prepare_epoll()
 * above): for that eventfd, during that shard's dispatch, it returns the
 * queued socket and has lib/tls.c give libcoap the finished SSL at its
 * next SSL_new() (tls_adopt_next()); libcoap's SSL_accept() on it
 * returns at once and the session is connected (docs/design/libcoap.md,
 * "Handshakes on threads"). Any other accept() is libc's. */

static void devices_log_refusal(Devices *devs, const char *ip, const char *addr, const TlsPeer *peer,
                                const char *verify);

static int devices_handoff(void *userdata, int fd, SSL *ssl, const struct sockaddr_storage *peer,
                           socklen_t peer_len, uint64_t accepted) {
        Devices *devs = userdata;
        unsigned i = __atomic_fetch_add(&devs->handoff_next, 1, __ATOMIC_RELAXED) % devs->n_shards;
        Shard *sh = &devs->shards[i];
        Handoff *o = calloc(1, sizeof(*o));

        if (!o) {
                log_error("Out of memory handing a device connection on.");
                return -ENOMEM;
        }
        *o = (Handoff){ .fd = fd, .ssl = ssl, .accepted = accepted, .peer = *peer, .peer_len = peer_len };
        pthread_mutex_lock(&sh->handoff_lock);
        if (sh->handoff_tail)
                sh->handoff_tail->next = o;
        else {
                sh->handoff_head = o;
                (void)eventfd_write(sh->listener.fd, 1);
        }
        sh->handoff_tail = o;
        pthread_mutex_unlock(&sh->handoff_lock);
        return 0;
}

static void devices_handshake_refused(void *userdata, const struct sockaddr_storage *peer, socklen_t peer_len,
                                      const TlsPeer *p, const char *verify_error) {
        Devices *devs = userdata;
        char ip[INET6_ADDRSTRLEN], addr[INET6_ADDRSTRLEN + 8];
        coap_address_t a;

        coap_address_init(&a);
        memcpy(&a.addr, peer, MIN((size_t)peer_len, sizeof(a.addr)));
        a.size = peer_len;
        format_address(&a, ip, addr);
        devices_log_refusal(devs, ip, addr, p, verify_error);
}

/* The next queued connection of sh, or NULL (the eventfd is then reset). */
static Handoff *shard_handoff_pop(Shard *sh) {
        Handoff *o;
        eventfd_t v;

        pthread_mutex_lock(&sh->handoff_lock);
        o = sh->handoff_head;
        if (o) {
                sh->handoff_head = o->next;
                if (!sh->handoff_head)
                        sh->handoff_tail = NULL;
        }
        if (!sh->handoff_head)
                (void)eventfd_read(sh->listener.fd, &v);
        pthread_mutex_unlock(&sh->handoff_lock);
        return o;
}

/* An SSL handed in by accept() that libcoap's SSL_new() did not take
 * (libcoap failed in between): free it; libcoap closed the socket, and
 * accept() already counted it as adopted. */
static void shard_adopt_cancel(void) {
        SSL_free(tls_adopt_cancel());
        adopted_accepted = 0;
}

typedef int (*AcceptFn)(int, __SOCKADDR_ARG, socklen_t *__restrict);

__attribute__((visibility("default"))) int accept(int fd, __SOCKADDR_ARG addr, socklen_t *__restrict len) {
        static AcceptFn libc_fn;
        AcceptFn fn = __atomic_load_n(&libc_fn, __ATOMIC_RELAXED);
        Shard *sh = dispatching_shard;

        if (sh && sh->devices->handshakes && fd == sh->listener.fd) {
                Handoff *o = shard_handoff_pop(sh);
                int r;

                if (!o) {
                        errno = EAGAIN;
                        return -1;
                }
                if (addr.__sockaddr__ && len) {
                        memcpy(addr.__sockaddr__, &o->peer, MIN((size_t)*len, (size_t)o->peer_len));
                        *len = o->peer_len;
                }
                /* Taken by libcoap's SSL_new() for this connection, or
                 * freed after the dispatch (shard_adopt_cancel()). */
                tls_adopt_next(o->ssl);
                adopted_accepted = o->accepted;
                handshakes_adopted(sh->devices->handshakes);
                r = o->fd;
                free(o);
                return r;
        }
        if (!fn) {
                *(void **)&fn = dlsym(RTLD_NEXT, "accept");
                if (!fn) {
                        errno = ENOSYS;
                        return -1;
                }
                __atomic_store_n(&libc_fn, fn, __ATOMIC_RELAXED);
        }
        return fn(fd, addr, len);
}

static void shard_scan(Shard *sh) {
        coap_tick_t now;
        unsigned ms;

        coap_ticks(&now);
        ms = libcoap_prepare_epoll()(sh->ctx, now);
        stats_session_walk(false);
        sh->last_scan = now_usec();
        /* libcoap armed its timerfd (in the epoll set we watch) for ms;
         * our timer is a backstop for that wakeup. */
        if (ms > 0) {
                (void)sd_event_source_set_time(sh->timer, sh->last_scan + (uint64_t)ms * USEC_PER_MSEC);
                (void)sd_event_source_set_enabled(sh->timer, SD_EVENT_ONESHOT);
        } else
                (void)sd_event_source_set_enabled(sh->timer, SD_EVENT_OFF);
}

/* Scan now if the last one is old enough, else arm the timer for when it is. */
static void shard_scan_soon(Shard *sh) {
        uint64_t now = now_usec(), at = sh->last_scan + DEVICES_SCAN_INTERVAL, cur;
        int enabled = SD_EVENT_OFF;

        if (now >= at) {
                shard_scan(sh);
                return;
        }
        (void)sd_event_source_get_enabled(sh->timer, &enabled);
        if (enabled != SD_EVENT_OFF && sd_event_source_get_time(sh->timer, &cur) >= 0 && cur <= at)
                return;
        (void)sd_event_source_set_time(sh->timer, at);
        (void)sd_event_source_set_enabled(sh->timer, SD_EVENT_ONESHOT);
}

/* Dispatch what epoll reports ready on the shard, without waiting, for
 * about DEVICES_DISPATCH_USEC at most. */
static void shard_dispatch(Shard *sh) {
        struct epoll_event events[DEVICES_EPOLL_BATCH];
        int fd = coap_context_get_coap_fd(sh->ctx), n, max = DEVICES_EPOLL_FIRST;
        uint64_t start = now_usec(), spent;
        bool activity = false;

        for (;;) {
                n = epoll_wait(fd, events, max, 0);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0) {
                        log_warning_errno(errno, "epoll_wait() on libcoap's descriptor failed: %m");
                        break;
                }
                if (n > 0) {
                        /* A NULL pointer is libcoap's timerfd: a scan is asked for. */
                        activity = true;
                        devices_dispatching = true;
                        dispatching_shard = sh;
                        coap_io_do_epoll(sh->ctx, events, (size_t)n);
                        dispatching_shard = NULL;
                        devices_dispatching = false;
                        shard_adopt_cancel();
                }
                if (n < max)
                        break;
                spent = now_usec() - start;
                if (spent >= DEVICES_DISPATCH_USEC)
                        break;
                if (max < DEVICES_EPOLL_BATCH && spent < DEVICES_DISPATCH_USEC / 4)
                        max *= 2;
        }
        /* A scan already due has its timer armed (shard_scan_soon()). */
        if (activity)
                shard_scan_soon(sh);
}

static int shard_io_cb(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        shard_dispatch(userdata);
        return 0;
}

static int shard_timer_cb(sd_event_source *s, uint64_t usec, void *userdata) {
        Shard *sh = userdata;

        shard_dispatch(sh);
        shard_scan_soon(sh);
        return 0;
}

static int devices_kick_cb(sd_event_source *s, void *userdata) {
        Devices *devs = userdata;

        for (unsigned i = 0; i < devs->n_shards; i++)
                if (devs->shards[i].kick_due) {
                        devs->shards[i].kick_due = false;
                        shard_dispatch(&devs->shards[i]);
                }
        return 0;
}

/* Dispatch the shard once the current handler returns: what was queued
 * outside libcoap's own loop gets written. */
static void shard_kick(Shard *sh) {
        Devices *devs = sh->devices;

        sh->kick_due = true;
        if (devs->kick)
                (void)sd_event_source_set_enabled(devs->kick, SD_EVENT_ONESHOT);
}

/* ---- what a device has read, and whether it is alive -------------------- */

static void devices_notify_status(Devices *devs, const char *key, const char *id) {
        (void)sd_notifyf(0, "STATUS=%u devices online\n%s=%s", devs->n_online, key, id);
}

/* One warning per DEVICES_WARN_INTERVAL; *ret_suppressed is how many were
 * not logged since the last one. */
static bool warn_limit(WarnLimit *w, uint64_t *ret_suppressed) {
        uint64_t now = now_usec();

        if (w->last != 0 && now < w->last + DEVICES_WARN_INTERVAL) {
                w->suppressed++;
                return false;
        }
        w->last = now;
        *ret_suppressed = w->suppressed;
        w->suppressed = 0;
        return true;
}

static uint64_t device_unread(const Device *d) {
        return d->tx_bytes - d->tx_read;
}

/* Any message: for "last_heard" only, not proof that the device reads. */
static void device_heard(Device *d) {
        d->last_heard = realtime_usec();
}

/* Decide a running liveness check (device_check_cb()) from the loop, now. */
static void device_check_soon(Device *d) {
        if (!d->check_timer)
                return;
        (void)sd_event_source_set_time(d->check_timer, 0);
        (void)sd_event_source_set_enabled(d->check_timer, SD_EVENT_ONESHOT);
}

/* A Pong to our Ping or an answer to our request: the device is alive
 * and has read every byte up to mark. */
static void device_alive(Device *d, uint64_t mark) {
        Devices *devs = d->devices;
        d->last_alive = now_usec();
        device_heard(d);
        if (d->check_since)
                device_check_soon(d);
        if (mark > d->tx_read)
                d->tx_read = mark;
        if (d->dropped_events > 0 && device_unread(d) < devs->config->max_queued_bytes) {
                log_info("Device '%s' reads again; %" PRIu64 " events were not delivered to it.", d->id,
                         d->dropped_events);
                d->dropped_events = 0;
        }
}

static void device_arm_ping(Device *d) {
        Devices *devs = d->devices;
        uint64_t deadline = d->last_alive + (uint64_t)devs->config->device_timeout_sec * USEC_PER_SEC;
        uint64_t next = d->ping_outstanding || d->next_ping > deadline ? deadline : d->next_ping;

        (void)sd_event_source_set_time(d->ping_timer, next);
        (void)sd_event_source_set_enabled(d->ping_timer, SD_EVENT_ONESHOT);
}

/* Ping unless a Ping is in flight: its Pong proves that the device has read
 * everything sent before it. Not from within a libcoap callback for the
 * device's own session. */
static void device_ping(Device *d) {
        Devices *devs = d->devices;
        coap_session_t *session = device_session(d);
        Shard *sh;

        if (d->ping_outstanding || !session)
                return;
        sh = d->conn->shard;
        d->next_ping = now_usec() + (uint64_t)devs->config->ping_sec * USEC_PER_SEC;
        d->tx_bytes += DEVICES_MSG_OVERHEAD;
        if (coap_session_send_ping(session) != COAP_INVALID_MID && d->conn) {
                d->ping_mark = d->tx_bytes;
                d->ping_outstanding = true;
        }
        if (d->conn)
                device_arm_ping(d);
        shard_kick(sh);
}

/* Count a message of n payload bytes just queued for the device; returns
 * the count up to and including it. Asks for proof of reading at half of
 * MaxQueuedBytes, so that a device that reads is never held back. */
static uint64_t device_account(Device *d, size_t n) {
        Devices *devs = d->devices;
        uint64_t mark;

        d->tx_bytes += n + DEVICES_MSG_OVERHEAD;
        mark = d->tx_bytes;
        if (device_unread(d) >= devs->config->max_queued_bytes / 2)
                device_ping(d);
        return mark;
}

static int device_send_pdu(Device *d, coap_pdu_t *pdu, size_t len, uint64_t *ret_mark) {
        Devices *devs = d->devices;
        coap_session_t *session = device_session(d);
        uint64_t mark;
        Shard *sh;

        if (!session) {
                coap_delete_pdu(pdu);
                return -ENOTCONN;
        }
        sh = d->conn->shard;
        if (device_unread(d) >= devs->config->max_queued_bytes) {
                coap_delete_pdu(pdu);
                return -ENOBUFS;
        }
        if (coap_send(session, pdu) == COAP_INVALID_MID) {
                shard_kick(sh);
                return -EIO;
        }
        mark = device_account(d, len);
        shard_kick(sh);
        if (ret_mark)
                *ret_mark = mark;
        return 0;
}

int device_notify(Device *d, const uint8_t *token, size_t token_len, uint32_t observe, const char *json,
                  size_t len) {
        coap_session_t *session = device_session(d);
        uint8_t buf[4];
        coap_pdu_t *pdu;

        if (!session)
                return -ENOTCONN;
        pdu = coap_pdu_init(COAP_MESSAGE_NON, COAP_RESPONSE_CODE(205), coap_new_message_id(session),
                            coap_session_max_pdu_size(session));
        if (!pdu)
                return -ENOMEM;
        if (!coap_add_token(pdu, token_len, token) ||
            !coap_add_option(pdu, COAP_OPTION_OBSERVE, coap_encode_var_safe(buf, sizeof(buf), observe), buf) ||
            !coap_add_option(pdu, COAP_OPTION_CONTENT_FORMAT,
                             coap_encode_var_safe(buf, sizeof(buf), PROTO_CF_JSON), buf) ||
            !coap_add_data(pdu, len, (const uint8_t *)json)) {
                coap_delete_pdu(pdu);
                return -E2BIG;
        }
        return device_send_pdu(d, pdu, len, NULL);
}

void device_event_undeliverable(Device *d, const char *name, size_t len, int error) {
        Devices *devs = d->devices;
        coap_session_t *session = device_session(d);

        stats_event_undeliverable(error);
        switch (error) {
        case -ENOBUFS:
                if (d->dropped_events++ == 0)
                        log_warning("Device '%s' has not read %" PRIu64 " bytes sent to it (MaxQueuedBytes=%u): "
                                    "events for it are dropped until it reads.",
                                    d->id, device_unread(d), devs->config->max_queued_bytes);
                break;
        case -E2BIG:
                if (d->warned_too_big)
                        break;
                d->warned_too_big = true;
                log_warning("Device '%s' takes messages of at most %zu bytes (its Max-Message-Size): event '%s' "
                            "(%zu bytes) and other events too large for it are not delivered to it.",
                            d->id, session ? coap_session_max_pdu_size(session) : 0, name, len);
                break;
        default:
                log_warning_errno(error, "Failed to deliver event '%s' to device '%s': %m", name, d->id);
        }
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
        return devices_request(d, method, path0, name, NULL, -1, payload, len, cb, userdata, ret_call);
}

static bool devices_add_query(coap_pdu_t *pdu, const char *const *query) {
        for (size_t i = 0; query && query[i]; i++) {
                size_t n = strlen(query[i]);

                if (n > 255 || !coap_add_option(pdu, COAP_OPTION_URI_QUERY, n, (const uint8_t *)query[i]))
                        return false;
        }
        return true;
}

int devices_request(Device *d, coap_pdu_code_t method, const char *path0, const char *name,
                    const char *const *query, int cf, const void *payload, size_t len, device_call_fn cb,
                    void *userdata, DeviceCall **ret_call) {
        uint8_t cfbuf[4];
        Devices *devs = d->devices;
        coap_session_t *session = device_session(d);
        Session *conn = d->conn;
        uint8_t token[8];
        size_t token_len;
        DeviceCall *c;
        coap_pdu_t *pdu;
        int r;

        if (!session)
                return -ENOTCONN;
        if (device_unread(d) >= devs->config->max_queued_bytes)
                return -ENOBUFS;
        c = calloc(1, sizeof(*c));
        if (!c)
                return -ENOMEM;
        c->device = d;
        c->cb = cb;
        c->userdata = userdata;
        c->token = ++devs->next_token;
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
            (cf >= 0 && !coap_add_option(pdu, COAP_OPTION_CONTENT_FORMAT,
                                         coap_encode_var_safe(cfbuf, sizeof(cfbuf), (unsigned)cf), cfbuf)) ||
            !devices_add_query(pdu, query) || (len > 0 && !coap_add_data(pdu, len, payload))) {
                coap_delete_pdu(pdu);
                free(c);
                return -E2BIG;
        }
        r = sd_event_add_time_relative(devs->event, &c->timer, CLOCK_MONOTONIC,
                                       (uint64_t)devs->config->call_timeout_sec * USEC_PER_SEC,
                                       10 * USEC_PER_MSEC, call_timeout_cb, c);
        if (r < 0) {
                coap_delete_pdu(pdu);
                free(c);
                return r;
        }
        r = device_send_pdu(d, pdu, len, &c->tx_mark);
        /* A failed write may have closed the session inside coap_send(). */
        if (r >= 0 && d->conn != conn)
                r = -ENOTCONN;
        if (r < 0) {
                sd_event_source_disable_unref(c->timer);
                free(c);
                return r;
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

static void session_queue_close(Session *c) {
        Devices *devs = c->devices;
        if (c->closing)
                return;
        c->closing = true;
        c->settled = true;
        c->close_next = devs->close_queue;
        devs->close_queue = c;
        (void)sd_event_source_set_enabled(devs->close_defer, SD_EVENT_ONESHOT);
}

/* The device's session is gone or replaced: answer its pending calls with
 * error (-ENOTCONN, or -ECONNRESET when a new session replaced it), drop
 * its subscriptions, report it offline. The session reference stays with
 * the Session (released when libcoap reports the close). */
static void device_unbind(Device *d, const char *reason, int error) {
        Devices *devs = d->devices;
        Session *c = d->conn;

        if (!c)
                return;
        d->conn = NULL;
        c->device = NULL;
        devs->n_online--;
        stats_device_connected(-1);
        d->ping_timer = sd_event_source_disable_unref(d->ping_timer);
        d->describe_defer = sd_event_source_disable_unref(d->describe_defer);
        devs->hooks.device_gone(devs->hooks.userdata, d);
        /* A session waiting for this ID may have it now. */
        if (d->check_since)
                device_check_soon(d);
        if (d->dropped_events > 0)
                log_info("Device '%s': %" PRIu64 " events were not delivered to it.", d->id, d->dropped_events);
        log_struct(LOG_INFO,
                   &(LogFields){ .message_id = LOG_MESSAGE_DEVICE_DISCONNECTED, .device_id = d->id, .peer = d->last_addr },
                   "Device '%s' disconnected (%s).", d->id, reason);
        devices_notify_status(devs, "X_TETHER_OFFLINE", d->id);
        /* Callbacks may start new calls on this device: they fail at once. */
        while (d->calls)
                call_complete(d->calls, error, 0, NULL, 0);
        d->describe_again = false;
        d->online_notified = false;
}

/* Close the device's session from the loop (not from a libcoap callback
 * for that session). */
static void device_close(Device *d, const char *reason) {
        coap_session_t *session = d->conn->session;
        Shard *sh = d->conn->shard;

        device_unbind(d, reason, -ENOTCONN);
        if (coap_session_get_state(session) != COAP_SESSION_STATE_NONE)
                coap_session_disconnected(session, COAP_NACK_NOT_DELIVERABLE);
        shard_kick(sh);
}

void device_disconnect(Device *d, const char *reason) {
        Session *c = d->conn;

        if (!c)
                return;
        /* Unbound at once, so what else arrives on the session is refused;
         * closed from the loop, as this runs inside a libcoap callback. */
        device_unbind(d, reason, -ENOTCONN);
        session_queue_close(c);
}

void device_cert_renewed(Device *d, int64_t not_after) {
        if (d->conn)
                d->cert_not_after = not_after;
}

/* Close the sessions whose certificate expired (each is logged). */
static int devices_expiry_cb(sd_event_source *s, uint64_t usec, void *userdata) {
        Devices *devs = userdata;
        int64_t now = (int64_t)(realtime_usec() / USEC_PER_SEC);

        for (Device *d = devs->dev_head; d; d = d->list_next)
                if (d->conn && d->cert_not_after > 0 && d->cert_not_after <= now) {
                        log_notice("Device '%s': the certificate of its session expired, closing it.", d->id);
                        device_disconnect(d, "its certificate expired");
                }
        (void)sd_event_source_set_time(s, usec + DEVICES_EXPIRY_CHECK_SEC * USEC_PER_SEC);
        return 0;
}

static int device_ping_cb(sd_event_source *s, uint64_t usec, void *userdata) {
        Device *d = userdata;
        Devices *devs = d->devices;
        uint64_t now = now_usec();

        if (!d->conn)
                return 0;
        if (now >= d->last_alive + (uint64_t)devs->config->device_timeout_sec * USEC_PER_SEC) {
                log_warning("Device '%s' answered nothing for %us (no Pong, no response), closing its session.",
                            d->id, devs->config->device_timeout_sec);
                device_close(d, "timed out");
                return 0;
        }
        if (now >= d->next_ping)
                device_ping(d);
        if (d->conn)
                device_arm_ping(d);
        return 0;
}

static int describe_defer_cb(sd_event_source *s, void *userdata);

/* X_TETHER_ONLINE once per session, after its first GET /d (answered,
 * failed or timed out); X_TETHER_DESCRIBED after each later one (the
 * device asked to be described anew with POST /d, e.g. after its
 * inventory changed). */
static void device_notify_online(Device *d) {
        if (d->online_notified) {
                devices_notify_status(d->devices, "X_TETHER_DESCRIBED", d->id);
                return;
        }
        d->online_notified = true;
        devices_notify_status(d->devices, "X_TETHER_ONLINE", d->id);
}

static void describe_done(int error, unsigned code, const uint8_t *data, size_t len, void *userdata) {
        Device *d = userdata;
        Devices *devs = d->devices;
        json_t *j = NULL;
        int r;

        d->describe_call = NULL;
        if (error == -ENOTCONN || error == -ECONNRESET)
                return; /* went offline or reconnected; logged there */
        if (error < 0)
                log_warning_errno(error, "Device '%s' did not answer GET /d: %m", d->id);
        else if (code != COAP_RESPONSE_CODE_CONTENT)
                log_warning("Device '%s' answered GET /d with %u.%02u.", d->id, code >> 5, code & 0x1f);
        else if ((r = proto_describe_decode(data, len, &j)) < 0)
                log_warning_errno(r, "Device '%s' sent an invalid describe document: %m", d->id);
        else {
                size_t nf = json_array_size(json_object_get(j, "functions"));
                size_t nv = json_object_size(json_object_get(j, "variables"));
                Describe *ds = describe_intern(devs, j);

                if (!ds)
                        log_warning("Out of memory keeping device '%s''s describe document.", d->id);
                else if (ds == d->describe)
                        describe_release(devs, ds); /* as before: nothing to record */
                else {
                        describe_release(devs, d->describe);
                        d->describe = ds;
                        log_debug("Device '%s' describe cached (%zu functions, %zu variables; %zu "
                                  "distinct documents).", d->id, nf, nv, devs->n_describes);
                        devs->hooks.described(devs->hooks.userdata, d, ds->key);
                }
        }
        if (!d->conn)
                return;
        device_notify_online(d);
        /* POST /d arrived while this GET /d was out: the answer may be stale. */
        if (d->describe_again && !d->describe_defer) {
                d->describe_again = false;
                if (sd_event_add_defer(devs->event, &d->describe_defer, describe_defer_cb, d) < 0)
                        log_warning("Cannot schedule GET /d for device '%s'.", d->id);
        }
}

static int describe_defer_cb(sd_event_source *s, void *userdata) {
        Device *d = userdata;
        int r;

        d->describe_defer = sd_event_source_disable_unref(d->describe_defer);
        r = devices_call(d, COAP_REQUEST_CODE_GET, PROTO_PATH_DESCRIBE, NULL, NULL, 0, describe_done, d,
                         &d->describe_call);
        if (r < 0) {
                log_warning_errno(r, "Failed to send GET /d to device '%s': %m", d->id);
                if (d->conn)
                        device_notify_online(d);
        }
        return 0;
}

/* Bind session c to device d, which has no session now, after asking
 * the peer check again (the device may have been revoked since its
 * handshake, or while c waited for a liveness check). */
static void device_bind(Device *d, Session *c) {
        Devices *devs = d->devices;
        const TlsPeer *peer = tls_session_peer(c->session);
        char ip[INET6_ADDRSTRLEN], addr[INET6_ADDRSTRLEN + 8], reason[192] = "";
        int r;

        format_address(coap_session_get_addr_remote(c->session), ip, addr);
        if (!peer || devs->hooks.peer_check(devs->hooks.userdata, peer, reason, sizeof(reason)) < 0) {
                log_struct(LOG_WARNING,
                           &(LogFields){ .message_id = LOG_MESSAGE_DEVICE_REFUSED, .device_id = d->id, .peer = addr },
                           "Refused device '%s' from %s: %s.", d->id, addr, reason[0] ? reason : "no certificate");
                stats_handshake_refused(STATS_REFUSED_TLS);
                session_queue_close(c);
                return;
        }
        r = sd_event_add_time(devs->event, &d->ping_timer, CLOCK_MONOTONIC, 0, 100 * USEC_PER_MSEC,
                              device_ping_cb, d);
        if (r >= 0)
                r = sd_event_add_defer(devs->event, &d->describe_defer, describe_defer_cb, d);
        if (r < 0) {
                log_error_errno(r, "Failed to set up device '%s': %m", d->id);
                d->ping_timer = sd_event_source_disable_unref(d->ping_timer);
                session_queue_close(c);
                return;
        }
        coap_session_reference(c->session);
        c->referenced = true;
        c->settled = true;
        c->device = d;
        d->conn = c;
        devs->n_online++;
        stats_device_connected(1);
        stats_handshake_completed();
        if (tls_session_resumed(c->session))
                stats_handshake_resumed();
        snprintf(d->last_ip, sizeof(d->last_ip), "%s", ip);
        d->tx_bytes = d->tx_read = d->ping_mark = 0;
        d->ping_outstanding = false;
        d->warned_too_big = false;
        d->dropped_events = 0;
        d->describe_again = false;
        d->online_notified = false;
        d->cert_not_after = peer->not_after;
        device_alive(d, 0);
        d->next_ping = d->last_alive + (uint64_t)devs->config->ping_sec * USEC_PER_SEC;
        device_arm_ping(d);
        snprintf(d->last_addr, sizeof(d->last_addr), "%s", addr);
        log_struct(LOG_INFO, &(LogFields){ .message_id = LOG_MESSAGE_DEVICE_CONNECTED, .device_id = d->id, .peer = addr },
                   "Device '%s' connected from %s.", d->id, addr);
        (void)sd_notifyf(0, "STATUS=%u devices online", devs->n_online);
        devs->hooks.device_bound(devs->hooks.userdata, d, peer);
}

/* Log and publish a conflict while the device is under
 * DEVICES_CONFLICT_BURST of them in the window; count it otherwise. */
static void device_conflict_report(Device *d, const char *newcomer, const char *outcome, const char *what) {
        Devices *devs = d->devices;

        if (d->conflicts > DEVICES_CONFLICT_BURST) {
                d->conflicts_quiet++;
                return;
        }
        log_struct(LOG_WARNING, &(LogFields){ .message_id = LOG_MESSAGE_DEVICE_REFUSED, .device_id = d->id, .peer = newcomer },
                   "Device '%s': a second session from %s while the one from %s is bound: %s.", d->id, newcomer,
                   d->last_addr, what);
        devs->hooks.device_conflict(devs->hooks.userdata, d, d->last_addr, newcomer, outcome);
        if (d->conflicts == DEVICES_CONFLICT_BURST)
                log_warning("Device '%s': %u duplicate sessions within %us: damping until that window ends; a new "
                            "session is refused at once while the established one answered within %us, and "
                            "conflicts are counted, not logged or published.",
                            d->id, DEVICES_CONFLICT_BURST, DEVICES_CONFLICT_WINDOW_SEC, DEVICES_CONFLICT_FRESH_SEC);
}

static void device_contender_drop(Device *d) {
        if (!d->contender)
                return;
        d->contender->contends = NULL;
        d->contender = NULL;
}

/* The liveness check of the established session (device_conflict()):
 * runs when it answered, when it ended, and at its deadline. */
static int device_check_cb(sd_event_source *s, uint64_t usec, void *userdata) {
        Device *d = userdata;
        Session *c = d->contender;
        uint64_t now = now_usec(), deadline = d->check_since + DEVICES_CHECK_MSEC * USEC_PER_MSEC;
        char ip[INET6_ADDRSTRLEN], addr[INET6_ADDRSTRLEN + 8] = "-";

        if (!d->check_since)
                return 0;
        if (c)
                format_address(coap_session_get_addr_remote(c->session), ip, addr);
        if (d->conn && d->last_alive >= d->check_since) {
                d->check_since = 0;
                if (c) {
                        device_contender_drop(d);
                        session_queue_close(c);
                        device_conflict_report(d, addr, "kept",
                                               "the established session answered a liveness check and keeps the "
                                               "ID, the new one is closed");
                }
                return 0;
        }
        if (d->conn && now < deadline) {
                (void)sd_event_source_set_time(s, deadline);
                (void)sd_event_source_set_enabled(s, SD_EVENT_ONESHOT);
                return 0;
        }
        d->check_since = 0;
        if (d->conn) {
                Session *old = d->conn;

                device_conflict_report(d, addr, "replaced",
                                       "the established session did not answer a liveness check in time and is "
                                       "closed");
                device_unbind(d, "replaced: it did not answer a liveness check while another session waited",
                              -ECONNRESET);
                session_queue_close(old);
        }
        if (!c)
                return 0;
        device_contender_drop(d);
        if (c->closing || coap_session_get_state(c->session) != COAP_SESSION_STATE_ESTABLISHED)
                return 0;
        if (c->refused_request) {
                /* What it asked while it waited was refused (5.03): a new
                 * session starts clean, and binds at once. */
                log_info("Device '%s': closing the session from %s that waited for the ID, as requests on it "
                         "were refused meanwhile; it will connect again.", d->id, addr);
                session_queue_close(c);
                return 0;
        }
        device_bind(d, c);
        return 0;
}

/* Session c (passed every check) is for d, which has a bound session. */
static void device_conflict(Device *d, Session *c) {
        Devices *devs = d->devices;
        uint64_t now = now_usec();
        char ip[INET6_ADDRSTRLEN], addr[INET6_ADDRSTRLEN + 8];
        int r;

        c->settled = true;
        format_address(coap_session_get_addr_remote(c->session), ip, addr);
        if (now >= d->conflict_window + DEVICES_CONFLICT_WINDOW_SEC * USEC_PER_SEC) {
                if (d->conflicts_quiet > 0)
                        log_warning("Device '%s': %" PRIu64 " more duplicate sessions were refused in the last "
                                    "window of %us without a log line each.",
                                    d->id, d->conflicts_quiet, DEVICES_CONFLICT_WINDOW_SEC);
                d->conflict_window = now;
                d->conflicts = 0;
                d->conflicts_quiet = 0;
        }
        d->conflicts++;
        if (d->contender) {
                session_queue_close(c);
                device_conflict_report(d, addr, "kept", "another new session already waits for the ID, closing this one");
                return;
        }
        if (d->conflicts > DEVICES_CONFLICT_BURST && d->last_alive + DEVICES_CONFLICT_FRESH_SEC * USEC_PER_SEC > now) {
                session_queue_close(c);
                device_conflict_report(d, addr, "kept", "damped");
                /* Keep the proof fresh: a session that stops answering
                 * gets a real check at the next newcomer. */
                if (!d->ping_outstanding && d->last_alive + USEC_PER_SEC <= now) {
                        d->next_ping = 0;
                        device_arm_ping(d);
                }
                return;
        }
        if (!d->check_timer) {
                r = sd_event_add_time(devs->event, &d->check_timer, CLOCK_MONOTONIC, 0, 10 * USEC_PER_MSEC,
                                      device_check_cb, d);
                if (r < 0) {
                        log_error_errno(r, "Failed to check device '%s''s established session, refusing the new one: %m",
                                        d->id);
                        session_queue_close(c);
                        return;
                }
        }
        d->contender = c;
        c->contends = d;
        if (!d->check_since) {
                /* A Pong to a Ping already out counts too: it comes after now. */
                d->check_since = now;
                d->next_ping = 0;
                device_arm_ping(d);
        }
        (void)sd_event_source_set_time(d->check_timer, d->check_since + DEVICES_CHECK_MSEC * USEC_PER_MSEC);
        (void)sd_event_source_set_enabled(d->check_timer, SD_EVENT_ONESHOT);
}

static uint64_t admission_grace(const Devices *devs);

/* COAP_EVENT_SESSION_CONNECTED: TLS and CSM done, the peer is known. No
 * PDU is built here (docs/design/libcoap.md, trap B): GET /d goes out from
 * a defer, the Ping of a liveness check from the device's ping timer. */
static void session_bind(Session *c) {
        Devices *devs = c->devices;
        const char *id = tls_session_peer_id(c->session);
        char ip[INET6_ADDRSTRLEN], addr[INET6_ADDRSTRLEN + 8];
        int64_t took = (int64_t)(now_usec() - c->accepted);
        Device *d;

        if (!id && devs->config->enroll_enabled && tls_session_anonymous(c->session)) {
                /* An enrollment session: it stays on the unbound list, so
                 * HandshakeTimeoutSec from accept closes it and it counts
                 * against MaxHandshakes. Not logged (anyone can connect). */
                c->anonymous = true;
                devs->n_enrolling++;
                stats_enrollment_sessions(1);
                return;
        }
        session_unbound_remove(c);
        devices_churn(devs);
        devs->bind_usec_avg += (took - (int64_t)devs->bind_usec_avg) / 8;
        handshakes_set_grace(devs->handshakes, admission_grace(devs));
        if (!id) {
                format_address(coap_session_get_addr_remote(c->session), ip, addr);
                log_struct(LOG_WARNING, &(LogFields){ .message_id = LOG_MESSAGE_DEVICE_REFUSED, .peer = addr },
                           "Session from %s has no device identity, closing it.", addr);
                stats_handshake_refused(STATS_REFUSED_NO_IDENTITY);
                session_queue_close(c);
                return;
        }
        d = devices_find(devs, id) ?: device_new(devs, id);
        if (!d) {
                log_error("Out of memory registering device '%s'.", id);
                session_queue_close(c);
                return;
        }
        if (d->conn)
                device_conflict(d, c);
        else
                device_bind(d, c);
}

static int devices_close_cb(sd_event_source *s, void *userdata) {
        Devices *devs = userdata;
        while (devs->close_queue) {
                Session *c = devs->close_queue;

                devs->close_queue = c->close_next;
                c->closing = false;
                shard_kick(c->shard);
                session_unbound_remove(c);
                if (c->device)
                        device_unbind(c->device, "closed", -ENOTCONN);
                /* Our event handler releases the reference on the close. */
                if (coap_session_get_state(c->session) != COAP_SESSION_STATE_NONE)
                        coap_session_disconnected(c->session, COAP_NACK_NOT_DELIVERABLE);
                else if (c->referenced) {
                        c->referenced = false;
                        coap_session_release(c->session);
                }
        }
        return 0;
}

/* How long the oldest unbound session keeps its place against a new
 * connection: HandshakeGraceSec, or twice what recent devices took from
 * accept to bound when a storm's queue makes that longer, at most
 * HandshakeTimeoutSec (docs/design/libcoap.md, "Admission"). */
static uint64_t admission_grace(const Devices *devs) {
        uint64_t grace = (uint64_t)devs->config->handshake_grace_sec * USEC_PER_SEC;
        uint64_t timeout = (uint64_t)devs->config->handshake_timeout_sec * USEC_PER_SEC;

        if (grace < 2 * devs->bind_usec_avg)
                grace = 2 * devs->bind_usec_avg;
        return grace < timeout ? grace : timeout;
}

/* At MaxHandshakes unbound sessions: if the oldest has had its grace, keep
 * accepting and let the next connection displace it; else stop accepting
 * (the next connections wait in the listen backlog) until one ends or the
 * oldest's grace runs out. Where accept cannot be paused, a connection
 * beyond MaxHandshakes displaces the oldest if it may, else is closed. */
static void devices_admission_check(Devices *devs) {
        uint64_t now = now_usec(), grace = admission_grace(devs), suppressed;
        Session *c;
        int r;

        while (devs->n_unbound > devs->config->max_handshakes) {
                bool oldest = devs->unbound_head->accepted + grace <= now;

                c = oldest ? devs->unbound_head : devs->unbound_tail;
                session_unbound_remove(c);
                session_queue_close(c);
                stats_handshake_refused(STATS_REFUSED_EVICTED);
                if (oldest && warn_limit(&devs->warn_handshake_evicted, &suppressed))
                        log_warning("MaxHandshakes=%u sessions in the TLS handshake: closed the oldest, "
                                    "unbound after %" PRIu64 " ms, to accept a new connection (%" PRIu64
                                    " closed so since the last report).",
                                    devs->config->max_handshakes, (uint64_t)((now - c->accepted) / USEC_PER_MSEC),
                                    suppressed + 1);
                else if (!oldest && warn_limit(&devs->warn_handshake_full, &suppressed))
                        log_warning("More than MaxHandshakes=%u sessions in the TLS handshake: closed the "
                                    "newest (%" PRIu64 " closed so since the last report).",
                                    devs->config->max_handshakes, suppressed + 1);
        }
        c = devs->unbound_head;
        if (devs->n_unbound < devs->config->max_handshakes || !c || c->accepted + grace <= now) {
                (void)sd_event_source_set_enabled(devs->admission_timer, SD_EVENT_OFF);
                if (devs->listener_paused)
                        (void)devices_listeners_pause(devs, false);
                return;
        }
        if (!devs->listener_pausable)
                return;
        r = devices_listeners_pause(devs, true);
        if (r < 0) {
                log_warning_errno(r, "Cannot pause accepting device connections, closing new ones instead: %m");
                devs->listener_pausable = false;
                return;
        }
        (void)sd_event_source_set_time(devs->admission_timer, c->accepted + grace);
        (void)sd_event_source_set_enabled(devs->admission_timer, SD_EVENT_ONESHOT);
        if (warn_limit(&devs->warn_handshake_full, &suppressed))
                log_warning("MaxHandshakes=%u sessions in the TLS handshake: not accepting new connections "
                            "for up to %" PRIu64 " ms, until one ends or the oldest has had %" PRIu64
                            " ms (%" PRIu64 " times since the last report).",
                            devs->config->max_handshakes, (uint64_t)((c->accepted + grace - now) / USEC_PER_MSEC),
                            (uint64_t)(grace / USEC_PER_MSEC), suppressed + 1);
}

static int devices_admission_timer_cb(sd_event_source *s, uint64_t usec, void *userdata) {
        devices_admission_check(userdata);
        return 0;
}

/* Sessions that have not become a device within HandshakeTimeoutSec. */
static int devices_handshake_timer_cb(sd_event_source *s, uint64_t usec, void *userdata) {
        Devices *devs = userdata;
        uint64_t timeout = (uint64_t)devs->config->handshake_timeout_sec * USEC_PER_SEC;
        uint64_t now = now_usec(), n = 0, suppressed;
        Session *c;

        while ((c = devs->unbound_head) && c->accepted + timeout <= now) {
                session_unbound_remove(c);
                session_queue_close(c);
                if (c->anonymous)
                        continue; /* an enrollment session's time is up: expected */
                stats_handshake_refused(STATS_REFUSED_TIMEOUT);
                n++;
        }
        if (n > 0 && warn_limit(&devs->warn_handshake_timeout, &suppressed))
                log_warning("Closed %" PRIu64 " sessions that did not complete the TLS handshake within "
                            "HandshakeTimeoutSec=%us (and %" PRIu64 " unreported before).",
                            n + suppressed, devs->config->handshake_timeout_sec, suppressed);
        if (c) {
                (void)sd_event_source_set_time(s, c->accepted + timeout);
                (void)sd_event_source_set_enabled(s, SD_EVENT_ONESHOT);
        }
        return 0;
}

/* A new session waits for its handshake, at most MaxHandshakes at a time
 * (devices_admission_check()). */
static void session_wait_handshake(Session *c) {
        Devices *devs = c->devices;

        session_unbound_add(c);
        if (devs->unbound_head == c) {
                (void)sd_event_source_set_time(devs->handshake_timer,
                                               c->accepted +
                                                       (uint64_t)devs->config->handshake_timeout_sec * USEC_PER_SEC);
                (void)sd_event_source_set_enabled(devs->handshake_timer, SD_EVENT_ONESHOT);
        }
        if (devs->n_unbound >= devs->config->max_handshakes)
                devices_admission_check(devs);
}

static void session_setup_socket(Devices *devs, coap_session_t *session) {
        coap_tls_library_t lib;
        void *tls = coap_session_get_tls(session, &lib);
        int r;

        /* A handshake thread's SSL is set up already (tls_server_ctx_new()),
         * and its SSL_CTX is the threads'. */
        if (tls && lib == COAP_TLS_LIBRARY_OPENSSL && !tls_ssl_adopted(tls)) {
                SSL *ssl = tls;
                SSL_CTX *ctx = SSL_get_SSL_CTX(ssl);

                /* Idle sessions then hold no OpenSSL read/write buffers. */
                SSL_set_mode(ssl, SSL_MODE_RELEASE_BUFFERS);
                /* No stateful session cache: resumption is by stateless
                 * tickets only, which lib/tls.c's server_tls_setup() turns on
                 * with devs->tickets ([Cloud] TicketKeySec=) or off. The
                 * context is shared: later sessions inherit it. */
                if (ctx)
                        SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
        }
        /* Accepted sockets inherit TCP_NODELAY from the listener when we could
         * set it there; otherwise find this socket (costs a /proc scan). */
        if (!devs->listener_nodelay && (r = tls_session_set_nodelay(session)) < 0)
                log_debug_errno(r, "Failed to set TCP_NODELAY: %m");
}

/* A TLS handshake that failed: the peer's certificate was not accepted
 * (or it spoke no TLS). Anyone can connect, so each address is logged at
 * most once per DEVICES_REFUSAL_INTERVAL (a slot per address hash), and
 * all addresses together at most DEVICES_REFUSAL_BURST times per
 * DEVICES_WARN_INTERVAL; what is not logged is counted in the next line.
 * Any thread (the handshake threads too). */
static void devices_log_refusal(Devices *devs, const char *ip, const char *addr, const TlsPeer *peer,
                                const char *verify) {
        char why[256];
        uint64_t now = now_usec(), suppressed, key;
        RefusalSlot *slot;

        pthread_mutex_lock(&devs->refusal_lock);
        /* One slot per address and certificate: a flood of one is one
         * line, while different certificates from one address (a gateway
         * behind NAT with a neighbour) are each told. */
        key = hash_string(ip) ^ (peer ? hash_string(peer->fingerprint) : 0);
        slot = &devs->refusals[key % DEVICES_REFUSAL_SLOTS];
        if (slot->key == key && streq(slot->ip, ip) && now < slot->logged + DEVICES_REFUSAL_INTERVAL) {
                slot->suppressed++;
                goto out;
        }
        if (now >= devs->refusal_window + DEVICES_WARN_INTERVAL) {
                devs->refusal_window = now;
                devs->refusal_logged = 0;
        }
        if (devs->refusal_logged >= DEVICES_REFUSAL_BURST) {
                devs->refusal_unlogged++;
                goto out;
        }
        devs->refusal_logged++;
        suppressed = slot->key == key && streq(slot->ip, ip) ? slot->suppressed : 0;
        slot->key = key;
        snprintf(slot->ip, sizeof(slot->ip), "%s", ip);
        slot->logged = now;
        slot->suppressed = 0;

        if (peer && peer->reason[0])
                snprintf(why, sizeof(why), "%s", peer->reason);
        else if (verify)
                snprintf(why, sizeof(why), "the certificate was not verified: %s", verify);
        else if (!peer)
                snprintf(why, sizeof(why), "the TLS handshake did not complete (no client certificate, or no TLS)");
        else
                snprintf(why, sizeof(why), "the TLS handshake failed");
        log_struct(LOG_WARNING,
                   &(LogFields){ .message_id = LOG_MESSAGE_DEVICE_REFUSED, .peer = addr,
                                 .device_id = peer && peer->id[0] ? peer->id : NULL },
                   "Refused a session from %s: %s; certificate subject '%s', issuer '%s', serial %s "
                   "(%" PRIu64 " more from this address and %" PRIu64 " from others not logged).",
                   addr, why, peer ? peer->subject : "", peer ? peer->issuer : "",
                   peer && peer->serial[0] ? peer->serial : "-", suppressed, devs->refusal_unlogged);
        devs->refusal_unlogged = 0;
out:
        pthread_mutex_unlock(&devs->refusal_lock);
}

static void session_refused(Devices *devs, coap_session_t *session) {
        char ip[INET6_ADDRSTRLEN], addr[INET6_ADDRSTRLEN + 8];

        stats_handshake_refused(STATS_REFUSED_TLS);
        format_address(coap_session_get_addr_remote(session), ip, addr);
        devices_log_refusal(devs, ip, addr, tls_session_peer(session), tls_session_verify_error(session));
}

/* The shard whose context is ctx (once per accepted connection). */
static Shard *devices_shard_of(Devices *devs, const coap_context_t *ctx) {
        for (unsigned i = 0; i < devs->n_shards; i++)
                if (devs->shards[i].ctx == ctx)
                        return &devs->shards[i];
        return NULL;
}

static int devices_event_handler(coap_session_t *session, const coap_event_t event) {
        coap_context_t *ctx = coap_session_get_context(session);
        Devices *devs = coap_get_app_data(ctx);
        Shard *sh;
        Session *c;

        switch (event) {
        case COAP_EVENT_SERVER_SESSION_NEW:
                sh = devices_shard_of(devs, ctx);
                c = sh ? session_new(devs, sh, session) : NULL;
                if (!c) {
                        adopted_accepted = 0;
                        log_error("Out of memory accepting a session.");
                        return 0;
                }
                /* A handshake thread's: counted at its accept(). */
                if (adopted_accepted) {
                        c->accepted = adopted_accepted;
                        adopted_accepted = 0;
                } else
                        stats_handshake_started();
                session_setup_socket(devs, session);
                session_wait_handshake(c);
                break;
        case COAP_EVENT_SESSION_CONNECTED:
                c = session_find(devs, session);
                if (c && !c->device && !c->closing)
                        session_bind(c);
                break;
        case COAP_EVENT_DTLS_CLOSED:
        case COAP_EVENT_DTLS_ERROR:
        case COAP_EVENT_TCP_CLOSED:
        case COAP_EVENT_TCP_FAILED:
        case COAP_EVENT_SESSION_CLOSED:
        case COAP_EVENT_SESSION_FAILED:
                c = session_find(devs, session);
                if (!c)
                        break;
                /* A session that closes before it is bound and that we
                 * did not close ourselves failed its handshake. */
                if (!c->settled && !c->refused) {
                        c->refused = true;
                        session_refused(devs, session);
                }
                if (c->device)
                        device_unbind(c->device, event == COAP_EVENT_DTLS_ERROR ? "TLS error" : "connection closed",
                                      -ENOTCONN);
                if (c->contends)
                        device_contender_drop(c->contends);
                if (c->referenced && coap_session_get_state(session) == COAP_SESSION_STATE_NONE) {
                        /* libcoap frees server sessions only from its own
                         * loop, so releasing here is safe. */
                        c->referenced = false;
                        coap_session_release(session);
                }
                break;
        case COAP_EVENT_SERVER_SESSION_DEL:
                c = session_find(devs, session);
                /* A session whose TLS accept failed at once was never
                 * announced (no SERVER_SESSION_NEW): libcoap only deletes it. */
                if (!c || (!c->settled && !c->refused))
                        session_refused(devs, session);
                if (c && c->device)
                        device_unbind(c->device, "session deleted", -ENOTCONN);
                session_free(c);
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

/* Something the device sends costs us an answer (a response, a Pong) that
 * libcoap queues if the device does not read: count it, and disconnect a
 * device that keeps sending without reading. */
static bool device_answer_fits(Session *c, Device *d) {
        Devices *devs = d->devices;
        d->tx_bytes += DEVICES_MSG_OVERHEAD;
        if (device_unread(d) >= devs->config->max_queued_bytes / 2 && !d->ping_outstanding && d->next_ping > 0) {
                /* A busy device that reads gets its Ping soon (from the
                 * loop, not inside libcoap's handling of its session). */
                d->next_ping = 0;
                device_arm_ping(d);
        }
        if (device_unread(d) < devs->hard_queue_limit)
                return true;
        if (!c->closing)
                log_warning("Device '%s' keeps sending but has not read %" PRIu64 " bytes sent to it, "
                            "closing its session.",
                            d->id, device_unread(d));
        session_queue_close(c);
        return false;
}

/* A request on an enrollment session: `POST /enroll` and nothing else,
 * at most DEVICES_ENROLL_REQUESTS_MAX of them; one more closes it.
 *
 * The cloud does not close the session right after its last answer:
 * libcoap writes an answer after this handler returns and keeps what the
 * socket does not take in its delay queue, which closing the session
 * drops (coap_session_disconnected()), and libcoap 4.3.1 cannot tell
 * when that queue is empty. A device reading slowly would lose its
 * certificate (a retry with the same key gets it again, but only with a
 * token that still has a use or the key recorded). So after its last
 * answer the session stays until the device closes it or
 * HandshakeTimeoutSec from accept (the unbound list), which bounds it
 * anyway; a request beyond the limit breaks the protocol, is answered
 * 5.03 and closes the session at once, whatever is still queued. */
static void devices_enroll_request(Session *c, const coap_pdu_t *request, coap_pdu_t *response) {
        Devices *devs = c->devices;
        char ip[INET6_ADDRSTRLEN], addr[INET6_ADDRSTRLEN + 8];
        coap_opt_iterator_t it;
        coap_opt_filter_t filter;
        coap_opt_t *opt;
        unsigned nseg = 0;
        bool enroll = false;

        if (c->closing || ++c->requests > DEVICES_ENROLL_REQUESTS_MAX) {
                devices_reply(response, COAP_RESPONSE_CODE(503), "this enrollment session is closing");
                session_queue_close(c);
                return;
        }
        coap_option_filter_clear(&filter);
        coap_option_filter_set(&filter, COAP_OPTION_URI_PATH);
        coap_option_iterator_init(request, &it, &filter);
        while ((opt = coap_option_next(&it)))
                enroll = nseg++ == 0 && coap_opt_length(opt) == strlen(PROTO_PATH_ENROLL) &&
                         memcmp(coap_opt_value(opt), PROTO_PATH_ENROLL, strlen(PROTO_PATH_ENROLL)) == 0;
        if (!enroll || nseg != 1 || coap_pdu_get_code(request) != COAP_REQUEST_CODE_POST) {
                devices_reply(response, COAP_RESPONSE_CODE(401), "not enrolled: this session may only POST /enroll");
                return;
        }
        format_address(coap_session_get_addr_remote(c->session), ip, addr);
        devs->hooks.enroll_request(devs->hooks.userdata, ip, request, response);
}

/* GET /a/SHA256: blocks of an OTA artifact are the largest answers a
 * device asks for, so they count against MaxQueuedBytes with their
 * payload (not only DEVICES_MSG_OVERHEAD); a device that has that much
 * unread is told to wait instead (it reads, or its Pongs stop). */
static void devices_artifact_request(Devices *devs, Session *c, Device *d, const coap_pdu_t *request,
                                     const char *sha256, coap_pdu_t *response) {
        const uint8_t *data;
        size_t len = 0;

        if (!devs->hooks.artifact_request) {
                devices_reply(response, COAP_RESPONSE_CODE(404), "unknown resource");
                return;
        }
        if (device_unread(d) >= devs->config->max_queued_bytes) {
                uint8_t buf[4];

                coap_add_option(response, COAP_OPTION_MAXAGE, coap_encode_var_safe(buf, sizeof(buf), 1), buf);
                devices_reply(response, COAP_RESPONSE_CODE(503), "not reading what is sent to it");
                return;
        }
        devs->hooks.artifact_request(devs->hooks.userdata, d, request, sha256, response);
        if (coap_get_data(response, &len, &data) && len > 0) {
                d->tx_bytes += len;
                if (device_unread(d) >= devs->config->max_queued_bytes / 2 && !d->ping_outstanding &&
                    d->next_ping > 0) {
                        /* Proof of reading soon, from the loop. */
                        d->next_ping = 0;
                        device_arm_ping(d);
                }
        }
}

static void devices_request_handler(coap_resource_t *resource, coap_session_t *session,
                                    const coap_pdu_t *request, const coap_string_t *query,
                                    coap_pdu_t *response) {
        Devices *devs = coap_get_app_data(coap_session_get_context(session));
        char first[16] = "", rest[TETHER_EVENT_NAME_MAX + 2] = "";
        size_t rest_len = 0;
        coap_opt_iterator_t it;
        coap_opt_filter_t filter;
        coap_opt_t *opt;
        unsigned nseg = 0;
        bool too_long = false;
        Session *c = session_find(devs, session);
        Device *d = c ? c->device : NULL;

        if (c && c->anonymous) {
                devices_enroll_request(c, request, response);
                return;
        }
        if (!d) {
                if (c && c->contends) {
                        c->refused_request = true;
                        devices_reply(response, COAP_RESPONSE_CODE(503), "another session holds this device ID");
                } else
                        devices_reply(response, COAP_RESPONSE_CODE(503), "session not ready");
                return;
        }
        device_heard(d);
        if (!device_answer_fits(c, d)) {
                devices_reply(response, COAP_RESPONSE_CODE(503), "not reading");
                return;
        }

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
                /* The device's describe data changed (it reloaded): fetch it
                 * again; one GET /d at a time however often it asks. */
                if (coap_pdu_get_code(request) != COAP_REQUEST_CODE_POST) {
                        devices_reply(response, COAP_RESPONSE_CODE(405), "use POST on /d");
                        return;
                }
                if (d->describe_call)
                        d->describe_again = true;
                else if (!d->describe_defer &&
                         sd_event_add_defer(devs->event, &d->describe_defer, describe_defer_cb, d) < 0) {
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
                        devs->hooks.event_request(devs->hooks.userdata, d, request, rest, response);
                        return;
                default:
                        devices_reply(response, COAP_RESPONSE_CODE(405), "method not allowed");
                        return;
                }
        }
        if (streq(first, PROTO_PATH_EVENT))
                devices_reply(response, COAP_RESPONSE_CODE(400), "name too long");
        else if (streq(first, PROTO_PATH_OTA) && nseg == 2 && !too_long)
                devs->hooks.ota_request(devs->hooks.userdata, d, request, rest, response);
        else if (streq(first, PROTO_PATH_ARTIFACT) && nseg == 2 && !too_long)
                devices_artifact_request(devs, c, d, request, rest, response);
        else if (streq(first, PROTO_PATH_STREAM) && nseg == 2 && !too_long && rest_len < 16 &&
                 !memchr(rest, 0, rest_len))
                devs->hooks.stream_request(devs->hooks.userdata, d, request, rest, response);
        else if (streq(first, PROTO_PATH_STREAM))
                devices_reply(response, COAP_RESPONSE_CODE(404), "no stream");
        else if (streq(first, PROTO_PATH_CERT) && nseg == 1) {
                char ip[INET6_ADDRSTRLEN], addr[INET6_ADDRSTRLEN + 8];

                if (!devs->config->enroll_enabled)
                        devices_reply(response, COAP_RESPONSE_CODE(404), "renewal is not configured");
                else if (coap_pdu_get_code(request) != COAP_REQUEST_CODE_POST)
                        devices_reply(response, COAP_RESPONSE_CODE(405), "use POST on /cert");
                else if (!tls_session_peer(session))
                        devices_reply(response, COAP_RESPONSE_CODE(401), "no certificate on this session");
                else {
                        format_address(coap_session_get_addr_remote(session), ip, addr);
                        devs->hooks.cert_request(devs->hooks.userdata, d, tls_session_peer(session), ip, request,
                                                 response);
                }
        } else
                devices_reply(response, COAP_RESPONSE_CODE(404), "unknown resource");
}

static coap_response_t devices_response_handler(coap_session_t *session, const coap_pdu_t *sent,
                                                const coap_pdu_t *received, const coap_mid_t mid) {
        Devices *devs = coap_get_app_data(coap_session_get_context(session));
        Session *c = session_find(devs, session);
        Device *d = c ? c->device : NULL;
        coap_bin_const_t token = coap_pdu_get_token(received);
        const uint8_t *data = NULL;
        size_t len = 0;
        uint64_t t;

        if (!d)
                return COAP_RESPONSE_OK;
        device_heard(d);
        if (token.length == 0 || token.length > 8)
                return COAP_RESPONSE_OK;
        t = coap_decode_var_bytes8(token.s, token.length);
        for (DeviceCall *call = d->calls; call; call = call->next)
                if (call->token == t) {
                        /* The answer proves it read the request. */
                        device_alive(d, call->tx_mark);
                        (void)coap_get_data(received, &len, &data);
                        call_complete(call, 0, coap_pdu_get_code(received), data, len);
                        return COAP_RESPONSE_OK;
                }
        log_debug("Device '%s' answered an unknown or expired request.", d->id);
        return COAP_RESPONSE_OK;
}

static void devices_pong_handler(coap_session_t *session, const coap_pdu_t *received, const coap_mid_t mid) {
        Devices *devs = coap_get_app_data(coap_session_get_context(session));
        Session *c = session_find(devs, session);
        Device *d = c ? c->device : NULL;

        if (!d)
                return;
        if (!d->ping_outstanding) {
                /* Unasked-for Pongs would vouch for data the device never read. */
                if (!c->closing)
                        log_warning("Device '%s' sent a Pong to no Ping, closing its session.", d->id);
                session_queue_close(c);
                return;
        }
        d->ping_outstanding = false;
        device_alive(d, d->ping_mark);
        /* More than half of MaxQueuedBytes still unread: ask again soon. */
        if (device_unread(d) >= devs->config->max_queued_bytes / 2)
                d->next_ping = 0;
        device_arm_ping(d);
}

/* The device's own Ping: libcoap answers it with a Pong we must count; it
 * is not proof that the device reads what we send. */
static void devices_ping_handler(coap_session_t *session, const coap_pdu_t *received, const coap_mid_t mid) {
        Devices *devs = coap_get_app_data(coap_session_get_context(session));
        Session *c = session_find(devs, session);

        if (c && c->device) {
                device_heard(c->device);
                (void)device_answer_fits(c, c->device);
        } else if (c && c->anonymous && ++c->pings > DEVICES_ENROLL_PINGS_MAX) {
                /* Each Pong waits in libcoap's queue if the client does not
                 * read: anyone may open an enrollment session. */
                session_queue_close(c);
        }
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

/* One shard's context: the same TLS setup, handlers, resource, app data
 * (devs) and session timeout as every other shard; no endpoint yet. */
static int shard_init(Devices *devs, Shard *sh, unsigned index) {
        const CloudConfig *config = devs->config;
        coap_resource_t *res;

        sh->devices = devs;
        sh->index = index;
        sh->listener = (ListenerPause){ .fd = -1 };
        pthread_mutex_init(&sh->handoff_lock, NULL);
        sh->handoff_lock_init = true;
        sh->ctx = coap_new_context(NULL);
        if (!sh->ctx)
                return log_error_errno(-ENOMEM, "Failed to create the CoAP context.");
        coap_set_app_data(sh->ctx, devs);
        if (!coap_context_set_pki(sh->ctx, &devs->pki))
                return log_error_errno(-EINVAL, "Failed to set up TLS with the server certificate '%s', key '%s' "
                                       "and CA '%s'.", config->cert_file, config->key_file, config->ca_file);
        coap_register_event_handler(sh->ctx, devices_event_handler);
        coap_register_response_handler(sh->ctx, devices_response_handler);
        coap_register_pong_handler(sh->ctx, devices_pong_handler);
        coap_register_ping_handler(sh->ctx, devices_ping_handler);
        /* libcoap frees sessions nobody references (not yet a device) after
         * this long idle (default 300 s): a backstop behind our own
         * handshake deadline (which also catches trickling peers). */
        coap_context_set_session_timeout(sh->ctx, config->handshake_timeout_sec + 1);

        res = coap_resource_unknown_init(devices_request_handler);
        if (!res)
                return log_error_errno(-ENOMEM, "Failed to create the CoAP resource.");
        coap_register_request_handler(res, COAP_REQUEST_GET, devices_request_handler);
        coap_register_request_handler(res, COAP_REQUEST_POST, devices_request_handler);
        coap_register_request_handler(res, COAP_REQUEST_DELETE, devices_request_handler);
        coap_add_resource(sh->ctx, res);
        return 0;
}

static int shard_add_sources(Shard *sh, sd_event *event) {
        int r;

        r = sd_event_add_io(event, &sh->io, coap_context_get_coap_fd(sh->ctx), EPOLLIN, shard_io_cb, sh);
        if (r >= 0)
                r = sd_event_add_time(event, &sh->timer, CLOCK_MONOTONIC, 0, USEC_PER_MSEC, shard_timer_cb, sh);
        if (r >= 0)
                r = sd_event_source_set_enabled(sh->timer, SD_EVENT_OFF);
        return r;
}

static unsigned sockaddr_port(const struct sockaddr_storage *ss) {
        return ntohs(ss->ss_family == AF_INET6 ? ((const struct sockaddr_in6 *)ss)->sin6_port
                                               : ((const struct sockaddr_in *)ss)->sin_port);
}

static void sockaddr_set_port(struct sockaddr_storage *ss, unsigned port) {
        if (ss->ss_family == AF_INET6)
                ((struct sockaddr_in6 *)ss)->sin6_port = htons(port);
        else
                ((struct sockaddr_in *)ss)->sin_port = htons(port);
}

/* The kernel silently caps the backlog at somaxconn. */
static void devices_check_somaxconn(void) {
        _cleanup_fclose_ FILE *f = fopen("/proc/sys/net/core/somaxconn", "re");
        unsigned cap = 0;

        if (f && fscanf(f, "%u", &cap) == 1 && cap < DEVICES_LISTEN_BACKLOG)
                log_notice("net.core.somaxconn=%u caps the device listen backlog below %u: raise it for "
                           "connect storms.", cap, DEVICES_LISTEN_BACKLOG);
}

/* SessionShards=1: libcoap's own listener on the configured address. */
static int devices_listen_single(Devices *devs, const struct sockaddr_storage *ss, socklen_t sl) {
        const CloudConfig *config = devs->config;
        Shard *sh = &devs->shards[0];
        coap_address_t addr;
        int r, fd, one = 1;

        coap_address_init(&addr);
        memcpy(&addr.addr, ss, sl);
        addr.size = sl;
        if (!coap_new_endpoint(sh->ctx, &addr, COAP_PROTO_TLS))
                return log_error_errno(-EADDRNOTAVAIL, "Failed to listen on '%s' port %u.", config->coap_listen,
                                       config->coap_port);

        fd = devices_find_listener(ss, config->coap_port);
        if (fd < 0)
                return log_error_errno(fd, "Cannot find the CoAP listening socket: %m");
        /* libcoap listens with a backlog of 5: connect storms overflow it. */
        if (listen(fd, DEVICES_LISTEN_BACKLOG) < 0)
                log_warning_errno(errno, "Failed to raise the listen backlog: %m");
        else
                devices_check_somaxconn();
        devs->listener_nodelay = setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) == 0;
        r = listener_pause_init(coap_context_get_coap_fd(sh->ctx), fd, &sh->listener);
        if (r < 0)
                log_warning_errno(r, "Cannot find the CoAP listening socket in libcoap's epoll set (%m): "
                                  "beyond MaxHandshakes new connections are closed at once.");
        devs->listener_pausable = r >= 0;
        return fd;
}

/* A listening socket on *ss with SO_REUSEPORT, set up as libcoap sets up
 * its own (coap_socket_bind_tcp() in its src/coap_tcp.c: non-blocking,
 * SO_KEEPALIVE, SO_REUSEADDR, dual-stack for IPv6) plus TCP_NODELAY (which
 * accepted sockets inherit) and our backlog. Returns the fd or -errno. */
static int devices_reuseport_listener(const struct sockaddr_storage *ss, socklen_t sl, bool reuseport) {
        _cleanup_close_ int fd = socket(ss->ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        int one = 1, off = 0, r;

        if (fd < 0)
                return -errno;
        if ((reuseport && setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) < 0) ||
            setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0 ||
            setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one)) < 0 ||
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) < 0)
                return -errno;
        if (ss->ss_family == AF_INET6 && setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &off, sizeof(off)) < 0)
                return -errno;
        if (bind(fd, (const struct sockaddr *)ss, sl) < 0 || listen(fd, DEVICES_LISTEN_BACKLOG) < 0)
                return -errno;
        r = fd;
        fd = -EBADF;
        return r;
}

/* Whether the address and port are free, as a plain bind() (libcoap's,
 * without SO_REUSEPORT) sees them: a second cloud, or any other listener,
 * on them fails it, where our SO_REUSEPORT sockets would quietly join
 * another such group of the same user. Port 0 in *ss: a free port is
 * picked and written back. 0 or -errno. */
static int devices_probe_port(struct sockaddr_storage *ss, socklen_t sl) {
        _cleanup_close_ int fd = socket(ss->ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
        struct sockaddr_storage bound = {};
        socklen_t bl = sizeof(bound);
        int one = 1, off = 0;

        if (fd < 0)
                return -errno;
        if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0)
                return -errno;
        if (ss->ss_family == AF_INET6 && setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &off, sizeof(off)) < 0)
                return -errno;
        if (bind(fd, (const struct sockaddr *)ss, sl) < 0)
                return -errno;
        if (getsockname(fd, (struct sockaddr *)&bound, &bl) < 0)
                return -errno;
        sockaddr_set_port(ss, sockaddr_port(&bound));
        return 0;
}

/* The port libcoap bound an endpoint to, from its "ADDRESS:PORT ..." name
 * (4.3.1 has no accessor for the endpoint's address or socket). */
static int endpoint_port(const coap_endpoint_t *ep, unsigned *ret) {
        const char *name = coap_endpoint_str(ep), *end = strchrnul(name, ' '), *colon = NULL;
        unsigned port = 0;

        for (const char *p = name; p < end; p++)
                if (*p == ':')
                        colon = p;
        if (!colon || colon + 1 == end)
                return -EINVAL;
        for (const char *p = colon + 1; p < end; p++) {
                if (*p < '0' || *p > '9' || port > 65535)
                        return -EINVAL;
                port = port * 10 + (unsigned)(*p - '0');
        }
        if (port == 0 || port > 65535)
                return -EINVAL;
        *ret = port;
        return 0;
}

/* Give sh a libcoap endpoint on *any (port 0: a free port) and put fd in
 * the place of its listening socket (listener_replace()): our own
 * listener, or an eventfd. fd stays the caller's. otherwise names the
 * configuration that does without this, for the error. 0 or -errno
 * (logged). */
static int shard_endpoint_replace(Shard *sh, const struct sockaddr_storage *any, socklen_t sl, int fd,
                                  const char *otherwise) {
        const CloudConfig *config = sh->devices->config;
        coap_address_t addr;
        coap_endpoint_t *ep;
        unsigned port;
        int r, lfd;

        coap_address_init(&addr);
        memcpy(&addr.addr, any, sl);
        addr.size = sl;
        ep = coap_new_endpoint(sh->ctx, &addr, COAP_PROTO_TLS);
        if (!ep)
                return log_error_errno(-EADDRNOTAVAIL, "Failed to listen on '%s' port 0.", config->coap_listen);
        r = endpoint_port(ep, &port);
        if (r < 0)
                return log_error_errno(r, "Cannot tell the port of the CoAP endpoint '%s'.", coap_endpoint_str(ep));
        lfd = devices_find_listener(any, port);
        if (lfd < 0)
                return log_error_errno(lfd, "Cannot find the CoAP listening socket: %m");
        r = listener_pause_init(coap_context_get_coap_fd(sh->ctx), lfd, &sh->listener);
        if (r < 0)
                return log_error_errno(r, "Cannot find the CoAP listening socket in libcoap's epoll set (%m): use %s.",
                                       otherwise);
        r = listener_replace(&sh->listener, fd);
        if (r < 0)
                return log_error_errno(r, "Failed to put our socket in the place of libcoap's listener: %m");
        return 0;
}

/* SessionShards>1: every shard listens on the same address and port with
 * SO_REUSEPORT and the kernel spreads new connections over them. libcoap
 * cannot set that option, so each shard's endpoint is bound to a free port
 * and its socket then replaced by one of ours (docs/design/libcoap.md,
 * "Session shards"). *ss is the configured address; port 0 is replaced
 * with the free port picked. */
static int devices_listen_shared(Devices *devs, struct sockaddr_storage *ss, socklen_t sl) {
        const CloudConfig *config = devs->config;
        struct sockaddr_storage any = *ss;
        int r;

        /* The port is ours only if nothing listens on it now; it is then
         * bound again at once (Port=0: the port picked here). */
        r = devices_probe_port(ss, sl);
        if (r < 0)
                return log_error_errno(r, "Failed to listen on '%s' port %u: %m", config->coap_listen,
                                       config->coap_port);
        sockaddr_set_port(&any, 0);
        devs->listener_nodelay = true;
        devs->listener_pausable = true;
        for (unsigned i = 0; i < devs->n_shards; i++) {
                _cleanup_close_ int fd = devices_reuseport_listener(ss, sl, true);

                if (fd < 0)
                        return log_error_errno(fd, "Failed to listen on '%s' port %u with SO_REUSEPORT: %m",
                                               config->coap_listen, sockaddr_port(ss));
                r = shard_endpoint_replace(&devs->shards[i], &any, sl, fd, "SessionShards=1");
                if (r < 0)
                        return r;
        }
        devices_check_somaxconn();
        return devs->shards[0].listener.fd;
}

/* HandshakeThreads>0: one listening socket on the configured address,
 * accepted from by the handshake threads; each shard's endpoint is bound
 * to a free port and its socket replaced by an eventfd that is readable
 * while connections wait for it (devices_handoff()). Returns the
 * listening socket (devs->hs_listen_fd) or -errno. */
static int devices_listen_threads(Devices *devs, const struct sockaddr_storage *ss, socklen_t sl) {
        const CloudConfig *config = devs->config;
        struct sockaddr_storage any = *ss;
        int r;

        devs->hs_listen_fd = devices_reuseport_listener(ss, sl, false);
        if (devs->hs_listen_fd < 0)
                return log_error_errno(devs->hs_listen_fd, "Failed to listen on '%s' port %u: %m",
                                       config->coap_listen, config->coap_port);
        sockaddr_set_port(&any, 0);
        devs->listener_nodelay = true;
        devs->listener_pausable = true;
        for (unsigned i = 0; i < devs->n_shards; i++) {
                _cleanup_close_ int efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);

                if (efd < 0)
                        return log_error_errno(errno, "Failed to make an eventfd: %m");
                r = shard_endpoint_replace(&devs->shards[i], &any, sl, efd, "HandshakeThreads=0");
                if (r < 0)
                        return r;
        }
        devices_check_somaxconn();
        return devs->hs_listen_fd;
}

static void devices_handshake_thread_start(void *userdata) {
        Devices *devs = userdata;

        if (devs->hooks.handshake_thread_start)
                devs->hooks.handshake_thread_start(devs->hooks.userdata);
}

/* The TlsPeerCheck of the handshake threads. */
static int devices_peer_check_thread(void *userdata, const TlsPeer *peer, char *reason, size_t reason_size) {
        Devices *devs = userdata;

        return devs->hooks.peer_check_thread(devs->hooks.userdata, peer, reason, reason_size);
}

/* Start the handshake threads on devs->hs_listen_fd with the keys loaded. */
static int devices_start_threads(Devices *devs) {
        const CloudConfig *config = devs->config;
        HandshakesLimits limits = {
                .max_handshakes = config->max_handshakes,
                .timeout_usec = (uint64_t)config->handshake_timeout_sec * USEC_PER_SEC,
                .grace_usec = (uint64_t)config->handshake_grace_sec * USEC_PER_SEC,
        };
        HandshakesHooks hooks = {
                .handoff = devices_handoff,
                .refused = devices_handshake_refused,
                .thread_start = devices_handshake_thread_start,
                .userdata = devs,
        };
        SSL_CTX *ctx = NULL;
        int r;

        r = tls_server_ctx_new(devs->tls_keys, devs->hooks.peer_check_thread ? devices_peer_check_thread : NULL,
                               devs, &ctx);
        if (r < 0)
                return log_error_errno(r, "Failed to set up TLS for the handshake threads: %m");
        r = handshakes_new(config->handshake_threads, devs->hs_listen_fd, ctx, &limits, &hooks, &devs->handshakes);
        SSL_CTX_free(ctx);
        if (r < 0)
                return log_error_errno(r, "Failed to start %u handshake threads: %m", config->handshake_threads);
        return 0;
}

/* The TlsPeerCheck of every TLS handshake: the Cloud's. */
static int devices_peer_check(void *userdata, const TlsPeer *peer, char *reason, size_t reason_size) {
        Devices *devs = userdata;

        return devs->hooks.peer_check(devs->hooks.userdata, peer, reason, reason_size);
}

/* ---- TLS session ticket keys ([Cloud] TicketKeySec=) ----
 *
 * Kept in StateDirectory/ticket-keys so that devices resume their
 * sessions after a restart of the cloud (the reconnect storm that
 * matters); rotated every TicketKeySec, the previous key still opening
 * tickets for as long again. */

static void devices_tickets_save(Devices *devs) {
        int r = ticket_keys_save(devs->tickets, devs->tickets_path);

        if (r < 0)
                log_warning_errno(r, "Cannot save the TLS ticket keys to '%s' (devices will do full handshakes "
                                  "after a restart): %m", devs->tickets_path);
}

static int devices_tickets_timer_cb(sd_event_source *s, uint64_t usec, void *userdata) {
        Devices *devs = userdata;
        uint64_t period = (devs->config->ticket_key_sec < 60 ? (uint64_t)devs->config->ticket_key_sec : 60);

        if (ticket_keys_rotate(devs->tickets, (uint64_t)time(NULL), false) > 0)
                devices_tickets_save(devs);
        (void)sd_event_source_set_time(s, usec + period * USEC_PER_SEC);
        (void)sd_event_source_set_enabled(s, SD_EVENT_ONESHOT);
        return 0;
}

static int devices_tickets_start(Devices *devs, sd_event *event) {
        const CloudConfig *config = devs->config;
        uint64_t now = (uint64_t)time(NULL);
        bool save = false;
        int r;

        if (config->ticket_key_sec == 0)
                return 0;
        if (asprintf(&devs->tickets_path, "%s/ticket-keys", config->state_dir) < 0) {
                devs->tickets_path = NULL;
                return log_error_errno(-ENOMEM, "Out of memory setting up TLS ticket keys.");
        }
        r = ticket_keys_new(config->ticket_key_sec, now, &devs->tickets);
        if (r < 0)
                return log_error_errno(r, "Cannot make TLS ticket keys: %m");
        r = ticket_keys_load(devs->tickets, devs->tickets_path);
        if (r == -ENOENT)
                save = true;
        else if (r < 0) {
                log_warning_errno(r, "The TLS ticket keys in '%s' cannot be used, replacing them with new ones "
                                  "(devices do full handshakes once): %m", devs->tickets_path);
                save = true;
        } else if (ticket_keys_created(devs->tickets) > now) {
                log_warning("The TLS ticket keys in '%s' were made in the future, replacing them.",
                            devs->tickets_path);
                (void)ticket_keys_reset(devs->tickets, now);
                save = true;
        } else if (ticket_keys_rotate(devs->tickets, now, false) > 0)
                save = true;
        if (save)
                devices_tickets_save(devs);
        tls_server_keys_set_tickets(devs->tls_keys, devs->tickets);
        r = sd_event_add_time_relative(event, &devs->tickets_timer, CLOCK_MONOTONIC,
                                       (config->ticket_key_sec < 60 ? (uint64_t)config->ticket_key_sec : 60) * USEC_PER_SEC,
                                       USEC_PER_SEC, devices_tickets_timer_cb, devs);
        if (r < 0)
                return log_error_errno(r, "Failed to add the ticket key timer: %m");
        return 0;
}

static int devices_start(Devices *devs, sd_event *event, const CloudConfig *config, unsigned *ret_port) {
        struct sockaddr_storage ss;
        socklen_t sl;
        const char *bad = NULL;
        int r, fd;

        /* Past MaxQueuedBytes a device gets no events or calls; only its own
         * requests (each costs an answer) can push it further. */
        devs->hard_queue_limit = 2 * (uint64_t)config->max_queued_bytes + config->max_payload + 1024;
        devs->tls_files = (TlsFiles){ config->ca_file, config->cert_file, config->key_file };
        r = tls_server_keys_load(&devs->tls_files, &devs->tls_keys, &bad);
        if (r < 0)
                return log_error_errno(r, "Cannot load TLS file '%s': %m", bad);
        tls_server_keys_set_peer_check(devs->tls_keys, devices_peer_check, devs);
        tls_server_keys_allow_anonymous(devs->tls_keys, config->enroll_enabled, DEVICES_ENROLL_MESSAGE_MAX);
        r = devices_tickets_start(devs, event);
        if (r < 0)
                return r;

        coap_startup();
        devs->coap_started = true;
        coap_set_log_handler(devices_coap_log);
        coap_set_log_level(log_get_max_level() >= LOG_DEBUG ? LOG_INFO : LOG_WARNING);
        /* Refused handshakes are logged by session_refused(), per address and
         * with the reason; libcoap would log each one, unthrottled. */
        coap_dtls_set_log_level(log_get_max_level() >= LOG_DEBUG ? LOG_INFO : LOG_ERR);
        if (!coap_tls_is_supported())
                return log_error_errno(-EOPNOTSUPP, "libcoap was built without TLS support.");

        tls_server_pki_init(&devs->pki, devs->tls_keys);
        devs->n_shards = config->session_shards > 0 ? config->session_shards : 1;
        devs->shards = calloc(devs->n_shards, sizeof(*devs->shards));
        if (!devs->shards)
                return log_error_errno(-ENOMEM, "Out of memory starting the device server.");
        r = stats_shards(devs->n_shards);
        if (r < 0)
                log_warning_errno(r, "Cannot count sessions per shard in the metrics: %m");
        for (unsigned i = 0; i < devs->n_shards; i++) {
                r = shard_init(devs, &devs->shards[i], i);
                if (r < 0)
                        return r;
        }

        r = cloud_config_resolve_address(config->coap_listen, config->coap_port, &ss, &sl);
        if (r < 0)
                return log_error_errno(r, "Invalid [Cloud] Listen= address '%s'.", config->coap_listen);
        fd = config->handshake_threads > 0 ? devices_listen_threads(devs, &ss, sl)
             : devs->n_shards == 1          ? devices_listen_single(devs, &ss, sl)
                                            : devices_listen_shared(devs, &ss, sl);
        if (fd < 0)
                return fd;
        sl = sizeof(ss);
        if (getsockname(fd, (struct sockaddr *)&ss, &sl) < 0)
                return log_error_errno(errno, "getsockname() failed: %m");
        *ret_port = sockaddr_port(&ss);

        for (unsigned i = 0; i < devs->n_shards; i++) {
                r = shard_add_sources(&devs->shards[i], event);
                if (r < 0)
                        return log_error_errno(r, "Failed to add CoAP event sources: %m");
        }
        r = sd_event_add_defer(event, &devs->kick, devices_kick_cb, devs);
        if (r >= 0)
                r = sd_event_source_set_enabled(devs->kick, SD_EVENT_OFF);
        if (r >= 0)
                r = sd_event_add_defer(event, &devs->close_defer, devices_close_cb, devs);
        if (r >= 0)
                r = sd_event_source_set_enabled(devs->close_defer, SD_EVENT_OFF);
        if (r >= 0)
                r = sd_event_add_time(event, &devs->handshake_timer, CLOCK_MONOTONIC, 0, 100 * USEC_PER_MSEC,
                                      devices_handshake_timer_cb, devs);
        if (r >= 0)
                r = sd_event_source_set_enabled(devs->handshake_timer, SD_EVENT_OFF);
        if (r >= 0)
                r = sd_event_add_time(event, &devs->admission_timer, CLOCK_MONOTONIC, 0, 10 * USEC_PER_MSEC,
                                      devices_admission_timer_cb, devs);
        if (r >= 0)
                r = sd_event_source_set_enabled(devs->admission_timer, SD_EVENT_OFF);
        if (r >= 0)
                r = sd_event_add_time_relative(event, &devs->expiry_timer, CLOCK_MONOTONIC,
                                               DEVICES_EXPIRY_CHECK_SEC * USEC_PER_SEC, USEC_PER_SEC,
                                               devices_expiry_cb, devs);
        if (r >= 0)
                r = sd_event_source_set_enabled(devs->expiry_timer, SD_EVENT_ON);
        if (r >= 0)
                r = sd_event_add_time(event, &devs->trim_timer, CLOCK_MONOTONIC, 0, 100 * USEC_PER_MSEC,
                                      devices_trim_cb, devs);
        if (r >= 0)
                r = sd_event_source_set_enabled(devs->trim_timer, SD_EVENT_OFF);
        if (r < 0)
                return log_error_errno(r, "Failed to add CoAP event sources: %m");
        if (config->handshake_threads > 0) {
                r = devices_start_threads(devs);
                if (r < 0)
                        return r;
        }
        log_debug("Device sessions are spread over %u libcoap contexts on port %u, TLS handshakes on %u threads.",
                  devs->n_shards, *ret_port, config->handshake_threads);
        return 0;
}

int devices_new(sd_event *event, const CloudConfig *config, const DevicesHooks *hooks, unsigned *ret_port,
                Devices **ret) {
        _cleanup_(devices_freep) Devices *devs = NULL;
        unsigned port = 0;
        int r;

        devs = calloc(1, sizeof(*devs));
        if (!devs)
                return log_error_errno(-ENOMEM, "Out of memory starting the device server.");
        devs->event = event;
        devs->config = config;
        devs->hooks = *hooks;
        devs->hs_listen_fd = -EBADF;
        pthread_mutex_init(&devs->refusal_lock, NULL);
        r = devices_start(devs, event, config, &port);
        if (r < 0)
                return r;
        *ret_port = port;
        *ret = TAKE_PTR(devs);
        return 0;
}

int devices_reload_tls(Devices *devs) {
        TlsServerKeys *keys = NULL;
        coap_dtls_pki_t pki;
        const char *bad = NULL;
        int r;

        if (!devs || !devs->shards)
                return -ESRCH;
        r = tls_server_keys_load(&devs->tls_files, &keys, &bad);
        if (r < 0)
                return log_error_errno(r, "Cannot load TLS file '%s', keeping the certificates loaded before: %m",
                                       bad);
        tls_server_keys_set_peer_check(keys, devices_peer_check, devs);
        tls_server_keys_allow_anonymous(keys, devs->config->enroll_enabled, DEVICES_ENROLL_MESSAGE_MAX);
        tls_server_keys_set_tickets(keys, devs->tickets);
        /* libcoap copies the setup and reads the keys only while it handles
         * a ClientHello: the old ones are unused once every shard has the
         * new ones. On a failure the shards done go back to the old ones. */
        tls_server_pki_init(&pki, keys);
        for (unsigned i = 0; i < devs->n_shards; i++) {
                if (coap_context_set_pki(devs->shards[i].ctx, &pki))
                        continue;
                for (unsigned j = 0; j < i; j++)
                        (void)coap_context_set_pki(devs->shards[j].ctx, &devs->pki);
                tls_server_keys_free(keys);
                return log_error_errno(-EINVAL, "Failed to set up TLS again, keeping the certificates loaded before.");
        }
        devs->pki = pki;
        /* No ticket outlives a change of trust: a session resumed after it
         * would carry a certificate the new CA may not have signed. */
        if (devs->tickets && !tls_server_keys_same_ca(devs->tls_keys, keys)) {
                r = ticket_keys_reset(devs->tickets, (uint64_t)time(NULL));
                if (r < 0)
                        log_error_errno(r, "Cannot make new TLS ticket keys after the CA changed: %m");
                else {
                        devices_tickets_save(devs);
                        log_info("The CA changed: TLS ticket keys replaced, devices do full handshakes once.");
                }
        }
        if (devs->handshakes) {
                SSL_CTX *ctx = NULL;

                r = tls_server_ctx_new(keys, devs->hooks.peer_check_thread ? devices_peer_check_thread : NULL,
                                       devs, &ctx);
                if (r < 0)
                        log_error_errno(r, "Cannot set up TLS for the handshake threads again, they keep the "
                                           "certificates loaded before: %m");
                else {
                        handshakes_set_ctx(devs->handshakes, ctx);
                        SSL_CTX_free(ctx);
                }
        }
        tls_server_keys_free(devs->tls_keys);
        devs->tls_keys = keys;
        log_info("Reloaded the TLS certificate '%s', key '%s' and CA '%s' for new device sessions.",
                 devs->config->cert_file, devs->config->key_file, devs->config->ca_file);
        return 0;
}

Devices *devices_free(Devices *devs) {
        Device *d, *next_d;

        if (!devs)
                return NULL;

        /* Sessions libcoap closed but has not freed yet (it frees them in
         * its walk, which the cloud runs at most every DEVICES_SCAN_INTERVAL:
         * e.g. one whose TLS accept failed at once) are freed now, through
         * devices_event_handler(), so that what lib/tls.c attached to them
         * goes too; coap_free_context() below would free them unannounced. */
        for (unsigned i = 0; i < devs->n_shards; i++)
                if (devs->shards[i].ctx) {
                        coap_tick_t now;

                        coap_ticks(&now);
                        (void)libcoap_prepare_epoll()(devs->shards[i].ctx, now);
                }

        /* No handoff after this; what waits is closed. */
        devs->handshakes = handshakes_free(devs->handshakes);
        for (unsigned i = 0; i < devs->n_shards; i++) {
                Shard *sh = &devs->shards[i];

                for (Handoff *o = sh->handoff_head, *next; o; o = next) {
                        next = o->next;
                        SSL_free(o->ssl);
                        close(o->fd);
                        free(o);
                }
                sh->handoff_head = sh->handoff_tail = NULL;
        }
        if (devs->hs_listen_fd >= 0) {
                close(devs->hs_listen_fd);
                devs->hs_listen_fd = -EBADF;
        }

        for (d = devs->dev_head; d; d = d->list_next) {
                while (d->calls)
                        devices_call_cancel(d->calls);
                if (d->conn) {
                        d->conn->device = NULL;
                        d->conn = NULL;
                        devs->hooks.device_gone(devs->hooks.userdata, d);
                }
        }
        /* A paused listener is not in libcoap's epoll set, where it
         * expects to remove it from. */
        (void)devices_listeners_pause(devs, false);
        for (unsigned i = 0; i < devs->n_shards; i++)
                if (devs->shards[i].ctx)
                        coap_register_event_handler(devs->shards[i].ctx, NULL);
        for (size_t k = 0; k < devs->conn_nbuckets; k++)
                while (devs->conn_buckets[k]) {
                        Session *c = devs->conn_buckets[k];

                        if (c->referenced)
                                coap_session_release(c->session);
                        tls_session_forget(c->session);
                        c->closing = false;
                        session_free(c);
                }
        devs->close_queue = NULL;
        for (d = devs->dev_head; d; d = next_d) {
                next_d = d->list_next;
                sd_event_source_disable_unref(d->ping_timer);
                sd_event_source_disable_unref(d->describe_defer);
                sd_event_source_disable_unref(d->check_timer);
                describe_release(devs, d->describe);
                free(d->elsewhere);
                free(d->id);
                free(d);
        }
        free(devs->dev_buckets);
        free(devs->describe_buckets);
        free(devs->dev_order);
        free(devs->conn_buckets);
        devs->kick = sd_event_source_disable_unref(devs->kick);
        devs->close_defer = sd_event_source_disable_unref(devs->close_defer);
        devs->handshake_timer = sd_event_source_disable_unref(devs->handshake_timer);
        devs->admission_timer = sd_event_source_disable_unref(devs->admission_timer);
        devs->expiry_timer = sd_event_source_disable_unref(devs->expiry_timer);
        devs->trim_timer = sd_event_source_disable_unref(devs->trim_timer);
        for (unsigned i = 0; i < devs->n_shards; i++) {
                Shard *sh = &devs->shards[i];

                sh->io = sd_event_source_disable_unref(sh->io);
                sh->timer = sd_event_source_disable_unref(sh->timer);
                if (sh->ctx)
                        coap_free_context(sh->ctx);
                if (sh->handoff_lock_init)
                        pthread_mutex_destroy(&sh->handoff_lock);
        }
        free(devs->shards);
        pthread_mutex_destroy(&devs->refusal_lock);
        tls_server_keys_free(devs->tls_keys);
        devs->tickets_timer = sd_event_source_disable_unref(devs->tickets_timer);
        ticket_keys_free(devs->tickets);
        free(devs->tickets_path);
        if (devs->coap_started)
                coap_cleanup();
        free(devs);
        return NULL;
}
