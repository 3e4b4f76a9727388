#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""The cloud's persistent device registry (cloud/registry.c, docs/cloud.md):
devices are remembered across restarts and listed offline; a revoked
device's session closes within a second and its certificate is refused
at every later handshake, across restarts, until it is unrevoked; under
Registration=enrolled only registered devices connect; and a second
session for a device ID does not take it from a session that answers
(the clone case) but does from one that went silent (the reboot case)."""
import json
import os
import sqlite3
import ssl
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import expect, poll, run, seconds  # noqa: E402
from fakedev import connect, refused  # noqa: E402


def device_json(w, dev_id):
    return json.loads(w.tether("--json", "describe", dev_id).stdout)


def listed(w):
    return {d["id"]: d for d in json.loads(w.tether("--json", "list").stdout)}


def audit(w, action):
    """The audit records of action, from the cloud's database, once there
    are any (a record is committed with the batch, within 100 ms)."""
    def query():
        db = sqlite3.connect(w.path("cloud-state", "cloud.db"))
        try:
            return db.execute("SELECT actor, target, detail FROM audit WHERE action = ? ORDER BY id",
                              (action,)).fetchall()
        finally:
            db.close()
    return poll(query, 5, f"an audit record of {action}")


def restart_cloud(w, extra=""):
    w.cloud.stop()
    w.daemons.remove(w.cloud)
    return w.start_cloud(extra=extra)


def test_registry_persists(w):
    w.start_cloud()
    d, dev_id = connect(w)
    info = device_json(w, dev_id)
    expect(info["status"] == "normal" and info["revoked"] is False, f"status: {info}")
    expect(info["first_connected"] and info["registered_by"] == "self", f"registry fields: {info}")
    expect(len(info["certificate"]["fingerprint"]) == 64 and info["certificate"]["serial"], f"cert: {info}")
    mark = w.cloud.mark()
    d.close()
    w.cloud.wait_line(f"Device '{dev_id}' disconnected", start=mark)
    restart_cloud(w)
    devices = listed(w)
    expect(dev_id in devices, f"{dev_id} not listed after a restart: {devices}")
    expect(devices[dev_id]["connected"] is False and devices[dev_id]["last_heard"], f"listing: {devices[dev_id]}")
    expect(devices[dev_id]["last_ip_address"] == "127.0.0.1", f"listing: {devices[dev_id]}")
    out = w.tether("list").stdout
    expect(any(line.split()[:2] == [dev_id, "offline"] for line in out.splitlines()), f"tether list: {out}")
    # It comes back as the same registry entry.
    connect(w, (dev_id, d.cert, d.key))
    expect(device_json(w, dev_id)["first_connected"] == info["first_connected"], "first connection changed")


def test_revoke(w):
    w.start_cloud()
    sub = w.subscribe("tether/device/")
    sub.wait_ready()
    d, dev_id = connect(w)
    mark = w.cloud.mark()
    t0 = time.monotonic()
    r = w.tether("revoke", dev_id, "--reason", "key stolen")
    expect(r.stdout.strip() == f"{dev_id} revoked", f"tether revoke: {r.stdout!r}")
    try:
        while True:
            d.recv(timeout=seconds(5))
    except EOFError:
        pass
    except (ssl.SSLError, ConnectionError, OSError):
        pass
    took = time.monotonic() - t0
    expect(took < seconds(1), f"the session closed {took:.2f} s after the revocation")
    w.cloud.wait_line(f"Device '{dev_id}' disconnected \\(revoked\\)", start=mark)
    ev = sub.wait(lambda e: e["name"] == "tether/device/revoked")
    data = json.loads(ev["data"])
    actor = data.get("actor", "")
    expect(data == {"device": dev_id, "reason": "key stolen", "actor": actor} and actor.startswith("token:file-"),
           f"event: {ev}")
    records = audit(w, "device.revoke")
    expect(len(records) == 1 and records[0][:2] == (actor, dev_id)
           and json.loads(records[0][2]) == {"reason": "key stolen", "status": 200}, f"audit log: {records}")
    info = device_json(w, dev_id)
    expect(info["revoked"] is True and info["status"] == "revoked" and info["revoked_reason"] == "key stolen"
           and info["revoked_by"] == actor, f"device: {info}")
    out = w.tether("list").stdout
    expect(any(line.split()[:2] == [dev_id, "revoked"] for line in out.splitlines()), f"tether list: {out}")
    # Again: nothing changes.
    expect("revoked already" in w.tether("revoke", dev_id).stdout, "second revoke")

    # Refused at the handshake, with the reason logged; also after a restart.
    mark = w.cloud.mark()
    expect(refused(w, d.cert, d.key), "a revoked device connected")
    w.cloud.wait_line(f"Refused a session from 127\\.0\\.0\\.1:\\d+: device '{dev_id}' is revoked \\(key stolen\\)",
                      start=mark)
    restart_cloud(w)
    expect(listed(w)[dev_id]["revoked"] is True, "not revoked after a restart")
    mark = w.cloud.mark()
    expect(refused(w, d.cert, d.key), "a revoked device connected after a restart")
    w.cloud.wait_line(f"device '{dev_id}' is revoked", start=mark)

    sub = w.subscribe("tether/device/")
    sub.wait_ready()
    expect(w.tether("unrevoke", dev_id).stdout.strip() == f"{dev_id} unrevoked", "tether unrevoke")
    ev = sub.wait(lambda e: e["name"] == "tether/device/unrevoked")
    expect(json.loads(ev["data"]) == {"device": dev_id, "actor": actor}, f"event: {ev}")
    expect(len(audit(w, "device.unrevoke")) == 1, "no audit record of the unrevocation")
    connect(w, (dev_id, d.cert, d.key))
    expect(device_json(w, dev_id)["revoked"] is False, "still revoked")


def test_revoke_errors(w):
    w.start_cloud()
    r = w.tether("unrevoke", "never-seen", check=False)
    expect(r.returncode == 3, f"unrevoke of an unknown device: {r.returncode} {r.stderr}")
    r = w.tether("revoke", "x", "--reason", "bad\ttab", check=False)
    expect(r.returncode != 0 and "control characters" in r.stderr, f"reason with a tab: {r.returncode} {r.stderr}")
    r = w.tether("revoke", "x", "--reason", "y" * 161, check=False)
    expect(r.returncode == 2, f"long reason: {r.returncode} {r.stderr}")
    # A device revoked before it was ever seen is listed and refused.
    dev_id, cert, key = w.new_device()
    w.tether("revoke", dev_id)
    expect(listed(w)[dev_id]["revoked"] is True, "not listed")
    expect(refused(w, cert, key), "a device revoked beforehand connected")


def test_enrolled(w):
    w.start_cloud(extra="[Cloud]\nRegistration=enrolled\n")
    dev_id, cert, key = w.new_device()
    mark = w.cloud.mark()
    expect(refused(w, cert, key), "an unregistered device connected under Registration=enrolled")
    w.cloud.wait_line(f"Refused a session from .*device '{dev_id}' is not registered \\(Registration=enrolled\\)",
                      start=mark)
    expect(w.tether("register", dev_id).stdout.strip() == f"{dev_id} registered", "tether register")
    expect(listed(w)[dev_id]["connected"] is False, "a registered device is not listed")
    records = audit(w, "device.register")
    expect(records[0][0].startswith("token:") and records[0][1] == dev_id, f"audit log: {records}")
    connect(w, (dev_id, cert, key))
    expect("already" in w.tether("register", dev_id).stdout, "second register")


def test_clone_refused(w):
    """A clone with the real device's certificate and key connects again
    and again for ~10 s: each time the real device (tetherd, answering
    its Pings) keeps the ID and serves calls; it is never kicked."""
    w.start_cloud()
    sub = w.subscribe("tether/device/conflict")
    sub.wait_ready()
    agent = w.start_agent()
    dev_id, cert, key = agent.device
    # Online by the notify socket; the cloud's log line of the session may
    # be read a moment later (much later under load): count after it.
    w.cloud.wait_line(rf"Device '{dev_id}' connected")
    mark = w.cloud.mark()
    attempts = admitted = calls = 0
    end = time.monotonic() + 10
    while time.monotonic() < end:
        attempts += 1
        if not refused(w, cert, key):
            admitted += 1
        r = w.tether("call", dev_id, "echo", "hi", check=False)
        expect(r.returncode == 0 and r.stdout.strip() == "2", f"call during the clone's attempts: {r.returncode} "
               f"{r.stdout!r} {r.stderr!r}")
        calls += 1
    print(f"clone: {attempts} attempts, {admitted} admitted; {calls} calls answered")
    expect(admitted == 0, f"the clone got the ID {admitted} times")
    expect(w.cloud.count(f"Device '{dev_id}' disconnected", start=mark) == 0, "the real device was kicked")
    expect(w.cloud.count(f"Device '{dev_id}' connected", start=mark) == 0, "the ID was bound again")
    ev = sub.wait(lambda e: e["name"] == "tether/device/conflict")
    data = json.loads(ev["data"])
    expect(data["device"] == dev_id and data["outcome"] == "kept" and data["established"].startswith("127.0.0.1:")
           and data["newcomer"].startswith("127.0.0.1:"), f"conflict event: {data}")
    if attempts > 3:
        w.cloud.wait_line(f"Device '{dev_id}': 3 duplicate sessions within 60s: damping", start=mark)


def test_reboot_takes_over(w):
    """The device's old connection went silent (it rebooted, or its NAT
    forgot it): the new session takes the ID within seconds, not after
    DeviceTimeoutSec."""
    w.start_cloud()
    old, dev_id = connect(w)
    old.auto_pong = False  # and it reads nothing from now on
    sub = w.subscribe("tether/device/conflict")
    sub.wait_ready()
    mark = w.cloud.mark()
    t0 = time.monotonic()
    new, _ = connect(w, (dev_id, old.cert, old.key))
    took = time.monotonic() - t0
    print(f"takeover after {took:.2f} s")
    expect(took < seconds(5), f"the new session took {took:.1f} s to get the ID")
    w.cloud.wait_line(f"Device '{dev_id}' disconnected \\(replaced: it did not answer a liveness check", start=mark)
    ev = sub.wait(lambda e: e["name"] == "tether/device/conflict")
    expect(json.loads(ev["data"])["outcome"] == "replaced", f"event: {ev}")
    new.publish("after/reboot")
    poll(lambda: listed(w)[dev_id]["connected"], 5, "online")
    old.close()
    new.close()


if __name__ == "__main__":
    sys.exit(run([test_registry_persists, test_revoke, test_revoke_errors, test_enrolled, test_clone_refused,
                  test_reboot_takes_over], emulated="ok"))
