# SPDX-License-Identifier: Apache-2.0
"""tests/bench/fleet as a child process driven over its stdin, for the
benchmark scripts (fleet-compare.py, bench-enroll.py): it prints one
result per line, "word key=value ...", and takes commands on stdin."""

import subprocess


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
