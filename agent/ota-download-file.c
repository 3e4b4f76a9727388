/* SPDX-License-Identifier: Apache-2.0 */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ota-download-file.h"

#define REHASH_CHUNK (1u << 20)

void ota_download_file_digest(OtaDownloadFile *f, char out[static 65]) {
        EVP_MD_CTX *copy = EVP_MD_CTX_new();
        uint8_t d[32];
        unsigned n = sizeof(d);

        out[0] = 0;
        if (!copy || EVP_MD_CTX_copy_ex(copy, f->md) != 1 || EVP_DigestFinal_ex(copy, d, &n) != 1) {
                EVP_MD_CTX_free(copy);
                return;
        }
        EVP_MD_CTX_free(copy);
        hex_encode(d, 32, out);
}

int ota_download_file_reset(OtaDownloadFile *f, const char *why) {
        if (ftruncate(f->fd, 0) < 0 || lseek(f->fd, 0, SEEK_SET) < 0)
                return -errno;
        if (EVP_DigestInit_ex(f->md, EVP_sha256(), NULL) != 1)
                return -EIO;
        f->bytes = f->last_checkpoint = 0;
        if (f->hooks.restarted)
                f->hooks.restarted(f->hooks.userdata, why);
        return 0;
}

int ota_download_file_append(OtaDownloadFile *f, const void *buf, size_t len) {
        const uint8_t *p = buf;

        while (len > 0) {
                ssize_t w = write(f->fd, p, len);

                if (w < 0 && errno == EINTR)
                        continue;
                if (w < 0)
                        return -errno;
                EVP_DigestUpdate(f->md, p, (size_t)w);
                f->bytes += (uint64_t)w;
                p += w;
                len -= (size_t)w;
        }
        return 0;
}

void ota_download_file_checkpoint(OtaDownloadFile *f, const char *etag) {
        char sha[65];

        if (f->bytes == f->last_checkpoint)
                return;
        if (fdatasync(f->fd) < 0)
                return;
        ota_download_file_digest(f, sha);
        f->last_checkpoint = f->bytes;
        if (f->hooks.checkpoint)
                f->hooks.checkpoint(f->hooks.userdata, f->bytes, sha, etag);
}

void ota_download_file_finish(OtaDownloadFile *f, int error, bool restart, const char *fmt, ...) {
        va_list ap;

        if (f->phase == OTA_DOWNLOAD_DONE)
                return;
        f->phase = OTA_DOWNLOAD_DONE;
        f->error = error;
        f->restart = restart;
        va_start(ap, fmt);
        vsnprintf(f->text, sizeof(f->text), fmt, ap);
        va_end(ap);
        sd_event_source_set_enabled(f->rehash_source, SD_EVENT_OFF);
        if (f->ops.ended)
                f->ops.ended(f->ops.userdata);
        sd_event_source_set_enabled(f->finish_source, SD_EVENT_ONESHOT);
}

static int on_finish(sd_event_source *s, void *userdata) {
        OtaDownloadFile *f = userdata;
        char sha[65] = "";

        if (f->error == 0)
                ota_download_file_digest(f, sha);
        /* may free us */
        f->hooks.done(f->hooks.userdata, f->error, sha, f->text, f->restart);
        return 0;
}

/* Re-hash the kept prefix, 1 MiB per loop iteration. */
static int on_rehash(sd_event_source *s, void *userdata) {
        OtaDownloadFile *f = userdata;
        bool mismatch = false;
        uint8_t *buf;
        uint64_t want;
        ssize_t n;

        if (f->phase != OTA_DOWNLOAD_REHASH)
                return 0;
        want = f->resume_from - f->bytes;
        if (want > REHASH_CHUNK)
                want = REHASH_CHUNK;
        if (want > 0) {
                buf = malloc(REHASH_CHUNK);
                if (!buf) {
                        ota_download_file_finish(f, -ENOMEM, false, "out of memory");
                        return 0;
                }
                n = pread(f->fd, buf, (size_t)want, (off_t)f->bytes);
                if (n > 0) {
                        EVP_DigestUpdate(f->md, buf, (size_t)n);
                        f->bytes += (uint64_t)n;
                }
                free(buf);
                if (n <= 0) {
                        /* shorter than the checkpoint: start over */
                        if (ota_download_file_reset(f, "the partial file is shorter than its checkpoint") < 0) {
                                ota_download_file_finish(f, -EIO, false, "cannot truncate '%s'", f->path);
                                return 0;
                        }
                        f->resume_from = 0;
                }
                if (f->bytes < f->resume_from)
                        return 0; /* more next time round */
        }
        sd_event_source_set_enabled(f->rehash_source, SD_EVENT_OFF);
        if (f->bytes > 0) {
                char sha[65];

                ota_download_file_digest(f, sha);
                if (!f->want_prefix || !streq(sha, f->want_prefix)) {
                        /* The kept data is not what we checkpointed. */
                        if (ota_download_file_reset(f, "the partial file no longer matches its checkpointed SHA-256") <
                            0) {
                                ota_download_file_finish(f, -EIO, false, "cannot truncate '%s'", f->path);
                                return 0;
                        }
                        mismatch = true;
                } else if (lseek(f->fd, (off_t)f->bytes, SEEK_SET) < 0) {
                        ota_download_file_finish(f, -errno, false, "cannot seek in '%s': %m", f->path);
                        return 0;
                }
                f->last_checkpoint = f->bytes;
        }
        f->phase = OTA_DOWNLOAD_TRANSFER;
        f->ops.rehashed(f->ops.userdata, mismatch);
        return 0;
}

int ota_download_file_new(sd_event *event, const char *path, uint64_t size, uint64_t offset, const char *prefix_sha256,
                          uint64_t align, const OtaDownloadHooks *hooks, const OtaDownloadFileOps *ops,
                          OtaDownloadFile **ret) {
        _cleanup_(ota_download_file_freep) OtaDownloadFile *f = calloc(1, sizeof(OtaDownloadFile));
        struct stat st;
        int r;

        if (!f)
                return -ENOMEM;
        f->fd = -1;
        f->hooks = *hooks;
        f->ops = *ops;
        f->size = size;
        f->path = strdup(path);
        f->want_prefix = prefix_sha256 ? strdup(prefix_sha256) : NULL;
        f->md = EVP_MD_CTX_new();
        if (!f->path || (prefix_sha256 && !f->want_prefix) || !f->md ||
            EVP_DigestInit_ex(f->md, EVP_sha256(), NULL) != 1)
                return -ENOMEM;
        f->fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0640);
        if (f->fd < 0 || fstat(f->fd, &st) < 0)
                return -errno;
        /* Keep the checkpointed prefix only; what came after it is unknown. */
        f->resume_from = (uint64_t)st.st_size >= offset ? offset : 0;
        if (f->resume_from > size || (align > 1 && f->resume_from % align != 0))
                f->resume_from = 0;
        if (ftruncate(f->fd, (off_t)f->resume_from) < 0)
                return -errno;
        r = sd_event_add_defer(event, &f->finish_source, on_finish, f);
        if (r >= 0)
                r = sd_event_source_set_enabled(f->finish_source, SD_EVENT_OFF);
        if (r >= 0)
                r = sd_event_add_defer(event, &f->rehash_source, on_rehash, f);
        if (r < 0)
                return r;
        /* Network and timers first; hashing when the loop is otherwise
         * idle, 1 MiB per iteration until done (defers are one-shot by
         * default). */
        sd_event_source_set_priority(f->rehash_source, SD_EVENT_PRIORITY_IDLE);
        sd_event_source_set_enabled(f->rehash_source, SD_EVENT_ON);
        f->phase = OTA_DOWNLOAD_REHASH;
        *ret = TAKE_PTR(f);
        return 0;
}

OtaDownloadFile *ota_download_file_free(OtaDownloadFile *f) {
        if (!f)
                return NULL;
        sd_event_source_disable_unref(f->finish_source);
        sd_event_source_disable_unref(f->rehash_source);
        if (f->fd >= 0)
                close(f->fd);
        EVP_MD_CTX_free(f->md);
        free(f->path);
        free(f->want_prefix);
        free(f);
        return NULL;
}
