/* SPDX-License-Identifier: Apache-2.0 */
/* What the device runs on (inventory.c, prefix inventory_; docs/fleet.md,
 * "Inventory"): the "system" object of the describe document, {"os",
 * "arch","kernel","packages":{NAME:VERSION}}. os is /etc/os-release's
 * PRETTY_NAME and kernel uname's release, read at once; arch and the
 * installed versions of tether's packages (tether-agent, tether-plugin-*)
 * and of the configured ones come from dpkg and dpkg-query, run as one
 * child process of the loop, whose output is read as it comes (at most
 * INVENTORY_OUTPUT_MAX bytes; beyond that it is killed) and parsed when
 * it exits: the loop never waits for it. A package that is not installed
 * is left out, and so is anything dpkg cannot tell (no dpkg at all: no
 * arch, no packages).
 *
 * An Inventory owns its child process and event sources; inventory_free()
 * kills a child still running. Its hook runs when the system object
 * changed. Errors are negative errno values. */
#pragma once

#include <jansson.h>
#include <systemd/sd-event.h>

#define INVENTORY_OUTPUT_MAX (64 * 1024)
#define INVENTORY_PACKAGES_MAX 64 /* [Inventory] Packages= */

typedef struct Inventory Inventory;

typedef struct InventoryHooks {
        void *userdata;
        /* The system object changed (inventory_system()): tell the cloud. */
        void (*changed)(void *userdata);
} InventoryHooks;

/* event is borrowed and must outlive the Inventory; hooks is copied.
 * dpkg_root: "/" or the root dpkg-query reads ([OTA] DpkgRoot=), copied.
 * packages: NULL-terminated package names (checked by the caller's
 * configuration parser), copied; NULL: none. SIGCHLD must be blocked
 * (child sources). */
int inventory_new(sd_event *event, const char *dpkg_root, char *const *packages, const InventoryHooks *hooks,
                  Inventory **ret);
Inventory *inventory_free(Inventory *inv);
static inline void inventory_freep(Inventory **inv) { inventory_free(*inv); }
/* A new configuration (after a reload): takes effect at the next refresh. */
int inventory_reconfigure(Inventory *inv, const char *dpkg_root, char *const *packages);
/* Read it all again: os and kernel now, the rest from a child process;
 * one already running is let finish and then run again. The hook runs
 * once the result differs from what it was. */
int inventory_refresh(Inventory *inv);
/* The system object (borrowed, valid until the next change), or NULL
 * before the first inventory_refresh(). */
json_t *inventory_system(Inventory *inv);
