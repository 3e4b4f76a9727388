/* SPDX-License-Identifier: Apache-2.0 */
/* Unit tests for the agent's streams (agent/streams.c and
 * agent/journal-stream.c) against real sockets on loopback and a real
 * journal file, with the cloud connection replaced at its one entry point,
 * conn_request_query(): every message the streams send is recorded, and
 * the test answers it (or not) as the cloud would. Checked: the answers to
 * opens (2.01 and each refusal's text), the open message after the
 * connect, data both ways, acks, the device's credit and the link cap,
 * window overrun, half-close and the graceful end, connect failures, idle
 * timeout, the end of every stream with the connection, a reload that no
 * longer allows a target, and journal backlog and follow. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <cmocka.h>
#include <coap3/coap.h>
#include <jansson.h>

#include "agent/streams.h"
#include "proto.h"
#include "util.h"

/* --- the fake connection ------------------------------------------------ */

typedef struct Msg {
        unsigned method;
        char rest[16];
        char query[64];
        uint8_t *data;
        size_t len;
        conn_request_fn cb;
        void *userdata;
        bool answered;
} Msg;

#define MSGS_MAX 4096
static Msg msgs[MSGS_MAX];
static size_t n_msgs;
static bool connected = true;

int conn_request_query(Conn *c, unsigned method, const char *path0, const char *rest, const char *query,
                       const void *payload, size_t len, int content_format, uint64_t timeout_ms, conn_request_fn cb,
                       void *userdata) {
        Msg *m;

        (void)c, (void)timeout_ms, (void)content_format;
        if (!connected)
                return -ENOTCONN;
        assert_string_equal(path0, PROTO_PATH_STREAM);
        assert_true(n_msgs < MSGS_MAX);
        m = &msgs[n_msgs++];
        *m = (Msg){ .method = method, .cb = cb, .userdata = userdata };
        snprintf(m->rest, sizeof(m->rest), "%s", rest);
        snprintf(m->query, sizeof(m->query), "%s", query ? query : "");
        m->data = malloc(len + 1);
        memcpy(m->data, payload ? payload : "", len);
        m->data[len] = 0;
        m->len = len;
        return 0;
}

static void answer(Msg *m, int error, unsigned code) {
        assert_false(m->answered);
        m->answered = true;
        m->cb(error, code, NULL, 0, 0, m->userdata);
}

static void msgs_reset(void) {
        for (size_t i = 0; i < n_msgs; i++) {
                if (!msgs[i].answered)
                        answer(&msgs[i], -ENOTCONN, 0);
                free(msgs[i].data);
        }
        n_msgs = 0;
}

static size_t unanswered_bytes(void) {
        size_t n = 0;

        for (size_t i = 0; i < n_msgs; i++)
                if (!msgs[i].answered)
                        n += msgs[i].len;
        return n;
}

/* --- helpers ------------------------------------------------------------ */

typedef struct World {
        sd_event *event;
        Config *config;
        Streams *streams;
        int listener;
        uint16_t port;
        char target[32];
} World;

static void run_until(World *w, bool (*cond)(void *), void *arg) {
        uint64_t until = now_usec() + 10 * 1000000ULL;

        while (!cond(arg)) {
                assert_true(now_usec() < until);
                assert_true(sd_event_run(w->event, 10000) >= 0);
        }
}

static void run_idle(World *w) {
        for (int i = 0; i < 20; i++)
                (void)sd_event_run(w->event, 1000);
}

static int setup(void **state) {
        World *w = calloc(1, sizeof(*w));
        struct sockaddr_in sa = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
        socklen_t l = sizeof(sa);
        char allow[64];
        StreamAddr *list = NULL;
        size_t n = 0;
        char bad[64];

        assert_non_null(w);
        assert_int_equal(sd_event_new(&w->event), 0);
        w->listener = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        assert_true(w->listener >= 0);
        assert_int_equal(bind(w->listener, (struct sockaddr *)&sa, sizeof(sa)), 0);
        assert_int_equal(listen(w->listener, 16), 0);
        assert_int_equal(getsockname(w->listener, (struct sockaddr *)&sa, &l), 0);
        w->port = ntohs(sa.sin_port);
        snprintf(w->target, sizeof(w->target), "127.0.0.1:%u", w->port);
        w->config = config_new();
        assert_non_null(w->config);
        snprintf(allow, sizeof(allow), "%s [::1]:*", w->target);
        assert_int_equal(stream_allow_parse(allow, &list, &n, bad), 0);
        w->config->tunnel_allow = list;
        w->config->n_tunnel_allow = n;
        assert_int_equal(streams_new(w->event, NULL, w->config, &w->streams), 0);
        connected = true;
        *state = w;
        return 0;
}

static int teardown(void **state) {
        World *w = *state;

        msgs_reset();
        streams_free(w->streams);
        config_free(w->config);
        close(w->listener);
        sd_event_unref(w->event);
        free(w);
        return 0;
}

static unsigned put(World *w, uint32_t sid, const char *json, ConnStreamAnswer *a) {
        *a = (ConnStreamAnswer){};
        return streams_request(w->streams, COAP_REQUEST_CODE_PUT, sid, NULL, 0, (const uint8_t *)json, strlen(json), a);
}

static unsigned post(World *w, uint32_t sid, const char *query, const void *data, size_t len) {
        ConnStreamAnswer a = {};

        return streams_request(w->streams, COAP_REQUEST_CODE_POST, sid, query, query ? strlen(query) : 0, data, len,
                               &a);
}

static Msg *find_msg(size_t from, unsigned method, const char *query_part) {
        for (size_t i = from; i < n_msgs; i++)
                if (msgs[i].method == method && (!query_part || strstr(msgs[i].query, query_part)))
                        return &msgs[i];
        return NULL;
}

typedef struct Wait {
        size_t from;
        unsigned method;
        const char *query;
} Wait;

static bool has_msg(void *arg) {
        Wait *x = arg;
        return find_msg(x->from, x->method, x->query) != NULL;
}

static Msg *wait_msg(World *w, size_t from, unsigned method, const char *query) {
        Wait x = { from, method, query };

        Msg *m;

        run_until(w, has_msg, &x);
        m = find_msg(from, method, query);
        if (!m)
                fail_msg("no such message"); /* run_until() failed the test already */
        return m;
}

/* Open a tunnel to the test's listener, wait for the open message, answer
 * it; the accepted socket is returned. */
static int open_tunnel(World *w, uint32_t sid, unsigned window) {
        ConnStreamAnswer a;
        char json[128];
        size_t from = n_msgs;
        Msg *m;
        int fd;

        snprintf(json, sizeof(json), "{\"target\":\"%s\",\"window\":%u}", w->target, window);
        assert_int_equal(put(w, sid, json, &a), COAP_RESPONSE_CODE(201));
        assert_true(a.json);
        assert_string_equal(a.text, "{\"window\":262144}");
        m = wait_msg(w, from, COAP_REQUEST_CODE_POST, "open");
        assert_int_equal(m->len, 0);
        assert_int_equal(atoi(m->rest), sid);
        answer(m, 0, COAP_RESPONSE_CODE(204));
        /* cppcheck-suppress nullPointer ; NULL: no peer address wanted */
        fd = accept4(w->listener, NULL, NULL, SOCK_CLOEXEC);
        assert_true(fd >= 0);
        return fd;
}

/* --- tests -------------------------------------------------------------- */

static void test_refusals(void **state) {
        World *w = *state;
        ConnStreamAnswer a;
        char json[128];

        assert_int_equal(put(w, 1, "{\"target\":\"10.0.0.5:22\",\"window\":262144}", &a), COAP_RESPONSE_CODE(403));
        assert_string_equal(a.text, "target 10.0.0.5:22 is not in [Tunnel] Allow=");
        assert_int_equal(put(w, 1, "{\"target\":\"10.0.0.5\",\"window\":262144}", &a), COAP_RESPONSE_CODE(400));
        assert_int_equal(put(w, 1, "{\"target\":\"127.0.0.1:22\",\"window\":1}", &a), COAP_RESPONSE_CODE(400));
        assert_int_equal(put(w, 1, "{\"journal\":{\"units\":[\"sshd.service\"]},\"window\":262144}", &a),
                         COAP_RESPONSE_CODE(403));
        assert_string_equal(a.text, "unit sshd.service is not in [Logs] Units=");
        w->config->logs_enabled = false;
        assert_int_equal(put(w, 1, "{\"journal\":{},\"window\":262144}", &a), COAP_RESPONSE_CODE(403));
        w->config->n_tunnel_allow = 0;
        assert_int_equal(put(w, 1, "{\"target\":\"127.0.0.1:22\",\"window\":262144}", &a), COAP_RESPONSE_CODE(403));
        assert_string_equal(a.text, "tunnels are off on this device ([Tunnel] Allow= is empty)");
        w->config->n_tunnel_allow = 2;

        /* MaxStreams, and a sid in use. */
        w->config->tunnel_max_streams = 2;
        snprintf(json, sizeof(json), "{\"target\":\"%s\",\"window\":262144}", w->target);
        assert_int_equal(put(w, 1, json, &a), COAP_RESPONSE_CODE(201));
        assert_int_equal(put(w, 1, json, &a), COAP_RESPONSE_CODE(409));
        assert_int_equal(put(w, 2, json, &a), COAP_RESPONSE_CODE(201));
        assert_int_equal(put(w, 3, json, &a), COAP_RESPONSE_CODE(429));
        assert_string_equal(a.text, "too many streams (MaxStreams=2)");
        assert_int_equal(a.max_age, 1);
        assert_int_equal(streams_stats(w->streams)->open, 2);

        /* Unknown streams. */
        assert_int_equal(post(w, 7, "ack=0", NULL, 0), COAP_RESPONSE_CODE(404));
        a = (ConnStreamAnswer){};
        assert_int_equal(streams_request(w->streams, COAP_REQUEST_CODE_DELETE, 7, NULL, 0, NULL, 0, &a),
                         COAP_RESPONSE_CODE(404));
        assert_string_equal(a.text, "no stream 7");
        /* The cloud's DELETE ends one. */
        assert_int_equal(streams_request(w->streams, COAP_REQUEST_CODE_DELETE, 1, NULL, 0,
                                         (const uint8_t *)"closed by the client", 20, &a),
                         COAP_RESPONSE_CODE(202));
        assert_int_equal(streams_stats(w->streams)->open, 1);
        /* The connection ends the rest. */
        streams_connection_changed(w->streams, false);
        assert_int_equal(streams_stats(w->streams)->open, 0);
}

static void test_data_both_ways(void **state) {
        World *w = *state;
        char buf[64];
        size_t from;
        Msg *m;
        int fd = open_tunnel(w, 5, 262144);

        /* Target → cloud. */
        from = n_msgs;
        assert_int_equal(write(fd, "hello", 5), 5);
        m = wait_msg(w, from, COAP_REQUEST_CODE_POST, NULL);
        assert_int_equal(m->len, 5);
        assert_memory_equal(m->data, "hello", 5);
        answer(m, 0, COAP_RESPONSE_CODE(204));

        /* Cloud → target, then the ack once it is written. */
        from = n_msgs;
        assert_int_equal(post(w, 5, NULL, "world", 5), COAP_RESPONSE_CODE(204));
        assert_int_equal(read(fd, buf, sizeof(buf)), 5);
        assert_memory_equal(buf, "world", 5);
        m = wait_msg(w, from, COAP_REQUEST_CODE_POST, "ack=5");
        assert_int_equal(m->len, 0);
        answer(m, 0, COAP_RESPONSE_CODE(204));

        /* Protocol errors: an ack past what was sent resets the stream. */
        from = n_msgs;
        assert_int_equal(post(w, 5, "ack=6", NULL, 0), COAP_RESPONSE_CODE(400));
        m = wait_msg(w, from, COAP_REQUEST_CODE_DELETE, NULL);
        assert_string_equal((char *)m->data, "ack out of range");
        assert_int_equal(post(w, 5, NULL, "x", 1), COAP_RESPONSE_CODE(404));
        assert_int_equal(read(fd, buf, sizeof(buf)), 0); /* closed */
        close(fd);
}

static void test_half_close_and_graceful_end(void **state) {
        World *w = *state;
        char buf[64];
        size_t from;
        Msg *m;
        int fd = open_tunnel(w, 9, 262144);

        /* The cloud's fin after data: the target reads the data, then EOF. */
        assert_int_equal(post(w, 9, "fin", "bye", 3), COAP_RESPONSE_CODE(204));
        assert_int_equal(read(fd, buf, sizeof(buf)), 3);
        assert_int_equal(read(fd, buf, sizeof(buf)), 0);
        assert_int_equal(post(w, 9, NULL, "more", 4), COAP_RESPONSE_CODE(400)); /* data after fin */
        close(fd);

        fd = open_tunnel(w, 10, 262144);
        from = n_msgs;
        assert_int_equal(write(fd, "abc", 3), 3);
        shutdown(fd, SHUT_WR);
        m = wait_msg(w, from, COAP_REQUEST_CODE_POST, "fin");
        /* The data may have come in the same message or before. */
        answer(m, 0, COAP_RESPONSE_CODE(204));
        assert_int_equal(streams_stats(w->streams)->open, 1);
        assert_int_equal(post(w, 10, "fin", NULL, 0), COAP_RESPONSE_CODE(204));
        /* Both fins, nothing buffered: gone without a DELETE. */
        assert_int_equal(streams_stats(w->streams)->open, 0);
        assert_null(find_msg(from, COAP_REQUEST_CODE_DELETE, NULL));
        close(fd);
}

typedef struct Sum {
        size_t want;
} Sum;

static size_t payload_sent(size_t from) {
        size_t n = 0;

        for (size_t i = from; i < n_msgs; i++)
                if (msgs[i].method == COAP_REQUEST_CODE_POST)
                        n += msgs[i].len;
        return n;
}

static bool sent_at_least(void *arg) {
        Sum *s = arg;
        return payload_sent(0) >= s->want;
}

static void test_credit_and_link_cap(void **state) {
        World *w = *state;
        size_t total = 600000;
        uint8_t *big = malloc(total);
        Sum s = { PROTO_STREAM_WINDOW_MIN };
        int fd = open_tunnel(w, 3, PROTO_STREAM_WINDOW_MIN);
        char q[32];

        memset(big, 'x', total);
        fcntl(fd, F_SETFL, O_NONBLOCK);
        assert_true(write(fd, big, total) > 0);
        /* Only the cloud's window goes out until it acks. */
        run_until(w, sent_at_least, &s);
        run_idle(w);
        assert_int_equal(payload_sent(0), PROTO_STREAM_WINDOW_MIN);
        for (size_t i = 0; i < n_msgs; i++)
                assert_true(msgs[i].len <= PROTO_STREAM_CHUNK_MAX);
        /* The cloud acks everything; with no answer to the data, the link
         * cap holds at PROTO_STREAM_INFLIGHT_MAX however large the credit. */
        snprintf(q, sizeof(q), "ack=%d", PROTO_STREAM_WINDOW_MIN);
        assert_int_equal(post(w, 3, q, NULL, 0), COAP_RESPONSE_CODE(204));
        s.want = 2 * PROTO_STREAM_WINDOW_MIN;
        run_until(w, sent_at_least, &s);
        run_idle(w);
        assert_int_equal(payload_sent(0), 2 * PROTO_STREAM_WINDOW_MIN);
        assert_true(unanswered_bytes() <= PROTO_STREAM_INFLIGHT_MAX);
        free(big);
        close(fd);
}

static void test_link_cap(void **state) {
        World *w = *state;
        size_t total = 1000000;
        uint8_t *big = malloc(total);
        /* Each message counts PROTO_STREAM_MESSAGE_COST besides its payload:
         * 32 KiB chunks fill the cap with at most 5 of them. */
        Sum s = { PROTO_STREAM_INFLIGHT_MAX - 4096 - 5 * PROTO_STREAM_MESSAGE_COST };
        int fd = open_tunnel(w, 4, PROTO_STREAM_WINDOW_MAX);
        size_t from = n_msgs;

        memset(big, 'y', total);
        fcntl(fd, F_SETFL, O_NONBLOCK);
        assert_true(write(fd, big, total) > 0);
        run_until(w, sent_at_least, &s);
        run_idle(w);
        assert_true(unanswered_bytes() <= PROTO_STREAM_INFLIGHT_MAX);
        assert_true(unanswered_bytes() >= PROTO_STREAM_INFLIGHT_MAX - 4096 - 5 * PROTO_STREAM_MESSAGE_COST);
        /* Answers let more go. */
        for (size_t i = from; i < n_msgs; i++)
                if (!msgs[i].answered)
                        answer(&msgs[i], 0, COAP_RESPONSE_CODE(204));
        s.want = payload_sent(0) + 1;
        run_until(w, sent_at_least, &s);
        free(big);
        close(fd);
}

static void test_window_exceeded(void **state) {
        World *w = *state;
        static uint8_t chunk[PROTO_STREAM_CHUNK_MAX];
        unsigned code = 0;
        size_t sent = 0;
        int fd = open_tunnel(w, 8, 262144);
        Msg *m;

        /* Nothing runs the loop, so no ack goes out: the ninth chunk is past
         * the window of 262144. */
        while ((code = post(w, 8, NULL, chunk, sizeof(chunk))) == COAP_RESPONSE_CODE(204))
                sent += sizeof(chunk);
        assert_int_equal(code, COAP_RESPONSE_CODE(400));
        assert_int_equal(sent, 262144);
        m = wait_msg(w, 0, COAP_REQUEST_CODE_DELETE, NULL);
        assert_string_equal((char *)m->data, "window exceeded");
        close(fd);
}

static void test_connect_refused_and_idle(void **state) {
        World *w = *state;
        ConnStreamAnswer a;
        char json[128], want[128];
        Msg *m;
        int fd;

        /* A closed port: 2.01, then the DELETE with the reason. */
        close(w->listener);
        w->listener = -1;
        snprintf(json, sizeof(json), "{\"target\":\"%s\",\"window\":262144}", w->target);
        assert_int_equal(put(w, 11, json, &a), COAP_RESPONSE_CODE(201));
        m = wait_msg(w, 0, COAP_REQUEST_CODE_DELETE, NULL);
        snprintf(want, sizeof(want), "connect to %s failed: Connection refused", w->target);
        assert_string_equal((char *)m->data, want);
        assert_null(find_msg(0, COAP_REQUEST_CODE_POST, "open"));
        assert_int_equal(streams_stats(w->streams)->open, 0);

        /* Idle. */
        {
                struct sockaddr_in sa = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK),
                                          .sin_port = htons(w->port) };
                w->listener = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
                setsockopt(w->listener, SOL_SOCKET, SO_REUSEADDR, &(int){ 1 }, sizeof(int));
                assert_int_equal(bind(w->listener, (struct sockaddr *)&sa, sizeof(sa)), 0);
                assert_int_equal(listen(w->listener, 4), 0);
        }
        w->config->tunnel_idle_ms = 1000;
        msgs_reset();
        fd = open_tunnel(w, 12, 262144);
        m = wait_msg(w, 0, COAP_REQUEST_CODE_DELETE, NULL);
        assert_string_equal((char *)m->data, "idle for 1 s");
        close(fd);
}

static void test_reload_no_longer_allowed(void **state) {
        World *w = *state;
        Config *next = config_new();
        Msg *m;
        int fd = open_tunnel(w, 13, 262144);

        streams_reconfigure(w->streams, next);
        m = wait_msg(w, 0, COAP_REQUEST_CODE_DELETE, NULL);
        assert_string_equal((char *)m->data, "no longer allowed");
        streams_reconfigure(w->streams, w->config);
        config_free(next);
        close(fd);
}

static void test_connection_lost(void **state) {
        World *w = *state;
        char buf[8];
        int fd = open_tunnel(w, 14, 262144);

        connected = false;
        streams_connection_changed(w->streams, false);
        assert_int_equal(streams_stats(w->streams)->open, 0);
        assert_int_equal(read(fd, buf, sizeof(buf)), 0);
        close(fd);
}

/* --- journal ------------------------------------------------------------ */

#define JOURNAL_REMOTE "/usr/lib/systemd/systemd-journal-remote"

/* Write entries in the journal export format into DIR/remote.journal. */
static int make_journal(const char *dir, const char *name, const char *export, size_t len) {
        char out[512];
        int p[2];
        pid_t pid;
        int status;

        snprintf(out, sizeof(out), "--output=%s/%s", dir, name);
        if (pipe(p) < 0)
                return -errno;
        pid = fork();
        if (pid == 0) {
                int null = open("/dev/null", O_WRONLY);
                dup2(p[0], 0);
                dup2(null, 2);
                close(p[1]);
                execl(JOURNAL_REMOTE, JOURNAL_REMOTE, out, "-", NULL);
                _exit(127);
        }
        close(p[0]);
        assert_int_equal(write(p[1], export, len), (ssize_t)len);
        close(p[1]);
        waitpid(pid, &status, 0);
        return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : -EIO;
}

static char *export_entry(char *buf, size_t size, unsigned i, const char *unit, const char *message, size_t mlen) {
        size_t n;

        n = (size_t)snprintf(buf, size,
                             "__REALTIME_TIMESTAMP=%llu\n__MONOTONIC_TIMESTAMP=%u\n_BOOT_ID=0123456789abcdef0123456789abcdef\n"
                             "_SYSTEMD_UNIT=%s\nSYSLOG_IDENTIFIER=probe\n_PID=42\nPRIORITY=6\nMESSAGE",
                             1765100000000000ULL + i * 1000000ULL, 1000 + i, unit);
        /* Binary-safe form: name, newline, 64-bit little-endian length, data. */
        buf[n++] = '\n';
        for (int b = 0; b < 8; b++)
                buf[n++] = (char)((uint64_t)mlen >> (8 * b));
        memcpy(buf + n, message, mlen);
        n += mlen;
        buf[n++] = '\n';
        buf[n++] = '\n';
        buf[n] = 0;
        return buf + n;
}

static bool log_done(void *arg) {
        (void)arg;
        return find_msg(0, COAP_REQUEST_CODE_POST, "fin") != NULL;
}

static void test_journal(void **state) {
        World *w = *state;
        char dir[] = "/tmp/test-streams-XXXXXX", *export, *p, msg[64];
        size_t size = 1 << 20;
        ConnStreamAnswer a;
        json_t *line;
        char *all;
        size_t n = 0;

        if (access(JOURNAL_REMOTE, X_OK) < 0) {
                print_message("skipped: %s is missing (package systemd-journal-remote)\n", JOURNAL_REMOTE);
                skip();
        }
        assert_non_null(mkdtemp(dir));
        export = p = malloc(size);
        for (unsigned i = 0; i < 20; i++) {
                snprintf(msg, sizeof(msg), "line %u", i);
                p = export_entry(p, size - (size_t)(p - export), i, i % 2 ? "tetherd.service" : "other.service", msg,
                                 strlen(msg));
        }
        /* Hostile bytes: control characters and invalid UTF-8. */
        p = export_entry(p, size - (size_t)(p - export), 20, "tetherd.service", "a\x1b[2J\xff\nz", 8);
        if (make_journal(dir, "remote.journal", export, (size_t)(p - export)) < 0) {
                print_message("skipped: %s could not write a journal\n", JOURNAL_REMOTE);
                free(export);
                skip();
        }
        free(export);
        w->config->logs_directory = strdup(dir);

        /* The last 3 entries of tetherd.service, then fin. */
        assert_int_equal(put(w, 21, "{\"journal\":{\"lines\":3},\"window\":262144}", &a), COAP_RESPONSE_CODE(201));
        run_until(w, log_done, NULL);
        all = calloc(1, 1 << 16);
        for (size_t i = 0; i < n_msgs; i++)
                if (msgs[i].method == COAP_REQUEST_CODE_POST) {
                        memcpy(all + n, msgs[i].data, msgs[i].len);
                        n += msgs[i].len;
                }
        {
                char *save = NULL, *l = strtok_r(all, "\n", &save);
                const char *want[] = { "line 17", "line 19", "a\x1b[2J\xef\xbf\xbd\nz" };

                for (int i = 0; i < 3; i++, l = strtok_r(NULL, "\n", &save)) {
                        assert_non_null(l);
                        line = json_loads(l, 0, NULL);
                        assert_non_null(line);
                        assert_string_equal(json_string_value(json_object_get(line, "message")), want[i]);
                        assert_string_equal(json_string_value(json_object_get(line, "unit")), "tetherd.service");
                        assert_int_equal(json_integer_value(json_object_get(line, "pid")), 42);
                        assert_int_equal(json_integer_value(json_object_get(line, "priority")), 6);
                        json_decref(line);
                }
                assert_null(l);
        }
        /* The answer to the fin ends it. */
        answer(find_msg(0, COAP_REQUEST_CODE_POST, "fin"), 0, COAP_RESPONSE_CODE(204));
        assert_int_equal(streams_stats(w->streams)->open, 0);
        free(all);

        /* Another unit, allowed by Units=. */
        msgs_reset();
        w->config->logs_units = calloc(2, sizeof(char *));
        w->config->logs_units[0] = strdup("other.service");
        assert_int_equal(put(w, 22, "{\"journal\":{\"units\":[\"other.service\"],\"since\":1765100016000000},\"window\":262144}",
                             &a),
                         COAP_RESPONSE_CODE(201));
        run_until(w, log_done, NULL);
        {
                Msg *m = find_msg(0, COAP_REQUEST_CODE_POST, NULL);
                assert_non_null(strstr((char *)m->data, "\"message\":\"line 16\""));
                assert_non_null(strstr((char *)m->data, "\"message\":\"line 18\""));
                assert_null(strstr((char *)m->data, "line 14"));
                assert_null(strstr((char *)m->data, "line 17"));
        }
        answer(find_msg(0, COAP_REQUEST_CODE_POST, "fin"), 0, COAP_RESPONSE_CODE(204));

        /* Follow, nothing old: an entry in a journal file that appears
         * later is streamed, and the stream does not end. */
        msgs_reset();
        assert_int_equal(put(w, 23, "{\"journal\":{\"lines\":0,\"follow\":true},\"window\":262144}", &a),
                         COAP_RESPONSE_CODE(201));
        run_idle(w);
        assert_null(find_msg(0, COAP_REQUEST_CODE_POST, NULL));
        p = export = malloc(size);
        p = export_entry(p, size, 30, "tetherd.service", "appended later", 14);
        assert_int_equal(make_journal(dir, "later.journal", export, (size_t)(p - export)), 0);
        free(export);
        {
                Msg *m = wait_msg(w, 0, COAP_REQUEST_CODE_POST, NULL);

                assert_non_null(strstr((char *)m->data, "\"message\":\"appended later\""));
                assert_null(strstr(m->query, "fin"));
        }
        assert_int_equal(streams_stats(w->streams)->open, 1);
        {
                char cmd[600];
                snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
                assert_int_equal(system(cmd), 0);
        }
}

int main(int argc, char **argv) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test_setup_teardown(test_refusals, setup, teardown),
                cmocka_unit_test_setup_teardown(test_data_both_ways, setup, teardown),
                cmocka_unit_test_setup_teardown(test_half_close_and_graceful_end, setup, teardown),
                cmocka_unit_test_setup_teardown(test_credit_and_link_cap, setup, teardown),
                cmocka_unit_test_setup_teardown(test_link_cap, setup, teardown),
                cmocka_unit_test_setup_teardown(test_window_exceeded, setup, teardown),
                cmocka_unit_test_setup_teardown(test_connect_refused_and_idle, setup, teardown),
                cmocka_unit_test_setup_teardown(test_reload_no_longer_allowed, setup, teardown),
                cmocka_unit_test_setup_teardown(test_connection_lost, setup, teardown),
                cmocka_unit_test_setup_teardown(test_journal, setup, teardown),
        };

        signal(SIGPIPE, SIG_IGN);
        if (argc > 1)
                cmocka_set_test_filter(argv[1]);
        return cmocka_run_group_tests(tests, NULL, NULL);
}
