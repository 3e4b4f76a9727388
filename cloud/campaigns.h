/* SPDX-License-Identifier: Apache-2.0 */
/* Campaigns in tether-cloudd (campaigns.c, prefix campaigns_; docs/fleet.md
 * "Campaigns", docs/cloud.md): one signed update rolled out to a list of
 * devices in phases (cumulative percentages), each phase's jobs made
 * through the Ota (ota_job_queue_shared(): a job waits "queued" while its
 * device is offline, the campaign keeps its manifest; a phase's jobs are
 * made a few hundred per loop iteration), the next phase started once every device of the phase is
 * final or offline, unless the phase's failure rate is over the allowed
 * one: then the campaign pauses itself.
 *
 * A Campaigns object owns its tables in the Store (campaigns,
 * campaign_devices; store_migrate() component "campaigns"), every campaign
 * in memory with its devices, the timers of phase_wait and the defer that
 * looks at campaigns whose jobs moved. It keeps each device's state itself
 * (the Ota prunes old jobs), so a campaign of any size does not depend on
 * job rows surviving. It learns of jobs through campaigns_job_changed()
 * (OtaJobHooks, wired by cloud.c); the work per job change is O(1): jobs
 * and devices waiting for another job to end are indexed.
 *
 * Everything runs on the loop. Errors are negative errno values; ret_*
 * parameters are untouched on failure. API functions return the HTTP
 * status and set *ret_body (a new JSON object, the caller's; NULL on
 * OOM). */
#pragma once

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>
#include <systemd/sd-event.h>

#include "cloud-config.h"
#include "devices.h"
#include "events.h"
#include "manifest.h"
#include "ota.h"
#include "store.h"

#define CAMPAIGN_ID_LEN 16
#define CAMPAIGN_DEVICES_MAX 100000
/* A manifest's body holds at most MANIFEST_BODY_MAX bytes: about 55
 * device IDs of 64 characters, fewer with a long url. 100,000 such
 * devices take about 1850 manifests, 2500 with a url of 1000 bytes. */
#define CAMPAIGN_MANIFESTS_MAX 4096
#define CAMPAIGN_BODY_MAX (32u * 1024 * 1024)

/* The largest campaign fits in the body: every manifest at MANIFEST_MAX
 * with its quotes escaped (a target takes 2, the other fields about 60),
 * the "devices" array of the longest IDs, and room for the rest. */
_Static_assert((uint64_t)CAMPAIGN_MANIFESTS_MAX * (MANIFEST_MAX + 2 * (MANIFEST_TARGETS_MAX + 32) + 8) +
                               (uint64_t)CAMPAIGN_DEVICES_MAX * (PROTO_DEVICE_ID_MAX + 4) + 1024 * 1024 <=
                       CAMPAIGN_BODY_MAX,
               "a campaign of CAMPAIGN_MANIFESTS_MAX full manifests does not fit in CAMPAIGN_BODY_MAX");

typedef struct Campaigns Campaigns;

typedef struct CampaignsHooks {
        void *userdata;
        /* Cluster mode (docs/cluster.md, "Campaigns"): whether this node
         * drives the campaigns now (it leads, and its copy of the
         * replicated state caught up), asked every second. NULL: a single
         * node, which always does. A node that does not drive keeps a copy
         * of the campaigns (campaigns_replicated()) for reads and for
         * OtaJobHooks.may_send; it makes campaigns (their rows go to every
         * node, the leader starts them) but acts on none; the Api sends
         * pause, resume and abort to the leader. When a node starts or
         * stops leading it reads every campaign from the Store again; a
         * new leader goes on from the rows as after a restart. */
        bool (*leads)(void *userdata);
} CampaignsHooks;

/* Make the object and load the campaigns of store (they continue where
 * they were: a phase in progress counts from its jobs' states now).
 * Everything is borrowed and must outlive the Campaigns; hooks (may be
 * NULL) is copied. Logs what failed. */
int campaigns_new(sd_event *event, const CloudConfig *config, Store *store, Ota *ota, Devices *devices,
                  Events *events, const CampaignsHooks *hooks, Campaigns **ret);
/* NULL is fine; returns NULL. */
Campaigns *campaigns_free(Campaigns *c);
static inline void campaigns_freep(Campaigns **c) { campaigns_free(*c); }

/* Cluster mode: a row of table (campaigns or campaign_devices) of
 * campaign id was changed by the replicated state (ReplicaHooks.applied). */
void campaigns_replicated(Campaigns *c, const char *table, const char *id);

/* OtaJobHooks.job_changed, .may_send and .manifest (a campaign's jobs
 * hold no copy of its manifest: ota_job_queue_shared()). */
void campaigns_job_changed(Campaigns *c, const char *job, const char *device, const char *state);
bool campaigns_may_send(Campaigns *c, const char *job);
int campaigns_job_manifest(Campaigns *c, const char *job, const char *device, const char **ret_text,
                           size_t *ret_len);

/* POST /v1/campaigns: params (borrowed) as docs/cloud.md; actor names who
 * asks (the audit log's words). 201 with the campaign; *ret_id (may be
 * NULL) is set then. */
unsigned campaigns_api_create(Campaigns *c, json_t *params, const char *actor, json_t **ret_body,
                              char ret_id[static CAMPAIGN_ID_LEN + 1]);
/* GET /v1/campaigns */
unsigned campaigns_api_list(Campaigns *c, json_t **ret_body);
/* GET /v1/campaigns/ID */
unsigned campaigns_api_get(Campaigns *c, const char *id, json_t **ret_body);
/* GET /v1/campaigns/ID/devices?page=&per_page= (either may be NULL) */
unsigned campaigns_api_devices(Campaigns *c, const char *id, const char *page, const char *per_page,
                               json_t **ret_body);
/* POST /v1/campaigns/ID/{pause,resume,abort}; 503 on a cluster node that
 * does not drive the campaigns. */
unsigned campaigns_api_action(Campaigns *c, const char *id, const char *action, const char *actor,
                              json_t **ret_body);
