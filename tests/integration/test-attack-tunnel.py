#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Attacks on tunnels through the real cloud and agent (docs/cloud.md
"Tunnels and logs", docs/protocol.md "Streams: tunnels and logs"): other
spellings of an allowed target (0.0.0.0, IPv4-mapped IPv6, short forms,
ports 0 and 65536) are refused; a restricted token neither opens tunnels to
nor lists the tunnels of a device out of its reach; a tunnel opened with
a tag-restricted token ends once the device's tags no longer match the
token (as an event stream judges each event by the device's tags of the
time); and tether tunnel prints a device's reason without its control
characters; and a follow log stream ends when its client goes away.
"""

import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import EMULATOR, TETHER, Failure, Skip, api_json, expect, poll, seconds, run  # noqa: E402


def echo_server(w):
    """A TCP echo server on the device's side: its port."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    w.cleanups.append(srv.close)

    def serve():
        def one(c):
            with c:
                while d := c.recv(65536):
                    c.sendall(d)

        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=one, args=(c,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return srv.getsockname()[1]


def open_tunnel(w, dev, target, token=None):
    """POST /v1/devices/DEV/tunnel?target=TARGET with the Upgrade headers,
    sent as is (no client-side parsing of target): (status, head text,
    socket or None). The socket is left open after a 101."""
    s = socket.create_connection(("127.0.0.1", w.api_port), timeout=seconds(30))
    s.sendall((f"POST /v1/devices/{dev}/tunnel?target={target} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               f"Authorization: Bearer {token or w.token}\r\nConnection: Upgrade\r\nUpgrade: tether-tunnel\r\n"
               "Content-Length: 0\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        d = s.recv(4096)
        if not d:
            break
        head += d
    text, _, rest = head.partition(b"\r\n\r\n")
    text = text.decode(errors="replace")
    try:
        status = int(text.split()[1])
    except (IndexError, ValueError):
        raise Failure(f"no HTTP answer to the tunnel open: {head!r}")
    if status != 101:
        # The error body: Content-Length bytes after the head (the
        # connection stays open, so reading to its end would wait).
        length = 0
        for line in text.split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        s.settimeout(seconds(5))
        try:
            while len(rest) < length and (d := s.recv(4096)):
                rest += d
        except OSError:
            pass
        s.close()
        return status, text + "\n" + rest.decode(errors="replace"), None
    return status, text, s


def start(w, allow):
    w.start_cloud(extra="[Tunnel]\nIdleSec=900\n")
    return w.start_agent(extra=f"[Tunnel]\nAllow={allow}\n")


def test_other_spellings_refused(w):
    port = echo_server(w)
    a = start(w, f"127.0.0.1:{port}")
    dev = a.device_id
    st, text, s = open_tunnel(w, dev, f"127.0.0.1:{port}")
    expect(st == 101, f"the allowed target: {st} {text}")
    s.sendall(b"ping")
    expect(s.recv(16) == b"ping", "echo through the allowed target")
    s.close()
    # Same host, other spellings: the device compares addresses as bytes of
    # one family, so each is refused (403 from the device, or 400 from the
    # cloud for what is not a numeric address and port).
    for target, want in ((f"0.0.0.0:{port}", 403), (f"[::ffff:127.0.0.1]:{port}", 403),
                         (f"[::ffff:7f00:1]:{port}", 403), (f"[::1]:{port}", 403), (f"[::]:{port}", 403),
                         (f"127.1:{port}", 400), (f"2130706433:{port}", 400), (f"0x7f.0.0.1:{port}", 400),
                         (f"127.0.0.1:0{port}", 400), ("127.0.0.1:0", 400), (f"127.0.0.1:{port + 65536}", 400),
                         ("127.0.0.1:65536", 400), ("127.0.0.1:*", 400), (f"*:{port}", 400),
                         (f"localhost:{port}", 400), (f"127.0.0.1%20:{port}", 400),
                         (f"[::1%25lo]:{port}", 400), (f"127.0.0.1:{port}%00", 400)):
        st, text, s = open_tunnel(w, dev, target)
        if s:
            s.close()
        expect(st == want, f"target {target}: {st}, wanted {want}: {text}")


def test_restricted_token_other_device(w):
    port = echo_server(w)
    a = start(w, f"127.0.0.1:{port}")
    dev = a.device_id
    other = w.new_device()[0]
    st, tok = api_json(w, "POST", "/v1/tokens", {"scopes": ["tunnels:open", "devices:read", "logs:read"],
                                                  "devices": [other]})
    expect(st == 200, f"token: {st} {tok}")
    st, text, s = open_tunnel(w, dev, f"127.0.0.1:{port}", token=tok["token"])
    expect(st == 403 and s is None, f"tunnel with another device's token: {st} {text}")
    # An admin's tunnel is open; the restricted token cannot list it.
    st, text, s = open_tunnel(w, dev, f"127.0.0.1:{port}")
    expect(st == 101, f"admin tunnel: {st} {text}")
    w.cleanups.append(s.close)
    st, body = api_json(w, "GET", f"/v1/devices/{dev}/tunnels", token=tok["token"])
    expect(st == 403, f"restricted token listed another device's tunnels: {st} {body}")
    st, body = api_json(w, "GET", f"/v1/devices/{dev}/logs", token=tok["token"])
    expect(st == 403, f"restricted token read another device's logs: {st} {body}")
    st, body = api_json(w, "GET", f"/v1/devices/{dev}/tunnels")
    expect(st == 200 and len(body["open"]) == 1, f"admin list: {st} {body}")


def test_tag_change_ends_tunnel(w):
    """A tunnel of a token restricted by tags ends when the device leaves
    them (within a keep-alive round of the API, as an expired token's
    streams do), with a reason in GET .../tunnels."""
    port = echo_server(w)
    a = start(w, f"127.0.0.1:{port}")
    dev = a.device_id
    st, body = api_json(w, "PUT", f"/v1/devices/{dev}", {"tags": {"site": "a"}})
    expect(st == 200, f"tag: {st} {body}")
    st, tok = api_json(w, "POST", "/v1/tokens", {"scopes": ["tunnels:open"], "tags": ["site=a"]})
    expect(st == 200, f"token: {st} {tok}")
    st, text, s = open_tunnel(w, dev, f"127.0.0.1:{port}", token=tok["token"])
    expect(st == 101, f"tunnel with the tag's token: {st} {text}")
    w.cleanups.append(s.close)
    s.sendall(b"one")
    expect(s.recv(16) == b"one", "echo before the tag change")
    st, body = api_json(w, "PUT", f"/v1/devices/{dev}", {"tags": {"site": "b"}})
    expect(st == 200, f"retag: {st} {body}")
    # The token no longer reaches the device for new requests...
    st2, text2, s2 = open_tunnel(w, dev, f"127.0.0.1:{port}", token=tok["token"])
    expect(st2 == 403 and s2 is None, f"new tunnel after the tag change: {st2} {text2}")
    # ... and the open tunnel must end too (the keep-alive round is 10 s).
    s.settimeout(seconds(25))
    try:
        ended = s.recv(16) == b""
    except socket.timeout:
        ended = False
    except OSError:
        ended = True
    expect(ended, "the tunnel of a tag-restricted token outlived the device's tag change")


def test_hostile_reason_printed_safely(w):
    """The reason a tunnel ended is a device's text (its DELETE) as the
    cloud keeps it: tether tunnel prints no control character of it, C1
    (U+009B, CSI to some terminals) included. A stand-in API: the 101,
    then GET .../tunnels with that reason."""
    evil = "gone \u009b31m red \u0085 nl \x1b[2J esc \u00e9 kept"
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    w.cleanups.append(srv.close)

    def one(c):
        with c:
            head = b""
            while b"\r\n\r\n" not in head:
                d = c.recv(4096)
                if not d:
                    return
                head += d
            if head.startswith(b"POST "):
                c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: tether-tunnel\r\nConnection: Upgrade\r\n"
                          b"Tether-Stream: 7\r\n\r\n")
                c.shutdown(socket.SHUT_WR)
                while c.recv(4096):
                    pass
                return
            body = json.dumps({"ok": True, "device": "dev1", "open": [],
                               "closed": [{"sid": 7, "kind": "tunnel", "target": "127.0.0.1:22", "token": "token:x",
                                           "opened_at": 1, "closed_at": 2, "bytes_in": 0, "bytes_out": 0,
                                           "reason": evil}]}).encode()
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

    def serve():
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=one, args=(c,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    env = dict(os.environ, TETHER_API=f"http://127.0.0.1:{srv.getsockname()[1]}", TETHER_TOKEN="x")
    r = subprocess.run(EMULATOR + [TETHER, "tunnel", "dev1", "127.0.0.1:22", "--stdio"], env=env,
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=seconds(60))
    err = r.stderr.decode("utf-8", errors="replace")
    expect("red" in err and "\u00e9 kept" in err, f"tether tunnel did not print the reason: {r.returncode} {err!r}")
    bad = [c for c in err.replace("\n", "") if ord(c) < 0x20 or 0x7f <= ord(c) <= 0x9f]
    expect(not bad, f"control characters reached the terminal: {bad} in {err!r}")


JOURNAL_REMOTE = "/lib/systemd/systemd-journal-remote"


def quiet_journal(w):
    """A journal directory with one tetherd.service entry (nothing new
    follows: a quiet unit)."""
    if not os.access(JOURNAL_REMOTE, os.X_OK):
        raise Skip(f"no {JOURNAL_REMOTE} (package systemd-journal-remote)")
    d = w.path("journal")
    os.makedirs(d)
    fields = {"MESSAGE": b"only line", "PRIORITY": b"6", "_SYSTEMD_UNIT": b"tetherd.service", "_PID": b"7"}
    ts = int(time.time() * 1e6) - 5_000_000
    data = b"__REALTIME_TIMESTAMP=%d\n__MONOTONIC_TIMESTAMP=1\n_BOOT_ID=0123456789abcdef0123456789abcdef\n" % ts
    for k, v in fields.items():
        data += k.encode() + b"\n" + struct.pack("<Q", len(v)) + v + b"\n"
    src = w.path("q.export")
    with open(src, "wb") as f:
        f.write(data + b"\n")
    r = subprocess.run([JOURNAL_REMOTE, f"--output={w.path('q.journal')}", src], capture_output=True, text=True)
    if r.returncode != 0:
        raise Failure(f"systemd-journal-remote: {r.stderr}")
    os.rename(w.path("q.journal"), os.path.join(d, "q.journal"))
    return d


def test_follow_client_gone(w):
    """A client of GET .../logs?follow=1 that goes away while the unit is
    quiet: its stream ends (it held a slot of MaxStreamsPerDevice= and of
    the device's MaxStreams=, shared with tunnels, for as long as the unit
    logged nothing: a few such clients and nobody reaches the device)."""
    d = quiet_journal(w)
    w.start_cloud(extra="[Tunnel]\nMaxStreamsPerDevice=2\n")
    a = w.start_agent(extra=f"[Logs]\nDirectory={d}\n")
    dev = a.device_id

    def open_follow():
        s = socket.create_connection(("127.0.0.1", w.api_port), timeout=seconds(30))
        s.sendall((f"GET /v1/devices/{dev}/logs?follow=1&lines=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                   f"Authorization: Bearer {w.token}\r\n\r\n").encode())
        got = b""
        while b"only line" not in got:
            chunk = s.recv(65536)
            expect(chunk, f"log stream ended early: {got!r}")
            got += chunk
        expect(got.startswith(b"HTTP/1.1 200"), f"log stream: {got[:200]!r}")
        return s

    for _ in range(2):
        open_follow().close()
    # Both clients are gone: their streams must end, and a third open works.
    def left():
        st, body = api_json(w, "GET", f"/v1/devices/{dev}/tunnels")
        expect(st == 200, f"list: {st} {body}")
        return body["open"]

    try:
        poll(lambda: not left(), 15, "the end of log streams whose clients went away", interval=0.2)
    except Failure:
        raise Failure(f"log streams of clients that went away are still open: {left()}")
    open_follow().close()


if __name__ == "__main__":
    sys.exit(run([test_other_spellings_refused, test_restricted_token_other_device, test_tag_change_ends_tunnel,
                  test_hostile_reason_printed_safely, test_follow_client_gone],
                 emulated="ok"))
