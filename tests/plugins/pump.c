/* SPDX-License-Identifier: Apache-2.0 */
/* A test plugin that publishes numbered events at a steady pace, for the
 * fault-injection tests. Each number is published until publish() accepts
 * it, then never again: what the subscriber must see is 1, 2, 3, ... with
 * nothing missing and nothing twice.
 *
 *   functions  start("FIRST,COUNT,RATE")  publish the numbers FIRST ..
 *                          FIRST+COUNT-1 as events "pump/n" (data: the
 *                          number), RATE per second; -EBUSY while running
 *              stop()      stop publishing
 *              mark("TAG") publish "pump/mark" with data TAG at once
 *   variables  next (int32)      the next number to publish
 *              refused (int32)   publish() calls that failed
 *              running (bool)
 *   config     [Plugin pump] Start=FIRST,COUNT,RATE starts at load;
 *              LogProgress=yes logs "pump: accepted through N" after every
 *              tick that accepted something (for tests that kill the agent)
 */
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <syslog.h>
#include <tether/plugin.h>

#define PUMP_TICK_USEC 10000

typedef struct Pump {
        const struct tether_host_api *api;
        tether_host *host;
        sd_event_source *tick;
        bool running, log_progress;
        int64_t next, last; /* next to publish, last of the run */
        double rate;
        uint64_t started_usec;
        int64_t first;
        int32_t refused;
        unsigned streak; /* failures in a row */
        int last_error;
} Pump;

static int parse_run(const char *arg, int64_t *first, int64_t *count, double *rate) {
        long long f, c;
        double r;
        int n = 0;

        if (sscanf(arg, "%lld,%lld,%lf%n", &f, &c, &r, &n) != 3 || arg[n] || f < 1 || c < 0 || f + c > INT32_MAX ||
            !(r > 0) || r > 1e6)
                return -EINVAL;
        *first = f;
        *count = c;
        *rate = r;
        return 0;
}

static int on_tick(sd_event_source *s, uint64_t usec, void *userdata) {
        Pump *p = userdata;
        int64_t due = p->first + (int64_t)((double)(usec - p->started_usec) / 1e6 * p->rate) + 1, before = p->next;
        char data[24];

        if (due > p->last + 1)
                due = p->last + 1;
        while (p->next < due) {
                int r;

                snprintf(data, sizeof(data), "%lld", (long long)p->next);
                r = p->api->publish(p->host, "pump/n", data, 60, 0);
                if (r < 0) {
                        /* Try the same number again next tick. */
                        p->refused++;
                        if (r != p->last_error || ++p->streak % 50 == 0)
                                p->api->log(p->host, LOG_WARNING, "publish of %lld failed %u time(s): %s",
                                            (long long)p->next, p->streak ?: 1, strerror(-r));
                        p->last_error = r;
                        break;
                }
                if (p->last_error) {
                        p->api->log(p->host, LOG_NOTICE, "publishing again at %lld", (long long)p->next);
                        p->last_error = 0;
                        p->streak = 0;
                }
                p->next++;
        }
        if (p->log_progress && p->next != before)
                p->api->log(p->host, LOG_INFO, "accepted through %lld", (long long)(p->next - 1));
        if (p->next > p->last) {
                p->api->log(p->host, LOG_INFO, "done: accepted %lld..%lld", (long long)p->first,
                            (long long)p->last);
                p->running = false;
                sd_event_source_set_enabled(s, SD_EVENT_OFF);
                return 0;
        }
        sd_event_source_set_time(s, usec + PUMP_TICK_USEC);
        sd_event_source_set_enabled(s, SD_EVENT_ON);
        return 0;
}

static int pump_start(Pump *p, int64_t first, int64_t count, double rate) {
        sd_event *ev = p->api->event(p->host);
        uint64_t now;
        int r;

        if (p->running)
                return -EBUSY;
        sd_event_now(ev, CLOCK_MONOTONIC, &now);
        p->first = p->next = first;
        p->last = first + count - 1;
        p->rate = rate;
        p->started_usec = now;
        p->running = true;
        if (!p->tick) {
                r = sd_event_add_time(ev, &p->tick, CLOCK_MONOTONIC, now, 1000, on_tick, p);
                if (r < 0)
                        return r;
        } else
                sd_event_source_set_time(p->tick, now);
        sd_event_source_set_enabled(p->tick, SD_EVENT_ON);
        p->api->log(p->host, LOG_INFO, "starting at %lld: %lld events, %.0f/s", (long long)first,
                    (long long)count, rate);
        return 0;
}

static int fn_start(void *userdata, const char *arg, int32_t *ret_result) {
        int64_t first, count;
        double rate;
        int r = parse_run(arg, &first, &count, &rate);

        if (r < 0)
                return r;
        r = pump_start(userdata, first, count, rate);
        if (r < 0)
                return r;
        *ret_result = (int32_t)count;
        return 0;
}

static int fn_stop(void *userdata, const char *arg, int32_t *ret_result) {
        Pump *p = userdata;

        p->running = false;
        if (p->tick)
                sd_event_source_set_enabled(p->tick, SD_EVENT_OFF);
        *ret_result = (int32_t)p->next;
        return 0;
}

static int fn_mark(void *userdata, const char *arg, int32_t *ret_result) {
        Pump *p = userdata;
        int r = p->api->publish(p->host, "pump/mark", arg, 60, 0);

        if (r < 0)
                return r == -ENOBUFS || r == -ENOSPC ? -EBUSY : r;
        *ret_result = 0;
        return 0;
}

static int var_next(void *userdata, struct tether_value *ret) {
        ret->i = (int32_t)((Pump *)userdata)->next;
        return 0;
}

static int var_refused(void *userdata, struct tether_value *ret) {
        ret->i = ((Pump *)userdata)->refused;
        return 0;
}

static int var_running(void *userdata, struct tether_value *ret) {
        ret->b = ((Pump *)userdata)->running;
        return 0;
}

static void pump_fini(void *userdata) {
        Pump *p = userdata;

        if (!p)
                return;
        sd_event_source_disable_unref(p->tick);
        free(p);
}

static int pump_init(const struct tether_host_api *api, tether_host *host, void **ret_userdata) {
        const char *start, *log;
        Pump *p;
        int r;

        if (api->abi_major != TETHER_PLUGIN_ABI_MAJOR)
                return -EPROTO;
        p = calloc(1, sizeof(*p));
        if (!p)
                return -ENOMEM;
        *ret_userdata = p;
        p->api = api;
        p->host = host;
        p->next = 1;
        log = api->config_get(host, "LogProgress");
        p->log_progress = log && (strcmp(log, "yes") == 0 || strcmp(log, "1") == 0);

        if ((r = api->function_add(host, "start", fn_start, p)) < 0 ||
            (r = api->function_add(host, "stop", fn_stop, p)) < 0 ||
            (r = api->function_add(host, "mark", fn_mark, p)) < 0 ||
            (r = api->variable_add(host, "next", TETHER_TYPE_INT32, var_next, p)) < 0 ||
            (r = api->variable_add(host, "refused", TETHER_TYPE_INT32, var_refused, p)) < 0 ||
            (r = api->variable_add(host, "running", TETHER_TYPE_BOOL, var_running, p)) < 0 ||
            (r = api->event_source_add(host, "pump/")) < 0)
                return r;

        start = api->config_get(host, "Start");
        if (start) {
                int64_t first, count;
                double rate;

                if (parse_run(start, &first, &count, &rate) < 0) {
                        api->log(host, LOG_ERR, "invalid Start='%s' (FIRST,COUNT,RATE)", start);
                        return -EINVAL;
                }
                return pump_start(p, first, count, rate);
        }
        return 0;
}

TETHER_PLUGIN("pump", "1.0", pump_init, pump_fini);
