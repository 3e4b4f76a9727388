/* SPDX-License-Identifier: Apache-2.0 */
/* lib/tls.c's SSL_use_certificate_ASN1() and SSL_use_PrivateKey_ASN1():
 * for the DER buffers of loaded TlsServerKeys (what libcoap is given and
 * hands every new session) the certificate and key parsed at load are set,
 * shared; any other DER goes to libssl's, which parses it; once the keys
 * are freed their buffers are no longer recognised. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tls.h"

static char dir[] = "/tmp/test-tls-keys-XXXXXX";
static char cert_path[64], key_path[64];

/* A self-signed EC certificate and its key in dir: the CA, the
 * certificate and the key of TlsFiles all at once. */
static void make_files(void) {
        EVP_PKEY *key = EVP_EC_gen("P-256");
        X509 *x = X509_new();
        FILE *f;

        assert_non_null(mkdtemp(dir));
        snprintf(cert_path, sizeof(cert_path), "%s/c.crt", dir);
        snprintf(key_path, sizeof(key_path), "%s/c.key", dir);
        assert_non_null(key);
        assert_non_null(x);
        assert_int_equal(X509_set_version(x, 2), 1);
        ASN1_INTEGER_set(X509_get_serialNumber(x), 1);
        X509_gmtime_adj(X509_getm_notBefore(x), 0);
        X509_gmtime_adj(X509_getm_notAfter(x), 3600);
        X509_NAME_add_entry_by_txt(X509_get_subject_name(x), "CN", MBSTRING_ASC, (const uint8_t *)"t", -1, -1, 0);
        X509_set_issuer_name(x, X509_get_subject_name(x));
        assert_int_equal(X509_set_pubkey(x, key), 1);
        assert_true(X509_sign(x, key, EVP_sha256()) > 0);
        f = fopen(cert_path, "w");
        assert_non_null(f);
        assert_int_equal(PEM_write_X509(f, x), 1);
        fclose(f);
        f = fopen(key_path, "w");
        assert_non_null(f);
        assert_int_equal(PEM_write_PrivateKey(f, key, NULL, NULL, 0, NULL, NULL), 1);
        fclose(f);
        X509_free(x);
        EVP_PKEY_free(key);
}

static void remove_files(void) {
        unlink(cert_path);
        unlink(key_path);
        rmdir(dir);
}

static void test_shared(void **state) {
        (void)state;
        TlsFiles files = { .ca_file = cert_path, .cert_file = cert_path, .key_file = key_path };
        TlsServerKeys *k = NULL;
        const char *what = NULL;
        coap_dtls_pki_t pki;
        SSL_CTX *ctx;
        SSL *a, *b, *c;
        uint8_t *copy;
        size_t cert_len, key_len;
        int key_type;

        make_files();
        assert_int_equal(tls_server_keys_load(&files, &k, &what), 0);
        tls_server_pki_init(&pki, k);
        cert_len = pki.pki_key.key.asn1.public_cert_len;
        key_len = pki.pki_key.key.asn1.private_key_len;
        key_type = EVP_PKEY_EC;
        ctx = SSL_CTX_new(TLS_server_method());
        assert_non_null(ctx);
        a = SSL_new(ctx);
        b = SSL_new(ctx);
        c = SSL_new(ctx);
        assert_non_null(a);
        assert_non_null(b);
        assert_non_null(c);

        /* libcoap's buffers: the parsed certificate and key, shared. */
        for (SSL **s = (SSL *[]){ a, b }, *const *end = s + 2; s < end; s++) {
                assert_int_equal(SSL_use_certificate_ASN1(*s, pki.pki_key.key.asn1.public_cert, (int)cert_len), 1);
                assert_int_equal(SSL_use_PrivateKey_ASN1(key_type, *s, pki.pki_key.key.asn1.private_key,
                                                         (long)key_len),
                                 1);
        }
        assert_non_null(SSL_get_certificate(a));
        assert_ptr_equal(SSL_get_certificate(a), SSL_get_certificate(b));
        assert_ptr_equal(SSL_get_privatekey(a), SSL_get_privatekey(b));

        /* The same bytes elsewhere: libssl parses them, a certificate of its own. */
        copy = malloc(cert_len);
        assert_non_null(copy);
        memcpy(copy, pki.pki_key.key.asn1.public_cert, cert_len);
        assert_int_equal(SSL_use_certificate_ASN1(c, copy, (int)cert_len), 1);
        assert_ptr_not_equal(SSL_get_certificate(c), SSL_get_certificate(a));
        assert_int_equal(X509_cmp(SSL_get_certificate(c), SSL_get_certificate(a)), 0);
        /* Garbage is refused as before. */
        copy[0] ^= 0xff;
        assert_int_equal(SSL_use_certificate_ASN1(c, copy, (int)cert_len), 0);
        free(copy);

        /* The keys are gone: the sessions keep their references. */
        tls_server_keys_free(k);
        assert_non_null(SSL_get_certificate(a));
        assert_int_equal(X509_cmp(SSL_get_certificate(a), SSL_get_certificate(c)), 0);
        SSL_free(a);
        SSL_free(b);
        SSL_free(c);
        SSL_CTX_free(ctx);
        remove_files();
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_shared),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
