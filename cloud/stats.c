/* SPDX-License-Identifier: Apache-2.0 */
/* tether-cloudd's metrics (stats.h): the series, the hooks, the loop
 * probe. Names and meanings are documented in docs/cloud.md, "Metrics";
 * a change here changes that table. The registry below is the one piece
 * of file-level mutable state in cloud/, on purpose: the metrics describe
 * the process, like the log, and every module reports to them without
 * being handed an object. */
#include "config.h"

#include <coap3/coap.h>

#include "metrics.h"
#include "stats.h"
#include "util.h"

#define USEC_PER_MSEC 1000ULL
#define STATS_LOOP_PROBE_USEC (500 * USEC_PER_MSEC)

typedef enum StatsOutcome {
        STATS_CALL_OK,           /* the device answered 2.xx */
        STATS_CALL_NOT_FOUND,    /* 4.04: no such function or variable */
        STATS_CALL_REJECTED,     /* another 4.xx */
        STATS_CALL_DEVICE_ERROR, /* 5.xx */
        STATS_CALL_TIMEOUT,      /* no answer within CallTimeoutSec */
        STATS_CALL_DISCONNECTED, /* the session closed or was replaced first */
        STATS_CALL_OFFLINE,      /* not sent: the device is offline */
        STATS_CALL_BACKLOGGED,   /* not sent: the device is not reading */
        STATS_CALL_TOO_LARGE,    /* not sent: too large for the device */
        STATS_CALL_FAILED,       /* not sent: another error */
        _STATS_CALL_MAX,
} StatsOutcome;

static const char *const outcome_names[_STATS_CALL_MAX] = {
        [STATS_CALL_OK] = "ok",
        [STATS_CALL_NOT_FOUND] = "not_found",
        [STATS_CALL_REJECTED] = "rejected",
        [STATS_CALL_DEVICE_ERROR] = "device_error",
        [STATS_CALL_TIMEOUT] = "timeout",
        [STATS_CALL_DISCONNECTED] = "disconnected",
        [STATS_CALL_OFFLINE] = "offline",
        [STATS_CALL_BACKLOGGED] = "backlogged",
        [STATS_CALL_TOO_LARGE] = "too_large",
        [STATS_CALL_FAILED] = "failed",
};

static const char *const refused_names[_STATS_REFUSED_MAX] = {
        [STATS_REFUSED_TLS] = "tls",
        [STATS_REFUSED_TIMEOUT] = "timeout",
        [STATS_REFUSED_EVICTED] = "evicted",
        [STATS_REFUSED_NO_IDENTITY] = "no_identity",
};

static const char *const source_names[_STATS_FROM_MAX] = {
        [STATS_FROM_DEVICE] = "device",
        [STATS_FROM_API] = "api",
        [STATS_FROM_MQTT] = "mqtt",
};

static const char *const sink_names[_STATS_TO_MAX] = {
        [STATS_TO_STREAM] = "stream",
        [STATS_TO_DEVICE] = "device",
};

static const char *const dropped_names[_STATS_DROPPED_MAX] = {
        [STATS_DROPPED_DUPLICATE] = "duplicate",
        [STATS_DROPPED_STORE_FAILED] = "store_failed",
        [STATS_DROPPED_STREAM_BEHIND] = "stream_behind",
        [STATS_DROPPED_DEVICE_BACKLOGGED] = "device_backlogged",
        [STATS_DROPPED_DEVICE_TOO_SMALL] = "device_too_small",
        [STATS_DROPPED_DEVICE_SEND_FAILED] = "device_send_failed",
        [STATS_DROPPED_RESERVED_NAME] = "reserved_name",
        [STATS_DROPPED_RATE_LIMITED] = "rate_limited",
        [STATS_DROPPED_JOURNAL_SHARE] = "journal_share",
        [STATS_DROPPED_INBOX_INVALID] = "inbox_invalid",
        [STATS_DROPPED_STREAM_INVALID] = "stream_invalid",
};

static const char *const api_refused_names[_STATS_API_REFUSED_MAX] = {
        [STATS_API_HEADER_TIMEOUT] = "header_timeout",
        [STATS_API_RATE_ADDRESS] = "rate_address",
        [STATS_API_RATE_TOKEN] = "rate_token",
        [STATS_API_RATE_AUTH] = "rate_auth_failures",
        [STATS_API_BAD_PATH] = "bad_path",
        [STATS_API_STREAMS_TOKEN] = "streams_token",
};

static const char *const integration_names[_STATS_INTEGRATION_MAX] = {
        [STATS_INTEGRATION_DELIVERED] = "delivered",
        [STATS_INTEGRATION_FAILED] = "failed",
        [STATS_INTEGRATION_LOST] = "lost",
};

/* Upper bounds in microseconds: 0.25 ms .. 10 s. */
static const uint64_t latency_buckets[] = { 250,    500,    1000,   2500,    5000,    10000,   25000,   50000,
                                            100000, 250000, 500000, 1000000, 2500000, 5000000, 10000000 };
/* Loop delay and fsync: 0.1 ms .. 10 s. */
static const uint64_t delay_buckets[] = { 100,    250,    500,    1000,    2500,    5000,    10000,   25000,
                                          50000,  100000, 250000, 500000,  1000000, 2500000, 10000000 };

static struct {
        Metrics *registry;
        MetricSeries *devices_connected;
        MetricSeries *enrollment_sessions, *certificates_issued[2]; /* [renew] */
        MetricSeries *handshakes_started, *handshakes_completed, *handshakes_resumed,
                *handshakes_refused[_STATS_REFUSED_MAX];
        MetricSeries *session_walks[2]; /* done, skipped */
        MetricSeries *memory_trims;
        MetricSeries *calls[2][_STATS_CALL_MAX]; /* [function][outcome] */
        MetricSeries *call_latency[2];
        MetricSeries *events_in[_STATS_FROM_MAX], *events_out[_STATS_TO_MAX], *events_dropped[_STATS_DROPPED_MAX];
        MetricSeries *streams_open, *stream_lag;
        MetricSeries *api_refused[_STATS_API_REFUSED_MAX];
        MetricSeries *integration[_STATS_INTEGRATION_MAX], *integrations_failing, *integrations_backlog;
        MetricSeries *loop_delay; /* worker 0; workers add theirs */
        MetricSeries *journal_unsynced_events, *journal_unsynced_bytes, *journal_fsync;
        MetricSeries **shard_sessions; /* [n_shards] */
        unsigned n_shards;
        sd_event_source *probe;
} stats;

/* One family with one series per label value (values NULL: one series
 * without labels). */
static int stats_family(MetricType type, const char *name, const char *help, const char *label,
                        const char *const *values, size_t n, MetricSeries **ret, const uint64_t *buckets,
                        size_t n_buckets) {
        MetricFamily *f;
        int r;

        r = metrics_add_family(stats.registry, type, name, help, buckets, n_buckets, buckets ? 6 : 0, &f);
        if (r < 0)
                return r;
        if (!values)
                return metrics_add_series(f, NULL, &ret[0]);
        for (size_t i = 0; i < n; i++) {
                r = metrics_add_series(f, (const char *const[]){ label, values[i], NULL }, &ret[i]);
                if (r < 0)
                        return r;
        }
        return 0;
}

static int stats_register(void) {
        static const char *const kinds[2] = { "variable", "function" };
        MetricFamily *f;
        int r;

        r = stats_family(METRIC_GAUGE, "tether_cloud_devices_connected", "Devices with an established session.",
                         NULL, NULL, 0, &stats.devices_connected, NULL, 0);
        if (r >= 0)
                r = stats_family(METRIC_GAUGE, "tether_cloud_enrollment_sessions",
                                 "Enrollment sessions (TLS without a client certificate) open.", NULL, NULL, 0,
                                 &stats.enrollment_sessions, NULL, 0);
        if (r >= 0)
                r = stats_family(METRIC_COUNTER, "tether_cloud_certificates_issued_total",
                                 "Device certificates issued, by reason.", "reason",
                                 (const char *const[]){ "enroll", "renew" }, 2, stats.certificates_issued, NULL, 0);
        if (r >= 0)
                r = stats_family(METRIC_COUNTER, "tether_cloud_handshakes_started_total",
                                 "Device connections accepted (TLS handshakes begun).", NULL, NULL, 0,
                                 &stats.handshakes_started, NULL, 0);
        if (r >= 0)
                r = stats_family(METRIC_COUNTER, "tether_cloud_handshakes_completed_total",
                                 "Handshakes that ended with a device bound to its session.", NULL, NULL, 0,
                                 &stats.handshakes_completed, NULL, 0);
        if (r >= 0)
                r = stats_family(METRIC_COUNTER, "tether_cloud_handshakes_resumed_total",
                                 "Completed handshakes that resumed a TLS session (a ticket) instead of a full "
                                 "handshake.", NULL, NULL, 0, &stats.handshakes_resumed, NULL, 0);
        if (r >= 0)
                r = stats_family(METRIC_COUNTER, "tether_cloud_handshakes_refused_total",
                                 "Connections closed before a device was bound, by reason.", "reason",
                                 refused_names, _STATS_REFUSED_MAX, stats.handshakes_refused, NULL, 0);
        if (r >= 0)
                r = stats_family(METRIC_COUNTER, "tether_cloud_session_walks_total",
                                 "Walks over every session of a shard's libcoap context: done (the scan), or "
                                 "skipped (the one libcoap starts after each dispatch).",
                                 "kind", (const char *const[]){ "done", "skipped" }, 2, stats.session_walks, NULL, 0);
        if (r >= 0)
                r = stats_family(METRIC_COUNTER, "tether_cloud_memory_trims_total",
                                 "Times the free memory of the heap went back to the system once connections "
                                 "stopped coming and going.",
                                 NULL, NULL, 0, &stats.memory_trims, NULL, 0);
        if (r < 0)
                return r;

        /* Two labels: one family, series added here. */
        r = metrics_add_family(stats.registry, METRIC_COUNTER, "tether_cloud_calls_total",
                               "Function calls and variable reads from the API to devices, by kind and outcome.",
                               NULL, 0, 0, &f);
        for (size_t k = 0; r >= 0 && k < 2; k++)
                for (size_t o = 0; r >= 0 && o < _STATS_CALL_MAX; o++)
                        r = metrics_add_series(f, (const char *const[]){ "kind", kinds[k], "outcome",
                                                                         outcome_names[o], NULL },
                                               &stats.calls[k][o]);
        if (r >= 0)
                r = stats_family(METRIC_HISTOGRAM, "tether_cloud_call_duration_seconds",
                                 "From sending a call or read to a device to its end (answer, timeout or "
                                 "disconnection), by kind.",
                                 "kind", kinds, 2, stats.call_latency, latency_buckets,
                                 ELEMENTSOF(latency_buckets));
        if (r >= 0)
                r = stats_family(METRIC_COUNTER, "tether_cloud_events_in_total",
                                 "Events stored and routed, by where they came from.", "source", source_names,
                                 _STATS_FROM_MAX, stats.events_in, NULL, 0);
        if (r >= 0)
                r = stats_family(METRIC_COUNTER, "tether_cloud_events_out_total",
                                 "Event deliveries: one per event per stream or subscribed device.", "sink",
                                 sink_names, _STATS_TO_MAX, stats.events_out, NULL, 0);
        if (r >= 0)
                r = stats_family(METRIC_COUNTER, "tether_cloud_events_dropped_total",
                                 "Events or deliveries not made, by reason.", "reason", dropped_names,
                                 _STATS_DROPPED_MAX, stats.events_dropped, NULL, 0);
        if (r >= 0)
                r = stats_family(METRIC_GAUGE, "tether_cloud_streams_open", "Event streams (SSE) open.", NULL,
                                 NULL, 0, &stats.streams_open, NULL, 0);
        if (r >= 0)
                r = stats_family(METRIC_COUNTER, "tether_cloud_api_refused_total",
                                 "API connections closed or requests refused by the API's limits, by reason.",
                                 "reason", api_refused_names, _STATS_API_REFUSED_MAX, stats.api_refused, NULL, 0);
        if (r >= 0)
                r = stats_family(METRIC_GAUGE, "tether_cloud_stream_lag_bytes",
                                 "Bytes queued for the event stream furthest behind, at the scrape.", NULL, NULL,
                                 0, &stats.stream_lag, NULL, 0);
        if (r >= 0)
                r = stats_family(METRIC_HISTOGRAM, "tether_cloud_loop_delay_seconds",
                                 "How late a periodic timer runs on an event loop, by worker.", "worker",
                                 (const char *const[]){ "0" }, 1, &stats.loop_delay, delay_buckets,
                                 ELEMENTSOF(delay_buckets));
        if (r >= 0)
                r = stats_family(METRIC_GAUGE, "tether_cloud_journal_unsynced_events",
                                 "Events written to the journal and not yet synced to disk.", NULL, NULL, 0,
                                 &stats.journal_unsynced_events, NULL, 0);
        if (r >= 0)
                r = stats_family(METRIC_GAUGE, "tether_cloud_journal_unsynced_bytes",
                                 "Bytes written to the journal and not yet synced to disk.", NULL, NULL, 0,
                                 &stats.journal_unsynced_bytes, NULL, 0);
        if (r >= 0)
                r = stats_family(METRIC_HISTOGRAM, "tether_cloud_journal_fsync_duration_seconds",
                                 "Time to sync the event journal to disk.", NULL, NULL, 0, &stats.journal_fsync,
                                 delay_buckets, ELEMENTSOF(delay_buckets));
        if (r >= 0)
                r = stats_family(METRIC_COUNTER, "tether_cloud_integration_events_total",
                                 "Events of the outbound integrations (webhooks, MQTT bridges), by outcome: "
                                 "delivered, failed (retried), lost (dropped by the journal first).",
                                 "outcome", integration_names, _STATS_INTEGRATION_MAX, stats.integration, NULL, 0);
        if (r >= 0)
                r = stats_family(METRIC_GAUGE, "tether_cloud_integrations_failing",
                                 "Outbound integrations failing now (5 or more failed attempts in a row).", NULL,
                                 NULL, 0, &stats.integrations_failing, NULL, 0);
        if (r >= 0)
                r = stats_family(METRIC_GAUGE, "tether_cloud_integration_backlog_events",
                                 "Events in the journal after the cursor of the integration furthest behind "
                                 "(an upper bound: it counts events its filter does not select).",
                                 NULL, NULL, 0, &stats.integrations_backlog, NULL, 0);
        return r;
}

int stats_init(void) {
        int r;

        if (stats.registry)
                return 0;
        r = metrics_new(&stats.registry);
        if (r < 0)
                return r;
        r = stats_register();
        if (r < 0)
                stats_done();
        return r;
}

void stats_done(void) {
        stats.probe = sd_event_source_disable_unref(stats.probe);
        free(stats.shard_sessions);
        metrics_free(stats.registry);
        stats = (typeof(stats)){};
}

static int stats_probe_cb(sd_event_source *s, uint64_t usec, void *userdata) {
        uint64_t now = now_usec();

        /* usec is when it was due: the loop was busy for the difference. */
        metrics_observe(stats.loop_delay, now > usec ? now - usec : 0);
        (void)sd_event_source_set_time(s, now + STATS_LOOP_PROBE_USEC);
        return 0;
}

int stats_loop_probe_start(sd_event *event, unsigned worker) {
        int r;

        if (!stats.registry || worker != 0 || stats.probe)
                return -EINVAL;
        /* Accuracy 1 µs: sd-event must not move it to coalesce wakeups. */
        r = sd_event_add_time_relative(event, &stats.probe, CLOCK_MONOTONIC, STATS_LOOP_PROBE_USEC, 1,
                                       stats_probe_cb, NULL);
        if (r >= 0)
                r = sd_event_source_set_enabled(stats.probe, SD_EVENT_ON);
        if (r < 0)
                stats.probe = sd_event_source_disable_unref(stats.probe);
        return r;
}

int stats_shards(unsigned n) {
        MetricFamily *f;
        MetricSeries **series;
        int r;

        if (!stats.registry || stats.shard_sessions)
                return 0;
        series = calloc(n, sizeof(*series));
        if (!series)
                return -ENOMEM;
        r = metrics_add_family(stats.registry, METRIC_GAUGE, "tether_cloud_shard_sessions",
                               "Device sessions (accepted connections) in each libcoap context, by shard.", NULL,
                               0, 0, &f);
        for (unsigned i = 0; r >= 0 && i < n; i++) {
                char value[12];

                snprintf(value, sizeof(value), "%u", i);
                r = metrics_add_series(f, (const char *const[]){ "shard", value, NULL }, &series[i]);
        }
        if (r < 0) {
                /* Series already added stay in the registry, at 0. */
                free(series);
                return r;
        }
        stats.shard_sessions = series;
        stats.n_shards = n;
        return 0;
}

void stats_shard_sessions(unsigned shard, int delta) {
        if (shard < stats.n_shards)
                metrics_add(stats.shard_sessions[shard], delta);
}

void stats_integration(StatsIntegration outcome, uint64_t n) {
        if (outcome < _STATS_INTEGRATION_MAX)
                metrics_add(stats.integration[outcome], (int64_t)n);
}
void stats_integrations_failing(int delta) { metrics_add(stats.integrations_failing, delta); }
void stats_integrations_backlog(uint64_t events) { metrics_set(stats.integrations_backlog, (int64_t)events); }

void stats_device_connected(int delta) { metrics_add(stats.devices_connected, delta); }
void stats_enrollment_sessions(int delta) { metrics_add(stats.enrollment_sessions, delta); }
void stats_certificate_issued(bool renew) { metrics_inc(stats.certificates_issued[renew ? 1 : 0]); }
void stats_handshake_started(void) { metrics_inc(stats.handshakes_started); }
void stats_session_walk(bool skipped) { metrics_inc(stats.session_walks[skipped ? 1 : 0]); }
void stats_memory_trim(void) { metrics_inc(stats.memory_trims); }
void stats_handshake_completed(void) { metrics_inc(stats.handshakes_completed); }
void stats_handshake_resumed(void) { metrics_inc(stats.handshakes_resumed); }

void stats_handshake_refused(StatsRefused reason) {
        if (reason < _STATS_REFUSED_MAX)
                metrics_inc(stats.handshakes_refused[reason]);
}

static StatsOutcome stats_outcome(int error, unsigned code, bool sent) {
        unsigned cls = code >> 5;

        if (!sent)
                return error == -ENOTCONN ? STATS_CALL_OFFLINE
                       : error == -ENOBUFS ? STATS_CALL_BACKLOGGED
                       : error == -E2BIG   ? STATS_CALL_TOO_LARGE
                                           : STATS_CALL_FAILED;
        if (error == -ETIMEDOUT)
                return STATS_CALL_TIMEOUT;
        if (error < 0)
                return STATS_CALL_DISCONNECTED;
        if (cls == 2)
                return STATS_CALL_OK;
        if (code == COAP_RESPONSE_CODE(404))
                return STATS_CALL_NOT_FOUND;
        return cls == 4 ? STATS_CALL_REJECTED : STATS_CALL_DEVICE_ERROR;
}

void stats_call_done(bool function, int error, unsigned code, uint64_t started_usec) {
        uint64_t now;

        if (!stats.registry)
                return;
        metrics_inc(stats.calls[function][stats_outcome(error, code, started_usec != 0)]);
        if (started_usec == 0)
                return;
        now = now_usec();
        metrics_observe(stats.call_latency[function], now > started_usec ? now - started_usec : 0);
}

void stats_event_in(StatsSource source) {
        if (source < _STATS_FROM_MAX)
                metrics_inc(stats.events_in[source]);
}

void stats_event_out(StatsSink sink) {
        if (sink < _STATS_TO_MAX)
                metrics_inc(stats.events_out[sink]);
}

void stats_event_dropped(StatsDropped reason) {
        if (reason < _STATS_DROPPED_MAX)
                metrics_inc(stats.events_dropped[reason]);
}

void stats_journal_share_dropped(uint64_t n) {
        if (n > 0)
                metrics_add(stats.events_dropped[STATS_DROPPED_JOURNAL_SHARE], (int64_t)n);
}

void stats_event_undeliverable(int error) {
        stats_event_dropped(error == -ENOBUFS ? STATS_DROPPED_DEVICE_BACKLOGGED
                            : error == -E2BIG ? STATS_DROPPED_DEVICE_TOO_SMALL
                                              : STATS_DROPPED_DEVICE_SEND_FAILED);
}

void stats_stream_opened(int delta) { metrics_add(stats.streams_open, delta); }

void stats_api_refused(StatsApiRefused reason) {
        if (reason < _STATS_API_REFUSED_MAX)
                metrics_inc(stats.api_refused[reason]);
}

void stats_journal_appended(size_t bytes) {
        metrics_inc(stats.journal_unsynced_events);
        metrics_add(stats.journal_unsynced_bytes, (int64_t)bytes);
}

void stats_journal_synced(uint64_t started_usec, uint64_t events, uint64_t bytes) {
        uint64_t now;

        metrics_add(stats.journal_unsynced_events, -(int64_t)events);
        metrics_add(stats.journal_unsynced_bytes, -(int64_t)bytes);
        if (started_usec == 0 || !stats.registry)
                return;
        now = now_usec();
        metrics_observe(stats.journal_fsync, now > started_usec ? now - started_usec : 0);
}

int stats_render(uint64_t max_lag_bytes, char **ret, size_t *ret_len) {
        if (!stats.registry)
                return -ENODEV;
        metrics_set(stats.stream_lag, (int64_t)max_lag_bytes);
        return metrics_render(stats.registry, ret, ret_len);
}
