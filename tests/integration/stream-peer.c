/* SPDX-License-Identifier: Apache-2.0 */
/* stream-peer: a stand-in for the cloud's side of streams
 * (docs/protocol.md, "Streams: tunnels and logs"), for
 * tests/integration/test-agent-streams.py: a coaps+tcp listener with the
 * test's PKI that waits for one device and then plays a script against
 * tetherd's /t/{sid} over real TLS and libcoap, checking each answer and
 * message. It answers every other request of the device (subscriptions,
 * POST /d) with an empty 2.04/2.05.
 *
 *   stream-peer PORT CA CERT KEY basic ECHO_TARGET REFUSED_TARGET
 *     a tunnel to an echo server (open message, data both ways, acks,
 *     fin both ways and the graceful end), a refused target (4.03 text),
 *     a log stream (lines 2, ends with fin), MaxStreams=1 (4.29), the
 *     cloud's DELETE (2.02), an unknown stream (4.04), malformed JSON
 *     (4.00), sid 0 (4.04 as an unknown resource)
 *   stream-peer PORT CA CERT KEY bulk SOURCE_TARGET SINK_TARGET BYTES
 *     BYTES from a source server through the tunnel (acking as it goes)
 *     until the device's fin, then BYTES into a sink within the device's
 *     credit until the device acked them all; prints the throughput.
 *
 * Prints "listening" once it listens, "ok" at the end; on a failed check
 * "FAIL: ..." and exit status 1. A test program: state in file-level
 * variables, one session. */
#include <arpa/inet.h>
#include <coap3/coap.h>
#include <netinet/tcp.h>
#include <openssl/ssl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include "tls-framing.h"

#define WINDOW 262144
#define CHUNK 32768

static coap_context_t *ctx;
static coap_session_t *dev;
static int device_spoke;

/* What the device sent on /t/{sid}, per sid 1..7. */
typedef struct Seen {
        uint64_t bytes;
        uint64_t ack; /* the highest ack= */
        int open, fin, deletes;
        char last_delete[256];
        char text[8192]; /* the first bytes, for the log stream */
} Seen;
static Seen seen[8];

/* The answer to our last request. */
static int answer_code = -1;
/* The token of the request request() waits for: answers to others (acks
 * and data still in flight) are not its answer. */
static uint8_t want_token[8];
static size_t want_token_len;
static unsigned answer_cf;
static char answer_text[512];

static double now_s(void) {
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void fail(const char *fmt, ...) {
        va_list ap;

        printf("FAIL: ");
        va_start(ap, fmt);
        vprintf(fmt, ap);
        va_end(ap);
        printf("\n");
        exit(1);
}

static void on_request(coap_resource_t *r, coap_session_t *s, const coap_pdu_t *req, const coap_string_t *query,
                       coap_pdu_t *resp) {
        coap_string_t *path = coap_get_uri_path(req);
        const uint8_t *data = NULL;
        char p[64] = "", q[128] = "", *save = NULL;
        size_t len = 0;
        unsigned long sid;

        device_spoke = 1;
        if (path)
                snprintf(p, sizeof(p), "%.*s", (int)path->length, (const char *)path->s);
        coap_delete_string(path);
        if (query)
                snprintf(q, sizeof(q), "%.*s", (int)query->length, (const char *)query->s);
        (void)coap_get_data(req, &len, &data);
        if (strncmp(p, "t/", 2) != 0 || (sid = strtoul(p + 2, NULL, 10)) == 0 || sid >= 8) {
                coap_pdu_set_code(resp, coap_pdu_get_code(req) == COAP_REQUEST_CODE_GET ? COAP_RESPONSE_CODE(205)
                                                                                         : COAP_RESPONSE_CODE(204));
                return;
        }
        if (coap_pdu_get_code(req) == COAP_REQUEST_CODE_DELETE) {
                seen[sid].deletes++;
                snprintf(seen[sid].last_delete, sizeof(seen[sid].last_delete), "%.*s", (int)len,
                         data ? (const char *)data : "");
                coap_pdu_set_code(resp, COAP_RESPONSE_CODE(202));
                return;
        }
        for (char *opt = strtok_r(q, "&", &save); opt; opt = strtok_r(NULL, "&", &save))
                if (strcmp(opt, "open") == 0)
                        seen[sid].open++;
                else if (strcmp(opt, "fin") == 0)
                        seen[sid].fin++;
                else if (strncmp(opt, "ack=", 4) == 0 && strtoull(opt + 4, NULL, 10) > seen[sid].ack)
                        seen[sid].ack = strtoull(opt + 4, NULL, 10);
        if (len > 0 && seen[sid].bytes < sizeof(seen[sid].text) - 1) {
                size_t n = len < sizeof(seen[sid].text) - 1 - seen[sid].bytes ? len
                                                                               : sizeof(seen[sid].text) - 1 - seen[sid].bytes;
                memcpy(seen[sid].text + seen[sid].bytes, data, n);
        }
        seen[sid].bytes += len;
        coap_pdu_set_code(resp, COAP_RESPONSE_CODE(204));
}

static coap_response_t on_response(coap_session_t *s, const coap_pdu_t *sent, const coap_pdu_t *rcvd,
                                   const coap_mid_t mid) {
        coap_opt_iterator_t it;
        coap_opt_t *cf = coap_check_option(rcvd, COAP_OPTION_CONTENT_FORMAT, &it);
        const uint8_t *data = NULL;
        size_t len = 0;
        coap_bin_const_t tok = coap_pdu_get_token(rcvd);

        if (tok.length != want_token_len || memcmp(tok.s, want_token, tok.length) != 0)
                return COAP_RESPONSE_OK;
        (void)coap_get_data(rcvd, &len, &data);
        answer_code = coap_pdu_get_code(rcvd);
        answer_cf = cf ? coap_decode_var_bytes(coap_opt_value(cf), coap_opt_length(cf)) : 9999;
        snprintf(answer_text, sizeof(answer_text), "%.*s", (int)len, data ? (const char *)data : "");
        return COAP_RESPONSE_OK;
}

static int on_event(coap_session_t *s, const coap_event_t e) {
        if (e == COAP_EVENT_SERVER_SESSION_NEW && !dev)
                dev = s;
        return 0;
}

/* The cloud marks every TLS session for lib/tls-framing.c; so do we. */
static int setup_tls(void *tls_session, coap_dtls_pki_t *setup) {
        return tls_framing_attach((SSL *)tls_session) == 0;
}

static void send_stream(coap_pdu_code_t code, unsigned sid, const char *query, const void *payload, size_t len,
                        int cf) {
        coap_pdu_t *pdu = coap_new_pdu(COAP_MESSAGE_CON, code, dev);
        uint8_t token[8], b[4];
        size_t tl = 0;
        char s[16];

        if (!pdu)
                fail("cannot make a PDU");
        snprintf(s, sizeof(s), "%u", sid);
        coap_session_new_token(dev, &tl, token);
        coap_add_token(pdu, tl, token);
        memcpy(want_token, token, tl);
        want_token_len = tl;
        coap_add_option(pdu, COAP_OPTION_URI_PATH, 1, (const uint8_t *)"t");
        coap_add_option(pdu, COAP_OPTION_URI_PATH, strlen(s), (const uint8_t *)s);
        if (cf >= 0)
                coap_add_option(pdu, COAP_OPTION_CONTENT_FORMAT, coap_encode_var_safe(b, sizeof(b), (unsigned)cf), b);
        while (query && *query) {
                const char *amp = strchr(query, '&');
                size_t n = amp ? (size_t)(amp - query) : strlen(query);

                coap_add_option(pdu, COAP_OPTION_URI_QUERY, n, (const uint8_t *)query);
                query = amp ? amp + 1 : NULL;
        }
        if (len > 0)
                coap_add_data(pdu, len, payload);
        answer_code = -1;
        if (coap_send(dev, pdu) == COAP_INVALID_MID)
                fail("cannot send");
}

/* Send and wait for the answer (no other request of ours in flight). */
static int request(coap_pdu_code_t code, unsigned sid, const char *query, const char *payload, int cf) {
        double end = now_s() + 10;

        send_stream(code, sid, query, payload, payload ? strlen(payload) : 0, cf);
        while (answer_code < 0 && now_s() < end)
                coap_io_process(ctx, 20);
        return answer_code;
}

static void wait_until(const int *flag, const char *what) {
        double end = now_s() + 10;

        while (!*flag && now_s() < end)
                coap_io_process(ctx, 20);
        if (!*flag)
                fail("no %s", what);
}

static void expect_answer(int got, int want, const char *want_text, const char *what) {
        if (got != want)
                fail("%s: answer %d.%02d (%s), not %d.%02d", what, got >> 5, got & 31, answer_text, want >> 5,
                     want & 31);
        if (want_text && !strstr(answer_text, want_text))
                fail("%s: answer text '%s' lacks '%s'", what, answer_text, want_text);
}

static void basic(const char *echo, const char *refused) {
        char json[256];
        double end;

        snprintf(json, sizeof(json), "{\"target\":\"%s\",\"window\":%d}", echo, WINDOW);
        expect_answer(request(COAP_REQUEST_CODE_PUT, 1, NULL, json, 50), COAP_RESPONSE_CODE(201), "{\"window\":",
                      "open");
        if (answer_cf != 50)
                fail("open: content format %u", answer_cf);
        wait_until(&seen[1].open, "open message");
        expect_answer(request(COAP_REQUEST_CODE_POST, 1, NULL, "hello tunnel", 42), COAP_RESPONSE_CODE(204), NULL,
                      "data");
        end = now_s() + 10;
        while ((seen[1].bytes < 12 || seen[1].ack < 12) && now_s() < end)
                coap_io_process(ctx, 20);
        if (seen[1].bytes != 12 || strcmp(seen[1].text, "hello tunnel") != 0 || seen[1].ack != 12)
                fail("echo: %llu bytes '%s', ack %llu", (unsigned long long)seen[1].bytes, seen[1].text,
                     (unsigned long long)seen[1].ack);
        expect_answer(request(COAP_REQUEST_CODE_POST, 1, "ack=12&fin", NULL, -1), COAP_RESPONSE_CODE(204), NULL,
                      "fin");
        wait_until(&seen[1].fin, "fin from the device (the echo server closed)");
        /* Both fins: the device forgot the stream without a DELETE. */
        expect_answer(request(COAP_REQUEST_CODE_POST, 1, "ack=12", NULL, -1), COAP_RESPONSE_CODE(404), "no stream 1",
                      "after the graceful end");
        if (seen[1].deletes)
                fail("a DELETE after a graceful end: %s", seen[1].last_delete);

        snprintf(json, sizeof(json), "{\"target\":\"%s\",\"window\":%d}", refused, WINDOW);
        expect_answer(request(COAP_REQUEST_CODE_PUT, 2, NULL, json, 50), COAP_RESPONSE_CODE(403),
                      "is not in [Tunnel] Allow=", "refused target");

        expect_answer(request(COAP_REQUEST_CODE_PUT, 3, NULL, "{\"journal\":{\"lines\":2},\"window\":32768}", 50),
                      COAP_RESPONSE_CODE(201), "{\"window\":", "log stream");
        wait_until(&seen[3].fin, "the log stream's fin");
        if (!strstr(seen[3].text, "\"message\":\"line 18\"") || !strstr(seen[3].text, "\"message\":\"line 19\"") ||
            strstr(seen[3].text, "line 17"))
                fail("log stream: %s", seen[3].text);

        snprintf(json, sizeof(json), "{\"target\":\"%s\",\"window\":%d}", echo, WINDOW);
        expect_answer(request(COAP_REQUEST_CODE_PUT, 4, NULL, json, 50), COAP_RESPONSE_CODE(201), NULL, "open 4");
        expect_answer(request(COAP_REQUEST_CODE_PUT, 5, NULL, json, 50), COAP_RESPONSE_CODE(429),
                      "too many streams (MaxStreams=1)", "open 5");
        expect_answer(request(COAP_REQUEST_CODE_DELETE, 4, NULL, "closed by the client", 0), COAP_RESPONSE_CODE(202),
                      NULL, "DELETE 4");
        expect_answer(request(COAP_REQUEST_CODE_DELETE, 7, NULL, NULL, -1), COAP_RESPONSE_CODE(404), "no stream 7",
                      "DELETE 7");
        expect_answer(request(COAP_REQUEST_CODE_PUT, 6, NULL, "{", 50), COAP_RESPONSE_CODE(400), "malformed JSON",
                      "malformed");
        expect_answer(request(COAP_REQUEST_CODE_PUT, 0, NULL, json, 50), COAP_RESPONSE_CODE(404), "no resource",
                      "sid 0");
}

static void bulk(const char *source, const char *sink, uint64_t total) {
        static uint8_t chunk[CHUNK];
        uint64_t acked = 0, sent = 0;
        char json[256], q[64];
        double t0, end;

        snprintf(json, sizeof(json), "{\"target\":\"%s\",\"window\":%d}", source, WINDOW);
        expect_answer(request(COAP_REQUEST_CODE_PUT, 1, NULL, json, 50), COAP_RESPONSE_CODE(201), NULL, "open source");
        t0 = now_s();
        end = t0 + 60;
        while (!seen[1].fin && now_s() < end) {
                coap_io_process(ctx, 20);
                if (seen[1].bytes - acked >= WINDOW / 4) {
                        acked = seen[1].bytes;
                        snprintf(q, sizeof(q), "ack=%llu", (unsigned long long)acked);
                        send_stream(COAP_REQUEST_CODE_POST, 1, q, NULL, 0, -1);
                }
        }
        if (!seen[1].fin || seen[1].bytes != total)
                fail("source: %llu bytes of %llu, fin %d", (unsigned long long)seen[1].bytes,
                     (unsigned long long)total, seen[1].fin);
        printf("device->cloud bytes=%llu seconds=%.3f\n", (unsigned long long)total, now_s() - t0);

        snprintf(json, sizeof(json), "{\"target\":\"%s\",\"window\":%d}", sink, WINDOW);
        expect_answer(request(COAP_REQUEST_CODE_PUT, 2, NULL, json, 50), COAP_RESPONSE_CODE(201), "{\"window\":262144}",
                      "open sink");
        memset(chunk, 'z', sizeof(chunk));
        t0 = now_s();
        end = t0 + 60;
        while (seen[2].ack < total && now_s() < end) {
                /* Within the device's credit: its ack plus its window. */
                while (sent < total && sent + CHUNK <= seen[2].ack + WINDOW) {
                        size_t n = total - sent < CHUNK ? (size_t)(total - sent) : CHUNK;

                        send_stream(COAP_REQUEST_CODE_POST, 2, NULL, chunk, n, 42);
                        sent += n;
                }
                coap_io_process(ctx, 5);
        }
        if (seen[2].ack != total)
                fail("sink: the device acked %llu of %llu", (unsigned long long)seen[2].ack, (unsigned long long)total);
        printf("cloud->device bytes=%llu seconds=%.3f\n", (unsigned long long)total, now_s() - t0);
}

int main(int argc, char **argv) {
        coap_dtls_pki_t pki = { .version = COAP_DTLS_PKI_SETUP_VERSION };
        coap_address_t addr;
        coap_resource_t *r;
        double end;

        if (argc < 8 || (strcmp(argv[5], "bulk") == 0 && argc < 9)) {
                fprintf(stderr, "usage: stream-peer PORT CA CERT KEY basic|bulk TARGET TARGET [BYTES]\n");
                return 2;
        }
        setvbuf(stdout, NULL, _IOLBF, 0);
        coap_startup();
        coap_set_log_level(LOG_WARNING);
        ctx = coap_new_context(NULL);
        pki.verify_peer_cert = 1;
        pki.check_common_ca = 1;
        pki.cert_chain_validation = 1;
        pki.cert_chain_verify_depth = 3;
        pki.additional_tls_setup_call_back = setup_tls;
        pki.pki_key.key_type = COAP_PKI_KEY_PEM;
        pki.pki_key.key.pem.ca_file = argv[2];
        pki.pki_key.key.pem.public_cert = argv[3];
        pki.pki_key.key.pem.private_key = argv[4];
        if (!ctx || !coap_context_set_pki(ctx, &pki))
                fail("cannot set up TLS");
        coap_address_init(&addr);
        addr.addr.sin.sin_family = AF_INET;
        addr.addr.sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        addr.addr.sin.sin_port = htons((uint16_t)atoi(argv[1]));
        addr.size = sizeof(struct sockaddr_in);
        if (!coap_new_endpoint(ctx, &addr, COAP_PROTO_TLS))
                fail("cannot listen on port %s", argv[1]);
        /* TCP_NODELAY on the listener, inherited by the device's socket
         * (the cloud does the same, docs/design/libcoap.md). */
        for (int fd = 3; fd < 64; fd++) {
                struct sockaddr_in sa;
                socklen_t l = sizeof(sa), al = sizeof(int);
                int listening = 0;

                if (getsockname(fd, (struct sockaddr *)&sa, &l) == 0 && sa.sin_family == AF_INET &&
                    ntohs(sa.sin_port) == atoi(argv[1]) &&
                    getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &al) == 0 && listening)
                        (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &(int){ 1 }, sizeof(int));
        }
        r = coap_resource_unknown_init(on_request);
        coap_register_request_handler(r, COAP_REQUEST_GET, on_request);
        coap_register_request_handler(r, COAP_REQUEST_POST, on_request);
        coap_register_request_handler(r, COAP_REQUEST_DELETE, on_request);
        coap_add_resource(ctx, r);
        coap_register_response_handler(ctx, on_response);
        coap_register_event_handler(ctx, on_event);
        printf("listening\n");
        end = now_s() + 30;
        while (!device_spoke && now_s() < end)
                coap_io_process(ctx, 50);
        if (!device_spoke)
                fail("no device connected");
        if (strcmp(argv[5], "bulk") == 0)
                bulk(argv[6], argv[7], strtoull(argv[8], NULL, 10));
        else
                basic(argv[6], argv[7]);
        printf("ok\n");
        coap_free_context(ctx);
        coap_cleanup();
        return 0;
}
