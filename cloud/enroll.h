/* SPDX-License-Identifier: Apache-2.0 */
/* Enrollment and renewal on the device port (enroll.c, prefix enroll_;
 * docs/protocol.md, "Enrollment"; docs/enrollment.md): `POST /enroll`
 * {token, csr} from an anonymous session and `POST /cert` {csr} from a
 * device's own session, answered 2.01 with the certificate or with the
 * errors of the protocol (4.00 malformed, 4.01 token refused, 4.03
 * revoked or another key, 4.29 and 5.03 with Max-Age, 5.00 signer
 * failed).
 *
 * Guarantees: a provisioning token's use is consumed (committed) only
 * when a certificate is issued, after it is signed; a device whose
 * registry entry holds another public key, or that is revoked, gets none;
 * the same request again (same ID and public key) while an external
 * signature is pending or a renewal is queued, or after it was issued,
 * gets the same answer and
 * consumes nothing (results kept ENROLL_RESULT_SEC, at most
 * ENROLL_RESULTS_MAX of them). Requests are limited per address
 * (ENROLL_RATE per second, ENROLL_BURST) and refused tokens tighter
 * (ENROLL_REFUSED_RATE, ENROLL_REFUSED_BURST), renewals per device.
 *
 * The Enroll owns the Signer and the pending results; it calls the
 * Registry, the Provision and the Store (audit: device.enroll,
 * device.renew) directly, which it borrows, and reaches the devices only
 * through EnrollHooks. Runs on the loop's thread. Errors are negative
 * errno values; ret_* parameters are untouched on failure. */
#pragma once

#include <coap3/coap.h>
#include <stdint.h>
#include <systemd/sd-event.h>

#include "cloud-config.h"
#include "provision.h"
#include "registry.h"
#include "store.h"

#define ENROLL_RATE 20
#define ENROLL_BURST 2000
#define ENROLL_REFUSED_RATE 1
#define ENROLL_REFUSED_BURST 20
#define ENROLL_RENEW_RATE 1
#define ENROLL_RENEW_BURST 10
#define ENROLL_RATE_KEYS 65536
#define ENROLL_RESULT_SEC 600
#define ENROLL_RESULTS_MAX 4096
#define ENROLL_PENDING_RETRY_SEC 2 /* Max-Age of 5.03 while a signature is being made */
/* The built-in signer signs a renewal at once, up to this many signatures
 * in one turn of the loop; beyond, renewals are queued (5.03, Max-Age
 * ENROLL_QUEUED_RETRY_SEC) and signed from the loop, ENROLL_QUEUE_USEC of
 * them per turn, so that a fleet renewing at once does not hold the loop
 * (calls, events) until the last one is signed. */
#define ENROLL_INLINE_PER_TURN 2
#define ENROLL_QUEUED_RETRY_SEC 1
#define ENROLL_QUEUE_USEC 2000

typedef struct Enroll Enroll;

typedef struct EnrollHooks {
        void *userdata;
        /* id's certificate was renewed: valid until not_after (Unix
         * seconds), the deadline of its current session from now on. */
        void (*renewed)(void *userdata, const char *id, int64_t not_after);
} EnrollHooks;

/* Make the Signer of config's [Enroll] (which must be enabled) and the
 * rate limits. event, config, store, registry and provision are borrowed
 * and must outlive the Enroll; hooks is copied. Logs what failed. */
int enroll_new(sd_event *event, const CloudConfig *config, Store *store, Registry *registry, Provision *provision,
               const EnrollHooks *hooks, Enroll **ret);
/* Kills running signing commands; their results are lost (the devices
 * ask again). NULL is fine. */
Enroll *enroll_free(Enroll *e);
static inline void enroll_freep(Enroll **e) { enroll_free(*e); }

/* POST /enroll from an anonymous session whose peer is address (its IP
 * text): fill response. */
void enroll_request(Enroll *e, const char *address, const coap_pdu_t *request, coap_pdu_t *response);
/* POST /cert from device id's session, whose certificate's public key is
 * pubkey (tls_pubkey_sha256()), from address: fill response. */
void enroll_cert_request(Enroll *e, const char *id, const char *pubkey, const char *address,
                         const coap_pdu_t *request, coap_pdu_t *response);
