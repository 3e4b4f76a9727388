/* SPDX-License-Identifier: Apache-2.0 */
/* Unit tests of the sensors plugin's sysfs module: value parsing (numbers,
 * w1_slave, scale/offset/divisor) and discovery on small generated trees. */
#include <errno.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "plugins/sensors/sensors-sysfs.h"

static void test_numbers(void **state) {
        double v;

        assert_int_equal(sensors_parse_number("42500\n", 6, &v), 0);
        assert_true(v == 42500);
        assert_int_equal(sensors_parse_number("  -12.5 \n", 9, &v), 0);
        assert_true(v == -12.5);
        assert_int_equal(sensors_parse_number("7.8125", 6, &v), 0);
        assert_true(v == 7.8125);
        assert_int_equal(sensors_parse_number("", 0, &v), -EBADMSG);
        assert_int_equal(sensors_parse_number("\n", 1, &v), -EBADMSG);
        assert_int_equal(sensors_parse_number("12abc\n", 6, &v), -EBADMSG);
        assert_int_equal(sensors_parse_number("1 2\n", 4, &v), -EBADMSG);
        assert_int_equal(sensors_parse_number("12\0003", 4, &v), -EBADMSG);
        assert_int_equal(sensors_parse_number("inf", 3, &v), -ERANGE);
        assert_int_equal(sensors_parse_number("nan", 3, &v), -ERANGE);
        assert_int_equal(sensors_parse_number("1e999", 5, &v), -EBADMSG);
        {
                char big[100];
                memset(big, '1', sizeof(big));
                assert_int_equal(sensors_parse_number(big, sizeof(big), &v), -EBADMSG);
        }
}

static void test_conversion(void **state) {
        SensorSpec hwmon = { .format = SENSOR_FORMAT_NUMBER, .scale = 1, .divisor = 1000 };
        SensorSpec iio = { .format = SENSOR_FORMAT_NUMBER, .offset = -100, .scale = 7.8125, .divisor = 1000 };
        SensorSpec pressure = { .format = SENSOR_FORMAT_NUMBER, .scale = 1000, .divisor = 1 };
        double v;

        assert_int_equal(sensors_parse(&hwmon, "42500\n", 6, &v), 0);
        assert_true(v == 42.5); /* exactly, thanks to the divisor */
        assert_int_equal(sensors_parse(&iio, "2900", 4, &v), 0);
        assert_true(v == 21.875);
        assert_int_equal(sensors_parse(&pressure, "101.325\n", 8, &v), 0);
        assert_true(fabs(v - 101325) < 1e-6);
        assert_int_equal(sensors_parse(&pressure, "1e306", 5, &v), -ERANGE);
}

static void test_w1_slave(void **state) {
        static const char good[] = "72 01 4b 46 7f ff 0e 10 57 : crc=57 YES\n72 01 4b 46 7f ff 0e 10 57 t=23125\n";
        static const char crc[] = "72 01 4b 46 7f ff 0e 10 57 : crc=00 NO\n72 01 4b 46 7f ff 0e 10 57 t=85000\n";
        static const char no_t[] = "72 01 4b 46 7f ff 0e 10 57 : crc=57 YES\n72 01 4b 46 7f ff 0e 10 57\n";
        static const char one_line[] = "72 01 4b 46 7f ff 0e 10 57 : crc=57 YES";
        static const char negative[] = "ff ff : crc=aa YES\nff ff t=-10062\n";
        SensorSpec w1 = { .format = SENSOR_FORMAT_W1_SLAVE, .scale = 1, .divisor = 1000 };
        double v;

        assert_int_equal(sensors_parse(&w1, good, strlen(good), &v), 0);
        assert_true(v == 23.125);
        assert_int_equal(sensors_parse(&w1, negative, strlen(negative), &v), 0);
        assert_true(v == -10.062);
        assert_int_equal(sensors_parse(&w1, crc, strlen(crc), &v), -EIO);
        assert_int_equal(sensors_parse(&w1, no_t, strlen(no_t), &v), -EBADMSG);
        assert_int_equal(sensors_parse(&w1, one_line, strlen(one_line), &v), -EBADMSG);
        assert_int_equal(sensors_parse(&w1, "", 0, &v), -EBADMSG);
        assert_int_equal(sensors_parse(&w1, "garbage\nmore garbage\n", 21, &v), -EBADMSG);
}

static char root[64];

static void put(const char *rel, const char *content) {
        char path[512], *slash;
        FILE *f;

        snprintf(path, sizeof(path), "%s/%s", root, rel);
        for (slash = strchr(path + strlen(root) + 1, '/'); slash; slash = strchr(slash + 1, '/')) {
                *slash = '\0';
                (void)mkdir(path, 0755);
                *slash = '/';
        }
        f = fopen(path, "w");
        assert_non_null(f);
        fputs(content, f);
        fclose(f);
}

static int n_skipped;
static void on_skip(void *userdata, const char *path, const char *reason) {
        n_skipped++;
}

static int setup_tree(void **state) {
        snprintf(root, sizeof(root), "/tmp/tether-test-sensors-XXXXXX");
        assert_non_null(mkdtemp(root));
        n_skipped = 0;
        return 0;
}

static int teardown_tree(void **state) {
        char cmd[128];

        snprintf(cmd, sizeof(cmd), "rm -rf '%s'", root);
        return system(cmd) == 0 ? 0 : -1;
}

static void test_discovery(void **state) {
        SensorSpec *s = NULL;
        size_t n = 0;

        put("class/hwmon/hwmon10/name", "b\n");
        put("class/hwmon/hwmon10/temp1_input", "1000\n");
        put("class/hwmon/hwmon2/name", "b\n");
        put("class/hwmon/hwmon2/temp1_input", "2000\n");
        put("class/hwmon/hwmon2/temp_input", "2000\n");  /* no index: not a channel */
        put("class/hwmon/hwmon2/temp1x_input", "1\n");   /* not digits only */
        put("class/hwmon/hwmon3/temp1_input", "1\n");    /* no name: skipped */
        put("class/hwmon/hwmon4/name", "a chip/with:odd chars\n");
        put("class/hwmon/hwmon4/fan2_input", "900\n");
        put("class/hwmon/hwmon5/name", "a-chip-name-so-long-that-the-variable-name-goes-over-sixty-four\n");
        put("class/hwmon/hwmon5/temp1_input", "1\n");
        put("class/thermal/thermal_zone0/type", "soc\n");
        put("class/thermal/thermal_zone0/temp", "1\n");
        put("class/thermal/thermal_zone1/type", "soc\n");
        put("class/thermal/thermal_zone1/temp", "2\n");
        put("class/thermal/thermal_zone2/type", "notemp\n");
        put("bus/iio/devices/iio:device0/name", "mlx90614\n");
        put("bus/iio/devices/iio:device0/in_temp_ambient_raw", "100\n");
        put("bus/iio/devices/iio:device0/in_temp_object_raw", "200\n");
        put("bus/iio/devices/iio:device0/in_temp_scale", "20\n");   /* shared by type */
        put("bus/iio/devices/iio:device0/in_temp_object_offset", "-10\n");
        put("bus/iio/devices/iio:device0/in_voltage0_raw", "5\n");  /* not a sensor we offer */
        put("bus/iio/devices/iio:device0/in_tempX_raw", "5\n");     /* not a channel name */
        put("bus/w1/devices/10-000801234567/w1_slave", "x : crc=1 YES\nx t=1\n");
        put("bus/w1/devices/28-000801234567/notemp", "1\n");
        put("bus/w1/devices/01-000801234567/id", "1\n");           /* not a thermometer */

        assert_int_equal(sensors_discover(root, ~0u, &s, &n, on_skip, NULL), 0);
        {
                static const char *const want[] = {
                        "hwmon.a_chip_with_odd_chars.fan2", "hwmon.b.temp1", "hwmon.b_1.temp1",
                        "iio.mlx90614.temp_ambient", "iio.mlx90614.temp_object", "thermal.soc", "thermal.soc_1",
                        "w1.10-000801234567",
                };
                for (size_t i = 0; i < n; i++)
                        printf("# %s %s\n", s[i].name, s[i].path);
                assert_int_equal(n, sizeof(want) / sizeof(want[0]));
                for (size_t i = 0; i < n; i++)
                        assert_string_equal(s[i].name, want[i]);
        }
        /* hwmon2 sorts before hwmon10, so it keeps the plain name. */
        assert_non_null(strstr(s[1].path, "/hwmon2/"));
        /* Per-channel offset over none, scale shared by type. */
        assert_true(s[3].scale == 20 && s[3].offset == 0 && s[3].divisor == 1000);
        assert_true(s[4].scale == 20 && s[4].offset == -10);
        assert_int_equal(s[7].format, SENSOR_FORMAT_W1_SLAVE);
        /* hwmon3 (no name), hwmon5 (name too long), thermal_zone2 (no temp),
         * 28-... (no value file) */
        assert_int_equal(n_skipped, 4);
        sensors_specs_free(s, n);

        assert_int_equal(sensors_discover(root, 1u << SENSOR_SOURCE_THERMAL, &s, &n, NULL, NULL), 0);
        assert_int_equal(n, 2);
        sensors_specs_free(s, n);
}

static void test_no_tree(void **state) {
        SensorSpec *s = NULL;
        size_t n = 99;

        assert_int_equal(sensors_discover("/nonexistent/sysfs", ~0u, &s, &n, NULL, NULL), 0);
        assert_int_equal(n, 0);
        sensors_specs_free(s, n);
}

int main(int argc, char **argv) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_numbers),
                cmocka_unit_test(test_conversion),
                cmocka_unit_test(test_w1_slave),
                cmocka_unit_test_setup_teardown(test_discovery, setup_tree, teardown_tree),
                cmocka_unit_test(test_no_tree),
        };
        /* One test, or those a glob matches: test-foo NAME (HACKING.md). */
        if (argc > 1)
                cmocka_set_test_filter(argv[1]);
        return cmocka_run_group_tests(tests, NULL, NULL);
}
