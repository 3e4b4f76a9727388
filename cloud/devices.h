/* SPDX-License-Identifier: Apache-2.0 */
/* Devices (devices.c, prefixes devices_ and device_): the libcoap TLS
 * server on the sd-event loop, the device registry (who is online, the
 * describe cache, last seen) and requests from the cloud to devices.
 *
 * A Devices object owns the libcoap contexts ([Cloud] SessionShards=, all
 * on the same loop, each with the Devices as its app data), every session
 * and every Device; Device pointers stay valid until devices_free(). What devices
 * ask of the cloud (requests on /e/... and /o/...) and the end of a
 * device's session go out through DevicesHooks, which the Cloud object
 * implements (cloud.c) by forwarding to Events and Ota: this module
 * includes no other module's header but the configuration's. Errors are
 * negative errno values; ret_* parameters are untouched on failure. */
#pragma once

#include <coap3/coap.h>
#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>
#include <systemd/sd-event.h>

#include "cloud-config.h"
#include "tls.h"

typedef struct Devices Devices;
typedef struct Device Device;
typedef struct DeviceCall DeviceCall;

typedef struct DevicesHooks {
        void *userdata;
        /* A device's request on /e/... (path = the Uri-Path segments after
         * "e" joined with '/', GET or POST): fill response. Runs inside
         * libcoap's handling of the device's session. */
        void (*event_request)(void *userdata, Device *d, const coap_pdu_t *request, const char *path,
                              coap_pdu_t *response);
        /* A device's request on /o/JOB: fill response. */
        void (*ota_request)(void *userdata, Device *d, const coap_pdu_t *request, const char *job,
                            coap_pdu_t *response);
        /* A device's request on /a/SHA256 (an OTA artifact, Block2): fill
         * response. The answer's payload counts against the device's
         * MaxQueuedBytes; a device past it is answered 5.03 + Max-Age
         * without calling this. */
        void (*artifact_request)(void *userdata, Device *d, const coap_pdu_t *request, const char *sha256,
                                 coap_pdu_t *response);
        /* A device's request on /t/SID (a tunnel's or log stream's data,
         * credit or end: docs/protocol.md, "Streams: tunnels and logs";
         * sid is the segment as sent, at most 15 bytes): fill response.
         * Runs inside libcoap's handling of the device's session. */
        void (*stream_request)(void *userdata, Device *d, const coap_pdu_t *request, const char *sid,
                               coap_pdu_t *response);
        /* The device's session closed or was replaced (also from
         * devices_free()): what belongs to that session must go. */
        void (*device_gone)(void *userdata, const Device *d);
        /* May the device of peer (which passed the identity checks)
         * connect? A TlsPeerCheck: 0, or a negative errno with the reason
         * written. Runs inside every TLS handshake (on the keys loaded at
         * start and on those of devices_reload_tls()) and again just
         * before a session is bound to its device. */
        int (*peer_check)(void *userdata, const TlsPeer *peer, char *reason, size_t reason_size);
        /* The same decision on any thread: the TLS handshake threads
         * ([Cloud] HandshakeThreads=) ask it inside their handshakes. It
         * may lag behind peer_check for what is not yet committed, which
         * peer_check then catches before the session is bound. NULL: the
         * threads ask nothing and only that later check refuses. */
        int (*peer_check_thread)(void *userdata, const TlsPeer *peer, char *reason, size_t reason_size);
        /* Optional: each handshake thread calls this as it starts (what
         * peer_check_thread needs per thread is opened then, not in the
         * middle of a storm). */
        void (*handshake_thread_start)(void *userdata);
        /* d's new session (whose peer is peer) is bound: d is online. */
        void (*device_bound)(void *userdata, Device *d, const TlsPeer *peer);
        /* d answered GET /d with a describe document other than the one
         * it had (at start, the one device_restore_describe() gave it):
         * doc is its compact JSON text with sorted keys, valid during the
         * call; device_restore_describe() takes it back. Not called when a
         * device describes itself as it did before. */
        void (*described)(void *userdata, Device *d, const char *doc);
        /* A second session for d's ID while one is bound (docs/cloud.md,
         * "Duplicate identity"): established and newcomer are the two
         * peers' "ADDRESS:PORT", outcome "kept" (the newcomer was refused)
         * or "replaced" (the established session did not answer and was
         * closed). Called at most DEVICES_CONFLICT_BURST times per device
         * and DEVICES_CONFLICT_WINDOW_SEC, from the loop. */
        void (*device_conflict)(void *userdata, Device *d, const char *established, const char *newcomer,
                                const char *outcome);
        /* With [Enroll] configured: `POST /enroll` on an anonymous session
         * (one without a client certificate) from address (IP text), and
         * `POST /cert` on d's own session, whose peer is peer: fill
         * response. Never called when enrollment is off. */
        void (*enroll_request)(void *userdata, const char *address, const coap_pdu_t *request,
                               coap_pdu_t *response);
        void (*cert_request)(void *userdata, Device *d, const TlsPeer *peer, const char *address,
                             const coap_pdu_t *request, coap_pdu_t *response);
} DevicesHooks;

/* Enrollment sessions (anonymous TLS sessions, only with [Enroll]
 * configured) may send this many requests (`POST /enroll`) and this many
 * Pings; one more closes them. They are closed HandshakeTimeoutSec after
 * accept at the latest (not after their last answer, which could still
 * wait in libcoap's queue), count against MaxHandshakes, and are never a
 * device. */
#define DEVICES_ENROLL_REQUESTS_MAX 2
#define DEVICES_ENROLL_PINGS_MAX 4
/* The longest message an enrollment session may send (the bytes after
 * its RFC 8323 header: token, options, payload): a `POST /enroll` body of
 * up to 17408 bytes (cloud/enroll.c) and room for its options. A longer
 * one closes the session before libcoap buffers it (lib/tls-framing.h):
 * libcoap takes up to 8 MiB per message, which anyone could otherwise
 * make the cloud hold on every enrollment session. */
#define DEVICES_ENROLL_MESSAGE_MAX 20480
/* How often sessions whose certificate expired are looked for and closed. */
#define DEVICES_EXPIRY_CHECK_SEC 60

/* The duplicate identity policy (devices.c, device_conflict()): a new
 * session for an ID that has one waits while the established session is
 * sent a Ping; if that session answers within DEVICES_CHECK_MSEC it keeps
 * the ID and the newcomer is closed, else it is closed and the newcomer
 * bound. Past DEVICES_CONFLICT_BURST conflicts in DEVICES_CONFLICT_WINDOW_SEC
 * a newcomer is closed at once while the established session answered in
 * the last DEVICES_CONFLICT_FRESH_SEC, and conflicts are only counted. */
#define DEVICES_CHECK_MSEC 2000
#define DEVICES_CONFLICT_BURST 3
#define DEVICES_CONFLICT_WINDOW_SEC 60
#define DEVICES_CONFLICT_FRESH_SEC 5

/* Start the CoAP/TLS server; *ret_port is the bound port. event and config
 * are borrowed and must outlive the Devices; hooks is copied (every hook
 * is required). Logs what failed. */
int devices_new(sd_event *event, const CloudConfig *config, const DevicesHooks *hooks, unsigned *ret_port,
                Devices **ret);
/* Close every session and free everything (pending calls are cancelled
 * without their callbacks: free the Api first). device_gone runs for each
 * device still online. NULL is fine; returns NULL. */
Devices *devices_free(Devices *devs);
static inline void devices_freep(Devices **devs) { devices_free(*devs); }
/* Read the TLS certificate, key and CA files again for new device
 * sessions; on failure (logged) the ones loaded before stay. */
int devices_reload_tls(Devices *devs);


/* Registry; Device objects live until devices_free(). */
Device *devices_find(Devices *devs, const char *id);
/* The device id, offline, known from before (the persistent registry):
 * last heard at last_heard_usec (CLOCK_REALTIME µs, 0: never) from
 * last_ip (may be NULL). The existing one if id is known. NULL on OOM. */
Device *devices_add(Devices *devs, const char *id, uint64_t last_heard_usec, const char *last_ip);
/* Give a device added with devices_add() the describe document it
 * answered before (JSON text from the described hook, checked again with
 * proto_describe_decode()), so that it shows its functions and variables
 * while offline. -EBADMSG (nothing changes) for a document that does not
 * pass, -ENOMEM. */
int device_restore_describe(Device *d, const char *doc);
const char *device_id(const Device *d);
/* CLOCK_REALTIME µs of the last message from the device (0: never). */
uint64_t device_last_heard(const Device *d);
/* The IP address of its last session ("" if none). */
const char *device_last_ip(const Device *d);
bool device_connected(const Device *d);
/* The device's session if it is ESTABLISHED, else NULL. */
coap_session_t *device_session(const Device *d);
/* Close the device's session now: requests still arriving on it are
 * refused (5.03), pending calls fail, the device reconnects. */
void device_disconnect(Device *d, const char *reason);
/* Cluster mode: the node holding d's session when another one does
 * (NULL: none); device_to_json() counts such a device online. */
int device_set_elsewhere(Device *d, const char *node);
const char *device_elsewhere(const Device *d);
/* A new JSON object in the Particle device shape; with details, also
 * "functions" and "variables" from the describe cache. NULL on OOM. */
json_t *device_to_json(const Device *d, bool details);
/* A new JSON array of all known devices. */
json_t *devices_to_json(Devices *devs);
/* How many devices are known (online or not). */
size_t devices_count(Devices *devs);
/* The i'th device (0 first) in the order they were first seen, NULL past
 * the end. */
Device *devices_at(Devices *devs, size_t i);
/* A new JSON array of at most limit devices from the offset'th (0 first)
 * in the order they were first seen; costs the devices returned. NULL on
 * OOM. */
json_t *devices_page_to_json(Devices *devs, size_t offset, size_t limit);
unsigned devices_online_count(Devices *devs);

/* Completion of a request to a device. error is 0 with the response
 * code and payload (valid only during the call), or -ETIMEDOUT (no answer
 * within CallTimeoutSec), -ENOTCONN (the session closed) or -ECONNRESET
 * (the device connected again; the old session is gone). Never called
 * from within devices_call(). */
typedef void (*device_call_fn)(int error, unsigned code, const uint8_t *data, size_t len,
                               void *userdata);

/* Send "METHOD /path0/name" with an optional payload to the device.
 * Returns -ENOTCONN if the device has no established session, -ENOBUFS if
 * it has not read MaxQueuedBytes sent to it, -E2BIG if the PDU cannot be
 * built within the session's limits. On success the
 * callback runs exactly once unless devices_call_cancel() is called
 * first; *ret_call (may be NULL) identifies the call until then. */
int devices_call(Device *d, coap_pdu_code_t method, const char *path0, const char *name,
                 const void *payload, size_t len, device_call_fn cb, void *userdata,
                 DeviceCall **ret_call);
/* devices_call() with Uri-Query options and a Content-Format: query is
 * NULL or a NULL-terminated array of options (each at most 255 bytes),
 * cf the payload's Content-Format (-1: none). Errors as devices_call(). */
int devices_request(Device *d, coap_pdu_code_t method, const char *path0, const char *name,
                    const char *const *query, int cf, const void *payload, size_t len, device_call_fn cb,
                    void *userdata, DeviceCall **ret_call);
/* Forget a pending call; its callback will not run. NULL is fine. */
void devices_call_cancel(DeviceCall *call);

/* Queue pdu (always taken) on the device's session, counting len payload
 * bytes against MaxQueuedBytes. -ENOTCONN, -ENOBUFS (the device has not
 * read MaxQueuedBytes: pdu dropped), -EIO. */
int device_send(Device *d, coap_pdu_t *pdu, size_t len);
/* Queue an event notification for a subscription: a NON 2.05 with token,
 * Observe observe and the JSON payload (len bytes, copied). Errors as
 * device_send(), and -ENOMEM, -E2BIG (larger than the device takes). */
int device_notify(Device *d, const uint8_t *token, size_t token_len, uint32_t observe, const char *json,
                  size_t len);
/* d's certificate was renewed: its session's certificate counts as
 * valid until not_after (Unix seconds) from now on. Sessions whose
 * certificate expired are closed (checked every DEVICES_EXPIRY_CHECK_SEC). */
void device_cert_renewed(Device *d, int64_t not_after);

/* An event (len bytes of JSON) could not be delivered to d for error (from
 * device_send, or -E2BIG): logged once per episode or connection. */
void device_event_undeliverable(Device *d, const char *name, size_t len, int error);
