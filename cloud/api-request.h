/* SPDX-License-Identifier: Apache-2.0 */
/* Parsing and routing of HTTP API requests (api-request.c, prefix api_):
 * pure functions of the request's method, URL, a few headers and the body,
 * so they can be fuzzed without a server (tests/fuzz/fuzz-api-request.c).
 * They neither log nor touch the loop; the Api (api.h) acts on the
 * result. Everything the client got wrong is a route or -EINVAL with a
 * message for it; only -ENOMEM is the cloud's failure. Strings returned
 * point into the input (or its params) and live as long as it does. */
#pragma once

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "proto.h"
#include "scopes.h"
#include "util.h"

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
        API_ROUTE_BAD_BODY,          /* Content-Type JSON but not an object: body_error says why */
        API_ROUTE_STREAM,            /* GET .../events[/PREFIX] */
        API_ROUTE_LIST,              /* GET /v1/devices */
        API_ROUTE_PUBLISH,           /* POST /v1/devices/events */
        API_ROUTE_NO_DEVICE,         /* a device ID that cannot exist */
        API_ROUTE_DEVICE,            /* GET /v1/devices/ID */
        API_ROUTE_UPDATE,            /* PUT /v1/devices/ID (name, notes, tags; or an OTA job) */
        API_ROUTE_DEVICE_BAD_METHOD, /* anything else on /v1/devices/ID[/X] */
        API_ROUTE_CALL,              /* POST /v1/devices/ID/FN */
        API_ROUTE_READ,              /* GET /v1/devices/ID/VAR */
        API_ROUTE_TOKENS,            /* GET (list), POST (create) /v1/tokens; others: 405 */
        API_ROUTE_TOKEN,             /* DELETE /v1/tokens/ID (revoke); others: 405 */
        API_ROUTE_AUDIT,             /* GET /v1/audit; others: 405 */
        API_ROUTE_REGISTER,          /* POST /v1/devices {"id": ID} */
        API_ROUTE_REVOKE,            /* PUT /v1/devices/ID/revocation [{"reason": TEXT}] */
        API_ROUTE_UNREVOKE,          /* DELETE /v1/devices/ID/revocation */
        API_ROUTE_PROVISIONS,        /* GET (list), POST (create) /v1/provision; others: 405 */
        API_ROUTE_PROVISION,         /* GET, DELETE (revoke) /v1/provision/ID; others: 405 */
        API_ROUTE_WEBHOOKS,          /* GET (list), POST (create) /v1/webhooks; others: 405 */
        API_ROUTE_WEBHOOK,           /* GET, DELETE /v1/webhooks/NAME; others: 405 */
        API_ROUTE_INTEGRATIONS,      /* GET /v1/integrations; others: 405 */
        API_ROUTE_OTA_JOB,           /* POST /v1/ota/jobs {"device","manifest"} */
        API_ROUTE_CAMPAIGNS,         /* GET (list), POST (create) /v1/campaigns; others: 405 */
        API_ROUTE_CAMPAIGN,          /* GET /v1/campaigns/ID[/devices], POST /v1/campaigns/ID/ACTION */
        API_ROUTE_TOKEN_CURRENT,     /* GET /v1/access_tokens/current: what the calling token may do */
} ApiRoute;

#define API_BODY_ERROR_MAX 256
/* Memory jansson may take to parse a body of n bytes: 16 times its text
 * (100,000 short device IDs cost 9 times theirs; values of 2 bytes, 20
 * times), at most 64 MiB, plus 1 MiB. Past it the body is BAD_BODY. */
#define API_PARSE_MEMORY_MAX(n) (((n) < 4u * 1024 * 1024 ? (size_t)(n) * 16 : (size_t)64 * 1024 * 1024) + 1024u * 1024)

typedef struct ApiParsed {
        ApiRoute route;
        json_t *params; /* form or JSON body as an object, or NULL; owned */
        const char *token; /* into the input or params; NULL if none */
        char device[PROTO_DEVICE_ID_MAX + 1];
        bool stream_device; /* STREAM: only events from device */
        const char *prefix; /* STREAM: into the URL */
        const char *name;   /* CALL, READ: into the URL, not checked yet; TOKEN, PROVISION: the id; WEBHOOK: the name;
                             CAMPAIGN: the id, up to '/' */
        const char *sub;    /* CAMPAIGN: what follows "ID/" (NULL: nothing) */
        bool has_last_event_id;
        uint64_t last_epoch, last_id;
        char body_error[API_BODY_ERROR_MAX]; /* BAD_BODY: what is wrong, printable ASCII */
} ApiParsed;

/* Parse and route a request. Only -ENOMEM fails; everything the client
 * got wrong is a route. *ret is the caller's (api_parsed_done()). */
int api_parse_request(const ApiInput *in, ApiParsed *ret);
void api_parsed_done(ApiParsed *p);

/* The scope (scopes.h) a request on route needs: 0 for routes any valid
 * token may reach (they answer 400 or 404 whatever the token). */
unsigned api_route_scope(ApiRoute route);

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

/* Whether path, a URL path before unescaping, holds an escape no API path
 * may hold: %00 anywhere (decoded, it would cut the path short), %2F or
 * %2f (an encoded '/') anywhere but in the PREFIX of an event stream's
 * path (/v1/events/PREFIX, /v1/devices/events/PREFIX,
 * /v1/devices/ID/events/PREFIX), where '/' is part of the event name and
 * clients such as particle-api-js encode it. Elsewhere a decoded '/'
 * would split a name into segments of another route. Returns the escape as
 * written, or NULL. */
const char *api_bad_escape(const char *path);

/* An SSE id "EPOCH-ID" (hex, decimal): 0 or -EINVAL. */
int api_parse_last_event_id(const char *s, uint64_t *ret_epoch, uint64_t *ret_id);

/* The reason of a revocation (may be absent: *ret NULL): at most
 * API_REASON_MAX bytes of UTF-8 text without control characters. 0, or
 * -EINVAL with a message for the client. */
#define API_REASON_MAX 160
int api_parse_reason(json_t *params, const char **ret, const char **ret_error);

/* POST /v1/devices/events parameters; strings point into params. */
typedef struct ApiPublish {
        char name[TETHER_EVENT_NAME_MAX + 1];
        const char *data; /* NULL: no data */
        size_t data_len;
        char data_buf[32];
        bool private_;
        uint32_t ttl;
} ApiPublish;

/* 0, or -EINVAL with the HTTP status and a message for the client (403 for
 * a name under "tether/", the cloud's: proto_event_name_reserved()). */
int api_parse_publish(json_t *params, unsigned max_payload, ApiPublish *ret, unsigned *ret_status,
                      const char **ret_error);

/* A refusal: *ret_body becomes {"ok": false, "error": TEXT} (TEXT is fmt's
 * output, cut to 255 bytes; *ret_body is NULL on OOM) and the status is
 * returned, so that a handler can "return api_fail(...)". */
unsigned api_fail(json_t **ret_body, unsigned status, const char *fmt, ...) _printf_(3, 4);

/* An RFC 3339 time ("2030-01-31T12:00:00Z", "...T12:00:00.5+02:00",
 * a lowercase t or z too; s is len bytes, NUL-terminated) in Unix seconds
 * (fractions dropped): 0 or -EINVAL. A leap second (":60") is refused. */
int api_parse_rfc3339(const char *s, size_t len, int64_t *ret);
