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
#include <openssl/x509v3.h>
#include <poll.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <dlfcn.h>
#include <stddef.h>
#ifdef FLEET_MQTT
#include <mosquitto.h>
#include <mqtt_protocol.h>
#endif

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

typedef enum Mode { MODE_STORM, MODE_HOLD, MODE_PUBLISH, MODE_SUBSCRIBE, MODE_MINT } Mode;

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
} arg = {
        .devices = 1000,
        .mqtt_version = 5,
        .seconds = 10,
        .timeout = 600,
        .connect_timeout = 15,
        .reconnect_min = 1,
        .reconnect_max = 60,
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
        uint64_t pub_sent, pub_acked, pub_errors, pub_skipped;
        uint64_t all_online_at; /* CLOCK_MONOTONIC usec when all of the worker's devices were first online */
} Stats;

enum { REPORT_READY, REPORT_PROGRESS, REPORT_PUBLISHED, REPORT_FINAL };
typedef struct Report {
        uint32_t worker;
        uint32_t kind;
        Stats st;
} Report;

enum { FLEET_CMD_GO, FLEET_CMD_PUBLISH, FLEET_CMD_QUIT };
typedef struct Command {
        uint32_t op;
        double rate; /* events/s of this worker */
        double seconds;
        uint64_t start; /* usec, CLOCK_MONOTONIC */
} Command;

typedef enum DevState { DEV_IDLE, DEV_CONNECTING, DEV_ONLINE, DEV_BACKOFF } DevState;
typedef enum CloseKind { CLOSE_NONE, CLOSE_TLS, CLOSE_TCP, CLOSE_PEER, CLOSE_TIMEOUT } CloseKind;

typedef struct Device {
        char id[PROTO_DEVICE_ID_MAX + 1];
        char *cert, *key;
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
        size_t next_connect; /* devices [0, next_connect) have been started */
        bool started;
        /* the publish step in progress */
        bool publishing, draining;
        double pub_rate, pub_seconds;
        uint64_t pub_start, pub_due_sent, pub_drain_until;
        size_t cursor;
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

static void report(uint32_t kind) {
        Report rep = { .worker = w.id, .kind = kind, .st = w.st };

        if (write(w.report_fd, &rep, sizeof(rep)) != sizeof(rep))
                _exit(3); /* the parent is gone */
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

static void went_online(Device *d) {
        if (d->state != DEV_CONNECTING)
                return;
        d->state = DEV_ONLINE;
        d->failures = 0;
        w.st.online++;
        if (!d->ever_online) {
                d->ever_online = true;
                w.st.ever_online++;
                if (w.st.ever_online == w.n) {
                        w.st.all_online_at = now_us();
                        report(REPORT_PROGRESS);
                }
        }
}

static void count_close(Device *d) {
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
        if (streq(p, PROTO_PATH_VARIABLE "/counter") && method == COAP_REQUEST_CODE_GET) {
                char v[24];
                w.st.reads++;
                snprintf(v, sizeof(v), "%" PRIu64, w.st.calls % INT32_MAX);
                return respond(resp, COAP_RESPONSE_CODE_CONTENT, PROTO_CF_JSON, v, strlen(v));
        }
        respond(resp, COAP_RESPONSE_CODE_NOT_FOUND, PROTO_CF_TEXT, "no such resource", 16);
}

/* Publish receipts: a device sends no other requests. */
static coap_response_t on_response(coap_session_t *session, const coap_pdu_t *sent, const coap_pdu_t *rcvd,
                                   const coap_mid_t mid) {
        Device *d = coap_session_get_app_data(session);

        if (!d || session != d->session || d->in_flight == 0)
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
        d->files = (TlsFiles){ .ca_file = arg.server_ca, .cert_file = d->cert, .key_file = d->key };
        d->check.host = arg.server_name;
        tls_pki_init(&d->pki, &d->files, &d->check);
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
        d->state = DEV_CONNECTING;
        d->deadline = now_us() + (uint64_t)(arg.connect_timeout * 1e6);
        d->session = coap_new_client_session_pki(d->ctx, NULL, &dst, COAP_PROTO_TLS, &d->pki);
        if (!d->session) {
                d->closing = CLOSE_TCP;
                count_close(d);
                return;
        }
        coap_session_set_app_data(d->session, d);
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

static int mq_prepare(Device *d) {
        d->mq = mosquitto_new(d->id, true, d);
        d->fd = -1;
        if (!d->mq)
                return -ENOMEM;
        mosquitto_int_option(d->mq, MOSQ_OPT_PROTOCOL_VERSION,
                             arg.mqtt_version == 5 ? MQTT_PROTOCOL_V5 : MQTT_PROTOCOL_V311);
        mosquitto_int_option(d->mq, MOSQ_OPT_TCP_NODELAY, 1);
        if (mosquitto_tls_set(d->mq, arg.server_ca, NULL, d->cert, d->key, NULL) != MOSQ_ERR_SUCCESS)
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
                count_close(d);
        }
}

static void scan(uint64_t now) {
        for (size_t i = 0; i < w.next_connect; i++) {
                Device *d = &w.dev[i];

                if (d->state == DEV_CONNECTING && now > d->deadline)
                        mark_close(d, CLOSE_TIMEOUT);
                else if (d->state == DEV_BACKOFF && now >= d->deadline)
                        device_connect(d);
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
                s.pub_sent += t->pub_sent;
                s.pub_acked += t->pub_acked;
                s.pub_errors += t->pub_errors;
                s.pub_skipped += t->pub_skipped;
                if (t->all_online_at > s.all_online_at)
                        s.all_online_at = t->all_online_at;
        }
        return s;
}

static void print_counts(const char *word, const Stats *s, const char *extra) {
        printf("%s devices=%lu online=%" PRIu64 " ever_online=%" PRIu64 " attempts=%" PRIu64 " tls_failures=%" PRIu64
               " tcp_failures=%" PRIu64 " closed_early=%" PRIu64 " timeouts=%" PRIu64 " dropped=%" PRIu64
               " calls=%" PRIu64 " reads=%" PRIu64 " describes=%" PRIu64 "%s\n",
               word, arg.devices, s->online, s->ever_online, s->attempts, s->tls_failures, s->tcp_failures,
               s->closed_early, s->timeouts, s->dropped, s->calls, s->reads, s->describes, extra);
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

/* One line of stdin in hold mode; -1 to quit. */
static int hold_command(char *line) {
        double rate, seconds;

        line[strcspn(line, "\r\n")] = 0;
        if (sscanf(line, "publish %lf %lf", &rate, &seconds) == 2 && rate > 0 && seconds > 0) {
                start_publish(rate, seconds);
                return 1;
        }
        if (streq(line, "stats")) {
                Stats s = sum();
                print_counts("stats", &s, "");
                return 0;
        }
        if (streq(line, "quit") || streq(line, ""))
                return -1;
        printf("error unknown command '%s' (publish RATE SECONDS, stats, quit)\n", line);
        fflush(stdout);
        return 0;
}

static int parent_loop(int report_fd) {
        uint64_t t0, deadline, last_progress = 0;
        bool online_shown = false, publish_pending = false, quitting = false;
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
                                       { .fd = arg.mode == MODE_HOLD && online_shown && !publish_pending && !quitting
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
                        if (got == sizeof(rep) && rep.worker < arg.workers) {
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
                                        else if (r > 0)
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
                if (!online_shown && s.ever_online == arg.devices) {
                        char extra[64];
                        snprintf(extra, sizeof(extra), " seconds=%.3f", (double)(s.all_online_at - t0) / 1e6);
                        print_counts("online", &s, extra);
                        online_shown = true;
                        if (arg.mode == MODE_STORM)
                                quit_requested = 1;
                        else if (arg.mode == MODE_PUBLISH) {
                                start_publish(arg.rate, arg.seconds);
                                publish_pending = true;
                        } else {
                                printf("ready commands: publish RATE SECONDS, stats, quit\n");
                                fflush(stdout);
                        }
                }
                if (!online_shown && now > deadline && !quitting) {
                        char extra[64];
                        snprintf(extra, sizeof(extra), " seconds=%.3f", (double)(now - t0) / 1e6);
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
        return ret;
}

static void help(void) {
        printf("Usage: fleet [OPTIONS] storm|hold|publish RATE|subscribe|mint\n"
               "\n"
               "Simulate many tether devices (or MQTT clients), each with its own certificate.\n"
               "\n"
               "  storm             start every device at once; print when all are online, then exit\n"
               "  hold              connect all and stay, answering the cloud; commands on stdin:\n"
               "                    'publish RATE SECONDS', 'stats', 'quit' (or end of input)\n"
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
               "  --reconnect-min S, --reconnect-max S\n"
               "                        backoff after a failure, as the agent (default: 1, 60)\n"
               "  -h, --help            this help\n"
               "\n"
               "Output: one line per result on stdout ('online ...', 'published ...', 'final ...'),\n"
               "progress on stderr.\n");
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
               OPT_RECONNECT_MIN, OPT_RECONNECT_MAX, OPT_QOS };
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
                default:
                        fprintf(stderr, "fleet: see --help\n");
                        return -EINVAL;
                }
        }
        if (optind >= argc) {
                fprintf(stderr, "fleet: say storm, hold, publish RATE or subscribe (see --help)\n");
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
        Device *all = NULL;
        int report_pipe[2], r;
        unsigned long n_ready = 0;
        size_t at = 0;
        long cores;

        r = parse_argv(argc, argv);
        if (r <= 0)
                return r < 0 ? 2 : 0;
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
        return r;
}
