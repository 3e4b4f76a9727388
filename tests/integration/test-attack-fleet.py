#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Attacks on the fleet features (docs/fleet.md): a device with a valid
certificate asking for artifact blocks it may not have or that do not
exist, piling up block requests, describing itself with escape
sequences and oversized inventories; restricted API tokens reaching for
campaigns and other devices; hostile campaign bodies; pause, resume and
abort racing. Memory of the cloud is measured around the floods."""

import hashlib
import json
import os
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Failure, Skip, expect, run, seconds, skip  # noqa: E402
from harness import api_json as api  # noqa: E402
from fakedev import CONTENT, CONTENT_FORMAT, CREATED, CSM, CSM_MAX_MESSAGE_SIZE, GET, POST, Device, code, codestr, connect, frame, \
    memory_checks, rss_kb, uint  # noqa: E402
from otakit import build_deb, push_job  # noqa: E402

BLOCK2 = 23
ESCAPES = ("\x1b", "\x9b", "\x07")


def block2(num, szx):
    return uint(num << 4 | szx)


def artifact_cloud(w, size=64 * 1024, extra=""):
    """A cloud storing artifacts, no HTTPS artifact port; one .deb uploaded."""
    if subprocess.run(["sh", "-c", "command -v dpkg-deb"], capture_output=True).returncode != 0:
        skip("dpkg-deb is not installed")
    arts = w.path("artifacts")
    os.makedirs(arts, exist_ok=True)
    cloud = w.start_cloud(extra=f"{extra}[OTA]\nArtifactDirectory={arts}\n")
    deb = build_deb(w.path(), "tether-test", "1.0", filler=size)
    with open(deb, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    out = w.tether("ota", "upload", deb).stdout.strip()
    expect(out == sha, f"upload printed {out!r}")
    return cloud, deb, sha


def sign(w, deb, devices, name="m"):
    if not os.path.exists(w.path("update.key")):
        w.tether("ota", "keygen", w.path("update.key"), w.path("update.pem"))
    out = w.path(f"manifest-{name}-{time.monotonic_ns()}")
    args = ["ota", "sign", deb, "--key", w.path("update.key"), "--output", out]
    for d in devices:
        args += ["--device", d]
    w.tether(*args)
    with open(out) as f:
        return f.read()


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def settle(pid, timeout=30):
    """Until the process used no CPU for half a second: it has worked off
    what was sent to it."""
    deadline = time.monotonic() + seconds(timeout)
    last = cpu_ticks(pid)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = cpu_ticks(pid)
        if now == last:
            return
        last = now
    raise Failure(f"process {pid} still busy after {timeout} s")


def no_escapes(text, what):
    for e in ESCAPES:
        expect(e not in text, f"{what} carries control character {e!r}: {text!r}")


def test_artifact_blocks(w):
    """Blocks of another device's artifact, NUM at the top of its 20 bits,
    an option longer than Block2 allows, and thousands of requests piled
    up without reading: refused or bounded, and the cloud serves others."""
    cloud, deb, sha = artifact_cloud(w)
    d1, id1 = connect(w)
    d2, id2 = connect(w)
    push_job(w, d1, id1, sign(w, deb, [id1]), CREATED)

    def get(d, num, szx, raw=None):
        t = d.request(GET, f"a/{sha}", opts=[(BLOCK2, raw if raw is not None else block2(num, szx))])
        return d.response(t)

    m = get(d2, 0, 6)
    expect(m.code == code(4, 3), f"device 2 fetched device 1's artifact: {codestr(m.code)}")
    for num, szx in (((1 << 20) - 1, 6), ((1 << 20) - 1, 7), ((1 << 20) - 1, 0), (100, 6)):
        m = get(d1, num, szx)
        expect(m.code == code(4, 2), f"block {num} szx {szx} of an 80 KiB artifact: {codestr(m.code)} {m.payload!r}")
    # A 4-byte Block2: libcoap drops the message; the session goes on.
    d1.request(GET, f"a/{sha}", opts=[(BLOCK2, b"\x01\x00\x00\x06")])
    m = get(d1, 3, 7)  # BERT asked without BERT in our CSM: answered, bounded
    expect(m.code == CONTENT and len(m.payload) <= 64 * 1024, f"SZX 7: {codestr(m.code)} {len(m.payload)}")

    # A flood of BERT block requests, nothing read back.
    pid = cloud.proc.pid
    check_mem = memory_checks(pid)
    before = rss_kb(pid) if check_mem else 0
    flood = Device(w.coap_port, d1.cert, d1.key, w.path("pki", "ca.crt"), rcvbuf=4096)
    d1.close()
    flood.auto_pong = False
    flood.send(frame(CSM, b"", [(CSM_MAX_MESSAGE_SIZE, uint(8 << 20))]))
    req = b"".join(frame(GET, (i + 1).to_bytes(4, "big"), [(11, b"a"), (11, sha.encode()), (BLOCK2, block2(0, 7))])
                   for i in range(5000))
    try:
        flood.s.settimeout(seconds(10))
        flood.send(req)
    except OSError:
        pass  # the cloud dropped the device: fine
    # The cloud keeps serving the other device meanwhile.
    t0 = time.monotonic()
    m = get(d2, 0, 6)
    expect(m.code == code(4, 3), f"device 2 during the flood: {codestr(m.code)}")
    print(f"# the cloud answered another device {time.monotonic() - t0:.2f} s into the flood")
    settle(pid)
    m = get(d2, 0, 6)
    expect(m.code == code(4, 3), f"device 2 after the flood: {codestr(m.code)}")
    if check_mem:
        after = rss_kb(pid, "VmHWM")
        print(f"# cloud VmRSS {before} kB before, peak {after} kB after 5000 unread BERT requests")
        expect(after - before < 40 * 1024, f"the cloud grew by {after - before} kB")
    flood.close()
    d2.close()


def test_hostile_describe(w):
    """Escape sequences in system.os, the agent version and a unit, a 1 MB
    kernel string, 10,000 packages: the cloud keeps what is clean and
    bounded, and tether list/describe print no control characters."""
    w.start_cloud()
    doc = {"agent": "tetherd", "version": "1.0\x1b]0;pwned\x07", "plugins": [], "functions": ["f"],
           "variables": {"v": "int32", "w": "double"}, "units": {"v": "\x1b[2J\x1b[31m", "w": "\u009b31m"},
           "system": {"os": "Debian\x1b[2J", "arch": "amd64\u009b1m", "kernel": "k" * (1 << 20),
                      "packages": {f"pkg{i}": "1.0" for i in range(10000)}}}
    d, dev = connect(w, describe=doc)
    st, body = api(w, "GET", f"/v1/devices/{dev}")
    expect(st == 200, f"GET device: {st} {body}")
    sys_ = body.get("system") or {}
    print(f"# system kept: {sorted(sys_)}; {len(sys_.get('packages', {}))} packages")
    expect("os" not in sys_ and "arch" not in sys_ and "kernel" not in sys_, f"dirty system texts kept: {sys_}")
    expect(len(sys_.get("packages", {})) <= 128, "10,000 packages kept")
    for args in (("list",), ("describe", dev)):
        out = w.tether(*args).stdout
        no_escapes(out, f"tether {args[0]}")
    d.close()


def token(w, **params):
    st, body = api(w, "POST", "/v1/tokens", params)
    expect(st == 200, f"POST /v1/tokens {params}: {st} {body}")
    return body["token"]


def test_restricted_tokens(w):
    """A token restricted to a tag, with every write scope: no campaigns,
    no renaming or retagging of devices outside its reach, no jobs for
    them."""
    cloud, deb, sha = artifact_cloud(w)
    a, id_a = connect(w)
    b, id_b = connect(w)
    st, body = api(w, "PUT", f"/v1/devices/{id_a}", {"tags": {"site": "a"}})
    expect(st == 200, f"tag a: {st} {body}")
    tok = token(w, scopes=["devices:read", "devices:write", "ota:write"], tags=["site=a"])
    man = sign(w, deb, [id_a, id_b])
    body = {"manifests": [man], "phases": [100], "max_failure_rate": 0}
    st, res = api(w, "POST", "/v1/campaigns", body, token=tok)
    expect(st == 403, f"restricted token created a campaign: {st} {res}")
    st, res = api(w, "GET", "/v1/campaigns", token=tok)
    expect(st == 403, f"restricted token listed campaigns: {st} {res}")
    st, res = api(w, "PUT", f"/v1/devices/{id_b}", {"name": "mine"}, token=tok)
    expect(st == 403, f"restricted token renamed a device out of reach: {st} {res}")
    st, res = api(w, "PUT", f"/v1/devices/{id_a}", {"tags": {"site": None}}, token=tok)
    expect(st == 403, f"restricted token moved its device out of reach: {st} {res}")
    st, res = api(w, "PUT", f"/v1/devices/{id_a}", {"name": "taken-later"}, token=tok)
    expect(st == 200, f"restricted token renaming its own device: {st} {res}")
    # Taking a name from another device: the 409 must not leak what is out of reach.
    st, res = api(w, "PUT", f"/v1/devices/{id_b}", {"name": "bname"})
    expect(st == 200, f"admin rename: {st} {res}")
    for taken in ("bname", id_b):
        st, res = api(w, "PUT", f"/v1/devices/{id_a}", {"name": taken}, token=tok)
        expect(st == 409 and res["error"] == f"name '{taken}' is taken by another device", f"taking {taken}: {st} {res}")
    st, res = api(w, "POST", "/v1/ota/jobs", {"device": id_b, "manifest": man}, token=tok)
    expect(st == 403, f"restricted token started a job out of reach: {st} {res}")
    st, res = api(w, "GET", "/v1/devices?name=bname&tag=site", token=tok)
    expect(st == 200 and not res, f"restricted list by name: {st} {res}")
    a.close()
    b.close()


def test_campaign_bodies(w):
    """Hostile bodies: 100,000 copies of one device, manifests of
    different packages, deep nesting, numbers out of range, control
    characters in the name; all 400, quickly, the cloud bounded."""
    cloud, deb, sha = artifact_cloud(w)
    deb2 = build_deb(w.path(), "tether-other", "1.0", filler=1024)
    w.tether("ota", "upload", deb2)
    ids = [f"dev{i}" for i in range(3)]
    man = sign(w, deb, ids)
    man2 = sign(w, deb2, ["dev9"])
    pid = cloud.proc.pid
    check_mem = memory_checks(pid)
    before = rss_kb(pid) if check_mem else 0
    base = {"manifests": [man], "phases": [100], "max_failure_rate": 0}
    cases = [
        ({"devices": ["dev0"] * 100000}, "listed twice"),
        ({"manifests": [man, man2]}, "one update"),
        ({"phases": [1, 2 ** 63, 100]}, None),  # jansson: too big an integer
        ({"phases": [2 ** 64 - 1]}, None),
        ({"phases": [-(2 ** 63), 100]}, "phases"),
        ({"phases": [2 ** 32 + 50, 100]}, "phases"),
        ({"phases": [50.5, 100]}, "phases"),
        ({"phases": list(range(1, 101)) + [100]}, "phases"),
        ({"max_failure_rate": 1e308}, "max_failure_rate"),
        ({"max_failure_rate": -1e-300}, "max_failure_rate"),
        ({"max_failure_rate": "5"}, "max_failure_rate"),
        ({"phase_wait": 2 ** 63 - 1}, "phase_wait"),
        ({"phase_wait": 2 ** 32}, "phase_wait"),
        ({"phase_wait": -1}, "phase_wait"),
        ({"name": "x\u009b2J"}, "name"),
        ({"name": "x\x1b[2J"}, "name"),
        ({"target": "t" * 5000}, "target"),
        ({"manifests": [man] * 4097}, "manifests"),
        ({"devices": ["../../etc"]}, "device"),
    ]
    for patch, word in cases:
        t0 = time.monotonic()
        st, res = api(w, "POST", "/v1/campaigns", {**base, **patch})
        took = time.monotonic() - t0
        what = json.dumps(patch)[:60]
        expect(st == 400, f"{what}: {st} {res}")
        expect(word is None or word in json.dumps(res), f"{what}: the error does not name {word}: {res}")
        expect(took < seconds(5), f"{what} took {took:.1f} s")
    # Deep nesting: jansson's depth limit.
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", w.api_port, timeout=seconds(20))
    deep = "[" * 200000 + "]" * 200000
    conn.request("POST", "/v1/campaigns", body=deep, headers={"Authorization": f"Bearer {w.token}",
                                                               "Content-Type": "application/json"})
    r = conn.getresponse()
    expect(r.status == 400, f"200,000 nested arrays: {r.status} {r.read()[:200]!r}")
    conn.close()
    if check_mem:
        after = rss_kb(pid)
        print(f"# cloud VmRSS {before} kB before, {after} kB after the hostile bodies")
        expect(after - before < 60 * 1024, f"the cloud grew by {after - before} kB")
    st, res = api(w, "POST", "/v1/campaigns", base)
    expect(st == 201, f"a good body after the bad ones: {st} {res}")


def test_pause_abort_race(w):
    """pause, resume and abort from four clients at once: each answered
    200 or 409, the campaign ends aborted, its counts add up, and later
    actions are 409."""
    cloud, deb, sha = artifact_cloud(w)
    ids = [f"offline{i}" for i in range(40)]
    for i in ids:
        st, res = api(w, "POST", "/v1/devices", {"id": i})
        expect(st in (200, 201), f"register {i}: {st} {res}")
    st, res = api(w, "POST", "/v1/campaigns", {"manifests": [sign(w, deb, ids)], "phases": [10, 50, 100],
                                               "max_failure_rate": 0, "phase_wait": 3600})
    expect(st == 201, f"create: {st} {res}")
    cid = res["campaign"]["id"]
    statuses, errors = [], []

    def hammer(k):
        try:
            for i in range(40):
                action = ("pause", "resume", "pause", "abort")[(i + k) % 4] if i > 20 else ("pause", "resume")[
                    (i + k) % 2]
                s, _ = api(w, "POST", f"/v1/campaigns/{cid}/{action}")
                statuses.append(s)
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)
    threads = [threading.Thread(target=hammer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds(60))
    expect(not errors, f"clients failed: {errors}")
    expect(set(statuses) <= {200, 409}, f"answers: {sorted(set(statuses))}")
    st, res = api(w, "GET", f"/v1/campaigns/{cid}")
    c = res["campaign"]
    expect(c["state"] == "aborted", f"state {c['state']}")
    expect(sum(c["counts"].values()) == len(ids), f"counts {c['counts']}")
    for action in ("pause", "resume", "abort"):
        s, _ = api(w, "POST", f"/v1/campaigns/{cid}/{action}")
        expect(s == 409, f"{action} after abort: {s}")
    jobs = [j for j in api(w, "GET", f"/v1/campaigns/{cid}/devices?per_page=100")[1]["devices"] if j.get("job")]
    for j in jobs:
        st, job = api(w, "GET", f"/v1/ota/jobs/{j['job']}")
        expect(st == 200 and job["final"], f"job {j['job']} of an aborted campaign: {job}")
    expect(cloud.proc.poll() is None, "the cloud exited")


def test_campaign_body_values(w):
    """32 MiB of tiny JSON values (ota:write may send that much): parsed,
    each is a jansson value many times its text; the cloud's peak memory
    stays bounded."""
    import http.client
    cloud = w.start_cloud()
    pid = cloud.proc.pid
    if not memory_checks(pid):
        raise Skip("memory figures mean nothing under a wrapper or sanitizer")
    before = rss_kb(pid, "VmHWM")
    size = 32 * 1024 * 1024 - 100
    form = "&".join(f"k{i:x}=" for i in range(size // 8))[:size]
    for filler in ("0,", "{},", "[],", "form"):
        n = size // len(filler)
        if filler == "form":
            body, ctype = form, "application/x-www-form-urlencoded"
        else:
            body = ('{"devices":[' + filler * n)[:-1] + '],"manifests":[],"phases":[100],"max_failure_rate":0}'
            ctype = "application/json"
        conn = http.client.HTTPConnection("127.0.0.1", w.api_port, timeout=seconds(120))
        t0 = time.monotonic()
        conn.request("POST", "/v1/campaigns", body=body, headers={"Authorization": f"Bearer {w.token}",
                                                                   "Content-Type": ctype})
        r = conn.getresponse()
        text = r.read()[:200]
        conn.close()
        peak = rss_kb(pid, "VmHWM")
        print(f"# {len(body)} bytes of {filler!r}: {r.status} {text!r} in {time.monotonic() - t0:.1f} s; peak VmRSS {peak} kB")
        expect(r.status in (400, 413), f"{filler!r}: {r.status} {text!r}")
        # The body itself (32 MiB) and what its values may take (65 MiB).
        expect(peak - before < 160 * 1024, f"the cloud peaked {peak - before} kB over its start")
    # The largest campaign the rules allow still parses (and fails later,
    # on its unsigned manifests).
    big = {"devices": [f"{i:024x}" for i in range(100000)], "manifests": ["x" * 4350] * 1000, "phases": [100],
           "max_failure_rate": 0}
    st, res = api(w, "POST", "/v1/campaigns", big)
    expect(st == 400 and "manifest 1 is not a signed" in res["error"], f"largest campaign: {st} {res}")


def test_small_messages_far_block(w):
    """A device whose CSM takes 80-byte messages asks for a block 16 MiB
    in: the cloud's smaller blocks would number past Block2's 20 bits; it
    answers with a Block2 option that is one (at most 3 bytes) or refuses."""
    cloud, deb, sha = artifact_cloud(w, size=17 * 1024 * 1024)
    d1, id1 = connect(w)
    push_job(w, d1, id1, sign(w, deb, [id1]), CREATED)
    d1.close()
    d = Device(w.coap_port, d1.cert, d1.key, w.path("pki", "ca.crt"))
    d.send(frame(CSM, b"", [(CSM_MAX_MESSAGE_SIZE, uint(80))]))
    num = 16 * 1024 + 1
    t = d.request(GET, f"a/{sha}", opts=[(BLOCK2, block2(num, 6))])
    m = d.response(t, timeout=20)
    opt = m.opt(BLOCK2)
    print(f"# {codestr(m.code)}, Block2 {opt[0].hex() if opt else None}, {len(m.payload)} bytes")
    expect(m.code in (CONTENT, code(4, 2)), f"{codestr(m.code)} {m.payload!r}")
    expect(m.code != CONTENT or (opt and len(opt[0]) <= 3), f"a Block2 option of {opt}")
    d.close()


def test_job_reason_escapes(w):
    """A device ends its job with escape sequences in code and reason:
    the cloud keeps them as spaces, and tether ota prints none."""
    cloud, deb, sha = artifact_cloud(w)
    d, dev = connect(w)
    job = push_job(w, d, dev, sign(w, deb, [dev]), CREATED)
    t = d.request(POST, f"o/{job}", json.dumps({"seq": 5, "state": "failed", "code": "x\u001b[31m",
                                                 "reason": "\u001b]0;pwned\u0007 disk\nfull \u009b2J",
                                                 "package": "tether-test", "version": "1.0"}).encode(),
                  opts=[(CONTENT_FORMAT, uint(50))])
    expect(d.response(t).code == code(2, 4), "final report refused")
    st, j = api(w, "GET", f"/v1/ota/jobs/{job}")
    expect(st == 200 and j["reason"] == " ]0;pwned  disk full   2J" and j["code"] == "x [31m", f"job: {st} {j}")
    for args in (("ota", "status", job), ("ota", "jobs")):
        no_escapes(w.tether(*args).stdout, "tether " + " ".join(args[:2]))
    d.close()


if __name__ == "__main__":
    sys.exit(run([test_artifact_blocks, test_hostile_describe, test_restricted_tokens, test_campaign_bodies,
                  test_pause_abort_race, test_campaign_body_values,
                  test_small_messages_far_block, test_job_reason_escapes]))
