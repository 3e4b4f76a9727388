#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""fleet-compare: tether-cloudd beside Mosquitto holding the same N TLS
clients, in one run (docs/design/benchmarks.md). tests/bench/fleet plays the
devices (the same certificates for both); each repetition starts a fresh
tether-cloudd and a fresh Mosquitto (TLS, require_certificate) on free
ports, interleaved, and measures:

- the connect storm: all N started at once, seconds until every one is
  online (the cloud fetched its describe data / the broker sent CONNACK),
  with the attempts, failed handshakes, timeouts and early closes;
- memory per connected device: VmRSS and RssAnon of the server with N
  connected minus the same of the idle process, divided by N, read
  SETTLE_SEC after all were online (for tether-cloudd, once it has also
  counted the trim it makes 2 s after connections stop coming,
  tether_cloud_memory_trims_total);
- tether only: calls/s with 4 concurrent kept-alive HTTP clients (four
  tests/bench/bench-call at once, each calling its own device) and call
  p50/p99 with one client (bench-call), N devices connected;
- events/s from all devices to one subscriber (tether: an HTTP event
  stream; Mosquitto: a client on '#'), loss counted (events the devices
  sent and the server did not refuse, minus events the subscriber saw),
  the rate raised step by step until something is lost; devices publish
  at QoS 1 (a receipt each, like tether's 2.01), the subscriber takes
  QoS 0 (--qos), like an event stream without per-event acknowledgement;
- one device's call median beside MQTT v5 request/response through
  Mosquitto (tests/bench/compare-call.sh).

Prints a Markdown table; figures, never pass/fail. Needs `make bench` and
mosquitto. Usage:

    tests/bench/fleet-compare.py [--devices 1000] [--reps 3] [--build build]
"""

import argparse
import http.client
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fleetproc import FleetProcess, cpu, free_port, mmm, wait_port  # noqa: E402

TOP = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


# Seconds between "all online" and reading a server's memory: past the
# cloud's trim after a storm (2 s without connections coming or going).
SETTLE_SEC = 4


def wait_trim(api, token, timeout=20):
    """Until tether-cloudd's /metrics counts a memory trim (or timeout s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            c = http.client.HTTPConnection("127.0.0.1", api, timeout=10)
            c.request("GET", "/metrics", headers={"Authorization": f"Bearer {token}"})
            text = c.getresponse().read().decode()
            c.close()
            m = re.search(r"^tether_cloud_memory_trims_total (\d+)$", text, re.M)
            if m and int(m[1]) >= 1:
                return True
        except OSError:
            pass
        time.sleep(0.2)
    print("#   tether: no memory trim counted; memory read without it", flush=True)
    return False


def memory(pid):
    """VmRSS and RssAnon in KiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon"):
                out[k] = int(v.split()[0])
    return out


class Fleet(FleetProcess):
    """tests/bench/fleet in hold mode, driven over stdin."""

    def __init__(self, opts, endpoint, log):
        argv = [opts.fleet, *endpoint, "--server-name", "127.0.0.1", "--ca-cert", opts.ca, "--ca-key", opts.ca_key,
                "--cache", opts.certs, "--devices", str(opts.devices), "--timeout", str(opts.timeout), "hold"]
        if opts.workers:
            argv[1:1] = ["--workers", str(opts.workers)]
        super().__init__(argv, log)


class Counter:
    """Counts what a subscriber received, read from a thread."""

    def __init__(self):
        self.n = 0
        self.closed = False
        self.cond = threading.Condition()

    def add(self, k=1):
        with self.cond:
            self.n += k
            self.cond.notify_all()

    def settle(self, start, expected, quiet=2.0, limit=30.0):
        """Wait until start+expected arrived, or nothing came for `quiet` s."""
        deadline = time.monotonic() + limit
        with self.cond:
            last, last_change = self.n, time.monotonic()
            while self.n - start < expected and not self.closed:
                now = time.monotonic()
                if now - last_change > quiet or now > deadline:
                    break
                self.cond.wait(0.1)
                if self.n != last:
                    last, last_change = self.n, time.monotonic()
            return self.n - start


def sse_subscribe(api_port, token, counter):
    """Count the events of an HTTP event stream (chunked), in a thread."""
    sock = socket.create_connection(("127.0.0.1", api_port))
    sock.sendall(f"GET /v1/events/fleet HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
                 "Accept: text/event-stream\r\n\r\n".encode())

    def run():
        raw, text, head = b"", b"", True
        try:
            while True:
                data = sock.recv(1 << 16)
                if not data:
                    break
                raw += data
                if head:
                    if b"\r\n\r\n" not in raw:
                        continue
                    status, raw = raw.split(b"\r\n\r\n", 1)
                    if b" 200 " not in status.split(b"\r\n")[0]:
                        print(f"# event stream refused: {status[:80]!r}", flush=True)
                        break
                    head = False
                # Undo the chunked encoding, then count "event:" lines.
                while True:
                    i = raw.find(b"\r\n")
                    if i < 0:
                        break
                    size = int(raw[:i].split(b";")[0] or b"0", 16)
                    if len(raw) < i + 2 + size + 2:
                        break
                    text += raw[i + 2:i + 2 + size]
                    raw = raw[i + 2 + size + 2:]
                lines = text.split(b"\n")
                text = lines.pop()
                k = sum(1 for line in lines if line.startswith(b"event:"))
                if k:
                    counter.add(k)
        except OSError:
            pass
        counter.closed = True
        with counter.cond:
            counter.cond.notify_all()
    threading.Thread(target=run, daemon=True).start()
    return sock


def mqtt_subscribe(opts, port, counter, log):
    p = subprocess.Popen([opts.fleet, "--mqtt", f"127.0.0.1:{port}", "--ca-cert", opts.ca, "--ca-key", opts.ca_key,
                          "--cache", opts.certs, "--first", str(opts.devices), "--qos", str(opts.qos), "subscribe"],
                         stdout=subprocess.PIPE, stderr=log, text=True)
    ready = threading.Event()

    def run():
        for line in p.stdout:
            if line.startswith("subscribed"):
                ready.set()
            m = re.match(r"received count=(\d+)", line)
            if m:
                with counter.cond:
                    counter.n = int(m.group(1))
                    counter.cond.notify_all()
        counter.closed = True
        ready.set()
    threading.Thread(target=run, daemon=True).start()
    ready.wait(30)
    return p


def event_ladder(opts, fleet, counter):
    """Raise the rate until the subscriber misses something. [(rate, acked, received, lost)]."""
    steps = []
    for rate in opts.rates:
        start = counter.n
        fleet.command(f"publish {rate} {opts.seconds}")
        word, pub = fleet.wait("published")
        if word != "published":
            break
        # What the cloud did not refuse is what the subscriber must see.
        # Not the receipts the devices counted: libcoap 4.3.1 loses a few
        # of them on the device side (docs/design/benchmarks.md).
        sent, acked = int(pub["sent"]), int(pub["acked"])
        due = sent - int(pub["errors"])
        got = counter.settle(start, due)
        steps.append((rate, sent, due, got, due - got))
        print(f"#   {rate}/s: offered {rate * opts.seconds:.0f}, sent {sent}, receipts counted {acked}, "
              f"refused {pub['errors']}, received {got}, lost {due - got}"
              f"{' (stream closed)' if counter.closed else ''}", flush=True)
        if acked - got > 0 or counter.closed or int(pub["sent"]) < 0.99 * rate * opts.seconds:
            break
    return steps


def bench_call(opts, api_port, token, device, n):
    r = subprocess.run([opts.bench_call, "--api", f"http://127.0.0.1:{api_port}", "--token", token,
                        "--device", device, "--function", "add", "--arg", "1,2", "-n", str(n), "--reps", "1",
                        "--warmup", "100"], capture_output=True, text=True)
    for line in r.stdout.splitlines():
        f = line.split()
        if f and f[0] == "all" and f[1] != "-":
            return {"median": float(f[1]), "p99": float(f[3]), "rate": float(f[5]), "errors": int(f[6])}
    return None


def run_tether(opts, tmp, rep, log, cloudd=None):
    coap, api = free_port(), free_port()
    state = os.path.join(tmp, f"cloud-state-{rep}")
    conf = os.path.join(tmp, "cloud.conf")
    with open(conf, "w") as f:
        f.write(f"""[Cloud]
Listen=127.0.0.1
Port={coap}
CAFile={opts.ca}
Certificate={opts.pki}/server.crt
Key={opts.pki}/server.key
[API]
Listen=127.0.0.1
Port={api}
TokenFile={opts.tokens}
# The benchmark measures the cloud, not its API rate limits (calls go
# back to back from one address, thousands a second).
RateLimitPerAddress=0
RateLimitPerToken=0
[State]
Directory={state}
[Events]
JournalMaxBytes=2147483648
""")
    cloud = subprocess.Popen([cloudd or opts.cloudd, "--config", conf], stderr=log, stdout=log,
                             env=dict(os.environ, TETHER_LOG_LEVEL="warning"))
    res = {}
    try:
        wait_port(api, cloud, "tether-cloudd")
        idle = memory(cloud.pid)
        t_cpu0 = cpu(cloud.pid)
        fleet = Fleet(opts, ["--cloud", f"127.0.0.1:{coap}"], log)
        word, on = fleet.wait("online")
        res["cpu"] = cpu(cloud.pid) - t_cpu0
        res["storm"] = on
        if word != "online":
            print(f"#   tether: storm incomplete: {on}", flush=True)
            return res
        time.sleep(SETTLE_SEC)
        wait_trim(api, opts.token)
        held = memory(cloud.pid)
        res["mem"] = {k: (held[k] - idle[k]) / opts.devices for k in held}
        ids = open(os.path.join(opts.certs, "index")).read().split()[:opts.devices]
        one = bench_call(opts, api, opts.token, ids[0], opts.calls)
        res["one"] = one
        # Four clients at once, each on its own device.
        with_four = []
        procs = [threading.Thread(target=lambda d=d: with_four.append(bench_call(opts, api, opts.token, d,
                                                                                   opts.calls)))
                 for d in ids[1:5]]
        for t in procs:
            t.start()
        for t in procs:
            t.join()
        res["four"] = sum(r["rate"] for r in with_four if r) if all(with_four) else None
        counter = Counter()
        conn = sse_subscribe(api, opts.token, counter)
        res["events"] = event_ladder(opts, fleet, counter)
        conn.close()
        fleet.command("stats")
        res["final"] = fleet.wait("stats")[1]
        fleet.close()
    finally:
        cloud.terminate()
        cloud.wait()
        shutil.rmtree(state, ignore_errors=True)
    return res


def run_mosquitto(opts, tmp, rep, log):
    port = free_port()
    conf = os.path.join(tmp, "mosquitto.conf")
    with open(conf, "w") as f:
        f.write(f"""listener {port} 127.0.0.1
cafile {opts.ca}
certfile {opts.pki}/server.crt
keyfile {opts.pki}/server.key
require_certificate true
set_tcp_nodelay true
persistence false
allow_anonymous true
max_connections -1
log_dest none
""" + ("user root\n" if os.geteuid() == 0 else ""))
    broker = subprocess.Popen([opts.mosquitto, "-c", conf], stderr=log, stdout=log)
    res = {}
    try:
        wait_port(port, broker, "mosquitto")
        idle = memory(broker.pid)
        t_cpu0 = cpu(broker.pid)
        fleet = Fleet(opts, ["--mqtt", f"127.0.0.1:{port}"], log)
        word, on = fleet.wait("online")
        res["cpu"] = cpu(broker.pid) - t_cpu0
        res["storm"] = on
        if word != "online":
            print(f"#   mosquitto: storm incomplete: {on}", flush=True)
            return res
        time.sleep(SETTLE_SEC)
        held = memory(broker.pid)
        res["mem"] = {k: (held[k] - idle[k]) / opts.devices for k in held}
        counter = Counter()
        sub = mqtt_subscribe(opts, port, counter, log)
        res["events"] = event_ladder(opts, fleet, counter)
        sub.terminate()
        sub.wait()
        fleet.close()
    finally:
        broker.terminate()
        broker.wait()
    return res


def storm_cell(runs):
    times = [float(r["storm"]["seconds"]) for r in runs if r.get("storm") and "seconds" in r["storm"]
             and r["storm"].get("ever_online") == r["storm"].get("devices")]
    if not times:
        return "did not complete"
    att = [int(r["storm"]["attempts"]) for r in runs if r.get("storm")]
    fails = sum(int(r["storm"][k]) for r in runs if r.get("storm")
                for k in ("tls_failures", "tcp_failures", "timeouts", "closed_early"))
    return (f"{mmm(times)} s; {min(att)}–{max(att)} attempts, "
            + ("no failure" if fails == 0 else
               "failures: " + ", ".join(f"{k} {sum(int(r['storm'][k]) for r in runs if r.get('storm'))}"
                                         for k in ("tls_failures", "tcp_failures", "timeouts", "closed_early"))))


def events_cell(runs, seconds):
    best = []
    first_loss = []
    for r in runs:
        steps = r.get("events") or []
        ok = [s[0] for s in steps if s[4] == 0 and s[1] >= 0.99 * s[0] * seconds]
        best.append(max(ok) if ok else 0)
        lossy = [s for s in steps if s[4] > 0]
        if lossy:
            first_loss.append(f"{lossy[0][0]}/s: {lossy[0][4]} of {lossy[0][2]} lost")
    cell = mmm(best, "{:.0f}")
    if first_loss:
        cell += "; " + "; ".join(first_loss)
    return cell


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--build", default=os.path.join(TOP, "build"))
    ap.add_argument("--workers", type=int, default=0, help="fleet worker processes (default: cores)")
    ap.add_argument("--rates", default="1000,2000,4000,8000,16000,32000",
                    help="event rates to try, ascending (events/s over all devices)")
    ap.add_argument("--seconds", type=float, default=5, help="seconds per event rate")
    ap.add_argument("--calls", type=int, default=2000, help="calls per bench-call run")
    ap.add_argument("--timeout", type=float, default=600, help="give up on a storm after this long")
    ap.add_argument("--cache", help="PKI and device certificates, kept between runs "
                    "(default: BUILD/tests/bench/fleet-cache)")
    ap.add_argument("--qos", type=int, choices=(0, 1), default=0,
                    help="QoS of the Mosquitto subscriber (default 0: like an event stream, no per-message ack)")
    ap.add_argument("--no-compare-call", action="store_true", help="skip the one-device comparison")
    ap.add_argument("--before", metavar="CLOUDD",
                    help="also run this tether-cloudd binary (an older build) in each repetition, "
                         "for a before/after column")
    opts = ap.parse_args()
    opts.rates = [int(r) for r in opts.rates.split(",")]
    build = os.path.abspath(opts.build)
    opts.fleet = os.path.join(build, "tests", "bench", "fleet")
    opts.bench_call = os.path.join(build, "tests", "bench", "bench-call")
    opts.cloudd = os.path.join(build, "cloud", "tether-cloudd")
    pki = os.path.join(build, "tools", "tether-pki")
    opts.mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    for p in (opts.fleet, opts.bench_call, opts.cloudd, pki):
        if not os.access(p, os.X_OK):
            print(f"fleet-compare: {p} is missing: run 'make bench' in {build}", file=sys.stderr)
            return 77
    if not os.access(opts.mosquitto, os.X_OK):
        print("fleet-compare: needs mosquitto (apt-get install mosquitto)", file=sys.stderr)
        return 77
    # Every server and fleet worker inherits this: N sockets each.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    cache = os.path.abspath(opts.cache or os.path.join(build, "tests", "bench", "fleet-cache"))
    opts.pki = os.path.join(cache, "pki")
    if not os.path.exists(os.path.join(opts.pki, "server.crt")):
        os.makedirs(cache, exist_ok=True)
        subprocess.run([pki, "ca", opts.pki], check=True, capture_output=True)
        subprocess.run([pki, "server", opts.pki, "localhost", "127.0.0.1"], check=True, capture_output=True)
    opts.ca, opts.ca_key = os.path.join(opts.pki, "ca.crt"), os.path.join(opts.pki, "ca.key")
    opts.certs = os.path.join(cache, "devices")
    tmp = tempfile.mkdtemp(prefix="tether-fleet-")
    opts.tokens = os.path.join(tmp, "tokens")
    opts.token = subprocess.run([pki, "token", opts.tokens], check=True, capture_output=True,
                                text=True).stdout.split()[-1]
    load0 = os.getloadavg()
    log_path = os.path.join(tmp, "servers.log")
    log = open(log_path, "w")
    print(f"# fleet-compare: {opts.devices} devices, {opts.reps} interleaved repetitions; "
          f"{os.cpu_count()} cores, {os.uname().release}; load average at start "
          f"{load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}", flush=True)
    # The certificates first (minted once, then cached), outside any timing.
    subprocess.run([opts.fleet, "--ca-cert", opts.ca, "--ca-key", opts.ca_key, "--cache", opts.certs,
                    "--devices", str(opts.devices + 1), "mint"], check=True, stdout=subprocess.DEVNULL)
    tether, mosq, before = [], [], []
    try:
        for rep in range(opts.reps):
            order = [("tether", run_tether, tether), ("mosquitto", run_mosquitto, mosq)]
            if opts.before:
                order.insert(1, ("tether before", lambda o, t, r, lg: run_tether(o, t, r, lg, opts.before),
                                 before))
            if rep % 2:
                order.reverse()
            for name, fn, results in order:
                print(f"# repetition {rep + 1}: {name}", flush=True)
                r = fn(opts, tmp, rep, log)
                results.append(r)
                st = r.get("storm", {})
                print(f"#   storm: {st.get('seconds', '?')} s, {st.get('attempts', '?')} attempts, "
                      f"TLS failures {st.get('tls_failures', '?')}, timeouts {st.get('timeouts', '?')}; "
                      f"server CPU {r.get('cpu', 0):.2f} s; memory/device "
                      + ", ".join(f"{k} {v:.1f} KiB" for k, v in r.get("mem", {}).items()), flush=True)
        compare = None
        if not opts.no_compare_call:
            print("# one device: tests/bench/compare-call.sh", flush=True)
            cc = subprocess.run(["bash", os.path.join(TOP, "tests", "bench", "compare-call.sh"), build,
                                 str(opts.reps), str(opts.calls)], capture_output=True, text=True)
            compare = cc.stdout
    finally:
        log.close()
    load1 = os.getloadavg()

    n = opts.devices
    # The optional "before" column sits between tether and Mosquitto.
    def row(label, cur, mq, old=None):
        print(f"| {label} | {cur} | " + (f"{old} | " if opts.before else "") + f"{mq} |")

    def calls(runs):
        one = [r.get("one") for r in runs if r.get("one")]
        return (f"p50 {mmm([o['median'] for o in one], '{:.3f}')}; "
                f"p99 {mmm([o['p99'] for o in one], '{:.3f}')}")

    print()
    row("figure", f"tether, {n:,} devices", f"Mosquitto, {n:,} clients", f"tether before, {n:,} devices")
    print("|---|---|---|" + ("---|" if opts.before else ""))
    row("all online after starting at once (min / median / max)", storm_cell(tether), storm_cell(mosq),
        storm_cell(before))
    row("server CPU during the storm (s)", mmm([r.get('cpu') for r in tether]), mmm([r.get('cpu') for r in mosq]),
        mmm([r.get('cpu') for r in before]))
    for k in ("VmRSS", "RssAnon"):
        row(f"memory per connected device, {k} (KiB)", mmm([r.get('mem', {}).get(k) for r in tether], '{:.1f}'),
            mmm([r.get('mem', {}).get(k) for r in mosq], '{:.1f}'),
            mmm([r.get('mem', {}).get(k) for r in before], '{:.1f}'))
    row(f"call p50 / p99 (ms), one kept-alive HTTP client, {n:,} connected", calls(tether), "—", calls(before))
    row("calls/s, 4 concurrent HTTP clients", mmm([r.get('four') for r in tether], '{:.0f}'), "—",
        mmm([r.get('four') for r in before], '{:.0f}'))
    row("events/s from all devices to one subscriber, nothing lost", events_cell(tether, opts.seconds),
        events_cell(mosq, opts.seconds), events_cell(before, opts.seconds))
    if compare:
        med = {}
        for line in compare.splitlines():
            m = re.match(r"(tether call|MQTT v5 req/resp via Mosquitto, QoS (\d)).*median ([\d.]+) ms, p99 ([\d.]+)",
                         line)
            if m:
                key = "tether" if m.group(1) == "tether call" else f"QoS {m.group(2)}"
                med.setdefault(key, []).append(float(m.group(3)))
        print(f"| one device: call median (ms), compare-call.sh | {mmm(med.get('tether', []), '{:.3f}')} "
              f"| MQTT v5 request/response QoS 0: {mmm(med.get('QoS 0', []), '{:.3f}')}; "
              f"QoS 1: {mmm(med.get('QoS 1', []), '{:.3f}')} |")
    print()
    print(f"Load average at start {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, "
          f"at end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}. Server logs: {log_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
