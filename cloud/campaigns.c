/* SPDX-License-Identifier: Apache-2.0 */
/* Campaigns (campaigns.h; docs/fleet.md "Campaigns"). A campaign's devices
 * are an array in the given order; phase k holds the indexes
 * [ceil(p[k-1]*N/100), ceil(p[k]*N/100)). Each device has a state of its
 * own (enum CampState), kept in the table campaign_devices and counted per
 * phase, so that whether a phase is over is known from its counts. A device
 * whose phase started but which has an open job of another origin waits
 * (state pending, in the index of waiting devices) until that job ends. */
#include "config.h"

#include <errno.h>
#include <math.h>
#include <microhttpd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "api.h"
#include "campaigns.h"
#include "log.h"
#include "manifest.h"
#include "util.h"

#define USEC_PER_SEC 1000000ULL
#define CAMPAIGNS_KEPT_MAX 256          /* campaigns kept: the oldest over ones go first */
#define CAMPAIGNS_OPEN_MAX 64           /* running or paused at once */
#define CAMPAIGNS_DEVICES_TOTAL_MAX 1000000 /* devices of all campaigns kept (memory) */
#define CAMPAIGN_NAME_MAX 128
#define CAMPAIGN_TARGET_MAX 1024
#define CAMPAIGN_PHASES_MAX 100
#define CAMPAIGN_PHASE_WAIT_MAX (30 * 24 * 3600)
#define CAMPAIGN_REASON_MAX 160
#define CAMPAIGN_START_BATCH 256 /* devices looked at per loop iteration while starting */
/* Cluster mode: a campaign's row (its manifests) is one change of the
 * replicated state, which must fit in one NATS message. */
#define CAMPAIGN_CLUSTER_MANIFESTS_MAX (512u * 1024)
#define CAMPAIGNS_LEADS_USEC (1000ULL * 1000ULL) /* how often leadership and changed rows are looked at */

typedef enum CampState {
        CS_PENDING,
        CS_QUEUED, /* "offline" in counts */
        CS_SENT,
        CS_DOWNLOADING,
        CS_INSTALLING,
        CS_COMMITTED,
        CS_ROLLED_BACK,
        CS_REJECTED,
        CS_FAILED,
        CS_DEFERRED,
        _CS_MAX,
} CampState;

static const char *const cs_names[_CS_MAX] = { "pending",   "queued",      "sent",     "downloading", "installing",
                                                "committed", "rolled-back", "rejected", "failed",      "deferred" };
static const char *const cs_count_names[_CS_MAX] = { "pending",   "offline",     "sent",     "downloading",
                                                      "installing", "committed", "rolled_back", "rejected",
                                                      "failed",    "deferred" };

static bool cs_final(CampState s) {
        return s >= CS_COMMITTED;
}

static bool cs_failure(CampState s) {
        return s >= CS_ROLLED_BACK;
}

static int cs_from_name(const char *s) {
        for (int i = 0; i < _CS_MAX; i++)
                if (streq(cs_names[i], s))
                        return i;
        return -1;
}

/* An Ota job state as the campaign counts it. */
static CampState cs_from_job(const char *s) {
        if (streq(s, "queued"))
                return CS_QUEUED;
        if (streq(s, "sent"))
                return CS_SENT;
        if (streq(s, "accepted") || streq(s, "downloading") || streq(s, "downloaded"))
                return CS_DOWNLOADING;
        if (streq(s, "installing") || streq(s, "installed") || streq(s, "trial") || streq(s, "rolling-back"))
                return CS_INSTALLING;
        if (streq(s, "committed"))
                return CS_COMMITTED;
        if (streq(s, "rolled-back"))
                return CS_ROLLED_BACK;
        if (streq(s, "rejected"))
                return CS_REJECTED;
        if (streq(s, "deferred"))
                return CS_DEFERRED;
        return CS_FAILED;
}

typedef enum CampaignState { C_RUNNING, C_PAUSED, C_ABORTED, C_FINISHED } CampaignState;
static const char *const c_names[] = { "running", "paused", "aborted", "finished" };

typedef struct Campaign Campaign;

typedef struct CampDevice {
        Campaign *c;
        char device[PROTO_DEVICE_ID_MAX + 1];
        char job[OTA_JOB_ID_MAX + 1]; /* "" none yet */
        uint32_t idx;
        uint16_t phase, manifest;
        uint8_t state; /* CampState */
        bool waiting;  /* its phase started; another job of its device is open */
        struct CampDevice *job_next, *wait_next;
} CampDevice;

typedef struct Phase {
        unsigned percent;
        uint32_t from, to; /* device indexes [from, to) */
        char started[32], finished[32];
        bool failed;
        uint32_t counts[_CS_MAX];
} Phase;

struct Campaign {
        Campaigns *cs;
        char id[CAMPAIGN_ID_LEN + 1];
        char *name, *target, *package, *version, *sha256;
        uint64_t size;
        json_t *manifests; /* array of strings */
        double max_failure_rate;
        uint64_t phase_wait;
        CampaignState state;
        char *paused_reason;
        int cur; /* the phase started last, -1 none */
        uint64_t next_phase_at; /* CLOCK_REALTIME seconds; 0: not waiting */
        char created[32], updated[32], created_by[80];
        Phase *phases;
        size_t n_phases;
        CampDevice *devices;
        size_t n_devices;
        sd_event_source *timer;
        /* Devices [start_next, start_to) of started phases still to be
         * given their jobs (a few at a time, from the start defer);
         * start_next == start_to: none. */
        uint32_t start_next, start_to;
        bool dirty; /* in the Campaigns' dirty list */
        struct Campaign *next, *dirty_next;
};

struct Campaigns {
        sd_event *event;
        const CloudConfig *config;
        Store *store;
        Ota *ota;
        Devices *devices;
        Events *events;
        Campaign *list; /* newest first */
        size_t n;
        Campaign *dirty;
        sd_event_source *defer;
        sd_event_source *start_defer; /* on while a campaign has devices to start */
        sqlite3_stmt *stmt_save, *stmt_device;
        /* Indexes: campaign devices by job id, waiting ones by device. */
        CampDevice **job_b, **wait_b;
        size_t job_nb, job_n, wait_nb, wait_n;
        uint64_t hash_key;
        CampaignsHooks hooks;
        /* Cluster mode: whether this node drives the campaigns (it leads);
         * else its campaigns are a copy of the replicated rows, read again
         * when they changed (the ids in stale) at the next tick. */
        bool leading;
        sd_event_source *tick;
        json_t *stale;
};

/* ---- indexes ------------------------------------------------------------- */

static uint64_t hash(const Campaigns *cs, const char *s) {
        uint64_t h = 0xcbf29ce484222325ULL ^ cs->hash_key;

        for (; *s; s++)
                h = (h ^ (uint8_t)*s) * 0x100000001b3ULL;
        return h ^ (h >> 33);
}

static int rehash(Campaigns *cs, CampDevice ***b, size_t *nb, size_t n, bool by_job) {
        size_t want = *nb ? *nb : 256;
        CampDevice **nbk;

        while (want < n)
                want *= 2;
        if (want == *nb)
                return 0;
        nbk = calloc(want, sizeof(*nbk));
        if (!nbk)
                return -ENOMEM;
        for (size_t i = 0; i < *nb; i++)
                for (CampDevice *d = (*b)[i], *next; d; d = next) {
                        size_t k = hash(cs, by_job ? d->job : d->device) & (want - 1);

                        next = by_job ? d->job_next : d->wait_next;
                        if (by_job) {
                                d->job_next = nbk[k];
                        } else {
                                d->wait_next = nbk[k];
                        }
                        nbk[k] = d;
                }
        free(*b);
        *b = nbk;
        *nb = want;
        return 0;
}

static int job_index_add(Campaigns *cs, CampDevice *d) {
        size_t k;

        if (rehash(cs, &cs->job_b, &cs->job_nb, cs->job_n + 1, true) < 0)
                return -ENOMEM;
        k = hash(cs, d->job) & (cs->job_nb - 1);
        d->job_next = cs->job_b[k];
        cs->job_b[k] = d;
        cs->job_n++;
        return 0;
}

static void job_index_remove(Campaigns *cs, CampDevice *d) {
        if (!d->job[0] || !cs->job_nb)
                return;
        for (CampDevice **p = &cs->job_b[hash(cs, d->job) & (cs->job_nb - 1)]; *p; p = &(*p)->job_next)
                if (*p == d) {
                        *p = d->job_next;
                        cs->job_n--;
                        break;
                }
        d->job_next = NULL;
}

static CampDevice *job_lookup(Campaigns *cs, const char *job) {
        if (!cs->job_nb)
                return NULL;
        for (CampDevice *d = cs->job_b[hash(cs, job) & (cs->job_nb - 1)]; d; d = d->job_next)
                if (streq(d->job, job))
                        return d;
        return NULL;
}

static void wait_add(Campaigns *cs, CampDevice *d) {
        size_t k;

        if (d->waiting)
                return;
        if (rehash(cs, &cs->wait_b, &cs->wait_nb, cs->wait_n + 1, false) < 0) {
                log_error("Out of memory: campaign %s device '%s' cannot wait for its other job.", d->c->id,
                          d->device);
                return;
        }
        k = hash(cs, d->device) & (cs->wait_nb - 1);
        d->wait_next = cs->wait_b[k];
        cs->wait_b[k] = d;
        cs->wait_n++;
        d->waiting = true;
}

static void wait_remove(Campaigns *cs, CampDevice *d) {
        if (!d->waiting)
                return;
        for (CampDevice **p = &cs->wait_b[hash(cs, d->device) & (cs->wait_nb - 1)]; *p; p = &(*p)->wait_next)
                if (*p == d) {
                        *p = d->wait_next;
                        cs->wait_n--;
                        break;
                }
        d->wait_next = NULL;
        d->waiting = false;
}

/* ---- the Store ------------------------------------------------------------ */

static const char *const campaigns_schema[] = {
        "CREATE TABLE campaigns ("
        "  id TEXT PRIMARY KEY NOT NULL,"
        "  name TEXT, target TEXT,"
        "  package TEXT NOT NULL, version TEXT NOT NULL, sha256 TEXT NOT NULL, size INTEGER NOT NULL,"
        "  manifests TEXT NOT NULL,"
        "  phases TEXT NOT NULL,"       /* [{"percent","started_at","finished_at","failed"}] */
        "  max_failure_rate REAL NOT NULL,"
        "  phase_wait INTEGER NOT NULL,"
        "  state TEXT NOT NULL,"
        "  paused_reason TEXT,"
        "  phase INTEGER NOT NULL,"     /* the phase started last, -1 none */
        "  next_phase_at INTEGER NOT NULL DEFAULT 0,"
        "  created_by TEXT,"
        "  created_at TEXT NOT NULL, updated_at TEXT NOT NULL);"
        "CREATE TABLE campaign_devices ("
        "  campaign TEXT NOT NULL, idx INTEGER NOT NULL, device TEXT NOT NULL, manifest INTEGER NOT NULL,"
        "  state TEXT NOT NULL, job TEXT,"
        "  PRIMARY KEY (campaign, idx));",
};

static json_t *phases_json_stored(const Campaign *c) {
        json_t *a = json_array();

        for (size_t k = 0; a && k < c->n_phases; k++) {
                const Phase *p = &c->phases[k];

                if (json_array_append_new(a, json_pack("{s:i, s:s?, s:s?, s:b}", "percent", (int)p->percent,
                                                       "started_at", p->started[0] ? p->started : NULL,
                                                       "finished_at", p->finished[0] ? p->finished : NULL,
                                                       "failed", p->failed)) < 0) {
                        json_decref(a);
                        return NULL;
                }
        }
        return a;
}

static int stmt_done(Campaigns *cs, sqlite3_stmt *st, int rc, const char *what) {
        if (rc == SQLITE_OK)
                rc = sqlite3_step(st) == SQLITE_DONE ? SQLITE_OK : sqlite3_errcode(store_db(cs->store));
        sqlite3_reset(st);
        sqlite3_clear_bindings(st);
        return rc == SQLITE_OK ? 0 : store_error(cs->store, rc, what);
}

static int bind_text(sqlite3_stmt *st, int i, const char *v) {
        return v ? sqlite3_bind_text(st, i, v, -1, SQLITE_TRANSIENT) : sqlite3_bind_null(st, i);
}

/* The campaign's row as it is now, in the batch (commit: now). */
static int campaign_save(Campaign *c, bool commit) {
        Campaigns *cs = c->cs;
        sqlite3_stmt *st = cs->stmt_save;
        _cleanup_free_ char *phases = NULL, *manifests = NULL;
        json_t *pj = phases_json_stored(c);
        int rc, r;

        phases = pj ? json_dumps(pj, JSON_COMPACT) : NULL;
        json_decref(pj);
        manifests = json_dumps(c->manifests, JSON_COMPACT);
        if (!phases || !manifests)
                return log_error_errno(-ENOMEM, "Out of memory recording campaign %s.", c->id);
        proto_timestamp_now(c->updated);
        r = store_batch(cs->store);
        if (r < 0)
                return r;
        rc = sqlite3_bind_text(st, 1, c->id, -1, SQLITE_TRANSIENT);
        if (rc == SQLITE_OK)
                rc = bind_text(st, 2, c->name);
        if (rc == SQLITE_OK)
                rc = bind_text(st, 3, c->target);
        if (rc == SQLITE_OK)
                rc = bind_text(st, 4, c->package);
        if (rc == SQLITE_OK)
                rc = bind_text(st, 5, c->version);
        if (rc == SQLITE_OK)
                rc = bind_text(st, 6, c->sha256);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_int64(st, 7, (sqlite3_int64)c->size);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_text(st, 8, manifests, -1, SQLITE_STATIC);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_text(st, 9, phases, -1, SQLITE_STATIC);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_double(st, 10, c->max_failure_rate);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_int64(st, 11, (sqlite3_int64)c->phase_wait);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_text(st, 12, c_names[c->state], -1, SQLITE_STATIC);
        if (rc == SQLITE_OK)
                rc = bind_text(st, 13, c->paused_reason);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_int(st, 14, c->cur);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_int64(st, 15, (sqlite3_int64)c->next_phase_at);
        if (rc == SQLITE_OK)
                rc = bind_text(st, 16, c->created_by);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_text(st, 17, c->created, -1, SQLITE_TRANSIENT);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_text(st, 18, c->updated, -1, SQLITE_TRANSIENT);
        r = stmt_done(cs, st, rc, "recording a campaign");
        if (r >= 0 && commit)
                r = store_commit(cs->store);
        return r;
}

static int device_save(CampDevice *d) {
        Campaigns *cs = d->c->cs;
        sqlite3_stmt *st = cs->stmt_device;
        int rc, r = store_batch(cs->store);

        if (r < 0)
                return r;
        rc = sqlite3_bind_text(st, 1, d->c->id, -1, SQLITE_TRANSIENT);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_int64(st, 2, d->idx);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_text(st, 3, d->device, -1, SQLITE_TRANSIENT);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_int(st, 4, d->manifest);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_text(st, 5, cs_names[d->state], -1, SQLITE_STATIC);
        if (rc == SQLITE_OK)
                rc = bind_text(st, 6, d->job[0] ? d->job : NULL);
        return stmt_done(cs, st, rc, "recording a campaign device");
}

/* ---- events, audit ---------------------------------------------------------- */

/* tether/campaign/ID with {"campaign","state","phase"[,"reason"]}; phase
 * is 1-based (0: none started). */
static void campaign_event(Campaign *c, const char *what, const char *reason) {
        _cleanup_free_ char *text = NULL;
        char name[TETHER_EVENT_NAME_MAX + 1], at[32];
        json_t *o = json_pack("{s:s, s:s, s:i, s:s?, s:s?}", "campaign", c->id, "state", c_names[c->state], "phase",
                              c->cur + 1, "event", what, "reason", reason);
        ProtoEvent e;
        int r;

        text = o ? json_dumps(o, JSON_COMPACT) : NULL;
        json_decref(o);
        if (!text)
                return;
        snprintf(name, sizeof(name), "tether/campaign/%s", c->id);
        proto_timestamp_now(at);
        e = (ProtoEvent){ .name = name, .data = text, .ttl = PROTO_DEFAULT_TTL, .private_ = true,
                          .published_at = at, .coreid = (char *)"cloud" };
        r = events_store(c->cs->events, &e, NULL, 0, 0, NULL);
        if (r < 0)
                log_warning_errno(r, "Failed to store the event of campaign %s (%s): %m", c->id, what);
}

/* ---- driving --------------------------------------------------------------- */

static void campaign_mark(Campaign *c) {
        Campaigns *cs = c->cs;

        if (c->dirty)
                return;
        c->dirty = true;
        c->dirty_next = cs->dirty;
        cs->dirty = c;
        (void)sd_event_source_set_enabled(cs->defer, SD_EVENT_ONESHOT);
}

static void device_set(CampDevice *d, CampState s) {
        Phase *p = &d->c->phases[d->phase];

        if (d->state == s)
                return;
        p->counts[d->state]--;
        p->counts[s]++;
        d->state = s;
        (void)device_save(d);
        campaign_mark(d->c);
}

/* Give d its job, or let it wait for its device's open job. */
static void device_start(CampDevice *d) {
        Campaign *c = d->c;
        Campaigns *cs = c->cs;
        const char *text, *err = NULL;
        char id[OTA_JOB_ID_MAX + 1];
        int r;

        if (d->job[0] || c->state != C_RUNNING)
                return;
        if (ota_device_open_job(cs->ota, d->device)) {
                wait_add(cs, d);
                return;
        }
        wait_remove(cs, d);
        /* On one node the job has no copy of the manifest:
         * campaigns_job_manifest() gives it when the job is sent. In a
         * cluster the job carries its own: the node that sends it may hold
         * the job's replicated row before the campaign's rows that name it
         * (its campaigns could not give the manifest yet). */
        text = json_string_value(json_array_get(c->manifests, d->manifest));
        if (!text)
                r = -EINVAL;
        else if (cs->hooks.leads)
                r = ota_job_queue(cs->ota, d->device, text, strlen(text), id, &err);
        else
                r = ota_job_queue_shared(cs->ota, d->device, c->package, c->version, c->sha256, id, &err);
        if (r < 0) {
                log_warning("Campaign %s: no job for device '%s': %s.", c->id, d->device, err ?: "no manifest");
                if (r == -EBUSY)
                        wait_add(cs, d);
                else
                        device_set(d, CS_FAILED);
                return;
        }
        memcpy(d->job, id, sizeof(d->job));
        if (job_index_add(cs, d) < 0)
                log_error("Out of memory: campaign %s loses track of job %s.", c->id, id);
        /* The job may have gone out already (device online): its state. */
        device_set(d, cs_from_job(ota_job_state(cs->ota, id) ?: "queued"));
        (void)device_save(d);
}

/* Give the devices [from, to) of started phases without a job theirs,
 * CAMPAIGN_START_BATCH at a time from the start defer, so that a phase
 * of many devices does not hold the loop. Until then they count as
 * pending (the phase is not over); a pause or abort stops it (resume
 * starts it again). */
static void campaign_start_devices(Campaign *c, uint32_t from, uint32_t to) {
        if (c->start_next < c->start_to) {
                c->start_next = from < c->start_next ? from : c->start_next;
                c->start_to = to > c->start_to ? to : c->start_to;
        } else {
                c->start_next = from;
                c->start_to = to;
        }
        if (c->start_next < c->start_to)
                (void)sd_event_source_set_enabled(c->cs->start_defer, SD_EVENT_ON);
}

static int start_cb(sd_event_source *s, void *userdata) {
        Campaigns *cs = userdata;
        unsigned budget = CAMPAIGN_START_BATCH;
        bool more = false;

        for (Campaign *c = cs->list; c; c = c->next) {
                if (c->start_next >= c->start_to)
                        continue;
                if (c->state != C_RUNNING || !cs->leading) {
                        c->start_next = c->start_to = 0;
                        continue;
                }
                while (budget > 0 && c->start_next < c->start_to) {
                        CampDevice *d = &c->devices[c->start_next++];

                        if ((int)d->phase <= c->cur && !d->job[0] && !cs_final(d->state))
                                device_start(d);
                        budget--;
                }
                if (c->start_next < c->start_to)
                        more = true;
                else
                        campaign_mark(c); /* the phase may be over now */
        }
        if (!more)
                (void)sd_event_source_set_enabled(s, SD_EVENT_OFF);
        return 0;
}

static void phase_start(Campaign *c, int k) {
        Phase *p = &c->phases[k];

        c->cur = k;
        c->next_phase_at = 0;
        proto_timestamp_now(p->started);
        log_info("Campaign %s: phase %d (%u%%, %u device(s)) starts.", c->id, k + 1, p->percent, p->to - p->from);
        (void)campaign_save(c, false);
        campaign_event(c, "phase-started", NULL);
        campaign_start_devices(c, p->from, p->to);
        campaign_mark(c);
}

static void campaign_set_state(Campaign *c, CampaignState s, const char *reason, const char *actor,
                               const char *action) {
        c->state = s;
        free(c->paused_reason);
        c->paused_reason = reason ? strdup(reason) : NULL;
        (void)campaign_save(c, true);
        campaign_event(c, c_names[s], reason);
        log_info("Campaign %s: %s%s%s%s.", c->id, c_names[s], reason ? " (" : "", reason ?: "", reason ? ")" : "");
        if (actor && action) {
                json_t *detail = json_pack("{s:s, s:i, s:s?}", "state", c_names[s], "phase", c->cur + 1, "reason",
                                           reason);

                (void)store_audit(c->cs->store, actor, action, c->id, detail, NULL);
                json_decref(detail);
        }
}

static int timer_cb(sd_event_source *s, uint64_t usec, void *userdata);

static void arm_timer(Campaign *c) {
        struct timespec now;
        uint64_t wait;

        clock_gettime(CLOCK_REALTIME, &now);
        wait = c->next_phase_at > (uint64_t)now.tv_sec ? c->next_phase_at - (uint64_t)now.tv_sec : 0;
        c->timer = sd_event_source_disable_unref(c->timer);
        if (sd_event_add_time_relative(c->cs->event, &c->timer, CLOCK_MONOTONIC, wait * USEC_PER_SEC, USEC_PER_SEC,
                                       timer_cb, c) < 0)
                log_error("Campaign %s: cannot arm the timer of phase_wait; the next phase starts on resume.", c->id);
}

/* Start the phase after the current one (empty ones are skipped), or
 * finish. */
static void campaign_next(Campaign *c) {
        for (int k = c->cur + 1; k < (int)c->n_phases; k++)
                if (c->phases[k].to > c->phases[k].from) {
                        phase_start(c, k);
                        return;
                }
        c->next_phase_at = 0;
        campaign_set_state(c, C_FINISHED, NULL, NULL, NULL);
}

static int timer_cb(sd_event_source *s, uint64_t usec, void *userdata) {
        Campaign *c = userdata;

        c->timer = sd_event_source_disable_unref(c->timer);
        if (c->cs->leading && c->state == C_RUNNING && c->next_phase_at > 0)
                campaign_next(c);
        return 0;
}

/* Whether every device of the current phase is final or queued for a
 * device not online here. */
static bool phase_over(Campaign *c) {
        const Phase *p = &c->phases[c->cur];

        if (p->counts[CS_PENDING] + p->counts[CS_SENT] + p->counts[CS_DOWNLOADING] + p->counts[CS_INSTALLING] > 0)
                return false;
        if (p->counts[CS_QUEUED] == 0)
                return true;
        /* Only now, with nothing else left: are the queued ones offline? */
        for (uint32_t i = p->from; i < p->to; i++) {
                const CampDevice *d = &c->devices[i];
                Device *dev;

                if (d->state != CS_QUEUED)
                        continue;
                dev = devices_find(c->cs->devices, d->device);
                if (dev && (device_session(dev) || device_elsewhere(dev)))
                        return false; /* online here, or on another cluster node that sends it */
        }
        return true;
}

static unsigned phase_final(const Phase *p, unsigned *ret_failures) {
        unsigned n = 0, f = 0;

        for (int s = CS_COMMITTED; s < _CS_MAX; s++) {
                n += p->counts[s];
                if (cs_failure((CampState)s))
                        f += p->counts[s];
        }
        *ret_failures = f;
        return n;
}

static void campaign_evaluate(Campaign *c) {
        Phase *p;
        unsigned finals, failures;
        double rate;

        if (c->state != C_RUNNING || c->cur < 0 || c->next_phase_at > 0)
                return;
        p = &c->phases[c->cur];
        if (p->finished[0] || !phase_over(c))
                return;
        proto_timestamp_now(p->finished);
        finals = phase_final(p, &failures);
        rate = finals ? 100.0 * failures / finals : 0;
        log_info("Campaign %s: phase %d over: %u final, %u failure(s).", c->id, c->cur + 1, finals, failures);
        if (rate > c->max_failure_rate) {
                char reason[CAMPAIGN_REASON_MAX];

                p->failed = true;
                snprintf(reason, sizeof(reason), "failure rate %.0f%% in phase %d is over the %g%% allowed", rate,
                         c->cur + 1, c->max_failure_rate);
                campaign_event(c, "phase-failed", reason);
                campaign_set_state(c, C_PAUSED, reason, "cloud", "campaign.pause");
                return;
        }
        campaign_event(c, "phase-finished", NULL);
        if (c->phase_wait > 0 && c->cur + 1 < (int)c->n_phases) {
                struct timespec now;

                clock_gettime(CLOCK_REALTIME, &now);
                c->next_phase_at = (uint64_t)now.tv_sec + c->phase_wait;
                (void)campaign_save(c, false);
                arm_timer(c);
                return;
        }
        campaign_next(c);
}

static int defer_cb(sd_event_source *s, void *userdata) {
        Campaigns *cs = userdata;

        while (cs->dirty) {
                Campaign *c = cs->dirty;

                cs->dirty = c->dirty_next;
                c->dirty = false;
                c->dirty_next = NULL;
                if (cs->leading)
                        campaign_evaluate(c);
        }
        return 0;
}

void campaigns_job_changed(Campaigns *cs, const char *job, const char *device, const char *state) {
        CampDevice *d = cs ? job_lookup(cs, job) : NULL;
        CampState s = cs_from_job(state);

        /* Only the leader counts and starts (its rows tell the others). */
        if (!cs || !cs->leading)
                return;
        if (d)
                device_set(d, s);
        if (!cs_final(s) || cs->wait_n == 0)
                return;
        /* That job's end may let devices waiting for it have theirs. */
        for (CampDevice *w = cs->wait_b[hash(cs, device) & (cs->wait_nb - 1)], *next; w; w = next) {
                next = w->wait_next;
                if (streq(w->device, device) && w->c->state == C_RUNNING)
                        device_start(w);
        }
}

int campaigns_job_manifest(Campaigns *cs, const char *job, const char *device, const char **ret_text,
                           size_t *ret_len) {
        CampDevice *d = cs ? job_lookup(cs, job) : NULL;
        json_t *m;

        if (!d || !streq(d->device, device))
                return -ENOENT;
        m = json_array_get(d->c->manifests, d->manifest);
        if (!json_is_string(m))
                return -ENOENT;
        *ret_text = json_string_value(m);
        *ret_len = json_string_length(m);
        return 0;
}

bool campaigns_may_send(Campaigns *cs, const char *job) {
        CampDevice *d = cs ? job_lookup(cs, job) : NULL;

        return !d || d->c->state == C_RUNNING || d->c->state == C_FINISHED;
}

/* ---- the campaign's JSON -------------------------------------------------------- */

static json_t *counts_json(const uint32_t counts[_CS_MAX]) {
        json_t *o = json_object();

        for (int s = 0; o && s < _CS_MAX; s++)
                if (json_object_set_new(o, cs_count_names[s], json_integer(counts[s])) < 0) {
                        json_decref(o);
                        return NULL;
                }
        return o;
}

static const char *phase_state(const Campaign *c, size_t k) {
        const Phase *p = &c->phases[k];

        if ((int)k > c->cur || !p->started[0])
                return "pending";
        if (p->failed)
                return "failed";
        if (!p->finished[0])
                return "running";
        if ((int)k == c->cur && c->next_phase_at > 0)
                return "waiting";
        return "done";
}

static json_t *campaign_json(const Campaign *c, bool details) {
        uint32_t total[_CS_MAX] = {};
        json_t *o, *phases = json_array();

        for (size_t k = 0; phases && k < c->n_phases; k++) {
                const Phase *p = &c->phases[k];
                unsigned failures, finals = phase_final(p, &failures);
                json_t *pj;

                for (int s = 0; s < _CS_MAX; s++)
                        total[s] += p->counts[s];
                pj = json_pack("{s:i, s:i, s:s, s:s?, s:s?, s:o, s:f}", "percent", (int)p->percent, "devices",
                               (int)(p->to - p->from), "state", phase_state(c, k), "started_at",
                               p->started[0] ? p->started : NULL, "finished_at", p->finished[0] ? p->finished : NULL,
                               "counts", counts_json(p->counts), "failure_rate",
                               finals ? round(1000.0 * failures / finals) / 10 : 0.0);
                if (json_array_append_new(phases, pj) < 0) {
                        json_decref(phases);
                        phases = NULL;
                }
        }
        if (!phases)
                return NULL;
        o = json_pack("{s:s, s:s?, s:s?, s:s, s:s, s:s, s:I, s:i, s:f, s:I, s:s, s:s?, s:i, s:s, s:s, s:s?, "
                      "s:o, s:o}",
                      "id", c->id, "name", c->name, "target", c->target, "package", c->package, "version", c->version,
                      "sha256", c->sha256, "size", (json_int_t)c->size, "devices", (int)c->n_devices,
                      "max_failure_rate", c->max_failure_rate, "phase_wait", (json_int_t)c->phase_wait, "state",
                      c_names[c->state], "paused_reason", c->paused_reason, "phase", c->cur + 1, "created_at",
                      c->created, "updated_at", c->updated, "created_by", c->created_by[0] ? c->created_by : NULL,
                      "phases", phases, "counts", counts_json(total));
        if (o && c->next_phase_at > 0)
                json_object_set_new(o, "next_phase_at", json_integer((json_int_t)c->next_phase_at));
        if (o && details)
                json_object_set_new(o, "manifests", json_integer((json_int_t)json_array_size(c->manifests)));
        return o;
}

/* ---- campaigns in memory ---------------------------------------------------------- */

static Campaign *campaign_find(Campaigns *cs, const char *id) {
        for (Campaign *c = cs->list; c; c = c->next)
                if (streq(c->id, id))
                        return c;
        return NULL;
}

static void campaign_free(Campaign *c) {
        if (!c)
                return;
        for (size_t i = 0; i < c->n_devices; i++) {
                job_index_remove(c->cs, &c->devices[i]);
                wait_remove(c->cs, &c->devices[i]);
        }
        sd_event_source_disable_unref(c->timer);
        free(c->name);
        free(c->target);
        free(c->package);
        free(c->version);
        free(c->sha256);
        free(c->paused_reason);
        json_decref(c->manifests);
        free(c->phases);
        free(c->devices);
        free(c);
}

/* Phases from percentages: bounds and the devices' phase numbers. */
static void campaign_layout(Campaign *c) {
        uint32_t from = 0;

        for (size_t k = 0; k < c->n_phases; k++) {
                uint64_t to = ((uint64_t)c->phases[k].percent * c->n_devices + 99) / 100;

                if (to < from)
                        to = from;
                if (to > c->n_devices)
                        to = c->n_devices;
                c->phases[k].from = from;
                c->phases[k].to = (uint32_t)to;
                for (uint32_t i = from; i < to; i++)
                        c->devices[i].phase = (uint16_t)k;
                from = (uint32_t)to;
        }
}

/* Forget the oldest aborted or finished campaigns while there are
 * CAMPAIGNS_KEPT_MAX or more, or their devices and need more would be over
 * CAMPAIGNS_DEVICES_TOTAL_MAX. Whether there is room now. */
static void campaign_forget(Campaigns *cs, Campaign **victim);

static bool campaigns_prune(Campaigns *cs, size_t need) {
        size_t total = 0;

        for (Campaign *c = cs->list; c; c = c->next)
                total += c->n_devices;
        while (cs->n >= CAMPAIGNS_KEPT_MAX || total + need > CAMPAIGNS_DEVICES_TOTAL_MAX) {
                Campaign **victim = NULL;

                for (Campaign **p = &cs->list; *p; p = &(*p)->next)
                        if ((*p)->state == C_ABORTED || (*p)->state == C_FINISHED)
                                victim = p;
                if (!victim)
                        return false;
                total -= (*victim)->n_devices;
                campaign_forget(cs, victim);
        }
        return true;
}

static void campaign_forget(Campaigns *cs, Campaign **victim) {
        Campaign *c = *victim;
        sqlite3_stmt *st = NULL;

        *victim = c->next;
        cs->n--;
        /* Its jobs that may still go out (queued for devices offline when
         * it finished) take a copy of their manifest. */
        for (size_t i = 0; i < c->n_devices; i++) {
                const CampDevice *d = &c->devices[i];
                json_t *m = json_array_get(c->manifests, d->manifest);

                if (d->job[0] && !cs_final(d->state) && json_is_string(m) &&
                    ota_job_adopt_manifest(cs->ota, d->job, json_string_value(m), json_string_length(m)) == -ENOMEM)
                        log_error("Out of memory: job %s of forgotten campaign %s loses its manifest.", d->job,
                                  c->id);
        }
        if (store_batch(cs->store) >= 0 &&
            sqlite3_prepare_v2(store_db(cs->store),
                               "DELETE FROM campaign_devices WHERE campaign = ?1;", -1, &st, NULL) == SQLITE_OK) {
                (void)stmt_done(cs, st, sqlite3_bind_text(st, 1, c->id, -1, SQLITE_TRANSIENT),
                                "forgetting a campaign");
                sqlite3_finalize(st);
                st = NULL;
        }
        if (sqlite3_prepare_v2(store_db(cs->store), "DELETE FROM campaigns WHERE id = ?1;", -1, &st, NULL) ==
            SQLITE_OK) {
                (void)stmt_done(cs, st, sqlite3_bind_text(st, 1, c->id, -1, SQLITE_TRANSIENT),
                                "forgetting a campaign");
                sqlite3_finalize(st);
        }
        if (c->dirty) {
                for (Campaign **d = &cs->dirty; *d; d = &(*d)->dirty_next)
                        if (*d == c) {
                                *d = c->dirty_next;
                                break;
                        }
        }
        campaign_free(c);
}

/* ---- the API --------------------------------------------------------------------- */

static unsigned fail(json_t **ret_body, unsigned status, const char *fmt, ...) _printf_(3, 4);
static unsigned fail(json_t **ret_body, unsigned status, const char *fmt, ...) {
        char text[256];
        va_list ap;

        va_start(ap, fmt);
        vsnprintf(text, sizeof(text), fmt, ap);
        va_end(ap);
        *ret_body = json_pack("{s:b, s:s}", "ok", 0, "error", text);
        return status;
}

/* Optional text parameter of at most max bytes, UTF-8, no control characters. */
static int opt_text(json_t *params, const char *key, size_t max, const char **ret) {
        json_t *v = json_object_get(params, key);
        const char *s;
        size_t len;

        *ret = NULL;
        if (!v || json_is_null(v))
                return 0;
        if (!json_is_string(v))
                return -EINVAL;
        s = json_string_value(v);
        len = json_string_length(v);
        /* C0, DEL and C1 (U+0080..U+009F): tether campaign prints it. */
        if (!proto_text_clean(s, len, max))
                return -EINVAL;
        *ret = len ? s : NULL;
        return 0;
}

static bool campaign_id_valid(const char *id) {
        return strlen(id) == CAMPAIGN_ID_LEN && strspn(id, "0123456789abcdef") == CAMPAIGN_ID_LEN;
}

unsigned campaigns_api_create(Campaigns *cs, json_t *params, const char *actor, json_t **ret_body,
                              char ret_id[static CAMPAIGN_ID_LEN + 1]) {
        json_t *manifests = json_object_get(params, "manifests"), *devs = json_object_get(params, "devices");
        json_t *phases = json_object_get(params, "phases"), *rate = json_object_get(params, "max_failure_rate");
        json_t *wait = json_object_get(params, "phase_wait"), *map = NULL, *v;
        _cleanup_free_ Manifest *mans = NULL;
        const char *name, *target;
        Campaign *c = NULL;
        size_t n_man, i, n_open = 0, n_devices = 0;
        unsigned status = MHD_HTTP_BAD_REQUEST;
        uint8_t rnd[CAMPAIGN_ID_LEN / 2];

        if (!json_is_object(params))
                return fail(ret_body, status, "send a JSON object");
        if (opt_text(params, "name", CAMPAIGN_NAME_MAX, &name) < 0)
                return fail(ret_body, status, "\"name\" must be text of at most %d bytes", CAMPAIGN_NAME_MAX);
        if (opt_text(params, "target", CAMPAIGN_TARGET_MAX, &target) < 0)
                return fail(ret_body, status, "\"target\" must be text of at most %d bytes", CAMPAIGN_TARGET_MAX);
        if (!json_is_array(manifests) || json_array_size(manifests) == 0 ||
            json_array_size(manifests) > CAMPAIGN_MANIFESTS_MAX)
                return fail(ret_body, status, "\"manifests\" must be an array of 1 to %d signed manifests",
                            CAMPAIGN_MANIFESTS_MAX);
        if (devs && !json_is_null(devs) &&
            (!json_is_array(devs) || json_array_size(devs) == 0 || json_array_size(devs) > CAMPAIGN_DEVICES_MAX))
                return fail(ret_body, status, "\"devices\" must be an array of 1 to %d device IDs",
                            CAMPAIGN_DEVICES_MAX);
        if (!json_is_array(phases) || json_array_size(phases) == 0 || json_array_size(phases) > CAMPAIGN_PHASES_MAX)
                return fail(ret_body, status, "\"phases\" must be an array of 1 to %d percentages",
                            CAMPAIGN_PHASES_MAX);
        {
                json_int_t last = 0;

                json_array_foreach(phases, i, v) {
                        if (!json_is_integer(v) || json_integer_value(v) <= last || json_integer_value(v) > 100)
                                return fail(ret_body, status,
                                            "\"phases\" must be whole percentages, strictly increasing, from 1 to "
                                            "100");
                        last = json_integer_value(v);
                }
                if (last != 100)
                        return fail(ret_body, status, "the last of \"phases\" must be 100");
        }
        if (!json_is_number(rate) || json_number_value(rate) < 0 || json_number_value(rate) > 100 ||
            isnan(json_number_value(rate)))
                return fail(ret_body, status, "\"max_failure_rate\" must be a number from 0 to 100");
        if (wait && !json_is_null(wait) &&
            (!json_is_integer(wait) || json_integer_value(wait) < 0 ||
             json_integer_value(wait) > CAMPAIGN_PHASE_WAIT_MAX))
                return fail(ret_body, status, "\"phase_wait\" must be whole seconds from 0 to %d",
                            CAMPAIGN_PHASE_WAIT_MAX);
        for (Campaign *o = cs->list; o; o = o->next)
                if (o->state == C_RUNNING || o->state == C_PAUSED)
                        n_open++;
        if (n_open >= CAMPAIGNS_OPEN_MAX)
                return fail(ret_body, MHD_HTTP_CONFLICT, "%zu campaigns are running or paused: abort or finish some",
                            n_open);
        if (cs->hooks.leads) {
                _cleanup_free_ char *text = json_dumps(manifests, JSON_COMPACT);

                if (!text)
                        return fail(ret_body, MHD_HTTP_INTERNAL_SERVER_ERROR, "out of memory");
                if (strlen(text) > CAMPAIGN_CLUSTER_MANIFESTS_MAX)
                        return fail(ret_body, MHD_HTTP_CONTENT_TOO_LARGE,
                                    "in cluster mode a campaign's manifests are at most %u KiB together (these are "
                                    "%zu KiB): split the campaign", CAMPAIGN_CLUSTER_MANIFESTS_MAX / 1024,
                                    strlen(text) / 1024);
        }

        /* The manifests: the same update, each naming its devices. */
        n_man = json_array_size(manifests);
        mans = calloc(n_man, sizeof(*mans));
        map = json_object(); /* device -> manifest index */
        if (!mans || !map)
                goto oom;
        json_array_foreach(manifests, i, v) {
                ManifestEnvelope env;
                const char *err = NULL;
                Manifest *m = &mans[i];

                if (!json_is_string(v) ||
                    manifest_envelope_split((const uint8_t *)json_string_value(v), json_string_length(v), &env) < 0 ||
                    manifest_body_parse(env.body, env.body_len, m, &err) < 0) {
                        status = fail(ret_body, status, "manifest %zu is not a signed tether manifest%s%s", i + 1,
                                      err ? ": " : "", err ?: "");
                        goto out;
                }
                if (i > 0 && (!streq(m->package, mans[0].package) || !streq(m->version, mans[0].version) ||
                              !streq(m->sha256, mans[0].sha256) || m->size != mans[0].size)) {
                        status = fail(ret_body, status,
                                      "manifest %zu names %s %s (%s), not %s %s as manifest 1: a campaign is one "
                                      "update", i + 1, m->package, m->version, m->sha256, mans[0].package,
                                      mans[0].version);
                        goto out;
                }
                if (m->n_devices == 0) {
                        status = fail(ret_body, status,
                                      "manifest %zu names no devices (tags only): a campaign's manifests name its "
                                      "devices", i + 1);
                        goto out;
                }
                for (size_t k = 0; k < m->n_devices; k++)
                        if (!json_object_get(map, m->devices[k])) {
                                if (json_object_set_new(map, m->devices[k], json_integer((json_int_t)i)) < 0)
                                        goto oom;
                        }
        }
        if (!mans[0].url) {
                _cleanup_free_ char *path = NULL;
                struct stat st;

                if (!cs->config->ota_dir ||
                    asprintf(&path, "%s/%s.deb", cs->config->ota_dir, mans[0].sha256) < 0 || stat(path, &st) < 0 ||
                    (uint64_t)st.st_size != mans[0].size) {
                        status = fail(ret_body, status,
                                      "the manifests have no url and artifact %s is not uploaded to this cloud",
                                      mans[0].sha256);
                        goto out;
                }
        }

        c = calloc(1, sizeof(*c));
        if (!c)
                goto oom;
        c->cs = cs;
        c->cur = -1;
        c->manifests = json_incref(manifests);
        c->name = name ? strdup(name) : NULL;
        c->target = target ? strdup(target) : NULL;
        c->package = strdup(mans[0].package);
        c->version = strdup(mans[0].version);
        c->sha256 = strdup(mans[0].sha256);
        c->size = mans[0].size;
        c->max_failure_rate = json_number_value(rate);
        c->phase_wait = wait && json_is_integer(wait) ? (uint64_t)json_integer_value(wait) : 0;
        c->n_phases = json_array_size(phases);
        c->phases = calloc(c->n_phases, sizeof(*c->phases));
        if ((name && !c->name) || (target && !c->target) || !c->package || !c->version || !c->sha256 || !c->phases)
                goto oom;
        json_array_foreach(phases, i, v)
                c->phases[i].percent = (unsigned)json_integer_value(v);

        /* The devices: as given (each named by a manifest, once), else the
         * manifests' in order, de-duplicated. */
        if (devs && json_is_array(devs)) {
                json_t *seen = json_object();

                c->devices = calloc(json_array_size(devs), sizeof(*c->devices));
                if (!seen || !c->devices) {
                        json_decref(seen);
                        goto oom;
                }
                json_array_foreach(devs, i, v) {
                        const char *id = json_string_value(v);
                        json_t *mi;

                        if (!id || strlen(id) != json_string_length(v) ||
                            proto_name_check(id, strlen(id), PROTO_NAME_DEVICE) < 0) {
                                json_decref(seen);
                                status = fail(ret_body, status, "\"devices\"[%zu] is not a device ID", i);
                                goto out;
                        }
                        if (json_object_get(seen, id)) {
                                json_decref(seen);
                                status = fail(ret_body, status, "device %s is listed twice", id);
                                goto out;
                        }
                        mi = json_object_get(map, id);
                        if (!mi) {
                                json_decref(seen);
                                status = fail(ret_body, status, "device %s is not named by any of the manifests", id);
                                goto out;
                        }
                        if (json_object_set_new(seen, id, json_true()) < 0) {
                                json_decref(seen);
                                goto oom;
                        }
                        snprintf(c->devices[n_devices].device, sizeof(c->devices[0].device), "%s", id);
                        c->devices[n_devices++].manifest = (uint16_t)json_integer_value(mi);
                }
                json_decref(seen);
        } else {
                size_t total = 0;

                for (i = 0; i < n_man; i++)
                        total += mans[i].n_devices;
                c->devices = calloc(total, sizeof(*c->devices));
                if (!c->devices)
                        goto oom;
                for (i = 0; i < n_man; i++)
                        for (size_t k = 0; k < mans[i].n_devices; k++) {
                                json_t *mi = json_object_get(map, mans[i].devices[k]);

                                if (!mi || json_integer_value(mi) < 0)
                                        continue; /* seen before */
                                if (n_devices >= CAMPAIGN_DEVICES_MAX) {
                                        status = fail(ret_body, status, "more than %d devices",
                                                      CAMPAIGN_DEVICES_MAX);
                                        goto out;
                                }
                                snprintf(c->devices[n_devices].device, sizeof(c->devices[0].device), "%s",
                                         mans[i].devices[k]);
                                c->devices[n_devices++].manifest = (uint16_t)json_integer_value(mi);
                                json_integer_set(mi, -1);
                        }
        }
        c->n_devices = n_devices;
        for (i = 0; i < n_devices; i++) {
                c->devices[i].c = c;
                c->devices[i].idx = (uint32_t)i;
                c->devices[i].state = CS_PENDING;
        }
        campaign_layout(c);
        for (i = 0; i < n_devices; i++)
                c->phases[c->devices[i].phase].counts[CS_PENDING]++;

        do {
                if (getrandom(rnd, sizeof(rnd), 0) != sizeof(rnd)) {
                        status = fail(ret_body, MHD_HTTP_INTERNAL_SERVER_ERROR, "no randomness for an id");
                        goto out;
                }
                hex_encode(rnd, sizeof(rnd), c->id);
        } while (campaign_find(cs, c->id));
        proto_timestamp_now(c->created);
        snprintf(c->created_by, sizeof(c->created_by), "%s", actor ?: "");
        c->state = C_RUNNING;

        if (!campaigns_prune(cs, c->n_devices)) {
                status = fail(ret_body, MHD_HTTP_CONFLICT,
                              "the campaigns running or paused leave no room for %zu more devices (at most %d "
                              "campaigns, %d devices kept): abort or finish some", c->n_devices, CAMPAIGNS_KEPT_MAX,
                              CAMPAIGNS_DEVICES_TOTAL_MAX);
                goto out;
        }
        /* On disk, with every device, before anything starts; the
         * devices first: a large campaign takes several transactions
         * (StoreHooks.batch_full), and a cluster node that has the row has
         * its devices. */
        for (i = 0; i < n_devices; i++)
                if (device_save(&c->devices[i]) < 0)
                        goto store_failed;
        if (campaign_save(c, false) < 0)
                goto store_failed;
        if (store_commit(cs->store) < 0)
                goto store_failed;
        c->next = cs->list;
        cs->list = c;
        cs->n++;
        log_info("Campaign %s created by %s: %s %s to %zu device(s) in %zu phase(s).", c->id, actor ?: "?",
                 c->package, c->version, c->n_devices, c->n_phases);
        campaign_event(c, "created", NULL);
        /* Else the leader starts it once the rows reach it. */
        if (cs->leading)
                campaign_next(c);
        memcpy(ret_id, c->id, CAMPAIGN_ID_LEN + 1);
        *ret_body = json_pack("{s:b, s:o}", "ok", 1, "campaign", campaign_json(c, true));
        status = MHD_HTTP_CREATED;
        c = NULL;
        goto out;

store_failed:
        (void)store_rollback(cs->store);
        status = fail(ret_body, MHD_HTTP_SERVICE_UNAVAILABLE, "cannot record the campaign now");
        goto out;
oom:
        status = MHD_HTTP_INTERNAL_SERVER_ERROR;
        *ret_body = NULL;
out:
        if (mans)
                for (i = 0; i < n_man; i++)
                        manifest_done(&mans[i]);
        json_decref(map);
        campaign_free(c);
        return status;
}

unsigned campaigns_api_list(Campaigns *cs, json_t **ret_body) {
        json_t *a = json_array();

        for (Campaign *c = cs->list; a && c; c = c->next)
                if (json_array_append_new(a, campaign_json(c, false)) < 0) {
                        json_decref(a);
                        a = NULL;
                }
        *ret_body = a ? json_pack("{s:b, s:o}", "ok", 1, "campaigns", a) : NULL;
        return MHD_HTTP_OK;
}

unsigned campaigns_api_get(Campaigns *cs, const char *id, json_t **ret_body) {
        Campaign *c = campaign_id_valid(id) ? campaign_find(cs, id) : NULL;

        if (!c)
                return fail(ret_body, MHD_HTTP_NOT_FOUND, "no such campaign");
        *ret_body = json_pack("{s:b, s:o}", "ok", 1, "campaign", campaign_json(c, true));
        return MHD_HTTP_OK;
}

unsigned campaigns_api_devices(Campaigns *cs, const char *id, const char *page, const char *per_page,
                               json_t **ret_body) {
        Campaign *c = campaign_id_valid(id) ? campaign_find(cs, id) : NULL;
        const char *err = NULL;
        ApiPage pg;
        json_t *a;
        size_t from, to;

        if (!c)
                return fail(ret_body, MHD_HTTP_NOT_FOUND, "no such campaign");
        if (api_parse_page(page, per_page, &pg, &err) < 0)
                return fail(ret_body, MHD_HTTP_BAD_REQUEST, "%s", err);
        if (!pg.paged) {
                pg.page = 1;
                pg.per_page = c->n_devices;
        }
        from = pg.page - 1 > c->n_devices / (pg.per_page ?: 1) ? c->n_devices : (pg.page - 1) * pg.per_page;
        if (from > c->n_devices)
                from = c->n_devices;
        to = from + pg.per_page > c->n_devices ? c->n_devices : from + pg.per_page;
        a = json_array();
        for (size_t i = from; a && i < to; i++) {
                const CampDevice *d = &c->devices[i];

                if (json_array_append_new(a, json_pack("{s:s, s:i, s:s, s:s?}", "device", d->device, "phase",
                                                       d->phase + 1, "state", cs_names[d->state], "job",
                                                       d->job[0] ? d->job : NULL)) < 0) {
                        json_decref(a);
                        a = NULL;
                }
        }
        *ret_body = a ? json_pack("{s:b, s:o, s:{s:I}}", "ok", 1, "devices", a, "meta", "total_pages",
                                  (json_int_t)(pg.per_page ? (c->n_devices + pg.per_page - 1) / pg.per_page : 0))
                      : NULL;
        return MHD_HTTP_OK;
}

unsigned campaigns_api_action(Campaigns *cs, const char *id, const char *action, const char *actor,
                              json_t **ret_body) {
        Campaign *c = campaign_id_valid(id) ? campaign_find(cs, id) : NULL;

        if (!cs->leading)
                /* The Api sends actions to the leader; leadership moved
                 * meanwhile. */
                return fail(ret_body, MHD_HTTP_SERVICE_UNAVAILABLE,
                            "this cluster node does not lead the campaigns (any more); try again");
        if (!c)
                return fail(ret_body, MHD_HTTP_NOT_FOUND, "no such campaign");
        if (streq(action, "pause")) {
                if (c->state != C_RUNNING)
                        return fail(ret_body, MHD_HTTP_CONFLICT, "campaign %s is %s, not running", c->id,
                                    c_names[c->state]);
                c->timer = sd_event_source_disable_unref(c->timer);
                campaign_set_state(c, C_PAUSED, "paused by the operator", NULL, NULL);
        } else if (streq(action, "resume")) {
                if (c->state != C_PAUSED)
                        return fail(ret_body, MHD_HTTP_CONFLICT, "campaign %s is %s, not paused", c->id,
                                    c_names[c->state]);
                campaign_set_state(c, C_RUNNING, NULL, NULL, NULL);
                /* What pause held: queued jobs of devices online now, and
                 * devices of started phases still without a job. */
                ota_send_queued(cs->ota);
                if (c->cur >= 0)
                        campaign_start_devices(c, 0, c->phases[c->cur].to);
                if (c->cur >= 0 && c->phases[c->cur].finished[0] && c->next_phase_at == 0)
                        /* Paused for its failure rate: the operator overrides. */
                        campaign_next(c);
                else if (c->next_phase_at > 0)
                        arm_timer(c);
                else if (c->cur >= 0)
                        campaign_mark(c);
                else
                        campaign_next(c);
        } else if (streq(action, "abort")) {
                if (c->state != C_RUNNING && c->state != C_PAUSED)
                        return fail(ret_body, MHD_HTTP_CONFLICT, "campaign %s is %s already", c->id,
                                    c_names[c->state]);
                c->timer = sd_event_source_disable_unref(c->timer);
                c->next_phase_at = 0;
                campaign_set_state(c, C_ABORTED, "aborted by the operator", NULL, NULL);
                for (size_t i = 0; i < c->n_devices; i++) {
                        CampDevice *d = &c->devices[i];

                        wait_remove(cs, d);
                        if (d->state == CS_QUEUED && d->job[0])
                                (void)ota_job_cancel(cs->ota, d->job, "aborted",
                                                     "the campaign was aborted before the device got the job");
                }
                (void)store_commit(cs->store);
        } else
                return fail(ret_body, MHD_HTTP_NOT_FOUND, "no such campaign action");
        (void)actor;
        *ret_body = json_pack("{s:b, s:o}", "ok", 1, "campaign", campaign_json(c, true));
        return MHD_HTTP_OK;
}

/* ---- loading ------------------------------------------------------------------------ */

static char *col_dup(sqlite3_stmt *st, int i, bool *oom) {
        const char *t = (const char *)sqlite3_column_text(st, i);
        char *c = t ? strdup(t) : NULL;

        if (t && !c)
                *oom = true;
        return c;
}

static int campaign_load_devices(Campaigns *cs, Campaign *c) {
        sqlite3_stmt *st = NULL;
        size_t cap = 0;
        int rc;

        rc = sqlite3_prepare_v2(store_db(cs->store),
                                "SELECT idx, device, manifest, state, job FROM campaign_devices WHERE campaign = ?1 "
                                "ORDER BY idx",
                                -1, &st, NULL);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_text(st, 1, c->id, -1, SQLITE_TRANSIENT);
        while (rc == SQLITE_OK && (rc = sqlite3_step(st)) == SQLITE_ROW) {
                const char *dev = (const char *)sqlite3_column_text(st, 1);
                const char *state = (const char *)sqlite3_column_text(st, 3);
                const char *job = (const char *)sqlite3_column_text(st, 4);
                int s = state ? cs_from_name(state) : -1;
                CampDevice *d;

                rc = SQLITE_OK;
                if (!dev || strlen(dev) > PROTO_DEVICE_ID_MAX || s < 0 ||
                    (size_t)sqlite3_column_int64(st, 0) != c->n_devices ||
                    (job && !ota_job_id_valid(job, strlen(job))) ||
                    (size_t)sqlite3_column_int(st, 2) >= json_array_size(c->manifests)) {
                        sqlite3_finalize(st);
                        return -EINVAL;
                }
                if (c->n_devices == cap) {
                        CampDevice *n = reallocarray(c->devices, cap ? cap * 2 : 64, sizeof(*n));

                        if (!n) {
                                sqlite3_finalize(st);
                                return -ENOMEM;
                        }
                        c->devices = n;
                        cap = cap ? cap * 2 : 64;
                }
                d = &c->devices[c->n_devices];
                *d = (CampDevice){ .c = c, .idx = (uint32_t)c->n_devices, .state = (uint8_t)s,
                                   .manifest = (uint16_t)sqlite3_column_int(st, 2) };
                snprintf(d->device, sizeof(d->device), "%s", dev);
                if (job)
                        snprintf(d->job, sizeof(d->job), "%s", job);
                c->n_devices++;
        }
        sqlite3_finalize(st);
        return rc == SQLITE_DONE ? 0 : store_error(cs->store, rc, "reading a campaign's devices");
}

/* A campaign as it was: its counts from its devices' states; when this node
 * drives the campaigns, the devices' states from their jobs now, then on. */
static void campaign_resume_loaded(Campaign *c) {
        Campaigns *cs = c->cs;

        for (size_t i = 0; i < c->n_devices; i++) {
                CampDevice *d = &c->devices[i];

                c->phases[d->phase].counts[d->state]++;
                if (d->job[0] && job_index_add(cs, d) < 0)
                        log_error("Out of memory: campaign %s loses track of job %s.", c->id, d->job);
        }
        if (!cs->leading)
                return;
        for (size_t i = 0; i < c->n_devices; i++) {
                CampDevice *d = &c->devices[i];
                const char *js = d->job[0] ? ota_job_state(cs->ota, d->job) : NULL;

                if (js)
                        device_set(d, cs_from_job(js));
                else if (d->job[0] && !cs_final(d->state))
                        /* The job is gone (pruned, or a crash lost it): the
                         * device's last known state is all there is. */
                        device_set(d, CS_FAILED);
        }
        if (c->state == C_RUNNING && c->cur < 0)
                /* Made on another node: it starts here. */
                campaign_next(c);
        else if (c->state == C_RUNNING)
                campaign_start_devices(c, 0, c->phases[c->cur].to);
        if (c->state == C_RUNNING && c->next_phase_at > 0)
                arm_timer(c);
        campaign_mark(c);
}

#define CAMPAIGN_COLUMNS                                                                                          \
        "id, name, target, package, version, sha256, size, manifests, phases, max_failure_rate, phase_wait, "   \
        "state, paused_reason, phase, next_phase_at, created_by, created_at, updated_at"

/* The campaign of the row st is on, with its devices: -EINVAL for records
 * that are not valid (logged), -ENOMEM. */
static int campaign_from_row(Campaigns *cs, sqlite3_stmt *st, Campaign **ret) {
        const char *id = (const char *)sqlite3_column_text(st, 0);
        const char *state = (const char *)sqlite3_column_text(st, 11);
        const char *created = (const char *)sqlite3_column_text(st, 16);
        const char *updated = (const char *)sqlite3_column_text(st, 17);
        const char *by = (const char *)sqlite3_column_text(st, 15);
        json_t *ph;
        bool oom = false;
        Campaign *c;
        int r, s = -1;

        for (int k = 0; state && k < (int)ELEMENTSOF(c_names); k++)
                if (streq(state, c_names[k]))
                        s = k;
        if (!id || !campaign_id_valid(id) || s < 0 || !created || strlen(created) >= 32 || !updated ||
            strlen(updated) >= 32) {
                log_warning("Skipped a campaign record that is not valid.");
                return -EINVAL;
        }
        c = calloc(1, sizeof(*c));
        if (!c)
                return -ENOMEM;
        c->cs = cs;
        snprintf(c->id, sizeof(c->id), "%s", id);
        c->name = col_dup(st, 1, &oom);
        c->target = col_dup(st, 2, &oom);
        c->package = col_dup(st, 3, &oom);
        c->version = col_dup(st, 4, &oom);
        c->sha256 = col_dup(st, 5, &oom);
        c->size = (uint64_t)sqlite3_column_int64(st, 6);
        c->manifests = json_loads((const char *)sqlite3_column_text(st, 7) ?: "", 0, NULL);
        ph = json_loads((const char *)sqlite3_column_text(st, 8) ?: "", 0, NULL);
        c->max_failure_rate = sqlite3_column_double(st, 9);
        c->phase_wait = (uint64_t)sqlite3_column_int64(st, 10);
        c->state = (CampaignState)s;
        c->paused_reason = col_dup(st, 12, &oom);
        c->cur = sqlite3_column_int(st, 13);
        c->next_phase_at = (uint64_t)sqlite3_column_int64(st, 14);
        snprintf(c->created_by, sizeof(c->created_by), "%s", by ?: "");
        snprintf(c->created, sizeof(c->created), "%s", created);
        snprintf(c->updated, sizeof(c->updated), "%s", updated);
        r = oom ? -ENOMEM : 0;
        if (r == 0 && (!json_is_array(c->manifests) || !json_is_array(ph) || json_array_size(ph) == 0 ||
                       json_array_size(ph) > CAMPAIGN_PHASES_MAX || c->cur < -1 ||
                       c->cur >= (int)json_array_size(ph) || !c->package || !c->version || !c->sha256))
                r = -EINVAL;
        if (r == 0) {
                size_t k;
                json_t *p;

                c->n_phases = json_array_size(ph);
                c->phases = calloc(c->n_phases, sizeof(*c->phases));
                if (!c->phases)
                        r = -ENOMEM;
                json_array_foreach(ph, k, p) {
                        const char *sa = json_string_value(json_object_get(p, "started_at"));
                        const char *fa = json_string_value(json_object_get(p, "finished_at"));

                        if (!c->phases)
                                break;
                        c->phases[k].percent = (unsigned)json_integer_value(json_object_get(p, "percent"));
                        if (sa)
                                snprintf(c->phases[k].started, 32, "%s", sa);
                        if (fa)
                                snprintf(c->phases[k].finished, 32, "%s", fa);
                        c->phases[k].failed = json_is_true(json_object_get(p, "failed"));
                        if (c->phases[k].percent > 100)
                                r = -EINVAL;
                }
        }
        json_decref(ph);
        if (r == 0)
                r = campaign_load_devices(cs, c);
        if (r == 0)
                /* The bounds follow from N and the percentages. */
                campaign_layout(c);
        if (r < 0) {
                if (r == -EINVAL)
                        log_warning("Skipped campaign %s: its records are not valid.", c->id);
                campaign_free(c);
                return r;
        }
        *ret = c;
        return 0;
}

static int campaigns_load(Campaigns *cs) {
        sqlite3_stmt *st = NULL;
        int rc, r = 0;
        size_t n = 0;

        rc = sqlite3_prepare_v2(store_db(cs->store),
                                "SELECT " CAMPAIGN_COLUMNS " FROM campaigns ORDER BY created_at, rowid", -1, &st,
                                NULL);
        while (rc == SQLITE_OK && (rc = sqlite3_step(st)) == SQLITE_ROW) {
                Campaign *c;

                rc = SQLITE_OK;
                r = campaign_from_row(cs, st, &c);
                if (r == -EINVAL)
                        continue;
                if (r < 0)
                        break;
                c->next = cs->list;
                cs->list = c;
                cs->n++;
                n++;
        }
        sqlite3_finalize(st);
        if (r == -ENOMEM)
                return log_error_errno(-ENOMEM, "Out of memory loading the campaigns.");
        if (rc != SQLITE_DONE)
                return store_error(cs->store, rc, "reading the campaigns");
        for (Campaign *c = cs->list; c; c = c->next)
                campaign_resume_loaded(c);
        if (n > 0)
                log_info("Loaded %zu campaign(s).", n);
        return 0;
}

/* ---- cluster mode ----------------------------------------------------------------------- */

static void campaign_undirty(Campaigns *cs, Campaign *c) {
        if (!c->dirty)
                return;
        for (Campaign **d = &cs->dirty; *d; d = &(*d)->dirty_next)
                if (*d == c) {
                        *d = c->dirty_next;
                        break;
                }
        c->dirty = false;
}

static void campaigns_drop_all(Campaigns *cs) {
        while (cs->list) {
                Campaign *c = cs->list;

                cs->list = c->next;
                campaign_undirty(cs, c);
                campaign_free(c);
        }
        cs->n = 0;
}

/* Read campaign id from the Store again (its rows changed): *ret_was the
 * state it had here before (-1: it was not here); -ENOENT when its row is
 * gone (it is gone here too). */
static int campaign_reload(Campaigns *cs, const char *id, int *ret_was) {
        sqlite3_stmt *st = NULL;
        Campaign **pp = &cs->list, *c = NULL;
        int rc, r;

        while (*pp && !streq((*pp)->id, id))
                pp = &(*pp)->next;
        *ret_was = *pp ? (int)(*pp)->state : -1;
        rc = sqlite3_prepare_v2(store_db(cs->store), "SELECT " CAMPAIGN_COLUMNS " FROM campaigns WHERE id = ?1", -1,
                                &st, NULL);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_text(st, 1, id, -1, SQLITE_TRANSIENT);
        if (rc == SQLITE_OK)
                rc = sqlite3_step(st);
        if (rc == SQLITE_ROW)
                r = campaign_from_row(cs, st, &c);
        else if (rc == SQLITE_DONE)
                r = -ENOENT;
        else
                r = store_error(cs->store, rc, "reading a campaign another node changed");
        sqlite3_finalize(st);
        if (r < 0 && r != -ENOENT)
                return r;
        if (*pp) {
                Campaign *old = *pp;

                *pp = old->next;
                cs->n--;
                campaign_undirty(cs, old);
                campaign_free(old);
        }
        if (!c)
                return r;
        /* The list is newest first. */
        for (pp = &cs->list; *pp && strcmp((*pp)->created, c->created) > 0; pp = &(*pp)->next)
                ;
        c->next = *pp;
        *pp = c;
        cs->n++;
        campaign_resume_loaded(c);
        return 0;
}

void campaigns_replicated(Campaigns *cs, const char *table, const char *id) {
        int was;

        if (!cs || !campaign_id_valid(id))
                return;
        if (!cs->leading) {
                /* A copy: read again at the next tick (a leader writes a
                 * campaign's devices many times a second). */
                if (!cs->stale)
                        cs->stale = json_object();
                if (!cs->stale || json_object_set_new(cs->stale, id, json_true()) < 0)
                        log_error("Out of memory: campaign %s changed on another node is not read again.", id);
                return;
        }
        /* The leader's copies are the campaigns' state; another node makes
         * campaigns (they start here once their row came, after their
         * devices) and forgets finished ones. */
        if (!streq(table, "campaigns"))
                return;
        if (campaign_find(cs, id)) {
                sqlite3_stmt *st = NULL;
                bool gone = false;

                if (sqlite3_prepare_v2(store_db(cs->store), "SELECT 1 FROM campaigns WHERE id = ?1", -1, &st, NULL) ==
                            SQLITE_OK &&
                    sqlite3_bind_text(st, 1, id, -1, SQLITE_TRANSIENT) == SQLITE_OK)
                        gone = sqlite3_step(st) == SQLITE_DONE;
                sqlite3_finalize(st);
                if (!gone)
                        return;
        }
        if (campaign_reload(cs, id, &was) == 0 && was < 0)
                log_info("Campaign %s made on another node: this node leads, it drives it.", id);
}

static int tick_cb(sd_event_source *s, uint64_t usec, void *userdata) {
        Campaigns *cs = userdata;
        bool leading = cs->hooks.leads(cs->hooks.userdata);
        const char *id;
        json_t *v, *stale;

        (void)sd_event_source_set_time(s, usec + CAMPAIGNS_LEADS_USEC);
        if (leading != cs->leading) {
                /* What the rows say now, driven from here on, or a copy. */
                log_info("Campaigns: this node %s.", leading ? "leads: driving the campaigns" : "no longer leads");
                cs->leading = leading;
                json_decref(TAKE_PTR(cs->stale));
                campaigns_drop_all(cs);
                if (campaigns_load(cs) < 0)
                        log_error("Campaigns: cannot read the campaigns again; they show when they change.");
                return 0;
        }
        stale = TAKE_PTR(cs->stale);
        json_object_foreach(stale, id, v) {
                int was, r = campaign_reload(cs, id, &was);
                Campaign *c = r == 0 ? campaign_find(cs, id) : NULL;

                /* Resumed: the queued jobs of devices online here go out. */
                if (c && was == C_PAUSED && c->state == C_RUNNING)
                        ota_send_queued(cs->ota);
        }
        json_decref(stale);
        return 0;
}

/* ---- the object ----------------------------------------------------------------------- */

Campaigns *campaigns_free(Campaigns *cs) {
        if (!cs)
                return NULL;
        campaigns_drop_all(cs);
        sd_event_source_disable_unref(cs->tick);
        json_decref(cs->stale);
        sd_event_source_disable_unref(cs->defer);
        sd_event_source_disable_unref(cs->start_defer);
        sqlite3_finalize(cs->stmt_save);
        sqlite3_finalize(cs->stmt_device);
        free(cs->job_b);
        free(cs->wait_b);
        free(cs);
        return NULL;
}

int campaigns_new(sd_event *event, const CloudConfig *config, Store *store, Ota *ota, Devices *devices,
                  Events *events, const CampaignsHooks *hooks, Campaigns **ret) {
        _cleanup_(campaigns_freep) Campaigns *cs = NULL;
        int r, rc;

        cs = calloc(1, sizeof(*cs));
        if (!cs)
                return log_error_errno(-ENOMEM, "Out of memory.");
        cs->event = event;
        cs->config = config;
        cs->store = store;
        cs->ota = ota;
        cs->devices = devices;
        cs->events = events;
        if (hooks)
                cs->hooks = *hooks;
        cs->leading = !cs->hooks.leads;
        if (getrandom(&cs->hash_key, sizeof(cs->hash_key), GRND_NONBLOCK) != sizeof(cs->hash_key))
                cs->hash_key = (uint64_t)(uintptr_t)cs;
        r = store_migrate(store, "campaigns", campaigns_schema, ELEMENTSOF(campaigns_schema));
        if (r < 0)
                return log_error_errno(r, "Cannot set up the campaigns in the cloud database.");
        rc = sqlite3_prepare_v3(
                store_db(store),
                "INSERT INTO campaigns (id, name, target, package, version, sha256, size, manifests, phases, "
                "max_failure_rate, phase_wait, state, paused_reason, phase, next_phase_at, created_by, created_at, "
                "updated_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18) "
                "ON CONFLICT (id) DO UPDATE SET phases = excluded.phases, state = excluded.state, "
                "paused_reason = excluded.paused_reason, phase = excluded.phase, "
                "next_phase_at = excluded.next_phase_at, updated_at = excluded.updated_at",
                -1, SQLITE_PREPARE_PERSISTENT, &cs->stmt_save, NULL);
        if (rc == SQLITE_OK)
                rc = sqlite3_prepare_v3(store_db(store),
                                        "INSERT INTO campaign_devices (campaign, idx, device, manifest, state, job) "
                                        "VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (campaign, idx) DO UPDATE SET "
                                        "state = excluded.state, job = excluded.job",
                                        -1, SQLITE_PREPARE_PERSISTENT, &cs->stmt_device, NULL);
        if (rc != SQLITE_OK)
                return store_error(store, rc, "preparing the campaigns' statements");
        r = sd_event_add_defer(event, &cs->defer, defer_cb, cs);
        if (r >= 0)
                r = sd_event_source_set_enabled(cs->defer, SD_EVENT_OFF);
        if (r >= 0)
                r = sd_event_add_defer(event, &cs->start_defer, start_cb, cs);
        /* Below the loop's other sources: a defer that stays on is always
         * the oldest pending source of its priority, so at the same one it
         * would run round after round alone (api.c's defer does the same). */
        if (r >= 0)
                r = sd_event_source_set_priority(cs->start_defer, SD_EVENT_PRIORITY_IDLE);
        if (r >= 0)
                r = sd_event_source_set_enabled(cs->start_defer, SD_EVENT_OFF);
        if (r >= 0 && cs->hooks.leads)
                r = sd_event_add_time(event, &cs->tick, CLOCK_MONOTONIC, now_usec() + CAMPAIGNS_LEADS_USEC,
                                      CAMPAIGNS_LEADS_USEC / 10, tick_cb, cs);
        if (r >= 0 && cs->tick)
                r = sd_event_source_set_enabled(cs->tick, SD_EVENT_ON);
        if (r < 0)
                return log_error_errno(r, "Failed to add the campaigns' event source: %m");
        r = campaigns_load(cs);
        if (r < 0)
                return r;
        *ret = TAKE_PTR(cs);
        return 0;
}
