/* SPDX-License-Identifier: Apache-2.0 */
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>

#include "ota-journal.h"
#include "util.h"

#define JOURNAL_MAX (64 * 1024)
#define JOURNAL_FORMAT 1

static const char *const state_names[_OTA_STATE_MAX] = {
        [OTA_STATE_NONE] = "none",
        [OTA_STATE_ACCEPTED] = "accepted",
        [OTA_STATE_DOWNLOADING] = "downloading",
        [OTA_STATE_DOWNLOADED] = "downloaded",
        [OTA_STATE_INSTALLING] = "installing",
        [OTA_STATE_INSTALLED] = "installed",
        [OTA_STATE_TRIAL] = "trial",
        [OTA_STATE_ROLLING_BACK] = "rolling-back",
        [OTA_STATE_COMMITTED] = "committed",
        [OTA_STATE_ROLLED_BACK] = "rolled-back",
        [OTA_STATE_REJECTED] = "rejected",
        [OTA_STATE_DEFERRED] = "deferred",
        [OTA_STATE_FAILED] = "failed",
};

const char *ota_state_to_string(OtaState s) {
        return s >= 0 && s < _OTA_STATE_MAX ? state_names[s] : "invalid";
}

OtaState ota_state_from_string(const char *s) {
        for (int i = 0; s && i < _OTA_STATE_MAX; i++)
                if (streq(state_names[i], s))
                        return (OtaState)i;
        return _OTA_STATE_MAX;
}

bool ota_state_final(OtaState s) {
        return s == OTA_STATE_COMMITTED || s == OTA_STATE_ROLLED_BACK || s == OTA_STATE_REJECTED ||
               s == OTA_STATE_DEFERRED || s == OTA_STATE_FAILED;
}

bool ota_state_helper_owned(OtaState s) {
        return s >= OTA_STATE_DOWNLOADED && s <= OTA_STATE_ROLLING_BACK;
}

OtaStep ota_resume(OtaState s) {
        switch (s) {
        case OTA_STATE_ACCEPTED:
        case OTA_STATE_DOWNLOADING:
                return OTA_STEP_DOWNLOAD;
        case OTA_STATE_DOWNLOADED:
                return OTA_STEP_INSTALL;
        case OTA_STATE_INSTALLING:
                /* dpkg may have been killed half-way: nothing about the new
                 * version can be trusted, put the old one back. */
                return OTA_STEP_ROLLBACK;
        case OTA_STATE_INSTALLED:
        case OTA_STATE_TRIAL:
                return OTA_STEP_TRIAL;
        case OTA_STATE_ROLLING_BACK:
                return OTA_STEP_ROLLBACK;
        case OTA_STATE_COMMITTED:
        case OTA_STATE_ROLLED_BACK:
        case OTA_STATE_REJECTED:
        case OTA_STATE_DEFERRED:
        case OTA_STATE_FAILED:
                return OTA_STEP_DELIVER;
        default:
                return OTA_STEP_NOTHING;
        }
}

OtaState ota_next(OtaState s, OtaOutcome o) {
        switch (s) {
        case OTA_STATE_ACCEPTED:
        case OTA_STATE_DOWNLOADING:
                return o == OTA_OK                               ? (s == OTA_STATE_ACCEPTED ? OTA_STATE_DOWNLOADING
                                                                                           : OTA_STATE_DOWNLOADED)
                       : o == OTA_REJECT                         ? OTA_STATE_REJECTED
                       : o == OTA_CRASHED                        ? OTA_STATE_DOWNLOADING
                                                                 : OTA_STATE_FAILED;
        case OTA_STATE_DOWNLOADED:
                return o == OTA_OK       ? OTA_STATE_INSTALLING
                       : o == OTA_REJECT ? OTA_STATE_REJECTED
                       : o == OTA_LOCKED ? OTA_STATE_DEFERRED
                       : o == OTA_CRASHED ? OTA_STATE_DOWNLOADED
                                          : OTA_STATE_FAILED;
        case OTA_STATE_INSTALLING:
                /* dpkg did not run at all when the lock was lost to a race. */
                return o == OTA_OK ? OTA_STATE_INSTALLED : o == OTA_LOCKED ? OTA_STATE_DEFERRED : OTA_STATE_ROLLING_BACK;
        case OTA_STATE_INSTALLED:
                return o == OTA_OK || o == OTA_CRASHED ? OTA_STATE_TRIAL : OTA_STATE_ROLLING_BACK;
        case OTA_STATE_TRIAL:
                return o == OTA_OK ? OTA_STATE_COMMITTED : o == OTA_CRASHED ? OTA_STATE_TRIAL : OTA_STATE_ROLLING_BACK;
        case OTA_STATE_ROLLING_BACK:
                return o == OTA_OK ? OTA_STATE_ROLLED_BACK : o == OTA_CRASHED ? OTA_STATE_ROLLING_BACK : OTA_STATE_FAILED;
        default:
                return s;
        }
}

void ota_journal_done(OtaJournal *j) {
        if (!j)
                return;
        free(j->manifest);
        free(j->package);
        free(j->version);
        free(j->plugin);
        free(j->code);
        free(j->reason);
        free(j->dl_etag);
        free(j->prev_version);
        free(j->prev_deb);
        free(j->health_token);
        free(j->health_phase);
        *j = (OtaJournal){};
}

bool ota_job_id_valid(const char *s, size_t n) {
        if (n != OTA_JOB_ID_MAX)
                return false;
        for (size_t i = 0; i < n; i++)
                if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
                        return false;
        return true;
}

char *ota_floor_for(const char *cache_dir, const char *package) {
        _cleanup_free_ char *path = NULL, *text = NULL;
        json_t *f;
        char *v = NULL;

        if (asprintf(&path, "%s/floors.json", cache_dir) < 0 || ota_read_file(path, 65536, &text, NULL) < 0)
                return NULL;
        f = json_loads(text, 0, NULL);
        if (json_is_string(json_object_get(f, package)))
                v = strdup(json_string_value(json_object_get(f, package)));
        json_decref(f);
        return v;
}

static int nonce_entry_expires(json_t *e, int64_t *ret) {
        json_t *x = json_object_get(e, "expires");

        if (!json_is_string(json_object_get(e, "nonce")) || !json_is_string(json_object_get(e, "job")) ||
            !json_is_integer(x))
                return -EBADMSG;
        *ret = json_integer_value(x);
        return 0;
}

int ota_nonce_claim(const char *dir, const char *nonce, const char *job, int64_t expires, int64_t now,
                    unsigned *ret_dropped, char **ret_job) {
        _cleanup_free_ char *path = NULL, *text = NULL, *out = NULL;
        json_t *root = NULL, *list, *e, *keep = NULL;
        unsigned dropped = 0;
        size_t i;
        int r;

        if (asprintf(&path, "%s/" OTA_NONCES_FILE, dir) < 0)
                return -ENOMEM;
        r = ota_read_file(path, 1024 * 1024, &text, NULL);
        if (r == -ENOENT)
                root = json_pack("{s:i, s:[]}", "version", 1, "nonces");
        else if (r < 0)
                return r == -EFBIG ? -EBADMSG : r;
        else
                root = json_loads(text, JSON_REJECT_DUPLICATES, NULL);
        list = json_object_get(root, "nonces");
        if (!json_is_array(list)) {
                r = root ? -EBADMSG : -ENOMEM;
                goto out;
        }
        json_array_foreach(list, i, e) {
                int64_t x;

                if (nonce_entry_expires(e, &x) < 0) {
                        r = -EBADMSG;
                        goto out;
                }
                if (streq(json_string_value(json_object_get(e, "nonce")), nonce)) {
                        if (ret_job && !(*ret_job = strdup(json_string_value(json_object_get(e, "job"))))) {
                                r = -ENOMEM;
                                goto out;
                        }
                        r = -EEXIST;
                        goto out;
                }
        }
        /* New: keep what has not expired (with grace), drop the soonest to
         * expire while full, add it. */
        keep = json_array();
        if (!keep) {
                r = -ENOMEM;
                goto out;
        }
        json_array_foreach(list, i, e) {
                int64_t x = 0;

                (void)nonce_entry_expires(e, &x);
                if (x > INT64_MAX - OTA_NONCE_GRACE_SEC || x + OTA_NONCE_GRACE_SEC > now)
                        json_array_append(keep, e);
        }
        while (json_array_size(keep) >= OTA_NONCES_MAX) {
                size_t min_i = 0;
                int64_t min_x = INT64_MAX, x = 0;

                json_array_foreach(keep, i, e)
                        if (nonce_entry_expires(e, &x) >= 0 && x < min_x) {
                                min_x = x;
                                min_i = i;
                        }
                json_array_remove(keep, min_i);
                dropped++;
        }
        if (json_array_append_new(keep, json_pack("{s:s, s:s, s:I}", "nonce", nonce, "job", job, "expires",
                                                  (json_int_t)expires)) < 0 ||
            json_object_set(root, "nonces", keep) < 0) {
                r = -ENOMEM;
                goto out;
        }
        out = json_dumps(root, JSON_COMPACT);
        if (!out) {
                r = -ENOMEM;
                goto out;
        }
        r = ota_write_file_atomic(dir, OTA_NONCES_FILE, out, strlen(out), 0640, (uid_t)-1, (gid_t)-1);
        if (r >= 0 && ret_dropped)
                *ret_dropped = dropped;
out:
        json_decref(keep);
        json_decref(root);
        return r;
}

int ota_mkdir_p(const char *path, mode_t mode) {
        _cleanup_free_ char *p = strdup(path);

        if (!p)
                return -ENOMEM;
        for (char *s = p + 1; *s; s++) {
                if (*s != '/')
                        continue;
                *s = 0;
                if (mkdir(p, 0755) < 0 && errno != EEXIST)
                        return -errno;
                *s = '/';
        }
        if (mkdir(p, mode) < 0 && errno != EEXIST)
                return -errno;
        return 0;
}

int ota_read_file(const char *path, size_t max, char **ret, size_t *ret_len) {
        _cleanup_close_ int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
        _cleanup_free_ char *buf = NULL;
        size_t len = 0;

        if (fd < 0)
                return -errno;
        buf = malloc(max + 1);
        if (!buf)
                return -ENOMEM;
        for (;;) {
                ssize_t n = read(fd, buf + len, max + 1 - len);

                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0)
                        return -errno;
                if (n == 0)
                        break;
                len += (size_t)n;
                if (len > max)
                        return -EFBIG;
        }
        buf[len] = 0;
        *ret = TAKE_PTR(buf);
        if (ret_len)
                *ret_len = len;
        return 0;
}

int ota_write_file_atomic(const char *dir, const char *name, const char *data, size_t len, mode_t mode,
                          uid_t owner, gid_t group) {
        _cleanup_free_ char *tmp = NULL, *path = NULL;
        _cleanup_close_ int dfd = -1;
        int fd, r = 0;

        if (asprintf(&tmp, "%s/.%s.tmp", dir, name) < 0 || asprintf(&path, "%s/%s", dir, name) < 0)
                return -ENOMEM;
        fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, mode);
        if (fd < 0)
                return -errno;
        while (len > 0) {
                ssize_t n = write(fd, data, len);

                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0) {
                        r = -errno;
                        break;
                }
                data += n;
                len -= (size_t)n;
        }
        if (r == 0 && owner != (uid_t)-1 && fchown(fd, owner, group) < 0)
                r = -errno;
        if (r == 0 && fchmod(fd, mode) < 0)
                r = -errno;
        if (r == 0 && fsync(fd) < 0)
                r = -errno;
        if (close(fd) < 0 && r == 0)
                r = -errno;
        if (r == 0 && rename(tmp, path) < 0)
                r = -errno;
        if (r < 0) {
                (void)unlink(tmp);
                return r;
        }
        /* The rename is durable only once the directory is. */
        dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dfd < 0 || fsync(dfd) < 0)
                return -errno;
        return 0;
}

static int take_string(json_t *o, const char *key, char **ret) {
        json_t *v = json_object_get(o, key);

        *ret = NULL;
        if (!v || json_is_null(v))
                return 0;
        if (!json_is_string(v))
                return -EBADMSG;
        *ret = strdup(json_string_value(v));
        return *ret ? 0 : -ENOMEM;
}

int ota_journal_load(const char *dir, OtaJournal *ret) {
        _cleanup_free_ char *path = NULL, *text = NULL, *state = NULL;
        _cleanup_(ota_journal_done) OtaJournal j = {};
        const char *job, *sha;
        json_t *o;
        size_t len;
        int r;

        if (asprintf(&path, "%s/%s", dir, OTA_JOURNAL_FILE) < 0)
                return -ENOMEM;
        r = ota_read_file(path, JOURNAL_MAX, &text, &len);
        if (r < 0)
                return r == -EFBIG ? -EBADMSG : r;
        o = json_loadb(text, len, JSON_REJECT_DUPLICATES, NULL);
        if (!json_is_object(o) || json_integer_value(json_object_get(o, "format")) != JOURNAL_FORMAT) {
                json_decref(o);
                return -EBADMSG;
        }
        job = json_string_value(json_object_get(o, "job"));
        if (!job || strlen(job) == 0 || strlen(job) > OTA_JOB_ID_MAX) {
                json_decref(o);
                return -EBADMSG;
        }
        snprintf(j.job, sizeof(j.job), "%s", job);
        r = take_string(o, "manifest", &j.manifest);
        if (r >= 0)
                r = take_string(o, "package", &j.package);
        if (r >= 0)
                r = take_string(o, "version", &j.version);
        if (r >= 0)
                r = take_string(o, "plugin", &j.plugin);
        if (r >= 0)
                r = take_string(o, "state", &state);
        if (r >= 0)
                r = take_string(o, "code", &j.code);
        if (r >= 0)
                r = take_string(o, "reason", &j.reason);
        if (r >= 0)
                r = take_string(o, "dl_etag", &j.dl_etag);
        if (r >= 0)
                r = take_string(o, "prev_version", &j.prev_version);
        if (r >= 0)
                r = take_string(o, "prev_deb", &j.prev_deb);
        if (r >= 0)
                r = take_string(o, "health_token", &j.health_token);
        if (r >= 0)
                r = take_string(o, "health_phase", &j.health_phase);
        if (r < 0) {
                json_decref(o);
                return r;
        }
        j.state = ota_state_from_string(state);
        j.seq = (uint64_t)json_integer_value(json_object_get(o, "seq"));
        j.delivered = json_is_true(json_object_get(o, "delivered"));
        j.dl_offset = (uint64_t)json_integer_value(json_object_get(o, "dl_offset"));
        j.dl_attempts = (unsigned)json_integer_value(json_object_get(o, "dl_attempts"));
        j.prev_known = json_is_true(json_object_get(o, "prev_known"));
        j.hold_ms = (uint64_t)json_integer_value(json_object_get(o, "hold_ms"));
        sha = json_string_value(json_object_get(o, "dl_sha256"));
        snprintf(j.dl_sha256, sizeof(j.dl_sha256), "%s", sha ? sha : "");
        json_decref(o);
        if (j.state == _OTA_STATE_MAX || j.state == OTA_STATE_NONE || !j.manifest)
                return -EBADMSG;
        *ret = j;
        /* cppcheck-suppress unreadVariable ; moved to *ret; the _cleanup_ handler reads it */
        j = (OtaJournal){};
        return 0;
}

int ota_journal_save(const char *dir, const OtaJournal *j, uid_t owner, gid_t group) {
        _cleanup_free_ char *text = NULL;
        json_t *o;
        int r;

        o = json_pack("{s:i, s:s, s:s?, s:s?, s:s?, s:s?, s:s, s:I, s:s?, s:s?, s:b, s:I, s:s, s:s?, s:i, s:b, s:s?, "
                      "s:s?, s:s?, s:s?, s:I}",
                      "format", JOURNAL_FORMAT, "job", j->job, "manifest", j->manifest, "package", j->package,
                      "version", j->version, "plugin", j->plugin, "state", ota_state_to_string(j->state), "seq",
                      (json_int_t)j->seq, "code", j->code, "reason", j->reason, "delivered", j->delivered,
                      "dl_offset", (json_int_t)j->dl_offset, "dl_sha256", j->dl_sha256, "dl_etag", j->dl_etag,
                      "dl_attempts", (int)j->dl_attempts, "prev_known", j->prev_known, "prev_version",
                      j->prev_version, "prev_deb", j->prev_deb, "health_token", j->health_token, "health_phase",
                      j->health_phase, "hold_ms", (json_int_t)j->hold_ms);
        if (!o)
                return -ENOMEM;
        text = json_dumps(o, JSON_INDENT(1) | JSON_SORT_KEYS);
        json_decref(o);
        if (!text)
                return -ENOMEM;
        r = ota_write_file_atomic(dir, OTA_JOURNAL_FILE, text, strlen(text), 0640, owner, group);
        return r;
}

static int set_text(char **dst, const char *v) {
        char *c = NULL;

        if (v && !(c = strdup(v)))
                return -ENOMEM;
        free(*dst);
        *dst = c;
        return 0;
}

int ota_journal_transition(const char *dir, OtaJournal *j, OtaState state, const char *code, const char *reason,
                           unsigned max_transitions, uid_t owner, gid_t group) {
        OtaJournal next;
        int r;

        if (max_transitions == 0)
                max_transitions = OTA_DEFAULT_MAX_TRANSITIONS;
        if (!ota_state_final(state)) {
                uint64_t limit = max_transitions;

                if (state == OTA_STATE_ROLLING_BACK)
                        limit += OTA_ROLLBACK_EXTRA_TRANSITIONS;
                if (j->seq >= limit)
                        return -ELOOP;
        }
        /* Change a copy: on failure *j still says what is on disk. */
        next = *j;
        next.code = next.reason = NULL;
        if (set_text(&next.code, code) < 0 || set_text(&next.reason, reason) < 0) {
                free(next.code);
                free(next.reason);
                return -ENOMEM;
        }
        next.state = state;
        next.seq = j->seq + 1;
        next.delivered = false;
        r = ota_journal_save(dir, &next, owner, group);
        if (r < 0) {
                free(next.code);
                free(next.reason);
                return r;
        }
        free(j->code);
        free(j->reason);
        *j = next;
        ota_crash_point(ota_state_to_string(state));
        return 0;
}

#if ENABLE_FAULT_INJECTION
void ota_crash_point(const char *name) {
        static unsigned total;
        static struct {
                char name[32];
                unsigned n;
        } seen[16];
        const char *want = getenv("TETHER_OTA_CRASH_AT"), *hash, *once;
        unsigned count = 0, nth = 1;
        size_t wlen;

        if (!want || !*want)
                return;
        total++;
        hash = strchr(want, '#');
        wlen = hash ? (size_t)(hash - want) : strlen(want);
        if (hash)
                nth = (unsigned)strtoul(hash + 1, NULL, 10);
        if (wlen == 0) {
                /* "#N": the N-th crash point of any name */
                if (total == nth && (!(once = getenv("TETHER_OTA_CRASH_ONCE")) || !*once || unlink(once) == 0))
                        raise(SIGKILL);
                return;
        }
        if (strlen(name) != wlen || strncmp(name, want, wlen) != 0)
                return;
        for (size_t i = 0; i < ELEMENTSOF(seen); i++) {
                if (!seen[i].name[0]) {
                        snprintf(seen[i].name, sizeof(seen[i].name), "%s", name);
                        count = ++seen[i].n;
                        break;
                }
                if (streq(seen[i].name, name)) {
                        count = ++seen[i].n;
                        break;
                }
        }
        if (count != nth)
                return;
        /* With TETHER_OTA_CRASH_ONCE=FILE, only the process that removes
         * FILE crashes: one crash across restarts. */
        once = getenv("TETHER_OTA_CRASH_ONCE");
        if (once && *once && unlink(once) < 0)
                return;
        raise(SIGKILL);
}
#endif

void ota_health_done(OtaHealth *h) {
        if (!h)
                return;
        free(h->job);
        free(h->token);
        free(h->code);
        free(h->reason);
        *h = (OtaHealth){};
}

int ota_health_load(const char *dir, OtaHealth *ret) {
        _cleanup_free_ char *path = NULL, *text = NULL;
        OtaHealth h = {};
        json_t *o;
        size_t len;
        int r;

        if (asprintf(&path, "%s/%s", dir, OTA_HEALTH_FILE) < 0)
                return -ENOMEM;
        r = ota_read_file(path, 8192, &text, &len);
        if (r < 0)
                return r;
        o = json_loadb(text, len, 0, NULL);
        if (!json_is_object(o) || !json_is_string(json_object_get(o, "token"))) {
                json_decref(o);
                return -EBADMSG;
        }
        r = take_string(o, "job", &h.job);
        if (r >= 0)
                r = take_string(o, "token", &h.token);
        if (r >= 0)
                r = take_string(o, "code", &h.code);
        if (r >= 0)
                r = take_string(o, "reason", &h.reason);
        h.healthy = json_is_true(json_object_get(o, "healthy"));
        h.pid = (pid_t)json_integer_value(json_object_get(o, "pid"));
        json_decref(o);
        if (r < 0) {
                ota_health_done(&h);
                return r;
        }
        *ret = h;
        return 0;
}

int ota_health_save(const char *dir, const OtaHealth *h) {
        _cleanup_free_ char *text = NULL;
        json_t *o = json_pack("{s:s?, s:s, s:b, s:s?, s:s?, s:i}", "job", h->job, "token", h->token, "healthy",
                              h->healthy, "code", h->code, "reason", h->reason, "pid", (int)h->pid);

        if (!o)
                return -ENOMEM;
        text = json_dumps(o, JSON_COMPACT);
        json_decref(o);
        if (!text)
                return -ENOMEM;
        return ota_write_file_atomic(dir, OTA_HEALTH_FILE, text, strlen(text), 0640, (uid_t)-1, (gid_t)-1);
}
