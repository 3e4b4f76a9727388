/* SPDX-License-Identifier: Apache-2.0 */
/* Device inventory rules (inventory.c, prefix inventory_; docs/fleet.md,
 * "Inventory" and "Tags"): what PUT /v1/devices/ID may change (a name,
 * notes, tags as a JSON merge patch) and the filters of GET /v1/devices.
 * Pure functions of JSON values and text: no logging, no state, no
 * database, so they are unit tested (tests/unit/test-cloud-inventory.c)
 * and fuzzed with the API's request parsing. Errors are -EINVAL with a
 * message for the API client (printable ASCII and the client's own text
 * only where it passed the name rules) or -ENOMEM; ret_* parameters are
 * untouched on failure. */
#pragma once

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "proto.h"

#define INVENTORY_NAME_MAX 64       /* [A-Za-z0-9_.-]{1,64} */
#define INVENTORY_NOTES_MAX 4096    /* bytes of UTF-8, no NUL */
#define INVENTORY_TAGS_MAX 32       /* tags of one device */
#define INVENTORY_TAG_NAME_MAX 64   /* [A-Za-z0-9_.-]{1,64} */
#define INVENTORY_TAG_VALUE_MAX 256 /* UTF-8 text without control characters */
#define INVENTORY_ERROR_MAX 256

/* Whether s is a device name ([A-Za-z0-9_.-]{1,64}); tag names follow the
 * same rule. */
bool inventory_name_valid(const char *s, size_t len);
/* Whether s (len bytes) is UTF-8 text without NUL and control characters
 * (C0, DEL, C1), at most max bytes. */
bool inventory_text_clean(const char *s, size_t len, size_t max);

/* What a PUT /v1/devices/ID asks to change. Strings point into the params
 * given to inventory_parse_update() and live as long as they do. */
typedef struct InventoryUpdate {
        bool has_name, has_notes;
        const char *name;  /* NULL: clear it */
        const char *notes; /* NULL: clear them */
        json_t *tags;      /* the merge patch (borrowed), NULL: none */
} InventoryUpdate;

/* The fields of params (an object from a JSON or form body): "name" and
 * "notes" (a string, "" or null clear), "tags" (an object of names to a
 * string or null; in a form, its JSON text). Other keys are left alone
 * (the caller's: "manifest", Particle's fields). 0 and *ret (with
 * nothing set when params hold none of them), or -EINVAL and err. */
int inventory_parse_update(json_t *params, InventoryUpdate *ret, char err[static INVENTORY_ERROR_MAX]);
/* Whether u changes anything at all. */
bool inventory_update_empty(const InventoryUpdate *u);
/* RFC 7396 on tags: tags (borrowed; NULL: none) with patch applied (a
 * string sets, null removes), as a new object in *ret. -EINVAL with err
 * when the result would hold more than INVENTORY_TAGS_MAX tags. */
int inventory_tags_merge(json_t *tags, json_t *patch, json_t **ret, char err[static INVENTORY_ERROR_MAX]);

/* The filters of GET /v1/devices; all given must hold. */
#define INVENTORY_FILTER_TAGS_MAX 16
#define INVENTORY_FILTER_PACKAGES_MAX 16
#define INVENTORY_PACKAGE_NAME_MAX PROTO_PACKAGE_NAME_MAX
typedef struct InventoryFilterPair {
        char name[INVENTORY_PACKAGE_NAME_MAX + 1];
        char value[INVENTORY_TAG_VALUE_MAX + 1];
        bool has_value;
} InventoryFilterPair;
typedef struct InventoryFilter InventoryFilter;
struct InventoryFilter {
        bool any; /* some filter is given */
        InventoryFilterPair tags[INVENTORY_FILTER_TAGS_MAX];
        size_t n_tags;
        InventoryFilterPair packages[INVENTORY_FILTER_PACKAGES_MAX];
        size_t n_packages;
        int connected; /* -1: either, 0, 1 */
        int64_t heard_within, not_heard_within; /* seconds, -1: not given */
        char name[INVENTORY_NAME_MAX + 1];
};

void inventory_filter_init(InventoryFilter *f);
/* One query parameter key=value (value NULL: given without one). Keys
 * that are no filter (page, per_page, access_token, ...) return 0 and
 * change nothing; a malformed filter -EINVAL and err naming it. */
int inventory_filter_add(InventoryFilter *f, const char *key, const char *value, char err[static INVENTORY_ERROR_MAX]);
/* Whether the device object dev (as GET /v1/devices lists it, with
 * "tags", "name", "connected", "system") passes f. last_heard_usec and
 * now_usec: CLOCK_REALTIME µs (0: never heard); a connected device counts
 * as heard now. */
bool inventory_filter_match(const InventoryFilter *f, json_t *dev, uint64_t last_heard_usec, uint64_t now_usec);
