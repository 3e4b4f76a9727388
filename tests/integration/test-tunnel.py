#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""tether tunnel through the real cloud and agent (docs/cli.md, docs/cloud.md,
docs/protocol.md "Streams: tunnels and logs"): echo round trips through
--listen, scp of 100 MB to a test sshd through --stdio as ssh's
ProxyCommand over an HTTP API (the upgrade transport) and an HTTPS one (the
split transport), the split transport forced over HTTP, clear refusals (target not allowed, tunnels off, scopes,
MaxStreams), the reason a tunnel ended (device reconnect, idle), events
and audit records, and the latency of calls while a tunnel saturates the
device's connection."""

import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import EMULATOR, TETHER, Failure, Skip, api_json, expect, poll, seconds, run, whole_seconds  # noqa: E402
from fakedev import memory_checks  # noqa: E402

DEV_TARGET_OFF = "127.0.0.1:1"  # never allowed


class EchoServer:
    """A TCP echo server on the device's side."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.clients = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.clients.append(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        try:
            while True:
                d = c.recv(65536)
                if not d:
                    break
                c.sendall(d)
            c.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            c.close()

    def close(self):
        self.sock.close()
        with self.lock:
            for c in self.clients:
                try:
                    c.close()
                except OSError:
                    pass


class TunnelCli:
    """tether tunnel DEV TARGET --listen 127.0.0.1:0, its stderr collected."""

    def __init__(self, w, dev, target, token=None, prefix=(), api=None, cacert=None, transport=None):
        env = dict(os.environ, TETHER_API=api or w.api, TETHER_TOKEN=token or w.token)
        if cacert:
            env["TETHER_CACERT"] = cacert
        more = ["--transport", transport] if transport else []
        self.proc = subprocess.Popen([*prefix, *EMULATOR, TETHER, "tunnel", dev, target, "--listen", "127.0.0.1:0",
                                      *more],
                                     env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        self.lines = []
        self.eof = False
        self.cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        w.cleanups.append(self.close)
        line = self.wait(r"listening on 127\.0\.0\.1:(\d+) -> " + re.escape(f"{dev} {target}"))
        self.port = int(re.search(r"127\.0\.0\.1:(\d+) ->", line).group(1))

    def _read(self):
        for raw in self.proc.stderr:
            with self.cond:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self.cond.notify_all()
        with self.cond:
            self.eof = True
            self.cond.notify_all()

    def wait(self, pattern, timeout=10, start=0):
        deadline = time.monotonic() + seconds(timeout)
        with self.cond:
            while True:
                for line in self.lines[start:]:
                    if re.search(pattern, line):
                        return line
                if self.eof:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(min(left, 0.5))
        raise Failure(f"tether tunnel did not print /{pattern}/: {self.lines}")

    def mark(self):
        with self.cond:
            return len(self.lines)

    def connect(self):
        s = socket.create_connection(("127.0.0.1", self.port), timeout=seconds(20))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(seconds(10))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise Failure("tether tunnel did not exit on SIGTERM")
        return self.proc.returncode


def event_data(ev):
    d = ev.get("data")
    if isinstance(d, str):
        try:
            d = json.loads(d)
        except ValueError:
            return {}
    return d if isinstance(d, dict) else {}


def recv_all(s):
    data = b""
    while True:
        d = s.recv(65536)
        if not d:
            return data
        data += d


def echo_round_trip(cli, payload):
    s = cli.connect()
    got = bytearray()

    def reader():
        got.extend(recv_all(s))

    th = threading.Thread(target=reader)
    th.start()
    s.sendall(payload)
    s.shutdown(socket.SHUT_WR)
    th.join(seconds(60))
    s.close()
    return bytes(got)


def start(w, allow, extra="", cloud_extra=""):
    w.start_cloud(extra="[Tunnel]\nIdleSec=900\n" + cloud_extra)
    return w.start_agent(extra=f"[Tunnel]\nAllow={allow}\n{extra}")


def test_echo_events_audit(w):
    echo = EchoServer()
    w.cleanups.append(echo.close)
    a = start(w, f"127.0.0.1:{echo.port}")
    dev = a.device_id
    sub = w.subscribe("tether/tunnel/", "--device", dev).wait_ready()
    cli = TunnelCli(w, dev, f"127.0.0.1:{echo.port}")

    expect(echo_round_trip(cli, b"ping") == b"ping", "one echo")
    closed = cli.wait(r"tunnel \d+ closed")
    expect(re.search(r"\(4 bytes in, 4 out\)", closed), f"closed line: {closed}")
    sid = int(re.search(r"tunnel (\d+) closed", closed).group(1))
    # A megabyte each way, and three at once.
    big = os.urandom(1 << 20)
    expect(echo_round_trip(cli, big) == big, "1 MB echo differs")
    results = [None] * 3
    ths = [threading.Thread(target=lambda i=i: results.__setitem__(i, echo_round_trip(cli, big[:300000] + bytes([i]))))
           for i in range(3)]
    for th in ths:
        th.start()
    for th in ths:
        th.join(seconds(60))
    expect(all(results[i] == big[:300000] + bytes([i]) for i in range(3)), "concurrent echoes differ")

    opened = sub.wait(lambda e: e.get("name") == "tether/tunnel/opened" and event_data(e).get("stream") == sid,
                      what="tether/tunnel/opened")
    ev = sub.wait(lambda e: e.get("name") == "tether/tunnel/closed" and event_data(e).get("stream") == sid,
                  what="tether/tunnel/closed of the first tunnel")
    data = event_data(ev)
    expect(data.get("target") == f"127.0.0.1:{echo.port}" and data.get("token") and data.get("bytes_out") == 4
           and "reason" in data and "stream" in data, f"closed event: {data}")
    expect(data.get("bytes_in") == 4, f"closed event: {data}")
    expect(event_data(opened).get("token") == data["token"], f"opened event: {opened}")
    def audited():
        status, recs = api_json(w, "GET", "/v1/audit?action=tunnel.")
        expect(status == 200, f"audit: {status} {recs}")
        actions = [r["action"] for r in recs]
        return recs if actions.count("tunnel.open") == 5 and actions.count("tunnel.close") == 5 else None

    recs = poll(audited, 10, "5 tunnel.open and 5 tunnel.close audit records")
    expect(all(r["actor"].startswith("token:") and r["target"] == dev for r in recs), f"audit records: {recs}")
    expect(cli.close() == 0, "tether tunnel exit status after SIGTERM")


def test_refusals(w):
    echo = EchoServer()
    w.cleanups.append(echo.close)
    a = start(w, f"127.0.0.1:{echo.port}")
    dev = a.device_id
    target = f"127.0.0.1:{echo.port}"

    r = w.tether("tunnel", dev, DEV_TARGET_OFF, "--stdio", check=False)
    expect(r.returncode == 1 and f"tether: tunnel to {DEV_TARGET_OFF} on {dev} refused: target {DEV_TARGET_OFF} "
           "is not in [Tunnel] Allow=" in r.stderr, f"not allowed: {r.returncode} {r.stderr!r}")
    # --listen keeps serving after a refusal.
    cli = TunnelCli(w, dev, DEV_TARGET_OFF)
    s = cli.connect()
    expect(recv_all(s) == b"", "a refused connection got data")
    cli.wait(r"refused: target .* is not in \[Tunnel\] Allow=")
    s = cli.connect()
    expect(recv_all(s) == b"", "a refused connection got data")
    expect(cli.proc.poll() is None, "tether tunnel --listen exited after a refusal")

    # Scopes: without tunnels:open, 403; a token for another device: refused.
    status, tok = api_json(w, "POST", "/v1/tokens", {"scopes": ["devices:read", "functions:call"]})
    expect(status == 200, f"token: {status} {tok}")
    r = w.tether("tunnel", dev, target, "--stdio", check=False, token=tok["token"])
    expect(r.returncode == 1 and "refused" in r.stderr and "tunnels:open" in r.stderr,
           f"without the scope: {r.returncode} {r.stderr!r}")
    other = w.new_device()[0]
    status, tok = api_json(w, "POST", "/v1/tokens", {"scopes": ["tunnels:open"], "devices": [other]})
    expect(status == 200, f"token: {status} {tok}")
    r = w.tether("tunnel", dev, target, "--stdio", check=False, token=tok["token"])
    expect(r.returncode == 1 and "refused" in r.stderr, f"other device's token: {r.returncode} {r.stderr!r}")
    # The right scope works (stdin at its end: the tunnel ends at once).
    status, tok = api_json(w, "POST", "/v1/tokens", {"scopes": ["tunnels:open", "devices:read"], "devices": [dev]})
    r = subprocess.run(EMULATOR + [TETHER, "tunnel", dev, target, "--stdio"], input=b"hi", capture_output=True,
                       env=dict(os.environ, TETHER_API=w.api, TETHER_TOKEN=tok["token"]), timeout=seconds(30))
    expect(r.returncode == 0 and r.stdout == b"hi", f"with the scope: {r.returncode} {r.stdout!r} {r.stderr!r}")

    # Unknown device, offline device.
    r = w.tether("tunnel", other, target, "--stdio", check=False)
    expect(r.returncode == 1 and "refused" in r.stderr, f"unknown device: {r.returncode} {r.stderr!r}")
    a.stop()
    r = w.tether("tunnel", dev, target, "--stdio", check=False)
    expect(r.returncode == 1 and "refused" in r.stderr, f"offline device: {r.returncode} {r.stderr!r}")


def start_https_cloud(w, allow):
    w.start_cloud(extra=f"[API]\nCertificate={w.path('pki', 'server.crt')}\nKey={w.path('pki', 'server.key')}\n")
    a = w.start_agent(extra=f"[Tunnel]\nAllow={allow}\n")
    return a, f"https://127.0.0.1:{w.api_port}", w.path("pki", "ca.crt")


def test_https(w):
    """Over an HTTPS API the split transport by default: an echo round
    trip, the end of the local input passed on as the end of the up
    request (the echo answers, then ends), and --stdio."""
    echo = EchoServer()
    w.cleanups.append(echo.close)
    a, api, ca = start_https_cloud(w, f"127.0.0.1:{echo.port}")
    cli = TunnelCli(w, a.device_id, f"127.0.0.1:{echo.port}", api=api, cacert=ca)
    expect(echo_round_trip(cli, b"ping") == b"ping", "a round trip over HTTPS")
    big = os.urandom(3 << 20)
    expect(echo_round_trip(cli, big) == big, "3 MB echo over HTTPS differs")
    cli.wait(r"tunnel \d+ closed: .*\(3145728 bytes in, 3145728 out\)")
    r = subprocess.run(EMULATOR + [TETHER, "tunnel", a.device_id, str(echo.port), "--stdio"], input=b"over tls",
                       capture_output=True, timeout=seconds(30),
                       env=dict(os.environ, TETHER_API=api, TETHER_TOKEN=w.token, TETHER_CACERT=ca))
    expect(r.returncode == 0 and r.stdout == b"over tls", f"--stdio over HTTPS: {r.returncode} {r.stderr!r}")


def test_tunnels_off(w):
    w.start_cloud()
    a = w.start_agent()
    r = w.tether("tunnel", a.device_id, "22", "--stdio", check=False)
    expect(r.returncode == 1 and "tunnels are off on this device" in r.stderr, f"off: {r.returncode} {r.stderr!r}")


def test_max_streams(w):
    echo = EchoServer()
    w.cleanups.append(echo.close)
    a = start(w, f"127.0.0.1:{echo.port}", "MaxStreams=2\n")
    cli = TunnelCli(w, a.device_id, f"127.0.0.1:{echo.port}")
    held = []
    for i in range(2):
        s = cli.connect()
        s.sendall(b"x")
        expect(s.recv(1) == b"x", "an open tunnel echoes")
        held.append(s)
    r = w.tether("tunnel", a.device_id, f"127.0.0.1:{echo.port}", "--stdio", check=False)
    expect(r.returncode == 1 and "too many streams (MaxStreams=2)" in r.stderr, f"third: {r.returncode} {r.stderr!r}")
    held.pop().close()
    cli.wait(r"tunnel \d+ closed")
    r = subprocess.run(EMULATOR + [TETHER, "tunnel", a.device_id, f"127.0.0.1:{echo.port}", "--stdio"], input=b"ok",
                       capture_output=True, env=dict(os.environ, TETHER_API=w.api, TETHER_TOKEN=w.token),
                       timeout=seconds(30))
    expect(r.returncode == 0 and r.stdout == b"ok", f"after one closed: {r.returncode} {r.stderr!r}")
    for s in held:
        s.close()


def test_idle_timeout(w):
    echo = EchoServer()
    w.cleanups.append(echo.close)
    idle = whole_seconds(1)
    a = start(w, f"127.0.0.1:{echo.port}", f"IdleSec={idle}\n")
    cli = TunnelCli(w, a.device_id, f"127.0.0.1:{echo.port}")
    s = cli.connect()
    s.sendall(b"x")
    expect(s.recv(1) == b"x", "echo")
    t0 = time.monotonic()
    expect(recv_all(s) == b"", "data after idle")
    took = time.monotonic() - t0
    s.close()
    line = cli.wait(rf"tunnel \d+ closed: idle for {idle} s")
    expect(took >= idle - 0.5, f"closed after {took:.1f} s, IdleSec={idle}: {line}")


def test_device_reconnect_ends_tunnel(w):
    """The reason a tunnel ended, with both transports over HTTP (the
    split one forced): the device's reconnect resets the stream."""
    echo = EchoServer()
    w.cleanups.append(echo.close)
    a = start(w, f"127.0.0.1:{echo.port}")
    clis = [TunnelCli(w, a.device_id, f"127.0.0.1:{echo.port}"),
            TunnelCli(w, a.device_id, f"127.0.0.1:{echo.port}", transport="split")]
    socks = []
    for cli in clis:
        s = cli.connect()
        s.sendall(b"x")
        expect(s.recv(1) == b"x", "echo")
        socks.append(s)
    a.stop()
    for s, cli in zip(socks, clis):
        expect(recv_all(s) == b"", "data after the device left")
        s.close()
        line = cli.wait(r"tunnel \d+ closed: .*disconnected")
        expect(re.search(r"\(1 bytes in, 1 out\)", line), f"closed line: {line}")
    # The agent back: a new tunnel works, both ways, 1 MB.
    w.run_agent("agent", a.conf, a.device)
    big = os.urandom(1 << 20)
    for cli in clis:
        expect(echo_round_trip(cli, big) == big, "echo after the reconnect")


class Sshd:
    """An sshd of the test's own on a free loopback port, one user key."""

    def __init__(self, w):
        if not os.path.exists("/usr/sbin/sshd") or not shutil.which("ssh") or not shutil.which("scp"):
            raise Skip("no /usr/sbin/sshd, ssh or scp (package openssh-server; tools/dev deps installs it)")
        if os.geteuid() != 0:
            raise Skip("the test sshd runs as root (it logs in as the user running it)")
        d = self.dir = w.path("sshd")
        os.makedirs(d, mode=0o700)
        for name in ("host", "user"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", os.path.join(d, name)], check=True)
        shutil.copy(os.path.join(d, "user.pub"), os.path.join(d, "authorized_keys"))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        os.makedirs("/run/sshd", exist_ok=True)  # its privilege separation directory
        with open(os.path.join(d, "sshd_config"), "w") as f:
            f.write(f"""ListenAddress 127.0.0.1:{self.port}
HostKey {d}/host
AuthorizedKeysFile {d}/authorized_keys
PidFile {d}/sshd.pid
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin yes
Subsystem sftp internal-sftp
""")
        self.proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", os.path.join(d, "sshd_config")],
                                     stdout=subprocess.DEVNULL, stderr=open(os.path.join(d, "sshd.log"), "w"))
        w.cleanups.append(self.close)
        deadline = time.monotonic() + seconds(10)
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise Failure(f"sshd did not start: {open(os.path.join(d, 'sshd.log')).read()}")
                time.sleep(0.05)

    def ssh_opts(self, w, dev, api=None):
        proxy = " ".join(EMULATOR + [TETHER, "--api", api or w.api, "tunnel", dev, f"127.0.0.1:{self.port}", "--stdio"])
        return ["-i", os.path.join(self.dir, "user"), "-o", "StrictHostKeyChecking=no", "-o",
                f"UserKnownHostsFile={self.dir}/known_hosts", "-o", "BatchMode=yes", "-o", f"ProxyCommand={proxy}",
                "-o", "LogLevel=ERROR"]

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(seconds(10))


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def scp_100mb(w, sshd, dev, api=None, cacert=None, what="HTTP, upgrade"):
    src = w.path("100mb.bin")
    with open(src, "wb") as f:
        for _ in range(100):
            f.write(os.urandom(1 << 20))
    dst = w.path("100mb.copy")
    env = dict(os.environ, TETHER_TOKEN=w.token)
    if cacert:
        env["TETHER_CACERT"] = cacert
    t0 = time.monotonic()
    r = subprocess.run(["scp", "-q", *sshd.ssh_opts(w, dev, api), src, f"root@{dev}:{dst}"], env=env,
                       capture_output=True, text=True, timeout=seconds(300))
    took = time.monotonic() - t0
    expect(r.returncode == 0, f"scp: {r.returncode} {r.stderr}")
    expect(sha256_file(dst) == sha256_file(src), "the copy's SHA-256 differs")
    print(f"# scp of 100 MB through tether tunnel --stdio ({what}): {took:.1f} s, {100 / took:.1f} MB/s")
    # And a command: the end of the session ends the tunnel.
    r = subprocess.run(["ssh", *sshd.ssh_opts(w, dev, api), f"root@{dev}", "echo", "tunnelled"],
                       env=env, capture_output=True, text=True, timeout=seconds(60))
    expect(r.returncode == 0 and r.stdout.strip() == "tunnelled", f"ssh: {r.returncode} {r.stdout!r} {r.stderr!r}")


def test_scp_100mb_through_stdio(w):
    sshd = Sshd(w)
    a = start(w, f"127.0.0.1:{sshd.port}")
    scp_100mb(w, sshd, a.device_id)


def test_scp_100mb_over_https(w):
    sshd = Sshd(w)
    a, api, ca = start_https_cloud(w, f"127.0.0.1:{sshd.port}")
    scp_100mb(w, sshd, a.device_id, api, ca, "HTTPS, split")


def percentile(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def call_latencies(w, dev, n):
    """n sequential calls of the example plugin's add (no event, unlike
    echo) over one keep-alive HTTP connection: each call's time in ms."""
    conn = http.client.HTTPConnection("127.0.0.1", w.api_port, timeout=seconds(30))
    headers = {"Authorization": f"Bearer {w.token}", "Content-Type": "application/x-www-form-urlencoded"}
    out = []
    try:
        for i in range(n):
            t0 = time.perf_counter()
            conn.request("POST", f"/v1/devices/{dev}/add", body=f"arg={i},1", headers=headers)
            r = conn.getresponse()
            body = r.read()
            out.append((time.perf_counter() - t0) * 1000)
            expect(r.status == 200, f"call {i}: {r.status} {body!r}")
    finally:
        conn.close()
    return out


# Both ends of the saturating transfer run in processes of their own, so
# that the calls timed by this process never wait for its GIL; and at the
# lowest CPU priority (NICE), with the tunnel's tether process: in a
# deployment they run on other computers (the user's, and the target's
# side of the device is an sshd, not a program that only moves bytes),
# while here five busy processes share a machine of two cores with
# tether-cloudd and tetherd, and the figure would measure the scheduler.
NICE = ("nice", "-n", "19")
SPEED_HELPER = r"""
import os, socket, sys, threading
mode, chunk = sys.argv[1], os.urandom(65536)
if mode in ("sink", "source"):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    print(srv.getsockname()[1], flush=True)
    def serve(c):
        try:
            while True:
                if mode == "source":
                    c.sendall(chunk)
                elif not c.recv(1 << 16):
                    break
        except OSError:
            pass
        c.close()
    while True:
        c, _ = srv.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()
s = socket.create_connection(("127.0.0.1", int(sys.argv[2])))
moved = reported = 0
try:
    while True:
        if mode == "push":
            s.sendall(chunk)
            moved += len(chunk)
        else:
            d = s.recv(1 << 16)
            if not d:
                break
            moved += len(d)
        if moved - reported >= 1 << 20:
            print(moved, flush=True)
            reported = moved
except OSError:
    pass
"""


class Speed:
    """python3 -c SPEED_HELPER MODE [PORT]: a sink or source server (its
    port), or a push or pull client (its progress, bytes)."""

    def __init__(self, w, mode, port=None):
        self.proc = subprocess.Popen([*NICE, sys.executable, "-c", SPEED_HELPER, mode] + ([str(port)] if port else []),
                                     stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        w.cleanups.append(self.close)
        self.moved = 0
        if port is None:
            self.port = int(self.proc.stdout.readline())
        else:
            threading.Thread(target=self._progress, daemon=True).start()

    def _progress(self):
        for line in self.proc.stdout:
            self.moved = int(line)

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def test_call_latency_during_transfer(w):
    """Calls while a tunnel saturates the device's connection: p99 of 200
    sequential calls at most 10 ms (the link cap keeps at most 128 KiB of
    stream data ahead of a call in each direction), in both directions,
    each while more than 100 MB goes through; on a machine so busy that
    calls over the idle link already have a p99 above a third of that,
    at most three times the idle p99 (without the cap, calls wait behind
    megabytes: hundreds of milliseconds). The transfer's ends run
    niced (see NICE); tether-cloudd and tetherd do not. The calls come
    faster than RateLimitPerAddress= and RateLimitPerToken= (500/s): off here.
    A machine busy with other work can add its own delays to a run: a
    direction passes when one of up to three runs keeps the bound, and
    fails when the transfer moved no more than 1 MiB during the first 200
    calls of every run (each run is printed). Under a sanitizer or a wrapper the figures are only
    printed."""
    sink, source = Speed(w, "sink"), Speed(w, "source")
    a = start(w, f"127.0.0.1:{sink.port} 127.0.0.1:{source.port}", cloud_extra="[API]\nRateLimitPerAddress=0\nRateLimitPerToken=0\n")
    dev = a.device_id
    bound = memory_checks(w.cloud.proc.pid)
    call_latencies(w, dev, 20)  # warm up
    idle = call_latencies(w, dev, 200)
    limit = max(10, 3 * percentile(idle, 99))
    print(f"# calls, idle link: p50 {statistics.median(idle):.2f} ms, p99 {percentile(idle, 99):.2f} ms, "
          f"max {max(idle):.2f} ms; bound during transfers: p99 {limit:.2f} ms")
    failures = []
    for mode, server in (("push", sink), ("pull", source)):
        direction = "client -> device" if mode == "push" else "device -> client"
        runs = []
        for attempt in range(3):
            cli = TunnelCli(w, dev, f"127.0.0.1:{server.port}", prefix=NICE)
            t0 = time.monotonic()
            client = Speed(w, mode, cli.port)
            # The transfer is under way before the first call.
            while client.moved < 8 << 20 and time.monotonic() - t0 < seconds(30):
                time.sleep(0.01)
            before = client.moved
            lat = call_latencies(w, dev, 200)
            during = client.moved - before
            # Keep it going to 100 MB at least, calls all the while.
            while client.moved < 100 << 20 and time.monotonic() - t0 < seconds(120):
                lat += call_latencies(w, dev, 20)
            moved, took = client.moved, time.monotonic() - t0
            client.close()
            cli.close()
            p50, p99 = statistics.median(lat), percentile(lat, 99)
            print(f"# calls during a tunnel transfer {direction}, run {attempt + 1}: {len(lat)} calls, "
                  f"p50 {p50:.2f} ms, p99 {p99:.2f} ms, max {max(lat):.2f} ms; {moved / 1e6:.0f} MB in {took:.1f} s "
                  f"({moved / 1e6 / took:.1f} MB/s; {during / 1e6:.1f} MB during the first 200 calls)")
            expect(moved >= 100 << 20, f"only {moved / 1e6:.0f} MB moved {direction} in {took:.0f} s")
            # The transfer's ends run niced: on a machine busy with other
            # work they can get no CPU for a while, which stalls it
            # whatever the cloud does; such a run is tried again.
            stalled = during <= 1 << 20
            runs.append((p99, stalled))
            if not stalled and (p99 <= limit or not bound):
                break
        if all(stalled for _, stalled in runs):
            failures.append(f"{direction}: the transfer stalled during the first 200 calls in each of {len(runs)} runs")
        elif bound and min(p for p, _ in runs) > limit:
            failures.append(f"{direction}: p99 " + ", ".join(f"{p:.2f}" for p, _ in runs) +
                            f" ms, each > {limit:.2f} ms")
    expect(not failures, "; ".join(failures))


if __name__ == "__main__":
    sys.exit(run([test_echo_events_audit, test_refusals, test_https, test_tunnels_off, test_max_streams, test_idle_timeout,
                  test_device_reconnect_ends_tunnel, test_scp_100mb_through_stdio,
                  test_scp_100mb_over_https,
                  test_call_latency_during_transfer],
                 emulated="the latency bound and 100 MB transfers are for the native run"))
