/* SPDX-License-Identifier: Apache-2.0 */
/* Unit tests for the registry's reader for other threads (cloud/registry.c,
 * RegistryReader): it decides as registry_check() does on what is
 * committed (registration under Registration=enrolled, revocation with
 * its reason, unrevocation, a superseded certificate once the batch is
 * committed), and it can run on another thread while the loop's thread
 * writes. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cloud/registry.h"
#include "cloud/store.h"
#include "lib/util.h"

typedef struct Fixture {
        char dir[64];
        sd_event *event;
        Store *store;
        Registry *reg;
} Fixture;

static void hook_revoked(void *u, const char *id, const char *reason, const char *actor) {
        (void)u;
        (void)id;
        (void)reason;
        (void)actor;
}

static void hook_unrevoked(void *u, const char *id, const char *actor) {
        (void)u;
        (void)id;
        (void)actor;
}

static void hook_added(void *u, const char *id) {
        (void)u;
        (void)id;
}

static void hook_updated(void *u, const char *id, json_t *changed, const char *actor) {
        (void)u;
        (void)id;
        (void)changed;
        (void)actor;
}

static int setup(void **state) {
        Fixture *f = calloc(1, sizeof(*f));
        RegistryHooks hooks = {
                .revoked = hook_revoked,
                .unrevoked = hook_unrevoked,
                .added = hook_added,
                .updated = hook_updated,
        };

        assert_non_null(f);
        snprintf(f->dir, sizeof(f->dir), "/tmp/test-cloud-registry-XXXXXX");
        assert_non_null(mkdtemp(f->dir));
        assert_int_equal(sd_event_new(&f->event), 0);
        assert_int_equal(store_open(f->event, f->dir, &f->store), 0);
        assert_int_equal(registry_new(f->store, REGISTRY_ENROLLED, &hooks, &f->reg), 0);
        *state = f;
        return 0;
}

static int teardown(void **state) {
        Fixture *f = *state;
        char path[128];

        registry_free(f->reg);
        store_free(f->store);
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

static TlsPeer peer(const char *id, int64_t not_before) {
        TlsPeer p = { .not_before = not_before, .not_after = not_before + 86400 };

        snprintf(p.id, sizeof(p.id), "%s", id);
        return p;
}

static void test_reader_decides_as_check(void **state) {
        Fixture *f = *state;
        RegistryReader *rd = NULL;
        TlsPeer p = peer("dev-one", 1000), newer = peer("dev-one", 2000);
        char reason[192] = "";

        assert_int_equal(registry_reader_new(f->reg, &rd), 0);
        /* Registration=enrolled: unknown is refused. */
        assert_int_equal(registry_reader_check(rd, &p, reason, sizeof(reason)), -EPERM);
        assert_non_null(strstr(reason, "not registered"));
        assert_int_equal(registry_register(f->reg, "dev-one", "test", NULL), 0);
        assert_int_equal(registry_reader_check(rd, &p, reason, sizeof(reason)), 0);

        /* Revoked: refused with the reason, at once (committed). */
        assert_int_equal(registry_revoke(f->reg, "dev-one", "stolen", "test", NULL), 0);
        reason[0] = 0;
        assert_int_equal(registry_reader_check(rd, &p, reason, sizeof(reason)), -EPERM);
        assert_non_null(strstr(reason, "is revoked (stolen)"));
        assert_int_equal(registry_check(f->reg, &p, reason, sizeof(reason)), -EPERM);
        assert_int_equal(registry_unrevoke(f->reg, "dev-one", "test", NULL), 0);
        assert_int_equal(registry_reader_check(rd, &p, reason, sizeof(reason)), 0);

        /* A connection with a newer certificate is batched: the loop's
         * check sees it at once, the reader once it is committed. */
        assert_int_equal(registry_connected(f->reg, &newer, "127.0.0.1"), 0);
        assert_int_equal(registry_check(f->reg, &p, reason, sizeof(reason)), -EPERM);
        assert_int_equal(store_commit(f->store), 0);
        reason[0] = 0;
        assert_int_equal(registry_reader_check(rd, &p, reason, sizeof(reason)), -EPERM);
        assert_non_null(strstr(reason, "superseded"));
        assert_int_equal(registry_reader_check(rd, &newer, reason, sizeof(reason)), 0);
        registry_reader_free(rd);
}

typedef struct Reading {
        Registry *reg;
        int checks, refused, errors;
} Reading;

static void *reading_thread(void *arg) {
        Reading *r = arg;
        RegistryReader *rd = NULL;
        TlsPeer p = peer("dev-two", 1000);
        char reason[192];

        if (registry_reader_new(r->reg, &rd) < 0) {
                r->errors++;
                return NULL;
        }
        for (int i = 0; i < 2000; i++) {
                int k = registry_reader_check(rd, &p, reason, sizeof(reason));

                r->checks++;
                if (k == -EPERM)
                        r->refused++;
                else if (k != 0)
                        r->errors++;
        }
        registry_reader_free(rd);
        return NULL;
}

static void test_reader_on_another_thread(void **state) {
        Fixture *f = *state;
        Reading r = { .reg = f->reg };
        pthread_t t;

        assert_int_equal(registry_register(f->reg, "dev-two", "test", NULL), 0);
        assert_int_equal(pthread_create(&t, NULL, reading_thread, &r), 0);
        for (int i = 0; i < 50; i++) {
                assert_int_equal(registry_revoke(f->reg, "dev-two", "flapping", "test", NULL), 0);
                assert_int_equal(registry_unrevoke(f->reg, "dev-two", "test", NULL), 0);
        }
        assert_int_equal(pthread_join(t, NULL), 0);
        assert_int_equal(r.errors, 0);
        assert_int_equal(r.checks, 2000);
        assert_in_range(r.refused, 0, r.checks);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test_setup_teardown(test_reader_decides_as_check, setup, teardown),
                cmocka_unit_test_setup_teardown(test_reader_on_another_thread, setup, teardown),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
