/* SPDX-License-Identifier: Apache-2.0 */
/* OTA in tether-cloudd (ota.h; docs/ota.md, docs/cloud.md):
 *   - jobs: PUT /v1/devices/ID with a signed manifest sends POST /o/JOB to
 *     the device; its answer and its status reports (POST /o/JOB from the
 *     device) move the job; the API serves jobs, with long polling, and
 *     every report is also an event "tether/ota/JOB" from the device;
 *   - artifacts: PUT /v1/ota/artifacts/SHA256 stores a .deb (checked
 *     against its SHA-256) in [OTA] ArtifactDirectory=, and a second
 *     libmicrohttpd daemon serves it to devices over HTTPS, only to clients
 *     with a certificate from the device CA, with Range support.
 *
 * libmicrohttpd is built with GnuTLS in Debian, so the artifact server's
 * TLS is GnuTLS: MHD requests a client certificate (MHD_OPTION_HTTPS_MEM_TRUST)
 * and we verify it per request with gnutls_certificate_verify_peers2(),
 * refusing with 403 what does not chain to the device CA or whose leaf
 * lacks the clientAuth extended key usage; TLS below 1.2 is not offered
 * (OTA_TLS_PRIORITIES). The cloud never
 * verifies manifest signatures (it has no keyring): devices do. */
#include "config.h"

#include <dirent.h>
#include <fcntl.h>
#include <gnutls/gnutls.h>
#include <gnutls/x509.h>
#include <microhttpd.h>
#include <openssl/evp.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include "artifacts.h"
#include "log.h"
#include "manifest.h"
#include "mhd-log.h"
#include "ota-journal.h"
#include "ota.h"
#include "store.h"
#include "util.h"

#define USEC_PER_SEC 1000000ULL
#define USEC_PER_MSEC 1000ULL
#define OTA_JOB_ID_LEN OTA_JOB_ID_MAX
#define OTA_JOBS_MAX 4096
#define OTA_HISTORY_MAX 64
#define OTA_REPORT_MAX 4096
#define OTA_WAIT_USEC (25 * USEC_PER_SEC)
#define OTA_UNKNOWN_WAIT_USEC (5 * USEC_PER_SEC)
/* Rounds in a row the artifact server may be run at once, without I/O in
 * between, before it waits a millisecond (ota_update_timer()). */
#define OTA_BUSY_ROUNDS_MAX 64
#define OTA_PEM_MAX (256 * 1024)
/* GnuTLS priorities of the artifact server: TLS 1.2 and 1.3 only. */
#define OTA_TLS_PRIORITIES "NORMAL:-VERS-ALL:+VERS-TLS1.3:+VERS-TLS1.2"
/* GET /a/SHA256 (docs/protocol.md, "Artifacts"): the largest BERT block,
 * what the token and options need besides the payload, the ETag (the
 * first bytes of the SHA-256), and Max-Age of a 5.03 while a cluster node
 * waits for the artifact from the stream. */
#define OTA_COAP_BERT_MAX (64 * 1024)
#define OTA_COAP_OPTIONS_ROOM 64
#define OTA_COAP_ETAG_LEN 8
#define OTA_COAP_RETRY_SEC 5
/* A request that could not be sent to a device online here goes again
 * after 1, 2, 4 ... seconds, at most this long apart. */
#define OTA_SEND_RETRY_MAX_USEC (60 * USEC_PER_SEC)

typedef struct OtaJob {
        Ota *ota;
        char id[OTA_JOB_ID_LEN + 1];
        char *device;
        char *package;
        char *version;
        char *state;
        char *code;   /* rejection/rollback code, or NULL */
        char *reason; /* human text, or NULL */
        uint64_t bytes, total;
        uint64_t seq;        /* bumped on every change: long polling waits on it */
        uint64_t device_seq; /* last state report applied (reports are de-duplicated) */
        /* The device said the job is over: a final state report (seq
         * final_seq) or its answer refused the job (final_seq 0). From then
         * on only that final report, sent again, is answered 2.04; any other
         * report gets 4.09 and changes nothing. A job the cloud itself
         * failed (no answer, offline) stays open: the device may have taken
         * it, and its reports say so. */
        bool closed;
        uint64_t final_seq;
        json_t *history;     /* [{"state","at"[,"code","reason"]}] */
        char created[32], updated[32];
        DeviceCall *call; /* POST /o/JOB to the device, until it answers */
        /* The signed manifest while the job is "sent" (kept in the Store
         * so that the request can be sent again after a restart), else NULL.
         * NULL also for a job whose maker keeps the manifest
         * (ota_job_queue_shared(), job_manifest_shared()). */
        char *manifest;
        /* The manifest's sha256: the artifact the device may fetch over
         * its connection while the job is open (GET /a/SHA256). NULL for
         * jobs made before it was kept. */
        char *sha256;
        /* Loaded "sent" at start: the request goes out again when the
         * device connects (ota_device_online()). */
        bool resend;
        /* Made "queued" (ota_job_queue()): a failed send puts it back in
         * the queue instead of failing it. */
        bool from_queue;
        /* Sending failed while the device is online here: tried again from
         * this timer (job_send_later()); sends in a row that failed. */
        sd_event_source *retry_timer;
        unsigned send_failures;
        struct OtaJob *next;
        struct OtaJob *id_next;   /* the index by id */
        struct OtaJob *open_next; /* the index of open jobs by device, when in it */
        struct OtaJob *send_next; /* to be sent from the defer, when in that list */
        bool open_indexed, send_listed;
        bool live_counted; /* counted in Ota.n_live */
} OtaJob;

typedef enum OtaRequestKind {
        OTA_REQ_UPLOAD,
        OTA_REQ_ARTIFACT,
        OTA_REQ_JOB,
        OTA_REQ_JOBS,
        OTA_REQ_NONE,
} OtaRequestKind;

struct OtaRequest {
        Ota *ota;
        OtaRequestKind kind;
        struct MHD_Connection *connection;
        unsigned status; /* a response decided early (0: none) */
        json_t *body;

        /* upload */
        char sha256[65];
        int fd;
        char *tmp_path;
        EVP_MD_CTX *md;
        uint64_t received, expected;
        bool exists;
        /* Cluster mode: the stored artifact going into the stream; the
         * request waits (suspended, among the waiters) until it is in. */
        ArtifactPublish *publish;
        int publish_fd;
        bool published;
        int publish_error;

        /* job status, long polling */
        char job[OTA_JOB_ID_LEN + 1];
        long long wait_seq; /* -1: answer at once */
        bool waited_unknown; /* waited for a job not here yet (cluster mode) */
        bool suspended;
        bool expired;
        sd_event_source *timer;
        struct OtaRequest *wait_prev, *wait_next;
};

struct Ota {
        sd_event *event;
        const CloudConfig *config;
        Store *store;
        sqlite3_stmt *stmt_save, *stmt_delete;
        sd_event_source *resend_defer;
        size_t n_resend; /* jobs with resend set */
        Journal *journal;
        Devices *devices;
        Events *events;
        OtaHooks hooks;
        struct MHD_Daemon *daemon; /* artifact server */
        sd_event_source *io, *timer, *defer;
        unsigned busy_rounds; /* MHD run at once in a row (ota_update_timer()) */
        char *key_pem, *cert_pem, *ca_pem;
        char *public_url;
        unsigned port;
        OtaJob *jobs;
        size_t n_jobs;
        /* Indexes (chained hash tables, power-of-two sizes, keyed hash):
         * every job by id; by device the open (not final) jobs and those
         * the cloud failed itself (final, not closed: the device may have
         * taken them), n_open of them; n_live jobs are not final. */
        OtaJob **id_buckets, **open_buckets;
        size_t id_nbuckets, open_nbuckets, n_open, n_live;
        uint64_t hash_key;
        /* Jobs to send from resend_defer (a device came online), and
         * whether the defer scans every job (after a restart, resume,
         * another node's change). */
        OtaJob *send_list;
        bool send_scan;
        bool index_incomplete; /* an index lacks a job (OOM): lookups also scan the list */
        OtaJobHooks job_hooks;
        OtaRequest *waiters;
        Artifacts *artifacts; /* cluster mode: uploads go into the stream too (NULL: single node) */
        bool cluster;
        bool running; /* from the start of ota_new() to the start of ota_free() */
        uint8_t block[OTA_COAP_BERT_MAX]; /* one block of GET /a/SHA256, read and copied into the answer */
};

/* ---- small helpers ------------------------------------------------------ */

static void timestamp(char buf[static 32]) {
        proto_timestamp_now(buf);
}

static int read_pem(const char *path, char **ret) {
        _cleanup_close_ int fd = open(path, O_RDONLY | O_CLOEXEC);
        _cleanup_free_ char *buf = NULL;
        size_t len = 0;

        if (fd < 0)
                return -errno;
        buf = malloc(OTA_PEM_MAX + 1);
        if (!buf)
                return -ENOMEM;
        for (;;) {
                ssize_t n = read(fd, buf + len, OTA_PEM_MAX - len);

                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0)
                        return -errno;
                if (n == 0)
                        break;
                len += (size_t)n;
                if (len >= OTA_PEM_MAX)
                        return -EFBIG;
        }
        buf[len] = 0;
        *ret = TAKE_PTR(buf);
        return 0;
}

static bool state_final(const char *s) {
        return s && (streq(s, "committed") || streq(s, "rolled-back") || streq(s, "rejected") ||
                     streq(s, "deferred") || streq(s, "failed"));
}

static bool state_known(const char *s) {
        static const char *const states[] = { "accepted",   "downloading", "downloaded", "rejected",
                                              "deferred",   "installing",  "installed",  "trial",
                                              "committed",  "rolling-back", "rolled-back", "failed" };

        for (size_t i = 0; i < ELEMENTSOF(states); i++)
                if (streq(states[i], s))
                        return true;
        return false;
}

/* ---- jobs in the Store ------------------------------------------------------ */

/* One step per schema version, never edited once released. A row per job
 * the cloud keeps (the OTA_JOBS_MAX newest); keys are the job id (random,
 * made here) and the device id, nothing local to this machine. history is
 * the job's JSON array as GET /v1/ota/jobs/ID shows it; manifest the
 * signed manifest while the job is "sent". */
static const char *const ota_schema[] = {
        "CREATE TABLE ota_jobs ("
        "  id TEXT PRIMARY KEY NOT NULL,"
        "  device TEXT NOT NULL,"
        "  package TEXT,"
        "  version TEXT,"
        "  state TEXT,"
        "  code TEXT,"
        "  reason TEXT,"
        "  bytes INTEGER NOT NULL DEFAULT 0,"
        "  total INTEGER NOT NULL DEFAULT 0,"
        "  seq INTEGER NOT NULL DEFAULT 0,"
        "  device_seq INTEGER NOT NULL DEFAULT 0,"
        "  closed INTEGER NOT NULL DEFAULT 0,"
        "  final_seq INTEGER NOT NULL DEFAULT 0,"
        "  history TEXT NOT NULL DEFAULT '[]',"
        "  created_at TEXT NOT NULL,"
        "  updated_at TEXT NOT NULL,"
        "  manifest TEXT);"
        "CREATE INDEX ota_jobs_device ON ota_jobs (device);",
        /* 2: the artifact a job names, for GET /a/SHA256 on the device's
         * connection (jobs made before have none). */
        "ALTER TABLE ota_jobs ADD COLUMN sha256 TEXT;",
};

static int bind_text(sqlite3_stmt *st, int i, const char *v) {
        return v ? sqlite3_bind_text(st, i, v, -1, SQLITE_TRANSIENT) : sqlite3_bind_null(st, i);
}

static int stmt_run(Ota *ota, sqlite3_stmt *st, int rc, const char *what) {
        if (rc == SQLITE_OK)
                rc = sqlite3_step(st) == SQLITE_DONE ? SQLITE_OK : sqlite3_errcode(store_db(ota->store));
        sqlite3_reset(st);
        sqlite3_clear_bindings(st);
        return rc == SQLITE_OK ? 0 : store_error(ota->store, rc, what);
}

static void job_open_update(Ota *ota, OtaJob *j);

/* Write the job as it is now in the Store's batch; with commit, commit
 * the batch before returning (a job the API answered for, a final state
 * the device is about to be told was recorded). Logged by the Store. */
static int job_store(OtaJob *j, bool commit) {
        Ota *ota = j->ota;
        sqlite3_stmt *st = ota->stmt_save;
        _cleanup_free_ char *history = json_dumps(j->history, JSON_COMPACT);
        int rc, r;

        /* closed may have changed since the state did. */
        job_open_update(ota, j);
        if (!history)
                return log_error_errno(-ENOMEM, "Out of memory recording OTA job %s.", j->id);
        r = store_batch(ota->store);
        if (r < 0)
                return r;
        rc = sqlite3_bind_text(st, 1, j->id, -1, SQLITE_TRANSIENT);
        if (rc == SQLITE_OK)
                rc = bind_text(st, 2, j->device);
        if (rc == SQLITE_OK)
                rc = bind_text(st, 3, j->package);
        if (rc == SQLITE_OK)
                rc = bind_text(st, 4, j->version);
        if (rc == SQLITE_OK)
                rc = bind_text(st, 5, j->state);
        if (rc == SQLITE_OK)
                rc = bind_text(st, 6, j->code);
        if (rc == SQLITE_OK)
                rc = bind_text(st, 7, j->reason);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_int64(st, 8, (sqlite3_int64)j->bytes);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_int64(st, 9, (sqlite3_int64)j->total);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_int64(st, 10, (sqlite3_int64)j->seq);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_int64(st, 11, (sqlite3_int64)j->device_seq);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_int(st, 12, j->closed);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_int64(st, 13, (sqlite3_int64)j->final_seq);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_text(st, 14, history, -1, SQLITE_STATIC);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_text(st, 15, j->created, -1, SQLITE_TRANSIENT);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_text(st, 16, j->updated, -1, SQLITE_TRANSIENT);
        if (rc == SQLITE_OK)
                rc = bind_text(st, 17, j->manifest);
        if (rc == SQLITE_OK)
                rc = bind_text(st, 18, j->sha256);
        r = stmt_run(ota, st, rc, "recording an OTA job");
        if (r >= 0 && commit)
                r = store_commit(ota->store);
        return r;
}

static int job_unstore(Ota *ota, const char *id) {
        sqlite3_stmt *st = ota->stmt_delete;
        int r = store_batch(ota->store);

        if (r < 0)
                return r;
        return stmt_run(ota, st, sqlite3_bind_text(st, 1, id, -1, SQLITE_TRANSIENT), "forgetting an OTA job");
}

/* ---- indexes ------------------------------------------------------------- */

static uint64_t ota_hash(const Ota *ota, const char *s) {
        uint64_t h = 0xcbf29ce484222325ULL ^ ota->hash_key;

        for (; *s; s++)
                h = (h ^ (uint8_t)*s) * 0x100000001b3ULL;
        h ^= h >> 33;
        return h;
}

/* Grow a table of *nb buckets (0: none yet) to hold n entries at about
 * one per bucket; next_off is the offset of the chain's pointer. */
static int index_grow(Ota *ota, OtaJob ***buckets, size_t *nb, size_t n, size_t next_off, bool by_device) {
        size_t want = *nb ? *nb : 64;
        OtaJob **b;

        while (want < n)
                want *= 2;
        if (want == *nb)
                return 0;
        b = calloc(want, sizeof(*b));
        if (!b)
                return -ENOMEM;
        for (size_t i = 0; i < *nb; i++)
                for (OtaJob *j = (*buckets)[i], *next; j; j = next) {
                        OtaJob **link = (OtaJob **)((char *)j + next_off);
                        size_t k = ota_hash(ota, by_device ? j->device : j->id) & (want - 1);

                        next = *link;
                        *link = b[k];
                        b[k] = j;
                }
        free(*buckets);
        *buckets = b;
        *nb = want;
        return 0;
}

/* Put j in the index by id (on OOM it is left out: job_find() then falls
 * back to the list). */
static void job_index_add(Ota *ota, OtaJob *j) {
        size_t k;

        if (index_grow(ota, &ota->id_buckets, &ota->id_nbuckets, ota->n_jobs + 1, offsetof(OtaJob, id_next),
                       false) < 0) {
                ota->index_incomplete = true;
                return;
        }
        k = ota_hash(ota, j->id) & (ota->id_nbuckets - 1);
        j->id_next = ota->id_buckets[k];
        ota->id_buckets[k] = j;
}

static void job_index_remove(Ota *ota, OtaJob *j) {
        if (!ota->id_nbuckets)
                return;
        for (OtaJob **p = &ota->id_buckets[ota_hash(ota, j->id) & (ota->id_nbuckets - 1)]; *p; p = &(*p)->id_next)
                if (*p == j) {
                        *p = j->id_next;
                        break;
                }
        j->id_next = NULL;
}

static bool state_final(const char *s);

static void job_open_remove(Ota *ota, OtaJob *j) {
        for (OtaJob **p = &ota->open_buckets[ota_hash(ota, j->device) & (ota->open_nbuckets - 1)]; *p;
             p = &(*p)->open_next)
                if (*p == j) {
                        *p = j->open_next;
                        break;
                }
        j->open_next = NULL;
        j->open_indexed = false;
        ota->n_open--;
}

/* Keep j in the index by device while it is open, or final but not
 * closed (the cloud failed it itself: the device's reports and GET
 * /a/SHA256 still count); count the jobs that are not final. */
static void job_open_update(Ota *ota, OtaJob *j) {
        bool live = !state_final(j->state), open = live || !j->closed;

        if (live != j->live_counted) {
                j->live_counted = live;
                if (live)
                        ota->n_live++;
                else
                        ota->n_live--;
        }
        if (open == j->open_indexed)
                return;
        if (open) {
                size_t k;

                if (index_grow(ota, &ota->open_buckets, &ota->open_nbuckets, ota->n_open + 1,
                               offsetof(OtaJob, open_next), true) < 0) {
                        ota->index_incomplete = true;
                        return;
                }
                k = ota_hash(ota, j->device) & (ota->open_nbuckets - 1);
                j->open_next = ota->open_buckets[k];
                ota->open_buckets[k] = j;
                ota->n_open++;
                j->open_indexed = true;
        } else
                job_open_remove(ota, j);
}

/* The first open (not final) job of device, or NULL. */
static OtaJob *job_open_of(Ota *ota, const char *device) {
        if (ota->open_nbuckets)
                for (OtaJob *j = ota->open_buckets[ota_hash(ota, device) & (ota->open_nbuckets - 1)]; j;
                     j = j->open_next)
                        if (streq(j->device, device) && !state_final(j->state))
                                return j;
        for (OtaJob *j = ota->index_incomplete ? ota->jobs : NULL; j; j = j->next)
                if (streq(j->device, device) && !state_final(j->state))
                        return j;
        return NULL;
}

static void send_list_remove(Ota *ota, OtaJob *j) {
        if (!j->send_listed)
                return;
        for (OtaJob **p = &ota->send_list; *p; p = &(*p)->send_next)
                if (*p == j) {
                        *p = j->send_next;
                        break;
                }
        j->send_next = NULL;
        j->send_listed = false;
}

/* j leaves the Ota: out of every index (not out of the list). */
static void job_unindex(Ota *ota, OtaJob *j) {
        job_index_remove(ota, j);
        if (j->open_indexed)
                job_open_remove(ota, j);
        if (j->live_counted) {
                j->live_counted = false;
                ota->n_live--;
        }
        send_list_remove(ota, j);
}

/* ---- jobs ----------------------------------------------------------------- */

static OtaJob *job_find(Ota *ota, const char *id) {
        if (ota->id_nbuckets) {
                for (OtaJob *j = ota->id_buckets[ota_hash(ota, id) & (ota->id_nbuckets - 1)]; j; j = j->id_next)
                        if (streq(j->id, id))
                                return j;
        }
        /* A job the index could not take (OOM): the list has it. */
        for (OtaJob *j = ota->index_incomplete ? ota->jobs : NULL; j; j = j->next)
                if (streq(j->id, id))
                        return j;
        return NULL;
}

const char *ota_job_device(Ota *ota, const char *id) {
        const OtaJob *j = job_find(ota, id);

        return j ? j->device : NULL;
}

static void job_free(OtaJob *j) {
        devices_call_cancel(j->call);
        sd_event_source_disable_unref(j->retry_timer);
        free(j->device);
        free(j->package);
        free(j->version);
        free(j->state);
        free(j->code);
        free(j->reason);
        free(j->manifest);
        free(j->sha256);
        json_decref(j->history);
        free(j);
}

/* Keep the table bounded: past OTA_JOBS_MAX finished jobs (and some
 * slack, so that the scan is paid once per OTA_JOBS_MAX / 8 new jobs),
 * forget the oldest finished ones down to OTA_JOBS_MAX. Open jobs stay:
 * there is at most one per device (ota_job_queue(), ota_api_start_job()). */
static void jobs_prune(Ota *ota) {
        size_t finals = 0;

        if (ota->n_jobs - ota->n_live <= OTA_JOBS_MAX + OTA_JOBS_MAX / 8)
                return;
        for (OtaJob **p = &ota->jobs; *p;) {
                OtaJob *j = *p;

                if (!state_final(j->state) || ++finals <= OTA_JOBS_MAX) {
                        p = &j->next;
                        continue;
                }
                *p = j->next; /* the list is newest first: these are the oldest */
                (void)job_unstore(ota, j->id);
                if (j->resend)
                        ota->n_resend--;
                job_unindex(ota, j);
                job_free(j);
                ota->n_jobs--;
        }
}

static OtaJob *job_new(Ota *ota, const char *id, const char *device, const char *package, const char *version) {
        OtaJob *j = calloc(1, sizeof(*j));

        if (!j)
                return NULL;
        j->ota = ota;
        snprintf(j->id, sizeof(j->id), "%s", id);
        j->device = strdup(device);
        j->package = package ? strdup(package) : NULL;
        j->version = version ? strdup(version) : NULL;
        j->history = json_array();
        if (!j->device || (package && !j->package) || (version && !j->version) || !j->history) {
                job_free(j);
                return NULL;
        }
        timestamp(j->created);
        memcpy(j->updated, j->created, sizeof(j->created));
        jobs_prune(ota);
        j->next = ota->jobs;
        ota->jobs = j;
        job_index_add(ota, j);
        ota->n_jobs++;
        job_open_update(ota, j);
        return j;
}

static json_t *job_to_json(const OtaJob *j) {
        json_t *o = json_pack("{s:s, s:s, s:s?, s:s?, s:s?, s:s?, s:s?, s:b, s:I, s:s, s:s, s:O}", "job", j->id,
                              "device", j->device, "package", j->package, "version", j->version, "state",
                              j->state, "code", j->code, "reason", j->reason, "final", state_final(j->state), "seq",
                              (json_int_t)j->seq, "created_at", j->created, "updated_at", j->updated, "history",
                              j->history);

        if (o && j->total > 0 &&
            json_object_set_new(o, "progress", json_pack("{s:I, s:I}", "bytes", (json_int_t)j->bytes, "total",
                                                         (json_int_t)j->total)) < 0) {
                json_decref(o);
                return NULL;
        }
        return o;
}

static void waiters_wake(const OtaJob *j);
static void job_update_resend(OtaJob *j);

static int set_str(char **dst, const char *v) {
        char *c = NULL;

        if (v && !(c = strdup(v)))
                return -ENOMEM;
        free(*dst);
        *dst = c;
        return 0;
}

/* Move a job to state (with optional code and reason), remember it in the
 * history, tell API waiters and event streams. */
static void job_set_state(OtaJob *j, const char *state, const char *code, const char *reason) {
        Ota *ota = j->ota;
        bool changed = !j->state || !streq(j->state, state);
        ProtoEvent e;
        _cleanup_free_ char *data = NULL;
        char name[TETHER_EVENT_NAME_MAX + 1], at[32];
        json_t *ev;
        int r;

        if (set_str(&j->state, state) < 0 || set_str(&j->code, code) < 0 || set_str(&j->reason, reason) < 0) {
                log_error("Out of memory updating OTA job %s.", j->id);
                return;
        }
        timestamp(j->updated);
        j->seq++;
        if (!streq(state, "sent") && !streq(state, "queued")) {
                free(j->manifest);
                j->manifest = NULL;
                if (j->resend) {
                        j->resend = false;
                        ota->n_resend--;
                }
                send_list_remove(ota, j);
        }
        job_open_update(ota, j);
        if (changed) {
                json_t *h = json_pack("{s:s, s:s}", "state", state, "at", j->updated);

                if (h && code)
                        json_object_set_new(h, "code", json_string(code));
                if (h && reason)
                        json_object_set_new(h, "reason", json_string(reason));
                if (h && json_array_size(j->history) < OTA_HISTORY_MAX)
                        json_array_append_new(j->history, h);
                else
                        json_decref(h);
                /* One line per change. A device cannot make many: each
                 * change it reports takes an event from its limits
                 * (ota_device_request()), and none comes after its final
                 * report; so at most DeviceEventRate= lines a second (and
                 * the burst), unless the operator turned the limits off. */
                log_info("OTA job %s on device '%s': %s%s%s%s", j->id, j->device, state, reason ? " (" : "",
                         reason ? reason : "", reason ? ")" : "");
        }
        waiters_wake(j);

        /* Every change is also an event from the device. */
        ev = json_pack("{s:s, s:s, s:s?, s:s?, s:s?, s:s?, s:b}", "job", j->id, "state", state, "code", code,
                       "reason", reason, "package", j->package, "version", j->version, "final",
                       state_final(state));
        if (ev && j->total > 0) {
                json_object_set_new(ev, "bytes", json_integer((json_int_t)j->bytes));
                json_object_set_new(ev, "total", json_integer((json_int_t)j->total));
        }
        data = ev ? json_dumps(ev, JSON_COMPACT) : NULL;
        json_decref(ev);
        if (!data)
                return;
        snprintf(name, sizeof(name), "tether/ota/%s", j->id);
        proto_timestamp_now(at);
        e = (ProtoEvent){ .name = name, .data = data, .ttl = PROTO_DEFAULT_TTL, .published_at = at,
                          .coreid = j->device };
        /* Journaled like every routed event, so that subscribers that
         * resume (Last-Event-ID) see every state. The job's own record
         * does not depend on it. */
        r = events_store(ota->events, &e, devices_find(ota->devices, j->device), 0, 0, NULL);
        if (r < 0)
                log_warning_errno(r, "Failed to store the event for job %s (%s), not routing it: %m", j->id, state);
        if (changed && ota->job_hooks.job_changed)
                ota->job_hooks.job_changed(ota->job_hooks.userdata, j->id, j->device, state);
}

static void job_try_send(Ota *ota, OtaJob *j);

static int job_retry_cb(sd_event_source *s, uint64_t usec, void *userdata) {
        OtaJob *j = userdata;

        job_try_send(j->ota, j);
        return 0;
}

/* j's request could not be sent although its device is online here (it
 * does not read what is sent to it, or memory ran out): try again after a
 * backoff while the device stays online, so that the job does not wait
 * for the device's next connection (which sends it anyway). */
static void job_send_later(Ota *ota, OtaJob *j, int error) {
        unsigned n = j->send_failures < 6 ? j->send_failures : 6;
        uint64_t delay = USEC_PER_SEC << n;
        int r;

        if (delay > OTA_SEND_RETRY_MAX_USEC)
                delay = OTA_SEND_RETRY_MAX_USEC;
        if (j->send_failures++ == 0)
                log_warning_errno(error, "OTA job %s: cannot send the update request to device '%s' (%m): trying "
                                  "again in %llu s.", j->id, j->device,
                                  (unsigned long long)(delay / USEC_PER_SEC));
        else
                log_debug_errno(error, "OTA job %s: cannot send the update request to device '%s' (%m), %u times: "
                                "trying again in %llu s.", j->id, j->device, j->send_failures,
                                (unsigned long long)(delay / USEC_PER_SEC));
        if (j->retry_timer) {
                r = sd_event_source_set_time_relative(j->retry_timer, delay);
                if (r >= 0)
                        r = sd_event_source_set_enabled(j->retry_timer, SD_EVENT_ONESHOT);
        } else
                r = sd_event_add_time_relative(ota->event, &j->retry_timer, CLOCK_MONOTONIC, delay,
                                               USEC_PER_SEC / 10, job_retry_cb, j);
        if (r < 0)
                log_warning_errno(r, "OTA job %s: cannot arm its retry, it is sent on the device's next "
                                  "connection: %m", j->id);
}

/* The device's answer to POST /o/JOB. */
static void job_sent(int error, unsigned code, const uint8_t *data, size_t len, void *userdata) {
        _cleanup_free_ char *text = NULL;
        OtaJob *j = userdata;
        const char *colon;
        char rcode[32] = "";

        j->call = NULL;
        if (error == -ETIMEDOUT) {
                /* It may still have taken the job: its reports would say so. */
                if (j->state && streq(j->state, "sent")) {
                        job_set_state(j, "failed", "no-answer", "the device did not answer the update request");
                        (void)job_store(j, true);
                }
                return;
        }
        if (error < 0) {
                if (j->state && streq(j->state, "sent") && j->from_queue && j->ota->running) {
                        /* Queued for a device that may come and go: it goes
                         * out again when the device is back (tetherd
                         * answers a job it has already as a retry). */
                        Device *d = devices_find(j->ota->devices, j->device);

                        job_set_state(j, "queued", NULL, NULL);
                        job_update_resend(j);
                        (void)job_store(j, false);
                        /* Online here all the same (a new session may
                         * have replaced the one it went out on): again
                         * soon, not only on the next connection. */
                        if (d && device_session(d) && j->resend)
                                job_send_later(j->ota, j, error);
                        return;
                }
                if (j->state && streq(j->state, "sent")) {
                        job_set_state(j, "failed", "offline", "the device went offline before it answered");
                        (void)job_store(j, true);
                }
                return;
        }
        if (code >> 5 == 2) {
                /* Reports may have overtaken the answer. */
                if (j->state && streq(j->state, "sent")) {
                        job_set_state(j, "accepted", NULL, NULL);
                        (void)job_store(j, false);
                }
                return;
        }
        /* "CODE: reason" text from the device */
        text = strndup(len ? (const char *)data : "", len);
        if (!text || proto_utf8_check(text, strlen(text)) < 0) {
                free(text);
                text = strdup("the device refused the update");
        }
        colon = text ? strstr(text, ": ") : NULL;
        if (colon && (size_t)(colon - text) < sizeof(rcode) &&
            strspn(text, "abcdefghijklmnopqrstuvwxyz-") == (size_t)(colon - text)) {
                memcpy(rcode, text, (size_t)(colon - text));
                rcode[colon - text] = 0;
                job_set_state(j, "rejected", rcode, colon + 2);
        } else
                job_set_state(j, "rejected", code == COAP_RESPONSE_CODE(503) ? "busy" : "refused", text);
        /* The device did not take it: it has nothing to report. */
        j->closed = true;
        (void)job_store(j, true);
}

/* A random job id no job here has. */
static int job_new_id(Ota *ota, char id[static OTA_JOB_ID_LEN + 1]) {
        uint8_t rnd[OTA_JOB_ID_LEN / 2];

        do {
                if (getrandom(rnd, sizeof(rnd), 0) != sizeof(rnd))
                        return -EIO;
                hex_encode(rnd, sizeof(rnd), id);
        } while (job_find(ota, id));
        return 0;
}

unsigned ota_api_start_job(Ota *ota, Device *d, json_t *params, json_t **ret_body) {
        json_t *m = json_object_get(params, "manifest");
        char id[OTA_JOB_ID_LEN + 1];
        ManifestEnvelope env;
        Manifest man = {};
        const char *text, *err = NULL;
        size_t len;
        OtaJob *j;
        int r;

        if (!json_is_string(m)) {
                if (json_object_get(params, "file"))
                        *ret_body = json_pack("{s:b, s:s}", "ok", 0, "error",
                                              "Firmware files are not supported: send a signed tether manifest as "
                                              "\"manifest\" (tether ota DEVICE FILE.deb)");
                else
                        *ret_body = json_pack("{s:b, s:s}", "ok", 0, "error", "\"manifest\" is required");
                return MHD_HTTP_BAD_REQUEST;
        }
        text = json_string_value(m);
        len = json_string_length(m);
        /* Shape only: the device verifies the signature, we cannot. */
        r = manifest_envelope_split((const uint8_t *)text, len, &env);
        if (r == -EPROTONOSUPPORT) {
                *ret_body = json_pack("{s:b, s:s}", "ok", 0, "error",
                                      "Manifest format 1 is no longer accepted (it names no devices and can be "
                                      "replayed): sign it again with this version's 'tether ota sign' (docs/ota.md)");
                return MHD_HTTP_BAD_REQUEST;
        }
        if (r < 0 || manifest_body_parse(env.body, env.body_len, &man, &err) < 0) {
                *ret_body = json_pack("{s:b, s:s, s:s?}", "ok", 0, "error", "Not a signed tether manifest", "info",
                                      err);
                return MHD_HTTP_BAD_REQUEST;
        }
        {
                const OtaJob *open = job_open_of(ota, device_id(d));

                if (open) {
                        char msg[128];

                        manifest_done(&man);
                        snprintf(msg, sizeof(msg), "device %s has an open job %s", device_id(d), open->id);
                        *ret_body = json_pack("{s:b, s:s, s:s}", "ok", 0, "error", msg, "job", open->id);
                        return MHD_HTTP_CONFLICT;
                }
        }
        if (!device_connected(d)) {
                manifest_done(&man);
                *ret_body = json_pack("{s:b, s:s}", "ok", 0, "error", "Device is offline");
                return MHD_HTTP_SERVICE_UNAVAILABLE;
        }
        if (job_new_id(ota, id) < 0) {
                manifest_done(&man);
                *ret_body = json_pack("{s:b, s:s}", "ok", 0, "error", "No randomness for a job id");
                return MHD_HTTP_INTERNAL_SERVER_ERROR;
        }

        j = job_new(ota, id, device_id(d), man.package, man.version);
        if (j)
                j->sha256 = TAKE_PTR(man.sha256);
        manifest_done(&man);
        if (!j) {
                *ret_body = NULL;
                return MHD_HTTP_INTERNAL_SERVER_ERROR;
        }
        j->manifest = strndup(text, len);
        if (!j->manifest) {
                job_set_state(j, "failed", "offline", "the update request could not be sent");
                j->closed = true;
                (void)job_store(j, true);
                *ret_body = NULL;
                return MHD_HTTP_INTERNAL_SERVER_ERROR;
        }
        r = devices_call(d, COAP_REQUEST_CODE_POST, PROTO_PATH_OTA, id, text, len, job_sent, j, &j->call);
        if (r < 0) {
                job_set_state(j, "failed", "offline", "the update request could not be sent");
                j->closed = true; /* the device never saw it */
                (void)job_store(j, true);
                *ret_body = json_pack("{s:b, s:s, s:o}", "ok", 0, "error",
                                      r == -ENOTCONN ? "Device is offline" : "Failed to send the update request",
                                      "job", job_to_json(j));
                return r == -ENOTCONN ? MHD_HTTP_SERVICE_UNAVAILABLE : MHD_HTTP_BAD_GATEWAY;
        }
        job_set_state(j, "sent", NULL, NULL);
        /* On disk before the API answers: a job that was reported
         * started is never forgotten, and after a crash the request goes
         * out again when the device connects (ota_device_online()). */
        (void)job_store(j, true);
        *ret_body = json_pack("{s:b, s:s, s:o}", "ok", 1, "id", device_id(d), "job", job_to_json(j));
        return MHD_HTTP_OK;
}

/* ---- jobs across restarts ------------------------------------------------------ */

static char *column_strdup(sqlite3_stmt *st, int i, bool *oom) {
        const char *t = (const char *)sqlite3_column_text(st, i);
        char *c = t ? strdup(t) : NULL;

        if (t && !c)
                *oom = true;
        return c;
}

#define OTA_JOB_COLUMNS                                                                                           \
        "id, device, package, version, state, code, reason, bytes, total, seq, device_seq, closed, final_seq, "  \
        "history, created_at, updated_at, manifest, sha256"

/* The job of a row of ota_jobs (its columns as OTA_JOB_COLUMNS), not in
 * the list yet: -EINVAL for a row this program could not have written,
 * -ENOMEM. */
static int job_from_row(Ota *ota, sqlite3_stmt *st, OtaJob **ret) {
        const char *id = (const char *)sqlite3_column_text(st, 0);
        const char *device = (const char *)sqlite3_column_text(st, 1);
        const char *created = (const char *)sqlite3_column_text(st, 14);
        const char *updated = (const char *)sqlite3_column_text(st, 15);
        const char *history = (const char *)sqlite3_column_text(st, 13);
        bool oom = false;
        OtaJob *j;

        if (!id || !ota_job_id_valid(id, strlen(id)) || !device ||
            proto_name_check(device, strlen(device), PROTO_NAME_DEVICE) < 0 || !created || !updated ||
            strlen(created) >= sizeof(j->created) || strlen(updated) >= sizeof(j->updated))
                return -EINVAL;
        j = calloc(1, sizeof(*j));
        if (!j)
                return -ENOMEM;
        j->ota = ota;
        snprintf(j->id, sizeof(j->id), "%s", id);
        j->device = column_strdup(st, 1, &oom);
        j->package = column_strdup(st, 2, &oom);
        j->version = column_strdup(st, 3, &oom);
        j->state = column_strdup(st, 4, &oom);
        j->code = column_strdup(st, 5, &oom);
        j->reason = column_strdup(st, 6, &oom);
        j->bytes = (uint64_t)sqlite3_column_int64(st, 7);
        j->total = (uint64_t)sqlite3_column_int64(st, 8);
        j->seq = (uint64_t)sqlite3_column_int64(st, 9);
        j->device_seq = (uint64_t)sqlite3_column_int64(st, 10);
        j->closed = sqlite3_column_int(st, 11) != 0;
        j->final_seq = (uint64_t)sqlite3_column_int64(st, 12);
        j->history = history ? json_loads(history, 0, NULL) : NULL;
        if (!json_is_array(j->history)) {
                json_decref(j->history);
                j->history = json_array();
        }
        snprintf(j->created, sizeof(j->created), "%s", created);
        snprintf(j->updated, sizeof(j->updated), "%s", updated);
        j->manifest = column_strdup(st, 16, &oom);
        j->sha256 = column_strdup(st, 17, &oom);
        if (j->sha256 && !manifest_sha256_valid(j->sha256)) {
                free(j->sha256);
                j->sha256 = NULL;
        }
        if (oom || !j->history) {
                job_free(j);
                return -ENOMEM;
        }
        *ret = j;
        return 0;
}

/* Whether j is an open job without a manifest of its own: its maker
 * (ota_job_queue_shared()) gives it through OtaJobHooks.manifest when it
 * is sent. Every other job keeps its manifest while "queued" or "sent". */
static bool job_manifest_shared(const OtaJob *j) {
        return !j->manifest && j->state && (streq(j->state, "sent") || streq(j->state, "queued"));
}

/* Sent, and the cloud stopped (or the node that sent it lost the
 * device) before the device answered: it may or may not have the request.
 * Sending it again settles that (tetherd answers a job it has as a
 * retry). */
static void job_update_resend(OtaJob *j) {
        bool resend = j->state && (streq(j->state, "sent") || streq(j->state, "queued")) && !j->closed &&
                      !j->call;

        if (resend != j->resend) {
                j->resend = resend;
                if (resend)
                        j->ota->n_resend++;
                else
                        j->ota->n_resend--;
        }
}

/* Put j in the list, which is newest first (by created_at). */
static void job_link(Ota *ota, OtaJob *j) {
        OtaJob **p = &ota->jobs;

        while (*p && strcmp((*p)->created, j->created) > 0)
                p = &(*p)->next;
        j->next = *p;
        *p = j;
        job_index_add(ota, j);
        ota->n_jobs++;
        job_open_update(ota, j);
}

/* Read the jobs of the Store, oldest first, so the list ends newest
 * first. A row that is not a job this program could have written is
 * skipped with a warning. */
static int ota_load(Ota *ota) {
        sqlite3_stmt *st = NULL;
        size_t n = 0, skipped = 0;
        int rc;

        rc = sqlite3_prepare_v2(store_db(ota->store),
                                "SELECT " OTA_JOB_COLUMNS " FROM ota_jobs ORDER BY created_at, rowid", -1, &st, NULL);
        while (rc == SQLITE_OK && (rc = sqlite3_step(st)) == SQLITE_ROW) {
                const char *id = (const char *)sqlite3_column_text(st, 0);
                OtaJob *j = NULL;
                int r;

                rc = SQLITE_OK;
                r = id && job_find(ota, id) ? -EINVAL : job_from_row(ota, st, &j);
                if (r == -EINVAL) {
                        skipped++;
                        continue;
                }
                if (r < 0) {
                        rc = SQLITE_ROW;
                        break;
                }
                job_update_resend(j);
                j->next = ota->jobs;
                ota->jobs = j;
                job_index_add(ota, j);
                ota->n_jobs++;
                job_open_update(ota, j);
                n++;
        }
        sqlite3_finalize(st);
        if (rc == SQLITE_ROW)
                return log_error_errno(-ENOMEM, "Out of memory loading the OTA jobs.");
        if (rc != SQLITE_DONE)
                return store_error(ota->store, rc, "reading the OTA jobs");
        if (skipped > 0)
                log_warning("Skipped %zu OTA job record(s) in the cloud database that are not valid.", skipped);
        if (n > 0)
                log_info("Loaded %zu OTA job(s), %zu to be sent again when their device connects.", n,
                         ota->n_resend);
        return 0;
}

/* ---- jobs changed by other cluster nodes ------------------------------------------ */

#define SWAP_PTR(a, b)                                                                                            \
        do {                                                                                                      \
                __typeof__(a) _t = (a);                                                                           \
                (a) = (b);                                                                                        \
                (b) = _t;                                                                                         \
        } while (0)

static bool streq_ptr(const char *a, const char *b) {
        return a == b || (a && b && streq(a, b));
}

/* Which of two copies of a job is further along: the device's own
 * counter first (its reports are applied in order, each once), then
 * whether it said the job is over, then the cloud's counter. */
static int job_version_cmp(const OtaJob *a, const OtaJob *b) {
        if (a->device_seq != b->device_seq)
                return a->device_seq < b->device_seq ? -1 : 1;
        if (a->closed != b->closed)
                return a->closed ? 1 : -1;
        if (a->seq != b->seq)
                return a->seq < b->seq ? -1 : 1;
        return 0;
}

static bool job_same(const OtaJob *a, const OtaJob *b) {
        return job_version_cmp(a, b) == 0 && streq_ptr(a->state, b->state) && streq_ptr(a->code, b->code) &&
               a->bytes == b->bytes && json_equal(a->history, b->history);
}

/* The device's session is on this node: this node drives its jobs. */
static bool job_driven_here(Ota *ota, const OtaJob *j) {
        Device *d = devices_find(ota->devices, j->device);

        return d && device_connected(d);
}

/* Take the row's copy (from) into j: everything but what is this node's
 * (the call in flight, the list). */
static void job_take(OtaJob *j, OtaJob *from) {
        SWAP_PTR(j->package, from->package);
        SWAP_PTR(j->version, from->version);
        SWAP_PTR(j->state, from->state);
        SWAP_PTR(j->code, from->code);
        SWAP_PTR(j->reason, from->reason);
        SWAP_PTR(j->history, from->history);
        SWAP_PTR(j->manifest, from->manifest);
        SWAP_PTR(j->sha256, from->sha256);
        j->bytes = from->bytes;
        j->total = from->total;
        j->seq = from->seq;
        j->device_seq = from->device_seq;
        j->closed = from->closed;
        j->final_seq = from->final_seq;
        memcpy(j->updated, from->updated, sizeof(j->updated));
        job_update_resend(j);
        job_open_update(j->ota, j);
}

void ota_set_cluster(Ota *ota, Artifacts *artifacts) {
        ota->cluster = true;
        ota->artifacts = artifacts;
}

void ota_job_changed(Ota *ota, const char *id) {
        sqlite3_stmt *st = NULL;
        OtaJob *j = job_find(ota, id), *row = NULL;
        int rc, r;

        rc = sqlite3_prepare_v2(store_db(ota->store), "SELECT " OTA_JOB_COLUMNS " FROM ota_jobs WHERE id = ?1", -1,
                                &st, NULL);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_text(st, 1, id, -1, SQLITE_TRANSIENT);
        if (rc == SQLITE_OK)
                rc = sqlite3_step(st);
        if (rc != SQLITE_ROW)
                st = (sqlite3_finalize(st), NULL);
        if (rc == SQLITE_DONE) {
                /* Deleted elsewhere (the oldest finished jobs are pruned). A
                 * job this node is sending stays, and goes back. */
                if (!j)
                        return;
                if (job_driven_here(ota, j) && !state_final(j->state)) {
                        (void)job_store(j, true);
                        return;
                }
                for (OtaJob **p = &ota->jobs; *p; p = &(*p)->next)
                        if (*p == j) {
                                *p = j->next;
                                break;
                        }
                if (j->resend)
                        ota->n_resend--;
                job_unindex(ota, j);
                ota->n_jobs--;
                job_free(j);
                return;
        }
        if (rc != SQLITE_ROW) {
                (void)store_error(ota->store, rc, "reading an OTA job another node changed");
                return;
        }
        r = job_from_row(ota, st, &row);
        sqlite3_finalize(st);
        if (r < 0) {
                log_warning_errno(r, "OTA job %s changed on another node cannot be read: %m", id);
                return;
        }
        if (!j) {
                /* Made on another node. */
                jobs_prune(ota);
                job_update_resend(row);
                job_link(ota, row);
                waiters_wake(row);
                log_debug("OTA job %s on device '%s' made on another node: %s.", row->id, row->device,
                          row->state ?: "?");
                if (row->resend && job_driven_here(ota, row))
                        ota_send_queued(ota);
                if (row->state && ota->job_hooks.job_changed)
                        ota->job_hooks.job_changed(ota->job_hooks.userdata, row->id, row->device, row->state);
                return;
        }
        if (job_same(row, j)) {
                job_free(row);
                return;
        }
        r = job_version_cmp(row, j);
        if (r > 0 || (r == 0 && !job_driven_here(ota, j))) {
                /* Further along (or as far, and another node drives it). */
                bool moved = !streq_ptr(j->state, row->state);

                job_take(j, row);
                waiters_wake(j);
                if (j->resend && job_driven_here(ota, j))
                        ota_send_queued(ota);
                /* The campaigns' leader counts jobs other nodes drive. */
                if (moved && j->state && ota->job_hooks.job_changed)
                        ota->job_hooks.job_changed(ota->job_hooks.userdata, j->id, j->device, j->state);
        } else if (job_driven_here(ota, j)) {
                /* An older copy came over this node's (its own change
                 * coming back after a later one, or a node that lost the
                 * device and wrote what it saw then): this node drives the
                 * job, its copy goes back to every node. As far along but
                 * different counts one more, so that no node keeps the
                 * other copy as an equal. Not counted when older: the later
                 * change is on its way already, and a bump would chase it. */
                if (r == 0) {
                        j->seq = (j->seq > row->seq ? j->seq : row->seq) + 1;
                        timestamp(j->updated);
                        waiters_wake(j);
                }
                (void)job_store(j, true);
        }
        /* Else older, and this node does not drive it: the node that does
         * sends its copy again. */
        job_free(row);
}

/* Send j's request (again) if its device has a session here and its
 * owner lets it go now. */
static void job_try_send(Ota *ota, OtaJob *j) {
        bool queued = j->state && streq(j->state, "queued");
        const char *text = NULL;
        size_t len = 0;
        Device *d;
        int r;

        if (!j->resend || j->call)
                return;
        d = devices_find(ota->devices, j->device);
        if (!d || !device_session(d))
                return;
        if (queued && ota->job_hooks.may_send && !ota->job_hooks.may_send(ota->job_hooks.userdata, j->id))
                return;
        if (j->manifest) {
                text = j->manifest;
                len = strlen(j->manifest);
        } else if (!ota->job_hooks.manifest ||
                   ota->job_hooks.manifest(ota->job_hooks.userdata, j->id, j->device, &text, &len) < 0) {
                /* Its maker no longer has it (a forgotten campaign hands
                 * its manifests over first, so this is a job whose maker
                 * is gone). */
                log_warning("OTA job %s: no manifest to send to device '%s'.", j->id, j->device);
                j->resend = false;
                ota->n_resend--;
                if (queued) {
                        job_set_state(j, "failed", "no-manifest", "the manifest of the queued job is gone");
                        j->closed = true; /* the device never saw it */
                        (void)job_store(j, false);
                }
                return;
        }
        r = devices_call(d, COAP_REQUEST_CODE_POST, PROTO_PATH_OTA, j->id, text, len, job_sent, j, &j->call);
        if (r == -E2BIG) {
                /* Not in this device's messages (its CSM), however often. */
                job_set_state(j, "failed", "too-large",
                              "the update request is larger than the device's messages (CSM Max-Message-Size)");
                j->closed = true; /* the device never saw it */
                (void)job_store(j, true);
                return;
        }
        if (r < 0)
                return job_send_later(ota, j, r);
        j->send_failures = 0;
        j->resend = false;
        ota->n_resend--;
        if (queued) {
                j->from_queue = true;
                job_set_state(j, "sent", NULL, NULL);
                (void)job_store(j, false);
                log_info("OTA job %s: sent the queued update request to device '%s'.", j->id, j->device);
        } else
                log_info("OTA job %s: sent the update request to device '%s' again (the cloud stopped before "
                         "it answered).", j->id, j->device);
}

static int resend_defer_cb(sd_event_source *s, void *userdata) {
        Ota *ota = userdata;

        while (ota->send_list) {
                OtaJob *j = ota->send_list;

                send_list_remove(ota, j);
                job_try_send(ota, j);
        }
        if (ota->send_scan) {
                ota->send_scan = false;
                for (OtaJob *j = ota->jobs; j && ota->n_resend > 0; j = j->next)
                        job_try_send(ota, j);
        }
        return 0;
}

void ota_device_online(Ota *ota, Device *d) {
        OtaJob *j;

        /* From the loop, not inside libcoap's handling of the session.
         * The device's open jobs are in the index (at most one, unless
         * the index lacks some: then every job is looked at). */
        if (ota->n_resend == 0 || !ota->resend_defer)
                return;
        if (ota->index_incomplete)
                ota->send_scan = true;
        else if (ota->open_nbuckets)
                for (j = ota->open_buckets[ota_hash(ota, device_id(d)) & (ota->open_nbuckets - 1)]; j;
                     j = j->open_next)
                        if (j->resend && !j->send_listed && streq(j->device, device_id(d))) {
                                j->send_next = ota->send_list;
                                ota->send_list = j;
                                j->send_listed = true;
                        }
        (void)sd_event_source_set_enabled(ota->resend_defer, SD_EVENT_ONESHOT);
}

void ota_send_queued(Ota *ota) {
        if (ota->n_resend == 0 || !ota->resend_defer)
                return;
        ota->send_scan = true;
        (void)sd_event_source_set_enabled(ota->resend_defer, SD_EVENT_ONESHOT);
}

void ota_set_job_hooks(Ota *ota, const OtaJobHooks *hooks) {
        ota->job_hooks = hooks ? *hooks : (OtaJobHooks){};
}

const char *ota_device_open_job(Ota *ota, const char *device) {
        const OtaJob *j = job_open_of(ota, device);

        return j ? j->id : NULL;
}

const char *ota_job_state(Ota *ota, const char *id) {
        const OtaJob *j = job_find(ota, id);

        return j ? j->state : NULL;
}

/* A new "queued" job for device: with a copy of manifest (len bytes), or
 * with none (NULL: its maker gives it when it is sent). */
static int job_queue(Ota *ota, const char *device, const char *package, const char *version, const char *sha256,
                     const char *manifest, size_t len, char ret_id[static OTA_JOB_ID_MAX + 1],
                     const char **ret_error) {
        char id[OTA_JOB_ID_LEN + 1];
        Device *d;
        OtaJob *j;

        if (job_open_of(ota, device)) {
                *ret_error = "the device has an open job";
                return -EBUSY;
        }
        if (job_new_id(ota, id) < 0) {
                *ret_error = "no randomness for a job id";
                return -EIO;
        }
        j = job_new(ota, id, device, package, version);
        if (j && sha256) /* the artifact the device may fetch over its connection */
                j->sha256 = strdup(sha256);
        if (!j || (sha256 && !j->sha256) || (manifest && !(j->manifest = strndup(manifest, len)))) {
                if (j) {
                        job_set_state(j, "failed", "offline", "out of memory");
                        j->closed = true;
                        (void)job_store(j, false);
                }
                *ret_error = "out of memory";
                return -ENOMEM;
        }
        j->from_queue = true;
        job_set_state(j, "queued", NULL, NULL);
        job_update_resend(j);
        (void)job_store(j, false);
        /* Online here: it goes out from the defer, as after a connect. */
        d = devices_find(ota->devices, device);
        if (d && device_session(d))
                ota_device_online(ota, d);
        memcpy(ret_id, id, OTA_JOB_ID_LEN + 1);
        return 0;
}

int ota_job_queue(Ota *ota, const char *device, const char *manifest, size_t len,
                  char ret_id[static OTA_JOB_ID_MAX + 1],
                  const char **ret_error) {
        ManifestEnvelope env;
        Manifest man = {};
        const char *err = NULL;
        int r;

        if (proto_name_check(device, strlen(device), PROTO_NAME_DEVICE) < 0) {
                *ret_error = "not a device id";
                return -EINVAL;
        }
        r = manifest_envelope_split((const uint8_t *)manifest, len, &env);
        if (r < 0 || manifest_body_parse(env.body, env.body_len, &man, &err) < 0) {
                *ret_error = "not a signed tether manifest";
                return -EINVAL;
        }
        r = job_queue(ota, device, man.package, man.version, man.sha256, manifest, len, ret_id, ret_error);
        manifest_done(&man);
        return r;
}

int ota_job_queue_shared(Ota *ota, const char *device, const char *package, const char *version,
                         const char *sha256, char ret_id[static OTA_JOB_ID_MAX + 1], const char **ret_error) {
        if (proto_name_check(device, strlen(device), PROTO_NAME_DEVICE) < 0) {
                *ret_error = "not a device id";
                return -EINVAL;
        }
        if (!ota->job_hooks.manifest) {
                *ret_error = "no maker of manifests";
                return -EINVAL;
        }
        if (sha256 && !manifest_sha256_valid(sha256)) {
                *ret_error = "not an artifact hash";
                return -EINVAL;
        }
        return job_queue(ota, device, package, version, sha256, NULL, 0, ret_id, ret_error);
}

int ota_job_adopt_manifest(Ota *ota, const char *id, const char *manifest, size_t len) {
        OtaJob *j = job_find(ota, id);

        if (!j)
                return -ENOENT;
        if (!job_manifest_shared(j))
                return 0;
        j->manifest = strndup(manifest, len);
        if (!j->manifest)
                return -ENOMEM;
        (void)job_store(j, false);
        return 1;
}

int ota_job_cancel(Ota *ota, const char *id, const char *code, const char *reason) {
        OtaJob *j = job_find(ota, id);

        if (!j)
                return -ENOENT;
        if (!j->state || !streq(j->state, "queued") || j->call)
                return -EBUSY;
        job_set_state(j, "failed", code, reason);
        j->closed = true; /* the device never saw it */
        (void)job_store(j, false);
        return 0;
}

/* ---- device reports ------------------------------------------------------ */

static void reply_text(coap_pdu_t *response, coap_pdu_code_t code, const char *text) {
        uint8_t buf[4];

        coap_pdu_set_code(response, code);
        coap_add_option(response, COAP_OPTION_CONTENT_FORMAT, coap_encode_var_safe(buf, sizeof(buf), PROTO_CF_TEXT),
                        buf);
        coap_add_data(response, strlen(text), (const uint8_t *)text);
}

/* Past the device's limits (RFC 8516): retry after Max-Age seconds;
 * tetherd keeps the report and sends it again then (agent/ota.c). */
static void reply_too_many(coap_pdu_t *response, unsigned wait) {
        static const char text[] = "reporting too fast: retry later";
        uint8_t buf[4];

        coap_pdu_set_code(response, COAP_RESPONSE_CODE(429));
        coap_add_option(response, COAP_OPTION_CONTENT_FORMAT, coap_encode_var_safe(buf, sizeof(buf), PROTO_CF_TEXT),
                        buf);
        coap_add_option(response, COAP_OPTION_MAXAGE, coap_encode_var_safe(buf, sizeof(buf), wait), buf);
        coap_add_data(response, strlen(text), (const uint8_t *)text);
}

/* A text of a device's report (code, reason): UTF-8 of at most 512 bytes,
 * or NULL. Its control characters (C0, DEL, C1) become spaces: tether ota
 * prints the reason, and the device does not get to send escape sequences
 * to the operator's terminal. */
static const char *json_str(json_t *o, const char *key) {
        json_t *v = json_object_get(o, key);
        size_t len;

        if (!json_is_string(v) || strlen(json_string_value(v)) != json_string_length(v) ||
            proto_utf8_check(json_string_value(v), json_string_length(v)) < 0 || json_string_length(v) > 512)
                return NULL;
        len = json_string_length(v);
        if (!proto_text_clean(json_string_value(v), len, 512)) {
                char text[513];

                memcpy(text, json_string_value(v), len);
                for (size_t i = 0; i < len; i++) {
                        unsigned char c = (unsigned char)text[i];

                        if (c < 0x20 || c == 0x7f)
                                text[i] = ' ';
                        else if (c == 0xc2 && i + 1 < len && (unsigned char)text[i + 1] >= 0x80 &&
                                 (unsigned char)text[i + 1] <= 0x9f) {
                                text[i] = ' ';
                                text[++i] = ' ';
                        }
                }
                if (json_string_setn(v, text, len) < 0)
                        return NULL;
        }
        return json_string_value(v);
}

void ota_device_request(Ota *ota, Device *d, const coap_pdu_t *request, const char *job, coap_pdu_t *response) {
        const uint8_t *data = NULL;
        size_t len = 0;
        json_int_t seq;
        json_t *o, *seqv;
        const char *state;
        bool apply;
        OtaJob *j;

        if (coap_pdu_get_code(request) != COAP_REQUEST_CODE_POST)
                return reply_text(response, COAP_RESPONSE_CODE(405), "use POST on /o/JOB");
        if (!ota_job_id_valid(job, strlen(job)))
                return reply_text(response, COAP_RESPONSE_CODE(400), "invalid job id");
        (void)coap_get_data(request, &len, &data);
        if (len > OTA_REPORT_MAX)
                return reply_text(response, COAP_RESPONSE_CODE(413), "report too large");
        o = json_loadb((const char *)data, len, JSON_REJECT_DUPLICATES, NULL);
        state = json_is_object(o) ? json_str(o, "state") : NULL;
        if (!state || !state_known(state)) {
                json_decref(o);
                return reply_text(response, COAP_RESPONSE_CODE(400), "malformed report");
        }
        /* Only the device's own jobs, the ones this cloud made: a report
         * never creates a job, so no device can push real jobs out of the
         * table (OTA_JOBS_MAX) with made-up ids. The agent takes a 4.xx
         * but 4.29 as final and stops sending that report. */
        j = job_find(ota, job);
        if (!j) {
                json_decref(o);
                log_debug("Device '%s' reported on job %s, which this cloud does not know: refused.",
                          device_id(d), job);
                return reply_text(response, COAP_RESPONSE_CODE(404), "unknown job");
        }
        if (!streq(j->device, device_id(d))) {
                json_decref(o);
                log_debug("Device '%s' reported on job %s of device '%s': refused.", device_id(d), job, j->device);
                return reply_text(response, COAP_RESPONSE_CODE(403), "job belongs to another device");
        }
        seqv = json_object_get(o, "seq");
        seq = json_is_integer(seqv) ? json_integer_value(seqv) : 0;
        if (j->closed) {
                char text[160];

                if (j->final_seq > 0 && seq == (json_int_t)j->final_seq && j->state && streq(state, j->state)) {
                        /* The final report again (its answer was lost): the
                         * same answer, nothing new. */
                        json_decref(o);
                        coap_pdu_set_code(response, COAP_RESPONSE_CODE(204));
                        return;
                }
                json_decref(o);
                log_debug("Device '%s' reported on job %s, which is over (%s): refused.", device_id(d), job,
                          j->state ? j->state : "?");
                if (j->final_seq > 0)
                        snprintf(text, sizeof(text),
                                 "job is over: the device reported '%s' as seq %" PRIu64 "; nothing changes",
                                 j->state ? j->state : "?", j->final_seq);
                else
                        snprintf(text, sizeof(text), "job is over: '%s' before the device took it; nothing changes",
                                 j->state ? j->state : "?");
                return reply_text(response, COAP_RESPONSE_CODE(409), text);
        }
        if (json_is_integer(seqv))
                /* A state report: each applied once, however often it is sent. */
                apply = seq > 0 && (uint64_t)seq > j->device_seq;
        else
                /* Progress: best effort, only while downloading. */
                apply = streq(state, "downloading") && j->state && streq(j->state, "downloading");
        if (apply) {
                /* Each applied report is journaled, routed and maybe logged
                 * like an event: it takes one from the device's limits. */
                unsigned wait = events_device_charge(ota->events, d, len + strlen("tether/ota/") + strlen(job));

                if (wait > 0) {
                        json_decref(o);
                        return reply_too_many(response, wait);
                }
        }
        if (apply && json_is_integer(seqv)) {
                j->device_seq = (uint64_t)seq;
                if (json_is_integer(json_object_get(o, "total"))) {
                        j->total = (uint64_t)json_integer_value(json_object_get(o, "total"));
                        j->bytes = (uint64_t)json_integer_value(json_object_get(o, "bytes"));
                }
                job_set_state(j, state, json_str(o, "code"), json_str(o, "reason"));
                if (j->state && state_final(j->state)) {
                        j->closed = true;
                        j->final_seq = (uint64_t)seq;
                }
                /* A final state is committed before the device is told it
                 * arrived (it stops sending it then); others join the
                 * batch: one lost in a crash is followed by later ones. */
                (void)job_store(j, j->closed);
        } else if (apply) {
                j->bytes = (uint64_t)json_integer_value(json_object_get(o, "bytes"));
                j->total = (uint64_t)json_integer_value(json_object_get(o, "total"));
                timestamp(j->updated);
                j->seq++;
                waiters_wake(j);
                (void)job_store(j, false);
        }
        json_decref(o);
        coap_pdu_set_code(response, COAP_RESPONSE_CODE(204));
}

/* ---- API: waiting for a job to change ----------------------------------------- */

/* ---- artifacts over the device's connection (GET /a/SHA256) ---------------------- */

/* Why a device may fetch sha256: a job of its own that is not over names
 * it. Over: the device ended it (its final report, or its answer refused
 * the job); one the cloud failed itself stays open, as for the device's
 * reports. Those are the device's jobs in the index by device (one open,
 * and the few the cloud failed), so a block does not cost a scan of
 * every job. */
static bool artifact_allowed(Ota *ota, const Device *d, const char *sha256) {
        const char *id = device_id(d);

        if (ota->open_nbuckets)
                for (const OtaJob *j = ota->open_buckets[ota_hash(ota, id) & (ota->open_nbuckets - 1)]; j;
                     j = j->open_next)
                        if (!j->closed && j->sha256 && streq(j->device, id) && streq(j->sha256, sha256))
                                return true;
        for (const OtaJob *j = ota->index_incomplete ? ota->jobs : NULL; j; j = j->next)
                if (!j->closed && j->sha256 && streq(j->device, id) && streq(j->sha256, sha256))
                        return true;
        return false;
}

static void artifact_reply(coap_pdu_t *response, coap_pdu_code_t code, unsigned max_age, const char *text) {
        uint8_t buf[4];

        coap_pdu_set_code(response, code);
        coap_add_option(response, COAP_OPTION_CONTENT_FORMAT, coap_encode_var_safe(buf, sizeof(buf), PROTO_CF_TEXT),
                        buf);
        if (max_age > 0)
                coap_add_option(response, COAP_OPTION_MAXAGE, coap_encode_var_safe(buf, sizeof(buf), max_age), buf);
        coap_add_data(response, strlen(text), (const uint8_t *)text);
}

static int artifact_path(Ota *ota, const char *sha256, char **ret);

static uint8_t hex_nibble(char c) {
        return (uint8_t)(c <= '9' ? c - '0' : c - 'a' + 10);
}

void ota_device_artifact(Ota *ota, Device *d, const coap_pdu_t *request, const char *sha256, coap_pdu_t *response) {
        coap_session_t *session = device_session(d);
        _cleanup_free_ char *path = NULL;
        _cleanup_close_ int fd = -1;
        coap_opt_iterator_t it;
        coap_opt_t *opt;
        uint8_t etag[OTA_COAP_ETAG_LEN], buf[8];
        uint32_t v = 6; /* no Block2: the first 1024 bytes */
        uint64_t unit, offset, len, max_pdu;
        unsigned szx;
        size_t done = 0;
        struct stat st;
        char text[160];

        if (coap_pdu_get_code(request) != COAP_REQUEST_CODE_GET)
                return artifact_reply(response, COAP_RESPONSE_CODE(405), 0, "use GET on /a/SHA256");
        if (!manifest_sha256_valid(sha256))
                return artifact_reply(response, COAP_RESPONSE_CODE(404), 0, "no such artifact");
        if (!artifact_allowed(ota, d, sha256)) {
                /* Unknown: not stored here (one stat, only when refused). */
                if (!ota->config->ota_dir || artifact_path(ota, sha256, &path) < 0 || stat(path, &st) < 0)
                        return artifact_reply(response, COAP_RESPONSE_CODE(404), 0, "no such artifact");
                log_debug("Device '%s' asked for artifact %s, which no open job of its own names: refused.",
                          device_id(d), sha256);
                return artifact_reply(response, COAP_RESPONSE_CODE(403), 0,
                                      "no open update job of this device names this artifact");
        }
        opt = coap_check_option(request, COAP_OPTION_BLOCK2, &it);
        if (opt) {
                if (coap_opt_length(opt) > 3)
                        return artifact_reply(response, COAP_RESPONSE_CODE(402), 0, "malformed Block2 option");
                v = coap_decode_var_bytes(coap_opt_value(opt), coap_opt_length(opt));
        }
        szx = v & 7;
        unit = szx == 7 ? 1024 : 1u << (szx + 4);
        offset = (uint64_t)(v >> 4) * unit;
        if (!ota->config->ota_dir || artifact_path(ota, sha256, &path) < 0)
                return artifact_reply(response, COAP_RESPONSE_CODE(404), 0, "this cloud stores no artifacts");
        fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
        if (fd < 0 || fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
                if (ota->cluster && ota->artifacts) {
                        /* Uploaded to another node: it comes through the
                         * stream (artifacts.c). */
                        log_info("Device '%s' asked for artifact %s, which is not on this node yet.", device_id(d),
                                 sha256);
                        return artifact_reply(response, COAP_RESPONSE_CODE(503), OTA_COAP_RETRY_SEC,
                                              "the artifact is not on this node yet: try again");
                }
                log_warning("Device '%s' asked for artifact %s of an open job, which is not stored in '%s'.",
                            device_id(d), sha256, ota->config->ota_dir);
                return artifact_reply(response, COAP_RESPONSE_CODE(404), 0, "the artifact is not stored here");
        }
        if (st.st_size <= 0 || offset >= (uint64_t)st.st_size) {
                snprintf(text, sizeof(text), "block %" PRIu32 " (byte %" PRIu64 ") is beyond the artifact's %lld bytes",
                         v >> 4, offset, (long long)st.st_size);
                return artifact_reply(response, COAP_RESPONSE_CODE(402), 0, text);
        }
        /* Room for the token and options besides the payload; a device
         * that takes smaller messages gets smaller blocks (RFC 7959 lets
         * the server choose a smaller SZX; NUM follows). */
        max_pdu = session ? coap_session_max_pdu_size(session) : 0;
        if (szx == 7) {
                len = max_pdu > OTA_COAP_OPTIONS_ROOM ? (max_pdu - OTA_COAP_OPTIONS_ROOM) / 1024 * 1024 : 0;
                if (len > OTA_COAP_BERT_MAX)
                        len = OTA_COAP_BERT_MAX;
                if (len < 2048) {
                        szx = 6;
                        unit = 1024;
                        len = 1024;
                } else
                        unit = 1024;
        } else
                len = unit;
        while (szx > 0 && szx < 7 && unit + OTA_COAP_OPTIONS_ROOM > max_pdu) {
                szx--;
                unit >>= 1;
                len = unit;
        }
        /* Smaller blocks have larger numbers: past Block2's 20 bits the
         * block cannot be named at a size this device takes. */
        if (offset / unit > 0xFFFFF) {
                snprintf(text, sizeof(text), "byte %" PRIu64 " is past what Block2 numbers in the %" PRIu64
                         "-byte blocks this device's messages hold", offset, unit);
                return artifact_reply(response, COAP_RESPONSE_CODE(402), 0, text);
        }
        if (len > (uint64_t)st.st_size - offset)
                len = (uint64_t)st.st_size - offset;
        while (done < len) {
                ssize_t n = pread(fd, ota->block + done, (size_t)(len - done), (off_t)(offset + done));

                if (n < 0 && errno == EINTR)
                        continue;
                if (n <= 0) {
                        log_error_errno(n < 0 ? errno : EIO, "Cannot read artifact '%s' at byte %" PRIu64 ": %m",
                                        path, offset + done);
                        return artifact_reply(response, COAP_RESPONSE_CODE(500), 0, "cannot read the artifact");
                }
                done += (size_t)n;
        }
        for (size_t i = 0; i < OTA_COAP_ETAG_LEN; i++)
                etag[i] = (uint8_t)(hex_nibble(sha256[2 * i]) << 4 | hex_nibble(sha256[2 * i + 1]));
        v = (uint32_t)(offset / unit) << 4 | (offset + len < (uint64_t)st.st_size ? 8u : 0u) | szx;
        coap_pdu_set_code(response, COAP_RESPONSE_CODE(205));
        /* In option number order. */
        if (!coap_add_option(response, COAP_OPTION_ETAG, sizeof(etag), etag) ||
            !coap_add_option(response, COAP_OPTION_CONTENT_FORMAT,
                             coap_encode_var_safe(buf, sizeof(buf), PROTO_CF_OCTETS), buf) ||
            !coap_add_option(response, COAP_OPTION_BLOCK2, coap_encode_var_safe(buf, sizeof(buf), v), buf) ||
            !coap_add_option(response, COAP_OPTION_SIZE2,
                             coap_encode_var_safe8(buf, sizeof(buf), (uint64_t)st.st_size), buf) ||
            !coap_add_data(response, (size_t)len, ota->block)) {
                coap_pdu_set_code(response, COAP_RESPONSE_CODE(500));
                return;
        }
        if (offset == 0)
                log_info("Device '%s' fetches artifact %s (%lld bytes) over its connection, %" PRIu64
                         "-byte blocks.", device_id(d), sha256, (long long)st.st_size, len);
        else
                log_debug("Device '%s' fetches artifact %s from byte %" PRIu64 ".", device_id(d), sha256, offset);
}

static void waiter_unlink(OtaRequest *r) {
        if (!r->suspended)
                return;
        if (r->wait_prev)
                r->wait_prev->wait_next = r->wait_next;
        else
                r->ota->waiters = r->wait_next;
        if (r->wait_next)
                r->wait_next->wait_prev = r->wait_prev;
        r->wait_prev = r->wait_next = NULL;
        r->timer = sd_event_source_disable_unref(r->timer);
}

static void waiter_resume(OtaRequest *r) {
        if (!r->suspended)
                return;
        waiter_unlink(r);
        r->suspended = false;
        MHD_resume_connection(r->connection);
        r->ota->hooks.kick_api(r->ota->hooks.userdata);
}

static void waiters_wake(const OtaJob *j) {
        for (OtaRequest *r = j->ota->waiters, *next; r; r = next) {
                next = r->wait_next;
                if (streq(r->job, j->id))
                        waiter_resume(r);
        }
}

static int waiter_timeout(sd_event_source *s, uint64_t usec, void *userdata) {
        OtaRequest *r = userdata;

        r->expired = true;
        waiter_resume(r);
        return 0;
}

void ota_api_shutdown(Ota *ota) {
        while (ota->waiters) {
                ota->waiters->expired = true;
                waiter_resume(ota->waiters);
        }
}

OtaRequest *ota_api_request_free(OtaRequest *r) {
        if (!r)
                return NULL;
        waiter_unlink(r);
        artifacts_publish_cancel(r->publish);
        if (r->publish_fd >= 0)
                close(r->publish_fd);
        if (r->fd >= 0)
                close(r->fd);
        if (r->tmp_path) {
                (void)unlink(r->tmp_path);
                free(r->tmp_path);
        }
        EVP_MD_CTX_free(r->md);
        json_decref(r->body);
        free(r);
        return NULL;
}

/* ---- API: requests --------------------------------------------------------------- */

static enum MHD_Result queue_json(struct MHD_Connection *c, unsigned status, json_t *j) {
        struct MHD_Response *resp;
        enum MHD_Result ret;
        char *s;

        if (!j)
                return MHD_NO;
        s = json_dumps(j, JSON_COMPACT);
        json_decref(j);
        if (!s)
                return MHD_NO;
        resp = MHD_create_response_from_buffer(strlen(s), s, MHD_RESPMEM_MUST_FREE);
        if (!resp) {
                free(s);
                return MHD_NO;
        }
        (void)MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "application/json");
        ret = MHD_queue_response(c, status, resp);
        MHD_destroy_response(resp);
        return ret;
}

static enum MHD_Result queue_error(struct MHD_Connection *c, unsigned status, const char *error) {
        return queue_json(c, status, json_pack("{s:b, s:s}", "ok", 0, "error", error));
}



static int artifact_path(Ota *ota, const char *sha256, char **ret) {
        return asprintf(ret, "%s/%s.deb", ota->config->ota_dir, sha256) < 0 ? -ENOMEM : 0;
}

/* "url" only with the HTTPS artifact server ([OTA] Port=): without it
 * devices fetch the artifact over their connection (GET /a/SHA256). */
static json_t *artifact_json(Ota *ota, const char *sha256, uint64_t size) {
        _cleanup_free_ char *url = NULL;

        if (ota->public_url && asprintf(&url, "%s/ota/%s.deb", ota->public_url, sha256) < 0)
                return NULL;
        return json_pack("{s:b, s:s, s:I, s:s*}", "ok", 1, "sha256", sha256, "size", (json_int_t)size, "url", url);
}

bool ota_api_owns(const char *url) {
        return startswith(url, "/v1/ota/") || streq(url, "/v1/ota");
}

static int upload_begin(OtaRequest *r) {
        Ota *ota = r->ota;
        const char *cl = MHD_lookup_connection_value(r->connection, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
        _cleanup_free_ char *final = NULL;
        uint64_t max = (uint64_t)ota->config->ota_max_artifact_mb << 20;
        struct stat st;
        char *end;

        if (!cl) {
                r->status = MHD_HTTP_LENGTH_REQUIRED;
                return 0;
        }
        errno = 0;
        r->expected = strtoull(cl, &end, 10);
        if (errno || *end || r->expected == 0) {
                r->status = MHD_HTTP_BAD_REQUEST;
                return 0;
        }
        if (r->expected > max) {
                r->status = MHD_HTTP_CONTENT_TOO_LARGE;
                return 0;
        }
        if (artifact_path(r->ota, r->sha256, &final) < 0)
                return -ENOMEM;
        if (stat(final, &st) == 0) {
                r->exists = true; /* read and drop the body */
                return 0;
        }
        if (asprintf(&r->tmp_path, "%s/.upload-%s-XXXXXX", ota->config->ota_dir, r->sha256) < 0) {
                r->tmp_path = NULL;
                return -ENOMEM;
        }
        r->fd = mkostemp(r->tmp_path, O_CLOEXEC);
        if (r->fd < 0) {
                log_error_errno(errno, "Cannot create '%s': %m", r->tmp_path);
                free(r->tmp_path);
                r->tmp_path = NULL;
                r->status = MHD_HTTP_INTERNAL_SERVER_ERROR;
                return 0;
        }
        (void)fchmod(r->fd, 0644);
        r->md = EVP_MD_CTX_new();
        if (!r->md || EVP_DigestInit_ex(r->md, EVP_sha256(), NULL) != 1)
                return -ENOMEM;
        return 0;
}

static void upload_write(OtaRequest *r, const char *data, size_t n) {
        if (r->status || r->exists)
                return;
        if (r->received + n > r->expected) {
                r->status = MHD_HTTP_BAD_REQUEST;
                return;
        }
        while (n > 0) {
                ssize_t w = write(r->fd, data, n);

                if (w < 0 && errno == EINTR)
                        continue;
                if (w < 0) {
                        log_error_errno(errno, "Cannot write '%s': %m", r->tmp_path);
                        r->status = errno == ENOSPC ? MHD_HTTP_INSUFFICIENT_STORAGE : MHD_HTTP_INTERNAL_SERVER_ERROR;
                        return;
                }
                EVP_DigestUpdate(r->md, data, (size_t)w);
                r->received += (uint64_t)w;
                data += w;
                n -= (size_t)w;
        }
}

static enum MHD_Result upload_publish(OtaRequest *r, const char *final);
static enum MHD_Result upload_answer_published(OtaRequest *r);

static enum MHD_Result upload_end(OtaRequest *r) {
        _cleanup_free_ char *final = NULL;
        uint8_t md[32];
        unsigned mdlen = sizeof(md);
        char hex[65];
        _cleanup_close_ int dfd = -1;

        if (r->exists) {
                struct stat st;

                if (artifact_path(r->ota, r->sha256, &final) < 0 || stat(final, &st) < 0)
                        return queue_error(r->connection, MHD_HTTP_INTERNAL_SERVER_ERROR, "Artifact vanished");
                return queue_json(r->connection, MHD_HTTP_OK, artifact_json(r->ota, r->sha256, (uint64_t)st.st_size));
        }
        if (r->status == 0 && r->received != r->expected)
                r->status = MHD_HTTP_BAD_REQUEST;
        if (r->status)
                return queue_error(r->connection, r->status,
                                   r->status == MHD_HTTP_INSUFFICIENT_STORAGE ? "No space left for the artifact"
                                                                              : "Upload failed");
        EVP_DigestFinal_ex(r->md, md, &mdlen);
        hex_encode(md, 32, hex);
        if (!streq(hex, r->sha256))
                return queue_json(r->connection, MHD_HTTP_BAD_REQUEST,
                                  json_pack("{s:b, s:s, s:s}", "ok", 0, "error",
                                            "The upload does not match its SHA-256", "info", hex));
        if (artifact_path(r->ota, r->sha256, &final) < 0)
                return MHD_NO;
        /* tmp -> fsync -> rename -> fsync(dir): all or nothing after a crash. */
        if (fsync(r->fd) < 0 || rename(r->tmp_path, final) < 0) {
                log_error_errno(errno, "Cannot store artifact '%s': %m", final);
                return queue_error(r->connection, MHD_HTTP_INTERNAL_SERVER_ERROR, "Cannot store the artifact");
        }
        free(r->tmp_path);
        r->tmp_path = NULL;
        dfd = open(r->ota->config->ota_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dfd >= 0)
                (void)fsync(dfd);
        log_info("Stored OTA artifact %s (%" PRIu64 " bytes).", r->sha256, r->received);
        if (r->ota->artifacts)
                return upload_publish(r, final);
        return queue_json(r->connection, MHD_HTTP_CREATED, artifact_json(r->ota, r->sha256, r->received));
}

static void upload_published(void *userdata, int error) {
        OtaRequest *r = userdata;

        r->publish = NULL;
        r->published = true;
        r->publish_error = error;
        waiter_resume(r);
}

/* Cluster mode: answer once the artifact is in the stream, so that a node
 * dying after the answer loses nothing; until then the request waits. */
static enum MHD_Result upload_publish(OtaRequest *r, const char *final) {
        Ota *ota = r->ota;
        int k;

        r->publish_fd = r->fd;
        r->fd = -1;
        k = artifacts_publish(ota->artifacts, r->sha256, r->publish_fd, r->received, upload_published, r, &r->publish);
        if (k < 0) {
                r->published = true;
                r->publish_error = k;
                return upload_answer_published(r);
        }
        r->suspended = true;
        r->wait_next = ota->waiters;
        if (ota->waiters)
                ota->waiters->wait_prev = r;
        ota->waiters = r;
        MHD_suspend_connection(r->connection);
        return MHD_YES;
}

static enum MHD_Result upload_answer_published(OtaRequest *r) {
        _cleanup_free_ char *final = NULL;

        if (r->publish) {
                /* Resumed without an answer (the cloud stops). */
                artifacts_publish_cancel(r->publish);
                r->publish = NULL;
                r->publish_error = -ECANCELED;
        }
        if (r->publish_error >= 0)
                return queue_json(r->connection, MHD_HTTP_CREATED, artifact_json(r->ota, r->sha256, r->received));
        /* Not in the cluster: not here either, so that an upload sent
         * again goes into the stream. */
        if (artifact_path(r->ota, r->sha256, &final) == 0)
                (void)unlink(final);
        return queue_json(r->connection, MHD_HTTP_SERVICE_UNAVAILABLE,
                          json_pack("{s:b, s:s, s:s}", "ok", 0, "error",
                                    "Cannot store the artifact in the cluster; try again", "info",
                                    strerror(-r->publish_error)));
}

static enum MHD_Result job_answer(OtaRequest *r) {
        Ota *ota = r->ota;
        OtaJob *j = job_find(ota, r->job);
        bool wait_unknown = !j && ota->cluster && !r->waited_unknown;

        if (!j && !wait_unknown)
                return queue_error(r->connection, MHD_HTTP_NOT_FOUND, "No such job");
        /* Long polling: hold the request until the job changes or time is
         * up. In a cluster, a job another node made a moment ago may not be
         * here yet (its row comes through the stream): wait a little for it
         * (OTA_UNKNOWN_WAIT_USEC), once. */
        if ((wait_unknown || (r->wait_seq >= 0 && j->seq <= (uint64_t)r->wait_seq)) && !r->expired && ota->running) {
                int k = sd_event_add_time_relative(ota->event, &r->timer, CLOCK_MONOTONIC,
                                                   wait_unknown ? OTA_UNKNOWN_WAIT_USEC : OTA_WAIT_USEC,
                                                   100 * USEC_PER_MSEC, waiter_timeout, r);
                if (wait_unknown)
                        r->waited_unknown = true;
                if (k >= 0) {
                        r->suspended = true;
                        r->wait_next = ota->waiters;
                        if (ota->waiters)
                                ota->waiters->wait_prev = r;
                        ota->waiters = r;
                        MHD_suspend_connection(r->connection);
                        return MHD_YES;
                }
        }
        if (!j)
                return queue_error(r->connection, MHD_HTTP_NOT_FOUND, "No such job");
        return queue_json(r->connection, MHD_HTTP_OK, job_to_json(j));
}

static enum MHD_Result jobs_answer(OtaRequest *r) {
        Ota *ota = r->ota;
        json_t *a = json_array();

        for (OtaJob *j = ota->jobs; a && j; j = j->next)
                if (json_array_append_new(a, job_to_json(j)) < 0) {
                        json_decref(a);
                        a = NULL;
                }
        return queue_json(r->connection, MHD_HTTP_OK, a);
}

int ota_api_handler(Ota *ota, struct MHD_Connection *connection, const char *url, const char *method,
                    const char *upload_data, size_t *upload_data_size, OtaRequest **state) {
        OtaRequest *r = *state;
        bool get = streq(method, MHD_HTTP_METHOD_GET) || streq(method, MHD_HTTP_METHOD_HEAD);
        const char *rest = url + strlen("/v1/ota");

        if (!r) {
                r = calloc(1, sizeof(*r));
                if (!r)
                        return MHD_NO;
                r->ota = ota;
                r->connection = connection;
                r->fd = -1;
                r->publish_fd = -1;
                r->wait_seq = -1;
                r->kind = OTA_REQ_NONE;
                *state = r;
                if (startswith(rest, "/artifacts/") && manifest_sha256_valid(rest + 11)) {
                        memcpy(r->sha256, rest + 11, 65);
                        /* Not 503: the cloud's configuration is the cause, not
                         * a device or a load that may change by itself. */
                        if (!ota->config->ota_dir)
                                r->status = MHD_HTTP_NOT_IMPLEMENTED;
                        else if (streq(method, MHD_HTTP_METHOD_PUT)) {
                                r->kind = OTA_REQ_UPLOAD;
                                if (upload_begin(r) < 0)
                                        return MHD_NO;
                        } else if (get)
                                r->kind = OTA_REQ_ARTIFACT;
                } else if (startswith(rest, "/jobs/") && get && ota_job_id_valid(rest + 6, strlen(rest + 6))) {
                        const char *w = MHD_lookup_connection_value(connection, MHD_GET_ARGUMENT_KIND, "wait");
                        char *end;

                        r->kind = OTA_REQ_JOB;
                        memcpy(r->job, rest + 6, OTA_JOB_ID_LEN + 1);
                        if (w) {
                                errno = 0;
                                r->wait_seq = strtoll(w, &end, 10);
                                if (errno || *end || r->wait_seq < 0)
                                        r->status = MHD_HTTP_BAD_REQUEST;
                        }
                } else if (streq(rest, "/jobs") && get)
                        r->kind = OTA_REQ_JOBS;
                return MHD_YES;
        }
        if (*upload_data_size > 0) {
                if (r->kind == OTA_REQ_UPLOAD)
                        upload_write(r, upload_data, *upload_data_size);
                *upload_data_size = 0;
                return MHD_YES;
        }
        if (r->suspended)
                return MHD_YES;
        if (r->status && r->kind != OTA_REQ_UPLOAD)
                goto error;
        switch (r->kind) {
        case OTA_REQ_UPLOAD:
                if (r->publish || r->published)
                        return upload_answer_published(r);
                return upload_end(r);
        case OTA_REQ_ARTIFACT: {
                _cleanup_free_ char *path = NULL;
                struct stat st;

                if (artifact_path(r->ota, r->sha256, &path) < 0)
                        return MHD_NO;
                if (stat(path, &st) < 0)
                        return queue_error(connection, MHD_HTTP_NOT_FOUND, "No such artifact");
                return queue_json(connection, MHD_HTTP_OK, artifact_json(r->ota, r->sha256, (uint64_t)st.st_size));
        }
        case OTA_REQ_JOB:
                return job_answer(r);
        case OTA_REQ_JOBS:
                return jobs_answer(r);
        case OTA_REQ_NONE:
                return queue_error(connection, MHD_HTTP_NOT_FOUND, "Not found");
        }
error:
        return queue_error(connection, r->status,
                           r->status == MHD_HTTP_NOT_IMPLEMENTED
                                   ? "OTA artifact hosting is not enabled on this cloud "
                                     "(set [OTA] ArtifactDirectory= in tether-cloudd.conf)"
                           : r->status == MHD_HTTP_CONTENT_TOO_LARGE   ? "Artifact too large ([OTA] MaxArtifactMB=)"
                           : r->status == MHD_HTTP_LENGTH_REQUIRED     ? "Content-Length required"
                                                                       : "Bad request");
}

/* ---- the artifact server (HTTPS, client certificates) --------------------------- */

/* Whether the leaf names TLS client authentication among its extended key
 * usages. A certificate without the extension is refused too: every
 * device certificate of tether-pki carries it (docs/pki.md), and a server
 * certificate or any other leaf from the same CA is no device's. */
static bool client_auth_purpose(gnutls_x509_crt_t crt) {
        for (unsigned i = 0;; i++) {
                char oid[128];
                size_t n = sizeof(oid);
                int r = gnutls_x509_crt_get_key_purpose_oid(crt, i, oid, &n, NULL);

                if (r == GNUTLS_E_SHORT_MEMORY_BUFFER)
                        continue; /* not clientAuth's short OID */
                if (r < 0)
                        return false; /* the end, or no extension */
                if (streq(oid, GNUTLS_KP_TLS_WWW_CLIENT))
                        return true;
        }
}

/* The device ID of a verified client certificate, or NULL. */
static bool client_verified(struct MHD_Connection *c, char id[static PROTO_DEVICE_ID_MAX + 1]) {
        const union MHD_ConnectionInfo *ci = MHD_get_connection_info(c, MHD_CONNECTION_INFO_GNUTLS_SESSION);
        gnutls_session_t s = ci ? (gnutls_session_t)ci->tls_session : NULL;
        const gnutls_datum_t *peers;
        gnutls_x509_crt_t crt;
        unsigned status = 0, n = 0;
        size_t len = PROTO_DEVICE_ID_MAX + 1;
        bool ok;

        if (!s || gnutls_certificate_verify_peers2(s, &status) != GNUTLS_E_SUCCESS || status != 0)
                return false;
        peers = gnutls_certificate_get_peers(s, &n);
        if (!peers || n == 0 || gnutls_x509_crt_init(&crt) != GNUTLS_E_SUCCESS)
                return false;
        ok = gnutls_x509_crt_import(crt, &peers[0], GNUTLS_X509_FMT_DER) == GNUTLS_E_SUCCESS &&
             client_auth_purpose(crt) &&
             gnutls_x509_crt_get_dn_by_oid(crt, GNUTLS_OID_X520_COMMON_NAME, 0, 0, id, &len) == GNUTLS_E_SUCCESS &&
             proto_name_check(id, strlen(id), PROTO_NAME_DEVICE) == 0;
        gnutls_x509_crt_deinit(crt);
        return ok;
}

static enum MHD_Result queue_text(struct MHD_Connection *c, unsigned status, const char *text) {
        struct MHD_Response *resp = MHD_create_response_from_buffer(strlen(text), (void *)text, MHD_RESPMEM_PERSISTENT);
        enum MHD_Result ret;

        if (!resp)
                return MHD_NO;
        (void)MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "text/plain");
        ret = MHD_queue_response(c, status, resp);
        MHD_destroy_response(resp);
        return ret;
}

/* "bytes=A-" or "bytes=A-B" (one range); false for anything else, which
 * is then ignored (RFC 9110 allows serving the whole representation). */
static bool parse_range(const char *h, uint64_t size, uint64_t *ret_from, uint64_t *ret_to, bool *ret_unsatisfiable) {
        unsigned long long a, b = 0;
        char *end;

        *ret_unsatisfiable = false;
        if (!h || !startswith(h, "bytes=") || h[6] < '0' || h[6] > '9')
                return false;
        errno = 0;
        a = strtoull(h + 6, &end, 10);
        if (errno || *end != '-')
                return false;
        if (end[1]) {
                char *e2;
                b = strtoull(end + 1, &e2, 10);
                if (errno || *e2 || b < a)
                        return false;
        }
        if (a >= size) {
                *ret_unsatisfiable = true;
                return true;
        }
        *ret_from = a;
        *ret_to = end[1] && b < size ? b : size - 1;
        return true;
}

static enum MHD_Result artifact_handler(void *cls, struct MHD_Connection *c, const char *url, const char *method,
                                        const char *version, const char *upload_data, size_t *upload_data_size,
                                        void **con_cls) {
        Ota *ota = cls;
        char id[PROTO_DEVICE_ID_MAX + 1] = "", sha[65], etag[70], cr[96];
        _cleanup_free_ char *path = NULL;
        const char *range, *if_range;
        struct MHD_Response *resp;
        uint64_t from = 0, to = 0;
        bool ranged, unsat = false;
        enum MHD_Result ret;
        struct stat st;
        int fd;

        if (!*con_cls) {
                *con_cls = (void *)1; /* answer on the second call, after the headers */
                return MHD_YES;
        }
        if (*upload_data_size) {
                *upload_data_size = 0;
                return MHD_YES;
        }
        if (!client_verified(c, id))
                return queue_text(c, MHD_HTTP_FORBIDDEN, "a device certificate from this cloud's CA is required\n");
        if (!streq(method, MHD_HTTP_METHOD_GET) && !streq(method, MHD_HTTP_METHOD_HEAD))
                return queue_text(c, MHD_HTTP_METHOD_NOT_ALLOWED, "GET only\n");
        if (!startswith(url, "/ota/") || strlen(url) != 5 + 64 + 4 || !streq(url + 69, ".deb"))
                return queue_text(c, MHD_HTTP_NOT_FOUND, "no such artifact\n");
        memcpy(sha, url + 5, 64);
        sha[64] = 0;
        if (!manifest_sha256_valid(sha) || artifact_path(ota, sha, &path) < 0)
                return queue_text(c, MHD_HTTP_NOT_FOUND, "no such artifact\n");
        fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0 || fstat(fd, &st) < 0) {
                if (fd >= 0)
                        close(fd);
                return queue_text(c, MHD_HTTP_NOT_FOUND, "no such artifact\n");
        }
        snprintf(etag, sizeof(etag), "\"%s\"", sha);
        range = MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_RANGE);
        if_range = MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_IF_RANGE);
        ranged = (!if_range || streq(if_range, etag)) && parse_range(range, (uint64_t)st.st_size, &from, &to, &unsat);
        if (ranged && unsat) {
                close(fd);
                resp = MHD_create_response_from_buffer(0, NULL, MHD_RESPMEM_PERSISTENT);
                if (!resp)
                        return MHD_NO;
                snprintf(cr, sizeof(cr), "bytes */%lld", (long long)st.st_size);
                (void)MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_RANGE, cr);
                ret = MHD_queue_response(c, MHD_HTTP_RANGE_NOT_SATISFIABLE, resp);
                MHD_destroy_response(resp);
                return ret;
        }
        if (!ranged) {
                from = 0;
                to = st.st_size > 0 ? (uint64_t)st.st_size - 1 : 0;
        }
        resp = MHD_create_response_from_fd_at_offset64(st.st_size > 0 ? to - from + 1 : 0, fd, from);
        if (!resp) {
                close(fd);
                return MHD_NO;
        }
        (void)MHD_add_response_header(resp, MHD_HTTP_HEADER_ETAG, etag);
        (void)MHD_add_response_header(resp, MHD_HTTP_HEADER_ACCEPT_RANGES, "bytes");
        (void)MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "application/vnd.debian.binary-package");
        if (ranged) {
                snprintf(cr, sizeof(cr), "bytes %" PRIu64 "-%" PRIu64 "/%lld", from, to, (long long)st.st_size);
                (void)MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_RANGE, cr);
        }
        log_debug("Device '%s' fetches artifact %s from byte %" PRIu64 ".", id, sha, from);
        ret = MHD_queue_response(c, ranged ? MHD_HTTP_PARTIAL_CONTENT : MHD_HTTP_OK, resp);
        MHD_destroy_response(resp);
        return ret;
}

static void ota_update_timer(Ota *ota) {
        MHD_UNSIGNED_LONG_LONG ms;

        if (MHD_get_timeout(ota->daemon, &ms) != MHD_YES) {
                ota->busy_rounds = 0;
                (void)sd_event_source_set_enabled(ota->timer, SD_EVENT_OFF);
        } else if (ms == 0 && ota->busy_rounds++ < OTA_BUSY_ROUNDS_MAX) {
                (void)sd_event_source_set_enabled(ota->timer, SD_EVENT_OFF);
                (void)sd_event_source_set_enabled(ota->defer, SD_EVENT_ONESHOT);
        } else {
                /* As the API (api.c, api_update_timer()): MHD 0.9.75 says
                 * "now" round after round for a TLS connection whose first
                 * record came in part; past OTA_BUSY_ROUNDS_MAX rounds
                 * without I/O, wait a millisecond. */
                if (ms == 0)
                        ms = 1;
                else
                        ota->busy_rounds = 0;
                (void)sd_event_source_set_time_relative(ota->timer, (uint64_t)ms * USEC_PER_MSEC);
                (void)sd_event_source_set_enabled(ota->timer, SD_EVENT_ONESHOT);
        }
}

static int ota_run_cb(sd_event_source *s, void *userdata) {
        Ota *ota = userdata;

        (void)MHD_run(ota->daemon);
        ota_update_timer(ota);
        return 0;
}

static int ota_io_cb(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        Ota *ota = userdata;

        ota->busy_rounds = 0;
        return ota_run_cb(s, ota);
}

static int ota_timer_cb(sd_event_source *s, uint64_t usec, void *userdata) {
        return ota_run_cb(s, userdata);
}

static void ota_mhd_log(void *cls, const char *fmt, va_list ap) {
        Ota *ota = cls;

        mhd_log(ota->running, " (OTA)", fmt, ap);
}

static int make_dir(const char *path) {
        if (mkdir(path, 0755) < 0 && errno != EEXIST)
                return -errno;
        return 0;
}

/* Uploads are written to ArtifactDirectory/.upload-SHA256-XXXXXX and
 * removed when their request ends; a cloud killed during one leaves its
 * file behind. Remove those nobody has written to for longer than an API
 * connection may stay idle (a live upload, even of another cloud sharing
 * the directory, writes more often); finished artifacts are never touched. */
static void remove_stale_uploads(Ota *ota) {
        DIR *dir = opendir(ota->config->ota_dir);
        time_t limit = time(NULL) - (time_t)ota->config->idle_timeout_sec -
                       (time_t)ota->config->header_timeout_sec - 60;
        unsigned n = 0;
        struct dirent *de;

        if (!dir) {
                log_warning_errno(errno, "Cannot read [OTA] ArtifactDirectory= '%s': %m", ota->config->ota_dir);
                return;
        }
        while ((de = readdir(dir))) {
                struct stat st;

                if (!startswith(de->d_name, ".upload-") ||
                    fstatat(dirfd(dir), de->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0 || !S_ISREG(st.st_mode) ||
                    st.st_mtime > limit)
                        continue;
                if (unlinkat(dirfd(dir), de->d_name, 0) < 0)
                        log_warning_errno(errno, "Cannot remove the unfinished upload '%s/%s': %m",
                                          ota->config->ota_dir, de->d_name);
                else
                        n++;
        }
        closedir(dir);
        if (n > 0)
                log_info("Removed %u unfinished upload(s) from '%s'.", n, ota->config->ota_dir);
}

Ota *ota_free(Ota *ota) {
        if (!ota)
                return NULL;
        ota->running = false;
        ota_api_shutdown(ota);
        if (ota->daemon)
                MHD_stop_daemon(ota->daemon);
        sd_event_source_disable_unref(ota->io);
        sd_event_source_disable_unref(ota->timer);
        sd_event_source_disable_unref(ota->defer);
        sd_event_source_disable_unref(ota->resend_defer);
        /* Calls still out are cancelled: their jobs stay "sent" in the
         * Store and go out again after the restart. */
        while (ota->jobs) {
                OtaJob *j = ota->jobs;
                ota->jobs = j->next;
                job_free(j);
        }
        free(ota->id_buckets);
        free(ota->open_buckets);
        free(ota->key_pem);
        free(ota->cert_pem);
        free(ota->ca_pem);
        free(ota->public_url);
        sqlite3_finalize(ota->stmt_save);
        sqlite3_finalize(ota->stmt_delete);
        free(ota);
        return NULL;
}

int ota_new(sd_event *event, const CloudConfig *config, Store *store, Journal *journal, Devices *devices,
            Events *events, const OtaHooks *hooks, unsigned *ret_port, Ota **ret) {
        const char *listen_addr = config->ota_listen ? config->ota_listen : config->coap_listen;
        _cleanup_(ota_freep) Ota *ota = NULL;
        const union MHD_DaemonInfo *info;
        struct sockaddr_storage ss;
        socklen_t sl;
        unsigned flags = MHD_USE_EPOLL | MHD_USE_TLS | MHD_USE_ERROR_LOG;
        int r, rc;

        ota = calloc(1, sizeof(*ota));
        if (!ota)
                return log_error_errno(-ENOMEM, "Out of memory.");
        ota->event = event;
        ota->config = config;
        ota->store = store;
        ota->journal = journal;
        ota->devices = devices;
        ota->events = events;
        ota->hooks = *hooks;
        ota->running = true;
        if (getrandom(&ota->hash_key, sizeof(ota->hash_key), GRND_NONBLOCK) != sizeof(ota->hash_key))
                ota->hash_key = (uint64_t)(uintptr_t)ota ^ (uint64_t)getpid();
        r = store_migrate(store, "ota", ota_schema, ELEMENTSOF(ota_schema));
        if (r < 0)
                return log_error_errno(r, "Cannot set up the OTA jobs in the cloud database.");
        rc = sqlite3_prepare_v3(
                store_db(store),
                "INSERT INTO ota_jobs (id, device, package, version, state, code, reason, bytes, total, seq, "
                "device_seq, closed, final_seq, history, created_at, updated_at, manifest, sha256) "
                "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18) "
                "ON CONFLICT (id) DO UPDATE SET state = excluded.state, code = excluded.code, "
                "reason = excluded.reason, bytes = excluded.bytes, total = excluded.total, seq = excluded.seq, "
                "device_seq = excluded.device_seq, closed = excluded.closed, final_seq = excluded.final_seq, "
                "history = excluded.history, updated_at = excluded.updated_at, manifest = excluded.manifest",
                -1, SQLITE_PREPARE_PERSISTENT, &ota->stmt_save, NULL);
        if (rc == SQLITE_OK)
                rc = sqlite3_prepare_v3(store_db(store), "DELETE FROM ota_jobs WHERE id = ?1", -1,
                                        SQLITE_PREPARE_PERSISTENT, &ota->stmt_delete, NULL);
        if (rc != SQLITE_OK)
                return store_error(store, rc, "preparing the OTA jobs' statements");
        r = ota_load(ota);
        if (r < 0)
                return r;
        r = sd_event_add_defer(event, &ota->resend_defer, resend_defer_cb, ota);
        if (r >= 0)
                r = sd_event_source_set_enabled(ota->resend_defer, SD_EVENT_OFF);
        if (r < 0)
                return log_error_errno(r, "Failed to add an OTA event source: %m");
        if (!config->ota_dir) {
                *ret_port = 0;
                *ret = TAKE_PTR(ota);
                return 0;
        }
        r = make_dir(config->ota_dir);
        if (r < 0)
                return log_error_errno(r, "Cannot create [OTA] ArtifactDirectory= '%s': %m", config->ota_dir);
        remove_stale_uploads(ota);
        if (config->ota_port == CLOUD_CONFIG_PORT_UNSET) {
                log_info("Storing OTA artifacts in '%s'; devices fetch them over their connection ([OTA] Port= "
                         "is not set: no HTTPS artifact server).",
                         config->ota_dir);
                *ret_port = 0;
                *ret = TAKE_PTR(ota);
                return 0;
        }
        if (!MHD_is_feature_supported(MHD_FEATURE_TLS))
                return log_error_errno(-EOPNOTSUPP, "libmicrohttpd was built without TLS: cannot serve OTA artifacts.");
        if ((r = read_pem(config->key_file, &ota->key_pem)) < 0 || (r = read_pem(config->cert_file, &ota->cert_pem)) < 0 ||
            (r = read_pem(config->ca_file, &ota->ca_pem)) < 0)
                return log_error_errno(r, "Cannot read the cloud's TLS files for the OTA server: %m");
        r = cloud_config_resolve_address(listen_addr, config->ota_port, &ss, &sl);
        if (r < 0)
                return log_error_errno(r, "Invalid [OTA] Listen= address '%s'.", listen_addr);
        if (ss.ss_family == AF_INET6)
                flags |= MHD_USE_DUAL_STACK;
        ota->daemon = MHD_start_daemon(flags, (uint16_t)config->ota_port, NULL, NULL, artifact_handler, ota,
                                       MHD_OPTION_EXTERNAL_LOGGER, ota_mhd_log, ota, MHD_OPTION_SOCK_ADDR,
                                       (struct sockaddr *)&ss, MHD_OPTION_HTTPS_MEM_KEY, ota->key_pem,
                                       MHD_OPTION_HTTPS_MEM_CERT, ota->cert_pem, MHD_OPTION_HTTPS_MEM_TRUST, ota->ca_pem,
                                       MHD_OPTION_HTTPS_PRIORITIES, OTA_TLS_PRIORITIES,
                                       MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)120, MHD_OPTION_CONNECTION_LIMIT,
                                       (unsigned)1024, MHD_OPTION_END);
        if (!ota->daemon)
                return log_error_errno(-EADDRNOTAVAIL, "Failed to start the OTA artifact server on '%s' port %u.",
                                       listen_addr, config->ota_port);
        info = MHD_get_daemon_info(ota->daemon, MHD_DAEMON_INFO_BIND_PORT);
        if (!info)
                return log_error_errno(-EIO, "Cannot get the OTA server's port.");
        ota->port = info->port;
        if (config->ota_public_url)
                ota->public_url = strdup(config->ota_public_url);
        else if (strchr(listen_addr, ':'))
                r = asprintf(&ota->public_url, "https://[%s]:%u", listen_addr, ota->port);
        else
                r = asprintf(&ota->public_url, "https://%s:%u", listen_addr, ota->port);
        if (!ota->public_url || r < 0)
                return log_error_errno(-ENOMEM, "Out of memory.");
        /* no trailing slash */
        for (size_t n = strlen(ota->public_url); n > 0 && ota->public_url[n - 1] == '/'; n--)
                ota->public_url[n - 1] = 0;
        info = MHD_get_daemon_info(ota->daemon, MHD_DAEMON_INFO_EPOLL_FD);
        if (!info)
                return log_error_errno(-EIO, "Cannot get the OTA server's epoll fd.");
        r = sd_event_add_io(event, &ota->io, info->epoll_fd, EPOLLIN, ota_io_cb, ota);
        if (r >= 0)
                r = sd_event_add_time(event, &ota->timer, CLOCK_MONOTONIC, 0, USEC_PER_MSEC, ota_timer_cb, ota);
        if (r >= 0)
                r = sd_event_source_set_enabled(ota->timer, SD_EVENT_OFF);
        if (r >= 0)
                r = sd_event_add_defer(event, &ota->defer, ota_run_cb, ota);
        /* Below the other sources, as the API's (api.c, api_new()). */
        if (r >= 0)
                r = sd_event_source_set_priority(ota->defer, SD_EVENT_PRIORITY_IDLE);
        if (r >= 0)
                r = sd_event_source_set_enabled(ota->defer, SD_EVENT_OFF);
        if (r < 0)
                return log_error_errno(r, "Failed to add OTA event sources: %m");
        ota_update_timer(ota);
        log_info("Serving OTA artifacts from '%s' at %s/ota/.", config->ota_dir, ota->public_url);
        *ret_port = ota->port;
        *ret = TAKE_PTR(ota);
        return 0;
}
