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
#include "tether-ota-sign.h"

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
        r = cli_read_file(args[0], 16384, &pem, &len);
        if (r < 0)
                return r;
        if (manifest_key_id_pem(pem, len, id) < 0)
                return log_error_errno(-EBADMSG, "'%s' is not an Ed25519 key", args[0]);
        printf("%s\n", id);
        return 0;
}

/* ---- sign --------------------------------------------------------------- */

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
        char *devices[MANIFEST_TARGETS_MAX + 1];
        size_t n_devices = 0;
        int r;

        r = manifest_targets(device, devices, &n_devices);
        if (r < 0)
                return r;
        return ota_sign_manifest(deb, url, (const char *const *)devices, n_devices, arg.ota_tags, arg.n_ota_tags,
                                 ret, ret_len);
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

static int ota_upload(Api *a, char **args, int n) {
        _cleanup_(deb_info_done) DebInfo deb = {};
        _cleanup_free_ char *url = NULL;
        int r;

        if (n != 1)
                return cli_usage_error("'ota upload' takes FILE.deb");
        r = deb_info(args[0], &deb);
        if (r < 0)
                return r;
        r = ota_upload_artifact(a, args[0], &deb, &url);
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
                ota_bar("downloading", (uint64_t)json_integer_value(json_object_get(p, "bytes")),
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
        json_t *req = json_pack("{s:s, s:s}", "device", device, "manifest", manifest), *res;
        struct curl_slist *headers = NULL;
        CURLcode c;

        if (!req)
                return -ENOMEM;
        body = json_dumps(req, JSON_COMPACT);
        json_decref(req);
        if (!body || asprintf(&url, "%s/v1/ota/jobs", a->base) < 0)
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
        curl_easy_setopt(a->curl, CURLOPT_POSTFIELDS, body);
        curl_easy_setopt(a->curl, CURLOPT_POSTFIELDSIZE, (long)strlen(body));
        curl_easy_setopt(a->curl, CURLOPT_HTTPHEADER, headers);
        curl_easy_setopt(a->curl, CURLOPT_WRITEFUNCTION, body_write);
        curl_easy_setopt(a->curl, CURLOPT_WRITEDATA, a);
        api_set_timeouts(a, arg.timeout_ms > 0 && arg.timeout_ms < 60000 ? arg.timeout_ms : 60000);
        c = curl_easy_perform(a->curl);
        curl_easy_setopt(a->curl, CURLOPT_HTTPHEADER, a->headers);
        curl_slist_free_all(headers);
        ota_curl_reset_method(a);
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
        if (!arg.ota_manifest && !ota_key_path())
                return cli_usage_error("No update key: give --key FILE or set TETHER_OTA_KEY, or --manifest FILE");
        r = deb_info(path, &deb);
        if (r < 0)
                return r;
        r = ota_upload_artifact(a, path, &deb, &url);
        if (r < 0)
                return r;
        if (arg.ota_manifest) {
                ManifestEnvelope env;
                Manifest m = {};
                const char *err;

                r = cli_read_file(arg.ota_manifest, MANIFEST_MAX, &manifest, &len);
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
