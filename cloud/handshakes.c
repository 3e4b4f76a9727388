/* SPDX-License-Identifier: Apache-2.0 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "handshakes.h"
#include "log.h"
#include "stats.h"
#include "util.h"

#define USEC_PER_SEC UINT64_C(1000000)
#define USEC_PER_MSEC UINT64_C(1000)
#define MIN(a, b) ((a) < (b) ? (a) : (b))

/* While saturated (max_handshakes reached), a worker looks again this
 * often whether another thread freed a place. */
#define HANDSHAKES_RECHECK_USEC (20 * USEC_PER_MSEC)
/* Connections accepted per wakeup of a worker, so that the handshakes
 * already under way get their turn. */
#define HANDSHAKES_ACCEPT_BATCH 16
#define HANDSHAKES_WARN_INTERVAL (10 * USEC_PER_SEC)
/* After accept() failed for want of descriptors or memory, a worker stops
 * watching the listener this long (it stays readable: no busy loop). */
#define HANDSHAKES_ACCEPT_BACKOFF_USEC (200 * USEC_PER_MSEC)

typedef struct Hs Hs;
struct Hs {
        Hs *prev, *next; /* the worker's list, in accept order */
        int fd;
        SSL *ssl;
        uint64_t accepted;
        uint32_t events; /* registered in the worker's epoll set */
        struct sockaddr_storage addr;
        socklen_t addr_len;
};

typedef struct Worker {
        Handshakes *h;
        unsigned index;
        pthread_t thread;
        bool started;
        int epfd;
        int stop_fd;
        Hs *head, *tail;
        bool listening;
        uint64_t accept_again_at; /* 0, or no accepting before this (CLOCK_MONOTONIC µs) */
        uint64_t warn_timeout_at, warn_evict_at, warn_pause_at, warn_accept_at, warn_wait_at;
        uint64_t timeouts_unlogged, evicted_unlogged, pauses_unlogged;
} Worker;

struct Handshakes {
        Worker *workers;
        unsigned n_workers;
        int listen_fd;
        pthread_mutex_t lock; /* ctx */
        SSL_CTX *ctx;
        HandshakesLimits limits; /* grace_usec: atomic (handshakes_set_grace()) */
        HandshakesHooks hooks;
        unsigned inflight; /* atomic: accepted, not yet adopted or closed */
};

static uint64_t grace_get(Handshakes *h) {
        return __atomic_load_n(&h->limits.grace_usec, __ATOMIC_RELAXED);
}

void handshakes_set_grace(Handshakes *h, uint64_t grace_usec) {
        if (h)
                __atomic_store_n(&h->limits.grace_usec, grace_usec, __ATOMIC_RELAXED);
}

static unsigned inflight_get(Handshakes *h) {
        return __atomic_load_n(&h->inflight, __ATOMIC_RELAXED);
}

static void inflight_add(Handshakes *h, int n) {
        __atomic_add_fetch(&h->inflight, (unsigned)n, __ATOMIC_RELAXED);
}

/* Take a place below max_handshakes for one more connection, or false. */
static bool inflight_reserve(Handshakes *h) {
        unsigned cur = inflight_get(h);

        while (cur < h->limits.max_handshakes)
                if (__atomic_compare_exchange_n(&h->inflight, &cur, cur + 1, true, __ATOMIC_RELAXED,
                                                __ATOMIC_RELAXED))
                        return true;
        return false;
}

void handshakes_adopted(Handshakes *h) {
        if (h)
                inflight_add(h, -1);
}

static void hs_unlink(Worker *w, Hs *hs) {
        if (hs->prev)
                hs->prev->next = hs->next;
        else
                w->head = hs->next;
        if (hs->next)
                hs->next->prev = hs->prev;
        else
                w->tail = hs->prev;
        hs->prev = hs->next = NULL;
}

/* Close a connection whose handshake did not end in a handoff. */
static void hs_close(Worker *w, Hs *hs) {
        hs_unlink(w, hs);
        SSL_free(hs->ssl);
        close(hs->fd);
        free(hs);
        inflight_add(w->h, -1);
}

static void hs_refused(Worker *w, Hs *hs) {
        Handshakes *h = w->h;
        long v = SSL_get_verify_result(hs->ssl);

        stats_handshake_refused(STATS_REFUSED_TLS);
        if (h->hooks.refused)
                h->hooks.refused(h->hooks.userdata, &hs->addr, hs->addr_len, tls_ssl_peer(hs->ssl),
                                 v == X509_V_OK ? NULL : X509_verify_cert_error_string(v));
        hs_close(w, hs);
}

static void hs_finished(Worker *w, Hs *hs) {
        Handshakes *h = w->h;
        int r = tls_server_ssl_finish(hs->ssl);

        ERR_clear_error();
        if (r < 0) {
                hs_refused(w, hs);
                return;
        }
        (void)epoll_ctl(w->epfd, EPOLL_CTL_DEL, hs->fd, NULL);
        /* Counted in inflight until the owner adopts it. */
        if (h->hooks.handoff(h->hooks.userdata, hs->fd, hs->ssl, &hs->addr, hs->addr_len, hs->accepted) < 0) {
                hs_close(w, hs);
                return;
        }
        hs_unlink(w, hs);
        free(hs);
}

/* Drive one handshake as far as its socket allows. */
static void hs_step(Worker *w, Hs *hs) {
        uint32_t want;
        int r, err;

        ERR_clear_error();
        r = SSL_accept(hs->ssl);
        if (r == 1) {
                hs_finished(w, hs);
                return;
        }
        err = SSL_get_error(hs->ssl, r);
        if (err == SSL_ERROR_WANT_READ)
                want = EPOLLIN;
        else if (err == SSL_ERROR_WANT_WRITE)
                want = EPOLLOUT;
        else {
                ERR_clear_error();
                hs_refused(w, hs);
                return;
        }
        if (want != hs->events) {
                struct epoll_event ev = { .events = want, .data.ptr = hs };

                if (epoll_ctl(w->epfd, EPOLL_CTL_MOD, hs->fd, &ev) < 0) {
                        hs_refused(w, hs);
                        return;
                }
                hs->events = want;
        }
}

static SSL_CTX *handshakes_ctx(Handshakes *h) {
        SSL_CTX *ctx;

        pthread_mutex_lock(&h->lock);
        ctx = h->ctx;
        if (ctx && SSL_CTX_up_ref(ctx) != 1)
                ctx = NULL;
        pthread_mutex_unlock(&h->lock);
        return ctx;
}

static void worker_listen(Worker *w, bool on) {
        struct epoll_event ev = { .events = EPOLLIN | EPOLLEXCLUSIVE, .data.ptr = &w->h->listen_fd };

        if (w->listening == on)
                return;
        if (on ? epoll_ctl(w->epfd, EPOLL_CTL_ADD, w->h->listen_fd, &ev)
               : epoll_ctl(w->epfd, EPOLL_CTL_DEL, w->h->listen_fd, NULL))
                return;
        w->listening = on;
}

static void worker_accept(Worker *w) {
        Handshakes *h = w->h;

        for (unsigned i = 0; i < HANDSHAKES_ACCEPT_BATCH && inflight_reserve(h); i++) {
                struct sockaddr_storage addr = {};
                socklen_t len = sizeof(addr);
                struct epoll_event ev;
                SSL_CTX *ctx;
                Hs *hs;
                int fd = accept4(h->listen_fd, (struct sockaddr *)&addr, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);

                if (fd < 0) {
                        int e = errno;
                        uint64_t now;

                        inflight_add(h, -1);
                        if (e == EINTR || e == ECONNABORTED)
                                continue;
                        if (e == EAGAIN || e == EWOULDBLOCK)
                                return;
                        /* Out of descriptors or memory: the listener stays
                         * readable, so wait a while rather than spin. */
                        now = now_usec();
                        w->accept_again_at = now + HANDSHAKES_ACCEPT_BACKOFF_USEC;
                        worker_listen(w, false);
                        if (now >= w->warn_accept_at) {
                                log_warning_errno(-e, "Failed to accept a device connection, not accepting for %" PRIu64
                                                      " ms: %m",
                                                  HANDSHAKES_ACCEPT_BACKOFF_USEC / USEC_PER_MSEC);
                                w->warn_accept_at = now + HANDSHAKES_WARN_INTERVAL;
                        }
                        return;
                }
                stats_handshake_started();
                ctx = handshakes_ctx(h);
                hs = calloc(1, sizeof(*hs));
                if (hs)
                        hs->ssl = ctx ? tls_server_ssl_new(ctx, fd) : NULL;
                SSL_CTX_free(ctx);
                if (!hs || !hs->ssl) {
                        log_error("Out of memory accepting a device connection.");
                        free(hs);
                        close(fd);
                        inflight_add(h, -1);
                        stats_handshake_refused(STATS_REFUSED_TLS);
                        continue;
                }
                hs->fd = fd;
                hs->accepted = now_usec();
                hs->addr = addr;
                hs->addr_len = len;
                hs->events = EPOLLIN;
                hs->prev = w->tail;
                if (w->tail)
                        w->tail->next = hs;
                else
                        w->head = hs;
                w->tail = hs;
                ev = (struct epoll_event){ .events = EPOLLIN, .data.ptr = hs };
                if (epoll_ctl(w->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
                        hs_refused(w, hs);
                        continue;
                }
                hs_step(w, hs);
        }
}

/* Handshakes past the timeout are closed; at the limit, the oldest once
 * it has had its grace. */
static void worker_expire(Worker *w, uint64_t now) {
        Handshakes *h = w->h;
        uint64_t n = 0;

        while (w->head && w->head->accepted + h->limits.timeout_usec <= now) {
                stats_handshake_refused(STATS_REFUSED_TIMEOUT);
                hs_close(w, w->head);
                n++;
        }
        if (n > 0 && now >= w->warn_timeout_at) {
                log_warning("Closed %" PRIu64 " sessions that did not complete the TLS handshake within "
                            "HandshakeTimeoutSec=%" PRIu64 "s (and %" PRIu64 " unreported before).",
                            n + w->timeouts_unlogged, h->limits.timeout_usec / USEC_PER_SEC, w->timeouts_unlogged);
                w->timeouts_unlogged = 0;
                w->warn_timeout_at = now + HANDSHAKES_WARN_INTERVAL;
        } else
                w->timeouts_unlogged += n;
        if (inflight_get(h) >= h->limits.max_handshakes && w->head && w->head->accepted + grace_get(h) <= now) {
                uint64_t waited = now - w->head->accepted;

                stats_handshake_refused(STATS_REFUSED_EVICTED);
                hs_close(w, w->head);
                if (now >= w->warn_evict_at) {
                        log_warning("MaxHandshakes=%u sessions in the TLS handshake: closed the oldest, "
                                    "unbound after %" PRIu64 " ms, to accept a new connection (%" PRIu64 " closed "
                                                                                                         "so since "
                                                                                                         "the last "
                                                                                                         "report).",
                                    h->limits.max_handshakes, waited / USEC_PER_MSEC, w->evicted_unlogged + 1);
                        w->evicted_unlogged = 0;
                        w->warn_evict_at = now + HANDSHAKES_WARN_INTERVAL;
                } else
                        w->evicted_unlogged++;
        }
}

/* Accept while below max_handshakes; at it, say so (rate limited). */
static void worker_admit(Worker *w, uint64_t now) {
        Handshakes *h = w->h;
        bool room = inflight_get(h) < h->limits.max_handshakes;
        uint64_t grace = grace_get(h), left;

        if (w->accept_again_at > now)
                return; /* worker_accept() stopped listening for a while */
        w->accept_again_at = 0;
        if (!room && w->listening) {
                left = w->head && w->head->accepted + grace > now ? w->head->accepted + grace - now : 0;
                if (now >= w->warn_pause_at) {
                        log_warning("MaxHandshakes=%u sessions in the TLS handshake: not accepting new connections "
                                    "for up to %" PRIu64 " ms, until one ends or the oldest has had %" PRIu64
                                    " ms (%" PRIu64 " times since the last report).",
                                    h->limits.max_handshakes, left / USEC_PER_MSEC, grace / USEC_PER_MSEC,
                                    w->pauses_unlogged + 1);
                        w->pauses_unlogged = 0;
                        w->warn_pause_at = now + HANDSHAKES_WARN_INTERVAL;
                } else
                        w->pauses_unlogged++;
        }
        worker_listen(w, room);
}

/* Milliseconds until the next thing to do without an event; -1: none. */
static int worker_timeout(Worker *w, uint64_t now) {
        Handshakes *h = w->h;
        uint64_t at = UINT64_MAX;

        if (w->head)
                at = w->head->accepted + h->limits.timeout_usec;
        if (w->accept_again_at)
                at = MIN(at, w->accept_again_at);
        if (!w->listening) {
                at = MIN(at, now + HANDSHAKES_RECHECK_USEC);
                if (w->head)
                        at = MIN(at, w->head->accepted + grace_get(h));
        }
        if (at == UINT64_MAX)
                return -1;
        if (at <= now)
                return 0;
        return (int)MIN((at - now + USEC_PER_MSEC - 1) / USEC_PER_MSEC, (uint64_t)60000);
}

static void *worker_main(void *arg) {
        Worker *w = arg;
        Handshakes *h = w->h;
        struct epoll_event events[64];
        char name[16];

        snprintf(name, sizeof(name), "handshake-%u", w->index);
        (void)pthread_setname_np(pthread_self(), name);
        if (h->hooks.thread_start)
                h->hooks.thread_start(h->hooks.userdata);
        for (;;) {
                uint64_t now = now_usec();
                int n;

                worker_expire(w, now);
                worker_admit(w, now);
                n = epoll_wait(w->epfd, events, (int)ELEMENTSOF(events), worker_timeout(w, now));
                if (n < 0) {
                        struct timespec pause = { .tv_nsec = 100 * 1000 * 1000 };

                        if (errno == EINTR)
                                continue;
                        /* Not expected (the epoll fd is the thread's own);
                         * the thread must not end: it would stop accepting. */
                        if (now >= w->warn_wait_at) {
                                log_error_errno(errno, "epoll_wait() of a handshake thread failed: %m");
                                w->warn_wait_at = now + HANDSHAKES_WARN_INTERVAL;
                        }
                        (void)nanosleep(&pause, NULL);
                        continue;
                }
                for (int i = 0; i < n; i++) {
                        void *p = events[i].data.ptr;

                        if (p == &w->stop_fd)
                                return NULL;
                        if (p == &h->listen_fd)
                                worker_accept(w);
                        else
                                hs_step(w, p);
                }
        }
        return NULL;
}

int handshakes_new(unsigned threads, int listen_fd, SSL_CTX *ctx, const HandshakesLimits *limits,
                   const HandshakesHooks *hooks, Handshakes **ret) {
        Handshakes *h;
        sigset_t all, old;
        int r = 0;

        if (threads == 0 || listen_fd < 0 || !ctx || !hooks || !hooks->handoff || limits->max_handshakes == 0)
                return -EINVAL;
        h = calloc(1, sizeof(*h));
        if (!h)
                return -ENOMEM;
        pthread_mutex_init(&h->lock, NULL);
        h->listen_fd = listen_fd;
        h->limits = *limits;
        h->hooks = *hooks;
        if (SSL_CTX_up_ref(ctx) != 1) {
                handshakes_free(h);
                return -ENOMEM;
        }
        h->ctx = ctx;
        h->workers = calloc(threads, sizeof(*h->workers));
        if (!h->workers) {
                handshakes_free(h);
                return -ENOMEM;
        }
        h->n_workers = threads;
        for (unsigned i = 0; i < threads; i++)
                h->workers[i].epfd = h->workers[i].stop_fd = -1;
        for (unsigned i = 0; i < threads; i++) {
                Worker *w = &h->workers[i];
                struct epoll_event ev = { .events = EPOLLIN, .data.ptr = &w->stop_fd };

                w->h = h;
                w->index = i;
                w->epfd = epoll_create1(EPOLL_CLOEXEC);
                w->stop_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
                if (w->epfd < 0 || w->stop_fd < 0 || epoll_ctl(w->epfd, EPOLL_CTL_ADD, w->stop_fd, &ev) < 0) {
                        r = -errno;
                        handshakes_free(h);
                        return r;
                }
        }
        /* The workers take no signal: the loop's thread handles them. */
        sigfillset(&all);
        pthread_sigmask(SIG_BLOCK, &all, &old);
        for (unsigned i = 0; i < threads && r == 0; i++) {
                r = -pthread_create(&h->workers[i].thread, NULL, worker_main, &h->workers[i]);
                h->workers[i].started = r == 0;
        }
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        if (r < 0) {
                handshakes_free(h);
                return r;
        }
        *ret = h;
        return 0;
}

void handshakes_set_ctx(Handshakes *h, SSL_CTX *ctx) {
        SSL_CTX *old;

        if (!h || !ctx || SSL_CTX_up_ref(ctx) != 1)
                return;
        pthread_mutex_lock(&h->lock);
        old = h->ctx;
        h->ctx = ctx;
        pthread_mutex_unlock(&h->lock);
        SSL_CTX_free(old);
}

Handshakes *handshakes_free(Handshakes *h) {
        if (!h)
                return NULL;
        for (unsigned i = 0; i < h->n_workers; i++) {
                Worker *w = &h->workers[i];

                if (w->started) {
                        (void)eventfd_write(w->stop_fd, 1);
                        pthread_join(w->thread, NULL);
                }
                while (w->head)
                        hs_close(w, w->head);
                if (w->epfd >= 0)
                        close(w->epfd);
                if (w->stop_fd >= 0)
                        close(w->stop_fd);
        }
        free(h->workers);
        SSL_CTX_free(h->ctx);
        pthread_mutex_destroy(&h->lock);
        free(h);
        return NULL;
}
