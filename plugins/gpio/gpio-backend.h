/* SPDX-License-Identifier: Apache-2.0 */
/* The one seam between the gpio plugin and libgpiod.
 *
 * gpio-backend-v1.c implements it on libgpiod 1.x, the API Debian 12 and
 * Raspberry Pi OS ship. A libgpiod 2 port is one new file implementing
 * these functions (and a configure switch choosing it); nothing else in
 * the plugin includes <gpiod.h>.
 *
 * Values are logical (ActiveLow is applied below this line). Timestamps are
 * CLOCK_MONOTONIC nanoseconds, as the kernel stamps line events. No logging
 * here: every function returns 0/positive or a negative errno. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef enum GpioDirection {
        GPIO_DIRECTION_INPUT,
        GPIO_DIRECTION_OUTPUT,
} GpioDirection;

typedef enum GpioBias {
        GPIO_BIAS_AS_IS, /* leave the chip's setting alone */
        GPIO_BIAS_DISABLE,
        GPIO_BIAS_PULL_UP,
        GPIO_BIAS_PULL_DOWN,
} GpioBias;

typedef enum GpioEdge {
        GPIO_EDGE_NONE,
        GPIO_EDGE_RISING,
        GPIO_EDGE_FALLING,
        GPIO_EDGE_BOTH,
} GpioEdge;

typedef enum GpioDrive {
        GPIO_DRIVE_PUSH_PULL,
        GPIO_DRIVE_OPEN_DRAIN,
        GPIO_DRIVE_OPEN_SOURCE,
} GpioDrive;

typedef struct GpioLineSettings {
        GpioDirection direction;
        bool active_low;
        GpioBias bias;   /* inputs */
        GpioEdge edge;   /* inputs */
        GpioDrive drive; /* outputs */
} GpioLineSettings;

typedef struct GpioEdgeEvent {
        int value;             /* the line's logical value after the edge */
        uint64_t timestamp_ns; /* CLOCK_MONOTONIC */
} GpioEdgeEvent;

typedef struct GpioRequest GpioRequest;

/* Request one line for exclusive use. chip is a chip name ("gpiochip0"),
 * a /dev path, a number or a chip label; consumer is the label other
 * programs see. An output is driven to initial_value (logical) at once.
 * Errors: -ENODEV no such chip, -EINVAL offset out of range or settings
 * the kernel refuses, -EBUSY line in use, other negative errno. */
int gpio_backend_request(const char *chip, unsigned offset, const GpioLineSettings *settings,
                         int initial_value, const char *consumer, GpioRequest **ret);

/* Release the line and free r. Accepts NULL, returns NULL. */
GpioRequest *gpio_backend_release(GpioRequest *r);

/* The logical value (0 or 1) of an input, or of what an output drives. */
int gpio_backend_get(GpioRequest *r);

/* Drive an output; -EPERM on an input. */
int gpio_backend_set(GpioRequest *r, int value);

/* The fd that becomes readable when edge events are queued (inputs with an
 * edge), owned by r; -EBADF when the line has no edge detection. */
int gpio_backend_event_fd(GpioRequest *r);

/* Read up to n queued events without blocking past the ones the fd
 * announced; returns how many were stored in ret (at least 1 when the fd
 * was readable) or a negative errno (-ENODEV: the chip went away). */
int gpio_backend_read_events(GpioRequest *r, GpioEdgeEvent *ret, size_t n);

/* "libgpiod 1.6.3", for logs. Static. */
const char *gpio_backend_version(void);
