/* SPDX-License-Identifier: Apache-2.0 */
/* API tokens (tokens.c, prefix tokens_; docs/cloud.md, "Tokens and
 * scopes"): who an HTTP API request is, and what it may do.
 *
 * Two kinds of token answer tokens_check():
 *   - the lines of [API] TokenFile= (admin tokens) and MetricsTokenFile=
 *     (metrics:read only), read by config.c and reloaded on SIGHUP; their
 *     id is "file-" or "metrics-" and the first 8 hex digits of the
 *     token's SHA-256, never the token;
 *   - tokens made through the API (POST /v1/tokens): kept in the cloud's
 *     database (store.h, table "tokens") with an id, a name, scopes, an
 *     optional expiry, an optional restriction to device IDs and/or tags,
 *     created, last-used and revoked times. The database holds the
 *     SHA-256 of the token, never the token: it is shown once, by
 *     tokens_create().
 *
 * A restricted token reaches a device it lists, or one whose tags (the
 * device registry's, set at enrollment) match any of its tag
 * restrictions: "NAME" (the device has the tag NAME, whatever its value)
 * or "NAME=VALUE" (the device's tag NAME is exactly VALUE; VALUE is what
 * follows the first '=' and may be empty). Tokens learns a device's tags
 * through TokensHooks, at the time of asking: a device whose tags change
 * is judged by its new ones from the next question on.
 *
 * A Tokens object owns an in-memory copy of every database token
 * (revoked ones too, so a refusal can say "revoked"), sorted by digest
 * for the lookup of each request; a Token record stays at the same
 * address until tokens_free(), so a TokenAuth may point at it for as long
 * as the Tokens lives. Changes are committed (store_commit()) before the
 * call returns; last-used times are written in the Store's batch, at most
 * once a minute per token. Used from the loop's thread only; no logging
 * but database failures (store.h) and what tokens_open() loads. */
#pragma once

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

#include "cloud-config.h"
#include "scopes.h"
#include "store.h"

#define TOKENS_ID_MAX 24          /* "metrics-0123abcd", 16 hex digits */
#define TOKENS_NAME_MAX 128
#define TOKENS_RESTRICT_MAX 64    /* device IDs, tags */
/* A tag restriction: NAME=VALUE, both within a provisioning token's
 * limits (provision.h), checked by the caller of tokens_create(). */
#define TOKENS_TAG_MAX (64 + 1 + 256)
#define TOKENS_LIVE_MAX 1000      /* tokens neither revoked nor expired */
#define TOKENS_LIFETIME_MAX (10LL * 366 * 86400)
#define TOKENS_PREFIX "tether_"   /* what a made token starts with */

typedef struct Tokens Tokens;
typedef struct Token Token;

/* Who a request is: filled by tokens_check(). */
typedef struct TokenAuth {
        char id[TOKENS_ID_MAX + 1];
        unsigned scopes;
        const Token *token; /* NULL: a file token */
        uint8_t digest[CONFIG_TOKEN_DIGEST_SIZE];
} TokenAuth;

typedef struct TokensHooks {
        void *userdata;
        /* The tags of device id: 0 and *ret, a new JSON object of names to
         * strings, or NULL for none (an unknown device); a negative errno
         * if they cannot be read now (the device is then reached by its
         * ID only). Required. */
        int (*device_tags)(void *userdata, const char *id, json_t **ret);
} TokensHooks;

/* Create the tokens table if needed and load it. store and config are
 * borrowed and must outlive the Tokens (config's token files may be
 * reloaded meanwhile); hooks is copied. Logs what failed. */
int tokens_open(Store *store, const CloudConfig *config, const TokensHooks *hooks, Tokens **ret);
/* NULL is fine; returns NULL. */
Tokens *tokens_free(Tokens *t);
static inline void tokens_freep(Tokens **t) { tokens_free(*t); }

/* Who token (NUL-terminated, may be NULL) is: 0 and *ret filled; -ENOKEY
 * for no token or an unknown one, -EKEYEXPIRED past its expiry,
 * -EKEYREVOKED revoked; *ret is filled for these two as well (the id says
 * which token it was). Notes the last use of a database token. */
int tokens_check(Tokens *t, const char *token, TokenAuth *ret);
/* Whether auth is still good now (after a reload of the token files, a
 * revocation or its expiry): 0 or the errors of tokens_check(). */
int tokens_recheck(Tokens *t, const TokenAuth *auth);
/* Whether auth is restricted to some devices (or tags). */
bool tokens_restricted(const TokenAuth *auth);
/* A device as tokens_may_reach_device() asks about it: its tags are read
 * (TokensHooks.device_tags) the first time a token restricted by tags
 * needs them, and kept for the next tokens asked about the same device
 * (an event handed to many streams: one lookup). */
typedef struct TokenDevice {
        const char *id; /* NULL: no device (an event from the API) */
        json_t *tags;
        bool tags_read;
} TokenDevice;
static inline void token_device_done(TokenDevice *d) {
        json_decref(d->tags);
        d->tags = NULL;
        d->tags_read = false;
}
/* Whether auth may reach device d: unrestricted tokens reach every
 * device; restricted ones the device IDs they list and the devices whose
 * tags match one of theirs (see above); none reaches a NULL id. */
bool tokens_may_reach_device(Tokens *t, const TokenAuth *auth, TokenDevice *d);
/* The same for one question about device id. */
bool tokens_may_reach(Tokens *t, const TokenAuth *auth, const char *id);
/* The device IDs a restricted token lists, for the device list. */
size_t tokens_devices(const TokenAuth *auth, const char *const **ret);
/* The tags a restricted token matches, for the device list: a JSON array
 * of [name, value or null] pairs (registry_foreach_tagged()'s), or NULL
 * when it has no tags; valid as long as the Tokens. */
const char *tokens_tag_match(const TokenAuth *auth);

typedef struct TokenSpec {
        const char *name;   /* "" allowed */
        unsigned scopes;    /* not 0 */
        int64_t expires_at; /* Unix seconds; 0: never */
        const char *const *devices;
        size_t n_devices;
        const char *const *tags;
        size_t n_tags;
        const char *created_by; /* the actor, "token:ID" */
} TokenSpec;

/* Make a token: *ret_secret is the token (the caller's, shown once, to be
 * freed with erase_and_free semantics: OPENSSL_clear_free()), *ret_json
 * its description (tokens_to_json() shape). -EUSERS past TOKENS_LIVE_MAX
 * live tokens; spec is checked by the caller. */
int tokens_create(Tokens *t, const TokenSpec *spec, char **ret_secret, json_t **ret_json);
/* Revoke by id: 0; -ENOENT unknown; -EALREADY already revoked. */
int tokens_revoke(Tokens *t, const char *id);
/* The row of token id changed under the Tokens (another node of the
 * cluster changed it, replica.h): take its revocation, expiry and last
 * use, or load it if it is new here; a row that is gone counts as
 * revoked. A TokenAuth of it sees the change at once (tokens_recheck()).
 * 0, -ENOMEM or -EIO. */
int tokens_refresh(Tokens *t, const char *id);
/* Every database token, oldest first, without secrets or digests: a new
 * JSON array of {"id","name","scopes","devices","tags","created_at",
 * "expires_at","last_used_at","revoked_at","created_by","state"}. */
json_t *tokens_to_json(Tokens *t);
/* What auth may do, for GET /v1/access_tokens/current: a new JSON object
 * {"id","name","scopes","expires_at","devices","tags"} ("devices" and
 * "tags" null when it is not restricted by them; a token file's token has
 * the name of its setting and no expiry). Never the secret. NULL on OOM. */
json_t *tokens_auth_to_json(const TokenAuth *auth);
