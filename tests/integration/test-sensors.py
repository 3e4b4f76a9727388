#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""The sensors plugin end to end against a generated sysfs tree
(sysfs_tree.py, its SysfsRoot=): discovery, SI values and units through the
cloud, malformed files as clear errors, on-change and periodic events,
sensors appearing and vanishing on reload, bad configuration."""

import json
import os
import shutil
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sysfs_tree  # noqa: E402
from harness import expect, run  # noqa: E402


def start(w, extra="", subscribe=None):
    """Cloud, then (optionally) a subscriber, so it sees the first values,
    then the agent with the sensors plugin on a fresh tree."""
    root = w.path("sys")
    sysfs_tree.build(root)
    w.start_cloud()
    sub = w.subscribe(subscribe).wait_ready() if subscribe else None
    a = w.start_agent(plugin_dir=w.plugin_dir("sensors"),
                      extra=f"[Plugin sensors]\nSysfsRoot={root}\nSampleSec=0.2\n{extra}")
    a.wait_line(r"plugin sensors: first sample")
    a.root = root
    a.sub = sub
    return a


def value(w, dev, var):
    return json.loads(w.tether("get", dev, var, "--json").stdout)["result"]


def test_values_units_and_errors(w):
    a = start(w, "Exclude=hwmon.coretemp_1.* nosuch.*\n")
    dev = a.device_id
    a.wait_line(r"plugin sensors: 21 sensor\(s\) under .* \(hwmon 10, thermal 2, iio 6, w1 3\)")
    info = json.loads(w.tether("describe", dev, "--json").stdout)
    for name, (v, unit) in sysfs_tree.SENSORS.items():
        if name.startswith("hwmon.coretemp_1."):
            expect(name not in info["variables"], f"excluded {name} is offered")
            continue
        expect(info["variables"].get(name) == "double", f"{name} not offered as a double: {info['variables']}")
        if v == "error":
            r = w.tether("get", dev, name, check=False)
            expect(r.returncode != 0 and unit in r.stderr, f"{name}: expected an error with {unit!r}, got "
                   f"{r.returncode} {r.stdout!r} {r.stderr!r}")
            continue
        expect(info.get("units", {}).get(name) == unit, f"{name}: unit {info.get('units', {}).get(name)!r}, "
               f"expected {unit!r}")
        got = value(w, dev, name)
        expect(isinstance(got, (int, float)) and abs(got - v) < 1e-9, f"{name} = {got!r}, expected {v}")
    # Not sensors: labels, limits, pwm, cooling devices, non-thermometer 1-Wire devices.
    for name in info["variables"]:
        expect(name in sysfs_tree.SENSORS, f"unexpected variable {name}")
    human = w.tether("describe", dev).stdout
    expect("hwmon.coretemp.temp1" in human and "°C" in human, f"tether describe shows no units:\n{human}")
    # Exact decimal values, not 42.50000000000001.
    r = w.tether("get", dev, "hwmon.coretemp.temp1")
    expect(r.stdout.strip() == "42.5", f"tether get prints {r.stdout!r}")


def test_changes_publish_and_get_follows(w):
    a = start(w, "Threshold.temperature=0.5\nThreshold.humidity=off\nPublishSec=0\n", subscribe="sensors/hwmon.")
    dev = a.device_id
    sub = a.sub
    var = "hwmon.coretemp.temp1"
    path = os.path.join(a.root, "class/hwmon/hwmon0/temp1_input")

    def temps():
        return [json.loads(e["data"])["value"] for e in sub.events if e.get("name") == "sensors/" + var]

    # The first sample publishes every value once.
    sub.wait(lambda e: e.get("name") == "sensors/" + var, what="first value")
    expect(temps() == [42.5], f"first events {temps()}")

    sysfs_tree.write(a.root, "class/hwmon/hwmon0/temp1_input", "44000\n")
    ev = sub.wait(lambda e: e.get("name") == "sensors/" + var and json.loads(e["data"])["value"] != 42.5,
                  what=f"{var} change event")
    d = json.loads(ev["data"])
    expect(d == {"value": 44, "unit": "°C"}, f"event data {d}")
    expect(value(w, dev, var) == 44.0, "tether get does not follow the file")

    # 0.2 over what was last sent, under the threshold: no event; the
    # humidity change never publishes (Threshold.humidity=off). Then the
    # broken sensor gets a good value and so publishes: the sampler reads
    # in name order and hwmon.broken sorts before both, so the sample that
    # publishes it has seen the two writes before it.
    sysfs_tree.write(a.root, "class/hwmon/hwmon0/temp1_input", "44200\n")
    sysfs_tree.write(a.root, "class/hwmon/hwmon1/humidity1_input", "80000\n")
    sysfs_tree.write(a.root, "class/hwmon/hwmon6/temp1_input", "1000\n")
    sub.wait(lambda e: e.get("name") == "sensors/hwmon.broken.temp1", what="repaired sensor's first event")
    expect(value(w, dev, var) == 44.2, "get does not show the small change")
    expect(value(w, dev, "hwmon.sht3x.humidity1") == 80.0, "humidity value not updated")
    sysfs_tree.write(a.root, "class/hwmon/hwmon0/temp1_input", "45000\n")
    sub.wait(lambda e: e.get("name") == "sensors/" + var and json.loads(e["data"])["value"] == 45,
             what="change beyond the threshold")
    expect(temps() == [42.5, 44, 45], f"temperature events {temps()}, expected [42.5, 44, 45]")
    expect(not any(e.get("name") == "sensors/hwmon.sht3x.humidity1" for e in sub.events),
           "humidity published with Threshold.humidity=off")

    # A file turning malformed is an error result; the agent keeps serving.
    with open(path, "w") as f:
        f.write("garbage\n")
    a.wait_line(r"sensor 'hwmon\.coretemp\.temp1' .*unexpected content")
    r = w.tether("get", dev, var, check=False)
    expect(r.returncode != 0 and "Bad message" in r.stderr, f"malformed file: {r.stderr!r}")
    expect(value(w, dev, "thermal.cpu-thermal") == 47.0, "other sensors stopped after a bad one")
    sysfs_tree.write(a.root, "class/hwmon/hwmon0/temp1_input", "46000\n")
    a.wait_line(r"sensor 'hwmon\.coretemp\.temp1' reads again")
    sub.close()


def test_periodic_publish(w):
    # No change events for fans: what arrives is the periodic publish.
    start(w, "Threshold.fan=off\nPublishSec=1\n")
    sub = w.subscribe("sensors/hwmon.pwmfan.fan1").wait_ready()
    sub.wait(lambda e: len([x for x in sub.events if x.get("name") == "sensors/hwmon.pwmfan.fan1"]) >= 2,
             timeout=15, what="two periodic publishes")
    d = json.loads(sub.events[0]["data"])
    expect(d == {"value": 1200, "unit": "rpm"}, f"periodic event data {d}")
    sub.close()


def test_appear_and_vanish_on_reload(w):
    a = start(w)
    dev = a.device_id
    shutil.rmtree(os.path.join(a.root, "class/hwmon/hwmon3"))
    a.wait_line(r"sensor 'hwmon\.pwmfan\.fan1' .*No such device")
    r = w.tether("get", dev, "hwmon.pwmfan.fan1", check=False)
    expect(r.returncode != 0 and "No such device" in r.stderr, f"vanished sensor: {r.stderr!r}")
    sysfs_tree.write(a.root, "class/hwmon/hwmon7/name", "nvme\n")
    sysfs_tree.write(a.root, "class/hwmon/hwmon7/temp1_input", "38850\n")

    mark, notified = a.mark(), w.notify.mark()
    a.signal(signal.SIGHUP)
    a.wait_line(r"Reloaded configuration", start=mark)
    a.wait_line(r"plugin sensors: first sample", start=mark)
    w.wait_described(dev, notified)  # the cloud has fetched the new describe data
    info = json.loads(w.tether("describe", dev, "--json").stdout)
    expect("hwmon.pwmfan.fan1" not in info["variables"], "vanished sensor still offered after reload")
    expect(info["units"].get("hwmon.nvme.temp1") == "°C", f"new sensor not offered: {info['variables']}")
    expect(value(w, dev, "hwmon.nvme.temp1") == 38.85, "new sensor reads wrong")


def test_bad_config_keeps_agent(w):
    root = w.path("sys")
    sysfs_tree.build(root)
    w.start_cloud()
    for bad, says in (("SampleSec=banana", r"invalid SampleSec='banana'"),
                      ("Threshold.temperature=-1", r"invalid Threshold\.temperature='-1'"),
                      ("Sources=hwmon gps", r"invalid Sources= entry 'gps'")):
        a = w.start_agent(name=f"agent-{len(w.daemons)}", plugin_dir=w.plugin_dir("example", "sensors"),
                          extra=f"[Plugin sensors]\nSysfsRoot={root}\n{bad}\n")
        a.wait_line(says)
        a.wait_line(r"Plugin 'sensors' failed to initialize")
        r = w.tether("call", a.device_id, "add", "1,2")
        expect(r.stdout.strip() == "3", "agent not serving after the sensors plugin failed")
        a.stop()
    # An empty root is no error: no sensors.
    a = w.start_agent(name="agent-empty", plugin_dir=w.plugin_dir("sensors"),
                      extra=f"[Plugin sensors]\nSysfsRoot={w.path('empty')}\n")
    a.wait_line(r"plugin sensors: 0 sensor\(s\)")


if __name__ == "__main__":
    sys.exit(run([test_values_units_and_errors, test_changes_publish_and_get_follows, test_periodic_publish,
                  test_appear_and_vanish_on_reload, test_bad_config_keeps_agent], emulated="ok"))
