#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""bench-tunnel: what `tether tunnel` costs (docs/design/benchmarks.md,
"Tunnels"). One tether-cloudd and one tetherd on loopback; on the
device's side a sink (counts the bytes it is sent and answers one byte
when it has them all), an echo server and, when /usr/sbin/sshd exists and
we are root, an sshd of the benchmark's own.

Per repetition, side by side:
- throughput of a --size-mb transfer (client -> target, until the target
  has it all) directly over TCP, through `tether tunnel --listen` over an
  HTTP API (the upgrade transport), through it over an HTTPS API (the
  split transport: a second cloud and agent of their own), and through
  `ssh -L` to the test sshd;
- round-trip time of a 1-byte ping-pong with the echo server (median of
  --pings), direct, through both tunnels and through ssh -L;
- the agent's VmRSS with no stream, then with --streams idle tunnels open
  (upgrade requests of our own, one byte echoed on each): the difference
  per stream.
Each figure is min / median / max over --reps repetitions. Figures,
never pass/fail. Usage (after building):

    top_builddir=$PWD/build top_srcdir=$PWD tests/bench/bench-tunnel.py \\
        [--reps 3] [--size-mb 256] [--pings 1000] [--streams 100]

Needs a cloud and an agent with tunnels (POST /v1/devices/ID/tunnel);
without them it says so and exits 77.
"""

import argparse
import importlib.util
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))
import harness  # noqa: E402
from harness import World  # noqa: E402

_spec = importlib.util.spec_from_file_location(
    "test_tunnel", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration", "test-tunnel.py"))
tt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tt)


def mmm(values, fmt="{:.2f}"):
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    return " / ".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


class Sink:
    """Reads an 8-byte length, then that many bytes; answers b"k"."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        try:
            head = b""
            while len(head) < 8:
                d = c.recv(8 - len(head))
                if not d:
                    return
                head += d
            left = int.from_bytes(head, "big")
            buf = bytearray(1 << 20)
            while left > 0:
                n = c.recv_into(buf, min(len(buf), left))
                if n == 0:
                    return
                left -= n
            c.sendall(b"k")
        except OSError:
            pass
        finally:
            c.close()


def push(port, size):
    """Seconds to get size bytes to the sink through port."""
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    chunk = os.urandom(1 << 20)
    t0 = time.perf_counter()
    s.sendall(size.to_bytes(8, "big"))
    left = size
    while left > 0:
        n = min(left, len(chunk))
        s.sendall(chunk[:n])
        left -= n
    ok = s.recv(1)
    took = time.perf_counter() - t0
    s.close()
    if ok != b"k":
        raise harness.Failure("the sink did not get everything")
    return took


def ping_pong(port, n):
    """Median round trip of a 1-byte ping-pong, in ms."""
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    out = []
    for _ in range(20):
        s.sendall(b"x")
        s.recv(1)
    for _ in range(n):
        t0 = time.perf_counter()
        s.sendall(b"x")
        if s.recv(1) != b"x":
            raise harness.Failure("the echo went away")
        out.append((time.perf_counter() - t0) * 1000)
    s.close()
    return statistics.median(out)


def vmrss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


def open_raw_tunnel(w, dev, target):
    """An upgraded connection of our own (no CLI process per stream)."""
    s = socket.create_connection(("127.0.0.1", w.api_port))
    s.sendall((f"POST /v1/devices/{dev}/tunnel?target={target} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               f"Authorization: Bearer {w.token}\r\nConnection: Upgrade\r\nUpgrade: tether-tunnel\r\n"
               "Content-Length: 0\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        d = s.recv(4096)
        if not d:
            raise harness.Failure(f"no answer to the upgrade: {head!r}")
        head += d
    if not head.startswith(b"HTTP/1.1 101"):
        raise harness.Failure(f"upgrade refused: {head!r}")
    s.sendall(b"x")
    if s.recv(1) != b"x":
        raise harness.Failure("no echo on a raw tunnel")
    return s


def ssh_forward(sshd, w, remote_port):
    """ssh -N -L LOCAL:127.0.0.1:remote_port to the test sshd; (proc, local port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        local = s.getsockname()[1]
    p = subprocess.Popen(["ssh", "-N", "-i", os.path.join(sshd.dir, "user"), "-o", "StrictHostKeyChecking=no",
                          "-o", f"UserKnownHostsFile={sshd.dir}/known_hosts", "-o", "BatchMode=yes",
                          "-o", "ExitOnForwardFailure=yes", "-p", str(sshd.port),
                          "-L", f"127.0.0.1:{local}:127.0.0.1:{remote_port}", "root@127.0.0.1"],
                         stdin=subprocess.DEVNULL)
    w.cleanups.append(lambda: p.poll() is None and (p.terminate() or p.wait()))
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", local), timeout=1).close()
            return p, local
        except OSError:
            if time.monotonic() > deadline or p.poll() is not None:
                raise harness.Failure("ssh -L did not start")
            time.sleep(0.05)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--size-mb", type=int, default=256)
    ap.add_argument("--pings", type=int, default=1000)
    ap.add_argument("--streams", type=int, default=100)
    o = ap.parse_args()

    w = World()
    w2 = None
    try:
        sink, echo = Sink(), tt.EchoServer()
        try:
            sshd = tt.Sshd(w)
        except harness.Skip as e:
            print(f"# ssh -L left out: {e}")
            sshd = None
        # Every idle stream is an HTTP connection from 127.0.0.1.
        w.start_cloud(extra=f"[API]\nMaxConnectionsPerIP=0\nRateLimitPerAddress=0\nRateLimitPerToken=0\n"
                            f"[Tunnel]\nMaxStreamsPerDevice={o.streams + 16}\nMaxStreams={o.streams + 16}\n")
        a = w.start_agent(extra=f"[Tunnel]\nAllow=127.0.0.1:{sink.port} 127.0.0.1:{echo.port}\n"
                                f"MaxStreams={o.streams + 16}\n")
        dev = a.device_id
        try:
            cli_sink = tt.TunnelCli(w, dev, f"127.0.0.1:{sink.port}")
        except harness.Failure as e:
            print(f"no tunnels here: {e}")
            return 77
        cli_echo = tt.TunnelCli(w, dev, f"127.0.0.1:{echo.port}")
        # The split transport: the same over a cloud with an HTTPS API.
        w2 = World()
        w2.start_cloud(extra=f"[API]\nCertificate={w2.path('pki', 'server.crt')}\nKey={w2.path('pki', 'server.key')}\n"
                             "MaxConnectionsPerIP=0\nRateLimitPerAddress=0\nRateLimitPerToken=0\n")
        a2 = w2.start_agent(extra=f"[Tunnel]\nAllow=127.0.0.1:{sink.port} 127.0.0.1:{echo.port}\n")
        api2, ca2 = f"https://127.0.0.1:{w2.api_port}", w2.path("pki", "ca.crt")
        split_sink = tt.TunnelCli(w2, a2.device_id, f"127.0.0.1:{sink.port}", api=api2, cacert=ca2)
        split_echo = tt.TunnelCli(w2, a2.device_id, f"127.0.0.1:{echo.port}", api=api2, cacert=ca2)
        ssh_sink = ssh_echo = None
        if sshd:
            ssh_sink = ssh_forward(sshd, w, sink.port)[1]
            ssh_echo = ssh_forward(sshd, w, echo.port)[1]
        size = o.size_mb << 20
        res = {k: [] for k in ("tput_direct", "tput_tunnel", "tput_split", "tput_ssh", "rtt_direct", "rtt_tunnel",
                               "rtt_split", "rtt_ssh", "rss0", "rss_per")}
        load0 = os.getloadavg()
        for rep in range(o.reps):
            res["tput_direct"].append(o.size_mb / push(sink.port, size))
            res["tput_tunnel"].append(o.size_mb / push(cli_sink.port, size))
            try:
                res["tput_split"].append(o.size_mb / push(split_sink.port, size))
            except OSError as e:
                # Shown as "—" in the table, and why here.
                print(f"# the split transport's transfer failed: {e}; {split_sink.lines[-1:]}", flush=True)
            if ssh_sink:
                res["tput_ssh"].append(o.size_mb / push(ssh_sink, size))
            res["rtt_direct"].append(ping_pong(echo.port, o.pings))
            res["rtt_tunnel"].append(ping_pong(cli_echo.port, o.pings))
            res["rtt_split"].append(ping_pong(split_echo.port, o.pings))
            if ssh_echo:
                res["rtt_ssh"].append(ping_pong(ssh_echo, o.pings))
            pid = a.proc.pid
            rss0 = vmrss_kb(pid)
            held = [open_raw_tunnel(w, dev, f"127.0.0.1:{echo.port}") for _ in range(o.streams)]
            rss1 = vmrss_kb(pid)
            res["rss0"].append(rss0)
            res["rss_per"].append((rss1 - rss0) / o.streams)
            for s in held:
                s.close()
            print(f"# repetition {rep + 1}/{o.reps} done", flush=True)
        load1 = os.getloadavg()

        print(f"\n{o.size_mb} MB transfers, {o.pings} pings, {o.streams} idle streams; {o.reps} repetitions, "
              f"min / median / max; load average {load0[0]:.2f} -> {load1[0]:.2f}\n")
        e = ""
        print(f"| {e:32} | {'direct TCP':24} | {'tether tunnel, upgrade':24} | {'tether tunnel, split':24} | "
              f"{'ssh -L':24} |")
        print(f"|{'-' * 34}|{'-' * 26}|{'-' * 26}|{'-' * 26}|{'-' * 26}|")
        print(f"| {'throughput, MB/s':32} | {mmm(res['tput_direct'], '{:.0f}'):24} | "
              f"{mmm(res['tput_tunnel'], '{:.1f}'):24} | {mmm(res['tput_split'], '{:.1f}'):24} | "
              f"{mmm(res['tput_ssh'], '{:.0f}'):24} |")
        print(f"| {'1-byte round trip, ms (median)':32} | {mmm(res['rtt_direct'], '{:.3f}'):24} | "
              f"{mmm(res['rtt_tunnel'], '{:.3f}'):24} | {mmm(res['rtt_split'], '{:.3f}'):24} | "
              f"{mmm(res['rtt_ssh'], '{:.3f}'):24} |")
        added = [t - d for t, d in zip(res["rtt_tunnel"], res["rtt_direct"])]
        added_split = [t - d for t, d in zip(res["rtt_split"], res["rtt_direct"])]
        print(f"| {'added round trip, ms':32} | {e:24} | {mmm(added, '{:.3f}'):24} | "
              f"{mmm(added_split, '{:.3f}'):24} | {e:24} |")
        print(f"| {'agent VmRSS, no stream, KiB':32} | {e:24} | {mmm(res['rss0'], '{:.0f}'):24} | {e:24} | {e:24} |")
        print(f"| {'agent VmRSS per idle stream, KiB':32} | {e:24} | {mmm(res['rss_per'], '{:.1f}'):24} | {e:24} | "
              f"{e:24} |")
        w2.close()
        w2 = None
        w.close()
        w = None
        return 0
    finally:
        for x in (w2, w):
            if x:
                for d in x.daemons:
                    d.kill()
                x.run_cleanups([])


if __name__ == "__main__":
    sys.exit(main())
