/* SPDX-License-Identifier: Apache-2.0 */
/* Outbound integrations (integrations.h): one cursor over the journal per
 * integration, a window of the events handed to its sink, the cursor in
 * the Store.
 *
 * The window holds, in id order, the events handed to the sink since the
 * cursor: in flight, delivered (acked), failed (to resend). The cursor
 * (the floor) is the last id up to which everything was delivered or not
 * selected: the first entry that is not acked, less one, or, with no such
 * entry, the last id read. Events the filter does not select need no
 * entry: reading again from the floor skips them again.
 *
 * A failure stops the handing out; the in-flight ones finish; after the
 * backoff the cursor is read again from the floor, the acked entries
 * skipped, the failed ones sent again. */
#include <inttypes.h>
#include <limits.h>
#include <sqlite3.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bus.h"
#include "cloud-config.h"
#include "integrations.h"
#include "log.h"
#include "stats.h"
#include "store.h"
#include "util.h"

#define INTEGRATIONS_TURN 256                  /* events read per loop iteration, all integrations together */
#define INTEGRATION_WINDOW_MAX 1024            /* entries between the cursor and the newest handed out */
/* The unit test (tests/unit/test-cloud-integrations.c) builds this file
 * with shorter times. */
#ifndef INTEGRATION_RETRY_UNIT_USEC
#define INTEGRATION_RETRY_UNIT_USEC 1000000ULL /* the first backoff; then doubling */
#endif
#ifndef INTEGRATIONS_LEADS_USEC
#define INTEGRATIONS_LEADS_USEC 1000000ULL     /* how often leadership is checked */
#endif
#define INTEGRATIONS_TAGS_USEC 10000000ULL     /* how long a device's tags are cached */
#define INTEGRATIONS_TAGS_MAX 4096             /* devices cached; then the cache starts afresh */
#define INTEGRATION_KEY_MAX 48                 /* "%016x-%u" */
#define INTEGRATION_MQTT_COREID "mqtt:"

typedef enum EntryState {
        ENTRY_IN_FLIGHT,
        ENTRY_ACKED,
        ENTRY_FAILED, /* to send again after the backoff */
} EntryState;

typedef struct Entry {
        uint64_t id;
        char *coreid;
        EntryState state;
} Entry;

struct Integration {
        Integrations *owner;
        IntegrationConfig *config;
        const SinkOps *ops;
        char own_coreid[PROTO_DEVICE_ID_MAX + 8]; /* "mqtt:NAME": what its own sink brought in */

        bool running;  /* this node leads: the sink is made (or being made again) and reading goes on */
        bool stopping; /* inside ops->free(): what the sink says now is not heard */
        void *sink;    /* NULL: not made (standby, or making it failed) */

        JournalCursor cursor;
        bool cursor_open;
        uint64_t floor;    /* the cursor: everything up to it delivered or not selected */
        uint64_t saved;    /* the floor the Store has */
        uint64_t shared;   /* the floor last put in INTEGRATIONS_BUCKET (cluster mode) */
        uint64_t done;     /* the last id read and taken care of (handed out, skipped) */
        uint64_t seen;     /* the highest id ever read: gaps below it were counted */
        ProtoEvent pending; /* read but not handed out yet (head of line, window full, -EAGAIN) */
        uint64_t pending_id;
        bool has_pending;

        Entry *window;
        size_t n_window, cap_window;
        unsigned in_flight;

        bool retry_wait; /* a delivery failed: nothing is handed out until the retry */
        bool retry_due;  /* the backoff passed: retry once nothing is in flight */
        unsigned failures; /* failed rounds in a row */
        bool failing;
        sd_event_source *retry_timer;

        uint64_t delivered, failed, lost;
        char last_error[INTEGRATION_ERROR_MAX];
        char last_delivered_at[32];
        char failing_since[32];
};

struct Integrations {
        sd_event *event;
        const CloudConfig *config;
        Journal *journal;
        Store *store;
        IntegrationsHooks hooks;
        bool leading;
        Bus *bus;       /* cluster mode: cursors shared through INTEGRATIONS_BUCKET */
        BusSub *watch;

        Integration **items;
        size_t n_items;
        size_t next; /* where the next turn starts: every integration gets its share */

        sd_event_source *defer;       /* integrations_kick() */
        sd_event_source *leads_timer; /* with hooks.leads */
        sd_event_source *save_timer;  /* cursors to the Store, at most once per STORE_BATCH_MSEC */
        json_t *tags;                 /* device -> [expiry (usec), tags or null] */
};

/* ---- the cursors in the Store ------------------------------------------------- */

static const char *const integrations_schema[] = {
        "CREATE TABLE integration_cursors (name TEXT PRIMARY KEY, epoch INTEGER NOT NULL, "
        "cursor INTEGER NOT NULL)",
};

/* The stored cursor of name: 0, -ENOENT, -EIO. (Single node; in cluster
 * mode this is where a key-value bucket would be read.) */
static int cursor_load(Integrations *s, const char *name, uint64_t *ret_epoch, uint64_t *ret_cursor) {
        sqlite3_stmt *st = NULL;
        int rc, r = -ENOENT;

        rc = sqlite3_prepare_v2(store_db(s->store), "SELECT epoch, cursor FROM integration_cursors WHERE name = ?",
                                -1, &st, NULL);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_text(st, 1, name, -1, SQLITE_STATIC);
        if (rc == SQLITE_OK) {
                rc = sqlite3_step(st);
                if (rc == SQLITE_ROW) {
                        *ret_epoch = (uint64_t)sqlite3_column_int64(st, 0);
                        *ret_cursor = (uint64_t)sqlite3_column_int64(st, 1);
                        r = 0;
                        rc = SQLITE_OK;
                } else if (rc == SQLITE_DONE)
                        rc = SQLITE_OK;
        }
        sqlite3_finalize(st);
        return rc == SQLITE_OK ? r : store_error(s->store, rc, "reading an integration's cursor");
}

/* Store name's cursor in the batch (on disk within STORE_BATCH_MSEC);
 * cursor UINT64_MAX: forget it. */
static int cursor_save(Integrations *s, const char *name, uint64_t epoch, uint64_t cursor) {
        sqlite3_stmt *st = NULL;
        int rc, r;

        r = store_batch(s->store);
        if (r < 0)
                return r;
        if (cursor == UINT64_MAX)
                rc = sqlite3_prepare_v2(store_db(s->store), "DELETE FROM integration_cursors WHERE name = ?", -1, &st,
                                        NULL);
        else
                rc = sqlite3_prepare_v2(store_db(s->store),
                                        "INSERT INTO integration_cursors (name, epoch, cursor) VALUES (?, ?, ?) "
                                        "ON CONFLICT (name) DO UPDATE SET epoch = excluded.epoch, "
                                        "cursor = excluded.cursor",
                                        -1, &st, NULL);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_text(st, 1, name, -1, SQLITE_STATIC);
        if (rc == SQLITE_OK && cursor != UINT64_MAX)
                rc = sqlite3_bind_int64(st, 2, (sqlite3_int64)epoch);
        if (rc == SQLITE_OK && cursor != UINT64_MAX)
                rc = sqlite3_bind_int64(st, 3, (sqlite3_int64)cursor);
        if (rc == SQLITE_OK && (rc = sqlite3_step(st)) == SQLITE_DONE)
                rc = SQLITE_OK;
        sqlite3_finalize(st);
        return rc == SQLITE_OK ? 0 : store_error(s->store, rc, "storing an integration's cursor");
}

/* Where in's reading starts: its stored cursor, else the journal's end
 * (stored at once, so that a restart does not skip what came since). */
static void integration_load_cursor(Integration *in) {
        Integrations *s = in->owner;
        uint64_t epoch = 0, cursor = 0, last = journal_last_id(s->journal);
        int r = cursor_load(s, in->config->name, &epoch, &cursor);

        if (r < 0) {
                if (r != -ENOENT)
                        log_warning_errno(r, "Integration '%s': cannot read its cursor, starting at the journal's "
                                          "end: %m", in->config->name);
                cursor = last;
        } else if (epoch != journal_epoch(s->journal)) {
                log_notice("Integration '%s': the event journal is new (epoch %016" PRIx64 ", was %016" PRIx64
                           "), delivering every event it holds.",
                           in->config->name, journal_epoch(s->journal), epoch);
                cursor = 0;
        } else if (cursor > last) {
                log_warning("Integration '%s': its cursor %" PRIu64 " is past the journal's end %" PRIu64
                            " (the journal lost its last events), going on from there.",
                            in->config->name, cursor, last);
                cursor = last;
        } else {
                in->floor = in->done = in->seen = in->saved = cursor;
                return;
        }
        in->floor = in->done = in->seen = cursor;
        in->saved = UINT64_MAX;
        if (cursor_save(s, in->config->name, journal_epoch(s->journal), cursor) >= 0)
                in->saved = cursor;
}

/* Becoming the leader: where the last one left it, if that is ahead (a
 * cursor shared between nodes; on a single node, the Store has what this
 * one saved). */
static void integration_follow_cursor(Integration *in) {
        Integrations *s = in->owner;
        uint64_t epoch, cursor;

        if (cursor_load(s, in->config->name, &epoch, &cursor) < 0 || epoch != journal_epoch(s->journal) ||
            cursor <= in->floor || cursor > journal_last_id(s->journal))
                return;
        in->floor = in->done = in->saved = cursor;
        if (cursor > in->seen)
                in->seen = cursor;
}

/* Cluster mode: the leader's floor for the others (a JSON object
 * {"epoch","cursor"} under the integration's name). Not waited for: a
 * put that is lost is made good by the next one; a node that takes over
 * from an older value resends a little (at least once). */
static void cursor_share(Integrations *s, Integration *in) {
        char text[96];

        if (!s->bus || !in->running || in->floor == in->shared)
                return;
        snprintf(text, sizeof(text), "{\"epoch\":%" PRIu64 ",\"cursor\":%" PRIu64 "}", journal_epoch(s->journal),
                 in->floor);
        if (bus_kv_put(s->bus, INTEGRATIONS_BUCKET, in->config->name, text, strlen(text)) >= 0)
                in->shared = in->floor;
}

static int integrations_save_cb(sd_event_source *source, uint64_t usec, void *userdata) {
        Integrations *s = userdata;

        for (size_t i = 0; i < s->n_items; i++) {
                Integration *in = s->items[i];

                cursor_share(s, in);
                if (in->floor != in->saved &&
                    cursor_save(s, in->config->name, journal_epoch(s->journal), in->floor) >= 0)
                        in->saved = in->floor;
        }
        return 0;
}

/* The journal keeps, beyond JournalMaxBytes, what the slowest integration
 * has not delivered yet (journal_retain()). */
static void integrations_retain(Integrations *s) {
        uint64_t floor = JOURNAL_RETAIN_NONE;

        for (size_t i = 0; i < s->n_items; i++)
                if (s->items[i]->floor < floor)
                        floor = s->items[i]->floor;
        journal_retain(s->journal, floor);
}

/* The floor moved: stored with the next batch. */
static void integration_floor_moved(Integration *in) {
        Integrations *s = in->owner;
        int enabled = SD_EVENT_OFF;

        integrations_retain(s);
        if (in->floor == in->saved)
                return;
        (void)sd_event_source_get_enabled(s->save_timer, &enabled);
        if (enabled != SD_EVENT_OFF)
                return;
        (void)sd_event_source_set_time(s->save_timer, now_usec() + STORE_BATCH_MSEC * 1000ULL);
        (void)sd_event_source_set_enabled(s->save_timer, SD_EVENT_ONESHOT);
}

/* ---- the window -------------------------------------------------------------------- */

/* The index of the first entry with an id >= id. */
static size_t window_find(const Integration *in, uint64_t id) {
        size_t lo = 0, hi = in->n_window;

        while (lo < hi) {
                size_t mid = lo + (hi - lo) / 2;

                if (in->window[mid].id < id)
                        lo = mid + 1;
                else
                        hi = mid;
        }
        return lo;
}

static Entry *window_get(Integration *in, uint64_t id) {
        size_t i = window_find(in, id);

        return i < in->n_window && in->window[i].id == id ? &in->window[i] : NULL;
}

static void window_remove(Integration *in, size_t i) {
        free(in->window[i].coreid);
        memmove(in->window + i, in->window + i + 1, (in->n_window - i - 1) * sizeof(Entry));
        in->n_window--;
}

static int window_insert(Integration *in, uint64_t id, const char *coreid) {
        size_t i = window_find(in, id);
        char *c;

        if (in->n_window == in->cap_window) {
                size_t cap = in->cap_window ? in->cap_window * 2 : 16;
                Entry *w = reallocarray(in->window, cap, sizeof(Entry));

                if (!w)
                        return -ENOMEM;
                in->window = w;
                in->cap_window = cap;
        }
        c = strdup(coreid ?: "");
        if (!c)
                return -ENOMEM;
        memmove(in->window + i + 1, in->window + i, (in->n_window - i) * sizeof(Entry));
        in->window[i] = (Entry){ .id = id, .coreid = c, .state = ENTRY_IN_FLIGHT };
        in->n_window++;
        return 0;
}

static void window_clear(Integration *in) {
        for (size_t i = 0; i < in->n_window; i++)
                free(in->window[i].coreid);
        in->n_window = 0;
        in->in_flight = 0;
}

/* Whether an event of coreid before id is in flight or failed. */
static bool window_blocks(const Integration *in, const char *coreid, uint64_t id) {
        for (size_t i = 0; i < in->n_window && in->window[i].id < id; i++)
                if (in->window[i].state != ENTRY_ACKED && streq(in->window[i].coreid, coreid ?: ""))
                        return true;
        return false;
}

/* Drop the acked entries at the front and move the floor. */
static void integration_update_floor(Integration *in) {
        size_t k = 0;
        uint64_t floor;

        while (k < in->n_window && in->window[k].state == ENTRY_ACKED)
                free(in->window[k++].coreid);
        if (k > 0) {
                memmove(in->window, in->window + k, (in->n_window - k) * sizeof(Entry));
                in->n_window -= k;
        }
        floor = in->n_window > 0 ? in->window[0].id - 1 : in->done;
        if (floor > in->floor) {
                in->floor = floor;
                integration_floor_moved(in);
        }
}

/* ---- events the integrations publish -------------------------------------------- */

/* tether/integration/WHAT about in, data a JSON object (taken) to which
 * "integration" is added. */
static void integration_announce(Integration *in, const char *what, json_t *data) {
        Integrations *s = in->owner;
        _cleanup_free_ char *text = NULL;
        char name[64], at[32];
        ProtoEvent e;
        int r;

        if (data && json_object_set_new(data, "integration", json_string(in->config->name)) == 0)
                text = json_dumps(data, JSON_COMPACT);
        json_decref(data);
        if (!text) {
                log_warning("Integration '%s': out of memory publishing tether/integration/%s.", in->config->name,
                            what);
                return;
        }
        if (!s->hooks.publish)
                return;
        snprintf(name, sizeof(name), "tether/integration/%s", what);
        proto_timestamp_now(at);
        /* From the cloud, not a device: private, as the cloud's events about
         * devices are. */
        e = (ProtoEvent){ .name = name, .data = text, .ttl = PROTO_DEFAULT_TTL, .private_ = true,
                          .published_at = at, .coreid = (char *)"api" };
        r = s->hooks.publish(s->hooks.userdata, &e);
        if (r < 0)
                log_warning_errno(r, "Integration '%s': cannot publish %s: %m", in->config->name, name);
}

static void integration_key(Integrations *s, uint64_t id, char key[static INTEGRATION_KEY_MAX]) {
        snprintf(key, INTEGRATION_KEY_MAX, "%016" PRIx64 "-%" PRIu64, journal_epoch(s->journal), id);
}

/* ---- failures and the backoff ------------------------------------------------------ */

static void integrations_defer(Integrations *s) {
        (void)sd_event_source_set_enabled(s->defer, SD_EVENT_ONESHOT);
}

static int integration_retry_cb(sd_event_source *source, uint64_t usec, void *userdata) {
        Integration *in = userdata;

        in->retry_due = true;
        integrations_defer(in->owner);
        return 0;
}

/* A delivery failed (or the sink could not be made): stop handing out,
 * retry after the backoff. One round per failure of what is in flight. */
static void integration_failed(Integration *in, const char *why) {
        unsigned delay;

        if (why && why[0])
                snprintf(in->last_error, sizeof(in->last_error), "%s", why);
        if (in->retry_wait)
                return; /* the round is on */
        in->retry_wait = true;
        in->retry_due = false;
        if (in->failures < UINT_MAX)
                in->failures++;
        delay = in->failures > 9 ? INTEGRATION_RETRY_MAX_SEC : 1u << (in->failures - 1);
        if (delay > INTEGRATION_RETRY_MAX_SEC)
                delay = INTEGRATION_RETRY_MAX_SEC;
        (void)sd_event_source_set_time(in->retry_timer, now_usec() + delay * INTEGRATION_RETRY_UNIT_USEC);
        (void)sd_event_source_set_enabled(in->retry_timer, SD_EVENT_ONESHOT);
        if (in->failures >= INTEGRATION_FAILING_AFTER && !in->failing) {
                in->failing = true;
                stats_integrations_failing(1);
                proto_timestamp_now(in->failing_since);
                log_error("Integration '%s' is failing: %u attempts in a row failed, the last with: %s. Retrying "
                          "every %u s at most; nothing is dropped.",
                          in->config->name, in->failures, in->last_error, INTEGRATION_RETRY_MAX_SEC);
                integration_announce(in, "failing", json_pack("{s:s}", "error", in->last_error));
        } else if (!in->failing)
                log_warning("Integration '%s': delivery failed (%s), retrying in %u s.", in->config->name,
                            in->last_error, delay);
}

static void integration_succeeded(Integration *in) {
        in->delivered++;
        stats_integration(STATS_INTEGRATION_DELIVERED, 1);
        proto_timestamp_now(in->last_delivered_at);
        if (in->retry_wait)
                return; /* others of this round failed */
        in->failures = 0;
        if (in->failing) {
                in->failing = false;
                stats_integrations_failing(-1);
                in->failing_since[0] = 0;
                log_notice("Integration '%s' recovered: deliveries succeed again.", in->config->name);
                integration_announce(in, "recovered", json_object());
        }
}

/* ---- running: sink, reading, handing out ------------------------------------------- */

static void integration_drop_pending(Integration *in) {
        if (in->has_pending)
                proto_event_done(&in->pending);
        in->has_pending = false;
}

/* Read again from the floor (at start and at a retry): the acked entries
 * stay (they are skipped), the failed ones are sent again. */
static void integration_rewind(Integration *in) {
        integration_drop_pending(in);
        if (in->cursor_open)
                journal_cursor_done(&in->cursor);
        integration_update_floor(in);
        journal_cursor_init(&in->cursor, in->owner->journal, in->floor);
        in->cursor_open = true;
        in->done = in->floor;
}

static int integration_make_sink(Integration *in) {
        Integrations *s = in->owner;
        int r;

        r = in->ops->new(s->event, in->config, s->config ? s->config->cluster_node : NULL, in, &in->sink);
        if (r < 0) {
                char why[INTEGRATION_ERROR_MAX];

                in->sink = NULL;
                snprintf(why, sizeof(why), "cannot start: %s", strerror(-r));
                integration_failed(in, why);
        }
        return r;
}

static void integration_start(Integration *in) {
        if (in->running)
                return;
        in->running = true;
        in->retry_wait = in->retry_due = false;
        integration_follow_cursor(in);
        integration_rewind(in);
        (void)integration_make_sink(in);
        integrations_defer(in->owner);
}

/* Not leading any more, removed, or freed: the sink goes, and with it what
 * was in flight (the floor is where the next leader starts). */
static void integration_stop(Integration *in) {
        if (!in->running)
                return;
        in->running = false;
        if (in->sink) {
                in->stopping = true;
                in->ops->free(in->sink);
                in->stopping = false;
                in->sink = NULL;
        }
        integration_drop_pending(in);
        window_clear(in);
        if (in->cursor_open)
                journal_cursor_done(&in->cursor);
        in->cursor_open = false;
        in->done = in->floor;
        if (in->floor != in->saved &&
            cursor_save(in->owner, in->config->name, journal_epoch(in->owner->journal), in->floor) >= 0)
                in->saved = in->floor;
        in->retry_wait = in->retry_due = false;
        in->failures = 0;
        if (in->failing)
                stats_integrations_failing(-1);
        in->failing = false;
        in->failing_since[0] = 0;
        (void)sd_event_source_set_enabled(in->retry_timer, SD_EVENT_OFF);
}

/* The device's tags (borrowed from the cache; NULL: none). */
static json_t *integrations_tags(Integrations *s, const char *device) {
        unsigned long long now = now_usec();
        json_t *c = json_object_get(s->tags, device), *tags;

        if (c && (unsigned long long)json_integer_value(json_array_get(c, 0)) > now)
                return json_is_object(json_array_get(c, 1)) ? json_array_get(c, 1) : NULL;
        tags = s->hooks.tags ? s->hooks.tags(s->hooks.userdata, device) : NULL;
        if (json_object_size(s->tags) >= INTEGRATIONS_TAGS_MAX)
                json_object_clear(s->tags);
        c = json_pack("[I,o]", (json_int_t)(now + INTEGRATIONS_TAGS_USEC), tags ?: json_null());
        if (!c || json_object_set_new(s->tags, device, c) < 0)
                return NULL; /* OOM: as no tags */
        return json_is_object(json_array_get(c, 1)) ? json_array_get(c, 1) : NULL;
}

void integrations_tags_changed(Integrations *s, const char *device) {
        if (s)
                (void)json_object_del(s->tags, device);
}

static bool integration_selects(Integration *in, const ProtoEvent *e) {
        const char *tag = in->config->tag, *eq;
        json_t *tags, *v;

        if (e->coreid && streq(e->coreid, in->own_coreid))
                return false;
        if (!proto_prefix_match(in->config->prefix ?: "", e->name))
                return false;
        if (!tag)
                return true;
        /* The cloud's events ("api") and inbound ones ("mqtt:...") come
         * from no device with tags. */
        if (!e->coreid || proto_name_check(e->coreid, strlen(e->coreid), PROTO_NAME_DEVICE) < 0)
                return false;
        tags = integrations_tags(in->owner, e->coreid);
        eq = strchr(tag, '=');
        if (!eq)
                return json_object_get(tags, tag) != NULL;
        v = json_object_getn(tags, tag, (size_t)(eq - tag));
        return json_is_string(v) && streq(json_string_value(v), eq + 1);
}

static char *integration_body(Integration *in, const ProtoEvent *e, const char *key, size_t *ret_len) {
        json_t *j = json_pack("{s:s, s:s?, s:s?, s:s?, s:s?, s:I, s:b, s:s, s:s}", "event", e->name, "data", e->data,
                              "published_at", e->published_at, "received_at", e->received_at ?: e->published_at,
                              "coreid", e->coreid, "ttl", (json_int_t)e->ttl, "public", !e->private_, "id", key,
                              "integration", in->config->name);
        char *body = j ? json_dumps(j, JSON_COMPACT) : NULL;

        json_decref(j);
        if (body)
                *ret_len = strlen(body);
        return body;
}

/* A gap before id (the next id read; at_end: reading reached the end):
 * events the journal dropped before they were read. Ids up to in->seen
 * were counted the first time, but for failed entries that went missing
 * before their resend. */
static void integration_check_gap(Integration *in, uint64_t id, bool at_end) {
        uint64_t from = (in->done > in->seen ? in->done : in->seen) + 1, lost = !at_end && id > from ? id - from : 0;
        char key[INTEGRATION_KEY_MAX];

        /* Failed entries before id that reading did not meet: gone. */
        while (in->n_window > 0) {
                size_t i = 0;

                while (i < in->n_window && in->window[i].state != ENTRY_FAILED)
                        i++;
                if (i == in->n_window || (!at_end && in->window[i].id >= id))
                        break;
                window_remove(in, i);
                lost++;
        }
        if (!at_end && id > in->seen)
                in->seen = id;
        if (lost == 0)
                return;
        in->lost += lost;
        stats_integration(STATS_INTEGRATION_LOST, lost);
        integration_key(in->owner, at_end ? in->done : id, key);
        log_warning("Integration '%s': %" PRIu64 " event(s) before %s are no longer in the journal (past [Events] "
                    "BacklogMaxMB=): lost for this integration.",
                    in->config->name, lost, key);
        integration_announce(in, "lost", json_pack("{s:I, s:s}", "lost", (json_int_t)lost, "before", key));
}

/* Hand out what can go now, reading at most *budget events. */
static void integration_pump(Integration *in, unsigned *budget) {
        if (!in->running)
                return;
        if (in->retry_wait) {
                if (!in->retry_due || in->in_flight > 0)
                        return;
                /* The retry: from the floor, with a sink. */
                in->retry_wait = in->retry_due = false;
                for (size_t i = 0; i < in->n_window; i++)
                        if (in->window[i].state != ENTRY_ACKED)
                                in->window[i].state = ENTRY_FAILED;
                integration_rewind(in);
                if (!in->sink && integration_make_sink(in) < 0)
                        return;
        }
        if (!in->sink)
                return;
        while (*budget > 0 && !in->retry_wait) {
                char key[INTEGRATION_KEY_MAX];
                _cleanup_free_ char *body = NULL;
                size_t len = 0;
                Entry *entry;
                uint64_t id;
                int r;

                if (!in->has_pending) {
                        r = journal_cursor_next(&in->cursor, &in->pending, &in->pending_id);
                        if (r < 0) {
                                log_warning_errno(r, "Integration '%s': cannot read the event journal: %m",
                                                  in->config->name);
                                integration_failed(in, "cannot read the event journal");
                                break;
                        }
                        if (r == 0) {
                                /* At the end: failed entries not met are gone. */
                                integration_check_gap(in, 0, true);
                                break;
                        }
                        in->has_pending = true;
                        (*budget)--;
                        integration_check_gap(in, in->pending_id, false);
                }
                id = in->pending_id;
                entry = window_get(in, id);
                if (entry && entry->state == ENTRY_ACKED) {
                        /* Delivered before the retry. */
                        integration_drop_pending(in);
                        in->done = id;
                        continue;
                }
                if (!entry && !integration_selects(in, &in->pending)) {
                        integration_drop_pending(in);
                        in->done = id;
                        continue;
                }
                if (window_blocks(in, in->pending.coreid, id) || (!entry && in->n_window >= INTEGRATION_WINDOW_MAX))
                        break; /* head of line: after the next answer */
                integration_key(in->owner, id, key);
                body = integration_body(in, &in->pending, key, &len);
                if (!body || (!entry && window_insert(in, id, in->pending.coreid) < 0)) {
                        integration_failed(in, "out of memory");
                        break;
                }
                entry = window_get(in, id);
                r = in->ops->send(in->sink, id, key, &in->pending, body, len);
                if (r == -EAGAIN) {
                        /* The sink's window is full: after its next answer.
                         * An entry made just now goes until then. */
                        if (entry->state == ENTRY_IN_FLIGHT)
                                window_remove(in, (size_t)(entry - in->window));
                        break;
                }
                if (r < 0) {
                        char why[INTEGRATION_ERROR_MAX];

                        snprintf(why, sizeof(why), "%s", strerror(-r));
                        entry->state = ENTRY_FAILED;
                        in->failed++;
                        stats_integration(STATS_INTEGRATION_FAILED, 1);
                        integration_failed(in, why);
                        break;
                }
                entry->state = ENTRY_IN_FLIGHT;
                in->in_flight++;
                integration_drop_pending(in);
                in->done = id;
        }
        integration_update_floor(in);
}

/* The metric: how far the integration furthest behind is. */
static void integrations_backlog_stat(Integrations *s) {
        uint64_t last = journal_last_id(s->journal), most = 0;

        for (size_t i = 0; i < s->n_items; i++)
                if (last > s->items[i]->floor && last - s->items[i]->floor > most)
                        most = last - s->items[i]->floor;
        stats_integrations_backlog(most);
}

static int integrations_defer_cb(sd_event_source *source, void *userdata) {
        Integrations *s = userdata;
        unsigned budget = INTEGRATIONS_TURN;

        for (size_t k = 0; k < s->n_items && budget > 0; k++) {
                Integration *in = s->items[(s->next + k) % s->n_items];

                integration_pump(in, &budget);
        }
        if (s->n_items > 0)
                s->next = (s->next + 1) % s->n_items;
        if (budget == 0)
                integrations_defer(s); /* more next time round the loop */
        integrations_backlog_stat(s);
        return 0;
}

void integrations_kick(Integrations *s) {
        if (s)
                integrations_defer(s);
}

void integration_sent(Integration *in, uint64_t id, int error, const char *why) {
        Entry *e;

        if (in->stopping || !in->running)
                return;
        e = window_get(in, id);
        if (!e || e->state != ENTRY_IN_FLIGHT) {
                log_debug("Integration '%s': an answer for event %" PRIu64 " not in flight, ignored.",
                          in->config->name, id);
                return;
        }
        in->in_flight--;
        if (error == 0) {
                e->state = ENTRY_ACKED;
                integration_succeeded(in);
        } else {
                e->state = ENTRY_FAILED;
                in->failed++;
                stats_integration(STATS_INTEGRATION_FAILED, 1);
                integration_failed(in, why && why[0] ? why : strerror(error < 0 ? -error : error));
        }
        integration_update_floor(in);
        integrations_defer(in->owner);
}

void integration_ready(Integration *in) {
        if (!in->retry_wait || in->retry_due)
                return;
        (void)sd_event_source_set_enabled(in->retry_timer, SD_EVENT_OFF);
        in->retry_due = true;
        integrations_defer(in->owner);
}

int integration_publish(Integration *in, const char *name, const char *data, size_t len) {
        Integrations *s = in->owner;
        _cleanup_free_ char *full = NULL, *text = NULL;
        char at[32];
        ProtoEvent e;

        if (!name || asprintf(&full, "%s%s", in->config->inbound_prefix ?: "", name) < 0) {
                full = NULL;
                return name ? -ENOMEM : -EINVAL;
        }
        if (proto_name_check(full, strlen(full), PROTO_NAME_EVENT) < 0 || proto_event_name_reserved(full, false))
                return -EINVAL;
        if (s->config && len > s->config->max_payload)
                return -E2BIG;
        if ((len > 0 && !data) || proto_utf8_check(data ?: "", len) < 0)
                return -EINVAL;
        text = strndup(data ?: "", len);
        if (!text)
                return -ENOMEM;
        proto_timestamp_now(at);
        e = (ProtoEvent){ .name = full, .data = text, .ttl = PROTO_DEFAULT_TTL, .published_at = at,
                          .coreid = in->own_coreid };
        return s->hooks.publish ? s->hooks.publish(s->hooks.userdata, &e) : -EOPNOTSUPP;
}

const char *integration_name(const Integration *in) {
        return in->config->name;
}

/* ---- the set ----------------------------------------------------------------------- */

static Integration *integration_free(Integration *in) {
        if (!in)
                return NULL;
        integration_stop(in);
        free(in->window);
        sd_event_source_disable_unref(in->retry_timer);
        integration_config_free(in->config);
        free(in);
        return NULL;
}

/* Make the Integration of config (taken, also on failure). */
static int integration_new(Integrations *s, IntegrationConfig *config, Integration **ret) {
        _cleanup_(integration_config_freep) IntegrationConfig *c = config;
        Integration *in;
        int r;

        in = calloc(1, sizeof(*in));
        if (!in)
                return -ENOMEM;
        in->owner = s;
        in->ops = c->kind == INTEGRATION_WEBHOOK ? &sink_webhook_ops : &sink_mqtt_ops;
        snprintf(in->own_coreid, sizeof(in->own_coreid), INTEGRATION_MQTT_COREID "%s", c->name);
        r = sd_event_add_time(s->event, &in->retry_timer, CLOCK_MONOTONIC, UINT64_MAX,
                              INTEGRATION_RETRY_UNIT_USEC / 10, integration_retry_cb, in);
        if (r < 0) {
                free(in);
                return r;
        }
        (void)sd_event_source_set_enabled(in->retry_timer, SD_EVENT_OFF);
        in->config = TAKE_PTR(c);
        integration_load_cursor(in);
        *ret = in;
        return 0;
}

static Integration *integrations_find(Integrations *s, const char *name) {
        for (size_t i = 0; i < s->n_items; i++)
                if (streq(s->items[i]->config->name, name))
                        return s->items[i];
        return NULL;
}

static int integrations_append(Integrations *s, IntegrationConfig *config) {
        Integration **a, *in = NULL;
        int r;

        a = reallocarray(s->items, s->n_items + 1, sizeof(*a));
        if (!a) {
                integration_config_free(config);
                return -ENOMEM;
        }
        s->items = a;
        r = integration_new(s, config, &in);
        if (r < 0)
                return r;
        s->items[s->n_items++] = in;
        integrations_retain(s);
        if (s->leading)
                integration_start(in);
        return 0;
}

static bool integrations_leads(Integrations *s) {
        return !s->hooks.leads || s->hooks.leads(s->hooks.userdata);
}

static int integrations_leads_cb(sd_event_source *source, uint64_t usec, void *userdata) {
        Integrations *s = userdata;
        bool leading = integrations_leads(s);

        (void)sd_event_source_set_time(source, usec + INTEGRATIONS_LEADS_USEC);
        if (leading == s->leading)
                return 0;
        s->leading = leading;
        log_info("Integrations: this node %s.", leading ? "leads: running the sinks" : "no longer leads: standby");
        for (size_t i = 0; i < s->n_items; i++) {
                if (leading)
                        integration_start(s->items[i]);
                else
                        integration_stop(s->items[i]);
        }
        return 0;
}

Integrations *integrations_free(Integrations *s) {
        if (!s)
                return NULL;
        s->watch = bus_sub_free(s->watch);
        for (size_t i = 0; i < s->n_items; i++)
                integration_stop(s->items[i]);
        if (s->store)
                (void)integrations_save_cb(NULL, 0, s);
        for (size_t i = 0; i < s->n_items; i++)
                integration_free(s->items[i]);
        if (s->n_items > 0)
                journal_retain(s->journal, JOURNAL_RETAIN_NONE);
        free(s->items);
        sd_event_source_disable_unref(s->defer);
        sd_event_source_disable_unref(s->leads_timer);
        sd_event_source_disable_unref(s->save_timer);
        json_decref(s->tags);
        sd_event_unref(s->event);
        free(s);
        return NULL;
}

int integrations_new(sd_event *event, const CloudConfig *config, Journal *journal, Store *store,
                     const IntegrationsHooks *hooks, Integrations **ret) {
        _cleanup_(integrations_freep) Integrations *s = NULL;
        int r;

        s = calloc(1, sizeof(*s));
        if (!s)
                return log_error_errno(-ENOMEM, "Out of memory.");
        s->event = sd_event_ref(event);
        s->config = config;
        s->journal = journal;
        s->store = store;
        s->hooks = *hooks;
        s->tags = json_object();
        if (!s->tags)
                return log_error_errno(-ENOMEM, "Out of memory.");
        r = store_migrate(store, "integrations", integrations_schema, ELEMENTSOF(integrations_schema));
        if (r < 0)
                return log_error_errno(r, "Cannot set up the integrations' table: %m");
        r = sd_event_add_defer(event, &s->defer, integrations_defer_cb, s);
        if (r >= 0)
                r = sd_event_source_set_enabled(s->defer, SD_EVENT_OFF);
        if (r >= 0)
                r = sd_event_add_time(event, &s->save_timer, CLOCK_MONOTONIC, UINT64_MAX, 10000, integrations_save_cb,
                                      s);
        if (r >= 0)
                r = sd_event_source_set_enabled(s->save_timer, SD_EVENT_OFF);
        if (r >= 0 && hooks->leads)
                r = sd_event_add_time(event, &s->leads_timer, CLOCK_MONOTONIC, now_usec() + INTEGRATIONS_LEADS_USEC,
                                      INTEGRATIONS_LEADS_USEC / 10, integrations_leads_cb, s);
        if (r >= 0 && s->leads_timer)
                r = sd_event_source_set_enabled(s->leads_timer, SD_EVENT_ON);
        if (r < 0)
                return log_error_errno(r, "Cannot set up the integrations: %m");
        s->leading = integrations_leads(s);
        for (size_t i = 0; config && i < config->n_integrations; i++) {
                IntegrationConfig *c = config->integrations[i], *copy = NULL;

                r = integration_config_dup(c, &copy);
                if (r >= 0)
                        r = integrations_append(s, copy);
                if (r < 0)
                        return log_error_errno(r, "Cannot set up the integration '%s': %m", c->name);
        }
        if (s->n_items > 0)
                log_info("%zu integration(s)%s.", s->n_items, s->leading ? "" : ", standby (another node leads)");
        *ret = TAKE_PTR(s);
        return 0;
}

int integrations_add(Integrations *s, IntegrationConfig *config, char err[static INTEGRATION_ERROR_MAX]) {
        _cleanup_(integration_config_freep) IntegrationConfig *c = config;
        int r;

        err[0] = 0;
        r = integration_config_check(c, err);
        if (r < 0)
                return r;
        if (integrations_find(s, c->name)) {
                snprintf(err, INTEGRATION_ERROR_MAX, "An integration named '%s' exists already.", c->name);
                return -EEXIST;
        }
        if (s->n_items >= CLOUD_INTEGRATIONS_MAX) {
                snprintf(err, INTEGRATION_ERROR_MAX, "At most %u integrations (the file's and the API's together).",
                         (unsigned)CLOUD_INTEGRATIONS_MAX);
                return -ENOSPC;
        }
        r = integrations_append(s, TAKE_PTR(c));
        if (r < 0)
                snprintf(err, INTEGRATION_ERROR_MAX, "Cannot set up the integration: %s.", strerror(-r));
        return r;
}

int integrations_remove(Integrations *s, const char *name) {
        Integration *in = integrations_find(s, name);
        size_t i;
        int r;

        if (!in)
                return -ENOENT;
        if (!in->config->from_api)
                return -EPERM;
        integration_stop(in);
        if (s->bus)
                (void)bus_kv_delete(s->bus, INTEGRATIONS_BUCKET, name);
        r = cursor_save(s, name, 0, UINT64_MAX);
        if (r < 0) {
                if (s->leading)
                        integration_start(in);
                return r;
        }
        in->saved = in->floor; /* nothing to save any more */
        for (i = 0; s->items[i] != in; i++)
                ;
        memmove(s->items + i, s->items + i + 1, (s->n_items - i - 1) * sizeof(*s->items));
        s->n_items--;
        if (s->next >= s->n_items)
                s->next = 0;
        integration_free(in);
        integrations_retain(s);
        return 0;
}

/* ---- cluster mode: the leader's cursors -------------------------------------------- */

/* A cursor the leader shared. On a node in standby it becomes this node's
 * floor (stored, so that taking over starts there; the journal keeps only
 * what is behind it); the leader itself hears its own puts and older
 * values, and ignores them. Anyone on NATS can write the bucket: a value
 * is taken only for a known integration, in this journal's epoch, within
 * the journal's ids, and forward. */
static void integrations_kv_cb(void *userdata, const char *key, const void *value, size_t len, uint64_t revision,
                               int64_t time_ns) {
        Integrations *s = userdata;
        _cleanup_(json_decrefp) json_t *j = NULL;
        Integration *in;
        json_int_t epoch, cursor;

        if (!key || !value || len == 0)
                return;
        in = integrations_find(s, key);
        if (!in || in->running)
                return;
        j = json_loadb(value, len, 0, NULL);
        if (!j || json_unpack(j, "{s:I, s:I}", "epoch", &epoch, "cursor", &cursor) < 0 ||
            (uint64_t)epoch != journal_epoch(s->journal) || cursor < 0 || (uint64_t)cursor <= in->floor ||
            (uint64_t)cursor > journal_last_id(s->journal))
                return;
        in->floor = in->done = in->shared = (uint64_t)cursor;
        if (in->seen < in->floor)
                in->seen = in->floor;
        if (cursor_save(s, in->config->name, (uint64_t)epoch, in->floor) >= 0)
                in->saved = in->floor;
        integrations_retain(s);
}

int integrations_share(Integrations *s, Bus *bus, unsigned replicas) {
        int r;

        r = bus_kv_ensure(bus, INTEGRATIONS_BUCKET, replicas, 0);
        if (r < 0)
                return log_error_errno(r, "Cannot set up the bucket %s: %m", INTEGRATIONS_BUCKET);
        s->bus = bus;
        r = bus_kv_watch(bus, INTEGRATIONS_BUCKET, integrations_kv_cb, s, &s->watch);
        if (r < 0) {
                s->bus = NULL;
                return log_error_errno(r, "Cannot watch the bucket %s: %m", INTEGRATIONS_BUCKET);
        }
        return 0;
}

/* ---- what people see ------------------------------------------------------------------ */

static const char *integration_state(const Integration *in) {
        if (!in->running)
                return "standby";
        if (in->failing)
                return "failing";
        if (in->retry_wait || in->failures > 0 || !in->sink)
                return "retrying";
        return "ok";
}

static json_t *integration_json(Integrations *s, Integration *in) {
        uint64_t last = journal_last_id(s->journal);
        json_t *o;

        o = json_pack("{s:s, s:s, s:s, s:s?, s:s?, s:s, s:I, s:I, s:I, s:I, s:s?, s:s?, s:s?}", "name",
                      in->config->name, "kind", in->ops->kind, "source", in->config->from_api ? "api" : "config",
                      "prefix", in->config->prefix, "tag", in->config->tag, "state", integration_state(in), "backlog",
                      (json_int_t)(last > in->floor ? last - in->floor : 0), "delivered", (json_int_t)in->delivered,
                      "failures", (json_int_t)in->failed, "lost", (json_int_t)in->lost, "last_error",
                      in->last_error[0] ? in->last_error : NULL, "last_delivered_at",
                      in->last_delivered_at[0] ? in->last_delivered_at : NULL, "failing_since",
                      in->failing_since[0] ? in->failing_since : NULL);
        if (o && in->sink && in->ops->describe)
                in->ops->describe(in->sink, o);
        return o;
}

json_t *integrations_json(Integrations *s, const char *kind, const char *name) {
        json_t *a = json_array();

        for (size_t i = 0; a && i < s->n_items; i++) {
                Integration *in = s->items[i];

                if ((kind && !streq(kind, in->ops->kind)) || (name && !streq(name, in->config->name)))
                        continue;
                if (json_array_append_new(a, integration_json(s, in)) < 0) {
                        json_decref(a);
                        return NULL;
                }
        }
        return a;
}
