/* SPDX-License-Identifier: Apache-2.0 */
/* tetherd configuration: a keyfile (/etc/tether/tetherd.conf) plus drop-ins
 * (tetherd.conf.d/\*.conf, in lexical order, later keys win). Unknown keys
 * warn with FILE:LINE; bad values fail the load with FILE:LINE. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "stream-proto.h"

#define CONFIG_DEFAULT_PATH SYSCONFDIR "/tether/tetherd.conf"
#define CONFIG_DEFAULT_SOCKET "/run/tether/tetherd.sock"
#define CONFIG_DEFAULT_GROUP "tether"
#define CONFIG_DEFAULT_STATE_DIR LOCALSTATEDIR "/lib/tether"

/* [Outbox] Overflow= */
typedef enum ConfigOverflow {
        CONFIG_OVERFLOW_REJECT,
        CONFIG_OVERFLOW_DROP_OLDEST,
} ConfigOverflow;

/* [Cloud] Host= lists at most this many entries. */
#define CONFIG_HOSTS_MAX 8
/* The longest name of an entry (a DNS name's limit). */
#define CONFIG_HOST_NAME_MAX 253
/* config_host_text()'s buffer: "[name]:65535" and the NUL. */
#define CONFIG_HOST_TEXT_MAX (CONFIG_HOST_NAME_MAX + 9)

/* One entry of [Cloud] Host=: a DNS name, an IPv4 address or an IPv6
 * address (without brackets; with a zone after '%' if one was given), as
 * the cloud's certificate must name it, and its port. */
typedef struct ConfigHost {
        char name[CONFIG_HOST_NAME_MAX + 1];
        uint16_t port; /* 0 after config_parse_file() alone: [Cloud] Port=, which config_load() fills in */
} ConfigHost;

typedef struct ConfigPair {
        char *key;
        char *value;
} ConfigPair;

/* "[Plugin NAME]" sections, handed to plugins through config_get(). */
typedef struct PluginSection {
        char *name;
        ConfigPair *pairs;
        size_t n_pairs;
} PluginSection;

/* [OTA]: read by tetherd and by tether-ota-helper (docs/ota.md) */
typedef struct OtaConfig {
        char *keyring;          /* directory of trusted update keys (*.pem) */
        char *state_dir;        /* the agent's journal, download, verdicts */
        char *cache_dir;        /* the helper's: packages kept for rollback, floors */
        char *ca_file;          /* CA for downloads; NULL: [Cloud] CAFile= */
        char *launcher;         /* "path", "exec" or "transient" */
        char *helper;           /* tether-ota-helper (exec, transient) */
        char *agent_package;    /* the package whose update is a self-update */
        char *agent_unit;       /* systemd unit of the agent */
        char *dpkg_root;        /* "/" or a scratch root (tests) */
        uint64_t trial_ms;      /* connected this long after an update = healthy */
        uint64_t health_timeout_ms; /* no verdict this long = unhealthy */
        uint64_t lock_timeout_ms;   /* dpkg lock held this long = deferred */
        uint64_t low_speed_ms;      /* download below LowSpeedBytes/s this long = retry */
        unsigned low_speed_bytes;
        unsigned download_attempts;
        uint64_t progress_interval_ms;
        unsigned min_free_mb;   /* kept free besides what the update needs */
        unsigned max_transitions;
} OtaConfig;

typedef struct Config {
        /* [Cloud] */
        char *cloud_host;                         /* Host= as written */
        uint16_t cloud_port;                      /* Port=: the port of an entry that names none */
        ConfigHost cloud_hosts[CONFIG_HOSTS_MAX]; /* Host='s entries, in order: the order they are tried in */
        size_t n_cloud_hosts;                     /* 0 only without Host= */
        char *ca_file;
        /* [Device] */
        char *cert_file;
        char *key_file;
        /* [Connection], durations in milliseconds */
        uint64_t keepalive_ms;
        uint64_t keepalive_timeout_ms;
        uint64_t connect_timeout_ms;
        uint64_t reconnect_min_ms;
        uint64_t reconnect_max_ms;
        uint64_t stable_ms;
        uint64_t start_jitter_ms; /* first connect after start: random 0..this */
        /* [Limits] */
        size_t max_payload;
        unsigned max_subscriptions;
        /* [State] */
        char *state_dir;
        /* [Outbox] ([Limits] MaxQueuedEvents= is an old name of MaxEvents=) */
        unsigned outbox_max_events;
        uint64_t outbox_max_bytes;
        unsigned outbox_overflow; /* ConfigOverflow */
        uint64_t outbox_sync_ms;  /* 0: fsync every event */
        /* [Plugins] */
        char *plugin_dir;
        char **plugin_enable; /* NULL-terminated, NULL = all */
        char **plugin_disable;
        PluginSection *plugins;
        size_t n_plugins;
        /* [Local]: tetherctl's socket and who may use it */
        char *local_socket;
        char *local_group; /* "" = root and the agent's user only */
        OtaConfig ota;
        /* [Inventory] (docs/fleet.md): packages whose versions the
         * describe document's "system" carries besides tether's own;
         * NULL-terminated Debian package names, NULL: none */
        char **inventory_packages;
        /* [Enroll] (docs/enrollment.md) */
        char *enroll_token_file;  /* a provisioning token to enroll with; NULL: none */
        char *enroll_device_id;   /* the ID to ask for; NULL: from the certificate or the key */
        char *enroll_device_ca_file; /* an issued certificate must verify against it; NULL: not checked */
        bool enroll_renew;        /* renew the certificate over the connection */
        unsigned enroll_renew_percent; /* renew at this % of the lifetime; 0: two thirds (the cloud's renew_after) */
        /* [Tunnel] (docs/protocol.md, "Streams: tunnels and logs") */
        char *tunnel_allow_text;  /* Allow= as written; NULL: empty */
        StreamAddr *tunnel_allow; /* its entries (port 0: any); NULL: tunnels off */
        size_t n_tunnel_allow;
        unsigned tunnel_max_streams; /* tunnels and log streams open at once */
        uint64_t tunnel_idle_ms;
        unsigned tunnel_window; /* the receive window this device announces */
        /* [Logs] */
        char **logs_units;    /* readable besides the tether units; "*": all; NULL: none */
        bool logs_enabled;
        char *logs_directory; /* a journal directory instead of the system journal (tests); NULL: system */
} Config;

/* Load path and its ".d" drop-in directory. On a bad value returns
 * -EINVAL and, when ret_error is given, a malloc'd "FILE:LINE: reason". */
int config_load(const char *path, Config **ret, char **ret_error);
/* Parse one file into an existing config (used by config_load and tests). */
int config_parse_file(Config *c, const char *path, char **ret_error);
Config *config_new(void);
Config *config_free(Config *c);
static inline void config_freep(Config **c) { config_free(*c); }

/* "name:port", or "[name]:port" for an IPv6 address, into buf; returns
 * buf. */
const char *config_host_text(const ConfigHost *h, char buf[static CONFIG_HOST_TEXT_MAX]);
/* Every entry of Host=, "a:1, b:2", into buf (cut to size); returns buf. */
const char *config_hosts_text(const Config *c, char *buf, size_t size);

/* Whether two configs differ in anything that needs a new connection. */
bool config_cloud_changed(const Config *a, const Config *b);
/* Value for key in "[Plugin name]", or NULL. */
const char *config_plugin_get(const Config *c, const char *plugin, const char *key);
/* Whether the plugin of this name is enabled by Enable=/Disable=. */
bool config_plugin_enabled(const Config *c, const char *plugin);
