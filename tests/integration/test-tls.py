#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Mutual TLS: who may connect to whom."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import expect, run, with_threads, in_loop  # noqa: E402


def device_listed(w, dev):
    devices = json.loads(w.tether("list", "--json").stdout)
    return any(d.get("id") == dev for d in devices)


def test_device_from_other_ca_refused(w):
    w.pki("ca", w.path("rogue"))
    w.start_cloud()
    good = w.start_agent("good")  # the cloud works for a real device
    bad = w.start_agent("rogue", device=w.new_device(w.path("rogue")), wait_online=False)
    bad.wait_line(r"Disconnected from .*(TLS|closed)")
    expect(not device_listed(w, bad.device_id), "device with a rogue certificate was accepted")
    expect(device_listed(w, good.device_id), "good device missing")


def test_cloud_with_wrong_host_name_refused(w):
    # A server certificate from the right CA, for another name.
    os.makedirs(w.path("wrong"), exist_ok=True)
    for f in ("ca.crt", "ca.key"):
        os.link(w.path("pki", f), w.path("wrong", f))
    w.pki("server", w.path("wrong"), "cloud.invalid")
    w.start_cloud(cert=w.path("wrong", "server.crt"), key=w.path("wrong", "server.key"))
    a = w.start_agent(wait_online=False)
    a.wait_line(r"Disconnected from localhost.*certificate \(CN 'cloud.invalid'\) does not match host name 'localhost'")
    expect(not device_listed(w, a.device_id), "agent talked to a cloud with the wrong name")


def test_cloud_from_unknown_ca_refused(w):
    w.pki("ca", w.path("other"))
    w.start_cloud()
    a = w.start_agent(wait_online=False, ca=w.path("other", "ca.crt"))
    a.wait_line(r"Disconnected from .*TLS")
    expect(not device_listed(w, a.device_id), "agent trusted a cloud from an unknown CA")


if __name__ == "__main__":
    sys.exit(run([test_device_from_other_ca_refused, test_cloud_with_wrong_host_name_refused,
                  test_cloud_from_unknown_ca_refused, with_threads(test_device_from_other_ca_refused),
                  in_loop(test_device_from_other_ca_refused)],
                 emulated="ok"))
