/* SPDX-License-Identifier: Apache-2.0 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <sys/epoll.h>
#include <unistd.h>

#include "listener.h"
#include "util.h"

int listener_pause_init(int epfd, int fd, ListenerPause *ret) {
        char path[64], line[256];
        FILE *f;
        int r = -ENOENT;

        snprintf(path, sizeof(path), "/proc/self/fdinfo/%d", epfd);
        f = fopen(path, "re");
        if (!f)
                return -errno;
        /* "tfd:        7 events:       19 data:     55d5c0a1b2c8  pos:0 ..." */
        while (fgets(line, sizeof(line), f)) {
                int tfd;
                uint32_t events;
                uint64_t data;

                if (sscanf(line, "tfd: %d events: %" SCNx32 " data: %" SCNx64, &tfd, &events, &data) != 3 ||
                    tfd != fd)
                        continue;
                *ret = (ListenerPause){ .epfd = epfd, .fd = fd, .events = events, .data = data };
                r = 0;
                break;
        }
        fclose(f);
        return r;
}

int listener_pause_set(ListenerPause *p, bool paused) {
        struct epoll_event ev = { .events = p->events, .data.u64 = p->data };

        if (p->paused == paused)
                return 0;
        if (epoll_ctl(p->epfd, paused ? EPOLL_CTL_DEL : EPOLL_CTL_ADD, p->fd, &ev) < 0)
                return -errno;
        p->paused = paused;
        return 0;
}

int listener_replace(ListenerPause *p, int fd) {
        struct epoll_event ev = { .events = p->events, .data.u64 = p->data };

        if (p->paused || fd == p->fd)
                return -EINVAL;
        /* Closes the old socket: its last reference, so it leaves the
         * epoll set; the new file at the same number is not in it yet. */
        if (dup3(fd, p->fd, O_CLOEXEC) < 0)
                return -errno;
        if (epoll_ctl(p->epfd, EPOLL_CTL_ADD, p->fd, &ev) < 0)
                return -errno;
        return 0;
}
