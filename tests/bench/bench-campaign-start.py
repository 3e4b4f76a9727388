#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""bench-campaign-start: what starting a large campaign costs the cloud
(docs/design/benchmarks.md, "Starting a large campaign"). --devices
registered devices, all offline, are put in the registry through the
Store (rows in cloud.db's table devices while the cloud is stopped, as
`POST /v1/devices` would leave them; registering 100,000 through the API
takes long), a tiny .deb is uploaded, manifests naming every device are
signed (`tether ota sign`, about 140 IDs each), and one campaign with
phases [100] is made with POST /v1/campaigns. Meanwhile a thread polls
GET /v1/devices/ID without pause: its longest answer is the longest
stall of the cloud's loop while the campaign is made and its phase
starts (also given for the answers begun after the POST's). Figures: the POST's
time, the time until every device's job is queued (GET /v1/campaigns/ID,
"offline" == devices), the probe's longest and 99th percentile answer,
the cloud's CPU time, VmRSS growth and the growth of cloud.db (with its
-wal) after the Store's batch is committed.

Figures, never pass/fail. Usage (after building):

    top_builddir=$PWD/build top_srcdir=$PWD tests/bench/bench-campaign-start.py [--devices 100000]
"""

import argparse
import json
import os
import sqlite3
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))
import harness  # noqa: E402
from harness import World  # noqa: E402
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from importlib import import_module  # noqa: E402

bc = import_module("bench-campaign")


def api(w, method, path, body=None, timeout=300):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(w.api + path, data=data, method=method,
                                 headers={"Authorization": f"Bearer {w.token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, {"error": e.read().decode(errors="replace")}


def db_size(w):
    base = w.path("cloud-state", "cloud.db")
    return sum(os.path.getsize(p) for p in (base, base + "-wal") if os.path.exists(p))


class Probe(threading.Thread):
    """GET /v1/devices/ID back to back; (start, seconds) of each."""

    def __init__(self, w, dev):
        super().__init__(daemon=True)
        self.w, self.dev, self.samples, self.stop = w, dev, [], False

    def run(self):
        while not self.stop:
            t = time.monotonic()
            status, _ = api(self.w, "GET", f"/v1/devices/{self.dev}", timeout=120)
            self.samples.append((t, time.monotonic() - t, status))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=100000, help="registered offline devices (default 100000)")
    ap.add_argument("--timeout", type=float, default=600, help="give up after this long (s)")
    opts = ap.parse_args()
    load0 = os.getloadavg()
    print(f"# bench-campaign-start: {os.cpu_count()} cores; load average at start {load0[0]:.2f}", flush=True)
    w = World()
    extra = f"[OTA]\nArtifactDirectory={w.path('artifacts')}\n[API]\nRateLimitPerAddress=0\nRateLimitPerToken=0\n"
    try:
        w.start_cloud(extra=extra)
        status, _ = api(w, "GET", "/v1/campaigns")
        if status != 200:
            print(f"bench-campaign-start: no campaigns in this cloud ({status})", file=sys.stderr)
            return 77
        key, pub = w.path("update.key"), w.path("keys", "update.pem")
        os.makedirs(os.path.dirname(pub))
        w.tether("ota", "keygen", key, pub)
        deb = bc.make_deb(w, 0)
        w.tether("ota", "upload", deb, timeout=120)
        ids = [f"be{i:022x}" for i in range(opts.devices)]
        # Registered through the Store, with the cloud stopped.
        w.cloud.stop()
        t = time.monotonic()
        db = sqlite3.connect(w.path("cloud-state", "cloud.db"))
        now = int(time.time() * 1e6)
        db.executemany("INSERT INTO devices (id, added_usec, registered_usec, registered_by) VALUES (?, ?, ?, ?)",
                       ((i, now, now, "bench") for i in ids))
        db.commit()
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db.close()
        print(f"# {opts.devices} devices registered through the Store in {time.monotonic() - t:.1f} s", flush=True)
        w.start_cloud(extra=extra)
        t = time.monotonic()
        chunks = [ids[i:i + 140] for i in range(0, len(ids), 140)]
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as ex:
            manifests = list(ex.map(lambda ch: bc.sign(w, deb, key, ch), chunks))
        manifests = [m for ms in manifests for m in ms]
        print(f"# {len(manifests)} manifests signed in {time.monotonic() - t:.1f} s", flush=True)
        body = {"name": "bench-start", "target": "bench", "manifests": manifests, "devices": ids,
                "phases": [100], "max_failure_rate": 100, "phase_wait": 0}
        time.sleep(2)  # the Store's batch of the start is committed
        pid = w.cloud.proc.pid
        rss0, cpu0, db0 = bc.cloud_rss_kib(pid), bc.cloud_cpu(pid), db_size(w)
        probe = Probe(w, ids[-1])
        probe.start()
        time.sleep(0.5)
        t0 = time.monotonic()
        status, r = api(w, "POST", "/v1/campaigns", body)
        t_post = time.monotonic() - t0
        if status != 201:
            raise harness.Failure(f"POST /v1/campaigns: {status} {r}")
        cid = r["campaign"]["id"]
        rss_peak = rss0
        while True:
            status, r = api(w, "GET", f"/v1/campaigns/{cid}")
            rss_peak = max(rss_peak, bc.cloud_rss_kib(pid) or 0)
            counts = r["campaign"].get("counts", {}) if status == 200 else {}
            if counts.get("offline", 0) + counts.get("failed", 0) >= opts.devices:
                t_queued = time.monotonic() - t0
                break
            if time.monotonic() - t0 > opts.timeout:
                raise harness.Failure(f"not all queued after {opts.timeout} s: {counts}")
            time.sleep(0.05)
        t_end = time.monotonic()
        time.sleep(1)
        probe.stop = True
        probe.join()
        time.sleep(2)  # the Store's batch
        cpu1, rss1, db1 = bc.cloud_cpu(pid), bc.cloud_rss_kib(pid), db_size(w)
        lat = sorted(s for (t, s, _) in probe.samples if t + s >= t0 and t <= t_end)
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else float("nan")
        # Begun once the POST was answered: the phase's start alone.
        after = [s for (t, s, _) in probe.samples if t >= t0 + t_post and t <= t_end] or [float("nan")]
        print()
        print(f"{opts.devices} offline devices, one campaign, phases [100], {len(manifests)} manifests:")
        print(f"  POST /v1/campaigns answered in {t_post:.2f} s; every job queued after {t_queued:.2f} s "
              f"(failed: {counts.get('failed', 0)})")
        print(f"  GET /v1/devices/ID meanwhile: {len(lat)} answers, longest {max(lat) * 1000:.0f} ms, "
              f"p99 {p99 * 1000:.0f} ms; longest of those begun after the POST's answer {max(after) * 1000:.0f} ms")
        print(f"  cloud CPU {cpu1 - cpu0:.1f} s; VmRSS {rss0 / 1024:.0f} -> {rss1 / 1024:.0f} MiB "
              f"(peak {rss_peak / 1024:.0f}, growth {(rss1 - rss0) / 1024:.0f} MiB); "
              f"cloud.db(+wal) {db0 / 1e6:.1f} -> {db1 / 1e6:.1f} MB")
        con = sqlite3.connect(f"file:{w.path('cloud-state', 'cloud.db')}?mode=ro", uri=True)
        rows = con.execute("SELECT count(*), sum(length(manifest)) FROM ota_jobs").fetchone()
        con.close()
        print(f"  ota_jobs rows {rows[0]}, manifest bytes in them {rows[1] or 0}")
    finally:
        w.close()
    load1 = os.getloadavg()
    print(f"Load average at start {load0[0]:.2f}, at end {load1[0]:.2f}.")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except harness.Skip as e:
        print(f"bench-campaign-start: {e}", file=sys.stderr)
        sys.exit(77)
