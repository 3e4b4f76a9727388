/* SPDX-License-Identifier: Apache-2.0 */
/* Unit tests for tetherd's configuration parser (agent/agent-config.c). */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <cmocka.h>
#include <sys/stat.h>

#include "agent/agent-config.h"
#include "util.h"

static char dir[] = "/tmp/tether-config-test-XXXXXX";

static void write_file(const char *name, const char *text) {
        char path[256];
        FILE *f;

        snprintf(path, sizeof(path), "%s/%s", dir, name);
        f = fopen(path, "we");
        assert_non_null(f);
        fputs(text, f);
        fclose(f);
}

static const char base[] = "[Cloud]\nHost=cloud.example\nCAFile=/ca.crt\n"
                           "[Device]\nCertificate=/d.crt\nKey=/d.key\n";

static int load(const char *text, Config **ret, char **ret_error) {
        char path[256];

        write_file("tetherd.conf", text);
        snprintf(path, sizeof(path), "%s/tetherd.conf", dir);
        return config_load(path, ret, ret_error);
}

static void test_defaults(void **state) {
        _cleanup_(config_freep) Config *c = NULL;

        assert_int_equal(load(base, &c, NULL), 0);
        assert_string_equal(c->cloud_host, "cloud.example");
        assert_int_equal(c->cloud_port, 5684);
        assert_int_equal(c->keepalive_ms, 30000);
        assert_int_equal(c->reconnect_min_ms, 1000);
        assert_int_equal(c->reconnect_max_ms, 60000);
        assert_int_equal(c->max_payload, 16384);
        assert_int_equal(c->max_subscriptions, 32);
        assert_true(config_plugin_enabled(c, "anything"));
}

static void test_values_and_plugins(void **state) {
        _cleanup_(config_freep) Config *c = NULL;
        char text[1024];

        snprintf(text, sizeof(text),
                 "%s[Cloud]\nPort=6000\n[Connection]\nKeepaliveSec=2.5\nReconnectMinSec=0.2\n"
                 "[Limits]\nMaxPayload=4096\n[Plugins]\nEnable=example, gpio\nDisable=gpio\n"
                 "[Plugin example]\nLabel=hello world\nIntervalSec=1\n",
                 base);
        assert_int_equal(load(text, &c, NULL), 0);
        assert_int_equal(c->cloud_port, 6000);
        assert_int_equal(c->keepalive_ms, 2500);
        assert_int_equal(c->reconnect_min_ms, 200);
        assert_int_equal(c->max_payload, 4096);
        assert_true(config_plugin_enabled(c, "example"));
        assert_false(config_plugin_enabled(c, "gpio"));
        assert_false(config_plugin_enabled(c, "sensors"));
        assert_string_equal(config_plugin_get(c, "example", "Label"), "hello world");
        assert_null(config_plugin_get(c, "example", "Missing"));
        assert_null(config_plugin_get(c, "other", "Label"));
}

static void test_state_and_outbox(void **state) {
        _cleanup_(config_freep) Config *c = NULL, *d = NULL;
        char text[1024];

        assert_int_equal(load(base, &c, NULL), 0);
        assert_string_equal(c->state_dir, CONFIG_DEFAULT_STATE_DIR);
        assert_int_equal(c->outbox_max_events, 10000);
        assert_int_equal(c->outbox_max_bytes, 8 * 1024 * 1024);
        assert_int_equal(c->outbox_overflow, CONFIG_OVERFLOW_REJECT);
        assert_int_equal(c->outbox_sync_ms, 100);

        snprintf(text, sizeof(text),
                 "%s[State]\nDirectory=/srv/tether\n[Outbox]\nMaxEvents=5\nMaxBytes=65536\n"
                 "Overflow=drop-oldest\nSyncIntervalSec=0\n",
                 base);
        assert_int_equal(load(text, &d, NULL), 0);
        assert_string_equal(d->state_dir, "/srv/tether");
        assert_int_equal(d->outbox_max_events, 5);
        assert_int_equal(d->outbox_max_bytes, 65536);
        assert_int_equal(d->outbox_overflow, CONFIG_OVERFLOW_DROP_OLDEST);
        assert_int_equal(d->outbox_sync_ms, 0);
        config_free(TAKE_PTR(d));

        /* The old name still works. */
        snprintf(text, sizeof(text), "%s[Limits]\nMaxQueuedEvents=77\n", base);
        assert_int_equal(load(text, &d, NULL), 0);
        assert_int_equal(d->outbox_max_events, 77);
}

static void expect_error(const char *text, const char *needle) {
        _cleanup_(config_freep) Config *c = NULL;
        _cleanup_free_ char *error = NULL;

        assert_int_equal(load(text, &c, &error), -EINVAL);
        assert_null(c);
        assert_non_null(error);
        if (!strstr(error, needle))
                fail_msg("error '%s' does not contain '%s'", error, needle);
}

static void test_errors_name_file_and_line(void **state) {
        char text[512];

        snprintf(text, sizeof(text), "%s[Cloud]\nPort=70000\n", base);
        expect_error(text, "tetherd.conf:8: invalid port '70000'");
        snprintf(text, sizeof(text), "%s[Connection]\n\nKeepaliveSec=soon\n", base);
        expect_error(text, "tetherd.conf:9: invalid duration 'soon'");
        snprintf(text, sizeof(text), "%s[Limits]\nMaxPayload=99999999\n", base);
        expect_error(text, ":8: invalid value '99999999' for MaxPayload=");
        snprintf(text, sizeof(text), "%s[Connection]\nReconnectMinSec=10\nReconnectMaxSec=5\n", base);
        expect_error(text, "ReconnectMinSec= is larger");
        expect_error("[Cloud]\nHost=x\n", "[Cloud] CAFile= is required");
        expect_error("[Cloud\nHost=x\n", "tetherd.conf:1: syntax error");
        snprintf(text, sizeof(text), "%s[Plugin bad name]\nX=1\n", base);
        expect_error(text, "invalid plugin name");
        snprintf(text, sizeof(text), "%s[Outbox]\nOverflow=sometimes\n", base);
        expect_error(text, ":8: invalid value 'sometimes' for Overflow= (reject or drop-oldest)");
        snprintf(text, sizeof(text), "%s[Outbox]\nMaxBytes=10\n", base);
        expect_error(text, ":8: invalid value '10' for MaxBytes=");
        snprintf(text, sizeof(text), "%s[Outbox]\nMaxEvents=0\n", base);
        expect_error(text, ":8: invalid value '0' for MaxEvents=");
}

/* Debian's libinih reads a line into 200 bytes (INI_MAX_LINE): 199 and the
 * line end fit. A longer line is refused, not cut with its rest read as a
 * line of its own. */
#define LONGEST_LINE 199

/* "KEY=" and as many 'v' as make a line of len bytes. */
static char *long_line(const char *key, size_t len) {
        char *s = malloc(len + 1);

        assert_non_null(s);
        assert_true(len > strlen(key) + 1);
        memset(s, 'v', len);
        memcpy(s, key, strlen(key));
        s[strlen(key)] = '=';
        s[len] = '\0';
        return s;
}

static void test_long_lines(void **state) {
        _cleanup_(config_freep) Config *c = NULL;
        _cleanup_free_ char *longest = long_line("Label", LONGEST_LINE);
        _cleanup_free_ char *over = long_line("Label", LONGEST_LINE + 1);
        _cleanup_free_ char *host = long_line("Host", LONGEST_LINE + 40);
        char text[2048];

        /* The longest line, ending in "\n", "\r\n" or the end of the file,
         * is read whole, and the lines after it keep their numbers. */
        snprintf(text, sizeof(text), "%s[Plugin a]\n%s\n[Plugin b]\n%s\r\n[Plugin c]\n%s", base, longest, longest,
                 longest);
        assert_int_equal(load(text, &c, NULL), 0);
        assert_string_equal(config_plugin_get(c, "a", "Label"), longest + strlen("Label="));
        assert_string_equal(config_plugin_get(c, "b", "Label"), longest + strlen("Label="));
        assert_string_equal(config_plugin_get(c, "c", "Label"), longest + strlen("Label="));
        snprintf(text, sizeof(text), "%s[Plugin a]\n%s\n[Plugin b]\n%s\r\n[Cloud]\nPort=x\n", base, longest,
                 longest);
        expect_error(text, "tetherd.conf:12: invalid port 'x'");

        /* One byte more is an error on its line, whatever the line end. */
        snprintf(text, sizeof(text), "%s[Plugin a]\n%s\n", base, over);
        expect_error(text, "tetherd.conf:8: line longer than 199 bytes");
        snprintf(text, sizeof(text), "%s[Plugin a]\n%s\r\n", base, over);
        expect_error(text, "tetherd.conf:8: line longer than 199 bytes");
        snprintf(text, sizeof(text), "%s[Plugin a]\n%s", base, over);
        expect_error(text, "tetherd.conf:8: line longer than 199 bytes");
        /* The rest of the line is not read as a key of its own ("Port=1"
         * would have been valid), nor as a syntax error. */
        memcpy(host + LONGEST_LINE, "Port=1", strlen("Port=1"));
        snprintf(text, sizeof(text), "%s[Cloud]\n%s\n", base, host);
        expect_error(text, "tetherd.conf:8: line longer than 199 bytes");
        snprintf(text, sizeof(text), "%s[Cloud]\n# %s\n[Cloud]\nPort=1\n", base, host);
        expect_error(text, "tetherd.conf:8: line longer than 199 bytes");
}

static void test_unknown_keys_only_warn(void **state) {
        _cleanup_(config_freep) Config *c = NULL;
        char text[512];

        snprintf(text, sizeof(text), "%s[Cloud]\nColour=blue\n[Whatever]\nX=1\n", base);
        assert_int_equal(load(text, &c, NULL), 0);
}

static void test_dropins_in_order(void **state) {
        _cleanup_(config_freep) Config *c = NULL;
        char d[300];

        snprintf(d, sizeof(d), "%s/tetherd.conf.d", dir);
        assert_int_equal(mkdir(d, 0755), 0);
        write_file("tetherd.conf.d/20-late.conf", "[Cloud]\nPort=7002\n");
        write_file("tetherd.conf.d/10-early.conf", "[Cloud]\nPort=7001\nHost=other\n");
        write_file("tetherd.conf.d/ignored.txt", "[Cloud]\nPort=1\n");
        assert_int_equal(load(base, &c, NULL), 0);
        assert_int_equal(c->cloud_port, 7002);
        assert_string_equal(c->cloud_host, "other");
        write_file("tetherd.conf.d/30-bad.conf", "[Cloud]\nPort=x\n");
        config_free(TAKE_PTR(c));
        expect_error(base, "30-bad.conf:2:");
        for (const char *f = "20-late.conf\0" "10-early.conf\0" "ignored.txt\0" "30-bad.conf\0"; *f;
             f += strlen(f) + 1) {
                char path[400];
                snprintf(path, sizeof(path), "%s/%s", d, f);
                assert_int_equal(unlink(path), 0);
        }
        assert_int_equal(rmdir(d), 0);
}

static void test_cloud_changed(void **state) {
        _cleanup_(config_freep) Config *a = NULL, *b = NULL;
        char text[512];

        assert_int_equal(load(base, &a, NULL), 0);
        snprintf(text, sizeof(text), "%s[Plugin example]\nLabel=x\n", base);
        assert_int_equal(load(text, &b, NULL), 0);
        assert_false(config_cloud_changed(a, b));
        free(b->cloud_host);
        b->cloud_host = strdup("elsewhere");
        assert_true(config_cloud_changed(a, b));
}

/* [Cloud] Host= with value, after base (whose Host= it replaces), and
 * Port= when port is not NULL. */
static int load_hosts(const char *value, const char *port, Config **ret, char **ret_error) {
        char text[1024];

        snprintf(text, sizeof(text), "%s[Cloud]\n%s%s%sHost=%s\n", base, port ? "Port=" : "", port ?: "",
                 port ? "\n" : "", value);
        return load(text, ret, ret_error);
}

static void expect_host(const Config *c, size_t i, const char *name, unsigned port) {
        assert_true(i < c->n_cloud_hosts);
        assert_string_equal(c->cloud_hosts[i].name, name);
        assert_int_equal(c->cloud_hosts[i].port, port);
}

static void test_hosts(void **state) {
        static const char *const nine = "a b c d e f g h i";
        char text[1024], buf[CONFIG_HOSTS_MAX * (CONFIG_HOST_TEXT_MAX + 2)];
        Config *c = NULL;

        /* One name, as before: Host= as written, one entry on Port=. */
        assert_int_equal(load(base, &c, NULL), 0);
        assert_int_equal(c->n_cloud_hosts, 1);
        expect_host(c, 0, "cloud.example", 5684);
        assert_string_equal(config_hosts_text(c, buf, sizeof(buf)), "cloud.example:5684");
        c = config_free(c);

        /* A bare IPv6 address is still one entry when it is alone. */
        assert_int_equal(load_hosts("::1", "6000", &c, NULL), 0);
        assert_int_equal(c->n_cloud_hosts, 1);
        expect_host(c, 0, "::1", 6000);
        assert_string_equal(c->cloud_host, "::1");
        assert_string_equal(config_hosts_text(c, buf, sizeof(buf)), "[::1]:6000");
        c = config_free(c);
        assert_int_equal(load_hosts("fe80::1%eth0", NULL, &c, NULL), 0);
        expect_host(c, 0, "fe80::1%eth0", 5684);
        c = config_free(c);

        /* Every form, separated by blanks and commas; entries without a
         * port take Port=, even when it comes after Host=. */
        snprintf(text, sizeof(text),
                 "%s[Cloud]\nHost=a.example, b.example:6001  127.0.0.1:6002,[::1] ,[2001:db8::7]:6003\t"
                 "192.0.2.1\nPort=7000\n",
                 base);
        assert_int_equal(load(text, &c, NULL), 0);
        assert_int_equal(c->n_cloud_hosts, 6);
        expect_host(c, 0, "a.example", 7000);
        expect_host(c, 1, "b.example", 6001);
        expect_host(c, 2, "127.0.0.1", 6002);
        expect_host(c, 3, "::1", 7000);
        expect_host(c, 4, "2001:db8::7", 6003);
        expect_host(c, 5, "192.0.2.1", 7000);
        assert_string_equal(config_hosts_text(c, buf, sizeof(buf)), "a.example:7000, b.example:6001, "
                                                                    "127.0.0.1:6002, [::1]:7000, "
                                                                    "[2001:db8::7]:6003, "
                                                                    "192.0.2.1:7000");
        /* A cut list stays a string. */
        assert_string_equal(config_hosts_text(c, buf, 12), "a.example:7");
        c = config_free(c);

        /* The most entries; a later Host= (a drop-in) replaces them all. */
        assert_int_equal(load_hosts("localhost:1 localhost:2 c d e f g h", NULL, &c, NULL), 0);
        assert_int_equal(c->n_cloud_hosts, CONFIG_HOSTS_MAX);
        expect_host(c, 0, "localhost", 1);
        expect_host(c, 1, "localhost", 2);
        expect_host(c, 7, "h", 5684);
        c = config_free(c);
        snprintf(text, sizeof(text), "%s[Cloud]\nHost=x:1 y:2\nHost=z\n", base);
        assert_int_equal(load(text, &c, NULL), 0);
        assert_int_equal(c->n_cloud_hosts, 1);
        expect_host(c, 0, "z", 5684);
        assert_string_equal(c->cloud_host, "z");
        c = config_free(c);

        /* Bad entries, each with the file and line of Host=. */
        expect_error("[Cloud]\nCAFile=/ca\nHost=\n", "tetherd.conf:3: Host= must not be empty");
        snprintf(text, sizeof(text), "%s[Cloud]\nHost= , ,\n", base);
        expect_error(text, "tetherd.conf:8: Host= must not be empty");
        snprintf(text, sizeof(text), "%s[Cloud]\nHost=%s\n", base, nine);
        expect_error(text, "tetherd.conf:8: too many entries in Host= (9, at most 8)");
        snprintf(text, sizeof(text), "%s[Cloud]\nHost=a:0\n", base);
        expect_error(text, "tetherd.conf:8: invalid port '0' in Host= entry 'a:0' (1..65535)");
        snprintf(text, sizeof(text), "%s[Cloud]\nHost=a b:65536\n", base);
        expect_error(text, "tetherd.conf:8: invalid port '65536' in Host= entry 'b:65536'");
        snprintf(text, sizeof(text), "%s[Cloud]\nHost=a:\n", base);
        expect_error(text, "invalid port '' in Host= entry 'a:'");
        snprintf(text, sizeof(text), "%s[Cloud]\nHost=a:+80\n", base);
        expect_error(text, "invalid port '+80' in Host= entry 'a:+80'");
        snprintf(text, sizeof(text), "%s[Cloud]\nHost=[::1]:x\n", base);
        expect_error(text, "invalid port 'x' in Host= entry '[::1]:x'");
        snprintf(text, sizeof(text), "%s[Cloud]\nHost=::1 ::2\n", base);
        expect_error(text, "tetherd.conf:8: invalid entry '::1' in Host=: an IPv6 address goes in brackets when "
                           "Host= "
                           "lists several entries");
        snprintf(text, sizeof(text), "%s[Cloud]\nHost=a [::1\n", base);
        expect_error(text, "invalid entry '[::1' in Host=: '[' without ']'");
        snprintf(text, sizeof(text), "%s[Cloud]\nHost=[::1]x\n", base);
        expect_error(text, "invalid entry '[::1]x' in Host=: only ':PORT' may follow ']'");
        snprintf(text, sizeof(text), "%s[Cloud]\nHost=[127.0.0.1]:80\n", base);
        expect_error(text, "invalid entry '[127.0.0.1]:80' in Host=: not an IPv6 address in brackets");
        snprintf(text, sizeof(text), "%s[Cloud]\nHost=[]\n", base);
        expect_error(text, "invalid entry '[]' in Host=: not an IPv6 address in brackets");
        snprintf(text, sizeof(text), "%s[Cloud]\nHost=[fe80::1%%]\n", base);
        expect_error(text, "not an IPv6 address in brackets");
        snprintf(text, sizeof(text), "%s[Cloud]\nHost=not:an:address\n", base);
        expect_error(text, "invalid entry 'not:an:address' in Host=: neither a host name nor an IPv6 address");
        snprintf(text, sizeof(text), "%s[Cloud]\nHost=:80\n", base);
        expect_error(text, "invalid entry ':80' in Host=: no host name");
        snprintf(text, sizeof(text), "%s[Cloud]\nHost=a/b\n", base);
        expect_error(text, "invalid entry 'a/b' in Host=: a host name has only letters, digits, '-', '.' and '_'");
        snprintf(text, sizeof(text), "%s[Cloud]\nHost=user@a:80\n", base);
        expect_error(text, "a host name has only letters");
        /* A line is at most 199 bytes long, so a name (253 bytes in DNS)
         * is shorter; the longest that fits is taken. */
        snprintf(text, sizeof(text), "%s[Cloud]\nHost=a%0188d:1\n", base, 0);
        assert_int_equal(load(text, &c, NULL), 0);
        assert_int_equal(strlen(c->cloud_hosts[0].name), 189);
        c = config_free(c);
}

/* Port= in a drop-in applies to the entries of the main file's Host=
 * that have no port of their own. */
static void test_hosts_port_in_dropin(void **state) {
        _cleanup_(config_freep) Config *c = NULL;
        char d[300], path[400];

        snprintf(d, sizeof(d), "%s/tetherd.conf.d", dir);
        assert_int_equal(mkdir(d, 0755), 0);
        write_file("tetherd.conf.d/10-port.conf", "[Cloud]\nPort=7100\n");
        assert_int_equal(load_hosts("a b:1", NULL, &c, NULL), 0);
        assert_int_equal(c->n_cloud_hosts, 2);
        expect_host(c, 0, "a", 7100);
        expect_host(c, 1, "b", 1);
        snprintf(path, sizeof(path), "%s/10-port.conf", d);
        assert_int_equal(unlink(path), 0);
        assert_int_equal(rmdir(d), 0);
}

static int setup(void **state) {
        return mkdtemp(dir) ? 0 : -1;
}

static int teardown(void **state) {
        char cmd[300];
        snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
        return system(cmd) == 0 ? 0 : -1;
}

static void test_local_api(void **state) {
        _cleanup_(config_freep) Config *c = NULL, *d = NULL, *e = NULL;
        _cleanup_free_ char *error = NULL;
        char text[1024];

        assert_int_equal(load(base, &c, NULL), 0);
        assert_string_equal(c->local_socket, "/run/tether/tetherd.sock");
        assert_string_equal(c->local_group, "tether");

        snprintf(text, sizeof(text), "%s[Local]\nSocket=/tmp/x.sock\nGroup=\n", base);
        assert_int_equal(load(text, &d, NULL), 0);
        assert_string_equal(d->local_socket, "/tmp/x.sock");
        assert_string_equal(d->local_group, ""); /* empty: root and the agent's user only */

        snprintf(text, sizeof(text), "%s[Local]\nSocket=relative.sock\n", base);
        assert_int_equal(load(text, &e, &error), -EINVAL);
        assert_non_null(strstr(error, "[Local] Socket= must be an absolute path"));
}

static void test_tunnel_and_logs(void **state) {
        _cleanup_(config_freep) Config *c = NULL, *d = NULL;
        _cleanup_free_ char *error = NULL;
        StreamAddr t;
        char text[1024];

        assert_int_equal(load(base, &c, NULL), 0);
        assert_null(c->tunnel_allow);
        assert_int_equal(c->n_tunnel_allow, 0);
        assert_int_equal(c->tunnel_max_streams, 8);
        assert_int_equal(c->tunnel_idle_ms, 900000);
        assert_int_equal(c->tunnel_window, 262144);
        assert_true(c->logs_enabled);
        assert_null(c->logs_units);
        assert_null(c->logs_directory);

        snprintf(text, sizeof(text),
                 "%s[Tunnel]\nAllow=127.0.0.1:22, [::1]:*\nMaxStreams=2\nIdleSec=30\nWindow=32768\n"
                 "[Logs]\nUnits=foo.service *\nEnabled=no\nDirectory=/tmp/j\n",
                 base);
        assert_int_equal(load(text, &d, NULL), 0);
        assert_int_equal(d->n_tunnel_allow, 2);
        assert_string_equal(d->tunnel_allow_text, "127.0.0.1:22, [::1]:*");
        assert_int_equal(stream_addr_parse("[::1]:8080", false, &t), 0);
        assert_true(stream_addr_allowed(d->tunnel_allow, d->n_tunnel_allow, &t));
        assert_int_equal(d->tunnel_max_streams, 2);
        assert_int_equal(d->tunnel_idle_ms, 30000);
        assert_int_equal(d->tunnel_window, 32768);
        assert_string_equal(d->logs_units[0], "foo.service");
        assert_string_equal(d->logs_units[1], "*");
        assert_null(d->logs_units[2]);
        assert_false(d->logs_enabled);
        assert_string_equal(d->logs_directory, "/tmp/j");
        config_free(TAKE_PTR(d));

        snprintf(text, sizeof(text), "%s[Tunnel]\nAllow=localhost:22\n", base);
        assert_int_equal(load(text, &d, &error), -EINVAL);
        assert_non_null(strstr(error, "tetherd.conf:8: invalid entry 'localhost:22' in Allow="));
        free(TAKE_PTR(error));
        snprintf(text, sizeof(text), "%s[Tunnel]\nWindow=1000\n", base);
        assert_int_equal(load(text, &d, &error), -EINVAL);
        free(TAKE_PTR(error));
        snprintf(text, sizeof(text), "%s[Logs]\nUnits=../etc\n", base);
        assert_int_equal(load(text, &d, &error), -EINVAL);
        assert_non_null(strstr(error, "invalid unit name '../etc'"));
}

int main(int argc, char **argv) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_defaults),
                cmocka_unit_test(test_values_and_plugins),
                cmocka_unit_test(test_state_and_outbox),
                cmocka_unit_test(test_errors_name_file_and_line),
                cmocka_unit_test(test_long_lines),
                cmocka_unit_test(test_unknown_keys_only_warn),
                cmocka_unit_test(test_dropins_in_order),
                cmocka_unit_test(test_cloud_changed),
                cmocka_unit_test(test_hosts),
                cmocka_unit_test(test_hosts_port_in_dropin),
                cmocka_unit_test(test_local_api),
                cmocka_unit_test(test_tunnel_and_logs),
        };
        /* One test, or those a glob matches: test-foo NAME (HACKING.md). */
        if (argc > 1)
                cmocka_set_test_filter(argv[1]);
        return cmocka_run_group_tests(tests, setup, teardown);
}
