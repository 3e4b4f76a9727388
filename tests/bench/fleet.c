/* SPDX-License-Identifier: Apache-2.0 */
/* fleet: many simulated devices in one program, for load on a cloud
 * (docs/design/benchmarks.md). Each device has its own certificate (EC
 * P-256, CN = device id, signed by the CA given on the command line, as
 * tether-pki makes them; cached in a directory so that a rerun does not
 * mint them again) and its own libcoap context, and speaks the wire
 * protocol of docs/protocol.md as agent/conn.c does: coaps+tcp, CSM,
 * answering the cloud's GET /d, POST /f/NAME, GET /v/NAME and Pings, and
 * publishing POST /e/... with seq=, epoch= and time= when asked to. With
 * --mqtt the same devices, with the same certificates, connect to an MQTT
 * broker through libmosquitto instead.
 *
 * libcoap 4.3.1 is not thread-safe, keeps the PKI of a client on its
 * context (so sessions of one context cannot have different
 * certificates) and walks every session of a context on each
 * coap_io_process(): every device gets its own context, and the devices
 * are split over K forked worker processes, each with one epoll loop over
 * its devices' contexts. Workers report counters to the parent over a
 * pipe; the parent prints them.
 *
 * A device is "online" when the cloud has shown that it took the device:
 * its first request (GET /d) arrived; for MQTT, when the CONNACK arrived.
 *
 * "enroll TOKEN" starts devices without a certificate: each one sends
 * POST /enroll (a CSR of a new EC P-256 key, CN = its ID) over an
 * anonymous TLS session, as the agent does, retries after Max-Age on 4.29
 * and 5.03, then connects with the certificate it got. "renew" (and the
 * "renew" command of hold) makes every online device send POST /cert with
 * a new key's CSR over its session at once. Latencies travel to the
 * parent as REPORT_SAMPLES.
 *
 * --ota makes the devices take update jobs (POST /o/JOB), download the
 * artifact over their session (GET /a/SHA256, Block2) and report their
 * states without installing anything ("worker: OTA" below).
 *
 * Output on stdout, one line per result, "word key=value ...";
 * progress on stderr. It measures; it never judges. */
#include <arpa/inet.h>
#include <coap3/coap.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <jansson.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <dlfcn.h>
#include <search.h>
#include <stddef.h>
#ifdef FLEET_MQTT
#include <mosquitto.h>
#include <mqtt_protocol.h>
#endif

#include "manifest.h"
#include "ota-journal.h"
#include "proto.h"
#include "tls.h"
#include "util.h"

#define FLEET_WINDOW 32 /* publishes in flight per device, as the agent */
#define FLEET_KEEPALIVE_SEC 30
#define FLEET_DRAIN_SEC 15 /* after a publish step, wait this long for receipts */
#define FLEET_SCAN_USEC 20000
#define FLEET_REPORT_USEC 100000
#define FLEET_CONNECT_BATCH 64 /* new sessions per loop turn, so I/O goes on */
#define FLEET_EVENT_NAME "fleet/tick"

#define FLEET_PATH_ENROLL "enroll"
#define FLEET_PATH_CERT "cert"
#define FLEET_DEFAULT_MAX_AGE 60 /* RFC 7252 5.10.5, when a 4.29/5.03 has none */
#define FLEET_PATH_ARTIFACT "a"  /* GET /a/SHA256 (docs/protocol.md, Artifacts) */
#define FLEET_OTA_WINDOW 4       /* block requests outstanding per device */
#define FLEET_OTA_REPORTS 16     /* OTA reports queued per device */

typedef enum Mode { MODE_STORM, MODE_HOLD, MODE_PUBLISH, MODE_SUBSCRIBE, MODE_MINT, MODE_ENROLL, MODE_RENEW } Mode;

static struct {
        Mode mode;
        unsigned long devices;
        unsigned long first;
        unsigned long workers;
        const char *ca_cert, *ca_key, *server_ca, *cache;
        char host[256];
        char server_name[256];
        unsigned port;
        bool mqtt;
        int mqtt_version;
        int sub_qos;
        double rate, seconds, timeout;
        double connect_timeout, reconnect_min, reconnect_max;
        const char *enroll_token;
        double renew_delay;
        pid_t cloud_pid;
        bool ota, ota_skip_download, ota_no_bert;
        bool resume; /* --resume: keep each device's TLS session and offer it on reconnect */
        bool parse_per_session; /* --parse-per-session: libcoap parses the PEM files for every session */
        double ota_fail_percent, ota_install_sec;
} arg = {
        .devices = 1000,
        .mqtt_version = 5,
        .seconds = 10,
        .timeout = 600,
        .connect_timeout = 15,
        .reconnect_min = 1,
        .reconnect_max = 60,
        .renew_delay = 1,
        .ota_install_sec = 1,
};

/* Counters of one worker; the parent sums them. */
typedef struct Stats {
        uint64_t attempts;     /* connections started */
        uint64_t online;       /* online now */
        uint64_t ever_online;  /* devices online at least once */
        uint64_t tls_failures; /* handshake refused or broken */
        uint64_t tcp_failures; /* TCP connect failed */
        uint64_t closed_early; /* closed by the peer before online */
        uint64_t timeouts;     /* not online within the connect timeout */
        uint64_t dropped;      /* closed after being online */
        uint64_t calls, reads, describes;
        uint64_t resumed;      /* connections whose TLS handshake resumed a session (--resume) */
        uint64_t pem_parsed;   /* certificate files libssl parsed for a session (not preload()ed) */
        uint64_t pub_sent, pub_acked, pub_errors, pub_skipped;
        uint64_t all_online_at; /* CLOCK_MONOTONIC usec when all of the worker's devices were first online */
        uint64_t last_online_at; /* usec when the last device was first online */
        /* enroll */
        uint64_t enroll_sent;     /* POST /enroll requests (anonymous sessions that got as far) */
        uint64_t enrolled;        /* 2.01 */
        uint64_t enroll_retries;  /* 4.29 or 5.03: tried again after Max-Age */
        uint64_t enroll_gave_up;  /* refused for good (any other answer): never online */
        /* renew */
        uint64_t renew_sent;      /* POST /cert requests, retries included */
        uint64_t renewed;         /* 2.01 with a certificate for the new key */
        uint64_t renew_retries;   /* 4.29 or 5.03 */
        uint64_t renew_failed;    /* any other answer, a bad certificate, or the session lost meanwhile */
        uint64_t renew_pending;   /* renewals under way */
        uint64_t renew_done_at;   /* usec when the worker's last renewal ended */
        uint64_t renew_rounds;    /* renew commands taken */
        uint64_t bad_answers;     /* neither 2.01 nor 4.xx/5.xx, or a 2.01 without a certificate for the CSR's key */
        /* answers of class 4 and 5 to POST /enroll and /cert, by (class - 4) * 32 + detail */
        uint32_t enroll_codes[64], renew_codes[64];
        /* --ota */
        uint64_t ota_jobs;            /* jobs accepted */
        uint64_t ota_downloads;       /* artifacts downloaded and checked */
        uint64_t ota_committed, ota_rolled_back, ota_failed;
        uint64_t ota_bytes, ota_blocks; /* artifact bytes hashed, block requests sent */
        uint64_t ota_bert;            /* downloads that used BERT */
        uint64_t ota_restarts;        /* downloads started again (another ETag) */
        uint64_t ota_block_retries;   /* 5.03 to a block request: the window asked again after Max-Age */
        uint64_t ota_reports, ota_report_retries, ota_reports_refused, ota_reports_dropped;
} Stats;

#define FLEET_SAMPLES 240
enum { SAMPLES_ENROLL, SAMPLES_RENEW, SAMPLES_OTA_DOWNLOAD, SAMPLES_OTA_JOB, _SAMPLES_MAX };
typedef struct Samples {
        uint32_t which; /* SAMPLES_* */
        uint32_t n;
        uint32_t usec[FLEET_SAMPLES];
} Samples;

enum { REPORT_READY, REPORT_PROGRESS, REPORT_PUBLISHED, REPORT_FINAL, REPORT_SAMPLES };
typedef struct Report {
        uint32_t worker;
        uint32_t kind;
        union {
                Stats st;          /* every kind but REPORT_SAMPLES */
                Samples samples;   /* REPORT_SAMPLES */
        };
} Report;
/* One write() each, so that reports of several workers never interleave. */
_Static_assert(sizeof(Report) <= PIPE_BUF, "a report must fit in one atomic pipe write");

enum { FLEET_CMD_GO, FLEET_CMD_PUBLISH, FLEET_CMD_QUIT, FLEET_CMD_RENEW };
typedef struct Command {
        uint32_t op;
        double rate; /* events/s of this worker */
        double seconds;
        uint64_t start; /* usec, CLOCK_MONOTONIC */
} Command;

typedef enum DevState { DEV_IDLE, DEV_CONNECTING, DEV_ONLINE, DEV_BACKOFF } DevState;

/* --ota: one block request of the download window. */
typedef struct OtaSlot {
        bool used, have, more;
        uint64_t offset;
        uint8_t token[8];
        size_t token_len;
        uint8_t *data; /* the answer's payload, until it continues the prefix */
        size_t len;
} OtaSlot;

typedef enum OtaPhase { OTA_NONE, OTA_DOWNLOADING, OTA_INSTALLING, OTA_DONE } OtaPhase;

/* --ota: the device's update job (one at a time, as the agent). */
typedef struct Ota {
        OtaPhase phase;
        char job[17];
        char sha256[65], package[129], version[129];
        uint64_t size;
        uint64_t seq;   /* of the last state report */
        bool fail;      /* this job ends rolled-back */
        EVP_MD_CTX *md; /* SHA-256 of [0, done) */
        uint64_t done;  /* bytes hashed: the prefix */
        uint64_t next;  /* offset of the next block to ask for */
        uint32_t chunk; /* bytes per block answer expected */
        unsigned szx;   /* below 7: the block size asked for */
        bool bert, bert_known;
        unsigned restarts;
        OtaSlot slot[FLEET_OTA_WINDOW];
        uint64_t start, dl_start, last_progress, install_due; /* usec */
        uint64_t block_retry_at; /* usec: after a 5.03, no block requests before */
} Ota;

/* --ota: reports to send, in order, one in flight; each names its job. */
typedef struct OtaReports {
        struct {
                char job[17];
                char *text;
        } q[FLEET_OTA_REPORTS];
        unsigned head, n;
        bool pending;
        uint8_t token[8];
        size_t token_len;
        uint64_t retry_at; /* usec: after a 4.29 (Max-Age) or 5.xx */
} OtaReports;
/* CLOSE_ENROLLED: the anonymous session got its certificate, connect with it
 * now; CLOSE_RETRY: enrollment answered 4.29/5.03, try again after Max-Age
 * (deadline); CLOSE_REFUSED: enrollment refused for good. None of the three
 * is a failure of the connection. */
typedef enum CloseKind {
        CLOSE_NONE,
        CLOSE_TLS,
        CLOSE_TCP,
        CLOSE_PEER,
        CLOSE_TIMEOUT,
        CLOSE_ENROLLED,
        CLOSE_RETRY,
        CLOSE_REFUSED
} CloseKind;

typedef struct Device {
        char id[PROTO_DEVICE_ID_MAX + 1];
        char *cert, *key;
        TlsResume *resume; /* --resume: the last TLS session, kept across contexts made again */
        DevState state;
        bool ever_online;
        CloseKind closing;
        struct Device *next_close;
        uint64_t deadline; /* usec: connect timeout or end of backoff */
        unsigned failures;
        unsigned in_flight;
        uint64_t seq, epoch;
        /* CoAP */
        coap_context_t *ctx;
        coap_session_t *session;
        coap_dtls_pki_t pki;
        TlsFiles files;
        TlsHostCheck check;
        /* enroll and renew */
        EVP_PKEY *new_key; /* the key of the certificate asked for */
        char *csr;         /* its CSR, PEM */
        bool anonymous;    /* the session is an anonymous one, for POST /enroll */
        bool enroll_due;   /* the anonymous session is up: send POST /enroll */
        struct Device *next_enroll;
        bool enrolled;     /* has the certificate in cert/key */
        bool renewing;     /* a renewal is under way */
        bool csr_ready;    /* renew_all() made its CSR */
        bool req_pending;  /* the request with req_token is unanswered */
        uint8_t req_token[8];
        size_t req_token_len;
        uint64_t op_start; /* usec: start of this enrollment or renewal */
        uint64_t retry_at; /* usec: renewal, send again (Max-Age) */
        /* --ota */
        Ota ota;
        OtaReports reports;
        bool ota_due;
        struct Device *next_ota;
#ifdef FLEET_MQTT
        struct mosquitto *mq;
        int fd;
        bool mq_started;
#endif
} Device;

/* One worker's world. */
static struct {
        unsigned id;
        Device *dev;
        size_t n;
        int ep;
        int cmd_fd, report_fd;
        Stats st;
        Device *closes;
        Device *enrolls; /* anonymous sessions that are up, POST /enroll to send */
        Device *ota_due; /* --ota: devices with something to send */
        size_t next_connect; /* devices [0, next_connect) have been started */
        bool started;
        /* the publish step in progress */
        bool publishing, draining;
        double pub_rate, pub_seconds;
        uint64_t pub_start, pub_due_sent, pub_drain_until;
        size_t cursor;
        /* latencies (usec) not yet sent to the parent, by SAMPLES_* */
        uint32_t *pending[_SAMPLES_MAX];
        size_t pending_n[_SAMPLES_MAX], pending_cap[_SAMPLES_MAX];
} w;

static volatile sig_atomic_t quit_requested;

static uint64_t now_us(void) {
        return now_usec();
}

/* libcoap 4.3.1 never sets TCP_NODELAY and hides its client sockets
 * (lib/tls.c finds them by scanning /proc/self/fd, which is O(sessions)):
 * set it on every socket this program connects, as tetherd does on its
 * one session. Interposes libc's connect() for libcoap and libmosquitto. */
__attribute__((visibility("default"))) int connect(int fd, const struct sockaddr *sa, socklen_t len) {
        static int (*real_connect)(int, const struct sockaddr *, socklen_t);
        int one = 1;

        if (!real_connect)
                real_connect = (int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "connect");
        if (sa && (sa->sa_family == AF_INET || sa->sa_family == AF_INET6))
                (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        return real_connect(fd, sa, len);
}

/* --- certificates ------------------------------------------------------- */

static int fail_ssl(const char *what) {
        fprintf(stderr, "fleet: %s\n", what);
        ERR_print_errors_fp(stderr);
        return -EIO;
}

static int ext_add(X509 *cert, X509V3_CTX *ctx, int nid, const char *value) {
        X509_EXTENSION *ext = X509V3_EXT_nconf_nid(NULL, ctx, nid, value);
        int ok = ext && X509_add_ext(cert, ext, -1);

        X509_EXTENSION_free(ext);
        return ok ? 0 : fail_ssl("cannot add a certificate extension");
}

static int write_pem(const char *path, X509 *cert, EVP_PKEY *key) {
        _cleanup_free_ char *tmp = NULL;
        FILE *f;
        int fd, ok;

        if (asprintf(&tmp, "%s.tmp", path) < 0)
                return -ENOMEM;
        fd = open(tmp, O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, key ? 0600 : 0644);
        if (fd < 0)
                return -errno;
        f = fdopen(fd, "w");
        if (!f) {
                close(fd);
                return -errno;
        }
        ok = key ? PEM_write_PrivateKey(f, key, NULL, NULL, 0, NULL, NULL) : PEM_write_X509(f, cert);
        if (fclose(f) != 0 || !ok)
                return -EIO;
        return rename(tmp, path) < 0 ? -errno : 0;
}

/* A device certificate like tether-pki's: CN = id, clientAuth, signed by ca. */
static int mint(const char *dir, const char *id, X509 *ca, EVP_PKEY *ca_key) {
        _cleanup_free_ char *crt = NULL, *keyp = NULL;
        EVP_PKEY *key = EVP_EC_gen("P-256");
        X509 *cert = X509_new();
        unsigned char serial[16];
        BIGNUM *bn = NULL;
        X509V3_CTX ctx;
        int r = -EIO;

        if (!key || !cert || RAND_bytes(serial, sizeof(serial)) != 1)
                goto out;
        serial[0] &= 0x7f;
        serial[0] |= 0x01;
        bn = BN_bin2bn(serial, sizeof(serial), NULL);
        if (!bn || !BN_to_ASN1_INTEGER(bn, X509_get_serialNumber(cert)) || !X509_set_version(cert, X509_VERSION_3) ||
            !X509_NAME_add_entry_by_NID(X509_get_subject_name(cert), NID_commonName, MBSTRING_UTF8,
                                        (const unsigned char *)id, -1, -1, 0) ||
            !X509_set_issuer_name(cert, X509_get_subject_name(ca)) ||
            !X509_gmtime_adj(X509_getm_notBefore(cert), -300) ||
            !X509_set1_notAfter(cert, X509_get0_notAfter(ca)) || !X509_set_pubkey(cert, key))
                goto out;
        X509V3_set_ctx(&ctx, ca, cert, NULL, NULL, 0);
        if (ext_add(cert, &ctx, NID_basic_constraints, "critical,CA:FALSE") < 0 ||
            ext_add(cert, &ctx, NID_key_usage, "critical,digitalSignature") < 0 ||
            ext_add(cert, &ctx, NID_ext_key_usage, "clientAuth") < 0 ||
            ext_add(cert, &ctx, NID_subject_key_identifier, "hash") < 0 ||
            ext_add(cert, &ctx, NID_authority_key_identifier, "keyid:always") < 0)
                goto out;
        if (X509_sign(cert, ca_key, EVP_sha256()) <= 0)
                goto out;
        if (asprintf(&crt, "%s/%s.crt", dir, id) < 0 || asprintf(&keyp, "%s/%s.key", dir, id) < 0) {
                r = -ENOMEM;
                goto out;
        }
        r = write_pem(keyp, NULL, key);
        if (r >= 0)
                r = write_pem(crt, cert, NULL);
out:
        if (r == -EIO)
                fail_ssl("cannot make a device certificate");
        BN_free(bn);
        X509_free(cert);
        EVP_PKEY_free(key);
        return r;
}

static X509 *read_cert(const char *path) {
        FILE *f = fopen(path, "re");
        X509 *x = f ? PEM_read_X509(f, NULL, NULL, NULL) : NULL;

        if (f)
                fclose(f);
        return x;
}

/* A new EC P-256 key for d and a CSR for it (CN = d's ID, PEM), as the
 * agent makes them to enroll and to renew. */
static int make_csr(Device *d) {
        EVP_PKEY *key = EVP_EC_gen("P-256");
        X509_REQ *req = X509_REQ_new();
        BIO *bio = BIO_new(BIO_s_mem());
        char *pem = NULL;
        long len;
        int r = -EIO;

        if (!key || !req || !bio || !X509_REQ_set_version(req, X509_REQ_VERSION_1) ||
            !X509_NAME_add_entry_by_NID(X509_REQ_get_subject_name(req), NID_commonName, MBSTRING_UTF8,
                                        (const unsigned char *)d->id, -1, -1, 0) ||
            !X509_REQ_set_pubkey(req, key) || X509_REQ_sign(req, key, EVP_sha256()) <= 0 ||
            !PEM_write_bio_X509_REQ(bio, req) || (len = BIO_get_mem_data(bio, &pem)) <= 0) {
                fail_ssl("cannot make a CSR");
                goto out;
        }
        free(d->csr);
        d->csr = strndup(pem, (size_t)len);
        if (!d->csr) {
                r = -ENOMEM;
                goto out;
        }
        EVP_PKEY_free(d->new_key);
        d->new_key = TAKE_PTR(key);
        r = 0;
out:
        BIO_free(bio);
        X509_REQ_free(req);
        EVP_PKEY_free(key);
        return r;
}

/* Whether the first certificate of pem is for key. */
static bool cert_matches(const char *pem, EVP_PKEY *key) {
        BIO *bio = BIO_new_mem_buf(pem, -1);
        X509 *x = bio ? PEM_read_bio_X509(bio, NULL, NULL, NULL) : NULL;
        bool ok = x && key && EVP_PKEY_eq(X509_get0_pubkey(x), key) == 1;

        X509_free(x);
        BIO_free(bio);
        return ok;
}

static void preload_forget(Device *d);

/* Write an enrolled device's key, then its certificate (with any chain, as
 * the cloud sent it), each through a temporary file and rename(). */
static int store_enrolled(Device *d, const char *pem) {
        _cleanup_free_ char *tmp = NULL;
        size_t len = strlen(pem);
        int fd, r;

        preload_forget(d);
        r = write_pem(d->key, NULL, d->new_key);
        if (r < 0)
                return r;
        if (asprintf(&tmp, "%s.tmp", d->cert) < 0)
                return -ENOMEM;
        fd = open(tmp, O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0644);
        if (fd < 0)
                return -errno;
        if (write(fd, pem, len) != (ssize_t)len) {
                close(fd);
                return -EIO;
        }
        if (close(fd) < 0)
                return -errno;
        return rename(tmp, d->cert) < 0 ? -errno : 0;
}

/* Devices that enroll: new random IDs (12 bytes, hex, like mint), their
 * key and certificate to be written to DIR once enrolled. */
static int enroll_devices(unsigned long n, const char *dir, Device **ret) {
        Device *dev = calloc(n, sizeof(Device));

        if (!dev)
                return -ENOMEM;
        for (unsigned long i = 0; i < n; i++) {
                unsigned char b[12];
                char *p = dev[i].id;

                if (RAND_bytes(b, sizeof(b)) != 1)
                        return fail_ssl("no random bytes");
                for (size_t k = 0; k < sizeof(b); k++)
                        p += sprintf(p, "%02x", b[k]);
                if (asprintf(&dev[i].cert, "%s/%s.crt", dir, dev[i].id) < 0 ||
                    asprintf(&dev[i].key, "%s/%s.key", dir, dev[i].id) < 0)
                        return -ENOMEM; /* leaks: the program exits */
        }
        *ret = dev;
        return 0;
}

/* The ids of devices [0, n) of the cache, minting what is missing. The
 * cache belongs to one CA: its fingerprint is kept in DIR/ca.sha256. */
static int load_devices(unsigned long n, Device **ret) {
        _cleanup_free_ char *index = NULL, *fpath = NULL;
        unsigned char md[EVP_MAX_MD_SIZE];
        char hex[2 * EVP_MAX_MD_SIZE + 2] = "", line[128];
        unsigned md_len = 0;
        X509 *ca = read_cert(arg.ca_cert);
        EVP_PKEY *ca_key = NULL;
        Device *dev;
        unsigned long have = 0, minted = 0;
        FILE *f;
        int r = 0;

        if (!ca)
                return fprintf(stderr, "fleet: cannot read the CA certificate '%s'\n", arg.ca_cert), -EINVAL;
        if (X509_digest(ca, EVP_sha256(), md, &md_len) != 1)
                return fail_ssl("cannot hash the CA certificate");
        for (unsigned i = 0; i < md_len; i++)
                sprintf(hex + 2 * i, "%02x", md[i]);
        strcat(hex, "\n");
        if (mkdir(arg.cache, 0700) < 0 && errno != EEXIST)
                return fprintf(stderr, "fleet: cannot create '%s': %m\n", arg.cache), -errno;
        if (asprintf(&fpath, "%s/ca.sha256", arg.cache) < 0 || asprintf(&index, "%s/index", arg.cache) < 0)
                return -ENOMEM;
        f = fopen(fpath, "re");
        if (f) {
                bool same = fgets(line, sizeof(line), f) && streq(line, hex);
                fclose(f);
                if (!same) {
                        fprintf(stderr, "fleet: the certificate cache '%s' was made for another CA; remove it or give "
                                        "another --cache\n", arg.cache);
                        X509_free(ca);
                        return -EEXIST;
                }
        } else {
                f = fopen(fpath, "we");
                if (!f || fputs(hex, f) < 0 || fclose(f) != 0)
                        return fprintf(stderr, "fleet: cannot write '%s'\n", fpath), -EIO;
        }

        dev = calloc(n, sizeof(Device));
        if (!dev)
                return -ENOMEM;
        f = fopen(index, "re");
        while (f && have < n && fgets(line, sizeof(line), f)) {
                line[strcspn(line, "\n")] = 0;
                if (proto_name_check(line, strlen(line), PROTO_NAME_DEVICE) < 0)
                        continue;
                strcpy(dev[have++].id, line);
        }
        if (f)
                fclose(f);
        if (have < n) {
                FILE *in = fopen(arg.ca_key, "re");
                ca_key = in ? PEM_read_PrivateKey(in, NULL, NULL, NULL) : NULL;
                if (in)
                        fclose(in);
                if (!ca_key) {
                        fprintf(stderr, "fleet: cannot read the CA key '%s' (needed to mint %lu certificates)\n",
                                arg.ca_key ? arg.ca_key : "(not given)", n - have);
                        r = -EINVAL;
                        goto out;
                }
                f = fopen(index, "ae");
                if (!f) {
                        r = -errno;
                        fprintf(stderr, "fleet: cannot write '%s': %m\n", index);
                        goto out;
                }
                for (; have < n; have++, minted++) {
                        unsigned char b[12];
                        char *p = dev[have].id;

                        if (RAND_bytes(b, sizeof(b)) != 1) {
                                r = -EIO;
                                break;
                        }
                        for (size_t i = 0; i < sizeof(b); i++)
                                p += sprintf(p, "%02x", b[i]);
                        r = mint(arg.cache, dev[have].id, ca, ca_key);
                        if (r < 0)
                                break;
                        fprintf(f, "%s\n", dev[have].id);
                        if (minted % 1000 == 999)
                                fprintf(stderr, "fleet: minted %lu certificates\n", minted + 1);
                }
                if (fclose(f) != 0 && r >= 0)
                        r = -EIO;
                if (r < 0)
                        goto out;
        }
        for (unsigned long i = 0; i < n; i++)
                if (asprintf(&dev[i].cert, "%s/%s.crt", arg.cache, dev[i].id) < 0 ||
                    asprintf(&dev[i].key, "%s/%s.key", arg.cache, dev[i].id) < 0) {
                        r = -ENOMEM;
                        goto out;
                }
        if (minted)
                fprintf(stderr, "fleet: minted %lu device certificates in '%s'\n", minted, arg.cache);
        *ret = TAKE_PTR(dev);
out:
        free(dev); /* leaks the paths on failure: the program exits */
        X509_free(ca);
        EVP_PKEY_free(ca_key);
        return r;
}

/* --- worker: common ------------------------------------------------------ */

static void send_report(const Report *rep) {
        if (write(w.report_fd, rep, sizeof(*rep)) != sizeof(*rep))
                _exit(3); /* the parent is gone */
}

/* The latencies gathered so far, before any counters that include them. */
static void flush_samples(void) {
        for (uint32_t which = 0; which < ELEMENTSOF(w.pending); which++) {
                for (size_t at = 0; at < w.pending_n[which];) {
                        Report rep = { .worker = w.id, .kind = REPORT_SAMPLES, .samples.which = which };
                        size_t k = w.pending_n[which] - at;

                        if (k > FLEET_SAMPLES)
                                k = FLEET_SAMPLES;
                        rep.samples.n = (uint32_t)k;
                        memcpy(rep.samples.usec, w.pending[which] + at, k * sizeof(uint32_t));
                        send_report(&rep);
                        at += k;
                }
                w.pending_n[which] = 0;
        }
}

static void add_sample(uint32_t which, uint64_t usec) {
        if (w.pending_n[which] == w.pending_cap[which]) {
                size_t cap = w.pending_cap[which] ? 2 * w.pending_cap[which] : 256;
                uint32_t *p = realloc(w.pending[which], cap * sizeof(uint32_t));

                if (!p)
                        return; /* a lost sample; the counters still count it */
                w.pending[which] = p;
                w.pending_cap[which] = cap;
        }
        w.pending[which][w.pending_n[which]++] = usec > UINT32_MAX ? UINT32_MAX : (uint32_t)usec;
}

static void report(uint32_t kind) {
        Report rep = { .worker = w.id, .kind = kind, .st = w.st };

        flush_samples();
        send_report(&rep);
}

static uint64_t backoff_us(Device *d) {
        double base = arg.reconnect_min, max = arg.reconnect_max;
        unsigned n = d->failures < 30 ? d->failures : 30;
        double s = base * (double)(1u << n);

        if (s > max)
                s = max;
        /* Equal jitter, as the agent (docs/protocol.md, Reconnect). */
        s = s / 2 + s / 2 * ((double)random() / RAND_MAX);
        return (uint64_t)(s * 1e6);
}

static void mark_close(Device *d, CloseKind kind) {
        if (d->closing != CLOSE_NONE || (d->state != DEV_CONNECTING && d->state != DEV_ONLINE))
                return;
        d->closing = kind;
        d->next_close = w.closes;
        w.closes = d;
}

static void ota_due(Device *d);
static void ota_session_lost(Device *d);

static void went_online(Device *d) {
        if (d->state != DEV_CONNECTING)
                return;
        if (arg.ota && (d->ota.phase != OTA_NONE || d->reports.n > 0))
                ota_due(d); /* go on with the job */
        d->state = DEV_ONLINE;
        d->failures = 0;
        w.st.online++;
        if (d->session && tls_session_resumed(d->session))
                w.st.resumed++;
        if (!d->ever_online) {
                d->ever_online = true;
                w.st.ever_online++;
                w.st.last_online_at = now_us();
                if (w.st.ever_online == w.n) {
                        w.st.all_online_at = now_us();
                        report(REPORT_PROGRESS);
                }
        }
}

static void renew_end(Device *d) {
        if (!d->renewing)
                return;
        d->renewing = false;
        if (--w.st.renew_pending == 0) {
                w.st.renew_done_at = now_us();
                report(REPORT_PROGRESS);
        }
}

static void count_close(Device *d) {
        d->req_pending = false;
        d->anonymous = false;
        if (arg.ota)
                ota_session_lost(d);
        if (d->closing == CLOSE_ENROLLED || d->closing == CLOSE_RETRY || d->closing == CLOSE_REFUSED) {
                /* The deadline (when to connect again) was set with the mark. */
                d->state = d->closing == CLOSE_REFUSED ? DEV_IDLE : DEV_BACKOFF;
                d->closing = CLOSE_NONE;
                return;
        }
        if (d->renewing) {
                w.st.renew_failed++; /* the session was lost meanwhile */
                renew_end(d);
        }
        if (d->state == DEV_ONLINE) {
                w.st.dropped++;
                w.st.online--;
        } else if (d->closing == CLOSE_TLS)
                w.st.tls_failures++;
        else if (d->closing == CLOSE_TCP)
                w.st.tcp_failures++;
        else if (d->closing == CLOSE_TIMEOUT)
                w.st.timeouts++;
        else
                w.st.closed_early++;
        d->closing = CLOSE_NONE;
        d->in_flight = 0;
        d->state = DEV_BACKOFF;
        d->deadline = now_us() + backoff_us(d);
        d->failures++;
}

/* --- worker: CoAP -------------------------------------------------------- */

static const char DESCRIBE[] = "{\"agent\":\"fleet\",\"version\":\"1\","
                               "\"plugins\":[{\"name\":\"fleet\",\"version\":\"1\"}],"
                               "\"functions\":[\"echo\",\"add\"],\"variables\":{\"counter\":\"int32\"},"
                               "\"events\":[\"" FLEET_EVENT_NAME "\"]}";

static void ota_request(Device *d, const char *job, const uint8_t *data, size_t len, coap_pdu_t *resp);
static bool ota_response(Device *d, const coap_pdu_t *rcvd);

static void respond(coap_pdu_t *resp, coap_pdu_code_t code, unsigned cf, const char *data, size_t len) {
        uint8_t buf[2];

        coap_pdu_set_code(resp, code);
        coap_add_option(resp, COAP_OPTION_CONTENT_FORMAT, coap_encode_var_safe(buf, sizeof(buf), cf), buf);
        coap_add_data(resp, len, (const uint8_t *)data);
}

/* Functions: echo ARG returns its length, add "A,B" returns A+B. */
static void handle_call(const char *name, const uint8_t *data, size_t len, coap_pdu_t *resp) {
        char arg_buf[64] = "", result[16];
        long a = 0, b = 0;
        int32_t v;

        if (streq(name, "echo"))
                v = (int32_t)len;
        else if (streq(name, "add")) {
                snprintf(arg_buf, sizeof(arg_buf), "%.*s", (int)(len < 63 ? len : 63), (const char *)data);
                if (sscanf(arg_buf, "%ld,%ld", &a, &b) != 2)
                        return respond(resp, COAP_RESPONSE_CODE_BAD_REQUEST, PROTO_CF_TEXT, "want A,B", 8);
                v = (int32_t)(a + b);
        } else
                return respond(resp, COAP_RESPONSE_CODE_NOT_FOUND, PROTO_CF_TEXT, "unknown function", 16);
        w.st.calls++;
        snprintf(result, sizeof(result), "%" PRId32, v);
        respond(resp, COAP_RESPONSE_CODE_CHANGED, PROTO_CF_TEXT, result, strlen(result));
}

static void on_request(coap_resource_t *resource, coap_session_t *session, const coap_pdu_t *req,
                       const coap_string_t *query, coap_pdu_t *resp) {
        Device *d = coap_session_get_app_data(session);
        coap_string_t *path = coap_get_uri_path(req);
        coap_pdu_code_t method = coap_pdu_get_code(req);
        const uint8_t *data = NULL;
        size_t len = 0;
        char p[160];

        if (!path)
                return respond(resp, COAP_RESPONSE_CODE_BAD_REQUEST, PROTO_CF_TEXT, "no path", 7);
        snprintf(p, sizeof(p), "%.*s", (int)path->length, (const char *)path->s);
        coap_delete_string(path);
        (void)coap_get_data(req, &len, &data);
        if (streq(p, PROTO_PATH_DESCRIBE) && method == COAP_REQUEST_CODE_GET) {
                /* The cloud fetches GET /d on every connect: it took us. */
                w.st.describes++;
                if (d && session == d->session)
                        went_online(d);
                return respond(resp, COAP_RESPONSE_CODE_CONTENT, PROTO_CF_JSON, DESCRIBE, sizeof(DESCRIBE) - 1);
        }
        if (startswith(p, PROTO_PATH_FUNCTION "/") && method == COAP_REQUEST_CODE_POST)
                return handle_call(p + 2, data, len, resp);
        if (arg.ota && d && session == d->session && startswith(p, PROTO_PATH_OTA "/") &&
            method == COAP_REQUEST_CODE_POST) {
                ota_request(d, p + 2, data, len, resp);
                ota_due(d);
                return;
        }
        if (streq(p, PROTO_PATH_VARIABLE "/counter") && method == COAP_REQUEST_CODE_GET) {
                char v[24];
                w.st.reads++;
                snprintf(v, sizeof(v), "%" PRIu64, w.st.calls % INT32_MAX);
                return respond(resp, COAP_RESPONSE_CODE_CONTENT, PROTO_CF_JSON, v, strlen(v));
        }
        respond(resp, COAP_RESPONSE_CODE_NOT_FOUND, PROTO_CF_TEXT, "no such resource", 16);
}

/* POST JSON to path on d's session: POST /enroll or POST /cert, the
 * request whose answer on_answer() takes. */
static bool coap_post_json(Device *d, const char *path, json_t *body) {
        _cleanup_free_ char *text = json_dumps(body, JSON_COMPACT);
        uint8_t buf[4];
        coap_pdu_t *pdu;

        if (!text || !d->session)
                return false;
        pdu = coap_new_pdu(COAP_MESSAGE_CON, COAP_REQUEST_CODE_POST, d->session);
        if (!pdu)
                return false;
        coap_session_new_token(d->session, &d->req_token_len, d->req_token);
        if (!coap_add_token(pdu, d->req_token_len, d->req_token) ||
            !coap_add_option(pdu, COAP_OPTION_URI_PATH, strlen(path), (const uint8_t *)path) ||
            !coap_add_option(pdu, COAP_OPTION_CONTENT_FORMAT, coap_encode_var_safe(buf, sizeof(buf), PROTO_CF_JSON),
                             buf) ||
            !coap_add_data(pdu, strlen(text), (const uint8_t *)text)) {
                coap_delete_pdu(pdu);
                return false;
        }
        /* Before coap_send(): the answer may be read within it. */
        d->req_pending = true;
        if (coap_send(d->session, pdu) == COAP_INVALID_MID) {
                d->req_pending = false;
                return false;
        }
        return true;
}

static bool send_enroll(Device *d) {
        json_t *body = json_pack("{s:s, s:s}", "token", arg.enroll_token, "csr", d->csr);
        bool ok = body && coap_post_json(d, FLEET_PATH_ENROLL, body);

        json_decref(body);
        if (ok)
                w.st.enroll_sent++;
        return ok;
}

static bool send_renew(Device *d) {
        json_t *body = json_pack("{s:s}", "csr", d->csr);
        bool ok = body && coap_post_json(d, FLEET_PATH_CERT, body);

        json_decref(body);
        if (ok)
                w.st.renew_sent++;
        return ok;
}

static unsigned max_age(const coap_pdu_t *pdu) {
        coap_opt_iterator_t it;
        coap_opt_t *opt = coap_check_option(pdu, COAP_OPTION_MAXAGE, &it);

        return opt ? coap_decode_var_bytes(coap_opt_value(opt), coap_opt_length(opt)) : FLEET_DEFAULT_MAX_AGE;
}

/* The cloud's answer to POST /enroll (on the anonymous session) or POST
 * /cert (on the device's own). */
static void on_answer(Device *d, const coap_pdu_t *rcvd) {
        coap_pdu_code_t code = coap_pdu_get_code(rcvd);
        unsigned cls = COAP_RESPONSE_CLASS(code), detail = (unsigned)code & 0x1f;
        bool enroll = d->anonymous, ok = false, retry = false;
        uint64_t now = now_us();

        if (code == COAP_RESPONSE_CODE_CREATED) {
                const uint8_t *data = NULL;
                size_t len = 0;
                json_t *j = coap_get_data(rcvd, &len, &data) ? json_loadb((const char *)data, len, 0, NULL) : NULL;
                const char *pem = json_string_value(json_object_get(j, "certificate"));

                ok = pem && cert_matches(pem, d->new_key) && (!enroll || store_enrolled(d, pem) >= 0);
                json_decref(j);
                if (!ok)
                        w.st.bad_answers++;
        } else if (cls == 4 || cls == 5) {
                uint32_t *codes = enroll ? w.st.enroll_codes : w.st.renew_codes;

                if (codes[(cls - 4) * 32 + detail]++ == 0) {
                        /* The cloud's reason, once per code and worker, on stderr. */
                        const uint8_t *data = NULL;
                        size_t len = 0;

                        (void)coap_get_data(rcvd, &len, &data);
                        fprintf(stderr, "fleet: POST /%s answered %u.%02u: %.*s\n",
                                enroll ? FLEET_PATH_ENROLL : FLEET_PATH_CERT, cls, detail,
                                (int)(len < 200 ? len : 200), data ? (const char *)data : "");
                }
                retry = code == COAP_RESPONSE_CODE_TOO_MANY_REQUESTS || code == COAP_RESPONSE_CODE_SERVICE_UNAVAILABLE;
        } else
                w.st.bad_answers++;

        if (enroll) {
                if (ok) {
                        w.st.enrolled++;
                        add_sample(SAMPLES_ENROLL, now - d->op_start);
                        d->enrolled = true;
                        d->deadline = now;
                        mark_close(d, CLOSE_ENROLLED);
                } else if (retry) {
                        w.st.enroll_retries++;
                        d->deadline = now + (uint64_t)max_age(rcvd) * 1000000;
                        mark_close(d, CLOSE_RETRY);
                } else {
                        w.st.enroll_gave_up++;
                        mark_close(d, CLOSE_REFUSED);
                }
                return;
        }
        if (!d->renewing)
                return;
        if (ok) {
                w.st.renewed++;
                add_sample(SAMPLES_RENEW, now - d->op_start);
                renew_end(d);
        } else if (retry) {
                /* The same request again after Max-Age, on the same session. */
                w.st.renew_retries++;
                d->retry_at = now + (uint64_t)max_age(rcvd) * 1000000;
        } else {
                w.st.renew_failed++;
                renew_end(d);
        }
}

/* Publish receipts, and the answers to POST /enroll and /cert. */
static coap_response_t on_response(coap_session_t *session, const coap_pdu_t *sent, const coap_pdu_t *rcvd,
                                   const coap_mid_t mid) {
        Device *d = coap_session_get_app_data(session);
        coap_bin_const_t token = coap_pdu_get_token(rcvd);

        if (!d || session != d->session)
                return COAP_RESPONSE_OK;
        if (arg.ota && ota_response(d, rcvd)) {
                ota_due(d);
                return COAP_RESPONSE_OK;
        }
        /* A block the download dropped (ota_drain()): no publish receipt. */
        if (arg.ota && coap_pdu_get_code(rcvd) == COAP_RESPONSE_CODE_CONTENT)
                return COAP_RESPONSE_OK;
        if (d->req_pending && token.length == d->req_token_len && memcmp(token.s, d->req_token, token.length) == 0) {
                d->req_pending = false;
                on_answer(d, rcvd);
                return COAP_RESPONSE_OK;
        }
        if (d->in_flight == 0)
                return COAP_RESPONSE_OK;
        d->in_flight--;
        if (COAP_RESPONSE_CLASS(coap_pdu_get_code(rcvd)) == 2)
                w.st.pub_acked++;
        else
                w.st.pub_errors++;
        return COAP_RESPONSE_OK;
}

static int on_coap_event(coap_session_t *session, const coap_event_t event) {
        Device *d = coap_session_get_app_data(session);

        if (!d || session != d->session)
                return 0;
        switch (event) {
        case COAP_EVENT_SESSION_CONNECTED:
                /* Not before: libcoap 4.3.1's coap_send() on a TCP session
                 * whose CSM has not come blocks until it comes. Not from
                 * here either: see process_enrolls(). */
                if (d->anonymous && !d->enroll_due && !d->req_pending) {
                        d->enroll_due = true;
                        d->next_enroll = w.enrolls;
                        w.enrolls = d;
                }
                break;
        case COAP_EVENT_DTLS_ERROR:
                mark_close(d, CLOSE_TLS);
                break;
        case COAP_EVENT_TCP_FAILED:
                mark_close(d, CLOSE_TCP);
                break;
        case COAP_EVENT_TCP_CLOSED:
        case COAP_EVENT_DTLS_CLOSED:
        case COAP_EVENT_SESSION_CLOSED:
        case COAP_EVENT_SESSION_FAILED:
                mark_close(d, CLOSE_PEER);
                break;
        default:
                break;
        }
        return 0;
}

static void coap_log_quiet(coap_log_t level, const char *message) {
        if (getenv("FLEET_COAP_DEBUG"))
                fprintf(stderr, "fleet: libcoap: %s", message);
}

/* ---- What a device parses once, when it starts ----
 *
 * A real device parses its CA, certificate and key when tetherd starts,
 * on its own CPU. libcoap 4.3.1 parses the three PEM files again for every
 * client session (setup_pki_ssl() in its src/coap_openssl.c), which here
 * would put thousands of devices' start-up parsing inside a storm's clock,
 * on the cores the cloud under test shares (with OpenSSL 3.0, a third of
 * the simulator's CPU in a storm: docs/design/benchmarks.md). So each device's certificate and key
 * are parsed before the clock runs (preload()), and this program defines
 * SSL_use_certificate_file() and SSL_use_PrivateKey_file(), which libcoap
 * calls through its PLT: for those very paths (the pointers libcoap was
 * given) they set the parsed objects, shared by reference; any other path
 * goes to libssl's. The CA goes into each device's context once
 * (coap_context_set_pki_root_cas()) instead of with every session.
 * The handshake itself is unchanged: each device still sends its own
 * certificate and signs with its own key. */
typedef struct Preloaded {
        const char *path; /* d->cert or d->key: compared as pointers */
        X509 *cert;
        EVP_PKEY *key;
} Preloaded;

static void *preloaded; /* tsearch() tree of Preloaded, by path pointer */

static int preloaded_cmp(const void *a, const void *b) {
        uintptr_t x = (uintptr_t)((const Preloaded *)a)->path, y = (uintptr_t)((const Preloaded *)b)->path;

        return x < y ? -1 : x > y;
}

static const Preloaded *preloaded_find(const char *path) {
        Preloaded key = { .path = path };
        Preloaded **p = path ? tfind(&key, &preloaded, preloaded_cmp) : NULL;

        return p ? *p : NULL;
}

static int preload_add(const char *path, X509 *cert, EVP_PKEY *key) {
        Preloaded *e = calloc(1, sizeof(*e)), **p;

        if (!e)
                return -ENOMEM;
        *e = (Preloaded){ .path = path, .cert = cert, .key = key };
        p = tsearch(e, &preloaded, preloaded_cmp);
        if (!p) {
                free(e);
                return -ENOMEM;
        }
        if (*p != e) {
                /* Already there: replace what it holds. */
                X509_free((*p)->cert);
                EVP_PKEY_free((*p)->key);
                (*p)->cert = cert;
                (*p)->key = key;
                free(e);
        }
        return 0;
}

static void preload_drop(const char *path) {
        Preloaded key = { .path = path }, **p = path ? tfind(&key, &preloaded, preloaded_cmp) : NULL, *e;

        if (!p)
                return;
        e = *p;
        tdelete(&key, &preloaded, preloaded_cmp);
        X509_free(e->cert);
        EVP_PKEY_free(e->key);
        free(e);
}

/* Parse d's certificate and key files now (see above); a file that does
 * not parse is left to libssl, which fails the session as before. */
static void preload(Device *d) {
        FILE *f;
        X509 *x = NULL;
        EVP_PKEY *k = NULL;

        if (!d->files.cert_file || !d->files.key_file || preloaded_find(d->files.cert_file))
                return;
        if ((f = fopen(d->files.cert_file, "re"))) {
                x = PEM_read_X509(f, NULL, NULL, NULL);
                fclose(f);
        }
        if ((f = fopen(d->files.key_file, "re"))) {
                k = PEM_read_PrivateKey(f, NULL, NULL, NULL);
                fclose(f);
        }
        ERR_clear_error();
        if (!x || !k || preload_add(d->files.cert_file, x, NULL) < 0) {
                X509_free(x);
                EVP_PKEY_free(k);
                return;
        }
        if (preload_add(d->files.key_file, NULL, k) < 0) {
                EVP_PKEY_free(k);
                preload_drop(d->files.cert_file);
        }
}

/* d's files change (enrollment, renewal): parse them again next time. */
static void preload_forget(Device *d) {
        preload_drop(d->cert);
        preload_drop(d->key);
}

__attribute__((visibility("default"))) int SSL_use_certificate_file(SSL *ssl, const char *file, int type) {
        static int (*libssl_fn)(SSL *, const char *, int);
        const Preloaded *e = preloaded_find(file);

        if (e && e->cert && type == SSL_FILETYPE_PEM)
                return SSL_use_certificate(ssl, e->cert);
        /* Counted, so that a run where this did not take (another libcoap)
         * shows it: pem_parsed= on the result lines. */
        w.st.pem_parsed++;
        if (!libssl_fn) {
                *(void **)&libssl_fn = dlsym(RTLD_NEXT, "SSL_use_certificate_file");
                if (!libssl_fn)
                        return 0;
        }
        return libssl_fn(ssl, file, type);
}

__attribute__((visibility("default"))) int SSL_use_PrivateKey_file(SSL *ssl, const char *file, int type) {
        static int (*libssl_fn)(SSL *, const char *, int);
        const Preloaded *e = preloaded_find(file);

        if (e && e->key && type == SSL_FILETYPE_PEM)
                return SSL_use_PrivateKey(ssl, e->key);
        if (!libssl_fn) {
                *(void **)&libssl_fn = dlsym(RTLD_NEXT, "SSL_use_PrivateKey_file");
                if (!libssl_fn)
                        return 0;
        }
        return libssl_fn(ssl, file, type);
}

static int coap_prepare(Device *d) {
        coap_resource_t *unknown;
        struct epoll_event ev = { .events = EPOLLIN, .data.ptr = d };

        d->ctx = coap_new_context(NULL);
        if (!d->ctx)
                return -ENOMEM;
        coap_context_set_keepalive(d->ctx, FLEET_KEEPALIVE_SEC);
        coap_register_response_handler(d->ctx, on_response);
        coap_register_event_handler(d->ctx, on_coap_event);
        unknown = coap_resource_unknown_init(NULL);
        if (!unknown)
                return -ENOMEM;
        coap_register_request_handler(unknown, COAP_REQUEST_GET, on_request);
        coap_register_request_handler(unknown, COAP_REQUEST_POST, on_request);
        coap_add_resource(d->ctx, unknown);
        /* Without a certificate yet, the session is anonymous (to enroll). */
        d->files = (TlsFiles){ .ca_file = arg.server_ca };
        if (arg.mode != MODE_ENROLL || d->enrolled) {
                d->files.cert_file = d->cert;
                d->files.key_file = d->key;
        }
        d->check.host = arg.server_name;
        tls_pki_init(&d->pki, &d->files, &d->check);
        /* The CA into the context now, not from the file with every session. */
        if (!arg.parse_per_session) {
                if (d->files.ca_file && coap_context_set_pki_root_cas(d->ctx, d->files.ca_file, NULL))
                        d->pki.pki_key.key.pem.ca_file = NULL;
                preload(d);
        }
        if (arg.resume) {
                if (!d->resume && tls_resume_new(&d->resume) < 0)
                        return -ENOMEM;
                (void)tls_resume_attach(d->resume, d->ctx);
        }
        d->epoch = ((uint64_t)random() << 32) ^ (uint64_t)random();
        if (epoll_ctl(w.ep, EPOLL_CTL_ADD, coap_context_get_coap_fd(d->ctx), &ev) < 0)
                return -errno;
        return 0;
}

static void coap_connect(Device *d) {
        coap_address_t dst;
        struct sockaddr_in6 sin6 = { .sin6_family = AF_INET6, .sin6_port = htons((uint16_t)arg.port) };
        struct sockaddr_in sin = { .sin_family = AF_INET, .sin_port = htons((uint16_t)arg.port) };

        coap_address_init(&dst);
        if (inet_pton(AF_INET, arg.host, &sin.sin_addr) == 1) {
                memcpy(&dst.addr.sin, &sin, sizeof(sin));
                dst.size = sizeof(sin);
        } else {
                (void)inet_pton(AF_INET6, arg.host, &sin6.sin6_addr);
                memcpy(&dst.addr.sin6, &sin6, sizeof(sin6));
                dst.size = sizeof(sin6);
        }
        w.st.attempts++;
        if (d->resume) {
                char target[300];

                snprintf(target, sizeof(target), "%s:%u", arg.host, arg.port);
                tls_resume_target(d->resume, target, &d->files);
        }
        d->state = DEV_CONNECTING;
        d->deadline = now_us() + (uint64_t)(arg.connect_timeout * 1e6);
        d->session = coap_new_client_session_pki(d->ctx, NULL, &dst, COAP_PROTO_TLS, &d->pki);
        if (!d->session) {
                d->closing = CLOSE_TCP;
                count_close(d);
                return;
        }
        coap_session_set_app_data(d->session, d);
        if (arg.mode == MODE_ENROLL && !d->enrolled) {
                /* POST /enroll once the session is up (COAP_EVENT_SESSION_CONNECTED). */
                d->anonymous = true;
                if (!d->op_start)
                        d->op_start = now_us();
        }
        coap_io_process(d->ctx, COAP_IO_NO_WAIT);
}

static void coap_release(Device *d) {
        coap_session_t *s = TAKE_PTR(d->session);

        if (s) {
                coap_session_set_app_data(s, NULL);
                coap_session_release(s);
        }
}

static bool coap_publish(Device *d) {
        char seq[32], epoch[32], stamp[32];
        uint8_t buf[4], token[8];
        size_t tlen = 0;
        struct timespec ts;
        coap_pdu_t *pdu;

        pdu = coap_new_pdu(COAP_MESSAGE_CON, COAP_REQUEST_CODE_POST, d->session);
        if (!pdu)
                return false;
        coap_session_new_token(d->session, &tlen, token);
        clock_gettime(CLOCK_REALTIME, &ts);
        snprintf(seq, sizeof(seq), PROTO_QUERY_SEQ "%" PRIu64, ++d->seq);
        snprintf(epoch, sizeof(epoch), PROTO_QUERY_EPOCH "%016" PRIx64, d->epoch);
        snprintf(stamp, sizeof(stamp), PROTO_QUERY_TIME "%" PRIu64,
                 (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000);
        if (!coap_add_token(pdu, tlen, token) ||
            !coap_add_option(pdu, COAP_OPTION_URI_PATH, 1, (const uint8_t *)PROTO_PATH_EVENT) ||
            !coap_add_option(pdu, COAP_OPTION_URI_PATH, 5, (const uint8_t *)"fleet") ||
            !coap_add_option(pdu, COAP_OPTION_URI_PATH, 4, (const uint8_t *)"tick") ||
            !coap_add_option(pdu, COAP_OPTION_MAXAGE, coap_encode_var_safe(buf, sizeof(buf), PROTO_DEFAULT_TTL),
                             buf) ||
            !coap_add_option(pdu, COAP_OPTION_URI_QUERY, strlen(seq), (const uint8_t *)seq) ||
            !coap_add_option(pdu, COAP_OPTION_URI_QUERY, strlen(epoch), (const uint8_t *)epoch) ||
            !coap_add_option(pdu, COAP_OPTION_URI_QUERY, strlen(stamp), (const uint8_t *)stamp) ||
            !coap_add_data(pdu, 4, (const uint8_t *)"tick")) {
                coap_delete_pdu(pdu);
                return false;
        }
        if (coap_send(d->session, pdu) == COAP_INVALID_MID)
                return false;
        coap_io_process(d->ctx, COAP_IO_NO_WAIT);
        return true;
}

/* --- worker: OTA (--ota) -------------------------------------------------- */

/* A simulated device takes the cloud's update job (POST /o/JOB: 2.01, the
 * signature not checked, the body read for sha256, size, package and
 * version), downloads the artifact over its session (GET /a/SHA256 with
 * Block2, docs/protocol.md "Artifacts": BERT when libcoap says both CSMs
 * allow it, else SZX 6; FLEET_OTA_WINDOW requests outstanding), hashes it
 * as it comes, and reports accepted, downloading (and progress),
 * downloaded, installing, then committed, or rolled-back for
 * --ota-fail-percent of the jobs, after --ota-install-sec. It installs
 * nothing. After a lost session it goes on from the bytes it hashed; a
 * 5.03 to a block (the cloud holds MaxQueuedBytes unread) is waited out
 * for its Max-Age; a 4.29 to a report likewise. */

/* Queue a report (JSON text); a progress report is dropped when others wait. */
static void ota_queue(Device *d, json_t *j, bool progress) {
        OtaReports *r = &d->reports;
        char *text;

        if (!j)
                return;
        text = json_dumps(j, JSON_COMPACT);
        json_decref(j);
        if (!text)
                return;
        if ((progress && r->n > 0) || r->n == FLEET_OTA_REPORTS) {
                if (!progress)
                        w.st.ota_reports_dropped++;
                free(text);
                return;
        }
        r->q[(r->head + r->n) % FLEET_OTA_REPORTS].text = text;
        strcpy(r->q[(r->head + r->n) % FLEET_OTA_REPORTS].job, d->ota.job);
        r->n++;
}

/* A state report: seq grows with every state, as the agent's journal. */
static void ota_state(Device *d, const char *state, const char *code, const char *reason) {
        Ota *o = &d->ota;
        json_t *j = json_pack("{s:I, s:s, s:s, s:s}", "seq", (json_int_t)++o->seq, "state", state, "package",
                              o->package, "version", o->version);

        if (j && code)
                json_object_set_new(j, "code", json_string(code));
        if (j && reason)
                json_object_set_new(j, "reason", json_string(reason));
        if (j && (streq(state, "downloading") || streq(state, "downloaded"))) {
                json_object_set_new(j, "bytes", json_integer((json_int_t)o->done));
                json_object_set_new(j, "total", json_integer((json_int_t)o->size));
        }
        ota_queue(d, j, false);
}

static void ota_slots_clear(Ota *o) {
        for (size_t i = 0; i < FLEET_OTA_WINDOW; i++) {
                free(o->slot[i].data);
                o->slot[i] = (OtaSlot){};
        }
}

static void ota_end(Device *d, const char *state, const char *code, const char *reason) {
        Ota *o = &d->ota;

        ota_slots_clear(o);
        EVP_MD_CTX_free(TAKE_PTR(o->md));
        ota_state(d, state, code, reason);
        o->phase = OTA_DONE;
        if (streq(state, "committed"))
                w.st.ota_committed++;
        else if (streq(state, "rolled-back"))
                w.st.ota_rolled_back++;
        else
                w.st.ota_failed++;
        add_sample(SAMPLES_OTA_JOB, now_us() - o->start);
}

static void ota_downloaded(Device *d) {
        Ota *o = &d->ota;
        unsigned char md[EVP_MAX_MD_SIZE];
        char hex[2 * EVP_MAX_MD_SIZE + 1];
        unsigned len = 0;

        if (o->md && EVP_DigestFinal_ex(o->md, md, &len) == 1) {
                hex_encode(md, len, hex);
                if (!arg.ota_skip_download && (len != 32 || !streq(hex, o->sha256)))
                        return ota_end(d, "failed", "checksum", "the artifact's SHA-256 differs from the manifest's");
        }
        w.st.ota_downloads++;
        add_sample(SAMPLES_OTA_DOWNLOAD, now_us() - o->dl_start);
        ota_slots_clear(o);
        EVP_MD_CTX_free(TAKE_PTR(o->md));
        ota_state(d, "downloaded", NULL, NULL);
        ota_state(d, "installing", NULL, NULL);
        o->phase = OTA_INSTALLING;
        o->install_due = now_us() + (uint64_t)(arg.ota_install_sec * 1e6);
}

/* POST /o/JOB from the cloud. */
static void ota_request(Device *d, const char *job, const uint8_t *data, size_t len, coap_pdu_t *resp) {
        Ota *o = &d->ota;
        ManifestEnvelope env;
        json_t *body, *v;
        const char *sha, *pkg, *ver;
        json_int_t size;

        if (!ota_job_id_valid(job, strlen(job)))
                return respond(resp, COAP_RESPONSE_CODE_BAD_REQUEST, PROTO_CF_TEXT, "malformed: job id", 17);
        if (o->phase != OTA_NONE && streq(o->job, job))
                return respond(resp, COAP_RESPONSE_CODE_CREATED, PROTO_CF_TEXT, "", 0); /* a retry */
        if (o->phase == OTA_DOWNLOADING || o->phase == OTA_INSTALLING) {
                char text[64];
                snprintf(text, sizeof(text), "busy: job %s is in progress", o->job);
                return respond(resp, COAP_RESPONSE_CODE_SERVICE_UNAVAILABLE, PROTO_CF_TEXT, text, strlen(text));
        }
        if (len > MANIFEST_MAX)
                return respond(resp, COAP_RESPONSE_CODE_REQUEST_TOO_LARGE, PROTO_CF_TEXT, "malformed: too long", 19);
        if (!data || manifest_envelope_split(data, len, &env) < 0)
                return respond(resp, COAP_RESPONSE_CODE_BAD_REQUEST, PROTO_CF_TEXT, "malformed: envelope", 19);
        /* What the simulation needs of the body; the signature is not checked. */
        body = json_loadb((const char *)env.body, env.body_len, JSON_REJECT_DUPLICATES, NULL);
        sha = json_string_value(json_object_get(body, "sha256"));
        pkg = json_string_value(json_object_get(body, "package"));
        ver = json_string_value(json_object_get(body, "version"));
        v = json_object_get(body, "size");
        size = json_is_integer(v) ? json_integer_value(v) : -1;
        if (!sha || !manifest_sha256_valid(sha) || !pkg || !manifest_package_valid(pkg) || !ver ||
            strlen(ver) >= sizeof(o->version) || size <= 0 || (uint64_t)size > MANIFEST_SIZE_MAX) {
                json_decref(body);
                return respond(resp, COAP_RESPONSE_CODE_BAD_REQUEST, PROTO_CF_TEXT, "malformed: body", 15);
        }
        ota_slots_clear(o);
        EVP_MD_CTX_free(TAKE_PTR(o->md));
        *o = (Ota){ .phase = OTA_DOWNLOADING, .size = (uint64_t)size, .start = now_us() };
        strcpy(o->job, job);
        strcpy(o->sha256, sha);
        snprintf(o->package, sizeof(o->package), "%s", pkg);
        strcpy(o->version, ver);
        json_decref(body);
        o->fail = (double)random() / RAND_MAX * 100 < arg.ota_fail_percent;
        o->md = EVP_MD_CTX_new();
        if (!o->md || EVP_DigestInit_ex(o->md, EVP_sha256(), NULL) != 1) {
                o->phase = OTA_NONE;
                return respond(resp, COAP_RESPONSE_CODE_INTERNAL_ERROR, PROTO_CF_TEXT, "failed: no memory", 17);
        }
        o->chunk = 1024;
        o->szx = 6;
        w.st.ota_jobs++;
        ota_state(d, "accepted", NULL, NULL);
        ota_state(d, "downloading", NULL, NULL);
        o->dl_start = o->last_progress = now_us();
        if (arg.ota_skip_download) {
                o->done = o->size;
                ota_downloaded(d);
        }
        respond(resp, COAP_RESPONSE_CODE_CREATED, PROTO_CF_TEXT, "", 0);
}

static bool ota_send_report(Device *d) {
        OtaReports *r = &d->reports;
        const char *text = r->q[r->head].text, *job = r->q[r->head].job;
        uint8_t buf[4];
        coap_pdu_t *pdu = coap_new_pdu(COAP_MESSAGE_CON, COAP_REQUEST_CODE_POST, d->session);

        if (!pdu)
                return false;
        coap_session_new_token(d->session, &r->token_len, r->token);
        if (!coap_add_token(pdu, r->token_len, r->token) ||
            !coap_add_option(pdu, COAP_OPTION_URI_PATH, 1, (const uint8_t *)PROTO_PATH_OTA) ||
            !coap_add_option(pdu, COAP_OPTION_URI_PATH, strlen(job), (const uint8_t *)job) ||
            !coap_add_option(pdu, COAP_OPTION_CONTENT_FORMAT, coap_encode_var_safe(buf, sizeof(buf), PROTO_CF_JSON),
                             buf) ||
            !coap_add_data(pdu, strlen(text), (const uint8_t *)text)) {
                coap_delete_pdu(pdu);
                return false;
        }
        r->pending = true;
        if (coap_send(d->session, pdu) == COAP_INVALID_MID) {
                r->pending = false;
                return false;
        }
        w.st.ota_reports++;
        return true;
}

static bool ota_send_block(Device *d, OtaSlot *s) {
        Ota *o = &d->ota;
        uint8_t buf[4];
        uint32_t unit = o->bert ? 1024 : 1u << (o->szx + 4);
        coap_pdu_t *pdu = coap_new_pdu(COAP_MESSAGE_CON, COAP_REQUEST_CODE_GET, d->session);

        if (!pdu)
                return false;
        s->offset = o->next;
        coap_session_new_token(d->session, &s->token_len, s->token);
        if (!coap_add_token(pdu, s->token_len, s->token) ||
            !coap_add_option(pdu, COAP_OPTION_URI_PATH, 1, (const uint8_t *)FLEET_PATH_ARTIFACT) ||
            !coap_add_option(pdu, COAP_OPTION_URI_PATH, 64, (const uint8_t *)o->sha256) ||
            !coap_add_option(pdu, COAP_OPTION_BLOCK2,
                             coap_encode_var_safe(buf, sizeof(buf),
                                                  (uint32_t)(s->offset / unit) << 4 | (o->bert ? 7u : o->szx)),
                             buf)) {
                coap_delete_pdu(pdu);
                return false;
        }
        s->used = true;
        s->have = false;
        if (coap_send(d->session, pdu) == COAP_INVALID_MID) {
                s->used = false;
                return false;
        }
        o->next += o->chunk;
        w.st.ota_blocks++;
        return true;
}

/* Hash the blocks that continue the prefix; adapt to the block size the
 * cloud answers with (a short block that is not the last, or a larger BERT
 * one: the requests under way are dropped and asked again from there). */
static void ota_drain(Device *d) {
        Ota *o = &d->ota;
        bool progress = true;

        while (progress && o->phase == OTA_DOWNLOADING) {
                progress = false;
                for (size_t i = 0; i < FLEET_OTA_WINDOW; i++) {
                        OtaSlot *s = &o->slot[i];

                        if (!s->used || !s->have || s->offset != o->done)
                                continue;
                        if (EVP_DigestUpdate(o->md, s->data, s->len) != 1)
                                return ota_end(d, "failed", "download", "cannot hash");
                        o->done += s->len;
                        w.st.ota_bytes += s->len;
                        free(TAKE_PTR(s->data));
                        s->used = s->have = false;
                        progress = true;
                        if (!s->more || o->done >= o->size) {
                                if (o->done != o->size || s->more)
                                        return ota_end(d, "failed", "size", "the artifact's size differs");
                                return ota_downloaded(d);
                        }
                        if (s->len != o->chunk) {
                                o->chunk = (uint32_t)s->len;
                                for (size_t k = 0; k < FLEET_OTA_WINDOW; k++) {
                                        free(o->slot[k].data);
                                        o->slot[k] = (OtaSlot){};
                                }
                                o->next = o->done;
                        }
                        break;
                }
        }
}

/* An answer to GET /a/SHA256. */
static void ota_block(Device *d, OtaSlot *s, const coap_pdu_t *rcvd) {
        Ota *o = &d->ota;
        coap_pdu_code_t code = coap_pdu_get_code(rcvd);
        coap_opt_iterator_t it;
        coap_opt_t *etag, *size2;
        coap_block_b_t b;
        const uint8_t *data = NULL;
        size_t len = 0;
        char etag_hex[2 * 8 + 1];
        uint64_t offset;

        if (code == COAP_RESPONSE_CODE_SERVICE_UNAVAILABLE) {
                /* The cloud holds MaxQueuedBytes unread by this device: what
                 * was asked is asked again after Max-Age (the agent's rule). */
                coap_opt_t *age = coap_check_option(rcvd, COAP_OPTION_MAXAGE, &it);

                w.st.ota_block_retries++;
                ota_slots_clear(o);
                o->next = o->done;
                o->block_retry_at =
                        now_us() + (age ? coap_decode_var_bytes(coap_opt_value(age), coap_opt_length(age)) : 1) *
                                           1000000ULL;
                return;
        }
        if (code != COAP_RESPONSE_CODE_CONTENT) {
                char reason[256];
                (void)coap_get_data(rcvd, &len, &data);
                snprintf(reason, sizeof(reason), "GET /a/%.8s…: %u.%02u %.*s", o->sha256, COAP_RESPONSE_CLASS(code),
                         (unsigned)code & 0x1f, (int)(len < 160 ? len : 160), data ? (const char *)data : "");
                if (w.st.ota_failed == 0) /* the first, once per worker */
                        fprintf(stderr, "fleet: %s\n", reason);
                return ota_end(d, "failed", "download", reason);
        }
        /* ETag: the first 8 bytes of the SHA-256; another one means another
         * artifact: start again from 0 (a few times at most). */
        etag = coap_check_option(rcvd, COAP_OPTION_ETAG, &it);
        if (etag && coap_opt_length(etag) == 8)
                hex_encode(coap_opt_value(etag), 8, etag_hex);
        if (etag && (coap_opt_length(etag) != 8 || strncmp(etag_hex, o->sha256, 16) != 0)) {
                if (++o->restarts > 3)
                        return ota_end(d, "failed", "download", "the artifact's ETag keeps changing");
                w.st.ota_restarts++;
                ota_slots_clear(o);
                EVP_DigestInit_ex(o->md, EVP_sha256(), NULL);
                o->done = o->next = 0;
                return;
        }
        size2 = coap_check_option(rcvd, COAP_OPTION_SIZE2, &it);
        if (size2 && coap_decode_var_bytes8(coap_opt_value(size2), coap_opt_length(size2)) != o->size)
                return ota_end(d, "failed", "size", "Size2 differs from the manifest's size");
        if (!coap_get_block_b(d->session, rcvd, COAP_OPTION_BLOCK2, &b))
                return ota_end(d, "failed", "download", "an answer without a (usable) Block2 option");
        (void)coap_get_data(rcvd, &len, &data);
        offset = b.bert ? (uint64_t)b.num * 1024 : (uint64_t)b.num << (b.szx + 4);
        if (offset != s->offset || (len == 0 && b.m) || (b.m && len % (b.bert ? 1024 : 1u << (b.szx + 4)) != 0) ||
            offset + len > o->size)
                return ota_end(d, "failed", "download", "a block that does not fit");
        if (!b.bert && b.szx < o->szx && !o->bert) {
                /* The cloud chose smaller blocks: ask for those from now on. */
                o->szx = b.szx;
        }
        s->data = malloc(len ? len : 1);
        if (!s->data)
                return ota_end(d, "failed", "download", "no memory");
        memcpy(s->data, data, len);
        s->len = len;
        s->more = b.m;
        s->have = true;
        ota_drain(d);
}

/* The cloud's answer to a report or a block request; false if not ours. */
static bool ota_response(Device *d, const coap_pdu_t *rcvd) {
        Ota *o = &d->ota;
        OtaReports *r = &d->reports;
        coap_bin_const_t token = coap_pdu_get_token(rcvd);
        coap_pdu_code_t code;

        if (r->pending && token.length == r->token_len && memcmp(token.s, r->token, token.length) == 0) {
                r->pending = false;
                code = coap_pdu_get_code(rcvd);
                if (code == COAP_RESPONSE_CODE_TOO_MANY_REQUESTS) {
                        w.st.ota_report_retries++;
                        r->retry_at = now_us() + (uint64_t)max_age(rcvd) * 1000000;
                        return true;
                }
                if (COAP_RESPONSE_CLASS(code) == 5) {
                        r->retry_at = now_us() + 1000000;
                        return true;
                }
                if (code != COAP_RESPONSE_CODE_CHANGED) {
                        const uint8_t *data = NULL;
                        size_t len = 0;

                        (void)coap_get_data(rcvd, &len, &data);
                        if (w.st.ota_reports_refused++ == 0)
                                fprintf(stderr, "fleet: an OTA report answered %u.%02u: %.*s\n",
                                        COAP_RESPONSE_CLASS(code), (unsigned)code & 0x1f, (int)(len < 200 ? len : 200),
                                        data ? (const char *)data : "");
                }
                free(TAKE_PTR(r->q[r->head].text));
                r->head = (r->head + 1) % FLEET_OTA_REPORTS;
                r->n--;
                return true;
        }
        for (size_t i = 0; i < FLEET_OTA_WINDOW; i++) {
                OtaSlot *s = &o->slot[i];

                if (s->used && !s->have && token.length == s->token_len &&
                    memcmp(token.s, s->token, token.length) == 0) {
                        if (o->phase == OTA_DOWNLOADING)
                                ota_block(d, s, rcvd);
                        return true;
                }
        }
        return false;
}

/* The session is gone: what was in flight is asked again on the next one. */
static void ota_session_lost(Device *d) {
        Ota *o = &d->ota;

        d->reports.pending = false;
        o->bert_known = false;
        for (size_t i = 0; i < FLEET_OTA_WINDOW; i++) {
                free(o->slot[i].data);
                o->slot[i] = (OtaSlot){};
        }
        o->next = o->done;
}

/* Send what is due, outside any library callback. */
static void ota_step(Device *d, uint64_t now) {
        Ota *o = &d->ota;
        OtaReports *r = &d->reports;
        bool sent = false;

        d->ota_due = false;
        if (d->state != DEV_ONLINE || d->closing || !d->session)
                return;
        if (!r->pending && r->n > 0 && now >= r->retry_at)
                sent |= ota_send_report(d);
        if (o->phase == OTA_DOWNLOADING) {
                if (!o->bert_known) {
                        /* Both CSMs carry the BERT option iff libcoap takes a
                         * Block2 option with SZX 7 on this session. */
                        coap_pdu_t *probe = coap_pdu_init(COAP_MESSAGE_CON, COAP_RESPONSE_CODE_CONTENT, 0, 64);
                        coap_block_b_t b;
                        uint8_t buf[4];

                        o->bert = !arg.ota_no_bert && probe &&
                                  coap_add_option(probe, COAP_OPTION_BLOCK2, coap_encode_var_safe(buf, sizeof(buf), 7),
                                                  buf) &&
                                  coap_get_block_b(d->session, probe, COAP_OPTION_BLOCK2, &b) == 1 && b.bert;
                        if (probe)
                                coap_delete_pdu(probe);
                        o->bert_known = true;
                        if (o->bert && o->done == 0 && o->next == 0)
                                w.st.ota_bert++;
                }
                for (size_t i = 0; i < FLEET_OTA_WINDOW && o->next < o->size && now >= o->block_retry_at; i++) {
                        OtaSlot *s = &o->slot[i];

                        if (s->used)
                                continue;
                        /* BERT: the first block alone, its size tells the chunk. */
                        if (o->bert && o->done == 0 && o->next > 0)
                                break;
                        if (!ota_send_block(d, s))
                                break;
                        sent = true;
                }
                if (now - o->last_progress >= 1000000 && o->done > 0) {
                        o->last_progress = now;
                        ota_queue(d, json_pack("{s:s, s:I, s:I}", "state", "downloading", "bytes", (json_int_t)o->done,
                                               "total", (json_int_t)o->size),
                                  true);
                }
        } else if (o->phase == OTA_INSTALLING && now >= o->install_due) {
                if (o->fail)
                        ota_end(d, "rolled-back", "health", "simulated failure (--ota-fail-percent)");
                else
                        ota_end(d, "committed", NULL, NULL);
        }
        if (sent)
                coap_io_process(d->ctx, COAP_IO_NO_WAIT);
}

static void ota_due(Device *d) {
        if (d->ota_due)
                return;
        d->ota_due = true;
        d->next_ota = w.ota_due;
        w.ota_due = d;
}

static void process_ota(void) {
        uint64_t now = now_us();

        while (w.ota_due) {
                Device *d = w.ota_due;

                w.ota_due = d->next_ota;
                d->next_ota = NULL;
                ota_step(d, now);
        }
}


/* --- worker: MQTT -------------------------------------------------------- */

#ifdef FLEET_MQTT
static void mq_on_connect(struct mosquitto *m, void *userdata, int rc) {
        Device *d = userdata;

        if (rc == 0)
                went_online(d);
        else
                mark_close(d, CLOSE_PEER);
}

static void mq_on_disconnect(struct mosquitto *m, void *userdata, int rc) {
        mark_close(userdata, CLOSE_PEER);
}

static void mq_on_publish(struct mosquitto *m, void *userdata, int mid) {
        Device *d = userdata;

        if (d->in_flight > 0) {
                d->in_flight--;
                w.st.pub_acked++;
        }
}

/* The SSL_CTX libmosquitto 2.0 would make at connect (net__init_ssl_ctx():
 * the CA, the certificate chain and the key read from their files then,
 * inside the storm's clock), made now with what preload() parsed, so that
 * an MQTT device parses its files as often as a CoAP one (once, before
 * the clock; --parse-per-session: libmosquitto's own way). The same
 * settings: TLS 1.2 or later, peer verified (chain and the server's name
 * or address), released buffers. */
static SSL_CTX *mq_ssl_ctx(Device *d) {
        const Preloaded *c = preloaded_find(d->files.cert_file), *k = preloaded_find(d->files.key_file);
        X509_VERIFY_PARAM *param;
        X509 *ca = NULL;
        SSL_CTX *ctx;
        FILE *f;

        if (!c || !k || !c->cert || !k->key)
                return NULL;
        if ((f = fopen(arg.server_ca, "re"))) {
                ca = PEM_read_X509(f, NULL, NULL, NULL);
                fclose(f);
        }
        ctx = ca ? SSL_CTX_new(TLS_client_method()) : NULL;
        param = ctx ? SSL_CTX_get0_param(ctx) : NULL;
        if (!ctx || !SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION) ||
            X509_STORE_add_cert(SSL_CTX_get_cert_store(ctx), ca) != 1 ||
            SSL_CTX_use_certificate(ctx, c->cert) != 1 || SSL_CTX_use_PrivateKey(ctx, k->key) != 1 ||
            SSL_CTX_check_private_key(ctx) != 1 ||
            /* An address, or else a name. */
            (X509_VERIFY_PARAM_set1_ip_asc(param, arg.server_name) != 1 &&
             X509_VERIFY_PARAM_set1_host(param, arg.server_name, 0) != 1)) {
                X509_free(ca);
                SSL_CTX_free(ctx);
                ERR_clear_error();
                return NULL;
        }
        X509_free(ca);
        ERR_clear_error();
        SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
        SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
        SSL_CTX_set_options(ctx, SSL_OP_NO_COMPRESSION);
        return ctx;
}

static int mq_prepare(Device *d) {
        SSL_CTX *ctx = NULL;

        d->mq = mosquitto_new(d->id, true, d);
        d->fd = -1;
        if (!d->mq)
                return -ENOMEM;
        mosquitto_int_option(d->mq, MOSQ_OPT_PROTOCOL_VERSION,
                             arg.mqtt_version == 5 ? MQTT_PROTOCOL_V5 : MQTT_PROTOCOL_V311);
        mosquitto_int_option(d->mq, MOSQ_OPT_TCP_NODELAY, 1);
        if (!arg.parse_per_session) {
                d->files = (TlsFiles){ .ca_file = arg.server_ca, .cert_file = d->cert, .key_file = d->key };
                preload(d);
                ctx = mq_ssl_ctx(d);
        }
        if (ctx) {
                /* libmosquitto takes its own reference. */
                int rc = mosquitto_int_option(d->mq, MOSQ_OPT_SSL_CTX_WITH_DEFAULTS, 0);

                if (rc == MOSQ_ERR_SUCCESS)
                        rc = mosquitto_void_option(d->mq, MOSQ_OPT_SSL_CTX, ctx);
                SSL_CTX_free(ctx);
                if (rc != MOSQ_ERR_SUCCESS)
                        return -EINVAL;
        } else if (mosquitto_tls_set(d->mq, arg.server_ca, NULL, d->cert, d->key, NULL) != MOSQ_ERR_SUCCESS)
                return -EINVAL;
        mosquitto_connect_callback_set(d->mq, mq_on_connect);
        mosquitto_disconnect_callback_set(d->mq, mq_on_disconnect);
        mosquitto_publish_callback_set(d->mq, mq_on_publish);
        d->epoch = 0;
        return 0;
}

static void mq_watch(Device *d) {
        struct epoll_event ev = { .events = EPOLLIN, .data.ptr = d };
        int fd = mosquitto_socket(d->mq);

        if (fd < 0)
                return;
        if (mosquitto_want_write(d->mq))
                ev.events |= EPOLLOUT;
        /* A new socket may reuse the number of the last one, which
         * closing removed from the epoll set. */
        if (epoll_ctl(w.ep, EPOLL_CTL_MOD, fd, &ev) < 0 && epoll_ctl(w.ep, EPOLL_CTL_ADD, fd, &ev) < 0)
                return;
        d->fd = fd;
}

static void mq_connect(Device *d) {
        int rc;

        w.st.attempts++;
        d->state = DEV_CONNECTING;
        d->deadline = now_us() + (uint64_t)(arg.connect_timeout * 1e6);
        rc = d->mq_started ? mosquitto_reconnect_async(d->mq)
                           : mosquitto_connect_async(d->mq, arg.host, (int)arg.port, 60);
        d->mq_started = true;
        if (rc != MOSQ_ERR_SUCCESS) {
                d->closing = rc == MOSQ_ERR_TLS ? CLOSE_TLS : CLOSE_TCP;
                count_close(d);
                return;
        }
        mq_watch(d);
}

/* Run the client's I/O after epoll said its socket is ready. */
static void mq_io(Device *d, uint32_t events) {
        int rc = MOSQ_ERR_SUCCESS;

        if (d->state != DEV_CONNECTING && d->state != DEV_ONLINE)
                return;
        if (events & (EPOLLIN | EPOLLERR | EPOLLHUP))
                rc = mosquitto_loop_read(d->mq, 1);
        if (rc == MOSQ_ERR_SUCCESS && (events & EPOLLOUT))
                rc = mosquitto_loop_write(d->mq, 1);
        if (rc != MOSQ_ERR_SUCCESS)
                mark_close(d, rc == MOSQ_ERR_TLS && d->state == DEV_CONNECTING ? CLOSE_TLS : CLOSE_PEER);
        else
                mq_watch(d);
}

static bool mq_publish(Device *d) {
        char topic[128];
        int rc;

        snprintf(topic, sizeof(topic), "fleet/%s/tick", d->id);
        rc = mosquitto_publish_v5(d->mq, NULL, topic, 4, "tick", 1, false, NULL);
        if (rc != MOSQ_ERR_SUCCESS)
                return false;
        if (mosquitto_loop_write(d->mq, 1) != MOSQ_ERR_SUCCESS)
                mark_close(d, CLOSE_PEER);
        else
                mq_watch(d);
        return true;
}
#endif

/* --- worker: loop -------------------------------------------------------- */

static void device_connect(Device *d) {
#ifdef FLEET_MQTT
        if (arg.mqtt)
                return mq_connect(d);
#endif
        coap_connect(d);
}

static bool device_publish(Device *d) {
#ifdef FLEET_MQTT
        if (arg.mqtt)
                return mq_publish(d);
#endif
        return coap_publish(d);
}

/* Drop the sessions marked for closing, outside any library callback. */
static void process_closes(void) {
        while (w.closes) {
                Device *d = w.closes;

                w.closes = d->next_close;
                d->next_close = NULL;
#ifdef FLEET_MQTT
                if (arg.mqtt) {
                        if (d->fd >= 0)
                                (void)epoll_ctl(w.ep, EPOLL_CTL_DEL, d->fd, NULL);
                        d->fd = -1;
                        (void)mosquitto_disconnect(d->mq);
                } else
#endif
                        coap_release(d);
                if (d->closing == CLOSE_ENROLLED) {
                        /* libcoap keeps a client's PKI on its context: a new
                         * one with the certificate, and connect with it now. */
                        count_close(d);
                        coap_free_context(TAKE_PTR(d->ctx));
                        if (coap_prepare(d) < 0) {
                                fprintf(stderr, "fleet: cannot set up device %s again\n", d->id);
                                d->state = DEV_IDLE;
                                continue;
                        }
                        device_connect(d);
                        continue;
                }
                count_close(d);
        }
}

/* POST /enroll on the anonymous sessions that came up, outside any
 * library callback. */
static void process_enrolls(void) {
        while (w.enrolls) {
                Device *d = w.enrolls;

                w.enrolls = d->next_enroll;
                d->next_enroll = NULL;
                d->enroll_due = false;
                if (d->state != DEV_CONNECTING || !d->anonymous || d->closing || d->req_pending)
                        continue;
                if (send_enroll(d))
                        coap_io_process(d->ctx, COAP_IO_NO_WAIT);
                else
                        mark_close(d, CLOSE_PEER);
        }
}

/* Every online device asks for a certificate for a new key at once: the
 * keys and CSRs first, then the requests. */
static void renew_all(void) {
        uint64_t now;

        for (size_t i = 0; i < w.n; i++) {
                Device *d = &w.dev[i];

                d->csr_ready = d->state == DEV_ONLINE && !d->closing && !d->renewing && make_csr(d) >= 0;
        }
        now = now_us();
        for (size_t i = 0; i < w.n; i++) {
                Device *d = &w.dev[i];

                if (!d->csr_ready || d->state != DEV_ONLINE || d->closing)
                        continue;
                d->csr_ready = false;
                d->renewing = true;
                d->op_start = now;
                d->retry_at = 0;
                w.st.renew_pending++;
                if (!send_renew(d)) {
                        w.st.renew_failed++;
                        renew_end(d);
                        continue;
                }
                coap_io_process(d->ctx, COAP_IO_NO_WAIT);
        }
        w.st.renew_rounds++;
        if (w.st.renew_pending == 0)
                w.st.renew_done_at = now_us();
        report(REPORT_PROGRESS);
}

static void scan(uint64_t now) {
        for (size_t i = 0; i < w.next_connect; i++) {
                Device *d = &w.dev[i];

                if (arg.ota && d->state == DEV_ONLINE && (d->ota.phase == OTA_DOWNLOADING ||
                                                          d->ota.phase == OTA_INSTALLING || d->reports.n > 0))
                        ota_step(d, now); /* progress, the install timer, a report's retry */

                if (d->state == DEV_CONNECTING && now > d->deadline)
                        mark_close(d, CLOSE_TIMEOUT);
                else if (d->state == DEV_BACKOFF && now >= d->deadline)
                        device_connect(d);
                else if (d->renewing && d->state == DEV_ONLINE && !d->closing && !d->req_pending &&
                         now >= d->retry_at) {
                        if (send_renew(d))
                                coap_io_process(d->ctx, COAP_IO_NO_WAIT);
                        else {
                                w.st.renew_failed++;
                                renew_end(d);
                        }
                }
#ifdef FLEET_MQTT
                else if (arg.mqtt && d->state == DEV_ONLINE && i % 50 == (now / FLEET_SCAN_USEC) % 50) {
                        if (mosquitto_loop_misc(d->mq) != MOSQ_ERR_SUCCESS)
                                mark_close(d, CLOSE_PEER);
                        else
                                mq_watch(d);
                }
#endif
        }
}

static void publish_tick(uint64_t now) {
        double elapsed = (double)(now - w.pub_start) / 1e6;
        uint64_t due;

        if (now < w.pub_start)
                return;
        if (elapsed > w.pub_seconds)
                elapsed = w.pub_seconds;
        due = (uint64_t)(w.pub_rate * elapsed);
        while (w.pub_due_sent < due) {
                bool sent = false;

                /* The next device in turn that may send (online, window
                 * not full); an event no device can take is skipped. */
                for (size_t k = 0; k < w.n && !sent; k++) {
                        Device *d = &w.dev[w.cursor];

                        w.cursor = (w.cursor + 1) % w.n;
                        if (d->state != DEV_ONLINE || d->closing || d->in_flight >= FLEET_WINDOW)
                                continue;
                        /* Counted before sending: the receipt may be
                         * read before device_publish() returns. */
                        d->in_flight++;
                        if (!device_publish(d)) {
                                d->in_flight--;
                                continue;
                        }
                        w.st.pub_sent++;
                        sent = true;
                }
                if (!sent)
                        w.st.pub_skipped++;
                w.pub_due_sent++;
        }
        if (elapsed >= w.pub_seconds) {
                w.publishing = false;
                w.draining = true;
                w.pub_drain_until = now + FLEET_DRAIN_SEC * 1000000ULL;
        }
}

static bool all_drained(void) {
        for (size_t i = 0; i < w.n; i++)
                if (w.dev[i].state == DEV_ONLINE && w.dev[i].in_flight > 0)
                        return false;
        return true;
}

static void handle_command(const Command *c) {
        switch (c->op) {
        case FLEET_CMD_GO:
                w.started = true;
                break;
        case FLEET_CMD_PUBLISH:
                w.publishing = true;
                w.draining = false;
                w.pub_rate = c->rate;
                w.pub_seconds = c->seconds;
                w.pub_start = c->start;
                w.pub_due_sent = 0;
                /* Receipts still missing after the last step's drain
                 * will not come: free the windows. */
                for (size_t i = 0; i < w.n; i++)
                        w.dev[i].in_flight = 0;
                w.st.pub_sent = w.st.pub_acked = w.st.pub_errors = w.st.pub_skipped = 0;
                break;
        case FLEET_CMD_QUIT:
                quit_requested = 1;
                break;
        case FLEET_CMD_RENEW:
                if (!arg.mqtt)
                        renew_all();
                break;
        }
}

static int worker_main(unsigned id, Device *dev, size_t n, int cmd_fd, int report_fd) {
        struct epoll_event evs[256];
        struct rlimit rl;
        uint64_t last_scan = 0, last_report = 0;
        Stats reported = {};
        int r;

        w.id = id;
        w.dev = dev;
        w.n = n;
        w.cmd_fd = cmd_fd;
        w.report_fd = report_fd;
        srandom((unsigned)(getpid() ^ now_us()));
        if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
                rl.rlim_cur = rl.rlim_max;
                (void)setrlimit(RLIMIT_NOFILE, &rl);
        }
        w.ep = epoll_create1(EPOLL_CLOEXEC);
        if (w.ep < 0)
                return 1;
        {
                struct epoll_event ev = { .events = EPOLLIN, .data.ptr = NULL };
                if (epoll_ctl(w.ep, EPOLL_CTL_ADD, cmd_fd, &ev) < 0)
                        return 1;
        }
        if (!arg.mqtt) {
                coap_startup();
                coap_set_log_handler(coap_log_quiet);
                coap_set_log_level(getenv("FLEET_COAP_DEBUG") ? LOG_DEBUG : LOG_EMERG);
                coap_dtls_set_log_level(getenv("FLEET_COAP_DEBUG") ? LOG_DEBUG : LOG_EMERG);
        }
#ifdef FLEET_MQTT
        else
                mosquitto_lib_init();
#endif
        for (size_t i = 0; i < n; i++) {
#ifdef FLEET_MQTT
                r = arg.mqtt ? mq_prepare(&dev[i]) : coap_prepare(&dev[i]);
#else
                r = coap_prepare(&dev[i]);
#endif
                /* The key and CSR to enroll with, made before the clock runs. */
                if (r >= 0 && arg.mode == MODE_ENROLL)
                        r = make_csr(&dev[i]);
                if (r < 0) {
                        fprintf(stderr, "fleet: worker %u: cannot set up device %zu: %s\n", id, i, strerror(-r));
                        return 1;
                }
        }
        report(REPORT_READY);

        while (!quit_requested) {
                uint64_t now = now_us();
                int timeout = w.started && w.next_connect < n ? 0 : w.publishing ? 1 : FLEET_SCAN_USEC / 1000, k;

                k = epoll_wait(w.ep, evs, ELEMENTSOF(evs), timeout);
                if (k < 0 && errno != EINTR)
                        return 1;
                for (int i = 0; i < k; i++) {
                        Device *d = evs[i].data.ptr;

                        if (!d) {
                                Command c;
                                ssize_t got = read(cmd_fd, &c, sizeof(c));
                                if (got == 0)
                                        quit_requested = 1; /* the parent is gone */
                                else if (got == sizeof(c))
                                        handle_command(&c);
                                continue;
                        }
#ifdef FLEET_MQTT
                        if (arg.mqtt) {
                                mq_io(d, evs[i].events);
                                continue;
                        }
#endif
                        coap_io_process(d->ctx, COAP_IO_NO_WAIT);
                }
                process_enrolls();
                process_ota();
                process_closes();
                now = now_us();
                if (w.started) {
                        /* Everyone starts at once, in batches so that the
                         * handshakes already under way progress. */
                        for (int b = 0; b < FLEET_CONNECT_BATCH && w.next_connect < n; b++)
                                device_connect(&w.dev[w.next_connect++]);
                        if (now - last_scan >= FLEET_SCAN_USEC) {
                                scan(now);
                                last_scan = now;
                        }
                }
                if (w.publishing)
                        publish_tick(now);
                process_closes();
                if (w.draining && (all_drained() || now > w.pub_drain_until)) {
                        w.draining = false;
                        report(REPORT_PUBLISHED);
                }
                if (now - last_report >= FLEET_REPORT_USEC && memcmp(&reported, &w.st, sizeof(Stats)) != 0) {
                        report(REPORT_PROGRESS);
                        reported = w.st;
                        last_report = now;
                }
        }
        report(REPORT_FINAL);
        return 0;
}

/* --- MQTT subscriber (the peer of tether's event stream) ----------------- */

#ifdef FLEET_MQTT
static uint64_t sub_received;

static void sub_on_message(struct mosquitto *m, void *userdata, const struct mosquitto_message *msg) {
        sub_received++;
}

static void sub_on_connect(struct mosquitto *m, void *userdata, int rc) {
        if (rc != 0) {
                fprintf(stderr, "fleet: the broker refused the subscriber (%d)\n", rc);
                quit_requested = 1;
                return;
        }
        mosquitto_subscribe(m, NULL, "#", arg.sub_qos);
}

static void sub_on_subscribe(struct mosquitto *m, void *userdata, int mid, int n, const int *granted) {
        printf("subscribed topic=# qos=%d\n", n > 0 ? granted[0] : -1);
        fflush(stdout);
}

static int subscribe_main(Device *d) {
        struct mosquitto *m;
        uint64_t last = 0, shown = UINT64_MAX;

        mosquitto_lib_init();
        m = mosquitto_new(d->id, true, NULL);
        if (!m)
                return 1;
        mosquitto_int_option(m, MOSQ_OPT_PROTOCOL_VERSION,
                             arg.mqtt_version == 5 ? MQTT_PROTOCOL_V5 : MQTT_PROTOCOL_V311);
        mosquitto_int_option(m, MOSQ_OPT_TCP_NODELAY, 1);
        mosquitto_connect_callback_set(m, sub_on_connect);
        mosquitto_subscribe_callback_set(m, sub_on_subscribe);
        mosquitto_message_callback_set(m, sub_on_message);
        if (mosquitto_tls_set(m, arg.server_ca, NULL, d->cert, d->key, NULL) != MOSQ_ERR_SUCCESS ||
            mosquitto_connect(m, arg.host, (int)arg.port, 60) != MOSQ_ERR_SUCCESS) {
                fprintf(stderr, "fleet: the subscriber cannot connect to %s:%u\n", arg.host, arg.port);
                return 1;
        }
        while (!quit_requested) {
                int rc = mosquitto_loop(m, 50, 1000);
                uint64_t now = now_us();

                if (rc != MOSQ_ERR_SUCCESS && !(rc == MOSQ_ERR_ERRNO && errno == EINTR)) {
                        fprintf(stderr, "fleet: the subscriber lost its connection (%s)\n", mosquitto_strerror(rc));
                        break;
                }
                if (now - last >= 200000 && shown != sub_received) {
                        printf("received count=%" PRIu64 "\n", sub_received);
                        fflush(stdout);
                        shown = sub_received;
                        last = now;
                }
        }
        printf("received count=%" PRIu64 " final\n", sub_received);
        return 0;
}
#endif

/* --- parent --------------------------------------------------------------- */

typedef struct Worker {
        pid_t pid;
        int cmd_fd;
        size_t n;
        Stats st;
        bool ready, published, final;
} Worker;

static Worker *workers;

static void on_signal(int sig) {
        quit_requested = 1;
}

static Stats sum(void) {
        Stats s = {};

        for (unsigned long i = 0; i < arg.workers; i++) {
                const Stats *t = &workers[i].st;
                s.attempts += t->attempts;
                s.online += t->online;
                s.ever_online += t->ever_online;
                s.tls_failures += t->tls_failures;
                s.tcp_failures += t->tcp_failures;
                s.closed_early += t->closed_early;
                s.timeouts += t->timeouts;
                s.dropped += t->dropped;
                s.calls += t->calls;
                s.reads += t->reads;
                s.describes += t->describes;
                s.resumed += t->resumed;
                s.pem_parsed += t->pem_parsed;
                s.pub_sent += t->pub_sent;
                s.pub_acked += t->pub_acked;
                s.pub_errors += t->pub_errors;
                s.pub_skipped += t->pub_skipped;
                if (t->all_online_at > s.all_online_at)
                        s.all_online_at = t->all_online_at;
                if (t->last_online_at > s.last_online_at)
                        s.last_online_at = t->last_online_at;
                if (t->renew_done_at > s.renew_done_at)
                        s.renew_done_at = t->renew_done_at;
                s.enroll_sent += t->enroll_sent;
                s.enrolled += t->enrolled;
                s.enroll_retries += t->enroll_retries;
                s.enroll_gave_up += t->enroll_gave_up;
                s.renew_sent += t->renew_sent;
                s.renewed += t->renewed;
                s.renew_retries += t->renew_retries;
                s.renew_failed += t->renew_failed;
                s.renew_pending += t->renew_pending;
                s.bad_answers += t->bad_answers;
                s.ota_jobs += t->ota_jobs;
                s.ota_downloads += t->ota_downloads;
                s.ota_committed += t->ota_committed;
                s.ota_rolled_back += t->ota_rolled_back;
                s.ota_failed += t->ota_failed;
                s.ota_bytes += t->ota_bytes;
                s.ota_blocks += t->ota_blocks;
                s.ota_bert += t->ota_bert;
                s.ota_restarts += t->ota_restarts;
                s.ota_block_retries += t->ota_block_retries;
                s.ota_reports += t->ota_reports;
                s.ota_report_retries += t->ota_report_retries;
                s.ota_reports_refused += t->ota_reports_refused;
                s.ota_reports_dropped += t->ota_reports_dropped;
                for (size_t k = 0; k < ELEMENTSOF(s.enroll_codes); k++) {
                        s.enroll_codes[k] += t->enroll_codes[k];
                        s.renew_codes[k] += t->renew_codes[k];
                }
        }
        return s;
}

/* Latencies (usec) the workers sent, by SAMPLES_*. */
static struct {
        uint32_t *v;
        size_t n, cap;
} samples[_SAMPLES_MAX];

static void take_samples(const Samples *sm) {
        size_t n = sm->n < FLEET_SAMPLES ? sm->n : FLEET_SAMPLES;

        if (sm->which >= ELEMENTSOF(samples))
                return;
        if (samples[sm->which].n + n > samples[sm->which].cap) {
                size_t cap = 2 * (samples[sm->which].n + n);
                uint32_t *p = realloc(samples[sm->which].v, cap * sizeof(uint32_t));

                if (!p)
                        return;
                samples[sm->which].v = p;
                samples[sm->which].cap = cap;
        }
        memcpy(samples[sm->which].v + samples[sm->which].n, sm->usec, n * sizeof(uint32_t));
        samples[sm->which].n += n;
}

static int cmp_u32(const void *a, const void *b) {
        uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
        return x < y ? -1 : x > y;
}

/* " NAME_min_ms=... NAME_median_ms=... NAME_p99_ms=... NAME_max_ms=..." (nearest rank). */
static void format_samples(char *buf, size_t size, uint32_t which, const char *name) {
        uint32_t *v = samples[which].v;
        size_t n = samples[which].n;

        if (n == 0) {
                snprintf(buf, size, " %s_samples=0", name);
                return;
        }
        qsort(v, n, sizeof(uint32_t), cmp_u32);
        snprintf(buf, size, " %s_samples=%zu %s_min_ms=%.1f %s_median_ms=%.1f %s_p99_ms=%.1f %s_max_ms=%.1f", name, n,
                 name, v[0] / 1e3, name, v[(n - 1) / 2] / 1e3, name, v[(size_t)ceil(0.99 * (double)n) - 1] / 1e3,
                 name, v[n - 1] / 1e3);
}

static void format_latency(char *buf, size_t size, uint32_t which) {
        format_samples(buf, size, which, "latency");
}

/* --ota: what the devices did with their update jobs; download_* are the
 * times from accepting a job to the artifact checked, job_* to the final
 * report queued, per device. */
static void print_ota(const char *word) {
        Stats s = sum();
        char dl[320], job[320];

        format_samples(dl, sizeof(dl), SAMPLES_OTA_DOWNLOAD, "download");
        format_samples(job, sizeof(job), SAMPLES_OTA_JOB, "job");
        printf("%s jobs=%" PRIu64 " downloaded=%" PRIu64 " committed=%" PRIu64 " rolled_back=%" PRIu64
               " failed=%" PRIu64 " bytes=%" PRIu64 " blocks=%" PRIu64 " block_retries=%" PRIu64 " bert=%" PRIu64
               " restarts=%" PRIu64
               " reports=%" PRIu64 " report_retries=%" PRIu64 " reports_refused=%" PRIu64 " reports_dropped=%" PRIu64
               "%s%s\n",
               word, s.ota_jobs, s.ota_downloads, s.ota_committed, s.ota_rolled_back, s.ota_failed, s.ota_bytes,
               s.ota_blocks, s.ota_block_retries, s.ota_bert, s.ota_restarts, s.ota_reports, s.ota_report_retries, s.ota_reports_refused,
               s.ota_reports_dropped, dl, job);
        fflush(stdout);
}

/* " codes=4.01:3,4.29:12" (every 4.xx/5.xx answer), or " codes=none". */
static void format_codes(char *buf, size_t size, const uint32_t codes[64]) {
        size_t at = (size_t)snprintf(buf, size, " codes=");

        for (unsigned k = 0; k < 64 && at < size; k++)
                if (codes[k])
                        at += (size_t)snprintf(buf + at, size - at, "%s%u.%02u:%" PRIu32,
                                               at > strlen(" codes=") ? "," : "", 4 + k / 32, k % 32, codes[k]);
        if (at == strlen(" codes=") && at < size)
                snprintf(buf + at, size - at, "none");
}

/* utime+stime of process pid in seconds, or -1. */
static double process_cpu(pid_t pid) {
        char path[64], buf[1024], *p;
        unsigned long long ut, st;
        ssize_t len;
        int fd;

        if (pid <= 0)
                return -1;
        snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
        fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
                return -1;
        len = read(fd, buf, sizeof(buf) - 1);
        close(fd);
        if (len <= 0)
                return -1;
        buf[len] = 0;
        /* After "pid (comm) ": state, ppid, ... utime is field 14, stime 15. */
        p = strrchr(buf, ')');
        if (!p || sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut, &st) != 2)
                return -1;
        return (double)(ut + st) / (double)sysconf(_SC_CLK_TCK);
}

/* utime + stime of the cloud (--cloud-pid) in seconds, or -1. */
static double cloud_cpu(void) {
        return process_cpu(arg.cloud_pid);
}

/* The CPU time of all workers, in seconds: what simulating costs. */
static double workers_cpu(void) {
        double total = 0;

        for (unsigned long i = 0; i < arg.workers; i++) {
                double c = process_cpu(workers[i].pid);
                if (c > 0)
                        total += c;
        }
        return total;
}

static void format_cpu(char *buf, size_t size, double since) {
        double now = cloud_cpu();

        if (since < 0 || now < 0)
                buf[0] = 0;
        else
                snprintf(buf, size, " cloud_cpu=%.2f", now - since);
}

static void print_enrolled(const char *word, const Stats *s, uint64_t t0, uint64_t t1, double cpu0) {
        char lat[256], codes[1024], cpu[64];

        format_latency(lat, sizeof(lat), SAMPLES_ENROLL);
        format_codes(codes, sizeof(codes), s->enroll_codes);
        format_cpu(cpu, sizeof(cpu), cpu0);
        printf("%s devices=%lu seconds=%.3f online=%" PRIu64 " ever_online=%" PRIu64 " enrolled=%" PRIu64
               " gave_up=%" PRIu64 " requests=%" PRIu64 " retries=%" PRIu64 " bad_answers=%" PRIu64
               " attempts=%" PRIu64 " tls_failures=%" PRIu64 " tcp_failures=%" PRIu64 " closed_early=%" PRIu64
               " timeouts=%" PRIu64 " dropped=%" PRIu64 "%s%s%s\n",
               word, arg.devices, (double)(t1 - t0) / 1e6, s->online, s->ever_online, s->enrolled, s->enroll_gave_up,
               s->enroll_sent, s->enroll_retries, s->bad_answers, s->attempts, s->tls_failures, s->tcp_failures,
               s->closed_early, s->timeouts, s->dropped, codes, lat, cpu);
        fflush(stdout);
}

/* The renewal round's figures: the counters of s since base. */
static void print_renewed(const char *word, const Stats *s, const Stats *base, uint64_t t0, uint64_t t1,
                          double cpu0) {
        char lat[256], codes[1024], cpu[64];
        uint32_t round_codes[64];

        for (size_t k = 0; k < ELEMENTSOF(round_codes); k++)
                round_codes[k] = s->renew_codes[k] - base->renew_codes[k];
        format_latency(lat, sizeof(lat), SAMPLES_RENEW);
        format_codes(codes, sizeof(codes), round_codes);
        format_cpu(cpu, sizeof(cpu), cpu0);
        printf("%s devices=%lu seconds=%.3f online=%" PRIu64 " renewed=%" PRIu64 " failed=%" PRIu64
               " pending=%" PRIu64 " requests=%" PRIu64 " retries=%" PRIu64 " bad_answers=%" PRIu64
               " dropped=%" PRIu64 "%s%s%s\n",
               word, arg.devices, (double)(t1 - t0) / 1e6, s->online, s->renewed - base->renewed,
               s->renew_failed - base->renew_failed, s->renew_pending, s->renew_sent - base->renew_sent,
               s->renew_retries - base->renew_retries, s->bad_answers - base->bad_answers,
               s->dropped - base->dropped, codes, lat, cpu);
        fflush(stdout);
}

static void print_counts(const char *word, const Stats *s, const char *extra) {
        printf("%s devices=%lu online=%" PRIu64 " ever_online=%" PRIu64 " attempts=%" PRIu64 " tls_failures=%" PRIu64
               " tcp_failures=%" PRIu64 " closed_early=%" PRIu64 " timeouts=%" PRIu64 " dropped=%" PRIu64
               " calls=%" PRIu64 " reads=%" PRIu64 " describes=%" PRIu64 " resumed=%" PRIu64 " pem_parsed=%" PRIu64
               "%s\n",
               word, arg.devices, s->online, s->ever_online, s->attempts, s->tls_failures, s->tcp_failures,
               s->closed_early, s->timeouts, s->dropped, s->calls, s->reads, s->describes, s->resumed, s->pem_parsed,
               extra);
        fflush(stdout);
}

static void send_all(const Command *c) {
        for (unsigned long i = 0; i < arg.workers; i++) {
                Command mine = *c;

                mine.rate = c->rate * (double)workers[i].n / (double)arg.devices;
                if (workers[i].pid > 0 && write(workers[i].cmd_fd, &mine, sizeof(mine)) != sizeof(mine))
                        fprintf(stderr, "fleet: worker %lu is gone\n", i);
        }
}

static bool all_flag(size_t offset) {
        for (unsigned long i = 0; i < arg.workers; i++)
                if (!*(bool *)((char *)&workers[i] + offset))
                        return false;
        return true;
}

static double last_rate, last_seconds;

static void start_publish(double rate, double seconds) {
        Command c = { .op = FLEET_CMD_PUBLISH, .rate = rate, .seconds = seconds, .start = now_us() + 20000 };

        last_rate = rate;
        last_seconds = seconds;
        for (unsigned long i = 0; i < arg.workers; i++)
                workers[i].published = false;
        send_all(&c);
}

static void print_published(double rate, double seconds) {
        Stats s = sum();

        printf("published rate=%.0f seconds=%.1f offered=%.0f sent=%" PRIu64 " acked=%" PRIu64 " errors=%" PRIu64
               " skipped=%" PRIu64 " unacked=%" PRIu64 " online=%" PRIu64 "\n",
               rate, seconds, rate * seconds, s.pub_sent, s.pub_acked, s.pub_errors, s.pub_skipped,
               s.pub_sent - s.pub_acked - s.pub_errors, s.online);
        fflush(stdout);
}

/* The renewal in progress (renew mode, the renew command). */
static struct {
        bool pending;
        uint64_t round, t0, deadline;
        double cpu0;
        Stats base; /* the counters when it started */
} renew;

static void start_renew(void) {
        Command c = { .op = FLEET_CMD_RENEW };

        renew.pending = true;
        renew.round++;
        renew.t0 = now_us();
        renew.deadline = renew.t0 + (uint64_t)(arg.timeout * 1e6);
        renew.cpu0 = cloud_cpu();
        renew.base = sum();
        samples[SAMPLES_RENEW].n = 0;
        send_all(&c);
}

/* Whether every worker took the renew command and has nothing pending. */
static bool renew_done(void) {
        for (unsigned long i = 0; i < arg.workers; i++)
                if (workers[i].st.renew_rounds < renew.round || workers[i].st.renew_pending > 0)
                        return false;
        return true;
}

/* One line of stdin in hold mode; -1 to quit, 1 for a publish step, 2 for
 * a renewal. */
static int hold_command(char *line) {
        double rate, seconds;

        line[strcspn(line, "\r\n")] = 0;
        if (sscanf(line, "publish %lf %lf", &rate, &seconds) == 2 && rate > 0 && seconds > 0) {
                start_publish(rate, seconds);
                return 1;
        }
        if (streq(line, "renew") && !arg.mqtt) {
                start_renew();
                return 2;
        }
        if (streq(line, "stats")) {
                Stats s = sum();
                print_counts("stats", &s, "");
                return 0;
        }
        if (streq(line, "ota") && arg.ota) {
                print_ota("ota");
                return 0;
        }
        if (streq(line, "quit") || streq(line, ""))
                return -1;
        printf("error unknown command '%s' (publish RATE SECONDS, renew, stats, ota, quit)\n", line);
        fflush(stdout);
        return 0;
}

static int parent_loop(int report_fd) {
        uint64_t t0, deadline, last_progress = 0, renew_at = 0;
        bool online_shown = false, publish_pending = false, quitting = false, renewed_once = false;
        double cpu0 = cloud_cpu(), sim_cpu0 = workers_cpu();
        char line[256];
        size_t line_len = 0;
        int ret = 0;

        /* Everyone is ready (certificates read, contexts made): go. */
        t0 = now_us();
        deadline = t0 + (uint64_t)(arg.timeout * 1e6);
        {
                Command c = { .op = FLEET_CMD_GO, .start = t0 };
                send_all(&c);
        }
        for (;;) {
                struct pollfd p[2] = { { .fd = report_fd, .events = POLLIN },
                                       { .fd = (arg.mode == MODE_HOLD || (arg.mode == MODE_RENEW && renewed_once)) &&
                                                                       online_shown && !publish_pending &&
                                                                       !renew.pending && !quitting
                                                       ? STDIN_FILENO
                                                       : -1,
                                         .events = POLLIN } };
                uint64_t now;
                Stats s;

                if (quit_requested && !quitting) {
                        Command c = { .op = FLEET_CMD_QUIT };
                        send_all(&c);
                        quitting = true;
                }
                if (poll(p, 2, 200) < 0 && errno != EINTR)
                        return 1;
                if (p[0].revents) {
                        Report rep;
                        ssize_t got = read(report_fd, &rep, sizeof(rep));

                        if (got <= 0)
                                break; /* every worker is gone */
                        if (got == sizeof(rep) && rep.worker < arg.workers && rep.kind == REPORT_SAMPLES)
                                take_samples(&rep.samples);
                        else if (got == sizeof(rep) && rep.worker < arg.workers) {
                                Worker *wk = &workers[rep.worker];
                                wk->st = rep.st;
                                if (rep.kind == REPORT_PUBLISHED)
                                        wk->published = true;
                                if (rep.kind == REPORT_FINAL)
                                        wk->final = true;
                        }
                }
                if (p[1].fd >= 0 && p[1].revents) {
                        ssize_t got = read(STDIN_FILENO, line + line_len, sizeof(line) - 1 - line_len);
                        char *nl;

                        if (got <= 0)
                                quit_requested = 1;
                        else {
                                line_len += (size_t)got;
                                line[line_len] = 0;
                                while ((nl = strchr(line, '\n'))) {
                                        *nl = 0;
                                        int r = hold_command(line);
                                        memmove(line, nl + 1, strlen(nl + 1) + 1);
                                        line_len = strlen(line);
                                        if (r < 0)
                                                quit_requested = 1;
                                        else if (r == 1)
                                                publish_pending = true;
                                        if (r != 0)
                                                break;
                                }
                                if (line_len >= sizeof(line) - 1)
                                        line_len = 0;
                        }
                }
                if (quitting && all_flag(offsetof(Worker, final)))
                        break;
                now = now_us();
                s = sum();
                if (arg.mode == MODE_ENROLL && !online_shown && s.ever_online + s.enroll_gave_up == arg.devices) {
                        /* Everyone online with the certificate it got, or refused for good. */
                        print_enrolled("enrolled", &s, t0, s.ever_online ? s.last_online_at : now, cpu0);
                        online_shown = true;
                        quit_requested = 1;
                }
                if (arg.mode != MODE_ENROLL && !online_shown && s.ever_online == arg.devices) {
                        char extra[96];
                        /* sim_cpu: the workers' CPU from "go" until now (the simulator's own share of a
                         * storm on shared cores). */
                        snprintf(extra, sizeof(extra), " seconds=%.3f sim_cpu=%.2f", (double)(s.all_online_at - t0) / 1e6,
                                 workers_cpu() - sim_cpu0);
                        print_counts("online", &s, extra);
                        online_shown = true;
                        if (arg.mode == MODE_STORM)
                                quit_requested = 1;
                        else if (arg.mode == MODE_RENEW)
                                renew_at = now + (uint64_t)(arg.renew_delay * 1e6);
                        else if (arg.mode == MODE_PUBLISH) {
                                start_publish(arg.rate, arg.seconds);
                                publish_pending = true;
                        } else {
                                printf("ready commands: publish RATE SECONDS, stats,%s quit\n", arg.ota ? " ota," : "");
                                fflush(stdout);
                        }
                }
                if (renew_at && now >= renew_at && !renew.pending && !quitting) {
                        renew_at = 0;
                        start_renew();
                }
                if (renew.pending && renew_done()) {
                        renew.pending = false;
                        print_renewed("renewed", &s, &renew.base, renew.t0,
                                      s.renew_done_at > renew.t0 ? s.renew_done_at : now, renew.cpu0);
                        if (!renewed_once && arg.mode == MODE_RENEW) {
                                renewed_once = true;
                                printf("ready commands: publish RATE SECONDS, renew, stats, quit\n");
                                fflush(stdout);
                        }
                } else if (renew.pending && now > renew.deadline && !quitting) {
                        renew.pending = false;
                        print_renewed("renew-incomplete", &s, &renew.base, renew.t0, now, renew.cpu0);
                        ret = 1;
                        quit_requested = 1;
                }
                if (!online_shown && now > deadline && !quitting) {
                        char extra[64];
                        snprintf(extra, sizeof(extra), " seconds=%.3f", (double)(now - t0) / 1e6);
                        if (arg.mode == MODE_ENROLL)
                                print_enrolled("incomplete", &s, t0, now, cpu0);
                        else
                                print_counts("incomplete", &s, extra);
                        ret = 1;
                        quit_requested = 1;
                }
                if (publish_pending && all_flag(offsetof(Worker, published))) {
                        publish_pending = false;
                        print_published(last_rate, last_seconds);
                        if (arg.mode == MODE_PUBLISH)
                                quit_requested = 1;
                }
                if (!online_shown && now - last_progress >= 1000000) {
                        fprintf(stderr, "fleet: %.1f s: %" PRIu64 "/%lu online, %" PRIu64 " attempts, %" PRIu64
                                        " TLS failures, %" PRIu64 " timeouts, %" PRIu64 " closed early\n",
                                (double)(now - t0) / 1e6, s.ever_online, arg.devices, s.attempts, s.tls_failures,
                                s.timeouts, s.closed_early);
                        last_progress = now;
                }
        }
        {
                Stats s = sum();
                print_counts("final", &s, "");
        }
        if (arg.ota)
                print_ota("ota-final");
        return ret;
}

static void help(void) {
        printf("Usage: fleet [OPTIONS] storm|hold|publish RATE|enroll TOKEN|renew|subscribe|mint\n"
               "\n"
               "Simulate many tether devices (or MQTT clients), each with its own certificate.\n"
               "\n"
               "  storm             start every device at once; print when all are online, then exit\n"
               "  hold              connect all and stay, answering the cloud; commands on stdin:\n"
               "                    'publish RATE SECONDS', 'renew', 'stats', 'quit' (or end of input)\n"
               "  enroll TOKEN      devices without a certificate (new IDs, keys in --cache/enroll-PID,\n"
               "                    removed at exit) enroll with the provisioning token TOKEN over\n"
               "                    anonymous sessions (POST /enroll), all at once, then connect with the\n"
               "                    certificate they got; print when all are online, then exit\n"
               "  renew             as hold, and once all are online (after --renew-delay) every device\n"
               "                    asks for a certificate for a new key at once (POST /cert on its\n"
               "                    session); then the commands of hold, 'renew' again among them\n"
               "  publish RATE      connect all, then publish RATE events/s spread over the devices\n"
               "                    for --seconds; count receipts\n"
               "  mint              only make the certificates of devices [0, --first + N) in --cache\n"
               "  subscribe         (--mqtt only) one client on '#' with device --first's certificate,\n"
               "                    printing how many messages it received\n"
               "\n"
               "  --cloud HOST:PORT     tether-cloudd's CoAP endpoint (IP address)\n"
               "  --mqtt HOST:PORT      an MQTT broker instead (TLS, client certificates)\n"
               "  --mqtt-version 5|311  MQTT protocol version (default: 5)\n"
               "  --qos 0|1             QoS of the subscriber's subscription (default: 0, like an\n"
               "                        event stream; devices always publish at QoS 1)\n"
               "  --server-name NAME    name checked in the server certificate (default: HOST)\n"
               "  --ca-cert FILE        CA certificate that signs the devices (and the server)\n"
               "  --ca-key FILE         its key, to mint device certificates\n"
               "  --server-ca FILE      CA the server's certificate is checked with (default: --ca-cert)\n"
               "  --cache DIR           device certificates, kept between runs\n"
               "  -n, --devices N       devices (default: 1000)\n"
               "  --first K             use the cache's devices from the K-th on (default: 0)\n"
               "  -j, --workers K       worker processes (default: the number of cores)\n"
               "  --seconds S           publish for S seconds (default: 10)\n"
               "  --timeout S           give up on getting everyone online after S s (default: 600)\n"
               "  --connect-timeout S   per attempt, as ConnectTimeoutSec (default: 15)\n"
               "  --renew-delay S       renew: wait S s after all are online (default: 1)\n"
               "  --cloud-pid PID       enroll, renew: print the CPU time PID used meanwhile\n"
               "  --reconnect-min S, --reconnect-max S\n"
               "                        backoff after a failure, as the agent (default: 1, 60)\n"
               "  --ota                 the devices take update jobs: POST /o/JOB is accepted (2.01, the\n"
               "                        signature not checked), the artifact downloaded over the session\n"
               "                        (GET /a/SHA256, Block2: BERT if both CSMs allow it, else 1024-byte\n"
               "                        blocks, %d outstanding) and hashed, the states reported (accepted,\n"
               "                        downloading, downloaded, installing, committed); nothing installed.\n"
               "                        Command 'ota' (hold) and the line 'ota-final' print the counts\n"
               "  --ota-fail-percent P  end P %% of the jobs rolled-back instead (default: 0)\n"
               "  --ota-install-sec S   from installing to the final state (default: 1)\n"
               "  --ota-skip-download   report the artifact downloaded at once (for a cloud without GET /a/)\n"
               "  --ota-no-bert         1024-byte blocks even where BERT is allowed\n"
               "  --resume              keep each device's TLS session (ticket) in memory and offer it when it\n"
               "                        connects again (docs/cloud.md, \"TLS session resumption\")\n"
               "  --parse-per-session   let libcoap parse each device's CA, certificate and key files for\n"
               "                        every session (default: once, before the clock runs)\n"
               "  -h, --help            this help\n"
               "\n"
               "Output: one line per result on stdout ('online ...', 'published ...', 'enrolled ...',\n"
               "'renewed ...', 'final ...', 'ota ...'), progress on stderr.\n",
               FLEET_OTA_WINDOW);
}

static bool parse_double(const char *s, double min, double max, double *ret) {
        char *end;
        double v;

        errno = 0;
        v = strtod(s, &end);
        if (errno || end == s || *end || !(v >= min && v <= max))
                return false;
        *ret = v;
        return true;
}

static bool parse_endpoint(const char *s) {
        const char *colon = strrchr(s, ':');
        double port;
        size_t len;

        if (!colon || !parse_double(colon + 1, 1, 65535, &port))
                return false;
        len = (size_t)(colon - s);
        if (len >= 2 && s[0] == '[' && s[len - 1] == ']') {
                s++;
                len -= 2;
        }
        if (len == 0 || len >= sizeof(arg.host))
                return false;
        memcpy(arg.host, s, len);
        arg.host[len] = 0;
        arg.port = (unsigned)port;
        return true;
}

static int parse_argv(int argc, char **argv) {
        enum { OPT_CLOUD = 0x100, OPT_MQTT, OPT_MQTT_VERSION, OPT_SERVER_NAME, OPT_CA_CERT, OPT_CA_KEY,
               OPT_SERVER_CA, OPT_CACHE, OPT_FIRST, OPT_SECONDS, OPT_TIMEOUT, OPT_CONNECT_TIMEOUT,
               OPT_RECONNECT_MIN, OPT_RECONNECT_MAX, OPT_QOS, OPT_RENEW_DELAY, OPT_CLOUD_PID, OPT_OTA,
               OPT_OTA_FAIL_PERCENT, OPT_OTA_INSTALL_SEC, OPT_OTA_SKIP_DOWNLOAD, OPT_OTA_NO_BERT, OPT_RESUME,
               OPT_PARSE_PER_SESSION };
        static const struct option options[] = {
                { "cloud", required_argument, NULL, OPT_CLOUD },
                { "mqtt", required_argument, NULL, OPT_MQTT },
                { "mqtt-version", required_argument, NULL, OPT_MQTT_VERSION },
                { "server-name", required_argument, NULL, OPT_SERVER_NAME },
                { "ca-cert", required_argument, NULL, OPT_CA_CERT },
                { "ca-key", required_argument, NULL, OPT_CA_KEY },
                { "server-ca", required_argument, NULL, OPT_SERVER_CA },
                { "cache", required_argument, NULL, OPT_CACHE },
                { "devices", required_argument, NULL, 'n' },
                { "first", required_argument, NULL, OPT_FIRST },
                { "workers", required_argument, NULL, 'j' },
                { "seconds", required_argument, NULL, OPT_SECONDS },
                { "timeout", required_argument, NULL, OPT_TIMEOUT },
                { "connect-timeout", required_argument, NULL, OPT_CONNECT_TIMEOUT },
                { "reconnect-min", required_argument, NULL, OPT_RECONNECT_MIN },
                { "reconnect-max", required_argument, NULL, OPT_RECONNECT_MAX },
                { "qos", required_argument, NULL, OPT_QOS },
                { "renew-delay", required_argument, NULL, OPT_RENEW_DELAY },
                { "cloud-pid", required_argument, NULL, OPT_CLOUD_PID },
                { "ota", no_argument, NULL, OPT_OTA },
                { "ota-fail-percent", required_argument, NULL, OPT_OTA_FAIL_PERCENT },
                { "ota-install-sec", required_argument, NULL, OPT_OTA_INSTALL_SEC },
                { "ota-skip-download", no_argument, NULL, OPT_OTA_SKIP_DOWNLOAD },
                { "ota-no-bert", no_argument, NULL, OPT_OTA_NO_BERT },
                { "resume", no_argument, NULL, OPT_RESUME },
                { "parse-per-session", no_argument, NULL, OPT_PARSE_PER_SESSION },
                { "help", no_argument, NULL, 'h' },
                {},
        };
        bool have_endpoint = false;
        double v;
        int c;

        while ((c = getopt_long(argc, argv, "hn:j:", options, NULL)) >= 0) {
                switch (c) {
                case 'h':
                        help();
                        return 0;
                case OPT_CLOUD:
                case OPT_MQTT:
                        if (!parse_endpoint(optarg))
                                goto bad;
                        arg.mqtt = c == OPT_MQTT;
                        have_endpoint = true;
                        break;
                case OPT_MQTT_VERSION:
                        if (!streq(optarg, "5") && !streq(optarg, "311"))
                                goto bad;
                        arg.mqtt_version = atoi(optarg);
                        break;
                case OPT_QOS:
                        if (!streq(optarg, "0") && !streq(optarg, "1"))
                                goto bad;
                        arg.sub_qos = atoi(optarg);
                        break;
                case OPT_SERVER_NAME:
                        if (strlen(optarg) >= sizeof(arg.server_name))
                                goto bad;
                        strcpy(arg.server_name, optarg);
                        break;
                case OPT_CA_CERT:
                        arg.ca_cert = optarg;
                        break;
                case OPT_CA_KEY:
                        arg.ca_key = optarg;
                        break;
                case OPT_SERVER_CA:
                        arg.server_ca = optarg;
                        break;
                case OPT_CACHE:
                        arg.cache = optarg;
                        break;
                case 'n':
                        if (!parse_double(optarg, 1, 1000000, &v) || v != floor(v))
                                goto bad;
                        arg.devices = (unsigned long)v;
                        break;
                case OPT_FIRST:
                        if (!parse_double(optarg, 0, 1000000, &v) || v != floor(v))
                                goto bad;
                        arg.first = (unsigned long)v;
                        break;
                case 'j':
                        if (!parse_double(optarg, 1, 1024, &v) || v != floor(v))
                                goto bad;
                        arg.workers = (unsigned long)v;
                        break;
                case OPT_SECONDS:
                        if (!parse_double(optarg, 0.1, 86400, &arg.seconds))
                                goto bad;
                        break;
                case OPT_TIMEOUT:
                        if (!parse_double(optarg, 0.1, 86400, &arg.timeout))
                                goto bad;
                        break;
                case OPT_CONNECT_TIMEOUT:
                        if (!parse_double(optarg, 0.1, 3600, &arg.connect_timeout))
                                goto bad;
                        break;
                case OPT_RECONNECT_MIN:
                        if (!parse_double(optarg, 0.01, 3600, &arg.reconnect_min))
                                goto bad;
                        break;
                case OPT_RECONNECT_MAX:
                        if (!parse_double(optarg, 0.01, 3600, &arg.reconnect_max))
                                goto bad;
                        break;
                case OPT_RENEW_DELAY:
                        if (!parse_double(optarg, 0, 86400, &arg.renew_delay))
                                goto bad;
                        break;
                case OPT_CLOUD_PID:
                        if (!parse_double(optarg, 1, INT_MAX, &v) || v != floor(v))
                                goto bad;
                        arg.cloud_pid = (pid_t)v;
                        break;
                case OPT_OTA:
                        arg.ota = true;
                        break;
                case OPT_OTA_FAIL_PERCENT:
                        if (!parse_double(optarg, 0, 100, &arg.ota_fail_percent))
                                goto bad;
                        break;
                case OPT_OTA_INSTALL_SEC:
                        if (!parse_double(optarg, 0, 3600, &arg.ota_install_sec))
                                goto bad;
                        break;
                case OPT_OTA_SKIP_DOWNLOAD:
                        arg.ota_skip_download = true;
                        break;
                case OPT_PARSE_PER_SESSION:
                        arg.parse_per_session = true;
                        break;
                case OPT_RESUME:
                        arg.resume = true;
                        break;
                case OPT_OTA_NO_BERT:
                        arg.ota_no_bert = true;
                        break;
                default:
                        fprintf(stderr, "fleet: see --help\n");
                        return -EINVAL;
                }
        }
        if (optind >= argc) {
                fprintf(stderr, "fleet: say storm, hold, publish RATE, enroll TOKEN, renew or subscribe (see --help)\n");
                return -EINVAL;
        }
        if (streq(argv[optind], "mint") && optind + 1 == argc)
                arg.mode = MODE_MINT;
        else if (streq(argv[optind], "storm") && optind + 1 == argc)
                arg.mode = MODE_STORM;
        else if (streq(argv[optind], "hold") && optind + 1 == argc)
                arg.mode = MODE_HOLD;
        else if (streq(argv[optind], "subscribe") && optind + 1 == argc)
                arg.mode = MODE_SUBSCRIBE;
        else if (streq(argv[optind], "renew") && optind + 1 == argc)
                arg.mode = MODE_RENEW;
        else if (streq(argv[optind], "enroll") && optind + 2 == argc) {
                arg.mode = MODE_ENROLL;
                arg.enroll_token = argv[optind + 1];
        }
        else if (streq(argv[optind], "publish") && optind + 2 == argc) {
                arg.mode = MODE_PUBLISH;
                if (!parse_double(argv[optind + 1], 0.001, 1e9, &arg.rate)) {
                        fprintf(stderr, "fleet: invalid rate '%s'\n", argv[optind + 1]);
                        return -EINVAL;
                }
        } else {
                fprintf(stderr, "fleet: unexpected arguments from '%s' on (see --help)\n", argv[optind]);
                return -EINVAL;
        }
        if ((!have_endpoint && arg.mode != MODE_MINT) || !arg.ca_cert || !arg.cache) {
                fprintf(stderr, "fleet: --cloud or --mqtt, --ca-cert and --cache are required\n");
                return -EINVAL;
        }
#ifndef FLEET_MQTT
        if (arg.mqtt) {
                fprintf(stderr, "fleet: built without libmosquitto; --mqtt is not available\n");
                return -EOPNOTSUPP;
        }
#endif
        if ((arg.mode == MODE_ENROLL || arg.mode == MODE_RENEW) && arg.mqtt) {
                fprintf(stderr, "fleet: enroll and renew are for tether-cloudd (--cloud)\n");
                return -EINVAL;
        }
        if (arg.ota && (arg.mqtt || (arg.mode != MODE_HOLD && arg.mode != MODE_RENEW && arg.mode != MODE_PUBLISH))) {
                fprintf(stderr, "fleet: --ota is for tether-cloudd (--cloud) in hold, renew or publish\n");
                return -EINVAL;
        }
        if (arg.mode == MODE_SUBSCRIBE && !arg.mqtt) {
                fprintf(stderr, "fleet: subscribe is for --mqtt (tether's event stream is HTTP)\n");
                return -EINVAL;
        }
        if (!arg.server_ca)
                arg.server_ca = arg.ca_cert;
        if (!arg.server_name[0])
                strcpy(arg.server_name, arg.host);
        if (arg.reconnect_max < arg.reconnect_min)
                arg.reconnect_max = arg.reconnect_min;
        return 1;
bad:
        fprintf(stderr, "fleet: invalid value '%s' (see --help)\n", optarg);
        return -EINVAL;
}

int main(int argc, char **argv) {
        struct sigaction sa = { .sa_handler = on_signal };
        _cleanup_free_ char *enroll_dir = NULL;
        Device *all = NULL;
        int report_pipe[2], r;
        unsigned long n_ready = 0;
        size_t at = 0;
        long cores;

        r = parse_argv(argc, argv);
        if (r <= 0)
                return r < 0 ? 2 : 0;
        if (arg.mode == MODE_ENROLL) {
                /* Where enrolled devices keep their key and certificate. */
                if ((mkdir(arg.cache, 0700) < 0 && errno != EEXIST) ||
                    asprintf(&enroll_dir, "%s/enroll-%d", arg.cache, (int)getpid()) < 0 || mkdir(enroll_dir, 0700) < 0)
                        return fprintf(stderr, "fleet: cannot create a directory in '%s': %m\n", arg.cache), 1;
                r = enroll_devices(arg.first + arg.devices, enroll_dir, &all);
        } else
                r = load_devices(arg.first + (arg.mode == MODE_SUBSCRIBE ? 1 : arg.devices), &all);
        if (r < 0)
                return 1;
        if (arg.mode == MODE_MINT) {
                printf("minted devices=%lu cache=%s\n", arg.first + arg.devices, arg.cache);
                return 0;
        }
        all += arg.first;
        sigaction(SIGINT, &sa, NULL);
        sigaction(SIGTERM, &sa, NULL);
        signal(SIGPIPE, SIG_IGN);
#ifdef FLEET_MQTT
        if (arg.mode == MODE_SUBSCRIBE)
                return subscribe_main(&all[0]);
#endif
        cores = sysconf(_SC_NPROCESSORS_ONLN);
        if (!arg.workers)
                arg.workers = cores > 0 ? (unsigned long)cores : 1;
        if (arg.workers > arg.devices)
                arg.workers = arg.devices;
        workers = calloc(arg.workers, sizeof(Worker));
        if (!workers || pipe2(report_pipe, O_CLOEXEC) < 0)
                return 1;
        fflush(stdout);
        for (unsigned long i = 0; i < arg.workers; i++) {
                size_t n = arg.devices / arg.workers + (i < arg.devices % arg.workers ? 1 : 0);
                int cmd[2];
                pid_t pid;

                if (pipe2(cmd, O_CLOEXEC) < 0)
                        return 1;
                pid = fork();
                if (pid < 0)
                        return 1;
                if (pid == 0) {
                        signal(SIGINT, SIG_IGN);
                        signal(SIGTERM, SIG_DFL);
                        close(cmd[1]);
                        close(report_pipe[0]);
                        for (unsigned long k = 0; k < i; k++)
                                close(workers[k].cmd_fd);
                        _exit(worker_main((unsigned)i, all + at, n, cmd[0], report_pipe[1]));
                }
                close(cmd[0]);
                workers[i] = (Worker){ .pid = pid, .cmd_fd = cmd[1], .n = n };
                at += n;
        }
        close(report_pipe[1]);
        fprintf(stderr, "fleet: %lu %s devices in %lu workers against %s:%u\n", arg.devices,
                arg.mqtt ? "MQTT" : "tether", arg.workers, arg.host, arg.port);
        /* Wait until every worker has its devices set up. */
        while (n_ready < arg.workers && !quit_requested) {
                Report rep;
                ssize_t got = read(report_pipe[0], &rep, sizeof(rep));

                if (got <= 0) {
                        if (got < 0 && errno == EINTR)
                                continue;
                        fprintf(stderr, "fleet: a worker failed while setting up\n");
                        return 1;
                }
                if (got == sizeof(rep) && rep.kind == REPORT_READY && rep.worker < arg.workers &&
                    !workers[rep.worker].ready) {
                        workers[rep.worker].ready = true;
                        n_ready++;
                }
        }
        r = quit_requested ? 1 : parent_loop(report_pipe[0]);
        for (unsigned long i = 0; i < arg.workers; i++) {
                int status;
                close(workers[i].cmd_fd);
                if (waitpid(workers[i].pid, &status, 0) > 0 && (!WIFEXITED(status) || WEXITSTATUS(status) != 0)) {
                        fprintf(stderr, "fleet: worker %lu failed (status %d)\n", i, status);
                        r = 1;
                }
        }
        if (enroll_dir) {
                for (unsigned long i = 0; i < arg.devices; i++) {
                        (void)unlink(all[i].cert);
                        (void)unlink(all[i].key);
                }
                if (rmdir(enroll_dir) < 0)
                        fprintf(stderr, "fleet: cannot remove '%s': %m\n", enroll_dir);
        }
        return r;
}
