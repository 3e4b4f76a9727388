/* SPDX-License-Identifier: Apache-2.0 */
/* The gpio plugin's line definitions: a keyfile of "[Line NAME]" sections
 * (docs/plugins/gpio.md), parsed with inih. Library-like: no logging;
 * errors come back as "FILE:LINE: reason", warnings through a callback. */
#pragma once

#include <stdio.h>

#include "gpio-backend.h"

/* Line names: [A-Za-z0-9_-], at most this many bytes, so that "gpio.NAME"
 * fits the 64-byte variable names. */
#define GPIO_LINE_NAME_MAX 48
#define GPIO_DEBOUNCE_MAX_MS 10000u

typedef struct GpioLineConfig {
        char name[GPIO_LINE_NAME_MAX + 1];
        char *chip;
        unsigned offset;
        GpioLineSettings settings;
        int default_value;    /* outputs: 0 or 1 */
        unsigned debounce_ms; /* inputs with an edge: 0 = every edge */
        unsigned line;        /* where the section starts, for messages */
        unsigned seen;        /* internal: keys given (GPIO_KEY_* bits) */
} GpioLineConfig;

typedef struct GpioConfig {
        GpioLineConfig *lines;
        size_t n_lines;
} GpioConfig;

typedef void (*gpio_config_warn_fn)(void *userdata, const char *message);

/* Parse f (named path in messages) into *ret. On a bad value or a missing
 * required key returns -EINVAL and, if ret_error is given, a malloc'd
 * "PATH:LINE: reason". Unknown keys and sections are passed to warn (may be
 * NULL) and ignored. */
int gpio_config_parse(FILE *f, const char *path, GpioConfig *ret, char **ret_error, gpio_config_warn_fn warn,
                      void *userdata);
void gpio_config_done(GpioConfig *c);

/* 0 if name is a valid line name, -EINVAL otherwise. */
int gpio_line_name_check(const char *name);
