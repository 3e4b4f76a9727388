#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""tools/dev's command line, without starting anything: --dir is taken in
any position (before or after the command and its arguments, and as
--dir=DIR), the advice it prints repeats that --dir, TETHER_DEV_DIR (which
"tools/dev env" exports) is the default, and env prints what "up" wrote.
What "up" itself sets up is shown by README.md's quick start; "up
--devices 3" is run here, against this build (TETHER_DEV_BUILD): three
agents online with their tags, and "down" leaves no process behind."""

import json
import os
import subprocess
import sys
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import BUILD, EMULATOR, SRC, Skip, expect, run, seconds  # noqa: E402

DEV = os.path.join(SRC, "tools", "dev")


def dev(*args, env=None, cwd=None, timeout=30):
    e = dict(os.environ)
    e.pop("TETHER_DEV_DIR", None)
    e.update(env or {})
    return subprocess.run([DEV, *args], capture_output=True, text=True, env=e, cwd=cwd, timeout=seconds(timeout))


def test_dir_anywhere(w):
    d = w.path("dev dir")  # a space: the advice must quote it
    os.mkdir(d)
    advice = f"run 'tools/dev up --dir {d.replace(' ', chr(92) + ' ')}' first"
    for args in (("--dir", d, "gpio", "get", "17"), ("gpio", "get", "17", "--dir", d),
                 ("gpio", "--dir", d, "get", "17"), (f"--dir={d}", "gpio", "get", "17")):
        r = dev(*args)
        expect(r.returncode == 1, f"tools/dev {args}: exit {r.returncode}: {r.stderr}")
        expect(f"no simulated GPIO chip in {d};" in r.stderr and advice in r.stderr,
               f"tools/dev {args}: {r.stderr!r}, expected {advice!r}")
    r = dev("env", env={"TETHER_DEV_DIR": d})
    expect(r.returncode == 1 and f"nothing is set up in {d};" in r.stderr and advice in r.stderr,
           f"TETHER_DEV_DIR ignored: {r.stderr!r}")
    # A relative --dir is taken from the current directory.
    r = dev("env", "--dir", "dev dir", cwd=w.path())
    expect(r.returncode == 1 and f"nothing is set up in {d};" in r.stderr, f"relative --dir: {r.stderr!r}")
    # The default directory is not repeated as a --dir (unless a developer's
    # own .dev is set up in this tree).
    if not os.path.exists(os.path.join(SRC, ".dev", "env")):
        r = dev("env")
        expect(r.returncode == 1 and "run 'tools/dev up' first" in r.stderr, f"default: {r.stderr!r}")


def test_env_prints_what_up_wrote(w):
    d = w.path("d")
    os.mkdir(d)
    with open(os.path.join(d, "env"), "w") as f:
        f.write("export TETHER_DEVICE=abc\n")
    for args in (("env", "--dir", d), ("--dir", d, "env")):
        r = dev(*args)
        expect(r.returncode == 0 and r.stdout == "export TETHER_DEVICE=abc\n", f"tools/dev {args}: {r}")


def test_bad_command_lines(w):
    r = dev("frobnicate")
    expect(r.returncode == 2 and "tools/dev up" in r.stdout, f"unknown command: {r}")
    r = dev("env", "extra")
    expect(r.returncode == 1 and "unexpected argument 'extra'" in r.stderr, f"extra argument: {r.stderr!r}")
    r = dev("env", "--dir")
    expect(r.returncode == 1 and "--dir needs a directory" in r.stderr, f"--dir without a value: {r.stderr!r}")
    r = dev("down", "--runs", "5")
    expect(r.returncode == 1 and "unknown option '--runs'" in r.stderr, f"--runs outside fuzz: {r.stderr!r}")


def processes_under(d):
    """PIDs of processes whose command line names a path under d."""
    pids = []
    for p in os.listdir("/proc"):
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                if d.encode() in f.read():
                    pids.append(int(p))
        except (OSError, ValueError):
            pass
    return pids


def test_up_devices(w):
    if EMULATOR:
        raise Skip("tools/dev runs the build's programs directly, not under the emulator")
    d = w.path("fleet")
    # An ASan build wants its runtime first; tools/dev preloads the GPIO
    # simulator on purpose (as harness.World.gpiosim does).
    env = {"TETHER_DEV_BUILD": BUILD, "ASAN_OPTIONS": os.environ.get("ASAN_OPTIONS", "") + ":verify_asan_link_order=0"}
    r = dev("up", "--devices", "0", "--dir", d, env=env)
    expect(r.returncode == 1 and "--devices wants a number from 1 to 100" in r.stderr, f"--devices 0: {r.stderr!r}")
    r = dev("env", "--devices", "3", "--dir", d)
    expect(r.returncode == 1 and "unknown option '--devices'" in r.stderr, f"--devices outside up: {r.stderr!r}")
    try:
        r = dev("up", "--devices", "3", "--dir", d, env=env, timeout=120)
        expect(r.returncode == 0, f"up --devices 3: exit {r.returncode}: {r.stderr[-2000:]}")
        with open(os.path.join(d, "agents.list")) as f:
            agents = [line.split() for line in f]
        expect([a[0] for a in agents] == ["1", "2", "3"], f"agents.list: {agents}")
        for k, dev_id, adir in agents:
            expect(dev_id in r.stdout and adir in r.stdout, f"show does not list agent {k}: {r.stdout}")
        ids = [a[1] for a in agents]
        expect(len(set(ids)) == 3, f"three agents, three IDs: {ids}")
        with open(os.path.join(d, "env")) as f:
            envs = dict(line.rstrip("\n")[len("export "):].split("=", 1) for line in f if "=" in line)
        expect(envs["TETHER_DEVICE"] == ids[0], f"TETHER_DEVICE {envs['TETHER_DEVICE']}, want {ids[0]}")
        expect(envs["TETHER_DEVICES"].replace("\\", "").split() == ids, f"TETHER_DEVICES {envs['TETHER_DEVICES']}")
        api, token = envs["TETHER_API"], envs["TETHER_TOKEN"]
        tl = subprocess.run([os.path.join(BUILD, "tools", "tether"), "list"], capture_output=True, text=True,
                            env=dict(os.environ, TETHER_API=api, TETHER_TOKEN=token), timeout=seconds(10))
        expect(tl.returncode == 0, f"tether list: {tl.stderr}")
        for dev_id in ids:
            line = [x for x in tl.stdout.splitlines() if x.startswith(dev_id)]
            expect(line and "online" in line[0].split(), f"{dev_id} not online in tether list: {tl.stdout}")
        for k, dev_id in enumerate(ids, 1):
            req = urllib.request.Request(f"{api}/v1/devices/{dev_id}", headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(req, timeout=seconds(10)) as resp:
                got = json.load(resp)
            want = {"env": "dev", "dev": str(k), "group": "a" if k % 2 else "b"}
            expect(got.get("tags") == want, f"device {k} ({dev_id}): tags {got.get('tags')}, want {want}")
        running = []
        for pidfile in [os.path.join(a[2], "agent.pid") for a in agents] + [os.path.join(d, "cloud.pid")]:
            with open(pidfile) as f:
                running.append(int(f.read()))
    finally:
        down = dev("down", "--dir", d, timeout=60)
    expect(down.returncode == 0 and down.stderr.count("stopped agents/") == 3, f"down: {down.stderr!r}")
    for pid in running:
        expect(not os.path.exists(f"/proc/{pid}"), f"process {pid} still runs after down")
    left = processes_under(d)
    expect(not left, f"processes left under {d} after down: {left}")


if __name__ == "__main__":
    sys.exit(run([test_dir_anywhere, test_env_prints_what_up_wrote, test_bad_command_lines, test_up_devices],
                 emulated="ok"))
