/* SPDX-License-Identifier: Apache-2.0 */
/* The persistent device registry (registry.c, prefix registry_): every
 * device the cloud knows, in the Store's table "devices" (its own schema
 * steps, store_migrate()): when it was registered and by whom, its first
 * and last connection, its last address and when it was last heard, the
 * serial, SHA-256 fingerprint and expiry of the certificate it last
 * connected with, its last describe document, and its status (active, or
 * revoked with reason, time and actor).
 *
 * The registry decides who may connect (registry_check(), run inside the
 * TLS handshake through the Devices' peer check): a revoked device never,
 * an unknown one only under [Cloud] Registration=open, where a device
 * registers itself on its first connection. Connections and disconnections
 * are written in the Store's batch (store_batch(): a storm of connects is
 * one commit per STORE_BATCH_MSEC, not one per device); registration,
 * revocation and unrevocation are committed before the call returns (with
 * whatever else the batch holds, such as the caller's audit record), and
 * then reported through RegistryHooks (the Cloud closes the session,
 * publishes the event). The registry knows no
 * other module but the Store; it never logs per connection. Errors are
 * negative errno values (-EIO for the database, logged by the Store);
 * ret_* parameters are untouched on failure. */
#pragma once

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

#include "inventory.h"
#include "store.h"
#include "tls.h"

typedef struct Registry Registry;

typedef enum RegistryPolicy {
        REGISTRY_OPEN,     /* any certificate from the CA registers itself */
        REGISTRY_ENROLLED, /* only devices registered beforehand */
} RegistryPolicy;

typedef struct RegistryHooks {
        void *userdata;
        /* id was revoked (its session must close) or unrevoked; actor as
         * given to registry_revoke()/registry_unrevoke(). reason may be NULL. */
        void (*revoked)(void *userdata, const char *id, const char *reason, const char *actor);
        void (*unrevoked)(void *userdata, const char *id, const char *actor);
        /* id is new in the registry (registry_register(), or revoked
         * before it was ever seen). */
        void (*added)(void *userdata, const char *id);
        /* id's name, notes or tags changed (registry_update()), committed:
         * changed holds each changed field's new value (borrowed). */
        void (*updated)(void *userdata, const char *id, json_t *changed, const char *actor);
} RegistryHooks;

/* Create or upgrade the tables in store (borrowed; must outlive the
 * Registry); hooks is copied (every hook is required). Logs what failed. */
int registry_new(Store *store, RegistryPolicy policy, const RegistryHooks *hooks, Registry **ret);
Registry *registry_free(Registry *reg);
static inline void registry_freep(Registry **reg) { registry_free(*reg); }

/* Whether the device of peer (its id passed the identity checks) may
 * connect: 0, or -EPERM with the reason written to reason (revoked; or
 * unknown under Registration=enrolled), -EIO if the database cannot tell
 * (refused too). The TlsPeerCheck's shape, so it can be one. */
int registry_check(Registry *reg, const TlsPeer *peer, char *reason, size_t reason_size);

/* registry_check() for another thread (the TLS handshake threads): its
 * own read-only connection to the database, used by one thread at a time.
 * It sees what is committed: revocations, registrations and
 * unrevocations at once (they commit before their call returns), a
 * connection's newer certificate once the batch commits (within
 * STORE_BATCH_MSEC), so the loop's thread asks registry_check() again
 * before it binds a device. -EOPNOTSUPP for a database in memory. */
typedef struct RegistryReader RegistryReader;
int registry_reader_new(Registry *reg, RegistryReader **ret);
RegistryReader *registry_reader_free(RegistryReader *rd);
int registry_reader_check(RegistryReader *rd, const TlsPeer *peer, char *reason, size_t reason_size);

/* The device connected (its session is bound) from address (the peer's IP
 * text): record the time, address and certificate, registering it if it
 * is new. Joins the Store's batch. */
int registry_connected(Registry *reg, const TlsPeer *peer, const char *address);
/* The device answered a describe document (JSON text) different from
 * the one recorded: keep it (shown for the device while it is offline,
 * also after a restart). Joins the batch. A document longer than
 * REGISTRY_DESCRIBE_MAX bytes is not kept: the one recorded is cleared
 * and -E2BIG returned. */
#define REGISTRY_DESCRIBE_MAX (64 * 1024)
int registry_described(Registry *reg, const char *id, const char *describe);
/* The device's session ended; it was last heard at last_heard_usec
 * (CLOCK_REALTIME µs). Joins the batch. */
int registry_disconnected(Registry *reg, const char *id, uint64_t last_heard_usec);

/* Register id (what Registration=enrolled admits), by actor (e.g.
 * "token:ID", kept as registered_by): committed. *ret_created (may be
 * NULL) tells whether it was new to the registry or not registered yet.
 * -EINVAL for an invalid id. Auditing is the caller's (the Api's). */
int registry_register(Registry *reg, const char *id, const char *actor, bool *ret_created);
/* Revoke id (known or not: an unknown id is added, revoked, but not
 * registered) with an optional reason: committed, then the hook revoked
 * runs. Revoking a revoked device keeps its first revocation
 * (*ret_changed false, no hook). */
int registry_revoke(Registry *reg, const char *id, const char *reason, const char *actor, bool *ret_changed);
/* Lift a revocation and forget the key recorded for id (so that a
 * reflashed device may enroll again under its ID): -ENOENT for an id the
 * registry does not know; a device that is not revoked is left as it is
 * (*ret_changed false). */
int registry_unrevoke(Registry *reg, const char *id, const char *actor, bool *ret_changed);

/* What enrollment needs to know of id (registry_identity()). */
typedef struct RegistryIdentity {
        bool known, registered, revoked;
        /* A certificate is recorded for it (issued, or connected with)
         * whose key is pubkey (tls_pubkey_sha256(); "" when the key of a
         * certificate seen before keys were recorded is unknown). False
         * after registry_unrevoke(). */
        bool has_key;
        char pubkey[65];
        char registered_by[128];
        char revoked_reason[192];
} RegistryIdentity;
/* 0 and *ret (all false for an unknown id), or -EIO. */
int registry_identity(Registry *reg, const char *id, RegistryIdentity *ret);

/* A certificate the cloud issued. */
typedef struct RegistryCert {
        const char *serial, *fingerprint, *pubkey;
        const char *issuer; /* RFC 2253, as TlsPeer.issuer; NULL: unknown */
        int64_t not_before, not_after; /* Unix seconds */
        const char *how;               /* "enroll", "renew" */
} RegistryCert;
/* Record cert as id's, issued now: committed for an enrollment, in the
 * Store's batch for a renewal. enroll: the device is
 * registered (if it was not, by actor, e.g. "provision:ID"), with tags (a
 * JSON object, borrowed; NULL or empty keeps those it has) replacing its tags, and the hook
 * added runs if it was new; else a renewal (-ENOENT for an unknown id). */
int registry_issued(Registry *reg, const char *id, const RegistryCert *cert, bool enroll, const char *actor,
                    json_t *tags);
/* When a certificate valid from not_before to not_after should be
 * renewed: after 2/3 of its lifetime. */
int64_t registry_renew_after(int64_t not_before, int64_t not_after);
/* "valid", "renew-due" (past registry_renew_after(); never when
 * not_before is 0, unknown) or "expired" at now. */
const char *registry_cert_state(int64_t not_before, int64_t not_after, int64_t now);

/* Add the registry's fields for id to the device object j: "status"
 * ("revoked" or "normal"), "revoked", "name" and "notes" (null when none)
 * and "tags" ({} when none) always, and "certificate"
 * {not_after, state} when one is known; with details also "updated_at"
 * (the last registry_update() that changed something, or null),
 * "registered_at", "registered_by", "first_connected", "last_connected",
 * "certificate" {serial, fingerprint, issuer, not_before, not_after,
 * renew_after, issued_at, issued_by, state} and the revocation's "revoked_at",
 * "revoked_by", "revoked_reason". A device the registry does not know
 * gets status "normal". 0, -ENOMEM or -EIO. */
int registry_device_json(Registry *reg, const char *id, json_t *j, bool details);

/* Change the name, notes or tags (a merge patch) of id, a device the
 * registry knows (-ENOENT otherwise), by actor: committed, then the hook
 * updated runs, only when something changed. A name is unique among
 * devices and is no other device's id: -EEXIST with "name 'X' is taken
 * by device ID" in err; tags that would be too many: -EINVAL with err.
 * *ret_state: a new object {"name","notes","tags","changed","updated_at"}
 * (null for no name or notes; changed: the fields that changed, with
 * their new values; updated_at: now when something changed, else the
 * last change, null if none). -ENOMEM, -EIO. */
int registry_update(Registry *reg, const char *id, const InventoryUpdate *u, const char *actor, json_t **ret_state,
                    char err[static INVENTORY_ERROR_MAX]);

/* The describe document recorded for id (registry_described()): 0 and
 * *ret, a new string or NULL when none (or id is unknown); -ENOMEM, -EIO. */
int registry_describe_doc(Registry *reg, const char *id, char **ret);

/* The tags of id (one lookup by its key): 0 and *ret, a new JSON object
 * of names to strings, or NULL for a device without tags or unknown to
 * the registry; -EIO. */
int registry_tags(Registry *reg, const char *id, json_t **ret);

/* Every device whose tags hold any of match, a JSON array of [name,
 * value] pairs (value null: any value of that name), in the order they
 * were added: one query, whatever the number of devices. The id is valid
 * during the call only; fn must not use the registry. 0 or -EIO. */
typedef void (*registry_id_fn)(void *userdata, const char *id);
int registry_foreach_tagged(Registry *reg, const char *match, registry_id_fn fn, void *userdata);

/* Every device in the registry, in the order they were added: id, when
 * it was last heard (CLOCK_REALTIME µs, 0 if never), its last address
 * (NULL if none) and its last describe document (JSON text as given to
 * registry_described(), NULL if none; read back from the database, so
 * check it before use); the strings are valid during the call only. */
typedef void (*registry_foreach_fn)(void *userdata, const char *id, uint64_t last_heard_usec,
                                    const char *last_address, const char *describe);
int registry_foreach(Registry *reg, registry_foreach_fn fn, void *userdata);
