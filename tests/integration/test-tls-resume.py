#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""TLS session resumption (docs/security.md, "Session resumption"): after a
restart of the cloud with the same state directory an agent resumes its
TLS session with the ticket it kept, as the same device; a revoked device
cannot get in by resuming; a renewed certificate is presented in a full
handshake; TicketKeySec=0 turns resumption off; the ticket key file is
private, a damaged one is replaced and other keys make agents fall back
to a full handshake without an error; a reload with another CA replaces
the keys; a ticket does not outlive twice TicketKeySec= even after a long
downtime; an anonymous session gets no ticket."""
import json
import os
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import BUILD, SLOW, Skip, expect, poll, run, seconds, with_threads, in_loop  # noqa: E402

WALLCLOCK = os.path.join(BUILD, "tests", "clock", ".libs", "wallclock.so")


def metric(w, name):
    req = urllib.request.Request(f"{w.api}/metrics", headers={"Authorization": f"Bearer {w.token}"})
    with urllib.request.urlopen(req, timeout=10 * SLOW) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics")


def status(w, agent):
    return json.loads(w.tetherctl(agent, "status", "--json").stdout)


def restart_cloud(w, agent, extra="", before_start=None):
    """Stop the cloud, run before_start, start it again on the same ports
    and state directory; wait for the agent to be online again."""
    w.cloud.stop()
    w.daemons.remove(w.cloud)
    if before_start:
        before_start()
    mark = w.notify.mark()
    w.start_cloud(extra, port=w.coap_port, api_port=w.api_port)
    w.wait_online(agent.device_id, mark, timeout=seconds(30))


def keys_path(w):
    return w.path("cloud-state", "ticket-keys")


def test_resumed_after_restart(w):
    w.start_cloud()
    agent = w.start_agent()
    expect(status(w, agent)["tls_resumed"] is False, "the first connection cannot be resumed")
    st = os.stat(keys_path(w))
    expect(stat.S_IMODE(st.st_mode) == 0o600, f"ticket-keys mode {oct(st.st_mode)}")
    restart_cloud(w, agent)
    poll(lambda: status(w, agent).get("connected"), seconds(10), "the agent connected")
    expect(status(w, agent)["tls_resumed"] is True, "the session was not resumed after the restart")
    expect(metric(w, "tether_cloud_handshakes_resumed_total") == 1, "the cloud did not count the resumption")
    # The same device, and calls work on the resumed session.
    devices = json.loads(w.tether("list", "--json").stdout)
    expect(any(d.get("id") == agent.device_id and d.get("connected") for d in devices),
           f"device not connected: {devices}")
    r = w.tether("call", agent.device_id, "add", "2,3")
    expect(r.stdout.strip() == "5", f"call on the resumed session returned {r.stdout!r}")


def test_revoked_cannot_resume(w):
    w.start_cloud()
    agent = w.start_agent()
    mark = w.cloud.mark()
    req = urllib.request.Request(f"{w.api}/v1/devices/{agent.device_id}/revocation",
                                 data=json.dumps({"reason": "stolen key"}).encode(), method="PUT",
                                 headers={"Authorization": f"Bearer {w.token}",
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10 * SLOW) as r:
        expect(r.status == 200, f"revoke: {r.status}")
    # The cloud closes the session; the agent comes back offering its
    # ticket, which is not honoured: the full handshake is refused and
    # logged as always, and so are the next ones.
    w.cloud.wait_line(r"Refused a session from .*is revoked", timeout=20, start=mark)
    poll(lambda: metric(w, 'tether_cloud_handshakes_refused_total{reason="tls"}') >= 3, seconds(20),
         "more refused handshakes")
    expect(metric(w, "tether_cloud_handshakes_resumed_total") == 0, "a revoked device resumed")
    devices = json.loads(w.tether("list", "--json").stdout)
    expect(not any(d.get("id") == agent.device_id and d.get("connected") for d in devices),
           f"the revoked device is connected: {devices}")


def test_renewed_certificate_full_handshake(w):
    w.start_cloud()
    agent = w.start_agent()
    new_id, new_crt, new_key = w.new_device()

    def replace():
        # Atomic replacement, as a renewal writes its files.
        for src, dst in ((new_crt, agent.device[1]), (new_key, agent.device[2])):
            with open(src, "rb") as f:
                data = f.read()
            with open(dst + ".new", "wb") as f:
                f.write(data)
            os.rename(dst + ".new", dst)
    w.cloud.stop()
    w.daemons.remove(w.cloud)
    replace()
    mark = w.notify.mark()
    w.start_cloud(port=w.coap_port, api_port=w.api_port)
    w.wait_online(new_id, mark, timeout=seconds(30))
    expect(status(w, agent)["tls_resumed"] is False, "a session was resumed with a replaced certificate")
    expect(metric(w, "tether_cloud_handshakes_resumed_total") == 0, "the cloud resumed a session")


def test_ticket_keys_off(w):
    w.start_cloud("[Cloud]\nTicketKeySec=0\n")
    agent = w.start_agent()
    expect(not os.path.exists(keys_path(w)), "TicketKeySec=0 wrote ticket keys")
    restart_cloud(w, agent, "[Cloud]\nTicketKeySec=0\n")
    expect(status(w, agent)["tls_resumed"] is False, "resumed with TicketKeySec=0")
    expect(metric(w, "tether_cloud_handshakes_resumed_total") == 0, "the cloud counted a resumption")


def test_damaged_or_other_keys(w):
    w.start_cloud()
    agent = w.start_agent()
    amark = agent.mark()

    def damage():
        with open(keys_path(w), "wb") as f:
            f.write(b"garbage")
    restart_cloud(w, agent, before_start=damage)
    w.cloud.wait_line(r"The TLS ticket keys in '.*ticket-keys' cannot be used, replacing them", timeout=5)
    expect(os.path.getsize(keys_path(w)) > 7, "the damaged key file was not replaced")
    expect(status(w, agent)["tls_resumed"] is False, "resumed with keys the cloud no longer has")
    # Resumes with the new keys after the next restart...
    restart_cloud(w, agent)
    expect(status(w, agent)["tls_resumed"] is True, "not resumed with the replaced keys")
    # ...and falls back to a full handshake when the keys are gone.
    restart_cloud(w, agent, before_start=lambda: os.unlink(keys_path(w)))
    expect(status(w, agent)["tls_resumed"] is False, "resumed with keys the cloud no longer has")
    expect(agent.count("TLS handshake failed", start=amark) == 0, "the agent logged a failed handshake")


def test_new_ca_replaces_keys(w):
    """A reload with another CA replaces the ticket keys: no ticket
    outlives a change of trust. The agent keeps its own copy of the CA,
    so only the cloud's change can make its next handshake a full one."""
    agent_ca = w.path("agent-ca.crt")
    shutil.copy(w.path("pki", "ca.crt"), agent_ca)
    w.start_cloud()
    agent = w.start_agent(ca=agent_ca)
    before = open(keys_path(w), "rb").read()
    # Another CA beside the first one in the cloud's CAFile.
    w.pki("ca", w.path("pki2"))
    with open(w.path("pki", "ca.crt"), "a") as f, open(w.path("pki2", "ca.crt")) as g:
        f.write(g.read())
    mark = w.cloud.mark()
    w.cloud.signal(signal.SIGHUP)
    w.cloud.wait_line(r"The CA changed: TLS ticket keys replaced", timeout=10, start=mark)
    expect(open(keys_path(w), "rb").read() != before, "the ticket key file was not replaced")
    restart_cloud(w, agent)
    expect(status(w, agent)["tls_resumed"] is False, "a ticket outlived the change of CA")
    # A reload with the same CA keeps them: the next restart resumes.
    mark = w.cloud.mark()
    w.cloud.signal(signal.SIGHUP)
    w.cloud.wait_line(r"Reloaded the TLS certificate", timeout=10, start=mark)
    restart_cloud(w, agent)
    expect(status(w, agent)["tls_resumed"] is True, "not resumed after a reload with the same CA")


def test_new_ca_after_restart(w):
    """A restart with another CA (the old one no longer trusted): no
    ticket outlives the change of trust, although the ticket keys are
    kept. The agent's certificate is from the old CA: refused."""
    agent_ca = w.path("agent-ca.crt")
    shutil.copy(w.path("pki", "ca.crt"), agent_ca)
    w.start_cloud()
    agent = w.start_agent(ca=agent_ca)
    before = open(keys_path(w), "rb").read()
    w.cloud.stop()
    w.daemons.remove(w.cloud)
    w.pki("ca", w.path("pki2"))
    shutil.copy(w.path("pki2", "ca.crt"), w.path("pki", "ca.crt"))
    w.start_cloud(port=w.coap_port, api_port=w.api_port)
    poll(lambda: metric(w, 'tether_cloud_handshakes_refused_total{reason="tls"}') >= 1 or
         metric(w, "tether_cloud_handshakes_resumed_total") >= 1, seconds(20), "the agent reconnected")
    expect(metric(w, "tether_cloud_handshakes_resumed_total") == 0,
           "a device of the CA no longer trusted resumed its session")
    w.cloud.wait_line(r"Refused a session from .*not verified", timeout=seconds(20))
    devices = json.loads(w.tether("list", "--json").stdout)
    expect(not any(d.get("id") == agent.device_id and d.get("connected") for d in devices),
           f"a device of the CA no longer trusted is connected: {devices}")
    expect(open(keys_path(w), "rb").read()[:8] == before[:8], "the ticket key file changed format")


def test_ticket_outlives_its_lifetime(w):
    """A ticket lives at most twice TicketKeySec=, also when the cloud was
    down longer than that: its keys, made before, are too old to open
    anything. The cloud's wall clock is stepped (tests/clock/wallclock.c);
    the agent's is not, so it still offers its ticket."""
    if not os.path.exists(WALLCLOCK):
        raise Skip(f"{WALLCLOCK} is not built")
    clock = w.path("cloud.clock")

    def step(offset):
        with open(clock + ".new", "w") as f:
            f.write(f"{offset}\n")
        os.replace(clock + ".new", clock)
    step(0)
    env = {"LD_PRELOAD": WALLCLOCK, "TETHER_TEST_CLOCK_FILE": clock,
           "ASAN_OPTIONS": os.environ.get("ASAN_OPTIONS", "") + ":verify_asan_link_order=0"}
    conf = "[Cloud]\nTicketKeySec=600\n"
    w.start_cloud(conf, env=env)
    agent = w.start_agent()
    w.cloud.stop()
    w.daemons.remove(w.cloud)
    step(10 * 86400)  # ten days later
    mark = w.notify.mark()
    w.start_cloud(conf, port=w.coap_port, api_port=w.api_port, env=env)
    w.wait_online(agent.device_id, mark, timeout=seconds(30))
    poll(lambda: status(w, agent).get("connected"), seconds(10), "the agent connected")
    expect(status(w, agent)["tls_resumed"] is False, "a ticket ten days old resumed (TicketKeySec=600)")
    expect(metric(w, "tether_cloud_handshakes_resumed_total") == 0, "the cloud resumed a ten-day-old ticket")


def s_client(w, sess_in=None, sess_out=None, cert=None, key=None):
    """One TLS 1.3 handshake by openssl s_client, held until the cloud
    closes the session (HandshakeTimeoutSec=): its output."""
    argv = ["openssl", "s_client", "-connect", f"127.0.0.1:{w.coap_port}", "-CAfile", w.path("pki", "ca.crt"),
            "-tls1_3", "-alpn", "coap", "-ign_eof"]
    for opt, v in (("-sess_in", sess_in), ("-sess_out", sess_out), ("-cert", cert), ("-key", key)):
        if v:
            argv += [opt, v]
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=seconds(30))
    return (r.stdout + r.stderr).decode(errors="replace")


def test_anonymous_gets_no_ticket(w):
    """An anonymous (enrollment) session is issued no ticket, not even
    when it offered a ticket under the previous key that is not honoured
    (here: of a device revoked since)."""
    if not os.path.exists(WALLCLOCK):
        raise Skip(f"{WALLCLOCK} is not built")
    clock = w.path("cloud.clock")

    def step(offset):
        with open(clock + ".new", "w") as f:
            f.write(f"{offset}\n")
        os.replace(clock + ".new", clock)
    step(0)
    env = {"LD_PRELOAD": WALLCLOCK, "TETHER_TEST_CLOCK_FILE": clock,
           "ASAN_OPTIONS": os.environ.get("ASAN_OPTIONS", "") + ":verify_asan_link_order=0"}
    conf = (f"[Cloud]\nTicketKeySec=600\n[Enroll]\nCACertificate={w.path('pki', 'ca.crt')}\n"
            f"CAKey={w.path('pki', 'ca.key')}\n")
    timing = f"PingSec=5\nDeviceTimeoutSec={seconds(15):.0f}\nCallTimeoutSec=5\nHandshakeTimeoutSec=1"
    w.start_cloud(conf, env=env, timing=timing)
    agent = w.start_agent(wait_online=True)
    sess = w.path("device.sess")
    out = s_client(w, sess_out=sess, cert=agent.device[1], key=agent.device[2])
    expect("New Session Ticket arrived" in out, f"the device got no ticket: {out}")
    req = urllib.request.Request(f"{w.api}/v1/devices/{agent.device_id}/revocation",
                                 data=json.dumps({"reason": "stolen key"}).encode(), method="PUT",
                                 headers={"Authorization": f"Bearer {w.token}",
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10 * SLOW) as r:
        expect(r.status == 200, f"revoke: {r.status}")
    agent.stop()
    w.daemons.remove(agent)
    # The key that sealed the ticket is now the previous one.
    w.cloud.stop()
    w.daemons.remove(w.cloud)
    step(700)
    w.start_cloud(conf, port=w.coap_port, api_port=w.api_port, env=env, timing=timing)
    out = s_client(w, sess_in=sess)
    expect("Reused" not in out, f"a revoked device's ticket resumed: {out}")
    expect("New Session Ticket arrived" not in out, f"an anonymous session got a ticket: {out}")


def test_reload_during_handshake(w):
    """SIGHUP (new TLS keys, the old ones freed) between a device's
    ClientHello and its certificate: the handshake completes, checked with
    the keys loaded now, and the cloud uses nothing it freed (run under
    --enable-sanitizers to see it)."""
    w.start_cloud()
    dev_id, crt, key = w.new_device()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(w.path("pki", "ca.crt"))
    ctx.load_cert_chain(crt, key)
    ctx.check_hostname = False
    ctx.set_alpn_protocols(["coap"])
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(inc, out)
    sock = socket.create_connection(("127.0.0.1", w.coap_port), timeout=seconds(10))
    done = False
    while not done:
        try:
            tls.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            pass
        if out.pending and not done:
            sock.sendall(out.read())
        if not done:
            data = sock.recv(65536)
            expect(data, "the cloud closed the handshake")
            inc.write(data)
    # The client's Certificate and Finished are in out, not sent yet.
    mark = w.cloud.mark()
    w.cloud.signal(signal.SIGHUP)
    w.cloud.wait_line(r"Reloaded the TLS certificate", timeout=10, start=mark)
    sock.sendall(out.read())
    # The cloud's ticket comes once it accepted the certificate.
    got = b""
    while not got:
        data = sock.recv(65536)
        expect(data, "the cloud closed the session after the reload")
        inc.write(data)
        try:
            got = tls.read(1) or b"x"
        except ssl.SSLWantReadError:
            got = b"x" if tls.session and tls.session.has_ticket else b""
    sock.close()
    expect(w.cloud.proc.poll() is None, "the cloud died")


if __name__ == "__main__":
    sys.exit(run([test_resumed_after_restart, test_revoked_cannot_resume, test_renewed_certificate_full_handshake,
                  test_ticket_keys_off, test_damaged_or_other_keys, test_new_ca_replaces_keys,
                  test_new_ca_after_restart, test_ticket_outlives_its_lifetime, test_anonymous_gets_no_ticket,
                  test_reload_during_handshake,
                  # The same checks with the handshakes on two threads and in the loop.
                  with_threads(test_resumed_after_restart), with_threads(test_revoked_cannot_resume),
                  with_threads(test_anonymous_gets_no_ticket), with_threads(test_reload_during_handshake),
                  in_loop(test_revoked_cannot_resume), in_loop(test_anonymous_gets_no_ticket)],
                 emulated="ok"))
