#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""bench-campaign: what an update campaign costs (docs/design/benchmarks.md,
"Campaigns"). One tether-cloudd ([OTA] ArtifactDirectory=, no HTTPS
artifact port) and --devices simulated devices (tests/bench/fleet --ota
hold: they take the job, download the artifact over their session with
GET /a/SHA256 and Block2, hash it, and report accepted .. committed
without installing anything, --install-sec after the download). A
--size-mb .deb of random data is uploaded once; each run signs fresh
manifests for the devices (as many device IDs per manifest as fit in its
4096-byte body, `tether ota sign`), creates a campaign with POST
/v1/campaigns and polls GET /v1/campaigns/ID until every device is
committed. Per run: time from the POST to 100 % committed, the cloud's
CPU time and VmRSS (peak, and growth) from /proc meanwhile. Runs of
phases 1,10,50,100 and of one phase 100 alternate (--reps of each); the
difference of their times, over the three extra phases, is the
per-phase overhead: the cloud's phase handling plus a phase's own
download and install time on the devices. min / median / max, load
average at start and end.

Figures, never pass/fail. Usage (after building, and `make bench` or
`make check` for tests/bench/fleet):

    top_builddir=$PWD/build top_srcdir=$PWD tests/bench/bench-campaign.py \\
        [--devices 100] [--reps 3] [--size-mb 10] [--install-sec 1]

Needs a cloud with campaigns (POST /v1/campaigns) and artifacts over the
device's session (GET /a/SHA256); without them it says so and exits 77.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))
import harness  # noqa: E402
from harness import World  # noqa: E402
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fleetproc import FleetProcess  # noqa: E402

FLEET = os.path.join(harness.BUILD, "tests", "bench", "fleet")
CONFIGS = {"1,10,50,100": [1, 10, 50, 100], "100": [100]}


def mmm(values, fmt="{:.2f}"):
    """min / median / max, or the value when there is one."""
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    if len(values) == 1:
        return fmt.format(values[0])
    return " / ".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


def cloud_cpu(pid):
    """utime + stime of process pid (s), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def cloud_rss_kib(pid):
    """VmRSS of process pid (KiB), or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


class Unsupported(Exception):
    """The cloud lacks what the benchmark needs."""


def api(w, method, path, body=None):
    """(status, JSON body) of an API request with the World's token."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(w.api + path, data=data, method=method,
                                 headers={"Authorization": f"Bearer {w.token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, {"error": raw.decode(errors="replace")}


def make_deb(w, size_mb):
    """A .deb holding size_mb MB of random data (the simulated devices
    download and hash it; nothing installs it)."""
    root = w.path("pkg")
    os.makedirs(os.path.join(root, "DEBIAN"))
    os.makedirs(os.path.join(root, "usr", "share", "fleet-bench"))
    with open(os.path.join(root, "DEBIAN", "control"), "w") as f:
        f.write("Package: fleet-bench\nVersion: 1.0\nArchitecture: all\n"
                "Maintainer: bench <bench@example.org>\nDescription: random data for bench-campaign\n")
    with open(os.path.join(root, "usr", "share", "fleet-bench", "blob"), "wb") as f:
        f.write(os.urandom(size_mb * 1000 * 1000))
    deb = w.path("fleet-bench_1.0_all.deb")
    subprocess.run(["dpkg-deb", "-Znone", "--root-owner-group", "--build", root, deb], check=True,
                   stdout=subprocess.DEVNULL)
    return deb


def sign(w, deb, key, ids):
    """Signed manifests naming every device of ids, as many per manifest
    as fit in its body (4096 bytes: about 140 IDs of 24 hex digits):
    `tether ota sign` refuses a larger one, and the batch shrinks until
    it does not."""
    manifests, at, batch = [], 0, 140
    while at < len(ids):
        chunk = ids[at:at + batch]
        args = ["ota", "sign", deb, "--key", key]
        for i in chunk:
            args += ["--device", i]
        r = w.tether(*args, check=False)
        if r.returncode != 0:
            if "--url" in r.stderr:
                raise Unsupported("`tether ota sign` wants --url: this tree predates manifests without url "
                                  "(downloads over the device's session, docs/fleet.md)")
            # Too many IDs for one body (the CLI's error does not always say so).
            if batch > 1:
                batch = batch * 3 // 4
                continue
            raise harness.Failure(f"tether ota sign: {r.stderr.strip()}")
        manifests.append(r.stdout)
        at += len(chunk)
    return manifests


def run_campaign(w, opts, deb, key, ids, phases, fleet):
    """One campaign to every device; its figures."""
    pid = w.cloud.proc.pid
    t_sign = time.monotonic()
    manifests = sign(w, deb, key, ids)
    t_signed = time.monotonic()
    rss0, cpu0 = cloud_rss_kib(pid), cloud_cpu(pid)
    t0 = time.monotonic()
    status, body = api(w, "POST", "/v1/campaigns", {
        "name": f"bench {','.join(map(str, phases))}", "target": "bench", "manifests": manifests,
        "devices": ids, "phases": phases, "max_failure_rate": 0, "phase_wait": 0})
    if status in (404, 405):
        raise Unsupported(f"the cloud has no POST /v1/campaigns ({status} {body.get('error', '')}): "
                          "campaigns (cloud/campaigns.c) are not in this build")
    if status != 201:
        raise harness.Failure(f"POST /v1/campaigns: {status} {body}")
    cid = body["campaign"]["id"]
    rss_peak, last, deadline = rss0 or 0, None, t0 + opts.timeout
    while True:
        status, body = api(w, "GET", f"/v1/campaigns/{cid}")
        rss = cloud_rss_kib(pid)
        if rss:
            rss_peak = max(rss_peak, rss)
        if status != 200:
            raise harness.Failure(f"GET /v1/campaigns/{cid}: {status} {body}")
        c = body["campaign"]
        counts = c.get("counts", {})
        last = counts
        if counts.get("committed", 0) >= len(ids):
            t1 = time.monotonic()
            break
        if c.get("state") in ("paused", "aborted") or (c.get("state") == "finished"
                                                        and counts.get("committed", 0) < len(ids)):
            fleet.command("ota")
            _, ota = fleet.wait("ota")
            hint = ""
            if int(ota.get("failed", 0)) and not int(ota.get("downloaded", 0)):
                hint = (" — no device could download the artifact: does this cloud serve GET /a/SHA256 "
                        "(artifacts over the device's session)? See the fleet log")
            raise Unsupported(f"campaign {cid} {c.get('state')}: {c.get('paused_reason') or ''} "
                              f"counts {counts}{hint}")
        if time.monotonic() > deadline:
            raise harness.Failure(f"campaign {cid} not done after {opts.timeout} s: {counts}")
        time.sleep(0.1)
    cpu1 = cloud_cpu(pid)
    return {"seconds": t1 - t0, "sign_seconds": t_signed - t_sign, "manifests": len(manifests),
            "cpu": cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None,
            "rss_peak": rss_peak / 1024 if rss_peak else None,
            "rss_growth": (rss_peak - rss0) / 1024 if rss0 and rss_peak else None, "counts": last}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=100, help="simulated devices (default 100)")
    ap.add_argument("--reps", type=int, default=3, help="campaigns of each phase plan (default 3)")
    ap.add_argument("--size-mb", type=int, default=10, help="artifact size in MB (default 10)")
    ap.add_argument("--install-sec", type=float, default=1, help="simulated install time (default 1 s)")
    ap.add_argument("--no-bert", action="store_true", help="1024-byte blocks even where BERT is allowed")
    ap.add_argument("--timeout", type=float, default=900, help="give up on a campaign after this long (s)")
    opts = ap.parse_args()
    for path in (harness.CLOUDD, harness.TETHER, FLEET):
        if not os.access(path, os.X_OK):
            print(f"bench-campaign: {path} is not built (build, then 'make bench' for tests/bench/fleet)",
                  file=sys.stderr)
            return 77
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    load0 = os.getloadavg()
    print(f"# bench-campaign: {os.cpu_count()} cores, {os.uname().release}; load average at start "
          f"{load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}", flush=True)
    log_path = os.path.join(harness.BUILD, "tests", "bench", "bench-campaign.log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    runs = {name: [] for name in CONFIGS}
    ota_final = {}
    w = World()
    fleet = None
    try:
        # No [OTA] Port=: the devices fetch the artifact over their session.
        # Reports are events to the per-device limits; the simulated
        # devices wait out a 4.29 as the agent does.
        w.start_cloud(extra=f"""[OTA]
ArtifactDirectory={w.path('artifacts')}
[API]
RateLimitPerAddress=0
RateLimitPerToken=0
""")
        status, body = api(w, "GET", "/v1/campaigns")
        if status != 200:
            raise Unsupported(f"GET /v1/campaigns answers {status} {body.get('error', '')}: campaigns "
                              "(cloud/campaigns.c) are not in this build")
        key, pub = w.path("update.key"), w.path("keys", "update.pem")
        os.makedirs(os.path.dirname(pub))
        w.tether("ota", "keygen", key, pub)
        deb = make_deb(w, opts.size_mb)
        r = w.tether("ota", "upload", deb, timeout=120)
        print(f"# uploaded {os.path.getsize(deb)} bytes: {r.stdout.strip()}", flush=True)
        with open(log_path, "w") as log:
            ca, ca_key, certs = w.path("pki", "ca.crt"), w.path("pki", "ca.key"), w.path("fleet-certs")
            base = [FLEET, "--ca-cert", ca, "--ca-key", ca_key, "--cache", certs, "--devices", str(opts.devices)]
            subprocess.run(base + ["mint"], check=True, stdout=subprocess.DEVNULL, stderr=log)
            argv = base[:1] + ["--cloud", f"127.0.0.1:{w.coap_port}", "--ota", "--ota-install-sec",
                               str(opts.install_sec)] + (["--ota-no-bert"] if opts.no_bert else []) + base[1:]
            fleet = FleetProcess(argv + ["hold"], log)
            word, on = fleet.wait("online")
            if word != "online":
                raise harness.Failure(f"the fleet did not get online: {word} {on}")
            with open(os.path.join(certs, "index")) as f:
                ids = f.read().split()[:opts.devices]
            print(f"# {opts.devices} devices online in {on.get('seconds')} s", flush=True)
            for rep in range(opts.reps):
                for name, phases in CONFIGS.items():
                    res = run_campaign(w, opts, deb, key, ids, phases, fleet)
                    runs[name].append(res)
                    print(f"#   rep {rep + 1} phases {name}: {res['seconds']:.2f} s to 100 % committed, "
                          f"cloud CPU {res['cpu']:.2f} s, VmRSS peak {res['rss_peak']:.1f} MiB "
                          f"(+{res['rss_growth']:.1f}), {res['manifests']} manifests signed in "
                          f"{res['sign_seconds']:.2f} s", flush=True)
            fleet.command("ota")
            _, ota_final = fleet.wait("ota")
    except Unsupported as e:
        print(f"bench-campaign: cannot run against this cloud: {e}", file=sys.stderr)
        return 77
    finally:
        if fleet:
            fleet.close()
        w.close()
    load1 = os.getloadavg()
    print()
    print(f"{opts.devices} simulated devices, a {opts.size_mb} MB artifact over CoAP "
          f"({'1024-byte blocks' if opts.no_bert else 'BERT where allowed'}), install {opts.install_sec:g} s, "
          f"{opts.reps} campaigns of each plan, interleaved; min / median / max:")
    print()
    print("| phases | to 100 % committed (s) | cloud CPU (s) | cloud VmRSS peak (MiB) | VmRSS growth (MiB) |")
    print("|---|---|---|---|---|")
    for name in CONFIGS:
        rs = runs[name]
        print(f"| {name} | {mmm([r['seconds'] for r in rs])} | {mmm([r['cpu'] for r in rs])} | "
              f"{mmm([r['rss_peak'] for r in rs], '{:.1f}')} | {mmm([r['rss_growth'] for r in rs], '{:.1f}')} |")
    a, b = runs["1,10,50,100"], runs["100"]
    n = min(len(a), len(b))
    if n:
        diffs = [(a[i]["seconds"] - b[i]["seconds"]) / 3 for i in range(n)]
        print()
        print(f"Per-phase overhead ((1,10,50,100) − (100)) / 3 extra phases, paired by repetition: "
              f"{mmm(diffs)} s")
    if ota_final:
        print(f"Per device download (all runs): median {ota_final.get('download_median_ms', '?')} ms, "
              f"max {ota_final.get('download_max_ms', '?')} ms; {ota_final.get('bytes', '?')} bytes, "
              f"{ota_final.get('blocks', '?')} block requests, BERT downloads {ota_final.get('bert', '?')}, "
              f"report retries (4.29) {ota_final.get('report_retries', '?')}")
    print()
    print(f"Load average at start {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, "
          f"at end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}. Fleet log: {log_path}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except harness.Skip as e:
        print(f"bench-campaign: {e}", file=sys.stderr)
        sys.exit(77)
