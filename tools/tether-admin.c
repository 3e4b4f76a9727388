/* SPDX-License-Identifier: Apache-2.0 */
/* "tether tokens ..." and "tether audit": the cloud's API tokens and its
 * audit log (docs/cli.md), through /v1/tokens and /v1/audit, which need
 * an admin token. */
#include <curl/curl.h>
#include <inttypes.h>
#include <jansson.h>
#include <signal.h>
#include <time.h>

#include "log.h"
#include "tether-cli.h"
#include "util.h"

#define AUDIT_PAGE 500
#define AUDIT_FOLLOW_MS 1000L

static volatile sig_atomic_t stop;

static void on_stop(int sig) {
        stop = 1;
}

/* A JSON array of n strings, or NULL (out of memory, or a string that
 * is not UTF-8: *ret_bad says which). */
static json_t *strv_json(const char *const *v, size_t n, const char **ret_bad) {
        json_t *a = json_array();

        for (size_t i = 0; a && i < n; i++)
                if (json_array_append_new(a, json_string(v[i])) < 0) {
                        *ret_bad = v[i];
                        json_decref(a);
                        return NULL;
                }
        return a;
}

static int tokens_create(Api *a) {
        json_t *body = NULL, *j = NULL;
        const char *bad = NULL;
        int r = 0;

        if (arg.n_scopes == 0)
                return cli_usage_error("'tokens create' needs at least one --scope");
        for (size_t i = 0; i < arg.n_ota_devices; i++)
                if ((r = name_check(arg.ota_devices[i], PROTO_NAME_DEVICE)) < 0)
                        return r;
        /* JSON, not a form: a tag's value may hold commas and blanks. */
        body = json_object();
        if (!body || json_object_set_new(body, "scopes", strv_json(arg.scopes, arg.n_scopes, &bad)) < 0)
                r = -ENOMEM;
        if (r >= 0 && arg.token_name && json_object_set_new(body, "name", json_string(arg.token_name)) < 0)
                r = cli_usage_error("Invalid --name '%s': it must be UTF-8 text", arg.token_name);
        if (r >= 0 && arg.token_expires > 0 &&
            json_object_set_new(body, "expires_in", json_integer(arg.token_expires)) < 0)
                r = -ENOMEM;
        if (r >= 0 && arg.n_ota_devices &&
            json_object_set_new(body, "devices", strv_json(arg.ota_devices, arg.n_ota_devices, &bad)) < 0)
                r = -ENOMEM;
        if (r >= 0 && arg.n_ota_tags &&
            json_object_set_new(body, "tags", strv_json(arg.ota_tags, arg.n_ota_tags, &bad)) < 0)
                r = -ENOMEM;
        if (r == -ENOMEM && bad)
                r = cli_usage_error("Invalid argument '%s': it must be UTF-8 text", bad);
        else if (r == -ENOMEM)
                r = log_error_errno(r, "Out of memory");
        if (r < 0) {
                json_decref(body);
                return r;
        }
        a->what_400 = "Invalid token request";
        r = request_json(a, "POST", "/v1/tokens", body, &j);
        json_decref(body);
        if (r < 0)
                return r;
        if (arg.json)
                r = print_json(j);
        else if (!json_is_string(json_object_get(j, "token"))) {
                log_error("Malformed response from %s: no token", a->base);
                r = -EBADMSG;
        } else
                printf("id:      %s\ntoken:   %s\nexpires: %s\n(the token is shown only now: keep it)\n",
                       json_string_or(j, "id", "?"), json_string_value(json_object_get(j, "token")),
                       json_string_or(j, "expires_at", "never"));
        json_decref(j);
        return r;
}

static void strv_text(json_t *a, char *buf, size_t size, const char *none) {
        size_t i, n = 0;
        json_t *x;

        buf[0] = 0;
        json_array_foreach(a, i, x) {
                int k = snprintf(buf + n, size - n, "%s%s", n ? "," : "", json_string_value(x) ?: "?");

                if (k < 0 || (size_t)k >= size - n)
                        break;
                n += (size_t)k;
        }
        if (!buf[0])
                snprintf(buf, size, "%s", none);
}

static int tokens_list(Api *a) {
        json_t *j = NULL, *t;
        size_t i;
        int r;

        r = request_list(a, "/v1/tokens", "tokens", &j);
        if (r < 0)
                return r;
        if (arg.json) {
                r = print_json(j);
                json_decref(j);
                return r;
        }
        printf("%-16s  %-8s  %-20s  %-20s  %-20s  %s\n", "ID", "STATE", "EXPIRES", "LAST USED", "NAME", "SCOPES");
        json_array_foreach(j, i, t) {
                char scopes[256], devices[256], tags[256];

                strv_text(json_object_get(t, "scopes"), scopes, sizeof(scopes), "-");
                strv_text(json_object_get(t, "devices"), devices, sizeof(devices), "");
                strv_text(json_object_get(t, "tags"), tags, sizeof(tags), "");
                printf("%-16s  %-8s  %-20s  %-20s  %-20s  %s%s%s%s%s\n", json_string_or(t, "id", "?"),
                       json_string_or(t, "state", "?"), json_string_or(t, "expires_at", "never"),
                       json_string_or(t, "last_used_at", "never"), json_string_or(t, "name", "-"), scopes,
                       devices[0] ? " devices=" : "", devices, tags[0] ? " tags=" : "", tags);
        }
        json_decref(j);
        return 0;
}

static int tokens_revoke(Api *a, const char *id) {
        _cleanup_free_ char *path = NULL;

        for (const char *c = id; *c; c++)
                if (!((*c >= '0' && *c <= '9') || (*c >= 'a' && *c <= 'z') || *c == '-'))
                        return cli_usage_error("Invalid token ID '%s'", id);
        if (!*id || asprintf(&path, "/v1/tokens/%s", id) < 0)
                return *id ? log_error_errno(-ENOMEM, "Out of memory") : cli_usage_error("Empty token ID");
        return request_delete(a, path);
}

int cmd_tokens(Api *a, char **args, int n) {
        if (n < 1)
                return cli_usage_error("'tokens' takes a subcommand: create, list or revoke");
        if (streq(args[0], "create")) {
                if (n != 1)
                        return cli_usage_error("'tokens create' takes no arguments, only options");
                return tokens_create(a);
        }
        if (arg.n_scopes || arg.token_name || arg.token_expires > 0 || arg.n_ota_devices || arg.n_ota_tags)
                return cli_usage_error("--scope, --name, --expires, --device and --tag are options of "
                                       "'tokens create'");
        if (streq(args[0], "list")) {
                if (n != 1)
                        return cli_usage_error("'tokens list' takes no arguments");
                return tokens_list(a);
        }
        if (streq(args[0], "revoke")) {
                if (n != 2)
                        return cli_usage_error("'tokens revoke' takes one argument, ID");
                return tokens_revoke(a, args[1]);
        }
        return cli_usage_error("Unknown subcommand 'tokens %s': use create, list or revoke", args[0]);
}

static void audit_print(json_t *rec) {
        json_t *detail = json_object_get(rec, "detail"), *st = json_object_get(detail, "status");
        char status[16] = "-";

        if (arg.json) {
                (void)print_json(rec);
                return;
        }
        if (json_is_integer(st))
                snprintf(status, sizeof(status), "%" JSON_INTEGER_FORMAT, json_integer_value(st));
        printf("%-6" JSON_INTEGER_FORMAT "  %-24s  %-22s  %-16s  %-3s  %-15s  %s\n",
               json_integer_value(json_object_get(rec, "id")), json_string_or(rec, "time", "?"),
               json_string_or(rec, "actor", "?"), json_string_or(rec, "action", "?"), status,
               json_string_or(rec, "address", "-"), json_string_or(rec, "target", "-"));
}

/* One page of records after *after; moves *after to the last one. Returns
 * how many there were. */
static int audit_page(Api *a, long long *after) {
        _cleanup_free_ char *path = NULL, *action = NULL, *target = NULL;
        json_t *j = NULL, *rec;
        size_t i;
        int r;

        if (arg.audit_action && !(action = curl_easy_escape(a->curl, arg.audit_action, 0)))
                return log_error_errno(-ENOMEM, "Out of memory");
        if (arg.audit_target && !(target = curl_easy_escape(a->curl, arg.audit_target, 0)))
                return log_error_errno(-ENOMEM, "Out of memory");
        if (asprintf(&path, "/v1/audit?after=%lld&limit=%d%s%s%s%s", *after, AUDIT_PAGE, action ? "&action=" : "",
                     action ?: "", target ? "&target=" : "", target ?: "") < 0)
                return log_error_errno(-ENOMEM, "Out of memory");
        a->what_400 = "Invalid audit query";
        r = api_request(a, path, NULL, &j);
        if (r < 0)
                return r;
        if (!json_is_array(j)) {
                json_decref(j);
                log_error("Malformed response from %s: expected a list of audit records", a->base);
                return -EBADMSG;
        }
        json_array_foreach(j, i, rec) {
                audit_print(rec);
                *after = json_integer_value(json_object_get(rec, "id"));
        }
        r = (int)json_array_size(j);
        json_decref(j);
        fflush(stdout);
        return r;
}

int cmd_audit(Api *a, char **args, int n) {
        struct sigaction sa = { .sa_handler = on_stop };
        long long after = arg.audit_after;
        int r;

        if (n != 0)
                return cli_usage_error("'audit' takes no arguments, only options");
        if (!arg.json)
                printf("%-6s  %-24s  %-22s  %-16s  %-3s  %-15s  %s\n", "ID", "TIME", "ACTOR", "ACTION", "ST",
                       "ADDRESS", "TARGET");
        /* Before the first page: a SIGINT while it is read still ends a
         * --follow cleanly (and one inherited as ignored is ours again). */
        if (arg.audit_follow) {
                sigemptyset(&sa.sa_mask);
                sigaction(SIGINT, &sa, NULL);
                sigaction(SIGTERM, &sa, NULL);
        }
        /* Everything there is now, page after page. */
        while ((r = audit_page(a, &after)) == AUDIT_PAGE && !stop)
                ;
        if (r < 0 || !arg.audit_follow)
                return r < 0 ? r : 0;
        while (!stop) {
                struct timespec ts = { AUDIT_FOLLOW_MS / 1000, AUDIT_FOLLOW_MS % 1000 * 1000000L };

                (void)nanosleep(&ts, NULL);
                if (stop)
                        break;
                r = audit_page(a, &after);
                if (r < 0)
                        return r;
        }
        return 0;
}
