/* SPDX-License-Identifier: Apache-2.0 */
#include <errno.h>
#include <ini.h>
#include <limits.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "gpio-config.h"

enum {
        GPIO_KEY_CHIP = 1u << 0,
        GPIO_KEY_OFFSET = 1u << 1,
        GPIO_KEY_DIRECTION = 1u << 2,
        GPIO_KEY_DEFAULT = 1u << 3,
        GPIO_KEY_DRIVE = 1u << 4,
        GPIO_KEY_BIAS = 1u << 5,
        GPIO_KEY_EDGE = 1u << 6,
        GPIO_KEY_DEBOUNCE = 1u << 7,
};

typedef struct ParseState {
        FILE *f;
        const char *path;
        unsigned line;
        GpioConfig *config;
        char *error;
        gpio_config_warn_fn warn;
        void *userdata;
} ParseState;

__attribute__((format(printf, 3, 4))) static int fail(ParseState *s, unsigned line, const char *fmt, ...) {
        char msg[256];
        va_list ap;

        if (s->error) /* the first error is the one to fix */
                return 0;
        va_start(ap, fmt);
        vsnprintf(msg, sizeof(msg), fmt, ap);
        va_end(ap);
        if (asprintf(&s->error, "%s:%u: %s", s->path, line, msg) < 0)
                s->error = NULL;
        return 0;
}

__attribute__((format(printf, 2, 3))) static void warn(ParseState *s, const char *fmt, ...) {
        char msg[256], *full = NULL;
        va_list ap;

        if (!s->warn)
                return;
        va_start(ap, fmt);
        vsnprintf(msg, sizeof(msg), fmt, ap);
        va_end(ap);
        if (asprintf(&full, "%s:%u: %s", s->path, s->line, msg) >= 0) {
                s->warn(s->userdata, full);
                free(full);
        }
}

int gpio_line_name_check(const char *name) {
        size_t n = strlen(name);

        if (n == 0 || n > GPIO_LINE_NAME_MAX)
                return -EINVAL;
        for (const char *p = name; *p; p++)
                if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
                      *p == '_' || *p == '-'))
                        return -EINVAL;
        return 0;
}

static int parse_bool(const char *v) {
        static const char *const yes[] = { "yes", "true", "on", "1" }, *const no[] = { "no", "false", "off", "0" };

        for (size_t i = 0; i < 4; i++) {
                if (strcasecmp(v, yes[i]) == 0)
                        return 1;
                if (strcasecmp(v, no[i]) == 0)
                        return 0;
        }
        return -EINVAL;
}

static int parse_uint(const char *v, unsigned max, unsigned *ret) {
        unsigned long u;
        char *end;

        if (*v < '0' || *v > '9')
                return -EINVAL;
        errno = 0;
        u = strtoul(v, &end, 10);
        if (errno || *end || u > max)
                return -ERANGE;
        *ret = (unsigned)u;
        return 0;
}

/* Index of v in words (NULL-terminated), or -EINVAL. */
static int parse_word(const char *v, const char *const *words) {
        for (int i = 0; words[i]; i++)
                if (strcmp(v, words[i]) == 0)
                        return i;
        return -EINVAL;
}

static GpioLineConfig *line_section(ParseState *s, const char *name) {
        GpioConfig *c = s->config;
        GpioLineConfig *n;

        for (size_t i = 0; i < c->n_lines; i++)
                if (strcmp(c->lines[i].name, name) == 0)
                        return &c->lines[i];
        n = realloc(c->lines, (c->n_lines + 1) * sizeof(*n));
        if (!n)
                return NULL;
        c->lines = n;
        n = &c->lines[c->n_lines++];
        *n = (GpioLineConfig){ .line = s->line };
        strcpy(n->name, name);
        return n;
}

static int handler(void *user, const char *section, const char *key, const char *value) {
        static const char *const directions[] = { "input", "output", NULL };
        static const char *const biases[] = { "as-is", "disable", "pull-up", "pull-down", NULL };
        static const char *const edges[] = { "none", "rising", "falling", "both", NULL };
        static const char *const drives[] = { "push-pull", "open-drain", "open-source", NULL };
        ParseState *s = user;
        GpioLineConfig *l;
        unsigned u;
        int k;

        if (strncmp(section, "Line ", 5) != 0) {
                warn(s, "unknown section [%s], ignoring", section);
                return 1;
        }
        if (gpio_line_name_check(section + 5) < 0)
                return fail(s, s->line, "invalid line name '%s' (letters, digits, '_' and '-', at most %d)",
                            section + 5, GPIO_LINE_NAME_MAX);
        l = line_section(s, section + 5);
        if (!l)
                return fail(s, s->line, "out of memory");

        if (strcmp(key, "Chip") == 0) {
                if (!*value)
                        return fail(s, s->line, "Chip= must not be empty");
                free(l->chip);
                l->chip = strdup(value);
                if (!l->chip)
                        return fail(s, s->line, "out of memory");
                l->seen |= GPIO_KEY_CHIP;
        } else if (strcmp(key, "Offset") == 0) {
                if (parse_uint(value, 65535, &l->offset) < 0)
                        return fail(s, s->line, "invalid Offset='%s' (0..65535)", value);
                l->seen |= GPIO_KEY_OFFSET;
        } else if (strcmp(key, "Direction") == 0) {
                if ((k = parse_word(value, directions)) < 0)
                        return fail(s, s->line, "invalid Direction='%s' (input or output)", value);
                l->settings.direction = (GpioDirection)k;
                l->seen |= GPIO_KEY_DIRECTION;
        } else if (strcmp(key, "ActiveLow") == 0) {
                if ((k = parse_bool(value)) < 0)
                        return fail(s, s->line, "invalid ActiveLow='%s' (yes or no)", value);
                l->settings.active_low = k;
        } else if (strcmp(key, "Default") == 0) {
                if (parse_uint(value, 1, &u) < 0)
                        return fail(s, s->line, "invalid Default='%s' (0 or 1)", value);
                l->default_value = (int)u;
                l->seen |= GPIO_KEY_DEFAULT;
        } else if (strcmp(key, "Drive") == 0) {
                if ((k = parse_word(value, drives)) < 0)
                        return fail(s, s->line, "invalid Drive='%s' (push-pull, open-drain or open-source)", value);
                l->settings.drive = (GpioDrive)k;
                l->seen |= GPIO_KEY_DRIVE;
        } else if (strcmp(key, "Bias") == 0) {
                if ((k = parse_word(value, biases)) < 0)
                        return fail(s, s->line, "invalid Bias='%s' (as-is, disable, pull-up or pull-down)", value);
                l->settings.bias = (GpioBias)k;
                l->seen |= GPIO_KEY_BIAS;
        } else if (strcmp(key, "Edge") == 0) {
                if ((k = parse_word(value, edges)) < 0)
                        return fail(s, s->line, "invalid Edge='%s' (none, rising, falling or both)", value);
                l->settings.edge = (GpioEdge)k;
                l->seen |= GPIO_KEY_EDGE;
        } else if (strcmp(key, "Debounce") == 0) {
                if (parse_uint(value, GPIO_DEBOUNCE_MAX_MS, &l->debounce_ms) < 0)
                        return fail(s, s->line, "invalid Debounce='%s' (milliseconds, 0..%u)", value,
                                    GPIO_DEBOUNCE_MAX_MS);
                l->seen |= GPIO_KEY_DEBOUNCE;
        } else
                warn(s, "unknown key '%s' in [%s], ignoring", key, section);
        return 1;
}

static int validate(ParseState *s) {
        GpioConfig *c = s->config;

        for (size_t i = 0; i < c->n_lines; i++) {
                GpioLineConfig *l = &c->lines[i];
                bool out = l->settings.direction == GPIO_DIRECTION_OUTPUT;

                if (!(l->seen & GPIO_KEY_CHIP))
                        return fail(s, l->line, "[Line %s] needs Chip=", l->name);
                if (!(l->seen & GPIO_KEY_OFFSET))
                        return fail(s, l->line, "[Line %s] needs Offset=", l->name);
                if (!(l->seen & GPIO_KEY_DIRECTION))
                        return fail(s, l->line, "[Line %s] needs Direction= (input or output)", l->name);
                if (out && (l->seen & (GPIO_KEY_BIAS | GPIO_KEY_EDGE | GPIO_KEY_DEBOUNCE)))
                        return fail(s, l->line, "[Line %s] is an output: Bias=, Edge= and Debounce= are for inputs",
                                    l->name);
                if (!out && (l->seen & (GPIO_KEY_DEFAULT | GPIO_KEY_DRIVE)))
                        return fail(s, l->line, "[Line %s] is an input: Default= and Drive= are for outputs",
                                    l->name);
                if (!out && l->debounce_ms > 0 && l->settings.edge == GPIO_EDGE_NONE)
                        return fail(s, l->line, "[Line %s] has Debounce= but no Edge=", l->name);
                for (size_t k = 0; k < i; k++)
                        if (strcmp(c->lines[k].chip, l->chip) == 0 && c->lines[k].offset == l->offset)
                                return fail(s, l->line, "[Line %s] and [Line %s] both use %s offset %u", l->name,
                                            c->lines[k].name, l->chip, l->offset);
        }
        return 0;
}

/* inih reads line by line through us, into its own buffer of num bytes
 * (INI_MAX_LINE, 200 in Debian's libinih). It would cut a longer line there
 * and parse the rest as a line of its own, so we refuse a line of more than
 * num - 1 bytes (not counting "\n" or "\r\n"): its rest is skipped and
 * inih gets an empty line instead. One call is one line of the file, so
 * s->line and the line inih returns for a syntax error are the file's.
 * (lib/keyfile.c does the same for the daemons; a plugin builds against
 * the SDK only.) */
static char *reader(char *str, int num, void *stream) {
        ParseState *s = stream;
        size_t len;
        int c;

        if (!fgets(str, num, s->f))
                return NULL;
        s->line++;
        len = strlen(str);
        if (len + 1 < (size_t)num || str[len - 1] == '\n')
                return str; /* the whole line; the last one may lack the newline */
        /* The buffer is full: the line fits only if its end comes next. */
        c = getc(s->f);
        if (c == '\r')
                c = getc(s->f);
        if (c == '\n' || c == EOF)
                return str;
        while (c != '\n' && c != EOF)
                c = getc(s->f);
        fail(s, s->line, "line longer than %d bytes", num - 1);
        strcpy(str, "\n");
        return str;
}

void gpio_config_done(GpioConfig *c) {
        for (size_t i = 0; i < c->n_lines; i++)
                free(c->lines[i].chip);
        free(c->lines);
        *c = (GpioConfig){};
}

int gpio_config_parse(FILE *f, const char *path, GpioConfig *ret, char **ret_error, gpio_config_warn_fn warn_fn,
                      void *userdata) {
        GpioConfig c = {};
        ParseState s = { .f = f, .path = path, .config = &c, .warn = warn_fn, .userdata = userdata };
        int r;

        r = ini_parse_stream(reader, &s, handler, &s);
        if (r > 0 && !s.error)
                fail(&s, (unsigned)r, "syntax error");
        else if (r < 0 && !s.error)
                fail(&s, s.line, "cannot parse: %s", r == -2 ? "out of memory" : "read error");
        if (!s.error)
                validate(&s);
        if (s.error) {
                gpio_config_done(&c);
                if (ret_error)
                        *ret_error = s.error;
                else
                        free(s.error);
                return -EINVAL;
        }
        *ret = c;
        return 0;
}
