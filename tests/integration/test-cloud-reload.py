#!/usr/bin/env python3
"""SIGHUP makes tether-cloudd read its token file again (docs/cloud.md,
"Reload"): new tokens work, removed ones get 401, a bad file keeps the
tokens it had; device sessions and event streams stay up throughout."""

import json
import os
import signal
import sys
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import SLOW, expect, run  # noqa: E402


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


def reload(w, expect_line):
    """SIGHUP; wait for RELOADING=1, then READY=1, and the log line."""
    mark, log = w.notify.mark(), w.cloud.mark()
    w.cloud.signal(signal.SIGHUP)
    reloading = w.notify.wait(lambda m: m.get("RELOADING") == "1", 10, "RELOADING=1", mark)
    expect("MONOTONIC_USEC" in reloading, f"RELOADING=1 without MONOTONIC_USEC=: {reloading}")
    at = w.notify.messages.index(reloading)
    w.notify.wait(lambda m: m.get("READY") == "1", 10, "READY=1 after RELOADING=1", at + 1)
    return w.cloud.wait_line(expect_line, start=log)


def stayed_connected(w, agent, dev, notify_mark, cloud_mark):
    """No reconnect anywhere: the agent logged no disconnect, the cloud
    neither closed nor accepted a session for the device."""
    expect(agent.count("Disconnected from") == 0, "the agent lost its connection")
    expect(w.cloud.count(rf"Device '{dev}' (connected|disconnected)", cloud_mark) == 0,
           "the device's session was replaced")
    expect(not any(m.get("X_TETHER_OFFLINE") == dev or m.get("X_TETHER_ONLINE") == dev
                   for m in w.notify.messages[notify_mark:]), "the cloud reported the device offline/online")


def test_sighup_reloads_tokens(w):
    old = w.token
    w.start_cloud()
    a = w.start_agent()
    dev = a.device_id
    # The agent is online when it says so; the cloud logs the session a
    # moment later (much later under ASan): count from after that line.
    w.cloud.wait_line(rf"Device '{dev}' connected")
    sub = w.subscribe("example/").wait_ready()  # opened with the old token
    notify_mark, cloud_mark = w.notify.mark(), w.cloud.mark()

    new = w.pki("token", w.path("new-token")).strip()
    also = w.pki("token", w.path("new-token")).strip()
    write_tokens(w, "# after the change", new, "", also)
    expect(status(w, new) == 401, "a token not loaded yet was accepted")
    expect(status(w, old) == 200, "the old token stopped working before the reload")

    reload(w, r"Reloaded 2 API token\(s\) from '.*tokens'")
    expect(status(w, new) == 200, "the new token is refused after the reload")
    expect(status(w, also) == 200, "the second new token is refused after the reload")
    expect(status(w, old) == 401, "the removed token still works after the reload")

    # The device is still there, on the same session, and answers.
    r = w.tether("call", dev, "add", "2,3", token=new)
    expect(r.stdout.strip() == "5", f"call after the reload returned {r.stdout!r}")
    devices = json.loads(w.tether("list", "--json", token=new).stdout)
    expect(any(d.get("id") == dev and d.get("connected") for d in devices), f"device not connected: {devices}")
    # The stream opened before the reload still delivers, from the device
    # (echo publishes example/echo) and from the API.
    w.tether("call", dev, "echo", "after-reload", token=new)
    w.tether("publish", "example/api", "after-reload", token=new)
    sub.wait(lambda e: e.get("name") == "example/echo" and e.get("data") == "after-reload",
             what="the device's event on the stream opened before the reload")
    sub.wait(lambda e: e.get("name") == "example/api" and e.get("data") == "after-reload",
             what="the API's event on the stream opened before the reload")
    expect(sub.proc.poll() is None, "the event stream ended")
    stayed_connected(w, a, dev, notify_mark, cloud_mark)


def test_bad_token_file_keeps_tokens(w):
    old = w.token
    w.start_cloud()
    a = w.start_agent()
    # The agent is online when it says so; the cloud logs the session a
    # moment later (much later under ASan): count from after that line.
    w.cloud.wait_line(rf"Device '{a.device_id}' connected")
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

    # Fixed: the next SIGHUP takes it.
    write_tokens(w, new)
    reload(w, r"Reloaded 1 API token\(s\)")
    expect(status(w, new) == 200, "the new token is refused after the reload")
    expect(status(w, old) == 401, "the removed token still works after the reload")
    stayed_connected(w, a, a.device_id, notify_mark, cloud_mark)


if __name__ == "__main__":
    sys.exit(run([test_sighup_reloads_tokens, test_bad_token_file_keeps_tokens], emulated="ok"))
