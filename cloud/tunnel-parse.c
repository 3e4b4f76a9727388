/* SPDX-License-Identifier: Apache-2.0 */
/* The pure parts of tunnels and log streams (tunnel-parse.h). */
#include "config.h"

#include <arpa/inet.h>
#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <string.h>

#include "api-request.h"
#include "proto.h"
#include "tunnel-parse.h"

#define USEC_PER_SEC 1000000ULL
/* 9999-12-31T23:59:59Z */
#define TUNNEL_TIME_MAX 253402300799LL

/* Decimal digits only, without a sign or blanks, at most max: 0 or -EINVAL. */
static int tunnel_decimal(const char *s, size_t len, uint64_t max, uint64_t *ret) {
        uint64_t v = 0;

        if (len == 0 || len > 20)
                return -EINVAL;
        for (size_t i = 0; i < len; i++) {
                unsigned digit;

                if (s[i] < '0' || s[i] > '9')
                        return -EINVAL;
                digit = (unsigned)(s[i] - '0');
                if (v > (UINT64_MAX - digit) / 10)
                        return -EINVAL;
                v = v * 10 + digit;
        }
        if (v > max)
                return -EINVAL;
        *ret = v;
        return 0;
}

TunnelRoute tunnel_route(const char *url, char device[static 65], uint32_t *ret_sid) {
        static const char prefix[] = "/v1/devices/";
        const char *id, *slash;
        size_t n;

        if (strncmp(url, prefix, strlen(prefix)) != 0)
                return TUNNEL_ROUTE_NONE;
        id = url + strlen(prefix);
        slash = strchr(id, '/');
        if (!slash || slash == id || (n = (size_t)(slash - id)) > 64)
                return TUNNEL_ROUTE_NONE;
        memcpy(device, id, n);
        device[n] = 0;
        if (strcmp(slash, "/tunnel") == 0)
                return TUNNEL_ROUTE_OPEN;
        if (strcmp(slash, "/logs") == 0)
                return TUNNEL_ROUTE_LOGS;
        if (strcmp(slash, "/tunnels") == 0)
                return TUNNEL_ROUTE_LIST;
        if (strncmp(slash, "/tunnels/", strlen("/tunnels/")) == 0) {
                const char *sid = slash + strlen("/tunnels/"), *end = strchr(sid, '/');
                char text[16];
                uint32_t v = 0;
                TunnelRoute r;

                if (!end)
                        return TUNNEL_ROUTE_NONE;
                if (strcmp(end, "/down") == 0)
                        r = TUNNEL_ROUTE_DOWN;
                else if (strcmp(end, "/up") == 0)
                        r = TUNNEL_ROUTE_UP;
                else
                        return TUNNEL_ROUTE_NONE;
                n = (size_t)(end - sid);
                if (n > 0 && n < sizeof(text)) {
                        memcpy(text, sid, n);
                        text[n] = 0;
                        if (tunnel_parse_sid(text, &v) < 0)
                                v = 0;
                }
                *ret_sid = v;
                return r;
        }
        return TUNNEL_ROUTE_NONE;
}

int tunnel_parse_target(const char *s, char ret[static TUNNEL_TARGET_MAX]) {
        char host[INET6_ADDRSTRLEN], text[INET6_ADDRSTRLEN];
        unsigned char addr[sizeof(struct in6_addr)];
        const char *colon, *port;
        bool v6 = s[0] == '[';
        uint64_t p;
        size_t n;

        if (v6) {
                const char *close = strchr(s, ']');

                if (!close || close[1] != ':')
                        return -EINVAL;
                n = (size_t)(close - s - 1);
                if (n == 0 || n >= sizeof(host))
                        return -EINVAL;
                memcpy(host, s + 1, n);
                port = close + 2;
        } else {
                colon = strchr(s, ':');
                if (!colon || strchr(colon + 1, ':'))
                        return -EINVAL;
                n = (size_t)(colon - s);
                if (n == 0 || n >= sizeof(host))
                        return -EINVAL;
                memcpy(host, s, n);
                port = colon + 1;
        }
        host[n] = 0;
        /* No leading zeros: "022" is not a port anyone means. */
        if (port[0] == '0' || tunnel_decimal(port, strlen(port), 65535, &p) < 0 || p == 0)
                return -EINVAL;
        if (inet_pton(v6 ? AF_INET6 : AF_INET, host, addr) != 1 ||
            !inet_ntop(v6 ? AF_INET6 : AF_INET, addr, text, sizeof(text)))
                return -EINVAL;
        snprintf(ret, TUNNEL_TARGET_MAX, v6 ? "[%s]:%u" : "%s:%u", text, (unsigned)p);
        return 0;
}

int tunnel_parse_since(const char *s, uint64_t *ret_usec) {
        size_t len = strlen(s);
        uint64_t v;
        int64_t t;

        if (len > 0 && strspn(s, "0123456789") == len) {
                if (tunnel_decimal(s, len, (uint64_t)TUNNEL_TIME_MAX, &v) < 0)
                        return -EINVAL;
                *ret_usec = v * USEC_PER_SEC;
                return 0;
        }
        if (api_parse_rfc3339(s, len, &t) < 0 || t < 0 || t > TUNNEL_TIME_MAX)
                return -EINVAL;
        *ret_usec = (uint64_t)t * USEC_PER_SEC;
        return 0;
}

int tunnel_parse_lines(const char *s, unsigned *ret) {
        uint64_t v;

        if (tunnel_decimal(s, strlen(s), TUNNEL_LINES_MAX, &v) < 0)
                return -EINVAL;
        *ret = (unsigned)v;
        return 0;
}

int tunnel_check_unit(const char *s) {
        size_t n = strlen(s);

        if (n == 0 || n > TUNNEL_UNIT_MAX || s[0] == '.' || !strchr(s, '.'))
                return -EINVAL;
        if (strspn(s, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789:_.@\\-") != n)
                return -EINVAL;
        return 0;
}

int tunnel_parse_sid(const char *s, uint32_t *ret) {
        uint64_t v;

        if (s[0] == '0' || tunnel_decimal(s, strlen(s), UINT32_MAX, &v) < 0)
                return -EINVAL;
        *ret = (uint32_t)v;
        return 0;
}

int tunnel_query_add(TunnelQuery *q, const char *opt, size_t len) {
        if (len >= 4 && memcmp(opt, "ack=", 4) == 0) {
                uint64_t v;

                if (q->has_ack || tunnel_decimal(opt + 4, len - 4, UINT64_MAX, &v) < 0)
                        return -EBADMSG;
                q->has_ack = true;
                q->ack = v;
                return 0;
        }
        if (len >= 3 && memcmp(opt, "fin", 3) == 0 && (len == 3 || opt[3] == '=')) {
                if (q->fin || len != 3)
                        return -EBADMSG;
                q->fin = true;
                return 0;
        }
        if (len >= 4 && memcmp(opt, "open", 4) == 0 && (len == 4 || opt[4] == '=')) {
                if (q->open || len != 4)
                        return -EBADMSG;
                q->open = true;
                return 0;
        }
        return 0;
}

int tunnel_parse_open_answer(const void *data, size_t len, uint32_t *ret_window) {
        json_t *j = data && len > 0 ? json_loadb(data, len, JSON_REJECT_DUPLICATES, NULL) : NULL;
        json_t *w = json_object_get(j, "window");
        json_int_t v = json_is_integer(w) ? json_integer_value(w) : -1;

        json_decref(j);
        if (v < PROTO_STREAM_WINDOW_MIN || v > PROTO_STREAM_WINDOW_MAX)
                return -EBADMSG;
        *ret_window = (uint32_t)v;
        return 0;
}
