/* SPDX-License-Identifier: Apache-2.0 */
#include <arpa/inet.h>
#include <dirent.h>
#include <dlfcn.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <pthread.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include "proto.h"
#include "tls-framing.h"
#include "ticket-keys.h"
#include "tls.h"
#include "util.h"

static bool host_is_ip(const char *host) {
        struct in6_addr a6;
        struct in_addr a4;

        return inet_pton(AF_INET, host, &a4) == 1 || inet_pton(AF_INET6, host, &a6) == 1;
}

/* ---- Session resumption (TLS 1.3 tickets) ---- */

static const unsigned char tls_sid_ctx[] = "tether-device-tls";
/* The longest chain below the root a server takes (libcoap's
 * cert_chain_verify_depth, in tls_server_pki_init() too). */
#define TLS_CHAIN_DEPTH 3
static pthread_once_t ex_once = PTHREAD_ONCE_INIT;
static int ex_ctx_tickets = -1; /* SSL_CTX: the TicketKeys its tickets are sealed with */
static int ex_ssl_keys = -1;    /* SSL: its TlsServerKeys, while its ClientHello is handled */
static int ex_ctx_resume = -1;  /* client SSL_CTX: its TlsResume (one session per context) */
static int ex_ctx_own = -1;     /* SSL_CTX of tls_server_ctx_new(): its OwnCtx */
static int ex_ssl_own_peer = -1; /* SSL of tls_server_ssl_new(): its OwnPeer */

/* What tls_server_ctx_new() keeps on its SSL_CTX. */
typedef struct OwnCtx {
        TlsServerKeys *keys; /* a reference */
        TlsPeerCheck check;  /* may be NULL; runs on the handshake's thread */
        void *check_userdata;
} OwnCtx;

static void own_ctx_free(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int idx, long argl, void *argp);
static void own_peer_free(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int idx, long argl, void *argp);

static void ex_init(void) {
        ex_ctx_tickets = SSL_CTX_get_ex_new_index(0, NULL, NULL, NULL, NULL);
        ex_ssl_keys = SSL_get_ex_new_index(0, NULL, NULL, NULL, NULL);
        ex_ctx_resume = SSL_CTX_get_ex_new_index(0, NULL, NULL, NULL, NULL);
        ex_ctx_own = SSL_CTX_get_ex_new_index(0, NULL, NULL, NULL, own_ctx_free);
        ex_ssl_own_peer = SSL_get_ex_new_index(0, NULL, NULL, NULL, own_peer_free);
}

/* ---- Client side of resumption (TlsResume) ---- */

struct TlsResume {
        SSL_SESSION *session;   /* NULL: none kept */
        char *stamp;            /* target and files it was kept for */
        bool offered;           /* offered on the handshake under way */
        coap_context_t *ctx;    /* tls_resume_attach() */
        TlsResume *live_next;   /* in resume_live */
};

/* Every attached TlsResume, found by its context when libcoap starts a
 * handshake (SSL_connect() below). */
static pthread_mutex_t resume_lock = PTHREAD_MUTEX_INITIALIZER;
static TlsResume *resume_live;

int tls_resume_attach(TlsResume *r, coap_context_t *ctx) {
        pthread_mutex_lock(&resume_lock);
        if (!r->ctx) {
                r->live_next = resume_live;
                resume_live = r;
        }
        r->ctx = ctx;
        pthread_mutex_unlock(&resume_lock);
        return 0;
}

static void resume_live_remove(TlsResume *r) {
        pthread_mutex_lock(&resume_lock);
        for (TlsResume **p = &resume_live; *p; p = &(*p)->live_next)
                if (*p == r) {
                        *p = r->live_next;
                        break;
                }
        pthread_mutex_unlock(&resume_lock);
}

int tls_resume_new(TlsResume **ret) {
        *ret = calloc(1, sizeof(TlsResume));
        return *ret ? 0 : -ENOMEM;
}

void tls_resume_forget(TlsResume *r) {
        if (!r)
                return;
        SSL_SESSION_free(r->session);
        r->session = NULL;
        r->offered = false;
}

TlsResume *tls_resume_free(TlsResume *r) {
        if (!r)
                return NULL;
        resume_live_remove(r);
        tls_resume_forget(r);
        free(r->stamp);
        free(r);
        return NULL;
}

bool tls_resume_kept(const TlsResume *r) {
        return r && r->session;
}

static void file_stamp(FILE *f, const char *path) {
        struct stat st;

        if (path && *path && stat(path, &st) == 0)
                fprintf(f, "|%ju:%ju:%jd.%ld:%jd", (uintmax_t)st.st_dev, (uintmax_t)st.st_ino, (intmax_t)st.st_mtim.tv_sec,
                        st.st_mtim.tv_nsec, (intmax_t)st.st_size);
        else
                fputs("|-", f);
}

void tls_resume_target(TlsResume *r, const char *target, const TlsFiles *files) {
        char *stamp = NULL;
        size_t n = 0;
        FILE *f;

        if (!r)
                return;
        f = open_memstream(&stamp, &n);
        if (f) {
                fputs(target ? target : "", f);
                file_stamp(f, files->ca_file);
                file_stamp(f, files->cert_file);
                file_stamp(f, files->key_file);
                if (fclose(f) != 0) {
                        free(stamp);
                        stamp = NULL;
                }
        }
        if (!stamp || !r->stamp || !streq(stamp, r->stamp))
                tls_resume_forget(r);
        free(r->stamp);
        r->stamp = stamp;
        r->offered = false;
}

/* libcoap's info callback, which client_info_cb() wraps: a constant of
 * the library, as libcoap_verify_cb. */
static void (*libcoap_info_cb)(const SSL *ssl, int where, int ret);

/* Client SSL_CTX info callback: drops the kept session when a handshake
 * fails or the server declined it (a full handshake: its new ticket
 * replaces it). */
static void client_info_cb(const SSL *ssl, int where, int ret) {
        TlsResume *r = SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl), ex_ctx_resume);

        if (libcoap_info_cb)
                libcoap_info_cb(ssl, where, ret);
        if (!r || SSL_is_server(ssl))
                return;
        if (where & SSL_CB_HANDSHAKE_DONE) {
                if (r->offered && !SSL_session_reused(ssl)) {
                        SSL_SESSION_free(r->session);
                        r->session = NULL;
                }
                r->offered = false;
        } else if (((where & SSL_CB_EXIT) && ret == 0) ||
                   ((where & SSL_CB_ALERT) && (ret >> 8) == SSL3_AL_FATAL)) {
                if (!SSL_is_init_finished(ssl))
                        tls_resume_forget(r);
        }
}

/* A ticket arrived: keep it (the reference is ours) for the next
 * connection. */
static int client_new_session_cb(SSL *ssl, SSL_SESSION *sess) {
        TlsResume *r = SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl), ex_ctx_resume);

        if (!r || !SSL_SESSION_is_resumable(sess))
                return 0;
        SSL_SESSION_free(r->session);
        r->session = sess;
        return 1;
}

/* Before libcoap's first SSL_connect() of a client handshake of an
 * attached context: keep its tickets (callbacks on libcoap's SSL_CTX,
 * set once) and offer the kept session. libcoap 4.3.1 calls no setup
 * hook of ours on the client side before the ClientHello
 * (setup_client_ssl_session() in src/coap_openssl.c), so this is done
 * from SSL_connect() below. Reads are framed from here on (a resumed
 * handshake runs no client_cn_cb()). */
static void client_resume_offer(SSL *ssl) {
        SSL_CTX *ctx = SSL_get_SSL_CTX(ssl);
        BIO *b = SSL_get_rbio(ssl);
        const char *meth = b ? BIO_method_name(b) : NULL;
        coap_session_t *session;
        coap_context_t *cctx;
        TlsResume *r;
        void (*cb)(const SSL *, int, int);

        /* Only libcoap's TLS sessions: its BIO, whose SSL's app data is
         * the coap_session_t (coap_tls_new_client_session()). Called from
         * SSL_connect(): a client (SSL_is_server() is not set yet). */
        if (!ctx || !meth || !streq(meth, "coapsock") || !SSL_in_before(ssl))
                return;
        /* Every session of libcoap's reads framed from the start: its
         * client_cn_cb() cannot always do it (libcoap stores the SSL on
         * the session only after this SSL_connect() returns, and the
         * server's whole flight may be read inside it). */
        if (tls_framing_attach(ssl) < 0)
                return;
        session = SSL_get_app_data(ssl);
        cctx = session ? coap_session_get_context(session) : NULL;
        if (!cctx)
                return;
        pthread_mutex_lock(&resume_lock);
        for (r = resume_live; r && r->ctx != cctx; r = r->live_next)
                ;
        pthread_mutex_unlock(&resume_lock);
        if (!r)
                return;
        pthread_once(&ex_once, ex_init);
        if (ex_ctx_resume < 0)
                return;
        if (SSL_CTX_get_ex_data(ctx, ex_ctx_resume) != r) {
                if (!SSL_CTX_set_ex_data(ctx, ex_ctx_resume, r))
                        return;
                cb = SSL_CTX_get_info_callback(ctx);
                if (cb && cb != client_info_cb)
                        libcoap_info_cb = cb;
                SSL_CTX_set_info_callback(ctx, client_info_cb);
                SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
                SSL_CTX_sess_set_new_cb(ctx, client_new_session_cb);
        }
        r->offered = false;
        if (r->session && SSL_SESSION_is_resumable(r->session) && SSL_set_session(ssl, r->session) == 1)
                r->offered = true;
}

__attribute__((visibility("default"))) int SSL_connect(SSL *ssl) {
        static int (*libssl_fn)(SSL *);
        int (*fn)(SSL *) = __atomic_load_n(&libssl_fn, __ATOMIC_RELAXED);

        if (ssl)
                client_resume_offer(ssl);
        if (!fn) {
                *(void **)&fn = dlsym(RTLD_NEXT, "SSL_connect");
                if (!fn) {
                        SSL_set_connect_state(ssl);
                        return SSL_do_handshake(ssl);
                }
                __atomic_store_n(&libssl_fn, fn, __ATOMIC_RELAXED);
        }
        return fn(ssl);
}

/* Client side: libcoap has verified the chain; we check the leaf against
 * the configured host name, which libcoap 4.3.1 never does. The cloud
 * cannot have sent application data yet, so this is where the session's
 * reads get framed (tls-framing.h). */
static int client_cn_cb(const char *cn, const uint8_t *der, size_t der_len, coap_session_t *session,
                        unsigned depth, int validated, void *arg) {
        TlsHostCheck *check = arg;
        const char *host = check ? check->host : NULL;
        const unsigned char *p = der;
        SSL *ssl;
        X509 *x;
        int ok;

        if (!validated)
                return 0;
        if (depth > 0)
                return 1;
        ssl = coap_session_get_tls(session, NULL);
        if (ssl && tls_framing_attach(ssl) < 0)
                return 0;
        if (!host)
                return 1;
        x = d2i_X509(NULL, &p, (long)der_len);
        if (!x)
                return 0;
        if (host_is_ip(host))
                ok = X509_check_ip_asc(x, host, 0) == 1;
        else
                ok = X509_check_host(x, host, 0, 0, NULL) == 1;
        X509_free(x);
        if (!ok)
                snprintf(check->failure, sizeof(check->failure),
                         "the cloud's certificate (CN '%s') does not match host name '%s'", cn ? cn : "", host);
        return ok;
}

struct TlsServerKeys {
        uint8_t *cert_der, *key_der;
        size_t cert_len, key_len;
        coap_asn1_privatekey_type_t key_type;
        X509 *cert;                       /* the same certificate and key, parsed */
        EVP_PKEY *key;
        X509_STORE *store;                /* the CA certificates */
        STACK_OF(X509_NAME) *ca_names;    /* sent in the CertificateRequest */
        TlsPeerCheck check;
        void *check_userdata;
        bool allow_anonymous;             /* no client certificate: an enrollment session */
        size_t anonymous_max;             /* its longest message after the header */
        TicketKeys *tickets;              /* borrowed; NULL: no session tickets (no resumption) */
        unsigned char ca_sha256[32];      /* of the CA certificates' DER, in file order */
        TlsServerKeys *live_next;         /* in keys_live */
        unsigned n_ref;                   /* atomic: the owner's, and one per tls_server_ctx_new() context */
};

TlsServerKeys *tls_server_keys_ref(TlsServerKeys *k) {
        if (k)
                __atomic_add_fetch(&k->n_ref, 1, __ATOMIC_RELAXED);
        return k;
}

void tls_server_keys_allow_anonymous(TlsServerKeys *k, bool allow, size_t max_message) {
        k->allow_anonymous = allow;
        k->anonymous_max = max_message;
}

void tls_server_keys_set_tickets(TlsServerKeys *k, TicketKeys *tickets) {
        k->tickets = tickets;
}

bool tls_server_keys_same_ca(const TlsServerKeys *a, const TlsServerKeys *b) {
        return a && b && CRYPTO_memcmp(a->ca_sha256, b->ca_sha256, sizeof(a->ca_sha256)) == 0;
}

void tls_server_keys_set_peer_check(TlsServerKeys *k, TlsPeerCheck check, void *userdata) {
        k->check = check;
        k->check_userdata = userdata;
}

/* The TlsPeer of a server session, made on its first certificate. */
static TlsPeer *session_peer(coap_session_t *session) {
        TlsPeer *p = coap_session_get_app_data(session);

        if (!p) {
                p = calloc(1, sizeof(*p));
                if (p)
                        coap_session_set_app_data(session, p);
        }
        return p;
}

void tls_name_text(const X509_NAME *name, char *buf, size_t size) {
        BIO *b = BIO_new(BIO_s_mem());
        char *data;
        long n;

        buf[0] = 0;
        if (!b)
                return;
        if (X509_NAME_print_ex(b, name, 0, XN_FLAG_RFC2253 & ~ASN1_STRFLGS_ESC_MSB) >= 0) {
                n = BIO_get_mem_data(b, &data);
                if (n > 0)
                        snprintf(buf, size, "%.*s", (int)n, data);
        }
        BIO_free(b);
}

static void cert_describe(X509 *x, TlsPeer *p) {
        const ASN1_INTEGER *serial = X509_get0_serialNumber(x);
        BIGNUM *bn = serial ? ASN1_INTEGER_to_BN(serial, NULL) : NULL;
        char *hex = bn ? BN_bn2hex(bn) : NULL;
        unsigned char md[EVP_MAX_MD_SIZE];
        unsigned n = 0;
        struct tm tm;

        tls_name_text(X509_get_subject_name(x), p->subject, sizeof(p->subject));
        tls_name_text(X509_get_issuer_name(x), p->issuer, sizeof(p->issuer));
        snprintf(p->serial, sizeof(p->serial), "%s", hex ? hex : "");
        OPENSSL_free(hex);
        BN_free(bn);
        p->fingerprint[0] = 0;
        if (X509_digest(x, EVP_sha256(), md, &n) == 1)
                hex_encode(md, n < 32 ? n : 32, p->fingerprint);
        p->not_after = p->not_before = 0;
        if (ASN1_TIME_to_tm(X509_get0_notAfter(x), &tm) == 1)
                p->not_after = (int64_t)timegm(&tm);
        if (ASN1_TIME_to_tm(X509_get0_notBefore(x), &tm) == 1)
                p->not_before = (int64_t)timegm(&tm);
        if (tls_spki_sha256(X509_get_X509_PUBKEY(x), p->pubkey) < 0)
                p->pubkey[0] = 0;
}

/* The SHA-256 of len bytes of der (freed here) in hex. */
static int der_sha256(unsigned char *der, int len, char ret[static 65]) {
        unsigned char md[EVP_MAX_MD_SIZE];
        unsigned n = 0;

        if (len <= 0) {
                OPENSSL_free(der);
                return -EIO;
        }
        if (!EVP_Digest(der, (size_t)len, md, &n, EVP_sha256(), NULL) || n != 32) {
                OPENSSL_free(der);
                return -EIO;
        }
        OPENSSL_free(der);
        hex_encode(md, n, ret);
        return 0;
}

int tls_pubkey_sha256(EVP_PKEY *key, char ret[static 65]) {
        unsigned char *der = NULL;
        int len = i2d_PUBKEY(key, &der);

        return der_sha256(der, len, ret);
}

int tls_spki_sha256(const X509_PUBKEY *spki, char ret[static 65]) {
        unsigned char *der = NULL;
        int len = spki ? i2d_X509_PUBKEY(spki, &der) : -1;

        return der_sha256(der, len, ret);
}

/* The device ID of a verified leaf: exactly one commonName, a valid
 * device name, and no DNS subjectAltName but the CN itself. 0, or -EPERM
 * with the reason in p->reason. */
static int leaf_identity(X509 *x, TlsPeer *p) {
        const X509_NAME *subject = X509_get_subject_name(x);
        GENERAL_NAMES *sans;
        unsigned char *utf8 = NULL;
        int i, n, len;

        i = X509_NAME_get_index_by_NID(subject, NID_commonName, -1);
        if (i < 0) {
                snprintf(p->reason, sizeof(p->reason), "the certificate has no commonName");
                return -EPERM;
        }
        if (X509_NAME_get_index_by_NID(subject, NID_commonName, i) >= 0) {
                snprintf(p->reason, sizeof(p->reason), "the certificate has more than one commonName");
                return -EPERM;
        }
        len = ASN1_STRING_to_UTF8(&utf8, X509_NAME_ENTRY_get_data(X509_NAME_get_entry(subject, i)));
        if (len <= 0 || (size_t)len >= sizeof(p->id) || memchr(utf8, 0, (size_t)len) ||
            proto_name_check((const char *)utf8, (size_t)len, PROTO_NAME_DEVICE) < 0) {
                OPENSSL_free(utf8);
                snprintf(p->reason, sizeof(p->reason), "the commonName is not a valid device ID");
                return -EPERM;
        }
        memcpy(p->id, utf8, (size_t)len);
        p->id[len] = 0;
        OPENSSL_free(utf8);

        sans = X509_get_ext_d2i(x, NID_subject_alt_name, NULL, NULL);
        n = sans ? sk_GENERAL_NAME_num(sans) : 0;
        for (i = 0; i < n; i++) {
                const GENERAL_NAME *g = sk_GENERAL_NAME_value(sans, i);
                const ASN1_IA5STRING *dns;

                if (g->type != GEN_DNS)
                        continue;
                dns = g->d.dNSName;
                if ((size_t)ASN1_STRING_length(dns) != strlen(p->id) ||
                    memcmp(ASN1_STRING_get0_data(dns), p->id, strlen(p->id)) != 0) {
                        snprintf(p->reason, sizeof(p->reason),
                                 "a DNS subjectAltName differs from the commonName '%s'", p->id);
                        p->id[0] = 0;
                        GENERAL_NAMES_free(sans);
                        return -EPERM;
                }
        }
        GENERAL_NAMES_free(sans);
        return 0;
}

/* The certificate libcoap's verify callback is looking at, while
 * server_verify_cb() calls it (one thread: the loop's). */
static _Thread_local X509 *verifying_cert;
/* The SSL whose certificate is being verified: libcoap sets the
 * session's SSL (coap_session_get_tls()) only once its first
 * SSL_accept() returned, and on a busy machine the client's whole second
 * flight can be read and verified inside that call. */
static _Thread_local SSL *verifying_ssl;

/* Server side, once per certificate of the client's chain (root first,
 * the leaf last, at depth 0). libcoap's cn is not used: the identity is
 * read from the leaf here (see TlsPeer). */
static int server_cn_cb(const char *cn, const uint8_t *der, size_t der_len, coap_session_t *session,
                        unsigned depth, int validated, void *arg) {
        TlsServerKeys *k = arg;
        const unsigned char *q = der;
        TlsPeer *p = session_peer(session);
        X509 *x;
        int ok = 0;
        SSL *ssl;

        if (!p)
                return 0;
        if (validated && depth > 0)
                return 1;
        /* libcoap made der from the certificate server_verify_cb() is
         * given: that one, rather than parsing it again (its key too). */
        if (verifying_cert) {
                x = verifying_cert;
                X509_up_ref(x);
        } else
                x = d2i_X509(NULL, &q, (long)der_len);
        if (!x) {
                p->refused = true;
                snprintf(p->reason, sizeof(p->reason), "the certificate cannot be parsed");
                return 0;
        }
        cert_describe(x, p);
        if (!validated) {
                /* OpenSSL's reason is read after the handshake failed
                 * (tls_session_verify_error()). */
                p->refused = true;
        } else if (leaf_identity(x, p) < 0)
                p->refused = true;
        else if (k && k->check && k->check(k->check_userdata, p, p->reason, sizeof(p->reason)) < 0) {
                p->refused = true;
                if (!p->reason[0])
                        snprintf(p->reason, sizeof(p->reason), "refused by the cloud");
        } else
                ok = 1;
        X509_free(x);
        /* A device identified by a full handshake gets one ticket to
         * resume with (server_tls_setup() issues none otherwise). */
        if (ok && k && k->tickets && ((ssl = coap_session_get_tls(session, NULL)) || (ssl = verifying_ssl)))
                SSL_set_num_tickets(ssl, 1);
        return ok;
}

/* ---- libcoap's per-session parse of the server's certificate and key -----
 *
 * libcoap 4.3.1 hands every new server session the certificate and key of
 * its PKI setup as DER (setup_pki_ssl() in src/coap_openssl.c, from its
 * client-hello callback), and libssl parses both again each time: with
 * OpenSSL 3.0, which looks up its key decoders anew for every key, about
 * 0.2 ms per handshake, a sixth of an enrollment's cost. This program
 * defines the two functions (the dynamic linker binds libcoap's calls to
 * them, as for SSL_read() in tls-framing.c): for the DER buffers of loaded
 * TlsServerKeys (the very pointers libcoap was given) they set the
 * certificate and key parsed at load, shared by reference, which is what
 * server_tls_setup() sets right after anyway; anything else goes to
 * libssl's. */
static pthread_mutex_t keys_lock = PTHREAD_MUTEX_INITIALIZER;
static TlsServerKeys *keys_live;

static void keys_live_add(TlsServerKeys *k) {
        pthread_mutex_lock(&keys_lock);
        k->live_next = keys_live;
        keys_live = k;
        pthread_mutex_unlock(&keys_lock);
}

static void keys_live_remove(TlsServerKeys *k) {
        pthread_mutex_lock(&keys_lock);
        for (TlsServerKeys **p = &keys_live; *p; p = &(*p)->live_next)
                if (*p == k) {
                        *p = k->live_next;
                        break;
                }
        pthread_mutex_unlock(&keys_lock);
}

/* The parsed certificate (cert) or key of the keys whose DER is d, len,
 * with a reference taken; NULL if d is not one of theirs. */
static void *keys_live_find(const unsigned char *d, long len, bool cert) {
        void *found = NULL;

        pthread_mutex_lock(&keys_lock);
        for (TlsServerKeys *k = keys_live; k && !found; k = k->live_next)
                if (cert && k->cert && d == k->cert_der && len >= 0 && (size_t)len == k->cert_len) {
                        if (X509_up_ref(k->cert) == 1)
                                found = k->cert;
                } else if (!cert && k->key && d == k->key_der && len >= 0 && (size_t)len == k->key_len) {
                        if (EVP_PKEY_up_ref(k->key) == 1)
                                found = k->key;
                }
        pthread_mutex_unlock(&keys_lock);
        return found;
}

__attribute__((visibility("default"))) int SSL_use_certificate_ASN1(SSL *ssl, const unsigned char *d, int len) {
        static int (*libssl_fn)(SSL *, const unsigned char *, int);
        int (*fn)(SSL *, const unsigned char *, int) = __atomic_load_n(&libssl_fn, __ATOMIC_RELAXED);
        X509 *x = keys_live_find(d, len, true);
        int r;

        if (x) {
                r = SSL_use_certificate(ssl, x);
                X509_free(x);
                return r;
        }
        if (!fn) {
                *(void **)&fn = dlsym(RTLD_NEXT, "SSL_use_certificate_ASN1");
                if (!fn) {
                        /* No libssl after us: parse and set it here. */
                        const unsigned char *q = d;

                        x = d2i_X509(NULL, &q, len);
                        r = x ? SSL_use_certificate(ssl, x) : 0;
                        X509_free(x);
                        return r;
                }
                __atomic_store_n(&libssl_fn, fn, __ATOMIC_RELAXED);
        }
        return fn(ssl, d, len);
}

__attribute__((visibility("default"))) int SSL_use_PrivateKey_ASN1(int type, SSL *ssl, const unsigned char *d,
                                                                 long len) {
        static int (*libssl_fn)(int, SSL *, const unsigned char *, long);
        int (*fn)(int, SSL *, const unsigned char *, long) = __atomic_load_n(&libssl_fn, __ATOMIC_RELAXED);
        EVP_PKEY *key = keys_live_find(d, len, false);
        int r;

        if (key) {
                r = SSL_use_PrivateKey(ssl, key);
                EVP_PKEY_free(key);
                return r;
        }
        if (!fn) {
                *(void **)&fn = dlsym(RTLD_NEXT, "SSL_use_PrivateKey_ASN1");
                if (!fn) {
                        const unsigned char *q = d;

                        key = d2i_PrivateKey(type, NULL, &q, len);
                        r = key ? SSL_use_PrivateKey(ssl, key) : 0;
                        EVP_PKEY_free(key);
                        return r;
                }
                __atomic_store_n(&libssl_fn, fn, __ATOMIC_RELAXED);
        }
        return fn(type, ssl, d, len);
}

TlsServerKeys *tls_server_keys_free(TlsServerKeys *k) {
        if (!k || __atomic_sub_fetch(&k->n_ref, 1, __ATOMIC_ACQ_REL) > 0)
                return NULL;
        keys_live_remove(k);
        OPENSSL_free(k->cert_der);
        if (k->key_der)
                OPENSSL_clear_free(k->key_der, k->key_len);
        X509_free(k->cert);
        EVP_PKEY_free(k->key);
        X509_STORE_free(k->store);
        sk_X509_NAME_pop_free(k->ca_names, X509_NAME_free);
        free(k);
        return NULL;
}

static int tls_bio_open(const char *path, BIO **ret) {
        FILE *f = fopen(path, "re");
        BIO *b;

        if (!f)
                return -errno;
        b = BIO_new_fp(f, BIO_CLOSE);
        if (!b) {
                fclose(f);
                return -ENOMEM;
        }
        *ret = b;
        return 0;
}

/* Every certificate in the CA file into the store and the name list. */
static int tls_load_ca(TlsServerKeys *k, const char *path) {
        EVP_MD_CTX *md = NULL;
        BIO *b = NULL;
        X509 *x;
        int r, n = 0;

        r = tls_bio_open(path, &b);
        if (r < 0)
                return r;
        k->store = X509_STORE_new();
        k->ca_names = sk_X509_NAME_new_null();
        md = EVP_MD_CTX_new();
        r = k->store && k->ca_names && md && EVP_DigestInit_ex(md, EVP_sha256(), NULL) == 1 ? 0 : -ENOMEM;
        while (r == 0 && (x = PEM_read_bio_X509(b, NULL, NULL, NULL))) {
                X509_NAME *name = X509_NAME_dup(X509_get_subject_name(x));
                unsigned char *der = NULL;
                int len = i2d_X509(x, &der);

                if (!name || len <= 0 || EVP_DigestUpdate(md, der, (size_t)len) != 1 ||
                    !X509_STORE_add_cert(k->store, x) || !sk_X509_NAME_push(k->ca_names, name)) {
                        X509_NAME_free(name);
                        r = -EBADMSG;
                }
                OPENSSL_free(der);
                X509_free(x);
                n++;
        }
        if (r == 0 && EVP_DigestFinal_ex(md, k->ca_sha256, NULL) != 1)
                r = -EIO;
        EVP_MD_CTX_free(md);
        BIO_free(b);
        ERR_clear_error();
        if (r == 0 && n == 0)
                r = -EBADMSG;
        return r;
}

int tls_server_keys_load(const TlsFiles *files, TlsServerKeys **ret_keys, const char **ret_path) {
        TlsServerKeys *k = calloc(1, sizeof(*k));
        X509 *cert = NULL;
        EVP_PKEY *key = NULL;
        BIO *b = NULL;
        unsigned char *p = NULL;
        int r, len;

        if (!k)
                return -ENOMEM;
        k->n_ref = 1;
        *ret_path = files->ca_file;
        r = tls_load_ca(k, files->ca_file);
        if (r < 0)
                goto fail;

        *ret_path = files->cert_file;
        r = tls_bio_open(files->cert_file, &b);
        if (r < 0)
                goto fail;
        cert = PEM_read_bio_X509(b, NULL, NULL, NULL);
        BIO_free(b);
        len = cert ? i2d_X509(cert, &p) : -1;
        if (len <= 0) {
                r = -EBADMSG;
                goto fail;
        }
        k->cert_der = TAKE_PTR(p);
        k->cert_len = (size_t)len;

        *ret_path = files->key_file;
        r = tls_bio_open(files->key_file, &b);
        if (r < 0)
                goto fail;
        key = PEM_read_bio_PrivateKey(b, NULL, NULL, NULL);
        BIO_free(b);
        if (!key) {
                r = -EBADMSG;
                goto fail;
        }
        /* The types libcoap 4.3.1 can take as DER (its map_key_type()). */
        switch (EVP_PKEY_get_base_id(key)) {
        case EVP_PKEY_EC:
                k->key_type = COAP_ASN1_PKEY_EC;
                break;
        case EVP_PKEY_RSA:
                k->key_type = COAP_ASN1_PKEY_RSA;
                break;
        default:
                r = -EOPNOTSUPP;
                goto fail;
        }
        if (X509_check_private_key(cert, key) != 1) {
                r = -EKEYREJECTED;
                goto fail;
        }
        len = i2d_PrivateKey(key, &p);
        if (len <= 0) {
                r = -EBADMSG;
                goto fail;
        }
        k->key_der = TAKE_PTR(p);
        k->key_len = (size_t)len;
        k->cert = TAKE_PTR(cert);
        k->key = TAKE_PTR(key);
        ERR_clear_error();
        keys_live_add(k);
        *ret_keys = k;
        return 0;
fail:
        ERR_clear_error();
        X509_free(cert);
        EVP_PKEY_free(key);
        tls_server_keys_free(k);
        return r;
}

/* Server side, called by libcoap with the SSL while it handles the
 * ClientHello, after it set our certificate and key from the DER buffers.
 * The CA comes from the store loaded once: libcoap would add a CA to the
 * SSL_CTX's store for good, so a CA removed by a reload would stay
 * trusted. libcoap parsed the certificate and key into copies of this
 * SSL's own; they are replaced with the ones parsed at load, shared by
 * every session (counted references), which saves a few KiB per device.
 *
 * libcoap sets no session id context, so OpenSSL would refuse every
 * resumption with an internal-error alert: we set one. With TicketKeys
 * (tls_server_keys_set_tickets()) TLS 1.3 tickets are sealed with those
 * keys: none is issued here, one by server_cn_cb() once a certificate
 * identified a device (so never to an anonymous session, and none after
 * a resumption unless it used the previous key); no 0-RTT; the PSK needs
 * (EC)DHE (OpenSSL's default, psk_dhe_ke) so forward secrecy holds.
 * Without TicketKeys no tickets at all: clients do full handshakes.
 *
 * Reads of the session are framed from here on (tls-framing.h). */
/* libcoap's verify callback, which server_verify_cb() wraps: the same
 * function for every SSL (a constant of the library, found at run time). */
static SSL_verify_cb libcoap_verify_cb;

/* libcoap calls validate_cn_call_back only for certificates OpenSSL
 * verified; for one it did not (another CA, expired, not a CA where one
 * is needed) keep what the refusal log needs here, then let libcoap
 * decide as before. */
static int server_verify_cb(int ok, X509_STORE_CTX *ctx) {
        SSL *ssl = X509_STORE_CTX_get_ex_data(ctx, SSL_get_ex_data_X509_STORE_CTX_idx());
        coap_session_t *session = ssl ? SSL_get_app_data(ssl) : NULL;
        X509 *x = X509_STORE_CTX_get_current_cert(ctx);
        TlsPeer *p;
        int r;

        verifying_cert = x;
        verifying_ssl = ssl;
        r = libcoap_verify_cb ? libcoap_verify_cb(ok, ctx) : ok;
        verifying_cert = NULL;
        verifying_ssl = NULL;

        if (ok || r || !session || !x || !(p = session_peer(session)))
                return r;
        cert_describe(x, p);
        p->id[0] = 0;
        p->refused = true;
        snprintf(p->reason, sizeof(p->reason), "the certificate was not verified: %s (depth %d)",
                 X509_verify_cert_error_string(X509_STORE_CTX_get_error(ctx)), X509_STORE_CTX_get_error_depth(ctx));
        return r;
}

static int server_ticket_key_cb(SSL *ssl, unsigned char key_name[16], unsigned char *iv, EVP_CIPHER_CTX *cctx,
                                EVP_MAC_CTX *hctx, int enc) {
        TicketKeys *t = SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl), ex_ctx_tickets);
        int r;

        if (!t)
                return enc ? -1 : 0;
        /* TLS 1.3 only: a TLS 1.2 ticket carries the session's master
         * secret and its resumption has no (EC)DHE, so whoever took the
         * ticket keys could read the traffic they sealed. 0 here: a TLS 1.2
         * client gets an empty ticket, and one it offers is not opened. */
        if (SSL_version(ssl) < TLS1_3_VERSION)
                return 0;
        r = ticket_keys_crypt(t, key_name, iv, cctx, hctx, enc);
        /* Opened with the previous key: a new ticket with the current one. */
        if (r == 2)
                SSL_set_num_tickets(ssl, 1);
        return r;
}

/* The identity checks of a full handshake (server_cn_cb()) on the leaf a
 * ticket carries, which was verified when the ticket was issued: one CN
 * that is a valid device ID, the SAN rule, not expired, and check (may be
 * NULL). 0, or -EPERM with p->refused and p->reason set. */
static int resumed_peer_check(X509 *x, TlsPeer *p, TlsPeerCheck check, void *check_userdata) {
        int64_t now = (int64_t)time(NULL);

        memset(p, 0, sizeof(*p));
        cert_describe(x, p);
        if (leaf_identity(x, p) < 0)
                goto refused;
        if (p->not_after <= now || p->not_before > now) {
                snprintf(p->reason, sizeof(p->reason), "the certificate (in a resumed session) is not valid now");
                goto refused;
        }
        if (check && check(check_userdata, p, p->reason, sizeof(p->reason)) < 0) {
                if (!p->reason[0])
                        snprintf(p->reason, sizeof(p->reason), "refused by the cloud");
                goto refused;
        }
        return 0;
refused:
        p->id[0] = 0;
        p->refused = true;
        return -EPERM;
}

/* The leaf a ticket carries, verified again as OpenSSL verifies a
 * client's chain (ssl's verification parameters: purpose, depth) against
 * the CA certificates loaded now: a restart may have changed them since
 * the ticket was issued, or the ticket keys may be another cloud's. A
 * ticket keeps only the leaf, not the intermediates the device sent: a
 * device whose chain needs those (not in the CA file) does full
 * handshakes. */
static bool resumed_leaf_verified(SSL *ssl, X509 *x, TlsServerKeys *k) {
        X509_STORE_CTX *v = X509_STORE_CTX_new();
        bool ok = false;

        /* What ssl_verify_cert_chain() in libssl sets up. */
        if (v && X509_STORE_CTX_init(v, k->store, x, NULL) == 1) {
                X509_VERIFY_PARAM_set_auth_level(X509_STORE_CTX_get0_param(v), SSL_get_security_level(ssl));
                ok = X509_STORE_CTX_set_default(v, "ssl_client") == 1 &&
                     X509_VERIFY_PARAM_set1(X509_STORE_CTX_get0_param(v), SSL_get0_param(ssl)) == 1 &&
                     X509_verify_cert(v) == 1;
        }
        X509_STORE_CTX_free(v);
        ERR_clear_error();
        return ok;
}

/* A ticket was opened (or not): resume only a session whose leaf passes
 * every check of a full handshake now, the chain's verification
 * included. A ticket whose leaf is refused
 * (a revoked device, an expired certificate), or that has none (none are
 * issued to anonymous sessions), is ignored: a full handshake follows,
 * whose certificate checks refuse such a device and log it as always.
 * Not SSL_TICKET_RETURN_ABORT: OpenSSL 3.0's tls_parse_ctos_psk() leaks
 * the decrypted session (about 5 KiB) on it, which a device replaying a
 * refused ticket could repeat at will. The session's TlsPeer is filled
 * only once the handshake is done (tls_session_peer()): OpenSSL may still
 * decline the ticket and do a full handshake. */
static SSL_TICKET_RETURN server_ticket_decrypted(SSL *ssl, SSL_SESSION *ss, const unsigned char *keyname,
                                                 size_t keyname_len, SSL_TICKET_STATUS status, void *arg) {
        TlsServerKeys *k = SSL_get_ex_data(ssl, ex_ssl_keys);
        X509 *x = ss ? SSL_SESSION_get0_peer(ss) : NULL;
        TlsPeer checked;

        (void)keyname;
        (void)keyname_len;
        (void)arg;
        switch (status) {
        case SSL_TICKET_SUCCESS:
        case SSL_TICKET_SUCCESS_RENEW:
                break;
        case SSL_TICKET_EMPTY:
        case SSL_TICKET_NONE:
        case SSL_TICKET_NO_DECRYPT:
                return SSL_TICKET_RETURN_IGNORE_RENEW;
        default:
                return SSL_TICKET_RETURN_ABORT;
        }
        /* A handshake outside libcoap (tls_server_ssl_new()) asks its
         * context's check, which may run on any thread. */
        if (!x || !k || !k->store || !resumed_leaf_verified(ssl, x, k))
                return SSL_TICKET_RETURN_IGNORE;
        if (SSL_get_ex_data(ssl, ex_ssl_own_peer)) {
                const OwnCtx *oc = SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl), ex_ctx_own);

                if (!oc || resumed_peer_check(x, &checked, oc->check, oc->check_userdata) < 0)
                        return SSL_TICKET_RETURN_IGNORE;
        } else if (resumed_peer_check(x, &checked, k->check, k->check_userdata) < 0)
                return SSL_TICKET_RETURN_IGNORE;
        return status == SSL_TICKET_SUCCESS_RENEW ? SSL_TICKET_RETURN_USE_RENEW : SSL_TICKET_RETURN_USE;
}

/* Tickets on for ssl, sealed with k's TicketKeys; the callbacks are set
 * on libcoap's SSL_CTX the first time (every session of a context shares
 * it; it is read only after the ClientHello, so this session too). */
static int server_tickets_setup(SSL *ssl, TlsServerKeys *k) {
        SSL_CTX *ctx = SSL_get_SSL_CTX(ssl);

        pthread_once(&ex_once, ex_init);
        if (ex_ctx_tickets < 0 || ex_ssl_keys < 0 || !ctx)
                return -ENOMEM;
        if (SSL_CTX_get_ex_data(ctx, ex_ctx_tickets) != k->tickets) {
                if (!SSL_CTX_set_ex_data(ctx, ex_ctx_tickets, k->tickets) ||
                    !SSL_CTX_set_tlsext_ticket_key_evp_cb(ctx, server_ticket_key_cb) ||
                    !SSL_CTX_set_session_ticket_cb(ctx, NULL, server_ticket_decrypted, NULL))
                        return -ENOMEM;
                SSL_CTX_set_timeout(ctx, (long)ticket_keys_lifetime(k->tickets));
                SSL_CTX_set_max_early_data(ctx, 0);
                SSL_CTX_set_recv_max_early_data(ctx, 0);
        }
        if (!SSL_set_ex_data(ssl, ex_ssl_keys, k) ||
            !SSL_set_session_id_context(ssl, tls_sid_ctx, sizeof(tls_sid_ctx) - 1))
                return -ENOMEM;
        SSL_clear_options(ssl, SSL_OP_NO_TICKET | SSL_OP_ALLOW_NO_DHE_KEX);
        SSL_set_max_early_data(ssl, 0);
        SSL_set_recv_max_early_data(ssl, 0);
        return 0;
}

static int server_tls_setup(void *tls_session, coap_dtls_pki_t *setup_data) {
        TlsServerKeys *k = setup_data->cn_call_back_arg;
        SSL *ssl = tls_session;
        STACK_OF(X509_NAME) *names;
        SSL_verify_cb cb;

        if (!ssl || !k)
                return 0;
        /* libcoap set its callback on this SSL just before calling us. */
        cb = SSL_get_verify_callback(ssl);
        if (cb && cb != server_verify_cb)
                libcoap_verify_cb = cb;
        /* libcoap asks for a certificate and fails the handshake without
         * one; a client that sends none may go on when anonymous sessions
         * are allowed (the caller then lets it do nothing but enroll). A
         * certificate that is sent is verified as before. */
        SSL_set_verify(ssl,
                       k->allow_anonymous ? SSL_get_verify_mode(ssl) & ~SSL_VERIFY_FAIL_IF_NO_PEER_CERT
                                          : SSL_get_verify_mode(ssl),
                       server_verify_cb);
        if (SSL_use_certificate(ssl, k->cert) != 1 || SSL_use_PrivateKey(ssl, k->key) != 1)
                return 0;
        SSL_set_num_tickets(ssl, 0);
        if (!k->tickets)
                SSL_set_options(ssl, SSL_OP_NO_TICKET);
        else if (server_tickets_setup(ssl, k) < 0)
                return 0;
        names = SSL_dup_CA_list(k->ca_names);
        if (!names || !SSL_set1_verify_cert_store(ssl, k->store)) {
                sk_X509_NAME_pop_free(names, X509_NAME_free);
                return 0;
        }
        SSL_set_client_CA_list(ssl, names);
        if (tls_framing_attach(ssl) < 0)
                return 0;
        return !k->allow_anonymous || tls_framing_limit_anonymous(ssl, k->anonymous_max) == 0;
}

void tls_server_pki_init(coap_dtls_pki_t *ret_pki, TlsServerKeys *keys) {
        coap_dtls_pki_t pki = {
                .version = COAP_DTLS_PKI_SETUP_VERSION,
                .verify_peer_cert = 1,
                .check_common_ca = 1,
                .allow_self_signed = 0,
                .allow_expired_certs = 0,
                .cert_chain_validation = 1,
                .cert_chain_verify_depth = TLS_CHAIN_DEPTH,
                .validate_cn_call_back = server_cn_cb,
                .cn_call_back_arg = keys,
                .additional_tls_setup_call_back = server_tls_setup,
                .pki_key.key_type = COAP_PKI_KEY_ASN1,
                .pki_key.key.asn1.public_cert = keys->cert_der,
                .pki_key.key.asn1.public_cert_len = keys->cert_len,
                .pki_key.key.asn1.private_key = keys->key_der,
                .pki_key.key.asn1.private_key_len = keys->key_len,
                .pki_key.key.asn1.private_key_type = keys->key_type,
        };
        *ret_pki = pki;
}

void tls_pki_init(coap_dtls_pki_t *ret_pki, const TlsFiles *files, TlsHostCheck *check) {
        const char *expected_host = check ? check->host : NULL;

        coap_dtls_pki_t pki = {
                .version = COAP_DTLS_PKI_SETUP_VERSION,
                .verify_peer_cert = 1,
                .check_common_ca = 1,
                .allow_self_signed = 0,
                .allow_expired_certs = 0,
                .cert_chain_validation = 1,
                .cert_chain_verify_depth = 3,
                .validate_cn_call_back = client_cn_cb,
                .cn_call_back_arg = check,
                .client_sni = (char *)expected_host,
                .pki_key.key_type = COAP_PKI_KEY_PEM,
                .pki_key.key.pem.ca_file = files->ca_file,
                .pki_key.key.pem.public_cert = files->cert_file,
                .pki_key.key.pem.private_key = files->key_file,
        };
        /* Anonymous (enrollment): no certificate of our own. */
        if (!files->cert_file || !*files->cert_file) {
                pki.pki_key.key.pem.public_cert = NULL;
                pki.pki_key.key.pem.private_key = NULL;
        }
        /* SNI must not be an IP literal (RFC 6066). */
        if (expected_host && host_is_ip(expected_host))
                pki.client_sni = NULL;
        if (check)
                check->failure[0] = 0;
        *ret_pki = pki;
}

bool tls_session_anonymous(coap_session_t *session) {
        coap_tls_library_t lib;
        void *tls = coap_session_get_tls(session, &lib);
        X509 *x;

        if (!tls || lib != COAP_TLS_LIBRARY_OPENSSL || !SSL_is_init_finished(tls))
                return false;
        x = SSL_get0_peer_certificate(tls);
        return !x && !coap_session_get_app_data(session);
}

/* A resumed session ran no certificate callback: its TlsPeer is made
 * from the leaf the ticket carried once the handshake is done, with the
 * identity checks of a full one (server_ticket_decrypted() ran them and
 * the TlsPeerCheck during the handshake). */
static TlsPeer *resumed_peer(coap_session_t *session) {
        coap_tls_library_t lib;
        SSL *ssl = coap_session_get_tls(session, &lib);
        X509 *x;
        TlsPeer *p;

        if (!ssl || lib != COAP_TLS_LIBRARY_OPENSSL || !SSL_is_server(ssl) || !SSL_is_init_finished(ssl) ||
            !SSL_session_reused(ssl) || !(x = SSL_get0_peer_certificate(ssl)))
                return NULL;
        p = session_peer(session);
        if (p)
                (void)resumed_peer_check(x, p, NULL, NULL);
        return p;
}

/* The TlsPeer a handshake outside libcoap left on the session's SSL. */
static const TlsPeer *own_peer(coap_session_t *session) {
        coap_tls_library_t lib;
        SSL *ssl = coap_session_get_tls(session, &lib);

        return ssl && lib == COAP_TLS_LIBRARY_OPENSSL ? tls_ssl_peer(ssl) : NULL;
}

const TlsPeer *tls_session_peer(coap_session_t *session) {
        return coap_session_get_app_data(session) ?: own_peer(session) ?: resumed_peer(session);
}

bool tls_session_resumed(coap_session_t *session) {
        coap_tls_library_t lib;
        SSL *ssl = coap_session_get_tls(session, &lib);

        return ssl && lib == COAP_TLS_LIBRARY_OPENSSL && SSL_is_init_finished(ssl) && SSL_session_reused(ssl);
}

const char *tls_session_peer_id(coap_session_t *session) {
        const TlsPeer *p = tls_session_peer(session);

        return p && !p->refused && p->id[0] ? p->id : NULL;
}

const char *tls_session_verify_error(coap_session_t *session) {
        coap_tls_library_t lib;
        void *tls = coap_session_get_tls(session, &lib);
        long v;

        if (!tls || lib != COAP_TLS_LIBRARY_OPENSSL)
                return NULL;
        v = SSL_get_verify_result(tls);
        return v == X509_V_OK ? NULL : X509_verify_cert_error_string(v);
}

void tls_session_forget(coap_session_t *session) {
        free(coap_session_get_app_data(session));
        coap_session_set_app_data(session, NULL);
}

static bool sockaddr_eq(const struct sockaddr_storage *a, const coap_address_t *b) {
        if (a->ss_family != b->addr.sa.sa_family)
                return false;
        if (a->ss_family == AF_INET)
                return memcmp(a, &b->addr.sin, sizeof(struct sockaddr_in)) == 0;
        if (a->ss_family == AF_INET6)
                return memcmp(a, &b->addr.sin6, sizeof(struct sockaddr_in6)) == 0;
        return false;
}

/* libcoap 4.3.1 exposes no socket of a session and its TLS BIO hides the
 * fd, so find our socket by its address pair: done once per connection. */
int tls_session_set_nodelay(coap_session_t *session) {
        const coap_address_t *local = coap_session_get_addr_local(session);
        const coap_address_t *remote = coap_session_get_addr_remote(session);
        struct dirent *de;
        DIR *d;
        int r = -ENOENT, one = 1;

        if (!local || !remote)
                return -ENOTCONN;
        d = opendir("/proc/self/fd");
        if (!d)
                return -errno;
        while ((de = readdir(d))) {
                struct sockaddr_storage l = {}, p = {};
                socklen_t ll = sizeof(l), pl = sizeof(p);
                int fd = atoi(de->d_name);

                if (de->d_name[0] == '.' || fd == dirfd(d))
                        continue;
                if (getsockname(fd, (struct sockaddr *)&l, &ll) < 0 ||
                    getpeername(fd, (struct sockaddr *)&p, &pl) < 0)
                        continue;
                if (!sockaddr_eq(&l, local) || !sockaddr_eq(&p, remote))
                        continue;
                r = setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) < 0 ? -errno : 0;
                break;
        }
        closedir(d);
        return r;
}

int tls_files_check(const TlsFiles *files, const char **ret_path) {
        const char *paths[] = { files->ca_file, files->cert_file, files->key_file };

        for (size_t i = 0; i < ELEMENTSOF(paths); i++) {
                if (!paths[i] || !*paths[i]) {
                        *ret_path = "(not set)";
                        return -EINVAL;
                }
                if (access(paths[i], R_OK) < 0) {
                        *ret_path = paths[i];
                        return -errno;
                }
        }
        return 0;
}

/* ---- Handshakes outside libcoap (tls_server_ctx_new()) ----
 *
 * The same checks as a libcoap session's (tls_server_pki_init() with
 * server_tls_setup(), server_verify_cb() and server_cn_cb()) on an
 * SSL_CTX of our own, so that the handshake can run on any thread: the
 * chain is verified against the keys' CA store, the leaf's identity is
 * read as for libcoap's sessions, the context's own check (safe on that
 * thread) stands in for the keys' TlsPeerCheck, and an identified device
 * gets one ticket. */

typedef struct OwnPeer {
        TlsPeer peer;
        bool described; /* peer holds a certificate's description */
} OwnPeer;

static void own_ctx_free(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int idx, long argl, void *argp) {
        OwnCtx *oc = ptr;

        (void)parent;
        (void)ad;
        (void)idx;
        (void)argl;
        (void)argp;
        if (!oc)
                return;
        tls_server_keys_free(oc->keys);
        free(oc);
}

static void own_peer_free(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int idx, long argl, void *argp) {
        (void)parent;
        (void)ad;
        (void)idx;
        (void)argl;
        (void)argp;
        free(ptr);
}

/* libcoap's ALPN choice for a CoAP server over TLS: "coap" if offered. */
static const unsigned char own_alpn[] = { 4, 'c', 'o', 'a', 'p' };

static int own_alpn_cb(SSL *ssl, const unsigned char **out, unsigned char *outlen, const unsigned char *in,
                       unsigned int inlen, void *arg) {
        unsigned char *sel = NULL;

        (void)ssl;
        (void)arg;
        if (inlen == 0 || SSL_select_next_proto(&sel, outlen, own_alpn, sizeof(own_alpn), in, inlen) !=
                                  OPENSSL_NPN_NEGOTIATED)
                return SSL_TLSEXT_ERR_NOACK;
        *out = sel;
        return SSL_TLSEXT_ERR_OK;
}

/* Once per certificate of the client's chain, the leaf last (depth 0):
 * what server_verify_cb() and server_cn_cb() do for libcoap's sessions,
 * and the chain depth libcoap's own callback enforces. */
static int own_verify_cb(int ok, X509_STORE_CTX *sctx) {
        SSL *ssl = X509_STORE_CTX_get_ex_data(sctx, SSL_get_ex_data_X509_STORE_CTX_idx());
        OwnPeer *o = ssl ? SSL_get_ex_data(ssl, ex_ssl_own_peer) : NULL;
        TlsServerKeys *k = ssl ? SSL_get_ex_data(ssl, ex_ssl_keys) : NULL;
        X509 *x = X509_STORE_CTX_get_current_cert(sctx);
        int depth = X509_STORE_CTX_get_error_depth(sctx);
        const OwnCtx *oc;
        TlsPeer *p;

        if (!o || !k || !x)
                return 0;
        p = &o->peer;
        if (ok && depth > TLS_CHAIN_DEPTH + 1) {
                ok = 0;
                X509_STORE_CTX_set_error(sctx, X509_V_ERR_CERT_CHAIN_TOO_LONG);
        }
        if (!ok) {
                memset(p, 0, sizeof(*p));
                cert_describe(x, p);
                o->described = true;
                p->refused = true;
                snprintf(p->reason, sizeof(p->reason), "the certificate was not verified: %s (depth %d)",
                         X509_verify_cert_error_string(X509_STORE_CTX_get_error(sctx)), depth);
                return 0;
        }
        if (depth > 0)
                return 1;
        memset(p, 0, sizeof(*p));
        cert_describe(x, p);
        o->described = true;
        if (leaf_identity(x, p) < 0) {
                p->refused = true;
                X509_STORE_CTX_set_error(sctx, X509_V_ERR_CERT_REJECTED);
                return 0;
        }
        oc = SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl), ex_ctx_own);
        if (oc && oc->check && oc->check(oc->check_userdata, p, p->reason, sizeof(p->reason)) < 0) {
                p->id[0] = 0;
                p->refused = true;
                if (!p->reason[0])
                        snprintf(p->reason, sizeof(p->reason), "refused by the cloud");
                X509_STORE_CTX_set_error(sctx, X509_V_ERR_CERT_REJECTED);
                return 0;
        }
        /* A device identified by a full handshake gets one ticket. */
        if (k->tickets)
                SSL_set_num_tickets(ssl, 1);
        return 1;
}

int tls_server_ctx_new(TlsServerKeys *k, TlsPeerCheck check, void *check_userdata, SSL_CTX **ret) {
        SSL_CTX *ctx = NULL;
        STACK_OF(X509_NAME) *names = NULL;
        OwnCtx *oc;

        pthread_once(&ex_once, ex_init);
        if (ex_ctx_own < 0 || ex_ssl_own_peer < 0 || ex_ssl_keys < 0 || ex_ctx_tickets < 0)
                return -ENOMEM;
        ctx = SSL_CTX_new(TLS_server_method());
        oc = calloc(1, sizeof(*oc));
        if (!ctx || !oc) {
                free(oc);
                goto fail;
        }
        *oc = (OwnCtx){ .keys = tls_server_keys_ref(k), .check = check, .check_userdata = check_userdata };
        /* The OwnCtx first: SSL_CTX_free() frees it from now on. */
        if (!SSL_CTX_set_ex_data(ctx, ex_ctx_own, oc)) {
                tls_server_keys_free(oc->keys);
                free(oc);
                goto fail;
        }
        /* As libcoap 4.3.1 sets up its TLS server context (coap_set_user_prefs(),
         * its ALPN callback), but at least TLS 1.2 where libcoap asks for
         * 1.0 (Debian's OpenSSL configuration refuses below 1.2 anyway). */
        if (SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION) != 1 ||
            SSL_CTX_set_cipher_list(ctx, "TLSv1.3:TLSv1.2:!NULL") != 1)
                goto fail;
        SSL_CTX_set_alpn_select_cb(ctx, own_alpn_cb, NULL);
        SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION);
        SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
        SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
        if (SSL_CTX_use_certificate(ctx, k->cert) != 1 || SSL_CTX_use_PrivateKey(ctx, k->key) != 1 ||
            SSL_CTX_set1_verify_cert_store(ctx, k->store) != 1)
                goto fail;
        names = SSL_dup_CA_list(k->ca_names);
        if (!names)
                goto fail;
        SSL_CTX_set_client_CA_list(ctx, names);
        SSL_CTX_set_verify(ctx,
                           SSL_VERIFY_PEER | SSL_VERIFY_CLIENT_ONCE |
                                   (k->allow_anonymous ? 0 : SSL_VERIFY_FAIL_IF_NO_PEER_CERT),
                           own_verify_cb);
        SSL_CTX_set_verify_depth(ctx, TLS_CHAIN_DEPTH + 2);
        SSL_CTX_set_num_tickets(ctx, 0);
        if (!k->tickets)
                SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET);
        else {
                if (!SSL_CTX_set_ex_data(ctx, ex_ctx_tickets, k->tickets) ||
                    !SSL_CTX_set_tlsext_ticket_key_evp_cb(ctx, server_ticket_key_cb) ||
                    !SSL_CTX_set_session_ticket_cb(ctx, NULL, server_ticket_decrypted, NULL) ||
                    !SSL_CTX_set_session_id_context(ctx, tls_sid_ctx, sizeof(tls_sid_ctx) - 1))
                        goto fail;
                SSL_CTX_set_timeout(ctx, (long)ticket_keys_lifetime(k->tickets));
                SSL_CTX_clear_options(ctx, SSL_OP_NO_TICKET | SSL_OP_ALLOW_NO_DHE_KEX);
                SSL_CTX_set_max_early_data(ctx, 0);
                SSL_CTX_set_recv_max_early_data(ctx, 0);
        }
        ERR_clear_error();
        *ret = ctx;
        return 0;
fail:
        ERR_clear_error();
        SSL_CTX_free(ctx);
        return -ENOMEM;
}

SSL *tls_server_ssl_new(SSL_CTX *ctx, int fd) {
        const OwnCtx *oc = SSL_CTX_get_ex_data(ctx, ex_ctx_own);
        TlsServerKeys *k = oc ? oc->keys : NULL;
        OwnPeer *o = calloc(1, sizeof(*o));
        SSL *ssl = o && k ? SSL_new(ctx) : NULL;

        if (!ssl) {
                free(o);
                return NULL;
        }
        if (!SSL_set_ex_data(ssl, ex_ssl_own_peer, o)) {
                free(o);
                SSL_free(ssl);
                return NULL;
        }
        if (!SSL_set_ex_data(ssl, ex_ssl_keys, k) || SSL_set_fd(ssl, fd) != 1) {
                SSL_free(ssl);
                ERR_clear_error();
                return NULL;
        }
        SSL_set_accept_state(ssl);
        return ssl;
}

int tls_server_ssl_finish(SSL *ssl) {
        OwnPeer *o = SSL_get_ex_data(ssl, ex_ssl_own_peer);
        TlsServerKeys *k = SSL_get_ex_data(ssl, ex_ssl_keys);
        X509 *x = SSL_get0_peer_certificate(ssl);

        if (!o || !k || !SSL_is_init_finished(ssl))
                return -EINVAL;
        if (x && SSL_session_reused(ssl)) {
                /* No certificate callback ran: the leaf the ticket carried,
                 * checked as server_ticket_decrypted() did. */
                o->described = true;
                if (resumed_peer_check(x, &o->peer, NULL, NULL) < 0)
                        return -EPERM;
        } else if (x) {
                if (!o->described || o->peer.refused || !o->peer.id[0])
                        return -EPERM;
        } else if (!k->allow_anonymous)
                return -EPERM;
        if (tls_framing_attach(ssl) < 0)
                return -ENOMEM;
        if (k->allow_anonymous && tls_framing_limit_anonymous(ssl, k->anonymous_max) < 0)
                return -ENOMEM;
        return 0;
}

bool tls_ssl_adopted(SSL *ssl) {
        return ex_ssl_own_peer >= 0 && ssl && SSL_get_ex_data(ssl, ex_ssl_own_peer);
}

const TlsPeer *tls_ssl_peer(SSL *ssl) {
        OwnPeer *o;

        if (ex_ssl_own_peer < 0 || !ssl)
                return NULL;
        o = SSL_get_ex_data(ssl, ex_ssl_own_peer);
        return o && o->described ? &o->peer : NULL;
}

/* libcoap 4.3.1 makes the SSL of a server session with SSL_new() right
 * after it accepted the connection (coap_tls_new_server_session() in its
 * src/coap_openssl.c), then sets its BIO and app data and calls
 * SSL_accept(), which returns 1 at once for an SSL whose handshake is
 * done. This program defines SSL_new() (the dynamic linker binds libcoap's
 * call to it, as for SSL_read() in tls-framing.c): the SSL handed in with
 * tls_adopt_next() on the same thread is returned instead of a new one. */
static _Thread_local SSL *adopt_next;

void tls_adopt_next(SSL *ssl) {
        adopt_next = ssl;
}

SSL *tls_adopt_cancel(void) {
        SSL *ssl = adopt_next;

        adopt_next = NULL;
        return ssl;
}

__attribute__((visibility("default"))) SSL *SSL_new(SSL_CTX *ctx) {
        static SSL *(*libssl_fn)(SSL_CTX *);
        SSL *(*fn)(SSL_CTX *) = __atomic_load_n(&libssl_fn, __ATOMIC_RELAXED);
        SSL *ssl = adopt_next;

        if (ssl) {
                adopt_next = NULL;
                return ssl;
        }
        if (!fn) {
                *(void **)&fn = dlsym(RTLD_NEXT, "SSL_new");
                if (!fn)
                        abort();
                __atomic_store_n(&libssl_fn, fn, __ATOMIC_RELAXED);
        }
        return fn(ctx);
}
