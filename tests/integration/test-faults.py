#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Fault injection: the agent keeps its promise (every accepted event
delivered once, in order) and comes back by itself while the cloud is
killed and restarted, stopped, cut off by a silent network, while the agent
itself is killed, while disks are full and while clocks are stepped.

Events come from the test plugin "pump" (tests/plugins/pump.c): numbers
1, 2, 3, ... each published until the agent accepts it, never again. They
are counted by `tether subscribe --resume`, which reconnects after a cloud
restart and resumes after its last event (Last-Event-ID). Each test asserts
that the subscriber saw exactly 1..N: nothing missing, nothing twice, in
order. Counts go to the log; the last line sums them up."""

import datetime
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (BUILD, SLOWDOWN, TEST_PLUGINS, TETHER, WRAPPER, EventStream, Failure, NetNs,  # noqa: E402
                     Skip, expect, poll, run, seconds, server_connections, wait_request_read, whole_seconds)

# Timings are harness.TIME_FACTOR times longer than the smallest that work
# on an idle machine (seconds()); under valgrind (TETHER_TEST_WRAPPER) or an
# emulator (cross builds) the daemons run many times slower: 1/SLOWDOWN of
# the events; under valgrind no timing or memory figures are checked.

# Small timings so that many faults fit in a CI run.
RECONNECT_MIN, RECONNECT_MAX, STABLE = 0.1, seconds(0.5), seconds(2)
AGENT_FAST = f"""KeepaliveSec={seconds(0.5)}
KeepaliveTimeoutSec={seconds(0.5)}
ConnectTimeoutSec={seconds(1)}
ReconnectMinSec={RECONNECT_MIN}
ReconnectMaxSec={RECONNECT_MAX}
StableSec={STABLE}"""
CALL_TIMEOUT = whole_seconds(2)
CLOUD_FAST = f"""PingSec={whole_seconds(1)}
DeviceTimeoutSec={whole_seconds(3)}
CallTimeoutSec={CALL_TIMEOUT}"""


def scaled(count):
    """An event count or rate, scaled down under valgrind."""
    return max(count // SLOWDOWN, 50)

TOTALS = {"published": 0, "received": 0, "cloud_restarts": 0, "cloud_stops": 0, "drops": 0,
          "agent_kills": 0, "duplicates_dropped": 0}


def pump_conf(start=None, log_progress=False):
    conf = "[Plugins]\nEnable=pump\n[Plugin pump]\n"
    if start:
        conf += f"Start={start}\n"
    if log_progress:
        conf += "LogProgress=yes\n"
    return conf


def numbers(sub):
    return [int(e["data"]) for e in sub.snapshot() if e.get("name") == "pump/n"]


def wait_numbers(sub, n, timeout, what=None):
    """Until the subscriber has n pump events (or more: a bug)."""
    sub.wait_until(lambda evs: sum(1 for e in evs if e.get("name") == "pump/n") >= n, timeout,
                   what or f"{n} pump events (have {len(numbers(sub))})")


def check_exactly_once(sub, last, what):
    """The subscriber saw 1..last, each once, in order."""
    got = numbers(sub)
    seen, dupes, disorder = set(), 0, 0
    for i, n in enumerate(got):
        dupes += n in seen
        seen.add(n)
        disorder += i > 0 and n <= got[i - 1]
    missing = sorted(set(range(1, last + 1)) - seen)
    expect(got == list(range(1, last + 1)),
           f"{what}: received {len(got)} events for {last} published: {dupes} twice, {disorder} out of order, "
           f"{len(missing)} missing (first: {missing[:10]}), unexpected: {sorted(seen - set(range(1, last + 1)))[:10]}")
    TOTALS["published"] += last
    TOTALS["received"] += len(got)
    return len(got)


def duplicates_dropped(w):
    """Resends the cloud recognised and did not route again, all runs."""
    return sum(d.count(r"resent event \d+") for d in w.daemons if d.name == "cloud")


def new_subscriber(w, dev):
    return w.subscribe("pump/", "--device", dev, "--resume").wait_ready()


def tether_bg(w, *args, reached=False):
    """Start tether in the background; with reached, return once the cloud
    has read its request (and, single-threaded, acted on it)."""
    env = dict(os.environ, TETHER_API=w.api, TETHER_TOKEN=w.token)
    before = server_connections(w.api_port) if reached else None
    p = subprocess.Popen([TETHER, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p.started = time.monotonic()
    if reached:
        wait_request_read(w.api_port, before, what=f"tether {' '.join(args)}")
    return p


def wait_proc(p, timeout):
    """Exit status, stderr, and seconds since the call started."""
    t0 = p.started
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise Failure(f"a call was left hanging for more than {timeout} s")
    return p.returncode, err.strip(), time.monotonic() - t0


def test_cloud_sigkill_restarts(w):
    """20 SIGKILLs of the cloud while the pump publishes 4000 events. The
    journal is small enough to be rewritten a few times on the way."""
    journal = "[Events]\nJournalMaxBytes=262144\n"
    w.start_cloud(timing=CLOUD_FAST, extra=journal)
    coap, api = w.coap_port, w.api_port
    device = w.new_device()
    sub = new_subscriber(w, device[0])
    total, restarts = scaled(4000), 20
    a = w.start_agent(device=device, plugin_dir=TEST_PLUGINS, connection=AGENT_FAST,
                      extra=pump_conf(f"1,{total},{scaled(250)}"))
    took = []
    for i in range(restarts):
        # Kill while events flow: wait for news since the last restart.
        have = len(numbers(sub))
        wait_numbers(sub, min(have + scaled(40), total), 20)
        pending = None
        if i == restarts // 2:
            # A call waiting for the (stopped) device when the cloud dies:
            # its HTTP client must get an error at once, not hang.
            a.signal(signal.SIGSTOP)
            pending = tether_bg(w, "get", device[0], "next", reached=True)
        w.cloud.kill()
        if pending:
            rc, err, t = wait_proc(pending, CALL_TIMEOUT * 3)
            print(f"# call in flight when the cloud died: exit {rc} after {t:.2f} s: {err}")
            expect(rc != 0 and "lost" in err, f"call in flight at the cloud's death: exit {rc}, {err!r}")
            a.signal(signal.SIGCONT)
        mark = w.notify.mark()
        t0 = time.monotonic()
        w.start_cloud(port=coap, api_port=api, timing=CLOUD_FAST, extra=journal)
        w.wait_online(device[0], mark)
        took.append(time.monotonic() - t0)
    wait_numbers(sub, total, 60)
    n = check_exactly_once(sub, total, "cloud SIGKILL")
    dup = duplicates_dropped(w)
    TOTALS["cloud_restarts"] += restarts
    TOTALS["duplicates_dropped"] += dup
    print(f"# cloud SIGKILL x{restarts}: {total} published, {n} received once, in order; "
          f"{dup} resends dropped by the cloud; back online in {min(took):.2f}..{max(took):.2f} s")
    sub.close()


RETRY = re.compile(r"retrying in ([0-9.]+) s")


def wait_retries(agent, start, n, timeout=10):
    """The first n backoff delays the agent logged from line start on."""
    deadline = time.monotonic() + seconds(timeout)
    with agent.cond:
        while True:
            delays = [float(m.group(1)) for m in map(RETRY.search, agent.lines[start:]) if m]
            if len(delays) >= n:
                return delays[:n]
            left = deadline - time.monotonic()
            if left <= 0:
                raise Failure(f"the agent logged {len(delays)} of {n} reconnect attempts")
            agent.cond.wait(min(left, 0.5))


def sse_lines(w, path, last_event_id, until, timeout=10):
    """Read an event stream with a Last-Event-ID until a line matches."""
    conn = http.client.HTTPConnection("127.0.0.1", w.api_port, timeout=seconds(timeout))
    conn.request("GET", path, headers={"Authorization": f"Bearer {w.token}", "Last-Event-ID": last_event_id})
    r = conn.getresponse()
    expect(r.status == 200, f"stream answered {r.status}")
    lines, deadline = [], time.monotonic() + seconds(timeout)
    while time.monotonic() < deadline:
        line = r.fp.readline().decode().rstrip("\n")
        lines.append(line)
        if re.search(until, line):
            conn.close()
            return lines
    conn.close()
    raise Failure(f"the stream never sent /{until}/; got {lines[-5:]}")


def test_journal_replay(w):
    """The journal keeps its newer half when it outgrows JournalMaxBytes,
    delivery stays exactly-once through the rewrites, and a client resuming
    from an event that is gone is told so and gets what is left."""
    max_bytes = 65536
    w.start_cloud(timing=CLOUD_FAST, extra=f"[Events]\nJournalMaxBytes={max_bytes}\n")
    device = w.new_device()
    sub = new_subscriber(w, device[0])
    # Enough events to outgrow the smallest journal, however slow the daemons.
    total = max(scaled(3000), 1500)
    w.start_agent(device=device, plugin_dir=TEST_PLUGINS, connection=AGENT_FAST,
                  extra=pump_conf(f"1,{total},{scaled(3000)}"))
    wait_numbers(sub, total, 60)
    n = check_exactly_once(sub, total, "journal rewrites")
    size = os.path.getsize(w.path("cloud-state", "events.journal"))
    expect(size <= max_bytes + 1024, f"the journal is {size} bytes, JournalMaxBytes={max_bytes}")
    last_id = [e["id"] for e in sub.snapshot() if e.get("name") == "pump/n"][-1]
    epoch, newest = last_id.split("-")
    lines = sse_lines(w, f"/v1/devices/{device[0]}/events/pump", f"{epoch}-1", rf"^id: {last_id}$")
    gone = [line for line in lines if "no longer in the journal" in line]
    ids = [int(line.split("-")[1]) for line in lines if line.startswith("id: ")]
    expect(gone and ids == list(range(ids[0], int(newest) + 1)),
           f"replay from id 1 after rewrites: {gone}, ids {ids[:3]}..{ids[-3:]}")
    lines = sse_lines(w, "/v1/events", "0123456789abcdef-5", r"^id: ")
    expect(any("from another journal" in line for line in lines), f"foreign Last-Event-ID: {lines}")
    print(f"# journal rewrites: {total} published, {n} received once, in order; journal {size} bytes "
          f"(JournalMaxBytes={max_bytes}); a client resuming from id 1 was told '{gone[0][1:]}' and got ids "
          f"{ids[0]}..{ids[-1]}")
    sub.close()


def test_backoff(w):
    """Reconnect delays grow exponentially with jitter in [1/2, 1], stop at
    ReconnectMaxSec, and start small again only after a connection held
    for StableSec (AGENT_FAST)."""
    if WRAPPER:
        raise Skip("a timing test: not under valgrind")
    base, cap, stable = RECONNECT_MIN, RECONNECT_MAX, STABLE
    w.start_cloud(timing=CLOUD_FAST)
    coap, api = w.coap_port, w.api_port
    a = w.start_agent(connection=AGENT_FAST)

    def outage(n):
        mark = a.mark()
        w.cloud.kill()
        delays = wait_retries(a, mark, n)
        mark_n = w.notify.mark()
        w.start_cloud(port=coap, api_port=api, timing=CLOUD_FAST)
        w.wait_online(a.device_id, mark_n)
        return delays

    def bounds(i, first_n):
        d = min(base * 2 ** (first_n + i), cap)
        return d / 2 - 0.05, d + 0.05  # logged with one decimal

    # Connected long enough before (the agent says how long it has been
    # connected): the first retry is back at the base.
    poll(lambda: json.loads(w.tetherctl(a, "status", "--json").stdout)["connected_sec"] >= stable, 2 + 10,
         f"the agent to be connected for StableSec={stable}", interval=0.1)
    delays = outage(7)
    print(f"# backoff after a stable connection: {delays}")
    for i, d in enumerate(delays):
        lo, hi = bounds(i, 0)
        expect(lo <= d <= hi, f"retry {i + 1} waited {d} s, expected {lo:.2f}..{hi:.2f}")
    expect(max(delays) <= cap + 0.05, f"backoff beyond ReconnectMaxSec: {delays}")
    # Cut again at once: no reset, the delays go on from the cap.
    delays = outage(2)
    print(f"# backoff right after a reconnect: {delays}")
    expect(delays[0] >= cap / 2 - 0.05, f"the backoff was reset by a short connection: {delays}")


def test_cloud_sigstop(w):
    """The cloud frozen (SIGSTOP) for longer than the keepalive: the agent
    notices, retries, and its memory does not grow while events pile up."""
    w.start_cloud(timing=CLOUD_FAST)
    device = w.new_device()
    sub = new_subscriber(w, device[0])
    total = scaled(1500)
    a = w.start_agent(device=device, plugin_dir=TEST_PLUGINS, connection=AGENT_FAST,
                      extra=pump_conf(f"1,{total},{scaled(250)}"))
    for i in range(2):
        wait_numbers(sub, scaled(200 + i * 500), 20)
        before = a.status()
        mark = a.mark()
        w.cloud.signal(signal.SIGSTOP)
        a.wait_line("keepalive timed out", timeout=5, start=mark)
        # Stay frozen through a few failed reconnects (TLS stalls).
        a.wait_line("connect timed out", timeout=5, start=mark)
        during = a.status()
        mark_n = w.notify.mark()
        w.cloud.signal(signal.SIGCONT)
        w.wait_online(device[0], mark_n, timeout=10)
        print(f"# SIGSTOP {i + 1}: agent RssAnon {before['RssAnon']} -> {during['RssAnon']} KiB, "
              f"fds {before['fds']} -> {during['fds']}")
        expect(WRAPPER or during["RssAnon"] - before["RssAnon"] < 4096,
               f"agent memory grew by {during['RssAnon'] - before['RssAnon']} KiB while the cloud was stalled")
    wait_numbers(sub, total, 60)
    n = check_exactly_once(sub, total, "cloud SIGSTOP")
    TOTALS["cloud_stops"] += 2
    print(f"# cloud SIGSTOP x2: {total} published, {n} received once, in order")
    sub.close()


def test_silent_network_drops(w):
    """Packets silently dropped between agent and cloud (no FIN, no RST):
    keepalive notices, calls in flight get 504/503, the agent reconnects."""
    ns = NetNs(w)
    w.pki("server", "--force", w.path("pki"), "localhost", "127.0.0.1", ns.host_ip)
    w.start_cloud(timing=CLOUD_FAST, listen=ns.host_ip)
    device = w.new_device()
    sub = new_subscriber(w, device[0])
    total, drops = scaled(2000), 5
    a = w.start_agent(device=device, host=ns.host_ip, plugin_dir=TEST_PLUGINS, connection=AGENT_FAST,
                      extra=pump_conf(f"1,{total},{scaled(150)}"), prefix=ns.prefix)
    for i in range(drops):
        wait_numbers(sub, min(len(numbers(sub)) + scaled(50), total), 20)
        mark = a.mark()
        ns.drop(True)
        t0 = time.monotonic()
        call = tether_bg(w, "get", device[0], "next")
        a.wait_line("keepalive timed out", timeout=5, start=mark)
        detected = time.monotonic() - t0
        rc, err, t = wait_proc(call, CALL_TIMEOUT + seconds(5))
        expect(rc in (4, 6), f"a call during a silent drop ended with exit {rc}: {err}")
        print(f"# drop {i + 1}: dead peer noticed after {detected:.2f} s; call in flight: exit {rc} "
              f"after {t:.2f} s ({err})")
        mark_n = w.notify.mark()
        ns.drop(False)
        w.wait_online(device[0], mark_n, timeout=10)
    wait_numbers(sub, total, 60)
    n = check_exactly_once(sub, total, "silent drops")
    TOTALS["drops"] += drops
    TOTALS["duplicates_dropped"] += duplicates_dropped(w)
    print(f"# silent drop x{drops}: {total} published, {n} received once, in order; "
          f"{duplicates_dropped(w)} resends dropped by the cloud")
    sub.close()


def test_agent_sigkill(w):
    """The agent SIGKILLed while its outbox is busy: what it accepted is
    delivered after the restart, once, in order. One more kill with a call
    waiting at the cloud: the caller gets 503 at once."""
    w.start_cloud(timing=CLOUD_FAST)
    device = w.new_device()
    sub = new_subscriber(w, device[0])
    kills, run_len, rate = 3, scaled(2400), scaled(8000)
    state = w.path("agent-state")
    a = w.start_agent(device=device, plugin_dir=TEST_PLUGINS, connection=AGENT_FAST,
                      extra=pump_conf(f"1,{run_len},{rate}", log_progress=True), state_dir=state)
    # Restarts keep the device and the state directory; the pump waits
    # to be told where to go on.
    conf = w.agent_conf("agent-restarted", device[1], device[2], plugin_dir=TEST_PLUGINS, connection=AGENT_FAST,
                        extra=pump_conf(log_progress=True), state_dir=state)
    next_first = 1
    for i in range(kills + 1):
        if i < kills:
            wait_numbers(sub, next_first + run_len // 3, 20)
            a.kill()
            at_kill = len(numbers(sub))
            accepted = max([int(line.rsplit(" ", 1)[1]) for line in a.lines if "accepted through" in line] or [0])
        else:
            # The extra kill: the agent stopped with a call waiting for it.
            a.signal(signal.SIGSTOP)
            call = tether_bg(w, "get", device[0], "next", reached=True)
            a.kill()
            rc, err, t = wait_proc(call, CALL_TIMEOUT * 3)
            print(f"# call in flight when the agent died: exit {rc} after {t:.2f} s: {err}")
            expect(rc == 4 and t < CALL_TIMEOUT, f"call in flight at the agent's death: exit {rc} after {t:.2f} s")
            accepted = at_kill = 0
        notify_mark = w.notify.mark()
        a = w.run_agent(f"agent-{i + 2}", conf, device)
        waiting = a.wait_line(r"event\(s\) waiting", timeout=5)
        # Everything before this marker was sent first: the outbox keeps order.
        tag = f"restart-{i + 1}"
        w.tether("call", device[0], "mark", tag)
        sub.wait(lambda e, tag=tag: e.get("name") == "pump/mark" and e.get("data") == tag, timeout=30,
                 what=f"marker {tag}")
        got = numbers(sub)
        last = max(got)
        expect(last >= accepted, f"the plugin had {accepted} accepted but only {last} arrived")
        # The agent says when its outbox is empty again.
        w.notify.wait(lambda m: m.get("X_TETHER_OUTBOX") == "0", 10, "X_TETHER_OUTBOX=0", notify_mark)
        check_exactly_once(sub, last, f"agent SIGKILL {i + 1}")
        TOTALS["published"] -= last  # counted once at the end
        TOTALS["received"] -= last
        print(f"# agent SIGKILL {i + 1}: the plugin had {accepted} accepted, the subscriber {at_kill}; "
              f"after the restart {last} received once; {waiting.split(': ', 1)[-1]}")
        next_first = last + 1
        count = run_len if i < kills else scaled(500)
        w.tether("call", device[0], "start", f"{next_first},{count},{rate}")
    total = next_first + scaled(500) - 1
    wait_numbers(sub, total, 60)
    n = check_exactly_once(sub, total, "agent SIGKILL")
    TOTALS["agent_kills"] += kills + 1
    TOTALS["duplicates_dropped"] += duplicates_dropped(w)
    print(f"# agent SIGKILL x{kills + 1}: {total} published, {n} received once, in order; "
          f"{duplicates_dropped(w)} resends dropped by the cloud")
    sub.close()


def test_outbox_full(w):
    """A full outbox while the cloud is away: Overflow=reject refuses new
    events (the plugin retries, nothing is lost); Overflow=drop-oldest keeps
    the newest, and the loss is counted and logged on both sides."""
    w.start_cloud(timing=CLOUD_FAST)
    coap, api = w.coap_port, w.api_port
    device = w.new_device()
    sub = new_subscriber(w, device[0])
    limit, total = 100, 600
    state = w.path("agent-state")
    for policy in ("reject", "drop-oldest"):
        first = 1 if policy == "reject" else total + 1
        # The cloud is away while the run is published: the outbox fills.
        w.cloud.kill()
        conf = w.agent_conf(f"agent-{policy}", device[1], device[2], plugin_dir=TEST_PLUGINS,
                            connection=AGENT_FAST, state_dir=state,
                            extra=pump_conf(f"{first},{total},{scaled(2000)}") +
                            f"[Outbox]\nMaxEvents={limit}\nOverflow={policy}\n")
        a = w.run_agent(f"agent-{policy}", conf, device, wait_online=False)
        if policy == "reject":
            a.wait_line("Outbox full: refused", timeout=20)
        else:
            a.wait_line("done: accepted", timeout=20)
            a.wait_line("Outbox full: dropped", timeout=20)
        mark_n = w.notify.mark()
        w.start_cloud(port=coap, api_port=api, timing=CLOUD_FAST)
        w.wait_online(device[0], mark_n)
        last = first + total - 1
        if policy == "reject":
            wait_numbers(sub, last, 30)
            check_exactly_once(sub, last, "Overflow=reject")
            print(f"# Overflow=reject, MaxEvents={limit}: {total} published (the plugin retried refused ones), "
                  f"{total} received once, in order")
        else:
            sub.wait(lambda e, last=last: e.get("name") == "pump/n" and e.get("data") == str(last), 30,
                     what=f"event {last}")
            got = numbers(sub)[total:]
            expect(got == list(range(last - limit + 1, last + 1)),
                   f"drop-oldest kept {len(got)}: {got[:3]}..{got[-3:]}, expected the newest {limit}")
            gap = w.cloud.wait_line(r"skipped event\(s\)", timeout=5)
            a.stop()
            # The last word on drops comes at exit, with the total.
            said = [line for line in a.lines if "Outbox full: dropped" in line]
            expect(said and f"({total - limit} in all)" in said[-1], f"drops not reported right: {said}")
            print(f"# Overflow=drop-oldest, MaxEvents={limit}: {total} published, the newest {len(got)} "
                  f"received once, in order; the agent: '{said[-1].split(': ', 1)[-1]}'; the cloud: "
                  f"'{gap.split(': ', 1)[-1]}'")
        a.stop()
    sub.close()


def mount_tmpfs(w, path, size):
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", path],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise Skip(f"cannot mount a tmpfs to fill up: {r.stderr.strip()}")
    w.cleanups.append(lambda: subprocess.run(["umount", "-l", path], capture_output=True))


def fill(path, leave):
    """Fill the file system of path up to `leave` bytes; return the filler."""
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize
    filler = os.path.join(path, "filler")
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


def test_disk_full(w):
    """The agent's state directory full while the cloud is away: publish
    fails with ENOSPC (counted and logged), nothing accepted is lost. Then
    the cloud's state directory full: it answers 5.03, the agent keeps
    the events and sends them again."""
    agent_state, cloud_state = w.path("agent-state"), w.path("cloud-state")
    mount_tmpfs(w, agent_state, "256k")
    mount_tmpfs(w, cloud_state, "512k")
    w.start_cloud(timing=CLOUD_FAST, extra="[Events]\nJournalMaxBytes=131072\n")
    coap, api = w.coap_port, w.api_port
    device = w.new_device()
    sub = new_subscriber(w, device[0])
    # Not scaled down: the disk must fill up while the run goes on.
    first_run, total = 700, 1400
    a = w.start_agent(device=device, plugin_dir=TEST_PLUGINS, connection=AGENT_FAST,
                      extra=pump_conf(f"1,{first_run},{scaled(400)}"), state_dir=agent_state)
    wait_numbers(sub, scaled(100), 20)
    # Agent side: the cloud goes away, the outbox fills the disk.
    filler = fill(agent_state, 16 * 1024)
    w.cloud.kill()
    mark = a.mark()
    a.wait_line("Failed to write .* to the outbox", timeout=20, start=mark)
    # Keep the disk full for a while: 50 refusals in a row, 10 ms apart.
    a.wait_line("failed 50 time.*No space left on device", timeout=20, start=mark)
    os.unlink(filler)
    mark_n = w.notify.mark()
    w.start_cloud(port=coap, api_port=api, timing=CLOUD_FAST, extra="[Events]\nJournalMaxBytes=131072\n")
    w.wait_online(device[0], mark_n)
    wait_numbers(sub, first_run, 30)
    # Cloud side: its journal cannot grow while the next run is sent.
    filler = fill(cloud_state, 4 * 1024)
    mark, mark_a = w.cloud.mark(), a.mark()
    w.tether("call", device[0], "start", f"{first_run + 1},{total - first_run},{scaled(400)}")
    w.cloud.wait_line("Failed to store an event", timeout=20, start=mark)
    for _ in range(3):
        # The agent keeps the event, reconnects and tries again.
        a.wait_line("Cloud could not take event", timeout=10, start=mark_a)
        mark_a = a.mark()
    os.unlink(filler)
    wait_numbers(sub, total, 60)
    n = check_exactly_once(sub, total, "disk full")
    refused = int(w.tether("get", device[0], "refused").stdout.strip())
    stored = w.cloud.count("Failed to store an event", mark)
    print(f"# disk full: agent's disk: the plugin saw {refused} publish() calls refused; cloud's disk: "
          f"{stored} events refused with 5.03 and sent again; {total} published, {n} received once, in order")
    expect(refused >= 50, "the agent's disk never filled up")
    sub.close()


WALLCLOCK = os.path.join(BUILD, "tests", "clock", ".libs", "wallclock.so")


def test_clock_steps(w):
    """Wall clocks stepped forward and back (as NTP does) under agent and
    cloud: no reconnect, nothing lost or repeated. tests/clock/wallclock.c
    steps the realtime clock of these processes only; CLOCK_MONOTONIC, which
    every deadline in tether uses, stays real. The cloud's steps show in
    received_at; the agent's in published_at when its clock is sane
    (docs/protocol.md, "Event time"), not when it is a day ahead."""
    if not os.path.exists(WALLCLOCK):
        raise Skip(f"{WALLCLOCK} is not built")
    agent_clock, cloud_clock = w.path("agent.clock"), w.path("cloud.clock")

    def step(path, offset):
        with open(path + ".new", "w") as f:
            f.write(f"{offset}\n")
        os.replace(path + ".new", path)

    def faked(path):
        step(path, 0)
        # An ASan build wants its runtime first; the shim has no ASan.
        return {"LD_PRELOAD": WALLCLOCK, "TETHER_TEST_CLOCK_FILE": path,
                "ASAN_OPTIONS": os.environ.get("ASAN_OPTIONS", "") + ":verify_asan_link_order=0"}

    w.start_cloud(timing=CLOUD_FAST, env=faked(cloud_clock))
    device = w.new_device()
    sub = new_subscriber(w, device[0])
    stream = EventStream(w, "pump/")
    # Not scaled down: every step needs events after it to show.
    total = 800
    a = w.start_agent(device=device, plugin_dir=TEST_PLUGINS, connection=AGENT_FAST,
                      extra=pump_conf(f"1,{total},{scaled(200)}"), env=faked(agent_clock))
    with open(f"/proc/{a.proc.pid}/maps") as f:
        expect("wallclock.so" in f.read(), "the clock shim is not loaded into tetherd")
    mark = a.mark()
    hour, day = 3600, 86400
    plan = [(agent_clock, 26 * hour), (cloud_clock, -20 * 60), (agent_clock, 0), (cloud_clock, 2 * day),
            (cloud_clock, 0), (agent_clock, -hour), (agent_clock, 0)]
    for path, offset in plan:
        wait_numbers(sub, min(len(numbers(sub)) + 100, total), 20)
        step(path, offset)
    wait_numbers(sub, total, 60)
    stream.wait(lambda m: m["data"]["data"] == str(total), 10, f"event {total} on the raw stream")
    with stream.cond:
        stamps = [(m["data"]["received_at"], m["data"]["published_at"]) for m in stream.messages]
    n = check_exactly_once(sub, total, "clock steps")
    dropped = a.count("Disconnected from", mark)
    expect(dropped == 0, f"the agent reconnected {dropped} time(s) when the clocks stepped")

    def parse(s):
        return datetime.datetime.fromisoformat(s.replace("Z", "+00:00"))
    # The cloud stamps received_at with its wall clock: its steps show there.
    times = [parse(r) for r, _ in stamps]
    jumps = [(b - a).total_seconds() for a, b in zip(times, times[1:])]
    back, ahead = min(jumps), max(jumps)
    # published_at is the agent's clock when sane: an hour behind the
    # cloud's (the agent's step) or two days (the cloud's) is, ahead by a
    # day (the agent's step) or 20 minutes (the cloud's) is not.
    lead = [(parse(p) - parse(r)).total_seconds() for r, p in stamps]
    print(f"# clock steps {', '.join(f'{os.path.basename(p)} {o:+d} s' for p, o in plan)}: {total} published, {n} received once, in order, "
          f"no reconnect; the cloud's timestamps jumped {back:+.0f} s and {ahead:+.0f} s; published_at was "
          f"{min(lead):+.0f} s to {max(lead):+.0f} s from received_at")
    expect(back < -15 * 60 and ahead > 86400, "the cloud's clock steps do not show in its timestamps")
    expect(any(-hour - 100 < x < -hour + 100 for x in lead), "the agent's clock an hour behind does not show")
    expect(any(-2 * day - 100 < x < -2 * day + 100 for x in lead), "the cloud's clock 2 days ahead does not show")
    expect(max(lead) <= 60, "a device time ahead of the cloud's clock was taken")
    sub.close()


def summary(w):
    """Not a test of its own: the sums of the tests above, for the log."""
    if not TOTALS["published"]:
        raise Skip("sums up the tests before it, and none of them counted events")
    print(f"# TOTAL: {TOTALS['published']} events published, {TOTALS['received']} received exactly once "
          f"in order, across {TOTALS['cloud_restarts']} cloud SIGKILL restarts, {TOTALS['cloud_stops']} cloud "
          f"SIGSTOPs, {TOTALS['drops']} silent network drops, {TOTALS['agent_kills']} agent SIGKILLs; "
          f"{TOTALS['duplicates_dropped']} resends dropped by the cloud as duplicates")
    expect(TOTALS["received"] == TOTALS["published"], "totals differ")


if __name__ == "__main__":
    sys.exit(run([test_cloud_sigkill_restarts, test_journal_replay, test_backoff, test_cloud_sigstop, test_silent_network_drops, test_agent_sigkill,
                  test_outbox_full, test_disk_full, test_clock_steps, summary]))
