#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""A connect storm against a small cloud: 300 simulated devices
(tests/bench/fleet: one certificate, one libcoap context and one TLS
session each, as tetherd has) start at once. Counts, not timings: every
device is online per GET /v1/devices, fleet saw no failed handshake, and
calls to a few of them work. Deadlines are generous and scaled by
TIME_FACTOR, so a loaded machine passes; a storm that does not converge
fails. Then the session shards (docs/cloud.md, SessionShards=): with 4,
a few dozen devices land in more than one of them (tether_cloud_shard_sessions
in /metrics) and every one answers a call; with 1, all are in shard 0; a
second cloud on a port in use fails to start, with one shard or many
(SO_REUSEPORT must not let it share the port)."""

import http.client
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (BUILD, CLOUDD, EMULATOR, Daemon, Failure, expect, poll, run, seconds,  # noqa: E402
                     in_loop, whole_seconds, with_threads)

FLEET = os.path.join(BUILD, "tests", "bench", "fleet")
DEVICES = 300


class Fleet:
    """tests/bench/fleet in hold mode; its result lines, parsed."""

    def __init__(self, w, n):
        if not os.access(FLEET, os.X_OK):
            raise Failure(f"{FLEET} is not built (make check builds it)")
        self.lines = queue.Queue()
        self.log = open(w.path("fleet.log"), "w")
        self.proc = subprocess.Popen(
            EMULATOR + [FLEET, "--cloud", f"127.0.0.1:{w.coap_port}", "--server-name", "localhost",
                        "--ca-cert", w.path("pki", "ca.crt"), "--ca-key", w.path("pki", "ca.key"),
                        "--cache", w.path("fleet"), "--devices", str(n), "--workers", "2",
                        # A loaded machine may take long for a handshake:
                        # count it, do not give up on it.
                        "--connect-timeout", str(seconds(30)), "--timeout", str(seconds(120)), "hold"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        w.cleanups.append(self.close)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait(self, word, timeout):
        """The next result line starting with word, as {key: value}."""
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

    def command(self, text):
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def ids(self, n):
        with open(os.path.join(self.cache, "index")) as f:
            return [line.strip() for line in f][:n]

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


def api(w, method, path, body=None):
    c = http.client.HTTPConnection("127.0.0.1", w.api_port, timeout=seconds(30))
    headers = {"Authorization": f"Bearer {w.token}"}
    if body is not None:
        body = urllib.parse.urlencode(body)
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    c.request(method, path, body=body, headers=headers)
    r = c.getresponse()
    data = r.read()
    c.close()
    if r.status != 200:
        raise Failure(f"{method} {path}: HTTP {r.status}: {data[:200]!r}")
    return json.loads(data)


def metrics(w):
    """GET /metrics, as text."""
    c = http.client.HTTPConnection("127.0.0.1", w.api_port, timeout=seconds(30))
    c.request("GET", "/metrics", headers={"Authorization": f"Bearer {w.token}"})
    r = c.getresponse()
    text = r.read().decode()
    c.close()
    expect(r.status == 200, f"GET /metrics: HTTP {r.status}")
    return text


def shard_sessions(w):
    """tether_cloud_shard_sessions from GET /metrics, as {shard: count}."""
    found = {}
    for line in metrics(w).splitlines():
        m = re.fullmatch(r'tether_cloud_shard_sessions\{shard="(\d+)"\} (\d+)', line)
        if m:
            found[int(m[1])] = int(m[2])
    return found


def shards_hold_fleet(w, shards, n):
    """n devices with SessionShards=shards: all online, each session in one
    shard, every device answers a call. Returns the sessions per shard."""
    w.start_cloud(extra=f"[Cloud]\nSessionShards={shards}\nHandshakeTimeoutSec={whole_seconds(30)}\n")
    fleet = Fleet(w, n)
    fleet.cache = w.path("fleet")
    online = fleet.wait("online", 120)
    expect(int(online["ever_online"]) == n, f"fleet: {online}")
    ids = sorted(set(fleet.ids(n)))
    expect(len(ids) == n, f"the certificate cache holds {len(ids)} devices, not {n}")

    def all_connected():
        connected = {d["id"] for d in api(w, "GET", "/v1/devices") if d.get("connected")}
        return connected if connected >= set(ids) else None
    poll(all_connected, 30, f"GET /v1/devices to list all {n} devices as connected")
    per_shard = shard_sessions(w)
    print(f"# SessionShards={shards}, {n} devices: sessions per shard {per_shard}")
    expect(sorted(per_shard) == list(range(shards)), f"/metrics has shards {sorted(per_shard)}, not 0..{shards - 1}")
    expect(sum(per_shard.values()) == n, f"{sum(per_shard.values())} sessions in the shards for {n} devices")

    for i, dev in enumerate(ids):
        r = api(w, "POST", f"/v1/devices/{dev}/add", {"arg": f"{i},7"})
        expect(r.get("return_value") == i + 7, f"call to {dev}: {r}")
    fleet.command("quit")
    final = fleet.wait("final", 60)
    expect(final["tls_failures"] == "0" and final["calls"] == str(n), f"fleet: {final}")
    return per_shard


def test_shards_spread(w):
    per_shard = shards_hold_fleet(w, 4, 40)
    used = [k for k, v in per_shard.items() if v > 0]
    expect(len(used) > 1, f"all 40 sessions in shard {used}: the kernel did not spread them")


def test_one_shard(w):
    per_shard = shards_hold_fleet(w, 1, 10)
    expect(per_shard == {0: 10}, f"sessions per shard: {per_shard}")


def test_port_in_use(w):
    w.start_cloud()
    with open(w.path("cloud.conf")) as f:
        conf = f.read()
    expect("\nPort=0\n" in conf, "the test's cloud.conf has no device Port=0 line")
    for shards in (16, 1):
        path = w.path(f"cloud-{shards}.conf")
        with open(path, "w") as f:
            f.write(conf.replace("\nPort=0\n", f"\nPort={w.coap_port}\n", 1)
                    .replace(w.path("cloud-state"), w.path(f"state-{shards}"))
                    + f"[Cloud]\nSessionShards={shards}\n")
        second = Daemon(f"cloud-{shards}", [CLOUDD, "--config", path], w.env(notify=False), w.dir)
        w.daemons.append(second)
        second.wait_line(rf"Failed to listen on '127\.0\.0\.1' port {w.coap_port}", 20)
        rc = second.proc.wait(seconds(20))
        second.killed = True  # its exit status is checked here
        expect(rc != 0, f"a second cloud with SessionShards={shards} on port {w.coap_port} exited {rc}")
        print(f"# SessionShards={shards}: a second cloud on the port in use exited {rc}")


def test_storm(w):
    # Room for the whole storm at once, and handshakes that may be slow.
    w.start_cloud(extra=f"[Cloud]\nMaxHandshakes=1024\nHandshakeTimeoutSec={whole_seconds(30)}\n")
    fleet = Fleet(w, DEVICES)
    fleet.cache = w.path("fleet")
    online = fleet.wait("online", 180)
    expect(int(online["ever_online"]) == DEVICES, f"fleet: {online}")
    for k in ("tls_failures", "tcp_failures"):
        expect(online[k] == "0", f"fleet saw {online[k]} {k.replace('_', ' ')}: {online}")
    ids = set(fleet.ids(DEVICES))
    expect(len(ids) == DEVICES, f"the certificate cache holds {len(ids)} devices, not {DEVICES}")

    # The cloud's view: every one of them connected (it may still be
    # finishing the last describe fetches when fleet counted them).
    def all_connected():
        listed = api(w, "GET", "/v1/devices")
        connected = {d["id"] for d in listed if d.get("connected")}
        return connected if connected >= ids else None
    connected = poll(all_connected, 30, f"GET /v1/devices to list all {DEVICES} devices as connected")
    expect(connected == ids, f"{len(connected - ids)} unexpected devices connected")

    # Once the storm is over (2 s without a connection coming or going),
    # the cloud hands the free memory its handshakes left back.
    def trimmed():
        m = re.search(r"^tether_cloud_memory_trims_total (\d+)$", metrics(w), re.M)
        return int(m[1]) if m and int(m[1]) >= 1 else None
    print(f"# memory trims after the storm: {poll(trimmed, 30, 'tether_cloud_memory_trims_total to count a trim')}")

    for i, dev in enumerate(sorted(ids)[:3]):
        r = api(w, "POST", f"/v1/devices/{dev}/add", {"arg": f"{i},40"})
        expect(r.get("return_value") == i + 40, f"call to {dev}: {r}")

    # Workers report their counters every 0.1 s: ask until the calls show.
    def answered():
        fleet.command("stats")
        stats = fleet.wait("stats", 30)
        return stats if stats["calls"] == "3" else None
    stats = poll(answered, 10, "fleet to count the 3 calls it answered", interval=0.2)
    expect(stats["dropped"] == "0" and stats["online"] == str(DEVICES),
           f"devices were dropped during the test: {stats}")
    fleet.command("quit")
    final = fleet.wait("final", 60)
    expect(final["tls_failures"] == "0", f"fleet: {final}")


if __name__ == "__main__":
    sys.exit(run([test_storm, test_shards_spread, test_one_shard, test_port_in_use, with_threads(test_storm),
                  with_threads(test_port_in_use), in_loop(test_storm)], emulated="300 TLS sessions under qemu-user measure the emulator, not the cloud"))
