#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Webhooks ([Webhook NAME] in tether-cloudd.conf, docs/integrations.md):
a local HTTPS receiver (tests/integration/hookkit.py, its own CA made with
openssl) gets every event once per idempotency key, signed; a receiver
that is down or answers 503 gets every event after it is back, in order
per device; a cloud restarted while the queue holds events loses none; bad
Secret= and URL= stop tether-cloudd with the file and line.

Events come from the test plugin "pump" (tests/plugins/pump.c: "pump/n"
events numbered 1, 2, 3... per device) and from the API
(POST /v1/devices/events, coreid "api")."""

import os
import re
import subprocess
import sys
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import CLOUDD, EMULATOR, SLOWDOWN, TEST_PLUGINS, expect, run, seconds  # noqa: E402
from hookkit import Receiver, make_pki  # noqa: E402

SECRET = "a test secret of 32 bytes, ok!!!"
KEY_RE = re.compile(r"^[0-9a-f]{16}-[0-9]+$")
UNLIMITED = "[API]\nRateLimitPerAddress=0\nRateLimitPerToken=0\n"


def hook_conf(url, ca=None, prefix="pump/", name="hook", secret=SECRET, timeout=None):
    lines = [f"[Webhook {name}]", f"URL={url}", f"Secret={secret}", f"Prefix={prefix}"]
    if ca:
        lines.append(f"CAFile={ca}")
    if timeout:
        lines.append(f"Timeout={timeout}")
    return "\n".join(lines) + "\n"


def receiver(w, **kw):
    ca, crt, key = make_pki(w.path("hook-pki"))
    r = Receiver(SECRET, crt, key, **kw)
    w.cleanups.append(r.close)
    return r, ca


def delivered(reqs):
    """The requests answered 2xx, in the order they were answered."""
    return [q for q in reqs if 200 <= q.status <= 299]


def numbers_by_device(reqs, name="pump/n"):
    """{coreid: [the events' numbers, in the order they were delivered]}."""
    out = {}
    for q in delivered(reqs):
        if q.json and q.json.get("event") == name:
            out.setdefault(q.json["coreid"], []).append(int(q.json["data"]))
    return out


def have_all(devices, total, name="pump/n"):
    def check(reqs):
        got = numbers_by_device(reqs, name)
        return all(len(set(got.get(d, ()))) >= total for d in devices)
    return check


def check_requests(reqs):
    """What every request must be: signed, the headers of the SPEC, the
    key in the body and the headers, the same body for the same key."""
    bodies = {}
    for q in reqs:
        h = q.headers
        expect(q.sig_ok, f"bad signature {h.get('X-Tether-Signature')!r} on {q}")
        expect(q.path == "/hook", f"request for {q.path}")
        expect(h.get("Content-Type") == "application/json", f"Content-Type {h.get('Content-Type')!r}")
        expect(h.get("User-Agent", "").startswith("tether-cloudd/"), f"User-Agent {h.get('User-Agent')!r}")
        expect(h.get("X-Tether-Webhook") == "hook", f"X-Tether-Webhook {h.get('X-Tether-Webhook')!r}")
        expect(q.key and KEY_RE.match(q.key), f"Idempotency-Key {q.key!r}")
        expect(h.get("X-Tether-Event-Id") == q.key, f"X-Tether-Event-Id {h.get('X-Tether-Event-Id')!r} != {q.key}")
        j = q.json
        expect(j is not None and j.get("id") == q.key and j.get("integration") == "hook", f"body {q.body!r}")
        for field in ("event", "data", "coreid", "published_at", "received_at", "ttl", "public"):
            expect(field in j, f"no {field} in {q.body!r}")
        expect(bodies.setdefault(q.key, q.body) == q.body, f"two bodies for {q.key}: {bodies[q.key]!r}, {q.body!r}")


def check_in_order(got, devices, total, what, once=True):
    for d in devices:
        seq = got.get(d, [])
        if once:
            expect(seq == list(range(1, total + 1)),
                   f"{what}: device {d}: {len(seq)} deliveries for {total} events: {seq[:8]}...{seq[-8:]}")
        else:
            # At least once: a resent event comes again after the ones
            # delivered with it, never before an earlier one is.
            first = []
            for n in seq:
                if n not in first:
                    first.append(n)
            expect(first == list(range(1, total + 1)),
                   f"{what}: device {d}: first deliveries {first[:8]}...{first[-8:]} of {total}")


def check_one_at_a_time(reqs, name="pump/n"):
    """docs/integrations.md: an event is sent only when no earlier event
    of the same device is in flight or failed. So each request of a
    device (answered 2xx or not) came after the receiver began answering
    the device's previous one."""
    last = {}
    for q in sorted(reqs, key=lambda q: q.arrived):
        if not (q.json and q.json.get("event") == name):
            continue
        d = q.json["coreid"]
        p = last.get(d)
        expect(p is None or q.arrived > p.seq,
               f"device {d}: event {q.json['data']} sent while event {p.json['data'] if p else ''} was in flight")
        last[d] = q


def api_publish(w, conn, name, data):
    body = urllib.parse.urlencode({"name": name, "data": data}).encode()
    conn.request("POST", "/v1/devices/events", body=body,
                 headers={"Authorization": f"Bearer {w.token}",
                          "Content-Type": "application/x-www-form-urlencoded"})
    r = conn.getresponse()
    r.read()
    expect(r.status == 200, f"publish {name}: {r.status}")


def api_conn(w):
    import http.client
    return http.client.HTTPConnection("127.0.0.1", w.api_port, timeout=seconds(30))


def test_every_event_once_signed(w):
    """Two devices publish; the receiver gets each event once, per device
    in publish order, with a valid signature and the SPEC's headers; an
    event outside Prefix= is not sent."""
    rx, ca = receiver(w)
    w.start_cloud(extra=hook_conf(rx.url, ca) + UNLIMITED)
    total = max(200 // SLOWDOWN, 40)
    agents = [w.start_agent(name=f"agent{i}", plugin_dir=TEST_PLUGINS, extra="[Plugins]\nEnable=pump\n")
              for i in (1, 2)]
    devices = [a.device_id for a in agents]
    conn = api_conn(w)
    api_publish(w, conn, "other/x", "not for the hook")
    for a in agents:
        w.tether("call", a.device_id, "start", f"1,{total},200")
    rx.wait(have_all(devices, total), 60, f"{total} events of each device")
    api_publish(w, conn, "pump/last", "end")
    rx.wait(lambda reqs: any(q.json and q.json.get("event") == "pump/last" for q in reqs), 30, "pump/last")
    reqs = rx.snapshot()
    check_requests(reqs)
    keys = [q.key for q in reqs]
    expect(len(keys) == len(set(keys)), f"{len(keys) - len(set(keys))} events sent twice without a failure")
    expect(not any(q.json.get("event") == "other/x" for q in reqs), "an event outside Prefix= was sent")
    check_one_at_a_time(reqs)
    check_in_order(numbers_by_device(reqs), devices, total, "steady flow")
    j = reqs[0].json
    expect(j["coreid"] in devices and j["data"] == "1" and j["public"] in (True, False), f"first body {j}")


def test_receiver_down_and_503(w):
    """The receiver goes away while two devices keep publishing, comes back
    answering 503 for a while, then 200: every event arrives, once, in
    order per device."""
    rx, ca = receiver(w)
    w.start_cloud(extra=hook_conf(rx.url, ca) + UNLIMITED)
    total = max(300 // SLOWDOWN, 60)
    agents = [w.start_agent(name=f"agent{i}", plugin_dir=TEST_PLUGINS, extra="[Plugins]\nEnable=pump\n")
              for i in (1, 2)]
    devices = [a.device_id for a in agents]
    for a in agents:
        w.tether("call", a.device_id, "start", f"1,{total},100")
    rx.wait(lambda reqs: len(delivered(reqs)) >= 10, 30, "the first events")
    rx.stop()
    # The cloud keeps taking events while the receiver is away.
    sub = w.subscribe("pump/").wait_ready()
    sub.wait_until(lambda evs: all(sum(1 for e in evs if e.get("coreid") == d) >= total // 4 for d in devices),
                   30, "events while the receiver is down")
    rx.set_status(503)
    rx.start()
    rx.wait(lambda reqs: sum(1 for q in reqs if q.status == 503) >= 3, 60, "three requests answered 503")
    rx.set_status(200)
    rx.wait(have_all(devices, total), 120, f"all {total} events of each device after the receiver came back")
    reqs = rx.snapshot()
    check_requests(reqs)
    ok = [q.key for q in delivered(reqs)]
    expect(len(ok) == len(set(ok)), f"{len(ok) - len(set(ok))} events delivered twice")
    check_one_at_a_time(reqs)
    check_in_order(numbers_by_device(reqs), devices, total, "after an outage")
    # Each event refused with 503 came again with the same key and body.
    refused = {q.key for q in reqs if q.status == 503}
    expect(refused <= set(ok), f"events answered 503 never delivered: {sorted(refused - set(ok))[:5]}")


def test_cloud_restart_keeps_the_queue(w):
    """Events queued for a receiver that is down survive a restart of
    tether-cloudd (SIGTERM, then SIGKILL with the receiver up and events
    in flight): nothing is lost, the order per device holds."""
    rx, ca = receiver(w)
    rx.stop()
    w.start_cloud(extra=hook_conf(rx.url, ca, prefix="q/") + UNLIMITED)
    first = 40
    conn = api_conn(w)
    for n in range(1, first + 1):
        api_publish(w, conn, "q/n", str(n))
    conn.close()
    expect(w.cloud.stop() == 0, "tether-cloudd did not exit cleanly")
    w.start_cloud(extra=hook_conf(rx.url, ca, prefix="q/") + UNLIMITED, port=w.coap_port, api_port=w.api_port)
    conn = api_conn(w)
    second = 80
    for n in range(first + 1, second + 1):
        api_publish(w, conn, "q/n", str(n))
    rx.start()
    rx.wait(have_all(["api"], second, "q/n"), 60, f"events 1..{second} after the restart")

    # Now while the receiver takes them: killed in the middle, at least
    # once (resent ones allowed), in order, none missing.
    third = 400
    for n in range(second + 1, third + 1):
        api_publish(w, conn, "q/n", str(n))
    conn.close()
    rx.wait(lambda reqs: len(numbers_by_device(reqs, "q/n").get("api", ())) >= second + 20, 60,
            "deliveries after the restart")
    w.cloud.kill()
    w.start_cloud(extra=hook_conf(rx.url, ca, prefix="q/") + UNLIMITED, port=w.coap_port, api_port=w.api_port)
    rx.wait(have_all(["api"], third, "q/n"), 60, f"events 1..{third} after a kill")
    reqs = rx.snapshot()
    check_requests(reqs)
    check_in_order(numbers_by_device(reqs, "q/n"), ["api"], third, "across restarts", once=False)


def test_bad_configuration(w):
    """A short Secret=, an http:// URL to another host, an ftp:// URL:
    tether-cloudd does not start and names the file and line."""
    for hook, pattern in (
            (hook_conf("https://localhost:1/hook", secret="tooShortKey"), r"Secret= must be"),
            (hook_conf("http://example.com/hook"), r"URL= must be https://"),
            (hook_conf("ftp://localhost/hook"), r"URL= must be https://")):
        conf = w.path("bad.conf")
        with open(conf, "w") as f:
            f.write(f"""[Cloud]
Listen=127.0.0.1
Port=0
CAFile={w.path('pki', 'ca.crt')}
Certificate={w.path('pki', 'server.crt')}
Key={w.path('pki', 'server.key')}
[API]
Listen=127.0.0.1
Port=0
TokenFile={w.path('tokens')}
[State]
Directory={w.path('bad-state')}
{hook}""")
        r = subprocess.run(EMULATOR + [CLOUDD, "--config", conf], capture_output=True, text=True,
                           timeout=seconds(30), env=w.env(notify=False))
        where = re.escape(conf) + r":1[3-9]:"
        expect(r.returncode != 0 and re.search(where + ".*" + pattern, r.stderr),
               f"{hook!r}: exit {r.returncode}, {r.stderr!r}")
        expect("tooShortKey" not in r.stderr, f"the secret is in the message: {r.stderr!r}")


if __name__ == "__main__":
    sys.exit(run([test_every_event_once_signed, test_receiver_down_and_503, test_cloud_restart_keeps_the_queue,
                  test_bad_configuration],
                 emulated="the receiver's outages and the retry backoff are time windows; left to the native run"))
