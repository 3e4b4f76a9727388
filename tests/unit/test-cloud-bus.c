/* SPDX-License-Identifier: Apache-2.0 */
/* Unit tests for the cloud's NATS connection (cloud/bus.c) against a real
 * nats-server (standalone, JetStream, random loopback port, own store):
 * every callback runs on the loop's thread; requests get their reply,
 * -EHOSTUNREACH, -ETIMEDOUT, or nothing once cancelled; JetStream
 * publishes are acknowledged (duplicates detected by Nats-Msg-Id); stream
 * follows deliver in order from a sequence; key-value watches see the
 * initial values, the end marker, puts and deletes; freeing a
 * subscription or the Bus drops what was queued for it; and the subject
 * encoding of event names round-trips. Exits 77 without nats-server. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <inttypes.h>
#include <jansson.h>
#include <limits.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "cloud/bus.h"
#include "lib/util.h"
#include "nats-test.h"

static char server_url[64];
static pthread_t loop_thread;
static double time_factor = 3;

static uint64_t usec(double seconds) {
        return (uint64_t)(seconds * time_factor * 1e6);
}

static NatsServer main_server = { .pid = -1 };

static int group_setup(void **state _unused_) {
        const char *tf = getenv("TETHER_TEST_TIME_FACTOR");

        if (tf && atof(tf) >= 0.1)
                time_factor = atof(tf);
        loop_thread = pthread_self();
        assert_int_equal(nats_server_new(&main_server, "test-cloud-bus", usec(10)), 0);
        snprintf(server_url, sizeof(server_url), "nats://127.0.0.1:%d", main_server.port);
        return 0;
}

static int group_teardown(void **state _unused_) {
        nats_server_free(&main_server);
        return 0;
}

typedef struct Fixture {
        sd_event *event;
        Bus *bus;
} Fixture;

static int setup(void **state) {
        Fixture *f = calloc(1, sizeof(*f));
        BusConfig c = { .servers = server_url, .name = "test" };

        assert_non_null(f);
        assert_int_equal(sd_event_new(&f->event), 0);
        assert_int_equal(bus_new(f->event, &c, NULL, &f->bus), 0);
        assert_true(bus_connected(f->bus));
        *state = f;
        return 0;
}

static int teardown(void **state) {
        Fixture *f = *state;

        bus_free(f->bus);
        sd_event_unref(f->event);
        free(f);
        return 0;
}

/* Run the loop until *done (true) or the deadline (false). */
static bool run_until(Fixture *f, const bool *done, double seconds) {
        uint64_t deadline = now_usec() + usec(seconds);

        while (!*done && now_usec() < deadline)
                assert_true(sd_event_run(f->event, 100 * 1000) >= 0);
        return *done;
}

/* ---- core publish/subscribe, request/reply ------------------------------------ */

typedef struct Received {
        unsigned n;
        bool done;
        unsigned want;
        char data[16][64];
        char header[64];
        uint64_t seq[64];
        Bus *free_bus; /* bus_free() this from the first callback */
        BusSub **free_sub; /* bus_sub_free() this from the first callback */
} Received;

static void on_msg(void *userdata, natsMsg *msg) {
        Received *r = userdata;
        const char *h = bus_msg_header(msg, "Tether-Node");

        assert_true(pthread_equal(pthread_self(), loop_thread));
        if (r->n < ELEMENTSOF(r->data))
                snprintf(r->data[r->n], sizeof(r->data[0]), "%.*s", natsMsg_GetDataLength(msg), natsMsg_GetData(msg));
        if (r->n < ELEMENTSOF(r->seq))
                r->seq[r->n] = bus_msg_seq(msg);
        if (h)
                snprintf(r->header, sizeof(r->header), "%s", h);
        r->n++;
        r->done = r->n >= r->want;
        if (r->free_sub && *r->free_sub)
                *r->free_sub = bus_sub_free(*r->free_sub);
        if (r->free_bus)
                r->free_bus = bus_free(r->free_bus);
}

static void test_publish_subscribe(void **state) {
        Fixture *f = *state;
        Received got = { .want = 2 };
        BusSub *s = NULL;
        const char *headers[] = { "Tether-Node", "n1", NULL };

        assert_int_equal(bus_subscribe(f->bus, "t.ps.>", NULL, on_msg, &got, &s), 0);
        assert_int_equal(bus_publish(f->bus, "t.ps.a", headers, "one", 3), 0);
        assert_int_equal(bus_publish(f->bus, "t.ps.b.c", NULL, "two", 3), 0);
        assert_int_equal(bus_publish(f->bus, "t.other", NULL, "no", 2), 0);
        assert_true(run_until(f, &got.done, 5));
        assert_string_equal(got.data[0], "one");
        assert_string_equal(got.data[1], "two");
        assert_string_equal(got.header, "n1");
        assert_int_equal(got.seq[0], 0);
        bus_sub_free(s);
        assert_int_equal(bus_publish(f->bus, "t.ps.a", NULL, "x", 1), -0);
        assert_int_equal(bus_publish(f->bus, "t.ps.a", (const char *[]){ "odd", NULL }, "x", 1), -EINVAL);
        /* Nothing that would be read as more protocol fields or lines. */
        assert_int_equal(bus_publish(f->bus, "t.ps a", NULL, "x", 1), -EINVAL);
        assert_int_equal(bus_publish(f->bus, "t.ps\r\nPUB x 1", NULL, "x", 1), -EINVAL);
        assert_int_equal(bus_publish(f->bus, "t..a", NULL, "x", 1), -EINVAL);
        assert_int_equal(bus_publish(f->bus, "t.a.", NULL, "x", 1), -EINVAL);
        assert_int_equal(bus_publish(f->bus, "t.*", NULL, "x", 1), -EINVAL);
        assert_int_equal(bus_publish(f->bus, "", NULL, "x", 1), -EINVAL);
        assert_int_equal(bus_publish(f->bus, "t.a", (const char *[]){ "A", "1\r\nB: 2", NULL }, "x", 1), -EINVAL);
        assert_int_equal(bus_publish(f->bus, "t.a", (const char *[]){ "A:B", "1", NULL }, "x", 1), -EINVAL);
        assert_int_equal(bus_subscribe(f->bus, "t.>.a", NULL, on_msg, &got, &s), -EINVAL);
        assert_int_equal(bus_subscribe(f->bus, "t a", NULL, on_msg, &got, &s), -EINVAL);
}

typedef struct Server {
        Fixture *f;
        unsigned n;
} Server;

static void on_request(void *userdata, natsMsg *msg) {
        Server *s = userdata;
        char answer[80];

        assert_true(pthread_equal(pthread_self(), loop_thread));
        snprintf(answer, sizeof(answer), "re:%.*s", natsMsg_GetDataLength(msg), natsMsg_GetData(msg));
        assert_int_equal(bus_respond(s->f->bus, msg, answer, strlen(answer)), 0);
        s->n++;
}

typedef struct Reply {
        bool done;
        int error;
        char data[64];
        unsigned calls;
        bool *returned; /* set after bus_request() returned */
        BusRequest **cancel; /* cancelled from this callback */
} Reply;

static void on_reply(void *userdata, int error, natsMsg *reply) {
        Reply *r = userdata;

        assert_true(pthread_equal(pthread_self(), loop_thread));
        if (r->returned)
                assert_true(*r->returned);
        r->calls++;
        r->done = true;
        r->error = error;
        if (error == 0) {
                assert_non_null(reply);
                snprintf(r->data, sizeof(r->data), "%.*s", natsMsg_GetDataLength(reply), natsMsg_GetData(reply));
        } else
                assert_null(reply);
        if (r->cancel && *r->cancel) {
                bus_request_cancel(*r->cancel);
                *r->cancel = NULL;
        }
}

/* Subscriptions freed while messages for them are in flight: libnats'
 * reader thread may hold one without a reference (cloud/bus.c, "unsubscribed
 * subscriptions"); they are destroyed only after a barrier, and all of
 * them soon. A use after free here is what the sanitizer build and
 * valgrind catch. */
static void test_unsubscribe_under_traffic(void **state) {
        Fixture *f = *state;
        Received got = { .want = UINT_MAX };
        uint64_t deadline;

        for (unsigned i = 0; i < 400; i++) {
                BusSub *s = NULL;

                assert_int_equal(bus_subscribe(f->bus, "t.flood", NULL, on_msg, &got, &s), 0);
                for (unsigned k = 0; k < 20; k++)
                        assert_int_equal(bus_publish(f->bus, "t.flood", NULL, "x", 1), 0);
                if (i % 4 == 0)
                        assert_true(sd_event_run(f->event, 0) >= 0);
                bus_sub_free(s);
        }
        assert_true(bus_parked(f->bus) > 0);
        deadline = now_usec() + usec(10);
        while (bus_parked(f->bus) > 0 && now_usec() < deadline)
                assert_true(sd_event_run(f->event, 100 * 1000) >= 0);
        assert_int_equal(bus_parked(f->bus), 0);
}

static void test_request(void **state) {
        Fixture *f = *state;
        Server srv = { .f = f };
        BusSub *s = NULL, *silent = NULL;
        Received ignored = { .want = 1000 };
        Reply ok = { 0 }, nobody = { 0 }, late = { 0 };
        bool returned = false;
        BusRequest *req = NULL;

        assert_int_equal(bus_subscribe(f->bus, "t.svc", "workers", on_request, &srv, &s), 0);
        assert_int_equal(bus_subscribe(f->bus, "t.silent", NULL, on_msg, &ignored, &silent), 0);
        assert_int_equal(natsConnection_Flush(bus_connection(f->bus)), NATS_OK);

        ok.returned = &returned;
        assert_int_equal(bus_request(f->bus, "t.svc", NULL, "ping", 4, usec(5), on_reply, &ok, &req), 0);
        returned = true;
        assert_non_null(req);
        assert_true(run_until(f, &ok.done, 5));
        assert_int_equal(ok.error, 0);
        assert_string_equal(ok.data, "re:ping");
        assert_int_equal(srv.n, 1);

        assert_int_equal(bus_request(f->bus, "t.nobody", NULL, "ping", 4, usec(5), on_reply, &nobody, NULL), 0);
        assert_true(run_until(f, &nobody.done, 5));
        assert_int_equal(nobody.error, -EHOSTUNREACH);

        assert_int_equal(bus_request(f->bus, "t.silent", NULL, "ping", 4, 300 * 1000, on_reply, &late, NULL), 0);
        assert_true(run_until(f, &late.done, 5));
        assert_int_equal(late.error, -ETIMEDOUT);
        assert_int_equal(ignored.n, 1);
        assert_int_equal(ok.calls + nobody.calls + late.calls, 3);

        bus_sub_free(silent);
        bus_sub_free(s);
}

/* A request cancelled before its reply came, or while its reply is
 * queued (from the callback of the request answered just before it): its
 * callback never runs; the others' do. */
static void test_request_cancel(void **state) {
        Fixture *f = *state;
        Server srv = { .f = f };
        BusSub *s = NULL;
        BusRequest *r1 = NULL, *r3 = NULL;
        Reply a = { 0 }, b = { 0 }, c = { 0 }, d = { 0 };

        assert_int_equal(bus_subscribe(f->bus, "t.svc2", NULL, on_request, &srv, &s), 0);
        assert_int_equal(natsConnection_Flush(bus_connection(f->bus)), NATS_OK);

        assert_int_equal(bus_request(f->bus, "t.svc2", NULL, "1", 1, usec(5), on_reply, &a, &r1), 0);
        assert_int_equal(bus_request(f->bus, "t.svc2", NULL, "2", 1, usec(5), on_reply, &b, NULL), 0);
        assert_int_equal(bus_request(f->bus, "t.svc2", NULL, "3", 1, usec(5), on_reply, &c, &r3), 0);
        bus_request_cancel(r1);
        b.cancel = &r3;
        assert_true(run_until(f, &b.done, 5));
        assert_null(r3);
        /* A later request completes after anything 3 had queued. */
        assert_int_equal(bus_request(f->bus, "t.svc2", NULL, "4", 1, usec(5), on_reply, &d, NULL), 0);
        assert_true(run_until(f, &d.done, 5));
        assert_string_equal(d.data, "re:4");
        assert_int_equal(srv.n, 4);
        assert_int_equal(a.calls, 0);
        assert_int_equal(b.calls, 1);
        assert_int_equal(c.calls, 0);
        assert_int_equal(d.calls, 1);
        bus_sub_free(s);
}

/* bus_sub_free() from a callback: what was queued for it is dropped;
 * bus_free() with requests pending and messages queued. */
static void test_free_with_queued(void **state) {
        Fixture *f = *state;
        BusSub *first = NULL, *second = NULL;
        BusSub *quiet = NULL;
        Received a = { .want = 1 }, b = { .want = 50 }, silent = { .want = 1000 };
        Reply never = { 0 };

        assert_int_equal(bus_subscribe(f->bus, "t.q", NULL, on_msg, &a, &first), 0);
        assert_int_equal(bus_subscribe(f->bus, "t.q", NULL, on_msg, &b, &second), 0);
        a.free_sub = &first;
        for (int i = 0; i < 50; i++)
                assert_int_equal(bus_publish(f->bus, "t.q", NULL, "m", 1), 0);
        /* Two delivery threads: the subscriptions' messages interleave. */
        assert_true(run_until(f, &b.done, 5));
        assert_true(run_until(f, &a.done, 5));
        assert_int_equal(a.n, 1);
        assert_null(first);

        /* Free the Bus from a callback while more are queued. */
        b.free_bus = f->bus;
        b.want = 1000;
        b.n = 0;
        assert_int_equal(bus_subscribe(f->bus, "t.silent2", NULL, on_msg, &silent, &quiet), 0);
        assert_int_equal(natsConnection_Flush(bus_connection(f->bus)), NATS_OK);
        assert_int_equal(bus_request(f->bus, "t.silent2", NULL, "x", 1, usec(5), on_reply, &never, NULL), 0);
        for (int i = 0; i < 50; i++)
                assert_int_equal(bus_publish(f->bus, "t.q", NULL, "m", 1), 0);
        assert_int_equal(natsConnection_Flush(bus_connection(f->bus)), NATS_OK);
        /* cppcheck-suppress knownConditionTrueFalse ; on_msg() counts from sd_event_run() */
        while (b.n == 0)
                assert_true(sd_event_run(f->event, 100 * 1000) >= 0);
        assert_null(b.free_bus);
        f->bus = NULL; /* freed from the callback; second went with it */
        /* Nothing of it runs any more. */
        for (int i = 0; i < 3; i++)
                assert_true(sd_event_run(f->event, 10 * 1000) >= 0);
        assert_int_equal(b.n, 1);
        assert_int_equal(never.calls, 0);
        (void)quiet;
}

/* ---- JetStream ----------------------------------------------------------------- */

typedef struct Ack {
        bool done;
        int error;
        uint64_t seq;
        bool duplicate;
} Ack;

static void on_ack(void *userdata, int error, uint64_t seq, bool duplicate) {
        Ack *a = userdata;

        assert_true(pthread_equal(pthread_self(), loop_thread));
        a->done = true;
        a->error = error;
        a->seq = seq;
        a->duplicate = duplicate;
}

static void stream_setup(Fixture *f, const char *name, const char *subject, int64_t *created) {
        jsStreamConfig c;
        const char *subjects[] = { subject };

        jsStreamConfig_Init(&c);
        c.Name = name;
        c.Subjects = subjects;
        c.SubjectsLen = 1;
        c.Storage = js_FileStorage;
        c.Duplicates = 10LL * 60 * 1000 * 1000 * 1000;
        assert_int_equal(bus_stream_ensure(f->bus, &c, created), 0);
}

static void test_js_publish(void **state) {
        Fixture *f = *state;
        int64_t created = 0, again = 0;
        uint64_t seq = 0;
        bool dup = true;
        const char *id1[] = { "Nats-Msg-Id", "dev1:1:1", NULL };
        const char *id2[] = { "Nats-Msg-Id", "dev1:1:2", "Tether-Node", "n1", NULL };
        Ack a1 = { 0 }, a2 = { 0 }, nostream = { 0 };

        stream_setup(f, "TEST_PUB", "tp.>", &created);
        assert_true(created > 0);
        stream_setup(f, "TEST_PUB", "tp.>", &again);
        assert_true(again == created);

        assert_int_equal(bus_js_publish(f->bus, "tp.a", id1, "{}", 2, usec(5), &seq, &dup), 0);
        assert_int_equal(seq, 1);
        assert_false(dup);
        assert_int_equal(bus_js_publish(f->bus, "tp.a", id1, "{}", 2, usec(5), &seq, &dup), 0);
        assert_int_equal(seq, 1);
        assert_true(dup);
        assert_int_equal(bus_js_publish(f->bus, "nostream.a", NULL, "{}", 2, usec(5), &seq, &dup), -EHOSTUNREACH);

        assert_int_equal(bus_js_publish_async(f->bus, "tp.b", id2, "{}", 2, usec(5), on_ack, &a1, NULL), 0);
        assert_true(run_until(f, &a1.done, 5));
        assert_int_equal(a1.error, 0);
        assert_int_equal(a1.seq, 2);
        assert_false(a1.duplicate);
        assert_int_equal(bus_js_publish_async(f->bus, "tp.b", id2, "{}", 2, usec(5), on_ack, &a2, NULL), 0);
        assert_true(run_until(f, &a2.done, 5));
        assert_int_equal(a2.error, 0);
        assert_int_equal(a2.seq, 2);
        assert_true(a2.duplicate);
        assert_int_equal(
                bus_js_publish_async(f->bus, "nostream.b", NULL, "{}", 2, usec(5), on_ack, &nostream, NULL), 0);
        assert_true(run_until(f, &nostream.done, 5));
        assert_int_equal(nostream.error, -EHOSTUNREACH);
}

static void test_stream_follow(void **state) {
        Fixture *f = *state;
        Received all = { .want = 8 }, filtered = { .want = 3 };
        BusSub *s1 = NULL, *s2 = NULL;
        char data[16];

        stream_setup(f, "TEST_FOLLOW", "tf.>", NULL);
        for (int i = 1; i <= 6; i++) {
                snprintf(data, sizeof(data), "%d", i);
                assert_int_equal(bus_js_publish(f->bus, i % 2 ? "tf.odd" : "tf.even", NULL, data, strlen(data),
                                                usec(5), NULL, NULL),
                                 0);
        }
        /* From 3, everything, then what comes while following. */
        assert_int_equal(bus_stream_follow(f->bus, "TEST_FOLLOW", NULL, 3, on_msg, &all, &s1), 0);
        /* From 0 (the start), the even ones. */
        assert_int_equal(bus_stream_follow(f->bus, "TEST_FOLLOW", "tf.even", 0, on_msg, &filtered, &s2), 0);
        for (int i = 7; i <= 10; i++) {
                snprintf(data, sizeof(data), "%d", i);
                assert_int_equal(bus_js_publish(f->bus, i % 2 ? "tf.odd" : "tf.even", NULL, data, strlen(data),
                                                usec(5), NULL, NULL),
                                 0);
        }
        assert_true(run_until(f, &all.done, 10));
        assert_true(run_until(f, &filtered.done, 10));
        for (unsigned i = 0; i < 8; i++) {
                snprintf(data, sizeof(data), "%u", i + 3);
                assert_string_equal(all.data[i], data);
                assert_int_equal(all.seq[i], i + 3);
        }
        assert_string_equal(filtered.data[0], "2");
        assert_string_equal(filtered.data[1], "4");
        assert_string_equal(filtered.data[2], "6");
        assert_int_equal(filtered.seq[2], 6);
        bus_sub_free(s1);
        bus_sub_free(s2);
}

/* ---- key-value ------------------------------------------------------------------- */

typedef struct KvLog {
        unsigned n;
        char lines[32][64];
} KvLog;

static void on_kv(void *userdata, const char *key, const void *value, size_t len, uint64_t revision,
                  int64_t time_ns) {
        KvLog *l = userdata;
        struct timespec ts;

        assert_true(pthread_equal(pthread_self(), loop_thread));
        /* Stamped by the server that stored it: this machine's clock. */
        clock_gettime(CLOCK_REALTIME, &ts);
        if (key)
                assert_true(time_ns > 0 && llabs((int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec - time_ns) <
                                                   600 * 1000000000LL);
        else
                assert_int_equal(time_ns, 0);
        if (l->n >= ELEMENTSOF(l->lines))
                return;
        if (!key)
                snprintf(l->lines[l->n++], sizeof(l->lines[0]), "END");
        else if (!value) {
                assert_int_equal(len, 0);
                assert_true(revision > 0);
                snprintf(l->lines[l->n++], sizeof(l->lines[0]), "DEL %s", key);
        } else {
                assert_true(revision > 0);
                snprintf(l->lines[l->n++], sizeof(l->lines[0]), "PUT %s=%.*s", key, (int)len, (const char *)value);
        }
}

static bool kv_wait_for(Fixture *f, KvLog *l, unsigned n, double seconds) {
        uint64_t deadline = now_usec() + usec(seconds);

        while (l->n < n && now_usec() < deadline)
                assert_true(sd_event_run(f->event, 100 * 1000) >= 0);
        return l->n >= n;
}

static bool kv_wait(Fixture *f, KvLog *l, unsigned n) {
        return kv_wait_for(f, l, n, 5);
}

static void test_kv(void **state) {
        Fixture *f = *state;
        KvLog empty = { 0 }, later = { 0 };
        BusSub *w1 = NULL, *w2 = NULL;
        jsStreamInfo *si = NULL;

        assert_int_equal(bus_kv_ensure(f->bus, "TEST_KV", 1, 0), 0);
        assert_int_equal(bus_kv_ensure(f->bus, "TEST_KV", 1, 0), 0);
        assert_int_equal(bus_kv_ensure(f->bus, "bad.name", 1, 0), -EINVAL);
        assert_int_equal(bus_kv_put(f->bus, "TEST_KV", "bad.key", "x", 1), -EINVAL);

        assert_int_equal(bus_kv_watch(f->bus, "TEST_KV", on_kv, &empty, &w1), 0);
        assert_true(kv_wait(f, &empty, 1));
        assert_string_equal(empty.lines[0], "END");

        assert_int_equal(bus_kv_put(f->bus, "TEST_KV", "dev1", "n1", 2), 0);
        assert_int_equal(bus_kv_put(f->bus, "TEST_KV", "dev2", "n2", 2), 0);
        assert_true(kv_wait(f, &empty, 3));
        assert_string_equal(empty.lines[1], "PUT dev1=n1");
        assert_string_equal(empty.lines[2], "PUT dev2=n2");
        assert_int_equal(bus_kv_delete(f->bus, "TEST_KV", "dev1"), 0);
        assert_true(kv_wait(f, &empty, 4));
        assert_string_equal(empty.lines[3], "DEL dev1");

        /* A watcher started now: the current values in the order they
         * were written (the deleted key as a deletion), then the marker,
         * then changes. */
        assert_int_equal(bus_kv_watch(f->bus, "TEST_KV", on_kv, &later, &w2), 0);
        assert_true(kv_wait(f, &later, 3));
        assert_string_equal(later.lines[0], "PUT dev2=n2");
        assert_string_equal(later.lines[1], "DEL dev1");
        assert_string_equal(later.lines[2], "END");
        assert_int_equal(bus_kv_put(f->bus, "TEST_KV", "dev1", "n3", 2), 0);
        assert_true(kv_wait(f, &later, 4));
        assert_string_equal(later.lines[3], "PUT dev1=n3");
        bus_sub_free(w1);
        bus_sub_free(w2);

        /* A bucket with a TTL. */
        assert_int_equal(bus_kv_ensure(f->bus, "TEST_KV_TTL", 1, 15 * 1000 * 1000), 0);
        assert_int_equal(js_GetStreamInfo(&si, bus_js(f->bus), "KV_TEST_KV_TTL", NULL, NULL), NATS_OK);
        assert_true(si->Config->MaxAge == 15LL * 1000 * 1000 * 1000);
        assert_int_equal(si->Config->MaxMsgsPerSubject, 1);
        jsStreamInfo_Destroy(si);
}

/* ---- connection loss ---------------------------------------------------------- */

typedef struct ConnLog {
        unsigned down, up;
        bool is_down, is_up;
} ConnLog;

static void on_connection(void *userdata, bool up) {
        ConnLog *l = userdata;

        assert_true(pthread_equal(pthread_self(), loop_thread));
        if (up)
                l->up++;
        else
                l->down++;
        l->is_up = up;
        l->is_down = !up;
}

static void test_connect_refused(void **state _unused_) {
        char url[64];
        BusConfig c = { .servers = url, .name = "test" };
        sd_event *event = NULL;
        Bus *b = NULL;
        NatsServer gone = { .pid = -1 };

        /* A port nothing listens on (any more). */
        assert_int_equal(nats_server_new(&gone, "test-cloud-bus", usec(10)), 0);
        snprintf(url, sizeof(url), "nats://127.0.0.1:%d , nats://127.0.0.1:%d", gone.port, gone.port);
        nats_server_free(&gone);
        assert_int_equal(sd_event_new(&event), 0);
        assert_int_equal(bus_new(event, &c, NULL, &b), -ENOTCONN);
        assert_null(b);
        c.servers = " , ";
        assert_int_equal(bus_new(event, &c, NULL, &b), -EINVAL);
        sd_event_unref(event);
}

/* The server is killed and started again on the same port and store:
 * the hook tells both, pending requests fail at once with -ENOTCONN, new
 * ones are refused meanwhile, and afterwards the stream follow and the
 * key-value watch go on where they were, nothing repeated. */
static void test_reconnect(void **state _unused_) {
        NatsServer srv = { .pid = -1 };
        ConnLog conn = { 0 };
        BusHooks hooks = { .userdata = &conn, .connection = on_connection };
        char url[64];
        BusConfig c = { .servers = url, .name = "test" };
        Fixture f = { 0 };
        Received follow = { .want = 1 }, ignored = { .want = 1000 };
        KvLog kv = { 0 };
        BusSub *fs = NULL, *ws = NULL, *silent = NULL;
        Reply pending = { 0 }, refused = { 0 };
        uint64_t seq = 0;

        assert_int_equal(nats_server_new(&srv, "test-cloud-bus", usec(10)), 0);
        snprintf(url, sizeof(url), "nats://127.0.0.1:%d", srv.port);
        assert_int_equal(sd_event_new(&f.event), 0);
        assert_int_equal(bus_new(f.event, &c, &hooks, &f.bus), 0);

        stream_setup(&f, "TEST_RECONNECT", "tr.>", NULL);
        assert_int_equal(bus_kv_ensure(f.bus, "TEST_RC", 1, 0), 0);
        assert_int_equal(bus_stream_follow(f.bus, "TEST_RECONNECT", NULL, 1, on_msg, &follow, &fs), 0);
        assert_int_equal(bus_kv_watch(f.bus, "TEST_RC", on_kv, &kv, &ws), 0);
        assert_int_equal(bus_js_publish(f.bus, "tr.a", NULL, "1", 1, usec(5), &seq, NULL), 0);
        assert_true(run_until(&f, &follow.done, 5));
        assert_true(kv_wait(&f, &kv, 1));
        assert_string_equal(kv.lines[0], "END");
        assert_int_equal(bus_subscribe(f.bus, "t.rc.silent", NULL, on_msg, &ignored, &silent), 0);
        assert_int_equal(bus_request(f.bus, "t.rc.silent", NULL, "x", 1, usec(60), on_reply, &pending, NULL), 0);
        while (ignored.n == 0)
                assert_true(sd_event_run(f.event, 100 * 1000) >= 0);

        nats_server_kill(&srv, SIGKILL);
        assert_true(run_until(&f, &conn.is_down, 10));
        assert_true(run_until(&f, &pending.done, 1));
        assert_int_equal(pending.error, -ENOTCONN);
        assert_false(bus_connected(f.bus));
        assert_int_equal(bus_request(f.bus, "t.rc.silent", NULL, "x", 1, usec(5), on_reply, &refused, NULL),
                         -ENOTCONN);
        assert_int_equal(bus_js_publish(f.bus, "tr.a", NULL, "x", 1, usec(5), NULL, NULL), -ENOTCONN);
        assert_int_equal(bus_kv_put(f.bus, "TEST_RC", "k", "v", 1), -ENOTCONN);

        assert_int_equal(nats_server_start(&srv, usec(10)), 0);
        assert_true(run_until(&f, &conn.is_up, 10));
        assert_true(bus_connected(f.bus));
        assert_int_equal(conn.down, 1);
        assert_int_equal(conn.up, 1);

        follow.want = 2;
        follow.done = false;
        assert_int_equal(bus_js_publish(f.bus, "tr.a", NULL, "2", 1, usec(5), &seq, NULL), 0);
        assert_int_equal(seq, 2);
        assert_int_equal(bus_kv_put(f.bus, "TEST_RC", "k", "v", 1), 0);
        /* The follow made a new consumer from the next sequence when the
         * connection came back. */
        assert_true(run_until(&f, &follow.done, 10));
        assert_true(kv_wait_for(&f, &kv, 2, 30));
        assert_int_equal(follow.n, 2);
        assert_string_equal(follow.data[1], "2");
        assert_int_equal(follow.seq[1], 2);
        assert_string_equal(kv.lines[1], "PUT k=v");
        assert_int_equal(refused.calls, 0);

        bus_sub_free(silent);
        bus_sub_free(ws);
        bus_sub_free(fs);
        bus_free(f.bus);
        sd_event_unref(f.event);
        nats_server_free(&srv);
}

/* ---- a cluster losing a server ------------------------------------------------- */

/* A loopback port free now (for a cluster's routes, which must be known
 * before the servers start). */
static int free_port(void) {
        struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
        socklen_t len = sizeof(a);
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), port;

        assert_true(fd >= 0);
        assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof(a)), 0);
        assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &len), 0);
        port = ntohs(a.sin_port);
        close(fd);
        return port;
}

typedef struct InOrder {
        unsigned n;       /* messages "1".."n" came, in order, sequences rising */
        unsigned want;
        uint64_t last_seq;
        bool wrong, done;
} InOrder;

static void on_in_order(void *userdata, natsMsg *msg) {
        InOrder *o = userdata;
        char want[16];
        uint64_t seq = bus_msg_seq(msg);

        snprintf(want, sizeof(want), "%u", o->n + 1);
        if ((size_t)natsMsg_GetDataLength(msg) != strlen(want) || memcmp(natsMsg_GetData(msg), want, strlen(want)) ||
            seq <= o->last_seq) {
                fprintf(stderr, "wanted %s after seq %" PRIu64 ", got '%.*s' seq %" PRIu64 "\n", want, o->last_seq,
                        natsMsg_GetDataLength(msg), natsMsg_GetData(msg), seq);
                o->wrong = true;
        }
        o->last_seq = seq;
        o->n++;
        o->done = o->wrong || o->n >= o->want;
}

/* Publish "i" (a Nats-Msg-Id: a retry is not stored twice), retrying
 * while JetStream has no leader for the stream. */
static void publish_retrying(Fixture *f, unsigned i) {
        char data[16], id[32];
        const char *headers[] = { "Nats-Msg-Id", id, NULL };
        uint64_t deadline = now_usec() + usec(30);
        int r;

        snprintf(data, sizeof(data), "%u", i);
        snprintf(id, sizeof(id), "tcl-%u", i);
        do {
                bool done = false;

                r = bus_js_publish(f->bus, "tcl.a", headers, data, strlen(data), usec(2), NULL, NULL);
                if (r < 0)
                        (void)run_until(f, &done, 0.2); /* the loop runs meanwhile; nothing to wait for */
        } while (r < 0 && now_usec() < deadline);
        assert_int_equal(r, 0);
}

typedef struct Leader {
        bool done;
        char name[16];
} Leader;

static void on_consumer_list(void *userdata, int error, natsMsg *reply) {
        Leader *l = userdata;
        json_t *j, *leader;

        l->done = true;
        if (error < 0)
                return;
        j = json_loadb(natsMsg_GetData(reply), (size_t)natsMsg_GetDataLength(reply), 0, NULL);
        leader = json_object_get(json_object_get(json_array_get(json_object_get(j, "consumers"), 0), "cluster"),
                                 "leader");
        if (json_is_string(leader))
                snprintf(l->name, sizeof(l->name), "%s", json_string_value(leader));
        json_decref(j);
}

/* Three servers, a stream with three replicas: the server of the follow's
 * consumer is killed; the follow goes on within seconds, nothing skipped
 * or repeated. */
static void test_cluster_follow(void **state _unused_) {
        NatsServer srv[3] = { { .pid = -1, .name = "s0" }, { .pid = -1, .name = "s1" }, { .pid = -1, .name = "s2" } };
        char url[256];
        BusConfig c = { .servers = url, .name = "test" };
        Fixture f = { 0 };
        InOrder got = { .want = 20 };
        Leader leader = { 0 };
        jsStreamConfig sc;
        const char *subjects[] = { "tcl.>" };
        BusSub *fs = NULL;
        uint64_t deadline;
        int killed = -1, r;

        for (int i = 0; i < 3; i++) {
                srv[i].cluster_port = free_port();
                srv[i].port = free_port();
        }
        for (int i = 0; i < 3; i++) {
                snprintf(srv[i].routes, sizeof(srv[i].routes), "nats://127.0.0.1:%d,nats://127.0.0.1:%d",
                         srv[(i + 1) % 3].cluster_port, srv[(i + 2) % 3].cluster_port);
                assert_int_equal(nats_server_new(&srv[i], "test-cloud-bus", usec(10)), 0);
        }
        snprintf(url, sizeof(url), "nats://127.0.0.1:%d,nats://127.0.0.1:%d,nats://127.0.0.1:%d", srv[0].port,
                 srv[1].port, srv[2].port);
        assert_int_equal(sd_event_new(&f.event), 0);
        assert_int_equal(bus_new(f.event, &c, NULL, &f.bus), 0);

        /* Until JetStream's cluster has elected its leader. */
        jsStreamConfig_Init(&sc);
        sc.Name = "TEST_CLUSTER";
        sc.Subjects = subjects;
        sc.SubjectsLen = 1;
        sc.Storage = js_FileStorage;
        sc.Replicas = 3;
        deadline = now_usec() + usec(30);
        while ((r = bus_stream_ensure(f.bus, &sc, NULL)) < 0 && now_usec() < deadline) {
                bool never = false;

                (void)run_until(&f, &never, 0.5);
        }
        assert_int_equal(r, 0);

        assert_int_equal(bus_stream_follow(f.bus, "TEST_CLUSTER", NULL, 1, on_in_order, &got, &fs), 0);
        for (unsigned i = 1; i <= 20; i++)
                publish_retrying(&f, i);
        assert_true(run_until(&f, &got.done, 10));
        assert_false(got.wrong);

        /* The consumer's server goes. */
        assert_int_equal(bus_request(f.bus, "$JS.API.CONSUMER.LIST.TEST_CLUSTER", NULL, "", 0, usec(5),
                                     on_consumer_list, &leader, NULL),
                         0);
        assert_true(run_until(&f, &leader.done, 10));
        for (int i = 0; i < 3; i++)
                if (streq(leader.name, srv[i].name))
                        killed = i;
        assert_true(killed >= 0);
        if (killed < 0) /* (for cppcheck, which does not know assert_true() returns no further) */
                return;
        nats_server_kill(&srv[killed], SIGKILL);
        fprintf(stderr, "killed %s (the consumer's server)\n", srv[killed].name);
        deadline = now_usec();

        got.want = 40;
        got.done = false;
        for (unsigned i = 21; i <= 40; i++)
                publish_retrying(&f, i);
        assert_true(run_until(&f, &got.done, 20));
        fprintf(stderr, "all there %.1f s after the kill\n", (double)(now_usec() - deadline) / 1e6);
        assert_false(got.wrong);
        assert_int_equal(got.n, 40);

        bus_sub_free(fs);
        bus_free(f.bus);
        sd_event_unref(f.event);
        for (int i = 0; i < 3; i++)
                nats_server_free(&srv[i]);
}

/* ---- subjects ---------------------------------------------------------------------- */

static void round_trip(const char *prefix, const char *name, const char *subject) {
        char buf[256], back[256];
        unsigned skip = 0;

        snprintf(buf, sizeof(buf), "%s", prefix);
        assert_int_equal(bus_subject_append_name(buf, sizeof(buf), name), 0);
        assert_string_equal(buf, subject);
        for (const char *p = prefix; *p; p++)
                skip += *p == '.';
        skip += *prefix && prefix[strlen(prefix) - 1] != '.';
        assert_int_equal(bus_subject_name(buf, skip, back, sizeof(back)), 0);
        assert_string_equal(back, name);
}

static void test_subjects(void **state _unused_) {
        char buf[64];

        round_trip("tether.pub.dev1", "temp", "tether.pub.dev1.temp");
        round_trip("tether.pub.dev1.", "a/b.c", "tether.pub.dev1.a.b%2Ec");
        round_trip("tether.pub.dev1", "", "tether.pub.dev1.%");
        round_trip("tether.pub.dev1", "a//b", "tether.pub.dev1.a.%.b");
        round_trip("tether.pub.dev1", "/", "tether.pub.dev1.%.%");
        round_trip("tether.pub.dev1", "%", "tether.pub.dev1.%25");
        round_trip("tether.pub.dev1", "x*>y z", "tether.pub.dev1.x%2A%3Ey%20z");
        round_trip("tether.pub.dev1", "caf\xc3\xa9/\xff", "tether.pub.dev1.caf%C3%A9.%FF");
        round_trip("", "a_b-C/9", "a_b-C.9");

        /* Too small: -ENOBUFS, the buffer as it was. */
        snprintf(buf, 16, "tether.pub.dev1");
        assert_int_equal(bus_subject_append_name(buf, 16, "x"), -ENOBUFS);
        assert_string_equal(buf, "tether.pub.dev1");
        snprintf(buf, 18, "tether.pub.dev1");
        assert_int_equal(bus_subject_append_name(buf, 18, "x"), 0);
        assert_string_equal(buf, "tether.pub.dev1.x");
        assert_int_equal(bus_subject_name("a.b.%FF%FF", 2, buf, 2), -ENOBUFS);
        assert_int_equal(bus_subject_name("a.b.c.d", 2, buf, 4), 0);
        assert_string_equal(buf, "c/d");
        assert_int_equal(bus_subject_name("a.b.c.d", 2, buf, 3), -ENOBUFS);

        /* Malformed. */
        static const char *const bad[] = {
                "p.%",    /* fine: see below */
                "p.%2",   "p.%2e",  "p.%G0",  "p.%%",   "p.a%",  "p.%41", /* 'A' is written as it is */
                "p.%2F",  "p.%00",  "p.a..b", "p.a.",   "p.*",   "p.>",   "p.a b",
                "p.\xc3\xa9", "p",
        };
        for (size_t i = 1; i < ELEMENTSOF(bad); i++)
                assert_int_equal(bus_subject_name(bad[i], 1, buf, sizeof(buf)), -EINVAL);
        assert_int_equal(bus_subject_name(bad[0], 1, buf, sizeof(buf)), 0);
        assert_string_equal(buf, "");
}

int main(int argc, char **argv) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_subjects),
                cmocka_unit_test_setup_teardown(test_publish_subscribe, setup, teardown),
                cmocka_unit_test_setup_teardown(test_unsubscribe_under_traffic, setup, teardown),
                cmocka_unit_test_setup_teardown(test_request, setup, teardown),
                cmocka_unit_test_setup_teardown(test_request_cancel, setup, teardown),
                cmocka_unit_test_setup_teardown(test_free_with_queued, setup, teardown),
                cmocka_unit_test_setup_teardown(test_js_publish, setup, teardown),
                cmocka_unit_test_setup_teardown(test_stream_follow, setup, teardown),
                cmocka_unit_test_setup_teardown(test_kv, setup, teardown),
                cmocka_unit_test(test_connect_refused),
                cmocka_unit_test(test_reconnect),
                cmocka_unit_test(test_cluster_follow),
        };

        if (!nats_server_installed()) {
                fprintf(stderr, "SKIP: nats-server is not installed (Debian package 'nats-server')\n");
                return 77;
        }
        /* One test, or those a glob matches: test-foo NAME (HACKING.md). */
        if (argc > 1)
                cmocka_set_test_filter(argv[1]);
        /* A broken pipe to a server must not kill the test. */
        signal(SIGPIPE, SIG_IGN);
        return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
