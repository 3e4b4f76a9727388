#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Campaigns in a cluster (docs/cluster.md, "Campaigns"): two
tether-cloudd nodes on one NATS server and four real agents, two on each
node. A campaign made through the node that does not lead is started by
the leader (n1, the smaller name) and commits on devices of both nodes;
pause asked of the other node is honoured (the next phase does not start);
resume, then the leader is killed in the last phase: the other node takes
the lead and finishes the campaign from the replicated state."""

import json
import os
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Failure, expect, poll, run, seconds  # noqa: E402
from natskit import NatsCluster  # noqa: E402
from otakit import PLUGIN_DIR, OtaWorld, plugin_deb  # noqa: E402

TIMING = f"""PingSec=2
DeviceTimeoutSec={seconds(6):.0f}
CallTimeoutSec={seconds(5):.0f}"""
PHASE_WAIT = 3


class Agent(OtaWorld):
    """One agent with its own scratch root, OTA state and cache; keys and
    packages are the fleet's (base)."""

    def __init__(self, base, i, hosts):
        w = base.w
        self.w, self.name, self.hosts = w, f"agent{i}", hosts
        self.root, self.state, self.cache = w.path(f"root{i}"), w.path(f"ota-state{i}"), w.path(f"ota-cache{i}")
        self.debs, self.keys, self.key, self.artifacts, self.v1 = base.debs, base.keys, base.key, None, base.v1
        for d in (os.path.join(self.root, "var/lib/dpkg/info"), os.path.join(self.root, "var/lib/dpkg/updates"),
                  os.path.join(self.root, "tmp"), os.path.join(self.root, PLUGIN_DIR)):
            os.makedirs(d, exist_ok=True)
        open(os.path.join(self.root, "var/lib/dpkg/status"), "a").close()
        self.extra = ""
        self.install_v1()
        self.agent = w.start_agent(name=self.name, plugin_dir=os.path.join(self.root, PLUGIN_DIR),
                                   extra=self.agent_extra(), host=hosts)
        os.symlink(self.agent.conf, self.conf_path())
        self.seed(self.v1)

    def conf_path(self):
        return self.w.path(f"{self.name}-helper.conf")

    @property
    def id(self):
        return self.agent.device_id


def api(w, node, method, path, body=None, timeout=40):
    req = urllib.request.Request(node.api + path, method=method,
                                 headers={"Authorization": f"Bearer {w.token}", "Content-Type": "application/json"},
                                 data=json.dumps(body).encode() if body is not None else None)
    try:
        with urllib.request.urlopen(req, timeout=seconds(timeout)) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def campaign(w, node, cid):
    st, b = api(w, node, "GET", f"/v1/campaigns/{cid}")
    expect(st == 200, f"GET campaign on {node.node}: {st} {b}")
    return b["campaign"]


def wait_campaign(w, node, cid, pred, what, timeout=30):
    box = {}

    def check():
        box["c"] = campaign(w, node, cid)
        return pred(box["c"])
    try:
        poll(check, timeout, f"{what} (seen from {node.node})", interval=0.3)
    except Failure:
        print(f"# campaign on {node.node}: {json.dumps(box.get('c'))}")
        raise
    return box["c"]


def test_campaign_across_nodes(w):
    base = OtaWorld(w)
    nats = NatsCluster(w, 1)
    nats.wait_ready()
    nodes = []
    for i in (1, 2):
        d = w.path(f"artifacts-{i}")
        os.makedirs(d, exist_ok=True)
        extra = f"[Cluster]\nNATS={nats.url}\nNode=n{i}\n[OTA]\nArtifactDirectory={d}\nPort=0\n"
        n = w.start_cloud(name=f"cloud-{i}", timing=TIMING, state_dir=w.path(f"cloud-{i}-state"), extra=extra)
        n.node = f"n{i}"
        nodes.append(n)
    n1, n2 = nodes
    # Two agents try n1 first, two n2: each node holds two devices.
    p1, p2 = f"localhost:{n1.coap_port}", f"localhost:{n2.coap_port}"
    agents = [Agent(base, i, f"{p1} {p2}" if i < 2 else f"{p2} {p1}") for i in range(4)]
    for a, n in zip(agents, (n1, n1, n2, n2)):
        expect(n.count(rf"Device '{a.id}' connected from") == 1, f"{a.name} is not on {n.node}")
    n1.wait_line(r"Campaigns: this node leads", timeout=20)

    # No url: each device fetches the artifact over its connection, from
    # whichever node holds it (every node has it through the stream).
    v2 = plugin_deb(base.debs, "2.0")
    w.tether("ota", "upload", v2, api=n2.api)
    out = w.path("manifest")
    devices = [agents[0].id, agents[2].id, agents[1].id, agents[3].id]  # each phase on both nodes
    w.tether("ota", "sign", v2, "--key", base.key, "--output", out, *sum((["--device", d] for d in devices), []))
    with open(out) as f:
        manifest = f.read()
    st, b = api(w, n2, "POST", "/v1/campaigns", {"manifests": [manifest], "devices": devices, "phases": [50, 100],
                                                 "max_failure_rate": 0, "phase_wait": PHASE_WAIT, "name": "split"})
    expect(st == 201, f"POST /v1/campaigns on n2: {st} {b}")
    cid = b["campaign"]["id"]
    # A campaign's row must fit in one NATS message.
    st, b = api(w, n1, "POST", "/v1/campaigns", {"manifests": ["x" * 600000], "phases": [100],
                                                 "max_failure_rate": 0})
    expect(st == 413 and "cluster mode" in b.get("error", ""), f"large manifests: {st} {b}")

    # The leader starts it; phase 1 commits on a device of each node.
    c = wait_campaign(w, n2, cid, lambda c: c["phases"][0]["state"] in ("waiting", "done"), "phase 1 done")
    expect(c["phases"][0]["counts"]["committed"] == 2, f"phase 1: {c['phases'][0]}")
    expect(n1.count(rf"Campaign {cid} made on another node: this node leads") == 1, "n1 did not take it up")
    expect(n2.count(rf"Campaign {cid}: phase 1 ") == 0, "n2, which does not lead, drove the campaign")
    for a in (agents[0], agents[2]):
        expect(a.installed() == "2.0 ii", f"{a.name}: dpkg says {a.installed()}")

    # Pause through n2: the leader pauses it, phase 2 does not start.
    st, b = api(w, n2, "POST", f"/v1/campaigns/{cid}/pause")
    expect(st == 200 and b["campaign"]["state"] == "paused", f"pause through n2: {st} {b}")
    st, b = api(w, n2, "POST", f"/v1/campaigns/{cid}/pause")
    expect(st == 409, f"second pause through n2: {st} {b}")
    wait_campaign(w, n2, cid, lambda c: c["state"] == "paused", "the pause")
    time.sleep(seconds(PHASE_WAIT + 1))  # past the phase wait: nothing may start
    for n in nodes:
        c = campaign(w, n, cid)
        expect(c["state"] == "paused" and c["phases"][1]["state"] == "pending" and
               c["phases"][1]["counts"]["pending"] == 2, f"paused on {n.node}: {c}")
    for a in (agents[1], agents[3]):
        expect(a.installed() == "1.0 ii", f"{a.name} was updated while paused: {a.installed()}")

    # Resume on the leader; once the other node has phase 2 running, the
    # leader dies. n2 leads then and finishes it (n1's devices come to it).
    st, b = api(w, n1, "POST", f"/v1/campaigns/{cid}/resume")
    expect(st == 200 and b["campaign"]["state"] == "running", f"resume on n1: {st} {b}")
    wait_campaign(w, n2, cid, lambda c: c["phase"] == 2, "phase 2 started")
    mark = n2.mark()
    n1.kill()
    n2.wait_line(r"Campaigns: this node leads", timeout=40, start=mark)
    c = wait_campaign(w, n2, cid, lambda c: c["state"] == "finished", "finished after the leader died", timeout=60)
    expect(c["counts"]["committed"] == 4, f"counts: {c['counts']}")
    expect([p["state"] for p in c["phases"]] == ["done", "done"], f"phases: {c['phases']}")
    for a in agents:
        expect(a.installed() == "2.0 ii", f"{a.name}: dpkg says {a.installed()}")


if __name__ == "__main__":
    sys.exit(run([test_campaign_across_nodes]))
