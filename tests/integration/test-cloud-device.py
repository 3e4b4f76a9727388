#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""tether-cloudd against a scripted device (fakedev.py): the device side of
docs/protocol.md, including devices that misbehave — stop reading, never
answer, flood, lie about liveness — and the memory they may cost."""

import http.client
import json
import os
import re
import socket
import ssl
import sys
import threading
import time
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import SLOW, Failure, expect, run, seconds, whole_seconds, with_threads, in_loop  # noqa: E402
from fakedev import (CHANGED, CONTENT, CREATED, DEFAULT_DESCRIBE, GET, OBSERVE, PING, PONG, POST, Device,  # noqa: E402
                     code, codestr, connect, frame, memory_checks, path_opts, rss_kb, tls_context)


def nfds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


class Api:
    """One kept-alive HTTP connection to the cloud's API."""

    def __init__(self, w):
        self.w = w
        self.c = http.client.HTTPConnection("127.0.0.1", w.api_port, timeout=30 * SLOW)

    def request(self, method, path, form=None):
        body = urllib.parse.urlencode(form).encode() if form is not None else None
        headers = {"Authorization": "Bearer " + self.w.token}
        if body is not None:
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        self.c.request(method, path, body=body, headers=headers)
        r = self.c.getresponse()
        return r.status, json.loads(r.read() or b"null")

    def publish(self, name, data="", **kw):
        st, j = self.request("POST", "/v1/devices/events", dict(name=name, data=data, **kw))
        expect(st == 200, f"publish {name}: {st} {j}")

    def close(self):
        self.c.close()


def call_async(w, path, form=None):
    """Start an API request in a thread; returns a function that waits for
    (status, json, seconds)."""
    res = {}
    t0 = time.monotonic()

    def go():
        a = Api(w)
        try:
            res["r"] = a.request("POST" if form is not None else "GET", path, form)
        except Exception as e:  # noqa: BLE001 - reported by the waiter
            res["e"] = e
        res["t"] = time.monotonic() - t0
        a.close()
    th = threading.Thread(target=go, daemon=True)
    th.start()

    def wait(timeout=15):
        th.join(timeout * SLOW)
        if th.is_alive():
            raise Failure(f"{path}: no HTTP answer in {timeout} s")
        if "e" in res:
            raise Failure(f"{path}: {res['e']}")
        return res["r"][0], res["r"][1], res["t"]
    return wait


def wait_eof(d, timeout=10):
    """Read (and drop) until the cloud closes the connection."""
    deadline = time.monotonic() + timeout * SLOW
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise Failure("the cloud did not close the connection")
        try:
            d.recv_raw(left / SLOW)
        except (EOFError, ConnectionError, ssl.SSLError):
            return


# --- liveness and flow control (finding 1) ------------------------------------

def test_stalled_device_costs_bounded_memory(w):
    """A subscribed device that stops reading: events for it are dropped
    past MaxQueuedBytes instead of piling up in the cloud, calls to it get
    503, and it gets everything again once it reads. The device answers
    nothing while the flood lasts, however long the machine takes for it:
    DeviceTimeoutSec is not what is tested here, nor the API's rate limits
    (off: the flood is 2,500 publishes as fast as they go)."""
    w.start_cloud(timing=f"PingSec=5\nDeviceTimeoutSec={whole_seconds(120)}\nCallTimeoutSec={whole_seconds(5)}",
                  extra="[API]\nRateLimitPerAddress=0\nRateLimitPerToken=0\n")
    d, dev = connect(w, rcvbuf=4096)
    d.subscribe("")
    api = Api(w)
    pid = w.cloud.proc.pid
    before = rss_kb(pid)
    data = "x" * 16000
    mark = w.cloud.mark()
    n = 2500  # 40 MB of events, 40 times MaxQueuedBytes
    for i in range(n):
        api.publish("flood/e", data)
    grown = (rss_kb(pid) - before) / 1024
    print(f"# {n} x 16 kB events to a device that does not read: cloud RSS grew {grown:.1f} MB")
    if memory_checks(pid):
        expect(grown < 12, f"cloud RSS grew {grown:.1f} MB for a device that does not read")
    w.cloud.wait_line(r"Device '%s' has not read \d+ bytes.*events for it are dropped" % dev, start=mark)

    st, j = api.request("POST", f"/v1/devices/{dev}/f", {"arg": "x"})
    expect(st == 503 and "not reading" in j.get("error", ""), f"call to a stalled device: {st} {j}")

    # It reads again: the Ping behind the queued events gets its Pong, and
    # new events flow.
    mark = w.cloud.mark()
    while d.recv_raw().code != PING:
        pass
    d.send(frame(PONG))
    w.cloud.wait_line(r"Device '%s' reads again; \d+ events were not delivered" % dev, start=mark)
    api.publish("after/stall", "fresh")
    m = d.wait_for(lambda m: m.code == CONTENT and m.payload and m.json().get("name") == "after/stall",
                   timeout=15, what="an event after the stall")
    expect(m.json()["data"] == "fresh", f"wrong event {m.json()}")
    api.close()


def test_own_pings_do_not_keep_a_device_alive(w):
    """Only Pongs to the cloud's Pings (and answers to its requests) prove
    life: a device that only sends is closed after DeviceTimeoutSec; one
    that answers stays."""
    timeout = whole_seconds(3)
    w.start_cloud(extra=f"[Cloud]\nPingSec=1\nDeviceTimeoutSec={timeout}\n")
    good, good_id = connect(w)
    stop = threading.Event()

    def keep_reading():
        while not stop.is_set():
            try:
                good.recv(1)
            except Failure:
                continue
            except Exception:  # noqa: BLE001 - the test below notices
                return
    th = threading.Thread(target=keep_reading, daemon=True)
    th.start()

    mute, mute_id = connect(w)
    mute.auto_pong = False
    mark = w.notify.mark()
    t0 = time.monotonic()
    limit = 3 * timeout
    ended = f"the {limit} s limit"
    # Busy but deaf: its own Pings (answered by the cloud) and publishes,
    # while it waits for the cloud to give up on it.
    try:
        while time.monotonic() - t0 < limit:
            mute.send(frame(PING))
            mute.wait_for(lambda m: m.code == PONG, timeout=5)
            mute.publish("mute/alive", b"1")
            try:
                mute.recv(0.3)
            except Failure:
                pass
    except (EOFError, ConnectionError, ssl.SSLError) as e:
        ended = repr(e)
    took = time.monotonic() - t0
    w.cloud.wait_line(r"Device '%s' answered nothing for %ds" % (mute_id, timeout))
    w.notify.wait(lambda m: m.get("X_TETHER_OFFLINE") == mute_id, 5,
                  f"mute device offline (its loop ended after {took:.1f} s: {ended})", mark)
    print(f"# a device that sends but never answers was closed after {took:.1f} s (DeviceTimeoutSec={timeout})")
    expect(took < 2 * timeout, f"closing the mute device took {took:.1f} s")

    devices = {x["id"]: x for x in json.loads(w.tether("list", "--json").stdout)}
    expect(devices[good_id]["connected"], "the device that answers Pings was dropped")
    expect(not devices[mute_id]["connected"], "the mute device is still listed online")
    stop.set()
    th.join(5)


def test_unasked_pong_closes_session(w):
    w.start_cloud()
    d, dev = connect(w)
    mark = w.notify.mark()
    d.send(frame(PONG))
    wait_eof(d)
    w.notify.wait(lambda m: m.get("X_TETHER_OFFLINE") == dev, 5, "device offline", mark)
    w.cloud.wait_line(r"Device '%s' sent a Pong to no Ping" % dev)


def test_device_that_sends_without_reading_is_closed(w):
    """Each request costs an answer that waits for the device: a device that
    floods requests and reads nothing is disconnected, not buffered for."""
    w.start_cloud(extra="[Cloud]\nMaxQueuedBytes=65536\n")
    d, dev = connect(w, rcvbuf=4096)
    pid = w.cloud.proc.pid
    before = rss_kb(pid)
    batch = b"".join(frame(POST, i.to_bytes(2, "big"), path_opts("e/spam")) for i in range(1000))
    try:
        for _ in range(200):
            d.send(batch)
    except (ConnectionError, ssl.SSLError, socket.timeout):
        pass
    w.cloud.wait_line(r"Device '%s' keeps sending but has not read \d+ bytes sent to it, closing" % dev)
    grown = (rss_kb(pid) - before) / 1024
    print(f"# device flooding requests without reading: closed; cloud RSS grew {grown:.1f} MB")
    if memory_checks(pid):
        expect(grown < 8, f"cloud RSS grew {grown:.1f} MB")
    wait_eof(d)


def test_busy_device_that_reads_stays(w):
    """The other side of the above: a device that publishes as fast as it
    can but reads its answers (and Pings), and a subscriber that reads, are
    never held back or dropped. Periodic Pings are far off: only the flow
    control's own Pings keep them going."""
    # Flow control, not the per-device limits (test-authz.py): those off.
    w.start_cloud(extra="[Cloud]\nMaxQueuedBytes=262144\nPingSec=60\nDeviceTimeoutSec=120\n"
                        "[Events]\nDeviceEventRate=0\nDeviceByteRate=0\n")
    d, dev = connect(w)
    other, _ = connect(w)
    other.subscribe("busy/")
    total, batch = 8000, 200
    received = []
    errors = []
    cond = threading.Condition()

    def subscriber():
        try:
            while len(received) < total:
                m = other.recv(15)
                if m.code == CONTENT and m.payload:
                    with cond:
                        received.append(int(m.json()["data"]))
                        cond.notify_all()
        except Exception as e:  # noqa: BLE001 - reported below
            with cond:
                errors.append(e)
                cond.notify_all()
    th = threading.Thread(target=subscriber, daemon=True)
    th.start()
    t0 = time.monotonic()
    for k in range(0, total, batch):
        d.send(b"".join(frame(POST, i.to_bytes(2, "big"), path_opts("e/busy/x"), b"%d" % i)
                        for i in range(k, k + batch)))
        for _ in range(batch):
            m = d.recv()
            expect(m.code == CREATED, f"publish answered {m}")
        # A subscriber that keeps up (here: whatever the machine's load,
        # it reads each batch before the next is published).
        with cond:
            cond.wait_for(lambda: len(received) >= k + batch or errors, 15 * SLOW)
    th.join(20 * SLOW)
    took = time.monotonic() - t0
    print(f"# {total} pipelined publishes ({batch} in flight) routed in {took:.1f} s; "
          f"Pings answered: publisher {d.pings}, subscriber {other.pings}")
    expect(not errors and received == list(range(total)),
           f"subscriber got {len(received)} of {total} events in order ({errors})")
    expect(d.pings > 0, "the publisher was never asked for proof of reading")
    expect(not [x for x in w.cloud.lines if "not read" in x or "disconnected" in x], "a device was held back")


# --- sessions that never become devices (finding 2) -----------------------------

def closed(s, timeout):
    """Whether the peer closed socket s within timeout seconds."""
    s.settimeout(max(0.1, timeout))
    try:
        return s.recv(4096) == b""
    except socket.timeout:
        return False
    except OSError:
        return True


def idle_connections(w, n):
    """n TCP connections to the device port that never finish a TLS
    handshake (every other one sends half a ClientHello)."""
    socks = []
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", w.coap_port))
        if i % 2:
            s.sendall(b"\x16\x03\x01\x00\xc8\x01\x00\x00\xc4\x03\x03")  # a ClientHello that never ends
        socks.append(s)
    return socks


def test_handshake_deadline_and_cap(w):
    """Idle or half-open connections: at most MaxHandshakes are held; at
    that cap the cloud stops accepting until the oldest has had
    HandshakeGraceSec, then each new connection displaces the oldest; the
    rest are closed after HandshakeTimeoutSec; a real device gets in."""
    timeout, grace = whole_seconds(4), 1
    # One listener: with several (SessionShards) the kernel queues each
    # connection on one of them, and the cloud accepts in the order of
    # each queue, not in the order of connecting that this test checks.
    w.start_cloud(extra=f"[Cloud]\nHandshakeTimeoutSec={timeout}\nMaxHandshakes=50\nHandshakeGraceSec={grace}\n"
                  "SessionShards=1\n")
    pid = w.cloud.proc.pid
    base = nfds(pid)
    socks = idle_connections(w, 100)
    t0 = time.monotonic()
    w.cloud.wait_line(r"MaxHandshakes=50 sessions in the TLS handshake: not accepting new connections")
    held = nfds(pid) - base
    print(f"# 100 idle connections, MaxHandshakes=50: the cloud holds {held} of them")
    expect(held <= 50 + 2, f"the cloud holds {held} unauthenticated connections")

    # The first 50 make room for the next 50 once they have had their grace,
    # before HandshakeTimeoutSec.
    for s in socks[:50]:
        expect(closed(s, t0 + timeout - 0.5 - time.monotonic()), "an idle connection kept its place past "
               "HandshakeGraceSec while others waited")
    took = time.monotonic() - t0
    print(f"# the first 50 were displaced after {took:.1f} s (HandshakeGraceSec={grace})")
    expect(took > grace - 0.5, f"idle connections displaced after {took:.1f} s, before HandshakeGraceSec={grace}")
    w.cloud.wait_line(r"MaxHandshakes=50 sessions in the TLS handshake: closed the oldest")
    held = nfds(pid) - base
    expect(held <= 50 + 2, f"the cloud holds {held} unauthenticated connections")

    # The rest are closed by HandshakeTimeoutSec, nobody waiting behind them.
    for s in socks[50:]:
        expect(closed(s, t0 + grace + timeout + seconds(3) - time.monotonic()),
               "connection open past HandshakeTimeoutSec")
    took = time.monotonic() - t0
    print(f"# the last idle connection was closed after {took:.1f} s (HandshakeTimeoutSec={timeout})")
    expect(took > timeout - 1, f"idle connections closed after {took:.1f} s, before HandshakeTimeoutSec={timeout}")
    w.cloud.wait_line(r"did not complete the TLS handshake within HandshakeTimeoutSec=%d" % timeout)

    # A device gets in and works.
    d, dev = connect(w)
    st, _ = Api(w).request("GET", f"/v1/devices/{dev}")
    expect(st == 200, f"device lookup {st}")
    expect(nfds(pid) <= base + 3, f"fds: {nfds(pid)} now, {base} before")
    for s in socks:
        s.close()
    expect(json.loads(w.tether("describe", dev, "--json").stdout)["connected"], "the device was dropped")


def test_idle_flood_does_not_hold_the_door(w):
    """MaxHandshakes idle connections opened first cannot keep a real
    device out for HandshakeTimeoutSec: it is online once the oldest has
    had HandshakeGraceSec (default 2 s), on its first connection."""
    timeout, n = whole_seconds(20), 8
    w.start_cloud(extra=f"[Cloud]\nHandshakeTimeoutSec={timeout}\nMaxHandshakes={n}\n")
    socks = idle_connections(w, n)
    w.cloud.wait_line(rf"MaxHandshakes={n} sessions in the TLS handshake: not accepting new connections")
    deadline = 2 + seconds(5)
    expect(deadline < timeout, "the test cannot tell the grace from the timeout")
    t0 = time.monotonic()
    d, dev = connect(w, timeout=deadline / SLOW)
    took = time.monotonic() - t0
    print(f"# behind {n} idle connections (MaxHandshakes={n}, HandshakeTimeoutSec={timeout}): "
          f"the device was online after {took:.1f} s")
    expect(took < deadline, f"the device took {took:.1f} s behind {n} idle connections")
    w.cloud.wait_line(rf"MaxHandshakes={n} sessions in the TLS handshake: closed the oldest")
    expect(closed(socks[0], 1), "the oldest idle connection is still open")
    for s in socks:
        s.close()
    d.close()


def test_handshake_storm_all_bind(w):
    """Many devices connecting at once with MaxHandshakes=4: every one gets
    online on its first connection (none closed, none timed out)."""
    # A handshake here takes milliseconds; HandshakeGraceSec scaled like
    # every time window, so that a busy machine does not displace them.
    w.start_cloud(extra=f"[Cloud]\nMaxHandshakes=4\nHandshakeGraceSec={whole_seconds(2)}\n")
    n = 60
    devs = [w.new_device() for _ in range(n)]
    mark = w.notify.mark()
    socks, errors = [None] * n, []

    def one(i):
        try:
            d = Device(w.coap_port, devs[i][1], devs[i][2], w.path("pki", "ca.crt"))
            d.handshake()
            socks[i] = d
        except Exception as e:  # noqa: BLE001 - counted below
            errors.append(f"{devs[i][0]}: {e!r}")
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expect(not errors, f"{len(errors)} of {n} devices failed: {errors[:3]}")
    online = set()
    w.notify.wait(lambda m: (online.add(m["X_TETHER_ONLINE"]) if "X_TETHER_ONLINE" in m else None) or
                  len(online) == n, 30, f"{n} devices online", mark)
    w.cloud.wait_line(r"MaxHandshakes=4 sessions in the TLS handshake: not accepting")
    expect(w.cloud.count(r"disconnected") == 0, "a device was disconnected during the storm")
    expect(w.cloud.count(r"closed the oldest") == 0, "a device's handshake was displaced during the storm")
    print(f"# {n} devices at once, MaxHandshakes=4: {len(online)} online, 0 retries")
    for d in socks:
        d.close()


# --- TLS (finding 7) ----------------------------------------------------------

def test_tls_resumption_attempt_gets_full_handshake(w):
    """A client offering its old session is resumed with TLS 1.3 (the
    cloud issues one ticket per full handshake, docs/cloud.md "TLS session
    resumption") and gets a full handshake with TLS 1.2 (whose resumption
    has no (EC)DHE), never an internal-error alert, and is online either
    way."""
    w.start_cloud()
    for version in (None, ssl.TLSVersion.TLSv1_2):
        dev, cert, key = w.new_device()
        ctx = tls_context(cert, key, w.path("pki", "ca.crt"), max_version=version)
        d, _ = connect(w, device=(dev, cert, key), ctx=ctx)
        d.send(frame(PING))
        d.wait_for(lambda m: m.code == PONG, what="Pong")  # post-handshake tickets would be in by now
        sess = d.s.session
        tls13 = d.s.version() == "TLSv1.3"
        expect(sess.has_ticket == tls13, f"{d.s.version()}: session ticket: {sess.has_ticket}")
        d.close()
        d2, _ = connect(w, device=(dev, cert, key), ctx=ctx, session=sess)
        expect(d2.s.session_reused == tls13, f"{d2.s.version()}: resumed: {d2.s.session_reused}")
        d2.send(frame(PING))
        d2.wait_for(lambda m: m.code == PONG, what="Pong after the reconnect")
        print(f"# {d2.s.version()}: reconnect offering the old session: "
              f"{'resumed' if d2.s.session_reused else 'full handshake'}, online")
        d2.close()


# --- describe (finding 11 and the gaps) ---------------------------------------

def test_post_d_flood_one_describe_at_a_time(w):
    """POST /d asks for GET /d; while one is out, more POST /d only ask for
    one more GET /d once it is answered."""
    w.start_cloud()
    d, dev = connect(w)

    # A call is a barrier: whatever the cloud scheduled before it goes out first.
    def barrier(fn, result):
        wait = call_async(w, f"/v1/devices/{dev}/{fn}", {"arg": ""})
        seen = []
        m = d.wait_for(lambda m: m.code == POST and m.path == "f/" + fn, what="POST /f/" + fn, seen=seen)
        d.answer(m, CHANGED, str(result).encode())
        st, j, _ = wait()
        expect(st == 200 and j["return_value"] == result, f"call {fn}: {st} {j}")
        return [m for m in seen if m.code == GET and m.path == "d"]

    t = d.request(POST, "d")
    expect(d.response(t).code == CHANGED, "POST /d not answered 2.04")
    first = d.wait_for(lambda m: m.code == GET and m.path == "d", what="GET /d")
    n = 2000
    d.send(b"".join(frame(POST, i.to_bytes(2, "big"), path_opts("d")) for i in range(n)))
    gets, acks = [], 0
    while acks < n:
        m = d.recv()
        if m.code == GET and m.path == "d":
            gets.append(m)
        elif m.code == CHANGED:
            acks += 1
        else:
            raise Failure(f"unexpected {m}")
    gets += barrier("f", 1)
    print(f"# {n} POST /d while GET /d is unanswered: the cloud sent {len(gets)} more GET /d")
    expect(not gets, f"{len(gets)} more GET /d for {n} POST /d")

    mark = w.notify.mark()
    d.answer(first, CONTENT, json.dumps(dict(DEFAULT_DESCRIBE, functions=["old"])).encode(), cf=50)
    w.notify.wait(lambda m: m.get("X_TETHER_DESCRIBED") == dev, 5, "describe done", mark)
    again = d.wait_for(lambda m: m.code == GET and m.path == "d", what="the GET /d asked for meanwhile")
    mark = w.notify.mark()
    d.answer(again, CONTENT, json.dumps(dict(DEFAULT_DESCRIBE, functions=["new"])).encode(), cf=50)
    w.notify.wait(lambda m: m.get("X_TETHER_DESCRIBED") == dev, 5, "second describe done", mark)
    st, j = Api(w).request("GET", f"/v1/devices/{dev}")
    expect(j["functions"] == ["new"], f"describe cache after the second GET /d: {j}")
    extra = barrier("new", 7)
    expect(not extra, f"a third GET /d: {extra}")


def test_bad_describe_documents(w):
    w.start_cloud()
    for bad in (b"{not json", json.dumps({"functions": "f"}).encode(), b"\xff\xfe"):
        dev, cert, key = w.new_device()
        mark = w.notify.mark()
        d = Device(w.coap_port, cert, key, w.path("pki", "ca.crt"))
        m = d.handshake(answer_describe=False)
        d.answer(m, CONTENT, bad, cf=50)
        w.wait_online(dev, mark)
        w.cloud.wait_line(r"Device '%s' sent an invalid describe document" % dev)
        st, j = Api(w).request("GET", f"/v1/devices/{dev}")
        expect(st == 200 and j["connected"] and j["functions"] == [] and j["variables"] == {},
               f"device after a bad describe: {st} {j}")
        # The device still serves.
        d.publish("still/here", b"ok")
        d.close()
    dev, cert, key = w.new_device()
    d = Device(w.coap_port, cert, key, w.path("pki", "ca.crt"))
    m = d.handshake(answer_describe=False)
    d.answer(m, code(4, 4), b"no describe here")
    w.cloud.wait_line(r"Device '%s' answered GET /d with 4.04" % dev)


# --- publish and subscribe ----------------------------------------------------

def test_publish_errors_and_private(w):
    w.start_cloud(extra="[Cloud]\nMaxPayload=1000\n")
    d, dev = connect(w)
    other, _ = connect(w)
    other.subscribe("p/")
    sub = w.subscribe("p/").wait_ready()
    for data, want in ((b"\xc3\x28", code(4, 0)), (b"a\x00b", code(4, 0)), (b"x" * 1001, code(4, 13))):
        r = d.publish("p/bad", data)
        expect(r.code == want, f"publish {data[:10]!r}: {codestr(r.code)}, expected {codestr(want)}")
    for name in ("p//x", "/p", "p/" + "x" * 200):
        t = d.request(POST, "e/" + name, b"x")
        r = d.response(t)
        expect(r.code == code(4, 0), f"publish to {name[:20]!r}: {codestr(r.code)}")
    r = d.publish("p/ok", b"x" * 1000, ttl=3000000000, private=True)
    expect(r.code == CREATED, f"valid publish: {codestr(r.code)}")
    ev = sub.wait(lambda e: e.get("name") == "p/ok", what="p/ok on the event stream")
    expect(ev.get("private") is True, f"SSE lost the private flag: {ev}")
    expect(ev.get("ttl") == 3000000000, f"SSE ttl: {ev.get('ttl')}")
    # Another device's private event reaches the streams only; the next
    # notification the subscribed device gets is the public one.
    r = d.publish("p/public", b"y", ttl=3000000000)
    expect(r.code == CREATED, f"public publish: {codestr(r.code)}")
    m = other.wait_for(lambda m: m.code == CONTENT and m.payload, what="notification")
    j = m.json()
    expect(j["name"] == "p/public" and "private" not in j and j["ttl"] == 3000000000 and j["coreid"] == dev,
           f"notification {j}")
    sub.close()


def test_subscription_limit_and_unsubscribe(w):
    w.start_cloud(extra="[Cloud]\nMaxSubscriptions=2\n")
    d, dev = connect(w)
    api = Api(w)
    r1, t1 = d.subscribe("a/")
    r2, t2 = d.subscribe("b/")
    expect(r1.code == CONTENT and r1.opt(OBSERVE) and r2.code == CONTENT, f"subscribe: {r1} {r2}")
    r3, _ = d.subscribe("c/")
    expect(r3.code == code(4, 3), f"third subscription: {codestr(r3.code)}")
    r = d.unsubscribe("a/", t1)
    expect(r.code == CONTENT and not r.opt(OBSERVE), f"unsubscribe: {r}")
    r3, t3 = d.subscribe("c/")
    expect(r3.code == CONTENT, f"subscription after unsubscribe: {codestr(r3.code)}")
    api.publish("a/x", "gone")  # unsubscribed: must not arrive
    api.publish("c/x", "here")
    m = d.wait_for(lambda m: m.code == CONTENT and m.payload, what="an event")
    expect(m.token == t3 and m.json()["name"] == "c/x", f"got {m.json()} first")


def test_oversize_for_device_max_message_size_logged_once(w):
    w.start_cloud()
    dev, cert, key = w.new_device()
    mark = w.notify.mark()
    d = Device(w.coap_port, cert, key, w.path("pki", "ca.crt"))
    d.handshake(max_message_size=600)
    w.wait_online(dev, mark)
    d.subscribe("")
    api = Api(w)
    start = w.cloud.mark()
    for i in range(3):
        api.publish(f"big/{i}", "y" * 2000)
    api.publish("small/one", "ok")
    m = d.wait_for(lambda m: m.code == CONTENT and m.payload, what="the small event")
    expect(m.json()["name"] == "small/one", f"got {m.json()}")
    connect(w)  # its log line is a barrier for the ones before
    w.cloud.wait_line(r"Device '\w+' connected", start=start)
    lines = [x for x in w.cloud.lines[start:] if "Max-Message-Size" in x]
    expect(len(lines) == 1, f"{len(lines)} warnings: {lines}")
    expect(re.search(r"at most \d+ bytes .*event 'big/0'", lines[0]), lines[0])


# --- calls ----------------------------------------------------------------------

def test_call_timeout_and_offline(w):
    timeout = whole_seconds(2)
    w.start_cloud(extra=f"[Cloud]\nCallTimeoutSec={timeout}\n")
    d, dev = connect(w)
    wait = call_async(w, f"/v1/devices/{dev}/f", {"arg": "1"})
    d.wait_for(lambda m: m.code == POST and m.path == "f/f", what="POST /f/f")
    st, j, t = wait()
    expect(st == 504 and j["ok"] is False and "Timed out" in j["error"], f"unanswered call: {st} {j}")
    expect(t >= timeout - 0.5, f"504 after {t:.1f} s, CallTimeoutSec={timeout}")

    wait = call_async(w, f"/v1/devices/{dev}/v")
    d.wait_for(lambda m: m.code == GET and m.path == "v/v", what="GET /v/v")
    d.close()
    st, j, t = wait()
    print(f"# device disconnected during a call: HTTP {st} after {t:.2f} s")
    expect(st == 503 and "went offline" in j["error"], f"call to a device that left: {st} {j}")
    expect(t < timeout - 0.5, f"503 only after {t:.1f} s, CallTimeoutSec={timeout}")


def test_session_replaced_by_same_device(w):
    w.start_cloud()
    d1, dev = connect(w)
    wait = call_async(w, f"/v1/devices/{dev}/f", {"arg": "1"})
    d1.wait_for(lambda m: m.code == POST and m.path == "f/f", what="POST /f/f")
    d2, _ = connect(w, device=(dev, d1.cert, d1.key))
    st, j, _ = wait()
    expect(st == 503 and "reconnected" in j["error"], f"call on the replaced session: {st} {j}")
    wait_eof(d1)
    devices = [x for x in json.loads(w.tether("list", "--json").stdout) if x["id"] == dev]
    expect(len(devices) == 1 and devices[0]["connected"], f"device list {devices}")
    wait = call_async(w, f"/v1/devices/{dev}/f", {"arg": "2"})
    m = d2.wait_for(lambda m: m.code == POST and m.path == "f/f", what="POST /f/f on the new session")
    d2.answer(m, CHANGED, b"2")
    st, j, _ = wait()
    expect(st == 200 and j["return_value"] == 2, f"call on the new session: {st} {j}")


def test_device_error_answers(w):
    """What a device says goes to the API caller as JSON, cut cleanly."""
    w.start_cloud()
    d, dev = connect(w)

    def answered(c, payload):
        wait = call_async(w, f"/v1/devices/{dev}/f", {"arg": "x"})
        m = d.wait_for(lambda m: m.code == POST and m.path == "f/f", what="POST /f/f")
        d.answer(m, c, payload)
        return wait()[:2]
    st, j = answered(code(5, 0), b"")
    expect(st == 502 and j == {"ok": False, "error": "Device error 5.00"}, f"5.00, no text: {st} {j}")
    st, j = answered(code(5, 3), b"busy")
    expect(st == 503 and j["error"] == "busy" and j["info"] == "Device error 5.03", f"5.03: {st} {j}")
    st, j = answered(code(4, 4), b"")
    expect(st == 404 and j["error"] == "Function 'f' not found", f"4.04: {st} {j}")
    # 254 ASCII bytes then 'é': the 255-byte cut falls inside it.
    text = "a" * 254 + "é" * 20
    st, j = answered(code(4, 0), text.encode())
    expect(st == 400 and j["error"] == "a" * 254, f"cut diagnostic: {st} {j['error'][-10:]!r}")
    st, j = answered(code(4, 0), b"bad \xff utf-8")
    expect(st == 400 and j["error"] == "Device rejected the request", f"non-UTF-8 diagnostic: {st} {j}")
    st, j = answered(CHANGED, b"12x")
    expect(st == 502 and "invalid function result" in j["error"], f"bad result: {st} {j}")


if __name__ == "__main__":
    sys.exit(run([test_stalled_device_costs_bounded_memory, test_own_pings_do_not_keep_a_device_alive,
                  test_unasked_pong_closes_session, test_device_that_sends_without_reading_is_closed,
                  test_busy_device_that_reads_stays,
                  test_handshake_deadline_and_cap, test_idle_flood_does_not_hold_the_door,
                  test_handshake_storm_all_bind,
                  test_tls_resumption_attempt_gets_full_handshake,
                  test_post_d_flood_one_describe_at_a_time, test_bad_describe_documents,
                  test_publish_errors_and_private, test_subscription_limit_and_unsubscribe,
                  test_oversize_for_device_max_message_size_logged_once, test_call_timeout_and_offline,
                  test_session_replaced_by_same_device, test_device_error_answers,
                  with_threads(test_handshake_deadline_and_cap), with_threads(test_idle_flood_does_not_hold_the_door),
                  with_threads(test_handshake_storm_all_bind),
                  with_threads(test_tls_resumption_attempt_gets_full_handshake),
                  in_loop(test_handshake_deadline_and_cap), in_loop(test_idle_flood_does_not_hold_the_door),
                  in_loop(test_handshake_storm_all_bind), in_loop(test_tls_resumption_attempt_gets_full_handshake)],
                 emulated='its memory and timeout bounds are timed for native speed'))
