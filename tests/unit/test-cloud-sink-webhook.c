/* SPDX-License-Identifier: Apache-2.0 */
/* Unit tests for the webhook sink (cloud/sink-webhook.c) against a small
 * HTTP/1.1 server on loopback in a thread of this program: the request's
 * headers and HMAC-SHA256 signature; the window of 8 (-EAGAIN past it);
 * kept-alive connections; what counts as delivered (2xx, also with a
 * response too long to read) and the reasons given otherwise (HTTP 503,
 * a redirect not followed, a refused connection, a timeout);
 * integration_sent() never from inside send() and never after free();
 * keys that could end a header line refused; the URL shown without its
 * user:password. TLS is left to tests/integration/test-webhooks.py. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#include "cloud/integrations.h"
#include "lib/util.h"

#define SECRET "0123456789abcdef-the-secret"
#define MAX_SEEN 64

/* ---- the server ---------------------------------------------------------- */

typedef struct Seen {
        char head[4096];
        char body[1024];
} Seen;

static struct {
        pthread_mutex_t lock;
        int listen_fd;
        int port;
        /* what to answer */
        int status;
        size_t body_len;
        bool hang;
        /* what came */
        Seen seen[MAX_SEEN];
        unsigned n_seen;
        unsigned accepted;
} srv = { .lock = PTHREAD_MUTEX_INITIALIZER, .listen_fd = -1 };

static bool read_request(int fd, Seen *s) {
        size_t have = 0, want = 0;
        char *end, *cl;

        for (;;) {
                ssize_t n = read(fd, s->head + have, sizeof(s->head) - 1 - have);

                if (n <= 0)
                        return false;
                have += (size_t)n;
                s->head[have] = 0;
                end = strstr(s->head, "\r\n\r\n");
                if (end)
                        break;
                if (have == sizeof(s->head) - 1)
                        return false;
        }
        *end = 0;
        cl = strcasestr(s->head, "\r\nContent-Length:");
        if (cl)
                want = strtoul(cl + strlen("\r\nContent-Length:"), NULL, 10);
        if (want >= sizeof(s->body))
                return false;
        /* What came after the header is body. */
        have -= (size_t)(end + 4 - s->head);
        memcpy(s->body, end + 4, have);
        while (have < want) {
                ssize_t n = read(fd, s->body + have, want - have);

                if (n <= 0)
                        return false;
                have += (size_t)n;
        }
        s->body[want] = 0;
        return true;
}

static void *serve_connection(void *arg) {
        int fd = (int)(intptr_t)arg;
        Seen s;

        while (read_request(fd, &s)) {
                char head[128], chunk[4096];
                int status;
                size_t len;
                bool hang;

                pthread_mutex_lock(&srv.lock);
                if (srv.n_seen < MAX_SEEN)
                        srv.seen[srv.n_seen++] = s;
                status = srv.status;
                len = srv.body_len;
                hang = srv.hang;
                pthread_mutex_unlock(&srv.lock);
                if (hang) {
                        /* No answer: wait for the client to give up. */
                        while (read(fd, chunk, sizeof(chunk)) > 0)
                                ;
                        break;
                }
                snprintf(head, sizeof(head), "HTTP/1.1 %d Test\r\nContent-Length: %zu\r\n%s\r\n", status, len,
                         status / 100 == 3 ? "Location: /elsewhere\r\n" : "");
                if (send(fd, head, strlen(head), MSG_NOSIGNAL) < 0)
                        break;
                memset(chunk, 'x', sizeof(chunk));
                while (len > 0) {
                        ssize_t n = send(fd, chunk, len < sizeof(chunk) ? len : sizeof(chunk), MSG_NOSIGNAL);

                        if (n <= 0)
                                break;
                        len -= (size_t)n;
                }
                if (len > 0)
                        break;
        }
        close(fd);
        return NULL;
}

static void *serve(void *arg) {
        for (;;) {
                pthread_t t;
                int fd = accept(srv.listen_fd, NULL, NULL);

                if (fd < 0)
                        return NULL;
                /* Header and body go out in two writes: not held for the
                 * client's delayed ACK. */
                (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &(int){ 1 }, sizeof(int));
                pthread_mutex_lock(&srv.lock);
                srv.accepted++;
                pthread_mutex_unlock(&srv.lock);
                if (pthread_create(&t, NULL, serve_connection, (void *)(intptr_t)fd) != 0)
                        close(fd);
                else
                        pthread_detach(t);
        }
}

static int free_port(void) {
        struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
        socklen_t l = sizeof(a);
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), port;

        assert_true(fd >= 0);
        assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof(a)), 0);
        assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &l), 0);
        port = ntohs(a.sin_port);
        close(fd);
        return port;
}

static void server_start(void) {
        struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
        socklen_t l = sizeof(a);
        pthread_t t;

        srv.listen_fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        assert_true(srv.listen_fd >= 0);
        assert_int_equal(bind(srv.listen_fd, (struct sockaddr *)&a, sizeof(a)), 0);
        assert_int_equal(listen(srv.listen_fd, 64), 0);
        assert_int_equal(getsockname(srv.listen_fd, (struct sockaddr *)&a, &l), 0);
        srv.port = ntohs(a.sin_port);
        assert_int_equal(pthread_create(&t, NULL, serve, NULL), 0);
        pthread_detach(t);
}

static void server_expect(int status, size_t body_len, bool hang) {
        pthread_mutex_lock(&srv.lock);
        srv.status = status;
        srv.body_len = body_len;
        srv.hang = hang;
        srv.n_seen = 0;
        srv.accepted = 0;
        pthread_mutex_unlock(&srv.lock);
}

static unsigned server_seen(void) {
        unsigned n;

        pthread_mutex_lock(&srv.lock);
        n = srv.n_seen;
        pthread_mutex_unlock(&srv.lock);
        return n;
}

/* ---- what the core would be ---------------------------------------------- */

typedef struct Sent {
        uint64_t id;
        int error;
        char why[INTEGRATION_ERROR_MAX];
} Sent;

static Sent sent[512];
static unsigned n_sent;
static bool in_send;
static Integration *const OWNER = (Integration *)&n_sent;

void integration_sent(Integration *in, uint64_t id, int error, const char *why) {
        assert_ptr_equal(in, OWNER);
        assert_false(in_send);
        assert_true(n_sent < ELEMENTSOF(sent));
        sent[n_sent].id = id;
        sent[n_sent].error = error;
        snprintf(sent[n_sent].why, sizeof(sent[n_sent].why), "%s", why ? why : "");
        n_sent++;
}

const char *integration_name(const Integration *in) {
        return "t";
}

int integration_publish(Integration *in, const char *name, const char *data, size_t len) {
        return -ENOSYS;
}

static sd_event *event;
static char url[128];
static IntegrationConfig config = {
        .name = (char *)"t", .kind = INTEGRATION_WEBHOOK, .url = url, .secret = (char *)SECRET, .timeout_sec = 10
};

static int setup(void **state) {
        n_sent = 0;
        config.timeout_sec = 10;
        snprintf(url, sizeof(url), "http://127.0.0.1:%d/hook", srv.port);
        server_expect(200, 2, false);
        return sd_event_new(&event) < 0 ? -1 : 0;
}

static int teardown(void **state) {
        event = sd_event_unref(event);
        return 0;
}

static void *make_sink(void) {
        void *sink = NULL;

        assert_int_equal(sink_webhook_ops.new(event, &config, NULL, OWNER, &sink), 0);
        return sink;
}

static int send_one(void *sink, uint64_t id) {
        char key[40], body[128];
        int r;

        snprintf(key, sizeof(key), "0123456789abcdef-%" PRIu64, id);
        snprintf(body, sizeof(body), "{\"event\":\"e\",\"data\":\"%" PRIu64 "\",\"id\":\"%s\"}", id, key);
        in_send = true;
        r = sink_webhook_ops.send(sink, id, key, NULL, body, strlen(body));
        in_send = false;
        return r;
}

/* Run the loop until n answers came (10 s, or a minute under sanitizers). */
static void wait_sent(unsigned n) {
        uint64_t deadline = now_usec() + 60ULL * 1000000;

        while (n_sent < n) {
                assert_true(now_usec() < deadline);
                assert_true(sd_event_run(event, 100000) >= 0);
        }
}

static void wait_seen(unsigned n) {
        uint64_t deadline = now_usec() + 60ULL * 1000000;

        while (server_seen() < n) {
                assert_true(now_usec() < deadline);
                assert_true(sd_event_run(event, 10000) >= 0);
        }
}

static const char *header(const Seen *s, const char *name, char *buf, size_t size) {
        char pattern[64];
        const char *p, *e;

        snprintf(pattern, sizeof(pattern), "\r\n%s: ", name);
        p = strcasestr(s->head, pattern);
        if (!p)
                return NULL;
        p += strlen(pattern);
        e = strstr(p, "\r\n");
        snprintf(buf, size, "%.*s", (int)(e ? e - p : (ptrdiff_t)strlen(p)), p);
        return buf;
}

/* ---- the tests ----------------------------------------------------------- */

static void test_delivered_signed_window(void **state) {
        void *sink = make_sink();
        unsigned accepted;
        json_t *o;

        for (uint64_t i = 1; i <= 8; i++)
                assert_int_equal(send_one(sink, i), 0);
        assert_int_equal(send_one(sink, 9), -EAGAIN);
        o = json_object();
        sink_webhook_ops.describe(sink, o);
        assert_int_equal(json_integer_value(json_object_get(o, "in_flight")), 8);
        assert_string_equal(json_string_value(json_object_get(o, "url")), url);
        json_decref(o);
        assert_int_equal(n_sent, 0); /* nothing from inside send() */
        wait_sent(8);
        for (unsigned i = 0; i < 8; i++)
                assert_int_equal(sent[i].error, 0);
        assert_int_equal(server_seen(), 8);
        for (unsigned i = 0; i < 8; i++) {
                const Seen *s = &srv.seen[i];
                unsigned char mac[32];
                unsigned n = 0;
                char buf[256], want[80], key[64];

                assert_true(startswith(s->head, "POST /hook HTTP/1.1\r\n"));
                assert_string_equal(header(s, "Content-Type", buf, sizeof(buf)), "application/json");
                assert_true(startswith(header(s, "User-Agent", buf, sizeof(buf)), "tether-cloudd/"));
                assert_string_equal(header(s, "X-Tether-Webhook", buf, sizeof(buf)), "t");
                assert_non_null(strstr(s->body, header(s, "Idempotency-Key", key, sizeof(key))));
                assert_string_equal(header(s, "X-Tether-Event-Id", buf, sizeof(buf)), key);
                assert_null(header(s, "Expect", buf, sizeof(buf)));
                assert_non_null(HMAC(EVP_sha256(), SECRET, strlen(SECRET), (const unsigned char *)s->body,
                                     strlen(s->body), mac, &n));
                strcpy(want, "sha256=");
                for (unsigned k = 0; k < n; k++)
                        sprintf(want + 7 + 2 * k, "%02x", mac[k]);
                assert_string_equal(header(s, "X-Tether-Signature", buf, sizeof(buf)), want);
        }
        /* A second round: the same connections, kept alive. */
        for (uint64_t i = 9; i <= 16; i++)
                assert_int_equal(send_one(sink, i), 0);
        wait_sent(16);
        for (unsigned i = 8; i < 16; i++)
                assert_int_equal(sent[i].error, 0);
        pthread_mutex_lock(&srv.lock);
        accepted = srv.accepted;
        pthread_mutex_unlock(&srv.lock);
        assert_true(accepted <= 8);
        sink_webhook_ops.free(sink);
}

/* One event at a time, as for a single device: each send() arms
 * libcurl's timer from a quiet loop. A timer that fired before libcurl's
 * deadline (or a quarter of a second late, sd-event's default accuracy)
 * stalled this after a few dozen events. */
static void test_one_at_a_time(void **state) {
        void *sink = make_sink();
        uint64_t t0 = now_usec();

        for (uint64_t i = 1; i <= 300; i++) {
                assert_int_equal(send_one(sink, i), 0);
                wait_sent((unsigned)i);
                assert_int_equal(sent[i - 1].error, 0);
        }
        /* About 0.5 s here; the stalls made it 25 s. */
        assert_true(now_usec() - t0 < 15ULL * 1000000);
        assert_int_equal(server_seen(), 64); /* what the server keeps */
        sink_webhook_ops.free(sink);
}

static void test_http_errors(void **state) {
        void *sink = make_sink();

        server_expect(503, 20, false);
        assert_int_equal(send_one(sink, 1), 0);
        wait_sent(1);
        assert_int_equal(sent[0].error, -EREMOTEIO);
        assert_string_equal(sent[0].why, "HTTP 503");
        server_expect(301, 0, false);
        assert_int_equal(send_one(sink, 2), 0);
        wait_sent(2);
        assert_int_equal(sent[1].error, -EREMOTEIO);
        assert_string_equal(sent[1].why, "HTTP 301 (redirects are not followed)");
        assert_int_equal(server_seen(), 1); /* not followed */
        sink_webhook_ops.free(sink);
}

static void test_response_too_large(void **state) {
        void *sink = make_sink();

        /* The status came before the flood: 2xx is delivered ... */
        server_expect(200, 4 << 20, false);
        assert_int_equal(send_one(sink, 1), 0);
        wait_sent(1);
        assert_int_equal(sent[0].error, 0);
        /* ... anything else is the status. */
        server_expect(500, 4 << 20, false);
        assert_int_equal(send_one(sink, 2), 0);
        wait_sent(2);
        assert_int_equal(sent[1].error, -EREMOTEIO);
        assert_string_equal(sent[1].why, "HTTP 500");
        sink_webhook_ops.free(sink);
}

static void test_refused(void **state) {
        void *sink;

        snprintf(url, sizeof(url), "http://127.0.0.1:%d/hook", free_port());
        sink = make_sink();
        assert_int_equal(send_one(sink, 7), 0);
        wait_sent(1);
        assert_int_equal(sent[0].id, 7);
        assert_int_equal(sent[0].error, -ECONNREFUSED);
        assert_string_equal(sent[0].why, "connection refused");
        sink_webhook_ops.free(sink);
}

static void test_timeout(void **state) {
        void *sink;

        config.timeout_sec = 1;
        sink = make_sink();
        server_expect(200, 0, true);
        assert_int_equal(send_one(sink, 1), 0);
        wait_sent(1);
        assert_int_equal(sent[0].error, -ETIMEDOUT);
        assert_string_equal(sent[0].why, "timed out after 1 s");
        sink_webhook_ops.free(sink);
}

static void test_free_in_flight(void **state) {
        void *sink = make_sink();

        server_expect(200, 0, true);
        for (uint64_t i = 1; i <= 3; i++)
                assert_int_equal(send_one(sink, i), 0);
        wait_seen(3);
        sink_webhook_ops.free(sink);
        /* The loop still runs; nothing is said about the three. */
        for (int i = 0; i < 10; i++)
                assert_true(sd_event_run(event, 1000) >= 0);
        assert_int_equal(n_sent, 0);
}

static void test_bad_key_and_url_shown(void **state) {
        void *sink;
        json_t *o;

        snprintf(url, sizeof(url), "http://user:pass@127.0.0.1:%d/hook?x=1", srv.port);
        sink = make_sink();
        in_send = true;
        assert_int_equal(sink_webhook_ops.send(sink, 1, "k\r\nX-Evil: 1", NULL, "{}", 2), -EINVAL);
        assert_int_equal(sink_webhook_ops.send(sink, 1, "", NULL, "{}", 2), -EINVAL);
        in_send = false;
        o = json_object();
        sink_webhook_ops.describe(sink, o);
        assert_int_equal(json_integer_value(json_object_get(o, "in_flight")), 0);
        assert_null(strstr(json_string_value(json_object_get(o, "url")), "pass"));
        assert_null(strstr(json_string_value(json_object_get(o, "url")), "user"));
        assert_non_null(strstr(json_string_value(json_object_get(o, "url")), "/hook?x=1"));
        json_decref(o);
        /* The credentials still go to the receiver. */
        assert_int_equal(send_one(sink, 2), 0);
        wait_sent(1);
        assert_int_equal(sent[0].error, 0);
        assert_non_null(strstr(srv.seen[0].head, "\r\nAuthorization: Basic dXNlcjpwYXNz\r\n"));
        sink_webhook_ops.free(sink);
}

/* http:// is for a receiver on this machine only: never through a proxy
 * of the environment (which would see the events in clear text). */
static void test_loopback_not_proxied(void **state) {
        char proxy[64];
        void *sink;

        snprintf(proxy, sizeof(proxy), "http://127.0.0.1:%d", free_port());
        assert_int_equal(setenv("http_proxy", proxy, 1), 0);
        assert_int_equal(setenv("all_proxy", proxy, 1), 0);
        sink = make_sink();
        assert_int_equal(send_one(sink, 1), 0);
        wait_sent(1);
        unsetenv("http_proxy");
        unsetenv("all_proxy");
        assert_int_equal(sent[0].error, 0);
        assert_int_equal(server_seen(), 1);
        sink_webhook_ops.free(sink);
}

int main(int argc, char **argv) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test_setup_teardown(test_delivered_signed_window, setup, teardown),
                cmocka_unit_test_setup_teardown(test_one_at_a_time, setup, teardown),
                cmocka_unit_test_setup_teardown(test_http_errors, setup, teardown),
                cmocka_unit_test_setup_teardown(test_response_too_large, setup, teardown),
                cmocka_unit_test_setup_teardown(test_refused, setup, teardown),
                cmocka_unit_test_setup_teardown(test_timeout, setup, teardown),
                cmocka_unit_test_setup_teardown(test_free_in_flight, setup, teardown),
                cmocka_unit_test_setup_teardown(test_bad_key_and_url_shown, setup, teardown),
                cmocka_unit_test_setup_teardown(test_loopback_not_proxied, setup, teardown),
        };

        if (argc > 1)
                cmocka_set_test_filter(argv[1]);
        /* Whatever goes wrong, make check does not wait forever. */
        alarm(600);
        server_start();
        return cmocka_run_group_tests(tests, NULL, NULL);
}
