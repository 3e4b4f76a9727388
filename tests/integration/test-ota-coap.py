#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Updates over the device's own connection (docs/protocol.md,
"Artifacts"): a cloud without [OTA] Port= serves GET /a/SHA256 with Block2
(and BERT) on the device port, only for an artifact an open job of the
asking device names; tetherd downloads a manifest without url that way,
resumes after a crash or a cut connection from its checkpoint instead of
from byte 0, and installs."""

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import expect, needs_fault_injection, run, skip  # noqa: E402
from fakedev import CONTENT, CONTENT_FORMAT, GET, POST, code, codestr, connect, uint  # noqa: E402
from otakit import OtaWorld, build_deb, plugin_deb, push_job, reported_in_order, COMMIT_PATH  # noqa: E402

MB = 1024 * 1024
ETAG, BLOCK2, SIZE2 = 4, 23, 28
CREATED, CHANGED = code(2, 1), code(2, 4)


def need_dpkg_deb():
    if subprocess.run(["sh", "-c", "command -v dpkg-deb"], capture_output=True).returncode != 0:
        skip("dpkg-deb is not installed")


def block2(num, szx, more=False):
    return uint(num << 4 | (8 if more else 0) | szx)


def parse_block2(m):
    v = int.from_bytes(m.opt(BLOCK2)[0], "big") if m.opt(BLOCK2) else None
    return None if v is None else (v >> 4, bool(v & 8), v & 7)


def get_block(d, sha, num, szx):
    t = d.request(GET, f"a/{sha}", opts=[(BLOCK2, block2(num, szx))])
    return d.response(t)


def artifact_cloud(w, size=300 * 1024):
    """A cloud with artifact storage and no HTTPS port, one .deb uploaded
    (tether ota upload prints its SHA-256: there is no URL)."""
    need_dpkg_deb()
    arts = w.path("artifacts")
    os.makedirs(arts, exist_ok=True)
    cloud = w.start_cloud(extra=f"[OTA]\nArtifactDirectory={arts}\n")
    cloud.wait_line(r"devices fetch them over their connection")
    deb = build_deb(w.path(), "tether-test", "1.0", filler=size)
    with open(deb, "rb") as f:
        data = f.read()
    sha = hashlib.sha256(data).hexdigest()
    out = w.tether("ota", "upload", deb).stdout.strip()
    expect(out == sha, f"tether ota upload printed {out!r}, expected the SHA-256 (no HTTPS artifact server)")
    return cloud, deb, data, sha


def sign(w, deb, device):
    if not os.path.exists(w.path("update.key")):
        w.tether("ota", "keygen", w.path("update.key"), w.path("update.pem"))
    out = w.path(f"manifest-{device}-{os.path.basename(deb)}")
    w.tether("ota", "sign", deb, "--key", w.path("update.key"), "--device", device, "--output", out)
    with open(out) as f:
        text = f.read()
    body = json.loads(text.split("\n\n", 1)[1])
    expect("url" not in body, f"tether ota sign without --url wrote a url: {body}")
    return text


def test_blocks_and_access(w):
    """The wire format, byte for byte, and who may fetch what."""
    cloud, deb, data, sha = artifact_cloud(w)
    d1, id1 = connect(w)
    d2, id2 = connect(w)
    job = push_job(w, d1, id1, sign(w, deb, id1), CREATED)

    m = get_block(d1, sha, 0, 6)
    expect(m.code == CONTENT, f"block 0: {m}")
    expect(m.payload == data[:1024], "block 0 is not the first 1024 bytes")
    expect(parse_block2(m) == (0, True, 6), f"Block2 {parse_block2(m)}")
    expect(int.from_bytes(m.opt(SIZE2)[0], "big") == len(data), f"Size2 {m.opt(SIZE2)}")
    expect(m.opt(ETAG) == [bytes.fromhex(sha[:16])], f"ETag {m.opt(ETAG)}")
    expect(m.opt(CONTENT_FORMAT) == [uint(42)], f"Content-Format {m.opt(CONTENT_FORMAT)}")
    m = get_block(d1, sha, 5, 2)  # 64-byte blocks
    expect(m.code == CONTENT and m.payload == data[5 * 64:6 * 64] and parse_block2(m) == (5, True, 2), f"{m}")

    # BERT: SZX 7, NUM in 1024-byte units, a multiple of 1024 bytes but the last.
    got, num, sizes = b"", 0, set()
    while True:
        m = get_block(d1, sha, num, 7)
        expect(m.code == CONTENT, f"BERT block {num}: {m}")
        n, more, szx = parse_block2(m)
        expect(n == num and szx == 7, f"BERT Block2 {parse_block2(m)} for NUM {num}")
        got += m.payload
        if not more:
            break
        expect(len(m.payload) % 1024 == 0 and len(m.payload) > 1024, f"BERT block of {len(m.payload)} bytes")
        sizes.add(len(m.payload))
        num += len(m.payload) // 1024
    expect(got == data, "the BERT blocks are not the artifact")
    print(f"# BERT blocks of {sizes} bytes")

    beyond = len(data) // 1024 + 1
    m = get_block(d1, sha, beyond, 6)
    expect(m.code == code(4, 2), f"block {beyond} beyond the end: {codestr(m.code)} {m.payload!r}")

    m = get_block(d2, sha, 0, 6)
    expect(m.code == code(4, 3) and b"no open update job of this device" in m.payload, f"other device: {m}")
    m = get_block(d1, "0" * 64, 0, 6)
    expect(m.code == code(4, 4), f"unknown artifact: {m}")
    m = get_block(d1, "X" * 64, 0, 6)
    expect(m.code == code(4, 4), f"not a SHA-256: {m}")
    t = d1.request(POST, f"a/{sha}")
    expect(d1.response(t).code == code(4, 5), "POST on /a/SHA256 is not 4.05")

    # The device ends the job: from then on it may not fetch the artifact.
    t = d1.request(POST, f"o/{job}", json.dumps({"seq": 5, "state": "failed", "code": "x", "reason": "test",
                                                  "package": "tether-test", "version": "1.0"}).encode(),
                   opts=[(CONTENT_FORMAT, uint(50))])
    expect(d1.response(t).code == CHANGED, "final report refused")
    m = get_block(d1, sha, 0, 6)
    expect(m.code == code(4, 3), f"after the job ended: {m}")
    d1.close()
    d2.close()


def test_not_reading_waits(w):
    """A device that asks for blocks without reading them is told to wait
    (5.03 + Max-Age) once MaxQueuedBytes are unread."""
    arts = w.path("artifacts")
    os.makedirs(arts, exist_ok=True)
    need_dpkg_deb()
    w.start_cloud(extra=f"[Cloud]\nMaxQueuedBytes=65536\n[OTA]\nArtifactDirectory={arts}\n")
    deb = build_deb(w.path(), "tether-test", "1.0", filler=600 * 1024)
    sha = w.tether("ota", "upload", deb).stdout.strip()
    d, dev = connect(w)
    d.auto_pong = False  # never proves that it reads
    push_job(w, d, dev, sign(w, deb, dev), CREATED)
    tokens = [d.request(GET, f"a/{sha}", opts=[(BLOCK2, block2(i * 64, 7))]) for i in range(6)]
    codes = [d.response(t).code for t in tokens]
    expect(code(5, 3) in codes, f"never told to wait: {[codestr(c) for c in codes]}")
    d.close()


def world(w, size, env=None, extra=""):
    o = OtaWorld(w, extra=extra)
    arts = o.artifacts
    cloud = w.start_cloud(extra=f"[OTA]\nArtifactDirectory={arts}\n")
    o.install_v1()
    a = o.start_agent(env=env) if env else o.start_agent()
    o.seed(o.v1)
    v2 = plugin_deb(o.debs, "2.0", filler=size)
    return o, cloud, a, v2


def test_install_over_connection(w):
    """tether ota DEVICE FILE.deb --key K with no OTA port on the cloud:
    signed without url, downloaded over the session, committed."""
    o, cloud, a, v2 = world(w, 3 * MB)
    r = o.run_cli(v2)
    expect(r.returncode == 0, f"tether ota exited {r.returncode}: {r.stderr[-2000:]}")
    job = json.loads(r.stdout.strip().splitlines()[-1])
    expect(job["state"] == "committed", f"ended {job['state']}: {job.get('reason')}")
    expect(reported_in_order([h["state"] for h in job["history"]], COMMIT_PATH), f"history {job['history']}")
    a.wait_line(r"downloading artifact [0-9a-f]{64} over the connection to the cloud")
    line = a.wait_line(r"bytes in \d+ block requests of \d+ bytes over the connection, from byte 0")
    print("# " + line)
    m = re.search(r"(\d+) bytes in (\d+) block requests of (\d+) bytes", line)
    fetched, requests, block = int(m.group(1)), int(m.group(2)), int(m.group(3))
    # BERT: both CSMs allow it, so tetherd asks for SZX 7 and the cloud
    # answers with blocks of many KiB (a multiple of 1024 bytes).
    expect(block > 1024 and block % 1024 == 0, f"not BERT: {line}")
    # One request per block: at most 256 KiB out, never 5.03 for MaxQueuedBytes.
    expect(fetched == os.path.getsize(v2) and requests == -(-fetched // block), f"blocks: {line}")
    cloud.wait_line(r"fetches artifact [0-9a-f]{64} \(\d+ bytes\) over its connection, \d+-byte blocks")
    expect(cloud.count(r"fetches artifact [0-9a-f]{64} \(\d+ bytes\) over its connection, %d-byte blocks" % block) == 1,
           "the cloud did not serve the blocks tetherd counted")
    expect(o.installed().startswith("2.0 ii"), f"installed: {o.installed()}")


def test_crash_resumes_from_checkpoint(w):
    """Killed right after the first download checkpoint (4 of 10 MB):
    the restarted agent re-hashes the prefix and asks for the blocks after
    it; the cloud never sees the download start from byte 0 again."""
    needs_fault_injection()
    flag = w.path("crash-once")
    open(flag, "w").close()
    o, cloud, a, v2 = world(w, 10 * MB,
                            env={"TETHER_OTA_CRASH_AT": "download-checkpoint", "TETHER_OTA_CRASH_ONCE": flag})
    o.upload(v2)
    job = o.start_job(o.sign(v2, None))
    a.proc.wait(60)
    a.killed = True
    offset = o.journal()["dl_offset"]
    expect(offset >= 4 * MB and offset < os.path.getsize(v2), f"checkpoint at {offset}")
    a2 = o.start_agent(name="agent2", device=o.device())
    j = o.wait_job(job)
    expect(j["state"] == "committed", f"ended {j['state']}: {j.get('reason')}")
    line = a2.wait_line(r"bytes in \d+ block requests of \d+ bytes over the connection, from byte \d+")
    m = re.search(r"(\d+) bytes in (\d+) block requests of (\d+) bytes over the connection, from byte (\d+)", line)
    fetched, start, block = int(m.group(1)), int(m.group(4)), int(m.group(3))
    expect(start == offset, f"resumed from {start}, the checkpoint was {offset}: {line}")
    expect(block > 1024 and block % 1024 == 0, f"the resumed download did not use BERT: {line}")
    expect(fetched == os.path.getsize(v2) - offset, f"fetched {fetched} after the restart: {line}")
    expect(a2.count(r"starting the download over") == 0, "the download started over")
    starts = cloud.count(r"fetches artifact [0-9a-f]{64} \(\d+ bytes\) over its connection")
    expect(starts == 1, f"the cloud saw the download start from byte 0 {starts} times")
    print(f"# resumed at {offset} of {os.path.getsize(v2)} bytes, fetched {fetched} more")


class CuttingProxy:
    """A TCP relay between the agent and the cloud's device port that
    closes the first connection once `cut_at` bytes went from the cloud to
    the agent (TLS records, so a little more than the payload), as a lost
    uplink would; later connections are relayed untouched."""

    def __init__(self, w, upstream_port, cut_at):
        self.upstream, self.cut_at, self.cut = upstream_port, cut_at, threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.socks = []
        w.cleanups.append(self.close)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.upstream))
            self.socks += [down, up]
            cutting = not self.cut.is_set()
            threading.Thread(target=self._pump, args=(down, up, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, down, cutting), daemon=True).start()

    def _pump(self, src, dst, cutting):
        sent = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
                sent += len(data)
                if cutting and sent >= self.cut_at and not self.cut.is_set():
                    self.cut.set()
                    break
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        self.listener.close()
        for s in self.socks:
            s.close()


def test_cut_connection_resumes(w):
    """The connection cut (both directions closed, no crash) when half of
    a 10 MB package has come over it: the agent reconnects, re-hashes its
    last checkpoint and asks for the blocks after it; the download does not
    start over and the job commits."""
    o = OtaWorld(w)
    cloud = w.start_cloud(extra=f"[OTA]\nArtifactDirectory={o.artifacts}\n")
    o.install_v1()
    v2 = plugin_deb(o.debs, "2.0", filler=10 * MB)
    size = os.path.getsize(v2)
    proxy = CuttingProxy(w, w.coap_port, size // 2)
    w.coap_port = proxy.port  # the agent's [Cloud] Port=
    try:
        a = o.start_agent()
    finally:
        w.coap_port = cloud.coap_port
    o.seed(o.v1)
    o.upload(v2)
    job = o.start_job(o.sign(v2, None))
    j = o.wait_job(job)
    expect(proxy.cut.is_set(), "the connection was never cut")
    expect(j["state"] == "committed", f"ended {j['state']}: {j.get('reason')}")
    pat = r"(\d+) bytes in (\d+) block requests of (\d+) bytes over the connection, from byte (\d+)"
    a.wait_line(r"bytes over the connection, from byte [1-9]\d*$")  # the resumed transfer's
    with a.cond:
        attempts = [m for m in (re.search(pat, line) for line in a.lines) if m]
    expect(len(attempts) == 2, f"expected two transfers (cut, resumed), saw {len(attempts)}")
    first, second = (int(m.group(1)) for m in attempts), (int(m.group(4)) for m in attempts)
    first, second = list(first), list(second)
    expect(second[0] == 0 and second[1] >= 4 * MB, f"transfers started at bytes {second}")
    expect(first[0] < size and first[1] == size - second[1],
           f"fetched {first} bytes, package {size}, resumed at {second[1]}")
    expect(a.count(r"starting the download over") == 0, "the download started over")
    starts = cloud.count(r"fetches artifact [0-9a-f]{64} \(\d+ bytes\) over its connection")
    expect(starts == 1, f"the cloud saw the download start from byte 0 {starts} times")
    print(f"# cut after {first[0]} of {size} bytes; resumed at {second[1]}, fetched {first[1]} more")


def test_refused_artifact_fails_the_job(w):
    """The cloud refuses the artifact (deleted from ArtifactDirectory:
    4.04): the job fails at once with the cloud's reason, no retries."""
    o, cloud, a, v2 = world(w, 64 * 1024)
    o.upload(v2)
    sha = hashlib.sha256(open(v2, "rb").read()).hexdigest()
    os.unlink(os.path.join(o.artifacts, sha + ".deb"))
    job = o.start_job(o.sign(v2, None))
    j = o.wait_job(job)
    expect(j["state"] == "failed" and j.get("code") == "download", f"ended {j['state']} {j.get('code')}")
    expect("4.04" in (j.get("reason") or ""), f"reason: {j.get('reason')}")
    expect(a.count(r"download attempt \d+ failed") == 0, "the refused download was retried")


if __name__ == "__main__":
    sys.exit(run([test_blocks_and_access, test_not_reading_waits, test_install_over_connection,
                  test_crash_resumes_from_checkpoint, test_cut_connection_resumes,
                  test_refused_artifact_fails_the_job],
                 emulated="the install steps run tether-ota-helper and the host's dpkg directly, as test-ota does"))
