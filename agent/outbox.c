/* SPDX-License-Identifier: Apache-2.0 */
/* The persistent outbox (outbox.h). The file is a sequence of records
 * (lib/record.h), each starting with a type byte:
 *
 *   'H' version u8, epoch u64, next_seq u64      first record of a file
 *   'E' seq u64, ttl u32, flags u32, name bytes, data bytes, time u64
 *                         an event; time is the wall clock at append
 *   'A' head u64          every event with a lower seq is finished
 *
 * Version 1 files have no time in their events. Their records stay
 * readable (an event without one has time 0) and a version 1 file is
 * rewritten as version 2 when it is opened, so that the header says what
 * the records may hold: an older agent sets a version 2 file aside as
 * damaged instead of skipping events it cannot read.
 *
 * Appends go at the end; acknowledgements only move the head, written
 * lazily as an 'A' record (losing one in a crash means a resend, which the
 * cloud drops as a duplicate). When the file holds more finished events
 * than queued ones it is rewritten with just the queue (compaction:
 * tmp -> fsync -> rename -> fsync dir). The queue's index (seq, offset,
 * size) is kept in memory; event bodies are read back from the file when
 * they are sent, so memory does not grow with the queue's bytes. */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include "outbox.h"
#include "proto.h"
#include "record.h"
#include "util.h"

#define OUTBOX_VERSION 2
#define OUTBOX_VERSION_UNTIMED 1 /* events without a time */
#define REC_HEADER 'H'
#define REC_EVENT 'E'
#define REC_ACK 'A'
#define OUTBOX_CORRUPT_FILE "outbox.corrupt"
#define OUTBOX_LOCK_FILE "outbox.lock"
/* Fixed part of an event payload: type, seq, ttl, flags, two lengths, time. */
#define EVENT_FIXED (1 + 8 + 4 + 4 + 4 + 4 + 8)
#define HEADER_PAYLOAD (1 + 1 + 8 + 8)
#define ACK_PAYLOAD (1 + 8)
/* Compaction once finished events take more room than queued ones and
 * at least this much. */
#define OUTBOX_COMPACT_MIN (1u << 20)
#define OUTBOX_COPY_BUF (64u * 1024)
/* Sequence numbers never get near this; a file that claims more is damaged. */
#define OUTBOX_SEQ_LIMIT (UINT64_C(1) << 62)

typedef struct Entry {
        uint64_t seq;
        uint64_t off;
        uint32_t size; /* whole record */
        bool done;     /* acknowledged, waiting for older ones */
} Entry;

struct Outbox {
        int dir_fd;
        int lock_fd;
        int fd;
        OutboxLimits limits;
        outbox_pwrite_fn pwrite_fn;

        uint64_t epoch;
        uint64_t next_seq;
        uint64_t head;         /* every seq below is finished */
        uint64_t head_written; /* head as recorded in the file */
        uint64_t end;          /* where the next record goes */
        bool unsynced;         /* written since the last fdatasync() */

        Entry *ring; /* queued events, oldest first */
        size_t cap, first, n;
        size_t pending; /* entries not done */
        uint64_t bytes; /* record sizes of the entries not done */

        uint8_t *buf; /* records being written or read back */
        size_t buf_cap;
        char *event; /* name\0data\0 of the last outbox_next() */
        size_t event_cap;

        OutboxStats stats;
};

/* ---- the in-memory index ---------------------------------------------- */

static Entry *entry_at(const Outbox *o, size_t i) {
        return &o->ring[(o->first + i) & (o->cap - 1)];
}

static int ring_reserve(Outbox *o, size_t n) {
        size_t cap = o->cap ? o->cap : 64;
        Entry *r;

        if (n <= o->cap)
                return 0;
        while (cap < n)
                cap *= 2;
        r = calloc(cap, sizeof(Entry));
        if (!r)
                return -ENOMEM;
        for (size_t i = 0; i < o->n; i++)
                r[i] = *entry_at(o, i);
        free(o->ring);
        o->ring = r;
        o->cap = cap;
        o->first = 0;
        return 0;
}

static int ring_push(Outbox *o, const Entry *e) {
        int r = ring_reserve(o, o->n + 1);

        if (r < 0)
                return r;
        *entry_at(o, o->n) = *e;
        o->n++;
        if (!e->done) {
                o->bytes += e->size;
                o->pending++;
        }
        return 0;
}

/* Returns whether the entry was still waiting (not done). */
static bool ring_pop(Outbox *o) {
        Entry *e = entry_at(o, 0);
        bool waiting = !e->done;

        if (waiting) {
                o->bytes -= e->size;
                o->pending--;
        }
        o->first = (o->first + 1) & (o->cap - 1);
        o->n--;
        return waiting;
}

static void entry_done(Outbox *o, Entry *e) {
        if (!e->done) {
                e->done = true;
                o->pending--;
                o->bytes -= e->size;
        }
}

static bool needs_compaction(const Outbox *o) {
        return o->end > o->bytes + (o->bytes > OUTBOX_COMPACT_MIN ? o->bytes : OUTBOX_COMPACT_MIN);
}

/* Drop finished events from the front and move the head past them. */
static void advance_head(Outbox *o) {
        while (o->n > 0 && entry_at(o, 0)->done)
                ring_pop(o);
        o->head = o->n > 0 ? entry_at(o, 0)->seq : o->next_seq;
}

/* Index of the first entry with seq >= seq (n if none). */
static size_t ring_find(const Outbox *o, uint64_t seq) {
        size_t lo = 0, hi = o->n;

        while (lo < hi) {
                size_t mid = lo + (hi - lo) / 2;

                if (entry_at(o, mid)->seq < seq)
                        lo = mid + 1;
                else
                        hi = mid;
        }
        return lo;
}

/* ---- writing ------------------------------------------------------------ */

static int buf_reserve(Outbox *o, size_t n) {
        uint8_t *b;

        if (n <= o->buf_cap)
                return 0;
        b = realloc(o->buf, n);
        if (!b)
                return -ENOMEM;
        o->buf = b;
        o->buf_cap = n;
        return 0;
}

/* Records are built in place: payload at p + RECORD_HEADER_SIZE. */
static size_t put_header(const Outbox *o, uint8_t *p) {
        RecordWriter w = { .buf = p + RECORD_HEADER_SIZE, .cap = HEADER_PAYLOAD };

        record_put_u8(&w, REC_HEADER);
        record_put_u8(&w, OUTBOX_VERSION);
        record_put_u64(&w, o->epoch);
        record_put_u64(&w, o->next_seq);
        record_seal(OUTBOX_MAGIC, p, w.len);
        return record_size(w.len);
}

static size_t put_ack(uint64_t head, uint8_t *p) {
        RecordWriter w = { .buf = p + RECORD_HEADER_SIZE, .cap = ACK_PAYLOAD };

        record_put_u8(&w, REC_ACK);
        record_put_u64(&w, head);
        record_seal(OUTBOX_MAGIC, p, w.len);
        return record_size(w.len);
}

/* Rewrite the file with only what is queued. On failure nothing changes. */
static int compact(Outbox *o) {
        _cleanup_free_ uint8_t *copy = NULL;
        _cleanup_free_ uint64_t *offs = NULL;
        uint8_t head[64];
        uint64_t off;
        size_t k;
        int fd = -1, r;

        if (o->n > 0) {
                offs = calloc(o->n, sizeof(uint64_t));
                copy = malloc(OUTBOX_COPY_BUF);
                if (!offs || !copy)
                        return -ENOMEM;
        }
        r = record_file_begin(o->dir_fd, OUTBOX_FILE, &fd);
        if (r < 0)
                return r;
        k = put_header(o, head);
        k += put_ack(o->head, head + k);
        r = record_pwrite_all(fd, head, k, 0);
        off = k;
        for (size_t i = 0; r >= 0 && i < o->n; i++) {
                Entry *e = entry_at(o, i);
                ssize_t n;

                if (e->done)
                        continue;
                /* Records are small; a larger one is copied in pieces. */
                for (uint64_t done = 0; r >= 0 && done < e->size; done += (uint64_t)n) {
                        size_t want = e->size - done < OUTBOX_COPY_BUF ? (size_t)(e->size - done) : OUTBOX_COPY_BUF;

                        n = pread(o->fd, copy, want, (off_t)(e->off + done));
                        if (n <= 0) {
                                r = n < 0 ? -errno : -EIO;
                                break;
                        }
                        r = record_pwrite_all(fd, copy, (size_t)n, off + done);
                }
                offs[i] = off;
                off += e->size;
        }
        if (r >= 0)
                r = record_file_commit(o->dir_fd, OUTBOX_FILE, fd);
        if (r < 0) {
                record_file_abort(o->dir_fd, OUTBOX_FILE, fd);
                return r;
        }
        for (size_t i = 0; i < o->n; i++)
                entry_at(o, i)->off = offs[i];
        if (o->fd >= 0)
                close(o->fd);
        o->fd = fd;
        o->end = off;
        o->head_written = o->head;
        o->unsynced = false;
        o->stats.compactions++;
        return 0;
}

/* ---- recovery ------------------------------------------------------------ */

typedef struct Recovery {
        Outbox *o;
        bool header;
        uint8_t version;
        uint64_t header_next_seq;
        uint64_t last_seq;
        uint64_t head;
        uint64_t headless; /* events before any header: a foreign file */
        int error;
} Recovery;

/* An event record of either version: the time is there or not (0). */
static int decode_event(const uint8_t *payload, size_t len, uint64_t *ret_seq, uint32_t *ret_ttl,
                        uint32_t *ret_flags, const uint8_t **ret_name, size_t *ret_name_len,
                        const uint8_t **ret_data, size_t *ret_data_len, uint64_t *ret_time) {
        RecordReader r = { .p = payload, .left = len };
        uint8_t type;

        if (record_get_u8(&r, &type) < 0 || type != REC_EVENT || record_get_u64(&r, ret_seq) < 0 ||
            record_get_u32(&r, ret_ttl) < 0 || record_get_u32(&r, ret_flags) < 0 ||
            record_get_bytes(&r, RECORD_PAYLOAD_MAX, ret_name, ret_name_len) < 0 ||
            record_get_bytes(&r, RECORD_PAYLOAD_MAX, ret_data, ret_data_len) < 0)
                return -EBADMSG;
        *ret_time = 0;
        if (r.left > 0 && record_get_u64(&r, ret_time) < 0)
                return -EBADMSG;
        if (r.left != 0)
                return -EBADMSG;
        if (*ret_name_len == 0 || memchr(*ret_name, 0, *ret_name_len))
                return -EBADMSG;
        return 0;
}

static int recover_record(const uint8_t *payload, size_t len, size_t offset, void *userdata) {
        Recovery *rc = userdata;
        RecordReader r = { .p = payload, .left = len };
        uint8_t type = 0, version;
        uint64_t v;

        (void)record_get_u8(&r, &type);
        switch (type) {
        case REC_HEADER:
                if (rc->header)
                        return 0; /* only the first counts */
                if (record_get_u8(&r, &version) < 0 || version < OUTBOX_VERSION_UNTIMED ||
                    version > OUTBOX_VERSION ||
                    record_get_u64(&r, &rc->o->epoch) < 0 || record_get_u64(&r, &rc->header_next_seq) < 0 ||
                    rc->header_next_seq >= OUTBOX_SEQ_LIMIT)
                        return 0;
                rc->header = true;
                rc->version = version;
                return 0;
        case REC_ACK:
                if (rc->header && record_get_u64(&r, &v) == 0 && v > rc->head && v < OUTBOX_SEQ_LIMIT)
                        rc->head = v;
                return 0;
        case REC_EVENT: {
                const uint8_t *name, *data;
                size_t name_len, data_len;
                uint32_t ttl, flags;
                uint64_t at;
                Entry e;
                int k;

                if (decode_event(payload, len, &v, &ttl, &flags, &name, &name_len, &data, &data_len, &at) < 0)
                        return 0;
                if (!rc->header) {
                        rc->headless++;
                        return 0;
                }
                /* Sequence numbers only grow; anything else is not ours. */
                if (v == 0 || v <= rc->last_seq || v >= OUTBOX_SEQ_LIMIT)
                        return 0;
                rc->last_seq = v;
                e = (Entry){ .seq = v, .off = offset, .size = (uint32_t)record_size(len) };
                k = ring_push(rc->o, &e);
                if (k < 0)
                        rc->error = k;
                return k;
        }
        default:
                return 0;
        }
}

static int random_epoch(uint64_t *ret) {
        uint64_t v = 0;

        while (v == 0)
                if (getrandom(&v, sizeof(v), 0) != sizeof(v))
                        return errno > 0 ? -errno : -EIO;
        *ret = v;
        return 0;
}

static int create_fresh(Outbox *o) {
        int r;

        while (o->n > 0)
                ring_pop(o);
        r = random_epoch(&o->epoch);
        if (r < 0)
                return r;
        o->next_seq = o->head = 1;
        return compact(o);
}

static int recover(Outbox *o) {
        Recovery rc = { .o = o };
        struct stat st;
        void *map;
        int64_t end;

        if (fstat(o->fd, &st) < 0)
                return -errno;
        if (st.st_size == 0)
                return create_fresh(o);
        map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, o->fd, 0);
        if (map == MAP_FAILED)
                return -errno;
        {
                size_t first = 0;

                end = record_scan(OUTBOX_MAGIC, map, (size_t)st.st_size, recover_record, &rc,
                                  &o->stats.damaged_bytes, &o->stats.damaged_places, &first);
                if (o->stats.damaged_places > 0)
                        o->stats.first_damage = first;
        }
        munmap(map, (size_t)st.st_size);
        if (end < 0)
                return rc.error ?: (int)end;
        if (!rc.header) {
                /* Not an outbox we can read: keep it for a human, start anew. */
                if (renameat(o->dir_fd, OUTBOX_FILE, o->dir_fd, OUTBOX_CORRUPT_FILE) < 0)
                        return -errno;
                o->stats.recreated = true;
                o->stats.recovered = 0;
                return create_fresh(o);
        }
        o->next_seq = rc.header_next_seq;
        if (rc.last_seq >= o->next_seq)
                o->next_seq = rc.last_seq + 1;
        if (rc.head > o->next_seq)
                o->next_seq = rc.head;
        if (o->next_seq == 0)
                o->next_seq = 1;
        while (o->n > 0 && entry_at(o, 0)->seq < rc.head)
                ring_pop(o);
        o->head = o->n > 0 ? entry_at(o, 0)->seq : o->next_seq;
        o->head_written = rc.head;
        o->end = (uint64_t)end;
        o->stats.recovered = o->n;
        if (o->stats.damaged_bytes > 0) {
                /* Leave a clean file behind; if that fails, appending after
                 * the last good record is still safe. */
                if (compact(o) < 0 && ftruncate(o->fd, (off_t)o->end) < 0)
                        return -errno;
        } else if (rc.version < OUTBOX_VERSION)
                /* Upgrade the header. If that fails, the file still works
                 * for us: this version reads the records of both. */
                (void)compact(o);
        return 0;
}

/* ---- public ------------------------------------------------------------- */

int outbox_open(const char *dir, const OutboxLimits *limits, Outbox **ret) {
        _cleanup_(outbox_freep) Outbox *o = NULL;
        int r;

        if (!dir || !limits || limits->max_events == 0 || limits->max_bytes == 0)
                return -EINVAL;
        o = calloc(1, sizeof(*o));
        if (!o)
                return -ENOMEM;
        o->dir_fd = o->lock_fd = o->fd = -1;
        o->limits = *limits;
        o->pwrite_fn = pwrite;

        if (mkdir(dir, 0700) < 0 && errno != EEXIST)
                return -errno;
        o->dir_fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (o->dir_fd < 0)
                return -errno;
        /* Compaction replaces the file: the lock lives on its own file. */
        o->lock_fd = openat(o->dir_fd, OUTBOX_LOCK_FILE, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
        if (o->lock_fd < 0)
                return -errno;
        if (flock(o->lock_fd, LOCK_EX | LOCK_NB) < 0)
                return errno == EWOULDBLOCK ? -EBUSY : -errno;
        o->fd = openat(o->dir_fd, OUTBOX_FILE, O_RDWR | O_CLOEXEC | O_NOFOLLOW);
        if (o->fd < 0) {
                if (errno != ENOENT)
                        return -errno;
                r = create_fresh(o);
        } else
                r = recover(o);
        if (r < 0)
                return r;
        *ret = TAKE_PTR(o);
        return 0;
}

Outbox *outbox_free(Outbox *o) {
        if (!o)
                return NULL;
        if (o->fd >= 0) {
                (void)outbox_sync(o);
                close(o->fd);
        }
        if (o->lock_fd >= 0)
                close(o->lock_fd);
        if (o->dir_fd >= 0)
                close(o->dir_fd);
        free(o->ring);
        free(o->buf);
        free(o->event);
        free(o);
        return NULL;
}

void outbox_set_limits(Outbox *o, const OutboxLimits *limits) {
        if (limits->max_events > 0 && limits->max_bytes > 0)
                o->limits = *limits;
}

void outbox_set_pwrite(Outbox *o, outbox_pwrite_fn fn) {
        o->pwrite_fn = fn ?: pwrite;
}

int outbox_append(Outbox *o, const char *name, const char *data, size_t data_len, uint32_t ttl,
                  uint32_t flags, uint64_t *ret_seq) {
        size_t name_len = name ? strlen(name) : 0, payload, size, drop = 0, ack = 0, total;
        uint64_t freed = 0, ack_head = 0;
        RecordWriter w;
        Entry e;
        int r;

        if (name_len == 0 || (data_len > 0 && !data))
                return -EINVAL;
        payload = EVENT_FIXED + name_len + data_len;
        if (name_len > RECORD_PAYLOAD_MAX || data_len > RECORD_PAYLOAD_MAX || payload > RECORD_PAYLOAD_MAX)
                return -E2BIG;
        size = record_size(payload);
        if (size > o->limits.max_bytes)
                return -E2BIG;

        /* Room: by count and by bytes. Queued events are only ever
         * removed from the front. */
        while (o->n - drop + 1 > o->limits.max_events || o->bytes - freed + size > o->limits.max_bytes) {
                if (o->limits.overflow != OUTBOX_DROP_OLDEST || drop == o->n) {
                        o->stats.rejected++;
                        return -ENOBUFS;
                }
                if (!entry_at(o, drop)->done)
                        freed += entry_at(o, drop)->size;
                drop++;
        }

        total = size + (drop > 0 ? record_size(ACK_PAYLOAD) : 0);
        r = buf_reserve(o, total);
        if (r >= 0)
                r = ring_reserve(o, o->n - drop + 1);
        if (r < 0)
                return r;
        if (drop > 0) {
                /* Dropping moves the head: say so in the same write. */
                ack_head = drop < o->n ? entry_at(o, drop)->seq : o->next_seq;
                ack = put_ack(ack_head, o->buf);
        }
        w = (RecordWriter){ .buf = o->buf + ack + RECORD_HEADER_SIZE, .cap = payload };
        record_put_u8(&w, REC_EVENT);
        record_put_u64(&w, o->next_seq);
        record_put_u32(&w, ttl);
        record_put_u32(&w, flags);
        record_put_bytes(&w, name, name_len);
        record_put_bytes(&w, data, data_len);
        record_put_u64(&w, proto_time_now_ms()); /* 0 (unknown) before 1970 */
        if (w.overflow)
                return -E2BIG;
        record_seal(OUTBOX_MAGIC, o->buf + ack, w.len);

        r = record_pwrite_all_with(o->pwrite_fn, o->fd, o->buf, total, o->end);
        if (r >= 0 && o->limits.sync_always && fdatasync(o->fd) < 0)
                r = -errno;
        if (r < 0) {
                /* Whatever part got written is beyond the end we keep. */
                o->stats.write_errors++;
                (void)ftruncate(o->fd, (off_t)o->end);
                return r;
        }

        for (size_t i = 0; i < drop; i++)
                o->stats.dropped += ring_pop(o);
        e = (Entry){ .seq = o->next_seq, .off = o->end + ack, .size = (uint32_t)size };
        (void)ring_push(o, &e); /* room was reserved */
        o->end += total;
        o->next_seq++;
        if (drop > 0) {
                o->head_written = ack_head;
                advance_head(o);
        }
        if (!o->limits.sync_always)
                o->unsynced = true;
        o->stats.appended++;
        if (ret_seq)
                *ret_seq = e.seq;
        return 0;
}

static int event_reserve(Outbox *o, size_t n) {
        char *b;

        if (n <= o->event_cap)
                return 0;
        b = realloc(o->event, n);
        if (!b)
                return -ENOMEM;
        o->event = b;
        o->event_cap = n;
        return 0;
}

/* Read entry i back into ret; -EBADMSG if what the file holds is not it. */
static int read_entry(Outbox *o, const Entry *e, OutboxEvent *ret) {
        const uint8_t *payload, *name, *data;
        size_t plen, size, name_len, data_len;
        uint32_t ttl, flags;
        uint64_t seq, at;
        ssize_t n;
        int r;

        r = buf_reserve(o, e->size);
        if (r < 0)
                return r;
        n = pread(o->fd, o->buf, e->size, (off_t)e->off);
        if (n < 0)
                return -errno;
        if ((size_t)n != e->size ||
            record_parse(OUTBOX_MAGIC, o->buf, e->size, &payload, &plen, &size) < 0 || size != e->size ||
            decode_event(payload, plen, &seq, &ttl, &flags, &name, &name_len, &data, &data_len, &at) < 0 ||
            seq != e->seq)
                return -EBADMSG;
        r = event_reserve(o, name_len + data_len + 2);
        if (r < 0)
                return r;
        memcpy(o->event, name, name_len);
        o->event[name_len] = 0;
        if (data_len > 0)
                memcpy(o->event + name_len + 1, data, data_len);
        o->event[name_len + 1 + data_len] = 0;
        *ret = (OutboxEvent){
                .seq = seq,
                .name = o->event,
                .data = o->event + name_len + 1,
                .data_len = data_len,
                .ttl = ttl,
                .flags = flags,
                .time_ms = at,
        };
        return 0;
}

int outbox_next(Outbox *o, uint64_t after, OutboxEvent *ret) {
        if (after == UINT64_MAX)
                return -ENOENT;
        for (size_t i = ring_find(o, after + 1); i < o->n; i++) {
                Entry *e = entry_at(o, i);
                uint64_t seq = e->seq;
                int r;

                if (e->done)
                        continue;
                r = read_entry(o, e, ret);
                if (r == 0)
                        return 0;
                if (r != -EBADMSG && r != -EIO)
                        return r;
                /* Damaged since it was written: it cannot be sent. */
                o->stats.unreadable++;
                entry_done(o, e);
                advance_head(o);
                /* The front may have moved: find our place again (the loop's
                 * i++ brings i back; unsigned wrap-around is intended). */
                i = ring_find(o, seq + 1) - 1;
        }
        return -ENOENT;
}

int outbox_ack(Outbox *o, uint64_t seq) {
        size_t i = ring_find(o, seq);
        Entry *e;

        if (i >= o->n)
                return -ENOENT;
        e = entry_at(o, i);
        if (e->seq != seq || e->done)
                return -ENOENT;
        entry_done(o, e);
        o->stats.acked++;
        advance_head(o);
        return 0;
}

bool outbox_dirty(const Outbox *o) {
        return o->unsynced || o->head != o->head_written || needs_compaction(o);
}

int outbox_sync(Outbox *o) {
        uint8_t rec[32];
        int r;

        if (needs_compaction(o)) {
                /* Compaction writes the head and syncs: nothing else to do. */
                r = compact(o);
                if (r == 0)
                        return 0;
                /* Disk full or the like: carry on with the big file. */
        }
        if (o->head != o->head_written) {
                size_t n = put_ack(o->head, rec);

                r = record_pwrite_all_with(o->pwrite_fn, o->fd, rec, n, o->end);
                if (r < 0) {
                        (void)ftruncate(o->fd, (off_t)o->end);
                        return r;
                }
                o->end += n;
                o->head_written = o->head;
                o->unsynced = true;
        }
        if (o->unsynced) {
                if (fdatasync(o->fd) < 0)
                        return -errno;
                o->unsynced = false;
        }
        return 0;
}

size_t outbox_count(const Outbox *o) { return o->pending; }

uint64_t outbox_bytes(const Outbox *o) { return o->bytes; }
uint64_t outbox_epoch(const Outbox *o) { return o->epoch; }
uint64_t outbox_next_seq(const Outbox *o) { return o->next_seq; }
const OutboxStats *outbox_stats(const Outbox *o) { return &o->stats; }
