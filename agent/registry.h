/* SPDX-License-Identifier: Apache-2.0 */
/* What the device offers the cloud (functions, variables, event names) and
 * what it wants from it (subscriptions), each entry tagged with the plugin
 * that registered it so a plugin's entries go away with it. No logging:
 * callers decide what an error means. */
#pragma once

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tether/plugin.h"

typedef struct Registry Registry;

Registry *registry_new(void);
Registry *registry_free(Registry *r);
static inline void registry_freep(Registry **r) { registry_free(*r); }

/* All add functions copy name; -EINVAL bad name or type, -EEXIST taken,
 * -ENOMEM. owner is an opaque tag (the plugin). */
int registry_function_add(Registry *r, const void *owner, const char *name, tether_function_fn fn,
                          void *userdata);
int registry_variable_add(Registry *r, const void *owner, const char *name, uint32_t type,
                          tether_variable_fn get, void *userdata);
/* Set (or with NULL/"" clear) the unit of owner's variable name; copied.
 * -ENOENT no such variable of this owner, -EINVAL invalid unit. */
int registry_variable_unit(Registry *r, const void *owner, const char *name, const char *unit);
int registry_event_add(Registry *r, const void *owner, const char *name);
/* -EDQUOT once max distinct prefixes would be exceeded. */
int registry_subscription_add(Registry *r, const void *owner, const char *prefix, tether_event_fn fn,
                              void *userdata, unsigned max_prefixes);
void registry_remove_owner(Registry *r, const void *owner);

/* Whether a function or variable of that name is registered. */
bool registry_has_function(Registry *r, const char *name);
bool registry_has_variable(Registry *r, const char *name);

/* Call a function: -ENOENT unknown (but a function may return -ENOENT
 * itself: check registry_has_function() first), else what it returned. */
int registry_call(Registry *r, const char *name, const char *arg, int32_t *ret_result);
/* Read a variable as its wire encoding (malloc'd, caller frees):
 * -ENOENT unknown, -EPROTO getter changed the type or gave no string, else
 * the getter's error. */
int registry_read(Registry *r, const char *name, char **ret, size_t *ret_len);
/* Type of a variable, 0 if unknown. */
uint32_t registry_variable_type(Registry *r, const char *name);

/* Describe JSON (docs/protocol.md). plugins: array of {"name","version"},
 * borrowed; system: the inventory (agent/inventory.h), borrowed, NULL:
 * none. Caller frees *ret. */
int registry_describe(Registry *r, json_t *plugins, json_t *system, size_t max_payload, unsigned max_subscriptions,
                      char **ret, size_t *ret_len);

/* Distinct subscription prefixes, in registration order. The array and
 * strings are borrowed and valid until the next change. */
size_t registry_prefixes(Registry *r, const char *const **ret);
/* Deliver a cloud event to every subscription whose prefix matches. */
void registry_dispatch(Registry *r, const char *name, const char *data);
/* Bumped on every change, so users can tell whether describe changed. */
uint64_t registry_generation(Registry *r);
