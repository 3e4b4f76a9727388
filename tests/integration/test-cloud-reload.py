#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""SIGHUP makes tether-cloudd read its token file again (docs/cloud.md,
"Reload"): new tokens work, removed ones get 401, a bad file keeps the
tokens it had; event streams opened with a removed token end, device
sessions and the other event streams stay up throughout. It reads its TLS
files again too: a new CA file decides who may open new sessions, a bad
one keeps the CA it had, and sessions already open stay."""

import json
import os
import signal
import ssl
import sys
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import SLOW, Failure, expect, run  # noqa: E402
import fakedev  # noqa: E402


def status(w, token):
    """The HTTP status of GET /v1/devices with this bearer token."""
    req = urllib.request.Request(f"{w.api}/v1/devices", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=10 * SLOW) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def write_tokens(w, *lines):
    path = w.path("tokens")
    with open(path + ".tmp", "w") as f:
        f.write("".join(line + "\n" for line in lines))
    os.rename(path + ".tmp", path)


def reload(w, expect_line, closed=None):
    """SIGHUP; wait for RELOADING=1, then READY=1, and the log line; with
    closed, also for the line saying how many event streams were ended."""
    mark, log = w.notify.mark(), w.cloud.mark()
    w.cloud.signal(signal.SIGHUP)
    reloading = w.notify.wait(lambda m: m.get("RELOADING") == "1", 10, "RELOADING=1", mark)
    expect("MONOTONIC_USEC" in reloading, f"RELOADING=1 without MONOTONIC_USEC=: {reloading}")
    at = w.notify.messages.index(reloading)
    w.notify.wait(lambda m: m.get("READY") == "1", 10, "READY=1 after RELOADING=1", at + 1)
    line = w.cloud.wait_line(expect_line, start=log)
    if closed is not None:
        w.cloud.wait_line(rf"Closed {closed} event stream\(s\) whose token was removed\.", start=log)
    return line


def ended_cleanly(sub, what):
    """The stream's end came from the server (not an error), with a deadline."""
    rc = sub.wait_exit(what=what)
    expect(rc != 0, f"{what}: tether subscribe exited {rc} without --resume")
    expect(any("was closed by the server" in line for line in sub.errors),
           f"{what}: the stream did not end cleanly: {sub.errors[-5:]}")


def stayed_connected(w, agent, dev, notify_mark, cloud_mark):
    """No reconnect anywhere: the agent logged no disconnect, the cloud
    neither closed nor accepted a session for the device."""
    expect(agent.count("Disconnected from") == 0, "the agent lost its connection")
    expect(w.cloud.count(rf"Device '{dev}' (connected|disconnected)", cloud_mark) == 0,
           "the device's session was replaced")
    expect(not any(m.get("X_TETHER_OFFLINE") == dev for m in w.notify.messages[notify_mark:]),
           "the cloud reported the device offline")


def test_sighup_reloads_tokens(w):
    old = w.token
    w.start_cloud()
    a = w.start_agent()
    dev = a.device_id
    # The agent is online when it says so; the cloud logs the session a
    # moment later (much later under ASan): count from after that line.
    w.cloud.wait_line(rf"Device '{dev}' connected")
    # A second token, kept through the change below.
    keep = w.pki("token", w.path("keep-token")).strip()
    write_tokens(w, old, keep)
    reload(w, r"Reloaded 2 API token\(s\)", closed=0)
    gone = w.subscribe("example/").wait_ready()  # opened with the token removed below
    sub = w.subscribe("example/", token=keep).wait_ready()
    notify_mark, cloud_mark = w.notify.mark(), w.cloud.mark()

    new = w.pki("token", w.path("new-token")).strip()
    also = w.pki("token", w.path("new-token")).strip()
    write_tokens(w, "# after the change", new, "", also, keep)
    expect(status(w, new) == 401, "a token not loaded yet was accepted")
    expect(status(w, old) == 200, "the old token stopped working before the reload")

    reload(w, r"Reloaded 3 API token\(s\) from '.*tokens'", closed=1)
    expect(status(w, new) == 200, "the new token is refused after the reload")
    expect(status(w, also) == 200, "the second new token is refused after the reload")
    expect(status(w, keep) == 200, "the kept token is refused after the reload")
    expect(status(w, old) == 401, "the removed token still works after the reload")
    # The stream opened with the removed token ends: revocation cuts it.
    ended_cleanly(gone, "the end of the stream opened with the removed token")

    # The device is still there, on the same session, and answers.
    r = w.tether("call", dev, "add", "2,3", token=new)
    expect(r.stdout.strip() == "5", f"call after the reload returned {r.stdout!r}")
    devices = json.loads(w.tether("list", "--json", token=new).stdout)
    expect(any(d.get("id") == dev and d.get("connected") for d in devices), f"device not connected: {devices}")
    # The stream opened with the kept token before the reload still
    # delivers, from the device (echo publishes example/echo) and the API.
    w.tether("call", dev, "echo", "after-reload", token=new)
    w.tether("publish", "example/api", "after-reload", token=new)
    sub.wait(lambda e: e.get("name") == "example/echo" and e.get("data") == "after-reload",
             what="the device's event on the stream opened before the reload")
    sub.wait(lambda e: e.get("name") == "example/api" and e.get("data") == "after-reload",
             what="the API's event on the stream opened before the reload")
    expect(sub.proc.poll() is None, "the event stream with the kept token ended")
    expect(not any(e.get("data") == "after-reload" for e in gone.snapshot()),
           f"the stream with the removed token got events after the reload: {gone.snapshot()}")
    stayed_connected(w, a, dev, notify_mark, cloud_mark)


def test_bad_token_file_keeps_tokens(w):
    old = w.token
    w.start_cloud()
    a = w.start_agent()
    # The agent is online when it says so; the cloud logs the session a
    # moment later (much later under ASan): count from after that line.
    w.cloud.wait_line(rf"Device '{a.device_id}' connected")
    sub = w.subscribe("example/").wait_ready()  # with the old token
    notify_mark, cloud_mark = w.notify.mark(), w.cloud.mark()
    new = w.pki("token", w.path("new-token")).strip()

    # A token with a blank inside: refused as a whole, nothing changes.
    write_tokens(w, new, "two words")
    reload(w, r"tokens:2: Token contains whitespace")
    w.cloud.wait_line(r"Reload failed, keeping the 1 API token\(s\) loaded before", start=cloud_mark)
    expect(status(w, old) == 200, "the old token stopped working after a failed reload")
    expect(status(w, new) == 401, "a token from a refused file was accepted")

    # No file at all: the same.
    os.unlink(w.path("tokens"))
    reload(w, r"Failed to open TokenFile '.*tokens': No such file or directory")
    expect(status(w, old) == 200, "the old token stopped working after a failed reload")
    # A failed reload ends no stream (the line comes before READY=1).
    expect(w.cloud.count(r"Closed \d+ event stream", cloud_mark) == 0, "a failed reload closed event streams")

    # Fixed: the next SIGHUP takes it, and ends the old token's stream.
    write_tokens(w, new)
    reload(w, r"Reloaded 1 API token\(s\)", closed=1)
    ended_cleanly(sub, "the end of the stream opened with the removed token")
    expect(status(w, new) == 200, "the new token is refused after the reload")
    expect(status(w, old) == 401, "the removed token still works after the reload")
    stayed_connected(w, a, a.device_id, notify_mark, cloud_mark)



def write_file(path, data):
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.rename(path + ".tmp", path)


def online(w, device, server_ca):
    """A fake device with this certificate gets online."""
    mark = w.notify.mark()
    d = fakedev.Device(w.coap_port, device[1], device[2], server_ca)
    d.handshake()
    w.wait_online(device[0], mark)
    return d


def refused(w, device, server_ca):
    """The cloud closes a session with this device's certificate (TLS 1.3:
    the client finishes first and then reads the cloud's alert or EOF)."""
    try:
        d = fakedev.Device(w.coap_port, device[1], device[2], server_ca)
        try:
            d.handshake()
        finally:
            d.close()
    except ssl.SSLCertVerificationError as e:
        raise Failure(f"the device did not trust the cloud: {e}")
    except (OSError, EOFError):
        return True
    except Failure:
        return False
    return False


def test_sighup_reloads_ca(w):
    w.pki("ca", w.path("new"))
    ca_path = w.path("pki", "ca.crt")
    old_ca = open(ca_path, "rb").read()
    new_ca = open(w.path("new", "ca.crt"), "rb").read()
    server_ca = w.path("server-ca.crt")
    write_file(server_ca, old_ca)
    w.start_cloud()
    old_dev, old_dev2, old_dev3 = w.new_device(), w.new_device(), w.new_device()
    new_dev = w.new_device(w.path("new"))
    kept = online(w, old_dev, server_ca)
    expect(refused(w, new_dev, server_ca), "a device of a CA not in CAFile was accepted")

    # Both CAs: the new CA's devices get in, the open session stays.
    write_file(ca_path, old_ca + new_ca)
    reload(w, r"Reloaded the TLS certificate .* for new device sessions")
    online(w, new_dev, server_ca).close()

    # Only the new CA: the old CA's devices are refused from now on.
    write_file(ca_path, new_ca)
    reload(w, r"Reloaded the TLS certificate")
    expect(refused(w, old_dev2, server_ca), "a device of the removed CA was accepted after SIGHUP")
    online(w, new_dev, server_ca).close()

    # A bad file keeps the CA loaded before.
    write_file(ca_path, b"not a certificate\n")
    reload(w, r"Cannot load TLS file '.*ca\.crt', keeping the certificates loaded before")
    online(w, new_dev, server_ca).close()
    expect(refused(w, old_dev3, server_ca), "a bad CA file let the removed CA back in")
    expect(w.cloud.count(rf"Device '{old_dev[0]}' disconnected") == 0,
           "a session opened before the reloads was closed")
    kept.close()

if __name__ == "__main__":
    sys.exit(run([test_sighup_reloads_tokens, test_bad_token_file_keeps_tokens, test_sighup_reloads_ca], emulated="ok"))
