/* SPDX-License-Identifier: Apache-2.0 */
/* The tether wire protocol between tetherd and tether-cloudd: constants,
 * name rules and payload codecs (docs/protocol.md is the reference).
 * Pure functions: no logging, no I/O; negative errno on failure and
 * ret_* parameters untouched on failure. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <jansson.h>

#include "tether/plugin.h"

#define PROTO_DEFAULT_PORT 5684
#define PROTO_DEFAULT_PAYLOAD_MAX 16384u /* bytes, argument/data/string value */
#define PROTO_HARD_PAYLOAD_MAX 65536u    /* no configuration may exceed this */
#define PROTO_DEFAULT_TTL 60u
#define PROTO_DEVICE_ID_MAX 64
#define PROTO_UNIT_MAX 16 /* bytes of a variable unit in describe data (TETHER_UNIT_MAX) */

/* Resource path prefixes (first Uri-Path segment). */
#define PROTO_PATH_DESCRIBE "d"
#define PROTO_PATH_FUNCTION "f"
#define PROTO_PATH_VARIABLE "v"
#define PROTO_PATH_EVENT "e"
#define PROTO_PATH_OTA "o"
#define PROTO_PATH_ARTIFACT "a" /* GET /a/SHA256 with Block2: an OTA artifact (docs/protocol.md, "Artifacts") */
#define PROTO_PATH_ENROLL "enroll" /* POST, on an anonymous session (docs/protocol.md) */
#define PROTO_PATH_CERT "cert"     /* POST, renewal on a device's session */
#define PROTO_PATH_STREAM "t"          /* /t/{sid}: tunnels and log streams */
#define PROTO_STREAM_CHUNK_MAX 32768   /* payload bytes of one data message */
#define PROTO_STREAM_WINDOW_DEFAULT 262144
#define PROTO_STREAM_WINDOW_MIN 32768
#define PROTO_STREAM_WINDOW_MAX 4194304
#define PROTO_STREAM_INFLIGHT_MAX 131072 /* per session and direction: stream data sent and not yet answered */
/* What one stream message counts against PROTO_STREAM_INFLIGHT_MAX besides
 * its payload: as much as the cloud counts per message against a device's
 * MaxQueuedBytes, so that many small messages cannot fill that either. */
#define PROTO_STREAM_MESSAGE_COST 128

/* Uri-Query flag marking a published event private. */
#define PROTO_QUERY_PRIVATE "private"
/* Uri-Query options of a publish: the event's sequence number (decimal,
 * 1..2^64-1) and the device's outbox epoch (16 lowercase hex digits). */
#define PROTO_QUERY_SEQ "seq="
#define PROTO_QUERY_EPOCH "epoch="
/* Uri-Query option of a publish: when the device published the event, by
 * its wall clock, in milliseconds since 1970-01-01T00:00:00Z (decimal,
 * 0..2^64-1). Optional: devices that do not send it get the time the
 * cloud received the event. */
#define PROTO_QUERY_TIME "time="

/* The cloud takes a device's publish time only when it is sane
 * (proto_publish_time_problem(), docs/protocol.md "Event time"): not
 * before this floor (2025-01-01T00:00:00Z), not more than
 * PROTO_TIME_SKEW_MS after the cloud's clock, not more than
 * PROTO_TIME_MAX_AGE_MS before it. */
#define PROTO_TIME_FLOOR_MS UINT64_C(1735689600000)
#define PROTO_TIME_SKEW_MS UINT64_C(60000)
#define PROTO_TIME_MAX_AGE_MS (UINT64_C(30) * 24 * 3600 * 1000)

/* CoAP Content-Format numbers used. */
#define PROTO_CF_TEXT 0
#define PROTO_CF_JSON 50
#define PROTO_CF_OCTETS 42 /* application/octet-stream */

typedef enum ProtoNameKind {
        PROTO_NAME_FUNCTION, /* [A-Za-z0-9_.-]{1,64} */
        PROTO_NAME_VARIABLE, /* same */
        PROTO_NAME_EVENT,    /* [A-Za-z0-9_.-/]{1,128}, no empty segment */
        PROTO_NAME_PREFIX,   /* like EVENT but may be empty or end in '/' */
        PROTO_NAME_DEVICE,   /* [A-Za-z0-9_-]{1,64}, not "api" or "events" */
        PROTO_NAME_PLUGIN,   /* [A-Za-z0-9_-]{1,64} */
} ProtoNameKind;

/* 0 if valid; -EINVAL (bad character/empty), -ENAMETOOLONG, -EADDRINUSE
 * for a reserved device id ("api", "events"). */
int proto_name_check(const char *name, size_t len, ProtoNameKind kind);
/* Why proto_name_check(..., PROTO_NAME_DEVICE) refused an id, from its
 * error, for "Invalid device ID 'ID': REASON": a reserved id or the
 * pattern. A static string. */
const char *proto_device_id_problem(int error);

/* Event names under PROTO_EVENT_CLOUD_PREFIX are the cloud's own
 * (tether/ota/JOB, tether/stream/lost), except those under
 * PROTO_EVENT_AGENT_PREFIX, where the agent publishes the changes of its
 * variables (docs/plugins.md). True if a device (device=true) or an API
 * client (device=false) may not publish name: a device anything under
 * "tether/" but "tether/var/", an API client anything under "tether/". */
#define PROTO_EVENT_CLOUD_PREFIX "tether/"
#define PROTO_EVENT_AGENT_PREFIX "tether/var/"
bool proto_event_name_reserved(const char *name, bool device);

/* True if name starts with prefix (the empty prefix matches all). */
bool proto_prefix_match(const char *prefix, const char *name);

/* 0 if buf[0..len) is valid UTF-8 without NUL bytes, else -EILSEQ. */
int proto_utf8_check(const char *buf, size_t len);

/* Type names on the wire: "bool", "int32", "double", "string". */
const char *proto_type_to_string(uint32_t type);
/* 0 on failure. */
uint32_t proto_type_from_string(const char *s);

/* Function result: decimal int32 in ASCII, no sign for >= 0. buf must
 * hold 12 bytes; returns the length. */
int proto_result_format(int32_t value, char buf[static 12]);
/* -EBADMSG unless the payload is exactly a decimal int32. */
int proto_result_parse(const uint8_t *buf, size_t len, int32_t *ret_value);

/* Variable value: one JSON scalar (true/false, integer, real with a
 * decimal point or exponent, string). *ret is malloc'd text, NUL
 * terminated; caller frees. -EINVAL for an unknown type. */
int proto_value_encode(const struct tether_value *v, char **ret, size_t *ret_len);
/* Parse a variable payload into a JSON scalar and its type. The caller
 * owns *ret_json (json_decref). -EBADMSG if not exactly one scalar. */
int proto_value_decode(const uint8_t *buf, size_t len, json_t **ret_json, uint32_t *ret_type);

/* An event as carried in subscription notifications and stored by the
 * cloud. Strings are owned by the struct; free with proto_event_done(). */
typedef struct ProtoEvent {
        char *name;
        char *data;         /* may be NULL */
        uint32_t ttl;
        bool private_;
        char *published_at; /* RFC 3339 UTC, e.g. 2026-11-25T23:59:59.123Z */
        char *coreid;       /* publishing device id, or "api" */
        char *received_at;  /* when the cloud got it, RFC 3339 UTC; NULL: published_at */
} ProtoEvent;

void proto_event_done(ProtoEvent *e);
/* JSON object {"name","data","ttl","published_at","coreid","received_at"
 * [,"private"]}; data is null when e has none, received_at is published_at
 * when e has none. Decoding takes data (absent or null: NULL) and
 * received_at (absent: NULL) as optional. */
int proto_event_encode(const ProtoEvent *e, char **ret, size_t *ret_len);
int proto_event_decode(const uint8_t *buf, size_t len, ProtoEvent *ret);

/* Describe data (GET /d): validate a payload and return the parsed object.
 * Shape: {"agent":str,"version":str,"plugins":[{"name","version"}...],
 * "functions":[str...],"variables":{name:type...},"events":[str...],
 * "units":{variable:unit...},"system":{...}}; events, units and system are
 * optional. A "system" (docs/protocol.md, "Describe"; the agent's
 * inventory) that is not {"os","arch","kernel": text of at most
 * PROTO_SYSTEM_TEXT_MAX bytes without control characters, "packages":
 * {Debian package name: version text of at most PROTO_PACKAGE_VERSION_MAX
 * bytes}, at most PROTO_SYSTEM_PACKAGES_MAX of them}, each optional, is
 * dropped from the document rather than refusing it: the functions and
 * variables still count. Other members of system are dropped too. */
#define PROTO_SYSTEM_TEXT_MAX 256
#define PROTO_SYSTEM_PACKAGES_MAX 128
#define PROTO_PACKAGE_NAME_MAX 128
#define PROTO_PACKAGE_VERSION_MAX 128
int proto_describe_decode(const uint8_t *buf, size_t len, json_t **ret);
/* A Debian package name: [a-z0-9][a-z0-9+.-]+, at most
 * PROTO_PACKAGE_NAME_MAX bytes. */
bool proto_package_name_valid(const char *s, size_t len);
/* A Debian version as text: [A-Za-z0-9.+~:-]{1,PROTO_PACKAGE_VERSION_MAX}
 * (what dpkg accepts, without checking its order rules). */
bool proto_package_version_valid(const char *s, size_t len);
/* UTF-8 text of at most max bytes without NUL and control characters
 * (C0, DEL, C1). */
bool proto_text_clean(const char *s, size_t len, size_t max);

/* The Uri-Query options of a publish (POST /e/{name}). */
typedef struct ProtoPublishQuery {
        bool private_;
        bool has_seq, has_epoch, has_time;
        uint64_t seq;     /* 1..2^64-1 */
        uint64_t epoch;   /* any, sent as 16 hex digits */
        uint64_t time_ms; /* any; whether it is sane is the cloud's call */
} ProtoPublishQuery;

/* Take one Uri-Query option (len bytes, not NUL terminated) into q,
 * which starts zeroed. Unknown options are ignored. -EINVAL for a
 * malformed or repeated seq=, epoch= or time=. */
int proto_publish_query_add(ProtoPublishQuery *q, const uint8_t *opt, size_t len);
/* After the last option: -EINVAL if only one of seq= and epoch= came. */
int proto_publish_query_check(const ProtoPublishQuery *q);

/* RFC 3339 UTC timestamp with milliseconds of the current wall clock. */
void proto_timestamp_now(char buf[static 32]);
/* The same for ms milliseconds since 1970-01-01T00:00:00Z; -ERANGE past
 * the year 9999 (buf untouched). */
int proto_timestamp_format(uint64_t ms, char buf[static 32]);
/* The wall clock in milliseconds since 1970-01-01T00:00:00Z (0 if the
 * clock is before that). */
uint64_t proto_time_now_ms(void);
/* Whether a device's publish time device_ms is sane for a cloud whose
 * clock says now_ms: NULL if so, else why not (a static string for a log
 * line, e.g. "more than 60 s ahead of the cloud's clock"). */
const char *proto_publish_time_problem(uint64_t device_ms, uint64_t now_ms);
