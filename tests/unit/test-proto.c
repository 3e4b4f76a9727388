/* SPDX-License-Identifier: Apache-2.0 */
/* Unit tests for the wire codecs and name rules (lib/proto.c). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "proto.h"
#include "util.h"

static void test_names(void **state) {
        char long_name[TETHER_EVENT_NAME_MAX + 2];

        assert_int_equal(proto_name_check("echo", 4, PROTO_NAME_FUNCTION), 0);
        assert_int_equal(proto_name_check("a.b-c_9", 7, PROTO_NAME_VARIABLE), 0);
        assert_int_equal(proto_name_check("", 0, PROTO_NAME_FUNCTION), -EINVAL);
        assert_int_equal(proto_name_check("a/b", 3, PROTO_NAME_FUNCTION), -EINVAL);
        assert_int_equal(proto_name_check("sp ace", 6, PROTO_NAME_FUNCTION), -EINVAL);
        assert_int_equal(proto_name_check("gpio/relay1", 11, PROTO_NAME_EVENT), 0);
        assert_int_equal(proto_name_check("/lead", 5, PROTO_NAME_EVENT), -EINVAL);
        assert_int_equal(proto_name_check("a//b", 4, PROTO_NAME_EVENT), -EINVAL);
        assert_int_equal(proto_name_check("trail/", 6, PROTO_NAME_EVENT), -EINVAL);
        assert_int_equal(proto_name_check("trail/", 6, PROTO_NAME_PREFIX), 0);
        assert_int_equal(proto_name_check("", 0, PROTO_NAME_PREFIX), 0);
        assert_int_equal(proto_name_check("dev.1", 5, PROTO_NAME_DEVICE), -EINVAL);
        assert_int_equal(proto_name_check("api", 3, PROTO_NAME_DEVICE), -EADDRINUSE);
        assert_int_equal(proto_name_check("events", 6, PROTO_NAME_DEVICE), -EADDRINUSE);
        assert_int_equal(proto_name_check("api", 3, PROTO_NAME_FUNCTION), 0);
        /* The reason names what failed: a reserved id is not a bad pattern. */
        assert_string_equal(proto_device_id_problem(-EADDRINUSE), "'api' and 'events' are reserved by the API");
        assert_string_equal(proto_device_id_problem(-EINVAL), "must match [A-Za-z0-9_-]{1,64}");
        assert_string_equal(proto_device_id_problem(-ENAMETOOLONG), "must match [A-Za-z0-9_-]{1,64}");
        assert_int_equal(proto_name_check("a\0b", 3, PROTO_NAME_EVENT), -EINVAL);

        memset(long_name, 'x', sizeof(long_name));
        assert_int_equal(proto_name_check(long_name, TETHER_NAME_MAX, PROTO_NAME_FUNCTION), 0);
        assert_int_equal(proto_name_check(long_name, TETHER_NAME_MAX + 1, PROTO_NAME_FUNCTION), -ENAMETOOLONG);
        assert_int_equal(proto_name_check(long_name, TETHER_EVENT_NAME_MAX, PROTO_NAME_EVENT), 0);
        assert_int_equal(proto_name_check(long_name, TETHER_EVENT_NAME_MAX + 1, PROTO_NAME_EVENT),
                         -ENAMETOOLONG);

        assert_true(proto_prefix_match("", "anything"));
        assert_true(proto_prefix_match("gpio/", "gpio/relay1"));
        assert_false(proto_prefix_match("gpio/", "gpi"));
}

static void test_utf8(void **state) {
        assert_int_equal(proto_utf8_check("plain", 5), 0);
        assert_int_equal(proto_utf8_check("gr\xc3\xbc\xc3\x9f", 6), 0);         /* grüß */
        assert_int_equal(proto_utf8_check("\xf0\x9f\x98\x80", 4), 0);           /* emoji */
        assert_int_equal(proto_utf8_check("\xc3", 1), -EILSEQ);                 /* truncated */
        assert_int_equal(proto_utf8_check("\xc0\xaf", 2), -EILSEQ);             /* overlong */
        assert_int_equal(proto_utf8_check("\xed\xa0\x80", 3), -EILSEQ);         /* surrogate */
        assert_int_equal(proto_utf8_check("\xf4\x90\x80\x80", 4), -EILSEQ);     /* > U+10FFFF */
        assert_int_equal(proto_utf8_check("a\0b", 3), -EILSEQ);
        assert_int_equal(proto_utf8_check("\xff", 1), -EILSEQ);
        assert_int_equal(proto_utf8_check("", 0), 0);
}

static void test_result(void **state) {
        char buf[12];
        int32_t v = 7;

        assert_int_equal(proto_result_format(42, buf), 2);
        assert_string_equal(buf, "42");
        proto_result_format(INT32_MIN, buf);
        assert_string_equal(buf, "-2147483648");
        assert_int_equal(proto_result_parse((const uint8_t *)buf, strlen(buf), &v), 0);
        assert_int_equal(v, INT32_MIN);
        assert_int_equal(proto_result_parse((const uint8_t *)"2147483648", 10, &v), -EBADMSG);
        assert_int_equal(proto_result_parse((const uint8_t *)"-", 1, &v), -EBADMSG);
        assert_int_equal(proto_result_parse((const uint8_t *)"1 ", 2, &v), -EBADMSG);
        assert_int_equal(proto_result_parse((const uint8_t *)"", 0, &v), -EBADMSG);
        assert_int_equal(proto_result_parse(NULL, 0, &v), -EBADMSG);
        assert_int_equal(v, INT32_MIN); /* untouched on failure */
}

static void roundtrip_value(struct tether_value in, const char *wire) {
        _cleanup_free_ char *s = NULL;
        json_t *j = NULL;
        uint32_t type = 0;
        size_t len;

        assert_int_equal(proto_value_encode(&in, &s, &len), 0);
        assert_string_equal(s, wire);
        assert_int_equal(len, strlen(wire));
        assert_int_equal(proto_value_decode((const uint8_t *)s, len, &j, &type), 0);
        assert_int_equal(type, in.type);
        json_decref(j);
}

static void test_values(void **state) {
        struct tether_value v = { .type = TETHER_TYPE_DOUBLE, .d = 1.0 / 0.0 };
        char *s = NULL;
        json_t *j = NULL;
        uint32_t type;

        roundtrip_value((struct tether_value){ .type = TETHER_TYPE_BOOL, .b = 1 }, "true");
        roundtrip_value((struct tether_value){ .type = TETHER_TYPE_INT32, .i = -17 }, "-17");
        roundtrip_value((struct tether_value){ .type = TETHER_TYPE_DOUBLE, .d = 3.0 }, "3.0");
        roundtrip_value((struct tether_value){ .type = TETHER_TYPE_DOUBLE, .d = 21.5 }, "21.5");
        roundtrip_value((struct tether_value){ .type = TETHER_TYPE_STRING, .s = "a \"q\"" }, "\"a \\\"q\\\"\"");

        assert_int_equal(proto_value_encode(&v, &s, NULL), -ERANGE); /* no JSON for inf */
        v = (struct tether_value){ .type = 99 };
        assert_int_equal(proto_value_encode(&v, &s, NULL), -EINVAL);
        v = (struct tether_value){ .type = TETHER_TYPE_STRING, .s = "\xff" };
        assert_int_equal(proto_value_encode(&v, &s, NULL), -EILSEQ);
        assert_null(s);

        assert_int_equal(proto_value_decode((const uint8_t *)"[1]", 3, &j, &type), -EBADMSG);
        assert_int_equal(proto_value_decode((const uint8_t *)"null", 4, &j, &type), -EBADMSG);
        assert_int_equal(proto_value_decode((const uint8_t *)"1 2", 3, &j, &type), -EBADMSG);
        assert_int_equal(proto_value_decode((const uint8_t *)"99999999999", 11, &j, &type), -EBADMSG);
        assert_null(j);
}

static void test_events(void **state) {
        ProtoEvent e = { .name = "room/light", .data = "on", .ttl = 60, .private_ = true,
                         .published_at = "2026-11-25T23:59:59.123Z", .coreid = "api" };
        ProtoEvent d = {};
        _cleanup_free_ char *s = NULL;
        size_t len;

        assert_int_equal(proto_event_encode(&e, &s, &len), 0);
        assert_int_equal(proto_event_decode((const uint8_t *)s, len, &d), 0);
        assert_string_equal(d.name, "room/light");
        assert_string_equal(d.data, "on");
        assert_int_equal(d.ttl, 60);
        assert_true(d.private_);
        assert_string_equal(d.coreid, "api");
        proto_event_done(&d);

        /* TTLs use the whole uint32 range */
        e.ttl = UINT32_MAX;
        free(s);
        assert_int_equal(proto_event_encode(&e, &s, &len), 0);
        assert_non_null(strstr(s, "\"ttl\":4294967295"));
        assert_int_equal(proto_event_decode((const uint8_t *)s, len, &d), 0);
        assert_int_equal(d.ttl, UINT32_MAX);
        proto_event_done(&d);

        /* data is optional; a bad name, wrong types or junk are refused */
        assert_int_equal(proto_event_decode((const uint8_t *)"{\"name\":\"a\"}", 12, &d), 0);
        assert_null(d.data);
        assert_int_equal(d.ttl, PROTO_DEFAULT_TTL);
        proto_event_done(&d);
        assert_int_equal(proto_event_decode((const uint8_t *)"{\"name\":\"a\",\"data\":1}", 21, &d), -EBADMSG);
        /* An event without data goes out with "data":null and comes back. */
        e.data = NULL;
        free(s);
        assert_int_equal(proto_event_encode(&e, &s, &len), 0);
        assert_non_null(strstr(s, "\"data\":null"));
        assert_int_equal(proto_event_decode((const uint8_t *)s, len, &d), 0);
        assert_null(d.data);
        assert_string_equal(d.name, "room/light");
        proto_event_done(&d);
        e.data = "on";
        assert_int_equal(proto_event_decode((const uint8_t *)"{\"name\":\"/a\"}", 13, &d), -EBADMSG);
        assert_int_equal(proto_event_decode((const uint8_t *)"{\"name\":1}", 10, &d), -EBADMSG);
        assert_int_equal(proto_event_decode((const uint8_t *)"{\"name\":\"a\",\"ttl\":-1}", 21, &d), -EBADMSG);
        assert_int_equal(proto_event_decode((const uint8_t *)"{", 1, &d), -EBADMSG);
        e.name = "bad name";
        assert_int_equal(proto_event_encode(&e, &s, &len), -EINVAL);
}

static void test_event_received_at(void **state) {
        ProtoEvent e = { .name = "a", .data = "x", .ttl = 60, .published_at = "2026-11-25T10:00:00.000Z",
                         .coreid = "d" };
        ProtoEvent d = {};
        _cleanup_free_ char *s = NULL, *t = NULL;
        size_t len;

        /* Without one, received_at is published_at. */
        assert_int_equal(proto_event_encode(&e, &s, &len), 0);
        assert_non_null(strstr(s, "\"received_at\":\"2026-11-25T10:00:00.000Z\""));
        e.received_at = "2026-11-25T10:05:00.000Z";
        assert_int_equal(proto_event_encode(&e, &t, &len), 0);
        assert_int_equal(proto_event_decode((const uint8_t *)t, len, &d), 0);
        assert_string_equal(d.published_at, "2026-11-25T10:00:00.000Z");
        assert_string_equal(d.received_at, "2026-11-25T10:05:00.000Z");
        proto_event_done(&d);
        /* Older clouds send none; it must be a string when there. */
        assert_int_equal(proto_event_decode((const uint8_t *)"{\"name\":\"a\"}", 12, &d), 0);
        assert_null(d.received_at);
        proto_event_done(&d);
        assert_int_equal(proto_event_decode((const uint8_t *)"{\"name\":\"a\",\"received_at\":1}", 29, &d),
                         -EBADMSG);
}

static int query(ProtoPublishQuery *q, const char *opt) {
        return proto_publish_query_add(q, (const uint8_t *)opt, strlen(opt));
}

static void test_publish_query(void **state) {
        ProtoPublishQuery q = {};

        assert_int_equal(query(&q, "private"), 0);
        assert_int_equal(query(&q, "seq=18446744073709551615"), 0);
        assert_int_equal(query(&q, "epoch=0123456789abcdef"), 0);
        assert_int_equal(query(&q, "time=1764064800123"), 0);
        assert_int_equal(query(&q, "future=1"), 0); /* unknown: ignored */
        assert_int_equal(proto_publish_query_check(&q), 0);
        assert_true(q.private_ && q.has_seq && q.has_epoch && q.has_time);
        assert_int_equal(q.seq, UINT64_MAX);
        assert_int_equal(q.epoch, 0x0123456789abcdefULL);
        assert_int_equal(q.time_ms, 1764064800123ULL);
        /* Once only, decimal digits only, below 2^64. */
        assert_int_equal(query(&q, "time=1"), -EINVAL);
        q = (ProtoPublishQuery){};
        assert_int_equal(query(&q, "time="), -EINVAL);
        assert_int_equal(query(&q, "time=-1"), -EINVAL);
        assert_int_equal(query(&q, "time=+1"), -EINVAL);
        assert_int_equal(query(&q, "time=1.5"), -EINVAL);
        assert_int_equal(query(&q, "time=18446744073709551616"), -EINVAL);
        assert_int_equal(query(&q, "time=000000000000000000001"), -EINVAL);
        assert_false(q.has_time);
        /* 0 is a time (a clock in 1970); whether it is sane is the cloud's call. */
        assert_int_equal(query(&q, "time=0"), 0);
        assert_true(q.has_time);
        assert_int_equal(q.time_ms, 0);
        /* time= alone is fine: devices without an outbox may send it. */
        assert_int_equal(proto_publish_query_check(&q), 0);
        q = (ProtoPublishQuery){};
        assert_int_equal(query(&q, "seq=0"), -EINVAL);
        assert_int_equal(query(&q, "seq=1"), 0);
        assert_int_equal(proto_publish_query_check(&q), -EINVAL);
}

static void test_timestamps(void **state) {
        char buf[32];
        uint64_t now = proto_time_now_ms();

        assert_int_equal(proto_timestamp_format(0, buf), 0);
        assert_string_equal(buf, "1970-01-01T00:00:00.000Z");
        assert_int_equal(proto_timestamp_format(1764064800123ULL, buf), 0);
        assert_string_equal(buf, "2025-11-25T10:00:00.123Z");
        assert_int_equal(proto_timestamp_format(253402300799999ULL, buf), 0);
        assert_string_equal(buf, "9999-12-31T23:59:59.999Z");
        assert_int_equal(proto_timestamp_format(253402300800000ULL, buf), -ERANGE);
        assert_string_equal(buf, "9999-12-31T23:59:59.999Z"); /* untouched */
        assert_int_equal(proto_timestamp_format(UINT64_MAX, buf), -ERANGE);
        assert_true(now > PROTO_TIME_FLOOR_MS);
        proto_timestamp_now(buf);
        assert_int_equal(strlen(buf), 24);
        assert_int_equal(buf[23], 'Z');
}

static void test_publish_time_rules(void **state) {
        const uint64_t now = 1796000000000ULL; /* 2026-11-29 */

        assert_null(proto_publish_time_problem(now, now));
        assert_null(proto_publish_time_problem(now - 1000, now));
        /* The floor: 2025-01-01T00:00:00Z and later. */
        assert_null(proto_publish_time_problem(PROTO_TIME_FLOOR_MS, PROTO_TIME_FLOOR_MS + 1000));
        assert_string_equal(proto_publish_time_problem(PROTO_TIME_FLOOR_MS - 1, PROTO_TIME_FLOOR_MS),
                            "before 2025-01-01T00:00:00Z");
        assert_string_equal(proto_publish_time_problem(0, now), "before 2025-01-01T00:00:00Z");
        /* Up to 60 s ahead of the cloud. */
        assert_null(proto_publish_time_problem(now + PROTO_TIME_SKEW_MS, now));
        assert_string_equal(proto_publish_time_problem(now + PROTO_TIME_SKEW_MS + 1, now),
                            "more than 60 s ahead of the cloud's clock");
        assert_string_equal(proto_publish_time_problem(UINT64_MAX, now), "more than 60 s ahead of the cloud's clock");
        /* Up to 30 days old. */
        assert_null(proto_publish_time_problem(now - PROTO_TIME_MAX_AGE_MS, now));
        assert_string_equal(proto_publish_time_problem(now - PROTO_TIME_MAX_AGE_MS - 1, now),
                            "more than 30 days behind the cloud's clock");
}

static void test_describe(void **state) {
        static const char good[] = "{\"agent\":\"tetherd\",\"version\":\"0.1.0\",\"plugins\":[{\"name\":\"x\"}],"
                                   "\"functions\":[\"echo\"],\"variables\":{\"c\":\"int32\"},\"events\":[\"x/\"]}";
        static const char badtype[] = "{\"agent\":\"t\",\"version\":\"1\",\"plugins\":[],\"functions\":[],"
                                      "\"variables\":{\"c\":\"float\"}}";
        static const char badname[] = "{\"agent\":\"t\",\"version\":\"1\",\"plugins\":[],\"functions\":[\"a b\"],"
                                      "\"variables\":{}}";
        json_t *j = NULL;

        assert_int_equal(proto_describe_decode((const uint8_t *)good, strlen(good), &j), 0);
        assert_string_equal(json_string_value(json_object_get(json_object_get(j, "variables"), "c")), "int32");
        json_decref(j);
        j = NULL;
        assert_int_equal(proto_describe_decode((const uint8_t *)badtype, strlen(badtype), &j), -EBADMSG);
        assert_int_equal(proto_describe_decode((const uint8_t *)badname, strlen(badname), &j), -EBADMSG);
        assert_int_equal(proto_describe_decode((const uint8_t *)"[]", 2, &j), -EBADMSG);
        assert_null(j);
}

static void test_describe_units(void **state) {
#define D(units) "{\"agent\":\"t\",\"version\":\"1\",\"plugins\":[],\"functions\":[]," \
                 "\"variables\":{\"t\":\"double\"}" units "}"
        static const char good[] = D(",\"units\":{\"t\":\"\u00b0C\"}");
        static const char unknown[] = D(",\"units\":{\"nosuch\":\"V\"}");
        static const char notstring[] = D(",\"units\":{\"t\":5}");
        static const char toolong[] = D(",\"units\":{\"t\":\"12345678901234567\"}");
        static const char notobject[] = D(",\"units\":[]");
        static const char escape[] = D(",\"units\":{\"t\":\"\\u001b[2J\"}");
        static const char c1[] = D(",\"units\":{\"t\":\"\\u009b1m\"}");
#undef D
        json_t *j = NULL;

        assert_int_equal(proto_describe_decode((const uint8_t *)good, strlen(good), &j), 0);
        assert_string_equal(json_string_value(json_object_get(json_object_get(j, "units"), "t")), "\u00b0C");
        json_decref(j);
        j = NULL;
        assert_int_equal(proto_describe_decode((const uint8_t *)unknown, strlen(unknown), &j), -EBADMSG);
        assert_int_equal(proto_describe_decode((const uint8_t *)notstring, strlen(notstring), &j), -EBADMSG);
        assert_int_equal(proto_describe_decode((const uint8_t *)toolong, strlen(toolong), &j), -EBADMSG);
        assert_int_equal(proto_describe_decode((const uint8_t *)notobject, strlen(notobject), &j), -EBADMSG);
        assert_null(j);
        /* Control characters (C0, C1): the unit is left out, the rest counts. */
        assert_int_equal(proto_describe_decode((const uint8_t *)escape, strlen(escape), &j), 0);
        assert_int_equal(json_object_size(json_object_get(j, "units")), 0);
        json_decref(j);
        j = NULL;
        assert_int_equal(proto_describe_decode((const uint8_t *)c1, strlen(c1), &j), 0);
        assert_int_equal(json_object_size(json_object_get(j, "units")), 0);
        json_decref(j);
}

/* "system" (the inventory): kept when well formed, what is not is
 * dropped, and the document counts either way. */
static void test_describe_system(void **state) {
#define D(sys) "{\"agent\":\"t\",\"version\":\"1\",\"plugins\":[],\"functions\":[],\"variables\":{}" sys "}"
        static const char good[] = D(",\"system\":{\"os\":\"Debian GNU/Linux 12 (bookworm)\",\"arch\":\"arm64\","
                                     "\"kernel\":\"6.1.0-28-arm64\",\"packages\":{\"tether-agent\":\"0.9.0\","
                                     "\"libc6\":\"2.36-9+deb12u4\",\"epoch\":\"1:2.0~rc1\"},\"extra\":1}");
        static const char mixed[] = D(",\"system\":{\"os\":\"a\\nb\",\"arch\":5,\"kernel\":\"6.1\","
                                      "\"packages\":{\"Bad\":\"1\",\"x\":\"1\",\"ok-pkg\":\"1 2\",\"good\":\"1\"}}");
        static const char notobject[] = D(",\"system\":\"linux\"");
#undef D
        json_t *j = NULL, *sys, *pk;

        assert_int_equal(proto_describe_decode((const uint8_t *)good, strlen(good), &j), 0);
        sys = json_object_get(j, "system");
        assert_string_equal(json_string_value(json_object_get(sys, "os")), "Debian GNU/Linux 12 (bookworm)");
        assert_string_equal(json_string_value(json_object_get(sys, "arch")), "arm64");
        assert_string_equal(json_string_value(json_object_get(sys, "kernel")), "6.1.0-28-arm64");
        pk = json_object_get(sys, "packages");
        assert_int_equal(json_object_size(pk), 3);
        assert_string_equal(json_string_value(json_object_get(pk, "epoch")), "1:2.0~rc1");
        assert_null(json_object_get(sys, "extra"));
        json_decref(j);
        assert_int_equal(proto_describe_decode((const uint8_t *)mixed, strlen(mixed), &j), 0);
        sys = json_object_get(j, "system");
        assert_null(json_object_get(sys, "os"));
        assert_null(json_object_get(sys, "arch"));
        assert_string_equal(json_string_value(json_object_get(sys, "kernel")), "6.1");
        pk = json_object_get(sys, "packages");
        assert_int_equal(json_object_size(pk), 1);
        assert_string_equal(json_string_value(json_object_get(pk, "good")), "1");
        json_decref(j);
        assert_int_equal(proto_describe_decode((const uint8_t *)notobject, strlen(notobject), &j), 0);
        assert_null(json_object_get(j, "system"));
        json_decref(j);
        assert_true(proto_package_name_valid("tether-plugin-gpio", 18));
        assert_true(proto_package_name_valid("g++", 3));
        assert_false(proto_package_name_valid("-x", 2));
        assert_false(proto_package_name_valid("a", 1));
        assert_false(proto_package_name_valid("a\0b", 3));
        assert_false(proto_package_version_valid("", 0));
        assert_false(proto_package_version_valid("1\0", 2));
        assert_true(proto_text_clean("caf\u00e9", 5, 5));
        assert_false(proto_text_clean("caf\u00e9", 5, 4));
        assert_false(proto_text_clean("a\x7f", 2, 8));
        assert_false(proto_text_clean("a\xc2\x85", 3, 8));
}

static void test_types(void **state) {
        assert_string_equal(proto_type_to_string(TETHER_TYPE_INT32), "int32");
        assert_null(proto_type_to_string(0));
        assert_null(proto_type_to_string(77));
        assert_int_equal(proto_type_from_string("double"), TETHER_TYPE_DOUBLE);
        assert_int_equal(proto_type_from_string("float"), 0);
        assert_int_equal(proto_type_from_string(NULL), 0);
}

int main(int argc, char **argv) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_names),  cmocka_unit_test(test_utf8),  cmocka_unit_test(test_result),
                cmocka_unit_test(test_values), cmocka_unit_test(test_events), cmocka_unit_test(test_describe),
                cmocka_unit_test(test_describe_units),
                cmocka_unit_test(test_describe_system),
                cmocka_unit_test(test_types),
                cmocka_unit_test(test_event_received_at),
                cmocka_unit_test(test_publish_query),
                cmocka_unit_test(test_timestamps),
                cmocka_unit_test(test_publish_time_rules),
        };
        /* One test, or those a glob matches: test-foo NAME (HACKING.md). */
        if (argc > 1)
                cmocka_set_test_filter(argv[1]);
        return cmocka_run_group_tests(tests, NULL, NULL);
}
