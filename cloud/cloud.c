/* SPDX-License-Identifier: Apache-2.0 */
/* The Cloud object (cloud.h): owns the sd-event loop, the configuration
 * and every module object, and wires them together through the modules'
 * hook structs, so that no module calls back into one above it. */
#include "config.h"

#include <pthread.h>
#include <sched.h>

#include <signal.h>
#include <systemd/sd-daemon.h>

#include "api.h"
#include "artifacts.h"
#include "bus.h"
#include "cloud.h"
#include "campaigns.h"
#include "cluster.h"
#include "devices.h"
#include "enroll.h"
#include "events.h"
#include "integrations.h"
#include "journal.h"
#include "journal-nats.h"
#include "log.h"
#include "ota.h"
#include "provision.h"
#include "registry.h"
#include "replica.h"
#include "stats.h"
#include "store.h"
#include "tunnel.h"
#include "util.h"
#include "webhooks.h"

struct Cloud {
        CloudConfig *config;
        sd_event *event;
        Store *store;
        Registry *registry;
        /* Provisioning tokens: the Api manages them, enrollment uses
         * them (both borrow this one). */
        Provision *provision;
        Enroll *enroll; /* NULL unless [Enroll] is configured */
        Journal *journal;
        Events *events;
        Integrations *integrations; /* [Webhook]/[MQTTBridge] and the API's webhooks */
        Devices *devices;
        Ota *ota;
        Campaigns *campaigns;
        Api *api;
        Tunnels *tunnels; /* tunnels and log streams, for the Api */
        /* Cluster mode ([Cluster] NATS=): NULL on a single node. */
        Bus *bus;
        EventLog *eventlog;
        Cluster *cluster;
        Replica *replica;
        Artifacts *artifacts; /* with [OTA] ArtifactDirectory= */
        unsigned coap_port, api_port, ota_port;
};

/* ---- DevicesHooks: devices towards events and OTA ----------------------- */

static void cloud_event_request(void *userdata, Device *d, const coap_pdu_t *request, const char *path,
                                coap_pdu_t *response) {
        Cloud *c = userdata;

        events_handle_request(c->events, d, request, path, response);
}

static void cloud_ota_request(void *userdata, Device *d, const coap_pdu_t *request, const char *job,
                              coap_pdu_t *response) {
        Cloud *c = userdata;

        ota_device_request(c->ota, d, request, job, response);
}

static void cloud_artifact_request(void *userdata, Device *d, const coap_pdu_t *request, const char *sha256,
                                   coap_pdu_t *response) {
        Cloud *c = userdata;

        ota_device_artifact(c->ota, d, request, sha256, response);
}

static void cloud_stream_request(void *userdata, Device *d, const coap_pdu_t *request, const char *sid,
                                 coap_pdu_t *response) {
        Cloud *c = userdata;

        if (c->tunnels)
                tunnels_device_request(c->tunnels, d, request, sid, response);
        else
                coap_pdu_set_code(response, COAP_RESPONSE_CODE(404));
}

static void cloud_device_gone(void *userdata, const Device *d) {
        Cloud *c = userdata;

        if (c->tunnels)
                tunnels_device_gone(c->tunnels, d);
        events_device_gone(c->events, d);
        (void)registry_disconnected(c->registry, device_id(d), device_last_heard(d));
        if (c->cluster)
                cluster_device_gone(c->cluster, device_id(d));
}

/* The cloud's own events about a device (tether/device/...): journaled
 * and routed like every event, private, from the device's ID. Takes data. */
static void cloud_publish(Cloud *c, const char *name, const char *device, json_t *data) {
        _cleanup_free_ char *text = data ? json_dumps(data, JSON_COMPACT) : NULL;
        char at[32];
        ProtoEvent e;
        int r;

        json_decref(data);
        if (!text) {
                log_warning("Out of memory publishing '%s' for device '%s'.", name, device);
                return;
        }
        proto_timestamp_now(at);
        e = (ProtoEvent){ .name = (char *)name, .data = text, .ttl = PROTO_DEFAULT_TTL, .private_ = true,
                          .published_at = at, .coreid = (char *)device };
        r = events_store(c->events, &e, NULL, 0, 0, NULL);
        if (r < 0)
                log_warning_errno(r, "Failed to store the event '%s' for device '%s', not routing it: %m", name, device);
}

/* ---- TunnelsHooks -------------------------------------------------------------- */

static void cloud_tunnel_publish(void *userdata, const char *name, const char *device, json_t *data) {
        cloud_publish(userdata, name, device, data);
}

static void cloud_tunnel_kick(void *userdata) {
        Cloud *c = userdata;

        api_kick(c->api);
}

static int cloud_peer_check(void *userdata, const TlsPeer *peer, char *reason, size_t reason_size) {
        Cloud *c = userdata;

        return registry_check(c->registry, peer, reason, reason_size);
}

/* Each handshake thread reads the registry through its own connection,
 * closed when the thread ends (before the Registry is freed: the Devices
 * stop their threads first). */
static pthread_key_t cloud_reader_key;
static pthread_once_t cloud_reader_once = PTHREAD_ONCE_INIT;
static int cloud_reader_key_ok;

static void cloud_reader_destroy(void *p) {
        registry_reader_free(p);
}

static void cloud_reader_init(void) {
        cloud_reader_key_ok = pthread_key_create(&cloud_reader_key, cloud_reader_destroy) == 0;
}

/* This thread's reader, opened on first use; NULL with r < 0. */
static RegistryReader *cloud_reader(Cloud *c, int *ret) {
        RegistryReader *rd;
        int r;

        pthread_once(&cloud_reader_once, cloud_reader_init);
        if (!cloud_reader_key_ok) {
                *ret = -ENOMEM;
                return NULL;
        }
        rd = pthread_getspecific(cloud_reader_key);
        if (rd)
                return rd;
        r = registry_reader_new(c->registry, &rd);
        if (r >= 0 && pthread_setspecific(cloud_reader_key, rd) != 0) {
                rd = registry_reader_free(rd);
                r = -ENOMEM;
        }
        *ret = r;
        return rd;
}

static void cloud_handshake_thread_start(void *userdata) {
        int r;

        if (!cloud_reader(userdata, &r))
                log_warning_errno(r, "A TLS handshake thread cannot read the device registry (%m): its "
                                     "handshakes refuse every device.");
}

static int cloud_peer_check_thread(void *userdata, const TlsPeer *peer, char *reason, size_t reason_size) {
        int r;
        RegistryReader *rd = cloud_reader(userdata, &r);

        if (!rd) {
                snprintf(reason, reason_size, "the device registry cannot be read");
                return r;
        }
        return registry_reader_check(rd, peer, reason, reason_size);
}

static void cloud_device_bound(void *userdata, Device *d, const TlsPeer *peer) {
        Cloud *c = userdata;

        (void)registry_connected(c->registry, peer, device_last_ip(d));
        if (c->cluster) {
                (void)device_set_elsewhere(d, NULL);
                cluster_device_bound(c->cluster, device_id(d), device_last_ip(d));
        }
        if (c->ota)
                ota_device_online(c->ota, d);
}

static void cloud_device_described(void *userdata, Device *d, const char *doc) {
        Cloud *c = userdata;

        if (registry_described(c->registry, device_id(d), doc) == -E2BIG)
                log_warning("Device '%s' describes itself in more than %u bytes: not keeping that across restarts.",
                            device_id(d), (unsigned)REGISTRY_DESCRIBE_MAX);
}

static void cloud_device_conflict(void *userdata, Device *d, const char *established, const char *newcomer,
                                  const char *outcome) {
        Cloud *c = userdata;

        cloud_publish(c, "tether/device/conflict", device_id(d),
                      json_pack("{s:s, s:s, s:s, s:s}", "device", device_id(d), "established", established,
                                "newcomer", newcomer, "outcome", outcome));
}

static void cloud_enroll_request(void *userdata, const char *address, const coap_pdu_t *request,
                                 coap_pdu_t *response) {
        Cloud *c = userdata;

        enroll_request(c->enroll, address, request, response);
}

static void cloud_cert_request(void *userdata, Device *d, const TlsPeer *peer, const char *address,
                               const coap_pdu_t *request, coap_pdu_t *response) {
        Cloud *c = userdata;

        enroll_cert_request(c->enroll, device_id(d), peer->pubkey[0] ? peer->pubkey : NULL, address, request,
                            response);
}

/* ---- EnrollHooks: enrollment towards devices ------------------------------------ */

static void cloud_cert_renewed(void *userdata, const char *id, int64_t not_after) {
        Cloud *c = userdata;
        Device *d = devices_find(c->devices, id);

        if (d)
                device_cert_renewed(d, not_after);
}

/* ---- RegistryHooks: the registry towards devices and events ------------------ */

static void cloud_device_revoked(void *userdata, const char *id, const char *reason, const char *actor) {
        Cloud *c = userdata;
        Device *d = devices_find(c->devices, id);

        log_notice("Device '%s' revoked by %s%s%s%s.", id, actor, reason ? " (" : "", reason ?: "", reason ? ")" : "");
        if (d && device_connected(d))
                device_disconnect(d, "revoked");
        cloud_publish(c, "tether/device/revoked", id,
                      json_pack("{s:s, s:s?, s:s}", "device", id, "reason", reason, "actor", actor));
}

static void cloud_device_unrevoked(void *userdata, const char *id, const char *actor) {
        Cloud *c = userdata;

        log_notice("Device '%s' unrevoked by %s.", id, actor);
        cloud_publish(c, "tether/device/unrevoked", id, json_pack("{s:s, s:s}", "device", id, "actor", actor));
}

static void cloud_device_updated(void *userdata, const char *id, json_t *changed, const char *actor) {
        Cloud *c = userdata;

        if (json_object_get(changed, "tags")) {
                integrations_tags_changed(c->integrations, id);
                /* Tunnels and log streams of tokens restricted by tags
                 * that no longer reach the device end. */
                (void)api_end_revoked_streams(c->api);
        }
        cloud_publish(c, "tether/device/updated", id,
                      json_pack("{s:s, s:O, s:s}", "device", id, "changed", changed, "actor", actor));
}

static void cloud_device_added(void *userdata, const char *id) {
        Cloud *c = userdata;

        if (!devices_add(c->devices, id, 0, NULL))
                log_warning("Out of memory listing device '%s'.", id);
}

static void cloud_known_device(void *userdata, const char *id, uint64_t last_heard_usec, const char *last_address,
                               const char *describe) {
        Cloud *c = userdata;
        Device *d = devices_add(c->devices, id, last_heard_usec, last_address);
        int r;

        if (!d) {
                log_warning("Out of memory listing device '%s'.", id);
                return;
        }
        if (describe && (r = device_restore_describe(d, describe)) < 0)
                log_warning_errno(r, "Device '%s': its recorded describe document cannot be used, ignoring it: %m",
                                  id);
}

/* ---- EventsHooks: events towards devices and event streams ---------------- */

static const char *cloud_device_id(void *userdata, const Device *d) {
        return device_id(d);
}

static int cloud_notify(void *userdata, Device *d, const uint8_t *token, size_t token_len, uint32_t observe,
                        const char *json, size_t len) {
        return device_notify(d, token, token_len, observe, json, len);
}

static void cloud_undeliverable(void *userdata, Device *d, const char *name, size_t len, int error) {
        device_event_undeliverable(d, name, len, error);
}

static void cloud_disconnect(void *userdata, Device *d, const char *reason) {
        device_disconnect(d, reason);
}

static void cloud_deliver_to_streams(void *userdata, const ProtoEvent *e, uint64_t id) {
        Cloud *c = userdata;

        api_deliver_event(c->api, e, id);
        integrations_kick(c->integrations);
}

/* ---- IntegrationsHooks: the integrations towards events and the registry ------ */

static int cloud_integration_publish(void *userdata, const ProtoEvent *e) {
        Cloud *c = userdata;

        return events_store(c->events, e, NULL, 0, 0, NULL);
}

/* One node of a cluster runs the sinks; not before the cluster is joined
 * and has heard the other nodes (cluster_leads()). */
static bool cloud_integration_leads(void *userdata) {
        Cloud *c = userdata;

        return !c->config->cluster_nats || (c->cluster && cluster_leads(c->cluster));
}

static json_t *cloud_integration_tags(void *userdata, const char *device) {
        Cloud *c = userdata;
        json_t *tags = NULL;

        return registry_tags(c->registry, device, &tags) < 0 ? NULL : tags;
}

/* ---- ClusterHooks: other nodes towards devices and the API ------------------- */

static void cloud_presence(void *userdata, const char *id, const char *node) {
        Cloud *c = userdata;
        Device *d = devices_find(c->devices, id);

        RegistryIdentity ident;

        if (!d && !node)
                return;
        /* A device this node's registry copy has not seen yet: listed when
         * its row comes (cloud_device_replicated()); an ID no registry
         * knows is not listed at all (anyone on NATS can write the bucket). */
        if (!d && (registry_identity(c->registry, id, &ident) < 0 || !ident.known))
                return;
        if (!d && !(d = devices_add(c->devices, id, 0, NULL))) {
                log_warning("Out of memory listing device '%s'.", id);
                return;
        }
        if (device_connected(d))
                return;
        if (device_set_elsewhere(d, node) < 0)
                log_warning("Out of memory recording where device '%s' is.", id);
}

static void cloud_superseded(void *userdata, const char *id, const char *node) {
        Cloud *c = userdata;
        Device *d = devices_find(c->devices, id);

        if (d && device_connected(d)) {
                log_notice("Device '%s' connected to cluster node '%s', ending its session here.", id, node);
                device_disconnect(d, "connected to another node");
        }
}

static void cloud_rpc(void *userdata, ClusterRpc *rpc, const char *op, const char *device, const char *name,
                      const char *arg, json_t *params) {
        Cloud *c = userdata;

        api_rpc(c->api, rpc, op, device, name, arg, params);
}

/* ---- cluster mode: the cluster's event journal (journal-nats.h) ----------- */

/* EventsHooks.store: every event goes to the stream; it is routed when it
 * comes back (cloud_eventlog_route()), on every node alike. */
static int cloud_eventlog_store(void *userdata, const ProtoEvent *e, uint64_t epoch, uint64_t seq,
                                bool *ret_duplicate) {
        Cloud *c = userdata;

        return eventlog_publish(c->eventlog, e, epoch, seq, ret_duplicate);
}

/* EventLogHooks.route: as events_store() routes on one node. The source
 * (who does not get its own event back) is the device the coreid names,
 * as events.c and ota.c pass it; the API and the MQTT inbox are none. */
static void cloud_eventlog_route(void *userdata, const ProtoEvent *e, uint64_t id) {
        Cloud *c = userdata;
        const Device *source = NULL;

        if (e->coreid && !streq(e->coreid, "api") && !streq(e->coreid, EVENTLOG_MQTT_SOURCE))
                source = devices_find(c->devices, e->coreid);
        events_route(c->events, e, source, id);
}

static void cloud_bus_connection(void *userdata, bool up);

/* Cluster mode: connect to NATS and follow the cluster's event journal
 * (before the Events exist: they store through it). */
static int cloud_eventlog_start(Cloud *c) {
        const CloudConfig *cfg = c->config;
        BusConfig bc = {
                .servers = cfg->cluster_nats,
                .name = cfg->cluster_node,
                .user = cfg->cluster_user,
                .password = cfg->cluster_password,
                .ca_file = cfg->cluster_ca_file,
        };
        int r;

        r = bus_new(c->event, &bc, &(BusHooks){ .userdata = c, .connection = cloud_bus_connection }, &c->bus);
        if (r < 0)
                return r;
        return eventlog_new(c->event, cfg, c->bus, c->journal, cfg->cluster_node,
                            &(EventLogHooks){ .userdata = c, .route = cloud_eventlog_route }, &c->eventlog);
}

/* ---- OtaHooks: OTA towards the HTTP API ------------------------------------ */

/* NULL while the Api is not made yet or gone: then it has nothing to run. */
static void cloud_kick_api(void *userdata) {
        Cloud *c = userdata;

        api_kick(c->api);
}

/* ---- OtaJobHooks: OTA jobs towards the campaigns ------------------------------ */

static void cloud_job_changed(void *userdata, const char *id, const char *device, const char *state) {
        Cloud *c = userdata;

        campaigns_job_changed(c->campaigns, id, device, state);
}

static int cloud_job_manifest(void *userdata, const char *id, const char *device, const char **text, size_t *len) {
        Cloud *c = userdata;

        return campaigns_job_manifest(c->campaigns, id, device, text, len);
}

static bool cloud_job_may_send(void *userdata, const char *id) {
        Cloud *c = userdata;

        return campaigns_may_send(c->campaigns, id);
}

/* The node that leads drives the campaigns, once its copy of the
 * replicated state caught up with the stream (docs/cluster.md,
 * "Campaigns"). */
static bool cloud_campaigns_lead(void *userdata) {
        Cloud *c = userdata;

        return c->cluster && c->replica && replica_ready(c->replica) && cluster_leads(c->cluster);
}

/* ---- ReplicaHooks, BusHooks: the cluster's state towards the modules --------- */

/* A device row another node changed: a revoked device's session here
 * closes (its next handshake is refused by registry_check(), which reads
 * the table); a new one is listed. The revoking node published the event. */
static void cloud_device_replicated(Cloud *c, const char *id) {
        RegistryIdentity ident;
        Device *d;

        if (registry_identity(c->registry, id, &ident) < 0 || !ident.known)
                return;
        integrations_tags_changed(c->integrations, id);
        d = devices_find(c->devices, id);
        if (!d && !(d = devices_add(c->devices, id, 0, NULL))) {
                log_warning("Out of memory listing device '%s'.", id);
                return;
        }
        /* Its presence may have come before its row. */
        if (!device_connected(d) && c->cluster && device_set_elsewhere(d, cluster_device_node(c->cluster, id)) < 0)
                log_warning("Out of memory recording where device '%s' is.", id);
        /* What it offers and runs on, as the node that has it recorded:
         * this node's device list shows it and filters by it too. */
        if (!device_connected(d)) {
                _cleanup_free_ char *doc = NULL;

                if (registry_describe_doc(c->registry, id, &doc) == 0 && doc && device_restore_describe(d, doc) < 0)
                        log_debug("Device '%s': the describe document another node recorded is not usable.", id);
        }
        if (ident.revoked && device_connected(d)) {
                log_notice("Device '%s' was revoked on another node%s%s%s; closing its session.", id,
                           ident.revoked_reason[0] ? " (" : "", ident.revoked_reason,
                           ident.revoked_reason[0] ? ")" : "");
                device_disconnect(d, "revoked");
        }
}

/* ---- the webhooks made through the API (webhooks.h) ------------------------ */

/* webhooks_foreach() at start: each row runs (config taken). One that
 * cannot is logged and left in the table (DELETE /v1/webhooks/NAME). */
static int cloud_webhook_load(void *userdata, IntegrationConfig *config) {
        Cloud *c = userdata;
        char err[INTEGRATION_ERROR_MAX] = "", name[INTEGRATION_NAME_MAX + 1];
        int r;

        snprintf(name, sizeof(name), "%s", config->name);
        r = integrations_add(c->integrations, config, err);
        if (r == -EEXIST)
                log_warning("Webhook '%s' of the API is not started: an integration of the configuration file has "
                            "its name.", name);
        else if (r < 0)
                log_warning_errno(r, "Webhook '%s' of the API is not started: %s", name, err[0] ? err : "%m");
        return r == -ENOMEM ? r : 0;
}

/* A row of the table webhooks another node changed: the webhook starts,
 * stops, or starts again with what the row now says. */
static void cloud_webhook_replicated(Cloud *c, ReplicaOp op, const char *name) {
        _cleanup_(integration_config_freep) IntegrationConfig *config = NULL;
        char err[INTEGRATION_ERROR_MAX] = "";
        int r;

        r = webhooks_get(c->store, name, &config);
        if (r == -ENOENT) {
                r = integrations_remove(c->integrations, name);
                if (r == 0)
                        log_info("Webhook '%s' was deleted on another node; stopped it.", name);
                else if (r != -ENOENT)
                        log_warning_errno(r, "Webhook '%s' was deleted on another node, but cannot stop here: %m",
                                          name);
                return;
        }
        if (r < 0) {
                log_warning_errno(r, "Cannot read webhook '%s', which another node changed: %m", name);
                return;
        }
        /* Changed (two nodes made it at once, the stream's order decided
         * which values stay): again, with them. */
        if (op == REPLICA_UPDATE && integrations_remove(c->integrations, name) == -EPERM) {
                log_warning("Webhook '%s' made on another node is not started here: an integration of the "
                            "configuration file has its name.", name);
                return;
        }
        r = integrations_add(c->integrations, TAKE_PTR(config), err);
        if (r == 0)
                log_info("Webhook '%s' was made on another node; started it.", name);
        else if (r == -EEXIST)
                log_debug("Webhook '%s' changed on another node runs here already.", name);
        else
                log_warning_errno(r, "Webhook '%s' made on another node is not started here: %s", name,
                                  err[0] ? err : "%m");
}

static void cloud_replica_applied(void *userdata, const char *table, ReplicaOp op, const char *key) {
        Cloud *c = userdata;

        if (streq(table, "devices"))
                cloud_device_replicated(c, key);
        else if (streq(table, "tokens"))
                api_token_changed(c->api, key);
        else if (streq(table, "ota_jobs"))
                ota_job_changed(c->ota, key);
        else if (streq(table, "webhooks"))
                cloud_webhook_replicated(c, op, key);
        else if (streq(table, "campaigns") || streq(table, "campaign_devices"))
                campaigns_replicated(c->campaigns, table, key);
        /* provision_tokens: read from the table on every use. */
}

static void cloud_bus_connection(void *userdata, bool up) {
        Cloud *c = userdata;

        if (up && c->replica)
                replica_kick(c->replica);
        if (up && c->cluster)
                cluster_resync(c->cluster);
}

/* ---- signals -------------------------------------------------------------- */

static int cloud_signal_cb(sd_event_source *s, const struct signalfd_siginfo *si, void *userdata) {
        log_info("Received %s, stopping.", strsignal((int)si->ssi_signo));
        return sd_event_exit(sd_event_source_get_event(s), 0);
}

/* SIGHUP: read the API tokens and the TLS files again. Event streams
 * opened with a token that is gone end; device sessions, calls in flight
 * and the other event streams go on as they were; new device sessions
 * use the new TLS files (a bad one keeps those loaded before). */
static int cloud_reload_cb(sd_event_source *s, const struct signalfd_siginfo *si, void *userdata) {
        Cloud *c = userdata;
        size_t before = c->config->n_tokens;

        (void)sd_notifyf(0, "RELOADING=1\nMONOTONIC_USEC=%llu", now_usec());
        if (cloud_config_reload_tokens(c->config) < 0)
                log_error("Reload failed, keeping the %zu API token(s) loaded before.", before);
        else {
                log_info("Reloaded %zu API token(s) from '%s'.", c->config->n_tokens, c->config->token_file);
                if (c->config->metrics_token_file)
                        log_info("Reloaded %zu metrics token(s) from '%s'.", c->config->n_metrics_tokens,
                                 c->config->metrics_token_file);
                log_info("Closed %u event stream(s) whose token was removed.", api_end_revoked_streams(c->api));
        }
        (void)devices_reload_tls(c->devices);
        (void)sd_notify(0, "READY=1");
        return 0;
}

/* ---- the object ------------------------------------------------------------- */

Cloud *cloud_free(Cloud *c) {
        if (!c)
                return NULL;
        /* Users first (they hold calls to devices; the Api's requests hold
         * the Ota's), then devices (whose sessions hold subscriptions), then
         * events and the journal. */
        c->eventlog = eventlog_free(c->eventlog); /* nothing comes from the stream */
        c->api = api_free(c->api);
        /* After the Api (whose requests hold streams), before devices
         * (streams hold calls to them). */
        c->tunnels = tunnels_free(c->tunnels);
        if (c->ota)
                ota_set_job_hooks(c->ota, NULL);
        c->campaigns = campaigns_free(c->campaigns);
        c->ota = ota_free(c->ota);
        c->artifacts = artifacts_free(c->artifacts);
        c->devices = devices_free(c->devices);
        c->enroll = enroll_free(c->enroll);
        c->registry = registry_free(c->registry);
        c->provision = provision_free(c->provision);
        /* Before events (they publish) and the journal (their cursors). */
        c->integrations = integrations_free(c->integrations);
        c->events = events_free(c->events);
        /* What the modules wrote while they stopped (devices' last
         * heard) is committed while the Replica still records it. */
        if (c->store)
                (void)store_commit(c->store);
        c->replica = replica_free(c->replica);
        c->cluster = cluster_free(c->cluster);
        c->journal = journal_free(c->journal);
        c->bus = bus_free(c->bus);
        c->store = store_free(c->store);
        stats_done();
        sd_event_unref(c->event);
        cloud_config_free(c->config);
        free(c);
        return NULL;
}

/* Cluster mode, once every module is made: the replicated state, presence
 * and routing, artifacts (docs/cluster.md). */
static int cloud_join_cluster(Cloud *c) {
        const CloudConfig *config = c->config;
        ClusterHooks ch = {
                .userdata = c,
                .presence = cloud_presence,
                .superseded = cloud_superseded,
                .rpc = cloud_rpc,
        };
        int r;

        /* After every module made its tables. */
        r = replica_new(c->event, c->store, c->bus, config->cluster_node, config->cluster_replicas,
                        &(ReplicaHooks){ .userdata = c, .applied = cloud_replica_applied }, &c->replica);
        if (r < 0)
                return r;
        r = cluster_new(c->event, config, c->bus, &ch, &c->cluster);
        if (r < 0)
                return r;
        api_set_cluster(c->api, c->cluster);
        if (config->ota_dir) {
                r = artifacts_new(c->event, c->bus, config->ota_dir, config->cluster_node, config->cluster_replicas,
                                  config->cluster_artifact_max_mb ? (uint64_t)config->cluster_artifact_max_mb << 20 : UINT64_MAX,
                                  (uint64_t)config->ota_max_artifact_mb << 20, &c->artifacts);
                if (r < 0)
                        return r;
        }
        ota_set_cluster(c->ota, c->artifacts);
        if (c->integrations) {
                r = integrations_share(c->integrations, c->bus, config->cluster_replicas);
                if (r < 0)
                        return r;
        }
        return 0;
}

/* The CPUs the cgroup v2 quota of this process's own cgroup allows
 * (cpu.max "QUOTA PERIOD", rounded up), or 0 for no quota or none found. */
static long cloud_cgroup_cpus(void) {
        _cleanup_fclose_ FILE *f = fopen("/proc/self/cgroup", "re");
        _cleanup_free_ char *line = NULL, *path = NULL;
        size_t size = 0;
        long long quota, period;
        char max[32];

        while (f && getline(&line, &size, f) > 0)
                if (strncmp(line, "0::", 3) == 0) {
                        line[strcspn(line, "\n")] = 0;
                        if (asprintf(&path, "/sys/fs/cgroup%s/cpu.max", line + 3) < 0)
                                path = NULL;
                        break;
                }
        if (!path)
                return 0;
        fclose(TAKE_PTR(f));
        f = fopen(path, "re");
        if (!f || fscanf(f, "%31s %lld", max, &period) != 2 || streq(max, "max") || period <= 0)
                return 0;
        quota = strtoll(max, NULL, 10);
        return quota > 0 ? (long)((quota + period - 1) / period) : 0;
}

/* HandshakeThreads= unset: one thread per CPU this process may use (its
 * affinity mask, which a cpuset or systemd's CPUAffinity= narrows, and its
 * cgroup's CPU quota, CPUQuota=), less the event loop's; none on one CPU,
 * at most 16 (more is for an explicit setting). Measured in
 * docs/design/benchmarks.md, "Handshakes on threads". */
static unsigned cloud_default_handshake_threads(void) {
        cpu_set_t set;
        long n = 0, quota = cloud_cgroup_cpus();

        if (sched_getaffinity(0, sizeof(set), &set) == 0)
                n = CPU_COUNT(&set);
        if (n <= 0)
                n = sysconf(_SC_NPROCESSORS_ONLN);
        if (quota > 0 && quota < n)
                n = quota;
        return n <= 1 ? 0 : n - 1 > 16 ? 16 : (unsigned)(n - 1);
}

int cloud_new(CloudConfig *config, Cloud **ret) {
        _cleanup_(cloud_freep) Cloud *c = NULL;
        DevicesHooks dh;
        RegistryHooks rh;
        EventsHooks eh;
        OtaHooks oh;
        int r;

        c = calloc(1, sizeof(*c));
        if (!c) {
                cloud_config_free(config);
                return log_error_errno(-ENOMEM, "Out of memory.");
        }
        c->config = config;
        dh = (DevicesHooks){
                .userdata = c,
                .event_request = cloud_event_request,
                .ota_request = cloud_ota_request,
                .artifact_request = cloud_artifact_request,
                .stream_request = cloud_stream_request,
                .device_gone = cloud_device_gone,
                .peer_check = cloud_peer_check,
                .peer_check_thread = cloud_peer_check_thread,
                .handshake_thread_start = cloud_handshake_thread_start,
                .device_bound = cloud_device_bound,
                .described = cloud_device_described,
                .device_conflict = cloud_device_conflict,
                .enroll_request = cloud_enroll_request,
                .cert_request = cloud_cert_request,
        };
        rh = (RegistryHooks){
                .userdata = c,
                .revoked = cloud_device_revoked,
                .unrevoked = cloud_device_unrevoked,
                .added = cloud_device_added,
                .updated = cloud_device_updated,
        };
        eh = (EventsHooks){
                .userdata = c,
                .device_id = cloud_device_id,
                .notify = cloud_notify,
                .undeliverable = cloud_undeliverable,
                .disconnect = cloud_disconnect,
                .deliver_to_streams = cloud_deliver_to_streams,
                /* No flush: device_notify() already wakes the shard of
                 * each device it sent to; waking all of them per event
                 * was work on the hot path for nothing. */
        };
        oh = (OtaHooks){
                .userdata = c,
                .kick_api = cloud_kick_api,
        };

        r = sd_event_default(&c->event);
        if (r < 0)
                return log_error_errno(r, "Failed to create the event loop: %m");
        r = sd_event_add_signal(c->event, NULL, SIGTERM, cloud_signal_cb, NULL);
        if (r >= 0)
                r = sd_event_add_signal(c->event, NULL, SIGINT, cloud_signal_cb, NULL);
        if (r >= 0)
                r = sd_event_add_signal(c->event, NULL, SIGHUP, cloud_reload_cb, c);
        if (r >= 0)
                r = sd_event_set_watchdog(c->event, true);
        if (r < 0)
                return log_error_errno(r, "Failed to set up the event loop: %m");

        r = stats_init();
        if (r >= 0)
                r = stats_loop_probe_start(c->event, 0);
        if (r < 0)
                return log_error_errno(r, "Failed to set up the metrics: %m");
        r = journal_new(c->event, config, &c->journal);
        if (r < 0)
                return r;
        /* After the journal, whose lock on the state directory keeps a
         * second tether-cloudd out of the database too. */
        r = store_open(c->event, config->state_dir, &c->store);
        if (r < 0)
                return r;
        store_audit_set_retention(c->store, config->audit_max_records, config->audit_max_age_days);
        (void)store_audit_prune(c->store);
        r = registry_new(c->store, config->registration_enrolled ? REGISTRY_ENROLLED : REGISTRY_OPEN, &rh,
                         &c->registry);
        if (r < 0)
                return r;
        if (config->handshake_threads > 0) {
                /* The handshake threads read the registry through their own
                 * connections: fail here rather than refuse every device. */
                bool chosen = config->handshake_threads == CLOUD_HANDSHAKE_THREADS_AUTO;
                RegistryReader *rd = NULL;

                if (chosen)
                        config->handshake_threads = cloud_default_handshake_threads();
                r = config->handshake_threads > 0 ? registry_reader_new(c->registry, &rd) : 0;
                if (r < 0 && chosen) {
                        log_internal(LOG_NOTICE, r, "The device registry cannot be read from other threads (%m): TLS "
                                            "handshakes run in the event loop.");
                        config->handshake_threads = 0;
                } else if (r < 0)
                        return log_error_errno(r, "HandshakeThreads=%u: the handshake threads cannot read the "
                                               "device registry: %m", config->handshake_threads);
                registry_reader_free(rd);
        }
        r = provision_open(c->store, &c->provision);
        if (r < 0)
                return r;
        /* Before the Replica, which records the table. */
        r = webhooks_open(c->store);
        if (r < 0)
                return r;
        if (config->cluster_nats) {
                r = cloud_eventlog_start(c);
                if (r < 0)
                        return r;
                eh.store = cloud_eventlog_store;
        }
        if (config->enroll_enabled) {
                r = enroll_new(c->event, config, c->store, c->registry, c->provision,
                               &(EnrollHooks){ .userdata = c, .renewed = cloud_cert_renewed }, &c->enroll);
                if (r < 0)
                        return r;
        }
        r = events_new(config, c->journal, &eh, &c->events);
        if (r < 0)
                return log_error_errno(r, "Failed to set up the event router: %m");
        r = integrations_new(c->event, config, c->journal, c->store,
                             &(IntegrationsHooks){ .userdata = c,
                                                   .publish = cloud_integration_publish,
                                                   .tags = cloud_integration_tags,
                                                   .leads = config->cluster_nats ? cloud_integration_leads : NULL },
                             &c->integrations);
        if (r < 0)
                return r;
        r = devices_new(c->event, config, &dh, &c->coap_port, &c->devices);
        if (r < 0)
                return r;
        /* Known devices are listed, offline, before any connects. */
        r = registry_foreach(c->registry, cloud_known_device, c);
        if (r < 0)
                return log_error_errno(r, "Cannot read the device registry.");
        r = ota_new(c->event, config, c->store, c->journal, c->devices, c->events, &oh, &c->ota_port, &c->ota);
        if (r < 0)
                return r;
        r = campaigns_new(c->event, config, c->store, c->ota, c->devices, c->events,
                          &(CampaignsHooks){ .userdata = c,
                                             .leads = config->cluster_nats ? cloud_campaigns_lead : NULL },
                          &c->campaigns);
        if (r < 0)
                return r;
        ota_set_job_hooks(c->ota, &(OtaJobHooks){ .userdata = c, .job_changed = cloud_job_changed,
                                                  .may_send = cloud_job_may_send, .manifest = cloud_job_manifest });
        /* The webhooks made through the API, next to the file's. */
        r = webhooks_foreach(c->store, cloud_webhook_load, c);
        if (r < 0)
                return log_error_errno(r, "Cannot read the webhooks made through the API: %m");
        r = tunnels_new(c->event, config, c->devices, c->store,
                        &(TunnelsHooks){ .userdata = c, .publish = cloud_tunnel_publish, .kick_api = cloud_tunnel_kick },
                        &c->tunnels);
        if (r < 0)
                return log_error_errno(r, "Failed to set up tunnels: %m");
        r = api_new(c->event, config, c->store, c->registry, c->provision, c->journal, c->devices, c->events, c->ota,
                    &c->api_port, &c->api);
        if (r < 0)
                return r;
        api_set_tunnels(c->api, c->tunnels);
        api_set_integrations(c->api, c->integrations);
        api_set_campaigns(c->api, c->campaigns);
        if (config->cluster_nats) {
                r = cloud_join_cluster(c);
                if (r < 0)
                        return r;
        }
        *ret = TAKE_PTR(c);
        return 0;
}

int cloud_run(Cloud *c) {
        char handshakes[48] = "in the event loop";
        int r;

        if (c->config->handshake_threads > 0)
                snprintf(handshakes, sizeof(handshakes), "on %u thread%s", c->config->handshake_threads,
                         c->config->handshake_threads == 1 ? "" : "s");
        log_info("Listening for devices on %s port %u (TLS handshakes %s), %s API on %s port %u.",
                 c->config->coap_listen, c->coap_port, handshakes, c->config->api_cert_file ? "HTTPS" : "HTTP",
                 c->config->api_listen, c->api_port);
        (void)sd_notifyf(0,
                         "READY=1\n"
                         "STATUS=Listening: devices on port %u, API on port %u; 0 devices online\n"
                         "X_COAP_PORT=%u\n"
                         "X_API_PORT=%u\n"
                         "X_OTA_PORT=%u",
                         c->coap_port, c->api_port, c->coap_port, c->api_port, c->ota_port);

        r = sd_event_loop(c->event);
        if (r < 0)
                log_error_errno(r, "Event loop failed: %m");
        (void)sd_notify(0, "STOPPING=1\nSTATUS=Stopping");
        return r;
}
