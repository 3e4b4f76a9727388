/* SPDX-License-Identifier: Apache-2.0 */
/* OTA artifacts through the stream TETHER_ARTIFACTS (artifacts.h). */
#include "config.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <jansson.h>
#include <limits.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "artifacts.h"
#include "log.h"
#include "manifest.h"
#include "util.h"

#define USEC_PER_SEC 1000000ULL
#define NSEC_PER_SEC 1000000000LL
#define ARTIFACTS_SUBJECT "tether.artifact."
/* Chunks in flight at once while publishing (memory: one chunk is read,
 * handed to libnats, which copies it, and freed). */
#define ARTIFACTS_WINDOW 4
#define ARTIFACTS_ACK_TIMEOUT_USEC (30 * USEC_PER_SEC)
/* Largest artifact the end message may announce: 64 GiB (262144 chunks,
 * whose sequences fit in NATS's default max_payload as JSON). */
#define ARTIFACTS_CHUNKS_MAX 262144
#define ARTIFACTS_END_MAX (4 * 1024 * 1024)
#define ARTIFACTS_STATE_FILE ".cluster-artifacts"
#define ARTIFACTS_TMP_PREFIX ".sync-"
/* A chunk is fetched with a request to JetStream's API (the stream's
 * leader answers), not with js_GetMsg(): the loop never waits for it. */
#define ARTIFACTS_GET_SUBJECT "$JS.API.STREAM.MSG.GET." ARTIFACTS_STREAM
#define ARTIFACTS_GET_TIMEOUT_USEC (5 * USEC_PER_SEC)
/* JetStream's error code for "no message found". */
#define ARTIFACTS_JS_NO_MESSAGE 10037
/* The backoff of an artifact that could not be fetched or stored for now. */
#define ARTIFACTS_RETRY_MIN_USEC USEC_PER_SEC
#define ARTIFACTS_RETRY_MAX_USEC (60 * USEC_PER_SEC)
/* work_step(): a chunk is being fetched, work_chunk_cb() goes on. */
#define WORK_WAITING 2

typedef struct Slot {
        ArtifactPublish *p;
        BusRequest *req;
        unsigned chunk;
} Slot;

struct ArtifactPublish {
        Artifacts *a;
        ArtifactPublish *prev, *next;
        char sha[65];
        int fd;
        uint64_t size;
        unsigned n_chunks, next_chunk, acked;
        uint64_t *seqs;
        Slot slots[ARTIFACTS_WINDOW];
        BusRequest *end_req;
        artifacts_done_fn fn;
        void *userdata;
};

/* An artifact to assemble from the stream. */
typedef struct Work {
        struct Work *next;
        char sha[65];
        uint64_t size, end_seq;
        unsigned n_chunks, next_chunk;
        uint64_t *seqs;
        uint64_t written;
        int fd;
        char *tmp_path;
        EVP_MD_CTX *md;
} Work;

struct Artifacts {
        sd_event *event;
        Bus *bus;
        char *dir, *node;
        int64_t stream_created_ns;
        uint64_t done_seq; /* every end message up to this sequence is handled */
        uint64_t max_artifact; /* bytes; larger artifacts are not stored */
        BusSub *follow;
        sd_event_source *work_defer, *retry;
        Work *work, *work_tail;
        BusRequest *get;     /* the head's chunk being fetched */
        uint64_t retry_usec; /* the head's backoff; 0: it did not fail */
        ArtifactPublish *publishes;
};

/* ---- the position across restarts ----------------------------------------- */

static void artifacts_load_position(Artifacts *a) {
        _cleanup_free_ char *path = NULL;
        _cleanup_fclose_ FILE *f = NULL;
        long long created = 0;
        unsigned long long seq = 0;

        if (asprintf(&path, "%s/" ARTIFACTS_STATE_FILE, a->dir) < 0) {
                path = NULL;
                return;
        }
        f = fopen(path, "re");
        if (f && fscanf(f, "%lld %llu", &created, &seq) == 2 && created == a->stream_created_ns)
                a->done_seq = seq;
}

/* Best effort: a position lost means handling end messages again, which
 * finds their artifacts there already. */
static void artifacts_save_position(Artifacts *a, uint64_t seq) {
        _cleanup_free_ char *path = NULL, *tmp = NULL;
        _cleanup_fclose_ FILE *f = NULL;

        if (seq <= a->done_seq)
                return;
        a->done_seq = seq;
        if (asprintf(&path, "%s/" ARTIFACTS_STATE_FILE, a->dir) < 0 ||
            asprintf(&tmp, "%s/" ARTIFACTS_STATE_FILE ".tmp", a->dir) < 0)
                return;
        f = fopen(tmp, "we");
        if (!f)
                return;
        fprintf(f, "%lld %" PRIu64 "\n", (long long)a->stream_created_ns, seq);
        if (fflush(f) != 0 || fsync(fileno(f)) < 0 || rename(tmp, path) < 0)
                log_debug("Cannot record the artifact stream's position in '%s': %m", path);
}

/* Temporary files of assemblies a stopped node left behind. */
static void artifacts_remove_temporaries(Artifacts *a) {
        DIR *dir = opendir(a->dir);
        struct dirent *de;

        if (!dir)
                return;
        while ((de = readdir(dir)))
                if (startswith(de->d_name, ARTIFACTS_TMP_PREFIX))
                        (void)unlinkat(dirfd(dir), de->d_name, 0);
        closedir(dir);
}

static int artifact_final_path(Artifacts *a, const char *sha, char **ret) {
        return asprintf(ret, "%s/%s.deb", a->dir, sha) < 0 ? -ENOMEM : 0;
}

static bool artifact_present(Artifacts *a, const char *sha) {
        _cleanup_free_ char *path = NULL;
        struct stat st;

        return artifact_final_path(a, sha, &path) == 0 && stat(path, &st) == 0;
}

/* ---- assembling ------------------------------------------------------------- */

/* Back to nothing written: the temporary file removed. */
static void work_reset(Work *w) {
        if (w->fd >= 0)
                close(w->fd);
        w->fd = -1;
        if (w->tmp_path) {
                (void)unlink(w->tmp_path);
                free(w->tmp_path);
                w->tmp_path = NULL;
        }
        EVP_MD_CTX_free(w->md);
        w->md = NULL;
        w->next_chunk = 0;
        w->written = 0;
}

static void work_free(Work *w) {
        if (!w)
                return;
        work_reset(w);
        free(w->seqs);
        free(w);
}

/* The head of the queue is done (assembled, or discarded). */
static void work_pop(Artifacts *a) {
        Work *w = a->work;

        a->work = w->next;
        if (!a->work)
                a->work_tail = NULL;
        artifacts_save_position(a, w->end_seq);
        work_free(w);
}

/* -EBADMSG: what the stream has is wrong (discard it); another error is
 * local (the disk): the work is reset, to be tried again. */
static int work_finish(Artifacts *a, Work *w) {
        _cleanup_free_ char *final = NULL;
        _cleanup_close_ int dfd = -1;
        uint8_t md[32];
        unsigned mdlen = sizeof(md);
        char hex[65];
        int r;

        if (w->written != w->size) {
                log_warning("OTA artifact %s from the cluster has %" PRIu64 " bytes, not %" PRIu64 ": discarded.",
                            w->sha, w->written, w->size);
                return -EBADMSG;
        }
        if (EVP_DigestFinal_ex(w->md, md, &mdlen) != 1) {
                work_reset(w);
                return -ENOMEM;
        }
        hex_encode(md, 32, hex);
        if (!streq(hex, w->sha)) {
                log_warning("OTA artifact %s from the cluster has the SHA-256 %s: discarded.", w->sha, hex);
                return -EBADMSG;
        }
        if (artifact_final_path(a, w->sha, &final) < 0) {
                work_reset(w);
                return -ENOMEM;
        }
        if (fsync(w->fd) < 0 || rename(w->tmp_path, final) < 0) {
                r = log_warning_errno(errno, "Cannot store OTA artifact '%s' from the cluster: %m", final);
                work_reset(w);
                return r;
        }
        free(w->tmp_path);
        w->tmp_path = NULL;
        dfd = open(a->dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dfd >= 0)
                (void)fsync(dfd);
        log_info("Stored OTA artifact %s (%" PRIu64 " bytes) from the cluster.", w->sha, w->size);
        return 0;
}

/* The temporary file of an artifact about to be assembled, if the
 * directory has room for it. 1: it is here already. */
static int work_open(Artifacts *a, Work *w) {
        struct statvfs sv;
        int r;

        if (artifact_present(a, w->sha))
                return 1; /* uploaded here, or assembled before */
        if (statvfs(a->dir, &sv) < 0)
                return log_warning_errno(errno, "Cannot read the free space of '%s': %m", a->dir);
        if ((uint64_t)sv.f_bavail * sv.f_frsize < w->size) {
                if (a->retry_usec == 0)
                        log_warning("OTA artifact %s from the cluster has %" PRIu64 " bytes; '%s' has %" PRIu64
                                    " bytes free.",
                                    w->sha, w->size, a->dir, (uint64_t)sv.f_bavail * sv.f_frsize);
                return -ENOSPC;
        }
        if (asprintf(&w->tmp_path, "%s/" ARTIFACTS_TMP_PREFIX "%s-XXXXXX", a->dir, w->sha) < 0) {
                w->tmp_path = NULL;
                return -ENOMEM;
        }
        w->fd = mkostemp(w->tmp_path, O_CLOEXEC);
        if (w->fd < 0) {
                r = log_warning_errno(errno, "Cannot create '%s': %m", w->tmp_path);
                free(w->tmp_path);
                w->tmp_path = NULL;
                return r;
        }
        (void)fchmod(w->fd, 0644);
        w->md = EVP_MD_CTX_new();
        if (!w->md || EVP_DigestInit_ex(w->md, EVP_sha256(), NULL) != 1) {
                work_reset(w);
                return -ENOMEM;
        }
        return 0;
}

static void work_chunk_cb(void *userdata, int error, natsMsg *reply);

/* The next step of the head of the queue: 1 done, WORK_WAITING (a chunk
 * is being fetched), or an error as work_result() takes it. */
static int work_step(Artifacts *a, Work *w) {
        char body[64];
        int r;

        if (w->next_chunk == 0 && !w->tmp_path) {
                r = work_open(a, w);
                if (r != 0)
                        return r;
        }
        if (w->next_chunk == w->n_chunks) {
                r = work_finish(a, w);
                return r < 0 ? r : 1;
        }
        snprintf(body, sizeof(body), "{\"seq\":%" PRIu64 "}", w->seqs[w->next_chunk]);
        r = bus_request(a->bus, ARTIFACTS_GET_SUBJECT, NULL, body, strlen(body), ARTIFACTS_GET_TIMEOUT_USEC,
                        work_chunk_cb, a, &a->get);
        return r < 0 ? r : WORK_WAITING;
}

/* Standard base64 with padding (Go's encoding of []byte in JSON); *ret is
 * the caller's. */
static int base64_decode(const char *in, size_t len, uint8_t **ret, size_t *ret_len) {
        EVP_ENCODE_CTX *ctx;
        uint8_t *out;
        int n = 0, m = 0;

        if (len > INT_MAX / 2)
                return -EBADMSG;
        out = malloc(len / 4 * 3 + 4);
        ctx = EVP_ENCODE_CTX_new();
        if (!out || !ctx) {
                free(out);
                EVP_ENCODE_CTX_free(ctx);
                return -ENOMEM;
        }
        EVP_DecodeInit(ctx);
        if (EVP_DecodeUpdate(ctx, out, &n, (const unsigned char *)in, (int)len) < 0 ||
            EVP_DecodeFinal(ctx, out + n, &m) != 1) {
                free(out);
                EVP_ENCODE_CTX_free(ctx);
                return -EBADMSG;
        }
        EVP_ENCODE_CTX_free(ctx);
        *ret = out;
        *ret_len = (size_t)(n + m);
        return 0;
}

/* Write the chunk in reply, the answer of $JS.API.STREAM.MSG.GET:
 * {"message":{"subject","seq","hdrs","data"}} (hdrs, the message's header
 * block, and data in base64) or {"error":{"code","err_code",
 * "description"}}. -EBADMSG: the stream's message is not the chunk, or is
 * gone; -EIO: JetStream could not answer now (no leader); a local error
 * resets the work. */
static int work_chunk(Artifacts *a, Work *w, natsMsg *reply) {
        _cleanup_(json_decrefp) json_t *j = NULL;
        _cleanup_free_ uint8_t *data = NULL, *hdrs = NULL;
        char subject[sizeof(ARTIFACTS_SUBJECT) + 64], line[64];
        uint64_t seq = w->seqs[w->next_chunk];
        json_t *msg, *err;
        const char *text;
        size_t len = 0, hlen = 0;
        const uint8_t *p;
        int r;

        j = json_loadb(natsMsg_GetData(reply), (size_t)natsMsg_GetDataLength(reply), 0, NULL);
        err = json_object_get(j, "error");
        msg = json_object_get(j, "message");
        if (err) {
                if (json_integer_value(json_object_get(err, "err_code")) == ARTIFACTS_JS_NO_MESSAGE) {
                        log_warning("OTA artifact %s: chunk %u is no longer in the stream %s (its limits): "
                                    "discarded.",
                                    w->sha, w->next_chunk, ARTIFACTS_STREAM);
                        return -EBADMSG;
                }
                text = json_string_value(json_object_get(err, "description"));
                log_debug("OTA artifact %s: JetStream did not give chunk %u: %s (error %" JSON_INTEGER_FORMAT ").",
                          w->sha, w->next_chunk, text ?: "no description",
                          json_integer_value(json_object_get(err, "err_code")));
                return -EIO;
        }
        if (!json_is_object(msg)) {
                log_debug("OTA artifact %s: malformed answer of JetStream for chunk %u.", w->sha, w->next_chunk);
                return -EIO;
        }
        snprintf(subject, sizeof(subject), ARTIFACTS_SUBJECT "%s", w->sha);
        /* The header block holds the line "Tether-Artifact-Chunk: N" (a
         * header's value has no line end: only a header can match). */
        snprintf(line, sizeof(line), "\r\nTether-Artifact-Chunk: %u\r\n", w->next_chunk);
        text = json_string_value(json_object_get(msg, "hdrs"));
        r = text ? base64_decode(text, strlen(text), &hdrs, &hlen) : -EBADMSG;
        if (r == -ENOMEM)
                return r;
        text = json_string_value(json_object_get(msg, "data"));
        if (r >= 0)
                r = text && strlen(text) <= (ARTIFACTS_CHUNK_MAX + 2) / 3 * 4 + 4
                            ? base64_decode(text, strlen(text), &data, &len)
                            : -EBADMSG;
        if (r == -ENOMEM)
                return r;
        text = json_string_value(json_object_get(msg, "subject"));
        if (r < 0 || !text || !streq(text, subject) ||
            (uint64_t)json_integer_value(json_object_get(msg, "seq")) != seq ||
            !memmem(hdrs, hlen, line, strlen(line)) || len == 0 || len > ARTIFACTS_CHUNK_MAX ||
            w->written + len > w->size) {
                log_warning("OTA artifact %s: stream sequence %" PRIu64 " is not its chunk %u: discarded.", w->sha,
                            seq, w->next_chunk);
                return -EBADMSG;
        }
        for (p = data; len > 0;) {
                ssize_t n = write(w->fd, p, len);

                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0) {
                        r = log_warning_errno(errno, "Cannot write '%s': %m", w->tmp_path);
                        work_reset(w);
                        return r;
                }
                EVP_DigestUpdate(w->md, p, (size_t)n);
                w->written += (uint64_t)n;
                p += n;
                len -= (size_t)n;
        }
        w->next_chunk++;
        return 0;
}

/* What a step of the head of the queue came to: 0 a chunk written, 1
 * done, -EBADMSG discarded (the stream's data is wrong or gone), another
 * error: tried again after a backoff (NATS unreachable or without a
 * quorum, the disk full or failing), the position not past it. */
static void work_result(Artifacts *a, int r) {
        Work *w = a->work;

        if (r == WORK_WAITING)
                return;
        if (r == 0 || r == 1 || r == -EBADMSG) {
                if (r != 0)
                        work_pop(a);
                a->retry_usec = 0;
                (void)sd_event_source_set_enabled(a->work_defer, a->work ? SD_EVENT_ON : SD_EVENT_OFF);
                return;
        }
        if (a->retry_usec == 0)
                log_warning_errno(r, "OTA artifact %s from the cluster not stored yet (%m): trying again.", w->sha);
        else
                log_debug_errno(r, "OTA artifact %s from the cluster not stored yet (%m): trying again.", w->sha);
        a->retry_usec = a->retry_usec == 0                            ? ARTIFACTS_RETRY_MIN_USEC
                        : a->retry_usec * 2 > ARTIFACTS_RETRY_MAX_USEC ? ARTIFACTS_RETRY_MAX_USEC
                                                                       : a->retry_usec * 2;
        (void)sd_event_source_set_enabled(a->work_defer, SD_EVENT_OFF);
        (void)sd_event_source_set_time_relative(a->retry, a->retry_usec);
        (void)sd_event_source_set_enabled(a->retry, SD_EVENT_ONESHOT);
}

static void work_chunk_cb(void *userdata, int error, natsMsg *reply) {
        Artifacts *a = userdata;

        a->get = NULL;
        work_result(a, error < 0 ? error : work_chunk(a, a->work, reply));
}

static int work_defer_cb(sd_event_source *s, void *userdata) {
        Artifacts *a = userdata;

        (void)sd_event_source_set_enabled(s, SD_EVENT_OFF);
        if (a->work && !a->get)
                work_result(a, work_step(a, a->work));
        return 0;
}

static int retry_cb(sd_event_source *s, uint64_t usec, void *userdata) {
        Artifacts *a = userdata;

        return sd_event_source_set_enabled(a->work_defer, a->work ? SD_EVENT_ON : SD_EVENT_OFF);
}

/* An end message: queue its artifact. */
static void artifacts_end_cb(void *userdata, natsMsg *msg) {
        Artifacts *a = userdata;
        _cleanup_(json_decrefp) json_t *j = NULL;
        uint64_t seq = bus_msg_seq(msg);
        const char *sha;
        json_t *seqs, *v;
        json_int_t size, chunks;
        size_t i;
        Work *w;

        if (seq == 0 || seq <= a->done_seq)
                return;
        if (natsMsg_GetDataLength(msg) <= ARTIFACTS_END_MAX)
                j = json_loadb(natsMsg_GetData(msg), (size_t)natsMsg_GetDataLength(msg), JSON_REJECT_DUPLICATES,
                               NULL);
        sha = json_string_value(json_object_get(j, "sha256"));
        size = json_integer_value(json_object_get(j, "size"));
        chunks = json_integer_value(json_object_get(j, "chunks"));
        seqs = json_object_get(j, "seqs");
        if (!sha || !manifest_sha256_valid(sha) || size <= 0 || chunks <= 0 || chunks > ARTIFACTS_CHUNKS_MAX ||
            (uint64_t)chunks != ((uint64_t)size + ARTIFACTS_CHUNK_MAX - 1) / ARTIFACTS_CHUNK_MAX ||
            !json_is_array(seqs) || json_array_size(seqs) != (size_t)chunks) {
                log_warning("Malformed end message at sequence %" PRIu64 " of stream %s: ignored.", seq,
                            ARTIFACTS_STREAM);
                if (!a->work)
                        artifacts_save_position(a, seq);
                return;
        }
        if ((uint64_t)size > a->max_artifact) {
                log_warning("OTA artifact %s from the cluster has %" PRIu64 " bytes, more than [OTA] MaxArtifactMB= "
                            "allows here (%" PRIu64 " MiB): not stored.",
                            sha, (uint64_t)size, a->max_artifact >> 20);
                if (!a->work)
                        artifacts_save_position(a, seq);
                return;
        }
        if (artifact_present(a, sha)) {
                if (!a->work)
                        artifacts_save_position(a, seq);
                return;
        }
        w = calloc(1, sizeof(*w));
        if (w)
                w->seqs = calloc((size_t)chunks, sizeof(*w->seqs));
        if (!w || !w->seqs) {
                log_warning("Out of memory: OTA artifact %s from the cluster not stored.", sha);
                free(w);
                return;
        }
        json_array_foreach(seqs, i, v) {
                if (!json_is_integer(v) || json_integer_value(v) <= 0 || (uint64_t)json_integer_value(v) >= seq) {
                        log_warning("Malformed end message at sequence %" PRIu64 " of stream %s: ignored.", seq,
                                    ARTIFACTS_STREAM);
                        w->fd = -1;
                        work_free(w);
                        return;
                }
                w->seqs[i] = (uint64_t)json_integer_value(v);
        }
        memcpy(w->sha, sha, 65);
        w->size = (uint64_t)size;
        w->n_chunks = (unsigned)chunks;
        w->end_seq = seq;
        w->fd = -1;
        if (a->work_tail)
                a->work_tail->next = w;
        else
                a->work = w;
        a->work_tail = w;
        if (!a->get && a->retry_usec == 0)
                (void)sd_event_source_set_enabled(a->work_defer, SD_EVENT_ON);
}

/* ---- publishing ---------------------------------------------------------------- */

static void publish_free(ArtifactPublish *p) {
        Artifacts *a = p->a;

        for (unsigned i = 0; i < ARTIFACTS_WINDOW; i++)
                bus_request_cancel(p->slots[i].req);
        bus_request_cancel(p->end_req);
        if (p->prev)
                p->prev->next = p->next;
        else
                a->publishes = p->next;
        if (p->next)
                p->next->prev = p->prev;
        free(p->seqs);
        free(p);
}

static void publish_done(ArtifactPublish *p, int error) {
        artifacts_done_fn fn = p->fn;
        void *userdata = p->userdata;

        if (error < 0)
                log_warning_errno(error, "Cannot publish OTA artifact %s to the cluster: %m", p->sha);
        publish_free(p);
        fn(userdata, error);
}

static void publish_end_ack(void *userdata, int error, uint64_t seq, bool duplicate) {
        ArtifactPublish *p = userdata;

        p->end_req = NULL;
        publish_done(p, error);
}

static int publish_end(ArtifactPublish *p) {
        _cleanup_free_ char *text = NULL;
        char subject[sizeof(ARTIFACTS_SUBJECT) + 64 + 4], id[64 + 8];
        const char *headers[] = { "Nats-Msg-Id", id, "Tether-Node", p->a->node, NULL };
        json_t *j, *seqs = json_array();

        for (unsigned i = 0; seqs && i < p->n_chunks; i++)
                if (json_array_append_new(seqs, json_integer((json_int_t)p->seqs[i])) < 0) {
                        json_decref(seqs);
                        seqs = NULL;
                }
        if (!seqs)
                return -ENOMEM;
        j = json_pack("{s:s, s:I, s:I, s:o}", "sha256", p->sha, "size", (json_int_t)p->size, "chunks",
                      (json_int_t)p->n_chunks, "seqs", seqs);
        text = j ? json_dumps(j, JSON_COMPACT) : NULL;
        json_decref(j);
        if (!text)
                return -ENOMEM;
        snprintf(subject, sizeof(subject), ARTIFACTS_SUBJECT "%s.end", p->sha);
        snprintf(id, sizeof(id), "%s:end", p->sha);
        return bus_js_publish_async(p->a->bus, subject, headers, text, strlen(text), ARTIFACTS_ACK_TIMEOUT_USEC,
                                    publish_end_ack, p, &p->end_req);
}

static void publish_chunk_ack(void *userdata, int error, uint64_t seq, bool duplicate);

static int publish_chunk(ArtifactPublish *p, Slot *slot) {
        _cleanup_free_ uint8_t *buf = NULL;
        char subject[sizeof(ARTIFACTS_SUBJECT) + 64], id[64 + 16], idx[16];
        const char *headers[] = { "Nats-Msg-Id", id, "Tether-Artifact-Chunk", idx, "Tether-Node", p->a->node, NULL };
        uint64_t off = (uint64_t)p->next_chunk * ARTIFACTS_CHUNK_MAX;
        size_t len = p->size - off < ARTIFACTS_CHUNK_MAX ? (size_t)(p->size - off) : ARTIFACTS_CHUNK_MAX;
        size_t got = 0;
        int r;

        buf = malloc(len);
        if (!buf)
                return -ENOMEM;
        while (got < len) {
                ssize_t n = pread(p->fd, buf + got, len - got, (off_t)(off + got));

                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0)
                        return -errno;
                if (n == 0)
                        return -EIO; /* shorter than it was */
                got += (size_t)n;
        }
        snprintf(subject, sizeof(subject), ARTIFACTS_SUBJECT "%s", p->sha);
        snprintf(id, sizeof(id), "%s:%u", p->sha, p->next_chunk);
        snprintf(idx, sizeof(idx), "%u", p->next_chunk);
        slot->chunk = p->next_chunk;
        r = bus_js_publish_async(p->a->bus, subject, headers, buf, len, ARTIFACTS_ACK_TIMEOUT_USEC, publish_chunk_ack,
                                 slot, &slot->req);
        if (r < 0)
                return r;
        p->next_chunk++;
        return 0;
}

static void publish_chunk_ack(void *userdata, int error, uint64_t seq, bool duplicate) {
        Slot *slot = userdata;
        ArtifactPublish *p = slot->p;
        int r;

        slot->req = NULL;
        if (error < 0)
                return publish_done(p, error);
        /* A duplicate (a chunk sent again within the stream's window)
         * answers with the sequence it is stored at. */
        p->seqs[slot->chunk] = seq;
        p->acked++;
        if (p->next_chunk < p->n_chunks) {
                r = publish_chunk(p, slot);
                if (r < 0)
                        return publish_done(p, r);
        } else if (p->acked == p->n_chunks) {
                r = publish_end(p);
                if (r < 0)
                        return publish_done(p, r);
        }
}

int artifacts_publish(Artifacts *a, const char *sha256, int fd, uint64_t size, artifacts_done_fn fn, void *userdata,
                      ArtifactPublish **ret) {
        ArtifactPublish *p;
        uint64_t chunks = (size + ARTIFACTS_CHUNK_MAX - 1) / ARTIFACTS_CHUNK_MAX;
        int r = 0;

        if (!a || !manifest_sha256_valid(sha256) || fd < 0 || size == 0 || chunks > ARTIFACTS_CHUNKS_MAX || !fn)
                return -EINVAL;
        p = calloc(1, sizeof(*p));
        if (!p)
                return -ENOMEM;
        p->seqs = calloc((size_t)chunks, sizeof(*p->seqs));
        if (!p->seqs) {
                free(p);
                return -ENOMEM;
        }
        p->a = a;
        memcpy(p->sha, sha256, 65);
        p->fd = fd;
        p->size = size;
        p->n_chunks = (unsigned)chunks;
        p->fn = fn;
        p->userdata = userdata;
        p->next = a->publishes;
        if (p->next)
                p->next->prev = p;
        a->publishes = p;
        for (unsigned i = 0; i < ARTIFACTS_WINDOW && r >= 0 && p->next_chunk < p->n_chunks; i++) {
                p->slots[i].p = p;
                r = publish_chunk(p, &p->slots[i]);
        }
        if (r < 0) {
                publish_free(p);
                return r;
        }
        if (ret)
                *ret = p;
        return 0;
}

void artifacts_publish_cancel(ArtifactPublish *p) {
        if (p)
                publish_free(p);
}

/* ---- the object ----------------------------------------------------------------- */

Artifacts *artifacts_free(Artifacts *a) {
        if (!a)
                return NULL;
        a->follow = bus_sub_free(a->follow);
        bus_request_cancel(a->get);
        while (a->publishes)
                publish_free(a->publishes);
        while (a->work) {
                Work *w = a->work;

                a->work = w->next;
                work_free(w);
        }
        sd_event_source_disable_unref(a->work_defer);
        sd_event_source_disable_unref(a->retry);
        free(a->dir);
        free(a->node);
        free(a);
        return NULL;
}

int artifacts_new(sd_event *event, Bus *bus, const char *dir, const char *node, unsigned replicas,
                  uint64_t max_bytes, uint64_t max_artifact_bytes, Artifacts **ret) {
        _cleanup_(artifacts_freep) Artifacts *a = NULL;
        const char *subjects[] = { ARTIFACTS_SUBJECT ">" };
        jsStreamConfig cfg;
        int r;

        a = calloc(1, sizeof(*a));
        if (!a)
                return log_error_errno(-ENOMEM, "Out of memory.");
        a->event = event;
        a->bus = bus;
        a->max_artifact = max_artifact_bytes;
        a->dir = strdup(dir);
        a->node = strdup(node);
        if (!a->dir || !a->node)
                return log_error_errno(-ENOMEM, "Out of memory.");

        jsStreamConfig_Init(&cfg);
        cfg.Name = ARTIFACTS_STREAM;
        cfg.Subjects = subjects;
        cfg.SubjectsLen = 1;
        cfg.Storage = js_FileStorage;
        cfg.Retention = js_LimitsPolicy;
        cfg.Discard = js_DiscardOld;
        cfg.MaxBytes = max_bytes > INT64_MAX ? -1 : (int64_t)max_bytes;
        cfg.MaxMsgs = -1;
        cfg.Replicas = (int64_t)(replicas ? replicas : 1);
        /* An upload sent again within an hour stores nothing twice. */
        cfg.Duplicates = 3600 * NSEC_PER_SEC;
        r = bus_stream_ensure(bus, &cfg, &a->stream_created_ns);
        if (r < 0)
                return log_error_errno(r, "Cannot set up the stream %s: %m", ARTIFACTS_STREAM);
        artifacts_load_position(a);
        artifacts_remove_temporaries(a);
        r = sd_event_add_defer(event, &a->work_defer, work_defer_cb, a);
        if (r >= 0)
                r = sd_event_source_set_priority(a->work_defer, SD_EVENT_PRIORITY_IDLE);
        if (r >= 0)
                r = sd_event_source_set_enabled(a->work_defer, SD_EVENT_OFF);
        if (r >= 0)
                r = sd_event_add_time_relative(event, &a->retry, CLOCK_MONOTONIC, USEC_PER_SEC, 0, retry_cb, a);
        if (r >= 0)
                r = sd_event_source_set_enabled(a->retry, SD_EVENT_OFF);
        if (r < 0)
                return log_error_errno(r, "Failed to add an event source: %m");
        r = bus_stream_follow(bus, ARTIFACTS_STREAM, ARTIFACTS_SUBJECT "*.end", a->done_seq + 1, artifacts_end_cb, a,
                              &a->follow);
        if (r < 0)
                return log_error_errno(r, "Cannot follow the stream %s: %m", ARTIFACTS_STREAM);
        *ret = TAKE_PTR(a);
        return 0;
}
