/* SPDX-License-Identifier: Apache-2.0 */
/* The webhooks made through the API (webhooks.c, prefix webhooks_): rows
 * of the Store's table webhooks (replicated in cluster mode, replica.c),
 * one per POST /v1/webhooks (docs/integrations.md, "API and CLI"). The
 * table is the truth across restarts and nodes; the running webhooks are
 * the Integrations' (integrations.h), which the Cloud fills from here at
 * start (webhooks_foreach()) and keeps in step with the rows other nodes
 * change (webhooks_get()).
 *
 * A row holds the webhook's secret as it was given (its HMAC key must be
 * at hand to sign), like cloud.db holds the rest of the cloud's state; it
 * is never logged here. Creations and deletions are committed before the
 * functions return (store_commit()), so an answer the client got is on
 * disk. No state of its own: functions over the Store, on the loop's
 * thread only. Nothing is logged but what the Store logs (its SQL
 * errors). Errors are negative errno values; ret_* parameters are
 * untouched on failure. */
#pragma once

#include <jansson.h>

#include "integrations.h"
#include "store.h"

/* Create or upgrade the table (store_migrate()): before replica_new(). */
int webhooks_open(Store *store);

/* Store c (a webhook's configuration, checked by the caller with
 * integration_config_check(); borrowed) as made by actor ("token:ID"),
 * committed: 0; -EEXIST for a name the table holds; the Store's error
 * (the row is then not there). */
int webhooks_create(Store *store, const IntegrationConfig *c, const char *actor);
/* Delete the row named name, committed: 0; -ENOENT; the Store's error. */
int webhooks_delete(Store *store, const char *name);
/* The row named name as a new configuration (kind INTEGRATION_WEBHOOK,
 * from_api true; the caller's, integration_config_free()): 0; -ENOENT;
 * -ENOMEM; the Store's error. */
int webhooks_get(Store *store, const char *name, IntegrationConfig **ret);
/* Call f for each row, in name order, with a new configuration as
 * webhooks_get() makes it (f takes it, also when it fails). Stops at the
 * first negative value f returns and returns it; otherwise 0 or the
 * Store's error (-ENOMEM when a row cannot be copied). */
int webhooks_foreach(Store *store, int (*f)(void *userdata, IntegrationConfig *c), void *userdata);
/* Add "created_at" (RFC 3339) and "created_by" of its row to each object
 * of array (integrations_json()) whose "source" is "api": 0, -ENOMEM, the
 * Store's error. */
int webhooks_annotate(Store *store, json_t *array);
