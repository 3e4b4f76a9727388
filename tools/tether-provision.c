/* SPDX-License-Identifier: Apache-2.0 */
/* "tether provision ...": the cloud's provisioning tokens (docs/cli.md,
 * docs/cloud.md "Provisioning tokens"), through /v1/provision, which needs
 * an admin or provision:write token. create prints the token alone on
 * standard output (for a script to capture), everything else on
 * standard error. */
#include <curl/curl.h>
#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "tether-cli.h"
#include "util.h"

#define PROVISION_CLI_LIFETIME_MAX (10LL * 366 * 86400) /* cloud/provision.h */
#define PROVISION_CLI_USES_MAX 1000000

int provision_duration_parse(const char *s, long long *ret) {
        static const struct {
                char suffix;
                long long seconds;
        } units[] = { { 's', 1 }, { 'm', 60 }, { 'h', 3600 }, { 'd', 86400 }, { 'w', 7 * 86400 } };
        long long n = 0, mult = 1;
        const char *c = s;

        if (!s || !(*c >= '0' && *c <= '9'))
                return -EINVAL;
        for (; *c >= '0' && *c <= '9'; c++) {
                n = n * 10 + (*c - '0');
                if (n > PROVISION_CLI_LIFETIME_MAX)
                        return -ERANGE;
        }
        if (*c) {
                size_t i;

                for (i = 0; i < ELEMENTSOF(units) && units[i].suffix != *c; i++)
                        ;
                if (i == ELEMENTSOF(units) || c[1])
                        return -EINVAL;
                mult = units[i].seconds;
        }
        if (n == 0)
                return -ERANGE;
        if (n > PROVISION_CLI_LIFETIME_MAX / mult)
                return -ERANGE;
        *ret = n * mult;
        return 0;
}

int request_json(Api *a, const char *method, const char *path, json_t *body, json_t **ret) {
        _cleanup_free_ char *text = body ? json_dumps(body, JSON_COMPACT) : NULL;
        struct curl_slist *headers = NULL;
        int r;

        if (body && !text)
                return log_error_errno(-ENOMEM, "Out of memory");
        if (text) {
                for (struct curl_slist *h = a->headers; h; h = h->next)
                        if (!(headers = curl_slist_append(headers, h->data)))
                                return log_error_errno(-ENOMEM, "Out of memory");
                if (!(headers = curl_slist_append(headers, "Content-Type: application/json")))
                        return log_error_errno(-ENOMEM, "Out of memory");
                curl_easy_setopt(a->curl, CURLOPT_HTTPHEADER, headers);
        }
        if (!streq(method, "GET") && !streq(method, "POST"))
                curl_easy_setopt(a->curl, CURLOPT_CUSTOMREQUEST, method);
        r = api_request(a, path, text, ret);
        curl_easy_setopt(a->curl, CURLOPT_CUSTOMREQUEST, NULL);
        curl_easy_setopt(a->curl, CURLOPT_HTTPHEADER, a->headers);
        curl_easy_setopt(a->curl, CURLOPT_POSTFIELDS, NULL);
        curl_slist_free_all(headers);
        return r;
}

static int key_cmp(const void *x, const void *y) {
        return strcmp(*(const char *const *)x, *(const char *const *)y);
}

/* "k=v,k2=v2" (sorted by name), or none. */
static void tags_text(json_t *tags, char *buf, size_t size, const char *none) {
        _cleanup_free_ const char **keys = NULL;
        size_t n = 0, used = 0, i;
        const char *key;
        json_t *v;

        buf[0] = 0;
        if (json_is_object(tags) && json_object_size(tags) > 0 &&
            (keys = calloc(json_object_size(tags), sizeof(char *)))) {
                json_object_foreach(tags, key, v)
                        keys[n++] = key;
                qsort(keys, n, sizeof(char *), key_cmp);
                for (i = 0; i < n; i++) {
                        int k = snprintf(buf + used, size - used, "%s%s=%s", used ? "," : "", keys[i],
                                         json_string_value(json_object_get(tags, keys[i])) ?: "?");

                        if (k < 0 || (size_t)k >= size - used) {
                                buf[used] = 0;
                                break;
                        }
                        used += (size_t)k;
                }
        }
        if (!buf[0])
                snprintf(buf, size, "%s", none);
}

static int provision_create(Api *a) {
        json_t *body = json_object(), *tags = json_object(), *j = NULL;
        const char *token;
        char text[1024];
        int r = 0;

        if (!body || !tags) {
                json_decref(body);
                json_decref(tags);
                return log_error_errno(-ENOMEM, "Out of memory");
        }
        for (size_t i = 0; i < arg.n_ota_tags && r >= 0; i++) {
                const char *eq = strchr(arg.ota_tags[i], '=');
                _cleanup_free_ char *k = eq ? strndup(arg.ota_tags[i], (size_t)(eq - arg.ota_tags[i])) : NULL;

                if (!eq)
                        r = cli_usage_error("Invalid --tag '%s': expected NAME=VALUE", arg.ota_tags[i]);
                else if (!k)
                        r = log_error_errno(-ENOMEM, "Out of memory");
                else if (proto_name_check(k, strlen(k), PROTO_NAME_FUNCTION) < 0)
                        r = cli_usage_error("Invalid tag name '%s': use [A-Za-z0-9_.-], at most 64 bytes", k);
                else if (json_object_get(tags, k))
                        r = cli_usage_error("--tag '%s' is given twice", k);
                else if (json_object_set_new(tags, k, json_string(eq + 1)) < 0)
                        r = cli_usage_error("Invalid --tag '%s': the value must be UTF-8 text", arg.ota_tags[i]);
        }
        if (r >= 0 && arg.n_ota_tags > 0)
                r = json_object_set(body, "tags", tags) < 0 ? -ENOMEM : 0;
        if (r >= 0 && arg.provision_uses > 0)
                r = json_object_set_new(body, "uses", json_integer(arg.provision_uses)) < 0 ? -ENOMEM : 0;
        if (r >= 0 && arg.provision_expires > 0)
                r = json_object_set_new(body, "expires_in", json_integer(arg.provision_expires)) < 0 ? -ENOMEM : 0;
        if (r >= 0 && arg.token_name && json_object_set_new(body, "name", json_string(arg.token_name)) < 0)
                r = cli_usage_error("Invalid --name '%s': it must be UTF-8 text", arg.token_name);
        json_decref(tags);
        if (r == -ENOMEM)
                r = log_error_errno(r, "Out of memory");
        if (r < 0) {
                json_decref(body);
                return r;
        }
        a->what_400 = "Invalid provisioning token request";
        r = request_json(a, "POST", "/v1/provision", body, &j);
        json_decref(body);
        if (r < 0)
                return r;
        token = json_string_value(json_object_get(j, "token"));
        if (!token) {
                json_decref(j);
                log_error("Malformed response from %s: no token", a->base);
                return -EBADMSG;
        }
        if (arg.json)
                r = print_json(j);
        else {
                tags_text(json_object_get(j, "tags"), text, sizeof(text), "none");
                fprintf(stderr, "Provisioning token %s%s%s%s: %lld use(s), expires %s, tags: %s\n",
                        json_string_or(j, "id", "?"), *json_string_or(j, "name", "") ? " ('" : "",
                        json_string_or(j, "name", ""), *json_string_or(j, "name", "") ? "')" : "",
                        (long long)json_integer_value(json_object_get(j, "uses_max")),
                        json_string_or(j, "expires_at", "?"), text);
                fprintf(stderr, "The token is shown only now: keep it.\n");
                printf("%s\n", token);
        }
        json_decref(j);
        return r;
}

static int provision_list(Api *a) {
        json_t *j = NULL, *t;
        size_t i;
        int r;

        r = request_list(a, "/v1/provision", "provisioning tokens", &j);
        if (r < 0)
                return r;
        if (arg.json) {
                r = print_json(j);
                json_decref(j);
                return r;
        }
        printf("%-13s  %-20s  %-15s  %-20s  %-8s  %s\n", "ID", "NAME", "USES", "EXPIRES", "STATE", "TAGS");
        json_array_foreach(j, i, t) {
                char uses[48], tags[1024];
                const char *name = json_string_or(t, "name", "");

                snprintf(uses, sizeof(uses), "%lld/%lld", (long long)json_integer_value(json_object_get(t, "uses")),
                         (long long)json_integer_value(json_object_get(t, "uses_max")));
                tags_text(json_object_get(t, "tags"), tags, sizeof(tags), "-");
                printf("%-13s  %-20s  %-15s  %-20s  %-8s  %s\n", json_string_or(t, "id", "?"), *name ? name : "-",
                       uses, json_string_or(t, "expires_at", "?"), json_string_or(t, "state", "?"), tags);
        }
        json_decref(j);
        return 0;
}

static int provision_revoke(Api *a, const char *id) {
        _cleanup_free_ char *path = NULL;

        if (!startswith(id, "prov-") || strlen(id) != 13 || strspn(id + 5, "0123456789abcdef") != 8)
                return cli_usage_error("Invalid provisioning token ID '%s': expected prov- and 8 hex digits", id);
        if (asprintf(&path, "/v1/provision/%s", id) < 0)
                return log_error_errno(-ENOMEM, "Out of memory");
        return request_delete(a, path);
}

int cmd_provision(Api *a, char **args, int n) {
        if (n < 1)
                return cli_usage_error("'provision' takes a subcommand: create, list or revoke");
        if (streq(args[0], "create")) {
                if (n != 1)
                        return cli_usage_error("'provision create' takes no arguments, only options");
                return provision_create(a);
        }
        if (arg.provision_uses > 0 || arg.provision_expires > 0 || arg.n_ota_tags > 0 || arg.token_name)
                return cli_usage_error("--uses, --expires, --tag and --name are options of 'provision create'");
        if (streq(args[0], "list")) {
                if (n != 1)
                        return cli_usage_error("'provision list' takes no arguments");
                return provision_list(a);
        }
        if (streq(args[0], "revoke")) {
                if (n != 2)
                        return cli_usage_error("'provision revoke' takes one argument, ID");
                return provision_revoke(a, args[1]);
        }
        return cli_usage_error("Unknown subcommand 'provision %s': use create, list or revoke", args[0]);
}
