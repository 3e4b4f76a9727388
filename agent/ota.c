/* SPDX-License-Identifier: Apache-2.0 */
#include <coap3/coap.h>
#include <curl/curl.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <sys/inotify.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/wait.h>
#include <systemd/sd-bus.h>
#include <time.h>

#include "debfile.h"
#include "log.h"
#include "manifest.h"
#include "ota-download.h"
#include "ota-download-coap.h"
#include "ota-journal.h"
#include "ota.h"
#include "proto.h"
#include "spawn.h"
#include "util.h"

#define OTA_PACKAGE_FILE "package.deb"
#define OTA_REPORT_TIMEOUT_MS 10000
#define OTA_REPORT_RETRY_USEC (5 * 1000000ULL)
#define OTA_RETRY_MAX_USEC (60 * 1000000ULL)
#define OTA_HELPER_UNIT "tether-ota-install.service"
#define MIB ((uint64_t)1024 * 1024)

struct Ota {
        sd_event *event;
        Conn *conn;
        const Config *config;
        char *config_path;
        OtaHooks hooks;
        Keyring *keyring;
        char *arch;

        OtaJournal j;
        bool have_job;
        Manifest m; /* the job's verified manifest (have_manifest) */
        bool have_manifest;

        /* download */
        OtaDownload *download;          /* HTTPS: the manifest has a url */
        OtaCoapDownload *coap_download; /* over the connection: it has none */
        bool dl_wait_connected;         /* a CoAP download waits for the connection */
        sd_event_source *retry_timer;
        uint64_t dl_bytes;
        uint64_t dl_reported;
        sd_event_source *progress_timer;
        bool progress_inflight;
        uint64_t dl_started_usec;

        sd_event_source *start_source; /* begins an accepted job's download */

        /* dpkg-deb --field on the download */
        pid_t check_pid;
        int check_fd;
        sd_event_source *check_child;

        /* state reports */
        uint64_t acked_seq;
        uint64_t sending_seq;
        bool report_inflight;
        bool report_held;      /* answered 4.29: nothing is sent until report_retry */
        uint64_t reports_held; /* 4.29 answers, for tetherctl status */
        sd_event_source *report_retry;

        /* the helper's journal writes */
        sd_event_source *inotify;

        /* health verdicts */
        char *health_active;   /* token being answered */
        char *health_answered; /* token answered last */
        bool health_reloaded;
        uint64_t health_since; /* when the question came */
        sd_event_source *trial_timer;
        bool connected;
        uint64_t connected_since;

        /* exec launcher: relaunch a helper that died */
        sd_event_source *helper_watch;

        /* transient launcher */
        sd_bus *bus;
        sd_bus_slot *launch_slot;
        bool curl_initialized;
};

static bool streq0(const char *a, const char *b) {
        return a && b && streq(a, b);
}

static void report_state(Ota *o);
static void health_check(Ota *o);
static void download_begin(Ota *o);

/* ---- helpers -------------------------------------------------------------- */

static const char *ca_file(Ota *o) {
        return o->config->ota.ca_file ? o->config->ota.ca_file : o->config->ca_file;
}

static int state_path(Ota *o, const char *name, char **ret) {
        return asprintf(ret, "%s/%s", o->config->ota.state_dir, name) < 0 ? -ENOMEM : 0;
}

static bool is_plugin_job(Ota *o) {
        return o->have_job && o->j.plugin && *o->j.plugin;
}

/* Updating anything but the agent's own package: reload the plugins, so
 * that a new plugin (or the restored old one) is what runs. */
static bool is_self_update(Ota *o) {
        return o->have_job && o->j.package && streq(o->j.package, o->config->ota.agent_package);
}

static void keyring_bad(const char *path, int error, void *userdata) {
        log_warning_errno(error, "Ignoring '%s' in the OTA keyring: %s", path,
                          error == -EBADMSG ? "not an Ed25519 public key" : strerror(-error));
}

static void keyring_reload(Ota *o) {
        Keyring *k = keyring_new();
        int r;

        if (!k) {
                log_error("Out of memory loading the OTA keyring");
                return;
        }
        r = keyring_load_dir(k, o->config->ota.keyring, keyring_bad, NULL);
        if (r < 0 && r != -ENOENT)
                log_warning_errno(r, "Cannot read the OTA keyring '%s': %m", o->config->ota.keyring);
        else if (r <= 0)
                log_info("No OTA update keys in '%s': every update will be refused", o->config->ota.keyring);
        else
                log_debug("%d OTA update key(s) loaded from '%s'", r, o->config->ota.keyring);
        keyring_free(o->keyring);
        o->keyring = k;
}

static uint64_t fs_free(const char *path, dev_t *ret_dev) {
        struct statvfs sv;
        struct stat st;

        if (statvfs(path, &sv) < 0 || stat(path, &st) < 0)
                return UINT64_MAX; /* cannot tell: do not refuse for it */
        *ret_dev = st.st_dev;
        return (uint64_t)sv.f_bavail * (uint64_t)sv.f_frsize;
}

/* Space for the download (state dir) and for the package's files plus
 * the helper's copy (dpkg root); both when they share a file system. */
static ManifestReject space_check(Ota *o, const Manifest *m, char **ret_text) {
        uint64_t reserve = (uint64_t)o->config->ota.min_free_mb * MIB;
        uint64_t need_state = m->size + reserve, need_root = m->installed_size * 1024 + m->size + reserve;
        dev_t d1 = 0, d2 = 0;
        uint64_t free_state = fs_free(o->config->ota.state_dir, &d1);
        uint64_t free_root = fs_free(o->config->ota.dpkg_root, &d2);

        if (free_state != UINT64_MAX && free_root != UINT64_MAX && d1 == d2) {
                need_state = need_root = m->size * 2 + m->installed_size * 1024 + reserve;
        }
        if (free_state < need_state) {
                if (asprintf(ret_text, "not enough space in '%s': %" PRIu64 " MB needed, %" PRIu64 " MB free",
                             o->config->ota.state_dir, (need_state + MIB - 1) / MIB, free_state / MIB) < 0)
                        *ret_text = NULL;
                return MANIFEST_NO_SPACE;
        }
        if (free_root < need_root) {
                if (asprintf(ret_text, "not enough space in '%s': %" PRIu64 " MB needed, %" PRIu64 " MB free",
                             o->config->ota.dpkg_root, (need_root + MIB - 1) / MIB, free_root / MIB) < 0)
                        *ret_text = NULL;
                return MANIFEST_NO_SPACE;
        }
        return MANIFEST_OK;
}

static void job_forget(Ota *o) {
        ota_journal_done(&o->j);
        if (o->have_manifest)
                manifest_done(&o->m);
        o->have_job = o->have_manifest = false;
        o->acked_seq = o->sending_seq = 0;
        free(o->health_active);
        free(o->health_answered);
        o->health_active = o->health_answered = NULL;
}

static void remove_file(Ota *o, const char *name) {
        _cleanup_free_ char *p = NULL;

        if (state_path(o, name, &p) >= 0 && unlink(p) < 0 && errno != ENOENT)
                log_warning_errno(errno, "Cannot remove '%s': %m", p);
}

/* A state change of the job, with TETHER_JOB_ID and TETHER_DEVICE_ID for
 * the journal; the two outcomes an operator looks for get a MESSAGE_ID. */
static void log_transition(Ota *o, OtaState from, const char *how) {
        OtaState to = o->j.state;
        LogFields f = {
                .message_id = to == OTA_STATE_COMMITTED     ? LOG_MESSAGE_OTA_COMMITTED
                              : to == OTA_STATE_ROLLED_BACK ? LOG_MESSAGE_OTA_ROLLED_BACK
                                                            : NULL,
                .device_id = conn_device_id(o->conn),
                .job_id = o->j.job,
        };

        log_struct(ota_state_final(to) && to != OTA_STATE_COMMITTED ? LOG_WARNING : LOG_INFO, &f,
                   "OTA job %s: %s -> %s%s%s%s%s", o->j.job, ota_state_to_string(from), ota_state_to_string(to),
                   o->j.reason ? " (" : "", o->j.reason ? o->j.reason : "", o->j.reason ? ")" : "", how);
}

/* Journal a move; the transition limit turns it into the way out. */
static int move(Ota *o, OtaState next, const char *code, const char *reason) {
        OtaState from = o->j.state;
        int r;

        r = ota_journal_transition(o->config->ota.state_dir, &o->j, next, code, reason, o->config->ota.max_transitions,
                                   (uid_t)-1, (gid_t)-1);
        if (r == -ELOOP) {
                next = ota_next(from, OTA_LIMIT);
                log_error("OTA job %s: too many state transitions, going to %s", o->j.job, ota_state_to_string(next));
                r = ota_journal_transition(o->config->ota.state_dir, &o->j, next, "loop",
                                           "too many state transitions (restart loop?)", o->config->ota.max_transitions,
                                           (uid_t)-1, (gid_t)-1);
        }
        if (r < 0)
                return log_error_errno(r, "Cannot write the OTA journal in '%s': %m", o->config->ota.state_dir);
        log_transition(o, from, "");
        report_state(o);
        if (ota_state_final(next) && !ota_state_final(from) && o->hooks.job_ended)
                o->hooks.job_ended(o->hooks.userdata);
        return 0;
}

static void save(Ota *o) {
        int r = ota_journal_save(o->config->ota.state_dir, &o->j, (uid_t)-1, (gid_t)-1);

        if (r < 0)
                log_error_errno(r, "Cannot write the OTA journal in '%s': %m", o->config->ota.state_dir);
}

/* ---- reports -------------------------------------------------------------- */

static void on_report_answer(int error, unsigned code, const uint8_t *data, size_t len, uint32_t retry_sec,
                             void *userdata) {
        Ota *o = userdata;
        uint64_t seq = o->sending_seq;

        o->report_inflight = false;
        if (error < 0) {
                /* -ENOTCONN: the next connect sends it again. */
                if (error == -ETIMEDOUT)
                        sd_event_source_set_enabled(o->report_retry, SD_EVENT_ONESHOT);
                return;
        }
        if (code == COAP_RESPONSE_CODE(429)) {
                /* Past this device's limits in the cloud, which took
                 * nothing: keep the report, send nothing for retry_sec, then
                 * the state the job is in then (this one, or a later one
                 * that replaced it, as for any report in flight). */
                log_notice("The cloud asked to slow down (4.29: %.*s): OTA report %" PRIu64 " of job %s goes again "
                           "in %" PRIu32 " s",
                           (int)len, (const char *)data, seq, o->have_job ? o->j.job : "?", retry_sec);
                o->reports_held++;
                o->report_held = true;
                sd_event_source_set_time_relative(o->report_retry, (uint64_t)retry_sec * 1000000);
                sd_event_source_set_enabled(o->report_retry, SD_EVENT_ONESHOT);
                return;
        }
        if (COAP_RESPONSE_CLASS(code) != 2)
                /* The cloud will never take it: do not send it forever. */
                log_warning("The cloud refused OTA report %" PRIu64 " of job %s with %u.%02u: %.*s", seq,
                            o->have_job ? o->j.job : "?", code >> 5, code & 0x1f, (int)len, (const char *)data);
        if (seq > o->acked_seq)
                o->acked_seq = seq;
        if (o->have_job && ota_state_final(o->j.state) && o->j.seq <= o->acked_seq && !o->j.delivered) {
                /* Delivered: from now on a restart does not send it again
                 * (a crash before this save sends it again; the cloud
                 * applies each seq once). */
                ota_crash_point("delivering");
                o->j.delivered = true;
                save(o);
                ota_crash_point("delivered");
                log_info("OTA job %s: the cloud has the final state '%s'", o->j.job, ota_state_to_string(o->j.state));
                remove_file(o, OTA_DOWNLOAD_FILE);
                remove_file(o, OTA_PACKAGE_FILE);
                remove_file(o, OTA_HEALTH_FILE);
        }
        report_state(o);
}

static int on_report_retry(sd_event_source *s, uint64_t usec, void *userdata) {
        Ota *o = userdata;

        o->report_held = false;
        report_state(o);
        return 0;
}

/* Send the journaled state unless the cloud has it: on every transition,
 * every connect, and after a lost answer. */
static void report_state(Ota *o) {
        _cleanup_free_ char *text = NULL;
        json_t *r;
        int k;

        if (!o->have_job || o->report_inflight || o->report_held || !o->connected || o->j.state == OTA_STATE_NONE)
                return;
        if (o->j.seq <= o->acked_seq || o->j.delivered)
                return;
        r = json_pack("{s:I, s:s, s:s?, s:s?, s:s?, s:s?}", "seq", (json_int_t)o->j.seq, "state",
                      ota_state_to_string(o->j.state), "package", o->j.package, "version", o->j.version, "code",
                      o->j.code, "reason", o->j.reason);
        if (r && o->j.state == OTA_STATE_DOWNLOADING && o->have_manifest) {
                json_object_set_new(r, "bytes", json_integer((json_int_t)o->dl_bytes));
                json_object_set_new(r, "total", json_integer((json_int_t)o->m.size));
        }
        text = r ? json_dumps(r, JSON_COMPACT) : NULL;
        json_decref(r);
        if (!text)
                return;
        k = conn_request(o->conn, COAP_REQUEST_CODE_POST, PROTO_PATH_OTA, o->j.job, text, strlen(text), PROTO_CF_JSON,
                         OTA_REPORT_TIMEOUT_MS, on_report_answer, o);
        if (k < 0) {
                if (k != -ENOTCONN)
                        log_warning_errno(k, "Cannot send the OTA report: %m");
                return;
        }
        o->report_inflight = true;
        o->sending_seq = o->j.seq;
}

/* Any answer, 4.29 too: progress is never sent again. */
static void on_progress_answer(int error, unsigned code, const uint8_t *data, size_t len, uint32_t retry_sec,
                               void *userdata) {
        Ota *o = userdata;

        o->progress_inflight = false;
}

/* Progress: at most one per interval, only when it moved, never queued. */
static int on_progress_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        Ota *o = userdata;
        char text[128];

        sd_event_source_set_time_relative(s, o->config->ota.progress_interval_ms * 1000);
        if ((!o->download && !o->coap_download) || o->progress_inflight || !o->connected || o->dl_bytes == o->dl_reported ||
            o->j.seq > o->acked_seq)
                return 0;
        snprintf(text, sizeof(text), "{\"state\":\"downloading\",\"bytes\":%" PRIu64 ",\"total\":%" PRIu64 "}",
                 o->dl_bytes, o->m.size);
        if (conn_request(o->conn, COAP_REQUEST_CODE_POST, PROTO_PATH_OTA, o->j.job, text, strlen(text), PROTO_CF_JSON,
                         OTA_REPORT_TIMEOUT_MS, on_progress_answer, o) >= 0) {
                o->progress_inflight = true;
                o->dl_reported = o->dl_bytes;
        }
        return 0;
}

/* ---- the helper ------------------------------------------------------------- */

static int on_transient_started(sd_bus_message *m, void *userdata, sd_bus_error *ret_error) {
        Ota *o = userdata;
        const sd_bus_error *e = sd_bus_message_get_error(m);

        o->launch_slot = sd_bus_slot_unref(o->launch_slot);
        if (!e)
                log_info("Started %s for OTA job %s", OTA_HELPER_UNIT, o->have_job ? o->j.job : "?");
        else if (sd_bus_error_has_name(e, "org.freedesktop.systemd1.UnitExists"))
                log_info("%s is running already", OTA_HELPER_UNIT);
        else
                log_error("Cannot start %s: %s", OTA_HELPER_UNIT, e->message);
        return 0;
}

/* systemd-run --unit=tether-ota-install.service HELPER run --config PATH:
 * the unit name is the lock; a second start fails with UnitExists. */
static int launch_transient(Ota *o) {
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *m = NULL;
        const char *helper = o->config->ota.helper;
        int r;

        if (!o->bus) {
                r = sd_bus_open_system(&o->bus);
                if (r < 0)
                        return log_error_errno(r, "Cannot connect to the system bus to start the OTA helper: %m");
                r = sd_bus_attach_event(o->bus, o->event, SD_EVENT_PRIORITY_NORMAL);
                if (r < 0)
                        return r;
        }
        r = sd_bus_message_new_method_call(o->bus, &m, "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
                                           "org.freedesktop.systemd1.Manager", "StartTransientUnit");
        if (r >= 0)
                r = sd_bus_message_append(m, "ss", OTA_HELPER_UNIT, "fail");
        if (r >= 0)
                r = sd_bus_message_open_container(m, 'a', "(sv)");
        if (r >= 0)
                r = sd_bus_message_append(m, "(sv)", "Description", "s", "tether OTA install helper");
        if (r >= 0)
                r = sd_bus_message_append(m, "(sv)", "CollectMode", "s", "inactive-or-failed");
        if (r >= 0)
                r = sd_bus_message_open_container(m, 'r', "sv");
        if (r >= 0)
                r = sd_bus_message_append(m, "s", "ExecStart");
        if (r >= 0)
                r = sd_bus_message_open_container(m, 'v', "a(sasb)");
        if (r >= 0)
                r = sd_bus_message_append(m, "a(sasb)", 1, helper, 4, helper, "run", "--config", o->config_path, false);
        if (r >= 0)
                r = sd_bus_message_close_container(m);
        if (r >= 0)
                r = sd_bus_message_close_container(m);
        if (r >= 0)
                r = sd_bus_message_close_container(m);
        if (r >= 0)
                r = sd_bus_message_append(m, "a(sa(sv))", 0);
        if (r < 0)
                return log_error_errno(r, "Cannot build the StartTransientUnit call: %m");
        o->launch_slot = sd_bus_slot_unref(o->launch_slot);
        r = sd_bus_call_async(o->bus, &o->launch_slot, m, on_transient_started, o, 0);
        if (r < 0)
                return log_error_errno(r, "Cannot call StartTransientUnit: %m");
        return 0;
}

/* For tests and systems without systemd: a detached process in its own
 * session, so that the agent's death does not take it along. */
static int launch_exec(Ota *o) {
        const char *helper = o->config->ota.helper;
        pid_t pid;
        int st;

        pid = fork();
        if (pid < 0)
                return log_error_errno(errno, "Cannot fork the OTA helper: %m");
        if (pid == 0) {
                sigset_t none;
                int null;

                sigemptyset(&none);
                sigprocmask(SIG_SETMASK, &none, NULL);
                if (setsid() < 0 || fork() != 0)
                        _exit(0);
                null = open("/dev/null", O_RDONLY | O_CLOEXEC);
                if (null >= 0)
                        dup2(null, STDIN_FILENO);
                execl(helper, "tether-ota-helper", "run", "--config", o->config_path, (char *)NULL);
                fprintf(stderr, "tether-ota-helper: cannot execute '%s': %s\n", helper, strerror(errno));
                _exit(127);
        }
        while (waitpid(pid, &st, 0) < 0 && errno == EINTR)
                ;
        log_info("Started the OTA helper '%s' for job %s", helper, o->j.job);
        return 0;
}

static int launch_path(Ota *o) {
        int r = ota_write_file_atomic(o->config->ota.state_dir, OTA_REQUEST_FILE, o->j.job, strlen(o->j.job), 0644,
                                      (uid_t)-1, (gid_t)-1);

        if (r < 0)
                return log_error_errno(r, "Cannot write the OTA request file: %m");
        log_info("Asked for the OTA helper (%s/%s) for job %s", o->config->ota.state_dir, OTA_REQUEST_FILE, o->j.job);
        return 0;
}

/* Whether the helper whose pid it wrote is still there (it runs as root:
 * EPERM means it exists). */
static bool helper_alive(Ota *o) {
        _cleanup_free_ char *path = NULL, *text = NULL;
        long pid;

        if (state_path(o, "helper.pid", &path) < 0 || ota_read_file(path, 32, &text, NULL) < 0)
                return false;
        pid = strtol(text, NULL, 10);
        return pid > 1 && (kill((pid_t)pid, 0) == 0 || errno == EPERM);
}

static int on_helper_watch(sd_event_source *s, uint64_t usec, void *userdata) {
        Ota *o = userdata;

        if (!o->have_job || !ota_state_helper_owned(o->j.state))
                return 0;
        if (!helper_alive(o)) {
                log_warning("OTA job %s is '%s' but no helper is running: starting one", o->j.job,
                            ota_state_to_string(o->j.state));
                (void)launch_exec(o);
        }
        sd_event_source_set_time_relative(s, 2 * 1000000ULL);
        sd_event_source_set_enabled(s, SD_EVENT_ONESHOT);
        return 0;
}

static void launch_helper(Ota *o) {
        const char *how = o->config->ota.launcher;

        if (streq(how, "exec")) {
                (void)launch_exec(o);
                /* systemd would restart a killed helper (the path unit);
                 * here we do. */
                sd_event_source_set_time_relative(o->helper_watch, 2 * 1000000ULL);
                sd_event_source_set_enabled(o->helper_watch, SD_EVENT_ONESHOT);
        }
        else if (streq(how, "transient"))
                (void)launch_transient(o);
        else
                (void)launch_path(o);
}

/* ---- health ------------------------------------------------------------------ */

static void verdict(Ota *o, bool healthy, const char *code, const char *reason) {
        OtaHealth h = { .job = o->j.job, .token = o->health_active, .healthy = healthy, .code = (char *)code,
                        .reason = (char *)reason, .pid = getpid() };
        int r;

        r = ota_health_save(o->config->ota.state_dir, &h);
        if (r < 0) {
                log_error_errno(r, "Cannot write the OTA health verdict: %m");
                return;
        }
        if (healthy)
                log_info("OTA job %s: healthy (%s)", o->j.job, o->j.health_phase);
        else
                log_warning("OTA job %s: not healthy (%s): %s", o->j.job, o->j.health_phase, reason);
        free(o->health_answered);
        o->health_answered = strdup(o->health_active);
        sd_event_source_set_enabled(o->trial_timer, SD_EVENT_OFF);
}

static int on_trial_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        Ota *o = userdata;

        if (o->connected && o->health_active)
                verdict(o, true, NULL, NULL);
        return 0;
}

/* The helper asks (a new health_token in the journal): once connected
 * long enough, and for a plugin package with the plugin running, say so. */
static void health_check(Ota *o) {
        bool trial, want;
        uint64_t at;

        if (!o->have_job || !o->j.health_token)
                return;
        trial = o->j.state == OTA_STATE_TRIAL && streq0(o->j.health_phase, "trial");
        want = trial || (o->j.state == OTA_STATE_ROLLING_BACK && streq0(o->j.health_phase, "rollback"));
        if (!want || streq0(o->health_answered, o->j.health_token))
                return;
        if (!streq0(o->health_active, o->j.health_token)) {
                free(o->health_active);
                o->health_active = strdup(o->j.health_token);
                o->health_reloaded = false;
                o->health_since = now_usec();
                log_info("OTA job %s: proving health (%s, %.1f s connected)", o->j.job, o->j.health_phase,
                         o->j.hold_ms / 1000.0);
        }
        if (!is_self_update(o) && !o->health_reloaded) {
                /* The new (or restored) package is on disk: load its plugins. */
                o->health_reloaded = true;
                o->hooks.reload_plugins(o->hooks.userdata);
        }
        if (trial && is_plugin_job(o) && !o->hooks.plugin_running(o->hooks.userdata, o->j.plugin)) {
                _cleanup_free_ char *why = NULL;

                if (asprintf(&why, "plugin '%s' is not running after the update (see the agent's log)", o->j.plugin) < 0)
                        why = NULL;
                verdict(o, false, "plugin", why ? why : "plugin not running");
                return;
        }
        if (!o->connected)
                return; /* ota_connection_changed() comes back here */
        /* Connected for the whole window, counted from the question. */
        at = (o->connected_since > o->health_since ? o->connected_since : o->health_since) + o->j.hold_ms * 1000;
        sd_event_source_set_time(o->trial_timer, at);
        sd_event_source_set_enabled(o->trial_timer, SD_EVENT_ONESHOT);
}

/* ---- the journal, as the helper changes it --------------------------------------- */

static int on_inotify(sd_event_source *s, const struct inotify_event *ev, void *userdata) {
        Ota *o = userdata;
        OtaJournal j = {};
        OtaState before;
        int r;

        if (!(ev->mask & (IN_CLOSE_WRITE | IN_MOVED_TO)) || ev->len == 0 || !streq(ev->name, OTA_JOURNAL_FILE))
                return 0;
        r = ota_journal_load(o->config->ota.state_dir, &j);
        if (r < 0)
                return 0;
        if (!o->have_job || !streq(j.job, o->j.job) || j.seq < o->j.seq ||
            (j.seq == o->j.seq && j.state == o->j.state && streq0(j.health_token, o->j.health_token) &&
             j.delivered == o->j.delivered)) {
                ota_journal_done(&j);
                return 0;
        }
        before = o->j.state;
        ota_journal_done(&o->j);
        o->j = j;
        if (before != o->j.state)
                log_transition(o, before, " (helper)");
        report_state(o);
        health_check(o);
        if (ota_state_final(o->j.state) && !ota_state_final(before) && o->hooks.job_ended)
                o->hooks.job_ended(o->hooks.userdata);
        return 0;
}

/* ---- download and checks ----------------------------------------------------------- */

static void download_stop(Ota *o) {
        if (o->coap_download) {
                const OtaCoapDownloadStats *st = ota_coap_download_stats(o->coap_download);

                log_info("OTA job %s: %" PRIu64 " bytes in %" PRIu64 " block requests of %u bytes over the "
                         "connection, from byte %" PRIu64,
                         o->j.job, st->fetched, st->requests, st->block, st->resumed);
        }
        o->download = ota_download_free(o->download);
        o->coap_download = ota_coap_download_free(o->coap_download);
}

static void download_failed(Ota *o, int error, const char *why_failed, bool restart) {
        char text[512];
        uint64_t delay;

        /* why_failed may point into the download: copy it before freeing. */
        snprintf(text, sizeof(text), "%s", why_failed ? why_failed : "unknown error");
        download_stop(o);
        sd_event_source_set_enabled(o->progress_timer, SD_EVENT_OFF);
        if (restart) {
                o->j.dl_offset = 0;
                o->j.dl_sha256[0] = 0;
                free(o->j.dl_etag);
                o->j.dl_etag = NULL;
        }
        if (error == -EFBIG) {
                (void)move(o, OTA_STATE_REJECTED, "size", text);
                remove_file(o, OTA_DOWNLOAD_FILE);
                return;
        }
        if (error == -EPERM && !o->m.url) {
                /* The cloud refused the artifact (4.03, 4.04): asking
                 * again cannot help. */
                (void)move(o, OTA_STATE_FAILED, "download", text);
                remove_file(o, OTA_DOWNLOAD_FILE);
                return;
        }
        o->j.dl_attempts++;
        save(o);
        if (o->j.dl_attempts >= o->config->ota.download_attempts) {
                _cleanup_free_ char *why = NULL;

                if (asprintf(&why, "download failed %u times, last: %s", o->j.dl_attempts, text) < 0)
                        why = NULL;
                (void)move(o, OTA_STATE_FAILED, "download", why ? why : text);
                remove_file(o, OTA_DOWNLOAD_FILE);
                return;
        }
        delay = 1000000ULL << (o->j.dl_attempts < 6 ? o->j.dl_attempts - 1 : 6);
        if (delay > OTA_RETRY_MAX_USEC)
                delay = OTA_RETRY_MAX_USEC;
        log_warning("OTA job %s: download attempt %u failed (%s), retrying in %.0f s%s", o->j.job, o->j.dl_attempts,
                    text, delay / 1e6, restart ? " from the start" : "");
        sd_event_source_set_time_relative(o->retry_timer, delay);
        sd_event_source_set_enabled(o->retry_timer, SD_EVENT_ONESHOT);
}

static int on_check_exit(sd_event_source *s, const siginfo_t *si, void *userdata) {
        Ota *o = userdata;
        _cleanup_(debfile_control_done) DebControl c = {};
        _cleanup_free_ char *why = NULL, *from = NULL, *to = NULL;
        char buf[DEBFILE_CONTROL_MAX + 1];
        ssize_t n, len = 0;
        int r;

        o->check_child = sd_event_source_unref(o->check_child);
        o->check_pid = 0;
        while (len < (ssize_t)DEBFILE_CONTROL_MAX &&
               (n = read(o->check_fd, buf + len, DEBFILE_CONTROL_MAX - (size_t)len)) > 0)
                len += n;
        close(o->check_fd);
        o->check_fd = -1;
        if (!o->have_job || o->j.state != OTA_STATE_DOWNLOADING)
                return 0;
        if (si->si_code != CLD_EXITED || si->si_status != 0 ||
            debfile_control_parse(buf, (size_t)(len < 0 ? 0 : len), &c) < 0) {
                (void)move(o, OTA_STATE_REJECTED, "control",
                           si->si_code == CLD_EXITED && si->si_status == 127 ? "dpkg-deb is not installed"
                                                                             : "the download is not a Debian package");
                remove_file(o, OTA_DOWNLOAD_FILE);
                return 0;
        }
        if (!streq(c.package, o->m.package) || !streq(c.version, o->m.version) ||
            !streq(c.architecture, o->m.architecture)) {
                if (asprintf(&why, "the package says %s %s (%s), the manifest %s %s (%s)", c.package, c.version,
                             c.architecture, o->m.package, o->m.version, o->m.architecture) < 0)
                        why = NULL;
                (void)move(o, OTA_STATE_REJECTED, "control", why ? why : "control fields differ");
                remove_file(o, OTA_DOWNLOAD_FILE);
                return 0;
        }
        /* The helper takes it from here. */
        if (state_path(o, OTA_DOWNLOAD_FILE, &from) < 0 || state_path(o, OTA_PACKAGE_FILE, &to) < 0)
                return 0;
        if (rename(from, to) < 0) {
                r = -errno;
                log_error_errno(r, "Cannot rename '%s': %m", from);
                (void)move(o, OTA_STATE_FAILED, "io", "cannot keep the downloaded package");
                return 0;
        }
        log_info("OTA job %s: downloaded and checked %s %s in %.1f s", o->j.job, o->m.package, o->m.version,
                 (now_usec() - o->dl_started_usec) / 1e6);
        if (move(o, OTA_STATE_DOWNLOADED, NULL, NULL) < 0)
                return 0;
        launch_helper(o);
        return 0;
}

/* dpkg-deb --field, as a child of the loop. */
static void check_control(Ota *o) {
        _cleanup_free_ char *path = NULL;
        const char *argv[8], *step = NULL;
        int fd, r;
        pid_t pid;

        if (state_path(o, OTA_DOWNLOAD_FILE, &path) < 0) {
                (void)move(o, OTA_STATE_FAILED, "io", "cannot check the package");
                return;
        }
        debfile_control_argv(path, argv);
        r = spawn_reader(argv, &pid, &fd, &step);
        if (r < 0) {
                (void)move(o, OTA_STATE_FAILED, "io",
                           streq(step, "fork") ? "cannot fork dpkg-deb" : "cannot check the package");
                return;
        }
        o->check_fd = fd;
        o->check_pid = pid;
        r = sd_event_add_child(o->event, &o->check_child, pid, WEXITED, on_check_exit, o);
        if (r < 0) {
                log_error_errno(r, "Cannot watch dpkg-deb: %m");
                (void)kill(pid, SIGKILL);
        }
}

static void on_dl_progress(void *userdata, uint64_t bytes) {
        Ota *o = userdata;

        o->dl_bytes = bytes;
        ota_crash_point("download-data");
}

static void on_dl_checkpoint(void *userdata, uint64_t offset, const char *sha256, const char *etag) {
        Ota *o = userdata;

        o->j.dl_offset = offset;
        snprintf(o->j.dl_sha256, sizeof(o->j.dl_sha256), "%s", sha256);
        if (!streq0(o->j.dl_etag, etag)) {
                free(o->j.dl_etag);
                o->j.dl_etag = etag ? strdup(etag) : NULL;
        }
        save(o);
        ota_crash_point("download-checkpoint");
}

static void on_dl_restarted(void *userdata, const char *why) {
        Ota *o = userdata;

        log_warning("OTA job %s: starting the download over: %s", o->j.job, why);
        o->dl_bytes = 0;
}

static void on_dl_done(void *userdata, int error, const char *sha256, const char *text, bool restart) {
        Ota *o = userdata;

        if (error < 0)
                return download_failed(o, error, text, restart);
        download_stop(o);
        sd_event_source_set_enabled(o->progress_timer, SD_EVENT_OFF);
        o->dl_bytes = o->m.size;
        if (!streq(sha256, o->m.sha256)) {
                _cleanup_free_ char *why = NULL;

                if (asprintf(&why, "the download's SHA-256 is %s, the manifest says %s", sha256, o->m.sha256) < 0)
                        why = NULL;
                (void)move(o, OTA_STATE_REJECTED, "checksum", why ? why : "SHA-256 mismatch");
                remove_file(o, OTA_DOWNLOAD_FILE);
                return;
        }
        check_control(o);
}

static const OtaDownloadHooks download_hooks = {
        .progress = on_dl_progress,
        .checkpoint = on_dl_checkpoint,
        .restarted = on_dl_restarted,
        .done = on_dl_done,
};

/* No url in the manifest: GET /a/SHA256 over the connection, once it is
 * up (ota_connection_changed() starts it then; a retry's backoff still
 * comes first). */
static void download_begin_coap(Ota *o, const char *path) {
        OtaDownloadHooks hooks = download_hooks;
        int r;

        if (!o->connected) {
                o->dl_wait_connected = true;
                log_info("OTA job %s: the download waits for the connection to the cloud", o->j.job);
                return;
        }
        o->dl_wait_connected = false;
        hooks.userdata = o;
        r = ota_coap_download_start(o->event, o->conn,
                                    &(OtaCoapDownloadParams){
                                            .sha256 = o->m.sha256,
                                            .path = path,
                                            .size = o->m.size,
                                            .offset = o->j.dl_offset,
                                            .prefix_sha256 = o->j.dl_sha256,
                                            .etag = o->j.dl_etag,
                                            .timeout_ms = o->config->ota.low_speed_ms,
                                    },
                                    &hooks, &o->coap_download);
        if (r < 0) {
                log_error_errno(r, "Cannot start the download of artifact %s: %m", o->m.sha256);
                download_failed(o, r, "cannot start the download", false);
                return;
        }
        if (!o->dl_started_usec)
                o->dl_started_usec = now_usec();
        o->dl_bytes = o->j.dl_offset;
        log_info("OTA job %s: downloading artifact %s over the connection to the cloud%s", o->j.job, o->m.sha256,
                 o->j.dl_offset ? " (resuming)" : "");
        sd_event_source_set_time_relative(o->progress_timer, o->config->ota.progress_interval_ms * 1000);
        sd_event_source_set_enabled(o->progress_timer, SD_EVENT_ON);
}

static void download_begin(Ota *o) {
        _cleanup_free_ char *path = NULL;
        OtaDownloadParams p;
        int r;

        if (o->download || o->coap_download || o->check_pid || !o->have_manifest ||
            o->j.state != OTA_STATE_DOWNLOADING)
                return;
        if (state_path(o, OTA_DOWNLOAD_FILE, &path) < 0)
                return;
        if (!o->m.url) {
                download_begin_coap(o, path);
                return;
        }
        p = (OtaDownloadParams){
                .url = o->m.url,
                .path = path,
                .size = o->m.size,
                .offset = o->j.dl_offset,
                .prefix_sha256 = o->j.dl_sha256,
                .etag = o->j.dl_etag,
                .ca_file = ca_file(o),
                .cert_file = o->config->cert_file,
                .key_file = o->config->key_file,
                .low_speed_bytes = o->config->ota.low_speed_bytes,
                .low_speed_ms = o->config->ota.low_speed_ms,
        };
        {
                OtaDownloadHooks hooks = download_hooks;

                hooks.userdata = o;
                r = ota_download_start(o->event, &p, &hooks, &o->download);
        }
        if (r < 0) {
                log_error_errno(r, "Cannot start the download of '%s': %m", o->m.url);
                download_failed(o, r, "cannot start the download", false);
                return;
        }
        if (!o->dl_started_usec)
                o->dl_started_usec = now_usec();
        o->dl_bytes = o->j.dl_offset;
        log_info("OTA job %s: downloading %s%s", o->j.job, o->m.url, o->j.dl_offset ? " (resuming)" : "");
        sd_event_source_set_time_relative(o->progress_timer, o->config->ota.progress_interval_ms * 1000);
        sd_event_source_set_enabled(o->progress_timer, SD_EVENT_ON);
}

static int on_retry_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        download_begin(userdata);
        return 0;
}

/* ---- jobs ------------------------------------------------------------------------- */

static unsigned reply(char *text, size_t size, unsigned code, const char *fmt, ...) _printf_(4, 5);
static unsigned reply(char *text, size_t size, unsigned code, const char *fmt, ...) {
        va_list ap;

        va_start(ap, fmt);
        vsnprintf(text, size, fmt, ap);
        va_end(ap);
        return code;
}

uint64_t ota_reports_held(const Ota *o) {
        return o->reports_held;
}

unsigned ota_handle_request(Ota *o, const char *job, const uint8_t *data, size_t len, char *text, size_t text_size) {
        _cleanup_free_ char *why = NULL;
        ManifestReject rej = MANIFEST_OK;
        const char *err = NULL;
        Manifest m = {};
        int r;

        if (!ota_job_id_valid(job, strlen(job)))
                return reply(text, text_size, COAP_RESPONSE_CODE_BAD_REQUEST, "malformed: invalid job id");
        if (o->have_job && streq(o->j.job, job))
                return reply(text, text_size, COAP_RESPONSE_CODE_CREATED, "%s", ""); /* a retry */
        if (o->have_job && (!ota_state_final(o->j.state) || !o->j.delivered))
                return reply(text, text_size, COAP_RESPONSE_CODE_SERVICE_UNAVAILABLE, "busy: job %s is %s", o->j.job,
                             ota_state_final(o->j.state) ? "not reported yet" : "in progress");
        if (len > MANIFEST_MAX)
                return reply(text, text_size, COAP_RESPONSE_CODE_REQUEST_TOO_LARGE,
                             "malformed: the manifest is over %u bytes", MANIFEST_MAX);

        /* The signature, over the exact bytes, before anything else. */
        r = manifest_open(o->keyring, data, len, &m, &rej, &err);
        if (r < 0) {
                log_warning("Refusing OTA job %s: %s: %s", job, manifest_reject_to_string(rej), err);
                return reply(text, text_size,
                             rej == MANIFEST_MALFORMED ? COAP_RESPONSE_CODE_BAD_REQUEST : COAP_RESPONSE_CODE_FORBIDDEN,
                             "%s: %s", manifest_reject_to_string(rej), err);
        }
        /* Meant for this device? This agent knows no tags of its own yet
         * (docs/ota.md, "Targets"): only its id can match. */
        rej = manifest_check_target(&m, conn_device_id(o->conn), NULL, 0, &why);
        if (rej == MANIFEST_OK) {
                _cleanup_free_ char *floor = ota_floor_for(o->config->ota.cache_dir, m.package);

                rej = manifest_check(&m, (int64_t)time(NULL), o->arch, floor, &why);
        }
        if (rej == MANIFEST_OK)
                rej = space_check(o, &m, &why);
        if (rej == MANIFEST_OK) {
                _cleanup_free_ char *before = NULL;
                unsigned dropped = 0;

                /* Once per nonce, recorded before the job is journaled: a
                 * crash in between costs this manifest, never a replay. */
                r = ota_nonce_claim(o->config->ota.state_dir, m.nonce, job, m.expires, (int64_t)time(NULL), &dropped,
                                    &before);
                if (r == -EEXIST) {
                        rej = MANIFEST_REPLAY;
                        if (asprintf(&why, "this manifest (nonce %s) was accepted before, as job %s", m.nonce,
                                     before ? before : "?") < 0)
                                why = NULL;
                } else if (r < 0) {
                        log_error_errno(r, "Cannot record the OTA job nonce in '%s/%s': %m", o->config->ota.state_dir,
                                        OTA_NONCES_FILE);
                        manifest_done(&m);
                        return reply(text, text_size, COAP_RESPONSE_CODE_INTERNAL_ERROR,
                                     "failed: cannot record the job nonce: %s",
                                     r == -EBADMSG ? "the nonce record is unreadable" : strerror(-r));
                } else if (dropped > 0)
                        log_warning("The OTA nonce record is full: forgot the %u nonce(s) that expire soonest",
                                    dropped);
        }
        if (rej != MANIFEST_OK) {
                log_warning("Refusing OTA job %s (%s %s): %s: %s", job, m.package, m.version,
                            manifest_reject_to_string(rej), why ? why : "");
                manifest_done(&m);
                return reply(text, text_size, COAP_RESPONSE_CODE_FORBIDDEN, "%s: %s", manifest_reject_to_string(rej),
                             why ? why : "refused");
        }

        /* Journal it before saying yes. */
        job_forget(o);
        snprintf(o->j.job, sizeof(o->j.job), "%s", job);
        o->j.manifest = strndup((const char *)data, len);
        o->j.package = strdup(m.package);
        o->j.version = strdup(m.version);
        o->j.plugin = m.plugin ? strdup(m.plugin) : NULL;
        o->m = m;
        o->have_manifest = o->have_job = true;
        if (!o->j.manifest || !o->j.package || !o->j.version || (m.plugin && !o->j.plugin)) {
                job_forget(o);
                return reply(text, text_size, COAP_RESPONSE_CODE_INTERNAL_ERROR, "failed: out of memory");
        }
        remove_file(o, OTA_DOWNLOAD_FILE);
        remove_file(o, OTA_PACKAGE_FILE);
        remove_file(o, OTA_HEALTH_FILE);
        r = ota_journal_transition(o->config->ota.state_dir, &o->j, OTA_STATE_ACCEPTED, NULL, NULL,
                                   o->config->ota.max_transitions, (uid_t)-1, (gid_t)-1);
        if (r < 0) {
                log_error_errno(r, "Cannot journal OTA job %s in '%s': %m", job, o->config->ota.state_dir);
                job_forget(o);
                return reply(text, text_size, COAP_RESPONSE_CODE_INTERNAL_ERROR, "failed: cannot journal the job: %s",
                             strerror(-r));
        }
        log_info("OTA job %s accepted: %s %s (%s), %" PRIu64 " bytes, key %s", job, o->m.package, o->m.version,
                 o->m.architecture, o->m.size, o->m.key_id);
        o->dl_started_usec = 0;
        o->acked_seq = o->j.seq; /* the 2.01 is the report of "accepted" */
        /* Start after the answer has gone out: no report may overtake it. */
        sd_event_source_set_enabled(o->start_source, SD_EVENT_ONESHOT);
        return reply(text, text_size, COAP_RESPONSE_CODE_CREATED, "%s", "");
}

static int on_start(sd_event_source *s, void *userdata) {
        Ota *o = userdata;

        if (o->have_job && o->j.state == OTA_STATE_ACCEPTED && move(o, OTA_STATE_DOWNLOADING, NULL, NULL) >= 0)
                download_begin(o);
        return 0;
}

/* After a start: continue the journaled job. */
static void resume(Ota *o) {
        ManifestReject rej = MANIFEST_OK;
        const char *err = NULL;

        if (!o->have_job)
                return;
        log_info("OTA job %s (%s %s) found in state '%s'", o->j.job, o->j.package ? o->j.package : "?",
                 o->j.version ? o->j.version : "?", ota_state_to_string(o->j.state));
        if (!ota_state_final(o->j.state)) {
                /* What we do, we do only for a manifest we still trust. */
                if (manifest_open(o->keyring, (const uint8_t *)o->j.manifest, strlen(o->j.manifest), &o->m, &rej,
                                  &err) < 0) {
                        if (!ota_state_helper_owned(o->j.state)) {
                                (void)move(o, OTA_STATE_REJECTED, manifest_reject_to_string(rej), err);
                                return;
                        }
                        /* the helper decides (and may roll back) */
                } else
                        o->have_manifest = true;
        }
        switch (ota_resume(o->j.state)) {
        case OTA_STEP_DOWNLOAD:
                if (o->j.state == OTA_STATE_DOWNLOADING) {
                        /* interrupted: this counts, so a crash cannot loop forever */
                        if (move(o, ota_next(o->j.state, OTA_CRASHED), o->j.code, o->j.reason) < 0)
                                return;
                } else if (move(o, OTA_STATE_DOWNLOADING, NULL, NULL) < 0)
                        return;
                download_begin(o);
                break;
        case OTA_STEP_INSTALL:
        case OTA_STEP_ROLLBACK:
        case OTA_STEP_TRIAL:
                launch_helper(o);
                health_check(o);
                break;
        case OTA_STEP_DELIVER:
        case OTA_STEP_NOTHING:
                break;
        }
        report_state(o);
}

int ota_start(Ota *o) {
        int r;

        r = ota_journal_load(o->config->ota.state_dir, &o->j);
        if (r == -ENOENT)
                return 0;
        if (r == -EBADMSG) {
                _cleanup_free_ char *from = NULL, *to = NULL;

                /* Not ours to guess at: keep it for a human, carry on. */
                if (state_path(o, OTA_JOURNAL_FILE, &from) >= 0 && state_path(o, "job.json.bad", &to) >= 0)
                        (void)rename(from, to);
                return log_error_errno(r, "The OTA journal in '%s' is unreadable; moved it to '%s'",
                                       o->config->ota.state_dir, to ? to : "?");
        }
        if (r < 0)
                return log_error_errno(r, "Cannot read the OTA journal in '%s': %m", o->config->ota.state_dir);
        o->have_job = true;
        if (ota_state_final(o->j.state) && o->j.delivered)
                return 0; /* kept: the cloud may ask for this job again */
        resume(o);
        return 0;
}

void ota_connection_changed(Ota *o, bool connected) {
        if (connected == o->connected)
                return;
        o->connected = connected;
        if (connected) {
                o->connected_since = now_usec();
                report_state(o);
                health_check(o);
                if (o->dl_wait_connected && sd_event_source_get_enabled(o->retry_timer, NULL) <= 0)
                        download_begin(o);
        } else {
                sd_event_source_set_enabled(o->trial_timer, SD_EVENT_OFF);
                o->report_inflight = o->progress_inflight = false;
        }
}

void ota_reconfigure(Ota *o, const Config *cfg) {
        o->config = cfg;
        keyring_reload(o);
}

int ota_new(sd_event *event, Conn *conn, const Config *cfg, const char *config_path, const OtaHooks *hooks,
            Ota **ret) {
        _cleanup_(ota_freep) Ota *o = calloc(1, sizeof(Ota));
        sigset_t chld;
        int r;

        if (!o)
                return -ENOMEM;
        o->event = sd_event_ref(event);
        o->conn = conn;
        o->config = cfg;
        o->hooks = *hooks;
        o->check_fd = -1;
        o->config_path = strdup(config_path);
        if (!o->config_path)
                return -ENOMEM;
        sigemptyset(&chld);
        sigaddset(&chld, SIGCHLD);
        sigprocmask(SIG_BLOCK, &chld, NULL);
        if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
                return -EIO;
        o->curl_initialized = true;
        keyring_reload(o);
        r = debfile_native_arch(&o->arch);
        if (r < 0)
                log_warning_errno(r, "Cannot ask dpkg for this machine's architecture (only 'all' packages will be "
                                     "accepted): %m");
        r = ota_mkdir_p(cfg->ota.state_dir, 0750);
        if (r < 0)
                log_warning_errno(r, "Cannot create the OTA state directory '%s': %m", cfg->ota.state_dir);
        else {
                r = sd_event_add_inotify(event, &o->inotify, cfg->ota.state_dir, IN_CLOSE_WRITE | IN_MOVED_TO,
                                         on_inotify, o);
                if (r < 0)
                        log_warning_errno(r, "Cannot watch '%s': %m", cfg->ota.state_dir);
        }
        r = sd_event_add_time(event, &o->retry_timer, CLOCK_MONOTONIC, 0, 0, on_retry_timer, o);
        if (r >= 0)
                r = sd_event_source_set_enabled(o->retry_timer, SD_EVENT_OFF);
        if (r >= 0)
                r = sd_event_add_time(event, &o->progress_timer, CLOCK_MONOTONIC, 0, 0, on_progress_timer, o);
        if (r >= 0)
                r = sd_event_source_set_enabled(o->progress_timer, SD_EVENT_OFF);
        if (r >= 0)
                r = sd_event_add_time(event, &o->report_retry, CLOCK_MONOTONIC, 0, 0, on_report_retry, o);
        if (r >= 0)
                r = sd_event_source_set_time_relative(o->report_retry, OTA_REPORT_RETRY_USEC);
        if (r >= 0)
                r = sd_event_source_set_enabled(o->report_retry, SD_EVENT_OFF);
        if (r >= 0)
                r = sd_event_add_defer(event, &o->start_source, on_start, o);
        if (r >= 0)
                r = sd_event_source_set_enabled(o->start_source, SD_EVENT_OFF);
        if (r >= 0)
                r = sd_event_add_time(event, &o->helper_watch, CLOCK_MONOTONIC, 0, 0, on_helper_watch, o);
        if (r >= 0)
                r = sd_event_source_set_enabled(o->helper_watch, SD_EVENT_OFF);
        if (r >= 0)
                r = sd_event_add_time(event, &o->trial_timer, CLOCK_MONOTONIC, 0, 0, on_trial_timer, o);
        if (r >= 0)
                r = sd_event_source_set_enabled(o->trial_timer, SD_EVENT_OFF);
        if (r < 0)
                return r;
        *ret = TAKE_PTR(o);
        return 0;
}

Ota *ota_free(Ota *o) {
        if (!o)
                return NULL;
        o->download = ota_download_free(o->download);
        o->coap_download = ota_coap_download_free(o->coap_download);
        if (o->check_pid > 0) {
                (void)kill(o->check_pid, SIGKILL);
                (void)waitpid(o->check_pid, NULL, 0);
        }
        if (o->check_fd >= 0)
                close(o->check_fd);
        sd_event_source_disable_unref(o->check_child);
        sd_event_source_disable_unref(o->inotify);
        sd_event_source_disable_unref(o->retry_timer);
        sd_event_source_disable_unref(o->progress_timer);
        sd_event_source_disable_unref(o->report_retry);
        sd_event_source_disable_unref(o->trial_timer);
        sd_event_source_disable_unref(o->helper_watch);
        sd_event_source_disable_unref(o->start_source);
        sd_bus_slot_unref(o->launch_slot);
        sd_bus_flush_close_unref(o->bus);
        job_forget(o);
        keyring_free(o->keyring);
        free(o->arch);
        free(o->config_path);
        sd_event_unref(o->event);
        if (o->curl_initialized)
                curl_global_cleanup();
        free(o);
        return NULL;
}
