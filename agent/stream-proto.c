/* SPDX-License-Identifier: Apache-2.0 */
#include <arpa/inet.h>
#include <errno.h>
#include <jansson.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "keyfile.h"
#include "proto.h"
#include "stream-proto.h"
#include "util.h"

const char *const STREAM_DEFAULT_UNITS[] = { "tetherd.service", "tether-ota-install.service", NULL };

int stream_addr_parse(const char *s, bool any_port, StreamAddr *ret) {
        char host[INET6_ADDRSTRLEN];
        const char *port;
        StreamAddr a = {};
        uint64_t v = 0;
        size_t n;

        if (!s)
                return -EINVAL;
        if (s[0] == '[') {
                const char *end = strchr(s, ']');

                if (!end || end[1] != ':')
                        return -EINVAL;
                n = (size_t)(end - s - 1);
                if (n == 0 || n >= sizeof(host))
                        return -EINVAL;
                memcpy(host, s + 1, n);
                host[n] = 0;
                if (inet_pton(AF_INET6, host, a.addr) != 1)
                        return -EINVAL;
                a.family = AF_INET6;
                port = end + 2;
        } else {
                const char *colon = strchr(s, ':');

                if (!colon)
                        return -EINVAL;
                n = (size_t)(colon - s);
                if (n == 0 || n >= sizeof(host))
                        return -EINVAL;
                memcpy(host, s, n);
                host[n] = 0;
                /* inet_pton() takes only dotted quads: no names, no "1" for 0.0.0.1. */
                if (inet_pton(AF_INET, host, a.addr) != 1)
                        return -EINVAL;
                a.family = AF_INET;
                port = colon + 1;
        }
        if (any_port && streq(port, "*"))
                v = 0;
        else if (keyfile_parse_uint(port, 65535, &v) < 0 || v == 0 || port[0] == '0')
                return -EINVAL;
        a.port = (uint16_t)v;
        *ret = a;
        return 0;
}

const char *stream_addr_text(const StreamAddr *a, char buf[static STREAM_ADDR_TEXT_MAX]) {
        char host[INET6_ADDRSTRLEN] = "?", port[8] = "*";

        (void)inet_ntop(a->family, a->addr, host, sizeof(host));
        if (a->port)
                snprintf(port, sizeof(port), "%u", a->port);
        snprintf(buf, STREAM_ADDR_TEXT_MAX, a->family == AF_INET6 ? "[%s]:%s" : "%s:%s", host, port);
        return buf;
}

socklen_t stream_addr_sockaddr(const StreamAddr *a, struct sockaddr_storage *ret) {
        memset(ret, 0, sizeof(*ret));
        if (a->family == AF_INET6) {
                struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)ret;

                sin6->sin6_family = AF_INET6;
                sin6->sin6_port = htons(a->port);
                memcpy(&sin6->sin6_addr, a->addr, 16);
                return sizeof(*sin6);
        } else {
                struct sockaddr_in *sin = (struct sockaddr_in *)ret;

                sin->sin_family = AF_INET;
                sin->sin_port = htons(a->port);
                memcpy(&sin->sin_addr, a->addr, 4);
                return sizeof(*sin);
        }
}

bool stream_addr_allowed(const StreamAddr *allow, size_t n, const StreamAddr *target) {
        size_t alen = target->family == AF_INET6 ? 16 : 4;

        for (size_t i = 0; i < n; i++)
                if (allow[i].family == target->family && memcmp(allow[i].addr, target->addr, alen) == 0 &&
                    (allow[i].port == 0 || allow[i].port == target->port))
                        return true;
        return false;
}

int stream_allow_parse(const char *value, StreamAddr **ret, size_t *ret_n, char bad[static 64]) {
        _cleanup_free_ char *copy = strdup(value ? value : "");
        _cleanup_free_ StreamAddr *list = NULL;
        char *tok, *save = NULL;
        size_t n = 0;

        if (!copy)
                return -ENOMEM;
        for (tok = strtok_r(copy, " \t,", &save); tok; tok = strtok_r(NULL, " \t,", &save)) {
                StreamAddr a;

                if (stream_addr_parse(tok, true, &a) < 0) {
                        snprintf(bad, 64, "%s", tok);
                        return -EINVAL;
                }
                if (n == STREAM_ALLOW_MAX)
                        return -E2BIG;
                if (!list) {
                        list = calloc(STREAM_ALLOW_MAX, sizeof(*list));
                        if (!list)
                                return -ENOMEM;
                }
                list[n++] = a;
        }
        *ret = TAKE_PTR(list);
        *ret_n = n;
        return 0;
}

int stream_query_parse(const char *q, size_t len, StreamQuery *ret) {
        StreamQuery r = {};
        size_t i = 0;

        if (q && memchr(q, 0, len))
                return -EBADMSG;
        while (q && i < len) {
                const char *opt = q + i, *amp = memchr(opt, '&', len - i);
                size_t n = amp ? (size_t)(amp - opt) : len - i;

                i += n + 1;
                if (n == 3 && memcmp(opt, "fin", 3) == 0) {
                        if (r.fin)
                                return -EBADMSG;
                        r.fin = true;
                } else if (n == 4 && memcmp(opt, "open", 4) == 0) {
                        if (r.open)
                                return -EBADMSG;
                        r.open = true;
                } else if (n >= 4 && memcmp(opt, "ack=", 4) == 0) {
                        char num[24];

                        if (r.have_ack || n - 4 == 0 || n - 4 >= sizeof(num))
                                return -EBADMSG;
                        memcpy(num, opt + 4, n - 4);
                        num[n - 4] = 0;
                        if (keyfile_parse_uint(num, UINT64_MAX, &r.ack) < 0)
                                return -EBADMSG;
                        r.have_ack = true;
                } else if ((n > 3 && memcmp(opt, "fin", 3) == 0 && opt[3] == '=') ||
                           (n > 4 && memcmp(opt, "open", 4) == 0 && opt[4] == '=') ||
                           (n == 3 && memcmp(opt, "ack", 3) == 0))
                        return -EBADMSG;
        }
        *ret = r;
        return 0;
}

bool stream_unit_name_valid(const char *s) {
        size_t n = s ? strlen(s) : 0;
        const char *dot;

        if (n == 0 || n > STREAM_UNIT_NAME_MAX)
                return false;
        if (strspn(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:_.\\@-") != n)
                return false;
        dot = strrchr(s, '.');
        return dot && dot != s && dot[1];
}

bool stream_unit_allowed(char *const *extra, const char *unit) {
        for (size_t i = 0; STREAM_DEFAULT_UNITS[i]; i++)
                if (streq(STREAM_DEFAULT_UNITS[i], unit))
                        return true;
        for (; extra && *extra; extra++)
                if (streq(*extra, "*") || streq(*extra, unit))
                        return true;
        return false;
}

void stream_open_done(StreamOpen *o) {
        for (size_t i = 0; i < o->n_units; i++)
                free(o->units[i]);
        o->n_units = 0;
        o->units[0] = NULL;
}

static int open_fail(char *error, size_t size, const char *fmt, ...) _printf_(3, 4);
static int open_fail(char *error, size_t size, const char *fmt, ...) {
        va_list ap;

        va_start(ap, fmt);
        vsnprintf(error, size, fmt, ap);
        va_end(ap);
        return -EBADMSG;
}

static int parse_journal(json_t *jr, StreamOpen *o, char *error, size_t size) {
        json_t *units, *since, *lines, *follow, *u;
        size_t i;

        if (!json_is_object(jr))
                return open_fail(error, size, "%s", "journal must be an object");
        units = json_object_get(jr, "units");
        since = json_object_get(jr, "since");
        lines = json_object_get(jr, "lines");
        follow = json_object_get(jr, "follow");
        if (units && !json_is_array(units))
                return open_fail(error, size, "%s", "units must be an array of unit names");
        if (json_array_size(units) > STREAM_UNITS_MAX)
                return open_fail(error, size, "%s", "too many units (at most 16)");
        json_array_foreach(units, i, u) {
                const char *name = json_string_value(u);

                if (!name || !stream_unit_name_valid(name))
                        return open_fail(error, size, "invalid unit name '%.64s'", name ? name : "(not a string)");
                o->units[o->n_units] = strdup(name);
                if (!o->units[o->n_units])
                        return -ENOMEM;
                o->units[++o->n_units] = NULL;
        }
        if (since) {
                if (!json_is_integer(since) || json_integer_value(since) < 0)
                        return open_fail(error, size, "%s", "since must be microseconds since 1970 (an integer)");
                o->have_since = true;
                o->since = (uint64_t)json_integer_value(since);
        }
        if (lines) {
                if (!json_is_integer(lines) || json_integer_value(lines) < 0 ||
                    json_integer_value(lines) > STREAM_LINES_MAX)
                        return open_fail(error, size, "%s", "lines must be 0..10000");
                o->have_lines = true;
                o->lines = (unsigned)json_integer_value(lines);
        }
        if (follow && !json_is_boolean(follow))
                return open_fail(error, size, "%s", "follow must be true or false");
        o->follow = json_is_true(follow);
        return 0;
}

int stream_open_parse(const uint8_t *data, size_t len, StreamOpen *ret, char *error, size_t size) {
        json_t *j, *target, *journal, *window;
        json_error_t e;
        int r = 0;

        memset(ret, 0, sizeof(*ret));
        if (len > STREAM_OPEN_MAX)
                return open_fail(error, size, "%s", "open request too large");
        j = json_loadb(data ? (const char *)data : "", len, JSON_REJECT_DUPLICATES, &e);
        if (!json_is_object(j)) {
                json_decref(j);
                return open_fail(error, size, "%s", "malformed JSON");
        }
        target = json_object_get(j, "target");
        journal = json_object_get(j, "journal");
        window = json_object_get(j, "window");
        if (!window || !json_is_integer(window) || json_integer_value(window) < PROTO_STREAM_WINDOW_MIN ||
            json_integer_value(window) > PROTO_STREAM_WINDOW_MAX)
                r = open_fail(error, size, "%s", "window must be 32768..4194304");
        else if (!!target == !!journal)
                r = open_fail(error, size, "%s", "exactly one of target and journal is needed");
        else if (target) {
                ret->kind = STREAM_TUNNEL;
                if (stream_addr_parse(json_string_value(target), false, &ret->target) < 0)
                        r = open_fail(error, size, "invalid target '%.64s' (IPV4:PORT or [IPV6]:PORT)",
                                      json_string_value(target) ?: "(not a string)");
        } else {
                ret->kind = STREAM_LOG;
                r = parse_journal(journal, ret, error, size);
        }
        if (r == 0)
                ret->window = (uint32_t)json_integer_value(window);
        json_decref(j);
        return r;
}

/* The length of the valid UTF-8 character at s[0..n), 0 if none. */
static size_t utf8_char(const unsigned char *s, size_t n) {
        unsigned char c = s[0];
        size_t need;
        unsigned char lo = 0x80, hi = 0xbf;

        if (c >= 0x01 && c < 0x80)
                return 1;
        if (c >= 0xc2 && c <= 0xdf)
                need = 1;
        else if (c >= 0xe0 && c <= 0xef) {
                need = 2;
                if (c == 0xe0)
                        lo = 0xa0;
                else if (c == 0xed)
                        hi = 0x9f;
        } else if (c >= 0xf0 && c <= 0xf4) {
                need = 3;
                if (c == 0xf0)
                        lo = 0x90;
                else if (c == 0xf4)
                        hi = 0x8f;
        } else
                return 0;
        if (n < need + 1 || s[1] < lo || s[1] > hi)
                return 0;
        for (size_t i = 2; i <= need; i++)
                if (s[i] < 0x80 || s[i] > 0xbf)
                        return 0;
        return need + 1;
}

char *stream_utf8_repair(const char *s, size_t len, size_t max) {
        const unsigned char *p = (const unsigned char *)s;
        size_t in = 0, out = 0;
        bool cut = false;
        /* At worst every byte becomes three. */
        char *buf = malloc((len < max ? len : max) * 3 + 4);

        if (!buf)
                return NULL;
        while (in < len) {
                size_t k = utf8_char(p + in, len - in);

                if (in + (k ? k : 1) > max) {
                        cut = true;
                        break;
                }
                if (k) {
                        memcpy(buf + out, p + in, k);
                        out += k;
                        in += k;
                } else {
                        memcpy(buf + out, "\xef\xbf\xbd", 3);
                        out += 3;
                        in++;
                }
        }
        if (cut) {
                memcpy(buf + out, "\xe2\x80\xa6", 3);
                out += 3;
        }
        buf[out] = 0;
        return buf;
}
