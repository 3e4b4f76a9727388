/* SPDX-License-Identifier: Apache-2.0 */
/* tether plugin SDK.
 *
 * A plugin is a shared object that exports exactly one symbol,
 * "tether_plugin", a struct tether_plugin_descriptor. tetherd dlopen()s
 * every *.so in its plugin directory, checks the descriptor's ABI major
 * (it must equal TETHER_PLUGIN_ABI_MAJOR of the agent), then calls
 * init() with the host API. In init() the plugin registers functions,
 * variables and the events it publishes, and may add fds and timers to the
 * agent's sd-event loop. Plugins must never block: everything runs on the
 * agent's single loop thread.
 *
 * Build a plugin out of tree with
 *   cc -shared -fPIC $(pkg-config --cflags tether-plugin) -o foo.so foo.c
 * and install it into $(pkg-config --variable=plugindir tether-plugin).
 *
 * ABI rules: fields are only ever appended; every struct carries its own
 * size so both sides can tell what the other knows. A minor bump adds
 * fields or host calls; a major bump breaks and is refused.
 *
 * Return values: 0 or positive on success, negative errno on failure,
 * as everywhere in tether.
 */
#pragma once

#include <stddef.h>
#include <stdint.h>
#include <systemd/sd-event.h>

#ifdef __cplusplus
extern "C" {
#endif

#define TETHER_PLUGIN_ABI_MAJOR 1
#define TETHER_PLUGIN_ABI_MINOR 1

/* Name of the one exported symbol. */
#define TETHER_PLUGIN_SYMBOL "tether_plugin"

/* Variable types (uint32_t on the ABI). Names on the wire and in the
 * cloud API are "bool", "int32", "double" and "string". */
#define TETHER_TYPE_BOOL 1u
#define TETHER_TYPE_INT32 2u
#define TETHER_TYPE_DOUBLE 3u
#define TETHER_TYPE_STRING 4u

/* Flags for publish(). */
#define TETHER_EVENT_PRIVATE 0x1u

/* Limits the host enforces; see docs/protocol.md. */
#define TETHER_NAME_MAX 64       /* function and variable names, bytes */
#define TETHER_EVENT_NAME_MAX 128 /* event names and prefixes, bytes */
#define TETHER_UNIT_MAX 16        /* variable units (ABI 1.1), bytes */
#define TETHER_STASH_VALUE_MAX 1024 /* stash values (ABI 1.1), bytes */
#define TETHER_STASH_KEYS 256       /* stash keys per plugin (ABI 1.1) */

typedef struct tether_host tether_host; /* opaque, owned by the agent */

/* A typed value. For TETHER_TYPE_STRING, "s" points at a NUL-terminated
 * UTF-8 string owned by the plugin; the host copies it before the getter
 * returns to the loop, so it only has to stay valid until then. */
struct tether_value {
        uint32_t type;
        union {
                int32_t b; /* 0 or 1 */
                int32_t i;
                double d;
                const char *s;
        };
};

/* A cloud function. "arg" is the NUL-terminated argument (UTF-8, at most
 * the configured payload limit, may be empty), owned by the host and valid
 * only during the call. On success store the result in *ret_result and
 * return 0. Return -EINVAL for a bad argument, -EBUSY if the plugin cannot
 * serve now, any other negative errno for a failure; the cloud sees a clear
 * error for each (docs/protocol.md). */
typedef int (*tether_function_fn)(void *userdata, const char *arg, int32_t *ret_result);

/* A variable getter: fill *ret (ret->type is preset to the registered
 * type and must not change). Return 0 or a negative errno. */
typedef int (*tether_variable_fn)(void *userdata, struct tether_value *ret);

/* An event delivered from the cloud to a subscription. name and data are
 * NUL-terminated, owned by the host, valid only during the call. */
typedef void (*tether_event_fn)(void *userdata, const char *name, const char *data);

struct tether_host_api {
        uint32_t struct_size; /* sizeof(struct tether_host_api) of the agent */
        uint32_t abi_major;
        uint32_t abi_minor;

        /* Register a function. name: copied by the host. userdata: owned
         * by the plugin, passed back on every call. -EEXIST if another
         * plugin has the name, -EINVAL for an invalid name. */
        int (*function_add)(tether_host *host, const char *name, tether_function_fn fn, void *userdata);

        /* Register a variable of a TETHER_TYPE_*. Same ownership as above. */
        int (*variable_add)(tether_host *host, const char *name, uint32_t type, tether_variable_fn get,
                            void *userdata);

        /* Tell the host a variable's value changed; the agent publishes a
         * private event "tether/var/<name>" with the new value. */
        int (*variable_changed)(tether_host *host, const char *name);

        /* Declare an event name (or prefix ending in '/') this plugin
         * publishes; it is listed in the device's describe data. */
        int (*event_source_add)(tether_host *host, const char *name);

        /* Publish an event. name and data are copied before return; data
         * may be NULL. ttl in seconds (0 = default 60). flags:
         * TETHER_EVENT_*. Returns 0 once the agent has accepted the event:
         * written to its persistent outbox, delivered in order and once.
         * Otherwise nothing was kept and a later retry is safe: -EINVAL bad
         * name, -E2BIG data too large, -ENOBUFS outbox full, -ENOSPC or
         * -EIO the outbox could not be written. */
        int (*publish)(tether_host *host, const char *name, const char *data, uint32_t ttl, uint32_t flags);

        /* Subscribe to cloud events whose name starts with prefix. The
         * callback runs on the loop; userdata is owned by the plugin. */
        int (*subscribe)(tether_host *host, const char *prefix, tether_event_fn fn, void *userdata);

        /* The agent's event loop. Add fds and timers with sd_event_add_*();
         * the plugin owns the sources it creates and must unref them in
         * fini(). The loop itself belongs to the agent: do not unref it. */
        sd_event *(*event)(tether_host *host);

        /* Value of a key in this plugin's config section
         * "[Plugin <name>]", or NULL. Owned by the host, valid until fini(). */
        const char *(*config_get)(tether_host *host, const char *key);

        /* Log a line through the agent, prefixed with the plugin name.
         * priority is a syslog LOG_* level. */
        void (*log)(tether_host *host, int priority, const char *fmt, ...)
                __attribute__((format(printf, 3, 4)));

        /* ---- ABI 1.1: these took five of the reserved slots, so
         * struct_size did not change. A plugin that may run on an older
         * agent checks api->abi_minor >= 1 before calling them (an agent
         * of ABI 1.0 has NULL here). */

        /* Attach a unit to a variable this plugin registered, e.g. "°C",
         * "V", "Pa", "s" (UTF-8, printable, at most TETHER_UNIT_MAX bytes).
         * It is listed in the describe data's "units" object. unit is
         * copied; NULL or "" removes it. -ENOENT if this plugin has no
         * variable of that name, -EINVAL for an invalid unit. */
        int (*variable_unit)(tether_host *host, const char *name, const char *unit);

        /* The agent's version string, e.g. "0.1.0"; owned by the host,
         * static. */
        const char *(*agent_version)(tether_host *host);

        /* Name and version of the index-th running plugin (0-based, in load
         * order; the calling plugin included). The list is complete once
         * loading has finished, so call it from getters and callbacks, not
         * from init(). The strings are owned by the host and valid until the
         * calling plugin's fini(). -ERANGE past the last plugin. */
        int (*plugin_info)(tether_host *host, uint32_t index, const char **ret_name,
                           const char **ret_version);

        /* A small key/value store kept by the agent for this plugin (by
         * plugin name) across reloads, but not across agent restarts: lets
         * a plugin tell a reload from a start and carry state over, e.g. the
         * value an output line had. Keys follow variable name rules; values
         * are NUL-terminated strings of at most TETHER_STASH_VALUE_MAX bytes,
         * at most TETHER_STASH_KEYS keys per plugin. stash_set copies key and
         * value; a NULL value deletes the key. stash_get returns the value
         * (owned by the host, valid until the next stash_set of that key)
         * or NULL. stash_set: -EINVAL bad key, -E2BIG value too long,
         * -ENOSPC too many keys, -ENOMEM. */
        int (*stash_set)(tether_host *host, const char *key, const char *value);
        const char *(*stash_get)(tether_host *host, const char *key);

        void *reserved[3];
};

struct tether_plugin_descriptor {
        uint32_t abi_major;   /* TETHER_PLUGIN_ABI_MAJOR the plugin was built with */
        uint32_t abi_minor;   /* TETHER_PLUGIN_ABI_MINOR likewise */
        uint32_t struct_size; /* sizeof(struct tether_plugin_descriptor) */
        uint32_t reserved0;
        const char *name;    /* short name, [a-z0-9_-]; selects "[Plugin <name>]" */
        const char *version; /* the plugin's own version string */

        /* Called once after loading. Store what you need in *ret_userdata.
         * api and host stay valid until fini() returns. A negative return
         * means the plugin failed: the agent logs it, removes whatever the
         * plugin registered, unloads it and carries on. */
        int (*init)(const struct tether_host_api *api, tether_host *host, void **ret_userdata);

        /* Called before unloading (stop and reload), also after a failed
         * init with the userdata init stored (may be NULL). Release all
         * sources and memory. May be NULL. */
        void (*fini)(void *userdata);

        void *reserved[4];
};

/* Define the descriptor: TETHER_PLUGIN("name", "1.0", init_fn, fini_fn). */
#define TETHER_PLUGIN(n, v, i, f)                                                     \
        __attribute__((visibility("default"))) const struct tether_plugin_descriptor \
                tether_plugin = {                                                     \
                        .abi_major = TETHER_PLUGIN_ABI_MAJOR,                         \
                        .abi_minor = TETHER_PLUGIN_ABI_MINOR,                         \
                        .struct_size = sizeof(struct tether_plugin_descriptor),       \
                        .name = (n),                                                  \
                        .version = (v),                                               \
                        .init = (i),                                                  \
                        .fini = (f),                                                  \
        }

#ifdef __cplusplus
}
#endif
