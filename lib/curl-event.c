/* SPDX-License-Identifier: Apache-2.0 */
/* libcurl's multi interface on an sd-event loop: curl-event.h. */
#include <errno.h>
#include <stdlib.h>
#include <sys/epoll.h>

#include "curl-event.h"
#include "util.h"

/* One socket libcurl asked us to watch. */
typedef struct Watch {
        sd_event_source *source;
        struct Watch *prev, *next;
} Watch;

struct CurlEvent {
        sd_event *event;
        CURLM *multi;
        sd_event_source *timer;
        Watch *watches;
        CurlEventDone done;
        void *userdata;
};

static int on_io(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        CurlEvent *c = userdata;
        int action = 0, running;

        if (revents & EPOLLIN)
                action |= CURL_CSELECT_IN;
        if (revents & EPOLLOUT)
                action |= CURL_CSELECT_OUT;
        if (revents & (EPOLLERR | EPOLLHUP))
                action |= CURL_CSELECT_ERR;
        curl_multi_socket_action(c->multi, fd, action, &running);
        c->done(c->userdata);
        return 0;
}

static int on_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        curl_event_kick(userdata);
        return 0;
}

static void watch_free(CurlEvent *c, Watch *watch) {
        if (watch->prev)
                watch->prev->next = watch->next;
        else
                c->watches = watch->next;
        if (watch->next)
                watch->next->prev = watch->prev;
        sd_event_source_disable_unref(watch->source);
        free(watch);
}

/* libcurl: watch sock for what (or stop watching it). */
static int on_curl_socket(CURL *easy, curl_socket_t sock, int what, void *userp, void *socketp) {
        CurlEvent *c = userp;
        Watch *watch = socketp;
        uint32_t events = 0;

        if (what == CURL_POLL_REMOVE) {
                if (watch) {
                        watch_free(c, watch);
                        curl_multi_assign(c->multi, sock, NULL);
                }
                return 0;
        }
        if (what & CURL_POLL_IN)
                events |= EPOLLIN;
        if (what & CURL_POLL_OUT)
                events |= EPOLLOUT;
        if (watch) {
                if (sd_event_source_set_io_events(watch->source, events) < 0 ||
                    sd_event_source_set_enabled(watch->source, SD_EVENT_ON) < 0)
                        return -1;
                return 0;
        }
        watch = calloc(1, sizeof(Watch));
        if (!watch)
                return -1;
        if (sd_event_add_io(c->event, &watch->source, sock, events, on_io, c) < 0) {
                free(watch);
                return -1;
        }
        watch->next = c->watches;
        if (c->watches)
                c->watches->prev = watch;
        c->watches = watch;
        if (curl_multi_assign(c->multi, sock, watch) != CURLM_OK) {
                watch_free(c, watch);
                return -1;
        }
        return 0;
}

/* libcurl: call curl_multi_socket_action(CURL_SOCKET_TIMEOUT) in
 * timeout_ms (-1: never). Never from inside this callback: 0 fires on the
 * loop's next iteration. Up to a millisecond late, never early
 * (curl-event.h). */
static int on_curl_timer(CURLM *multi, long timeout_ms, void *userp) {
        CurlEvent *c = userp;

        if (timeout_ms < 0)
                return sd_event_source_set_enabled(c->timer, SD_EVENT_OFF) < 0 ? -1 : 0;
        if (sd_event_source_set_time_relative(c->timer, (uint64_t)timeout_ms * 1000 + 999) < 0 ||
            sd_event_source_set_enabled(c->timer, SD_EVENT_ONESHOT) < 0)
                return -1;
        return 0;
}

int curl_event_new(sd_event *event, CurlEventDone done, void *userdata, CurlEvent **ret) {
        _cleanup_(curl_event_freep) CurlEvent *c = NULL;
        int r;

        if (!event || !done || !ret)
                return -EINVAL;
        c = calloc(1, sizeof(CurlEvent));
        if (!c)
                return -ENOMEM;
        c->event = sd_event_ref(event);
        c->done = done;
        c->userdata = userdata;
        /* Accuracy 1 µs: 0 would be sd-event's default of 250 ms. */
        r = sd_event_add_time(event, &c->timer, CLOCK_MONOTONIC, 0, 1, on_timer, c);
        if (r >= 0)
                r = sd_event_source_set_enabled(c->timer, SD_EVENT_OFF);
        if (r < 0)
                return r;
        c->multi = curl_multi_init();
        if (!c->multi)
                return -ENOMEM;
        if (curl_multi_setopt(c->multi, CURLMOPT_SOCKETFUNCTION, on_curl_socket) != CURLM_OK ||
            curl_multi_setopt(c->multi, CURLMOPT_SOCKETDATA, c) != CURLM_OK ||
            curl_multi_setopt(c->multi, CURLMOPT_TIMERFUNCTION, on_curl_timer) != CURLM_OK ||
            curl_multi_setopt(c->multi, CURLMOPT_TIMERDATA, c) != CURLM_OK)
                return -EIO;
        *ret = TAKE_PTR(c);
        return 0;
}

CurlEvent *curl_event_free(CurlEvent *c) {
        if (!c)
                return NULL;
        /* Closes the kept-alive connections; may still call on_curl_socket()
         * and on_curl_timer(), which need the watches, the timer and the
         * event. */
        if (c->multi)
                curl_multi_cleanup(c->multi);
        while (c->watches)
                watch_free(c, c->watches);
        sd_event_source_disable_unref(c->timer);
        sd_event_unref(c->event);
        free(c);
        return NULL;
}

void curl_event_freep(CurlEvent **c) {
        curl_event_free(*c);
}

CURLM *curl_event_multi(CurlEvent *c) {
        return c->multi;
}

void curl_event_kick(CurlEvent *c) {
        int running;

        curl_multi_socket_action(c->multi, CURL_SOCKET_TIMEOUT, 0, &running);
        c->done(c->userdata);
}
