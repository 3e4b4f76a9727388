#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""tetherd's side of streams (docs/protocol.md, "Streams: tunnels and
logs") over real TLS and libcoap, against tests/integration/stream-peer, a
stand-in for the cloud's side that checks every answer and message: the
open and its refusals, a tunnel's data, acks, fins and graceful end, a log
stream from a journal written by systemd-journal-remote, MaxStreams, the
cloud's DELETE; and a bulk transfer each way within the credit."""

import os
import socket
import socketserver
import subprocess
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import EMULATOR, BUILD, Skip, expect, run, seconds  # noqa: E402

PEER = os.path.join(BUILD, "tests", "integration", "stream-peer")
JOURNAL_REMOTE = "/usr/lib/systemd/systemd-journal-remote"


class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        while True:
            d = self.request.recv(65536)
            if not d:
                self.request.shutdown(socket.SHUT_WR)
                return
            self.request.sendall(d)


def serve(handler):
    srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"127.0.0.1:{srv.server_address[1]}"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_peer(w, *args):
    """stream-peer on a free port; the agents of this World connect to it."""
    if not os.access(PEER, os.X_OK):
        raise Skip(f"{PEER} is not built (make check builds it)")
    w.coap_port = free_port()
    p = subprocess.Popen(EMULATOR + [PEER, str(w.coap_port), w.path("pki", "ca.crt"), w.path("pki", "server.crt"),
                          w.path("pki", "server.key"), *args], stdout=subprocess.PIPE, text=True)
    w.cleanups.append(lambda: p.poll() is None and p.kill())
    line = p.stdout.readline().strip()
    expect(line == "listening", f"stream-peer: {line!r}")
    return p


def finish(p, timeout):
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, _ = p.communicate()
    print("".join(f"# {line}\n" for line in out.splitlines()), end="")
    expect(p.returncode == 0 and out.rstrip().endswith("ok"), f"stream-peer failed: {out.strip()}")
    return out


def make_journal(w):
    """20 entries of tetherd.service, "line 0" .. "line 19"."""
    if not os.access(JOURNAL_REMOTE, os.X_OK):
        raise Skip(f"{JOURNAL_REMOTE} is missing (package systemd-journal-remote)")
    d = w.path("journal")
    os.makedirs(d)
    export = b"".join(f"__REALTIME_TIMESTAMP={1765100000000000 + i * 1000000}\n__MONOTONIC_TIMESTAMP={i + 1}\n"
                      f"_BOOT_ID=0123456789abcdef0123456789abcdef\n_SYSTEMD_UNIT=tetherd.service\n"
                      f"SYSLOG_IDENTIFIER=tetherd\n_PID=7\nPRIORITY=6\nMESSAGE=line {i}\n\n".encode()
                      for i in range(20))
    subprocess.run([JOURNAL_REMOTE, f"--output={d}/remote.journal", "-"], input=export, check=True,
                   capture_output=True)
    return d


def test_streams(w):
    journal = make_journal(w)
    _, echo = serve(Echo)
    p = start_peer(w, "basic", echo, "127.0.0.1:1")
    a = w.start_agent(wait_online=False,
                      extra=f"[Tunnel]\nAllow={echo}\nMaxStreams=1\n[Logs]\nDirectory={journal}\n")
    finish(p, seconds(60))
    a.wait_line(r"Stream 1 \(127\.0\.0\.1:\d+\) closed \(12 bytes in, 12 out\)")
    a.wait_line(r"Stream 2 refused \(4\.03\): target 127\.0\.0\.1:1 is not in \[Tunnel\] Allow=")
    a.wait_line(r"Stream 4 \(127\.0\.0\.1:\d+\) closed by the cloud: closed by the client")


def test_bulk_both_ways(w):
    total = 32 * 1024 * 1024
    got = [0]
    sink_done = threading.Event()

    class Source(socketserver.BaseRequestHandler):
        def handle(self):
            block = b"s" * 65536
            left = total
            while left > 0:
                n = min(left, len(block))
                self.request.sendall(block[:n])
                left -= n
            self.request.shutdown(socket.SHUT_WR)
            while self.request.recv(65536):
                pass

    class Sink(socketserver.BaseRequestHandler):
        def handle(self):
            while True:
                d = self.request.recv(1 << 20)
                if not d:
                    sink_done.set()
                    return
                got[0] += len(d)

    _, source = serve(Source)
    _, sink = serve(Sink)
    p = start_peer(w, "bulk", source, sink, str(total))
    w.start_agent(wait_online=False, extra=f"[Tunnel]\nAllow={source} {sink}\n")
    finish(p, seconds(150))
    # The peer is done once it sent and was told of the end; what the
    # agent still writes to the sink arrives after that (a busy machine).
    expect(sink_done.wait(seconds(30)), f"the sink's connection did not end ({got[0]} of {total} bytes)")
    expect(got[0] == total, f"the sink got {got[0]} of {total} bytes")


if __name__ == "__main__":
    sys.exit(run([test_streams, test_bulk_both_ways], emulated="ok"))
