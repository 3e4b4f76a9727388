/* SPDX-License-Identifier: Apache-2.0 */
/* The gpio plugin: named GPIO lines as cloud functions, variables and
 * events (docs/plugins/gpio.md).
 *
 *   functions  gpio.write "NAME,VALUE"       drive an output, returns VALUE
 *                                            (unknown name, an input or a
 *                                            value not 0/1: -EINVAL; chip
 *                                            missing: -ENODEV)
 *              gpio.pulse "NAME,MS[,VALUE]"  drive VALUE (default 1) for MS
 *                                            ms, then the value before;
 *                                            returns VALUE, never blocks
 *              gpio.read  "NAME"             the line's value
 *   variables  gpio.NAME (int32 0/1) for every line
 *   events     gpio/NAME {"value":V,"timestamp":"…Z","monotonic_ns":N} on
 *              every (debounced) edge of an input with Edge=
 *
 * Lines come from the file named by [Plugin gpio] LinesFile=. Edges are
 * read from the line request's fd on the agent's loop; nothing is polled.
 * Only gpio-backend-v1.c talks to libgpiod. */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <syslog.h>
#include <tether/plugin.h>
#include <time.h>

#include "gpio-backend.h"
#include "gpio-config.h"

#define GPIO_PULSE_MAX_MS 60000u
/* Timer accuracy for pulses and debounce. sd-event's default (accuracy 0)
 * is 250 ms of slack for coalescing: a 20 ms debounce would report up to a
 * quarter second late and a 100 ms pulse could last 350 ms. */
#define GPIO_TIMER_ACCURACY_USEC 100u
#define GPIO_DEFAULT_CONSUMER "tetherd"

typedef struct Gpio Gpio;

typedef struct Line {
        Gpio *gpio;
        GpioLineConfig config;
        GpioRequest *request; /* NULL while the chip or line is unavailable */
        int request_error;    /* why request is NULL */
        sd_event_source *io;
        sd_event_source *debounce;
        sd_event_source *pulse;
        int pulse_restore;         /* value to go back to after the pulse */
        int published;             /* last value sent as an event, -1 none */
        uint64_t pending_edge_ns;  /* timestamp of the edge being debounced */
        unsigned dropped;          /* events the agent refused since the last success */
        char variable[TETHER_NAME_MAX + 1];
        char event[TETHER_EVENT_NAME_MAX + 1];
} Line;

struct Gpio {
        const struct tether_host_api *api;
        tether_host *host;
        char consumer[32];
        Line *lines;
        size_t n_lines;
};

/* --- helpers ----------------------------------------------------------- */

static Line *line_find(Gpio *g, const char *name) {
        for (size_t i = 0; i < g->n_lines; i++)
                if (strcmp(g->lines[i].config.name, name) == 0)
                        return &g->lines[i];
        return NULL;
}

/* Split "NAME,A[,B]" (commas or blanks) into at most max fields. Returns
 * the number of fields or -EINVAL. buf is modified. */
static int split_args(char *buf, char **fields, int max) {
        int n = 0;
        char *p = buf;

        for (;;) {
                while (*p == ' ' || *p == '\t')
                        p++;
                if (!*p)
                        break;
                if (n == max)
                        return -EINVAL;
                fields[n++] = p;
                while (*p && *p != ',' && *p != ' ' && *p != '\t')
                        p++;
                while (*p == ' ' || *p == '\t')
                        *p++ = '\0';
                if (*p == ',') {
                        *p++ = '\0';
                        while (*p == ' ' || *p == '\t')
                                p++;
                        if (!*p || *p == ',')
                                return -EINVAL; /* "a," or "a,,b" */
                }
        }
        return n;
}

static int parse_bit(const char *s) {
        if (strcmp(s, "0") == 0)
                return 0;
        if (strcmp(s, "1") == 0)
                return 1;
        return -EINVAL;
}

static int parse_ms(const char *s, unsigned *ret) {
        unsigned long v;
        char *end;

        if (*s < '0' || *s > '9')
                return -EINVAL;
        errno = 0;
        v = strtoul(s, &end, 10);
        if (errno || *end || v == 0 || v > GPIO_PULSE_MAX_MS)
                return -EINVAL;
        *ret = (unsigned)v;
        return 0;
}

/* The stash keeps what an output drives across agent reloads, so a reload
 * does not bounce relays back to Default=. Keyed by line, valued with the
 * chip and offset so an edited line does not inherit another's value. */
static void stash_output(Line *l, int value) {
        Gpio *g = l->gpio;
        char key[TETHER_NAME_MAX + 1], val[128];

        if (g->api->abi_minor < 1 || !g->api->stash_set)
                return;
        snprintf(key, sizeof(key), "line.%s", l->config.name);
        snprintf(val, sizeof(val), "%s:%u:%d", l->config.chip, l->config.offset, value);
        (void)g->api->stash_set(g->host, key, val);
}

static int stashed_output(Line *l) {
        Gpio *g = l->gpio;
        char key[TETHER_NAME_MAX + 1], prefix[128];
        const char *v;

        if (g->api->abi_minor < 1 || !g->api->stash_get)
                return -ENODATA;
        snprintf(key, sizeof(key), "line.%s", l->config.name);
        v = g->api->stash_get(g->host, key);
        snprintf(prefix, sizeof(prefix), "%s:%u:", l->config.chip, l->config.offset);
        if (!v || strncmp(v, prefix, strlen(prefix)) != 0)
                return -ENODATA;
        v += strlen(prefix);
        return parse_bit(v);
}

/* --- edge events --------------------------------------------------------- */

static void format_timestamp(uint64_t mono_ns, char buf[static 64]) {
        struct timespec now_mono, now_real;
        int64_t real_ns;
        time_t sec;
        struct tm tm;

        /* The kernel stamps edges with CLOCK_MONOTONIC; the wall-clock time
         * is derived from it by the clocks' offset right now. */
        clock_gettime(CLOCK_MONOTONIC, &now_mono);
        clock_gettime(CLOCK_REALTIME, &now_real);
        real_ns = (int64_t)now_real.tv_sec * 1000000000 + now_real.tv_nsec -
                  ((int64_t)now_mono.tv_sec * 1000000000 + now_mono.tv_nsec - (int64_t)mono_ns);
        sec = (time_t)(real_ns / 1000000000);
        gmtime_r(&sec, &tm);
        snprintf(buf, 64, "%04d-%02d-%02dT%02d:%02d:%02d.%06dZ", tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday,
                 tm.tm_hour, tm.tm_min, tm.tm_sec, (int)((real_ns % 1000000000) / 1000));
}

static void publish_edge(Line *l, int value, uint64_t timestamp_ns) {
        Gpio *g = l->gpio;
        char ts[64], data[192];
        int r;

        format_timestamp(timestamp_ns, ts);
        snprintf(data, sizeof(data), "{\"value\":%d,\"timestamp\":\"%s\",\"monotonic_ns\":%" PRIu64 "}", value, ts,
                 timestamp_ns);
        r = g->api->publish(g->host, l->event, data, 0, 0);
        if (r < 0) {
                /* A chattering input must not flood the log either. */
                if (l->dropped++ == 0)
                        g->api->log(g->host, LOG_WARNING, "line '%s': the agent refused an edge event: %s",
                                    l->config.name, strerror(-r));
                return;
        }
        if (l->dropped > 0) {
                g->api->log(g->host, LOG_NOTICE, "line '%s': edge events flow again, %u were dropped",
                            l->config.name, l->dropped);
                l->dropped = 0;
        }
        l->published = value;
}

static void line_unavailable(Line *l, int error);

static int on_debounced(sd_event_source *s, uint64_t usec, void *userdata) {
        Line *l = userdata;
        int v;

        if (!l->request)
                return 0;
        v = gpio_backend_get(l->request);
        if (v < 0) {
                line_unavailable(l, v);
                return 0;
        }
        /* The line held still for Debounce= ms; report it if it ended up
         * somewhere else than where we last said it was. */
        if (v != l->published)
                publish_edge(l, v, l->pending_edge_ns);
        return 0;
}

static int on_line_io(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        Line *l = userdata;
        Gpio *g = l->gpio;
        GpioEdgeEvent ev[16];
        uint64_t now;
        int n;

        n = gpio_backend_read_events(l->request, ev, 16);
        if (n < 0) {
                line_unavailable(l, n);
                return 0;
        }
        if (l->config.debounce_ms == 0) {
                for (int i = 0; i < n; i++)
                        publish_edge(l, ev[i].value, ev[i].timestamp_ns);
                return 0;
        }
        /* Debounce: every edge restarts the quiet period; when it ends the
         * line's value is read and reported with the last edge's time. */
        l->pending_edge_ns = ev[n - 1].timestamp_ns;
        sd_event_now(g->api->event(g->host), CLOCK_MONOTONIC, &now);
        if (l->debounce) {
                sd_event_source_set_time(l->debounce, now + l->config.debounce_ms * 1000ull);
                sd_event_source_set_enabled(l->debounce, SD_EVENT_ONESHOT);
                return 0;
        }
        if (sd_event_add_time(g->api->event(g->host), &l->debounce, CLOCK_MONOTONIC,
                              now + l->config.debounce_ms * 1000ull, GPIO_TIMER_ACCURACY_USEC, on_debounced, l) < 0)
                g->api->log(g->host, LOG_ERR, "line '%s': cannot arm the debounce timer", l->config.name);
        return 0;
}

/* --- requesting and releasing -------------------------------------------- */

static void line_release(Line *l) {
        l->io = sd_event_source_disable_unref(l->io);
        l->debounce = sd_event_source_disable_unref(l->debounce);
        l->pulse = sd_event_source_disable_unref(l->pulse);
        l->request = gpio_backend_release(l->request);
}

static void line_unavailable(Line *l, int error) {
        Gpio *g = l->gpio;

        g->api->log(g->host, LOG_ERR, "line '%s' (%s offset %u) failed: %s; it will be requested again on next use",
                    l->config.name, l->config.chip, l->config.offset, strerror(-error));
        line_release(l);
        l->request_error = error;
}

/* Request the line if we do not hold it. Outputs start at the value they
 * had before a reload, else at Default=. */
static int line_acquire(Line *l, bool quiet) {
        Gpio *g = l->gpio;
        int initial = l->config.default_value, fd, r;

        if (l->request)
                return 0;
        if (l->config.settings.direction == GPIO_DIRECTION_OUTPUT) {
                r = stashed_output(l);
                if (r >= 0)
                        initial = r;
        }
        r = gpio_backend_request(l->config.chip, l->config.offset, &l->config.settings, initial, g->consumer,
                                 &l->request);
        if (r < 0) {
                if (!quiet || r != l->request_error)
                        g->api->log(g->host, LOG_WARNING, "line '%s': cannot request %s offset %u: %s%s",
                                    l->config.name, l->config.chip, l->config.offset,
                                    r == -ENODEV ? "no such chip" : strerror(-r),
                                    "; calls will fail until it is available");
                l->request_error = r;
                return r;
        }
        l->request_error = 0;
        if (l->config.settings.direction == GPIO_DIRECTION_OUTPUT) {
                stash_output(l, initial);
                return 0;
        }
        fd = gpio_backend_event_fd(l->request);
        if (fd < 0)
                return 0;
        r = gpio_backend_get(l->request);
        l->published = r < 0 ? -1 : r;
        r = sd_event_add_io(g->api->event(g->host), &l->io, fd, EPOLLIN, on_line_io, l);
        if (r < 0) {
                g->api->log(g->host, LOG_ERR, "line '%s': cannot watch its events: %s", l->config.name,
                            strerror(-r));
                l->request = gpio_backend_release(l->request);
                l->request_error = r;
                return r;
        }
        return 0;
}

/* --- functions and variables ---------------------------------------------- */

/* Look up NAME for a function. Unknown names and bad arguments are -EINVAL
 * (the caller sees 400); a line whose chip is missing is -ENODEV. */
static int lookup(Gpio *g, const char *fn, const char *name, Line **ret) {
        Line *l = line_find(g, name);
        int r;

        if (!l) {
                g->api->log(g->host, LOG_NOTICE, "%s: unknown line '%s'", fn, name);
                return -EINVAL;
        }
        r = line_acquire(l, true);
        if (r < 0)
                return r == -ENOENT ? -ENODEV : r;
        *ret = l;
        return 0;
}

static int output_line(Gpio *g, const char *fn, const char *name, Line **ret) {
        Line *l = line_find(g, name);

        /* Writing an input is the caller's mistake, like an unknown name:
         * -EINVAL, so the cloud answers 400. */
        if (l && l->config.settings.direction != GPIO_DIRECTION_OUTPUT) {
                g->api->log(g->host, LOG_NOTICE, "%s: line '%s' is an input", fn, name);
                return -EINVAL;
        }
        return lookup(g, fn, name, ret);
}

static int line_set(Line *l, int value) {
        int r = gpio_backend_set(l->request, value);

        if (r < 0) {
                line_unavailable(l, r);
                return r;
        }
        stash_output(l, value);
        return 0;
}

static int fn_write(void *userdata, const char *arg, int32_t *ret_result) {
        Gpio *g = userdata;
        char buf[128], *f[2];
        Line *l;
        int value, r;

        if (strlen(arg) >= sizeof(buf))
                return -EINVAL;
        strcpy(buf, arg);
        if (split_args(buf, f, 2) != 2 || (value = parse_bit(f[1])) < 0) {
                g->api->log(g->host, LOG_NOTICE, "gpio.write: expected 'NAME,0' or 'NAME,1', got '%s'", arg);
                return -EINVAL;
        }
        r = output_line(g, "gpio.write", f[0], &l);
        if (r < 0)
                return r;
        /* A write overrides a pulse in progress: its restore would undo it. */
        l->pulse = sd_event_source_disable_unref(l->pulse);
        r = line_set(l, value);
        if (r < 0)
                return r;
        *ret_result = value;
        return 0;
}

static int on_pulse_end(sd_event_source *s, uint64_t usec, void *userdata) {
        Line *l = userdata;

        l->pulse = sd_event_source_disable_unref(l->pulse);
        if (l->request)
                (void)line_set(l, l->pulse_restore);
        return 0;
}

static int fn_pulse(void *userdata, const char *arg, int32_t *ret_result) {
        Gpio *g = userdata;
        char buf[128], *f[3];
        unsigned ms;
        uint64_t now;
        Line *l;
        int n, value = 1, before, r;

        if (strlen(arg) >= sizeof(buf))
                return -EINVAL;
        strcpy(buf, arg);
        n = split_args(buf, f, 3);
        if (n < 2 || parse_ms(f[1], &ms) < 0 || (n == 3 && (value = parse_bit(f[2])) < 0)) {
                g->api->log(g->host, LOG_NOTICE, "gpio.pulse: expected 'NAME,MS[,VALUE]' with MS 1..%u, got '%s'",
                            GPIO_PULSE_MAX_MS, arg);
                return -EINVAL;
        }
        r = output_line(g, "gpio.pulse", f[0], &l);
        if (r < 0)
                return r;
        if (l->pulse)
                return -EBUSY;
        before = gpio_backend_get(l->request);
        if (before < 0) {
                line_unavailable(l, before);
                return before;
        }
        sd_event_now(g->api->event(g->host), CLOCK_MONOTONIC, &now);
        r = sd_event_add_time(g->api->event(g->host), &l->pulse, CLOCK_MONOTONIC, now + ms * 1000ull,
                              GPIO_TIMER_ACCURACY_USEC, on_pulse_end, l);
        if (r < 0)
                return r;
        l->pulse_restore = before;
        r = line_set(l, value);
        if (r < 0)
                return r;
        *ret_result = value;
        return 0;
}

static int fn_read(void *userdata, const char *arg, int32_t *ret_result) {
        Gpio *g = userdata;
        char buf[128], *f[1];
        Line *l;
        int r;

        if (strlen(arg) >= sizeof(buf))
                return -EINVAL;
        strcpy(buf, arg);
        if (split_args(buf, f, 1) != 1) {
                g->api->log(g->host, LOG_NOTICE, "gpio.read: expected a line name, got '%s'", arg);
                return -EINVAL;
        }
        r = lookup(g, "gpio.read", f[0], &l);
        if (r < 0)
                return r;
        r = gpio_backend_get(l->request);
        if (r < 0) {
                line_unavailable(l, r);
                return r;
        }
        *ret_result = r;
        return 0;
}

static int var_line(void *userdata, struct tether_value *ret) {
        Line *l = userdata;
        int r;

        r = line_acquire(l, true);
        if (r < 0)
                return r == -ENOENT ? -ENODEV : r;
        r = gpio_backend_get(l->request);
        if (r < 0) {
                line_unavailable(l, r);
                return r;
        }
        ret->i = r;
        return 0;
}

/* --- init and fini -------------------------------------------------------- */

static void config_warning(void *userdata, const char *message) {
        Gpio *g = userdata;
        g->api->log(g->host, LOG_WARNING, "%s", message);
}

static int load_lines(Gpio *g, const char *path) {
        GpioConfig c = {};
        char *error = NULL;
        FILE *f;
        int r;

        f = fopen(path, "re");
        if (!f) {
                if (errno == ENOENT) {
                        g->api->log(g->host, LOG_NOTICE, "no lines file '%s', no lines configured", path);
                        return 0;
                }
                r = -errno;
                g->api->log(g->host, LOG_ERR, "cannot open lines file '%s': %s", path, strerror(-r));
                return r;
        }
        r = gpio_config_parse(f, path, &c, &error, config_warning, g);
        fclose(f);
        if (r < 0) {
                g->api->log(g->host, LOG_ERR, "%s", error ? error : "invalid lines file");
                free(error);
                return r;
        }
        g->lines = calloc(c.n_lines ? c.n_lines : 1, sizeof(Line));
        if (!g->lines) {
                gpio_config_done(&c);
                return -ENOMEM;
        }
        for (size_t i = 0; i < c.n_lines; i++) {
                Line *l = &g->lines[i];

                l->gpio = g;
                l->config = c.lines[i]; /* takes the chip string */
                l->published = -1;
                snprintf(l->variable, sizeof(l->variable), "gpio.%s", l->config.name);
                snprintf(l->event, sizeof(l->event), "gpio/%s", l->config.name);
        }
        g->n_lines = c.n_lines;
        free(c.lines);
        return 0;
}

static void gpio_fini(void *userdata) {
        Gpio *g = userdata;

        if (!g)
                return;
        for (size_t i = 0; i < g->n_lines; i++) {
                Line *l = &g->lines[i];

                /* A pulse cut short by stop or reload still ends where it
                 * would have ended. */
                if (l->pulse && l->request)
                        (void)line_set(l, l->pulse_restore);
                line_release(l);
                free(l->config.chip);
        }
        free(g->lines);
        free(g);
}

static int gpio_init(const struct tether_host_api *api, tether_host *host, void **ret_userdata) {
        const char *path, *consumer;
        size_t available = 0;
        Gpio *g;
        int r;

        if (api->abi_major != TETHER_PLUGIN_ABI_MAJOR)
                return -EPROTO;
        g = calloc(1, sizeof(*g));
        if (!g)
                return -ENOMEM;
        *ret_userdata = g;
        g->api = api;
        g->host = host;
        consumer = api->config_get(host, "Consumer");
        snprintf(g->consumer, sizeof(g->consumer), "%s", consumer && *consumer ? consumer : GPIO_DEFAULT_CONSUMER);
        path = api->config_get(host, "LinesFile");
        r = load_lines(g, path && *path ? path : SYSCONFDIR "/tether/gpio-lines.conf");
        if (r < 0)
                return r;

        if ((r = api->function_add(host, "gpio.write", fn_write, g)) < 0 ||
            (r = api->function_add(host, "gpio.pulse", fn_pulse, g)) < 0 ||
            (r = api->function_add(host, "gpio.read", fn_read, g)) < 0 ||
            (r = api->event_source_add(host, "gpio/")) < 0)
                return r;
        for (size_t i = 0; i < g->n_lines; i++) {
                Line *l = &g->lines[i];

                r = api->variable_add(host, l->variable, TETHER_TYPE_INT32, var_line, l);
                if (r < 0) {
                        api->log(host, LOG_ERR, "cannot register variable '%s': %s", l->variable, strerror(-r));
                        return r;
                }
                /* Outputs go to their start value and inputs get their
                 * edge watch now; a missing chip is retried on use. */
                if (line_acquire(l, false) == 0)
                        available++;
        }
        api->log(host, LOG_INFO, "%zu line(s) configured, %zu available (%s)", g->n_lines, available,
                 gpio_backend_version());
        return 0;
}

TETHER_PLUGIN("gpio", PACKAGE_VERSION, gpio_init, gpio_fini);
