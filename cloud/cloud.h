/* SPDX-License-Identifier: Apache-2.0 */
/* tether-cloudd: the reference device cloud. Modules, each one object
 * created with *_new() and freed with *_free(), and their prefixes:
 *   config.c   cloud_config_  keyfile, command line, API tokens (cloud-config.h)
 *   journal.c  journal_  the event journal: de-duplication, SSE replay (journal.h)
 *   journal-seek.c journal_seek_ where to start reading the journal for an id
 *   journal-nats.c eventlog_ cluster mode: the event journal on JetStream, the MQTT inbox (journal-nats.h)
 *   events.c   events_   device publish/subscribe and the event router (events.h)
 *   devices.c  devices_  libcoap server, device registry, requests to devices (devices.h)
 *   subscriptions.c sub_ the index of subscriptions by prefix (subscriptions.h)
 *   api.c      api_      HTTP API on libmicrohttpd (Particle Cloud API shapes) (api.h)
 *   api-request.c api_   parsing and routing of API requests, pure (api-request.h)
 *   api-list.c api_      GET /v1/devices, whole or by page (api.h)
 *   api-admin.c api_     /v1/tokens, /v1/audit, a restricted token's device list (api.h)
 *   api-provision.c api_ /v1/provision[/ID]: provisioning tokens through the API (api.h)
 *   tokens.c   tokens_   API tokens: the token files' and cloud.db's, scopes, expiry (tokens.h)
 *   provision.c provision_ provisioning tokens: what lets a device enroll (provision.h)
 *   ratelimit.c ratelimit_ token buckets by key, for the API's rate limits (ratelimit.h)
 *   scopes.c   scope_    token scopes and their names, pure (scopes.h)
 *   ota.c      ota_      OTA jobs, status reports, artifact hosting over HTTPS (ota.h)
 *   campaigns.c campaigns_ phased rollouts of one update to many devices, through Ota (campaigns.h)
 *   mhd-log.c  mhd_log   libmicrohttpd's messages, for api.c and ota.c (mhd-log.h)
 *   stats.c    stats_    the process-wide metrics registry (stats.h)
 *   store.c    store_    the SQLite database: schema steps, batched commits, audit log (store.h)
 *   registry.c registry_ the persistent device registry: policy, revocation (registry.h)
 *   cloud.c    cloud_    the Cloud object: the loop, signals, sd_notify, the wiring
 *   main.c               command line, process setup
 *
 * Dependencies point one way (a -> b: a calls b directly); calls the other
 * way go through hook structs that cloud.c implements:
 *
 *   Cloud ---owns---> Api, Ota, Campaigns, Devices, Registry, Provision, Events, Journal, Store, CloudConfig
 *   Api ----> Ota, Campaigns, Devices, Registry, Provision, Events, Journal, Store, Tokens (owned by the Api)
 *   Tokens -> Store, CloudConfig (the token files)
 *   Provision -> Store
 *   Registry -> Store;  RegistryHooks -> Devices (close), Events (revoked)
 *   Ota ----> Devices, Events, Journal, Store;  OtaHooks -> Api (kick);  OtaJobHooks -> Campaigns
 *   Campaigns -> Ota, Devices, Events, Store (and api_parse_page(), pure)
 *   Events -> Journal;  EventsHooks -> Devices (notify, disconnect), Api (streams)
 *   Devices -> (none);  DevicesHooks -> Events (/e requests, device gone, conflicts),
 *                       Ota (/o, bound), Registry (peer check, bound, described, gone)
 *
 * Everything runs on one sd-event loop; the one other thread is the
 * journal's fdatasync() (journal-sync.h), which never calls back into
 * these modules (it only updates the process-wide stats). Errors are negative
 * errno values; ret_* parameters are untouched on failure. */
#pragma once

#include "cloud-config.h"

/* ---- cloud.c ---------------------------------------------------------- */

typedef struct Cloud Cloud;

/* Create the loop, start every module (listening sockets, journal) and
 * wire them. Takes config (also on failure). Logs what failed. */
int cloud_new(CloudConfig *config, Cloud **ret);
/* Run the loop until SIGTERM or SIGINT; SIGHUP reloads the API tokens.
 * Returns what sd_event_loop() returned. */
int cloud_run(Cloud *c);
/* Frees every module in order (API, OTA, devices, events, journal). NULL
 * is fine; returns NULL. */
Cloud *cloud_free(Cloud *c);
static inline void cloud_freep(Cloud **c) { cloud_free(*c); }
