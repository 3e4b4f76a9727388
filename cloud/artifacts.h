/* SPDX-License-Identifier: Apache-2.0 */
/* OTA artifacts shared by the nodes of a cluster (artifacts.c, prefix
 * artifacts_; docs/cluster.md, "OTA"): an artifact uploaded to one node is
 * published into the JetStream stream TETHER_ARTIFACTS, and every node
 * that hosts artifacts ([OTA] ArtifactDirectory=) assembles it from there
 * into its own directory, so that any node serves every artifact.
 *
 * In the stream, an artifact of SIZE bytes is CHUNKS messages of at most
 * ARTIFACTS_CHUNK_MAX bytes on subject tether.artifact.<sha256> (headers
 * Nats-Msg-Id "<sha256>:<index>", Tether-Artifact-Chunk "<index>",
 * Tether-Node), then one message on tether.artifact.<sha256>.end
 * (Nats-Msg-Id "<sha256>:end") whose JSON body is
 * {"sha256","size","chunks","seqs":[stream sequence of each chunk]},
 * published once every chunk was acknowledged: an artifact is complete in
 * the stream exactly when its end message is there.
 *
 * Each node follows the end messages only (an ordered consumer, small
 * messages) and fetches the chunks one at a time, each with an
 * asynchronous request to JetStream's API (the loop never waits for
 * NATS), writing them to a temporary file in the directory while hashing:
 * memory stays bounded by one chunk whatever the artifact's size. The
 * file is renamed to SHA256.deb after its size and SHA-256 matched and it
 * was fsync'd (and the directory after the rename); an incomplete or
 * corrupt one, or one whose chunks left the stream, is removed with a
 * warning, and one larger than the node's own upload limit is not
 * fetched. What fails for a reason that may pass (NATS unreachable or
 * without a quorum, too little free space in the directory for the whole
 * artifact, a write or fsync failing) is tried again from its start or
 * its last chunk, with a backoff of 1 s doubling up to 60 s; artifacts
 * announced later wait behind it. The stream sequence of the last end
 * message handled is kept in ArtifactDirectory/.cluster-artifacts, never
 * past an artifact that is still to be stored, so a restart goes on from
 * there.
 *
 * Used from the loop's thread only. Errors are negative errno values;
 * ret_* parameters are untouched on failure. */
#pragma once

#include <stdint.h>
#include <systemd/sd-event.h>

#include "bus.h"

#define ARTIFACTS_STREAM "TETHER_ARTIFACTS"
#define ARTIFACTS_CHUNK_MAX (256 * 1024)

typedef struct Artifacts Artifacts;
typedef struct ArtifactPublish ArtifactPublish;

/* Create (or update) the stream: file storage, replicas copies, at most
 * max_bytes (the oldest messages go first; UINT64_MAX: no limit of its
 * own), then follow it into dir, storing artifacts of at most
 * max_artifact_bytes ([OTA] MaxArtifactMB=; larger ones are logged and
 * not stored).
 * Synchronous. event and bus are borrowed and must outlive the Artifacts;
 * dir and node are copied. Logs what failed. */
int artifacts_new(sd_event *event, Bus *bus, const char *dir, const char *node, unsigned replicas,
                  uint64_t max_bytes, uint64_t max_artifact_bytes, Artifacts **ret);
/* Stop following; uploads being published are cancelled (their
 * callbacks do not run). NULL is fine. */
Artifacts *artifacts_free(Artifacts *a);
static inline void artifacts_freep(Artifacts **a) { artifacts_free(*a); }

/* Publish the artifact of size bytes read from fd (borrowed until fn ran
 * or the publish was cancelled), whose SHA-256 (lowercase hex) was
 * checked by the caller. fn runs once, later, on the loop: 0 once the
 * stream acknowledged every chunk and the end message (stored on
 * Replicas servers), or an error (-ETIMEDOUT, -ENOTCONN, ...). *ret (may
 * be NULL) cancels. */
typedef void (*artifacts_done_fn)(void *userdata, int error);
int artifacts_publish(Artifacts *a, const char *sha256, int fd, uint64_t size, artifacts_done_fn fn, void *userdata,
                      ArtifactPublish **ret);
/* fn will not run. NULL is fine. */
void artifacts_publish_cancel(ArtifactPublish *p);
