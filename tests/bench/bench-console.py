#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""bench-console: how fast the web console's fleet page is with a large
fleet (docs/design/benchmarks.md, "The web console"). A cloud with
--devices registered devices (POST /v1/devices, one request each, as an
operator's script would; every tenth tagged with PUT /v1/devices/ID),
no agent; then chromium (tests/browser/bench-fleet.mjs) loads
/console/#/fleet --runs times after one warm-up, and the time from
navigation start to document.body.dataset.ready == "fleet" with 50 rows
shown is given as min/median/max, with the first GET /v1/devices page
as the browser saw it (body bytes, time to its first byte). The same
request from here: its size and server time, min/median/max of 20.

Figures, never pass/fail. Usage (after building, with chromium and
npm ci in tests/browser):

    top_builddir=$PWD/build top_srcdir=$PWD tests/bench/bench-console.py [--devices 10000] [--runs 5]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))
from harness import SRC, World  # noqa: E402

BROWSER_DIR = os.path.join(SRC, "tests", "browser")


def request(w, method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(w.api + path, data=data, method=method,
                                 headers={"Authorization": f"Bearer {w.token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.status, r.read()


def mmm(values, fmt="{:.0f}"):
    return " / ".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=10000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args()
    for need, why in ((args.chromium, "chromium"), (os.path.join(BROWSER_DIR, "node_modules", "puppeteer-core"),
                                                    "npm ci in tests/browser")):
        if not os.path.exists(need):
            print(f"bench-console: {need} is missing ({why})", file=sys.stderr)
            return 77
    w = World()
    try:
        w.start_cloud(extra=f"[API]\nConsole={os.path.join(SRC, 'console')}\nRateLimitPerAddress=0\n"
                            f"RateLimitPerToken=0\n")
        ids = [f"{i:024x}" for i in range(1, args.devices + 1)]
        t0 = time.monotonic()
        with ThreadPoolExecutor(8) as ex:
            list(ex.map(lambda d: request(w, "POST", "/v1/devices", {"id": d}), ids))
            list(ex.map(lambda d: request(w, "PUT", f"/v1/devices/{d}",
                                          {"tags": {"site": f"s{int(d, 16) % 7}", "ring": "early"}}), ids[::10]))
        reg = time.monotonic() - t0
        st, body = request(w, "GET", "/v1/devices?page=1&per_page=1")
        total = json.loads(body)["meta"]["total"]
        times, size = [], 0
        for _ in range(20):
            t = time.monotonic()
            st, body = request(w, "GET", "/v1/devices?page=1&per_page=50")
            times.append((time.monotonic() - t) * 1000)
            size = len(body)
        env = dict(os.environ, TETHER_API=w.api, TETHER_TOKEN=w.token, TETHER_CHROMIUM=args.chromium,
                   TETHER_RUNS=str(args.runs), TETHER_ROWS="50")
        r = subprocess.run(["node", os.path.join(BROWSER_DIR, "bench-fleet.mjs")], env=env, cwd=BROWSER_DIR,
                           capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            print(r.stdout + r.stderr, file=sys.stderr)
            return 1
        runs = json.loads(r.stdout.strip().splitlines()[-1])["runs"]
        ready = [x["ready_ms"] for x in runs]
        dev = [x["devices_request"] for x in runs if x["devices_request"]]
        print(f"devices registered: {total} ({args.devices} by POST /v1/devices in {reg:.1f} s, "
              f"{args.devices // 10} tagged)")
        print()
        print("| figure | min / median / max |")
        print("|---|---|")
        print(f"| navigation start to fleet ready, 50 rows ({len(ready)} runs), ms | {mmm(ready)} |")
        if dev:
            print(f"| first GET /v1/devices in the browser: time to first byte, ms | "
                  f"{mmm([d['wait'] for d in dev], '{:.1f}')} |")
            print(f"| first GET /v1/devices in the browser: body, bytes | {mmm([d['body'] for d in dev])} |")
        print(f"| GET /v1/devices?page=1&per_page=50 from Python (20 times), ms | {mmm(times, '{:.1f}')} |")
        print(f"| its answer, bytes | {size} |")
    finally:
        w.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
