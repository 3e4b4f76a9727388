#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""bench-reconnect: a reconnect storm after a restart of tether-cloudd,
with and without TLS session resumption, side by side in one run
(docs/design/benchmarks.md, "Reconnect storm"). tests/bench/fleet holds N
devices; the cloud is stopped (SIGTERM) and started again with the same
state directory (its ticket keys kept); measured until every device is
online again:

- seconds from starting the new cloud until all N are online;
- the new cloud's CPU time (utime+stime) from its start until then;
- its handshakes: resumed (tether_cloud_handshakes_resumed_total) and
  full (completed minus resumed), and fleet's connection attempts.

Each repetition runs both variants (fleet with and without --resume),
in alternating order. Prints a Markdown table of min / median / max;
figures, never pass/fail. Needs `make bench`. Usage:

    tests/bench/bench-reconnect.py [--devices 1000] [--reps 3] [--build build]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fleetproc import Bench, FleetProcess, cpu, free_port, mmm, wait_port  # noqa: E402

TOP = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def metrics(api, token):
    req = urllib.request.Request(f"http://127.0.0.1:{api}/metrics", headers={"Authorization": f"Bearer {token}"})
    out = {}
    with urllib.request.urlopen(req, timeout=30) as r:
        for line in r.read().decode().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
    return out


def run_variant(opts, resume, log):
    b = opts.b
    coap, api = free_port(), free_port()
    state = tempfile.mkdtemp(prefix="cloud-state-", dir=b.tmp)
    conf = os.path.join(b.tmp, "cloud.conf")
    b.cloud_conf(conf, coap, api, state, api_extra="RateLimitPerAddress=0\nRateLimitPerToken=0")
    env = dict(os.environ, TETHER_LOG_LEVEL="warning")
    argv = [b.cloudd, "--config", conf]
    cloud = subprocess.Popen(argv, stderr=log, stdout=log, env=env)
    fleet = None
    res = {}
    try:
        wait_port(api, cloud, "tether-cloudd")
        extra = ["--reconnect-min", str(opts.reconnect_min), "--reconnect-max", str(opts.reconnect_max)]
        if resume:
            extra += ["--resume"]
        if opts.workers:
            extra += ["--workers", str(opts.workers)]
        fleet = FleetProcess(b.fleet_argv(coap, opts.devices, opts.timeout, *extra), log)
        word, on = fleet.wait("online")
        if word != "online":
            res["error"] = f"first storm incomplete: {on}"
            return res
        fleet.command("stats")
        before = fleet.wait("stats")[1]
        # The restart: SIGTERM, then the same configuration and state.
        cloud.terminate()
        cloud.wait()
        t0 = time.monotonic()
        cloud = subprocess.Popen(argv, stderr=log, stdout=log, env=env)
        wait_port(api, cloud, "tether-cloudd")
        deadline = t0 + opts.timeout
        while True:
            fleet.command("stats")
            st = fleet.wait("stats")[1]
            if int(st.get("online", 0)) >= opts.devices:
                break
            if time.monotonic() > deadline:
                res["error"] = f"not all online again after {opts.timeout} s: {st}"
                return res
            time.sleep(0.02)
        res["seconds"] = time.monotonic() - t0
        res["cpu"] = cpu(cloud.pid)
        m = metrics(api, b.token)
        res["resumed"] = int(m.get("tether_cloud_handshakes_resumed_total", 0))
        res["full"] = int(m.get("tether_cloud_handshakes_completed_total", 0)) - res["resumed"]
        res["attempts"] = int(st["attempts"]) - int(before["attempts"])
        res["tls_failures"] = int(st["tls_failures"]) - int(before["tls_failures"])
    finally:
        if fleet:
            fleet.close()
        cloud.terminate()
        cloud.wait()
        shutil.rmtree(state, ignore_errors=True)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--build", default=os.path.join(TOP, "build"))
    ap.add_argument("--workers", type=int, default=0, help="fleet worker processes (default: cores)")
    ap.add_argument("--timeout", type=float, default=600, help="give up on a storm after this long")
    ap.add_argument("--reconnect-min", type=float, default=0.2, help="fleet's first reconnect delay")
    ap.add_argument("--reconnect-max", type=float, default=2, help="fleet's longest reconnect delay")
    ap.add_argument("--cache", help="PKI and device certificates, kept between runs "
                    "(default: BUILD/tests/bench/fleet-cache)")
    opts = ap.parse_args()
    opts.b = b = Bench("bench-reconnect", opts.build, opts.cache, opts.devices)
    load0 = os.getloadavg()
    print(f"# bench-reconnect: {opts.devices} devices, {opts.reps} repetitions; {os.cpu_count()} cores, "
          f"{os.uname().release}; load average at start {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}", flush=True)
    log = open(os.path.join(b.tmp, "servers.log"), "w")
    runs = {False: [], True: []}
    try:
        for rep in range(opts.reps):
            order = [False, True] if rep % 2 == 0 else [True, False]
            for resume in order:
                r = run_variant(opts, resume, log)
                runs[resume].append(r)
                name = "resume" if resume else "full"
                print(f"# repetition {rep + 1}, {name}: " + json.dumps(r), flush=True)
    finally:
        log.close()
    load1 = os.getloadavg()

    def col(resume, key, fmt="{:.2f}"):
        return mmm([r.get(key) for r in runs[resume]], fmt)

    print()
    print(f"| after a restart of the cloud, {opts.devices} devices (min / median / max of {opts.reps}) "
          "| full handshakes | `fleet --resume` |")
    print("|---|---|---|")
    print(f"| seconds from the new cloud's start until all online | {col(False, 'seconds')} | {col(True, 'seconds')} |")
    print(f"| cloud CPU seconds (from its start) | {col(False, 'cpu')} | {col(True, 'cpu')} |")
    print(f"| handshakes resumed | {col(False, 'resumed', '{:.0f}')} | {col(True, 'resumed', '{:.0f}')} |")
    print(f"| full handshakes | {col(False, 'full', '{:.0f}')} | {col(True, 'full', '{:.0f}')} |")
    print(f"| connection attempts | {col(False, 'attempts', '{:.0f}')} | {col(True, 'attempts', '{:.0f}')} |")
    print(f"| TLS failures | {col(False, 'tls_failures', '{:.0f}')} | {col(True, 'tls_failures', '{:.0f}')} |")
    print(f"\n# load average at end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    errors = [r["error"] for rs in runs.values() for r in rs if "error" in r]
    for e in errors:
        print(f"# {e}")
    shutil.rmtree(b.tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
