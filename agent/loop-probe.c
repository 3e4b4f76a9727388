/* SPDX-License-Identifier: Apache-2.0 */
/* The agent's loop delay probe (loop-probe.h). */
#include "config.h"

#include "loop-probe.h"
#include "util.h"

struct LoopProbe {
        sd_event_source *timer;
        uint64_t samples, sum_usec, max_usec, last_usec;
};

static int loop_probe_cb(sd_event_source *s, uint64_t usec, void *userdata) {
        LoopProbe *p = userdata;
        uint64_t now = now_usec(), late = now > usec ? now - usec : 0;

        p->samples++;
        p->sum_usec += late;
        p->last_usec = late;
        if (late > p->max_usec)
                p->max_usec = late;
        (void)sd_event_source_set_time(s, now + LOOP_PROBE_INTERVAL_USEC);
        return 0;
}

int loop_probe_new(sd_event *event, LoopProbe **ret) {
        LoopProbe *p = calloc(1, sizeof(*p));
        int r;

        if (!p)
                return -ENOMEM;
        /* Accuracy 1 µs: sd-event must not move it to coalesce wakeups. */
        r = sd_event_add_time_relative(event, &p->timer, CLOCK_MONOTONIC, LOOP_PROBE_INTERVAL_USEC, 1,
                                       loop_probe_cb, p);
        if (r >= 0)
                r = sd_event_source_set_enabled(p->timer, SD_EVENT_ON);
        if (r < 0) {
                loop_probe_free(p);
                return r;
        }
        *ret = p;
        return 0;
}

LoopProbe *loop_probe_free(LoopProbe *p) {
        if (!p)
                return NULL;
        sd_event_source_disable_unref(p->timer);
        free(p);
        return NULL;
}

json_t *loop_probe_to_json(const LoopProbe *p) {
        static const LoopProbe none = {};

        if (!p)
                p = &none;
        return json_pack("{s:I, s:f, s:f, s:f}", "samples", (json_int_t)p->samples, "last_sec", p->last_usec / 1e6,
                         "max_sec", p->max_usec / 1e6, "mean_sec",
                         p->samples ? (double)p->sum_usec / (double)p->samples / 1e6 : 0.0);
}
