/* SPDX-License-Identifier: Apache-2.0 */
/* Finding sensors in sysfs and turning what their files say into SI values.
 * Library-like: no logging, no plugin API; errors are negative errno, and
 * what discovery skips is reported through a callback. The sysfs root is a
 * parameter so tests can point it at a generated tree. */
#pragma once

#include <stdbool.h>
#include <stddef.h>

/* What a sensor measures, and so its SI unit. */
typedef enum SensorQuantity {
        SENSOR_TEMPERATURE, /* °C */
        SENSOR_HUMIDITY,    /* % relative humidity */
        SENSOR_PRESSURE,    /* Pa */
        SENSOR_ILLUMINANCE, /* lx */
        SENSOR_VOLTAGE,     /* V */
        SENSOR_CURRENT,     /* A */
        SENSOR_POWER,       /* W */
        SENSOR_ENERGY,      /* J */
        SENSOR_FAN,         /* rpm */
        _SENSOR_QUANTITY_MAX,
} SensorQuantity;

typedef enum SensorSource {
        SENSOR_SOURCE_HWMON,
        SENSOR_SOURCE_THERMAL,
        SENSOR_SOURCE_IIO,
        SENSOR_SOURCE_W1,
        _SENSOR_SOURCE_MAX,
} SensorSource;

typedef enum SensorFormat {
        SENSOR_FORMAT_NUMBER,   /* one decimal number */
        SENSOR_FORMAT_W1_SLAVE, /* w1_therm's two lines, "crc=.. YES" and "t=N" */
} SensorFormat;

/* Variable names are "<source>.<device>.<channel>" or "<source>.<device>",
 * at most this long (the protocol's variable name limit). */
#define SENSOR_NAME_MAX 64

typedef struct SensorSpec {
        char name[SENSOR_NAME_MAX + 1];
        char *path; /* the file to read for a value */
        SensorSource source;
        SensorQuantity quantity;
        SensorFormat format;
        /* value = (raw + offset) * scale / divisor, in the quantity's SI
         * unit; a divisor (not a scale of 0.001) keeps 42500 m°C at exactly
         * 42.5 °C rather than 42.50000000000001 */
        double offset;
        double scale;
        double divisor;
} SensorSpec;

typedef void (*sensors_skip_fn)(void *userdata, const char *path, const char *reason);

/* Find the sensors under root (normally "/sys") of the sources enabled in
 * sources (a bit per SensorSource). The array is sorted by name, names are
 * unique. Free it with sensors_specs_free(). Errors: -ENOMEM; a missing
 * class directory only means no sensors of that kind. */
int sensors_discover(const char *root, unsigned sources, SensorSpec **ret, size_t *ret_n, sensors_skip_fn skip,
                     void *userdata);
void sensors_specs_free(SensorSpec *s, size_t n);

/* Turn the bytes read from a sensor's file (len may be 0, need not be NUL
 * terminated) into its SI value. -EBADMSG for content that is not what the
 * format says, -EIO for a w1_slave reading whose CRC failed, -ERANGE for a
 * value that is not finite. */
int sensors_parse(const SensorSpec *s, const char *buf, size_t len, double *ret);

/* Parse one decimal number with optional surrounding blanks and a trailing
 * newline, as sysfs attributes are written. -EBADMSG otherwise. */
int sensors_parse_number(const char *buf, size_t len, double *ret);

const char *sensors_quantity_name(SensorQuantity q); /* "temperature" */
const char *sensors_quantity_unit(SensorQuantity q); /* "°C" */
const char *sensors_source_name(SensorSource s);     /* "hwmon" */
