/* SPDX-License-Identifier: Apache-2.0 */
/* tether: the user CLI for tether-cloudd's HTTP API (Particle Cloud API
 * shapes, docs/protocol.md). One libcurl easy handle per run, jansson for
 * JSON. docs/cli.md is the user's reference, including the exit codes.
 *
 * Every failure is reported as exactly one line "tether: <reason>" on
 * stderr; stdout carries only results, so scripts can consume it. */
#include <curl/curl.h>
#include <getopt.h>
#include <inttypes.h>
#include <jansson.h>
#include <limits.h>
#include <signal.h>
#include <time.h>

#include "log.h"
#include "proto.h"
#include "tether-cli.h"
#include "util.h"

#define TETHER_DEFAULT_API "http://127.0.0.1:8080"
#define TETHER_DEFAULT_TIMEOUT_MS 30000L /* above the cloud's 10 s call timeout */
#define TETHER_CONNECT_TIMEOUT_MS 10000L
#define TETHER_SSE_EVENT_MAX (1u << 20)  /* bytes of one event's data lines */
/* The cloud sends a keepalive comment every 10 s; 45 s without one (four
 * missed) means the stream is dead even if TCP has not noticed. */
#define TETHER_STREAM_STALL_SEC 45L
/* subscribe --resume: wait before connecting again. */
#define TETHER_RESUME_MIN_MS 100L
#define TETHER_RESUME_MAX_MS 2000L

CliArgs arg = {
        .timeout_ms = -1,
        .ttl = -1,
        .ota_expires = -1,
        .list_connected = -1,
        .list_heard_within = -1,
        .list_not_heard_within = -1,
};

static volatile sig_atomic_t interrupted;

void buffer_done(Buffer *b) {
        free(b->data);
        *b = (Buffer){};
}

/* 0 or -ENOMEM/-EFBIG. Keeps the data NUL terminated. */
int buffer_append(Buffer *b, const char *p, size_t n) {
        if (n > b->max - b->len)
                return -EFBIG;
        if (b->len + n + 1 > b->cap) {
                size_t cap = b->cap ? b->cap : 4096;
                while (cap < b->len + n + 1)
                        cap *= 2;
                char *d = realloc(b->data, cap);
                if (!d)
                        return -ENOMEM;
                b->data = d;
                b->cap = cap;
        }
        memcpy(b->data + b->len, p, n);
        b->len += n;
        b->data[b->len] = '\0';
        return 0;
}

static void api_done(Api *a) {
        curl_slist_free_all(a->headers);
        if (a->curl)
                curl_easy_cleanup(a->curl);
        free(a->base);
        buffer_done(&a->body);
}

/* Exit code for a negative errno returned by a command. */
int exit_code_from_errno(int r) {
        switch (-r) {
        case 0:
                return EXIT_SUCCESS;
        case EINVAL:
        case ENAMETOOLONG:
        case EILSEQ:
        case E2BIG:
                return EXIT_USAGE;
        case ENOENT:
                return EXIT_NOT_FOUND;
        case EHOSTDOWN:
        case EBUSY:
                return EXIT_OFFLINE;
        case ECANCELED:
                return EXIT_NOT_COMMITTED;
        case EOPNOTSUPP:
                return EXIT_NOT_ENABLED;
        case EACCES:
        case EPERM:
                return EXIT_AUTH;
        case ETIMEDOUT:
                return EXIT_TIMEOUT;
        case ECONNREFUSED:
        case EHOSTUNREACH:
        case ECONNABORTED:
                return EXIT_CONNECT;
        default:
                return EXIT_FAILURE_;
        }
}

int name_check(const char *name, ProtoNameKind kind) {
        static const char *const what[] = {
                [PROTO_NAME_FUNCTION] = "function name",
                [PROTO_NAME_VARIABLE] = "variable name",
                [PROTO_NAME_EVENT] = "event name",
                [PROTO_NAME_PREFIX] = "event prefix",
                [PROTO_NAME_PLUGIN] = "plugin name",
        };
        static const char *const rule[] = {
                [PROTO_NAME_FUNCTION] = "[A-Za-z0-9_.-], at most 64 bytes",
                [PROTO_NAME_VARIABLE] = "[A-Za-z0-9_.-], at most 64 bytes",
                [PROTO_NAME_EVENT] = "[A-Za-z0-9_.-/] without empty segments, at most 128 bytes",
                [PROTO_NAME_PREFIX] = "[A-Za-z0-9_.-/] without empty segments, at most 128 bytes",
                [PROTO_NAME_PLUGIN] = "[A-Za-z0-9_-], at most 64 bytes",
        };
        int r = proto_name_check(name, strlen(name), kind);

        if (r < 0) {
                if (kind == PROTO_NAME_DEVICE) /* say whether reserved */
                        log_error("Invalid device ID '%s': %s", name, proto_device_id_problem(r));
                else
                        log_error("Invalid %s '%s': use %s", what[kind], name, rule[kind]);
                return -EINVAL;
        }
        return 0;
}

static int payload_check(const char *s, const char *what) {
        size_t len = strlen(s);

        if (len > PROTO_HARD_PAYLOAD_MAX) {
                log_error("The %s is %zu bytes, more than any cloud accepts (%u)", what, len,
                          PROTO_HARD_PAYLOAD_MAX);
                return -E2BIG;
        }
        if (proto_utf8_check(s, len) < 0) {
                log_error("The %s is not valid UTF-8", what);
                return -EILSEQ;
        }
        return 0;
}

/* Copy server text into one printable line of bounded length: every
 * control character (C0, DEL, and C1 as UTF-8, U+0080..U+009F: U+009B is
 * CSI to some terminals) becomes a blank. The text may be a device's own
 * (a refusal, the reason a stream ended): it does not get to send escape
 * sequences to this terminal. */
void one_line(const char *in, char *out, size_t size) {
        size_t j = 0;

        for (size_t i = 0; in[i] && j + 1 < size; i++) {
                unsigned char c = (unsigned char)in[i];

                if (c == 0xc2 && (unsigned char)in[i + 1] >= 0x80 && (unsigned char)in[i + 1] <= 0x9f) {
                        i++;
                        c = ' ';
                }
                out[j++] = (c < 0x20 || c == 0x7f) ? ' ' : (char)c;
        }
        while (j > 0 && out[j - 1] == ' ')
                j--;
        out[j] = '\0';
}

/* The server's diagnostic: "error_description" (401 and 403), else
 * "error" (plus "info", the device's own text, when there is one), else
 * "message", else the body itself if it is not JSON. */
void error_text(const Buffer *body, char *out, size_t size) {
        const char *e = NULL, *info = NULL;
        _cleanup_free_ char *joined = NULL;
        json_t *j;

        out[0] = '\0';
        if (!body->data || body->len == 0)
                return;
        j = json_loadb(body->data, body->len, 0, NULL);
        if (!j) {
                one_line(body->data, out, size);
                return;
        }
        if (json_is_object(j)) {
                /* OAuth's error is a code ("invalid_token"): its
                 * description says more (expired, revoked, which scope). */
                e = json_string_value(json_object_get(j, "error_description"));
                if (!e && (e = json_string_value(json_object_get(j, "error"))))
                        info = json_string_value(json_object_get(j, "info"));
                else if (!e)
                        e = json_string_value(json_object_get(j, "message"));
        }
        if (e && info && *info && !streq(e, info) && asprintf(&joined, "%s: %s", e, info) >= 0)
                e = joined;
        if (e)
                one_line(e, out, size);
        json_decref(j);
}

/* what: the request's object, for the wording of a 400 ("argument"). */
int http_error(Api *a, const char *what) {
        char text[TETHER_ERROR_TEXT_MAX + 1], detail[TETHER_ERROR_TEXT_MAX + 3] = "";
        long s = a->status;

        error_text(&a->body, text, sizeof(text));
        if (text[0])
                snprintf(detail, sizeof(detail), ": %s", text);

        switch (s) {
        case 400:
                log_error("%s (HTTP 400)%s", what ? what : "Bad request", detail);
                return -EBADMSG;
        case 401:
                if (!arg.token)
                        log_error("No API token given, use --token or TETHER_TOKEN (HTTP 401)%s", detail);
                else
                        log_error("Authentication failed, check the API token (HTTP 401)%s", detail);
                return -EACCES;
        case 403:
                log_error("Forbidden (HTTP 403)%s", detail);
                return -EPERM;
        case 404:
                log_error("Not found (HTTP 404)%s", detail);
                return -ENOENT;
        case 413:
                log_error("Too large (HTTP 413)%s", detail);
                return -EMSGSIZE;
        case 429: {
                /* The cloud's rate limits (docs/cloud.md): which, and when to
                 * try again. */
                json_t *j = a->body.data ? json_loadb(a->body.data, a->body.len, 0, NULL) : NULL;
                const char *why = json_string_value(json_object_get(j, "error_description"));
                json_int_t after = json_integer_value(json_object_get(j, "retry_after"));

                if (why)
                        one_line(why, text, sizeof(text));
                log_error("Rate limited by the cloud (HTTP 429)%s%s; retry in %lld s", why ? ": " : "",
                          why ? text : "", (long long)(after > 0 ? after : 1));
                json_decref(j);
                return -EAGAIN;
        }
        case 501:
                /* A feature the cloud's configuration leaves off, not a
                 * device problem: say so, with the cloud's own hint. */
                log_error("The cloud does not offer this (HTTP 501)%s", detail);
                return -EOPNOTSUPP;
        case 502:
                log_error("The device reported an error (HTTP 502)%s", detail);
                return -EREMOTEIO;
        case 503:
                log_error("Device offline or busy (HTTP 503)%s", detail);
                return -EHOSTDOWN;
        case 504:
                log_error("Timed out waiting for the device (HTTP 504)%s", detail);
                return -ETIMEDOUT;
        default:
                log_error("Request failed (HTTP %ld)%s", s, detail);
                return -EPROTO;
        }
}

int curl_error(Api *a, CURLcode c) {
        const char *why = a->errbuf[0] ? a->errbuf : curl_easy_strerror(c);

        switch (c) {
        case CURLE_COULDNT_CONNECT:
                log_error("Cannot connect to %s: %s", a->base, why);
                return -ECONNREFUSED;
        case CURLE_COULDNT_RESOLVE_HOST:
        case CURLE_COULDNT_RESOLVE_PROXY:
                log_error("Cannot resolve the host of %s: %s", a->base, why);
                return -EHOSTUNREACH;
        case CURLE_OPERATION_TIMEDOUT:
                log_error("Request to %s timed out: %s", a->base, why);
                return -ETIMEDOUT;
        case CURLE_PEER_FAILED_VERIFICATION:
        case CURLE_SSL_ISSUER_ERROR:
                /* The usual cause: a cloud with a certificate from its own
                 * CA (tether-pki), not one the system trusts. */
                if (arg.cacert)
                        log_error("TLS error talking to %s: %s (trusting the CA certificate(s) in '%s')", a->base,
                                  why, arg.cacert);
                else
                        log_error("TLS error talking to %s: %s; if the cloud's certificate is from its own CA, "
                                  "give that CA with --cacert FILE or TETHER_CACERT",
                                  a->base, why);
                return -ECONNABORTED;
        case CURLE_SSL_CACERT_BADFILE:
                if (arg.cacert)
                        log_error("Cannot use the CA certificate(s) in '%s' for %s: %s", arg.cacert, a->base, why);
                else
                        /* A system without a CA bundle (no ca-certificates). */
                        log_error("Cannot use the system's CA certificates for %s: %s; give the cloud's CA with "
                                  "--cacert FILE or TETHER_CACERT",
                                  a->base, why);
                return -ECONNABORTED;
        case CURLE_SSL_CONNECT_ERROR:
        case CURLE_SSL_CERTPROBLEM:
        case CURLE_SSL_CIPHER:
                log_error("TLS error talking to %s: %s", a->base, why);
                return -ECONNABORTED;
        case CURLE_UNSUPPORTED_PROTOCOL:
        case CURLE_URL_MALFORMAT:
                log_error("Invalid API URL '%s': %s", a->base, why);
                return -EINVAL;
        case CURLE_GOT_NOTHING:
        case CURLE_RECV_ERROR:
        case CURLE_SEND_ERROR:
        case CURLE_PARTIAL_FILE:
        case CURLE_WEIRD_SERVER_REPLY:
                /* What plain HTTP to an HTTPS API looks like. */
                if (startswith(a->base, "http://"))
                        log_error("Connection to %s lost: %s (if the API serves HTTPS, use an https:// URL)", a->base,
                                  why);
                else
                        log_error("Connection to %s lost: %s", a->base, why);
                return -ECONNRESET;
        default:
                log_error("Request to %s failed: %s", a->base, why);
                return -EIO;
        }
}

size_t body_write(char *p, size_t size, size_t n, void *userdata) {
        Api *a = userdata;

        if (buffer_append(&a->body, p, n) < 0)
                return 0; /* CURLE_WRITE_ERROR */
        return n;
}

static int api_open(Api *a) {
        const char *api = arg.api ?: getenv("TETHER_API");
        _cleanup_free_ char *auth = NULL;
        size_t len;

        if (!api || !*api)
                api = TETHER_DEFAULT_API;
        if (!startswith(api, "http://") && !startswith(api, "https://"))
                return cli_usage_error("Invalid API URL '%s': must start with http:// or https://", api);
        a->base = strdup(api);
        if (!a->base)
                return log_error_errno(-ENOMEM, "Out of memory");
        len = strlen(a->base);
        while (len > 0 && a->base[len - 1] == '/')
                a->base[--len] = '\0';

        if (!arg.token) {
                const char *t = getenv("TETHER_TOKEN");
                if (t && *t)
                        arg.token = t;
        }
        if (!arg.cacert) {
                const char *t = getenv("TETHER_CACERT");
                if (t && *t)
                        arg.cacert = t;
        }
        if (arg.token) {
                if (strpbrk(arg.token, "\r\n"))
                        return cli_usage_error("The API token must not contain line breaks");
                if (asprintf(&auth, "Authorization: Bearer %s", arg.token) < 0)
                        return log_error_errno(-ENOMEM, "Out of memory");
                a->headers = curl_slist_append(a->headers, auth);
        }
        /* No "Expect: 100-continue" round trip for larger arguments. */
        a->headers = curl_slist_append(a->headers, "Expect:");
        if (!a->headers)
                return log_error_errno(-ENOMEM, "Out of memory");

        a->curl = curl_easy_init();
        if (!a->curl)
                return log_error_errno(-ENOMEM, "Failed to initialize libcurl");
        a->body.max = TETHER_RESPONSE_MAX;

        curl_easy_setopt(a->curl, CURLOPT_ERRORBUFFER, a->errbuf);
        curl_easy_setopt(a->curl, CURLOPT_USERAGENT, "tether/" PACKAGE_VERSION);
        curl_easy_setopt(a->curl, CURLOPT_HTTPHEADER, a->headers);
        curl_easy_setopt(a->curl, CURLOPT_TCP_NODELAY, 1L);
        /* Names may contain "." and "..": send them as they are. */
        curl_easy_setopt(a->curl, CURLOPT_PATH_AS_IS, 1L);
        curl_easy_setopt(a->curl, CURLOPT_PROTOCOLS_STR, "http,https");
        curl_easy_setopt(a->curl, CURLOPT_FOLLOWLOCATION, 0L);
        if (arg.cacert)
                curl_easy_setopt(a->curl, CURLOPT_CAINFO, arg.cacert);
        return 0;
}

void api_set_timeouts(Api *a, long total_ms) {
        long connect_ms = TETHER_CONNECT_TIMEOUT_MS;

        if (total_ms > 0 && total_ms < connect_ms)
                connect_ms = total_ms;
        curl_easy_setopt(a->curl, CURLOPT_CONNECTTIMEOUT_MS, connect_ms);
        curl_easy_setopt(a->curl, CURLOPT_TIMEOUT_MS, total_ms > 0 ? total_ms : 0L);
}

/* Perform one request; form != NULL makes it a POST with that
 * x-www-form-urlencoded body. On success (2xx) the raw body is in
 * a->body and, if ret is not NULL, *ret is its parsed JSON (caller
 * decrefs). Failures are logged once; negative errno. */
int api_request(Api *a, const char *path, const char *form, json_t **ret) {
        _cleanup_free_ char *url = NULL;
        json_error_t jerr;
        CURLcode c;
        json_t *j;

        if (asprintf(&url, "%s%s", a->base, path) < 0)
                return log_error_errno(-ENOMEM, "Out of memory");

        buffer_done(&a->body);
        a->body.max = TETHER_RESPONSE_MAX;
        a->errbuf[0] = '\0';
        curl_easy_setopt(a->curl, CURLOPT_URL, url);
        if (form) {
                curl_easy_setopt(a->curl, CURLOPT_POSTFIELDS, form);
                curl_easy_setopt(a->curl, CURLOPT_POSTFIELDSIZE, (long)strlen(form));
        } else
                curl_easy_setopt(a->curl, CURLOPT_HTTPGET, 1L);
        curl_easy_setopt(a->curl, CURLOPT_WRITEFUNCTION, body_write);
        curl_easy_setopt(a->curl, CURLOPT_WRITEDATA, a);
        api_set_timeouts(a, arg.timeout_ms >= 0 ? arg.timeout_ms : TETHER_DEFAULT_TIMEOUT_MS);

        c = curl_easy_perform(a->curl);
        if (c == CURLE_WRITE_ERROR) {
                log_error("The response from %s is larger than %u bytes", a->base, TETHER_RESPONSE_MAX);
                return -EFBIG;
        }
        if (c != CURLE_OK)
                return curl_error(a, c);

        curl_easy_getinfo(a->curl, CURLINFO_RESPONSE_CODE, &a->status);
        if (a->status < 200 || a->status > 299)
                return http_error(a, a->what_400);

        if (!ret)
                return 0;
        j = json_loadb(a->body.data ?: "", a->body.len, 0, &jerr);
        if (!j) {
                log_error("Malformed JSON from %s: %s", url, jerr.text);
                return -EBADMSG;
        }
        *ret = j;
        return 0;
}

int print_raw_body(const Api *a) {
        size_t len = a->body.len;

        while (len > 0 && (a->body.data[len - 1] == '\n' || a->body.data[len - 1] == '\r'))
                len--;
        fwrite(a->body.data, 1, len, stdout);
        putchar('\n');
        return 0;
}

int print_json(json_t *j) {
        _cleanup_free_ char *text = json_dumps(j, JSON_COMPACT);

        if (!text)
                return log_error_errno(-ENOMEM, "Out of memory");
        printf("%s\n", text);
        return 0;
}

int request_list(Api *a, const char *path, const char *what, json_t **ret) {
        json_t *j = NULL;
        int r;

        r = request_json(a, "GET", path, NULL, &j);
        if (r < 0)
                return r;
        if (!json_is_array(j)) {
                json_decref(j);
                log_error("Malformed response from %s: expected a list of %s", a->base, what);
                return -EBADMSG;
        }
        *ret = j;
        return 0;
}

int request_delete(Api *a, const char *path) {
        json_t *j = NULL;
        int r;

        r = request_json(a, "DELETE", path, NULL, &j);
        if (r < 0)
                return r;
        if (arg.json)
                r = print_json(j);
        json_decref(j);
        return r;
}

char *form_field(Api *a, const char *name, const char *value) {
        char *esc = curl_easy_escape(a->curl, value, (int)strlen(value)), *s = NULL;

        if (!esc)
                return NULL;
        if (asprintf(&s, "%s=%s", name, esc) < 0)
                s = NULL;
        curl_free(esc);
        return s;
}

const char *json_string_or(json_t *o, const char *key, const char *fallback) {
        const char *s = json_string_value(json_object_get(o, key));
        return s && *s ? s : fallback;
}

/* Shortest "%g" text that reads back as the same double, with ".0"
 * appended to integral values so a double still looks like one. */
static void format_double(double v, char *buf, size_t size) {
        for (int p = 1; p <= 17; p++) {
                snprintf(buf, size, "%.*g", p, v);
                if (strtod(buf, NULL) == v)
                        break;
        }
        if (!strpbrk(buf, ".eEn"))
                strncat(buf, ".0", size - strlen(buf) - 1);
}

/* ---- commands ------------------------------------------------------------- */

/* Devices per request of tether list: each response stays far below
 * TETHER_RESPONSE_MAX however many devices the cloud knows. */
#define LIST_PER_PAGE 1000u

/* Every device, page by page (docs/cloud.md); a cloud that answers the
 * paged request with the plain array (it does not page) is taken at its
 * word. *ret is a new array. */
/* Append "&key=value" (value escaped) to *q. */
static int query_add(Api *a, char **q, const char *key, const char *value) {
        _cleanup_free_ char *old = *q;
        char *v = curl_easy_escape(a->curl, value, 0);
        int k;

        if (!v)
                return -ENOMEM;
        k = asprintf(q, "%s&%s=%s", old ?: "", key, v);
        curl_free(v);
        if (k < 0) {
                *q = TAKE_PTR(old);
                return -ENOMEM;
        }
        return 0;
}

/* The list's filters (docs/fleet.md, "Finding devices") as query
 * arguments, each starting with '&' ("" for none). */
static int list_filters(Api *a, char **ret) {
        _cleanup_free_ char *q = strdup("");
        char num[32];
        int r = q ? 0 : -ENOMEM;

        for (size_t i = 0; r >= 0 && i < arg.n_ota_tags; i++)
                r = query_add(a, &q, "tag", arg.ota_tags[i]);
        for (size_t i = 0; r >= 0 && i < arg.n_list_packages; i++)
                r = query_add(a, &q, "package", arg.list_packages[i]);
        if (r >= 0 && arg.list_connected >= 0)
                r = query_add(a, &q, "connected", arg.list_connected ? "true" : "false");
        if (r >= 0 && arg.list_heard_within >= 0) {
                snprintf(num, sizeof(num), "%lld", arg.list_heard_within);
                r = query_add(a, &q, "heard_within", num);
        }
        if (r >= 0 && arg.list_not_heard_within >= 0) {
                snprintf(num, sizeof(num), "%lld", arg.list_not_heard_within);
                r = query_add(a, &q, "not_heard_within", num);
        }
        if (r < 0)
                return log_error_errno(r, "Out of memory");
        *ret = TAKE_PTR(q);
        return 0;
}

static int list_devices(Api *a, json_t **ret) {
        _cleanup_(json_decrefp) json_t *all = json_array();
        _cleanup_free_ char *filters = NULL;
        int k;

        if (!all)
                return log_error_errno(-ENOMEM, "Out of memory");
        k = list_filters(a, &filters);
        if (k < 0)
                return k;
        a->what_400 = "The cloud refused the list's filters";
        for (unsigned long page = 1;; page++) {
                _cleanup_free_ char *path = NULL;
                json_t *j, *devices, *meta;
                json_int_t total_pages;
                int r;

                if (asprintf(&path, "/v1/devices?page=%lu&per_page=%u%s", page, LIST_PER_PAGE, filters) < 0)
                        return log_error_errno(-ENOMEM, "Out of memory");
                r = api_request(a, path, NULL, &j);
                if (r < 0)
                        return r;
                if (json_is_array(j) && page == 1) {
                        *ret = j;
                        return 0;
                }
                devices = json_object_get(j, "devices");
                meta = json_object_get(j, "meta");
                if (!json_is_array(devices) || !json_is_integer(json_object_get(meta, "total_pages"))) {
                        json_decref(j);
                        log_error("Malformed response from %s: expected a list of devices", a->base);
                        return -EBADMSG;
                }
                total_pages = json_integer_value(json_object_get(meta, "total_pages"));
                if (json_array_extend(all, devices) < 0) {
                        json_decref(j);
                        return log_error_errno(-ENOMEM, "Out of memory");
                }
                r = json_array_size(devices) == 0 || (json_int_t)page >= total_pages;
                json_decref(j);
                if (r)
                        break;
        }
        *ret = TAKE_PTR(all);
        return 0;
}

/* t ("2026-11-25T23:59:59Z", what the cloud gives, fractions allowed) as
 * Unix seconds, or -1. */
static int64_t parse_utc(const char *t) {
        struct tm tm = {};
        const char *end = t ? strptime(t, "%Y-%m-%dT%H:%M:%S", &tm) : NULL;

        if (!end)
                return -1;
        if (*end == '.')
                end += 1 + strspn(end + 1, "0123456789");
        if (!streq(end, "Z"))
                return -1;
        return (int64_t)timegm(&tm);
}

/* How long device d's certificate has left, for tether list: "29d", "3h",
 * "12m", "expired", or "-" when the cloud knows none. */
static void cert_left(json_t *d, char buf[static 24]) {
        json_t *cert = json_object_get(d, "certificate");
        int64_t na = parse_utc(json_string_value(json_object_get(cert, "not_after")));
        int64_t left = na - (int64_t)time(NULL);

        if (!json_is_object(cert) || na < 0)
                snprintf(buf, 24, "-");
        else if (left <= 0 || streq(json_string_or(cert, "state", ""), "expired"))
                snprintf(buf, 24, "expired");
        else if (left >= 86400)
                snprintf(buf, 24, "%" PRId64 "d", left / 86400);
        else if (left >= 3600)
                snprintf(buf, 24, "%" PRId64 "h", left / 3600);
        else
                snprintf(buf, 24, "%" PRId64 "m", (left + 59) / 60);
}

static int cmd_list(Api *a, char **args, int n) {
        json_t *devices, *d;
        size_t i, w = 2, wh = strlen("LAST HEARD"), wn = strlen("NAME"), wa = strlen("AGENT"), wo = strlen("OS/ARCH");
        int r, k;

        if (n != 0)
                return cli_usage_error("'list' takes no arguments");
        r = list_devices(a, &devices);
        if (r < 0)
                return r;
        if (!json_is_array(devices)) {
                json_decref(devices);
                log_error("Malformed response from %s: expected a list of devices", a->base);
                return -EBADMSG;
        }
        if (arg.json) {
                char *text = json_dumps(devices, JSON_COMPACT | JSON_REAL_PRECISION(17));

                json_decref(devices);
                if (!text)
                        return log_error_errno(-ENOMEM, "Out of memory");
                printf("%s\n", text);
                free(text);
                return 0;
        }

        json_array_foreach(devices, i, d) {
                size_t l = strlen(json_string_or(d, "id", "?")), lh = strlen(json_string_or(d, "last_heard", "never"));
                size_t ln = strlen(json_string_or(d, "name", "-"));
                json_t *sys = json_object_get(d, "system");
                size_t la = strlen(json_string_or(json_object_get(sys, "packages"), "tether-agent", "-"));
                size_t lo = strlen(json_string_or(sys, "os", "-")) + 1 + strlen(json_string_or(sys, "arch", "-"));

                w = l > w ? l : w;
                wh = lh > wh ? lh : wh;
                wn = ln > wn ? ln : wn;
                wa = la > wa ? la : wa;
                wo = lo > wo ? lo : wo;
        }
        /* New columns go last: scripts read the first ones by position. */
        printf("%-*s  %-7s  %-*s  %-7s  %-*s  %-*s  %-*s  %s\n", (int)w, "ID", "STATUS", (int)wh, "LAST HEARD", "CERT",
               (int)wn, "NAME", (int)wa, "AGENT", (int)wo, "OS/ARCH", "TAGS");
        json_array_foreach(devices, i, d) {
                json_t *sys = json_object_get(d, "system"), *tags = json_object_get(d, "tags"), *v;
                char left[24], osarch[600];
                const char *key;

                cert_left(d, left);
                snprintf(osarch, sizeof(osarch), "%s/%s", json_string_or(sys, "os", "-"),
                         json_string_or(sys, "arch", "-"));
                printf("%-*s  %-7s  %-*s  %-7s  %-*s  %-*s  %-*s  ", (int)w, json_string_or(d, "id", "?"),
                       json_is_true(json_object_get(d, "revoked"))     ? "revoked"
                       : json_is_true(json_object_get(d, "connected")) ? "online"
                                                                       : "offline",
                       (int)wh, json_string_or(d, "last_heard", "never"), left, (int)wn, json_string_or(d, "name", "-"),
                       (int)wa, json_string_or(json_object_get(sys, "packages"), "tether-agent", "-"), (int)wo, osarch);
                if (json_object_size(tags) == 0)
                        printf("-");
                k = 0;
                json_object_foreach(tags, key, v)
                        printf("%s%s=%s", k++ ? "," : "", key, json_is_string(v) ? json_string_value(v) : "?");
                printf("\n");
        }
        json_decref(devices);
        return 0;
}

/* tether describe's "notes:" and "system:" (docs/fleet.md, "Inventory"). */
static void describe_system(json_t *dev) {
        json_t *sys = json_object_get(dev, "system"), *pk = json_object_get(sys, "packages"), *v;
        const char *notes = json_string_value(json_object_get(dev, "notes")), *key;

        if (notes) {
                /* Notes may hold lines: each indented under the label. Any
                 * other control character (C0, DEL, C1) is shown as \xNN:
                 * whoever wrote the notes does not get to send escape
                 * sequences to this terminal. */
                printf("notes:\n  ");
                for (const unsigned char *p = (const unsigned char *)notes; *p; p++)
                        if (*p == '\n')
                                fputs("\n  ", stdout);
                        else if ((*p < 0x20 && *p != '\t') || *p == 0x7f)
                                printf("\\x%02x", *p);
                        else if (*p == 0xc2 && p[1] >= 0x80 && p[1] <= 0x9f)
                                printf("\\x%02x", *++p);
                        else
                                putchar(*p);
                printf("\n");
        }
        if (!json_is_object(sys)) {
                printf("system:     (unknown)\n");
                return;
        }
        printf("system:\n");
        printf("  os:        %s\n", json_string_or(sys, "os", "?"));
        printf("  arch:      %s\n", json_string_or(sys, "arch", "?"));
        printf("  kernel:    %s\n", json_string_or(sys, "kernel", "?"));
        json_object_foreach(pk, key, v)
                printf("  package:   %s %s\n", key, json_is_string(v) ? json_string_value(v) : "?");
}

/* tether describe's "tags:" and "certificate:" (what the registry knows). */
static void describe_tags_cert(json_t *dev) {
        json_t *tags = json_object_get(dev, "tags"), *cert = json_object_get(dev, "certificate"), *v;
        const char *key;

        if (json_is_object(tags) && json_object_size(tags) > 0) {
                printf("tags:\n");
                json_object_foreach(tags, key, v)
                        printf("  %s=%s\n", key, json_is_string(v) ? json_string_value(v) : "?");
        } else if (json_is_object(tags))
                printf("tags:       (none)\n");
        if (!json_is_object(cert)) {
                printf("certificate: (none known)\n");
                return;
        }
        printf("certificate:\n");
        printf("  state:       %s\n", json_string_or(cert, "state", "?"));
        printf("  not after:   %s\n", json_string_or(cert, "not_after", "?"));
        if (json_string_value(json_object_get(cert, "renew_after")))
                printf("  renew after: %s\n", json_string_or(cert, "renew_after", ""));
        if (json_string_value(json_object_get(cert, "issued_by")))
                printf("  issued by:   %s at %s\n", json_string_or(cert, "issued_by", ""),
                       json_string_or(cert, "issued_at", "?"));
        else
                printf("  issued by:   (not by this cloud)\n");
        printf("  issuer:      %s\n", json_string_or(cert, "issuer", "?"));
        printf("  serial:      %s\n", json_string_or(cert, "serial", "?"));
}

static int cmd_describe(Api *a, char **args, int n) {
        _cleanup_free_ char *path = NULL;
        json_t *dev, *fns, *vars, *units, *v;
        const char *key;
        size_t i, w = 0;
        int r;

        if (n != 1)
                return cli_usage_error("'describe' takes one argument, DEVICE");
        r = name_check(args[0], PROTO_NAME_DEVICE);
        if (r < 0)
                return r;
        if (asprintf(&path, "/v1/devices/%s", args[0]) < 0)
                return log_error_errno(-ENOMEM, "Out of memory");
        r = api_request(a, path, NULL, &dev);
        if (r < 0)
                return r;
        if (!json_is_object(dev)) {
                json_decref(dev);
                log_error("Malformed response from %s: expected a device object", a->base);
                return -EBADMSG;
        }
        if (arg.json) {
                json_decref(dev);
                return print_raw_body(a);
        }

        printf("id:         %s\n", json_string_or(dev, "id", args[0]));
        if (json_string_value(json_object_get(dev, "name")))
                printf("name:       %s\n", json_string_or(dev, "name", ""));
        printf("status:     %s\n", json_is_true(json_object_get(dev, "connected")) ? "online" : "offline");
        printf("last heard: %s\n", json_string_or(dev, "last_heard", "never"));
        if (json_is_true(json_object_get(dev, "revoked")))
                printf("revoked:    %s by %s%s%s%s\n", json_string_or(dev, "revoked_at", "?"),
                       json_string_or(dev, "revoked_by", "?"), json_string_value(json_object_get(dev, "revoked_reason")) ? " (" : "",
                       json_string_or(dev, "revoked_reason", ""),
                       json_string_value(json_object_get(dev, "revoked_reason")) ? ")" : "");
        describe_system(dev);
        describe_tags_cert(dev);

        fns = json_object_get(dev, "functions");
        if (!json_is_array(fns))
                printf("functions:  (unknown)\n");
        else if (json_array_size(fns) == 0)
                printf("functions:  (none)\n");
        else {
                printf("functions:\n");
                json_array_foreach(fns, i, v)
                        if (json_is_string(v))
                                printf("  %s\n", json_string_value(v));
        }

        vars = json_object_get(dev, "variables");
        units = json_object_get(dev, "units");
        if (!json_is_object(vars))
                printf("variables:  (unknown)\n");
        else if (json_object_size(vars) == 0)
                printf("variables:  (none)\n");
        else {
                printf("variables:\n");
                json_object_foreach(vars, key, v)
                        if (strlen(key) > w)
                                w = strlen(key);
                json_object_foreach(vars, key, v) {
                        const char *unit = json_string_value(json_object_get(units, key));

                        const char *type = json_is_string(v) ? json_string_value(v) : "?";

                        if (unit)
                                printf("  %-*s  %-6s  %s\n", (int)w, key, type, unit);
                        else
                                printf("  %-*s  %s\n", (int)w, key, type);
                }
        }
        json_decref(dev);
        return 0;
}

static int cmd_call(Api *a, char **args, int n) {
        _cleanup_free_ char *path = NULL, *form = NULL;
        const char *argument = n >= 3 ? args[2] : "";
        json_t *res, *rv;
        int r;

        if (n < 2 || n > 3)
                return cli_usage_error("'call' takes DEVICE FUNCTION [ARGUMENT]");
        r = name_check(args[0], PROTO_NAME_DEVICE);
        if (r < 0)
                return r;
        r = name_check(args[1], PROTO_NAME_FUNCTION);
        if (r < 0)
                return r;
        r = payload_check(argument, "argument");
        if (r < 0)
                return r;

        if (asprintf(&path, "/v1/devices/%s/%s", args[0], args[1]) < 0 ||
            !(form = form_field(a, "arg", argument)))
                return log_error_errno(-ENOMEM, "Out of memory");
        /* Names and UTF-8 were checked here: a 400 is about the argument. */
        a->what_400 = "The device rejected the argument";
        r = api_request(a, path, form, &res);
        if (r < 0)
                return r;
        rv = json_object_get(res, "return_value");
        if (!json_is_integer(rv)) {
                json_decref(res);
                log_error("Malformed response from %s: no integer \"return_value\"", a->base);
                return -EBADMSG;
        }
        if (arg.json)
                print_raw_body(a);
        else
                printf("%" JSON_INTEGER_FORMAT "\n", json_integer_value(rv));
        json_decref(res);
        return 0;
}

static int cmd_get(Api *a, char **args, int n) {
        _cleanup_free_ char *path = NULL;
        json_t *res, *v;
        char num[64];
        int r;

        if (n != 2)
                return cli_usage_error("'get' takes DEVICE VARIABLE");
        r = name_check(args[0], PROTO_NAME_DEVICE);
        if (r < 0)
                return r;
        r = name_check(args[1], PROTO_NAME_VARIABLE);
        if (r < 0)
                return r;
        if (asprintf(&path, "/v1/devices/%s/%s", args[0], args[1]) < 0)
                return log_error_errno(-ENOMEM, "Out of memory");
        r = api_request(a, path, NULL, &res);
        if (r < 0)
                return r;
        v = json_object_get(res, "result");
        if (!v) {
                json_decref(res);
                log_error("Malformed response from %s: no \"result\"", a->base);
                return -EBADMSG;
        }

        if (arg.json)
                print_raw_body(a);
        else if (json_is_string(v)) {
                fwrite(json_string_value(v), 1, json_string_length(v), stdout);
                putchar('\n');
        } else if (json_is_integer(v))
                printf("%" JSON_INTEGER_FORMAT "\n", json_integer_value(v));
        else if (json_is_real(v)) {
                format_double(json_real_value(v), num, sizeof(num));
                printf("%s\n", num);
        } else if (json_is_boolean(v))
                printf("%s\n", json_is_true(v) ? "true" : "false");
        else {
                _cleanup_free_ char *s = json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY);
                printf("%s\n", s ?: "null");
        }
        json_decref(res);
        return 0;
}

/* A request with another method than GET or POST (form: its body). */
static int api_request_method(Api *a, const char *method, const char *path, const char *form, json_t **ret) {
        int r;

        curl_easy_setopt(a->curl, CURLOPT_CUSTOMREQUEST, method);
        r = api_request(a, path, form, ret);
        curl_easy_setopt(a->curl, CURLOPT_CUSTOMREQUEST, NULL);
        return r;
}

static int cmd_register(Api *a, char **args, int n) {
        _cleanup_free_ char *form = NULL;
        json_t *res;
        int r;

        if (n != 1)
                return cli_usage_error("'register' takes one argument, DEVICE");
        r = name_check(args[0], PROTO_NAME_DEVICE);
        if (r < 0)
                return r;
        form = form_field(a, "id", args[0]);
        if (!form)
                return log_error_errno(-ENOMEM, "Out of memory");
        r = api_request(a, "/v1/devices", form, &res);
        if (r < 0)
                return r;
        if (arg.json)
                print_raw_body(a);
        else
                printf("%s %s\n", args[0],
                       json_is_true(json_object_get(res, "created")) ? "registered" : "was registered already");
        json_decref(res);
        return 0;
}

/* revoke (with an optional --reason) or unrevoke. */
static int revocation(Api *a, char **args, int n, bool revoke) {
        _cleanup_free_ char *path = NULL, *form = NULL;
        json_t *res;
        int r;

        if (n != 1)
                return cli_usage_error("'%s' takes one argument, DEVICE", revoke ? "revoke" : "unrevoke");
        r = name_check(args[0], PROTO_NAME_DEVICE);
        if (r < 0)
                return r;
        if (arg.reason) {
                r = payload_check(arg.reason, "reason");
                if (r < 0)
                        return r;
                if (strlen(arg.reason) > 160)
                        return cli_usage_error("The reason is longer than 160 bytes");
                form = form_field(a, "reason", arg.reason);
                if (!form)
                        return log_error_errno(-ENOMEM, "Out of memory");
        }
        if (asprintf(&path, "/v1/devices/%s/revocation", args[0]) < 0)
                return log_error_errno(-ENOMEM, "Out of memory");
        a->what_400 = "The cloud refused the request";
        r = api_request_method(a, revoke ? "PUT" : "DELETE", path, form, &res);
        if (r < 0)
                return r;
        if (arg.json)
                print_raw_body(a);
        else if (json_is_true(json_object_get(res, "changed")))
                printf("%s %s\n", args[0], revoke ? "revoked" : "unrevoked");
        else
                printf("%s was %s already\n", args[0], revoke ? "revoked" : "not revoked");
        json_decref(res);
        return 0;
}

static int cmd_revoke(Api *a, char **args, int n) {
        return revocation(a, args, n, true);
}

static int cmd_unrevoke(Api *a, char **args, int n) {
        return revocation(a, args, n, false);
}

static int cmd_publish(Api *a, char **args, int n) {
        _cleanup_free_ char *f_name = NULL, *f_data = NULL, *form = NULL;
        const char *data = n >= 2 ? args[1] : NULL;
        json_t *res;
        int r;

        if (n < 1 || n > 2)
                return cli_usage_error("'publish' takes NAME [DATA]");
        r = name_check(args[0], PROTO_NAME_EVENT);
        if (r < 0)
                return r;
        if (data) {
                r = payload_check(data, "event data");
                if (r < 0)
                        return r;
        }

        f_name = form_field(a, "name", args[0]);
        if (data)
                f_data = form_field(a, "data", data);
        if (!f_name || (data && !f_data) ||
            asprintf(&form, "%s%s%s%s", f_name, data ? "&" : "", data ? f_data : "",
                     arg.private_ ? "&private=true" : "") < 0)
                return log_error_errno(-ENOMEM, "Out of memory");
        if (arg.ttl >= 0) {
                char *f;
                if (asprintf(&f, "%s&ttl=%lld", form, arg.ttl) < 0)
                        return log_error_errno(-ENOMEM, "Out of memory");
                free(form);
                form = f;
        }

        r = api_request(a, "/v1/devices/events", form, &res);
        if (r < 0)
                return r;
        if (json_is_false(json_object_get(res, "ok"))) {
                char text[TETHER_ERROR_TEXT_MAX + 1];
                error_text(&a->body, text, sizeof(text));
                json_decref(res);
                log_error("The cloud did not accept the event%s%s", text[0] ? ": " : "", text);
                return -EPROTO;
        }
        json_decref(res);
        if (arg.json)
                print_raw_body(a);
        return 0;
}

/* ---- subscribe: a server-sent event stream -------------------------------- */

typedef struct Stream {
        Api *api;
        Buffer line;      /* the line being received */
        Buffer data;      /* data lines of the event being received */
        char *event;      /* its "event:" field */
        char *pending_id; /* its "id:" field */
        char *last_id;    /* the id of the last event printed (Last-Event-ID) */
        bool opened;      /* this attempt got a 200 stream */
        bool skip_lf;     /* last chunk ended in CR: a following LF belongs to it */
        bool checked;     /* status and content type looked at */
        bool failed;      /* non-200: the body is collected into api->body */
        bool stdout_gone; /* EPIPE: the reader went away */
        int write_error;  /* other stdout errors, negative errno */
        unsigned long received;
} Stream;

static bool stream_done(const Stream *s) {
        return (arg.count > 0 && s->received >= arg.count) || s->stdout_gone || s->write_error < 0;
}

/* Human format: one line per event, so control characters in the data
 * are escaped; --json gives the exact data. */
static void print_escaped(const char *s) {
        for (; *s; s++) {
                unsigned char c = (unsigned char)*s;
                if (c == '\n')
                        fputs("\\n", stdout);
                else if (c == '\r')
                        fputs("\\r", stdout);
                else if (c == '\t')
                        fputs("\\t", stdout);
                else if (c < 0x20 || c == 0x7f)
                        printf("\\x%02x", c);
                else
                        putchar(c);
        }
}

static void stream_dispatch(Stream *s) {
        json_t *ev, *data, *ttl, *priv;
        const char *name = s->event ?: "message";
        json_error_t jerr;

        if (s->pending_id) {
                free(s->last_id);
                s->last_id = TAKE_PTR(s->pending_id);
        }
        if (s->data.len == 0)
                goto out;
        /* The last data line's newline is not part of the value. */
        s->data.data[--s->data.len] = '\0';

        ev = json_loadb(s->data.data, s->data.len, 0, &jerr);
        if (!json_is_object(ev)) {
                json_decref(ev);
                log_warning("Warning: ignoring event '%s' with malformed data: %s", name,
                            ev ? "not a JSON object" : jerr.text);
                goto out;
        }
        if (streq(name, "tether/stream/lost")) {
                /* The cloud's notice that events for this stream are gone
                 * from its journal (docs/cloud.md, "Slow subscribers"): not
                 * an event, a warning. */
                json_t *lost = json_object_get(ev, "lost");

                log_warning("Warning: missed %" JSON_INTEGER_FORMAT " event(s) that are no longer in the cloud's "
                            "journal; the stream goes on from event %s",
                            json_is_integer(lost) ? json_integer_value(lost) : (json_int_t)0,
                            json_string_or(ev, "first_id", "?"));
                json_decref(ev);
                goto out;
        }
        data = json_object_get(ev, "data");
        ttl = json_object_get(ev, "ttl");
        priv = json_object_get(ev, "private");

        if (arg.json) {
                json_t *o = json_pack("{s:s, s:O?, s:O?, s:O?, s:O?}", "name", name, "data", data, "ttl",
                                      ttl, "published_at", json_object_get(ev, "published_at"), "coreid",
                                      json_object_get(ev, "coreid"));
                if (o && json_object_get(ev, "received_at"))
                        json_object_set(o, "received_at", json_object_get(ev, "received_at"));
                if (o && json_is_true(priv))
                        json_object_set_new(o, "private", json_true());
                if (o && s->last_id)
                        json_object_set_new(o, "id", json_string(s->last_id));
                char *text = o ? json_dumps(o, JSON_COMPACT | JSON_PRESERVE_ORDER) : NULL;
                if (text)
                        printf("%s\n", text);
                else
                        log_warning("Warning: failed to format event '%s'", name);
                free(text);
                json_decref(o);
        } else {
                const char *d = json_string_value(data);
                fputs(name, stdout);
                if (d && *d) {
                        putchar(' ');
                        print_escaped(d);
                } else if (data && !json_is_null(data) && !json_is_string(data)) {
                        char *t = json_dumps(data, JSON_COMPACT | JSON_ENCODE_ANY);
                        printf(" %s", t ?: "");
                        free(t);
                }
                printf(" (from %s at %s)\n", json_string_or(ev, "coreid", "?"),
                       json_string_or(ev, "published_at", "?"));
        }
        json_decref(ev);

        if (fflush(stdout) != 0 || ferror(stdout)) {
                if (errno == EPIPE)
                        s->stdout_gone = true;
                else
                        s->write_error = -errno;
                return;
        }
        s->received++;
out:
        free(s->event);
        s->event = NULL;
        s->data.len = 0;
}

static int stream_line(Stream *s, char *line, size_t len) {
        const char *value;
        size_t flen;
        char *colon;

        if (len == 0) {
                stream_dispatch(s);
                return 0;
        }
        if (line[0] == ':') /* comment: ":ok", keepalives */
                return 0;

        colon = memchr(line, ':', len);
        flen = colon ? (size_t)(colon - line) : len;
        value = colon ? colon + 1 : line + len;
        if (*value == ' ')
                value++;

        if (flen == 5 && strncmp(line, "event", 5) == 0) {
                free(s->event);
                s->event = strdup(value);
                if (!s->event)
                        return -ENOMEM;
        } else if (flen == 4 && strncmp(line, "data", 4) == 0) {
                int r = buffer_append(&s->data, value, strlen(value));
                if (r == 0)
                        r = buffer_append(&s->data, "\n", 1);
                if (r < 0)
                        return r;
        } else if (flen == 2 && strncmp(line, "id", 2) == 0) {
                /* Becomes the last event ID when the event is dispatched. */
                free(s->pending_id);
                s->pending_id = strdup(value);
                if (!s->pending_id)
                        return -ENOMEM;
        }
        /* "retry" is not used: --resume has its own pace. */
        return 0;
}

static size_t stream_write(char *p, size_t size, size_t n, void *userdata) {
        Stream *s = userdata;
        Api *a = s->api;

        if (!s->checked) {
                const char *ct = NULL;

                s->checked = true;
                curl_easy_getinfo(a->curl, CURLINFO_RESPONSE_CODE, &a->status);
                curl_easy_getinfo(a->curl, CURLINFO_CONTENT_TYPE, &ct);
                if (a->status != 200)
                        s->failed = true;
                else if (!ct || strncasecmp(ct, "text/event-stream", 17) != 0) {
                        log_error("Unexpected response from %s: Content-Type '%s', not an event stream",
                                  a->base, ct ?: "");
                        s->write_error = -EPROTO;
                        return 0;
                }
                /* Test scripts wait for this line before they publish. */
                if (!s->failed) {
                        s->opened = true;
                        char *url = NULL;
                        curl_easy_getinfo(a->curl, CURLINFO_EFFECTIVE_URL, &url);
                        log_info("Subscribed to %s", url ?: a->base);
                }
        }
        if (s->failed)
                return buffer_append(&a->body, p, n) < 0 ? 0 : n;

        for (size_t i = 0; i < n && !stream_done(s); i++) {
                char c = p[i];

                if (s->skip_lf) {
                        s->skip_lf = false;
                        if (c == '\n')
                                continue;
                }
                if (c == '\r' || c == '\n') {
                        s->skip_lf = c == '\r';
                        int r = stream_line(s, s->line.data ?: (char *)"", s->line.len);
                        s->line.len = 0;
                        if (r < 0) {
                                log_error("An event from %s is larger than %u bytes", a->base,
                                          TETHER_SSE_EVENT_MAX);
                                s->write_error = -EFBIG;
                                return 0;
                        }
                        continue;
                }
                if (buffer_append(&s->line, &c, 1) < 0) {
                        log_error("An event from %s is larger than %u bytes", a->base, TETHER_SSE_EVENT_MAX);
                        s->write_error = -EFBIG;
                        return 0;
                }
        }
        /* Returning short ends the transfer (CURLE_WRITE_ERROR). */
        return stream_done(s) ? 0 : n;
}

static int stream_progress(void *userdata, curl_off_t dltotal, curl_off_t dlnow, curl_off_t ultotal,
                           curl_off_t ulnow) {
        return interrupted ? 1 : 0;
}

static void on_signal(int sig) {
        interrupted = 1;
}

/* One connection of a subscription. *ret_transient says whether
 * --resume should connect again. */
static int subscribe_once(Api *a, const char *path, Stream *s, unsigned long long start, bool *ret_transient) {
        _cleanup_free_ char *last = NULL;
        struct curl_slist *headers = NULL;
        long left_ms = 0;
        CURLcode c;
        int r;

        *ret_transient = false;
        for (struct curl_slist *h = a->headers; h; h = h->next)
                if (!(headers = curl_slist_append(headers, h->data)))
                        goto oom;
        if (!(headers = curl_slist_append(headers, "Accept: text/event-stream")))
                goto oom;
        if (s->last_id) {
                if (strpbrk(s->last_id, "\r\n") || asprintf(&last, "Last-Event-ID: %s", s->last_id) < 0)
                        last = NULL;
                if (last && !(headers = curl_slist_append(headers, last)))
                        goto oom;
        }
        buffer_done(&a->body);
        a->body.max = TETHER_RESPONSE_MAX;
        a->status = 0;
        a->errbuf[0] = 0;
        s->line.len = s->data.len = 0;
        free(s->event);
        free(s->pending_id);
        s->event = s->pending_id = NULL;
        s->skip_lf = s->checked = s->failed = s->opened = false;

        curl_easy_setopt(a->curl, CURLOPT_URL, path);
        curl_easy_setopt(a->curl, CURLOPT_HTTPHEADER, headers);
        curl_easy_setopt(a->curl, CURLOPT_HTTPGET, 1L);
        curl_easy_setopt(a->curl, CURLOPT_WRITEFUNCTION, stream_write);
        curl_easy_setopt(a->curl, CURLOPT_WRITEDATA, s);
        curl_easy_setopt(a->curl, CURLOPT_NOPROGRESS, 0L);
        curl_easy_setopt(a->curl, CURLOPT_XFERINFOFUNCTION, stream_progress);
        curl_easy_setopt(a->curl, CURLOPT_LOW_SPEED_LIMIT, 1L);
        curl_easy_setopt(a->curl, CURLOPT_LOW_SPEED_TIME, TETHER_STREAM_STALL_SEC);
        curl_easy_setopt(a->curl, CURLOPT_TCP_KEEPALIVE, 1L);
        /* Without --timeout the stream runs until interrupted. */
        if (arg.timeout_ms > 0) {
                left_ms = arg.timeout_ms - (long)((now_usec() - start) / 1000ULL);
                if (left_ms < 1)
                        left_ms = 1;
        }
        api_set_timeouts(a, left_ms);

        c = curl_easy_perform(a->curl);
        curl_easy_setopt(a->curl, CURLOPT_HTTPHEADER, a->headers);
        curl_slist_free_all(headers);

        if (s->failed) {
                r = http_error(a, NULL);
                /* 503: the cloud is shutting down. */
                *ret_transient = a->status == 503;
                return r;
        }
        if (s->write_error < 0) {
                if (s->write_error != -EPROTO && s->write_error != -EFBIG)
                        log_error_errno(s->write_error, "Failed to write to standard output: %m");
                return s->write_error;
        }
        if (s->stdout_gone || (arg.count > 0 && s->received >= arg.count))
                return 0;

        if (c == CURLE_ABORTED_BY_CALLBACK && interrupted) {
                if (arg.count > 0) {
                        log_error("Interrupted after %lu of %lu events", s->received, arg.count);
                        return -EINTR;
                }
                return 0;
        }
        if (c == CURLE_OPERATION_TIMEDOUT && arg.timeout_ms > 0 &&
            now_usec() - start >= (unsigned long long)arg.timeout_ms * 1000ULL) {
                /* --timeout bounds a collection; only a missed --count fails. */
                if (arg.count > 0) {
                        log_error("Timed out after %.3g s with %lu of %lu events", arg.timeout_ms / 1000.0,
                                  s->received, arg.count);
                        return -ETIMEDOUT;
                }
                return 0;
        }
        if (c == CURLE_OPERATION_TIMEDOUT && s->checked) {
                log_error("The event stream from %s stalled: nothing received for %ld s", a->base,
                          TETHER_STREAM_STALL_SEC);
                *ret_transient = true;
                return -ETIMEDOUT;
        }
        if (c == CURLE_OK) {
                log_error("The event stream from %s was closed by the server", a->base);
                *ret_transient = true;
                return -ECONNRESET;
        }
        r = curl_error(a, c);
        *ret_transient = r == -ECONNREFUSED || r == -ECONNRESET || r == -ETIMEDOUT;
        return r;
oom:
        curl_slist_free_all(headers);
        return log_error_errno(-ENOMEM, "Out of memory");
}

static int cmd_subscribe(Api *a, char **args, int n) {
        _cleanup_free_ char *path = NULL;
        const char *prefix = n >= 1 ? args[0] : "";
        struct sigaction sa = { .sa_handler = on_signal };
        Stream s = { .api = a };
        unsigned long long start;
        long delay_ms = 0;
        int r;

        if (n > 1)
                return cli_usage_error("'subscribe' takes at most one argument, PREFIX");
        r = name_check(prefix, PROTO_NAME_PREFIX);
        if (r < 0)
                return r;
        if (arg.device) {
                r = name_check(arg.device, PROTO_NAME_DEVICE);
                if (r < 0)
                        return r;
        }
        if (asprintf(&path, "%s/v1/devices/%s%sevents%s%s", a->base, arg.device ?: "", arg.device ? "/" : "",
                     *prefix ? "/" : "", prefix) < 0)
                return log_error_errno(-ENOMEM, "Out of memory");

        /* No SA_RESTART: a signal should interrupt libcurl's poll(). */
        sigemptyset(&sa.sa_mask);
        sigaction(SIGINT, &sa, NULL);
        sigaction(SIGTERM, &sa, NULL);

        s.line.max = TETHER_SSE_EVENT_MAX;
        s.data.max = TETHER_SSE_EVENT_MAX;
        start = now_usec();
        for (;;) {
                bool transient;
                struct timespec ts;

                r = subscribe_once(a, path, &s, start, &transient);
                if (!arg.resume || !transient || interrupted)
                        break;
                /* Back soon after a stream that worked, slower while the
                 * cloud stays away. */
                delay_ms = s.opened ? TETHER_RESUME_MIN_MS
                                    : (delay_ms * 2 < TETHER_RESUME_MAX_MS ? (delay_ms * 2 ?: TETHER_RESUME_MIN_MS)
                                                                           : TETHER_RESUME_MAX_MS);
                if (arg.timeout_ms > 0 &&
                    (long)((now_usec() - start) / 1000ULL) + delay_ms >= arg.timeout_ms) {
                        if (arg.count > 0) {
                                log_error("Timed out after %.3g s with %lu of %lu events", arg.timeout_ms / 1000.0,
                                          s.received, arg.count);
                                r = -ETIMEDOUT;
                        } else
                                r = 0;
                        break;
                }
                log_info("Reconnecting in %.1f s%s%s", delay_ms / 1000.0, s.last_id ? ", resuming after " : "",
                         s.last_id ?: "");
                ts = (struct timespec){ .tv_sec = delay_ms / 1000, .tv_nsec = delay_ms % 1000 * 1000000L };
                (void)nanosleep(&ts, NULL); /* a signal ends it early */
                if (interrupted) {
                        r = arg.count > 0 ? -EINTR : 0;
                        if (arg.count > 0)
                                log_error("Interrupted after %lu of %lu events", s.received, arg.count);
                        break;
                }
        }
        buffer_done(&s.line);
        buffer_done(&s.data);
        free(s.event);
        free(s.pending_id);
        free(s.last_id);
        return r;
}

/* ---- command line --------------------------------------------------------- */

static void help(void) {
        printf("Usage: tether [OPTIONS] COMMAND [ARGS...]\n"
               "\n"
               "Drive a tether cloud through its HTTP API.\n"
               "\n"
               "Commands:\n"
               "  list                          list devices: ID, online/offline/revoked, last heard,\n"
               "                                  certificate, name, agent version, OS/arch, tags\n"
               "        --tag NAME[=VALUE]        only devices with this tag (value) (repeatable)\n"
               "        --online, --offline       only devices (not) connected\n"
               "        --package NAME[=VERSION]  only devices with this package (version) (repeatable)\n"
               "        --heard-within DURATION   only devices heard within it (90s, 30m, 12h, 7d)\n"
               "        --not-heard-within DURATION  only devices not heard within it\n"
               "  rename DEVICE NAME            name a device (\"\" removes the name)\n"
               "  notes DEVICE TEXT             set a device's notes (\"\" removes them)\n"
               "  tag DEVICE NAME=VALUE...      set tags of a device\n"
               "  untag DEVICE NAME...          remove tags of a device\n"
               "  describe DEVICE               show a device's functions and variables\n"
               "  call DEVICE FUNCTION [ARG]    call a function, print its return value\n"
               "  get DEVICE VARIABLE           read a variable, print its value\n"
               "  publish NAME [DATA]           publish an event\n"
               "        --private                 mark it private\n"
               "        --ttl SECONDS             time to live (cloud default: 60)\n"
               "  subscribe [PREFIX]            print events as they arrive, one per line\n"
               "        --device DEVICE           only events from this device\n"
               "        --count N                 exit 0 after N events\n"
               "        --resume                  reconnect when the stream ends and resume\n"
               "                                  after the last event (Last-Event-ID)\n"
               "  register DEVICE               add a device to the registry (Registration=enrolled)\n"
               "  revoke DEVICE                 close its session and refuse it from now on\n"
               "        --reason TEXT             why, for the audit log and the event\n"
               "  unrevoke DEVICE               let a revoked device connect again\n"
               "  ota ...                       signed package updates ('tether ota --help')\n"
               "  campaign ...                  phased updates of many devices ('tether campaign --help')\n"
               "  tunnel DEVICE [HOST:]PORT     reach a TCP port of the device, like ssh -L\n"
               "        --listen [ADDR:]PORT      on a local port (default address 127.0.0.1)\n"
               "        --stdio                   on stdin/stdout (ssh ProxyCommand)\n"
               "  logs DEVICE                   print the device's journal ('tether logs --help')\n"
               "        --unit UNIT, --since TIME, -n LINES, -f, --json\n"
               "  tokens create --scope S...    make an API token (admin); shows it once\n"
               "        --scope SCOPE             devices:read, devices:write, functions:call,\n"
               "                                  events:read, events:publish, ota:write,\n"
               "                                  metrics:read, admin, provision:write,\n"
               "                                  tunnels:open, logs:read\n"
               "        --expires DURATION        e.g. 3600, 90m, 12h, 30d (default: never)\n"
               "        --name NAME               what it is for\n"
               "        --device DEVICE           only this device (repeatable)\n"
               "        --tag NAME[=VALUE]        only devices with this tag (value) (repeatable)\n"
               "  tokens list                   list API tokens (admin), never their secrets\n"
               "  tokens revoke ID              revoke a token (admin); its event streams end\n"
               "  provision create              make a provisioning token (admin or provision:write);\n"
               "                                  prints only the token, details on stderr\n"
               "        --uses N                  devices that may enroll with it (default 1)\n"
               "        --expires DURATION        90s, 30m, 12h, 7d, 52w or seconds (default 7d)\n"
               "        --tag NAME=VALUE          every device enrolled with it gets it (repeatable)\n"
               "        --name NAME               what it is for\n"
               "  provision list                list provisioning tokens, never the tokens\n"
               "  provision revoke ID           revoke a provisioning token\n"
               "  webhooks create URL           make a webhook (admin); prints only its secret,\n"
               "                                  shown this once, details on stderr\n"
               "        --prefix PREFIX           only events whose name starts with it\n"
               "        --tag NAME[=VALUE]        only devices with this tag (value)\n"
               "        --name NAME               its name (default: generated)\n"
               "        --secret SECRET           16-256 bytes (default: generated)\n"
               "  webhooks list                 list webhooks and their state, never secrets\n"
               "  webhooks delete NAME          delete a webhook made through the API\n"
               "  integrations list             webhooks and MQTT bridges: state, backlog,\n"
               "                                  delivered, failures, last error (admin)\n"
               "  audit                         print the audit log (admin)\n"
               "        --follow                  keep printing new records\n"
               "        --action PREFIX, --target TARGET, --after ID  filter\n"
               "\n"
               "Options:\n"
               "  --api URL         API base URL (default: $TETHER_API, else " TETHER_DEFAULT_API ")\n"
               "  --token TOKEN     bearer token (default: $TETHER_TOKEN)\n"
               "  --cacert FILE     CA certificate(s) to verify an https:// API (default:\n"
               "                    $TETHER_CACERT, else the system's)\n"
               "  --json            print the cloud's JSON (subscribe: one object per line)\n"
               "  --timeout SECONDS give up after this long (default 30; subscribe: none)\n"
               "  -h, --help        show this help\n"
               "  --version         show the version\n"
               "\n"
               "Put \"--\" before an argument that starts with '-'.\n"
               "Exit status: 0 ok, 1 error, 2 usage, 3 not found, 4 device offline or busy,\n"
               "5 authentication, 6 timeout, 7 cannot reach the API, 8 an update not committed,\n"
               "9 not enabled on this cloud (HTTP 501).\n");
}

enum {
        OPT_API = 0x100,
        OPT_TOKEN,
        OPT_CACERT,
        OPT_JSON,
        OPT_TIMEOUT,
        OPT_VERSION,
        OPT_PRIVATE,
        OPT_TTL,
        OPT_DEVICE,
        OPT_COUNT,
        OPT_RESUME,
        OPT_KEY,
        OPT_URL,
        OPT_MANIFEST,
        OPT_OUTPUT,
        OPT_MIN_VERSION,
        OPT_PLUGIN,
        OPT_EXPIRES,
        OPT_VALID_FOR,
        OPT_NO_WAIT,
        OPT_TAG,
        OPT_ALLOW_DOWNGRADE,
        OPT_SCOPE,
        OPT_NAME,
        OPT_FOLLOW,
        OPT_ACTION,
        OPT_TARGET,
        OPT_AFTER,
        OPT_REASON,
        OPT_USES,
        OPT_PREFIX,
        OPT_SECRET,
        OPT_ONLINE,
        OPT_OFFLINE,
        OPT_PACKAGE,
        OPT_HEARD_WITHIN,
        OPT_NOT_HEARD_WITHIN,
};

typedef int (*CommandFunc)(Api *a, char **args, int n);

static const struct {
        const char *name;
        CommandFunc func;
} commands[] = {
        { "list", cmd_list },       { "describe", cmd_describe }, { "call", cmd_call },
        { "get", cmd_get },         { "publish", cmd_publish },   { "subscribe", cmd_subscribe },
        { "ota", cmd_ota },         { "tokens", cmd_tokens },     { "audit", cmd_audit },
        { "register", cmd_register }, { "revoke", cmd_revoke },    { "unrevoke", cmd_unrevoke },
        { "provision", cmd_provision }, { "webhooks", cmd_webhooks }, { "integrations", cmd_integrations },
        { "rename", cmd_rename },   { "notes", cmd_notes },       { "tag", cmd_tag },
        { "untag", cmd_untag },
        { "campaign", cmd_campaign },
        { "tunnel", cmd_tunnel },   { "logs", cmd_logs },
};

/* The commands that parse their own options, after their word. */
static const struct {
        const char *name;
        CommandFunc func;
        void (*help)(void);
} own_options[] = {
        { "campaign", cmd_campaign, campaign_help },
        { "tunnel", cmd_tunnel, tunnel_help },
        { "logs", cmd_logs, logs_help },
};

static bool own_options_word(const char *w) {
        for (size_t i = 0; i < ELEMENTSOF(own_options); i++)
                if (streq(w, own_options[i].name))
                        return true;
        return false;
}

/* Where the command word is, when it is one of own_options[] (which parse
 * their own options after it), else argc: the global options before it,
 * each with its argument when it takes one. */
static int campaign_word(int argc, char **argv) {
        static const char *const with_arg[] = { "--api", "--token", "--cacert", "--timeout" };

        for (int i = 1; i < argc; i++) {
                bool takes = false;

                if (streq(argv[i], "--"))
                        return i + 1 < argc && own_options_word(argv[i + 1]) ? i + 1 : argc;
                if (argv[i][0] != '-')
                        return own_options_word(argv[i]) ? i : argc;
                for (size_t k = 0; k < ELEMENTSOF(with_arg); k++)
                        takes = takes || streq(argv[i], with_arg[k]);
                if (takes)
                        i++;
        }
        return argc;
}

static int parse_argv(int argc, char **argv, CommandFunc *ret_func, int *ret_optind) {
        static const struct option options[] = {
                { "api", required_argument, NULL, OPT_API },
                { "token", required_argument, NULL, OPT_TOKEN },
                { "cacert", required_argument, NULL, OPT_CACERT },
                { "json", no_argument, NULL, OPT_JSON },
                { "timeout", required_argument, NULL, OPT_TIMEOUT },
                { "help", no_argument, NULL, 'h' },
                { "version", no_argument, NULL, OPT_VERSION },
                { "private", no_argument, NULL, OPT_PRIVATE },
                { "ttl", required_argument, NULL, OPT_TTL },
                { "device", required_argument, NULL, OPT_DEVICE },
                { "count", required_argument, NULL, OPT_COUNT },
                { "resume", no_argument, NULL, OPT_RESUME },
                { "key", required_argument, NULL, OPT_KEY },
                { "url", required_argument, NULL, OPT_URL },
                { "manifest", required_argument, NULL, OPT_MANIFEST },
                { "output", required_argument, NULL, OPT_OUTPUT },
                { "min-version", required_argument, NULL, OPT_MIN_VERSION },
                { "plugin", required_argument, NULL, OPT_PLUGIN },
                { "expires", required_argument, NULL, OPT_EXPIRES },
                { "valid-for", required_argument, NULL, OPT_VALID_FOR },
                { "no-wait", no_argument, NULL, OPT_NO_WAIT },
                { "tag", required_argument, NULL, OPT_TAG },
                { "allow-downgrade", no_argument, NULL, OPT_ALLOW_DOWNGRADE },
                { "scope", required_argument, NULL, OPT_SCOPE },
                { "name", required_argument, NULL, OPT_NAME },
                { "follow", no_argument, NULL, OPT_FOLLOW },
                { "action", required_argument, NULL, OPT_ACTION },
                { "target", required_argument, NULL, OPT_TARGET },
                { "after", required_argument, NULL, OPT_AFTER },
                { "reason", required_argument, NULL, OPT_REASON },
                { "uses", required_argument, NULL, OPT_USES },
                { "prefix", required_argument, NULL, OPT_PREFIX },
                { "secret", required_argument, NULL, OPT_SECRET },
                { "online", no_argument, NULL, OPT_ONLINE },
                { "offline", no_argument, NULL, OPT_OFFLINE },
                { "package", required_argument, NULL, OPT_PACKAGE },
                { "heard-within", required_argument, NULL, OPT_HEARD_WITHIN },
                { "not-heard-within", required_argument, NULL, OPT_NOT_HEARD_WITHIN },
                {},
        };
        const char *cmd, *expires = NULL;
        bool ota_opts = false, help_seen = false, token_opts = false, audit_opts = false, list_opts = false;
        int campaign;
        char *end;
        int c;

        opterr = 0;
        campaign = campaign_word(argc, argv);
        while ((c = getopt_long(campaign, argv, ":h", options, NULL)) >= 0) {
                switch (c) {
                case 'h':
                        help_seen = true;
                        break;
                case OPT_VERSION:
                        printf("tether %s\n", PACKAGE_VERSION);
                        return 0;
                case OPT_API:
                        arg.api = optarg;
                        break;
                case OPT_TOKEN:
                        arg.token = optarg[0] ? optarg : NULL;
                        break;
                case OPT_CACERT:
                        arg.cacert = optarg;
                        break;
                case OPT_JSON:
                        arg.json = true;
                        break;
                case OPT_TIMEOUT: {
                        errno = 0;
                        double t = strtod(optarg, &end);
                        if (errno || end == optarg || *end || !(t > 0) || t > 86400.0)
                                return cli_usage_error("Invalid --timeout '%s': expected seconds, 0 < S <= 86400",
                                                       optarg);
                        arg.timeout_ms = (long)(t * 1000.0 + 0.5);
                        if (arg.timeout_ms < 1)
                                arg.timeout_ms = 1;
                        break;
                }
                case OPT_PRIVATE:
                        arg.private_ = true;
                        break;
                case OPT_TTL:
                        errno = 0;
                        arg.ttl = strtoll(optarg, &end, 10);
                        if (errno || end == optarg || *end || arg.ttl < 0 || arg.ttl > UINT32_MAX)
                                return cli_usage_error("Invalid --ttl '%s': expected seconds, 0-%" PRIu32, optarg,
                                                       UINT32_MAX);
                        break;
                case OPT_DEVICE:
                        arg.device = optarg;
                        /* ota sign: each --device is a target; tokens create: a restriction */
                        if (arg.n_ota_devices >= CLI_OTA_TARGETS_MAX)
                                return cli_usage_error("Too many --device options (at most %d)", CLI_OTA_TARGETS_MAX);
                        arg.ota_devices[arg.n_ota_devices++] = optarg;
                        break;
                case OPT_SCOPE:
                        if (arg.n_scopes >= ELEMENTSOF(arg.scopes))
                                return cli_usage_error("At most %zu --scope options", ELEMENTSOF(arg.scopes));
                        arg.scopes[arg.n_scopes++] = optarg;
                        token_opts = true;
                        break;
                case OPT_NAME:
                        arg.token_name = optarg;
                        token_opts = true;
                        break;
                case OPT_FOLLOW:
                        arg.audit_follow = audit_opts = true;
                        break;
                case OPT_ACTION:
                        arg.audit_action = optarg;
                        audit_opts = true;
                        break;
                case OPT_TARGET:
                        arg.audit_target = optarg;
                        audit_opts = true;
                        break;
                case OPT_AFTER:
                        errno = 0;
                        arg.audit_after = strtoll(optarg, &end, 10);
                        if (errno || end == optarg || *end || arg.audit_after < 0)
                                return cli_usage_error("Invalid --after '%s': expected an audit record ID", optarg);
                        audit_opts = true;
                        break;
                case OPT_COUNT: {
                        errno = 0;
                        long long v = strtoll(optarg, &end, 10);
                        if (errno || end == optarg || *end || v < 1 || (unsigned long long)v > ULONG_MAX)
                                return cli_usage_error("Invalid --count '%s': expected a positive number", optarg);
                        arg.count = (unsigned long)v;
                        break;
                }
                case OPT_RESUME:
                        arg.resume = true;
                        break;
                case OPT_KEY:
                        arg.ota_key = optarg;
                        ota_opts = true;
                        break;
                case OPT_URL:
                        arg.ota_url = optarg;
                        ota_opts = true;
                        break;
                case OPT_MANIFEST:
                        arg.ota_manifest = optarg;
                        ota_opts = true;
                        break;
                case OPT_OUTPUT:
                        arg.ota_output = optarg;
                        ota_opts = true;
                        break;
                case OPT_MIN_VERSION:
                        arg.ota_min_version = optarg;
                        ota_opts = true;
                        break;
                case OPT_PLUGIN:
                        arg.ota_plugin = optarg;
                        ota_opts = true;
                        break;
                case OPT_EXPIRES:
                        /* ota: a Unix time; tokens create: a duration. */
                        expires = optarg;
                        break;
                case OPT_VALID_FOR: {
                        long long mult = 1;
                        errno = 0;
                        arg.ota_valid_for = strtoll(optarg, &end, 10);
                        if (*end == 'd' || *end == 'h' || *end == 'm' || *end == 's') {
                                mult = *end == 'd' ? 86400 : *end == 'h' ? 3600 : *end == 'm' ? 60 : 1;
                                end++;
                        }
                        if (errno || end == optarg || *end || arg.ota_valid_for <= 0 ||
                            arg.ota_valid_for > 3650LL * 86400 / mult)
                                return cli_usage_error(
                                        "Invalid --valid-for '%s': expected a duration like 3600, 12h or 7d", optarg);
                        arg.ota_valid_for *= mult;
                        ota_opts = true;
                        break;
                }
                case OPT_NO_WAIT:
                        arg.ota_no_wait = true;
                        ota_opts = true;
                        break;
                case OPT_TAG:
                        if (arg.n_ota_tags >= CLI_OTA_TARGETS_MAX)
                                return cli_usage_error("Too many --tag options (at most %d)", CLI_OTA_TARGETS_MAX);
                        arg.ota_tags[arg.n_ota_tags++] = optarg; /* ota sign or tokens create: below */
                        break;
                case OPT_ALLOW_DOWNGRADE:
                        arg.ota_allow_downgrade = true;
                        ota_opts = true;
                        break;
                case OPT_REASON:
                        arg.reason = optarg;
                        break;
                case OPT_USES:
                        errno = 0;
                        arg.provision_uses = strtoll(optarg, &end, 10);
                        if (errno || !(optarg[0] >= '0' && optarg[0] <= '9') || *end || arg.provision_uses < 1 ||
                            arg.provision_uses > 1000000)
                                return cli_usage_error("Invalid --uses '%s': expected a whole number from 1 to 1000000",
                                                       optarg);
                        break;
                case OPT_PREFIX:
                        arg.webhook_prefix = optarg;
                        break;
                case OPT_SECRET:
                        arg.webhook_secret = optarg;
                        break;
                case OPT_ONLINE:
                case OPT_OFFLINE:
                        if (arg.list_connected >= 0 && arg.list_connected != (c == OPT_ONLINE))
                                return cli_usage_error("--online and --offline exclude each other");
                        arg.list_connected = c == OPT_ONLINE;
                        list_opts = true;
                        break;
                case OPT_PACKAGE:
                        if (arg.n_list_packages >= ELEMENTSOF(arg.list_packages))
                                return cli_usage_error("At most %zu --package options", ELEMENTSOF(arg.list_packages));
                        arg.list_packages[arg.n_list_packages++] = optarg;
                        list_opts = true;
                        break;
                case OPT_HEARD_WITHIN:
                case OPT_NOT_HEARD_WITHIN: {
                        long long *t = c == OPT_HEARD_WITHIN ? &arg.list_heard_within : &arg.list_not_heard_within;

                        if (provision_duration_parse(optarg, t) < 0)
                                return cli_usage_error("Invalid --%s '%s': expected seconds or a number with s, m, h, "
                                                       "d or w (90s, 30m, 12h, 7d, 52w)",
                                                       c == OPT_HEARD_WITHIN ? "heard-within" : "not-heard-within",
                                                       optarg);
                        list_opts = true;
                        break;
                }
                case ':':
                        return cli_usage_error("Option '%s' needs an argument", argv[optind - 1]);
                default: {
                        const char *o = argv[optind - 1];
                        if (o[0] == '-' && o[1] >= '0' && o[1] <= '9')
                                return cli_usage_error("Unknown option '%s'; put \"--\" before an argument "
                                                       "that starts with '-'",
                                                       o);
                        return cli_usage_error("Unknown option '%s'", o);
                }
                }
        }

        if (campaign < argc) {
                size_t k = 0;

                while (!streq(own_options[k].name, argv[campaign]))
                        k++;
                if (help_seen) {
                        own_options[k].help();
                        return 0;
                }
                if (optind < campaign)
                        return cli_usage_error("Unexpected argument '%s' before '%s'", argv[optind], argv[campaign]);
                if (ota_opts || token_opts || audit_opts || list_opts || expires || arg.device || arg.n_ota_tags ||
                    arg.reason || arg.private_ || arg.ttl >= 0 || arg.count > 0 || arg.resume || arg.n_scopes > 0 ||
                    arg.provision_uses > 0 || arg.webhook_prefix || arg.webhook_secret)
                        return cli_usage_error("Give the options of '%s' after the word '%s'", argv[campaign],
                                               argv[campaign]);
                *ret_func = own_options[k].func;
                *ret_optind = campaign + 1;
                return 1;
        }
        if (help_seen) {
                if (optind < argc && streq(argv[optind], "ota"))
                        ota_help();
                else
                        help();
                return 0;
        }
        if (optind >= argc)
                return cli_usage_error("Missing command");
        cmd = argv[optind];
        *ret_func = NULL;
        for (size_t i = 0; i < ELEMENTSOF(commands); i++)
                if (streq(commands[i].name, cmd))
                        *ret_func = commands[i].func;
        if (!*ret_func)
                return cli_usage_error("Unknown command '%s'", cmd);

        if ((arg.private_ || arg.ttl >= 0) && !streq(cmd, "publish"))
                return cli_usage_error("--private and --ttl are options of 'publish'");
        if (expires && streq(cmd, "ota")) {
                errno = 0;
                arg.ota_expires = strtoll(expires, &end, 10);
                if (errno || end == expires || *end || arg.ota_expires < 0)
                        return cli_usage_error("Invalid --expires '%s': expected Unix time in seconds", expires);
                ota_opts = true;
        } else if (expires && streq(cmd, "tokens")) {
                long long mult = 1;

                errno = 0;
                arg.token_expires = strtoll(expires, &end, 10);
                if (*end == 'd' || *end == 'h' || *end == 'm' || *end == 's') {
                        mult = *end == 'd' ? 86400 : *end == 'h' ? 3600 : *end == 'm' ? 60 : 1;
                        end++;
                }
                if (errno || end == expires || *end || arg.token_expires <= 0 ||
                    arg.token_expires > 3650LL * 86400 / mult)
                        return cli_usage_error("Invalid --expires '%s': expected a duration like 3600, 90m, 12h or 30d",
                                               expires);
                arg.token_expires *= mult;
        } else if (expires && streq(cmd, "provision")) {
                int k = provision_duration_parse(expires, &arg.provision_expires);

                if (k == -ERANGE)
                        return cli_usage_error("Invalid --expires '%s': a duration from 1 second to 10 years", expires);
                if (k < 0)
                        return cli_usage_error("Invalid --expires '%s': expected seconds or a number with s, m, h, d "
                                               "or w (90s, 30m, 12h, 7d, 52w)",
                                               expires);
        } else if (expires)
                return cli_usage_error("--expires is an option of 'ota', 'tokens create' and 'provision create'");
        if (arg.device && !streq(cmd, "subscribe") && !streq(cmd, "ota") && !streq(cmd, "tokens"))
                return cli_usage_error("--device is an option of 'subscribe', 'ota' and 'tokens create'");
        if (arg.n_ota_devices > 1 && streq(cmd, "subscribe"))
                return cli_usage_error("--device may be given once for 'subscribe'");
        if (arg.n_ota_tags > 0 && streq(cmd, "ota"))
                ota_opts = true;
        else if (arg.n_ota_tags > 0 && !streq(cmd, "tokens") && !streq(cmd, "provision") && !streq(cmd, "webhooks") &&
                 !streq(cmd, "list"))
                return cli_usage_error("--tag is an option of 'list', 'ota', 'tokens create', 'provision create' and "
                                       "'webhooks create'");
        if (list_opts && !streq(cmd, "list"))
                return cli_usage_error("--online, --offline, --package, --heard-within and --not-heard-within are "
                                       "options of 'list'");
        if ((arg.count > 0 || arg.resume) && !streq(cmd, "subscribe"))
                return cli_usage_error("--count and --resume are options of 'subscribe'");
        if (arg.n_scopes > 0 && !streq(cmd, "tokens"))
                return cli_usage_error("--scope is an option of 'tokens create'");
        if (token_opts && !streq(cmd, "tokens") && !streq(cmd, "provision") && !streq(cmd, "webhooks"))
                return cli_usage_error("--name is an option of 'tokens create', 'provision create' and 'webhooks "
                                       "create'");
        if ((arg.webhook_prefix || arg.webhook_secret) && !streq(cmd, "webhooks"))
                return cli_usage_error("--prefix and --secret are options of 'webhooks create'");
        if (arg.provision_uses > 0 && !streq(cmd, "provision"))
                return cli_usage_error("--uses is an option of 'provision create'");
        if (audit_opts && !streq(cmd, "audit"))
                return cli_usage_error("--follow, --action, --target and --after are options of 'audit'");
        if (arg.reason && !streq(cmd, "revoke"))
                return cli_usage_error("--reason is an option of 'revoke'");
        if (ota_opts && !streq(cmd, "ota"))
                return cli_usage_error("--key, --url, --manifest, --output, --min-version, --plugin, --expires, "
                                       "--valid-for, --tag, --allow-downgrade and --no-wait are options of 'ota'");

        *ret_optind = optind + 1;
        return 1;
}

int main(int argc, char **argv) {
        _cleanup_(api_done) Api a = {};
        CommandFunc func = NULL;
        int r, first = 0;

        log_open("tether");
        /* A reader that goes away must be an EPIPE we can handle, not a
         * signal that kills us mid-line. */
        signal(SIGPIPE, SIG_IGN);

        r = parse_argv(argc, argv, &func, &first);
        if (r <= 0)
                return r < 0 ? EXIT_USAGE : EXIT_SUCCESS;

        if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
                log_error("Failed to initialize libcurl");
                return EXIT_FAILURE_;
        }
        r = api_open(&a);
        if (r >= 0)
                r = func(&a, argv + first, argc - first);

        if (r >= 0 && (fflush(stdout) != 0 || ferror(stdout)) && errno != EPIPE)
                r = log_error_errno(-errno, "Failed to write to standard output: %m");

        api_done(&a);
        /* cppcheck-suppress unreadVariable ; done above; the _cleanup_ handler reads it */
        a = (Api){};
        curl_global_cleanup();
        return exit_code_from_errno(r);
}
