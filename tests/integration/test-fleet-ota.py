#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""The fleet simulator's update jobs (tests/bench/fleet --ota), which the
campaign benchmark (tests/bench/bench-campaign.py) drives: simulated
devices take a job the cloud sends (POST /o/JOB), report accepted ..
committed with growing seq, or rolled-back with its code for
--ota-fail-percent 100, and the cloud records each job's final state.
With --ota-skip-download against any cloud; the download over the
device's session (GET /a/SHA256, Block2) only against a cloud that serves
it (skipped otherwise, with the reason)."""

import os
import queue
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import BUILD, EMULATOR, Failure, Skip, api_json, expect, poll, run, seconds  # noqa: E402

FLEET = os.path.join(BUILD, "tests", "bench", "fleet")
FINAL = ("committed", "rolled-back", "rejected", "failed", "deferred")


class Fleet:
    """fleet --ota hold for devices [first, first + n) of the cache."""

    def __init__(self, w, n, first=0, *opts):
        if not os.access(FLEET, os.X_OK):
            raise Failure(f"{FLEET} is not built (make check builds it)")
        self.lines = queue.Queue()
        self.log = open(w.path(f"fleet-{first}.log"), "w")
        self.proc = subprocess.Popen(
            EMULATOR + [FLEET, "--cloud", f"127.0.0.1:{w.coap_port}", "--server-name", "localhost",
                        "--ca-cert", w.path("pki", "ca.crt"), "--ca-key", w.path("pki", "ca.key"),
                        "--cache", w.path("fleet"), "--devices", str(n), "--first", str(first), "--workers", "1",
                        "--connect-timeout", str(seconds(30)), "--timeout", str(seconds(60)),
                        "--ota", "--ota-install-sec", "0.2", *opts, "hold"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        w.cleanups.append(self.close)
        threading.Thread(target=self._read, daemon=True).start()
        self.wait("online", 60)
        with open(w.path("fleet", "index")) as f:
            self.ids = [line.strip() for line in f][first:first + n]

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait(self, word, timeout):
        deadline = time.monotonic() + seconds(timeout)
        while True:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise Failure(f"timed out waiting for fleet to print '{word}'") from None
            if line is None:
                raise Failure(f"fleet exited ({self.proc.wait()}) before printing '{word}'")
            fields = line.split()
            if fields and fields[0] == "incomplete":
                raise Failure(f"fleet gave up: {line}")
            if fields and fields[0] == word:
                return dict(f.split("=", 1) for f in fields[1:] if "=" in f)

    def ota(self, done):
        """The counts of the 'ota' command once done(counts) holds: the
        workers pass them to fleet's parent every 100 ms."""
        last = {}

        def ask():
            nonlocal last
            self.proc.stdin.write("ota\n")
            self.proc.stdin.flush()
            last = self.wait("ota", 10)
            return done(last)
        try:
            poll(ask, 10, "fleet's OTA counts", interval=0.2)
        except Failure:
            raise Failure(f"fleet's OTA counts: {last}") from None
        return last

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(seconds(10))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def make_deb(w, size):
    root = w.path("pkg")
    os.makedirs(os.path.join(root, "DEBIAN"))
    os.makedirs(os.path.join(root, "usr", "share", "fleet-test"))
    with open(os.path.join(root, "DEBIAN", "control"), "w") as f:
        f.write("Package: fleet-test\nVersion: 1.0\nArchitecture: all\n"
                "Maintainer: test <test@example.org>\nDescription: random data\n")
    with open(os.path.join(root, "usr", "share", "fleet-test", "blob"), "wb") as f:
        f.write(os.urandom(size))
    deb = w.path("fleet-test_1.0_all.deb")
    subprocess.run(["dpkg-deb", "-Znone", "--root-owner-group", "--build", root, deb], check=True,
                   stdout=subprocess.DEVNULL)
    return deb


def start(w, deb, device, url=None):
    """Sign a manifest for device and start its job (PUT /v1/devices/ID);
    the job's id."""
    args = ["ota", "sign", deb, "--key", w.path("update.key"), "--device", device]
    if url:
        args += ["--url", url]
    r = w.tether(*args, check=False)
    if r.returncode != 0 and not url and "--url" in r.stderr:
        raise Skip("tether ota sign cannot sign without --url here (manifests without url are not in this build)")
    expect(r.returncode == 0, f"tether ota sign: {r.stderr}")
    status, body = api_json(w, "PUT", f"/v1/devices/{device}", {"manifest": r.stdout})
    expect(status == 200 and body.get("job"), f"PUT /v1/devices/{device}: {status} {body}")
    return body["job"]["job"]


def wait_final(w, job):
    def final():
        status, body = api_json(w, "GET", f"/v1/ota/jobs/{job}")
        return body if status == 200 and body.get("state") in FINAL else None
    return poll(final, 30, f"job {job} to end")


def setup(w):
    w.start_cloud(extra=f"[OTA]\nArtifactDirectory={w.path('artifacts')}\n")
    os.makedirs(w.path("keys"))
    w.tether("ota", "keygen", w.path("update.key"), w.path("keys", "update.pem"))


def test_reports(w):
    setup(w)
    deb = make_deb(w, 4096)
    ok = Fleet(w, 2, 0, "--ota-skip-download")
    bad = Fleet(w, 1, 2, "--ota-skip-download", "--ota-fail-percent", "100")
    url = "https://127.0.0.1:9/fleet-test_1.0_all.deb"  # never fetched: --ota-skip-download
    jobs = {d: start(w, deb, d, url) for d in ok.ids + bad.ids}
    for d, job in jobs.items():
        j = wait_final(w, job)
        if d in ok.ids:
            expect(j["state"] == "committed", f"device {d}: {j}")
        else:
            expect(j["state"] == "rolled-back" and j.get("code") == "health", f"device {d}: {j}")
    ok.ota(lambda s: s["jobs"] == "2" and s["committed"] == "2" and s["reports_refused"] == "0")
    bad.ota(lambda s: s["jobs"] == "1" and s["rolled_back"] == "1" and s["reports_refused"] == "0")
    # A job again after the last one ended.
    j = wait_final(w, start(w, deb, ok.ids[0], url))
    expect(j["state"] == "committed", f"second job: {j}")


def test_download_over_session(w):
    setup(w)
    size = 300 * 1000
    deb = make_deb(w, size)
    w.tether("ota", "upload", deb)
    fleet = Fleet(w, 2, 0)
    jobs = {d: start(w, deb, d) for d in fleet.ids}
    for d, job in jobs.items():
        j = wait_final(w, job)
        if j["state"] == "failed" and "GET /a/" in (j.get("reason") or ""):
            raise Skip(f"this cloud does not serve artifacts over the device's session: {j.get('reason')}")
        expect(j["state"] == "committed", f"device {d}: {j}")
    fleet.ota(lambda s: s["downloaded"] == "2" and int(s["bytes"]) == 2 * os.path.getsize(deb)
              and s["restarts"] == "0" and s["committed"] == "2")


if __name__ == "__main__":
    sys.exit(run([test_reports, test_download_over_session],
                 emulated="fleet's connect() interposition and many sessions are for the native run"))
