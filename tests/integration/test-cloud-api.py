#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""tether-cloudd's HTTP API at the byte level: authentication in all its
places, what is read before the token is checked, body limits, parameter
validation and the event stream's fields (docs/cloud.md)."""

import json
import os
import resource
import select
import shutil
import socket
import sys
import time
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import SLOW, Failure, Skip, expect, poll, run  # noqa: E402
from fakedev import CHANGED, CONTENT, POST, connect, memory_checks, rss_kb  # noqa: E402
from otakit import build_deb  # noqa: E402


class Reply:
    def __init__(self, raw):
        self.raw = raw
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.decode(errors="replace").split("\r\n")
        self.status = int(lines[0].split()[1]) if lines[0].startswith("HTTP/") else 0
        self.headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
        self.body = body

    def json(self):
        body = self.body
        if self.headers.get("transfer-encoding") == "chunked":
            out, rest = b"", body
            while rest:
                size, _, rest = rest.partition(b"\r\n")
                n = int(size, 16)
                if n == 0:
                    break
                out, rest = out + rest[:n], rest[n + 2:]
            body = out
        return json.loads(body)

    def __repr__(self):
        return f"Reply({self.status} {self.body[:200]!r})"


def exchange(port, data, timeout=5, until_close=False):
    """Send raw bytes, read one HTTP response (headers plus Content-Length
    body, or up to the first event-stream line); the deadline is an error."""
    s = socket.create_connection(("127.0.0.1", port))
    try:
        s.sendall(data)
        return read_reply(s, timeout)
    finally:
        s.close()


def read_reply(s, timeout=5):
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
            if r.headers.get("transfer-encoding") == "chunked" and body.endswith(b"0\r\n\r\n"):
                return r
        left = deadline - time.monotonic()
        if left <= 0:
            raise Failure(f"no complete HTTP response in time; got {buf[:300]!r}")
        s.settimeout(left)
        try:
            d = s.recv(65536)
        except socket.timeout:
            continue
        except ConnectionResetError:
            d = b""
        if not d:
            if sep:
                return Reply(buf)
            raise Failure(f"connection closed; got {buf[:300]!r}")
        buf += d


def req(method, path, headers=(), body=b""):
    h = [f"{method} {path} HTTP/1.1", "Host: test", "Connection: close"] + list(headers)
    if body or method == "POST":
        h.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(h) + "\r\n\r\n").encode() + body


def form(**kw):
    return urllib.parse.urlencode(kw).encode()


# For tests that publish thousands of events as fast as they can: no rate
# limits (docs/cloud.md, "Limits on API clients").
UNLIMITED = "[API]\nRateLimitPerAddress=0\nRateLimitPerToken=0\n"
FORM = "Content-Type: application/x-www-form-urlencoded"
JSON = "Content-Type: application/json"


def test_auth_matrix(w):
    w.start_cloud()
    P, T = w.api_port, w.token
    ok = [
        ("bearer header", req("GET", "/v1/devices", [f"Authorization: Bearer {T}"])),
        ("lowercase scheme", req("GET", "/v1/devices", [f"authorization: bearer {T}"])),
        ("query", req("GET", f"/v1/devices?access_token={T}")),
        ("form body", req("POST", "/v1/devices/events", [FORM], form(name="a", access_token=T))),
        ("JSON body", req("POST", "/v1/devices/events", [JSON],
                          json.dumps({"name": "a", "access_token": T}).encode())),
    ]
    for what, data in ok:
        r = exchange(P, data)
        expect(r.status == 200, f"{what}: {r}")
    bad = [
        ("no token", req("GET", "/v1/devices")),
        ("wrong token", req("GET", "/v1/devices", ["Authorization: Bearer " + "0" * 40])),
        ("wrong scheme", req("GET", "/v1/devices", [f"Authorization: Basic {T}"])),
        ("query token with a NUL", req("GET", f"/v1/devices?access_token={T}%00x")),
        ("bad header, good body token", req("POST", "/v1/devices/events", [FORM, "Authorization: Bearer nope"],
                                            form(name="a", access_token=T))),
        ("bad query, good body token", req("POST", "/v1/devices/events?access_token=nope", [FORM],
                                           form(name="a", access_token=T))),
        ("stream without token", req("GET", "/v1/events")),
        ("device stream without token", req("GET", "/v1/devices/abc/events")),
        ("devices stream without token", req("GET", "/v1/devices/events/x")),
        ("form with a NUL in the token", req("POST", "/v1/devices/events", [FORM],
                                             f"name=a&access_token={T}%00".encode())),
    ]
    for what, data in bad:
        r = exchange(P, data)
        expect(r.status == 401 and r.json().get("error") == "invalid_token" and
               r.headers.get("www-authenticate", "").startswith("Bearer"), f"{what}: {r}")
    r = exchange(P, req("GET", f"/v1/events?access_token={T}"))
    expect(r.status == 200 and r.headers.get("content-type") == "text/event-stream" and b":ok" in r.body,
           f"stream with a query token: {r}")


def test_token_checked_before_the_body(w):
    """With a token in the header or query, a bad one is answered before
    the body is sent; an oversize Content-Length is refused at once."""
    w.start_cloud()
    P, T = w.api_port, w.token
    heads = [
        ("bad bearer", req("POST", "/v1/devices/events", [FORM, "Authorization: Bearer nope"])
         .replace(b"Content-Length: 0", b"Content-Length: 50000"), 401),
        ("bad query token", req("POST", "/v1/devices/events?access_token=nope", [FORM])
         .replace(b"Content-Length: 0", b"Content-Length: 50000"), 401),
        ("oversize, good token", req("POST", "/v1/devices/events", [FORM, f"Authorization: Bearer {T}"])
         .replace(b"Content-Length: 0", b"Content-Length: 10000000"), 413),
        ("oversize, no token", req("POST", "/v1/devices/events", [FORM])
         .replace(b"Content-Length: 0", b"Content-Length: 10000000"), 413),
    ]
    for what, data, status in heads:
        r = exchange(P, data)  # headers only: the body never comes
        expect(r.status == status, f"{what}: {r}")
    # Chunked: no length to refuse up front; 413 once it is over the limit.
    chunk = b"a" * 60000
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(4)) + b"0\r\n\r\n"
    data = (f"POST /v1/devices/events HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {T}\r\n{FORM}\r\n"
            "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n").encode() + body
    r = exchange(P, data)
    expect(r.status == 413 and "larger than" in r.json()["error"], f"chunked oversize: {r}")


def test_unauthenticated_bodies_cost_bounded_memory(w):
    """Finding 3: bodies were buffered in full before the token was looked
    at. Now a bad header token costs nothing, and bodies whose token can
    only be in the body are held up to a cap for all of them together
    (API_BODY_TOTAL_MAX in cloud/api.c, 8 MiB): a body that comes in past
    it is read and dropped and its request answered 503.

    Checked so that it holds however much the kernel buffers between the
    test and the cloud: the cloud's peak memory, an answer (401 or 503) on
    every connection, and 503s once the cloud said it reached the cap,
    which it must: no body can end before the test sends its last bytes,
    and the bodies hold far more than the cap. The 1,000 connections come
    from one address: the per-address limits are off."""
    w.start_cloud(extra="[API]\nMaxConnectionsPerIP=0\nRateLimitPerAddress=0\nAuthFailuresPerAddress=0\n")
    P = w.api_port
    pid = w.cloud.proc.pid
    n_conn, size, last = 1000, 53000, 1000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n_conn + 100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n_conn + 200), hard))
        n_conn = min(n_conn, min(hard, n_conn + 200) - 100)
    expect(n_conn * (size - last) > 2 * 8 * 1024 * 1024, f"{n_conn} connections cannot reach the cap")
    for what, auth in (("bad bearer", "Authorization: Bearer nope\r\n"), ("no token", "")):
        before = rss_kb(pid)
        mark = w.cloud.mark()
        head = (f"POST /v1/devices/events HTTP/1.1\r\nHost: t\r\n{auth}{FORM}\r\n"
                f"Content-Length: {size}\r\n\r\n").encode()
        socks = []
        for i in range(n_conn):
            s = socket.create_connection(("127.0.0.1", P))
            s.setblocking(False)
            pending = head + b"a" * (size - last)
            try:
                sent = s.send(pending)
                pending = pending[sent:]
            except (BlockingIOError, ConnectionError):
                pass
            socks.append([s, pending])
        # Push the rest of each partial body as the cloud takes it (or closes).
        deadline = time.monotonic() + 30 * SLOW
        while any(p for _, p in socks):
            expect(time.monotonic() < deadline, f"{what}: the cloud did not take the bodies in time")
            _, writable, _ = select.select([], [s for s, p in socks if p], [], 0.5)
            for entry in socks:
                s, p = entry
                if s in writable:
                    try:
                        entry[1] = p[s.send(p):]
                    except (BlockingIOError, InterruptedError):
                        pass
                    except OSError:
                        entry[1] = b""
        statuses = {}
        if what == "bad bearer":
            for s, _ in socks:
                s.setblocking(True)
                r = read_reply(s, 10)
                statuses[r.status] = statuses.get(r.status, 0) + 1
            expect(statuses == {401: n_conn}, f"answers: {statuses}")
            limit = 10
        else:
            # The cloud has read more than the cap (and it cannot have
            # answered anything yet): it says so.
            w.cloud.wait_line(r"Request bodies in progress hold \d+ bytes; answering 503", timeout=30, start=mark)
            # The end of every body: held ones get 401, the rest 503.
            for s, _ in socks:
                s.setblocking(True)
                s.sendall(b"a" * last)
            for s, _ in socks:
                r = read_reply(s, 10)
                statuses[r.status] = statuses.get(r.status, 0) + 1
            expect(set(statuses) <= {401, 503} and statuses.get(503, 0) > 0, f"answers: {statuses}")
            # 8 MiB of bodies at most, plus libmicrohttpd's own buffer per connection.
            limit = 8 + n_conn * 40 / 1024 + 5
        grown = (rss_kb(pid, "VmHWM") - before) / 1024
        print(f"# {n_conn} connections, {what}, {size}-byte bodies: answers {statuses}; the cloud's "
              f"peak RSS was {grown:.1f} MB above its RSS before")
        if memory_checks(pid):
            expect(grown < limit, f"{what}: the cloud's peak RSS grew {grown:.1f} MB")
        for s, _ in socks:
            s.close()
    # What the held bodies took is given back: a body without a token is
    # read in full again (and answered 401 for its missing token).
    r = exchange(P, req("POST", "/v1/devices/events", [FORM], b"name=a&data=" + b"a" * (size - 12)))
    expect(r.status == 401, f"a body after the flood: {r}")


def test_bodies_and_parameters(w):
    w.start_cloud()
    d, dev = connect(w)
    P, T = w.api_port, w.token
    auth = f"Authorization: Bearer {T}"

    def post(path, body, ctype=FORM):
        return exchange(P, req("POST", path, [auth, ctype], body))
    for body, error in ((b"[1,2]", "The JSON body must be an object of parameters, not an array"),
                        (b'"text"', "Invalid JSON body: '[' or '{' expected near '\"text\"' (line 1, column 6)"),
                        (b"{broken", "Invalid JSON body: string or '}' expected near 'broken' (line 1, column 7)")):
        r = post("/v1/devices/events", body, JSON)
        expect(r.status == 400 and r.json()["error"] == error, f"{body!r}: {r}")
    r = exchange(P, req("POST", "/v1/devices/events", [JSON], b"[1]"))
    expect(r.status == 401, f"not an object, no token: {r}")

    bad = [
        (b"name=a&ttl=60%00junk", FORM, "ttl"),
        (b"name=a&private=1%00zz", FORM, "private"),
        (b"name=a&ttl=4294967296", FORM, "ttl"),
        (b"name=a&ttl=-1", FORM, "ttl"),
        (b"name=a%00b", FORM, "name"),
        (b'{"name":"a","ttl":[60]}', JSON, "ttl"),
        (b'{"name":"a","private":{}}', JSON, "private"),
        (b'{"name":"a","data":{"x":1}}', JSON, "data"),
        (b'{"name":["a"]}', JSON, "name"),
        (b"name=a&data=%ff", FORM, "data"),
    ]
    for body, ctype, field in bad:
        r = post("/v1/devices/events", body, ctype)
        expect(r.status == 400 and field in r.json()["error"].lower(), f"{body!r}: {r}")

    # Arguments: arrays and objects are refused before anything reaches the
    # device; numbers and booleans go as their JSON text.
    for body in (b'{"args":[1,2]}', b'{"args":{"a":1}}', b'{"arg":[1]}'):
        r = post(f"/v1/devices/{dev}/f", body, JSON)
        expect(r.status == 400 and "argument" in r.json()["error"], f"{body!r}: {r}")
    for body, want in ((b'{"args":5}', b"5"), (b'{"args":true}', b"true"), (b'{"arg":"x y"}', b"x y")):
        s = socket.create_connection(("127.0.0.1", P))
        s.sendall(req("POST", f"/v1/devices/{dev}/f", [auth, JSON], body))
        m = d.wait_for(lambda m: m.code == POST, what="POST /f/f")
        expect(m.path == "f/f" and m.payload == want, f"{body!r} reached the device as {m}")
        d.answer(m, CHANGED, b"1")
        r = read_reply(s)
        s.close()
        expect(r.status == 200 and r.json()["return_value"] == 1, f"{body!r}: {r}")


def test_stream_fields(w):
    """Finding 9 and the 2^31 TTL: the event stream carries "private" and
    TTLs up to 2^32-1, as do device notifications."""
    w.start_cloud()
    d, dev = connect(w)
    d.subscribe("s/")
    sub = w.subscribe("s/").wait_ready()
    T = w.token
    for priv, ttl in ((True, 3000000000), (False, 4294967295), (False, 60)):
        body = form(name=f"s/{ttl}", data="d", ttl=ttl, **({"private": "true"} if priv else {}))
        r = exchange(w.api_port, req("POST", "/v1/devices/events", [f"Authorization: Bearer {T}", FORM], body))
        expect(r.status == 200, f"publish: {r}")
        ev = sub.wait(lambda e: e.get("name") == f"s/{ttl}", what=f"s/{ttl}")
        expect(ev["ttl"] == ttl and ev.get("private", False) is priv and ev["coreid"] == "api",
               f"stream event {ev}")
        m = d.wait_for(lambda m: m.code == CONTENT and m.payload, what="notification")
        j = m.json()
        expect(j["name"] == f"s/{ttl}" and j["ttl"] == ttl and j.get("private", False) is priv,
               f"notification {j}")
    sub.close()


def test_ota_artifacts_not_enabled(w):
    """A cloud without [OTA] ArtifactDirectory= says so with its own status
    (501, not the 503 of an offline device), and tether ota exits 9 with
    the cloud's hint, never "offline" (docs/cli.md)."""
    if not shutil.which("dpkg-deb"):
        raise Skip("dpkg-deb is not installed (tether ota reads the package's control fields)")
    w.start_cloud()
    a = w.start_agent()
    sha = "0" * 64
    for method in ("GET", "PUT"):
        r = exchange(w.api_port, req(method, f"/v1/ota/artifacts/{sha}", [f"Authorization: Bearer {w.token}"],
                                     b"x" if method == "PUT" else b""))
        expect(r.status == 501 and "ArtifactDirectory=" in r.json().get("error", ""), f"{method}: {r}")
    deb = build_deb(w.path(), "tether-hello", "1.0", files={"/usr/share/tether-hello/hello.txt": b"hello\n"},
                    arch="all")
    key = w.path("update.key")
    w.tether("ota", "keygen", key, w.path("update.pem"))
    for args in (("ota", "upload", deb), ("ota", a.device_id, deb, "--key", key)):
        r = w.tether(*args, check=False)
        expect(r.returncode == 9, f"tether {' '.join(args[:2])}: exit {r.returncode}, expected 9: {r.stderr}")
        expect("HTTP 501" in r.stderr and "ArtifactDirectory=" in r.stderr and "offline" not in r.stderr.lower(),
               f"tether {' '.join(args[:2])}: {r.stderr}")


def test_device_list_pages(w):
    """Issue 11, item 3: GET /v1/devices?page=N&per_page=M as Particle's
    product device list ({"devices","meta":{"total_pages"}}), in the order
    devices were first seen; without them the plain array as before; bad
    values are 400 with a message."""
    w.start_cloud()
    T = f"Authorization: Bearer {w.token}"
    ids = []
    for _ in range(7):
        d, dev_id = connect(w)
        ids.append(dev_id)
        d.close()

    def get(path):
        r = exchange(w.api_port, req("GET", path, [T]))
        return r, (r.json() if r.body else None)

    r, plain = get("/v1/devices")
    expect(r.status == 200 and isinstance(plain, list) and [d["id"] for d in plain] == ids, f"plain list: {r}")
    seen = []
    for page in (1, 2, 3):
        r, j = get(f"/v1/devices?page={page}&per_page=3")
        expect(r.status == 200 and j["meta"] == {"total_pages": 3, "page": page, "per_page": 3, "total": 7},
               f"page {page}: {r}")
        expect(len(j["devices"]) == (1 if page == 3 else 3), f"page {page}: {len(j['devices'])} devices")
        expect(all(set(d) >= {"id", "connected", "last_heard"} for d in j["devices"]), f"page {page} shape")
        seen += [d["id"] for d in j["devices"]]
    expect(seen == ids, f"pages {seen} != {ids}")
    r, j = get("/v1/devices?page=4&per_page=3")
    expect(r.status == 200 and j["devices"] == [] and j["meta"]["total_pages"] == 3, f"past the end: {r}")
    r, j = get("/v1/devices?page=1")
    expect(r.status == 200 and j["meta"]["per_page"] == 25 and len(j["devices"]) == 7, f"default per_page: {r}")
    r, j = get("/v1/devices?per_page=5")
    expect(r.status == 200 and j["meta"]["page"] == 1 and len(j["devices"]) == 5, f"default page: {r}")
    for q, word in (("page=0", "page"), ("page=-1", "page"), ("page=abc", "page"), ("page=", "page"),
                    ("page", "page"), ("page=1%00", "page"), ("page=01", "page"), ("page=1000000001", "page"),
                    ("page=99999999999999999999999", "page"), ("page=4294967296", "page"),
                    ("page=4294967297", "page"), ("per_page=0", "per_page"),
                    ("per_page=1001", "per_page"), ("page=1&per_page=x", "per_page"), ("per_page=+3", "per_page")):
        r, j = get(f"/v1/devices?{q}")
        expect(r.status == 400 and j["ok"] is False and j["error"].startswith(word + " must be"),
               f"?{q}: {r}")
    # tether list reads it by page and prints the same as before.
    r = w.tether("list", "--json")
    expect(json.loads(r.stdout) == get("/v1/devices")[1],
           f"tether list --json: {r.stdout[:300]}")
    lines = w.tether("list").stdout.splitlines()
    expect(lines[0].split() == ["ID", "STATUS", "LAST", "HEARD", "CERT", "NAME", "AGENT", "OS/ARCH", "TAGS"]
           and [x.split()[0] for x in lines[1:]] == ids,
           f"tether list: {lines}")
    # The largest page number is an empty page, not an overflow.
    r, j = get("/v1/devices?page=1000000000&per_page=1000")
    expect(r.status == 200 and j["devices"] == [], f"last possible page: {r}")
    # Where (page - 1) * per_page is 2^32 * 125: no wrap to the first page
    # where size_t has 32 bits.
    r, j = get("/v1/devices?page=536870913&per_page=1000")
    expect(r.status == 200 and j["devices"] == [], f"page 536870913: {r}")


FLOOD_DATA = "x" * 4000


class RawStream:
    """An event stream read by hand, from a socket with a small receive
    buffer, so that a reader that stops reading is behind soon."""

    def __init__(self, w, path):
        self.s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.s.connect(("127.0.0.1", w.api_port))
        self.s.sendall(req("GET", path, [f"Authorization: Bearer {w.token}"]))
        self.buf = b""
        self.head_done = False

    def messages(self, until, timeout=60):
        """Read SSE messages (dicts of their fields) until until(msgs) holds."""
        msgs, deadline = [], time.monotonic() + timeout * SLOW
        while not until(msgs):
            left = deadline - time.monotonic()
            if left <= 0:
                raise Failure(f"stream: timed out after {len(msgs)} messages; last {msgs[-3:]}")
            self.s.settimeout(left)
            try:
                d = self.s.recv(65536)
            except socket.timeout:
                continue
            if not d:
                raise Failure(f"stream closed after {len(msgs)} messages")
            self.buf += d
            if not self.head_done:
                head, sep, rest = self.buf.partition(b"\r\n\r\n")
                if not sep:
                    continue
                expect(b" 200 " in head.split(b"\r\n")[0], f"stream: {head[:200]!r}")
                self.head_done, self.buf = True, rest
            # Chunked: take the chunks' bytes as they are complete.
            while True:
                size, sep, rest = self.buf.partition(b"\r\n")
                if not sep:
                    break
                n = int(size, 16)
                if len(rest) < n + 2:
                    break
                self.text = getattr(self, "text", b"") + rest[:n]
                self.buf = rest[n + 2:]
            while b"\n\n" in getattr(self, "text", b""):
                block, _, self.text = self.text.partition(b"\n\n")
                fields = {}
                for line in block.decode().split("\n"):
                    if line.startswith(":"):
                        continue
                    k, _, v = line.partition(": ")
                    fields[k] = v
                if fields:
                    msgs.append(fields)
        return msgs

    def close(self):
        self.s.close()


def flood_until_behind(w, conn, prefix, first=0, limit=20000, streams=1):
    """Publish prefix/N events until the cloud says that many streams fell
    behind; returns how many were published."""
    mark = w.cloud.mark()
    n = first
    while w.cloud.count("fell more than .* bytes behind", mark) < streams:
        expect(n < limit, f"no stream fell behind after {n} events")
        conn.request("POST", "/v1/devices/events", body=form(name=f"{prefix}/{n}", data=FLOOD_DATA),
                     headers={"Authorization": f"Bearer {w.token}", "Content-Type": FORM.split(": ")[1]})
        r = conn.getresponse()
        r.read()
        expect(r.status == 200, f"publish {n}: {r.status}")
        n += 1
    return n


def publish_more(w, conn, prefix, first, count):
    for n in range(first, first + count):
        conn.request("POST", "/v1/devices/events", body=form(name=f"{prefix}/{n}", data=FLOOD_DATA),
                     headers={"Authorization": f"Bearer {w.token}", "Content-Type": FORM.split(": ")[1]})
        r = conn.getresponse()
        r.read()
        expect(r.status == 200, f"publish {n}: {r.status}")
    return first + count


def other_client_answered(w):
    t0 = time.monotonic()
    r = exchange(w.api_port, req("GET", "/v1/devices", [f"Authorization: Bearer {w.token}"]), timeout=5)
    expect(r.status == 200, f"GET /v1/devices during the flood: {r}")
    return time.monotonic() - t0


def test_slow_stream_catches_up(w):
    """Issue 11, item 6: a stream that stops reading during a flood is not
    dropped: it falls behind, reads the journal at its own pace and gets
    every event in order, then live ones; another client is answered
    meanwhile."""
    import http.client
    w.start_cloud(extra="[Events]\nJournalMaxBytes=134217728\n" + UNLIMITED)
    slow = RawStream(w, "/v1/events/flood/")
    slow.messages(lambda m: any("id" in x for x in m))  # opened: the stream's position
    other = RawStream(w, "/v1/events/other/")
    other.messages(lambda m: any("id" in x for x in m))
    conn = http.client.HTTPConnection("127.0.0.1", w.api_port, timeout=10 * SLOW)
    n = flood_until_behind(w, conn, "flood")
    took = other_client_answered(w)
    n = publish_more(w, conn, "flood", n, 200)
    # A stream that keeps reading is live all along.
    conn.request("POST", "/v1/devices/events", body=form(name="other/1", data="x"),
                 headers={"Authorization": f"Bearer {w.token}", "Content-Type": FORM.split(": ")[1]})
    expect(conn.getresponse().read() is not None, "publish other/1")
    got = other.messages(lambda m: any(x.get("event") == "other/1" for x in m))
    expect(not any(x.get("event", "").startswith("flood/") for x in got), "other stream got flood events")
    # The slow reader now reads: everything, in order, nothing lost.
    msgs = slow.messages(lambda m: any(x.get("event") == f"flood/{n - 1}" for x in m))
    events = [x for x in msgs if "event" in x]
    names = [x["event"] for x in events]
    expect(names == [f"flood/{i}" for i in range(n)],
           f"slow stream: {len(names)} events, expected {n} in order; lost notices "
           f"{[x for x in events if x['event'] == 'tether/stream/lost']}")
    ids = [int(x["id"].split("-")[1]) for x in events]
    expect(ids == list(range(ids[0], ids[0] + n)), "slow stream: ids not consecutive")
    # Live again: the next event arrives as it is published.
    publish_more(w, conn, "flood", n, 1)
    slow.messages(lambda m: any(x.get("event") == f"flood/{n}" for x in m), timeout=10)
    print(f"# {n} events of {len(FLOOD_DATA)} bytes; the stream fell behind and caught up; "
          f"another client's call took {took * 1000:.1f} ms during the flood")
    slow.close()
    other.close()
    conn.close()


def test_slow_stream_told_what_it_lost(w):
    """Issue 11, item 6: when the journal no longer holds what a slow
    stream missed, it gets an explicit tether/stream/lost event (how many,
    the first id still there) before the events that follow, and tether
    subscribe reports it on stderr."""
    import http.client
    import signal
    w.start_cloud(extra="[Events]\nJournalMaxBytes=65536\n" + UNLIMITED)
    slow = RawStream(w, "/v1/events/flood/")
    slow.messages(lambda m: any("id" in x for x in m))
    sub = w.subscribe("flood/").wait_ready()
    sub.proc.send_signal(signal.SIGSTOP)  # tether subscribe stops reading too
    conn = http.client.HTTPConnection("127.0.0.1", w.api_port, timeout=10 * SLOW)
    n = flood_until_behind(w, conn, "flood", streams=2)
    took = other_client_answered(w)
    n = publish_more(w, conn, "flood", n, 100)
    sub.proc.send_signal(signal.SIGCONT)
    msgs = slow.messages(lambda m: any(x.get("event") == f"flood/{n - 1}" for x in m))
    events = [x for x in msgs if "event" in x]
    lost = [i for i, x in enumerate(events) if x["event"] == "tether/stream/lost"]
    expect(len(lost) == 1, f"expected one lost notice, got {len(lost)}")
    notice = events[lost[0]]
    expect("id" not in notice, f"the notice carries no id: {notice}")
    info = json.loads(notice["data"])
    before, after = events[:lost[0]], events[lost[0] + 1:]
    expect(info["lost"] > 0 and after and info["first_id"] == after[0]["id"], f"notice {info}, next {after[:1]}")
    names = [x["event"] for x in before + after]
    expect(len(names) + info["lost"] == n, f"{len(names)} received + {info['lost']} lost != {n} published")
    nums = [int(x.split("/")[1]) for x in names]
    expect(nums == sorted(nums) and nums[-1] == n - 1, "events out of order")
    ids = [int(x["id"].split("-")[1]) for x in before + after]
    expect(ids[len(before)] - (ids[len(before) - 1] if before else ids[0] - info["lost"] - 1) == info["lost"] + 1,
           "the gap in ids is not what the notice says")
    # tether subscribe was behind too: it says what it missed on stderr,
    # and prints the events (never the notice) on stdout.
    sub.wait_until(lambda evs: any(e.get("name") == f"flood/{n - 1}" for e in evs), timeout=60)
    got = [e["name"] for e in sub.snapshot()]

    def warnings():
        return [line for line in list(sub.errors) if "missed" in line and "no longer in the cloud's journal" in line]
    # stdout and stderr are read by two threads: the warning, written
    # before the events that follow it, may be read after them.
    if len(got) < n:
        poll(warnings, 10, "tether subscribe's warning about the events it missed")
    warned = warnings()
    expect(len(warned) == 1 and len(got) < n, f"tether subscribe: {len(got)} of {n} events, warnings {warned}")
    expect(all(x.startswith("flood/") for x in got), "tether subscribe printed the notice as an event")
    print(f"# {n} events; {info['lost']} lost to the slow stream and said so; another client's call took "
          f"{took * 1000:.1f} ms during the flood")
    slow.close()
    conn.close()


def fill_journal(w, prefix, count, data):
    """Publish prefix/N events quickly: requests pipelined on one
    connection, answers counted."""
    s = socket.create_connection(("127.0.0.1", w.api_port))
    body = form(name=f"{prefix}/0", data=data)
    one = (f"POST /v1/devices/events HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {w.token}\r\n"
           f"{FORM}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    done = 0
    while done < count:
        batch = min(200, count - done)
        s.sendall(one * batch)
        got, buf = 0, b""
        s.settimeout(30 * SLOW)
        while got < batch:
            d = s.recv(65536)
            expect(d, f"publish connection closed after {done + got} events")
            buf += d
            got = buf.count(b"HTTP/1.1 ")
        expect(buf.count(b"HTTP/1.1 200 ") == batch, f"publish: {buf[:300]!r}")
        done += batch
    s.close()


def stream_head(w, path, last_event_id):
    """An event stream opened with Last-Event-ID; returns the socket and
    what came with its head (at least the first message)."""
    s = socket.create_connection(("127.0.0.1", w.api_port))
    s.sendall(req("GET", path, [f"Authorization: Bearer {w.token}", f"Last-Event-ID: {last_event_id}"]))
    buf, deadline = b"", time.monotonic() + 10 * SLOW
    while b"\n\n" not in buf.partition(b"\r\n\r\n")[2]:
        left = deadline - time.monotonic()
        expect(left > 0, f"stream {path}: no first message; got {buf[:300]!r}")
        s.settimeout(left)
        d = s.recv(65536)
        expect(d, f"stream {path} closed: {buf[:300]!r}")
        buf += d
    expect(b" 200 " in buf.split(b"\r\n")[0], f"stream {path}: {buf[:200]!r}")
    return s, buf


def journal_epoch_and_last(w):
    s, buf = stream_head(w, "/v1/events/nothing/", "0-0")
    s.close()
    m = [line for line in buf.decode(errors="replace").split("\n") if line.startswith("id: ")]
    expect(m, f"no id line: {buf!r}")
    epoch, _, last = m[-1][4:].strip().partition("-")
    return epoch, int(last)


def test_last_event_id_past_the_end(w):
    """A Last-Event-ID of this journal's epoch but an id it never gave
    (past its last one, up to 2^64-1) is not a place in the journal: the
    stream says so and starts live, at the journal's real end, instead of
    scanning the whole journal for nothing and then missing the events
    that came meanwhile."""
    w.start_cloud()
    fill_journal(w, "f", 20, "x")
    epoch, last = journal_epoch_and_last(w)
    for bogus in (last + 1000, 2**64 - 1):
        s, buf = stream_head(w, "/v1/events/f/", f"{epoch}-{bogus}")
        text = buf.partition(b"\r\n\r\n")[2].decode(errors="replace")
        expect(f"id: {epoch}-{last}" in text and "Last-Event-ID is past the end of the journal" in text,
               f"Last-Event-ID {bogus}: {text!r}")
        # Live from here: the next event comes.
        r = exchange(w.api_port, req("POST", "/v1/devices/events", [f"Authorization: Bearer {w.token}", FORM],
                                     form(name="f/next", data="y")))
        expect(r.status == 200, f"publish: {r}")
        s.settimeout(10 * SLOW)
        while b"event: f/next" not in buf:
            d = s.recv(65536)
            expect(d, f"stream closed: {buf[-300:]!r}")
            buf += d
        s.close()
        last += 1


def test_narrow_replay_takes_turns(w):
    """A stream replaying the journal (Last-Event-ID) with a prefix that
    matches little reads it in turns, like one that matches much: another
    client is answered before the stream has scanned to the end (its
    one matching event, the last in the journal, comes after)."""
    w.start_cloud(extra="[Events]\nJournalMaxBytes=134217728\n" + UNLIMITED)
    fill_journal(w, "fill", 12000, "z" * 8000)
    r = exchange(w.api_port, req("POST", "/v1/devices/events", [f"Authorization: Bearer {w.token}", FORM],
                                 form(name="rare/1", data="y")))
    expect(r.status == 200, f"publish: {r}")
    epoch, _ = journal_epoch_and_last(w)
    s, buf = stream_head(w, "/v1/events/rare/", f"{epoch}-0")
    other = socket.create_connection(("127.0.0.1", w.api_port))
    other.sendall(req("GET", "/v1/devices", [f"Authorization: Bearer {w.token}"]))
    # Whichever comes first: the other client's answer, or the stream's event.
    order, obuf = [], b""
    deadline = time.monotonic() + 60 * SLOW
    while len(order) < 2:
        left = deadline - time.monotonic()
        expect(left > 0, f"timed out; order {order}")
        ready, _, _ = select.select([s, other] if "other" not in order else [s], [], [], left)
        if s in ready and "stream" not in order:
            d = s.recv(65536)
            expect(d, f"stream closed: {buf[-300:]!r}")
            buf += d
            if b"event: rare/1" in buf:
                order.append("stream")
        if other in ready and "other" not in order:
            d = other.recv(65536)
            obuf += d
            if not d or b"\r\n\r\n" in obuf:
                expect(b" 200 " in obuf.split(b"\r\n")[0], f"other client: {obuf[:200]!r}")
                order.append("other")
    expect(order == ["other", "stream"], f"the other client waited for the whole scan: {order}")
    s.close()
    other.close()
    # Stopped in the middle of such a replay (suspended between turns):
    # a clean exit, not an abort in MHD_stop_daemon().
    s, _ = stream_head(w, "/v1/events/rare/", f"{epoch}-0")
    rc = w.cloud.stop()
    expect(rc == 0, f"tether-cloudd exited with {rc} when stopped during a replay")
    s.close()


def stream_lag(w):
    r = exchange(w.api_port, req("GET", "/metrics", [f"Authorization: Bearer {w.token}"]))
    expect(r.status == 200, f"/metrics: {r}")
    for line in r.body.decode().split("\n"):
        if line.startswith("tether_cloud_stream_lag_bytes "):
            return int(line.split()[1])
    raise Failure("no tether_cloud_stream_lag_bytes")


def test_behind_after_a_quiet_spell_lost_nothing(w):
    """A stream that stopped reading with its queue almost full, then
    falls behind on its next event after the journal dropped its last one
    (other events filled it), lost nothing that matched it: no
    tether/stream/lost notice, every one of its events, in order."""
    import http.client
    w.start_cloud(extra="[Events]\nJournalMaxBytes=4194304\n" + UNLIMITED)
    slow = RawStream(w, "/v1/events/rare/")
    slow.messages(lambda m: any("id" in x for x in m))
    conn = http.client.HTTPConnection("127.0.0.1", w.api_port, timeout=10 * SLOW)
    # Queue rare events until the next, a little larger, will not fit.
    n, lag, step = 0, 0, 0
    while lag + step + 64 <= 1024 * 1024:
        n = publish_more(w, conn, "rare", n, 1)
        lag, step = stream_lag(w), stream_lag(w) - lag
        expect(n < 2000, "the stream's queue does not grow")
    mark = w.cloud.mark()
    # Other events push the queued ones out of the journal.
    fill_journal(w, "fill", 1500, FLOOD_DATA)
    expect(w.cloud.count("fell more than", mark) == 0, "fell behind on events it does not match")
    r = exchange(w.api_port, req("POST", "/v1/devices/events", [f"Authorization: Bearer {w.token}", FORM],
                                 form(name=f"rare/{n}", data=FLOOD_DATA + "y" * 128)))
    expect(r.status == 200, f"publish: {r}")
    n += 1
    w.cloud.wait_line("fell more than", start=mark)
    msgs = slow.messages(lambda m: any(x.get("event") == f"rare/{n - 1}" for x in m))
    names = [x["event"] for x in msgs if "event" in x]
    expect("tether/stream/lost" not in names, f"lost notice for a stream that lost nothing: "
           f"{[x for x in msgs if x.get('event') == 'tether/stream/lost']}")
    expect(names == [f"rare/{i}" for i in range(n)], f"{len(names)} events, expected {n} in order")
    slow.close()
    conn.close()

if __name__ == "__main__":
    sys.exit(run([test_auth_matrix, test_token_checked_before_the_body,
                  test_unauthenticated_bodies_cost_bounded_memory, test_bodies_and_parameters,
                  test_stream_fields, test_ota_artifacts_not_enabled, test_device_list_pages,
                  test_slow_stream_catches_up,
                  test_slow_stream_told_what_it_lost, test_last_event_id_past_the_end,
                  test_narrow_replay_takes_turns, test_behind_after_a_quiet_spell_lost_nothing],
                 emulated="ok"))
