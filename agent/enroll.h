/* SPDX-License-Identifier: Apache-2.0 */
/* Enrollment and renewal of the device certificate (docs/enrollment.md).
 *
 * Enrollment: with a provisioning token ([Enroll] TokenFile= at start, or
 * tetherctl enroll through the local API), the device key ([Device] Key=,
 * made if missing: EC P-256, 0600, written before the request so that a
 * retry after a crash asks with the same key) and a CSR whose CN is the
 * device ID, POST /enroll over an anonymous TLS session of our own: a
 * short-lived libcoap context driven by the agent's loop, which goes
 * through [Cloud] Host='s entries (each with a deadline of its own) and
 * checks the cloud's certificate and host name as the Conn does. 4.29 and
 * 5.03 send the same request again after Max-Age; transport failures and
 * other 5.xx back off and try again; another 4.xx ends the attempt with
 * the cloud's reason. The issued certificate is installed atomically
 * (agent/certfile.h), then hooks->enrolled() lets the owner connect.
 *
 * Renewal: at renew_after plus jitter of the certificate in place (read
 * from the file, so it survives restarts), a new key and POST /cert over
 * the Conn's session (conn_request()); the session is kept, the next
 * connection uses the new pair. Failures back off (Max-Age honoured) and
 * try again; a success re-arms the timer from the new certificate.
 *
 * Re-enrollment: a certificate found expired at start or when the
 * renewal timer fires (also at notAfter while a renewal waits for a
 * connection) is replaced by an enrollment without a token, for the key
 * in place and the certificate's ID; the cloud grants it for the key it
 * has on record. A refusal (4.xx) is logged with the advice to enroll
 * with a token. Not with Renew=no.
 *
 * Owns its libcoap context and session while enrolling, its timers and
 * name lookups; borrows the Conn and the Config. Logs what it does (with
 * the device ID) and reports a STATUS= line through hooks->status. */
#pragma once

#include <jansson.h>
#include <signal.h>
#include <stdbool.h>
#include <stddef.h>
#include <systemd/sd-event.h>

#include "agent-config.h"
#include "conn.h"

typedef struct Enroll Enroll;

/* Signal used to learn that the enrollment's name lookup finished. The
 * caller blocks it before enroll_new(), like CONN_RESOLVE_SIGNAL. */
#define ENROLL_RESOLVE_SIGNAL (SIGRTMIN + 2)

/* Longest provisioning token accepted (the cloud's are 46 characters). */
#define ENROLL_TOKEN_MAX 256

typedef struct EnrollHooks {
        void *userdata;
        /* The key and certificate are in place (enrolled as device_id):
         * connect now. */
        void (*enrolled)(void *userdata, const char *device_id);
        /* A human line for STATUS= while not connected because of
         * enrollment ("Not enrolled: ...", "Enrolling ..."). */
        void (*status)(void *userdata, const char *status);
} EnrollHooks;

/* cfg is borrowed until enroll_reconfigure() or enroll_free(); conn is
 * borrowed for the life of the Enroll; hooks copied. */
int enroll_new(sd_event *event, Conn *conn, const Config *cfg, const EnrollHooks *hooks, Enroll **ret);
Enroll *enroll_free(Enroll *e);
static inline void enroll_freep(Enroll **e) { enroll_free(*e); }

/* At start: complete or discard a leftover .new pair (certfile_recover),
 * then look at the certificate. 1: the device has one, the caller
 * connects (the renewal timer is armed); 0: it has none, and enrollment
 * started from TokenFile= or the agent waits for tetherctl enroll (the
 * STATUS= line says which). Negative errno only for out of memory. */
int enroll_start(Enroll *e);

/* tetherctl enroll: enroll now with token (and id, NULL: the default
 * ID), replacing an enrollment in progress. -EEXIST (with a reason in
 * error) if the device has a valid certificate and force is false;
 * -EINVAL for a token or ID that cannot be right. Returns the
 * enrollment's generation (> 0), which enroll_status() reports with its
 * outcome. */
int enroll_request(Enroll *e, const char *token, const char *id, bool force, char *error, size_t error_size);

/* The Conn connected or lost its connection: a renewal that was due or
 * waiting for a connection goes now. */
void enroll_connection_changed(Enroll *e, bool connected);
/* A new configuration (SIGHUP); the renewal timer is armed again, unless
 * a renewal is under way (it keeps its retry and backoff); Renew=no stops
 * renewing. While not enrolled, the TokenFile= watch moves with the
 * setting (and a token already in a new TokenFile= is used). */
void enroll_reconfigure(Enroll *e, const Config *cfg);

/* The "certificate" and "enrollment" objects of tetherctl status (see
 * docs/cli.md): a new reference, or NULL on out of memory. */
json_t *enroll_status(Enroll *e);
