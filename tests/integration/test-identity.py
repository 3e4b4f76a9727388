#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""The device ID is the single commonName of the verified leaf certificate
(lib/tls.c), not libcoap's guess: certificates that tried to pass as
another device are refused at the handshake, the real device keeps its
session, and refusals are logged with the certificate's details, once per
address and interval (docs/security.md)."""
import os
import socket
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Failure, expect, poll, run, seconds  # noqa: E402
from fakedev import connect, refused  # noqa: E402


def make_cert(w, name, subject, san=None):
    """A certificate from the test CA with the given subject (OpenSSL
    -subj syntax) and DNS subjectAltNames; returns (cert, key)."""
    d = w.path("forged")
    os.makedirs(d, exist_ok=True)
    key, csr, crt, ext = (os.path.join(d, name + s) for s in (".key", ".csr", ".crt", ".ext"))
    with open(ext, "w") as f:
        f.write("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n")
        if san:
            f.write("subjectAltName=" + ",".join("DNS:" + s for s in san) + "\n")
    for argv in (["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key],
                 ["openssl", "req", "-new", "-key", key, "-subj", subject, "-multivalue-rdn", "-out", csr],
                 ["openssl", "x509", "-req", "-in", csr, "-CA", w.path("pki", "ca.crt"),
                  "-CAkey", w.path("pki", "ca.key"), "-set_serial", str(0x7e57 + len(name)), "-days", "2",
                  "-extfile", ext, "-out", crt]):
        r = subprocess.run(argv, capture_output=True, text=True)
        if r.returncode != 0:
            raise Failure(f"{' '.join(argv[:2])}: {r.stderr.strip()}")
    return crt, key


def online(w, dev_id):
    r = w.tether("get", dev_id, check=False)
    return r.returncode == 0 and '"connected": true' in r.stdout.replace('":true', '": true')


def test_forged_identities_refused(w):
    w.start_cloud()
    victim, victim_id = connect(w)
    cases = [
        ("san", "/CN=mallory-san", [victim_id]),        # libcoap took the DNS SAN first
        ("ou", f"/OU=xCN={victim_id}", None),            # libcoap found "CN=" inside the OU
        ("two", f"/CN={victim_id}+CN=mallory-two", None),  # two CNs
        ("none", "/O=tether test", None),
        ("bad", "/CN=not a valid id!", None),
    ]
    for name, subject, san in cases:
        cert, key = make_cert(w, name, subject, san)
        mark = w.cloud.mark()
        expect(refused(w, cert, key), f"certificate {subject} {san or ''} was accepted")
        w.cloud.wait_line(r"Refused a session from 127\.0\.0\.1:\d+: .*serial 7E5", timeout=10, start=mark)
    # The victim kept its one session throughout and still answers.
    expect(w.cloud.count(f"Device '{victim_id}' connected") == 1, "the victim was kicked")
    victim.publish("still/here")
    line = [ln for ln in w.cloud.lines if "DNS subjectAltName differs" in ln]
    expect(line and "subject 'CN=mallory-san'" in line[0] and "issuer '" in line[0],
           f"the refusal does not name subject and issuer: {line}")
    expect(w.cloud.count("has more than one commonName") == 1, "two CNs: no reason logged")
    expect(w.cloud.count("has no commonName; certificate subject 'O=tether test'") == 1, "no CN: no reason logged")
    expect(w.cloud.count("is not a valid device ID") == 1, "bad CN: no reason logged")
    victim.close()


def test_cn_beside_ou_text(w):
    """A certificate with a real CN and "CN=" text in another attribute is
    the device its CN names, never the text."""
    w.start_cloud()
    victim, victim_id = connect(w)
    cert, key = make_cert(w, "ou-cn", f"/OU=xCN={victim_id}/CN=mallory-ou")
    d, got = connect(w, ("mallory-ou", cert, key))
    expect(got == "mallory-ou", got)
    expect(w.cloud.count(f"Device '{victim_id}' connected") == 1, "the victim was kicked")
    d.close()
    victim.close()


def test_san_equal_to_cn_accepted(w):
    w.start_cloud()
    cert, key = make_cert(w, "same", "/CN=gw-same", ["gw-same"])
    d, _ = connect(w, ("gw-same", cert, key))
    d.close()


def test_unverified_chain_named(w):
    """A certificate the chain check refuses (another CA) is logged with its
    subject, issuer, serial and OpenSSL's reason, like the others."""
    w.start_cloud()
    victim, victim_id = connect(w)
    d = w.path("other-ca")
    os.makedirs(d)
    for argv in (["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                  "-keyout", f"{d}/ca.key", "-out", f"{d}/ca.crt", "-subj", "/CN=rogue CA", "-days", "2"],
                 ["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                  "-keyout", f"{d}/leaf.key", "-out", f"{d}/leaf.csr", "-subj", f"/CN={victim_id}"],
                 ["openssl", "x509", "-req", "-in", f"{d}/leaf.csr", "-CA", f"{d}/ca.crt", "-CAkey", f"{d}/ca.key",
                  "-set_serial", "0xbadca", "-days", "2", "-out", f"{d}/leaf.crt"]):
        r = subprocess.run(argv, capture_output=True, text=True)
        if r.returncode != 0:
            raise Failure(f"{' '.join(argv[:2])}: {r.stderr.strip()}")
    mark = w.cloud.mark()
    expect(refused(w, f"{d}/leaf.crt", f"{d}/leaf.key"), "a certificate from another CA was accepted")
    line = w.cloud.wait_line(r"Refused a session from 127\.0\.0\.1", timeout=10, start=mark)
    for want in ("the certificate was not verified: unable to get local issuer certificate",
                 f"subject 'CN={victim_id}'", "issuer 'CN=rogue CA'", "serial 0BADCA"):
        expect(want in line, f"'{want}' not in: {line}")
    expect(w.cloud.count(f"Device '{victim_id}' connected") == 1, "the victim was kicked")
    victim.close()


def test_refusals_rate_limited(w):
    """Many refused handshakes from one address: one log line names the
    first, the rest are counted, not logged one by one."""
    w.start_cloud()
    cert, key = make_cert(w, "flood", "/O=flood")
    mark = w.cloud.mark()
    for _ in range(60):
        expect(refused(w, cert, key), "accepted")
    # The 60th refusal has been handled once a later connection is served.
    d, _ = connect(w)
    d.close()
    n = w.cloud.count("Refused a session from", start=mark)
    expect(n == 1, f"{n} refusal lines for 60 refusals from one address")
    expect(w.cloud.count("libcoap:", start=mark) < 5, "libcoap logs each refusal")
    # Another address is logged on its own.
    raw = socket.socket()
    raw.bind(("127.0.0.2", 0))
    raw.settimeout(seconds(10))
    raw.connect(("127.0.0.1", w.coap_port))
    raw.sendall(b"GET / HTTP/1.0\r\n\r\n")
    try:
        raw.recv(100)
    except OSError:
        pass
    raw.close()
    poll(lambda: w.cloud.count("Refused a session from 127.0.0.2", start=mark) == 1, 10,
         "the refusal from another address")


if __name__ == "__main__":
    sys.exit(run([test_forged_identities_refused, test_cn_beside_ou_text, test_san_equal_to_cn_accepted,
                  test_unverified_chain_named, test_refusals_rate_limited]))
