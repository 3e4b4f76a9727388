#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""The cloud side of enrollment and renewal (docs/enrollment.md): POST
/enroll on an anonymous TLS session with a provisioning token and a CSR,
POST /cert on a device's session; the built-in signer and an external
SignCommand; the refusals of docs/protocol.md."""

import json
import os
import shlex
import stat
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fakedev import PING, PONG, POST, CREATED, GET, Device, codestr, connect, frame, max_age, refused  # noqa: E402
from harness import EMULATOR, PKI, TETHERCTL, api_json, expect, poll, run, seconds, with_threads, in_loop  # noqa: E402

BUILTIN = "[Enroll]\nCACertificate={ca}\nCAKey={key}\n"


def start(w, extra=None, timeout=None, **kw):
    conf = extra if extra is not None else BUILTIN.format(ca=w.path("pki", "ca.crt"), key=w.path("pki", "ca.key"))
    timing = None
    if timeout:
        timing = f"PingSec=5\nDeviceTimeoutSec=30\nCallTimeoutSec=5\nHandshakeTimeoutSec={timeout}"
    w.start_cloud(extra=conf, timing=timing, **kw)


def token(w, uses=1, **kw):
    st, j = api_json(w, "POST", "/v1/provision", {"uses": uses, **kw})
    expect(st == 201, f"POST /v1/provision: {st} {j}")
    return j["token"], j["id"]


def key_csr(w, name, dev_id):
    key = w.path(name + ".key")
    subprocess.run(EMULATOR + [TETHERCTL, "genkey", key], check=True, capture_output=True)
    r = subprocess.run(EMULATOR + [TETHERCTL, "csr", "--key", key, "--id", dev_id], check=True,
                       capture_output=True, text=True)
    return key, r.stdout


def session(w):
    from fakedev import CSM, CSM_MAX_MESSAGE_SIZE, frame, uint
    d = Device(w.coap_port, None, None, w.path("pki", "ca.crt"))
    d.send(frame(CSM, b"", [(CSM_MAX_MESSAGE_SIZE, uint(1 << 20))]))
    return d


def enroll(w, tok, csr, d=None):
    """POST /enroll; tok None: without a token (a re-enrollment)."""
    d = d or session(w)
    from fakedev import CONTENT_FORMAT, uint
    body = {"csr": csr} if tok is None else {"token": tok, "csr": csr}
    t = d.request(POST, "enroll", json.dumps(body).encode(), [(CONTENT_FORMAT, uint(50))])
    m = d.response(t, timeout=seconds(20))
    return m, d


def ok_cert(w, m, name, dev_id, key):
    expect(m.code == CREATED, f"enroll: {codestr(m.code)} {m.payload!r}")
    j = m.json()
    expect(j["device_id"] == dev_id and j["renew_after"] > j["not_before"] and j["not_after"] > j["renew_after"],
           f"answer: {j}")
    crt = w.path(name + ".crt")
    with open(crt, "w") as f:
        f.write(j["certificate"])
    return crt, j


def text(m):
    return m.payload.decode(errors="replace")


def test_enroll_then_connect(w):
    start(w)
    tok, pid = token(w, tags={"site": "lab"})
    key, csr = key_csr(w, "a", "dev-a")
    m, d = enroll(w, tok, csr)
    crt, j = ok_cert(w, m, "a", "dev-a", key)
    d.close()
    dev, _ = connect(w, ("dev-a", crt, key))
    st, desc = api_json(w, "GET", "/v1/devices/dev-a")
    expect(st == 200 and desc["tags"] == {"site": "lab"}, f"describe: {desc}")
    c = desc["certificate"]
    expect(c["state"] == "valid" and c["issued_by"] == "enroll" and c["renew_after"], f"cert: {c}")
    expect(c["issuer"] and c["issuer"].startswith("CN="), f"issuer: {c}")
    # tether list: CERT fourth, days left; describe: tags and the certificate.
    rows = [line.split() for line in w.tether("list").stdout.splitlines()]
    expect(rows[0][4] == "CERT" and any(r[0] == "dev-a" and r[1] == "online" and r[3] in ("29d", "30d")
                                        for r in rows[1:]), f"tether list: {rows}")
    out = w.tether("describe", "dev-a").stdout
    for want in ("  site=lab", "  state:       valid", "  issued by:   enroll at ", "  issuer:      " + c["issuer"],
                 "  serial:      " + c["serial"]):
        expect(want in out, f"tether describe lacks {want!r}: {out}")
    st, audit = api_json(w, "GET", "/v1/audit?action=device.enroll")
    recs = audit if isinstance(audit, list) else audit.get("records", audit.get("audit", []))
    expect(any(r["target"] == "dev-a" and r["actor"] == "provision:" + pid for r in recs), f"audit: {audit}")
    # The same key again: the same ID, no use consumed (the token is single-use).
    m, d2 = enroll(w, tok, csr)
    expect(m.code == CREATED, f"idempotent retry: {codestr(m.code)} {m.payload!r}")
    # Another key for the same ID: refused.
    _, csr2 = key_csr(w, "a2", "dev-a")
    tok2, _ = token(w)
    m, _ = enroll(w, tok2, csr2)
    expect(m.code == (4 << 5 | 3) and "another key" in text(m), f"takeover: {codestr(m.code)} {text(m)}")
    dev.close()


def test_refused_tokens(w):
    start(w)
    _, csr = key_csr(w, "r", "dev-r")
    m, _ = enroll(w, "tprov_" + "0" * 40, csr)
    expect(m.code == (4 << 5 | 1) and text(m) == "provisioning token unknown", f"unknown: {text(m)}")
    tok, _ = token(w)
    _, csr_other = key_csr(w, "o", "dev-o")
    m, _ = enroll(w, tok, csr_other)
    expect(m.code == CREATED, f"first use: {codestr(m.code)}")
    m, _ = enroll(w, tok, csr)
    expect(m.code == (4 << 5 | 1) and text(m) == "provisioning token used up (1 of 1 uses)", f"used up: {text(m)}")
    tok, pid = token(w)
    st, _ = api_json(w, "DELETE", "/v1/provision/" + pid)
    expect(st in (200, 204), f"revoke: {st}")
    m, _ = enroll(w, tok, csr)
    expect(m.code == (4 << 5 | 1) and text(m) == "provisioning token revoked", f"revoked: {text(m)}")
    tok, pid = token(w, expires_in=1)
    poll(lambda: api_json(w, "GET", "/v1/provision/" + pid)[1].get("state") == "expired", seconds(10),
         "the token's expiry")
    m, _ = enroll(w, tok, csr)
    expect(m.code == (4 << 5 | 1) and text(m) == "provisioning token expired", f"expired: {text(m)}")
    m, _ = enroll(w, "x", csr)
    expect(m.code == (4 << 5 | 1), f"malformed token: {codestr(m.code)}")
    m, _ = enroll(w, tok, "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n")
    expect(m.code == (4 << 5 | 0), f"bad CSR: {codestr(m.code)}")


def test_race_single_use(w):
    start(w)
    tok, _ = token(w)
    csrs = [key_csr(w, f"race{i}", f"race-{i}")[1] for i in range(6)]
    results = [None] * len(csrs)

    def go(i):
        results[i] = enroll(w, tok, csrs[i])[0].code
    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(csrs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expect(results.count(CREATED) == 1, f"exactly one winner: {[codestr(c) for c in results]}")


def test_revoked_device(w):
    start(w)
    key, csr = key_csr(w, "v", "dev-v")
    w.tether("revoke", "dev-v")
    tok, _ = token(w, uses=5)
    m, _ = enroll(w, tok, csr)
    expect(m.code == (4 << 5 | 3) and text(m) == "device 'dev-v' is revoked", f"revoked: {text(m)}")
    w.tether("unrevoke", "dev-v")
    m, _ = enroll(w, tok, csr)
    expect(m.code == CREATED, f"after unrevoke: {codestr(m.code)} {text(m)}")


def test_reenroll(w):
    """POST /enroll without a token: a certificate for the key the registry
    holds for the device, none for any other key or device."""
    from fakedev import CONTENT_FORMAT, uint
    start(w)
    tok, pid = token(w, uses=2)
    key, csr = key_csr(w, "k", "dev-k")
    m, d = enroll(w, tok, csr)
    ok_cert(w, m, "k", "dev-k", key)
    d.close()
    m, d = enroll(w, None, csr)
    crt, j = ok_cert(w, m, "k2", "dev-k", key)
    d.close()
    dev, _ = connect(w, ("dev-k", crt, key))
    st, desc = api_json(w, "GET", "/v1/devices/dev-k")
    expect(desc["certificate"]["issued_by"] == "reenroll" and desc["certificate"]["serial"],
           f"describe: {desc['certificate']}")
    st, prov = api_json(w, "GET", "/v1/provision/" + pid)
    expect(st == 200 and prov["uses"] == 1, f"no token use consumed: {prov}")
    st, audit = api_json(w, "GET", "/v1/audit?action=device.reenroll")
    recs = audit if isinstance(audit, list) else audit.get("records", audit.get("audit", []))
    expect(any(r["target"] == "dev-k" and r["actor"] == "device:dev-k" for r in recs), f"audit: {audit}")
    w.cloud.wait_line("Device 'dev-k' re-enrolled from ")
    # A renewal replaces the key on record: the old key is refused, the new
    # one accepted.
    key_r, csr_r = key_csr(w, "kr", "dev-k")
    t = dev.request(POST, "cert", json.dumps({"csr": csr_r}).encode(), [(CONTENT_FORMAT, uint(50))])
    ok_cert(w, dev.response(t, timeout=seconds(20)), "kr", "dev-k", key_r)
    dev.close()
    m, _ = enroll(w, None, csr)
    expect(m.code == (4 << 5 | 1), f"the key a renewal replaced: {codestr(m.code)} {text(m)}")
    m, _ = enroll(w, None, csr_r)
    ok_cert(w, m, "kr2", "dev-k", key_r)
    csr = csr_r
    # Another key for the ID, an unknown ID: a token is required.
    _, csr_other = key_csr(w, "k3", "dev-k")
    _, csr_unknown = key_csr(w, "k4", "dev-unknown")
    for c in (csr_other, csr_unknown):
        m, _ = enroll(w, None, c)
        expect(m.code == (4 << 5 | 1) and text(m) == "a provisioning token is required",
               f"without token: {codestr(m.code)} {text(m)}")
    # A token that is not a string is still malformed.
    d = session(w)
    t = d.request(POST, "enroll", json.dumps({"token": 5, "csr": csr}).encode(), [(CONTENT_FORMAT, uint(50))])
    m = d.response(t, timeout=seconds(20))
    expect(m.code == (4 << 5 | 0) and "token" in text(m), f"token 5: {codestr(m.code)} {text(m)}")
    d.close()
    # Revoked: the key holder learns it (4.03); another key does not.
    w.tether("revoke", "dev-k")
    m, _ = enroll(w, None, csr)
    expect(m.code == (4 << 5 | 3) and text(m) == "device 'dev-k' is revoked", f"revoked: {codestr(m.code)} {text(m)}")
    m, _ = enroll(w, None, csr_other)
    expect(m.code == (4 << 5 | 1), f"revoked, another key: {codestr(m.code)} {text(m)}")
    # unrevoke forgets the key: a token is needed again.
    w.tether("unrevoke", "dev-k")
    m, _ = enroll(w, None, csr)
    expect(m.code == (4 << 5 | 1) and text(m) == "a provisioning token is required",
           f"after unrevoke: {codestr(m.code)} {text(m)}")
    m, _ = enroll(w, tok, csr)
    expect(m.code == CREATED, f"with a token after unrevoke: {codestr(m.code)} {text(m)}")


def test_anonymous_limits(w):
    start(w, timeout=3)
    d = session(w)
    for method, path in ((GET, "e/x"), (POST, "e/x")):
        t = d.request(method, path)
        m = d.response(t)
        expect(m.code == (4 << 5 | 1) and "may only POST /enroll" in text(m), f"{path}: {codestr(m.code)}")
    # Two requests answered; the session stays (its last answer could still
    # be queued) until a third request, which is refused and closes it.
    t = d.request(POST, "enroll")
    m = d.response(t)
    expect(m.code == (5 << 5 | 3) and "closing" in text(m), f"third request: {codestr(m.code)} {text(m)}")
    d.s.settimeout(seconds(10))
    expect(d.s.recv(100) == b"", "closed after a third request")
    # Pings beyond the limit close it too (their Pongs would queue).
    d = session(w)
    pongs = 0
    try:
        for _ in range(10):
            d.send(frame(PING))
        while True:
            pongs += d.recv_raw(timeout=10).code == PONG
    except (EOFError, OSError):  # closed, possibly with a reset
        pass
    expect(pongs <= 5, f"closed after the Pings allowed: {pongs} Pongs")
    d = session(w)
    t = d.request(POST, "o/job")
    expect(d.response(t).code == (4 << 5 | 1), "/o refused")
    # Then the timeout from accept closes it.
    d.s.settimeout(seconds(10))
    expect(d.s.recv(100) == b"", "closed at HandshakeTimeoutSec")


def test_renew(w):
    start(w)
    tok, _ = token(w)
    key, csr = key_csr(w, "n", "dev-n")
    m, d = enroll(w, tok, csr)
    crt, j = ok_cert(w, m, "n", "dev-n", key)
    dev, _ = connect(w, ("dev-n", crt, key))
    from fakedev import CONTENT_FORMAT, uint
    # Same key as the session: refused; other device's CN: 4.03.
    t = dev.request(POST, "cert", json.dumps({"csr": csr}).encode(), [(CONTENT_FORMAT, uint(50))])
    expect(dev.response(t).code == (4 << 5 | 0), "same key refused")
    _, csr_other = key_csr(w, "x", "other-dev")
    t = dev.request(POST, "cert", json.dumps({"csr": csr_other}).encode(), [(CONTENT_FORMAT, uint(50))])
    m = dev.response(t)
    expect(m.code == (4 << 5 | 3) and text(m) == "the CSR's commonName is not this device's ID", f"CN: {text(m)}")
    key2, csr2 = key_csr(w, "n2", "dev-n")
    # Certificates are dated to the second: let the renewed one be newer
    # (with a margin: the cloud's time() is the kernel's coarse clock, a
    # few milliseconds behind Python's).
    issued = int(time.time())
    while time.time() < issued + 1.2:
        time.sleep(0.05)
    t = dev.request(POST, "cert", json.dumps({"csr": csr2}).encode(), [(CONTENT_FORMAT, uint(50))])
    m = dev.response(t)
    crt2, j2 = ok_cert(w, m, "n2", "dev-n", key2)
    st, desc = api_json(w, "GET", "/v1/devices/dev-n")
    expect(desc["certificate"]["issued_by"] == "renew", f"describe: {desc['certificate']}")
    dev.close()
    dev2, _ = connect(w, ("dev-n", crt2, key2))
    dev2.close()
    # The device has connected with the renewed certificate: the old one
    # (a copied key) is refused from now on, across a restart.
    for restart in (False, True):
        if restart:
            w.cloud.stop()
            start(w, port=w.coap_port, api_port=w.api_port)
        mark = w.cloud.mark()
        expect(refused(w, crt, key), "the superseded certificate connected")
        w.cloud.wait_line("has connected with a newer certificate since this one", start=mark)
    dev3, _ = connect(w, ("dev-n", crt2, key2))
    dev3.close()


def test_renew_queue(w):
    """Renewals arriving together: ENROLL_INLINE_PER_TURN of them are
    signed at once, the rest queued (5.03 with Max-Age 1, nothing
    consumed); sent again, each gets the certificate for its own key."""
    start(w)
    tok, _ = token(w)
    key, csr = key_csr(w, "q", "dev-q")
    m, d = enroll(w, tok, csr)
    crt, _ = ok_cert(w, m, "q", "dev-q", key)
    d.close()
    dev, _ = connect(w, ("dev-q", crt, key))
    from fakedev import CONTENT_FORMAT, path_opts, uint
    pairs = [key_csr(w, f"q{i}", "dev-q") for i in range(4)]
    bodies = [json.dumps({"csr": c}).encode() for _, c in pairs]
    tokens = [dev.token() for _ in pairs]
    # One write: the cloud reads the four requests in one turn of its loop.
    dev.send(b"".join(frame(POST, t, path_opts("cert") + [(CONTENT_FORMAT, uint(50))], b)
                      for t, b in zip(tokens, bodies)))
    first = [dev.response(t, timeout=seconds(20)) for t in tokens]
    codes = [codestr(m.code) for m in first]
    queued = [i for i, m in enumerate(first) if m.code == (5 << 5 | 3)]
    expect(queued and all(m.code in (CREATED, 5 << 5 | 3) for m in first), f"first answers: {codes}")
    expect(all(max_age(first[i]) == 1 for i in queued), "a queued renewal's 5.03 has Max-Age 1")
    answers = dict(enumerate(first))
    for i in queued:
        def again(i=i):
            t = dev.request(POST, "cert", bodies[i], [(CONTENT_FORMAT, uint(50))])
            answers[i] = dev.response(t, timeout=seconds(20))
            return answers[i].code != (5 << 5 | 3)
        poll(again, seconds(20), f"renewal {i} signed", interval=1)
    for i, (k, _) in enumerate(pairs):
        c, _ = ok_cert(w, answers[i], f"q{i}", "dev-q", k)
        pub = subprocess.run(["openssl", "x509", "-noout", "-pubkey", "-in", c], check=True, capture_output=True).stdout
        want = subprocess.run(["openssl", "pkey", "-pubout", "-in", k], check=True, capture_output=True).stdout
        expect(pub == want, f"renewal {i}: the certificate is for its CSR's key")
    dev.close()


SCRIPT = """#!/bin/sh
set -e
case "$TETHER_DEVICE_ID" in
fail-*) echo "no such luck" >&2; echo more >&2; exit 3 ;;
slow-*) exec sleep 60 ;;
wrong-*) cat {wrong} ; exit 0 ;;
esac
out=$(mktemp -d)
{emu}{pki} sign {dir} - --out "$out/c" >/dev/null
cat "$out/c.crt"
rm -r "$out"
"""


def external(w, timeout=2):
    wrong_id, wrong_crt, _ = w.new_device()
    script = w.path("sign.sh")
    with open(script, "w") as f:
        f.write(SCRIPT.format(emu=shlex.join(EMULATOR) + " " if EMULATOR else "", pki=PKI, dir=w.path("pki"),
                                 wrong=wrong_crt))
    os.chmod(script, stat.S_IRWXU)
    start(w, f"[Enroll]\nSignCommand={script}\nSignTimeoutSec={timeout}\n")


def enroll_wait(w, tok, csr):
    """Retry as told by 5.03 Max-Age until an answer."""
    seen = []

    def once():
        m, d = enroll(w, tok, csr)
        d.close()
        if m.code == (5 << 5 | 3):
            expect(max_age(m) >= 1, "5.03 carries Max-Age")
            seen.append(m)
            return None
        return m
    res = []
    poll(lambda: res.append(once()) or res[-1] is not None, seconds(30), "a signed answer", interval=0.5)
    expect(seen, "the first answer was 5.03 (pending)")
    return res[-1]


def test_external(w):
    external(w)
    tok, _ = token(w)
    key, csr = key_csr(w, "e", "ext-1")
    m = enroll_wait(w, tok, csr)
    crt, _ = ok_cert(w, m, "e", "ext-1", key)
    dev, _ = connect(w, ("ext-1", crt, key))
    # Renewal through the command: 5.03 until signed, then the new key's
    # certificate (not "another key").
    from fakedev import CONTENT_FORMAT, uint
    key2, csr2 = key_csr(w, "e2", "ext-1")
    answers = []

    def renew_once():
        t = dev.request(POST, "cert", json.dumps({"csr": csr2}).encode(), [(CONTENT_FORMAT, uint(50))])
        answers.append(dev.response(t, timeout=seconds(20)))
        return answers[-1].code != (5 << 5 | 3)
    poll(renew_once, seconds(30), "a renewal signed by the command", interval=0.5)
    ok_cert(w, answers[-1], "e2", "ext-1", key2)
    expect(answers[0].code == (5 << 5 | 3), f"renewal first pending: {codestr(answers[0].code)}")
    dev.close()
    # Re-enrollment through the command, with the renewed key (the one
    # on record): 5.03 until signed.
    m = enroll_wait(w, None, csr2)
    ok_cert(w, m, "e3", "ext-1", key2)
    # Failing, slow and wrong commands: 5.00 with the reason; no use consumed.
    for dev_id, want in (("fail-1", "exited with status 3: no such luck"), ("slow-1", "did not finish"),
                         ("wrong-1", "is for")):
        _, csr = key_csr(w, dev_id, dev_id)
        tok, _ = token(w)
        m = enroll_wait(w, tok, csr)
        expect(m.code == (5 << 5 | 0) and want in text(m), f"{dev_id}: {codestr(m.code)} {text(m)}")
        st, j = api_json(w, "GET", "/v1/provision")
        expect(st == 200, "provision list")


if __name__ == "__main__":
    sys.exit(run([test_enroll_then_connect, test_refused_tokens, test_race_single_use, test_revoked_device,
                  test_reenroll, test_anonymous_limits, test_renew, test_renew_queue, test_external,
                  with_threads(test_enroll_then_connect), with_threads(test_revoked_device),
                  with_threads(test_anonymous_limits),
                  in_loop(test_revoked_device), in_loop(test_anonymous_limits)], emulated="ok"))
