#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""End to end through the real cloud and agent: calls, variables, events in
both directions, error paths, plugin failures and reload."""

import json
import os
import shutil
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import PLUGINS, TEST_PLUGINS, expect, run  # noqa: E402


def test_call_get_publish_subscribe(w):
    w.start_cloud()
    a = w.start_agent()
    dev = a.device_id

    r = w.tether("list")
    expect(dev in r.stdout, f"device missing from 'tether list': {r.stdout}")
    r = w.tether("describe", dev, "--json")
    info = json.loads(r.stdout)
    expect("echo" in info["functions"] and info["variables"].get("counter") == "int32",
           f"describe lacks the example plugin: {info}")

    r = w.tether("call", dev, "echo", "hello")
    expect(r.stdout.strip() == "5", f"echo hello returned {r.stdout!r}")
    r = w.tether("call", dev, "add", "40,2")
    expect(r.stdout.strip() == "42", f"add 40,2 returned {r.stdout!r}")
    r = w.tether("call", dev, "echo")
    expect(r.stdout.strip() == "0", f"echo without argument returned {r.stdout!r}")

    for var, typ in (("counter", int), ("ratio", float), ("label", str), ("enabled", bool)):
        r = w.tether("get", dev, var, "--json")
        result = json.loads(r.stdout)["result"]
        expect(type(result) is typ, f"variable {var} is {result!r}, expected a {typ.__name__}")
    r = w.tether("get", dev, "label")
    expect(r.stdout.strip() == "example", f"label is {r.stdout!r}")

    # Device -> cloud: echo publishes example/echo with its argument.
    sub = w.subscribe("example/", "--device", dev).wait_ready()
    w.tether("call", dev, "echo", "ping-from-device")
    ev = sub.wait(lambda e: e.get("name") == "example/echo", what="example/echo event")
    expect(ev["data"] == "ping-from-device" and ev["coreid"] == dev, f"wrong event {ev}")
    sub.close()

    # Cloud -> device: the example plugin subscribes to example/cmd and
    # reports what it got as the variable last_event (announced as the
    # private event tether/var/last_event).
    sub = w.subscribe("tether/var/last_event").wait_ready()
    w.tether("publish", "example/cmd/light", "on-42")
    sub.wait(lambda e: e.get("name") == "tether/var/last_event", what="last_event change")
    r = w.tether("get", dev, "last_event")
    expect(r.stdout.strip() == "on-42", f"device saw {r.stdout!r}, expected on-42")
    # Not subscribed prefixes do not reach it.
    w.tether("publish", "other/thing", "nope")
    w.tether("publish", "example/cmd/light", "off-7")
    sub.wait(lambda e: e.get("name") == "tether/var/last_event" and e.get("data") == '"off-7"',
             what="second last_event change")
    sub.close()
    # An event without data reaches the plugin too (it travels as "data":null).
    mark = a.mark()
    w.tether("publish", "example/cmd/empty")
    a.wait_line(r"received event 'example/cmd/empty'", start=mark)
    expect(a.count("malformed event notification", mark) == 0, "the agent refused an event without data")


def test_errors_keep_agent_serving(w):
    w.start_cloud()
    a = w.start_agent(extra="[Limits]\nMaxPayload=100\n")
    dev = a.device_id

    r = w.tether("call", dev, "nosuch", "x", check=False)
    expect(r.returncode != 0 and "nosuch" in r.stderr, f"unknown function: {r.returncode} {r.stderr!r}")
    r = w.tether("get", dev, "nosuch", check=False)
    expect(r.returncode != 0 and "nosuch" in r.stderr, f"unknown variable: {r.returncode} {r.stderr!r}")
    r = w.tether("call", dev, "add", "forty,two", check=False)
    expect(r.returncode != 0 and "argument" in r.stderr, f"bad argument: {r.returncode} {r.stderr!r}")
    # Over the agent's limit (100) but under the cloud's: the agent says 4.13.
    r = w.tether("call", dev, "echo", "x" * 200, check=False)
    expect(r.returncode != 0 and "200 bytes" in r.stderr, f"oversize argument: {r.returncode} {r.stderr!r}")
    # Over the cloud's limit: refused before it reaches the device.
    r = w.tether("call", dev, "echo", "x" * 20000, check=False)
    expect(r.returncode != 0 and ("large" in r.stderr or "413" in r.stderr),
           f"oversize for the cloud: {r.returncode} {r.stderr!r}")
    r = w.tether("call", dev, "echo", "ok", token="0" * 40, check=False)
    expect(r.returncode != 0 and ("token" in r.stderr or "401" in r.stderr), f"bad token: {r.stderr!r}")
    r = w.tether("call", "nodevice", "echo", "x", check=False)
    expect(r.returncode != 0, "unknown device accepted")
    # OTA job ids are 16 lowercase hex digits (docs/protocol.md, "OTA"):
    # anything else is a usage error, nothing sent; a well-formed unknown
    # one reaches the cloud, which does not know it.
    for bad in ("api", "0123456789ABCDEF", "0123456789abcde", "0123456789abcdef0", dev):
        r = w.tether("ota", "status", bad, check=False)
        expect(r.returncode == 2 and "16 lowercase hex digits" in r.stderr,
               f"ota status {bad!r}: {r.returncode} {r.stderr!r}")
    r = w.tether("ota", "status", "0123456789abcdef", check=False)
    expect(r.returncode not in (0, 2) and "Invalid job id" not in r.stderr,
           f"ota status of an unknown job: {r.returncode} {r.stderr!r}")

    r = w.tether("call", dev, "echo", "still")
    expect(r.stdout.strip() == "5", f"agent stopped serving after errors: {r.stdout!r}")

    a.stop()
    r = w.tether("call", dev, "echo", "x", check=False)
    expect(r.returncode != 0 and "offline" in r.stderr, f"offline device: {r.returncode} {r.stderr!r}")


def test_plugin_failures(w):
    pdir = w.path("plugins")
    os.mkdir(pdir)
    shutil.copy(os.path.join(PLUGINS, "example.so"), pdir)
    for name in ("failing.so", "future.so"):
        shutil.copy(os.path.join(TEST_PLUGINS, name), pdir)
    with open(os.path.join(pdir, "garbage.so"), "w") as f:
        f.write("not an ELF file\n")
    w.start_cloud()
    a = w.start_agent(plugin_dir=pdir)
    a.wait_line(r"Plugin 'failing' failed to initialize")
    a.wait_line(r"future\.so' was built for plugin ABI 99\.0.*refusing")
    a.wait_line(r"Failed to load plugin '.*garbage\.so'")
    info = json.loads(w.tether("describe", a.device_id, "--json").stdout)
    expect("ghost" not in info["functions"], f"failed plugin's function kept: {info['functions']}")
    r = w.tether("call", a.device_id, "add", "1,2")
    expect(r.stdout.strip() == "3", "agent not serving with broken plugins around")


def test_plugin_errors_reach_the_api(w):
    pdir = w.path("plugins")
    os.mkdir(pdir)
    shutil.copy(os.path.join(TEST_PLUGINS, "errors.so"), pdir)
    w.start_cloud()
    a = w.start_agent(plugin_dir=pdir)
    dev = a.device_id
    # A plugin's own ENOENT is a failure of the plugin, not an unknown name.
    for arg, status in (("ENOENT", "502"), ("EIO", "502"), ("EBUSY", "503"), ("EINVAL", "400")):
        r = w.tether("call", dev, "fail", arg, check=False)
        expect(r.returncode != 0 and "not found" not in r.stderr.lower(),
               f"fail {arg}: {r.returncode} {r.stderr!r}")
        expect(status in r.stderr or (status == "400" and "argument" in r.stderr),
               f"fail {arg}: expected {status}, got {r.stderr!r}")
    r = w.tether("call", dev, "fail", "ENOENT", "--json", check=False)
    expect("No such file or directory" in r.stdout + r.stderr, f"errno text missing: {r.stdout!r} {r.stderr!r}")
    r = w.tether("get", dev, "broken", check=False)
    expect(r.returncode != 0 and "Input/output error" in r.stderr, f"broken variable: {r.stderr!r}")
    r = w.tether("call", dev, "fail", "fine")
    expect(r.stdout.strip() == "0", "agent not serving after plugin errors")


def test_reload_keeps_connection(w):
    w.start_cloud()
    a = w.start_agent()
    dev = a.device_id
    with open(a.conf, "a") as f:
        f.write("Label=reloaded\n")  # still inside [Plugin example]
    mark_notify = w.notify.mark()
    mark = a.mark()
    a.signal(signal.SIGHUP)
    a.wait_line(r"Reloaded configuration", start=mark)
    r = w.tether("get", dev, "label")
    expect(r.stdout.strip() == "reloaded", f"label after reload is {r.stdout!r}")
    offline = [m for m in w.notify.messages[mark_notify:] if m.get("X_TETHER_OFFLINE") == dev]
    expect(not offline, "the connection dropped on reload")
    expect(not any("Disconnected" in line for line in a.lines[mark:]), "agent reconnected on reload")

    # A broken config on reload is refused and the agent keeps running.
    with open(a.conf) as f:
        good = f.read()
    with open(a.conf, "a") as f:
        f.write("[Connection]\nKeepaliveSec=banana\n")
    mark = a.mark()
    a.signal(signal.SIGHUP)
    a.wait_line(r"Reload failed.*KeepaliveSec", start=mark)
    r = w.tether("call", dev, "echo", "abc")
    expect(r.stdout.strip() == "3", "agent not serving after a failed reload")

    # So is a line longer than libinih reads (199 bytes): not cut, with its
    # rest ("Label=cut") read as a key of its own.
    line = "Label=" + "x" * 193 + "Label=cut"
    with open(a.conf, "w") as f:
        f.write(good + line + "\n")
    n = (good + line).count("\n") + 1
    mark = a.mark()
    a.signal(signal.SIGHUP)
    a.wait_line(r"Reload failed, keeping the running configuration: .*:%d: line longer than 199 bytes" % n,
                start=mark)
    r = w.tether("get", dev, "label")
    expect(r.stdout.strip() == "reloaded", f"label after a refused reload is {r.stdout!r}")


if __name__ == "__main__":
    sys.exit(run([test_call_get_publish_subscribe, test_errors_keep_agent_serving, test_plugin_failures,
                  test_plugin_errors_reach_the_api, test_reload_keeps_connection], emulated="ok"))
