/* SPDX-License-Identifier: Apache-2.0 */
/* Unit tests for the OTA journal and state machine (lib/ota-journal.c,
 * agent/ota-install.c): atomic saves, the transition limit, and a whole job
 * driven through the real state machine with fake effects (dpkg is a file
 * holding the installed version) while the process is killed with SIGKILL
 * at every crash point in turn; after each kill a restart must end the job
 * in an allowed final state with the installed version matching it. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include "ota-install.h"
#include "manifest.h"
#include "ota-journal.h"
#include "util.h"

#define MAX_TRANSITIONS 20

typedef struct Scenario {
        const char *name;
        OtaOutcome download;  /* OK, REJECT (checksum) or FAIL */
        bool reject;          /* the helper's re-verification refuses */
        bool locked;          /* dpkg stays locked */
        bool postinst_fails;  /* dpkg -i new fails */
        bool new_unhealthy;   /* the new version never becomes healthy */
        bool restore_fails;   /* even the rollback fails */
        OtaState expect;      /* the final state of an uninterrupted run */
} Scenario;

typedef struct World {
        char dir[64];
        const Scenario *sc;
        unsigned tokens;
} World;

static void world_write(World *w, const char *name, const char *text) {
        assert_int_equal(ota_write_file_atomic(w->dir, name, text, strlen(text), 0644, (uid_t)-1, (gid_t)-1), 0);
}

static char *world_read(World *w, const char *name) {
        char path[128], *s = NULL;

        snprintf(path, sizeof(path), "%s/%s", w->dir, name);
        if (ota_read_file(path, 1024, &s, NULL) < 0)
                return NULL;
        return s;
}

static void set(char **dst, const char *s) {
        if (dst)
                *dst = s ? strdup(s) : NULL;
}

static OtaOutcome f_prepare(void *u, OtaJournal *j, char **code, char **reason) {
        World *w = u;

        if (w->sc->reject) {
                set(code, "checksum");
                set(reason, "the copy does not match");
                return OTA_REJECT;
        }
        j->prev_known = true;
        free(j->prev_version);
        j->prev_version = strdup("1.0");
        return OTA_OK;
}

static OtaOutcome f_lock(void *u, OtaJournal *j, char **code, char **reason) {
        World *w = u;

        if (w->sc->locked) {
                set(code, "dpkg-locked");
                return OTA_LOCKED;
        }
        return OTA_OK;
}

static void f_unlock(void *u) {
}

/* dpkg: the package is half there while it runs */
static OtaOutcome f_install(void *u, OtaJournal *j, char **code, char **reason) {
        World *w = u;

        world_write(w, "installed", "2.0-half");
        ota_crash_point("dpkg-unpack");
        if (w->sc->postinst_fails) {
                set(code, "install-failed");
                set(reason, "postinst returned 1");
                return OTA_FAIL;
        }
        world_write(w, "installed", "2.0");
        return OTA_OK;
}

static OtaOutcome f_restore(void *u, OtaJournal *j, char **code, char **reason) {
        World *w = u;

        world_write(w, "installed", "1.0-half");
        ota_crash_point("dpkg-restore");
        if (w->sc->restore_fails)
                return OTA_FAIL;
        world_write(w, "installed", "1.0");
        return OTA_OK;
}

static OtaOutcome f_wait_health(void *u, OtaJournal *j, char **code, char **reason) {
        World *w = u;
        _cleanup_free_ char *v = world_read(w, "installed");
        bool healthy = v && (streq(v, "1.0") || (streq(v, "2.0") && !w->sc->new_unhealthy));

        assert_non_null(j->health_token);
        if (healthy)
                return OTA_OK;
        set(code, "unhealthy");
        set(reason, "not connected within the trial window");
        return OTA_FAIL;
}

static void f_commit(void *u, OtaJournal *j) {
        world_write(u, "floor", "2.0");
}

static void f_finished(void *u, OtaJournal *j) {
        world_write(u, "finished", ota_state_to_string(j->state));
}

static char *f_token(void *u) {
        World *w = u;
        char *t = NULL;

        if (asprintf(&t, "token-%u", ++w->tokens) < 0)
                return NULL;
        return t;
}

static const OtaInstallOps fake_ops = {
        .prepare = f_prepare,
        .lock = f_lock,
        .unlock = f_unlock,
        .install = f_install,
        .restore = f_restore,
        .wait_health = f_wait_health,
        .commit = f_commit,
        .finished = f_finished,
        .token = f_token,
};

/* The agent's part: accept, download, deliver. */
static void agent_part(World *w) {
        OtaJournal j = {};
        int r = ota_journal_load(w->dir, &j);

        if (r == -ENOENT) {
                snprintf(j.job, sizeof(j.job), "0123456789abcdef");
                j.manifest = strdup("(signed manifest)");
                j.package = strdup("tether-agent");
                j.version = strdup("2.0");
                assert_int_equal(ota_journal_transition(w->dir, &j, OTA_STATE_ACCEPTED, NULL, NULL, MAX_TRANSITIONS,
                                                        (uid_t)-1, (gid_t)-1),
                                 0);
        } else {
                assert_int_equal(r, 0);
                /* Like tetherd: a download found running was interrupted, and
                 * that counts, so a crash in it cannot loop forever. */
                if (j.state == OTA_STATE_DOWNLOADING) {
                        r = ota_journal_transition(w->dir, &j, ota_next(j.state, OTA_CRASHED), NULL, NULL,
                                                   MAX_TRANSITIONS, (uid_t)-1, (gid_t)-1);
                        if (r == -ELOOP)
                                r = ota_journal_transition(w->dir, &j, ota_next(j.state, OTA_LIMIT), "loop", NULL,
                                                           MAX_TRANSITIONS, (uid_t)-1, (gid_t)-1);
                        assert_int_equal(r, 0);
                }
        }
        while (ota_resume(j.state) == OTA_STEP_DOWNLOAD) {
                OtaOutcome o = j.state == OTA_STATE_ACCEPTED ? OTA_OK : w->sc->download;
                OtaState next = ota_next(j.state, o);

                r = ota_journal_transition(w->dir, &j, next, o == OTA_OK ? NULL : "checksum", NULL, MAX_TRANSITIONS,
                                           (uid_t)-1, (gid_t)-1);
                if (r == -ELOOP)
                        r = ota_journal_transition(w->dir, &j, ota_next(j.state, OTA_LIMIT), "loop", NULL,
                                                   MAX_TRANSITIONS, (uid_t)-1, (gid_t)-1);
                assert_int_equal(r, 0);
        }
        ota_journal_done(&j);
}

static void deliver(World *w) {
        OtaJournal j = {};

        assert_int_equal(ota_journal_load(w->dir, &j), 0);
        if (ota_resume(j.state) == OTA_STEP_DELIVER && !j.delivered) {
                j.delivered = true;
                ota_crash_point("delivered");
                assert_int_equal(ota_journal_save(w->dir, &j, (uid_t)-1, (gid_t)-1), 0);
        }
        ota_journal_done(&j);
}

/* One start of "the device": agent, helper, agent again. */
static void device_run(World *w) {
        OtaInstallParams p = { .dir = w->dir, .max_transitions = MAX_TRANSITIONS, .trial_ms = 1000,
                               .owner = (uid_t)-1, .group = (gid_t)-1 };
        OtaInstallOps ops = fake_ops;

        ops.userdata = w;
        agent_part(w);
        assert_int_equal(ota_install_run(&p, &ops), 0);
        deliver(w);
}

static void world_init(World *w, const Scenario *sc) {
        snprintf(w->dir, sizeof(w->dir), "/tmp/tether-ota-test-XXXXXX");
        assert_non_null(mkdtemp(w->dir));
        w->sc = sc;
        world_write(w, "installed", "1.0");
}

static void world_done(World *w) {
        char cmd[128];

        snprintf(cmd, sizeof(cmd), "rm -rf '%s'", w->dir);
        assert_int_equal(system(cmd), 0);
}

/* Run device_run() in a child with TETHER_OTA_CRASH_AT=crash; true if the
 * child was killed at that point. */
static bool run_child(World *w, const char *crash) {
        pid_t pid;
        int st;

        fflush(NULL);
        pid = fork();
        assert_true(pid >= 0);
        if (pid == 0) {
                if (crash)
                        setenv("TETHER_OTA_CRASH_AT", crash, 1);
                else
                        unsetenv("TETHER_OTA_CRASH_AT");
                device_run(w);
                _exit(0);
        }
        assert_int_equal(waitpid(pid, &st, 0), pid);
        if (WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL)
                return true;
        if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
                fail_msg("the device run died with status %d", st);
        return false;
}

/* The job is over and the installed version fits the outcome. */
static OtaState check_end(World *w, const Scenario *sc, const char *after) {
        _cleanup_free_ char *v = world_read(w, "installed");
        OtaJournal j = {};
        OtaState s;

        assert_int_equal(ota_journal_load(w->dir, &j), 0);
        s = j.state;
        if (!ota_state_final(s) || !j.delivered)
                fail_msg("%s, %s: ended in '%s' (delivered %d)", sc->name, after, ota_state_to_string(s), j.delivered);
        if (j.seq > MAX_TRANSITIONS + OTA_ROLLBACK_EXTRA_TRANSITIONS + 2)
                fail_msg("%s, %s: %llu transitions", sc->name, after, (unsigned long long)j.seq);
        switch (s) {
        case OTA_STATE_COMMITTED:
                if (!streq(v, "2.0"))
                        fail_msg("%s, %s: committed with '%s' installed", sc->name, after, v);
                break;
        case OTA_STATE_ROLLED_BACK:
        case OTA_STATE_REJECTED:
        case OTA_STATE_DEFERRED:
                if (!streq(v, "1.0"))
                        fail_msg("%s, %s: %s with '%s' installed", sc->name, after, ota_state_to_string(s), v);
                break;
        case OTA_STATE_FAILED:
                /* only when even the rollback failed, or the download did */
                if (!sc->restore_fails && sc->download == OTA_OK)
                        fail_msg("%s, %s: failed (%s) with '%s' installed", sc->name, after, j.reason ? j.reason : "",
                                 v);
                break;
        default:
                fail_msg("%s: not final", sc->name);
        }
        ota_journal_done(&j);
        return s;
}

static const Scenario scenarios[] = {
        { "good update", OTA_OK, false, false, false, false, false, OTA_STATE_COMMITTED },
        { "postinst fails", OTA_OK, false, false, true, false, false, OTA_STATE_ROLLED_BACK },
        { "new version unhealthy", OTA_OK, false, false, false, true, false, OTA_STATE_ROLLED_BACK },
        { "re-verification refuses", OTA_OK, true, false, false, false, false, OTA_STATE_REJECTED },
        { "dpkg locked", OTA_OK, false, true, false, false, false, OTA_STATE_DEFERRED },
        { "download corrupt", OTA_REJECT, false, false, false, false, false, OTA_STATE_REJECTED },
        { "download fails", OTA_FAIL, false, false, false, false, false, OTA_STATE_FAILED },
        { "rollback fails too", OTA_OK, false, false, true, false, true, OTA_STATE_FAILED },
};

static void test_scenarios_uninterrupted(void **state) {
        for (size_t i = 0; i < ELEMENTSOF(scenarios); i++) {
                World w;
                OtaState s;

                world_init(&w, &scenarios[i]);
                assert_false(run_child(&w, NULL));
                s = check_end(&w, &scenarios[i], "no crash");
                if (s != scenarios[i].expect)
                        fail_msg("%s: ended %s, expected %s", scenarios[i].name, ota_state_to_string(s),
                                 ota_state_to_string(scenarios[i].expect));
                world_done(&w);
        }
}

/* Kill the device at crash point 1, 2, 3, ... of every scenario; after a
 * restart the job must end consistently. */
static void test_crash_at_every_point(void **state) {
        unsigned total = 0;

        for (size_t i = 0; i < ELEMENTSOF(scenarios); i++) {
                for (unsigned k = 1;; k++) {
                        char crash[16], after[64];
                        World w;
                        bool killed;

                        world_init(&w, &scenarios[i]);
                        snprintf(crash, sizeof(crash), "#%u", k);
                        killed = run_child(&w, crash);
                        if (killed) {
                                total++;
                                assert_false(run_child(&w, NULL));
                        }
                        snprintf(after, sizeof(after), "crash at point %u", k);
                        check_end(&w, &scenarios[i], after);
                        world_done(&w);
                        if (!killed)
                                break;
                        assert_true(k < 100);
                }
        }
        print_message("killed and restarted %u times\n", total);
        assert_true(total > 40);
}

/* A crash at the same point on every start cannot loop forever. */
static void test_repeated_crash(void **state) {
        static const struct {
                const char *point;
                size_t scenario;
                OtaState expect;
        } cases[] = {
                { "trial", 0, OTA_STATE_ROLLED_BACK },       { "installing", 0, OTA_STATE_ROLLED_BACK },
                { "dpkg-unpack", 0, OTA_STATE_ROLLED_BACK }, { "rolling-back", 1, OTA_STATE_FAILED },
                { "dpkg-restore", 1, OTA_STATE_FAILED },     { "downloading", 0, OTA_STATE_FAILED },
        };

        for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
                World w;
                unsigned starts = 0;
                OtaJournal j = {};

                world_init(&w, &scenarios[cases[i].scenario]);
                while (run_child(&w, cases[i].point))
                        if (++starts > 3 * MAX_TRANSITIONS)
                                fail_msg("crash at '%s' on every start: still going after %u starts",
                                         cases[i].point, starts);
                assert_int_equal(ota_journal_load(w.dir, &j), 0);
                if (j.state != cases[i].expect)
                        fail_msg("crash at '%s' on every start: ended %s (%s), expected %s", cases[i].point,
                                 ota_state_to_string(j.state), j.reason ? j.reason : "",
                                 ota_state_to_string(cases[i].expect));
                if (cases[i].expect == OTA_STATE_ROLLED_BACK) {
                        _cleanup_free_ char *v = world_read(&w, "installed");
                        assert_string_equal(v, "1.0");
                }
                print_message("crash at '%s' on every start: %s after %u starts, %llu transitions\n", cases[i].point,
                              ota_state_to_string(j.state), starts, (unsigned long long)j.seq);
                ota_journal_done(&j);
                world_done(&w);
        }
}

static void test_journal_roundtrip(void **state) {
        World w;
        OtaJournal j = {}, k = {};
        char path[128];
        struct stat st;

        world_init(&w, &scenarios[0]);
        assert_int_equal(ota_journal_load(w.dir, &k), -ENOENT);
        snprintf(j.job, sizeof(j.job), "00ff00ff00ff00ff");
        j.manifest = strdup("tether-ota-manifest/2\nkey=…");
        j.package = strdup("tether-plugin-x");
        j.plugin = strdup("x");
        j.dl_offset = 1234;
        snprintf(j.dl_sha256, sizeof(j.dl_sha256), "%064d", 7);
        j.dl_etag = strdup("\"abc\"");
        j.prev_known = true;
        assert_int_equal(ota_journal_transition(w.dir, &j, OTA_STATE_DOWNLOADING, "c", "r", 2, (uid_t)-1, (gid_t)-1),
                         0);
        assert_int_equal(ota_journal_transition(w.dir, &j, OTA_STATE_DOWNLOADED, NULL, NULL, 2, (uid_t)-1, (gid_t)-1),
                         0);
        /* the limit: a third non-final transition is refused, nothing written */
        assert_int_equal(ota_journal_transition(w.dir, &j, OTA_STATE_INSTALLING, NULL, NULL, 2, (uid_t)-1, (gid_t)-1),
                         -ELOOP);
        assert_int_equal(ota_journal_load(w.dir, &k), 0);
        assert_int_equal(k.state, OTA_STATE_DOWNLOADED);
        assert_int_equal(k.seq, 2);
        assert_null(k.code);
        assert_string_equal(k.package, "tether-plugin-x");
        assert_string_equal(k.plugin, "x");
        assert_string_equal(k.manifest, j.manifest);
        assert_int_equal(k.dl_offset, 1234);
        assert_string_equal(k.dl_sha256, j.dl_sha256);
        assert_string_equal(k.dl_etag, "\"abc\"");
        assert_true(k.prev_known);
        assert_null(k.prev_version);
        ota_journal_done(&k);
        /* rollback gets a few more; final states are always written */
        assert_int_equal(ota_journal_transition(w.dir, &j, OTA_STATE_ROLLING_BACK, NULL, NULL, 2, (uid_t)-1, (gid_t)-1),
                         0);
        assert_int_equal(ota_journal_transition(w.dir, &j, OTA_STATE_FAILED, "x", "y", 2, (uid_t)-1, (gid_t)-1), 0);
        /* no temporary file is left behind */
        snprintf(path, sizeof(path), "%s/.%s.tmp", w.dir, OTA_JOURNAL_FILE);
        assert_int_equal(stat(path, &st), -1);
        /* a torn or foreign journal is reported, not guessed at */
        world_write(&w, OTA_JOURNAL_FILE, "{\"format\":1,\"job\":\"x\"");
        assert_int_equal(ota_journal_load(w.dir, &k), -EBADMSG);
        world_write(&w, OTA_JOURNAL_FILE, "{\"format\":1,\"job\":\"x\",\"state\":\"sideways\",\"manifest\":\"m\"}");
        assert_int_equal(ota_journal_load(w.dir, &k), -EBADMSG);
        ota_journal_done(&j);
        world_done(&w);
}

static void test_table(void **state) {
        /* resume rules (docs/ota.md) */
        assert_int_equal(ota_resume(OTA_STATE_DOWNLOADING), OTA_STEP_DOWNLOAD);
        assert_int_equal(ota_resume(OTA_STATE_DOWNLOADED), OTA_STEP_INSTALL);
        assert_int_equal(ota_resume(OTA_STATE_INSTALLING), OTA_STEP_ROLLBACK);
        assert_int_equal(ota_resume(OTA_STATE_TRIAL), OTA_STEP_TRIAL);
        assert_int_equal(ota_resume(OTA_STATE_ROLLING_BACK), OTA_STEP_ROLLBACK);
        assert_int_equal(ota_resume(OTA_STATE_COMMITTED), OTA_STEP_DELIVER);
        assert_int_equal(ota_next(OTA_STATE_TRIAL, OTA_LIMIT), OTA_STATE_ROLLING_BACK);
        assert_int_equal(ota_next(OTA_STATE_ROLLING_BACK, OTA_LIMIT), OTA_STATE_FAILED);
        assert_int_equal(ota_next(OTA_STATE_DOWNLOADED, OTA_LOCKED), OTA_STATE_DEFERRED);
        for (int s = OTA_STATE_NONE; s < _OTA_STATE_MAX; s++)
                assert_int_equal(ota_state_from_string(ota_state_to_string(s)), s);
        assert_int_equal(ota_state_from_string("bogus"), _OTA_STATE_MAX);
}

static void test_nonces(void **state) {
        World w;
        char nonce[MANIFEST_NONCE_LEN + 1], job[OTA_JOB_ID_MAX + 1], *before = NULL, *text = NULL;
        unsigned dropped = 99;
        FILE *f;

        world_init(&w, &scenarios[0]);
        assert_int_equal(ota_nonce_claim(w.dir, "00000000000000000000000000000001", "000000000000000a", 5000, 1000,
                                         &dropped, &before),
                         0);
        assert_int_equal(dropped, 0);
        /* the same nonce again: a replay, under any job id */
        assert_int_equal(ota_nonce_claim(w.dir, "00000000000000000000000000000001", "000000000000000b", 5000, 1000,
                                         NULL, &before),
                         -EEXIST);
        assert_string_equal(before, "000000000000000a");
        free(before);
        before = NULL;
        assert_int_equal(ota_nonce_claim(w.dir, "00000000000000000000000000000001", "000000000000000a", 5000, 1000,
                                         NULL, NULL),
                         -EEXIST);
        /* kept through the grace period after the manifest expired, then forgotten */
        assert_int_equal(ota_nonce_claim(w.dir, "00000000000000000000000000000002", "000000000000000c", 9000,
                                         5000 + OTA_NONCE_GRACE_SEC - 1, NULL, NULL),
                         0);
        assert_int_equal(ota_nonce_claim(w.dir, "00000000000000000000000000000001", "000000000000000d", 9000,
                                         5000 + OTA_NONCE_GRACE_SEC - 1, NULL, NULL),
                         -EEXIST);
        assert_int_equal(ota_nonce_claim(w.dir, "00000000000000000000000000000003", "000000000000000e", 9000,
                                         5000 + OTA_NONCE_GRACE_SEC, NULL, NULL),
                         0);
        assert_int_equal(ota_nonce_claim(w.dir, "00000000000000000000000000000001", "000000000000000f", 9000,
                                         5000 + OTA_NONCE_GRACE_SEC, NULL, NULL),
                         0);
        /* bounded: past OTA_NONCES_MAX the soonest to expire goes */
        for (unsigned i = 0; i < OTA_NONCES_MAX + 2; i++) {
                snprintf(nonce, sizeof(nonce), "%032x", 0x1000 + i);
                snprintf(job, sizeof(job), "%016x", i);
                assert_int_equal(ota_nonce_claim(w.dir, nonce, job, 100000 + i, 1000, &dropped, NULL), 0);
        }
        assert_int_equal(dropped, 1);
        snprintf(nonce, sizeof(nonce), "%032x", 0x1000 + OTA_NONCES_MAX + 1);
        assert_int_equal(ota_nonce_claim(w.dir, nonce, "0000000000000001", 100000, 1000, NULL, NULL), -EEXIST);
        /* an unreadable record refuses (it cannot tell a replay) */
        assert_int_equal(asprintf(&text, "%s/%s", w.dir, OTA_NONCES_FILE) > 0, true);
        f = fopen(text, "we");
        assert_non_null(f);
        fputs("{\"nonces\":[{\"nonce\":1}]}", f);
        fclose(f);
        free(text);
        assert_int_equal(ota_nonce_claim(w.dir, "00000000000000000000000000000009", "0000000000000009", 9000, 1000,
                                         NULL, NULL),
                         -EBADMSG);
        world_done(&w);
}

int main(int argc, char **argv) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_table),
                cmocka_unit_test(test_nonces),
                cmocka_unit_test(test_journal_roundtrip),
                cmocka_unit_test(test_scenarios_uninterrupted),
        };
        const struct CMUnitTest crash_tests[] = {
                cmocka_unit_test(test_crash_at_every_point),
                cmocka_unit_test(test_repeated_crash),
        };
        int r;

        /* One test, or those a glob matches: test-foo NAME (HACKING.md). */
        if (argc > 1)
                cmocka_set_test_filter(argv[1]);
        r = cmocka_run_group_tests_name("journal", tests, NULL, NULL);
        if (r != 0)
                return 1;
        if (!ENABLE_FAULT_INJECTION) {
                /* The rest kills the process at its crash points. */
                printf("SKIP: the crash tests need a build with ./configure --enable-fault-injection\n");
                return 77;
        }
        return cmocka_run_group_tests_name("crash points", crash_tests, NULL, NULL) == 0 ? 0 : 1;
}
