#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""OTA timing figures (not a test): N updates of a plugin package of SIZE MB
through the real cloud, agent, helper and dpkg in a scratch root, as in
tests/integration/test-ota.py. Prints, per phase, the median and the maximum
over the runs, from the cloud's own timestamps of each job's states:

    sent -> downloaded      (accept, download over HTTPS, SHA-256, dpkg-deb)
    sent -> installed       (+ the helper: verify again, copy, dpkg -i)
    sent -> committed       (+ plugin reload and the trial window, TrialSec)
    tether ota wall time    (upload already done: sign, start, follow)

    tests/bench/bench-ota.py [RUNS [SIZE_MB]]      (needs root; build first)
"""

import os
import statistics
import sys
import time
from datetime import datetime

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))
from harness import World  # noqa: E402
from otakit import OtaWorld, plugin_deb  # noqa: E402


def ts(s):
    return datetime.strptime(s, "%Y-%m-%dT%H:%M:%S.%fZ").timestamp()


def main():
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    size = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    w = World()
    try:
        o = OtaWorld(w)
        o.start_cloud()
        o.install_v1()
        o.start_agent()
        o.seed(o.v1)
        phases = {"sent -> downloaded": [], "sent -> installed": [], "sent -> committed": [], "tether ota wall": []}
        for i in range(runs):
            deb = plugin_deb(o.debs, f"{i + 2}.0", filler=size * 1024 * 1024)
            o.upload(deb)  # the upload is the operator's, not the device's
            t0 = time.monotonic()
            r = o.run_cli(deb, timeout=300)
            wall = time.monotonic() - t0
            if r.returncode != 0:
                print(f"run {i + 1}: tether ota failed: {r.stderr}")
                return 1
            job = o.job(r.stdout.strip().splitlines()[-1].split('"job":"')[1].split('"')[0])
            at = {h["state"]: ts(h["at"]) for h in job["history"]}
            phases["sent -> downloaded"].append(at["downloaded"] - at["sent"])
            phases["sent -> installed"].append(at["installed"] - at["sent"])
            phases["sent -> committed"].append(at["committed"] - at["sent"])
            phases["tether ota wall"].append(wall)
        print(f"OTA of a {size} MB plugin package, {runs} runs, loopback, TrialSec=1, Launcher=exec, "
              f"dpkg --root (scratch root)")
        for name, v in phases.items():
            print(f"  {name:22s} median {statistics.median(v):6.3f} s   max {max(v):6.3f} s")
    finally:
        w.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
