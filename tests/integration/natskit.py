# SPDX-License-Identifier: Apache-2.0
"""NATS test kit: N real nats-server processes (Debian's nats-server 2.9)
forming one JetStream cluster on loopback, for the cluster-mode tests
(docs/cluster.md). N=1 is a standalone JetStream server. Each server has
its own generated configuration, store directory and log under the test's
scratch directory, free ports (client, route, monitoring) and a name n1..nN;
server 1 also listens for MQTT (which in nats-server 2.9 needs a server
name and JetStream).

Servers are numbered from 1, as their names and the tools/dev pid files
(nats-1.pid ...) are. kill(i) is a SIGKILL; start(i) starts server i again
with the same configuration, ports and store, so it rejoins with its data.
wait_ready() polls each running server's /healthz (JetStream included: in a
cluster it answers 200 only once the server is current with the meta
leader) and, on server 1, MQTT (a CONNECT answered "accepted").

    nats = NatsCluster(w, 3)       # w: a harness.World (cleans up) or a directory
    nats.wait_ready()
    conf = f"[Cluster]\\nNATS={nats.url}\\n"

users= makes the servers require a user (an authorization block, the same
on every server): a list of (name, password, permissions), permissions
None (everything) or {"publish": [subjects], "subscribe": [subjects]}, as
nats-server's configuration has them; MQTT clients log in as these users.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import urllib.error
import urllib.request

from harness import Failure, _die_with_parent, poll, seconds, skip

NATS_SERVER = "nats-server"


def skip_unless_available():
    """Exit 77 (skip) unless nats-server can be run."""
    if not shutil.which(NATS_SERVER):
        skip("nats-server is not installed (Debian package 'nats-server'; tools/dev deps installs it)")


def free_ports(n):
    """n distinct free TCP ports on 127.0.0.1 (held open until all are
    picked so that none is given twice; free again when this returns)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _mqtt_accepts(port, user=None):
    """An MQTT 3.1.1 CONNECT to port (as user: (name, password), or none)
    is answered CONNACK "accepted": the listener is up and its JetStream
    streams exist (the server makes them before it accepts the first
    client)."""
    def field(b):
        return len(b).to_bytes(2, "big") + b
    client_id = b"natskit-probe"
    flags, payload = 0x02, field(client_id)
    if user:
        flags |= 0xC0
        payload += field(user[0].encode()) + field(user[1].encode())
    body = b"\x00\x04MQTT\x04" + bytes([flags]) + b"\x00\x3c" + payload
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=seconds(2)) as sock:
            sock.sendall(bytes([0x10, len(body)]) + body)
            ack = b""
            while len(ack) < 4:
                chunk = sock.recv(4 - len(ack))
                if not chunk:
                    return False
                ack += chunk
            sock.sendall(b"\xe0\x00")  # DISCONNECT
            return ack == b"\x20\x02\x00\x00"
    except OSError:
        return False


class NatsServer:
    """One server of the cluster: its ports, directory and process."""

    def __init__(self, index, dir, client_port, route_port, http_port, mqtt_port):
        self.index = index
        self.name = f"n{index}"
        self.dir = dir
        self.client_port = client_port
        self.route_port = route_port
        self.http_port = http_port
        self.mqtt_port = mqtt_port
        self.conf = os.path.join(dir, "nats.conf")
        self.store = os.path.join(dir, "jetstream")
        self.log = os.path.join(dir, "nats.log")
        self.proc = None

    @property
    def url(self):
        return f"nats://127.0.0.1:{self.client_port}"

    def running(self):
        return self.proc is not None and self.proc.poll() is None


class NatsCluster:
    def __init__(self, world_or_dir, n=3, mqtt=True, cluster_name="tether-test", users=None):
        """Start n servers. world_or_dir: a harness.World (the servers live
        in its scratch directory under nats/ and are stopped with its
        cleanups) or a directory."""
        skip_unless_available()
        if n < 1:
            raise ValueError("a cluster has at least one server")
        if hasattr(world_or_dir, "path"):
            self.dir = world_or_dir.path("nats")
            world_or_dir.cleanups.append(self.stop_all)
        else:
            self.dir = world_or_dir
        self.cluster_name = cluster_name
        self.users = users or []
        ports = free_ports(4 * n)
        self.servers = []
        for i in range(n):
            p = ports[4 * i:4 * i + 4]
            d = os.path.join(self.dir, f"n{i + 1}")
            os.makedirs(d, exist_ok=True)
            self.servers.append(NatsServer(i + 1, d, p[0], p[1], p[2], p[3] if mqtt and i == 0 else None))
        for s in self.servers:
            self._write_conf(s)
        for s in self.servers:
            self.start(s.index)

    def _write_conf(self, s):
        lines = [
            f"server_name: {s.name}",
            f"listen: 127.0.0.1:{s.client_port}",
            f"http: 127.0.0.1:{s.http_port}",
            "jetstream {",
            f'  store_dir: "{s.store}"',
            "  max_memory_store: 268435456",
            "  max_file_store: 4294967296",
            "}",
        ]
        if len(self.servers) > 1:
            routes = ", ".join(f"nats-route://127.0.0.1:{o.route_port}" for o in self.servers if o is not s)
            lines += [
                "cluster {",
                f"  name: {self.cluster_name}",
                f"  listen: 127.0.0.1:{s.route_port}",
                f"  routes: [{routes}]",
                "}",
            ]
        if s.mqtt_port:
            lines += ["mqtt {", f"  listen: 127.0.0.1:{s.mqtt_port}", "}"]
        if self.users:
            lines += ["authorization {", "  users = ["]
            for name, password, perms in self.users:
                entry = f'    {{user: {json.dumps(name)}, password: {json.dumps(password)}'
                if perms is not None:
                    entry += ", permissions: {" + ", ".join(
                        f"{k}: {json.dumps(v)}" for k, v in perms.items()) + "}"
                lines.append(entry + "}")
            lines += ["  ]", "}"]
        with open(s.conf, "w") as f:
            f.write("\n".join(lines) + "\n")

    def server(self, i):
        if not 1 <= i <= len(self.servers):
            raise IndexError(f"no NATS server {i} (1..{len(self.servers)})")
        return self.servers[i - 1]

    @property
    def urls(self):
        """Every server's client URL, server 1 first."""
        return [s.url for s in self.servers]

    @property
    def url(self):
        """The URLs as NATS= takes them (comma separated)."""
        return ",".join(self.urls)

    @property
    def mqtt_port(self):
        return self.servers[0].mqtt_port

    def pid(self, i):
        s = self.server(i)
        return s.proc.pid if s.running() else None

    def start(self, i):
        """Start server i (again: same configuration, ports and store)."""
        s = self.server(i)
        if s.running():
            return
        with open(s.log, "a") as log:
            s.proc = subprocess.Popen([NATS_SERVER, "-c", s.conf], stdin=subprocess.DEVNULL,
                                      stdout=log, stderr=log, preexec_fn=_die_with_parent)

    def kill(self, i):
        """SIGKILL server i and reap it."""
        s = self.server(i)
        if s.running():
            s.proc.send_signal(signal.SIGKILL)
        if s.proc is not None:
            s.proc.wait()

    def _healthy(self, s):
        if not s.running():
            raise Failure(f"nats-server {s.name} exited ({s.proc.returncode}); its log: {s.log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{s.http_port}/healthz", timeout=seconds(2)) as r:
                if r.status != 200:
                    return False
        except (urllib.error.URLError, OSError):
            return False  # not listening yet, or 503 until JetStream is current
        return s.mqtt_port is None or _mqtt_accepts(s.mqtt_port, self.users[0][:2] if self.users else None)

    def wait_ready(self, timeout=30):
        """Until every running server answers /healthz with 200 (JetStream
        current) and server 1's MQTT listener accepts a client."""
        for s in self.servers:
            if s.proc is not None and s.proc.poll() is None:
                poll(lambda s=s: self._healthy(s), timeout, f"nats-server {s.name} to be ready")

    def stop_all(self, timeout=10):
        """SIGTERM every running server and wait; SIGKILL what is left."""
        for s in self.servers:
            if s.running():
                s.proc.send_signal(signal.SIGTERM)
        for s in self.servers:
            if s.proc is None:
                continue
            try:
                s.proc.wait(seconds(timeout))
            except subprocess.TimeoutExpired:
                s.proc.kill()
                s.proc.wait()

    def log_tail(self, i, lines=40):
        """The last lines of server i's log, for failure messages."""
        try:
            with open(self.server(i).log, errors="replace") as f:
                return f.read().splitlines()[-lines:]
        except OSError:
            return []
