"""Integration test harness: real tether-cloudd and tetherd processes, real
TLS on loopback, free ports, a development PKI made with tether-pki.

Nothing here sleeps to synchronise: daemons report readiness and device
state through sd_notify (the harness owns NOTIFY_SOCKET), and log lines are
waited for as they arrive. Every wait has a deadline so a broken daemon
fails the test instead of hanging it.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

BUILD = os.environ.get("top_builddir") or os.path.abspath(
    os.path.join(os.path.dirname(__file__), "..", "..", "build"))
SRC = os.environ.get("top_srcdir") or os.path.abspath(
    os.path.join(os.path.dirname(__file__), "..", ".."))

TETHERD = os.path.join(BUILD, "agent", "tetherd")
CLOUDD = os.path.join(BUILD, "cloud", "tether-cloudd")
TETHER = os.path.join(BUILD, "tools", "tether")
PKI = os.path.join(BUILD, "tools", "tether-pki")
PLUGINS = os.path.join(BUILD, "plugins", "example", ".libs")
TEST_PLUGINS = os.path.join(BUILD, "tests", "plugins", ".libs")

# Valgrind or other wrappers for the daemons, e.g. "valgrind -q --error-exitcode=99".
WRAPPER = os.environ.get("TETHER_TEST_WRAPPER", "").split()
SLOW = 10 if WRAPPER else 1


class Failure(Exception):
    pass


def skip(reason):
    print(f"SKIP: {reason}")
    sys.exit(77)


class NotifySocket:
    """A unix datagram socket standing in for systemd's notify socket."""

    def __init__(self, path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.messages = []
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            if not data:  # shut down by close()
                return
            fields = {}
            for line in data.decode(errors="replace").splitlines():
                if "=" in line:
                    k, v = line.split("=", 1)
                    fields[k] = v
            with self.cond:
                self.messages.append(fields)
                self.cond.notify_all()

    def wait(self, pred, timeout, what, start=0):
        """Wait for a message (index >= start) matching pred; return it."""
        deadline = time.monotonic() + timeout * SLOW
        with self.cond:
            while True:
                for m in self.messages[start:]:
                    if pred(m):
                        return m
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Failure(f"timed out waiting for {what}; got {self.messages[start:]}")
                self.cond.wait(left)

    def mark(self):
        with self.cond:
            return len(self.messages)

    def close(self):
        # Wake the reader and wait for it before the fd is closed: a reader
        # still in recv() when its fd number is reused by the next World's
        # socket would steal that World's messages (seen as a READY=1 that
        # never arrived).
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.thread.join(5)
        self.sock.close()


class Daemon:
    """A child process whose stderr lines are collected and can be awaited."""

    def __init__(self, name, argv, env, logdir):
        self.name = name
        self.killed = False
        self.lines = []
        self.cond = threading.Condition()
        self.log = open(os.path.join(logdir, f"{name}.log"), "a")
        self.proc = subprocess.Popen(WRAPPER + argv, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            self.log.write(line + "\n")
            self.log.flush()
            with self.cond:
                self.lines.append(line)
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def mark(self):
        with self.cond:
            return len(self.lines)

    def wait_line(self, pattern, timeout=10, start=0):
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout * SLOW
        with self.cond:
            while True:
                for line in self.lines[start:]:
                    if rx.search(line):
                        return line
                if self.proc.poll() is not None and not self.thread.is_alive():
                    raise Failure(f"{self.name} exited ({self.proc.returncode}) before logging /{pattern}/")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Failure(f"timed out waiting for {self.name} to log /{pattern}/")
                self.cond.wait(min(left, 0.5))

    def signal(self, sig):
        self.proc.send_signal(sig)

    def stop(self, timeout=10):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout * SLOW)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise Failure(f"{self.name} did not stop on SIGTERM")
        self.thread.join(5)
        self.log.close()
        return self.proc.returncode

    def kill(self):
        self.killed = True
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.thread.join(5)


class World:
    """A scratch directory with a PKI, a cloud and any number of agents."""

    def __init__(self, keep=False):
        for path in (TETHERD, CLOUDD, TETHER, PKI):
            if not os.access(path, os.X_OK):
                raise Failure(f"{path} is not built")
        self.dir = tempfile.mkdtemp(prefix="tether-test-")
        self.keep = keep or os.environ.get("TETHER_TEST_KEEP")
        self.notify = NotifySocket(os.path.join(self.dir, "notify.sock"))
        self.daemons = []
        self.cloud = None
        self.coap_port = self.api_port = None
        self.pki("ca", self.path("pki"))
        self.pki("server", self.path("pki"), "localhost", "127.0.0.1")
        self.token = self.pki("token", self.path("tokens")).strip().split()[-1]

    def path(self, *parts):
        return os.path.join(self.dir, *parts)

    def pki(self, *args):
        r = subprocess.run([PKI, *args], capture_output=True, text=True)
        if r.returncode != 0:
            raise Failure(f"tether-pki {' '.join(args)} failed: {r.stderr.strip()}")
        return r.stdout

    def new_device(self, pki_dir=None):
        pki_dir = pki_dir or self.path("pki")
        out = self.pki("device", pki_dir)
        dev_id = out.strip().split()[-1]
        return dev_id, os.path.join(pki_dir, "devices", dev_id + ".crt"), \
            os.path.join(pki_dir, "devices", dev_id + ".key")

    def env(self, notify=True):
        e = dict(os.environ)
        e.pop("NOTIFY_SOCKET", None)
        if notify:
            e["NOTIFY_SOCKET"] = self.notify.path
        e.setdefault("TETHER_LOG_LEVEL", "info")
        return e

    def start_cloud(self, extra="", cert=None, key=None, port=0, api_port=0):
        cert = cert or self.path("pki", "server.crt")
        key = key or self.path("pki", "server.key")
        conf = self.path("cloud.conf")
        with open(conf, "w") as f:
            f.write(f"""[Cloud]
Listen=127.0.0.1
Port={port}
CAFile={self.path('pki', 'ca.crt')}
Certificate={cert}
Key={key}
PingSec=5
DeviceTimeoutSec=15
CallTimeoutSec=5
[API]
Listen=127.0.0.1
Port={api_port}
TokenFile={self.path('tokens')}
{extra}""")
        mark = self.notify.mark()
        self.cloud = Daemon("cloud", [CLOUDD, "--config", conf], self.env(), self.dir)
        self.daemons.append(self.cloud)
        m = self.notify.wait(lambda m: m.get("READY") == "1" and "X_COAP_PORT" in m, 20,
                             "tether-cloudd READY=1", mark)
        self.coap_port = int(m["X_COAP_PORT"])
        self.api_port = int(m["X_API_PORT"])
        return self.cloud

    @property
    def api(self):
        return f"http://127.0.0.1:{self.api_port}"

    def agent_conf(self, name, cert, key, host="localhost", plugin_dir=PLUGINS, extra="", ca=None):
        conf = self.path(f"{name}.conf")
        with open(conf, "w") as f:
            f.write(f"""[Cloud]
Host={host}
Port={self.coap_port}
CAFile={ca or self.path('pki', 'ca.crt')}
[Device]
Certificate={cert}
Key={key}
[Connection]
KeepaliveSec=5
KeepaliveTimeoutSec=3
ReconnectMinSec=0.2
ReconnectMaxSec=2
ConnectTimeoutSec=5
[Plugins]
Directory={plugin_dir}
[Plugin example]
IntervalSec=0
{extra}""")
        return conf

    def start_agent(self, name="agent", wait_online=True, **kw):
        dev_id, cert, key = kw.pop("device", None) or self.new_device()
        conf = self.agent_conf(name, cert, key, **kw)
        mark = self.notify.mark()
        d = Daemon(name, [TETHERD, "--config", conf], self.env(), self.dir)
        d.device_id = dev_id
        d.conf = conf
        self.daemons.append(d)
        if wait_online:
            self.wait_online(dev_id, mark)
        return d

    def wait_online(self, dev_id, start=0, timeout=20):
        self.notify.wait(lambda m: m.get("X_TETHER_ONLINE") == dev_id, timeout,
                         f"device {dev_id} online", start)

    def tether(self, *args, check=True, timeout=30, token=None):
        env = dict(os.environ, TETHER_API=self.api, TETHER_TOKEN=token or self.token)
        r = subprocess.run([TETHER, *args], capture_output=True, text=True, env=env, timeout=timeout)
        if check and r.returncode != 0:
            raise Failure(f"tether {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def subscribe(self, *args):
        """Start `tether subscribe --json ...`; returns a Subscriber."""
        env = dict(os.environ, TETHER_API=self.api, TETHER_TOKEN=self.token)
        return Subscriber([TETHER, "subscribe", "--json", *args], env)

    def close(self):
        errors = []
        for d in reversed(self.daemons):
            try:
                rc = d.stop()
                if rc not in (0, None) and not d.killed:
                    errors.append(f"{d.name} exited with {rc}")
            except Failure as e:
                errors.append(str(e))
        self.notify.close()
        if self.keep:
            print(f"kept {self.dir}")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)
        if errors:
            raise Failure("; ".join(errors))


class Subscriber:
    def __init__(self, argv, env):
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL)
        self.events = []
        self.errors = []
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.err_thread = threading.Thread(target=self._run_err, daemon=True)
        self.err_thread.start()

    def _run_err(self):
        for raw in self.proc.stderr:
            with self.cond:
                self.errors.append(raw.decode(errors="replace").rstrip("\n"))
                self.cond.notify_all()

    def wait_ready(self, timeout=10):
        """tether subscribe says so on stderr once the stream is open."""
        deadline = time.monotonic() + timeout * SLOW
        with self.cond:
            while not any("ubscribed" in line for line in self.errors):
                if self.proc.poll() is not None:
                    raise Failure(f"tether subscribe exited ({self.proc.returncode}): {self.errors}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Failure(f"tether subscribe did not open its stream: {self.errors}")
                self.cond.wait(min(left, 0.5))
        return self

    def _run(self):
        for raw in self.proc.stdout:
            try:
                ev = json.loads(raw)
            except ValueError:
                ev = {"unparsed": raw.decode(errors="replace")}
            with self.cond:
                self.events.append(ev)
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def wait(self, pred, timeout=10, what="event"):
        deadline = time.monotonic() + timeout * SLOW
        with self.cond:
            while True:
                for ev in self.events:
                    if pred(ev):
                        return ev
                if self.proc.poll() is not None:
                    raise Failure(f"tether subscribe exited ({self.proc.returncode}): {self.errors}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Failure(f"timed out waiting for {what}; got {self.events}")
                self.cond.wait(min(left, 0.5))

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)


def run(tests):
    """Run test functions, each with a fresh World; TAP-ish output."""
    failed = 0
    print(f"1..{len(tests)}")
    for i, t in enumerate(tests, 1):
        w = None
        try:
            w = World()
            t(w)
            w.close()
            w = None
            print(f"ok {i} - {t.__name__}")
        except Exception as e:  # noqa: BLE001 - report every failure the same way
            failed += 1
            print(f"not ok {i} - {t.__name__}: {e}")
            if w:
                for d in w.daemons:
                    d.kill()
                print(f"# logs kept in {w.dir}")
                for d in w.daemons:
                    print(f"# --- {d.name} ---")
                    for line in d.lines[-40:]:
                        print(f"#   {line}")
        sys.stdout.flush()
    return 1 if failed else 0


def expect(cond, msg):
    if not cond:
        raise Failure(msg)
