/* SPDX-License-Identifier: Apache-2.0 */
/* "tether ota": make update keys, sign manifests for .deb packages, upload
 * artifacts to the cloud, start update jobs on devices and follow them to
 * their end (docs/cli.md, docs/ota.md). The private update key stays on
 * the operator's machine: the cloud only ever sees signed manifests. */
#include <fcntl.h>
#include <inttypes.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <signal.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>

#include "debfile.h"
#include "debversion.h"
#include "log.h"
#include "manifest.h"
#include "ota-journal.h"
#include "tether-cli.h"

#define OTA_DEFAULT_VALID_SEC (7 * 86400LL)
#define OTA_POLL_SEC 25            /* the cloud holds a status request this long */
#define OTA_DEFAULT_WAIT_MS (3600L * 1000L)

void ota_help(void) {
        printf("Usage: tether ota COMMAND ...\n"
               "\n"
               "Signed .deb updates with rollback (docs/ota.md).\n"
               "\n"
               "  ota DEVICE FILE.deb --key KEY   upload FILE.deb, sign a manifest for it with\n"
               "                                  KEY, start the update on DEVICE and follow it\n"
               "                                  until it is committed or given up\n"
               "  ota DEVICE FILE.deb --manifest M  the same with a manifest signed beforehand\n"
               "  ota start DEVICE FILE.deb ...   the same (for a device named like a command)\n"
               "  ota sign FILE.deb --key KEY --device ID [--url URL]   print a signed manifest\n"
               "  ota keygen PRIVATE.pem PUBLIC.pem       make an Ed25519 update key pair\n"
               "  ota keyid KEY.pem                        print a key's id\n"
               "  ota upload FILE.deb                      upload only; print the artifact's HTTPS URL\n"
               "                                           (or its SHA-256 without the HTTPS server)\n"
               "  ota status JOB                           show a job\n"
               "  ota jobs                                 list jobs\n"
               "\n"
               "Options:\n"
               "  --key FILE          Ed25519 private update key ($TETHER_OTA_KEY)\n"
               "  --url URL           https:// URL the device downloads the .deb from (default:\n"
               "                      none, the device fetches it from the cloud over its connection)\n"
               "  --manifest FILE     a signed manifest (instead of --key)\n"
               "  --output FILE       write the manifest there instead of stdout (sign)\n"
               "  --valid-for DUR     the manifest expires after DUR (3600, 12h, 7d; default 7d)\n"
               "  --expires T         ... or at Unix time T\n"
               "  --min-version V     devices refuse versions below V from now on\n"
               "  --plugin NAME       the plugin this package provides; it must load\n"
               "  --device ID         a device the manifest is for (sign; repeatable; 'ota DEVICE'\n"
               "                      adds DEVICE itself)\n"
               "  --tag TAG           devices carrying TAG may install it (repeatable)\n"
               "  --allow-downgrade   devices may install it below their installed version\n"
               "  --no-wait           start the job and print its id, do not follow it\n"
               "  --timeout S         give up following after S seconds (default 3600)\n"
               "  --json              print the job as JSON\n"
               "\n"
               "Exit status: 0 committed, 8 the update ended without being committed\n"
               "(rejected, deferred, rolled back, failed), 9 the cloud does not host OTA\n"
               "artifacts ([OTA] ArtifactDirectory= unset), otherwise as for other commands.\n");
}

static int read_file(const char *path, size_t max, char **ret, size_t *ret_len) {
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

static const char *key_path(void) {
        const char *k = arg.ota_key;

        if (!k || !*k)
                k = getenv("TETHER_OTA_KEY");
        return k && *k ? k : NULL;
}

/* ---- keys --------------------------------------------------------------- */

static int write_new_file(const char *path, mode_t mode, const char *data, size_t len) {
        _cleanup_close_ int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode);

        if (fd < 0)
                return log_error_errno(-errno, "Cannot create '%s': %m", path);
        if (write(fd, data, len) != (ssize_t)len || fsync(fd) < 0)
                return log_error_errno(-errno, "Cannot write '%s': %m", path);
        return 0;
}

static int ota_keygen(char **args, int n) {
        EVP_PKEY *k;
        BIO *priv = NULL, *pub = NULL;
        char *p1, *p2, id[MANIFEST_KEY_ID_LEN + 1];
        long l1, l2;
        int r;

        if (n != 2)
                return cli_usage_error("'ota keygen' takes PRIVATE.pem PUBLIC.pem");
        k = EVP_PKEY_Q_keygen(NULL, NULL, "ED25519");
        if (!k)
                return log_error_errno(-EIO, "Failed to generate an Ed25519 key");
        priv = BIO_new(BIO_s_mem());
        pub = BIO_new(BIO_s_mem());
        if (!priv || !pub || PEM_write_bio_PrivateKey(priv, k, NULL, NULL, 0, NULL, NULL) != 1 ||
            PEM_write_bio_PUBKEY(pub, k) != 1) {
                r = log_error_errno(-EIO, "Failed to encode the key");
                goto out;
        }
        l1 = BIO_get_mem_data(priv, &p1);
        l2 = BIO_get_mem_data(pub, &p2);
        r = manifest_key_id_pem(p2, (size_t)l2, id);
        if (r < 0) {
                log_error_errno(r, "Failed to compute the key id: %m");
                goto out;
        }
        r = write_new_file(args[0], 0600, p1, (size_t)l1);
        if (r < 0)
                goto out;
        r = write_new_file(args[1], 0644, p2, (size_t)l2);
        if (r < 0) {
                (void)unlink(args[0]);
                goto out;
        }
        printf("%s\n", id);
        log_info("Update key %s: keep %s secret; install %s in every device's keyring "
                 "(/etc/tether/ota-keys/)", id, args[0], args[1]);
out:
        BIO_free(priv);
        BIO_free(pub);
        EVP_PKEY_free(k);
        return r;
}

static int ota_keyid(char **args, int n) {
        _cleanup_free_ char *pem = NULL;
        char id[MANIFEST_KEY_ID_LEN + 1];
        size_t len;
        int r;

        if (n != 1)
                return cli_usage_error("'ota keyid' takes KEY.pem");
        r = read_file(args[0], 16384, &pem, &len);
        if (r < 0)
                return r;
        if (manifest_key_id_pem(pem, len, id) < 0)
                return log_error_errno(-EBADMSG, "'%s' is not an Ed25519 key", args[0]);
        printf("%s\n", id);
        return 0;
}

/* ---- sign --------------------------------------------------------------- */

/* The .deb's identity: control fields, size, SHA-256. */
typedef struct DebInfo {
        DebControl control;
        char sha256[65];
        uint64_t size;
} DebInfo;

static void deb_info_done(DebInfo *d) {
        debfile_control_done(&d->control);
}

static int deb_info(const char *path, DebInfo *ret) {
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

/* The targets: device (may be NULL) and every --device, without repeats. */
static int manifest_targets(const char *device, char **devices, size_t *ret_n) {
        size_t n = 0;

        if (device)
                devices[n++] = (char *)device;
        for (size_t i = 0; i < arg.n_ota_devices; i++) {
                bool seen = false;

                if (proto_name_check(arg.ota_devices[i], strlen(arg.ota_devices[i]), PROTO_NAME_DEVICE) < 0)
                        return cli_usage_error("Invalid --device '%s': not a device id", arg.ota_devices[i]);
                for (size_t k = 0; k < n; k++)
                        seen = seen || streq(devices[k], arg.ota_devices[i]);
                if (!seen)
                        devices[n++] = (char *)arg.ota_devices[i];
        }
        if (n + arg.n_ota_tags > MANIFEST_TARGETS_MAX)
                return cli_usage_error("Too many targets: at most %d --device and --tag together", MANIFEST_TARGETS_MAX);
        if (n + arg.n_ota_tags == 0)
                return cli_usage_error("Name the devices the manifest is for: --device ID or --tag TAG");
        *ret_n = n;
        return 0;
}

/* Sign a manifest for deb at url; device (may be NULL) is a target besides
 * the --device and --tag options. */
static int make_manifest(const DebInfo *deb, const char *url, const char *device, char **ret, size_t *ret_len) {
        _cleanup_free_ char *pem = NULL, *body = NULL;
        char id[MANIFEST_KEY_ID_LEN + 1], nonce[MANIFEST_NONCE_LEN + 1];
        char *devices[MANIFEST_TARGETS_MAX + 1];
        uint8_t rnd[MANIFEST_NONCE_LEN / 2];
        const char *kp = key_path();
        size_t n_devices = 0;
        Manifest m;
        size_t len;
        int r;

        r = manifest_targets(device, devices, &n_devices);
        if (r < 0)
                return r;
        if (getrandom(rnd, sizeof(rnd), 0) != (ssize_t)sizeof(rnd))
                return log_error_errno(-EIO, "No randomness for the manifest's nonce");
        hex_encode(rnd, sizeof(rnd), nonce);
        if (!kp)
                return cli_usage_error("No update key: give --key FILE or set TETHER_OTA_KEY (or --manifest)");
        if (arg.ota_min_version && debversion_check(arg.ota_min_version) < 0)
                return cli_usage_error("Invalid --min-version '%s': not a Debian version", arg.ota_min_version);
        if (arg.ota_plugin && proto_name_check(arg.ota_plugin, strlen(arg.ota_plugin), PROTO_NAME_PLUGIN) < 0)
                return cli_usage_error("Invalid --plugin '%s'", arg.ota_plugin);
        r = read_file(kp, 16384, &pem, &len);
        if (r < 0)
                return r;
        if (manifest_key_id_pem(pem, len, id) < 0)
                return log_error_errno(-EBADMSG, "'%s' is not an Ed25519 private key", kp);
        m = (Manifest){
                .package = deb->control.package,
                .version = deb->control.version,
                .architecture = deb->control.architecture,
                .sha256 = (char *)deb->sha256,
                .url = (char *)url,
                .key_id = id,
                .min_version = (char *)arg.ota_min_version,
                .plugin = (char *)arg.ota_plugin,
                .nonce = nonce,
                .devices = devices,
                .n_devices = n_devices,
                .tags = (char **)arg.ota_tags,
                .n_tags = arg.n_ota_tags,
                .allow_downgrade = arg.ota_allow_downgrade,
                .size = deb->size,
                .installed_size = deb->control.installed_size,
                .expires = arg.ota_expires >= 0
                                   ? arg.ota_expires
                                   : (int64_t)time(NULL) + (arg.ota_valid_for > 0 ? arg.ota_valid_for
                                                                                   : OTA_DEFAULT_VALID_SEC),
        };
        r = manifest_body_format(&m, &body);
        if (r < 0)
                return log_error_errno(r, "Failed to format the manifest: %m");
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

static int ota_sign(char **args, int n) {
        _cleanup_(deb_info_done) DebInfo deb = {};
        _cleanup_free_ char *env = NULL;
        size_t len;
        int r;

        if (n != 1)
                return cli_usage_error("'ota sign' takes FILE.deb");
        r = deb_info(args[0], &deb);
        if (r < 0)
                return r;
        r = make_manifest(&deb, arg.ota_url, NULL, &env, &len);
        if (r < 0)
                return r;
        if (arg.ota_output) {
                r = write_new_file(arg.ota_output, 0644, env, len);
                if (r < 0)
                        return r;
        } else
                fwrite(env, 1, len, stdout);
        log_info("Signed %s %s (%s), %" PRIu64 " bytes, sha256 %s", deb.control.package, deb.control.version,
                 deb.control.architecture, deb.size, deb.sha256);
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

static void bar(const char *what, uint64_t done, uint64_t total) {
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
                bar("uploading", (uint64_t)ulnow, u->size);
        u->last_pct = pct;
        return 0;
}

static void curl_reset_method(Api *a) {
        curl_easy_setopt(a->curl, CURLOPT_UPLOAD, 0L);
        curl_easy_setopt(a->curl, CURLOPT_CUSTOMREQUEST, NULL);
        curl_easy_setopt(a->curl, CURLOPT_NOPROGRESS, 1L);
        curl_easy_setopt(a->curl, CURLOPT_POSTFIELDS, NULL);
}

/* Uploads the file unless the cloud has it already; *ret_url is the
 * artifact's URL on the cloud's HTTPS artifact server, NULL when the cloud
 * runs none (devices fetch it over their connection). */
static int upload(Api *a, const char *path, const DebInfo *deb, char **ret_url) {
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
        curl_reset_method(a);
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

static int ota_upload(Api *a, char **args, int n) {
        _cleanup_(deb_info_done) DebInfo deb = {};
        _cleanup_free_ char *url = NULL;
        int r;

        if (n != 1)
                return cli_usage_error("'ota upload' takes FILE.deb");
        r = deb_info(args[0], &deb);
        if (r < 0)
                return r;
        r = upload(a, args[0], &deb, &url);
        if (r < 0)
                return r;
        printf("%s\n", url ? url : deb.sha256);
        return 0;
}

/* ---- jobs --------------------------------------------------------------- */

static bool job_final(json_t *job) {
        return json_is_true(json_object_get(job, "final"));
}

static void job_print(json_t *job) {
        const char *state = json_string_or(job, "state", "?"), *reason = json_string_or(job, "reason", NULL);

        if (arg.json) {
                _cleanup_free_ char *s = json_dumps(job, JSON_COMPACT);
                printf("%s\n", s ?: "{}");
                return;
        }
        printf("%s %s %s %s%s%s\n", json_string_or(job, "job", "?"), state, json_string_or(job, "package", "?"),
               json_string_or(job, "version", "?"), reason ? ": " : "", reason ? reason : "");
}

/* Show a state change (and download progress on a terminal). */
static void job_show(json_t *job, char **last_state, bool tty) {
        const char *state = json_string_or(job, "state", "?"), *reason = json_string_or(job, "reason", NULL);
        json_t *p = json_object_get(job, "progress");
        bool changed = !*last_state || !streq(*last_state, state);

        if (tty && streq(state, "downloading") && json_is_object(p)) {
                bar("downloading", (uint64_t)json_integer_value(json_object_get(p, "bytes")),
                    (uint64_t)json_integer_value(json_object_get(p, "total")));
                if (changed) {
                        free(*last_state);
                        *last_state = strdup(state);
                }
                return;
        }
        if (!changed)
                return;
        if (tty && *last_state && streq(*last_state, "downloading"))
                fputc('\n', stderr);
        log_info("Job %s: %s%s%s%s", json_string_or(job, "job", "?"), state, reason ? " (" : "",
                 reason ? reason : "", reason ? ")" : "");
        free(*last_state);
        *last_state = strdup(state);
}

static int job_get(Api *a, const char *job, long long wait_seq, json_t **ret) {
        char path[256];
        long saved = arg.timeout_ms;
        int r;

        if (wait_seq >= 0)
                snprintf(path, sizeof(path), "/v1/ota/jobs/%s?wait=%lld", job, wait_seq);
        else
                snprintf(path, sizeof(path), "/v1/ota/jobs/%s", job);
        /* The cloud holds a waiting request for up to OTA_POLL_SEC. */
        arg.timeout_ms = (OTA_POLL_SEC + 15) * 1000L;
        r = api_request(a, path, NULL, ret);
        arg.timeout_ms = saved;
        if (r >= 0 && !json_is_object(*ret)) {
                json_decref(*ret);
                return log_error_errno(-EBADMSG, "Malformed job from %s", a->base);
        }
        return r;
}

static int follow(Api *a, const char *job, json_t *first) {
        _cleanup_free_ char *last = NULL;
        long long deadline_ms = arg.timeout_ms > 0 ? arg.timeout_ms : OTA_DEFAULT_WAIT_MS;
        unsigned long long start = now_usec();
        bool tty = isatty(STDERR_FILENO) && !arg.json;
        json_t *j = json_incref(first);
        int r;

        for (;;) {
                job_show(j, &last, tty);
                if (job_final(j))
                        break;
                if ((long long)((now_usec() - start) / 1000) >= deadline_ms) {
                        json_decref(j);
                        log_error("Timed out following job %s (still %s)", job, last ?: "?");
                        return -ETIMEDOUT;
                }
                {
                        long long seq = json_integer_value(json_object_get(j, "seq"));
                        json_t *next = NULL;

                        r = job_get(a, job, seq, &next);
                        if (r < 0) {
                                json_decref(j);
                                return r;
                        }
                        json_decref(j);
                        j = next;
                }
        }
        job_print(j);
        if (!streq(json_string_or(j, "state", ""), "committed")) {
                log_error("Job %s ended %s%s%s", job, json_string_or(j, "state", "?"),
                          json_string_or(j, "reason", NULL) ? ": " : "", json_string_or(j, "reason", ""));
                json_decref(j);
                return -ECANCELED;
        }
        json_decref(j);
        return 0;
}

static int start_job(Api *a, const char *device, const char *manifest, json_t **ret) {
        _cleanup_free_ char *url = NULL, *body = NULL;
        json_t *req = json_pack("{s:s}", "manifest", manifest), *res;
        struct curl_slist *headers = NULL;
        CURLcode c;

        if (!req)
                return -ENOMEM;
        body = json_dumps(req, JSON_COMPACT);
        json_decref(req);
        if (!body || asprintf(&url, "%s/v1/devices/%s", a->base, device) < 0)
                return log_error_errno(-ENOMEM, "Out of memory");
        for (struct curl_slist *h = a->headers; h; h = h->next)
                headers = curl_slist_append(headers, h->data);
        headers = curl_slist_append(headers, "Content-Type: application/json");
        if (!headers)
                return -ENOMEM;
        buffer_done(&a->body);
        a->body.max = TETHER_RESPONSE_MAX;
        a->errbuf[0] = 0;
        curl_easy_setopt(a->curl, CURLOPT_URL, url);
        curl_easy_setopt(a->curl, CURLOPT_CUSTOMREQUEST, "PUT");
        curl_easy_setopt(a->curl, CURLOPT_POSTFIELDS, body);
        curl_easy_setopt(a->curl, CURLOPT_POSTFIELDSIZE, (long)strlen(body));
        curl_easy_setopt(a->curl, CURLOPT_HTTPHEADER, headers);
        curl_easy_setopt(a->curl, CURLOPT_WRITEFUNCTION, body_write);
        curl_easy_setopt(a->curl, CURLOPT_WRITEDATA, a);
        api_set_timeouts(a, arg.timeout_ms > 0 && arg.timeout_ms < 60000 ? arg.timeout_ms : 60000);
        c = curl_easy_perform(a->curl);
        curl_easy_setopt(a->curl, CURLOPT_HTTPHEADER, a->headers);
        curl_slist_free_all(headers);
        curl_reset_method(a);
        if (c != CURLE_OK)
                return curl_error(a, c);
        curl_easy_getinfo(a->curl, CURLINFO_RESPONSE_CODE, &a->status);
        if (a->status == 409) {
                char text[TETHER_ERROR_TEXT_MAX + 1];
                error_text(&a->body, text, sizeof(text));
                log_error("The device is busy with another update (HTTP 409)%s%s", text[0] ? ": " : "", text);
                return -EBUSY;
        }
        if (a->status < 200 || a->status > 299)
                return http_error(a, "The cloud refused the manifest");
        res = json_loadb(a->body.data ?: "", a->body.len, 0, NULL);
        if (!json_is_object(json_object_get(res, "job"))) {
                json_decref(res);
                return log_error_errno(-EBADMSG, "Malformed response from %s: no \"job\"", a->base);
        }
        *ret = json_incref(json_object_get(res, "job"));
        json_decref(res);
        return 0;
}

static int ota_job_start(Api *a, const char *device, const char *path) {
        _cleanup_(deb_info_done) DebInfo deb = {};
        _cleanup_free_ char *url = NULL, *manifest = NULL;
        size_t len = 0;
        json_t *job = NULL;
        const char *id;
        int r;

        r = name_check(device, PROTO_NAME_DEVICE);
        if (r < 0)
                return r;
        if (!arg.ota_manifest && !key_path())
                return cli_usage_error("No update key: give --key FILE or set TETHER_OTA_KEY, or --manifest FILE");
        r = deb_info(path, &deb);
        if (r < 0)
                return r;
        r = upload(a, path, &deb, &url);
        if (r < 0)
                return r;
        if (arg.ota_manifest) {
                ManifestEnvelope env;
                Manifest m = {};
                const char *err;

                r = read_file(arg.ota_manifest, MANIFEST_MAX, &manifest, &len);
                if (r < 0)
                        return r;
                /* Catch the wrong file here rather than on the device. */
                if (manifest_envelope_split((const uint8_t *)manifest, len, &env) < 0 ||
                    manifest_body_parse(env.body, env.body_len, &m, &err) < 0)
                        return log_error_errno(-EINVAL, "'%s' is not a signed manifest", arg.ota_manifest);
                r = streq(m.sha256, deb.sha256) ? 0 : -EINVAL;
                if (r == 0) {
                        _cleanup_free_ char *why = NULL;

                        /* With tags only the device can tell. */
                        if (m.n_tags == 0 && manifest_check_target(&m, device, NULL, 0, &why) != MANIFEST_OK) {
                                manifest_done(&m);
                                return log_error_errno(-EINVAL, "'%s': %s", arg.ota_manifest,
                                                       why ? why : "not for this device");
                        }
                }
                manifest_done(&m);
                if (r < 0)
                        return log_error_errno(r, "The manifest '%s' is for another file than '%s'",
                                               arg.ota_manifest, path);
        } else {
                /* Over the device's connection unless --url names a server
                 * (the cloud's own HTTPS artifact server or another). */
                r = make_manifest(&deb, arg.ota_url, device, &manifest, &len);
                if (r < 0)
                        return r;
        }
        r = start_job(a, device, manifest, &job);
        if (r < 0)
                return r;
        id = json_string_or(job, "job", "?");
        if (arg.ota_no_wait) {
                if (arg.json)
                        job_print(job);
                else
                        printf("%s\n", id);
                json_decref(job);
                return 0;
        }
        log_info("Job %s: %s %s on %s", id, deb.control.package, deb.control.version, device);
        r = follow(a, id, job);
        json_decref(job);
        return r;
}

static int ota_status(Api *a, char **args, int n) {
        json_t *job = NULL;
        int r;

        if (n != 1)
                return cli_usage_error("'ota status' takes JOB");
        if (!ota_job_id_valid(args[0], strlen(args[0])))
                return cli_usage_error("Invalid job id '%s': a job id is %d lowercase hex digits", args[0],
                                       OTA_JOB_ID_MAX);
        r = job_get(a, args[0], -1, &job);
        if (r < 0)
                return r;
        job_print(job);
        json_decref(job);
        return 0;
}

static int ota_jobs(Api *a, char **args, int n) {
        json_t *jobs = NULL, *j;
        size_t i;
        int r;

        if (n != 0)
                return cli_usage_error("'ota jobs' takes no arguments");
        r = api_request(a, "/v1/ota/jobs", NULL, &jobs);
        if (r < 0)
                return r;
        if (arg.json)
                print_raw_body(a);
        else
                json_array_foreach(jobs, i, j)
                        printf("%s %s %s %s %s\n", json_string_or(j, "job", "?"), json_string_or(j, "device", "?"),
                               json_string_or(j, "state", "?"), json_string_or(j, "package", "?"),
                               json_string_or(j, "version", "?"));
        json_decref(jobs);
        return 0;
}

int cmd_ota(Api *a, char **args, int n) {
        int r;

        if (n < 1)
                return cli_usage_error("'ota' needs a command or DEVICE FILE.deb ('tether ota --help')");
        if (streq(args[0], "keygen"))
                return ota_keygen(args + 1, n - 1);
        if (streq(args[0], "keyid"))
                return ota_keyid(args + 1, n - 1);
        if (streq(args[0], "sign"))
                return ota_sign(args + 1, n - 1);
        if (streq(args[0], "upload"))
                return ota_upload(a, args + 1, n - 1);
        if (streq(args[0], "status"))
                return ota_status(a, args + 1, n - 1);
        if (streq(args[0], "jobs"))
                return ota_jobs(a, args + 1, n - 1);
        if (streq(args[0], "start")) {
                args++;
                n--;
        }
        if (n != 2)
                return cli_usage_error("'ota' takes DEVICE FILE.deb");
        r = ota_job_start(a, args[0], args[1]);
        return r == -ECANCELED ? -ECANCELED : r;
}
