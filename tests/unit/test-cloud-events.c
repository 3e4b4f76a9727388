/* SPDX-License-Identifier: Apache-2.0 */
/* Unit tests for the cloud's event router (cloud/events.c) on its own:
 * devices are this file's, reached only through EventsHooks; the journal
 * is the real one in a temporary directory; requests are real libcoap
 * PDUs. Subscriptions, routing to matching subscribers only (never back
 * to the publisher), cancelling, the per-device limit, and subscriptions
 * dying with their device, also while an event is being routed. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cloud/events.h"
#include "log.h"

/* The test's devices: what the hooks see. */
struct Device {
        const char *id;
        bool offline;      /* notify answers -ENOTCONN */
        int notify_error;  /* notify answers this when not 0 */
        bool gone_on_notify; /* its session closes while it is notified */
        unsigned notified;
        uint32_t last_observe;
        char last_json[512];
        uint8_t last_token[8];
        size_t last_token_len;
        unsigned undeliverable;
        unsigned disconnected;
};

typedef struct Fixture {
        char dir[64];
        sd_event *event;
        CloudConfig config;
        Journal *journal;
        Events *events;
        unsigned streamed;
        uint64_t last_stream_id;
        unsigned flushes;
        /* The store hook (setup_store()): what it got, what it answers. */
        unsigned stored;
        uint64_t stored_epoch, stored_seq;
        int store_error;
        bool store_duplicate;
} Fixture;

static const char *hook_device_id(void *userdata, const Device *d) {
        return d->id;
}

static int hook_notify(void *userdata, Device *d, const uint8_t *token, size_t token_len, uint32_t observe,
                       const char *json, size_t len) {
        Fixture *f = userdata;

        if (d->offline)
                return -ENOTCONN;
        d->notified++;
        d->last_observe = observe;
        snprintf(d->last_json, sizeof(d->last_json), "%.*s", (int)len, json);
        assert_true(token_len <= sizeof(d->last_token));
        memcpy(d->last_token, token, token_len);
        d->last_token_len = token_len;
        if (d->gone_on_notify)
                events_device_gone(f->events, d);
        return d->notify_error;
}

static void hook_undeliverable(void *userdata, Device *d, const char *name, size_t len, int error) {
        d->undeliverable++;
}

static void hook_disconnect(void *userdata, Device *d, const char *reason) {
        d->disconnected++;
}

static void hook_streams(void *userdata, const ProtoEvent *e, uint64_t id) {
        Fixture *f = userdata;

        f->streamed++;
        f->last_stream_id = id;
}

static void hook_flush(void *userdata) {
        Fixture *f = userdata;

        f->flushes++;
}

static int hook_store(void *userdata, const ProtoEvent *e, uint64_t epoch, uint64_t seq, bool *ret_duplicate) {
        Fixture *f = userdata;

        if (f->store_error < 0)
                return f->store_error;
        f->stored++;
        f->stored_epoch = epoch;
        f->stored_seq = seq;
        *ret_duplicate = f->store_duplicate;
        return 0;
}

static int setup_with(void **state, bool store) {
        Fixture *f = calloc(1, sizeof(*f));
        EventsHooks hooks = {
                .userdata = f,
                .device_id = hook_device_id,
                .notify = hook_notify,
                .undeliverable = hook_undeliverable,
                .disconnect = hook_disconnect,
                .deliver_to_streams = hook_streams,
                .flush = hook_flush,
                .store = store ? hook_store : NULL,
        };

        assert_non_null(f);
        snprintf(f->dir, sizeof(f->dir), "/tmp/tether-cloud-events-test-XXXXXX");
        assert_non_null(mkdtemp(f->dir));
        f->config = (CloudConfig){ .state_dir = f->dir, .max_payload = 1024, .max_subscriptions = 3,
                                   .journal_max_bytes = 1 << 20, .journal_sync_ms = 1000 };
        assert_int_equal(sd_event_new(&f->event), 0);
        assert_int_equal(journal_new(f->event, &f->config, &f->journal), 0);
        assert_int_equal(events_new(&f->config, f->journal, &hooks, &f->events), 0);
        *state = f;
        return 0;
}

static int setup(void **state) {
        return setup_with(state, false);
}

/* Cluster mode: events go to the store hook, routing is not done here. */
static int setup_store(void **state) {
        return setup_with(state, true);
}

static int teardown(void **state) {
        Fixture *f = *state;
        char cmd[128];

        events_free(f->events);
        journal_free(f->journal);
        sd_event_unref(f->event);
        snprintf(cmd, sizeof(cmd), "rm -rf '%s'", f->dir);
        assert_int_equal(system(cmd), 0);
        free(f);
        return 0;
}

static coap_pdu_t *response_new(void) {
        coap_pdu_t *pdu = coap_pdu_init(COAP_MESSAGE_ACK, COAP_EMPTY_CODE, 1, 1152);

        assert_non_null(pdu);
        return pdu;
}

/* GET /e/PREFIX with Observe action and a one-byte token; the response
 * code (as 0xCC: class << 5 | detail). */
static unsigned observe(Fixture *f, Device *d, const char *prefix, unsigned action, uint8_t token,
                        uint32_t *ret_observe) {
        coap_pdu_t *req = coap_pdu_init(COAP_MESSAGE_CON, COAP_REQUEST_CODE_GET, 1, 1152), *resp = response_new();
        coap_opt_iterator_t it;
        coap_opt_t *opt;
        uint8_t buf[4];
        unsigned code;

        assert_non_null(req);
        assert_true(coap_add_token(req, 1, &token));
        assert_true(coap_add_option(req, COAP_OPTION_OBSERVE, coap_encode_var_safe(buf, sizeof(buf), action), buf));
        events_handle_request(f->events, d, req, prefix, resp);
        code = coap_pdu_get_code(resp);
        opt = coap_check_option(resp, COAP_OPTION_OBSERVE, &it);
        if (ret_observe)
                *ret_observe = opt ? coap_decode_var_bytes(coap_opt_value(opt), coap_opt_length(opt)) : UINT32_MAX;
        coap_delete_pdu(req);
        coap_delete_pdu(resp);
        return code;
}

static unsigned subscribe(Fixture *f, Device *d, const char *prefix, uint8_t token) {
        return observe(f, d, prefix, COAP_OBSERVE_ESTABLISH, token, NULL);
}

/* POST /e/NAME with data (and seq=, epoch= when seq > 0). */
static unsigned publish(Fixture *f, Device *d, const char *name, const char *data, uint64_t seq) {
        coap_pdu_t *req = coap_pdu_init(COAP_MESSAGE_CON, COAP_REQUEST_CODE_POST, 1, 1152), *resp = response_new();
        uint8_t token = 0x42;
        char q[64];
        unsigned code;

        assert_non_null(req);
        assert_true(coap_add_token(req, 1, &token));
        if (seq > 0) {
                snprintf(q, sizeof(q), "epoch=%016x", 0x1234);
                assert_true(coap_add_option(req, COAP_OPTION_URI_QUERY, strlen(q), (const uint8_t *)q));
                snprintf(q, sizeof(q), "seq=%llu", (unsigned long long)seq);
                assert_true(coap_add_option(req, COAP_OPTION_URI_QUERY, strlen(q), (const uint8_t *)q));
        }
        assert_true(coap_add_data(req, strlen(data), (const uint8_t *)data));
        events_handle_request(f->events, d, req, name, resp);
        code = coap_pdu_get_code(resp);
        coap_delete_pdu(req);
        coap_delete_pdu(resp);
        return code;
}

/* Route an event from the API (no publishing device) or from source. */
static void route(Fixture *f, const char *name, const Device *source) {
        ProtoEvent e = { .name = (char *)name, .data = (char *)"42", .ttl = 60,
                         .published_at = (char *)"2026-01-01T00:00:00.000Z", .coreid = (char *)"api" };

        events_route(f->events, &e, source, 7);
}

static void test_route_matching_only(void **state) {
        Fixture *f = *state;
        Device a = { .id = "a" }, b = { .id = "b" }, c = { .id = "c" };

        assert_int_equal(subscribe(f, &a, "temp", 1), COAP_RESPONSE_CODE(205));
        assert_int_equal(subscribe(f, &b, "temp/", 2), COAP_RESPONSE_CODE(205));
        assert_int_equal(subscribe(f, &c, "other", 3), COAP_RESPONSE_CODE(205));

        route(f, "temp/kitchen", NULL);
        assert_int_equal(a.notified, 1);
        assert_int_equal(b.notified, 1);
        assert_int_equal(c.notified, 0);
        assert_int_equal(f->streamed, 1);
        assert_int_equal(f->last_stream_id, 7);
        assert_int_equal(f->flushes, 1);
        /* The subscription's own token, and the event as JSON. */
        assert_int_equal(a.last_token_len, 1);
        assert_int_equal(a.last_token[0], 1);
        assert_non_null(strstr(a.last_json, "\"temp/kitchen\""));

        /* "temp" matches "temperature" (prefix), "temp/" does not. */
        route(f, "temperature", NULL);
        assert_int_equal(a.notified, 2);
        assert_int_equal(b.notified, 1);
        assert_int_equal(c.notified, 0);
}

static void test_not_to_publisher(void **state) {
        Fixture *f = *state;
        Device a = { .id = "a" }, b = { .id = "b" };

        assert_int_equal(subscribe(f, &a, "", 1), COAP_RESPONSE_CODE(205));
        assert_int_equal(subscribe(f, &b, "", 1), COAP_RESPONSE_CODE(205));
        assert_int_equal(publish(f, &a, "door/open", "1", 1), COAP_RESPONSE_CODE(201));
        assert_int_equal(a.notified, 0);
        assert_int_equal(b.notified, 1);
        assert_int_equal(f->streamed, 1);
        assert_non_null(strstr(b.last_json, "\"a\"")); /* coreid: the publisher */
        /* The same (epoch, seq) again: acknowledged, not routed again. */
        assert_int_equal(publish(f, &a, "door/open", "1", 1), COAP_RESPONSE_CODE(201));
        assert_int_equal(b.notified, 1);
        assert_int_equal(f->streamed, 1);
        /* The next one is. */
        assert_int_equal(publish(f, &a, "door/open", "2", 2), COAP_RESPONSE_CODE(201));
        assert_int_equal(b.notified, 2);
        assert_int_equal(f->streamed, 2);
}

static void test_observe_numbers_and_cancel(void **state) {
        Fixture *f = *state;
        Device a = { .id = "a" };
        uint32_t first, again;

        assert_int_equal(observe(f, &a, "x", COAP_OBSERVE_ESTABLISH, 9, &first), COAP_RESPONSE_CODE(205));
        route(f, "x1", NULL);
        assert_int_equal(a.notified, 1);
        assert_true(a.last_observe > first);
        /* The same token again moves the subscription to a new prefix. */
        assert_int_equal(observe(f, &a, "y", COAP_OBSERVE_ESTABLISH, 9, &again), COAP_RESPONSE_CODE(205));
        assert_true(again > a.last_observe);
        route(f, "x2", NULL);
        assert_int_equal(a.notified, 1);
        route(f, "y1", NULL);
        assert_int_equal(a.notified, 2);
        /* Observe 1 cancels. */
        assert_int_equal(observe(f, &a, "y", COAP_OBSERVE_CANCEL, 9, NULL), COAP_RESPONSE_CODE(205));
        route(f, "y2", NULL);
        assert_int_equal(a.notified, 2);
        /* No Observe at all, a bad prefix: 4.00. */
        assert_int_equal(observe(f, &a, "bad prefix", COAP_OBSERVE_ESTABLISH, 1, NULL), COAP_RESPONSE_CODE(400));
}

static void test_subscription_limit(void **state) {
        Fixture *f = *state;
        Device a = { .id = "a" }, b = { .id = "b" };

        for (uint8_t t = 1; t <= 3; t++)
                assert_int_equal(subscribe(f, &a, "p", t), COAP_RESPONSE_CODE(205));
        assert_int_equal(subscribe(f, &a, "p", 4), COAP_RESPONSE_CODE(403));
        /* Per device: another device still may. */
        assert_int_equal(subscribe(f, &b, "p", 4), COAP_RESPONSE_CODE(205));
        route(f, "p", NULL);
        assert_int_equal(a.notified, 3);
        assert_int_equal(b.notified, 1);
}

static void test_gone_with_device(void **state) {
        Fixture *f = *state;
        Device a = { .id = "a" }, b = { .id = "b" };

        assert_int_equal(subscribe(f, &a, "s", 1), COAP_RESPONSE_CODE(205));
        assert_int_equal(subscribe(f, &b, "s", 1), COAP_RESPONSE_CODE(205));
        events_device_gone(f->events, &a);
        route(f, "s", NULL);
        assert_int_equal(a.notified, 0);
        assert_int_equal(b.notified, 1);
        /* Its limit is free again once it comes back. */
        for (uint8_t t = 1; t <= 3; t++)
                assert_int_equal(subscribe(f, &a, "s", t), COAP_RESPONSE_CODE(205));
}

static void test_gone_while_routing(void **state) {
        Fixture *f = *state;
        Device a = { .id = "a", .gone_on_notify = true, .notify_error = -ENOBUFS }, b = { .id = "b" };

        assert_int_equal(subscribe(f, &a, "r", 1), COAP_RESPONSE_CODE(205));
        assert_int_equal(subscribe(f, &a, "r", 2), COAP_RESPONSE_CODE(205));
        assert_int_equal(subscribe(f, &b, "r", 1), COAP_RESPONSE_CODE(205));
        route(f, "r", NULL);
        /* One notification, then its session closed: the other
         * subscription of a is skipped, b still gets the event. */
        assert_int_equal(a.notified, 1);
        assert_int_equal(a.undeliverable, 1);
        assert_int_equal(b.notified, 1);
        route(f, "r", NULL);
        assert_int_equal(a.notified, 1);
        assert_int_equal(b.notified, 2);
}

static void test_offline_not_counted(void **state) {
        Fixture *f = *state;
        Device a = { .id = "a", .offline = true };

        assert_int_equal(subscribe(f, &a, "o", 1), COAP_RESPONSE_CODE(205));
        route(f, "o", NULL);
        assert_int_equal(a.notified, 0);
        assert_int_equal(a.undeliverable, 0);
        assert_int_equal(f->flushes, 0);
}

static void test_publish_checks(void **state) {
        Fixture *f = *state;
        Device a = { .id = "a" };
        char big[1100];

        assert_int_equal(publish(f, &a, "bad name", "1", 0), COAP_RESPONSE_CODE(400));
        memset(big, 'x', sizeof(big) - 1);
        big[sizeof(big) - 1] = 0;
        assert_int_equal(publish(f, &a, "big", big, 0), COAP_RESPONSE_CODE(413));
        assert_int_equal(f->streamed, 0);
        assert_int_equal(a.disconnected, 0);
}

/* With a store hook: the hook stores (with the device's epoch and seq),
 * nothing is routed or journaled here; a duplicate it reports is
 * acknowledged; its failure answers 5.03 and closes the session. */
static void test_store_hook(void **state) {
        Fixture *f = *state;
        Device a = { .id = "a" }, b = { .id = "b" };

        assert_int_equal(subscribe(f, &b, "x", 1), COAP_RESPONSE_CODE(205));
        assert_int_equal(publish(f, &a, "x", "1", 5), COAP_RESPONSE_CODE(201));
        assert_int_equal(f->stored, 1);
        assert_int_equal(f->stored_epoch, 0x1234);
        assert_int_equal(f->stored_seq, 5);
        assert_int_equal(f->streamed, 0);
        assert_int_equal(b.notified, 0);
        assert_int_equal(journal_last_id(f->journal), 0);

        f->store_duplicate = true;
        assert_int_equal(publish(f, &a, "x", "1", 5), COAP_RESPONSE_CODE(201));
        assert_int_equal(f->stored, 2);
        f->store_duplicate = false;

        f->store_error = -ETIMEDOUT;
        assert_int_equal(publish(f, &a, "x", "1", 6), COAP_RESPONSE_CODE(503));
        assert_int_equal(a.disconnected, 1);
        assert_int_equal(f->stored, 2);

        /* The cloud's own events take the same way. */
        f->store_error = 0;
        assert_int_equal(events_store(f->events, &(ProtoEvent){ .name = (char *)"y", .coreid = (char *)"api" }, NULL,
                                      0, 0, NULL),
                         0);
        assert_int_equal(f->stored, 3);
        assert_int_equal(f->streamed, 0);
}

/* A journal that caches another's ids: journal_append_at() with gaps,
 * ids that must grow, cursors and reopening keep them; journal_reset()
 * starts afresh with a given epoch and sets the old file aside. */
static void test_journal_append_at_and_reset(void **state) {
        Fixture *f = *state;
        ProtoEvent e = { .name = (char *)"n", .data = (char *)"d", .published_at = (char *)"2026-01-01T00:00:00.000Z",
                         .coreid = (char *)"dev" }, got;
        JournalCursor c;
        uint64_t id;
        char path[128];

        assert_int_equal(journal_append_at(f->journal, &e, 9, 1, 5), 0);
        assert_int_equal(journal_append_at(f->journal, &e, 9, 2, 9), 0);
        assert_int_equal(journal_append_at(f->journal, &e, 9, 3, 9), -EINVAL);
        assert_int_equal(journal_append_at(f->journal, &e, 9, 3, 3), -EINVAL);
        assert_int_equal(journal_last_id(f->journal), 9);
        assert_true(journal_seen(f->journal, "dev", 9, 2));
        assert_int_equal(journal_append(f->journal, &e, 0, 0, &id), 0);
        assert_int_equal(id, 10);

        journal_cursor_init(&c, f->journal, 0);
        assert_int_equal(journal_cursor_next(&c, &got, &id), 1);
        assert_int_equal(id, 5);
        proto_event_done(&got);
        assert_int_equal(journal_cursor_next(&c, &got, &id), 1);
        assert_int_equal(id, 9);
        proto_event_done(&got);
        journal_cursor_done(&c);

        /* Reopened: the same ids and states. */
        f->journal = journal_free(f->journal);
        assert_int_equal(journal_new(f->event, &f->config, &f->journal), 0);
        assert_int_equal(journal_last_id(f->journal), 10);
        assert_true(journal_seen(f->journal, "dev", 9, 2));

        assert_int_equal(journal_reset(f->journal, 0x77), 0);
        assert_int_equal(journal_epoch(f->journal), 0x77);
        assert_int_equal(journal_last_id(f->journal), 0);
        assert_false(journal_seen(f->journal, "dev", 9, 2));
        snprintf(path, sizeof(path), "%s/events.journal.old", f->dir);
        assert_int_equal(access(path, F_OK), 0);
        assert_int_equal(journal_append_at(f->journal, &e, 9, 1, 100), 0);

        f->journal = journal_free(f->journal);
        assert_int_equal(journal_new(f->event, &f->config, &f->journal), 0);
        assert_int_equal(journal_epoch(f->journal), 0x77);
        assert_int_equal(journal_last_id(f->journal), 100);
        /* Events need the journal they were made with. */
        events_free(f->events);
        f->events = NULL;
}

/* The backlog (journal_retain()): compaction keeps every event above the
 * retained id, up to BacklogMaxMB=, then drops the oldest of them (a
 * reader sees the gap); without a backlog the file stays near
 * JournalMaxBytes. */
static void test_journal_backlog(void **state) {
        Fixture *f = *state;
        char data[200];
        ProtoEvent e = { .name = (char *)"n", .data = data, .published_at = (char *)"2026-01-01T00:00:00.000Z",
                         .coreid = (char *)"dev" }, got;
        JournalCursor c;
        uint64_t id, expect, n = 0;
        struct stat st;
        char path[128];

        memset(data, 'x', sizeof(data) - 1);
        data[sizeof(data) - 1] = 0;
        f->journal = journal_free(f->journal);
        f->config.journal_max_bytes = 65536;
        f->config.backlog_max_mb = 1;
        assert_int_equal(journal_new(f->event, &f->config, &f->journal), 0);
        snprintf(path, sizeof(path), "%s/events.journal", f->dir);

        /* About 600 KiB of events after id 10: all kept. */
        for (unsigned i = 0; i < 10; i++)
                assert_int_equal(journal_append(f->journal, &e, 0, 0, &id), 0);
        journal_retain(f->journal, 10);
        for (unsigned i = 0; i < 2500; i++)
                assert_int_equal(journal_append(f->journal, &e, 0, 0, &id), 0);
        assert_int_equal(stat(path, &st), 0);
        assert_true(st.st_size > 512 * 1024);
        journal_cursor_init(&c, f->journal, 10);
        for (expect = 11; journal_cursor_next(&c, &got, &id) == 1; expect++, n++) {
                assert_int_equal(id, expect);
                proto_event_done(&got);
        }
        journal_cursor_done(&c);
        assert_int_equal(n, 2500);

        /* Past 1 MiB of backlog: the oldest go, the file stays bounded. */
        for (unsigned i = 0; i < 5000; i++)
                assert_int_equal(journal_append(f->journal, &e, 0, 0, &id), 0);
        assert_int_equal(stat(path, &st), 0);
        assert_true(st.st_size <= (1 << 20) + 65536);
        journal_cursor_init(&c, f->journal, 10);
        assert_int_equal(journal_cursor_next(&c, &got, &id), 1);
        assert_true(id > 11);
        proto_event_done(&got);
        journal_cursor_done(&c);

        /* No backlog: back to JournalMaxBytes. */
        journal_retain(f->journal, JOURNAL_RETAIN_NONE);
        for (unsigned i = 0; i < 2000; i++)
                assert_int_equal(journal_append(f->journal, &e, 0, 0, &id), 0);
        assert_int_equal(stat(path, &st), 0);
        assert_true(st.st_size <= (1 << 20) + 65536);
        for (unsigned i = 0; i < 2000; i++)
                assert_int_equal(journal_append(f->journal, &e, 0, 0, &id), 0);
        assert_int_equal(stat(path, &st), 0);
        assert_true(st.st_size <= 65536 + 1024);
}

int main(int argc, char **argv) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test_setup_teardown(test_route_matching_only, setup, teardown),
                cmocka_unit_test_setup_teardown(test_not_to_publisher, setup, teardown),
                cmocka_unit_test_setup_teardown(test_observe_numbers_and_cancel, setup, teardown),
                cmocka_unit_test_setup_teardown(test_subscription_limit, setup, teardown),
                cmocka_unit_test_setup_teardown(test_gone_with_device, setup, teardown),
                cmocka_unit_test_setup_teardown(test_gone_while_routing, setup, teardown),
                cmocka_unit_test_setup_teardown(test_offline_not_counted, setup, teardown),
                cmocka_unit_test_setup_teardown(test_publish_checks, setup, teardown),
                cmocka_unit_test_setup_teardown(test_store_hook, setup_store, teardown),
                cmocka_unit_test_setup_teardown(test_journal_append_at_and_reset, setup, teardown),
                cmocka_unit_test_setup_teardown(test_journal_backlog, setup, teardown),
        };

        log_set_max_level(LOG_WARNING);
        coap_startup();
        /* One test, or those a glob matches: test-foo NAME (HACKING.md). */
        if (argc > 1)
                cmocka_set_test_filter(argv[1]);
        return cmocka_run_group_tests(tests, NULL, NULL);
}
