/* SPDX-License-Identifier: Apache-2.0 */
/* The cluster's view of where devices are (cluster.c, prefix cluster_),
 * for cluster mode (docs/cluster.md): which node holds each device's
 * session (the key-value bucket TETHER_PRESENCE), which nodes are alive
 * (TETHER_NODES, a heartbeat every CLUSTER_HEARTBEAT_SEC), and requests
 * for a device routed to the node holding it (request/reply on
 * tether.node.NODE.rpc).
 *
 * A Cluster borrows the Bus and runs on the loop's thread. It keeps every
 * presence entry of the bucket in memory (a watch), so that finding a
 * device's node costs no round trip. It writes only its own devices'
 * entries: put when a session is bound, deleted when it ends if the entry
 * still names this node, put again if another node deleted it while the
 * device is still here. The newest entry wins: when an entry names
 * another node for a device whose session is here, the device connected
 * there after it did here, and the hook superseded tells the Cloud to end
 * the session here.
 *
 * Requests from other nodes go to the hook rpc; the Cloud answers each
 * exactly once with cluster_rpc_answer(). Anyone who can publish on NATS
 * can send them: NATS's credentials are as sensitive as an admin token
 * (docs/cluster.md, "Security"). Errors are negative errno values; ret_*
 * parameters are untouched on failure. */
#pragma once

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>
#include <systemd/sd-event.h>

#include "bus.h"
#include "cloud-config.h"

#define CLUSTER_PRESENCE_BUCKET "TETHER_PRESENCE"
#define CLUSTER_NODES_BUCKET "TETHER_NODES"
#define CLUSTER_HEARTBEAT_SEC 5
/* A node whose last heartbeat the bucket's stream stored this long before
 * its newest message (this node's own heartbeats among them) is taken for
 * dead: its devices count as offline until they connect elsewhere. Both
 * times are the stream's, so a watch that delivers late judges no node
 * dead; a node that deletes its key (it stops) is dead at once. */
#define CLUSTER_NODE_DEAD_SEC 15
#define CLUSTER_NODE_MAX 32

typedef struct Cluster Cluster;
typedef struct ClusterRpc ClusterRpc;
typedef struct ClusterForward ClusterForward;

typedef struct ClusterHooks {
        void *userdata;
        /* device's presence changed: node is the live node that holds it
         * now (never this one), or NULL (offline, or here). */
        void (*presence)(void *userdata, const char *device, const char *node);
        /* device, whose session is here, connected to node later: end the
         * session here. */
        void (*superseded)(void *userdata, const char *device, const char *node);
        /* A request from another node for device: op "call" (function
         * name with arg), "var" (variable name), "device" (its
         * description) or "ota" (start an OTA job: params is the API
         * request's parameters, a JSON object). params is borrowed for the
         * call, NULL when the request has none. Op "campaign" is an
         * action on a campaign for the node that leads: device is the
         * campaign's id, name the action, arg who asked. Answer with
         * cluster_rpc_answer(), now or later. */
        void (*rpc)(void *userdata, ClusterRpc *rpc, const char *op, const char *device, const char *name,
                    const char *arg, json_t *params);
} ClusterHooks;

/* Create the buckets (synchronous), start the heartbeat, the watches and
 * the RPC subscription. bus, event and config are borrowed; hooks is
 * copied (every hook is required). Logs what failed. */
int cluster_new(sd_event *event, const CloudConfig *config, Bus *bus, const ClusterHooks *hooks, Cluster **ret);
/* Delete this node's entries (best effort: a node that dies keeps them
 * until its devices connect elsewhere), stop. Pending forwards and RPCs
 * are dropped without callbacks. NULL is fine. */
Cluster *cluster_free(Cluster *c);
static inline void cluster_freep(Cluster **c) { cluster_free(*c); }

const char *cluster_node(Cluster *c);

/* Make the bucket agree with this node again (after NATS was away, and
 * once the bucket's initial values are in): put the entries of devices
 * held here, delete entries naming this node for devices that are not. */
void cluster_resync(Cluster *c);
/* 0 for a valid node name ([A-Za-z0-9_-]{1,CLUSTER_NODE_MAX}), else -EINVAL. */
int cluster_node_name_check(const char *name);

/* A device's session was bound here (address: its IP text) or ended. */
void cluster_device_bound(Cluster *c, const char *device, const char *address);
void cluster_device_gone(Cluster *c, const char *device);

/* The live node other than this one that holds device, or NULL. Valid
 * until the loop runs again. */
const char *cluster_device_node(Cluster *c, const char *device);
/* Every device held by another live node: fn(userdata, device, node). */
void cluster_foreach_remote(Cluster *c, void (*fn)(void *userdata, const char *device, const char *node),
                            void *userdata);
/* Live nodes (this one included) as a JSON array of {"node", "api", "devices"}. */
/* Whether this node leads the work done once for the whole cluster (the
 * outbound integrations, integrations.h): it is the alive node with the
 * smallest name. False until the node heartbeats were read once, so a
 * node that starts does not take over from a leader it has not heard yet.
 * Two nodes may both lead for up to CLUSTER_NODE_DEAD_SEC (a node that
 * lost NATS, a leader that died): what they do must be safe to do twice. */
bool cluster_leads(Cluster *c);
/* The node that leads as cluster_leads() judges it (this one's name when
 * it leads), or NULL before the node heartbeats were read once. Valid
 * until the loop runs again. */
const char *cluster_leader(Cluster *c);
json_t *cluster_nodes_json(Cluster *c);

/* Send op for device to node (name, arg and params as ClusterHooks.rpc
 * gets them; each may be NULL) and call fn once with the answer: error 0
 * with the HTTP status and body (borrowed for the call) that node's API
 * would have answered, or -ETIMEDOUT (no answer within timeout_usec),
 * -EHOSTUNREACH (the node is gone), -ENOTCONN (no NATS), -EPROTO (a
 * malformed answer). *ret (may be NULL) cancels; invalid after fn ran. */
typedef void (*cluster_reply_fn)(void *userdata, int error, unsigned status, json_t *body);
int cluster_forward(Cluster *c, const char *node, const char *op, const char *device, const char *name,
                    const char *arg, json_t *params, uint64_t timeout_usec, cluster_reply_fn fn, void *userdata,
                    ClusterForward **ret);
void cluster_forward_cancel(ClusterForward *f);

/* Answer an RPC (takes body; frees rpc). */
void cluster_rpc_answer(ClusterRpc *rpc, unsigned status, json_t *body);
