#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""The agent tries every address its cloud's host name resolves to, in
getaddrinfo's order, before it backs off.

Each test makes a network namespace with only a loopback and its own
/etc/hosts (`ip netns exec` bind-mounts /etc/netns/NAME/hosts), in which
the test's cloud name resolves to ::1 first and 127.0.0.1 second. The
cloud and the agent both run inside it."""

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import EMULATOR, SLOW, TETHER, Failure, NetNs, Skip, expect, run  # noqa: E402

NAME = "cloud.tether.test"
HOSTS = f"::1\t{NAME}\n127.0.0.1\t{NAME}\n127.0.0.1\tlocalhost\n"
RESOLVE = ("import socket, sys\n"
           "print(' '.join(a[4][0] for a in socket.getaddrinfo(sys.argv[1], None, socket.AF_UNSPEC,"
           " socket.SOCK_STREAM)))")


def namespace(w):
    """The namespace, checked to resolve NAME the way the test needs: the
    same getaddrinfo() call (AF_UNSPEC, SOCK_STREAM) the agent makes."""
    ns = NetNs(w, uplink=False, hosts=HOSTS)
    r = ns.run(["python3", "-c", RESOLVE, NAME], capture_output=True, text=True)
    order = r.stdout.split()
    if r.returncode != 0 or order != ["::1", "127.0.0.1"]:
        raise Skip(f"'{NAME}' resolves to {order or r.stderr.strip()} in the namespace, not ::1 then "
                   "127.0.0.1 (is IPv6 off here?)")
    # The cloud's certificate must carry the name the agent checks.
    w.pki("server", "--force", w.path("pki"), "localhost", "127.0.0.1", NAME)
    return ns


def call_in(ns, w, dev):
    """A function call through the cloud's API, which listens inside ns."""
    env = dict(os.environ, TETHER_API=f"http://127.0.0.1:{w.api_port}", TETHER_TOKEN=w.token)
    r = ns.run(EMULATOR + [TETHER, "call", dev, "add", "2,3"], capture_output=True, text=True, env=env,
               timeout=30 * SLOW)
    if r.returncode != 0:
        raise Failure(f"tether call failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout.strip()


def test_refused_address_then_next(w):
    """::1 refuses the connection (the cloud listens on 127.0.0.1 only):
    the agent moves on to 127.0.0.1 at once, without a backoff."""
    ns = namespace(w)
    w.start_cloud(listen="127.0.0.1", prefix=ns.prefix)
    a = w.start_agent(host=NAME, prefix=ns.prefix)
    port = w.coap_port
    a.wait_line(rf"Failed to connect to {re.escape(NAME)}:{port} at \[::1\]:{port} \(.+\), "
                r"trying the next address")
    a.wait_line(rf"Connected to {re.escape(NAME)}:{port} \(127\.0\.0\.1\)")
    expect(a.count("retrying in") == 0, "the agent backed off before it tried the second address")
    expect(call_in(ns, w, a.device_id) == "5", "a call through the cloud did not return 5")


def test_handshake_failure_then_next(w):
    """On ::1 another server of the same CA answers with a certificate for
    another name: the TLS handshake fails there, and the agent goes on to
    127.0.0.1 instead of backing off and coming back to ::1."""
    ns = namespace(w)
    os.makedirs(w.path("decoy"))
    for f in ("ca.crt", "ca.key"):
        os.link(w.path("pki", f), w.path("decoy", f))
    w.pki("server", w.path("decoy"), "cloud.invalid")
    decoy = w.start_cloud(listen="::1", cert=w.path("decoy", "server.crt"), key=w.path("decoy", "server.key"),
                          state_dir=w.path("decoy-state"), prefix=ns.prefix)
    port = w.coap_port
    decoy.name = "decoy"
    w.start_cloud(listen="127.0.0.1", port=port, prefix=ns.prefix)
    a = w.start_agent(host=NAME, prefix=ns.prefix)
    a.wait_line(rf"Failed to connect to {re.escape(NAME)}:{port} at \[::1\]:{port} \(the cloud's certificate "
                rf"\(CN 'cloud.invalid'\) does not match host name '{re.escape(NAME)}'\), trying the next address")
    a.wait_line(rf"Connected to {re.escape(NAME)}:{port} \(127\.0\.0\.1\)")
    expect(a.count("retrying in") == 0, "the agent backed off before it tried the second address")
    expect(call_in(ns, w, a.device_id) == "5", "a call through the cloud did not return 5")


def test_every_address_fails(w):
    """Nothing listens on either address: both are tried and named, then
    the agent backs off as usual, and connects once the cloud is up."""
    ns = namespace(w)
    w.start_cloud(listen="127.0.0.1", prefix=ns.prefix)
    port = w.coap_port
    w.cloud.stop()
    device = w.new_device()
    a = w.start_agent(host=NAME, prefix=ns.prefix, device=device, wait_online=False)
    a.wait_line(rf"Failed to connect to {re.escape(NAME)}:{port} at \[::1\]:{port} \(.+\), "
                r"trying the next address")
    a.wait_line(rf"Disconnected from {re.escape(NAME)}:{port} \(127\.0\.0\.1:{port}: .+\); retrying in")
    mark = w.notify.mark()
    w.start_cloud(listen="127.0.0.1", port=port, prefix=ns.prefix)
    w.wait_online(device[0], mark)


if __name__ == "__main__":
    sys.exit(run([test_refused_address_then_next, test_handshake_failure_then_next, test_every_address_fails],
                 emulated="network namespaces and /etc/netns are the host's; left to the native run"))
