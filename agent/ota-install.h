/* SPDX-License-Identifier: Apache-2.0 */
/* The install helper's state machine (docs/ota.md), over operations the
 * caller supplies: tether-ota-helper passes the real ones (dpkg, the
 * health verdict file, systemd), the unit tests pass fakes and crash the
 * process at every transition. */
#pragma once

#include <sys/types.h>

#include "ota-journal.h"

/* Each operation returns an outcome and, for anything but OTA_OK, may set
 * *code and *reason (malloc'd, the caller frees). */
typedef struct OtaInstallOps {
        void *userdata;
        /* Re-verify the job (signature, expiry, architecture, floor, the
         * .deb's size, SHA-256 and control fields), copy the .deb out of the
         * agent's reach, find the previous version and its .deb (set
         * j->prev_known, prev_version, prev_deb). OK or REJECT. */
        OtaOutcome (*prepare)(void *userdata, OtaJournal *j, char **code, char **reason);
        /* Take the dpkg frontend lock, waiting as configured. OK or LOCKED. */
        OtaOutcome (*lock)(void *userdata, OtaJournal *j, char **code, char **reason);
        void (*unlock)(void *userdata);
        /* dpkg -i the new package (lock held). OK, FAIL, or LOCKED when
         * dpkg found the database locked and changed nothing. */
        OtaOutcome (*install)(void *userdata, OtaJournal *j, char **code, char **reason);
        /* Put the previous version back (reinstall or, if there was none,
         * remove the package) and check that dpkg says so. Takes and
         * releases the lock itself. OK or FAIL. */
        OtaOutcome (*restore)(void *userdata, OtaJournal *j, char **code, char **reason);
        /* Wait for the agent's verdict on j->health_token. OK (healthy) or
         * FAIL. */
        OtaOutcome (*wait_health)(void *userdata, OtaJournal *j, char **code, char **reason);
        /* The job is about to be journaled committed: raise the version
         * floor, keep the new .deb as the rollback package of the next
         * update. Must be idempotent. */
        void (*commit)(void *userdata, OtaJournal *j);
        /* The job reached a final state (remove the activation request). */
        void (*finished)(void *userdata, OtaJournal *j);
        /* A fresh random token (malloc'd). */
        char *(*token)(void *userdata);
        /* Log a line (may be NULL). */
        void (*log)(void *userdata, int priority, const char *text);
} OtaInstallOps;

typedef struct OtaInstallParams {
        const char *dir;          /* the agent's OTA state directory (journal) */
        unsigned max_transitions; /* 0: OTA_DEFAULT_MAX_TRANSITIONS */
        uint64_t trial_ms;        /* how long the agent must hold its connection */
        uid_t owner;              /* journal files are chowned to these */
        gid_t group;
} OtaInstallParams;

/* Run the job in p->dir from its journaled state to a final one (or
 * return at once if the job is the agent's, or final). 0 or -errno when
 * the journal cannot be read or written. */
int ota_install_run(const OtaInstallParams *p, const OtaInstallOps *ops);
