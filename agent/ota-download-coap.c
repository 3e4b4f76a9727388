/* SPDX-License-Identifier: Apache-2.0 */
#include <coap3/coap.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <openssl/evp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "ota-download-coap.h"
#include "proto.h"
#include "util.h"

#define REHASH_CHUNK (1u << 20)
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

typedef enum Phase {
        PHASE_REHASH,
        PHASE_TRANSFER,
        PHASE_DONE,
} Phase;

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
        OtaDownloadHooks hooks;
        char *sha256, *path, *want_prefix;
        uint64_t size, timeout_ms;

        uint8_t etag[ETAG_MAX]; /* of this transfer (etag_len 0: none seen yet) */
        size_t etag_len;
        char *checkpoint_etag; /* hex, from the caller */

        int fd;
        EVP_MD_CTX *md;  /* hash of [0, bytes) */
        uint64_t bytes;  /* in the file and in md */
        uint64_t resume_from;
        uint64_t last_checkpoint;
        Phase phase;

        unsigned szx;    /* asked for */
        uint64_t unit;   /* bytes per NUM */
        uint64_t stride; /* bytes per block: 0 until the first answer says */
        uint64_t next;   /* the next offset to ask for */
        Slot slots[WINDOW];
        unsigned out;    /* requests out (answers still to come, also after free) */
        bool freed;      /* a husk waiting for its answers */

        sd_event_source *rehash_source, *finish_source, *hold_timer;
        OtaCoapDownloadStats stats;

        int error;
        char text[256];
        bool restart;
};

static void hex_digest(EVP_MD_CTX *md, char out[static 65]) {
        static const char digits[] = "0123456789abcdef";
        EVP_MD_CTX *copy = EVP_MD_CTX_new();
        uint8_t h[32];
        unsigned n = sizeof(h);

        out[0] = 0;
        if (!copy || EVP_MD_CTX_copy_ex(copy, md) != 1 || EVP_DigestFinal_ex(copy, h, &n) != 1) {
                EVP_MD_CTX_free(copy);
                return;
        }
        EVP_MD_CTX_free(copy);
        for (unsigned i = 0; i < 32; i++) {
                out[2 * i] = digits[h[i] >> 4];
                out[2 * i + 1] = digits[h[i] & 15];
        }
        out[64] = 0;
}

static void etag_hex(const uint8_t *e, size_t n, char out[static 2 * ETAG_MAX + 1]) {
        static const char digits[] = "0123456789abcdef";

        for (size_t i = 0; i < n; i++) {
                out[2 * i] = digits[e[i] >> 4];
                out[2 * i + 1] = digits[e[i] & 15];
        }
        out[2 * n] = 0;
}

static void slot_clear(Slot *s) {
        free(s->data);
        s->data = NULL;
        s->len = 0;
        s->used = s->resend = false;
}

static int reset_data(OtaCoapDownload *d, const char *why) {
        if (ftruncate(d->fd, 0) < 0 || lseek(d->fd, 0, SEEK_SET) < 0)
                return -errno;
        if (EVP_DigestInit_ex(d->md, EVP_sha256(), NULL) != 1)
                return -EIO;
        d->bytes = d->last_checkpoint = d->next = 0;
        if (d->hooks.restarted)
                d->hooks.restarted(d->hooks.userdata, why);
        return 0;
}

static void finish(OtaCoapDownload *d, int error, bool restart, const char *fmt, ...) _printf_(4, 5);
static void finish(OtaCoapDownload *d, int error, bool restart, const char *fmt, ...) {
        va_list ap;

        if (d->phase == PHASE_DONE)
                return;
        d->phase = PHASE_DONE;
        d->error = error;
        d->restart = restart;
        va_start(ap, fmt);
        vsnprintf(d->text, sizeof(d->text), fmt, ap);
        va_end(ap);
        sd_event_source_set_enabled(d->rehash_source, SD_EVENT_OFF);
        sd_event_source_set_enabled(d->hold_timer, SD_EVENT_OFF);
        sd_event_source_set_enabled(d->finish_source, SD_EVENT_ONESHOT);
}

static int on_finish(sd_event_source *s, void *userdata) {
        OtaCoapDownload *d = userdata;
        char sha[65] = "";

        if (d->error == 0)
                hex_digest(d->md, sha);
        d->hooks.done(d->hooks.userdata, d->error, sha, d->text, d->restart);
        return 0;
}

static void checkpoint(OtaCoapDownload *d) {
        char sha[65], etag[2 * ETAG_MAX + 1];

        if (d->bytes == d->last_checkpoint || d->etag_len == 0)
                return;
        if (fdatasync(d->fd) < 0)
                return;
        hex_digest(d->md, sha);
        etag_hex(d->etag, d->etag_len, etag);
        d->last_checkpoint = d->bytes;
        if (d->hooks.checkpoint)
                d->hooks.checkpoint(d->hooks.userdata, d->bytes, sha, etag);
}

static int append(OtaCoapDownload *d, const uint8_t *buf, size_t len) {
        size_t left = len;

        while (left > 0) {
                ssize_t w = write(d->fd, buf, left);

                if (w < 0 && errno == EINTR)
                        continue;
                if (w < 0)
                        return -errno;
                buf += w;
                left -= (size_t)w;
        }
        EVP_DigestUpdate(d->md, buf - len, len);
        d->bytes += len;
        return 0;
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

        if (d->phase != PHASE_TRANSFER)
                return;
        if (d->stride > 0 && WINDOW_BYTES / d->stride < window)
                window = WINDOW_BYTES / d->stride > 0 ? (unsigned)(WINDOW_BYTES / d->stride) : 1;
        for (unsigned i = 0; i < WINDOW; i++)
                used += d->slots[i].used;
        for (unsigned i = 0; i < WINDOW && used < window && d->next < d->size; i++) {
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

                        if (!s->used || s->waiting || !s->data || s->offset != d->bytes)
                                continue;
                        r = append(d, s->data, s->len);
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
        uint64_t offset, unit;
        int r;

        d->out--;
        s->waiting = false;
        if (d->freed) {
                if (d->out == 0)
                        free(d);
                return;
        }
        if (d->phase != PHASE_TRANSFER)
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
        if (b->size2 != d->size)
                return finish(d, -EFBIG, true, "the cloud says the artifact has %" PRIu64 " bytes, the manifest %" PRIu64,
                              b->size2, d->size);
        if (d->etag_len == 0) {
                char hex[2 * ETAG_MAX + 1];

                /* The first answer of this transfer: the data before the
                 * offset must be of the same artifact (If-Match, as the
                 * HTTPS download's If-Range). */
                etag_hex(b->etag, b->etag_len, hex);
                memcpy(d->etag, b->etag, b->etag_len);
                d->etag_len = b->etag_len;
                if (d->bytes > 0 && d->checkpoint_etag && !streq(hex, d->checkpoint_etag)) {
                        if (reset_data(d, "the artifact's ETag is not the one the kept data came with") < 0)
                                return finish(d, -EIO, false, "cannot truncate '%s': %m", d->path);
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
        if (offset + len > d->size)
                return finish(d, -EFBIG, true, "the artifact is larger than the %" PRIu64 " bytes the manifest says",
                              d->size);
        if (len > BERT_BLOCK_MAX ||
            (b->more ? (len == 0 || len % unit != 0 || (b->szx != 7 && len != unit) || (d->stride && len != d->stride))
                     : offset + len != d->size))
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
        if (s->offset == d->bytes) {
                r = append(d, data, len);
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
                return finish(d, r, false, "cannot write '%s': %s", d->path, strerror(-r));
        if (d->hooks.progress)
                d->hooks.progress(d->hooks.userdata, d->bytes);
        if (d->bytes - d->last_checkpoint >= CHECKPOINT_BYTES)
                checkpoint(d);
        if (d->bytes == d->size) {
                if (fsync(d->fd) < 0)
                        return finish(d, -errno, false, "cannot sync '%s': %m", d->path);
                return finish(d, 0, false, "complete");
        }
        fill(d);
}

static int on_hold(sd_event_source *src, uint64_t usec, void *userdata) {
        OtaCoapDownload *d = userdata;

        if (d->phase != PHASE_TRANSFER)
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

static void start_transfer(OtaCoapDownload *d) {
        d->phase = PHASE_TRANSFER;
        /* BERT (blocks of up to 64 KiB, as the cloud chooses within our
         * Max-Message-Size) when both CSMs allow it, else 1024 bytes
         * (also with TETHER_OTA_NO_BERT set: docs/man/tetherd.8). The
         * first answer sets the stride (on_block()). */
        d->szx = conn_bert_allowed(d->conn) && !getenv("TETHER_OTA_NO_BERT") ? 7 : 6;
        d->unit = 1024;
        d->stride = 0;
        d->next = d->bytes;
        d->stats.resumed = d->bytes;
        if (d->bytes == d->size) {
                /* Complete already; a request would be out of range. */
                finish(d, 0, false, "complete");
                return;
        }
        fill(d);
}

/* Re-hash the kept prefix, 1 MiB per loop iteration. */
static int on_rehash(sd_event_source *src, void *userdata) {
        OtaCoapDownload *d = userdata;
        uint64_t want;
        ssize_t n;

        if (d->phase != PHASE_REHASH)
                return 0;
        want = d->resume_from - d->bytes;
        if (want > REHASH_CHUNK)
                want = REHASH_CHUNK;
        if (want > 0) {
                uint8_t *buf = malloc(REHASH_CHUNK);

                if (!buf) {
                        finish(d, -ENOMEM, false, "out of memory");
                        return 0;
                }
                n = pread(d->fd, buf, (size_t)want, (off_t)d->bytes);
                if (n > 0) {
                        EVP_DigestUpdate(d->md, buf, (size_t)n);
                        d->bytes += (uint64_t)n;
                }
                free(buf);
                if (n <= 0) {
                        if (reset_data(d, "the partial file is shorter than its checkpoint") < 0) {
                                finish(d, -EIO, false, "cannot truncate '%s'", d->path);
                                return 0;
                        }
                        d->resume_from = 0;
                }
                if (d->bytes < d->resume_from)
                        return 0;
        }
        sd_event_source_set_enabled(d->rehash_source, SD_EVENT_OFF);
        if (d->bytes > 0) {
                char sha[65];

                hex_digest(d->md, sha);
                if (!d->want_prefix || !streq(sha, d->want_prefix)) {
                        if (reset_data(d, "the partial file no longer matches its checkpointed SHA-256") < 0) {
                                finish(d, -EIO, false, "cannot truncate '%s'", d->path);
                                return 0;
                        }
                } else if (lseek(d->fd, (off_t)d->bytes, SEEK_SET) < 0) {
                        finish(d, -errno, false, "cannot seek in '%s': %m", d->path);
                        return 0;
                }
                d->last_checkpoint = d->bytes;
        }
        start_transfer(d);
        return 0;
}

int ota_coap_download_start(sd_event *event, Conn *conn, const OtaCoapDownloadParams *p,
                            const OtaDownloadHooks *hooks, OtaCoapDownload **ret) {
        _cleanup_(ota_coap_download_freep) OtaCoapDownload *d = calloc(1, sizeof(OtaCoapDownload));
        struct stat st;
        int r;

        if (!d)
                return -ENOMEM;
        d->fd = -1;
        d->event = sd_event_ref(event);
        d->conn = conn;
        d->hooks = *hooks;
        d->size = p->size;
        d->timeout_ms = p->timeout_ms;
        for (unsigned i = 0; i < WINDOW; i++)
                d->slots[i].d = d;
        d->sha256 = strdup(p->sha256);
        d->path = strdup(p->path);
        d->want_prefix = p->prefix_sha256 ? strdup(p->prefix_sha256) : NULL;
        d->checkpoint_etag = p->etag ? strdup(p->etag) : NULL;
        d->md = EVP_MD_CTX_new();
        if (!d->sha256 || !d->path || (p->prefix_sha256 && !d->want_prefix) || (p->etag && !d->checkpoint_etag) ||
            !d->md || EVP_DigestInit_ex(d->md, EVP_sha256(), NULL) != 1)
                return -ENOMEM;
        d->fd = open(p->path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0640);
        if (d->fd < 0 || fstat(d->fd, &st) < 0)
                return -errno;
        /* Keep the checkpointed prefix only, and only at a block boundary
         * (checkpoints are: blocks are multiples of 1024 bytes). */
        d->resume_from = (uint64_t)st.st_size >= p->offset ? p->offset : 0;
        if (d->resume_from > p->size || d->resume_from % 1024 != 0)
                d->resume_from = 0;
        if (ftruncate(d->fd, (off_t)d->resume_from) < 0)
                return -errno;
        r = sd_event_add_defer(event, &d->finish_source, on_finish, d);
        if (r >= 0)
                r = sd_event_source_set_enabled(d->finish_source, SD_EVENT_OFF);
        if (r >= 0)
                r = sd_event_add_time(event, &d->hold_timer, CLOCK_MONOTONIC, 0, 0, on_hold, d);
        if (r >= 0)
                r = sd_event_source_set_enabled(d->hold_timer, SD_EVENT_OFF);
        if (r >= 0)
                r = sd_event_add_defer(event, &d->rehash_source, on_rehash, d);
        if (r < 0)
                return r;
        sd_event_source_set_priority(d->rehash_source, SD_EVENT_PRIORITY_IDLE);
        sd_event_source_set_enabled(d->rehash_source, SD_EVENT_ON);
        d->phase = PHASE_REHASH;
        *ret = TAKE_PTR(d);
        return 0;
}

const OtaCoapDownloadStats *ota_coap_download_stats(const OtaCoapDownload *d) {
        return &d->stats;
}

OtaCoapDownload *ota_coap_download_free(OtaCoapDownload *d) {
        if (!d)
                return NULL;
        d->phase = PHASE_DONE;
        sd_event_source_disable_unref(d->finish_source);
        sd_event_source_disable_unref(d->rehash_source);
        sd_event_source_disable_unref(d->hold_timer);
        d->finish_source = d->rehash_source = d->hold_timer = NULL;
        if (d->fd >= 0)
                close(d->fd);
        d->fd = -1;
        for (unsigned i = 0; i < WINDOW; i++)
                slot_clear(&d->slots[i]);
        EVP_MD_CTX_free(d->md);
        free(d->sha256);
        free(d->path);
        free(d->want_prefix);
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
