/* SPDX-License-Identifier: Apache-2.0 */
/* The file and hash side of one resumable OTA download, shared by its two
 * transports (ota-download.c: HTTPS; ota-download-coap.c: Block2 over the
 * connection): the partial file, the SHA-256 of [0, bytes), checkpoints,
 * the re-hash of a kept prefix and the end of the download.
 *
 * On creation the file is opened (created 0640, O_NOFOLLOW) and cut to
 * the checkpointed offset (to 0 if the file is shorter, the offset lies
 * beyond the size or off the transport's alignment). The prefix is then
 * re-hashed in 1 MiB steps from a defer source at idle priority (network
 * and timers first); if it is shorter than the checkpoint or its SHA-256
 * is not the checkpointed one, it is thrown away (restarted()). Then the
 * phase becomes TRANSFER and the transport's rehashed() starts the
 * transfer at `bytes`.
 *
 * ota_download_file_finish() ends it: once only (later calls are
 * ignored), done() runs from a defer source, never inside a transport's
 * callback. Runs on the loop; never blocks it for long. */
#pragma once

#include <openssl/evp.h>
#include <stdbool.h>
#include <stdint.h>
#include <systemd/sd-event.h>

#include "ota-download.h"
#include "util.h"

/* done()'s text: room for a libcurl error (CURL_ERROR_SIZE) and ours. */
#define OTA_DOWNLOAD_TEXT_MAX (256 + 128)

typedef enum OtaDownloadPhase {
        OTA_DOWNLOAD_REHASH,
        OTA_DOWNLOAD_TRANSFER,
        OTA_DOWNLOAD_DONE,
} OtaDownloadPhase;

/* What the transport does at the file's turns. */
typedef struct OtaDownloadFileOps {
        void *userdata;
        /* The prefix is checked (mismatch: it did not match its SHA-256 and
         * was thrown away); the phase is TRANSFER: start at bytes. */
        void (*rehashed)(void *userdata, bool mismatch);
        /* finish() was called (first time only): stop the transport's own
         * sources. Optional. */
        void (*ended)(void *userdata);
} OtaDownloadFileOps;

/* Read-only to the transports, except through the functions below. */
typedef struct OtaDownloadFile {
        OtaDownloadHooks hooks; /* the caller's */
        OtaDownloadFileOps ops;
        char *path;
        uint64_t size; /* what the manifest says */
        int fd;
        EVP_MD_CTX *md;  /* hash of [0, bytes) */
        uint64_t bytes;  /* in the file and in md */
        uint64_t resume_from;
        uint64_t last_checkpoint;
        char *want_prefix;
        OtaDownloadPhase phase;
        sd_event_source *rehash_source, *finish_source;

        /* the outcome, delivered from the finish source */
        int error;
        char text[OTA_DOWNLOAD_TEXT_MAX];
        bool restart;
} OtaDownloadFile;

/* align: the kept prefix must be a multiple of it (1: any). */
int ota_download_file_new(sd_event *event, const char *path, uint64_t size, uint64_t offset, const char *prefix_sha256,
                          uint64_t align, const OtaDownloadHooks *hooks, const OtaDownloadFileOps *ops,
                          OtaDownloadFile **ret);
/* Closes the file; no hook runs afterwards. NULL is fine. */
OtaDownloadFile *ota_download_file_free(OtaDownloadFile *f);
static inline void ota_download_file_freep(OtaDownloadFile **f) {
        ota_download_file_free(*f);
}

/* The SHA-256 of [0, bytes) as hex ("" if OpenSSL fails). */
void ota_download_file_digest(OtaDownloadFile *f, char out[static 65]);
/* Forget the data: empty file, empty hash; restarted(why). */
int ota_download_file_reset(OtaDownloadFile *f, const char *why);
/* Appends at bytes and hashes it; -errno from write(). */
int ota_download_file_append(OtaDownloadFile *f, const void *buf, size_t len);
/* A durable prefix: fdatasync(), then checkpoint(bytes, sha256, etag).
 * Nothing if nothing is new since the last one or the sync fails. */
void ota_download_file_checkpoint(OtaDownloadFile *f, const char *etag);
void ota_download_file_finish(OtaDownloadFile *f, int error, bool restart, const char *fmt, ...) _printf_(4, 5);
