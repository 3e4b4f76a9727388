/* SPDX-License-Identifier: Apache-2.0 */
/* Unit tests for the core of the outbound integrations
 * (cloud/integrations.c) over a real Journal and a real Store in a
 * temporary directory, with a sink of the test's own (both SinkOps are
 * defined here): order per device, the window, failures and the retry
 * from the cursor, failing/recovered/lost events, filters, the cursor
 * kept across a restart, leadership, adding and removing.
 *
 * This file's integrations.c is built with a backoff unit of 1 ms and a
 * leadership check every 10 ms (Makefile.am). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cloud/cloud-config.h"
#include "cloud/integrations.h"
#include "cloud/journal.h"
#include "cloud/store.h"
#include "util.h"

#define SENT_MAX 4096

/* ---- the test's sink ------------------------------------------------------------ */

typedef struct TestSink {
        Integration *owner;
        char name[INTEGRATION_NAME_MAX + 1];
        unsigned in_flight;
} TestSink;

typedef struct Sent {
        uint64_t id;
        char key[48];
        char coreid[80];
        char name[80];
        char *body;
        TestSink *sink;
} Sent;

typedef struct Fixture {
        char dir[64];
        CloudConfig config;
        sd_event *event;
        Journal *journal;
        Store *store;
        Integrations *s;
        /* The sink. */
        unsigned window;    /* -EAGAIN at this many in flight (0: no limit) */
        int send_error;     /* send() returns this (0: takes it) */
        int new_error;      /* new() returns this */
        TestSink *sinks[CLOUD_INTEGRATIONS_MAX];
        size_t n_sinks;
        unsigned sinks_made, sinks_freed;
        Sent sent[SENT_MAX];
        size_t n_sent;
        /* The cloud. */
        bool leads;
        json_t *tags; /* device -> tags */
        char published[64][64];
        size_t n_published;
} Fixture;

static Fixture *F;

static int test_sink_new(sd_event *event, const IntegrationConfig *config, const char *node, Integration *owner,
                         void **ret) {
        TestSink *t;

        if (F->new_error)
                return F->new_error;
        t = calloc(1, sizeof(*t));
        assert_non_null(t);
        t->owner = owner;
        snprintf(t->name, sizeof(t->name), "%s", config->name);
        assert_string_equal(integration_name(owner), config->name);
        assert_true(F->n_sinks < CLOUD_INTEGRATIONS_MAX);
        F->sinks[F->n_sinks++] = t;
        F->sinks_made++;
        *ret = t;
        return 0;
}

static void test_sink_free(void *sink) {
        TestSink *t = sink;

        for (size_t i = 0; i < F->n_sinks; i++)
                if (F->sinks[i] == t) {
                        F->sinks[i] = F->sinks[--F->n_sinks];
                        break;
                }
        for (size_t i = 0; i < F->n_sent; i++)
                if (F->sent[i].sink == t)
                        F->sent[i].sink = NULL;
        F->sinks_freed++;
        free(t);
}

static int test_sink_send(void *sink, uint64_t id, const char *key, const ProtoEvent *e, const char *body,
                          size_t len) {
        TestSink *t = sink;
        Sent *s;

        if (F->send_error)
                return F->send_error;
        if (F->window && t->in_flight >= F->window)
                return -EAGAIN;
        assert_true(F->n_sent < SENT_MAX);
        assert_int_equal(strlen(body), len);
        s = &F->sent[F->n_sent++];
        *s = (Sent){ .id = id, .sink = t };
        snprintf(s->key, sizeof(s->key), "%s", key);
        snprintf(s->coreid, sizeof(s->coreid), "%s", e->coreid);
        snprintf(s->name, sizeof(s->name), "%s", e->name);
        s->body = strndup(body, len);
        t->in_flight++;
        return 0;
}

static void test_sink_describe(void *sink, json_t *obj) {
        json_object_set_new(obj, "test", json_true());
}

const SinkOps sink_webhook_ops = {
        .kind = "webhook",
        .new = test_sink_new,
        .free = test_sink_free,
        .send = test_sink_send,
        .describe = test_sink_describe,
};

const SinkOps sink_mqtt_ops = {
        .kind = "mqtt",
        .new = test_sink_new,
        .free = test_sink_free,
        .send = test_sink_send,
};

/* ---- the cloud's side ------------------------------------------------------------ */

static int hook_publish(void *userdata, const ProtoEvent *e) {
        uint64_t id;
        int r = journal_append(F->journal, e, 0, 0, &id);

        if (r < 0)
                return r;
        if (F->n_published < ELEMENTSOF(F->published))
                snprintf(F->published[F->n_published++], sizeof(F->published[0]), "%s", e->name);
        integrations_kick(F->s);
        return 0;
}

static json_t *hook_tags(void *userdata, const char *device) {
        return json_incref(json_object_get(F->tags, device));
}

static bool hook_leads(void *userdata) {
        return F->leads;
}

static const IntegrationsHooks hooks = { .publish = hook_publish, .tags = hook_tags };
static const IntegrationsHooks hooks_leads = { .publish = hook_publish, .tags = hook_tags, .leads = hook_leads };

/* ---- helpers ----------------------------------------------------------------------- */

static IntegrationConfig *webhook(const char *name, const char *prefix, const char *tag) {
        IntegrationConfig *c = calloc(1, sizeof(*c));

        assert_non_null(c);
        c->name = strdup(name);
        c->kind = INTEGRATION_WEBHOOK;
        c->url = strdup("https://example.com/hook");
        c->secret = strdup("0123456789abcdef");
        c->timeout_sec = 10;
        c->prefix = prefix ? strdup(prefix) : NULL;
        c->tag = tag ? strdup(tag) : NULL;
        return c;
}

static void config_add(IntegrationConfig *c) {
        F->config.integrations = reallocarray(F->config.integrations, F->config.n_integrations + 1, sizeof(c));
        assert_non_null(F->config.integrations);
        F->config.integrations[F->config.n_integrations++] = c;
}

static void start(const IntegrationsHooks *h) {
        assert_int_equal(integrations_new(F->event, &F->config, F->journal, F->store, h, &F->s), 0);
}

static void stop(void) {
        F->s = integrations_free(F->s);
        assert_int_equal(store_commit(F->store), 0);
}

/* Run the loop until nothing is left to do now. */
static void run(void) {
        while (sd_event_run(F->event, 0) > 0)
                ;
}

/* Run the loop until cond() or 5 s. */
static void run_until(bool (*cond)(void)) {
        unsigned long long deadline = now_usec() + 5000000ULL;

        while (!cond()) {
                assert_true(now_usec() < deadline);
                assert_true(sd_event_run(F->event, 10000) >= 0);
        }
        run();
}

static uint64_t append(const char *device, const char *name, const char *data) {
        char at[32];
        ProtoEvent e;
        uint64_t id;

        proto_timestamp_now(at);
        e = (ProtoEvent){ .name = (char *)name, .data = (char *)data, .ttl = 60, .published_at = at,
                          .coreid = (char *)device };
        assert_int_equal(journal_append(F->journal, &e, 0, 0, &id), 0);
        integrations_kick(F->s);
        return id;
}

static Sent *sent_find(uint64_t id, size_t from) {
        for (size_t i = from; i < F->n_sent; i++)
                if (F->sent[i].id == id)
                        return &F->sent[i];
        return NULL;
}

static size_t sent_count(uint64_t id) {
        size_t n = 0;

        for (size_t i = 0; i < F->n_sent; i++)
                n += F->sent[i].id == id;
        return n;
}

/* Answer the i-th send. */
static void answer(size_t i, int error, const char *why) {
        Sent *s = &F->sent[i];

        assert_non_null(s->sink);
        s->sink->in_flight--;
        integration_sent(s->sink->owner, s->id, error, why);
}

/* Answer every send not answered yet (from index *from on) with error. */
static void answer_all(size_t *from, int error) {
        for (; *from < F->n_sent; (*from)++)
                if (F->sent[*from].sink)
                        answer(*from, error, error ? "HTTP 503" : NULL);
}

static json_t *info(const char *name) {
        json_t *a = integrations_json(F->s, NULL, name);

        assert_non_null(a);
        assert_int_equal(json_array_size(a), 1);
        json_incref(json_array_get(a, 0));
        json_t *o = json_array_get(a, 0);
        json_decref(a);
        return o;
}

static void expect_state(const char *name, const char *state) {
        json_t *o = info(name);

        assert_string_equal(json_string_value(json_object_get(o, "state")), state);
        json_decref(o);
}

static int64_t info_int(const char *name, const char *field) {
        json_t *o = info(name);
        int64_t v = json_integer_value(json_object_get(o, field));

        json_decref(o);
        return v;
}

static size_t published(const char *name) {
        size_t n = 0;

        for (size_t i = 0; i < F->n_published; i++)
                n += streq(F->published[i], name);
        return n;
}

static int setup(void **state) {
        F = calloc(1, sizeof(*F));
        assert_non_null(F);
        snprintf(F->dir, sizeof(F->dir), "/tmp/tether-cloud-integrations-test-XXXXXX");
        assert_non_null(mkdtemp(F->dir));
        F->config = (CloudConfig){ .state_dir = F->dir, .max_payload = 1024, .journal_max_bytes = 1 << 20,
                                   .journal_sync_ms = 1000 };
        assert_int_equal(sd_event_new(&F->event), 0);
        assert_int_equal(journal_new(F->event, &F->config, &F->journal), 0);
        assert_int_equal(store_open(F->event, F->dir, &F->store), 0);
        F->tags = json_object();
        F->leads = true;
        return 0;
}

static int teardown(void **state) {
        char cmd[128];

        F->s = integrations_free(F->s);
        F->store = store_free(F->store);
        F->journal = journal_free(F->journal);
        F->event = sd_event_unref(F->event);
        for (size_t i = 0; i < F->config.n_integrations; i++)
                integration_config_free(F->config.integrations[i]);
        free(F->config.integrations);
        for (size_t i = 0; i < F->n_sent; i++)
                free(F->sent[i].body);
        json_decref(F->tags);
        snprintf(cmd, sizeof(cmd), "rm -rf '%s'", F->dir);
        assert_int_equal(system(cmd), 0);
        free(F);
        F = NULL;
        return 0;
}

/* ---- tests ------------------------------------------------------------------------- */

/* An event goes out only when no earlier one of its device is in flight;
 * other devices' go meanwhile. The body is as docs/integrations.md says. */
static void test_order_per_device(void **state) {
        uint64_t a1, b1, a2, b2, a3, before;
        char key[48];
        json_t *body;

        before = append("dev-a", "temp", "old"); /* before the integration: not delivered */
        config_add(webhook("w", NULL, NULL));
        start(&hooks);
        a1 = append("dev-a", "temp", "21.5");
        b1 = append("dev-b", "temp", "1");
        a2 = append("dev-a", "temp", "2");
        b2 = append("dev-b", "temp", "2");
        a3 = append("dev-a", "temp", "3");
        run();
        assert_int_equal(F->n_sent, 2);
        assert_int_equal(F->sent[0].id, a1);
        assert_int_equal(F->sent[1].id, b1);
        assert_null(sent_find(before, 0));

        body = json_loads(F->sent[0].body, 0, NULL);
        assert_non_null(body);
        snprintf(key, sizeof(key), "%016" PRIx64 "-%" PRIu64, journal_epoch(F->journal), a1);
        assert_string_equal(F->sent[0].key, key);
        assert_string_equal(json_string_value(json_object_get(body, "id")), key);
        assert_string_equal(json_string_value(json_object_get(body, "event")), "temp");
        assert_string_equal(json_string_value(json_object_get(body, "data")), "21.5");
        assert_string_equal(json_string_value(json_object_get(body, "coreid")), "dev-a");
        assert_string_equal(json_string_value(json_object_get(body, "integration")), "w");
        assert_int_equal(json_integer_value(json_object_get(body, "ttl")), 60);
        assert_true(json_is_true(json_object_get(body, "public")));
        assert_non_null(json_string_value(json_object_get(body, "published_at")));
        assert_string_equal(json_string_value(json_object_get(body, "received_at")),
                            json_string_value(json_object_get(body, "published_at")));
        json_decref(body);

        /* b1 first: the cursor stays before a1; b2 waits behind a2 (head
         * of line: reading stops at the first event that must wait). */
        answer(1, 0, NULL);
        run();
        assert_int_equal(F->n_sent, 2);
        assert_int_equal(info_int("w", "backlog"), 5);
        answer(0, 0, NULL);
        run();
        assert_int_equal(F->n_sent, 4);
        assert_int_equal(F->sent[2].id, a2);
        assert_int_equal(F->sent[3].id, b2);
        assert_int_equal(info_int("w", "backlog"), 3); /* a2, b2, a3 */
        answer(2, 0, NULL);
        answer(3, 0, NULL);
        run();
        assert_int_equal(F->n_sent, 5);
        assert_int_equal(F->sent[4].id, a3);
        answer(4, 0, NULL);
        run();
        assert_int_equal(info_int("w", "backlog"), 0);
        assert_int_equal(info_int("w", "delivered"), 5);
        expect_state("w", "ok");
}

/* -EAGAIN: the sink's window is full; the event goes after an answer. */
static void test_window(void **state) {
        uint64_t ids[3];

        config_add(webhook("w", NULL, NULL));
        start(&hooks);
        F->window = 2;
        ids[0] = append("a", "e", NULL);
        ids[1] = append("b", "e", NULL);
        ids[2] = append("c", "e", NULL);
        run();
        assert_int_equal(F->n_sent, 2);
        answer(1, 0, NULL);
        run();
        assert_int_equal(F->n_sent, 3);
        assert_int_equal(F->sent[2].id, ids[2]);
        assert_int_equal(info_int("w", "backlog"), 3);
        answer(0, 0, NULL);
        answer(2, 0, NULL);
        run();
        assert_int_equal(info_int("w", "backlog"), 0);
        assert_int_equal(sent_count(ids[0]) + sent_count(ids[1]) + sent_count(ids[2]), 3);
}

static bool retried(void) {
        return F->n_sent > 2;
}

/* A failure: nothing more goes until the backoff; then from the cursor,
 * what was delivered is not sent again. */
static void test_failure_resume(void **state) {
        uint64_t a1, b1, a2, b2;
        size_t k;

        config_add(webhook("w", NULL, NULL));
        start(&hooks);
        a1 = append("a", "e", "1");
        b1 = append("b", "e", "1");
        a2 = append("a", "e", "2");
        b2 = append("b", "e", "2");
        run();
        assert_int_equal(F->n_sent, 2);
        answer(1, 0, NULL);  /* b1 delivered */
        answer(0, -EIO, "HTTP 500"); /* a1 failed */
        run();
        /* b2 could go (b1 is delivered), but a failure stops everything. */
        assert_int_equal(F->n_sent, 2);
        expect_state("w", "retrying");
        {
                json_t *o = info("w");

                assert_string_equal(json_string_value(json_object_get(o, "last_error")), "HTTP 500");
                assert_int_equal(json_integer_value(json_object_get(o, "failures")), 1);
                json_decref(o);
        }
        run_until(retried);
        assert_int_equal(F->sent[2].id, a1); /* again */
        assert_int_equal(sent_count(b1), 1);
        /* a2 waits for a1, b2 behind it. */
        assert_int_equal(F->n_sent, 3);
        k = 2;
        answer_all(&k, 0);
        run();
        assert_int_equal(F->n_sent, 5);
        assert_int_equal(F->sent[3].id, a2);
        assert_int_equal(F->sent[4].id, b2);
        answer_all(&k, 0);
        run();
        assert_int_equal(sent_count(a1), 2);
        assert_int_equal(sent_count(b1), 1);
        assert_int_equal(sent_count(a2), 1);
        assert_int_equal(sent_count(b2), 1);
        assert_int_equal(info_int("w", "backlog"), 0);
        expect_state("w", "ok");

        /* send() itself failing is a failed delivery too. */
        F->send_error = -ENOTCONN;
        append("a", "e", "3");
        run();
        expect_state("w", "retrying");
        F->send_error = 0;
        run_until(retried); /* n_sent > 2 holds: wait for the send */
        while (info_int("w", "backlog") > 0) {
                answer_all(&k, 0);
                assert_true(sd_event_run(F->event, 10000) >= 0);
        }
        expect_state("w", "ok");
}

static size_t failures_wanted;
static bool failed_enough(void) {
        static size_t k;

        if (F->n_sent < k)
                k = 0;
        answer_all(&k, -EIO);
        return info_int("w", "failures") >= (int64_t)failures_wanted;
}

/* INTEGRATION_FAILING_AFTER rounds in a row: failing, published once;
 * recovered on the next success. */
static void test_failing_recovered(void **state) {
        size_t k = 0;

        config_add(webhook("w", "temp", NULL)); /* not its own tether/integration/ events */
        start(&hooks);
        append("a", "temp", "1");
        run();
        failures_wanted = INTEGRATION_FAILING_AFTER;
        run_until(failed_enough);
        expect_state("w", "failing");
        assert_int_equal(published("tether/integration/failing"), 1);
        {
                json_t *o = info("w");

                assert_non_null(json_string_value(json_object_get(o, "failing_since")));
                json_decref(o);
        }
        failures_wanted = INTEGRATION_FAILING_AFTER + 2;
        run_until(failed_enough);
        assert_int_equal(published("tether/integration/failing"), 1);
        assert_int_equal(published("tether/integration/recovered"), 0);
        /* The backoff grows: 1, 2, 4, 8, 16, 32, 64 units. Answer the next
         * attempt with success. */
        k = F->n_sent;
        while (k == F->n_sent)
                assert_true(sd_event_run(F->event, 10000) >= 0);
        answer_all(&k, 0);
        run();
        expect_state("w", "ok");
        assert_int_equal(published("tether/integration/recovered"), 1);
        assert_int_equal(info_int("w", "delivered"), 1);
        assert_int_equal(info_int("w", "backlog"), 0); /* its own events: read, not selected */
        append("a", "temp", "2");
        run();
        answer_all(&k, 0);
        run();
        assert_int_equal(info_int("w", "backlog"), 0);
}

/* Prefix=, Tag=, and never the events the integration's own sink brought. */
static void test_filters(void **state) {
        IntegrationConfig *m;
        size_t k = 0;

        json_object_set_new(F->tags, "berlin-1", json_pack("{s:s, s:s}", "site", "berlin", "floor", "2"));
        json_object_set_new(F->tags, "paris-1", json_pack("{s:s}", "site", "paris"));
        config_add(webhook("kv", "temp", "site=berlin"));
        config_add(webhook("k", NULL, "floor"));
        m = webhook("m", NULL, NULL);
        free(m->url);
        free(m->secret);
        m->url = m->secret = NULL;
        m->timeout_sec = 0;
        m->kind = INTEGRATION_MQTT;
        config_add(m);
        start(&hooks);

        append("berlin-1", "temp/in", "1");           /* kv, k, m */
        append("paris-1", "temp/in", "1");            /* m */
        append("berlin-1", "humidity", "1");          /* k, m */
        append("nobody", "temp", "1");                /* m */
        append("api", "temp", "1");                   /* m */
        append("mqtt:m", "temp", "1");                /* kv? no tags; k: no; m: its own: no */
        append("mqtt:kv", "temp", "1");               /* m only (no tags) */
        run();
        for (int round = 0; round < 4; round++) {
                answer_all(&k, 0);
                run();
        }
        assert_int_equal(info_int("kv", "delivered"), 1);
        assert_int_equal(info_int("k", "delivered"), 2);
        assert_int_equal(info_int("m", "delivered"), 6);
        assert_int_equal(info_int("kv", "backlog"), 0);
        assert_int_equal(info_int("m", "backlog"), 0);
        {
                json_t *a = integrations_json(F->s, "mqtt", NULL), *o = json_array_get(a, 0);

                assert_int_equal(json_array_size(a), 1);
                assert_string_equal(json_string_value(json_object_get(o, "name")), "m");
                assert_string_equal(json_string_value(json_object_get(o, "kind")), "mqtt");
                assert_string_equal(json_string_value(json_object_get(o, "source")), "config");
                assert_null(json_object_get(o, "test"));
                json_decref(a);
                a = integrations_json(F->s, "webhook", "kv");
                o = json_array_get(a, 0);
                assert_string_equal(json_string_value(json_object_get(o, "prefix")), "temp");
                assert_string_equal(json_string_value(json_object_get(o, "tag")), "site=berlin");
                assert_true(json_is_true(json_object_get(o, "test")));
                json_decref(a);
        }
}

/* The cursor is stored and read back: a restart resends only what was
 * not delivered; a new integration starts at the journal's end; a cursor
 * of another journal (epoch) starts at its beginning. */
static void test_cursor_persisted(void **state) {
        uint64_t ids[6];
        size_t k = 0;

        config_add(webhook("w", NULL, NULL));
        start(&hooks);
        for (size_t i = 0; i < 4; i++)
                ids[i] = append(i % 2 ? "b" : "a", "e", NULL);
        run();
        assert_int_equal(F->n_sent, 2); /* a0, b1 */
        answer(0, 0, NULL);
        answer(1, 0, NULL);
        run();
        assert_int_equal(F->n_sent, 4);
        answer(3, 0, NULL); /* b3 delivered, a2 still in flight */
        run();
        stop();
        ids[4] = append("a", "e", NULL);

        /* Restart: from the cursor (after b1): a2 and b3 again (b3 was
         * delivered past an event in flight: at least once), then a4. */
        start(&hooks);
        run();
        k = 4;
        assert_int_equal(F->n_sent, 6);
        assert_int_equal(F->sent[4].id, ids[2]);
        assert_int_equal(F->sent[5].id, ids[3]);
        answer_all(&k, 0);
        run();
        assert_int_equal(F->sent[6].id, ids[4]);
        answer_all(&k, 0);
        run();
        assert_int_equal(sent_count(ids[0]), 1);
        assert_int_equal(sent_count(ids[1]), 1);
        assert_int_equal(sent_count(ids[2]), 2);
        assert_int_equal(sent_count(ids[3]), 2);
        assert_int_equal(info_int("w", "backlog"), 0);
        stop();

        /* Another epoch: the journal is new to this cursor. */
        {
                sqlite3_stmt *st = NULL;

                assert_int_equal(sqlite3_prepare_v2(store_db(F->store),
                                                    "UPDATE integration_cursors SET epoch = epoch + 1", -1, &st, NULL),
                                 SQLITE_OK);
                assert_int_equal(sqlite3_step(st), SQLITE_DONE);
                sqlite3_finalize(st);
        }
        ids[5] = append("c", "e", NULL);
        config_add(webhook("new", NULL, NULL));
        start(&hooks);
        run();
        answer_all(&k, 0);
        run();
        answer_all(&k, 0);
        run();
        answer_all(&k, 0);
        run();
        /* "w" from the beginning: every event of the journal once more. */
        assert_int_equal(sent_count(ids[0]), 2);
        assert_int_equal(sent_count(ids[5]), 1);
        assert_int_equal(info_int("w", "delivered"), 6);
        /* "new" from the end: nothing yet. */
        assert_int_equal(info_int("new", "delivered"), 0);
        assert_int_equal(info_int("new", "backlog"), 0);
        append("d", "e", NULL);
        run();
        answer_all(&k, 0);
        run();
        assert_int_equal(info_int("new", "delivered"), 1);
}

/* Ids the journal no longer has: lost, logged, published. */
static void test_lost(void **state) {
        char at[32];
        ProtoEvent e;
        size_t k = 0;

        config_add(webhook("w", "e", NULL));
        start(&hooks);
        append("a", "e", NULL); /* id 1 */
        run();
        answer_all(&k, 0);
        run();
        proto_timestamp_now(at);
        e = (ProtoEvent){ .name = (char *)"e", .ttl = 60, .published_at = at, .coreid = (char *)"a" };
        assert_int_equal(journal_append_at(F->journal, &e, 0, 0, 10), 0); /* 2..9 missing */
        integrations_kick(F->s);
        run();
        answer_all(&k, 0);
        run();
        assert_int_equal(info_int("w", "lost"), 8);
        assert_int_equal(published("tether/integration/lost"), 1);
        assert_int_equal(info_int("w", "delivered"), 2);
}

static bool sink_made(void) {
        return F->n_sinks > 0;
}

static bool sink_gone(void) {
        return F->n_sinks == 0;
}

/* A node that does not lead makes no sink; one that stops leading frees
 * it, and what was in flight goes again from the cursor. */
static void test_leadership(void **state) {
        uint64_t a;
        size_t k = 0;

        F->leads = false;
        config_add(webhook("w", NULL, NULL));
        start(&hooks_leads);
        a = append("a", "e", NULL);
        run();
        assert_int_equal(F->n_sinks, 0);
        expect_state("w", "standby");
        /* Leading, it goes on from the stored cursor: the event is
         * delivered. */
        F->leads = true;
        run_until(sink_made);
        assert_int_equal(F->n_sent, 1);
        assert_int_equal(F->sent[0].id, a);
        answer_all(&k, 0);
        append("a", "e", "x");
        run();
        assert_int_equal(F->n_sent, 2);
        assert_int_equal(F->sent[1].id, a + 1);
        F->leads = false;
        run_until(sink_gone);
        expect_state("w", "standby");
        assert_int_equal(info_int("w", "backlog"), 1);
        F->leads = true;
        run_until(sink_made);
        assert_int_equal(F->n_sent, 3);
        k = 2;
        assert_int_equal(F->sent[2].id, a + 1);
        answer_all(&k, 0);
        run();
        assert_int_equal(info_int("w", "backlog"), 0);
        expect_state("w", "ok");
}

/* integrations_add() and _remove(), the limit, a sink that cannot start. */
static void test_add_remove(void **state) {
        char err[INTEGRATION_ERROR_MAX];
        IntegrationConfig *c;
        size_t k = 0;
        int64_t n = 0;

        config_add(webhook("file", NULL, NULL));
        start(&hooks);
        c = webhook("api-1", NULL, NULL);
        c->from_api = true;
        assert_int_equal(integrations_add(F->s, c, err), 0);
        assert_int_equal(integrations_add(F->s, webhook("api-1", NULL, NULL), err), -EEXIST);
        assert_non_null(strstr(err, "exists already"));
        c = webhook("bad", NULL, NULL);
        free(c->url);
        c->url = strdup("http://example.com/");
        assert_int_equal(integrations_add(F->s, c, err), -EINVAL);
        assert_non_null(strstr(err, "URL="));
        assert_int_equal(integrations_remove(F->s, "file"), -EPERM);
        assert_int_equal(integrations_remove(F->s, "nope"), -ENOENT);
        append("a", "e", NULL);
        run();
        answer_all(&k, 0);
        run();
        assert_int_equal(info_int("api-1", "delivered"), 1);
        {
                json_t *o = info("api-1");

                assert_string_equal(json_string_value(json_object_get(o, "source")), "api");
                json_decref(o);
        }
        assert_int_equal(integrations_remove(F->s, "api-1"), 0);
        assert_int_equal(store_commit(F->store), 0);
        {
                sqlite3_stmt *st = NULL;

                assert_int_equal(sqlite3_prepare_v2(store_db(F->store),
                                                    "SELECT count(*) FROM integration_cursors WHERE name = 'api-1'",
                                                    -1, &st, NULL),
                                 SQLITE_OK);
                assert_int_equal(sqlite3_step(st), SQLITE_ROW);
                n = sqlite3_column_int64(st, 0);
                sqlite3_finalize(st);
        }
        assert_int_equal(n, 0);

        for (unsigned i = 1; i < CLOUD_INTEGRATIONS_MAX; i++) {
                char name[16];

                snprintf(name, sizeof(name), "n%u", i);
                c = webhook(name, NULL, NULL);
                c->from_api = true;
                assert_int_equal(integrations_add(F->s, c, err), 0);
        }
        assert_int_equal(integrations_add(F->s, webhook("one-more", NULL, NULL), err), -ENOSPC);
        assert_non_null(strstr(err, "At most 64"));

        /* A sink that cannot be made: retried like a failed delivery. */
        assert_int_equal(integrations_remove(F->s, "n1"), 0);
        F->new_error = -EOPNOTSUPP;
        c = webhook("no-sink", NULL, NULL);
        c->from_api = true;
        assert_int_equal(integrations_add(F->s, c, err), 0);
        expect_state("no-sink", "retrying");
        {
                json_t *o = info("no-sink");

                assert_non_null(strstr(json_string_value(json_object_get(o, "last_error")), "cannot start"));
                json_decref(o);
        }
        F->new_error = 0;
}

/* What a sink receives becomes an event of "mqtt:NAME" under the inbound
 * prefix, which that integration does not deliver back. */
static void test_publish(void **state) {
        IntegrationConfig *m = webhook("m", NULL, NULL);
        Integration *in;
        char big[1100];
        size_t k = 0;

        free(m->url);
        free(m->secret);
        m->url = m->secret = NULL;
        m->timeout_sec = 0;
        m->kind = INTEGRATION_MQTT;
        m->inbound_prefix = strdup("mqtt/");
        config_add(m);
        start(&hooks);
        run();
        assert_int_equal(F->n_sinks, 1);
        in = F->sinks[0]->owner;
        assert_int_equal(integration_publish(in, "led/on", "1", 1), 0);
        assert_int_equal(published("mqtt/led/on"), 1);
        assert_int_equal(integration_publish(in, "a//b", "1", 1), -EINVAL);
        assert_int_equal(integration_publish(in, "x", "\xff", 1), -EINVAL);
        memset(big, 'x', sizeof(big));
        assert_int_equal(integration_publish(in, "x", big, sizeof(big)), -E2BIG);
        run();
        answer_all(&k, 0);
        run();
        assert_int_equal(F->n_sent, 0);
        assert_int_equal(info_int("m", "backlog"), 0);
}

int main(int argc, char **argv) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test_setup_teardown(test_order_per_device, setup, teardown),
                cmocka_unit_test_setup_teardown(test_window, setup, teardown),
                cmocka_unit_test_setup_teardown(test_failure_resume, setup, teardown),
                cmocka_unit_test_setup_teardown(test_failing_recovered, setup, teardown),
                cmocka_unit_test_setup_teardown(test_filters, setup, teardown),
                cmocka_unit_test_setup_teardown(test_cursor_persisted, setup, teardown),
                cmocka_unit_test_setup_teardown(test_lost, setup, teardown),
                cmocka_unit_test_setup_teardown(test_leadership, setup, teardown),
                cmocka_unit_test_setup_teardown(test_add_remove, setup, teardown),
                cmocka_unit_test_setup_teardown(test_publish, setup, teardown),
        };

        if (argc > 1)
                cmocka_set_test_filter(argv[1]);
        return cmocka_run_group_tests(tests, NULL, NULL);
}
