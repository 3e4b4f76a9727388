/* SPDX-License-Identifier: Apache-2.0 */
/* Unit tests for agent/certfile.c: installing a key and certificate so
 * that every crash point leaves a working pair (each on-disk state a
 * crash can leave is made and certfile_recover() run on it), and the
 * renewal time. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <sys/stat.h>

#include "agent/certfile.h"
#include "csr.h"
#include "util.h"

static char dir[] = "/tmp/tether-certfile-test-XXXXXX";
static char key_path[100], cert_path[100], key_new[128], cert_new[128];

/* A self-signed certificate for key with CN id, as PEM. */
static char *make_cert(EVP_PKEY *key, const char *id) {
        X509 *x = X509_new();
        BIO *b = BIO_new(BIO_s_mem());
        char *data, *pem;
        long n;

        assert_non_null(x);
        assert_true(X509_set_version(x, 2));
        ASN1_INTEGER_set(X509_get_serialNumber(x), 1);
        X509_gmtime_adj(X509_getm_notBefore(x), 0);
        X509_gmtime_adj(X509_getm_notAfter(x), 3600);
        X509_NAME_add_entry_by_NID(X509_get_subject_name(x), NID_commonName, MBSTRING_ASC,
                                   (const unsigned char *)id, -1, -1, 0);
        X509_set_issuer_name(x, X509_get_subject_name(x));
        X509_set_pubkey(x, key);
        assert_true(X509_sign(x, key, EVP_sha256()) > 0);
        assert_true(PEM_write_bio_X509(b, x));
        n = BIO_get_mem_data(b, &data);
        pem = strndup(data, (size_t)n);
        BIO_free(b);
        X509_free(x);
        return pem;
}

static char *key_pem(EVP_PKEY *key) {
        char *pem = NULL;

        assert_int_equal(csr_key_pem(key, &pem), 0);
        return pem;
}

static void write_text(const char *path, const char *text, size_t len) {
        FILE *f = fopen(path, "we");

        assert_non_null(f);
        assert_int_equal(fwrite(text, 1, len, f), len);
        fclose(f);
}

static char *read_text(const char *path) {
        FILE *f = fopen(path, "re");
        char buf[8192];
        size_t n;

        assert_non_null(f);
        n = fread(buf, 1, sizeof(buf) - 1, f);
        fclose(f);
        buf[n] = 0;
        return strdup(buf);
}

static bool exists(const char *path) {
        return access(path, F_OK) == 0;
}

/* certfile.c's rename() (linked with --wrap=rename): the next
 * fail_cert_renames renames onto cert_path fail with EIO. */
int __real_rename(const char *from, const char *to);
int __wrap_rename(const char *from, const char *to);
static unsigned fail_cert_renames;

int __wrap_rename(const char *from, const char *to) {
        if (fail_cert_renames > 0 && streq(to, cert_path)) {
                fail_cert_renames--;
                errno = EIO;
                return -1;
        }
        return __real_rename(from, to);
}

/* The old pair in place: key A, certificate for A. */
typedef struct Pairs {
        EVP_PKEY *a, *b;
        char *a_key, *a_cert, *b_key, *b_cert;
} Pairs;

static void pairs_make(Pairs *p) {
        assert_int_equal(csr_key_generate(&p->a), 0);
        assert_int_equal(csr_key_generate(&p->b), 0);
        p->a_key = key_pem(p->a);
        p->b_key = key_pem(p->b);
        p->a_cert = make_cert(p->a, "dev-1");
        p->b_cert = make_cert(p->b, "dev-1");
        (void)unlink(key_new);
        (void)unlink(cert_new);
        write_text(key_path, p->a_key, strlen(p->a_key));
        write_text(cert_path, p->a_cert, strlen(p->a_cert));
}

static void pairs_done(Pairs *p) {
        EVP_PKEY_free(p->a);
        EVP_PKEY_free(p->b);
        free(p->a_key), free(p->a_cert), free(p->b_key), free(p->b_cert);
}

static void expect_files(const char *key, const char *cert) {
        char *k = read_text(key_path), *c = read_text(cert_path);

        assert_string_equal(k, key);
        assert_string_equal(c, cert);
        assert_false(exists(key_new));
        assert_false(exists(cert_new));
        assert_int_equal(csr_pair_matches(cert_path, key_path), 1);
        free(k), free(c);
}

static void test_install_new_pair(void **state) {
        Pairs p = {};
        struct stat st;

        pairs_make(&p);
        assert_int_equal(certfile_install(key_path, cert_path, p.b_key, p.b_cert), 0);
        expect_files(p.b_key, p.b_cert);
        assert_int_equal(stat(key_path, &st), 0);
        assert_int_equal(st.st_mode & 0777, 0600);
        assert_int_equal(stat(cert_path, &st), 0);
        assert_int_equal(st.st_mode & 0777, 0644);
        pairs_done(&p);
}

static void test_install_keeps_key(void **state) {
        Pairs p = {};
        char *again;

        pairs_make(&p);
        again = make_cert(p.a, "dev-1");
        assert_int_equal(certfile_install(key_path, cert_path, NULL, again), 0);
        expect_files(p.a_key, again);
        free(again);
        pairs_done(&p);
}

static void expect_modes(void) {
        struct stat st;

        assert_int_equal(stat(key_path, &st), 0);
        assert_int_equal(st.st_mode & 0777, 0600);
        assert_int_equal(stat(cert_path, &st), 0);
        assert_int_equal(st.st_mode & 0777, 0644);
}

/* The key and the certificate in two directories (install and recovery
 * rename in each), and the modes whatever the umask. */
static void test_install_two_directories(void **state) {
        char saved[4][128];
        Pairs p = {};
        CertfileRecovery rec;
        mode_t old_umask;

        memcpy(saved[0], key_path, sizeof(key_path)), memcpy(saved[1], cert_path, sizeof(cert_path));
        memcpy(saved[2], key_new, sizeof(key_new)), memcpy(saved[3], cert_new, sizeof(cert_new));
        snprintf(key_path, sizeof(key_path), "%s/keys", dir);
        assert_int_equal(mkdir(key_path, 0700), 0);
        snprintf(cert_path, sizeof(cert_path), "%s/certs", dir);
        assert_int_equal(mkdir(cert_path, 0755), 0);
        snprintf(key_path, sizeof(key_path), "%s/keys/device.key", dir);
        snprintf(cert_path, sizeof(cert_path), "%s/certs/device.crt", dir);
        snprintf(key_new, sizeof(key_new), "%s.new", key_path);
        snprintf(cert_new, sizeof(cert_new), "%s.new", cert_path);

        pairs_make(&p);
        old_umask = umask(0);
        assert_int_equal(certfile_install(key_path, cert_path, p.b_key, p.b_cert), 0);
        expect_files(p.b_key, p.b_cert);
        expect_modes();
        umask(077);
        assert_int_equal(certfile_install(key_path, cert_path, p.a_key, p.a_cert), 0);
        expect_files(p.a_key, p.a_cert);
        expect_modes();
        umask(old_umask);

        /* A crash between the renames, across the two directories. */
        write_text(key_path, p.b_key, strlen(p.b_key));
        write_text(cert_new, p.b_cert, strlen(p.b_cert));
        assert_int_equal(certfile_recover(key_path, cert_path, &rec), 0);
        assert_int_equal(rec, CERTFILE_COMPLETED);
        expect_files(p.b_key, p.b_cert);
        pairs_done(&p);

        memcpy(key_path, saved[0], sizeof(key_path)), memcpy(cert_path, saved[1], sizeof(cert_path));
        memcpy(key_new, saved[2], sizeof(key_new)), memcpy(cert_new, saved[3], sizeof(cert_new));
}

static void test_install_refuses_one_path(void **state) {
        Pairs p = {};

        pairs_make(&p);
        assert_int_equal(certfile_install(key_path, key_path, p.b_key, p.b_cert), -EINVAL);
        expect_files(p.a_key, p.a_cert);
        pairs_done(&p);
}

static void test_recover_nothing(void **state) {
        Pairs p = {};
        CertfileRecovery rec = CERTFILE_DISCARDED;

        pairs_make(&p);
        assert_int_equal(certfile_recover(key_path, cert_path, &rec), 0);
        assert_int_equal(rec, CERTFILE_NOTHING);
        expect_files(p.a_key, p.a_cert);
        pairs_done(&p);
}

/* Crash after both .new files were written, before the first rename. */
static void test_recover_before_renames(void **state) {
        Pairs p = {};
        CertfileRecovery rec;

        pairs_make(&p);
        write_text(key_new, p.b_key, strlen(p.b_key));
        write_text(cert_new, p.b_cert, strlen(p.b_cert));
        assert_int_equal(certfile_recover(key_path, cert_path, &rec), 0);
        assert_int_equal(rec, CERTFILE_COMPLETED);
        expect_files(p.b_key, p.b_cert);
        pairs_done(&p);
}

/* Crash between the renames: the new key with the old certificate. */
static void test_recover_between_renames(void **state) {
        Pairs p = {};
        CertfileRecovery rec;

        pairs_make(&p);
        write_text(key_path, p.b_key, strlen(p.b_key));
        write_text(cert_new, p.b_cert, strlen(p.b_cert));
        assert_int_equal(csr_pair_matches(cert_path, key_path), 0);
        assert_int_equal(certfile_recover(key_path, cert_path, &rec), 0);
        assert_int_equal(rec, CERTFILE_COMPLETED);
        expect_files(p.b_key, p.b_cert);
        pairs_done(&p);
}

/* The certificate's rename fails once after the key's: the install is
 * completed at once, not left to the next start. */
static void test_install_cert_rename_fails_once(void **state) {
        Pairs p = {};

        pairs_make(&p);
        fail_cert_renames = 1;
        assert_int_equal(certfile_install(key_path, cert_path, p.b_key, p.b_cert), 0);
        assert_int_equal(fail_cert_renames, 0);
        expect_files(p.b_key, p.b_cert);
        pairs_done(&p);
}

/* It keeps failing: an error, and CERT.new for the next start. */
static void test_install_cert_rename_fails(void **state) {
        Pairs p = {};
        CertfileRecovery rec;

        pairs_make(&p);
        fail_cert_renames = 2;
        assert_int_equal(certfile_install(key_path, cert_path, p.b_key, p.b_cert), -EIO);
        assert_int_equal(fail_cert_renames, 0);
        assert_true(exists(cert_new));
        assert_int_equal(certfile_recover(key_path, cert_path, &rec), 0);
        assert_int_equal(rec, CERTFILE_COMPLETED);
        expect_files(p.b_key, p.b_cert);
        pairs_done(&p);
}

/* Crash while writing KEY.new, or CERT.new (torn): the old pair stays. */
static void test_recover_torn(void **state) {
        Pairs p = {};
        CertfileRecovery rec;

        pairs_make(&p);
        write_text(key_new, p.b_key, strlen(p.b_key) / 2);
        assert_int_equal(certfile_recover(key_path, cert_path, &rec), 0);
        assert_int_equal(rec, CERTFILE_DISCARDED);
        expect_files(p.a_key, p.a_cert);

        write_text(key_new, p.b_key, strlen(p.b_key));
        write_text(cert_new, p.b_cert, strlen(p.b_cert) / 2);
        assert_int_equal(certfile_recover(key_path, cert_path, &rec), 0);
        assert_int_equal(rec, CERTFILE_DISCARDED);
        expect_files(p.a_key, p.a_cert);
        pairs_done(&p);
}

/* A CERT.new for another key is never installed. */
static void test_recover_mismatch(void **state) {
        Pairs p = {};
        CertfileRecovery rec;

        pairs_make(&p);
        write_text(cert_new, p.b_cert, strlen(p.b_cert));
        assert_int_equal(certfile_recover(key_path, cert_path, &rec), 0);
        assert_int_equal(rec, CERTFILE_DISCARDED);
        expect_files(p.a_key, p.a_cert);

        write_text(key_new, p.a_key, strlen(p.a_key));
        write_text(cert_new, p.b_cert, strlen(p.b_cert));
        assert_int_equal(certfile_recover(key_path, cert_path, &rec), 0);
        assert_int_equal(rec, CERTFILE_DISCARDED);
        expect_files(p.a_key, p.a_cert);
        pairs_done(&p);
}

/* Enrollment: no certificate yet, the key kept; a crash before the
 * rename leaves CERT.new for KEY. */
static void test_recover_first_certificate(void **state) {
        Pairs p = {};
        CertfileRecovery rec;

        pairs_make(&p);
        (void)unlink(cert_path);
        write_text(cert_new, p.a_cert, strlen(p.a_cert));
        assert_int_equal(certfile_recover(key_path, cert_path, &rec), 0);
        assert_int_equal(rec, CERTFILE_COMPLETED);
        expect_files(p.a_key, p.a_cert);
        pairs_done(&p);
}

static void test_renew_at(void **state) {
        int64_t after = 0;

        /* Two thirds of the lifetime, jitter below a twelfth of it. */
        assert_int_equal(certfile_renew_at(1000, 4000, 0, 0, &after), 3000);
        assert_int_equal(after, 3000);
        for (uint32_t rnd = 0; rnd < 1000; rnd += 7) {
                int64_t at = certfile_renew_at(1000, 4000, 0, rnd * 2654435761u, NULL);
                assert_true(at >= 3000 && at < 3000 + 3000 / 12);
        }
        /* 30 days: renew after 20 days, within 2.5 days after that. */
        assert_int_equal(certfile_renew_at(0, 2592000, 0, 0, &after), 1728000);
        assert_true(certfile_renew_at(0, 2592000, 0, UINT32_MAX, NULL) < 1728000 + 2592000 / 12);
        /* RenewAfterPercent=10 */
        assert_int_equal(certfile_renew_at(1000, 4000, 10, 0, &after), 1300);
        assert_int_equal(after, 1300);
        assert_true(certfile_renew_at(1000, 4000, 10, UINT32_MAX, NULL) < 1300 + 300 / 8 + 1);
        /* Nonsense lifetimes do not go backwards. */
        assert_int_equal(certfile_renew_at(5000, 4000, 0, 12345, &after), 5000);
}

static int setup(void **state) {
        if (!mkdtemp(dir))
                return -1;
        snprintf(key_path, sizeof(key_path), "%s/device.key", dir);
        snprintf(cert_path, sizeof(cert_path), "%s/device.crt", dir);
        snprintf(key_new, sizeof(key_new), "%s.new", key_path);
        snprintf(cert_new, sizeof(cert_new), "%s.new", cert_path);
        return 0;
}

static int teardown(void **state) {
        char cmd[128];

        snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
        return system(cmd) == 0 ? 0 : -1;
}

int main(int argc, char **argv) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_install_new_pair),
                cmocka_unit_test(test_install_keeps_key),
                cmocka_unit_test(test_install_two_directories),
                cmocka_unit_test(test_install_refuses_one_path),
                cmocka_unit_test(test_install_cert_rename_fails_once),
                cmocka_unit_test(test_install_cert_rename_fails),
                cmocka_unit_test(test_recover_nothing),
                cmocka_unit_test(test_recover_before_renames),
                cmocka_unit_test(test_recover_between_renames),
                cmocka_unit_test(test_recover_torn),
                cmocka_unit_test(test_recover_mismatch),
                cmocka_unit_test(test_recover_first_certificate),
                cmocka_unit_test(test_renew_at),
        };

        if (argc > 1)
                cmocka_set_test_filter(argv[1]);
        return cmocka_run_group_tests(tests, setup, teardown);
}
