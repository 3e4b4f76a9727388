/* SPDX-License-Identifier: Apache-2.0 */
/* The metrics registry (metrics.h). Values are C11 atomics updated with
 * relaxed ordering: each one is exact, the set is not a snapshot. */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "metrics.h"
#include "util.h"

struct MetricSeries {
        MetricFamily *family;
        char *label_names[METRICS_LABELS_MAX];
        char *label_values[METRICS_LABELS_MAX];
        size_t n_labels;
        _Atomic int64_t value;                                 /* counter, gauge */
        _Atomic uint64_t sum;                                  /* histogram */
        _Atomic uint64_t counts[METRICS_BUCKETS_MAX + 1];      /* per bucket, not cumulative; last: +Inf */
        MetricSeries *next;
};

struct MetricFamily {
        MetricType type;
        char *name;
        char *help;
        uint64_t buckets[METRICS_BUCKETS_MAX];
        size_t n_buckets;
        unsigned unit_digits;
        MetricSeries *series, *series_tail;
        MetricFamily *next;
};

struct Metrics {
        MetricFamily *families, *families_tail;
};

int metrics_new(Metrics **ret) {
        Metrics *m = calloc(1, sizeof(*m));

        if (!m)
                return -ENOMEM;
        *ret = m;
        return 0;
}

static void series_free(MetricSeries *s) {
        for (size_t i = 0; i < s->n_labels; i++) {
                free(s->label_names[i]);
                free(s->label_values[i]);
        }
        free(s);
}

Metrics *metrics_free(Metrics *m) {
        if (!m)
                return NULL;
        for (MetricFamily *f = m->families, *fn; f; f = fn) {
                fn = f->next;
                for (MetricSeries *s = f->series, *sn; s; s = sn) {
                        sn = s->next;
                        series_free(s);
                }
                free(f->name);
                free(f->help);
                free(f);
        }
        free(m);
        return NULL;
}

static bool name_valid(const char *s, bool colons) {
        if (!s || !*s)
                return false;
        for (const char *p = s; *p; p++) {
                bool alpha = (*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || *p == '_' ||
                             (colons && *p == ':');

                if (!alpha && !(p > s && *p >= '0' && *p <= '9'))
                        return false;
        }
        return true;
}

int metrics_add_family(Metrics *m, MetricType type, const char *name, const char *help, const uint64_t *buckets,
                       size_t n_buckets, unsigned unit_digits, MetricFamily **ret) {
        MetricFamily *f;

        if (!name_valid(name, true) || !help || type > METRIC_HISTOGRAM || unit_digits > 18)
                return -EINVAL;
        if (type == METRIC_HISTOGRAM) {
                if (n_buckets == 0 || n_buckets > METRICS_BUCKETS_MAX || !buckets)
                        return -EINVAL;
                for (size_t i = 1; i < n_buckets; i++)
                        if (buckets[i] <= buckets[i - 1])
                                return -EINVAL;
        } else if (n_buckets != 0 || unit_digits != 0)
                return -EINVAL;
        for (f = m->families; f; f = f->next)
                if (streq(f->name, name))
                        return -EEXIST;
        f = calloc(1, sizeof(*f));
        if (!f)
                return -ENOMEM;
        f->type = type;
        f->name = strdup(name);
        f->help = strdup(help);
        if (!f->name || !f->help) {
                free(f->name);
                free(f->help);
                free(f);
                return -ENOMEM;
        }
        if (n_buckets > 0)
                memcpy(f->buckets, buckets, n_buckets * sizeof(*buckets));
        f->n_buckets = n_buckets;
        f->unit_digits = unit_digits;
        if (m->families_tail)
                m->families_tail->next = f;
        else
                m->families = f;
        m->families_tail = f;
        if (ret)
                *ret = f;
        return 0;
}

int metrics_add_series(MetricFamily *f, const char *const *labels, MetricSeries **ret) {
        MetricSeries *s;
        size_t n = 0;

        for (; labels && labels[2 * n]; n++) {
                const char *k = labels[2 * n];

                if (n >= METRICS_LABELS_MAX || !labels[2 * n + 1] || !name_valid(k, false) ||
                    startswith(k, "__") || (f->type == METRIC_HISTOGRAM && streq(k, "le")))
                        return -EINVAL;
                for (size_t j = 0; j < n; j++)
                        if (streq(labels[2 * j], k))
                                return -EINVAL;
        }
        s = calloc(1, sizeof(*s));
        if (!s)
                return -ENOMEM;
        s->family = f;
        for (size_t i = 0; i < n; i++) {
                s->label_names[i] = strdup(labels[2 * i]);
                s->label_values[i] = strdup(labels[2 * i + 1]);
                s->n_labels = i + 1;
                if (!s->label_names[i] || !s->label_values[i]) {
                        series_free(s);
                        return -ENOMEM;
                }
        }
        if (f->series_tail)
                f->series_tail->next = s;
        else
                f->series = s;
        f->series_tail = s;
        if (ret)
                *ret = s;
        return 0;
}

void metrics_inc(MetricSeries *s) { metrics_add(s, 1); }

void metrics_add(MetricSeries *s, int64_t n) {
        if (s)
                atomic_fetch_add_explicit(&s->value, n, memory_order_relaxed);
}

void metrics_set(MetricSeries *s, int64_t v) {
        if (s)
                atomic_store_explicit(&s->value, v, memory_order_relaxed);
}

void metrics_observe(MetricSeries *s, uint64_t value) {
        const MetricFamily *f;
        size_t i = 0;

        if (!s)
                return;
        f = s->family;
        /* Few buckets: a linear scan is as fast as a search. */
        while (i < f->n_buckets && value > f->buckets[i])
                i++;
        atomic_fetch_add_explicit(&s->counts[i], 1, memory_order_relaxed);
        atomic_fetch_add_explicit(&s->sum, value, memory_order_relaxed);
}

int64_t metrics_get(const MetricSeries *s) {
        int64_t n = 0;

        if (!s)
                return 0;
        if (s->family->type != METRIC_HISTOGRAM)
                return atomic_load_explicit(&s->value, memory_order_relaxed);
        for (size_t i = 0; i <= s->family->n_buckets; i++)
                n += (int64_t)atomic_load_explicit(&s->counts[i], memory_order_relaxed);
        return n;
}

/* ---- rendering -------------------------------------------------------- */

/* v / 10^digits, exactly, without trailing zeros: 250 with 6 digits is
 * "0.00025", 10000000 is "10". */
static void render_fixed(FILE *f, uint64_t v, unsigned digits) {
        uint64_t scale = 1;
        char frac[24];
        size_t n;

        for (unsigned i = 0; i < digits; i++)
                scale *= 10;
        fprintf(f, "%" PRIu64, v / scale);
        if (digits == 0 || v % scale == 0)
                return;
        snprintf(frac, sizeof(frac), "%0*" PRIu64, (int)digits, v % scale);
        n = strlen(frac);
        while (n > 0 && frac[n - 1] == '0')
                frac[--n] = 0;
        fprintf(f, ".%s", frac);
}

/* HELP text escapes backslash and newline; label values also '"'. */
static void render_escaped(FILE *f, const char *s, bool quote) {
        for (; *s; s++)
                if (*s == '\\')
                        fputs("\\\\", f);
                else if (*s == '\n')
                        fputs("\\n", f);
                else if (quote && *s == '"')
                        fputs("\\\"", f);
                else
                        fputc(*s, f);
}

/* {a="x",b="y"} plus le="..." for a bucket (le NULL: none). */
static void render_labels(FILE *f, const MetricSeries *s, const uint64_t *le, bool le_inf) {
        bool any = s->n_labels > 0 || le || le_inf;

        if (!any)
                return;
        fputc('{', f);
        for (size_t i = 0; i < s->n_labels; i++) {
                fprintf(f, "%s%s=\"", i > 0 ? "," : "", s->label_names[i]);
                render_escaped(f, s->label_values[i], true);
                fputc('"', f);
        }
        if (le || le_inf) {
                fprintf(f, "%sle=\"", s->n_labels > 0 ? "," : "");
                if (le)
                        render_fixed(f, *le, s->family->unit_digits);
                else
                        fputs("+Inf", f);
                fputc('"', f);
        }
        fputc('}', f);
}

static void render_histogram(FILE *f, const MetricFamily *fam, const MetricSeries *s) {
        uint64_t cumulative = 0, sum = atomic_load_explicit(&s->sum, memory_order_relaxed);

        for (size_t i = 0; i <= fam->n_buckets; i++) {
                cumulative += atomic_load_explicit(&s->counts[i], memory_order_relaxed);
                fprintf(f, "%s_bucket", fam->name);
                render_labels(f, s, i < fam->n_buckets ? &fam->buckets[i] : NULL, i == fam->n_buckets);
                fprintf(f, " %" PRIu64 "\n", cumulative);
        }
        fprintf(f, "%s_sum", fam->name);
        render_labels(f, s, NULL, false);
        fputc(' ', f);
        render_fixed(f, sum, fam->unit_digits);
        fprintf(f, "\n%s_count", fam->name);
        render_labels(f, s, NULL, false);
        fprintf(f, " %" PRIu64 "\n", cumulative);
}

int metrics_render(const Metrics *m, char **ret, size_t *ret_len) {
        static const char *const types[] = {
                [METRIC_COUNTER] = "counter",
                [METRIC_GAUGE] = "gauge",
                [METRIC_HISTOGRAM] = "histogram",
        };
        char *buf = NULL;
        size_t len = 0;
        FILE *f;

        f = open_memstream(&buf, &len);
        if (!f)
                return -ENOMEM;
        for (const MetricFamily *fam = m->families; fam; fam = fam->next) {
                fprintf(f, "# HELP %s ", fam->name);
                render_escaped(f, fam->help, false);
                fprintf(f, "\n# TYPE %s %s\n", fam->name, types[fam->type]);
                for (const MetricSeries *s = fam->series; s; s = s->next) {
                        if (fam->type == METRIC_HISTOGRAM) {
                                render_histogram(f, fam, s);
                                continue;
                        }
                        fputs(fam->name, f);
                        render_labels(f, s, NULL, false);
                        fprintf(f, " %" PRId64 "\n", atomic_load_explicit(&s->value, memory_order_relaxed));
                }
        }
        if (ferror(f)) {
                fclose(f);
                free(buf);
                return -ENOMEM;
        }
        if (fclose(f) != 0) {
                free(buf);
                return -ENOMEM;
        }
        *ret = buf;
        *ret_len = len;
        return 0;
}
