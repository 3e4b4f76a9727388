/* SPDX-License-Identifier: Apache-2.0 */
/* Unit tests for the cluster's replicated state (cloud/replica.c) against a
 * real nats-server (standalone, JetStream, random loopback port): several
 * Stores, each with its Bus and Replica, on one sd-event loop, stand for
 * the nodes. A change committed on one node shows on the others (and is
 * reported through ReplicaHooks.applied there, not on the node that made
 * it); concurrent changes of different columns of one row both survive;
 * concurrent changes of the same column end the same on every node (the
 * stream's order decides); two nodes inserting the same row concurrently
 * keep the values of both (a NULL of the later insert is no value); what is applied is not published again; a
 * fresh node replaying the stream holds the same rows; a node with rows
 * from before it joined exports them (and they replace the cluster's of
 * the same key, on every node); a changeset whose acknowledgement was lost (the Replica freed
 * with it in flight) is published again from the outbox and stored once;
 * changesets touching other tables are ignored; a batch larger than a
 * changeset may be is committed in parts; a changeset that cannot be
 * applied for a while (the database locked) is applied later, nothing
 * after it first. Exits 77 without
 * nats-server. */
/* The session extension's declarations, for a changeset made by hand. */
#define SQLITE_ENABLE_SESSION 1
#define SQLITE_ENABLE_PREUPDATE_HOOK 1
#include <sqlite3.h>

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cloud/replica.h"
#include "lib/util.h"
#include "nats-test.h"

static NatsServer server = { .pid = -1 };
static char server_url[64];
static double time_factor = 3;

static uint64_t usec(double seconds) {
        return (uint64_t)(seconds * time_factor * 1e6);
}

static int group_setup(void **state _unused_) {
        const char *tf = getenv("TETHER_TEST_TIME_FACTOR");

        if (tf && atof(tf) >= 0.1)
                time_factor = atof(tf);
        assert_int_equal(nats_server_new(&server, "test-cloud-replica", usec(10)), 0);
        snprintf(server_url, sizeof(server_url), "nats://127.0.0.1:%d", server.port);
        return 0;
}

static int group_teardown(void **state _unused_) {
        nats_server_free(&server);
        return 0;
}

/* ---- nodes -------------------------------------------------------------------- */

#define NODES 4

typedef struct Node {
        char name[8];
        char dir[64];
        Store *store;
        Bus *bus;
        Replica *replica;
        unsigned applied; /* ReplicaHooks.applied calls */
        char last_table[32], last_key[64];
        ReplicaOp last_op;
} Node;

typedef struct Fixture {
        sd_event *event;
        Bus *admin; /* for the stream's state */
        Node node[NODES];
} Fixture;

/* The replicated tables, as the modules would make them (their names,
 * a text primary key; the columns are the test's). */
static const char *const test_schema[] = {
        "CREATE TABLE devices (id TEXT PRIMARY KEY NOT NULL, a TEXT, b TEXT, n INTEGER);"
        "CREATE TABLE tokens (id TEXT PRIMARY KEY, revoked INTEGER);"
        "CREATE TABLE provision_tokens (id TEXT PRIMARY KEY, uses INTEGER NOT NULL DEFAULT 0);"
        "CREATE TABLE ota_jobs (id TEXT PRIMARY KEY NOT NULL, state TEXT);"
        "CREATE TABLE webhooks (name TEXT PRIMARY KEY, url TEXT);"
        "CREATE TABLE campaign_devices (campaign TEXT NOT NULL, idx INTEGER NOT NULL, state TEXT, PRIMARY KEY (campaign, idx));"
        "CREATE TABLE campaigns (id TEXT PRIMARY KEY NOT NULL, state TEXT);"
        "CREATE TABLE local_only (id TEXT PRIMARY KEY, v TEXT);",
};

static void on_applied(void *userdata, const char *table, ReplicaOp op, const char *key) {
        Node *n = userdata;

        n->applied++;
        n->last_op = op;
        snprintf(n->last_table, sizeof(n->last_table), "%s", table);
        snprintf(n->last_key, sizeof(n->last_key), "%s", key);
}

static void node_open_store(Fixture *f, unsigned i) {
        Node *n = &f->node[i];

        if (!n->dir[0]) {
                snprintf(n->name, sizeof(n->name), "n%u", i + 1);
                snprintf(n->dir, sizeof(n->dir), "/tmp/test-cloud-replica-n%u-XXXXXX", i + 1);
                assert_non_null(mkdtemp(n->dir));
        }
        assert_int_equal(store_open(f->event, n->dir, &n->store), 0);
        assert_int_equal(store_migrate(n->store, "test", test_schema, ELEMENTSOF(test_schema)), 0);
}

static void node_start_replica(Fixture *f, unsigned i) {
        Node *n = &f->node[i];
        BusConfig c = { .servers = server_url, .name = n->name };

        if (!n->bus)
                assert_int_equal(bus_new(f->event, &c, NULL, &n->bus), 0);
        assert_int_equal(replica_new(f->event, n->store, n->bus, n->name, 1,
                                     &(ReplicaHooks){ .userdata = n, .applied = on_applied }, &n->replica),
                         0);
}

static void node_start(Fixture *f, unsigned i) {
        node_open_store(f, i);
        node_start_replica(f, i);
}

static void node_stop(Node *n) {
        n->replica = replica_free(n->replica);
        n->store = store_free(n->store);
        n->bus = bus_free(n->bus);
}

static int setup(void **state) {
        Fixture *f = calloc(1, sizeof(*f));
        BusConfig c = { .servers = server_url, .name = "admin" };
        jsErrCode jerr = 0;

        assert_non_null(f);
        assert_int_equal(sd_event_new(&f->event), 0);
        assert_int_equal(bus_new(f->event, &c, NULL, &f->admin), 0);
        /* Every test starts with no stream. */
        (void)js_DeleteStream(bus_js(f->admin), REPLICA_STREAM, NULL, &jerr);
        *state = f;
        return 0;
}

static int teardown(void **state) {
        Fixture *f = *state;
        char cmd[128];

        for (unsigned i = 0; i < NODES; i++) {
                node_stop(&f->node[i]);
                if (f->node[i].dir[0] && !getenv("TETHER_TEST_KEEP")) {
                        snprintf(cmd, sizeof(cmd), "rm -rf '%s'", f->node[i].dir);
                        (void)!system(cmd);
                }
        }
        bus_free(f->admin);
        sd_event_unref(f->event);
        free(f);
        return 0;
}

static uint64_t stream_last_seq(Fixture *f) {
        jsStreamInfo *si = NULL;
        jsErrCode jerr = 0;
        uint64_t last;

        assert_int_equal(js_GetStreamInfo(&si, bus_js(f->admin), REPLICA_STREAM, NULL, &jerr), NATS_OK);
        last = si->State.LastSeq;
        jsStreamInfo_Destroy(si);
        return last;
}

static uint64_t queued(Node *n) {
        ReplicaStats s;

        replica_stats(n->replica, &s);
        return s.queued;
}

/* Run the loop until every running node published what it queued and
 * applied the whole stream, and the stream stays so for a moment. */
static void settle(Fixture *f) {
        uint64_t deadline = now_usec() + usec(10);

        for (;;) {
                bool done = true;
                uint64_t last = stream_last_seq(f);

                for (unsigned i = 0; i < NODES; i++) {
                        Node *n = &f->node[i];
                        ReplicaStats s;

                        if (!n->replica)
                                continue;
                        replica_stats(n->replica, &s);
                        done = done && s.queued == 0 && s.applied_seq == last;
                }
                if (done && stream_last_seq(f) == last)
                        return;
                assert_true(now_usec() < deadline);
                assert_true(sd_event_run(f->event, 50 * 1000) >= 0);
        }
}

/* Run the loop until the stream holds seq messages. */
static void wait_stream(Fixture *f, uint64_t seq) {
        uint64_t deadline = now_usec() + usec(10);

        while (stream_last_seq(f) < seq) {
                assert_true(now_usec() < deadline);
                assert_true(sd_event_run(f->event, 20 * 1000) >= 0);
        }
}

static void exec(Node *n, const char *sql) {
        assert_int_equal(store_batch(n->store), 0);
        assert_int_equal(sqlite3_exec(store_db(n->store), sql, NULL, NULL, NULL), SQLITE_OK);
}

static void commit(Node *n, const char *sql) {
        exec(n, sql);
        assert_int_equal(store_commit(n->store), 0);
}

/* The rows of a query as one string ("a|b;c|d;"). */
static char *dump(Node *n, const char *sql) {
        sqlite3_stmt *st = NULL;
        char *buf = NULL;
        size_t size = 0;
        FILE *out = open_memstream(&buf, &size);

        assert_non_null(out);
        assert_int_equal(sqlite3_prepare_v2(store_db(n->store), sql, -1, &st, NULL), SQLITE_OK);
        while (sqlite3_step(st) == SQLITE_ROW) {
                for (int i = 0; i < sqlite3_column_count(st); i++)
                        fprintf(out, "%s%s", i ? "|" : "", (const char *)sqlite3_column_text(st, i) ?: "NULL");
                fputc(';', out);
        }
        sqlite3_finalize(st);
        fclose(out);
        return buf;
}

#define ALL_DEVICES "SELECT id, a, b, n FROM devices ORDER BY id"

static void assert_dump(Node *n, const char *sql, const char *want) {
        _cleanup_free_ char *got = dump(n, sql);

        assert_string_equal(got, want);
}

/* ---- tests -------------------------------------------------------------------- */

static void test_change_shows_elsewhere(void **state) {
        Fixture *f = *state;
        Node *a = &f->node[0], *b = &f->node[1];

        node_start(f, 0);
        node_start(f, 1);
        assert_true(replica_ready(a->replica));
        commit(a, "INSERT INTO devices (id, a, n) VALUES ('d1', 'x', 1)");
        /* A table that is not replicated stays here. */
        commit(a, "INSERT INTO local_only (id, v) VALUES ('l1', 'v')");
        settle(f);
        assert_dump(b, ALL_DEVICES, "d1|x|NULL|1;");
        assert_dump(b, "SELECT count(*) FROM local_only", "0;");
        assert_int_equal(b->applied, 1);
        assert_string_equal(b->last_table, "devices");
        assert_string_equal(b->last_key, "d1");
        assert_int_equal(b->last_op, REPLICA_INSERT);
        /* Its own change coming back is not news to a. */
        assert_int_equal(a->applied, 0);
        /* One changeset in the stream: what b applied was not published again. */
        assert_int_equal(stream_last_seq(f), 1);

        commit(b, "UPDATE devices SET b = 'y' WHERE id = 'd1'");
        commit(b, "INSERT INTO tokens (id, revoked) VALUES ('t1', NULL)");
        commit(b, "UPDATE tokens SET revoked = 42 WHERE id = 't1'");
        commit(b, "INSERT INTO provision_tokens (id) VALUES ('p1')");
        commit(b, "DELETE FROM provision_tokens WHERE id = 'p1'");
        commit(b, "INSERT INTO ota_jobs (id, state) VALUES ('j1', 'sent')");
        commit(b, "UPDATE ota_jobs SET state = 'done' WHERE id = 'j1'");
        settle(f);
        assert_int_equal(stream_last_seq(f), 8);
        assert_dump(a, "SELECT id, state FROM ota_jobs", "j1|done;");
        assert_int_equal(a->applied, 7);
        commit(b, "DELETE FROM provision_tokens WHERE id = 'none'"); /* nothing changed: nothing published */
        commit(b, "UPDATE tokens SET revoked = 42 WHERE id = 't1'");
        commit(b, "INSERT INTO provision_tokens (id) VALUES ('p2')");
        commit(b, "DELETE FROM provision_tokens WHERE id = 'p2'");
        settle(f);
        assert_int_equal(stream_last_seq(f), 10);
        assert_dump(a, ALL_DEVICES, "d1|x|y|1;");
        assert_dump(a, "SELECT id, revoked FROM tokens", "t1|42;");
        assert_dump(a, "SELECT count(*) FROM provision_tokens", "0;");
        assert_int_equal(a->applied, 9);
        assert_string_equal(a->last_table, "provision_tokens");
        assert_int_equal(a->last_op, REPLICA_DELETE);

        /* Batched writes: one changeset per commit of the batch. */
        exec(a, "INSERT INTO devices (id, n) VALUES ('d2', 2)");
        exec(a, "INSERT INTO devices (id, n) VALUES ('d3', 3)");
        exec(a, "UPDATE devices SET n = 33 WHERE id = 'd3'");
        wait_stream(f, 11); /* the batch timer commits */
        settle(f);
        assert_int_equal(stream_last_seq(f), 11);
        assert_dump(b, ALL_DEVICES, "d1|x|y|1;d2|NULL|NULL|2;d3|NULL|NULL|33;");

        /* A batch that grows past the changeset limit is committed early:
         * several changesets, each within NATS's max_payload. */
        for (unsigned i = 0; i < 400; i++) {
                char sql[128];

                snprintf(sql, sizeof(sql), "INSERT INTO devices (id, a) VALUES ('big%u', hex(randomblob(512)))", i);
                exec(a, sql);
        }
        assert_int_equal(store_commit(a->store), 0);
        settle(f);
        assert_true(stream_last_seq(f) >= 13);
        assert_dump(b, "SELECT count(*) FROM devices WHERE id LIKE 'big%'", "400;");
}

static void test_concurrent(void **state) {
        Fixture *f = *state;
        Node *a = &f->node[0], *b = &f->node[1];
        _cleanup_free_ char *da = NULL, *db = NULL;

        node_start(f, 0);
        node_start(f, 1);
        commit(a, "INSERT INTO devices (id, a, b, n) VALUES ('d1', 'a0', 'b0', 0)");
        settle(f);

        /* Different columns of one row, neither node having seen the
         * other's change: both survive everywhere. */
        commit(a, "UPDATE devices SET a = 'a1' WHERE id = 'd1'");
        commit(b, "UPDATE devices SET b = 'b1' WHERE id = 'd1'");
        settle(f);
        assert_dump(a, ALL_DEVICES, "d1|a1|b1|0;");
        assert_dump(b, ALL_DEVICES, "d1|a1|b1|0;");

        /* The same column: whichever is later in the stream wins, on both. */
        commit(a, "UPDATE devices SET n = 1, a = 'a2' WHERE id = 'd1'");
        commit(b, "UPDATE devices SET n = 2 WHERE id = 'd1'");
        settle(f);
        da = dump(a, ALL_DEVICES);
        db = dump(b, ALL_DEVICES);
        assert_string_equal(da, db);
        /* a's other column survives whatever the order. */
        assert_non_null(strstr(da, "|a2|"));

        /* The same new row on both: one of them, the same everywhere. */
        commit(b, "INSERT INTO tokens (id, revoked) VALUES ('t1', 2)");
        commit(a, "INSERT INTO tokens (id, revoked) VALUES ('t1', 1)");
        /* An update of a row the other deletes. */
        commit(a, "DELETE FROM devices WHERE id = 'd1'");
        commit(b, "UPDATE devices SET b = 'b3' WHERE id = 'd1'");
        settle(f);
        free(da);
        free(db);
        da = dump(a, "SELECT id, revoked FROM tokens");
        db = dump(b, "SELECT id, revoked FROM tokens");
        assert_string_equal(da, db);
        assert_dump(a, ALL_DEVICES, "");
        assert_dump(b, ALL_DEVICES, "");
}

/* Wait, without running the loop, until the stream holds seq messages
 * (what a node published went out on libnats's threads). */
static void wait_stream_outside_loop(Fixture *f, uint64_t seq) {
        uint64_t deadline = now_usec() + usec(10);

        while (stream_last_seq(f) < seq) {
                struct timespec ts = { 0, 5 * 1000 * 1000 };

                assert_true(now_usec() < deadline);
                nanosleep(&ts, NULL); /* polling the stream's state: no event to wait for off the loop */
        }
}

/* Two nodes insert the same new row, neither having seen the other's: b's
 * (a device revoked by ID before b heard of it) is first in the stream, a's
 * (the device registering as it connects, written on a before b's arrived)
 * second. a's NULLs must not bring back what b's set, on either node: a
 * later INSERT of a row that exists sets the columns it has values for. */
static void test_concurrent_inserts(void **state) {
        Fixture *f = *state;
        Node *a = &f->node[0], *b = &f->node[1];

        node_start(f, 0);
        node_start(f, 1);
        /* a's row, in its open batch: not committed, not published. */
        exec(a, "INSERT INTO devices (id, a, n) VALUES ('d1', 'registered', 1)");
        /* b's, committed and published; in the stream before a commits. */
        commit(b, "INSERT INTO devices (id, b, n) VALUES ('d1', 'revoked', 2)");
        wait_stream_outside_loop(f, 1);
        /* a applies b's (committing its own batch first: a's changeset is
         * the stream's second), then its own comes back. */
        settle(f);
        assert_int_equal(stream_last_seq(f), 2);
        assert_dump(a, ALL_DEVICES, "d1|registered|revoked|1;");
        assert_dump(b, ALL_DEVICES, "d1|registered|revoked|1;");
        assert_int_equal(b->applied, 1);
        assert_int_equal(b->last_op, REPLICA_INSERT);

        /* The same the other way round: a's NULL b is not a value either. */
        exec(a, "INSERT INTO devices (id, a) VALUES ('d2', 'from-a')");
        commit(b, "INSERT INTO devices (id, b, n) VALUES ('d2', 'from-b', 7)");
        wait_stream_outside_loop(f, 3);
        settle(f);
        assert_dump(a, "SELECT id, a, b, n FROM devices WHERE id = 'd2'", "d2|from-a|from-b|7;");
        assert_dump(b, "SELECT id, a, b, n FROM devices WHERE id = 'd2'", "d2|from-a|from-b|7;");

        /* An UPDATE to NULL is a value: it clears the column everywhere. */
        commit(a, "UPDATE devices SET b = NULL WHERE id = 'd1'");
        settle(f);
        assert_dump(b, ALL_DEVICES, "d1|registered|NULL|1;d2|from-a|from-b|7;");
}

static void test_replay(void **state) {
        Fixture *f = *state;
        Node *a = &f->node[0], *b = &f->node[1], *c = &f->node[2];
        _cleanup_free_ char *da = NULL, *dc = NULL, *ta = NULL, *tc = NULL;

        node_start(f, 0);
        node_start(f, 1);
        for (unsigned i = 0; i < 20; i++) {
                char sql[256];

                snprintf(sql, sizeof(sql), "INSERT INTO devices (id, a, n) VALUES ('d%u', '%s', %u)", i,
                         i % 2 ? "odd" : "even", i);
                commit(i % 3 ? a : b, sql);
                if (i % 4 == 0) {
                        snprintf(sql, sizeof(sql), "UPDATE devices SET b = 'changed' WHERE id = 'd%u'", i / 2);
                        commit(i % 3 ? b : a, sql);
                }
        }
        commit(a, "INSERT INTO tokens (id, revoked) VALUES ('t1', NULL), ('t2', 7)");
        settle(f);
        commit(b, "DELETE FROM devices WHERE id = 'd5'");
        settle(f);

        /* A fresh node, started while the others go on. */
        node_start(f, 2);
        assert_false(replica_ready(c->replica));
        commit(a, "UPDATE devices SET n = 100 WHERE id = 'd1'");
        settle(f);
        assert_true(replica_ready(c->replica));
        da = dump(a, ALL_DEVICES);
        dc = dump(c, ALL_DEVICES);
        assert_string_equal(da, dc);
        ta = dump(a, "SELECT id, revoked FROM tokens ORDER BY id");
        tc = dump(c, "SELECT id, revoked FROM tokens ORDER BY id");
        assert_string_equal(ta, tc);
        assert_dump(c, "SELECT count(*) FROM devices", "19;");
        /* c published nothing: replaying is not changing. */
        assert_int_equal(c->replica ? queued(c) : 1, 0);

        /* A restart resumes where it was (nothing applied twice: the hook
         * sees only what is new). */
        node_stop(c);
        c->applied = 0;
        commit(b, "UPDATE devices SET a = 'after' WHERE id = 'd2'");
        node_start(f, 2);
        settle(f);
        assert_int_equal(c->applied, 1);
        assert_dump(c, "SELECT a FROM devices WHERE id = 'd2'", "after;");
}

static void test_export(void **state) {
        Fixture *f = *state;
        Node *a = &f->node[0], *b = &f->node[1], *c = &f->node[2];

        /* a was a single node with rows of its own; it becomes the first
         * node of the cluster. */
        node_open_store(f, 0);
        commit(a, "INSERT INTO devices (id, a) VALUES ('old1', 'a'), ('both', 'from-a')");
        commit(a, "INSERT INTO tokens (id, revoked) VALUES ('t-old', NULL)");
        node_start_replica(f, 0);
        node_start(f, 1);
        settle(f);
        assert_dump(b, "SELECT id, a FROM devices ORDER BY id", "both|from-a;old1|a;");
        assert_dump(b, "SELECT id FROM tokens", "t-old;");

        /* c had rows too and joins a running cluster: its rows are added,
         * and replace the cluster's of the same key, on every node. */
        node_open_store(f, 2);
        commit(c, "INSERT INTO devices (id, a) VALUES ('both', 'from-c'), ('old3', 'c')");
        node_start_replica(f, 2);
        settle(f);
        assert_dump(a, "SELECT id, a FROM devices ORDER BY id", "both|from-c;old1|a;old3|c;");
        assert_dump(b, "SELECT id, a FROM devices ORDER BY id", "both|from-c;old1|a;old3|c;");
        assert_dump(c, "SELECT id, a FROM devices ORDER BY id", "both|from-c;old1|a;old3|c;");
        assert_dump(c, "SELECT id FROM tokens", "t-old;");

        /* Exported once: a restart publishes nothing. */
        node_stop(a);
        uint64_t last = stream_last_seq(f);
        node_start(f, 0);
        settle(f);
        assert_int_equal(stream_last_seq(f), last);
}

static void test_republish(void **state) {
        Fixture *f = *state;
        Node *a = &f->node[0], *b = &f->node[1];

        node_start(f, 0);
        node_start(f, 1);
        /* Committed, handed to NATS, the acknowledgement not waited for:
         * still in the outbox. */
        commit(a, "INSERT INTO devices (id, a) VALUES ('d1', 'x')");
        assert_int_equal(queued(a), 1);
        a->replica = replica_free(a->replica);
        /* Committed with no Replica attached... */
        node_start_replica(f, 0);
        settle(f);
        /* ...published (again): stored once. */
        assert_int_equal(stream_last_seq(f), 1);
        assert_dump(b, ALL_DEVICES, "d1|x|NULL|NULL;");

        /* Freeing the Replica commits the open batch into the outbox. */
        exec(a, "INSERT INTO devices (id, a) VALUES ('d2', 'y')");
        a->replica = replica_free(a->replica);
        node_start_replica(f, 0);
        settle(f);
        assert_dump(b, "SELECT id FROM devices ORDER BY id", "d1;d2;");
}

static void test_foreign_tables(void **state) {
        Fixture *f = *state;
        Node *a = &f->node[0], *b = &f->node[1];
        sqlite3_session *s = NULL;
        void *data = NULL;
        int len = 0;
        const char *headers[] = { "Tether-Node", "evil", NULL };

        node_start(f, 0);
        node_start(f, 1);
        /* A changeset that touches tables that are not replicated (one of
         * them the Replica's own) and one that is, made on a database of
         * its own. */
        {
                sqlite3 *db = NULL;

                assert_int_equal(sqlite3_open(":memory:", &db), SQLITE_OK);
                assert_int_equal(sqlite3_exec(db,
                                              "CREATE TABLE local_only (id TEXT PRIMARY KEY, v TEXT);"
                                              "CREATE TABLE replica_state (id INTEGER PRIMARY KEY, "
                                              "stream_created_ns INTEGER, applied_seq INTEGER, incarnation TEXT);"
                                              "CREATE TABLE tokens (id TEXT PRIMARY KEY, revoked INTEGER);",
                                              NULL, NULL, NULL),
                                 SQLITE_OK);
                assert_int_equal(sqlite3session_create(db, "main", &s), SQLITE_OK);
                assert_int_equal(sqlite3session_attach(s, NULL), SQLITE_OK);
                assert_int_equal(sqlite3_exec(db,
                                              "INSERT INTO local_only (id, v) VALUES ('x', 'y');"
                                              "INSERT INTO replica_state VALUES (1, 0, 999, 'x');"
                                              "INSERT INTO tokens (id) VALUES ('ok');",
                                              NULL, NULL, NULL),
                                 SQLITE_OK);
                assert_int_equal(sqlite3session_changeset(s, &len, &data), SQLITE_OK);
                sqlite3session_delete(s);
                sqlite3_close(db);
        }
        assert_int_equal(bus_js_publish(f->admin, "tether.state.evil", headers, data, (size_t)len, usec(5), NULL,
                                        NULL),
                         0);
        sqlite3_free(data);
        /* Garbage is skipped, not a stop. */
        assert_int_equal(bus_js_publish(f->admin, "tether.state.evil", headers, "garbage", 7, usec(5), NULL, NULL),
                         0);
        commit(a, "INSERT INTO tokens (id) VALUES ('after')");
        {
                uint64_t deadline = now_usec() + usec(10);
                ReplicaStats st;

                do {
                        assert_true(now_usec() < deadline);
                        assert_true(sd_event_run(f->event, 50 * 1000) >= 0);
                        replica_stats(b->replica, &st);
                } while (st.applied_seq < 3);
                assert_int_equal(st.failed, 1);
        }
        assert_dump(b, "SELECT count(*) FROM local_only", "0;");
        assert_dump(b, "SELECT applied_seq FROM replica_state", "3;");
        assert_dump(b, "SELECT id FROM tokens ORDER BY id", "after;ok;");
}

/* A changeset that cannot be applied for a while (another connection
 * holds the database's write lock: SQLITE_BUSY) is not skipped: the node
 * stops, follows the stream again from it and applies it, and the ones
 * after it, once the lock is gone. */
static void test_apply_retried(void **state) {
        Fixture *f = *state;
        Node *a = &f->node[0], *b = &f->node[1];
        char path[128];
        sqlite3 *lock = NULL;
        ReplicaStats st;
        uint64_t deadline;

        node_start(f, 0);
        node_start(f, 1);
        commit(a, "INSERT INTO devices (id, a) VALUES ('d0', 'before')");
        settle(f);

        snprintf(path, sizeof(path), "%s/%s", b->dir, STORE_FILE);
        assert_int_equal(sqlite3_open(path, &lock), SQLITE_OK);
        assert_int_equal(sqlite3_exec(lock, "BEGIN IMMEDIATE", NULL, NULL, NULL), SQLITE_OK);
        commit(a, "INSERT INTO devices (id, a) VALUES ('d1', 'x')");
        commit(a, "INSERT INTO devices (id, a) VALUES ('d2', 'y')");
        /* b tries (each try waits out the Store's busy timeout) and stops. */
        deadline = now_usec() + usec(20);
        do {
                assert_true(now_usec() < deadline);
                assert_true(sd_event_run(f->event, 50 * 1000) >= 0);
                replica_stats(b->replica, &st);
        } while (st.retried == 0 || stream_last_seq(f) < 3);
        assert_int_equal(st.applied_seq, 1);
        assert_int_equal(sqlite3_exec(lock, "ROLLBACK", NULL, NULL, NULL), SQLITE_OK);
        sqlite3_close(lock);

        settle(f);
        replica_stats(b->replica, &st);
        assert_int_equal(st.failed, 0);
        assert_int_equal(st.applied_seq, 3);
        assert_dump(b, "SELECT id, a FROM devices ORDER BY id", "d0|before;d1|x;d2|y;");
        assert_dump(b, "SELECT applied_seq FROM replica_state", "3;");
        /* And on from there. */
        commit(a, "UPDATE devices SET a = 'z' WHERE id = 'd1'");
        settle(f);
        assert_dump(b, "SELECT a FROM devices WHERE id = 'd1'", "z;");
}

int main(int argc _unused_, char **argv _unused_) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test_setup_teardown(test_change_shows_elsewhere, setup, teardown),
                cmocka_unit_test_setup_teardown(test_concurrent, setup, teardown),
                cmocka_unit_test_setup_teardown(test_concurrent_inserts, setup, teardown),
                cmocka_unit_test_setup_teardown(test_replay, setup, teardown),
                cmocka_unit_test_setup_teardown(test_export, setup, teardown),
                cmocka_unit_test_setup_teardown(test_republish, setup, teardown),
                cmocka_unit_test_setup_teardown(test_foreign_tables, setup, teardown),
                cmocka_unit_test_setup_teardown(test_apply_retried, setup, teardown),
        };

        if (!nats_server_installed()) {
                fprintf(stderr, "SKIP: nats-server is not installed (Debian package 'nats-server')\n");
                return 77;
        }
        signal(SIGPIPE, SIG_IGN);
        return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
