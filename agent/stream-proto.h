/* SPDX-License-Identifier: Apache-2.0 */
/* The pure parts of streams (docs/protocol.md, "Streams: tunnels and
 * logs"): tunnel targets and [Tunnel] Allow= entries, the Uri-Query of a
 * stream's POST, the JSON of an open, unit names and [Logs] Units=, and the
 * text repairs of the log payload. Parsing and matching only: no I/O, no
 * logging, no event loop. Errors are negative errno values. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

/* "[ipv6]:65535" and the NUL. */
#define STREAM_ADDR_TEXT_MAX 56
/* [Tunnel] Allow= takes at most this many entries. */
#define STREAM_ALLOW_MAX 64
/* An open's JSON is at most this long. */
#define STREAM_OPEN_MAX 16384
#define STREAM_UNITS_MAX 16
#define STREAM_UNIT_NAME_MAX 256
#define STREAM_LINES_MAX 10000
#define STREAM_LINES_DEFAULT 10
/* A log entry's message is cut to this many bytes (then "…" follows). */
#define STREAM_MESSAGE_MAX 16384

/* A numeric address and port; port 0 in an Allow= entry: any port. */
typedef struct StreamAddr {
        int family; /* AF_INET or AF_INET6 */
        uint8_t addr[16];
        uint16_t port;
} StreamAddr;

/* "IPV4:PORT" or "[IPV6]:PORT", numeric only (no names, no zone), port
 * 1..65535; with any_port also "ADDR:*" (port 0). -EINVAL otherwise;
 * *ret untouched then. */
int stream_addr_parse(const char *s, bool any_port, StreamAddr *ret);
/* As stream_addr_parse() takes it ("*" for port 0); returns buf. */
const char *stream_addr_text(const StreamAddr *a, char buf[static STREAM_ADDR_TEXT_MAX]);
/* The socket address of a (a target, port != 0). */
socklen_t stream_addr_sockaddr(const StreamAddr *a, struct sockaddr_storage *ret);
/* Whether target is one of allow[0..n): same family and address, and the
 * same port or an entry's port 0. */
bool stream_addr_allowed(const StreamAddr *allow, size_t n, const StreamAddr *target);
/* [Tunnel] Allow=: entries separated by blanks or commas, each one
 * stream_addr_parse(..., true) takes; empty: none. *ret is malloc'd (NULL
 * when none). -EINVAL with the bad entry (at most 63 bytes) in bad, -E2BIG
 * over STREAM_ALLOW_MAX entries, -ENOMEM. */
int stream_allow_parse(const char *value, StreamAddr **ret, size_t *ret_n, char bad[static 64]);

/* The Uri-Query of a POST /t/{sid}, as libcoap joins its options with
 * '&': ack=N (decimal uint64), fin, open; others ignored. -EBADMSG: one of
 * ours twice, ack without a valid number, fin or open with a value. */
typedef struct StreamQuery {
        bool have_ack, fin, open;
        uint64_t ack;
} StreamQuery;
int stream_query_parse(const char *q, size_t len, StreamQuery *ret);

/* A systemd unit name: 1..STREAM_UNIT_NAME_MAX bytes of [A-Za-z0-9:_.\@-],
 * with a '.' that is neither first nor last. */
bool stream_unit_name_valid(const char *s);
/* Whether unit may be read: one of the tether units
 * (STREAM_DEFAULT_UNITS), in extra (NULL-terminated, may be NULL), or extra
 * holds "*". */
bool stream_unit_allowed(char *const *extra, const char *unit);
/* The units of a log stream that names none. */
extern const char *const STREAM_DEFAULT_UNITS[]; /* NULL-terminated */

typedef enum StreamKind {
        STREAM_TUNNEL,
        STREAM_LOG,
} StreamKind;

/* A PUT /t/{sid}'s JSON. */
typedef struct StreamOpen {
        StreamKind kind;
        uint32_t window;
        StreamAddr target;                 /* tunnel */
        char *units[STREAM_UNITS_MAX + 1]; /* log, NULL-terminated; none: the default set */
        size_t n_units;
        bool have_since, have_lines, follow;
        uint64_t since; /* CLOCK_REALTIME µs */
        unsigned lines;
} StreamOpen;

/* Parse an open; on -EBADMSG error says why (for the 4.00's text).
 * -ENOMEM. *ret (zeroed first) is to be freed with stream_open_done()
 * also on failure. */
int stream_open_parse(const uint8_t *data, size_t len, StreamOpen *ret, char *error, size_t error_size);
void stream_open_done(StreamOpen *o);

/* Copy len bytes of s into a malloc'd NUL-terminated string, each byte
 * that is not part of valid UTF-8 (or is a NUL) replaced by U+FFFD, cut
 * after at most max bytes of s at a character boundary with "…" appended
 * when cut. NULL on ENOMEM. */
char *stream_utf8_repair(const char *s, size_t len, size_t max);
