/* SPDX-License-Identifier: Apache-2.0 */
/* Unit tests for API token scopes (cloud/scopes.c): names parse exactly,
 * lists in both spellings, bad input says what is wrong, admin implies
 * every scope and nothing else does. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <cmocka.h>

#include "cloud/scopes.h"

static void test_names_round_trip(void **state) {
        unsigned n = 0;

        for (unsigned bit = 1; bit & SCOPE_ALL; bit <<= 1) {
                const char *name = scope_name(bit);
                unsigned back = 0;

                assert_non_null(name);
                assert_int_equal(scope_parse(name, strlen(name), &back), 0);
                assert_int_equal(back, bit);
                n++;
        }
        assert_int_equal(n, 11);
        assert_null(scope_name(0));
        assert_null(scope_name(SCOPE_DEVICES_READ | SCOPE_ADMIN));
        assert_null(scope_name(SCOPE_ALL + 1));
}

static void test_parse_exact(void **state) {
        static const char *const bad[] = { "", "Admin", "admin ", "devices", "devices:Write", "devices:read:",
                                           "*", "adm" };
        unsigned v = 12345;

        for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
                assert_int_equal(scope_parse(bad[i], strlen(bad[i]), &v), -EINVAL);
                assert_int_equal(v, 12345); /* untouched on failure */
        }
        /* The length counts, not a NUL: a prefix of a name is not it. */
        assert_int_equal(scope_parse("admin", 3, &v), -EINVAL);
        assert_int_equal(scope_parse("events:readX", 11, &v), 0);
        assert_int_equal(v, SCOPE_EVENTS_READ);
}

static void test_parse_json(void **state) {
        char err[SCOPE_ERROR_MAX];
        unsigned v = 0;
        json_t *j;

        j = json_string("devices:read, events:read\tota:write,,");
        assert_int_equal(scope_parse_json(j, &v, err), 0);
        assert_int_equal(v, SCOPE_DEVICES_READ | SCOPE_EVENTS_READ | SCOPE_OTA_WRITE);
        json_decref(j);

        j = json_pack("[s, s, s]", "admin", "metrics:read", "admin");
        assert_int_equal(scope_parse_json(j, &v, err), 0);
        assert_int_equal(v, SCOPE_ADMIN | SCOPE_METRICS_READ);
        json_decref(j);

        j = json_pack("[s, s]", "devices:read", "root");
        assert_int_equal(scope_parse_json(j, &v, err), -EINVAL);
        assert_non_null(strstr(err, "'root'"));
        json_decref(j);

        /* Unprintable names are not echoed back. */
        j = json_string("devices:read,\x1b[2J");
        assert_int_equal(scope_parse_json(j, &v, err), -EINVAL);
        assert_null(strchr(err, '\x1b'));
        json_decref(j);

        j = json_array();
        assert_int_equal(scope_parse_json(j, &v, err), -EINVAL);
        assert_non_null(strstr(err, "At least one scope"));
        json_decref(j);

        j = json_string(" , ");
        assert_int_equal(scope_parse_json(j, &v, err), -EINVAL);
        json_decref(j);

        j = json_pack("[i]", 1);
        assert_int_equal(scope_parse_json(j, &v, err), -EINVAL);
        json_decref(j);

        j = json_integer(1);
        assert_int_equal(scope_parse_json(j, &v, err), -EINVAL);
        json_decref(j);
        assert_int_equal(scope_parse_json(NULL, &v, err), -EINVAL);
}

static void test_text_and_json(void **state) {
        char buf[192];
        json_t *j;

        assert_string_equal(scope_to_text(SCOPE_ADMIN | SCOPE_DEVICES_READ, buf, sizeof(buf)), "devices:read admin");
        assert_string_equal(scope_to_text(0, buf, sizeof(buf)), "");
        /* Never half a name. */
        assert_string_equal(scope_to_text(SCOPE_DEVICES_READ | SCOPE_EVENTS_READ, buf, 20), "devices:read");
        j = scope_to_json(SCOPE_ALL);
        assert_int_equal(json_array_size(j), 11);
        assert_string_equal(json_string_value(json_array_get(j, 0)), "devices:read");
        assert_string_equal(json_string_value(json_array_get(j, 6)), "admin");
        assert_string_equal(json_string_value(json_array_get(j, 7)), "provision:write");
        assert_string_equal(json_string_value(json_array_get(j, 8)), "devices:write");
        assert_string_equal(json_string_value(json_array_get(j, 9)), "tunnels:open");
        assert_string_equal(json_string_value(json_array_get(j, 10)), "logs:read");
        json_decref(j);
        /* Every name fits the buffer the tokens table is written from. */
        assert_string_equal(scope_to_text(SCOPE_ALL, buf, 192),
                            "devices:read functions:call events:read events:publish ota:write metrics:read admin "
                            "provision:write devices:write tunnels:open logs:read");
}

static void test_allows(void **state) {
        for (unsigned bit = 1; bit & SCOPE_ALL; bit <<= 1) {
                assert_true(scope_allows(SCOPE_ADMIN, bit));
                assert_true(scope_allows(bit, bit));
                assert_true(scope_allows(bit, 0));
                for (unsigned other = 1; other & SCOPE_ALL; other <<= 1)
                        if (other != bit && bit != SCOPE_ADMIN)
                                assert_false(scope_allows(bit, other));
        }
        assert_false(scope_allows(SCOPE_DEVICES_READ, SCOPE_DEVICES_READ | SCOPE_EVENTS_READ));
        assert_true(scope_allows(SCOPE_DEVICES_READ | SCOPE_EVENTS_READ, SCOPE_DEVICES_READ | SCOPE_EVENTS_READ));
        assert_false(scope_allows(0, SCOPE_METRICS_READ));
        /* provision:write gives nothing else, and admin gives it. */
        assert_true(scope_allows(SCOPE_ADMIN, SCOPE_PROVISION_WRITE));
        assert_false(scope_allows(SCOPE_PROVISION_WRITE, SCOPE_ADMIN));
        assert_false(scope_allows(SCOPE_PROVISION_WRITE, SCOPE_DEVICES_READ));
        /* devices:write is not ota:write, nor the other way round. */
        assert_true(scope_allows(SCOPE_ADMIN, SCOPE_DEVICES_WRITE));
        assert_false(scope_allows(SCOPE_OTA_WRITE, SCOPE_DEVICES_WRITE));
        assert_false(scope_allows(SCOPE_DEVICES_WRITE, SCOPE_OTA_WRITE));
        /* Tunnels and logs: admin implies them, nothing else does. */
        assert_int_equal(SCOPE_TUNNELS_OPEN, 1u << 9);
        assert_int_equal(SCOPE_LOGS_READ, 1u << 10);
        assert_true(scope_allows(SCOPE_ADMIN, SCOPE_TUNNELS_OPEN | SCOPE_LOGS_READ));
        assert_false(scope_allows(SCOPE_FUNCTIONS_CALL | SCOPE_DEVICES_READ, SCOPE_TUNNELS_OPEN));
        assert_false(scope_allows(SCOPE_EVENTS_READ | SCOPE_DEVICES_READ, SCOPE_LOGS_READ));
        assert_false(scope_allows(SCOPE_TUNNELS_OPEN, SCOPE_LOGS_READ));
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_names_round_trip), cmocka_unit_test(test_parse_exact),
                cmocka_unit_test(test_parse_json),       cmocka_unit_test(test_text_and_json),
                cmocka_unit_test(test_allows),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
