#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Attacks from the device side on device identity, authorization and limits (docs/security.md,
"A malicious device"), each found by playing it against the merged
cloud: a device reading other devices' private events that the cloud
itself publishes (conflicts, revocations), and a device whose events the
cloud held back for good after a 4.29 whose event it no longer had (a
fake device, and tetherd with Overflow=drop-oldest)."""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import EventStream, Failure, expect, run, seconds  # noqa: E402
from fakedev import CONTENT, CREATED, CSM, POST, Device, code, codestr, connect, frame  # noqa: E402
from harness import api_json as api  # noqa: E402
from harness import local_publish  # noqa: E402
from fakedev import notifications, max_age  # noqa: E402

TOO_MANY = code(4, 29)


def test_clouds_private_events_stay_off_devices(w):
    """Before: the cloud's own private events about device A
    (tether/device/conflict with A's addresses and ports,
    tether/device/revoked with the reason, tether/device/unrevoked) went
    to every device subscribed to them, e.g. to all events. Now they reach
    the API's streams only, like a device's private events."""
    w.start_cloud()
    a, a_id = connect(w)
    b, _ = connect(w)
    r, tok = b.subscribe("")
    expect(r.code == CONTENT, f"subscribe: {r}")
    # A conflict: a second session with A's certificate while A answers.
    clone = Device(w.coap_port, a.cert, a.key, w.path("pki", "ca.crt"))
    mark = w.cloud.mark()
    clone.send(frame(CSM))
    # A answers the liveness Ping (fakedev pongs while it reads) and keeps its ID.
    deadline = time.monotonic() + seconds(10)
    while w.cloud.count(f"Device '{a_id}': a second session from", start=mark) == 0:
        expect(time.monotonic() < deadline, "no conflict logged")
        try:
            a.recv(0.2)
        except Failure:
            pass
    clone.close()
    st, body = api(w, "PUT", f"/v1/devices/{a_id}/revocation", {"reason": "stolen key"})
    expect(st == 200, f"revoke: {st} {body}")
    st, body = api(w, "DELETE", f"/v1/devices/{a_id}/revocation")
    expect(st == 200, f"unrevoke: {st} {body}")
    st, body = api(w, "POST", "/v1/devices/events", {"name": "marker", "data": "x"})
    expect(st == 200, f"API publish: {st} {body}")
    names = notifications(b, tok, "marker")
    print(f"# device B got {names}")
    expect(names == ["marker"], f"device B got another device's private events: {names}")


def test_held_event_given_up_does_not_wedge(w):
    """Before: once the cloud answered 4.29 to event N, it refused every
    later event of the epoch until N came again, for as long as the cloud
    ran. A device that no longer has N (an agent with
    Overflow=drop-oldest whose full outbox dropped it while it waited)
    got 4.29 for everything it sent, forever. Now a new session that
    starts past N lets the cloud go of N; the same session still may
    not overtake it."""
    w.start_cloud("[Events]\nDeviceEventRate=1\nDeviceEventBurst=1\n")
    d, dev_id = connect(w)
    epoch = "00000000000000aa"

    def publish(dev, seq):
        t = dev.request(POST, f"e/wedge/{seq}", b"x", query=(f"seq={seq}", f"epoch={epoch}"))
        return dev.response(t)

    expect(publish(d, 1).code == CREATED, "the first event was refused")
    r = publish(d, 2)
    expect(r.code == TOO_MANY, f"the second event at once: {codestr(r.code)}")
    wait = max_age(r)
    # The device gives event 2 up and goes on with 3, after the wait.
    time.sleep(wait + 1)
    r = publish(d, 3)
    expect(r.code == TOO_MANY, f"event 3 overtook the held event 2 on the same session: {codestr(r.code)}")
    d.close()
    d, _ = connect(w, (dev_id, d.cert, d.key))
    deadline = time.monotonic() + seconds(10)
    while True:
        r = publish(d, 3)
        if r.code == CREATED:
            break
        expect(r.code == TOO_MANY, f"event 3 on a new session: {codestr(r.code)}")
        expect(time.monotonic() < deadline, "event 3 still refused on a new session: the device is wedged")
        time.sleep(max_age(r))
    expect(publish(d, 2).code == CREATED, "event 2 again (a resend of what was given up) is not acknowledged")


def test_agent_drop_oldest_does_not_wedge(w):
    """The same with a real tetherd, [Outbox] Overflow=drop-oldest and a
    small outbox: a big event is refused with a long Max-Age, small
    events pile up meanwhile and push it out of the outbox. Before: the
    agent sent the newer ones after Max-Age and got 4.29 for each, every
    second, for good. Now it reconnects, and the cloud takes them."""
    w.start_cloud("[Cloud]\nMaxPayload=1024\n[Events]\nDeviceByteRate=100\nDeviceByteBurst=1152\n")
    stream = EventStream(w, "")
    stream.wait_first_id()
    agent = w.start_agent(extra="[Outbox]\nMaxEvents=4\nOverflow=drop-oldest\n")
    mark = w.cloud.mark()
    local_publish(agent, "big/1", "x" * 1000)
    local_publish(agent, "big/2", "x" * 1000)
    agent.wait_line(r"Cloud asked to slow down \(4\.29")
    for i in range(3, 21):
        local_publish(agent, f"small/{i}", "x")
    stream.wait(lambda m: m["event"] == "small/20", timeout=60, what="small/20")
    names = [m["event"] for m in stream.messages]
    print(f"# delivered: {names}")
    agent.wait_line("left the outbox meanwhile: reconnecting")
    w.cloud.wait_line(f"Device '{agent.device_id}' went on with event", start=mark)
    expect(names == ["big/1", "small/17", "small/18", "small/19", "small/20"], f"delivered {names}")


if __name__ == "__main__":
    sys.exit(run([test_clouds_private_events_stay_off_devices, test_held_event_given_up_does_not_wedge,
                  test_agent_drop_oldest_does_not_wedge],
                 emulated="ok"))
