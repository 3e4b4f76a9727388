/* SPDX-License-Identifier: Apache-2.0 */
/* tetherd's side of OTA updates (docs/ota.md): takes jobs the cloud sends
 * (POST /o/JOB), verifies the signed manifest before it answers, journals
 * the job, downloads the .deb (ota-download.c), checks it, hands it to the
 * install helper (a path-activated unit, a transient unit, or for tests a
 * detached process), answers the helper's health questions, and reports
 * every state to the cloud until the final one is acknowledged. Runs on
 * the agent's sd-event loop and never blocks it. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <systemd/sd-event.h>

#include "agent-config.h"
#include "conn.h"

typedef struct Ota Ota;

typedef struct OtaHooks {
        void *userdata;
        /* Unload and load all plugins again (as on SIGHUP). */
        void (*reload_plugins)(void *userdata);
        /* Whether a plugin of this name is running. */
        bool (*plugin_running)(void *userdata, const char *name);
        /* The job reached a final state (committed, rolled back, rejected,
         * failed, ...): what is installed may have changed. Optional. */
        void (*job_ended)(void *userdata);
} OtaHooks;

/* conn and cfg are borrowed (cfg until ota_reconfigure()); config_path is
 * copied (the helper reads the same file). Blocks SIGCHLD (child sources). */
int ota_new(sd_event *event, Conn *conn, const Config *cfg, const char *config_path, const OtaHooks *hooks,
            Ota **ret);
/* Free it after conn_free(): requests still out are answered then. */
Ota *ota_free(Ota *o);
static inline void ota_freep(Ota **o) {
        ota_free(*o);
}

/* Read the journal and continue whatever job is there. */
int ota_start(Ota *o);
/* After a reload: the new configuration (and keyring). */
void ota_reconfigure(Ota *o, const Config *cfg);
/* The cloud connection came up or went down. */
void ota_connection_changed(Ota *o, bool connected);
/* Status reports the cloud answered 4.29 (past the device's limits): each
 * kept and sent again after the cloud's Max-Age. */
uint64_t ota_reports_held(const Ota *o);
/* POST /o/{job} from the cloud: the ConnHooks.ota_request hook. */
unsigned ota_handle_request(Ota *o, const char *job, const uint8_t *data, size_t len, char *text, size_t text_size);
