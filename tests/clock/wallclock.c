/* SPDX-License-Identifier: Apache-2.0 */
/* LD_PRELOAD shim for tests: steps the wall clock of one process without
 * touching the machine's. CLOCK_REALTIME (and gettimeofday(), time()) are
 * shifted by the number of seconds in the file named by
 * TETHER_TEST_CLOCK_FILE. The file is read again whenever it was replaced
 * or changed (a stat() per call), so a test steps the clock by replacing
 * the file (rename), and every clock read after that sees the step. CLOCK_MONOTONIC and timers are left
 * alone, as on a machine whose NTP client steps the time.
 *
 * (libfaketime 0.9.10 cannot do this for sd-event programs: it rewrites
 * every absolute timerfd deadline as if it were CLOCK_REALTIME, which
 * stalls sd-event's CLOCK_MONOTONIC timers.) */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <time.h>

static int (*real_clock_gettime)(clockid_t, struct timespec *);
static long long offset_sec;
static struct stat seen; /* the file as last read */

static void refresh(void) {
        const char *path = getenv("TETHER_TEST_CLOCK_FILE");
        struct stat st;
        long long v;
        FILE *f;

        if (!path || stat(path, &st) < 0)
                return;
        if (st.st_ino == seen.st_ino && st.st_dev == seen.st_dev && st.st_size == seen.st_size &&
            st.st_mtim.tv_sec == seen.st_mtim.tv_sec && st.st_mtim.tv_nsec == seen.st_mtim.tv_nsec)
                return;
        f = fopen(path, "re");
        if (!f)
                return;
        if (fscanf(f, "%lld", &v) == 1) {
                offset_sec = v;
                seen = st;
        }
        fclose(f);
}

__attribute__((visibility("default"))) int clock_gettime(clockid_t id, struct timespec *ts) {
        int r;

        if (!real_clock_gettime)
                real_clock_gettime = (int (*)(clockid_t, struct timespec *))dlsym(RTLD_NEXT, "clock_gettime");
        r = real_clock_gettime(id, ts);
        if (r == 0 && (id == CLOCK_REALTIME || id == CLOCK_REALTIME_COARSE || id == CLOCK_TAI)) {
                refresh();
                ts->tv_sec += offset_sec;
        }
        return r;
}

__attribute__((visibility("default"))) int gettimeofday(struct timeval *tv, void *tz) {
        struct timespec ts;

        if (clock_gettime(CLOCK_REALTIME, &ts) < 0)
                return -1;
        tv->tv_sec = ts.tv_sec;
        tv->tv_usec = ts.tv_nsec / 1000;
        return 0;
}

__attribute__((visibility("default"))) time_t time(time_t *t) {
        struct timespec ts;

        if (clock_gettime(CLOCK_REALTIME, &ts) < 0)
                return (time_t)-1;
        if (t)
                *t = ts.tv_sec;
        return ts.tv_sec;
}
