#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Attacks on enrollment and renewal (docs/enrollment.md, docs/protocol.md
"Enrollment and renewal", docs/security.md "Enrollment"): what a device,
a holder of a provisioning token or anyone reaching the device port
without a certificate tries, with real processes."""

import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from fakedev import CREATED, codestr  # noqa: E402
from harness import api_json, expect, run  # noqa: E402

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


if __name__ == "__main__":
    sys.exit(run([test_reissue_keeps_tags], emulated="ok"))
