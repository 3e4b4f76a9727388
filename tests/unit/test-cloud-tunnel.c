/* SPDX-License-Identifier: Apache-2.0 */
/* The pure parts of tunnels and log streams (cloud/tunnel-parse.h). */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <cmocka.h>

#include "cloud/tunnel-parse.h"
#include "proto.h"

static void test_route(void **state) {
        char dev[65];
        uint32_t sid = 7;

        assert_int_equal(tunnel_route("/v1/devices/gw-1/tunnel", dev, &sid), TUNNEL_ROUTE_OPEN);
        assert_string_equal(dev, "gw-1");
        assert_int_equal(tunnel_route("/v1/devices/gw-1/logs", dev, &sid), TUNNEL_ROUTE_LOGS);
        assert_int_equal(tunnel_route("/v1/devices/gw-1/tunnels", dev, &sid), TUNNEL_ROUTE_LIST);
        assert_int_equal(tunnel_route("/v1/devices/gw-1/tunnel/", dev, &sid), TUNNEL_ROUTE_NONE);
        assert_int_equal(tunnel_route("/v1/devices/gw-1/tunnelx", dev, &sid), TUNNEL_ROUTE_NONE);
        assert_int_equal(tunnel_route("/v1/devices//tunnel", dev, &sid), TUNNEL_ROUTE_NONE);
        assert_int_equal(tunnel_route("/v1/devices/gw-1", dev, &sid), TUNNEL_ROUTE_NONE);
        assert_int_equal(tunnel_route("/v1/devices/a/b/tunnel", dev, &sid), TUNNEL_ROUTE_NONE);
        assert_int_equal(tunnel_route("/v1/devices/"
                                      "01234567890123456789012345678901234567890123456789012345678901234/tunnel", dev, &sid),
                         TUNNEL_ROUTE_NONE);
        assert_int_equal(tunnel_route("/v1/devices/gw-1/tunnels/12/down", dev, &sid), TUNNEL_ROUTE_DOWN);
        assert_string_equal(dev, "gw-1");
        assert_int_equal(sid, 12);
        assert_int_equal(tunnel_route("/v1/devices/gw-1/tunnels/4294967295/up", dev, &sid), TUNNEL_ROUTE_UP);
        assert_int_equal(sid, 4294967295u);
        /* Not a stream id: the route, with no stream. */
        assert_int_equal(tunnel_route("/v1/devices/gw-1/tunnels/012/up", dev, &sid), TUNNEL_ROUTE_UP);
        assert_int_equal(sid, 0);
        assert_int_equal(tunnel_route("/v1/devices/gw-1/tunnels/99999999999999999999/down", dev, &sid),
                         TUNNEL_ROUTE_DOWN);
        assert_int_equal(sid, 0);
        assert_int_equal(tunnel_route("/v1/devices/gw-1/tunnels//down", dev, &sid), TUNNEL_ROUTE_DOWN);
        assert_int_equal(sid, 0);
        assert_int_equal(tunnel_route("/v1/devices/gw-1/tunnels/12/sideways", dev, &sid), TUNNEL_ROUTE_NONE);
        assert_int_equal(tunnel_route("/v1/devices/gw-1/tunnels/12", dev, &sid), TUNNEL_ROUTE_NONE);
        assert_int_equal(tunnel_route("/v1/devices/gw-1/tunnels/12/down/", dev, &sid), TUNNEL_ROUTE_NONE);
}

static void test_target(void **state) {
        char t[TUNNEL_TARGET_MAX];

        assert_int_equal(tunnel_parse_target("127.0.0.1:22", t), 0);
        assert_string_equal(t, "127.0.0.1:22");
        assert_int_equal(tunnel_parse_target("[::1]:8080", t), 0);
        assert_string_equal(t, "[::1]:8080");
        assert_int_equal(tunnel_parse_target("[2001:DB8:0:0::1]:65535", t), 0);
        assert_string_equal(t, "[2001:db8::1]:65535");
        strcpy(t, "untouched");
        assert_int_equal(tunnel_parse_target("localhost:22", t), -EINVAL);
        assert_string_equal(t, "untouched");
        assert_int_equal(tunnel_parse_target("127.0.0.1", t), -EINVAL);
        assert_int_equal(tunnel_parse_target("127.0.0.1:", t), -EINVAL);
        assert_int_equal(tunnel_parse_target("127.0.0.1:0", t), -EINVAL);
        assert_int_equal(tunnel_parse_target("127.0.0.1:65536", t), -EINVAL);
        assert_int_equal(tunnel_parse_target("127.0.0.1:022", t), -EINVAL);
        assert_int_equal(tunnel_parse_target("127.0.0.1:+22", t), -EINVAL);
        assert_int_equal(tunnel_parse_target("127.0.0.1:22 ", t), -EINVAL);
        assert_int_equal(tunnel_parse_target("127.1:22", t), -EINVAL);
        assert_int_equal(tunnel_parse_target("::1:22", t), -EINVAL);
        assert_int_equal(tunnel_parse_target("[::1]22", t), -EINVAL);
        assert_int_equal(tunnel_parse_target("[127.0.0.1]:22", t), -EINVAL);
        assert_int_equal(tunnel_parse_target("[]:22", t), -EINVAL);
        assert_int_equal(tunnel_parse_target("", t), -EINVAL);
        assert_int_equal(tunnel_parse_target(":22", t), -EINVAL);
        assert_int_equal(tunnel_parse_target("[::1%lo]:22", t), -EINVAL);
}

static void test_since_lines_unit(void **state) {
        uint64_t us = 7;
        unsigned n = 7;

        assert_int_equal(tunnel_parse_since("1765100000", &us), 0);
        assert_true(us == 1765100000ULL * 1000000);
        assert_int_equal(tunnel_parse_since("0", &us), 0);
        assert_true(us == 0);
        assert_int_equal(tunnel_parse_since("2026-12-07T13:31:08Z", &us), 0);
        assert_true(us == 1796650268ULL * 1000000);
        assert_int_equal(tunnel_parse_since("2026-12-07T14:31:08.5+01:00", &us), 0);
        assert_true(us == 1796650268ULL * 1000000);
        us = 7;
        assert_int_equal(tunnel_parse_since("", &us), -EINVAL);
        assert_int_equal(tunnel_parse_since("-1", &us), -EINVAL);
        assert_int_equal(tunnel_parse_since("1e9", &us), -EINVAL);
        assert_int_equal(tunnel_parse_since("99999999999999999999999", &us), -EINVAL);
        assert_int_equal(tunnel_parse_since("1969-12-31T23:59:59Z", &us), -EINVAL);
        assert_int_equal(tunnel_parse_since("yesterday", &us), -EINVAL);
        assert_true(us == 7);

        assert_int_equal(tunnel_parse_lines("0", &n), 0);
        assert_int_equal(n, 0);
        assert_int_equal(tunnel_parse_lines("10000", &n), 0);
        assert_int_equal(n, 10000);
        assert_int_equal(tunnel_parse_lines("10001", &n), -EINVAL);
        assert_int_equal(tunnel_parse_lines("", &n), -EINVAL);
        assert_int_equal(tunnel_parse_lines("-1", &n), -EINVAL);
        assert_int_equal(tunnel_parse_lines(" 5", &n), -EINVAL);
        assert_int_equal(n, 10000);

        assert_int_equal(tunnel_check_unit("tetherd.service"), 0);
        assert_int_equal(tunnel_check_unit("getty@tty1.service"), 0);
        assert_int_equal(tunnel_check_unit("dev-disk-by\\x2duuid.device"), 0);
        assert_int_equal(tunnel_check_unit("tetherd"), -EINVAL);
        assert_int_equal(tunnel_check_unit(".service"), -EINVAL);
        assert_int_equal(tunnel_check_unit(""), -EINVAL);
        assert_int_equal(tunnel_check_unit("a b.service"), -EINVAL);
        assert_int_equal(tunnel_check_unit("a\n.service"), -EINVAL);
        assert_int_equal(tunnel_check_unit("_SYSTEMD_UNIT=x.service"), -EINVAL);
        {
                char big[TUNNEL_UNIT_MAX + 2];

                memset(big, 'a', sizeof(big) - 1);
                big[sizeof(big) - 1] = 0;
                memcpy(big + TUNNEL_UNIT_MAX - 8, ".service", 8);
                big[TUNNEL_UNIT_MAX] = 0;
                assert_int_equal(tunnel_check_unit(big), 0);
                big[TUNNEL_UNIT_MAX] = 'a';
                assert_int_equal(tunnel_check_unit(big), -EINVAL);
        }
}

static void test_sid(void **state) {
        uint32_t sid = 9;

        assert_int_equal(tunnel_parse_sid("1", &sid), 0);
        assert_int_equal(sid, 1);
        assert_int_equal(tunnel_parse_sid("4294967295", &sid), 0);
        assert_true(sid == 4294967295u);
        sid = 9;
        assert_int_equal(tunnel_parse_sid("0", &sid), -EINVAL);
        assert_int_equal(tunnel_parse_sid("4294967296", &sid), -EINVAL);
        assert_int_equal(tunnel_parse_sid("01", &sid), -EINVAL);
        assert_int_equal(tunnel_parse_sid("", &sid), -EINVAL);
        assert_int_equal(tunnel_parse_sid("1a", &sid), -EINVAL);
        assert_int_equal(sid, 9);
}

static int add(TunnelQuery *q, const char *s) { return tunnel_query_add(q, s, strlen(s)); }

static void test_query(void **state) {
        TunnelQuery q = {};

        assert_int_equal(add(&q, "ack=18446744073709551615"), 0);
        assert_true(q.has_ack && q.ack == UINT64_MAX);
        assert_int_equal(add(&q, "fin"), 0);
        assert_int_equal(add(&q, "open"), 0);
        assert_int_equal(add(&q, "future=1"), 0);
        assert_int_equal(add(&q, "finally"), 0); /* unknown: ignored */
        assert_true(q.fin && q.open);
        /* each at most once */
        assert_int_equal(add(&q, "ack=1"), -EBADMSG);
        assert_int_equal(add(&q, "fin"), -EBADMSG);
        assert_int_equal(add(&q, "open"), -EBADMSG);

        q = (TunnelQuery){};
        assert_int_equal(add(&q, "ack="), -EBADMSG);
        assert_int_equal(add(&q, "ack=-1"), -EBADMSG);
        assert_int_equal(add(&q, "ack=18446744073709551616"), -EBADMSG);
        assert_int_equal(add(&q, "ack=1 "), -EBADMSG);
        assert_int_equal(add(&q, "fin=1"), -EBADMSG);
        assert_int_equal(add(&q, "open=yes"), -EBADMSG);
        assert_int_equal(tunnel_query_add(&q, "ack=1\0002", 7), -EBADMSG);
        assert_false(q.has_ack || q.fin || q.open);
}

static void test_open_answer(void **state) {
        uint32_t w = 5;

        assert_int_equal(tunnel_parse_open_answer("{\"window\":262144}", 17, &w), 0);
        assert_int_equal(w, 262144);
        w = 5;
        assert_int_equal(tunnel_parse_open_answer("{\"window\":32767}", 16, &w), -EBADMSG);
        assert_int_equal(tunnel_parse_open_answer("{\"window\":4194305}", 17, &w), -EBADMSG);
        assert_int_equal(tunnel_parse_open_answer("{\"window\":\"1\"}", 14, &w), -EBADMSG);
        assert_int_equal(tunnel_parse_open_answer("{\"window\":65536.0}", 18, &w), -EBADMSG);
        assert_int_equal(tunnel_parse_open_answer("{\"window\":65536,\"window\":1}", 27, &w), -EBADMSG);
        assert_int_equal(tunnel_parse_open_answer("[]", 2, &w), -EBADMSG);
        assert_int_equal(tunnel_parse_open_answer("", 0, &w), -EBADMSG);
        assert_int_equal(tunnel_parse_open_answer(NULL, 0, &w), -EBADMSG);
        assert_int_equal(w, 5);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_route), cmocka_unit_test(test_target), cmocka_unit_test(test_since_lines_unit),
                cmocka_unit_test(test_sid),   cmocka_unit_test(test_query),  cmocka_unit_test(test_open_answer),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
