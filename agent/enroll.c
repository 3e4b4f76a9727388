/* SPDX-License-Identifier: Apache-2.0 */
#include <arpa/inet.h>
#include <coap3/coap.h>
#include <errno.h>
#include <inttypes.h>
#include <netdb.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509v3.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <time.h>

#include "backoff.h"
#include "certfile.h"
#include "csr.h"
#include "enroll.h"
#include "log.h"
#include "proto.h"
#include "resolver.h"
#include "tls.h"
#include "util.h"

#define ENROLL_PATH "enroll"
#define ENROLL_RENEW_PATH "cert"
/* The cloud's answer: a certificate chain in JSON. */
#define ENROLL_ANSWER_MAX (64 * 1024)
#define ENROLL_CHAIN_MAX 8
/* An issued certificate may start this far in the future by our clock
 * (the cloud backdates its own by 5 minutes for the same reason). */
#define ENROLL_SKEW_SEC 300
/* One attempt (lookup, TCP, TLS, request, answer) takes at most this. */
#define ENROLL_ATTEMPT_MS 60000
#define ENROLL_RENEW_TIMEOUT_MS 60000
/* Backoff after failures that may pass (transport, 5.xx). */
#define ENROLL_RETRY_MIN_MS 1000
#define ENROLL_RETRY_MAX_MS 300000
#define ENROLL_RENEW_RETRY_MIN_MS 10000
#define ENROLL_RENEW_RETRY_MAX_MS 3600000

typedef enum EnrollState {
        ENROLL_NONE,       /* enrolled, or not asked to */
        ENROLL_WAITING,    /* not enrolled, no token: waits for tetherctl enroll */
        ENROLL_RUNNING,    /* an attempt is under way */
        ENROLL_RETRY,      /* an attempt failed; the next one is scheduled */
        ENROLL_FAILED,     /* refused by the cloud (4.xx): waits for another token */
        ENROLL_DONE,       /* enrolled by us */
} EnrollState;

typedef struct Request {
        EVP_PKEY *key;  /* the key the CSR is for */
        bool key_is_new; /* renewal: the key is not on disk yet */
        char *id;
        char *body;     /* the JSON request, sent again unchanged after a 4.29/5.03 */
} Request;

struct Enroll {
        sd_event *event;
        Conn *conn;
        const Config *config;
        EnrollHooks hooks;

        /* The certificate in place. */
        bool have_cert;
        CertInfo cert;
        int64_t renew_after, renew_at;
        uint32_t jitter; /* drawn once: renew_at stays put however often the file is read */

        /* --- enrollment --- */
        EnrollState state;
        unsigned generation;
        unsigned attempts;
        char *token;
        Request enroll_req;
        char error[512];  /* the last failure, for tetherctl */
        int64_t retry_at; /* CLOCK_REALTIME seconds of the next attempt (ENROLL_RETRY) */
        /* ENROLL_RETRY because the cloud asked for the same request again
         * (4.29, 5.03: an external signer at work, a rate limit), not
         * because an attempt failed: status says "enrolling", and
         * tetherctl enroll keeps waiting. */
        bool asked_again;
        unsigned failures;
        /* This enrollment is a re-enrollment without a token: the
         * certificate in place expired, its key asks again. */
        bool reenroll;
        coap_context_t *ctx;
        coap_session_t *session;
        /* Strings libcoap keeps pointers to while a session lives (it reads
         * the CA file when the TLS session is set up, after TCP connected):
         * our own copies, so that a SIGHUP freeing the old Config during an
         * attempt cannot leave it a dangling pointer. Replaced only between
         * sessions (attempt_begin()). */
        ConfigHost hosts[CONFIG_HOSTS_MAX]; /* [Cloud] Host='s entries, tried in order */
        size_t n_hosts;
        size_t host_index; /* the one being tried */
        char host_text[CONFIG_HOST_TEXT_MAX];
        char *ca_file;
        TlsFiles files;
        TlsHostCheck host_check;
        coap_dtls_pki_t pki;
        Resolver *resolver; /* ENROLL_RESOLVE_SIGNAL */
        struct addrinfo *addrs, *addr_next;
        char address[INET6_ADDRSTRLEN + 8];
        sd_event_source *io_source;
        sd_event_source *send_source;     /* defer: send once the session is up (docs/design/libcoap.md, trap B) */
        sd_event_source *finish_source;   /* defer: handle the answer or failure outside libcoap */
        sd_event_source *timer_source;    /* attempt deadline, or the next attempt */
        bool sent;
        bool answered;
        unsigned answer_code;
        uint32_t answer_max_age;
        char *answer;
        size_t answer_len;
        char *attempt_error; /* why the attempt failed, without an answer */

        sd_event_source *token_watch; /* inotify on TokenFile='s directory while not enrolled */
        sd_event_source *cert_watch;  /* inotify on Certificate='s directory while not enrolled */
        bool token_mode_warned;       /* TokenFile= readable by others: said once */

        /* --- renewal --- */
        sd_event_source *renew_source; /* CLOCK_REALTIME: renew_at, or the retry */
        Request renew_req;
        bool renew_due;       /* waiting for a connection */
        bool renew_inflight;
        bool renew_discard;   /* an enrollment replaced the pair meanwhile: drop the answer in flight */
        unsigned renew_failures;
        int64_t last_renewal_at;
        bool last_renewal_ok;
        char last_renewal_error[512];
        int64_t renew_retry_at;
};

static void watches_stop(Enroll *e);

/* Free a secret string, erased first. */
static void secret_free(char *s) {
        if (s)
                explicit_bzero(s, strlen(s));
        free(s);
}
static void secret_freep(char **s) {
        secret_free(*s);
}

static void request_done(Request *r) {
        EVP_PKEY_free(r->key);
        free(r->id);
        secret_free(r->body); /* may hold the provisioning token */
        *r = (Request){};
}

static int64_t now_sec(void) {
        return (int64_t)time(NULL);
}

static void set_status(Enroll *e, const char *fmt, ...) _printf_(2, 3);
static void set_status(Enroll *e, const char *fmt, ...) {
        char buf[768];
        va_list ap;

        va_start(ap, fmt);
        vsnprintf(buf, sizeof(buf), fmt, ap);
        va_end(ap);
        if (e->hooks.status)
                e->hooks.status(e->hooks.userdata, buf);
}

/* A time for the log: "2025-01-31 12:00:00 UTC". Returns buf. */
static const char *fmt_time(int64_t t, char buf[static 32]) {
        time_t when = (time_t)t;
        struct tm tm;

        if (!gmtime_r(&when, &tm) || !strftime(buf, 32, "%Y-%m-%d %H:%M:%S UTC", &tm))
                snprintf(buf, 32, "%" PRId64, t);
        return buf;
}

/* --- the certificate in place, renewal time ------------------------------ */

static void arm_renewal(Enroll *e, bool just_renewed);

/* Read the certificate file; have_cert says whether it is a usable one. */
static void read_cert(Enroll *e) {
        CertInfo info;

        e->have_cert = csr_cert_info(e->config->cert_file, &info) == 0;
        if (!e->have_cert)
                return;
        e->cert = info;
        e->renew_at = certfile_renew_at(info.not_before, info.not_after, e->config->enroll_renew_percent,
                                        e->jitter, &e->renew_after);
}

/* A certificate that would let the device connect: present, for our key,
 * not expired. */
static bool cert_valid(Enroll *e, char *why, size_t why_size) {
        int r;

        read_cert(e);
        if (!e->have_cert) {
                snprintf(why, why_size, "no certificate in '%s'", e->config->cert_file);
                return false;
        }
        if (e->cert.not_after <= now_sec()) {
                snprintf(why, why_size, "the certificate in '%s' has expired", e->config->cert_file);
                return false;
        }
        r = csr_pair_matches(e->config->cert_file, e->config->key_file);
        if (r <= 0) {
                snprintf(why, why_size, "the certificate in '%s' is not for the key in '%s'", e->config->cert_file,
                         e->config->key_file);
                return false;
        }
        return true;
}

/* --- the cloud's answer -------------------------------------------------- */

/* The leaf's notBefore may be ahead of our clock by the skew allowed,
 * which parse_issued() checked already. */
static int verify_skew_cb(int ok, X509_STORE_CTX *ctx) {
        if (!ok && X509_STORE_CTX_get_error(ctx) == X509_V_ERR_CERT_NOT_YET_VALID &&
            X509_STORE_CTX_get_error_depth(ctx) == 0)
                return 1;
        return ok;
}

/* Whether the chain (the leaf first, then what the cloud sent with it)
 * verifies against ca_file for a TLS client, now (the leaf's notBefore
 * within the skew allowed); 0, or -EBADMSG with the reason. */
static int verify_chain(STACK_OF(X509) *chain, const char *ca_file, char *error, size_t error_size) {
        X509_STORE *trust = X509_STORE_new();
        X509_STORE_CTX *ctx = X509_STORE_CTX_new();
        STACK_OF(X509) *untrusted = NULL;
        int r = -ENOMEM;

        if (!trust || !ctx)
                goto out;
        if (X509_STORE_load_file(trust, ca_file) != 1) {
                snprintf(error, error_size, "cannot read a CA certificate from [Enroll] DeviceCAFile='%s'", ca_file);
                r = -EIO;
                goto out;
        }
        untrusted = sk_X509_dup(chain);
        if (!untrusted)
                goto out;
        (void)sk_X509_shift(untrusted); /* the leaf */
        if (X509_STORE_CTX_init(ctx, trust, sk_X509_value(chain, 0), untrusted) != 1)
                goto out;
        X509_STORE_CTX_set_purpose(ctx, X509_PURPOSE_SSL_CLIENT);
        X509_STORE_CTX_set_verify_cb(ctx, verify_skew_cb);
        if (X509_verify_cert(ctx) != 1) {
                snprintf(error, error_size, "the certificate does not verify against [Enroll] DeviceCAFile='%s': %s",
                         ca_file, X509_verify_cert_error_string(X509_STORE_CTX_get_error(ctx)));
                r = -EBADMSG;
                goto out;
        }
        r = 0;
out:
        if (r == -ENOMEM)
                snprintf(error, error_size, "out of memory");
        sk_X509_free(untrusted);
        X509_STORE_CTX_free(ctx);
        X509_STORE_free(trust);
        ERR_clear_error();
        return r;
}

/* Check a 2.01 answer for req and return the certificate chain as PEM
 * (what gets installed) and its facts; the reason in error otherwise:
 * -EAGAIN when asking again later may do (a notBefore ahead of our clock),
 * else -EBADMSG (-ENOMEM, -EIO). With device_ca_file, the chain must
 * verify against it. */
static int parse_issued(const Request *req, const char *device_ca_file, const char *data, size_t len,
                        char **ret_pem, CertInfo *ret_info, char *error, size_t error_size) {
        json_t *j = NULL;
        const char *id = NULL, *pem = NULL;
        BIO *in = NULL, *out = NULL;
        STACK_OF(X509) *chain = NULL;
        X509 *x;
        CertInfo info = {};
        char *copy = NULL, *buf;
        long n_out;
        int r = -EBADMSG, n = 0;

        j = json_loadb(data, len, JSON_REJECT_DUPLICATES, NULL);
        if (!j || json_unpack(j, "{s:s, s:s}", "device_id", &id, "certificate", &pem) < 0) {
                snprintf(error, error_size, "the cloud's answer is not the expected JSON");
                goto out;
        }
        if (!streq(id, req->id)) {
                snprintf(error, error_size, "the cloud issued a certificate for '%.64s', not '%s'", id, req->id);
                goto out;
        }
        in = BIO_new_mem_buf(pem, -1);
        out = BIO_new(BIO_s_mem());
        chain = sk_X509_new_null();
        if (!in || !out || !chain) {
                r = -ENOMEM;
                snprintf(error, error_size, "out of memory");
                goto out;
        }
        while ((x = PEM_read_bio_X509(in, NULL, NULL, NULL))) {
                if (n == 0) {
                        csr_cert_info_x509(x, &info);
                        if (EVP_PKEY_eq(X509_get0_pubkey(x), req->key) != 1) {
                                snprintf(error, error_size, "the certificate is not for the key we sent");
                                X509_free(x);
                                goto out;
                        }
                }
                if (++n > ENROLL_CHAIN_MAX || !PEM_write_bio_X509(out, x)) {
                        snprintf(error, error_size, "the certificate chain is too long");
                        X509_free(x);
                        goto out;
                }
                if (!sk_X509_push(chain, x)) {
                        X509_free(x);
                        r = -ENOMEM;
                        snprintf(error, error_size, "out of memory");
                        goto out;
                }
        }
        if (n == 0) {
                snprintf(error, error_size, "the answer holds no certificate");
                goto out;
        }
        if (!streq(info.id, req->id)) {
                snprintf(error, error_size, "the certificate's commonName is not '%s'", req->id);
                goto out;
        }
        if (info.not_after <= now_sec()) {
                snprintf(error, error_size, "the certificate has already expired");
                goto out;
        }
        if (info.not_before > now_sec() + ENROLL_SKEW_SEC) {
                /* Not installed: the cloud would refuse it until then, and
                 * it would replace a pair that works. */
                snprintf(error, error_size,
                         "the certificate is valid only from %s, more than %d minutes ahead of this device's clock "
                         "(is the clock right?)",
                         fmt_time(info.not_before, (char[32]){}), ENROLL_SKEW_SEC / 60);
                r = -EAGAIN;
                goto out;
        }
        if (device_ca_file) {
                r = verify_chain(chain, device_ca_file, error, error_size);
                if (r < 0)
                        goto out;
        }
        n_out = BIO_get_mem_data(out, &buf);
        copy = n_out > 0 ? strndup(buf, (size_t)n_out) : NULL;
        if (!copy) {
                r = -ENOMEM;
                snprintf(error, error_size, "out of memory");
                goto out;
        }
        *ret_pem = copy;
        *ret_info = info;
        r = 0;
out:
        ERR_clear_error();
        sk_X509_pop_free(chain, X509_free);
        BIO_free(in);
        BIO_free(out);
        json_decref(j);
        return r;
}

/* The text of an error answer, for the log and tetherctl: printable
 * characters of at most 300 bytes. */
static void answer_text(const char *data, size_t len, char *buf, size_t size) {
        size_t k = 0;

        for (size_t i = 0; i < len && i < 300 && k + 1 < size; i++)
                buf[k++] = (unsigned char)data[i] >= 0x20 && data[i] != 0x7f ? data[i] : '?';
        buf[k] = 0;
}

/* Make req: the key (loaded or new), the ID and the JSON body. */
static int request_make(Request *req, EVP_PKEY *key, bool key_is_new, const char *id, const char *token) {
        _cleanup_free_ char *csr = NULL;
        json_t *j;
        int r;

        r = csr_make(key, id, &csr);
        if (r < 0)
                return r;
        j = token ? json_pack("{s:s, s:s}", "token", token, "csr", csr) : json_pack("{s:s}", "csr", csr);
        req->body = j ? json_dumps(j, JSON_COMPACT) : NULL;
        json_decref(j);
        req->id = strdup(id);
        if (!req->body || !req->id) {
                request_done(req);
                EVP_PKEY_free(key);
                return -ENOMEM;
        }
        req->key = key;
        req->key_is_new = key_is_new;
        return 0;
}

/* --- enrollment: the anonymous session ----------------------------------- */

static void attempt_fail(Enroll *e, const char *fmt, ...) _printf_(2, 3);

/* Drop the session and its context (never from inside libcoap). */
static void session_close(Enroll *e) {
        e->io_source = sd_event_source_disable_unref(e->io_source);
        if (e->session) {
                coap_session_set_app_data(e->session, NULL);
                coap_session_release(e->session);
                e->session = NULL;
        }
        if (e->ctx) {
                coap_free_context(e->ctx);
                e->ctx = NULL;
        }
        sd_event_source_set_enabled(e->send_source, SD_EVENT_OFF);
        e->sent = e->answered = false;
        free(e->answer);
        e->answer = NULL;
        e->answer_len = 0;
}

static void addrs_free(Enroll *e) {
        if (e->addrs)
                freeaddrinfo(e->addrs);
        e->addrs = e->addr_next = NULL;
}

static void attempt_stop(Enroll *e) {
        resolver_cancel(e->resolver);
        session_close(e);
        addrs_free(e);
        sd_event_source_set_enabled(e->finish_source, SD_EVENT_OFF);
        sd_event_source_set_enabled(e->timer_source, SD_EVENT_OFF);
        free(e->attempt_error);
        e->attempt_error = NULL;
}

static int on_enroll_io(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        Enroll *e = userdata;

        if (e->ctx)
                coap_io_process(e->ctx, COAP_IO_NO_WAIT);
        return 0;
}

static coap_response_t on_enroll_response(coap_session_t *session, const coap_pdu_t *sent, const coap_pdu_t *rcvd,
                                          const coap_mid_t mid) {
        Enroll *e = coap_session_get_app_data(session);
        const uint8_t *data = NULL;
        size_t len = 0;
        coap_opt_iterator_t it;
        coap_opt_t *opt;

        if (!e || session != e->session || e->answered)
                return COAP_RESPONSE_OK;
        (void)coap_get_data(rcvd, &len, &data);
        if (len > ENROLL_ANSWER_MAX) {
                attempt_fail(e, "the cloud's answer is larger than %u bytes", ENROLL_ANSWER_MAX);
                return COAP_RESPONSE_OK;
        }
        e->answer = malloc(len + 1);
        if (!e->answer) {
                attempt_fail(e, "out of memory");
                return COAP_RESPONSE_OK;
        }
        if (len)
                memcpy(e->answer, data, len);
        e->answer[len] = 0;
        e->answer_len = len;
        e->answer_code = coap_pdu_get_code(rcvd);
        opt = coap_check_option(rcvd, COAP_OPTION_MAXAGE, &it);
        e->answer_max_age = opt ? coap_decode_var_bytes(coap_opt_value(opt), coap_opt_length(opt)) : 60;
        e->answered = true;
        sd_event_source_set_enabled(e->finish_source, SD_EVENT_ONESHOT);
        return COAP_RESPONSE_OK;
}

static int connect_next(Enroll *e);

static int on_enroll_event(coap_session_t *session, const coap_event_t event) {
        Enroll *e = coap_session_get_app_data(session);

        if (!e || session != e->session)
                return 0;
        switch (event) {
        case COAP_EVENT_TCP_CONNECTED:
                (void)tls_session_set_nodelay(session);
                break;
        case COAP_EVENT_SESSION_CONNECTED:
                sd_event_source_set_enabled(e->send_source, SD_EVENT_ONESHOT);
                break;
        case COAP_EVENT_DTLS_ERROR:
                attempt_fail(e, "%s: %s", e->address,
                             e->host_check.failure[0] ? e->host_check.failure
                                                      : "TLS handshake failed (does the cloud allow enrollment?)");
                break;
        case COAP_EVENT_TCP_FAILED:
                attempt_fail(e, "%s: TCP connection failed", e->address);
                break;
        case COAP_EVENT_TCP_CLOSED:
        case COAP_EVENT_DTLS_CLOSED:
        case COAP_EVENT_SESSION_CLOSED:
        case COAP_EVENT_SESSION_FAILED:
                if (!e->answered)
                        attempt_fail(e, "%s: connection closed by the cloud", e->address);
                break;
        default:
                break;
        }
        return 0;
}

static int on_send(sd_event_source *s, void *userdata) {
        Enroll *e = userdata;
        coap_pdu_t *pdu;
        uint8_t cf[2], token[8];
        size_t tlen = 0;
        const char *body = e->enroll_req.body;

        if (!e->session || e->sent || coap_session_get_state(e->session) != COAP_SESSION_STATE_ESTABLISHED)
                return 0;
        pdu = coap_new_pdu(COAP_MESSAGE_CON, COAP_REQUEST_CODE_POST, e->session);
        if (!pdu) {
                attempt_fail(e, "out of memory");
                return 0;
        }
        coap_session_new_token(e->session, &tlen, token);
        if (!coap_add_token(pdu, tlen, token) ||
            !coap_add_option(pdu, COAP_OPTION_URI_PATH, strlen(ENROLL_PATH), (const uint8_t *)ENROLL_PATH) ||
            !coap_add_option(pdu, COAP_OPTION_CONTENT_FORMAT, coap_encode_var_safe(cf, sizeof(cf), PROTO_CF_JSON),
                             cf) ||
            !coap_add_data(pdu, strlen(body), (const uint8_t *)body)) {
                coap_delete_pdu(pdu);
                attempt_fail(e, "cannot build the request");
                return 0;
        }
        if (coap_send(e->session, pdu) == COAP_INVALID_MID) {
                attempt_fail(e, "%s: cannot send the request", e->address);
                return 0;
        }
        e->sent = true;
        coap_io_process(e->ctx, COAP_IO_NO_WAIT);
        return 0;
}

static int connect_to(Enroll *e, const struct addrinfo *ai) {
        uint16_t port = e->hosts[e->host_index].port;
        coap_address_t dst;
        char ip[INET6_ADDRSTRLEN] = "?";

        coap_address_init(&dst);
        memcpy(&dst.addr, ai->ai_addr, ai->ai_addrlen);
        dst.size = ai->ai_addrlen;
        if (ai->ai_family == AF_INET) {
                dst.addr.sin.sin_port = htons(port);
                inet_ntop(AF_INET, &dst.addr.sin.sin_addr, ip, sizeof(ip));
                snprintf(e->address, sizeof(e->address), "%s:%u", ip, port);
        } else {
                dst.addr.sin6.sin6_port = htons(port);
                inet_ntop(AF_INET6, &dst.addr.sin6.sin6_addr, ip, sizeof(ip));
                snprintf(e->address, sizeof(e->address), "[%s]:%u", ip, port);
        }
        e->ctx = coap_new_context(NULL);
        if (!e->ctx)
                return -ENOMEM;
        coap_register_response_handler(e->ctx, on_enroll_response);
        coap_register_event_handler(e->ctx, on_enroll_event);
        if (sd_event_add_io(e->event, &e->io_source, coap_context_get_coap_fd(e->ctx), EPOLLIN, on_enroll_io, e) <
            0)
                return -ENOMEM;
        /* Anonymous: only the CA file, to check the cloud. */
        e->files = (TlsFiles){ .ca_file = e->ca_file };
        /* The certificate must name the entry this address came from. */
        e->host_check.host = e->hosts[e->host_index].name;
        tls_pki_init(&e->pki, &e->files, &e->host_check);
        e->session = coap_new_client_session_pki(e->ctx, NULL, &dst, COAP_PROTO_TLS, &e->pki);
        if (!e->session)
                return -ECONNREFUSED;
        coap_session_set_app_data(e->session, e);
        coap_io_process(e->ctx, COAP_IO_NO_WAIT);
        return 0;
}

/* The next resolved address; -ENOENT when none is left. */
static int connect_next(Enroll *e) {
        while (e->addr_next) {
                struct addrinfo *ai = e->addr_next;

                e->addr_next = ai->ai_next;
                if ((ai->ai_family != AF_INET && ai->ai_family != AF_INET6) ||
                    ai->ai_addrlen > sizeof(((coap_address_t *)NULL)->addr))
                        continue;
                session_close(e);
                if (connect_to(e, ai) == 0)
                        return 0;
        }
        return -ENOENT;
}

static void on_resolved(void *userdata, int ret, struct addrinfo *ai) {
        Enroll *e = userdata;

        if (ret != 0) {
                attempt_fail(e, "cannot resolve '%s': %s", e->hosts[e->host_index].name, gai_strerror(ret));
                return;
        }
        addrs_free(e);
        e->addrs = e->addr_next = ai;
        if (connect_next(e) < 0)
                attempt_fail(e, "cannot connect to '%s'", e->hosts[e->host_index].name);
}

/* Try entry i of Host=: look its name up, with ENROLL_ATTEMPT_MS of its
 * own. */
static void attempt_host(Enroll *e, size_t i) {
        int r;

        e->host_index = i;
        config_host_text(&e->hosts[i], e->host_text);
        sd_event_source_set_time(e->timer_source, now_usec() + ENROLL_ATTEMPT_MS * 1000ULL);
        sd_event_source_set_enabled(e->timer_source, SD_EVENT_ONESHOT);
        r = resolver_start(e->resolver, e->hosts[i].name);
        if (r < 0) {
                attempt_fail(e, "%s", r == -ENOMEM ? "out of memory" : "cannot start name resolution");
                return;
        }
        set_status(e, "Enrolling as '%s' at %s (attempt %u)", e->enroll_req.id, e->host_text, e->attempts);
}

/* An attempt goes through Host='s entries from the first, as the Conn's
 * connections do. */
static void attempt_begin(Enroll *e) {
        attempt_stop(e);
        e->state = ENROLL_RUNNING;
        e->attempts++;
        free(e->ca_file);
        e->ca_file = strdup(e->config->ca_file);
        memcpy(e->hosts, e->config->cloud_hosts, sizeof(e->hosts));
        e->n_hosts = e->config->n_cloud_hosts;
        e->host_index = 0;
        config_host_text(&e->hosts[0], e->host_text);
        if (!e->ca_file || e->n_hosts == 0) {
                attempt_fail(e, "%s", e->ca_file ? "no [Cloud] Host=" : "out of memory");
                return;
        }
        attempt_host(e, 0);
}

/* The attempt failed without an answer: try the next address, or finish. */
static void attempt_fail(Enroll *e, const char *fmt, ...) {
        char buf[512];
        va_list ap;

        if (e->state != ENROLL_RUNNING || e->attempt_error || e->answered)
                return;
        va_start(ap, fmt);
        vsnprintf(buf, sizeof(buf), fmt, ap);
        va_end(ap);
        e->attempt_error = strdup(buf);
        sd_event_source_set_enabled(e->finish_source, SD_EVENT_ONESHOT);
}

static void schedule_retry(Enroll *e, uint64_t delay_ms, bool asked_again) {
        e->state = ENROLL_RETRY;
        e->asked_again = asked_again;
        e->retry_at = now_sec() + (int64_t)((delay_ms + 999) / 1000);
        sd_event_source_set_time(e->timer_source, now_usec() + delay_ms * 1000);
        sd_event_source_set_enabled(e->timer_source, SD_EVENT_ONESHOT);
}

static void enroll_failed(Enroll *e, bool retry, uint64_t delay_ms) {
        if (!retry && e->reenroll) {
                e->state = ENROLL_FAILED;
                log_struct(LOG_ERR, &(LogFields){ .device_id = e->enroll_req.id },
                           "Re-enrollment as '%s' with the key of the expired certificate failed: %s; a provisioning "
                           "token is needed: tetherctl enroll --force --token TOKEN",
                           e->enroll_req.id, e->error);
                set_status(e,
                           "Not enrolled: the certificate of '%s' expired and re-enrollment failed (%s); a "
                           "provisioning token is needed: tetherctl enroll --force --token TOKEN",
                           e->enroll_req.id, e->error);
                return;
        }
        if (!retry) {
                e->state = ENROLL_FAILED;
                log_struct(LOG_ERR, &(LogFields){ .device_id = e->enroll_req.id },
                           "Enrollment as '%s' failed: %s", e->enroll_req.id, e->error);
                set_status(e, "Not enrolled: enrollment as '%s' failed: %s", e->enroll_req.id, e->error);
                return;
        }
        log_struct(LOG_WARNING, &(LogFields){ .device_id = e->enroll_req.id },
                   "Enrollment as '%s' failed: %s; trying again in %.1f s", e->enroll_req.id, e->error,
                   delay_ms / 1000.0);
        set_status(e, "Not enrolled: enrollment as '%s' failed (%s); trying again in %.1f s", e->enroll_req.id,
                   e->error, delay_ms / 1000.0);
        schedule_retry(e, delay_ms, false);
}

static void enroll_succeeded(Enroll *e, const char *pem, const CertInfo *info) {
        _cleanup_free_ char *key_pem = NULL;
        EVP_PKEY *on_disk = NULL;
        int r;

        /* The certificate is for the key we loaded; a renewal that ended
         * while we enrolled (tetherctl enroll --force) may have put
         * another key in its place: then ours goes back with it. */
        if (csr_key_load(e->config->key_file, &on_disk) < 0 || EVP_PKEY_eq(on_disk, e->enroll_req.key) != 1)
                r = csr_key_pem(e->enroll_req.key, &key_pem);
        else
                r = 0;
        EVP_PKEY_free(on_disk);
        if (r == 0)
                r = certfile_install(e->config->key_file, e->config->cert_file, key_pem, pem);
        if (key_pem)
                explicit_bzero(key_pem, strlen(key_pem));
        if (r < 0) {
                snprintf(e->error, sizeof(e->error), "cannot install the certificate as '%s': %s",
                         e->config->cert_file, strerror(-r));
                enroll_failed(e, true, backoff_delay_ms(ENROLL_RETRY_MIN_MS, ENROLL_RETRY_MAX_MS, e->failures++,
                                                        (uint32_t)random()));
                return;
        }
        e->state = ENROLL_DONE;
        e->error[0] = 0;
        e->failures = 0;
        watches_stop(e);
        read_cert(e);
        log_struct(LOG_NOTICE, &(LogFields){ .device_id = info->id },
                   "Enrolled as device '%s': certificate valid until %s, installed as '%s'", info->id,
                   fmt_time(info->not_after, (char[32]){}), e->config->cert_file);
        secret_free(TAKE_PTR(e->token));
        /* A renewal in flight was for the pair just replaced. */
        e->renew_discard = e->renew_inflight;
        arm_renewal(e, true);
        if (e->hooks.enrolled)
                e->hooks.enrolled(e->hooks.userdata, info->id);
}

static int on_finish(sd_event_source *s, void *userdata) {
        Enroll *e = userdata;
        unsigned code = e->answer_code, cls = code >> 5;
        char text[320];
        _cleanup_free_ char *pem = NULL;
        CertInfo info;

        if (e->state != ENROLL_RUNNING)
                return 0;
        if (!e->answered) {
                /* Another address may do better. */
                if (e->addr_next && e->attempt_error) {
                        log_warning("Enrollment: %s, trying the next address", e->attempt_error);
                        free(e->attempt_error);
                        e->attempt_error = NULL;
                        if (connect_next(e) == 0)
                                return 0;
                        e->attempt_error = strdup("cannot connect to the next address");
                }
                /* Or another entry of Host=. */
                if (e->attempt_error && !e->addr_next && e->host_index + 1 < e->n_hosts) {
                        char next[CONFIG_HOST_TEXT_MAX];

                        log_warning("Enrollment: %s, trying the next host, %s", e->attempt_error,
                                    config_host_text(&e->hosts[e->host_index + 1], next));
                        free(e->attempt_error);
                        e->attempt_error = NULL;
                        resolver_cancel(e->resolver);
                        session_close(e);
                        addrs_free(e);
                        attempt_host(e, e->host_index + 1);
                        return 0;
                }
                snprintf(e->error, sizeof(e->error), "%s", e->attempt_error ? e->attempt_error : "no answer");
                attempt_stop(e);
                enroll_failed(e, true, backoff_delay_ms(ENROLL_RETRY_MIN_MS, ENROLL_RETRY_MAX_MS, e->failures++,
                                                        (uint32_t)random()));
                return 0;
        }
        answer_text(e->answer, e->answer_len, text, sizeof(text));
        if (code == COAP_RESPONSE_CODE(201)) {
                int r = parse_issued(&e->enroll_req, e->config->enroll_device_ca_file, e->answer, e->answer_len, &pem,
                                     &info, e->error, sizeof(e->error));
                attempt_stop(e);
                if (r < 0)
                        /* A notBefore ahead of our clock (-EAGAIN) is asked
                         * for again after a backoff, the clock may catch up;
                         * any other fault would come again the same way. */
                        enroll_failed(e, r == -EAGAIN,
                                      backoff_delay_ms(ENROLL_RETRY_MIN_MS, ENROLL_RETRY_MAX_MS, e->failures++,
                                                       (uint32_t)random()));
                else
                        enroll_succeeded(e, pem, &info);
                return 0;
        }
        snprintf(e->error, sizeof(e->error), "%u.%02u %s", cls, code & 0x1f, text[0] ? text : "(no reason given)");
        attempt_stop(e);
        if (code == COAP_RESPONSE_CODE(429) || code == COAP_RESPONSE_CODE(503)) {
                uint32_t wait = e->answer_max_age < 1 ? 1 : e->answer_max_age > 3600 ? 3600 : e->answer_max_age;

                /* The same request again: the cloud keeps its result for
                 * this key, no token use is lost. */
                log_struct(LOG_INFO, &(LogFields){ .device_id = e->enroll_req.id },
                           "Enrollment as '%s': the cloud answered %s; asking again in %" PRIu32 " s",
                           e->enroll_req.id, e->error, wait);
                set_status(e, "Enrolling as '%s': %s; asking again in %" PRIu32 " s", e->enroll_req.id, e->error,
                           wait);
                schedule_retry(e, (uint64_t)wait * 1000, true);
                return 0;
        }
        enroll_failed(e, cls == 5,
                      backoff_delay_ms(ENROLL_RETRY_MIN_MS, ENROLL_RETRY_MAX_MS, e->failures++, (uint32_t)random()));
        return 0;
}

static int on_enroll_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        Enroll *e = userdata;

        if (e->state == ENROLL_RETRY)
                attempt_begin(e);
        else if (e->state == ENROLL_RUNNING) {
                if (!e->attempt_error && !e->answered)
                        e->attempt_error = strdup(e->sent ? "no answer in time" : "connect timed out");
                e->addr_next = NULL; /* the attempt's time is up */
                sd_event_source_set_enabled(e->finish_source, SD_EVENT_ONESHOT);
        }
        return 0;
}

/* Read the token file: the first line that is not blank or a comment.
 * *ret_mode: the file's mode. */
static int read_token(const char *path, char **ret, mode_t *ret_mode) {
        _cleanup_fclose_ FILE *f = fopen(path, "re");
        char line[ENROLL_TOKEN_MAX + 2];
        struct stat st;

        if (!f)
                return -errno;
        *ret_mode = fstat(fileno(f), &st) == 0 ? st.st_mode : 0;
        while (fgets(line, sizeof(line), f)) {
                char *p = line, *end;

                p += strspn(p, " \t\r\n");
                end = p + strcspn(p, " \t\r\n");
                *end = 0;
                if (!*p || *p == '#')
                        continue;
                *ret = strdup(p);
                return *ret ? 0 : -ENOMEM;
        }
        return -ENODATA;
}

static int token_check(const char *token) {
        size_t n = strlen(token);

        if (n == 0 || n > ENROLL_TOKEN_MAX)
                return -EINVAL;
        for (size_t i = 0; i < n; i++)
                if (token[i] <= 0x20 || token[i] >= 0x7f)
                        return -EINVAL;
        return 0;
}

/* Prepare the request (key, ID, CSR; token NULL: a re-enrollment by the
 * key, which must exist) and start the first attempt. */
static int enroll_begin(Enroll *e, const char *token, const char *id, char *error, size_t error_size) {
        char idbuf[PROTO_DEVICE_ID_MAX + 1]; /* a certificate's ID, or csr_key_id()'s */
        char hosts[CONFIG_HOSTS_MAX * (CONFIG_HOST_TEXT_MAX + 2)];
        EVP_PKEY *key = NULL;
        CertInfo info;
        int r;

        attempt_stop(e);
        request_done(&e->enroll_req);
        r = csr_key_load(e->config->key_file, &key);
        if (r == -ENOENT && token) {
                /* On disk before we ask: a retry after a crash asks with
                 * the same key, which the cloud answers without using the
                 * token again. */
                r = csr_key_generate(&key);
                if (r == 0)
                        r = csr_key_write_new(key, e->config->key_file);
                if (r < 0) {
                        EVP_PKEY_free(key);
                        snprintf(error, error_size, "cannot make the device key '%s': %s", e->config->key_file,
                                 strerror(-r));
                        return r;
                }
                log_info("Made a new EC P-256 device key '%s'", e->config->key_file);
        } else if (r < 0) {
                snprintf(error, error_size, "cannot read the device key '%s': %s", e->config->key_file,
                         csr_key_load_problem(r));
                return r;
        }
        if (!id)
                id = e->config->enroll_device_id;
        if (!id && csr_cert_info(e->config->cert_file, &info) == 0 && info.id[0])
                id = strcpy(idbuf, info.id) ? idbuf : NULL; /* the ID this device had */
        if (!id && csr_key_id(key, idbuf) == 0)
                id = idbuf;
        if (!id) {
                EVP_PKEY_free(key);
                snprintf(error, error_size, "cannot compute the device ID");
                return -EIO;
        }
        r = request_make(&e->enroll_req, key, false, id, token);
        if (r < 0) {
                snprintf(error, error_size, "cannot make the certificate request: %s", strerror(-r));
                return r;
        }
        e->generation++;
        e->attempts = 0;
        e->failures = 0;
        e->error[0] = 0;
        e->reenroll = !token;
        log_struct(LOG_INFO, &(LogFields){ .device_id = e->enroll_req.id }, "%s as device '%s' at %s",
                   e->reenroll ? "Re-enrolling without a token" : "Enrolling", e->enroll_req.id,
                   config_hosts_text(e->config, hosts, sizeof(hosts)));
        attempt_begin(e);
        return (int)e->generation;
}

int enroll_request(Enroll *e, const char *token, const char *id, bool force, char *error, size_t error_size) {
        char why[512];
        int r;

        if (!token || token_check(token) < 0) {
                snprintf(error, error_size, "the token is empty, longer than %d bytes or not printable ASCII",
                         ENROLL_TOKEN_MAX);
                return -EINVAL;
        }
        if (id && proto_name_check(id, strlen(id), PROTO_NAME_DEVICE) < 0) {
                snprintf(error, error_size, "invalid device ID '%.64s'", id);
                return -EINVAL;
        }
        if (!force && cert_valid(e, why, sizeof(why))) {
                snprintf(error, error_size,
                         "already enrolled as '%s' (certificate valid until %s); use --force to enroll again",
                         e->cert.id, fmt_time(e->cert.not_after, (char[32]){}));
                return -EEXIST;
        }
        r = enroll_begin(e, token, id, error, error_size);
        if (r < 0)
                return r;
        secret_free(e->token);
        e->token = strdup(token);
        return r;
}

/* The certificate in place has expired (the cloud refuses it; it cannot
 * be renewed): ask for a new one for its key on an anonymous session,
 * without a token (the cloud accepts the key it has on record for the
 * device; docs/enrollment.md, "Renewal"). Not with Renew=no, nor while an
 * enrollment is under way. 1 if an attempt began. */
static int reenroll_begin(Enroll *e) {
        char error[512], id[PROTO_DEVICE_ID_MAX + 1];
        int r;

        if (!e->config->enroll_renew || e->state == ENROLL_RUNNING || e->state == ENROLL_RETRY)
                return 0;
        read_cert(e);
        if (!e->have_cert || !e->cert.id[0] || e->cert.not_after > now_sec())
                return 0;
        if (csr_pair_matches(e->config->cert_file, e->config->key_file) <= 0) {
                log_struct(LOG_WARNING, &(LogFields){ .device_id = e->cert.id },
                           "The certificate of '%s' expired and is not for the key in '%s': enroll again with a "
                           "token (tetherctl enroll --force --token TOKEN)",
                           e->cert.id, e->config->key_file);
                return 0;
        }
        snprintf(id, sizeof(id), "%s", e->cert.id);
        log_struct(LOG_NOTICE, &(LogFields){ .device_id = id },
                   "The certificate of '%s' expired at %s: re-enrolling with its key, without a token", id,
                   fmt_time(e->cert.not_after, (char[32]){}));
        r = enroll_begin(e, NULL, id, error, sizeof(error));
        if (r < 0) {
                log_struct(LOG_ERR, &(LogFields){ .device_id = id }, "Cannot re-enroll: %s", error);
                return 0;
        }
        secret_free(TAKE_PTR(e->token));
        return 1;
}

/* --- renewal ------------------------------------------------------------- */

static void renew_send(Enroll *e);

static void renew_schedule(Enroll *e, int64_t at) {
        e->renew_retry_at = at;
        sd_event_source_set_time(e->renew_source, (uint64_t)(at > 0 ? at : 0) * 1000000ULL);
        sd_event_source_set_enabled(e->renew_source, SD_EVENT_ONESHOT);
}

/* just_renewed: the certificate is the one a renewal just brought. The
 * cloud backdates notBefore (clock skew), so with a short lifetime its
 * renewal time may already have passed: then the next renewal waits the
 * same share of the time left, never a loop of renewals. */
static void arm_renewal(Enroll *e, bool just_renewed) {
        int64_t now = now_sec();

        sd_event_source_set_enabled(e->renew_source, SD_EVENT_OFF);
        e->renew_due = false;
        if (!e->config->enroll_renew || !e->have_cert || e->renew_inflight)
                return;
        request_done(&e->renew_req);
        e->renew_failures = 0;
        if (just_renewed && e->renew_at <= now && e->cert.not_after > now)
                e->renew_at = e->renew_after = certfile_renew_at(now, e->cert.not_after, e->config->enroll_renew_percent,
                                                                 e->jitter, NULL);
        renew_schedule(e, e->renew_at);
        log_struct(LOG_INFO, &(LogFields){ .device_id = e->cert.id },
                   "Certificate of '%s' valid until %s; renewal at %s (in %" PRId64 " s)", e->cert.id,
                   fmt_time(e->cert.not_after, (char[32]){}), fmt_time(e->renew_at, (char[32]){}),
                   e->renew_at - now_sec());
}

static void renew_retry(Enroll *e, uint32_t retry_sec) {
        uint64_t delay_ms = retry_sec > 0 ? (uint64_t)retry_sec * 1000
                                          : backoff_delay_ms(ENROLL_RENEW_RETRY_MIN_MS, ENROLL_RENEW_RETRY_MAX_MS,
                                                             e->renew_failures, (uint32_t)random());

        e->renew_failures++;
        renew_schedule(e, now_sec() + (int64_t)((delay_ms + 999) / 1000));
}

static void on_renew_answer(int error, unsigned code, const uint8_t *data, size_t len, uint32_t retry_sec,
                            void *userdata) {
        Enroll *e = userdata;
        const char *id = e->renew_req.id ? e->renew_req.id : "?";
        _cleanup_free_ char *pem = NULL, *key_pem = NULL;
        char text[320];
        CertInfo info;
        int r;

        e->renew_inflight = false;
        if (e->renew_discard) {
                e->renew_discard = false;
                log_struct(LOG_INFO, &(LogFields){ .device_id = id },
                           "Dropped the answer to a renewal of '%s' sent before the device enrolled again", id);
                request_done(&e->renew_req);
                arm_renewal(e, false);
                return;
        }
        e->last_renewal_at = now_sec();
        if (error == -ENOTCONN) {
                /* The same request on the next connection. */
                e->renew_due = true;
                return;
        }
        if (error < 0) {
                e->last_renewal_ok = false;
                snprintf(e->last_renewal_error, sizeof(e->last_renewal_error), "no answer: %s", strerror(-error));
                log_struct(LOG_WARNING, &(LogFields){ .device_id = id }, "Renewing the certificate of '%s' failed: %s",
                           id, e->last_renewal_error);
                renew_retry(e, 0);
                return;
        }
        if (code == COAP_RESPONSE_CODE(201)) {
                r = parse_issued(&e->renew_req, e->config->enroll_device_ca_file, (const char *)data, len, &pem,
                                 &info, text, sizeof(text));
                if (r == 0)
                        r = csr_key_pem(e->renew_req.key, &key_pem);
                if (r == 0) {
                        r = certfile_install(e->config->key_file, e->config->cert_file, key_pem, pem);
                        if (r < 0)
                                snprintf(text, sizeof(text), "cannot install the new key and certificate: %s",
                                         strerror(-r));
                        explicit_bzero(key_pem, strlen(key_pem));
                }
                if (r < 0) {
                        e->last_renewal_ok = false;
                        snprintf(e->last_renewal_error, sizeof(e->last_renewal_error), "%s", text);
                        log_struct(LOG_ERR, &(LogFields){ .device_id = id },
                                   "Renewing the certificate of '%s' failed: %s", id, text);
                        request_done(&e->renew_req);
                        renew_retry(e, 0);
                        return;
                }
                e->last_renewal_ok = true;
                e->last_renewal_error[0] = 0;
                log_struct(LOG_NOTICE, &(LogFields){ .device_id = id },
                           "Renewed the certificate of '%s' with a new key: valid until %s; the connection "
                           "stays, the next one uses it",
                           id, fmt_time(info.not_after, (char[32]){}));
                request_done(&e->renew_req);
                read_cert(e);
                arm_renewal(e, true);
                return;
        }
        answer_text((const char *)data, len, text, sizeof(text));
        e->last_renewal_ok = false;
        snprintf(e->last_renewal_error, sizeof(e->last_renewal_error), "%u.%02u %s", code >> 5, code & 0x1f,
                 text[0] ? text : "(no reason given)");
        if (code == COAP_RESPONSE_CODE(429) || code == COAP_RESPONSE_CODE(503)) {
                /* Asked again unchanged: same key, same CSR. */
                log_struct(LOG_INFO, &(LogFields){ .device_id = id },
                           "Renewing the certificate of '%s': the cloud answered %s; asking again in %" PRIu32 " s",
                           id, e->last_renewal_error, retry_sec);
                e->renew_failures++;
                renew_schedule(e, now_sec() + retry_sec);
                return;
        }
        log_struct(LOG_WARNING, &(LogFields){ .device_id = id }, "Renewing the certificate of '%s' failed: %s", id,
                   e->last_renewal_error);
        request_done(&e->renew_req);
        renew_retry(e, 0);
}

static void renew_send(Enroll *e) {
        EVP_PKEY *key = NULL;
        int r;

        if (e->renew_inflight)
                return;
        /* Too late to renew: re-enroll (at the renewal time of an expired
         * certificate, or at its expiry, below). */
        read_cert(e);
        if (e->have_cert && e->cert.not_after <= now_sec()) {
                e->renew_due = false;
                (void)reenroll_begin(e);
                return;
        }
        if (!conn_is_connected(e->conn)) {
                /* Sent once connected; if no connection comes before the
                 * certificate expires, the timer re-enrolls then. */
                e->renew_due = true;
                if (e->have_cert)
                        renew_schedule(e, e->cert.not_after);
                return;
        }
        e->renew_due = false;
        if (!e->renew_req.body) {
                read_cert(e);
                if (!e->have_cert || !e->cert.id[0]) {
                        log_warning("Cannot renew: no certificate with a device ID in '%s'", e->config->cert_file);
                        return;
                }
                r = csr_key_generate(&key);
                if (r == 0)
                        r = request_make(&e->renew_req, key, true, e->cert.id, NULL);
                if (r < 0) {
                        log_error_errno(r, "Cannot make a certificate request to renew: %m");
                        renew_retry(e, 0);
                        return;
                }
                log_struct(LOG_INFO, &(LogFields){ .device_id = e->cert.id },
                           "Renewing the certificate of '%s' (valid until %s) with a new key", e->cert.id,
                           fmt_time(e->cert.not_after, (char[32]){}));
        }
        r = conn_request(e->conn, COAP_REQUEST_CODE_POST, ENROLL_RENEW_PATH, NULL, e->renew_req.body,
                         strlen(e->renew_req.body), PROTO_CF_JSON, ENROLL_RENEW_TIMEOUT_MS, on_renew_answer, e);
        if (r == -ENOTCONN) {
                e->renew_due = true;
                return;
        }
        if (r < 0) {
                log_warning_errno(r, "Cannot send the renewal request: %m");
                renew_retry(e, 0);
                return;
        }
        e->renew_inflight = true;
}

static int on_renew_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        renew_send(userdata);
        return 0;
}

void enroll_connection_changed(Enroll *e, bool connected) {
        if (connected && e->renew_due && e->config->enroll_renew)
                renew_send(e);
}

/* --- life ---------------------------------------------------------------- */

int enroll_new(sd_event *event, Conn *conn, const Config *cfg, const EnrollHooks *hooks, Enroll **ret) {
        _cleanup_(enroll_freep) Enroll *e = calloc(1, sizeof(Enroll));
        int r;

        if (!e)
                return -ENOMEM;
        e->event = sd_event_ref(event);
        e->conn = conn;
        e->config = cfg;
        e->hooks = *hooks;
        e->jitter = (uint32_t)random();
        r = resolver_new(event, ENROLL_RESOLVE_SIGNAL, on_resolved, e, &e->resolver);
        if (r >= 0)
                r = sd_event_add_defer(event, &e->send_source, on_send, e);
        if (r >= 0)
                r = sd_event_add_defer(event, &e->finish_source, on_finish, e);
        if (r >= 0)
                r = sd_event_add_time(event, &e->timer_source, CLOCK_MONOTONIC, 0, 10000, on_enroll_timer, e);
        if (r >= 0)
                r = sd_event_add_time(event, &e->renew_source, CLOCK_REALTIME, 0, 1000000, on_renew_timer, e);
        if (r < 0)
                return r;
        sd_event_source_set_enabled(e->send_source, SD_EVENT_OFF);
        sd_event_source_set_enabled(e->finish_source, SD_EVENT_OFF);
        sd_event_source_set_enabled(e->timer_source, SD_EVENT_OFF);
        sd_event_source_set_enabled(e->renew_source, SD_EVENT_OFF);
        /* libcoap's socket work before handling what it reported. */
        sd_event_source_set_priority(e->finish_source, SD_EVENT_PRIORITY_IDLE);
        *ret = TAKE_PTR(e);
        return 0;
}

Enroll *enroll_free(Enroll *e) {
        if (!e)
                return NULL;
        attempt_stop(e);
        resolver_free(e->resolver);
        watches_stop(e);
        sd_event_source_disable_unref(e->send_source);
        sd_event_source_disable_unref(e->finish_source);
        sd_event_source_disable_unref(e->timer_source);
        sd_event_source_disable_unref(e->renew_source);
        request_done(&e->enroll_req);
        request_done(&e->renew_req);
        secret_free(e->token);
        free(e->ca_file);
        sd_event_unref(e->event);
        free(e);
        return NULL;
}

/* Enroll with the token of TokenFile= if there is one: 1 if an attempt
 * began, 0 if not (no file, no token in it, or refused at once: said in
 * the log). */
static int enroll_from_token_file(Enroll *e) {
        _cleanup_(secret_freep) char *token = NULL;
        char error[512];
        mode_t mode = 0;
        int r;

        if (!e->config->enroll_token_file)
                return 0;
        r = read_token(e->config->enroll_token_file, &token, &mode);
        if (r != -ENOENT && (mode & S_IROTH) && !e->token_mode_warned) {
                /* Once: the agent does not change files in /etc. */
                log_warning("The provisioning token file '%s' is readable by every user (mode %04o): it is a "
                            "secret that can enroll devices; chmod o-r it (the packaged way: install -m 0640 -g "
                            "tether)",
                            e->config->enroll_token_file, (unsigned)(mode & 07777));
                e->token_mode_warned = true;
        }
        if (r < 0 && r != -ENOENT)
                log_warning_errno(r == -ENODATA ? -EINVAL : r, "Cannot read a token from '%s': %s",
                                  e->config->enroll_token_file, r == -ENODATA ? "no token in it" : strerror(-r));
        if (r < 0)
                return 0;
        if (token_check(token) < 0) {
                log_warning("The token in '%s' is not printable ASCII of at most %d bytes",
                            e->config->enroll_token_file, ENROLL_TOKEN_MAX);
                return 0;
        }
        r = enroll_begin(e, token, NULL, error, sizeof(error));
        if (r <= 0) {
                log_error("Cannot enroll: %s", error);
                return 0;
        }
        secret_free(e->token); /* a token refused before, or the one of an attempt this one replaced */
        e->token = TAKE_PTR(token);
        return 1;
}

static void watches_stop(Enroll *e) {
        e->token_watch = sd_event_source_disable_unref(e->token_watch);
        e->cert_watch = sd_event_source_disable_unref(e->cert_watch);
}

static bool event_names(const struct inotify_event *ev, const char *path) {
        const char *name = strrchr(path, '/');

        name = name ? name + 1 : path;
        return (ev->mask & (IN_CLOSE_WRITE | IN_MOVED_TO)) && ev->len > 0 && streq(ev->name, name);
}

/* While not enrolled, a token written into TokenFile= (an image's first
 * boot provisioning it late, an operator dropping it in) is used at once:
 * the directory is watched for the file being written or moved in. */
static int on_token_dir(sd_event_source *s, const struct inotify_event *ev, void *userdata) {
        Enroll *e = userdata;

        /* The name comes from the config of now (a reload may have
         * changed or removed TokenFile=). */
        if (!e->config->enroll_token_file || !event_names(ev, e->config->enroll_token_file))
                return 0;
        if (e->state != ENROLL_WAITING && e->state != ENROLL_FAILED)
                return 0;
        log_info("A provisioning token appeared in '%s'", e->config->enroll_token_file);
        (void)enroll_from_token_file(e);
        return 0;
}

/* Likewise a certificate installed by hand (README.md, "Enrollment": the
 * operator's CA signed the device's CSR): connect with it at once. */
static int on_cert_dir(sd_event_source *s, const struct inotify_event *ev, void *userdata) {
        Enroll *e = userdata;

        if (!event_names(ev, e->config->cert_file))
                return 0;
        if (e->state != ENROLL_WAITING && e->state != ENROLL_FAILED)
                return 0;
        read_cert(e);
        if (!e->have_cert)
                return 0;
        log_struct(LOG_NOTICE, &(LogFields){ .device_id = e->cert.id },
                   "A certificate for device '%s' appeared in '%s'; connecting with it", e->cert.id,
                   e->config->cert_file);
        e->state = ENROLL_NONE;
        watches_stop(e);
        arm_renewal(e, false);
        if (e->hooks.enrolled)
                e->hooks.enrolled(e->hooks.userdata, e->cert.id);
        return 0;
}

/* Watch the directory of path for it being written or moved in. */
static void dir_watch(Enroll *e, const char *path, sd_event_source **ret,
                      sd_event_inotify_handler_t handler, const char *what) {
        _cleanup_free_ char *dir = NULL;
        const char *slash = strrchr(path, '/');
        int r;

        *ret = sd_event_source_disable_unref(*ret);
        dir = slash ? strndup(path, (size_t)(slash - path)) : strdup(".");
        if (!dir)
                return;
        if (!*dir) {
                free(dir);
                dir = strdup("/");
                if (!dir)
                        return;
        }
        r = sd_event_add_inotify(e->event, ret, dir, IN_CLOSE_WRITE | IN_MOVED_TO | IN_ONLYDIR, handler, e);
        if (r < 0)
                log_warning_errno(r, "Cannot watch '%s' for %s (restart tetherd once it is there): %m", dir, what);
}

int enroll_start(Enroll *e) {
        CertfileRecovery rec = CERTFILE_NOTHING;
        int r;

        r = certfile_recover(e->config->key_file, e->config->cert_file, &rec);
        if (r < 0)
                log_warning_errno(r, "Cannot look for a key and certificate left by an interrupted install of '%s': %m",
                                  e->config->cert_file);
        else if (rec == CERTFILE_COMPLETED)
                log_notice("Completed the install of a new key and certificate '%s' that was interrupted",
                           e->config->cert_file);
        else if (rec == CERTFILE_DISCARDED)
                log_notice("Removed an incomplete new key or certificate next to '%s' (an interrupted install); "
                           "the files in place are kept",
                           e->config->cert_file);
        read_cert(e);
        if (e->have_cert || access(e->config->cert_file, F_OK) == 0) {
                arm_renewal(e, false);
                /* Expired: re-enroll by the key (the connection attempts
                 * meanwhile are refused; hooks->enrolled() connects with
                 * the new certificate). */
                if (e->have_cert && e->cert.not_after <= now_sec() && reenroll_begin(e) == 0)
                        log_struct(LOG_WARNING, &(LogFields){ .device_id = e->cert.id },
                                   "The certificate of '%s' in '%s' expired at %s: the cloud will refuse it; "
                                   "enroll again (tetherctl enroll --force --token TOKEN)",
                                   e->cert.id, e->config->cert_file, fmt_time(e->cert.not_after, (char[32]){}));
                return 1;
        }
        if (e->config->enroll_token_file)
                dir_watch(e, e->config->enroll_token_file, &e->token_watch, on_token_dir, "a provisioning token");
        dir_watch(e, e->config->cert_file, &e->cert_watch, on_cert_dir, "a certificate");
        if (enroll_from_token_file(e) > 0)
                return 0;
        e->state = ENROLL_WAITING;
        if (e->config->enroll_token_file) {
                set_status(e,
                           "Not enrolled: no certificate '%s'; put a provisioning token in '%s' (it is used as "
                           "soon as it is there), or run 'tetherctl enroll --token TOKEN'",
                           e->config->cert_file, e->config->enroll_token_file);
        } else
                set_status(e,
                           "Not enrolled: no certificate '%s'; run 'tetherctl enroll --token TOKEN' (or set [Enroll] "
                           "TokenFile=)",
                           e->config->cert_file);
        log_notice("%s", "Not enrolled: waiting for a provisioning token (tetherctl enroll, [Enroll] TokenFile=)");
        return 0;
}

void enroll_reconfigure(Enroll *e, const Config *cfg) {
        bool waiting = e->state == ENROLL_WAITING;

        e->config = cfg;
        /* The watch follows TokenFile= (on_token_dir() takes the file's
         * name from the config): to its new directory, or away. A device
         * waiting for a token uses one already in the new file. */
        if (e->token_watch || waiting) {
                if (cfg->enroll_token_file)
                        dir_watch(e, cfg->enroll_token_file, &e->token_watch, on_token_dir, "a provisioning token");
                else
                        e->token_watch = sd_event_source_disable_unref(e->token_watch);
        }
        if (e->cert_watch || waiting)
                dir_watch(e, cfg->cert_file, &e->cert_watch, on_cert_dir, "a certificate");
        if (waiting && cfg->enroll_token_file && enroll_from_token_file(e) > 0)
                return;
        if (e->state == ENROLL_RUNNING || e->state == ENROLL_RETRY)
                return;
        read_cert(e);
        if (!cfg->enroll_renew) {
                /* Renew=no: nothing more is sent (an answer in flight is
                 * still installed). */
                sd_event_source_set_enabled(e->renew_source, SD_EVENT_OFF);
                e->renew_due = false;
                e->renew_failures = 0;
                if (!e->renew_inflight)
                        request_done(&e->renew_req);
                return;
        }
        /* A renewal under way (in flight, waiting for Max-Age or for its
         * backoff after a failure) keeps its schedule: arming again would
         * send at once at every reload and forget the backoff. */
        if (!e->renew_inflight && !e->renew_req.body && e->renew_failures == 0)
                arm_renewal(e, false);
}

static const char *state_name(const Enroll *e) {
        switch (e->state) {
        case ENROLL_WAITING:
                return "not-enrolled";
        case ENROLL_RUNNING:
                return "enrolling";
        case ENROLL_RETRY:
                return e->asked_again ? "enrolling" : "retrying";
        case ENROLL_FAILED:
                return "failed";
        case ENROLL_DONE:
                return "enrolled";
        default:
                return "none";
        }
}

json_t *enroll_status(Enroll *e) {
        json_t *cert = json_null(), *enr, *last = json_null();

        if (e->last_renewal_at > 0)
                last = json_pack("{s:I, s:s, s:s*}", "at", (json_int_t)e->last_renewal_at, "result",
                                 e->last_renewal_ok ? "ok" : "failed", "error",
                                 e->last_renewal_ok ? NULL : e->last_renewal_error);
        if (e->have_cert)
                cert = json_pack("{s:s, s:I, s:I, s:I, s:I, s:b, s:b, s:o*}", "device_id", e->cert.id, "not_before",
                                 (json_int_t)e->cert.not_before, "not_after", (json_int_t)e->cert.not_after,
                                 "renew_after", (json_int_t)e->renew_after, "renew_at",
                                 (json_int_t)(e->renew_failures > 0 || e->renew_req.body ? e->renew_retry_at
                                                                                         : e->renew_at),
                                 "renew", e->config->enroll_renew, "renewing",
                                 e->renew_inflight || e->renew_due, "last_renewal", last);
        else
                json_decref(last);
        enr = json_pack("{s:s, s:i, s:i, s:s*, s:s*}", "state", state_name(e), "generation",
                        (int)e->generation, "attempts", (int)e->attempts, "device_id", e->enroll_req.id, "error",
                        e->error[0] ? e->error : NULL);
        if (enr && e->state == ENROLL_RETRY)
                json_object_set_new(enr, "retry_at", json_integer((json_int_t)e->retry_at));
        return json_pack("{s:o, s:o}", "certificate", cert ? cert : json_null(), "enrollment",
                         enr ? enr : json_null());
}
