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
#include <systemd/sd-event.h>

#include "cloud-config.h"
#include "devices.h"
#include "events.h"
#include "ota.h"
#include "store.h"

#define CAMPAIGN_ID_LEN 16
#define CAMPAIGN_DEVICES_MAX 100000
#define CAMPAIGN_MANIFESTS_MAX 1000
#define CAMPAIGN_BODY_MAX (32u * 1024 * 1024)

typedef struct Campaigns Campaigns;

/* Make the object and load the campaigns of store (they continue where
 * they were: a phase in progress counts from its jobs' states now).
 * Everything is borrowed and must outlive the Campaigns. Logs what failed. */
int campaigns_new(sd_event *event, const CloudConfig *config, Store *store, Ota *ota, Devices *devices,
                  Events *events, Campaigns **ret);
/* NULL is fine; returns NULL. */
Campaigns *campaigns_free(Campaigns *c);
static inline void campaigns_freep(Campaigns **c) { campaigns_free(*c); }

/* Refuse to make campaigns, answering 501 with text (borrowed, static):
 * cluster mode, which campaigns do not support yet. */
void campaigns_refuse(Campaigns *c, const char *text);

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
/* POST /v1/campaigns/ID/{pause,resume,abort} */
unsigned campaigns_api_action(Campaigns *c, const char *id, const char *action, const char *actor,
                              json_t **ret_body);
