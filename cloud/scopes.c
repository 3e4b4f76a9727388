/* SPDX-License-Identifier: Apache-2.0 */
/* API token scopes (scopes.h). */
#include "config.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "scopes.h"

static const char *const scope_names[] = {
        "devices:read", "functions:call", "events:read", "events:publish", "ota:write", "metrics:read", "admin",
        "provision:write", "devices:write", "tunnels:open", "logs:read",
};

const char *scope_name(unsigned scope) {
        for (size_t i = 0; i < sizeof(scope_names) / sizeof(scope_names[0]); i++)
                if (scope == 1u << i)
                        return scope_names[i];
        return NULL;
}

int scope_parse(const char *name, size_t len, unsigned *ret) {
        for (size_t i = 0; i < sizeof(scope_names) / sizeof(scope_names[0]); i++)
                if (strlen(scope_names[i]) == len && memcmp(scope_names[i], name, len) == 0) {
                        *ret = 1u << i;
                        return 0;
                }
        return -EINVAL;
}

static int scope_unknown(const char *name, size_t len, char err[static SCOPE_ERROR_MAX]) {
        size_t n = 0;

        /* Only printable ASCII of the client's text goes back to it. */
        for (; n < len && n < 64; n++)
                if ((unsigned char)name[n] < 0x20 || (unsigned char)name[n] >= 0x7f) {
                        snprintf(err, SCOPE_ERROR_MAX, "Unknown scope");
                        return -EINVAL;
                }
        snprintf(err, SCOPE_ERROR_MAX,
                 "Unknown scope '%.*s' (known: devices:read, functions:call, events:read, events:publish, "
                 "ota:write, metrics:read, admin, provision:write, devices:write, tunnels:open, logs:read)",
                 (int)n, name);
        return -EINVAL;
}

static int scope_add(const char *name, size_t len, unsigned *set, char err[static SCOPE_ERROR_MAX]) {
        unsigned s;

        if (scope_parse(name, len, &s) < 0)
                return scope_unknown(name, len, err);
        *set |= s;
        return 0;
}

int scope_parse_json(json_t *v, unsigned *ret, char err[static SCOPE_ERROR_MAX]) {
        unsigned set = 0;
        int r;

        if (json_is_string(v)) {
                const char *s = json_string_value(v), *end = s + json_string_length(v);

                while (s < end) {
                        const char *e = s;

                        while (e < end && *e != ',' && *e != ' ' && *e != '\t')
                                e++;
                        if (e > s && (r = scope_add(s, (size_t)(e - s), &set, err)) < 0)
                                return r;
                        s = e + 1;
                }
        } else if (json_is_array(v)) {
                size_t i;
                json_t *x;

                json_array_foreach(v, i, x) {
                        if (!json_is_string(x)) {
                                snprintf(err, SCOPE_ERROR_MAX, "\"scopes\" must be an array of scope names");
                                return -EINVAL;
                        }
                        r = scope_add(json_string_value(x), json_string_length(x), &set, err);
                        if (r < 0)
                                return r;
                }
        } else {
                snprintf(err, SCOPE_ERROR_MAX,
                         "\"scopes\" must be an array of scope names or a string of names separated by commas");
                return -EINVAL;
        }
        if (set == 0) {
                snprintf(err, SCOPE_ERROR_MAX, "At least one scope is required");
                return -EINVAL;
        }
        *ret = set;
        return 0;
}

json_t *scope_to_json(unsigned scopes) {
        json_t *a = json_array();

        if (!a)
                return NULL;
        for (unsigned bit = 1; bit & SCOPE_ALL; bit <<= 1)
                if ((scopes & bit) && json_array_append_new(a, json_string(scope_name(bit))) < 0) {
                        json_decref(a);
                        return NULL;
                }
        return a;
}

char *scope_to_text(unsigned scopes, char *buf, size_t size) {
        size_t n = 0;

        if (size == 0)
                return buf;
        buf[0] = 0;
        for (unsigned bit = 1; bit & SCOPE_ALL; bit <<= 1)
                if (scopes & bit) {
                        int k = snprintf(buf + n, size - n, "%s%s", n ? " " : "", scope_name(bit));

                        if (k < 0 || (size_t)k >= size - n) {
                                buf[n] = 0; /* no half name */
                                break;
                        }
                        n += (size_t)k;
                }
        return buf;
}

bool scope_allows(unsigned have, unsigned need) {
        return (have & SCOPE_ADMIN) || (have & need) == need;
}
