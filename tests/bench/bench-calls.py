#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""bench-calls: function calls through tether-cloudd's HTTP API with one
device connected and with N connected (tests/bench/fleet hold), side by
side in one run (docs/design/benchmarks.md, "Calls with one device and
with 10,000"): what holding many devices costs the calls to one of them.
Each repetition starts a fresh cloud per fleet size, in alternating
order, and measures with tests/bench/bench-call:

- one kept-alive HTTP client calling one device: p50 and p99;
- four clients at once calling that same device: calls/s (the figure
  that exists with one device too);
- with N of at least 5, four clients each calling its own device:
  calls/s.

Prints a Markdown table of min / median / max; figures, never pass/fail.
Needs `make bench`. Usage:

    tests/bench/bench-calls.py [--devices 1,10000] [--reps 3] [--calls 3000] [--build build]
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fleetproc import Bench, FleetProcess, alternate, free_port, print_table, wait_port  # noqa: E402

TOP = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def bench_call(opts, api, device):
    """bench-call's "all" line: median, p99 (ms), calls/s and errors; None if it printed none."""
    r = subprocess.run([opts.bench_call, "--api", f"http://127.0.0.1:{api}", "--token", opts.b.token,
                        "--device", device, "--function", "add", "--arg", "1,2", "-n", str(opts.calls),
                        "--reps", "1", "--warmup", "100"], capture_output=True, text=True)
    for line in r.stdout.splitlines():
        f = line.split()
        if f and f[0] == "all" and f[1] != "-":
            return {"median": float(f[1]), "p99": float(f[3]), "rate": float(f[5]), "errors": int(f[6])}
    return None


def concurrent(opts, api, devices):
    """calls/s of one bench-call per device in devices, all at once; None if one failed."""
    out = []
    ts = [threading.Thread(target=lambda d=d: out.append(bench_call(opts, api, d))) for d in devices]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if len(out) != len(devices) or not all(out) or any(r["errors"] for r in out):
        return None
    return sum(r["rate"] for r in out)


def run_size(opts, n, log):
    b = opts.b
    coap, api = free_port(), free_port()
    state = tempfile.mkdtemp(prefix="cloud-state-", dir=b.tmp)
    conf = os.path.join(b.tmp, "cloud.conf")
    # The benchmark measures the cloud, not its API rate limits.
    b.cloud_conf(conf, coap, api, state, api_extra="RateLimitPerAddress=0\nRateLimitPerToken=0")
    cloud = subprocess.Popen([b.cloudd, "--config", conf], stderr=log, stdout=log,
                             env=dict(os.environ, TETHER_LOG_LEVEL="warning"))
    fleet = None
    res = {}
    try:
        wait_port(api, cloud, "tether-cloudd")
        fleet = FleetProcess(b.fleet_argv(coap, n, opts.timeout), log)
        word, on = fleet.wait("online")
        if word != "online":
            res["error"] = f"{n} devices: storm incomplete: {on}"
            return res
        # The storm's aftermath (describe answers, registry commits) settles.
        time.sleep(opts.settle)
        one = bench_call(opts, api, opts.ids[0])
        if one:
            res["p50"], res["p99"] = one["median"], one["p99"]
        res["same4"] = concurrent(opts, api, [opts.ids[0]] * 4)
        if n >= 5:
            res["own4"] = concurrent(opts, api, opts.ids[1:5])
    finally:
        if fleet:
            fleet.close()
        cloud.terminate()
        cloud.wait()
        shutil.rmtree(state, ignore_errors=True)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", default="1,10000", help="fleet sizes to compare")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--calls", type=int, default=3000, help="calls per bench-call client")
    ap.add_argument("--settle", type=float, default=2, help="seconds between the storm and the calls")
    ap.add_argument("--build", default=os.path.join(TOP, "build"))
    ap.add_argument("--timeout", type=float, default=600, help="give up on a storm after this long")
    ap.add_argument("--cache", help="PKI and device certificates, kept between runs "
                    "(default: BUILD/tests/bench/fleet-cache)")
    opts = ap.parse_args()
    sizes = [int(n) for n in opts.devices.split(",")]
    opts.b = b = Bench("bench-calls", opts.build, opts.cache, max(sizes + [5]), need=("tests/bench/bench-call",))
    opts.bench_call = b.extra["tests/bench/bench-call"]
    with open(os.path.join(b.certs, "index")) as f:
        opts.ids = f.read().split()
    load0 = os.getloadavg()
    print(f"# bench-calls: {opts.devices} devices, {opts.reps} repetitions, {opts.calls} calls per client; "
          f"{os.cpu_count()} cores, {os.uname().release}; load average at start "
          f"{load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}", flush=True)
    log = open(os.path.join(b.tmp, "servers.log"), "w")
    try:
        runs = alternate(sizes, opts.reps, lambda n: run_size(opts, n, log), lambda n: f"{n} devices")
    finally:
        log.close()
    print_table(f"calls (min / median / max of {opts.reps})", runs, [(n, f"{n} connected") for n in sizes],
                [("one client: p50 (ms)", "p50", "{:.3f}"), ("one client: p99 (ms)", "p99", "{:.3f}"),
                 ("four clients, the same device: calls/s", "same4", "{:.0f}"),
                 ("four clients, a device each: calls/s", "own4", "{:.0f}")])
    shutil.rmtree(b.tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
