/* SPDX-License-Identifier: Apache-2.0 */
/* The cloud's connection to NATS (bus.c, prefix bus_), for cluster mode
 * (docs/cluster.md): one natsConnection and its JetStream context, owned
 * by the Cloud, used from the sd-event loop's thread only.
 *
 * libnats runs its own threads; every callback of this module runs on the
 * loop's thread instead: the Bus queues what libnats delivers (messages,
 * replies, key-value updates, connection changes) under a mutex and wakes
 * the loop through an eventfd, which then runs the callbacks in the order
 * libnats delivered them. Messages handed to a callback are the Bus's and
 * are destroyed after it returns. Nothing here blocks the loop except the
 * calls documented as synchronous, each bounded by its timeout.
 *
 * Errors are negative errno values: -ENOTCONN (no connection to any
 * server now), -ETIMEDOUT, -EHOSTUNREACH (no responders), -ENOMEM,
 * -EINVAL (also: a subject with a blank, a control byte or an empty token,
 * a wildcard where one publishes, a header name with ':' or a value with
 * a line end), -EMSGSIZE (above the servers' max_payload), -EIO (anything
 * else NATS reports, logged with its text); ret_* parameters are
 * untouched on failure.
 *
 * What is queued for the loop is not bounded: a loop that stops
 * dispatching lets it grow (libnats' own per-subscription limits are
 * lifted so that nothing is dropped between it and the Bus). */
#pragma once

#include <nats/nats.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <systemd/sd-event.h>

typedef struct Bus Bus;
typedef struct BusSub BusSub;
typedef struct BusRequest BusRequest;

typedef struct BusConfig {
        const char *servers;  /* "nats://h:p,nats://h:p" (comma or space separated) */
        const char *name;     /* the connection's name in NATS (the node's) */
        const char *user;     /* NULL: none */
        const char *password; /* NULL: none */
        const char *ca_file;  /* NULL: plain TCP unless a URL says tls:// */
} BusConfig;

typedef struct BusHooks {
        void *userdata;
        /* The connection to NATS was lost (up false) or is back (up true,
         * subscriptions restored by libnats). May be NULL. */
        void (*connection)(void *userdata, bool up);
} BusHooks;

/* Connect (synchronous: tries every server once, up to 2 s each), then
 * keep reconnecting forever in the background (every second; a dead
 * server is noticed within about 12 s by pings). -ENOTCONN when no server
 * could be reached. A CA file makes TLS required. event is borrowed and
 * must outlive the Bus; config's strings are copied; hooks is copied. Logs
 * what failed. */
int bus_new(sd_event *event, const BusConfig *config, const BusHooks *hooks, Bus **ret);
/* Drain nothing: close the connection, drop what is queued for the loop,
 * cancel pending requests (their callbacks do not run); waits (up to
 * 10 s) until libnats' threads are done with the Bus. NULL is fine; so is
 * a call from one of the Bus's callbacks (nothing of it runs after). */
Bus *bus_free(Bus *b);
/* Subscriptions unsubscribed and not yet destroyed: bus_sub_free() parks
 * them until libnats' reader thread is done with them (bus.c). */
size_t bus_parked(const Bus *b);
static inline void bus_freep(Bus **b) { bus_free(*b); }

bool bus_connected(Bus *b);
/* The JetStream context (for jsStreamConfig work the Bus does not wrap). */
jsCtx *bus_js(Bus *b);
natsConnection *bus_connection(Bus *b);

/* A message callback (subscriptions, stream follows). msg is valid during
 * the call only. */
typedef void (*bus_msg_fn)(void *userdata, natsMsg *msg);

/* Core NATS subscription to subject (wildcards allowed), in queue group
 * queue (NULL: none). *ret is the caller's (bus_sub_free()). */
int bus_subscribe(Bus *b, const char *subject, const char *queue, bus_msg_fn fn, void *userdata, BusSub **ret);
/* Unsubscribe; no callback of it runs after this returns (what was
 * queued for it is dropped); fine from its own callback. A stream
 * follow's consumer is deleted on the server (a request the Bus does not
 * wait for). NULL is fine. */
BusSub *bus_sub_free(BusSub *s);

/* Core NATS publish (no acknowledgement); headers: NULL-terminated
 * name, value pairs (NULL: none). */
int bus_publish(Bus *b, const char *subject, const char *const *headers, const void *data, size_t len);
/* Answer request (a message delivered to a bus_msg_fn) on its reply
 * subject; -EINVAL if it has none. */
int bus_respond(Bus *b, natsMsg *request, const void *data, size_t len);

/* Asynchronous request/reply on one shared inbox subscription: when
 * bus_request() returns 0, fn runs exactly once on the loop thread, with
 * error 0 and the reply, or -ETIMEDOUT after timeout_usec, or
 * -EHOSTUNREACH when NATS says no one listens, or -ENOTCONN when the
 * connection dropped meanwhile (the reply would be lost); never before
 * bus_request() returned, reply NULL unless error is 0. When it returns an
 * error (-ENOTCONN while disconnected) fn never runs. *ret (may be NULL)
 * lets the caller cancel; it is invalid once fn ran. */
typedef void (*bus_reply_fn)(void *userdata, int error, natsMsg *reply);
int bus_request(Bus *b, const char *subject, const char *const *headers, const void *data, size_t len,
                uint64_t timeout_usec, bus_reply_fn fn, void *userdata, BusRequest **ret);
/* fn will not run. NULL is fine. */
void bus_request_cancel(BusRequest *r);

/* ---- JetStream ---------------------------------------------------------- */

/* Create the stream, or update it to config when it exists (subjects,
 * limits); synchronous. *ret_created_ns (may be NULL) is when the stream
 * was created (nanoseconds since the Unix epoch, the same on every node:
 * an identity for the stream). */
int bus_stream_ensure(Bus *b, jsStreamConfig *config, int64_t *ret_created_ns);

/* Publish to JetStream and wait (synchronously, at most timeout_usec) for
 * the stream's acknowledgement; headers as bus_publish() (e.g.
 * "Nats-Msg-Id"). *ret_seq the stream sequence, *ret_duplicate whether
 * the stream had it already (same Nats-Msg-Id within its window); both
 * may be NULL. */
int bus_js_publish(Bus *b, const char *subject, const char *const *headers, const void *data, size_t len,
                   uint64_t timeout_usec, uint64_t *ret_seq, bool *ret_duplicate);
/* The same without blocking (a core request with the headers, the
 * acknowledgement parsed): fn runs once on the loop thread with the
 * acknowledgement (error 0, seq, duplicate) or an error as
 * bus_request()'s (-EIO when JetStream refused the message, logged);
 * likewise never when this returns an error. */
typedef void (*bus_ack_fn)(void *userdata, int error, uint64_t seq, bool duplicate);
int bus_js_publish_async(Bus *b, const char *subject, const char *const *headers, const void *data, size_t len,
                         uint64_t timeout_usec, bus_ack_fn fn, void *userdata, BusRequest **ret);

/* Follow stream in order from sequence start_seq (1: from the start; a
 * sequence below the stream's first starts at its first), messages whose
 * subject matches filter (NULL: all). fn gets each message once, in
 * stream order, nothing skipped; bus_msg_seq() tells its stream sequence.
 * Without blocking the loop: an ephemeral pull consumer (memory, one
 * replica, gone 30 s after its last use) the Bus creates and pulls from
 * asynchronously, at most 256 messages at a time; when it loses one (a
 * gap), does not answer a pull (its server is gone) or the connection
 * comes back, the Bus creates a new one from the sequence after the last
 * one fn got, within seconds (failures are retried with a backoff up to
 * 5 s, logged). -ENOTCONN while disconnected; once this returned 0 the
 * follow recovers by itself. */
int bus_stream_follow(Bus *b, const char *stream, const char *filter, uint64_t start_seq, bus_msg_fn fn,
                      void *userdata, BusSub **ret);
/* The stream sequence of a message delivered by JetStream, 0 if none. */
uint64_t bus_msg_seq(natsMsg *msg);
/* A header's value (valid while msg is), NULL if absent. */
const char *bus_msg_header(natsMsg *msg, const char *name);

/* ---- Key-value buckets ---------------------------------------------------- */

/* Create the bucket (history 1, file storage, ttl_usec 0: none) or bind
 * to it; synchronous. A bucket that exists with other settings is used
 * as it is (logged). Bucket names and keys here are [A-Za-z0-9_-]+
 * (-EINVAL otherwise). */
int bus_kv_ensure(Bus *b, const char *bucket, unsigned replicas, uint64_t ttl_usec);
/* Put or delete key without waiting (a JetStream publish to
 * $KV.bucket.key; a failure, or no acknowledgement within 10 s, is
 * logged). -ENOTCONN while disconnected (nothing is buffered). */
int bus_kv_put(Bus *b, const char *bucket, const char *key, const void *value, size_t len);
int bus_kv_delete(Bus *b, const char *bucket, const char *key);
/* Watch every key of bucket: fn runs for each current value first (in
 * the order they were written; a deleted key as a deletion), then for
 * each change (value NULL, len 0 for a deletion or purge); initial values
 * are complete when fn runs with key NULL once (revision 0, time_ns 0).
 * time_ns is when the bucket's stream stored the value (nanoseconds since
 * the Unix epoch, by the clock of the NATS server that stored it; 0 if
 * JetStream did not say): a time that does not depend on when the watch
 * delivers it. The watch is a follow of the bucket's stream
 * (bus_stream_follow()): it recovers from a lost server as every follow
 * does. */
typedef void (*bus_kv_fn)(void *userdata, const char *key, const void *value, size_t len, uint64_t revision,
                          int64_t time_ns);
int bus_kv_watch(Bus *b, const char *bucket, bus_kv_fn fn, void *userdata, BusSub **ret);

/* ---- Subjects --------------------------------------------------------------- */

/* Append name's subject tokens to the string in buf (docs/cluster.md,
 * "Subjects"), after a '.' unless buf is empty or ends with one: one
 * token per '/'-separated part, bytes outside [A-Za-z0-9_-] as %XX
 * (upper-case hex), an empty part as "%". 0, or -ENOBUFS if it does not
 * fit (buf untouched then). */
int bus_subject_append_name(char *buf, size_t size, const char *name);
/* The inverse, for the tokens of subject from the first after skip
 * tokens: 0 and the name in buf, -EINVAL for a malformed token, -ENOBUFS.
 * Only what bus_subject_append_name() writes is accepted, so a name has
 * one subject: no lower-case hex, no %XX of a byte written as it is, of
 * '/' or of NUL, no empty token, no wildcard. */
int bus_subject_name(const char *subject, unsigned skip, char *buf, size_t size);
