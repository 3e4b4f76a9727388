/* SPDX-License-Identifier: Apache-2.0 */
/* Streams: tunnels to local TCP targets and journal streams, carried over
 * the cloud connection as /t/{sid} (docs/protocol.md, "Streams: tunnels
 * and logs"). The Streams object owns every stream, its socket or journal
 * reader, its buffers and timers; it borrows the Conn it sends on and the
 * Config.
 *
 * Guarantees: every stream the cloud opens is within [Tunnel] Allow= or
 * [Logs] Units=, at most [Tunnel] MaxStreams at once; the cloud may never
 * make it buffer more than the window it announced per stream (a message
 * past the window resets the stream); it sends device→cloud data only
 * within the cloud's credit, and keeps at most PROTO_STREAM_INFLIGHT_MAX
 * bytes of stream payload unanswered on the session, reading sockets and
 * the journal only while it may send (never an unbounded queue). A stream
 * with nothing buffered holds no buffer. Nothing blocks the loop: sockets
 * are non-blocking, a journal stream reads at most 256 entries per turn
 * of the loop. Streams end with the session. */
#pragma once

#include <stdbool.h>
#include <stdint.h>
#include <systemd/sd-event.h>

#include "agent-config.h"
#include "conn.h"

typedef struct Streams Streams;

/* Counters since the agent started (tetherctl status --json, "counters",
 * "streams"). */
typedef struct StreamsStats {
        uint64_t open;      /* open now */
        uint64_t opened;    /* opens accepted (2.01) */
        uint64_t refused;   /* opens refused (4.xx, 5.03) */
        uint64_t bytes_in;  /* stream bytes from the cloud */
        uint64_t bytes_out; /* stream bytes to the cloud */
} StreamsStats;

/* conn and cfg are borrowed: conn for the life of the Streams, cfg until
 * streams_reconfigure() or streams_free(). */
int streams_new(sd_event *event, Conn *conn, const Config *cfg, Streams **ret);
/* Closes every stream without telling the cloud (the connection goes
 * first). */
Streams *streams_free(Streams *s);
static inline void streams_freep(Streams **s) { streams_free(*s); }

/* A request from the cloud on /t/{sid}: the ConnHooks' stream_request. */
unsigned streams_request(Streams *s, unsigned method, uint32_t sid, const char *query, size_t query_len,
                         const uint8_t *data, size_t len, ConnStreamAnswer *answer);
/* The connection came or went: when it went, every stream ends. */
void streams_connection_changed(Streams *s, bool connected);
/* Swap in a new config (after SIGHUP): new streams follow it; open streams
 * whose target or units it no longer allows end with "no longer allowed". */
void streams_reconfigure(Streams *s, const Config *cfg);
/* Valid while s lives. */
const StreamsStats *streams_stats(Streams *s);
