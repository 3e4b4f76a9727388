#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Edge -> `tether subscribe` latency, and the agent's memory with the
gpio, sensors and system plugins loaded. Prints figures; passes or fails
nothing.

A real tether-cloudd and tetherd on loopback (tests/integration/harness.py),
the gpio plugin on the simulated chip (tests/gpiosim), one input line with
Edge=both and no debounce. Each round pulls the line to the other level and
waits for the gpio/NAME event to come out of `tether subscribe --json`
(cloud HTTP API, server-sent events). Latency = the monotonic time the
subscriber's line was read here minus the edge's kernel-style CLOCK_MONOTONIC
timestamp carried in the event (monotonic_ns), so it spans: the edge queued
on the request fd -> plugin -> agent outbox -> CoAP/TLS -> cloud -> SSE ->
tether -> its stdout pipe -> this script.

    tests/bench/bench-edge.py [--count 1000] [--warmup 100] [--reps 3]

Run from the source tree after building (top_builddir defaults to build/).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "integration"))
import sysfs_tree  # noqa: E402
from harness import TETHER, World  # noqa: E402

LINES = """[Line in]
Chip=tether-sim
Offset=3
Direction=input
Bias=pull-down
Edge=both

[Line debounced]
Chip=tether-sim
Offset=4
Direction=input
Bias=pull-down
Edge=both
Debounce=20
"""


class Stream:
    """`tether subscribe --json PREFIX`, each line stamped on arrival."""

    def __init__(self, w, prefix):
        env = dict(os.environ, TETHER_API=w.api, TETHER_TOKEN=w.token)
        self.proc = subprocess.Popen([TETHER, "subscribe", "--json", prefix], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, bufsize=0)
        self.cond = threading.Condition()
        self.events = []
        self.ready = False
        threading.Thread(target=self._out, daemon=True).start()
        threading.Thread(target=self._err, daemon=True).start()

    def _out(self):
        for raw in self.proc.stdout:
            t = time.monotonic_ns()
            with self.cond:
                self.events.append((t, json.loads(raw)))
                self.cond.notify_all()

    def _err(self):
        for raw in self.proc.stderr:
            if b"ubscribed" in raw:
                with self.cond:
                    self.ready = True
                    self.cond.notify_all()

    def wait(self, pred, timeout=10):
        deadline = time.monotonic() + timeout
        with self.cond:
            while not pred():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("no event in time")
                self.cond.wait(left)

    def close(self):
        self.proc.terminate()
        self.proc.wait(5)


def memory(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[k] = int(v.split()[0])
    return out


def pct(values, p):
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def fmt_us(ns):
    return f"{ns / 1000:.0f} µs"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    w = World()
    try:
        lines = w.path("gpio-lines.conf")
        with open(lines, "w") as f:
            f.write(LINES)
        sysfs_tree.build(w.path("sys"))
        sim, env = w.gpiosim()
        w.start_cloud()
        stream = Stream(w, "gpio/")
        stream.wait(lambda: stream.ready)
        a = w.start_agent(plugin_dir=w.plugin_dir("gpio", "sensors", "system"), env=env,
                          extra=f"[Plugin gpio]\nLinesFile={lines}\n[Plugin sensors]\nSysfsRoot={w.path('sys')}\n")
        levels = {3: 0, 4: 0}

        def round_trip(offset, name):
            n = len(stream.events)
            levels[offset] ^= 1
            sim.set("tether-sim", offset, levels[offset])
            stream.wait(lambda: len(stream.events) > n)
            t, ev = stream.events[n]
            d = json.loads(ev["data"])
            if ev["name"] != "gpio/" + name or d["value"] != levels[offset]:
                raise RuntimeError(f"event {ev} for {name} at level {levels[offset]}")
            return t - d["monotonic_ns"]

        def table(title, reps):
            print(title)
            print(f"{'':12} {'median':>10} {'p99':>10} {'min':>10} {'max':>10}")
            for i, r in enumerate(reps, 1):
                print(f"rep {i:<8} {fmt_us(statistics.median(r)):>10} {fmt_us(pct(r, 99)):>10} "
                      f"{fmt_us(min(r)):>10} {fmt_us(max(r)):>10}")
            allv = [x for r in reps for x in r]
            print(f"{'all':12} {fmt_us(statistics.median(allv)):>10} {fmt_us(pct(allv, 99)):>10} "
                  f"{fmt_us(min(allv)):>10} {fmt_us(max(allv)):>10}")
            print()

        for _ in range(args.warmup):
            round_trip(3, "in")
        mem = memory(a.proc.pid)
        # Interleaved repetitions: plain edges, then a tenth as many
        # debounced ones (each takes the 20 ms quiet period).
        plain, debounced = [], []
        for _ in range(args.reps):
            plain.append([round_trip(3, "in") for _ in range(args.count)])
            debounced.append([round_trip(4, "debounced") for _ in range(max(10, args.count // 10))])
        mem_after = memory(a.proc.pid)
        stream.close()
        a.stop()

        # The same plugins on the real libgpiod (no chip: the lines stay
        # unavailable, the plugin is loaded all the same).
        b = w.start_agent(name="agent-libgpiod", plugin_dir=w.plugin_dir("gpio", "sensors", "system"),
                          extra=f"[Plugin gpio]\nLinesFile={lines}\n[Plugin sensors]\nSysfsRoot={w.path('sys')}\n")
        b.wait_line(r"plugin sensors: first sample")
        mem_real = memory(b.proc.pid)

        table(f"edge -> tether subscribe, no debounce: {args.count} edges x {args.reps} repetitions "
              f"after {args.warmup} warm-up", plain)
        table(f"edge -> tether subscribe, Debounce=20 (ms): {len(debounced[0])} edges x {args.reps} repetitions",
              debounced)
        print(f"tetherd with the gpio, sensors ({len(sysfs_tree.SENSORS)} sensors) and system plugins, kB")
        print(f"  {'':8} {'sim, warm':>10} {'sim, end':>10} {'libgpiod':>10}")
        for k in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            print(f"  {k:8} {mem.get(k, 0):>10} {mem_after.get(k, 0):>10} {mem_real.get(k, 0):>10}")
        print("  (sim: the simulated chip preloaded, with its control threads; libgpiod: the real library)")
    finally:
        w.close()


if __name__ == "__main__":
    main()
