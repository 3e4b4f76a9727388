/* SPDX-License-Identifier: Apache-2.0 */
/* tether-ota-helper: the privileged half of OTA (docs/ota.md).
 *
 *   tether-ota-helper run [--config FILE]        continue the journaled job
 *   tether-ota-helper seed FILE.deb [--config]   keep FILE.deb, the installed
 *                                                version, for rollback
 *
 * Started outside tetherd's cgroup (tether-ota-helper.path, or a transient
 * unit, or for tests a detached process), so that the agent's own postinst
 * restarting tetherd cannot kill the install. It trusts nothing the agent
 * wrote: it verifies the signed manifest again, copies the .deb into its
 * own root-owned cache and checks the copy, and keeps what it needs for a
 * rollback (the previous version and its .deb) in that cache too. It waits
 * for the dpkg lock without ever removing it, runs dpkg non-interactively
 * with stdin closed, and judges health from the agent's verdict plus, under
 * systemd, the agent unit's own state.
 *
 * A one-shot tool: it blocks (in poll(), on fcntl locks, on dpkg), which is
 * what it is for; tetherd's loop never waits for it. */
#include <dirent.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <jansson.h>
#include <poll.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/inotify.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <systemd/sd-bus.h>
#include <openssl/evp.h>
#include <time.h>

#include "agent-config.h"
#include "debfile.h"
#include "debversion.h"
#include "log.h"
#include "manifest.h"
#include "ota-install.h"
#include "ota-journal.h"
#include "util.h"

#define INCOMING "incoming.deb"
#define PRIVATE_STATE "current.json"
#define OUTPUT_TAIL 2048
#define MIB ((uint64_t)1024 * 1024)

typedef struct Helper {
        const Config *cfg;
        const char *state_dir;
        const char *cache_dir;
        char *admindir;
        bool chroot_root;  /* DpkgRoot is not "/" */
        uid_t owner;
        gid_t group;
        char *arch;
        int lock_frontend, lock_db;

        /* what prepare() found, kept in CacheDirectory/current.json */
        char *job;
        char *manifest; /* the envelope it verified */
        char *package, *version, *architecture, *sha256, *min_version;
        bool prev_known;
        char *prev_version;
        char *prev_deb;
} Helper;

static volatile sig_atomic_t alarmed;

static void on_alarm(int sig) {
        alarmed = 1;
}

static void helper_forget(Helper *h) {
        free(h->job);
        free(h->manifest);
        free(h->package);
        free(h->version);
        free(h->architecture);
        free(h->sha256);
        free(h->min_version);
        free(h->prev_version);
        free(h->prev_deb);
        h->job = h->manifest = h->package = h->version = h->architecture = h->sha256 = h->min_version = NULL;
        h->prev_version = h->prev_deb = NULL;
        h->prev_known = false;
}

static int cache_path(Helper *h, const char *name, char **ret) {
        return asprintf(ret, "%s/%s", h->cache_dir, name) < 0 ? -ENOMEM : 0;
}

static int state_path(Helper *h, const char *name, char **ret) {
        return asprintf(ret, "%s/%s", h->state_dir, name) < 0 ? -ENOMEM : 0;
}

static void set(char **dst, const char *fmt, ...) _printf_(2, 3);
static void set(char **dst, const char *fmt, ...) {
        va_list ap;

        if (!dst)
                return;
        va_start(ap, fmt);
        if (vasprintf(dst, fmt, ap) < 0)
                *dst = NULL;
        va_end(ap);
}

/* ---- the private record ------------------------------------------------------ */

static int private_save(Helper *h) {
        _cleanup_free_ char *text = NULL;
        json_t *o = json_pack("{s:s, s:s, s:s, s:s, s:s, s:s, s:s?, s:b, s:s?, s:s?}", "job", h->job, "manifest",
                              h->manifest, "package", h->package, "version", h->version, "architecture",
                              h->architecture, "sha256", h->sha256, "min_version", h->min_version, "prev_known",
                              h->prev_known, "prev_version", h->prev_version, "prev_deb", h->prev_deb);

        if (!o)
                return -ENOMEM;
        text = json_dumps(o, JSON_INDENT(1));
        json_decref(o);
        if (!text)
                return -ENOMEM;
        return ota_write_file_atomic(h->cache_dir, PRIVATE_STATE, text, strlen(text), 0600, (uid_t)-1, (gid_t)-1);
}

static void private_load(Helper *h) {
        _cleanup_free_ char *path = NULL, *text = NULL;
        json_t *o;

        if (cache_path(h, PRIVATE_STATE, &path) < 0 || ota_read_file(path, 65536, &text, NULL) < 0)
                return;
        o = json_loads(text, 0, NULL);
#define S(k) (json_string_value(json_object_get(o, k)) ? strdup(json_string_value(json_object_get(o, k))) : NULL)
        h->job = S("job");
        h->manifest = S("manifest");
        h->package = S("package");
        h->version = S("version");
        h->architecture = S("architecture");
        h->sha256 = S("sha256");
        h->min_version = S("min_version");
        h->prev_version = S("prev_version");
        h->prev_deb = S("prev_deb");
#undef S
        h->prev_known = json_is_true(json_object_get(o, "prev_known"));
        json_decref(o);
}

static bool private_for(Helper *h, const OtaJournal *j) {
        return h->job && h->prev_known && streq(h->job, j->job);
}

/* ---- dpkg ------------------------------------------------------------------------ */

/* dpkg-query for the installed version: 1 and *ret_version when installed
 * ("ii"), 0 when not (or only its conffiles are left), -EBUSY when dpkg has
 * it half-way (half-installed, unpacked, half-configured, triggers). */
static int installed_version(Helper *h, const char *package, char **ret_version, char **ret_arch) {
        _cleanup_free_ char *root = NULL;
        const char *argv[8];
        char buf[512], *tab1, *tab2;
        size_t len = 0, n = 0;
        int r;

        argv[n++] = "dpkg-query";
        if (h->chroot_root) {
                if (asprintf(&root, "--root=%s", h->cfg->ota.dpkg_root) < 0)
                        return -ENOMEM;
                argv[n++] = root;
        }
        argv[n++] = "--showformat=${Version}\\t${Architecture}\\t${db:Status-Abbrev}";
        argv[n++] = "--show";
        argv[n++] = package;
        argv[n] = NULL;
        r = debfile_run_capture(argv, buf, sizeof(buf) - 1, &len);
        if (r < 0)
                return r;
        if (r == 127)
                return -ENOENT;
        if (r != 0 || len == 0)
                return 0; /* no such package */
        buf[len] = 0;
        tab1 = strchr(buf, '\t');
        tab2 = tab1 ? strchr(tab1 + 1, '\t') : NULL;
        if (!tab2)
                return -EBADMSG;
        *tab1 = *tab2 = 0;
        if (startswith(tab2 + 1, "ii")) {
                if (ret_version)
                        *ret_version = strdup(buf);
                if (ret_arch)
                        *ret_arch = strdup(tab1 + 1);
                return 1;
        }
        if (startswith(tab2 + 1, "un") || startswith(tab2 + 1, "rc") || startswith(tab2 + 1, "pn"))
                return 0;
        return -EBUSY;
}

/* dpkg ARGS..., non-interactively, stdin closed, output logged. 0 on exit
 * 0; -EAGAIN if dpkg found its database locked; else -EPROTO with the last
 * error line in *ret_error. */
static int run_dpkg(Helper *h, bool frontend_locked, char **ret_error, const char *a1, const char *a2) {
        _cleanup_free_ char *root = NULL;
        const char *argv[12];
        char tail[OUTPUT_TAIL] = "", last_error[1024] = "", line[1024];
        size_t n = 0, ll = 0, tl = 0;
        int fds[2], st;
        pid_t pid;

        argv[n++] = "dpkg";
        if (h->chroot_root) {
                if (asprintf(&root, "--root=%s", h->cfg->ota.dpkg_root) < 0)
                        return -ENOMEM;
                argv[n++] = root;
                /* A scratch root has no shell to chroot into: run the
                 * maintainer scripts on the host, with DPKG_ROOT set. */
                argv[n++] = "--force-script-chrootless";
                /* A scratch root may be a developer's own (tools/dev):
                 * dpkg refuses to run unprivileged unless told. */
                if (geteuid() != 0)
                        argv[n++] = "--force-not-root";
        }
        argv[n++] = "--force-confdef";
        argv[n++] = "--force-confold";
        argv[n++] = a1;
        if (a2)
                argv[n++] = a2;
        argv[n] = NULL;

        if (pipe2(fds, O_CLOEXEC) < 0)
                return -errno;
        pid = fork();
        if (pid < 0)
                return -errno;
        if (pid == 0) {
                int null = open("/dev/null", O_RDONLY | O_CLOEXEC);

                dup2(null, STDIN_FILENO);
                dup2(fds[1], STDOUT_FILENO);
                dup2(fds[1], STDERR_FILENO);
                setenv("DEBIAN_FRONTEND", "noninteractive", 1);
                setenv("UCF_FORCE_CONFFOLD", "1", 1);
                setenv("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", 1);
                if (frontend_locked)
                        setenv("DPKG_FRONTEND_LOCKED", "1", 1);
                else
                        unsetenv("DPKG_FRONTEND_LOCKED");
                execvp("dpkg", (char *const *)argv);
                _exit(127);
        }
        close(fds[1]);
        log_info("Running dpkg %s%s%s", a1, a2 ? " " : "", a2 ? a2 : "");
        for (;;) {
                char buf[4096];
                ssize_t k = read(fds[0], buf, sizeof(buf));

                if (k < 0 && errno == EINTR)
                        continue;
                if (k <= 0)
                        break;
                for (ssize_t i = 0; i < k; i++) {
                        if (buf[i] != '\n' && ll < sizeof(line) - 1) {
                                line[ll++] = buf[i];
                                continue;
                        }
                        if (buf[i] != '\n')
                                continue;
                        line[ll] = 0;
                        log_info("dpkg: %s", line);
                        if (strstr(line, "error") || strstr(line, "returned"))
                                snprintf(last_error, sizeof(last_error), "%s", line);
                        if (tl + ll + 2 < sizeof(tail)) {
                                memcpy(tail + tl, line, ll);
                                tl += ll;
                                tail[tl++] = '\n';
                                tail[tl] = 0;
                        }
                        ll = 0;
                }
        }
        close(fds[0]);
        while (waitpid(pid, &st, 0) < 0)
                if (errno != EINTR)
                        return -errno;
        if (WIFEXITED(st) && WEXITSTATUS(st) == 0)
                return 0;
        if (strstr(tail, "locked by another process") || strstr(tail, "lock was locked"))
                return -EAGAIN;
        if (ret_error)
                set(ret_error, "dpkg %s failed (%s %d): %s", a1, WIFEXITED(st) ? "exit status" : "signal",
                    WIFEXITED(st) ? WEXITSTATUS(st) : WTERMSIG(st), last_error[0] ? last_error : "see the log");
        return -EPROTO;
}

/* ---- the dpkg lock: fcntl locks, waited for, never removed ------------------------ */

static void holder(int fd, char *buf, size_t size) {
        struct flock fl = { .l_type = F_WRLCK, .l_whence = SEEK_SET };
        _cleanup_free_ char *path = NULL, *comm = NULL;

        snprintf(buf, size, "another process");
        if (fcntl(fd, F_GETLK, &fl) < 0 || fl.l_type == F_UNLCK)
                return;
        if (asprintf(&path, "/proc/%d/comm", (int)fl.l_pid) >= 0 && ota_read_file(path, 64, &comm, NULL) >= 0) {
                comm[strcspn(comm, "\n")] = 0;
                snprintf(buf, size, "process %d (%s)", (int)fl.l_pid, comm);
        } else
                snprintf(buf, size, "process %d", (int)fl.l_pid);
}

/* Wait for a write lock on fd until deadline (CLOCK_MONOTONIC µs): F_SETLKW
 * interrupted by a timer. 0, or -ETIMEDOUT. */
static int wait_lock(int fd, unsigned long long deadline) {
        struct flock fl = { .l_type = F_WRLCK, .l_whence = SEEK_SET };
        struct sigaction sa = { .sa_handler = on_alarm }; /* no SA_RESTART */
        struct itimerval it = {};
        unsigned long long now;
        int r;

        if (fcntl(fd, F_SETLK, &fl) == 0)
                return 0;
        if (errno != EAGAIN && errno != EACCES)
                return -errno;
        now = now_usec();
        if (now >= deadline)
                return -ETIMEDOUT;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGALRM, &sa, NULL);
        it.it_value.tv_sec = (time_t)((deadline - now) / 1000000ULL);
        it.it_value.tv_usec = (suseconds_t)((deadline - now) % 1000000ULL);
        alarmed = 0;
        setitimer(ITIMER_REAL, &it, NULL);
        r = fcntl(fd, F_SETLKW, &fl) == 0 ? 0 : -errno;
        memset(&it, 0, sizeof(it));
        setitimer(ITIMER_REAL, &it, NULL);
        if (r == -EINTR && alarmed)
                return -ETIMEDOUT;
        return r;
}

static void h_unlock(void *userdata) {
        Helper *h = userdata;

        if (h->lock_frontend >= 0)
                close(h->lock_frontend);
        if (h->lock_db >= 0)
                close(h->lock_db);
        h->lock_frontend = h->lock_db = -1;
}

static OtaOutcome lock_for(Helper *h, uint64_t timeout_ms, char **code, char **reason) {
        _cleanup_free_ char *front = NULL, *db = NULL;
        unsigned long long start = now_usec(), deadline = start + timeout_ms * 1000ULL;
        char who[128];
        int r;

        if (asprintf(&front, "%s/lock-frontend", h->admindir) < 0 || asprintf(&db, "%s/lock", h->admindir) < 0)
                return OTA_FAIL;
        /* Opening (or creating) them is harmless; removing them never is. */
        h->lock_frontend = open(front, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0640);
        h->lock_db = open(db, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0640);
        if (h->lock_frontend < 0 || h->lock_db < 0) {
                log_error_errno(errno, "Cannot open the dpkg locks in '%s': %m", h->admindir);
                h_unlock(h);
                set(code, "io");
                set(reason, "cannot open the dpkg lock files");
                return OTA_FAIL;
        }
        /* As a frontend (like apt): hold lock-frontend while dpkg runs. */
        r = wait_lock(h->lock_frontend, deadline);
        if (r == -ETIMEDOUT || r == 0) {
                if (r == 0) {
                        /* and wait for a dpkg run without a frontend, then
                         * leave the database lock to the dpkg we start */
                        struct flock un = { .l_type = F_UNLCK, .l_whence = SEEK_SET };

                        r = wait_lock(h->lock_db, deadline);
                        if (r == -ETIMEDOUT)
                                holder(h->lock_db, who, sizeof(who));
                        (void)fcntl(h->lock_db, F_SETLK, &un);
                } else
                        holder(h->lock_frontend, who, sizeof(who));
        }
        if (r == 0) {
                if (now_usec() - start > 1000000ULL)
                        log_info("Got the dpkg lock after %.1f s", (now_usec() - start) / 1e6);
                return OTA_OK;
        }
        h_unlock(h);
        if (r == -ETIMEDOUT) {
                log_warning("The dpkg lock is held by %s; gave up after %.0f s", who, timeout_ms / 1000.0);
                set(code, "dpkg-locked");
                set(reason, "dpkg is locked by %s (waited %.0f s)", who, timeout_ms / 1000.0);
                return OTA_LOCKED;
        }
        log_error_errno(r, "Cannot lock '%s': %m", front);
        set(code, "io");
        set(reason, "cannot take the dpkg lock: %s", strerror(-r));
        return OTA_FAIL;
}

static OtaOutcome h_lock(void *userdata, OtaJournal *j, char **code, char **reason) {
        Helper *h = userdata;
        char who[128];
        int fd;
        _cleanup_free_ char *front = NULL;

        /* Say once that we wait, and for whom. */
        if (asprintf(&front, "%s/lock-frontend", h->admindir) >= 0 &&
            (fd = open(front, O_RDONLY | O_CLOEXEC | O_NOFOLLOW)) >= 0) {
                struct flock fl = { .l_type = F_WRLCK, .l_whence = SEEK_SET };

                if (fcntl(fd, F_GETLK, &fl) == 0 && fl.l_type != F_UNLCK) {
                        holder(fd, who, sizeof(who));
                        log_info("dpkg is locked by %s; waiting up to %.0f s", who,
                                 h->cfg->ota.lock_timeout_ms / 1000.0);
                }
                close(fd);
        }
        return lock_for(h, h->cfg->ota.lock_timeout_ms, code, reason);
}

/* ---- prepare: verify everything again, out of the agent's reach ---------------------- */


/* Copy the agent's download into the cache, hashing the copy. */
static int copy_in(Helper *h, const char *from, uint64_t size, char sha[static 65]) {
        _cleanup_free_ char *tmp = NULL, *to = NULL;
        _cleanup_close_ int in = -1, out = -1;
        uint8_t buf[65536];
        struct stat st;
        uint64_t done = 0;
        int r;

        in = open(from, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
        if (in < 0)
                return -errno;
        if (fstat(in, &st) < 0)
                return -errno;
        if (!S_ISREG(st.st_mode) || (uint64_t)st.st_size != size)
                return -EFBIG;
        if (cache_path(h, INCOMING ".tmp", &tmp) < 0 || cache_path(h, INCOMING, &to) < 0)
                return -ENOMEM;
        out = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0644);
        if (out < 0)
                return -errno;
        while (done < size) {
                ssize_t n = read(in, buf, sizeof(buf));

                if (n < 0 && errno == EINTR)
                        continue;
                if (n <= 0)
                        return n < 0 ? -errno : -EFBIG;
                if (write(out, buf, (size_t)n) != n)
                        return -errno;
                done += (uint64_t)n;
        }
        if (fsync(out) < 0 || rename(tmp, to) < 0)
                return -errno;
        /* Hash what we will install: our copy. */
        r = debfile_sha256(to, sha, &done);
        if (r < 0)
                return r;
        return done == size ? 0 : -EFBIG;
}

static char *cached_name(const char *package, const char *version, const char *arch) {
        _cleanup_free_ char *v = strdup(version);
        char *s = NULL;

        if (!v)
                return NULL;
        /* apt's spelling: ':' (epoch) as %3a */
        if (strchr(v, ':')) {
                char *e = NULL, *colon = strchr(v, ':');

                *colon = 0;
                if (asprintf(&e, "%s%%3a%s", v, colon + 1) < 0)
                        return NULL;
                free(v);
                v = e;
        }
        if (asprintf(&s, "%s_%s_%s.deb", package, v, arch) < 0)
                return NULL;
        return s;
}

static bool deb_is(const char *path, const char *package, const char *version) {
        _cleanup_(debfile_control_done) DebControl c = {};

        return access(path, R_OK) == 0 && debfile_control_read(path, &c) >= 0 && streq(c.package, package) &&
               streq(c.version, version);
}

/* Rebuild the installed version's .deb from the files dpkg knows about,
 * with dpkg-repack (Recommends of tether-agent), into ours. Used when
 * neither our cache nor apt's has it, e.g. on the first update after the
 * package was installed from a file or apt deleted what it downloaded.
 * Modified conffiles go into it as they are on disk, which is what a
 * rollback should restore anyway. */
static int repack(Helper *h, const char *package, const char *version, const char *ours) {
        _cleanup_free_ char *tmpl = NULL, *root = NULL, *found = NULL;
        const char *argv[5];
        size_t n = 0;
        DIR *d;
        struct dirent *de;
        int st, r = -ENOENT;
        pid_t pid;

        argv[n++] = "dpkg-repack";
        if (h->chroot_root) {
                if (asprintf(&root, "--root=%s", h->cfg->ota.dpkg_root) < 0)
                        return -ENOMEM;
                argv[n++] = root;
        }
        argv[n++] = package;
        argv[n] = NULL;
        if (asprintf(&tmpl, "%s/repack.XXXXXX", h->cache_dir) < 0 || !mkdtemp(tmpl))
                return log_warning_errno(-errno, "Cannot make a directory for dpkg-repack: %m");
        pid = fork();
        if (pid < 0) {
                r = -errno;
                (void)rmdir(tmpl);
                return r;
        }
        if (pid == 0) {
                int null = open("/dev/null", O_RDWR | O_CLOEXEC);

                dup2(null, STDIN_FILENO);
                dup2(null, STDOUT_FILENO);
                if (chdir(tmpl) < 0)
                        _exit(126);
                setenv("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", 1);
                execvp("dpkg-repack", (char *const *)argv);
                _exit(127);
        }
        while (waitpid(pid, &st, 0) < 0)
                if (errno != EINTR)
                        return -errno;
        d = opendir(tmpl);
        while (d && (de = readdir(d))) {
                _cleanup_free_ char *path = NULL;

                if (de->d_name[0] == '.')
                        continue;
                if (asprintf(&path, "%s/%s", tmpl, de->d_name) < 0)
                        break;
                if (!found && WIFEXITED(st) && WEXITSTATUS(st) == 0 && endswith(de->d_name, ".deb") &&
                    deb_is(path, package, version))
                        found = TAKE_PTR(path);
                else
                        (void)unlink(path);
        }
        if (d)
                closedir(d);
        if (found) {
                r = rename(found, ours) < 0 ? -errno : 0;
                if (r < 0)
                        (void)unlink(found);
        }
        (void)rmdir(tmpl);
        if (r >= 0)
                log_info("Rebuilt %s %s for rollback with dpkg-repack: %s", package, version, ours);
        else if (WIFEXITED(st) && WEXITSTATUS(st) == 127)
                log_warning("No .deb of %s %s for rollback, and dpkg-repack is not installed", package, version);
        else
                log_warning("dpkg-repack %s did not give a .deb of version %s (%s %d)", package, version,
                            WIFEXITED(st) ? "exit status" : "signal", WIFEXITED(st) ? WEXITSTATUS(st) : WTERMSIG(st));
        return r;
}

/* The .deb of the installed version: ours, or apt's (copied to ours). */
static char *find_rollback_deb(Helper *h, const char *package, const char *version, const char *arch) {
        _cleanup_free_ char *name = cached_name(package, version, arch), *ours = NULL, *apts = NULL;
        char sha[65];
        uint64_t size;

        if (!name || asprintf(&ours, "%s/pkgs/%s", h->cache_dir, name) < 0)
                return NULL;
        if (deb_is(ours, package, version))
                return TAKE_PTR(ours);
        if (asprintf(&apts, "%s/var/cache/apt/archives/%s", h->chroot_root ? h->cfg->ota.dpkg_root : "", name) < 0)
                return NULL;
        if (deb_is(apts, package, version) && debfile_sha256(apts, sha, &size) >= 0) {
                _cleanup_free_ char *dir = NULL;

                if (asprintf(&dir, "%s/pkgs", h->cache_dir) >= 0) {
                        _cleanup_close_ int in = open(apts, O_RDONLY | O_CLOEXEC);
                        _cleanup_free_ char *text = NULL;
                        size_t len = 0;

                        /* small or large, one read loop is enough here */
                        if (in >= 0 && ota_read_file(apts, 1ULL << 31, &text, &len) >= 0 &&
                            ota_write_file_atomic(dir, name, text, len, 0644, (uid_t)-1, (gid_t)-1) >= 0) {
                                log_info("Keeping apt's '%s' for rollback", apts);
                                return TAKE_PTR(ours);
                        }
                }
        }
        if (repack(h, package, version, ours) >= 0)
                return TAKE_PTR(ours);
        return NULL;
}

static OtaOutcome h_prepare(void *userdata, OtaJournal *j, char **code, char **reason) {
        Helper *h = userdata;
        _cleanup_(keyring_freep) Keyring *k = keyring_new();
        _cleanup_(manifest_done) Manifest m = {};
        _cleanup_(debfile_control_done) DebControl c = {};
        _cleanup_free_ char *text = NULL, *floor = NULL, *src = NULL, *in = NULL, *prev = NULL, *prev_arch = NULL;
        ManifestReject rej = MANIFEST_OK;
        const char *err = NULL;
        char sha[65];
        struct statvfs sv;
        int r;

        helper_forget(h);
        if (!k)
                return OTA_FAIL;
        r = keyring_load_dir(k, h->cfg->ota.keyring, NULL, NULL);
        if (r < 0 && r != -ENOENT)
                log_warning_errno(r, "Cannot read the keyring '%s': %m", h->cfg->ota.keyring);
        if (!j->manifest || manifest_open(k, (const uint8_t *)j->manifest, strlen(j->manifest), &m, &rej, &err) < 0) {
                set(code, "%s", manifest_reject_to_string(rej ? rej : MANIFEST_MALFORMED));
                set(reason, "helper: %s", err ? err : "no manifest");
                return OTA_REJECT;
        }
        floor = ota_floor_for(h->cache_dir, m.package);
        rej = manifest_check(&m, (int64_t)time(NULL), h->arch, floor, &text);
        if (rej != MANIFEST_OK) {
                set(code, "%s", manifest_reject_to_string(rej));
                set(reason, "helper: %s", text ? text : "refused");
                return OTA_REJECT;
        }
        /* The journal's copies are for display; the manifest is the truth. */
        free(j->package);
        free(j->version);
        free(j->plugin);
        j->package = strdup(m.package);
        j->version = strdup(m.version);
        j->plugin = m.plugin ? strdup(m.plugin) : NULL;

        if (state_path(h, "package.deb", &src) < 0 || cache_path(h, INCOMING, &in) < 0)
                return OTA_FAIL;
        r = copy_in(h, src, m.size, sha);
        if (r == -EFBIG || r == -ENOENT) {
                set(code, "size");
                set(reason, "helper: the downloaded package is missing or not %" PRIu64 " bytes", m.size);
                return OTA_REJECT;
        }
        if (r < 0) {
                set(code, "io");
                set(reason, "helper: cannot copy the package: %s", strerror(-r));
                return OTA_REJECT;
        }
        if (!streq(sha, m.sha256)) {
                set(code, "checksum");
                set(reason, "helper: the package's SHA-256 is %s, the manifest says %s", sha, m.sha256);
                return OTA_REJECT;
        }
        r = debfile_control_read(in, &c);
        if (r < 0 || !streq(c.package, m.package) || !streq(c.version, m.version) ||
            !streq(c.architecture, m.architecture)) {
                set(code, "control");
                set(reason, "helper: the package's control fields do not match the manifest");
                return OTA_REJECT;
        }
        if (statvfs(h->cfg->ota.dpkg_root, &sv) == 0 &&
            (uint64_t)sv.f_bavail * sv.f_frsize < m.installed_size * 1024 + (uint64_t)h->cfg->ota.min_free_mb * MIB) {
                set(code, "no-space");
                set(reason, "helper: not enough space in '%s' for %" PRIu64 " KiB", h->cfg->ota.dpkg_root,
                    m.installed_size);
                return OTA_REJECT;
        }

        /* What to go back to. */
        r = installed_version(h, m.package, &prev, &prev_arch);
        if (r == -EBUSY) {
                set(code, "broken");
                set(reason, "dpkg has %s half-installed; 'dpkg --configure -a' or a reinstall first", m.package);
                return OTA_REJECT;
        }
        if (r < 0) {
                set(code, "io");
                set(reason, "cannot ask dpkg about %s: %s", m.package, strerror(-r));
                return OTA_REJECT;
        }
        if (r > 0 && debversion_compare(prev, m.version) == 0) {
                set(code, "already-installed");
                set(reason, "%s %s is installed already", m.package, m.version);
                return OTA_REJECT;
        }
        if (r > 0) {
                _cleanup_free_ char *why = NULL;

                /* dpkg's word on the installed version, not the agent's. */
                rej = manifest_check_installed(&m, prev, &why);
                if (rej != MANIFEST_OK) {
                        set(code, "%s", manifest_reject_to_string(rej));
                        set(reason, "helper: %s", why ? why : "refused");
                        return OTA_REJECT;
                }
        }
        h->job = strdup(j->job);
        h->manifest = strdup(j->manifest);
        h->package = strdup(m.package);
        h->version = strdup(m.version);
        h->architecture = strdup(m.architecture);
        h->sha256 = strdup(m.sha256);
        h->min_version = m.min_version ? strdup(m.min_version) : NULL;
        if (r > 0) {
                h->prev_version = TAKE_PTR(prev);
                h->prev_deb = find_rollback_deb(h, m.package, h->prev_version, prev_arch ? prev_arch : m.architecture);
                if (!h->prev_deb) {
                        set(code, "no-rollback");
                        set(reason,
                            "no .deb of the installed %s %s to roll back to (install dpkg-repack, or keep one with "
                            "'tether-ota-helper seed FILE.deb')",
                            m.package, h->prev_version);
                        helper_forget(h);
                        return OTA_REJECT;
                }
        }
        h->prev_known = true;
        r = private_save(h);
        if (r < 0) {
                set(code, "io");
                set(reason, "cannot write '%s/%s': %s", h->cache_dir, PRIVATE_STATE, strerror(-r));
                helper_forget(h);
                return OTA_FAIL;
        }
        /* For the agent and humans (the helper goes by its own record). */
        j->prev_known = true;
        free(j->prev_version);
        free(j->prev_deb);
        j->prev_version = h->prev_version ? strdup(h->prev_version) : NULL;
        j->prev_deb = h->prev_deb ? strdup(h->prev_deb) : NULL;
        log_info("Job %s: %s %s verified; the previous version is %s", j->job, m.package, m.version,
                 h->prev_version ? h->prev_version : "none (rollback removes the package)");
        return OTA_OK;
}

/* ---- install, restore --------------------------------------------------------------- */

static void agent_unit_revive(Helper *h, bool start);

static OtaOutcome h_install(void *userdata, OtaJournal *j, char **code, char **reason) {
        Helper *h = userdata;
        _cleanup_free_ char *in = NULL, *err = NULL;
        char sha[65];
        uint64_t size;
        int r;

        if (!private_for(h, j) || cache_path(h, INCOMING, &in) < 0) {
                set(code, "io");
                set(reason, "the helper has no record of this job");
                return OTA_FAIL;
        }
        /* One last look at what goes in. */
        if (debfile_sha256(in, sha, &size) < 0 || !streq(sha, h->sha256)) {
                set(code, "checksum");
                set(reason, "the cached package changed before installation");
                return OTA_FAIL;
        }
        agent_unit_revive(h, false);
        r = run_dpkg(h, true, &err, "--install", in);
        if (r == -EAGAIN) {
                set(code, "dpkg-locked");
                set(reason, "dpkg found its database locked by another process");
                return OTA_LOCKED;
        }
        if (r < 0) {
                set(code, "install-failed");
                set(reason, "%s", err ? err : "dpkg failed");
                return OTA_FAIL;
        }
        return OTA_OK;
}

/* Under systemd, make sure the agent's unit can start again: a version that
 * crash-looped may have used up its start limit, and then the postinst's
 * restart (or ours) would be refused and the restored agent never run.
 * reset-failed before dpkg; after it, start the unit if it is not running. */
static void agent_unit_revive(Helper *h, bool start) {
        _cleanup_(sd_bus_error_free) sd_bus_error e = SD_BUS_ERROR_NULL;
        _cleanup_(sd_bus_flush_close_unrefp) sd_bus *bus = NULL;
        const char *unit = h->cfg->ota.agent_unit;
        int r;

        if (h->chroot_root || !unit || access("/run/systemd/system", F_OK) < 0 || sd_bus_open_system(&bus) < 0)
                return;
        r = sd_bus_call_method(bus, "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
                               "org.freedesktop.systemd1.Manager", "ResetFailedUnit", &e, NULL, "s", unit);
        if (r < 0 && !sd_bus_error_has_name(&e, "org.freedesktop.systemd1.NoSuchUnit"))
                log_warning("Cannot reset the failed state of %s: %s", unit, e.message ? e.message : strerror(-r));
        sd_bus_error_free(&e);
        if (!start)
                return;
        r = sd_bus_call_method(bus, "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
                               "org.freedesktop.systemd1.Manager", "StartUnit", &e, NULL, "ss", unit, "replace");
        if (r < 0)
                log_warning("Cannot start %s after the rollback: %s", unit, e.message ? e.message : strerror(-r));
}

static OtaOutcome h_restore(void *userdata, OtaJournal *j, char **code, char **reason) {
        Helper *h = userdata;
        _cleanup_free_ char *err = NULL, *now = NULL;
        OtaOutcome o;
        int r;

        if (!private_for(h, j)) {
                set(code, "no-rollback");
                set(reason, "the helper has no record of the version before job %s", j->job);
                return OTA_FAIL;
        }
        /* A rollback is not deferred: wait longer for the lock. */
        o = lock_for(h, 3 * h->cfg->ota.lock_timeout_ms, code, reason);
        if (o != OTA_OK)
                return OTA_FAIL;
        agent_unit_revive(h, false);
        if (h->prev_version) {
                r = run_dpkg(h, true, &err, "--install", h->prev_deb);
                if (r < 0) {
                        /* Finish what a killed dpkg left, then try again. */
                        free(err);
                        err = NULL;
                        (void)run_dpkg(h, true, NULL, "--configure", "--pending");
                        r = run_dpkg(h, true, &err, "--install", h->prev_deb);
                }
        } else {
                r = run_dpkg(h, true, &err, "--remove", h->package);
                if (r < 0) {
                        free(err);
                        err = NULL;
                        (void)run_dpkg(h, true, NULL, "--configure", "--pending");
                        r = run_dpkg(h, true, &err, "--remove", h->package);
                }
        }
        h_unlock(h);
        if (r < 0) {
                set(code, "rollback-failed");
                set(reason, "%s", err ? err : "dpkg failed");
                return OTA_FAIL;
        }
        /* Verify: dpkg must say the old version is installed (or none). */
        r = installed_version(h, h->package, &now, NULL);
        if ((h->prev_version && (r != 1 || debversion_compare(now, h->prev_version) != 0)) || (!h->prev_version && r != 0)) {
                set(code, "rollback-failed");
                set(reason, "after the rollback dpkg reports %s %s", h->package, r == 1 ? now : r == 0 ? "not installed" : "half-installed");
                return OTA_FAIL;
        }
        log_info("Job %s: %s is back at %s", j->job, h->package, h->prev_version ? h->prev_version : "not installed");
        /* StartUnit is a no-op when the postinst already started it. */
        agent_unit_revive(h, true);
        return OTA_OK;
}

/* ---- health ------------------------------------------------------------------------- */

typedef struct UnitWatch {
        sd_bus *bus;
        char *path;
        uint32_t base_restarts;
} UnitWatch;

static void unit_watch_done(UnitWatch *u) {
        sd_bus_flush_close_unref(u->bus);
        free(u->path);
}

static int unit_watch_open(Helper *h, UnitWatch *u) {
        _cleanup_(sd_bus_error_free) sd_bus_error e = SD_BUS_ERROR_NULL;
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *reply = NULL;
        const char *path;
        int r;

        if (h->chroot_root || !h->cfg->ota.agent_unit || access("/run/systemd/system", F_OK) < 0)
                return -ENOENT;
        r = sd_bus_open_system(&u->bus);
        if (r < 0)
                return r;
        r = sd_bus_call_method(u->bus, "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
                               "org.freedesktop.systemd1.Manager", "LoadUnit", &e, &reply, "s", h->cfg->ota.agent_unit);
        if (r < 0 || sd_bus_message_read(reply, "o", &path) < 0)
                return r < 0 ? r : -EBADMSG;
        u->path = strdup(path);
        if (!u->path)
                return -ENOMEM;
        r = sd_bus_get_property_trivial(u->bus, "org.freedesktop.systemd1", u->path,
                                        "org.freedesktop.systemd1.Service", "NRestarts", &e, 'u', &u->base_restarts);
        return r;
}

/* Whether systemd says the agent is failing: "failed", or restarted twice
 * on its own since we started watching. */
static bool unit_failing(UnitWatch *u, char **code, char **reason) {
        _cleanup_(sd_bus_error_free) sd_bus_error e = SD_BUS_ERROR_NULL;
        _cleanup_free_ char *state = NULL;
        uint32_t restarts = 0;

        if (!u->bus || !u->path)
                return false;
        if (sd_bus_get_property_string(u->bus, "org.freedesktop.systemd1", u->path, "org.freedesktop.systemd1.Unit",
                                       "ActiveState", &e, &state) >= 0 &&
            streq(state, "failed")) {
                set(code, "crash-loop");
                set(reason, "the agent's unit failed");
                return true;
        }
        sd_bus_error_free(&e);
        if (sd_bus_get_property_trivial(u->bus, "org.freedesktop.systemd1", u->path,
                                        "org.freedesktop.systemd1.Service", "NRestarts", &e, 'u', &restarts) >= 0 &&
            restarts >= u->base_restarts + 2) {
                set(code, "crash-loop");
                set(reason, "the agent restarted itself %u times since the update", restarts - u->base_restarts);
                return true;
        }
        return false;
}

/* A verdict from a process still running the replaced binary is stale. */
static bool runs_installed_binary(pid_t pid) {
        char link[64], target[4096];
        ssize_t n;

        snprintf(link, sizeof(link), "/proc/%d/exe", (int)pid);
        n = readlink(link, target, sizeof(target) - 1);
        if (n < 0)
                return false;
        target[n] = 0;
        return !strstr(target, " (deleted)");
}

static OtaOutcome h_wait_health(void *userdata, OtaJournal *j, char **code, char **reason) {
        Helper *h = userdata;
        _cleanup_close_ int ino = inotify_init1(IN_CLOEXEC | IN_NONBLOCK);
        _cleanup_(unit_watch_done) UnitWatch u = {};
        unsigned long long deadline = now_usec() + h->cfg->ota.health_timeout_ms * 1000ULL;
        bool self = j->package && streq(j->package, h->cfg->ota.agent_package), warned_stale = false;

        if (ino < 0 || inotify_add_watch(ino, h->state_dir, IN_CLOSE_WRITE | IN_MOVED_TO) < 0) {
                set(code, "io");
                set(reason, "cannot watch '%s'", h->state_dir);
                return OTA_FAIL;
        }
        if (unit_watch_open(h, &u) < 0)
                unit_watch_done(&u), u = (UnitWatch){};
        log_info("Job %s: waiting up to %.0f s for tetherd's verdict (%s)", j->job, h->cfg->ota.health_timeout_ms / 1000.0,
                 j->health_phase ? j->health_phase : "?");
        for (;;) {
                _cleanup_(ota_health_done) OtaHealth v = {};
                unsigned long long now;
                struct pollfd p = { .fd = ino, .events = POLLIN };
                char drain[4096];

                if (ota_health_load(h->state_dir, &v) >= 0 && v.token && j->health_token &&
                    streq(v.token, j->health_token)) {
                        if (!v.healthy) {
                                set(code, "%s", v.code ? v.code : "unhealthy");
                                set(reason, "%s", v.reason ? v.reason : "tetherd reported itself unhealthy");
                                return OTA_FAIL;
                        }
                        if (!self || runs_installed_binary(v.pid))
                                return OTA_OK;
                        if (!warned_stale)
                                log_warning("A verdict came from tetherd %d, which still runs the old binary", (int)v.pid);
                        warned_stale = true;
                }
                if (unit_failing(&u, code, reason))
                        return OTA_FAIL;
                now = now_usec();
                if (now >= deadline) {
                        set(code, "unhealthy");
                        set(reason, "no healthy verdict from tetherd within %.0f s (not connected to the cloud%s?)",
                            h->cfg->ota.health_timeout_ms / 1000.0, j->plugin ? ", or the plugin did not load" : "");
                        return OTA_FAIL;
                }
                /* Wake for the verdict file; every second for systemd. */
                (void)poll(&p, 1, (int)((deadline - now) / 1000 > 1000 ? 1000 : (deadline - now) / 1000 + 1));
                while (read(ino, drain, sizeof(drain)) > 0)
                        ;
        }
}

/* ---- commit, finish ---------------------------------------------------------------------- */

static void h_commit(void *userdata, OtaJournal *j) {
        Helper *h = userdata;
        _cleanup_free_ char *in = NULL, *name = NULL, *dir = NULL, *dest = NULL, *fpath = NULL, *ftext = NULL;
        DIR *d;
        struct dirent *de;

        if (!private_for(h, j))
                return;
        /* The floor: versions below min_version are refused from now on. */
        if (h->min_version && cache_path(h, "floors.json", &fpath) >= 0) {
                json_t *f = NULL;
                const char *old;

                if (ota_read_file(fpath, 65536, &ftext, NULL) >= 0)
                        f = json_loads(ftext, 0, NULL);
                if (!json_is_object(f)) {
                        json_decref(f);
                        f = json_object();
                }
                old = json_string_value(json_object_get(f, h->package));
                if (f && (!old || debversion_check(old) < 0 || debversion_compare(h->min_version, old) > 0)) {
                        _cleanup_free_ char *t = NULL;

                        json_object_set_new(f, h->package, json_string(h->min_version));
                        t = json_dumps(f, JSON_INDENT(1) | JSON_SORT_KEYS);
                        if (t && ota_write_file_atomic(h->cache_dir, "floors.json", t, strlen(t), 0644, (uid_t)-1,
                                                       (gid_t)-1) >= 0)
                                log_info("%s: versions below %s are refused from now on", h->package, h->min_version);
                }
                json_decref(f);
        }
        /* The new package is the next update's rollback package. */
        name = cached_name(h->package, h->version, h->architecture);
        if (!name || cache_path(h, INCOMING, &in) < 0 || asprintf(&dir, "%s/pkgs", h->cache_dir) < 0 ||
            asprintf(&dest, "%s/%s", dir, name) < 0)
                return;
        if (rename(in, dest) < 0 && errno != ENOENT)
                log_warning_errno(errno, "Cannot keep '%s': %m", dest);
        d = opendir(dir);
        while (d && (de = readdir(d))) {
                size_t pl = strlen(h->package);

                if (strncmp(de->d_name, h->package, pl) == 0 && de->d_name[pl] == '_' && !streq(de->d_name, name) &&
                    unlinkat(dirfd(d), de->d_name, 0) == 0)
                        log_debug("Dropped the old rollback package '%s'", de->d_name);
        }
        if (d)
                closedir(d);
}

static void h_finished(void *userdata, OtaJournal *j) {
        Helper *h = userdata;
        _cleanup_free_ char *req = NULL, *pkg = NULL, *in = NULL, *priv = NULL;

        if (state_path(h, OTA_REQUEST_FILE, &req) >= 0)
                (void)unlink(req);
        if (state_path(h, "package.deb", &pkg) >= 0)
                (void)unlink(pkg);
        if (cache_path(h, INCOMING, &in) >= 0)
                (void)unlink(in);
        if (private_for(h, j) && cache_path(h, PRIVATE_STATE, &priv) >= 0)
                (void)unlink(priv);
        log_info("Job %s ended: %s%s%s", j->job, ota_state_to_string(j->state), j->reason ? ": " : "",
                 j->reason ? j->reason : "");
}

static char *h_token(void *userdata) {
        uint8_t b[8];
        char *t = malloc(17);

        if (!t || getrandom(b, sizeof(b), 0) != sizeof(b)) {
                free(t);
                return NULL;
        }
        hex_encode(b, 8, t);
        return t;
}

static void h_log(void *userdata, int priority, const char *text) {
        log_internal(priority, 0, "%s", text);
}

/* ---- commands ------------------------------------------------------------------------------- */

static int helper_init(Helper *h, const Config *cfg) {
        _cleanup_free_ char *pkgs = NULL;
        struct stat st;
        int r;

        *h = (Helper){ .cfg = cfg, .state_dir = cfg->ota.state_dir, .cache_dir = cfg->ota.cache_dir,
                       .lock_frontend = -1, .lock_db = -1 };
        h->chroot_root = !streq(cfg->ota.dpkg_root, "/");
        if (asprintf(&h->admindir, "%s/var/lib/dpkg", h->chroot_root ? cfg->ota.dpkg_root : "") < 0)
                return -ENOMEM;
        /* Files we put in the agent's directory must stay the agent's. The
         * agent owns its parent: refuse a symlink planted there to make us
         * write elsewhere. */
        if (lstat(cfg->ota.state_dir, &st) < 0)
                return log_error_errno(errno, "Cannot find the OTA state directory '%s': %m", cfg->ota.state_dir);
        if (!S_ISDIR(st.st_mode))
                return log_error_errno(-ENOTDIR, "The OTA state directory '%s' is not a directory (a symlink?)",
                                       cfg->ota.state_dir);
        h->owner = st.st_uid;
        h->group = st.st_gid;
        r = ota_mkdir_p(cfg->ota.cache_dir, 0755);
        if (r >= 0 && asprintf(&pkgs, "%s/pkgs", cfg->ota.cache_dir) >= 0)
                r = ota_mkdir_p(pkgs, 0755);
        if (r < 0)
                return log_error_errno(r, "Cannot create '%s': %m", cfg->ota.cache_dir);
        r = debfile_native_arch(&h->arch);
        if (r < 0)
                log_warning_errno(r, "Cannot ask dpkg for the architecture: %m");
        return 0;
}

static void helper_done(Helper *h) {
        h_unlock(h);
        helper_forget(h);
        free(h->admindir);
        free(h->arch);
}

static int cmd_run(const Config *cfg) {
        _cleanup_(helper_done) Helper h = {};
        _cleanup_free_ char *lockpath = NULL;
        _cleanup_close_ int lock = -1;
        char pid[16];
        int r;

        r = helper_init(&h, cfg);
        if (r < 0)
                return r;
        /* One helper at a time (the unit name is the lock under systemd;
         * this one also holds for the exec launcher). */
        if (cache_path(&h, "helper.lock", &lockpath) < 0)
                return -ENOMEM;
        lock = open(lockpath, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
        if (lock < 0)
                return log_error_errno(errno, "Cannot open '%s': %m", lockpath);
        if (flock(lock, LOCK_EX | LOCK_NB) < 0) {
                if (errno == EWOULDBLOCK) {
                        log_info("Another tether-ota-helper is at work; leaving the job to it");
                        return 0;
                }
                return log_error_errno(errno, "Cannot lock '%s': %m", lockpath);
        }
        snprintf(pid, sizeof(pid), "%d\n", (int)getpid());
        (void)ota_write_file_atomic(h.state_dir, "helper.pid", pid, strlen(pid), 0644, h.owner, h.group);
        private_load(&h);
        r = ota_install_run(&(OtaInstallParams){ .dir = h.state_dir,
                                                 .max_transitions = cfg->ota.max_transitions,
                                                 .trial_ms = cfg->ota.trial_ms,
                                                 .owner = h.owner,
                                                 .group = h.group },
                            &(OtaInstallOps){ .userdata = &h,
                                              .prepare = h_prepare,
                                              .lock = h_lock,
                                              .unlock = h_unlock,
                                              .install = h_install,
                                              .restore = h_restore,
                                              .wait_health = h_wait_health,
                                              .commit = h_commit,
                                              .finished = h_finished,
                                              .token = h_token,
                                              .log = h_log });
        if (r < 0)
                return log_error_errno(r, "Cannot work on the OTA journal in '%s': %m", h.state_dir);
        return 0;
}

static int cmd_seed(const Config *cfg, const char *file) {
        _cleanup_(helper_done) Helper h = {};
        _cleanup_(debfile_control_done) DebControl c = {};
        _cleanup_free_ char *installed = NULL, *arch = NULL, *name = NULL, *dir = NULL, *text = NULL;
        size_t len;
        int r;

        r = helper_init(&h, cfg);
        if (r < 0)
                return r;
        r = debfile_control_read(file, &c);
        if (r < 0)
                return log_error_errno(r, "'%s' is not a Debian package: %m", file);
        r = installed_version(&h, c.package, &installed, &arch);
        if (r <= 0 || debversion_compare(installed, c.version) != 0 || !streq(arch, c.architecture))
                return log_error_errno(-EINVAL, "'%s' is %s %s (%s), but %s is %s%s", file, c.package, c.version,
                                       c.architecture, c.package, r > 0 ? "installed at " : "not installed",
                                       r > 0 ? installed : "");
        name = cached_name(c.package, c.version, c.architecture);
        if (!name || asprintf(&dir, "%s/pkgs", h.cache_dir) < 0)
                return -ENOMEM;
        r = ota_read_file(file, 1ULL << 31, &text, &len);
        if (r >= 0)
                r = ota_write_file_atomic(dir, name, text, len, 0644, (uid_t)-1, (gid_t)-1);
        if (r < 0)
                return log_error_errno(r, "Cannot keep '%s': %m", file);
        printf("%s/%s\n", dir, name);
        return 0;
}

static void help(void) {
        printf("Usage: tether-ota-helper COMMAND [--config FILE]\n\n"
               "The privileged half of tether's OTA updates (docs/ota.md).\n\n"
               "  run            continue the job journaled in [OTA] StateDirectory=\n"
               "  seed FILE.deb  keep FILE.deb (the installed version) as the rollback package\n\n"
               "  -c --config=FILE  tetherd's configuration (default %s)\n"
               "  -h --help         show this help\n"
               "     --version      show the version\n",
               CONFIG_DEFAULT_PATH);
}

int main(int argc, char *argv[]) {
        static const struct option opts[] = {
                { "config", required_argument, NULL, 'c' },
                { "help", no_argument, NULL, 'h' },
                { "version", no_argument, NULL, 'V' },
                {},
        };
        _cleanup_(config_freep) Config *cfg = NULL;
        _cleanup_free_ char *error = NULL;
        const char *path = CONFIG_DEFAULT_PATH;
        sigset_t none;
        int c, r;

        log_open("tether-ota-helper");
        /* tetherd blocks signals for its loop; a child inherits the mask. */
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        signal(SIGPIPE, SIG_IGN);
        while ((c = getopt_long(argc, argv, "c:h", opts, NULL)) >= 0)
                switch (c) {
                case 'c':
                        path = optarg;
                        break;
                case 'h':
                        help();
                        return 0;
                case 'V':
                        printf("tether-ota-helper %s\n", PACKAGE_VERSION);
                        return 0;
                default:
                        return 2;
                }
        if (optind >= argc) {
                log_error("Missing command (run or seed); see --help");
                return 2;
        }
        r = config_load(path, &cfg, &error);
        if (r < 0) {
                log_error("Invalid configuration: %s", error ? error : strerror(-r));
                return 1;
        }
        umask(0022);
        /* In a session of our own: killing the agent's does not reach us,
         * and a test can stop us together with dpkg. */
        (void)setsid();
        if (streq(argv[optind], "run") && optind + 1 == argc)
                return cmd_run(cfg) < 0 ? 1 : 0;
        if (streq(argv[optind], "seed") && optind + 2 == argc)
                return cmd_seed(cfg, argv[optind + 1]) < 0 ? 1 : 0;
        log_error("Unknown command or arguments; see --help");
        return 2;
}
