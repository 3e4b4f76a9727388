#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""The gpio scenarios of test-gpio.py on the kernel's own simulator,
gpio-sim (configfs), with the real libgpiod. Needs root, configfs and the
gpio-sim module; exits 77 saying which is missing otherwise."""

import os
import re
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Failure, poll, run, skip  # noqa: E402
from gpio_scenarios import SCENARIOS, bind  # noqa: E402

CONFIGFS = "/sys/kernel/config/gpio-sim"


def available():
    if os.geteuid() != 0:
        return "gpio-sim needs root"
    if not os.path.isdir(CONFIGFS) and shutil.which("modprobe"):
        subprocess.run(["modprobe", "gpio-sim"], capture_output=True)
    if not os.path.isdir("/sys/kernel/config"):
        return "configfs is not mounted at /sys/kernel/config (kernel without CONFIG_CONFIGFS_FS?)"
    if not os.path.isdir(CONFIGFS):
        return f"no {CONFIGFS}: the kernel has no gpio-sim module (CONFIG_GPIO_SIM)"
    if not shutil.which("gpioinfo"):
        return "gpioinfo is not installed (Debian package gpiod)"
    return None


class Device:
    """One gpio-sim platform device with one bank of lines and a label."""

    def __init__(self, label, lines=32):
        self.label = label
        self.dir = os.path.join(CONFIGFS, label)
        bank = os.path.join(self.dir, "bank0")
        os.mkdir(self.dir)
        os.mkdir(bank)
        write(os.path.join(bank, "num_lines"), str(lines))
        write(os.path.join(bank, "label"), label)
        write(os.path.join(self.dir, "live"), "1")
        chip_name = read(os.path.join(bank, "chip_name"))
        self.sysfs = f"/sys/devices/platform/{read(os.path.join(self.dir, 'dev_name'))}/{chip_name}"
        self.dev = f"/dev/{chip_name}"

    def remove(self):
        try:
            write(os.path.join(self.dir, "live"), "0")
            os.rmdir(os.path.join(self.dir, "bank0"))
            os.rmdir(self.dir)
        except OSError as e:
            print(f"# gpio-sim cleanup of {self.dir}: {e}")


def write(path, value):
    with open(path, "w") as f:
        f.write(value)


def read(path):
    with open(path) as f:
        return f.read().strip()


class KernelSim:
    def __init__(self, w):
        tag = f"{os.getpid()}-{time.monotonic_ns() % 1000000}"
        self.chip = f"tether-sim-{tag}"
        self.late_chip = f"tether-late-{tag}"
        self.env = {}
        self.devices = {self.chip: Device(self.chip)}

    def set(self, off, level):
        write(f"{self.devices[self.chip].sysfs}/sim_gpio{off}/pull", "pull-up" if level else "pull-down")

    def level(self, off, chip=None):
        return int(read(f"{self.devices[chip or self.chip].sysfs}/sim_gpio{off}/value"))

    def wait(self, off, level, timeout=10, chip=None):
        # gpio-sim's value attribute cannot be poll()ed: check it until the
        # deadline (this only ever runs on a kernel with gpio-sim).
        poll(lambda: self.level(off, chip) == level, timeout, f"gpio-sim line {off} to reach level {level}",
             interval=0.01)

    def requested(self, off):
        # The chardev's line info, as gpioinfo (Debian package gpiod) prints
        # it: 'line   3:  unnamed  "tetherd"  output  active-high [used]'.
        dev = self.devices[self.chip].dev
        out = subprocess.run(["gpioinfo", dev], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            m = re.match(r"\s*line\s+(\d+):", line)
            if m and int(m.group(1)) == off:
                return "unused" not in line
        raise Failure(f"gpioinfo {dev} does not list line {off}")

    def hotplug(self):
        self.devices[self.late_chip] = Device(self.late_chip, 8)

    def close(self):
        for d in self.devices.values():
            d.remove()


if __name__ == "__main__":
    reason = available()
    if reason:
        skip(reason)
    sys.exit(run([bind(s, KernelSim) for s in SCENARIOS], emulated='needs the kernel gpio-sim of the machine running the tests'))
