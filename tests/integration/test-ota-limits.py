#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Issue 12, item 5 ("per-device limits") for OTA status reports: a device
flooding reports on its own job. Before: every report with a new seq was
applied, journaled, routed and logged, without limit, also after the job
was final. Now a report that changes the job takes an event from the
device's publishing limits (4.29 with Max-Age past them, nothing changes);
once the device reported a final state only that report again is answered
2.04 (nothing new), anything else 4.09; and a real tetherd answered 4.29
keeps its report, sends it again after Max-Age and the job still commits."""

import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import EventStream, expect, run, seconds  # noqa: E402
from fakedev import CHANGED, CREATED, POST, code, codestr, connect, frame, path_opts  # noqa: E402
from harness import api_json as api  # noqa: E402
from harness import local_publish  # noqa: E402
from fakedev import max_age  # noqa: E402
from otakit import push_job, sign_manifest  # noqa: E402

CONFLICT, TOO_MANY = code(4, 9), code(4, 29)
RATE, BURST = 2, 10


def ota_states(stream, job):
    return [json.loads(m["data"]["data"])["state"] for m in stream.messages
            if m.get("event") == f"tether/ota/{job}"]


def report(d, job, body):
    t = d.request(POST, f"o/{job}", json.dumps(body).encode())
    return d.response(t, timeout=seconds(10))


def caught_up(w, stream, other, n):
    """Every event routed so far is on the stream: a marker from another
    device comes after them."""
    expect(other.publish(f"marker/{n}").code == CREATED, "marker refused")
    stream.named(f"marker/{n}", timeout=30)


def test_fake_device_floods_its_own_job(w):
    device = w.new_device()
    manifest = sign_manifest(w, device[0])
    w.start_cloud(extra=f"[Events]\nDeviceEventRate={RATE}\nDeviceEventBurst={BURST}\n")
    stream = EventStream(w, "")
    stream.wait_first_id()
    d, dev_id = connect(w, device)
    other, _ = connect(w)

    job = push_job(w, d, dev_id, manifest, CREATED)
    stream.wait(lambda m: ota_states(stream, job)[-1:] == ["accepted"], 30, "the job accepted")
    before = len(ota_states(stream, job))
    logged_before = sum(1 for line in w.cloud.lines if f"OTA job {job} on device" in line)

    # The burst goes to events first: the reports share the device's buckets.
    t0 = time.monotonic()
    for i in range(BURST):
        expect(d.publish(f"drain/{i}").code == CREATED, f"event {i} of the burst refused")
    # 20 reports every 0.1 s for 3 s (pacing the flood, not waiting for anything).
    n, window, answers = 600, 20, []
    for first in range(1, n + 1, window):
        time.sleep(0.1)
        d.send(b"".join(frame(POST, i.to_bytes(2, "big"), path_opts(f"o/{job}"),
                              json.dumps({"seq": i, "state": ("downloading", "downloaded")[i % 2]}).encode())
                        for i in range(first, first + window)))
        for _ in range(window):
            answers.append(d.wait_for(lambda m: m.code >> 5 in (2, 4, 5), what="report answers"))
    took = time.monotonic() - t0
    ok = [m for m in answers if m.code == CHANGED]
    slow = [m for m in answers if m.code == TOO_MANY]
    print(f"# a burst of {BURST} events, then {n} state reports on its own job, in {took:.2f} s "
          f"({RATE}/s, burst {BURST}): {len(ok)} x 2.04, {len(slow)} x 4.29 "
          f"(Max-Age {sorted(set(max_age(m) for m in slow))}, {slow[0].payload.decode()!r})")
    expect(len(ok) + len(slow) == n, f"other answers: {[m for m in answers if m.code not in (CHANGED, TOO_MANY)]}")
    expect(1 <= len(ok) <= RATE * took + 1, f"{len(ok)} reports applied in {took:.2f} s at {RATE}/s")
    expect(all(max_age(m) >= 1 for m in slow), "4.29 without Max-Age")

    caught_up(w, stream, other, 1)
    states = ota_states(stream, job)
    job_now = api(w, "GET", f"/v1/ota/jobs/{job}")[1]
    logged = sum(1 for line in w.cloud.lines if f"OTA job {job} on device" in line) - logged_before
    print(f"# events tether/ota/{job}: {before} before, {len(states)} after; job seq {job_now['seq']}; "
          f"{logged} info line(s) about it")
    expect(len(states) - before == len(ok), f"{len(states) - before} events routed for {len(ok)} applied reports")
    expect(logged <= len(ok), f"{logged} log lines for {len(ok)} applied reports")

    # The final report, once the bucket has an event again (as a device
    # would: after Max-Age).
    final = {"seq": 1000, "state": "committed"}
    for _ in range(5):
        time.sleep(max(max_age(m) for m in slow))  # the retry time the cloud named, not a synchronisation
        r = report(d, job, final)
        if r.code != TOO_MANY:
            break
        slow = [r]
    expect(r.code == CHANGED, f"the final report: {codestr(r.code)} {r.payload!r}")
    stream.wait(lambda m: ota_states(stream, job)[-1:] == ["committed"], 30, "committed on the stream")
    done = api(w, "GET", f"/v1/ota/jobs/{job}")[1]
    expect(done["state"] == "committed" and done["final"], f"job {done}")
    n_events = len(ota_states(stream, job))

    # After the final report: a new one changes nothing and gets 4.09.
    for body in ({"seq": 1001, "state": "failed", "reason": "flood"}, {"seq": 1001, "state": "committed"},
                 {"seq": 1000, "state": "rolled-back"}, {"state": "downloading", "bytes": 1, "total": 2}):
        r = report(d, job, body)
        print(f"# after committed, report {body}: {codestr(r.code)} {r.payload.decode()!r}")
        expect(r.code == CONFLICT and b"job is over" in r.payload, f"{body}: {codestr(r.code)} {r.payload!r}")
    # The exact final report again (its answer lost): 2.04 every time, no
    # event, not even past the limits.
    again = [report(d, job, final).code for _ in range(3 * BURST)]
    expect(again == [CHANGED] * len(again), f"the final report again: {set(codestr(c) for c in again)}")
    caught_up(w, stream, other, 2)
    expect(len(ota_states(stream, job)) == n_events, f"new events: {ota_states(stream, job)[n_events:]}")
    after = api(w, "GET", f"/v1/ota/jobs/{job}")[1]
    expect(after == done, f"the job changed after it was final: {done} -> {after}")
    # The journal holds what the streams got: a stream resuming from the
    # start reads the same OTA events.
    replay = EventStream(w, "", last_event_id=stream.first_id)
    replay.named("marker/2", timeout=30)
    expect(ota_states(replay, job) == ota_states(stream, job), "the journal differs from the live stream")


def test_agent_report_answered_429_commits(w):
    """A real tetherd with DeviceEventRate=1, DeviceEventBurst=1 and events
    queued while its job runs: its reports are answered 4.29, it sends
    them again after Max-Age, the cloud hears the states in order and the
    job commits; no event is lost either."""
    from otakit import COMMIT_PATH, OtaWorld, plugin_deb, reported_in_order
    o = OtaWorld(w)
    w.start_cloud(extra=f"[OTA]\nArtifactDirectory={o.artifacts}\nPort=0\n"
                        "[Events]\nDeviceEventRate=1\nDeviceEventBurst=1\n")
    o.install_v1()
    agent = o.start_agent()
    o.seed(o.v1)
    v2 = plugin_deb(o.debs, "2.0")
    manifest = o.sign(v2, o.upload(v2))
    stream = EventStream(w, "busy/")
    stream.wait_first_id()
    n = 12
    mark = agent.mark()
    for i in range(n):
        local_publish(agent, f"busy/{i}", str(i))
    # The bucket is empty now, and events wait for it for n seconds.
    agent.wait_line(r"Cloud asked to slow down \(4\.29", timeout=30, start=mark)
    t0 = time.monotonic()
    job = o.start_job(manifest)
    j = o.wait_job(job, timeout=120)
    took = time.monotonic() - t0
    states = [h["state"] for h in j["history"]]
    expect(j["state"] == "committed", f"job ended {j['state']}: {j.get('reason')}; history {states}")
    expect(reported_in_order(states, COMMIT_PATH) and states[0] == "sent", f"history {states}")
    agent.wait_line(r"the cloud has the final state 'committed'", timeout=30)
    held = [line for line in agent.lines[mark:] if re.search(r"OTA report \d+ of job \S+ goes again in", line)]
    st = json.loads(w.tetherctl(agent, "status", "--json").stdout)
    counters = st["counters"]
    print(f"# job committed in {took:.1f} s at 1 event/s with {n} events queued; cloud heard {states}; "
          f"agent's counters ota {counters['ota']}, events {counters['events']}; first: {held[:1]}")
    expect(held and counters["ota"]["held"] == len(held), f"no report answered 4.29: {counters}")
    expect(o.journal()["delivered"], "the final state is not marked delivered")
    stream.wait(lambda m: m["event"] == f"busy/{n - 1}", timeout=60, what=f"busy/{n - 1}")
    names = [m["event"] for m in stream.messages]
    expect(names == [f"busy/{i}" for i in range(n)], f"events: {names}")


if __name__ == "__main__":
    sys.exit(run([test_fake_device_floods_its_own_job, test_agent_report_answered_429_commits],
                 emulated="the agent starts its OTA helper, a binary of the target, without the emulator"))
