/* SPDX-License-Identifier: Apache-2.0 */
/* Reads of CoAP over TLS over TCP (RFC 8323) that end where libcoap can
 * resume. libcoap 4.3.1 loses its place in the stream when a read ends
 * inside a message header after its first byte (coap_read_session() in
 * src/net.c does not count the header bytes it keeps), which a peer causes
 * by cutting a header over TLS records; every later message on the session
 * is then misread (docs/design/libcoap.md, "Trap C").
 *
 * This module defines SSL_read() in the program: the dynamic linker binds
 * libcoap's calls to it instead of libssl's. For an SSL marked with
 * tls_framing_attach() it reads through SSL_read() of libssl and hands on
 * only what ends at a safe place, keeping back the start of a header
 * until the rest of it has arrived; every other SSL (libcurl's, for
 * example) gets libssl's SSL_read() unchanged. */
#pragma once

#include <openssl/ssl.h>
#include <stddef.h>
#include <stdint.h>

/* The longest RFC 8323 header: Len/TKL byte, 4 bytes extended length, code. */
#define TLS_FRAMING_HEADER_MAX 6

/* Where the reader is in the stream of messages. */
typedef struct TlsFraming {
        uint64_t body;                            /* bytes of the current message after its header still to come */
        uint8_t head[TLS_FRAMING_HEADER_MAX - 1]; /* kept back: the start of a header, handed on next time */
        uint8_t n_head;
        uint8_t first;                            /* byte 0 of a header handed on alone (split) */
        uint8_t split;                            /* 1: byte 0 was handed on, the rest must follow in one read */
        uint8_t plain;                            /* 1: a short read took kept bytes; plain reads once they are out */
        uint8_t too_big;                          /* 1: a header announced more than max_body */
        uint64_t max_body;                        /* 0, or the most a message may have after its header */
        uint64_t anonymous_max;                   /* 0, or max_body once the handshake ended without a peer
                                                   * certificate (tls_framing_limit_anonymous()) */
} TlsFraming;

/* Mark ssl, before it has read any application data, so that every read
 * of it ends where libcoap can resume; the state is freed with the SSL.
 * Idempotent. 0 or -ENOMEM. Logs once if the program's SSL_read() is not
 * the one the dynamic linker binds (then reads are not framed). */
int tls_framing_attach(SSL *ssl);

/* Bound the messages ssl (attached) reads once its handshake has ended
 * without a certificate from the peer: a header announcing more than max
 * bytes after it fails that read (SSL_ERROR_SSL, and libcoap closes the
 * session) before libcoap allocates or buffers its body. libcoap 4.3.1
 * takes messages of up to 8 MiB over TCP, and a peer without a
 * certificate (an enrollment session) must not make the server hold that
 * much. 0 or -ENOENT (not attached). */
int tls_framing_limit_anonymous(SSL *ssl, uint64_t max);

/* How many of p[0..n) may be handed on, the rest (at most
 * TLS_FRAMING_HEADER_MAX - 1 bytes, the start of a header) being kept for
 * the next read, and the state advanced over what is handed on. p[0] is
 * where f left off. full: n is all the reader asked for, so it reads again
 * at once; the first byte of a header may then end the read (libcoap
 * resumes there, provided the next read has the rest of that header,
 * which this function then ensures). A header announcing more than
 * f->max_body (when not 0) sets f->too_big and ends the scan before it.
 * Pure; exposed for the unit test. */
size_t tls_framing_scan(TlsFraming *f, const uint8_t *p, size_t n, int full);
