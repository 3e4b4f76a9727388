#!/usr/bin/env python3
"""The agent comes back by itself when the cloud goes away."""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import expect, run  # noqa: E402


def test_cloud_restart(w):
    w.start_cloud()
    a = w.start_agent()
    dev = a.device_id
    coap, api = w.coap_port, w.api_port
    for i in range(3):
        w.cloud.kill() if i % 2 else w.cloud.stop()
        mark = w.notify.mark()
        t0 = time.monotonic()
        w.start_cloud(port=coap, api_port=api)
        w.wait_online(dev, mark)
        # ReconnectMaxSec=2 in the harness: back within the longest backoff
        # plus a handshake, with room for a loaded machine.
        took = time.monotonic() - t0
        print(f"# restart {i + 1}: device back online after {took:.2f} s")
        expect(took < 5 * (10 if os.environ.get('TETHER_TEST_WRAPPER') else 1),
               f"took {took:.2f} s to come back")
        r = w.tether("call", dev, "add", f"{i},1")
        expect(r.stdout.strip() == str(i + 1), f"call after restart returned {r.stdout!r}")


if __name__ == "__main__":
    sys.exit(run([test_cloud_restart], emulated="ok"))
