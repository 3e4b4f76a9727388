#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Campaigns (docs/fleet.md, "Campaigns") end to end: the real cloud, real
tetherd agents, each with its own tether-ota-helper and scratch dpkg root
(otakit.py), one signed plugin package rolled out in phases. Devices that
must fail really fail: their root holds a marker file that the package's
postinst refuses, so the helper rolls them back."""

import json
import os
import sqlite3
import sys
import threading
import time
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import EventStream, expect, poll, run, seconds  # noqa: E402
from fakedev import CHANGED, CONTENT_FORMAT, CREATED, POST, code, connect, uint  # noqa: E402
from otakit import OtaWorld, plugin_deb  # noqa: E402

FAIL_POSTINST = """#!/bin/sh
if [ "$1" = configure ] && [ -e "$DPKG_ROOT/fail-marker" ]; then
    echo 'postinst: this device is marked to fail' >&2
    exit 1
fi
exit 0
"""


class Node(OtaWorld):
    """One agent with its own scratch root, OTA state and cache; keys,
    packages and the artifact directory are the fleet's."""

    def __init__(self, fleet, i):
        w = fleet.w
        self.w = w
        self.fleet = fleet
        self.name = f"agent{i}"
        self.root = w.path(f"root{i}")
        self.debs = fleet.debs
        self.keys = fleet.keys
        self.state = w.path(f"ota-state{i}")
        self.cache = w.path(f"ota-cache{i}")
        self.artifacts = fleet.artifacts
        for d in (os.path.join(self.root, "var/lib/dpkg/info"), os.path.join(self.root, "var/lib/dpkg/updates"),
                  os.path.join(self.root, "tmp"), os.path.join(self.root, "usr/lib/tether/plugins")):
            os.makedirs(d, exist_ok=True)
        open(os.path.join(self.root, "var/lib/dpkg/status"), "a").close()
        self.key = fleet.key
        self.extra = ""
        self.agent = None
        self.v1 = fleet.v1
        self.dev = w.new_device()
        self.install_v1()

    def conf_path(self):
        return self.w.path(f"{self.name}-helper.conf")

    def start(self, wait_online=True):
        self.start_agent(name=f"{self.name}-{time.monotonic_ns()}", device=self.dev, wait_online=wait_online)
        self.seed(self.v1)
        return self.agent

    @property
    def id(self):
        return self.dev[0]


class Fleet:
    def __init__(self, w):
        self.w = w
        self.base = OtaWorld(w)  # keys, packages, artifact directory
        self.debs, self.keys, self.key, self.artifacts = self.base.debs, self.base.keys, self.base.key, \
            self.base.artifacts
        self.v1 = self.base.v1
        self.nodes = []

    def start_cloud(self, ota_port=0, extra="", **kw):
        """A restart passes the ports of the first start (the manifests'
        URLs name the artifact server's)."""
        mark = self.w.notify.mark()
        c = self.w.start_cloud(extra=f"{extra}[OTA]\nArtifactDirectory={self.artifacts}\nPort={ota_port}\n", **kw)
        m = self.w.notify.wait(lambda m: "X_OTA_PORT" in m, 5, "the OTA port", mark)
        self.ota_port = int(m["X_OTA_PORT"])
        return c

    def add(self, n, start=True):
        new = []
        for _ in range(n):
            node = Node(self, len(self.nodes))
            self.nodes.append(node)
            new.append(node)
        if start:
            for node in new:
                node.start()
        return new

    def api(self, method, path, body=None, timeout=40):
        return self.base.api(method, path, body, timeout)

    def manifest(self, deb, devices):
        url = self.base.upload(deb)
        out = self.w.path(f"manifest-{time.monotonic_ns()}")
        args = ["ota", "sign", deb, "--key", self.key, "--url", url, "--output", out]
        for d in devices:
            args += ["--device", d]
        self.w.tether(*args)
        with open(out) as f:
            return f.read()

    def create(self, deb, devices, phases, rate, expect_status=201, **kw):
        body = {"manifests": [self.manifest(deb, devices)], "devices": devices, "phases": phases,
                "max_failure_rate": rate, **kw}
        st, b = self.api("POST", "/v1/campaigns", body)
        expect(st == expect_status, f"POST /v1/campaigns: HTTP {st} {b}")
        return b.get("campaign")

    def get(self, cid):
        st, b = self.api("GET", f"/v1/campaigns/{cid}")
        expect(st == 200, f"GET campaign: HTTP {st} {b}")
        return b["campaign"]

    def devices(self, cid):
        st, b = self.api("GET", f"/v1/campaigns/{cid}/devices")
        expect(st == 200, f"GET campaign devices: HTTP {st} {b}")
        return {d["device"]: d for d in b["devices"]}

    def wait(self, cid, pred, what, timeout=120):
        box = {}

        def check():
            box["c"] = self.get(cid)
            return pred(box["c"])
        try:
            poll(check, timeout, what, interval=0.3)
        except Exception:
            print(f"# campaign now: {json.dumps(box.get('c'))}")
            raise
        return box["c"]

    def audit(self, action):
        st, b = self.api("GET", "/v1/audit?" + urllib.parse.urlencode({"action": action, "limit": 100}))
        expect(st == 200, f"GET /v1/audit: HTTP {st} {b}")
        return b if isinstance(b, list) else b.get("records", b.get("audit", []))


def stored_manifest(w, job):
    """The manifest column of job's row in cloud.db (read-only; the cloud
    runs, WAL mode)."""
    con = sqlite3.connect(f"file:{w.path('cloud-state', 'cloud.db')}?mode=ro", uri=True, timeout=10)
    try:
        row = con.execute("SELECT manifest FROM ota_jobs WHERE id = ?", (job,)).fetchone()
    finally:
        con.close()
    expect(row is not None, f"job {job} is not in cloud.db")
    return row[0]


def evdata(m):
    """The data of a campaign event (SSE message: the Particle envelope)."""
    return json.loads(m["data"]["data"])


def test_commits_everywhere(w):
    """A good package to 20 devices in phases 10/50/100: committed
    everywhere, phase by phase; events and the audit record."""
    f = Fleet(w)
    f.start_cloud()
    stream = EventStream(w, "tether/campaign/")
    t0 = time.monotonic()
    nodes = f.add(20)
    print(f"# figure: 20 agents with their own dpkg roots started in {time.monotonic() - t0:.1f} s")
    v2 = plugin_deb(f.debs, "2.0")
    t0 = time.monotonic()
    # through the CLI: a tag target (GET /v1/devices?tag=), device targets
    # (the union in order, each once), upload, signing, the campaign
    for n in nodes[:8]:
        w.tether("tag", n.id, "ring=early")
    w.tether("tag", nodes[8].id, "ring=late")
    targets = ["--target", "tag:ring=early"]
    for n in nodes[8:] + nodes[:3]:
        targets += ["--target", f"device:{n.id}"]
    r = w.tether("campaign", "create", *targets, "--package", v2, "--key", f.key, "--phases", "10,50,100",
                 "--max-failure-rate", "5", "--name", "good", "--no-follow")
    expect("Target tag:ring=early: 8 device(s)" in r.stderr, f"tag target: {r.stderr}")
    cid = r.stdout.strip()
    c = f.get(cid)
    expect(c["state"] in ("running", "finished") and c["devices"] == 20 and c["name"] == "good" and
           [p["devices"] for p in c["phases"]] == [2, 8, 10], f"created: {c}")
    expect(c["target"].startswith("tag:ring=early device:"), f"target: {c['target']}")
    order = list(f.devices(cid))
    expect(sorted(order[:8]) == sorted(n.id for n in nodes[:8]) and order[8:] == [n.id for n in nodes[8:]],
           f"device order {order}")
    c = f.wait(cid, lambda c: c["state"] == "finished", "the campaign finished", timeout=300)
    print(f"# figure: 20 devices, phases 10/50/100, created to finished in {time.monotonic() - t0:.1f} s")
    expect(c["counts"]["committed"] == 20, f"counts: {c['counts']}")
    expect([p["state"] for p in c["phases"]] == ["done"] * 3, f"phases: {c['phases']}")
    # phases ran in order: each started after the one before finished
    for a, b in zip(c["phases"], c["phases"][1:]):
        expect(a["finished_at"] <= b["started_at"], f"phase order: {a} then {b}")
    for n in nodes:
        expect(n.installed() == "2.0 ii", f"{n.id}: dpkg says {n.installed()}")
    devs = f.devices(c["id"])
    expect(all(d["state"] == "committed" and d["job"] for d in devs.values()), f"devices: {devs}")
    ev = stream.wait(lambda m: evdata(m).get("state") == "finished", timeout=10, what="finished event")
    expect(ev["event"] == f"tether/campaign/{c['id']}", f"event name {ev['event']}")
    rec = [r for r in f.audit("campaign.create") if r.get("target") == c["id"]]
    expect(len(rec) == 1 and rec[0]["actor"].startswith("token:"), f"audit: {rec}")
    out = w.tether("campaign", "show", cid, "--no-follow").stdout
    expect("finished" in out and "20/20 committed" in out, f"campaign show: {out}")
    out = w.tether("campaign", "list").stdout
    expect(cid in out and "finished" in out, f"campaign list: {out}")
    r = w.tether("campaign", "pause", cid, check=False)
    expect(r.returncode != 0 and "finished" in r.stderr, f"pause of a finished campaign: {r.returncode} {r.stderr}")


def test_failure_pauses_then_abort(w):
    """A package that fails on 30 % of the devices, a tagged subset: the
    campaign pauses itself after phase 1 (reason, event, audit by "cloud"),
    phase 2 is untouched; pause/resume conflicts; abort is final."""
    f = Fleet(w)
    f.start_cloud()
    stream = EventStream(w, "tether/campaign/")
    nodes = f.add(10)
    for n in nodes[:3]:
        w.tether("tag", n.id, "fault=postinst")
    # The package fails where the tag says: its postinst refuses a root
    # with the marker, made for the devices the cloud lists for the tag.
    st, tagged = f.api("GET", "/v1/devices?tag=fault=postinst")
    expect(st == 200 and sorted(d["id"] for d in tagged) == sorted(n.id for n in nodes[:3]),
           f"devices tagged fault=postinst: {st} {tagged}")
    for n in nodes:
        if n.id in {d["id"] for d in tagged}:
            open(os.path.join(n.root, "fail-marker"), "w").close()
    v2 = plugin_deb(f.debs, "2.0", scripts={"postinst": FAIL_POSTINST})
    ids = [n.id for n in nodes]
    c = f.create(v2, ids, [60, 100], 5)
    c = f.wait(c["id"], lambda c: c["state"] == "paused", "the campaign paused itself", timeout=240)
    p1, p2 = c["phases"]
    expect(p1["state"] == "failed" and p1["counts"]["rolled_back"] == 3 and p1["counts"]["committed"] == 3,
           f"phase 1: {p1}")
    expect(c["paused_reason"] == "failure rate 50% in phase 1 is over the 5% allowed", c["paused_reason"])
    expect(p2["state"] == "pending" and p2["counts"]["pending"] == 4, f"phase 2: {p2}")
    devs = f.devices(c["id"])
    expect(all(devs[i]["job"] is None and devs[i]["state"] == "pending" for i in ids[6:]), f"phase 2 devices {devs}")
    for n in nodes[:3]:
        expect(n.installed() == "1.0 ii", f"{n.id} not rolled back: {n.installed()}")
    for n in nodes[6:]:
        expect(n.installed() == "1.0 ii", f"{n.id} of phase 2 was touched: {n.installed()}")
    ev = stream.wait(lambda m: evdata(m).get("state") == "paused", timeout=10, what="paused event")
    d = evdata(ev)
    expect(d["campaign"] == c["id"] and d["phase"] == 1 and "failure rate" in d["reason"], f"event {d}")
    rec = [r for r in f.audit("campaign.pause") if r.get("target") == c["id"]]
    expect(len(rec) == 1 and rec[0]["actor"] == "cloud", f"audit of the automatic pause: {rec}")
    # state conflicts
    st, b = f.api("POST", f"/v1/campaigns/{c['id']}/pause")
    expect(st == 409, f"pause of a paused campaign: {st} {b}")
    st, b = f.api("POST", f"/v1/campaigns/{c['id']}/abort")
    expect(st == 200 and b["campaign"]["state"] == "aborted", f"abort: {st} {b}")
    for action in ("pause", "resume", "abort"):
        st, b = f.api("POST", f"/v1/campaigns/{c['id']}/{action}")
        expect(st == 409, f"{action} after abort: {st} {b}")
    devs = f.devices(c["id"])
    expect(all(devs[i]["job"] is None for i in ids[6:]), "abort made jobs")
    rec = [r for r in f.audit("campaign.abort") if r.get("target") == c["id"] and r["detail"].get("status") == 200]
    expect(len(rec) == 1 and rec[0]["actor"].startswith("token:"), f"audit of abort: {rec}")


def test_pause_resume_offline_catch_up_restart(w):
    """Pause holds a queued job of an offline device, also once it
    connects; resume lets it go.
    A device offline for phase 1 does not hold the campaign up and
    catches up when it connects. The cloud restarted mid-campaign (during
    phase_wait) continues. A device never has two open jobs: a second
    campaign's job for it waits until the first one's ends; the API's
    job route answers 409 meanwhile."""
    f = Fleet(w)
    f.start_cloud()
    nodes = f.add(4)
    off = f.add(1)[0]  # known to the cloud, then offline
    off.agent.stop()
    poll(lambda: not f.api("GET", f"/v1/devices/{off.id}")[1].get("connected"), 20, "the device offline")
    v2 = plugin_deb(f.debs, "2.0")
    v3 = plugin_deb(f.debs, "3.0")
    ids = [off.id] + [n.id for n in nodes]
    # phase 1: off, nodes[0]; phase 2: nodes[1..3]
    c = f.create(v2, ids, [40, 100], 0, phase_wait=4)
    cid = c["id"]
    c = f.wait(cid, lambda c: c["phases"][0]["state"] == "waiting", "phase 1 over, waiting")
    p1 = c["phases"][0]
    expect(p1["counts"]["offline"] == 1 and p1["counts"]["committed"] == 1, f"phase 1: {p1}")
    devs = f.devices(cid)
    job_off = devs[off.id]["job"]
    expect(devs[off.id]["state"] == "queued" and job_off, f"offline device: {devs[off.id]}")
    # the one open job: the API's route refuses a second
    st, b = f.api("PUT", f"/v1/devices/{off.id}", {"manifest": f.manifest(v2, [off.id])})
    expect(st == 409 and b["error"] == f"device {off.id} has an open job {job_off}", f"second job: {st} {b}")
    # a second campaign for the same device: its job waits
    c2 = f.create(v3, [off.id], [100], 0)
    d2 = f.devices(c2["id"])[off.id]
    expect(d2["state"] == "pending" and d2["job"] is None, f"second campaign's device: {d2}")

    # the queued job holds no copy of the manifest (the campaign keeps it
    # once); it is still sent after the restart (below)
    expect(stored_manifest(w, job_off) is None, "a campaign's queued job has its own manifest in cloud.db")
    # restart the cloud during phase_wait: the campaign goes on
    w.cloud.stop()
    f.start_cloud(port=w.coap_port, api_port=w.api_port, ota_port=f.ota_port)
    c = f.wait(cid, lambda c: c["state"] == "finished", "finished after the restart", timeout=180)
    expect(c["counts"]["committed"] == 4 and c["counts"]["offline"] == 1, f"counts: {c['counts']}")

    # pause holds the queued job of an offline device even when it
    # connects; resume sends it
    off2 = f.add(1)[0]
    off2.agent.stop()
    poll(lambda: not f.api("GET", f"/v1/devices/{off2.id}")[1].get("connected"), 20, "the device offline")
    c3 = f.create(v2, [off2.id, nodes[1].id], [50, 100], 0, phase_wait=3600)
    c3 = f.wait(c3["id"], lambda c: c["phases"][0]["state"] == "waiting", "c3 phase 1 over (device offline)")
    st, b = f.api("POST", f"/v1/campaigns/{c3['id']}/pause")
    expect(st == 200 and b["campaign"]["state"] == "paused", f"pause: {st} {b}")
    st, b = f.api("POST", f"/v1/campaigns/{c3['id']}/pause")
    expect(st == 409, f"pause of a paused campaign: {st} {b}")
    job3 = f.devices(c3["id"])[off2.id]["job"]
    off2.start()
    # The cloud has handled the connect (its sending of queued jobs runs
    # right after it, before any later request): a variable read the
    # agent answers went through the cloud after it.
    st, b = f.api("GET", f"/v1/devices/{off2.id}/no_such_variable")
    expect(st == 404, f"variable read after the connect: {st} {b}")
    expect(f.base.job(job3)["state"] == "queued", f"paused, the job went out: {f.base.job(job3)}")
    st, b = f.api("POST", f"/v1/campaigns/{c3['id']}/resume")
    expect(st == 200 and b["campaign"]["state"] == "running", f"resume: {st} {b}")
    st, b = f.api("POST", f"/v1/campaigns/{c3['id']}/resume")
    expect(st == 409, f"resume of a running campaign: {st} {b}")
    j = f.base.wait_job(job3, timeout=120)
    expect(j["state"] == "committed", f"after resume: {j['state']} {j.get('reason')}")
    st, b = f.api("POST", f"/v1/campaigns/{c3['id']}/abort")
    expect(st == 200 and b["campaign"]["phases"][1]["counts"]["pending"] == 1, f"abort: {st} {b}")

    # the offline device connects: catches up with campaign 1's job, then
    # gets campaign 2's
    t_online = time.time()
    off.start()
    j = f.base.wait_job(job_off, timeout=120)
    expect(j["state"] == "committed", f"catch-up job: {j['state']} {j.get('reason')}")
    expect(stored_manifest(w, job_off) is None, f"job {job_off} over, with a manifest in cloud.db")
    c2 = f.wait(c2["id"], lambda c: c["state"] == "finished" and c["counts"]["committed"] == 1,
                "the second campaign finished", timeout=180)
    d2 = f.devices(c2["id"])[off.id]
    j2 = f.base.job(d2["job"])
    expect(j2["created_at"] >= j["updated_at"], f"jobs overlapped: {j['updated_at']} / {j2['created_at']}")
    expect(off.installed() == "3.0 ii", f"offline device has {off.installed()}")
    c = f.get(cid)
    expect(c["counts"]["committed"] == 5, f"campaign 1 after the catch-up: {c['counts']}")
    print(f"# figure: offline device caught up two campaigns in {time.time() - t_online:.1f} s")


def test_send_retried_while_online(w):
    """A queued job whose request cannot be sent although its device is
    online (the device does not read what the cloud sends it: MaxQueuedBytes)
    goes out once the device reads again, without a new connection, and
    its campaign finishes."""
    f = Fleet(w)
    cloud = f.start_cloud(extra="[Cloud]\nMaxQueuedBytes=1024\n")
    d, dev = connect(w)
    d.auto_pong = False
    # A function call of 2000 bytes the device does not read: the cloud
    # then refuses to send it more (503) until it proves it read.
    results = []

    def call():
        results.append(f.api("POST", f"/v1/devices/{dev}/fill", {"arg": "x" * 2000}, timeout=60)[0])

    def backlogged():
        t = threading.Thread(target=call, daemon=True)
        t.start()
        t.join(seconds(1))
        return 503 in results
    poll(backlogged, 30, "the cloud holding back what it sends to the device")
    v2 = plugin_deb(f.debs, "2.0")
    mark = cloud.mark()
    c = f.create(v2, [dev], [100], 0)
    cloud.wait_line(rf"OTA job [0-9a-f]+: cannot send the update request to device '{dev}'", timeout=20,
                    start=mark)
    job = f.devices(c["id"])[dev]["job"]
    expect(f.base.job(job)["state"] == "queued", f"job {f.base.job(job)}")
    # The device reads again (answers the cloud's Ping and the call): the
    # job goes out on the same session.
    d.auto_pong = True
    deadline = time.monotonic() + seconds(30)
    while True:
        m = d.recv(max(deadline - time.monotonic(), 0.1) / seconds(1))
        if m.code == POST and m.path == f"o/{job}":
            break
        if m.code >> 5 == 0:  # another request (the call): answered
            d.answer(m, code(4, 4))
    d.answer(m, CREATED)
    t = d.request(POST, f"o/{job}", json.dumps({"seq": 1, "state": "committed", "package": "tether-plugin-test",
                                                 "version": "2.0"}).encode(), opts=[(CONTENT_FORMAT, uint(50))])
    expect(d.response(t).code == CHANGED, "final report refused")
    c = f.wait(c["id"], lambda c: c["state"] == "finished", "the campaign finished")
    expect(c["counts"]["committed"] == 1, f"counts {c['counts']}")
    cloud.wait_line(rf"OTA job {job}: sent the queued update request to device '{dev}'", timeout=5)
    d.close()


def test_input_checks(w):
    """Malformed, oversized and hostile campaign requests: 400/404/409/413
    with a message, nothing made."""
    f = Fleet(w)
    f.start_cloud()
    nodes = f.add(1, start=False)
    nodes += f.add(1, start=False)
    a, b = nodes[0].id, nodes[1].id
    v2 = plugin_deb(f.debs, "2.0")
    other = plugin_deb(f.debs, "2.1")
    m = f.manifest(v2, [a, b])
    good = {"manifests": [m], "phases": [50, 100], "max_failure_rate": 10}

    def post(body, status, text):
        st, r = f.api("POST", "/v1/campaigns", body)
        expect(st == status and text in r.get("error", ""), f"{body if len(str(body)) < 300 else '...'}: {st} {r}")

    post({**good, "phases": [50, 50, 100]}, 400, "strictly increasing")
    post({**good, "phases": [10, 50]}, 400, "must be 100")
    post({**good, "phases": [0, 100]}, 400, "strictly increasing")
    post({**good, "phases": []}, 400, "phases")
    post({**good, "phases": ["50", 100]}, 400, "phases")
    post({**good, "max_failure_rate": 101}, 400, "max_failure_rate")
    post({**good, "max_failure_rate": -1}, 400, "max_failure_rate")
    post({**good, "max_failure_rate": "5"}, 400, "max_failure_rate")
    post({**good, "phase_wait": -3}, 400, "phase_wait")
    post({**good, "devices": [a, a]}, 400, "listed twice")
    post({**good, "devices": [a, "nosuchdevice"]}, 400, "not named by any of the manifests")
    post({**good, "devices": ["../x"]}, 400, "not a device ID")
    post({**good, "manifests": [m, f.manifest(other, [b])]}, 400, "a campaign is one update")
    post({**good, "manifests": ["garbage"]}, 400, "not a signed tether manifest")
    post({**good, "manifests": []}, 400, "manifests")
    post({**good, "manifests": [m] * 4097}, 400, "1 to 4096 signed manifests")
    post({**good, "name": "x" * 200}, 400, "name")
    post({**good, "name": "a\nb"}, 400, "name")
    st, r = f.api("GET", "/v1/campaigns")
    expect(st == 200 and r["campaigns"] == [], f"something was made: {r}")
    for path in ("/v1/campaigns/0123456789abcdef", "/v1/campaigns/nope", "/v1/campaigns/0123456789abcdef/devices"):
        st, r = f.api("GET", path)
        expect(st == 404, f"GET {path}: {st} {r}")
    st, r = f.api("POST", "/v1/campaigns/0123456789abcdef/pause")
    expect(st == 404, f"pause unknown: {st} {r}")
    c = f.create(v2, [a, b], [50, 100], 10)
    st, r = f.api("POST", f"/v1/campaigns/{c['id']}/explode")
    expect(st == 404, f"unknown action: {st} {r}")
    st, r = f.api("DELETE", f"/v1/campaigns/{c['id']}")
    expect(st == 405, f"DELETE: {st} {r}")
    # devices offline: each phase is over with its jobs queued, the
    # campaign finishes; the devices keep their jobs
    c = f.wait(c["id"], lambda c: c["state"] == "finished", "finished with every device offline")
    devs = f.devices(c["id"])
    expect(devs[a]["state"] == "queued" and devs[b]["state"] == "queued" and c["counts"]["offline"] == 2,
           f"devices {devs}")
    # paging
    st, r = f.api("GET", f"/v1/campaigns/{c['id']}/devices?page=2&per_page=1")
    expect(st == 200 and [d["device"] for d in r["devices"]] == [b] and r["meta"]["total_pages"] == 2, f"{r}")
    # a body over the limit without a token in a header stays at the small limit
    import urllib.request
    big = json.dumps({**good, "name": "x" * (64 * 1024), "access_token": w.token}).encode()
    req = urllib.request.Request(w.api + "/v1/campaigns", data=big, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=seconds(30)) as resp:
            st = resp.status
    except urllib.error.HTTPError as e:
        st = e.code
    expect(st == 413, f"large body with the token in it: {st}")
    # as many manifests as 100,000 devices of 64-character IDs need (and
    # more): taken
    st, r = f.api("POST", "/v1/campaigns", {**good, "manifests": [m] * 4096, "name": "many-manifests"})
    expect(st == 201 and r["campaign"]["devices"] == 2, f"4096 manifests: {st} {str(r)[:300]}")
    st, r = f.api("POST", f"/v1/campaigns/{r['campaign']['id']}/abort")
    expect(st == 200, f"abort: {st} {r}")


if __name__ == "__main__":
    sys.exit(run([test_input_checks, test_send_retried_while_online, test_commits_everywhere, test_failure_pauses_then_abort,
                  test_pause_resume_offline_catch_up_restart],
                 emulated="runs up to 20 agents installing packages with the host's dpkg"))
