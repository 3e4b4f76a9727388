/* SPDX-License-Identifier: Apache-2.0 */
/* One OTA artifact download over the agent's own connection to the cloud
 * (docs/protocol.md, "Artifacts"): GET /a/SHA256 with Block2 (BERT when
 * the cloud's CSM allows it), a small window of block requests in flight,
 * through the Conn (conn_request_block2()). The same hooks and the same
 * resume rules as the HTTPS download (ota-download.h): data hashed as it
 * arrives, a checkpoint (offset, SHA-256 of the prefix, ETag as hex)
 * every 4 MiB, a resumed prefix re-hashed in 1 MiB steps from a defer
 * source, then blocks from the checkpoint's offset on; a first answer
 * whose ETag is not the checkpoint's starts from byte 0.
 *
 * Errors given to done(): -ENOTCONN (the connection went), -ETIMEDOUT (no
 * answer in time), -EPROTO (a malformed answer: a short or misplaced
 * block, no Size2), -ESTALE (the ETag changed during the download;
 * restart), -EFBIG (Size2 is not the manifest's size, or more data than
 * it says: the caller rejects the job, "size"), -EPERM (the cloud refused:
 * 4.03, 4.04; retrying cannot help). A 5.03 is waited out (its Max-Age)
 * and the block asked for again.
 *
 * Runs on the agent's loop; never blocks it. */
#pragma once

#include <stdint.h>
#include <systemd/sd-event.h>

#include "conn.h"
#include "ota-download.h"

typedef struct OtaCoapDownload OtaCoapDownload;

typedef struct OtaCoapDownloadParams {
        const char *sha256;        /* the artifact (64 lowercase hex digits) */
        const char *path;          /* the partial file (created) */
        uint64_t size;             /* what the manifest says */
        uint64_t offset;           /* checkpointed prefix ... */
        const char *prefix_sha256; /* ... and its SHA-256 (hex), or "" */
        const char *etag;          /* ETag (hex) seen when the prefix was fetched, or NULL */
        uint64_t timeout_ms;       /* for each block's answer */
} OtaCoapDownloadParams;

/* Counters of one download (logged by the caller). */
typedef struct OtaCoapDownloadStats {
        uint64_t requests;  /* block requests sent */
        uint64_t fetched;   /* payload bytes received */
        uint64_t resumed;   /* the offset the transfer started at */
        unsigned block;     /* bytes per block (the last may be shorter) */
} OtaCoapDownloadStats;

/* conn is borrowed and must outlive the download's requests (conn_free()
 * answers those still out). The connection need not be up yet: blocks
 * are asked for once the prefix is re-hashed; if it is not connected
 * then, done() gets -ENOTCONN. */
int ota_coap_download_start(sd_event *event, Conn *conn, const OtaCoapDownloadParams *p,
                            const OtaDownloadHooks *hooks, OtaCoapDownload **ret);
/* Stops it; hooks are not called again. Requests still out are answered
 * later into a husk that frees itself. NULL is fine. */
OtaCoapDownload *ota_coap_download_free(OtaCoapDownload *d);
static inline void ota_coap_download_freep(OtaCoapDownload **d) {
        ota_coap_download_free(*d);
}
const OtaCoapDownloadStats *ota_coap_download_stats(const OtaCoapDownload *d);
