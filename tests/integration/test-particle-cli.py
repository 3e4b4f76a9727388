#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""The real npm particle-cli, unmodified, against tether-cloudd: `particle
device rename ID NAME` (PUT /v1/devices/ID {"name"}, docs/fleet.md)
names the device, and a name another device has is refused with the
cloud's message. particle-cli is pointed at the cloud by its own
configuration file (~/.particle/particle.config.json: apiUrl,
access_token) in a scratch HOME. Installed by tools/dev check (npm ci
--omit=optional --ignore-scripts in tests/particle-cli: no native build)."""

import json
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import SRC, api_json, expect, run, seconds, skip  # noqa: E402

DIR = os.path.join(SRC, "tests", "particle-cli")
PARTICLE = os.path.join(DIR, "node_modules", ".bin", "particle")


def particle(w, *args):
    home = w.path("particle-home")
    os.makedirs(os.path.join(home, ".particle"), exist_ok=True)
    with open(os.path.join(home, ".particle", "particle.config.json"), "w") as f:
        json.dump({"apiUrl": w.api, "access_token": w.token, "username": "tether-test"}, f)
    env = dict(os.environ, HOME=home, PARTICLE_DISABLE_UPDATE="true", NO_COLOR="1")
    r = subprocess.run([PARTICLE, *args], env=env, capture_output=True, text=True, timeout=seconds(60))
    for line in (r.stdout + r.stderr).splitlines():
        print(f"# particle: {line}")
    return r


def test_device_rename(w):
    w.start_cloud()
    a = w.start_agent()
    for i in ("dev-b",):
        api_json(w, "POST", "/v1/devices", {"id": i})
    r = particle(w, "device", "rename", a.device_id, "kitchen")
    expect(r.returncode == 0 and f"Successfully renamed device {a.device_id} to: kitchen" in r.stdout,
           f"rename: {r.returncode}")
    s, d = api_json(w, "GET", f"/v1/devices/{a.device_id}")
    expect(d["name"] == "kitchen", f"the device: {d}")
    # An offline device, by the other spelling of the command.
    r = particle(w, "cloud", "name", "dev-b", "porch")
    expect(r.returncode == 0, f"cloud name: {r.returncode}")
    expect(api_json(w, "GET", "/v1/devices/dev-b")[1]["name"] == "porch", "dev-b not renamed")
    # Taken: particle-cli fails and shows the cloud's reason.
    r = particle(w, "device", "rename", "dev-b", "kitchen")
    expect(r.returncode != 0 and f"name 'kitchen' is taken by device {a.device_id}" in r.stdout + r.stderr,
           f"taken: {r.returncode}")
    expect(api_json(w, "GET", "/v1/devices/dev-b")[1]["name"] == "porch", "dev-b renamed after all")


if __name__ == "__main__":
    if not shutil.which("node"):
        skip("node is not installed (apt-get install nodejs)")
    if not os.access(PARTICLE, os.X_OK):
        skip(f"particle-cli is not installed: run 'npm ci --omit=optional --ignore-scripts' in {DIR}")
    sys.exit(run([test_device_rename], emulated="ok"))
