/* SPDX-License-Identifier: Apache-2.0 */
/* The cluster's event journal (journal-nats.c, prefix eventlog_): the
 * JetStream stream TETHER_EVENTS (docs/cluster.md), and the MQTT inbox
 * TETHER_INBOX. Made by the Cloud in cluster mode only.
 *
 * Events are published to the stream (eventlog_publish(), synchronous and
 * bounded: a device's event is acknowledged once the stream has it on
 * Replicas servers); every node follows the whole stream in order and
 * appends each message to its local Journal with id = the stream sequence
 * and the Journal's epoch = the stream's creation time, so that journal ids
 * (SSE Last-Event-ID) and device de-duplication (journal_seen()) mean the
 * same on every node; then hands it to EventLogHooks.route. A message that
 * is no event of ours (a malformed one from some other NATS client) is
 * skipped with a warning: its sequence is a gap in the local journal.
 *
 * The inbox: one durable pull consumer "inbox" shared by every node; each
 * message on tether.in.NAME becomes a public event NAME from "mqtt" in
 * TETHER_EVENTS (Nats-Msg-Id "inbox:SEQ", so a redelivery is stored once),
 * then is acknowledged.
 *
 * An EventLog owns its follow, its inbox pull and timers; it borrows the
 * Bus, the Journal and the configuration. Everything runs on the loop.
 * Errors are negative errno values; ret_* parameters are untouched on
 * failure. */
#pragma once

#include <stdbool.h>
#include <stdint.h>
#include <systemd/sd-event.h>

#include "bus.h"
#include "cloud-config.h"
#include "journal.h"
#include "proto.h"

#define EVENTLOG_STREAM "TETHER_EVENTS"
#define EVENTLOG_INBOX_STREAM "TETHER_INBOX"
#define EVENTLOG_INBOX_CONSUMER "inbox"
/* The coreid of the events that came in through the inbox. */
#define EVENTLOG_MQTT_SOURCE "mqtt"
/* How long a publish waits for the stream's acknowledgement. */
#define EVENTLOG_PUBLISH_TIMEOUT_USEC (2ULL * 1000000)

typedef struct EventLog EventLog;

typedef struct EventLogHooks {
        void *userdata;
        /* e came from the stream and is in the local Journal with id id:
         * route it on this node. Required. */
        void (*route)(void *userdata, const ProtoEvent *e, uint64_t id);
} EventLogHooks;

/* Ensure both streams and the inbox consumer (synchronous, bounded by
 * NATS's request timeouts), bring the Journal in line with the stream
 * (journal_reset() when its epoch is another stream's or it has ids the
 * stream never had), and start following the stream after the Journal's
 * last id and pulling the inbox. node is this node's name (copied).
 * event, config, bus and journal are borrowed and must outlive the
 * EventLog. Logs what failed. */
int eventlog_new(sd_event *event, const CloudConfig *config, Bus *bus, Journal *journal, const char *node,
                 const EventLogHooks *hooks, EventLog **ret);
/* Stops following and pulling. NULL is fine; returns NULL. */
EventLog *eventlog_free(EventLog *l);
static inline void eventlog_freep(EventLog **l) { eventlog_free(*l); }

/* Publish e to the stream and wait for its acknowledgement (at most
 * EVENTLOG_PUBLISH_TIMEOUT_USEC): 0 and *ret_duplicate (may be NULL)
 * whether the stream had it already (a device event, seq > 0, with the
 * same (coreid, epoch, seq) within its duplicate window); -ENOTCONN,
 * -ETIMEDOUT, -EIO and the like when it is not known to be stored;
 * -EINVAL for an event that cannot be one of the stream's (a coreid that
 * is no subject token). Nothing is routed here: that happens when the
 * follow brings it back. For EventsHooks.store. */
int eventlog_publish(EventLog *l, const ProtoEvent *e, uint64_t epoch, uint64_t seq, bool *ret_duplicate);

/* The stream message's payload for e (docs/cluster.md): a JSON object
 * {"name","data","ttl","published_at","coreid","public","epoch","seq",
 * "received_at"}; *ret is the caller's. -ENOMEM. Exposed for tests. */
int eventlog_encode(const ProtoEvent *e, uint64_t epoch, uint64_t seq, char **ret, size_t *ret_len);
/* The inverse, checked against the message's subject (which says who
 * published it, whether it is private and its name: they must agree):
 * 0 and *ret (proto_event_done() it), *ret_epoch, *ret_seq; -EBADMSG for
 * anything else (too large, bad names, not UTF-8, disagreeing). */
int eventlog_decode(const char *subject, const void *data, size_t len, ProtoEvent *ret, uint64_t *ret_epoch,
                    uint64_t *ret_seq);
