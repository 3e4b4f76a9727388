/* SPDX-License-Identifier: Apache-2.0 */
/* tether-cloudd's configuration (config.c, prefix cloud_config_): the
 * keyfile, the command line and the API tokens. (Not config.h: that name
 * is autotools' generated header.) Depends on no other cloud module and
 * keeps no state outside the CloudConfig its caller owns. Problems with
 * the configuration are logged as "FILE:LINE: ..."; errors are negative
 * errno values; ret_* parameters are untouched on failure. */
#pragma once

#include <limits.h>

/* [OTA] Port= not given: devices fetch artifacts over their CoAP
 * connection only, and no HTTPS artifact server runs. */
#define CLOUD_CONFIG_PORT_UNSET UINT_MAX

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#define CLOUD_PROGRAM "tether-cloudd"
#define CLOUD_DEFAULT_CONFIG SYSCONFDIR "/tether/tether-cloudd.conf"
#define CLOUD_DEFAULT_STATE_DIR LOCALSTATEDIR "/lib/tether-cloud"
#define CONFIG_TOKEN_DIGEST_SIZE 32 /* SHA-256 */
#define CLOUD_NODE_NAME_MAX 32
#define CLOUD_INTEGRATIONS_MAX 64u /* [Webhook]/[MQTTBridge] sections and API-made webhooks together */

struct IntegrationConfig; /* integrations.h */

/* [Cloud] HandshakeThreads= not set: cloud_new() settles it at one thread
 * per CPU this process may use (affinity and cgroup quota), less the event
 * loop's, at most 16 (cloud.c, cloud_default_handshake_threads()). */
#define CLOUD_HANDSHAKE_THREADS_AUTO UINT_MAX

typedef struct CloudConfig {
        char *path; /* the file read */

        /* [Cloud] */
        char *coap_listen;
        unsigned coap_port;
        char *ca_file;
        char *cert_file;
        char *key_file;
        unsigned max_payload;
        unsigned max_subscriptions;
        unsigned ping_sec;
        unsigned device_timeout_sec;
        unsigned call_timeout_sec;
        unsigned handshake_timeout_sec; /* accept to bound device */
        unsigned max_handshakes;        /* sessions not yet bound to a device */
        unsigned ticket_key_sec;        /* TLS ticket key rotation; 0: no session resumption */
        unsigned handshake_grace_sec;   /* at MaxHandshakes, the oldest may be closed after this */
        unsigned max_queued_bytes;      /* sent to a device, not known to be read */
        unsigned session_shards;        /* libcoap contexts device sessions are spread over */
        unsigned handshake_threads;     /* TLS handshakes on this many threads; 0: in the event loop;
                                         * CLOUD_HANDSHAKE_THREADS_AUTO until cloud_new() settles it */
        char *registration;             /* "open" or "enrolled" (checked at load) */
        bool registration_enrolled;     /* Registration=enrolled: only registered devices connect */

        /* [API] */
        char *api_listen;
        unsigned api_port;
        char *token_file;
        char *metrics_token_file; /* NULL: none */
        char *api_cert_file; /* PEM; with api_key_file: HTTPS (NULL: plain HTTP) */
        char *api_key_file;
        char *console_dir;               /* the web console's files ("": off) */
        unsigned max_connections_per_ip; /* 0: no limit */
        unsigned max_streams_per_token;  /* open event streams per token; 0: no limit */
        /* [Tunnel] (tunnel.h): tunnels and log streams to devices */
        unsigned tunnel_max_per_device;  /* open streams per device */
        unsigned tunnel_max_streams;     /* open streams, all devices */
        unsigned tunnel_idle_sec;        /* a tunnel without a byte either way is closed */
        unsigned tunnel_attach_sec;      /* split transport: both halves attached within this */
        unsigned max_connections;        /* all addresses together */
        unsigned idle_timeout_sec;       /* a connection without traffic is closed */
        unsigned header_timeout_sec;     /* a request's header must be in this soon */
        /* Token buckets, requests per second and burst (rate 0: off). */
        unsigned rate_address, rate_address_burst;             /* every request, by client address */
        unsigned rate_token, rate_token_burst;                 /* requests with a valid token, by token */
        unsigned rate_auth_failures, rate_auth_failures_burst; /* 401s, by client address */

        /* [State] */
        char *state_dir;
        unsigned audit_max_records;  /* 0: no limit */
        unsigned audit_max_age_days; /* 0: no limit */
        /* [Events] */
        unsigned journal_max_bytes;
        unsigned journal_sync_ms; /* 0: fsync every event */
        /* Per-device limits on publishing (token buckets; a rate of 0: no limit) */
        unsigned device_event_rate;  /* events/s */
        unsigned device_event_burst; /* events */
        unsigned device_byte_rate;   /* bytes/s (name + data) */
        unsigned device_byte_burst;  /* bytes */
        unsigned backlog_max_mb;       /* the journal's backlog for the integrations (journal_retain()) */
        unsigned device_journal_share; /* percent of the journal one device keeps at a rewrite (0: 100) */

        /* [OTA]: artifact hosting is on when ota_dir is set */
        char *ota_dir;
        char *ota_listen; /* NULL: [Cloud] Listen= */
        unsigned ota_port;    /* CLOUD_CONFIG_PORT_UNSET: no HTTPS artifact server */
        char *ota_public_url; /* NULL: https://LISTEN:PORT */
        unsigned ota_max_artifact_mb;

        /* [Enroll]: enrollment and renewal are on when one signer is set
         * (docs/enrollment.md): the built-in one (enroll_ca_cert and
         * enroll_ca_key, both or neither) or an external command. */
        char *enroll_ca_cert;
        char *enroll_ca_key;
        char *sign_command;             /* absolute path, then arguments split on blanks */
        unsigned sign_timeout_sec;      /* the command is killed after this */
        unsigned sign_concurrency;      /* commands running at once */
        unsigned cert_validity_sec;     /* lifetime of issued certificates */
        bool enroll_enabled;            /* a signer is configured */

        /* [Cluster] (docs/cluster.md): cluster mode is on when cluster_nats
         * is set; all NULL/0 when it is not. */
        char *cluster_nats;         /* server URLs, comma or space separated */
        char *cluster_node;         /* [A-Za-z0-9_-]{1,32}; default: the host name, sanitised */
        unsigned cluster_replicas;  /* 1..5; default 3 with 3 or more URLs, else 1 */
        char *cluster_user;         /* NULL: none (with cluster_password) */
        char *cluster_password;
        char *cluster_ca_file;      /* NULL: TLS only for tls:// URLs */
        char *cluster_node_api;     /* NULL: none; http(s) URL, informational */
        unsigned cluster_artifact_max_mb; /* stream TETHER_ARTIFACTS' limit (MiB); 0: none of its own */

        /* [Webhook NAME] and [MQTTBridge NAME] sections (integrations.h,
         * docs/integrations.md), in the file's order, each checked with
         * integration_config_check() and its defaults filled in. */
        struct IntegrationConfig **integrations;
        size_t n_integrations;

        /* SHA-256 digests of the tokens in TokenFile (never the tokens). */
        uint8_t (*token_digests)[CONFIG_TOKEN_DIGEST_SIZE];
        size_t n_tokens;
        /* The same for MetricsTokenFile: tokens that may read /metrics only. */
        uint8_t (*metrics_token_digests)[CONFIG_TOKEN_DIGEST_SIZE];
        size_t n_metrics_tokens;
} CloudConfig;

/* Parse the command line. Returns 0 and sets *ret_path (pointing into argv
 * or to the default) to run; 1 if --help/--version was handled and the
 * program should exit successfully; -EINVAL on a usage error (logged). */
int cloud_config_parse_argv(int argc, char *argv[], const char **ret_path);

/* Read the keyfile at path and the token file it names. Logs every
 * problem as "FILE:LINE: ..." and returns a negative errno on the first
 * bad value. *ret is owned by the caller (cloud_config_free). */
int cloud_config_load(const char *path, CloudConfig **ret);
CloudConfig *cloud_config_free(CloudConfig *c);
static inline void cloud_config_freep(CloudConfig **c) { cloud_config_free(*c); }

/* Read TokenFile (and MetricsTokenFile, if set) again (the paths from the
 * configuration loaded at start) and replace the tokens with theirs. On
 * failure of either (logged, like at start) all tokens stay as they were. */
int cloud_config_reload_tokens(CloudConfig *c);

/* True if token (NUL-terminated) is one of the configured tokens;
 * constant time in the token's content. */
bool cloud_config_token_valid(const CloudConfig *c, const char *token);
/* The same for the tokens of MetricsTokenFile (false for NULL). */
bool cloud_config_metrics_token_valid(const CloudConfig *c, const char *token);

/* The SHA-256 of token (NUL-terminated), what is kept to check it again
 * later (cloud_config_token_digest_valid()) without keeping the token itself.
 * -EINVAL for a NULL or empty token, -EIO if hashing failed. */
int cloud_config_token_digest(const char *token, uint8_t ret[static CONFIG_TOKEN_DIGEST_SIZE]);
/* True if digest is one of the configured tokens' (constant time). */
bool cloud_config_token_digest_valid(const CloudConfig *c, const uint8_t digest[static CONFIG_TOKEN_DIGEST_SIZE]);
/* The same for the tokens of MetricsTokenFile. */
bool cloud_config_metrics_token_digest_valid(const CloudConfig *c,
                                             const uint8_t digest[static CONFIG_TOKEN_DIGEST_SIZE]);

/* Resolve a numeric or host-name listen address plus port. */
int cloud_config_resolve_address(const char *host, unsigned port, struct sockaddr_storage *ret,
                           socklen_t *ret_len);
