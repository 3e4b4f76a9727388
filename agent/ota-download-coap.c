/* SPDX-License-Identifier: Apache-2.0 */
#include <coap3/coap.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ota-download-coap.h"
#include "ota-download-file.h"
#include "proto.h"
#include "util.h"

#define CHECKPOINT_BYTES (4ull << 20)
/* Block requests in flight: enough to keep a fast link busy, few enough
 * that the cloud's cost per device stays small (docs/protocol.md). */
#define WINDOW 8
/* ... and at most this many bytes of answers out or kept: the cloud pings
 * for proof of reading at half its MaxQueuedBytes (1 MiB by default) and
 * answers 5.03 at all of it (docs/protocol.md, "Flow control"); 8 BERT
 * blocks of 64 KiB in flight ran into that and waited out its Max-Age. */
#define WINDOW_BYTES (256u * 1024)
/* The largest BERT block the cloud may send (docs/protocol.md, "Artifacts"). */
#define BERT_BLOCK_MAX (64u * 1024)
#define ETAG_MAX 8

typedef struct Slot {
        OtaCoapDownload *d;
        bool used;    /* a block is asked for, or its answer is kept */
        bool waiting; /* its request is out */
        bool resend;  /* answered 5.03: ask again when the hold ends */
        uint64_t offset;
        uint8_t *data; /* an answer that came before the blocks in front of it */
        size_t len;
} Slot;

struct OtaCoapDownload {
        sd_event *event;
        Conn *conn;
        char *sha256;
        uint64_t timeout_ms;

        uint8_t etag[ETAG_MAX]; /* of this transfer (etag_len 0: none seen yet) */
        size_t etag_len;
        char *checkpoint_etag; /* hex, from the caller */

        OtaDownloadFile *file; /* the file, its hash, the re-hash and the end */

        unsigned szx;    /* asked for */
        uint64_t unit;   /* bytes per NUM */
        uint64_t stride; /* bytes per block: 0 until the first answer says */
        uint64_t next;   /* the next offset to ask for */
        Slot slots[WINDOW];
        unsigned out;    /* requests out (answers still to come, also after free) */
        bool freed;      /* a husk waiting for its answers */

        sd_event_source *hold_timer;
        OtaCoapDownloadStats stats;
};

#define finish(d, ...) ota_download_file_finish((d)->file, __VA_ARGS__)

static void etag_hex(const uint8_t *e, size_t n, char out[static 2 * ETAG_MAX + 1]) {
        hex_encode(e, n, out);
}

static void slot_clear(Slot *s) {
        free(s->data);
        s->data = NULL;
        s->len = 0;
        s->used = s->resend = false;
}

/* finish() stops the hold timer too. */
static void on_ended(void *userdata) {
        OtaCoapDownload *d = userdata;

        sd_event_source_set_enabled(d->hold_timer, SD_EVENT_OFF);
}

static void checkpoint(OtaCoapDownload *d) {
        char etag[2 * ETAG_MAX + 1];

        if (d->etag_len == 0)
                return;
        etag_hex(d->etag, d->etag_len, etag);
        ota_download_file_checkpoint(d->file, etag);
}

static void on_block(int error, unsigned code, const ConnBlock *b, const uint8_t *data, size_t len,
                     uint32_t retry_sec, void *userdata);

static int send_slot(OtaCoapDownload *d, Slot *s) {
        int r;

        r = conn_request_block2(d->conn, PROTO_PATH_ARTIFACT, d->sha256, (uint32_t)(s->offset / d->unit), d->szx,
                                d->timeout_ms, on_block, s);
        if (r < 0)
                return r;
        s->waiting = true;
        s->resend = false;
        d->out++;
        d->stats.requests++;
        return 0;
}

/* Ask for blocks until WINDOW are out or kept, and at most WINDOW_BYTES
 * of them. Before the first answer (which says how large BERT blocks are)
 * only one. */
static void fill(OtaCoapDownload *d) {
        unsigned window = WINDOW, used = 0;
        int r;

        if (d->file->phase != OTA_DOWNLOAD_TRANSFER)
                return;
        if (d->stride > 0 && WINDOW_BYTES / d->stride < window)
                window = WINDOW_BYTES / d->stride > 0 ? (unsigned)(WINDOW_BYTES / d->stride) : 1;
        for (unsigned i = 0; i < WINDOW; i++)
                used += d->slots[i].used;
        for (unsigned i = 0; i < WINDOW && used < window && d->next < d->file->size; i++) {
                Slot *s = &d->slots[i];

                if (s->used)
                        continue;
                if (d->stride == 0 && d->out > 0)
                        return;
                s->used = true;
                s->offset = d->next;
                r = send_slot(d, s);
                if (r < 0) {
                        s->used = false;
                        checkpoint(d);
                        return finish(d, r == -ENOTCONN ? -ENOTCONN : r, false,
                                      r == -ENOTCONN ? "not connected to the cloud" : "cannot ask for a block: %s",
                                      strerror(-r));
                }
                d->next += d->stride ? d->stride : d->unit;
                used++;
                if (d->stride == 0)
                        return;
        }
}

/* Blocks kept because they came early, now in order. */
static int drain(OtaCoapDownload *d) {
        bool more = true;

        while (more) {
                more = false;
                for (unsigned i = 0; i < WINDOW; i++) {
                        Slot *s = &d->slots[i];
                        int r;

                        if (!s->used || s->waiting || !s->data || s->offset != d->file->bytes)
                                continue;
                        r = ota_download_file_append(d->file, s->data, s->len);
                        if (r < 0)
                                return r;
                        slot_clear(s);
                        more = true;
                }
        }
        return 0;
}

static void on_block(int error, unsigned code, const ConnBlock *b, const uint8_t *data, size_t len,
                     uint32_t retry_sec, void *userdata) {
        Slot *s = userdata;
        OtaCoapDownload *d = s->d;
        OtaDownloadFile *f;
        uint64_t offset, unit;
        int r;

        d->out--;
        s->waiting = false;
        if (d->freed) {
                if (d->out == 0)
                        free(d);
                return;
        }
        f = d->file;
        if (f->phase != OTA_DOWNLOAD_TRANSFER)
                return;
        if (error < 0) {
                checkpoint(d);
                return finish(d, error, false, "%s",
                              error == -ENOTCONN    ? "the connection to the cloud went"
                              : error == -ETIMEDOUT ? "the cloud did not answer a block request in time"
                                                    : strerror(-error));
        }
        if (code == COAP_RESPONSE_CODE(503)) {
                /* The cloud asks us to wait (it waits for the artifact, or
                 * for us to read): this block again after Max-Age. */
                s->resend = true;
                if (sd_event_source_get_enabled(d->hold_timer, NULL) <= 0) {
                        sd_event_source_set_time_relative(d->hold_timer, (uint64_t)retry_sec * 1000000ULL);
                        sd_event_source_set_enabled(d->hold_timer, SD_EVENT_ONESHOT);
                }
                return;
        }
        if (code == COAP_RESPONSE_CODE(403) || code == COAP_RESPONSE_CODE(404)) {
                checkpoint(d);
                return finish(d, -EPERM, false, "the cloud refused the artifact (%u.%02u): %.*s", code >> 5,
                              code & 31, (int)(len > 160 ? 160 : len), data ? (const char *)data : "");
        }
        if (code != COAP_RESPONSE_CODE(205)) {
                checkpoint(d);
                return finish(d, -EPROTO, false, "the cloud answered a block request with %u.%02u: %.*s", code >> 5,
                              code & 31, (int)(len > 160 ? 160 : len), data ? (const char *)data : "");
        }
        if (!b->have_block2 || !b->have_size2 || b->etag_len == 0) {
                checkpoint(d);
                return finish(d, -EPROTO, false, "the cloud's block has no Block2, Size2 or ETag option");
        }
        if (b->size2 != f->size)
                return finish(d, -EFBIG, true, "the cloud says the artifact has %" PRIu64 " bytes, the manifest %" PRIu64,
                              b->size2, f->size);
        if (d->etag_len == 0) {
                char hex[2 * ETAG_MAX + 1];

                /* The first answer of this transfer: the data before the
                 * offset must be of the same artifact (If-Match, as the
                 * HTTPS download's If-Range). */
                etag_hex(b->etag, b->etag_len, hex);
                memcpy(d->etag, b->etag, b->etag_len);
                d->etag_len = b->etag_len;
                if (f->bytes > 0 && d->checkpoint_etag && !streq(hex, d->checkpoint_etag)) {
                        if (ota_download_file_reset(f, "the artifact's ETag is not the one the kept data came with") < 0)
                                return finish(d, -EIO, false, "cannot truncate '%s': %m", f->path);
                        d->next = 0;
                        slot_clear(s);
                        d->stride = 0;
                        return fill(d);
                }
        } else if (b->etag_len != d->etag_len || memcmp(b->etag, d->etag, d->etag_len) != 0)
                return finish(d, -ESTALE, true, "the artifact's ETag changed during the download");
        unit = b->szx == 7 ? 1024 : 16u << b->szx;
        offset = (uint64_t)b->num * unit;
        if (b->szx > d->szx || offset != s->offset)
                return finish(d, -EPROTO, false,
                              "the cloud answered the block at byte %" PRIu64 " with the one at byte %" PRIu64, s->offset,
                              offset);
        if (offset + len > f->size)
                return finish(d, -EFBIG, true, "the artifact is larger than the %" PRIu64 " bytes the manifest says",
                              f->size);
        if (len > BERT_BLOCK_MAX ||
            (b->more ? (len == 0 || len % unit != 0 || (b->szx != 7 && len != unit) || (d->stride && len != d->stride))
                     : offset + len != f->size))
                return finish(d, -EPROTO, false, "a block of %zu bytes at byte %" PRIu64 " (%s) does not fit", len,
                              offset, b->more ? "more follow" : "the last");
        if (d->stride == 0) {
                /* The cloud chose the block size (BERT, or a smaller SZX). */
                d->szx = b->szx;
                d->unit = unit;
                d->stride = b->more ? len : unit;
                d->stats.block = (unsigned)d->stride;
                /* fill() moved on by the unit asked for, before the size was known: the next request
                 * starts after this block. */
                d->next = s->offset + d->stride;
        }
        d->stats.fetched += len;
        if (s->offset == f->bytes) {
                r = ota_download_file_append(f, data, len);
                slot_clear(s);
                if (r >= 0)
                        r = drain(d);
        } else {
                s->data = malloc(len ? len : 1);
                s->len = len;
                r = s->data ? 0 : -ENOMEM;
                if (s->data)
                        memcpy(s->data, data, len);
        }
        if (r < 0)
                return finish(d, r, false, "cannot write '%s': %s", f->path, strerror(-r));
        if (f->hooks.progress)
                f->hooks.progress(f->hooks.userdata, f->bytes);
        if (f->bytes - f->last_checkpoint >= CHECKPOINT_BYTES)
                checkpoint(d);
        if (f->bytes == f->size) {
                if (fsync(f->fd) < 0)
                        return finish(d, -errno, false, "cannot sync '%s': %m", f->path);
                return finish(d, 0, false, "complete");
        }
        fill(d);
}

static int on_hold(sd_event_source *src, uint64_t usec, void *userdata) {
        OtaCoapDownload *d = userdata;

        if (d->file->phase != OTA_DOWNLOAD_TRANSFER)
                return 0;
        for (unsigned i = 0; i < WINDOW; i++) {
                Slot *s = &d->slots[i];
                int r;

                if (!s->used || !s->resend)
                        continue;
                r = send_slot(d, s);
                if (r < 0) {
                        checkpoint(d);
                        finish(d, r, false, "%s", r == -ENOTCONN ? "not connected to the cloud" : strerror(-r));
                        return 0;
                }
        }
        return 0;
}

/* The kept prefix is checked (the phase is TRANSFER): ask for the rest. */
static void on_rehashed(void *userdata, bool mismatch) {
        OtaCoapDownload *d = userdata;
        /* BERT (blocks of up to 64 KiB, as the cloud chooses within our
         * Max-Message-Size) when both CSMs allow it, else 1024 bytes
         * (also with TETHER_OTA_NO_BERT set: docs/man/tetherd.8). The
         * first answer sets the stride (on_block()). */
        d->szx = conn_bert_allowed(d->conn) && !getenv("TETHER_OTA_NO_BERT") ? 7 : 6;
        d->unit = 1024;
        d->stride = 0;
        d->next = d->file->bytes;
        d->stats.resumed = d->file->bytes;
        if (d->file->bytes == d->file->size) {
                /* Complete already; a request would be out of range. */
                finish(d, 0, false, "complete");
                return;
        }
        fill(d);
}

int ota_coap_download_start(sd_event *event, Conn *conn, const OtaCoapDownloadParams *p,
                            const OtaDownloadHooks *hooks, OtaCoapDownload **ret) {
        _cleanup_(ota_coap_download_freep) OtaCoapDownload *d = calloc(1, sizeof(OtaCoapDownload));
        int r;

        if (!d)
                return -ENOMEM;
        d->event = sd_event_ref(event);
        d->conn = conn;
        d->timeout_ms = p->timeout_ms;
        for (unsigned i = 0; i < WINDOW; i++)
                d->slots[i].d = d;
        d->sha256 = strdup(p->sha256);
        d->checkpoint_etag = p->etag ? strdup(p->etag) : NULL;
        if (!d->sha256 || (p->etag && !d->checkpoint_etag))
                return -ENOMEM;
        r = sd_event_add_time(event, &d->hold_timer, CLOCK_MONOTONIC, 0, 0, on_hold, d);
        if (r >= 0)
                r = sd_event_source_set_enabled(d->hold_timer, SD_EVENT_OFF);
        if (r < 0)
                return r;
        /* Keep the checkpointed prefix only at a block boundary
         * (checkpoints are: blocks are multiples of 1024 bytes). */
        r = ota_download_file_new(event, p->path, p->size, p->offset, p->prefix_sha256, 1024, hooks,
                                  &(OtaDownloadFileOps){ .userdata = d, .rehashed = on_rehashed, .ended = on_ended },
                                  &d->file);
        if (r < 0)
                return r;
        *ret = TAKE_PTR(d);
        return 0;
}

const OtaCoapDownloadStats *ota_coap_download_stats(const OtaCoapDownload *d) {
        return &d->stats;
}

OtaCoapDownload *ota_coap_download_free(OtaCoapDownload *d) {
        if (!d)
                return NULL;
        d->file = ota_download_file_free(d->file);
        d->hold_timer = sd_event_source_disable_unref(d->hold_timer);
        for (unsigned i = 0; i < WINDOW; i++)
                slot_clear(&d->slots[i]);
        free(d->sha256);
        free(d->checkpoint_etag);
        d->event = sd_event_unref(d->event);
        if (d->out > 0) {
                /* The Conn still holds pointers to our slots: the last
                 * answer frees the husk. */
                d->freed = true;
                return NULL;
        }
        free(d);
        return NULL;
}
