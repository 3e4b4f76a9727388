/* SPDX-License-Identifier: Apache-2.0 */
#include <errno.h>
#include <fcntl.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <string.h>
#include <time.h>

#include "csr.h"
#include "util.h"

static int ssl_fail(int r) {
        ERR_clear_error();
        return r;
}

int csr_key_generate(EVP_PKEY **ret) {
        EVP_PKEY *key = EVP_EC_gen("P-256");

        if (!key)
                return ssl_fail(-EIO);
        *ret = key;
        return 0;
}

/* OpenSSL asks for a passphrase only for an encrypted key: none is
 * given (OpenSSL's default would prompt on the terminal), and the
 * question is noted. */
static int no_passphrase(char *buf, int size, int rwflag, void *userdata) {
        *(bool *)userdata = true;
        return -1;
}

int csr_key_load(const char *path, EVP_PKEY **ret) {
        _cleanup_fclose_ FILE *f = fopen(path, "re");
        bool encrypted = false;
        EVP_PKEY *key;

        if (!f)
                return -errno;
        key = PEM_read_PrivateKey(f, NULL, no_passphrase, &encrypted);
        if (!key)
                return ssl_fail(encrypted ? -ENOKEY : -EBADMSG);
        *ret = key;
        return 0;
}

const char *csr_key_load_problem(int r) {
        if (r == -EBADMSG)
                return "no PEM private key in it";
        if (r == -ENOKEY)
                return "it is encrypted (a passphrase-protected PEM key); tether needs an unencrypted key: "
                       "'openssl pkey -in KEY -out KEY.plain', then replace it";
        return strerror(-r);
}

int csr_key_pem(EVP_PKEY *key, char **ret) {
        BIO *mem = BIO_new(BIO_s_mem());
        char *data, *copy;
        long len;

        if (!mem)
                return ssl_fail(-ENOMEM);
        if (!PEM_write_bio_PrivateKey(mem, key, NULL, NULL, 0, NULL, NULL)) {
                BIO_free(mem);
                return ssl_fail(-EIO);
        }
        len = BIO_get_mem_data(mem, &data);
        copy = len > 0 ? strndup(data, (size_t)len) : NULL;
        OPENSSL_cleanse(data, len > 0 ? (size_t)len : 0);
        BIO_free(mem);
        if (!copy)
                return -ENOMEM;
        *ret = copy;
        return 0;
}

void csr_fsync_dir_of(const char *path) {
        _cleanup_free_ char *dir = strdup(path);
        char *slash = dir ? strrchr(dir, '/') : NULL;
        _cleanup_close_ int fd = -1;

        if (!dir)
                return;
        if (slash)
                *(slash == dir ? slash + 1 : slash) = '\0';
        else
                strcpy(dir, ".");
        fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (fd >= 0)
                (void)fsync(fd);
}

int csr_key_write_new(EVP_PKEY *key, const char *path) {
        _cleanup_free_ char *tmp = NULL, *pem = NULL;
        _cleanup_close_ int fd = -1;
        size_t len;
        int r;

        if (access(path, F_OK) == 0)
                return -EEXIST;
        r = csr_key_pem(key, &pem);
        if (r < 0)
                return r;
        len = strlen(pem);
        if (asprintf(&tmp, "%s.tmp-XXXXXX", path) < 0)
                return -ENOMEM;
        fd = mkostemp(tmp, O_CLOEXEC); /* mode 0600 */
        if (fd < 0)
                return -errno;
        if (write(fd, pem, len) != (ssize_t)len || fsync(fd) < 0) {
                r = errno ? -errno : -EIO;
                goto fail;
        }
        if (link(tmp, path) < 0) {
                r = -errno;
                goto fail;
        }
        (void)unlink(tmp);
        explicit_bzero(pem, len);
        csr_fsync_dir_of(path);
        return 0;
fail:
        (void)unlink(tmp);
        explicit_bzero(pem, len);
        return r;
}

int csr_key_id(EVP_PKEY *key, char ret[static CSR_ID_SIZE]) {
        unsigned char *der = NULL, md[EVP_MAX_MD_SIZE];
        unsigned md_len = 0;
        int len = i2d_PUBKEY(key, &der);

        if (len <= 0 || !EVP_Digest(der, (size_t)len, md, &md_len, EVP_sha256(), NULL)) {
                OPENSSL_free(der);
                return ssl_fail(-EIO);
        }
        OPENSSL_free(der);
        hex_encode(md, CSR_ID_BYTES, ret);
        return 0;
}

int csr_make(EVP_PKEY *key, const char *id, char **ret_pem) {
        X509_REQ *req = NULL;
        BIO *mem = NULL;
        char *data, *copy = NULL;
        long len;
        int r = -EIO;

        if (!id || proto_name_check(id, strlen(id), PROTO_NAME_DEVICE) < 0)
                return -EINVAL;
        req = X509_REQ_new();
        mem = BIO_new(BIO_s_mem());
        if (!req || !mem || !X509_REQ_set_version(req, X509_REQ_VERSION_1) ||
            !X509_NAME_add_entry_by_NID(X509_REQ_get_subject_name(req), NID_commonName, MBSTRING_ASC,
                                        (const unsigned char *)id, -1, -1, 0) ||
            !X509_REQ_set_pubkey(req, key) || X509_REQ_sign(req, key, EVP_sha256()) <= 0 ||
            !PEM_write_bio_X509_REQ(mem, req))
                goto out;
        len = BIO_get_mem_data(mem, &data);
        copy = len > 0 ? strndup(data, (size_t)len) : NULL;
        if (!copy) {
                r = -ENOMEM;
                goto out;
        }
        *ret_pem = copy;
        r = 0;
out:
        X509_REQ_free(req);
        BIO_free(mem);
        return r < 0 ? ssl_fail(r) : 0;
}

static int64_t asn1_time(const ASN1_TIME *t) {
        struct tm tm;

        if (!t || ASN1_TIME_to_tm(t, &tm) != 1)
                return 0;
        return (int64_t)timegm(&tm);
}

int csr_cert_info_x509(X509 *x, CertInfo *ret) {
        CertInfo info = {};
        const X509_NAME *subject = X509_get_subject_name(x);
        int i = X509_NAME_get_index_by_NID(subject, NID_commonName, -1);

        if (i >= 0 && X509_NAME_get_index_by_NID(subject, NID_commonName, i) < 0) {
                unsigned char *utf8 = NULL;
                int len = ASN1_STRING_to_UTF8(&utf8, X509_NAME_ENTRY_get_data(X509_NAME_get_entry(subject, i)));

                if (len > 0 && (size_t)len < sizeof(info.id) && !memchr(utf8, 0, (size_t)len) &&
                    proto_name_check((const char *)utf8, (size_t)len, PROTO_NAME_DEVICE) >= 0)
                        memcpy(info.id, utf8, (size_t)len);
                OPENSSL_free(utf8);
        }
        info.not_before = asn1_time(X509_get0_notBefore(x));
        info.not_after = asn1_time(X509_get0_notAfter(x));
        ERR_clear_error();
        *ret = info;
        return 0;
}

static int cert_load(const char *path, X509 **ret) {
        _cleanup_fclose_ FILE *f = fopen(path, "re");
        X509 *x;

        if (!f)
                return -errno;
        x = PEM_read_X509(f, NULL, NULL, NULL);
        if (!x)
                return ssl_fail(-EBADMSG);
        *ret = x;
        return 0;
}

int csr_cert_info(const char *path, CertInfo *ret) {
        X509 *x = NULL;
        int r = cert_load(path, &x);

        if (r < 0)
                return r;
        r = csr_cert_info_x509(x, ret);
        X509_free(x);
        return r;
}

int csr_pair_matches(const char *cert_path, const char *key_path) {
        X509 *x = NULL;
        EVP_PKEY *key = NULL;
        int r;

        r = cert_load(cert_path, &x);
        if (r == -EBADMSG)
                return 0;
        if (r < 0)
                return r;
        r = csr_key_load(key_path, &key);
        if (r == 0)
                r = EVP_PKEY_eq(X509_get0_pubkey(x), key) == 1;
        else if (r == -EBADMSG || r == -ENOKEY)
                r = 0;
        X509_free(x);
        EVP_PKEY_free(key);
        ERR_clear_error();
        return r;
}
