/* SPDX-License-Identifier: Apache-2.0 */
/* The example plugin: the SDK sample and the plugin the tests drive.
 *
 *   functions  echo(arg)   returns the argument's length and publishes it
 *                          as the event "example/echo"
 *              add("a,b")  returns a+b; -EINVAL for anything else
 *   variables  counter     int32, incremented by every tick
 *              ratio       double, counter / 8
 *              label       string, from Label= (default "example")
 *              enabled     bool, whether ticks are on
 *              last_event  string, data of the last event received
 *   events     example/tick every IntervalSec= seconds (default 10, 0 off)
 *   subscribes Subscribe= prefix (default "example/cmd")
 *
 * Config section: [Plugin example] IntervalSec= Label= Subscribe=
 */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <syslog.h>
#include <tether/plugin.h>
#include <time.h>

typedef struct Example {
        const struct tether_host_api *api;
        tether_host *host;
        sd_event_source *tick;
        uint64_t interval_usec;
        int32_t counter;
        char label[65];
        char *last_event;
} Example;

static int fn_echo(void *userdata, const char *arg, int32_t *ret_result) {
        Example *e = userdata;
        size_t n = strlen(arg);
        int r;

        r = e->api->publish(e->host, "example/echo", arg, 60, 0);
        if (r < 0)
                return r;
        *ret_result = n > INT32_MAX ? INT32_MAX : (int32_t)n;
        return 0;
}

static int fn_add(void *userdata, const char *arg, int32_t *ret_result) {
        long a, b;
        char *end;

        errno = 0;
        a = strtol(arg, &end, 10);
        if (end == arg || *end != ',' || errno)
                return -EINVAL;
        arg = end + 1;
        b = strtol(arg, &end, 10);
        if (end == arg || *end || errno)
                return -EINVAL;
        if (a + b > INT32_MAX || a + b < INT32_MIN)
                return -ERANGE;
        *ret_result = (int32_t)(a + b);
        return 0;
}

static int var_counter(void *userdata, struct tether_value *ret) {
        ret->i = ((Example *)userdata)->counter;
        return 0;
}

static int var_ratio(void *userdata, struct tether_value *ret) {
        ret->d = ((Example *)userdata)->counter / 8.0;
        return 0;
}

static int var_label(void *userdata, struct tether_value *ret) {
        ret->s = ((Example *)userdata)->label;
        return 0;
}

static int var_enabled(void *userdata, struct tether_value *ret) {
        ret->b = ((Example *)userdata)->interval_usec > 0;
        return 0;
}

static int var_last_event(void *userdata, struct tether_value *ret) {
        Example *e = userdata;
        ret->s = e->last_event ? e->last_event : "";
        return 0;
}

static void on_cloud_event(void *userdata, const char *name, const char *data) {
        Example *e = userdata;
        char *copy = strdup(data);

        if (!copy)
                return;
        free(e->last_event);
        e->last_event = copy;
        e->api->log(e->host, LOG_INFO, "received event '%s'", name);
        (void)e->api->variable_changed(e->host, "last_event");
}

static int on_tick(sd_event_source *s, uint64_t usec, void *userdata) {
        Example *e = userdata;
        char data[16];
        int r;

        e->counter++;
        snprintf(data, sizeof(data), "%d", (int)e->counter);
        r = e->api->publish(e->host, "example/tick", data, 60, 0);
        if (r < 0)
                e->api->log(e->host, LOG_WARNING, "publishing a tick failed: %s", strerror(-r));
        sd_event_source_set_time(s, usec + e->interval_usec);
        sd_event_source_set_enabled(s, SD_EVENT_ONESHOT);
        return 0;
}

static void example_fini(void *userdata) {
        Example *e = userdata;

        if (!e)
                return;
        sd_event_source_disable_unref(e->tick);
        free(e->last_event);
        free(e);
}

static int example_init(const struct tether_host_api *api, tether_host *host, void **ret_userdata) {
        const char *interval, *label, *prefix;
        Example *e;
        double sec = 10;
        int r;

        if (api->abi_major != TETHER_PLUGIN_ABI_MAJOR)
                return -EPROTO;
        e = calloc(1, sizeof(*e));
        if (!e)
                return -ENOMEM;
        *ret_userdata = e;
        e->api = api;
        e->host = host;

        interval = api->config_get(host, "IntervalSec");
        if (interval) {
                char *end;
                sec = strtod(interval, &end);
                if (end == interval || *end || sec < 0 || sec > 86400) {
                        api->log(host, LOG_ERR, "invalid IntervalSec='%s'", interval);
                        return -EINVAL;
                }
        }
        e->interval_usec = (uint64_t)(sec * 1e6);
        label = api->config_get(host, "Label");
        snprintf(e->label, sizeof(e->label), "%s", label ? label : "example");
        prefix = api->config_get(host, "Subscribe");

        if ((r = api->function_add(host, "echo", fn_echo, e)) < 0 ||
            (r = api->function_add(host, "add", fn_add, e)) < 0 ||
            (r = api->variable_add(host, "counter", TETHER_TYPE_INT32, var_counter, e)) < 0 ||
            (r = api->variable_add(host, "ratio", TETHER_TYPE_DOUBLE, var_ratio, e)) < 0 ||
            (r = api->variable_add(host, "label", TETHER_TYPE_STRING, var_label, e)) < 0 ||
            (r = api->variable_add(host, "enabled", TETHER_TYPE_BOOL, var_enabled, e)) < 0 ||
            (r = api->variable_add(host, "last_event", TETHER_TYPE_STRING, var_last_event, e)) < 0 ||
            (r = api->event_source_add(host, "example/")) < 0 ||
            (r = api->subscribe(host, prefix ? prefix : "example/cmd", on_cloud_event, e)) < 0)
                return r;

        if (e->interval_usec > 0) {
                uint64_t now;
                sd_event_now(api->event(host), CLOCK_MONOTONIC, &now);
                r = sd_event_add_time(api->event(host), &e->tick, CLOCK_MONOTONIC, now + e->interval_usec, 0,
                                      on_tick, e);
                if (r < 0)
                        return r;
        }
        return 0;
}

TETHER_PLUGIN("example", "1.0", example_init, example_fini);
