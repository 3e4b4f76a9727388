#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""[Cloud] Host= with several entries (NAME:PORT, IPv4:PORT, ...): on
every attempt the agent goes through them in order, each with every
address its name resolves to, before it backs off; the cloud's
certificate must name the entry it came from; after a connection ends,
the next attempt starts again from the first entry; enrollment goes
through the entries the same way; a reload that changes Host= reconnects.

Several clouds here are several tether-cloudd processes on loopback, each
with its own state directory and ports."""

import json
import os
import re
import signal
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Failure, api_json, expect, run, seconds  # noqa: E402


def closed_port():
    """A TCP port on 127.0.0.1 that nothing listens on (just released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cloud:
    """One tether-cloudd of the test: its daemon and its ports."""

    def __init__(self, w, name, port=0, **kw):
        self.daemon = w.start_cloud(port=port, state_dir=w.path(f"{name}-state"), **kw)
        self.daemon.name = name
        self.port = w.coap_port
        self.api_port = w.api_port


def call(w, cloud, dev):
    """tether call DEV add 2,3 through this cloud's API."""
    saved, w.api_port = w.api_port, cloud.api_port
    try:
        return w.tether("call", dev, "add", "2,3").stdout.strip()
    finally:
        w.api_port = saved


def status(w, a):
    return json.loads(w.tetherctl(a, "status", "--json").stdout)


def connected_line(host, port):
    """The agent's line for a connection to the entry host:port."""
    return rf"Connected to {re.escape(host)}:{port}( \(.+\))?$"


def test_first_refused_then_second_then_first_again(w):
    """The first entry refuses (nothing listens on its port): the agent
    goes on to the second at once, without a backoff. Once the first is
    up, a dropped connection brings the agent back to the first, although
    the second is up again too."""
    pa = closed_port()
    b = Cloud(w, "cloud-b")
    notified = w.notify.mark()
    a = w.start_agent(host=f"127.0.0.1:{pa} 127.0.0.1:{b.port}")
    w.notify.wait(lambda m: m.get("STATUS", "").startswith(f"Connecting to 127.0.0.1:{b.port} (127.0.0.1:{pa} "
                                                           f"failed: 127.0.0.1:{pa}: "),
                  seconds(5), "STATUS= naming the second entry", notified)
    a.wait_line(rf"Failed to connect to 127\.0\.0\.1:{pa} \(127\.0\.0\.1:{pa}: .+\), trying the next host, "
                rf"127\.0\.0\.1:{b.port}$")
    a.wait_line(connected_line("127.0.0.1", b.port))
    expect(a.count("retrying in") == 0, "the agent backed off before it tried the second entry")
    st = status(w, a)
    expect(st["cloud_host"] == "127.0.0.1" and st["cloud_port"] == b.port, f"status names {st['cloud_host']}:"
           f"{st['cloud_port']}, not the entry connected to")
    expect(st["cloud_hosts"] == [{"host": "127.0.0.1", "port": pa}, {"host": "127.0.0.1", "port": b.port}],
           f"cloud_hosts: {st['cloud_hosts']}")
    expect(re.search(rf"^Status: +Connected to 127\.0\.0\.1:{b.port}$", w.tetherctl(a, "status").stdout, re.M),
           "tetherctl status does not name the entry connected to")
    expect(re.search(rf"^Cloud: +127\.0\.0\.1:{b.port} \(entry 2 of 2 in Host=\)$",
                     w.tetherctl(a, "status").stdout, re.M), "tetherctl status: no 'entry 2 of 2'")
    expect(call(w, b, a.device_id) == "5", "a call through the second cloud did not return 5")

    first = Cloud(w, "cloud-a", port=pa)
    mark = a.mark()
    b.daemon.stop()
    b = Cloud(w, "cloud-b", port=b.port)
    a.wait_line(connected_line("127.0.0.1", pa), start=mark)
    expect(a.count(rf"(Failed to connect to|Connected to) 127\.0\.0\.1:{b.port}", mark) == 0,
           "after the drop the agent tried the second entry before the first")
    expect(call(w, first, a.device_id) == "5", "a call through the first cloud did not return 5")
    expect(status(w, a)["cloud_port"] == pa, "status does not name the first entry")


def test_certificate_of_another_name_then_next(w):
    """The first entry, 127.0.0.1:PD, is a server of the same CA whose
    certificate names only 'localhost': refused for that entry, and the
    agent goes on to the second, localhost:PR, whose certificate names
    only 'localhost' too and is accepted there. Each entry's address is
    checked against that entry's own name."""
    for d in ("decoy", "real"):
        os.makedirs(w.path(d))
        for f in ("ca.crt", "ca.key"):
            os.link(w.path("pki", f), w.path(d, f))
        w.pki("server", w.path(d), "localhost")
    decoy = Cloud(w, "decoy", cert=w.path("decoy", "server.crt"), key=w.path("decoy", "server.key"))
    real = Cloud(w, "real", cert=w.path("real", "server.crt"), key=w.path("real", "server.key"))
    a = w.start_agent(host=f"127.0.0.1:{decoy.port},localhost:{real.port}")
    a.wait_line(rf"Failed to connect to 127\.0\.0\.1:{decoy.port} \(127\.0\.0\.1:{decoy.port}: the cloud's "
                r"certificate \(CN 'localhost'\) does not match host name '127\.0\.0\.1'\), trying the next host, "
                rf"localhost:{real.port}$")
    a.wait_line(connected_line("localhost", real.port))
    expect(a.count("retrying in") == 0, "the agent backed off before it tried the second entry")
    expect(decoy.daemon.count("connected from") == 0, "the decoy saw a device connect")
    expect(call(w, real, a.device_id) == "5", "a call did not return 5")


def test_two_clouds_on_localhost(w):
    """Host=localhost:PORT1 localhost:PORT2 with two clouds up: the agent
    takes the first; when it stops, the second; calls work through each."""
    c1 = Cloud(w, "cloud-1")
    c2 = Cloud(w, "cloud-2")
    a = w.start_agent(host=f"localhost:{c1.port} localhost:{c2.port}")
    a.wait_line(connected_line("localhost", c1.port))
    expect(call(w, c1, a.device_id) == "5", "a call through the first cloud did not return 5")
    mark = a.mark()
    c1.daemon.stop()
    a.wait_line(rf"Failed to connect to localhost:{c1.port} \(.+\), trying the next host, localhost:{c2.port}$",
                start=mark)
    a.wait_line(connected_line("localhost", c2.port), start=mark)
    expect(call(w, c2, a.device_id) == "5", "a call through the second cloud did not return 5")


def test_every_entry_fails_then_backoff(w):
    """Neither entry answers: both are tried and named, then the agent
    backs off naming the last; the next attempt starts from the first."""
    p1, p2 = closed_port(), closed_port()
    w.coap_port = p1
    device = w.new_device()
    a = w.start_agent(host=f"127.0.0.1:{p1} 127.0.0.1:{p2}", device=device, wait_online=False)
    a.wait_line(rf"Failed to connect to 127\.0\.0\.1:{p1} \(.+\), trying the next host, 127\.0\.0\.1:{p2}$")
    line = a.wait_line(rf"Disconnected from 127\.0\.0\.1:{p2} \(127\.0\.0\.1:{p2}: .+\); retrying in")
    mark = a.mark()
    a.wait_line(rf"Failed to connect to 127\.0\.0\.1:{p1} \(.+\), trying the next host", start=mark)
    expect(a.count(rf"Disconnected from 127\.0\.0\.1:{p1}") == 0, f"backed off after the first entry: {line}")


def test_unresolvable_first_entry(w):
    """A first entry whose name does not resolve is skipped like one that
    refuses."""
    c = Cloud(w, "cloud")
    a = w.start_agent(host=f"no-such-host.invalid:{c.port} 127.0.0.1:{c.port}")
    a.wait_line(rf"Failed to connect to no-such-host\.invalid:{c.port} \((cannot resolve 'no-such-host\.invalid'|"
                rf"name lookup timed out).*\), trying the next host, 127\.0\.0\.1:{c.port}$", timeout=seconds(10))
    a.wait_line(connected_line("127.0.0.1", c.port))


def test_reload_to_several_entries(w):
    """SIGHUP with a Host= that now lists another cloud first reconnects,
    to that one."""
    b = Cloud(w, "cloud-b")
    first = Cloud(w, "cloud-a")
    w.coap_port = b.port
    a = w.start_agent(host="127.0.0.1")
    a.wait_line(connected_line("127.0.0.1", b.port))
    with open(a.conf) as f:
        conf = f.read()
    conf = conf.replace("Host=127.0.0.1\n", f"Host=127.0.0.1:{first.port}, 127.0.0.1\n")
    with open(a.conf, "w") as f:
        f.write(conf)
    mark = a.mark()
    a.signal(signal.SIGHUP)
    a.wait_line(rf"Cloud settings changed, reconnecting to 127\.0\.0\.1:{first.port}, 127\.0\.0\.1:{b.port}$",
                start=mark)
    a.wait_line(connected_line("127.0.0.1", first.port), start=mark)
    expect(call(w, first, a.device_id) == "5", "a call through the cloud reloaded to did not return 5")


def test_enrollment_through_entries(w):
    """Enrollment (POST /enroll on its own anonymous session) goes through
    the entries as connections do: the first refuses, the second enrolls
    the device, which then connects to it."""
    closed = closed_port()
    extra = f"""[Enroll]
CACertificate={w.path('pki', 'ca.crt')}
CAKey={w.path('pki', 'ca.key')}
"""
    c = Cloud(w, "cloud", extra=extra)
    if c.daemon.count(r"Unknown section \[Enroll\]"):
        raise Failure("tether-cloudd has no [Enroll]")
    code, body = api_json(w, "POST", "/v1/provision", {"uses": 1})
    expect(code == 201, f"POST /v1/provision: {code} {body}")
    token_file = w.path("token")
    with open(token_file, "w") as f:
        f.write(body["token"] + "\n")
    os.chmod(token_file, 0o600)
    cert, key = w.path("agent.crt"), w.path("agent.key")
    conf = w.agent_conf("agent", cert, key, host=f"127.0.0.1:{closed} 127.0.0.1:{c.port}",
                        extra=f"[Enroll]\nDeviceID=gw-hosts\nTokenFile={token_file}\n")
    a = w.run_agent("agent", conf, ("gw-hosts", cert, key), wait_online=True)
    a.wait_line(rf"Enrollment: 127\.0\.0\.1:{closed}: .+, trying the next host, 127\.0\.0\.1:{c.port}$")
    a.wait_line("Enrolled as device 'gw-hosts'")
    a.wait_line(connected_line("127.0.0.1", c.port))
    expect(a.count("Enrollment as 'gw-hosts' failed") == 0, "the enrollment backed off before the second entry")


if __name__ == "__main__":
    sys.exit(run([test_first_refused_then_second_then_first_again, test_certificate_of_another_name_then_next,
                  test_two_clouds_on_localhost, test_every_entry_fails_then_backoff, test_unresolvable_first_entry,
                  test_reload_to_several_entries, test_enrollment_through_entries], emulated="ok"))
