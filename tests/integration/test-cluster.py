#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Two tether-cloudd nodes on one NATS JetStream cluster (docs/cluster.md).

The agent knows both nodes ([Cloud] Host= lists them) and tries them in
turn. Whichever node the device reaches, requests through the other one
are routed to it; when that node is killed, the device comes back on the
other one."""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import api_json, expect, poll, run, seconds  # noqa: E402
from natskit import NatsCluster  # noqa: E402

TIMING = f"""PingSec=2
DeviceTimeoutSec={seconds(6):.0f}
CallTimeoutSec={seconds(5):.0f}"""


def start_nodes(w, servers=1):
    """NATS (servers nats-server processes) and two cloud nodes; returns
    (nats, [node1, node2])."""
    nats = NatsCluster(w, servers)
    nats.wait_ready()
    nodes = []
    for i in (1, 2):
        extra = f"[Cluster]\nNATS={nats.url}\nNode=n{i}\n"
        d = w.start_cloud(name=f"cloud-{i}", timing=TIMING, state_dir=w.path(f"cloud-{i}-state"), extra=extra)
        d.node = f"n{i}"
        nodes.append(d)
    return nats, nodes


def both(nodes):
    """[Cloud] Host= for an agent that knows both nodes."""
    return " ".join(f"localhost:{n.coap_port}" for n in nodes)


def holder(w, nodes, dev, exclude=None, timeout=20):
    """The node whose log says the device connected to it (after the
    marks in exclude, a {daemon: mark} dict)."""
    found = []

    def look():
        for n in nodes:
            if n.proc.poll() is None and n.count(rf"Device '{dev}' connected from",
                                                 (exclude or {}).get(n, 0)) > 0:
                found.append(n)
                return True
        return False
    poll(look, timeout, f"device {dev} connected to a node")
    return found[0]


def get_device(w, node, dev):
    status, body = api_json(w, "GET", f"/v1/devices/{dev}", api=node.api)
    return status, body


def test_call_through_other_node(w):
    nats, nodes = start_nodes(w)
    w.coap_port = nodes[0].coap_port
    a = w.start_agent()
    dev = a.device_id
    here = holder(w, nodes, dev)
    other = nodes[1] if here is nodes[0] else nodes[0]

    # The other node lists it online, from the cluster's presence.
    def listed_online():
        r = w.tether("list", "--json", api=other.api)
        return any(d["id"] == dev and d["connected"] for d in json.loads(r.stdout))
    poll(listed_online, seconds(10), f"device {dev} listed online on node {other.node}")

    for node in (here, other):
        r = w.tether("call", dev, "add", "40,2", api=node.api)
        expect(r.stdout.strip() == "42", f"add 40,2 through {node.node} returned {r.stdout!r}")
        r = w.tether("get", dev, "label", api=node.api)
        expect(r.stdout.strip() == "example", f"label through {node.node} is {r.stdout!r}")
    # The same answers, errors included, from both nodes.
    answers = []
    for node in (here, other):
        answers.append([api_json(w, "POST", f"/v1/devices/{dev}/nosuch", {"arg": "x"}, api=node.api),
                        api_json(w, "GET", f"/v1/devices/{dev}/nosuch", api=node.api),
                        api_json(w, "POST", f"/v1/devices/{dev}/add", {"arg": "forty,two"}, api=node.api)])
    expect(answers[0] == answers[1], f"errors differ between the nodes: {answers}")
    expect(answers[0][0][0] == 404, f"unknown function answered {answers[0][0]}")
    status, body = get_device(w, other, dev)
    expect(status == 200 and body["connected"] and "add" in body["functions"],
           f"GET /v1/devices/{dev} through {other.node}: {status} {body}")


def test_failover(w):
    nats, nodes = start_nodes(w, servers=3)
    a = w.start_agent(host=both(nodes))
    dev = a.device_id
    here = holder(w, nodes, dev)
    other = nodes[1] if here is nodes[0] else nodes[0]
    marks = {other: other.mark()}
    started = time.monotonic()
    here.kill()
    holder(w, [other], dev, exclude=marks, timeout=seconds(30))
    took = time.monotonic() - started
    r = w.tether("call", dev, "add", "1,2", api=other.api)
    expect(r.stdout.strip() == "3", f"add 1,2 after the failover returned {r.stdout!r}")
    print(f"  device online on {other.node} {took:.2f} s after {here.node} was killed")


if __name__ == "__main__":
    sys.exit(run([test_call_through_other_node, test_failover]))
