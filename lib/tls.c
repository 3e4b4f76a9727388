/* SPDX-License-Identifier: Apache-2.0 */
#include <arpa/inet.h>
#include <dirent.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <sys/socket.h>

#include "proto.h"
#include "tls.h"
#include "util.h"

static bool host_is_ip(const char *host) {
        struct in6_addr a6;
        struct in_addr a4;

        return inet_pton(AF_INET, host, &a4) == 1 || inet_pton(AF_INET6, host, &a6) == 1;
}

/* Client side: libcoap has verified the chain; we check the leaf against
 * the configured host name, which libcoap 4.3.1 never does. */
static int client_cn_cb(const char *cn, const uint8_t *der, size_t der_len, coap_session_t *session,
                        unsigned depth, int validated, void *arg) {
        TlsHostCheck *check = arg;
        const char *host = check ? check->host : NULL;
        const unsigned char *p = der;
        X509 *x;
        int ok;

        if (!validated)
                return 0;
        if (depth > 0 || !host)
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

/* Server side: the device is who its certificate says; keep the CN. */
static int server_cn_cb(const char *cn, const uint8_t *der, size_t der_len, coap_session_t *session,
                        unsigned depth, int validated, void *arg) {
        char *id;

        if (!validated)
                return 0;
        if (depth > 0)
                return 1;
        if (!cn || proto_name_check(cn, strlen(cn), PROTO_NAME_DEVICE) < 0)
                return 0;
        id = strdup(cn);
        if (!id)
                return 0;
        free(coap_session_get_app_data(session));
        coap_session_set_app_data(session, id);
        return 1;
}

/* Server side, called by libcoap with the SSL while it handles the
 * ClientHello, before any ticket could be sent. libcoap sets no session id
 * context, so OpenSSL would refuse every resumption with an internal-error
 * alert: issue no tickets at all, and clients do full handshakes (which
 * also run the certificate checks that identify the device). */
static int server_tls_setup(void *tls_session, coap_dtls_pki_t *setup_data) {
        SSL *ssl = tls_session;

        if (ssl) {
                SSL_set_options(ssl, SSL_OP_NO_TICKET);
                SSL_set_num_tickets(ssl, 0);
        }
        return 1;
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
                .validate_cn_call_back = check ? client_cn_cb : server_cn_cb,
                .cn_call_back_arg = check,
                .additional_tls_setup_call_back = check ? NULL : server_tls_setup,
                .client_sni = (char *)expected_host,
                .pki_key.key_type = COAP_PKI_KEY_PEM,
                .pki_key.key.pem.ca_file = files->ca_file,
                .pki_key.key.pem.public_cert = files->cert_file,
                .pki_key.key.pem.private_key = files->key_file,
        };
        /* SNI must not be an IP literal (RFC 6066). */
        if (expected_host && host_is_ip(expected_host))
                pki.client_sni = NULL;
        if (check)
                check->failure[0] = 0;
        *ret_pki = pki;
}

const char *tls_session_peer_id(coap_session_t *session) {
        return coap_session_get_app_data(session);
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
