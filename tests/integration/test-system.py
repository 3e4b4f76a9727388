#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""The system plugin through the cloud: variables against this machine's
own /proc, statvfs and os-release, and against a fake proc root with
malformed files; restart and reboot off by default, the allow-list's
refusals, and a bus that is not there. The D-Bus call itself is in
test-system-dbus.py (needs a system bus with systemd)."""

import json
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import TETHERD, expect, run  # noqa: E402

# No system bus at all: restart/reboot requests can never reach a real
# systemd or logind from this test, whatever machine it runs on.
NO_BUS = {"DBUS_SYSTEM_BUS_ADDRESS": "unix:path=/nonexistent/tether-test-bus"}


def start(w, extra="", plugins=("example", "gpio", "sensors", "system"), env=None):
    w.start_cloud()
    e = dict(NO_BUS)
    e.update(env or {})
    a = w.start_agent(plugin_dir=w.plugin_dir(*plugins), env=e,
                      extra=f"[Plugin sensors]\nSysfsRoot={w.path('nosys')}\n[Plugin gpio]\n"
                            f"LinesFile={w.path('no-gpio-lines')}\n[Plugin system]\n{extra}")
    a.wait_line(r"plugin system: \d+ mount")
    return a


def get(w, dev, var):
    return json.loads(w.tether("get", dev, var, "--json").stdout)["result"]


def test_variables_on_this_machine(w):
    a = start(w, "Mounts=/ /nonexistent-mount\nIncludeLoopback=yes\n")
    dev = a.device_id
    info = json.loads(w.tether("describe", dev, "--json").stdout)
    v, units = info["variables"], info.get("units", {})
    for name, typ, unit in (("system.uptime", "double", "s"), ("system.load1", "double", None),
                            ("system.mem_total", "double", "B"), ("system.disk.root.used", "double", "%"),
                            ("system.disk.root.size", "double", "B"), ("system.os", "string", None),
                            ("system.addresses", "string", None), ("system.plugins", "string", None)):
        expect(v.get(name) == typ, f"{name} is {v.get(name)}, expected {typ}")
        expect(units.get(name) == unit, f"{name} unit {units.get(name)!r}, expected {unit!r}")
    expect("system.restart" not in info["functions"] and "system.reboot" not in info["functions"],
           f"restart/reboot offered without being allowed: {info['functions']}")

    with open("/proc/uptime") as f:
        before = float(f.read().split()[0])
    up = get(w, dev, "system.uptime")
    expect(before <= up < before + 60, f"uptime {up}, /proc/uptime said {before}")
    with open("/proc/meminfo") as f:
        total = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:")) * 1024
    expect(get(w, dev, "system.mem_total") == total, "mem_total differs from /proc/meminfo")
    expect(0 < get(w, dev, "system.mem_available") <= total, "mem_available out of range")
    st = os.statvfs("/")
    expect(get(w, dev, "system.disk.root.size") == st.f_blocks * st.f_frsize, "disk size differs from statvfs")
    used = get(w, dev, "system.disk.root.used")
    expect(0 <= used <= 100, f"disk used {used}%")
    r = w.tether("get", dev, "system.disk.nonexistent-mount.avail", check=False)
    expect(r.returncode != 0 and "No such device" in r.stderr, f"missing mount: {r.stderr!r}")

    addrs = json.loads(get(w, dev, "system.addresses"))
    expect("127.0.0.1/8" in addrs.get("lo", []), f"addresses without loopback: {addrs}")
    expect(get(w, dev, "system.kernel") == os.uname().release, "kernel release differs")
    expect(get(w, dev, "system.hostname") == os.uname().nodename, "hostname differs")
    version = subprocess.run([TETHERD, "--version"], capture_output=True, text=True).stdout.split()[-1]
    expect(get(w, dev, "system.agent_version") == version, "agent version differs from tetherd --version")
    plugins = json.loads(get(w, dev, "system.plugins"))
    expect(plugins.get("example") == "1.0" and plugins.get("system") == version and "gpio" in plugins
           and "sensors" in plugins, f"plugins {plugins}")
    pretty = None
    for path in ("/etc/os-release", "/usr/lib/os-release"):
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    if line.startswith("PRETTY_NAME="):
                        pretty = line.split("=", 1)[1].strip().strip('"')
            break
    if pretty:
        expect(get(w, dev, "system.os") == pretty, "os differs from os-release's PRETTY_NAME")


def test_fake_proc_and_malformed(w):
    proc = w.path("proc")
    os.mkdir(proc)
    files = {
        "uptime": "12345.67 23456.78\n",
        "loadavg": "0.50 0.25 0.10 1/123 4567\n",
        "meminfo": "MemTotal:        1000000 kB\nMemFree:          200000 kB\nMemAvailable:     500000 kB\n",
    }
    for name, text in files.items():
        with open(os.path.join(proc, name), "w") as f:
            f.write(text)
    with open(w.path("os-release"), "w") as f:
        f.write('NAME="Tether"\nPRETTY_NAME="Tether Test OS \\"12\\" (x)"\nID=tether\n')
    a = start(w, f"ProcRoot={proc}\nOsRelease={w.path('os-release')}\n")
    dev = a.device_id
    for var, want in (("system.uptime", 12345.67), ("system.load1", 0.5), ("system.load5", 0.25),
                      ("system.load15", 0.1), ("system.mem_total", 1024000000.0),
                      ("system.mem_available", 512000000.0), ("system.os", 'Tether Test OS "12" (x)')):
        got = get(w, dev, var)
        expect(got == want, f"{var} = {got!r}, expected {want!r}")

    for name, text in (("uptime", "soon\n"), ("loadavg", "0.5 high\n"), ("meminfo", "MemTotal: 1 kB\n")):
        with open(os.path.join(proc, name), "w") as f:
            f.write(text)
    for var in ("system.uptime", "system.load5", "system.mem_available"):
        r = w.tether("get", dev, var, check=False)
        expect(r.returncode != 0 and "Bad message" in r.stderr, f"malformed {var}: {r.returncode} {r.stderr!r}")
    os.unlink(os.path.join(proc, "uptime"))
    r = w.tether("get", dev, "system.uptime", check=False)
    expect(r.returncode != 0 and "No such device" in r.stderr, f"missing uptime: {r.stderr!r}")
    with open(os.path.join(proc, "loadavg"), "w") as f:
        f.write("1.50 0.25 0.10 1/123 4567\n")
    expect(get(w, dev, "system.load1") == 1.5, "agent stopped serving after errors")


def test_restart_allow_list(w):
    a = start(w, "RestartUnits=tether-demo foo.service\nAllowReboot=no\n")
    dev = a.device_id
    info = json.loads(w.tether("describe", dev, "--json").stdout)
    expect("system.restart" in info["functions"], "system.restart not offered with RestartUnits=")
    expect("system.reboot" not in info["functions"], "system.reboot offered with AllowReboot=no")

    for arg, cloud_says, agent_says in (
            ("bar.service", "Operation not permitted", "refused 'bar.service': not in RestartUnits="),
            ("tether-demo.socket", "Operation not permitted", "refused 'tether-demo.socket'"),
            ("", "rejected the argument", "'' is not a unit name"),
            ("foo.service; reboot", "rejected the argument", "is not a unit name"),
            ("../../foo.service", "rejected the argument", "is not a unit name"),
            ("foo.nosuchtype", "rejected the argument", "is not a unit name")):
        mark = a.mark()
        r = w.tether("call", dev, "system.restart", arg, check=False)
        expect(r.returncode != 0 and cloud_says in r.stderr, f"restart {arg!r}: {r.returncode} {r.stderr!r}")
        a.wait_line(r"plugin system: system\.restart: .*" + re.escape(agent_says), start=mark)
    # Allowed ("tether-demo" means tether-demo.service), but there is no bus.
    mark = a.mark()
    r = w.tether("call", dev, "system.restart", "tether-demo", check=False)
    expect(r.returncode != 0 and "not connected" in r.stderr, f"restart without a bus: {r.stderr!r}")
    a.wait_line(r"cannot connect to the system bus", start=mark)
    r = w.tether("call", dev, "system.reboot", check=False)
    expect(r.returncode != 0 and "system.reboot" in r.stderr, f"reboot not refused: {r.stderr!r}")
    expect(get(w, dev, "system.load1") >= 0, "agent stopped serving")


def test_reboot_opt_in_and_bad_config(w):
    a = start(w, "AllowReboot=yes\n")
    dev = a.device_id
    info = json.loads(w.tether("describe", dev, "--json").stdout)
    expect("system.reboot" in info["functions"] and "system.restart" not in info["functions"],
           f"functions {info['functions']}")
    r = w.tether("call", dev, "system.reboot", "now", check=False)
    expect(r.returncode != 0 and "rejected the argument" in r.stderr, f"reboot with an argument: {r.stderr!r}")
    r = w.tether("call", dev, "system.reboot", check=False)
    expect(r.returncode != 0 and "not connected" in r.stderr, f"reboot without a bus: {r.stderr!r}")
    a.stop()

    for bad, says in (("AllowReboot=maybe", r"invalid AllowReboot='maybe'"),
                      ("RestartUnits=ok.service bad/unit", r"invalid unit name 'bad/unit' in RestartUnits="),
                      ("Mounts=relative/path", r"invalid Mounts= entry 'relative/path'"),
                      ("Mounts=/a-b /a/b", r"Mounts= entries '/a-b' and '/a/b' have the same name")):
        a = w.start_agent(name=f"agent-{len(w.daemons)}", plugin_dir=w.plugin_dir("example", "system"),
                          env=NO_BUS, extra=f"[Plugin system]\n{bad}\n")
        a.wait_line(says)
        a.wait_line(r"Plugin 'system' failed to initialize")
        r = w.tether("call", a.device_id, "add", "2,3")
        expect(r.stdout.strip() == "5", "agent not serving after the system plugin failed")
        a.stop()


if __name__ == "__main__":
    sys.exit(run([test_variables_on_this_machine, test_fake_proc_and_malformed, test_restart_allow_list,
                  test_reboot_opt_in_and_bad_config], emulated='compares against /proc of the machine, which qemu-user passes through unchanged'))
