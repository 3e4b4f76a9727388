/* SPDX-License-Identifier: Apache-2.0 */
/* Tunnels and log streams (tunnel.c, prefixes tunnels_ and tunnel_): the
 * cloud's side of the streams of docs/protocol.md, "Streams: tunnels and
 * logs", and their HTTP requests (docs/cloud.md, "Tunnels and logs"):
 * POST /v1/devices/ID/tunnel (with the Upgrade headers: 101 and raw bytes
 * both ways on the upgraded connection; without: 201 and a stream key, then
 * the split transport's GET .../tunnels/SID/down and POST
 * .../tunnels/SID/up), GET /v1/devices/ID/logs (NDJSON, streamed) and GET
 * /v1/devices/ID/tunnels.
 *
 * Both tunnel transports are relays over one stream engine: the upgraded
 * socket, or MHD's content reader (device → client, credit granted as MHD
 * takes bytes) and upload handler (client → device: body bytes consumed
 * only within the device's credit and the link budget, the connection
 * suspended otherwise, so MHD's read buffer and TCP hold the rest). A split
 * stream's halves must both attach within [Tunnel] AttachSec=, with the
 * token id that opened it and its key (compared in constant time).
 *
 * A Tunnels object owns every stream, the messages of streams in flight
 * to devices, the upgraded client sockets' event sources and the history
 * of closed streams. Memory is bounded by the configuration: at most
 * [Tunnel] MaxStreams streams, each with at most its receive window
 * (PROTO_STREAM_WINDOW_DEFAULT) of device data buffered, and per device at
 * most PROTO_STREAM_INFLIGHT_MAX bytes of stream data sent and not
 * answered. Device data past the credit the cloud granted, on a stream it
 * did not open or after the stream's end is refused (4.00 + DELETE, or
 * 4.04) and never buffered.
 *
 * The Api (api.c) authenticates a request and checks its scope and
 * device (tunnel_route_scope()) and then hands it here; the Cloud object
 * (cloud.c) forwards the devices' requests on /t/SID and their session
 * ends. Events and audit records go out through TunnelsHooks and the
 * Store. Errors are negative errno values; ret_* parameters are untouched
 * on failure. */
#pragma once

#include <coap3/coap.h>
#include <jansson.h>
#include <microhttpd.h>
#include <stdbool.h>
#include <systemd/sd-event.h>

#include "cloud-config.h"
#include "devices.h"
#include "proto.h"
#include "store.h"
#include "tokens.h"
#include "tunnel-parse.h"

typedef struct Tunnels Tunnels;
typedef struct TunnelStream TunnelStream;

/* Closed streams kept for GET /v1/devices/ID/tunnels: the last
 * TUNNEL_HISTORY_DEVICE of a device among the cloud's last
 * TUNNEL_HISTORY_MAX. */
#define TUNNEL_HISTORY_MAX 1024
#define TUNNEL_HISTORY_DEVICE 16
/* Bytes of a close reason kept and passed on. */
#define TUNNEL_REASON_MAX 256
/* Uri-Query options a device's POST /t/SID may carry. */
#define TUNNEL_QUERY_OPTIONS_MAX 8

typedef struct TunnelsHooks {
        void *userdata;
        /* Publish the cloud's private event name about device (data
         * taken). */
        void (*publish)(void *userdata, const char *name, const char *device, json_t *data);
        /* A request of the Api was resumed or an upgraded connection
         * closed: the HTTP server must run. */
        void (*kick_api)(void *userdata);
} TunnelsHooks;

/* event, config, devices and store are borrowed and must outlive the
 * Tunnels; hooks is copied (both required). */
int tunnels_new(sd_event *event, const CloudConfig *config, Devices *devices, Store *store,
                const TunnelsHooks *hooks, Tunnels **ret);
/* Every stream still open ends with DELETE "shutting down"; pending
 * messages are cancelled. Free the Api first (tunnels_api_shutdown()).
 * NULL is fine; returns NULL. */
Tunnels *tunnels_free(Tunnels *t);
static inline void tunnels_freep(Tunnels **t) { tunnels_free(*t); }

/* DevicesHooks.stream_request: a device's PUT/POST/DELETE on /t/SID. */
void tunnels_device_request(Tunnels *t, Device *d, const coap_pdu_t *request, const char *sid,
                            coap_pdu_t *response);
/* DevicesHooks.device_gone: every stream of d ends ("device disconnected"). */
void tunnels_device_gone(Tunnels *t, const Device *d);

/* ---- HTTP (called by the Api) ---------------------------------------- */

/* The scope a route needs (scopes.h). */
unsigned tunnel_route_scope(TunnelRoute route);
/* A request on route for device (checked: a valid ID the token may
 * reach) from auth (copied) at client address host: MHD's access handler
 * from the second call on (the first one authenticated it). *state is
 * the request's (NULL at first; tunnel_api_request_free() once MHD
 * completed it). Returns what the access handler returns. */
enum MHD_Result tunnel_api_handler(Tunnels *t, struct MHD_Connection *connection, TunnelRoute route,
                                   const char *device, uint32_t sid, const char *method, const TokenAuth *auth,
                                   const char *host, const char *upload_data, size_t *upload_data_size,
                                   TunnelStream **state);
/* MHD completed the request on connection whose state is s (the client
 * went away, the answer, the upgraded connection or a split stream's
 * `down`/`up` ended): its stream ends ("closed by the client") unless it
 * had or that request's part ended normally (the 201 of a split open, the
 * `down` body after the device's fin, the `up` body). NULL is fine. */
void tunnel_api_request_free(TunnelStream *s, const struct MHD_Connection *connection);
/* The Api stops: upgraded connections close, waiting requests are
 * answered 503, log streams end; what remains ends "shutting down". */
void tunnels_api_shutdown(Tunnels *t);
/* End every stream whose token tokens_recheck() no longer accepts
 * ("token revoked") or, restricted by tags, no longer reaches its device
 * ("token no longer reaches the device"; the Cloud calls this when a
 * device's tags change). Returns how many ended. */
unsigned tunnels_end_revoked(Tunnels *t, Tokens *tokens);
/* Streams open now (for metrics and tests). */
unsigned tunnels_count(Tunnels *t);
