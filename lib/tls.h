/* SPDX-License-Identifier: Apache-2.0 */
/* TLS setup shared by tetherd and tether-cloudd on top of libcoap's PKI
 * support, plus the checks libcoap 4.3.1 leaves to us (docs/design/libcoap.md):
 * the cloud's host name, the device identity, TCP_NODELAY. */
#pragma once

#include <coap3/coap.h>
#include <stdbool.h>

typedef struct TlsFiles {
        const char *ca_file;   /* PEM CA that signs the peer */
        const char *cert_file; /* our certificate (PEM) */
        const char *key_file;  /* our private key (PEM) */
} TlsFiles;

/* The client's check of the server's name. failure is filled in when the
 * check refuses a certificate, so the caller can say why the handshake
 * failed (libcoap only reports that it did). */
typedef struct TlsHostCheck {
        const char *host;
        char failure[256];
} TlsHostCheck;

/* Fill *ret_pki for mutual TLS. libcoap keeps the pointers: the TlsFiles
 * strings and *check must outlive every session made with it. For a
 * client, check->host is the cloud's name (checked against the leaf
 * certificate with X509_check_host, or X509_check_ip_asc for a literal
 * address) and is also sent as SNI; for a server pass NULL: the peer's
 * identity (certificate CN) is then stored on the session, see
 * tls_session_peer_id(). */
void tls_pki_init(coap_dtls_pki_t *ret_pki, const TlsFiles *files, TlsHostCheck *check);

/* The device id of a server session (the client certificate's CN), or
 * NULL. Owned by the session; freed by tls_session_forget(). */
const char *tls_session_peer_id(coap_session_t *session);
/* Free what tls_pki_init's callback attached; call on
 * COAP_EVENT_SERVER_SESSION_DEL. */
void tls_session_forget(coap_session_t *session);

/* Set TCP_NODELAY on the session's socket (docs/design/libcoap.md: Nagle
 * plus delayed ACK add ~20 ms to the handshake). 0 or negative errno. */
int tls_session_set_nodelay(coap_session_t *session);

/* Check that every file exists and is readable; -errno and *ret_path
 * set to the failing path otherwise. */
int tls_files_check(const TlsFiles *files, const char **ret_path);
