#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""bench-handshakes: a connect storm of N devices (tests/bench/fleet hold,
each its own certificate, all starting at once) against tether-cloudd
with its TLS handshakes in the event loop ([Cloud] HandshakeThreads=0)
and on threads (HandshakeThreads=1, 2, ...), side by side in one run
(docs/design/benchmarks.md, "Handshakes on threads"). Each repetition
starts a fresh cloud per variant, in alternating order, and measures:

- seconds until all N are online, fleet's connection attempts, TLS
  failures and connect timeouts;
- the cloud's CPU time (utime+stime) over the storm, and the
  simulator's (fleet's workers, which share the cores);
- how busy the whole machine was over it (from /proc/stat), which says
  whether the storm was bound by the CPU the cloud and the simulator
  share.

A variant "N:parse" runs HandshakeThreads=N with the simulator parsing
each device's PEM files for every session (fleet --parse-per-session, what
libcoap does by itself) instead of once before the clock: what that
parsing adds to a storm on shared cores.

Prints a Markdown table of min / median / max; figures, never pass/fail.
Needs `make bench`. Usage:

    tests/bench/bench-handshakes.py [--devices 1000] [--reps 3] [--threads 0,2,0:parse] [--build build]
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fleetproc import Bench, FleetProcess, alternate, cpu, free_port, print_table, wait_port  # noqa: E402

TOP = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def cpu_times():
    """(busy, total) jiffies of the whole machine."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)


def run_variant(b, opts, variant, log):
    """variant: "N" (HandshakeThreads=N) or "N:parse" (the same with the
    simulator parsing its PEM files for every session, as libcoap does by
    itself)."""
    threads, _, how = variant.partition(":")
    coap, api = free_port(), free_port()
    state = tempfile.mkdtemp(prefix="cloud-state-", dir=b.tmp)
    conf = os.path.join(b.tmp, "cloud.conf")
    b.cloud_conf(conf, coap, api, state, cloud=f"HandshakeThreads={threads}")
    cloud = subprocess.Popen([b.cloudd, "--config", conf], stderr=log, stdout=log,
                             env=dict(os.environ, TETHER_LOG_LEVEL="warning"))
    fleet = None
    res = {}
    try:
        wait_port(api, cloud, "tether-cloudd")
        c0 = cpu(cloud.pid)
        b0, t0 = cpu_times()
        extra = ["--workers", str(opts.workers)] if opts.workers else []
        if how == "parse":
            extra.append("--parse-per-session")
        fleet = FleetProcess(b.fleet_argv(coap, opts.devices, opts.timeout, *extra), log)
        word, on = fleet.wait("online")
        b1, t1 = cpu_times()
        res["cpu"] = cpu(cloud.pid) - c0
        res["busy"] = 100.0 * (b1 - b0) / max(t1 - t0, 1)
        if word != "online":
            res["error"] = f"storm incomplete: {on}"
            return res
        res["seconds"] = float(on["seconds"])
        if "sim_cpu" in on:
            res["sim_cpu"] = float(on["sim_cpu"])
        for k in ("attempts", "tls_failures", "timeouts"):
            res[k] = int(on.get(k, 0))
    finally:
        if fleet:
            fleet.close()
        cloud.terminate()
        cloud.wait()
        shutil.rmtree(state, ignore_errors=True)
    return res


def label(variant):
    threads, _, how = variant.partition(":")
    return f"HandshakeThreads={threads}" + (", simulator parses per session" if how == "parse" else "")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", default="0,2",
                    help="HandshakeThreads= values to compare; N:parse for N with the simulator parsing its "
                    "PEM files for every session")
    ap.add_argument("--build", default=os.path.join(TOP, "build"))
    ap.add_argument("--workers", type=int, default=0, help="fleet worker processes (default: cores)")
    ap.add_argument("--timeout", type=float, default=600, help="give up on a storm after this long")
    ap.add_argument("--cache", help="PKI and device certificates, kept between runs "
                    "(default: BUILD/tests/bench/fleet-cache)")
    opts = ap.parse_args()
    variants = opts.threads.split(",")
    b = Bench("bench-handshakes", opts.build, opts.cache, opts.devices)
    load0 = os.getloadavg()
    print(f"# bench-handshakes: {opts.devices} devices, {opts.reps} repetitions, HandshakeThreads={opts.threads}; "
          f"{os.cpu_count()} cores, {os.uname().release}; load average at start "
          f"{load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}", flush=True)
    log = open(os.path.join(b.tmp, "servers.log"), "w")
    try:
        runs = alternate(variants, opts.reps, lambda v: run_variant(b, opts, v, log),
                         label)
    finally:
        log.close()
    print_table(f"{opts.devices} devices at once (min / median / max of {opts.reps})", runs,
                [(v, label(v)) for v in variants],
                [("seconds until all online", "seconds", "{:.2f}"),
                 ("cloud CPU seconds over the storm", "cpu", "{:.2f}"),
                 ("simulator CPU seconds over the storm", "sim_cpu", "{:.2f}"),
                 ("machine busy over the storm (% of all cores)", "busy", "{:.0f}"),
                 ("connection attempts", "attempts", "{:.0f}"), ("TLS failures", "tls_failures", "{:.0f}"),
                 ("connect timeouts", "timeouts", "{:.0f}")])
    shutil.rmtree(b.tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
