/* SPDX-License-Identifier: Apache-2.0 */
/* Unloading: a plugin's init() may add sources to the agent's loop through
 * the raw sd_event* the host API hands out, so the host cannot see or
 * remove them. A plugin that forgets one in fini() would have the loop call
 * into code that dlclose() unmapped. So every plugin whose init() ran is
 * pinned with RTLD_NODELETE (its code stays mapped until the agent exits),
 * and its tether_host handle is never freed either: once unloaded it is
 * "retired" (host calls that act return -ESTALE, log() still works) and
 * reused when a plugin of the same name loads again, so retired handles
 * are bounded by the number of distinct plugin names. docs/plugins.md,
 * "Unloading", says what this means for plugin authors.
 *
 * A pinned object stays in the dynamic loader's list under the names it
 * was opened with, and dlopen() of such a name returns it again, even after
 * a package upgrade replaced the file. So a plugin is opened by a name that
 * stands for its file's device and inode, not its path: the first time
 * "/proc/self/fd/N" of an fd on the file, kept open for as long as the
 * object stays loaded (so the name never comes back for another file),
 * and the same name again whenever the path still has that device and
 * inode. A replaced file has a new inode: it gets a new fd and a new
 * object, next to the old one. */
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <sys/stat.h>

#include "log.h"
#include "plugin-host.h"
#include "proto.h"
#include "util.h"

struct tether_host {
        PluginHost *host;
        void *dl;
        const struct tether_plugin_descriptor *desc;
        char *name;
        char *path;
        void *userdata;
        bool retired; /* unloaded; kept for sources the plugin left behind */
};

/* What plugins keep across reloads (stash_set), by plugin name. */
typedef struct StashEntry {
        char *plugin;
        char *key;
        char *value;
} StashEntry;

struct PluginHost {
        sd_event *event;
        StashEntry *stash;
        size_t n_stash;
        Registry *registry;
        const Config *config;
        PluginHostHooks hooks;
        tether_host **plugins;
        size_t n_plugins;
        tether_host **retired; /* unloaded plugins' handles, one per name */
        size_t n_retired;
        tether_host *initializing; /* set while init() runs */
        /* Objects that stay loaded (pinned) and the fd each was opened
         * through, kept open: see the top of this file. */
        struct {
                int fd;
                dev_t dev;
                ino_t ino;
        } *pins;
        size_t n_pins;
};

/* --- the host API plugins call ------------------------------------------ */

/* Registration is only allowed while the plugin's init() runs: that is
 * when the agent collects what it tells the cloud. */
#define REQUIRE_INIT(p)                                  \
        do {                                             \
                if ((p)->host->initializing != (p))      \
                        return -EBUSY;                   \
        } while (0)

static int api_function_add(tether_host *p, const char *name, tether_function_fn fn, void *userdata) {
        REQUIRE_INIT(p);
        return registry_function_add(p->host->registry, p, name, fn, userdata);
}

static int api_variable_add(tether_host *p, const char *name, uint32_t type, tether_variable_fn get,
                            void *userdata) {
        REQUIRE_INIT(p);
        return registry_variable_add(p->host->registry, p, name, type, get, userdata);
}

static int api_variable_changed(tether_host *p, const char *name) {
        _cleanup_free_ char *value = NULL, *event = NULL;
        size_t len;
        int r;

        if (p->retired)
                return -ESTALE;
        r = registry_read(p->host->registry, name, &value, &len);
        if (r < 0)
                return r;
        if (asprintf(&event, "tether/var/%s", name) < 0)
                return -ENOMEM;
        return p->host->hooks.publish(p->host->hooks.userdata, event, value, 0, TETHER_EVENT_PRIVATE);
}

static int api_event_source_add(tether_host *p, const char *name) {
        REQUIRE_INIT(p);
        return registry_event_add(p->host->registry, p, name);
}

static int api_publish(tether_host *p, const char *name, const char *data, uint32_t ttl, uint32_t flags) {
        if (p->retired)
                return -ESTALE;
        return p->host->hooks.publish(p->host->hooks.userdata, name, data, ttl, flags);
}

static int api_subscribe(tether_host *p, const char *prefix, tether_event_fn fn, void *userdata) {
        REQUIRE_INIT(p);
        return registry_subscription_add(p->host->registry, p, prefix, fn, userdata,
                                         p->host->config->max_subscriptions);
}

static sd_event *api_event(tether_host *p) {
        return p->host->event;
}

static const char *api_config_get(tether_host *p, const char *key) {
        return key && !p->retired ? config_plugin_get(p->host->config, p->name, key) : NULL;
}

static void api_log(tether_host *p, int priority, const char *fmt, ...) {
        char buf[1024];
        va_list ap;

        va_start(ap, fmt);
        vsnprintf(buf, sizeof(buf), fmt, ap);
        va_end(ap);
        log_internal(priority < LOG_EMERG ? LOG_EMERG : priority > LOG_DEBUG ? LOG_DEBUG : priority, 0,
                     "plugin %s%s: %s", p->name, p->retired ? " (unloaded)" : "", buf);
}

static int api_variable_unit(tether_host *p, const char *name, const char *unit) {
        if (p->retired)
                return -ESTALE;
        return registry_variable_unit(p->host->registry, p, name, unit);
}

static const char *api_agent_version(tether_host *p) {
        return PACKAGE_VERSION;
}

static int api_plugin_info(tether_host *p, uint32_t index, const char **ret_name, const char **ret_version) {
        const tether_host *q;

        if (index >= p->host->n_plugins)
                return -ERANGE;
        q = p->host->plugins[index];
        if (ret_name)
                *ret_name = q->name;
        if (ret_version)
                *ret_version = q->desc->version ? q->desc->version : "";
        return 0;
}

static StashEntry *stash_find(PluginHost *h, const char *plugin, const char *key, size_t *ret_count) {
        StashEntry *found = NULL;
        size_t n = 0;

        for (size_t i = 0; i < h->n_stash; i++) {
                if (!streq(h->stash[i].plugin, plugin))
                        continue;
                n++;
                if (key && streq(h->stash[i].key, key))
                        found = &h->stash[i];
        }
        if (ret_count)
                *ret_count = n;
        return found;
}

static int api_stash_set(tether_host *p, const char *key, const char *value) {
        PluginHost *h = p->host;
        StashEntry *e, *n;
        size_t count;
        char *v;

        if (p->retired)
                return -ESTALE;
        if (!key || proto_name_check(key, strlen(key), PROTO_NAME_VARIABLE) < 0)
                return -EINVAL;
        if (value && strlen(value) > TETHER_STASH_VALUE_MAX)
                return -E2BIG;
        e = stash_find(h, p->name, key, &count);
        if (!value) {
                if (e) {
                        free(e->plugin);
                        free(e->key);
                        free(e->value);
                        *e = h->stash[--h->n_stash];
                }
                return 0;
        }
        v = strdup(value);
        if (!v)
                return -ENOMEM;
        if (e) {
                free(e->value);
                e->value = v;
                return 0;
        }
        if (count >= TETHER_STASH_KEYS) {
                free(v);
                return -ENOSPC;
        }
        n = realloc(h->stash, (h->n_stash + 1) * sizeof(*n));
        if (!n) {
                free(v);
                return -ENOMEM;
        }
        h->stash = n;
        n[h->n_stash] = (StashEntry){ .plugin = strdup(p->name), .key = strdup(key), .value = v };
        if (!n[h->n_stash].plugin || !n[h->n_stash].key) {
                free(n[h->n_stash].plugin);
                free(n[h->n_stash].key);
                free(v);
                return -ENOMEM;
        }
        h->n_stash++;
        return 0;
}

static const char *api_stash_get(tether_host *p, const char *key) {
        StashEntry *e = key && !p->retired ? stash_find(p->host, p->name, key, NULL) : NULL;
        return e ? e->value : NULL;
}

static const struct tether_host_api host_api = {
        .struct_size = sizeof(struct tether_host_api),
        .abi_major = TETHER_PLUGIN_ABI_MAJOR,
        .abi_minor = TETHER_PLUGIN_ABI_MINOR,
        .function_add = api_function_add,
        .variable_add = api_variable_add,
        .variable_changed = api_variable_changed,
        .event_source_add = api_event_source_add,
        .publish = api_publish,
        .subscribe = api_subscribe,
        .event = api_event,
        .config_get = api_config_get,
        .log = api_log,
        .variable_unit = api_variable_unit,
        .agent_version = api_agent_version,
        .plugin_info = api_plugin_info,
        .stash_set = api_stash_set,
        .stash_get = api_stash_get,
};

/* --- loading ------------------------------------------------------------ */

static void plugin_free(tether_host *p) {
        if (!p)
                return;
        free(p->name);
        free(p->path);
        if (p->dl)
                dlclose(p->dl);
        free(p);
}

/* After fini() (or a failed init()): the code stays mapped (RTLD_NODELETE)
 * and the handle is kept, for whatever sources the plugin left in the loop. */
static void plugin_retire(PluginHost *h, tether_host *p) {
        tether_host **n;

        if (p->dl)
                dlclose(p->dl);
        p->dl = NULL;
        p->desc = NULL;
        p->userdata = NULL;
        p->retired = true;
        n = realloc(h->retired, (h->n_retired + 1) * sizeof(*n));
        if (!n) {
                /* Leak the handle rather than free what a source may use. */
                log_error("Out of memory retiring plugin '%s'", p->name);
                return;
        }
        h->retired = n;
        h->retired[h->n_retired++] = p;
}

/* The retired handle of a plugin named name, taken off the list, or NULL. */
static tether_host *plugin_unretire(PluginHost *h, const char *name) {
        for (size_t i = 0; i < h->n_retired; i++)
                if (streq(h->retired[i]->name, name)) {
                        tether_host *p = h->retired[i];

                        h->retired[i] = h->retired[--h->n_retired];
                        p->retired = false;
                        return p;
                }
        return NULL;
}

/* The smallest descriptor we understand: through fini. */
#define DESC_MIN_SIZE (offsetof(struct tether_plugin_descriptor, fini) + sizeof(void *))

/* self: the name to dlopen() path by. */
static int plugin_load_at(PluginHost *h, const char *path, const char *self) {
        tether_host *p, *old;
        const struct tether_plugin_descriptor *d;
        tether_host **n;
        void *pin;
        int r;

        p = calloc(1, sizeof(*p));
        if (!p)
                return log_error_errno(-ENOMEM, "Out of memory");
        p->host = h;
        p->path = strdup(path);
        p->dl = dlopen(self, RTLD_NOW | RTLD_LOCAL);
        if (!p->dl) {
                log_error("Failed to load plugin '%s': %s", path, dlerror());
                plugin_free(p);
                return -ELIBBAD;
        }
        d = dlsym(p->dl, TETHER_PLUGIN_SYMBOL);
        if (!d) {
                log_error("Plugin '%s' has no '%s' symbol, skipping", path, TETHER_PLUGIN_SYMBOL);
                plugin_free(p);
                return -ELIBBAD;
        }
        if (d->abi_major != TETHER_PLUGIN_ABI_MAJOR) {
                log_error("Plugin '%s' was built for plugin ABI %u.%u, this agent has ABI %u.%u: refusing to load it",
                          path, d->abi_major, d->abi_minor, TETHER_PLUGIN_ABI_MAJOR, TETHER_PLUGIN_ABI_MINOR);
                plugin_free(p);
                return -ELIBBAD;
        }
        if (d->struct_size < DESC_MIN_SIZE || !d->name || !d->init ||
            proto_name_check(d->name, strlen(d->name), PROTO_NAME_PLUGIN) < 0) {
                log_error("Plugin '%s' has a malformed descriptor, skipping", path);
                plugin_free(p);
                return -ELIBBAD;
        }
        for (size_t i = 0; i < h->n_plugins; i++)
                if (streq(h->plugins[i]->name, d->name)) {
                        log_error("Plugin '%s' is named '%s' like '%s', skipping", path, d->name,
                                  h->plugins[i]->path);
                        plugin_free(p);
                        return -EEXIST;
                }
        p->desc = d;
        p->name = strdup(d->name);
        if (!p->name || !p->path) {
                plugin_free(p);
                return log_error_errno(-ENOMEM, "Out of memory");
        }
        if (!config_plugin_enabled(h->config, p->name)) {
                log_info("Plugin '%s' is disabled by configuration", p->name);
                plugin_free(p);
                return 0;
        }
        /* From here on its code runs: pin it (see the top of this file). */
        pin = dlopen(self, RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD | RTLD_NODELETE);
        if (!pin) {
                log_error("Failed to pin plugin '%s' in memory: %s", path, dlerror());
                plugin_free(p);
                return -ELIBBAD;
        }
        dlclose(pin);
        old = plugin_unretire(h, p->name);
        if (old) {
                old->dl = TAKE_PTR(p->dl);
                free(old->path);
                old->path = TAKE_PTR(p->path);
                plugin_free(p);
                p = old;
        }
        p->desc = d;

        h->initializing = p;
        r = d->init(&host_api, p, &p->userdata);
        h->initializing = NULL;
        if (r < 0) {
                log_error_errno(r, "Plugin '%s' failed to initialize: %m; continuing without it", p->name);
                registry_remove_owner(h->registry, p);
                if (d->fini)
                        d->fini(p->userdata);
                plugin_retire(h, p);
                return r;
        }
        n = realloc(h->plugins, (h->n_plugins + 1) * sizeof(*n));
        if (!n) {
                registry_remove_owner(h->registry, p);
                if (d->fini)
                        d->fini(p->userdata);
                plugin_retire(h, p);
                return log_error_errno(-ENOMEM, "Out of memory");
        }
        h->plugins = n;
        h->plugins[h->n_plugins++] = p;
        log_info("Loaded plugin '%s' %s from '%s'", p->name, d->version ? d->version : "", path);
        return 1;
}

static int plugin_load_one(PluginHost *h, const char *path) {
        _cleanup_close_ int fd = -1;
        typeof(h->pins) n;
        struct stat st;
        char self[64];
        void *still;
        int r;

        fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0 || fstat(fd, &st) < 0)
                return log_error_errno(errno, "Failed to open plugin '%s': %m", path);
        for (size_t i = 0; i < h->n_pins; i++)
                if (h->pins[i].dev == st.st_dev && h->pins[i].ino == st.st_ino) {
                        /* Loaded before and still mapped: by its old name. */
                        snprintf(self, sizeof(self), "/proc/self/fd/%d", h->pins[i].fd);
                        return plugin_load_at(h, path, self);
                }
        snprintf(self, sizeof(self), "/proc/self/fd/%d", fd);
        r = plugin_load_at(h, path, self);

        /* The object may have stayed loaded: pinned, or made undeletable by
         * the loader itself (a C++ plugin's unique symbols do that). Then
         * keep the fd its name refers to. */
        still = dlopen(self, RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD);
        if (!still)
                return r;
        dlclose(still);
        n = realloc(h->pins, (h->n_pins + 1) * sizeof(*n));
        /* Out of memory: leak the fd rather than let its name be reused. */
        if (n) {
                h->pins = n;
                h->pins[h->n_pins].fd = fd;
                h->pins[h->n_pins].dev = st.st_dev;
                h->pins[h->n_pins++].ino = st.st_ino;
        }
        fd = -1;
        return r;
}

static int cmp_str(const void *a, const void *b) {
        return strcmp(*(char *const *)a, *(char *const *)b);
}

void plugin_host_unload(PluginHost *h) {
        /* Reverse order: later plugins may rely on earlier ones. */
        while (h->n_plugins > 0) {
                tether_host *p = h->plugins[--h->n_plugins];

                registry_remove_owner(h->registry, p);
                if (p->desc->fini)
                        p->desc->fini(p->userdata);
                plugin_retire(h, p);
        }
}

int plugin_host_load(PluginHost *h, const Config *cfg) {
        char **paths = NULL;
        size_t n = 0;
        struct dirent *de;
        DIR *d;

        plugin_host_unload(h);
        h->config = cfg;
        d = opendir(cfg->plugin_dir);
        if (!d) {
                if (errno == ENOENT) {
                        log_info("Plugin directory '%s' does not exist, no plugins loaded", cfg->plugin_dir);
                        return 0;
                }
                return log_error_errno(errno, "Cannot open plugin directory '%s': %m", cfg->plugin_dir);
        }
        while ((de = readdir(d))) {
                size_t l = strlen(de->d_name);
                char **np;

                if (de->d_name[0] == '.' || l < 4 || !streq(de->d_name + l - 3, ".so"))
                        continue;
                np = realloc(paths, (n + 1) * sizeof(char *));
                if (!np)
                        break;
                paths = np;
                if (asprintf(&paths[n], "%s/%s", cfg->plugin_dir, de->d_name) < 0)
                        break;
                n++;
        }
        closedir(d);
        if (n > 0)
                qsort(paths, n, sizeof(char *), cmp_str);
        for (size_t i = 0; i < n; i++) {
                (void)plugin_load_one(h, paths[i]);
                free(paths[i]);
        }
        free(paths);
        return (int)h->n_plugins;
}

json_t *plugin_host_describe(PluginHost *h) {
        json_t *a = json_array();

        for (size_t i = 0; a && i < h->n_plugins; i++) {
                const char *v = h->plugins[i]->desc->version;
                json_array_append_new(a, json_pack("{s:s, s:s}", "name", h->plugins[i]->name, "version",
                                                   v ? v : ""));
        }
        return a;
}

int plugin_host_new(sd_event *event, Registry *reg, const PluginHostHooks *hooks, PluginHost **ret) {
        PluginHost *h = calloc(1, sizeof(*h));

        if (!h)
                return -ENOMEM;
        h->event = sd_event_ref(event);
        h->registry = reg;
        h->hooks = *hooks;
        *ret = h;
        return 0;
}

PluginHost *plugin_host_free(PluginHost *h) {
        if (!h)
                return NULL;
        plugin_host_unload(h);
        free(h->plugins);
        /* The loop has stopped: no source left behind runs any more. */
        for (size_t i = 0; i < h->n_retired; i++)
                plugin_free(h->retired[i]);
        free(h->retired);
        for (size_t i = 0; i < h->n_pins; i++)
                close(h->pins[i].fd);
        free(h->pins);
        for (size_t i = 0; i < h->n_stash; i++) {
                free(h->stash[i].plugin);
                free(h->stash[i].key);
                free(h->stash[i].value);
        }
        free(h->stash);
        sd_event_unref(h->event);
        free(h);
        return NULL;
}
