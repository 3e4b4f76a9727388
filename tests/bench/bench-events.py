#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""bench-events: events per second from one device to the cloud, end to
end: the pump test plugin publishes as fast as the agent accepts, the
agent writes each event to its outbox and sends it, the cloud journals and
acknowledges it. The clock runs from the first event to the last receipt
(the agent's X_TETHER_OUTBOX=0 after the pump is done).

    top_builddir=$PWD/build top_srcdir=$PWD tests/bench/bench-events.py [--events N] [--reps R]

State directories on disk (the test's scratch directory, under $TMPDIR)
against both on tmpfs (/dev/shm), interleaved; medians and ranges."""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))
from harness import TEST_PLUGINS, World  # noqa: E402


def run_once(events, memory):
    w = World()
    shm = tempfile.mkdtemp(prefix="tether-bench-", dir="/dev/shm") if memory else None
    try:
        w.start_cloud(state_dir=os.path.join(shm, "cloud") if shm else None)
        device = w.new_device()
        a = w.start_agent(device=device, plugin_dir=TEST_PLUGINS,
                          state_dir=os.path.join(shm, "agent") if shm else None,
                          extra="[Plugins]\nEnable=pump\n[Outbox]\nMaxEvents=100000\nMaxBytes=67108864\n")
        t0 = time.monotonic()
        w.tether("call", device[0], "start", f"1,{events},1000000")
        a.wait_line("done: accepted", timeout=120)
        # Drained: the last receipt is in (reported within 0.1 s).
        mark = w.notify.mark()
        w.notify.wait(lambda m: m.get("X_TETHER_OUTBOX") == "0", 120, "outbox drained", mark)
        took = time.monotonic() - t0
        rss = a.status()
        w.close()
        return events / took, rss
    finally:
        if shm:
            shutil.rmtree(shm, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=50000)
    ap.add_argument("--reps", type=int, default=3)
    opts = ap.parse_args()
    results = {"disk": [], "tmpfs": []}
    for _ in range(opts.reps):
        for mode in results:
            rate, _ = run_once(opts.events, mode == "tmpfs")
            results[mode].append(rate)
    print(f"end to end: {opts.events} events of ~4 bytes per run, {opts.reps} interleaved repetitions")
    print(f"{'state on':10} {'events/s':>10} {'range':>20}")
    for mode, rates in results.items():
        print(f"{mode:10} {statistics.median(rates):10.0f} {min(rates):9.0f}..{max(rates):<9.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
