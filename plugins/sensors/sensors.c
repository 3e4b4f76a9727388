/* SPDX-License-Identifier: Apache-2.0 */
/* The sensors plugin: hwmon, thermal zones, IIO and 1-Wire temperature
 * sensors from sysfs as typed variables with SI units, published
 * periodically and on change (docs/plugins/sensors.md).
 *
 *   variables  hwmon.CHIP.CHANNEL, thermal.TYPE, iio.DEVICE.CHANNEL, w1.ID
 *              (double, unit in the describe data)
 *   events     sensors/VARIABLE {"value":21.5,"unit":"°C"}
 *
 * Reading a sysfs attribute may block: an I2C sensor takes milliseconds, a
 * DS18B20 750 ms per conversion, a wedged bus much longer. So the agent's
 * loop never reads one: every SampleSec= a short-lived process (forked
 * twice, so init reaps it) reads every sensor file and writes what it got
 * down a pipe the plugin watches. Variables answer from the last sample. */
#include <errno.h>
#include <fcntl.h>
#include <fnmatch.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <syslog.h>
#include <tether/plugin.h>
#include <unistd.h>

#include "sensors-sysfs.h"

#define SENSORS_VALUE_MAX 255 /* bytes read from one sensor file */

/* One record on the sampler's pipe, followed by len bytes. */
typedef struct SampleRecord {
        uint32_t index;
        int32_t error; /* errno of open/read, 0 if ok */
        uint32_t len;
} SampleRecord;

typedef struct Sensor {
        struct Sensors *sensors;
        SensorSpec spec;
        char event[TETHER_EVENT_NAME_MAX + 1];
        bool sampled;  /* at least one sample completed */
        int error;     /* of the last sample, negative errno, 0 ok */
        double value;  /* of the last good sample */
        bool published;
        double last_published;
        bool in_sample; /* a record arrived in the current sample */
} Sensor;

typedef struct Sensors {
        const struct tether_host_api *api;
        tether_host *host;
        char *root;
        Sensor *sensors;
        size_t n_sensors;
        uint64_t sample_usec, publish_usec, timeout_usec;
        double threshold[_SENSOR_QUANTITY_MAX]; /* < 0: off */
        char **exclude;

        sd_event_source *sample_timer, *publish_timer, *pipe_source, *timeout_timer;
        int pipe_fd;
        char *buf; /* partial records from the pipe */
        size_t buf_len;
        unsigned samples, overruns;
} Sensors;

/* --- configuration ------------------------------------------------------------ */

static int parse_seconds(const char *s, double min, uint64_t *ret) {
        char *end;
        double v;

        errno = 0;
        v = strtod(s, &end);
        if (end == s || *end || errno || !(v == 0 || v >= min) || v > 86400 * 7)
                return -EINVAL;
        *ret = (uint64_t)(v * 1e6);
        return 0;
}

static int config_seconds(Sensors *s, const char *key, double def, double min, uint64_t *ret) {
        const char *v = s->api->config_get(s->host, key);

        if (!v || !*v) {
                *ret = (uint64_t)(def * 1e6);
                return 0;
        }
        if (parse_seconds(v, min, ret) < 0) {
                s->api->log(s->host, LOG_ERR, "invalid %s='%s' (seconds, 0 or at least %g)", key, v, min);
                return -EINVAL;
        }
        return 0;
}

static const double default_threshold[_SENSOR_QUANTITY_MAX] = {
        [SENSOR_TEMPERATURE] = 0.5, [SENSOR_HUMIDITY] = 2,   [SENSOR_PRESSURE] = 100,
        [SENSOR_ILLUMINANCE] = 10,  [SENSOR_VOLTAGE] = 0.1,  [SENSOR_CURRENT] = 0.1,
        [SENSOR_POWER] = 1,         [SENSOR_ENERGY] = -1,    [SENSOR_FAN] = 100,
};

static int load_config(Sensors *s, unsigned *ret_sources) {
        const char *v;
        unsigned sources = 0;
        int r;

        v = s->api->config_get(s->host, "SysfsRoot");
        s->root = strdup(v && *v ? v : "/sys");
        if (!s->root)
                return -ENOMEM;
        if ((r = config_seconds(s, "SampleSec", 10, 0.05, &s->sample_usec)) < 0 ||
            (r = config_seconds(s, "PublishSec", 300, 1, &s->publish_usec)) < 0 ||
            (r = config_seconds(s, "SampleTimeoutSec", 30, 0.1, &s->timeout_usec)) < 0)
                return r;
        if (s->sample_usec == 0) {
                s->api->log(s->host, LOG_ERR, "SampleSec= must not be 0");
                return -EINVAL;
        }
        if (s->timeout_usec == 0)
                s->timeout_usec = 30 * 1000000ull;

        for (int q = 0; q < _SENSOR_QUANTITY_MAX; q++) {
                char key[64], *end;

                snprintf(key, sizeof(key), "Threshold.%s", sensors_quantity_name((SensorQuantity)q));
                s->threshold[q] = default_threshold[q];
                v = s->api->config_get(s->host, key);
                if (!v || !*v)
                        continue;
                if (strcmp(v, "off") == 0) {
                        s->threshold[q] = -1;
                        continue;
                }
                errno = 0;
                s->threshold[q] = strtod(v, &end);
                if (end == v || *end || errno || !(s->threshold[q] >= 0) || !isfinite(s->threshold[q])) {
                        s->api->log(s->host, LOG_ERR, "invalid %s='%s' (a number >= 0 in %s, or off)", key, v,
                                    sensors_quantity_unit((SensorQuantity)q));
                        return -EINVAL;
                }
        }

        v = s->api->config_get(s->host, "Sources");
        if (!v || !*v)
                sources = (1u << _SENSOR_SOURCE_MAX) - 1;
        else {
                char *copy = strdup(v), *save = NULL;

                if (!copy)
                        return -ENOMEM;
                for (char *t = strtok_r(copy, " \t", &save); t; t = strtok_r(NULL, " \t", &save)) {
                        int k = 0;

                        while (k < _SENSOR_SOURCE_MAX && strcmp(t, sensors_source_name((SensorSource)k)) != 0)
                                k++;
                        if (k == _SENSOR_SOURCE_MAX) {
                                s->api->log(s->host, LOG_ERR, "invalid Sources= entry '%s' (hwmon thermal iio w1)",
                                            t);
                                free(copy);
                                return -EINVAL;
                        }
                        sources |= 1u << k;
                }
                free(copy);
        }

        v = s->api->config_get(s->host, "Exclude");
        if (v && *v) {
                char *copy = strdup(v), *save = NULL;
                size_t n = 0;

                if (!copy)
                        return -ENOMEM;
                for (char *t = strtok_r(copy, " \t", &save); t; t = strtok_r(NULL, " \t", &save)) {
                        char **e = realloc(s->exclude, (n + 2) * sizeof(char *));
                        if (!e || !(e[n] = strdup(t))) {
                                if (e)
                                        s->exclude = e;
                                free(copy);
                                return -ENOMEM;
                        }
                        s->exclude = e;
                        e[++n] = NULL;
                }
                free(copy);
        }
        *ret_sources = sources;
        return 0;
}

static bool excluded(Sensors *s, const char *name) {
        for (char **p = s->exclude; p && *p; p++)
                if (fnmatch(*p, name, 0) == 0)
                        return true;
        return false;
}

/* --- publishing --------------------------------------------------------------- */

static void publish(Sensor *x) {
        Sensors *s = x->sensors;
        char data[128];
        int r;

        snprintf(data, sizeof(data), "{\"value\":%.10g,\"unit\":\"%s\"}", x->value,
                 sensors_quantity_unit(x->spec.quantity));
        r = s->api->publish(s->host, x->event, data, 0, 0);
        if (r < 0) {
                s->api->log(s->host, LOG_WARNING, "publishing '%s' failed: %s", x->event, strerror(-r));
                return;
        }
        x->published = true;
        x->last_published = x->value;
}

static int on_publish_timer(sd_event_source *src, uint64_t usec, void *userdata) {
        Sensors *s = userdata;

        for (size_t i = 0; i < s->n_sensors; i++)
                if (s->sensors[i].sampled && s->sensors[i].error == 0)
                        publish(&s->sensors[i]);
        sd_event_source_set_time(src, usec + s->publish_usec);
        return 0;
}

/* --- the sampler ---------------------------------------------------------------- */

static void write_all(int fd, const void *p, size_t n) {
        while (n > 0) {
                ssize_t k = write(fd, p, n);

                if (k < 0 && errno == EINTR)
                        continue;
                if (k <= 0)
                        _exit(1); /* the plugin is gone (EPIPE): stop reading */
                p = (const char *)p + k;
                n -= (size_t)k;
        }
}

/* In the sampler process: only async-signal-safe calls from here on, as
 * the agent may have had other threads when it forked. */
__attribute__((noreturn)) static void sampler_child(Sensors *s, int fd) {
        sigset_t none;
        char buf[SENSORS_VALUE_MAX];

        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        if (fd != 3) {
                if (dup2(fd, 3) < 0)
                        _exit(1);
                fd = 3;
        }
        /* Nothing of the agent's (its TLS socket, say) stays open here. */
        (void)close_range(4, ~0u, 0);
        for (size_t i = 0; i < s->n_sensors; i++) {
                SampleRecord rec = { .index = (uint32_t)i };
                int f = open(s->sensors[i].spec.path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
                ssize_t n = -1;

                if (f < 0)
                        rec.error = errno;
                else {
                        do
                                n = read(f, buf, sizeof(buf));
                        while (n < 0 && errno == EINTR);
                        if (n < 0)
                                rec.error = errno;
                        else
                                rec.len = (uint32_t)n;
                        close(f);
                }
                write_all(fd, &rec, sizeof(rec));
                if (rec.len > 0)
                        write_all(fd, buf, rec.len);
        }
        _exit(0);
}

static void sample_record(Sensors *s, const SampleRecord *rec, const char *data) {
        Sensor *x;
        double v;
        int r;

        if (rec->index >= s->n_sensors)
                return;
        x = &s->sensors[rec->index];
        x->in_sample = true;
        if (rec->error)
                /* ENOENT would read as "no such variable" up the stack; the
                 * variable exists, its device went away. */
                r = rec->error == ENOENT || rec->error == ENODEV ? -ENODEV : -rec->error;
        else
                r = sensors_parse(&x->spec, data, rec->len, &v);
        if (r < 0) {
                if (r != x->error)
                        s->api->log(s->host, LOG_WARNING, "sensor '%s' (%s): %s", x->spec.name, x->spec.path,
                                    r == -EBADMSG ? "unexpected content" : strerror(-r));
                x->error = r;
                x->sampled = true;
                return;
        }
        if (x->error && x->sampled)
                s->api->log(s->host, LOG_NOTICE, "sensor '%s' reads again", x->spec.name);
        x->error = 0;
        x->value = v;
        x->sampled = true;
        /* On change beyond the quantity's threshold (and the very first
         * value), publish. */
        if (s->threshold[x->spec.quantity] >= 0 &&
            (!x->published ||
             (v != x->last_published && fabs(v - x->last_published) >= s->threshold[x->spec.quantity])))
                publish(x);
}

static void sample_done(Sensors *s, int error) {
        size_t ok = 0;

        s->pipe_source = sd_event_source_disable_unref(s->pipe_source);
        s->timeout_timer = sd_event_source_disable_unref(s->timeout_timer);
        if (s->pipe_fd >= 0)
                close(s->pipe_fd);
        s->pipe_fd = -1;
        free(s->buf);
        s->buf = NULL;
        s->buf_len = 0;
        for (size_t i = 0; i < s->n_sensors; i++) {
                Sensor *x = &s->sensors[i];

                if (!x->in_sample) {
                        if (x->error != error)
                                s->api->log(s->host, LOG_WARNING, "sensor '%s': no reading: %s", x->spec.name,
                                            strerror(-error));
                        x->error = error;
                        x->sampled = true;
                }
                x->in_sample = false;
                ok += x->error == 0;
        }
        if (s->samples++ == 0)
                s->api->log(s->host, LOG_INFO, "first sample: %zu of %zu sensor(s) read", ok, s->n_sensors);
}

static int on_pipe(sd_event_source *src, int fd, uint32_t revents, void *userdata) {
        Sensors *s = userdata;
        char chunk[4096];
        ssize_t n;
        size_t pos = 0;

        n = read(fd, chunk, sizeof(chunk));
        if (n < 0) {
                if (errno == EAGAIN || errno == EINTR)
                        return 0;
                sample_done(s, -EIO);
                return 0;
        }
        if (n == 0) {
                /* EOF: the sampler read everything (or died: what is
                 * missing is marked unreadable). */
                sample_done(s, -EIO);
                return 0;
        }
        {
                char *b = realloc(s->buf, s->buf_len + (size_t)n);
                if (!b) {
                        sample_done(s, -ENOMEM);
                        return 0;
                }
                s->buf = b;
                memcpy(s->buf + s->buf_len, chunk, (size_t)n);
                s->buf_len += (size_t)n;
        }
        while (s->buf_len - pos >= sizeof(SampleRecord)) {
                SampleRecord rec;

                memcpy(&rec, s->buf + pos, sizeof(rec));
                if (rec.len > SENSORS_VALUE_MAX) {
                        sample_done(s, -EPROTO);
                        return 0;
                }
                if (s->buf_len - pos < sizeof(rec) + rec.len)
                        break;
                sample_record(s, &rec, s->buf + pos + sizeof(rec));
                pos += sizeof(rec) + rec.len;
        }
        memmove(s->buf, s->buf + pos, s->buf_len - pos);
        s->buf_len -= pos;
        return 0;
}

static int on_sample_timeout(sd_event_source *src, uint64_t usec, void *userdata) {
        Sensors *s = userdata;

        s->api->log(s->host, LOG_WARNING, "sampling took longer than %.1f s; sensors not read by then are marked timed out",
                    s->timeout_usec / 1e6);
        /* Closing our end ends the sampler at its next write (EPIPE). */
        sample_done(s, -ETIMEDOUT);
        return 0;
}

static int sample_start(Sensors *s) {
        sd_event *e = s->api->event(s->host);
        int fds[2], r;
        uint64_t now;
        pid_t pid;

        if (s->pipe_fd >= 0) {
                if (s->overruns++ == 0)
                        s->api->log(s->host, LOG_WARNING,
                                    "the previous sample is still running; skipping (SampleSec= too short?)");
                return -EBUSY;
        }
        if (s->n_sensors == 0)
                return 0;
        if (pipe2(fds, O_CLOEXEC) < 0)
                return -errno;
        pid = fork();
        if (pid < 0) {
                r = -errno;
                close(fds[0]);
                close(fds[1]);
                return r;
        }
        if (pid == 0) {
                /* Fork again and leave: the sampler becomes init's child,
                 * so nobody has to reap it, even if it hangs in a read. */
                pid_t grandchild = fork();
                if (grandchild != 0)
                        _exit(grandchild < 0 ? 1 : 0);
                sampler_child(s, fds[1]);
        }
        close(fds[1]);
        /* The middle process exits right after its fork. */
        while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
                ;
        s->pipe_fd = fds[0];
        (void)fcntl(s->pipe_fd, F_SETFL, O_NONBLOCK);
        r = sd_event_add_io(e, &s->pipe_source, s->pipe_fd, EPOLLIN, on_pipe, s);
        if (r < 0) {
                sample_done(s, r);
                return r;
        }
        sd_event_now(e, CLOCK_MONOTONIC, &now);
        r = sd_event_add_time(e, &s->timeout_timer, CLOCK_MONOTONIC, now + s->timeout_usec, 0, on_sample_timeout, s);
        if (r < 0) {
                sample_done(s, r);
                return r;
        }
        return 0;
}

static int on_sample_timer(sd_event_source *src, uint64_t usec, void *userdata) {
        Sensors *s = userdata;
        uint64_t now;
        int r;

        r = sample_start(s);
        if (r < 0 && r != -EBUSY)
                s->api->log(s->host, LOG_ERR, "cannot start a sample: %s", strerror(-r));
        /* From now, not from when it was due: a late loop does not make
         * samples pile up. */
        sd_event_now(s->api->event(s->host), CLOCK_MONOTONIC, &now);
        sd_event_source_set_time(src, now + s->sample_usec);
        return 0;
}

/* --- variables ------------------------------------------------------------------ */

static int var_sensor(void *userdata, struct tether_value *ret) {
        Sensor *x = userdata;

        if (!x->sampled)
                return -EBUSY; /* the first sample has not come back yet */
        if (x->error)
                return x->error;
        ret->d = x->value;
        return 0;
}

/* --- init and fini ---------------------------------------------------------------- */

static void on_skip(void *userdata, const char *path, const char *reason) {
        Sensors *s = userdata;
        s->api->log(s->host, LOG_NOTICE, "skipping '%s': %s", path, reason);
}

static void sensors_fini(void *userdata) {
        Sensors *s = userdata;

        if (!s)
                return;
        sd_event_source_disable_unref(s->sample_timer);
        sd_event_source_disable_unref(s->publish_timer);
        sd_event_source_disable_unref(s->pipe_source);
        sd_event_source_disable_unref(s->timeout_timer);
        if (s->pipe_fd >= 0)
                close(s->pipe_fd);
        free(s->buf);
        for (size_t i = 0; i < s->n_sensors; i++)
                free(s->sensors[i].spec.path);
        free(s->sensors);
        for (char **p = s->exclude; p && *p; p++)
                free(*p);
        free(s->exclude);
        free(s->root);
        free(s);
}

static int sensors_init(const struct tether_host_api *api, tether_host *host, void **ret_userdata) {
        SensorSpec *specs = NULL;
        size_t n_specs = 0, counts[_SENSOR_SOURCE_MAX] = {};
        unsigned sources;
        Sensors *s;
        uint64_t now;
        int r;

        if (api->abi_major != TETHER_PLUGIN_ABI_MAJOR)
                return -EPROTO;
        s = calloc(1, sizeof(*s));
        if (!s)
                return -ENOMEM;
        *ret_userdata = s;
        s->api = api;
        s->host = host;
        s->pipe_fd = -1;
        r = load_config(s, &sources);
        if (r < 0)
                return r;

        r = sensors_discover(s->root, sources, &specs, &n_specs, on_skip, s);
        if (r < 0) {
                api->log(host, LOG_ERR, "cannot look for sensors under '%s': %s", s->root, strerror(-r));
                return r;
        }
        s->sensors = calloc(n_specs ? n_specs : 1, sizeof(Sensor));
        if (!s->sensors) {
                sensors_specs_free(specs, n_specs);
                return -ENOMEM;
        }
        for (size_t i = 0; i < n_specs; i++) {
                if (excluded(s, specs[i].name)) {
                        free(specs[i].path);
                        continue;
                }
                Sensor *x = &s->sensors[s->n_sensors++];
                x->sensors = s;
                x->spec = specs[i]; /* takes path */
                snprintf(x->event, sizeof(x->event), "sensors/%s", x->spec.name);
                counts[x->spec.source]++;
        }
        free(specs);

        for (size_t i = 0; i < s->n_sensors; i++) {
                Sensor *x = &s->sensors[i];

                r = api->variable_add(host, x->spec.name, TETHER_TYPE_DOUBLE, var_sensor, x);
                if (r < 0) {
                        api->log(host, LOG_ERR, "cannot register variable '%s': %s", x->spec.name, strerror(-r));
                        return r;
                }
                if (api->abi_minor >= 1 && api->variable_unit)
                        (void)api->variable_unit(host, x->spec.name, sensors_quantity_unit(x->spec.quantity));
        }
        r = api->event_source_add(host, "sensors/");
        if (r < 0)
                return r;

        sd_event_now(api->event(host), CLOCK_MONOTONIC, &now);
        /* The first sample right away, then every SampleSec. */
        r = sd_event_add_time(api->event(host), &s->sample_timer, CLOCK_MONOTONIC, now, 0, on_sample_timer, s);
        if (r < 0)
                return r;
        r = sd_event_source_set_enabled(s->sample_timer, SD_EVENT_ON);
        if (r < 0)
                return r;
        if (s->publish_usec > 0) {
                r = sd_event_add_time(api->event(host), &s->publish_timer, CLOCK_MONOTONIC, now + s->publish_usec, 0,
                                      on_publish_timer, s);
                if (r < 0)
                        return r;
                r = sd_event_source_set_enabled(s->publish_timer, SD_EVENT_ON);
                if (r < 0)
                        return r;
        }
        api->log(host, LOG_INFO,
                 "%zu sensor(s) under '%s' (hwmon %zu, thermal %zu, iio %zu, w1 %zu), sampled every %.3g s",
                 s->n_sensors, s->root, counts[SENSOR_SOURCE_HWMON], counts[SENSOR_SOURCE_THERMAL],
                 counts[SENSOR_SOURCE_IIO], counts[SENSOR_SOURCE_W1], s->sample_usec / 1e6);
        return 0;
}

TETHER_PLUGIN("sensors", PACKAGE_VERSION, sensors_init, sensors_fini);
