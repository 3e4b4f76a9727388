/* SPDX-License-Identifier: Apache-2.0 */
/* OTA in tether-cloudd (ota.c, prefixes ota_, ota_api_, ota_device_;
 * docs/ota.md, docs/cloud.md): the jobs (started from the API, moved by
 * the device's answer and its status reports on /o/JOB, each change also
 * an event "tether/ota/JOB" from the device), the API's /v1/ota/...
 * requests (artifact uploads, job status with long polling), and, when
 * [OTA] ArtifactDirectory= is set, the HTTPS artifact server for devices
 * (a second libmicrohttpd daemon, client certificates from the device CA).
 *
 * Jobs persist in the Store (table ota_jobs): every change is written in
 * the Store's batch; a new job is committed before the API answers and a
 * final state before the device is told it arrived. After a restart the
 * jobs are back with their history, reports go on where they were, and a
 * job still "sent" (the device had not answered) is sent again when its
 * device connects.
 *
 * An Ota object owns its jobs, the artifact server with its event
 * sources and TLS material, and the timers of waiting requests. It calls
 * Devices, Events, the Journal and the Store directly; the one thing it needs from
 * the HTTP API (run it after resuming one of its requests) goes through
 * OtaHooks, which the Cloud object implements (cloud.c), so it does not
 * include api.h. Errors are negative errno values; ret_* parameters are
 * untouched on failure. */
#pragma once

#include <coap3/coap.h>
#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <systemd/sd-event.h>

#include "cloud-config.h"
#include "devices.h"
#include "events.h"
#include "journal.h"
#include "ota-journal.h"
#include "store.h"

struct MHD_Connection;

typedef struct Ota Ota;
typedef struct OtaRequest OtaRequest;

typedef struct OtaHooks {
        void *userdata;
        /* One of Ota's API requests was resumed (MHD_resume_connection()
         * on the API's daemon): run that daemon soon. Also called while
         * the API is being freed (ota_api_shutdown()). Required. */
        void (*kick_api)(void *userdata);
} OtaHooks;

/* Make the OTA object, with the jobs kept in store (its own tables,
 * store_migrate() component "ota"), and, when [OTA] ArtifactDirectory= is
 * set, start artifact hosting (HTTPS with client certificates) after
 * removing uploads a stopped cloud left unfinished; *ret_port is its
 * port, 0 when off. event, config, store, journal, devices and events are
 * borrowed and must outlive the Ota; hooks is copied. Logs what failed;
 * *ret is the caller's (ota_free()). */
int ota_new(sd_event *event, const CloudConfig *config, Store *store, Journal *journal, Devices *devices,
            Events *events, const OtaHooks *hooks, unsigned *ret_port, Ota **ret);
/* Resume every waiting request, stop the artifact server and forget every
 * job (a device call still pending for a job is cancelled). Free the Api
 * first: its requests hold OtaRequests. NULL is fine; returns NULL. */
Ota *ota_free(Ota *ota);
static inline void ota_freep(Ota **ota) { ota_free(*ota); }

/* Whether the API request for url belongs to the Ota (/v1/ota/...). */
bool ota_api_owns(const char *url);
/* MHD access handler for those requests (the token is checked by the
 * Api); *state is the Ota's, freed by ota_api_request_free() before the
 * Ota is freed. Returns an enum MHD_Result. */
int ota_api_handler(Ota *ota, struct MHD_Connection *connection, const char *url, const char *method,
                    const char *upload_data, size_t *upload_data_size, OtaRequest **state);
/* NULL is fine; returns NULL. */
OtaRequest *ota_api_request_free(OtaRequest *state);
/* The device of OTA job id, or NULL if there is no such job (for the
 * Api's check of tokens restricted to devices). Valid until the job is
 * forgotten: use it at once. */
const char *ota_job_device(Ota *ota, const char *id);
/* Resume every waiting request (before the API server stops). */
void ota_api_shutdown(Ota *ota);
/* PUT /v1/devices/ID with "manifest": start a job. Returns the HTTP
 * status and sets *ret_body (a new JSON object, the caller's; NULL on
 * OOM). */
unsigned ota_api_start_job(Ota *ota, Device *d, json_t *params, json_t **ret_body);
/* Cluster mode (docs/cluster.md, "OTA"): another node changed the row of
 * job id in the Store (the replicated table ota_jobs). The Ota takes it
 * into memory: a new job is listed; a copy further along (the device's
 * report counter, then whether it is over, then the job's seq) replaces
 * the one here and wakes the requests waiting for it. Only the node
 * holding the device's session drives a job (sends it, applies the
 * device's reports); when an older or conflicting copy comes over the copy
 * of that node, it writes its own back, so that every node ends with it.
 * A job still "sent" is sent again when its device is (or comes) online
 * here, as after a restart. */
void ota_job_changed(Ota *ota, const char *id);
/* Cluster mode. GET /v1/ota/jobs/ID for a job not here waits up to 5 s
 * for it (a job another node made a moment ago comes through the
 * stream). With artifacts (NULL: this node hosts no artifacts), an
 * upload is answered only once it is in the stream TETHER_ARTIFACTS too
 * (artifacts.h); a failure to put it there answers 503 and removes it
 * here. artifacts is borrowed and must outlive the Ota's requests. */
typedef struct Artifacts Artifacts;
void ota_set_cluster(Ota *ota, Artifacts *artifacts);
/* d is online (its session is bound): the update request of a job that
 * was "sent" when the cloud stopped, before the device answered, goes to
 * it again, and a "queued" one goes to it (from a defer on the loop). */
void ota_device_online(Ota *ota, Device *d);

/* ---- jobs for devices that may be offline (campaigns.h) ----------------- */

/* What Ota tells the one module that makes queued jobs (the Campaigns). */
typedef struct OtaJobHooks {
        void *userdata;
        /* Job id of device moved to state (every change of state of every
         * job, from the loop; in cluster mode also the jobs other nodes
         * made or moved, as their rows come: ota_job_changed()); the
         * state is valid during the call only. May be NULL. */
        void (*job_changed)(void *userdata, const char *id, const char *device, const char *state);
        /* Whether the "queued" job id may be sent now that its device is
         * online (false: it stays queued until ota_send_queued()). NULL:
         * always. */
        bool (*may_send)(void *userdata, const char *id);
        /* The signed manifest of job id of device, made by
         * ota_job_queue_shared(), now that it is sent (also again, after a
         * restart): *text (len bytes) stays valid until the loop runs.
         * Negative errno when the maker does not know the job: a queued job
         * then fails ("no-manifest"). NULL: no shared jobs are made. */
        int (*manifest)(void *userdata, const char *id, const char *device, const char **text, size_t *len);
} OtaJobHooks;
/* Attach hooks (copied), or detach them (NULL). */
void ota_set_job_hooks(Ota *ota, const OtaJobHooks *hooks);
/* Make a job for device (which may be offline, or not connected to this
 * node) from a signed manifest (its shape is checked, not its signature):
 * state "queued", the manifest kept in the Store; it is sent (state
 * "sent", then as any job) when the device is online here and
 * OtaJobHooks.may_send allows, also after a restart. A device has at most
 * one open (not final) job: -EBUSY when it has one (ota_device_open_job()
 * names it). -EINVAL for a manifest that is not one, -ENOMEM, -EIO (no
 * randomness); *ret_error says which. The job joins the Store's batch. */
int ota_job_queue(Ota *ota, const char *device, const char *manifest, size_t len,
                  char ret_id[static OTA_JOB_ID_MAX + 1], const char **ret_error);
/* As ota_job_queue(), for a maker that keeps the manifest itself and
 * checked it (package, version and sha256 are the manifest's; sha256 may
 * be NULL): the job holds no copy, in memory or in its row, and
 * OtaJobHooks.manifest (required: -EINVAL without it) gives the text when
 * the job is sent. */
int ota_job_queue_shared(Ota *ota, const char *device, const char *package, const char *version,
                         const char *sha256, char ret_id[static OTA_JOB_ID_MAX + 1], const char **ret_error);
/* The maker of job id (ota_job_queue_shared()) is going away: the job
 * takes a copy of its manifest (len bytes) if it may still be sent. 1
 * taken, 0 not needed (sent with its own, or over), -ENOENT no such job,
 * -ENOMEM. */
int ota_job_adopt_manifest(Ota *ota, const char *id, const char *manifest, size_t len);
/* Cancel a job that is still "queued" (never sent): it becomes "failed"
 * with code and reason, final. -ENOENT no such job, -EBUSY not queued
 * (sent jobs go on). */
int ota_job_cancel(Ota *ota, const char *id, const char *code, const char *reason);
/* Look at the queued jobs again (OtaJobHooks.may_send changed its mind):
 * those whose device is online here are sent, from a defer. */
void ota_send_queued(Ota *ota);
/* The open (not final) job of device, or NULL. Valid until the loop runs. */
const char *ota_device_open_job(Ota *ota, const char *device);
/* The state of job id, or NULL when there is no such job (pruned: the
 * OTA_JOBS_MAX newest finished jobs are kept). Valid until the loop runs. */
const char *ota_job_state(Ota *ota, const char *id);
/* A device's request on /o/JOB (a status report): fills response. Only
 * for an existing job of that device (4.04 unknown, 4.03 another
 * device's: nothing changes, no job is made or forgotten). A report that
 * changes the job takes an event from the device's limits
 * (events_device_charge()): past them 4.29 with Max-Age and nothing
 * changes. Once the device said the job is over (its final report, or its
 * answer refused the job), its final report sent again gets 2.04 and
 * anything else 4.09; neither changes anything. */
void ota_device_request(Ota *ota, Device *d, const coap_pdu_t *request, const char *job, coap_pdu_t *response);
/* A device's GET /a/SHA256 with Block2 (docs/protocol.md, "Artifacts"):
 * fills response with the block of ArtifactDirectory/SHA256.deb it asks
 * for (read with pread, 2.05, ETag, Block2, Size2), only while an open
 * job of that device names the artifact (4.03 otherwise; 4.04 for one no
 * job names or that is not stored; in cluster mode 5.03 + Max-Age while
 * the artifact has not come through the stream). Flow control is the
 * caller's (devices.c counts the answer's bytes). */
void ota_device_artifact(Ota *ota, Device *d, const coap_pdu_t *request, const char *sha256, coap_pdu_t *response);
