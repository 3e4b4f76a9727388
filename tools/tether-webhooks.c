/* SPDX-License-Identifier: Apache-2.0 */
/* "tether webhooks ..." and "tether integrations list": the cloud's
 * outbound integrations (docs/cli.md, docs/integrations.md "API and CLI"),
 * through /v1/webhooks and /v1/integrations, which need an admin token.
 * webhooks create prints the secret alone on standard output (for a
 * script to capture), what was made on standard error. Text from the
 * cloud is printed with control characters replaced. */
#include <curl/curl.h>
#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "tether-cli.h"
#include "util.h"

#define WEBHOOK_NAME_MAX 64 /* cloud/integrations.h */

/* s for a terminal: control characters as '?', cut to size - 1 bytes;
 * NULL or "" as none. Returns out. */
static const char *clean(const char *s, const char *none, char *out, size_t size) {
        size_t j = 0;

        if (!s || !*s)
                s = none;
        for (size_t i = 0; s[i] && j + 1 < size; i++) {
                unsigned char c = (unsigned char)s[i];

                out[j++] = c < 0x20 || c == 0x7f ? '?' : (char)c;
        }
        out[j] = 0;
        return out;
}

static bool name_valid(const char *s) {
        size_t n = strlen(s);

        return n >= 1 && n <= WEBHOOK_NAME_MAX &&
               strspn(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-") == n;
}

static int webhooks_create(Api *a, const char *url) {
        char name[WEBHOOK_NAME_MAX + 1], where[512], prefix[160], tag[400];
        json_t *body = json_object(), *j = NULL;
        const char *secret;
        int r = 0;

        if (!body)
                return log_error_errno(-ENOMEM, "Out of memory");
        if (json_object_set_new(body, "url", json_string(url)) < 0)
                r = cli_usage_error("Invalid URL '%s': it must be UTF-8 text", url);
        if (r >= 0 && arg.webhook_prefix && json_object_set_new(body, "prefix", json_string(arg.webhook_prefix)) < 0)
                r = cli_usage_error("Invalid --prefix '%s': it must be UTF-8 text", arg.webhook_prefix);
        if (r >= 0 && arg.n_ota_tags == 1 && json_object_set_new(body, "tag", json_string(arg.ota_tags[0])) < 0)
                r = cli_usage_error("Invalid --tag '%s': it must be UTF-8 text", arg.ota_tags[0]);
        if (r >= 0 && arg.token_name && json_object_set_new(body, "name", json_string(arg.token_name)) < 0)
                r = cli_usage_error("Invalid --name '%s': it must be UTF-8 text", arg.token_name);
        if (r >= 0 && arg.webhook_secret && json_object_set_new(body, "secret", json_string(arg.webhook_secret)) < 0)
                r = cli_usage_error("Invalid --secret: it must be UTF-8 text");
        if (r < 0) {
                json_decref(body);
                return r;
        }
        a->what_400 = "Invalid webhook";
        r = request_json(a, "POST", "/v1/webhooks", body, &j);
        json_decref(body);
        if (r < 0)
                return r;
        secret = json_string_value(json_object_get(j, "secret"));
        if (!secret) {
                json_decref(j);
                log_error("Malformed response from %s: no secret", a->base);
                return -EBADMSG;
        }
        if (arg.json)
                r = print_json(j);
        else {
                const char *p = json_string_value(json_object_get(j, "prefix"));
                const char *t = json_string_value(json_object_get(j, "tag"));

                fprintf(stderr, "Webhook '%s': %s, %s%s%s, %s%s%s\n",
                        clean(json_string_value(json_object_get(j, "name")), "?", name, sizeof(name)),
                        clean(json_string_value(json_object_get(j, "url")), "(URL not shown)", where, sizeof(where)),
                        p && *p ? "events '" : "every event", p && *p ? clean(p, "", prefix, sizeof(prefix)) : "",
                        p && *p ? "*'" : "", t ? "devices tagged '" : "every device",
                        t ? clean(t, "", tag, sizeof(tag)) : "", t ? "'" : "");
                fprintf(stderr, "Its secret is shown only now: keep it (the receiver checks X-Tether-Signature "
                                "with it).\n");
                printf("%s\n", secret);
        }
        json_decref(j);
        return r;
}

static int webhooks_list(Api *a) {
        json_t *j = NULL, *w;
        size_t i;
        int r;

        r = request_list(a, "/v1/webhooks", "webhooks", &j);
        if (r < 0)
                return r;
        if (arg.json) {
                r = print_json(j);
                json_decref(j);
                return r;
        }
        printf("%-24s  %-6s  %-8s  %-16s  %-16s  %s\n", "NAME", "SOURCE", "STATE", "PREFIX", "TAG", "URL");
        json_array_foreach(j, i, w) {
                char name[WEBHOOK_NAME_MAX + 1], source[16], state[16], prefix[160], tag[400], url[2100];

                printf("%-24s  %-6s  %-8s  %-16s  %-16s  %s\n",
                       clean(json_string_value(json_object_get(w, "name")), "?", name, sizeof(name)),
                       clean(json_string_value(json_object_get(w, "source")), "?", source, sizeof(source)),
                       clean(json_string_value(json_object_get(w, "state")), "?", state, sizeof(state)),
                       clean(json_string_value(json_object_get(w, "prefix")), "-", prefix, sizeof(prefix)),
                       clean(json_string_value(json_object_get(w, "tag")), "-", tag, sizeof(tag)),
                       clean(json_string_value(json_object_get(w, "url")), "-", url, sizeof(url)));
        }
        json_decref(j);
        return 0;
}

static int webhooks_delete(Api *a, const char *name) {
        _cleanup_free_ char *path = NULL;

        if (!name_valid(name))
                return cli_usage_error("Invalid webhook name '%s': 1 to %d of A-Z a-z 0-9 _ -", name,
                                       WEBHOOK_NAME_MAX);
        if (asprintf(&path, "/v1/webhooks/%s", name) < 0)
                return log_error_errno(-ENOMEM, "Out of memory");
        return request_delete(a, path);
}

int cmd_webhooks(Api *a, char **args, int n) {
        if (n < 1)
                return cli_usage_error("'webhooks' takes a subcommand: create, list or delete");
        if (streq(args[0], "create")) {
                if (n != 2)
                        return cli_usage_error("'webhooks create' takes one argument, URL");
                if (arg.n_ota_tags > 1)
                        return cli_usage_error("--tag may be given once for 'webhooks create'");
                return webhooks_create(a, args[1]);
        }
        if (arg.webhook_prefix || arg.webhook_secret || arg.n_ota_tags > 0 || arg.token_name)
                return cli_usage_error("--prefix, --tag, --name and --secret are options of 'webhooks create'");
        if (streq(args[0], "list")) {
                if (n != 1)
                        return cli_usage_error("'webhooks list' takes no arguments");
                return webhooks_list(a);
        }
        if (streq(args[0], "delete")) {
                if (n != 2)
                        return cli_usage_error("'webhooks delete' takes one argument, NAME");
                return webhooks_delete(a, args[1]);
        }
        return cli_usage_error("Unknown subcommand 'webhooks %s': use create, list or delete", args[0]);
}

int cmd_integrations(Api *a, char **args, int n) {
        json_t *j = NULL, *o;
        size_t i;
        int r;

        if (n != 1 || !streq(args[0], "list"))
                return cli_usage_error("'integrations' takes one subcommand: list");
        r = request_list(a, "/v1/integrations", "integrations", &j);
        if (r < 0)
                return r;
        if (arg.json) {
                r = print_json(j);
                json_decref(j);
                return r;
        }
        printf("%-24s  %-8s  %-8s  %8s  %10s  %8s  %s\n", "NAME", "KIND", "STATE", "BACKLOG", "DELIVERED", "FAILURES",
               "LAST ERROR");
        json_array_foreach(j, i, o) {
                char name[WEBHOOK_NAME_MAX + 1], kind[16], state[16], error[256];

                printf("%-24s  %-8s  %-8s  %8lld  %10lld  %8lld  %s\n",
                       clean(json_string_value(json_object_get(o, "name")), "?", name, sizeof(name)),
                       clean(json_string_value(json_object_get(o, "kind")), "?", kind, sizeof(kind)),
                       clean(json_string_value(json_object_get(o, "state")), "?", state, sizeof(state)),
                       (long long)json_integer_value(json_object_get(o, "backlog")),
                       (long long)json_integer_value(json_object_get(o, "delivered")),
                       (long long)json_integer_value(json_object_get(o, "failures")),
                       clean(json_string_value(json_object_get(o, "last_error")), "-", error, sizeof(error)));
        }
        json_decref(j);
        return 0;
}
