/* SPDX-License-Identifier: Apache-2.0 */
/* A plugin that forgets its sources on purpose: init() adds a repeating
 * timer and an io source on a pipe to the agent's loop, fini() removes
 * neither. The timer writes a byte into the pipe, the io source reads it
 * and appends "tick N" to the file named by [Plugin leaky] File=. After the
 * agent unloaded the plugin both keep running in its code (see
 * docs/plugins.md, "Unloading"): the integration test watches the file
 * grow after a reload that disabled the plugin, with the agent alive.
 * Nothing here touches the host handle or heap memory after fini(). */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* pipe2 */
#endif
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <syslog.h>
#include <unistd.h>
#include <tether/plugin.h>

#define LEAKY_TICK_USEC 20000

/* Statics outlive an unload: the code (and its data) stays mapped. */
static int out_fd = -1, pipe_fd[2] = { -1, -1 };
static unsigned ticks;
static sd_event_source *io; /* loaded again: the old one still reads the pipe */

static int on_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        char b = 't';

        (void)!write(pipe_fd[1], &b, 1);
        (void)sd_event_source_set_time_relative(s, LEAKY_TICK_USEC);
        return sd_event_source_set_enabled(s, SD_EVENT_ONESHOT);
}

static int on_pipe(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        char buf[64];
        int n;

        while (read(fd, buf, sizeof(buf)) > 0)
                ;
        n = snprintf(buf, sizeof(buf), "tick %u\n", ++ticks);
        (void)!write(out_fd, buf, (size_t)n);
        return 0;
}

static int leaky_init(const struct tether_host_api *api, tether_host *host, void **ret_userdata) {
        const char *path = api->config_get(host, "File");
        sd_event_source *timer = NULL;
        int r;

        if (!path)
                return -EINVAL;
        if (out_fd < 0) {
                out_fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
                if (out_fd < 0)
                        return -errno;
                if (pipe2(pipe_fd, O_NONBLOCK | O_CLOEXEC) < 0)
                        return -errno;
        }
        r = sd_event_add_time_relative(api->event(host), &timer, CLOCK_MONOTONIC, LEAKY_TICK_USEC, 0, on_timer,
                                       NULL);
        if (r < 0)
                return r;
        if (!io) {
                r = sd_event_add_io(api->event(host), &io, pipe_fd[0], EPOLLIN, on_pipe, NULL);
                if (r < 0)
                        return r;
        }
        api->log(host, LOG_INFO, "timer and io source added, and never removed");
        return 0;
}

TETHER_PLUGIN("leaky", "0.1", leaky_init, NULL);
