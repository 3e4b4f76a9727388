/* SPDX-License-Identifier: Apache-2.0 */
/* The HTTP API (api.c, api-list.c; prefix api_): libmicrohttpd in
 * external epoll mode on the sd-event loop, Particle Cloud API shapes
 * (docs/protocol.md, docs/cloud.md): device calls, publishes, event
 * streams (SSE, replayed from the journal after Last-Event-ID), the
 * device list, /metrics, and OTA's /v1/ota/... requests handed to the Ota.
 * Requests waiting for a device and idle event streams are suspended, and
 * resumed when the answer, a timeout or an event arrives. The parsing of
 * requests is pure and lives in api-request.h.
 *
 * An Api object owns the HTTP daemon, its event sources, every request
 * and the index of open event streams. It calls Devices, Events, the
 * Journal and the Ota directly; nothing calls back into it but the Cloud
 * object (cloud.c), which forwards events to the streams and Ota's kicks.
 * Errors are negative errno values; ret_* parameters are untouched on
 * failure. */
#pragma once

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <systemd/sd-event.h>

#include "cloud-config.h"
#include "devices.h"
#include "events.h"
#include "integrations.h"
#include "inventory.h"
#include "journal.h"
#include "ota.h"
#include "proto.h"
#include "provision.h"
#include "registry.h"
#include "store.h"
#include "tokens.h"

typedef struct Api Api;

/* Start the HTTP API; *ret_port is the bound port. event, config, store,
 * registry, provision, journal, devices, events and ota are borrowed and
 * must outlive the Api. Logs what failed; *ret is the caller's
 * (api_free()). */
int api_new(sd_event *event, const CloudConfig *config, Store *store, Registry *registry, Provision *provision,
            Journal *journal, Devices *devices, Events *events, Ota *ota, unsigned *ret_port, Api **ret);
/* Answer or drop every open request (pending device calls are cancelled,
 * event streams end cleanly, Ota's waiting requests are resumed) and stop
 * the HTTP server. NULL is fine; returns NULL. */
Api *api_free(Api *api);
static inline void api_freep(Api **api) { api_free(*api); }

/* Queue an event (journal id) for every matching SSE client that is not
 * catching up from the journal. */
void api_deliver_event(Api *api, const ProtoEvent *e, uint64_t id);
/* End every event stream whose token is no longer valid (after a reload
 * of the token files, a revocation through the API, its expiry): cleanly,
 * after what is already queued for it. Returns how many were ended. */
unsigned api_end_revoked_streams(Api *api);
/* The API token id changed in the database under the Api (another node of
 * the cluster created, used or revoked it): the Api's tokens learn it, and
 * event streams of a revoked one end. */
void api_token_changed(Api *api, const char *id);
/* Run the HTTP server soon (after resuming a connection from outside). */
void api_kick(Api *api);

/* Cluster mode (docs/cluster.md): requests for a device another node
 * holds go there through cluster (borrowed; must outlive the Api, NULL:
 * a single node), and api_rpc() runs such a request from another node on
 * this one (op "call", "var", "device", or "ota" with the parameters of
 * PUT /v1/devices/ID in params), answering it through rpc once done,
 * exactly as this node's API would have answered it over HTTP. */
typedef struct Cluster Cluster;
typedef struct ClusterRpc ClusterRpc;
void api_set_cluster(Api *api, Cluster *cluster);
/* The outbound integrations (integrations.h, borrowed: freed after the
 * Api), for /v1/webhooks and /v1/integrations. */
typedef struct Integrations Integrations;
void api_set_integrations(Api *api, Integrations *integrations);
/* The Campaigns (borrowed, must outlive the Api), for /v1/campaigns. */
typedef struct Campaigns Campaigns;
void api_set_campaigns(Api *api, Campaigns *campaigns);
/* The Tunnels (borrowed, must outlive the Api; NULL: none), for
 * /v1/devices/ID/{tunnel,logs,tunnels}. */
typedef struct Tunnels Tunnels;
void api_set_tunnels(Api *api, Tunnels *tunnels);
void api_rpc(Api *api, ClusterRpc *rpc, const char *op, const char *device, const char *name, const char *arg,
             json_t *params);

/* ---- api-list.c ---------------------------------------------------------- */

/* GET /v1/devices?page=N&per_page=M (Particle's product device list):
 * either present asks for a page. */
#define API_PAGE_DEFAULT_PER_PAGE 25
#define API_PAGE_MAX_PER_PAGE 1000
#define API_PAGE_MAX 1000000000
typedef struct ApiPage {
        bool paged;
        size_t page;     /* 1 first */
        size_t per_page;
} ApiPage;
/* page and per_page as given (NULL: absent). 0, or -EINVAL with a message
 * for the client (a static string). */
int api_parse_page(const char *page, const char *per_page, ApiPage *ret, const char **ret_error);
/* One page of devices as the paged GET /v1/devices answers it:
 * {"devices": page, "meta": {total_pages, page, per_page, total}} of total
 * devices in all. Takes page (also on failure). NULL on OOM. */
json_t *api_page_json(json_t *page, size_t total, const ApiPage *p);
/* The response to GET /v1/devices (api-list.c): the plain array of every
 * device unless p->paged, else one page and its meta. NULL on OOM. */
json_t *api_devices_list(Devices *devs, const ApiPage *p);

/* GET /v1/devices with filters (inventory.h; f->any): the devices that
 * pass f, each with the registry's fields (registry_device_json()), in
 * the order of the unfiltered list (a restricted token's: its list,
 * api_devices_list_restricted()), whole or paged as api_devices_list().
 * Costs every device the token lists. 0 and *ret; -ENOMEM, -EIO. */
int api_devices_list_filtered(Devices *devs, Registry *reg, const TokenAuth *auth, const InventoryFilter *f,
                              const ApiPage *p, json_t **ret);

/* ---- api-admin.c ---------------------------------------------------------- */

/* The admin requests; each returns the HTTP status and sets *ret_body (a
 * new JSON value, the caller's; NULL on OOM). */
/* POST /v1/tokens: params (borrowed) name the token; actor is who asks
 * ("token:ID"); on success ret_id is the new token's id. */
unsigned api_tokens_create(Tokens *t, json_t *params, const char *actor, char ret_id[static TOKENS_ID_MAX + 1],
                           json_t **ret_body);
/* GET /v1/tokens */
unsigned api_tokens_list(Tokens *t, json_t **ret_body);
/* DELETE /v1/tokens/ID */
unsigned api_tokens_revoke(Tokens *t, const char *id, json_t **ret_body);
/* GET /v1/audit?after=ID&limit=N&action=PREFIX&target=X: the query
 * parameters as given (NULL: absent). */
unsigned api_audit_query(Store *s, const char *after, const char *limit, const char *action, const char *target,
                         json_t **ret_body);
/* ---- api-provision.c ------------------------------------------------------ */

/* The provisioning token requests, each as the admin requests above.
 * POST /v1/provision: params (borrowed), actor who asks ("token:ID"); on
 * success (201) ret_id is the new token's id. */
unsigned api_provision_create(Provision *p, json_t *params, const char *actor,
                              char ret_id[static PROVISION_ID_MAX + 1], json_t **ret_body);
/* GET /v1/provision */
unsigned api_provision_list(Provision *p, json_t **ret_body);
/* GET /v1/provision/ID */
unsigned api_provision_get(Provision *p, const char *id, json_t **ret_body);
/* DELETE /v1/provision/ID */
unsigned api_provision_revoke(Provision *p, const char *id, const char *actor, json_t **ret_body);

/* ---- api-webhooks.c ------------------------------------------------------- */

/* The webhook and integration requests (admin), each as the admin
 * requests above; s may be NULL (no integrations: empty lists, 503 for a
 * creation), store holds the table webhooks (webhooks.h).
 * GET /v1/webhooks (kind "webhook"), GET /v1/integrations (kind NULL). */
unsigned api_integrations_list(Integrations *s, Store *store, const char *kind, json_t **ret_body);
/* GET /v1/webhooks/NAME */
unsigned api_webhook_get(Integrations *s, Store *store, const char *name, json_t **ret_body);
/* POST /v1/webhooks: params (borrowed), actor who asks ("token:ID"); on
 * success (201, the only answer that holds the secret) ret_name is the
 * new webhook's name. */
unsigned api_webhooks_create(Integrations *s, Store *store, json_t *params, const char *actor,
                             char ret_name[static INTEGRATION_NAME_MAX + 1], json_t **ret_body);
/* DELETE /v1/webhooks/NAME: 200 {"ok":true,"name"}; 404; 409 for one of
 * the configuration file. */
unsigned api_webhooks_delete(Integrations *s, Store *store, const char *name, json_t **ret_body);

/* GET /v1/devices for a restricted token: the devices it lists that the
 * cloud knows, in the token's order, then those of its tags
 * (registry_foreach_tagged(): one query), in the registry's order; the
 * shapes of api_devices_list(). 0 and *ret; -ENOMEM, -EIO (the
 * registry). */
int api_devices_list_restricted(Devices *devs, Registry *reg, const TokenAuth *auth, const ApiPage *p, json_t **ret);
