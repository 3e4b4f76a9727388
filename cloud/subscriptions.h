/* SPDX-License-Identifier: Apache-2.0 */
/* An index of event subscriptions by prefix, for the cloud's router: the
 * subscriptions of devices (cloud/events.c) and of event streams
 * (cloud/api.c). Routing an event costs the subscriptions that match it:
 * the exact prefixes are kept in a hash table and the event's name is
 * probed at each of its lengths (0..strlen(name)), so the work per event is
 * O(strlen(name)) probes plus the matches, whatever the number of
 * subscriptions. Each subscription has a scope: "" for every event, or a
 * publisher's id, for subscriptions that only want that publisher's events
 * (device-filtered event streams); a match looks in the scopes it is asked
 * for. Subscriptions belong to an owner (a device, a stream): the index
 * counts them per owner and removes an owner's in time proportional to
 * their number.
 *
 * Matching is proto_prefix_match(): a subscription's prefix is a byte
 * prefix of the event's name. Whether the publisher sees its own event is
 * the caller's business (its visit function).
 *
 * Safe against changes from inside a visit: a subscription removed during
 * sub_index_match() is not visited afterwards and freed when the match
 * returns; one added during it is not visited by that match. No logging,
 * no I/O; errors are negative errno values. Not thread-safe. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct SubIndex SubIndex;
typedef struct Sub Sub;

/* A new, empty index; NULL on OOM. free_userdata (may be NULL) is called
 * on a subscription's userdata when the index frees the subscription:
 * at once when it is removed, or after the match during which it was
 * removed (so a visit's userdata stays valid until the visit returns). */
SubIndex *sub_index_new(void (*free_userdata)(void *));
/* Frees every subscription (and, with free_userdata, their userdata); NULL
 * is fine. Returns NULL. Not from inside a visit. */
SubIndex *sub_index_free(SubIndex *x);

/* Add a subscription to prefix (copied) in scope (copied; NULL or "" for
 * all publishers) for owner (compared as a pointer, never dereferenced);
 * userdata is given back to visits. *ret_sub (may be NULL) identifies it
 * until it is removed. -ENOMEM. */
int sub_index_add(SubIndex *x, const void *owner, const char *scope, const char *prefix, void *userdata,
                  Sub **ret_sub);
/* Remove one subscription (NULL is fine); its userdata is freed with it
 * (see sub_index_new()). */
void sub_index_remove(SubIndex *x, Sub *s);
/* Remove every subscription of owner; returns how many. */
size_t sub_index_remove_owner(SubIndex *x, const void *owner);
/* How many subscriptions owner holds: O(1). */
size_t sub_index_count(const SubIndex *x, const void *owner);
/* All subscriptions. */
size_t sub_index_size(const SubIndex *x);

/* An owner's subscriptions, newest first: the first, then the next
 * (NULL at the end). Not across removals. */
Sub *sub_index_owner_first(const SubIndex *x, const void *owner);
Sub *sub_owner_next(const Sub *s);

const char *sub_prefix(const Sub *s);
void *sub_userdata(const Sub *s);
void sub_set_userdata(Sub *s, void *userdata);

/* Called for each match; return false to stop the match. */
typedef bool (*sub_visit_fn)(Sub *s, void *userdata, void *ctx);

/* Visit every subscription in scope "" and, when scope is not NULL, in
 * scope, whose prefix is a prefix of name. Order: unspecified. Returns
 * how many were visited. */
size_t sub_index_match(SubIndex *x, const char *scope, const char *name, sub_visit_fn fn, void *ctx);
