#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Outbound integrations in cluster mode (docs/integrations.md, "Cluster
mode"): two tether-cloudd nodes on one NATS JetStream, the same webhook in
both configurations. One node (the alive one with the smallest name)
delivers, the other stands by: every event reaches the receiver once for
the whole cluster, not once per node. When the delivering node is killed,
the other takes over from the cursor the first one shared (the bucket
TETHER_INTEGRATIONS) and nothing is lost; what it sends twice is counted.

Events come from the test plugin "pump" (tests/plugins/pump.c)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import SLOWDOWN, TEST_PLUGINS, api_json, expect, poll, run, seconds  # noqa: E402
from hookkit import Receiver, make_pki  # noqa: E402
from natskit import NatsCluster  # noqa: E402

SECRET = "a test secret of 32 bytes, ok!!!"
TIMING = f"""PingSec=2
DeviceTimeoutSec={seconds(6):.0f}
CallTimeoutSec={seconds(5):.0f}"""


def start(w):
    """A receiver, NATS, and nodes n1 and n2 with the webhook 'hook'."""
    ca, crt, key = make_pki(w.path("hook-pki"))
    rx = Receiver(SECRET, crt, key)
    w.cleanups.append(rx.close)
    nats = NatsCluster(w, 1)
    nats.wait_ready()
    nodes = []
    for i in (1, 2):
        extra = (f"[Cluster]\nNATS={nats.url}\nNode=n{i}\n"
                 f"[Webhook hook]\nURL={rx.url}\nSecret={SECRET}\nPrefix=pump/\nCAFile={ca}\n"
                 "[API]\nRateLimitPerAddress=0\nRateLimitPerToken=0\n")
        d = w.start_cloud(name=f"cloud-{i}", timing=TIMING, state_dir=w.path(f"cloud-{i}-state"), extra=extra)
        d.node = f"n{i}"
        nodes.append(d)
    return rx, nodes


def hook_state(w, node):
    status, body = api_json(w, "GET", "/v1/integrations", api=node.api)
    expect(status == 200, f"GET /v1/integrations on {node.node}: {status} {body}")
    return {i["name"]: i["state"] for i in body}.get("hook")


def wait_states(w, n1, n2, what):
    poll(lambda: hook_state(w, n1) == "ok" and hook_state(w, n2) == "standby", 30,
         f"{what}: n1 delivering, n2 on standby (n1 {hook_state(w, n1)}, n2 {hook_state(w, n2)})")


def numbers(reqs):
    """The pump numbers delivered (2xx), in delivery order, and the keys."""
    got, keys = [], []
    for q in reqs:
        if 200 <= q.status <= 299 and q.json and q.json.get("event") == "pump/n":
            got.append(int(q.json["data"]))
            keys.append(q.key)
    return got, keys


def test_one_delivery_per_cluster(w):
    """Both nodes have the webhook; n1 delivers, n2 stands by; a device on
    either node: every event once, in order, signed."""
    rx, (n1, n2) = start(w)
    wait_states(w, n1, n2, "at start")
    total = max(300 // SLOWDOWN, 60)
    # On the node in standby: its events reach the receiver through n1.
    w.coap_port = n2.coap_port
    a = w.start_agent(plugin_dir=TEST_PLUGINS, extra="[Plugins]\nEnable=pump\n")
    w.tether("call", a.device_id, "start", f"1,{total},200", api=n2.api)
    rx.wait(lambda reqs: len(set(numbers(reqs)[0])) >= total, 60, f"{total} events")
    got, keys = numbers(rx.snapshot())
    expect(got == list(range(1, total + 1)), f"{len(got)} deliveries for {total} events: {got[:8]}...{got[-8:]}")
    expect(len(set(keys)) == len(keys), "an event was delivered twice")
    expect(all(q.sig_ok for q in rx.snapshot()), "a request with a bad signature")
    wait_states(w, n1, n2, "after the events")


def test_leader_killed(w):
    """n1 (delivering) is killed with SIGKILL while a device on n2
    publishes: n2 takes over and every event arrives, in order of first
    delivery; repeats (at least once) are counted."""
    rx, (n1, n2) = start(w)
    wait_states(w, n1, n2, "at start")
    rate = max(40 // SLOWDOWN, 10)
    total = rate * 30
    w.coap_port = n2.coap_port
    a = w.start_agent(plugin_dir=TEST_PLUGINS, extra="[Plugins]\nEnable=pump\n")
    w.tether("call", a.device_id, "start", f"1,{total},{rate}", api=n2.api)
    rx.wait(lambda reqs: len(numbers(reqs)[0]) >= 2 * rate, 30, "events before the kill")
    n1.kill()
    before = len(set(numbers(rx.snapshot())[0]))
    mark = n2.mark()
    n2.wait_line(r"Integrations: this node leads", 40, mark)
    rx.wait(lambda reqs: len(set(numbers(reqs)[0])) >= total, 120, f"all {total} events")
    got, keys = numbers(rx.snapshot())
    first = []
    for n in got:
        if n not in first:
            first.append(n)
    expect(first == list(range(1, total + 1)), f"first deliveries {first[:8]}...{first[-8:]} of {total}")
    expect(len(set(keys)) == total, f"{len(set(keys))} idempotency keys for {total} events")
    expect(before < total, f"every event arrived before n1 was killed ({before}): nothing was tested")
    expect(hook_state(w, n2) == "ok", f"n2's webhook is {hook_state(w, n2)}")
    print(f"  {total} events, {len(got)} deliveries ({len(got) - total} repeated after the takeover), "
          f"{before} before the kill")


if __name__ == "__main__":
    sys.exit(run([test_one_delivery_per_cluster, test_leader_killed], emulated="nats-server is a host binary"))
