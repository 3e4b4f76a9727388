/* SPDX-License-Identifier: Apache-2.0 */
/* Unit tests for the metrics registry (cloud/metrics.c): the exact text
 * format (HELP, TYPE, cumulative buckets, _sum and _count, escaping),
 * the names refused, and updates from several threads at once. */
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "cloud/metrics.h"
#include "util.h"

static char *render(const Metrics *m) {
        char *text = NULL;
        size_t len = 0;

        assert_int_equal(metrics_render(m, &text, &len), 0);
        assert_int_equal(strlen(text), len);
        return text;
}

static void test_counter_gauge(void **state) {
        _cleanup_(metrics_freep) Metrics *m = NULL;
        _cleanup_free_ char *text = NULL;
        MetricFamily *f;
        MetricSeries *a, *b, *g;

        assert_int_equal(metrics_new(&m), 0);
        assert_int_equal(metrics_add_family(m, METRIC_COUNTER, "x_calls_total", "Calls, by outcome.", NULL, 0, 0, &f),
                         0);
        assert_int_equal(metrics_add_series(f, (const char *const[]){ "outcome", "ok", NULL }, &a), 0);
        assert_int_equal(metrics_add_series(f, (const char *const[]){ "outcome", "timeout", "kind", "fn", NULL }, &b),
                         0);
        assert_int_equal(metrics_add_family(m, METRIC_GAUGE, "x_open", "Open.", NULL, 0, 0, &f), 0);
        assert_int_equal(metrics_add_series(f, NULL, &g), 0);
        metrics_inc(a);
        metrics_inc(a);
        metrics_add(b, 5);
        metrics_add(g, 3);
        metrics_add(g, -4);
        metrics_inc(NULL); /* no registry yet: nothing happens */
        text = render(m);
        assert_string_equal(text, "# HELP x_calls_total Calls, by outcome.\n"
                                  "# TYPE x_calls_total counter\n"
                                  "x_calls_total{outcome=\"ok\"} 2\n"
                                  "x_calls_total{outcome=\"timeout\",kind=\"fn\"} 5\n"
                                  "# HELP x_open Open.\n"
                                  "# TYPE x_open gauge\n"
                                  "x_open -1\n");
        assert_int_equal(metrics_get(a), 2);
        metrics_set(g, 7);
        assert_int_equal(metrics_get(g), 7);
}

static void test_histogram(void **state) {
        static const uint64_t buckets[] = { 250, 1000, 10000000 };
        _cleanup_(metrics_freep) Metrics *m = NULL;
        _cleanup_free_ char *text = NULL;
        MetricFamily *f;
        MetricSeries *s, *empty;

        assert_int_equal(metrics_new(&m), 0);
        assert_int_equal(metrics_add_family(m, METRIC_HISTOGRAM, "x_duration_seconds", "Latency.", buckets,
                                            ELEMENTSOF(buckets), 6, &f),
                         0);
        assert_int_equal(metrics_add_series(f, (const char *const[]){ "kind", "function", NULL }, &s), 0);
        assert_int_equal(metrics_add_series(f, NULL, &empty), 0);
        metrics_observe(s, 100);      /* <= 0.00025 */
        metrics_observe(s, 250);      /* the bound itself is in its bucket */
        metrics_observe(s, 251);      /* <= 0.001 */
        metrics_observe(s, 20000001); /* +Inf only */
        text = render(m);
        assert_string_equal(text, "# HELP x_duration_seconds Latency.\n"
                                  "# TYPE x_duration_seconds histogram\n"
                                  "x_duration_seconds_bucket{kind=\"function\",le=\"0.00025\"} 2\n"
                                  "x_duration_seconds_bucket{kind=\"function\",le=\"0.001\"} 3\n"
                                  "x_duration_seconds_bucket{kind=\"function\",le=\"10\"} 3\n"
                                  "x_duration_seconds_bucket{kind=\"function\",le=\"+Inf\"} 4\n"
                                  "x_duration_seconds_sum{kind=\"function\"} 20.000602\n"
                                  "x_duration_seconds_count{kind=\"function\"} 4\n"
                                  "x_duration_seconds_bucket{le=\"0.00025\"} 0\n"
                                  "x_duration_seconds_bucket{le=\"0.001\"} 0\n"
                                  "x_duration_seconds_bucket{le=\"10\"} 0\n"
                                  "x_duration_seconds_bucket{le=\"+Inf\"} 0\n"
                                  "x_duration_seconds_sum 0\n"
                                  "x_duration_seconds_count 0\n");
        assert_int_equal(metrics_get(s), 4);
}

static void test_escaping(void **state) {
        _cleanup_(metrics_freep) Metrics *m = NULL;
        _cleanup_free_ char *text = NULL;
        MetricFamily *f;

        assert_int_equal(metrics_new(&m), 0);
        assert_int_equal(metrics_add_family(m, METRIC_COUNTER, "x:y_total", "A \\ and a\nnewline, \"quoted\".",
                                            NULL, 0, 0, &f),
                         0);
        assert_int_equal(metrics_add_series(f, (const char *const[]){ "v", "a\"b\\c\nd", NULL }, NULL), 0);
        text = render(m);
        assert_string_equal(text, "# HELP x:y_total A \\\\ and a\\nnewline, \"quoted\".\n"
                                  "# TYPE x:y_total counter\n"
                                  "x:y_total{v=\"a\\\"b\\\\c\\nd\"} 0\n");
}

static void test_refused(void **state) {
        static const uint64_t down[] = { 10, 10 };
        _cleanup_(metrics_freep) Metrics *m = NULL;
        MetricFamily *f, *h;

        assert_int_equal(metrics_new(&m), 0);
        assert_int_equal(metrics_add_family(m, METRIC_COUNTER, "1x", "", NULL, 0, 0, NULL), -EINVAL);
        assert_int_equal(metrics_add_family(m, METRIC_COUNTER, "x-y", "", NULL, 0, 0, NULL), -EINVAL);
        assert_int_equal(metrics_add_family(m, METRIC_COUNTER, "", "", NULL, 0, 0, NULL), -EINVAL);
        assert_int_equal(metrics_add_family(m, METRIC_COUNTER, "x", NULL, NULL, 0, 0, NULL), -EINVAL);
        assert_int_equal(metrics_add_family(m, METRIC_HISTOGRAM, "h", "", NULL, 0, 6, NULL), -EINVAL);
        assert_int_equal(metrics_add_family(m, METRIC_HISTOGRAM, "h", "", down, 2, 6, NULL), -EINVAL);
        assert_int_equal(metrics_add_family(m, METRIC_COUNTER, "c", "", down, 2, 0, NULL), -EINVAL);
        assert_int_equal(metrics_add_family(m, METRIC_COUNTER, "x", "", NULL, 0, 0, &f), 0);
        assert_int_equal(metrics_add_family(m, METRIC_GAUGE, "x", "", NULL, 0, 0, NULL), -EEXIST);
        assert_int_equal(metrics_add_family(m, METRIC_HISTOGRAM, "h", "", down, 1, 0, &h), 0);
        assert_int_equal(metrics_add_series(f, (const char *const[]){ "a:b", "v", NULL }, NULL), -EINVAL);
        assert_int_equal(metrics_add_series(f, (const char *const[]){ "__a", "v", NULL }, NULL), -EINVAL);
        assert_int_equal(metrics_add_series(f, (const char *const[]){ "a", "v", "a", "w", NULL }, NULL), -EINVAL);
        assert_int_equal(metrics_add_series(f, (const char *const[]){ "a", NULL }, NULL), -EINVAL);
        assert_int_equal(metrics_add_series(f, (const char *const[]){ "a", "1", "b", "2", "c", "3", "d", "4", "e",
                                                                      "5", NULL },
                                            NULL),
                         -EINVAL);
        assert_int_equal(metrics_add_series(h, (const char *const[]){ "le", "1", NULL }, NULL), -EINVAL);
        assert_int_equal(metrics_add_series(f, (const char *const[]){ "le", "1", NULL }, NULL), 0);
}

#define THREADS 4
#define ROUNDS 100000

typedef struct Shared {
        MetricSeries *counter, *histogram;
} Shared;

static void *hammer(void *p) {
        Shared *sh = p;

        for (unsigned i = 0; i < ROUNDS; i++) {
                metrics_inc(sh->counter);
                metrics_observe(sh->histogram, i % 2 ? 1 : 100);
        }
        return NULL;
}

static void test_threads(void **state) {
        static const uint64_t buckets[] = { 10 };
        _cleanup_(metrics_freep) Metrics *m = NULL;
        _cleanup_free_ char *text = NULL;
        pthread_t t[THREADS];
        MetricFamily *f;
        Shared sh;
        char want[512];

        assert_int_equal(metrics_new(&m), 0);
        assert_int_equal(metrics_add_family(m, METRIC_COUNTER, "n_total", "N.", NULL, 0, 0, &f), 0);
        assert_int_equal(metrics_add_series(f, NULL, &sh.counter), 0);
        assert_int_equal(metrics_add_family(m, METRIC_HISTOGRAM, "v", "V.", buckets, 1, 0, &f), 0);
        assert_int_equal(metrics_add_series(f, NULL, &sh.histogram), 0);
        for (int i = 0; i < THREADS; i++)
                assert_int_equal(pthread_create(&t[i], NULL, hammer, &sh), 0);
        for (int i = 0; i < THREADS; i++)
                assert_int_equal(pthread_join(t[i], NULL), 0);
        text = render(m);
        snprintf(want, sizeof(want),
                 "# HELP n_total N.\n# TYPE n_total counter\nn_total %d\n"
                 "# HELP v V.\n# TYPE v histogram\nv_bucket{le=\"10\"} %d\nv_bucket{le=\"+Inf\"} %d\n"
                 "v_sum %d\nv_count %d\n",
                 THREADS * ROUNDS, THREADS * ROUNDS / 2, THREADS * ROUNDS, THREADS * ROUNDS / 2 * 101,
                 THREADS * ROUNDS);
        assert_string_equal(text, want);
}

int main(int argc, char **argv) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_counter_gauge),
                cmocka_unit_test(test_histogram),
                cmocka_unit_test(test_escaping),
                cmocka_unit_test(test_refused),
                cmocka_unit_test(test_threads),
        };
        /* One test, or those a glob matches: test-foo NAME (HACKING.md). */
        if (argc > 1)
                cmocka_set_test_filter(argv[1]);
        return cmocka_run_group_tests(tests, NULL, NULL);
}
