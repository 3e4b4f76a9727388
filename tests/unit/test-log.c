/* SPDX-License-Identifier: Apache-2.0 */
/* Unit tests for lib/log.c's structured messages: the journal fields
 * log_fields_format() builds (order, omitted fields, values from peers
 * cleaned and cut), and log_struct()'s choice of way out: the journal
 * sender only when JOURNAL_STREAM names our stderr, the stderr line
 * otherwise or when the sender fails. stderr is a temporary file here, so
 * JOURNAL_STREAM can name it without a journald. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <sys/stat.h>

#include "log.h"

static void test_format_all(void **state) {
        char *f[LOG_FIELDS_MAX];
        int n = log_fields_format(LOG_INFO, "tether-cloudd",
                                  &(LogFields){ .message_id = LOG_MESSAGE_DEVICE_CONNECTED, .device_id = "dev-1",
                                                .job_id = "0123456789abcdef", .peer = "[::1]:4242" },
                                  "Device 'dev-1' connected\nfrom [::1]:4242.", f);

        assert_int_equal(n, 7);
        assert_string_equal(f[0], "MESSAGE=Device 'dev-1' connected\nfrom [::1]:4242.");
        assert_string_equal(f[1], "PRIORITY=6");
        assert_string_equal(f[2], "SYSLOG_IDENTIFIER=tether-cloudd");
        assert_string_equal(f[3], "MESSAGE_ID=" LOG_MESSAGE_DEVICE_CONNECTED);
        assert_string_equal(f[4], "TETHER_DEVICE_ID=dev-1");
        assert_string_equal(f[5], "TETHER_JOB_ID=0123456789abcdef");
        assert_string_equal(f[6], "TETHER_PEER=[::1]:4242");
        log_fields_free(f, n);
}

static void test_format_omits_and_cleans(void **state) {
        char peer[LOG_FIELD_VALUE_MAX + 50], *f[LOG_FIELDS_MAX];
        int n;

        n = log_fields_format(LOG_WARNING, "tetherd", NULL, "plain", f);
        assert_int_equal(n, 3);
        assert_string_equal(f[1], "PRIORITY=4");
        log_fields_free(f, n);

        memset(peer, 'p', sizeof(peer) - 1);
        peer[sizeof(peer) - 1] = 0;
        n = log_fields_format(LOG_ERR, "tetherd",
                              &(LogFields){ .device_id = "ev\nil\x1b[31m\xc3\xa9", .peer = peer }, "m", f);
        assert_int_equal(n, 5);
        /* A newline would start a field of the peer's choosing in a text
         * export; escapes and non-ASCII bytes go too. */
        assert_string_equal(f[3], "TETHER_DEVICE_ID=ev?il?[31m??");
        assert_int_equal(strlen(f[4]), strlen("TETHER_PEER=") + LOG_FIELD_VALUE_MAX);
        log_fields_free(f, n);
}

/* What the fake journal got. */
static char sent[LOG_FIELDS_MAX][512];
static int n_sent, send_result;

static int fake_send(const struct iovec *iov, int n) {
        n_sent = n;
        for (int i = 0; i < n && i < LOG_FIELDS_MAX; i++)
                snprintf(sent[i], sizeof(sent[i]), "%.*s", (int)iov[i].iov_len, (const char *)iov[i].iov_base);
        return send_result;
}

/* stderr into a fresh temporary file; returns its fd for reading back. */
static int capture_stderr(void) {
        FILE *f = tmpfile();

        assert_non_null(f);
        fflush(stderr);
        assert_true(dup2(fileno(f), STDERR_FILENO) >= 0);
        return fileno(f);
}

static void read_back(int fd, char *buf, size_t size) {
        ssize_t n;

        fflush(stderr);
        n = pread(fd, buf, size - 1, 0);
        assert_true(n >= 0);
        buf[n] = 0;
}

static void test_struct_ways_out(void **state) {
        int saved = dup(STDERR_FILENO), fd;
        char env[64], buf[512];
        struct stat st;

        assert_true(saved >= 0);
        log_set_journal_sender(fake_send);

        /* Not the journal: a plain line, the sender never called. */
        fd = capture_stderr();
        unsetenv("JOURNAL_STREAM");
        log_open("tetherd");
        n_sent = 0;
        log_struct(LOG_INFO, &(LogFields){ .message_id = LOG_MESSAGE_CLOUD_DISCONNECTED, .device_id = "d" }, "gone %d", 1);
        read_back(fd, buf, sizeof(buf));
        assert_int_equal(n_sent, 0);
        assert_string_equal(buf, "tetherd: gone 1\n");

        /* JOURNAL_STREAM names another stream: still not the journal. */
        assert_int_equal(fstat(STDERR_FILENO, &st), 0);
        snprintf(env, sizeof(env), "%llu:%llu", (unsigned long long)st.st_dev, (unsigned long long)st.st_ino + 1);
        setenv("JOURNAL_STREAM", env, 1);
        log_open("tetherd");
        log_struct(LOG_INFO, &(LogFields){ .message_id = LOG_MESSAGE_CLOUD_DISCONNECTED }, "gone %d", 2);
        assert_int_equal(n_sent, 0);
        read_back(fd, buf, sizeof(buf));
        assert_string_equal(buf, "tetherd: gone 1\ntetherd: gone 2\n");

        /* It names our stderr: the fields go to the sender, nothing to stderr;
         * %m is the error passed in. */
        snprintf(env, sizeof(env), "%llu:%llu", (unsigned long long)st.st_dev, (unsigned long long)st.st_ino);
        setenv("JOURNAL_STREAM", env, 1);
        log_open("tetherd");
        send_result = 0;
        assert_int_equal(log_struct_internal(LOG_WARNING, -EPIPE,
                                             &(LogFields){ .message_id = LOG_MESSAGE_CLOUD_DISCONNECTED,
                                                           .device_id = "d", .peer = "10.0.0.1:5684" },
                                             "gone: %m"),
                         -EPIPE);
        assert_int_equal(n_sent, 6);
        assert_string_equal(sent[0], "MESSAGE=gone: Broken pipe");
        assert_string_equal(sent[1], "PRIORITY=4");
        assert_string_equal(sent[2], "SYSLOG_IDENTIFIER=tetherd");
        assert_string_equal(sent[3], "MESSAGE_ID=" LOG_MESSAGE_CLOUD_DISCONNECTED);
        assert_string_equal(sent[5], "TETHER_PEER=10.0.0.1:5684");
        read_back(fd, buf, sizeof(buf));
        assert_string_equal(buf, "tetherd: gone 1\ntetherd: gone 2\n");

        /* The sender fails (no journald socket): the line still reaches
         * the journal through stderr, with its priority. */
        send_result = -ENOENT;
        log_struct(LOG_NOTICE, &(LogFields){ .message_id = LOG_MESSAGE_DEVICE_CONNECTED }, "back");
        read_back(fd, buf, sizeof(buf));
        assert_string_equal(buf, "tetherd: gone 1\ntetherd: gone 2\n<5>back\n");

        /* Below the level: nothing anywhere. */
        n_sent = 0;
        log_struct(LOG_DEBUG, &(LogFields){ .message_id = LOG_MESSAGE_DEVICE_CONNECTED }, "quiet");
        assert_int_equal(n_sent, 0);

        fflush(stderr);
        dup2(saved, STDERR_FILENO);
        close(saved);
        unsetenv("JOURNAL_STREAM");
}

/* Every MESSAGE_ID has its catalog entry, in the package of the daemon
 * that logs it. */
static void test_catalogs_cover_ids(void **state) {
        static const struct {
                const char *id, *catalog;
        } ids[] = {
                { LOG_MESSAGE_DEVICE_CONNECTED, "tether-cloud" },
                { LOG_MESSAGE_DEVICE_DISCONNECTED, "tether-cloud" },
                { LOG_MESSAGE_DEVICE_REFUSED, "tether-cloud" },
                { LOG_MESSAGE_CLOUD_CONNECTED, "tether-agent" },
                { LOG_MESSAGE_CLOUD_DISCONNECTED, "tether-agent" },
                { LOG_MESSAGE_OTA_COMMITTED, "tether-agent" },
                { LOG_MESSAGE_OTA_ROLLED_BACK, "tether-agent" },
        };
        const char *src = getenv("top_srcdir");

        if (!src)
                skip();
        for (size_t i = 0; i < sizeof(ids) / sizeof(ids[0]); i++) {
                char path[4096], line[256], want[64];
                bool found = false;
                FILE *f;

                assert_int_equal(strlen(ids[i].id), 32);
                snprintf(path, sizeof(path), "%s/etc/%s.catalog", src, ids[i].catalog);
                snprintf(want, sizeof(want), "-- %s\n", ids[i].id);
                f = fopen(path, "re");
                assert_non_null(f);
                while (!found && fgets(line, sizeof(line), f))
                        found = streq(line, want);
                fclose(f);
                if (!found)
                        fail_msg("%s has no entry for %s", path, ids[i].id);
        }
}

int main(int argc, char **argv) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_format_all),
                cmocka_unit_test(test_format_omits_and_cleans),
                cmocka_unit_test(test_struct_ways_out),
                cmocka_unit_test(test_catalogs_cover_ids),
        };
        /* One test, or those a glob matches: test-foo NAME (HACKING.md). */
        if (argc > 1)
                cmocka_set_test_filter(argv[1]);
        return cmocka_run_group_tests(tests, NULL, NULL);
}
