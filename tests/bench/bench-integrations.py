#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""bench-integrations: what tether-cloudd's outbound integrations
(docs/integrations.md) deliver, side by side in one run, repetitions
interleaved (every mode once per repetition):

  webhook    events/s one [Webhook] delivers to a receiver on loopback
             (tests/integration/hookkit.py: Python's ThreadingHTTPServer in
             this process, checking every signature), HTTP and HTTPS (its
             own CA), and tether-cloudd's CPU time per event;
  mqtt       events/s one [MQTTBridge] delivers to a local Mosquitto (TLS
             with client certificates, as tests/integration/test-mqtt-bridge.py,
             and plain MQTT; QoS 1 and 0), counted by mosquitto_sub -C N;
             the cloud's CPU time per event;
  mosquitto  the peer: mosquitto_pub -l (QoS 1, 64 in flight, messages of
             the bridge's size) to the same broker and subscriber;
  backlog    events queued per MiB of journal: with the webhook's receiver
             down (connection refused), the growth of
             StateDirectory/events.journal per event, for 64-byte and
             1 KiB (Particle's limit) data; then the receiver starts and the
             backlog drains (events/s from its first request to its last 2xx,
             and how long the webhook's backoff made it wait).

The events come from DEVICES fake devices (tests/integration/fakedev.py:
CoAP over TLS, each publishing "env/climate" with epoch= and seq= as
tetherd does, WINDOW publishes in flight), all published into the journal
before the clock starts, so the publisher is never the bottleneck: for a
webhook the receiver holds its requests meanwhile (the clock starts when it
lets them go); for a bridge the broker is not running while the journal
fills, then tether-cloudd is restarted with the broker up and resumes
from its stored cursor (the clock runs from the subscriber's first message
to its last, from mosquitto_sub's own time stamps). One device has one
event in flight at a time (the order per device): the sinks' windows (8
requests, 64 messages) fill only with enough devices.

    top_builddir=$PWD/build top_srcdir=$PWD tests/bench/bench-integrations.py \\
        [--devices 64] [--events 200] [--reps 3] [--only webhook,mqtt,mosquitto,backlog]

Prints min / median / max over the repetitions and the load average at
the start and the end; compare figures of one run on one machine only."""

import argparse
import datetime
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))
import fakedev  # noqa: E402
from harness import Daemon, World  # noqa: E402
from hookkit import Receiver, make_pki  # noqa: E402
from natskit import free_ports  # noqa: E402

MOSQUITTO = "/usr/sbin/mosquitto"
SECRET = "a benchmark secret of 32 bytes!!"
NAME = "env/climate"
LIMITS = "[Events]\nDeviceEventRate=0\nDeviceByteRate=0\n[API]\nRateLimitPerAddress=0\nRateLimitPerToken=0\n"


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def payload(seq, size):
    """size bytes of sensor-like JSON, the number seq in it."""
    head = '{"seq":%d,"t":21.53,"rh":48.2,"hpa":1013.2,"bat":3.71,"pad":"' % seq
    return (head + "x" * (size - len(head) - 2) + '"}').encode()


def publish_all(d, events, size, window, errors):
    """Publish events numbered 1..events as POST /e/NAME?epoch=&seq=,
    window at a time, each acknowledged 2.01."""
    epoch = f"{int.from_bytes(os.urandom(8), 'big'):016x}"
    sent = acked = 0
    tokens = set()
    try:
        while acked < events:
            while sent < events and sent - acked < window:
                sent += 1
                tokens.add(d.request(fakedev.POST, "e/" + NAME, payload(sent, size),
                                     query=(f"epoch={epoch}", f"seq={sent}")))
            m = d.recv(timeout=60)
            if m.token in tokens:
                if m.code != fakedev.CREATED:
                    raise RuntimeError(f"publish answered {fakedev.codestr(m.code)}")
                tokens.discard(m.token)
                acked += 1
    except Exception as e:  # noqa: BLE001 - reported by the main thread
        errors.append(repr(e))


class Bench:
    def __init__(self, opts):
        self.o = opts
        self.w = World()
        self.runs = 0
        self.devices = [self.w.new_device() for _ in range(opts.devices)]
        self.hook_ca, self.hook_cert, self.hook_key = make_pki(self.w.path("hook-pki"))
        self.mqtt_dir = self.w.path("mqtt")
        self.mqtt_pki()
        self.fill_rates = []

    @property
    def total(self):
        return self.o.devices * self.o.events

    # ---- tether-cloudd -------------------------------------------------------------

    def start_cloud(self, extra, restart=False):
        if not restart:
            self.runs += 1
        name = f"cloud{self.runs}"
        self.state = self.w.path(f"state{self.runs}")
        return self.w.start_cloud(extra=extra + LIMITS, state_dir=self.state, name=name)

    def stop_cloud(self, cloud, remove=True):
        cloud.stop(30)
        if remove:
            shutil.rmtree(self.state, ignore_errors=True)

    def fill(self, events, size):
        """Every device publishes events events of size bytes; returns the
        rate (events/s) at which the cloud took them."""
        conns = [fakedev.connect(self.w, device=dev)[0] for dev in self.devices]
        errors = []
        threads = [threading.Thread(target=publish_all, args=(d, events, size, self.o.window, errors))
                   for d in conns]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        took = time.monotonic() - t0
        for d in conns:
            d.close()
        if errors:
            raise RuntimeError(errors[0])
        rate = len(conns) * events / took
        self.fill_rates.append(rate)
        return rate

    # ---- webhooks --------------------------------------------------------------------

    def webhook(self, https):
        rx = Receiver(SECRET, self.hook_cert, self.hook_key, keep=False) if https else \
            Receiver(SECRET, keep=False)
        try:
            rx.gate.clear()
            url = rx.url if https else f"http://127.0.0.1:{rx.port}/hook"
            hook = f"[Webhook bench]\nURL={url}\nSecret={SECRET}\nPrefix=env/\nTimeout=300\n"
            if https:
                hook += f"CAFile={self.hook_ca}\n"
            cloud = self.start_cloud(hook)
            self.fill(self.o.events, 64)
            total = self.total
            cpu0 = cpu_seconds(cloud.proc.pid)
            t0 = time.monotonic()
            rx.gate.set()
            deadline = t0 + 600
            with rx.cond:
                while rx.delivered < total:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"only {rx.delivered} of {total} delivered")
                    rx.cond.wait(0.2)
            took = time.monotonic() - t0
            cpu = cpu_seconds(cloud.proc.pid) - cpu0
            if rx.bad_signatures:
                raise RuntimeError(f"{rx.bad_signatures} bad signatures")
            self.stop_cloud(cloud)
            return {"rate": total / took, "cpu": cpu / total}
        finally:
            rx.close()

    # ---- Mosquitto -------------------------------------------------------------------

    def mqtt_pki(self):
        d = self.mqtt_dir
        os.makedirs(d)
        key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]

        def openssl(*args):
            subprocess.run(["openssl", *args], check=True, capture_output=True)

        openssl("req", "-x509", *key, "-keyout", f"{d}/ca.key", "-out", f"{d}/ca.crt", "-subj", "/CN=bench-mqtt-ca",
                "-days", "2")
        with open(f"{d}/server.ext", "w") as f:
            f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        for name, ext in (("server", ["-extfile", f"{d}/server.ext"]), ("bridge", []), ("reader", []),
                          ("writer", [])):
            openssl("req", *key, "-keyout", f"{d}/{name}.key", "-out", f"{d}/{name}.csr", "-subj", f"/CN={name}")
            openssl("x509", "-req", "-in", f"{d}/{name}.csr", "-CA", f"{d}/ca.crt", "-CAkey", f"{d}/ca.key",
                    "-CAcreateserial", "-out", f"{d}/{name}.crt", "-days", "2", *ext)

    def start_broker(self, port, tls):
        """Mosquitto on 127.0.0.1:port, TLS with client certificates (the
        CN is the user name) or plain and anonymous; no persistence, no
        limit on queued messages (a slow subscriber loses nothing)."""
        d = self.mqtt_dir
        conf = os.path.join(d, f"mosquitto-{port}.conf")
        with open(conf, "w") as f:
            f.write(f"per_listener_settings false\nlistener {port} 127.0.0.1\nset_tcp_nodelay true\n"
                    "max_queued_messages 0\npersistence false\nlog_dest stderr\n"
                    "log_type error\nlog_type warning\nlog_type notice\nlog_type information\nlog_type subscribe\n")
            if tls:
                f.write(f"cafile {d}/ca.crt\ncertfile {d}/server.crt\nkeyfile {d}/server.key\n"
                        "require_certificate true\nuse_identity_as_username true\nallow_anonymous false\n")
            else:
                f.write("allow_anonymous true\n")
            if os.geteuid() == 0:
                f.write("user root\n")  # mosquitto would drop to 'mosquitto', who cannot read the keys
        broker = Daemon(f"mosquitto-{port}", [MOSQUITTO, "-c", conf], dict(os.environ), self.w.dir)
        self.w.daemons.append(broker)
        broker.wait_line(r"mosquitto version \S+ running", 20)
        return broker

    def client_args(self, port, tls, name):
        args = ["-h", "127.0.0.1", "-p", str(port)]
        if tls:
            d = self.mqtt_dir
            args += ["--cafile", f"{d}/ca.crt", "--cert", f"{d}/{name}.crt", "--key", f"{d}/{name}.key"]
        return args

    def subscribe(self, broker, port, tls, qos, count):
        """mosquitto_sub -C count, one time stamp per message into a file;
        returns once the broker logged the subscription."""
        out = self.w.path(f"sub-{port}.out")
        mark = broker.mark()
        with open(out, "w") as f:
            proc = subprocess.Popen(["mosquitto_sub", *self.client_args(port, tls, "reader"), "-i", "bench-reader",
                                     "-t", "tether/#", "-q", str(qos), "-C", str(count), "-F", "%U"],
                                    stdout=f, stderr=subprocess.DEVNULL)
        broker.wait_line(r"bench-reader \d tether/#", 20, mark)
        return proc, out

    def sub_result(self, proc, out, total):
        """(messages, seconds from the first to the last) once mosquitto_sub
        got total messages, or nothing more came for 3 s."""
        last_n, still = -1, time.monotonic()
        while proc.poll() is None:
            time.sleep(0.2)
            n = os.path.getsize(out)
            if n != last_n:
                last_n, still = n, time.monotonic()
            elif time.monotonic() - still > 3:
                proc.terminate()
                proc.wait()
        with open(out) as f:
            stamps = [float(line) for line in f if line.strip()]
        if len(stamps) < 2:
            raise RuntimeError(f"the subscriber got {len(stamps)} messages of {total}")
        return len(stamps), stamps[-1] - stamps[0]

    def mqtt(self, tls, qos):
        port = free_ports(1)[0]
        d = self.mqtt_dir
        bridge = f"[MQTTBridge bench]\nHost=127.0.0.1\nPort={port}\nQoS={qos}\nPrefix=env/\nClientID=tether-bench\n"
        if tls:
            bridge += f"CAFile={d}/ca.crt\nCertFile={d}/bridge.crt\nKeyFile={d}/bridge.key\n"
        # The broker is down while the journal fills; the restart resumes
        # at the stored cursor, with the broker and the subscriber up.
        cloud = self.start_cloud(bridge)
        self.fill(self.o.events, 64)
        self.stop_cloud(cloud, remove=False)
        total = self.total
        broker = self.start_broker(port, tls)
        try:
            proc, out = self.subscribe(broker, port, tls, qos, total)
            cloud = self.start_cloud(bridge, restart=True)
            cpu0 = cpu_seconds(cloud.proc.pid)
            got, took = self.sub_result(proc, out, total)
            cpu = cpu_seconds(cloud.proc.pid) - cpu0
            self.stop_cloud(cloud)
        finally:
            broker.stop(20)
        return {"rate": (got - 1) / took, "cpu": cpu / got, "lost": total - got}

    def mosquitto(self, tls):
        """The peer: mosquitto_pub -l, QoS 1, 64 in flight, one message per
        line, each the size of the bridge's body for a 64-byte event."""
        port = free_ports(1)[0]
        total = self.total
        body = ('{"event":"env/climate","data":"%s","published_at":"2026-12-07T10:00:00.000Z",'
                '"received_at":"2026-12-07T10:00:00.001Z","coreid":"0123456789abcdef01234567","ttl":60,'
                '"public":true,"id":"0123456789abcdef-%%d","integration":"bench"}'
                % payload(0, 64).decode().replace('"', '\\"'))
        lines = self.w.path("pub-lines")
        with open(lines, "w") as f:
            for i in range(total):
                f.write(body % (i + 1) + "\n")
        broker = self.start_broker(port, tls)
        try:
            proc, out = self.subscribe(broker, port, tls, 1, total)
            with open(lines) as f:
                pub = subprocess.run(["mosquitto_pub", *self.client_args(port, tls, "writer"), "-i", "bench-writer",
                                      "-t", "tether/0123456789abcdef01234567/env/climate", "-q", "1", "-M", "64",
                                      "-l"], stdin=f, capture_output=True, timeout=600)
            if pub.returncode != 0:
                raise RuntimeError(f"mosquitto_pub: {pub.stderr.decode().strip()}")
            got, took = self.sub_result(proc, out, total)
        finally:
            broker.stop(20)
        return {"rate": (got - 1) / took, "lost": total - got}

    # ---- the backlog -----------------------------------------------------------------

    def backlog(self, size, events):
        rx = Receiver(SECRET, keep=False)
        rx.stop()  # the port refuses connections until start()
        try:
            first = []
            handle = rx.handle

            def first_handle(h, body):
                if not first:
                    first.append(time.monotonic())
                handle(h, body)

            rx.handle = first_handle
            cloud = self.start_cloud(f"[Webhook bench]\nURL=http://127.0.0.1:{rx.port}/hook\nSecret={SECRET}\n"
                                     "Prefix=env/\n")
            journal = os.path.join(self.state, "events.journal")
            size0 = os.path.getsize(journal)
            total = self.o.devices * events
            self.fill(events, size)
            # Every event was acknowledged, so written (a sync may follow).
            size1 = os.path.getsize(journal)
            t0 = time.monotonic()
            rx.start()
            cpu0 = cpu_seconds(cloud.proc.pid)
            with rx.cond:
                while rx.delivered < total:
                    if time.monotonic() > t0 + 900:
                        raise RuntimeError(f"only {rx.delivered} of {total} delivered")
                    rx.cond.wait(0.2)
            t1 = time.monotonic()
            cpu = cpu_seconds(cloud.proc.pid) - cpu0
            self.stop_cloud(cloud)
            per_event = (size1 - size0) / total
            return {"bytes": per_event, "per_mib": 1048576 / per_event, "wait": first[0] - t0,
                    "rate": total / (t1 - first[0]), "cpu": cpu / total}
        finally:
            rx.close()

    def close(self):
        self.w.close()


def mmm(values, fmt="{:.0f}"):
    return " / ".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=64, help="fake devices publishing (64: the bridge's window)")
    ap.add_argument("--events", type=int, default=200, help="events per device and run")
    ap.add_argument("--backlog-events", type=int, default=300,
                    help="64-byte events per device for the backlog (1 KiB: a third of it)")
    ap.add_argument("--window", type=int, default=8, help="publishes in flight per device")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", default="webhook,mqtt,mosquitto,backlog")
    opts = ap.parse_args()
    parts = set(opts.only.split(","))
    if parts & {"mqtt", "mosquitto"}:
        missing = [t for t in (MOSQUITTO, "mosquitto_sub", "mosquitto_pub", "openssl") if not shutil.which(t)]
        if missing:
            print(f"needs {', '.join(missing)} (Debian packages mosquitto, mosquitto-clients)", file=sys.stderr)
            return 77
    modes = []
    if "webhook" in parts:
        modes += [("webhook, HTTP", lambda b: b.webhook(False)), ("webhook, HTTPS", lambda b: b.webhook(True))]
    if "mqtt" in parts:
        modes += [(f"MQTT bridge, {'TLS' if tls else 'plain'}, QoS {q}", lambda b, tls=tls, q=q: b.mqtt(tls, q))
                  for tls in (True, False) for q in (1, 0)]
    if "mosquitto" in parts:
        modes += [(f"Mosquitto alone, {'TLS' if tls else 'plain'}, QoS 1", lambda b, tls=tls: b.mosquitto(tls))
                  for tls in (True, False)]
    if "backlog" in parts:
        modes += [("backlog, 64-byte data", lambda b: b.backlog(64, opts.backlog_events)),
                  ("backlog, 1 KiB data", lambda b: b.backlog(1024, max(opts.backlog_events // 3, 1)))]
    load0 = os.getloadavg()
    started = datetime.datetime.now(datetime.timezone.utc)
    b = Bench(opts)
    results = {name: [] for name, _ in modes}
    try:
        for rep in range(opts.reps):
            for name, fn in modes:
                r = fn(b)
                results[name].append(r)
                print(f"rep {rep + 1} {name}: " + ", ".join(f"{k} {v:.6g}" for k, v in r.items()), flush=True)
    finally:
        b.close()
    load1 = os.getloadavg()
    total = opts.devices * opts.events
    print()
    print(f"bench-integrations, {started:%Y-%m-%d %H:%M} UTC, {platform.node()}, {os.cpu_count()} CPUs, "
          f"Linux {platform.release()}")
    print(f"load average at the start {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, "
          f"at the end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    print(f"publisher: {opts.devices} fake devices (fakedev.py, CoAP over TLS, {opts.window} in flight each) fill the "
          f"journal before each clock starts; they published at {mmm(b.fill_rates)} events/s (min / median / max)")
    print(f"{total} events of 64-byte data per run ({opts.devices} x {opts.events}), {opts.reps} interleaved "
          "repetitions; min / median / max")
    print()
    print(f"{'delivery':34} {'events/s':>24} {'cloud CPU µs/event':>22} {'lost':>6}")
    for name, rs in results.items():
        if name.startswith("backlog"):
            continue
        rate = mmm([r["rate"] for r in rs])
        cpu = mmm([r["cpu"] * 1e6 for r in rs]) if "cpu" in rs[0] else "-"
        lost = sum(r.get("lost", 0) for r in rs)
        print(f"{name:34} {rate:>24} {cpu:>22} {lost:>6}")
    backlogs = [(name, rs) for name, rs in results.items() if name.startswith("backlog")]
    if backlogs:
        print()
        print(f"webhook receiver down: {opts.devices} x {opts.backlog_events} events of 64 bytes, "
              f"{opts.devices} x {max(opts.backlog_events // 3, 1)} of 1 KiB")
        print(f"{'backlog':24} {'journal B/event':>16} {'events/MiB':>12} {'drain events/s':>22} "
              f"{'CPU µs/event':>16} {'first retry after s':>22}")
        for name, rs in backlogs:
            print(f"{name[9:]:24} {statistics.median(r['bytes'] for r in rs):16.1f} "
                  f"{statistics.median(r['per_mib'] for r in rs):12.0f} {mmm([r['rate'] for r in rs]):>22} "
                  f"{mmm([r['cpu'] * 1e6 for r in rs]):>16} {mmm([r['wait'] for r in rs], '{:.1f}'):>22}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
