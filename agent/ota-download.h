/* SPDX-License-Identifier: Apache-2.0 */
/* One OTA artifact download with libcurl's multi interface on the agent's
 * sd-event loop: HTTPS only, the configured CA only, the device
 * certificate presented, resumable. Nothing here blocks the loop for
 * long: data is hashed as it arrives, a resumed prefix is re-hashed in
 * 1 MiB steps from a defer source.
 *
 * Resuming: the caller gives the offset and SHA-256 of the prefix it
 * checkpointed earlier. The file is cut to that offset and the prefix
 * re-hashed; if it no longer matches, the download starts over. Then the
 * request asks for "Range: bytes=OFFSET-" with "If-Range: ETAG": a 206
 * continues, a 200 (the server ignored the range, or the ETag changed)
 * starts over with that response, a 416 means the file was complete
 * already (checked by size) or is restarted from zero. */
#pragma once

#include <stdbool.h>
#include <stdint.h>
#include <systemd/sd-event.h>

typedef struct OtaDownload OtaDownload;

typedef struct OtaDownloadParams {
        const char *url;
        const char *path;           /* the partial file (created) */
        uint64_t size;              /* what the manifest says */
        uint64_t offset;            /* checkpointed prefix ... */
        const char *prefix_sha256;  /* ... and its SHA-256 (hex), or "" */
        const char *etag;           /* ETag seen when the prefix was fetched, or NULL */
        const char *ca_file;        /* the only CA trusted */
        const char *cert_file;      /* client certificate */
        const char *key_file;
        unsigned low_speed_bytes;   /* slower than this ... */
        uint64_t low_speed_ms;      /* ... for this long: give up (and retry) */
} OtaDownloadParams;

typedef struct OtaDownloadHooks {
        void *userdata;
        /* Bytes in the file so far (called often; keep it cheap). */
        void (*progress)(void *userdata, uint64_t bytes);
        /* A durable prefix: the file is synced up to offset. */
        void (*checkpoint)(void *userdata, uint64_t offset, const char *sha256, const char *etag);
        /* The data on disk was thrown away and the download starts from
         * byte 0 (why: a static text). */
        void (*restarted)(void *userdata, const char *why);
        /* The end. error 0: the whole file is there, sha256 is its hash.
         * Otherwise a negative errno and a human text; restart: the data
         * on disk is worthless, start from zero next time. The download
         * may be freed from within. */
        void (*done)(void *userdata, int error, const char *sha256, const char *text, bool restart);
} OtaDownloadHooks;

int ota_download_start(sd_event *event, const OtaDownloadParams *p, const OtaDownloadHooks *hooks,
                       OtaDownload **ret);
OtaDownload *ota_download_free(OtaDownload *d);
static inline void ota_download_freep(OtaDownload **d) {
        ota_download_free(*d);
}
