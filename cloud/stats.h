/* SPDX-License-Identifier: Apache-2.0 */
/* tether-cloudd's own metrics (docs/cloud.md, "Metrics"): which series
 * exist, the one-line hooks the other modules call when something
 * happens, the event-loop delay probe, and the /metrics text.
 *
 * The series are process-wide, like the process they describe: one
 * registry, made by stats_init() before the loop starts. Every hook is
 * safe from any thread (metrics.h) and does nothing before stats_init()
 * or after stats_done(), so modules can be used without it (unit tests). */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <systemd/sd-event.h>

typedef enum StatsRefused {
        STATS_REFUSED_TLS,         /* the TLS handshake failed (certificate, not TLS) */
        STATS_REFUSED_TIMEOUT,     /* no device within HandshakeTimeoutSec */
        STATS_REFUSED_EVICTED,     /* closed for a newer one past MaxHandshakes */
        STATS_REFUSED_NO_IDENTITY, /* a certificate without a device id */
        _STATS_REFUSED_MAX,
} StatsRefused;

typedef enum StatsSource {
        STATS_FROM_DEVICE,
        STATS_FROM_API,
        STATS_FROM_MQTT, /* the MQTT inbox (cluster mode) */
        _STATS_FROM_MAX,
} StatsSource;

typedef enum StatsSink {
        STATS_TO_STREAM, /* one event written into one SSE stream (live or replayed) */
        STATS_TO_DEVICE, /* one event sent to one subscribed device */
        _STATS_TO_MAX,
} StatsSink;

typedef enum StatsDropped {
        STATS_DROPPED_DUPLICATE,          /* a device resent what was delivered */
        STATS_DROPPED_STORE_FAILED,       /* the journal could not take it (refused) */
        STATS_DROPPED_STREAM_BEHIND,      /* an SSE stream fell too far behind */
        STATS_DROPPED_DEVICE_BACKLOGGED,  /* a subscribed device is not reading */
        STATS_DROPPED_DEVICE_TOO_SMALL,   /* larger than the device's Max-Message-Size */
        STATS_DROPPED_DEVICE_SEND_FAILED, /* any other send error */
        STATS_DROPPED_RESERVED_NAME,      /* a device published under tether/ (4.03) */
        STATS_DROPPED_RATE_LIMITED,       /* past the device's rate limits (4.29, it retries) */
        STATS_DROPPED_JOURNAL_SHARE,      /* left out of the journal at a rewrite, over its device's share */
        STATS_DROPPED_INBOX_INVALID,      /* an MQTT inbox message that is no event (cluster mode) */
        STATS_DROPPED_STREAM_INVALID,     /* a message of the cluster's journal that is no event */
        _STATS_DROPPED_MAX,
} StatsDropped;

typedef enum StatsApiRefused {
        STATS_API_HEADER_TIMEOUT, /* no complete request header within HeaderTimeoutSec */
        STATS_API_RATE_ADDRESS,   /* 429: RateLimitPerAddress */
        STATS_API_RATE_TOKEN,     /* 429: RateLimitPerToken */
        STATS_API_RATE_AUTH,      /* 429: AuthFailuresPerAddress */
        STATS_API_BAD_PATH,       /* 400: %00 or %2F in the path */
        STATS_API_STREAMS_TOKEN,  /* 429: MaxStreamsPerToken */
        _STATS_API_REFUSED_MAX,
} StatsApiRefused;

typedef enum StatsIntegration {
        STATS_INTEGRATION_DELIVERED, /* a receiver or broker took an event */
        STATS_INTEGRATION_FAILED,    /* a delivery failed (it is retried) */
        STATS_INTEGRATION_LOST,      /* the journal dropped it before it was delivered */
        _STATS_INTEGRATION_MAX,
} StatsIntegration;

/* Register every series. 0, -ENOMEM. */
int stats_init(void);
/* Stops the loop probe and frees everything; safe to call twice. */
void stats_done(void);
/* Measure event's lateness: a timer every STATS_LOOP_PROBE_USEC observes
 * how late it ran, as tether_cloud_loop_delay_seconds{worker=...}. */
int stats_loop_probe_start(sd_event *event, unsigned worker);

/* Add the series tether_cloud_shard_sessions{shard="0".."n-1"} (once;
 * later calls and calls before stats_init() do nothing). 0, -ENOMEM. */
int stats_shards(unsigned n);
/* Sessions (accepted connections, bound to a device or not) in a shard. */
void stats_shard_sessions(unsigned shard, int delta);

void stats_device_connected(int delta);
/* Enrollment sessions (anonymous, no device) open. */
void stats_enrollment_sessions(int delta);
/* A certificate was issued: renew false for an enrollment. */
void stats_certificate_issued(bool renew);
void stats_handshake_started(void);
void stats_handshake_completed(void);
/* A completed handshake resumed a TLS session (counted with completed too). */
void stats_handshake_resumed(void);
void stats_handshake_refused(StatsRefused reason);
/* A walk over every session of a shard (cloud/devices.c, shard_scan()):
 * done, or skipped (libcoap's own after a dispatch). */
void stats_session_walk(bool skipped);
/* The heap's free memory was handed back to the system after connections
 * came and went (cloud/devices.c, devices_trim_cb()). */
void stats_memory_trim(void);

/* A call (function) or read (variable) from the API ended: error and code
 * as device_call_fn gives them, or the error of devices_call() when it was
 * not sent (then started_usec is 0). started_usec (CLOCK_MONOTONIC) is
 * when it was sent: its latency is observed. */
void stats_call_done(bool function, int error, unsigned code, uint64_t started_usec);

void stats_event_in(StatsSource source);
void stats_event_out(StatsSink sink);
void stats_event_dropped(StatsDropped reason);
/* n events left out of the journal at a rewrite for their device's share. */
void stats_journal_share_dropped(uint64_t n);
/* Map device_event_undeliverable()'s error to a reason and count it. */
void stats_event_undeliverable(int error);
void stats_stream_opened(int delta);
/* An API connection closed or request refused by the API's limits. */
void stats_api_refused(StatsApiRefused reason);

/* Journal: an event of bytes appended and not yet synced; a sync that
 * began at started_usec (CLOCK_MONOTONIC; 0: not timed) has just finished
 * and covered events and bytes appended before it (safe from any thread). */
/* Outbound integrations (integrations.h): n events of one outcome; the
 * integrations failing now; the events the one furthest behind has left
 * (an upper bound, as integrations_json()'s "backlog"). */
void stats_integration(StatsIntegration outcome, uint64_t n);
void stats_integrations_failing(int delta);
void stats_integrations_backlog(uint64_t events);
void stats_journal_appended(size_t bytes);
void stats_journal_synced(uint64_t started_usec, uint64_t events, uint64_t bytes);

/* The /metrics text (NUL-terminated, the caller frees it); max_lag_bytes
 * is the largest backlog of any SSE stream now. -ENOMEM, -ENODEV before
 * stats_init(). */
int stats_render(uint64_t max_lag_bytes, char **ret, size_t *ret_len);
