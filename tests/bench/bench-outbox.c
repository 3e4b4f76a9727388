/* SPDX-License-Identifier: Apache-2.0 */
/* bench-outbox: events per second through the agent's outbox
 * (agent/outbox.c), written to disk with fsync batched as tetherd does it,
 * against the same without the disk.
 *
 *   bench-outbox [--dir DIR] [--events N] [--reps R] [--size BYTES]
 *
 * Each run appends N events of BYTES of data and acknowledges them the way
 * the connection does (up to 32 waiting for their receipt, the oldest
 * acknowledged first), calling outbox_sync() when the sync interval has
 * passed, as tetherd's timer would. Modes, interleaved over R repetitions:
 *
 *   memory        the outbox in /dev/shm (tmpfs): no disk at all
 *   disk-nosync   DIR, never synced (fsync off)
 *   disk-100ms    DIR, fdatasync at most every 100 ms (the default)
 *   disk-10ms     DIR, every 10 ms
 *   disk-each     DIR, fdatasync inside every append (SyncIntervalSec=0)
 *
 * Printed per mode: median events/s and the range over repetitions, and
 * the median and 99th percentile of one append's latency. DIR defaults to
 * the current directory, which should be on the disk you care about. */
#include <errno.h>
#include <getopt.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "agent/outbox.h"

#define WINDOW 32

typedef struct Mode {
        const char *name;
        bool memory;
        bool sync_always;
        long sync_ms; /* <0: never */
        double *rates;
        double *p50, *p99;
} Mode;

static uint64_t now_ns(void) {
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b) {
        double x = *(const double *)a, y = *(const double *)b;
        return x < y ? -1 : x > y;
}

static int cmp_u64(const void *a, const void *b) {
        uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
        return x < y ? -1 : x > y;
}

static double median(double *v, int n) {
        qsort(v, (size_t)n, sizeof(double), cmp_double);
        return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

static int run_once(const Mode *m, const char *base, long events, size_t size, double *ret_rate, double *ret_p50,
                    double *ret_p99) {
        OutboxLimits limits = { .max_events = 1000000, .max_bytes = (uint64_t)1 << 32,
                                .sync_always = m->sync_always };
        char dir[4096];
        uint64_t *lat, last_sync, t0, t;
        uint64_t waiting[WINDOW];
        size_t nw = 0;
        char *data;
        Outbox *o = NULL;
        int r;

        snprintf(dir, sizeof(dir), "%s/bench-outbox-XXXXXX", m->memory ? "/dev/shm" : base);
        if (!mkdtemp(dir))
                return -errno;
        data = malloc(size + 1);
        lat = calloc((size_t)events, sizeof(uint64_t));
        if (!data || !lat)
                return -ENOMEM;
        memset(data, 'x', size);
        data[size] = 0;
        r = outbox_open(dir, &limits, &o);
        if (r < 0)
                goto out;
        t0 = last_sync = now_ns();
        for (long i = 0; i < events; i++) {
                uint64_t seq, a = now_ns();

                r = outbox_append(o, "bench/event", data, size, 60, 0, &seq);
                if (r < 0)
                        goto out;
                t = now_ns();
                lat[i] = t - a;
                if (nw == WINDOW) {
                        /* The cloud's receipt for the oldest one. */
                        r = outbox_ack(o, waiting[0]);
                        if (r < 0)
                                goto out;
                        memmove(waiting, waiting + 1, sizeof(waiting[0]) * (WINDOW - 1));
                        nw--;
                }
                waiting[nw++] = seq;
                if (m->sync_ms >= 0 && t - last_sync >= (uint64_t)m->sync_ms * 1000000ULL) {
                        r = outbox_sync(o);
                        if (r < 0)
                                goto out;
                        last_sync = now_ns();
                }
        }
        for (size_t k = 0; k < nw; k++)
                (void)outbox_ack(o, waiting[k]);
        if (m->sync_ms >= 0)
                (void)outbox_sync(o);
        t = now_ns();
        *ret_rate = (double)events / ((double)(t - t0) / 1e9);
        qsort(lat, (size_t)events, sizeof(uint64_t), cmp_u64);
        *ret_p50 = (double)lat[events / 2] / 1000.0;
        *ret_p99 = (double)lat[events * 99 / 100] / 1000.0;
        r = 0;
out:
        outbox_free(o);
        {
                char path[4200];
                static const char *const files[] = { "outbox", "outbox.lock", "outbox.tmp" };
                for (size_t k = 0; k < sizeof(files) / sizeof(files[0]); k++) {
                        snprintf(path, sizeof(path), "%s/%s", dir, files[k]);
                        (void)unlink(path);
                }
                (void)rmdir(dir);
        }
        free(data);
        free(lat);
        return r;
}

int main(int argc, char **argv) {
        static const struct option opts[] = {
                { "dir", required_argument, NULL, 'd' },   { "events", required_argument, NULL, 'n' },
                { "reps", required_argument, NULL, 'r' },  { "size", required_argument, NULL, 's' },
                { "help", no_argument, NULL, 'h' },        {},
        };
        Mode modes[] = {
                { "memory", true, false, 100, NULL, NULL, NULL },
                { "disk-nosync", false, false, -1, NULL, NULL, NULL },
                { "disk-100ms", false, false, 100, NULL, NULL, NULL },
                { "disk-10ms", false, false, 10, NULL, NULL, NULL },
                { "disk-each", false, true, 100, NULL, NULL, NULL },
        };
        const char *dir = ".";
        long events = 100000;
        int reps = 5, c;
        size_t size = 64;

        while ((c = getopt_long(argc, argv, "h", opts, NULL)) >= 0) {
                switch (c) {
                case 'd':
                        dir = optarg;
                        break;
                case 'n':
                        events = atol(optarg);
                        break;
                case 'r':
                        reps = atoi(optarg);
                        break;
                case 's':
                        size = (size_t)atol(optarg);
                        break;
                case 'h':
                        printf("bench-outbox [--dir DIR] [--events N] [--reps R] [--size BYTES]\n");
                        return 0;
                default:
                        return 2;
                }
        }
        if (events < 100 || reps < 1 || size > 65536) {
                fprintf(stderr, "bench-outbox: need --events >= 100, --reps >= 1, --size <= 65536\n");
                return 2;
        }
        for (size_t m = 0; m < sizeof(modes) / sizeof(modes[0]); m++) {
                modes[m].rates = calloc((size_t)reps, sizeof(double));
                modes[m].p50 = calloc((size_t)reps, sizeof(double));
                modes[m].p99 = calloc((size_t)reps, sizeof(double));
                if (!modes[m].rates || !modes[m].p50 || !modes[m].p99)
                        return 1;
        }
        printf("outbox: %ld events of %zu bytes per run, %d interleaved repetitions, disk: %s\n", events, size,
               reps, dir);
        for (int rep = 0; rep < reps; rep++)
                for (size_t m = 0; m < sizeof(modes) / sizeof(modes[0]); m++) {
                        /* A sync per event is slow: fewer of them. */
                        long n = modes[m].sync_always ? (events / 20 > 100 ? events / 20 : 100) : events;
                        int r = run_once(&modes[m], dir, n, size, &modes[m].rates[rep], &modes[m].p50[rep],
                                         &modes[m].p99[rep]);

                        if (r < 0) {
                                fprintf(stderr, "bench-outbox: %s: %s\n", modes[m].name, strerror(-r));
                                return 1;
                        }
                }
        printf("%-12s %14s %22s %14s %14s\n", "mode", "events/s", "range", "append p50", "append p99");
        for (size_t m = 0; m < sizeof(modes) / sizeof(modes[0]); m++) {
                Mode *md = &modes[m];
                double med, p50, p99, lo, hi;

                med = median(md->rates, reps);
                lo = md->rates[0];
                hi = md->rates[reps - 1];
                p50 = median(md->p50, reps);
                p99 = median(md->p99, reps);
                printf("%-12s %14.0f %10.0f..%-11.0f %11.1f us %11.1f us\n", md->name, med, lo, hi, p50, p99);
        }
        return 0;
}
