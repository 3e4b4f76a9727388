/* SPDX-License-Identifier: Apache-2.0 */
/* The webhook sink of the outbound integrations (integrations.h,
 * docs/integrations.md): each event is one HTTP POST of its JSON body to
 * the integration's URL=, signed with HMAC-SHA256 under Secret=.
 *
 * libcurl's multi interface runs on the sd-event loop (lib/curl-event.h);
 * after each curl_multi_socket_action() finish_transfers() reports the
 * finished transfers. The multi handle keeps its connections alive between requests (at most
 * WEBHOOK_WINDOW to the receiver), so a steady flow of events costs one
 * TLS handshake, not one per event.
 *
 * Guarantees: at most WEBHOOK_WINDOW requests in flight (send() says
 * -EAGAIN past that); integration_sent() exactly once per request taken,
 * always from a loop callback after libcurl returned, never from send()
 * or free(); a 2xx status is the only success; redirects are not
 * followed; only http and https; http:// (loopback) never through a
 * proxy; certificates are verified (CAFile= or
 * the system's CAs); the response body is read and dropped, at most
 * WEBHOOK_RESPONSE_MAX bytes of it (past that the connection is closed;
 * the status decides). The secret and the URL's user:password never
 * leave this file except in the requests themselves. */
#include "config.h"

#include <curl/curl.h>
#include <errno.h>
#include <inttypes.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "curl-event.h"
#include "integrations.h"
#include "log.h"
#include "util.h"

#define WEBHOOK_WINDOW 8
#define WEBHOOK_RESPONSE_MAX (64 * 1024)
#define WEBHOOK_CONNECT_TIMEOUT_SEC 10u
#define WEBHOOK_TIMEOUT_DEFAULT_SEC 10u
#define WEBHOOK_KEY_MAX 64 /* idempotency keys are "<16 hex digits>-<id>" */
#define WEBHOOK_SIGNATURE_PREFIX "sha256="

typedef struct Webhook Webhook;

/* One slot of the window: its easy handle is made once and reused, so
 * its options are set once too. */
typedef struct Request {
        Webhook *w;
        CURL *easy;
        bool busy;
        uint64_t id;
        struct curl_slist *headers;
        size_t received; /* bytes of the response body seen (and dropped) */
        bool too_large;
        char errbuf[CURL_ERROR_SIZE];
} Request;

struct Webhook {
        const IntegrationConfig *config;
        Integration *owner;
        CurlEvent *curl;
        CURLM *multi; /* the CurlEvent's */
        Request requests[WEBHOOK_WINDOW];
        unsigned in_flight;
        unsigned timeout_sec;
        bool curl_global;
        char *url_shown; /* URL= without user:password */
};

static unsigned connect_timeout_sec(const Webhook *w) {
        return w->timeout_sec < WEBHOOK_CONNECT_TIMEOUT_SEC ? w->timeout_sec : WEBHOOK_CONNECT_TIMEOUT_SEC;
}

/* HMAC-SHA256(secret, body) in lower-case hex. */
static int webhook_sign(const char *secret, const char *body, size_t len, char out[static 65]) {
        unsigned char mac[EVP_MAX_MD_SIZE];
        unsigned n = 0;

        if (!HMAC(EVP_sha256(), secret, (int)strlen(secret), (const unsigned char *)body, len, mac, &n) || n != 32)
                return -EIO;
        hex_encode(mac, 32, out);
        return 0;
}

/* The key goes into two header lines: it must not be able to end one. */
static bool key_ok(const char *key) {
        size_t n = strlen(key);

        if (n == 0 || n > WEBHOOK_KEY_MAX)
                return false;
        for (size_t i = 0; i < n; i++)
                if (!((key[i] >= '0' && key[i] <= '9') || (key[i] >= 'a' && key[i] <= 'z') ||
                      (key[i] >= 'A' && key[i] <= 'Z') || key[i] == '-'))
                        return false;
        return true;
}

/* The response body: counted and dropped. */
static size_t on_write(char *ptr, size_t size, size_t n, void *userdata) {
        Request *q = userdata;
        size_t len = size * n;

        if (len > WEBHOOK_RESPONSE_MAX - q->received) {
                q->too_large = true;
                return 0; /* ends the transfer (CURLE_WRITE_ERROR) */
        }
        q->received += len;
        return len;
}

/* A reason for people, cut to what the core keeps. */
static void say(char why[static INTEGRATION_ERROR_MAX], const char *fmt, ...) _printf_(2, 3);
static void say(char why[static INTEGRATION_ERROR_MAX], const char *fmt, ...) {
        va_list ap;

        va_start(ap, fmt);
        vsnprintf(why, INTEGRATION_ERROR_MAX, fmt, ap);
        va_end(ap);
}

/* A finished transfer's outcome: 0, or a negative errno and why. */
static int outcome(Webhook *w, Request *q, CURLcode result, char why[static INTEGRATION_ERROR_MAX]) {
        const char *text = q->errbuf[0] ? q->errbuf : curl_easy_strerror(result);
        long status = 0, os_errno = 0;

        curl_easy_getinfo(q->easy, CURLINFO_RESPONSE_CODE, &status);
        why[0] = 0;
        /* A receiver that said 2xx has the event, even if what it said
         * after the status line was too long to read. */
        if (result == CURLE_OK || (result == CURLE_WRITE_ERROR && q->too_large && status > 0)) {
                if (status >= 200 && status <= 299)
                        return 0;
                if (status >= 300 && status <= 399)
                        say(why, "HTTP %ld (redirects are not followed)", status);
                else
                        say(why, "HTTP %ld", status);
                return -EREMOTEIO;
        }
        switch (result) {
        case CURLE_OPERATION_TIMEDOUT: {
                curl_off_t connected = 0;

                curl_easy_getinfo(q->easy, CURLINFO_CONNECT_TIME_T, &connected);
                if (connected == 0)
                        say(why, "connecting timed out after %u s", connect_timeout_sec(w));
                else
                        say(why, "timed out after %u s", w->timeout_sec);
                return -ETIMEDOUT;
        }
        case CURLE_COULDNT_CONNECT:
                curl_easy_getinfo(q->easy, CURLINFO_OS_ERRNO, &os_errno);
                if (os_errno == ECONNREFUSED) {
                        say(why, "connection refused");
                        return -ECONNREFUSED;
                }
                say(why, "cannot connect: %s", text);
                return os_errno > 0 ? -(int)os_errno : -ECONNREFUSED;
        case CURLE_COULDNT_RESOLVE_HOST:
                say(why, "%s", text);
                return -EHOSTUNREACH;
        case CURLE_PEER_FAILED_VERIFICATION:
        case CURLE_SSL_CONNECT_ERROR:
        case CURLE_SSL_CERTPROBLEM:
        case CURLE_SSL_CIPHER:
        case CURLE_SSL_CACERT_BADFILE:
        case CURLE_SSL_ISSUER_ERROR:
        case CURLE_SSL_PINNEDPUBKEYNOTMATCH:
        case CURLE_SSL_INVALIDCERTSTATUS:
        case CURLE_SSL_CRL_BADFILE:
        case CURLE_SSL_ENGINE_INITFAILED:
                if (startswith(text, "SSL certificate problem: "))
                        text += strlen("SSL certificate problem: ");
                say(why, "TLS: %s", text);
                return -EACCES;
        case CURLE_WRITE_ERROR:
                if (q->too_large) {
                        say(why, "response too large");
                        return -EFBIG;
                }
                break;
        case CURLE_GOT_NOTHING:
        case CURLE_RECV_ERROR:
        case CURLE_SEND_ERROR:
                say(why, "%s", text);
                return -ECONNRESET;
        case CURLE_OUT_OF_MEMORY:
                say(why, "out of memory");
                return -ENOMEM;
        default:
                break;
        }
        say(why, "%s", text);
        return -EIO;
}

/* Report every finished transfer. Called after curl_multi_socket_action()
 * returned, so integration_sent() may make the core call send() again. */
static void finish_transfers(void *userdata) {
        Webhook *w = userdata;
        CURLMsg *msg;
        int left;

        while ((msg = curl_multi_info_read(w->multi, &left))) {
                CURL *easy = msg->easy_handle;
                CURLcode result = msg->data.result;
                char why[INTEGRATION_ERROR_MAX];
                Request *q = NULL;
                uint64_t id;
                int r;

                if (msg->msg != CURLMSG_DONE)
                        continue;
                curl_easy_getinfo(easy, CURLINFO_PRIVATE, (char **)&q);
                if (!q || !q->busy)
                        continue;
                r = outcome(w, q, result, why);
                /* msg is gone after this. */
                curl_multi_remove_handle(w->multi, easy);
                curl_easy_setopt(easy, CURLOPT_HTTPHEADER, NULL);
                curl_slist_free_all(q->headers);
                q->headers = NULL;
                q->busy = false;
                w->in_flight--;
                id = q->id;
                if (r < 0)
                        log_debug("Webhook '%s': event %" PRIu64 " failed: %s", w->config->name, id, why);
                integration_sent(w->owner, id, r, r < 0 ? why : NULL);
        }
}

static int request_setup(Webhook *w, Request *q) {
        q->w = w;
        q->easy = curl_easy_init();
        if (!q->easy)
                return -ENOMEM;
#define SET(opt, val) \
        do { \
                if (curl_easy_setopt(q->easy, opt, val) != CURLE_OK) \
                        return -EIO; \
        } while (0)
        SET(CURLOPT_URL, w->config->url);
        SET(CURLOPT_PROTOCOLS_STR, "http,https");
        SET(CURLOPT_FOLLOWLOCATION, 0L);
        /* http:// is only for a receiver on this machine (loopback,
         * integration_config_check()): never through a proxy of the
         * environment, which would see the events and the URL's
         * credentials in clear text. https:// may use one (CONNECT). */
        if (strncasecmp(w->config->url, "http://", strlen("http://")) == 0)
                SET(CURLOPT_PROXY, "");
        SET(CURLOPT_POST, 1L);
        SET(CURLOPT_NOSIGNAL, 1L);
        SET(CURLOPT_TIMEOUT, (long)w->timeout_sec);
        SET(CURLOPT_CONNECTTIMEOUT, (long)connect_timeout_sec(w));
        SET(CURLOPT_SSL_VERIFYPEER, 1L);
        SET(CURLOPT_SSL_VERIFYHOST, 2L);
        SET(CURLOPT_SSLVERSION, (long)CURL_SSLVERSION_TLSv1_2);
        if (w->config->ca_file) {
                SET(CURLOPT_CAINFO, w->config->ca_file);
                SET(CURLOPT_CAPATH, NULL);
        }
        SET(CURLOPT_USERAGENT, "tether-cloudd/" PACKAGE_VERSION);
        SET(CURLOPT_ERRORBUFFER, q->errbuf);
        SET(CURLOPT_WRITEFUNCTION, on_write);
        SET(CURLOPT_WRITEDATA, q);
        SET(CURLOPT_PRIVATE, q);
#undef SET
        return 0;
}

/* The header lines of one request; NULL on OOM. */
static struct curl_slist *request_headers(Webhook *w, const char *key, const char *signature) {
        char line[128 + INTEGRATION_NAME_MAX + WEBHOOK_KEY_MAX];
        struct curl_slist *h = NULL, *t;

#define ADD(...) \
        do { \
                snprintf(line, sizeof(line), __VA_ARGS__); \
                t = curl_slist_append(h, line); \
                if (!t) { \
                        curl_slist_free_all(h); \
                        return NULL; \
                } \
                h = t; \
        } while (0)
        ADD("Content-Type: application/json");
        ADD("X-Tether-Webhook: %s", w->config->name);
        ADD("X-Tether-Event-Id: %s", key);
        ADD("Idempotency-Key: %s", key);
        ADD("X-Tether-Signature: " WEBHOOK_SIGNATURE_PREFIX "%s", signature);
        /* No "Expect: 100-continue" round trip for bodies over 1 KiB. */
        ADD("Expect:");
#undef ADD
        return h;
}

static int sink_webhook_send(void *sink, uint64_t id, const char *key, const ProtoEvent *e, const char *body,
                             size_t len) {
        Webhook *w = sink;
        char signature[65];
        Request *q = NULL;
        int r;

        if (w->in_flight >= WEBHOOK_WINDOW)
                return -EAGAIN;
        if (!key_ok(key))
                return -EINVAL;
        for (size_t i = 0; i < ELEMENTSOF(w->requests); i++)
                if (!w->requests[i].busy) {
                        q = &w->requests[i];
                        break;
                }
        if (!q)
                return -EAGAIN;
        r = webhook_sign(w->config->secret, body, len, signature);
        if (r < 0)
                return r;
        q->headers = request_headers(w, key, signature);
        if (!q->headers)
                return -ENOMEM;
        q->errbuf[0] = 0;
        q->received = 0;
        q->too_large = false;
        q->id = id;
        /* The body is copied: the caller's is valid during this call only. */
        if (curl_easy_setopt(q->easy, CURLOPT_HTTPHEADER, q->headers) != CURLE_OK ||
            curl_easy_setopt(q->easy, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)len) != CURLE_OK ||
            curl_easy_setopt(q->easy, CURLOPT_COPYPOSTFIELDS, body) != CURLE_OK) {
                r = -ENOMEM;
                goto fail;
        }
        /* libcurl starts the transfer from the timer it arms here (after
         * 0 ms, on the loop), so nothing finishes inside send(). */
        if (curl_multi_add_handle(w->multi, q->easy) != CURLM_OK) {
                r = -EIO;
                goto fail;
        }
        q->busy = true;
        w->in_flight++;
        return 0;
fail:
        curl_easy_setopt(q->easy, CURLOPT_HTTPHEADER, NULL);
        curl_slist_free_all(q->headers);
        q->headers = NULL;
        return r;
}

static void sink_webhook_free(void *sink) {
        Webhook *w = sink;

        if (!w)
                return;
        /* No integration_sent() from here: the owner is going away. */
        for (size_t i = 0; i < ELEMENTSOF(w->requests); i++) {
                Request *q = &w->requests[i];

                if (q->easy) {
                        if (q->busy && w->multi)
                                curl_multi_remove_handle(w->multi, q->easy);
                        curl_easy_cleanup(q->easy);
                }
                curl_slist_free_all(q->headers);
        }
        /* Closes the kept-alive connections. */
        curl_event_free(w->curl);
        if (w->curl_global)
                curl_global_cleanup();
        free(w->url_shown);
        free(w);
}

static void webhook_freep(Webhook **w) {
        sink_webhook_free(*w);
}

/* url without its user:password part, for people. */
static int url_without_credentials(const char *url, char **ret) {
        CURLU *u = curl_url();
        char *s = NULL;
        int r = -EINVAL;

        if (!u)
                return -ENOMEM;
        if (curl_url_set(u, CURLUPART_URL, url, 0) == CURLUE_OK &&
            curl_url_set(u, CURLUPART_USER, NULL, 0) == CURLUE_OK &&
            curl_url_set(u, CURLUPART_PASSWORD, NULL, 0) == CURLUE_OK &&
            curl_url_get(u, CURLUPART_URL, &s, 0) == CURLUE_OK) {
                *ret = strdup(s);
                r = *ret ? 0 : -ENOMEM;
        }
        curl_free(s);
        curl_url_cleanup(u);
        return r;
}

static int sink_webhook_new(sd_event *event, const IntegrationConfig *config, const char *node, Integration *owner,
                            void **ret) {
        _cleanup_(webhook_freep) Webhook *w = NULL;
        int r;

        if (!config->url || !config->secret)
                return log_error_errno(-EINVAL, "Webhook '%s': URL= and Secret= are required.", config->name);
        w = calloc(1, sizeof(Webhook));
        if (!w)
                return log_error_errno(-ENOMEM, "Webhook '%s': out of memory.", config->name);
        w->config = config;
        w->owner = owner;
        w->timeout_sec = config->timeout_sec > 0 ? config->timeout_sec : WEBHOOK_TIMEOUT_DEFAULT_SEC;
        if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
                return log_error_errno(-EIO, "Webhook '%s': libcurl cannot start.", config->name);
        w->curl_global = true;
        r = url_without_credentials(config->url, &w->url_shown);
        if (r < 0)
                return log_error_errno(r, "Webhook '%s': cannot parse URL=.", config->name);
        r = curl_event_new(event, finish_transfers, w, &w->curl);
        if (r < 0)
                return log_error_errno(r, "Webhook '%s': cannot set up libcurl: %m", config->name);
        w->multi = curl_event_multi(w->curl);
        if (curl_multi_setopt(w->multi, CURLMOPT_MAX_HOST_CONNECTIONS, (long)WEBHOOK_WINDOW) != CURLM_OK ||
            /* Keep the window's connections when the transfers end (by
             * default the cache shrinks with the transfers). */
            curl_multi_setopt(w->multi, CURLMOPT_MAXCONNECTS, (long)WEBHOOK_WINDOW) != CURLM_OK)
                return log_error_errno(-EIO, "Webhook '%s': cannot set up libcurl.", config->name);
        for (size_t i = 0; i < ELEMENTSOF(w->requests); i++) {
                r = request_setup(w, &w->requests[i]);
                if (r < 0)
                        return log_error_errno(r, "Webhook '%s': cannot set up libcurl: %m", config->name);
        }
        log_debug("Webhook '%s': posting to '%s'.", config->name, w->url_shown);
        *ret = TAKE_PTR(w);
        return 0;
}

static void sink_webhook_describe(void *sink, json_t *obj) {
        Webhook *w = sink;

        json_object_set_new(obj, "url", json_string(w->url_shown));
        json_object_set_new(obj, "in_flight", json_integer(w->in_flight));
}

const SinkOps sink_webhook_ops = {
        .kind = "webhook",
        .new = sink_webhook_new,
        .free = sink_webhook_free,
        .send = sink_webhook_send,
        .describe = sink_webhook_describe,
};
