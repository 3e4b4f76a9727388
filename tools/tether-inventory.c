/* SPDX-License-Identifier: Apache-2.0 */
/* "tether rename|notes|tag|untag" (docs/cli.md, docs/fleet.md): one
 * PUT /v1/devices/ID each, with a JSON body; the cloud checks the rules
 * and its answer (or error) is what is printed. */
#include "config.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "tether-cli.h"

/* PUT body to DEVICE's path; prints the answer (the raw body with --json,
 * else "ID: name=…, tags …"). */
static int update(Api *a, const char *device, json_t *body) {
        _cleanup_free_ char *path = NULL;
        json_t *res = NULL, *tag_set, *v;
        const char *key;
        int r;

        if (!body)
                return log_error_errno(-ENOMEM, "Out of memory");
        r = name_check(device, PROTO_NAME_DEVICE);
        if (r < 0) {
                json_decref(body);
                return r;
        }
        if (asprintf(&path, "/v1/devices/%s", device) < 0) {
                json_decref(body);
                return log_error_errno(-ENOMEM, "Out of memory");
        }
        a->what_400 = "The cloud refused the change";
        r = request_json(a, "PUT", path, body, &res);
        json_decref(body);
        if (r < 0)
                return r;
        if (arg.json)
                print_raw_body(a);
        else {
                v = json_object_get(res, "name");
                printf("%s: name %s%s%s", device, json_is_string(v) ? "'" : "",
                       json_is_string(v) ? json_string_value(v) : "(none)", json_is_string(v) ? "'" : "");
                tag_set = json_object_get(res, "tags");
                printf(", tags");
                if (json_object_size(tag_set) == 0)
                        printf(" (none)");
                json_object_foreach(tag_set, key, v)
                        printf(" %s=%s", key, json_is_string(v) ? json_string_value(v) : "?");
                printf("\n");
        }
        json_decref(res);
        return 0;
}

int cmd_rename(Api *a, char **args, int n) {
        if (n != 2)
                return cli_usage_error("'rename' takes two arguments, DEVICE NAME (\"\" removes the name)");
        return update(a, args[0], json_pack("{s:s}", "name", args[1]));
}

int cmd_notes(Api *a, char **args, int n) {
        if (n != 2)
                return cli_usage_error("'notes' takes two arguments, DEVICE TEXT (\"\" removes the notes)");
        return update(a, args[0], json_pack("{s:s}", "notes", args[1]));
}

/* tag DEVICE K=V... or untag DEVICE K... */
static int tags(Api *a, char **args, int n, bool set) {
        json_t *patch;

        if (n < 2)
                return cli_usage_error(set ? "'tag' takes DEVICE and at least one NAME=VALUE"
                                           : "'untag' takes DEVICE and at least one NAME");
        patch = json_object();
        if (!patch)
                return log_error_errno(-ENOMEM, "Out of memory");
        for (int i = 1; i < n; i++) {
                char *eq = strchr(args[i], '=');
                _cleanup_free_ char *name = NULL;
                int k;

                if (set != !!eq || (eq && eq == args[i])) {
                        json_decref(patch);
                        return cli_usage_error(set ? "Invalid tag '%s': expected NAME=VALUE"
                                                   : "Invalid tag name '%s': give names only, no '='",
                                               args[i]);
                }
                name = eq ? strndup(args[i], (size_t)(eq - args[i])) : strdup(args[i]);
                k = name ? json_object_set_new(patch, name, eq ? json_string(eq + 1) : json_null()) : -1;
                if (k < 0) {
                        json_decref(patch);
                        /* json_string() refuses text that is not UTF-8 */
                        return name ? cli_usage_error("Invalid tag '%s': the value must be UTF-8 text", args[i])
                                    : log_error_errno(-ENOMEM, "Out of memory");
                }
        }
        return update(a, args[0], json_pack("{s:o}", "tags", patch));
}

int cmd_tag(Api *a, char **args, int n) {
        return tags(a, args, n, true);
}

int cmd_untag(Api *a, char **args, int n) {
        return tags(a, args, n, false);
}
