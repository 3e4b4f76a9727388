/* SPDX-License-Identifier: Apache-2.0 */
/* tether-cloudd configuration: keyfile (inih), command line, token file. */
#include "config.h"

#include <getopt.h>
#include <limits.h>
#include <netdb.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>

#include "cloud-config.h"
#include "integrations.h"
#include "proto.h"
#include "keyfile.h"
#include "log.h"
#include "util.h"

#define CONFIG_MAX_TOKENS 4096
/* libinih keeps at most 49 bytes of a section's name (its MAX_SECTION,
 * 50, is not configurable) and cuts the rest silently: a name that long
 * may be cut, so an integration's section may not be. */
#define CONFIG_SECTION_MAX 48

static void help(void) {
        printf("%s [OPTIONS...]\n\n"
               "The tether device cloud: CoAP over TLS for devices, HTTP API for users.\n\n"
               "  -h --help           Show this help\n"
               "     --version        Show the version\n"
               "  -c --config=FILE    Read FILE instead of %s\n",
               program_invocation_short_name, CLOUD_DEFAULT_CONFIG);
}

int cloud_config_parse_argv(int argc, char *argv[], const char **ret_path) {
        enum { ARG_VERSION = 0x100 };
        static const struct option options[] = {
                { "help", no_argument, NULL, 'h' },
                { "version", no_argument, NULL, ARG_VERSION },
                { "config", required_argument, NULL, 'c' },
                {},
        };
        const char *path = CLOUD_DEFAULT_CONFIG;
        int c;

        optind = 0;
        while ((c = getopt_long(argc, argv, "hc:", options, NULL)) >= 0) {
                switch (c) {
                case 'h':
                        help();
                        return 1;
                case ARG_VERSION:
                        printf("%s %s\n", CLOUD_PROGRAM, PACKAGE_VERSION);
                        return 1;
                case 'c':
                        path = optarg;
                        break;
                default:
                        return -EINVAL; /* getopt printed the reason */
                }
        }
        if (optind < argc)
                return log_error_errno(-EINVAL, "Unexpected argument '%s'.", argv[optind]);
        *ret_path = path;
        return 0;
}

CloudConfig *cloud_config_free(CloudConfig *c) {
        if (!c)
                return NULL;
        free(c->path);
        free(c->coap_listen);
        free(c->ca_file);
        free(c->cert_file);
        free(c->key_file);
        free(c->registration);
        free(c->api_listen);
        free(c->token_file);
        free(c->metrics_token_file);
        free(c->api_cert_file);
        free(c->api_key_file);
        free(c->console_dir);
        free(c->state_dir);
        free(c->ota_listen);
        free(c->ota_dir);
        free(c->ota_public_url);
        free(c->enroll_ca_cert);
        free(c->enroll_ca_key);
        free(c->sign_command);
        free(c->cluster_nats);
        free(c->cluster_node);
        free(c->cluster_user);
        if (c->cluster_password)
                OPENSSL_cleanse(c->cluster_password, strlen(c->cluster_password));
        free(c->cluster_password);
        free(c->cluster_ca_file);
        free(c->cluster_node_api);
        for (size_t i = 0; i < c->n_integrations; i++)
                integration_config_free(c->integrations[i]);
        free(c->integrations);
        if (c->token_digests)
                OPENSSL_cleanse(c->token_digests, c->n_tokens * CONFIG_TOKEN_DIGEST_SIZE);
        free(c->token_digests);
        if (c->metrics_token_digests)
                OPENSSL_cleanse(c->metrics_token_digests, c->n_metrics_tokens * CONFIG_TOKEN_DIGEST_SIZE);
        free(c->metrics_token_digests);
        free(c);
        return NULL;
}

#define STR_KEY(sec, n, field) { sec, n, KEYFILE_STRING, offsetof(CloudConfig, field), 0, 0 }
#define UINT_KEY(sec, n, field, lo, hi) { sec, n, KEYFILE_UINT, offsetof(CloudConfig, field), lo, hi }

static const KeyfileKey config_keys[] = {
        STR_KEY("Cloud", "Listen", coap_listen),
        UINT_KEY("Cloud", "Port", coap_port, 0, 65535),
        STR_KEY("Cloud", "CAFile", ca_file),
        STR_KEY("Cloud", "Certificate", cert_file),
        STR_KEY("Cloud", "Key", key_file),
        UINT_KEY("Cloud", "MaxPayload", max_payload, 1, PROTO_HARD_PAYLOAD_MAX),
        UINT_KEY("Cloud", "MaxSubscriptions", max_subscriptions, 0, 4096),
        UINT_KEY("Cloud", "PingSec", ping_sec, 1, 86400),
        UINT_KEY("Cloud", "DeviceTimeoutSec", device_timeout_sec, 1, 86400),
        UINT_KEY("Cloud", "CallTimeoutSec", call_timeout_sec, 1, 3600),
        UINT_KEY("Cloud", "HandshakeTimeoutSec", handshake_timeout_sec, 1, 3600),
        UINT_KEY("Cloud", "MaxHandshakes", max_handshakes, 1, 1000000),
        UINT_KEY("Cloud", "TicketKeySec", ticket_key_sec, 0, 30 * 86400),
        UINT_KEY("Cloud", "HandshakeGraceSec", handshake_grace_sec, 0, 3600),
        UINT_KEY("Cloud", "MaxQueuedBytes", max_queued_bytes, 1024, 1U << 30),
        UINT_KEY("Cloud", "SessionShards", session_shards, 1, 256),
        UINT_KEY("Cloud", "HandshakeThreads", handshake_threads, 0, 64),
        STR_KEY("Cloud", "Registration", registration),
        STR_KEY("API", "Listen", api_listen),
        UINT_KEY("API", "Port", api_port, 0, 65535),
        STR_KEY("API", "TokenFile", token_file),
        STR_KEY("API", "MetricsTokenFile", metrics_token_file),
        STR_KEY("State", "Directory", state_dir),
        UINT_KEY("State", "AuditMaxRecords", audit_max_records, 0, 1u << 31),
        UINT_KEY("State", "AuditMaxAgeDays", audit_max_age_days, 0, 36500),
        UINT_KEY("Events", "JournalMaxBytes", journal_max_bytes, 65536, 1u << 31),
        UINT_KEY("Events", "SyncIntervalMsec", journal_sync_ms, 0, 60000),
        UINT_KEY("Events", "DeviceEventRate", device_event_rate, 0, 1000000),
        UINT_KEY("Events", "DeviceEventBurst", device_event_burst, 1, 100000000),
        UINT_KEY("Events", "DeviceByteRate", device_byte_rate, 0, 1u << 31),
        UINT_KEY("Events", "DeviceByteBurst", device_byte_burst, 1, 1u << 31),
        UINT_KEY("Events", "DeviceJournalShare", device_journal_share, 1, 100),
        UINT_KEY("Events", "BacklogMaxMB", backlog_max_mb, 1, 1048576),
        UINT_KEY("API", "MaxConnectionsPerIP", max_connections_per_ip, 0, 1000000),
        STR_KEY("API", "Certificate", api_cert_file),
        STR_KEY("API", "Key", api_key_file),
        { "API", "Console", KEYFILE_STRING_EMPTY, offsetof(CloudConfig, console_dir), 0, 0 },
        UINT_KEY("API", "MaxConnections", max_connections, 1, 1000000),
        UINT_KEY("API", "MaxStreamsPerToken", max_streams_per_token, 0, 1000000),
        UINT_KEY("API", "IdleTimeoutSec", idle_timeout_sec, 1, 86400),
        UINT_KEY("Tunnel", "MaxStreamsPerDevice", tunnel_max_per_device, 1, 1024),
        UINT_KEY("Tunnel", "MaxStreams", tunnel_max_streams, 1, 65536),
        UINT_KEY("Tunnel", "IdleSec", tunnel_idle_sec, 1, 604800),
        UINT_KEY("Tunnel", "AttachSec", tunnel_attach_sec, 1, 3600),
        UINT_KEY("API", "HeaderTimeoutSec", header_timeout_sec, 1, 3600),
        UINT_KEY("API", "RateLimitPerAddress", rate_address, 0, 1000000),
        UINT_KEY("API", "RateLimitPerAddressBurst", rate_address_burst, 1, 1000000),
        UINT_KEY("API", "RateLimitPerToken", rate_token, 0, 1000000),
        UINT_KEY("API", "RateLimitPerTokenBurst", rate_token_burst, 1, 1000000),
        UINT_KEY("API", "AuthFailuresPerAddress", rate_auth_failures, 0, 1000000),
        UINT_KEY("API", "AuthFailuresPerAddressBurst", rate_auth_failures_burst, 1, 1000000),
        STR_KEY("OTA", "ArtifactDirectory", ota_dir),
        STR_KEY("OTA", "Listen", ota_listen),
        UINT_KEY("OTA", "Port", ota_port, 0, 65535),
        STR_KEY("OTA", "PublicURL", ota_public_url),
        UINT_KEY("OTA", "MaxArtifactMB", ota_max_artifact_mb, 1, 1048576),
        STR_KEY("Enroll", "CACertificate", enroll_ca_cert),
        STR_KEY("Enroll", "CAKey", enroll_ca_key),
        STR_KEY("Enroll", "SignCommand", sign_command),
        UINT_KEY("Enroll", "SignTimeoutSec", sign_timeout_sec, 1, 3600),
        UINT_KEY("Enroll", "SignConcurrency", sign_concurrency, 1, 256),
        UINT_KEY("Enroll", "CertificateValiditySec", cert_validity_sec, 300, 315360000),
        STR_KEY("Cluster", "NATS", cluster_nats),
        STR_KEY("Cluster", "Node", cluster_node),
        UINT_KEY("Cluster", "Replicas", cluster_replicas, 1, 5),
        STR_KEY("Cluster", "User", cluster_user),
        STR_KEY("Cluster", "Password", cluster_password),
        STR_KEY("Cluster", "CAFile", cluster_ca_file),
        STR_KEY("Cluster", "NodeAPI", cluster_node_api),
        UINT_KEY("Cluster", "ArtifactMaxMB", cluster_artifact_max_mb, 16, 1u << 24),
};

static bool node_char(char c) {
        return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '-';
}

static bool node_name_valid(const char *s) {
        size_t n = strlen(s);

        if (n == 0 || n > CLOUD_NODE_NAME_MAX)
                return false;
        for (; *s; s++)
                if (!node_char(*s))
                        return false;
        return true;
}

/* NULL if every URL of the list is nats:// or tls:// with a host, else
 * the first bad one (in buf). */
static const char *nats_urls_check(const char *list, char *buf, size_t size, unsigned *ret_n) {
        unsigned n = 0;

        for (const char *p = list;;) {
                size_t len;

                p += strspn(p, ", \t");
                if (!*p)
                        break;
                len = strcspn(p, ", \t");
                snprintf(buf, size, "%.*s", (int)len, p);
                p += len;
                n++;
                if (!(startswith(buf, "nats://") && buf[strlen("nats://")] &&
                      buf[strlen("nats://")] != ':') &&
                    !(startswith(buf, "tls://") && buf[strlen("tls://")] && buf[strlen("tls://")] != ':'))
                        return buf;
        }
        if (ret_n)
                *ret_n = n;
        return n == 0 ? "" : NULL;
}

/* [Cluster]'s values that can be checked on their own, with their line. */
static int cloud_config_check_cluster_key(KeyfileParser *p, const char *name, const char *value) {
        char url[256];
        const char *bad;

        if (streq(name, "Node") && !node_name_valid(value))
                return keyfile_fail(p, -EINVAL,
                                    "Invalid node name '%s' for Node= in [Cluster] (expected 1 to %u of A-Z a-z 0-9 _ -).",
                                    value, CLOUD_NODE_NAME_MAX);
        if (streq(name, "NATS") && (bad = nats_urls_check(value, url, sizeof(url), NULL)))
                return keyfile_fail(p, -EINVAL,
                                    "Invalid server URL '%s' for NATS= in [Cluster] (expected nats://HOST:PORT or "
                                    "tls://HOST:PORT, separated by commas or spaces).",
                                    bad);
        if (streq(name, "NodeAPI") && !startswith(value, "http://") && !startswith(value, "https://"))
                return keyfile_fail(p, -EINVAL, "Invalid URL '%s' for NodeAPI= in [Cluster] (expected http:// or https://).",
                                    value);
        return 1;
}

/* Every bad value is logged, not only the first. */
static void cloud_config_log_error(const char *message) {
        log_error("%s", message);
}

/* ---- [Webhook NAME], [MQTTBridge NAME] ---------------------------------------- */

/* What the parser keeps between the handler's calls. */
typedef struct ConfigParse {
        CloudConfig *config;
        char *section;              /* the section of the last key, to tell a new one */
        IntegrationConfig *current; /* its integration; NULL: none (a bad section header) */
        unsigned *lines;            /* [i]: the first line of config->integrations[i] */
} ConfigParse;

static void config_parse_done(ConfigParse *cp) {
        free(cp->section);
        free(cp->lines);
}

#define KEYFILE_PROTOCOL KEYFILE_TYPE_OWN /* "3.1.1" (4) or "5" */
#define I_STR(sec, n, field) { sec, n, KEYFILE_STRING, offsetof(IntegrationConfig, field), 0, 0 }
#define I_STR_EMPTY(sec, n, field) { sec, n, KEYFILE_STRING_EMPTY, offsetof(IntegrationConfig, field), 0, 0 }
#define I_UINT(sec, n, field, lo, hi) { sec, n, KEYFILE_UINT, offsetof(IntegrationConfig, field), lo, hi }

/* Sections by kind: "Webhook" and "MQTTBridge", the word before the name. */
static const KeyfileKey integration_keys[] = {
        I_STR("Webhook", "URL", url),
        I_STR("Webhook", "Secret", secret),
        I_STR_EMPTY("Webhook", "Prefix", prefix),
        I_STR("Webhook", "Tag", tag),
        I_STR("Webhook", "CAFile", ca_file),
        I_UINT("Webhook", "Timeout", timeout_sec, 1, 300),
        I_STR("MQTTBridge", "Host", host),
        I_UINT("MQTTBridge", "Port", port, 1, 65535),
        I_STR("MQTTBridge", "CAFile", ca_file),
        I_STR("MQTTBridge", "CertFile", cert_file),
        I_STR("MQTTBridge", "KeyFile", key_file),
        I_STR("MQTTBridge", "ClientID", client_id),
        I_STR("MQTTBridge", "User", user),
        I_STR("MQTTBridge", "Password", password),
        I_STR("MQTTBridge", "Topic", topic),
        I_UINT("MQTTBridge", "QoS", qos, 0, 1),
        { "MQTTBridge", "Protocol", KEYFILE_PROTOCOL, offsetof(IntegrationConfig, protocol), 0, 0 },
        I_STR_EMPTY("MQTTBridge", "Prefix", prefix),
        I_STR("MQTTBridge", "Tag", tag),
        I_STR("MQTTBridge", "Subscribe", subscribe),
        I_STR("MQTTBridge", "InboundPrefix", inbound_prefix),
};

/* The kind word of an integration section ("Webhook" of "Webhook NAME"),
 * or NULL for another section; *ret_name: what follows the blanks. */
static const char *integration_section(const char *section, IntegrationKind *ret_kind, const char **ret_name) {
        static const struct {
                const char *word;
                IntegrationKind kind;
        } kinds[] = { { "Webhook", INTEGRATION_WEBHOOK }, { "MQTTBridge", INTEGRATION_MQTT } };

        for (size_t i = 0; i < ELEMENTSOF(kinds); i++) {
                size_t n = strlen(kinds[i].word);

                if (strncmp(section, kinds[i].word, n) != 0 || (section[n] && section[n] != ' ' && section[n] != '\t'))
                        continue;
                *ret_kind = kinds[i].kind;
                *ret_name = section + n + strspn(section + n, " \t");
                return kinds[i].word;
        }
        return NULL;
}

/* The first key of a section [KIND NAME]: a new IntegrationConfig (or,
 * for a bad header, none: its keys are ignored, the error is logged). */
static int integration_section_start(KeyfileParser *p, ConfigParse *cp, const char *section, const char *word,
                                     IntegrationKind kind, const char *name) {
        CloudConfig *c = cp->config;
        _cleanup_(integration_config_freep) IntegrationConfig *ic = NULL;
        IntegrationConfig **a;
        unsigned *lines;

        free(cp->section);
        cp->section = strdup(section);
        cp->current = NULL;
        if (!cp->section)
                return keyfile_fail(p, -ENOMEM, "Out of memory.");
        if (!*name)
                return keyfile_fail(p, -EINVAL, "[%s] needs a name: [%s NAME].", word, word);
        if (strlen(section) > CONFIG_SECTION_MAX)
                return keyfile_fail(p, -EINVAL,
                                    "Section [%s...] is too long: the names of [%s] sections are at most %zu bytes "
                                    "in this file.",
                                    section, word, CONFIG_SECTION_MAX - (size_t)(name - section));
        if (!integration_name_valid(name))
                return keyfile_fail(p, -EINVAL, "Invalid name '%s' in [%s] (expected 1 to %u of A-Z a-z 0-9 _ -).",
                                    name, section, INTEGRATION_NAME_MAX);
        for (size_t i = 0; i < c->n_integrations; i++)
                if (streq(c->integrations[i]->name, name))
                        return keyfile_fail(p, -EINVAL,
                                            "Duplicate integration name '%s' in [%s] (first at line %u): names are "
                                            "unique across [Webhook] and [MQTTBridge].",
                                            name, section, cp->lines[i]);
        if (c->n_integrations >= CLOUD_INTEGRATIONS_MAX)
                return keyfile_fail(p, -EINVAL, "More than %u integrations ([Webhook] and [MQTTBridge] sections).",
                                    CLOUD_INTEGRATIONS_MAX);
        ic = calloc(1, sizeof(*ic));
        if (!ic || !(ic->name = strdup(name)))
                return keyfile_fail(p, -ENOMEM, "Out of memory.");
        ic->kind = kind;
        /* Defaults that a key may set to 0 (the others after the file). */
        ic->qos = 1;
        ic->protocol = 4;
        a = reallocarray(c->integrations, c->n_integrations + 1, sizeof(*a));
        if (a)
                c->integrations = a;
        lines = reallocarray(cp->lines, c->n_integrations + 1, sizeof(*lines));
        if (lines)
                cp->lines = lines;
        if (!a || !lines)
                return keyfile_fail(p, -ENOMEM, "Out of memory.");
        cp->lines[c->n_integrations] = p->line;
        cp->current = c->integrations[c->n_integrations++] = TAKE_PTR(ic);
        return 1;
}

static int integration_handler(KeyfileParser *p, ConfigParse *cp, const char *section, const char *word,
                               IntegrationKind kind, const char *ident, const char *name, const char *value) {
        const KeyfileKey *k;
        int r;

        if (!cp->section || !streq(cp->section, section)) {
                r = integration_section_start(p, cp, section, word, kind, ident);
                if (r <= 0)
                        return r;
        }
        if (!cp->current)
                return 1; /* a bad header, said once */
        k = keyfile_find_key(integration_keys, ELEMENTSOF(integration_keys), word, name);
        if (!k) {
                log_warning("%s:%u: Unknown key %s= in [%s], ignoring.", p->path, p->line, name, section);
                return 1;
        }
        if (k->type == KEYFILE_PROTOCOL) {
                if (streq(value, "3.1.1"))
                        cp->current->protocol = 4;
                else if (streq(value, "5"))
                        cp->current->protocol = 5;
                else
                        return keyfile_fail(p, -EINVAL,
                                            "Invalid value '%s' for Protocol= in [%s] (expected 3.1.1 or 5).", value,
                                            section);
                return 1;
        }
        r = keyfile_set(k, cp->current, value);
        if (r == -ENOMEM)
                return keyfile_fail(p, r, "Out of memory.");
        if (r < 0 && k->type == KEYFILE_UINT)
                return keyfile_fail(p, -EINVAL, "Invalid value '%s' for %s= in [%s] (expected %llu..%llu).", value,
                                    name, section, (unsigned long long)k->min, (unsigned long long)k->max);
        if (r < 0)
                return keyfile_fail(p, -EINVAL, "Empty value for %s= in [%s].", name, section);
        return 1;
}

/* Defaults that depend on other keys, then integration_config_check(),
 * each failure logged with the section's first line. */
static int cloud_config_check_integrations(CloudConfig *c, const char *path, const unsigned *lines) {
        int ret = 0;

        for (size_t i = 0; i < c->n_integrations; i++) {
                IntegrationConfig *ic = c->integrations[i];
                const char *word = ic->kind == INTEGRATION_WEBHOOK ? "Webhook" : "MQTTBridge";
                char err[INTEGRATION_ERROR_MAX];
                int r;

                if (ic->kind == INTEGRATION_WEBHOOK && ic->timeout_sec == 0)
                        ic->timeout_sec = 10;
                if (ic->kind == INTEGRATION_MQTT) {
                        if (ic->port == 0)
                                ic->port = ic->ca_file ? 8883 : 1883;
                        if (!ic->topic && !(ic->topic = strdup("tether/{device}/{event}")))
                                return log_error_errno(-ENOMEM, "Out of memory.");
                        if (!ic->inbound_prefix && !(ic->inbound_prefix = strdup("mqtt/")))
                                return log_error_errno(-ENOMEM, "Out of memory.");
                        if (!ic->client_id &&
                            asprintf(&ic->client_id, "tether-%s", c->cluster_node ?: "cloudd") < 0) {
                                ic->client_id = NULL;
                                return log_error_errno(-ENOMEM, "Out of memory.");
                        }
                }
                r = integration_config_check(ic, err);
                if (r == -ENOMEM)
                        return log_error_errno(r, "Out of memory.");
                if (r < 0) {
                        log_error("%s:%u: [%s %s] %s", path, lines[i], word, ic->name, err);
                        ret = -EINVAL;
                }
        }
        return ret;
}

/* ---- the keyfile ----------------------------------------------------------------- */

/* 1 to continue, 0 (keyfile_fail) marks this line as a failing one. */
static int cloud_config_handler(KeyfileParser *p, const char *section, const char *name, const char *value) {
        ConfigParse *cp = p->userdata;
        const KeyfileKey *k = keyfile_find_key(config_keys, ELEMENTSOF(config_keys), section, name);
        const char *word, *ident;
        IntegrationKind kind;
        int r;

        if (!k && (word = integration_section(section, &kind, &ident)))
                return integration_handler(p, cp, section, word, kind, ident, name, value);
        /* Leaving a section [Webhook NAME]: that name again is a duplicate. */
        free(cp->section);
        cp->section = NULL;
        cp->current = NULL;
        if (k) {
                r = keyfile_set(k, cp->config, value);
                if (r == -ENOMEM)
                        return keyfile_fail(p, r, "Out of memory.");
                if (r < 0 && k->type == KEYFILE_UINT)
                        return keyfile_fail(p, -EINVAL, "Invalid value '%s' for %s= in [%s] (expected %llu..%llu).",
                                            value, name, section, (unsigned long long)k->min,
                                            (unsigned long long)k->max);
                if (r < 0)
                        return keyfile_fail(p, -EINVAL, "Empty value for %s= in [%s].", name, section);
                if (streq(section, "Cluster"))
                        return cloud_config_check_cluster_key(p, name, value);
                return 1;
        }
        if (!streq(section, "Cloud") && !streq(section, "API") && !streq(section, "State") &&
            !streq(section, "Events") && !streq(section, "OTA") && !streq(section, "Enroll") &&
            !streq(section, "Cluster") && !streq(section, "Tunnel"))
                log_warning("%s:%u: Unknown section [%s], ignoring %s=.", p->path, p->line, section, name);
        else
                log_warning("%s:%u: Unknown key %s= in [%s], ignoring.", p->path, p->line, name, section);
        return 1;
}

static int cloud_config_parse_keyfile(CloudConfig *c, const char *path, ConfigParse *cp) {
        _cleanup_(keyfile_parser_done) KeyfileParser p = {
                .path = path,
                .userdata = cp,
                .on_error = cloud_config_log_error,
        };
        _cleanup_fclose_ FILE *f = NULL;
        int r;

        f = fopen(path, "re");
        if (!f)
                return log_error_errno(errno, "Failed to open configuration file '%s': %m", path);
        r = keyfile_parse(&p, f, cloud_config_handler);
        if (r == -EBADMSG)
                /* A syntax error inih found itself (no handler call). */
                return log_error_errno(-EINVAL, "%s:%u: Syntax error.", path, p.line);
        if (r == -ENOMEM && !p.error)
                return log_error_errno(r, "Out of memory.");
        return r; /* a bad value was logged by cloud_config_log_error() */
}

static int token_digest(const char *token, size_t len, uint8_t out[static CONFIG_TOKEN_DIGEST_SIZE]) {
        unsigned n = CONFIG_TOKEN_DIGEST_SIZE;

        if (!EVP_Digest(token, len, out, &n, EVP_sha256(), NULL))
                return -EIO;
        return 0;
}

typedef struct TokenSet {
        uint8_t (*digests)[CONFIG_TOKEN_DIGEST_SIZE];
        size_t n;
} TokenSet;

static void token_set_clear(TokenSet *t) {
        if (t->digests)
                OPENSSL_cleanse(t->digests, t->n * CONFIG_TOKEN_DIGEST_SIZE);
        free(t->digests);
        *t = (TokenSet){};
}

/* Read the tokens of path (what names the key, for the log) into *t,
 * which starts empty and is the caller's to clear even on failure. */
static int cloud_config_read_tokens(const char *path, const char *what, TokenSet *t) {
        _cleanup_fclose_ FILE *f = NULL;
        _cleanup_free_ char *line = NULL;
        size_t cap = 0;
        unsigned lineno = 0;
        ssize_t n;

        f = fopen(path, "re");
        if (!f)
                return log_error_errno(errno, "Failed to open %s '%s': %m", what, path);
        while ((n = getline(&line, &cap, f)) >= 0) {
                char *s = line, *e = line + n;
                void *m;

                lineno++;
                while (s < e && (*s == ' ' || *s == '\t'))
                        s++;
                while (e > s && (e[-1] == '\n' || e[-1] == '\r' || e[-1] == ' ' || e[-1] == '\t'))
                        e--;
                if (s == e || *s == '#')
                        continue;
                for (char *q = s; q < e; q++)
                        if (*q <= ' ' || *q == 0x7f) {
                                OPENSSL_cleanse(line, cap);
                                return log_error_errno(-EINVAL, "%s:%u: Token contains whitespace or control characters.",
                                                       path, lineno);
                        }
                if (t->n >= CONFIG_MAX_TOKENS) {
                        OPENSSL_cleanse(line, cap);
                        return log_error_errno(-E2BIG, "%s:%u: More than %u tokens.", path, lineno,
                                               CONFIG_MAX_TOKENS);
                }
                m = reallocarray(t->digests, t->n + 1, CONFIG_TOKEN_DIGEST_SIZE);
                if (!m)
                        return log_error_errno(-ENOMEM, "Out of memory.");
                t->digests = m;
                if (token_digest(s, e - s, t->digests[t->n]) < 0)
                        return log_error_errno(-EIO, "Failed to hash a token.");
                t->n++;
        }
        if (line)
                OPENSSL_cleanse(line, cap);
        if (ferror(f))
                return log_error_errno(-EIO, "Failed to read %s '%s'.", what, path);
        return 0;
}

/* TokenFile and MetricsTokenFile into c, both or neither. */
static int cloud_config_load_tokens(CloudConfig *c) {
        TokenSet api = {}, metrics = {};
        int r;

        r = cloud_config_read_tokens(c->token_file, "TokenFile", &api);
        if (r >= 0 && c->metrics_token_file)
                r = cloud_config_read_tokens(c->metrics_token_file, "MetricsTokenFile", &metrics);
        if (r < 0) {
                token_set_clear(&api);
                token_set_clear(&metrics);
                return r;
        }
        if (api.n == 0)
                log_warning("TokenFile '%s' holds no tokens: every API request will be refused.", c->token_file);
        token_set_clear(&(TokenSet){ c->token_digests, c->n_tokens });
        token_set_clear(&(TokenSet){ c->metrics_token_digests, c->n_metrics_tokens });
        c->token_digests = api.digests;
        c->n_tokens = api.n;
        c->metrics_token_digests = metrics.digests;
        c->n_metrics_tokens = metrics.n;
        return 0;
}

int cloud_config_token_digest(const char *token, uint8_t ret[static CONFIG_TOKEN_DIGEST_SIZE]) {
        if (!token || !*token)
                return -EINVAL;
        return token_digest(token, strlen(token), ret);
}

bool cloud_config_token_digest_valid(const CloudConfig *c, const uint8_t digest[static CONFIG_TOKEN_DIGEST_SIZE]) {
        bool ok = false;

        /* Compare with every token, no early exit. */
        for (size_t i = 0; i < c->n_tokens; i++)
                ok |= CRYPTO_memcmp(digest, c->token_digests[i], CONFIG_TOKEN_DIGEST_SIZE) == 0;
        return ok;
}

bool cloud_config_token_valid(const CloudConfig *c, const char *token) {
        uint8_t digest[CONFIG_TOKEN_DIGEST_SIZE];

        if (cloud_config_token_digest(token, digest) < 0)
                return false;
        return cloud_config_token_digest_valid(c, digest);
}

bool cloud_config_metrics_token_digest_valid(const CloudConfig *c,
                                             const uint8_t digest[static CONFIG_TOKEN_DIGEST_SIZE]) {
        bool ok = false;

        for (size_t i = 0; i < c->n_metrics_tokens; i++)
                ok |= CRYPTO_memcmp(digest, c->metrics_token_digests[i], CONFIG_TOKEN_DIGEST_SIZE) == 0;
        return ok;
}

bool cloud_config_metrics_token_valid(const CloudConfig *c, const char *token) {
        uint8_t digest[CONFIG_TOKEN_DIGEST_SIZE];

        if (cloud_config_token_digest(token, digest) < 0)
                return false;
        return cloud_config_metrics_token_digest_valid(c, digest);
}

int cloud_config_reload_tokens(CloudConfig *c) {
        return cloud_config_load_tokens(c);
}

/* [Enroll]: what can be told without reading the files (the Signer reads
 * and checks them at start). */
static int cloud_config_check_enroll(CloudConfig *c, const char *path) {
        if (!c->enroll_ca_cert != !c->enroll_ca_key)
                return log_error_errno(-EINVAL, "%s: [Enroll] CACertificate= and CAKey= go together.", path);
        if (c->enroll_ca_cert && c->sign_command)
                return log_error_errno(-EINVAL,
                                       "%s: [Enroll] CACertificate= and SignCommand= exclude each other: "
                                       "choose the built-in signer or an external command.",
                                       path);
        if (c->sign_command) {
                const char *s = c->sign_command + strspn(c->sign_command, " \t");

                if (*s != '/')
                        return log_error_errno(-EINVAL, "%s: [Enroll] SignCommand= must start with an absolute path, "
                                               "not '%s'.", path, c->sign_command);
        }
        c->enroll_enabled = c->enroll_ca_cert || c->sign_command;
        return 0;
}

/* The host name with every byte outside [A-Za-z0-9_-] as '-', cut at
 * CLOUD_NODE_NAME_MAX bytes ("node" if there is none). */
static char *default_node_name(void) {
        char host[256] = "";
        size_t n;

        if (gethostname(host, sizeof(host) - 1) < 0 || !host[0])
                return strdup("node");
        n = strnlen(host, CLOUD_NODE_NAME_MAX);
        host[n] = 0;
        for (size_t i = 0; i < n; i++)
                if (!node_char(host[i]))
                        host[i] = '-';
        return strdup(host);
}

/* [Cluster]: defaults and what goes together. */
static int cloud_config_check_cluster(CloudConfig *c, const char *path) {
        unsigned n_urls = 0;
        char url[256];

        if (!c->cluster_nats) {
                if (c->cluster_node || c->cluster_replicas || c->cluster_user || c->cluster_password ||
                    c->cluster_ca_file || c->cluster_node_api || c->cluster_artifact_max_mb)
                        log_warning("%s: [Cluster] without NATS= is ignored: running as a single node.", path);
                free(c->cluster_node);
                free(c->cluster_user);
                if (c->cluster_password)
                        OPENSSL_cleanse(c->cluster_password, strlen(c->cluster_password));
                free(c->cluster_password);
                free(c->cluster_ca_file);
                free(c->cluster_node_api);
                c->cluster_node = c->cluster_user = c->cluster_password = NULL;
                c->cluster_ca_file = c->cluster_node_api = NULL;
                c->cluster_replicas = 0;
                c->cluster_artifact_max_mb = 0;
                return 0;
        }
        /* Checked with its line already; the count is what is wanted. */
        (void)nats_urls_check(c->cluster_nats, url, sizeof(url), &n_urls);
        if (!c->cluster_user != !c->cluster_password)
                return log_error_errno(-EINVAL, "%s: [Cluster] User= and Password= go together.", path);
        if (!c->cluster_node) {
                c->cluster_node = default_node_name();
                if (!c->cluster_node)
                        return log_error_errno(-ENOMEM, "Out of memory.");
        }
        if (c->cluster_replicas == 0)
                c->cluster_replicas = n_urls >= 3 ? 3 : 1;
        return 0;
}

int cloud_config_load(const char *path, CloudConfig **ret) {
        _cleanup_(cloud_config_freep) CloudConfig *c = NULL;
        _cleanup_(config_parse_done) ConfigParse cp = {};
        int r;

        c = calloc(1, sizeof(*c));
        if (!c)
                return log_error_errno(-ENOMEM, "Out of memory.");
        c->path = strdup(path);
        c->coap_listen = strdup("0.0.0.0");
        c->api_listen = strdup("127.0.0.1");
        c->state_dir = strdup(CLOUD_DEFAULT_STATE_DIR);
        c->console_dir = strdup(CONSOLEDIR);
        if (!c->path || !c->coap_listen || !c->api_listen || !c->state_dir || !c->console_dir)
                return log_error_errno(-ENOMEM, "Out of memory.");
        c->coap_port = PROTO_DEFAULT_PORT;
        c->max_payload = PROTO_DEFAULT_PAYLOAD_MAX;
        c->max_subscriptions = 32;
        c->ping_sec = 30;
        c->device_timeout_sec = 90;
        c->call_timeout_sec = 10;
        c->handshake_timeout_sec = 15;
        c->max_handshakes = 1024;
        c->ticket_key_sec = 43200;
        c->handshake_grace_sec = 2;
        c->max_queued_bytes = 1024 * 1024;
        c->session_shards = 16;
        c->handshake_threads = CLOUD_HANDSHAKE_THREADS_AUTO;
        c->api_port = 8080;
        c->max_connections_per_ip = 64;
        c->max_connections = 4096;
        c->idle_timeout_sec = 30;
        c->header_timeout_sec = 10;
        c->rate_address = 500;
        c->rate_address_burst = 1000;
        c->rate_token = 500;
        c->rate_token_burst = 1000;
        c->rate_auth_failures = 10;
        c->rate_auth_failures_burst = 100;
        c->journal_max_bytes = 16 * 1024 * 1024;
        c->journal_sync_ms = 100;
        c->audit_max_records = 1000000;
        c->max_streams_per_token = 64;
        c->tunnel_max_per_device = 8;
        c->tunnel_max_streams = 256;
        c->tunnel_idle_sec = 900;
        c->tunnel_attach_sec = 30;
        c->audit_max_age_days = 400;
        c->device_event_rate = 100;
        c->device_event_burst = 1000;
        c->device_byte_rate = 256 * 1024;
        c->device_byte_burst = 4 * 1024 * 1024;
        c->device_journal_share = 25;
        c->backlog_max_mb = 1024;
        c->ota_port = CLOUD_CONFIG_PORT_UNSET;
        c->ota_max_artifact_mb = 1024;
        c->sign_timeout_sec = 30;
        c->sign_concurrency = 4;
        c->cert_validity_sec = 30 * 86400;

        cp.config = c;
        r = cloud_config_parse_keyfile(c, path, &cp);
        if (r < 0)
                return r;

        if (!c->ca_file || !c->cert_file || !c->key_file)
                return log_error_errno(-EINVAL, "%s: [Cloud] CAFile=, Certificate= and Key= are required.", path);
        if (!c->token_file)
                return log_error_errno(-EINVAL, "%s: [API] TokenFile= is required.", path);
        if (c->registration && !streq(c->registration, "open") && !streq(c->registration, "enrolled"))
                return log_error_errno(-EINVAL, "%s: [Cloud] Registration= must be 'open' or 'enrolled', not '%s'.",
                                       path, c->registration);
        c->registration_enrolled = c->registration && streq(c->registration, "enrolled");
        if (!c->api_cert_file != !c->api_key_file)
                return log_error_errno(-EINVAL, "%s: [API] Certificate= and Key= go together (HTTPS) or not at all.",
                                       path);
        if (c->ota_public_url && !startswith(c->ota_public_url, "https://"))
                return log_error_errno(-EINVAL, "%s: [OTA] PublicURL= must start with https://.", path);
        if (c->ota_public_url && c->ota_port == CLOUD_CONFIG_PORT_UNSET)
                log_warning("%s: [OTA] PublicURL= is set but Port= is not: no HTTPS artifact server runs, devices "
                            "fetch artifacts over their connection.",
                            path);
        if (c->device_timeout_sec <= c->ping_sec)
                log_warning("%s: DeviceTimeoutSec=%u is not above PingSec=%u: idle devices will be dropped.",
                            path, c->device_timeout_sec, c->ping_sec);
        if (c->device_byte_rate > 0 && c->device_byte_burst < c->max_payload + TETHER_EVENT_NAME_MAX)
                return log_error_errno(-EINVAL,
                                       "%s: [Events] DeviceByteBurst=%u is below MaxPayload=%u plus the longest "
                                       "event name (%u): the largest event could never be published.",
                                       path, c->device_byte_burst, c->max_payload, TETHER_EVENT_NAME_MAX);
        r = cloud_config_check_enroll(c, path);
        if (r < 0)
                return r;
        r = cloud_config_check_cluster(c, path);
        if (r < 0)
                return r;
        r = cloud_config_check_integrations(c, path, cp.lines);
        if (r < 0)
                return r;
        r = cloud_config_load_tokens(c);
        if (r < 0)
                return r;

        *ret = TAKE_PTR(c);
        return 0;
}

int cloud_config_resolve_address(const char *host, unsigned port, struct sockaddr_storage *ret,
                           socklen_t *ret_len) {
        struct addrinfo hints = { .ai_flags = AI_PASSIVE | AI_NUMERICSERV, .ai_socktype = SOCK_STREAM };
        struct addrinfo *res = NULL;
        char service[8];
        int r;

        snprintf(service, sizeof(service), "%u", port);
        r = getaddrinfo(host, service, &hints, &res);
        if (r != 0)
                return r == EAI_SYSTEM ? -errno : -EADDRNOTAVAIL;
        if (!res)
                return -EADDRNOTAVAIL;
        if (res->ai_addrlen > sizeof(*ret)) {
                freeaddrinfo(res);
                return -EADDRNOTAVAIL;
        }
        memset(ret, 0, sizeof(*ret));
        memcpy(ret, res->ai_addr, res->ai_addrlen);
        *ret_len = res->ai_addrlen;
        freeaddrinfo(res);
        return 0;
}
