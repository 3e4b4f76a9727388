/* SPDX-License-Identifier: Apache-2.0 */
/* The event journal (journal.h): an append-only file of every routed event,
 * in lib/record.h frames. Record types (first payload byte):
 *
 *   'H' version u8, epoch u64, next_id u64          first record of a file
 *   'S' device bytes, epoch u64, last_seq u64        device state (rewrites)
 *   'E' id u64, coreid bytes, epoch u64, seq u64, ttl u32, private u8,
 *       published_at bytes, name bytes, has_data u8, data bytes,
 *       received_at bytes
 *
 * Version 1 files have no received_at in their events: it was then the
 * same as published_at, and such records read back that way. A version 1
 * file is rewritten as version 2 when it is opened (its records as they
 * are), so that an older cloud sets a version 2 file aside as unreadable
 * instead of skipping events it cannot parse.
 *
 * The append is the commit point of an event: once it is in the file the
 * event counts as delivered (a resend is dropped) and SSE clients that
 * reconnect with Last-Event-ID read it back from here. Writes reach the
 * kernel before the event is routed and acknowledged, so a crash of the
 * cloud cannot lose an acknowledged event; fdatasync() is batched
 * (SyncIntervalMsec=). When the file grows past JournalMaxBytes it is
 * rewritten with the device states and about half of that of the newest
 * events, each device's share bounded (journal_compact()). */
#include "config.h"

#include <fcntl.h>
#include <inttypes.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>

#include "journal.h"
#include "journal-seek.h"
#include "journal-sync.h"
#include "log.h"
#include "record.h"
#include "stats.h"
#include "util.h"

#define JOURNAL_FILE "events.journal"
#define JOURNAL_LOCK_FILE "events.journal.lock"
#define JOURNAL_CORRUPT_FILE "events.journal.corrupt"
#define JOURNAL_OLD_FILE "events.journal.old" /* what journal_reset() set aside */
#define JOURNAL_MAGIC 0x314a4354u /* "TCJ1" on disk */
#define JOURNAL_VERSION 2
#define JOURNAL_VERSION_NO_RECEIVED 1 /* events without received_at */
#define REC_HEADER 'H'
#define REC_STATE 'S'
#define REC_EVENT 'E'
#define JOURNAL_WINDOW (64u * 1024)
#define JOURNAL_FIELD_MAX (TETHER_EVENT_NAME_MAX + PROTO_HARD_PAYLOAD_MAX + 256)

typedef struct DeviceState {
        char *id;
        uint64_t epoch;
        uint64_t last_seq;
        struct DeviceState *next;
} DeviceState;

struct Journal {
        const CloudConfig *config;
        int dir_fd, lock_fd, fd;
        uint64_t epoch;
        uint64_t next_id;
        uint64_t end;
        uint64_t generation; /* bumped when the file is replaced */
        uint64_t retain_after; /* journal_retain(): events above this id are a backlog (UINT64_MAX: none) */
        uint64_t compact_at;   /* the size past which the file is compacted */
        JournalSeek seek;    /* where cursors start looking for an id */
        bool unsynced;       /* appended since the last sync was asked for */
        uint64_t unsynced_events, unsynced_bytes;
        sd_event_source *sync_timer;
        JournalSyncer *syncer; /* NULL: SyncIntervalMsec=0, every append syncs inline */

        DeviceState **buckets;
        size_t nbuckets, n_states;

        uint8_t *buf;
        size_t buf_cap;
};

/* ---- device states ------------------------------------------------------- */

static uint64_t hash_string(const char *s, size_t n) {
        uint64_t h = 0xcbf29ce484222325ULL;

        for (size_t i = 0; i < n; i++)
                h = (h ^ (uint8_t)s[i]) * 0x100000001b3ULL;
        return h;
}

static DeviceState *state_find(Journal *j, const char *id, size_t n) {
        if (j->nbuckets == 0)
                return NULL;
        for (DeviceState *s = j->buckets[hash_string(id, n) & (j->nbuckets - 1)]; s; s = s->next)
                if (strlen(s->id) == n && memcmp(s->id, id, n) == 0)
                        return s;
        return NULL;
}

static int state_grow(Journal *j) {
        size_t n = j->nbuckets ? j->nbuckets * 2 : 64;
        DeviceState **b = calloc(n, sizeof(*b));

        if (!b)
                return -ENOMEM;
        for (size_t k = 0; k < j->nbuckets; k++)
                for (DeviceState *s = j->buckets[k], *next; s; s = next) {
                        size_t i = hash_string(s->id, strlen(s->id)) & (n - 1);

                        next = s->next;
                        s->next = b[i];
                        b[i] = s;
                }
        free(j->buckets);
        j->buckets = b;
        j->nbuckets = n;
        return 0;
}

/* The device delivered (epoch, seq): remember the highest per epoch. A
 * new epoch (a wiped outbox) starts over. */
static int state_update(Journal *j, const char *id, size_t n, uint64_t epoch, uint64_t seq) {
        DeviceState *s = state_find(j, id, n);
        size_t i;

        if (s) {
                if (s->epoch != epoch) {
                        s->epoch = epoch;
                        s->last_seq = seq;
                } else if (seq > s->last_seq)
                        s->last_seq = seq;
                return 0;
        }
        if (j->n_states >= j->nbuckets && state_grow(j) < 0)
                return -ENOMEM;
        s = calloc(1, sizeof(*s));
        if (!s || !(s->id = strndup(id, n))) {
                free(s);
                return -ENOMEM;
        }
        s->epoch = epoch;
        s->last_seq = seq;
        i = hash_string(id, n) & (j->nbuckets - 1);
        s->next = j->buckets[i];
        j->buckets[i] = s;
        j->n_states++;
        return 0;
}

static void states_free(Journal *j) {
        for (size_t k = 0; k < j->nbuckets; k++)
                for (DeviceState *s = j->buckets[k], *next; s; s = next) {
                        next = s->next;
                        free(s->id);
                        free(s);
                }
        free(j->buckets);
        j->buckets = NULL;
        j->nbuckets = j->n_states = 0;
}

bool journal_seen(Journal *j, const char *device, uint64_t epoch, uint64_t seq) {
        DeviceState *s = state_find(j, device, strlen(device));

        return s && s->epoch == epoch && seq <= s->last_seq;
}

uint64_t journal_last_seq(Journal *j, const char *device, uint64_t epoch) {
        DeviceState *s = state_find(j, device, strlen(device));

        return s && s->epoch == epoch ? s->last_seq : 0;
}

uint64_t journal_epoch(Journal *j) { return j->epoch; }

uint64_t journal_last_id(Journal *j) { return j->next_id - 1; }

static uint64_t journal_backlog_max(const Journal *j) {
        return (uint64_t)(j->config->backlog_max_mb ?: 1024) << 20;
}

void journal_retain(Journal *j, uint64_t after_id) {
        j->retain_after = after_id;
}

/* ---- records --------------------------------------------------------------- */

typedef struct EventView {
        uint64_t id, epoch, seq;
        uint32_t ttl;
        uint8_t private_, has_data;
        const uint8_t *coreid, *published_at, *name, *data, *received_at;
        size_t coreid_len, published_at_len, name_len, data_len, received_at_len;
} EventView;

static int event_view(const uint8_t *payload, size_t len, EventView *v) {
        RecordReader r = { .p = payload, .left = len };
        uint8_t type;

        if (record_get_u8(&r, &type) < 0 || type != REC_EVENT || record_get_u64(&r, &v->id) < 0 ||
            record_get_bytes(&r, PROTO_DEVICE_ID_MAX, &v->coreid, &v->coreid_len) < 0 ||
            record_get_u64(&r, &v->epoch) < 0 || record_get_u64(&r, &v->seq) < 0 ||
            record_get_u32(&r, &v->ttl) < 0 || record_get_u8(&r, &v->private_) < 0 ||
            record_get_bytes(&r, 64, &v->published_at, &v->published_at_len) < 0 ||
            record_get_bytes(&r, TETHER_EVENT_NAME_MAX, &v->name, &v->name_len) < 0 ||
            record_get_u8(&r, &v->has_data) < 0 ||
            record_get_bytes(&r, PROTO_HARD_PAYLOAD_MAX, &v->data, &v->data_len) < 0)
                return -EBADMSG;
        /* Written by version 1: it arrived when it was published. */
        v->received_at = v->published_at;
        v->received_at_len = v->published_at_len;
        if (r.left > 0 && record_get_bytes(&r, 64, &v->received_at, &v->received_at_len) < 0)
                return -EBADMSG;
        if (r.left != 0)
                return -EBADMSG;
        if (v->coreid_len == 0 || memchr(v->coreid, 0, v->coreid_len) || v->name_len == 0 ||
            memchr(v->name, 0, v->name_len) || memchr(v->published_at, 0, v->published_at_len) ||
            memchr(v->data, 0, v->data_len) || memchr(v->received_at, 0, v->received_at_len))
                return -EBADMSG;
        return 0;
}

static int event_from_view(const EventView *v, ProtoEvent *ret) {
        ProtoEvent e = {
                .name = strndup((const char *)v->name, v->name_len),
                .data = v->has_data ? strndup((const char *)v->data, v->data_len) : NULL,
                .ttl = v->ttl,
                .private_ = v->private_,
                .published_at = strndup((const char *)v->published_at, v->published_at_len),
                .coreid = strndup((const char *)v->coreid, v->coreid_len),
                .received_at = strndup((const char *)v->received_at, v->received_at_len),
        };

        if (!e.name || (v->has_data && !e.data) || !e.published_at || !e.coreid || !e.received_at) {
                proto_event_done(&e);
                return -ENOMEM;
        }
        *ret = e;
        return 0;
}

static int buf_reserve(Journal *j, size_t n) {
        uint8_t *b;

        if (n <= j->buf_cap)
                return 0;
        b = realloc(j->buf, n);
        if (!b)
                return -ENOMEM;
        j->buf = b;
        j->buf_cap = n;
        return 0;
}

/* ---- rewriting ----------------------------------------------------------- */

typedef struct Copy {
        int fd;
        uint64_t off;
        uint8_t *pending;
        size_t len;
        int error;
        uint64_t last_id; /* events are copied only with growing ids */
        JournalSeek seek; /* of the new file */
        /* If keep is set: only the events at these offsets of the old
         * file (growing), the others are left out. */
        const uint64_t *keep;
        size_t n_keep, next_keep;
        size_t base; /* offset in the old file of the scanned buffer */
} Copy;

static int copy_flush(Copy *c) {
        int r;

        if (c->len == 0 || c->error < 0)
                return c->error;
        r = record_pwrite_all(c->fd, c->pending, c->len, c->off);
        if (r < 0)
                return c->error = r;
        c->off += c->len;
        c->len = 0;
        return 0;
}

static int copy_bytes(Copy *c, const void *p, size_t n) {
        if (c->len + n > JOURNAL_WINDOW && copy_flush(c) < 0)
                return c->error;
        if (n > JOURNAL_WINDOW) {
                int r = record_pwrite_all(c->fd, p, n, c->off);
                if (r < 0)
                        return c->error = r;
                c->off += n;
                return 0;
        }
        memcpy(c->pending + c->len, p, n);
        c->len += n;
        return 0;
}

static int copy_event(const uint8_t *payload, size_t len, size_t offset, void *userdata) {
        Copy *c = userdata;
        EventView v;

        /* The same events recovery accepted: valid, ids growing. */
        if (len == 0 || payload[0] != REC_EVENT || event_view(payload, len, &v) < 0 || v.id <= c->last_id ||
            v.id == UINT64_MAX)
                return 0;
        if (c->keep) {
                while (c->next_keep < c->n_keep && c->keep[c->next_keep] < c->base + offset)
                        c->next_keep++;
                if (c->next_keep >= c->n_keep || c->keep[c->next_keep] != c->base + offset)
                        return 0;
        }
        c->last_id = v.id;
        /* Its bytes go over as they are, and end at c->off + c->len. */
        if (copy_bytes(c, payload - RECORD_HEADER_SIZE, record_size(len)) < 0)
                return c->error;
        journal_seek_note(&c->seek, v.id, c->off + c->len - record_size(len));
        return 0;
}

/* Write a new file: header, device states, and the valid events of
 * old[from..old_len) (old may be NULL); with keep (n_keep growing
 * offsets in old), only the events there. */
static int journal_rewrite(Journal *j, const uint8_t *old, size_t old_len, size_t from, const uint64_t *keep,
                           size_t n_keep) {
        _cleanup_free_ uint8_t *pending = malloc(JOURNAL_WINDOW);
        Copy c = { .fd = -1, .pending = pending, .keep = keep, .n_keep = n_keep, .base = from };
        uint8_t rec[RECORD_HEADER_SIZE + 64 + PROTO_DEVICE_ID_MAX];
        RecordWriter w;
        int r;

        if (!pending)
                return -ENOMEM;
        r = record_file_begin(j->dir_fd, JOURNAL_FILE, &c.fd);
        if (r < 0)
                return r;
        w = (RecordWriter){ .buf = rec + RECORD_HEADER_SIZE, .cap = sizeof(rec) - RECORD_HEADER_SIZE };
        record_put_u8(&w, REC_HEADER);
        record_put_u8(&w, JOURNAL_VERSION);
        record_put_u64(&w, j->epoch);
        record_put_u64(&w, j->next_id);
        record_seal(JOURNAL_MAGIC, rec, w.len);
        r = copy_bytes(&c, rec, record_size(w.len));
        for (size_t k = 0; r >= 0 && k < j->nbuckets; k++)
                for (DeviceState *s = j->buckets[k]; r >= 0 && s; s = s->next) {
                        w = (RecordWriter){ .buf = rec + RECORD_HEADER_SIZE, .cap = sizeof(rec) - RECORD_HEADER_SIZE };
                        record_put_u8(&w, REC_STATE);
                        record_put_bytes(&w, s->id, strlen(s->id));
                        record_put_u64(&w, s->epoch);
                        record_put_u64(&w, s->last_seq);
                        record_seal(JOURNAL_MAGIC, rec, w.len);
                        r = copy_bytes(&c, rec, record_size(w.len));
                }
        if (r >= 0 && old && from < old_len) {
                int64_t k = record_scan(JOURNAL_MAGIC, old + from, old_len - from, copy_event, &c, NULL, NULL, NULL);
                if (k < 0)
                        r = (int)k;
        }
        if (r >= 0)
                r = copy_flush(&c);
        if (r >= 0)
                r = record_file_commit(j->dir_fd, JOURNAL_FILE, c.fd);
        if (r < 0) {
                record_file_abort(j->dir_fd, JOURNAL_FILE, c.fd);
                journal_seek_clear(&c.seek);
                return r;
        }
        journal_seek_clear(&j->seek);
        j->seek = c.seek;
        if (j->fd >= 0)
                close(j->fd);
        j->fd = c.fd;
        j->end = c.off;
        j->generation++;
        j->unsynced = false;
        /* The new file was synced before it replaced the old one. */
        stats_journal_synced(0, j->unsynced_events, j->unsynced_bytes);
        j->unsynced_events = j->unsynced_bytes = 0;
        return 0;
}

/* One event of the file being compacted: where, how big, whose
 * (a hash of its coreid, then the index of that among the holders). */
typedef struct CompactEvent {
        uint64_t offset, size, holder, id;
} CompactEvent;

typedef struct Compact {
        CompactEvent *v;
        size_t n, cap;
        int error;
} Compact;

static int compact_note(const uint8_t *payload, size_t len, size_t offset, void *userdata) {
        Compact *c = userdata;
        EventView v;

        if (c->error < 0 || len == 0 || payload[0] != REC_EVENT || event_view(payload, len, &v) < 0)
                return 0;
        if (c->n == c->cap) {
                size_t cap = c->cap ? c->cap * 2 : 1024;
                CompactEvent *b = realloc(c->v, cap * sizeof(*b));

                if (!b)
                        return c->error = -ENOMEM;
                c->v = b;
                c->cap = cap;
        }
        c->v[c->n++] = (CompactEvent){ .offset = offset, .size = record_size(len), .id = v.id,
                                       .holder = hash_string((const char *)v.coreid, v.coreid_len) };
        return 0;
}

static int cmp_u64(const void *a, const void *b) {
        uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

        return x < y ? -1 : x > y;
}

/* Keep about half of JournalMaxBytes of events, the newest, but no
 * device's (coreid's) more than DeviceJournalShare= percent of that
 * while others' fit: first every holder gets the newest of its events up
 * to its share, then what room is left goes to the newest of the rest.
 * Each holder keeps a run of its newest events (no holes in one device's
 * events); a device that floods loses its own older events first, not
 * the others'.
 *
 * On top of that, the backlog (journal_retain()): every event above the
 * retained id is kept, the newest first, up to BacklogMaxMB= of them. The
 * next compaction then comes when the file has grown by another half of
 * JournalMaxBytes, so a large backlog is not rewritten on every append. */
static int journal_compact(Journal *j) {
        uint64_t budget = j->config->journal_max_bytes / 2, share, total = 0, dropped = 0, backlog = 0,
                 backlog_max = journal_backlog_max(j);
        _cleanup_free_ uint64_t *holders = NULL, *kept_bytes = NULL, *keep = NULL;
        _cleanup_free_ bool *kept = NULL, *closed = NULL;
        Compact c = {};
        size_t len = (size_t)j->end, n_holders = 0, n_keep = 0;
        void *map;
        int r;

        share = budget * (j->config->device_journal_share ?: 100) / 100;
        map = mmap(NULL, len, PROT_READ, MAP_PRIVATE, j->fd, 0);
        if (map == MAP_FAILED)
                return -errno;
        (void)record_scan(JOURNAL_MAGIC, map, len, compact_note, &c, NULL, NULL, NULL);
        r = c.error;
        if (r >= 0 && c.n > 0) {
                holders = malloc(c.n * sizeof(*holders));
                kept = calloc(c.n, sizeof(*kept));
                keep = malloc(c.n * sizeof(*keep));
                if (!holders || !kept || !keep)
                        r = -ENOMEM;
        }
        if (r >= 0 && c.n > 0) {
                for (size_t i = 0; i < c.n; i++)
                        holders[i] = c.v[i].holder;
                qsort(holders, c.n, sizeof(*holders), cmp_u64);
                for (size_t i = 0; i < c.n; i++)
                        if (n_holders == 0 || holders[n_holders - 1] != holders[i])
                                holders[n_holders++] = holders[i];
                for (size_t i = 0; i < c.n; i++)
                        c.v[i].holder = (uint64_t *)bsearch(&c.v[i].holder, holders, n_holders, sizeof(*holders),
                                                            cmp_u64) - holders;
                kept_bytes = calloc(n_holders, sizeof(*kept_bytes));
                closed = calloc(n_holders, sizeof(*closed));
                if (!kept_bytes || !closed)
                        r = -ENOMEM;
        }
        if (r >= 0 && c.n > 0) {
                /* Each holder's newest, up to its share. */
                for (size_t i = c.n; i-- > 0;) {
                        CompactEvent *e = &c.v[i];

                        if (total + e->size > budget)
                                break; /* full: the newest events, as without shares */
                        if (closed[e->holder])
                                continue;
                        if (kept_bytes[e->holder] + e->size > share) {
                                closed[e->holder] = true;
                                continue;
                        }
                        kept_bytes[e->holder] += e->size;
                        total += e->size;
                        kept[i] = true;
                }
                /* The room left: the newest of the rest, whoever's. */
                for (size_t i = c.n; i-- > 0;) {
                        if (kept[i])
                                continue;
                        if (total + c.v[i].size > budget)
                                break;
                        total += c.v[i].size;
                        kept[i] = true;
                }
                /* The backlog, newest first, within its own limit. */
                for (size_t i = c.n; j->retain_after != UINT64_MAX && i-- > 0;) {
                        if (c.v[i].id <= j->retain_after || backlog + c.v[i].size > backlog_max)
                                break;
                        backlog += c.v[i].size;
                        kept[i] = true;
                }
                for (size_t i = 0; i < c.n; i++)
                        if (kept[i])
                                keep[n_keep++] = c.v[i].offset;
                        else if (n_keep > 0)
                                dropped++; /* newer than one kept: left out for its device's share */
        }
        if (r >= 0)
                r = journal_rewrite(j, map, len, 0, keep ?: (const uint64_t[]){ UINT64_MAX }, n_keep);
        munmap(map, len);
        free(c.v);
        if (r >= 0) {
                stats_journal_share_dropped(dropped);
                j->compact_at = j->end + j->config->journal_max_bytes / 2;
                if (j->compact_at < j->config->journal_max_bytes)
                        j->compact_at = j->config->journal_max_bytes;
        }
        return r;
}

/* ---- recovery ------------------------------------------------------------- */

typedef struct Recovery {
        Journal *journal;
        bool header;
        uint8_t version;
        size_t header_end; /* events before the header are not ours */
        uint64_t events, headless, last_id;
        int error;
} Recovery;

static int recover_record(const uint8_t *payload, size_t len, size_t offset, void *userdata) {
        Recovery *rc = userdata;
        Journal *j = rc->journal;
        RecordReader r = { .p = payload, .left = len };
        uint8_t type = 0, version;

        (void)record_get_u8(&r, &type);
        if (type == REC_HEADER) {
                if (!rc->header && record_get_u8(&r, &version) == 0 &&
                    version >= JOURNAL_VERSION_NO_RECEIVED && version <= JOURNAL_VERSION &&
                    record_get_u64(&r, &j->epoch) == 0 && record_get_u64(&r, &j->next_id) == 0) {
                        rc->header = true;
                        rc->version = version;
                        rc->header_end = offset + record_size(len);
                        if (j->next_id == 0 || j->next_id == UINT64_MAX)
                                j->next_id = 1;
                }
                return 0;
        }
        if (!rc->header) {
                rc->headless++;
                return 0;
        }
        if (type == REC_STATE) {
                const uint8_t *id;
                size_t n;
                uint64_t epoch, seq;

                if (record_get_bytes(&r, PROTO_DEVICE_ID_MAX, &id, &n) < 0 || n == 0 ||
                    record_get_u64(&r, &epoch) < 0 || record_get_u64(&r, &seq) < 0)
                        return 0;
                return rc->error = state_update(j, (const char *)id, n, epoch, seq);
        }
        if (type == REC_EVENT) {
                EventView v;

                /* Ids only grow; anything else is damage come back to life. */
                if (event_view(payload, len, &v) < 0 || v.id <= rc->last_id || v.id == UINT64_MAX)
                        return 0;
                rc->last_id = v.id;
                rc->events++;
                journal_seek_note(&j->seek, v.id, offset);
                if (v.id >= j->next_id)
                        j->next_id = v.id + 1;
                if (v.seq > 0)
                        return rc->error = state_update(j, (const char *)v.coreid, v.coreid_len, v.epoch, v.seq);
        }
        return 0;
}

static int create_fresh(Journal *j) {
        uint64_t e = 0;

        while (e == 0)
                if (getrandom(&e, sizeof(e), 0) != sizeof(e))
                        return errno > 0 ? -errno : -EIO;
        j->epoch = e;
        j->next_id = 1;
        states_free(j);
        return journal_rewrite(j, NULL, 0, 0, NULL, 0);
}

static int journal_recover(Journal *j) {
        const char *dir = j->config->state_dir;
        Recovery rc = { .journal = j };
        size_t skipped = 0, places = 0, first = 0;
        struct stat st;
        int64_t end;
        void *map;
        int r;

        if (fstat(j->fd, &st) < 0)
                return -errno;
        if (st.st_size == 0)
                return create_fresh(j);
        map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, j->fd, 0);
        if (map == MAP_FAILED)
                return -errno;
        end = record_scan(JOURNAL_MAGIC, map, (size_t)st.st_size, recover_record, &rc, &skipped, &places, &first);
        if (end < 0 || rc.error < 0) {
                munmap(map, (size_t)st.st_size);
                return rc.error < 0 ? rc.error : (int)end;
        }
        if (!rc.header) {
                munmap(map, (size_t)st.st_size);
                log_error("The event journal '%s/%s' is unreadable; kept it as '%s' and started a new one.", dir,
                          JOURNAL_FILE, JOURNAL_CORRUPT_FILE);
                if (renameat(j->dir_fd, JOURNAL_FILE, j->dir_fd, JOURNAL_CORRUPT_FILE) < 0)
                        return -errno;
                return create_fresh(j);
        }
        j->end = (uint64_t)end;
        if (skipped > 0 || rc.version < JOURNAL_VERSION) {
                if (skipped > 0)
                        log_warning("Event journal '%s/%s': skipped %zu damaged byte(s) in %zu place(s), the "
                                    "first at offset %zu (a write torn by a crash?).",
                                    dir, JOURNAL_FILE, skipped, places, first);
                else
                        log_info("Event journal '%s/%s': upgrading from version %u to %u.", dir, JOURNAL_FILE,
                                 rc.version, JOURNAL_VERSION);
                r = journal_rewrite(j, map, (size_t)st.st_size, rc.header_end, NULL, 0);
                if (r < 0) {
                        log_warning_errno(r, "Failed to rewrite the event journal: %m");
                        /* Appending after the last good record is still fine. */
                        if (ftruncate(j->fd, (off_t)j->end) < 0)
                                r = -errno;
                        else
                                r = 0;
                }
                munmap(map, (size_t)st.st_size);
                if (r < 0)
                        return r;
        } else
                munmap(map, (size_t)st.st_size);
        log_info("Event journal '%s/%s': %" PRIu64 " event(s), %zu device(s), next id %" PRIu64 ".", dir,
                 JOURNAL_FILE, rc.events, j->n_states, j->next_id);
        return 0;
}

/* ---- appending and syncing ------------------------------------------------- */

static int journal_sync_cb(sd_event_source *s, uint64_t usec, void *userdata) {
        Journal *j = userdata;

        if (j->unsynced && j->fd >= 0) {
                uint64_t started = now_usec();
                int r = -ENODEV;

                /* The disk is the sync thread's wait, not the loop's. */
                if (j->syncer)
                        r = journal_syncer_request(j->syncer, j->fd, j->unsynced_events, j->unsynced_bytes);
                if (r < 0) {
                        if (fdatasync(j->fd) < 0)
                                log_warning_errno(errno, "Failed to sync the event journal: %m");
                        stats_journal_synced(started, j->unsynced_events, j->unsynced_bytes);
                }
                j->unsynced = false;
                j->unsynced_events = j->unsynced_bytes = 0;
        }
        return 0;
}

int journal_append(Journal *j, const ProtoEvent *e, uint64_t epoch, uint64_t seq, uint64_t *ret_id) {
        uint64_t id = j->next_id;
        int r = journal_append_at(j, e, epoch, seq, id);

        if (r < 0)
                return r;
        *ret_id = id;
        return 0;
}

int journal_append_at(Journal *j, const ProtoEvent *e, uint64_t epoch, uint64_t seq, uint64_t id) {
        size_t name_len = strlen(e->name), data_len = e->data ? strlen(e->data) : 0,
               coreid_len = e->coreid ? strlen(e->coreid) : 0,
               at_len = e->published_at ? strlen(e->published_at) : 0;
        const char *received = e->received_at ?: e->published_at ?: "";
        size_t received_len = strlen(received);
        size_t cap = 64 + name_len + data_len + coreid_len + at_len + received_len;
        RecordWriter w;
        int r;

        if (j->fd < 0)
                return -EBADF;
        /* Ids only grow (recovery and cursors rely on it); UINT64_MAX is
         * no id (journal_last_id() + 1 must exist). */
        if (id < j->next_id || id == UINT64_MAX)
                return -EINVAL;
        r = buf_reserve(j, RECORD_HEADER_SIZE + cap);
        if (r < 0)
                return r;
        w = (RecordWriter){ .buf = j->buf + RECORD_HEADER_SIZE, .cap = cap };
        record_put_u8(&w, REC_EVENT);
        record_put_u64(&w, id);
        record_put_bytes(&w, e->coreid ?: "", coreid_len);
        record_put_u64(&w, epoch);
        record_put_u64(&w, seq);
        record_put_u32(&w, e->ttl);
        record_put_u8(&w, e->private_);
        record_put_bytes(&w, e->published_at ?: "", at_len);
        record_put_bytes(&w, e->name, name_len);
        record_put_u8(&w, e->data != NULL);
        record_put_bytes(&w, e->data ?: "", data_len);
        record_put_bytes(&w, received, received_len);
        if (w.overflow || w.len > RECORD_PAYLOAD_MAX)
                return -E2BIG;
        record_seal(JOURNAL_MAGIC, j->buf, w.len);
        r = record_pwrite_all(j->fd, j->buf, record_size(w.len), j->end);
        if (r < 0) {
                (void)ftruncate(j->fd, (off_t)j->end);
                return r;
        }
        if (seq > 0 && coreid_len > 0) {
                r = state_update(j, e->coreid, coreid_len, epoch, seq);
                if (r < 0) {
                        (void)ftruncate(j->fd, (off_t)j->end);
                        return r;
                }
        }
        journal_seek_note(&j->seek, id, j->end);
        j->end += record_size(w.len);
        j->next_id = id + 1;
        stats_journal_appended(record_size(w.len));
        if (j->config->journal_sync_ms == 0) {
                uint64_t started = now_usec();

                if (fdatasync(j->fd) < 0)
                        log_warning_errno(errno, "Failed to sync the event journal: %m");
                stats_journal_synced(started, 1, record_size(w.len));
        } else {
                j->unsynced_events++;
                j->unsynced_bytes += record_size(w.len);
                if (!j->unsynced) {
                        j->unsynced = true;
                        (void)sd_event_source_set_time_relative(j->sync_timer,
                                                                (uint64_t)j->config->journal_sync_ms * 1000);
                        (void)sd_event_source_set_enabled(j->sync_timer, SD_EVENT_ONESHOT);
                }
        }
        if (j->end > j->compact_at) {
                r = journal_compact(j);
                if (r < 0)
                        log_warning_errno(r, "Failed to rewrite the event journal (%" PRIu64 " bytes): %m",
                                          j->end);
        }
        return 0;
}

int journal_reset(Journal *j, uint64_t epoch) {
        int r;

        if (j->fd < 0)
                return -EBADF;
        /* The events it had stay readable for a person, not for the cloud. */
        if (j->next_id > 1 && renameat(j->dir_fd, JOURNAL_FILE, j->dir_fd, JOURNAL_OLD_FILE) < 0)
                return -errno;
        j->epoch = epoch;
        j->next_id = 1;
        states_free(j);
        r = journal_rewrite(j, NULL, 0, 0, NULL, 0);
        if (r < 0) {
                /* No events and no device states, whatever is on disk. */
                close(j->fd);
                j->fd = -1;
                return r;
        }
        return 0;
}

/* ---- reading ------------------------------------------------------------- */

void journal_cursor_init(JournalCursor *c, Journal *j, uint64_t after_id) {
        *c = (JournalCursor){ .journal = j, .last_id = after_id };
}

void journal_cursor_done(JournalCursor *c) {
        free(c->buf);
        *c = (JournalCursor){};
}

/* The record at off, through the cursor's window on the file. */
static int cursor_record(JournalCursor *c, uint64_t off, const uint8_t **ret_payload, size_t *ret_len,
                         size_t *ret_size) {
        /* At most: look, read a window, read the whole (large) record. */
        for (int attempt = 0; attempt < 3; attempt++) {
                if (off >= c->buf_off && off < c->buf_off + c->buf_len) {
                        size_t at = (size_t)(off - c->buf_off);
                        int r = record_parse(JOURNAL_MAGIC, c->buf + at, c->buf_len - at, ret_payload, ret_len,
                                             ret_size);

                        if (r == 0)
                                return 0;
                        if (r != -EAGAIN)
                                return r;
                }
                {
                        Journal *j = c->journal;
                        uint64_t left = j->end - off;
                        size_t want = JOURNAL_WINDOW, n;
                        ssize_t k;

                        /* A record larger than the window: read it whole. */
                        if (c->buf_len > 0 && off >= c->buf_off && off < c->buf_off + c->buf_len &&
                            c->buf_len - (size_t)(off - c->buf_off) >= RECORD_HEADER_SIZE) {
                                const uint8_t *h = c->buf + (off - c->buf_off);
                                size_t need = RECORD_HEADER_SIZE + ((size_t)h[4] | (size_t)h[5] << 8 |
                                                                    (size_t)h[6] << 16 | (size_t)h[7] << 24);
                                if (need > want)
                                        want = need;
                        }
                        n = left < want ? (size_t)left : want;
                        if (n > c->buf_cap) {
                                uint8_t *b = realloc(c->buf, n);
                                if (!b)
                                        return -ENOMEM;
                                c->buf = b;
                                c->buf_cap = n;
                        }
                        k = pread(j->fd, c->buf, n, (off_t)off);
                        if (k < 0)
                                return -errno;
                        c->buf_off = off;
                        c->buf_len = (size_t)k;
                }
        }
        return -EBADMSG;
}

int journal_cursor_next(JournalCursor *c, ProtoEvent *ret, uint64_t *ret_id) {
        Journal *j = c->journal;

        if (!j || j->fd < 0)
                return 0;
        if (c->generation != j->generation) {
                /* New cursor or the file was rewritten: find our place by id. */
                c->generation = j->generation;
                c->offset = journal_seek_find(&j->seek, c->last_id);
                c->buf_len = 0;
        }
        while (c->offset < j->end) {
                const uint8_t *payload;
                size_t len, size;
                EventView v;
                int r = cursor_record(c, c->offset, &payload, &len, &size);

                if (r < 0)
                        return r;
                c->offset += size;
                if (len == 0 || payload[0] != REC_EVENT || event_view(payload, len, &v) < 0 ||
                    v.id <= c->last_id)
                        continue;
                r = event_from_view(&v, ret);
                if (r < 0)
                        return r;
                c->last_id = v.id;
                *ret_id = v.id;
                return 1;
        }
        return 0;
}

/* ---- open and close --------------------------------------------------------- */

Journal *journal_free(Journal *j) {
        if (!j)
                return NULL;
        /* Waits for the sync running and the one asked for. */
        j->syncer = journal_syncer_free(j->syncer);
        if (j->fd >= 0) {
                if (j->unsynced && fdatasync(j->fd) < 0)
                        log_warning_errno(errno, "Failed to sync the event journal: %m");
                if (j->unsynced)
                        stats_journal_synced(0, j->unsynced_events, j->unsynced_bytes);
                close(j->fd);
        }
        if (j->lock_fd >= 0)
                close(j->lock_fd);
        if (j->dir_fd >= 0)
                close(j->dir_fd);
        sd_event_source_disable_unref(j->sync_timer);
        states_free(j);
        free(j->buf);
        journal_seek_clear(&j->seek);
        free(j);
        return NULL;
}

int journal_new(sd_event *event, const CloudConfig *config, Journal **ret) {
        _cleanup_(journal_freep) Journal *j = NULL;
        const char *dir = config->state_dir;
        int r;

        j = calloc(1, sizeof(*j));
        if (!j)
                return log_error_errno(-ENOMEM, "Out of memory opening the event journal.");
        *j = (Journal){ .config = config, .generation = 1, .dir_fd = -1, .lock_fd = -1, .fd = -1,
                        .retain_after = UINT64_MAX, .compact_at = config->journal_max_bytes };
        if (mkdir(dir, 0700) < 0 && errno != EEXIST)
                return log_error_errno(errno, "Failed to create the state directory '%s': %m", dir);
        j->dir_fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (j->dir_fd < 0)
                return log_error_errno(errno, "Failed to open the state directory '%s': %m", dir);
        j->lock_fd = openat(j->dir_fd, JOURNAL_LOCK_FILE, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
        if (j->lock_fd < 0)
                return log_error_errno(errno, "Failed to create '%s/%s': %m", dir, JOURNAL_LOCK_FILE);
        if (flock(j->lock_fd, LOCK_EX | LOCK_NB) < 0)
                return log_error_errno(errno == EWOULDBLOCK ? -EBUSY : errno,
                                       "The event journal in '%s' is in use by another tether-cloudd: %m", dir);
        j->fd = openat(j->dir_fd, JOURNAL_FILE, O_RDWR | O_CLOEXEC | O_NOFOLLOW);
        if (j->fd < 0 && errno != ENOENT)
                return log_error_errno(errno, "Failed to open '%s/%s': %m", dir, JOURNAL_FILE);
        r = j->fd < 0 ? create_fresh(j) : journal_recover(j);
        if (r < 0)
                return log_error_errno(r, "Failed to set up the event journal in '%s': %m", dir);
        if (config->journal_sync_ms > 0) {
                r = journal_syncer_new(&j->syncer);
                if (r < 0)
                        return log_error_errno(r, "Failed to start the event journal's sync thread: %m");
        }
        r = sd_event_add_time(event, &j->sync_timer, CLOCK_MONOTONIC, 0, 10000, journal_sync_cb, j);
        if (r >= 0)
                r = sd_event_source_set_enabled(j->sync_timer, SD_EVENT_OFF);
        if (r < 0)
                return log_error_errno(r, "Failed to add the journal timer: %m");
        *ret = TAKE_PTR(j);
        return 0;
}
