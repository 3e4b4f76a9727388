/* SPDX-License-Identifier: Apache-2.0 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <syslog.h>

#include "ota-install.h"
#include "util.h"

static void say(const OtaInstallOps *ops, int priority, const char *fmt, ...) _printf_(3, 4);
static void say(const OtaInstallOps *ops, int priority, const char *fmt, ...) {
        char buf[1024];
        va_list ap;

        if (!ops->log)
                return;
        va_start(ap, fmt);
        vsnprintf(buf, sizeof(buf), fmt, ap);
        va_end(ap);
        ops->log(ops->userdata, priority, buf);
}

/* Journal the move to next; when the transition limit stops it, take the
 * limit's way out (roll back, or give up) instead. */
static int move(const OtaInstallParams *p, const OtaInstallOps *ops, OtaJournal *j, OtaState next, const char *code,
                const char *reason) {
        OtaState from = j->state;
        int r;

        r = ota_journal_transition(p->dir, j, next, code, reason, p->max_transitions, p->owner, p->group);
        if (r == -ELOOP) {
                next = ota_next(from, OTA_LIMIT);
                say(ops, LOG_ERR, "Job %s: %llu transitions, the limit: going to %s", j->job,
                    (unsigned long long)j->seq, ota_state_to_string(next));
                r = ota_journal_transition(p->dir, j, next, "loop", "too many state transitions (restart loop?)",
                                           p->max_transitions, p->owner, p->group);
                if (r == -ELOOP)
                        r = ota_journal_transition(p->dir, j, OTA_STATE_FAILED, "loop",
                                                   "too many state transitions (restart loop?)", p->max_transitions,
                                                   p->owner, p->group);
        }
        if (r < 0)
                return r;
        say(ops, ota_state_final(j->state) && j->state != OTA_STATE_COMMITTED ? LOG_WARNING : LOG_INFO,
            "Job %s: %s -> %s%s%s%s", j->job, ota_state_to_string(from), ota_state_to_string(j->state),
            j->reason ? " (" : "", j->reason ? j->reason : "", j->reason ? ")" : "");
        return 0;
}

/* A new verdict is asked for with a new token. */
static int new_health_phase(const OtaInstallOps *ops, OtaJournal *j, const char *phase, uint64_t hold_ms) {
        char *t = ops->token(ops->userdata), *ph = strdup(phase);

        if (!t || !ph) {
                free(t);
                free(ph);
                return -ENOMEM;
        }
        free(j->health_token);
        free(j->health_phase);
        j->health_token = t;
        j->health_phase = ph;
        j->hold_ms = hold_ms;
        return 0;
}

int ota_install_run(const OtaInstallParams *p, const OtaInstallOps *ops) {
        _cleanup_(ota_journal_done) OtaJournal j = {};
        bool first = true;
        int r;

        r = ota_journal_load(p->dir, &j);
        if (r == -ENOENT)
                return 0;
        if (r < 0)
                return r;

        while (ota_state_helper_owned(j.state)) {
                _cleanup_free_ char *code = NULL, *reason = NULL;
                OtaOutcome o;

                switch (j.state) {
                case OTA_STATE_DOWNLOADED:
                        o = ops->prepare(ops->userdata, &j, &code, &reason);
                        if (o == OTA_OK)
                                o = ops->lock(ops->userdata, &j, &code, &reason);
                        r = move(p, ops, &j, ota_next(j.state, o), code, reason);
                        if (r < 0 && o == OTA_OK)
                                ops->unlock(ops->userdata);
                        break;

                case OTA_STATE_INSTALLING:
                        if (first) {
                                /* We were killed while dpkg ran (or just before). */
                                say(ops, LOG_WARNING, "Job %s was interrupted while installing: rolling back", j.job);
                                r = move(p, ops, &j, ota_next(j.state, OTA_CRASHED), "interrupted",
                                         "the installation was interrupted");
                                break;
                        }
                        o = ops->install(ops->userdata, &j, &code, &reason);
                        ops->unlock(ops->userdata);
                        r = move(p, ops, &j, ota_next(j.state, o), code, reason);
                        break;

                case OTA_STATE_INSTALLED:
                        r = new_health_phase(ops, &j, "trial", p->trial_ms);
                        if (r >= 0)
                                r = move(p, ops, &j, OTA_STATE_TRIAL, NULL, NULL);
                        break;

                case OTA_STATE_TRIAL:
                        if (first) {
                                /* A verdict asked for before the restart may be
                                 * stale: ask again (this counts as a transition,
                                 * so restarts cannot loop forever). */
                                r = new_health_phase(ops, &j, "trial", p->trial_ms);
                                if (r >= 0)
                                        r = move(p, ops, &j, ota_next(j.state, OTA_CRASHED), NULL, NULL);
                                break;
                        }
                        o = ops->wait_health(ops->userdata, &j, &code, &reason);
                        if (o == OTA_OK)
                                ops->commit(ops->userdata, &j);
                        r = move(p, ops, &j, ota_next(j.state, o), code, reason);
                        break;

                case OTA_STATE_ROLLING_BACK:
                        if (first) {
                                r = move(p, ops, &j, ota_next(j.state, OTA_CRASHED), j.code, j.reason);
                                if (r < 0 || j.state != OTA_STATE_ROLLING_BACK)
                                        break;
                        }
                        o = ops->restore(ops->userdata, &j, &code, &reason);
                        if (o == OTA_OK) {
                                /* The old version must come back healthy too. */
                                r = new_health_phase(ops, &j, "rollback", 0);
                                if (r >= 0)
                                        r = ota_journal_save(p->dir, &j, p->owner, p->group);
                                if (r < 0)
                                        break;
                                ota_crash_point("rollback-restored");
                                o = ops->wait_health(ops->userdata, &j, &code, &reason);
                                if (o != OTA_OK) {
                                        char *why = NULL;

                                        if (asprintf(&why, "rolled back to %s, but the agent did not come back: %s",
                                                     j.prev_version ? j.prev_version : "no package",
                                                     reason ? reason : "no verdict") < 0)
                                                why = NULL;
                                        free(reason);
                                        reason = why;
                                }
                        }
                        /* rolled-back keeps the reason the rollback started for */
                        if (o == OTA_OK)
                                r = move(p, ops, &j, OTA_STATE_ROLLED_BACK, j.code, j.reason);
                        else
                                r = move(p, ops, &j, ota_next(j.state, o), code ? code : "rollback-failed",
                                         reason);
                        break;

                default:
                        r = -EINVAL;
                        break;
                }
                if (r < 0)
                        return r;
                first = false;
        }
        if (ota_state_final(j.state) && ops->finished)
                ops->finished(ops->userdata, &j);
        return 0;
}
