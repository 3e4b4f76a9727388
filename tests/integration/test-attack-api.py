#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Attacks on the HTTP API found by testing the API as an attacker (docs/security.md), each
now ending safely: a TLS record cut short does not stall the cloud, the
answers to a token tell nothing about devices it may not reach, and the
audit log holds no control characters a client sent."""

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import SLOW, TETHER, expect, run  # noqa: E402
import fakedev  # noqa: E402


def api(w, method, path, token=None, body=None):
    """(status, parsed JSON or text) of one request over plain HTTP."""
    conn = http.client.HTTPConnection("127.0.0.1", w.api_port, timeout=10 * SLOW)
    headers = {"Authorization": f"Bearer {token or w.token}"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    try:
        conn.request(method, path, body=data, headers=headers)
        r = conn.getresponse()
        raw = r.read().decode(errors="replace")
        try:
            return r.status, json.loads(raw)
        except ValueError:
            return r.status, raw
    finally:
        conn.close()


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cut_tls_record(w, port, what):
    """One byte of a TLS record header (a ClientHello's 0x16) on port and
    nothing more: libmicrohttpd 0.9.75 keeps such a connection "ready" and
    says it has work at once, round after round. Before, the cloud ran it
    in a loop that starved every other source of its event loop: a device's
    publish waited for the connection's timeout (30 s for the API, 120 s
    for the artifact server) and the cloud used a whole CPU. Now the device
    is answered at once and the cloud stays nearly idle."""
    dev, _ = fakedev.connect(w)
    dev.publish("attack/before", b"1")
    s = socket.create_connection(("127.0.0.1", port))
    try:
        s.sendall(b"\x16")
        time.sleep(0.3)  # the cloud has read the byte and answered nothing
        cpu0, t0 = cpu_seconds(w.cloud.proc.pid), time.monotonic()
        dev.publish("attack/during", b"1")
        took = time.monotonic() - t0
        expect(took < 3 * SLOW, f"{what}: a device's publish took {took:.1f} s while one connection held a "
                                f"byte of a TLS record")
        time.sleep(2)
        used = cpu_seconds(w.cloud.proc.pid) - cpu0
        wall = time.monotonic() - t0
        print(f"# {what}: publish answered in {took * 1000:.0f} ms; the cloud used {used:.2f} s of CPU in "
              f"{wall:.1f} s")
        expect(used < 0.5 * wall, f"{what}: the cloud used {used:.2f} s of CPU in {wall:.1f} s with one "
                                  f"connection holding a byte of a TLS record")
    finally:
        s.close()
        dev.close()


def test_cut_tls_record_on_the_https_api(w):
    w.start_cloud(extra=f"[API]\nCertificate={w.path('pki', 'server.crt')}\nKey={w.path('pki', 'server.key')}\n"
                        "HeaderTimeoutSec=3\n")
    cut_tls_record(w, w.api_port, "HTTPS API")
    # The connection is closed at HeaderTimeoutSec like any other that
    # sends no complete request header (before: at IdleTimeoutSec).
    s = socket.create_connection(("127.0.0.1", w.api_port))
    try:
        s.sendall(b"\x16")
        t0 = time.monotonic()
        s.settimeout(30 * SLOW)
        try:
            while s.recv(4096):
                pass
        except ConnectionResetError:
            pass
        took = time.monotonic() - t0
        expect(took < 3 + 3 * SLOW, f"a cut TLS record held its connection {took:.1f} s (HeaderTimeoutSec=3)")
        print(f"# closed after {took:.1f} s (HeaderTimeoutSec=3)")
    finally:
        s.close()


def test_cut_tls_record_on_the_artifact_server(w):
    artifacts = w.path("artifacts")
    os.makedirs(artifacts)
    w.start_cloud(extra=f"[OTA]\nArtifactDirectory={artifacts}\nPort=0\n")
    line = w.cloud.wait_line(r"Serving OTA artifacts from .* at https://[^/]*:\d+/ota/")
    port = int(re.search(r":(\d+)/ota/", line).group(1))
    cut_tls_record(w, port, "artifact server")


def create_token(w, **params):
    status, body = api(w, "POST", "/v1/tokens", body=params)
    expect(status == 200 and body.get("token"), f"POST /v1/tokens {params}: {status} {body}")
    return body["token"]


def test_other_methods_tell_nothing_of_devices(w):
    """A request on /v1/devices/ID with a method or a path no route has
    (DELETE, PATCH, OPTIONS, /ID/a/b) reaches no device and needs no
    scope. Before, it looked the device up: "Not found" for a device the
    cloud knows, "Device not found" for one it does not, so a token
    restricted to other devices (or one with events:read only) learned
    which devices exist. Now both answer the same."""
    w.start_cloud()
    dev, known = fakedev.connect(w)
    unknown = "0123456789abcdef01234567"
    restricted = create_token(w, scopes=["devices:read", "functions:call", "events:read"],
                              devices=["fedcba9876543210fedcba98"])
    events_only = create_token(w, scopes=["events:read"])
    for token, who in ((restricted, "a token restricted to another device"), (events_only, "an events:read token"),
                       (w.token, "an admin token")):
        for method, tail in (("DELETE", ""), ("PATCH", ""), ("OPTIONS", ""), ("GET", "/a/b"), ("POST", "/a/b"),
                             ("OPTIONS", "/fn")):
            a = api(w, method, f"/v1/devices/{known}{tail}", token)
            b = api(w, method, f"/v1/devices/{unknown}{tail}", token)
            expect(a == b, f"{method} /v1/devices/ID{tail} with {who}: a known device {a}, an unknown one {b}")
    dev.close()


def test_audit_targets_hold_no_control_characters(w):
    """The audit log's target is the client's (the URL, a name in the
    body), and any good token writes records (a refusal for want of a
    scope is audited too). Before, a newline or an escape sequence went
    into the record as it was, and "tether audit" printed it: a fake record
    on a line of its own, a terminal's escape sequences. Now control
    characters are written as %XX escapes. A request that matches no route
    changes nothing and is not audited (any token could fill the log)."""
    w.start_cloud()
    events_only = create_token(w, scopes=["events:read"])
    api(w, "POST", "/v1/x%0a99%20token:file-0000%20token.revoke%1b[2J%c2%85", events_only)
    api(w, "POST", "/v1/devices/events", events_only,
        body={"name": "x\n99 token:file-0000 token.revoke\u001b[2J\u0085"})
    api(w, "POST", "/v1/devices", body={"id": "a\nb\u001b[31m\u0085c"})
    api(w, "DELETE", "/v1/tokens/ab%0Dcd")
    api(w, "POST", "/v1/devices/a%09b/fn", body={"arg": "1"})
    status, records = api(w, "GET", "/v1/audit")
    expect(status == 200, f"GET /v1/audit: {status} {records}")
    targets = [r["target"] for r in records if r["action"] != "token.create"]
    print(f"# targets: {targets}")
    expect(targets == ["x%0A99 token:file-0000 token.revoke%1B[2J%C2%85", "a%0Ab%1B[31m%C2%85c",
                       "ab%0Dcd", "a%09b"], f"audit targets: {targets}")
    out = subprocess.run([TETHER, "--api", w.api, "--token", w.token, "audit"], capture_output=True, text=True,
                         timeout=30 * SLOW)
    lines = out.stdout.splitlines()
    expect(out.returncode == 0 and len(lines) == 1 + len(records) and "\x1b" not in out.stdout
           and "\r" not in out.stdout, f"tether audit printed: {out.stdout!r}")


def test_restricted_token_sees_no_other_devices_job(w):
    """A token restricted to device B, with ota:write, asking for device
    A's OTA job by its id: before, it got the job (its device, package and
    history); now the same 404 as a job that does not exist. Its own
    device's job it still reads."""
    w.start_cloud()
    a, a_id = fakedev.connect(w)
    b, b_id = fakedev.connect(w)
    from otakit import push_job, sign_manifest
    jobs = {dev_id: push_job(w, dev, dev_id, sign_manifest(w, dev_id), fakedev.CHANGED)
            for dev, dev_id in ((a, a_id), (b, b_id))}
    only_b = create_token(w, scopes=["ota:write"], devices=[b_id])
    status, body = api(w, "GET", f"/v1/ota/jobs/{jobs[a_id]}", only_b)
    none = api(w, "GET", "/v1/ota/jobs/0123456789abcdef", only_b)
    expect((status, body) == none and status == 404, f"A's job through B's token: {status} {body} (none: {none})")
    status, body = api(w, "GET", f"/v1/ota/jobs/{jobs[b_id]}", only_b)
    expect(status == 200 and body.get("device") == b_id, f"B's own job: {status} {body}")
    a.close()
    b.close()


def open_stream(w, token, source="127.0.0.1"):
    """An event stream on a raw socket from source: (socket, status, head)."""
    s = socket.create_connection(("127.0.0.1", w.api_port), timeout=10 * SLOW, source_address=(source, 0))
    s.sendall(f"GET /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data or (data.startswith(b"HTTP/1.1 200") and b":ok" not in data):
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    head = data.split(b"\r\n\r\n")[0].decode()
    return s, int(head.split()[1]), head


def test_streams_per_token_capped(w):
    """One token opening event streams from many addresses: before, each
    address was held to MaxConnectionsPerIP but the token could take every
    connection the cloud has. Now MaxStreamsPerToken= streams per token,
    then 429 with Retry-After; other tokens are not affected and a closed
    stream frees its place."""
    w.start_cloud(extra="[API]\nMaxStreamsPerToken=3\n")
    reader = create_token(w, scopes=["events:read"])
    streams = []
    for i in range(3):
        s, status, head = open_stream(w, reader, f"127.0.0.{10 + i}")
        expect(status == 200, f"stream {i}: {head}")
        streams.append(s)
    s, status, head = open_stream(w, reader, "127.0.0.20")
    expect(status == 429 and "Retry-After:" in head, f"a 4th stream: {head}")
    s.close()
    s, status, head = open_stream(w, w.token, "127.0.0.21")
    expect(status == 200, f"another token's stream: {head}")
    s.close()
    streams.pop().close()
    deadline = time.monotonic() + 10 * SLOW
    while True:
        s, status, head = open_stream(w, reader, "127.0.0.22")
        s.close()
        if status == 200:
            break
        expect(time.monotonic() < deadline, f"no place after a stream closed: {head}")
        time.sleep(0.1)
    for s in streams:
        s.close()


if __name__ == "__main__":
    sys.exit(run([
        test_cut_tls_record_on_the_https_api,
        test_cut_tls_record_on_the_artifact_server,
        test_other_methods_tell_nothing_of_devices,
        test_audit_targets_hold_no_control_characters,
        test_restricted_token_sees_no_other_devices_job,
        test_streams_per_token_capped,
    ]))
