#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Two tether-cloudd nodes on one NATS JetStream cluster (docs/cluster.md).

The agent knows both nodes ([Cloud] Host= lists them) and tries them in
turn. Whichever node the device reaches, requests through the other one
are routed to it; when that node is killed, the device comes back on the
other one."""

import json
import os
import signal
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import TEST_PLUGINS, api_json, expect, poll, run, seconds  # noqa: E402
from natskit import NatsCluster  # noqa: E402

# cloud/cluster.h: a node not heard for CLUSTER_NODE_DEAD_SEC is dead; each
# sends a heartbeat every CLUSTER_HEARTBEAT_SEC.
NODE_DEAD_SEC, HEARTBEAT_SEC = 15, 5

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


def stream_last_seq(nats, stream):
    """The last sequence of a JetStream stream, from the first server's
    monitoring port (it holds a replica of every stream with one server)."""
    url = f"http://127.0.0.1:{nats.servers[0].http_port}/jsz?accounts=true&streams=true"
    with urllib.request.urlopen(url, timeout=seconds(10)) as r:
        jsz = json.loads(r.read())
    for account in jsz.get("account_details", []):
        for st in account.get("stream_detail", []):
            if st["name"] == stream:
                return st["state"]["last_seq"]
    raise AssertionError(f"no stream {stream} in {jsz}")


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
    started = time.monotonic()
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
    for node in (here, other):
        # Form bodies: an argument that is not UTF-8, and one longer than
        # MaxPayload (checked where the request comes in, with the texts a
        # local call gets).
        path = f"/v1/devices/{dev}/add"
        answers[-1 if node is other else 0] += [api_json(w, "POST", path, api=node.api, form=b"arg=%FF%FE"),
                                                 api_json(w, "POST", path, api=node.api, form=b"arg=" + b"x" * 70000)]
    expect(answers[0] == answers[1], f"errors differ between the nodes: {answers}")
    expect(answers[0][3][0] == 400 and answers[0][4][0] == 413, f"bad arguments answered {answers[0][3:]}")
    expect(answers[0][0][0] == 404, f"unknown function answered {answers[0][0]}")
    status, body = get_device(w, other, dev)
    expect(status == 200 and body["connected"] and "add" in body["functions"],
           f"GET /v1/devices/{dev} through {other.node}: {status} {body}")

    # Long after the first heartbeats: each node still takes the other for
    # alive (it keeps sending them) and routes to it.
    time.sleep(max(0.0, started + NODE_DEAD_SEC + 2 * HEARTBEAT_SEC - time.monotonic()))
    r = w.tether("call", dev, "add", "40,2", api=other.api, check=False)
    expect(r.returncode == 0 and r.stdout.strip() == "42",
           f"add 40,2 through {other.node} after {NODE_DEAD_SEC} s: {r.returncode} {r.stdout!r} {r.stderr!r}")
    # One heartbeat per node every HEARTBEAT_SEC since they started (the
    # bucket's stream sequence counts every one): none missed, no burst.
    beats = stream_last_seq(nats, "KV_TETHER_NODES")
    most = 2 * ((time.monotonic() - started) / HEARTBEAT_SEC + 2)
    expect(2 * NODE_DEAD_SEC / HEARTBEAT_SEC <= beats <= most,
           f"{beats} heartbeats of two nodes in {time.monotonic() - started:.0f} s")


def test_paused_node(w):
    """A node whose loop stood still for longer than a node's liveness
    window (SIGSTOP: as a loop busy with thousands of devices, or a
    machine swapping) judges the other node by the heartbeats the bucket
    holds, not by when its watch delivers them: the other node stays
    alive, and requests through it are routed at once."""
    nats, nodes = start_nodes(w)
    w.coap_port = nodes[0].coap_port
    a = w.start_agent()
    dev = a.device_id
    here = holder(w, nodes, dev)
    other = nodes[1] if here is nodes[0] else nodes[0]
    poll(lambda: w.tether("call", dev, "add", "1,2", api=other.api, check=False).returncode == 0, seconds(10),
         f"a call through {other.node}")
    mark = other.mark()
    os.kill(other.proc.pid, signal.SIGSTOP)
    try:
        time.sleep(NODE_DEAD_SEC + HEARTBEAT_SEC)
    finally:
        os.kill(other.proc.pid, signal.SIGCONT)
    r = w.tether("call", dev, "add", "40,2", api=other.api, check=False)
    expect(r.returncode == 0 and r.stdout.strip() == "42",
           f"add 40,2 through {other.node} right after its pause: {r.returncode} {r.stdout!r} {r.stderr!r}")
    expect(other.count(rf"Cluster node '{here.node}' is gone", mark) == 0,
           f"{other.node} took {here.node} for dead after its own pause")


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


def pump_numbers(sub):
    return [int(e["data"]) for e in sub.snapshot() if e.get("name") == "pump/n"]


def exactly_once(sub, last, what):
    got = pump_numbers(sub)
    seen = set(got)
    expect(got == list(range(1, last + 1)),
           f"{what}: {len(got)} events for {last} published; {len(got) - len(seen)} twice, "
           f"missing {sorted(set(range(1, last + 1)) - seen)[:10]}, "
           f"out of order at {[i for i in range(1, len(got)) if got[i] <= got[i - 1]][:5]}")


def test_events_across_failover(w):
    """The pump publishes numbers while the node holding the device is
    killed: a subscriber on the other node, and one on the killed node
    that resumes (Last-Event-ID) once it is back, each get every number
    once and in order."""
    total, rate = 1500, 300
    nats, nodes = start_nodes(w, servers=3)
    a = w.start_agent(host=both(nodes), plugin_dir=TEST_PLUGINS,
                      extra="[Plugins]\nEnable=pump\n[Outbox]\nMaxEvents=100000\n")
    dev = a.device_id
    here = holder(w, nodes, dev)
    other = nodes[1] if here is nodes[0] else nodes[0]
    live = w.subscribe("pump/", "--device", dev, "--resume", api=other.api).wait_ready()
    resuming = w.subscribe("pump/", "--device", dev, "--resume", api=here.api).wait_ready()
    w.tether("call", dev, "start", f"1,{total},{rate}", api=here.api)
    live.wait_until(lambda evs: len(evs) >= total // 4, seconds(30), "a quarter of the numbers")
    marks = {other: other.mark()}
    here.kill()
    holder(w, [other], dev, exclude=marks, timeout=seconds(30))
    # The killed node comes back on its ports, with its state.
    i = nodes.index(here)
    nodes[i] = w.start_cloud(name=f"cloud-{i + 1}", port=here.coap_port, api_port=here.api_port, timing=TIMING,
                             state_dir=w.path(f"cloud-{i + 1}-state"),
                             extra=f"[Cluster]\nNATS={nats.url}\nNode={here.node}\n")
    for sub, what in ((live, "the subscriber on the surviving node"), (resuming, "the resuming subscriber")):
        sub.wait_until(lambda evs: len([e for e in evs if e.get("name") == "pump/n"]) >= total, seconds(60),
                       f"{total} numbers at {what}")
        exactly_once(sub, total, what)


if __name__ == "__main__":
    sys.exit(run([test_call_through_other_node, test_paused_node, test_failover, test_events_across_failover]))
