#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""bench-journal: events per second from N fake devices (fakedev.py, each
publishing with seq=/epoch= as tetherd does, a window of W events in
flight) to one SSE subscriber, through the file journal (one node) and
through the cluster's JetStream journal (docs/cluster.md: one node, on one
nats-server R1 and on three nats-servers R3). The clock runs from the
first publish to the last event read by the subscriber; every event must
arrive once. min/median/max of R runs.

    top_builddir=$PWD/build top_srcdir=$PWD tests/bench/bench-journal.py [--devices N] [--events E] [--reps R]
"""

import argparse
import os
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))
import fakedev  # noqa: E402
from harness import EventStream, World  # noqa: E402
from natskit import NatsCluster  # noqa: E402


def device_run(w, dev, events, window, errors):
    """Publish events numbered 1..events as POST /e/bench?epoch=&seq=,
    window at a time, each acknowledged 2.01."""
    d = dev
    epoch = f"{int.from_bytes(os.urandom(8), 'big'):016x}"
    sent = acked = 0
    tokens = {}
    try:
        while acked < events:
            while sent < events and sent - acked < window:
                sent += 1
                t = d.request(fakedev.POST, "e/bench/" + d.id[:6], str(sent).encode(),
                              query=(f"epoch={epoch}", f"seq={sent}"))
                tokens[t] = sent
            m = d.recv(timeout=30)
            if m.token in tokens:
                if m.code != fakedev.CREATED:
                    raise RuntimeError(f"publish answered {fakedev.codestr(m.code)}")
                del tokens[m.token]
                acked += 1
    except Exception as e:  # noqa: BLE001 - reported by the main thread
        errors.append(repr(e))


def run_once(mode, devices, events, window):
    w = World()
    try:
        extra = ""
        if mode != "file":
            nats = NatsCluster(w, 1 if mode == "nats-1" else 3, mqtt=False)
            nats.wait_ready()
            extra = f"[Cluster]\nNATS={nats.url}\nNode=bench\nReplicas={1 if mode == 'nats-1' else 3}\n"
        w.start_cloud(extra=extra + "[Events]\nDeviceEventRate=0\n")
        devs = [fakedev.connect(w)[0] for _ in range(devices)]
        s = EventStream(w, "bench/")
        total = devices * events
        errors = []
        threads = [threading.Thread(target=device_run, args=(w, d, events, window, errors)) for d in devs]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        s.wait(lambda m: len(s.messages) >= total or errors, 600, f"{total} events")
        took = time.monotonic() - t0
        for t in threads:
            t.join()
        if errors:
            raise RuntimeError(errors[0])
        got = [(m["data"]["coreid"], int(m["data"]["data"])) for m in s.messages]
        if len(got) != total or len(set(got)) != total:
            raise RuntimeError(f"{len(got)} events for {total}, {len(got) - len(set(got))} twice")
        return total / took
    finally:
        w.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--events", type=int, default=1000, help="per device")
    ap.add_argument("--window", type=int, default=8, help="publishes in flight per device")
    ap.add_argument("--reps", type=int, default=3)
    opts = ap.parse_args()
    modes = ("file", "nats-1", "nats-3")
    results = {m: [] for m in modes}
    for _ in range(opts.reps):
        for mode in modes:
            results[mode].append(run_once(mode, opts.devices, opts.events, opts.window))
    print(f"{opts.devices} devices x {opts.events} events (window {opts.window}) to one SSE subscriber, "
          f"{opts.reps} interleaved runs")
    print(f"{'journal':26} {'min':>8} {'median':>8} {'max':>8}  events/s")
    names = {"file": "file (one node)", "nats-1": "JetStream, 1 server R1", "nats-3": "JetStream, 3 servers R3"}
    for mode, rates in results.items():
        print(f"{names[mode]:26} {min(rates):8.0f} {statistics.median(rates):8.0f} {max(rates):8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
