#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""The real npm particle-api-js client, unmodified, against tether-cloudd."""

import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import SRC, Failure, expect, run, seconds, skip  # noqa: E402

JS = os.path.join(SRC, "tests", "js")


def test_particle_api_js(w):
    w.start_cloud()
    a = w.start_agent()
    env = dict(os.environ, TETHER_API=w.api, TETHER_TOKEN=w.token, TETHER_DEVICE=a.device_id,
               TETHER_FUNCTION="add", TETHER_ARG="20,22", TETHER_EXPECT_RESULT="42",
               TETHER_VARIABLE="counter")
    r = subprocess.run(["node", os.path.join(JS, "particle-compat.mjs")], env=env, capture_output=True,
                       text=True, timeout=seconds(60))
    for line in r.stdout.splitlines():
        print(f"# js: {line}")
    if r.returncode != 0:
        raise Failure(f"particle-api-js checks failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    expect("not ok" not in r.stdout, "a particle-api-js check failed")


if __name__ == "__main__":
    if not shutil.which("node"):
        skip("node is not installed (apt-get install nodejs)")
    if not os.path.isdir(os.path.join(JS, "node_modules", "particle-api-js")):
        skip(f"particle-api-js is not installed: run 'npm ci' in {JS}")
    sys.exit(run([test_particle_api_js], emulated="ok"))
