/* SPDX-License-Identifier: Apache-2.0 */
/* Device inventory rules (inventory.h). */
#include "config.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "inventory.h"
#include "proto.h"
#include "util.h"

bool inventory_name_valid(const char *s, size_t len) {
        return s && len <= INVENTORY_NAME_MAX && !memchr(s, 0, len) &&
               proto_name_check(s, len, PROTO_NAME_FUNCTION) == 0;
}

bool inventory_text_clean(const char *s, size_t len, size_t max) {
        return s && proto_text_clean(s, len, max);
}

/* "name" or "notes": 1 and *ret (NULL: clear) when present, 0 when absent. */
static int update_text(json_t *params, const char *key, const char **ret) {
        json_t *v = json_object_get(params, key);

        if (!v)
                return 0;
        *ret = json_is_string(v) && json_string_length(v) > 0 ? json_string_value(v) : NULL;
        return json_is_null(v) || json_is_string(v) ? 1 : -EINVAL;
}

int inventory_parse_update(json_t *params, InventoryUpdate *ret, char err[static INVENTORY_ERROR_MAX]) {
        InventoryUpdate u = {};
        json_t *tags, *v;
        const char *key;
        int r;

        if (!json_is_object(params)) {
                *ret = u;
                return 0;
        }
        r = update_text(params, "name", &u.name);
        if (r < 0) {
                snprintf(err, INVENTORY_ERROR_MAX, "\"name\" must be a string or null");
                return -EINVAL;
        }
        u.has_name = r > 0;
        if (u.name && !inventory_name_valid(u.name, json_string_length(json_object_get(params, "name")))) {
                snprintf(err, INVENTORY_ERROR_MAX, "Invalid name: names are [A-Za-z0-9_.-]{1,%u}",
                         (unsigned)INVENTORY_NAME_MAX);
                return -EINVAL;
        }
        r = update_text(params, "notes", &u.notes);
        if (r < 0) {
                snprintf(err, INVENTORY_ERROR_MAX, "\"notes\" must be a string or null");
                return -EINVAL;
        }
        u.has_notes = r > 0;
        if (u.notes) {
                size_t len = json_string_length(json_object_get(params, "notes"));

                if (len > INVENTORY_NOTES_MAX) {
                        snprintf(err, INVENTORY_ERROR_MAX, "\"notes\" is longer than %u bytes",
                                 (unsigned)INVENTORY_NOTES_MAX);
                        return -EINVAL;
                }
                /* Newlines and tabs are text in notes; NUL and invalid
                 * UTF-8 are not. */
                if (memchr(u.notes, 0, len) || proto_utf8_check(u.notes, len) < 0) {
                        snprintf(err, INVENTORY_ERROR_MAX, "\"notes\" must be UTF-8 text without NUL bytes");
                        return -EINVAL;
                }
        }
        tags = json_object_get(params, "tags");
        if (json_is_null(tags))
                tags = NULL;
        if (tags && !json_is_object(tags)) {
                snprintf(err, INVENTORY_ERROR_MAX,
                         "\"tags\" must be a JSON object of names to a string (set) or null (remove)");
                return -EINVAL;
        }
        json_object_foreach(tags, key, v) {
                if (!inventory_name_valid(key, strlen(key))) {
                        snprintf(err, INVENTORY_ERROR_MAX, "Invalid tag name in \"tags\": names are [A-Za-z0-9_.-]{1,%u}",
                                 (unsigned)INVENTORY_TAG_NAME_MAX);
                        return -EINVAL;
                }
                if (json_is_null(v))
                        continue;
                if (!json_is_string(v)) {
                        snprintf(err, INVENTORY_ERROR_MAX, "The value of tag '%s' must be a string or null", key);
                        return -EINVAL;
                }
                if (json_string_length(v) > INVENTORY_TAG_VALUE_MAX) {
                        snprintf(err, INVENTORY_ERROR_MAX, "The value of tag '%s' is longer than %u bytes", key,
                                 (unsigned)INVENTORY_TAG_VALUE_MAX);
                        return -EINVAL;
                }
                if (!inventory_text_clean(json_string_value(v), json_string_length(v), INVENTORY_TAG_VALUE_MAX)) {
                        snprintf(err, INVENTORY_ERROR_MAX,
                                 "The value of tag '%s' must be UTF-8 text without control characters", key);
                        return -EINVAL;
                }
        }
        u.tags = tags;
        *ret = u;
        return 0;
}

bool inventory_update_empty(const InventoryUpdate *u) {
        return !u->has_name && !u->has_notes && !u->tags;
}

int inventory_tags_merge(json_t *tags, json_t *patch, json_t **ret, char err[static INVENTORY_ERROR_MAX]) {
        json_t *out = json_is_object(tags) ? json_copy(tags) : json_object(), *v;
        const char *key;

        if (!out)
                return -ENOMEM;
        json_object_foreach(patch, key, v) {
                int k = json_is_null(v) ? (json_object_del(out, key), 0) : json_object_set(out, key, v);

                if (k < 0) {
                        json_decref(out);
                        return -ENOMEM;
                }
        }
        if (json_object_size(out) > INVENTORY_TAGS_MAX) {
                snprintf(err, INVENTORY_ERROR_MAX, "\"tags\" would hold %zu tags, at most %u are allowed",
                         json_object_size(out), (unsigned)INVENTORY_TAGS_MAX);
                json_decref(out);
                return -EINVAL;
        }
        *ret = out;
        return 0;
}

void inventory_filter_init(InventoryFilter *f) {
        *f = (InventoryFilter){ .connected = -1, .heard_within = -1, .not_heard_within = -1 };
}

/* Seconds: 0 to 10 years in plain decimal. */
static int filter_seconds(const char *s, int64_t *ret) {
        int64_t v = 0;

        if (!s || !*s || strlen(s) > 9)
                return -EINVAL;
        for (; *s; s++) {
                if (*s < '0' || *s > '9')
                        return -EINVAL;
                v = v * 10 + (*s - '0');
        }
        if (v > 10LL * 366 * 86400)
                return -EINVAL;
        *ret = v;
        return 0;
}

/* "NAME" or "NAME=VALUE" into p; name_ok and value_ok check each part. */
static int filter_pair(const char *s, bool (*name_ok)(const char *, size_t), bool (*value_ok)(const char *, size_t),
                       InventoryFilterPair *ret) {
        const char *eq = s ? strchr(s, '=') : NULL;
        size_t nlen = eq ? (size_t)(eq - s) : s ? strlen(s) : 0;
        InventoryFilterPair p = {};

        if (!s || nlen >= sizeof(p.name) || !name_ok(s, nlen))
                return -EINVAL;
        memcpy(p.name, s, nlen);
        if (eq) {
                size_t vlen = strlen(eq + 1);

                if (vlen >= sizeof(p.value) || !value_ok(eq + 1, vlen))
                        return -EINVAL;
                memcpy(p.value, eq + 1, vlen);
                p.has_value = true;
        }
        *ret = p;
        return 0;
}

static bool tag_name_ok(const char *s, size_t len) { return inventory_name_valid(s, len); }
static bool tag_value_ok(const char *s, size_t len) {
        return inventory_text_clean(s, len, INVENTORY_TAG_VALUE_MAX);
}
static bool package_name_ok(const char *s, size_t len) { return proto_package_name_valid(s, len); }
static bool package_version_ok(const char *s, size_t len) { return proto_package_version_valid(s, len); }

int inventory_filter_add(InventoryFilter *f, const char *key, const char *value, char err[static INVENTORY_ERROR_MAX]) {
        if (streq(key, "tag")) {
                if (f->n_tags >= INVENTORY_FILTER_TAGS_MAX) {
                        snprintf(err, INVENTORY_ERROR_MAX, "Malformed filter 'tag': at most %u are allowed",
                                 (unsigned)INVENTORY_FILTER_TAGS_MAX);
                        return -EINVAL;
                }
                if (filter_pair(value, tag_name_ok, tag_value_ok, &f->tags[f->n_tags]) < 0) {
                        snprintf(err, INVENTORY_ERROR_MAX,
                                 "Malformed filter 'tag': tag=NAME or tag=NAME=VALUE, names [A-Za-z0-9_.-]{1,64}, "
                                 "values text of at most 256 bytes");
                        return -EINVAL;
                }
                f->n_tags++;
        } else if (streq(key, "package")) {
                if (f->n_packages >= INVENTORY_FILTER_PACKAGES_MAX) {
                        snprintf(err, INVENTORY_ERROR_MAX, "Malformed filter 'package': at most %u are allowed",
                                 (unsigned)INVENTORY_FILTER_PACKAGES_MAX);
                        return -EINVAL;
                }
                if (filter_pair(value, package_name_ok, package_version_ok, &f->packages[f->n_packages]) < 0) {
                        snprintf(err, INVENTORY_ERROR_MAX,
                                 "Malformed filter 'package': package=NAME or package=NAME=VERSION (a Debian "
                                 "package name and version)");
                        return -EINVAL;
                }
                f->n_packages++;
        } else if (streq(key, "connected")) {
                if (f->connected >= 0 || !value || (!streq(value, "true") && !streq(value, "false"))) {
                        snprintf(err, INVENTORY_ERROR_MAX, "Malformed filter 'connected': once, true or false");
                        return -EINVAL;
                }
                f->connected = streq(value, "true");
        } else if (streq(key, "heard_within") || streq(key, "not_heard_within")) {
                int64_t *t = streq(key, "heard_within") ? &f->heard_within : &f->not_heard_within;

                if (*t >= 0 || filter_seconds(value, t) < 0) {
                        snprintf(err, INVENTORY_ERROR_MAX,
                                 "Malformed filter '%s': once, a whole number of seconds up to 10 years", key);
                        return -EINVAL;
                }
        } else if (streq(key, "name")) {
                if (f->name[0] || !value || !inventory_name_valid(value, strlen(value))) {
                        snprintf(err, INVENTORY_ERROR_MAX,
                                 "Malformed filter 'name': once, a device name ([A-Za-z0-9_.-]{1,64})");
                        return -EINVAL;
                }
                memcpy(f->name, value, strlen(value) + 1);
        } else
                return 0;
        f->any = true;
        return 0;
}

static bool pair_in(const InventoryFilterPair *p, json_t *obj) {
        json_t *v = json_is_object(obj) ? json_object_get(obj, p->name) : NULL;

        return json_is_string(v) && (!p->has_value || streq(json_string_value(v), p->value));
}

bool inventory_filter_match(const InventoryFilter *f, json_t *dev, uint64_t last_heard_usec, uint64_t now_usec) {
        json_t *sys = json_object_get(dev, "system");
        json_t *name = json_object_get(dev, "name");
        bool connected = json_is_true(json_object_get(dev, "connected"));
        uint64_t heard = connected ? now_usec : last_heard_usec;

        for (size_t i = 0; i < f->n_tags; i++)
                if (!pair_in(&f->tags[i], json_object_get(dev, "tags")))
                        return false;
        for (size_t i = 0; i < f->n_packages; i++)
                if (!pair_in(&f->packages[i], json_is_object(sys) ? json_object_get(sys, "packages") : NULL))
                        return false;
        if (f->connected >= 0 && connected != (f->connected == 1))
                return false;
        if (f->heard_within >= 0 &&
            (heard == 0 || heard + (uint64_t)f->heard_within * 1000000ULL < now_usec))
                return false;
        if (f->not_heard_within >= 0 && heard != 0 &&
            heard + (uint64_t)f->not_heard_within * 1000000ULL >= now_usec)
                return false;
        if (f->name[0] && !(json_is_string(name) && streq(json_string_value(name), f->name)))
                return false;
        return true;
}
