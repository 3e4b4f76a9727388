/* SPDX-License-Identifier: Apache-2.0 */
/* TLS setup shared by tetherd and tether-cloudd on top of libcoap's PKI
 * support, plus the checks libcoap 4.3.1 leaves to us (docs/design/libcoap.md):
 * the cloud's host name, the device identity, TCP_NODELAY. */
#pragma once

#include <coap3/coap.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

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

/* A TLS client's last session (its TLS 1.3 ticket), kept in memory only
 * and offered on the next connection of the libcoap context it is
 * attached to (one session at a time per context) when it goes to the
 * same target with the same certificate and key files. libcoap 4.3.1
 * calls no setup hook of ours on the client side before its ClientHello,
 * so lib/tls.c defines SSL_connect() in the program (as tls-framing.h
 * does SSL_read()): for an SSL of an attached context it sets the
 * callbacks that keep tickets on libcoap's SSL_CTX and offers the kept
 * session (docs/design/libcoap.md, "Session resumption"). A kept session
 * is dropped when a handshake fails or when a server declines it. */
typedef struct TlsResume TlsResume;
int tls_resume_new(TlsResume **ret);
/* Free after the context it is attached to. */
TlsResume *tls_resume_free(TlsResume *r);
/* Keep the tickets of ctx's client sessions in r and offer them. */
int tls_resume_attach(TlsResume *r, coap_context_t *ctx);
/* Call before each connection: target is "host:port", files the client's
 * own. A session kept for another target, or before the certificate or
 * key file changed (a renewal: the new certificate must be presented),
 * is dropped. */
void tls_resume_target(TlsResume *r, const char *target, const TlsFiles *files);
/* Drop the kept session (a failed handshake, a change of trust). */
void tls_resume_forget(TlsResume *r);
/* Whether a session is kept. */
bool tls_resume_kept(const TlsResume *r);

/* Fill *ret_pki for a mutual TLS client. A files->cert_file that is NULL
 * or "" makes an anonymous client (the server's certificate is still
 * checked; used to enroll, when the device has no certificate yet). libcoap keeps the pointers: the
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
/* Keys are counted references: _load() returns the caller's, _ref() takes
 * another, _free() drops one (the last frees them). */
TlsServerKeys *tls_server_keys_ref(TlsServerKeys *keys);
TlsServerKeys *tls_server_keys_free(TlsServerKeys *keys);

/* What a server learned of a client's certificate during the handshake.
 * id is the device ID: the single commonName of the verified leaf
 * certificate, read with OpenSSL after the chain was verified (never
 * libcoap's guess, which takes a DNS subjectAltName first or "CN=" text
 * anywhere in the subject). A leaf with no or several CNs, a CN that is
 * not a valid device ID, or a DNS subjectAltName other than the CN is
 * refused. refused is set with a reason when the handshake was refused
 * by these checks, the chain verification or the TlsPeerCheck; subject,
 * issuer and serial are then those of the certificate at fault (when one
 * was seen). */
typedef struct TlsPeer {
        char id[128];          /* "" until the leaf passed */
        char subject[256];     /* RFC 2253 one-line, UTF-8 */
        char issuer[256];
        char serial[80];       /* hex, upper case */
        char fingerprint[65];  /* SHA-256 of the leaf's DER, hex */
        int64_t not_before;    /* the leaf's validity, seconds since the epoch */
        int64_t not_after;     /* the leaf's expiry, seconds since the epoch */
        char pubkey[65];       /* SHA-256 of the leaf's public key (DER SubjectPublicKeyInfo), hex */
        bool refused;
        char reason[192];
} TlsPeer;

/* The server's own decision on a leaf that passed the identity checks
 * (e.g. a revoked device): 0 to accept, or a negative errno with a reason
 * written to reason (reason_size bytes). Runs inside the handshake, on the
 * thread that runs libcoap. */
typedef int (*TlsPeerCheck)(void *userdata, const TlsPeer *peer, char *reason, size_t reason_size);

/* Let clients that send no certificate complete the handshake (default:
 * refused). Such a session has no TlsPeer; tls_session_anonymous() tells
 * it apart. A certificate that is sent is still verified. Such a client's
 * messages may have at most max_message bytes after their header: a
 * longer one closes its session (tls_framing_limit_anonymous()). */
void tls_server_keys_allow_anonymous(TlsServerKeys *keys, bool allow, size_t max_message);

/* Seal TLS 1.3 session tickets with tickets (borrowed: it must outlive
 * every context these keys are used with), so that devices can resume:
 * one ticket per full handshake of an identified device, none for an
 * anonymous one; a resumed session's certificate must verify against
 * these keys' CA certificates and pass the identity checks and the
 * TlsPeerCheck again. NULL (the default): no tickets, no resumption. */
struct TicketKeys;
void tls_server_keys_set_tickets(TlsServerKeys *keys, struct TicketKeys *tickets);
/* Whether both were loaded from the same CA certificates. */
bool tls_server_keys_same_ca(const TlsServerKeys *a, const TlsServerKeys *b);

/* Consult check (may be NULL) for every client certificate these keys
 * serve from now on. */
void tls_server_keys_set_peer_check(TlsServerKeys *keys, TlsPeerCheck check, void *userdata);

/* Fill *ret_pki for the server side of mutual TLS with keys, which must
 * stay alive while libcoap uses *ret_pki: until coap_context_set_pki() is
 * called with another one (libcoap reads the keys only while it handles
 * a ClientHello) or the context is freed. Clients must send a certificate
 * unless tls_server_keys_allow_anonymous() said otherwise. What the handshake learned of
 * the peer is kept on the session, see tls_session_peer(). */
void tls_server_pki_init(coap_dtls_pki_t *ret_pki, TlsServerKeys *keys);

/* What the handshake of a server session learned of the peer (NULL if it
 * got no certificate). For a resumed session, the leaf the ticket carried
 * after the checks of a full handshake. Owned by the session; freed by
 * tls_session_forget(). */
const TlsPeer *tls_session_peer(coap_session_t *session);
/* Whether the session's (finished) handshake resumed a session. */
bool tls_session_resumed(coap_session_t *session);
/* Whether a server session finished its handshake without any client
 * certificate (see tls_server_keys_allow_anonymous()). */
bool tls_session_anonymous(coap_session_t *session);
/* The device ID of a server session whose peer passed every check, or
 * NULL. */
const char *tls_session_peer_id(coap_session_t *session);
/* Free what tls_pki_init's callback attached; call on
 * COAP_EVENT_SERVER_SESSION_DEL. */
void tls_session_forget(coap_session_t *session);

/* Why OpenSSL refused the peer's certificate chain on this session (its
 * verify result), or NULL if it did not. */
const char *tls_session_verify_error(coap_session_t *session);

/* ---- TLS handshakes outside libcoap (cloud/handshakes.c) ----
 *
 * A server SSL_CTX with the checks of tls_server_pki_init() (the chain
 * against keys' CA store, the leaf's identity, anonymous clients as
 * tls_server_keys_allow_anonymous() said, one ticket per identified full
 * handshake when keys have TicketKeys), usable from any thread; it holds a
 * reference on keys. check (may be NULL) stands in for the keys'
 * TlsPeerCheck (tls_server_keys_set_peer_check()) and runs on whatever
 * thread drives the handshake, so it must be safe there. 0 or -ENOMEM. */
typedef struct ssl_ctx_st SSL_CTX;
typedef struct ssl_st SSL;
int tls_server_ctx_new(TlsServerKeys *keys, TlsPeerCheck check, void *check_userdata, SSL_CTX **ret);
/* A server SSL of such a context on the connected socket fd (not closed
 * by SSL_free()); drive it with SSL_accept(). NULL when out of memory. */
SSL *tls_server_ssl_new(SSL_CTX *ctx, int fd);
/* After SSL_accept() returned 1: 0 if the session may go on (a device
 * identified, a resumed session whose leaf passes the checks again, or an
 * allowed anonymous client), with its reads framed (tls-framing.h);
 * -EPERM if refused (tls_ssl_peer() says why), -ENOMEM. */
int tls_server_ssl_finish(SSL *ssl);
/* What such a handshake learned of the client's certificate (or why it
 * refused it); NULL if it saw none, and for SSLs not made by
 * tls_server_ssl_new(). Owned by ssl. tls_session_peer() finds it once
 * libcoap has adopted ssl. */
const TlsPeer *tls_ssl_peer(SSL *ssl);
/* Whether ssl was made by tls_server_ssl_new(). */
bool tls_ssl_adopted(SSL *ssl);
/* The next SSL_new() on this thread returns ssl instead of a new SSL:
 * how a finished handshake is given to libcoap, which calls SSL_new()
 * right after it accepted the connection (lib/tls.c defines SSL_new() in
 * the program for this). */
void tls_adopt_next(SSL *ssl);
/* The SSL given to tls_adopt_next() that no SSL_new() took, or NULL. */
SSL *tls_adopt_cancel(void);

/* Set TCP_NODELAY on the session's socket (docs/design/libcoap.md: Nagle
 * plus delayed ACK add ~20 ms to the handshake). 0 or negative errno. */
int tls_session_set_nodelay(coap_session_t *session);

/* The SHA-256 of key's DER SubjectPublicKeyInfo in lower-case hex: what
 * TlsPeer.pubkey holds, so a CSR's key can be compared with a peer's.
 * 0, or -EIO. */
struct evp_pkey_st;
int tls_pubkey_sha256(struct evp_pkey_st *key, char ret[static 65]);
/* The same of a certificate's or CSR's SubjectPublicKeyInfo as it holds
 * it (X509_get_X509_PUBKEY(), X509_REQ_get_X509_PUBKEY()): the same text
 * as tls_pubkey_sha256() of its key, without decoding the key and
 * encoding it again (OpenSSL 3.0 looks up its decoders and encoders for
 * each, the larger part of a CSR check). 0, or -EIO. */
struct X509_pubkey_st;
int tls_spki_sha256(const struct X509_pubkey_st *spki, char ret[static 65]);
/* name as RFC 2253 text (UTF-8 left as it is), cut to size: what
 * TlsPeer.subject and .issuer hold. "" when it cannot be printed. */
struct X509_name_st;
void tls_name_text(const struct X509_name_st *name, char *buf, size_t size);

/* Check that every file exists and is readable; -errno and *ret_path
 * set to the failing path otherwise. */
int tls_files_check(const TlsFiles *files, const char **ret_path);
