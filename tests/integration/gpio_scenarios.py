# SPDX-License-Identifier: Apache-2.0
"""GPIO behaviours through the real cloud and agent, run against a simulated
chip: the libgpiod-boundary simulator (test-gpio.py, always) and the kernel's
gpio-sim (test-gpio-kernel.py, where the kernel has it). A "sim" here is an
object with:

    chip            what the lines file says in Chip= (a chip label)
    env             extra environment for tetherd
    set(off, lvl)   pull a line to a physical level (the outside world)
    level(off)      the physical level of a line
    wait(off, lvl)  return once the physical level is lvl (deadline)
    requested(off)  whether some consumer holds the line
    late_chip       label of a chip that does not exist until hotplug()
    hotplug()       make late_chip appear
    close()         remove what the sim created (after the agent stopped)
"""

import calendar
import json
import re
import signal
import time

from harness import expect, seconds

LINES = """
[Line relay1]
Chip={chip}
Offset=1
Direction=output
Default=0

[Line relay2]
Chip={chip}
Offset=2
Direction=output
ActiveLow=yes
Default=1

[Line button]
Chip={chip}
Offset=3
Direction=input
Bias=pull-up
Edge=both

[Line door]
Chip={chip}
Offset=4
Direction=input
ActiveLow=yes
Bias=pull-down
Edge=rising

[Line bouncy]
Chip={chip}
Offset=5
Direction=input
Bias=pull-down
Edge=both
Debounce={debounce}

[Line plain]
Chip={chip}
Offset=6
Direction=input
Bias=pull-down
"""

# Longer than the gaps between the edges of a burst the test makes, with
# one command to the simulator each.
DEBOUNCE_MS = int(seconds(0.5) * 1000)

GHOST = """
[Line ghost]
Chip={late}
Offset=0
Direction=output
Default=1
"""


def start(w, sim, extra_lines=""):
    lines = w.path("gpio-lines.conf")
    with open(lines, "w") as f:
        f.write(LINES.format(chip=sim.chip, debounce=DEBOUNCE_MS) + extra_lines)
    w.start_cloud()
    a = w.start_agent(plugin_dir=w.plugin_dir("gpio"), env=sim.env,
                      extra=f"[Plugin gpio]\nLinesFile={lines}\n")
    a.wait_line(r"plugin gpio: \d+ line\(s\) configured")
    a.lines_file = lines
    return a


def call(w, dev, fn, arg, check=True):
    r = w.tether("call", dev, fn, arg, check=check)
    return r.stdout.strip() if check else r


def get(w, dev, var):
    return json.loads(w.tether("get", dev, var, "--json").stdout)["result"]


def edge_data(ev):
    return json.loads(ev["data"])


def outputs_start_at_default_and_follow_writes(w, sim):
    a = start(w, sim)
    dev = a.device_id
    # Default=0 on an active-high line is level 0; Default=1 on an
    # active-low line is level 0 too.
    sim.wait(1, 0)
    sim.wait(2, 0)
    expect(sim.requested(1) and sim.requested(2), "outputs not requested at start")
    expect(get(w, dev, "gpio.relay1") == 0 and get(w, dev, "gpio.relay2") == 1,
           "variables do not show the defaults")

    expect(call(w, dev, "gpio.write", "relay1,1") == "1", "gpio.write relay1,1 did not return 1")
    sim.wait(1, 1)
    expect(sim.level(1) == 1, "relay1 is not high after writing 1")
    expect(get(w, dev, "gpio.relay1") == 1, "gpio.relay1 does not read 1")
    expect(call(w, dev, "gpio.read", "relay1") == "1", "gpio.read relay1 is not 1")

    call(w, dev, "gpio.write", "relay2 0")  # blanks separate too
    sim.wait(2, 1)
    expect(get(w, dev, "gpio.relay2") == 0, "active-low relay2 does not read 0 at level 1")

    info = json.loads(w.tether("describe", dev, "--json").stdout)
    for fn in ("gpio.write", "gpio.pulse", "gpio.read"):
        expect(fn in info["functions"], f"{fn} missing from describe: {info['functions']}")
    for var in ("gpio.relay1", "gpio.button", "gpio.plain"):
        expect(info["variables"].get(var) == "int32", f"{var} is not an int32 variable: {info['variables']}")


def pulse_does_not_block(w, sim):
    a = start(w, sim)
    dev = a.device_id
    sim.wait(1, 0)
    # The longest pulse there is (GPIO_PULSE_MAX_MS in plugins/gpio/gpio.c):
    # still high after the calls below however slow they are. The call
    # came back while the line is high: the pulse runs on a timer, and the
    # agent serves other calls meanwhile.
    expect(call(w, dev, "gpio.pulse", "relay1,60000") == "1", "gpio.pulse did not return 1")
    expect(sim.level(1) == 1, "relay1 not high during the pulse")
    expect(call(w, dev, "gpio.read", "relay1") == "1", "agent not serving during a pulse")
    r = call(w, dev, "gpio.pulse", "relay1,100", check=False)
    expect(r.returncode != 0 and "busy" in r.stderr, f"a pulse during a pulse: {r.returncode} {r.stderr!r}")

    # A write ends a pulse in progress: the next pulse is not busy. It has
    # an explicit value: from a high line it goes low and, by itself, back.
    # Long enough to be seen low after the call came back (TIME_FACTOR).
    call(w, dev, "gpio.write", "relay1,1")
    sim.wait(1, 1)
    ms = int(seconds(1.5) * 1000)
    expect(call(w, dev, "gpio.pulse", f"relay1,{ms},0") == "0", "a write did not end the pulse")
    expect(sim.level(1) == 0, f"relay1 not low during a {ms} ms pulse to 0")
    sim.wait(1, 1)  # ...and it ends by itself
    expect(call(w, dev, "gpio.read", "relay1") == "1", "relay1 does not read 1 after the pulse")


def edges_become_events(w, sim):
    a = start(w, sim)
    dev = a.device_id
    sub = w.subscribe("gpio/", "--device", dev).wait_ready()

    # button: pull-up bias, both edges.
    sim.wait(3, 1)
    expect(get(w, dev, "gpio.button") == 1, "button with pull-up does not read 1")
    t0 = time.monotonic_ns()
    sim.set(3, 0)
    ev = sub.wait(lambda e: e.get("name") == "gpio/button", what="gpio/button falling edge")
    t1 = time.monotonic_ns()
    d = edge_data(ev)
    expect(d["value"] == 0, f"falling edge reported as {d}")
    expect(t0 <= d["monotonic_ns"] <= t1, f"edge time {d['monotonic_ns']} not within [{t0}, {t1}]")
    wall = calendar.timegm(time.strptime(d["timestamp"][:19], "%Y-%m-%dT%H:%M:%S"))
    expect(abs(wall - time.time()) < 60, f"timestamp {d['timestamp']} is not now")
    sim.set(3, 1)
    sub.wait(lambda e: e.get("name") == "gpio/button" and edge_data(e)["value"] == 1,
             what="gpio/button rising edge")

    # door: active low, rising edges only. Level 1 is logical 0 (a falling
    # edge: no event), level 0 again is logical 1 (an event).
    sim.set(4, 1)
    sim.set(4, 0)
    ev = sub.wait(lambda e: e.get("name") == "gpio/door", what="gpio/door rising edge")
    expect(edge_data(ev)["value"] == 1, f"door: the first event is {ev} (a falling edge slipped through?)")
    expect(get(w, dev, "gpio.door") == 1, "door at level 0 does not read logical 1")

    # bouncy: DEBOUNCE_MS debounce. Nine quick edges (a bouncing contact ending
    # high) make one event, with the final value. Events arrive in order,
    # so anything the burst produced on its own would come first.
    for level in (1, 0, 1, 0, 1, 0, 1, 0, 1):
        sim.set(5, level)
    sub.wait(lambda e: e.get("name") == "gpio/bouncy", what="debounced event")
    bouncy = [edge_data(e)["value"] for e in sub.events if e.get("name") == "gpio/bouncy"]
    expect(bouncy == [1], f"debounced events {bouncy}, expected [1]")

    # plain: no Edge=, so no events, but a readable variable.
    sim.set(6, 1)
    expect(get(w, dev, "gpio.plain") == 1, "plain input does not follow its level")
    sub.close()
    names = {e.get("name") for e in sub.events}
    expect("gpio/plain" not in names, "an input without Edge= produced events")


def bad_input_keeps_serving(w, sim):
    a = start(w, sim, extra_lines=GHOST.format(late=sim.late_chip))
    dev = a.device_id
    a.wait_line(r"line 'ghost': cannot request " + re.escape(sim.late_chip) + " offset 0: no such chip")
    cases = [
        ("gpio.write", "nosuch,1", "rejected the argument", "unknown line 'nosuch'"),
        ("gpio.write", "button,1", "rejected the argument", "line 'button' is an input"),
        ("gpio.write", "relay1,2", "rejected the argument", "expected 'NAME,0' or 'NAME,1'"),
        ("gpio.write", "relay1", "rejected the argument", "expected 'NAME,0' or 'NAME,1'"),
        ("gpio.pulse", "relay1,0", "rejected the argument", "expected 'NAME,MS"),
        ("gpio.pulse", "relay1,99999999", "rejected the argument", "expected 'NAME,MS"),
        ("gpio.pulse", "button,100", "rejected the argument", "line 'button' is an input"),
        ("gpio.read", "", "rejected the argument", "expected a line name"),
        ("gpio.write", "ghost,1", "No such device", None),
    ]
    for fn, arg, cloud_says, agent_says in cases:
        mark = a.mark()
        r = call(w, dev, fn, arg, check=False)
        expect(r.returncode != 0 and cloud_says in r.stderr, f"{fn} {arg!r}: {r.returncode} {r.stderr!r}")
        if agent_says:
            a.wait_line(r"plugin gpio: .*" + re.escape(agent_says), start=mark)
    r = w.tether("get", dev, "gpio.ghost", check=False)
    expect(r.returncode != 0 and "No such device" in r.stderr, f"reading a line without chip: {r.stderr!r}")
    expect(call(w, dev, "gpio.write", "relay1,1") == "1", "agent stopped serving after bad input")

    # The chip appears (hotplug): the line works on next use.
    sim.hotplug()
    expect(call(w, dev, "gpio.write", "ghost,0") == "0", "line did not come up once its chip appeared")
    expect(get(w, dev, "gpio.ghost") == 0, "ghost line does not read what was written")
    sim.wait(0, 0, chip=sim.late_chip)


def reload_keeps_outputs_and_releases_removed_lines(w, sim):
    a = start(w, sim)
    dev = a.device_id
    call(w, dev, "gpio.write", "relay1,1")
    sim.wait(1, 1)

    # Reload with relay1 unchanged and "plain" removed: relay1 keeps 1
    # (Default=0 applies at start, not on reload), plain is released.
    with open(a.lines_file) as f:
        text = f.read()
    text = text.replace("[Line plain]", "[Unused plain]")
    with open(a.lines_file, "w") as f:
        f.write(text)
    mark, notified = a.mark(), w.notify.mark()
    a.signal(signal.SIGHUP)
    a.wait_line(r"Reloaded configuration", start=mark)
    a.wait_line(r"unknown section \[Unused plain\]", start=mark)
    w.wait_described(dev, notified)  # the cloud has fetched the new describe data
    expect(sim.level(1) == 1, "relay1 went back to its default on reload")
    expect(sim.requested(1), "relay1 not requested after reload")
    expect(get(w, dev, "gpio.relay1") == 1, "relay1 reads wrong after reload")
    expect(not sim.requested(6), "a line removed from the file was not released")
    r = w.tether("get", dev, "gpio.plain", check=False)
    expect(r.returncode != 0, "variable of a removed line still there")

    # A broken lines file: the plugin refuses with FILE:LINE, releases its
    # lines, and the agent keeps serving.
    with open(a.lines_file, "a") as f:
        f.write("\n[Line broken]\nChip=x\nOffset=banana\n")
    mark, notified = a.mark(), w.notify.mark()
    a.signal(signal.SIGHUP)
    a.wait_line(r"gpio-lines\.conf:\d+: invalid Offset='banana'", start=mark)
    a.wait_line(r"Plugin 'gpio' failed to initialize", start=mark)
    a.wait_line(r"Reloaded configuration", start=mark)
    w.wait_described(dev, notified)
    expect(not sim.requested(1), "lines still held by a plugin that failed to load")
    r = w.tether("describe", dev, "--json")
    expect("gpio.write" not in json.loads(r.stdout)["functions"], "failed plugin's functions still listed")
    r = w.tether("call", dev, "gpio.write", "relay1,1", check=False)
    expect(r.returncode != 0 and "unknown function" in r.stderr, f"failed plugin still answers: {r.stderr!r}")


SCENARIOS = [outputs_start_at_default_and_follow_writes, pulse_does_not_block, edges_become_events,
             bad_input_keeps_serving, reload_keeps_outputs_and_releases_removed_lines]


def bind(scenario, make_sim):
    """A harness test function running scenario with a sim made per World;
    the sim is removed after the World's daemons stopped."""
    def test(w):
        sim = make_sim(w)
        w.cleanups.append(sim.close)
        scenario(w, sim)
    test.__name__ = scenario.__name__
    return test
