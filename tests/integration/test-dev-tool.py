#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""tools/dev's command line, without starting anything: --dir is taken in
any position (before or after the command and its arguments, and as
--dir=DIR), the advice it prints repeats that --dir, TETHER_DEV_DIR (which
"tools/dev env" exports) is the default, and env prints what "up" wrote.
What "up" itself sets up is shown by README.md's quick start."""

import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import SRC, expect, run, seconds  # noqa: E402

DEV = os.path.join(SRC, "tools", "dev")


def dev(*args, env=None, cwd=None):
    e = dict(os.environ)
    e.pop("TETHER_DEV_DIR", None)
    e.update(env or {})
    return subprocess.run([DEV, *args], capture_output=True, text=True, env=e, cwd=cwd, timeout=seconds(30))


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


if __name__ == "__main__":
    sys.exit(run([test_dir_anywhere, test_env_prints_what_up_wrote, test_bad_command_lines], emulated="ok"))
