#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""The agent's resumable download against servers that misbehave: a
connection dropped mid-way (resume with Range), a server that ignores Range,
an artifact whose ETag changed (If-Range), a 416, a stall (low-speed
timeout), a partial file changed on disk between restarts, a server whose
certificate is not from the pinned CA. The artifact server here is a small
Python HTTPS server (client certificate required) that can be told to
misbehave; the cloud's own artifact server is what test-ota.py uses."""

import http.server
import os
import pty
import re
import select
import ssl
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import EMULATOR, TETHER, Failure, expect, needs_fault_injection, run, seconds  # noqa: E402
from otakit import OtaWorld, plugin_deb, reported_in_order  # noqa: E402

MB = 1024 * 1024
CUT = 6 * MB  # the first response stops here


class FakeServer:
    def __init__(self, w, data, mode, cert=None, key=None):
        self.data = data
        self.mode = mode
        self.requests = []
        self.release = threading.Event()
        srv = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                n = len(srv.requests)
                rng = self.headers.get("Range")
                srv.requests.append({"range": rng, "if_range": self.headers.get("If-Range"),
                                     "cn": self.connection.getpeercert()["subject"][0][0][1]})
                etag = '"A"' if n == 0 or srv.mode not in ("etag-changed", "etag-changed-206") else '"B"'
                start = None
                if rng and rng.startswith("bytes=") and rng.endswith("-"):
                    start = int(rng[6:-1])
                if n == 0:
                    return self.send(200, 0, etag, cut=CUT, stall=srv.mode == "stall")
                if srv.mode == "ignore-range" or start is None:
                    return self.send(200, 0, etag)
                if srv.mode == "416" and n == 1:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(srv.data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if srv.mode == "etag-changed" and self.headers.get("If-Range") != etag:
                    return self.send(200, 0, etag)
                return self.send(206, start, etag)

            def send(self, status, start, etag, cut=None, stall=False):
                body = srv.data[start:]
                self.send_response(status)
                self.send_header("ETag", etag)
                self.send_header("Content-Length", str(len(body)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(srv.data) - 1}/{len(srv.data)}")
                self.end_headers()
                if cut is None:
                    self.wfile.write(body)
                    return
                self.wfile.write(body[:cut])
                self.wfile.flush()
                if stall:
                    srv.release.wait(30)  # until the test ends; the agent must give up first
                self.close_connection = True
                self.connection.shutdown(2)

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert or w.path("pki", "server.crt"), key or w.path("pki", "server.key"))
        ctx.load_verify_locations(w.path("pki", "ca.crt"))
        ctx.verify_mode = ssl.CERT_REQUIRED
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        # the agent hanging up on a response it does not want is expected
        self.httpd.handle_error = lambda request, address: None
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.httpd.server_address[1]}/artifact.deb"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()


def world(w):
    o = OtaWorld(w, extra="LowSpeedSec=2\nDownloadAttempts=3\n")
    o.start_cloud()
    o.install_v1()
    o.start_agent()
    o.seed(o.v1)
    v2 = plugin_deb(o.debs, "2.0", filler=10 * MB)
    with open(v2, "rb") as f:
        data = f.read()
    return o, v2, data


def through(w, mode, expect_log=None):
    o, v2, data = world(w)
    srv = FakeServer(w, data, mode)
    try:
        mark = o.agent.mark()
        job = o.start_job(o.sign(v2, srv.url))
        j = o.wait_job(job)
        expect(j["state"] == "committed", f"{mode}: ended {j['state']}: {j.get('reason')}; requests {srv.requests}")
        expect(all(r["cn"] == o.agent.device_id for r in srv.requests), "the device certificate was not presented")
        if expect_log:
            o.agent.wait_line(expect_log, start=mark)
        return srv.requests
    finally:
        srv.close()


def test_dropped_connection_resumes(w):
    reqs = through(w, "drop")
    expect(len(reqs) == 2, f"requests: {reqs}")
    expect(reqs[0]["range"] is None, f"first request: {reqs[0]}")
    start = int(reqs[1]["range"][6:-1])
    expect(start >= 4 * MB and start <= CUT, f"resumed from {start}, expected the last checkpoint: {reqs[1]}")
    expect(reqs[1]["if_range"] == '"A"', f"no If-Range with the ETag: {reqs[1]}")


def test_range_ignored_restarts(w):
    reqs = through(w, "ignore-range", r"starting the download over: the server sent the whole file")
    expect(len(reqs) == 2 and reqs[1]["range"], f"requests: {reqs}")


def test_etag_changed_restarts(w):
    reqs = through(w, "etag-changed", r"starting the download over")
    expect(reqs[1]["if_range"] == '"A"', f"requests: {reqs}")


def test_etag_changed_on_206_restarts(w):
    """A server that ignores If-Range and sends the range of a changed artifact."""
    reqs = through(w, "etag-changed-206")
    expect(len(reqs) == 3 and reqs[2]["range"] is None, f"expected a third request from byte 0: {reqs}")


def test_416_restarts(w):
    reqs = through(w, "416")
    expect(len(reqs) == 3 and reqs[1]["range"] and reqs[2]["range"] is None, f"requests: {reqs}")


def test_stall_times_out_and_resumes(w):
    reqs = through(w, "stall")
    expect(len(reqs) == 2 and reqs[1]["range"], f"requests: {reqs}")


def test_progress_reaches_the_cli(w):
    """The first response stops after 6 MB of about 10 and stalls for
    LowSpeedSec: the device's progress reports reach the cloud, and
    `tether ota` on a terminal draws them as a bar between its live state
    lines, until the job is committed."""
    o, v2, data = world(w)
    srv = FakeServer(w, data, "stall")
    manifest = w.path("stall.manifest")
    with open(manifest, "w") as f:
        f.write(o.sign(v2, srv.url))
    master, slave = pty.openpty()
    env = dict(os.environ, TETHER_API=w.api, TETHER_TOKEN=w.token)
    p = subprocess.Popen(EMULATOR + [TETHER, "ota", o.agent.device_id, v2, "--manifest", manifest],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, env=env)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + seconds(120)
    try:
        while True:
            if time.monotonic() > deadline:
                p.kill()
                raise Failure(f"tether ota did not end; terminal so far: {out[-2000:]!r}")
            ready, _, _ = select.select([master], [], [], 1)
            if not ready:
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the CLI exited and the terminal is gone
                break
            if not chunk:
                break
            out += chunk
        p.wait(30)
        stdout = p.stdout.read().decode()
    finally:
        os.close(master)
        srv.close()
    text = out.decode(errors="replace")
    expect(p.returncode == 0, f"tether ota exit {p.returncode}: {text[-2000:]}")
    expect(re.search(r"uploading\s+\[#+\]\s+100%", text), f"no finished upload bar: {text[-2000:]}")
    shown = [int(x) for x in re.findall(r"downloading\s+\[[#.]+\]\s+(\d+)%", text)]
    part = CUT * 100 // len(data)
    expect(part in shown, f"the download bar never showed the stalled {part}% (shown: {shown})")
    print(f"# download bar showed {sorted(set(shown))} %")
    states = re.findall(r"Job [0-9a-f]{16}: ([a-z-]+)", text)
    want = ["downloaded", "installing", "installed", "trial", "committed"]
    live = [s for s in states if s in want]
    expect(reported_in_order(live, want) and live[-1:] == ["committed"],
           f"live states {states}, expected some of {want} in order, ending with committed")
    expect(" committed " in stdout, f"final line: {stdout!r}")


def test_partial_file_changed_on_disk(w):
    """Killed after a checkpoint; the partial file is damaged before the
    restart: its prefix no longer matches, the download starts over."""
    needs_fault_injection()
    o = OtaWorld(w)
    o.start_cloud()
    o.install_v1()
    flag = w.path("crash-once")
    open(flag, "w").close()
    a = o.start_agent(env={"TETHER_OTA_CRASH_AT": "download-checkpoint", "TETHER_OTA_CRASH_ONCE": flag})
    o.seed(o.v1)
    v2 = plugin_deb(o.debs, "2.0", filler=10 * MB)
    job = o.start_job(o.sign(v2, o.upload(v2)))
    a.proc.wait(60)
    part = os.path.join(o.state, "download.part")
    with open(part, "r+b") as f:
        f.seek(1000)
        b = f.read(1)
        f.seek(1000)
        f.write(bytes([b[0] ^ 0xff]))
    a.killed = True
    a2 = o.start_agent(name="agent2", device=o.device())
    a2.wait_line(r"starting the download over: the partial file no longer matches its checkpointed SHA-256")
    j = o.wait_job(job)
    expect(j["state"] == "committed", f"ended {j['state']}: {j.get('reason')}")


def test_ca_is_pinned(w):
    """A server with a certificate from another CA (for the right name):
    the download fails, the job ends failed, nothing is installed."""
    o, v2, data = world(w)
    other = w.path("other-pki")
    w.pki("ca", other)
    w.pki("server", other, "localhost", "127.0.0.1")
    srv = FakeServer(w, data, "drop", cert=os.path.join(other, "server.crt"), key=os.path.join(other, "server.key"))
    try:
        job = o.start_job(o.sign(v2, srv.url))
        j = o.wait_job(job, timeout=90)
        expect(j["state"] == "failed" and j["code"] == "download", f"ended {j['state']}/{j.get('code')}")
        expect(not srv.requests, f"the agent talked HTTP to an untrusted server: {srv.requests}")
        expect(o.installed() == "1.0 ii", "something was installed")
    finally:
        srv.close()


def test_artifact_server_wants_client_certificates(w):
    o, v2, data = world(w)
    url = o.upload(v2)
    ca = w.path("pki", "ca.crt")
    r = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", ca, url],
                       capture_output=True, text=True)
    expect(r.stdout == "403", f"without a client certificate: {r.stdout} {r.stderr}")
    dev = o.device()
    r = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", ca, "--cert", dev[1],
                        "--key", dev[2], "-r", "100-", url], capture_output=True, text=True)
    expect(r.stdout == "206", f"with the device certificate and a range: {r.stdout} {r.stderr}")
    other = w.path("rogue")
    w.pki("ca", other)
    rogue = w.new_device(other)
    r = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", ca, "--cert", rogue[1],
                        "--key", rogue[2], url], capture_output=True, text=True)
    expect(r.stdout == "403", f"with a certificate from another CA: {r.stdout} {r.stderr}")


if __name__ == "__main__":
    sys.exit(run([test_dropped_connection_resumes, test_range_ignored_restarts, test_etag_changed_restarts,
                  test_etag_changed_on_206_restarts, test_416_restarts, test_stall_times_out_and_resumes,
                  test_progress_reaches_the_cli, test_partial_file_changed_on_disk, test_ca_is_pinned, test_artifact_server_wants_client_certificates],
                 emulated="its stall and resume timing is set for native speed"))
