#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""tetherctl against a real tetherd: status, publish reaching a `tether
subscribe` client through the real cloud, access control by peer
credentials, bad requests on the raw socket, and enrollment (genkey, csr,
tether-pki sign) ending in a device that comes online."""

import json
import os
import pwd
import grp
import signal
import socket
import stat
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import EMULATOR, PKI, TETHERCTL, TIME_FACTOR, Skip, expect, run  # noqa: E402


def raw_request(agent, payload, shut=True):
    """Send bytes on the agent's socket, return the decoded answer."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(agent.socket)
    s.sendall(payload)
    if shut:
        s.shutdown(socket.SHUT_WR)
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    return json.loads(data)


def test_status_and_publish(w):
    w.start_cloud()
    a = w.start_agent()
    dev = a.device_id

    st = json.loads(w.tetherctl(a, "status", "--json").stdout)
    expect(st["connected"] is True, f"status says not connected: {st}")
    expect(st["cloud_host"] == "localhost" and st["cloud_port"] == w.coap_port, f"wrong cloud: {st}")
    expect(st["state"].startswith("Connected to localhost:"), f"state line: {st['state']!r}")
    expect(st["uptime_sec"] > 0 and st["connected_sec"] >= 0, f"uptime: {st}")
    expect([p["name"] for p in st["plugins"]] == ["example"], f"plugins: {st['plugins']}")
    expect("echo" in st["functions"] and st["variables"].get("counter") == "int32", f"registry: {st}")
    expect(st["values"]["label"] == "example" and isinstance(st["values"]["counter"], int),
           f"values: {st['values']}")

    text = w.tetherctl(a, "status").stdout
    for want in ("State:      connected", f"Cloud:      localhost:{w.coap_port}", "Plugins:    example",
                 "echo", "counter"):
        expect(want in text, f"'{want}' missing from tetherctl status:\n{text}")

    # A shell script's event reaches a cloud subscriber, stamped with the device ID.
    sub = w.subscribe("shell/", "--device", dev).wait_ready()
    w.tetherctl(a, "publish", "shell/door", "open", "--ttl", "120")
    ev = sub.wait(lambda e: e.get("name") == "shell/door", what="shell/door event")
    expect(ev["data"] == "open" and ev["coreid"] == dev and ev["ttl"] == 120, f"wrong event {ev}")
    w.tetherctl(a, "publish", "shell/nodata")
    ev = sub.wait(lambda e: e.get("name") == "shell/nodata", what="shell/nodata event")
    expect(ev["data"] in (None, ""), f"event without data carried {ev['data']!r}")
    sub.close()

    r = w.tetherctl(a, "publish", "bad name!", "x", check=False)
    expect(r.returncode == 2 and "Invalid event name" in r.stderr, f"bad name: {r.returncode} {r.stderr!r}")
    r = w.tetherctl(a, "publish", "shell/big", "x" * 20000, check=False)
    expect(r.returncode == 1 and "MaxPayload" in r.stderr, f"oversize: {r.returncode} {r.stderr!r}")

    a.stop()
    r = w.tetherctl(a, "status", check=False)
    expect(r.returncode == 4 and "not running" in r.stderr, f"stopped agent: {r.returncode} {r.stderr!r}")
    expect(not os.path.exists(a.socket), "socket left behind after a clean stop")


def test_access_control(w):
    if os.geteuid() != 0:
        raise Skip("needs root to run tetherctl as another user")
    try:
        nobody = pwd.getpwnam("nobody")
        nogroup = grp.getgrgid(nobody.pw_gid)
    except KeyError:
        raise Skip("no 'nobody' user")
    os.chmod(w.dir, 0o755)  # let nobody reach the socket; the agent decides
    user = (nobody.pw_uid, nobody.pw_gid)
    r = subprocess.run(["setpriv", f"--reuid={user[0]}", f"--regid={user[1]}", "--clear-groups",
                        *EMULATOR, TETHERCTL, "--version"], capture_output=True, text=True)
    if r.returncode != 0:
        raise Skip(f"user nobody cannot run {TETHERCTL} (is the build directory private?): {r.stderr.strip()}")
    w.start_cloud()
    a = w.start_agent()
    mode = stat.S_IMODE(os.stat(a.socket).st_mode)
    expect(mode == 0o666, f"socket mode {mode:o}")

    mark = a.mark()
    r = w.tetherctl(a, "status", check=False, user=user)
    expect(r.returncode == 3 and "permission denied" in r.stderr, f"nobody allowed: {r.returncode} {r.stderr!r}")
    a.wait_line(rf"refused a request from uid {nobody.pw_uid}", start=mark)
    # A flood of refused connections is not a flood of log lines.
    flood = ("import socket, sys\n"
             "for _ in range(300):\n"
             "    s = socket.socket(socket.AF_UNIX)\n"
             "    s.connect(sys.argv[1])\n"
             "    s.sendall(b'{\"method\": \"status\"}\\n')\n"
             "    s.recv(4096)\n"
             "    s.close()\n")
    r = subprocess.run(["setpriv", f"--reuid={user[0]}", f"--regid={user[1]}", "--clear-groups",
                        sys.executable, "-c", flood, a.socket], capture_output=True, text=True,
                       timeout=60 * TIME_FACTOR)
    expect(r.returncode == 0, f"the flood failed: {r.stderr.strip()}")
    r = w.tetherctl(a, "status", check=False, user=user)
    expect(r.returncode == 3, f"nobody allowed after the flood: {r.returncode}")
    n = a.count(rf"refused a request from uid {nobody.pw_uid}", start=mark)
    expect(n <= 3, f"{n} log lines for 302 refused requests")  # one per 10 s
    sub = w.subscribe("denied/").wait_ready()
    r = w.tetherctl(a, "publish", "denied/x", "y", check=False, user=user)
    expect(r.returncode == 3, f"nobody could publish: {r.returncode} {r.stderr!r}")

    # Make nobody's group the permitted one: allowed after a reload.
    with open(a.conf, "a") as f:
        f.write(f"[Local]\nGroup={nogroup.gr_name}\n")
    mark = a.mark()
    a.signal(signal.SIGHUP)
    a.wait_line(r"Reloaded configuration", start=mark)
    st = json.loads(w.tetherctl(a, "status", "--json", user=user).stdout)
    expect(st["connected"], f"status as a group member: {st}")
    w.tetherctl(a, "publish", "denied/now-allowed", "z", user=user)
    sub.wait(lambda e: e.get("name") == "denied/now-allowed", what="event from a group member")
    expect(not any(e.get("name") == "denied/x" for e in sub.events), "refused publish got through")
    sub.close()
    # A group member may not enroll (it would replace the device's identity).
    r = w.tetherctl(a, "enroll", "--force", "--token", "tprov_" + "0" * 40, "--id", "someone-else", "--no-wait",
                    check=False, user=user)
    expect(r.returncode == 3 and "only root or tetherd's own user" in r.stderr,
           f"a group member could enroll: {r.returncode} {r.stderr!r}")
    st = json.loads(w.tetherctl(a, "status", "--json").stdout)
    expect(st["enrollment"]["generation"] == 0 and st["connected"], f"enrollment started: {st['enrollment']}")

    # An unknown group: warned about, root still allowed, nobody not.
    with open(a.conf, "a") as f:
        f.write("Group=no-such-group-tether\n")
    mark = a.mark()
    a.signal(signal.SIGHUP)
    a.wait_line(r"Group 'no-such-group-tether'.*does not exist", start=mark)
    r = w.tetherctl(a, "status", check=False, user=user)
    expect(r.returncode == 3, f"nobody allowed with an unknown group: {r.returncode}")
    w.tetherctl(a, "status")


def test_bad_requests(w):
    w.start_cloud()
    a = w.start_agent(extra="[Limits]\nMaxPayload=100\n")

    r = raw_request(a, b"this is not json")
    expect(r["ok"] is False and "not a JSON object" in r["error"], f"garbage: {r}")
    r = raw_request(a, b'{"method":"reboot"}\n')
    expect(r["ok"] is False and "unknown method" in r["error"], f"unknown method: {r}")
    r = raw_request(a, b'{"method":"publish","name":"x","extra":1}')
    expect(r["ok"] is False and "bad publish request" in r["error"], f"unknown field: {r}")
    r = raw_request(a, b'{"method":"publish","name":"a//b"}')
    expect(r["ok"] is False and r["errno"] == 22, f"invalid name: {r}")
    r = raw_request(a, json.dumps({"method": "publish", "name": "x", "data": "y" * 101}).encode())
    expect(r["ok"] is False and "MaxPayload" in r["error"], f"over MaxPayload: {r}")
    # Over the request bound (6 x MaxPayload + 4096): refused without reading it all.
    r = raw_request(a, b"[" + b" " * 10000, shut=False)
    expect(r["ok"] is False and r["errno"] == 7, f"oversize request: {r}")
    # Only the first line counts.
    r = raw_request(a, b'{"method":"status"}\ngarbage after the newline', shut=False)
    expect(r["ok"] is True and r["status"]["connected"], f"request with trailing bytes: {r}")

    # Many clients at once, half of them silent: the agent keeps serving.
    idle = []
    for _ in range(20):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(a.socket)
        idle.append(s)
    r = w.tether("call", a.device_id, "echo", "still")
    expect(r.stdout.strip() == "5", f"agent stopped serving with idle local clients: {r.stdout!r}")
    for s in idle:
        s.close()
    st = json.loads(w.tetherctl(a, "status", "--json").stdout)
    expect(st["connected"], "status after idle clients")


def test_enrollment(w):
    key = w.path("device.key")

    # genkey and csr need no agent.
    def ctl(*args, check=True):
        p = subprocess.run(EMULATOR + [TETHERCTL, *args], capture_output=True, text=True)
        if check and p.returncode != 0:
            raise AssertionError(f"tetherctl {args} failed: {p.stderr}")
        return p

    ctl("genkey", key)
    st = os.stat(key)
    expect(stat.S_IMODE(st.st_mode) == 0o600, f"key mode {stat.S_IMODE(st.st_mode):o}")
    before = open(key).read()
    r = ctl("genkey", key, check=False)
    expect(r.returncode == 1 and "already exists" in r.stderr, f"genkey over a key: {r.returncode} {r.stderr}")
    expect(open(key).read() == before, "genkey replaced an existing key")
    expect(not [f for f in os.listdir(w.dir) if ".tmp-" in f], "temporary files left behind")

    r = ctl("csr", "--key", key)
    expect(r.stdout.startswith("-----BEGIN CERTIFICATE REQUEST-----"), f"csr output: {r.stdout[:60]!r}")
    dev = r.stderr.strip().split()[-1]
    expect(len(dev) == 24, f"derived device ID {dev!r}")
    expect(ctl("csr", "--key", key).stderr.strip().split()[-1] == dev, "device ID is not stable")
    with open(w.path("device.csr"), "w") as f:
        f.write(r.stdout)
    signed = w.pki("sign", w.path("pki"), w.path("device.csr")).strip()
    expect(signed == dev, f"tether-pki signed {signed!r}, expected {dev!r}")
    crt = w.path("pki", "devices", dev + ".crt")
    expect(not os.path.exists(w.path("pki", "devices", dev + ".key")), "sign wrote a key")
    # Signing again refuses to replace the certificate.
    r = subprocess.run(EMULATOR + [PKI, "sign",
                                   w.path("pki"), w.path("device.csr")], capture_output=True, text=True)
    expect(r.returncode == 1 and "already exists" in r.stderr, f"second sign: {r.returncode} {r.stderr}")
    # A tampered request is refused.
    bad = "-----BEGIN CERTIFICATE REQUEST-----\nMIIBtampered\n-----END CERTIFICATE REQUEST-----\n"
    with open(w.path("bad.csr"), "w") as f:
        f.write(bad)
    r = subprocess.run(EMULATOR + [PKI, "sign",
                                   w.path("pki"), w.path("bad.csr")], capture_output=True, text=True)
    expect(r.returncode == 1, f"garbage CSR accepted: {r.stdout}")

    # An encrypted key is named as such (and nobody is asked for a passphrase).
    for name, extra in (("pkcs8", []), ("traditional", ["-traditional"])):
        enc = w.path(f"encrypted-{name}.key")
        subprocess.run(["openssl", "pkey", "-in", key, *extra, "-aes256", "-passout", "pass:secret", "-out", enc],
                       check=True, capture_output=True)
        r = subprocess.run(EMULATOR + [TETHERCTL, "csr", "--key", enc], capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, timeout=30 * TIME_FACTOR)
        expect(r.returncode == 1 and "it is encrypted" in r.stderr and "unencrypted key" in r.stderr,
               f"csr with an encrypted {name} key: {r.returncode} {r.stderr!r}")

    # A bad device ID says why: a reserved one is not a bad pattern.
    reserved = "'api' and 'events' are reserved by the API"
    pattern = "must match [A-Za-z0-9_-]{1,64}"
    for bad, why in (("api", reserved), ("events", reserved), ("a.b", pattern), ("x" * 65, pattern)):
        r = ctl("csr", "--key", key, "--id", bad, check=False)
        expect(r.returncode == 2 and f"Invalid device ID '{bad}': {why}" in r.stderr,
               f"csr --id {bad}: {r.returncode} {r.stderr!r}")
        r = subprocess.run(EMULATOR + [PKI, "device", "--id", bad, w.path("pki")], capture_output=True, text=True)
        expect(r.returncode != 0 and f"Invalid device ID '{bad}': {why}" in r.stderr,
               f"pki device --id {bad}: {r.returncode} {r.stderr!r}")
    # tetherctl makes no request with a bad ID: openssl does, for sign to refuse.
    for bad, why in (("api", reserved), ("a.b", pattern)):
        csr = w.path(f"bad-id-{bad}.csr")
        subprocess.run(["openssl", "req", "-new", "-key", key, "-subj", f"/CN={bad}", "-out", csr], check=True,
                       capture_output=True)
        r = subprocess.run(EMULATOR + [PKI, "sign", w.path("pki"), csr], capture_output=True, text=True)
        expect(r.returncode == 1 and f"Invalid device ID '{bad}' in '{csr}': {why}" in r.stderr,
               f"sign CN={bad}: {r.returncode} {r.stderr!r}")
        expect(not os.path.exists(w.path("pki", "devices", bad + ".crt")), f"sign CN={bad} wrote a certificate")

    w.start_cloud()
    for bad, why in (("api", reserved), ("a.b", pattern)):
        r = w.tether("call", bad, "echo", "x", check=False)
        expect(r.returncode != 0 and f"Invalid device ID '{bad}': {why}" in r.stderr,
               f"tether call {bad}: {r.returncode} {r.stderr!r}")
    a = w.start_agent(device=(dev, crt, key))
    r = w.tether("call", a.device_id, "echo", "enrolled")
    expect(r.stdout.strip() == "8", f"enrolled device did not answer: {r.stdout!r}")


if __name__ == "__main__":
    sys.exit(run([test_status_and_publish, test_access_control, test_bad_requests, test_enrollment], emulated="ok"))
