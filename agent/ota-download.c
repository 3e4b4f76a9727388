/* SPDX-License-Identifier: Apache-2.0 */
#include <curl/curl.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "curl-event.h"
#include "ota-download-file.h"
#include "ota-download.h"
#include "util.h"

#define CHECKPOINT_BYTES (4ull << 20)
#define CONNECT_TIMEOUT_MS 30000L

struct OtaDownload {
        sd_event *event;
        char *url, *ca_file, *cert_file, *key_file, *etag;
        unsigned low_speed_bytes;
        uint64_t low_speed_ms;

        OtaDownloadFile *file; /* the file, its hash, the re-hash and the end */
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
};

_Static_assert(OTA_DOWNLOAD_TEXT_MAX >= CURL_ERROR_SIZE + 128, "room for libcurl's error");

/* End the download (from a defer source, so that done() never runs
 * inside a libcurl callback). */
#define finish(d, ...) ota_download_file_finish((d)->file, __VA_ARGS__)

static void checkpoint(OtaDownload *d) {
        ota_download_file_checkpoint(d->file, d->new_etag ? d->new_etag : d->etag);
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
                if (!d->have_range || d->range_start != d->file->bytes) {
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
                if (d->file->bytes > 0) {
                        /* Range ignored or If-Range failed: this is the whole file. */
                        if (ota_download_file_reset(d->file,
                                                    "the server sent the whole file (range ignored, or the ETag changed)") <
                            0) {
                                finish(d, -EIO, true, "cannot truncate '%s': %m", d->file->path);
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
        size_t len = size * n;
        int r;

        if (d->file->phase != OTA_DOWNLOAD_TRANSFER)
                return 0;
        if (!d->headers_done && begin_body(d) < 0)
                return 0;
        if (d->status != 200 && d->status != 206)
                return len;
        if (d->file->bytes + len > d->file->size) {
                finish(d, -EFBIG, true, "the artifact is larger than the %" PRIu64 " bytes the manifest says",
                       d->file->size);
                return 0;
        }
        r = ota_download_file_append(d->file, buf, len);
        if (r < 0) {
                finish(d, r, false, "cannot write '%s': %s", d->file->path, strerror(-r));
                return 0;
        }
        if (d->file->hooks.progress)
                d->file->hooks.progress(d->file->hooks.userdata, d->file->bytes);
        if (d->file->bytes - d->file->last_checkpoint >= CHECKPOINT_BYTES)
                checkpoint(d);
        return len;
}

static void transfer_done(OtaDownload *d, CURLcode result) {
        const OtaDownloadFile *f = d->file;

        if (f->phase != OTA_DOWNLOAD_TRANSFER)
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
                if (f->bytes == f->size)
                        return finish(d, 0, false, "complete");
                return finish(d, -ERANGE, true, "the server has no data after byte %" PRIu64, f->bytes);
        }
        if (d->status != 200 && d->status != 206)
                return finish(d, -EPROTO, false, "HTTP %ld from %s", d->status, d->url);
        if (f->bytes != f->size) {
                checkpoint(d);
                return finish(d, -EPIPE, false, "the download ended after %" PRIu64 " of %" PRIu64 " bytes",
                              f->bytes, f->size);
        }
        if (fsync(f->fd) < 0)
                return finish(d, -errno, false, "cannot sync '%s': %m", f->path);
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
        if (d->file->bytes > 0) {
                /* Not CURLOPT_RESUME_FROM: that turns a 200 into an error,
                 * and a 200 is a fine answer (we start over with it). */
                snprintf(range, sizeof(range), "%" PRIu64 "-", d->file->bytes);
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
        if (curl_multi_add_handle(d->multi, d->easy) != CURLM_OK)
                return -EIO;
        curl_event_kick(d->curl);
        return 0;
}

/* The kept prefix is checked: ask for the rest. */
static void on_rehashed(void *userdata, bool mismatch) {
        OtaDownload *d = userdata;

        if (mismatch) {
                /* The kept data is not what we checkpointed: its ETag neither. */
                free(d->etag);
                d->etag = NULL;
        }
        if (start_transfer(d) < 0)
                finish(d, -ENOMEM, false, "cannot start the transfer");
}

int ota_download_start(sd_event *event, const OtaDownloadParams *p, const OtaDownloadHooks *hooks,
                       OtaDownload **ret) {
        _cleanup_(ota_download_freep) OtaDownload *d = calloc(1, sizeof(OtaDownload));
        int r;

        if (!d)
                return -ENOMEM;
        d->event = sd_event_ref(event);
        d->low_speed_bytes = p->low_speed_bytes;
        d->low_speed_ms = p->low_speed_ms;
        d->url = strdup(p->url);
        d->ca_file = strdup(p->ca_file);
        d->cert_file = strdup(p->cert_file);
        d->key_file = strdup(p->key_file);
        d->etag = p->etag ? strdup(p->etag) : NULL;
        if (!d->url || !d->ca_file || !d->cert_file || !d->key_file || (p->etag && !d->etag))
                return -ENOMEM;
        r = curl_event_new(event, check_done, d, &d->curl);
        if (r < 0)
                return r;
        d->multi = curl_event_multi(d->curl);
        r = ota_download_file_new(event, p->path, p->size, p->offset, p->prefix_sha256, 1, hooks,
                                  &(OtaDownloadFileOps){ .userdata = d, .rehashed = on_rehashed }, &d->file);
        if (r < 0)
                return r;
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
        ota_download_file_free(d->file);
        free(d->url);
        free(d->ca_file);
        free(d->cert_file);
        free(d->key_file);
        free(d->etag);
        free(d->new_etag);
        sd_event_unref(d->event);
        free(d);
        return NULL;
}
