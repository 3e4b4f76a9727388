#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""bench-enroll: what enrollment and renewal cost, end to end
(docs/design/benchmarks.md, "Enrollment and renewal"). Three tables from
one run, each against a fresh tether-cloudd with an [Enroll] signer (the
built-in one, with the test PKI's CA):

(a) one agent: wall time of `tetherctl enroll --token T` (it returns once
    the agent is online with the certificate it got), and the time until
    the agent told the harness it is online; --reps repetitions, each a
    fresh agent with an empty state directory and no key; min / median /
    max;
(b) --devices simulated devices (tests/bench/fleet enroll) enrolling at
    once with one provisioning token of that many uses: time until all are
    online, enroll latency, requests, retries, refusals by code, the
    cloud's CPU time;
(c) --devices simulated devices holding sessions (fleet hold) all renew
    at once (POST /cert) while 4 HTTP clients keep calling a function on
    four of them (kept-alive connections): renew latency, failures by
    code, sessions dropped, calls made and failed meanwhile.

Figures, never pass/fail. Usage (after building, and `make bench` or
`make check` for tests/bench/fleet):

    top_builddir=$PWD/build top_srcdir=$PWD tests/bench/bench-enroll.py \\
        [--devices 1000] [--reps 20] [--fleet-reps 1] [--quick] [--only a,b,c]
"""

import argparse
import http.client
import os
import resource
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))
import harness  # noqa: E402
from harness import World  # noqa: E402
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fleetproc import FleetProcess, fields  # noqa: E402

FLEET = os.path.join(harness.BUILD, "tests", "bench", "fleet")


def mmm(values, fmt="{:.2f}"):
    """min / median / max, or the value when there is one."""
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    if len(values) == 1:
        return fmt.format(values[0])
    return " / ".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


def enroll_world():
    """A World whose cloud signs with its CA, API rate limits off (the
    callers of (c) are four clients on one address)."""
    w = World()
    w.start_cloud(extra=f"""[Enroll]
CACertificate={w.path('pki', 'ca.crt')}
CAKey={w.path('pki', 'ca.key')}
[API]
RateLimitPerAddress=0
RateLimitPerToken=0
""")
    return w


def provision(w, uses):
    """A provisioning token of `uses` uses: `tether provision create`
    prints it (the only line on stdout); POST /v1/provision where the CLI
    does not have the command."""
    r = w.tether("provision", "create", "--uses", str(uses), check=False)
    if r.returncode == 0 and r.stdout.strip():
        return r.stdout.strip().splitlines()[-1]
    status, body = harness.api_json(w, "POST", "/v1/provision", {"uses": uses})
    if status != 201:
        raise harness.Failure(f"cannot make a provisioning token: {status} {body}")
    return body["token"]


# --- (a) one agent -----------------------------------------------------------

def part_a(reps):
    w = enroll_world()
    runs = []
    try:
        token = provision(w, reps)
        for i in range(reps):
            name = f"agent{i}"
            devdir = w.path(f"{name}-identity")
            os.makedirs(devdir)
            conf = w.agent_conf(name, os.path.join(devdir, "device.crt"), os.path.join(devdir, "device.key"))
            a = w.run_agent(name, conf, (None, None, None), wait_online=False)
            harness.poll(lambda: os.path.exists(a.socket), 20, f"{name}'s local socket")
            mark = w.notify.mark()
            online = {}

            def watch(mark=mark, online=online):
                try:
                    w.notify.wait(lambda m: "X_TETHER_ONLINE" in m and m["X_TETHER_ONLINE"] not in ("", "0"),
                                  60, "the agent online", mark)
                    online["t"] = time.monotonic()
                except harness.Failure:
                    pass
            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            t0 = time.monotonic()
            r = w.tetherctl(a, "enroll", "--token", token, check=False, timeout=120)
            t1 = time.monotonic()
            watcher.join(harness.seconds(60))
            run = {"tetherctl": t1 - t0 if r.returncode == 0 else None,
                   "online": online["t"] - t0 if "t" in online else None,
                   "rc": r.returncode, "err": r.stderr.strip()}
            runs.append(run)
            print(f"#   (a) {i + 1}/{reps}: tetherctl {run['tetherctl'] or 0:.3f} s (exit {r.returncode}), "
                  f"online after {run['online'] or 0:.3f} s"
                  + (f"; {run['err']}" if r.returncode else ""), flush=True)
            a.stop()
            w.daemons.remove(a)
    finally:
        w.close()
    return runs


def table_a(runs):
    print()
    print(f"(a) `tetherctl enroll --token T` to online, one agent, {len(runs)} repetitions, each a fresh agent "
          "(no key, empty state)")
    print()
    print("| figure | min / median / max |")
    print("|---|---|")
    print(f"| tetherctl enroll, wall time until it returned (s) | "
          f"{mmm([r['tetherctl'] for r in runs], '{:.3f}')} |")
    print(f"| from tetherctl's start to the agent's notification 'online' (s) | "
          f"{mmm([r['online'] for r in runs], '{:.3f}')} |")
    failed = [r for r in runs if r["rc"] != 0]
    print(f"| failed | {len(failed)} of {len(runs)}"
          + (f" (first: {failed[0]['err'][:120]})" if failed else "") + " |")


# --- (b) a fleet enrolling at once --------------------------------------------

def part_b(opts, log):
    w = enroll_world()
    try:
        token = provision(w, opts.devices)
        r = subprocess.run([FLEET, "--cloud", f"127.0.0.1:{w.coap_port}", "--ca-cert", w.path("pki", "ca.crt"),
                            "--cache", w.path("fleet"), "--devices", str(opts.devices), "--timeout",
                            str(opts.timeout), "--cloud-pid", str(w.cloud.proc.pid), "enroll", token],
                           stdout=subprocess.PIPE, stderr=log, text=True, timeout=opts.timeout + 120)
        res = {}
        for line in r.stdout.splitlines():
            word = line.split()[0] if line.split() else ""
            if word in ("enrolled", "incomplete"):
                res = fields(line)
                res["word"] = word
        print(f"#   (b) {res.get('word', 'no result')}: {res.get('seconds', '?')} s, "
              f"{res.get('enrolled', '?')} enrolled, {res.get('requests', '?')} requests, "
              f"codes {res.get('codes', '?')}, cloud CPU {res.get('cloud_cpu', '?')} s", flush=True)
        return res
    finally:
        w.close()


def table_b(opts, runs):
    def col(key, conv=float):
        return [conv(r[key]) for r in runs if key in r]

    n = opts.devices
    done = [r for r in runs if r.get("word") == "enrolled"]
    print()
    print(f"(b) {n:,} simulated devices enrolling at once with one token of {n:,} uses, "
          f"{len(runs)} repetition(s)" + (" (min / median / max)" if len(runs) > 1 else ""))
    print()
    print("| figure | value |")
    print("|---|---|")
    print(f"| all online (enrolled, then connected with the certificate) (s) | "
          f"{mmm([float(r['seconds']) for r in done], '{:.2f}')}"
          + (f"; {len(runs) - len(done)} run(s) incomplete" if len(done) < len(runs) else "") + " |")
    for k, label in (("min", "min"), ("median", "median"), ("p99", "p99"), ("max", "max")):
        print(f"| enroll latency {label} (ms): first connect to 2.01 | {mmm(col(f'latency_{k}_ms'), '{:.1f}')} |")
    print(f"| enrolled / refused for good | {mmm(col('enrolled', int), '{:.0f}')} / "
          f"{mmm(col('gave_up', int), '{:.0f}')} |")
    print(f"| POST /enroll requests (retries after Max-Age) | {mmm(col('requests', int), '{:.0f}')} "
          f"({mmm(col('retries', int), '{:.0f}')}) |")
    print(f"| TLS connections (anonymous and with the certificate) | {mmm(col('attempts', int), '{:.0f}')} |")
    print("| failed connections: TLS / TCP / timeouts / closed early | "
          + " / ".join(mmm(col(k, int), '{:.0f}') for k in ("tls_failures", "tcp_failures", "timeouts",
                                                          "closed_early")) + " |")
    print(f"| answers 4.xx/5.xx by code | {'; '.join(r.get('codes', '?') for r in runs)} |")
    cpu = col("cloud_cpu")
    print(f"| cloud CPU, start to all online (s) | {mmm(cpu)} |")
    print(f"| cloud CPU per device (ms) | {mmm([c / n * 1e3 for c in cpu])} |")


# --- (c) a fleet renewing at once, calls going on -----------------------------

class Callers:
    """k threads, each calling `add 1,2` on its own device over one
    kept-alive HTTP connection, as fast as answers come; every call is
    recorded as (start, end, ok), monotonic seconds."""

    def __init__(self, api_port, token, devices):
        self.port, self.token = api_port, token
        self.calls = []
        self.lock = threading.Lock()
        self.stop_flag = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(d,), daemon=True) for d in devices]

    def run(self, device):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/x-www-form-urlencoded"}
        while not self.stop_flag.is_set():
            t0 = time.monotonic()
            ok = False
            try:
                conn.request("POST", f"/v1/devices/{device}/add", body="arg=1%2C2", headers=headers)
                resp = conn.getresponse()
                resp.read()
                ok = resp.status == 200
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            with self.lock:
                self.calls.append((t0, time.monotonic(), ok))
        conn.close()

    def start(self):
        for t in self.threads:
            t.start()

    def stop(self):
        self.stop_flag.set()
        for t in self.threads:
            t.join(60)

    def between(self, t0, t1):
        """The calls under way at any time in [t0, t1]."""
        with self.lock:
            return [c for c in self.calls if c[0] <= t1 and c[1] >= t0]

    def count(self):
        with self.lock:
            return len(self.calls)


def cloud_cpu(pid):
    """utime + stime of process pid (s), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def pct(values, q):
    if not values:
        return None
    v = sorted(values)
    return v[max(0, -(-len(v) * q // 100) - 1)]


def part_c(opts, log):
    w = enroll_world()
    res = {}
    try:
        ca, ca_key, certs = w.path("pki", "ca.crt"), w.path("pki", "ca.key"), w.path("fleet-certs")
        base = [FLEET, "--ca-cert", ca, "--ca-key", ca_key, "--cache", certs, "--devices", str(opts.devices)]
        # Certificates the cloud's CA signs, minted before anything is timed.
        subprocess.run(base + ["mint"], check=True, stdout=subprocess.DEVNULL, stderr=log)
        fleet = FleetProcess(base[:1] + ["--cloud", f"127.0.0.1:{w.coap_port}", "--timeout", str(opts.timeout),
                                  "--cloud-pid", str(w.cloud.proc.pid)] + base[1:] + ["hold"], log)
        try:
            word, on = fleet.wait("online")
            if word != "online":
                print(f"#   (c) the fleet did not get online: {word} {on}", flush=True)
                return res
            ids = open(os.path.join(certs, "index")).read().split()[:opts.devices]
            callers = Callers(w.api_port, w.token, ids[:4])
            callers.start()
            # Warm up: every caller has made calls before the renewal starts.
            harness.poll(lambda: callers.count() >= 200, 60, "the callers' first calls")
            cpu0 = cloud_cpu(w.cloud.proc.pid)
            time.sleep(1)
            t0 = time.monotonic()
            cpu1 = cloud_cpu(w.cloud.proc.pid)
            before = callers.between(t0 - 1, t0)
            fleet.command("renew")
            word, ren = fleet.wait("renewed")
            t1 = time.monotonic()
            callers.stop()  # the calls under way end first
            fleet.command("stats")
            _, stats = fleet.wait("stats")
            during = callers.between(t0, t1)
            res = dict(ren)
            res["word"] = word
            res["calls"] = len(during)
            res["calls_failed"] = sum(1 for c in during if not c[2])
            res["call_p50"] = pct([c[1] - c[0] for c in during], 50)
            res["call_p99"] = pct([c[1] - c[0] for c in during], 99)
            res["call_max"] = max((c[1] - c[0] for c in during), default=None)
            res["call_p50_before"] = pct([c[1] - c[0] for c in before], 50)
            res["calls_before"] = len(before)
            res["cloud_cpu_before"] = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None
            # The calls' share of the window's CPU, at the rate of the second before.
            if res["cloud_cpu_before"] is not None and before and "cloud_cpu" in res:
                res["cloud_cpu_renew"] = float(res["cloud_cpu"]) - res["cloud_cpu_before"] / len(before) * len(during)
            res["dropped_total"] = stats.get("dropped")
            print(f"#   (c) {word}: {ren.get('seconds', '?')} s, {ren.get('renewed', '?')} renewed, "
                  f"{ren.get('failed', '?')} failed, codes {ren.get('codes', '?')}, dropped {ren.get('dropped', '?')}; "
                  f"{res['calls']} calls meanwhile, {res['calls_failed']} failed", flush=True)
        finally:
            fleet.close()
    finally:
        w.close()
    return res


def table_c(opts, runs):
    def col(key, conv=float):
        return [conv(r[key]) for r in runs if r.get(key) is not None]

    def ms(key):
        return [r[key] * 1e3 for r in runs if r.get(key) is not None]

    n = opts.devices
    print()
    print(f"(c) {n:,} simulated devices renewing at once (POST /cert, new keys) while 4 kept-alive HTTP clients "
          f"call `add 1,2` on four of them; {len(runs)} repetition(s)"
          + (" (min / median / max)" if len(runs) > 1 else ""))
    print()
    print("| figure | value |")
    print("|---|---|")
    print(f"| all renewed (s): first request to last answer | {mmm(col('seconds'), '{:.2f}')} |")
    for k in ("min", "median", "p99", "max"):
        print(f"| renew latency {k} (ms) | {mmm(col(f'latency_{k}_ms'), '{:.1f}')} |")
    print(f"| renewed / failed | {mmm(col('renewed', int), '{:.0f}')} / {mmm(col('failed', int), '{:.0f}')} |")
    print(f"| POST /cert requests (retries after Max-Age) | {mmm(col('requests', int), '{:.0f}')} "
          f"({mmm(col('retries', int), '{:.0f}')}) |")
    print(f"| answers 4.xx/5.xx by code | {'; '.join(r.get('codes', '?') for r in runs)} |")
    print(f"| sessions dropped during the renewal (should be 0) | {mmm(col('dropped', int), '{:.0f}')} |")
    print(f"| cloud CPU during the renewal (s) | {mmm(col('cloud_cpu'))} |")
    print(f"| cloud CPU in the second before it, calls alone (s) | {mmm(col('cloud_cpu_before'))} |")
    print(f"| cloud CPU during the renewal less its calls at that rate (s; ms per renewal) | "
          f"{mmm(col('cloud_cpu_renew'))}; {mmm([c / n * 1e3 for c in col('cloud_cpu_renew')])} |")
    print(f"| calls under way during the renewal / failed (failed should be 0) | "
          f"{mmm(col('calls', int), '{:.0f}')} / {mmm(col('calls_failed', int), '{:.0f}')} |")
    print(f"| call p50 / p99 / max during the renewal (ms) | {mmm(ms('call_p50'), '{:.2f}')} / "
          f"{mmm(ms('call_p99'), '{:.2f}')} / {mmm(ms('call_max'), '{:.2f}')} |")
    print(f"| calls in the second before it; their p50 (ms) | {mmm(col('calls_before', int), '{:.0f}')}; "
          f"{mmm(ms('call_p50_before'), '{:.2f}')} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=1000, help="simulated devices of (b) and (c) (default 1000)")
    ap.add_argument("--reps", type=int, default=20, help="repetitions of (a) (default 20)")
    ap.add_argument("--fleet-reps", type=int, default=1, help="repetitions of (b) and (c) (default 1)")
    ap.add_argument("--quick", action="store_true", help="200 devices, 5 repetitions of (a)")
    ap.add_argument("--only", default="a,b,c", help="the parts to run, e.g. 'b,c' (default: all)")
    ap.add_argument("--timeout", type=float, default=600, help="give up on a fleet run after this long (s)")
    opts = ap.parse_args()
    if opts.quick:
        opts.devices = min(opts.devices, 200)
        opts.reps = min(opts.reps, 5)
    parts = set(opts.only.split(","))
    for path in (harness.TETHERD, harness.CLOUDD, harness.TETHER, harness.TETHERCTL, harness.PKI, FLEET):
        if not os.access(path, os.X_OK):
            print(f"bench-enroll: {path} is not built (build, then 'make bench' for tests/bench/fleet)",
                  file=sys.stderr)
            return 77
    # The cloud and the fleet workers inherit this: a socket per device.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    load0 = os.getloadavg()
    print(f"# bench-enroll: {os.cpu_count()} cores, {os.uname().release}; load average at start "
          f"{load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}", flush=True)
    log_path = os.path.join(harness.BUILD, "tests", "bench", "bench-enroll.log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    a = b = c = None
    with open(log_path, "w") as log:
        if "a" in parts:
            print(f"# (a) {opts.reps} agents enrolling one after the other", flush=True)
            a = part_a(opts.reps)
        if "b" in parts:
            b = []
            for rep in range(opts.fleet_reps):
                print(f"# (b) repetition {rep + 1}: {opts.devices} devices enrolling at once", flush=True)
                b.append(part_b(opts, log))
        if "c" in parts:
            c = []
            for rep in range(opts.fleet_reps):
                print(f"# (c) repetition {rep + 1}: {opts.devices} devices renewing at once", flush=True)
                c.append(part_c(opts, log))
    load1 = os.getloadavg()
    if a is not None:
        table_a(a)
    if b is not None:
        table_b(opts, b)
    if c is not None:
        table_c(opts, c)
    print()
    print(f"Load average at start {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, "
          f"at end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}. Fleet log: {log_path}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except harness.Skip as e:
        print(f"bench-enroll: {e}", file=sys.stderr)
        sys.exit(77)
