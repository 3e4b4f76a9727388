/* SPDX-License-Identifier: Apache-2.0 */
/* tether-pki: the development and test PKI (CA, cloud server certificate,
 * device certificates, API tokens), written against OpenSSL 3's API.
 * EC P-256 keys, SHA-256 signatures, random 128-bit serials. Private keys
 * never exist on disk with a mode wider than 0600. docs/pki.md is the
 * user's reference. Not meant to run a production fleet's CA. */
#include <arpa/inet.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <stdarg.h>
#include <sys/stat.h>
#include <sys/types.h>

#include <openssl/bn.h>
#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "cli-common.h"
#include "log.h"
#include "proto.h"
#include "util.h"

#define PKI_CA_DAYS 3650L   /* ten years */
#define PKI_LEAF_DAYS 730L  /* two years */
#define PKI_MAX_DAYS 36500L /* anything longer is a typo */
/* notBefore is set a little in the past so a peer whose clock lags
 * ours by a few minutes still accepts a certificate made just now. */
#define PKI_BACKDATE_SEC (5L * 60L)
#define PKI_DEFAULT_CA_CN "tether development CA"
#define PKI_CN_MAX 64 /* ub-common-name, RFC 5280 */
#define PKI_DEVICE_ID_BYTES 12
#define PKI_TOKEN_BYTES 20

#define DEFINE_FREEP(type, func)                     \
        static inline void func##p(type **p) {       \
                if (*p)                              \
                        func(*p);                    \
        }
DEFINE_FREEP(EVP_PKEY, EVP_PKEY_free)
DEFINE_FREEP(X509, X509_free)
DEFINE_FREEP(X509_REQ, X509_REQ_free)
DEFINE_FREEP(X509_EXTENSION, X509_EXTENSION_free)
DEFINE_FREEP(BIO, BIO_free_all)
DEFINE_FREEP(BIGNUM, BN_free)
DEFINE_FREEP(GENERAL_NAMES, GENERAL_NAMES_free)
DEFINE_FREEP(GENERAL_NAME, GENERAL_NAME_free)
DEFINE_FREEP(ASN1_OCTET_STRING, ASN1_OCTET_STRING_free)

typedef enum LeafKind {
        LEAF_SERVER,
        LEAF_DEVICE,
} LeafKind;

static struct {
        const char *cn;
        const char *id;
        const char *out;
        long days; /* 0: the command's default */
        bool force;
} arg;

/* Log the failed step with OpenSSL's reason for it, as one line.
 * Returns -EIO so callers can "return log_ssl_error(...)". */
_printf_(1, 2) static int log_ssl_error(const char *fmt, ...) {
        char msg[512], reason[256] = "";
        unsigned long e = ERR_peek_last_error();
        va_list ap;

        if (e) {
                const char *s = ERR_reason_error_string(e);
                if (s)
                        snprintf(reason, sizeof(reason), "%s", s);
                else
                        ERR_error_string_n(e, reason, sizeof(reason));
        }
        ERR_clear_error();

        va_start(ap, fmt);
        vsnprintf(msg, sizeof(msg), fmt, ap);
        va_end(ap);

        log_error("%s%s%s", msg, reason[0] ? ": " : "", reason);
        return -EIO;
}

static int random_hex(size_t n_bytes, char **ret) {
        unsigned char buf[64];
        char *s;

        if (n_bytes > sizeof(buf))
                return -EINVAL;
        if (RAND_bytes(buf, (int)n_bytes) != 1)
                return log_ssl_error("Failed to get random bytes");
        s = malloc(n_bytes * 2 + 1);
        if (!s)
                return log_error_errno(-ENOMEM, "Out of memory");
        hex_encode(buf, n_bytes, s);
        OPENSSL_cleanse(buf, sizeof(buf));
        *ret = s;
        return 0;
}

/* ---- files ---------------------------------------------------------------- */

static char *path_join(const char *a, const char *b) {
        char *p;

        if (asprintf(&p, "%s/%s", a, b) < 0)
                return NULL;
        return p;
}

static int fsync_parent(const char *path) {
        _cleanup_free_ char *dir = strdup(path);
        _cleanup_close_ int fd = -1;
        char *slash;

        if (!dir)
                return -ENOMEM;
        slash = strrchr(dir, '/');
        if (!slash)
                strcpy(dir, ".");
        else if (slash == dir)
                dir[1] = '\0';
        else
                *slash = '\0';
        fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (fd < 0 || fsync(fd) < 0)
                return -errno;
        return 0;
}

/* mkdir -p, each new directory 0755. */
static int mkdir_p(const char *path) {
        _cleanup_free_ char *p = strdup(path);

        if (!p)
                return log_error_errno(-ENOMEM, "Out of memory");
        for (char *s = p + 1;; s++) {
                if (*s != '/' && *s != '\0')
                        continue;
                char c = *s;
                *s = '\0';
                if (mkdir(p, 0755) < 0 && errno != EEXIST)
                        return log_error_errno(-errno, "Failed to create directory '%s': %m", p);
                *s = c;
                if (c == '\0')
                        break;
        }
        return 0;
}

static int mkdir_parent(const char *path) {
        _cleanup_free_ char *dir = strdup(path);
        char *slash;

        if (!dir)
                return log_error_errno(-ENOMEM, "Out of memory");
        slash = strrchr(dir, '/');
        if (!slash || slash == dir)
                return 0;
        *slash = '\0';
        return mkdir_p(dir);
}

static int refuse_existing(const char *path) {
        struct stat st;

        if (arg.force)
                return 0;
        if (lstat(path, &st) == 0)
                return log_error_errno(-EEXIST, "'%s' already exists (use --force to overwrite)", path);
        if (errno != ENOENT)
                return log_error_errno(-errno, "Failed to check '%s': %m", path);
        return 0;
}

/* Write data to a fresh temporary file created with O_EXCL and the final
 * mode, fsync it, then rename it into place (without replacing an existing
 * file unless --force) and fsync the directory. A reader never sees a
 * partial file and a key never exists with a wider mode. */
static int file_write_atomic(const char *path, const void *data, size_t len, mode_t mode) {
        _cleanup_free_ char *suffix = NULL, *tmp = NULL;
        _cleanup_close_ int fd = -1;
        const char *p = data;
        int r;

        r = random_hex(6, &suffix);
        if (r < 0)
                return r;
        if (asprintf(&tmp, "%s.tmp-%s", path, suffix) < 0)
                return log_error_errno(-ENOMEM, "Out of memory");

        fd = open(tmp, O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, mode);
        if (fd < 0)
                return log_error_errno(-errno, "Failed to create '%s': %m", tmp);

        while (len > 0) {
                ssize_t n = write(fd, p, len);
                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        r = log_error_errno(-errno, "Failed to write '%s': %m", tmp);
                        goto fail;
                }
                p += n;
                len -= (size_t)n;
        }
        if (fsync(fd) < 0) {
                r = log_error_errno(-errno, "Failed to sync '%s': %m", tmp);
                goto fail;
        }
        r = close(fd);
        fd = -1;
        if (r < 0) {
                r = log_error_errno(-errno, "Failed to write '%s': %m", tmp);
                goto fail;
        }

        if (arg.force)
                r = rename(tmp, path);
        else {
                r = renameat2(AT_FDCWD, tmp, AT_FDCWD, path, RENAME_NOREPLACE);
                if (r < 0 && (errno == EINVAL || errno == ENOSYS)) {
                        /* File system without RENAME_NOREPLACE: link() also
                         * refuses to replace. */
                        r = link(tmp, path);
                        if (r == 0)
                                (void)unlink(tmp);
                }
        }
        if (r < 0) {
                if (errno == EEXIST)
                        r = log_error_errno(-EEXIST, "'%s' already exists (use --force to overwrite)",
                                            path);
                else
                        r = log_error_errno(-errno, "Failed to rename '%s' to '%s': %m", tmp, path);
                goto fail;
        }

        r = fsync_parent(path);
        if (r < 0)
                return log_error_errno(r, "Failed to sync the directory of '%s': %m", path);
        return 0;

fail:
        (void)unlink(tmp);
        return r;
}

static int write_key(const char *path, EVP_PKEY *key) {
        _cleanup_(BIO_free_allp) BIO *mem = BIO_new(BIO_s_mem());
        char *data;
        long len;

        /* Unencrypted PKCS#8: tetherd and tether-cloudd load keys unattended. */
        if (!mem || !PEM_write_bio_PrivateKey(mem, key, NULL, NULL, 0, NULL, NULL))
                return log_ssl_error("Failed to encode the private key for '%s'", path);
        len = BIO_get_mem_data(mem, &data);
        return file_write_atomic(path, data, (size_t)len, 0600);
}

static int write_cert(const char *path, X509 *cert) {
        _cleanup_(BIO_free_allp) BIO *mem = BIO_new(BIO_s_mem());
        char *data;
        long len;

        if (!mem || !PEM_write_bio_X509(mem, cert))
                return log_ssl_error("Failed to encode the certificate for '%s'", path);
        len = BIO_get_mem_data(mem, &data);
        return file_write_atomic(path, data, (size_t)len, 0644);
}

/* Write the key first: a certificate without its key is useless, and a
 * key whose certificate could not be written is removed again. */
static int write_pair(const char *crt_path, const char *key_path, X509 *cert, EVP_PKEY *key) {
        int r;

        r = write_key(key_path, key);
        if (r < 0)
                return r;
        r = write_cert(crt_path, cert);
        if (r < 0) {
                (void)unlink(key_path);
                return r;
        }
        return 0;
}

/* ---- certificates --------------------------------------------------------- */

static int key_generate(EVP_PKEY **ret) {
        EVP_PKEY *key = EVP_EC_gen("P-256");

        if (!key)
                return log_ssl_error("Failed to generate an EC P-256 key");
        *ret = key;
        return 0;
}

static int serial_set_random(X509 *cert) {
        unsigned char buf[16];
        _cleanup_(BN_freep) BIGNUM *bn = NULL;

        do {
                if (RAND_bytes(buf, sizeof(buf)) != 1)
                        return log_ssl_error("Failed to get random bytes");
                BN_free(bn);
                bn = BN_bin2bn(buf, sizeof(buf), NULL);
                if (!bn)
                        return log_ssl_error("Failed to make a serial number");
        } while (BN_is_zero(bn));

        if (!BN_to_ASN1_INTEGER(bn, X509_get_serialNumber(cert)))
                return log_ssl_error("Failed to set the serial number");
        return 0;
}

static int cn_check(const char *cn, const char *what) {
        if (cn[0] == '\0')
                return log_error_errno(-EINVAL, "The %s must not be empty", what);
        if (strlen(cn) > PKI_CN_MAX)
                return log_error_errno(-ENAMETOOLONG, "The %s '%s' is longer than %d bytes", what, cn,
                                       PKI_CN_MAX);
        return 0;
}

/* A new v3 certificate for key with subject CN=cn, valid for days from
 * now (minus the backdating); serial random; issuer left to the caller. */
static int cert_new(EVP_PKEY *key, const char *cn, long days, X509 **ret) {
        _cleanup_(X509_freep) X509 *cert = X509_new();
        X509_NAME *subject;

        if (!cert)
                return log_ssl_error("Failed to allocate a certificate");
        if (!X509_set_version(cert, X509_VERSION_3))
                return log_ssl_error("Failed to set the certificate version");
        if (serial_set_random(cert) < 0)
                return -EIO;

        subject = X509_get_subject_name(cert);
        if (!X509_NAME_add_entry_by_NID(subject, NID_commonName, MBSTRING_UTF8,
                                        (const unsigned char *)cn, -1, -1, 0))
                return log_ssl_error("Failed to set the subject CN '%s'", cn);

        if (!X509_gmtime_adj(X509_getm_notBefore(cert), -PKI_BACKDATE_SEC) ||
            !X509_time_adj_ex(X509_getm_notAfter(cert), (int)days, 0, NULL))
                return log_ssl_error("Failed to set the validity period");

        if (!X509_set_pubkey(cert, key))
                return log_ssl_error("Failed to set the public key");

        *ret = TAKE_PTR(cert);
        return 0;
}

static int ext_add(X509 *cert, X509V3_CTX *ctx, int nid, const char *value) {
        _cleanup_(X509_EXTENSION_freep) X509_EXTENSION *ext = X509V3_EXT_nconf_nid(NULL, ctx, nid, value);

        if (!ext || !X509_add_ext(cert, ext, -1))
                return log_ssl_error("Failed to add the %s extension '%s'", OBJ_nid2ln(nid), value);
        return 0;
}

static bool host_is_ip(const char *host) {
        unsigned char buf[sizeof(struct in6_addr)];

        return inet_pton(AF_INET, host, buf) == 1 || inet_pton(AF_INET6, host, buf) == 1;
}

/* A DNS name for a SAN: letters, digits, '-' and '.', labels 1-63 bytes,
 * at most 253 bytes, optionally starting with the wildcard label "*.". */
static bool host_is_dns_name(const char *host) {
        size_t label = 0, len = strlen(host);

        if (len == 0 || len > 253)
                return false;
        if (startswith(host, "*.")) {
                host += 2;
                if (*host == '\0')
                        return false;
        }
        for (const char *p = host;; p++) {
                if (*p == '.' || *p == '\0') {
                        if (label == 0 || label > 63)
                                return false;
                        if (*p == '\0')
                                return true;
                        label = 0;
                        continue;
                }
                if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
                      *p == '-'))
                        return false;
                label++;
        }
}

static int san_add(X509 *cert, char **hosts, size_t n_hosts) {
        _cleanup_(GENERAL_NAMES_freep) GENERAL_NAMES *names = sk_GENERAL_NAME_new_null();

        if (!names)
                return log_ssl_error("Failed to allocate the subjectAltName");

        for (size_t i = 0; i < n_hosts; i++) {
                _cleanup_(GENERAL_NAME_freep) GENERAL_NAME *gn = GENERAL_NAME_new();

                if (!gn)
                        return log_ssl_error("Failed to allocate a subjectAltName entry");
                if (host_is_ip(hosts[i])) {
                        ASN1_OCTET_STRING *ip = a2i_IPADDRESS(hosts[i]);
                        if (!ip)
                                return log_ssl_error("Failed to encode the IP address '%s'", hosts[i]);
                        GENERAL_NAME_set0_value(gn, GEN_IPADD, ip);
                } else {
                        ASN1_IA5STRING *dns = ASN1_IA5STRING_new();
                        if (!dns || !ASN1_STRING_set(dns, hosts[i], -1)) {
                                ASN1_IA5STRING_free(dns);
                                return log_ssl_error("Failed to encode the host name '%s'", hosts[i]);
                        }
                        GENERAL_NAME_set0_value(gn, GEN_DNS, dns);
                }
                if (sk_GENERAL_NAME_push(names, gn) <= 0)
                        return log_ssl_error("Failed to build the subjectAltName");
                gn = NULL;
        }

        if (X509_add1_ext_i2d(cert, NID_subject_alt_name, names, 0, X509V3_ADD_DEFAULT) != 1)
                return log_ssl_error("Failed to add the subjectAltName extension");
        return 0;
}

static int ca_make(EVP_PKEY *key, const char *cn, long days, X509 **ret) {
        _cleanup_(X509_freep) X509 *cert = NULL;
        X509V3_CTX ctx;
        int r;

        r = cert_new(key, cn, days, &cert);
        if (r < 0)
                return r;
        if (!X509_set_issuer_name(cert, X509_get_subject_name(cert)))
                return log_ssl_error("Failed to set the issuer name");

        X509V3_set_ctx(&ctx, cert, cert, NULL, NULL, 0);
        if (X509V3_set_issuer_pkey(&ctx, key) != 1)
                return log_ssl_error("Failed to set up the extension context");
        /* The subject key identifier must exist before the authority key
         * identifier of a self-signed certificate is derived from it. */
        if (ext_add(cert, &ctx, NID_basic_constraints, "critical,CA:TRUE,pathlen:0") < 0 ||
            ext_add(cert, &ctx, NID_key_usage, "critical,keyCertSign,cRLSign") < 0 ||
            ext_add(cert, &ctx, NID_subject_key_identifier, "hash") < 0 ||
            ext_add(cert, &ctx, NID_authority_key_identifier, "keyid:always") < 0)
                return -EIO;

        if (X509_sign(cert, key, EVP_sha256()) <= 0)
                return log_ssl_error("Failed to sign the CA certificate");
        *ret = TAKE_PTR(cert);
        return 0;
}

static int leaf_make(LeafKind kind, X509 *ca, EVP_PKEY *ca_key, EVP_PKEY *key, const char *cn,
                     char **hosts, size_t n_hosts, long days, X509 **ret) {
        _cleanup_(X509_freep) X509 *cert = NULL;
        X509V3_CTX ctx;
        int r;

        r = cert_new(key, cn, days, &cert);
        if (r < 0)
                return r;
        if (!X509_set_issuer_name(cert, X509_get_subject_name(ca)))
                return log_ssl_error("Failed to set the issuer name");

        /* Never outlive the CA: the chain would stop verifying first. */
        if (ASN1_TIME_compare(X509_get0_notAfter(cert), X509_get0_notAfter(ca)) > 0) {
                if (!X509_set1_notAfter(cert, X509_get0_notAfter(ca)))
                        return log_ssl_error("Failed to set the validity period");
                log_warning("Warning: the CA expires in less than %ld days; the certificate for '%s' "
                            "is valid only until the CA expires",
                            days, cn);
        }

        X509V3_set_ctx(&ctx, ca, cert, NULL, NULL, 0);
        if (ext_add(cert, &ctx, NID_basic_constraints, "critical,CA:FALSE") < 0 ||
            ext_add(cert, &ctx, NID_key_usage, "critical,digitalSignature") < 0 ||
            ext_add(cert, &ctx, NID_ext_key_usage, kind == LEAF_SERVER ? "serverAuth" : "clientAuth") < 0 ||
            ext_add(cert, &ctx, NID_subject_key_identifier, "hash") < 0 ||
            ext_add(cert, &ctx, NID_authority_key_identifier, "keyid:always") < 0)
                return -EIO;
        if (kind == LEAF_SERVER && san_add(cert, hosts, n_hosts) < 0)
                return -EIO;

        if (X509_sign(cert, ca_key, EVP_sha256()) <= 0)
                return log_ssl_error("Failed to sign the certificate for '%s'", cn);
        *ret = TAKE_PTR(cert);
        return 0;
}

static int no_passphrase(char *buf, int size, int rwflag, void *userdata) {
        return -1;
}

static int ca_load(const char *dir, X509 **ret_cert, EVP_PKEY **ret_key) {
        _cleanup_free_ char *crt_path = path_join(dir, "ca.crt"), *key_path = path_join(dir, "ca.key");
        _cleanup_fclose_ FILE *fc = NULL, *fk = NULL;
        _cleanup_(X509_freep) X509 *cert = NULL;
        _cleanup_(EVP_PKEY_freep) EVP_PKEY *key = NULL;

        if (!crt_path || !key_path)
                return log_error_errno(-ENOMEM, "Out of memory");

        fc = fopen(crt_path, "re");
        if (!fc)
                return log_error_errno(-errno, "Failed to open the CA certificate '%s': %m", crt_path);
        cert = PEM_read_X509(fc, NULL, no_passphrase, NULL);
        if (!cert)
                return log_ssl_error("Failed to read the CA certificate '%s'", crt_path);

        fk = fopen(key_path, "re");
        if (!fk)
                return log_error_errno(-errno, "Failed to open the CA key '%s': %m", key_path);
        key = PEM_read_PrivateKey(fk, NULL, no_passphrase, NULL);
        if (!key)
                return log_ssl_error("Failed to read the CA key '%s'", key_path);

        if (X509_check_ca(cert) <= 0)
                return log_error_errno(-EINVAL, "'%s' is not a CA certificate", crt_path);
        if (X509_check_private_key(cert, key) != 1) {
                ERR_clear_error();
                return log_error_errno(-EINVAL, "'%s' does not match '%s'", key_path, crt_path);
        }

        *ret_cert = TAKE_PTR(cert);
        *ret_key = TAKE_PTR(key);
        return 0;
}

/* ---- commands ------------------------------------------------------------- */

static int cmd_ca(const char *dir) {
        _cleanup_free_ char *crt_path = path_join(dir, "ca.crt"), *key_path = path_join(dir, "ca.key");
        _cleanup_(EVP_PKEY_freep) EVP_PKEY *key = NULL;
        _cleanup_(X509_freep) X509 *cert = NULL;
        const char *cn = arg.cn ?: PKI_DEFAULT_CA_CN;
        int r;

        if (!crt_path || !key_path)
                return log_error_errno(-ENOMEM, "Out of memory");
        r = cn_check(cn, "CA common name");
        if (r < 0)
                return r;
        r = mkdir_p(dir);
        if (r < 0)
                return r;
        r = refuse_existing(crt_path);
        if (r < 0)
                return r;
        r = refuse_existing(key_path);
        if (r < 0)
                return r;

        r = key_generate(&key);
        if (r < 0)
                return r;
        r = ca_make(key, cn, arg.days ?: PKI_CA_DAYS, &cert);
        if (r < 0)
                return r;
        return write_pair(crt_path, key_path, cert, key);
}

static int cmd_server(const char *dir, char **hosts, size_t n_hosts) {
        _cleanup_free_ char *crt_path = path_join(dir, "server.crt"),
                            *key_path = path_join(dir, "server.key");
        _cleanup_(EVP_PKEY_freep) EVP_PKEY *ca_key = NULL, *key = NULL;
        _cleanup_(X509_freep) X509 *ca = NULL, *cert = NULL;
        int r;

        if (!crt_path || !key_path)
                return log_error_errno(-ENOMEM, "Out of memory");
        for (size_t i = 0; i < n_hosts; i++)
                if (!host_is_ip(hosts[i]) && !host_is_dns_name(hosts[i]))
                        return log_error_errno(-EINVAL, "'%s' is neither a host name nor an IP address",
                                               hosts[i]);
        r = cn_check(hosts[0], "first host name");
        if (r < 0)
                return r;

        r = ca_load(dir, &ca, &ca_key);
        if (r < 0)
                return r;
        r = refuse_existing(crt_path);
        if (r < 0)
                return r;
        r = refuse_existing(key_path);
        if (r < 0)
                return r;

        r = key_generate(&key);
        if (r < 0)
                return r;
        r = leaf_make(LEAF_SERVER, ca, ca_key, key, hosts[0], hosts, n_hosts, arg.days ?: PKI_LEAF_DAYS,
                      &cert);
        if (r < 0)
                return r;
        return write_pair(crt_path, key_path, cert, key);
}

static int cmd_device(const char *dir) {
        _cleanup_free_ char *id = NULL, *prefix = NULL, *crt_path = NULL, *key_path = NULL;
        _cleanup_(EVP_PKEY_freep) EVP_PKEY *ca_key = NULL, *key = NULL;
        _cleanup_(X509_freep) X509 *ca = NULL, *cert = NULL;
        int r;

        if (arg.id) {
                r = proto_name_check(arg.id, strlen(arg.id), PROTO_NAME_DEVICE);
                if (r < 0)
                        return log_error_errno(r, "Invalid device ID '%s': %s", arg.id,
                                               proto_device_id_problem(r));
                id = strdup(arg.id);
                if (!id)
                        return log_error_errno(-ENOMEM, "Out of memory");
        } else {
                r = random_hex(PKI_DEVICE_ID_BYTES, &id);
                if (r < 0)
                        return r;
        }

        if (arg.out)
                prefix = strdup(arg.out);
        else if (asprintf(&prefix, "%s/devices/%s", dir, id) < 0)
                prefix = NULL;
        if (!prefix || asprintf(&crt_path, "%s.crt", prefix) < 0 || asprintf(&key_path, "%s.key", prefix) < 0)
                return log_error_errno(-ENOMEM, "Out of memory");

        r = ca_load(dir, &ca, &ca_key);
        if (r < 0)
                return r;
        r = mkdir_parent(crt_path);
        if (r < 0)
                return r;
        r = refuse_existing(crt_path);
        if (r < 0)
                return r;
        r = refuse_existing(key_path);
        if (r < 0)
                return r;

        r = key_generate(&key);
        if (r < 0)
                return r;
        r = leaf_make(LEAF_DEVICE, ca, ca_key, key, id, NULL, 0, arg.days ?: PKI_LEAF_DAYS, &cert);
        if (r < 0)
                return r;
        r = write_pair(crt_path, key_path, cert, key);
        if (r < 0)
                return r;

        printf("%s\n", id);
        return 0;
}

/* Sign a device's certificate signing request: the device made its key
 * and keeps it; only the public key and the requested CN (the device ID)
 * are taken from the CSR, every extension is ours. */
static int cmd_sign(const char *dir, const char *csr_path) {
        _cleanup_free_ char *prefix = NULL, *crt_path = NULL;
        _cleanup_(EVP_PKEY_freep) EVP_PKEY *ca_key = NULL;
        _cleanup_(X509_freep) X509 *ca = NULL, *cert = NULL;
        _cleanup_(X509_REQ_freep) X509_REQ *req = NULL;
        _cleanup_fclose_ FILE *f = NULL;
        EVP_PKEY *pub;
        char id[PROTO_DEVICE_ID_MAX + 2];
        int r, n;

        f = streq(csr_path, "-") ? NULL : fopen(csr_path, "re");
        if (!f && !streq(csr_path, "-"))
                return log_error_errno(-errno, "Failed to open the request '%s': %m", csr_path);
        req = PEM_read_X509_REQ(f ? f : stdin, NULL, no_passphrase, NULL);
        if (!req)
                return log_ssl_error("Failed to read a PEM certificate request from '%s'", csr_path);
        pub = X509_REQ_get0_pubkey(req);
        if (!pub || X509_REQ_verify(req, pub) != 1)
                return log_ssl_error("The request '%s' is not signed by its own key", csr_path);
        n = X509_NAME_get_text_by_NID(X509_REQ_get_subject_name(req), NID_commonName, id, sizeof(id));
        if (n <= 0)
                return log_error_errno(-EINVAL, "The request '%s' has no subject CN (the device ID)", csr_path);
        r = strlen(id) == (size_t)n ? proto_name_check(id, (size_t)n, PROTO_NAME_DEVICE) : -EINVAL;
        if (r < 0)
                return log_error_errno(-EINVAL, "Invalid device ID '%s' in '%s': %s", id, csr_path,
                                       proto_device_id_problem(r));

        if (arg.out)
                prefix = strdup(arg.out);
        else if (asprintf(&prefix, "%s/devices/%s", dir, id) < 0)
                prefix = NULL;
        if (!prefix || asprintf(&crt_path, "%s.crt", prefix) < 0)
                return log_error_errno(-ENOMEM, "Out of memory");
        r = ca_load(dir, &ca, &ca_key);
        if (r < 0)
                return r;
        r = mkdir_parent(crt_path);
        if (r < 0)
                return r;
        r = refuse_existing(crt_path);
        if (r < 0)
                return r;
        r = leaf_make(LEAF_DEVICE, ca, ca_key, pub, id, NULL, 0, arg.days ?: PKI_LEAF_DAYS, &cert);
        if (r < 0)
                return r;
        r = write_cert(crt_path, cert);
        if (r < 0)
                return r;
        printf("%s\n", id);
        return 0;
}

static int cmd_token(const char *path) {
        _cleanup_free_ char *token = NULL, *line = NULL;
        _cleanup_close_ int fd = -1;
        struct stat st;
        size_t len;
        int r;

        r = random_hex(PKI_TOKEN_BYTES, &token);
        if (r < 0)
                return r;

        fd = open(path, O_RDWR | O_APPEND | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
        if (fd < 0)
                return log_error_errno(-errno, "Failed to open '%s': %m", path);
        if (fstat(fd, &st) < 0)
                return log_error_errno(-errno, "Failed to stat '%s': %m", path);
        if (!S_ISREG(st.st_mode))
                return log_error_errno(-EINVAL, "'%s' is not a regular file", path);
        if (st.st_mode & 0077)
                log_warning("Warning: '%s' is accessible to other users (mode %04o)", path,
                            (unsigned)(st.st_mode & 07777));

        /* Keep one token per line even if the file lacks a final newline. */
        bool need_nl = false;
        if (st.st_size > 0) {
                char last;
                if (pread(fd, &last, 1, st.st_size - 1) == 1 && last != '\n')
                        need_nl = true;
        }
        if (asprintf(&line, "%s%s\n", need_nl ? "\n" : "", token) < 0)
                return log_error_errno(-ENOMEM, "Out of memory");
        len = strlen(line);
        if (write(fd, line, len) != (ssize_t)len)
                return log_error_errno(errno ? -errno : -EIO, "Failed to write '%s': %m", path);
        if (fsync(fd) < 0)
                return log_error_errno(-errno, "Failed to sync '%s': %m", path);
        if (close(fd) < 0) {
                /* cppcheck-suppress unreadVariable ; closed above; the _cleanup_ handler reads it */
                fd = -1;
                return log_error_errno(-errno, "Failed to write '%s': %m", path);
        }
        fd = -1;

        printf("%s\n", token);
        return 0;
}

/* ---- command line --------------------------------------------------------- */

static void help(void) {
        printf("Usage: tether-pki COMMAND [OPTIONS] ARGS...\n"
               "\n"
               "Development and test PKI for tether (EC P-256, SHA-256).\n"
               "\n"
               "Commands:\n"
               "  ca DIR [--cn NAME]             create DIR/ca.crt and DIR/ca.key\n"
               "  server DIR HOST [HOST...]      create DIR/server.crt and DIR/server.key signed\n"
               "                                 by DIR/ca.*; CN = first HOST, SAN = every HOST\n"
               "  device DIR [--id ID] [--out PREFIX]\n"
               "                                 create a device certificate (CN = ID, default\n"
               "                                 24 random hex digits) as PREFIX.crt/.key, default\n"
               "                                 DIR/devices/ID.crt/.key; prints the ID\n"
               "  sign DIR CSR [--out PREFIX]    sign a device's certificate request (PEM, '-' for\n"
               "                                 stdin) with DIR/ca.*; writes PREFIX.crt, default\n"
               "                                 DIR/devices/ID.crt (ID = the request's CN); prints\n"
               "                                 the ID\n"
               "  token FILE                     append a random API token to FILE (created 0600)\n"
               "                                 and print it\n"
               "\n"
               "Options:\n"
               "  --cn NAME      CA subject common name (default \"" PKI_DEFAULT_CA_CN "\")\n"
               "  --id ID        device ID, [A-Za-z0-9_-]{1,64}, not 'api' or 'events'\n"
               "  --out PREFIX   device output path prefix\n"
               "  --days N       validity in days (default: CA %ld, server and device %ld)\n"
               "  --force        overwrite existing certificate and key files\n"
               "  -h, --help     show this help\n"
               "  --version      show the version\n",
               PKI_CA_DAYS, PKI_LEAF_DAYS);
}

enum {
        OPT_CN = 0x100,
        OPT_ID,
        OPT_OUT,
        OPT_DAYS,
        OPT_FORCE,
        OPT_VERSION,
};

/* Which options each command accepts, by bit (1 << (opt - OPT_CN)). */
#define OPT_BIT(o) (1u << ((o) - OPT_CN))

int main(int argc, char **argv) {
        static const struct option options[] = {
                { "cn", required_argument, NULL, OPT_CN },
                { "id", required_argument, NULL, OPT_ID },
                { "out", required_argument, NULL, OPT_OUT },
                { "days", required_argument, NULL, OPT_DAYS },
                { "force", no_argument, NULL, OPT_FORCE },
                { "help", no_argument, NULL, 'h' },
                { "version", no_argument, NULL, OPT_VERSION },
                {},
        };
        unsigned used = 0, allowed;
        const char *cmd;
        char **pos;
        int n_pos, c, r;

        log_open("tether-pki");

        if (argc < 2)
                return cli_usage_error("Missing command"), CLI_EXIT_USAGE;
        if (streq(argv[1], "--help") || streq(argv[1], "-h")) {
                help();
                return 0;
        }
        if (streq(argv[1], "--version")) {
                printf("tether-pki %s\n", PACKAGE_VERSION);
                return 0;
        }
        cmd = argv[1];
        if (streq(cmd, "ca"))
                allowed = OPT_BIT(OPT_CN) | OPT_BIT(OPT_DAYS) | OPT_BIT(OPT_FORCE);
        else if (streq(cmd, "server"))
                allowed = OPT_BIT(OPT_DAYS) | OPT_BIT(OPT_FORCE);
        else if (streq(cmd, "device"))
                allowed = OPT_BIT(OPT_ID) | OPT_BIT(OPT_OUT) | OPT_BIT(OPT_DAYS) | OPT_BIT(OPT_FORCE);
        else if (streq(cmd, "sign"))
                allowed = OPT_BIT(OPT_OUT) | OPT_BIT(OPT_DAYS) | OPT_BIT(OPT_FORCE);
        else if (streq(cmd, "token"))
                allowed = 0;
        else
                return cli_usage_error("Unknown command '%s'", cmd), CLI_EXIT_USAGE;

        /* Parse the command's own argv so options may follow the arguments. */
        opterr = 0;
        optind = 1;
        while ((c = getopt_long(argc - 1, argv + 1, ":h", options, NULL)) >= 0) {
                switch (c) {
                case 'h':
                        help();
                        return 0;
                case OPT_VERSION:
                        printf("tether-pki %s\n", PACKAGE_VERSION);
                        return 0;
                case OPT_CN:
                        arg.cn = optarg;
                        break;
                case OPT_ID:
                        arg.id = optarg;
                        break;
                case OPT_OUT:
                        if (optarg[0] == '\0')
                                return cli_usage_error("--out must not be empty"), CLI_EXIT_USAGE;
                        arg.out = optarg;
                        break;
                case OPT_DAYS: {
                        char *end;
                        errno = 0;
                        long d = strtol(optarg, &end, 10);
                        if (errno || end == optarg || *end || d < 1 || d > PKI_MAX_DAYS)
                                return cli_usage_error("Invalid --days '%s': expected 1-%ld", optarg, PKI_MAX_DAYS),
                                       CLI_EXIT_USAGE;
                        arg.days = d;
                        break;
                }
                case OPT_FORCE:
                        arg.force = true;
                        break;
                case ':':
                        return cli_usage_error("Option '%s' needs an argument", argv[optind]), CLI_EXIT_USAGE;
                default:
                        return cli_usage_error("Unknown option '%s'", argv[optind]), CLI_EXIT_USAGE;
                }
                if (c >= OPT_CN && c <= OPT_FORCE)
                        used |= OPT_BIT(c);
        }
        if (used & ~allowed) {
                for (const struct option *o = options; o->name; o++)
                        if (o->val >= OPT_CN && o->val <= OPT_FORCE && (used & ~allowed & OPT_BIT(o->val)))
                                return cli_usage_error("Option '--%s' is not valid for '%s'", o->name, cmd),
                                       CLI_EXIT_USAGE;
        }

        pos = argv + 1 + optind;
        n_pos = argc - 1 - optind;

        if (streq(cmd, "ca")) {
                if (n_pos != 1)
                        return cli_usage_error("'ca' takes one argument, DIR"), CLI_EXIT_USAGE;
                r = cmd_ca(pos[0]);
        } else if (streq(cmd, "server")) {
                if (n_pos < 2)
                        return cli_usage_error("'server' takes DIR and at least one HOST"), CLI_EXIT_USAGE;
                r = cmd_server(pos[0], pos + 1, (size_t)n_pos - 1);
        } else if (streq(cmd, "device")) {
                if (n_pos != 1)
                        return cli_usage_error("'device' takes one argument, DIR"), CLI_EXIT_USAGE;
                r = cmd_device(pos[0]);
        } else if (streq(cmd, "sign")) {
                if (n_pos != 2)
                        return cli_usage_error("'sign' takes two arguments, DIR and CSR"), CLI_EXIT_USAGE;
                r = cmd_sign(pos[0], pos[1]);
        } else {
                if (n_pos != 1)
                        return cli_usage_error("'token' takes one argument, FILE"), CLI_EXIT_USAGE;
                r = cmd_token(pos[0]);
        }
        if (r < 0)
                return 1;

        if (fflush(stdout) != 0 || ferror(stdout)) {
                log_error_errno(-errno, "Failed to write to standard output: %m");
                return 1;
        }
        return 0;
}
