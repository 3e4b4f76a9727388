/* tether-cloudd: the reference device cloud. Modules and their prefixes:
 *   config.c   config_   keyfile, command line, API tokens
 *   devices.c  devices_  libcoap server, device registry, requests to devices
 *   events.c   events_   device publish/subscribe and the event router
 *   api.c      api_      HTTP API on libmicrohttpd (Particle Cloud API shapes)
 *   main.c               sd-event loop, sd_notify, signals
 * Everything runs on one sd-event loop; no threads. Errors are negative
 * errno values; ret_* parameters are untouched on failure. */
#pragma once

#include <coap3/coap.h>
#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/socket.h>
#include <systemd/sd-event.h>

#include "proto.h"

#define CLOUD_PROGRAM "tether-cloudd"
#define CLOUD_DEFAULT_CONFIG SYSCONFDIR "/tether/tether-cloudd.conf"
#define CONFIG_TOKEN_DIGEST_SIZE 32 /* SHA-256 */

/* ---- config.c ------------------------------------------------------- */

typedef struct CloudConfig {
        char *path; /* the file read */

        /* [Cloud] */
        char *coap_listen;
        unsigned coap_port;
        char *ca_file;
        char *cert_file;
        char *key_file;
        unsigned max_payload;
        unsigned max_subscriptions;
        unsigned ping_sec;
        unsigned device_timeout_sec;
        unsigned call_timeout_sec;
        unsigned handshake_timeout_sec; /* accept to bound device */
        unsigned max_handshakes;        /* sessions not yet bound to a device */
        unsigned max_queued_bytes;      /* sent to a device, not known to be read */

        /* [API] */
        char *api_listen;
        unsigned api_port;
        char *token_file;
        unsigned max_connections_per_ip; /* 0: no limit */

        /* SHA-256 digests of the tokens in TokenFile (never the tokens). */
        uint8_t (*token_digests)[CONFIG_TOKEN_DIGEST_SIZE];
        size_t n_tokens;
} CloudConfig;

/* Parse the command line. Returns 0 and sets *ret_path (pointing into argv
 * or to the default) to run; 1 if --help/--version was handled and the
 * program should exit successfully; -EINVAL on a usage error (logged). */
int config_parse_argv(int argc, char *argv[], const char **ret_path);

/* Read the keyfile at path and the token file it names. Logs every
 * problem as "FILE:LINE: ..." and returns a negative errno on the first
 * bad value. *ret is owned by the caller (config_free). */
int config_load(const char *path, CloudConfig **ret);
CloudConfig *config_free(CloudConfig *c);
static inline void config_freep(CloudConfig **c) { config_free(*c); }

/* True if token (NUL-terminated) is one of the configured tokens;
 * constant time in the token's content. */
bool config_token_valid(const CloudConfig *c, const char *token);

/* Resolve a numeric or host-name listen address plus port. */
int config_resolve_address(const char *host, unsigned port, struct sockaddr_storage *ret,
                           socklen_t *ret_len);

/* ---- devices.c ------------------------------------------------------ */

typedef struct Device Device;
typedef struct DeviceCall DeviceCall;

/* Start the CoAP/TLS server; *ret_port is the bound port. */
int devices_start(sd_event *event, const CloudConfig *config, unsigned *ret_port);
/* Close every session and free everything (pending calls are cancelled
 * without their callbacks: call api_stop() first). */
void devices_stop(void);

/* Run libcoap soon from the loop: call after sending from outside a
 * libcoap callback (HTTP handlers, timers). */
void devices_kick(void);

/* Registry; Device objects live until devices_stop(). */
Device *devices_find(const char *id);
const char *device_id(const Device *d);
bool device_connected(const Device *d);
/* The device's session if it is ESTABLISHED, else NULL. */
coap_session_t *device_session(const Device *d);
/* A new JSON object in the Particle device shape; with details, also
 * "functions" and "variables" from the describe cache. NULL on OOM. */
json_t *device_to_json(const Device *d, bool details);
/* A new JSON array of all known devices. */
json_t *devices_to_json(void);
unsigned devices_online_count(void);

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
/* Forget a pending call; its callback will not run. NULL is fine. */
void devices_call_cancel(DeviceCall *call);

/* Queue pdu (always taken) on the device's session, counting len payload
 * bytes against MaxQueuedBytes. -ENOTCONN, -ENOBUFS (the device has not
 * read MaxQueuedBytes: pdu dropped), -EIO. */
int device_send(Device *d, coap_pdu_t *pdu, size_t len);
/* An event (len bytes of JSON) could not be delivered to d for error (from
 * device_send, or -E2BIG): logged once per episode or connection. */
void device_event_undeliverable(Device *d, const char *name, size_t len, int error);

/* ---- events.c ------------------------------------------------------- */

void events_init(const CloudConfig *config);
void events_stop(void);

/* Handle a device request on /e/... (path = the Uri-Path segments after
 * "e" joined with '/'); fills response. */
void events_handle_request(Device *d, coap_session_t *session, const coap_pdu_t *request,
                           const char *path, coap_pdu_t *response);
/* The device's session closed: its subscriptions die. */
void events_device_gone(Device *d);

/* Route an event to SSE clients and to devices' subscriptions; source is
 * the publishing device (it does not get its own event) or NULL. */
void events_route(const ProtoEvent *e, const Device *source);

/* ---- api.c ---------------------------------------------------------- */

int api_start(sd_event *event, const CloudConfig *config, unsigned *ret_port);
/* Answer or drop every open request and stop the HTTP server. */
void api_stop(void);
/* Queue an event for every matching SSE client. */
void api_deliver_event(const ProtoEvent *e);
