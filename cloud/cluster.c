/* SPDX-License-Identifier: Apache-2.0 */
/* Presence, node liveness and request routing of a cluster (cluster.h). */
#include "config.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cluster.h"
#include "log.h"
#include "proto.h"
#include "util.h"

#define USEC_PER_SEC 1000000ULL
#define NSEC_PER_SEC 1000000000ULL
#define CLUSTER_NODES_TTL_SEC (CLUSTER_NODE_DEAD_SEC * 4)
/* An RPC's request body: NATS's own default limit of a message. A bigger
 * one is answered 413 (the requesting node refuses it first). */
#define CLUSTER_RPC_MAX (1024 * 1024)
/* Nodes this node keeps track of: a key in TETHER_NODES is one. */
#define CLUSTER_NODES_MAX 256
/* Presence writes (puts and deletes of this node's entries) waiting for
 * JetStream's acknowledgement at once: a storm of connecting devices
 * queues the rest, instead of thousands of requests timing out together
 * and being sent again together. */
#define CLUSTER_WRITES_IN_FLIGHT 128
#define CLUSTER_WRITE_TIMEOUT_USEC (10 * USEC_PER_SEC)
/* A failed write is tried again after this (NATS away, no quorum). */
#define CLUSTER_WRITE_RETRY_USEC (2 * USEC_PER_SEC)

static uint64_t realtime_usec(void) {
        struct timespec ts;

        clock_gettime(CLOCK_REALTIME, &ts);
        return (uint64_t)ts.tv_sec * USEC_PER_SEC + (uint64_t)ts.tv_nsec / 1000;
}

typedef struct Presence {
        struct Presence *next;
        char node[CLUSTER_NODE_MAX + 1];
        /* The bucket's revision of the entry, 0 for this node's own put
         * before the watch brought it back. */
        uint64_t revision;
        bool held; /* the device's session is on this node */
        char id[];
} Presence;

/* A write of this node's presence entry for a device, queued or in flight. */
typedef struct PresenceWrite {
        Cluster *cluster;
        struct PresenceWrite *next;
        BusRequest *request; /* in flight, or NULL: queued */
        bool del;
        char *text; /* the value of a put */
        char id[];
} PresenceWrite;

typedef struct Node {
        char name[CLUSTER_NODE_MAX + 1];
        char *api;
        int64_t beat_ns; /* the stream's time of its last heartbeat; 0: none, or it left */
        bool alive;     /* as last reported through the presence hooks */
} Node;

struct ClusterForward {
        Cluster *cluster;
        ClusterForward *prev, *next;
        BusRequest *request;
        cluster_reply_fn fn;
        void *userdata;
};

struct ClusterRpc {
        Cluster *cluster;
        ClusterRpc *prev, *next;
        char *reply; /* the requester's inbox */
};

struct Cluster {
        sd_event *event;
        const CloudConfig *config;
        Bus *bus;
        ClusterHooks hooks;
        char node[CLUSTER_NODE_MAX + 1];
        char rpc_subject[CLUSTER_NODE_MAX + 32];
        uint64_t started;

        Presence **buckets;
        size_t n_buckets, n_presence;
        Node *nodes;
        size_t n_nodes;
        /* The newest time stamp the watch of TETHER_NODES brought: the
         * "now" against which nodes' heartbeats are judged. */
        int64_t nodes_now_ns;

        BusSub *presence_watch, *nodes_watch, *rpc_sub;
        bool presence_loaded; /* the watch's initial values are in */
        /* Presence writes: queued (FIFO), in flight (a list), and the
         * timer that sends the queue again after a failure. */
        PresenceWrite *queue, *queue_tail, *in_flight;
        unsigned n_in_flight;
        sd_event_source *write_retry;
        bool write_failed_logged;
        bool warned_nodes;
        bool nodes_loaded; /* the node watch's initial values are in */
        sd_event_source *heartbeat;
        ClusterForward *forwards;
        ClusterRpc *rpcs;
};

/* ---- the presence map ---------------------------------------------------- */

static size_t cluster_hash(const char *s) {
        uint64_t h = 1469598103934665603ULL; /* FNV-1a */

        for (; *s; s++)
                h = (h ^ (uint8_t)*s) * 1099511628211ULL;
        return (size_t)h;
}

static Presence **presence_slot(Cluster *c, const char *id) {
        Presence **p;

        if (c->n_buckets == 0)
                return NULL;
        for (p = &c->buckets[cluster_hash(id) & (c->n_buckets - 1)]; *p; p = &(*p)->next)
                if (streq((*p)->id, id))
                        return p;
        return p;
}

static Presence *presence_find(Cluster *c, const char *id) {
        Presence **p = presence_slot(c, id);

        return p ? *p : NULL;
}

static int presence_grow(Cluster *c) {
        size_t n = c->n_buckets ? c->n_buckets * 2 : 256;
        Presence **b = calloc(n, sizeof(*b));

        if (!b)
                return -ENOMEM;
        for (size_t k = 0; k < c->n_buckets; k++)
                for (Presence *p = c->buckets[k], *next; p; p = next) {
                        size_t i = cluster_hash(p->id) & (n - 1);

                        next = p->next;
                        p->next = b[i];
                        b[i] = p;
                }
        free(c->buckets);
        c->buckets = b;
        c->n_buckets = n;
        return 0;
}

static Presence *presence_set(Cluster *c, const char *id, const char *node, uint64_t revision) {
        Presence **slot, *p;
        size_t len = strlen(id);

        if (c->n_presence >= c->n_buckets && presence_grow(c) < 0)
                return NULL;
        slot = presence_slot(c, id);
        if (*slot) {
                p = *slot;
        } else {
                p = calloc(1, sizeof(*p) + len + 1);
                if (!p)
                        return NULL;
                memcpy(p->id, id, len + 1);
                *slot = p;
                c->n_presence++;
        }
        snprintf(p->node, sizeof(p->node), "%s", node);
        p->revision = revision;
        return p;
}

static void presence_remove(Cluster *c, const char *id) {
        Presence **slot = presence_slot(c, id), *p;

        if (!slot || !*slot)
                return;
        p = *slot;
        *slot = p->next;
        free(p);
        c->n_presence--;
}

/* ---- nodes ------------------------------------------------------------------- */

int cluster_node_name_check(const char *name) {
        size_t n = strlen(name);

        if (n == 0 || n > CLUSTER_NODE_MAX || strspn(name, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                                                     "0123456789_-") != n)
                return -EINVAL;
        return 0;
}

static Node *node_find(Cluster *c, const char *name) {
        for (size_t i = 0; i < c->n_nodes; i++)
                if (streq(c->nodes[i].name, name))
                        return &c->nodes[i];
        return NULL;
}

/* A node is dead when the bucket's stream holds heartbeats (this node's
 * own every CLUSTER_HEARTBEAT_SEC among them) stored CLUSTER_NODE_DEAD_SEC
 * after its last one. Both times are the stream's, in the order it keeps
 * them: a watch that delivers late (a busy loop, thousands of presence
 * changes queued before the heartbeats) delays the verdict, never makes
 * a live node dead. */
static bool node_alive(Cluster *c, const char *name) {
        Node *n;

        if (streq(name, c->node))
                return true;
        n = node_find(c, name);
        return n && n->beat_ns > 0 && n->beat_ns + CLUSTER_NODE_DEAD_SEC * (int64_t)NSEC_PER_SEC > c->nodes_now_ns;
}

/* The hooks' view of a presence entry: a live other node, or NULL. */
static const char *presence_node(Cluster *c, const Presence *p) {
        if (!p || streq(p->node, c->node) || !node_alive(c, p->node))
                return NULL;
        return p->node;
}

/* A node came alive or died: tell the Cloud about each of its devices. */
static void node_liveness_changed(Cluster *c, Node *n) {
        for (size_t k = 0; k < c->n_buckets; k++)
                for (Presence *p = c->buckets[k]; p; p = p->next)
                        if (streq(p->node, n->name))
                                c->hooks.presence(c->hooks.userdata, p->id, n->alive ? n->name : NULL);
}

static void cluster_check_nodes(Cluster *c) {
        for (size_t i = 0; i < c->n_nodes; i++) {
                Node *n = &c->nodes[i];
                bool alive = node_alive(c, n->name);

                if (alive == n->alive)
                        continue;
                n->alive = alive;
                if (alive && !streq(n->name, c->node))
                        log_notice("Cluster node '%s' is up.", n->name);
                else if (!alive && n->beat_ns == 0)
                        log_notice("Cluster node '%s' is gone (it left).", n->name);
                else if (!alive)
                        log_notice("Cluster node '%s' is gone: TETHER_NODES holds heartbeats stored %.1f s "
                                   "after its last one.", n->name, (double)(c->nodes_now_ns - n->beat_ns) / 1e9);
                node_liveness_changed(c, n);
        }
}

static void cluster_node_update(void *userdata, const char *key, const void *value, size_t len, uint64_t revision,
                                int64_t time_ns) {
        Cluster *c = userdata;
        _cleanup_(json_decrefp) json_t *j = NULL;
        const char *api = NULL;
        Node *n;

        if (!key) {
                c->nodes_loaded = true; /* the initial values are in */
                return;
        }
        if (time_ns <= 0)
                time_ns = (int64_t)realtime_usec() * 1000; /* JetStream did not say: when it came */
        if (time_ns > c->nodes_now_ns)
                c->nodes_now_ns = time_ns;
        if (cluster_node_name_check(key) < 0) {
                cluster_check_nodes(c);
                return;
        }
        if (!value || len == 0) {
                /* A node deleted its key: it left (cluster_free()). */
                n = node_find(c, key);
                if (n)
                        n->beat_ns = 0;
                cluster_check_nodes(c);
                return;
        }
        j = json_loadb(value, len, 0, NULL);
        if (j)
                api = json_string_value(json_object_get(j, "api"));
        n = node_find(c, key);
        if (!n) {
                Node *a;

                if (c->n_nodes >= CLUSTER_NODES_MAX) {
                        if (!c->warned_nodes)
                                log_warning("More than %u cluster nodes announce themselves; ignoring '%s' and "
                                            "any further ones.", CLUSTER_NODES_MAX, key);
                        c->warned_nodes = true;
                        return;
                }
                a = reallocarray(c->nodes, c->n_nodes + 1, sizeof(*a));

                if (!a)
                        return;
                c->nodes = a;
                n = &c->nodes[c->n_nodes++];
                *n = (Node){ 0 };
                snprintf(n->name, sizeof(n->name), "%s", key);
        }
        if (api && (!n->api || !streq(n->api, api))) {
                free(n->api);
                n->api = strdup(api);
        }
        n->beat_ns = time_ns;
        cluster_check_nodes(c);
}

static void cluster_put_own(Cluster *c, const char *device, const char *address);

static int cluster_heartbeat(sd_event_source *s, uint64_t usec, void *userdata) {
        Cluster *c = userdata;
        _cleanup_free_ char *text = NULL;
        json_t *j;

        j = json_pack("{s:s, s:s?, s:I}", "node", c->node, "api", c->config->cluster_node_api, "started",
                      (json_int_t)c->started);
        text = j ? json_dumps(j, JSON_COMPACT) : NULL;
        json_decref(j);
        if (text)
                (void)bus_kv_put(c->bus, CLUSTER_NODES_BUCKET, c->node, text, strlen(text));
        cluster_check_nodes(c);
        /* From now, not from when it was due (the first was due at 0): a
         * late loop sends one heartbeat, not the ones it missed. A time
         * source is off once it ran (SD_EVENT_ONESHOT): on again. */
        (void)sd_event_source_set_time_relative(s, CLUSTER_HEARTBEAT_SEC * USEC_PER_SEC);
        return sd_event_source_set_enabled(s, SD_EVENT_ONESHOT);
}

/* ---- presence writes ------------------------------------------------------------ */

static void write_free(PresenceWrite *w) {
        if (!w)
                return;
        bus_request_cancel(w->request);
        free(w->text);
        free(w);
}

static void write_enqueue(Cluster *c, PresenceWrite *w) {
        w->next = NULL;
        if (c->queue_tail)
                c->queue_tail->next = w;
        else
                c->queue = w;
        c->queue_tail = w;
}

static void writes_pump(Cluster *c);

static void write_done(void *userdata, int error, uint64_t seq, bool duplicate) {
        PresenceWrite *w = userdata, **pp;
        Cluster *c = w->cluster;
        Presence *p;
        bool still;

        w->request = NULL;
        for (pp = &c->in_flight; *pp && *pp != w; pp = &(*pp)->next)
                ;
        if (*pp)
                *pp = w->next;
        c->n_in_flight--;
        if (error >= 0) {
                c->write_failed_logged = false;
                write_free(w);
                writes_pump(c);
                return;
        }
        /* Still wanted? A put while the device is here, a delete while
         * it is not and the entry (as far as we know) names this node. */
        p = presence_find(c, w->id);
        still = w->del ? !(p && p->held) : (p && p->held);
        if (!still) {
                write_free(w);
                writes_pump(c);
                return;
        }
        if (!c->write_failed_logged)
                log_warning_errno(error, "Cannot write device '%s''s presence to the cluster, trying again: %m",
                                  w->id);
        c->write_failed_logged = true;
        write_enqueue(c, w);
        (void)sd_event_source_set_time_relative(c->write_retry, CLUSTER_WRITE_RETRY_USEC);
        (void)sd_event_source_set_enabled(c->write_retry, SD_EVENT_ONESHOT);
}

static void writes_pump(Cluster *c) {
        static const char *const del_headers[] = { "KV-Operation", "DEL", NULL };
        char subject[sizeof("$KV." CLUSTER_PRESENCE_BUCKET ".") + PROTO_DEVICE_ID_MAX];
        int enabled = SD_EVENT_OFF;

        /* After a failure, the queue waits for the retry timer. */
        if (sd_event_source_get_enabled(c->write_retry, &enabled) >= 0 && enabled != SD_EVENT_OFF)
                return;
        while (c->queue && c->n_in_flight < CLUSTER_WRITES_IN_FLIGHT) {
                PresenceWrite *w = c->queue;
                int r;

                c->queue = w->next;
                if (!c->queue)
                        c->queue_tail = NULL;
                snprintf(subject, sizeof(subject), "$KV." CLUSTER_PRESENCE_BUCKET ".%s", w->id);
                r = bus_js_publish_async(c->bus, subject, w->del ? del_headers : NULL, w->text,
                                         w->text ? strlen(w->text) : 0, CLUSTER_WRITE_TIMEOUT_USEC, write_done, w,
                                         &w->request);
                if (r < 0) {
                        /* No connection: all of it waits (the reconnection
                         * resyncs, the timer tries too). */
                        w->next = c->queue;
                        c->queue = w;
                        if (!c->queue_tail)
                                c->queue_tail = w;
                        (void)sd_event_source_set_time_relative(c->write_retry, CLUSTER_WRITE_RETRY_USEC);
                        (void)sd_event_source_set_enabled(c->write_retry, SD_EVENT_ONESHOT);
                        return;
                }
                w->next = c->in_flight;
                c->in_flight = w;
                c->n_in_flight++;
        }
}

static int write_retry_cb(sd_event_source *s, uint64_t usec, void *userdata) {
        Cluster *c = userdata;

        (void)sd_event_source_set_enabled(s, SD_EVENT_OFF);
        writes_pump(c);
        return 0;
}

static void cluster_write(Cluster *c, const char *device, bool del, const char *text) {
        size_t len = strlen(device);
        PresenceWrite *w = calloc(1, sizeof(*w) + len + 1);

        if (!w || (text && !(w->text = strdup(text)))) {
                free(w);
                log_warning("Out of memory writing device '%s''s presence to the cluster.", device);
                return;
        }
        w->cluster = c;
        w->del = del;
        memcpy(w->id, device, len + 1);
        write_enqueue(c, w);
        writes_pump(c);
}

/* ---- presence ----------------------------------------------------------------- */

static void cluster_put_own(Cluster *c, const char *device, const char *address) {
        _cleanup_free_ char *text = NULL;
        Presence *p;
        json_t *j;

        j = json_pack("{s:s, s:I, s:s?}", "node", c->node, "since", (json_int_t)realtime_usec(), "address", address);
        text = j ? json_dumps(j, JSON_COMPACT) : NULL;
        json_decref(j);
        if (!text) {
                log_warning("Out of memory recording device '%s''s presence.", device);
                return;
        }
        cluster_write(c, device, false, text);
        /* Ours at once: the watch confirms it later. */
        p = presence_set(c, device, c->node, 0);
        if (p)
                p->held = true;
        else
                log_warning("Out of memory recording where device '%s' is.", device);
}

static void cluster_presence_update(void *userdata, const char *key, const void *value, size_t len,
                                    uint64_t revision, int64_t time_ns _unused_) {
        Cluster *c = userdata;
        _cleanup_(json_decrefp) json_t *j = NULL;
        const char *node = NULL;
        Presence *before;
        bool was_held;

        if (!key) {
                /* The bucket as it was when we joined is in: entries naming
                 * this node from before (it crashed) are not ours any more. */
                c->presence_loaded = true;
                cluster_resync(c);
                return;
        }
        if (proto_name_check(key, strlen(key), PROTO_NAME_DEVICE) < 0)
                return; /* not a device ID: nothing any node would write */
        before = presence_find(c, key);
        was_held = before && before->held;
        if (value && len > 0) {
                j = json_loadb(value, len, 0, NULL);
                node = j ? json_string_value(json_object_get(j, "node")) : NULL;
        }
        if (!node || cluster_node_name_check(node) < 0) {
                /* Deleted (or unreadable). If the device is here, another
                 * node removed an entry it thought its own after the
                 * device moved here: put ours again. */
                if (was_held) {
                        cluster_put_own(c, key, NULL);
                        return;
                }
                presence_remove(c, key);
                c->hooks.presence(c->hooks.userdata, key, NULL);
                return;
        }
        if (streq(node, c->node)) {
                (void)presence_set(c, key, node, revision);
                return;
        }
        /* The watch brings entries in the bucket's order: another node's
         * entry before our own put came back is older than ours. */
        if (before && before->held && before->revision == 0)
                return;
        if (!presence_set(c, key, node, revision)) {
                log_warning("Out of memory recording where device '%s' is.", key);
                return;
        }
        if (was_held) {
                presence_find(c, key)->held = false;
                c->hooks.superseded(c->hooks.userdata, key, node);
        }
        c->hooks.presence(c->hooks.userdata, key, node_alive(c, node) ? node : NULL);
}

void cluster_resync(Cluster *c) {
        for (size_t k = 0; k < c->n_buckets; k++)
                for (Presence *p = c->buckets[k], *next; p; p = next) {
                        next = p->next;
                        if (p->held) {
                                /* Put again what the bucket may have missed,
                                 * or lost to a deletion we did not see. */
                                if (!streq(p->node, c->node) || p->revision == 0 || !c->presence_loaded)
                                        cluster_put_own(c, p->id, NULL);
                        } else if (streq(p->node, c->node)) {
                                cluster_write(c, p->id, true, NULL);
                                presence_remove(c, p->id);
                        }
                }
}

void cluster_device_bound(Cluster *c, const char *device, const char *address) {
        cluster_put_own(c, device, address);
}

void cluster_device_gone(Cluster *c, const char *device) {
        Presence *p = presence_find(c, device);

        if (!p)
                return;
        p->held = false;
        if (!streq(p->node, c->node))
                return; /* it is elsewhere now: that entry is not ours to delete */
        presence_remove(c, device);
        cluster_write(c, device, true, NULL);
}

const char *cluster_device_node(Cluster *c, const char *device) {
        return presence_node(c, presence_find(c, device));
}

void cluster_foreach_remote(Cluster *c, void (*fn)(void *userdata, const char *device, const char *node),
                            void *userdata) {
        for (size_t k = 0; k < c->n_buckets; k++)
                for (Presence *p = c->buckets[k]; p; p = p->next) {
                        const char *node = presence_node(c, p);

                        if (node)
                                fn(userdata, p->id, node);
                }
}

bool cluster_leads(Cluster *c) {
        if (!c->nodes_loaded)
                return false;
        for (size_t i = 0; i < c->n_nodes; i++)
                if (strcmp(c->nodes[i].name, c->node) < 0 && node_alive(c, c->nodes[i].name))
                        return false;
        return true;
}

const char *cluster_leader(Cluster *c) {
        const char *leader = c->node;

        if (!c->nodes_loaded)
                return NULL;
        for (size_t i = 0; i < c->n_nodes; i++)
                if (strcmp(c->nodes[i].name, leader) < 0 && node_alive(c, c->nodes[i].name))
                        leader = c->nodes[i].name;
        return leader;
}

json_t *cluster_nodes_json(Cluster *c) {
        json_t *a = json_array();

        if (!a)
                return NULL;
        for (size_t i = 0; i < c->n_nodes; i++) {
                Node *n = &c->nodes[i];
                json_int_t count = 0;

                if (!node_alive(c, n->name))
                        continue;
                for (size_t k = 0; k < c->n_buckets; k++)
                        for (Presence *p = c->buckets[k]; p; p = p->next)
                                count += streq(p->node, n->name);
                if (json_array_append_new(a, json_pack("{s:s, s:s?, s:I, s:b}", "node", n->name, "api", n->api,
                                                       "devices", count, "self", streq(n->name, c->node))) < 0) {
                        json_decref(a);
                        return NULL;
                }
        }
        return a;
}

const char *cluster_node(Cluster *c) { return c->node; }

/* ---- requests to other nodes ---------------------------------------------------- */

static void forward_unlink(ClusterForward *f) {
        Cluster *c = f->cluster;

        if (f->prev)
                f->prev->next = f->next;
        else
                c->forwards = f->next;
        if (f->next)
                f->next->prev = f->prev;
}

static void forward_reply(void *userdata, int error, natsMsg *reply) {
        ClusterForward *f = userdata;
        _cleanup_(json_decrefp) json_t *j = NULL;
        json_t *body;
        json_int_t status;

        forward_unlink(f);
        if (error >= 0) {
                j = json_loadb(natsMsg_GetData(reply), (size_t)natsMsg_GetDataLength(reply), 0, NULL);
                body = j ? json_object_get(j, "body") : NULL;
                status = j ? json_integer_value(json_object_get(j, "status")) : 0;
                if (!body || status < 100 || status > 599)
                        error = -EPROTO;
                else
                        f->fn(f->userdata, 0, (unsigned)status, body);
        }
        if (error < 0)
                f->fn(f->userdata, error, 0, NULL);
        free(f);
}

int cluster_forward(Cluster *c, const char *node, const char *op, const char *device, const char *name,
                    const char *arg, json_t *params, uint64_t timeout_usec, cluster_reply_fn fn, void *userdata,
                    ClusterForward **ret) {
        _cleanup_free_ char *text = NULL;
        char subject[CLUSTER_NODE_MAX + 32];
        ClusterForward *f;
        json_t *j;
        int r;

        if (strlen(node) > CLUSTER_NODE_MAX)
                return -EINVAL;
        if (params && !json_is_object(params))
                return -EINVAL;
        /* json_pack() fails for text that is not UTF-8, too (the API
         * checks names and arguments before): not the cloud's fault. */
        j = json_pack("{s:s, s:s, s:s*, s:s*, s:O*}", "op", op, "device", device, "name", name, "arg", arg, "params",
                      params);
        if (!j)
                return -EINVAL;
        text = json_dumps(j, JSON_COMPACT);
        json_decref(j);
        if (!text)
                return -ENOMEM;
        if (strlen(text) > CLUSTER_RPC_MAX)
                return -EMSGSIZE;
        f = calloc(1, sizeof(*f));
        if (!f)
                return -ENOMEM;
        *f = (ClusterForward){ .cluster = c, .fn = fn, .userdata = userdata };
        snprintf(subject, sizeof(subject), "tether.node.%s.rpc", node);
        r = bus_request(c->bus, subject, NULL, text, strlen(text), timeout_usec, forward_reply, f, &f->request);
        if (r < 0) {
                free(f);
                return r;
        }
        f->next = c->forwards;
        if (f->next)
                f->next->prev = f;
        c->forwards = f;
        if (ret)
                *ret = f;
        return 0;
}

void cluster_forward_cancel(ClusterForward *f) {
        if (!f)
                return;
        bus_request_cancel(f->request);
        forward_unlink(f);
        free(f);
}

/* ---- requests from other nodes --------------------------------------------------- */

static void rpc_unlink(ClusterRpc *rpc) {
        Cluster *c = rpc->cluster;

        if (rpc->prev)
                rpc->prev->next = rpc->next;
        else
                c->rpcs = rpc->next;
        if (rpc->next)
                rpc->next->prev = rpc->prev;
}

static void rpc_free(ClusterRpc *rpc) {
        rpc_unlink(rpc);
        free(rpc->reply);
        free(rpc);
}

/* cppcheck-suppress constParameter ; json_pack() "o" takes the reference */
void cluster_rpc_answer(ClusterRpc *rpc, unsigned status, json_t *body) {
        Cluster *c = rpc->cluster;
        _cleanup_free_ char *text = NULL;
        json_t *j;

        j = json_pack("{s:i, s:o}", "status", (int)status, "body", body ?: json_object());
        text = j ? json_dumps(j, JSON_COMPACT | JSON_REAL_PRECISION(17)) : NULL;
        json_decref(j);
        if (!text || bus_publish(c->bus, rpc->reply, NULL, text, strlen(text)) < 0)
                log_warning("Cannot answer a request from another cluster node.");
        rpc_free(rpc);
}

static void cluster_rpc_request(void *userdata, natsMsg *msg) {
        Cluster *c = userdata;
        _cleanup_(json_decrefp) json_t *j = NULL;
        const char *reply = natsMsg_GetReply(msg), *op, *device, *name, *arg;
        json_t *params;
        ClusterRpc *rpc;

        if (!reply)
                return;
        if (natsMsg_GetDataLength(msg) > CLUSTER_RPC_MAX) {
                const char *too_big = "{\"status\":413,\"body\":{\"ok\":false,\"error\":\"Request too large\"}}";

                (void)bus_publish(c->bus, reply, NULL, too_big, strlen(too_big));
                return;
        }
        j = json_loadb(natsMsg_GetData(msg), (size_t)natsMsg_GetDataLength(msg), 0, NULL);
        op = j ? json_string_value(json_object_get(j, "op")) : NULL;
        device = j ? json_string_value(json_object_get(j, "device")) : NULL;
        name = j ? json_string_value(json_object_get(j, "name")) : NULL;
        arg = j ? json_string_value(json_object_get(j, "arg")) : NULL;
        params = j ? json_object_get(j, "params") : NULL;
        if (json_is_null(params))
                params = NULL;
        rpc = calloc(1, sizeof(*rpc));
        if (!rpc)
                return;
        rpc->cluster = c;
        rpc->reply = strdup(reply);
        if (!rpc->reply) {
                free(rpc);
                return;
        }
        rpc->next = c->rpcs;
        if (rpc->next)
                rpc->next->prev = rpc;
        c->rpcs = rpc;
        if (!op || !device || (params && !json_is_object(params)) ||
            (!streq(op, "call") && !streq(op, "var") && !streq(op, "device") && !streq(op, "ota") &&
             !streq(op, "campaign"))) {
                cluster_rpc_answer(rpc, 400, json_pack("{s:b, s:s}", "ok", 0, "error", "Malformed cluster request"));
                return;
        }
        c->hooks.rpc(c->hooks.userdata, rpc, op, device, name, arg, params);
}

/* ---- the object ------------------------------------------------------------------ */

Cluster *cluster_free(Cluster *c) {
        if (!c)
                return NULL;
        c->rpc_sub = bus_sub_free(c->rpc_sub);
        c->presence_watch = bus_sub_free(c->presence_watch);
        c->nodes_watch = bus_sub_free(c->nodes_watch);
        /* Leave: our devices' entries and our heartbeat go, so the others
         * count them offline at once rather than after
         * CLUSTER_NODE_DEAD_SEC. */
        for (size_t k = 0; k < c->n_buckets; k++)
                for (Presence *p = c->buckets[k], *next; p; p = next) {
                        next = p->next;
                        if (p->held && streq(p->node, c->node))
                                (void)bus_kv_delete(c->bus, CLUSTER_PRESENCE_BUCKET, p->id);
                        free(p);
                }
        free(c->buckets);
        /* Deletes still queued (devices_free() ended every session just
         * before): sent without waiting for their acknowledgement. */
        while (c->queue) {
                PresenceWrite *w = c->queue;

                c->queue = w->next;
                if (w->del)
                        (void)bus_kv_delete(c->bus, CLUSTER_PRESENCE_BUCKET, w->id);
                write_free(w);
        }
        while (c->in_flight) {
                PresenceWrite *w = c->in_flight;

                c->in_flight = w->next;
                write_free(w);
        }
        sd_event_source_disable_unref(c->write_retry);
        (void)bus_kv_delete(c->bus, CLUSTER_NODES_BUCKET, c->node);
        while (c->forwards)
                cluster_forward_cancel(c->forwards);
        while (c->rpcs)
                rpc_free(c->rpcs);
        for (size_t i = 0; i < c->n_nodes; i++)
                free(c->nodes[i].api);
        free(c->nodes);
        sd_event_source_disable_unref(c->heartbeat);
        free(c);
        return NULL;
}

int cluster_new(sd_event *event, const CloudConfig *config, Bus *bus, const ClusterHooks *hooks, Cluster **ret) {
        _cleanup_(cluster_freep) Cluster *c = NULL;
        unsigned replicas = config->cluster_replicas ?: 1;
        int r;

        c = calloc(1, sizeof(*c));
        if (!c)
                return log_error_errno(-ENOMEM, "Out of memory.");
        c->event = event;
        c->config = config;
        c->bus = bus;
        c->hooks = *hooks;
        c->started = realtime_usec();
        snprintf(c->node, sizeof(c->node), "%s", config->cluster_node);
        snprintf(c->rpc_subject, sizeof(c->rpc_subject), "tether.node.%s.rpc", c->node);

        r = bus_kv_ensure(bus, CLUSTER_PRESENCE_BUCKET, replicas, 0);
        if (r >= 0)
                r = bus_kv_ensure(bus, CLUSTER_NODES_BUCKET, replicas, CLUSTER_NODES_TTL_SEC * USEC_PER_SEC);
        if (r < 0)
                return log_error_errno(r, "Cannot create the cluster's key-value buckets: %m");
        r = bus_kv_watch(bus, CLUSTER_NODES_BUCKET, cluster_node_update, c, &c->nodes_watch);
        if (r >= 0)
                r = bus_kv_watch(bus, CLUSTER_PRESENCE_BUCKET, cluster_presence_update, c, &c->presence_watch);
        if (r >= 0)
                r = bus_subscribe(bus, c->rpc_subject, NULL, cluster_rpc_request, c, &c->rpc_sub);
        if (r < 0)
                return log_error_errno(r, "Cannot follow the cluster's state: %m");
        r = sd_event_add_time(event, &c->heartbeat, CLOCK_MONOTONIC, 0, 0, cluster_heartbeat, c);
        if (r >= 0)
                r = sd_event_add_time(event, &c->write_retry, CLOCK_MONOTONIC, UINT64_MAX, 0, write_retry_cb, c);
        if (r >= 0)
                r = sd_event_source_set_enabled(c->write_retry, SD_EVENT_OFF);
        if (r < 0)
                return log_error_errno(r, "Cannot start the cluster heartbeat: %m");
        log_info("Cluster node '%s' joined.", c->node);
        *ret = TAKE_PTR(c);
        return 0;
}
