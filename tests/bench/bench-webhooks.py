#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""bench-webhooks: events per second one webhook ([Webhook NAME],
cloud/sink-webhook.c) delivers to a receiver on loopback.

    top_builddir=$PWD/build top_srcdir=$PWD tests/bench/bench-webhooks.py \\
        [--devices 4] [--events 2000] [--reps 3] [--https]

DEVICES agents publish EVENTS "pump/n" events each (the pump test plugin)
while the receiver (tests/integration/hookkit.py: Python's
ThreadingHTTPServer, which checks every signature) holds its requests
unanswered, so the whole backlog is in the cloud's journal; the clock runs
from the moment the receiver starts answering to its last 2xx. A device
has one event in flight at a time (the order per device), so the window of
8 fills only with 8 devices or more. Also printed: tether-cloudd's CPU
time per delivered event during the drain, and the load average (the
receiver is in this process and is usually the bottleneck; compare runs
on the same machine only)."""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))
from harness import TEST_PLUGINS, World  # noqa: E402
from hookkit import Receiver, make_pki  # noqa: E402

SECRET = "a benchmark secret of 32 bytes!!"


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_once(devices, events, https):
    w = World()
    try:
        cert = key = ca = None
        if https:
            ca, cert, key = make_pki(w.path("hook-pki"))
        rx = Receiver(SECRET, cert, key, keep=False)
        w.cleanups.append(rx.close)
        rx.gate.clear()
        url = rx.url if https else f"http://127.0.0.1:{rx.port}/hook"
        hook = f"[Webhook bench]\nURL={url}\nSecret={SECRET}\nPrefix=pump/\nTimeout=300\n"
        if ca:
            hook += f"CAFile={ca}\n"
        cloud = w.start_cloud(extra=hook + "[API]\nRateLimitPerAddress=0\nRateLimitPerToken=0\n")
        total = devices * events
        sub = w.subscribe("pump/").wait_ready()
        agents = [w.start_agent(name=f"agent{i}", plugin_dir=TEST_PLUGINS,
                                extra="[Plugins]\nEnable=pump\n[Outbox]\nMaxEvents=100000\n")
                  for i in range(devices)]
        for a in agents:
            w.tether("call", a.device_id, "start", f"1,{events},1000000")
        sub.wait_until(lambda evs: len(evs) >= total, 300, f"{total} events in the cloud")
        sub.close()
        cpu0 = cpu_seconds(cloud.proc.pid)
        t0 = time.monotonic()
        rx.gate.set()
        deadline = t0 + 600
        with rx.cond:
            while rx.delivered < total:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"only {rx.delivered} of {total} delivered")
                rx.cond.wait(0.5)
        took = time.monotonic() - t0
        cpu = cpu_seconds(cloud.proc.pid) - cpu0
        bad = rx.bad_signatures
        w.close()
        if bad:
            raise RuntimeError(f"{bad} bad signatures")
        return total / took, cpu / total
    except BaseException:
        for d in w.daemons:
            d.kill()
        w.run_cleanups([])
        raise


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--events", type=int, default=2000, help="per device")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--https", action="store_true", help="HTTPS with the receiver's own CA (default: HTTP)")
    opts = ap.parse_args()
    rates, cpus = [], []
    for _ in range(opts.reps):
        rate, cpu = run_once(opts.devices, opts.events, opts.https)
        rates.append(rate)
        cpus.append(cpu)
    load = os.getloadavg()
    print(f"webhook over {'HTTPS' if opts.https else 'HTTP'} on loopback: {opts.devices} devices x {opts.events} "
          f"events, {opts.reps} repetitions")
    print(f"{'':24} {'min':>10} {'median':>10} {'max':>10}")
    print(f"{'events/s delivered':24} {min(rates):10.0f} {statistics.median(rates):10.0f} {max(rates):10.0f}")
    print(f"{'cloud CPU µs per event':24} {min(cpus) * 1e6:10.0f} {statistics.median(cpus) * 1e6:10.0f} "
          f"{max(cpus) * 1e6:10.0f}")
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
