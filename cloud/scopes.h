/* SPDX-License-Identifier: Apache-2.0 */
/* API token scopes (scopes.c, prefix scope_): what a token may do, as a
 * set of bits, and their names ("devices:read", ...) for the API, the
 * database and the CLI (docs/cloud.md, "Tokens and scopes"). Pure
 * functions: no logging, no state, so they are unit tested
 * (tests/unit/test-cloud-scopes.c).
 *
 * "admin" implies every other scope: scope_allows() says so, the sets
 * themselves keep what was granted. */
#pragma once

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef enum Scope {
        SCOPE_DEVICES_READ = 1u << 0,   /* list, describe, read variables */
        SCOPE_FUNCTIONS_CALL = 1u << 1, /* call functions */
        SCOPE_EVENTS_READ = 1u << 2,    /* event streams */
        SCOPE_EVENTS_PUBLISH = 1u << 3, /* publish events */
        SCOPE_OTA_WRITE = 1u << 4,      /* /v1/ota/..., PUT /v1/devices/ID */
        SCOPE_METRICS_READ = 1u << 5,   /* GET /metrics */
        SCOPE_ADMIN = 1u << 6,          /* everything, tokens and the audit log too */
        SCOPE_PROVISION_WRITE = 1u << 7, /* /v1/provision[/ID]: provisioning tokens, and nothing else */
        SCOPE_DEVICES_WRITE = 1u << 8,   /* PUT /v1/devices/ID: name, notes, tags */
        SCOPE_TUNNELS_OPEN = 1u << 9,    /* POST /v1/devices/ID/tunnel: TCP tunnels to devices */
        SCOPE_LOGS_READ = 1u << 10,      /* GET /v1/devices/ID/logs: devices' journals */
} Scope;

#define SCOPE_ALL 0x7ffu
#define SCOPE_NAME_MAX 16

/* The name of one scope bit; NULL for anything else. */
const char *scope_name(unsigned scope);
/* One scope by its name (exact, case-sensitive): 0 or -EINVAL. */
int scope_parse(const char *name, size_t len, unsigned *ret);
#define SCOPE_ERROR_MAX 200
/* Scopes from a JSON array of names or a string of names separated by
 * commas and/or blanks (what a form field holds). 0, or -EINVAL with a
 * message for the client in err: the wrong shape, no scope at all, or the
 * first unknown name (cut to 64 bytes, quoted). */
int scope_parse_json(json_t *v, unsigned *ret, char err[static SCOPE_ERROR_MAX]);
/* The names of the set, in bit order: a new JSON array (NULL on OOM). */
json_t *scope_to_json(unsigned scopes);
/* The names joined by single spaces into buf; returns buf. */
char *scope_to_text(unsigned scopes, char *buf, size_t size);
/* Whether a token holding have may do what needs (one or more bits; 0 is
 * allowed to every token): admin allows everything. */
bool scope_allows(unsigned have, unsigned need);
