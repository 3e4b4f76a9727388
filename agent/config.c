#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <ini.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>

#include "config.h"
#include "log.h"
#include "proto.h"
#include "util.h"

typedef struct ParseState {
        Config *config;
        const char *path;
        FILE *f;
        unsigned line;
        char *error;
} ParseState;

static void strv_free(char **v) {
        if (!v)
                return;
        for (char **p = v; *p; p++)
                free(*p);
        free(v);
}

Config *config_new(void) {
        Config *c = calloc(1, sizeof(*c));

        if (!c)
                return NULL;
        c->cloud_port = PROTO_DEFAULT_PORT;
        c->keepalive_ms = 30000;
        c->keepalive_timeout_ms = 10000;
        c->connect_timeout_ms = 15000;
        c->reconnect_min_ms = 1000;
        c->reconnect_max_ms = 60000;
        c->stable_ms = 60000;
        c->max_payload = PROTO_DEFAULT_PAYLOAD_MAX;
        c->max_subscriptions = 32;
        c->outbox_max_events = 10000;
        c->outbox_max_bytes = 8 * 1024 * 1024;
        c->outbox_overflow = CONFIG_OVERFLOW_REJECT;
        c->outbox_sync_ms = 100;
        c->plugin_dir = strdup(PLUGINDIR);
        c->state_dir = strdup(CONFIG_DEFAULT_STATE_DIR);
        c->local_socket = strdup(CONFIG_DEFAULT_SOCKET);
        c->local_group = strdup(CONFIG_DEFAULT_GROUP);
        c->ota.keyring = strdup(SYSCONFDIR "/tether/ota-keys");
        c->ota.state_dir = strdup(LOCALSTATEDIR "/lib/tether/ota");
        c->ota.cache_dir = strdup(LOCALSTATEDIR "/lib/tether-ota");
        c->ota.launcher = strdup("path");
        c->ota.helper = strdup(OTA_HELPER_PATH);
        c->ota.agent_package = strdup("tether-agent");
        c->ota.agent_unit = strdup("tetherd.service");
        c->ota.dpkg_root = strdup("/");
        c->ota.trial_ms = 60000;
        c->ota.health_timeout_ms = 300000;
        c->ota.lock_timeout_ms = 300000;
        c->ota.low_speed_ms = 60000;
        c->ota.low_speed_bytes = 1024;
        c->ota.download_attempts = 5;
        c->ota.progress_interval_ms = 1000;
        c->ota.min_free_mb = 16;
        c->ota.max_transitions = 64;
        if (!c->plugin_dir || !c->state_dir || !c->local_socket || !c->local_group || !c->ota.keyring ||
            !c->ota.state_dir || !c->ota.cache_dir || !c->ota.launcher || !c->ota.helper || !c->ota.agent_package ||
            !c->ota.agent_unit || !c->ota.dpkg_root)
                return config_free(c);
        return c;
}

Config *config_free(Config *c) {
        if (!c)
                return NULL;
        free(c->cloud_host);
        free(c->ca_file);
        free(c->cert_file);
        free(c->key_file);
        free(c->plugin_dir);
        free(c->state_dir);
        free(c->local_socket);
        free(c->local_group);
        strv_free(c->plugin_enable);
        strv_free(c->plugin_disable);
        for (size_t i = 0; i < c->n_plugins; i++) {
                for (size_t k = 0; k < c->plugins[i].n_pairs; k++) {
                        free(c->plugins[i].pairs[k].key);
                        free(c->plugins[i].pairs[k].value);
                }
                free(c->plugins[i].pairs);
                free(c->plugins[i].name);
        }
        free(c->plugins);
        free(c->ota.keyring);
        free(c->ota.state_dir);
        free(c->ota.cache_dir);
        free(c->ota.ca_file);
        free(c->ota.launcher);
        free(c->ota.helper);
        free(c->ota.agent_package);
        free(c->ota.agent_unit);
        free(c->ota.dpkg_root);
        free(c);
        return NULL;
}

static int fail(ParseState *s, const char *fmt, ...) _printf_(2, 3);
static int fail(ParseState *s, const char *fmt, ...) {
        char msg[512];
        va_list ap;

        va_start(ap, fmt);
        vsnprintf(msg, sizeof(msg), fmt, ap);
        va_end(ap);
        if (!s->error && asprintf(&s->error, "%s:%u: %s", s->path, s->line, msg) < 0)
                s->error = NULL;
        return 0; /* tells inih to stop with an error */
}

static int set_string(char **dst, const char *value) {
        char *v = strdup(value);

        if (!v)
                return -ENOMEM;
        free(*dst);
        *dst = v;
        return 0;
}

static int parse_uint(const char *value, uint64_t max, uint64_t *ret) {
        unsigned long long v;
        char *end;

        if (!*value || !isdigit((unsigned char)*value))
                return -EINVAL;
        errno = 0;
        v = strtoull(value, &end, 10);
        if (errno || *end || v > max)
                return -ERANGE;
        *ret = v;
        return 0;
}

/* Seconds with an optional fraction ("0.25"), returned in milliseconds. */
static int parse_seconds(const char *value, uint64_t min_ms, uint64_t *ret_ms) {
        double v;
        char *end;

        if (!*value || !(isdigit((unsigned char)*value) || *value == '.'))
                return -EINVAL;
        errno = 0;
        v = strtod(value, &end);
        if (errno || *end || !isfinite(v) || v < 0 || v > 86400.0 * 365)
                return -ERANGE;
        if ((uint64_t)llround(v * 1000.0) < min_ms)
                return -ERANGE;
        *ret_ms = (uint64_t)llround(v * 1000.0);
        return 0;
}

static char **split_words(const char *value) {
        _cleanup_free_ char *copy = strdup(value);
        char **v = NULL, *tok, *save = NULL;
        size_t n = 0;

        if (!copy)
                return NULL;
        v = calloc(1, sizeof(char *));
        if (!v)
                return NULL;
        for (tok = strtok_r(copy, " \t,", &save); tok; tok = strtok_r(NULL, " \t,", &save)) {
                char **nv = realloc(v, (n + 2) * sizeof(char *));
                if (!nv) {
                        strv_free(v);
                        return NULL;
                }
                v = nv;
                v[n] = strdup(tok);
                v[++n] = NULL;
                if (!v[n - 1]) {
                        strv_free(v);
                        return NULL;
                }
        }
        return v;
}

static PluginSection *plugin_section(Config *c, const char *name) {
        PluginSection *n;

        for (size_t i = 0; i < c->n_plugins; i++)
                if (streq(c->plugins[i].name, name))
                        return &c->plugins[i];
        n = realloc(c->plugins, (c->n_plugins + 1) * sizeof(*n));
        if (!n)
                return NULL;
        c->plugins = n;
        n = &c->plugins[c->n_plugins];
        *n = (PluginSection){ .name = strdup(name) };
        if (!n->name)
                return NULL;
        c->n_plugins++;
        return n;
}

static int plugin_set(PluginSection *p, const char *key, const char *value) {
        ConfigPair *n;

        for (size_t i = 0; i < p->n_pairs; i++)
                if (streq(p->pairs[i].key, key))
                        return set_string(&p->pairs[i].value, value);
        n = realloc(p->pairs, (p->n_pairs + 1) * sizeof(*n));
        if (!n)
                return -ENOMEM;
        p->pairs = n;
        n[p->n_pairs] = (ConfigPair){ .key = strdup(key), .value = strdup(value) };
        if (!n[p->n_pairs].key || !n[p->n_pairs].value) {
                free(n[p->n_pairs].key);
                free(n[p->n_pairs].value);
                return -ENOMEM;
        }
        p->n_pairs++;
        return 0;
}

typedef enum KeyType {
        KEY_STRING,
        KEY_STRING_EMPTY,
        KEY_PORT,
        KEY_SECONDS,
        KEY_UINT,
        KEY_U64,
        KEY_WORDS,
        KEY_OVERFLOW,
} KeyType;

typedef struct KeyDef {
        const char *section;
        const char *key;
        KeyType type;
        size_t offset;
        uint64_t min, max; /* UINT: range; SECONDS: min in ms */
} KeyDef;

#define F(m) offsetof(Config, m)
static const KeyDef keys[] = {
        { "Cloud", "Host", KEY_STRING, F(cloud_host), 0, 0 },
        { "Cloud", "Port", KEY_PORT, F(cloud_port), 1, 65535 },
        { "Cloud", "CAFile", KEY_STRING, F(ca_file), 0, 0 },
        { "Device", "Certificate", KEY_STRING, F(cert_file), 0, 0 },
        { "Device", "Key", KEY_STRING, F(key_file), 0, 0 },
        { "Connection", "KeepaliveSec", KEY_SECONDS, F(keepalive_ms), 100, 0 },
        { "Connection", "KeepaliveTimeoutSec", KEY_SECONDS, F(keepalive_timeout_ms), 100, 0 },
        { "Connection", "ConnectTimeoutSec", KEY_SECONDS, F(connect_timeout_ms), 100, 0 },
        { "Connection", "ReconnectMinSec", KEY_SECONDS, F(reconnect_min_ms), 10, 0 },
        { "Connection", "ReconnectMaxSec", KEY_SECONDS, F(reconnect_max_ms), 10, 0 },
        { "Connection", "StableSec", KEY_SECONDS, F(stable_ms), 0, 0 },
        { "Limits", "MaxPayload", KEY_UINT, F(max_payload), 64, PROTO_HARD_PAYLOAD_MAX },
        { "Limits", "MaxSubscriptions", KEY_UINT, F(max_subscriptions), 0, 1024 },
        { "State", "Directory", KEY_STRING, F(state_dir), 0, 0 },
        { "Outbox", "MaxEvents", KEY_UINT, F(outbox_max_events), 1, 10000000 },
        { "Outbox", "MaxBytes", KEY_U64, F(outbox_max_bytes), 4096, (uint64_t)1 << 40 },
        { "Outbox", "Overflow", KEY_OVERFLOW, F(outbox_overflow), 0, 0 },
        { "Outbox", "SyncIntervalSec", KEY_SECONDS, F(outbox_sync_ms), 0, 0 },
        /* The old name, from before the outbox was persistent. */
        { "Limits", "MaxQueuedEvents", KEY_UINT, F(outbox_max_events), 1, 10000000 },
        { "Plugins", "Directory", KEY_STRING, F(plugin_dir), 0, 0 },
        { "Plugins", "Enable", KEY_WORDS, F(plugin_enable), 0, 0 },
        { "Plugins", "Disable", KEY_WORDS, F(plugin_disable), 0, 0 },
        { "Local", "Socket", KEY_STRING, F(local_socket), 0, 0 },
        { "Local", "Group", KEY_STRING_EMPTY, F(local_group), 0, 0 },
        { "OTA", "Keyring", KEY_STRING, F(ota.keyring), 0, 0 },
        { "OTA", "StateDirectory", KEY_STRING, F(ota.state_dir), 0, 0 },
        { "OTA", "CacheDirectory", KEY_STRING, F(ota.cache_dir), 0, 0 },
        { "OTA", "CAFile", KEY_STRING, F(ota.ca_file), 0, 0 },
        { "OTA", "Launcher", KEY_STRING, F(ota.launcher), 0, 0 },
        { "OTA", "Helper", KEY_STRING, F(ota.helper), 0, 0 },
        { "OTA", "AgentPackage", KEY_STRING, F(ota.agent_package), 0, 0 },
        { "OTA", "AgentUnit", KEY_STRING, F(ota.agent_unit), 0, 0 },
        { "OTA", "DpkgRoot", KEY_STRING, F(ota.dpkg_root), 0, 0 },
        { "OTA", "TrialSec", KEY_SECONDS, F(ota.trial_ms), 0, 0 },
        { "OTA", "HealthTimeoutSec", KEY_SECONDS, F(ota.health_timeout_ms), 100, 0 },
        { "OTA", "LockTimeoutSec", KEY_SECONDS, F(ota.lock_timeout_ms), 0, 0 },
        { "OTA", "LowSpeedSec", KEY_SECONDS, F(ota.low_speed_ms), 1000, 0 },
        { "OTA", "LowSpeedBytes", KEY_UINT, F(ota.low_speed_bytes), 1, 1u << 30 },
        { "OTA", "DownloadAttempts", KEY_UINT, F(ota.download_attempts), 1, 1000 },
        { "OTA", "ProgressIntervalSec", KEY_SECONDS, F(ota.progress_interval_ms), 100, 0 },
        { "OTA", "MinFreeMB", KEY_UINT, F(ota.min_free_mb), 0, 1u << 20 },
        { "OTA", "MaxTransitions", KEY_UINT, F(ota.max_transitions), 4, 10000 },
};
#undef F

static int apply_key(ParseState *s, const KeyDef *k, const char *value) {
        void *field = (char *)s->config + k->offset;
        uint64_t u;
        int r;

        switch (k->type) {
        case KEY_STRING:
                if (!*value)
                        return fail(s, "%s= must not be empty", k->key);
                r = set_string(field, value);
                break;
        case KEY_STRING_EMPTY:
                r = set_string(field, value);
                break;
        case KEY_PORT:
                r = parse_uint(value, 65535, &u);
                if (r < 0 || u < 1)
                        return fail(s, "invalid port '%s' for %s=", value, k->key);
                *(uint16_t *)field = (uint16_t)u;
                break;
        case KEY_SECONDS:
                r = parse_seconds(value, k->min, field);
                if (r < 0)
                        return fail(s, "invalid duration '%s' for %s= (seconds, at least %.3f)", value,
                                    k->key, k->min / 1000.0);
                break;
        case KEY_UINT:
                r = parse_uint(value, k->max, &u);
                if (r < 0 || u < k->min)
                        return fail(s, "invalid value '%s' for %s= (%llu..%llu)", value, k->key,
                                    (unsigned long long)k->min, (unsigned long long)k->max);
                if (k->offset == offsetof(Config, max_payload))
                        *(size_t *)field = (size_t)u;
                else
                        *(unsigned *)field = (unsigned)u;
                break;
        case KEY_U64:
                r = parse_uint(value, k->max, &u);
                if (r < 0 || u < k->min)
                        return fail(s, "invalid value '%s' for %s= (%llu..%llu)", value, k->key,
                                    (unsigned long long)k->min, (unsigned long long)k->max);
                *(uint64_t *)field = u;
                break;
        case KEY_OVERFLOW:
                if (streq(value, "reject"))
                        *(unsigned *)field = CONFIG_OVERFLOW_REJECT;
                else if (streq(value, "drop-oldest"))
                        *(unsigned *)field = CONFIG_OVERFLOW_DROP_OLDEST;
                else
                        return fail(s, "invalid value '%s' for %s= (reject or drop-oldest)", value, k->key);
                r = 0;
                break;
        case KEY_WORDS: {
                char **v = split_words(value);
                if (!v)
                        return fail(s, "out of memory");
                strv_free(*(char ***)field);
                *(char ***)field = v;
                r = 0;
                break;
        }
        default:
                r = -EINVAL;
        }
        if (r < 0)
                return fail(s, "cannot set %s=: %s", k->key, strerror(-r));
        return 1;
}

static int handler(void *user, const char *section, const char *name, const char *value) {
        ParseState *s = user;

        if (startswith(section, "Plugin ")) {
                const char *pname = section + strlen("Plugin ");
                PluginSection *p;

                if (proto_name_check(pname, strlen(pname), PROTO_NAME_PLUGIN) < 0)
                        return fail(s, "invalid plugin name '%s' in section header", pname);
                p = plugin_section(s->config, pname);
                if (!p || plugin_set(p, name, value) < 0)
                        return fail(s, "out of memory");
                return 1;
        }
        for (size_t i = 0; i < ELEMENTSOF(keys); i++)
                if (streq(keys[i].section, section) && streq(keys[i].key, name)) {
                        if (streq(name, "MaxQueuedEvents"))
                                log_warning("%s:%u: [Limits] MaxQueuedEvents= is now [Outbox] MaxEvents=", s->path,
                                            s->line);
                        return apply_key(s, &keys[i], value);
                }

        log_warning("%s:%u: unknown key '%s' in section [%s], ignoring", s->path, s->line, name, section);
        return 1;
}

/* inih reads line by line through us, so we know the current line. */
static char *reader(char *str, int num, void *stream) {
        ParseState *s = stream;
        char *r = fgets(str, num, s->f);

        if (r)
                s->line++;
        return r;
}

int config_parse_file(Config *c, const char *path, char **ret_error) {
        ParseState s = { .config = c, .path = path };
        int r;

        s.f = fopen(path, "re");
        if (!s.f) {
                r = -errno;
                if (ret_error && asprintf(ret_error, "%s: %s", path, strerror(-r)) < 0)
                        *ret_error = NULL;
                return r;
        }
        r = ini_parse_stream(reader, &s, handler, &s);
        fclose(s.f);
        if (r == 0)
                return 0;
        if (!s.error && asprintf(&s.error, "%s:%d: syntax error", path, r) < 0)
                s.error = NULL;
        if (ret_error)
                *ret_error = s.error;
        else
                free(s.error);
        return -EINVAL;
}

static int cmp_str(const void *a, const void *b) {
        return strcmp(*(char *const *)a, *(char *const *)b);
}

static int load_dropins(Config *c, const char *path, char **ret_error) {
        _cleanup_free_ char *dir = NULL;
        char **names = NULL;
        size_t n = 0;
        struct dirent *de;
        DIR *d;
        int r = 0;

        if (asprintf(&dir, "%s.d", path) < 0)
                return -ENOMEM;
        d = opendir(dir);
        if (!d)
                return errno == ENOENT ? 0 : -errno;
        while ((de = readdir(d))) {
                size_t l = strlen(de->d_name);
                char **nn;

                if (de->d_name[0] == '.' || l < 6 || !streq(de->d_name + l - 5, ".conf"))
                        continue;
                nn = realloc(names, (n + 1) * sizeof(char *));
                if (!nn) {
                        r = -ENOMEM;
                        break;
                }
                names = nn;
                if (asprintf(&names[n], "%s/%s", dir, de->d_name) < 0) {
                        r = -ENOMEM;
                        break;
                }
                n++;
        }
        closedir(d);
        if (r == 0 && n > 0)
                qsort(names, n, sizeof(char *), cmp_str);
        for (size_t i = 0; r == 0 && i < n; i++)
                r = config_parse_file(c, names[i], ret_error);
        for (size_t i = 0; i < n; i++)
                free(names[i]);
        free(names);
        return r;
}

static int config_validate(const Config *c, const char *path, char **ret_error) {
        const char *missing = !c->cloud_host  ? "[Cloud] Host="
                              : !c->ca_file   ? "[Cloud] CAFile="
                              : !c->cert_file ? "[Device] Certificate="
                              : !c->key_file  ? "[Device] Key="
                                              : NULL;
        if (missing) {
                if (ret_error && asprintf(ret_error, "%s: %s is required", path, missing) < 0)
                        *ret_error = NULL;
                return -EINVAL;
        }
        if (c->local_socket[0] != '/' || strlen(c->local_socket) >= 108) {
                if (ret_error && asprintf(ret_error, "%s: [Local] Socket= must be an absolute path shorter than 108 bytes",
                                          path) < 0)
                        *ret_error = NULL;
                return -EINVAL;
        }
        if (!streq(c->ota.launcher, "path") && !streq(c->ota.launcher, "exec") &&
            !streq(c->ota.launcher, "transient")) {
                if (ret_error && asprintf(ret_error, "%s: [OTA] Launcher= must be path, exec or transient", path) < 0)
                        *ret_error = NULL;
                return -EINVAL;
        }
        if (c->reconnect_min_ms > c->reconnect_max_ms) {
                if (ret_error && asprintf(ret_error, "%s: ReconnectMinSec= is larger than ReconnectMaxSec=",
                                          path) < 0)
                        *ret_error = NULL;
                return -EINVAL;
        }
        return 0;
}

int config_load(const char *path, Config **ret, char **ret_error) {
        _cleanup_(config_freep) Config *c = config_new();
        int r;

        if (!c)
                return -ENOMEM;
        r = config_parse_file(c, path, ret_error);
        if (r < 0)
                return r;
        r = load_dropins(c, path, ret_error);
        if (r < 0)
                return r;
        r = config_validate(c, path, ret_error);
        if (r < 0)
                return r;
        *ret = TAKE_PTR(c);
        return 0;
}

static bool str_eq0(const char *a, const char *b) {
        return (!a && !b) || (a && b && streq(a, b));
}

bool config_cloud_changed(const Config *a, const Config *b) {
        return !str_eq0(a->cloud_host, b->cloud_host) || a->cloud_port != b->cloud_port ||
               !str_eq0(a->ca_file, b->ca_file) || !str_eq0(a->cert_file, b->cert_file) ||
               !str_eq0(a->key_file, b->key_file);
}

const char *config_plugin_get(const Config *c, const char *plugin, const char *key) {
        for (size_t i = 0; i < c->n_plugins; i++) {
                if (!streq(c->plugins[i].name, plugin))
                        continue;
                for (size_t k = 0; k < c->plugins[i].n_pairs; k++)
                        if (streq(c->plugins[i].pairs[k].key, key))
                                return c->plugins[i].pairs[k].value;
        }
        return NULL;
}

static bool strv_contains(char **v, const char *s) {
        for (; v && *v; v++)
                if (streq(*v, s))
                        return true;
        return false;
}

bool config_plugin_enabled(const Config *c, const char *plugin) {
        if (strv_contains(c->plugin_disable, plugin))
                return false;
        if (c->plugin_enable && c->plugin_enable[0])
                return strv_contains(c->plugin_enable, plugin);
        return true;
}
