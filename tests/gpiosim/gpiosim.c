/* SPDX-License-Identifier: Apache-2.0 */
/* gpiosim: a simulated GPIO chip at the libgpiod v1 boundary.
 *
 * Loaded with LD_PRELOAD into tetherd, this library defines the libgpiod 1.x
 * functions the gpio plugin calls, so the plugin binary that ships runs
 * unchanged against simulated chips. It behaves like the kernel's GPIO
 * character device as libgpiod 1.6 drives it (lib/core.c there, and
 * drivers/gpio/gpiolib-cdev.c's v1 ABI):
 *   - a line can be requested once (EBUSY otherwise); offsets past the
 *     chip's lines are EINVAL; an unknown chip is ENOENT (no /dev node);
 *   - open-drain/source on a non-output and bias with "as-is" are EINVAL;
 *     bias flags set the simulated pull, as gpio-sim does;
 *   - values are logical: ActiveLow inverts between the physical level and
 *     what get/set see; setting an input is EPERM, setting an edge request
 *     EINVAL, reading a free line EPERM;
 *   - edge requests hand out an fd that becomes readable when an event is
 *     queued; events carry a CLOCK_MONOTONIC timestamp and the logical edge;
 *     like the kernel's kfifo at most 16 wait, later ones are dropped;
 *   - open-drain outputs driving 1 (open-source driving 0) float to the
 *     pull, as on gpio-sim.
 *
 * The "outside world" (what gpio-sim's sysfs attributes are for the kernel
 * simulator) is a control socket, served by one thread of this library:
 *   $TETHER_GPIOSIM/chips         lines "NAME NUM_LINES [LABEL]", read once
 *   $TETHER_GPIOSIM/control.sock  one command per line, one reply line:
 *     set CHIP OFFSET 0|1     pull the line to a physical level -> "ok"
 *     get CHIP OFFSET         -> "level=L direction=in|out requested=0|1
 *                                 consumer=C active_low=0|1 edge=E bias=B"
 *     wait CHIP OFFSET 0|1 MS  block until the physical level is that,
 *                              at most MS milliseconds -> "ok" | "error timeout"
 *     add NAME NUM_LINES [LABEL]   a chip appears (hotplug) -> "ok"
 * Errors reply "error REASON". CHIP is a name or label.
 *
 * Test infrastructure, not product code: the thread is what stands in for
 * the hardware changing on its own. */
#include <errno.h>
#include <fcntl.h>
#include <gpiod.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define SIM_EXPORT __attribute__((visibility("default")))
#define SIM_MAX_CHIPS 16
#define SIM_KFIFO 16

typedef struct SimEvent {
        uint64_t timestamp_ns;
        uint32_t id; /* GPIOD_LINE_EVENT_* */
        uint32_t pad;
} SimEvent;

typedef struct SimLine {
        int pull;  /* physical level with nothing driving: 0 or 1 */
        int drive; /* physical level an output drives */
        int requested;
        int output;
        int active_low;
        int open_drain, open_source;
        int edge; /* 0 none, else a GPIOD_LINE_REQUEST_EVENT_* */
        int bias; /* 0 as-is, else a GPIOD_LINE_REQUEST_FLAG_BIAS_* */
        int ev_read, ev_write; /* pipe of an edge request, -1 if none */
        char consumer[32];
} SimLine;

typedef struct SimChip {
        char name[32];
        char label[32];
        unsigned num_lines;
        SimLine *lines;
} SimChip;

struct gpiod_chip {
        SimChip *sim;
        struct gpiod_line **lines;
};

struct gpiod_line {
        struct gpiod_chip *chip;
        unsigned offset;
        int state; /* 0 free, 1 values, 2 events */
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t level_cond; /* broadcast on every level change; CLOCK_MONOTONIC */
static pthread_once_t once = PTHREAD_ONCE_INIT;
static SimChip chips[SIM_MAX_CHIPS];
static unsigned n_chips;
static char sock_path[108];

/* --- the simulated hardware (lock held) ---------------------------------- */

static int level_of(const SimLine *l) {
        if (!l->requested || !l->output)
                return l->pull;
        if ((l->open_drain && l->drive == 1) || (l->open_source && l->drive == 0))
                return l->pull;
        return l->drive;
}

static uint64_t monotonic_ns(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* After the physical level of l went from before to now, queue the edge
 * event an edge request asked for. */
static void line_changed(SimLine *l, int before) {
        int now = level_of(l), logical;
        SimEvent ev;
        int queued = 0;

        if (now != before)
                pthread_cond_broadcast(&level_cond);
        if (now == before || !l->requested || l->edge == 0 || l->ev_write < 0)
                return;
        logical = now ^ l->active_low;
        if ((l->edge == GPIOD_LINE_REQUEST_EVENT_RISING_EDGE && !logical) ||
            (l->edge == GPIOD_LINE_REQUEST_EVENT_FALLING_EDGE && logical))
                return;
        if (ioctl(l->ev_read, FIONREAD, &queued) == 0 && queued >= (int)(SIM_KFIFO * sizeof(SimEvent)))
                return; /* the kernel's FIFO is full: dropped */
        ev = (SimEvent){ .timestamp_ns = monotonic_ns(),
                         .id = logical ? GPIOD_LINE_EVENT_RISING_EDGE : GPIOD_LINE_EVENT_FALLING_EDGE };
        (void)!write(l->ev_write, &ev, sizeof(ev));
}

static int add_chip(const char *name, unsigned num_lines, const char *label) {
        SimChip *c;

        if (n_chips == SIM_MAX_CHIPS || num_lines == 0 || num_lines > 512 || strlen(name) >= sizeof(c->name))
                return -EINVAL;
        for (unsigned i = 0; i < n_chips; i++)
                if (strcmp(chips[i].name, name) == 0)
                        return -EEXIST;
        c = &chips[n_chips];
        c->lines = calloc(num_lines, sizeof(SimLine));
        if (!c->lines)
                return -ENOMEM;
        snprintf(c->name, sizeof(c->name), "%s", name);
        snprintf(c->label, sizeof(c->label), "%s", label && *label ? label : name);
        c->num_lines = num_lines;
        for (unsigned i = 0; i < num_lines; i++)
                c->lines[i].ev_read = c->lines[i].ev_write = -1;
        n_chips++;
        return 0;
}

static SimChip *find_chip(const char *descr) {
        for (unsigned i = 0; i < n_chips; i++)
                if (strcmp(chips[i].name, descr) == 0 || strcmp(chips[i].label, descr) == 0)
                        return &chips[i];
        if (strncmp(descr, "/dev/", 5) == 0)
                return find_chip(descr + 5);
        /* A bare number N means gpiochipN, like gpiod_chip_open_lookup(). */
        if (*descr >= '0' && *descr <= '9' && strspn(descr, "0123456789") == strlen(descr)) {
                char name[40];
                snprintf(name, sizeof(name), "gpiochip%s", descr);
                return find_chip(name);
        }
        return NULL;
}

/* --- the control socket --------------------------------------------------- */

static void command(char *line, char *reply, size_t size) {
        char *argv[5] = {}, *save = NULL;
        int argc = 0;
        SimChip *c;
        unsigned off;

        for (char *t = strtok_r(line, " \t\r\n", &save); t && argc < 5; t = strtok_r(NULL, " \t\r\n", &save))
                argv[argc++] = t;
        if (argc >= 3 && argc <= 4 && strcmp(argv[0], "add") == 0) {
                int r = add_chip(argv[1], (unsigned)strtoul(argv[2], NULL, 10), argv[3]);
                snprintf(reply, size, r < 0 ? "error %s" : "ok", strerror(-r));
                return;
        }
        if (argc < 3 || (strcmp(argv[0], "set") != 0 && strcmp(argv[0], "get") != 0 &&
                         strcmp(argv[0], "wait") != 0)) {
                snprintf(reply, size,
                         "error usage: set CHIP OFFSET 0|1 | get CHIP OFFSET | wait CHIP OFFSET 0|1 MS | "
                         "add NAME LINES [LABEL]");
                return;
        }
        c = find_chip(argv[1]);
        off = (unsigned)strtoul(argv[2], NULL, 10);
        if (!c || off >= c->num_lines) {
                snprintf(reply, size, "error no line %s %s", argv[1], argv[2]);
                return;
        }
        SimLine *l = &c->lines[off];
        if (strcmp(argv[0], "wait") == 0) {
                struct timespec deadline;
                unsigned long ms;
                int want;

                if (argc != 5 || (strcmp(argv[3], "0") != 0 && strcmp(argv[3], "1") != 0)) {
                        snprintf(reply, size, "error wait needs a level 0 or 1 and milliseconds");
                        return;
                }
                want = argv[3][0] - '0';
                ms = strtoul(argv[4], NULL, 10);
                clock_gettime(CLOCK_MONOTONIC, &deadline);
                deadline.tv_sec += (time_t)(ms / 1000);
                deadline.tv_nsec += (long)(ms % 1000) * 1000000L;
                if (deadline.tv_nsec >= 1000000000L) {
                        deadline.tv_sec++;
                        deadline.tv_nsec -= 1000000000L;
                }
                /* The caller holds the lock; the wait releases it meanwhile. */
                while (level_of(l) != want)
                        if (pthread_cond_timedwait(&level_cond, &lock, &deadline) == ETIMEDOUT) {
                                if (level_of(l) == want)
                                        break;
                                snprintf(reply, size, "error timeout: level is %d", level_of(l));
                                return;
                        }
                snprintf(reply, size, "ok");
                return;
        }
        if (strcmp(argv[0], "set") == 0) {
                int before = level_of(l);

                if (argc != 4 || (strcmp(argv[3], "0") != 0 && strcmp(argv[3], "1") != 0)) {
                        snprintf(reply, size, "error set needs a level 0 or 1");
                        return;
                }
                l->pull = argv[3][0] - '0';
                line_changed(l, before);
                snprintf(reply, size, "ok");
                return;
        }
        snprintf(reply, size, "level=%d direction=%s requested=%d consumer=%s active_low=%d edge=%s bias=%s",
                 level_of(l), l->requested && l->output ? "out" : "in", l->requested,
                 l->requested && l->consumer[0] ? l->consumer : "-", l->requested ? l->active_low : 0,
                 !l->requested || !l->edge                         ? "none"
                 : l->edge == GPIOD_LINE_REQUEST_EVENT_RISING_EDGE  ? "rising"
                 : l->edge == GPIOD_LINE_REQUEST_EVENT_FALLING_EDGE ? "falling"
                                                                    : "both",
                 l->bias == GPIOD_LINE_REQUEST_FLAG_BIAS_PULL_UP     ? "pull-up"
                 : l->bias == GPIOD_LINE_REQUEST_FLAG_BIAS_PULL_DOWN ? "pull-down"
                 : l->bias == GPIOD_LINE_REQUEST_FLAG_BIAS_DISABLE   ? "disable"
                                                                     : "as-is");
}

static void serve(int cfd) {
        char buf[512], reply[512];
        size_t len = 0;

        for (;;) {
                ssize_t n = read(cfd, buf + len, sizeof(buf) - 1 - len);
                char *nl;

                if (n <= 0)
                        return;
                len += (size_t)n;
                buf[len] = '\0';
                while ((nl = strchr(buf, '\n'))) {
                        *nl = '\0';
                        pthread_mutex_lock(&lock);
                        command(buf, reply, sizeof(reply) - 1);
                        pthread_mutex_unlock(&lock);
                        strcat(reply, "\n");
                        if (write(cfd, reply, strlen(reply)) < 0)
                                return;
                        len -= (size_t)(nl + 1 - buf);
                        memmove(buf, nl + 1, len + 1);
                }
                if (len == sizeof(buf) - 1)
                        return; /* a line too long to be a command */
        }
}

static void *connection_thread(void *arg) {
        int cfd = (int)(intptr_t)arg;

        serve(cfd);
        close(cfd);
        return NULL;
}

/* One thread per connection, so a "wait" does not hold up a "set". Signals
 * stay blocked: threads inherit this one's mask. */
static void *control_thread(void *arg) {
        int lfd = (int)(intptr_t)arg;

        for (;;) {
                /* cppcheck-suppress nullPointer ; NULL: no peer address wanted */
                int cfd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
                pthread_t t;

                if (cfd < 0) {
                        if (errno == EINTR || errno == ECONNABORTED)
                                continue;
                        return NULL;
                }
                if (pthread_create(&t, NULL, connection_thread, (void *)(intptr_t)cfd) != 0) {
                        close(cfd);
                        continue;
                }
                pthread_detach(t);
        }
}

static void sim_setup(void) {
        const char *dir = getenv("TETHER_GPIOSIM");
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        char path[4096], line[256];
        sigset_t all, old;
        pthread_t t;
        FILE *f;
        int lfd;

        if (!dir || !*dir)
                return;
        {
                pthread_condattr_t attr;

                pthread_condattr_init(&attr);
                pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
                pthread_cond_init(&level_cond, &attr);
                pthread_condattr_destroy(&attr);
        }
        snprintf(path, sizeof(path), "%s/chips", dir);
        f = fopen(path, "re");
        if (f) {
                while (fgets(line, sizeof(line), f)) {
                        char name[32], label[32] = "";
                        unsigned n;

                        if (line[0] == '#' || sscanf(line, "%31s %u %31s", name, &n, label) < 2)
                                continue;
                        (void)add_chip(name, n, label);
                }
                fclose(f);
        }
        if (snprintf(sock_path, sizeof(sock_path), "%s/control.sock", dir) >= (int)sizeof(sock_path)) {
                fprintf(stderr, "gpiosim: '%s' is too long for a socket path\n", dir);
                return;
        }
        snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", sock_path);
        lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        (void)unlink(sock_path);
        if (lfd < 0 || bind(lfd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(lfd, 16) < 0) {
                fprintf(stderr, "gpiosim: cannot listen on '%s': %m\n", sock_path);
                if (lfd >= 0)
                        close(lfd);
                return;
        }
        /* The host process handles its signals on its own thread (tetherd
         * reads them from a signalfd); this thread must never take one. */
        sigfillset(&all);
        pthread_sigmask(SIG_BLOCK, &all, &old);
        if (pthread_create(&t, NULL, control_thread, (void *)(intptr_t)lfd) == 0)
                pthread_detach(t);
        pthread_sigmask(SIG_SETMASK, &old, NULL);
}

/* --- libgpiod 1.x API ---------------------------------------------------- */

SIM_EXPORT const char *gpiod_version_string(void) {
        return "1.6.3-gpiosim";
}

SIM_EXPORT struct gpiod_chip *gpiod_chip_open_lookup(const char *descr) {
        struct gpiod_chip *chip;
        SimChip *c;

        pthread_once(&once, sim_setup);
        pthread_mutex_lock(&lock);
        c = descr ? find_chip(descr) : NULL;
        pthread_mutex_unlock(&lock);
        if (!c) {
                errno = ENOENT;
                return NULL;
        }
        chip = calloc(1, sizeof(*chip));
        if (!chip || !(chip->lines = calloc(c->num_lines, sizeof(*chip->lines)))) {
                free(chip);
                errno = ENOMEM;
                return NULL;
        }
        chip->sim = c;
        return chip;
}

SIM_EXPORT struct gpiod_line *gpiod_chip_get_line(struct gpiod_chip *chip, unsigned int offset) {
        struct gpiod_line *l;

        if (offset >= chip->sim->num_lines) {
                errno = EINVAL;
                return NULL;
        }
        if (!chip->lines[offset]) {
                l = calloc(1, sizeof(*l));
                if (!l) {
                        errno = ENOMEM;
                        return NULL;
                }
                *l = (struct gpiod_line){ .chip = chip, .offset = offset };
                chip->lines[offset] = l;
        }
        return chip->lines[offset];
}

static SimLine *sim_line(struct gpiod_line *line) {
        return &line->chip->sim->lines[line->offset];
}

SIM_EXPORT int gpiod_line_request(struct gpiod_line *line, const struct gpiod_line_request_config *config,
                                  int default_val) {
        const int bias_flags = GPIOD_LINE_REQUEST_FLAG_BIAS_DISABLE | GPIOD_LINE_REQUEST_FLAG_BIAS_PULL_DOWN |
                               GPIOD_LINE_REQUEST_FLAG_BIAS_PULL_UP;
        int type = config->request_type, flags = config->flags, bias = flags & bias_flags;
        int events = type == GPIOD_LINE_REQUEST_EVENT_RISING_EDGE || type == GPIOD_LINE_REQUEST_EVENT_FALLING_EDGE ||
                     type == GPIOD_LINE_REQUEST_EVENT_BOTH_EDGES;
        int output = type == GPIOD_LINE_REQUEST_DIRECTION_OUTPUT;
        int drain = flags & (GPIOD_LINE_REQUEST_FLAG_OPEN_DRAIN | GPIOD_LINE_REQUEST_FLAG_OPEN_SOURCE);
        int fds[2] = { -1, -1 }, before;
        SimLine *l;

        if (line->state != 0) {
                errno = EBUSY;
                return -1;
        }
        if (!events && type != GPIOD_LINE_REQUEST_DIRECTION_AS_IS && type != GPIOD_LINE_REQUEST_DIRECTION_INPUT &&
            !output) {
                errno = EINVAL;
                return -1;
        }
        /* libgpiod: open drain/source only on outputs, not both at once;
         * kernel: one bias at most, and only with an explicit direction. */
        if ((drain && !output) || drain == (GPIOD_LINE_REQUEST_FLAG_OPEN_DRAIN | GPIOD_LINE_REQUEST_FLAG_OPEN_SOURCE) ||
            (bias && (bias & (bias - 1))) || (bias && type == GPIOD_LINE_REQUEST_DIRECTION_AS_IS)) {
                errno = EINVAL;
                return -1;
        }
        if (events && pipe2(fds, O_CLOEXEC) < 0)
                return -1;

        pthread_mutex_lock(&lock);
        l = sim_line(line);
        if (l->requested) {
                pthread_mutex_unlock(&lock);
                if (fds[0] >= 0) {
                        close(fds[0]);
                        close(fds[1]);
                }
                errno = EBUSY;
                return -1;
        }
        before = level_of(l);
        l->requested = 1;
        l->output = output;
        l->active_low = !!(flags & GPIOD_LINE_REQUEST_FLAG_ACTIVE_LOW);
        l->open_drain = !!(flags & GPIOD_LINE_REQUEST_FLAG_OPEN_DRAIN);
        l->open_source = !!(flags & GPIOD_LINE_REQUEST_FLAG_OPEN_SOURCE);
        l->edge = events ? type : 0;
        l->bias = bias;
        if (bias == GPIOD_LINE_REQUEST_FLAG_BIAS_PULL_UP)
                l->pull = 1;
        else if (bias == GPIOD_LINE_REQUEST_FLAG_BIAS_PULL_DOWN)
                l->pull = 0;
        if (output)
                l->drive = (default_val ? 1 : 0) ^ l->active_low;
        l->ev_read = fds[0];
        l->ev_write = fds[1];
        snprintf(l->consumer, sizeof(l->consumer), "%s", config->consumer ? config->consumer : "");
        (void)before; /* requesting does not produce an event, as in the kernel */
        pthread_mutex_unlock(&lock);
        line->state = events ? 2 : 1;
        return 0;
}

SIM_EXPORT void gpiod_line_release(struct gpiod_line *line) {
        SimLine *l;

        if (line->state == 0)
                return;
        pthread_mutex_lock(&lock);
        l = sim_line(line);
        /* Released outputs keep their level, as most GPIO controllers do. */
        if (l->output && l->requested)
                l->pull = level_of(l);
        pthread_cond_broadcast(&level_cond);
        if (l->ev_read >= 0) {
                close(l->ev_read);
                close(l->ev_write);
        }
        l->ev_read = l->ev_write = -1;
        l->requested = l->output = l->edge = 0;
        l->consumer[0] = '\0';
        pthread_mutex_unlock(&lock);
        line->state = 0;
}

SIM_EXPORT void gpiod_chip_close(struct gpiod_chip *chip) {
        if (!chip)
                return;
        for (unsigned i = 0; i < chip->sim->num_lines; i++)
                if (chip->lines[i]) {
                        gpiod_line_release(chip->lines[i]);
                        free(chip->lines[i]);
                }
        free(chip->lines);
        free(chip);
}

SIM_EXPORT int gpiod_line_get_value(struct gpiod_line *line) {
        int v;

        if (line->state == 0) {
                errno = EPERM;
                return -1;
        }
        pthread_mutex_lock(&lock);
        v = level_of(sim_line(line)) ^ sim_line(line)->active_low;
        pthread_mutex_unlock(&lock);
        return v;
}

SIM_EXPORT int gpiod_line_set_value(struct gpiod_line *line, int value) {
        SimLine *l;
        int before;

        if (line->state == 0) {
                errno = EPERM;
                return -1;
        }
        if (line->state == 2) {
                errno = EINVAL; /* the v1 event fd only answers GET */
                return -1;
        }
        pthread_mutex_lock(&lock);
        l = sim_line(line);
        if (!l->output) {
                pthread_mutex_unlock(&lock);
                errno = EPERM;
                return -1;
        }
        before = level_of(l);
        l->drive = (value ? 1 : 0) ^ l->active_low;
        line_changed(l, before);
        pthread_mutex_unlock(&lock);
        return 0;
}

SIM_EXPORT int gpiod_line_event_get_fd(struct gpiod_line *line) {
        int fd;

        if (line->state != 2) {
                errno = EPERM;
                return -1;
        }
        pthread_mutex_lock(&lock);
        fd = sim_line(line)->ev_read;
        pthread_mutex_unlock(&lock);
        return fd;
}

SIM_EXPORT int gpiod_line_event_read_multiple(struct gpiod_line *line, struct gpiod_line_event *events,
                                              unsigned int num_events) {
        SimEvent ev[SIM_KFIFO];
        ssize_t n;
        int fd = gpiod_line_event_get_fd(line);

        if (fd < 0)
                return -1;
        if (num_events > SIM_KFIFO)
                num_events = SIM_KFIFO;
        /* Blocks when nothing is queued, like read() on the kernel's fd. */
        n = read(fd, ev, num_events * sizeof(SimEvent));
        if (n < 0)
                return -1;
        if ((size_t)n < sizeof(SimEvent)) {
                errno = EIO;
                return -1;
        }
        n /= (ssize_t)sizeof(SimEvent);
        for (ssize_t i = 0; i < n; i++) {
                events[i].event_type = (int)ev[i].id;
                events[i].ts.tv_sec = (time_t)(ev[i].timestamp_ns / 1000000000ull);
                events[i].ts.tv_nsec = (long)(ev[i].timestamp_ns % 1000000000ull);
        }
        return (int)n;
}

SIM_EXPORT int gpiod_line_event_read(struct gpiod_line *line, struct gpiod_line_event *event) {
        return gpiod_line_event_read_multiple(line, event, 1) < 0 ? -1 : 0;
}
