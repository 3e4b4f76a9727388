/* SPDX-License-Identifier: Apache-2.0 */
/* Pausing accept() on a listening socket that sits in libcoap's epoll set.
 * libcoap 4.3.1 accepts whenever its epoll fd reports the listener
 * readable and has no way to stop; we take the listener out of that epoll
 * set and put it back with the same event mask and data, which we read
 * from /proc/self/fdinfo once (docs/design/libcoap.md). The same
 * registration lets us put a listening socket of our own in place of
 * libcoap's (listener_replace()). */
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

/* Put the listening socket fd in the place of p->fd: dup3() it onto that
 * number (close-on-exec), which closes the old socket, and add it to the
 * epoll set with the old registration, so libcoap accepts from it without
 * knowing. p must not be paused. fd stays the caller's to close. 0,
 * -EINVAL, or -errno (then p->fd may be closed or out of the set). */
int listener_replace(ListenerPause *p, int fd);
