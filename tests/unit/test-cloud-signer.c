/* SPDX-License-Identifier: Apache-2.0 */
/* Unit tests for the certificate signer (cloud/signer.c): every check of
 * signer_csr_parse() refuses what it must with the reason a device shows
 * (not PEM, a wrong signature, no or two commonNames, an invalid ID, a
 * short RSA key or another curve, too large), and the built-in signer
 * makes a device certificate with the extensions and validity of
 * docs/enrollment.md, "Signing", never outliving its CA. Keys and CSRs
 * are made here with OpenSSL; the CA goes through files like [Enroll]
 * CACertificate= and CAKey=. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <errno.h>
#include <openssl/bn.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509v3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cloud/cloud-config.h"
#include "cloud/signer.h"
#include "lib/tls.h"
#include "lib/util.h"

static EVP_PKEY *key_ec(void) {
        EVP_PKEY *k = EVP_EC_gen("P-256");

        assert_non_null(k);
        return k;
}

/* A CSR for key with the given commonNames (NULL-terminated), signed by
 * signer (key itself when NULL), as PEM (free()). */
static char *csr_pem(EVP_PKEY *key, const char *const *cns, EVP_PKEY *signer) {
        X509_REQ *req = X509_REQ_new();
        X509_NAME *name = X509_NAME_new();
        BIO *b = BIO_new(BIO_s_mem());
        char *data, *pem;
        long len;

        assert_non_null(req);
        for (const char *const *cn = cns; cn && *cn; cn++)
                assert_int_equal(X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_UTF8, (const unsigned char *)*cn,
                                                            -1, -1, 0),
                                 1);
        assert_int_equal(X509_NAME_add_entry_by_txt(name, "O", MBSTRING_UTF8, (const unsigned char *)"tether", -1, -1,
                                                    0),
                         1);
        assert_int_equal(X509_REQ_set_subject_name(req, name), 1);
        assert_int_equal(X509_REQ_set_pubkey(req, key), 1);
        assert_true(X509_REQ_sign(req, signer ? signer : key, EVP_sha256()) > 0);
        assert_int_equal(PEM_write_bio_X509_REQ(b, req), 1);
        len = BIO_get_mem_data(b, &data);
        pem = strndup(data, (size_t)len);
        assert_non_null(pem);
        BIO_free(b);
        X509_NAME_free(name);
        X509_REQ_free(req);
        return pem;
}

/* Parse pem: the error, with reason expected to contain want. */
static void refused(const char *pem, size_t len, int error, const char *want) {
        char reason[SIGNER_REASON_MAX] = "";
        SignerCsr csr = {};

        assert_int_equal(signer_csr_parse(pem, len, &csr, reason), error);
        if (!strstr(reason, want))
                fail_msg("reason '%s' lacks '%s'", reason, want);
        assert_null(csr.req); /* untouched */
}

static void test_csr_good(void **state) {
        EVP_PKEY *k = key_ec();
        char *pem = csr_pem(k, (const char *const[]){ "dev-1", NULL }, NULL), want[65];
        char reason[SIGNER_REASON_MAX];
        SignerCsr csr = {};

        assert_int_equal(signer_csr_parse(pem, strlen(pem), &csr, reason), 0);
        assert_string_equal(csr.id, "dev-1");
        assert_int_equal(tls_pubkey_sha256(k, want), 0);
        assert_string_equal(csr.pubkey, want);
        assert_string_equal(csr.pem, pem);
        signer_csr_done(&csr);
        free(pem);
        EVP_PKEY_free(k);
}

static void test_csr_refused(void **state) {
        EVP_PKEY *k = key_ec(), *other = key_ec(), *rsa1024 = EVP_RSA_gen(1024), *p384 = EVP_EC_gen("P-384");
        char *pem, *big;
        const char *cn[] = { "dev-1", NULL };

        assert_non_null(rsa1024);
        assert_non_null(p384);
        /* Not PEM, not a CSR, a NUL inside. */
        refused("hello", 5, -EBADMSG, "not a PEM certificate signing request");
        refused("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", 72, -EBADMSG,
                "not a PEM certificate signing request");
        pem = csr_pem(k, cn, NULL);
        refused(pem, strlen(pem) + 1, -EBADMSG, "not PEM text");
        free(pem);
        /* Signed by another key. */
        pem = csr_pem(k, cn, other);
        refused(pem, strlen(pem), -EBADMSG, "signature does not verify");
        free(pem);
        /* No commonName, two, an invalid device ID, a reserved one. */
        pem = csr_pem(k, NULL, NULL);
        refused(pem, strlen(pem), -EBADMSG, "no commonName");
        free(pem);
        pem = csr_pem(k, (const char *const[]){ "dev-1", "dev-2", NULL }, NULL);
        refused(pem, strlen(pem), -EBADMSG, "more than one commonName");
        free(pem);
        pem = csr_pem(k, (const char *const[]){ "bad id!", NULL }, NULL);
        refused(pem, strlen(pem), -EBADMSG, "commonName is not a valid device ID");
        free(pem);
        pem = csr_pem(k, (const char *const[]){ "api", NULL }, NULL);
        refused(pem, strlen(pem), -EBADMSG, "commonName is not a valid device ID");
        free(pem);
        /* Keys: RSA under 2048 bits, a curve other than P-256. */
        pem = csr_pem(rsa1024, cn, NULL);
        refused(pem, strlen(pem), -EOPNOTSUPP, "RSA key has 1024 bits, at least 2048");
        free(pem);
        pem = csr_pem(p384, cn, NULL);
        refused(pem, strlen(pem), -EOPNOTSUPP, "EC P-256 or RSA");
        free(pem);
        /* Too large, whatever it holds. */
        big = malloc(SIGNER_CSR_MAX + 1);
        assert_non_null(big);
        memset(big, 'A', SIGNER_CSR_MAX + 1);
        refused(big, SIGNER_CSR_MAX + 1, -E2BIG, "larger than 16384 bytes");
        free(big);
        EVP_PKEY_free(k);
        EVP_PKEY_free(other);
        EVP_PKEY_free(rsa1024);
        EVP_PKEY_free(p384);
}

static void test_csr_rsa2048(void **state) {
        EVP_PKEY *k = EVP_RSA_gen(2048);
        char *pem = csr_pem(k, (const char *const[]){ "dev-rsa", NULL }, NULL);
        char reason[SIGNER_REASON_MAX];
        SignerCsr csr = {};

        assert_int_equal(signer_csr_parse(pem, strlen(pem), &csr, reason), 0);
        assert_string_equal(csr.id, "dev-rsa");
        signer_csr_done(&csr);
        free(pem);
        EVP_PKEY_free(k);
}

/* ---- built-in signing --------------------------------------------------- */

typedef struct Fixture {
        char dir[64];
        char ca_crt[96], ca_key[96], other_crt[96];
        sd_event *event;
        EVP_PKEY *ca_pkey;
        X509 *ca;
        CloudConfig config;
} Fixture;

/* A self-signed CA named cn, valid for days, into path (and its key). */
static X509 *make_ca(EVP_PKEY *key, const char *cn, long days, const char *crt_path, const char *key_path) {
        X509 *x = X509_new();
        X509V3_CTX ctx;
        X509_EXTENSION *ext;
        FILE *f;

        assert_non_null(x);
        assert_int_equal(X509_set_version(x, X509_VERSION_3), 1);
        assert_int_equal(ASN1_INTEGER_set(X509_get_serialNumber(x), 1), 1);
        assert_int_equal(X509_NAME_add_entry_by_txt(X509_get_subject_name(x), "CN", MBSTRING_UTF8,
                                                    (const unsigned char *)cn, -1, -1, 0),
                         1);
        assert_int_equal(X509_set_issuer_name(x, X509_get_subject_name(x)), 1);
        assert_non_null(X509_gmtime_adj(X509_getm_notBefore(x), -3600));
        assert_non_null(X509_gmtime_adj(X509_getm_notAfter(x), days * 86400));
        assert_int_equal(X509_set_pubkey(x, key), 1);
        X509V3_set_ctx(&ctx, x, x, NULL, NULL, 0);
        ext = X509V3_EXT_nconf_nid(NULL, &ctx, NID_basic_constraints, "critical,CA:TRUE");
        assert_non_null(ext);
        assert_int_equal(X509_add_ext(x, ext, -1), 1);
        X509_EXTENSION_free(ext);
        ext = X509V3_EXT_nconf_nid(NULL, &ctx, NID_subject_key_identifier, "hash");
        assert_int_equal(X509_add_ext(x, ext, -1), 1);
        X509_EXTENSION_free(ext);
        assert_true(X509_sign(x, key, EVP_sha256()) > 0);
        f = fopen(crt_path, "we");
        assert_non_null(f);
        assert_int_equal(PEM_write_X509(f, x), 1);
        fclose(f);
        if (key_path) {
                f = fopen(key_path, "we");
                assert_non_null(f);
                assert_int_equal(PEM_write_PrivateKey(f, key, NULL, NULL, 0, NULL, NULL), 1);
                fclose(f);
        }
        return x;
}

static int setup(void **state) {
        Fixture *f = calloc(1, sizeof(*f));

        assert_non_null(f);
        snprintf(f->dir, sizeof(f->dir), "/tmp/test-cloud-signer.XXXXXX");
        assert_non_null(mkdtemp(f->dir));
        snprintf(f->ca_crt, sizeof(f->ca_crt), "%s/ca.crt", f->dir);
        snprintf(f->ca_key, sizeof(f->ca_key), "%s/ca.key", f->dir);
        snprintf(f->other_crt, sizeof(f->other_crt), "%s/other.crt", f->dir);
        assert_int_equal(sd_event_new(&f->event), 0);
        f->ca_pkey = key_ec();
        f->ca = make_ca(f->ca_pkey, "Test CA", 3650, f->ca_crt, f->ca_key);
        f->config = (CloudConfig){ .ca_file = f->ca_crt, .enroll_ca_cert = f->ca_crt, .enroll_ca_key = f->ca_key,
                                   .sign_timeout_sec = 30, .sign_concurrency = 4, .cert_validity_sec = 3600,
                                   .enroll_enabled = true };
        *state = f;
        return 0;
}

static int teardown(void **state) {
        Fixture *f = *state;

        (void)unlink(f->ca_crt);
        (void)unlink(f->ca_key);
        (void)unlink(f->other_crt);
        (void)rmdir(f->dir);
        X509_free(f->ca);
        EVP_PKEY_free(f->ca_pkey);
        sd_event_unref(f->event);
        free(f);
        return 0;
}

static X509 *pem_x509(const char *pem) {
        BIO *b = BIO_new_mem_buf(pem, -1);
        X509 *x = PEM_read_bio_X509(b, NULL, NULL, NULL);

        BIO_free(b);
        assert_non_null(x);
        return x;
}

static int64_t asn1_unix(const ASN1_TIME *t) {
        struct tm tm;

        assert_int_equal(ASN1_TIME_to_tm(t, &tm), 1);
        return (int64_t)timegm(&tm);
}

/* Sign a CSR for id with s: the certificate (X509_free()) and *ret. */
static X509 *sign_one(Signer *s, const char *id, EVP_PKEY *k, SignerCert *ret) {
        char *pem = csr_pem(k, (const char *const[]){ id, NULL }, NULL), reason[SIGNER_REASON_MAX];
        SignerCsr csr = {};

        assert_int_equal(signer_csr_parse(pem, strlen(pem), &csr, reason), 0);
        if (signer_sign(s, &csr, ret, reason) < 0)
                fail_msg("signer_sign: %s", reason);
        signer_csr_done(&csr);
        free(pem);
        return pem_x509(ret->pem);
}

static void test_sign_builtin(void **state) {
        Fixture *f = *state;
        _cleanup_(signer_freep) Signer *s = NULL;
        EVP_PKEY *k = key_ec();
        SignerCert cert = {};
        X509 *x;
        char cn[64] = "", pubkey[65], fp[65];
        unsigned char md[EVP_MAX_MD_SIZE];
        unsigned n = 0;
        int64_t now = (int64_t)time(NULL), nb, na;
        const ASN1_INTEGER *serial;
        BASIC_CONSTRAINTS *bc;
        EXTENDED_KEY_USAGE *eku;
        int crit = -1;

        assert_int_equal(signer_new(f->event, &f->config, &s), 0);
        assert_false(signer_is_external(s));
        assert_int_equal(signer_validity(s), 3600);
        x = sign_one(s, "dev-1", k, &cert);

        /* Subject, issuer, key, signature. */
        assert_true(X509_NAME_get_text_by_NID(X509_get_subject_name(x), NID_commonName, cn, sizeof(cn)) > 0);
        assert_string_equal(cn, "dev-1");
        assert_int_equal(X509_NAME_entry_count(X509_get_subject_name(x)), 1);
        assert_int_equal(X509_NAME_cmp(X509_get_issuer_name(x), X509_get_subject_name(f->ca)), 0);
        assert_int_equal(X509_verify(x, f->ca_pkey), 1);
        assert_int_equal(EVP_PKEY_eq(X509_get0_pubkey(x), k), 1);
        assert_int_equal(X509_get_version(x), X509_VERSION_3);
        /* Validity: backdated SIGNER_BACKDATE_SEC, CertificateValiditySec from now. */
        nb = asn1_unix(X509_get0_notBefore(x));
        na = asn1_unix(X509_get0_notAfter(x));
        assert_true(nb >= now - SIGNER_BACKDATE_SEC - 5 && nb <= now - SIGNER_BACKDATE_SEC + 5);
        assert_true(na >= now + 3600 - 5 && na <= now + 3600 + 5);
        assert_int_equal(cert.not_before, nb);
        assert_int_equal(cert.not_after, na);
        /* A positive serial of 16 bytes, random: another differs. */
        serial = X509_get0_serialNumber(x);
        assert_int_equal(ASN1_STRING_length(serial), 16);
        assert_int_equal(ASN1_INTEGER_get_int64(&(int64_t){ 0 }, serial), 0); /* too large for int64: refused */
        /* Extensions: a client certificate, not a CA. */
        bc = X509_get_ext_d2i(x, NID_basic_constraints, &crit, NULL);
        assert_non_null(bc);
        assert_int_equal(crit, 1);
        assert_false(bc->ca);
        BASIC_CONSTRAINTS_free(bc);
        assert_true(X509_get_extension_flags(x) & EXFLAG_KUSAGE);
        assert_int_equal(X509_get_key_usage(x), KU_DIGITAL_SIGNATURE);
        assert_true(X509_EXTENSION_get_critical(X509_get_ext(x, X509_get_ext_by_NID(x, NID_key_usage, -1))));
        eku = X509_get_ext_d2i(x, NID_ext_key_usage, &crit, NULL);
        assert_non_null(eku);
        assert_int_equal(sk_ASN1_OBJECT_num(eku), 1);
        assert_int_equal(OBJ_obj2nid(sk_ASN1_OBJECT_value(eku, 0)), NID_client_auth);
        EXTENDED_KEY_USAGE_free(eku);
        assert_non_null(X509_get0_subject_key_id(x));
        assert_non_null(X509_get0_authority_key_id(x));
        assert_int_equal(ASN1_OCTET_STRING_cmp(X509_get0_authority_key_id(x), X509_get0_subject_key_id(f->ca)), 0);
        assert_int_equal(X509_check_purpose(x, X509_PURPOSE_SSL_CLIENT, 0), 1);
        /* What SignerCert says of it; a self-signed CA is not sent along. */
        assert_int_equal(tls_pubkey_sha256(k, pubkey), 0);
        assert_string_equal(cert.pubkey, pubkey);
        assert_int_equal(X509_digest(x, EVP_sha256(), md, &n), 1);
        for (unsigned i = 0; i < n; i++)
                snprintf(fp + 2 * i, 3, "%02x", md[i]);
        assert_string_equal(cert.fingerprint, fp);
        assert_string_equal(cert.issuer, "CN=Test CA");
        assert_int_equal(strlen(cert.serial), 32);
        assert_non_null(strstr(cert.pem, "-----END CERTIFICATE-----\n"));
        assert_null(strstr(strstr(cert.pem, "-----END CERTIFICATE-----\n") + 1, "BEGIN"));
        X509_free(x);
        {
                SignerCert again = {};
                X509 *y = sign_one(s, "dev-1", k, &again);

                assert_string_not_equal(again.serial, cert.serial);
                X509_free(y);
                signer_cert_done(&again);
        }
        signer_cert_done(&cert);
        EVP_PKEY_free(k);
}

/* A CA that ends before CertificateValiditySec: certificates end with it. */
static void test_sign_capped_by_ca(void **state) {
        Fixture *f = *state;
        _cleanup_(signer_freep) Signer *s = NULL;
        EVP_PKEY *k = key_ec();
        SignerCert cert = {};
        X509 *x;

        X509_free(f->ca);
        f->ca = make_ca(f->ca_pkey, "Short CA", 1, f->ca_crt, NULL);
        f->config.cert_validity_sec = 30 * 86400;
        assert_int_equal(signer_new(f->event, &f->config, &s), 0);
        x = sign_one(s, "dev-2", k, &cert);
        assert_int_equal(ASN1_TIME_compare(X509_get0_notAfter(x), X509_get0_notAfter(f->ca)), 0);
        X509_free(x);
        signer_cert_done(&cert);
        EVP_PKEY_free(k);
}

/* The CA must be one of [Cloud] CAFile='s, and the key its own. */
static void test_signer_refuses_config(void **state) {
        Fixture *f = *state;
        Signer *s = NULL;
        EVP_PKEY *other = key_ec();
        X509 *x = make_ca(other, "Other CA", 10, f->other_crt, NULL);

        f->config.ca_file = f->other_crt;
        assert_int_equal(signer_new(f->event, &f->config, &s), -EINVAL);
        f->config.ca_file = f->ca_crt;
        f->config.enroll_ca_cert = f->other_crt;
        assert_int_equal(signer_new(f->event, &f->config, &s), -EKEYREJECTED);
        assert_null(s);
        X509_free(x);
        EVP_PKEY_free(other);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_csr_good),
                cmocka_unit_test(test_csr_refused),
                cmocka_unit_test(test_csr_rsa2048),
                cmocka_unit_test_setup_teardown(test_sign_builtin, setup, teardown),
                cmocka_unit_test_setup_teardown(test_sign_capped_by_ca, setup, teardown),
                cmocka_unit_test_setup_teardown(test_signer_refuses_config, setup, teardown),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
