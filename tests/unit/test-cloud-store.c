/* SPDX-License-Identifier: Apache-2.0 */
/* Unit tests for the cloud's database (cloud/store.c): schema steps run
 * once and in order, a database from a newer program is left alone, the
 * audit log keeps and filters what was written, and what is batched is on
 * disk after a commit or a close. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdlib.h>
#include <unistd.h>

#include "cloud/store.h"
#include "lib/util.h"

typedef struct Fixture {
        char dir[64];
        sd_event *event;
} Fixture;

static int setup(void **state) {
        Fixture *f = calloc(1, sizeof(*f));

        assert_non_null(f);
        snprintf(f->dir, sizeof(f->dir), "/tmp/test-cloud-store-XXXXXX");
        assert_non_null(mkdtemp(f->dir));
        assert_int_equal(sd_event_new(&f->event), 0);
        *state = f;
        return 0;
}

static int teardown(void **state) {
        Fixture *f = *state;
        char path[128];

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

static int64_t count(Store *s, const char *sql) {
        sqlite3_stmt *st = NULL;
        int64_t n = -1;

        assert_int_equal(sqlite3_prepare_v2(store_db(s), sql, -1, &st, NULL), SQLITE_OK);
        if (sqlite3_step(st) == SQLITE_ROW)
                n = sqlite3_column_int64(st, 0);
        sqlite3_finalize(st);
        return n;
}

static void test_migrate(void **state) {
        Fixture *f = *state;
        const char *const v1[] = { "CREATE TABLE t (a INTEGER)", "INSERT INTO t VALUES (1)" };
        const char *const v2[] = { "CREATE TABLE t (a INTEGER)", "INSERT INTO t VALUES (1)",
                                   "INSERT INTO t VALUES (2)" };
        const char *const bad[] = { "CREATE TABLE t (a INTEGER)", "INSERT INTO t VALUES (1)",
                                    "INSERT INTO t VALUES (2)", "INSERT INTO nowhere VALUES (3)" };
        Store *s = NULL;

        assert_int_equal(store_open(f->event, f->dir, &s), 0);
        assert_int_equal(store_migrate(s, "test", v1, ELEMENTSOF(v1)), 0);
        assert_int_equal(store_migrate(s, "test", v1, ELEMENTSOF(v1)), 0);
        assert_int_equal(count(s, "SELECT count(*) FROM t"), 1);
        s = store_free(s);

        /* Reopened: only the new step runs. */
        assert_int_equal(store_open(f->event, f->dir, &s), 0);
        assert_int_equal(store_migrate(s, "test", v2, ELEMENTSOF(v2)), 0);
        assert_int_equal(count(s, "SELECT sum(a) FROM t"), 3);
        /* A failing step changes nothing and is not recorded. */
        assert_int_equal(store_migrate(s, "test", bad, ELEMENTSOF(bad)), -EIO);
        assert_int_equal(count(s, "SELECT version FROM schema WHERE component = 'test'"), 3);
        /* A program that knows fewer steps than ran refuses the tables. */
        assert_int_equal(store_migrate(s, "test", v1, ELEMENTSOF(v1)), -EPROTO);
        assert_int_equal(count(s, "SELECT sum(a) FROM t"), 3);
        store_free(s);
}

static void test_batch(void **state) {
        Fixture *f = *state;
        const char *const v1[] = { "CREATE TABLE t (a INTEGER)" };
        Store *s = NULL, *other = NULL;

        assert_int_equal(store_open(f->event, f->dir, &s), 0);
        assert_int_equal(store_migrate(s, "test", v1, 1), 0);
        assert_int_equal(store_batch(s), 0);
        assert_int_equal(store_batch(s), 0);
        assert_int_equal(sqlite3_exec(store_db(s), "INSERT INTO t VALUES (7)", NULL, NULL, NULL), SQLITE_OK);
        /* Another connection does not see the open batch. */
        assert_int_equal(store_open(f->event, f->dir, &other), 0);
        assert_int_equal(count(other, "SELECT count(*) FROM t"), 0);
        /* The batch timer commits it. */
        while (count(other, "SELECT count(*) FROM t") == 0)
                assert_true(sd_event_run(f->event, 5 * 1000000ULL) > 0);
        assert_int_equal(store_batch(s), 0);
        assert_int_equal(sqlite3_exec(store_db(s), "INSERT INTO t VALUES (8)", NULL, NULL, NULL), SQLITE_OK);
        assert_int_equal(store_commit(s), 0);
        assert_int_equal(count(other, "SELECT count(*) FROM t"), 2);
        /* Closing commits what is batched. */
        assert_int_equal(store_batch(s), 0);
        assert_int_equal(sqlite3_exec(store_db(s), "INSERT INTO t VALUES (9)", NULL, NULL, NULL), SQLITE_OK);
        store_free(s);
        assert_int_equal(count(other, "SELECT count(*) FROM t"), 3);
        store_free(other);
}

static void test_audit(void **state) {
        Fixture *f = *state;
        json_t *a = NULL, *detail = json_pack("{s:s, s:i}", "reason", "stolen", "status", 200);
        Store *s = NULL;

        assert_int_equal(store_open(f->event, f->dir, &s), 0);
        assert_int_equal(store_audit(s, "token:admin", "device.revoke", "gw1", detail, "127.0.0.1"), 0);
        assert_int_equal(store_audit(s, "token:ops", "device.unrevoke", "gw1", NULL, NULL), 0);
        assert_int_equal(store_audit(s, "token:ops", "token.create", "t2", NULL, "::1"), 0);
        assert_int_equal(store_audit(s, "cloud", "device%", "gw2", NULL, NULL), 0);
        json_decref(detail);
        s = store_free(s);

        assert_int_equal(store_open(f->event, f->dir, &s), 0);
        assert_int_equal(store_audit_query(s, 0, 100, NULL, NULL, &a), 0);
        assert_int_equal(json_array_size(a), 4);
        assert_string_equal(json_string_value(json_object_get(json_array_get(a, 0), "actor")), "token:admin");
        assert_string_equal(json_string_value(json_object_get(json_object_get(json_array_get(a, 0), "detail"),
                                                              "reason")),
                            "stolen");
        assert_true(json_is_null(json_object_get(json_array_get(a, 1), "address")));
        json_decref(a);

        assert_int_equal(store_audit_query(s, 0, 100, "device.", NULL, &a), 0);
        assert_int_equal(json_array_size(a), 2);
        json_decref(a);
        /* '%' in the prefix is a character, not a LIKE pattern. */
        assert_int_equal(store_audit_query(s, 0, 100, "device%", NULL, &a), 0);
        assert_int_equal(json_array_size(a), 1);
        json_decref(a);
        assert_int_equal(store_audit_query(s, 0, 100, NULL, "gw1", &a), 0);
        assert_int_equal(json_array_size(a), 2);
        json_decref(a);
        /* Paging by id. */
        assert_int_equal(store_audit_query(s, 2, 1, NULL, NULL, &a), 0);
        assert_int_equal(json_array_size(a), 1);
        assert_int_equal(json_integer_value(json_object_get(json_array_get(a, 0), "id")), 3);
        json_decref(a);
        store_free(s);
}

static void test_audit_retention(void **state) {
        Fixture *f = *state;
        json_t *a = NULL;
        Store *s = NULL;

        assert_int_equal(store_open(f->event, f->dir, &s), 0);
        for (int i = 0; i < 25; i++)
                assert_int_equal(store_audit(s, "token:t", "device.call", "gw1", NULL, NULL), 0);
        /* No limits: nothing goes. */
        store_audit_set_retention(s, 0, 0);
        assert_int_equal(store_audit_prune(s), 0);
        /* The newest 10 stay. */
        store_audit_set_retention(s, 10, 0);
        assert_int_equal(store_audit_prune(s), 15);
        assert_int_equal(store_audit_query(s, 0, 100, NULL, NULL, &a), 0);
        assert_int_equal(json_array_size(a), 10);
        assert_int_equal(json_integer_value(json_object_get(json_array_get(a, 0), "id")), 16);
        json_decref(a);
        /* By age: a record from 1970 goes, today's stay. */
        assert_int_equal(sqlite3_exec(store_db(s), "UPDATE audit SET time_usec = 1 WHERE id = 16", NULL, NULL, NULL),
                         SQLITE_OK);
        store_audit_set_retention(s, 0, 1);
        assert_int_equal(store_audit_prune(s), 1);
        assert_int_equal(count(s, "SELECT count(*) FROM audit"), 9);
        store_free(s);
}

static void test_unwritable(void **state) {
        Store *s = NULL;

        assert_int_equal(store_open(((Fixture *)*state)->event, "/nonexistent/dir", &s), -EIO);
        assert_null(s);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test_setup_teardown(test_migrate, setup, teardown),
                cmocka_unit_test_setup_teardown(test_batch, setup, teardown),
                cmocka_unit_test_setup_teardown(test_audit, setup, teardown),
                cmocka_unit_test_setup_teardown(test_audit_retention, setup, teardown),
                cmocka_unit_test_setup_teardown(test_unwritable, setup, teardown),
        };
        return cmocka_run_group_tests(tests, NULL, NULL);
}
