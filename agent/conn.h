/* SPDX-License-Identifier: Apache-2.0 */
/* The agent's one connection to the cloud: libcoap client session over
 * TLS/TCP, driven by the agent's sd-event loop; keepalive, reconnect with
 * backoff and jitter, the requests the cloud sends us (describe, call,
 * read), and the requests we send (publish, subscribe). Each attempt goes
 * through [Cloud] Host='s entries in order, from the first, and within an
 * entry through every address its name resolves to; the cloud's
 * certificate is checked against the name of the entry being tried. The
 * backoff comes only when the last entry failed. */
#pragma once

#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <systemd/sd-event.h>

#include "agent-config.h"
#include "outbox.h"
#include "registry.h"

typedef struct Conn Conn;

/* Requests from the cloud served, by outcome (the response code). */
typedef enum ConnServed {
        CONN_SERVED_OK,        /* 2.xx */
        CONN_SERVED_NOT_FOUND, /* 4.04: no such function or variable */
        CONN_SERVED_REJECTED,  /* another 4.xx (bad name, argument refused, too large) */
        CONN_SERVED_BUSY,      /* 5.03 */
        CONN_SERVED_ERROR,     /* another 5.xx */
        _CONN_SERVED_MAX,
} ConnServed;

/* Counters since the agent started (tetherctl status --json, "counters";
 * docs/cli.md). */
typedef struct ConnStats {
        uint64_t connect_attempts;     /* name lookups started (each may try several addresses) */
        uint64_t handshakes_completed; /* TLS and CSM done: connected */
        uint64_t handshakes_resumed;   /* of those, resumed a TLS session (lib/tls.h, TlsResume) */
        bool resumed;                  /* the last connection's handshake resumed a session */
        uint64_t handshakes_failed;    /* an address that failed before connecting (TCP, TLS, timeout) */
        uint64_t reconnects;           /* connections lost once established */
        uint64_t connected_ms;         /* time connected in connections that ended */
        uint64_t calls[_CONN_SERVED_MAX];
        uint64_t reads[_CONN_SERVED_MAX];
        uint64_t events_published; /* accepted into the outbox */
        uint64_t events_acked;     /* acknowledged by the cloud (2.xx) */
        uint64_t events_refused;   /* refused by the cloud for good (4.xx), dropped */
        uint64_t events_held;      /* answered 4.29 (too many requests): kept, sent again later */
} ConnStats;

/* Signal used to learn that an asynchronous name lookup finished. The
 * caller must block it (with the other signals sd-event handles) before
 * conn_new(). */
#define CONN_RESOLVE_SIGNAL (SIGRTMIN + 1)

/* What the stream_request hook answers besides its code: a text (CF 0)
 * or, with json, a JSON body (CF 50); "" for no payload. max_age > 0 sets
 * Max-Age (a 4.29's retry time). */
typedef struct ConnStreamAnswer {
        char text[256];
        bool json;
        uint32_t max_age;
} ConnStreamAnswer;

typedef struct ConnHooks {
        void *userdata;
        /* Connection state changed; status is a human line for STATUS=. */
        void (*state_changed)(void *userdata, bool connected, const char *status);
        /* Describe JSON for GET /d; caller of the hook frees *ret. */
        int (*describe)(void *userdata, char **ret, size_t *ret_len);
        /* The number of events waiting in the outbox changed (may be NULL). */
        void (*queue_changed)(void *userdata, size_t queued);
        /* POST /o/{job} from the cloud (start an OTA job). Returns the CoAP
         * response code and writes a diagnostic into text. NULL: 4.04. */
        unsigned (*ota_request)(void *userdata, const char *job, const uint8_t *data, size_t len, char *text,
                                size_t text_size);
        /* PUT, POST or DELETE /t/{sid} from the cloud (docs/protocol.md,
         * "Streams: tunnels and logs"); sid is 1..4294967295 (anything else
         * under /t/ is answered 4.04 by the Conn). query is the request's
         * Uri-Query options joined with '&' (query_len 0: none), data its
         * payload; both valid during the call only. Returns the response
         * code and fills *answer. Runs inside libcoap's request handler:
         * whatever it sends in return goes from the loop afterwards
         * (agent/streams.c does so from a defer source), so that the
         * answer is not overtaken. NULL: 4.04. */
        unsigned (*stream_request)(void *userdata, unsigned method, uint32_t sid, const char *query,
                                   size_t query_len, const uint8_t *data, size_t len, ConnStreamAnswer *answer);
} ConnHooks;

/* The answer to conn_request(): error is 0 with the response code and
 * payload (valid during the call only), -ENOTCONN if the connection went
 * before an answer came, -ETIMEDOUT if none came in time. retry_sec is,
 * for a 4.29 (Too Many Requests), the seconds to wait before sending it
 * again: the answer's Max-Age (60 without one, RFC 8516) kept within
 * 1..3600; for a 5.03 (Service Unavailable) the same from its Max-Age;
 * 0 otherwise. */
typedef void (*conn_request_fn)(int error, unsigned code, const uint8_t *data, size_t len, uint32_t retry_sec,
                                void *userdata);

/* cfg is borrowed and must stay valid until conn_reconfigure() or
 * conn_free(); reg and outbox are borrowed for the life of the Conn (the
 * Conn sends what the outbox holds, acknowledges it, and syncs it on a
 * timer; conn_free() syncs it once more). */
int conn_new(sd_event *event, Registry *reg, Outbox *outbox, const Config *cfg, const ConnHooks *hooks,
             Conn **ret);
Conn *conn_free(Conn *c);
static inline void conn_freep(Conn **c) { conn_free(*c); }

/* Start connecting (non-blocking). */
int conn_start(Conn *c);
/* Connect now if not connected or connecting: forget the backoff (the
 * device was just enrolled, its certificate is in place). Also starts a
 * Conn that conn_start() was not called for. */
void conn_retry_now(Conn *c);
/* Swap in a new config. Reconnects only when the cloud settings changed,
 * and only a Conn that was started (never one waiting for enrollment). */
int conn_reconfigure(Conn *c, const Config *cfg);
/* Accept an event for the cloud: the one entry point for every producer
 * (plugins, the local API). Returns only once the event is in the outbox
 * file; from then on it is delivered in order, exactly once (see
 * docs/protocol.md). name/data are copied. -EINVAL bad name or data,
 * -E2BIG data over MaxPayload, -ENOBUFS outbox full (Overflow=reject),
 * -ENOSPC/-EIO the outbox could not be written. */
int conn_publish(Conn *c, const char *name, const char *data, uint32_t ttl, uint32_t flags);
/* The registry's subscriptions or describe data changed: bring the cloud
 * up to date (re-subscribe; ask it to fetch describe again). */
void conn_registry_changed(Conn *c);
/* Something else in the describe document changed (the inventory): ask
 * the cloud to fetch it again (POST /d) if connected; a new session
 * fetches it anyway. */
void conn_describe_changed(Conn *c);

/* Send METHOD /path0[/rest] with a payload (copied; content_format < 0:
 * none) to the cloud. Only while connected (-ENOTCONN otherwise); cb then
 * runs exactly once, never from within this call. */
int conn_request(Conn *c, unsigned method, const char *path0, const char *rest, const void *payload, size_t len,
                 int content_format, uint64_t timeout_ms, conn_request_fn cb, void *userdata);
/* conn_request() with Uri-Query options: query (may be NULL or "") holds
 * them separated by '&' ("ack=5&fin"), each sent as one option. */
int conn_request_query(Conn *c, unsigned method, const char *path0, const char *rest, const char *query,
                       const void *payload, size_t len, int content_format, uint64_t timeout_ms, conn_request_fn cb,
                       void *userdata);

/* What a response to conn_request_block2() said besides its code:
 * Block2 (have_block2; num, more, szx: 7 is BERT, where num counts
 * 1024-byte units), Size2 (have_size2) and the ETag (etag_len 0: none;
 * at most 8 bytes). */
typedef struct ConnBlock {
        bool have_block2, more, have_size2;
        uint32_t num;
        unsigned szx;
        uint64_t size2;
        uint8_t etag[8];
        size_t etag_len;
} ConnBlock;

/* The answer to conn_request_block2(): as conn_request_fn, with the
 * response's block options in *block (NULL when error < 0); valid during
 * the call only. */
typedef void (*conn_block_fn)(int error, unsigned code, const ConnBlock *block, const uint8_t *data, size_t len,
                              uint32_t retry_sec, void *userdata);

/* GET /path0[/rest] with a Block2 option asking for block num of size szx
 * (0..6: 16 << szx bytes; 7: BERT, RFC 8323), for a block-wise download
 * (docs/protocol.md, "Artifacts"). As conn_request(): only while
 * connected (-ENOTCONN otherwise); cb runs exactly once, never from
 * within this call: -ENOTCONN when the connection goes first (also from
 * conn_free()), -ETIMEDOUT after timeout_ms. */
int conn_request_block2(Conn *c, const char *path0, const char *rest, uint32_t num, unsigned szx, uint64_t timeout_ms,
                        conn_block_fn cb, void *userdata);
bool conn_is_connected(Conn *c);
/* Whether both CSMs of the current session allow BERT (Block2 SZX 7,
 * RFC 8323 section 6): each peer's carries Block-Wise-Transfer and a
 * Max-Message-Size above 1152 bytes. False while not connected. */
bool conn_bert_allowed(Conn *c);
/* The [Cloud] Host= entry connected to, being tried, or (while backing
 * off) tried last; the first one before any attempt. *ret_index (may be
 * NULL) is its position in Host=. Owned by the Conn, valid until the next
 * call into it. */
const ConfigHost *conn_host(Conn *c, size_t *ret_index);
/* Our device id (the CN of [Device] Certificate=), read at each connection
 * or on first use; NULL if the certificate has none that is valid. Owned by
 * the Conn. */
const char *conn_device_id(Conn *c);
/* Events queued and not yet acknowledged by the cloud. */
size_t conn_queued(Conn *c);
/* The counters; valid while c lives. */
const ConnStats *conn_stats(Conn *c);
/* Milliseconds connected, the current connection included. */
uint64_t conn_connected_ms(Conn *c);
/* The name of a ConnServed value ("ok", "not_found", ...). */
const char *conn_served_name(ConnServed s);
