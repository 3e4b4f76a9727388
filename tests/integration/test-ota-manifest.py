#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""What a signed manifest may do (docs/ota.md, "Targets, nonce,
downgrade"), end to end with the real cloud, agent, helper and dpkg in a
scratch root (otakit.py): a manifest for another device, or for tags only,
is refused by the device; the same manifest accepted once is refused
again (a replay), also after the agent restarted and after a rollback; a
lower version than the installed one is refused unless the signed manifest
allows it; a format 1 manifest is refused by the cloud. And the cloud's
artifact server: no TLS below 1.2, no client certificate without the
clientAuth extended key usage."""

import os
import socket
import ssl
import subprocess
import sys
import urllib.parse
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Skip, expect, run  # noqa: E402
from otakit import OtaWorld, build_deb, plugin_deb  # noqa: E402


def setup(w):
    o = OtaWorld(w)
    o.start_cloud()
    o.install_v1()
    o.start_agent()
    o.seed(o.v1)
    return o


def ended(o, job, state, code=None, what=""):
    j = o.wait_job(job)
    expect(j["state"] == state and (code is None or j.get("code") == code),
           f"{what}: expected {state}/{code}, got {j['state']}/{j.get('code')}: {j.get('reason')}")
    return j


def test_other_device_refused(w):
    o = setup(w)
    before = o.status_digest()
    v2 = plugin_deb(o.debs, "2.0")
    url = o.upload(v2)
    j = ended(o, o.start_job(o.sign(v2, url, "--device", "someone-else", "--device", o.agent.device_id + "x")),
              "rejected", "not-targeted", "a manifest for other devices")
    expect(f"'{o.agent.device_id}'" in j["reason"], f"the reason does not name the device: {j['reason']}")
    # tags: this agent knows none of its own, so a tag alone never matches
    j = ended(o, o.start_job(o.sign(v2, url, "--tag", "site-a")), "rejected", "not-targeted", "tags only")
    expect("knows no tags" in j["reason"], f"reason: {j['reason']}")
    expect(o.status_digest() == before and o.installed() == "1.0 ii", "a refused manifest changed dpkg's database")
    # named among others (and a tag): accepted
    ended(o, o.start_job(o.sign(v2, url, "--device", "someone-else", "--device", o.agent.device_id,
                                "--tag", "site-a")), "committed", what="named among others")
    expect(o.installed() == "2.0 ii", f"dpkg says {o.installed()}")


def test_replay_refused(w):
    """Once committed, once rolled back: each manifest is accepted once,
    also across an agent restart."""
    o = setup(w)
    v2 = plugin_deb(o.debs, "2.0")
    m2 = o.sign(v2, o.upload(v2))
    first = o.start_job(m2)
    ended(o, first, "committed", what="first use")
    j = ended(o, o.start_job(m2), "rejected", "replay", "the same manifest again")
    expect(first in j["reason"], f"the reason does not name the job that used it: {j['reason']}")
    # a manifest whose job rolls back is spent as well
    v3 = plugin_deb(o.debs, "3.0", scripts={"postinst": "#!/bin/sh\nexit 1\n"})
    m3 = o.sign(v3, o.upload(v3))
    ended(o, o.start_job(m3), "rolled-back", "install-failed", "v3")
    ended(o, o.start_job(m3), "rejected", "replay", "the rolled-back manifest again")
    # the record survives a restart of the agent (killed, not stopped)
    a = o.agent
    a.killed = True
    a.kill()
    o.start_agent(name="agent2", device=o.device())
    ended(o, o.start_job(m2), "rejected", "replay", "the first manifest after a restart")
    ended(o, o.start_job(m3), "rejected", "replay", "the second manifest after a restart")
    expect(o.installed() == "2.0 ii", f"dpkg says {o.installed()}")
    # a new manifest for the same package is fine
    v4 = plugin_deb(o.debs, "4.0")
    ended(o, o.start_job(o.sign(v4, o.upload(v4))), "committed", what="a fresh manifest")


def test_downgrade(w):
    o = setup(w)
    v2 = plugin_deb(o.debs, "2.0")
    ended(o, o.start_job(o.sign(v2, o.upload(v2))), "committed", what="v2")
    v15 = plugin_deb(o.debs, "1.5")
    url = o.upload(v15)
    before = o.status_digest()
    j = ended(o, o.start_job(o.sign(v15, url)), "rejected", "downgrade", "1.5 below the installed 2.0")
    expect("2.0" in j["reason"] and "allow" in j["reason"], f"reason: {j['reason']}")
    expect(o.status_digest() == before and o.installed() == "2.0 ii", f"dpkg changed: {o.installed()}")
    # the same version, signed with allow_downgrade: installed
    ended(o, o.start_job(o.sign(v15, url, "--allow-downgrade")), "committed", what="signed downgrade")
    expect(o.installed() == "1.5 ii", f"dpkg says {o.installed()}")


def test_old_format_refused(w):
    """A format 1 manifest (no targets, no nonce) never reaches a device."""
    o = setup(w)
    v2 = plugin_deb(o.debs, "2.0")
    m = o.sign(v2, o.upload(v2))
    old = m.replace("tether-ota-manifest/2", "tether-ota-manifest/1")
    st, body = o.api("PUT", f"/v1/devices/{o.agent.device_id}", {"manifest": old})
    expect(st == 400 and "format 1" in body.get("error", ""), f"format 1: HTTP {st} {body}")


# ---- the artifact server's TLS ------------------------------------------------

def artifact_world(w):
    """A cloud with its artifact server and one artifact; no agent."""
    artifacts = w.path("artifacts")
    os.makedirs(artifacts)
    w.start_cloud(extra=f"[OTA]\nArtifactDirectory={artifacts}\nPort=0\n")
    try:
        deb = build_deb(w.path(), "tether-plugin-example", "1.0", files={"x": b"x" * 1000})
    except (FileNotFoundError, subprocess.CalledProcessError) as e:
        raise Skip(f"cannot build a .deb: {e}")
    url = w.tether("ota", "upload", deb).stdout.strip()
    u = urllib.parse.urlsplit(url)
    return url, u.hostname, u.port, u.path


def get(host, port, path, ctx):
    """One GET over TLS with ctx; (tls version, HTTP status line)."""
    with socket.create_connection((host, port), timeout=20) as s:
        with ctx.wrap_socket(s, server_hostname="localhost") as t:
            t.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while b"\r\n" not in data:
                chunk = t.recv(4096)
                if not chunk:
                    break
                data += chunk
            return t.version(), data.split(b"\r\n", 1)[0].decode(errors="replace")


def client_ctx(w, version=None, cert=None, key=None):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(w.path("pki", "ca.crt"))
    # OpenSSL 3's default security level does not even offer TLS 1.0/1.1:
    # level 0 lets the client ask, so that the refusal is the server's.
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    if version:
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = version
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx


def test_artifact_server_tls_versions(w):
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # asking for TLS 1.0 is the point
    url, host, port, path = artifact_world(w)
    dev = w.new_device()
    for v in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
        try:
            got = get(host, port, path, client_ctx(w, v, dev[1], dev[2]))
            raise AssertionError(f"the artifact server accepted {v.name}: {got}")
        except (ssl.SSLError, ConnectionResetError) as e:
            # the server's refusal (an alert, or it hangs up); not the
            # client failing to offer the version at all
            if "NO_PROTOCOLS_AVAILABLE" in str(e).upper() or "NO_SUITABLE" in str(e).upper():
                raise Skip(f"this Python and OpenSSL cannot offer {v.name}, so no refusal can be seen: {e}")
    # the same client settings up to TLS 1.2 get the artifact
    version, status = get(host, port, path, client_ctx(w, ssl.TLSVersion.TLSv1_2, dev[1], dev[2]))
    expect(version == "TLSv1.2" and " 200 " in status + " ", f"TLS 1.2: {version} {status}")
    version, status = get(host, port, path, client_ctx(w, None, dev[1], dev[2]))
    expect(version == "TLSv1.3" and " 200 " in status + " ", f"TLS 1.3: {version} {status}")


def openssl_leaf(w, name, cn, ext):
    """A certificate from the test CA made with openssl, with ext as its
    extensions (None: none at all)."""
    key, csr, crt, cnf = (w.path(f"{name}.{s}") for s in ("key", "csr", "crt", "ext"))
    subprocess.run(["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", key, "-out", csr, "-subj", f"/CN={cn}"], check=True, capture_output=True)
    argv = ["openssl", "x509", "-req", "-in", csr, "-CA", w.path("pki", "ca.crt"), "-CAkey",
            w.path("pki", "ca.key"), "-CAcreateserial", "-days", "2", "-out", crt]
    if ext is not None:
        with open(cnf, "w") as f:
            f.write(ext)
        argv += ["-extfile", cnf]
    subprocess.run(argv, check=True, capture_output=True)
    return crt, key


def test_artifact_server_wants_client_auth(w):
    url, host, port, path = artifact_world(w)
    dev = w.new_device()
    _, status = get(host, port, path, client_ctx(w, None, dev[1], dev[2]))
    expect(" 200 " in status + " ", f"the device certificate (clientAuth): {status}")
    cases = {
        "server-only": "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
        "no-eku": "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n",
        "email": "basicConstraints=CA:FALSE\nextendedKeyUsage=emailProtection,codeSigning\n",
    }
    for name, ext in cases.items():
        crt, key = openssl_leaf(w, name, "gw-" + name, ext)
        _, status = get(host, port, path, client_ctx(w, None, crt, key))
        expect(" 403 " in status + " ", f"a client certificate without clientAuth ({name}): {status}")
    # the cloud's own server certificate (serverAuth, CN=localhost) is no device's
    _, status = get(host, port, path, client_ctx(w, None, w.path("pki", "server.crt"), w.path("pki", "server.key")))
    expect(" 403 " in status + " ", f"the server certificate as a client certificate: {status}")
    # with clientAuth among others: fine
    crt, key = openssl_leaf(w, "both", "gw-both", "basicConstraints=CA:FALSE\n"
                            "extendedKeyUsage=serverAuth,clientAuth\n")
    _, status = get(host, port, path, client_ctx(w, None, crt, key))
    expect(" 200 " in status + " ", f"clientAuth among other usages: {status}")


def test_too_many_devices_for_one_manifest(w):
    """tether ota sign with more --device than fit in a body of 4096
    bytes: says so, and how many fit (not "not a JSON object")."""
    d = w.path("debs")
    os.makedirs(d, exist_ok=True)
    deb = build_deb(d, "tether-test", "1.0")
    w.tether("ota", "keygen", w.path("update.key"), w.path("update.pem"))
    ids = [f"{i:064x}" for i in range(80)]
    args = [a for i in ids for a in ("--device", i)]
    r = w.tether("ota", "sign", deb, "--key", w.path("update.key"), "--output", w.path("m"), *args, check=False)
    expect(r.returncode != 0 and "a device accepts at most 4096" in r.stderr and
           "of these 80 devices fit in one manifest" in r.stderr and "JSON object" not in r.stderr,
           f"exit {r.returncode}: {r.stderr}")
    fit = int(r.stderr.split(" of these 80 devices")[0].split()[-1])
    expect(40 <= fit < 80, f"{fit} devices fit: {r.stderr}")
    w.tether("ota", "sign", deb, "--key", w.path("update.key"), "--output", w.path("m"),
             *[a for i in ids[:fit] for a in ("--device", i)])
    r = w.tether("ota", "sign", deb, "--key", w.path("update.key"), "--output", w.path("m2"),
                 *[a for i in ids[:fit + 1] for a in ("--device", i)], check=False)
    expect(r.returncode != 0 and "body would be" in r.stderr, f"{fit + 1} devices: {r.returncode} {r.stderr}")


if __name__ == "__main__":
    sys.exit(run([test_other_device_refused, test_replay_refused, test_downgrade, test_old_format_refused,
                  test_artifact_server_tls_versions, test_artifact_server_wants_client_auth,
                  test_too_many_devices_for_one_manifest],
                 emulated="installs packages with the host's dpkg into a scratch root; its timing "
                 "bounds (trial, lock waits) are set for native speed"))
