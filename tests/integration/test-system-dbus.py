#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""system.restart over the real system bus: the agent asks systemd (sd-bus,
Manager.RestartUnit) to restart an allow-listed transient unit, and the
unit's invocation changes; an allow-listed unit that does not exist comes
back as a failed system/restart event. Needs root, systemd as init and a
system bus; exits 77 saying which is missing otherwise (the nspawn system
tier provides them)."""

import json
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import expect, poll, run, skip  # noqa: E402


def available():
    if os.geteuid() != 0:
        return "restarting units needs root (or a polkit rule for the agent's user)"
    if not os.path.isdir("/run/systemd/system"):
        return "systemd is not the init system here (no /run/systemd/system)"
    if not os.path.exists("/run/dbus/system_bus_socket"):
        return "no system bus (/run/dbus/system_bus_socket)"
    for tool in ("systemd-run", "systemctl"):
        if not shutil.which(tool):
            return f"{tool} is not installed"
    return None


def show(unit, prop):
    return subprocess.run(["systemctl", "show", "-p", prop, "--value", unit], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_restart_through_systemd(w):
    unit = f"tether-test-{os.getpid()}.service"
    missing = f"tether-test-missing-{os.getpid()}.service"
    subprocess.run(["systemd-run", "--quiet", f"--unit={unit}", "--property=Type=simple", "sleep", "600"],
                   check=True)
    w.cleanups.append(lambda: subprocess.run(["systemctl", "stop", unit], capture_output=True))
    before = show(unit, "InvocationID")
    expect(before, f"{unit} has no InvocationID")

    w.start_cloud()
    sub = w.subscribe("system/restart").wait_ready()
    a = w.start_agent(plugin_dir=w.plugin_dir("system"), extra=f"[Plugin system]\nRestartUnits={unit} {missing}\n")
    dev = a.device_id
    r = w.tether("call", dev, "system.restart", unit)
    expect(r.stdout.strip() == "0", f"system.restart returned {r.stdout!r}")
    ev = sub.wait(lambda e: e.get("name") == "system/restart", what="system/restart event")
    d = json.loads(ev["data"])
    expect(d.get("ok") is True and d.get("unit") == unit and d.get("job", "").startswith("/org/freedesktop/systemd1/job/"),
           f"restart event {d}")
    # systemd runs the job on its own time: the new invocation shows up
    # there; there is no event for it we could wait on from here.
    poll(lambda: show(unit, "InvocationID") != before, 20, f"{unit} to be restarted")

    r = w.tether("call", dev, "system.restart", missing)
    expect(r.stdout.strip() == "0", f"system.restart of a missing unit returned {r.stdout!r}")
    ev = sub.wait(lambda e: e.get("name") == "system/restart" and json.loads(e["data"]).get("unit") == missing,
                  what="failed restart event")
    d = json.loads(ev["data"])
    expect(d.get("ok") is False and "NoSuchUnit" in d.get("error", ""), f"missing unit event {d}")


if __name__ == "__main__":
    reason = available()
    if reason:
        skip(reason)
    sys.exit(run([test_restart_through_systemd], emulated='needs systemd as init'))
