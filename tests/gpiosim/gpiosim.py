#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Client for the simulated GPIO chip (tests/gpiosim/gpiosim.c).

As a module: GpioSim(directory) with set(chip, offset, level),
get(chip, offset) -> dict, wait(chip, offset, level, timeout) and
add_chip(name, lines, label).
As a command: gpiosim.py DIR set CHIP OFFSET 0|1 | get CHIP OFFSET |
add NAME LINES [LABEL]  (tools/dev uses it to toggle simulated inputs).
"""

import os
import socket
import sys


class SimError(Exception):
    pass


class GpioSim:
    """The simulated chips of one tetherd, driven through its control socket."""

    def __init__(self, directory):
        self.dir = directory
        self.sock_path = os.path.join(directory, "control.sock")

    @staticmethod
    def write_chips(directory, chips):
        """Describe the chips before tetherd starts: [(name, lines, label)]."""
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "chips"), "w") as f:
            for name, lines, label in chips:
                f.write(f"{name} {lines} {label}\n")

    def command(self, line, timeout=5):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(self.sock_path)
            s.sendall((line + "\n").encode())
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                reply += chunk
        reply = reply.decode().strip()
        if reply.startswith("error"):
            raise SimError(f"gpiosim '{line}': {reply}")
        return reply

    def set(self, chip, offset, level):
        self.command(f"set {chip} {offset} {int(level)}")

    def get(self, chip, offset):
        reply = self.command(f"get {chip} {offset}")
        out = dict(kv.split("=", 1) for kv in reply.split())
        for k in ("level", "requested", "active_low"):
            out[k] = int(out[k])
        return out

    def wait(self, chip, offset, level, timeout=10):
        """Block until the line's physical level is `level` (a condition
        variable in the simulator, not polling); SimError on timeout."""
        self.command(f"wait {chip} {offset} {int(level)} {int(timeout * 1000)}", timeout=timeout + 5)

    def add_chip(self, name, lines, label=""):
        self.command(f"add {name} {lines} {label}".strip())


def main(argv):
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        print(GpioSim(argv[1]).command(" ".join(argv[2:])))
    except (OSError, SimError) as e:
        print(f"gpiosim: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
