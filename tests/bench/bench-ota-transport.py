#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""OTA download figures by transport (not a test): a plugin package of SIZE
MB downloaded over the device's CoAP connection (a manifest without url,
GET /a/SHA256 with Block2), once with BERT blocks (tetherd's default when
both CSMs allow it) and once in 1024-byte blocks (the agent restarted with
TETHER_OTA_NO_BERT, docs/man/tetherd.8), and over HTTPS from the cloud's
artifact server ([OTA] Port=), RUNS times each, interleaved, on loopback, through the real
cloud, agent, helper and dpkg in a scratch root (tests/integration/otakit.py).
The figure is accepted -> downloaded from the cloud's own timestamps of the
job (download, SHA-256, dpkg-deb --field); min, median and max per transport,
and the load average before and after.

    tests/bench/bench-ota-transport.py [RUNS [SIZE_MB]]   (needs root; build first)
"""

import os
import statistics
import sys
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
        o.start_cloud()  # [OTA] Port=0: both transports
        o.install_v1()
        o.start_agent(env={"TETHER_OTA_BENCH": "bert"})
        o.seed(o.v1)
        agent_mode = "bert"
        load0 = os.getloadavg()
        took = {"coap-bert": [], "coap-1024": [], "https": []}
        version = 2
        for i in range(runs):
            for transport in took:
                # One agent at a time for the device; the 1024-byte one only for its own jobs.
                mode = "1024" if transport == "coap-1024" else "bert"
                if mode != agent_mode:
                    o.agent.stop()
                    env = {"TETHER_OTA_NO_BERT": "1"} if mode == "1024" else {"TETHER_OTA_BENCH": "bert"}
                    o.start_agent(device=o.device(), env=env)
                    agent_mode = mode
                deb = plugin_deb(o.debs, f"{version}.0", filler=size * 1024 * 1024)
                version += 1
                url = o.upload(deb)
                job = o.start_job(o.sign(deb, url if transport == "https" else None))
                j = o.wait_job(job, timeout=300)
                if j["state"] != "committed":
                    print(f"run {i + 1} ({transport}): {j['state']} {j.get('reason')}")
                    return 1
                at = {h["state"]: ts(h["at"]) for h in j["history"]}
                took[transport].append(at["downloaded"] - at["accepted"])
        load1 = os.getloadavg()
        print(f"OTA download of a {size} MB plugin package, {runs} runs per transport, interleaved, loopback "
              f"(accepted -> downloaded: transfer, SHA-256, dpkg-deb --field)")
        for name, v in took.items():
            print(f"  {name:9s} min {min(v):6.3f} s   median {statistics.median(v):6.3f} s   max {max(v):6.3f} s"
                  f"   ({size / statistics.median(v):.1f} MB/s at the median)")
        print(f"  load average before {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, "
              f"after {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f} ({os.cpu_count()} CPUs)")
        return 0
    finally:
        w.close()


if __name__ == "__main__":
    sys.exit(main())
