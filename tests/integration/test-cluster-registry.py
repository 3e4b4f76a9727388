#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""The cluster's shared state (cloud/replica.c, docs/cluster.md): two
tether-cloudd nodes on one NATS JetStream server share the device registry
and the API tokens through the stream TETHER_STATE. A token made through
node 1's API works on node 2 and, revoked there, stops working on node 1
at once; a device connected to node 1 is listed by node 2; a device revoked
through node 2 is disconnected from node 1 and refused there; a node
started later (empty database) learns all of it from the stream, and a
node that was a single node before keeps its rows (they are published when
it joins); a device's name, notes and tags changed on one node are the
other's too."""
import json
import os
import ssl
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import expect, poll, run, seconds  # noqa: E402
from fakedev import connect, refused  # noqa: E402
import natskit  # noqa: E402


class Node:
    """One tether-cloudd of the cluster: its daemon and ports."""

    def __init__(self, w, name, nats, extra=""):
        self.name = name
        self.daemon = w.start_cloud(state_dir=w.path(f"state-{name}"),
                                    extra=f"[Cluster]\nNATS={nats.url}\nNode={name}\n{extra}")
        self.coap_port, self.api_port = w.coap_port, w.api_port

    def use(self, w):
        """Point the World (tether, fakedev) at this node."""
        w.cloud, w.coap_port, w.api_port = self.daemon, self.coap_port, self.api_port
        return w


def listed(w, node, token=None):
    node.use(w)
    r = w.tether("--json", "list", token=token, check=False)
    return {d["id"]: d for d in json.loads(r.stdout)} if r.returncode == 0 else None


def token_works(w, node, token):
    node.use(w)
    return w.tether("--json", "list", token=token, check=False).returncode == 0


def wait_closed(d):
    try:
        while True:
            d.recv(timeout=seconds(10))
    except (EOFError, ssl.SSLError, ConnectionError, OSError):
        pass


def start(w):
    nats = natskit.NatsCluster(w, 1, mqtt=False)
    nats.wait_ready()
    n1 = Node(w, "n1", nats)
    n2 = Node(w, "n2", nats)
    return nats, n1, n2


def test_tokens(w):
    nats, n1, n2 = start(w)
    n1.use(w)
    t = json.loads(w.tether("tokens", "create", "--scope", "devices:read", "--name", "shared", "--json").stdout)
    poll(lambda: token_works(w, n2, t["token"]), 10, "the token made on node 1 to work on node 2")
    n2.use(w)
    ids = [x["id"] for x in json.loads(w.tether("tokens", "list", "--json").stdout)]
    expect(t["id"] in ids, f"node 2's token list: {ids}")
    # Revoked on node 2: refused by node 1 as soon as the change is there.
    w.tether("tokens", "revoke", t["id"])
    expect(not token_works(w, n2, t["token"]), "the revoked token works on node 2")
    poll(lambda: not token_works(w, n1, t["token"]), 10, "node 1 to refuse the token revoked on node 2")


def test_devices(w):
    nats, n1, n2 = start(w)
    d, dev_id = connect(n1.use(w))
    # Known on node 2 (offline there: presence is not this test's).
    poll(lambda: dev_id in (listed(w, n2) or {}), 10, f"{dev_id} listed by node 2")
    n2.use(w)
    info = json.loads(w.tether("--json", "describe", dev_id).stdout)
    expect(info["registered_by"] == "self" and info["first_connected"], f"node 2's registry entry: {info}")

    # Revoked through node 2: node 1 closes the session and refuses it.
    mark = n1.daemon.mark()
    t0 = time.monotonic()
    expect(w.tether("revoke", dev_id, "--reason", "stolen").stdout.strip() == f"{dev_id} revoked", "tether revoke")
    wait_closed(d)
    took = time.monotonic() - t0
    print(f"# node 1 closed the session {took:.2f} s after node 2 revoked the device")
    expect(took < seconds(5), f"the session on node 1 closed {took:.2f} s after the revocation on node 2")
    n1.daemon.wait_line(f"Device '{dev_id}' was revoked on another node \\(stolen\\); closing its session",
                        start=mark)
    n1.daemon.wait_line(f"Device '{dev_id}' disconnected \\(revoked\\)", start=mark)
    n1.use(w)
    expect(refused(w, d.cert, d.key), "node 1 admitted a device revoked on node 2")
    expect(listed(w, n1)[dev_id]["revoked"] is True, "node 1 does not list the device as revoked")

    # A third node, started now with an empty database, learns it all.
    n3 = Node(w, "n3", nats)
    poll(lambda: (listed(w, n3) or {}).get(dev_id, {}).get("revoked") is True, 10,
         f"node 3 to list {dev_id} as revoked")
    expect(refused(n3.use(w), d.cert, d.key), "node 3 admitted a revoked device")

    # Unrevoked on node 3: node 1 lets it in again.
    w.tether("unrevoke", dev_id)
    poll(lambda: listed(w, n1)[dev_id]["revoked"] is False, 10, "node 1 to see the unrevocation")
    connect(n1.use(w), (dev_id, d.cert, d.key))


def test_inventory(w):
    """Names, notes and tags (docs/fleet.md) are the registry's: changed
    on either node, for a device held by the other one too, seen by both;
    a name taken through one node is refused by the other once the change
    is there; the agent's system, recorded by the node it is connected to,
    is in the other node's list and filters."""
    nats, n1, n2 = start(w)
    n1.use(w)
    a = w.start_agent(extra="[Inventory]\nPackages=dpkg\n")
    dev = a.device_id
    w.tether("register", "dev-b")
    poll(lambda: {dev, "dev-b"} <= set(listed(w, n2) or {}), 10, "node 2 to list both devices")
    n2.use(w)
    out = w.tether("rename", dev, "gate-1").stdout
    expect("name 'gate-1'" in out, f"rename through node 2: {out!r}")
    w.tether("tag", dev, "group=a")
    w.tether("notes", "dev-b", "spare")
    poll(lambda: (listed(w, n1) or {}).get(dev, {}).get("name") == "gate-1"
         and listed(w, n1)[dev]["tags"] == {"group": "a"} and listed(w, n1)["dev-b"]["notes"] == "spare", 10,
         "node 1 to see the changes made through node 2")
    n1.use(w)
    r = w.tether("rename", "dev-b", "gate-1", check=False)
    expect(r.returncode == 1 and f"name 'gate-1' is taken by device {dev}" in r.stderr, f"taken: {r.stderr!r}")
    ids = [x.split()[0] for x in w.tether("list", "--tag", "group=a").stdout.splitlines()[1:]]
    expect(ids == [dev], f"node 1's filtered list: {ids}")
    # The agent's system: node 1 has it from the device, node 2 from the
    # registry's copy of the describe document.
    if os.path.exists("/usr/bin/dpkg"):
        def pkgs(node):
            d = (listed(w, node) or {}).get(dev, {})
            return ((d.get("system") or {}).get("packages") or {}).get("dpkg")
        poll(lambda: pkgs(n1), 10, "node 1 to have the agent's packages")
        poll(lambda: pkgs(n2) == pkgs(n1), 10, "node 2 to list the agent's packages")
        n2.use(w)
        ids = [x.split()[0] for x in w.tether("list", "--package", "dpkg", "--online").stdout.splitlines()[1:]]
        expect(ids == [dev], f"node 2's list by package: {ids}")


def test_single_node_joins(w):
    """A single node with a device and a token becomes node 1 of a cluster:
    node 2 learns both."""
    w.start_cloud(state_dir=w.path("state-n1"))
    d, dev_id = connect(w)
    t = json.loads(w.tether("tokens", "create", "--scope", "devices:read", "--name", "old", "--json").stdout)
    d.close()
    w.cloud.stop()
    w.daemons.remove(w.cloud)
    nats = natskit.NatsCluster(w, 1, mqtt=False)
    nats.wait_ready()
    n1 = Node(w, "n1", nats)
    n1.daemon.wait_line("Cluster state: publishing the 1 row\\(s\\) of table 'devices'")
    n2 = Node(w, "n2", nats)
    poll(lambda: dev_id in (listed(w, n2) or {}), 10, f"node 2 to list {dev_id}")
    expect(token_works(w, n2, t["token"]), "the single node's token does not work on node 2")


if __name__ == "__main__":
    natskit.skip_unless_available()
    sys.exit(run([test_tokens, test_devices, test_inventory, test_single_node_joins], emulated="ok"))
