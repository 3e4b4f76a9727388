/* SPDX-License-Identifier: Apache-2.0 */
/* tether-cloudd: the reference device cloud. Modules and their prefixes:
 *   config.c   cloud_config_  keyfile, command line, API tokens
 *   devices.c  devices_  libcoap server, device registry, requests to devices
 *   events.c   events_   device publish/subscribe and the event router
 *   journal.c  journal_  the event journal: de-duplication, SSE replay
 *   api.c      api_      HTTP API on libmicrohttpd (Particle Cloud API shapes)
 *   ota.c      ota_      OTA jobs, status reports, artifact hosting over HTTPS
 *   main.c               sd-event loop, sd_notify, signals
 * Everything runs on one sd-event loop; no threads. Errors are negative
 * errno values; ret_* parameters are untouched on failure. */
#pragma once

#include <coap3/coap.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/socket.h>
#include <systemd/sd-event.h>

#include "cloud-config.h"
#include "journal.h"
#include "proto.h"

struct MHD_Connection;


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
/* Close the device's session now: requests still arriving on it are
 * refused (5.03), pending calls fail, the device reconnects. */
void device_disconnect(Device *d, const char *reason);
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

void events_init(const CloudConfig *config, Journal *journal);
void events_stop(void);

/* Handle a device request on /e/... (path = the Uri-Path segments after
 * "e" joined with '/'); fills response. */
void events_handle_request(Device *d, coap_session_t *session, const coap_pdu_t *request,
                           const char *path, coap_pdu_t *response);
/* The device's session closed: its subscriptions die. */
void events_device_gone(const Device *d);

/* Route an event to SSE clients and to devices' subscriptions; source is
 * the publishing device (it does not get its own event) or NULL; id is
 * its journal id (journal_append()). */
void events_route(const ProtoEvent *e, const Device *source, uint64_t id);

/* ---- api-request.c -------------------------------------------------- */

/* What api_parse_request() looks at: the request line, three headers
 * (NULL when absent), the access_token query parameter (which may hold NUL
 * bytes: query_token_len is its real length) and the body. */
typedef struct ApiInput {
        const char *method;
        const char *url;
        const char *content_type;
        const char *authorization;
        const char *query_token;
        size_t query_token_len;
        bool query_token_present;
        const char *last_event_id;
        const char *body;
        size_t body_len;
} ApiInput;

typedef enum ApiRoute {
        API_ROUTE_NOT_FOUND,
        API_ROUTE_BAD_BODY,          /* Content-Type JSON but not an object */
        API_ROUTE_STREAM,            /* GET .../events[/PREFIX] */
        API_ROUTE_LIST,              /* GET /v1/devices */
        API_ROUTE_PUBLISH,           /* POST /v1/devices/events */
        API_ROUTE_NO_DEVICE,         /* a device ID that cannot exist */
        API_ROUTE_DEVICE,            /* GET /v1/devices/ID */
        API_ROUTE_UPDATE,            /* PUT /v1/devices/ID (an OTA job) */
        API_ROUTE_DEVICE_BAD_METHOD, /* anything else on /v1/devices/ID[/X] */
        API_ROUTE_CALL,              /* POST /v1/devices/ID/FN */
        API_ROUTE_READ,              /* GET /v1/devices/ID/VAR */
} ApiRoute;

typedef struct ApiParsed {
        ApiRoute route;
        json_t *params; /* form or JSON body as an object, or NULL; owned */
        const char *token; /* into the input or params; NULL if none */
        char device[PROTO_DEVICE_ID_MAX + 1];
        bool stream_device; /* STREAM: only events from device */
        const char *prefix; /* STREAM: into the URL */
        const char *name;   /* CALL, READ: into the URL, not checked yet */
        bool has_last_event_id;
        uint64_t last_epoch, last_id;
} ApiParsed;

/* Parse and route a request. Only -ENOMEM fails; everything the client
 * got wrong is a route. *ret is the caller's (api_parsed_done()). */
int api_parse_request(const ApiInput *in, ApiParsed *ret);
void api_parsed_done(ApiParsed *p);

/* application/x-www-form-urlencoded into a JSON object of strings (not
 * checked for UTF-8 here: every use checks). NULL on OOM. */
json_t *api_parse_form(const char *body, size_t len);
/* A parameter as text: strings as they are (they may hold NUL bytes: check
 * *ret_len), numbers and booleans in their JSON spelling (written to buf).
 * Returns 1, 0 if absent or null, -EINVAL for an array or object. */
int api_param(json_t *params, const char *key, const char **ret, size_t *ret_len, char buf[static 32]);
/* The same for a parameter that must be plain text (no NUL byte). */
int api_param_text(json_t *params, const char *key, const char **ret, size_t *ret_len, char buf[static 32]);
/* The token from the Authorization header or the query string. Returns
 * true if either is present (then *ret_token is the token, or NULL if it
 * is unusable: another scheme, NUL bytes), false if the token can only be
 * in the body. */
bool api_outside_token(const ApiInput *in, const char **ret_token);
/* An SSE id "EPOCH-ID" (hex, decimal): 0 or -EINVAL. */
int api_parse_last_event_id(const char *s, uint64_t *ret_epoch, uint64_t *ret_id);

/* POST /v1/devices/events parameters; strings point into params. */
typedef struct ApiPublish {
        char name[TETHER_EVENT_NAME_MAX + 1];
        const char *data; /* NULL: no data */
        size_t data_len;
        char data_buf[32];
        bool private_;
        uint32_t ttl;
} ApiPublish;

/* 0, or -EINVAL with the HTTP status and a message for the client. */
int api_parse_publish(json_t *params, unsigned max_payload, ApiPublish *ret, unsigned *ret_status,
                      const char **ret_error);

/* ---- api.c ---------------------------------------------------------- */

int api_start(sd_event *event, const CloudConfig *config, Journal *journal, unsigned *ret_port);
/* Answer or drop every open request and stop the HTTP server. */
void api_stop(void);
/* Queue an event (journal id) for every matching SSE client that is not
 * catching up from the journal. */
void api_deliver_event(const ProtoEvent *e, uint64_t id);
/* End every event stream whose token is no longer valid (after a reload
 * of the tokens): cleanly, after what is already queued for it. Returns
 * how many were ended. */
unsigned api_end_revoked_streams(void);
/* Run the HTTP server soon (after resuming a connection from outside). */
void api_kick(void);
/* Log a libmicrohttpd message (its MHD_OPTION_EXTERNAL_LOGGER): a warning
 * while starting, debug once running. */
void api_log_mhd(bool running, const char *server, const char *fmt, va_list ap);
/* Whether the request carries a valid token in the Authorization header
 * or the access_token query parameter. */
bool api_connection_authorized(struct MHD_Connection *connection);

/* ---- ota.c ---------------------------------------------------------- */

typedef struct OtaRequest OtaRequest;

/* Start artifact hosting (HTTPS with client certificates) when
 * [OTA] ArtifactDirectory= is set; *ret_port is its port, 0 when off. */
int ota_server_start(sd_event *event, const CloudConfig *config, Journal *journal, unsigned *ret_port);
void ota_server_stop(void);
/* Whether the API request for url belongs to ota.c (/v1/ota/...). */
bool ota_api_owns(const char *url);
/* MHD access handler for those requests (the token is checked by api.c);
 * *state is ota.c's, freed by ota_api_request_free(). */
int ota_api_handler(struct MHD_Connection *connection, const char *url, const char *method,
                    const char *upload_data, size_t *upload_data_size, OtaRequest **state);
OtaRequest *ota_api_request_free(OtaRequest *state);
/* Resume every waiting request before the API server stops. */
void ota_api_shutdown(void);
/* PUT /v1/devices/ID with "manifest": start a job. Returns the HTTP
 * status and sets *ret_body (a new JSON object). */
unsigned ota_api_start_job(Device *d, json_t *params, json_t **ret_body);
/* A device's request on /o/JOB (a status report). */
void ota_device_request(Device *d, const coap_pdu_t *request, const char *job, coap_pdu_t *response);
