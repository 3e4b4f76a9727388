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

/* Fill *ret_pki for a mutual TLS client. libcoap keeps the pointers: the
 * TlsFiles strings and *check must outlive every session made with it.
 * check->host is the cloud's name (checked against the leaf certificate
 * with X509_check_host, or X509_check_ip_asc for a literal address) and is
 * also sent as SNI; check may be NULL (no host name check). */
void tls_pki_init(coap_dtls_pki_t *ret_pki, const TlsFiles *files, TlsHostCheck *check);

/* A server's certificate, key and CA, read once. libcoap 4.3.1 reads PEM
 * files again for every handshake (docs/design/libcoap.md); with these it
 * parses the DER certificate and key from memory and the CA store is
 * shared by reference. */
typedef struct TlsServerKeys TlsServerKeys;

/* Read and check the three files: every certificate of the CA file, the
 * first certificate of cert_file and the key of key_file, which must be
 * an EC or RSA key that matches the certificate. 0, or -errno for a file
 * that cannot be opened, -EBADMSG for one without what it should hold,
 * -EOPNOTSUPP for another key type, -EKEYREJECTED for a key that is not
 * the certificate's; *ret_path then names the file at fault. The caller
 * owns *ret_keys. */
int tls_server_keys_load(const TlsFiles *files, TlsServerKeys **ret_keys, const char **ret_path);
TlsServerKeys *tls_server_keys_free(TlsServerKeys *keys);

/* Fill *ret_pki for the server side of mutual TLS with keys, which must
 * stay alive while libcoap uses *ret_pki: until coap_context_set_pki() is
 * called with another one (libcoap reads the keys only while it handles
 * a ClientHello) or the context is freed. The peer's identity
 * (certificate CN) is stored on the session, see tls_session_peer_id(). */
void tls_server_pki_init(coap_dtls_pki_t *ret_pki, TlsServerKeys *keys);

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
