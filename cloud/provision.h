/* SPDX-License-Identifier: Apache-2.0 */
/* Provisioning tokens (provision.c, prefix provision_; docs/enrollment.md):
 * what lets a device without a certificate enroll. A token is
 * "tprov_" + 40 lowercase hex digits (160 random bits), shown once when it
 * is made; the cloud's database (store.h, table "provision_tokens", its
 * own store_migrate() component) keeps its SHA-256, an id ("prov-" + the
 * first 8 hex digits of that digest), a name, how many enrollments it
 * allows (uses_max) and has made (uses), an expiry, the tags every device
 * enrolled with it gets, who made it and when, and its revocation.
 *
 * A use is consumed by provision_consume() and committed (store_commit())
 * before it returns: under any concurrency exactly uses_max enrollments
 * succeed (the Provision is used from the loop's thread only, so checks
 * and updates do not interleave, and the UPDATE that takes a use states
 * the conditions again). Nothing is cached: every call reads the table,
 * so what it says is what is committed. Errors are negative errno values
 * (-EIO, -ENOMEM, -EBUSY: the database's, see store_error()); ret_*
 * parameters are untouched on failure unless said otherwise. No logging
 * but the Store's. */
#pragma once

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "store.h"

#define PROVISION_PREFIX "tprov_"
#define PROVISION_ID_MAX 16         /* "prov-" + 8 hex digits */
#define PROVISION_NAME_MAX 128
#define PROVISION_USES_MAX 1000000
#define PROVISION_TAGS_MAX 32
#define PROVISION_TAG_KEY_MAX 64    /* [A-Za-z0-9_.-]{1,64} */
#define PROVISION_TAG_VALUE_MAX 256 /* UTF-8, no control characters */
#define PROVISION_LIFETIME_DEFAULT (7LL * 86400)
#define PROVISION_LIFETIME_MAX (10LL * 366 * 86400)
#define PROVISION_REASON_MAX 160
#define PROVISION_LIVE_MAX 10000    /* tokens neither revoked, used up nor expired */
#define PROVISION_DEAD_MAX 1000     /* dead (revoked, used-up, expired) tokens kept, the newest; up to 100 more
                                     * until provision_create() deletes the oldest */

typedef struct Provision Provision;

/* Create or upgrade the table in store (borrowed; must outlive the
 * Provision) and load it. Logs what failed. */
int provision_open(Store *store, Provision **ret);
Provision *provision_free(Provision *p);
static inline void provision_freep(Provision **p) { provision_free(*p); }

typedef struct ProvisionSpec {
        const char *name;       /* "" allowed */
        uint32_t uses_max;      /* 1..PROVISION_USES_MAX */
        int64_t expires_at;     /* Unix seconds, in the future */
        json_t *tags;           /* borrowed JSON object of strings, may be NULL */
        const char *created_by; /* the actor, "token:ID" */
} ProvisionSpec;

/* Check a tags object (NULL is fine): 0, or -EINVAL with what is wrong in
 * err. */
int provision_tags_check(json_t *tags, char err[static PROVISION_REASON_MAX]);
/* Whether s (len bytes) may be a tag's value: at most
 * PROVISION_TAG_VALUE_MAX bytes of UTF-8 text without control characters
 * (C0, DEL, C1) or NUL. */
bool provision_tag_value_valid(const char *s, size_t len);

/* Make a token: committed. *ret_secret is the token (freed by the caller
 * with OPENSSL_clear_free()), *ret_json its description (the shape of
 * provision_to_json()'s elements). -EINVAL for a spec that breaks the
 * limits above (the caller checks them first, to say which), -EUSERS
 * with PROVISION_LIVE_MAX live tokens already. */
int provision_create(Provision *p, const ProvisionSpec *spec, char **ret_secret, json_t **ret_json);
/* Revoke by id, by actor: committed. -ENOENT unknown, -EALREADY revoked. */
int provision_revoke(Provision *p, const char *id, const char *actor);

/* Whether token may enroll now, without using it: 0 and ret_id (the
 * token's id) and *ret_tags (a new reference to its tags object) filled;
 * -ENOKEY unknown (or malformed), -EKEYEXPIRED, -EUSERS used up,
 * -EKEYREVOKED; reason (PROVISION_REASON_MAX bytes) then says so in words
 * a device shows its user ("provisioning token used up (5 of 5 uses)"),
 * and ret_id is filled where the token is known. ret_tags may be NULL.
 * Other errors are the database's (reason not filled): the caller answers
 * "try again later", not a refusal. */
int provision_check(Provision *p, const char *token, char ret_id[static PROVISION_ID_MAX + 1],
                    json_t **ret_tags, char reason[static PROVISION_REASON_MAX]);
/* provision_check(), then use one of its uses for device_id (who used
 * it is the caller's audit record, device.enroll): committed before it
 * returns. On an error of the database the use may or may not be on disk
 * (never handed out twice: at worst one use is lost). */
int provision_consume(Provision *p, const char *token, const char *device_id,
                      char ret_id[static PROVISION_ID_MAX + 1], json_t **ret_tags,
                      char reason[static PROVISION_REASON_MAX]);

/* One token's description, NULL if id is unknown; every token (oldest
 * first) as a new array. Elements: {"id","name","uses_max","uses",
 * "expires_at","tags","created_at","created_by","revoked_at","revoked_by",
 * "state": "active"|"expired"|"used-up"|"revoked"}; times RFC 3339 UTC or
 * null. Never the token or its digest. */
json_t *provision_get_json(Provision *p, const char *id);
json_t *provision_to_json(Provision *p);
