/* SPDX-License-Identifier: Apache-2.0 */
/* TLS handshakes of device connections on worker threads ([Cloud]
 * HandshakeThreads=), so that a connect storm can use more than the event
 * loop's core: each worker accepts from the one listening socket, runs
 * the server handshake with an SSL_CTX of lib/tls.c (tls_server_ctx_new())
 * and hands the finished connection (socket and SSL) to its owner through
 * a hook; the owner gives it to libcoap (docs/design/libcoap.md,
 * "Handshakes on threads"). At most max_handshakes in all are accepted
 * and not yet adopted: a place is reserved before each accept4().
 *
 * Guarantees: the workers touch nothing but the listening socket, the
 * connections they accepted, the SSL_CTX (replaced under a lock), the
 * metrics (atomic) and the hooks, which run on a worker thread. At most
 * max_handshakes connections are in a handshake or handed off and not yet
 * adopted (handshakes_adopted()); beyond that the workers stop accepting
 * (connections wait in the listen backlog), and once the oldest handshake
 * of a worker has had grace_usec it is closed to accept the next. A
 * handshake not done within timeout_usec is closed. Every refusal,
 * timeout and eviction is counted in the metrics and logged, rate
 * limited. */
#pragma once

#include <stdint.h>
#include <sys/socket.h>

#include "tls.h"

typedef struct Handshakes Handshakes;

typedef struct HandshakesHooks {
        /* A finished handshake, on a worker thread. On 0 the callee owns
         * fd and ssl and calls handshakes_adopted() once libcoap holds
         * them (or once it closed them); on a negative errno the worker
         * closes them. accepted: CLOCK_MONOTONIC µs of the accept(). */
        int (*handoff)(void *userdata, int fd, SSL *ssl, const struct sockaddr_storage *peer, socklen_t peer_len,
                       uint64_t accepted);
        /* A handshake that failed, on a worker thread, before the
         * connection is closed: p is what the certificate checks saw (NULL
         * if no certificate was seen), verify_error OpenSSL's reason for
         * refusing the chain (NULL if it did not). */
        void (*refused)(void *userdata, const struct sockaddr_storage *peer, socklen_t peer_len, const TlsPeer *p,
                        const char *verify_error);
        /* Optional: on each worker thread as it starts, before it accepts
         * (per-thread resources the hooks use, such as a database handle). */
        void (*thread_start)(void *userdata);
        void *userdata;
} HandshakesHooks;

typedef struct HandshakesLimits {
        unsigned max_handshakes; /* in a handshake or handed off, not adopted */
        uint64_t timeout_usec;   /* from accept() to the end of the handshake */
        uint64_t grace_usec;     /* at max_handshakes, the oldest keeps its place this long */
} HandshakesLimits;

/* threads workers accepting from listen_fd (non-blocking, listening; the
 * caller's to close after handshakes_free()) with ctx (a reference is
 * taken). 0 or -errno. */
int handshakes_new(unsigned threads, int listen_fd, SSL_CTX *ctx, const HandshakesLimits *limits,
                   const HandshakesHooks *hooks, Handshakes **ret);
/* Handshakes that start from now on use ctx (a reference is taken). */
void handshakes_set_ctx(Handshakes *h, SSL_CTX *ctx);
/* One connection handed off has been taken by libcoap (or closed). */
void handshakes_adopted(Handshakes *h);
/* From now on, at max_handshakes the oldest keeps its place this long
 * (the owner lengthens it while devices take longer to get online). */
void handshakes_set_grace(Handshakes *h, uint64_t grace_usec);
/* Stops and joins the workers, closes the connections still in a
 * handshake. NULL. */
Handshakes *handshakes_free(Handshakes *h);
