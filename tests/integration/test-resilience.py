#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""The agent comes back by itself when the cloud goes away, and connects
by itself once its certificate files appear."""

import os
import re
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import expect, run, seconds  # noqa: E402


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
        expect(took < seconds(5), f"took {took:.2f} s to come back")
        r = w.tether("call", dev, "add", f"{i},1")
        expect(r.stdout.strip() == str(i + 1), f"call after restart returned {r.stdout!r}")


def missing_at_start(w, which):
    """Start the agent with one of its TLS files missing: it must say so,
    keep retrying with its backoff (the CA, the key), or wait, not
    enrolled, without trying (the certificate), and connect once the file
    is there, with no restart or reload."""
    w.start_cloud()
    device = w.new_device()
    files = {"ca": w.path("pki", "ca.crt"), "cert": device[1], "key": device[2]}
    late = w.path("late", os.path.basename(files[which]))
    files[which] = late
    os.makedirs(w.path("late"))
    a = w.start_agent(device=(device[0], files["cert"], files["key"]), ca=files["ca"], wait_online=False)
    if which == "cert":
        a.wait_line("Not enrolled: waiting for a provisioning token")
    else:
        failure = rf"cannot read '{re.escape(late)}': No such file or directory\); retrying in"
        a.wait_line(failure)
        a.wait_line(failure, start=a.mark())  # and again, after its backoff
    mark = w.notify.mark()
    src = w.path("pki", "ca.crt") if which == "ca" else device[1] if which == "cert" else device[2]
    shutil.copy(src, late + ".tmp")
    os.rename(late + ".tmp", late)
    w.wait_online(device[0], mark)
    if which == "cert":
        a.wait_line(f"A certificate for device '{device[0]}' appeared")
    r = w.tether("call", device[0], "add", "2,3")
    expect(r.stdout.strip() == "5", f"call returned {r.stdout!r}")


def test_ca_missing_at_start(w):
    missing_at_start(w, "ca")


def test_certificate_missing_at_start(w):
    missing_at_start(w, "cert")


def test_key_missing_at_start(w):
    missing_at_start(w, "key")


def test_ca_missing_on_reconnect(w):
    """The CA file goes away while the agent is connected and the cloud
    restarts: the agent keeps retrying until the file is back."""
    ca = w.path("agent-ca.crt")
    shutil.copy(w.path("pki", "ca.crt"), ca)
    w.start_cloud()
    a = w.start_agent(ca=ca)
    coap, api = w.coap_port, w.api_port
    os.rename(ca, ca + ".away")
    mark = a.mark()
    w.cloud.stop()
    w.start_cloud(port=coap, api_port=api)
    failure = rf"cannot read '{re.escape(ca)}': No such file or directory\); retrying in"
    a.wait_line(failure, start=mark)
    a.wait_line(failure, start=a.mark())
    mark = w.notify.mark()
    os.rename(ca + ".away", ca)
    w.wait_online(a.device_id, mark)


if __name__ == "__main__":
    sys.exit(run([test_cloud_restart, test_ca_missing_at_start, test_certificate_missing_at_start,
                  test_key_missing_at_start, test_ca_missing_on_reconnect], emulated="ok"))
