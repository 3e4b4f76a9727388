/* SPDX-License-Identifier: Apache-2.0 */
/* How late the agent's event loop runs: a timer due every
 * LOOP_PROBE_INTERVAL_USEC notes by how much it was late (the time the
 * loop spent on something else). Counts since it was made; nothing is
 * logged. */
#pragma once

#include <jansson.h>
#include <stdint.h>
#include <systemd/sd-event.h>

#define LOOP_PROBE_INTERVAL_USEC 1000000ULL

typedef struct LoopProbe LoopProbe;

/* A running probe on event (borrowed for its life). -ENOMEM or sd-event's
 * error. */
int loop_probe_new(sd_event *event, LoopProbe **ret);
LoopProbe *loop_probe_free(LoopProbe *p);
static inline void loop_probe_freep(LoopProbe **p) { loop_probe_free(*p); }

/* {"samples": N, "last_sec": s, "max_sec": s, "mean_sec": s}, a new
 * reference; NULL on out of memory. p may be NULL (all zero). */
json_t *loop_probe_to_json(const LoopProbe *p);
