/* SPDX-License-Identifier: Apache-2.0 */
#include <errno.h>

#include "proto.h"
#include "registry.h"
#include "util.h"

typedef enum EntryKind { ENTRY_FUNCTION, ENTRY_VARIABLE, ENTRY_EVENT, ENTRY_SUBSCRIPTION } EntryKind;

typedef struct Entry {
        EntryKind kind;
        char *name; /* prefix for subscriptions */
        const void *owner;
        uint32_t type;
        char *unit; /* variables: NULL or a unit ("°C") */
        union {
                tether_function_fn fn;
                tether_variable_fn get;
                tether_event_fn on_event;
        };
        void *userdata;
} Entry;

struct Registry {
        Entry *entries;
        size_t n_entries;
        const char **prefixes; /* distinct subscription prefixes, borrowed from entries */
        size_t n_prefixes;
        uint64_t generation;
};

Registry *registry_new(void) {
        return calloc(1, sizeof(Registry));
}

Registry *registry_free(Registry *r) {
        if (!r)
                return NULL;
        for (size_t i = 0; i < r->n_entries; i++) {
                free(r->entries[i].name);
                free(r->entries[i].unit);
        }
        free(r->entries);
        free(r->prefixes);
        free(r);
        return NULL;
}

static Entry *find(Registry *r, EntryKind kind, const char *name) {
        for (size_t i = 0; i < r->n_entries; i++)
                if (r->entries[i].kind == kind && streq(r->entries[i].name, name))
                        return &r->entries[i];
        return NULL;
}

static int rebuild_prefixes(Registry *r) {
        const char **p = realloc(r->prefixes, (r->n_entries + 1) * sizeof(char *));
        size_t n = 0;

        if (!p)
                return -ENOMEM;
        r->prefixes = p;
        for (size_t i = 0; i < r->n_entries; i++) {
                bool seen = false;

                if (r->entries[i].kind != ENTRY_SUBSCRIPTION)
                        continue;
                for (size_t k = 0; k < n && !seen; k++)
                        seen = streq(p[k], r->entries[i].name);
                if (!seen)
                        p[n++] = r->entries[i].name;
        }
        r->n_prefixes = n;
        return 0;
}

static int add(Registry *r, const Entry *e) {
        Entry *n = realloc(r->entries, (r->n_entries + 1) * sizeof(Entry));

        if (!n)
                return -ENOMEM;
        r->entries = n;
        n[r->n_entries] = *e;
        n[r->n_entries].unit = NULL;
        n[r->n_entries].name = strdup(e->name);
        if (!n[r->n_entries].name)
                return -ENOMEM;
        r->n_entries++;
        r->generation++;
        return e->kind == ENTRY_SUBSCRIPTION ? rebuild_prefixes(r) : 0;
}

int registry_function_add(Registry *r, const void *owner, const char *name, tether_function_fn fn,
                          void *userdata) {
        int k;

        if (!name || !fn)
                return -EINVAL;
        k = proto_name_check(name, strlen(name), PROTO_NAME_FUNCTION);
        if (k < 0)
                return k;
        if (find(r, ENTRY_FUNCTION, name))
                return -EEXIST;
        return add(r, &(Entry){ .kind = ENTRY_FUNCTION, .name = (char *)name, .owner = owner, .fn = fn,
                                .userdata = userdata });
}

int registry_variable_add(Registry *r, const void *owner, const char *name, uint32_t type,
                          tether_variable_fn get, void *userdata) {
        int k;

        if (!name || !get || !proto_type_to_string(type))
                return -EINVAL;
        k = proto_name_check(name, strlen(name), PROTO_NAME_VARIABLE);
        if (k < 0)
                return k;
        if (find(r, ENTRY_VARIABLE, name))
                return -EEXIST;
        return add(r, &(Entry){ .kind = ENTRY_VARIABLE, .name = (char *)name, .owner = owner, .type = type,
                                .get = get, .userdata = userdata });
}

int registry_variable_unit(Registry *r, const void *owner, const char *name, const char *unit) {
        Entry *e;
        char *copy = NULL;

        if (!name)
                return -EINVAL;
        e = find(r, ENTRY_VARIABLE, name);
        if (!e || e->owner != owner)
                return -ENOENT;
        if (unit && *unit) {
                size_t len = strlen(unit);

                if (len > TETHER_UNIT_MAX || proto_utf8_check(unit, len) < 0)
                        return -EINVAL;
                for (const char *p = unit; *p; p++)
                        if ((unsigned char)*p < 0x20 || *p == 0x7f)
                                return -EINVAL;
                copy = strdup(unit);
                if (!copy)
                        return -ENOMEM;
        }
        free(e->unit);
        e->unit = copy;
        r->generation++;
        return 0;
}

int registry_event_add(Registry *r, const void *owner, const char *name) {
        int k;

        if (!name)
                return -EINVAL;
        k = proto_name_check(name, strlen(name), PROTO_NAME_PREFIX);
        if (k < 0 || !*name)
                return k < 0 ? k : -EINVAL;
        if (find(r, ENTRY_EVENT, name))
                return 0; /* several plugins may publish under one name */
        return add(r, &(Entry){ .kind = ENTRY_EVENT, .name = (char *)name, .owner = owner });
}

int registry_subscription_add(Registry *r, const void *owner, const char *prefix, tether_event_fn fn,
                              void *userdata, unsigned max_prefixes) {
        int k;

        if (!prefix || !fn)
                return -EINVAL;
        k = proto_name_check(prefix, strlen(prefix), PROTO_NAME_PREFIX);
        if (k < 0)
                return k;
        if (!find(r, ENTRY_SUBSCRIPTION, prefix) && r->n_prefixes >= max_prefixes)
                return -EDQUOT;
        return add(r, &(Entry){ .kind = ENTRY_SUBSCRIPTION, .name = (char *)prefix, .owner = owner,
                                .on_event = fn, .userdata = userdata });
}

void registry_remove_owner(Registry *r, const void *owner) {
        size_t w = 0;

        for (size_t i = 0; i < r->n_entries; i++) {
                if (r->entries[i].owner == owner) {
                        free(r->entries[i].name);
                        free(r->entries[i].unit);
                        continue;
                }
                r->entries[w++] = r->entries[i];
        }
        if (w != r->n_entries)
                r->generation++;
        r->n_entries = w;
        (void)rebuild_prefixes(r);
}

bool registry_has_function(Registry *r, const char *name) {
        return find(r, ENTRY_FUNCTION, name) != NULL;
}

bool registry_has_variable(Registry *r, const char *name) {
        return find(r, ENTRY_VARIABLE, name) != NULL;
}

int registry_call(Registry *r, const char *name, const char *arg, int32_t *ret_result) {
        Entry *e = find(r, ENTRY_FUNCTION, name);
        int32_t result = 0;
        int k;

        if (!e)
                return -ENOENT;
        k = e->fn(e->userdata, arg ? arg : "", &result);
        if (k < 0)
                return k;
        *ret_result = result;
        return 0;
}

uint32_t registry_variable_type(Registry *r, const char *name) {
        Entry *e = find(r, ENTRY_VARIABLE, name);
        return e ? e->type : 0;
}

int registry_read(Registry *r, const char *name, char **ret, size_t *ret_len) {
        Entry *e = find(r, ENTRY_VARIABLE, name);
        struct tether_value v = {};
        int k;

        if (!e)
                return -ENOENT;
        v.type = e->type;
        k = e->get(e->userdata, &v);
        if (k < 0)
                return k;
        if (v.type != e->type || (v.type == TETHER_TYPE_STRING && !v.s))
                return -EPROTO;
        return proto_value_encode(&v, ret, ret_len);
}

int registry_describe(Registry *r, json_t *plugins, json_t *system, size_t max_payload, unsigned max_subscriptions,
                      char **ret, size_t *ret_len) {
        json_t *d, *functions, *variables, *events, *units = NULL;
        char *s;
        int k = -ENOMEM;

        d = json_pack("{s:s, s:s, s:O, s:[], s:{}, s:[], s:{s:I, s:I}}", "agent", "tetherd", "version",
                      PACKAGE_VERSION, "plugins", plugins, "functions", "variables", "events", "limits",
                      "max_payload", (json_int_t)max_payload, "max_subscriptions",
                      (json_int_t)max_subscriptions);
        if (!d)
                return -ENOMEM;
        if (system && json_object_set(d, "system", system) < 0)
                goto out;
        functions = json_object_get(d, "functions");
        variables = json_object_get(d, "variables");
        events = json_object_get(d, "events");
        for (size_t i = 0; i < r->n_entries; i++) {
                Entry *e = &r->entries[i];

                if (e->kind == ENTRY_FUNCTION && json_array_append_new(functions, json_string(e->name)) < 0)
                        goto out;
                if (e->kind == ENTRY_VARIABLE &&
                    json_object_set_new(variables, e->name, json_string(proto_type_to_string(e->type))) < 0)
                        goto out;
                if (e->kind == ENTRY_EVENT && json_array_append_new(events, json_string(e->name)) < 0)
                        goto out;
                if (e->kind == ENTRY_VARIABLE && e->unit) {
                        /* Only present when some variable has a unit, so
                         * describe data stays as it was for plugins without. */
                        if (!units) {
                                units = json_object();
                                if (!units || json_object_set_new(d, "units", units) < 0)
                                        goto out;
                        }
                        if (json_object_set_new(units, e->name, json_string(e->unit)) < 0)
                                goto out;
                }
        }
        s = json_dumps(d, JSON_COMPACT);
        if (!s)
                goto out;
        *ret_len = strlen(s);
        *ret = s;
        k = 0;
out:
        json_decref(d);
        return k;
}

size_t registry_prefixes(Registry *r, const char *const **ret) {
        *ret = r->prefixes;
        return r->n_prefixes;
}

void registry_dispatch(Registry *r, const char *name, const char *data) {
        /* Callbacks may not change the registry (they run on the loop, and
         * registration only happens in init), so plain iteration is safe. */
        for (size_t i = 0; i < r->n_entries; i++) {
                Entry *e = &r->entries[i];

                if (e->kind == ENTRY_SUBSCRIPTION && proto_prefix_match(e->name, name))
                        e->on_event(e->userdata, name, data ? data : "");
        }
}

uint64_t registry_generation(Registry *r) {
        return r->generation;
}
