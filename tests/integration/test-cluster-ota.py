#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""OTA in a cluster (docs/cluster.md, "OTA"): two tether-cloudd nodes on
one NATS server, each with its own artifact directory, and a real agent
that knows both. An update started through the node that does not hold
the device is sent by the one that does; every node lists the job with the
same history and has the artifact; when the node holding the device is
killed in the middle of a job, the device reconnects to the other one and
the job ends there. A node does not store an artifact beyond its own
upload limit, and stores one it could not write for a while once it
can."""

import hashlib
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


def start(w, trial_sec=1):
    """NATS, two nodes with artifact hosting, the agent on both; returns
    (OtaWorld, [node1, node2], the node holding the device, the other)."""
    o = OtaWorld(w)
    nats = NatsCluster(w, 1)
    nats.wait_ready()
    nodes = []
    for i in (1, 2):
        d = w.path(f"artifacts-{i}")
        os.makedirs(d, exist_ok=True)
        extra = f"[Cluster]\nNATS={nats.url}\nNode=n{i}\n[OTA]\nArtifactDirectory={d}\nPort=0\n"
        n = w.start_cloud(name=f"cloud-{i}", timing=TIMING, state_dir=w.path(f"cloud-{i}-state"), extra=extra)
        n.node, n.artifacts = f"n{i}", d
        nodes.append(n)
    o.install_v1()
    extra = o.agent_extra().replace("TrialSec=1\n", f"TrialSec={trial_sec}\n")
    hosts = " ".join(f"localhost:{n.coap_port}" for n in nodes)
    a = w.start_agent(plugin_dir=os.path.join(o.root, PLUGIN_DIR), extra=extra, host=hosts)
    if not os.path.exists(o.conf_path()):
        os.symlink(a.conf, o.conf_path())
    o.agent = a
    o.seed(o.v1)
    here = holder(nodes, a.device_id)
    return o, nodes, here, nodes[1] if here is nodes[0] else nodes[0]


def holder(nodes, dev, marks=None, timeout=20):
    found = []

    def look():
        for n in nodes:
            if n.proc.poll() is None and n.count(rf"Device '{dev}' connected from", (marks or {}).get(n, 0)) > 0:
                found.append(n)
                return True
        return False
    poll(look, seconds(timeout), f"device {dev} connected to a node")
    return found[0]


def api(w, node, method, path, body=None, timeout=40):
    req = urllib.request.Request(node.api + path, method=method,
                                 headers={"Authorization": f"Bearer {w.token}", "Content-Type": "application/json"},
                                 data=json.dumps(body).encode() if body is not None else None)
    try:
        with urllib.request.urlopen(req, timeout=seconds(timeout)) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def wait_job(w, node, job, pred, what, timeout=60):
    """Long-poll node for job until pred(job) holds."""
    deadline = time.monotonic() + seconds(timeout)
    st, j = api(w, node, "GET", f"/v1/ota/jobs/{job}")
    while st != 200 or not pred(j):
        if time.monotonic() > deadline:
            raise Failure(f"job {job} on {node.node} did not reach {what}: {st} {j}")
        if st != 200:
            time.sleep(0.2)
            st, j = api(w, node, "GET", f"/v1/ota/jobs/{job}")
        else:
            st, j = api(w, node, "GET", f"/v1/ota/jobs/{job}?wait={j['seq']}", timeout=timeout)
    return j


def jobs_on(w, node):
    r = w.tether("ota", "jobs", "--json", api=node.api)
    return {j["job"]: j for j in json.loads(r.stdout)}


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_job_through_other_node(w):
    o, nodes, here, other = start(w)
    v2 = plugin_deb(o.debs, "2.0", filler=1024 * 1024)  # several chunks in the stream
    r = w.tether("ota", o.agent.device_id, v2, "--key", o.key, "--json", check=False, timeout=120, api=other.api)
    expect(r.returncode == 0, f"tether ota through {other.node} failed ({r.returncode}): {r.stderr}")
    job = json.loads(r.stdout.strip().splitlines()[-1])
    expect(job["state"] == "committed", f"job ended {job['state']}: {job.get('reason')}")
    expect(o.installed() == "2.0 ii", f"dpkg says {o.installed()}")
    expect(here.count(rf"OTA job {job['job']} on device '{o.agent.device_id}': sent") == 1,
           f"{here.node}, which holds the device, did not send the job")
    expect(other.count(rf"OTA job {job['job']} on device .*: sent") == 0, f"{other.node} sent the job too")

    # Both nodes list it, with the same history.
    def same_everywhere():
        a, b = jobs_on(w, nodes[0]).get(job["job"]), jobs_on(w, nodes[1]).get(job["job"])
        return a and b and a["state"] == b["state"] == "committed" and a["history"] == b["history"]
    poll(same_everywhere, seconds(10), "the job alike on both nodes")

    # The artifact is on both nodes.
    digest = sha256(v2)
    for n in nodes:
        p = os.path.join(n.artifacts, digest + ".deb")
        poll(lambda: os.path.exists(p), seconds(10), f"artifact in {n.node}'s directory")
        expect(sha256(p) == digest, f"the artifact on {n.node} differs")
        st, body = api(w, n, "GET", f"/v1/ota/artifacts/{digest}")
        expect(st == 200 and body["size"] == os.path.getsize(v2), f"GET artifact on {n.node}: {st} {body}")


def test_holder_killed_in_trial(w):
    o, nodes, here, other = start(w, trial_sec=4)
    v2 = plugin_deb(o.debs, "2.0")
    url = w.tether("ota", "upload", v2, api=here.api).stdout.strip()
    manifest = o.sign(v2, url)
    st, body = api(w, other, "PUT", f"/v1/devices/{o.agent.device_id}", {"manifest": manifest})
    expect(st == 200, f"PUT through {other.node}: {st} {body}")
    job = body["job"]["job"]
    # Seen from the node that will survive.
    wait_job(w, other, job, lambda j: j["state"] == "trial", "trial")
    marks = {other: other.mark()}
    here.kill()
    holder([other], o.agent.device_id, marks, timeout=30)
    j = wait_job(w, other, job, lambda j: j["final"], "a final state", timeout=90)
    expect(j["state"] == "committed", f"job ended {j['state']} on {other.node}: {j.get('reason')}")
    expect(o.installed() == "2.0 ii", f"dpkg says {o.installed()}")
    states = [h["state"] for h in j["history"]]
    expect(states[0] == "sent" and states[-1] == "committed", f"history {states}")


def test_artifact_limit_and_retry(w):
    """A node stores no artifact larger than its own [OTA] MaxArtifactMB=
    and goes on with the next; one it cannot write for now (its directory
    replaced by a file) is tried again and stored once it can."""
    o = OtaWorld(w)
    nats = NatsCluster(w, 1)
    nats.wait_ready()
    nodes = []
    for i, limit in ((1, ""), (2, "MaxArtifactMB=1\n")):
        d = w.path(f"artifacts-{i}")
        os.makedirs(d, exist_ok=True)
        extra = f"[Cluster]\nNATS={nats.url}\nNode=n{i}\n[OTA]\nArtifactDirectory={d}\nPort=0\n{limit}"
        n = w.start_cloud(name=f"cloud-{i}", timing=TIMING, state_dir=w.path(f"cloud-{i}-state"), extra=extra)
        n.node, n.artifacts = f"n{i}", d
        nodes.append(n)
    a, b = nodes

    big = plugin_deb(o.debs, "2.0", filler=1536 * 1024)
    w.tether("ota", "upload", big, api=a.api)
    b.wait_line(rf"OTA artifact {sha256(big)} from the cluster has \d+ bytes, more than \[OTA\] MaxArtifactMB=",
                timeout=20)

    d = b.artifacts
    os.rename(d, d + ".away")
    open(d, "w").close()
    small = plugin_deb(o.debs, "3.0")
    digest = sha256(small)
    mark = b.mark()
    w.tether("ota", "upload", small, api=a.api)
    b.wait_line(rf"OTA artifact {digest} from the cluster not stored yet", timeout=20, start=mark)
    os.unlink(d)
    os.rename(d + ".away", d)
    p = os.path.join(d, digest + ".deb")
    poll(lambda: os.path.exists(p), seconds(20), f"artifact in {b.node}'s directory once it is back")
    expect(sha256(p) == digest, f"the artifact on {b.node} differs")
    expect(not os.path.exists(os.path.join(d, sha256(big) + ".deb")), f"{b.node} stored an artifact beyond its limit")
    expect(os.path.exists(os.path.join(a.artifacts, sha256(big) + ".deb")), f"{a.node} lost the large artifact")


if __name__ == "__main__":
    sys.exit(run([test_job_through_other_node, test_holder_killed_in_trial, test_artifact_limit_and_retry]))
