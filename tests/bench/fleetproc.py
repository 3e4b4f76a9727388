# SPDX-License-Identifier: Apache-2.0
"""tests/bench/fleet as a child process driven over its stdin, for the
benchmark scripts (fleet-compare.py, bench-enroll.py, bench-reconnect.py):
it prints one result per line, "word key=value ...", and takes commands on
stdin. Also the small helpers those scripts share: a free loopback port,
waiting for a server's port, a process's CPU time, min / median / max,
and Bench (programs, PKI, certificates, a cloud's configuration)."""

import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port, proc, what, timeout=30):
    """Until something accepts on 127.0.0.1:port; exits if proc ends first
    or nothing listens within timeout seconds."""
    prog = os.path.basename(sys.argv[0])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{prog}: {what} exited ({proc.returncode})")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.02)
    sys.exit(f"{prog}: {what} does not listen on port {port}")


def cpu(pid):
    """utime+stime of pid in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def mmm(values, fmt="{:.2f}"):
    """"min / median / max" of the values that are not None, or "—"."""
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    return " / ".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


def fields(line):
    """The key=value fields of one result line of fleet."""
    return dict(f.split("=", 1) for f in line.split()[1:] if "=" in f)


class FleetProcess:
    """fleet started with argv, its stderr to log."""

    # Lines after which nothing more of what was asked will come.
    GIVE_UP = ("incomplete", "renew-incomplete")

    def __init__(self, argv, log):
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)

    def wait(self, *words):
        """The first line whose word is one of words (or a give-up line):
        (word, its fields); ("exited", {}) if fleet ended first."""
        for line in self.proc.stdout:
            word = line.split()[0] if line.split() else ""
            if word in words or word in self.GIVE_UP:
                return word, fields(line)
        return "exited", {}

    def command(self, text):
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def close(self):
        try:
            self.command("quit")
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Bench:
    """What a fleet benchmark needs, set up once: the build's programs
    (fleet, tether-cloudd, tether-pki, and those named in need), a raised
    descriptor limit, the PKI and device certificates cached in cache
    (default BUILD/tests/bench/fleet-cache, the first `mint` of them
    made), a scratch directory and an API token file. Exits 77 with the
    reason when a program is missing."""

    def __init__(self, prog, build, cache=None, devices=0, need=()):
        build = os.path.abspath(build)
        self.fleet = os.path.join(build, "tests", "bench", "fleet")
        self.cloudd = os.path.join(build, "cloud", "tether-cloudd")
        self.pki_tool = os.path.join(build, "tools", "tether-pki")
        self.extra = {n: os.path.join(build, *n.split("/")) for n in need}
        for p in [self.fleet, self.cloudd, self.pki_tool, *self.extra.values()]:
            if not os.access(p, os.X_OK):
                print(f"{prog}: {p} is missing: run 'make bench' in {build}", file=sys.stderr)
                sys.exit(77)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        cache = os.path.abspath(cache or os.path.join(build, "tests", "bench", "fleet-cache"))
        self.pki = os.path.join(cache, "pki")
        if not os.path.exists(os.path.join(self.pki, "server.crt")):
            os.makedirs(cache, exist_ok=True)
            subprocess.run([self.pki_tool, "ca", self.pki], check=True, capture_output=True)
            subprocess.run([self.pki_tool, "server", self.pki, "localhost", "127.0.0.1"], check=True,
                           capture_output=True)
        self.ca, self.ca_key = os.path.join(self.pki, "ca.crt"), os.path.join(self.pki, "ca.key")
        self.certs = os.path.join(cache, "devices")
        self.tmp = tempfile.mkdtemp(prefix=f"tether-{prog}-")
        self.tokens = os.path.join(self.tmp, "tokens")
        self.token = subprocess.run([self.pki_tool, "token", self.tokens], check=True, capture_output=True,
                                    text=True).stdout.split()[-1]
        if devices:
            subprocess.run([self.fleet, "--ca-cert", self.ca, "--ca-key", self.ca_key, "--cache", self.certs,
                            "--devices", str(devices), "mint"], check=True, stdout=subprocess.DEVNULL)

    def cloud_conf(self, path, coap, api, state, cloud="", api_extra=""):
        """Write a tether-cloudd configuration on loopback with this PKI;
        cloud and api_extra: more lines for [Cloud] and [API]."""
        with open(path, "w") as f:
            f.write(f"""[Cloud]
Listen=127.0.0.1
Port={coap}
CAFile={self.ca}
Certificate={self.pki}/server.crt
Key={self.pki}/server.key
{cloud}
[API]
Listen=127.0.0.1
Port={api}
TokenFile={self.tokens}
{api_extra}
[State]
Directory={state}
""")

    def fleet_argv(self, coap, devices, timeout, *extra):
        """fleet hold for devices against the cloud's CoAP port."""
        return [self.fleet, *extra, "--cloud", f"127.0.0.1:{coap}", "--server-name", "127.0.0.1", "--ca-cert",
                self.ca, "--ca-key", self.ca_key, "--cache", self.certs, "--devices", str(devices),
                "--timeout", str(timeout), "hold"]


def alternate(variants, reps, run, label):
    """run(v) for every variant in every repetition, the order reversed
    in every other one (so that a drift of the machine hits all alike);
    prints each result as it comes. {variant: [results]}."""
    runs = {v: [] for v in variants}
    for rep in range(reps):
        for v in (variants if rep % 2 == 0 else variants[::-1]):
            r = run(v)
            runs[v].append(r)
            print(f"# repetition {rep + 1}, {label(v)}: " +
                  ", ".join(f"{k} {x:.3f}" if isinstance(x, float) else f"{k} {x}" for k, x in r.items()),
                  flush=True)
    return runs


def print_table(title, runs, columns, rows):
    """A Markdown table: one column per (variant, heading) in columns, one
    row per (heading, key, format) in rows, each cell min / median / max
    of the runs' key; then the runs' errors and the load average."""
    print()
    print(f"| {title} | " + " | ".join(h for _, h in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for heading, key, fmt in rows:
        print(f"| {heading} | " + " | ".join(mmm([r.get(key) for r in runs[v]], fmt) for v, _ in columns) + " |")
    load = os.getloadavg()
    print(f"\n# load average at end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    for v, _ in columns:
        for r in runs[v]:
            if "error" in r:
                print(f"# {r['error']}")
