/* SPDX-License-Identifier: Apache-2.0 */
/* The certificate signer (signer.h). */
#include "config.h"

#include <fcntl.h>
#include <openssl/bn.h>
#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509v3.h>
#include <signal.h>
#include <spawn.h>
#include <sys/epoll.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "log.h"
#include "signer.h"
#include "tls.h"
#include "util.h"

#define USEC_PER_SEC 1000000ULL
#define SIGNER_STDERR_MAX 4096
#define SIGNER_ARGS_MAX 64

struct SignerJob {
        Signer *signer;
        SignerJob *prev, *next; /* in the queue or the running list */
        bool running;
        char id[PROTO_DEVICE_ID_MAX + 1];
        char pubkey[65];
        char why[8];
        X509_REQ *req; /* a reference to the CSR's */
        char *csr_pem;
        signer_done_fn cb;
        void *userdata;
        pid_t pid;
        int out_fd, err_fd;
        sd_event_source *child, *out_io, *err_io, *timer;
        char *out;
        size_t out_len;
        bool out_too_big;
        char err[SIGNER_STDERR_MAX];
        size_t err_len;
        bool timed_out;
};

struct Signer {
        sd_event *event;
        const CloudConfig *config;
        X509 *ca;             /* built-in */
        EVP_PKEY *ca_key;
        bool ca_in_chain;     /* an intermediate: sent after the leaf */
        X509_STORE *trust;    /* [Cloud] CAFile, to check what the command prints */
        char **argv;          /* SignCommand split on blanks */
        SignerJob *queue_head, *queue_tail, *running;
        size_t n_queued, n_running;
        sd_event_source *defer; /* starts queued jobs from the loop */
};

static void X509_freep(X509 **p) { X509_free(*p); }
static void BIO_freep(BIO **p) { BIO_free(*p); }
static void X509_REQ_freep(X509_REQ **p) { X509_REQ_free(*p); }

static int64_t asn1_time_unix(const ASN1_TIME *t) {
        struct tm tm;

        return t && ASN1_TIME_to_tm(t, &tm) == 1 ? (int64_t)timegm(&tm) : 0;
}

/* ---- CSR ----------------------------------------------------------------- */

void signer_csr_done(SignerCsr *csr) {
        X509_REQ_free(csr->req);
        free(csr->pem);
        *csr = (SignerCsr){};
}

/* EC P-256 or RSA of at least 2048 bits. */
static bool key_acceptable(EVP_PKEY *key, char reason[static SIGNER_REASON_MAX]) {
        char group[64] = "";
        size_t glen = 0;

        if (EVP_PKEY_is_a(key, "RSA")) {
                if (EVP_PKEY_get_bits(key) >= 2048)
                        return true;
                snprintf(reason, SIGNER_REASON_MAX, "the CSR's RSA key has %d bits, at least 2048 are needed",
                         EVP_PKEY_get_bits(key));
                return false;
        }
        if (EVP_PKEY_is_a(key, "EC") &&
            EVP_PKEY_get_utf8_string_param(key, "group", group, sizeof(group), &glen) == 1 &&
            (streq(group, "prime256v1") || streq(group, "P-256")))
                return true;
        snprintf(reason, SIGNER_REASON_MAX, "the CSR's key must be EC P-256 or RSA of at least 2048 bits");
        return false;
}

/* The only commonName of name as a device ID, into id. */
static int name_device_id(const X509_NAME *name, char id[static PROTO_DEVICE_ID_MAX + 1],
                          char reason[static SIGNER_REASON_MAX], const char *what) {
        int i = X509_NAME_get_index_by_NID(name, NID_commonName, -1), n;
        const ASN1_STRING *s;
        unsigned char *utf8 = NULL;

        if (i < 0) {
                snprintf(reason, SIGNER_REASON_MAX, "the %s has no commonName (the device ID)", what);
                return -EBADMSG;
        }
        if (X509_NAME_get_index_by_NID(name, NID_commonName, i) >= 0) {
                snprintf(reason, SIGNER_REASON_MAX, "the %s has more than one commonName", what);
                return -EBADMSG;
        }
        s = X509_NAME_ENTRY_get_data(X509_NAME_get_entry(name, i));
        n = s ? ASN1_STRING_to_UTF8(&utf8, s) : -1;
        if (n <= 0 || n > PROTO_DEVICE_ID_MAX || memchr(utf8, 0, (size_t)n) ||
            proto_name_check((const char *)utf8, (size_t)n, PROTO_NAME_DEVICE) < 0) {
                int r = n > 0 && n <= PROTO_DEVICE_ID_MAX && !memchr(utf8, 0, (size_t)n)
                                ? proto_name_check((const char *)utf8, (size_t)n, PROTO_NAME_DEVICE)
                                : -EINVAL;

                snprintf(reason, SIGNER_REASON_MAX, "the %s's commonName is not a valid device ID: %s", what,
                         proto_device_id_problem(r));
                OPENSSL_free(utf8);
                return -EBADMSG;
        }
        memcpy(id, utf8, (size_t)n);
        id[n] = 0;
        OPENSSL_free(utf8);
        return 0;
}

int signer_csr_parse(const char *pem, size_t len, SignerCsr *ret, char reason[static SIGNER_REASON_MAX]) {
        _cleanup_(X509_REQ_freep) X509_REQ *req = NULL;
        _cleanup_(BIO_freep) BIO *b = NULL;
        _cleanup_free_ char *copy = NULL;
        SignerCsr csr = {};
        EVP_PKEY *key;
        int r;

        if (len > SIGNER_CSR_MAX) {
                snprintf(reason, SIGNER_REASON_MAX, "the CSR is larger than %u bytes", (unsigned)SIGNER_CSR_MAX);
                return -E2BIG;
        }
        if (memchr(pem, 0, len)) {
                snprintf(reason, SIGNER_REASON_MAX, "the CSR is not PEM text");
                return -EBADMSG;
        }
        copy = strndup(pem, len);
        b = BIO_new_mem_buf(pem, (int)len);
        if (!copy || !b)
                return -ENOMEM;
        req = PEM_read_bio_X509_REQ(b, NULL, NULL, NULL);
        if (!req) {
                ERR_clear_error();
                snprintf(reason, SIGNER_REASON_MAX, "the CSR is not a PEM certificate signing request");
                return -EBADMSG;
        }
        key = X509_REQ_get0_pubkey(req);
        if (!key) {
                ERR_clear_error();
                snprintf(reason, SIGNER_REASON_MAX, "the CSR's public key cannot be read");
                return -EBADMSG;
        }
        if (!key_acceptable(key, reason))
                return -EOPNOTSUPP;
        if (X509_REQ_verify(req, key) != 1) {
                ERR_clear_error();
                snprintf(reason, SIGNER_REASON_MAX, "the CSR's signature does not verify");
                return -EBADMSG;
        }
        r = name_device_id(X509_REQ_get_subject_name(req), csr.id, reason, "CSR");
        if (r < 0)
                return r;
        if (tls_spki_sha256(X509_REQ_get_X509_PUBKEY(req), csr.pubkey) < 0) {
                ERR_clear_error();
                snprintf(reason, SIGNER_REASON_MAX, "the CSR's public key cannot be encoded");
                return -EBADMSG;
        }
        csr.req = TAKE_PTR(req);
        csr.pem = TAKE_PTR(copy);
        *ret = csr;
        return 0;
}

void signer_cert_done(SignerCert *cert) {
        free(cert->pem);
        *cert = (SignerCert){};
}

/* Describe leaf and write it, then chain (may be NULL), as PEM into *cert. */
static int cert_fill(X509 *leaf, STACK_OF(X509) *chain, SignerCert *ret) {
        _cleanup_(BIO_freep) BIO *b = BIO_new(BIO_s_mem());
        const ASN1_INTEGER *serial = X509_get0_serialNumber(leaf);
        BIGNUM *bn = serial ? ASN1_INTEGER_to_BN(serial, NULL) : NULL;
        char *hex = bn ? BN_bn2hex(bn) : NULL, *data;
        unsigned char md[EVP_MAX_MD_SIZE];
        unsigned n = 0;
        SignerCert c = {};
        long len;
        int ok;

        BN_free(bn);
        ok = b && hex && PEM_write_bio_X509(b, leaf) == 1 && X509_digest(leaf, EVP_sha256(), md, &n) == 1 &&
             tls_spki_sha256(X509_get_X509_PUBKEY(leaf), c.pubkey) == 0;
        for (int i = 0; ok && chain && i < sk_X509_num(chain); i++)
                ok = PEM_write_bio_X509(b, sk_X509_value(chain, i)) == 1;
        if (ok) {
                snprintf(c.serial, sizeof(c.serial), "%s", hex);
                tls_name_text(X509_get_issuer_name(leaf), c.issuer, sizeof(c.issuer));
                hex_encode(md, n < 32 ? n : 32, c.fingerprint);
                c.not_before = asn1_time_unix(X509_get0_notBefore(leaf));
                c.not_after = asn1_time_unix(X509_get0_notAfter(leaf));
                len = BIO_get_mem_data(b, &data);
                c.pem = len > 0 ? strndup(data, (size_t)len) : NULL;
                ok = c.pem != NULL;
        }
        OPENSSL_free(hex);
        ERR_clear_error();
        if (!ok)
                return -ENOMEM;
        *ret = c;
        return 0;
}

/* ---- built-in signing ------------------------------------------------------ */

static int ext_add(X509 *cert, X509V3_CTX *ctx, int nid, const char *value) {
        X509_EXTENSION *ext = X509V3_EXT_nconf_nid(NULL, ctx, nid, value);
        int ok = ext && X509_add_ext(cert, ext, -1);

        X509_EXTENSION_free(ext);
        return ok ? 0 : -EIO;
}

/* The CSR's SubjectPublicKeyInfo into the certificate's, as it is:
 * X509_set_pubkey() would encode the key and decode it again (OpenSSL
 * 3.0 looks up its encoders and decoders for each). The CSR's key was
 * decoded and checked (signer_csr_parse()). */
static bool spki_copy(X509_PUBKEY *to, X509_PUBKEY *from) {
        const unsigned char *bits;
        unsigned char *copy;
        X509_ALGOR *from_alg, *to_alg;
        int len;

        if (!to || !from || X509_PUBKEY_get0_param(NULL, &bits, &len, &from_alg, from) != 1 || len <= 0)
                return false;
        copy = OPENSSL_memdup(bits, (size_t)len);
        if (!copy)
                return false;
        /* The algorithm is set from from's just below. */
        if (X509_PUBKEY_set0_param(to, OBJ_nid2obj(NID_undef), V_ASN1_UNDEF, NULL, copy, len) != 1) {
                OPENSSL_free(copy);
                return false;
        }
        return X509_PUBKEY_get0_param(NULL, NULL, NULL, &to_alg, to) == 1 && X509_ALGOR_copy(to_alg, from_alg) == 1;
}

/* The device certificate of tools/tether-pki.c's leaf_make(LEAF_DEVICE),
 * with a random 128-bit serial, backdated SIGNER_BACKDATE_SEC, never
 * outliving the CA. */
int signer_sign(Signer *s, const SignerCsr *csr, SignerCert *ret, char reason[static SIGNER_REASON_MAX]) {
        _cleanup_(X509_freep) X509 *cert = NULL;
        unsigned char rnd[16];
        BIGNUM *bn = NULL;
        X509V3_CTX ctx;
        X509_NAME *subject;
        STACK_OF(X509) *chain = NULL;
        time_t now = time(NULL);
        int ok, r;

        if (!s->ca) {
                snprintf(reason, SIGNER_REASON_MAX, "the built-in signer is not configured");
                return -EOPNOTSUPP;
        }
        cert = X509_new();
        ok = cert && X509_set_version(cert, X509_VERSION_3) && RAND_bytes(rnd, sizeof(rnd)) == 1;
        if (ok) {
                rnd[0] &= 0x7f; /* positive */
                rnd[0] |= 0x40; /* and 16 bytes long */
                bn = BN_bin2bn(rnd, sizeof(rnd), NULL);
                ok = bn && BN_to_ASN1_INTEGER(bn, X509_get_serialNumber(cert));
                BN_free(bn);
        }
        subject = ok ? X509_get_subject_name(cert) : NULL;
        ok = ok && X509_NAME_add_entry_by_NID(subject, NID_commonName, MBSTRING_UTF8,
                                              (const unsigned char *)csr->id, -1, -1, 0) &&
             X509_set_issuer_name(cert, X509_get_subject_name(s->ca)) &&
             X509_time_adj_ex(X509_getm_notBefore(cert), 0, -SIGNER_BACKDATE_SEC, &now) &&
             X509_time_adj_ex(X509_getm_notAfter(cert), 0, (long)s->config->cert_validity_sec, &now) &&
             spki_copy(X509_get_X509_PUBKEY(cert), X509_REQ_get_X509_PUBKEY(csr->req));
        if (ok && ASN1_TIME_compare(X509_get0_notAfter(cert), X509_get0_notAfter(s->ca)) > 0)
                ok = X509_set1_notAfter(cert, X509_get0_notAfter(s->ca));
        if (ok) {
                X509V3_set_ctx(&ctx, s->ca, cert, NULL, NULL, 0);
                ok = ext_add(cert, &ctx, NID_basic_constraints, "critical,CA:FALSE") == 0 &&
                     ext_add(cert, &ctx, NID_key_usage, "critical,digitalSignature") == 0 &&
                     ext_add(cert, &ctx, NID_ext_key_usage, "clientAuth") == 0 &&
                     ext_add(cert, &ctx, NID_subject_key_identifier, "hash") == 0 &&
                     ext_add(cert, &ctx, NID_authority_key_identifier, "keyid:always") == 0;
        }
        ok = ok && X509_sign(cert, s->ca_key, EVP_sha256()) > 0;
        if (!ok) {
                ERR_clear_error();
                snprintf(reason, SIGNER_REASON_MAX, "the cloud failed to sign the certificate");
                return -EIO;
        }
        if (s->ca_in_chain) {
                chain = sk_X509_new_null();
                if (!chain || !sk_X509_push(chain, s->ca)) {
                        sk_X509_free(chain);
                        return -ENOMEM;
                }
        }
        r = cert_fill(cert, chain, ret);
        sk_X509_free(chain);
        return r;
}

/* ---- external command -------------------------------------------------------- */

static void job_unlink(SignerJob *j) {
        Signer *s = j->signer;
        SignerJob **head = j->running ? &s->running : &s->queue_head;

        if (j->prev)
                j->prev->next = j->next;
        else
                *head = j->next;
        if (j->next)
                j->next->prev = j->prev;
        else if (!j->running)
                s->queue_tail = j->prev;
        if (j->running)
                s->n_running--;
        else
                s->n_queued--;
        j->prev = j->next = NULL;
}

static void job_free(SignerJob *j) {
        if (!j)
                return;
        j->child = sd_event_source_disable_unref(j->child);
        if (j->pid > 0) {
                (void)kill(-j->pid, SIGKILL);
                (void)kill(j->pid, SIGKILL);
                (void)waitpid(j->pid, NULL, 0);
        }
        j->out_io = sd_event_source_disable_unref(j->out_io);
        j->err_io = sd_event_source_disable_unref(j->err_io);
        j->timer = sd_event_source_disable_unref(j->timer);
        if (j->out_fd >= 0)
                close(j->out_fd);
        if (j->err_fd >= 0)
                close(j->err_fd);
        X509_REQ_free(j->req);
        free(j->csr_pem);
        free(j->out);
        free(j);
}

static void signer_run_queue(Signer *s);

/* End j: unlink, free, then its callback (which may start new jobs). */
static void job_finish(SignerJob *j, int error, SignerCert *cert, const char *reason) {
        Signer *s = j->signer;
        signer_done_fn cb = j->cb;
        void *userdata = j->userdata;

        if (error < 0)
                log_warning("Signing command for device '%s' failed: %s.", j->id, reason);
        job_unlink(j);
        job_free(j);
        cb(userdata, error, cert, reason);
        signer_run_queue(s);
}

/* Read what is there (non-blocking); 0 at EOF, 1 if more may come. */
static int job_read(SignerJob *j, bool out) {
        int fd = out ? j->out_fd : j->err_fd;

        for (;;) {
                char buf[4096];
                ssize_t n = read(fd, buf, sizeof(buf));

                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0)
                        return errno == EAGAIN ? 1 : 0;
                if (n == 0)
                        return 0;
                if (!out) {
                        size_t room = sizeof(j->err) - 1 - j->err_len, k = (size_t)n < room ? (size_t)n : room;

                        memcpy(j->err + j->err_len, buf, k);
                        j->err_len += k;
                        j->err[j->err_len] = 0;
                        continue;
                }
                if (j->out_len + (size_t)n > SIGNER_OUTPUT_MAX) {
                        j->out_too_big = true;
                        continue;
                }
                char *m = realloc(j->out, j->out_len + (size_t)n + 1);
                if (!m) {
                        j->out_too_big = true;
                        continue;
                }
                j->out = m;
                memcpy(j->out + j->out_len, buf, (size_t)n);
                j->out_len += (size_t)n;
                j->out[j->out_len] = 0;
        }
}

static int job_io_cb(sd_event_source *src, int fd, uint32_t revents, void *userdata) {
        SignerJob *j = userdata;
        bool out = fd == j->out_fd;

        if (job_read(j, out) == 0)
                (void)sd_event_source_set_enabled(src, SD_EVENT_OFF);
        if (out && j->out_too_big && j->pid > 0)
                (void)kill(-j->pid, SIGKILL);
        return 0;
}

static int job_timer_cb(sd_event_source *src, uint64_t usec, void *userdata) {
        SignerJob *j = userdata;

        j->timed_out = true;
        if (j->pid > 0)
                (void)kill(-j->pid, SIGKILL);
        return 0;
}

/* Check what the command printed; 0 and *ret, or -EPROTO with reason. */
static int job_check_output(SignerJob *j, SignerCert *ret, char reason[static SIGNER_REASON_MAX]) {
        Signer *s = j->signer;
        _cleanup_(BIO_freep) BIO *b = NULL;
        STACK_OF(X509) *certs = NULL;
        X509_STORE_CTX *ctx = NULL;
        X509 *leaf, *x;
        char id[PROTO_DEVICE_ID_MAX + 1];
        int r = -EPROTO, v;

        if (!j->out || j->out_len == 0) {
                snprintf(reason, SIGNER_REASON_MAX, "the signing command printed no certificate");
                return -EPROTO;
        }
        b = BIO_new_mem_buf(j->out, (int)j->out_len);
        certs = sk_X509_new_null();
        if (!b || !certs) {
                sk_X509_free(certs);
                return -ENOMEM;
        }
        while ((x = PEM_read_bio_X509(b, NULL, NULL, NULL)))
                if (!sk_X509_push(certs, x)) {
                        X509_free(x);
                        r = -ENOMEM;
                        goto out;
                }
        ERR_clear_error();
        if (sk_X509_num(certs) == 0) {
                snprintf(reason, SIGNER_REASON_MAX, "the signing command printed no PEM certificate");
                goto out;
        }
        leaf = sk_X509_shift(certs);
        ctx = X509_STORE_CTX_new();
        if (!ctx || X509_STORE_CTX_init(ctx, s->trust, leaf, certs) != 1) {
                X509_free(leaf);
                r = -ENOMEM;
                goto out;
        }
        X509_STORE_CTX_set_purpose(ctx, X509_PURPOSE_SSL_CLIENT);
        v = X509_verify_cert(ctx);
        if (v != 1)
                snprintf(reason, SIGNER_REASON_MAX,
                         "the signing command's certificate does not verify against [Cloud] CAFile: %s",
                         X509_verify_cert_error_string(X509_STORE_CTX_get_error(ctx)));
        else if (name_device_id(X509_get_subject_name(leaf), id, reason, "signing command's certificate") < 0)
                ;
        else if (!streq(id, j->id))
                snprintf(reason, SIGNER_REASON_MAX,
                         "the signing command's certificate is for '%s', not for '%s'", id, j->id);
        else if (!X509_get0_pubkey(leaf) || EVP_PKEY_eq(X509_get0_pubkey(leaf), X509_REQ_get0_pubkey(j->req)) != 1)
                snprintf(reason, SIGNER_REASON_MAX,
                         "the signing command's certificate is not for the CSR's public key");
        else if (X509_cmp_time(X509_get0_notAfter(leaf), NULL) <= 0)
                snprintf(reason, SIGNER_REASON_MAX, "the signing command's certificate has expired");
        else
                r = cert_fill(leaf, certs, ret);
        X509_free(leaf);
out:
        X509_STORE_CTX_free(ctx);
        sk_X509_pop_free(certs, X509_free);
        ERR_clear_error();
        return r;
}

static int job_child_cb(sd_event_source *src, const siginfo_t *si, void *userdata) {
        SignerJob *j = userdata;
        char reason[SIGNER_REASON_MAX], line[160];
        SignerCert cert = {};
        size_t k;
        int r;

        /* What it left running in its group goes too (it is not reaped
         * before this callback returns, so the group is still its). */
        (void)kill(-j->pid, SIGKILL);
        j->pid = 0; /* reaped by sd-event */
        (void)job_read(j, true);
        (void)job_read(j, false);
        k = strcspn(j->err, "\r\n");
        snprintf(line, sizeof(line), "%.*s", (int)k, j->err);
        for (char *p = line; *p; p++)
                if ((unsigned char)*p < ' ' || *p == 0x7f)
                        *p = '?';
        if (j->timed_out) {
                snprintf(reason, sizeof(reason), "the signing command did not finish within %us",
                         j->signer->config->sign_timeout_sec);
                job_finish(j, -ETIMEDOUT, NULL, reason);
                return 0;
        }
        if (j->out_too_big) {
                snprintf(reason, sizeof(reason), "the signing command printed more than %u bytes",
                         (unsigned)SIGNER_OUTPUT_MAX);
                job_finish(j, -EPROTO, NULL, reason);
                return 0;
        }
        if (si->si_code != CLD_EXITED || si->si_status != 0) {
                if (si->si_code == CLD_EXITED)
                        snprintf(reason, sizeof(reason), "the signing command exited with status %d%s%s",
                                 si->si_status, line[0] ? ": " : "", line);
                else
                        snprintf(reason, sizeof(reason), "the signing command was killed by signal %d%s%s",
                                 si->si_status, line[0] ? ": " : "", line);
                job_finish(j, -EIO, NULL, reason);
                return 0;
        }
        r = job_check_output(j, &cert, reason);
        if (r == -ENOMEM)
                snprintf(reason, sizeof(reason), "out of memory checking the signed certificate");
        job_finish(j, r, r < 0 ? NULL : &cert, reason);
        signer_cert_done(&cert);
        return 0;
}

static int job_spawn(SignerJob *j) {
        Signer *s = j->signer;
        posix_spawn_file_actions_t fa;
        posix_spawnattr_t attr;
        _cleanup_free_ char **envp = NULL;
        char env_id[32 + PROTO_DEVICE_ID_MAX], env_validity[48], env_why[32];
        int in[2] = { -1, -1 }, out[2] = { -1, -1 }, err[2] = { -1, -1 }, r;
        size_t n_env = 0, len;
        sigset_t none;
        ssize_t w;
        pid_t pid;

        for (char **e = environ; *e; e++)
                n_env++;
        envp = calloc(n_env + 4, sizeof(char *));
        if (!envp)
                return -ENOMEM;
        n_env = 0;
        for (char **e = environ; *e; e++)
                if (!startswith(*e, "TETHER_DEVICE_ID=") && !startswith(*e, "TETHER_VALIDITY_SEC=") &&
                    !startswith(*e, "TETHER_REASON=") && !startswith(*e, "NOTIFY_SOCKET="))
                        envp[n_env++] = *e;
        snprintf(env_id, sizeof(env_id), "TETHER_DEVICE_ID=%s", j->id);
        snprintf(env_validity, sizeof(env_validity), "TETHER_VALIDITY_SEC=%u", s->config->cert_validity_sec);
        snprintf(env_why, sizeof(env_why), "TETHER_REASON=%s", j->why);
        envp[n_env++] = env_id;
        envp[n_env++] = env_validity;
        envp[n_env++] = env_why;

        if (pipe2(in, O_CLOEXEC) < 0 || pipe2(out, O_CLOEXEC | O_NONBLOCK) < 0 ||
            pipe2(err, O_CLOEXEC | O_NONBLOCK) < 0) {
                r = -errno;
                goto fail;
        }
        posix_spawn_file_actions_init(&fa);
        posix_spawn_file_actions_adddup2(&fa, in[0], STDIN_FILENO);
        posix_spawn_file_actions_adddup2(&fa, out[1], STDOUT_FILENO);
        posix_spawn_file_actions_adddup2(&fa, err[1], STDERR_FILENO);
        sigemptyset(&none);
        posix_spawnattr_init(&attr);
        posix_spawnattr_setsigmask(&attr, &none);
        posix_spawnattr_setpgroup(&attr, 0); /* its own group: a timeout kills what it started too */
        posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETPGROUP);
        r = -posix_spawn(&pid, s->argv[0], &fa, &attr, s->argv, envp);
        posix_spawnattr_destroy(&attr);
        posix_spawn_file_actions_destroy(&fa);
        close(in[0]);
        close(out[1]);
        close(err[1]);
        in[0] = out[1] = err[1] = -1;
        if (r < 0)
                goto fail;
        j->pid = pid;
        j->out_fd = out[0];
        j->err_fd = err[0];
        out[0] = err[0] = -1;
        /* The CSR is at most SIGNER_CSR_MAX, less than a pipe holds. */
        len = strlen(j->csr_pem);
        w = write(in[1], j->csr_pem, len);
        close(in[1]);
        in[1] = -1;
        if (w != (ssize_t)len)
                log_debug("Signing command for device '%s' did not take the whole CSR.", j->id);
        r = sd_event_add_child(s->event, &j->child, pid, WEXITED, job_child_cb, j);
        if (r >= 0)
                r = sd_event_add_io(s->event, &j->out_io, j->out_fd, EPOLLIN, job_io_cb, j);
        if (r >= 0)
                r = sd_event_add_io(s->event, &j->err_io, j->err_fd, EPOLLIN, job_io_cb, j);
        if (r >= 0)
                r = sd_event_add_time_relative(s->event, &j->timer, CLOCK_MONOTONIC,
                                               (uint64_t)s->config->sign_timeout_sec * USEC_PER_SEC, 0,
                                               job_timer_cb, j);
        return r;
fail:
        for (int *p = (int[]){ in[0], in[1], out[0], out[1], err[0], err[1] }, i = 0; i < 6; i++)
                if (p[i] >= 0)
                        close(p[i]);
        return r;
}

/* Start queued jobs while fewer than SignConcurrency run. A job that
 * cannot start ends with its error (from the loop: this runs from a
 * defer or a child's exit, never inside signer_start()). */
static void signer_run_queue(Signer *s) {
        while (s->queue_head && s->n_running < s->config->sign_concurrency) {
                SignerJob *j = s->queue_head;
                char reason[SIGNER_REASON_MAX];
                int r;

                job_unlink(j);
                j->running = true;
                j->next = s->running;
                if (s->running)
                        s->running->prev = j;
                s->running = j;
                s->n_running++;
                r = job_spawn(j);
                if (r < 0) {
                        snprintf(reason, sizeof(reason), "the signing command could not be started: %s",
                                 strerror(-r));
                        job_finish(j, -EIO, NULL, reason);
                        return; /* job_finish() ran the queue */
                }
        }
}

static int job_defer_cb(sd_event_source *src, void *userdata) {
        signer_run_queue(userdata);
        return 0;
}

int signer_start(Signer *s, const SignerCsr *csr, const char *why, signer_done_fn cb, void *userdata,
                 SignerJob **ret_job) {
        SignerJob *j;
        int r;

        if (!s->argv)
                return -EOPNOTSUPP;
        if (s->n_queued + s->n_running >= SIGNER_QUEUE_MAX)
                return -EBUSY;
        j = calloc(1, sizeof(*j));
        if (!j)
                return -ENOMEM;
        j->signer = s;
        j->out_fd = j->err_fd = -1;
        snprintf(j->id, sizeof(j->id), "%s", csr->id);
        snprintf(j->pubkey, sizeof(j->pubkey), "%s", csr->pubkey);
        snprintf(j->why, sizeof(j->why), "%s", why);
        j->csr_pem = strdup(csr->pem);
        j->cb = cb;
        j->userdata = userdata;
        j->req = X509_REQ_dup(csr->req);
        if (!j->csr_pem || !j->req) {
                X509_REQ_free(j->req);
                free(j->csr_pem);
                free(j);
                return -ENOMEM;
        }
        /* Started from the loop, so that the callback never runs inside
         * this call. */
        if (!s->defer)
                r = sd_event_add_defer(s->event, &s->defer, job_defer_cb, s);
        else
                r = sd_event_source_set_enabled(s->defer, SD_EVENT_ONESHOT);
        if (r < 0) {
                job_free(j);
                return r;
        }
        j->prev = s->queue_tail;
        if (s->queue_tail)
                s->queue_tail->next = j;
        else
                s->queue_head = j;
        s->queue_tail = j;
        s->n_queued++;
        if (ret_job)
                *ret_job = j;
        return 0;
}

void signer_cancel(SignerJob *j) {
        if (!j)
                return;
        job_unlink(j);
        job_free(j);
}

size_t signer_jobs(const Signer *s) { return s->n_queued + s->n_running; }

bool signer_is_external(const Signer *s) { return s->argv != NULL; }

int64_t signer_validity(const Signer *s) { return s->config->cert_validity_sec; }

/* ---- the object ----------------------------------------------------------- */

Signer *signer_free(Signer *s) {
        if (!s)
                return NULL;
        while (s->queue_head)
                signer_cancel(s->queue_head);
        while (s->running)
                signer_cancel(s->running);
        s->defer = sd_event_source_disable_unref(s->defer);
        X509_free(s->ca);
        EVP_PKEY_free(s->ca_key);
        X509_STORE_free(s->trust);
        if (s->argv)
                for (char **a = s->argv; *a; a++)
                        free(*a);
        free(s->argv);
        free(s);
        return NULL;
}

static int split_command(const char *cmd, char ***ret) {
        _cleanup_free_ char **argv = calloc(SIGNER_ARGS_MAX + 1, sizeof(char *));
        size_t n = 0;

        if (!argv)
                return -ENOMEM;
        for (const char *p = cmd;;) {
                size_t k;

                p += strspn(p, " \t");
                if (!*p)
                        break;
                k = strcspn(p, " \t");
                if (n >= SIGNER_ARGS_MAX) {
                        for (size_t i = 0; i < n; i++)
                                free(argv[i]);
                        return -E2BIG;
                }
                argv[n] = strndup(p, k);
                if (!argv[n++]) {
                        for (size_t i = 0; i < n; i++)
                                free(argv[i]);
                        return -ENOMEM;
                }
                p += k;
        }
        if (n == 0)
                return -EINVAL;
        *ret = TAKE_PTR(argv);
        return 0;
}

/* Is ca one of the certificates of [Cloud] CAFile (the trust store)? */
static bool ca_trusted(X509_STORE *trust, X509 *ca) {
        STACK_OF(X509_OBJECT) *objs = X509_STORE_get0_objects(trust);

        for (int i = 0; i < sk_X509_OBJECT_num(objs); i++) {
                X509 *x = X509_OBJECT_get0_X509(sk_X509_OBJECT_value(objs, i));

                if (x && X509_cmp(x, ca) == 0)
                        return true;
        }
        return false;
}

static int signer_load_ca(Signer *s) {
        const CloudConfig *c = s->config;
        _cleanup_fclose_ FILE *fc = NULL, *fk = NULL;

        fc = fopen(c->enroll_ca_cert, "re");
        if (!fc)
                return log_error_errno(errno, "Cannot open [Enroll] CACertificate= '%s': %m", c->enroll_ca_cert);
        s->ca = PEM_read_X509(fc, NULL, NULL, NULL);
        if (!s->ca)
                return log_error_errno(-EBADMSG, "[Enroll] CACertificate= '%s' holds no PEM certificate.",
                                       c->enroll_ca_cert);
        fk = fopen(c->enroll_ca_key, "re");
        if (!fk)
                return log_error_errno(errno, "Cannot open [Enroll] CAKey= '%s': %m", c->enroll_ca_key);
        s->ca_key = PEM_read_PrivateKey(fk, NULL, NULL, NULL);
        if (!s->ca_key)
                return log_error_errno(-EBADMSG, "[Enroll] CAKey= '%s' holds no unencrypted PEM private key.",
                                       c->enroll_ca_key);
        if (X509_check_ca(s->ca) <= 0)
                return log_error_errno(-EINVAL, "[Enroll] CACertificate= '%s' is not a CA certificate.",
                                       c->enroll_ca_cert);
        if (X509_check_private_key(s->ca, s->ca_key) != 1)
                return log_error_errno(-EKEYREJECTED, "[Enroll] CAKey= '%s' is not the key of CACertificate= '%s'.",
                                       c->enroll_ca_key, c->enroll_ca_cert);
        if (!ca_trusted(s->trust, s->ca))
                return log_error_errno(-EINVAL,
                                       "[Enroll] CACertificate= '%s' is not one of [Cloud] CAFile= '%s''s "
                                       "certificates: devices it signs could not connect.",
                                       c->enroll_ca_cert, c->ca_file);
        if (X509_cmp_time(X509_get0_notAfter(s->ca), NULL) <= 0)
                return log_error_errno(-EKEYEXPIRED, "[Enroll] CACertificate= '%s' has expired.", c->enroll_ca_cert);
        s->ca_in_chain = X509_check_issued(s->ca, s->ca) != X509_V_OK;
        return 0;
}

int signer_new(sd_event *event, const CloudConfig *config, Signer **ret) {
        _cleanup_(signer_freep) Signer *s = NULL;
        int r;

        s = calloc(1, sizeof(*s));
        if (!s)
                return log_error_errno(-ENOMEM, "Out of memory.");
        s->event = event;
        s->config = config;
        s->trust = X509_STORE_new();
        if (!s->trust || X509_STORE_load_file(s->trust, config->ca_file) != 1) {
                ERR_clear_error();
                return log_error_errno(-EBADMSG, "Cannot read [Cloud] CAFile= '%s' for enrollment.", config->ca_file);
        }
        if (config->enroll_ca_cert) {
                r = signer_load_ca(s);
                ERR_clear_error();
                if (r < 0)
                        return r;
        }
        if (config->sign_command) {
                r = split_command(config->sign_command, &s->argv);
                if (r == -E2BIG)
                        return log_error_errno(r, "[Enroll] SignCommand= has more than %u words.", SIGNER_ARGS_MAX);
                if (r < 0)
                        return log_error_errno(r, "[Enroll] SignCommand= '%s' is not usable: %m", config->sign_command);
                if (access(s->argv[0], X_OK) < 0)
                        return log_error_errno(errno, "[Enroll] SignCommand= program '%s' is not executable: %m",
                                               s->argv[0]);
        }
        *ret = TAKE_PTR(s);
        return 0;
}
