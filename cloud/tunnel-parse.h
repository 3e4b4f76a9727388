/* SPDX-License-Identifier: Apache-2.0 */
/* The pure parts of tunnels and log streams (tunnel-parse.c, prefix
 * tunnel_): what the HTTP client asks for (a target, a time, a unit, a
 * line count) and what a device sends on /t/SID (the stream id, the
 * Uri-Query options, the answer to an open), by the wire contract of
 * docs/protocol.md, "Streams: tunnels and logs". No logging, no state, no
 * I/O: unit tested (tests/unit/test-cloud-tunnel.c). Errors are negative
 * errno values; ret_* parameters are untouched on failure. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* The HTTP requests of tunnels and logs, by path (any method). */
typedef enum TunnelRoute {
        TUNNEL_ROUTE_NONE,
        TUNNEL_ROUTE_OPEN,  /* /v1/devices/ID/tunnel */
        TUNNEL_ROUTE_LOGS,  /* /v1/devices/ID/logs */
        TUNNEL_ROUTE_LIST,  /* /v1/devices/ID/tunnels */
        TUNNEL_ROUTE_DOWN,  /* /v1/devices/ID/tunnels/SID/down (split transport) */
        TUNNEL_ROUTE_UP,    /* /v1/devices/ID/tunnels/SID/up (split transport) */
} TunnelRoute;
/* Which one url (the decoded path) is, with the device ID segment in
 * device (any text of up to 64 bytes: the caller checks it) and, for
 * DOWN and UP, the stream id in *ret_sid (0 when the segment is not a
 * valid stream id: no stream has it). NONE for every other path. */
TunnelRoute tunnel_route(const char *url, char device[static 65], uint32_t *ret_sid);

/* "[" IPv6 "]:" 65535 and the NUL. */
#define TUNNEL_TARGET_MAX 56
#define TUNNEL_UNIT_MAX 256      /* bytes of a unit name */
#define TUNNEL_UNITS_MAX 16      /* units of one log stream */
#define TUNNEL_LINES_MAX 10000u

/* A tunnel's target, "IPV4:PORT" or "[IPV6]:PORT", numeric only (no
 * names), port 1..65535: 0 and its canonical text in ret (inet_ntop()'s
 * form of the address), or -EINVAL. */
int tunnel_parse_target(const char *s, char ret[static TUNNEL_TARGET_MAX]);
/* A log stream's "since": Unix seconds (decimal digits) or an RFC 3339
 * time, as CLOCK_REALTIME µs; -EINVAL for anything else, a time before
 * 1970 or past the year 9999. */
int tunnel_parse_since(const char *s, uint64_t *ret_usec);
/* "lines": decimal 0..TUNNEL_LINES_MAX, or -EINVAL. */
int tunnel_parse_lines(const char *s, unsigned *ret);
/* A unit name as systemd spells them: 1..TUNNEL_UNIT_MAX bytes of
 * [A-Za-z0-9:_.@\\-], with a dot (a suffix), not starting with one:
 * 0 or -EINVAL. Whether the device lets it be read is the device's call. */
int tunnel_check_unit(const char *s);
/* A stream id as sent in /t/SID: decimal 1..4294967295 without leading
 * zeros, or -EINVAL. */
int tunnel_parse_sid(const char *s, uint32_t *ret);

/* The Uri-Query options of a POST /t/SID. */
typedef struct TunnelQuery {
        bool has_ack;
        uint64_t ack; /* bytes the sender consumed in all (with has_ack) */
        bool fin;     /* the sender sends nothing more */
        bool open;    /* the device's connect to the target succeeded */
} TunnelQuery;
/* Add one Uri-Query option (len bytes, any bytes) to q: 0; -EBADMSG for
 * a malformed ack= (not a decimal uint64), an option given twice, or a
 * value on fin or open. Unknown options are ignored. */
int tunnel_query_add(TunnelQuery *q, const char *opt, size_t len);

/* The device's 2.01 answer to an open, {"window":N} (len bytes of JSON):
 * 0 and N, or -EBADMSG (not that shape, or N outside
 * PROTO_STREAM_WINDOW_MIN..PROTO_STREAM_WINDOW_MAX). */
int tunnel_parse_open_answer(const void *data, size_t len, uint32_t *ret_window);
