#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Enrollment and renewal, agent side against the real cloud: a device
without a certificate waits without connect attempts; `tetherctl enroll`
with a provisioning token brings it online without a restart; [Enroll]
TokenFile= enrolls at start (a token file others can read is warned
about once); a refused token's reason reaches the user;
the certificate is renewed over the connection while calls run, and
the renewed pair survives a restart; a certificate that expired is
replaced by re-enrolling with its key, without a token; a key and
certificate install interrupted between its renames is completed at the
next start."""

import json
import os
import shlex
import signal
import stat
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import EMULATOR, PKI, TETHERCTL, Failure, api_json, expect, run, seconds, skip  # noqa: E402


def enroll_cloud(w, validity=None):
    """A cloud with the built-in signer ([Enroll] of tether-cloudd.conf)."""
    extra = f"""[Enroll]
CACertificate={w.path('pki', 'ca.crt')}
CAKey={w.path('pki', 'ca.key')}
"""
    if validity:
        extra += f"CertificateValiditySec={validity}\n"
    cloud = w.start_cloud(extra=extra)
    if cloud.count(r"Unknown section \[Enroll\]"):
        skip("this tether-cloudd has no enrollment ([Enroll] of tether-cloudd.conf)")


def provision(w, uses=1):
    """A provisioning token, through the API (POST /v1/provision)."""
    code, body = api_json(w, "POST", "/v1/provision", {"uses": uses})
    expect(code == 201, f"POST /v1/provision: {code} {body}")
    return body["token"]


def new_agent(w, name="agent", dev_id=None, token_file=None, renew=None):
    """An agent without certificate; returns (daemon, cert, key)."""
    cert = w.path(f"{name}.crt")
    key = w.path(f"{name}.key")
    extra = "[Enroll]\n"
    if dev_id:
        extra += f"DeviceID={dev_id}\n"
    if token_file:
        extra += f"TokenFile={token_file}\n"
    if renew:
        extra += f"RenewAfterPercent={renew}\n"
    conf = w.agent_conf(name, cert, key, extra=extra)
    return conf, cert, key


def status(w, a):
    return json.loads(w.tetherctl(a, "status", "--json").stdout)


def test_not_enrolled_waits(w):
    w.start_cloud()
    conf, cert, key = new_agent(w)
    mark = w.notify.mark()
    a = w.run_agent("agent", conf, ("?", cert, key), wait_online=False)
    w.notify.wait(lambda m: m.get("STATUS", "").startswith("Not enrolled"), seconds(10), "STATUS= Not enrolled",
                  mark)
    st = status(w, a)
    expect(st["certificate"] is None, f"certificate: {st['certificate']}")
    expect(st["enrollment"]["state"] == "not-enrolled", f"enrollment: {st['enrollment']}")
    expect("tetherctl enroll" in st["state"], f"state line does not say how to enroll: {st['state']!r}")
    expect(st["counters"]["connect_attempts"] == 0, f"connect attempts without a certificate: {st['counters']}")
    expect(not os.path.exists(key), "a key was made before anyone asked to enroll")
    # A token that cannot be one is refused by the agent itself.
    r = w.tetherctl(a, "enroll", "--token", "bad token", check=False)
    expect(r.returncode == 1 and "printable" in r.stderr, f"bad token: {r.returncode} {r.stderr}")
    r = w.tetherctl(a, "enroll", check=False)
    expect(r.returncode == 2, f"enroll without a token: {r.returncode} {r.stderr}")


def test_tetherctl_enroll(w):
    enroll_cloud(w)
    token = provision(w, uses=1)
    conf, cert, key = new_agent(w, dev_id="gw-enroll-1")
    a = w.run_agent("agent", conf, ("gw-enroll-1", cert, key), wait_online=False)
    w.notify.wait(lambda m: m.get("STATUS", "").startswith("Not enrolled"), seconds(10), "not enrolled")
    r = w.tetherctl(a, "enroll", "--token", token, timeout=60)
    expect("Enrolled as device gw-enroll-1" in r.stdout, f"enroll output: {r.stdout!r} {r.stderr!r}")
    expect("Online after" in r.stdout, f"enroll did not wait for online: {r.stdout!r}")
    expect(oct(os.stat(key).st_mode & 0o777) == "0o600", "the key made is not 0600")
    out = w.tether("call", "gw-enroll-1", "echo", "hello").stdout.strip()
    expect(out == "5", f"call after enrollment: {out!r}")
    st = status(w, a)
    expect(st["certificate"]["device_id"] == "gw-enroll-1", f"certificate: {st['certificate']}")
    expect(st["certificate"]["renew_after"] < st["certificate"]["not_after"], f"renew_after: {st['certificate']}")
    # Enrolled with a valid certificate: refused without --force.
    token2 = provision(w)
    r = w.tetherctl(a, "enroll", "--token", token2, check=False)
    expect(r.returncode == 1 and "already enrolled" in r.stderr, f"second enroll: {r.returncode} {r.stderr}")


def test_token_file_at_start(w):
    enroll_cloud(w)
    token_file = w.path("token")
    with open(token_file, "w") as f:
        f.write("# provisioning token\n\n" + provision(w) + "\n")
    conf, cert, key = new_agent(w, dev_id="gw-tokenfile", token_file=token_file)
    os.chmod(token_file, 0o640)
    a = w.run_agent("agent", conf, ("gw-tokenfile", cert, key), wait_online=True)
    a.wait_line("Enrolled as device 'gw-tokenfile'", timeout=seconds(5))
    expect(os.path.exists(cert), "no certificate installed")
    expect(a.count("readable by every user") == 0, "a token file of mode 0640 was warned about")


def test_token_file_appears(w):
    """An agent waiting for TokenFile= enrolls as soon as a token is
    written there (an image provisioned after its first boot), without a
    restart; a refused token there is reported, and a good one written
    after it is used."""
    enroll_cloud(w)
    token_dir = w.path("enroll")
    os.mkdir(token_dir)
    token_file = os.path.join(token_dir, "provision-token")
    conf, cert, key = new_agent(w, dev_id="gw-tokenlate", token_file=token_file)
    mark = w.notify.mark()
    a = w.run_agent("agent", conf, ("gw-tokenlate", cert, key), wait_online=False)
    w.notify.wait(lambda m: m.get("STATUS", "").startswith("Not enrolled"), seconds(10), "not enrolled", mark)

    def drop(token):
        tmp = token_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(token + "\n")
        os.chmod(tmp, 0o644)
        os.rename(tmp, token_file)

    drop("tprov_" + "1" * 40)
    a.wait_line("provisioning token unknown", timeout=seconds(20))
    expect(status(w, a)["enrollment"]["state"] == "failed", "an unknown token did not fail the enrollment")
    mark = w.notify.mark()
    drop(provision(w))
    w.wait_online("gw-tokenlate", mark)
    a.wait_line("Enrolled as device 'gw-tokenlate'", timeout=seconds(5))
    expect(os.path.exists(cert), "no certificate installed")
    expect(a.proc.poll() is None, "the agent restarted")
    # Both tokens were in a file others can read (mode 0644): said once.
    n = a.count(r"provisioning token file '.*' is readable by every user \(mode 0644\)")
    expect(n == 1, f"{n} warnings about the token file's mode")


def test_reload_while_not_enrolled(w):
    """SIGHUP while waiting for a token: the cloud settings changed, yet
    nothing tries to connect without a certificate; the TokenFile= watch
    goes away with the setting and moves to the new file's directory."""
    enroll_cloud(w)
    dirs = [w.path("tok1"), w.path("tok2")]
    for d in dirs:
        os.mkdir(d)
    files = [os.path.join(d, "provision-token") for d in dirs]
    conf, cert, key = new_agent(w, dev_id="gw-reload", token_file=files[0])
    mark = w.notify.mark()
    a = w.run_agent("agent", conf, ("gw-reload", cert, key), wait_online=False)
    w.notify.wait(lambda m: m.get("STATUS", "").startswith("Not enrolled"), seconds(10), "not enrolled", mark)

    def reload(extra):
        m = a.mark()
        w.agent_conf("agent", cert, key, host="127.0.0.1", extra="[Enroll]\nDeviceID=gw-reload\n" + extra)
        a.signal(signal.SIGHUP)
        a.wait_line("Reloaded configuration", timeout=seconds(10), start=m)

    def drop(path, token):
        with open(path + ".tmp", "w") as f:
            f.write(token + "\n")
        os.rename(path + ".tmp", path)

    reload("")  # no TokenFile= any more
    drop(files[0], "tprov_" + "2" * 40)  # not watched now
    reload(f"TokenFile={files[1]}\n")
    mark = w.notify.mark()
    drop(files[1], provision(w))
    w.wait_online("gw-reload", mark)
    a.wait_line("Enrolled as device 'gw-reload'", timeout=seconds(5))
    expect(a.proc.poll() is None, "the agent died")
    st = status(w, a)
    expect(st["counters"]["connect_attempts"] == 1,
           f"connect attempts before the certificate was there: {st['counters']['connect_attempts']}")
    expect(a.count("provisioning token unknown") == 0, "the token of a file no longer configured was used")


SIGN_SCRIPT = """#!/bin/sh
set -e
out=$(mktemp -d)
{emu}{pki} sign {dir} - --out "$out/c" >/dev/null
cat "$out/c.crt"
rm -r "$out"
"""


def test_external_signer(w):
    """With an external SignCommand the cloud first answers 5.03 (being
    signed, send it again after Max-Age): tetherctl enroll waits through
    it instead of reporting a failure."""
    script = w.path("sign.sh")
    with open(script, "w") as f:
        f.write(SIGN_SCRIPT.format(emu=shlex.join(EMULATOR) + " " if EMULATOR else "", pki=PKI,
                                      dir=w.path("pki")))
    os.chmod(script, stat.S_IRWXU)
    cloud = w.start_cloud(extra=f"[Enroll]\nSignCommand={script}\n")
    if cloud.count(r"Unknown section \[Enroll\]"):
        skip("this tether-cloudd has no enrollment ([Enroll] of tether-cloudd.conf)")
    conf, cert, key = new_agent(w, dev_id="gw-external")
    a = w.run_agent("agent", conf, ("gw-external", cert, key), wait_online=False)
    w.notify.wait(lambda m: m.get("STATUS", "").startswith("Not enrolled"), seconds(10), "not enrolled")
    r = w.tetherctl(a, "enroll", "--token", provision(w), check=False, timeout=60)
    expect(r.returncode == 0 and "Enrolled as device gw-external" in r.stdout,
           f"enroll with an external signer: {r.returncode} {r.stdout!r} {r.stderr!r}")
    expect(a.count("the certificate is being signed") >= 1, "the cloud never answered 5.03 (pending)")


def test_refused_token(w):
    enroll_cloud(w)
    conf, cert, key = new_agent(w)
    a = w.run_agent("agent", conf, ("?", cert, key), wait_online=False)
    w.notify.wait(lambda m: m.get("STATUS", "").startswith("Not enrolled"), seconds(10), "not enrolled")
    r = w.tetherctl(a, "enroll", "--token", "tprov_" + "0" * 40, check=False, timeout=60)
    expect(r.returncode == 1, f"unknown token accepted: {r.returncode} {r.stdout} {r.stderr}")
    expect("provisioning token unknown" in r.stderr, f"the cloud's reason is not shown: {r.stderr!r}")
    st = status(w, a)
    expect(st["enrollment"]["state"] == "failed", f"enrollment: {st['enrollment']}")
    expect(st["counters"]["connect_attempts"] == 0, "connected after a refused enrollment")


def test_renewal_during_traffic(w):
    enroll_cloud(w, validity=300)
    token = provision(w)
    # Renew at 2% of 300 s: 6 s after notBefore, jitter below 0.75 s.
    conf, cert, key = new_agent(w, dev_id="gw-renew", renew=2)
    a = w.run_agent("agent", conf, ("gw-renew", cert, key), wait_online=False)
    w.notify.wait(lambda m: m.get("STATUS", "").startswith("Not enrolled"), seconds(10), "not enrolled")
    w.tetherctl(a, "enroll", "--token", token, timeout=60)
    first_cert, first_key = open(cert).read(), open(key).read()
    reconnects = status(w, a)["counters"]["reconnects"]

    failures, calls = [], [0]
    stop = threading.Event()

    def caller():
        while not stop.is_set():
            r = w.tether("call", "gw-renew", "echo", "hi", check=False)
            calls[0] += 1
            if r.returncode != 0 or r.stdout.strip() != "2":
                failures.append(f"{r.returncode}: {r.stdout.strip()} {r.stderr.strip()}")

    t = threading.Thread(target=caller, daemon=True)
    t.start()
    try:
        a.wait_line("Renewed the certificate of 'gw-renew'", timeout=seconds(30))
    finally:
        stop.set()
        t.join(seconds(30))
    expect(not failures, f"{len(failures)} of {calls[0]} calls failed during renewal: {failures[:3]}")
    expect(calls[0] > 0, "no call ran during the renewal")
    expect(open(cert).read() != first_cert and open(key).read() != first_key, "the key or certificate did not change")
    st = status(w, a)
    expect(st["counters"]["reconnects"] == reconnects, "the session was dropped to renew")
    expect(st["certificate"]["last_renewal"]["result"] == "ok", f"last renewal: {st['certificate']}")
    expect(not [f for f in os.listdir(w.dir) if f.endswith(".new")], ".new files left behind")

    # The renewed pair is what the next start connects with.
    a.stop()
    w.run_agent("agent2", conf, ("gw-renew", cert, key), wait_online=True)


def test_device_ca_file(w):
    """[Enroll] DeviceCAFile=: a certificate that does not verify against
    it is not installed, at enrollment (no certificate, the cloud's reason
    shown) nor at renewal (the working pair stays)."""
    enroll_cloud(w, validity=300)
    w.pki("ca", w.path("other-pki"))
    other_ca = w.path("other-pki", "ca.crt")

    conf, cert, key = new_agent(w, name="bad", dev_id="gw-devca-bad")
    with open(conf, "a") as f:
        f.write(f"DeviceCAFile={other_ca}\n")
    a = w.run_agent("bad", conf, ("gw-devca-bad", cert, key), wait_online=False)
    w.notify.wait(lambda m: m.get("STATUS", "").startswith("Not enrolled"), seconds(10), "not enrolled")
    r = w.tetherctl(a, "enroll", "--token", provision(w), check=False, timeout=60)
    expect(r.returncode == 1 and "does not verify against [Enroll] DeviceCAFile" in r.stderr,
           f"enrolled with a certificate outside DeviceCAFile: {r.returncode} {r.stdout!r} {r.stderr!r}")
    expect(not os.path.exists(cert), "a certificate outside DeviceCAFile was installed")
    expect(status(w, a)["enrollment"]["state"] == "failed", "the enrollment did not fail")
    a.stop()

    # The right CA: enrolled; then DeviceCAFile holds another CA and a
    # renewal is refused, the pair in place kept.
    device_ca = w.path("device-ca.crt")
    with open(device_ca, "w") as f:
        f.write(open(w.path("pki", "ca.crt")).read())
    conf, cert, key = new_agent(w, dev_id="gw-devca", renew=2)
    with open(conf, "a") as f:
        f.write(f"DeviceCAFile={device_ca}\nRenew=no\n")
    mark = w.notify.mark()
    a = w.run_agent("agent", conf, ("gw-devca", cert, key), wait_online=False)
    w.notify.wait(lambda m: m.get("STATUS", "").startswith("Not enrolled"), seconds(10), "not enrolled", mark)
    w.tetherctl(a, "enroll", "--token", provision(w), timeout=60)
    first_cert, first_key = open(cert).read(), open(key).read()
    with open(device_ca, "w") as f:
        f.write(open(other_ca).read())
    with open(conf) as f:
        text = f.read()
    with open(conf, "w") as f:
        f.write(text.replace("Renew=no\n", "Renew=yes\n"))
    mark = a.mark()
    a.signal(signal.SIGHUP)
    a.wait_line(r"Renewing the certificate of 'gw-devca' failed: the certificate does not verify against "
                r"\[Enroll\] DeviceCAFile", start=mark, timeout=seconds(30))
    expect(open(cert).read() == first_cert and open(key).read() == first_key, "the pair in place was replaced")
    st = status(w, a)
    expect(st["connected"] and st["certificate"]["last_renewal"]["result"] == "failed", f"status: {st}")


def expired_cert(w, key, dev_id, cert):
    """Write cert: for key and dev_id, signed by the test CA, expired."""
    csr = subprocess.run(EMULATOR + [TETHERCTL, "csr", "--key", key, "--id", dev_id], capture_output=True, text=True)
    expect(csr.returncode == 0, csr.stderr)
    with open(w.path(dev_id + ".csr"), "w") as f:
        f.write(csr.stdout)
    # -days -1: notAfter a day before notBefore (now), expired already.
    p = subprocess.run(["openssl", "x509", "-req", "-in", w.path(dev_id + ".csr"), "-CA", w.path("pki", "ca.crt"),
                        "-CAkey", w.path("pki", "ca.key"), "-set_serial", "0x7e57ed", "-days", "-1", "-out", cert],
                       capture_output=True, text=True)
    expect(p.returncode == 0, f"openssl x509: {p.stderr}")


def test_reenroll_expired(w):
    """An agent that comes back with an expired certificate re-enrolls by
    itself with its key (the one the cloud has on record), no token; once
    the cloud has forgotten the key (revoke and unrevoke), it says that a
    token is needed."""
    enroll_cloud(w)
    token_file = w.path("token")
    with open(token_file, "w") as f:
        f.write(provision(w, uses=2) + "\n")
    os.chmod(token_file, 0o600)
    conf, cert, key = new_agent(w, dev_id="gw-expired", token_file=token_file)
    a = w.run_agent("agent", conf, ("gw-expired", cert, key), wait_online=True)
    a.stop()
    first_key = open(key).read()
    expired_cert(w, key, "gw-expired", cert)

    b = w.run_agent("agent-b", conf, ("gw-expired", cert, key), wait_online=True)
    b.wait_line("The certificate of 'gw-expired' expired at .*: re-enrolling with its key, without a token",
                timeout=seconds(5))
    b.wait_line("Enrolled as device 'gw-expired'", timeout=seconds(5))
    w.cloud.wait_line("Device 'gw-expired' re-enrolled from ")
    expect(open(key).read() == first_key, "the key changed")
    st = status(w, b)
    expect(st["certificate"]["not_after"] > time.time() + 3600, f"certificate: {st['certificate']}")
    code, desc = api_json(w, "GET", "/v1/devices/gw-expired")
    expect(desc["certificate"]["issued_by"] == "reenroll", f"describe: {desc['certificate']}")
    code, toks = api_json(w, "GET", "/v1/provision")
    toks = toks if isinstance(toks, list) else toks.get("tokens", toks.get("provision", []))
    expect([t["uses"] for t in toks] == [1], f"a token use was spent: {toks}")
    b.stop()

    # The cloud forgets the key: a token is needed.
    w.tether("revoke", "gw-expired")
    w.tether("unrevoke", "gw-expired")
    expired_cert(w, key, "gw-expired", cert)
    c = w.run_agent("agent-c", conf, ("gw-expired", cert, key), wait_online=False)
    c.wait_line("a provisioning token is required; a provisioning token is needed: tetherctl enroll --force --token",
                timeout=seconds(20))
    st = status(w, c)
    expect(st["enrollment"]["state"] == "failed" and "a provisioning token is required" in st["enrollment"]["error"],
           f"enrollment: {st['enrollment']}")


def test_crash_between_renames(w):
    enroll_cloud(w)
    conf, cert, key = new_agent(w, dev_id="gw-crash")
    a = w.run_agent("agent", conf, ("gw-crash", cert, key), wait_online=False)
    w.notify.wait(lambda m: m.get("STATUS", "").startswith("Not enrolled"), seconds(10), "not enrolled")
    w.tetherctl(a, "enroll", "--token", provision(w), timeout=60)
    a.stop()

    # What a crash between the two renames of an install leaves: the new
    # key in place, the old certificate, and the new certificate as .new.
    key2 = w.path("key2")
    p = subprocess.run(EMULATOR + [TETHERCTL, "genkey", key2], capture_output=True, text=True)
    expect(p.returncode == 0, p.stderr)
    csr = subprocess.run(EMULATOR + [TETHERCTL, "csr", "--key", key2, "--id", "gw-crash"],
                         capture_output=True, text=True)
    with open(w.path("gw-crash.csr"), "w") as f:
        f.write(csr.stdout)
    os.makedirs(w.path("pki2"), exist_ok=True)
    for f in ("ca.crt", "ca.key"):
        os.link(w.path("pki", f), w.path("pki2", f))
    w.pki("sign", w.path("pki2"), w.path("gw-crash.csr"))
    new_cert = open(w.path("pki2", "devices", "gw-crash.crt")).read()
    os.replace(key2, key)
    with open(cert + ".new", "w") as f:
        f.write(new_cert)

    b = w.run_agent("agent", conf, ("gw-crash", cert, key), wait_online=True)
    b.wait_line("Completed the install of a new key and certificate", timeout=seconds(5))
    expect(open(cert).read() == new_cert, "the certificate was not completed")
    expect(not os.path.exists(cert + ".new"), ".new left behind")


def test_torn_new_files_discarded(w):
    """A torn .new pair (crash while writing) is removed; the old pair connects."""
    w.start_cloud()
    device = w.new_device()
    _, cert, key = device
    conf = w.agent_conf("agent", cert, key)
    with open(key + ".new", "w") as f:
        f.write("-----BEGIN PRIVATE KEY-----\nMIGH")
    with open(cert + ".new", "w") as f:
        f.write("-----BEGIN CERT")
    mark = w.notify.mark()
    b = w.run_agent("agent", conf, device, wait_online=False)
    w.wait_online(device[0], mark)
    b.wait_line("Removed an incomplete new key or certificate", timeout=seconds(5))
    expect(not os.path.exists(key + ".new") and not os.path.exists(cert + ".new"), ".new files kept")


if __name__ == "__main__":
    try:
        sys.exit(run([test_not_enrolled_waits, test_torn_new_files_discarded, test_tetherctl_enroll,
                      test_token_file_at_start, test_token_file_appears, test_reload_while_not_enrolled,
                      test_external_signer, test_refused_token, test_renewal_during_traffic,
                      test_device_ca_file, test_reenroll_expired, test_crash_between_renames], emulated="ok"))
    except Failure as e:
        print(f"Bail out! {e}")
        sys.exit(1)
