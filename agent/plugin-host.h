/* SPDX-License-Identifier: Apache-2.0 */
/* Loads plugins (dlopen of *.so in the plugin directory), checks their
 * ABI, gives each a tether_host handle and unloads them again. A plugin
 * that fails to load or init is logged and skipped. */
#pragma once

#include <jansson.h>
#include <systemd/sd-event.h>

#include "agent-config.h"
#include "registry.h"
#include "tether/plugin.h"

typedef struct PluginHost PluginHost;

typedef struct PluginHostHooks {
        void *userdata;
        int (*publish)(void *userdata, const char *name, const char *data, uint32_t ttl, uint32_t flags);
} PluginHostHooks;

/* event and reg are borrowed for the life of the host; cfg until the next
 * plugin_host_load(). */
int plugin_host_new(sd_event *event, Registry *reg, const PluginHostHooks *hooks, PluginHost **ret);
PluginHost *plugin_host_free(PluginHost *h);
static inline void plugin_host_freep(PluginHost **h) { plugin_host_free(*h); }

/* Unload everything, then load every enabled plugin from cfg's directory.
 * Returns the number of plugins running. */
int plugin_host_load(PluginHost *h, const Config *cfg);
void plugin_host_unload(PluginHost *h);

/* [{"name","version"}...] of the running plugins; caller decrefs. */
json_t *plugin_host_describe(PluginHost *h);
