/* SPDX-License-Identifier: Apache-2.0 */
/* Unit tests for the framed TLS reads of lib/tls-framing.c (libcoap 4.3.1,
 * docs/design/libcoap.md "Trap C").
 *
 * Streams of random RFC 8323 messages (every header size, token lengths
 * 0-8, random bodies) are generated here with a map of where each header
 * lies, independent of the module. They are fed
 * - to tls_framing_scan() cut at every position, full 0 and 1;
 * - to a model of the SSL_read() wrapper (framing_read() copied: kept bytes
 *   prepended, a read again while only the start of a header is there)
 *   read by a model of libcoap's reader (a read again at once when the
 *   buffer came back full), over every single cut, random records and one
 *   byte per record, with buffers of 6 bytes up to libcoap's 1,472;
 * - through the real wrapper: this program's SSL_read() on a TLS server
 *   connected over a BIO pair to a client whose every SSL_write() is one
 *   record.
 * Each time: no read ends inside a header after its first byte, and one
 * that ends after a first byte was a full buffer and the next read holds
 * the rest of that header; the reads concatenate to the stream; at most
 * TLS_FRAMING_HEADER_MAX - 1 bytes are kept; a read that hands on nothing
 * says SSL_ERROR_WANT_READ. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tls-framing.h"

#define COAP_READ_BUF 1472 /* COAP_RXBUFFER_SIZE of libcoap 4.3.1: its read size */

/* ---- streams of messages ------------------------------------------------ */

static uint64_t rng_state = 0x9e3779b97f4a7c15u;

static uint64_t rnd(void) {
        /* xorshift64*: reproducible runs */
        rng_state ^= rng_state >> 12;
        rng_state ^= rng_state << 25;
        rng_state ^= rng_state >> 27;
        return rng_state * 0x2545f4914f6cdd1du;
}

static size_t rnd_in(size_t lo, size_t hi) {
        return lo + (size_t)(rnd() % (hi - lo + 1));
}

typedef struct Stream {
        uint8_t *p;
        uint8_t *hdr; /* per byte: 0 outside a header, else (position in the header from 1) << 4 | header size */
        size_t n, cap;
        size_t messages;
} Stream;

static void stream_reserve(Stream *s, size_t more) {
        if (s->n + more <= s->cap)
                return;
        s->cap = (s->n + more) * 2;
        s->p = realloc(s->p, s->cap);
        s->hdr = realloc(s->hdr, s->cap);
        assert_non_null(s->p);
        assert_non_null(s->hdr);
}

static void stream_free(Stream *s) {
        free(s->p);
        free(s->hdr);
        *s = (Stream){ 0 };
}

/* One message: tkl token bytes, len bytes of options and payload (the
 * RFC 8323 Len), random contents. Returns the header size. */
static size_t stream_add(Stream *s, unsigned tkl, size_t len) {
        uint8_t h[TLS_FRAMING_HEADER_MAX];
        size_t hs;

        if (len < 13) {
                h[0] = (uint8_t)(len << 4);
                hs = 1;
        } else if (len < 269) {
                h[0] = 13 << 4;
                h[1] = (uint8_t)(len - 13);
                hs = 2;
        } else if (len < 65805) {
                h[0] = 14 << 4;
                h[1] = (uint8_t)((len - 269) >> 8);
                h[2] = (uint8_t)(len - 269);
                hs = 3;
        } else {
                uint64_t x = len - 65805;

                h[0] = 15 << 4;
                h[1] = (uint8_t)(x >> 24);
                h[2] = (uint8_t)(x >> 16);
                h[3] = (uint8_t)(x >> 8);
                h[4] = (uint8_t)x;
                hs = 5;
        }
        h[0] |= (uint8_t)tkl;
        h[hs++] = (uint8_t)rnd(); /* code */
        stream_reserve(s, hs + tkl + len);
        for (size_t i = 0; i < hs; i++) {
                s->p[s->n + i] = h[i];
                s->hdr[s->n + i] = (uint8_t)((i + 1) << 4 | hs);
        }
        s->n += hs;
        for (size_t i = 0; i < tkl + len; i++) {
                s->p[s->n + i] = (uint8_t)rnd(); /* anything, including bytes that look like headers */
                s->hdr[s->n + i] = 0;
        }
        s->n += tkl + len;
        s->messages++;
        return hs;
}

/* A random message with a header of size hs (2, 3, 4 or 6; 0: any but 6). */
static void stream_add_random(Stream *s, size_t hs) {
        unsigned tkl = (unsigned)rnd_in(0, 8);
        size_t len;

        if (hs == 0)
                hs = (size_t[]){ 2, 2, 3, 4 }[rnd() % 4];
        switch (hs) {
        case 2:
                len = rnd_in(0, 12);
                break;
        case 3:
                len = rnd() % 4 ? rnd_in(13, 40) : rnd_in(13, 268);
                break;
        case 4:
                len = rnd() % 4 ? rnd_in(269, 300) : rnd_in(269, 2000);
                break;
        default:
                len = rnd_in(65805, 65900);
                break;
        }
        stream_add(s, tkl, len);
}

/* ---- the checks on what a reader was handed ------------------------------ */

typedef struct Reader {
        const Stream *s;
        size_t got;       /* bytes handed on so far: all equal to the stream's */
        size_t need;      /* a read ended after a header's first byte: the next one must reach here */
        size_t reads, splits;
} Reader;

/* The reader was handed p[0..n); full: n was all it asked for. */
static void reader_take(Reader *r, const uint8_t *p, size_t n, int full) {
        size_t end = r->got + n;
        uint8_t h;

        assert_true(n > 0);
        assert_true(end <= r->s->n);
        assert_memory_equal(p, r->s->p + r->got, n);
        if (r->need) {
                /* The rest of the header whose first byte went alone: all of it now. */
                assert_true(end >= r->need);
                r->need = 0;
        }
        r->got = end;
        r->reads++;
        h = r->s->hdr[end - 1];
        if (h && h >> 4 < (h & 0x0f)) {
                /* Ends inside a header: only after its first byte, on a full buffer. */
                assert_int_equal(h >> 4, 1);
                assert_true(full);
                r->need = end - 1 + (h & 0x0f);
                r->splits++;
        }
}

static void reader_done(const Reader *r) {
        assert_int_equal(r->got, r->s->n);
        assert_int_equal(r->need, 0);
}

/* The fields the scan keeps (not the padding). */
static void assert_state_equal(const TlsFraming *a, const TlsFraming *b) {
        assert_int_equal(a->body, b->body);
        assert_int_equal(a->n_head, b->n_head);
        assert_memory_equal(a->head, b->head, a->n_head);
        assert_int_equal(a->first, b->first);
        assert_int_equal(a->split, b->split);
        assert_int_equal(a->plain, b->plain);
}

/* ---- tls_framing_scan() alone ------------------------------------------ */

/* s cut once at c: p[0..c) with full, then what was kept and the rest with
 * full 0, as the wrapper prepends it. */
static void scan_cut(const Stream *s, size_t c, int full) {
        TlsFraming f = { 0 };
        Reader r = { .s = s };
        uint8_t buf[TLS_FRAMING_HEADER_MAX - 1];
        uint8_t *rest;
        size_t safe, kept;

        safe = tls_framing_scan(&f, s->p, c, full);
        assert_true(safe <= c);
        kept = c - safe;
        assert_true(kept <= TLS_FRAMING_HEADER_MAX - 1);
        if (safe > 0)
                reader_take(&r, s->p, safe, full);
        if (kept > 0) {
                /* What is kept is never safe on its own (the wrapper relies on it to return -1 then). */
                TlsFraming t = f;

                memcpy(buf, s->p + safe, kept);
                assert_int_equal(tls_framing_scan(&t, buf, kept, 0), 0);
                assert_state_equal(&t, &f);
        }
        rest = malloc(s->n - safe + 1);
        assert_non_null(rest);
        memcpy(rest, s->p + safe, s->n - safe);
        if (s->n > safe) {
                assert_int_equal(tls_framing_scan(&f, rest, s->n - safe, 0), s->n - safe);
                reader_take(&r, rest, s->n - safe, 0);
        }
        free(rest);
        assert_int_equal(f.body, 0);
        assert_int_equal(f.split, 0);
        reader_done(&r);
}

static void test_scan_every_cut(void **state) {
        (void)state;
        size_t cuts = 0;

        for (unsigned round = 0; round < 300; round++) {
                Stream s = { 0 };
                size_t m = rnd_in(1, 6);

                for (size_t i = 0; i < m; i++)
                        stream_add_random(&s, 0);
                for (size_t c = 0; c <= s.n; c++)
                        for (int full = 0; full <= 1; full++, cuts++)
                                scan_cut(&s, c, full);
                stream_free(&s);
        }
        /* 6-byte headers: bodies of 64 KiB, cuts around the headers and at random places. */
        for (unsigned round = 0; round < 4; round++) {
                Stream s = { 0 };

                stream_add_random(&s, 0);
                stream_add_random(&s, 6);
                stream_add_random(&s, 2);
                stream_add_random(&s, 6);
                stream_add_random(&s, 3);
                for (size_t c = 0; c <= s.n; c++) {
                        if (!s.hdr[c < s.n ? c : s.n - 1] && !(c > 0 && s.hdr[c - 1]) && rnd() % 500)
                                continue;
                        for (int full = 0; full <= 1; full++, cuts++)
                                scan_cut(&s, c, full);
                }
                stream_free(&s);
        }
        printf("# %zu cuts scanned\n", cuts);
}

static void test_scan_edges(void **state) {
        (void)state;
        TlsFraming f = { 0 }, z = { 0 };
        uint8_t hdr6[] = { 0xf3, 0x00, 0x00, 0x01, 0x02, 0x45 }; /* Len 15, TKL 3, code 0x45 */
        uint8_t b[64] = { 0 };

        /* Empty reads change nothing, whatever the state. */
        for (int full = 0; full <= 1; full++) {
                assert_int_equal(tls_framing_scan(&f, b, 0, full), 0);
                assert_state_equal(&f, &z);
        }
        f.body = 7;
        assert_int_equal(tls_framing_scan(&f, b, 0, 1), 0);
        assert_int_equal(f.body, 7);
        f = z;

        /* A 6-byte header, one byte at a time: nothing until all of it is there. */
        for (size_t k = 1; k < 6; k++) {
                assert_int_equal(tls_framing_scan(&f, hdr6, k, 0), 0);
                assert_state_equal(&f, &z);
        }
        assert_int_equal(tls_framing_scan(&f, hdr6, 6, 0), 6);
        assert_int_equal(f.body, 65805 + 258 + 3);
        f = z;
        /* On a full buffer its first byte may go alone; then the rest only whole, 1+1+1+1+1. */
        assert_int_equal(tls_framing_scan(&f, hdr6, 1, 1), 1);
        assert_int_equal(f.split, 1);
        assert_int_equal(f.first, 0xf3);
        for (size_t k = 1; k < 5; k++) {
                TlsFraming t = f;

                for (int full = 0; full <= 1; full++)
                        assert_int_equal(tls_framing_scan(&t, hdr6 + 1, k, full), 0);
                assert_state_equal(&t, &f);
        }
        assert_int_equal(tls_framing_scan(&f, hdr6 + 1, 5, 0), 5);
        assert_int_equal(f.split, 0);
        assert_int_equal(f.body, 65805 + 258 + 3);
        /* ... but not its second byte: 2..5 bytes of a header are kept even on a full buffer. */
        for (size_t k = 2; k < 6; k++) {
                f = z;
                assert_int_equal(tls_framing_scan(&f, hdr6, k, 1), 0);
        }

        /* Back to back in one read: Len 0 TKL 0; Len 2 TKL 1; Len 13+1 TKL 0; Len 269+0 TKL 8; then a first byte. */
        {
                Stream s = { 0 };
                size_t n;

                stream_add(&s, 0, 0);
                stream_add(&s, 1, 2);
                stream_add(&s, 0, 14);
                stream_add(&s, 8, 269);
                n = s.n;
                stream_add(&s, 2, 20);
                f = z;
                TlsFraming t = z;

                assert_int_equal(tls_framing_scan(&t, s.p, n, 0), n);
                assert_state_equal(&t, &z);
                t = z;
                assert_int_equal(tls_framing_scan(&t, s.p, n + 1, 0), n); /* 0xd2 alone, not full: kept */
                assert_state_equal(&t, &z);
                t = z;
                assert_int_equal(tls_framing_scan(&t, s.p, n + 2, 1), n); /* 2 of its 3 bytes: kept */
                t = z;
                assert_int_equal(tls_framing_scan(&t, s.p, n + 1, 1), n + 1); /* full: 0xd2 goes alone */
                assert_int_equal(t.split, 1);
                assert_int_equal(t.first, 0xd2);
                assert_int_equal(tls_framing_scan(&t, s.p + n + 1, 2, 0), 2);
                assert_int_equal(t.split, 0);
                assert_int_equal(t.body, 20 + 2);
                stream_free(&s);
        }
}

/* The largest body: counted down over many reads, then the next header. */
/* max_body: a header announcing more stops the scan before it, also
 * when its first byte came alone (split); one at the limit passes. */
static void test_scan_max_body(void **state) {
        (void)state;
        TlsFraming f = { .max_body = 300 };
        /* Len 14 (2 bytes + 269), TKL 1: 269 + 30 + 1 = 300 after the header; then 301. */
        uint8_t ok[] = { 0xe1, 0x00, 30, 0x02 }, big[] = { 0xe1, 0x00, 31, 0x02 };
        uint8_t buf[4 + 300 + 4];

        memcpy(buf, ok, 4);
        memset(buf + 4, 0, 300);
        memcpy(buf + 304, big, 4);
        assert_int_equal(tls_framing_scan(&f, buf, sizeof(buf), 0), 304);
        assert_int_equal(f.too_big, 1);
        f = (TlsFraming){ .max_body = 300 };
        assert_int_equal(tls_framing_scan(&f, big, 1, 1), 1);
        assert_int_equal(f.too_big, 0);
        assert_int_equal(tls_framing_scan(&f, big + 1, 3, 0), 0);
        assert_int_equal(f.too_big, 1);
}

static void test_scan_huge_body(void **state) {
        (void)state;
        TlsFraming f = { 0 };
        uint8_t hdr[] = { 0xf8, 0xff, 0xff, 0xff, 0xff, 0x02, 0x42, 0x01 };
        const uint64_t body = 65805 + UINT64_C(0xffffffff) + 8;
        const size_t chunk = 1 << 20;
        uint8_t *zero = calloc(1, chunk + sizeof(hdr));
        uint64_t left;

        assert_non_null(zero);
        assert_int_equal(tls_framing_scan(&f, hdr, 6, 0), 6);
        assert_int_equal(f.body, body);
        /* Bytes that look like headers inside the body are body. */
        memset(zero, 0xff, chunk);
        for (left = body; left > chunk; left -= chunk) {
                assert_int_equal(tls_framing_scan(&f, zero, chunk, (int)(left & 1)), chunk);
                assert_int_equal(f.body, left - chunk);
        }
        /* The body's last bytes, then a 2-byte header (Len 0, TKL 0, code 0x42) cut after its first byte. */
        memcpy(zero + left, "\x00", 1);
        assert_int_equal(tls_framing_scan(&f, zero, (size_t)left + 1, 0), left);
        assert_int_equal(f.body, 0);
        memcpy(zero, "\x00\x42", 2);
        assert_int_equal(tls_framing_scan(&f, zero, 2, 0), 2);
        assert_int_equal(f.body, 0);
        free(zero);
}

/* ---- a model of the wrapper and of libcoap's reader ----------------------- */

/* What libssl holds: the stream cut into records, of which those up to
 * `avail` have arrived. A read returns at most the rest of one record. */
typedef struct Source {
        const Stream *s;
        const size_t *ends; /* each record's end, increasing, the last s->n */
        size_t n_ends, rec, pos, avail;
} Source;

static int source_read(Source *src, uint8_t *buf, size_t num) {
        size_t k;

        if (src->pos >= src->avail)
                return -1; /* SSL_ERROR_WANT_READ */
        while (src->ends[src->rec] <= src->pos) {
                src->rec++;
                assert_true(src->rec < src->n_ends);
        }
        k = src->ends[src->rec] - src->pos;
        if (k > num)
                k = num;
        memcpy(buf, src->s->p + src->pos, k);
        src->pos += k;
        return (int)k;
}

/* framing_read() of lib/tls-framing.c for num >= TLS_FRAMING_HEADER_MAX,
 * reading from src, asserting instead of guarding the kept size. */
static int model_read(TlsFraming *f, Source *src, uint8_t *buf, size_t num) {
        size_t n, safe;
        int r = 1;

        memcpy(buf, f->head, f->n_head);
        n = f->n_head;
        f->n_head = 0;
        for (;;) {
                TlsFraming t = *f;

                if (n < num) {
                        r = source_read(src, buf + n, num - n);
                        if (r > 0)
                                n += (size_t)r;
                }
                safe = tls_framing_scan(&t, buf, n, n == num);
                if (safe > 0 || r <= 0 || n == num) {
                        *f = t;
                        break;
                }
        }
        assert_true(n - safe <= sizeof(f->head));
        memcpy(f->head, buf + safe, n - safe);
        f->n_head = (uint8_t)(n - safe);
        if (safe == 0)
                assert_true(r <= 0); /* nothing handed on: the real read's "no data" */
        return safe > 0 ? (int)safe : r;
}

typedef struct ModelStats {
        size_t runs, reads, splits, stalls, kept_max;
} ModelStats;

/* libcoap's coap_read_session(): woken while the socket has data, reads
 * again at once when the buffer came back full. Records arrive `batch` at a
 * time. A read that is not full, with the rest of a record still in libssl
 * (not in the socket), is where libcoap would wait for the peer's next
 * bytes (docs/design/libcoap.md, "What remains"): counted, then read on. */
static void model_run(const Stream *s, const size_t *ends, size_t n_ends, size_t num, size_t batch,
                      ModelStats *st) {
        TlsFraming f = { 0 };
        Source src = { .s = s, .ends = ends, .n_ends = n_ends };
        Reader r = { .s = s };
        uint8_t *buf = malloc(num);
        size_t next = 0;

        assert_non_null(buf);
        while (next < n_ends) {
                next = next + batch < n_ends ? next + batch : n_ends;
                src.avail = ends[next - 1];
                for (;;) {
                        int got = model_read(&f, &src, buf, num);

                        if (f.n_head > st->kept_max)
                                st->kept_max = f.n_head;
                        if (got <= 0) {
                                assert_int_equal(got, -1);
                                break;
                        }
                        reader_take(&r, buf, (size_t)got, (size_t)got == num);
                        if ((size_t)got < num && src.pos < src.avail && src.pos < ends[src.rec] &&
                            src.pos > (src.rec > 0 ? ends[src.rec - 1] : 0))
                                st->stalls++;
                }
        }
        assert_int_equal(src.pos, s->n);
        assert_int_equal(f.n_head, 0);
        assert_int_equal(f.body, 0);
        assert_int_equal(f.split, 0);
        reader_done(&r);
        st->runs++;
        st->reads += r.reads;
        st->splits += r.splits;
        free(buf);
}

static const size_t nums[] = { 6, 7, 8, 9, 11, 16, 23, 64, 300, COAP_READ_BUF };

static void test_model_every_cut(void **state) {
        (void)state;
        ModelStats st = { 0 };

        for (unsigned round = 0; round < 60; round++) {
                Stream s = { 0 };
                size_t m = rnd_in(1, 5);

                for (size_t i = 0; i < m; i++)
                        stream_add_random(&s, 0);
                for (size_t c = 1; c < s.n; c++) {
                        size_t ends[] = { c, s.n };

                        for (size_t k = 0; k < sizeof(nums) / sizeof(nums[0]); k++) {
                                model_run(&s, ends, 2, nums[k], 1, &st); /* the cut arrives first */
                                model_run(&s, ends, 2, nums[k], 2, &st); /* both records at once */
                        }
                }
                stream_free(&s);
        }
        printf("# every cut: %zu runs, %zu reads, %zu first bytes alone, %zu waits, at most %zu kept\n",
               st.runs, st.reads, st.splits, st.stalls, st.kept_max);
        assert_true(st.splits > 0);
        assert_true(st.kept_max <= TLS_FRAMING_HEADER_MAX - 1);
}

static void test_model_random_records(void **state) {
        (void)state;
        ModelStats st = { 0 };

        for (unsigned round = 0; round < 3000; round++) {
                Stream s = { 0 };
                size_t m = rnd_in(1, 12), *ends, n_ends = 0, pos = 0, maxrec;

                for (size_t i = 0; i < m; i++)
                        stream_add_random(&s, round % 50 == 0 && i == 1 ? 6 : 0);
                ends = malloc(sizeof(*ends) * s.n);
                assert_non_null(ends);
                maxrec = (size_t[]){ 1, 2, 3, 7, 40, 2000 }[rnd() % 6];
                while (pos < s.n) {
                        pos += rnd_in(1, maxrec);
                        if (pos > s.n)
                                pos = s.n;
                        ends[n_ends++] = pos;
                }
                model_run(&s, ends, n_ends, nums[rnd() % (sizeof(nums) / sizeof(nums[0]))], rnd_in(1, 4), &st);
                free(ends);
                stream_free(&s);
        }
        printf("# random records: %zu runs, %zu reads, %zu first bytes alone, %zu waits, at most %zu kept\n",
               st.runs, st.reads, st.splits, st.stalls, st.kept_max);
        assert_true(st.splits > 0);
        assert_true(st.kept_max <= TLS_FRAMING_HEADER_MAX - 1);
}

/* One byte per record, each read before the next arrives: every header is
 * handed on whole, whatever the buffer. */
static void test_model_byte_records(void **state) {
        (void)state;
        ModelStats st = { 0 };
        Stream s = { 0 };
        size_t *ends;

        for (size_t hs = 2; hs <= 6; hs++)
                if (hs != 5)
                        for (unsigned i = 0; i < 3; i++)
                                stream_add_random(&s, hs);
        ends = malloc(sizeof(*ends) * s.n);
        assert_non_null(ends);
        for (size_t i = 0; i < s.n; i++)
                ends[i] = i + 1;
        for (size_t k = 0; k < sizeof(nums) / sizeof(nums[0]); k++)
                model_run(&s, ends, s.n, nums[k], 1, &st);
        assert_int_equal(st.splits, 0);
        assert_int_equal(st.stalls, 0);
        assert_int_equal(st.kept_max, TLS_FRAMING_HEADER_MAX - 1);
        free(ends);
        stream_free(&s);
}

/* ---- the real wrapper: this program's SSL_read() ---------------------- */

typedef struct Pair {
        SSL_CTX *sctx, *cctx;
        SSL *server, *client;
} Pair;

static void pair_free(Pair *p) {
        SSL_free(p->server);
        SSL_free(p->client);
        SSL_CTX_free(p->sctx);
        SSL_CTX_free(p->cctx);
}

/* A TLS server marked with tls_framing_attach() before its handshake (as
 * lib/tls.c does at the ClientHello), the handshake driven through the
 * wrapper as libcoap does, which must say SSL_ERROR_WANT_READ meanwhile. */
static void pair_new(Pair *p) {
        EVP_PKEY *key = EVP_EC_gen("P-256");
        X509 *x = X509_new();
        BIO *sb, *cb;
        uint8_t buf[64];
        int done = 0;

        assert_non_null(key);
        assert_non_null(x);
        assert_int_equal(X509_set_version(x, 2), 1);
        ASN1_INTEGER_set(X509_get_serialNumber(x), 1);
        X509_gmtime_adj(X509_getm_notBefore(x), 0);
        X509_gmtime_adj(X509_getm_notAfter(x), 3600);
        X509_NAME_add_entry_by_txt(X509_get_subject_name(x), "CN", MBSTRING_ASC, (const uint8_t *)"t", -1, -1, 0);
        X509_set_issuer_name(x, X509_get_subject_name(x));
        assert_int_equal(X509_set_pubkey(x, key), 1);
        assert_true(X509_sign(x, key, EVP_sha256()) > 0);
        p->sctx = SSL_CTX_new(TLS_server_method());
        p->cctx = SSL_CTX_new(TLS_client_method());
        assert_non_null(p->sctx);
        assert_non_null(p->cctx);
        assert_int_equal(SSL_CTX_use_certificate(p->sctx, x), 1);
        assert_int_equal(SSL_CTX_use_PrivateKey(p->sctx, key), 1);
        X509_free(x);
        EVP_PKEY_free(key);
        p->server = SSL_new(p->sctx);
        p->client = SSL_new(p->cctx);
        assert_non_null(p->server);
        assert_non_null(p->client);
        assert_int_equal(BIO_new_bio_pair(&sb, 1 << 18, &cb, 1 << 18), 1);
        SSL_set_bio(p->server, sb, sb);
        SSL_set_bio(p->client, cb, cb);
        SSL_set_accept_state(p->server);
        SSL_set_connect_state(p->client);
        assert_int_equal(tls_framing_attach(p->server), 0);
        assert_int_equal(tls_framing_attach(p->server), 0); /* idempotent */
        for (int i = 0; i < 20 && !(done && SSL_is_init_finished(p->server)); i++) {
                int r = SSL_do_handshake(p->client);

                if (r == 1)
                        done = 1;
                else
                        assert_int_equal(SSL_get_error(p->client, r), SSL_ERROR_WANT_READ);
                r = SSL_read(p->server, buf, sizeof(buf));
                assert_int_equal(r, -1);
                assert_int_equal(SSL_get_error(p->server, r), SSL_ERROR_WANT_READ);
        }
        assert_true(done);
        assert_true(SSL_is_init_finished(p->server));
}

static void pair_send(Pair *p, const uint8_t *d, size_t n) {
        assert_int_equal(SSL_write(p->client, d, (int)n), (int)n); /* one record */
}

/* libcoap's reader on the server: reads until nothing more, again at once
 * on a full buffer; every -1 must say SSL_ERROR_WANT_READ. */
static void pair_drain(Pair *p, Reader *r, size_t num, size_t *waits) {
        uint8_t buf[COAP_READ_BUF];
        int got;

        assert_true(num <= sizeof(buf));
        while ((got = SSL_read(p->server, buf, (int)num)) > 0) {
                reader_take(r, buf, (size_t)got, (size_t)got == num);
                if ((size_t)got < num && SSL_has_pending(p->server) &&
                    BIO_ctrl_pending(SSL_get_rbio(p->server)) == 0)
                        (*waits)++; /* libcoap would wait for the peer's next bytes here */
        }
        assert_int_equal(got, -1);
        assert_int_equal(SSL_get_error(p->server, got), SSL_ERROR_WANT_READ);
}

static void test_ssl_records(void **state) {
        (void)state;
        size_t waits = 0, reads = 0, splits = 0;

        for (unsigned round = 0; round < 200; round++) {
                Pair p = { 0 };
                Stream s = { 0 };
                Reader r = { .s = &s };
                size_t m = rnd_in(1, 10), pos = 0, num = nums[rnd() % (sizeof(nums) / sizeof(nums[0]))];
                size_t maxrec = (size_t[]){ 1, 2, 3, 5, 60, 2000 }[rnd() % 6];

                pair_new(&p);
                for (size_t i = 0; i < m; i++)
                        stream_add_random(&s, 0);
                while (pos < s.n) {
                        size_t k = rnd_in(1, maxrec);

                        if (k > s.n - pos)
                                k = s.n - pos;
                        pair_send(&p, s.p + pos, k);
                        pos += k;
                        if (rnd() % 3 == 0 || BIO_ctrl_pending(SSL_get_wbio(p.client)) > 1 << 17)
                                pair_drain(&p, &r, num, &waits);
                }
                pair_drain(&p, &r, num, &waits);
                reader_done(&r);
                reads += r.reads;
                splits += r.splits;
                stream_free(&s);
                pair_free(&p);
        }
        printf("# through SSL_read(): %zu reads, %zu first bytes alone, %zu waits\n", reads, splits, waits);
}

/* A 6-byte header in six records, each read before the next is sent:
 * nothing is handed on (WANT_READ) until the sixth. */
static void test_ssl_header_bytes(void **state) {
        (void)state;
        Pair p = { 0 };
        Stream s = { 0 };
        Reader r = { .s = &s };
        size_t waits = 0;
        uint8_t buf[COAP_READ_BUF];

        pair_new(&p);
        stream_add(&s, 4, 65805 + 300);
        for (size_t i = 0; i < 5; i++) {
                int got;

                pair_send(&p, s.p + i, 1);
                got = SSL_read(p.server, buf, sizeof(buf));
                assert_int_equal(got, -1);
                assert_int_equal(SSL_get_error(p.server, got), SSL_ERROR_WANT_READ);
        }
        pair_send(&p, s.p + 5, 1);
        assert_int_equal(SSL_read(p.server, buf, sizeof(buf)), 6);
        reader_take(&r, buf, 6, 0);
        for (size_t pos = 6; pos < s.n; pos += 16000)
                pair_send(&p, s.p + pos, s.n - pos < 16000 ? s.n - pos : 16000);
        pair_drain(&p, &r, sizeof(buf), &waits);
        reader_done(&r);
        stream_free(&s);
        pair_free(&p);
}

/* SSLs not marked read through unchanged, even bytes that would be kept. */
static void test_ssl_unmarked(void **state) {
        (void)state;
        Pair p = { 0 };
        uint8_t buf[64];

        pair_new(&p);
        /* The client is not marked: the server's 2 bytes of a 6-byte header reach it at once. */
        assert_int_equal(SSL_write(p.server, "\xf0\x00", 2), 2);
        assert_int_equal(SSL_read(p.client, buf, sizeof(buf)), 2);
        assert_memory_equal(buf, "\xf0\x00", 2);
        pair_free(&p);
}

/* A reader that asks for fewer than TLS_FRAMING_HEADER_MAX bytes (libcoap
 * never does) gets the kept bytes in order and from then on plain reads,
 * whatever size it asks for next. */
static void test_ssl_small_read(void **state) {
        (void)state;
        Pair p = { 0 };
        uint8_t buf[64], got[8];
        size_t n = 0;
        int r;

        pair_new(&p);
        /* 2 bytes of a 3-byte header (Len 13, extended length 0xf0): kept. */
        pair_send(&p, (const uint8_t *)"\xd0\xf0", 2);
        r = SSL_read(p.server, buf, sizeof(buf));
        assert_int_equal(r, -1);
        assert_int_equal(SSL_get_error(p.server, r), SSL_ERROR_WANT_READ);
        assert_int_equal(SSL_read(p.server, buf, 1), 1);
        assert_int_equal(buf[0], 0xd0);
        /* 0xf0 would start a 6-byte header if it were still framed: it must not be kept. */
        pair_send(&p, (const uint8_t *)"\x01\x02", 2);
        while ((r = SSL_read(p.server, buf, sizeof(buf))) > 0) {
                assert_true(n + (size_t)r <= sizeof(got));
                memcpy(got + n, buf, (size_t)r);
                n += (size_t)r;
        }
        assert_int_equal(SSL_get_error(p.server, r), SSL_ERROR_WANT_READ);
        assert_int_equal(n, 3);
        assert_memory_equal(got, "\xf0\x01\x02", 3);
        pair_free(&p);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_scan_edges),
                cmocka_unit_test(test_scan_huge_body),
                cmocka_unit_test(test_scan_max_body),
                cmocka_unit_test(test_scan_every_cut),
                cmocka_unit_test(test_model_every_cut),
                cmocka_unit_test(test_model_random_records),
                cmocka_unit_test(test_model_byte_records),
                cmocka_unit_test(test_ssl_records),
                cmocka_unit_test(test_ssl_header_bytes),
                cmocka_unit_test(test_ssl_unmarked),
                cmocka_unit_test(test_ssl_small_read),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
