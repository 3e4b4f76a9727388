/* SPDX-License-Identifier: Apache-2.0 */
/* The OTA job journal and state machine, shared by tetherd (accept,
 * download, report, health) and tether-ota-helper (install, trial,
 * rollback). docs/ota.md describes states, owners and resume rules.
 *
 * One job at a time, journaled in DIR/job.json. Every state is written
 * tmp -> fsync -> rename -> fsync(dir) *before* its work starts; a restart
 * reads the journal and ota_resume() says what to do. Ownership alternates:
 * the agent writes accepted/downloading/downloaded and the delivery mark of
 * a final state; the helper writes everything from installing to a final
 * state. Only one of them is ever working on a job.
 *
 * Library-like code: no logging; negative errno. */
#pragma once

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#define OTA_JOURNAL_FILE "job.json"
#define OTA_HEALTH_FILE "health.json"
#define OTA_REQUEST_FILE "request"
#define OTA_DOWNLOAD_FILE "download.part"
/* A job id is the cloud's: 16 lowercase hex digits (docs/protocol.md). */
#define OTA_JOB_ID_MAX 16
/* A well-formed job id that no job is given (ids are random). */
#define OTA_JOB_ID_NONE "0000000000000000"
#define OTA_DEFAULT_MAX_TRANSITIONS 64
/* Room above the limit so that a job stopped by it can still roll back
 * (and give up on that too). */
#define OTA_ROLLBACK_EXTRA_TRANSITIONS 8

typedef enum OtaState {
        OTA_STATE_NONE,
        OTA_STATE_ACCEPTED,
        OTA_STATE_DOWNLOADING,
        OTA_STATE_DOWNLOADED,
        OTA_STATE_INSTALLING,
        OTA_STATE_INSTALLED,
        OTA_STATE_TRIAL,
        OTA_STATE_ROLLING_BACK,
        OTA_STATE_COMMITTED,
        OTA_STATE_ROLLED_BACK,
        OTA_STATE_REJECTED,
        OTA_STATE_DEFERRED,
        OTA_STATE_FAILED,
        _OTA_STATE_MAX,
} OtaState;

const char *ota_state_to_string(OtaState s);
OtaState ota_state_from_string(const char *s);
bool ota_state_final(OtaState s);
/* Whether the helper (true) or the agent (false) works in this state. */
bool ota_state_helper_owned(OtaState s);

/* What the owner does after a (re)start in a state. */
typedef enum OtaStep {
        OTA_STEP_NOTHING,  /* no job */
        OTA_STEP_DOWNLOAD, /* agent: (re)start or resume the download */
        OTA_STEP_INSTALL,  /* helper: re-verify, wait for the dpkg lock, install */
        OTA_STEP_ROLLBACK, /* helper: reinstall the previous package */
        OTA_STEP_TRIAL,    /* helper: wait for the health verdict */
        OTA_STEP_DELIVER,  /* agent: report the final state until acknowledged */
} OtaStep;

OtaStep ota_resume(OtaState s);

/* How a step ended. */
typedef enum OtaOutcome {
        OTA_OK,       /* the step did its work */
        OTA_REJECT,   /* refused, nothing touched (verification, space) */
        OTA_LOCKED,   /* dpkg stayed locked */
        OTA_FAIL,     /* the step failed */
        OTA_CRASHED,  /* found interrupted by a restart */
        OTA_LIMIT,    /* the transition limit was reached */
} OtaOutcome;

/* The state after an outcome in a state. */
OtaState ota_next(OtaState s, OtaOutcome o);

typedef struct OtaJournal {
        char job[OTA_JOB_ID_MAX + 1];
        char *manifest; /* the signed envelope, exactly as received */
        char *package, *version, *plugin; /* from the verified manifest */
        OtaState state;
        uint64_t seq;     /* number of transitions so far; the reports' seq */
        char *code;       /* final or rollback reason code */
        char *reason;     /* human text */
        bool delivered;   /* the final state report was acknowledged */

        /* download (agent) */
        uint64_t dl_offset;  /* bytes of DIR/download.part covered by dl_sha256 */
        char dl_sha256[65];  /* SHA-256 of those bytes ("" when dl_offset is 0) */
        char *dl_etag;
        unsigned dl_attempts;

        /* install (helper) */
        bool prev_known;     /* whether prev_* were determined */
        char *prev_version;  /* NULL: the package was not installed */
        char *prev_deb;      /* the .deb to reinstall on rollback */
        char *health_token;  /* the agent's verdict must carry it */
        char *health_phase;  /* "trial" or "rollback" */
        uint64_t hold_ms;    /* how long the agent must stay connected */
} OtaJournal;

void ota_journal_done(OtaJournal *j);

/* Load DIR/job.json. -ENOENT: no job; -EBADMSG: unreadable journal. */
int ota_journal_load(const char *dir, OtaJournal *ret);
/* Write DIR/job.json atomically (tmp, fsync, rename, fsync dir). When
 * owner is not -1, the file is chowned to it (the helper writes files the
 * agent must replace). */
int ota_journal_save(const char *dir, const OtaJournal *j, uid_t owner, gid_t group);
/* Move j to state: seq+1, save, then run the crash point named after the
 * state. -ELOOP (nothing saved) when max transitions are used up, except
 * that rollback states get OTA_ROLLBACK_EXTRA_TRANSITIONS more and final
 * states are always written. code/reason may be NULL (cleared). */
int ota_journal_transition(const char *dir, OtaJournal *j, OtaState state, const char *code, const char *reason,
                           unsigned max_transitions, uid_t owner, gid_t group);

/* Crash points for tests: when $TETHER_OTA_CRASH_AT names this point
 * ("installing", or "installing#2" for its second passage, or "#N" for the
 * N-th crash point of any name), the process kills itself with SIGKILL.
 * With $TETHER_OTA_CRASH_ONCE=FILE only a process that can remove FILE
 * does, so restarted processes (which inherit the environment) go on.
 *
 * Compiled in only by ./configure --enable-fault-injection (test builds);
 * otherwise a no-op that reads no environment, so the binaries as they
 * ship cannot be made to kill themselves (docs/design/fault-injection.md). */
#if ENABLE_FAULT_INJECTION
void ota_crash_point(const char *name);
#else
static inline void ota_crash_point(const char *name) {
}
#endif

/* The version floor for package (CACHE_DIR/floors.json, raised by the
 * helper on commits): a new string, or NULL when there is none. */
char *ota_floor_for(const char *cache_dir, const char *package);
/* The job nonces this device has accepted (DIR/nonces.json), so that a
 * signed manifest is accepted once: ota_nonce_claim() records nonce for
 * job, written atomically before it returns 0. -EEXIST: the nonce is on
 * record already (a replay; even under the same job id, which a retry of
 * the journaled job never reaches), and *ret_job (may be NULL; caller
 * frees) is the job that claimed it. A nonce is kept until OTA_NONCE_GRACE_SEC after its manifest expires
 * (by now); past OTA_NONCES_MAX unexpired nonces, those that expire
 * soonest are forgotten (*ret_dropped counts them, may be NULL).
 * -EBADMSG: the file is unreadable (the caller refuses: it cannot tell a
 * replay). */
#define OTA_NONCES_FILE "nonces.json"
#define OTA_NONCES_MAX 1024
#define OTA_NONCE_GRACE_SEC 86400
int ota_nonce_claim(const char *dir, const char *nonce, const char *job, int64_t expires, int64_t now,
                    unsigned *ret_dropped, char **ret_job);
/* Whether s[0..n) is a job id: exactly OTA_JOB_ID_MAX lowercase hex digits. */
bool ota_job_id_valid(const char *s, size_t n);
/* mkdir -p: missing parents 0755, the directory itself with mode. */
int ota_mkdir_p(const char *path, mode_t mode);
/* Write a small file atomically (tmp, fsync, rename, fsync dir). */
int ota_write_file_atomic(const char *dir, const char *name, const char *data, size_t len, mode_t mode,
                          uid_t owner, gid_t group);
/* Read a whole small file (at most max bytes), NUL terminated. */
int ota_read_file(const char *path, size_t max, char **ret, size_t *ret_len);

/* The agent's health verdict (DIR/health.json), answering the helper's
 * health_token. */
typedef struct OtaHealth {
        char *job;
        char *token;
        bool healthy;
        char *code;
        char *reason;
        pid_t pid;
} OtaHealth;

void ota_health_done(OtaHealth *h);
int ota_health_load(const char *dir, OtaHealth *ret);
int ota_health_save(const char *dir, const OtaHealth *h);
