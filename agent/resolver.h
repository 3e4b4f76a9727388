/* SPDX-License-Identifier: Apache-2.0 */
/* An asynchronous name lookup on the agent's loop, for the Conn and the
 * enrollment (agent/conn.c, agent/enroll.c).
 *
 * glibc's getaddrinfo_a() runs the lookup in a helper thread and raises a
 * signal when it is done; the Resolver owns an sd-event source for that
 * signal (one signal per Resolver: sd-event has one source per signal) and
 * calls its callback on the loop. One lookup is current at a time: a new
 * resolver_start() or resolver_cancel() forgets the current one, and its
 * result is never reported. glibc may still be writing into a lookup it
 * could not cancel, so such a lookup is kept ("stale") until it completes
 * and freed then, or left allocated at resolver_free() (it belongs to
 * glibc's helper until it ends: leaking it at exit is safer than freeing
 * it). Owns its lookups and its signal source; no logging. */
#pragma once

#include <netdb.h>
#include <systemd/sd-event.h>

typedef struct Resolver Resolver;

/* The current lookup finished: gai_error 0 and addrs (getaddrinfo's list,
 * now the callee's: freeaddrinfo()) on success; else a getaddrinfo error
 * (gai_strerror()) and addrs NULL. The callback may start another lookup;
 * it must not free the Resolver. */
typedef void (*resolver_done_fn)(void *userdata, int gai_error, struct addrinfo *addrs);

/* signo must be blocked by the caller before (sd_event_add_signal()). */
int resolver_new(sd_event *event, int signo, resolver_done_fn done, void *userdata, Resolver **ret);
Resolver *resolver_free(Resolver *r);
static inline void resolver_freep(Resolver **r) { resolver_free(*r); }

/* Look up host (AF_UNSPEC, SOCK_STREAM; host is copied), forgetting the
 * current lookup. -ENOMEM, or -EAGAIN when glibc cannot start it. */
int resolver_start(Resolver *r, const char *host);
/* Forget the current lookup, if any: its result is not reported. r may
 * be NULL. */
void resolver_cancel(Resolver *r);
