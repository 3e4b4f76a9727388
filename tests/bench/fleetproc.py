# SPDX-License-Identifier: Apache-2.0
"""tests/bench/fleet as a child process driven over its stdin, for the
benchmark scripts (fleet-compare.py, bench-enroll.py, bench-reconnect.py):
it prints one result per line, "word key=value ...", and takes commands on
stdin. Also the small helpers those scripts share: a free loopback port,
waiting for a server's port, a process's CPU time, min / median / max."""

import os
import socket
import statistics
import subprocess
import sys
import time


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port, proc, what, timeout=30):
    """Until something accepts on 127.0.0.1:port; exits if proc ends first
    or nothing listens within timeout seconds."""
    prog = os.path.basename(sys.argv[0])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{prog}: {what} exited ({proc.returncode})")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.02)
    sys.exit(f"{prog}: {what} does not listen on port {port}")


def cpu(pid):
    """utime+stime of pid in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def mmm(values, fmt="{:.2f}"):
    """"min / median / max" of the values that are not None, or "—"."""
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    return " / ".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


def fields(line):
    """The key=value fields of one result line of fleet."""
    return dict(f.split("=", 1) for f in line.split()[1:] if "=" in f)


class FleetProcess:
    """fleet started with argv, its stderr to log."""

    # Lines after which nothing more of what was asked will come.
    GIVE_UP = ("incomplete", "renew-incomplete")

    def __init__(self, argv, log):
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)

    def wait(self, *words):
        """The first line whose word is one of words (or a give-up line):
        (word, its fields); ("exited", {}) if fleet ended first."""
        for line in self.proc.stdout:
            word = line.split()[0] if line.split() else ""
            if word in words or word in self.GIVE_UP:
                return word, fields(line)
        return "exited", {}

    def command(self, text):
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def close(self):
        try:
            self.command("quit")
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
