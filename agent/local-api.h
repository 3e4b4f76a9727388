/* SPDX-License-Identifier: Apache-2.0 */
/* The agent's local API, used by tetherctl: a unix stream socket
 * (default /run/tether/tetherd.sock) carrying one JSON request and one
 * JSON response per connection (README.md, "tetherctl"). Callers are
 * checked with SO_PEERCRED/SO_PEERGROUPS: root, the agent's own user, or
 * members of the configured group; "enroll" (which replaces the device's
 * identity) only root and the agent's own user. Served from the agent's sd-event
 * loop; never blocks it: every socket is non-blocking, requests are
 * bounded in size and time. */
#pragma once

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <systemd/sd-event.h>

typedef struct LocalApi LocalApi;

typedef struct LocalApiHooks {
        void *userdata;
        /* A new status object (the "status" of the response); the local
         * API owns the reference it returns. NULL on out of memory. */
        json_t *(*status)(void *userdata);
        /* Publish an event as a plugin would; name and data borrowed.
         * Negative errno refuses it. */
        int (*publish)(void *userdata, const char *name, const char *data, uint32_t ttl, uint32_t flags);
        /* Start enrolling with token (id NULL: the default). Returns the
         * enrollment's generation (> 0), or a negative errno with the
         * reason written to error. May be NULL: not supported. */
        int (*enroll)(void *userdata, const char *token, const char *id, bool force, char *error,
                      size_t error_size);
} LocalApiHooks;

/* Largest request accepted: the biggest event data plus room for JSON
 * escaping and the other fields. */
#define LOCAL_API_REQUEST_MAX(max_payload) ((max_payload) * 6 + 4096)

/* event borrowed for the life of the API; hooks copied. */
int local_api_new(sd_event *event, const LocalApiHooks *hooks, LocalApi **ret);
LocalApi *local_api_free(LocalApi *api);
static inline void local_api_freep(LocalApi **api) { local_api_free(*api); }

/* Listen on path (rebinding only when it changed; a stale socket file is
 * replaced, a live one refused with -EADDRINUSE) and allow members of
 * group (NULL or empty: root and the agent's user only). An unknown
 * group is not an error: *ret_group_missing is set so the caller can
 * warn. Strings are copied. */
int local_api_configure(LocalApi *api, const char *path, const char *group, size_t max_request,
                        int *ret_group_missing);

/* Path the API listens on, or NULL. */
const char *local_api_path(LocalApi *api);
