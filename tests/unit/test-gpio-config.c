/* SPDX-License-Identifier: Apache-2.0 */
/* Unit tests of the gpio plugin's lines-file parser (plugins/gpio/gpio-config.c). */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "plugins/gpio/gpio-config.h"

static int n_warnings;
static char last_warning[256];

static void on_warn(void *userdata, const char *message) {
        n_warnings++;
        snprintf(last_warning, sizeof(last_warning), "%s", message);
}

/* Parse text; on failure return the error in *ret_error (malloc'd). */
static int parse(const char *text, GpioConfig *ret, char **ret_error) {
        FILE *f = fmemopen((void *)text, strlen(text), "r");
        int r;

        assert_non_null(f);
        n_warnings = 0;
        r = gpio_config_parse(f, "lines.conf", ret, ret_error, on_warn, NULL);
        fclose(f);
        return r;
}

static void test_good(void **state) {
        static const char text[] = "# comment\n"
                                   "[Line relay1]\n"
                                   "Chip=gpiochip0\n"
                                   "Offset=17\n"
                                   "Direction=output\n"
                                   "ActiveLow=yes\n"
                                   "Default=1\n"
                                   "Drive=open-drain\n"
                                   "\n"
                                   "[Line button]\n"
                                   "Chip=pinctrl-bcm2711\n"
                                   "Offset=27\n"
                                   "Direction=input\n"
                                   "Bias=pull-up\n"
                                   "Edge=both\n"
                                   "Debounce=20\n"
                                   "Colour=red\n";
        GpioConfig c = {};
        char *error = NULL;

        assert_int_equal(parse(text, &c, &error), 0);
        assert_null(error);
        assert_int_equal(c.n_lines, 2);
        assert_string_equal(c.lines[0].name, "relay1");
        assert_string_equal(c.lines[0].chip, "gpiochip0");
        assert_int_equal(c.lines[0].offset, 17);
        assert_int_equal(c.lines[0].settings.direction, GPIO_DIRECTION_OUTPUT);
        assert_true(c.lines[0].settings.active_low);
        assert_int_equal(c.lines[0].default_value, 1);
        assert_int_equal(c.lines[0].settings.drive, GPIO_DRIVE_OPEN_DRAIN);
        assert_int_equal(c.lines[1].settings.direction, GPIO_DIRECTION_INPUT);
        assert_int_equal(c.lines[1].settings.bias, GPIO_BIAS_PULL_UP);
        assert_int_equal(c.lines[1].settings.edge, GPIO_EDGE_BOTH);
        assert_int_equal(c.lines[1].debounce_ms, 20);
        /* The unknown key is a warning with FILE:LINE, not an error. */
        assert_int_equal(n_warnings, 1);
        assert_non_null(strstr(last_warning, "lines.conf:17: unknown key 'Colour'"));
        gpio_config_done(&c);
}

static void test_errors(void **state) {
        static const struct {
                const char *text;
                const char *error;
        } cases[] = {
                { "[Line a]\nChip=c\nOffset=banana\nDirection=input\n", "lines.conf:3: invalid Offset='banana'" },
                { "[Line a]\nChip=c\nOffset=70000\nDirection=input\n", "invalid Offset='70000'" },
                { "[Line a]\nChip=c\nOffset=-1\nDirection=input\n", "invalid Offset='-1'" },
                { "[Line a]\nChip=c\nOffset=1\nDirection=sideways\n", "invalid Direction='sideways'" },
                { "[Line a]\nChip=c\nOffset=1\nDirection=output\nDefault=2\n", "invalid Default='2'" },
                { "[Line a]\nChip=c\nOffset=1\nDirection=input\nActiveLow=perhaps\n", "invalid ActiveLow" },
                { "[Line a]\nChip=c\nOffset=1\nDirection=input\nBias=pull-sideways\n", "invalid Bias" },
                { "[Line a]\nChip=c\nOffset=1\nDirection=input\nEdge=up\n", "invalid Edge='up'" },
                { "[Line a]\nChip=c\nOffset=1\nDirection=input\nEdge=both\nDebounce=10001\n", "invalid Debounce" },
                { "[Line a]\nChip=\nOffset=1\nDirection=input\n", "Chip= must not be empty" },
                { "[Line a b]\nChip=c\n", "invalid line name 'a b'" },
                { "[Line a]\nOffset=1\nDirection=input\n", "[Line a] needs Chip=" },
                { "[Line a]\nChip=c\nDirection=input\n", "[Line a] needs Offset=" },
                { "[Line a]\nChip=c\nOffset=1\n", "[Line a] needs Direction=" },
                { "[Line a]\nChip=c\nOffset=1\nDirection=output\nEdge=both\n", "is an output" },
                { "[Line a]\nChip=c\nOffset=1\nDirection=input\nDefault=1\n", "is an input" },
                { "[Line a]\nChip=c\nOffset=1\nDirection=input\nDebounce=5\n", "has Debounce= but no Edge=" },
                { "[Line a]\nChip=c\nOffset=1\nDirection=input\n[Line b]\nChip=c\nOffset=1\nDirection=output\n",
                  "[Line b] and [Line a] both use c offset 1" },
                { "[Line a]\nthis is not a key\n", "lines.conf:2: syntax error" },
        };

        for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
                GpioConfig c = {};
                char *error = NULL;

                assert_int_equal(parse(cases[i].text, &c, &error), -EINVAL);
                assert_non_null(error);
                if (!strstr(error, cases[i].error))
                        fail_msg("case %zu: '%s' does not contain '%s'", i, error, cases[i].error);
                assert_null(c.lines);
                free(error);
        }
}

/* Debian's libinih reads a line into 200 bytes (INI_MAX_LINE): 199 and the
 * line end fit. A longer line is refused, not cut with its rest read as a
 * line of its own. */
#define LONGEST_LINE 199

/* "Chip=vvv..." of len bytes, in buf. */
static const char *chip_line(char *buf, size_t len) {
        memset(buf, 'v', len);
        memcpy(buf, "Chip=", 5);
        buf[len] = '\0';
        return buf;
}

static void expect_error(const char *text, const char *needle) {
        GpioConfig c = {};
        char *error = NULL;

        assert_int_equal(parse(text, &c, &error), -EINVAL);
        assert_non_null(error);
        if (!strstr(error, needle))
                fail_msg("'%s' does not contain '%s'", error, needle);
        assert_null(c.lines);
        free(error);
}

static void test_long_lines(void **state) {
        static const char *const ends[] = { "\n", "\r\n", "" };
        char longest[LONGEST_LINE + 1], over[LONGEST_LINE + 2], cut[LONGEST_LINE + 16], text[1024];

        chip_line(longest, LONGEST_LINE);
        chip_line(over, LONGEST_LINE + 1);
        /* The longest line, ending in "\n", "\r\n" or the end of the file,
         * is read whole; one byte more is an error on its line. */
        for (size_t i = 0; i < sizeof(ends) / sizeof(ends[0]); i++) {
                GpioConfig c = {};
                char *error = NULL;

                snprintf(text, sizeof(text), "[Line a]\nOffset=1\nDirection=input\n%s%s", longest, ends[i]);
                assert_int_equal(parse(text, &c, &error), 0);
                assert_null(error);
                assert_int_equal(c.n_lines, 1);
                assert_string_equal(c.lines[0].chip, longest + strlen("Chip="));
                gpio_config_done(&c);

                snprintf(text, sizeof(text), "[Line a]\nOffset=1\nDirection=input\n%s%s", over, ends[i]);
                expect_error(text, "lines.conf:4: line longer than 199 bytes");
        }
        /* Lines after a long one keep their numbers. */
        snprintf(text, sizeof(text), "[Line a]\n%s\n%s\r\nOffset=banana\nDirection=input\n", longest, longest);
        expect_error(text, "lines.conf:4: invalid Offset='banana'");
        /* Not a cut Chip= with its rest read as "Offset=1". */
        snprintf(cut, sizeof(cut), "%sOffset=1", longest);
        snprintf(text, sizeof(text), "[Line a]\n%s\nDirection=input\n", cut);
        expect_error(text, "lines.conf:2: line longer than 199 bytes");
}

static void test_names(void **state) {
        char long_name[GPIO_LINE_NAME_MAX + 2];

        assert_int_equal(gpio_line_name_check("relay_1-a"), 0);
        assert_int_equal(gpio_line_name_check(""), -EINVAL);
        assert_int_equal(gpio_line_name_check("a.b"), -EINVAL);
        assert_int_equal(gpio_line_name_check("a/b"), -EINVAL);
        memset(long_name, 'x', sizeof(long_name) - 1);
        long_name[sizeof(long_name) - 1] = '\0';
        assert_int_equal(gpio_line_name_check(long_name), -EINVAL);
        long_name[GPIO_LINE_NAME_MAX] = '\0';
        assert_int_equal(gpio_line_name_check(long_name), 0);
}

static void test_other_sections_and_empty(void **state) {
        GpioConfig c = {};
        char *error = NULL;

        assert_int_equal(parse("[Chip gpiochip0]\nLabel=x\n", &c, &error), 0);
        assert_int_equal(c.n_lines, 0);
        assert_int_equal(n_warnings, 1);
        gpio_config_done(&c);
        assert_int_equal(parse("", &c, &error), 0);
        assert_int_equal(c.n_lines, 0);
        gpio_config_done(&c);
}

int main(int argc, char **argv) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_good),
                cmocka_unit_test(test_errors),
                cmocka_unit_test(test_long_lines),
                cmocka_unit_test(test_names),
                cmocka_unit_test(test_other_sections_and_empty),
        };
        /* One test, or those a glob matches: test-foo NAME (HACKING.md). */
        if (argc > 1)
                cmocka_set_test_filter(argv[1]);
        return cmocka_run_group_tests(tests, NULL, NULL);
}
