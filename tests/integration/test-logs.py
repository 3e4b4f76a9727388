#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""tether logs through the real cloud and agent (docs/cli.md, docs/protocol.md
"Log stream payload"): the agent reads a journal made by
systemd-journal-remote ([Logs] Directory=, the test hook); -n, --since,
--unit filtering, a unit the device does not allow, hostile message bytes
printed safely, a hostile refusal text printed safely, and -f seeing an
entry written later."""

import json
import os
import re
import struct
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import EMULATOR, TETHER, Failure, Skip, expect, run, seconds  # noqa: E402

JOURNAL_REMOTE = "/lib/systemd/systemd-journal-remote"
BOOT_ID = "0123456789abcdef0123456789abcdef"


def export_entry(fields, realtime_us):
    """One entry in the journal export format (binary-safe fields)."""
    out = b"__REALTIME_TIMESTAMP=%d\n__MONOTONIC_TIMESTAMP=%d\n_BOOT_ID=%s\n" % (
        realtime_us, realtime_us % 10**9, BOOT_ID.encode())
    for k, v in fields.items():
        v = v.encode() if isinstance(v, str) else v
        out += k.encode() + b"\n" + struct.pack("<Q", len(v)) + v + b"\n"
    return out + b"\n"


def write_journal(w, name, entries):
    """entries: (unit, identifier, pid, message bytes or str, realtime µs),
    written with systemd-journal-remote as DIR/NAME.journal."""
    if not os.access(JOURNAL_REMOTE, os.X_OK):
        raise Skip(f"no {JOURNAL_REMOTE} (package systemd-journal-remote; tools/dev deps installs it)")
    d = w.path("journal")
    os.makedirs(d, exist_ok=True)
    data = b""
    for unit, ident, pid, msg, ts in entries:
        f = {"MESSAGE": msg, "PRIORITY": "6"}
        if unit:
            f["_SYSTEMD_UNIT"] = unit
        if ident:
            f["SYSLOG_IDENTIFIER"] = ident
        if pid:
            f["_PID"] = str(pid)
        data += export_entry(f, ts)
    src = w.path(name + ".export")
    with open(src, "wb") as fh:
        fh.write(data)
    tmp = w.path(name + ".journal")
    r = subprocess.run([JOURNAL_REMOTE, f"--output={tmp}", src], capture_output=True, text=True)
    if r.returncode != 0:
        raise Failure(f"systemd-journal-remote: {r.stderr}")
    # In the directory at once: the agent watches it.
    os.rename(tmp, os.path.join(d, name + ".journal"))
    return d


def start(w, units="", journal=None):
    w.start_cloud()
    return w.start_agent(extra=f"[Logs]\nDirectory={journal}\n{'Units=' + units if units else ''}\n")


def lines(r):
    return [line for line in r.stdout.split("\n") if line]


NOW = int(time.time() * 1e6)


def base_entries():
    e = [("tetherd.service", "tetherd", 100 + i, f"tetherd line {i}", NOW - (60 - i) * 1_000_000) for i in range(30)]
    e += [("tether-ota-install.service", "tether-ota", 7, "ota line", NOW - 33_500_000)]
    e += [("foo.service", "foo", 9, f"foo line {i}", NOW - (40 - i) * 1_000_000) for i in range(3)]
    e += [("secret.service", "secret", 10, "secret line", NOW - 10 * 1_000_000)]
    return sorted(e, key=lambda x: x[4])


def test_lines_since_units(w):
    d = write_journal(w, "base", base_entries())
    a = start(w, units="foo.service", journal=d)
    dev = a.device_id

    # Default: the last 10 entries of the tether units.
    r = w.tether("logs", dev)
    got = lines(r)
    expect(len(got) == 10, f"default: {got}")
    expect(all(re.match(r"^[A-Z][a-z]{2} \d\d \d\d:\d\d:\d\d (tetherd\[\d+\]|tether-ota\[7\]): ", x) for x in got),
           f"short format: {got}")
    expect(got[-1].endswith("tetherd line 29") and any(x.endswith("ota line") for x in got), f"default: {got}")
    expect(not any("foo" in x or "secret" in x for x in got), f"other units by default: {got}")

    r = w.tether("logs", dev, "-n", "3")
    expect([x.split(": ", 1)[1] for x in lines(r)] == ["tetherd line 27", "tetherd line 28", "tetherd line 29"],
           f"-n 3: {r.stdout}")
    # --since: Unix seconds; everything from then on.
    since = (NOW - 35 * 1_000_000) // 1_000_000
    r = w.tether("logs", dev, "--since", str(since), "--json")
    got = [json.loads(x) for x in lines(r)]
    expect(got and all(e["realtime"] >= since * 1_000_000 for e in got) and
           got[-1]["message"] == "tetherd line 29", f"--since: {got}")
    expect(all(k in got[0] for k in ("time", "realtime", "unit", "identifier", "pid", "priority", "message")),
           f"--json entry: {got[0]}")
    # --unit: the allowed extra unit, alone.
    r = w.tether("logs", dev, "--unit", "foo.service", "-n", "100")
    expect([x.split(": ", 1)[1] for x in lines(r)] == ["foo line 0", "foo line 1", "foo line 2"],
           f"--unit foo.service: {r.stdout}")
    r = w.tether("logs", dev, "--unit", "foo.service", "--unit", "tether-ota-install.service", "-n", "100")
    expect(len(lines(r)) == 4, f"two units: {r.stdout}")
    # A unit not allowed: a clear refusal, nothing printed.
    r = w.tether("logs", dev, "--unit", "secret.service", check=False)
    expect(r.returncode == 5 and r.stdout == "" and
           "unit secret.service is not in [Logs] Units=" in r.stderr, f"refused: {r.returncode} {r.stderr!r}")


def test_hostile_messages(w):
    big = b"A" * 100_000
    entries = [("tetherd.service", "tetherd", 1, b"esc \x1b[31mred\x1b[0m bell \x07 nl \n cr \r end", NOW - 5_000_000),
               ("tetherd.service", "tetherd", 1, b"bad utf8 \xff\xfe\xc3 end", NOW - 4_000_000),
               ("tetherd.service", "tetherd", 1, "c1 \u009b31m end", NOW - 3_000_000),
               ("tetherd.service", "evil\x1b]0;title\x07", 1, b"ident", NOW - 2_000_000),
               ("tetherd.service", "tetherd", 1, big, NOW - 1_000_000)]
    d = write_journal(w, "hostile", entries)
    a = start(w, journal=d)
    r = subprocess.run(EMULATOR + [TETHER, "logs", a.device_id, "-n", "10"], capture_output=True,
                       env=dict(os.environ, TETHER_API=w.api, TETHER_TOKEN=w.token), timeout=seconds(30))
    expect(r.returncode == 0, f"tether logs: {r.returncode} {r.stderr!r}")
    out = r.stdout
    expect(not re.search(rb"[\x00-\x08\x0b-\x1f\x7f]", out) and b"\xc2\x9b" not in out,
           f"control characters reached stdout: {out[:400]!r}")
    text = out.decode("utf-8")  # valid UTF-8: invalid bytes were replaced
    got = text.split("\n")
    expect(r"esc \x1b[31mred\x1b[0m bell \x07 nl \n cr \r end" in got[0], f"escapes: {got[0]!r}")
    expect("bad utf8 \ufffd\ufffd\ufffd end" in got[1] or "bad utf8 \ufffd" in got[1], f"invalid UTF-8: {got[1]!r}")
    expect(r"c1 \u009b31m end" in got[2], f"C1: {got[2]!r}")
    expect(r"evil\x1b]0;title\x07" in got[3], f"identifier: {got[3]!r}")
    msg = got[4].split(": ", 1)[1]
    expect(msg.startswith("AAAA") and msg.endswith("…") and 16 * 1024 <= len(msg.encode()) <= 16 * 1024 + 3,
           f"100 KB message: {len(msg.encode())} bytes, ends {msg[-5:]!r}")
    # --json: the same entries as JSON, re-encoded.
    r = w.tether("logs", a.device_id, "-n", "10", "--json")
    got = [json.loads(x) for x in lines(r)]
    expect(got[0]["message"].startswith("esc \x1b[31m") and len(got) == 5, f"--json: {got[0]}")


def test_follow_sees_new_entry(w):
    d = write_journal(w, "base", base_entries())
    a = start(w, journal=d)
    env = dict(os.environ, TETHER_API=w.api, TETHER_TOKEN=w.token)
    p = subprocess.Popen(EMULATOR + [TETHER, "logs", a.device_id, "-n", "1", "-f"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    w.cleanups.append(lambda: p.poll() is None and (p.terminate() or p.wait()))
    seen = []
    cond = threading.Condition()

    def read():
        for line in p.stdout:
            with cond:
                seen.append((time.monotonic(), line.rstrip("\n")))
                cond.notify_all()

    threading.Thread(target=read, daemon=True).start()

    def wait_for(text):
        deadline = time.monotonic() + seconds(10)
        with cond:
            while not any(text in s for _, s in seen):
                if time.monotonic() > deadline or p.poll() is not None:
                    raise Failure(f"tether logs -f did not print {text!r}: {seen} {p.poll()}")
                cond.wait(0.2)
            return next(t for t, s in seen if text in s)

    wait_for("tetherd line 29")
    t0 = time.monotonic()
    write_journal(w, "later", [("tetherd.service", "tetherd", 5, "written later", int(time.time() * 1e6))])
    t1 = wait_for("written later")
    print(f"# tether logs -f printed an entry {(t1 - t0) * 1000:.0f} ms after its journal file appeared")
    p.terminate()
    expect(p.wait(seconds(10)) == 0, f"tether logs -f exit status after SIGTERM: {p.returncode}")


def test_hostile_error_text(w):
    """A refusal's text may be a device's own (the cloud passes its 403
    text and the reason a stream ended on): tether logs prints no control
    character of it, C1 (U+009B, CSI to some terminals) included."""
    import http.server

    evil = "refused \u009b31m red \u0085 nl \x1b[2J esc \u00e9 kept"

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"ok": False, "error": evil}).encode()
            self.send_response(403)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    w.cleanups.append(srv.shutdown)
    env = dict(os.environ, TETHER_API=f"http://127.0.0.1:{srv.server_address[1]}", TETHER_TOKEN="x")
    r = subprocess.run(EMULATOR + [TETHER, "logs", "dev1"], env=env, capture_output=True, timeout=seconds(30))
    err = r.stderr.decode("utf-8", errors="replace")
    expect(r.returncode != 0 and "refused" in err and "red" in err and "\u00e9 kept" in err,
           f"tether logs: {r.returncode} {err!r}")
    bad = [c for c in err.rstrip("\n") if ord(c) < 0x20 or 0x7f <= ord(c) <= 0x9f]
    expect(not bad, f"control characters reached the terminal: {bad} in {err!r}")


if __name__ == "__main__":
    sys.exit(run([test_lines_since_units, test_hostile_messages, test_follow_sees_new_entry, test_hostile_error_text],
                 emulated="systemd-journal-remote is the host's"))
