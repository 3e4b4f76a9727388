#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""The gpio plugin end to end (cloud API -> agent -> plugin -> "hardware")
on the simulated chip at the libgpiod v1 boundary (tests/gpiosim): the
shipped gpio.so runs unchanged with the simulator preloaded in place of
libgpiod. The same scenarios run on the kernel's gpio-sim in
test-gpio-kernel.py where the kernel has it."""

import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import BUILT_PLUGINS, GPIOSIM_LIB, expect, run, seconds  # noqa: E402
from gpio_scenarios import SCENARIOS, bind  # noqa: E402


class FakeSim:
    chip = "tether-sim"
    late_chip = "tether-late"

    def __init__(self, w):
        self.ctl, self.env = w.gpiosim(chips=(("gpiochip0", 32, self.chip),))

    def set(self, off, level):
        self.ctl.set(self.chip, off, level)

    def level(self, off):
        return self.ctl.get(self.chip, off)["level"]

    def wait(self, off, level, timeout=10, chip=None):
        self.ctl.wait(chip or self.chip, off, level, seconds(timeout))

    def requested(self, off):
        return bool(self.ctl.get(self.chip, off)["requested"])

    def hotplug(self):
        self.ctl.add_chip("gpiochip1", 8, self.late_chip)

    def close(self):
        pass


def dynamic_symbols(path, defined):
    flag = "--defined-only" if defined else "--undefined-only"
    out = subprocess.run(["nm", "-D", flag, path], capture_output=True, text=True, check=True).stdout
    return {line.split()[-1].split("@")[0] for line in out.splitlines() if line.strip()}


def test_simulator_covers_the_plugin(w):
    """Every libgpiod function gpio.so imports is one the simulator defines,
    so no call slips through to the real library with a fake handle."""
    wanted = {s for s in dynamic_symbols(BUILT_PLUGINS["gpio"], False) if s.startswith("gpiod_")}
    have = dynamic_symbols(GPIOSIM_LIB, True)
    expect(wanted, "gpio.so imports no gpiod_ symbols?")
    expect(wanted <= have, f"simulator lacks {sorted(wanted - have)}")
    exported = dynamic_symbols(BUILT_PLUGINS["gpio"], True)
    expect(exported == {"tether_plugin"}, f"gpio.so exports {sorted(exported)}")


if __name__ == "__main__":
    sys.exit(run([test_simulator_covers_the_plugin] + [bind(s, FakeSim) for s in SCENARIOS], emulated='the simulated chip is LD_PRELOADed, which qemu-user would apply to itself'))
