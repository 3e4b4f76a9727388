#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""The HTTP API against a hostile client (issue 12, item 7; docs/cloud.md,
"Limits on API clients"): paths with encoded '/' or NUL bytes, JSON bodies
with NUL characters, half-open connections from one address, floods of
requests with wrong or good tokens, and HTTPS."""

import json
import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import SLOW, Failure, expect, poll, run  # noqa: E402


class Reply:
    def __init__(self, raw):
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.decode(errors="replace").split("\r\n")
        self.status = int(lines[0].split()[1]) if lines[0].startswith("HTTP/") else 0
        self.headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"Reply({self.status} {self.body[:300]!r})"


def read_reply(s, timeout=10):
    deadline = time.monotonic() + timeout * SLOW
    buf = b""
    while True:
        head, sep, body = buf.partition(b"\r\n\r\n")
        if sep:
            r = Reply(buf)
            n = r.headers.get("content-length")
            if n is not None and len(body) >= int(n):
                return r
            if r.headers.get("content-type") == "text/event-stream" and b"\n\n" in body:
                return r
        left = deadline - time.monotonic()
        if left <= 0:
            raise Failure(f"no complete HTTP response in time; got {buf[:300]!r}")
        s.settimeout(left)
        d = s.recv(65536)
        if not d:
            raise Failure(f"connection closed; got {buf[:300]!r}")
        buf += d


def connect(port, source="127.0.0.1"):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((source, 0))
    s.settimeout(10 * SLOW)
    s.connect(("127.0.0.1", port))
    return s


def exchange(port, data, source="127.0.0.1", timeout=10):
    s = connect(port, source)
    try:
        s.sendall(data)
        return read_reply(s, timeout)
    finally:
        s.close()


def req(method, path, headers=(), body=b""):
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    head += "".join(h + "\r\n" for h in headers)
    if body or method in ("POST", "PUT"):
        head += f"Content-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


FORM = "Content-Type: application/x-www-form-urlencoded"
JSON = "Content-Type: application/json"


def test_encoded_slash_and_nul_in_paths(w):
    """%2F and %00 used to be decoded before routing: /v1/devices%2Fevents
    opened the event stream, /v1/devices/events%00junk published. Now the
    path is refused with 400 and a reason; %2F in an event stream's prefix
    (particle-api-js encodes '/' there) and both escapes in a query
    argument are still only data."""
    w.start_cloud()
    auth = f"Authorization: Bearer {w.token}"
    cases = [
        ("GET", "/v1/devices%2Fevents", "%2F"),
        ("GET", "/v1/devices%2fevents", "%2f"),
        ("GET", "/v1/devices/abc%2Fdef/x", "%2F"),
        ("POST", "/v1/devices/events%00junk", "%00"),
        ("GET", "/v1/devices%00/whatever", "%00"),
        ("GET", "/metrics%00x", "%00"),
        ("GET", "/v1/ota/jobs%2Fx", "%2F"),
        ("GET", "/v1/devices/a%2Fb/events/x", "%2F"),
        ("GET", "/v1/events%2Fx", "%2F"),
        ("GET", "/v1/events/a%2Fb%00", "%00"),
    ]
    for method, path, esc in cases:
        for headers in ([auth], []):
            r = exchange(w.api_port, req(method, path, [*headers, FORM] if method == "POST" else headers,
                                          b"name=x" if method == "POST" else b""))
            expect(r.status == 400, f"{method} {path}: {r}")
            err = r.json()["error"]
            expect(f"'{esc}'" in err and "no API path may hold" in err, f"{method} {path}: {err}")
    for path in ("/v1/events/a%2Fb", "/v1/devices/events/a%2fb/", "/v1/devices/abc/events/x%2Fy%2F"):
        r = exchange(w.api_port, req("GET", path, [auth]))
        expect(r.status == 200 and r.headers.get("content-type") == "text/event-stream", f"{path}: {r}")
    # The same escapes in query arguments are data, not path.
    r = exchange(w.api_port, req("GET", f"/v1/devices?x=a%2Fb&y=%00&access_token={w.token}"))
    expect(r.status == 200 and r.json() == [], f"escapes in the query: {r}")
    # Nothing was published by the refused POST.
    r = exchange(w.api_port, req("GET", "/metrics", [auth]))
    expect(b'tether_cloud_events_in_total{source="api"} 0' in r.body, "an event was published")


def test_json_errors_say_what_is_wrong(w):
    w.start_cloud()
    auth = f"Authorization: Bearer {w.token}"

    def post(body):
        return exchange(w.api_port, req("POST", "/v1/devices/events", [auth, JSON], body))
    r = post(b'{"name": "a\\u0000b"}')
    expect(r.status == 400, f"NUL: {r}")
    expect(r.json()["error"] == "Invalid JSON body: a string holds a NUL character (\\u0000), which no "
           "parameter may hold (line 1, column 19)", f"NUL: {r.json()}")
    r = post(b'{"name": "a",\n "data": }')
    expect(r.status == 400 and r.json()["error"] ==
           "Invalid JSON body: unexpected token near '}' (line 2, column 10)", f"syntax: {r}")
    r = post(b'{"name": "a", "name": "b"}')
    expect(r.status == 400 and r.json()["error"].startswith("Invalid JSON body: duplicate object key"),
           f"duplicate key: {r}")
    # Bytes that are not UTF-8 are not echoed back.
    r = post(b'{"name": "\xff\xfe"}')
    expect(r.status == 400 and r.json()["error"].startswith("Invalid JSON body: "), f"not UTF-8: {r}")
    r = post(b'{"name": "ok/event"}')
    expect(r.status == 200, f"a good body: {r}")


if __name__ == "__main__":
    sys.exit(run([test_encoded_slash_and_nul_in_paths, test_json_errors_say_what_is_wrong], emulated="ok"))
