/* SPDX-License-Identifier: Apache-2.0 */
/* Unit tests for provisioning tokens (cloud/provision.c) on a real
 * database: a token is made, checked, used exactly uses_max times,
 * refused when revoked, expired or used up with the reason a device
 * shows; tags are checked; the database holds the token's digest, never
 * the token; everything is there again after a close and reopen. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <errno.h>
#include <openssl/crypto.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cloud/provision.h"
#include "cloud/store.h"
#include "lib/util.h"

typedef struct Fixture {
        char dir[64];
        sd_event *event;
        Store *store;
        Provision *p;
} Fixture;

static void fixture_open(Fixture *f) {
        assert_int_equal(store_open(f->event, f->dir, &f->store), 0);
        assert_int_equal(provision_open(f->store, &f->p), 0);
}

static void fixture_close(Fixture *f) {
        f->p = provision_free(f->p);
        f->store = store_free(f->store);
}

static int setup(void **state) {
        Fixture *f = calloc(1, sizeof(*f));

        assert_non_null(f);
        snprintf(f->dir, sizeof(f->dir), "/tmp/test-cloud-provision-XXXXXX");
        assert_non_null(mkdtemp(f->dir));
        assert_int_equal(sd_event_new(&f->event), 0);
        fixture_open(f);
        *state = f;
        return 0;
}

static int teardown(void **state) {
        Fixture *f = *state;
        char path[128];

        fixture_close(f);
        for (const char *const *n = (const char *const[]){ "cloud.db", "cloud.db-wal", "cloud.db-shm", NULL }; *n;
             n++) {
                snprintf(path, sizeof(path), "%s/%s", f->dir, *n);
                (void)unlink(path);
        }
        (void)rmdir(f->dir);
        sd_event_unref(f->event);
        free(f);
        return 0;
}

static char *make(Fixture *f, uint32_t uses, int64_t lifetime, json_t *tags, json_t **ret_json) {
        ProvisionSpec spec = { .name = "batch 7", .uses_max = uses, .expires_at = (int64_t)time(NULL) + lifetime,
                               .tags = tags, .created_by = "token:test" };
        char *secret = NULL;
        json_t *j = NULL;

        assert_int_equal(provision_create(f->p, &spec, &secret, &j), 0);
        assert_non_null(secret);
        assert_non_null(j);
        if (ret_json)
                *ret_json = j;
        else
                json_decref(j);
        return secret;
}

static void clear_free(char *s) {
        OPENSSL_clear_free(s, strlen(s));
}

static void test_create_check_consume(void **state) {
        Fixture *f = *state;
        char id[PROVISION_ID_MAX + 1] = "", reason[PROVISION_REASON_MAX] = "";
        json_t *tags = json_pack("{s:s, s:s}", "site", "berlin", "rack", "7"), *j = NULL, *got = NULL;
        char *secret = make(f, 1, 3600, tags, &j);
        const char *jid = json_string_value(json_object_get(j, "id"));

        /* The shape: tprov_ and 40 lowercase hex digits; id prov- and 8. */
        assert_int_equal(strlen(secret), 6 + 40);
        assert_true(startswith(secret, PROVISION_PREFIX));
        assert_int_equal(strspn(secret + 6, "0123456789abcdef"), 40);
        assert_non_null(jid);
        assert_int_equal(strlen(jid), 13);
        assert_true(startswith(jid, "prov-"));
        assert_int_equal(json_integer_value(json_object_get(j, "uses_max")), 1);
        assert_int_equal(json_integer_value(json_object_get(j, "uses")), 0);
        assert_string_equal(json_string_value(json_object_get(j, "state")), "active");
        assert_string_equal(json_string_value(json_object_get(j, "name")), "batch 7");
        assert_true(json_equal(json_object_get(j, "tags"), tags));
        assert_null(json_object_get(j, "token"));
        assert_null(json_object_get(j, "digest"));

        /* A check uses nothing. */
        assert_int_equal(provision_check(f->p, secret, id, &got, reason), 0);
        assert_string_equal(id, jid);
        assert_true(json_equal(got, tags));
        json_decref(got);
        got = NULL;
        assert_int_equal(provision_check(f->p, secret, id, NULL, reason), 0);

        memset(id, 0, sizeof(id));
        assert_int_equal(provision_consume(f->p, secret, "dev-1", id, &got, reason), 0);
        assert_string_equal(id, jid);
        assert_true(json_equal(got, tags));
        json_decref(got);
        got = NULL;

        /* Used up: the reason says how many. */
        assert_int_equal(provision_consume(f->p, secret, "dev-2", id, &got, reason), -EUSERS);
        assert_null(got);
        assert_string_equal(reason, "provisioning token used up (1 of 1 uses)");
        assert_int_equal(provision_check(f->p, secret, id, NULL, reason), -EUSERS);
        json_decref(j);
        j = provision_get_json(f->p, id);
        assert_string_equal(json_string_value(json_object_get(j, "state")), "used-up");
        assert_int_equal(json_integer_value(json_object_get(j, "uses")), 1);

        json_decref(j);
        json_decref(tags);
        clear_free(secret);
}

static void test_unknown(void **state) {
        Fixture *f = *state;
        char id[PROVISION_ID_MAX + 1] = "untouched", reason[PROVISION_REASON_MAX] = "";
        static const char *const bad[] = {
                "",
                "tprov_",
                "tprov_0000000000000000000000000000000000000000",  /* well formed, unknown */
                "tprov_000000000000000000000000000000000000000",   /* 39 digits */
                "tprov_00000000000000000000000000000000000000000", /* 41 */
                "tprov_000000000000000000000000000000000000000A",  /* uppercase */
                "tether_0000000000000000000000000000000000000000",
        };
        char *secret = make(f, 1, 3600, NULL, NULL);

        for (size_t i = 0; i < ELEMENTSOF(bad); i++) {
                assert_int_equal(provision_check(f->p, bad[i], id, NULL, reason), -ENOKEY);
                assert_string_equal(reason, "provisioning token unknown");
                assert_int_equal(provision_consume(f->p, bad[i], "dev", id, NULL, reason), -ENOKEY);
                assert_string_equal(id, "untouched");
        }
        assert_int_equal(provision_check(f->p, NULL, id, NULL, reason), -ENOKEY);
        /* One digit changed is another token. */
        secret[10] = secret[10] == '0' ? '1' : '0';
        assert_int_equal(provision_check(f->p, secret, id, NULL, reason), -ENOKEY);
        clear_free(secret);
}

static void test_uses_max(void **state) {
        Fixture *f = *state;
        char id[PROVISION_ID_MAX + 1], reason[PROVISION_REASON_MAX];
        char *secret = make(f, 5, 3600, NULL, NULL);
        unsigned ok = 0;

        for (unsigned i = 0; i < 8; i++) {
                int r = provision_consume(f->p, secret, "dev", id, NULL, reason);

                if (r == 0)
                        ok++;
                else {
                        assert_int_equal(r, -EUSERS);
                        assert_string_equal(reason, "provisioning token used up (5 of 5 uses)");
                }
        }
        assert_int_equal(ok, 5);
        clear_free(secret);
}

static void test_revoke(void **state) {
        Fixture *f = *state;
        char id[PROVISION_ID_MAX + 1], reason[PROVISION_REASON_MAX];
        json_t *j = NULL;
        char *secret = make(f, 3, 3600, NULL, &j);
        char jid[PROVISION_ID_MAX + 1];

        snprintf(jid, sizeof(jid), "%s", json_string_value(json_object_get(j, "id")));
        json_decref(j);
        assert_int_equal(provision_consume(f->p, secret, "dev", id, NULL, reason), 0);
        assert_int_equal(provision_revoke(f->p, "prov-00000000", "token:x"), -ENOENT);
        assert_int_equal(provision_revoke(f->p, jid, "token:admin"), 0);
        assert_int_equal(provision_revoke(f->p, jid, "token:admin"), -EALREADY);
        memset(id, 0, sizeof(id));
        assert_int_equal(provision_consume(f->p, secret, "dev", id, NULL, reason), -EKEYREVOKED);
        assert_string_equal(reason, "provisioning token revoked");
        assert_string_equal(id, jid); /* known: the id says which */
        j = provision_get_json(f->p, jid);
        assert_string_equal(json_string_value(json_object_get(j, "state")), "revoked");
        assert_string_equal(json_string_value(json_object_get(j, "revoked_by")), "token:admin");
        assert_true(json_is_string(json_object_get(j, "revoked_at")));
        assert_int_equal(json_integer_value(json_object_get(j, "uses")), 1);
        json_decref(j);
        clear_free(secret);
}

static void test_expiry(void **state) {
        Fixture *f = *state;
        char id[PROVISION_ID_MAX + 1], reason[PROVISION_REASON_MAX];
        char *secret = make(f, 3, 3600, NULL, NULL);
        json_t *a;

        assert_int_equal(provision_check(f->p, secret, id, NULL, reason), 0);
        /* Time passes: the row says it expired a second ago. */
        assert_int_equal(sqlite3_exec(store_db(f->store),
                                      "UPDATE provision_tokens SET expires_at = strftime('%s','now') - 1", NULL, NULL,
                                      NULL),
                         SQLITE_OK);
        assert_int_equal(provision_check(f->p, secret, id, NULL, reason), -EKEYEXPIRED);
        assert_string_equal(reason, "provisioning token expired");
        assert_int_equal(provision_consume(f->p, secret, "dev", id, NULL, reason), -EKEYEXPIRED);
        a = provision_to_json(f->p);
        assert_int_equal(json_array_size(a), 1);
        assert_string_equal(json_string_value(json_object_get(json_array_get(a, 0), "state")), "expired");
        assert_int_equal(json_integer_value(json_object_get(json_array_get(a, 0), "uses")), 0);
        json_decref(a);
        clear_free(secret);
}

static void test_spec_limits(void **state) {
        Fixture *f = *state;
        int64_t now = (int64_t)time(NULL);
        char *secret = NULL;
        json_t *j = NULL, *tags = json_object();
        ProvisionSpec ok = { .name = "", .uses_max = 1, .expires_at = now + 60 }, s;

        s = ok, s.uses_max = 0;
        assert_int_equal(provision_create(f->p, &s, &secret, &j), -EINVAL);
        s = ok, s.uses_max = PROVISION_USES_MAX + 1;
        assert_int_equal(provision_create(f->p, &s, &secret, &j), -EINVAL);
        s = ok, s.expires_at = now - 1;
        assert_int_equal(provision_create(f->p, &s, &secret, &j), -EINVAL);
        s = ok, s.expires_at = now + PROVISION_LIFETIME_MAX + 10;
        assert_int_equal(provision_create(f->p, &s, &secret, &j), -EINVAL);
        s = ok, s.name = "line\nbreak";
        assert_int_equal(provision_create(f->p, &s, &secret, &j), -EINVAL);
        json_object_set_new(tags, "bad key", json_string("x"));
        s = ok, s.tags = tags;
        assert_int_equal(provision_create(f->p, &s, &secret, &j), -EINVAL);
        assert_null(secret);
        assert_null(j);
        json_decref(tags);
        j = provision_to_json(f->p);
        assert_int_equal(json_array_size(j), 0);
        json_decref(j);
}

static void test_tags_check(void **state) {
        char err[PROVISION_REASON_MAX], key[80], value[300];
        json_t *t;

        assert_int_equal(provision_tags_check(NULL, err), 0);
        t = json_pack("{s:s, s:s, s:s}", "site", "berlin", "a.b-c_D9", "", "unicode", "Zürich");
        assert_int_equal(provision_tags_check(t, err), 0);
        json_decref(t);

        t = json_string("site=berlin");
        assert_int_equal(provision_tags_check(t, err), -EINVAL);
        assert_non_null(strstr(err, "JSON object"));
        json_decref(t);
        t = json_pack("{s:i}", "site", 3);
        assert_int_equal(provision_tags_check(t, err), -EINVAL);
        assert_non_null(strstr(err, "must be a string"));
        json_decref(t);
        t = json_pack("{s:s}", "", "x");
        assert_int_equal(provision_tags_check(t, err), -EINVAL);
        assert_non_null(strstr(err, "[A-Za-z0-9_.-]{1,64}"));
        json_decref(t);
        t = json_pack("{s:s}", "a/b", "x");
        assert_int_equal(provision_tags_check(t, err), -EINVAL);
        json_decref(t);
        memset(key, 'k', 65);
        key[65] = 0;
        t = json_pack("{s:s}", key, "x");
        assert_int_equal(provision_tags_check(t, err), -EINVAL);
        json_decref(t);
        key[64] = 0;
        t = json_pack("{s:s}", key, "x");
        assert_int_equal(provision_tags_check(t, err), 0);
        json_decref(t);
        memset(value, 'v', 257);
        value[257] = 0;
        t = json_pack("{s:s}", "k", value);
        assert_int_equal(provision_tags_check(t, err), -EINVAL);
        assert_non_null(strstr(err, "256 bytes"));
        json_decref(t);
        value[256] = 0;
        t = json_pack("{s:s}", "k", value);
        assert_int_equal(provision_tags_check(t, err), 0);
        json_decref(t);
        t = json_pack("{s:s}", "k", "a\x1b[31m");
        assert_int_equal(provision_tags_check(t, err), -EINVAL);
        assert_non_null(strstr(err, "control characters"));
        json_decref(t);
        t = json_pack("{s:s#}", "k", "a\0b", (int)3);
        assert_int_equal(provision_tags_check(t, err), -EINVAL);
        json_decref(t);
        t = json_object();
        for (unsigned i = 0; i <= PROVISION_TAGS_MAX; i++) {
                snprintf(key, sizeof(key), "t%u", i);
                json_object_set_new(t, key, json_string("v"));
        }
        assert_int_equal(provision_tags_check(t, err), -EINVAL);
        assert_non_null(strstr(err, "at most 32"));
        json_object_del(t, "t0");
        assert_int_equal(provision_tags_check(t, err), 0);
        json_decref(t);
}

/* Whether needle is anywhere in the file. */
static bool file_holds(const char *path, const char *needle) {
        _cleanup_fclose_ FILE *fp = fopen(path, "re");
        size_t n = strlen(needle), len = 0;
        _cleanup_free_ char *buf = NULL;
        char chunk[65536];
        size_t k;

        if (!fp)
                return false;
        while ((k = fread(chunk, 1, sizeof(chunk), fp)) > 0) {
                char *b = realloc(buf, len + k);

                assert_non_null(b);
                buf = b;
                memcpy(buf + len, chunk, k);
                len += k;
        }
        for (size_t i = 0; i + n <= len; i++)
                if (memcmp(buf + i, needle, n) == 0)
                        return true;
        return false;
}

static void test_digest_only_and_reload(void **state) {
        Fixture *f = *state;
        char id[PROVISION_ID_MAX + 1], reason[PROVISION_REASON_MAX], path[128];
        json_t *tags = json_pack("{s:s}", "fleet", "north"), *got = NULL, *before, *after;
        char *one = make(f, 2, 3600, tags, NULL), *two = make(f, 1, 7200, NULL, NULL);

        assert_int_equal(provision_consume(f->p, one, "dev-a", id, NULL, reason), 0);
        before = provision_to_json(f->p);
        assert_int_equal(json_array_size(before), 2);
        fixture_close(f);

        /* Neither the token nor its random part is in the files. */
        for (const char *const *n = (const char *const[]){ "cloud.db", "cloud.db-wal", NULL }; *n; n++) {
                snprintf(path, sizeof(path), "%s/%s", f->dir, *n);
                assert_false(file_holds(path, one));
                assert_false(file_holds(path, one + 6));
                assert_false(file_holds(path, two + 6));
        }
        snprintf(path, sizeof(path), "%s/cloud.db", f->dir);
        assert_true(file_holds(path, "fleet")); /* the search itself works */

        fixture_open(f);
        after = provision_to_json(f->p);
        assert_true(json_equal(before, after));
        assert_int_equal(provision_consume(f->p, one, "dev-b", id, &got, reason), 0);
        assert_true(json_equal(got, tags));
        json_decref(got);
        assert_int_equal(provision_consume(f->p, one, "dev-c", id, NULL, reason), -EUSERS);
        assert_string_equal(reason, "provisioning token used up (2 of 2 uses)");
        assert_int_equal(provision_check(f->p, two, id, NULL, reason), 0);
        json_decref(before);
        json_decref(after);
        json_decref(tags);
        clear_free(one);
        clear_free(two);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test_setup_teardown(test_create_check_consume, setup, teardown),
                cmocka_unit_test_setup_teardown(test_unknown, setup, teardown),
                cmocka_unit_test_setup_teardown(test_uses_max, setup, teardown),
                cmocka_unit_test_setup_teardown(test_revoke, setup, teardown),
                cmocka_unit_test_setup_teardown(test_expiry, setup, teardown),
                cmocka_unit_test_setup_teardown(test_spec_limits, setup, teardown),
                cmocka_unit_test(test_tags_check),
                cmocka_unit_test_setup_teardown(test_digest_only_and_reload, setup, teardown),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
