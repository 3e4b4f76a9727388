#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""A cloud restart on a single node forgets nothing (docs/cloud.md, "What
a restart keeps"): devices offline at the time are listed offline with
when they were last heard, GET /v1/devices/ID answers with their last
describe document, OTA jobs come back with their history, reports on a
job in progress go on where they were (each applied once), and a job
the device had not answered yet is sent to it again when it connects.
Once after SIGTERM, once after SIGKILL (then what was committed)."""
import json
import os
import shutil
import signal
import sqlite3
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import api_json, expect, poll, run, seconds, skip  # noqa: E402
from fakedev import (CHANGED, CONTENT, CREATED, CSM, CSM_MAX_MESSAGE_SIZE, DEFAULT_DESCRIBE, GET, POST,  # noqa: E402
                     Device, connect, frame, uint)


def listed(w):
    return {d["id"]: d for d in json.loads(w.tether("--json", "list").stdout)}


def jobs(w):
    return {j["job"]: j for j in json.loads(w.tether("--json", "ota", "jobs").stdout)}


def states(job):
    return [h["state"] for h in job["history"]]


def report(d, job, state, seq=None, **extra):
    body = dict(state=state, **extra)
    if seq is not None:
        body["seq"] = seq
    t = d.request(POST, "o/" + job, json.dumps(body).encode())
    return d.response(t).code


def start_job(w, d, dev_id, answer):
    """PUT a manifest for fake device d; it answers POST /o/JOB with
    answer, or not at all (None). Returns the job id once the API said 200."""
    from otakit import sign_manifest
    manifest = sign_manifest(w, dev_id)
    out = {}
    t = threading.Thread(target=lambda: out.update(r=api_json(w, "PUT", f"/v1/devices/{dev_id}",
                                                              {"manifest": manifest})))
    t.start()
    req = d.wait_for(lambda m: m.code == POST and m.path.startswith("o/"), what="POST /o/JOB")
    if answer is not None:
        d.answer(req, answer)
    t.join(seconds(30))
    status, body = out.get("r", (None, None))
    expect(status == 200, f"PUT manifest: {status} {body}")
    return body["job"]["job"]


def db_row(w, sql, args):
    db = sqlite3.connect(w.path("cloud-state", "cloud.db"))
    try:
        return db.execute(sql, args).fetchone()
    finally:
        db.close()


def restart(w, sig, agent, fakes, job_in_progress):
    """Stop the cloud with sig and start it again on the same ports."""
    if sig == signal.SIGKILL:
        # Only what is committed survives: the job starts and final states
        # are (before their answers); describes and other reports join the
        # batch, so wait for it (within 100 ms).
        for d in [agent.device_id] + [f.id for f in fakes]:
            poll(lambda: db_row(w, "SELECT describe FROM devices WHERE id = ?", (d,))[0], seconds(5),
                 f"the describe of {d} committed")
        poll(lambda: db_row(w, "SELECT device_seq FROM ota_jobs WHERE id = ?", (job_in_progress,))[0] == 2,
             seconds(5), "the report committed")
        w.cloud.kill()
    else:
        w.cloud.stop()
    w.daemons.remove(w.cloud)
    agent.stop()
    w.daemons.remove(agent)
    for f in fakes:
        f.close()
    w.start_cloud(port=w.coap_port, api_port=w.api_port)


def scenario(w, sig):
    if not shutil.which("dpkg-deb"):
        skip("dpkg-deb is not installed (the test signs a manifest for a real .deb)")
    w.start_cloud()
    agent = w.start_agent()
    status, before = api_json(w, "GET", f"/v1/devices/{agent.device_id}")
    expect(status == 200 and before["functions"] and before["variables"], f"agent before: {status} {before}")

    # A: a job over (committed). B: a job the device has not answered.
    # C: a job in progress (downloading).
    a, a_id = connect(w)
    job_a = start_job(w, a, a_id, CREATED)
    expect(report(a, job_a, "committed", 1) == CHANGED, "A's final report")
    b, b_id = connect(w)
    job_b = start_job(w, b, b_id, None)
    c, c_id = connect(w)
    job_c = start_job(w, c, c_id, CREATED)
    expect(report(c, job_c, "accepted", 1) == CHANGED, "C's report")
    expect(report(c, job_c, "downloading", 2, bytes=10, total=100) == CHANGED, "C's report")
    heard = listed(w)

    restart(w, sig, agent, [a, b, c], job_c)

    # Every device is listed, offline, with when it was last heard.
    devices = listed(w)
    for dev in (agent.device_id, a_id, b_id, c_id):
        expect(dev in devices, f"{dev} not listed after the restart: {list(devices)}")
        expect(devices[dev]["connected"] is False and devices[dev]["last_heard"], f"{dev}: {devices[dev]}")
        # After SIGKILL, a device online then was last heard when it
        # connected, as far as the database knows.
        expect(sig == signal.SIGKILL or devices[dev]["last_heard"] >= heard[dev]["last_heard"],
               f"{dev}: last_heard went back: {devices[dev]} before {heard[dev]}")
    out = w.tether("list").stdout
    expect(any(line.split()[:2] == [agent.device_id, "offline"] for line in out.splitlines()), f"tether list: {out}")
    # The agent's last describe, while it is offline; calls still say offline.
    status, after = api_json(w, "GET", f"/v1/devices/{agent.device_id}")
    expect(status == 200 and after["connected"] is False and after["last_heard"], f"agent after: {status} {after}")
    expect(after["functions"] == before["functions"] and after["variables"] == before["variables"],
           f"describe lost: {after} (before {before})")
    var = next(iter(before["variables"]))
    status, body = api_json(w, "GET", f"/v1/devices/{agent.device_id}/{var}")
    expect(status == 503, f"reading {var} of an offline device: {status} {body}")
    r = w.tether("describe", agent.device_id)
    expect(before["functions"][0] in r.stdout, f"tether describe: {r.stdout}")

    # The jobs, with their history.
    js = jobs(w)
    expect(set(js) >= {job_a, job_b, job_c}, f"jobs after the restart: {list(js)}")
    expect(js[job_a]["state"] == "committed" and states(js[job_a]) == ["sent", "accepted", "committed"],
           f"job A: {js[job_a]}")
    expect(js[job_b]["state"] == "sent" and not js[job_b]["final"], f"job B: {js[job_b]}")
    expect(js[job_c]["state"] == "downloading" and js[job_c]["progress"] == {"bytes": 10, "total": 100} and
           states(js[job_c]) == ["sent", "accepted", "downloading"], f"job C: {js[job_c]}")
    out = w.tether("ota", "jobs").stdout
    expect(f"{job_a} {a_id} committed" in out and f"{job_b} {b_id} sent" in out, f"tether ota jobs: {out}")

    # B connects: the update request goes to it again, same job (it may
    # come before or after GET /d).
    b2 = Device(w.coap_port, b.cert, b.key, w.path("pki", "ca.crt"))
    b2.send(frame(CSM, b"", [(CSM_MAX_MESSAGE_SIZE, uint(8 * 1024 * 1024))]))
    pending = {"d", "o/" + job_b}
    while pending:
        m = b2.wait_for(lambda m: m.code in (GET, POST) and m.path in pending, what=f"{pending} from the cloud")
        pending.discard(m.path)
        if m.path == "d":
            b2.answer(m, CONTENT, json.dumps(DEFAULT_DESCRIBE).encode(), cf=50)
        else:
            b2.answer(m, CREATED)
    status, jb = api_json(w, "GET", f"/v1/ota/jobs/{job_b}?wait={js[job_b]['seq']}")
    expect(status == 200 and jb["state"] == "accepted", f"job B after its device connected: {jb}")
    expect(report(b2, job_b, "committed", 1) == CHANGED, "B's final report")

    # C goes on: its last report again is applied once, the next one is.
    c2, _ = connect(w, (c_id, c.cert, c.key))
    expect(report(c2, job_c, "downloading", 2, bytes=10, total=100) == CHANGED, "C's report again")
    expect(report(c2, job_c, "committed", 3) == CHANGED, "C's final report")
    # A's final report again (its answer was lost) is still answered 2.04.
    a2, _ = connect(w, (a_id, a.cert, a.key))
    expect(report(a2, job_a, "committed", 1) == CHANGED, "A's final report again")
    expect(report(a2, job_a, "downloading", 2) == (4 << 5 | 9), "a report on a job that is over")

    js = jobs(w)
    expect(states(js[job_b]) == ["sent", "accepted", "committed"], f"job B: {js[job_b]}")
    expect(states(js[job_c]) == ["sent", "accepted", "downloading", "committed"], f"job C: {js[job_c]}")
    expect(states(js[job_a]) == ["sent", "accepted", "committed"], f"job A: {js[job_a]}")

    # The agent comes back online as the same device.
    w.run_agent(agent.name, agent.conf, agent.device)
    expect(listed(w)[agent.device_id]["connected"] is True, "agent not online again")
    for d in (a2, b2, c2):
        d.close()


def test_restart_sigterm(w):
    scenario(w, signal.SIGTERM)


def test_restart_sigkill(w):
    scenario(w, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(run([test_restart_sigterm, test_restart_sigkill], emulated="ok"))
