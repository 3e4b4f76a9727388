/* SPDX-License-Identifier: Apache-2.0 */
/* bench-call: round trips of a device function call through the cloud's
 * HTTP API (POST /v1/devices/{id}/{fn}), on ONE kept-alive HTTP connection
 * with TCP_NODELAY, timed with CLOCK_MONOTONIC. Prints figures (median,
 * p90, p99, max, calls/s per repetition and overall, optionally the memory
 * of the agent and cloud processes); it never judges them. How to read and
 * compare the figures: docs/design/benchmarks.md.
 *
 * Only libcurl and libc: it is built with "make tests/bench/bench-call". */
#include <curl/curl.h>
#include <getopt.h>
#include <inttypes.h>
#include <linux/tcp.h>
#include <netinet/in.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>

#include "util.h"

#define BENCH_DEFAULT_API "http://127.0.0.1:8080"
#define BENCH_TIMEOUT_MS 30000L
#define BENCH_BODY_MAX 65536

static struct {
        const char *api;
        const char *token;
        const char *device;
        const char *function;
        const char *argument;
        unsigned long n;
        unsigned long warmup;
        unsigned long reps;
        long agent_pid;
        long cloud_pid;
} arg = {
        .function = "echo",
        .argument = "hello",
        .n = 2000,
        .warmup = 200,
        .reps = 3,
};

typedef struct Bench {
        CURL *curl;
        char errbuf[CURL_ERROR_SIZE];
        char body[BENCH_BODY_MAX + 1];
        size_t body_len;
        long connects; /* connections libcurl opened so far */
        unsigned long errors;
        bool error_shown;
} Bench;

typedef struct Stats {
        double median, p90, p99, max; /* milliseconds */
        double calls_per_sec;
        size_t n;
} Stats;

static uint64_t now_nsec(void) {
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static size_t body_write(char *p, size_t size, size_t n, void *userdata) {
        Bench *b = userdata;
        size_t room = BENCH_BODY_MAX - b->body_len;
        size_t k = n < room ? n : room;

        memcpy(b->body + b->body_len, p, k);
        b->body_len += k;
        b->body[b->body_len] = '\0';
        return n;
}

/* One call; returns its round trip in nanoseconds, or 0 if it failed. */
static uint64_t bench_call(Bench *b) {
        long status = 0, connects = 0;
        uint64_t t0, t1;
        CURLcode c;

        b->body_len = 0;
        b->body[0] = '\0';
        b->errbuf[0] = '\0';

        t0 = now_nsec();
        c = curl_easy_perform(b->curl);
        t1 = now_nsec();

        curl_easy_getinfo(b->curl, CURLINFO_NUM_CONNECTS, &connects);
        b->connects += connects;
        if (c == CURLE_OK)
                curl_easy_getinfo(b->curl, CURLINFO_RESPONSE_CODE, &status);

        if (c != CURLE_OK || status != 200 || !strstr(b->body, "\"return_value\"")) {
                b->errors++;
                if (!b->error_shown) {
                        b->error_shown = true;
                        if (c != CURLE_OK)
                                fprintf(stderr, "bench-call: call failed: %s\n",
                                        b->errbuf[0] ? b->errbuf : curl_easy_strerror(c));
                        else
                                fprintf(stderr, "bench-call: call failed: HTTP %ld: %.200s\n", status, b->body);
                }
                return 0;
        }
        return t1 - t0 > 0 ? t1 - t0 : 1;
}

static int cmp_u64(const void *a, const void *b) {
        uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
        return x < y ? -1 : x > y;
}

/* Nearest-rank percentile (p in percent) of sorted samples, in ms. */
static double percentile_ms(const uint64_t *s, size_t n, unsigned p) {
        size_t rank = (p * n + 99) / 100;

        if (rank < 1)
                rank = 1;
        if (rank > n)
                rank = n;
        return (double)s[rank - 1] / 1e6;
}

static Stats stats_compute(uint64_t *s, size_t n, uint64_t elapsed_ns, unsigned long calls) {
        Stats st = { .n = n };

        if (n == 0)
                return st;
        qsort(s, n, sizeof(*s), cmp_u64);
        st.median = n % 2 ? (double)s[n / 2] / 1e6 : ((double)s[n / 2 - 1] + (double)s[n / 2]) / 2e6;
        st.p90 = percentile_ms(s, n, 90);
        st.p99 = percentile_ms(s, n, 99);
        st.max = (double)s[n - 1] / 1e6;
        st.calls_per_sec = elapsed_ns ? (double)calls * 1e9 / (double)elapsed_ns : 0;
        return st;
}

static void stats_print(const char *label, const Stats *st, unsigned long errors) {
        if (st->n == 0) {
                printf("%-5s  %10s  %10s  %10s  %10s  %10s  %7lu\n", label, "-", "-", "-", "-", "-", errors);
                return;
        }
        printf("%-5s  %10.3f  %10.3f  %10.3f  %10.3f  %10.1f  %7lu\n", label, st->median, st->p90, st->p99,
               st->max, st->calls_per_sec, errors);
}

static void print_memory(const char *who, long pid, const char *when) {
        char path[64], line[256], rss[64] = "?", anon[64] = "?";
        FILE *f;

        if (pid <= 0)
                return;
        snprintf(path, sizeof(path), "/proc/%ld/status", pid);
        f = fopen(path, "re");
        if (!f) {
                printf("%s (pid %ld) %s: memory unavailable: %s\n", who, pid, when, strerror(errno));
                return;
        }
        while (fgets(line, sizeof(line), f)) {
                if (startswith(line, "VmRSS:"))
                        sscanf(line + 6, " %63[^\n]", rss);
                else if (startswith(line, "RssAnon:"))
                        sscanf(line + 8, " %63[^\n]", anon);
        }
        fclose(f);
        printf("%s (pid %ld) %s: VmRSS %s, RssAnon %s\n", who, pid, when, rss, anon);
}

/* Bytes the kernel counted on the connection's socket, both directions:
 * HTTP plus any TLS overhead, without IP/TCP headers. */
static bool socket_bytes(Bench *b, uint64_t *ret) {
        curl_socket_t fd = CURL_SOCKET_BAD;
        struct tcp_info ti;
        socklen_t len = sizeof(ti);

        if (curl_easy_getinfo(b->curl, CURLINFO_ACTIVESOCKET, &fd) != CURLE_OK || fd == CURL_SOCKET_BAD)
                return false;
        memset(&ti, 0, sizeof(ti));
        if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &len) < 0 ||
            len < offsetof(struct tcp_info, tcpi_bytes_received) + sizeof(ti.tcpi_bytes_received))
                return false;
        *ret = ti.tcpi_bytes_acked + ti.tcpi_bytes_received;
        return true;
}

static void help(void) {
        printf("Usage: bench-call --device ID [OPTIONS]\n"
               "\n"
               "Time function calls through the tether cloud's HTTP API on one connection.\n"
               "\n"
               "  --api URL          API base URL (default: $TETHER_API, else " BENCH_DEFAULT_API ")\n"
               "  --token TOKEN      bearer token (default: $TETHER_TOKEN)\n"
               "  --device ID        device to call (required)\n"
               "  --function NAME    function to call (default: echo)\n"
               "  --arg TEXT         its argument (default: hello)\n"
               "  -n N               calls per repetition (default: 2000)\n"
               "  --warmup N         calls before measuring (default: 200)\n"
               "  --reps N           repetitions (default: 3)\n"
               "  --agent-pid PID    print VmRSS/RssAnon of the agent\n"
               "  --cloud-pid PID    print VmRSS/RssAnon of the cloud\n"
               "  -h, --help         show this help\n");
}

static bool parse_ulong(const char *s, unsigned long min, unsigned long *ret) {
        char *end;
        unsigned long long v;

        errno = 0;
        if (*s == '-')
                return false;
        v = strtoull(s, &end, 10);
        if (errno || end == s || *end || v < min || v > ULONG_MAX / 2)
                return false;
        *ret = (unsigned long)v;
        return true;
}

static int parse_argv(int argc, char **argv) {
        enum { OPT_API = 0x100, OPT_TOKEN, OPT_DEVICE, OPT_FUNCTION, OPT_ARG, OPT_WARMUP, OPT_REPS,
               OPT_AGENT_PID, OPT_CLOUD_PID };
        static const struct option options[] = {
                { "api", required_argument, NULL, OPT_API },
                { "token", required_argument, NULL, OPT_TOKEN },
                { "device", required_argument, NULL, OPT_DEVICE },
                { "function", required_argument, NULL, OPT_FUNCTION },
                { "arg", required_argument, NULL, OPT_ARG },
                { "warmup", required_argument, NULL, OPT_WARMUP },
                { "reps", required_argument, NULL, OPT_REPS },
                { "agent-pid", required_argument, NULL, OPT_AGENT_PID },
                { "cloud-pid", required_argument, NULL, OPT_CLOUD_PID },
                { "help", no_argument, NULL, 'h' },
                {},
        };
        unsigned long v;
        int c, idx = -1;

        while ((c = getopt_long(argc, argv, "hn:", options, &idx)) >= 0) {
                switch (c) {
                case 'h':
                        help();
                        return 0;
                case OPT_API:
                        arg.api = optarg;
                        break;
                case OPT_TOKEN:
                        arg.token = optarg;
                        break;
                case OPT_DEVICE:
                        arg.device = optarg;
                        break;
                case OPT_FUNCTION:
                        arg.function = optarg;
                        break;
                case OPT_ARG:
                        arg.argument = optarg;
                        break;
                case 'n':
                        if (!parse_ulong(optarg, 1, &arg.n))
                                goto bad;
                        break;
                case OPT_WARMUP:
                        if (!parse_ulong(optarg, 0, &arg.warmup))
                                goto bad;
                        break;
                case OPT_REPS:
                        if (!parse_ulong(optarg, 1, &arg.reps))
                                goto bad;
                        break;
                case OPT_AGENT_PID:
                case OPT_CLOUD_PID:
                        if (!parse_ulong(optarg, 1, &v))
                                goto bad;
                        *(c == OPT_AGENT_PID ? &arg.agent_pid : &arg.cloud_pid) = (long)v;
                        break;
                default:
                        fprintf(stderr, "bench-call: see --help\n");
                        return -EINVAL;
                }
        }
        if (optind < argc) {
                fprintf(stderr, "bench-call: unexpected argument '%s'\n", argv[optind]);
                return -EINVAL;
        }
        if (!arg.device) {
                fprintf(stderr, "bench-call: --device is required\n");
                return -EINVAL;
        }
        if (!arg.api)
                arg.api = getenv("TETHER_API") ?: BENCH_DEFAULT_API;
        if (!arg.token)
                arg.token = getenv("TETHER_TOKEN");
        return 1;
bad:
        fprintf(stderr, "bench-call: invalid value '%s' for %s%s\n", optarg, c == 'n' ? "-" : "--",
                c == 'n' ? "n" : options[idx].name);
        return -EINVAL;
}

int main(int argc, char **argv) {
        static Bench b;
        _cleanup_free_ char *url = NULL, *form = NULL, *auth = NULL;
        _cleanup_free_ uint64_t *all = NULL;
        struct curl_slist *headers = NULL;
        uint64_t bytes0 = 0, bytes1 = 0, elapsed_all = 0;
        double rep_median_min = 0, rep_median_max = 0;
        long connects_before;
        bool have_bytes;
        size_t n_all = 0, api_len;
        char *esc;
        int r, ret = EXIT_FAILURE;

        r = parse_argv(argc, argv);
        if (r <= 0)
                return r < 0 ? 2 : EXIT_SUCCESS;

        if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK || !(b.curl = curl_easy_init())) {
                fprintf(stderr, "bench-call: failed to initialize libcurl\n");
                return EXIT_FAILURE;
        }
        esc = curl_easy_escape(b.curl, arg.argument, 0);
        if (!esc)
                goto oom;
        r = asprintf(&form, "arg=%s", esc);
        curl_free(esc);
        if (r < 0)
                goto oom;
        api_len = strlen(arg.api);
        while (api_len > 0 && arg.api[api_len - 1] == '/')
                api_len--;
        if (asprintf(&url, "%.*s/v1/devices/%s/%s", (int)api_len, arg.api, arg.device, arg.function) < 0)
                goto oom;
        if (arg.token) {
                if (asprintf(&auth, "Authorization: Bearer %s", arg.token) < 0)
                        goto oom;
                headers = curl_slist_append(headers, auth);
        }
        headers = curl_slist_append(headers, "Expect:");
        if (!headers)
                goto oom;

        curl_easy_setopt(b.curl, CURLOPT_URL, url);
        curl_easy_setopt(b.curl, CURLOPT_POSTFIELDS, form);
        curl_easy_setopt(b.curl, CURLOPT_POSTFIELDSIZE, (long)strlen(form));
        curl_easy_setopt(b.curl, CURLOPT_HTTPHEADER, headers);
        curl_easy_setopt(b.curl, CURLOPT_TCP_NODELAY, 1L);
        curl_easy_setopt(b.curl, CURLOPT_WRITEFUNCTION, body_write);
        curl_easy_setopt(b.curl, CURLOPT_WRITEDATA, &b);
        curl_easy_setopt(b.curl, CURLOPT_ERRORBUFFER, b.errbuf);
        curl_easy_setopt(b.curl, CURLOPT_TIMEOUT_MS, BENCH_TIMEOUT_MS);
        curl_easy_setopt(b.curl, CURLOPT_USERAGENT, "tether-bench-call");

        all = calloc(arg.n * arg.reps, sizeof(*all));
        if (!all)
                goto oom;

        printf("bench-call: POST %s arg='%s'\n", url, arg.argument);
        printf("%lu calls x %lu repetitions after %lu warm-up calls; one connection, TCP_NODELAY\n", arg.n,
               arg.reps, arg.warmup);

        /* The first call opens the connection; if it fails there is
         * nothing to measure. */
        if (bench_call(&b) == 0) {
                fprintf(stderr, "bench-call: the first call failed, not measuring\n");
                goto out;
        }
        for (unsigned long i = 1; i < arg.warmup; i++)
                bench_call(&b);
        if (b.errors > 0)
                printf("warm-up: %lu of %lu calls failed\n", b.errors, arg.warmup ? arg.warmup : 1);
        print_memory("agent", arg.agent_pid, "after warm-up");
        print_memory("cloud", arg.cloud_pid, "after warm-up");

        connects_before = b.connects;
        have_bytes = socket_bytes(&b, &bytes0);

        printf("\n%-5s  %10s  %10s  %10s  %10s  %10s  %7s\n", "rep", "median ms", "p90 ms", "p99 ms", "max ms",
               "calls/s", "errors");
        for (unsigned long rep = 0; rep < arg.reps; rep++) {
                uint64_t *s = all + n_all, t0, elapsed;
                unsigned long errors0 = b.errors;
                size_t n = 0;
                char label[24];
                Stats st;

                t0 = now_nsec();
                for (unsigned long i = 0; i < arg.n; i++) {
                        uint64_t d = bench_call(&b);
                        if (d)
                                s[n++] = d;
                }
                elapsed = now_nsec() - t0;
                elapsed_all += elapsed;
                n_all += n;

                /* stats_compute sorts in place: fine, "all" is sorted again. */
                st = stats_compute(s, n, elapsed, arg.n);
                snprintf(label, sizeof(label), "%lu", rep + 1);
                stats_print(label, &st, b.errors - errors0);
                if (st.n > 0) {
                        if (rep_median_min == 0 || st.median < rep_median_min)
                                rep_median_min = st.median;
                        if (st.median > rep_median_max)
                                rep_median_max = st.median;
                }
        }
        {
                Stats st = stats_compute(all, n_all, elapsed_all, arg.n * arg.reps);
                unsigned long failed = arg.n * arg.reps - n_all;
                stats_print("all", &st, failed);
                if (n_all > 0)
                        printf("\nmedian over repetitions: %.3f .. %.3f ms\n", rep_median_min, rep_median_max);
        }

        printf("connections opened: %ld (%ld during measurement)\n", b.connects, b.connects - connects_before);
        if (have_bytes && b.connects == connects_before && socket_bytes(&b, &bytes1))
                printf("bytes on the HTTP connection per call (TCP_INFO, both directions): %.1f\n",
                       (double)(bytes1 - bytes0) / (double)(arg.n * arg.reps));
        print_memory("agent", arg.agent_pid, "at end");
        print_memory("cloud", arg.cloud_pid, "at end");
        ret = EXIT_SUCCESS;
        goto out;

oom:
        fprintf(stderr, "bench-call: out of memory\n");
out:
        fflush(stdout);
        curl_slist_free_all(headers);
        curl_easy_cleanup(b.curl);
        curl_global_cleanup();
        return ret;
}
