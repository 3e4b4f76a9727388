/* SPDX-License-Identifier: Apache-2.0 */
/* Unit tests for the pure parts of streams (agent/stream-proto.c): tunnel
 * targets and [Tunnel] Allow= (parsing, matching, what is refused), the
 * Uri-Query of a stream's POST, the JSON of an open, unit names and
 * [Logs] Units=, and the UTF-8 repair of log messages. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>
#include <netinet/in.h>

#include "agent/stream-proto.h"

static void test_addr_parse(void **state) {
        StreamAddr a, b;
        char text[STREAM_ADDR_TEXT_MAX];

        (void)state;
        assert_int_equal(stream_addr_parse("127.0.0.1:22", false, &a), 0);
        assert_int_equal(a.family, AF_INET);
        assert_int_equal(a.port, 22);
        assert_string_equal(stream_addr_text(&a, text), "127.0.0.1:22");
        assert_int_equal(stream_addr_parse("[::1]:65535", false, &a), 0);
        assert_int_equal(a.family, AF_INET6);
        assert_string_equal(stream_addr_text(&a, text), "[::1]:65535");
        assert_int_equal(stream_addr_parse("10.0.0.5:*", true, &a), 0);
        assert_int_equal(a.port, 0);
        assert_string_equal(stream_addr_text(&a, text), "10.0.0.5:*");

        /* Refused, and the result left alone. */
        b = a;
        static const char *const bad[] = {
                "10.0.0.5:*", /* without any_port */
                "localhost:22", "127.0.0.1", "127.0.0.1:", "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:022",
                "127.0.0.1:22x", "127.1:22", "::1:22", "[::1]", "[::1]22", "[fe80::1%eth0]:22", "[]:22", ":22",
                "127.0.0.1:-1", "127.0.0.1: 22", "[127.0.0.1]:22", "",
        };
        for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
                assert_int_equal(stream_addr_parse(bad[i], false, &a), -EINVAL);
                assert_memory_equal(&a, &b, sizeof(a));
        }
        assert_int_equal(stream_addr_parse(NULL, true, &a), -EINVAL);
}

static void test_allow(void **state) {
        StreamAddr *list = NULL, t;
        size_t n = 99;
        char bad[64] = "";

        (void)state;
        assert_int_equal(stream_allow_parse("", &list, &n, bad), 0);
        assert_null(list);
        assert_int_equal(n, 0);
        assert_int_equal(stream_allow_parse("127.0.0.1:22, [::1]:*\t10.0.0.5:80", &list, &n, bad), 0);
        assert_int_equal(n, 3);
        assert_int_equal(stream_addr_parse("127.0.0.1:22", false, &t), 0);
        assert_true(stream_addr_allowed(list, n, &t));
        assert_int_equal(stream_addr_parse("127.0.0.1:23", false, &t), 0);
        assert_false(stream_addr_allowed(list, n, &t));
        assert_int_equal(stream_addr_parse("[::1]:4242", false, &t), 0);
        assert_true(stream_addr_allowed(list, n, &t));
        assert_int_equal(stream_addr_parse("10.0.0.5:81", false, &t), 0);
        assert_false(stream_addr_allowed(list, n, &t));
        /* IPv4 ::ffff:127.0.0.1 is another family: not matched by 127.0.0.1. */
        assert_int_equal(stream_addr_parse("[::ffff:127.0.0.1]:22", false, &t), 0);
        assert_false(stream_addr_allowed(list, n, &t));
        assert_false(stream_addr_allowed(NULL, 0, &t));
        free(list);

        list = NULL;
        assert_int_equal(stream_allow_parse("127.0.0.1:22 host:22", &list, &n, bad), -EINVAL);
        assert_string_equal(bad, "host:22");
        assert_null(list);

        char many[STREAM_ALLOW_MAX * 16 + 32] = "";
        for (int i = 0; i <= STREAM_ALLOW_MAX; i++)
                sprintf(many + strlen(many), "10.0.0.%d:22 ", i);
        assert_int_equal(stream_allow_parse(many, &list, &n, bad), -E2BIG);
        assert_null(list);
}

static void test_query(void **state) {
        StreamQuery q = { .ack = 77 };

        (void)state;
        assert_int_equal(stream_query_parse(NULL, 0, &q), 0);
        assert_false(q.have_ack || q.fin || q.open);
#define Q(s) stream_query_parse(s, strlen(s), &q)
        assert_int_equal(Q("ack=123&fin"), 0);
        assert_true(q.have_ack && q.fin && !q.open);
        assert_int_equal(q.ack, 123);
        assert_int_equal(Q("open&ack=18446744073709551615&x=1&finx"), 0);
        assert_true(q.open && q.have_ack && !q.fin);
        assert_int_equal(q.ack, UINT64_MAX);
        q.ack = 5;
        static const char *const bad[] = {
                "ack=1&ack=2", "fin&fin", "open&open", "ack=", "ack", "ack=x", "ack=-1", "ack=18446744073709551616",
                "ack=1 ", "fin=1", "open=", "ack=000000000000000000000001",
        };
        for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
                assert_int_equal(Q(bad[i]), -EBADMSG);
                assert_int_equal(q.ack, 5);
        }
        /* A NUL inside is part of an option, never its end. */
        assert_int_equal(stream_query_parse("ack=1\0&fin", 10, &q), -EBADMSG);
#undef Q
}

static void test_units(void **state) {
        char *extra[] = { "foo.service", NULL }, *all[] = { "*", NULL };
        char longname[STREAM_UNIT_NAME_MAX + 2];

        (void)state;
        assert_true(stream_unit_name_valid("tetherd.service"));
        assert_true(stream_unit_name_valid("getty@tty1.service"));
        assert_true(stream_unit_name_valid("a\\x2db.mount"));
        assert_false(stream_unit_name_valid(""));
        assert_false(stream_unit_name_valid("tetherd"));
        assert_false(stream_unit_name_valid(".service"));
        assert_false(stream_unit_name_valid("x."));
        assert_false(stream_unit_name_valid("a b.service"));
        assert_false(stream_unit_name_valid("a/b.service"));
        memset(longname, 'a', sizeof(longname) - 1);
        longname[sizeof(longname) - 1] = 0;
        memcpy(longname + sizeof(longname) - 9, ".service", 8);
        assert_false(stream_unit_name_valid(longname));

        assert_true(stream_unit_allowed(NULL, "tetherd.service"));
        assert_true(stream_unit_allowed(NULL, "tether-ota-install.service"));
        assert_false(stream_unit_allowed(NULL, "foo.service"));
        assert_true(stream_unit_allowed(extra, "foo.service"));
        assert_false(stream_unit_allowed(extra, "sshd.service"));
        assert_true(stream_unit_allowed(all, "sshd.service"));
}

static void test_open(void **state) {
        StreamOpen o;
        char err[128];

        (void)state;
#define P(s) stream_open_parse((const uint8_t *)(s), strlen(s), &o, err, sizeof(err))
        assert_int_equal(P("{\"target\":\"127.0.0.1:22\",\"window\":262144}"), 0);
        assert_int_equal(o.kind, STREAM_TUNNEL);
        assert_int_equal(o.window, 262144);
        assert_int_equal(o.target.port, 22);
        stream_open_done(&o);

        assert_int_equal(P("{\"journal\":{\"units\":[\"tetherd.service\",\"foo.service\"],\"since\":1765100000000000,"
                           "\"lines\":10,\"follow\":true},\"window\":32768}"),
                         0);
        assert_int_equal(o.kind, STREAM_LOG);
        assert_int_equal(o.n_units, 2);
        assert_string_equal(o.units[1], "foo.service");
        assert_null(o.units[2]);
        assert_true(o.have_since && o.have_lines && o.follow);
        assert_int_equal(o.since, 1765100000000000);
        assert_int_equal(o.lines, 10);
        stream_open_done(&o);

        assert_int_equal(P("{\"journal\":{},\"window\":4194304}"), 0);
        assert_true(o.kind == STREAM_LOG && o.n_units == 0 && !o.have_lines && !o.have_since && !o.follow);
        stream_open_done(&o);

        static const char *const bad[] = {
                "", "[]", "{", "{\"window\":262144}",
                "{\"target\":\"127.0.0.1:22\"}",
                "{\"target\":\"127.0.0.1:22\",\"window\":32767}",
                "{\"target\":\"127.0.0.1:22\",\"window\":4194305}",
                "{\"target\":\"127.0.0.1:22\",\"window\":\"262144\"}",
                "{\"target\":\"localhost:22\",\"window\":262144}",
                "{\"target\":22,\"window\":262144}",
                "{\"target\":\"127.0.0.1:22\",\"journal\":{},\"window\":262144}",
                "{\"target\":\"127.0.0.1:22\",\"target\":\"127.0.0.1:23\",\"window\":262144}",
                "{\"journal\":[],\"window\":262144}",
                "{\"journal\":{\"units\":\"tetherd.service\"},\"window\":262144}",
                "{\"journal\":{\"units\":[\"../x\"]},\"window\":262144}",
                "{\"journal\":{\"units\":[1]},\"window\":262144}",
                "{\"journal\":{\"lines\":10001},\"window\":262144}",
                "{\"journal\":{\"lines\":-1},\"window\":262144}",
                "{\"journal\":{\"since\":-1},\"window\":262144}",
                "{\"journal\":{\"since\":1.5},\"window\":262144}",
                "{\"journal\":{\"follow\":1},\"window\":262144}",
                "{\"journal\":{\"units\":[\"a.service\",\"a.service\",\"a.service\",\"a.service\",\"a.service\","
                "\"a.service\",\"a.service\",\"a.service\",\"a.service\",\"a.service\",\"a.service\",\"a.service\","
                "\"a.service\",\"a.service\",\"a.service\",\"a.service\",\"a.service\"]},\"window\":262144}",
        };
        for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
                err[0] = 0;
                assert_int_equal(P(bad[i]), -EBADMSG);
                assert_true(err[0] != 0);
                stream_open_done(&o);
        }
        char *big = calloc(1, STREAM_OPEN_MAX + 2);
        assert_non_null(big);
        memset(big, ' ', STREAM_OPEN_MAX + 1);
        assert_int_equal(P(big), -EBADMSG);
        stream_open_done(&o);
        free(big);
#undef P
}

static void test_utf8_repair(void **state) {
        char *s;

        (void)state;
        s = stream_utf8_repair("h\xc3\xa9llo", 6, 100);
        assert_string_equal(s, "h\xc3\xa9llo");
        free(s);
        /* Invalid bytes, an overlong form, a surrogate, a NUL, a cut sequence. */
        s = stream_utf8_repair("a\xff" "b\xc0\xaf" "c\xed\xa0\x80" "d\0e\xe2\x82", 14, 100);
        assert_string_equal(s, "a\xef\xbf\xbd" "b\xef\xbf\xbd\xef\xbf\xbd" "c\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"
                               "d\xef\xbf\xbd" "e\xef\xbf\xbd\xef\xbf\xbd");
        free(s);
        /* Cut at a character boundary, with an ellipsis. */
        s = stream_utf8_repair("ab\xc3\xa9", 4, 3);
        assert_string_equal(s, "ab\xe2\x80\xa6");
        free(s);
        s = stream_utf8_repair("abcd", 4, 4);
        assert_string_equal(s, "abcd");
        free(s);
        s = stream_utf8_repair("", 0, 4);
        assert_string_equal(s, "");
        free(s);
}

int main(int argc, char **argv) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_addr_parse), cmocka_unit_test(test_allow),  cmocka_unit_test(test_query),
                cmocka_unit_test(test_units),      cmocka_unit_test(test_open),   cmocka_unit_test(test_utf8_repair),
        };

        if (argc > 1)
                cmocka_set_test_filter(argv[1]);
        return cmocka_run_group_tests(tests, NULL, NULL);
}
