/* SPDX-License-Identifier: Apache-2.0 */
/* Unit tests for the inventory rules (cloud/inventory.c): what PUT
 * /v1/devices/ID accepts and refuses, the tags merge patch and its limit,
 * and the filters of GET /v1/devices. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <cmocka.h>

#include "cloud/inventory.h"

static int parse(const char *text, InventoryUpdate *u, char err[static INVENTORY_ERROR_MAX], json_t **keep) {
        *keep = json_loads(text, 0, NULL);
        assert_non_null(*keep);
        return inventory_parse_update(*keep, u, err);
}

static void test_parse_update(void **state) {
        char err[INVENTORY_ERROR_MAX] = "";
        InventoryUpdate u;
        json_t *j;

        assert_int_equal(parse("{\"name\":\"kitchen-1.a_b\",\"notes\":\"line\\nline\",\"tags\":{\"a\":\"1\",\"b\":null}}",
                               &u, err, &j), 0);
        assert_true(u.has_name && u.has_notes && u.tags);
        assert_string_equal(u.name, "kitchen-1.a_b");
        assert_false(inventory_update_empty(&u));
        json_decref(j);
        assert_int_equal(parse("{\"name\":\"\",\"notes\":null}", &u, err, &j), 0);
        assert_true(u.has_name && !u.name && u.has_notes && !u.notes && !u.tags);
        json_decref(j);
        assert_int_equal(parse("{\"access_token\":\"x\",\"tags\":null}", &u, err, &j), 0);
        assert_true(inventory_update_empty(&u));
        json_decref(j);

        static const struct {
                const char *body, *error;
        } bad[] = {
                { "{\"name\":\"a b\"}", "Invalid name: names are [A-Za-z0-9_.-]{1,64}" },
                { "{\"name\":\"a/b\"}", "Invalid name: names are [A-Za-z0-9_.-]{1,64}" },
                { "{\"name\":\"\\u00e9\"}", "Invalid name: names are [A-Za-z0-9_.-]{1,64}" },
                { "{\"name\":true}", "\"name\" must be a string or null" },
                { "{\"notes\":{}}", "\"notes\" must be a string or null" },
                { "{\"notes\":\"\\ud800\"}", NULL }, /* jansson refuses a lone surrogate itself */
                { "{\"tags\":[]}", "\"tags\" must be a JSON object of names to a string (set) or null (remove)" },
                { "{\"tags\":{\"\":\"1\"}}", "Invalid tag name in \"tags\": names are [A-Za-z0-9_.-]{1,64}" },
                { "{\"tags\":{\"k\":{}}}", "The value of tag 'k' must be a string or null" },
                { "{\"tags\":{\"k\":\"a\\tb\"}}", "The value of tag 'k' must be UTF-8 text without control characters" },
        };
        for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
                j = json_loads(bad[i].body, 0, NULL);
                if (!bad[i].error) {
                        assert_null(j);
                        continue;
                }
                assert_non_null(j);
                err[0] = 0;
                assert_int_equal(inventory_parse_update(j, &u, err), -EINVAL);
                assert_string_equal(err, bad[i].error);
                json_decref(j);
        }
        /* 4096 bytes of notes are fine, 4097 are not. */
        {
                char big[4098];

                memset(big, 'n', sizeof(big) - 1);
                big[4097] = 0;
                j = json_pack("{s:s}", "notes", big);
                assert_int_equal(inventory_parse_update(j, &u, err), -EINVAL);
                assert_string_equal(err, "\"notes\" is longer than 4096 bytes");
                json_decref(j);
                big[4096] = 0;
                j = json_pack("{s:s}", "notes", big);
                assert_int_equal(inventory_parse_update(j, &u, err), 0);
                json_decref(j);
        }
}

static void test_tags_merge(void **state) {
        char err[INVENTORY_ERROR_MAX] = "";
        json_t *tags = json_pack("{s:s, s:s}", "a", "1", "b", "2"), *patch, *out = NULL;

        patch = json_pack("{s:s, s:n, s:n}", "a", "x", "b", "nosuch");
        assert_int_equal(inventory_tags_merge(tags, patch, &out, err), 0);
        assert_int_equal(json_object_size(out), 1);
        assert_string_equal(json_string_value(json_object_get(out, "a")), "x");
        /* tags itself is untouched */
        assert_string_equal(json_string_value(json_object_get(tags, "b")), "2");
        json_decref(out);
        json_decref(patch);
        patch = json_object();
        for (int i = 0; i < 31; i++) {
                char k[8];

                snprintf(k, sizeof(k), "t%d", i);
                json_object_set_new(patch, k, json_string("v"));
        }
        out = NULL;
        assert_int_equal(inventory_tags_merge(tags, patch, &out, err), -EINVAL); /* 33 */
        assert_string_equal(err, "\"tags\" would hold 33 tags, at most 32 are allowed");
        assert_null(out);
        json_object_set_new(patch, "a", json_null());
        assert_int_equal(inventory_tags_merge(tags, patch, &out, err), 0); /* 32 */
        assert_int_equal(json_object_size(out), 32);
        json_decref(out);
        assert_int_equal(inventory_tags_merge(NULL, patch, &out, err), 0);
        assert_int_equal(json_object_size(out), 31);
        json_decref(out);
        json_decref(patch);
        json_decref(tags);
}

static void test_filters(void **state) {
        char err[INVENTORY_ERROR_MAX] = "";
        InventoryFilter f;
        json_t *dev = json_loads("{\"id\":\"d\",\"name\":\"alpha\",\"connected\":false,\"tags\":{\"group\":\"a\","
                                 "\"ring\":\"1\"},\"system\":{\"packages\":{\"tether-agent\":\"0.9.0\"}}}",
                                 0, NULL);
        const uint64_t now = 1000000000ULL * 1000000ULL, min = 60ULL * 1000000ULL;

        inventory_filter_init(&f);
        assert_int_equal(inventory_filter_add(&f, "page", "2", err), 0);
        assert_int_equal(inventory_filter_add(&f, "access_token", NULL, err), 0);
        assert_false(f.any);
        assert_true(inventory_filter_match(&f, dev, 0, now));
        assert_int_equal(inventory_filter_add(&f, "tag", "group=a", err), 0);
        assert_int_equal(inventory_filter_add(&f, "tag", "ring", err), 0);
        assert_int_equal(inventory_filter_add(&f, "package", "tether-agent=0.9.0", err), 0);
        assert_int_equal(inventory_filter_add(&f, "name", "alpha", err), 0);
        assert_int_equal(inventory_filter_add(&f, "connected", "false", err), 0);
        assert_true(f.any);
        assert_true(inventory_filter_match(&f, dev, 0, now));
        assert_int_equal(inventory_filter_add(&f, "heard_within", "60", err), 0);
        assert_false(inventory_filter_match(&f, dev, 0, now));              /* never heard */
        assert_false(inventory_filter_match(&f, dev, now - 2 * min, now));  /* too long ago */
        assert_true(inventory_filter_match(&f, dev, now - min / 2, now));
        inventory_filter_init(&f);
        assert_int_equal(inventory_filter_add(&f, "not_heard_within", "60", err), 0);
        assert_true(inventory_filter_match(&f, dev, 0, now));
        assert_true(inventory_filter_match(&f, dev, now - 2 * min, now));
        assert_false(inventory_filter_match(&f, dev, now - min / 2, now));
        json_object_set_new(dev, "connected", json_true());
        assert_false(inventory_filter_match(&f, dev, now - 2 * min, now)); /* connected: heard now */
        inventory_filter_init(&f);
        assert_int_equal(inventory_filter_add(&f, "tag", "group=b", err), 0);
        assert_false(inventory_filter_match(&f, dev, 0, now));
        inventory_filter_init(&f);
        assert_int_equal(inventory_filter_add(&f, "package", "tether-agent=1.0", err), 0);
        assert_false(inventory_filter_match(&f, dev, 0, now));
        inventory_filter_init(&f);
        assert_int_equal(inventory_filter_add(&f, "package", "libc6", err), 0);
        assert_false(inventory_filter_match(&f, dev, 0, now));

        static const struct {
                const char *key, *value;
        } bad[] = {
                { "tag", NULL },         { "tag", "" },          { "tag", "a b" },       { "tag", "=v" },
                { "tag", "k=a\nb" },     { "package", "A" },     { "package", "x=" },    { "package", "x=1 2" },
                { "connected", "yes" },  { "connected", NULL },  { "heard_within", "-1" }, { "heard_within", "1e3" },
                { "heard_within", "" },  { "heard_within", "9999999999" }, { "name", "a'b" }, { "name", NULL },
        };
        for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
                char want[64];

                inventory_filter_init(&f);
                err[0] = 0;
                assert_int_equal(inventory_filter_add(&f, bad[i].key, bad[i].value, err), -EINVAL);
                snprintf(want, sizeof(want), "Malformed filter '%s'", bad[i].key);
                assert_memory_equal(err, want, strlen(want));
        }
        /* Once each, at most 16 tags. */
        inventory_filter_init(&f);
        assert_int_equal(inventory_filter_add(&f, "connected", "true", err), 0);
        assert_int_equal(inventory_filter_add(&f, "connected", "true", err), -EINVAL);
        inventory_filter_init(&f);
        for (int i = 0; i < INVENTORY_FILTER_TAGS_MAX; i++)
                assert_int_equal(inventory_filter_add(&f, "tag", "k", err), 0);
        assert_int_equal(inventory_filter_add(&f, "tag", "k", err), -EINVAL);
        json_decref(dev);
}

int main(int argc, char **argv) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_parse_update),
                cmocka_unit_test(test_tags_merge),
                cmocka_unit_test(test_filters),
        };

        if (argc > 1)
                cmocka_set_test_filter(argv[1]);
        return cmocka_run_group_tests(tests, NULL, NULL);
}
