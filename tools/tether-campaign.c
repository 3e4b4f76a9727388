/* SPDX-License-Identifier: Apache-2.0 */
/* "tether campaign": phased rollouts of one signed .deb to many devices
 * (docs/fleet.md "Campaigns", docs/cli.md). create resolves the targets
 * to device IDs, uploads the package, signs manifests for the devices
 * (as many per manifest as fit in a manifest body) and posts the
 * campaign; list, show [--follow], pause, resume and abort talk to
 * /v1/campaigns. The command parses its own options (after the word
 * "campaign"). */
#include <getopt.h>
#include <inttypes.h>
#include <unistd.h>

#include "log.h"
#include "manifest.h"
#include "tether-ota-sign.h"

#define CAMPAIGN_TARGETS_MAX 64
#define CAMPAIGN_DEVICES_MAX 100000  /* as cloud/campaigns.h */
#define CAMPAIGN_MANIFESTS_MAX 4096  /* as cloud/campaigns.h */
#define CAMPAIGN_PAGE 100

void campaign_help(void) {
        printf("Usage: tether campaign create --target T [--target T...] --package FILE.deb --key KEY\n"
               "                              --phases P,P,...,100 --max-failure-rate N [--phase-wait DUR]\n"
               "                              [--name NAME] [--url URL] [--valid-for DUR] [--follow]\n"
               "       tether campaign list\n"
               "       tether campaign show ID [--follow|--no-follow]\n"
               "       tether campaign pause|resume|abort ID\n"
               "\n"
               "Targets: tag:K or tag:K=V (devices with that tag), device:ID, all.\n"
               "Exit status: 0, or 8 when a followed campaign ends paused or aborted;\n"
               "otherwise as for other commands (docs/cli.md).\n");
}

typedef struct CampaignArgs {
        const char *targets[CAMPAIGN_TARGETS_MAX];
        size_t n_targets;
        const char *package, *phases, *phase_wait, *name, *rate;
        int follow; /* -1: on a terminal */
} CampaignArgs;

/* A duration: seconds, or a number with s, m, h or d. */
static int duration_parse(const char *s, long long *ret) {
        long long v, mult = 1;
        char *end;

        errno = 0;
        v = strtoll(s, &end, 10);
        if (*end == 'd' || *end == 'h' || *end == 'm' || *end == 's') {
                mult = *end == 'd' ? 86400 : *end == 'h' ? 3600 : *end == 'm' ? 60 : 1;
                end++;
        }
        if (errno || end == s || *end || v < 0 || v > 30LL * 86400 / mult)
                return -EINVAL;
        *ret = v * mult;
        return 0;
}

/* ---- targets -------------------------------------------------------------- */

typedef struct DeviceList {
        char **ids;
        size_t n, cap;
        json_t *seen;
} DeviceList;

static void device_list_done(DeviceList *l) {
        for (size_t i = 0; i < l->n; i++)
                free(l->ids[i]);
        free(l->ids);
        json_decref(l->seen);
}

static int device_list_add(DeviceList *l, const char *id) {
        if (json_object_get(l->seen, id))
                return 0;
        if (l->n >= CAMPAIGN_DEVICES_MAX)
                return log_error_errno(-E2BIG, "More than %d devices", CAMPAIGN_DEVICES_MAX);
        if (l->n == l->cap) {
                char **n = reallocarray(l->ids, l->cap ? l->cap * 2 : 64, sizeof(*n));

                if (!n)
                        return log_error_errno(-ENOMEM, "Out of memory");
                l->ids = n;
                l->cap = l->cap ? l->cap * 2 : 64;
        }
        if (!(l->ids[l->n] = strdup(id)) || json_object_set_new(l->seen, id, json_true()) < 0)
                return log_error_errno(-ENOMEM, "Out of memory");
        l->n++;
        return 0;
}

/* Every device of GET /v1/devices?QUERY, page by page. */
static int devices_query(Api *a, const char *query, DeviceList *l) {
        for (size_t page = 1;; page++) {
                _cleanup_free_ char *path = NULL;
                json_t *res = NULL, *devs, *d;
                long long pages;
                size_t i;
                int r;

                if (asprintf(&path, "/v1/devices?%s%spage=%zu&per_page=%d", query, *query ? "&" : "", page,
                             CAMPAIGN_PAGE) < 0)
                        return log_error_errno(-ENOMEM, "Out of memory");
                r = request_json(a, "GET", path, NULL, &res);
                if (r < 0)
                        return r;
                devs = json_object_get(res, "devices");
                if (!json_is_array(devs)) {
                        json_decref(res);
                        return log_error_errno(-EBADMSG, "Malformed device list from %s", a->base);
                }
                json_array_foreach(devs, i, d) {
                        const char *id = json_string_value(json_object_get(d, "id"));

                        if (!id || proto_name_check(id, strlen(id), PROTO_NAME_DEVICE) < 0) {
                                json_decref(res);
                                return log_error_errno(-EBADMSG, "Malformed device in the list from %s", a->base);
                        }
                        r = device_list_add(l, id);
                        if (r < 0) {
                                json_decref(res);
                                return r;
                        }
                }
                pages = json_integer_value(json_object_get(json_object_get(res, "meta"), "total_pages"));
                json_decref(res);
                if ((long long)page >= pages || json_array_size(devs) == 0)
                        return 0;
        }
}

static int resolve_target(Api *a, const char *t, DeviceList *l) {
        if (startswith(t, "device:")) {
                const char *id = t + 7;

                if (proto_name_check(id, strlen(id), PROTO_NAME_DEVICE) < 0)
                        return cli_usage_error("Invalid target '%s': not a device ID", t);
                return device_list_add(l, id);
        }
        if (streq(t, "all"))
                return devices_query(a, "", l);
        if (startswith(t, "tag:") && t[4] && t[4] != '=') {
                _cleanup_free_ char *q = NULL;
                char *esc = curl_easy_escape(a->curl, t + 4, 0);
                int r;

                if (!esc)
                        return log_error_errno(-ENOMEM, "Out of memory");
                r = asprintf(&q, "tag=%s", esc);
                curl_free(esc);
                if (r < 0)
                        return log_error_errno(-ENOMEM, "Out of memory");
                return devices_query(a, q, l);
        }
        return cli_usage_error("Invalid target '%s': expected tag:K, tag:K=V, device:ID or all", t);
}

/* ---- show ------------------------------------------------------------------ */

static long long count(json_t *counts, const char *k) {
        return json_integer_value(json_object_get(counts, k));
}

static long long failures(json_t *counts) {
        return count(counts, "rolled_back") + count(counts, "rejected") + count(counts, "failed") +
               count(counts, "deferred");
}

static void campaign_print(json_t *c) {
        json_t *phases = json_object_get(c, "phases"), *p, *counts = json_object_get(c, "counts");
        long long total = json_integer_value(json_object_get(c, "devices")), done = count(counts, "committed");
        const char *name = json_string_value(json_object_get(c, "name"));
        const char *reason = json_string_value(json_object_get(c, "paused_reason"));
        int width = 40, fill = total ? (int)(done * width / total) : 0;
        size_t i;

        printf("campaign %s%s%s%s: %s %s, %lld devices, %s (phase %lld of %zu)\n",
               json_string_or(c, "id", "?"), name ? " \"" : "", name ?: "", name ? "\"" : "",
               json_string_or(c, "package", "?"), json_string_or(c, "version", "?"), total,
               json_string_or(c, "state", "?"), json_integer_value(json_object_get(c, "phase")),
               json_array_size(phases));
        if (reason)
                printf("reason: %s\n", reason);
        printf("%-6s %-4s %-7s %-8s %7s %7s %5s %11s %10s %9s %6s %8s\n", "PHASE", "%", "DEVICES", "STATE",
               "PENDING", "OFFLINE", "SENT", "DOWNLOADING", "INSTALLING", "COMMITTED", "FAILED", "FAILURE%");
        json_array_foreach(phases, i, p) {
                json_t *pc = json_object_get(p, "counts");

                printf("%-6zu %-4lld %-7lld %-8s %7lld %7lld %5lld %11lld %10lld %9lld %6lld %8.1f\n", i + 1,
                       json_integer_value(json_object_get(p, "percent")),
                       json_integer_value(json_object_get(p, "devices")), json_string_or(p, "state", "?"),
                       count(pc, "pending"), count(pc, "offline"), count(pc, "sent"), count(pc, "downloading"),
                       count(pc, "installing"), count(pc, "committed"), failures(pc),
                       json_number_value(json_object_get(p, "failure_rate")));
        }
        putchar('[');
        for (int k = 0; k < width; k++)
                putchar(k < fill ? '#' : '.');
        printf("]  %lld/%lld committed\n", done, total);
}

static int campaign_get(Api *a, const char *id, json_t **ret) {
        _cleanup_free_ char *path = NULL;
        json_t *res = NULL, *c;
        int r;

        if (strlen(id) != 16 || strspn(id, "0123456789abcdef") != 16)
                return cli_usage_error("Invalid campaign ID '%s'", id);
        if (asprintf(&path, "/v1/campaigns/%s", id) < 0)
                return log_error_errno(-ENOMEM, "Out of memory");
        r = request_json(a, "GET", path, NULL, &res);
        if (r < 0)
                return r;
        c = json_incref(json_object_get(res, "campaign"));
        json_decref(res);
        if (!json_is_object(c)) {
                json_decref(c);
                return log_error_errno(-EBADMSG, "Malformed campaign from %s", a->base);
        }
        *ret = c;
        return 0;
}

static int campaign_show(Api *a, const char *id, bool follow) {
        bool tty = isatty(STDOUT_FILENO);

        for (;;) {
                json_t *c = NULL;
                const char *state;
                int r = campaign_get(a, id, &c);

                if (r < 0)
                        return r;
                if (tty && follow)
                        fputs("\033[H\033[J", stdout);
                if (arg.json) {
                        r = print_json(json_incref(c));
                        if (r < 0) {
                                json_decref(c);
                                return r;
                        }
                } else
                        campaign_print(c);
                fflush(stdout);
                state = json_string_or(c, "state", "");
                r = streq(state, "paused") || streq(state, "aborted") ? -ECANCELED : 0;
                if (!follow || !streq(state, "running")) {
                        json_decref(c);
                        return follow ? r : 0;
                }
                json_decref(c);
                sleep(1);
        }
}

/* ---- create ------------------------------------------------------------------ */

static int parse_phases(const char *s, json_t **ret) {
        json_t *a = json_array();
        long long last = 0;
        const char *p = s;

        if (!a)
                return log_error_errno(-ENOMEM, "Out of memory");
        while (*p) {
                char *end;
                long long v;

                errno = 0;
                v = strtoll(p, &end, 10);
                if (errno || end == p || v <= last || v > 100 || (*end && *end != ',') || json_array_size(a) >= 100) {
                        json_decref(a);
                        return cli_usage_error("Invalid --phases '%s': strictly increasing percentages ending at "
                                               "100, such as 1,10,50,100", s);
                }
                json_array_append_new(a, json_integer(v));
                last = v;
                p = *end ? end + 1 : end;
        }
        if (last != 100) {
                json_decref(a);
                return cli_usage_error("Invalid --phases '%s': the last one must be 100", s);
        }
        *ret = a;
        return 0;
}

/* The end of the manifest that starts at device i: as many devices as fit
 * in one body. */
static int manifest_end(const DebInfo *deb, const char *url, const DeviceList *l, size_t i, size_t *ret) {
        size_t base, body, k = i + 1;
        int r = ota_manifest_body_size(deb, url, (const char *const *)l->ids + i, 1, &base);

        if (r < 0)
                return r;
        /* Each further device adds ,"ID" to the array. */
        for (body = base; k < l->n && k - i < MANIFEST_TARGETS_MAX; k++) {
                size_t more = strlen(l->ids[k]) + 3;

                if (body + more > MANIFEST_BODY_MAX)
                        break;
                body += more;
        }
        *ret = k;
        return 0;
}

/* Sign manifests for l's devices, as many in each as fit in one body;
 * first checks that the cloud takes that many. */
static int sign_all(const DebInfo *deb, const char *url, const DeviceList *l, json_t *manifests) {
        size_t i, k, n = 0;
        int r;

        for (i = 0; i < l->n; i = k, n++) {
                r = manifest_end(deb, url, l, i, &k);
                if (r < 0)
                        return r;
        }
        if (n > CAMPAIGN_MANIFESTS_MAX)
                return log_error_errno(-E2BIG, "%zu devices need %zu manifests (a manifest's body holds at most %u "
                                       "bytes), a campaign takes at most %d: target fewer devices%s", l->n, n,
                                       MANIFEST_BODY_MAX, CAMPAIGN_MANIFESTS_MAX, url ? " or give a shorter --url" : "");
        for (i = 0; i < l->n; i = k) {
                _cleanup_free_ char *env = NULL;
                size_t len;

                r = manifest_end(deb, url, l, i, &k);
                if (r < 0)
                        return r;
                r = ota_sign_manifest(deb, url, (const char *const *)l->ids + i, k - i, NULL, 0, &env, &len);
                if (r < 0)
                        return r;
                if (json_array_append_new(manifests, json_stringn(env, len)) < 0)
                        return log_error_errno(-ENOMEM, "Out of memory");
        }
        return 0;
}

static int campaign_create(Api *a, const CampaignArgs *ca) {
        _cleanup_(device_list_done) DeviceList l = { .seen = json_object() };
        _cleanup_(deb_info_done) DebInfo deb = {};
        _cleanup_free_ char *url = NULL, *target = NULL;
        json_t *body = NULL, *phases = NULL, *res = NULL, *manifests, *devs;
        long long wait = 0;
        double rate;
        char *end;
        int r;

        if (ca->n_targets == 0 || !ca->package || !ca->phases || !ca->rate)
                return cli_usage_error("'campaign create' needs --target, --package, --key, --phases and "
                                       "--max-failure-rate");
        if (!ota_key_path())
                return cli_usage_error("No update key: give --key FILE or set TETHER_OTA_KEY");
        errno = 0;
        rate = strtod(ca->rate, &end);
        if (errno || end == ca->rate || *end || !(rate >= 0 && rate <= 100))
                return cli_usage_error("Invalid --max-failure-rate '%s': a percentage from 0 to 100", ca->rate);
        if (ca->phase_wait && duration_parse(ca->phase_wait, &wait) < 0)
                return cli_usage_error("Invalid --phase-wait '%s': seconds or a number with s, m, h or d, up to "
                                       "30 days", ca->phase_wait);
        r = parse_phases(ca->phases, &phases);
        if (r < 0)
                return r;
        if (!l.seen)
                goto oom;
        for (size_t i = 0; i < ca->n_targets; i++) {
                size_t before = l.n;

                r = resolve_target(a, ca->targets[i], &l);
                if (r < 0)
                        goto out;
                log_info("Target %s: %zu device(s)", ca->targets[i], l.n - before);
        }
        if (l.n == 0) {
                r = log_error_errno(-ENOENT, "The targets name no devices");
                goto out;
        }
        r = deb_info(ca->package, &deb);
        if (r < 0)
                goto out;
        if (arg.ota_url) {
                url = strdup(arg.ota_url);
                if (!url)
                        goto oom;
        } else {
                /* Signed without url: the devices fetch it from the cloud
                 * over their connections (its HTTPS URL, if it runs that
                 * server, is not used). */
                _cleanup_free_ char *https_url = NULL;

                r = ota_upload_artifact(a, ca->package, &deb, &https_url);
                if (r < 0)
                        goto out;
        }
        manifests = json_array();
        devs = json_array();
        for (size_t i = 0; devs && i < l.n; i++)
                if (json_array_append_new(devs, json_string(l.ids[i])) < 0) {
                        json_decref(devs);
                        devs = NULL;
                }
        for (size_t i = 0; i < ca->n_targets; i++) {
                char *t = NULL;

                if (asprintf(&t, "%s%s%s", target ?: "", target ? " " : "", ca->targets[i]) < 0)
                        goto oom;
                free(target);
                target = t;
        }
        body = json_pack("{s:s?, s:s, s:o, s:o, s:O, s:f, s:I}", "name", ca->name, "target", target, "manifests",
                         manifests, "devices", devs, "phases", phases, "max_failure_rate", rate, "phase_wait",
                         (json_int_t)wait);
        if (!body || !manifests || !devs)
                goto oom;
        r = sign_all(&deb, url, &l, manifests);
        if (r < 0)
                goto out;
        log_info("Signed %zu manifest(s) for %zu device(s)", json_array_size(manifests), l.n);
        a->what_400 = "The cloud refused the campaign";
        r = request_json(a, "POST", "/v1/campaigns", body, &res);
        if (r < 0)
                goto out;
        {
                const char *id = json_string_value(json_object_get(json_object_get(res, "campaign"), "id"));

                if (!id) {
                        r = log_error_errno(-EBADMSG, "Malformed answer from %s: no campaign id", a->base);
                        goto out;
                }
                if (arg.json && ca->follow != 1)
                        r = print_json(json_incref(json_object_get(res, "campaign")));
                else
                        printf("%s\n", id);
                if (ca->follow == 1) {
                        fflush(stdout);
                        r = campaign_show(a, id, true);
                }
        }
        goto out;
oom:
        r = log_error_errno(-ENOMEM, "Out of memory");
out:
        json_decref(res);
        json_decref(body);
        json_decref(phases);
        return r;
}

/* ---- the command ----------------------------------------------------------------- */

static int campaign_list(Api *a) {
        json_t *res = NULL, *list, *c;
        size_t i;
        int r = request_json(a, "GET", "/v1/campaigns", NULL, &res);

        if (r < 0)
                return r;
        list = json_object_get(res, "campaigns");
        if (!json_is_array(list)) {
                json_decref(res);
                return log_error_errno(-EBADMSG, "Malformed campaign list from %s", a->base);
        }
        if (arg.json) {
                r = print_json(json_incref(list));
                json_decref(res);
                return r;
        }
        printf("%-16s  %-20s  %-9s  %-5s  %7s  %9s  %6s  %s\n", "ID", "NAME", "STATE", "PHASE", "DEVICES",
               "COMMITTED", "FAILED", "PACKAGE");
        json_array_foreach(list, i, c) {
                json_t *counts = json_object_get(c, "counts");
                char phase[32];

                snprintf(phase, sizeof(phase), "%lld/%zu", json_integer_value(json_object_get(c, "phase")),
                         json_array_size(json_object_get(c, "phases")));
                printf("%-16s  %-20.20s  %-9s  %-5s  %7lld  %9lld  %6lld  %s %s\n", json_string_or(c, "id", "?"),
                       json_string_or(c, "name", "-"), json_string_or(c, "state", "?"), phase,
                       json_integer_value(json_object_get(c, "devices")), count(counts, "committed"),
                       failures(counts), json_string_or(c, "package", "?"), json_string_or(c, "version", "?"));
        }
        json_decref(res);
        return 0;
}

static int campaign_action(Api *a, const char *action, const char *id) {
        _cleanup_free_ char *path = NULL;
        json_t *res = NULL, *c;
        int r;

        if (strlen(id) != 16 || strspn(id, "0123456789abcdef") != 16)
                return cli_usage_error("Invalid campaign ID '%s'", id);
        if (asprintf(&path, "/v1/campaigns/%s/%s", id, action) < 0)
                return log_error_errno(-ENOMEM, "Out of memory");
        r = request_json(a, "POST", path, json_object(), &res);
        if (r < 0)
                return r;
        c = json_object_get(res, "campaign");
        if (arg.json)
                r = print_json(json_incref(c));
        else
                printf("campaign %s: %s\n", id, json_string_or(c, "state", "?"));
        json_decref(res);
        return r;
}

int cmd_campaign(Api *a, char **args, int n) {
        enum { O_TARGET = 0x100, O_PACKAGE, O_KEY, O_PHASES, O_RATE, O_WAIT, O_NAME, O_URL, O_VALID, O_FOLLOW,
               O_NO_FOLLOW, O_JSON };
        static const struct option options[] = {
                { "target", required_argument, NULL, O_TARGET },
                { "package", required_argument, NULL, O_PACKAGE },
                { "key", required_argument, NULL, O_KEY },
                { "phases", required_argument, NULL, O_PHASES },
                { "max-failure-rate", required_argument, NULL, O_RATE },
                { "phase-wait", required_argument, NULL, O_WAIT },
                { "name", required_argument, NULL, O_NAME },
                { "url", required_argument, NULL, O_URL },
                { "valid-for", required_argument, NULL, O_VALID },
                { "follow", no_argument, NULL, O_FOLLOW },
                { "no-follow", no_argument, NULL, O_NO_FOLLOW },
                { "json", no_argument, NULL, O_JSON },
                {},
        };
        CampaignArgs ca = { .follow = -1 };
        const char *sub;
        int c;

        if (n < 1)
                return cli_usage_error("'campaign' needs a command: create, list, show, pause, resume or abort");
        sub = args[0];
        if (streq(sub, "--help") || streq(sub, "-h")) {
                campaign_help();
                return 0;
        }
        optind = 0;
        opterr = 0;
        while ((c = getopt_long(n, args, ":", options, NULL)) >= 0) {
                long long v;

                switch (c) {
                case O_TARGET:
                        if (ca.n_targets >= CAMPAIGN_TARGETS_MAX)
                                return cli_usage_error("At most %d --target", CAMPAIGN_TARGETS_MAX);
                        ca.targets[ca.n_targets++] = optarg;
                        break;
                case O_PACKAGE:
                        ca.package = optarg;
                        break;
                case O_KEY:
                        arg.ota_key = optarg;
                        break;
                case O_PHASES:
                        ca.phases = optarg;
                        break;
                case O_RATE:
                        ca.rate = optarg;
                        break;
                case O_WAIT:
                        ca.phase_wait = optarg;
                        break;
                case O_NAME:
                        ca.name = optarg;
                        break;
                case O_URL:
                        arg.ota_url = optarg;
                        break;
                case O_VALID:
                        if (duration_parse(optarg, &v) < 0 || v == 0)
                                return cli_usage_error("Invalid --valid-for '%s'", optarg);
                        arg.ota_valid_for = v;
                        break;
                case O_FOLLOW:
                        ca.follow = 1;
                        break;
                case O_NO_FOLLOW:
                        ca.follow = 0;
                        break;
                case O_JSON:
                        arg.json = true;
                        break;
                case ':':
                        return cli_usage_error("Option '%s' needs an argument", args[optind - 1]);
                default:
                        return cli_usage_error("Unknown option '%s' of 'campaign'", args[optind - 1]);
                }
        }
        n -= optind;
        args += optind;
        if (streq(sub, "create")) {
                if (n != 0)
                        return cli_usage_error("'campaign create' takes options only");
                return campaign_create(a, &ca);
        }
        if ((ca.n_targets || ca.package || ca.phases || ca.rate || ca.phase_wait || ca.name || arg.ota_url ||
             arg.ota_key) && !streq(sub, "create"))
                return cli_usage_error("--target, --package, --key, --phases, --max-failure-rate, --phase-wait, "
                                       "--name and --url are options of 'campaign create'");
        if (streq(sub, "list")) {
                if (n != 0)
                        return cli_usage_error("'campaign list' takes no arguments");
                return campaign_list(a);
        }
        if (n != 1)
                return cli_usage_error("'campaign %s' takes a campaign ID", sub);
        if (streq(sub, "show"))
                return campaign_show(a, args[0], ca.follow == 1 || (ca.follow < 0 && !arg.json &&
                                                                     isatty(STDOUT_FILENO)));
        if (streq(sub, "pause") || streq(sub, "resume") || streq(sub, "abort"))
                return campaign_action(a, sub, args[0]);
        return cli_usage_error("Unknown command 'campaign %s'", sub);
}
