/* SPDX-License-Identifier: Apache-2.0 */
/* tetherctl: the device-side CLI. Talks to tetherd over its local socket
 * (one JSON request, one JSON response per connection; agent/local-api.h)
 * and makes the device key and certificate request for enrollment.
 *
 * Failures are one line "tetherctl: <reason>" on stderr; stdout carries
 * only results. Exit codes: 0 ok, 1 failure, 2 usage, 3 permission
 * denied, 4 the agent is not running (cannot connect). */
#include <fcntl.h>
#include <getopt.h>
#include <jansson.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>

#include <openssl/evp.h>

#include "cli-common.h"
#include "csr.h"
#include "log.h"
#include "proto.h"
#include "util.h"

#define TETHERCTL_DEFAULT_SOCKET "/run/tether/tetherd.sock"
#define TETHERCTL_DEFAULT_KEY LOCALSTATEDIR "/lib/tether/device.key"
#define TETHERCTL_TIMEOUT_MS 10000
#define TETHERCTL_RESPONSE_MAX (4u << 20)

enum {
        EXIT_USAGE = CLI_EXIT_USAGE,
        EXIT_DENIED = 3,
        EXIT_NOT_RUNNING = 4,
};

static struct {
        const char *socket;
        const char *key;
        const char *id;
        const char *token;
        const char *token_file;
        long long ttl;
        bool private_;
        bool json;
        bool force;
        bool no_wait;
        long long wait_sec;
} arg = {
        .wait_sec = 120,
        .ttl = -1,
};

/* --- talking to tetherd ---------------------------------------------------- */

static int wait_fd(int fd, short events, long long deadline_usec) {
        long long left = deadline_usec - (long long)now_usec();
        struct pollfd p = { .fd = fd, .events = events };
        int r;

        if (left <= 0)
                return -ETIMEDOUT;
        r = poll(&p, 1, (int)((left + 999) / 1000));
        if (r < 0)
                return errno == EINTR ? 0 : -errno;
        return r == 0 ? -ETIMEDOUT : 0;
}

/* Send one request, return the parsed response (caller decrefs) or an exit
 * code after reporting. Takes the reference to req (NULL: out of memory). */
static int request(json_t *req, json_t **ret) {
        /* cppcheck-suppress unreadVariable ; the _cleanup_ handler drops the reference */
        _cleanup_(json_decrefp) json_t *owned = req;
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        _cleanup_close_ int fd = -1;
        _cleanup_free_ char *out = NULL, *in = NULL;
        size_t out_len, out_done = 0, in_len = 0;
        long long deadline = (long long)now_usec() + TETHERCTL_TIMEOUT_MS * 1000LL;
        json_error_t err;
        json_t *resp;
        int r;

        if (strlen(arg.socket) >= sizeof(sa.sun_path))
                return cli_usage_error("Socket path '%s' is too long", arg.socket), EXIT_USAGE;
        memcpy(sa.sun_path, arg.socket, strlen(arg.socket));
        out = req ? json_dumps(req, JSON_COMPACT) : NULL;
        in = malloc(TETHERCTL_RESPONSE_MAX + 1);
        if (!out || !in)
                return log_error("Out of memory"), 1;
        out_len = strlen(out);

        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (fd < 0)
                return log_error_errno(errno, "Cannot create a socket: %m"), 1;
        if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
                r = errno;
                if (r == ENOENT || r == ECONNREFUSED)
                        return log_error("tetherd is not running (nothing listens on '%s')", arg.socket),
                               EXIT_NOT_RUNNING;
                if (r == EACCES)
                        return log_error("Permission denied to connect to '%s'", arg.socket), EXIT_DENIED;
                return log_error_errno(r, "Cannot connect to '%s': %m", arg.socket), 1;
        }
        while (out_done < out_len) {
                ssize_t n = send(fd, out + out_done, out_len - out_done, MSG_NOSIGNAL);

                if (n < 0 && errno == EAGAIN) {
                        r = wait_fd(fd, POLLOUT, deadline);
                        if (r < 0)
                                return log_error_errno(r, "Sending to tetherd failed: %m"), 1;
                        continue;
                }
                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0) {
                        /* The agent may refuse us before reading the request:
                         * its answer is still there to read. */
                        if (errno == EPIPE || errno == ECONNRESET)
                                break;
                        return log_error_errno(errno, "Sending to tetherd failed: %m"), 1;
                }
                out_done += (size_t)n;
        }
        (void)shutdown(fd, SHUT_WR);
        for (;;) {
                ssize_t n = recv(fd, in + in_len, TETHERCTL_RESPONSE_MAX - in_len, 0);

                if (n < 0 && errno == EAGAIN) {
                        r = wait_fd(fd, POLLIN, deadline);
                        if (r < 0)
                                return log_error_errno(r, "No answer from tetherd: %m"), 1;
                        continue;
                }
                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0)
                        return log_error_errno(errno, "Reading from tetherd failed: %m"), 1;
                if (n == 0)
                        break;
                in_len += (size_t)n;
                if (in_len >= TETHERCTL_RESPONSE_MAX)
                        return log_error("The answer from tetherd is larger than %u bytes", TETHERCTL_RESPONSE_MAX),
                               1;
        }
        resp = json_loadb(in, in_len, 0, &err);
        if (!resp || !json_is_object(resp)) {
                json_decref(resp);
                return log_error("tetherd sent an answer that is not a JSON object"), 1;
        }
        if (!json_is_true(json_object_get(resp, "ok"))) {
                const char *e = json_string_value(json_object_get(resp, "error"));
                json_int_t code = json_integer_value(json_object_get(resp, "errno"));

                log_error("%s", e ? e : "tetherd refused the request");
                json_decref(resp);
                return code == EACCES ? EXIT_DENIED : 1;
        }
        *ret = resp;
        return 0;
}

static void print_duration(double sec) {
        unsigned long long s = (unsigned long long)sec;

        if (s >= 86400)
                printf("%llud %02lluh %02llum", s / 86400, s % 86400 / 3600, s % 3600 / 60);
        else if (s >= 3600)
                printf("%lluh %02llum %02llus", s / 3600, s % 3600 / 60, s % 60);
        else if (s >= 60)
                printf("%llum %02llus", s / 60, s % 60);
        else
                printf("%.1fs", sec);
}

static void print_list(const char *label, json_t *a) {
        size_t i;
        json_t *v;

        printf("%-12s", label);
        if (json_array_size(a) == 0)
                printf("(none)");
        json_array_foreach(a, i, v) printf("%s%s", i ? " " : "", json_string_value(v));
        printf("\n");
}

static void print_time(const char *label, json_t *t) {
        time_t when = (time_t)json_integer_value(t);
        struct tm tm;
        char buf[64];

        if (!json_is_integer(t) || !gmtime_r(&when, &tm) || !strftime(buf, sizeof(buf), "%Y-%m-%d %H:%M:%S UTC", &tm))
                return;
        printf("%s%s", label, buf);
}

/* The certificate and enrollment lines of status. */
static void print_certificate(json_t *st) {
        json_t *cert = json_object_get(st, "certificate"), *enr = json_object_get(st, "enrollment");
        json_t *last = json_object_get(cert, "last_renewal");
        const char *state = json_string_value(json_object_get(enr, "state"));

        if (json_is_object(cert)) {
                printf("%-12s%s\n", "Device ID:", json_string_value(json_object_get(cert, "device_id")));
                print_time("Certificate: valid until ", json_object_get(cert, "not_after"));
                if (json_is_true(json_object_get(cert, "renew")))
                        print_time(", renewal from ", json_object_get(cert, "renew_at"));
                printf("\n");
                if (json_is_object(last)) {
                        print_time("Renewed:    last attempt ", json_object_get(last, "at"));
                        printf(": %s%s%s\n", json_string_value(json_object_get(last, "result")),
                               json_object_get(last, "error") ? ": " : "",
                               json_string_value(json_object_get(last, "error")) ?: "");
                }
        } else
                printf("%-12s%s\n", "Certificate:", "(none: not enrolled)");
        if (state && !streq(state, "none"))
                printf("%-12s%s%s%s\n", "Enrollment:", state, json_object_get(enr, "error") ? ": " : "",
                       json_string_value(json_object_get(enr, "error")) ?: "");
}

/* "Cloud: host:port", and which of several Host= entries it is. */
static void print_cloud(json_t *st) {
        const char *host = json_string_value(json_object_get(st, "cloud_host")) ?: "";
        json_int_t port = json_integer_value(json_object_get(st, "cloud_port"));
        json_t *hosts = json_object_get(st, "cloud_hosts"), *h;
        size_t i;

        printf(strchr(host, ':') ? "%-12s[%s]:%lld" : "%-12s%s:%lld", "Cloud:", host, (long long)port);
        if (json_array_size(hosts) > 1)
                json_array_foreach (hosts, i, h) {
                        const char *name = json_string_value(json_object_get(h, "host"));

                        if (name && streq(name, host) && json_integer_value(json_object_get(h, "port")) == port) {
                                printf(" (entry %zu of %zu in Host=)", i + 1, json_array_size(hosts));
                                break;
                        }
                }
        printf("\n");
}

static int cmd_status(void) {
        json_t *resp = NULL, *st, *v, *values, *plugins;
        const char *name;
        size_t i;
        int r;

        r = request(json_pack("{s:s}", "method", "status"), &resp);
        if (r != 0)
                return r;
        st = json_object_get(resp, "status");
        if (arg.json) {
                char *s = json_dumps(st, JSON_INDENT(2));
                printf("%s\n", s ? s : "null");
                free(s);
                json_decref(resp);
                return 0;
        }
        printf("%-12s%s\n", "State:", json_is_true(json_object_get(st, "connected")) ? "connected" : "not connected");
        printf("%-12s%s\n", "Status:", json_string_value(json_object_get(st, "state")));
        print_cloud(st);
        printf("%-12s", "Uptime:");
        print_duration(json_number_value(json_object_get(st, "uptime_sec")));
        if (json_is_true(json_object_get(st, "connected"))) {
                printf(", connected for ");
                print_duration(json_number_value(json_object_get(st, "connected_sec")));
        }
        printf("\n%-12s%s\n", "Version:", json_string_value(json_object_get(st, "version")));
        print_certificate(st);
        printf("%-12s%lld\n", "Queued:", (long long)json_integer_value(json_object_get(st, "queued_events")));
        plugins = json_object_get(st, "plugins");
        printf("%-12s", "Plugins:");
        if (json_array_size(plugins) == 0)
                printf("(none)");
        json_array_foreach(plugins, i, v) printf("%s%s %s", i ? ", " : "", json_string_value(json_object_get(v, "name")),
                                                 json_string_value(json_object_get(v, "version")));
        printf("\n");
        print_list("Functions:", json_object_get(st, "functions"));
        print_list("Events:", json_object_get(st, "events"));
        values = json_object_get(st, "values");
        printf("Variables:%s\n", json_object_size(json_object_get(st, "variables")) ? "" : "  (none)");
        json_object_foreach(json_object_get(st, "variables"), name, v) {
                char *val = json_dumps(json_object_get(values, name), JSON_ENCODE_ANY);
                printf("  %-24s %-7s %s\n", name, json_string_value(v), val ? val : "?");
                free(val);
        }
        json_decref(resp);
        return 0;
}

static int cmd_publish(const char *name, const char *data) {
        json_t *req, *resp = NULL;
        int r;

        r = proto_name_check(name, strlen(name), PROTO_NAME_EVENT);
        if (r < 0)
                return cli_usage_error("Invalid event name '%s'", name), EXIT_USAGE;
        req = json_pack("{s:s, s:s, s:b}", "method", "publish", "name", name, "private", arg.private_);
        if (req && data && json_object_set_new(req, "data", json_string(data)) < 0)
                req = (json_decref(req), NULL);
        if (req && arg.ttl >= 0 && json_object_set_new(req, "ttl", json_integer(arg.ttl)) < 0)
                req = (json_decref(req), NULL);
        if (!req)
                return log_error(data && proto_utf8_check(data, strlen(data)) < 0 ? "Event data is not valid UTF-8"
                                                                                   : "Out of memory"),
                       data ? EXIT_USAGE : 1;
        r = request(req, &resp);
        json_decref(resp);
        return r;
}

/* --- enrollment ------------------------------------------------------------ */

/* The key never exists with a wider mode, is never half written under
 * its final name, and never replaces an existing file (csr_key_write_new). */
static int cmd_genkey(const char *path) {
        EVP_PKEY *key = NULL;
        int r;

        if (access(path, F_OK) == 0)
                return log_error("'%s' already exists; not replacing a device key", path), 1;
        r = csr_key_generate(&key);
        if (r < 0)
                return log_error("Failed to generate an EC P-256 key"), 1;
        r = csr_key_write_new(key, path);
        EVP_PKEY_free(key);
        if (r == -EEXIST)
                return log_error("'%s' already exists; not replacing a device key", path), 1;
        if (r < 0)
                return log_error_errno(r, "Failed to create '%s': %m", path), 1;
        fprintf(stderr, "Wrote a new EC P-256 device key to '%s'\n", path);
        return 0;
}

static int key_load(const char *path, EVP_PKEY **ret) {
        int r = csr_key_load(path, ret);

        if (r == -EBADMSG || r == -ENOKEY)
                return log_error("Cannot read the device key '%s': %s", path, csr_key_load_problem(r)), 1;
        if (r < 0)
                return log_error_errno(r, "Cannot open the device key '%s': %m", path), 1;
        return 0;
}

static int cmd_csr(void) {
        char idbuf[CSR_ID_SIZE];
        _cleanup_free_ char *pem = NULL;
        const char *id = arg.id;
        EVP_PKEY *key = NULL;
        int r;

        if (id) {
                r = proto_name_check(id, strlen(id), PROTO_NAME_DEVICE);
                if (r < 0)
                        return cli_usage_error("Invalid device ID '%s': %s", id, proto_device_id_problem(r)),
                               EXIT_USAGE;
        }
        r = key_load(arg.key, &key);
        if (r != 0)
                return r;
        if (!id) {
                if (csr_key_id(key, idbuf) < 0) {
                        EVP_PKEY_free(key);
                        return log_error("Cannot hash the public key"), 1;
                }
                id = idbuf;
        }
        r = csr_make(key, id, &pem);
        EVP_PKEY_free(key);
        if (r < 0)
                return log_error("Failed to make the certificate request"), 1;
        fputs(pem, stdout);
        fprintf(stderr, "Certificate request for device ID %s\n", id);
        return 0;
}

/* The first line of path that is not blank or a comment, trimmed. */
static int read_token_file(const char *path, char **ret) {
        _cleanup_fclose_ FILE *f = fopen(path, "re");
        char line[512];

        if (!f)
                return log_error_errno(errno, "Cannot read the token file '%s': %m", path), 1;
        while (fgets(line, sizeof(line), f)) {
                char *p = line + strspn(line, " \t\r\n");

                p[strcspn(p, " \t\r\n")] = 0;
                if (!*p || *p == '#')
                        continue;
                *ret = strdup(p);
                return *ret ? 0 : (log_error("Out of memory"), 1);
        }
        return log_error("No token in '%s'", path), 1;
}

/* Ask tetherd for its status until done() says so (1 ok, -1 failed) or
 * the deadline passes (0): every 10 ms for the first 2 s (an enrollment
 * usually takes tens of milliseconds), then every 100 ms. */
static int follow(long long deadline, int (*done)(json_t *st, void *userdata), void *userdata) {
        long long start = (long long)now_usec();

        for (;;) {
                json_t *resp = NULL;
                int r = request(json_pack("{s:s}", "method", "status"), &resp);

                if (r != 0)
                        return -1;
                r = done(json_object_get(resp, "status"), userdata);
                json_decref(resp);
                if (r != 0)
                        return r;
                if ((long long)now_usec() >= deadline)
                        return 0;
                (void)poll(NULL, 0, (long long)now_usec() - start < 2000000 ? 10 : 100);
        }
}

static int enrolled_done(json_t *st, void *userdata) {
        json_int_t generation = *(json_int_t *)userdata;
        json_t *enr = json_object_get(st, "enrollment");
        const char *state = json_string_value(json_object_get(enr, "state"));
        const char *error = json_string_value(json_object_get(enr, "error"));

        if (json_integer_value(json_object_get(enr, "generation")) != generation || !state)
                return log_error("Another enrollment was started meanwhile"), -1;
        if (streq(state, "enrolled")) {
                printf("Enrolled as device %s\n", json_string_value(json_object_get(enr, "device_id")));
                fflush(stdout);
                return 1;
        }
        if (streq(state, "failed"))
                return log_error("Enrollment failed: %s", error ? error : "unknown reason"), -1;
        if (streq(state, "retrying")) {
                json_int_t at = json_integer_value(json_object_get(enr, "retry_at"));
                long long in = at - (long long)time(NULL);

                log_error("Enrollment failed: %s (tetherd tries again in %lld s; 'tetherctl status' shows how it "
                          "goes)",
                          error ? error : "unknown reason", in > 0 ? in : 0);
                return -1;
        }
        return 0;
}

static int online_done(json_t *st, void *userdata) {
        return json_is_true(json_object_get(st, "connected")) ? 1 : 0;
}

static int cmd_enroll(void) {
        _cleanup_free_ char *token = NULL;
        long long start = (long long)now_usec(), deadline;
        json_t *req, *resp = NULL;
        json_int_t generation;
        int r;

        if (!!arg.token == !!arg.token_file)
                return cli_usage_error("'enroll' needs one of --token TOKEN or --token-file PATH"), EXIT_USAGE;
        if (arg.id && (r = proto_name_check(arg.id, strlen(arg.id), PROTO_NAME_DEVICE)) < 0)
                return cli_usage_error("Invalid device ID '%s': %s", arg.id, proto_device_id_problem(r)), EXIT_USAGE;
        if (arg.token_file) {
                r = read_token_file(arg.token_file, &token);
                if (r != 0)
                        return r;
        }
        req = json_pack("{s:s, s:s, s:b}", "method", "enroll", "token", token ? token : arg.token, "force",
                        arg.force);
        if (req && arg.id && json_object_set_new(req, "id", json_string(arg.id)) < 0)
                req = (json_decref(req), NULL);
        r = request(req, &resp);
        if (r != 0)
                return r;
        generation = json_integer_value(json_object_get(resp, "generation"));
        json_decref(resp);
        deadline = start + arg.wait_sec * 1000000LL;
        r = follow(deadline, enrolled_done, &generation);
        if (r < 0)
                return 1;
        if (r == 0)
                return log_error("Not enrolled after %lld s; tetherd keeps trying ('tetherctl status')", arg.wait_sec),
                       1;
        if (arg.no_wait)
                return 0;
        r = follow(deadline, online_done, NULL);
        if (r < 0)
                return 1;
        if (r == 0)
                return log_error("Enrolled, but not online after %lld s ('tetherctl status' says why)", arg.wait_sec),
                       1;
        printf("Online after %.1f s\n", ((long long)now_usec() - start) / 1e6);
        return 0;
}

/* --- command line ---------------------------------------------------------- */

static void help(void) {
        printf("Usage: tetherctl [OPTIONS] COMMAND [ARGS...]\n"
               "\n"
               "Control the local tether agent (tetherd) and enroll the device.\n"
               "\n"
               "Commands:\n"
               "  status [--json]             connection, cloud, uptime, plugins, functions,\n"
               "                              variables with their current values\n"
               "  publish NAME [DATA]         publish an event through the agent\n"
               "          [--ttl SEC] [--private]\n"
               "  genkey [PATH]               make a new device key (EC P-256, mode 0600); never\n"
               "                              replaces an existing file (default %s)\n"
               "  csr [--key PATH] [--id ID]  print a PEM certificate request for the device key;\n"
               "                              the ID defaults to 24 hex digits of the key's hash\n"
               "  enroll --token TOKEN | --token-file PATH [--id ID] [--force] [--no-wait]\n"
               "                              have tetherd enroll with a provisioning token, then\n"
               "                              wait until it is online (at most --wait SEC, 120)\n"
               "\n"
               "Options:\n"
               "  -s, --socket PATH   tetherd's socket (default $TETHER_SOCKET or %s)\n"
               "  -h, --help          show this help\n"
               "      --version       show the version\n"
               "\n"
               "Exit status: 0 ok, 1 failure, 2 usage, 3 permission denied, 4 tetherd not running.\n",
               TETHERCTL_DEFAULT_KEY, TETHERCTL_DEFAULT_SOCKET);
}

enum {
        OPT_TTL = 0x100,
        OPT_PRIVATE,
        OPT_JSON,
        OPT_KEY,
        OPT_ID,
        OPT_VERSION,
        OPT_TOKEN,
        OPT_TOKEN_FILE,
        OPT_FORCE,
        OPT_NO_WAIT,
        OPT_WAIT,
};

int main(int argc, char *argv[]) {
        static const struct option options[] = {
                { "socket", required_argument, NULL, 's' },
                { "ttl", required_argument, NULL, OPT_TTL },
                { "private", no_argument, NULL, OPT_PRIVATE },
                { "json", no_argument, NULL, OPT_JSON },
                { "key", required_argument, NULL, OPT_KEY },
                { "id", required_argument, NULL, OPT_ID },
                { "token", required_argument, NULL, OPT_TOKEN },
                { "token-file", required_argument, NULL, OPT_TOKEN_FILE },
                { "force", no_argument, NULL, OPT_FORCE },
                { "no-wait", no_argument, NULL, OPT_NO_WAIT },
                { "wait", required_argument, NULL, OPT_WAIT },
                { "help", no_argument, NULL, 'h' },
                { "version", no_argument, NULL, OPT_VERSION },
                {},
        };
        const char *cmd;
        char **pos;
        int n_pos, c, r;

        log_open("tetherctl");
        arg.socket = getenv("TETHER_SOCKET");
        if (!arg.socket || !*arg.socket)
                arg.socket = TETHERCTL_DEFAULT_SOCKET;
        arg.key = TETHERCTL_DEFAULT_KEY;
        opterr = 0;
        while ((c = getopt_long(argc, argv, ":s:h", options, NULL)) >= 0) {
                switch (c) {
                case 's':
                        arg.socket = optarg;
                        break;
                case OPT_TTL: {
                        char *end;
                        errno = 0;
                        arg.ttl = strtoll(optarg, &end, 10);
                        if (errno || end == optarg || *end || arg.ttl < 0 || arg.ttl > UINT32_MAX)
                                return cli_usage_error("Invalid --ttl '%s'", optarg), EXIT_USAGE;
                        break;
                }
                case OPT_PRIVATE:
                        arg.private_ = true;
                        break;
                case OPT_JSON:
                        arg.json = true;
                        break;
                case OPT_KEY:
                        arg.key = optarg;
                        break;
                case OPT_ID:
                        arg.id = optarg;
                        break;
                case OPT_TOKEN:
                        arg.token = optarg;
                        break;
                case OPT_TOKEN_FILE:
                        arg.token_file = optarg;
                        break;
                case OPT_FORCE:
                        arg.force = true;
                        break;
                case OPT_NO_WAIT:
                        arg.no_wait = true;
                        break;
                case OPT_WAIT: {
                        char *end;
                        errno = 0;
                        arg.wait_sec = strtoll(optarg, &end, 10);
                        if (errno || end == optarg || *end || arg.wait_sec < 1 || arg.wait_sec > 86400)
                                return cli_usage_error("Invalid --wait '%s' (seconds, 1..86400)", optarg), EXIT_USAGE;
                        break;
                }
                case 'h':
                        help();
                        return 0;
                case OPT_VERSION:
                        printf("tetherctl %s\n", PACKAGE_VERSION);
                        return 0;
                case ':':
                        return cli_usage_error("Option '%s' needs an argument", argv[optind - 1]), EXIT_USAGE;
                default:
                        return cli_usage_error("Unknown option '%s'", argv[optind - 1]), EXIT_USAGE;
                }
        }
        if (optind >= argc)
                return cli_usage_error("Missing command"), EXIT_USAGE;
        cmd = argv[optind];
        pos = argv + optind + 1;
        n_pos = argc - optind - 1;

        if (streq(cmd, "status")) {
                if (n_pos != 0)
                        return cli_usage_error("'status' takes no arguments"), EXIT_USAGE;
                r = cmd_status();
        } else if (streq(cmd, "publish")) {
                if (n_pos < 1 || n_pos > 2)
                        return cli_usage_error("'publish' takes NAME and optionally DATA"), EXIT_USAGE;
                r = cmd_publish(pos[0], n_pos > 1 ? pos[1] : NULL);
        } else if (streq(cmd, "genkey")) {
                if (n_pos > 1)
                        return cli_usage_error("'genkey' takes at most one argument, PATH"), EXIT_USAGE;
                r = cmd_genkey(n_pos ? pos[0] : arg.key);
        } else if (streq(cmd, "csr")) {
                if (n_pos != 0)
                        return cli_usage_error("'csr' takes no arguments"), EXIT_USAGE;
                r = cmd_csr();
        } else if (streq(cmd, "enroll")) {
                if (n_pos != 0)
                        return cli_usage_error("'enroll' takes no arguments"), EXIT_USAGE;
                r = cmd_enroll();
        } else
                return cli_usage_error("Unknown command '%s'", cmd), EXIT_USAGE;
        if (fflush(stdout) != 0) {
                log_error_errno(errno, "Failed to write to standard output: %m");
                return 1;
        }
        return r;
}
