#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""The cloud's side of tunnels and log streams (docs/protocol.md, "Streams:
tunnels and logs"; docs/cloud.md, "Tunnels and logs") against a scripted
device (fakedev.py): the HTTP answers, the 101 upgrade over HTTP and HTTPS
and the bytes both ways, credit and fin, the split transport (201, then a
`down` GET and an `up` POST) over HTTP and HTTPS, log streams, and devices
that break the protocol."""

import hashlib
import json
import os
import re
import socket
import ssl
import struct
import sys
import threading
import time
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Failure, api_json, expect, run, seconds  # noqa: E402
from fakedev import CHANGED, CREATED, POST, URI_QUERY, code, codestr, connect, memory_checks, rss_kb  # noqa: E402

PUT, DELETE = code(0, 3), code(0, 4)
DELETED = code(2, 2)
CF = 12


def token(w, scopes, devices=None):
    body = {"name": "t-" + "-".join(scopes).replace(":", "."), "scopes": scopes}
    if devices:
        body["devices"] = devices
    s, b = api_json(w, "POST", "/v1/tokens", body)
    expect(s in (200, 201), f"token: {s} {b}")
    return b["token"], b["id"]


class Client:
    """One raw HTTP(S) connection to the API, for the upgrade."""

    def __init__(self, w, tls=False):
        raw = socket.create_connection(("127.0.0.1", w.api_port), timeout=seconds(10))
        if tls:
            ctx = ssl.create_default_context(cafile=w.path("pki", "ca.crt"))
            ctx.check_hostname = False
            raw = ctx.wrap_socket(raw)
        self.s = raw
        self.buf = b""

    def send_request(self, path, tok, upgrade=True, method="POST"):
        head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok}\r\nContent-Length: 0\r\n"
        if upgrade:
            head += "Connection: Upgrade\r\nUpgrade: tether-tunnel\r\n"
        self.s.sendall((head + "\r\n").encode())

    def head(self):
        while b"\r\n\r\n" not in self.buf:
            d = self.s.recv(65536)
            if not d:
                raise Failure(f"API closed before the response head: {self.buf!r}")
            self.buf += d
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
        return status, headers

    def body_json(self, headers):
        n = int(headers.get("content-length", "0"))
        while len(self.buf) < n:
            d = self.s.recv(65536)
            if not d:
                break
            self.buf += d
        body, self.buf = self.buf[:n], self.buf[n:]
        return json.loads(body or b"null")

    def read(self, n):
        """Exactly n bytes of the upgraded stream."""
        while len(self.buf) < n:
            d = self.s.recv(65536)
            if not d:
                raise Failure(f"tunnel closed after {len(self.buf)} of {n} bytes")
            self.buf += d
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_eof(self):
        """Everything until the cloud closes; returns it."""
        while True:
            try:
                d = self.s.recv(65536)
            except (ConnectionResetError, ssl.SSLError):
                break
            if not d:
                break
            self.buf += d
        out, self.buf = self.buf, b""
        return out

    def _fill(self):
        try:
            d = self.s.recv(65536)
        except (ConnectionResetError, ssl.SSLError, socket.timeout):
            return False
        self.buf += d
        return bool(d)

    def line(self):
        """One CRLF-terminated line (without it), or None at the end."""
        while b"\r\n" not in self.buf:
            if not self._fill():
                return None
        out, self.buf = self.buf.split(b"\r\n", 1)
        return out

    def take(self, n):
        """n bytes, or None at the end."""
        while len(self.buf) < n:
            if not self._fill():
                return None
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_chunked(self, sink):
        """A chunked body into sink(bytes): True at its end, False when it
        is cut short."""
        while True:
            ln = self.line()
            if ln is None:
                return False
            n = int(ln.split(b";")[0], 16)
            if n == 0:
                return self.line() == b""
            data = self.take(n + 2)
            if data is None or data[-2:] != b"\r\n":
                return False
            sink(data[:-2])

    def close(self):
        self.s.close()


class Peer:
    """A fakedev Device that answers the cloud's /t/ requests by itself
    (POST 2.04, DELETE 2.02) and keeps them, in order, in inbox."""

    def __init__(self, d):
        self.d = d
        self.inbox = []

    def _take(self, m):
        if os.environ.get("TUNDEBUG"):
            print("#take", m, query(m), file=sys.stderr)
        if m.path.startswith("t/") and m.code in (POST, DELETE):
            self.d.answer(m, CHANGED if m.code == POST else DELETED)
            self.inbox.append(m)
            return True
        return False

    def call(self, method, path, payload=b"", query=(), opts=()):
        t = self.d.request(method, path, payload, opts=opts, query=query)
        seen = []
        r = self.d.response(t, seen=seen)
        for m in seen:
            self._take(m)
        return r

    def expect_msg(self, pred, what, timeout=10):
        """The first kept or next message that pred takes (removed from the inbox)."""
        deadline = time.monotonic() + seconds(timeout)
        while True:
            for i, m in enumerate(self.inbox):
                if pred(m):
                    return self.inbox.pop(i)
            left = deadline - time.monotonic()
            if left <= 0:
                raise Failure(f"device: timed out waiting for {what}")
            try:
                m = self.d.recv(left)
            except Failure:
                continue
            if not self._take(m) and pred(m):
                return m

    def drain(self, timeout=0.5):
        """Take what the cloud sends for timeout seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                m = self.d.recv(max(deadline - time.monotonic(), 0.01))
            except Failure:
                break
            self._take(m)


def query(m):
    return [v.decode() for v in m.opt(URI_QUERY)]


def ack_of(m):
    for q in query(m):
        if q.startswith("ack="):
            return int(q[4:])
    return None


def wait_stream(d, method, what):
    return d.wait_for(lambda m: m.code == method and m.path.startswith("t/"), what=what)


def open_tunnel(w, d, dev, tok, tls=False, target="127.0.0.1:22", window=65536):
    """A tunnel the device accepts: (client, sid) after the 101."""
    c = Client(w, tls)
    c.send_request(f"/v1/devices/{dev}/tunnel?target={target}", tok)
    put = wait_stream(d, PUT, "PUT /t/SID")
    sid = put.path.split("/")[1]
    body = put.json()
    expect(body == {"target": target, "window": 262144}, f"open body: {body}")
    d.answer(put, CREATED, json.dumps({"window": window}).encode(), cf=50)
    t = d.request(POST, f"t/{sid}", query=("open",))
    expect(d.response(t).code == CHANGED, "open not answered 2.04")
    status, headers = c.head()
    expect(status == 101, f"upgrade: {status} {headers}")
    expect(headers.get("upgrade") == "tether-tunnel" and headers.get("tether-stream") == sid,
           f"101 headers: {headers}")
    return c, sid


def test_http_answers(w):
    w.start_cloud()
    d, dev = connect(w)
    other, other_dev = connect(w)
    # 426 for another upgrade (without any: the split transport).
    c = Client(w)
    c.s.sendall(f"POST /v1/devices/{dev}/tunnel?target=127.0.0.1:22 HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {w.token}\r\nContent-Length: 0\r\nConnection: Upgrade\r\n"
                "Upgrade: websocket\r\n\r\n".encode())
    status, headers = c.head()
    body = c.body_json(headers)
    expect(status == 426 and headers.get("upgrade") == "tether-tunnel" and body["ok"] is False,
           f"another upgrade: {status} {headers} {body}")
    c.close()

    def answer(path, tok=None, upgrade=True, method="POST"):
        c = Client(w)
        c.send_request(path, tok or w.token, upgrade, method)
        status, headers = c.head()
        body = c.body_json(headers)
        c.close()
        return status, body

    for bad in ("localhost:22", "127.0.0.1", "127.0.0.1:0", "[::1]22", "10.0.0.1:65536", ""):
        s, b = answer(f"/v1/devices/{dev}/tunnel?target={urllib.parse.quote(bad)}")
        expect(s == 400 and "target" in b["error"], f"target {bad!r}: {s} {b}")
    s, b = answer(f"/v1/devices/{dev}/tunnel")
    expect(s == 400, f"no target: {s} {b}")
    s, b = answer(f"/v1/devices/{dev}/tunnel?target=127.0.0.1:22", tok="tether_nope")
    expect(s == 401, f"bad token: {s} {b}")
    reader, _ = token(w, ["devices:read", "functions:call"])
    s, b = answer(f"/v1/devices/{dev}/tunnel?target=127.0.0.1:22", tok=reader)
    expect(s == 403 and b.get("scope") == "tunnels:open", f"no scope: {s} {b}")
    only_other, _ = token(w, ["tunnels:open", "logs:read", "devices:read"], devices=[other_dev])
    s, b = answer(f"/v1/devices/{dev}/tunnel?target=127.0.0.1:22", tok=only_other)
    expect(s == 403, f"restricted token, other device: {s} {b}")
    s, b = answer(f"/v1/devices/{dev}/logs", tok=only_other, upgrade=False, method="GET")
    expect(s == 403, f"restricted token, logs of another device: {s} {b}")
    s, b = answer(f"/v1/devices/{dev}/logs", tok=reader, upgrade=False, method="GET")
    expect(s == 403 and b.get("scope") == "logs:read", f"logs without the scope: {s} {b}")
    s, b = answer("/v1/devices/nosuchdev/tunnel?target=127.0.0.1:22")
    expect(s == 404, f"unknown device: {s} {b}")
    s, b = answer(f"/v1/devices/{dev}/tunnel?target=127.0.0.1:22", method="GET")
    expect(s == 405, f"GET tunnel: {s} {b}")
    for q in ("since=yesterday", "lines=10001", "lines=-1", "unit=bad%0aname.service", "unit=nodot",
              "follow=maybe", "&".join(f"unit=u{i}.service" for i in range(17))):
        s, b = answer(f"/v1/devices/{dev}/logs?{q}", upgrade=False, method="GET")
        expect(s == 400, f"logs?{q}: {s} {b}")
    s, b = answer(f"/v1/devices/{dev}/tunnels", upgrade=False, method="GET")
    expect(s == 200 and b["open"] == [] and b["closed"] == [], f"list: {s} {b}")
    s, b = answer(f"/v1/devices/{dev}/tunnels", tok=only_other, upgrade=False, method="GET")
    expect(s == 403, f"list, restricted token: {s} {b}")
    # Offline: 409.
    mark = w.notify.mark()
    d.close()
    w.notify.wait(lambda m: m.get("X_TETHER_OFFLINE") == dev, seconds(10), "device offline", mark)
    s, b = answer(f"/v1/devices/{dev}/tunnel?target=127.0.0.1:22")
    expect(s == 409 and "offline" in b["error"], f"offline: {s} {b}")
    other.close()


def get_json(w, path, tok, tls):
    c = Client(w, tls)
    c.send_request(path, tok, upgrade=False, method="GET")
    status, headers = c.head()
    body = c.body_json(headers)
    c.close()
    return status, body


def relay(w, tls):
    w.start_cloud(extra=f"[API]\nCertificate={w.path('pki', 'server.crt')}\nKey={w.path('pki', 'server.key')}\n"
                  if tls else "")
    d, dev = connect(w)
    p = Peer(d)
    tok = w.token
    c, sid = open_tunnel(w, d, dev, tok, tls)
    path = f"t/{sid}"
    # client -> device, within the device's window (65536). Over HTTPS
    # libmicrohttpd 0.9.75 forwards an upgraded connection through a
    # buffer of a few bytes (docs/cloud.md, "Tunnels and logs"): less data.
    data = os.urandom(2000 if tls else 200000)
    first = 600 if tls else 60000
    c.s.sendall(data[:first])
    got = b""
    while len(got) < first:
        m = p.expect_msg(lambda m: m.code == POST and m.path == path and m.payload, "client data")
        got += m.payload
        expect(len(got) <= 65536, f"cloud sent {len(got)} bytes past the window")
    expect(got == data[:first], "client data differs")
    # device -> client, with an ack of what the device consumed
    r = p.call(POST, path, b"hello from the device", query=(f"ack={len(got)}",))
    expect(r.code == CHANGED, f"data answered {codestr(r.code)}")
    expect(c.read(21) == b"hello from the device", "device data differs")
    # the cloud acks what the client took (its buffer ran empty)
    p.expect_msg(lambda m: m.code == POST and m.path == path and ack_of(m) == 21, "ack=21")
    # the rest of the client's bytes, acked as they come, never past the credit
    c.s.sendall(data[first:])
    while len(got) < len(data):
        m = p.expect_msg(lambda m: m.code == POST and m.path == path and m.payload, "client data")
        got += m.payload
        expect(len(got) <= ack + 65536 if (ack := len(got) - len(m.payload)) else True, "past the credit")
        p.call(POST, path, query=(f"ack={len(got)}",))
    expect(got == data, "client data differs")
    if not tls:
        # the client shuts down writing: fin
        c.s.shutdown(socket.SHUT_WR)
        p.expect_msg(lambda m: m.code == POST and m.path == path and "fin" in query(m), "fin")
    r = p.call(POST, path, b"bye", query=("fin",))
    expect(r.code == CHANGED, "fin not answered")
    expect(c.read(3) == b"bye", "last bytes")
    if tls:
        # libmicrohttpd 0.9.75 passes no half-close through TLS: the
        # device ends the stream.
        expect(p.call(DELETE, path, b"closed", opts=[(CF, b"")]).code == DELETED, "DELETE")
    expect(c.read_eof() == b"", "bytes after the end")
    c.close()
    # the list and the closed stream
    deadline = time.monotonic() + seconds(5)
    while True:
        s, b = get_json(w, f"/v1/devices/{dev}/tunnels", tok, tls)
        if b["closed"] or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    expect(s == 200 and b["open"] == [] and len(b["closed"]) == 1, f"list: {s} {b}")
    cl = b["closed"][0]
    expect(cl["sid"] == int(sid) and cl["kind"] == "tunnel" and cl["target"] == "127.0.0.1:22"
           and cl["bytes_out"] == len(data) and cl["bytes_in"] == 24 and cl["token"].startswith("token:"),
           f"closed: {cl}")
    # audit records
    s, recs = get_json(w, "/v1/audit?action=tunnel.", tok, tls)
    acts = [(r["actor"], r["action"], r["target"]) for r in recs]
    expect(acts == [(cl["token"], "tunnel.open", dev), (cl["token"], "tunnel.close", dev)], f"audit: {acts}")
    expect(recs[1]["detail"]["bytes_out"] == len(data) and recs[1]["detail"]["reason"] in ("closed",),
           f"close record: {recs[1]}")
    d.close()


def test_relay_http(w):
    relay(w, False)


def test_relay_https(w):
    relay(w, True)


def test_refusals(w):
    w.start_cloud(extra="[Tunnel]\nMaxStreamsPerDevice=1\n")
    d, dev = connect(w)

    def attempt(answer_fn, target="127.0.0.1:22"):
        c = Client(w)
        c.send_request(f"/v1/devices/{dev}/tunnel?target={target}", w.token)
        put = wait_stream(d, PUT, "PUT")
        answer_fn(put)
        status, headers = c.head()
        body = c.body_json(headers)
        c.close()
        return status, body

    text = b"target 10.0.0.5:22 is not in [Tunnel] Allow="
    s, b = attempt(lambda p: d.answer(p, code(4, 3), text, cf=0), "10.0.0.5:22")
    expect(s == 403 and b["error"] == text.decode(), f"refused: {s} {b}")
    s, b = attempt(lambda p: d.answer(p, code(4, 4), b"no resource 't/1'", cf=0))
    expect(s == 501 and "too old" in b["error"], f"old agent: {s} {b}")
    s, b = attempt(lambda p: d.answer(p, code(4, 29), b"too many streams (MaxStreams=8)", cf=0))
    expect(s == 429 and b["error"] == "too many streams (MaxStreams=8)", f"device limit: {s} {b}")

    def connect_fails(p):
        sid = p.path.split("/")[1]
        d.answer(p, CREATED, b'{"window":65536}', cf=50)
        t = d.request(DELETE, f"t/{sid}", b"connect to 127.0.0.1:22 failed: Connection refused", opts=[(CF, b"")])
        expect(d.response(t).code == DELETED, "DELETE not answered 2.02")
    s, b = attempt(connect_fails)
    expect(s == 502 and b["error"] == "connect to 127.0.0.1:22 failed: Connection refused", f"connect: {s} {b}")
    # the cloud's own limit: one stream per device here
    c, sid = open_tunnel(w, d, dev, w.token)
    c2 = Client(w)
    c2.send_request(f"/v1/devices/{dev}/tunnel?target=127.0.0.1:22", w.token)
    status, headers = c2.head()
    body = c2.body_json(headers)
    expect(status == 429 and "MaxStreamsPerDevice=1" in body["error"], f"cloud limit: {status} {body}")
    c2.close()
    # the device goes: the tunnel closes, the reason is in the list
    d.close()
    c.read_eof()
    c.close()
    s, b = api_json(w, "GET", f"/v1/devices/{dev}/tunnels")
    expect(b["closed"][0]["reason"] == "device disconnected", f"reason: {b}")


def test_hostile_device(w):
    w.start_cloud()
    d, dev = connect(w)
    p = Peer(d)
    # a stream the cloud never opened
    r = p.call(POST, "t/77", b"x", query=("open",))
    expect(r.code == code(4, 4) and b"no stream 77" in r.payload, f"unknown stream: {codestr(r.code)} {r.payload}")
    for bad in ("t/0", "t/01", "t/99999999999", "t/x"):
        expect(p.call(POST, bad, b"x").code == code(4, 4), f"{bad}")
    # data past the window the cloud granted (262144)
    c, sid = open_tunnel(w, d, dev, w.token)
    path = f"t/{sid}"
    chunk = b"z" * 32768
    for i in range(8):
        expect(p.call(POST, path, chunk).code == CHANGED, f"chunk {i}")
    # The client reads nothing, but its socket buffers take some: the
    # cloud acks what they took. One byte more than acked + window is
    # refused.
    received = 8 * 32768
    deadline = time.monotonic() + seconds(60)

    def acked():
        return max([ack_of(m) or 0 for m in p.inbox if m.path == path] + [0])

    while time.monotonic() < deadline:
        # Far from the window's end the chunks go without waiting; near
        # it, wait a little for acks, so the byte past it is past it.
        p.drain(0 if acked() + 262144 - received > 32768 else 0.2)
        n = min(32768, acked() + 262144 - received + 1)
        r = p.call(POST, path, b"y" * n)
        if r.code != CHANGED:
            break
        received += n
    expect(r.code == code(4, 0) and r.payload == b"window exceeded", f"past the window: {codestr(r.code)} {r.payload}")
    m = p.expect_msg(lambda m: m.code == DELETE and m.path == path, "DELETE window exceeded")
    expect(m.payload == b"window exceeded", f"DELETE reason {m.payload}")
    c.read_eof()
    c.close()
    # data after the end: 4.04
    expect(p.call(POST, path, b"late").code == code(4, 4), "data after DELETE")
    # an option twice
    c, sid = open_tunnel(w, d, dev, w.token)
    r = p.call(POST, f"t/{sid}", query=("ack=1", "ack=2"))
    expect(r.code == code(4, 0), f"ack twice: {codestr(r.code)}")
    p.expect_msg(lambda m: m.code == DELETE and m.path == f"t/{sid}", "DELETE after a bad query")
    c.read_eof()
    c.close()
    # an ack of more than was sent
    c, sid = open_tunnel(w, d, dev, w.token)
    expect(p.call(POST, f"t/{sid}", query=("ack=1000",)).code == code(4, 0), "ack past what was sent")
    c.read_eof()
    c.close()
    # many options
    c, sid = open_tunnel(w, d, dev, w.token)
    expect(p.call(POST, f"t/{sid}", query=[f"x{i}=1" for i in range(20)]).code == code(4, 0), "20 options")
    c.read_eof()
    c.close()
    s, b = api_json(w, "GET", f"/v1/devices/{dev}/tunnels")
    reasons = [x["reason"] for x in b["closed"]]
    expect(reasons[:4] == ["malformed query", "bad ack", "malformed query", "window exceeded"], f"reasons: {reasons}")
    d.close()


def test_logs(w):
    w.start_cloud()
    d, dev = connect(w)
    tok, tok_id = token(w, ["logs:read"])
    c = Client(w)
    c.send_request(f"/v1/devices/{dev}/logs?unit=tetherd.service&since=1765100000&lines=5", tok, upgrade=False,
                   method="GET")
    put = wait_stream(d, PUT, "PUT logs")
    sid = put.path.split("/")[1]
    expect(put.json() == {"journal": {"units": ["tetherd.service"], "since": 1765100000000000, "lines": 5,
                                      "follow": False}, "window": 262144}, f"open: {put.json()}")
    p = Peer(d)
    d.answer(put, CREATED, b'{"window":65536}', cf=50)
    fin = p.expect_msg(lambda m: m.code == POST and m.path == f"t/{sid}", "the cloud's fin")
    expect("fin" in query(fin) and not fin.payload, f"cloud fin: {query(fin)}")
    lines = b"".join(json.dumps({"realtime": i, "message": f"line {i}"}).encode() + b"\n" for i in range(5))
    expect(p.call(POST, f"t/{sid}", lines, query=("fin",)).code == CHANGED, "log data")
    status, headers = c.head()
    expect(status == 200 and headers.get("content-type") == "application/x-ndjson", f"logs: {status} {headers}")
    while not c.buf.endswith(b"\r\n0\r\n\r\n"):
        more = c.s.recv(65536)
        if not more:
            break
        c.buf += more
    body = c.buf
    # chunked: the lines are in it, in order
    expect(all(f"line {i}".encode() in body for i in range(5)) and body.index(b"line 0") < body.index(b"line 4"),
           f"body: {body!r}")
    c.close()
    s, recs = api_json(w, "GET", "/v1/audit?action=logs.")
    expect([r["actor"] for r in recs] == [f"token:{tok_id}"], f"audit: {recs}")
    # refused unit: 403 with the device's text
    c = Client(w)
    c.send_request(f"/v1/devices/{dev}/logs?unit=foo.service", tok, upgrade=False, method="GET")
    put = wait_stream(d, PUT, "PUT logs")
    d.answer(put, code(4, 3), b"unit foo.service is not in [Logs] Units=", cf=0)
    status, headers = c.head()
    body = c.body_json(headers)
    expect(status == 403 and body["error"] == "unit foo.service is not in [Logs] Units=", f"{status} {body}")
    c.close()
    # open on a log stream is a protocol error
    c = Client(w)
    c.send_request(f"/v1/devices/{dev}/logs?follow=1", tok, upgrade=False, method="GET")
    put = wait_stream(d, PUT, "PUT logs")
    sid = put.path.split("/")[1]
    d.answer(put, CREATED, b'{"window":65536}', cf=50)
    r = p.call(POST, f"t/{sid}", query=("open",))
    expect(r.code == code(4, 0) and r.payload == b"open on a log stream", f"open on logs: {codestr(r.code)}")
    c.close()
    d.close()


def test_ends(w):
    """Idleness, revocation and shutdown end streams with their reasons."""
    w.start_cloud(extra="[Tunnel]\nIdleSec=2\n")
    d, dev = connect(w)
    p = Peer(d)
    c, sid = open_tunnel(w, d, dev, w.token)
    m = p.expect_msg(lambda m: m.code == DELETE and m.path == f"t/{sid}", "DELETE client idle", timeout=10)
    expect(m.payload == b"client idle", f"idle reason {m.payload}")
    c.read_eof()
    c.close()
    tok, tok_id = token(w, ["tunnels:open"])
    c, sid = open_tunnel(w, d, dev, tok)
    s, b = api_json(w, "DELETE", f"/v1/tokens/{tok_id}")
    expect(s == 200, f"revoke: {s} {b}")
    m = p.expect_msg(lambda m: m.code == DELETE and m.path == f"t/{sid}", "DELETE token revoked")
    expect(m.payload == b"token revoked", f"revoked reason {m.payload}")
    c.read_eof()
    c.close()
    # a split tunnel: its down is cut short, its up answered 410
    tok, tok_id = token(w, ["tunnels:open"])
    sid, key = split_open(w, d, dev, tok)
    dc = attach(w, dev, sid, tok, key, "down")
    expect(dc.head()[0] == 200, "down")
    uc = attach(w, dev, sid, tok, key, "up")
    send_chunk(uc, b"x")
    p.expect_msg(lambda m: m.code == POST and m.path == f"t/{sid}" and m.payload, "up data")
    s, b = api_json(w, "DELETE", f"/v1/tokens/{tok_id}")
    expect(s == 200, f"revoke: {s} {b}")
    m = p.expect_msg(lambda m: m.code == DELETE and m.path == f"t/{sid}", "DELETE token revoked")
    expect(m.payload == b"token revoked", f"revoked reason {m.payload}")
    expect(dc.read_chunked(lambda b: None) is False, "down body not cut short")
    uc.s.sendall(b"0\r\n\r\n")
    status, headers = uc.head()
    body = uc.body_json(headers)
    expect(status == 410 and body["error"] == "stream ended: token revoked", f"up: {status} {body}")
    dc.close()
    uc.close()
    c, sid = open_tunnel(w, d, dev, w.token)
    w.cloud.stop()
    # The DELETE is queued before the sessions close; whether libcoap
    # writes it first is its affair: the device drops its streams with
    # the session anyway.
    try:
        m = p.expect_msg(lambda m: m.code == DELETE and m.path == f"t/{sid}", "DELETE shutting down")
        expect(m.payload == b"shutting down", f"shutdown reason {m.payload}")
    except EOFError:
        pass
    c.read_eof()
    c.close()
    d.close()


# ---- the split transport ---------------------------------------------------


def split_open(w, d, dev, tok, tls=False, target="127.0.0.1:22", window=65536):
    """A split tunnel the device accepts: (sid, key) after the 201."""
    c = Client(w, tls)
    c.send_request(f"/v1/devices/{dev}/tunnel?target={target}", tok, upgrade=False)
    put = wait_stream(d, PUT, "PUT /t/SID")
    sid = put.path.split("/")[1]
    d.answer(put, CREATED, json.dumps({"window": window}).encode(), cf=50)
    t = d.request(POST, f"t/{sid}", query=("open",))
    expect(d.response(t).code == CHANGED, "open not answered 2.04")
    status, headers = c.head()
    body = c.body_json(headers)
    c.close()
    expect(status == 201 and headers.get("tether-stream") == sid and body["ok"] is True
           and body["stream"] == int(sid) and re.fullmatch("[0-9a-f]{64}", body["key"])
           and body["attach_within"] > 0, f"split open: {status} {headers} {body}")
    return sid, body["key"]


def attach(w, dev, sid, tok, key, half, tls=False, method=None):
    """The request head of a `down` (GET) or `up` (POST, chunked) sent."""
    c = Client(w, tls)
    head = (f"{method or ('GET' if half == 'down' else 'POST')} /v1/devices/{dev}/tunnels/{sid}/{half} HTTP/1.1\r\n"
            f"Host: x\r\nAuthorization: Bearer {tok}\r\n")
    if key is not None:
        head += f"Tether-Stream-Key: {key}\r\n"
    head += "Transfer-Encoding: chunked\r\n" if half == "up" else ""
    c.s.sendall((head + "\r\n").encode())
    return c


def refused(w, dev, sid, tok, key, half, tls=False, method=None):
    """An attach the cloud refuses: (status, body)."""
    c = attach(w, dev, sid, tok, key, half, tls, method)
    if half == "up":
        c.s.sendall(b"0\r\n\r\n")
    status, headers = c.head()
    body = c.body_json(headers)
    c.close()
    return status, body


def send_chunk(c, data):
    c.s.sendall(b"%x\r\n" % len(data) + data + b"\r\n")


class Half(threading.Thread):
    """A split stream's half run by a thread: result holds what it got."""

    def __init__(self, fn):
        super().__init__(daemon=True)
        self.fn, self.result, self.error = fn, None, None
        self.start()

    def run(self):
        try:
            self.result = self.fn()
        except Exception as e:  # reported by get()
            self.error = e

    def get(self, timeout=60):
        self.join(seconds(timeout))
        expect(not self.is_alive(), "client half still running")
        if self.error:
            raise self.error
        return self.result


def down_reader(c):
    """The down body: (bytes, ended normally)."""
    got = bytearray()
    status, headers = c.head()
    expect(status == 200 and headers.get("content-type") == "application/octet-stream"
           and headers.get("transfer-encoding") == "chunked" and "content-length" not in headers,
           f"down: {status} {headers}")
    ok = c.read_chunked(got.extend)
    return bytes(got), ok


def up_sender(c, data, block=65536, end=True):
    """The up body and its answer: (status, body)."""
    for i in range(0, len(data), block):
        send_chunk(c, data[i:i + block])
    if not end:
        return None
    c.s.sendall(b"0\r\n\r\n")
    status, headers = c.head()
    return status, c.body_json(headers)


def pump(p, path, out, window=262144, timeout=60):
    """The device's side of a stream: sends out within the cloud's credit
    and then fin, acks what comes, until fin both ways; returns what came."""
    got = bytearray()
    sent = cack = acked = 0
    fin_in = fin_out = False
    deadline = time.monotonic() + seconds(timeout)
    while not (fin_in and fin_out):
        expect(time.monotonic() < deadline, f"stream stalled: {sent} sent, {len(got)} received, fin {fin_in}")
        for m in [m for m in p.inbox if m.path == path]:
            p.inbox.remove(m)
            expect(m.code == POST, f"stream reset: {m.payload}")
            expect(not (fin_in and m.payload), "data after the cloud's fin")
            got += m.payload
            expect(len(got) <= acked + 65536, "the cloud sent past the device's window")
            if ack_of(m) is not None:
                cack = max(cack, ack_of(m))
            fin_in = fin_in or "fin" in query(m)
        # (Past both fins the stream is gone: no last ack.)
        q = [f"ack={len(got)}"] if len(got) > acked and not fin_in else []
        n = max(0, min(32768, len(out) - sent, cack + window - sent))
        if sent + n == len(out) and not fin_out:
            q.append("fin")
        if n or q:
            r = p.call(POST, path, out[sent:sent + n], query=tuple(q))
            if r.code == code(4, 4) and fin_out and not n:
                # An ack that crossed the cloud's fin: the stream is
                # closed already.
                acked = len(got)
                continue
            expect(r.code == CHANGED, f"data answered {codestr(r.code)} {r.payload}")
            sent += n
            acked = len(got)
            fin_out = fin_out or "fin" in q
            continue
        try:
            p._take(p.d.recv(0.2))
        except Failure:
            pass
    return bytes(got)


def closed_of(w, dev, sid, tok, tls):
    """The closed stream sid in GET .../tunnels, waited for."""
    deadline = time.monotonic() + seconds(10)
    while True:
        s, b = get_json(w, f"/v1/devices/{dev}/tunnels", tok, tls)
        for c in b.get("closed", []):
            if c["sid"] == int(sid):
                return c
        expect(time.monotonic() < deadline, f"stream {sid} not closed: {b}")
        time.sleep(0.05)


def split_relay(w, tls):
    w.start_cloud(extra=f"[API]\nCertificate={w.path('pki', 'server.crt')}\nKey={w.path('pki', 'server.key')}\n"
                  if tls else "")
    d, dev = connect(w)
    p = Peer(d)
    sid, key = split_open(w, d, dev, w.token, tls)
    up_data, down_data = os.urandom(2 << 20), os.urandom(2 << 20)
    down = Half(lambda: down_reader(attach(w, dev, sid, w.token, key, "down", tls)))
    up = Half(lambda: up_sender(attach(w, dev, sid, w.token, key, "up", tls), up_data))
    got = pump(p, f"t/{sid}", down_data)
    expect(hashlib.sha256(got).digest() == hashlib.sha256(up_data).digest(), f"up: {len(got)} bytes differ")
    data, ended = down.get()
    expect(ended and hashlib.sha256(data).digest() == hashlib.sha256(down_data).digest(),
           f"down: {len(data)} bytes, ended normally: {ended}")
    expect(up.get() == (200, {"ok": True, "bytes": len(up_data)}), f"up answer: {up.result}")
    cl = closed_of(w, dev, sid, w.token, tls)
    expect(cl["reason"] == "closed" and cl["bytes_out"] == len(up_data) and cl["bytes_in"] == len(down_data),
           f"closed: {cl}")
    s, recs = get_json(w, "/v1/audit?action=tunnel.", w.token, tls)
    expect([r["action"] for r in recs] == ["tunnel.open", "tunnel.close"] and recs[0]["detail"]["status"] == 201,
           f"audit: {recs}")
    d.close()


def test_split_http(w):
    split_relay(w, False)


def test_split_https(w):
    split_relay(w, True)


def tls_token(w, scopes):
    """A token made over the HTTPS API."""
    c = Client(w, True)
    body = json.dumps({"name": "t-tls", "scopes": scopes}).encode()
    c.s.sendall(f"POST /v1/tokens HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {w.token}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    status, headers = c.head()
    b = c.body_json(headers)
    c.close()
    expect(status in (200, 201), f"token: {status} {b}")
    return b["token"]


def test_split_attach(w):
    """Who may attach, once each; a reset cuts the down body short and
    answers the up 410 (over HTTPS)."""
    w.start_cloud(extra=f"[API]\nCertificate={w.path('pki', 'server.crt')}\nKey={w.path('pki', 'server.key')}\n")
    tls = True
    d, dev = connect(w)
    other, other_dev = connect(w)
    p = Peer(d)
    sid, key = split_open(w, d, dev, w.token, tls)
    wrong = ("0" if key[0] != "0" else "1") + key[1:]
    tok2 = tls_token(w, ["tunnels:open"])
    for half in ("down", "up"):
        for k, what in ((wrong, "wrong key"), (key.upper(), "upper-case key"), (None, "no key"), (key[:63], "short")):
            s, b = refused(w, dev, sid, w.token, k, half, tls)
            expect(s == 403 and "Tether-Stream-Key" in b["error"], f"{half}, {what}: {s} {b}")
        s, b = refused(w, dev, sid, tok2, key, half, tls)
        expect(s == 403 and "another token" in b["error"], f"{half}, other token: {s} {b}")
        s, b = refused(w, other_dev, sid, w.token, key, half, tls)
        expect(s == 404, f"{half}, other device: {s} {b}")
        for bad in ("999", "0", "01", "x"):
            s, b = refused(w, dev, bad, w.token, key, half, tls)
            expect(s == 404, f"{half}, stream {bad}: {s} {b}")
    s, b = refused(w, dev, sid, w.token, key, "down", tls, method="POST")
    expect(s == 405, f"POST down: {s} {b}")
    reader = tls_token(w, ["devices:read"])
    s, b = refused(w, dev, sid, reader, key, "down", tls)
    expect(s == 403 and b.get("scope") == "tunnels:open", f"down without the scope: {s} {b}")
    # the halves, once each
    dc = attach(w, dev, sid, w.token, key, "down", tls)
    status, headers = dc.head()
    expect(status == 200, f"down: {status}")
    s, b = refused(w, dev, sid, w.token, key, "down", tls)
    expect(s == 409, f"second down: {s} {b}")
    uc = attach(w, dev, sid, w.token, key, "up", tls)
    send_chunk(uc, b"ping")
    m = p.expect_msg(lambda m: m.code == POST and m.path == f"t/{sid}" and m.payload, "up data")
    expect(m.payload == b"ping", f"up data {m.payload}")
    s, b = refused(w, dev, sid, w.token, key, "up", tls)
    expect(s == 409, f"second up: {s} {b}")
    # device data, then a reset mid-transfer: the down body is cut short
    expect(p.call(POST, f"t/{sid}", b"x" * 30000, query=("ack=4",)).code == CHANGED, "device data")
    got = bytearray()
    while len(got) < 30000:
        ln = dc.line()
        expect(ln is not None, "down ended early")
        got += dc.take(int(ln, 16) + 2)[:-2]
    expect(p.call(DELETE, f"t/{sid}", b"boom", opts=[(CF, b"")]).code == DELETED, "DELETE")
    expect(dc.read_chunked(lambda b: None) is False, "down body not cut short")
    dc.close()
    # the up takes the rest of its body, dropped, then 410
    send_chunk(uc, b"y" * 100000)
    uc.s.sendall(b"0\r\n\r\n")
    status, headers = uc.head()
    body = uc.body_json(headers)
    expect(status == 410 and body == {"ok": False, "error": "stream ended: boom"}, f"up after the end: {status} {body}")
    uc.close()
    # attaching after the end: 410 with the reason
    s, b = refused(w, dev, sid, w.token, key, "up", tls)
    expect(s == 410 and b["error"] == "stream ended: boom", f"attach after the end: {s} {b}")
    # a half that goes away resets the stream
    sid, key = split_open(w, d, dev, w.token, tls)
    dc = attach(w, dev, sid, w.token, key, "down", tls)
    expect(dc.head()[0] == 200, "down")
    dc.close()
    m = p.expect_msg(lambda m: m.code == DELETE and m.path == f"t/{sid}", "DELETE closed by the client")
    expect(m.payload == b"closed by the client", f"reason {m.payload}")
    d.close()
    other.close()


def test_split_timeouts(w):
    """Halves not attached in time end the stream; an upload the device
    takes nothing of stays in the socket buffers, not in the cloud."""
    w.start_cloud(extra="[Tunnel]\nAttachSec=1\n")
    d, dev = connect(w)
    p = Peer(d)
    for halves in ((), ("down",)):
        sid, key = split_open(w, d, dev, w.token)
        cs = [attach(w, dev, sid, w.token, key, h) for h in halves]
        m = p.expect_msg(lambda m: m.code == DELETE and m.path == f"t/{sid}", "DELETE client did not attach")
        expect(m.payload == b"client did not attach", f"reason {m.payload}")
        for c in cs:
            c.head()
            expect(c.read_chunked(lambda b: None) is False, "down body not cut short")
            c.close()
    # An up of up to 256 MB to a device that acks nothing: the cloud
    # sends the window (65536) and reads no more.
    sid, key = split_open(w, d, dev, w.token, window=65536)
    pid = w.cloud.proc.pid
    base = rss_kb(pid)
    dc = attach(w, dev, sid, w.token, key, "down")
    uc = attach(w, dev, sid, w.token, key, "up")
    uc.s.settimeout(seconds(2))
    sent = [0]

    def flood():
        block = b"z" * 65536
        try:
            for _ in range(4096):
                send_chunk(uc, block)
                sent[0] += len(block)
        except OSError:
            pass
    t = threading.Thread(target=flood, daemon=True)
    t.start()
    got = 0
    deadline = time.monotonic() + seconds(3)
    while time.monotonic() < deadline:
        try:
            p._take(p.d.recv(0.2))
        except Failure:
            pass
        for m in [m for m in p.inbox if m.path == f"t/{sid}"]:
            p.inbox.remove(m)
            got += len(m.payload)
    t.join(seconds(30))
    expect(not t.is_alive(), "the upload never blocked")
    expect(got == 65536, f"device got {got} bytes without acking")
    expect(sent[0] < 64 << 20, f"the cloud took {sent[0]} bytes of upload")
    if memory_checks(pid):
        grown = rss_kb(pid) - base
        expect(grown < 8192, f"cloud grew {grown} kB")
    # The client goes away. (Its FIN would wait behind the bytes the
    # cloud does not read: a reset, as when the process dies.)
    uc.s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    uc.close()
    m = p.expect_msg(lambda m: m.code == DELETE and m.path == f"t/{sid}", "DELETE closed by the client")
    expect(m.payload == b"closed by the client", f"reason {m.payload}")
    dc.close()
    d.close()


if __name__ == "__main__":
    sys.exit(run([test_http_answers, test_relay_http, test_relay_https, test_refusals, test_hostile_device,
                  test_logs, test_ends, test_split_http, test_split_https, test_split_attach, test_split_timeouts]))
