/* tether-cloudd: the reference device cloud. Modules and their prefixes:
 *   config.c   config_   keyfile, command line, API tokens
 *   devices.c  devices_  libcoap server, device registry, requests to devices
 *   events.c   events_   device publish/subscribe and the event router
 *   api.c      api_      HTTP API on libmicrohttpd (Particle Cloud API shapes)
 *   ota.c      ota_      OTA jobs, status reports, artifact hosting over HTTPS
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

struct MHD_Connection;

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

        /* [API] */
        char *api_listen;
        unsigned api_port;
        char *token_file;

        /* [OTA]: artifact hosting is on when ota_dir is set */
        char *ota_dir;
        char *ota_listen; /* NULL: [Cloud] Listen= */
        unsigned ota_port;
        char *ota_public_url; /* NULL: https://LISTEN:PORT */
        unsigned ota_max_artifact_mb;

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
 * within CallTimeoutSec) or -ENOTCONN (the session closed). Never called
 * from within devices_call(). */
typedef void (*device_call_fn)(int error, unsigned code, const uint8_t *data, size_t len,
                               void *userdata);

/* Send "METHOD /path0/name" with an optional payload to the device.
 * Returns -ENOTCONN if the device has no established session, -E2BIG if
 * the PDU cannot be built within the session's limits. On success the
 * callback runs exactly once unless devices_call_cancel() is called
 * first; *ret_call (may be NULL) identifies the call until then. */
int devices_call(Device *d, coap_pdu_code_t method, const char *path0, const char *name,
                 const void *payload, size_t len, device_call_fn cb, void *userdata,
                 DeviceCall **ret_call);
/* Forget a pending call; its callback will not run. NULL is fine. */
void devices_call_cancel(DeviceCall *call);

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
/* Run the HTTP server soon (after resuming a connection from outside). */
void api_kick(void);
/* Whether the request carries a valid token in the Authorization header
 * or the access_token query parameter. */
bool api_connection_authorized(struct MHD_Connection *connection);

/* ---- ota.c ---------------------------------------------------------- */

typedef struct OtaRequest OtaRequest;

/* Start artifact hosting (HTTPS with client certificates) when
 * [OTA] ArtifactDirectory= is set; *ret_port is its port, 0 when off. */
int ota_start(sd_event *event, const CloudConfig *config, unsigned *ret_port);
void ota_stop(void);
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
