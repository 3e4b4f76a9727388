/* SPDX-License-Identifier: Apache-2.0 */
/* What "tether ota" and "tether campaign" share (tether-ota-sign.h): the
 * update key, a .deb's identity, signing manifests and uploading
 * artifacts. */
#include <fcntl.h>
#include <inttypes.h>
#include <sys/random.h>
#include <time.h>

#include "debfile.h"
#include "debversion.h"
#include "log.h"
#include "manifest.h"
#include "tether-ota-sign.h"

int cli_read_file(const char *path, size_t max, char **ret, size_t *ret_len) {
        _cleanup_close_ int fd = open(path, O_RDONLY | O_CLOEXEC);
        _cleanup_free_ char *buf = NULL;
        size_t len = 0;

        if (fd < 0)
                return log_error_errno(-errno, "Cannot open '%s': %m", path);
        buf = malloc(max + 1);
        if (!buf)
                return log_error_errno(-ENOMEM, "Out of memory");
        for (;;) {
                ssize_t n = read(fd, buf + len, max + 1 - len);

                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0)
                        return log_error_errno(-errno, "Cannot read '%s': %m", path);
                if (n == 0)
                        break;
                len += (size_t)n;
                if (len > max)
                        return log_error_errno(-EFBIG, "'%s' is larger than %zu bytes", path, max);
        }
        buf[len] = 0;
        *ret = TAKE_PTR(buf);
        *ret_len = len;
        return 0;
}

const char *ota_key_path(void) {
        const char *k = arg.ota_key;

        if (!k || !*k)
                k = getenv("TETHER_OTA_KEY");
        return k && *k ? k : NULL;
}

void deb_info_done(DebInfo *d) {
        debfile_control_done(&d->control);
}

int deb_info(const char *path, DebInfo *ret) {
        int r = debfile_control_read(path, &ret->control);

        if (r == -ENOENT && access(path, R_OK) == 0)
                return log_error_errno(r, "Cannot read '%s': dpkg-deb is not installed", path);
        if (r < 0)
                return log_error_errno(r, "Cannot read the control fields of '%s': %s", path,
                                       r == -EBADMSG ? "not a Debian package" : strerror(-r));
        r = debfile_sha256(path, ret->sha256, &ret->size);
        if (r < 0) {
                debfile_control_done(&ret->control);
                return log_error_errno(r, "Cannot read '%s': %m", path);
        }
        return 0;
}

/* The manifest for deb at url and the targets, with key id and nonce
 * (borrowed: m points into them). */
static Manifest manifest_for(const DebInfo *deb, const char *url, const char *const *devices, size_t n_devices,
                             const char *const *tags, size_t n_tags, char *key_id, char *nonce) {
        return (Manifest){
                .package = deb->control.package,
                .version = deb->control.version,
                .architecture = deb->control.architecture,
                .sha256 = (char *)deb->sha256,
                .url = (char *)url,
                .key_id = key_id,
                .min_version = (char *)arg.ota_min_version,
                .plugin = (char *)arg.ota_plugin,
                .nonce = nonce,
                .devices = (char **)devices,
                .n_devices = n_devices,
                .tags = (char **)tags,
                .n_tags = n_tags,
                .allow_downgrade = arg.ota_allow_downgrade,
                .size = deb->size,
                .installed_size = deb->control.installed_size,
                .expires = arg.ota_expires >= 0
                                   ? arg.ota_expires
                                   : (int64_t)time(NULL) + (arg.ota_valid_for > 0 ? arg.ota_valid_for
                                                                                   : OTA_DEFAULT_VALID_SEC),
        };
}

int ota_manifest_body_size(const DebInfo *deb, const char *url, const char *const *devices, size_t n_devices,
                           size_t *ret) {
        char id[MANIFEST_KEY_ID_LEN + 1], nonce[MANIFEST_NONCE_LEN + 1];
        _cleanup_free_ char *body = NULL;
        Manifest m;
        int r;

        memset(id, 'a', MANIFEST_KEY_ID_LEN);
        id[MANIFEST_KEY_ID_LEN] = 0;
        memset(nonce, 'a', MANIFEST_NONCE_LEN);
        nonce[MANIFEST_NONCE_LEN] = 0;
        m = manifest_for(deb, url, devices, n_devices, NULL, 0, id, nonce);
        r = manifest_body_format(&m, &body);
        if (r < 0)
                return log_error_errno(r, "Failed to format the manifest: %m");
        *ret = strlen(body);
        return 0;
}

int ota_sign_manifest(const DebInfo *deb, const char *url, const char *const *devices, size_t n_devices,
                      const char *const *tags, size_t n_tags, char **ret, size_t *ret_len) {
        _cleanup_free_ char *pem = NULL, *body = NULL;
        char id[MANIFEST_KEY_ID_LEN + 1], nonce[MANIFEST_NONCE_LEN + 1];
        uint8_t rnd[MANIFEST_NONCE_LEN / 2];
        const char *kp = ota_key_path();
        Manifest m;
        size_t len;
        int r;

        if (n_devices + n_tags > MANIFEST_TARGETS_MAX)
                return cli_usage_error("Too many targets: at most %d devices and tags together", MANIFEST_TARGETS_MAX);
        if (getrandom(rnd, sizeof(rnd), 0) != (ssize_t)sizeof(rnd))
                return log_error_errno(-EIO, "No randomness for the manifest's nonce");
        hex_encode(rnd, sizeof(rnd), nonce);
        if (!kp)
                return cli_usage_error("No update key: give --key FILE or set TETHER_OTA_KEY (or --manifest)");
        if (arg.ota_min_version && debversion_check(arg.ota_min_version) < 0)
                return cli_usage_error("Invalid --min-version '%s': not a Debian version", arg.ota_min_version);
        if (arg.ota_plugin && proto_name_check(arg.ota_plugin, strlen(arg.ota_plugin), PROTO_NAME_PLUGIN) < 0)
                return cli_usage_error("Invalid --plugin '%s'", arg.ota_plugin);
        r = cli_read_file(kp, 16384, &pem, &len);
        if (r < 0)
                return r;
        if (manifest_key_id_pem(pem, len, id) < 0)
                return log_error_errno(-EBADMSG, "'%s' is not an Ed25519 private key", kp);
        m = manifest_for(deb, url, devices, n_devices, tags, n_tags, id, nonce);
        r = manifest_body_format(&m, &body);
        if (r < 0)
                return log_error_errno(r, "Failed to format the manifest: %m");
        if (strlen(body) > MANIFEST_BODY_MAX) {
                /* How many of these devices fit: each after the first adds ,"ID". */
                _cleanup_free_ char *one = NULL;
                size_t fit = 0, len1;

                m.n_devices = n_devices > 0 ? 1 : 0;
                r = manifest_body_format(&m, &one);
                if (r < 0)
                        return log_error_errno(r, "Failed to format the manifest: %m");
                len1 = strlen(one);
                if (n_devices > 0 && len1 <= MANIFEST_BODY_MAX)
                        for (fit = 1; fit < n_devices && len1 + strlen(devices[fit]) + 3 <= MANIFEST_BODY_MAX; fit++)
                                len1 += strlen(devices[fit]) + 3;
                return log_error_errno(-E2BIG, "Cannot sign this manifest: its body would be %zu bytes, a device "
                                       "accepts at most %u; %zu of these %zu devices fit in one manifest%s (sign "
                                       "several, or use 'tether campaign create', which does)", strlen(body),
                                       MANIFEST_BODY_MAX, fit, n_devices,
                                       n_tags > 0 || url ? " with these tags and url" : "");
        }
        /* Whatever we sign must be something a device accepts. */
        {
                Manifest check = {};
                const char *err = NULL;

                if (manifest_body_parse((const uint8_t *)body, strlen(body), &check, &err) < 0)
                        return log_error_errno(-EINVAL, "Cannot sign this package: %s", err ? err : "invalid");
                manifest_done(&check);
        }
        r = manifest_sign(pem, len, body, strlen(body), ret, ret_len);
        if (r == -EBADMSG)
                return log_error_errno(r, "'%s' is not an Ed25519 private key", kp);
        if (r < 0)
                return log_error_errno(r, "Failed to sign the manifest: %m");
        return 0;
}

/* ---- upload ------------------------------------------------------------- */

typedef struct Upload {
        FILE *f;
        uint64_t size;
        bool tty;
        int last_pct;
} Upload;

static size_t upload_read(char *buf, size_t size, size_t n, void *userdata) {
        Upload *u = userdata;

        return fread(buf, 1, size * n, u->f);
}

void ota_bar(const char *what, uint64_t done, uint64_t total) {
        int width = 30, fill = total ? (int)(done * (uint64_t)width / total) : 0, pct = total ? (int)(done * 100 / total) : 0;
        char b[64];

        for (int i = 0; i < width; i++)
                b[i] = i < fill ? '#' : '.';
        b[width] = 0;
        fprintf(stderr, "\r%-12s [%s] %3d%% %.1f/%.1f MB ", what, b, pct, done / 1e6, total / 1e6);
        fflush(stderr);
}

static int upload_progress(void *userdata, curl_off_t dltotal, curl_off_t dlnow, curl_off_t ultotal,
                           curl_off_t ulnow) {
        Upload *u = userdata;
        int pct = u->size ? (int)((uint64_t)ulnow * 100 / u->size) : 100;

        if (u->tty && pct != u->last_pct)
                ota_bar("uploading", (uint64_t)ulnow, u->size);
        u->last_pct = pct;
        return 0;
}

void ota_curl_reset_method(Api *a) {
        curl_easy_setopt(a->curl, CURLOPT_UPLOAD, 0L);
        curl_easy_setopt(a->curl, CURLOPT_CUSTOMREQUEST, NULL);
        curl_easy_setopt(a->curl, CURLOPT_NOPROGRESS, 1L);
        curl_easy_setopt(a->curl, CURLOPT_POSTFIELDS, NULL);
}

int ota_upload_artifact(Api *a, const char *path, const DebInfo *deb, char **ret_url) {
        _cleanup_free_ char *url = NULL;
        Upload u = { .size = deb->size, .tty = isatty(STDERR_FILENO), .last_pct = -1 };
        json_t *res = NULL;
        CURLcode c;
        char api_path[128];

        snprintf(api_path, sizeof(api_path), "/v1/ota/artifacts/%s", deb->sha256);
        if (asprintf(&url, "%s%s", a->base, api_path) < 0)
                return -ENOMEM;
        /* Does the cloud have it already? 404 is an answer here, not an error. */
        buffer_done(&a->body);
        a->body.max = TETHER_RESPONSE_MAX;
        a->errbuf[0] = 0;
        curl_easy_setopt(a->curl, CURLOPT_URL, url);
        curl_easy_setopt(a->curl, CURLOPT_HTTPGET, 1L);
        curl_easy_setopt(a->curl, CURLOPT_WRITEFUNCTION, body_write);
        curl_easy_setopt(a->curl, CURLOPT_WRITEDATA, a);
        api_set_timeouts(a, arg.timeout_ms > 0 ? arg.timeout_ms : 30000);
        c = curl_easy_perform(a->curl);
        if (c != CURLE_OK)
                return curl_error(a, c);
        curl_easy_getinfo(a->curl, CURLINFO_RESPONSE_CODE, &a->status);
        if (a->status == 200) {
                const char *s;

                res = json_loadb(a->body.data ?: "", a->body.len, 0, NULL);
                if (!json_is_object(res)) {
                        json_decref(res);
                        return log_error_errno(-EBADMSG, "Malformed response from %s", a->base);
                }
                /* No "url": the cloud serves it over the devices' connections only. */
                s = json_string_value(json_object_get(res, "url"));
                *ret_url = s ? strdup(s) : NULL;
                json_decref(res);
                log_info("The cloud has %s already", deb->sha256);
                return !s || *ret_url ? 0 : -ENOMEM;
        }
        if (a->status != 404)
                return http_error(a, NULL);

        u.f = fopen(path, "re");
        if (!u.f)
                return log_error_errno(-errno, "Cannot open '%s': %m", path);
        buffer_done(&a->body);
        a->body.max = TETHER_RESPONSE_MAX;
        a->errbuf[0] = 0;
        curl_easy_setopt(a->curl, CURLOPT_URL, url);
        curl_easy_setopt(a->curl, CURLOPT_UPLOAD, 1L);
        curl_easy_setopt(a->curl, CURLOPT_READFUNCTION, upload_read);
        curl_easy_setopt(a->curl, CURLOPT_READDATA, &u);
        curl_easy_setopt(a->curl, CURLOPT_INFILESIZE_LARGE, (curl_off_t)deb->size);
        curl_easy_setopt(a->curl, CURLOPT_WRITEFUNCTION, body_write);
        curl_easy_setopt(a->curl, CURLOPT_WRITEDATA, a);
        curl_easy_setopt(a->curl, CURLOPT_NOPROGRESS, 0L);
        curl_easy_setopt(a->curl, CURLOPT_XFERINFOFUNCTION, upload_progress);
        curl_easy_setopt(a->curl, CURLOPT_XFERINFODATA, &u);
        api_set_timeouts(a, arg.timeout_ms > 0 ? arg.timeout_ms : 0);
        c = curl_easy_perform(a->curl);
        fclose(u.f);
        ota_curl_reset_method(a);
        if (u.tty)
                fputc('\n', stderr);
        if (c != CURLE_OK)
                return curl_error(a, c);
        curl_easy_getinfo(a->curl, CURLINFO_RESPONSE_CODE, &a->status);
        if (a->status < 200 || a->status > 299)
                return http_error(a, "The cloud refused the package");
        res = json_loadb(a->body.data ?: "", a->body.len, 0, NULL);
        if (!json_is_object(res)) {
                json_decref(res);
                return log_error_errno(-EBADMSG, "Malformed response from %s", a->base);
        }
        {
                const char *s = json_string_value(json_object_get(res, "url"));

                *ret_url = s ? strdup(s) : NULL;
                json_decref(res);
                log_info("Uploaded %s (%" PRIu64 " bytes)", path, deb->size);
                return !s || *ret_url ? 0 : -ENOMEM;
        }
}

