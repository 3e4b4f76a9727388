#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""bench-cluster: what cluster mode costs and how fast it recovers
(docs/cluster.md), on loopback, in one run:

  * call latency (tests/bench/bench-call: one kept-alive HTTP connection)
    to one device: a single node; a cluster node holding the device
    ("same node"); the other node, which routes the call over NATS
    ("cross node");
  * failover: tether-cloudd holding the device killed with SIGKILL, until
    the device is connected to the other node, and until a call through
    that node answers; --failovers times, the killed node restarted
    between them.

  * with --fleet N: N simulated devices (tests/bench/fleet) spread over
    the two nodes, half started at each at once: seconds until all are
    online, memory per device on each node, and call latency to one of
    them through either node (--reps repetitions); --fleet-only skips
    the single-device runs above.

    top_builddir=$PWD/build top_srcdir=$PWD tests/bench/bench-cluster.py [--calls N] [--reps R] [--failovers F]
        [--fleet N [--fleet-only]]

TETHER_TEST_KEEP=1 keeps the scratch directories (the clouds' logs).

Prints figures (min / median / max); judges nothing."""

import argparse
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))
from harness import World, poll  # noqa: E402
from natskit import NatsCluster  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fleetproc import FleetProcess  # noqa: E402

BUILD = os.environ.get("top_builddir", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "build"))
BENCH_CALL = os.path.join(BUILD, "tests", "bench", "bench-call")
TIMING = "PingSec=2\nDeviceTimeoutSec=6\nCallTimeoutSec=5"


def spread(xs, unit="", fmt="{:.3f}"):
    return " / ".join(fmt.format(x) for x in (min(xs), statistics.median(xs), max(xs))) + unit


def bench_call(api, token, device, calls, reps):
    """[(median ms, p99 ms)] per repetition."""
    r = subprocess.run([BENCH_CALL, "--api", api, "--token", token, "--device", device, "-n", str(calls),
                        "--reps", str(reps), "--function", "add", "--arg", "1,2"],
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"bench-call failed: {r.stderr.strip()}")
    out = []
    for line in r.stdout.splitlines():
        m = re.match(r"^(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+", line)
        if m:
            out.append((float(m.group(2)), float(m.group(4))))
    return out


def start_node(w, nats, i, port=0, api_port=0):
    d = w.start_cloud(name=f"cloud-{i}", port=port, api_port=api_port, timing=TIMING,
                      state_dir=w.path(f"cloud-{i}-state"), extra=f"[Cluster]\nNATS={nats.url}\nNode=n{i}\n")
    d.node = f"n{i}"
    return d


def connected_to(nodes, dev, marks):
    for n in nodes:
        if n.proc.poll() is None and n.count(rf"Device '{dev}' connected from", marks.get(n, 0)):
            return n
    return None


def cluster_run(opts, servers):
    w = World()
    try:
        nats = NatsCluster(w, servers)
        nats.wait_ready()
        nodes = [start_node(w, nats, 1), start_node(w, nats, 2)]
        a = w.start_agent(host=" ".join(f"localhost:{n.coap_port}" for n in nodes))
        dev = a.device_id
        holder = []
        poll(lambda: holder.append(connected_to(nodes, dev, {})) or holder[-1], 20, "device on a node")
        here = holder[-1]
        other = nodes[1] if here is nodes[0] else nodes[0]
        same = bench_call(here.api, w.token, dev, opts.calls, opts.reps)
        cross = bench_call(other.api, w.token, dev, opts.calls, opts.reps)
        online, callable_ = [], []
        for _ in range(opts.failovers):
            here = last_holder(nodes, dev)
            other = nodes[1] if here is nodes[0] else nodes[0]
            marks = {other: other.mark()}
            t0 = time.monotonic()
            here.kill()
            poll(lambda: connected_to([other], dev, marks), 60, "device on the other node", interval=0.01)
            online.append(time.monotonic() - t0)
            while True:
                r = w.tether("call", dev, "add", "1,2", api=other.api, check=False)
                if r.returncode == 0:
                    break
                time.sleep(0.01)
            callable_.append(time.monotonic() - t0)
            # Bring the killed node back on its ports, for the next round.
            i = nodes.index(here)
            nodes[i] = start_node(w, nats, i + 1, here.coap_port, here.api_port)
        return same, cross, online, callable_
    finally:
        w.close()


def last_holder(nodes, dev):
    """The node whose newest connection line for dev is the latest one
    logged (by wall clock order of the log files' modification)."""
    live = [n for n in nodes if n.proc.poll() is None and n.count(rf"Device '{dev}' connected from")]
    # A node that lost the device logs its disconnection after its
    # connection; the holder's last line about it is a connection.
    for n in live:
        lines = [ln for ln in n.lines if f"Device '{dev}'" in ln]
        if lines and "connected from" in lines[-1]:
            return n
    raise RuntimeError("no node holds the device")


def single_run(opts):
    w = World()
    try:
        w.start_cloud(timing=TIMING)
        a = w.start_agent()
        return bench_call(w.api, w.token, a.device_id, opts.calls, opts.reps)
    finally:
        w.close()


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def fleet_run(opts):
    """N fleet devices, half on each node, started at once."""
    fleet = os.path.join(BUILD, "tests", "bench", "fleet")
    pki = os.path.join(BUILD, "tools", "tether-pki")
    if not os.access(fleet, os.X_OK):
        sys.exit(f"{fleet} is not built: make -C {BUILD} bench")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    cache = os.path.join(BUILD, "tests", "bench", "fleet-cache")
    fpki = os.path.join(cache, "pki")
    if not os.path.exists(os.path.join(fpki, "server.crt")):
        os.makedirs(cache, exist_ok=True)
        subprocess.run([pki, "ca", fpki], check=True, capture_output=True)
        subprocess.run([pki, "server", fpki, "localhost", "127.0.0.1"], check=True, capture_output=True)
    ca, ca_key, certs = os.path.join(fpki, "ca.crt"), os.path.join(fpki, "ca.key"), os.path.join(cache, "devices")
    subprocess.run([fleet, "--ca-cert", ca, "--ca-key", ca_key, "--cache", certs, "--devices", str(opts.fleet),
                    "mint"], check=True, stdout=subprocess.DEVNULL)
    ids = open(os.path.join(certs, "index")).read().split()
    w = World()
    log = open(w.path("fleet.log"), "w")
    fleets = []
    try:
        nats = NatsCluster(w, opts.servers)
        nats.wait_ready()
        # The clouds trust the fleet's CA ([Cloud] CAFile= is the World's).
        shutil.copy(ca, w.path("pki", "ca.crt"))
        nodes = []
        for i in (1, 2):
            # The cloud's default timing: thousands of devices on two cores
            # do not answer a Ping within the tests' few seconds.
            d = w.start_cloud(name=f"cloud-{i}", timing="PingSec=30\nDeviceTimeoutSec=90\nCallTimeoutSec=10",
                              state_dir=w.path(f"cloud-{i}-state"),
                              cert=os.path.join(fpki, "server.crt"), key=os.path.join(fpki, "server.key"),
                              extra=f"[Cluster]\nNATS={nats.url}\nNode=n{i}\n"
                                    f"[Events]\nJournalMaxBytes=1073741824\n",
                              env={"TETHER_LOG_LEVEL": "notice"})
            nodes.append(d)
        idle = [rss_kib(n.proc.pid) for n in nodes]
        half = opts.fleet // 2
        t0 = time.monotonic()
        for k, n in enumerate(nodes):
            fleets.append(FleetProcess([fleet, "--cloud", f"127.0.0.1:{n.coap_port}", "--server-name", "127.0.0.1",
                                        "--ca-cert", ca, "--ca-key", ca_key, "--cache", certs,
                                        "--first", str(k * half), "--devices", str(half), "--timeout", "600",
                                        "hold"], log))
        online = []
        for f in fleets:
            word, on = f.wait("online")
            if word != "online":
                raise RuntimeError(f"the storm did not complete: {word} {on}")
            online.append(on)
        took = time.monotonic() - t0
        time.sleep(1)
        held = [rss_kib(n.proc.pid) for n in nodes]
        per = [(h - i) / half for h, i in zip(held, idle)]
        # A device of node 1's half, called through node 1 and through node
        # 2, once node 2 sees it (its presence written and read back).
        t1 = time.monotonic()
        last = None
        while (call := w.tether("call", ids[0], "add", "1,2", api=nodes[1].api, check=False)).returncode != 0:
            err = call.stderr.strip()[:200]
            if err != last:
                print(f"# {time.monotonic() - t1:.1f} s after all were online, through node 2: {err}", flush=True)
                last = err
            if time.monotonic() - t1 > 120:
                r = w.tether("describe", ids[0], "--json", api=nodes[1].api, check=False)
                print(f"# node 2 on {ids[0]}: {r.returncode} {r.stdout[:300]} {r.stderr[:300]}")
                for n in nodes:
                    warn = [ln for ln in n.lines if "presence" in ln or "NATS" in ln or "Cluster" in ln]
                    print(f"# {n.name}: {len(n.lines)} log lines; {warn[:5]} ... {warn[-5:]}")
                raise RuntimeError(f"node 2 did not route to {ids[0]} within 120 s")
            time.sleep(0.1)
        visible = time.monotonic() - t1
        same = bench_call(nodes[0].api, w.token, ids[0], opts.calls, opts.reps)
        cross = bench_call(nodes[1].api, w.token, ids[0], opts.calls, opts.reps)
        return took, online, per, same, cross, visible
    finally:
        for f in fleets:
            f.close()
        log.close()
        w.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--failovers", type=int, default=10)
    ap.add_argument("--servers", type=int, default=3, help="nats-server processes")
    ap.add_argument("--fleet", type=int, default=0, help="also N simulated devices over both nodes")
    ap.add_argument("--fleet-only", action="store_true", help="with --fleet: skip the single-device runs")
    opts = ap.parse_args()
    if not os.access(BENCH_CALL, os.X_OK):
        sys.exit(f"{BENCH_CALL} is not built: make -C {BUILD} tests/bench/bench-call")
    print(f"load average at start: {' '.join(open('/proc/loadavg').read().split()[:3])}")
    if not (opts.fleet and opts.fleet_only):
        cluster_figures(opts)
    if opts.fleet:
        fleet_figures(opts)
    print(f"load average at end: {' '.join(open('/proc/loadavg').read().split()[:3])}")


def cluster_figures(opts):
    single = single_run(opts)
    same, cross, online, callable_ = cluster_run(opts, opts.servers)
    print(f"\ncall latency, {opts.calls} calls x {opts.reps} repetitions on one kept-alive connection "
          f"(min / median / max over repetitions):")
    for label, rs in (("single node", single), ("cluster, same node", same), ("cluster, cross node", cross)):
        print(f"  {label:22s} median {spread([m for m, _ in rs], ' ms')}   p99 {spread([p for _, p in rs], ' ms')}")
    print(f"\nfailover ({len(online)} SIGKILLs of the node holding the device, {opts.servers} NATS servers):")
    print(f"  device online on the other node  {spread(online, ' s')}")
    print(f"  first call answered through it   {spread(callable_, ' s')}")


def fleet_figures(opts):
    took, online, per, same, cross, visible = fleet_run(opts)
    print(f"\nfleet: {opts.fleet} devices, {opts.fleet // 2} started at once on each node:")
    print(f"  all online after {took:.2f} s; per node: " +
          "; ".join(f"{o.get('seconds', '?')} s, {o.get('attempts', '?')} attempts" for o in online))
    print(f"  node 2 routed a call to a device on node 1 {visible:.1f} s after all were online")
    print("  memory per connected device: " + ", ".join(f"node {i + 1} {p:.1f} KiB" for i, p in enumerate(per)))
    print(f"  call to a device on node 1, {opts.calls} calls x {opts.reps} repetitions (min / median / max):")
    for label, rs in (("through node 1 (same)", same), ("through node 2 (cross)", cross)):
        print(f"    {label:24s} median {spread([m for m, _ in rs], ' ms')}   p99 {spread([p for _, p in rs], ' ms')}")


if __name__ == "__main__":
    main()
