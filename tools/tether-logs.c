/* SPDX-License-Identifier: Apache-2.0 */
/* tether logs: a device's journal through the cloud (GET
 * /v1/devices/ID/logs, docs/cloud.md), one entry per line in the style of
 * journalctl's short output, or the entries' JSON with --json.
 *
 * Everything printed comes from the device: each entry is parsed as JSON
 * (a line longer than LOGS_LINE_MAX or not a JSON object is skipped with
 * a warning), and its text is printed with every control character
 * escaped, so a device cannot send escape sequences to the terminal. */
#include <getopt.h>
#include <inttypes.h>
#include <signal.h>
#include <time.h>

#include "log.h"
#include "tether-cli.h"

#define LOGS_LINE_MAX (1u << 20) /* bytes of one NDJSON line (a message is at most 16 KiB) */
#define LOGS_UNITS_MAX 16        /* the device's limit */
#define LOGS_LINES_MAX 10000
#define LOGS_STALL_SEC 60L /* without -f: nothing received for this long ends it */

typedef struct Logs {
        Api *api;
        Buffer line;
        bool checked, failed, stdout_gone;
        int error; /* negative errno */
        unsigned long skipped;
} Logs;

static volatile sig_atomic_t logs_interrupted;

static void logs_signal(int sig) {
        logs_interrupted = 1;
}

/* s as one line of text: C0 controls, DEL and C1 controls (U+0080..U+009F)
 * escaped; anything else (valid UTF-8, jansson checked it) as it is. */
static void print_text(const char *s, size_t len) {
        const unsigned char *p = (const unsigned char *)s, *end = p + len;

        for (; p < end; p++) {
                if (*p == '\n')
                        fputs("\\n", stdout);
                else if (*p == '\r')
                        fputs("\\r", stdout);
                else if (*p == '\t')
                        fputs("\\t", stdout);
                else if (*p < 0x20 || *p == 0x7f)
                        printf("\\x%02x", *p);
                else if (*p == 0xc2 && p + 1 < end && p[1] >= 0x80 && p[1] <= 0x9f)
                        printf("\\u%04x", *++p);
                else
                        putchar(*p);
        }
}

static void print_entry(json_t *e) {
        json_t *rt = json_object_get(e, "realtime"), *pid = json_object_get(e, "pid");
        json_t *msg = json_object_get(e, "message");
        const char *ident = json_string_value(json_object_get(e, "identifier"));
        char when[64] = "";

        if (json_is_integer(rt) && json_integer_value(rt) >= 0) {
                time_t secs = (time_t)(json_integer_value(rt) / 1000000);
                struct tm tm;

                if (localtime_r(&secs, &tm))
                        strftime(when, sizeof(when), "%b %d %H:%M:%S", &tm);
        }
        if (!when[0]) {
                const char *t = json_string_value(json_object_get(e, "time"));
                print_text(t ?: "-", strlen(t ?: "-"));
        } else
                fputs(when, stdout);
        putchar(' ');
        if (!ident || !*ident)
                ident = json_string_value(json_object_get(e, "unit"));
        if (!ident || !*ident)
                ident = "?";
        print_text(ident, strlen(ident));
        if (json_is_integer(pid))
                printf("[%" JSON_INTEGER_FORMAT "]", json_integer_value(pid));
        fputs(": ", stdout);
        if (json_is_string(msg))
                print_text(json_string_value(msg), json_string_length(msg));
        putchar('\n');
}

static void logs_line(Logs *l, const char *s, size_t len) {
        json_error_t jerr;
        json_t *e;

        if (len == 0)
                return;
        e = json_loadb(s, len, 0, &jerr);
        if (!json_is_object(e)) {
                json_decref(e);
                if (l->skipped++ == 0)
                        log_warning("Warning: skipping a malformed journal entry from the device: %s",
                                    e ? "not a JSON object" : jerr.text);
                return;
        }
        if (arg.json) {
                /* Re-encoded: what reaches stdout is JSON whatever the
                 * device sent. */
                char *text = json_dumps(e, JSON_COMPACT | JSON_PRESERVE_ORDER);

                if (text)
                        printf("%s\n", text);
                free(text);
        } else
                print_entry(e);
        json_decref(e);
        if (fflush(stdout) != 0 || ferror(stdout)) {
                if (errno == EPIPE)
                        l->stdout_gone = true;
                else
                        l->error = log_error_errno(-errno, "Failed to write to standard output: %m");
        }
}

static size_t logs_write(char *p, size_t size, size_t n, void *userdata) {
        Logs *l = userdata;
        Api *a = l->api;

        if (!l->checked) {
                l->checked = true;
                curl_easy_getinfo(a->curl, CURLINFO_RESPONSE_CODE, &a->status);
                l->failed = a->status != 200;
        }
        if (l->failed)
                return buffer_append(&a->body, p, n) < 0 ? 0 : n;

        for (size_t i = 0; i < n; i++) {
                const char *nl = memchr(p + i, '\n', n - i);
                size_t k = nl ? (size_t)(nl - (p + i)) : n - i;

                if (buffer_append(&l->line, p + i, k) < 0) {
                        log_error("A journal entry from the device is larger than %u bytes", LOGS_LINE_MAX);
                        l->error = -EFBIG;
                        return 0;
                }
                i += k;
                if (!nl)
                        break;
                logs_line(l, l->line.data ?: "", l->line.len);
                l->line.len = 0;
                if (l->stdout_gone || l->error < 0)
                        return 0;
        }
        return n;
}

static int logs_progress(void *userdata, curl_off_t dltotal, curl_off_t dlnow, curl_off_t ultotal,
                         curl_off_t ulnow) {
        return logs_interrupted ? 1 : 0;
}

/* --since: RFC 3339 or Unix seconds, as the cloud takes them, or a
 * duration back from now (90s, 30m, 12h, 7d). */
static int since_arg(const char *s, char out[static 32], const char **ret) {
        long long d;

        if (!s)
                return 0;
        if (provision_duration_parse(s, &d) == 0 && !(s[strspn(s, "0123456789")] == '\0')) {
                snprintf(out, 32, "%lld", (long long)time(NULL) - d);
                *ret = out;
                return 0;
        }
        if (!(s[0] >= '0' && s[0] <= '9') || strlen(s) > 64 || strpbrk(s, " \t\r\n"))
                return -EINVAL;
        *ret = s;
        return 0;
}

int cmd_logs(Api *a, char **args, int n) {
        static const struct option options[] = {
                { "unit", required_argument, NULL, 'u' },
                { "since", required_argument, NULL, 'S' },
                { "lines", required_argument, NULL, 'n' },
                { "follow", no_argument, NULL, 'f' },
                { "json", no_argument, NULL, 'j' },
                { "help", no_argument, NULL, 'h' },
                {},
        };
        const char *units[LOGS_UNITS_MAX], *since = NULL, *device;
        struct sigaction sa = { .sa_handler = logs_signal };
        _cleanup_free_ char *url = NULL, *query = NULL;
        char since_buf[32];
        size_t n_units = 0;
        long long lines = -1;
        bool follow = false;
        Logs l = { .api = a, .line.max = LOGS_LINE_MAX };
        CURLcode cc;
        char *end;
        int c, r;

        optind = 0;
        opterr = 0;
        while ((c = getopt_long(n + 1, args - 1, ":hfn:", options, NULL)) >= 0) {
                switch (c) {
                case 'u':
                        if (n_units >= LOGS_UNITS_MAX)
                                return cli_usage_error("At most %d --unit options", LOGS_UNITS_MAX);
                        if (!*optarg || strlen(optarg) > 256)
                                return cli_usage_error("Invalid --unit '%s'", optarg);
                        units[n_units++] = optarg;
                        break;
                case 'S':
                        if (since_arg(optarg, since_buf, &since) < 0)
                                return cli_usage_error("Invalid --since '%s': expected RFC 3339 time "
                                                       "(2026-12-07T13:00:00Z), Unix seconds or a duration "
                                                       "back from now (90s, 30m, 12h, 7d)",
                                                       optarg);
                        break;
                case 'n':
                        errno = 0;
                        lines = strtoll(optarg, &end, 10);
                        if (errno || end == optarg || *end || lines < 0 || lines > LOGS_LINES_MAX)
                                return cli_usage_error("Invalid --lines '%s': expected 0 to %d", optarg,
                                                       LOGS_LINES_MAX);
                        break;
                case 'f':
                        follow = true;
                        break;
                case 'j':
                        arg.json = true;
                        break;
                case 'h':
                        logs_help();
                        return 0;
                case ':':
                        return cli_usage_error("Option '%s' needs an argument", args[optind - 2]);
                default:
                        return cli_usage_error("Unknown option '%s' of 'logs'", args[optind - 2]);
                }
        }
        if (n + 1 - optind != 1)
                return cli_usage_error("'logs' takes one argument, DEVICE");
        device = args[optind - 1];
        r = name_check(device, PROTO_NAME_DEVICE);
        if (r < 0)
                return r;

        query = strdup("");
        if (!query)
                return log_error_errno(-ENOMEM, "Out of memory");
        for (size_t i = 0; i < n_units; i++) {
                char *v = curl_easy_escape(a->curl, units[i], 0), *q = NULL;

                if (!v || asprintf(&q, "%s&unit=%s", query, v) < 0) {
                        curl_free(v);
                        return log_error_errno(-ENOMEM, "Out of memory");
                }
                curl_free(v);
                free(query);
                query = q;
        }
        {
                char *v = since ? curl_easy_escape(a->curl, since, 0) : NULL;
                char num[32] = "";

                if (lines >= 0)
                        snprintf(num, sizeof(num), "%lld", lines);
                /* Every argument as "&k=v"; the first '&' becomes the '?'. */
                if ((since && !v) ||
                    asprintf(&url, "%s/v1/devices/%s/logs%s%s%s%s%s%s", a->base, device, follow ? "&follow=1" : "",
                             since ? "&since=" : "", v ?: "", num[0] ? "&lines=" : "", num, query) < 0) {
                        curl_free(v);
                        url = NULL;
                        return log_error_errno(-ENOMEM, "Out of memory");
                }
                curl_free(v);
                end = strchr(url + strlen(a->base), '&');
                if (end)
                        *end = '?';
        }

        sigemptyset(&sa.sa_mask);
        sigaction(SIGINT, &sa, NULL);
        sigaction(SIGTERM, &sa, NULL);

        buffer_done(&a->body);
        a->body.max = TETHER_RESPONSE_MAX;
        a->errbuf[0] = '\0';
        a->what_400 = "The cloud refused the request";
        curl_easy_setopt(a->curl, CURLOPT_URL, url);
        curl_easy_setopt(a->curl, CURLOPT_HTTPGET, 1L);
        curl_easy_setopt(a->curl, CURLOPT_WRITEFUNCTION, logs_write);
        curl_easy_setopt(a->curl, CURLOPT_WRITEDATA, &l);
        curl_easy_setopt(a->curl, CURLOPT_NOPROGRESS, 0L);
        curl_easy_setopt(a->curl, CURLOPT_XFERINFOFUNCTION, logs_progress);
        curl_easy_setopt(a->curl, CURLOPT_TCP_KEEPALIVE, 1L);
        if (!follow) {
                curl_easy_setopt(a->curl, CURLOPT_LOW_SPEED_LIMIT, 1L);
                curl_easy_setopt(a->curl, CURLOPT_LOW_SPEED_TIME, LOGS_STALL_SEC);
        }
        /* Without --timeout, -f runs until interrupted. */
        api_set_timeouts(a, arg.timeout_ms > 0 ? arg.timeout_ms : 0);

        cc = curl_easy_perform(a->curl);
        if (l.failed) {
                buffer_done(&l.line);
                if (a->status == 403) {
                        char text[TETHER_ERROR_TEXT_MAX + 1];

                        error_text(&a->body, text, sizeof(text));
                        log_error("logs of %s refused: %s", device, text[0] ? text : "HTTP 403");
                        return -EACCES;
                }
                return http_error(a, a->what_400);
        }
        if (l.line.len > 0 && l.error == 0 && !l.stdout_gone && cc == CURLE_OK)
                logs_line(&l, l.line.data, l.line.len); /* a last line without its newline */
        buffer_done(&l.line);
        if (l.skipped > 1)
                log_warning("Warning: skipped %lu malformed journal entries", l.skipped);
        if (l.error < 0)
                return l.error;
        if (l.stdout_gone)
                return 0;
        if (cc == CURLE_ABORTED_BY_CALLBACK && logs_interrupted)
                return 0;
        if (cc == CURLE_OPERATION_TIMEDOUT && arg.timeout_ms > 0)
                return 0; /* --timeout bounds a collection */
        if (cc == CURLE_OK && follow) {
                log_error("The log stream of %s ended (the device disconnected, or the cloud closed it)", device);
                return -ECONNRESET;
        }
        if (cc != CURLE_OK)
                return curl_error(a, cc);
        return 0;
}

void logs_help(void) {
        printf("Usage: tether [OPTIONS] logs DEVICE [--unit UNIT]... [--since TIME] [-n LINES] [-f] [--json]\n"
               "\n"
               "Print the device's journal: by default the tether units' last 10 entries.\n"
               "The device must allow it ([Logs] in tetherd.conf).\n"
               "\n"
               "  --unit UNIT      only this systemd unit (repeatable; the device's [Logs] Units=\n"
               "                   says which besides the tether units)\n"
               "  --since TIME     entries from TIME: RFC 3339 (2026-12-07T13:00:00Z), Unix\n"
               "                   seconds, or a duration back from now (90s, 30m, 12h, 7d)\n"
               "  -n, --lines N    the last N entries (0 to 10000)\n"
               "  -f, --follow     keep printing new entries until interrupted\n"
               "  --json           one JSON object per entry, as the device sent it\n");
}
