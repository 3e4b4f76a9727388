#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Issue 12, item 5: what one device may do to others through the cloud.
Each test plays the attack from the issue with simulated devices
(fakedev.py) or a real tetherd and shows that it now fails: another
device's private events, event names under tether/, OTA reports on jobs
that are not the device's, floods past the per-device rate limits, and a
device's share of the event journal."""

import json
import os
import sys
import time
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import EventStream, expect, run, seconds  # noqa: E402
from fakedev import CHANGED, CONTENT, CREATED, MAX_AGE, POST, code, codestr, connect, frame, \
    path_opts  # noqa: E402
from harness import api_json as api  # noqa: E402
from harness import local_publish  # noqa: E402
from fakedev import notifications  # noqa: E402
from otakit import push_job, sign_manifest  # noqa: E402

FORBIDDEN, NOT_FOUND, TOO_MANY = code(4, 3), code(4, 4), code(4, 29)


def test_private_events_stay_with_their_device(w):
    """Before: a device observing GET /e got every device's private
    events. Now it gets public events and the owner's (API) private
    ones; another device's private events reach the API streams only."""
    w.start_cloud()
    stream = EventStream(w, "")
    stream.wait_first_id()
    a, _ = connect(w)
    b, _ = connect(w)
    r, tok = b.subscribe("")
    expect(r.code == CONTENT, f"subscribe: {r}")
    expect(a.publish("secret/pin", b"1234", private=True).code == CREATED, "private publish refused")
    expect(a.publish("open/temp", b"21").code == CREATED, "public publish refused")
    st, body = api(w, "POST", "/v1/devices/events", {"name": "owner/cmd", "data": "x", "private": True})
    expect(st == 200, f"API private publish: {st} {body}")
    names = notifications(b, tok, "owner/cmd")
    print(f"# device B got {names}")
    expect(names == ["open/temp", "owner/cmd"], f"device B got {names}")
    got = stream.named("owner/cmd")
    expect(stream.named("secret/pin")["data"].get("private") is True, "the owner's stream lost the private event")
    expect(got["data"].get("private") is True, f"API private event {got}")


def test_tether_names_are_the_clouds(w):
    """Before: a device published tether/ota/JOB and the fake OTA status
    reached subscribers. Now: 4.03 with a reason, nothing journaled or
    delivered; the API refuses tether/ names too (403); tether/var/ stays
    the agent's."""
    w.start_cloud()
    stream = EventStream(w, "")
    first = stream.wait_first_id()
    a, _ = connect(w)
    b, _ = connect(w)
    r, tok = b.subscribe("tether/")
    expect(r.code == CONTENT, f"subscribe: {r}")
    fake = json.dumps({"job": "0123456789abcdef", "state": "committed", "final": True}).encode()
    for name in ("tether/ota/0123456789abcdef", "tether/stream/lost", "tether/x"):
        r = a.publish(name, fake)
        print(f"# device publishes '{name}': {codestr(r.code)} {r.payload.decode()!r}")
        expect(r.code == FORBIDDEN and b"reserved" in r.payload, f"'{name}': {r}")
    st, body = api(w, "POST", "/v1/devices/events", {"name": "tether/ota/0123456789abcdef", "data": "x"})
    print(f"# API publishes 'tether/ota/…': {st} {body}")
    expect(st == 403 and "reserved" in body.get("error", ""), f"API: {st} {body}")
    expect(a.publish("tether/var/level", b"3", private=True).code == CREATED, "tether/var/ refused")
    expect(a.publish("tether/var/marker", b"").code == CREATED, "marker refused")
    stream.named("tether/var/marker")
    names = [m["event"] for m in stream.messages]
    expect(names == ["tether/var/level", "tether/var/marker"], f"stream got {names}")
    # Nothing journaled either: a stream resuming from the start reads the same.
    again = EventStream(w, "", last_event_id=first)
    again.named("tether/var/marker")
    names = [m["event"] for m in again.messages]
    expect(names == ["tether/var/level", "tether/var/marker"], f"replay got {names}")
    # B (subscribed to tether/) saw no fake OTA status, nor A's private
    # tether/var/level: only the public marker.
    got = notifications(b, tok, "tether/var/marker")
    expect(got == ["tether/var/marker"], f"device B got {got}")


def test_ota_reports_only_for_own_jobs(w):
    """Before: 4,200 reports on made-up job ids were answered 2.04 and
    evicted the real jobs from the 4,096-entry table. Now a report on a
    job the cloud does not know gets 4.04, on another device's job 4.03,
    and no job is made, changed or forgotten."""
    device_a = w.new_device()
    manifest = sign_manifest(w, device_a[0])
    w.start_cloud()
    a, a_id = connect(w, device_a)
    b, _ = connect(w)
    job = push_job(w, a, a_id, manifest, CHANGED)
    before = api(w, "GET", f"/v1/ota/jobs/{job}")[1]
    print(f"# device A's job {job}: {before['state']}, seq {before['seq']}")

    n, window, codes = 4200, 32, {}
    for first in range(0, n, window):
        b.send(b"".join(frame(POST, i.to_bytes(2, "big"), path_opts(f"o/{i:016x}"),
                              json.dumps({"state": "committed", "seq": 1}).encode())
                        for i in range(first, min(first + window, n))))
        for _ in range(first, min(first + window, n)):
            m = b.wait_for(lambda m: m.code >> 5 in (2, 4, 5), what="report answers")
            codes[codestr(m.code)] = codes.get(codestr(m.code), 0) + 1
    print(f"# {n} reports on made-up job ids: {codes}")
    expect(codes == {"4.04": n}, f"answers {codes}")
    t = b.request(POST, f"o/{job}", json.dumps({"state": "failed", "seq": 99}).encode())
    r = b.response(t)
    print(f"# B's report on A's job: {codestr(r.code)} {r.payload.decode()!r}")
    expect(r.code == FORBIDDEN, f"report on another device's job: {r}")
    st, jobs = api(w, "GET", "/v1/ota/jobs")
    expect(st == 200 and [j["job"] for j in jobs] == [job], f"jobs now: {[j['job'] for j in jobs]}")
    after = api(w, "GET", f"/v1/ota/jobs/{job}")[1]
    expect(after == before, f"the job changed: {before} -> {after}")
    # The owner's own report still moves it.
    t = a.request(POST, f"o/{job}", json.dumps({"state": "downloading", "seq": 1}).encode())
    expect(a.response(t).code == CHANGED, "device A's own report refused")
    expect(api(w, "GET", f"/v1/ota/jobs/{job}")[1]["state"] == "downloading", "own report not applied")


def metric(w, name):
    with urllib.request.urlopen(urllib.request.Request(w.api + "/metrics",
                                                       headers={"Authorization": f"Bearer {w.token}"}),
                                timeout=seconds(10)) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


LIMITS = "[Events]\nDeviceEventRate=20\nDeviceEventBurst=20\n"


def test_rate_limits_answer_429_with_a_retry_time(w):
    """Before: no limit at all. Now a device past DeviceEventRate= and
    DeviceEventBurst= gets 4.29 with Max-Age (seconds to retry) and the
    event is not stored; another device's bucket is its own; after the
    wait the device may publish again."""
    w.start_cloud(extra=LIMITS)
    stream = EventStream(w, "")
    stream.wait_first_id()
    a, _ = connect(w)
    b, _ = connect(w)
    n, answers, t0 = 200, [], time.monotonic()
    for first in range(0, n, 20):
        a.send(b"".join(frame(POST, i.to_bytes(2, "big"), path_opts(f"e/flood/{i}")) for i in range(first, first + 20)))
        for _ in range(20):
            answers.append(a.wait_for(lambda m: m.code >> 5 in (2, 4, 5), what="publish answers"))
    took = time.monotonic() - t0
    ok = [m for m in answers if m.code == CREATED]
    slow = [m for m in answers if m.code == TOO_MANY]
    print(f"# {n} events from one device in {took:.2f} s: {len(ok)} x 2.01, {len(slow)} x 4.29 "
          f"(Max-Age {sorted(set(int.from_bytes(m.opt(MAX_AGE)[0], 'big') for m in slow))}, "
          f"{slow[0].payload.decode()!r})")
    expect(len(ok) + len(slow) == n, f"other answers: {[m for m in answers if m.code not in (CREATED, TOO_MANY)]}")
    expect(20 <= len(ok) <= 20 + 20 * took + 1, f"{len(ok)} accepted in {took:.2f} s")
    expect(all(m.opt(MAX_AGE) and int.from_bytes(m.opt(MAX_AGE)[0], "big") >= 1 for m in slow), "4.29 without Max-Age")
    expect(b.publish("other/1").code == CREATED, "another device was limited too")
    stream.named("other/1")
    flood = [m for m in stream.messages if m["event"].startswith("flood/")]
    expect(len(flood) == len(ok), f"{len(flood)} flood events delivered, {len(ok)} accepted")
    expect(metric(w, 'tether_cloud_events_dropped_total{reason="rate_limited"}') == len(slow), "metric")
    wait = max(int.from_bytes(m.opt(MAX_AGE)[0], "big") for m in slow)
    time.sleep(wait)  # the retry time the cloud named, not a synchronisation
    expect(a.publish("flood/again").code == CREATED, f"still refused after Max-Age {wait} s")


def test_agent_backs_off_and_loses_nothing(w):
    """A real tetherd publishing faster than its limits: it takes the
    4.29s, waits Max-Age, and sends again; every event arrives once, in
    order, and none is dropped as refused."""
    w.start_cloud(extra=LIMITS)
    stream = EventStream(w, "burst/")
    stream.wait_first_id()
    agent = w.start_agent()
    n = 120
    for i in range(n):
        local_publish(agent, f"burst/{i}", str(i))
    stream.wait(lambda m: m["event"] == f"burst/{n - 1}", timeout=60, what=f"burst/{n - 1}")
    names = [m["event"] for m in stream.messages]
    expect(names == [f"burst/{i}" for i in range(n)], f"{len(names)} events: {names[:5]}...")
    agent.wait_line(r"Cloud asked to slow down \(4\.29")
    st = json.loads(w.tetherctl(agent, "status", "--json").stdout)
    limited = metric(w, 'tether_cloud_events_dropped_total{reason="rate_limited"}')
    ev = st["counters"]["events"]
    print(f"# {n} events through the agent with 20/s, burst 20: all delivered in order; {limited:.0f} answered "
          f"4.29; agent's counters {ev}")
    expect(limited > 0 and ev["held"] > 0, "never limited")
    expect(ev["refused"] == 0 and ev["acked"] == n and ev["queued"] == 0, f"agent: {ev}")


def flood_and_resume(w, share):
    """Device B publishes 20 small events, then device A 1,500 of 16 KB
    into a 1 MiB journal; returns the names a stream resuming from
    before B's events reads back, and the number of A's events there."""
    w.start_cloud(extra=f"[Events]\nJournalMaxBytes=1048576\nDeviceJournalShare={share}\n"
                        "DeviceEventRate=0\nDeviceByteRate=0\n")
    first = EventStream(w, "").wait_first_id()
    a, _ = connect(w)
    b, _ = connect(w)
    for i in range(20):
        expect(b.publish(f"victim/{i}", b"x" * 100).code == CREATED, "victim publish")
    data, n, window = b"f" * 16000, 1500, 8
    for start in range(0, n, window):
        for i in range(start, start + window):
            a.send(frame(POST, i.to_bytes(2, "big"), path_opts(f"e/flood/{i}"), data))
        for _ in range(window):
            m = a.wait_for(lambda m: m.code >> 5 in (2, 4, 5), what="flood answers")
            expect(m.code == CREATED, f"flood: {m}")
    stream = EventStream(w, "", last_event_id=first)
    stream.named(f"flood/{n - 1}", timeout=30)
    names = [m["event"] for m in stream.messages if m["event"] != "tether/stream/lost"]
    return [x for x in names if x.startswith("victim/")], sum(x.startswith("flood/") for x in names)


def test_journal_share_keeps_others_resumable(w):
    """Before (and with DeviceJournalShare=100): one device publishing
    1,500 events of 16 KB rewrote the journal and pushed every other
    device's events out of the resume window. With the share (default
    25%), the flooding device loses its own older events first: the
    other device's events are still read back with Last-Event-ID."""
    victims, floods = flood_and_resume(w, 25)
    left_out = metric(w, 'tether_cloud_events_dropped_total{reason="journal_share"}')
    print(f"# DeviceJournalShare=25: a resuming stream reads {len(victims)} of the 20 victim events and "
          f"{floods} flood events; {left_out:.0f} events left out for the share")
    expect(victims == [f"victim/{i}" for i in range(20)], f"victim events after the flood: {victims}")
    expect(floods > 0, "nothing of the flood is resumable")


def test_journal_without_share_loses_others(w):
    """The control: with DeviceJournalShare=100 (no share, the rewrite of
    before) the same flood leaves none of the other device's events."""
    victims, floods = flood_and_resume(w, 100)
    print(f"# DeviceJournalShare=100: {len(victims)} victim events and {floods} flood events resumable")
    expect(victims == [], f"victim events survived without a share: {victims}")


if __name__ == "__main__":
    sys.exit(run([test_private_events_stay_with_their_device, test_tether_names_are_the_clouds,
                  test_ota_reports_only_for_own_jobs, test_rate_limits_answer_429_with_a_retry_time,
                  test_agent_backs_off_and_loses_nothing, test_journal_share_keeps_others_resumable,
                  test_journal_without_share_loses_others], emulated="ok"))
