#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""MQTT bridges (docs/integrations.md, "MQTT bridges"): tether-cloudd with
an [MQTTBridge b1] section against a real Mosquitto broker that wants TLS
client certificates (require_certificate true; CA, server and client
certificates made here with openssl). mosquitto_sub gets device events as
JSON on tether/DEVICE/EVENT; a broker stopped and started again on the same
port while a device publishes at a steady pace (QoS 1) loses nothing: a
persistent subscriber (clean session off, QoS 1, broker persistence on) sees
every number of the pump plugin at least once; a message mosquitto_pub
sends on the Subscribe= filter reaches a device subscribed to "mqtt/"."""

import http.client
import json
import os
import shutil
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fakedev  # noqa: E402
from harness import SLOWDOWN, TEST_PLUGINS, Daemon, Failure, expect, run, seconds, skip  # noqa: E402
from natskit import free_ports  # noqa: E402

MOSQUITTO = "/usr/sbin/mosquitto"


def skip_unless_available():
    if not os.access(MOSQUITTO, os.X_OK):
        skip(f"{MOSQUITTO} is not installed (Debian package 'mosquitto')")
    for tool in ("mosquitto_sub", "mosquitto_pub", "openssl"):
        if not shutil.which(tool):
            skip(f"{tool} is not installed (Debian packages 'mosquitto-clients', 'openssl')")


def openssl(*args):
    r = subprocess.run(["openssl", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise Failure(f"openssl {' '.join(args)}: {r.stderr.strip()}")


class Broker:
    """Mosquitto on 127.0.0.1:port with TLS and client certificates (the
    certificate's CN is the user name), persistence on; the same port and
    the same files on every start()."""

    def __init__(self, w):
        self.w = w
        self.dir = w.path("mqtt")
        os.makedirs(os.path.join(self.dir, "db"))
        self.port = free_ports(1)[0]
        self.runs = 0
        self.daemon = None
        d = self.dir
        key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
        openssl("req", "-x509", *key, "-keyout", f"{d}/ca.key", "-out", f"{d}/ca.crt", "-subj", "/CN=mqtt-test-ca",
                "-days", "2")
        with open(f"{d}/server.ext", "w") as f:
            f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        for name, ext in (("server", ["-extfile", f"{d}/server.ext"]), ("bridge", []), ("reader", [])):
            openssl("req", *key, "-keyout", f"{d}/{name}.key", "-out", f"{d}/{name}.csr", "-subj", f"/CN={name}")
            openssl("x509", "-req", "-in", f"{d}/{name}.csr", "-CA", f"{d}/ca.crt", "-CAkey", f"{d}/ca.key",
                    "-CAcreateserial", "-out", f"{d}/{name}.crt", "-days", "2", *ext)
        with open(f"{d}/mosquitto.conf", "w") as f:
            f.write(f"""per_listener_settings false
listener {self.port} 127.0.0.1
cafile {d}/ca.crt
certfile {d}/server.crt
keyfile {d}/server.key
require_certificate true
use_identity_as_username true
allow_anonymous false
persistence true
persistence_location {d}/db/
log_dest stderr
log_type all
""")
            # As root, mosquitto drops to the user 'mosquitto', which could
            # not read the keys in the scratch directory.
            if os.geteuid() == 0:
                f.write("user root\n")

    def start(self):
        self.runs += 1
        self.daemon = Daemon(f"mosquitto-{self.runs}", [MOSQUITTO, "-c", f"{self.dir}/mosquitto.conf"],
                             dict(os.environ), self.w.dir)
        self.w.daemons.append(self.daemon)
        self.daemon.wait_line(r"mosquitto version \S+ running", 20)

    def stop(self):
        """SIGTERM: mosquitto writes its persistence file as it exits."""
        self.daemon.stop(20)

    def client_args(self, name="reader"):
        d = self.dir
        return ["-h", "127.0.0.1", "-p", str(self.port), "--cafile", f"{d}/ca.crt", "--cert", f"{d}/{name}.crt",
                "--key", f"{d}/{name}.key"]


class Sub:
    """mosquitto_sub (-v: "TOPIC PAYLOAD" per line) in the background;
    persistent (clean session off, QoS 1) with a client id."""

    def __init__(self, w, broker, topic, client_id=None):
        # Line-buffered: its debug lines ("received SUBACK") are printf()s
        # that would sit in a full buffer when stdout is a pipe.
        argv = ["stdbuf", "-oL", "mosquitto_sub", *broker.client_args(), "-t", topic, "-v", "-d", "-q", "1"]
        if client_id:
            argv += ["-c", "-i", client_id]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        w.cleanups.append(self.close)
        self.lines = []
        self.cond = threading.Condition()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        for line in self.proc.stdout:
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                self.cond.notify_all()

    def messages(self):
        """(topic, JSON payload) of every message so far."""
        out = []
        with self.cond:
            lines = list(self.lines)
        for line in lines:
            topic, _, payload = line.partition(" ")
            if topic.startswith("tether/") and payload.startswith("{"):
                out.append((topic, json.loads(payload)))
        return out

    def wait(self, pred, timeout, what):
        deadline = time.monotonic() + seconds(timeout)
        with self.cond:
            while not pred(self):
                if time.monotonic() > deadline:
                    raise Failure(f"timed out waiting for {what}; mosquitto_sub said {self.lines[-20:]}")
                self.cond.wait(0.2)

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()


def bridge_conf(broker, extra=""):
    d = broker.dir
    return f"""[MQTTBridge b1]
Host=127.0.0.1
Port={broker.port}
CAFile={d}/ca.crt
CertFile={d}/bridge.crt
KeyFile={d}/bridge.key
ClientID=tether-bridge
Topic=tether/{{device}}/{{event}}
QoS=1
Subscribe=tether/to-devices/#
{extra}"""


def start(w):
    skip_unless_available()
    broker = Broker(w)
    broker.start()
    w.start_cloud(extra=bridge_conf(broker))
    w.cloud.wait_line(r"Integration 'b1': subscribed to 'tether/to-devices/#'", 20)
    return broker


def pump_numbers(sub):
    return [int(m["data"]) for _, m in sub.messages() if m.get("event") == "pump/n"]


def test_events_reach_the_broker(w):
    """A device's event arrives on tether/DEVICE/EVENT with the body the
    integrations send; a client without a certificate is refused (the
    broker really wants one)."""
    broker = start(w)
    r = subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "--cafile",
                        f"{broker.dir}/ca.crt", "-t", "x", "-m", "y"], capture_output=True, text=True,
                       timeout=seconds(20))
    expect(r.returncode != 0, "the broker took a client without a certificate")
    sub = Sub(w, broker, "tether/#")
    sub.wait(lambda s: any(line.startswith("Client") and "SUBACK" in line for line in s.lines), 20, "SUBACK")
    d, dev = fakedev.connect(w)
    expect(d.publish("m/open", b"21.5").code == fakedev.CREATED, "publish")
    sub.wait(lambda s: len(s.messages()) >= 1, 30, "the event over MQTT")
    (t1, m1) = sub.messages()[0]
    expect(t1 == f"tether/{dev}/m/open", f"topic {t1}")
    expect(m1["event"] == "m/open" and m1["data"] == "21.5" and m1["coreid"] == dev and
           m1["integration"] == "b1" and m1["id"], f"body {m1}")


def test_broker_restart(w):
    """The broker stops (SIGTERM) and starts again on the same port while
    a device publishes; the persistent QoS 1 subscriber gets every number,
    counted by number and by idempotency key: nothing missing (twice is
    allowed: at least once)."""
    broker = start(w)
    # The subscriber's session must exist before the first event, and
    # outlive its own reconnection (mosquitto_sub reconnects by itself).
    sub = Sub(w, broker, "tether/#", client_id=f"reader-{os.getpid()}")
    sub.wait(lambda s: any("SUBACK" in line for line in s.lines), 20, "SUBACK")
    rate = max(40 // SLOWDOWN, 10)
    total = rate * 15
    a = w.start_agent(plugin_dir=TEST_PLUGINS, extra="[Plugins]\nEnable=pump\n")
    w.tether("call", a.device_id, "start", f"1,{total},{rate}")
    sub.wait(lambda s: len(pump_numbers(s)) >= 2 * rate, 30, "events before the stop")
    mark = w.cloud.mark()
    broker.stop()
    w.cloud.wait_line(r"Integration 'b1': connection to the broker .* lost", 20, mark)
    # Down for at least one failed attempt of the bridge.
    w.cloud.wait_line(r"Integration 'b1': cannot connect to the broker", 20, mark)
    before = len(pump_numbers(sub))
    broker.start()
    # Subscribed again: the bridge is fully back.
    w.cloud.wait_line(r"Integration 'b1': subscribed to", 60, mark)
    sub.wait(lambda s: set(pump_numbers(s)) >= set(range(1, total + 1)), 120, f"all {total} events")
    got = pump_numbers(sub)
    ids = {m["id"] for _, m in sub.messages() if m.get("event") == "pump/n"}
    expect(len(ids) == total, f"{len(ids)} idempotency keys for {total} events")
    expect(before < total, f"every event arrived before the broker came back ({before}): nothing was tested")
    print(f"{total} events, {len(got)} messages ({len(got) - total} repeated), {before} before the restart")


def test_broker_to_device(w):
    """mosquitto_pub on tether/to-devices/led/on: a device subscribed to
    "mqtt/" gets the event "mqtt/led/on" from "mqtt:b1", once; what is no
    UTF-8 is dropped and counted."""
    broker = start(w)
    d, _ = fakedev.connect(w)
    _, tok = d.subscribe("mqtt/")
    subprocess.run(["mosquitto_pub", *broker.client_args(), "-q", "1", "-t", "tether/to-devices/led/on", "-m",
                    "on"], check=True, timeout=seconds(20))
    m = d.wait_for(lambda m: m.token == tok and m.payload, seconds(20), "mqtt/led/on on the device")
    ev = m.json()
    expect(ev["name"] == "mqtt/led/on" and ev["data"] == "on" and ev["coreid"] == "mqtt:b1", f"device got {ev}")
    bad = os.path.join(broker.dir, "bad.bin")
    with open(bad, "wb") as f:
        f.write(b"\xff\xfe")
    subprocess.run(["mosquitto_pub", *broker.client_args(), "-q", "1", "-t", "tether/to-devices/bad", "-f", bad],
                   check=True, timeout=seconds(20))
    w.cloud.wait_line(r"Integration 'b1': dropped the broker message on 'tether/to-devices/bad'", 20)
    subprocess.run(["mosquitto_pub", *broker.client_args(), "-q", "1", "-t", "tether/to-devices/end", "-m", "x"],
                   check=True, timeout=seconds(20))
    names = fakedev.notifications(d, tok, "mqtt/end", timeout=seconds(20))
    expect(names.count("mqtt/led/on") <= 1 and "mqtt/bad" not in names, f"device got {names}")


def bridge_state(w):
    conn = http.client.HTTPConnection("127.0.0.1", w.api_port, timeout=seconds(10))
    try:
        conn.request("GET", "/v1/integrations", headers={"Authorization": f"Bearer {w.token}"})
        r = conn.getresponse()
        body = json.loads(r.read())
    finally:
        conn.close()
    expect(r.status == 200, f"GET /v1/integrations: {r.status} {body}")
    return next(i for i in body if i["name"] == "b1")


def test_inbound_rate(w):
    """A broker that floods the Subscribe= filter cannot flood the devices
    and the journal: at most 100 messages a second (200 at once) become
    events, the others are dropped, counted and logged."""
    broker = start(w)
    n = 1000
    started = time.monotonic()
    subprocess.run(["mosquitto_pub", *broker.client_args(), "-q", "1", "-t", "tether/to-devices/flood", "-l"],
                   input="x\n" * n, text=True, check=True, timeout=seconds(60))
    w.cloud.wait_line(r"Integration 'b1': the broker sends more than 100 messages a second", 30)
    deadline = time.monotonic() + seconds(30)
    while True:
        b = bridge_state(w)
        if b["inbound"] >= n or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    elapsed = time.monotonic() - started
    accepted = b["inbound"] - b["inbound_dropped"]
    expect(b["inbound_limited"] > 0 and b["inbound_dropped"] >= b["inbound_limited"], f"bridge {b}")
    expect(accepted <= 200 + 100 * elapsed + 10, f"{accepted} events in {elapsed:.1f} s: {b}")
    print(f"{b['inbound']} messages, {accepted} events, {b['inbound_limited']} over the rate in {elapsed:.1f} s")


if __name__ == "__main__":
    sys.exit(run([test_events_reach_the_broker, test_broker_restart, test_broker_to_device, test_inbound_rate],
                 emulated="mosquitto is a host binary"))
