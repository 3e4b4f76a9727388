/* SPDX-License-Identifier: Apache-2.0 */
/* Outbound integrations (integrations.c, prefix integrations_ and
 * integration_): webhooks and MQTT bridges that get the cloud's events
 * (docs/integrations.md).
 *
 * An integration is a cursor over the event journal (journal.h): it reads
 * the events after the last one its receiver acknowledged, keeps those its
 * filter selects (name prefix, optionally a device tag), and hands each,
 * as a JSON body, to its sink (a webhook's HTTP client, an MQTT bridge's
 * broker connection). Guarantees:
 *
 * - At least once: an event leaves the integration's backlog only when
 *   its sink said it was delivered (integration_sent() with 0). The
 *   acknowledged position (the cursor) is stored (StateDirectory/cloud.db,
 *   table integration_cursors; in cluster mode also the bucket
 *   TETHER_INTEGRATIONS, integrations_share()) so a restart resends at most what was delivered
 *   in the last batch (STORE_BATCH_MSEC), never skips.
 * - In order per device: an event is handed to the sink only when no
 *   earlier event of the same device (coreid) is in flight or failed.
 *   Events of different devices may be in flight together (up to the
 *   sink's window).
 * - Never silently dropped: a failed delivery is retried with an
 *   exponential backoff (1 s doubling to INTEGRATION_RETRY_MAX_SEC);
 *   after INTEGRATION_FAILING_AFTER failures in a row the integration is
 *   "failing": it says so in integrations_json() and publishes one event
 *   "tether/integration/failing" (and "tether/integration/recovered" when
 *   a delivery succeeds again). Events the journal no longer has when
 *   the cursor reaches them (the journal was compacted past them) are
 *   counted as lost, logged and published as "tether/integration/lost".
 *   The journal keeps what the slowest integration has not delivered
 *   (journal_retain(), up to [Events] BacklogMaxMB=).
 * - Every event once per idempotency key: the key is
 *   "<journal epoch, 16 hex digits>-<journal id>", the same on every node
 *   of a cluster and on every resend.
 * - One delivery per cluster: in cluster mode only one node (the
 *   IntegrationsHooks.leads() one) runs the sinks; the others follow the
 *   cursor.
 *
 * Integrations never deliver the events their own sink brought in
 * (coreid "mqtt:NAME"). Everything runs on the loop's thread. Errors are
 * negative errno values. */
#pragma once

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>
#include <systemd/sd-event.h>

#include "journal.h"
#include "proto.h"

#define INTEGRATION_NAME_MAX 64    /* [A-Za-z0-9_-]{1,64} */
#define INTEGRATION_SECRET_MIN 16  /* bytes of a webhook's Secret= */
#define INTEGRATION_SECRET_MAX 256
#define INTEGRATION_ERROR_MAX 160  /* err[] buffers below */
#define INTEGRATION_RETRY_MAX_SEC 300
#define INTEGRATION_FAILING_AFTER 5

typedef enum IntegrationKind {
        INTEGRATION_WEBHOOK,
        INTEGRATION_MQTT,
} IntegrationKind;

/* One integration's configuration: a [Webhook NAME] or [MQTTBridge NAME]
 * section of tether-cloudd.conf, or a webhook made through the API
 * (docs/integrations.md lists every key and its default). Strings are
 * owned (integration_config_free()); NULL is "not set". */
typedef struct IntegrationConfig {
        char *name;
        IntegrationKind kind;
        bool from_api;       /* made through POST /v1/webhooks (table webhooks), not the file */
        char *prefix;        /* Prefix=: event name prefix; "" or NULL: every event */
        char *tag;           /* Tag=KEY or KEY=VALUE: only devices with that tag; NULL: all */
        /* Webhook. */
        char *url;           /* URL=: https://..., or http:// to a loopback address only */
        char *secret;        /* Secret=: HMAC-SHA256 key, INTEGRATION_SECRET_MIN..MAX bytes */
        char *ca_file;       /* CAFile=: the receiver's (webhook) or broker's (MQTT) CA; NULL: system CAs */
        unsigned timeout_sec; /* Timeout=: per request, 1..300, default 10 */
        /* MQTT bridge. */
        char *host;          /* Host= (required) */
        unsigned port;       /* Port=: default 8883 with TLS (CAFile=), 1883 without */
        char *cert_file;     /* CertFile=, KeyFile=: TLS client certificate (go together) */
        char *key_file;
        char *client_id;     /* ClientID=: default "tether-" + node name */
        char *user;          /* User=, Password= (go together) */
        char *password;
        char *topic;         /* Topic=: template, default "tether/{device}/{event}" */
        unsigned qos;        /* QoS=: 0 or 1, default 1 */
        unsigned protocol;   /* Protocol=: 4 (3.1.1, the default; "3.1.1" in the file) or 5 ("5") */
        char *subscribe;     /* Subscribe=: broker topic filter whose messages become cloud events */
        char *inbound_prefix; /* InboundPrefix=: their event names' prefix, default "mqtt/" */
} IntegrationConfig;

IntegrationConfig *integration_config_free(IntegrationConfig *c);
/* A copy of c: 0 and *ret, the caller's; -ENOMEM. */
int integration_config_dup(const IntegrationConfig *c, IntegrationConfig **ret);
static inline void integration_config_freep(IntegrationConfig **c) { integration_config_free(*c); }
/* Check a whole configuration (required keys, what goes together, URL
 * schemes, lengths, the name): 0, or -EINVAL with a message for a person
 * in err ("URL= must be https://, or http:// to a loopback address"). The
 * same checks for the file and the API. */
int integration_config_check(const IntegrationConfig *c, char err[static INTEGRATION_ERROR_MAX]);
/* Whether name is an integration's name: [A-Za-z0-9_-]{1,64}. */
bool integration_name_valid(const char *name);

typedef struct Integration Integration;
typedef struct Integrations Integrations;

/* What a kind of sink implements (sink-webhook.c, sink-mqtt.c). A sink is
 * made for one Integration and lives as long as it runs on this node. */
typedef struct SinkOps {
        const char *kind; /* "webhook", "mqtt" */
        /* Make the sink: config and owner are borrowed and outlive it.
         * node is this node's name (cluster) or NULL. May start connecting;
         * must not call back into owner from inside new(). */
        int (*new)(sd_event *event, const IntegrationConfig *config, const char *node, Integration *owner,
                   void **ret);
        void (*free)(void *sink);
        /* Deliver one event: body is its JSON (len bytes; valid during the
         * call only), key its idempotency key, e the event (for topics).
         * 0: taken, and integration_sent() will be called exactly once for
         * id, never from within send(); -EAGAIN: the sink's window is full
         * (nothing taken; the core tries again after the next
         * integration_sent()); another negative errno: not taken, treated
         * as a failed delivery. */
        int (*send)(void *sink, uint64_t id, const char *key, const ProtoEvent *e, const char *body, size_t len);
        /* Add what the sink shows about itself to obj ("url", "host",
         * "connected"...; never a secret or password). May be NULL. */
        void (*describe)(void *sink, json_t *obj);
} SinkOps;

extern const SinkOps sink_webhook_ops;
extern const SinkOps sink_mqtt_ops;

/* The sink's answer for event id: 0 delivered; a negative errno and a
 * short reason for people ("HTTP 500", "connection refused") when not.
 * May free nothing; safe to call from any sink callback on the loop. */
void integration_sent(Integration *in, uint64_t id, int error, const char *why);
/* The sink can deliver again (it reconnected): a retry that waits for
 * its backoff happens now. Cheap; never calls the sink from within. */
void integration_ready(Integration *in);
/* A message the sink received (MQTT Subscribe=): published as a cloud
 * event named config->inbound_prefix + name (coreid "mqtt:NAME"), data
 * len bytes (not NUL-terminated; must be UTF-8). 0 or a negative errno
 * (-E2BIG past [Events] MaxPayload, -EINVAL for a bad name or data, the
 * store's error). */
int integration_publish(Integration *in, const char *name, const char *data, size_t len);
/* The integration's name and configuration, for the sink's logs. */
const char *integration_name(const Integration *in);

/* What the cloud gives the integrations. */
typedef struct IntegrationsHooks {
        void *userdata;
        /* Store and route an event the cloud publishes (events_store()). */
        int (*publish)(void *userdata, const ProtoEvent *e);
        /* The device's tags: a new JSON object, NULL for none or unknown
         * (registry_tags()). */
        json_t *(*tags)(void *userdata, const char *device);
        /* Whether this node runs the sinks (always true on one node). May
         * be NULL: true. */
        bool (*leads)(void *userdata);
} IntegrationsHooks;

/* Make the integrations of config (its [Webhook]/[MQTTBridge] sections)
 * over journal (borrowed: outlives them), their cursors in store's table
 * integration_cursors. node: this node's name or NULL. hooks is copied. A
 * new integration starts at the journal's end (it gets the events
 * published from now on); a known one at its stored cursor. Logs what
 * fails. */
typedef struct CloudConfig CloudConfig;
typedef struct Store Store;
int integrations_new(sd_event *event, const CloudConfig *config, Journal *journal, Store *store,
                     const IntegrationsHooks *hooks, Integrations **ret);
/* Stores the cursors, frees every sink. NULL is fine; returns NULL. */
Integrations *integrations_free(Integrations *s);
static inline void integrations_freep(Integrations **s) { integrations_free(*s); }

/* Cluster mode: the leader puts each integration's cursor in the bucket
 * INTEGRATIONS_BUCKET (made here with replicas replicas, synchronously)
 * as it stores it, and the nodes in standby follow it, so that a node
 * that takes over resends at most what the last leader delivered in its
 * last STORE_BATCH_MSEC. bus is borrowed and must outlive s. Logs what
 * fails. */
#define INTEGRATIONS_BUCKET "TETHER_INTEGRATIONS"
typedef struct Bus Bus;
int integrations_share(Integrations *s, Bus *bus, unsigned replicas);

/* New events are in the journal (cheap; the reading happens later on the
 * loop). */
void integrations_kick(Integrations *s);
/* Add an integration made through the API (config taken, also on
 * failure): 0; -EEXIST (a name in use), -EINVAL (err says why), -ENOMEM. */
int integrations_add(Integrations *s, IntegrationConfig *config, char err[static INTEGRATION_ERROR_MAX]);
/* Remove one made through the API, its cursor with it: 0; -ENOENT; -EPERM
 * for one from the configuration file. */
int integrations_remove(Integrations *s, const char *name);
/* The tags of device changed (PUT /v1/devices/ID, or its row came from
 * another node): its cached tags are forgotten, the next event reads
 * them anew. NULL s is fine. */
void integrations_tags_changed(Integrations *s, const char *device);
/* A JSON array of objects, kind NULL for all ("webhook", "mqtt" for those)
 * and name NULL for all: {"name","kind","source":"config"|"api","prefix",
 * "tag","state":"ok"|"retrying"|"failing"|"standby","backlog","delivered",
 * "failures","lost","last_error","last_delivered_at","failing_since"} plus
 * what the sink describes. NULL on OOM. */
json_t *integrations_json(Integrations *s, const char *kind, const char *name);
