/* SPDX-License-Identifier: Apache-2.0 */
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <limits.h>

#include "agent-config.h"
#include "keyfile.h"
#include "log.h"
#include "proto.h"
#include "util.h"

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
        c->enroll_renew = true;
        c->tunnel_max_streams = 8;
        c->tunnel_idle_ms = 900000;
        c->tunnel_window = PROTO_STREAM_WINDOW_DEFAULT;
        c->logs_enabled = true;
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
        strv_free(c->inventory_packages);
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
        free(c->enroll_token_file);
        free(c->enroll_device_id);
        free(c->enroll_device_ca_file);
        free(c->tunnel_allow_text);
        free(c->tunnel_allow);
        strv_free(c->logs_units);
        free(c->logs_directory);
        free(c);
        return NULL;
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
                        return keyfile_set_string(&p->pairs[i].value, value);
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

/* Types of our own, beside keyfile.h's. */
enum {
        KEY_WORDS = KEYFILE_TYPE_OWN, /* char **, words split at blanks and commas */
        KEY_OVERFLOW,                 /* ConfigOverflow */
        KEY_BOOL,                     /* bool: yes/no, true/false, on/off, 1/0 */
        KEY_DEVICE_ID,                /* char *, a valid device ID */
        KEY_HOSTS,                    /* char * as written, and Config's cloud_hosts (parse_hosts()) */
        KEY_PACKAGES,                 /* char **, Debian package names split at blanks and commas */
        KEY_TUNNEL_ALLOW,             /* char * as written, and Config's tunnel_allow (stream_allow_parse()) */
        KEY_UNITS,                    /* char **, unit names or "*" split at blanks and commas */
};

#define F(m) offsetof(Config, m)
static const KeyfileKey keys[] = {
        { "Cloud", "Host", KEY_HOSTS, F(cloud_host), 0, 0 },
        { "Cloud", "Port", KEYFILE_U16, F(cloud_port), 1, 65535 },
        { "Cloud", "CAFile", KEYFILE_STRING, F(ca_file), 0, 0 },
        { "Device", "Certificate", KEYFILE_STRING, F(cert_file), 0, 0 },
        { "Device", "Key", KEYFILE_STRING, F(key_file), 0, 0 },
        { "Connection", "KeepaliveSec", KEYFILE_SECONDS, F(keepalive_ms), 100, 0 },
        { "Connection", "KeepaliveTimeoutSec", KEYFILE_SECONDS, F(keepalive_timeout_ms), 100, 0 },
        { "Connection", "ConnectTimeoutSec", KEYFILE_SECONDS, F(connect_timeout_ms), 100, 0 },
        { "Connection", "ReconnectMinSec", KEYFILE_SECONDS, F(reconnect_min_ms), 10, 0 },
        { "Connection", "ReconnectMaxSec", KEYFILE_SECONDS, F(reconnect_max_ms), 10, 0 },
        { "Connection", "StableSec", KEYFILE_SECONDS, F(stable_ms), 0, 0 },
        { "Connection", "StartJitterSec", KEYFILE_SECONDS, F(start_jitter_ms), 0, 0 },
        { "Limits", "MaxPayload", KEYFILE_SIZE, F(max_payload), 64, PROTO_HARD_PAYLOAD_MAX },
        { "Limits", "MaxSubscriptions", KEYFILE_UINT, F(max_subscriptions), 0, 1024 },
        { "State", "Directory", KEYFILE_STRING, F(state_dir), 0, 0 },
        { "Outbox", "MaxEvents", KEYFILE_UINT, F(outbox_max_events), 1, 10000000 },
        { "Outbox", "MaxBytes", KEYFILE_U64, F(outbox_max_bytes), 4096, (uint64_t)1 << 40 },
        { "Outbox", "Overflow", KEY_OVERFLOW, F(outbox_overflow), 0, 0 },
        { "Outbox", "SyncIntervalSec", KEYFILE_SECONDS, F(outbox_sync_ms), 0, 0 },
        /* The old name, from before the outbox was persistent. */
        { "Limits", "MaxQueuedEvents", KEYFILE_UINT, F(outbox_max_events), 1, 10000000 },
        { "Plugins", "Directory", KEYFILE_STRING, F(plugin_dir), 0, 0 },
        { "Plugins", "Enable", KEY_WORDS, F(plugin_enable), 0, 0 },
        { "Plugins", "Disable", KEY_WORDS, F(plugin_disable), 0, 0 },
        { "Local", "Socket", KEYFILE_STRING, F(local_socket), 0, 0 },
        { "Local", "Group", KEYFILE_STRING_EMPTY, F(local_group), 0, 0 },
        { "OTA", "Keyring", KEYFILE_STRING, F(ota.keyring), 0, 0 },
        { "OTA", "StateDirectory", KEYFILE_STRING, F(ota.state_dir), 0, 0 },
        { "OTA", "CacheDirectory", KEYFILE_STRING, F(ota.cache_dir), 0, 0 },
        { "OTA", "CAFile", KEYFILE_STRING, F(ota.ca_file), 0, 0 },
        { "OTA", "Launcher", KEYFILE_STRING, F(ota.launcher), 0, 0 },
        { "OTA", "Helper", KEYFILE_STRING, F(ota.helper), 0, 0 },
        { "OTA", "AgentPackage", KEYFILE_STRING, F(ota.agent_package), 0, 0 },
        { "OTA", "AgentUnit", KEYFILE_STRING, F(ota.agent_unit), 0, 0 },
        { "OTA", "DpkgRoot", KEYFILE_STRING, F(ota.dpkg_root), 0, 0 },
        { "OTA", "TrialSec", KEYFILE_SECONDS, F(ota.trial_ms), 0, 0 },
        { "OTA", "HealthTimeoutSec", KEYFILE_SECONDS, F(ota.health_timeout_ms), 100, 0 },
        { "OTA", "LockTimeoutSec", KEYFILE_SECONDS, F(ota.lock_timeout_ms), 0, 0 },
        { "OTA", "LowSpeedSec", KEYFILE_SECONDS, F(ota.low_speed_ms), 1000, 0 },
        { "OTA", "LowSpeedBytes", KEYFILE_UINT, F(ota.low_speed_bytes), 1, 1u << 30 },
        { "OTA", "DownloadAttempts", KEYFILE_UINT, F(ota.download_attempts), 1, 1000 },
        { "OTA", "ProgressIntervalSec", KEYFILE_SECONDS, F(ota.progress_interval_ms), 100, 0 },
        { "OTA", "MinFreeMB", KEYFILE_UINT, F(ota.min_free_mb), 0, 1u << 20 },
        { "OTA", "MaxTransitions", KEYFILE_UINT, F(ota.max_transitions), 4, 10000 },
        { "Inventory", "Packages", KEY_PACKAGES, F(inventory_packages), 0, 0 },
        { "Enroll", "TokenFile", KEYFILE_STRING, F(enroll_token_file), 0, 0 },
        { "Enroll", "DeviceID", KEY_DEVICE_ID, F(enroll_device_id), 0, 0 },
        { "Enroll", "DeviceCAFile", KEYFILE_STRING, F(enroll_device_ca_file), 0, 0 },
        { "Enroll", "Renew", KEY_BOOL, F(enroll_renew), 0, 0 },
        { "Enroll", "RenewAfterPercent", KEYFILE_UINT, F(enroll_renew_percent), 1, 99 },
        { "Tunnel", "Allow", KEY_TUNNEL_ALLOW, F(tunnel_allow_text), 0, 0 },
        { "Tunnel", "MaxStreams", KEYFILE_UINT, F(tunnel_max_streams), 0, 1024 },
        { "Tunnel", "IdleSec", KEYFILE_SECONDS, F(tunnel_idle_ms), 1000, 0 },
        { "Tunnel", "Window", KEYFILE_UINT, F(tunnel_window), PROTO_STREAM_WINDOW_MIN, PROTO_STREAM_WINDOW_MAX },
        { "Logs", "Units", KEY_UNITS, F(logs_units), 0, 0 },
        { "Logs", "Enabled", KEY_BOOL, F(logs_enabled), 0, 0 },
        { "Logs", "Directory", KEYFILE_STRING_EMPTY, F(logs_directory), 0, 0 },
};
#undef F

/* What a host name and an IPv6 zone may be made of. */
#define HOST_CHARS "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._"

/* An IPv6 address, with an optional "%zone" (an interface). */
static bool is_ipv6(const char *s) {
        const char *zone = strchr(s, '%');
        size_t n = zone ? (size_t)(zone - s) : strlen(s);
        char addr[64];
        struct in6_addr a;

        if (n >= sizeof(addr))
                return false;
        memcpy(addr, s, n);
        addr[n] = 0;
        if (inet_pton(AF_INET6, addr, &a) != 1)
                return false;
        return !zone || (zone[1] && strspn(zone + 1, HOST_CHARS) == strlen(zone + 1));
}

static int host_fail(KeyfileParser *p, const char *entry, const char *why) {
        return keyfile_fail(p, -EINVAL,
                            "invalid entry '%s' in Host=: %s (NAME, NAME:PORT, IPv4:PORT, [IPv6] or "
                            "[IPv6]:PORT)",
                            entry, why);
}

/* One entry of Host=: NAME, NAME:PORT, IPv4:PORT, [IPv6] or [IPv6]:PORT;
 * also a bare IPv6 address when it is the only entry (alone), as Host=
 * took before it could list several. Port 0: none given. 1, or
 * keyfile_fail()'s 0 with the reason. */
static int parse_host(KeyfileParser *p, const char *entry, bool alone, ConfigHost *ret) {
        const char *name, *port = NULL, *colon = strchr(entry, ':');
        size_t n;
        uint64_t v = 0;

        if (entry[0] == '[') {
                const char *end = strchr(entry, ']');

                if (!end)
                        return host_fail(p, entry, "'[' without ']'");
                if (end[1] == ':')
                        port = end + 2;
                else if (end[1])
                        return host_fail(p, entry, "only ':PORT' may follow ']'");
                name = entry + 1;
                n = (size_t)(end - name);
                if (n > CONFIG_HOST_NAME_MAX)
                        return host_fail(p, entry, "not an IPv6 address in brackets");
                memcpy(ret->name, name, n);
                ret->name[n] = 0;
                if (!is_ipv6(ret->name))
                        return host_fail(p, entry, "not an IPv6 address in brackets");
        } else if (colon && strchr(colon + 1, ':')) {
                if (!alone)
                        return host_fail(p, entry,
                                         "an IPv6 address goes in brackets when Host= lists several entries");
                n = strlen(entry);
                if (n > CONFIG_HOST_NAME_MAX || !is_ipv6(entry))
                        return host_fail(p, entry, "neither a host name nor an IPv6 address");
                memcpy(ret->name, entry, n + 1);
        } else {
                n = colon ? (size_t)(colon - entry) : strlen(entry);
                if (colon)
                        port = colon + 1;
                if (n == 0)
                        return host_fail(p, entry, "no host name");
                if (n > CONFIG_HOST_NAME_MAX)
                        return host_fail(p, entry, "a host name is at most 253 bytes long");
                if (strspn(entry, HOST_CHARS) < n)
                        return host_fail(p, entry, "a host name has only letters, digits, '-', '.' and '_'");
                memcpy(ret->name, entry, n);
                ret->name[n] = 0;
        }
        if (port && (keyfile_parse_uint(port, 65535, &v) < 0 || v == 0))
                return keyfile_fail(p, -EINVAL, "invalid port '%s' in Host= entry '%s' (1..65535)", port, entry);
        ret->port = (uint16_t)v;
        return 1;
}

/* [Cloud] Host=: one or more entries, separated by blanks or commas. The
 * Config changes only if every entry is good. */
static int parse_hosts(KeyfileParser *p, const char *value) {
        Config *c = p->userdata;
        ConfigHost hosts[CONFIG_HOSTS_MAX] = {};
        char **v = split_words(value);
        size_t n = 0;
        int r = 1;

        if (!v)
                return keyfile_fail(p, -EINVAL, "out of memory");
        while (v[n])
                n++;
        if (n == 0)
                r = keyfile_fail(p, -EINVAL, "Host= must not be empty");
        else if (n > CONFIG_HOSTS_MAX)
                r = keyfile_fail(p, -EINVAL, "too many entries in Host= (%zu, at most %d)", n, CONFIG_HOSTS_MAX);
        for (size_t i = 0; r > 0 && i < n; i++)
                r = parse_host(p, v[i], n == 1, &hosts[i]);
        strv_free(v);
        if (r <= 0)
                return r;
        if (keyfile_set_string(&c->cloud_host, value) < 0)
                return keyfile_fail(p, -EINVAL, "out of memory");
        memcpy(c->cloud_hosts, hosts, sizeof(hosts));
        c->n_cloud_hosts = n;
        return 1;
}

static int apply_key(KeyfileParser *p, const KeyfileKey *k, const char *value) {
        void *field = (uint8_t *)p->userdata + k->offset;
        int r;

        switch (k->type) {
        case KEY_OVERFLOW:
                if (streq(value, "reject"))
                        *(unsigned *)field = CONFIG_OVERFLOW_REJECT;
                else if (streq(value, "drop-oldest"))
                        *(unsigned *)field = CONFIG_OVERFLOW_DROP_OLDEST;
                else
                        return keyfile_fail(p, -EINVAL, "invalid value '%s' for %s= (reject or drop-oldest)", value,
                                            k->name);
                return 1;
        case KEY_BOOL:
                if (streq(value, "yes") || streq(value, "true") || streq(value, "on") || streq(value, "1"))
                        *(bool *)field = true;
                else if (streq(value, "no") || streq(value, "false") || streq(value, "off") || streq(value, "0"))
                        *(bool *)field = false;
                else
                        return keyfile_fail(p, -EINVAL, "invalid value '%s' for %s= (yes or no)", value, k->name);
                return 1;
        case KEY_DEVICE_ID:
                r = proto_name_check(value, strlen(value), PROTO_NAME_DEVICE);
                if (r < 0)
                        return keyfile_fail(p, -EINVAL, "invalid device ID '%s' for %s=: %s", value, k->name,
                                            proto_device_id_problem(r));
                if (keyfile_set_string((char **)field, value) < 0)
                        return keyfile_fail(p, -EINVAL, "out of memory");
                return 1;
        case KEY_HOSTS:
                return parse_hosts(p, value);
        case KEY_TUNNEL_ALLOW: {
                Config *c = p->userdata;
                StreamAddr *list = NULL;
                char bad[64] = "";
                size_t n = 0;

                r = stream_allow_parse(value, &list, &n, bad);
                if (r == -EINVAL)
                        return keyfile_fail(p, -EINVAL,
                                            "invalid entry '%s' in Allow= (IPV4:PORT, [IPV6]:PORT, IPV4:* or [IPV6]:*)",
                                            bad);
                if (r == -E2BIG)
                        return keyfile_fail(p, -EINVAL, "too many entries in Allow= (at most %d)", STREAM_ALLOW_MAX);
                if (r < 0 || keyfile_set_string(&c->tunnel_allow_text, value) < 0) {
                        free(list);
                        return keyfile_fail(p, -EINVAL, "out of memory");
                }
                free(c->tunnel_allow);
                c->tunnel_allow = list;
                c->n_tunnel_allow = n;
                return 1;
        }
        case KEY_UNITS: {
                char **v = split_words(value);
                size_t n = 0;

                if (!v)
                        return keyfile_fail(p, -EINVAL, "out of memory");
                for (; v[n]; n++)
                        if (!streq(v[n], "*") && !stream_unit_name_valid(v[n])) {
                                r = keyfile_fail(p, -EINVAL, "invalid unit name '%s' in %s= (NAME.service, or *)",
                                                 v[n], k->name);
                                strv_free(v);
                                return r;
                        }
                if (n > 256) {
                        strv_free(v);
                        return keyfile_fail(p, -EINVAL, "%s= names %zu units, at most 256 are allowed", k->name, n);
                }
                strv_free(*(char ***)field);
                *(char ***)field = v;
                return 1;
        }
        case KEY_PACKAGES: {
                char **v = split_words(value);
                size_t n = 0;

                if (!v)
                        return keyfile_fail(p, -EINVAL, "out of memory");
                for (; v[n]; n++)
                        if (!proto_package_name_valid(v[n], strlen(v[n]))) {
                                r = keyfile_fail(p, -EINVAL, "invalid package name '%s' in %s= ([a-z0-9][a-z0-9+.-]+)",
                                                 v[n], k->name);
                                strv_free(v);
                                return r;
                        }
                if (n > 64) {
                        strv_free(v);
                        return keyfile_fail(p, -EINVAL, "%s= names %zu packages, at most 64 are allowed", k->name, n);
                }
                strv_free(*(char ***)field);
                *(char ***)field = v;
                return 1;
        }
        case KEY_WORDS: {
                char **v = split_words(value);
                if (!v)
                        return keyfile_fail(p, -EINVAL, "out of memory");
                strv_free(*(char ***)field);
                *(char ***)field = v;
                return 1;
        }
        }

        r = keyfile_set(k, p->userdata, value);
        if (r == -ENOMEM)
                return keyfile_fail(p, -EINVAL, "cannot set %s=: %s", k->name, strerror(-r));
        if (r < 0)
                switch (k->type) {
                case KEYFILE_STRING:
                        return keyfile_fail(p, -EINVAL, "%s= must not be empty", k->name);
                case KEYFILE_U16:
                        return keyfile_fail(p, -EINVAL, "invalid port '%s' for %s=", value, k->name);
                case KEYFILE_SECONDS:
                        return keyfile_fail(p, -EINVAL, "invalid duration '%s' for %s= (seconds, at least %.3f)",
                                            value, k->name, k->min / 1000.0);
                default:
                        return keyfile_fail(p, -EINVAL, "invalid value '%s' for %s= (%llu..%llu)", value, k->name,
                                            (unsigned long long)k->min, (unsigned long long)k->max);
                }
        return 1;
}

static int handler(KeyfileParser *p, const char *section, const char *name, const char *value) {
        const KeyfileKey *k;

        if (startswith(section, "Plugin ")) {
                const char *pname = section + strlen("Plugin ");
                PluginSection *ps;

                if (proto_name_check(pname, strlen(pname), PROTO_NAME_PLUGIN) < 0)
                        return keyfile_fail(p, -EINVAL, "invalid plugin name '%s' in section header", pname);
                ps = plugin_section(p->userdata, pname);
                if (!ps || plugin_set(ps, name, value) < 0)
                        return keyfile_fail(p, -EINVAL, "out of memory");
                return 1;
        }
        k = keyfile_find_key(keys, ELEMENTSOF(keys), section, name);
        if (k) {
                if (streq(name, "MaxQueuedEvents"))
                        log_warning("%s:%u: [Limits] MaxQueuedEvents= is now [Outbox] MaxEvents=", p->path, p->line);
                return apply_key(p, k, value);
        }

        log_warning("%s:%u: unknown key '%s' in section [%s], ignoring", p->path, p->line, name, section);
        return 1;
}

int config_parse_file(Config *c, const char *path, char **ret_error) {
        _cleanup_(keyfile_parser_done) KeyfileParser p = { .path = path, .userdata = c };
        _cleanup_fclose_ FILE *f = NULL;
        int r;

        f = fopen(path, "re");
        if (!f) {
                r = -errno;
                if (ret_error && asprintf(ret_error, "%s: %s", path, strerror(-r)) < 0)
                        *ret_error = NULL;
                return r;
        }
        r = keyfile_parse(&p, f, handler);
        if (r == 0)
                return 0;
        if (r == -EBADMSG)
                keyfile_fail(&p, -EINVAL, "syntax error");
        else if (r == -ENOMEM && !p.message)
                keyfile_fail(&p, -ENOMEM, "out of memory");
        if (!p.message)
                return -ENOMEM; /* not even the message could be allocated */
        if (ret_error)
                *ret_error = TAKE_PTR(p.message);
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
        /* Port= may come after Host=, or in a later drop-in. */
        for (size_t i = 0; i < c->n_cloud_hosts; i++)
                if (c->cloud_hosts[i].port == 0)
                        c->cloud_hosts[i].port = c->cloud_port;
        r = config_validate(c, path, ret_error);
        if (r < 0)
                return r;
        *ret = TAKE_PTR(c);
        return 0;
}

static bool str_eq0(const char *a, const char *b) {
        return (!a && !b) || (a && b && streq(a, b));
}

const char *config_host_text(const ConfigHost *h, char buf[static CONFIG_HOST_TEXT_MAX]) {
        snprintf(buf, CONFIG_HOST_TEXT_MAX, strchr(h->name, ':') ? "[%s]:%u" : "%s:%u", h->name, h->port);
        return buf;
}

const char *config_hosts_text(const Config *c, char *buf, size_t size) {
        size_t len = 0;

        if (size == 0)
                return buf;
        buf[0] = 0;
        for (size_t i = 0; i < c->n_cloud_hosts && len < size; i++) {
                char one[CONFIG_HOST_TEXT_MAX];
                int n = snprintf(buf + len, size - len, "%s%s", i ? ", " : "",
                                 config_host_text(&c->cloud_hosts[i], one));

                if (n < 0)
                        break;
                len += (size_t)n;
        }
        return buf;
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
