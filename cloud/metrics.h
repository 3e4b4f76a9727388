/* SPDX-License-Identifier: Apache-2.0 */
/* A small registry of counters, gauges and histograms, rendered in the
 * Prometheus text exposition format 0.0.4.
 *
 * Guarantees: families and series are added once, from one thread, before
 * anything else uses them; after that, updates (metrics_inc() and the
 * others) and metrics_render() may run from any number of threads at once
 * (C11 atomics, relaxed: a scrape sees each value as some update left it,
 * not one consistent snapshot of all of them; a histogram's _count is the
 * sum of its buckets as read, so +Inf always equals _count). Every update
 * function takes NULL and then does nothing, so code can count before (or
 * without) a registry. Library-like: no logging. */
#pragma once

#include <stddef.h>
#include <stdint.h>

typedef enum MetricType {
        METRIC_COUNTER,
        METRIC_GAUGE,
        METRIC_HISTOGRAM,
} MetricType;

#define METRICS_LABELS_MAX 4
#define METRICS_BUCKETS_MAX 32

typedef struct Metrics Metrics;
typedef struct MetricFamily MetricFamily;
typedef struct MetricSeries MetricSeries;

/* A new, empty registry; *ret is the caller's (metrics_free()). -ENOMEM. */
int metrics_new(Metrics **ret);
/* Frees the registry with every family and series; NULL is fine. */
Metrics *metrics_free(Metrics *m);
static inline void metrics_freep(Metrics **m) { metrics_free(*m); }

/* Add a family. name must be a valid metric name ([a-zA-Z_:][a-zA-Z0-9_:]*)
 * and new in m; help is any text (escaped when rendered). Histograms give
 * their upper bounds in integer units (e.g. microseconds), strictly
 * increasing, at most METRICS_BUCKETS_MAX (+Inf is implicit), and
 * unit_digits, the power of ten those units are below the unit rendered
 * (6: microseconds rendered as seconds); observations and _sum are in the
 * same units, rendered exactly (no floating point). Other types pass
 * NULL, 0, 0. name, help and buckets are copied. The family belongs to m.
 * -EINVAL for a bad name or buckets, -EEXIST for a name taken, -ENOMEM. */
int metrics_add_family(Metrics *m, MetricType type, const char *name, const char *help, const uint64_t *buckets,
                       size_t n_buckets, unsigned unit_digits, MetricFamily **ret);

/* Add a series to family f with labels: NULL or a NULL-terminated list of
 * name, value pairs (at most METRICS_LABELS_MAX pairs). Label names must
 * be valid ([a-zA-Z_][a-zA-Z0-9_]*, not starting with "__", not "le" in a
 * histogram) and distinct; values are any text (escaped when rendered).
 * Everything is copied; the series belongs to f. Series are rendered in
 * the order added. -EINVAL, -ENOMEM. */
int metrics_add_series(MetricFamily *f, const char *const *labels, MetricSeries **ret);

/* Counters and gauges: add 1, add n (a counter must not go down: gauges
 * only for negative n), or set (gauges only). */
void metrics_inc(MetricSeries *s);
void metrics_add(MetricSeries *s, int64_t n);
void metrics_set(MetricSeries *s, int64_t v);
/* Histograms: count one observation of value (in the family's units). */
void metrics_observe(MetricSeries *s, uint64_t value);
/* The current value of a counter or gauge, or a histogram's count. */
int64_t metrics_get(const MetricSeries *s);

/* The whole registry in the text format: *ret (NUL-terminated, the
 * caller's to free) and *ret_len. -ENOMEM. */
int metrics_render(const Metrics *m, char **ret, size_t *ret_len);
