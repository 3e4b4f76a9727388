# SPDX-License-Identifier: Apache-2.0
"""Integration test harness: real tether-cloudd and tetherd processes, real
TLS on loopback, free ports, a development PKI made with tether-pki.

Nothing here sleeps to synchronise: daemons report readiness and device
state through sd_notify (the harness owns NOTIFY_SOCKET), and log lines are
waited for as they arrive. Every wait has a deadline so a broken daemon
fails the test instead of hanging it.

Every time window a test relies on (a wait's deadline, a timeout or a
pulse it configures, a bound on how long something took) is multiplied by
one factor, TIME_FACTOR, so that a machine busy with other work (two
suites at once on two cores) passes: windows are generous, and nothing is
ever waited out for its full length when the awaited thing happens sooner.

Run some test functions of a file only by naming them:
python3 tests/integration/test-foo.py test_bar test_baz.
"""

import ctypes
import http.client
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

BUILD = os.environ.get("top_builddir") or os.path.abspath(
    os.path.join(os.path.dirname(__file__), "..", "..", "build"))
SRC = os.environ.get("top_srcdir") or os.path.abspath(
    os.path.join(os.path.dirname(__file__), "..", ".."))

TETHERD = os.path.join(BUILD, "agent", "tetherd")
CLOUDD = os.path.join(BUILD, "cloud", "tether-cloudd")
TETHER = os.path.join(BUILD, "tools", "tether")
PKI = os.path.join(BUILD, "tools", "tether-pki")
TETHERCTL = os.path.join(BUILD, "tools", "tetherctl")
PLUGINS = os.path.join(BUILD, "plugins", "example", ".libs")
TEST_PLUGINS = os.path.join(BUILD, "tests", "plugins", ".libs")
# Every in-tree plugin's shared object, by name.
BUILT_PLUGINS = {name: os.path.join(BUILD, "plugins", name, ".libs", name + ".so")
                 for name in ("example", "gpio", "sensors", "system")}
# The simulated GPIO chip (tests/gpiosim), preloaded into tetherd.
GPIOSIM_LIB = os.path.join(BUILD, "tests", "gpiosim", ".libs", "gpiosim.so")
sys.path.insert(0, os.path.join(SRC, "tests", "gpiosim"))

# An emulator for every program we built, when they were cross-built for
# another architecture: "qemu-aarch64 -L /usr/aarch64-linux-gnu" (set by
# configure when cross-compiling, see Makefile.am).
EMULATOR = os.environ.get("TETHER_TEST_EMULATOR", "").split()
# Valgrind or other wrappers for the daemons, e.g. "valgrind -q --error-exitcode=99".
WRAPPER = os.environ.get("TETHER_TEST_WRAPPER", "").split()
# How many times slower than native the daemons run: tests publish that
# many times fewer events under a wrapper or an emulator.
SLOWDOWN = 10 if WRAPPER else 3 if EMULATOR else 1


def _time_factor():
    v = os.environ.get("TETHER_TEST_TIME_FACTOR")
    if not v:
        return 3 * SLOWDOWN
    try:
        f = float(v)
    except ValueError:
        f = 0
    if not 0.1 <= f <= 1000:
        sys.exit(f"TETHER_TEST_TIME_FACTOR='{v}' is not a number from 0.1 to 1000")
    return f


# The one factor for every time window of the tests (see above): from
# TETHER_TEST_TIME_FACTOR, by default 3 (3 times the slowdown under a
# wrapper or an emulator).
TIME_FACTOR = _time_factor()
SLOW = TIME_FACTOR  # the older name, for time windows too


def seconds(s):
    """A time window of s seconds on an idle machine, as this run allows it."""
    return s * TIME_FACTOR


def whole_seconds(s):
    """seconds(s) rounded up, for settings that take whole seconds."""
    return math.ceil(seconds(s))


class Failure(Exception):
    pass


def poll(cond, timeout, what, interval=0.05):
    """Check cond() until it returns something true, and return that: for
    state nothing notifies us of (a sysfs value, a unit's invocation).
    Failure after timeout seconds (times TIME_FACTOR)."""
    deadline = time.monotonic() + timeout * TIME_FACTOR
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise Failure(f"timed out waiting for {what}")
        time.sleep(interval)


def server_connections(port):
    """The established TCP connections to local port `port` in this network
    namespace, from the kernel (ss -ti): {peer address: (bytes received,
    bytes not yet read by the server)}."""
    if not shutil.which("ss"):
        raise Skip("'ss' is not installed (tools/dev deps installs iproute2)")
    r = subprocess.run(["ss", "-tinH", "state", "established", f"( sport = :{port} )"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise Failure(f"ss failed: {r.stderr.strip()}")
    conns, peer = {}, None
    for line in r.stdout.splitlines():
        if not line[:1].isspace():
            f = line.split()
            peer, unread = f[3], int(f[0])
            conns[peer] = (0, unread)
        elif peer:
            m = re.search(r"\bbytes_received:(\d+)", line)
            if m:
                conns[peer] = (int(m.group(1)), conns[peer][1])
    return conns


def wait_request_read(port, before, timeout=10, what="the request"):
    """Until a connection to port that is not in before (a
    server_connections() result) has brought data that the server has
    read: a single-threaded daemon has then acted on it."""
    def read():
        return [p for p, (got, unread) in server_connections(port).items()
                if p not in before and got > 0 and unread == 0]
    poll(read, timeout, f"{what} to reach the server on port {port}")


class Skip(Exception):
    """A test function that cannot run here; the reason is printed."""


def skip(reason):
    print(f"SKIP: {reason}")
    sys.exit(77)


def needs_fault_injection():
    """Raise Skip unless the build has the OTA crash points
    (TETHER_OTA_CRASH_AT, ./configure --enable-fault-injection)."""
    try:
        with open(os.path.join(BUILD, "config.h")) as f:
            if "#define ENABLE_FAULT_INJECTION 1" in f.read():
                return
    except OSError:
        pass
    raise Skip("the crash points need a build with ./configure --enable-fault-injection")


def _die_with_parent():
    """In a child before exec: SIGTERM when the test process dies, so no
    daemon or `subscribe --resume` outlives a crashed test."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


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
        deadline = time.monotonic() + timeout * TIME_FACTOR
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
        self.thread.join(seconds(5))
        self.sock.close()


class Daemon:
    """A child process whose stderr lines are collected and can be awaited."""

    def __init__(self, name, argv, env, logdir, prefix=()):
        self.name = name
        self.killed = False
        self.lines = []
        self.cond = threading.Condition()
        self.log = open(os.path.join(logdir, f"{name}.log"), "a")
        # prefix: e.g. "ip netns exec NS", which exec()s: the pid stays ours.
        self.proc = subprocess.Popen(list(prefix) + WRAPPER + EMULATOR + argv, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     preexec_fn=_die_with_parent)
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
        deadline = time.monotonic() + timeout * TIME_FACTOR
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

    def count(self, pattern, start=0):
        rx = re.compile(pattern)
        with self.cond:
            return sum(1 for line in self.lines[start:] if rx.search(line))

    def status(self):
        """VmRSS and RssAnon in KiB and the number of open fds."""
        fields = {}
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "RssAnon"):
                    fields[k] = int(v.split()[0])
        fields["fds"] = len(os.listdir(f"/proc/{self.proc.pid}/fd"))
        return fields

    def stop(self, timeout=10):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout * TIME_FACTOR)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise Failure(f"{self.name} did not stop on SIGTERM")
        self.thread.join(seconds(5))
        self.log.close()
        return self.proc.returncode

    def kill(self):
        self.killed = True
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.thread.join(seconds(5))


def check_emulator():
    """Under an emulator (cross builds), skip the whole file if it cannot
    run a program that creates a thread: tetherd's resolver and tether's
    libcurl need threads (see tests/emulator/thread-probe.c)."""
    if not EMULATOR:
        return
    probe = os.path.join(BUILD, "tests", "emulator", "thread-probe")
    result = probe + ".result"  # one probe per build, not one per test file
    if os.path.exists(result):
        ok = open(result).read().strip() == "ok"
    else:
        try:
            r = subprocess.run(EMULATOR + [probe], capture_output=True, text=True, timeout=20)
            ok = r.returncode == 0 and "threads ok" in r.stdout
        except subprocess.TimeoutExpired:
            ok = False
        with open(result, "w") as f:
            f.write("ok\n" if ok else "hangs\n")
    if not ok:
        skip(f"'{' '.join(EMULATOR)}' cannot run a program that creates a thread (it hangs in "
             "pthread_create), and tetherd's resolver and tether's libcurl need threads")


class World:
    """A scratch directory with a PKI, a cloud and any number of agents."""

    def __init__(self, keep=False):
        for path in (TETHERD, CLOUDD, TETHER, PKI, TETHERCTL):
            if not os.access(path, os.X_OK):
                raise Failure(f"{path} is not built")
        self.dir = tempfile.mkdtemp(prefix="tether-test-")
        self.keep = keep or os.environ.get("TETHER_TEST_KEEP")
        self.notify = NotifySocket(os.path.join(self.dir, "notify.sock"))
        self.daemons = []
        self.cleanups = []  # run after the daemons stopped, pass or fail
        self.cloud = None
        self.coap_port = self.api_port = None
        # [Cloud] lines every cloud of this World starts with (with_threads()).
        self.cloud_tuning = os.environ.get("TETHER_TEST_CLOUD_TUNING", "").replace(";", "\n")
        self.pki("ca", self.path("pki"))
        self.pki("server", self.path("pki"), "localhost", "127.0.0.1")
        self.token = self.pki("token", self.path("tokens")).strip().split()[-1]

    def path(self, *parts):
        return os.path.join(self.dir, *parts)

    def pki(self, *args):
        r = subprocess.run(EMULATOR + [PKI, *args], capture_output=True, text=True)
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

    def start_cloud(self, extra="", cert=None, key=None, port=0, api_port=0, listen="127.0.0.1",
                    timing=None, state_dir=None, env=None, prefix=(), name="cloud"):
        """Start tether-cloudd; a restart with the same state_dir (by
        default the test's cloud-state) keeps its event journal. timing
        replaces the PingSec/DeviceTimeoutSec/CallTimeoutSec lines;
        prefix runs it inside a network namespace (NetNs.prefix). name
        names its log and config (several clouds: cluster nodes); the
        Daemon returned has coap_port, api_port and api, and the World's
        coap_port, api_port and api are the last cloud started's."""
        cert = cert or self.path("pki", "server.crt")
        key = key or self.path("pki", "server.key")
        conf = self.path(f"{name}.conf")
        timing = timing or f"""PingSec=5
DeviceTimeoutSec={whole_seconds(15)}
CallTimeoutSec={whole_seconds(5)}"""
        with open(conf, "w") as f:
            f.write(f"""[Cloud]
Listen={listen}
Port={port}
CAFile={self.path('pki', 'ca.crt')}
Certificate={cert}
Key={key}
{timing}
{self.cloud_tuning}
[API]
Listen=127.0.0.1
Port={api_port}
TokenFile={self.path('tokens')}
[State]
Directory={state_dir or self.path('cloud-state')}
{extra}""")
        mark = self.notify.mark()
        e = self.env()
        e.update(env or {})
        self.cloud = Daemon(name, [CLOUDD, "--config", conf], e, self.dir, prefix)
        self.daemons.append(self.cloud)
        m = self.notify.wait(lambda m: m.get("READY") == "1" and "X_COAP_PORT" in m, 20,
                             "tether-cloudd READY=1", mark)
        self.coap_port = int(m["X_COAP_PORT"])
        self.api_port = int(m["X_API_PORT"])
        self.cloud.coap_port, self.cloud.api_port = self.coap_port, self.api_port
        self.cloud.api = self.api
        return self.cloud

    @property
    def api(self):
        return f"http://127.0.0.1:{self.api_port}"

    def agent_conf(self, name, cert, key, host="localhost", plugin_dir=PLUGINS, extra="", ca=None,
                   connection=None, state_dir=None):
        """Write NAME.conf. Each agent has its own state directory (its
        outbox) in the test's scratch directory; connection replaces the
        [Connection] settings."""
        conf = self.path(f"{name}.conf")
        state_dir = state_dir or self.path(f"{name}-state")
        connection = connection or f"""KeepaliveSec=5
KeepaliveTimeoutSec={seconds(3)}
ReconnectMinSec=0.2
ReconnectMaxSec=2
ConnectTimeoutSec={seconds(5)}"""
        with open(conf, "w") as f:
            f.write(f"""[Cloud]
Host={host}
Port={self.coap_port}
CAFile={ca or self.path('pki', 'ca.crt')}
[Device]
Certificate={cert}
Key={key}
[Connection]
{connection}
[State]
Directory={state_dir}
[Plugins]
Directory={plugin_dir}
[Local]
Socket={self.path(name + ".sock")}
[Plugin example]
IntervalSec=0
{extra}""")
        return conf

    def plugin_dir(self, *names):
        """A plugin directory holding (links to) the named in-tree plugins."""
        pdir = self.path("plugins-" + "-".join(names))
        os.makedirs(pdir, exist_ok=True)
        for n in names:
            so = BUILT_PLUGINS[n]
            if not os.path.exists(so):
                raise Failure(f"{so} is not built")
            link = os.path.join(pdir, n + ".so")
            if not os.path.lexists(link):
                os.symlink(so, link)
        return pdir

    def gpiosim(self, chips=(("gpiochip0", 32, "tether-sim"),)):
        """Set up a simulated GPIO chip directory; returns (GpioSim, env)
        for start_agent(env=...): tetherd then runs with the simulator
        preloaded in place of libgpiod."""
        from gpiosim import GpioSim  # noqa: E402 - found through sys.path above
        if not os.path.exists(GPIOSIM_LIB):
            raise Failure(f"{GPIOSIM_LIB} is not built (make check builds it)")
        d = self.path("gpiosim")
        GpioSim.write_chips(d, chips)
        env = {"TETHER_GPIOSIM": d, "LD_PRELOAD": GPIOSIM_LIB,
               # An ASan build wants its runtime first; the preload is on purpose.
               "ASAN_OPTIONS": os.environ.get("ASAN_OPTIONS", "") + ":verify_asan_link_order=0"}
        return GpioSim(d), env

    def start_agent(self, name="agent", wait_online=True, env=None, prefix=(), **kw):
        device = kw.pop("device", None) or self.new_device()
        conf = self.agent_conf(name, device[1], device[2], **kw)
        return self.run_agent(name, conf, device, wait_online, env, prefix)

    def run_agent(self, name, conf, device, wait_online=True, env=None, prefix=()):
        """Start tetherd with an existing config (a restart keeps the
        device and, with it, the state directory). The local API socket is
        the one agent_conf(name) wrote."""
        mark = self.notify.mark()
        e = self.env()
        e.update(env or {})
        d = Daemon(name, [TETHERD, "--config", conf], e, self.dir, prefix)
        d.device = device
        d.device_id = device[0]
        d.conf = conf
        d.socket = self.path(os.path.basename(conf)[:-len(".conf")] + ".sock")
        self.daemons.append(d)
        if wait_online:
            self.wait_online(device[0], mark)
        return d

    def wait_online(self, dev_id, start=0, timeout=20):
        self.notify.wait(lambda m: m.get("X_TETHER_ONLINE") == dev_id, timeout,
                         f"device {dev_id} online", start)

    def wait_described(self, dev_id, start=0, timeout=20):
        """The cloud fetched dev_id's describe document since mark start:
        in a new session (X_TETHER_ONLINE) or anew in the same one, as after
        the agent's reload (X_TETHER_DESCRIBED)."""
        self.notify.wait(lambda m: dev_id in (m.get("X_TETHER_ONLINE"), m.get("X_TETHER_DESCRIBED")), timeout,
                         f"device {dev_id} described", start)

    def tether(self, *args, check=True, timeout=30, token=None, api=None):
        env = dict(os.environ, TETHER_API=api or self.api, TETHER_TOKEN=token or self.token)
        r = subprocess.run(EMULATOR + [TETHER, *args], capture_output=True, text=True, env=env,
                           timeout=timeout * TIME_FACTOR)
        if check and r.returncode != 0:
            raise Failure(f"tether {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def subscribe(self, *args, token=None, api=None):
        """Start `tether subscribe --json ...` (with token, by default the
        World's, against the API at URL api, by default the last cloud's);
        returns a Subscriber, which is closed with the World (or the test
        process) at the latest."""
        env = dict(os.environ, TETHER_API=api or self.api, TETHER_TOKEN=token or self.token)
        sub = Subscriber(EMULATOR + [TETHER, "subscribe", "--json", *args], env)
        self.cleanups.append(sub.close)
        return sub

    def tetherctl(self, agent, *args, check=True, timeout=30, user=None):
        """Run tetherctl against agent's socket; user: run as that user
        (setpriv, no supplementary groups), which needs root."""
        argv = EMULATOR + [TETHERCTL, "--socket", agent.socket, *args]
        if user:
            argv = ["setpriv", f"--reuid={user[0]}", f"--regid={user[1]}", "--clear-groups", *argv]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout * TIME_FACTOR)
        if check and r.returncode != 0:
            raise Failure(f"tetherctl {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def run_cleanups(self, errors):
        while self.cleanups:
            try:
                self.cleanups.pop()()
            except Exception as e:  # noqa: BLE001 - report, keep cleaning
                errors.append(f"cleanup failed: {e}")

    def close(self):
        errors = []
        for d in reversed(self.daemons):
            try:
                rc = d.stop()
                if rc not in (0, None) and not d.killed:
                    errors.append(f"{d.name} exited with {rc}")
            except Failure as e:
                errors.append(str(e))
        self.run_cleanups(errors)
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
                                     stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
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
        deadline = time.monotonic() + timeout * TIME_FACTOR
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

    def wait_until(self, cond, timeout=10, what="events"):
        """Wait until cond(list of all events so far) is true."""
        deadline = time.monotonic() + timeout * TIME_FACTOR
        with self.cond:
            while not cond(self.events):
                if self.proc.poll() is not None:
                    raise Failure(f"tether subscribe exited ({self.proc.returncode}): {self.errors[-5:]}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Failure(f"timed out waiting for {what}")
                self.cond.wait(min(left, 0.5))

    def snapshot(self):
        with self.cond:
            return list(self.events)

    def wait(self, pred, timeout=10, what="event"):
        deadline = time.monotonic() + timeout * TIME_FACTOR
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

    def wait_exit(self, timeout=10, what="tether subscribe to exit"):
        """Wait for the process to end on its own; returns its exit code
        once everything it wrote to stdout and stderr is in events and
        errors."""
        deadline = time.monotonic() + timeout * TIME_FACTOR
        try:
            rc = self.proc.wait(timeout * TIME_FACTOR)
        except subprocess.TimeoutExpired:
            raise Failure(f"timed out waiting for {what}; got {self.snapshot()}") from None
        self._join(deadline)
        return rc

    def _join(self, deadline):
        """The readers end at EOF: once the process and anything that
        inherited its pipes are gone."""
        for th in (self.thread, self.err_thread):
            th.join(max(deadline - time.monotonic(), 0.1))
            if th.is_alive():
                raise Failure("tether subscribe exited but its output did not end")

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(seconds(5))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._join(time.monotonic() + seconds(5))


def with_threads(test, threads=2):
    """test again with the TLS handshakes on that many threads ([Cloud]
    HandshakeThreads=; unset, the default, one per CPU but one): named
    test_x_threads."""
    def t(w):
        w.cloud_tuning = f"HandshakeThreads={threads}"
        return test(w)
    t.__name__ = test.__name__ + "_threads"
    t.__doc__ = test.__doc__
    return t


def in_loop(test):
    """test again with the TLS handshakes in the event loop, inside libcoap
    ([Cloud] HandshakeThreads=0): named test_x_loop."""
    t = with_threads(test, 0)
    t.__name__ = test.__name__ + "_loop"
    return t


def run(tests, emulated=""):
    """Run test functions, each with a fresh World; TAP-ish output. A test
    may raise Skip(reason); if every test skipped, the exit status is 77.
    Names on the command line run only those test functions (in the
    file's order); an unknown name is an error.

    Under the cross-build emulator (TETHER_TEST_EMULATOR) a file runs only
    if it passes emulated="ok"; otherwise emulated names why it is left to
    the native run (timing bounds a 3-10x slower emulator breaks, host-only
    tools, LD_PRELOAD into qemu itself)."""
    wanted = sys.argv[1:]
    if wanted:
        names = [t.__name__ for t in tests]
        unknown = [n for n in wanted if n not in names]
        if unknown:
            print(f"{sys.argv[0]}: no test function {', '.join(unknown)}; the file has: {' '.join(names)}",
                  file=sys.stderr)
            return 99
        tests = [t for t in tests if t.__name__ in wanted]
    if EMULATOR and emulated != "ok":
        skip(f"not run under {EMULATOR[0]}: {emulated or 'left to the native run'}")
    check_emulator()
    failed = skipped = 0
    print(f"1..{len(tests)}")
    print(f"# TIME_FACTOR={TIME_FACTOR:g}")
    for i, t in enumerate(tests, 1):
        w = None
        try:
            w = World()
            t(w)
            w.close()
            w = None
            print(f"ok {i} - {t.__name__}")
        except Skip as e:
            skipped += 1
            print(f"ok {i} - {t.__name__} # SKIP {e}")
            if w:
                w.close()
        except Exception as e:  # noqa: BLE001 - report every failure the same way
            failed += 1
            print(f"not ok {i} - {t.__name__}: {e}")
            if w:
                for d in w.daemons:
                    d.kill()
                cleanup_errors = []
                w.run_cleanups(cleanup_errors)
                for msg in cleanup_errors:
                    print(f"# {msg}")
                print(f"# logs kept in {w.dir}")
                for d in w.daemons:
                    print(f"# --- {d.name} ---")
                    for line in d.lines[-40:]:
                        print(f"#   {line}")
        sys.stdout.flush()
    if failed:
        return 1
    return 77 if skipped == len(tests) else 0


def expect(cond, msg):
    if not cond:
        raise Failure(msg)


class NetNs:
    """A network namespace joined to the host by a veth pair: the agent
    runs inside (prefix), the cloud listens on the host end (host_ip), and
    drop() makes the namespace's nftables drop every packet silently: no
    FIN, no RST, like a dead uplink. Names and the /30 subnet are unique;
    close() (registered as a World cleanup) removes it all.

    With uplink=False it has only its loopback (up, 127.0.0.1 and ::1),
    and neither veth nor nftables. hosts, if given, is the namespace's
    /etc/hosts: `ip netns exec` bind-mounts /etc/netns/NAME/hosts over it."""

    def __init__(self, world, uplink=True, hosts=None):
        if os.geteuid() != 0:
            raise Skip("network namespaces need root")
        for tool in ("ip", "nft") if uplink else ("ip",):
            if not shutil.which(tool):
                raise Skip(f"'{tool}' is not installed (tools/dev deps installs iproute2 and nftables)")
        tag = f"{os.getpid() % 100000}{random.randrange(100)}"
        self.name = f"tether-test-{tag}"
        self.host_if = f"tth{tag}"[:15]
        self.ns_if = f"ttn{tag}"[:15]
        self.etc = None  # /etc/netns/NAME, once made
        self.dropping = False
        self.uplink = uplink
        world.cleanups.append(self.close)
        steps = [["ip", "netns", "add", self.name]]
        if uplink:
            used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
            for _ in range(100):
                b, c = random.randrange(200, 250), random.randrange(0, 256)
                d = random.randrange(0, 64) * 4
                self.host_ip, self.ns_ip = f"10.{b}.{c}.{d + 1}", f"10.{b}.{c}.{d + 2}"
                if f"10.{b}.{c}." not in used:
                    break
            steps += [["ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if],
                      ["ip", "link", "set", self.ns_if, "netns", self.name],
                      ["ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if],
                      ["ip", "link", "set", self.host_if, "up"],
                      ["ip", "-n", self.name, "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if],
                      ["ip", "-n", self.name, "link", "set", self.ns_if, "up"]]
        steps.append(["ip", "-n", self.name, "link", "set", "lo", "up"])
        if hosts is not None:
            etc = os.path.join("/etc/netns", self.name)
            try:
                os.makedirs(etc)
                self.etc = etc
                with open(os.path.join(etc, "hosts"), "w") as f:
                    f.write(hosts)
            except OSError as e:
                raise Skip(f"cannot write {etc}/hosts for the namespace: {e}")
        for cmd in steps:
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise Skip(f"cannot set up a network namespace ({' '.join(cmd)}: {r.stderr.strip()})")
        if uplink:
            r = self.nft("list", "tables")
            if r.returncode != 0:
                raise Skip(f"nftables does not work here: {r.stderr.strip()}")

    @property
    def prefix(self):
        return ["ip", "netns", "exec", self.name]

    def nft(self, *args, stdin=None):
        return subprocess.run(self.prefix + ["nft", *args], capture_output=True, text=True, input=stdin)

    def drop(self, on=True):
        if on and not self.dropping:
            rules = ("table inet tether_drop {\n"
                     " chain input { type filter hook input priority 0; policy drop; }\n"
                     " chain output { type filter hook output priority 0; policy drop; }\n}\n")
            r = self.nft("-f", "-", stdin=rules)
        elif not on and self.dropping:
            r = self.nft("delete", "table", "inet", "tether_drop")
        else:
            return
        if r.returncode != 0:
            raise Failure(f"nft failed: {r.stderr.strip()}")
        self.dropping = on

    def run(self, argv, **kw):
        """subprocess.run(argv) inside the namespace."""
        return subprocess.run(self.prefix + list(argv), **kw)

    def close(self):
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
        if self.uplink:
            subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)
        if self.etc:
            shutil.rmtree(self.etc, ignore_errors=True)


class EventStream:
    """The raw SSE stream of GET /v1/events/PREFIX of World w's cloud
    (tether subscribe --json keeps only Particle's fields), read in a
    thread: every message as {"id","event","data"} with data parsed;
    first_id is the id: line the stream opens with. Closed with the World."""

    def __init__(self, w, prefix="", last_event_id=None):
        self.conn = http.client.HTTPConnection("127.0.0.1", w.api_port, timeout=30 * SLOW)
        headers = {"Authorization": f"Bearer {w.token}"}
        if last_event_id:
            headers["Last-Event-ID"] = last_event_id
        self.conn.request("GET", "/v1/events/" + prefix, headers=headers)
        self.resp = self.conn.getresponse()
        if self.resp.status != 200:
            raise Failure(f"event stream: HTTP {self.resp.status}")
        self.messages, self.first_id, self.ended = [], None, False
        self.cond = threading.Condition()
        threading.Thread(target=self._run, daemon=True).start()
        w.cleanups.append(self.close)

    def _run(self):
        msg = {}
        try:
            for raw in self.resp:
                line = raw.decode().rstrip("\n")
                with self.cond:
                    if line == "":
                        if "data" in msg:
                            self.messages.append(msg)
                        elif "id" in msg and self.first_id is None:
                            self.first_id = msg["id"]
                        msg = {}
                        self.cond.notify_all()
                    elif line.startswith("id: "):
                        msg["id"] = line[4:]
                    elif line.startswith("event: "):
                        msg["event"] = line[7:]
                    elif line.startswith("data: "):
                        msg["data"] = json.loads(line[6:])
        except (OSError, ValueError, http.client.HTTPException):
            pass
        with self.cond:
            self.ended = True
            self.cond.notify_all()

    def wait(self, pred, timeout=10, what="event"):
        deadline = time.monotonic() + timeout * SLOW
        with self.cond:
            while True:
                for m in self.messages:
                    if pred(m):
                        return m
                if self.ended:
                    raise Failure(f"the event stream ended waiting for {what}; got {self.messages}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Failure(f"timed out waiting for {what}; got {self.messages}")
                self.cond.wait(min(left, 0.5))

    def wait_first_id(self, timeout=10):
        deadline = time.monotonic() + timeout * SLOW
        with self.cond:
            while self.first_id is None:
                if self.ended or time.monotonic() > deadline:
                    raise Failure("the event stream sent no id: line")
                self.cond.wait(0.5)
        return self.first_id

    def named(self, name, timeout=10):
        return self.wait(lambda m: m.get("event") == name, timeout, f"event '{name}'")

    def close(self):
        try:
            self.resp.close()
            self.conn.close()
        except OSError:
            pass


def api_json(w, method, path, body=None, token=None, api=None, form=None):
    """(status, parsed JSON answer) of one API request with a JSON body (or
    form, raw bytes sent as application/x-www-form-urlencoded) to the cloud
    of World w (or the API at URL api), with w's token unless another is
    given."""
    data = form if form is not None else json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request((api or w.api) + path, method=method,
                                 headers={"Authorization": f"Bearer {token or w.token}",
                                          "Content-Type": "application/x-www-form-urlencoded" if form is not None
                                          else "application/json"},
                                 data=data)
    try:
        with urllib.request.urlopen(req, timeout=seconds(30)) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def local_publish(agent, name, data):
    """One publish through the agent's local API socket (what tetherctl
    does, without a process per event)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(seconds(10))
        s.connect(agent.socket)
        s.sendall(json.dumps({"method": "publish", "name": name, "data": data}).encode() + b"\n")
        s.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := s.recv(4096):
            answer += chunk
    r = json.loads(answer)
    expect(r.get("ok"), f"publish {name}: {r}")
