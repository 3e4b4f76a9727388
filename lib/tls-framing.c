/* SPDX-License-Identifier: Apache-2.0 */
#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/err.h>

#include "log.h"
#include "tls-framing.h"

/* The header's size from its first byte, as libcoap counts it
 * (coap_pdu_parse_header_size()): Len/TKL byte, extended length, code. */
static size_t header_size(uint8_t b0) {
        switch (b0 >> 4) {
        case 13:
                return 3;
        case 14:
                return 4;
        case 15:
                return 6;
        default:
                return 2;
        }
}

/* The bytes after a whole header h: token and options plus payload (as
 * libcoap's coap_pdu_parse_size() counts them). */
static uint64_t body_size(const uint8_t *h) {
        uint64_t len = h[0] >> 4;

        if (len == 13)
                len = 13 + (uint64_t)h[1];
        else if (len == 14)
                len = 269 + ((uint64_t)h[1] << 8 | h[2]);
        else if (len == 15)
                len = 65805 + ((uint64_t)h[1] << 24 | (uint64_t)h[2] << 16 | (uint64_t)h[3] << 8 | h[4]);
        return len + (h[0] & 0x0f);
}

size_t tls_framing_scan(TlsFraming *f, const uint8_t *p, size_t n, int full) {
        uint8_t h[TLS_FRAMING_HEADER_MAX];
        size_t i = 0, hs;

        for (;;) {
                if (f->body > 0) {
                        uint64_t k = f->body < n - i ? f->body : n - i;

                        i += k;
                        f->body -= k;
                        if (f->body > 0)
                                return n;
                }
                if (i == n)
                        return n;
                if (f->split) {
                        /* The rest of the header whose byte 0 went alone: all of it in this read, or none. */
                        hs = header_size(f->first);
                        if (n - i < hs - 1)
                                return i;
                        h[0] = f->first;
                        memcpy(h + 1, p + i, hs - 1);
                        if (f->max_body && body_size(h) > f->max_body) {
                                f->too_big = 1;
                                return i;
                        }
                        f->body = body_size(h);
                        f->split = 0;
                        i += hs - 1;
                        continue;
                }
                hs = header_size(p[i]);
                if (n - i >= hs) {
                        if (f->max_body && body_size(p + i) > f->max_body) {
                                f->too_big = 1;
                                return i;
                        }
                        f->body = body_size(p + i);
                        i += hs;
                        continue;
                }
                if (full && n - i == 1) {
                        f->first = p[i];
                        f->split = 1;
                        return n;
                }
                return i;
        }
}

/* SSL_read() runs on every thread that reads TLS (libcurl's too): the
 * index is published once, atomically, and made under a lock so that
 * sessions attached on several threads share one index. */
static int framing_index = -1;
static pthread_mutex_t framing_lock = PTHREAD_MUTEX_INITIALIZER;
static int (*libssl_read)(SSL *ssl, void *buf, int num);

static void framing_free(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int idx, long argl, void *argp) {
        (void)parent, (void)ad, (void)idx, (void)argl, (void)argp;
        free(ptr);
}

/* libssl's SSL_read(): the next definition after this program's. */
static int real_read(SSL *ssl, void *buf, int num) {
        int (*fn)(SSL *, void *, int) = __atomic_load_n(&libssl_read, __ATOMIC_RELAXED);
        size_t got;

        if (!fn) {
                *(void **)&fn = dlsym(RTLD_NEXT, "SSL_read");
                if (!fn)
                        /* Not found (no libssl after us): the same through the other entry point. */
                        return SSL_read_ex(ssl, buf, num < 0 ? 0 : (size_t)num, &got) == 1 ? (int)got : -1;
                __atomic_store_n(&libssl_read, fn, __ATOMIC_RELAXED);
        }
        return fn(ssl, buf, num);
}

/* pre: bytes already in buf, read unframed (see SSL_read()); 0 otherwise. */
static int framing_read(TlsFraming *f, SSL *ssl, uint8_t *buf, size_t num, size_t pre) {
        size_t n, safe;
        int r = 1;

        if (f->too_big)
                goto too_big;
        /* Application data comes after the handshake: whether the peer
         * sent a certificate is settled. */
        if (f->anonymous_max && !f->max_body && SSL_is_init_finished(ssl) && !SSL_get0_peer_certificate(ssl))
                f->max_body = f->anonymous_max;
        if (pre > 0 && (num < TLS_FRAMING_HEADER_MAX || f->plain)) {
                f->plain = 1;
                return (int)pre;
        }
        if (num < TLS_FRAMING_HEADER_MAX || f->plain) {
                /* libcoap never reads less. Such a reader gets the kept bytes in order, then plain reads,
                 * whatever it asks for next: once kept bytes went on here, the state no longer matches
                 * the stream and would keep back bytes of it (held until the peer sends more). */
                if (f->n_head > 0) {
                        n = num < f->n_head ? num : f->n_head;
                        memcpy(buf, f->head, n);
                        memmove(f->head, f->head + n, f->n_head - n);
                        f->n_head -= (uint8_t)n;
                        f->plain = 1;
                        return (int)n;
                }
                SSL_set_ex_data(ssl, __atomic_load_n(&framing_index, __ATOMIC_RELAXED), NULL);
                free(f);
                return real_read(ssl, buf, (int)num);
        }
        if (pre > 0) {
                /* Attached during that read: nothing kept yet. */
                n = pre;
                r = (int)pre;
        } else {
                memcpy(buf, f->head, f->n_head);
                n = f->n_head;
                f->n_head = 0;
        }
        for (;;) {
                TlsFraming t = *f;

                if (n < num && !pre) {
                        r = real_read(ssl, buf + n, (int)(num - n));
                        if (r > 0)
                                n += (size_t)r;
                }
                pre = 0;
                safe = tls_framing_scan(&t, buf, n, n == num);
                /* Go on while nothing can be handed on yet (only the start
                 * of a header: the rest may be there already), and while
                 * OpenSSL holds more that it read from the socket: libcoap
                 * reads again at once only after a full buffer, else it
                 * waits for the socket, which then has nothing to say. */
                if (r <= 0 || n == num || t.too_big || (safe > 0 && !SSL_has_pending(ssl))) {
                        *f = t;
                        break;
                }
        }
        if (f->too_big)
                goto too_big;
        if (n - safe > sizeof(f->head))
                safe = n; /* cannot happen (num >= TLS_FRAMING_HEADER_MAX); never lose bytes */
        memcpy(f->head, buf + safe, n - safe);
        f->n_head = (uint8_t)(n - safe);
        /* Nothing to hand on: the last read's result, so SSL_get_error() tells the caller why. */
        return safe > 0 ? (int)safe : r;
too_big:
        /* Nothing more of this stream is handed on: an error on the
         * queue makes SSL_get_error() say SSL_ERROR_SSL. */
        ERR_raise_data(ERR_LIB_SSL, SSL_R_EXCESSIVE_MESSAGE_SIZE, "a CoAP message of more than %llu bytes",
                       (unsigned long long)f->max_body);
        return -1;
}

__attribute__((visibility("default"))) int SSL_read(SSL *ssl, void *buf, int num) {
        int idx = __atomic_load_n(&framing_index, __ATOMIC_ACQUIRE);
        TlsFraming *f = ssl && idx >= 0 ? SSL_get_ex_data(ssl, idx) : NULL;

        int r;

        if (f && num > 0)
                return framing_read(f, ssl, buf, (size_t)num, 0);
        r = real_read(ssl, buf, num);
        if (f || r <= 0 || num <= 0 || !ssl)
                return r;
        /* The read that completes a handshake also returns the first
         * application data when it is there, and the framing was attached
         * inside it (at the ClientHello, or at the certificate check): what
         * it returned is the start of the stream, and must be framed. */
        idx = __atomic_load_n(&framing_index, __ATOMIC_ACQUIRE);
        f = idx >= 0 ? SSL_get_ex_data(ssl, idx) : NULL;
        return f ? framing_read(f, ssl, buf, (size_t)num, (size_t)r) : r;
}

/* The ex data index, made on first use (retried after a failure); -1: none. */
static int framing_index_get(void) {
        int idx = __atomic_load_n(&framing_index, __ATOMIC_ACQUIRE);

        if (idx >= 0)
                return idx;
        pthread_mutex_lock(&framing_lock);
        idx = framing_index;
        if (idx < 0) {
                idx = SSL_get_ex_new_index(0, NULL, NULL, NULL, framing_free);
                if (idx >= 0) {
                        __atomic_store_n(&framing_index, idx, __ATOMIC_RELEASE);
                        if (dlsym(RTLD_DEFAULT, "SSL_read") != (void *)SSL_read)
                                log_warning("SSL_read() is not this program's: a CoAP header split over TLS "
                                            "records will desynchronise the session (docs/design/libcoap.md, "
                                            "\"Trap C\").");
                }
        }
        pthread_mutex_unlock(&framing_lock);
        return idx;
}

int tls_framing_attach(SSL *ssl) {
        int idx = framing_index_get();
        TlsFraming *f;

        if (idx < 0)
                return -ENOMEM;
        if (SSL_get_ex_data(ssl, idx))
                return 0;
        f = calloc(1, sizeof(*f));
        if (!f)
                return -ENOMEM;
        if (!SSL_set_ex_data(ssl, idx, f)) {
                free(f);
                return -ENOMEM;
        }
        return 0;
}

int tls_framing_limit_anonymous(SSL *ssl, uint64_t max) {
        int idx = __atomic_load_n(&framing_index, __ATOMIC_ACQUIRE);
        TlsFraming *f = idx >= 0 ? SSL_get_ex_data(ssl, idx) : NULL;

        if (!f)
                return -ENOENT;
        f->anonymous_max = max;
        return 0;
}
