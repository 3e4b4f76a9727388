/* SPDX-License-Identifier: Apache-2.0 */
#include <curl/curl.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include "curl-event.h"
#include "ota-download.h"
#include "util.h"

#define REHASH_CHUNK (1u << 20)
#define CHECKPOINT_BYTES (4ull << 20)
#define CONNECT_TIMEOUT_MS 30000L

typedef enum Phase {
        PHASE_REHASH,
        PHASE_TRANSFER,
        PHASE_DONE,
} Phase;

struct OtaDownload {
        sd_event *event;
        OtaDownloadHooks hooks;
        char *url, *path, *ca_file, *cert_file, *key_file, *etag, *want_prefix;
        uint64_t size;
        unsigned low_speed_bytes;
        uint64_t low_speed_ms;

        int fd;
        EVP_MD_CTX *md;   /* hash of [0, bytes) */
        uint64_t bytes;   /* in the file and in md */
        uint64_t resume_from;
        uint64_t last_checkpoint;
        Phase phase;

        sd_event_source *rehash_source;
        sd_event_source *finish_source;
        CurlEvent *curl;
        CURLM *multi; /* the CurlEvent's */
        CURL *easy;
        char errbuf[CURL_ERROR_SIZE];

        /* the response */
        long status;
        bool headers_done;
        bool restarted; /* a 200 replaced the partial data */
        char *new_etag;
        uint64_t range_start;
        bool have_range;

        /* the outcome, delivered from a defer source */
        int error;
        char text[CURL_ERROR_SIZE + 128];
        bool restart;
};

static void hex_digest(EVP_MD_CTX *md, char out[static 65]) {
        EVP_MD_CTX *copy = EVP_MD_CTX_new();
        uint8_t d[32];
        unsigned n = sizeof(d);

        out[0] = 0;
        if (!copy || EVP_MD_CTX_copy_ex(copy, md) != 1 || EVP_DigestFinal_ex(copy, d, &n) != 1) {
                EVP_MD_CTX_free(copy);
                return;
        }
        EVP_MD_CTX_free(copy);
        hex_encode(d, 32, out);
}

/* Forget the data: empty file, empty hash. */
static int reset_data(OtaDownload *d, const char *why) {
        if (ftruncate(d->fd, 0) < 0 || lseek(d->fd, 0, SEEK_SET) < 0)
                return -errno;
        if (EVP_DigestInit_ex(d->md, EVP_sha256(), NULL) != 1)
                return -EIO;
        d->bytes = d->last_checkpoint = 0;
        if (d->hooks.restarted)
                d->hooks.restarted(d->hooks.userdata, why);
        return 0;
}

/* End the download from a defer source, so that done() never runs inside
 * a libcurl callback. */
static void finish(OtaDownload *d, int error, bool restart, const char *fmt, ...) _printf_(4, 5);
static void finish(OtaDownload *d, int error, bool restart, const char *fmt, ...) {
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
        sd_event_source_set_enabled(d->finish_source, SD_EVENT_ONESHOT);
}

static int on_finish(sd_event_source *s, void *userdata) {
        OtaDownload *d = userdata;
        char sha[65] = "";

        if (d->error == 0)
                hex_digest(d->md, sha);
        d->hooks.done(d->hooks.userdata, d->error, sha, d->text, d->restart);
        return 0;
}

static void checkpoint(OtaDownload *d) {
        char sha[65];

        if (d->bytes == d->last_checkpoint)
                return;
        if (fdatasync(d->fd) < 0)
                return;
        hex_digest(d->md, sha);
        d->last_checkpoint = d->bytes;
        if (d->hooks.checkpoint)
                d->hooks.checkpoint(d->hooks.userdata, d->bytes, sha, d->new_etag ? d->new_etag : d->etag);
}

/* ---- libcurl callbacks ------------------------------------------------ */

static size_t on_header(char *buf, size_t size, size_t n, void *userdata) {
        OtaDownload *d = userdata;
        size_t len = size * n;

        if (len >= 5 && strncmp(buf, "HTTP/", 5) == 0) {
                /* a new response (there may be several, e.g. 100) */
                d->have_range = false;
                free(d->new_etag);
                d->new_etag = NULL;
                return len;
        }
        if (len > 5 && strncasecmp(buf, "ETag:", 5) == 0) {
                const char *v = buf + 5;
                size_t vl = len - 5;

                while (vl > 0 && (*v == ' ' || *v == '\t'))
                        v++, vl--;
                while (vl > 0 && (v[vl - 1] == '\r' || v[vl - 1] == '\n' || v[vl - 1] == ' '))
                        vl--;
                free(d->new_etag);
                d->new_etag = strndup(v, vl);
        } else if (len > 14 && strncasecmp(buf, "Content-Range:", 14) == 0) {
                unsigned long long a;

                if (sscanf(buf + 14, " bytes %llu-", &a) == 1) {
                        d->range_start = a;
                        d->have_range = true;
                }
        }
        return len;
}

/* The first body byte: decide what the response means for our data. */
static int begin_body(OtaDownload *d) {
        curl_easy_getinfo(d->easy, CURLINFO_RESPONSE_CODE, &d->status);
        d->headers_done = true;
        if (d->status == 206) {
                if (!d->have_range || d->range_start != d->bytes) {
                        finish(d, -EPROTO, true, "the server answered a range request with another range");
                        return -1;
                }
                if (d->etag && d->new_etag && !streq(d->etag, d->new_etag)) {
                        /* If-Range should have prevented this */
                        finish(d, -ESTALE, true, "the artifact changed on the server (ETag %s, was %s)", d->new_etag,
                               d->etag);
                        return -1;
                }
                return 0;
        }
        if (d->status == 200) {
                if (d->bytes > 0) {
                        /* Range ignored or If-Range failed: this is the whole file. */
                        if (reset_data(d, "the server sent the whole file (range ignored, or the ETag changed)") < 0) {
                                finish(d, -EIO, true, "cannot truncate '%s': %m", d->path);
                                return -1;
                        }
                        d->restarted = true;
                }
                return 0;
        }
        return 0; /* errors: the body is dropped, the status reported at the end */
}

static size_t on_write(char *buf, size_t size, size_t n, void *userdata) {
        OtaDownload *d = userdata;
        size_t len = size * n, left = len;

        if (d->phase != PHASE_TRANSFER)
                return 0;
        if (!d->headers_done && begin_body(d) < 0)
                return 0;
        if (d->status != 200 && d->status != 206)
                return len;
        if (d->bytes + len > d->size) {
                finish(d, -EFBIG, true, "the artifact is larger than the %" PRIu64 " bytes the manifest says",
                       d->size);
                return 0;
        }
        while (left > 0) {
                ssize_t w = write(d->fd, buf, left);

                if (w < 0 && errno == EINTR)
                        continue;
                if (w < 0) {
                        finish(d, -errno, false, "cannot write '%s': %m", d->path);
                        return 0;
                }
                EVP_DigestUpdate(d->md, buf, (size_t)w);
                d->bytes += (uint64_t)w;
                buf += w;
                left -= (size_t)w;
        }
        if (d->hooks.progress)
                d->hooks.progress(d->hooks.userdata, d->bytes);
        if (d->bytes - d->last_checkpoint >= CHECKPOINT_BYTES)
                checkpoint(d);
        return len;
}

static void transfer_done(OtaDownload *d, CURLcode result) {
        if (d->phase != PHASE_TRANSFER)
                return; /* we ended it ourselves */
        curl_easy_getinfo(d->easy, CURLINFO_RESPONSE_CODE, &d->status);
        if (result == CURLE_OPERATION_TIMEDOUT) {
                checkpoint(d);
                return finish(d, -ETIMEDOUT, false, "the download stalled: %s",
                              d->errbuf[0] ? d->errbuf : curl_easy_strerror(result));
        }
        if (result != CURLE_OK) {
                checkpoint(d);
                return finish(d, result == CURLE_PEER_FAILED_VERIFICATION || result == CURLE_SSL_CERTPROBLEM ||
                                                 result == CURLE_SSL_CONNECT_ERROR
                                         ? -EACCES
                                         : -EIO,
                              false, "%s", d->errbuf[0] ? d->errbuf : curl_easy_strerror(result));
        }
        if (d->status == 416) {
                /* Nothing after our offset: complete already, or not ours. */
                if (d->bytes == d->size)
                        return finish(d, 0, false, "complete");
                return finish(d, -ERANGE, true, "the server has no data after byte %" PRIu64, d->bytes);
        }
        if (d->status != 200 && d->status != 206)
                return finish(d, -EPROTO, false, "HTTP %ld from %s", d->status, d->url);
        if (d->bytes != d->size) {
                checkpoint(d);
                return finish(d, -EPIPE, false, "the download ended after %" PRIu64 " of %" PRIu64 " bytes",
                              d->bytes, d->size);
        }
        if (fsync(d->fd) < 0)
                return finish(d, -errno, false, "cannot sync '%s': %m", d->path);
        finish(d, 0, false, "complete");
}

static void check_done(void *userdata) {
        OtaDownload *d = userdata;
        CURLMsg *msg;
        int left;

        while ((msg = curl_multi_info_read(d->multi, &left)))
                if (msg->msg == CURLMSG_DONE)
                        transfer_done(d, msg->data.result);
}

static int start_transfer(OtaDownload *d) {
        char range[48];
        struct curl_slist *h = NULL;

        d->easy = curl_easy_init();
        if (!d->easy)
                return -ENOMEM;
        curl_easy_setopt(d->easy, CURLOPT_URL, d->url);
        curl_easy_setopt(d->easy, CURLOPT_PROTOCOLS_STR, "https");
        curl_easy_setopt(d->easy, CURLOPT_FOLLOWLOCATION, 0L);
        /* Pin the CA: only ours, never the system store. */
        curl_easy_setopt(d->easy, CURLOPT_CAINFO, d->ca_file);
        curl_easy_setopt(d->easy, CURLOPT_CAPATH, NULL);
        curl_easy_setopt(d->easy, CURLOPT_SSL_VERIFYPEER, 1L);
        curl_easy_setopt(d->easy, CURLOPT_SSL_VERIFYHOST, 2L);
        curl_easy_setopt(d->easy, CURLOPT_SSLCERT, d->cert_file);
        curl_easy_setopt(d->easy, CURLOPT_SSLKEY, d->key_file);
        curl_easy_setopt(d->easy, CURLOPT_SSLVERSION, (long)CURL_SSLVERSION_TLSv1_2);
        curl_easy_setopt(d->easy, CURLOPT_CONNECTTIMEOUT_MS, CONNECT_TIMEOUT_MS);
        curl_easy_setopt(d->easy, CURLOPT_LOW_SPEED_LIMIT, (long)d->low_speed_bytes);
        curl_easy_setopt(d->easy, CURLOPT_LOW_SPEED_TIME, (long)((d->low_speed_ms + 999) / 1000));
        curl_easy_setopt(d->easy, CURLOPT_NOSIGNAL, 1L);
        curl_easy_setopt(d->easy, CURLOPT_USERAGENT, "tetherd/" PACKAGE_VERSION);
        curl_easy_setopt(d->easy, CURLOPT_ERRORBUFFER, d->errbuf);
        curl_easy_setopt(d->easy, CURLOPT_HEADERFUNCTION, on_header);
        curl_easy_setopt(d->easy, CURLOPT_HEADERDATA, d);
        curl_easy_setopt(d->easy, CURLOPT_WRITEFUNCTION, on_write);
        curl_easy_setopt(d->easy, CURLOPT_WRITEDATA, d);
        if (d->bytes > 0) {
                /* Not CURLOPT_RESUME_FROM: that turns a 200 into an error,
                 * and a 200 is a fine answer (we start over with it). */
                snprintf(range, sizeof(range), "%" PRIu64 "-", d->bytes);
                curl_easy_setopt(d->easy, CURLOPT_RANGE, range);
                if (d->etag) {
                        char *line = NULL;

                        if (asprintf(&line, "If-Range: %s", d->etag) >= 0) {
                                h = curl_slist_append(NULL, line);
                                free(line);
                        }
                        curl_easy_setopt(d->easy, CURLOPT_HTTPHEADER, h);
                        curl_easy_setopt(d->easy, CURLOPT_PRIVATE, h);
                }
        }
        d->resume_from = d->bytes;
        d->phase = PHASE_TRANSFER;
        if (curl_multi_add_handle(d->multi, d->easy) != CURLM_OK)
                return -EIO;
        curl_event_kick(d->curl);
        return 0;
}

/* Re-hash the kept prefix, 1 MiB per loop iteration. */
static int on_rehash(sd_event_source *s, void *userdata) {
        OtaDownload *d = userdata;
        uint8_t *buf;
        uint64_t want;
        ssize_t n;

        if (d->phase != PHASE_REHASH)
                return 0;
        want = d->resume_from - d->bytes;
        if (want > REHASH_CHUNK)
                want = REHASH_CHUNK;
        if (want > 0) {
                buf = malloc(REHASH_CHUNK);
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
                        /* shorter than the checkpoint: start over */
                        if (reset_data(d, "the partial file is shorter than its checkpoint") < 0) {
                                finish(d, -EIO, false, "cannot truncate '%s'", d->path);
                                return 0;
                        }
                        d->resume_from = 0;
                }
                if (d->bytes < d->resume_from)
                        return 0; /* more next time round */
        }
        sd_event_source_set_enabled(d->rehash_source, SD_EVENT_OFF);
        if (d->bytes > 0) {
                char sha[65];

                hex_digest(d->md, sha);
                if (!d->want_prefix || !streq(sha, d->want_prefix)) {
                        /* The kept data is not what we checkpointed. */
                        if (reset_data(d, "the partial file no longer matches its checkpointed SHA-256") < 0) {
                                finish(d, -EIO, false, "cannot truncate '%s'", d->path);
                                return 0;
                        }
                        free(d->etag);
                        d->etag = NULL;
                } else if (lseek(d->fd, (off_t)d->bytes, SEEK_SET) < 0) {
                        finish(d, -errno, false, "cannot seek in '%s': %m", d->path);
                        return 0;
                }
                d->last_checkpoint = d->bytes;
        }
        if (start_transfer(d) < 0)
                finish(d, -ENOMEM, false, "cannot start the transfer");
        return 0;
}

int ota_download_start(sd_event *event, const OtaDownloadParams *p, const OtaDownloadHooks *hooks,
                       OtaDownload **ret) {
        _cleanup_(ota_download_freep) OtaDownload *d = calloc(1, sizeof(OtaDownload));
        struct stat st;
        int r;

        if (!d)
                return -ENOMEM;
        d->fd = -1;
        d->event = sd_event_ref(event);
        d->hooks = *hooks;
        d->size = p->size;
        d->low_speed_bytes = p->low_speed_bytes;
        d->low_speed_ms = p->low_speed_ms;
        d->url = strdup(p->url);
        d->path = strdup(p->path);
        d->ca_file = strdup(p->ca_file);
        d->cert_file = strdup(p->cert_file);
        d->key_file = strdup(p->key_file);
        d->etag = p->etag ? strdup(p->etag) : NULL;
        d->want_prefix = p->prefix_sha256 ? strdup(p->prefix_sha256) : NULL;
        d->md = EVP_MD_CTX_new();
        if (!d->url || !d->path || !d->ca_file || !d->cert_file || !d->key_file || (p->etag && !d->etag) ||
            !d->md || EVP_DigestInit_ex(d->md, EVP_sha256(), NULL) != 1)
                return -ENOMEM;
        r = curl_event_new(event, check_done, d, &d->curl);
        if (r < 0)
                return r;
        d->multi = curl_event_multi(d->curl);
        d->fd = open(p->path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0640);
        if (d->fd < 0 || fstat(d->fd, &st) < 0)
                return -errno;
        /* Keep the checkpointed prefix only; what came after it is unknown. */
        d->resume_from = (uint64_t)st.st_size >= p->offset ? p->offset : 0;
        if (d->resume_from > p->size)
                d->resume_from = 0;
        if (ftruncate(d->fd, (off_t)d->resume_from) < 0)
                return -errno;
        r = sd_event_add_defer(event, &d->finish_source, on_finish, d);
        if (r >= 0)
                r = sd_event_source_set_enabled(d->finish_source, SD_EVENT_OFF);
        if (r >= 0)
                r = sd_event_add_defer(event, &d->rehash_source, on_rehash, d);
        if (r < 0)
                return r;
        /* Network and timers first; hashing when the loop is otherwise
         * idle, 1 MiB per iteration until done (defers are one-shot by
         * default). */
        sd_event_source_set_priority(d->rehash_source, SD_EVENT_PRIORITY_IDLE);
        sd_event_source_set_enabled(d->rehash_source, SD_EVENT_ON);
        d->phase = PHASE_REHASH;
        *ret = TAKE_PTR(d);
        return 0;
}

OtaDownload *ota_download_free(OtaDownload *d) {
        if (!d)
                return NULL;
        if (d->easy) {
                struct curl_slist *h = NULL;

                curl_easy_getinfo(d->easy, CURLINFO_PRIVATE, (char **)&h);
                if (d->multi)
                        curl_multi_remove_handle(d->multi, d->easy);
                curl_easy_cleanup(d->easy);
                curl_slist_free_all(h);
        }
        curl_event_free(d->curl);
        sd_event_source_disable_unref(d->finish_source);
        sd_event_source_disable_unref(d->rehash_source);
        if (d->fd >= 0)
                close(d->fd);
        EVP_MD_CTX_free(d->md);
        free(d->url);
        free(d->path);
        free(d->ca_file);
        free(d->cert_file);
        free(d->key_file);
        free(d->etag);
        free(d->new_etag);
        free(d->want_prefix);
        sd_event_unref(d->event);
        free(d);
        return NULL;
}
