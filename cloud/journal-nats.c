/* SPDX-License-Identifier: Apache-2.0 */
/* The cluster's event journal on JetStream (journal-nats.h): publishing to
 * TETHER_EVENTS, following it into the local Journal, and the MQTT inbox
 * TETHER_INBOX. */
#include "config.h"

#include <inttypes.h>
#include <jansson.h>

#include "journal-nats.h"
#include "log.h"
#include "stats.h"
#include "util.h"

#define EVENTLOG_DUPLICATES_NS (10LL * 60 * 1000000000)
/* After a failure (the local journal, the inbox) try again after this. */
#define EVENTLOG_RETRY_USEC (1ULL * 1000000)
/* A pull waits this long on the server for an inbox message... */
#define EVENTLOG_PULL_EXPIRES_NS (5LL * 1000000000)
/* ...and the request this long for the answer (the server answers 408
 * at the expiry; this is for a server that is gone). */
#define EVENTLOG_PULL_TIMEOUT_USEC (7ULL * 1000000)
/* An inbox message not acknowledged within this is delivered again. */
#define EVENTLOG_INBOX_ACK_WAIT_NS (30LL * 1000000000)
/* Tries to set up the streams at startup (each bounded by NATS's API
 * timeout). */
#define EVENTLOG_SETUP_ATTEMPTS 4
/* At most one line about skipped messages this often. */
#define EVENTLOG_LOG_USEC (60ULL * 1000000)
/* subject: tether.priv.<coreid>.<name tokens, at worst 3 bytes a byte> */
#define EVENTLOG_SUBJECT_MAX (32 + PROTO_DEVICE_ID_MAX + 3 * TETHER_EVENT_NAME_MAX)

struct EventLog {
        const CloudConfig *config;
        sd_event *event;
        Bus *bus;
        Journal *journal;
        char *node;
        EventLogHooks hooks;

        BusSub *follow;
        bool follow_broken;         /* the local journal refused a message: re-follow later */
        sd_event_source *follow_retry;
        uint64_t skipped, skipped_logged_at; /* messages that were no events, since the last line */

        char *pull_inbox;            /* where pulls are answered */
        BusSub *pull_sub;
        bool pulling;                /* a pull is waiting for its answer (until pull_timer) */
        sd_event_source *pull_timer; /* the next pull: after a failure, or a pull that got lost */
        BusRequest *storing;         /* the publish of an inbox message into the stream */
        char *inbox_ack;             /* where to acknowledge the message being stored */
        uint64_t inbox_seq;
        uint64_t inbox_dropped, inbox_logged_at;
};

/* ---- the payload -------------------------------------------------------- */

static bool token_ok(const char *s) {
        size_t n = strlen(s);

        if (n == 0 || n > PROTO_DEVICE_ID_MAX)
                return false;
        for (size_t i = 0; i < n; i++)
                if (!((s[i] >= 'a' && s[i] <= 'z') || (s[i] >= 'A' && s[i] <= 'Z') || (s[i] >= '0' && s[i] <= '9') ||
                      s[i] == '_' || s[i] == '-'))
                        return false;
        return true;
}

int eventlog_encode(const ProtoEvent *e, uint64_t epoch, uint64_t seq, char **ret, size_t *ret_len) {
        char epoch_s[24];
        json_t *j;
        char *s;

        snprintf(epoch_s, sizeof(epoch_s), "%" PRIu64, epoch);
        j = json_pack("{s:s, s:s?, s:I, s:s?, s:s?, s:b, s:s, s:I, s:s?}", "name", e->name, "data", e->data, "ttl",
                      (json_int_t)e->ttl, "published_at", e->published_at, "coreid", e->coreid, "public",
                      !e->private_, "epoch", epoch_s, "seq", (json_int_t)seq, "received_at",
                      e->received_at ?: e->published_at);
        if (!j)
                return -ENOMEM;
        /* data: null stays null (json_pack's s? leaves it out). */
        if (!e->data && json_object_set_new(j, "data", json_null()) < 0) {
                json_decref(j);
                return -ENOMEM;
        }
        s = json_dumps(j, JSON_COMPACT);
        json_decref(j);
        if (!s)
                return -ENOMEM;
        *ret_len = strlen(s);
        *ret = s;
        return 0;
}

static int dup_string(json_t *v, size_t max, bool optional, char **ret) {
        size_t n;

        if (optional && (!v || json_is_null(v))) {
                *ret = NULL;
                return 0;
        }
        if (!json_is_string(v))
                return -EBADMSG;
        n = json_string_length(v);
        /* jansson checked the UTF-8; NUL bytes it lets through. */
        if (n > max || memchr(json_string_value(v), 0, n))
                return -EBADMSG;
        *ret = strndup(json_string_value(v), n);
        return *ret ? 0 : -ENOMEM;
}

int eventlog_decode(const char *subject, const void *data, size_t len, ProtoEvent *ret, uint64_t *ret_epoch,
                    uint64_t *ret_seq) {
        _cleanup_(proto_event_done) ProtoEvent e = {};
        char coreid[PROTO_DEVICE_ID_MAX + 1], name[TETHER_EVENT_NAME_MAX + 1];
        const char *p, *dot, *epoch_s;
        json_t *j, *v;
        json_error_t err;
        bool private_;
        uint64_t epoch;
        json_int_t seq, ttl;
        char *end;
        int r = -EBADMSG;

        /* Who, whether private, which name: the subject says it (NATS
         * permissions are per subject), the payload must agree. */
        if (startswith(subject, "tether.pub."))
                private_ = false, p = subject + strlen("tether.pub.");
        else if (startswith(subject, "tether.priv."))
                private_ = true, p = subject + strlen("tether.priv.");
        else
                return -EBADMSG;
        dot = strchr(p, '.');
        if (!dot || (size_t)(dot - p) > PROTO_DEVICE_ID_MAX)
                return -EBADMSG;
        memcpy(coreid, p, (size_t)(dot - p));
        coreid[dot - p] = 0;
        if (!token_ok(coreid) || bus_subject_name(subject, 3, name, sizeof(name)) < 0 ||
            proto_name_check(name, strlen(name), PROTO_NAME_EVENT) < 0)
                return -EBADMSG;
        /* The largest event is PROTO_HARD_PAYLOAD_MAX of data, escaped at
         * worst six bytes a byte, and some fields. */
        if (len > 6 * PROTO_HARD_PAYLOAD_MAX + 4096)
                return -EBADMSG;
        j = json_loadb(data, len, JSON_REJECT_DUPLICATES, &err);
        if (!j)
                return -EBADMSG;
        if (!json_is_object(j))
                goto out;
        v = json_object_get(j, "name");
        if (!json_is_string(v) || !streq(json_string_value(v), name))
                goto out;
        v = json_object_get(j, "coreid");
        if (!json_is_string(v) || !streq(json_string_value(v), coreid))
                goto out;
        v = json_object_get(j, "public");
        if (!json_is_boolean(v) || json_boolean_value(v) == private_)
                goto out;
        v = json_object_get(j, "ttl");
        ttl = json_is_integer(v) ? json_integer_value(v) : -1;
        if (ttl < 0 || ttl > UINT32_MAX)
                goto out;
        v = json_object_get(j, "seq");
        seq = json_is_integer(v) ? json_integer_value(v) : -1;
        if (seq < 0)
                goto out;
        epoch_s = json_string_value(json_object_get(j, "epoch"));
        if (!epoch_s || epoch_s[0] < '0' || epoch_s[0] > '9')
                goto out;
        errno = 0;
        epoch = strtoull(epoch_s, &end, 10);
        if (errno != 0 || *end)
                goto out;
        e.ttl = (uint32_t)ttl;
        e.private_ = private_;
        r = dup_string(json_object_get(j, "data"), PROTO_HARD_PAYLOAD_MAX, true, &e.data);
        if (r >= 0)
                r = dup_string(json_object_get(j, "published_at"), 63, false, &e.published_at);
        if (r >= 0)
                r = dup_string(json_object_get(j, "received_at"), 63, true, &e.received_at);
        if (r >= 0 && (!(e.name = strdup(name)) || !(e.coreid = strdup(coreid))))
                r = -ENOMEM;
        if (r < 0)
                goto out;
        *ret = e;
        /* cppcheck-suppress unreadVariable ; moved to *ret; the _cleanup_ handler reads it */
        e = (ProtoEvent){};
        *ret_epoch = epoch;
        *ret_seq = (uint64_t)seq;
        r = 0;
out:
        json_decref(j);
        return r == -ENOMEM ? r : r < 0 ? -EBADMSG : r;
}

/* "tether.pub.<coreid>.<name>" or tether.priv. */
static int subject_for(const ProtoEvent *e, char *buf, size_t size) {
        int n;

        if (!e->coreid || !token_ok(e->coreid))
                return -EINVAL;
        n = snprintf(buf, size, "tether.%s.%s.", e->private_ ? "priv" : "pub", e->coreid);
        if (n < 0 || (size_t)n >= size)
                return -EINVAL;
        return bus_subject_append_name(buf, size, e->name) < 0 ? -EINVAL : 0;
}

/* ---- publishing ------------------------------------------------------------ */

int eventlog_publish(EventLog *l, const ProtoEvent *e, uint64_t epoch, uint64_t seq, bool *ret_duplicate) {
        _cleanup_free_ char *json = NULL;
        char subject[EVENTLOG_SUBJECT_MAX], msg_id[PROTO_DEVICE_ID_MAX + 48];
        const char *headers[5] = { "Tether-Node", l->node };
        bool duplicate = false;
        size_t len;
        int r;

        r = subject_for(e, subject, sizeof(subject));
        if (r < 0)
                return r;
        r = eventlog_encode(e, epoch, seq, &json, &len);
        if (r < 0)
                return r;
        if (seq > 0) {
                snprintf(msg_id, sizeof(msg_id), "%s:%" PRIu64 ":%" PRIu64, e->coreid, epoch, seq);
                headers[2] = "Nats-Msg-Id";
                headers[3] = msg_id;
        }
        r = bus_js_publish(l->bus, subject, headers, json, len, EVENTLOG_PUBLISH_TIMEOUT_USEC, NULL,
                           &duplicate);
        if (r < 0)
                return r;
        if (ret_duplicate)
                *ret_duplicate = duplicate;
        return 0;
}

/* ---- following ------------------------------------------------------------- */

static int follow_start(EventLog *l);

static int follow_retry_cb(sd_event_source *s, uint64_t usec, void *userdata) {
        EventLog *l = userdata;
        int r;

        l->follow = bus_sub_free(l->follow);
        l->follow_broken = false;
        r = follow_start(l);
        if (r < 0) {
                log_warning_errno(r, "Failed to follow the stream " EVENTLOG_STREAM " again, retrying: %m");
                l->follow_broken = true;
                (void)sd_event_source_set_time_relative(s, EVENTLOG_RETRY_USEC);
                (void)sd_event_source_set_enabled(s, SD_EVENT_ONESHOT);
        }
        return 0;
}

static void follow_skip(EventLog *l, uint64_t seq, const char *subject, const char *why) {
        uint64_t now = now_usec();

        l->skipped++;
        stats_event_dropped(STATS_DROPPED_STREAM_INVALID);
        if (l->skipped_logged_at != 0 && now - l->skipped_logged_at < EVENTLOG_LOG_USEC)
                return;
        log_warning("Skipped message %" PRIu64 " of the stream " EVENTLOG_STREAM " on '%s': %s (%" PRIu64
                    " such message(s) since the last line).",
                    seq, subject, why, l->skipped);
        l->skipped_logged_at = now;
        l->skipped = 0;
}

static void follow_cb(void *userdata, natsMsg *msg) {
        _cleanup_(proto_event_done) ProtoEvent e = {};
        EventLog *l = userdata;
        uint64_t seq = bus_msg_seq(msg), epoch, dseq;
        const char *subject = natsMsg_GetSubject(msg);
        int r;

        if (l->follow_broken)
                return; /* until the retry follows again from the journal's end */
        if (seq == 0 || seq <= journal_last_id(l->journal))
                return; /* had it */
        r = eventlog_decode(subject, natsMsg_GetData(msg), (size_t)natsMsg_GetDataLength(msg), &e, &epoch, &dseq);
        if (r == -ENOMEM) {
                log_warning("Out of memory reading the stream " EVENTLOG_STREAM ".");
                goto broken;
        }
        if (r < 0) {
                /* Not an event of ours: a gap in the local journal. */
                follow_skip(l, seq, subject, "not a valid event");
                return;
        }
        r = journal_append_at(l->journal, &e, epoch, dseq, seq);
        if (r == -E2BIG) {
                follow_skip(l, seq, subject, "too large for the local journal");
                return;
        }
        if (r < 0) {
                log_warning_errno(r, "Failed to append message %" PRIu64 " of the stream " EVENTLOG_STREAM
                                     " to the local event journal, trying again in 1 s: %m",
                                  seq);
                goto broken;
        }
        l->hooks.route(l->hooks.userdata, &e, seq);
        return;
broken:
        /* Nothing after it may go first: stop, and follow again from the
         * local journal's end (outside this callback). */
        l->follow_broken = true;
        (void)sd_event_source_set_time_relative(l->follow_retry, EVENTLOG_RETRY_USEC);
        (void)sd_event_source_set_enabled(l->follow_retry, SD_EVENT_ONESHOT);
}

static int follow_start(EventLog *l) {
        return bus_stream_follow(l->bus, EVENTLOG_STREAM, NULL, journal_last_id(l->journal) + 1, follow_cb, l,
                                 &l->follow);
}

/* ---- the inbox ----------------------------------------------------------------
 *
 * Pull requests ask for one message at a time, with this node's own inbox
 * subject as their reply subject: JetStream delivers a message there with
 * its own subject (tether.in....), which bus_request() (matching replies by
 * subject) cannot take; so one subscription to that inbox gets them all,
 * answers of old pulls included. One message is handled at a time: one
 * arriving while another is being stored is given back (-NAK, it comes
 * again). A pull lost with a connection or a server is asked again after
 * EVENTLOG_PULL_TIMEOUT_USEC. */

static void inbox_pull(EventLog *l);

static void inbox_later(EventLog *l, uint64_t usec) {
        (void)sd_event_source_set_time_relative(l->pull_timer, usec);
        (void)sd_event_source_set_enabled(l->pull_timer, SD_EVENT_ONESHOT);
}

static int pull_timer_cb(sd_event_source *s, uint64_t usec, void *userdata) {
        EventLog *l = userdata;

        l->pulling = false; /* no answer: ask again */
        inbox_pull(l);
        return 0;
}

/* Acknowledge (or, with what "-NAK", give back) an inbox message. */
static void inbox_ack(EventLog *l, const char *ack, uint64_t seq, const char *what) {
        int r = bus_publish(l->bus, ack, NULL, what, strlen(what));

        if (r < 0)
                log_debug_errno(r, "Failed to acknowledge inbox message %" PRIu64 " (it comes again): %m", seq);
}

static void inbox_stored(void *userdata, int error, uint64_t seq, bool duplicate) {
        EventLog *l = userdata;
        _cleanup_free_ char *ack = TAKE_PTR(l->inbox_ack);

        l->storing = NULL;
        if (error < 0) {
                log_warning_errno(error, "Failed to store inbox message %" PRIu64 " in " EVENTLOG_STREAM
                                         ", trying again: %m",
                                  l->inbox_seq);
                inbox_ack(l, ack, l->inbox_seq, "-NAK");
                inbox_later(l, EVENTLOG_RETRY_USEC);
                return;
        }
        if (!duplicate)
                stats_event_in(STATS_FROM_MQTT);
        inbox_ack(l, ack, l->inbox_seq, "+ACK");
        inbox_pull(l);
}

static void inbox_drop(EventLog *l, const char *subject, const char *why) {
        uint64_t now = now_usec();

        l->inbox_dropped++;
        stats_event_dropped(STATS_DROPPED_INBOX_INVALID);
        if (l->inbox_logged_at == 0 || now - l->inbox_logged_at >= EVENTLOG_LOG_USEC) {
                log_warning("Dropped the MQTT message on '%s': %s (%" PRIu64 " such message(s) since the last line).",
                            subject, why, l->inbox_dropped);
                l->inbox_logged_at = now;
                l->inbox_dropped = 0;
        }
}

typedef enum InboxTake {
        INBOX_STORING, /* inbox_stored() runs when it is */
        INBOX_DROPPED, /* no event: acknowledged, it goes */
        INBOX_FAILED,  /* given back, try again later */
} InboxTake;

/* One inbox message (stream sequence seq): into the stream as an event
 * from "mqtt", then acknowledged (inbox_stored()). */
static InboxTake inbox_take(EventLog *l, natsMsg *msg, uint64_t seq) {
        _cleanup_free_ char *json = NULL, *data = NULL;
        char name[TETHER_EVENT_NAME_MAX + 1], subject[EVENTLOG_SUBJECT_MAX], msg_id[48], at[32];
        const char *in = natsMsg_GetSubject(msg), *payload = natsMsg_GetData(msg);
        size_t n = (size_t)natsMsg_GetDataLength(msg), len;
        const char *headers[5] = { "Tether-Node", l->node, "Nats-Msg-Id", msg_id };
        ProtoEvent e;
        int r;

        if (!startswith(in, "tether.in.") || bus_subject_name(in, 2, name, sizeof(name)) < 0 ||
            proto_name_check(name, strlen(name), PROTO_NAME_EVENT) < 0) {
                inbox_drop(l, in, "not a valid event name");
                return INBOX_DROPPED;
        }
        if (proto_event_name_reserved(name, true)) {
                inbox_drop(l, in, "names under " PROTO_EVENT_CLOUD_PREFIX " are reserved for the cloud");
                return INBOX_DROPPED;
        }
        if (n > l->config->max_payload) {
                inbox_drop(l, in, "larger than MaxPayload");
                return INBOX_DROPPED;
        }
        if (proto_utf8_check(payload ?: "", n) < 0) {
                inbox_drop(l, in, "not UTF-8 text");
                return INBOX_DROPPED;
        }
        data = strndup(payload ?: "", n);
        if (!data)
                return INBOX_FAILED;
        proto_timestamp_now(at);
        e = (ProtoEvent){ .name = name, .data = data, .ttl = PROTO_DEFAULT_TTL, .published_at = at,
                          .coreid = (char *)EVENTLOG_MQTT_SOURCE };
        r = subject_for(&e, subject, sizeof(subject));
        if (r >= 0)
                r = eventlog_encode(&e, 0, 0, &json, &len);
        if (r < 0)
                return INBOX_FAILED;
        /* A message delivered again (a node died before its ack) is
         * stored once: the stream knows this id for Duplicates. */
        snprintf(msg_id, sizeof(msg_id), "inbox:%" PRIu64, seq);
        r = bus_js_publish_async(l->bus, subject, headers, json, len, EVENTLOG_PUBLISH_TIMEOUT_USEC, inbox_stored, l,
                                 &l->storing);
        if (r < 0) {
                log_warning_errno(r, "Failed to store inbox message %" PRIu64 " in " EVENTLOG_STREAM
                                     ", trying again: %m",
                                  seq);
                return INBOX_FAILED;
        }
        return INBOX_STORING;
}

static void inbox_msg_cb(void *userdata, natsMsg *msg) {
        EventLog *l = userdata;
        const char *status = bus_msg_header(msg, "Status"), *ack = natsMsg_GetReply(msg);
        uint64_t seq = bus_msg_seq(msg);

        if (status || !ack || seq == 0) {
                /* The end of a pull: 408 it expired with nothing; others
                 * (404 nothing there, 409 too many pulls waiting, the
                 * consumer is gone...) ask again a while later. */
                if (status && !streq(status, "408"))
                        log_debug("Pulling from " EVENTLOG_INBOX_STREAM ": status %s.", status);
                l->pulling = false;
                if (status && streq(status, "408"))
                        inbox_pull(l);
                else
                        inbox_later(l, EVENTLOG_RETRY_USEC);
                return;
        }
        l->pulling = false;
        if (l->storing) {
                inbox_ack(l, ack, seq, "-NAK");
                return;
        }
        l->inbox_ack = strdup(ack);
        l->inbox_seq = seq;
        switch (l->inbox_ack ? inbox_take(l, msg, seq) : INBOX_FAILED) {
        case INBOX_STORING:
                (void)sd_event_source_set_enabled(l->pull_timer, SD_EVENT_OFF);
                return;
        case INBOX_DROPPED:
                inbox_ack(l, ack, seq, "+ACK");
                inbox_pull(l);
                break;
        case INBOX_FAILED:
                inbox_ack(l, ack, seq, "-NAK");
                inbox_later(l, EVENTLOG_RETRY_USEC);
                break;
        }
        free(l->inbox_ack);
        l->inbox_ack = NULL;
}

static void inbox_pull(EventLog *l) {
        char req[64];
        natsStatus s;
        int n;

        if (l->pulling || l->storing)
                return;
        n = snprintf(req, sizeof(req), "{\"batch\":1,\"expires\":%lld}", (long long)EVENTLOG_PULL_EXPIRES_NS);
        s = natsConnection_PublishRequest(bus_connection(l->bus),
                                          "$JS.API.CONSUMER.MSG.NEXT." EVENTLOG_INBOX_STREAM "." EVENTLOG_INBOX_CONSUMER,
                                          l->pull_inbox, req, n);
        if (s != NATS_OK) {
                log_debug("Pulling from " EVENTLOG_INBOX_STREAM " failed, trying again: %s", natsStatus_GetText(s));
                inbox_later(l, EVENTLOG_RETRY_USEC);
                return;
        }
        l->pulling = true;
        inbox_later(l, EVENTLOG_PULL_TIMEOUT_USEC);
}

static int inbox_start(EventLog *l) {
        natsInbox *inbox = NULL;
        int r;

        if (natsInbox_Create(&inbox) != NATS_OK)
                return -ENOMEM;
        l->pull_inbox = strdup(inbox);
        natsInbox_Destroy(inbox);
        if (!l->pull_inbox)
                return -ENOMEM;
        r = bus_subscribe(l->bus, l->pull_inbox, NULL, inbox_msg_cb, l, &l->pull_sub);
        if (r < 0)
                return r;
        inbox_pull(l);
        return 0;
}

/* ---- setup ---------------------------------------------------------------------- */

static int js_error(natsStatus s, jsErrCode jerr) {
        if (s == NATS_OK)
                return 0;
        if (s == NATS_CONNECTION_CLOSED || s == NATS_CONNECTION_DISCONNECTED || s == NATS_NO_SERVER)
                return -ENOTCONN;
        if (s == NATS_TIMEOUT)
                return -ETIMEDOUT;
        if (s == NATS_NO_MEMORY)
                return -ENOMEM;
        return jerr == JSStreamNotFoundErr || jerr == JSConsumerNotFoundErr ? -ENOENT : -EIO;
}

static int ensure_streams(EventLog *l, int64_t *ret_created, uint64_t *ret_last_seq) {
        const CloudConfig *cfg = l->config;
        const char *events_subjects[] = { "tether.pub.>", "tether.priv.>" }, *inbox_subjects[] = { "tether.in.>" };
        int64_t replicas = cfg->cluster_replicas > 0 ? cfg->cluster_replicas : 1, created;
        jsStreamConfig sc;
        jsConsumerConfig cc;
        jsStreamInfo *si = NULL;
        jsConsumerInfo *ci = NULL;
        jsErrCode jerr = 0;
        natsStatus s;
        int r;

        jsStreamConfig_Init(&sc);
        sc.Name = EVENTLOG_STREAM;
        sc.Subjects = events_subjects;
        sc.SubjectsLen = 2;
        sc.Retention = js_LimitsPolicy;
        sc.Storage = js_FileStorage;
        sc.Discard = js_DiscardOld;
        sc.MaxBytes = cfg->journal_max_bytes;
        sc.Replicas = replicas;
        sc.Duplicates = EVENTLOG_DUPLICATES_NS;
        r = bus_stream_ensure(l->bus, &sc, &created);
        if (r < 0)
                return log_error_errno(r, "Failed to set up the stream " EVENTLOG_STREAM ": %m");

        s = js_GetStreamInfo(&si, bus_js(l->bus), EVENTLOG_STREAM, NULL, &jerr);
        if (s != NATS_OK)
                return log_error_errno(js_error(s, jerr), "Failed to read the state of the stream " EVENTLOG_STREAM
                                                          ": %s (%d)",
                                       natsStatus_GetText(s), (int)jerr);
        *ret_last_seq = si->State.LastSeq;
        jsStreamInfo_Destroy(si);

        jsStreamConfig_Init(&sc);
        sc.Name = EVENTLOG_INBOX_STREAM;
        sc.Subjects = inbox_subjects;
        sc.SubjectsLen = 1;
        sc.Retention = js_WorkQueuePolicy;
        sc.Storage = js_FileStorage;
        sc.Discard = js_DiscardOld;
        sc.MaxBytes = cfg->journal_max_bytes;
        sc.Replicas = replicas;
        r = bus_stream_ensure(l->bus, &sc, NULL);
        if (r < 0)
                return log_error_errno(r, "Failed to set up the stream " EVENTLOG_INBOX_STREAM ": %m");

        jerr = 0;
        s = js_GetConsumerInfo(&ci, bus_js(l->bus), EVENTLOG_INBOX_STREAM, EVENTLOG_INBOX_CONSUMER, NULL, &jerr);
        if (s != NATS_OK && jerr == JSConsumerNotFoundErr) {
                jsConsumerConfig_Init(&cc);
                cc.Durable = EVENTLOG_INBOX_CONSUMER;
                cc.AckPolicy = js_AckExplicit;
                cc.AckWait = EVENTLOG_INBOX_ACK_WAIT_NS;
                cc.DeliverPolicy = js_DeliverAll;
                cc.Replicas = replicas;
                jerr = 0;
                /* Every node may try at once: one wins, the same config. */
                s = js_AddConsumer(&ci, bus_js(l->bus), EVENTLOG_INBOX_STREAM, &cc, NULL, &jerr);
                if (s != NATS_OK) {
                        jerr = 0;
                        s = js_GetConsumerInfo(&ci, bus_js(l->bus), EVENTLOG_INBOX_STREAM, EVENTLOG_INBOX_CONSUMER,
                                               NULL, &jerr);
                }
        }
        if (s != NATS_OK)
                return log_error_errno(js_error(s, jerr), "Failed to set up the consumer '" EVENTLOG_INBOX_CONSUMER
                                                          "' of " EVENTLOG_INBOX_STREAM ": %s (%d)",
                                       natsStatus_GetText(s), (int)jerr);
        jsConsumerInfo_Destroy(ci);
        *ret_created = created;
        return 0;
}

EventLog *eventlog_free(EventLog *l) {
        if (!l)
                return NULL;
        l->follow = bus_sub_free(l->follow);
        l->pull_sub = bus_sub_free(l->pull_sub);
        bus_request_cancel(l->storing);
        /* An inbox message being handled comes again after the ack wait. */
        free(l->inbox_ack);
        free(l->pull_inbox);
        sd_event_source_disable_unref(l->follow_retry);
        sd_event_source_disable_unref(l->pull_timer);
        free(l->node);
        free(l);
        return NULL;
}

int eventlog_new(sd_event *event, const CloudConfig *config, Bus *bus, Journal *journal, const char *node,
                 const EventLogHooks *hooks, EventLog **ret) {
        _cleanup_(eventlog_freep) EventLog *l = NULL;
        uint64_t epoch, last_seq = 0;
        int64_t created = 0;
        int r;

        l = calloc(1, sizeof(*l));
        if (!l)
                return log_error_errno(-ENOMEM, "Out of memory.");
        *l = (EventLog){ .config = config, .event = event, .bus = bus, .journal = journal, .hooks = *hooks };
        l->node = strdup(node);
        if (!l->node)
                return log_error_errno(-ENOMEM, "Out of memory.");
        r = sd_event_add_time(event, &l->follow_retry, CLOCK_MONOTONIC, 0, 0, follow_retry_cb, l);
        if (r >= 0)
                r = sd_event_source_set_enabled(l->follow_retry, SD_EVENT_OFF);
        if (r >= 0)
                r = sd_event_add_time(event, &l->pull_timer, CLOCK_MONOTONIC, 0, 0, pull_timer_cb, l);
        if (r >= 0)
                r = sd_event_source_set_enabled(l->pull_timer, SD_EVENT_OFF);
        if (r < 0)
                return log_error_errno(r, "Failed to add the cluster journal's timers: %m");

        /* A JetStream cluster that has just started (or is electing a
         * leader) may answer its API late: a few tries before giving up. */
        for (unsigned attempt = 1;; attempt++) {
                r = ensure_streams(l, &created, &last_seq);
                if (r >= 0 || (r != -ETIMEDOUT && r != -ENOTCONN) || attempt >= EVENTLOG_SETUP_ATTEMPTS)
                        break;
                log_notice("Setting up the cluster's event streams: attempt %u of %u failed, trying again.",
                           attempt, EVENTLOG_SETUP_ATTEMPTS);
        }
        if (r < 0)
                return r;
        /* The local journal caches this stream: ids are its sequences, the
         * epoch its creation time. A journal of another stream (or of one
         * node), or with ids the stream never had (it was recreated, lost
         * its data), starts afresh and fills from the stream. */
        epoch = (uint64_t)created;
        if (epoch == 0)
                return log_error_errno(-EIO, "The stream " EVENTLOG_STREAM " has no creation time.");
        if (journal_epoch(journal) != epoch || journal_last_id(journal) > last_seq) {
                if (journal_last_id(journal) > 0)
                        log_notice("The local event journal (epoch %016" PRIx64 ", last id %" PRIu64 ") is not a "
                                   "copy of the stream " EVENTLOG_STREAM " (epoch %016" PRIx64 ", last sequence "
                                   "%" PRIu64 "): starting it afresh from the stream (the old one is kept as "
                                   "events.journal.old).",
                                   journal_epoch(journal), journal_last_id(journal), epoch, last_seq);
                r = journal_reset(journal, epoch);
                if (r < 0)
                        return log_error_errno(r, "Failed to start the local event journal afresh: %m");
        }
        r = follow_start(l);
        if (r < 0)
                return log_error_errno(r, "Failed to follow the stream " EVENTLOG_STREAM ": %m");
        log_info("Following the stream " EVENTLOG_STREAM " from sequence %" PRIu64 " (last %" PRIu64 ").",
                 journal_last_id(journal) + 1, last_seq);
        r = inbox_start(l);
        if (r < 0)
                return log_error_errno(r, "Failed to subscribe to the inbox of " EVENTLOG_INBOX_STREAM ": %m");
        *ret = TAKE_PTR(l);
        return 0;
}
