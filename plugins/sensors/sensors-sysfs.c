/* SPDX-License-Identifier: Apache-2.0 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "sensors-sysfs.h"

#define PATH_SIZE 4096

/* snprintf into a PATH_SIZE buffer; a path that does not fit is refused
 * (-ENAMETOOLONG) rather than silently cut, and leaves buf empty. */
__attribute__((format(printf, 2, 3))) static int pathf(char *buf, const char *fmt, ...) {
        va_list ap;
        int n;

        va_start(ap, fmt);
        n = vsnprintf(buf, PATH_SIZE, fmt, ap);
        va_end(ap);
        if (n < 0 || n >= PATH_SIZE) {
                buf[0] = '\0';
                return -ENAMETOOLONG;
        }
        return 0;
}

typedef struct Collect {
        SensorSpec *specs;
        size_t n;
        char **devices; /* device names handed out, for uniqueness */
        size_t n_devices;
        sensors_skip_fn skip;
        void *userdata;
} Collect;

static const struct {
        const char *name;
        const char *unit;
} quantities[_SENSOR_QUANTITY_MAX] = {
        [SENSOR_TEMPERATURE] = { "temperature", "°C" }, [SENSOR_HUMIDITY] = { "humidity", "%" },
        [SENSOR_PRESSURE] = { "pressure", "Pa" },       [SENSOR_ILLUMINANCE] = { "illuminance", "lx" },
        [SENSOR_VOLTAGE] = { "voltage", "V" },          [SENSOR_CURRENT] = { "current", "A" },
        [SENSOR_POWER] = { "power", "W" },              [SENSOR_ENERGY] = { "energy", "J" },
        [SENSOR_FAN] = { "fan", "rpm" },
};

const char *sensors_quantity_name(SensorQuantity q) {
        return q < _SENSOR_QUANTITY_MAX ? quantities[q].name : NULL;
}

const char *sensors_quantity_unit(SensorQuantity q) {
        return q < _SENSOR_QUANTITY_MAX ? quantities[q].unit : NULL;
}

const char *sensors_source_name(SensorSource s) {
        static const char *const names[_SENSOR_SOURCE_MAX] = { "hwmon", "thermal", "iio", "w1" };
        return s < _SENSOR_SOURCE_MAX ? names[s] : NULL;
}

/* --- parsing ---------------------------------------------------------------- */

int sensors_parse_number(const char *buf, size_t len, double *ret) {
        char tmp[64], *end;
        double v;

        while (len > 0 && (buf[len - 1] == '\n' || buf[len - 1] == ' ' || buf[len - 1] == '\t'))
                len--;
        while (len > 0 && (*buf == ' ' || *buf == '\t')) {
                buf++;
                len--;
        }
        if (len == 0 || len >= sizeof(tmp))
                return -EBADMSG;
        memcpy(tmp, buf, len);
        tmp[len] = '\0';
        if (strlen(tmp) != len) /* a NUL inside */
                return -EBADMSG;
        errno = 0;
        v = strtod(tmp, &end);
        if (end == tmp || *end || errno == ERANGE)
                return -EBADMSG;
        if (!isfinite(v))
                return -ERANGE;
        *ret = v;
        return 0;
}

/* w1_therm's w1_slave:
 *   72 01 4b 46 7f ff 0e 10 57 : crc=57 YES
 *   72 01 4b 46 7f ff 0e 10 57 t=23125          */
static int parse_w1_slave(const char *buf, size_t len, double *ret) {
        const char *nl = memchr(buf, '\n', len), *t;
        size_t first = nl ? (size_t)(nl - buf) : len;
        char line[128];

        if (!nl || first >= sizeof(line))
                return -EBADMSG;
        memcpy(line, buf, first);
        line[first] = '\0';
        if (!strstr(line, "crc="))
                return -EBADMSG;
        if (!strstr(line, " YES"))
                return -EIO; /* the bus garbled the scratchpad: no reading */
        buf = nl + 1;
        len -= first + 1;
        for (t = buf; t + 2 <= buf + len; t++)
                if (t[0] == 't' && t[1] == '=')
                        return sensors_parse_number(t + 2, len - (size_t)(t + 2 - buf), ret);
        return -EBADMSG;
}

int sensors_parse(const SensorSpec *s, const char *buf, size_t len, double *ret) {
        double raw, v;
        int r;

        r = s->format == SENSOR_FORMAT_W1_SLAVE ? parse_w1_slave(buf, len, &raw)
                                                : sensors_parse_number(buf, len, &raw);
        if (r < 0)
                return r;
        v = (raw + s->offset) * s->scale / s->divisor;
        if (!isfinite(v))
                return -ERANGE;
        *ret = v;
        return 0;
}

/* --- discovery -------------------------------------------------------------- */

/* Read a small attribute file into buf (NUL-terminated, trailing newline
 * removed). */
static int read_attr(const char *path, char *buf, size_t size) {
        ssize_t n;
        int fd;

        fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
        if (fd < 0)
                return -errno;
        n = read(fd, buf, size - 1);
        close(fd);
        if (n < 0)
                return -errno;
        buf[n] = '\0';
        while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == ' '))
                buf[--n] = '\0';
        return (int)n;
}

static bool exists(const char *path) {
        return access(path, F_OK) == 0;
}

/* [A-Za-z0-9_-] only; anything else becomes '_'. */
static void sanitize(char *s) {
        for (; *s; s++)
                if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9') ||
                      *s == '_' || *s == '-'))
                        *s = '_';
}

static void skip(Collect *c, const char *path, const char *reason) {
        if (c->skip)
                c->skip(c->userdata, path, reason);
}

/* "base", or "base_1", "base_2"... if a device of this source already
 * took it: names stay unique and the first device keeps the plain name. */
static int unique_device(Collect *c, SensorSource src, const char *base, char *ret, size_t size) {
        char key[160], **n;

        for (unsigned k = 0;; k++) {
                bool taken = false;

                if (k == 0)
                        snprintf(ret, size, "%s", base);
                else
                        snprintf(ret, size, "%s_%u", base, k);
                snprintf(key, sizeof(key), "%d/%s", (int)src, ret);
                for (size_t i = 0; i < c->n_devices && !taken; i++)
                        taken = strcmp(c->devices[i], key) == 0;
                if (!taken)
                        break;
        }
        n = realloc(c->devices, (c->n_devices + 1) * sizeof(char *));
        if (!n)
                return -ENOMEM;
        c->devices = n;
        c->devices[c->n_devices] = strdup(key);
        if (!c->devices[c->n_devices])
                return -ENOMEM;
        c->n_devices++;
        return 0;
}

static int add(Collect *c, const char *name, const char *path, SensorSource src, SensorQuantity q,
               SensorFormat fmt, double offset, double scale, double divisor) {
        SensorSpec *n;

        if (strlen(name) > SENSOR_NAME_MAX) {
                skip(c, path, "its variable name would be longer than 64 bytes");
                return 0;
        }
        n = realloc(c->specs, (c->n + 1) * sizeof(*n));
        if (!n)
                return -ENOMEM;
        c->specs = n;
        n = &c->specs[c->n];
        *n = (SensorSpec){ .path = strdup(path), .source = src, .quantity = q, .format = fmt, .offset = offset,
                           .scale = scale, .divisor = divisor };
        if (!n->path)
                return -ENOMEM;
        snprintf(n->name, sizeof(n->name), "%s", name);
        c->n++;
        return 1;
}

/* Entries of dir whose names start with prefix, sorted naturally
 * ("hwmon2" before "hwmon10"). */
static int list_dir(const char *dir, const char *prefix, char ***ret, size_t *ret_n) {
        struct dirent **list = NULL;
        char **out = NULL;
        size_t n = 0;
        int k;

        k = scandir(dir, &list, NULL, versionsort);
        if (k < 0)
                return errno == ENOENT || errno == ENOTDIR ? 0 : -errno;
        for (int i = 0; i < k; i++) {
                if (list[i]->d_name[0] != '.' && strncmp(list[i]->d_name, prefix, strlen(prefix)) == 0) {
                        char **m = realloc(out, (n + 1) * sizeof(char *));
                        if (m) {
                                out = m;
                                out[n] = strdup(list[i]->d_name);
                                if (out[n])
                                        n++;
                        }
                }
                free(list[i]);
        }
        free(list);
        *ret = out;
        *ret_n = n;
        return 0;
}

static void strv_free_n(char **v, size_t n) {
        for (size_t i = 0; i < n; i++)
                free(v[i]);
        free(v);
}

static const struct {
        const char *prefix;
        SensorQuantity q;
        double divisor;
} hwmon_types[] = {
        /* Documentation/hwmon/sysfs-interface.rst units */
        { "temp", SENSOR_TEMPERATURE, 1e3 },  /* m°C */
        { "in", SENSOR_VOLTAGE, 1e3 },        /* mV */
        { "curr", SENSOR_CURRENT, 1e3 },      /* mA */
        { "power", SENSOR_POWER, 1e6 },       /* µW */
        { "energy", SENSOR_ENERGY, 1e6 },     /* µJ */
        { "humidity", SENSOR_HUMIDITY, 1e3 }, /* m%RH */
        { "fan", SENSOR_FAN, 1 },             /* rpm */
};

static int discover_hwmon(Collect *c, const char *root) {
        char cls[PATH_SIZE], **devs = NULL;
        size_t n_devs = 0;
        int r;

        pathf(cls, "%s/class/hwmon", root);
        r = list_dir(cls, "hwmon", &devs, &n_devs);
        for (size_t i = 0; r >= 0 && i < n_devs; i++) {
                char dir[PATH_SIZE], path[PATH_SIZE], chip[64], device[80], **files = NULL;
                size_t n_files = 0;

                pathf(dir, "%s/%s", cls, devs[i]);
                /* Older drivers keep their attributes in device/. */
                pathf(path, "%s/name", dir);
                if (!exists(path)) {
                        pathf(dir, "%s/%s/device", cls, devs[i]);
                        pathf(path, "%s/name", dir);
                }
                if (read_attr(path, chip, sizeof(chip)) <= 0) {
                        skip(c, dir, "no readable 'name'");
                        continue;
                }
                sanitize(chip);
                r = unique_device(c, SENSOR_SOURCE_HWMON, chip, device, sizeof(device));
                if (r < 0)
                        break;
                r = list_dir(dir, "", &files, &n_files);
                for (size_t f = 0; r >= 0 && f < n_files; f++) {
                        const char *name = files[f];
                        size_t len = strlen(name);

                        if (len < 7 || strcmp(name + len - 6, "_input") != 0)
                                continue;
                        for (size_t t = 0; t < sizeof(hwmon_types) / sizeof(hwmon_types[0]); t++) {
                                size_t pl = strlen(hwmon_types[t].prefix);
                                char var[160], channel[64];

                                /* "temp1_input": the prefix, then digits only */
                                if (strncmp(name, hwmon_types[t].prefix, pl) != 0 || len - 6 <= pl ||
                                    strspn(name + pl, "0123456789") != len - 6 - pl)
                                        continue;
                                snprintf(channel, sizeof(channel), "%.*s", (int)(len - 6), name);
                                snprintf(var, sizeof(var), "hwmon.%s.%s", device, channel);
                                pathf(path, "%s/%s", dir, name);
                                r = add(c, var, path, SENSOR_SOURCE_HWMON, hwmon_types[t].q, SENSOR_FORMAT_NUMBER,
                                        0, 1, hwmon_types[t].divisor);
                                break;
                        }
                }
                strv_free_n(files, n_files);
        }
        strv_free_n(devs, n_devs);
        return r < 0 ? r : 0;
}

static int discover_thermal(Collect *c, const char *root) {
        char cls[PATH_SIZE], **zones = NULL;
        size_t n = 0;
        int r;

        pathf(cls, "%s/class/thermal", root);
        r = list_dir(cls, "thermal_zone", &zones, &n);
        for (size_t i = 0; r >= 0 && i < n; i++) {
                char path[PATH_SIZE], type[64], device[80], var[160];

                pathf(path, "%s/%s/type", cls, zones[i]);
                if (read_attr(path, type, sizeof(type)) <= 0)
                        snprintf(type, sizeof(type), "%s", zones[i]);
                sanitize(type);
                pathf(path, "%s/%s/temp", cls, zones[i]);
                if (!exists(path)) {
                        skip(c, path, "the zone has no 'temp'");
                        continue;
                }
                r = unique_device(c, SENSOR_SOURCE_THERMAL, type, device, sizeof(device));
                if (r < 0)
                        break;
                snprintf(var, sizeof(var), "thermal.%s", device);
                r = add(c, var, path, SENSOR_SOURCE_THERMAL, SENSOR_TEMPERATURE, SENSOR_FORMAT_NUMBER, 0, 1, 1e3);
        }
        strv_free_n(zones, n);
        return r < 0 ? r : 0;
}

static const struct {
        const char *type;
        SensorQuantity q;
        double mult, divisor; /* from the IIO ABI's unit (after scale) to SI */
} iio_types[] = {
        /* Documentation/ABI/testing/sysfs-bus-iio */
        { "temp", SENSOR_TEMPERATURE, 1, 1e3 },          /* m°C */
        { "humidityrelative", SENSOR_HUMIDITY, 1, 1e3 }, /* m% */
        { "pressure", SENSOR_PRESSURE, 1e3, 1 },         /* kPa */
        { "illuminance", SENSOR_ILLUMINANCE, 1, 1 },     /* lux */
};

/* scale/offset for channel chan of type: in_<chan>_<what>, else the one
 * shared by type, in_<type>_<what>, else fallback. */
static int iio_factor(const char *dir, const char *chan, const char *type, const char *what, double fallback,
                      double *ret) {
        char path[PATH_SIZE], buf[64];
        int k;

        pathf(path, "%s/in_%s_%s", dir, chan, what);
        k = read_attr(path, buf, sizeof(buf));
        if (k == -ENOENT) {
                pathf(path, "%s/in_%s_%s", dir, type, what);
                k = read_attr(path, buf, sizeof(buf));
        }
        if (k == -ENOENT) {
                *ret = fallback;
                return 0;
        }
        if (k < 0)
                return k;
        return sensors_parse_number(buf, (size_t)k, ret);
}

static int discover_iio(Collect *c, const char *root) {
        char bus[PATH_SIZE], **devs = NULL;
        size_t n_devs = 0;
        int r;

        pathf(bus, "%s/bus/iio/devices", root);
        r = list_dir(bus, "iio:device", &devs, &n_devs);
        for (size_t i = 0; r >= 0 && i < n_devs; i++) {
                char dir[PATH_SIZE], path[PATH_SIZE], name[64], device[80], **files = NULL;
                size_t n_files = 0;

                pathf(dir, "%s/%s", bus, devs[i]);
                pathf(path, "%s/name", dir);
                if (read_attr(path, name, sizeof(name)) <= 0)
                        snprintf(name, sizeof(name), "%s", devs[i] + strlen("iio:"));
                sanitize(name);
                r = unique_device(c, SENSOR_SOURCE_IIO, name, device, sizeof(device));
                if (r < 0)
                        break;
                r = list_dir(dir, "in_", &files, &n_files);
                for (size_t f = 0; r >= 0 && f < n_files; f++) {
                        const char *file = files[f];
                        size_t len = strlen(file), clen;
                        bool processed;
                        char chan[64], var[160];
                        double scale = 1, offset = 0;

                        if (len > 9 && strcmp(file + len - 6, "_input") == 0) {
                                processed = true;
                                clen = len - 3 - 6;
                        } else if (len > 7 && strcmp(file + len - 4, "_raw") == 0) {
                                processed = false;
                                clen = len - 3 - 4;
                        } else
                                continue;
                        if (clen >= sizeof(chan))
                                continue;
                        snprintf(chan, sizeof(chan), "%.*s", (int)clen, file + 3);
                        for (size_t t = 0; t < sizeof(iio_types) / sizeof(iio_types[0]); t++) {
                                size_t tl = strlen(iio_types[t].type);

                                /* "temp", "temp0", "temp_ambient", "pressure1" */
                                if (strncmp(chan, iio_types[t].type, tl) != 0 ||
                                    (chan[tl] && chan[tl] != '_' && (chan[tl] < '0' || chan[tl] > '9')))
                                        continue;
                                if (!processed) {
                                        /* A processed value, when offered, wins. */
                                        pathf(path, "%s/in_%s_input", dir, chan);
                                        if (exists(path))
                                                break;
                                        if (iio_factor(dir, chan, iio_types[t].type, "scale", 1, &scale) < 0 ||
                                            iio_factor(dir, chan, iio_types[t].type, "offset", 0, &offset) < 0) {
                                                pathf(path, "%s/%s", dir, file);
                                                skip(c, path, "its scale or offset is unreadable");
                                                break;
                                        }
                                }
                                snprintf(var, sizeof(var), "iio.%s.%s", device, chan);
                                pathf(path, "%s/%s", dir, file);
                                r = add(c, var, path, SENSOR_SOURCE_IIO, iio_types[t].q, SENSOR_FORMAT_NUMBER, offset,
                                        scale * iio_types[t].mult, iio_types[t].divisor);
                                break;
                        }
                }
                strv_free_n(files, n_files);
        }
        strv_free_n(devs, n_devs);
        return r < 0 ? r : 0;
}

static int discover_w1(Collect *c, const char *root) {
        /* w1_therm families: DS18S20, DS1822, DS18B20, DS1825, DS28EA00 */
        static const char *const families[] = { "10-", "22-", "28-", "3b-", "42-" };
        char bus[PATH_SIZE], **devs = NULL;
        size_t n = 0;
        int r;

        pathf(bus, "%s/bus/w1/devices", root);
        r = list_dir(bus, "", &devs, &n);
        for (size_t i = 0; r >= 0 && i < n; i++) {
                char path[PATH_SIZE], id[64], var[160];
                SensorFormat fmt = SENSOR_FORMAT_NUMBER;
                bool known = false;

                for (size_t f = 0; f < sizeof(families) / sizeof(families[0]); f++)
                        known = known || strncmp(devs[i], families[f], 3) == 0;
                if (!known)
                        continue;
                /* Newer kernels have "temperature" (m°C); older only w1_slave. */
                pathf(path, "%s/%s/temperature", bus, devs[i]);
                if (!exists(path)) {
                        pathf(path, "%s/%s/w1_slave", bus, devs[i]);
                        fmt = SENSOR_FORMAT_W1_SLAVE;
                        if (!exists(path)) {
                                skip(c, path, "neither 'temperature' nor 'w1_slave'");
                                continue;
                        }
                }
                snprintf(id, sizeof(id), "%s", devs[i]);
                sanitize(id);
                snprintf(var, sizeof(var), "w1.%s", id);
                r = add(c, var, path, SENSOR_SOURCE_W1, SENSOR_TEMPERATURE, fmt, 0, 1, 1e3);
        }
        strv_free_n(devs, n);
        return r < 0 ? r : 0;
}

void sensors_specs_free(SensorSpec *s, size_t n) {
        for (size_t i = 0; s && i < n; i++)
                free(s[i].path);
        free(s);
}

static int cmp_spec(const void *a, const void *b) {
        return strcmp(((const SensorSpec *)a)->name, ((const SensorSpec *)b)->name);
}

int sensors_discover(const char *root, unsigned sources, SensorSpec **ret, size_t *ret_n, sensors_skip_fn skip_fn,
                     void *userdata) {
        Collect c = { .skip = skip_fn, .userdata = userdata };
        int r = 0;

        if (sources & (1u << SENSOR_SOURCE_HWMON))
                r = discover_hwmon(&c, root);
        if (r >= 0 && (sources & (1u << SENSOR_SOURCE_THERMAL)))
                r = discover_thermal(&c, root);
        if (r >= 0 && (sources & (1u << SENSOR_SOURCE_IIO)))
                r = discover_iio(&c, root);
        if (r >= 0 && (sources & (1u << SENSOR_SOURCE_W1)))
                r = discover_w1(&c, root);
        strv_free_n(c.devices, c.n_devices);
        if (r < 0) {
                sensors_specs_free(c.specs, c.n);
                return r;
        }
        if (c.n > 1)
                qsort(c.specs, c.n, sizeof(SensorSpec), cmp_spec);
        *ret = c.specs;
        *ret_n = c.n;
        return 0;
}
