#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Event times (docs/protocol.md, "Event time"): an event published while
the device is offline keeps its publish time in published_at, across an
agent restart, and received_at says when the cloud got it; device clocks
that are not sane fall back to the receive time; outbox files and event
journals written before the times existed still deliver."""

import datetime
import os
import struct
import sys
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import BUILD, EventStream, Skip, expect, run  # noqa: E402
from fakedev import CREATED, POST, connect  # noqa: E402

WALLCLOCK = os.path.join(BUILD, "tests", "clock", ".libs", "wallclock.so")
FLOOR_MS = 1735689600000  # PROTO_TIME_FLOOR_MS, 2025-01-01T00:00:00Z
BAD_REQUEST = (4 << 5) | 0


def ms(stamp):
    """RFC 3339 UTC with milliseconds -> ms since the epoch."""
    t = datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.timezone.utc)
    return round(t.timestamp() * 1000)


def stamp(t_ms):
    t = datetime.datetime.fromtimestamp(t_ms // 1000, datetime.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S") + f".{t_ms % 1000:03d}Z"


def now_ms():
    return time.time_ns() // 1000000


def particle_shape(ev):
    """The SSE data object: Particle's fields, plus received_at."""
    expect(set(ev) - {"private"} == {"data", "ttl", "published_at", "coreid", "received_at"},
           f"event data has the fields {sorted(ev)}")
    for k in ("published_at", "received_at"):
        ms(ev[k])  # parses as RFC 3339 with milliseconds


def test_offline_publish_keeps_its_time(w):
    """Publish while the cloud is down, restart the agent, bring the cloud
    back after a measured gap: published_at is the publish time, received_at
    the delivery."""
    w.start_cloud()
    coap, api = w.coap_port, w.api_port
    a = w.start_agent()
    dev = a.device_id
    first = EventStream(w, "offline/").wait_first_id()

    mark = a.mark()
    w.cloud.stop()
    a.wait_line("Disconnected from", start=mark)
    before = now_ms()
    w.tetherctl(a, "publish", "offline/one", "1")
    after = now_ms()
    # A restart of the agent keeps the event and its time (the outbox).
    a.stop()
    a = w.run_agent("agent", a.conf, a.device, wait_online=False)
    # Let real time pass, waiting on the agent's failed reconnects.
    while now_ms() - after < 2500:
        mark = a.mark()
        a.wait_line("retrying in", start=mark)
    up = now_ms()
    mark = w.notify.mark()
    w.start_cloud(port=coap, api_port=api)
    w.wait_online(dev, mark)
    stream = EventStream(w, "offline/", last_event_id=first)
    ev = stream.named("offline/one")["data"]
    seen = now_ms()
    particle_shape(ev)
    pub, rcv = ms(ev["published_at"]), ms(ev["received_at"])
    print(f"# published {stamp(before)}..{stamp(after)}, cloud back {stamp(up)}: published_at "
          f"{ev['published_at']}, received_at {ev['received_at']} ({(rcv - pub) / 1000:.1f} s later)")
    expect(before <= pub <= after, f"published_at {ev['published_at']} is not the publish time "
           f"({stamp(before)}..{stamp(after)})")
    expect(up <= rcv <= seen, f"received_at {ev['received_at']} is not the delivery time "
           f"({stamp(up)}..{stamp(seen)})")
    expect(rcv - pub >= 2500, f"only {rcv - pub} ms between publish and delivery")

    # Online, the two are close: the device's clock is this machine's.
    # tether subscribe --json passes both times through.
    sub = w.subscribe("offline/").wait_ready()
    before = now_ms()
    w.tetherctl(a, "publish", "offline/two", "2")
    ev = stream.named("offline/two")["data"]
    pub, rcv = ms(ev["published_at"]), ms(ev["received_at"])
    expect(before <= pub <= rcv <= now_ms(), f"online event times {ev}")
    line = sub.wait(lambda e: e.get("name") == "offline/two", what="offline/two from tether subscribe")
    expect(line.get("published_at") == ev["published_at"] and line.get("received_at") == ev["received_at"],
           f"tether subscribe --json printed {line}, the stream carried {ev}")


def fakedev_publish(d, name, query):
    t = d.request(POST, "e/" + name, b"x", query=query)
    return d.response(t)


def test_insane_times_fall_back(w):
    """Crafted publishes (tests/integration/fakedev.py): a sane time= is
    taken to the millisecond; 1970, the far future, more than 60 s ahead
    or more than 30 days old fall back to the receive time; no time= gets
    the receive time; a malformed time= is refused."""
    w.start_cloud()
    d, dev = connect(w)
    stream = EventStream(w, "t/")
    stream.wait_first_id()
    now = now_ms()
    cases = [
        ("t/sane", now - 5000, True),
        ("t/epoch", 0, False),
        ("t/floor", FLOOR_MS, False),  # not before the floor, but older than 30 days
        ("t/before-floor", FLOOR_MS - 1, False),
        ("t/future", now + 86400000, False),
        ("t/ahead", now + 120000, False),
        ("t/slightly-ahead", now + 30000, True),
        ("t/old", now - 31 * 86400000, False),
        ("t/weeks", now - 20 * 86400000, True),
        ("t/huge", 2 ** 64 - 1, False),
        ("t/none", None, False),
    ]
    mark = w.cloud.mark()
    for seq, (name, t, _) in enumerate(cases, 1):
        query = [f"seq={seq}", "epoch=00000000000000aa"] + ([f"time={t}"] if t is not None else [])
        before = now_ms()
        r = fakedev_publish(d, name, query)
        expect(r.code == CREATED, f"{name}: {r}")
        ev = stream.named(name)["data"]
        particle_shape(ev)
        rcv = ms(ev["received_at"])
        expect(before <= rcv <= now_ms(), f"{name}: received_at {ev['received_at']} is not now")
        want = stamp(t) if cases[seq - 1][2] else ev["received_at"]
        expect(ev["published_at"] == want, f"{name} (time={t}): published_at {ev['published_at']}, "
               f"expected {want}")
    line = w.cloud.wait_line(r"published an event with time=0 \(ms\), before 2025-01-01T00:00:00Z", start=mark)
    print(f"# the cloud: '{line.split(': ', 1)[-1]}'")
    for bad in ("time=", "time=-5", "time=1e3", "time=18446744073709551616"):
        r = fakedev_publish(d, "t/bad", ["seq=99", "epoch=00000000000000aa", bad])
        expect(r.code == BAD_REQUEST and b"time=" in r.payload, f"{bad}: {r}")
    r = fakedev_publish(d, "t/twice", ["time=1764064800000", "time=1764064800000"])
    expect(r.code == BAD_REQUEST, f"time= twice: {r}")
    # Logged once for the lot, not once per event: counted once the cloud
    # has exited and every line it wrote has been read.
    w.cloud.stop()
    expect(w.cloud.count("published an event with time=", mark) == 1, "insane clocks logged per event")


def faked_clock(w, offset):
    path = w.path("agent.clock")
    with open(path + ".new", "w") as f:
        f.write(f"{offset}\n")
    os.replace(path + ".new", path)
    return {"LD_PRELOAD": WALLCLOCK, "TETHER_TEST_CLOCK_FILE": path,
            "ASAN_OPTIONS": os.environ.get("ASAN_OPTIONS", "") + ":verify_asan_link_order=0"}


def test_agent_clock_wrong(w):
    """The real agent with its wall clock stepped (tests/clock/wallclock.c):
    a day ahead, back in 1971, 40 days behind: the cloud delivers its
    receive time; an hour behind is sane and kept."""
    if not os.path.exists(WALLCLOCK):
        raise Skip(f"{WALLCLOCK} is not built")
    w.start_cloud()
    env = faked_clock(w, 0)
    a = w.start_agent(env=env)
    stream = EventStream(w, "clock/")
    stream.wait_first_id()
    now_s = time.time()
    plan = [("ahead", 86400, False), ("in-1971", -int(now_s) + 365 * 86400, False),
            ("behind-40d", -40 * 86400, False), ("behind-1h", -3600, True), ("right", 0, True)]
    for name, offset, kept in plan:
        # The shim sees the replaced file on the agent's next clock read.
        faked_clock(w, offset)
        before = now_ms()
        w.tetherctl(a, "publish", "clock/" + name, name)
        ev = stream.named("clock/" + name)["data"]
        after = now_ms()
        pub, rcv = ms(ev["published_at"]), ms(ev["received_at"])
        expect(before <= rcv <= after, f"{name}: received_at {ev['received_at']}")
        if kept:
            expect(before + offset * 1000 <= pub <= after + offset * 1000,
                   f"{name}: published_at {ev['published_at']} is not the agent's clock")
        else:
            expect(pub == rcv, f"{name}: published_at {ev['published_at']} is not the receive time")
        print(f"# agent clock {offset:+d} s: published_at {ev['published_at']}, "
              f"received_at {ev['received_at']}")
    w.cloud.wait_line(r"published an event with time=\d+ \(ms\), more than 60 s ahead")


def record(magic, payload):
    length = struct.pack("<I", len(payload))
    return struct.pack("<I", magic) + length + struct.pack("<I", zlib.crc32(length + payload)) + payload


def blob(b):
    return struct.pack("<I", len(b)) + b


def test_old_outbox_and_journal(w):
    """Files of version 1 (no times in their events) from older daemons:
    the agent delivers the old outbox's events with the receive time, the
    cloud replays the old journal's events with received_at =
    published_at, and both files are upgraded in place."""
    OUTBOX, JOURNAL = 0x31424f54, 0x314a4354
    state = w.path("cloud-state")
    os.makedirs(state)
    old_at = b"2026-11-25T23:59:59.123Z"
    jepoch = 0x5f0c2a9e8d7b6a51
    with open(os.path.join(state, "events.journal"), "wb") as f:
        f.write(record(JOURNAL, b"H" + bytes([1]) + struct.pack("<QQ", jepoch, 1)))
        f.write(record(JOURNAL, b"E" + struct.pack("<Q", 1) + blob(b"olddev") + struct.pack("<QQI", 7, 1, 60) +
                       bytes([0]) + blob(old_at) + blob(b"old/journal") + bytes([1]) + blob(b"j")))
    w.start_cloud()
    with open(os.path.join(state, "events.journal"), "rb") as f:
        expect(f.read(14)[13] == 2, "the journal was not upgraded to version 2")
    stream = EventStream(w, "old/", last_event_id=f"{jepoch:016x}-0")
    ev = stream.named("old/journal")["data"]
    particle_shape(ev)
    expect(ev["published_at"] == old_at.decode() == ev["received_at"], f"old journal event {ev}")

    device = w.new_device()
    agent_state = w.path("agent-state")
    os.makedirs(agent_state)
    with open(os.path.join(agent_state, "outbox"), "wb") as f:
        f.write(record(OUTBOX, b"H" + bytes([1]) + struct.pack("<QQ", 0x0123456789abcdef, 1)))
        for seq in (1, 2):
            f.write(record(OUTBOX, b"E" + struct.pack("<QII", seq, 60, 0) + blob(b"old/outbox") +
                           blob(str(seq).encode())))
    before = now_ms()
    a = w.start_agent(device=device, state_dir=agent_state)
    for seq in ("1", "2"):
        ev = stream.wait(lambda m, s=seq: m.get("event") == "old/outbox" and m["data"]["data"] == s,
                         what=f"old outbox event {seq}")["data"]
        expect(ev["published_at"] == ev["received_at"] and ms(ev["received_at"]) >= before,
               f"old outbox event without a time: {ev}")
    w.tetherctl(a, "publish", "old/new", "3")
    ev = stream.named("old/new")["data"]
    expect(before <= ms(ev["published_at"]) <= ms(ev["received_at"]), f"new event {ev}")

    # Replayed after a restart of the cloud: the same times as live.
    coap, api = w.coap_port, w.api_port
    w.cloud.stop()
    w.start_cloud(port=coap, api_port=api)
    replay = EventStream(w, "old/", last_event_id=f"{jepoch:016x}-0")
    again = replay.named("old/new")["data"]
    expect(again == ev, f"replayed {again}, live {ev}")
    again = replay.named("old/journal")["data"]
    expect(again["received_at"] == old_at.decode(), f"replayed old journal event {again}")


if __name__ == "__main__":
    sys.exit(run([test_offline_publish_keeps_its_time, test_insane_times_fall_back, test_agent_clock_wrong,
                  test_old_outbox_and_journal], emulated="ok"))
