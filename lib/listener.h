/* SPDX-License-Identifier: Apache-2.0 */
/* Pausing accept() on a listening socket that sits in libcoap's epoll set.
 * libcoap 4.3.1 accepts whenever its epoll fd reports the listener
 * readable and has no way to stop; we take the listener out of that epoll
 * set and put it back with the same event mask and data, which we read
 * from /proc/self/fdinfo once (docs/design/libcoap.md). */
#pragma once

#include <stdbool.h>
#include <stdint.h>

typedef struct ListenerPause {
        int epfd, fd;
        uint32_t events;
        uint64_t data;
        bool paused;
} ListenerPause;

/* Find fd's registration in epfd. 0, -ENOENT if fd is not in the set, or
 * -errno; *ret untouched on failure. */
int listener_pause_init(int epfd, int fd, ListenerPause *ret);

/* Stop (paused=true) or resume accepting; idempotent. 0 or -errno. */
int listener_pause_set(ListenerPause *p, bool paused);
