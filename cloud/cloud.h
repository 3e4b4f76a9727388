/* SPDX-License-Identifier: Apache-2.0 */
/* tether-cloudd: the reference device cloud. Modules, each one object
 * created with *_new() and freed with *_free(), and their prefixes:
 *   config.c   cloud_config_  keyfile, command line, API tokens (cloud-config.h)
 *   journal.c  journal_  the event journal: de-duplication, SSE replay (journal.h)
 *   journal-seek.c journal_seek_ where to start reading the journal for an id
 *   events.c   events_   device publish/subscribe and the event router (events.h)
 *   devices.c  devices_  libcoap server, device registry, requests to devices (devices.h)
 *   subscriptions.c sub_ the index of subscriptions by prefix (subscriptions.h)
 *   api.c      api_      HTTP API on libmicrohttpd (Particle Cloud API shapes)
 *   api-list.c api_      GET /v1/devices, whole or by page
 *   ota.c      ota_      OTA jobs, status reports, artifact hosting over HTTPS
 *   cloud.c    cloud_    the Cloud object: the loop, signals, sd_notify, the wiring
 *   main.c               command line, process setup
 *
 * Dependencies point one way (a -> b: a calls b directly); calls the other
 * way go through hook structs that cloud.c implements:
 *
 *   Cloud ---owns---> Api, Ota, Devices, Events, Journal, CloudConfig
 *   Api ----> Ota, Devices, Events, Journal
 *   Ota ----> Devices, Events, Journal
 *   Events -> Journal;  EventsHooks -> Devices (notify, disconnect), Api (streams)
 *   Devices -> (none);  DevicesHooks -> Events (/e requests, device gone), Ota (/o)
 *
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
#include "devices.h"
#include "events.h"
#include "journal.h"
#include "proto.h"

struct MHD_Connection;

/* ---- cloud.c ---------------------------------------------------------- */

typedef struct Cloud Cloud;

/* Create the loop, start every module (listening sockets, journal) and
 * wire them. Takes config (also on failure). Logs what failed. */
int cloud_new(CloudConfig *config, Cloud **ret);
/* Run the loop until SIGTERM or SIGINT; SIGHUP reloads the API tokens.
 * Returns what sd_event_loop() returned. */
int cloud_run(Cloud *c);
/* Stops every module in order (users, devices, events, journal). NULL is
 * fine; returns NULL. */
Cloud *cloud_free(Cloud *c);
static inline void cloud_freep(Cloud **c) { cloud_free(*c); }


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
/* GET /v1/devices?page=N&per_page=M (Particle's product device list):
 * either present asks for a page. */
#define API_PAGE_DEFAULT_PER_PAGE 25
#define API_PAGE_MAX_PER_PAGE 1000
#define API_PAGE_MAX 1000000000
typedef struct ApiPage {
        bool paged;
        size_t page;     /* 1 first */
        size_t per_page;
} ApiPage;
/* page and per_page as given (NULL: absent). 0, or -EINVAL with a message
 * for the client (a static string). */
int api_parse_page(const char *page, const char *per_page, ApiPage *ret, const char **ret_error);
/* The response to GET /v1/devices (api-list.c): the plain array of every
 * device unless p->paged, else one page and its meta. NULL on OOM. */
json_t *api_devices_list(Devices *devs, const ApiPage *p);

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

int api_start(sd_event *event, const CloudConfig *config, Journal *journal, Devices *devices, Events *events,
              unsigned *ret_port);
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
int ota_server_start(sd_event *event, const CloudConfig *config, Journal *journal, Devices *devices,
                     Events *events, unsigned *ret_port);
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
