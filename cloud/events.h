/* SPDX-License-Identifier: Apache-2.0 */
/* Events (events.c, prefix events_): device publishes (POST /e/{name}),
 * device subscriptions (GET /e/{prefix} with Observe), and the router that
 * hands every event to the event streams and to the subscribed devices.
 *
 * An Events object knows devices only as opaque Device pointers: what it
 * needs from them (their id, sending a notification, closing a session)
 * and the way to the event streams go through EventsHooks, which the
 * Cloud object implements (cloud.c). It calls the Journal directly
 * (journal.h), the one module below it. Nothing here blocks or logs per
 * event except what is said below; errors are negative errno values. */
#pragma once

#include <coap3/coap.h>
#include <stdbool.h>
#include <stdint.h>

#include "cloud-config.h"
#include "journal.h"
#include "proto.h"

typedef struct Device Device; /* the device registry's (devices.h) */
typedef struct Events Events;

typedef struct EventsHooks {
        void *userdata;
        /* The device's id; borrowed, valid as long as the device. */
        const char *(*device_id)(void *userdata, const Device *d);
        /* Send one notification to device d: a 2.05 with the subscription's
         * token and Observe value observe, payload json (len bytes, copied).
         * Returns 0; -ENOTCONN if d has no established session (nothing
         * was sent, not an error); or another negative errno (-ENOBUFS,
         * -E2BIG, ...) passed on to undeliverable. May close d's session
         * (then on_device_gone may run inside this call). */
        int (*notify)(void *userdata, Device *d, const uint8_t *token, size_t token_len, uint32_t observe,
                      const char *json, size_t len);
        /* An event of len bytes could not be delivered to d (error from
         * notify). May be NULL. */
        void (*undeliverable)(void *userdata, Device *d, const char *name, size_t len, int error);
        /* Close d's session (it published an event that could not be
         * stored); called from within events_handle_request(). */
        void (*disconnect)(void *userdata, Device *d, const char *reason);
        /* Hand e (journal id id) to the event streams. May be NULL. */
        void (*deliver_to_streams)(void *userdata, const ProtoEvent *e, uint64_t id);
        /* Routing sent at least one notification: get it on the wire
         * soon. May be NULL. */
        void (*flush)(void *userdata);
        /* Store e somewhere else than the Journal (cluster mode: the
         * cluster's journal, cloud/journal-nats.h), synchronously: 0 when
         * it is stored for good (*ret_duplicate: it was already, a resend
         * of device event (epoch, seq); seq 0: no sequence number), a
         * negative errno when it is not. Routing is then not done here:
         * the event comes back from there with its id and the owner
         * routes it (events_route()). NULL: journal_append() and
         * events_route() (one node). */
        int (*store)(void *userdata, const ProtoEvent *e, uint64_t epoch, uint64_t seq, bool *ret_duplicate);
} EventsHooks;

/* config and journal are borrowed and must outlive the Events; hooks is
 * copied (device_id, notify and disconnect are required). -ENOMEM. */
int events_new(const CloudConfig *config, Journal *journal, const EventsHooks *hooks, Events **ret);
/* Drops every subscription. NULL is fine; returns NULL. */
Events *events_free(Events *ev);
static inline void events_freep(Events **ev) { events_free(*ev); }

/* Handle a device request on /e/... (path = the Uri-Path segments after
 * "e" joined with '/'): POST publishes, GET with Observe subscribes or
 * cancels. Fills response. */
void events_handle_request(Events *ev, Device *d, const coap_pdu_t *request, const char *path,
                           coap_pdu_t *response);
/* The device's session closed: its subscriptions die (safe while
 * events_route() is on the stack). */
void events_device_gone(Events *ev, const Device *d);

/* Take one event and cost bytes from device d's publishing limits (the
 * buckets of its events, [Events] DeviceEventRate= and the like) for
 * something else it sends that the cloud journals and routes like an
 * event: an OTA status report (ota.c). 0 and they are taken; or the
 * seconds to wait (at least 1, for a 4.29's Max-Age) and nothing is
 * taken. It does not wait for, nor end, the hold on d's refused events
 * (events.c, EventsQuota). Out of memory lets it through. Logs one line
 * per device and minute while d is past its limits. */
unsigned events_device_charge(Events *ev, const Device *d, size_t cost);

/* Store an event (journal_append(), or EventsHooks.store) and route it
 * (now, or when it comes back through the store, see there): every event
 * the cloud itself publishes (the API's, OTA's, the cloud's about
 * devices) goes this way. source as events_route(); epoch and seq as
 * journal_append(). 0, or the store's negative errno (nothing stored,
 * nothing routed). *ret_duplicate (may be NULL): the store had it. */
int events_store(Events *ev, const ProtoEvent *e, const Device *source, uint64_t epoch, uint64_t seq,
                 bool *ret_duplicate);

/* Route an event to the streams and to devices' subscriptions; source is
 * the publishing device (it does not get its own event) or NULL; id is
 * its journal id (journal_append()). A private event goes to the
 * streams only, unless the API published it (coreid "api"): no device
 * gets another device's private events, nor the cloud's private events
 * about a device. */
void events_route(Events *ev, const ProtoEvent *e, const Device *source, uint64_t id);
