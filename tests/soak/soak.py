#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Soak: a cloud and an agent under steady load and forced reconnects for a
given time, printing memory, open fds and event counts of both at intervals
so that growth shows. Not part of CI.

    tests/soak/soak.py [--minutes 30] [--interval 60] [--rate 100]
                       [--reconnect-every 20] [--calls-per-sec 5]

Load: the pump test plugin publishes numbered events at --rate per second;
`tether subscribe --resume` counts them; function calls and variable reads
go through the HTTP API at --calls-per-sec. Every --reconnect-every seconds
the connection is broken: packets silently dropped in a network namespace
for longer than the keepalive when that works here (root, iproute2,
nftables), else the cloud is SIGSTOPped for as long. Both daemons run the
whole time, so their figures compare start to end. At the end the pump
stops, the backlog drains, and every event must have arrived once, in
order. Run it from a build (top_builddir) like the integration tests:

    top_builddir=$PWD/build top_srcdir=$PWD tests/soak/soak.py --minutes 30
"""

import argparse
import os
import signal
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))
from harness import TEST_PLUGINS, TETHER, NetNs, Skip, World  # noqa: E402

AGENT = """KeepaliveSec=1
KeepaliveTimeoutSec=1
ConnectTimeoutSec=2
ReconnectMinSec=0.2
ReconnectMaxSec=1
StableSec=5"""
CLOUD = """PingSec=2
DeviceTimeoutSec=6
CallTimeoutSec=3"""


def numbers(sub):
    return [int(e["data"]) for e in sub.snapshot() if e.get("name") == "pump/n"]


class Calls(threading.Thread):
    """Function calls and variable reads through the API, counted."""

    def __init__(self, w, dev, per_sec):
        super().__init__(daemon=True)
        self.w, self.dev, self.period = w, dev, 1.0 / per_sec if per_sec > 0 else None
        self.ok = self.failed = 0
        self.stop = threading.Event()

    def run(self):
        env = dict(os.environ, TETHER_API=self.w.api, TETHER_TOKEN=self.w.token)
        i = 0
        while self.period and not self.stop.wait(self.period):
            args = ["get", self.dev, "next"] if i % 2 else ["get", self.dev, "running"]
            i += 1
            try:
                r = subprocess.run([TETHER, *args, "--timeout", "5"], env=env, capture_output=True)
                ok = r.returncode == 0
            except OSError:
                ok = False
            if ok:
                self.ok += 1
            else:
                self.failed += 1


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--interval", type=float, default=60, help="seconds between reports")
    ap.add_argument("--rate", type=float, default=100, help="events per second")
    ap.add_argument("--reconnect-every", type=float, default=20, help="seconds")
    ap.add_argument("--calls-per-sec", type=float, default=5)
    opts = ap.parse_args()

    w = World()
    ns = None
    try:
        try:
            ns = NetNs(w)
        except Skip as e:
            print(f"# no network namespace ({e}): reconnects by SIGSTOP of the cloud")
        host = ns.host_ip if ns else "localhost"
        if ns:
            w.pki("server", "--force", w.path("pki"), "localhost", "127.0.0.1", ns.host_ip)
        w.start_cloud(timing=CLOUD, listen=host if ns else "127.0.0.1")
        device = w.new_device()
        sub = w.subscribe("pump/", "--device", device[0], "--resume").wait_ready()
        a = w.start_agent(device=device, host=host, plugin_dir=TEST_PLUGINS, connection=AGENT,
                          extra="[Plugins]\nEnable=pump\n", prefix=ns.prefix if ns else ())
        w.tether("call", device[0], "start", f"1,2000000000,{opts.rate}")
        calls = Calls(w, device[0], opts.calls_per_sec)
        calls.start()

        start = time.monotonic()
        end = start + opts.minutes * 60
        next_report = start
        next_break = start + opts.reconnect_every
        breaks = 0
        first = None
        print(f"# soak for {opts.minutes} min: {opts.rate:.0f} events/s, {opts.calls_per_sec} calls/s, "
              f"a forced reconnect every {opts.reconnect_every} s ({'silent drop' if ns else 'cloud SIGSTOP'})")
        print(f"{'min':>6} {'agent RSS':>10} {'RssAnon':>8} {'fds':>4} {'cloud RSS':>10} {'RssAnon':>8} {'fds':>4} "
              f"{'published':>10} {'received':>9} {'connects':>10} {'calls ok/failed':>16}")
        while True:
            now = time.monotonic()
            if now >= next_report or now >= end:
                ag, cl = a.status(), w.cloud.status()
                got = numbers(sub)
                try:
                    published = int(w.tether("get", device[0], "next", check=False, timeout=10).stdout.strip()) - 1
                except (ValueError, OSError, subprocess.TimeoutExpired):
                    published = -1
                row = (ag, cl)
                first = first or row
                print(f"{(now - start) / 60:6.1f} {ag['VmRSS']:7d} KiB {ag['RssAnon']:4d} KiB {ag['fds']:4d} "
                      f"{cl['VmRSS']:7d} KiB {cl['RssAnon']:4d} KiB {cl['fds']:4d} {published:10d} {len(got):9d} "
                      f"{a.count('Connected to'):10d} {calls.ok:8d}/{calls.failed:<7d}", flush=True)
                next_report += opts.interval
                if now >= end:
                    break
            if now >= next_break:
                # Break the connection until the agent notices (keepalive
                # and its timeout).
                mark = a.mark()
                if ns:
                    ns.drop(True)
                else:
                    w.cloud.signal(signal.SIGSTOP)
                a.wait_line("keepalive timed out", timeout=10, start=mark)
                if ns:
                    ns.drop(False)
                else:
                    w.cloud.signal(signal.SIGCONT)
                breaks += 1
                next_break = time.monotonic() + opts.reconnect_every
            # The soak's own schedule: until the next report or break.
            time.sleep(min(1.0, max(0.0, min(next_report, next_break, end) - time.monotonic())))

        calls.stop.set()
        calls.join(10)
        total = int(w.tether("call", device[0], "stop").stdout.strip()) - 1
        sub.wait_until(lambda evs: sum(1 for e in evs if e.get("name") == "pump/n") >= total, 120,
                       f"{total} events after the pump stopped")
        got = numbers(sub)
        ok = got == list(range(1, total + 1))
        ag, cl = a.status(), w.cloud.status()
        print(f"# {breaks} forced reconnects; {total} events published, {len(got)} received, "
              f"{'each once, in order' if ok else 'NOT exactly once in order'}; calls {calls.ok} ok, "
              f"{calls.failed} failed (during the breaks)")
        print(f"# agent: VmRSS {first[0]['VmRSS']} -> {ag['VmRSS']} KiB, RssAnon {first[0]['RssAnon']} -> "
              f"{ag['RssAnon']} KiB, fds {first[0]['fds']} -> {ag['fds']}")
        print(f"# cloud: VmRSS {first[1]['VmRSS']} -> {cl['VmRSS']} KiB, RssAnon {first[1]['RssAnon']} -> "
              f"{cl['RssAnon']} KiB, fds {first[1]['fds']} -> {cl['fds']}")
        sub.close()
        w.close()
        return 0 if ok else 1
    except BaseException:
        for d in w.daemons:
            d.kill()
        w.run_cleanups()
        print(f"# logs kept in {w.dir}")
        raise


if __name__ == "__main__":
    sys.exit(main())
