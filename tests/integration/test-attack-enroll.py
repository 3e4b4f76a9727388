#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Attacks on enrollment and renewal (docs/enrollment.md, docs/protocol.md
"Enrollment and renewal", docs/security.md "Enrollment"): what a device,
a holder of a provisioning token or anyone reaching the device port
without a certificate tries, with real processes."""

import importlib.util
import json
import os
import socket
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from fakedev import CONTENT_FORMAT, CREATED, POST, codestr, memory_checks, rss_kb, uint  # noqa: E402
from harness import api_json, expect, run, seconds  # noqa: E402

# The helpers of the enrollment tests: starting a cloud with [Enroll],
# provisioning tokens, keys and CSRs, anonymous sessions.
_spec = importlib.util.spec_from_file_location("enroll_cloud", os.path.join(HERE, "test-enroll-cloud.py"))
ec = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ec)


def test_reissue_keeps_tags(w):
    """An enrolled device asking again with its own key and another valid
    token (a lost answer's retry) gets its certificate again, but not the
    other token's tags: the tags are those of the token that enrolled it."""
    ec.start(w)
    tok_a, _ = ec.token(w, tags={"site": "a"})
    tok_b, pid_b = ec.token(w, tags={"site": "b", "role": "admin"})
    key, csr = ec.key_csr(w, "t", "dev-t")
    m, d = ec.enroll(w, tok_a, csr)
    ec.ok_cert(w, m, "t", "dev-t", key)
    d.close()
    m, d = ec.enroll(w, tok_b, csr)
    d.close()
    expect(m.code == CREATED, f"reissue: {codestr(m.code)} {m.payload!r}")
    st, desc = api_json(w, "GET", "/v1/devices/dev-t")
    expect(st == 200 and desc["tags"] == {"site": "a"}, f"tags changed by another token: {desc.get('tags')}")
    st, p = api_json(w, "GET", "/v1/provision/" + pid_b)
    expect(st == 200 and p["uses"] == 0, f"token b: {p}")


def closed(d, timeout):
    """Whether the cloud closes d within timeout (what it sends first is read and dropped)."""
    d.s.settimeout(timeout)
    try:
        while d.s.recv(65536):
            pass
    except socket.timeout:
        return False
    except OSError:  # a reset, or ssl's EOF without close_notify
        pass
    return True


def test_anonymous_big_message(w):
    """A session without a certificate announcing a message of megabytes
    (libcoap takes up to 8 MiB over TCP) is closed at its header: the cloud
    buffers no more than an enrollment needs, however many such sessions
    there are. A body a little over the limit of POST /enroll is still
    answered 4.13."""
    ec.start(w, timeout=30)
    pid = w.cloud.proc.pid
    base = rss_kb(pid)
    n = 8 * 1024 * 1024 - 16
    header = bytes([(15 << 4) | 1]) + (n - 65805).to_bytes(4, "big") + bytes([POST]) + b"\x01"
    chunk = b"\xb6enroll\xff" + b"a" * (1 << 20)
    sessions = []
    for _ in range(12):
        d = ec.session(w)
        sent = 0
        try:
            d.send(header)
            for _ in range(7):
                d.send(chunk)
                sent += 1
        except OSError:
            pass
        sessions.append((d, sent))
    grown = rss_kb(pid) - base
    for d, _ in sessions:
        expect(closed(d, seconds(10)), "closed")
        d.close()
    if memory_checks(pid):
        expect(grown < 40 * 1024, f"the cloud grew by {grown} kB for 12 anonymous sessions' messages")
    # The limit leaves room for what POST /enroll refuses itself.
    d = ec.session(w)
    t = d.request(POST, "enroll", json.dumps({"token": "x", "csr": "a" * 18000}).encode(),
                  [(CONTENT_FORMAT, uint(50))])
    m = d.response(t, timeout=seconds(10))
    expect(m.code == (4 << 5 | 13), f"18000 bytes: {codestr(m.code)} {m.payload!r}")
    d.close()


if __name__ == "__main__":
    sys.exit(run([test_reissue_keeps_tags, test_anonymous_big_message], emulated="ok"))
