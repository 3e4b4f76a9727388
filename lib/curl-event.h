/* SPDX-License-Identifier: Apache-2.0 */
/* libcurl's multi interface on an sd-event loop, shared by the OTA
 * download (agent/ota-download.c) and the webhook sink
 * (cloud/sink-webhook.c). A CurlEvent owns one CURLM, one IO source per
 * socket libcurl asks to watch and one time source for libcurl's timer.
 * The owner adds and removes its easy handles on curl_event_multi() and
 * reads the finished transfers (curl_multi_info_read()) in done().
 *
 * Guarantees:
 * - done(userdata) runs after every curl_multi_socket_action() this
 *   module makes, after libcurl returned: from the loop (a socket ready,
 *   the timer due) or from curl_event_kick(). Never from inside
 *   curl_multi_add_handle() or any other libcurl call the owner makes:
 *   adding a handle only arms the timer, so its transfer starts on the
 *   loop.
 * - The timer is never early: libcurl rounds the time left down to whole
 *   milliseconds and asks again only when its next deadline changes, so
 *   a timer that fired before the deadline would find nothing due and
 *   never be armed again. It is armed for timeout_ms + 999 µs with 1 µs
 *   accuracy (sd-event's default would be 250 ms): up to a millisecond
 *   late, never early.
 * - A socket's IO source follows what libcurl asks for (re-enabled when
 *   asked again), is gone on CURL_POLL_REMOVE, and EPOLLERR/EPOLLHUP
 *   reach libcurl as CURL_CSELECT_ERR. Any number of sockets.
 * - curl_event_free() cleans up the multi handle first (libcurl may
 *   still call back to close its sockets), then frees every source left;
 *   done() is not called from it. The owner removes its easy handles
 *   before.
 *
 * Library code: no logging, negative errno values. The program links
 * libcurl itself ($(CURL_LIBS)). */
#pragma once

#include <curl/curl.h>
#include <systemd/sd-event.h>

typedef struct CurlEvent CurlEvent;

/* Called after each curl_multi_socket_action(); read curl_multi_info_read()
 * here. Nothing touches the CurlEvent after done() returns, so done() may
 * free it. */
typedef void (*CurlEventDone)(void *userdata);

int curl_event_new(sd_event *event, CurlEventDone done, void *userdata, CurlEvent **ret);
CurlEvent *curl_event_free(CurlEvent *c);
void curl_event_freep(CurlEvent **c);

/* The multi handle, for curl_multi_add_handle(), curl_multi_remove_handle(),
 * curl_multi_info_read() and CURLMOPT_ options other than the socket and
 * timer functions (which are ours). */
CURLM *curl_event_multi(CurlEvent *c);

/* Run libcurl's timeout now (curl_multi_socket_action(CURL_SOCKET_TIMEOUT))
 * and then done(), before returning. */
void curl_event_kick(CurlEvent *c);
