/* SPDX-License-Identifier: Apache-2.0 */
/* gpio backend on libgpiod 1.x (gpio-backend.h). The only file of the gpio
 * plugin that includes <gpiod.h>: port this one to libgpiod 2 and the
 * rest of the plugin stays as it is.
 *
 * libgpiod 1 keeps a chip handle per request here (one fd for the chip,
 * one for the line request); lines are few, fds are cheap, and every line
 * then lives and dies on its own. */
#include <errno.h>
#include <gpiod.h>
#include <stdio.h>
#include <stdlib.h>

#include "gpio-backend.h"

struct GpioRequest {
        struct gpiod_chip *chip;
        struct gpiod_line *line;
        bool events;
};

static int request_type(const GpioLineSettings *s) {
        if (s->direction == GPIO_DIRECTION_OUTPUT)
                return GPIOD_LINE_REQUEST_DIRECTION_OUTPUT;
        switch (s->edge) {
        case GPIO_EDGE_RISING:
                return GPIOD_LINE_REQUEST_EVENT_RISING_EDGE;
        case GPIO_EDGE_FALLING:
                return GPIOD_LINE_REQUEST_EVENT_FALLING_EDGE;
        case GPIO_EDGE_BOTH:
                return GPIOD_LINE_REQUEST_EVENT_BOTH_EDGES;
        default:
                return GPIOD_LINE_REQUEST_DIRECTION_INPUT;
        }
}

static int request_flags(const GpioLineSettings *s) {
        int flags = s->active_low ? GPIOD_LINE_REQUEST_FLAG_ACTIVE_LOW : 0;

        if (s->direction == GPIO_DIRECTION_OUTPUT) {
                if (s->drive == GPIO_DRIVE_OPEN_DRAIN)
                        flags |= GPIOD_LINE_REQUEST_FLAG_OPEN_DRAIN;
                else if (s->drive == GPIO_DRIVE_OPEN_SOURCE)
                        flags |= GPIOD_LINE_REQUEST_FLAG_OPEN_SOURCE;
                return flags;
        }
        switch (s->bias) {
        case GPIO_BIAS_DISABLE:
                return flags | GPIOD_LINE_REQUEST_FLAG_BIAS_DISABLE;
        case GPIO_BIAS_PULL_UP:
                return flags | GPIOD_LINE_REQUEST_FLAG_BIAS_PULL_UP;
        case GPIO_BIAS_PULL_DOWN:
                return flags | GPIOD_LINE_REQUEST_FLAG_BIAS_PULL_DOWN;
        default:
                return flags;
        }
}

/* errno as a negative value; never 0, never -ENOENT (which callers up the
 * stack would read as "no such function"). */
static int neg_errno(int fallback) {
        int e = errno ? errno : fallback;
        return e == ENOENT ? -ENODEV : -e;
}

int gpio_backend_request(const char *chip, unsigned offset, const GpioLineSettings *settings,
                         int initial_value, const char *consumer, GpioRequest **ret) {
        struct gpiod_line_request_config config = {
                .consumer = consumer,
                .request_type = request_type(settings),
                .flags = request_flags(settings),
        };
        GpioRequest *r;
        int k;

        r = calloc(1, sizeof(*r));
        if (!r)
                return -ENOMEM;
        errno = 0;
        r->chip = gpiod_chip_open_lookup(chip);
        if (!r->chip) {
                /* Lookup by label walks every chip; a missing one ends in
                 * ENOENT (no /dev node) or ENOTTY (not a GPIO chip). */
                k = errno == ENOTTY ? -ENODEV : neg_errno(ENODEV);
                free(r);
                return k;
        }
        errno = 0;
        r->line = gpiod_chip_get_line(r->chip, offset);
        if (!r->line) {
                k = neg_errno(EINVAL);
                gpio_backend_release(r);
                return k;
        }
        errno = 0;
        if (gpiod_line_request(r->line, &config, initial_value ? 1 : 0) < 0) {
                k = neg_errno(EIO);
                r->line = NULL;
                gpio_backend_release(r);
                return k;
        }
        r->events = config.request_type != GPIOD_LINE_REQUEST_DIRECTION_OUTPUT &&
                    config.request_type != GPIOD_LINE_REQUEST_DIRECTION_INPUT;
        *ret = r;
        return 0;
}

GpioRequest *gpio_backend_release(GpioRequest *r) {
        if (!r)
                return NULL;
        if (r->line)
                gpiod_line_release(r->line);
        if (r->chip)
                gpiod_chip_close(r->chip);
        free(r);
        return NULL;
}

int gpio_backend_get(GpioRequest *r) {
        int v;

        errno = 0;
        v = gpiod_line_get_value(r->line);
        return v < 0 ? neg_errno(EIO) : !!v;
}

int gpio_backend_set(GpioRequest *r, int value) {
        errno = 0;
        return gpiod_line_set_value(r->line, value ? 1 : 0) < 0 ? neg_errno(EIO) : 0;
}

int gpio_backend_event_fd(GpioRequest *r) {
        int fd;

        if (!r->events)
                return -EBADF;
        fd = gpiod_line_event_get_fd(r->line);
        return fd < 0 ? -EBADF : fd;
}

int gpio_backend_read_events(GpioRequest *r, GpioEdgeEvent *ret, size_t n) {
        struct gpiod_line_event ev[16];
        int k;

        if (!r->events)
                return -EBADF;
        if (n > 16)
                n = 16;
        /* One read(): the kernel hands out what is queued, at most n, and
         * blocks only when nothing is, which the readable fd ruled out. */
        errno = 0;
        k = gpiod_line_event_read_multiple(r->line, ev, (unsigned)n);
        if (k < 0)
                return neg_errno(EIO);
        for (int i = 0; i < k; i++)
                ret[i] = (GpioEdgeEvent){
                        .value = ev[i].event_type == GPIOD_LINE_EVENT_RISING_EDGE,
                        .timestamp_ns = (uint64_t)ev[i].ts.tv_sec * 1000000000ull + (uint64_t)ev[i].ts.tv_nsec,
                };
        return k;
}

const char *gpio_backend_version(void) {
        static char buf[32];

        if (!buf[0])
                snprintf(buf, sizeof(buf), "libgpiod %s", gpiod_version_string());
        return buf;
}
