#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Operators' metrics (docs/cloud.md, "Metrics"; docs/cli.md, "tetherctl
status --json"): GET /metrics parses as the Prometheus text format with a
strict parser, its counters move by exactly one for one call and one
event, a MetricsTokenFile= token reads /metrics and nothing else, and the
agent's counters in tetherctl status --json are plausible after a call."""

import json
import os
import re
import signal
import sys
import urllib.error
import urllib.parse
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import SLOW, EventStream, expect, poll, run  # noqa: E402

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"'
SAMPLE = re.compile(rf"^({NAME})(\{{(?:{LABEL}(?:,{LABEL})*)?\}})? (\S+)$")
TYPES = ("counter", "gauge", "histogram", "summary", "untyped")


def http(w, path, token=None, method="GET", data=None):
    """(status, content type, body text) of one request to the API."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(f"{w.api}{path}", headers=headers, method=method, data=data)
    try:
        with urllib.request.urlopen(req, timeout=10 * SLOW) as r:
            return r.status, r.headers.get("Content-Type"), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type"), e.read().decode()


def parse(text):
    """Samples {(name, ((label, value), ...)): float} of an exposition; any
    line that is not a comment, blank or `name{labels} value` fails, and
    so does a sample whose family has no # TYPE before it."""
    types, helps, samples = {}, set(), {}
    expect(text.endswith("\n"), "the exposition does not end with a newline")
    for n, line in enumerate(text.split("\n")[:-1], 1):
        if line == "":
            continue
        if line.startswith("#"):
            m = re.match(rf"^# (HELP|TYPE) ({NAME}) (.*)$", line)
            if not m:
                expect(not line.startswith(("# HELP", "# TYPE")), f"line {n}: malformed: {line!r}")
                continue
            kind, name, rest = m.groups()
            if kind == "TYPE":
                expect(rest in TYPES, f"line {n}: unknown type {rest!r}")
                expect(name not in types, f"line {n}: second # TYPE for {name}")
                types[name] = rest
            else:
                expect(name not in helps, f"line {n}: second # HELP for {name}")
                helps.add(name)
            continue
        m = SAMPLE.match(line)
        expect(m, f"line {n}: not a sample: {line!r}")
        name, labels, value = m.group(1), m.group(2) or "", m.group(7)
        pairs = tuple(re.findall(LABEL, labels))
        expect(len({k for k, _ in pairs}) == len(pairs), f"line {n}: a label twice: {line!r}")
        family = name
        if name not in types:
            family = re.sub(r"_(bucket|sum|count)$", "", name)
            expect(types.get(family) == "histogram", f"line {n}: {name} has no # TYPE")
        try:
            v = float(value)
        except ValueError:
            raise AssertionError(f"line {n}: bad value {value!r}")
        key = (name, pairs)
        expect(key not in samples, f"line {n}: sample repeated: {line!r}")
        samples[key] = v
    # Histograms: buckets cumulative, +Inf == _count.
    for (name, pairs), v in samples.items():
        if name.endswith("_count") and types.get(name[:-6]) == "histogram":
            base = name[:-6]
            buckets = sorted(((float(dict(p)["le"]), s) for (nm, p), s in samples.items()
                              if nm == base + "_bucket" and tuple(x for x in p if x[0] != "le") == pairs),
                             key=lambda b: b[0])
            expect(buckets and buckets[-1][0] == float("inf") and buckets[-1][1] == v,
                   f"{base}{pairs}: +Inf bucket is not _count")
            expect(all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:])), f"{base}: buckets not cumulative")
    return samples


def scrape(w, token):
    status, ctype, body = http(w, "/metrics", token)
    expect(status == 200, f"GET /metrics: {status} {body[:200]!r}")
    expect(ctype.startswith("text/plain; version=0.0.4"), f"Content-Type {ctype!r}")
    return parse(body)


def value(samples, name, **labels):
    key = (name, tuple(sorted(labels.items())))
    for (n, p), v in samples.items():
        if n == name and tuple(sorted(p)) == key[1]:
            return v
    raise AssertionError(f"no sample {name}{labels}")


def test_metrics(w):
    with open(w.path("metrics-tokens"), "w") as f:
        f.write("# the scraper\nscrape-only-token-0123456789\n")
    w.start_cloud(extra=f"[API]\nMetricsTokenFile={w.path('metrics-tokens')}\n")
    a = w.start_agent()
    dev = a.device_id
    scraper = "scrape-only-token-0123456789"

    before = scrape(w, w.token)
    expect(value(before, "tether_cloud_devices_connected") == 1, "devices_connected is not 1")
    expect(value(before, "tether_cloud_handshakes_started_total") >= 1
           and value(before, "tether_cloud_handshakes_completed_total") >= 1, "handshakes not counted")
    expect(value(before, "tether_cloud_loop_delay_seconds_count", worker="0") >= 0, "no loop delay for worker 0")

    # One call: calls_total +1, the histogram's count +1, nothing else called.
    w.tether("call", dev, "echo", "hi")
    after = scrape(w, w.token)
    ok = dict(kind="function", outcome="ok")
    expect(value(after, "tether_cloud_calls_total", **ok) == value(before, "tether_cloud_calls_total", **ok) + 1,
           "calls_total{function,ok} did not move by one")
    h = "tether_cloud_call_duration_seconds_count"
    expect(value(after, h, kind="function") == value(before, h, kind="function") + 1,
           "the call latency histogram did not count the call")
    expect(value(after, "tether_cloud_call_duration_seconds_sum", kind="function")
           > value(before, "tether_cloud_call_duration_seconds_sum", kind="function"), "latency sum did not grow")
    expect(value(after, "tether_cloud_calls_total", kind="variable", outcome="ok")
           == value(before, "tether_cloud_calls_total", kind="variable", outcome="ok"), "a read counted")
    # The session walks: the cloud's scans ran, and the walk libcoap starts
    # after each dispatch was left out (the call's answer was one).
    expect(value(after, "tether_cloud_session_walks_total", kind="done") >= 1, "no session scan counted")
    expect(value(after, "tether_cloud_session_walks_total", kind="skipped")
           > value(before, "tether_cloud_session_walks_total", kind="skipped"),
           "libcoap's walk after a dispatch was not skipped (coap_io_prepare_epoll() not interposed?)")

    # One event from the API, seen by one stream: in +1 (api), out to the stream +1.
    stream = EventStream(w, prefix="metrics/")
    stream.wait_first_id()
    s0 = scrape(w, w.token)
    expect(value(s0, "tether_cloud_streams_open") == 1, "streams_open is not 1")
    status, _, body = http(w, "/v1/devices/events", w.token, "POST",
                           urllib.parse.urlencode({"name": "metrics/one", "data": "x"}).encode())
    expect(status == 200, f"publish: {status} {body}")
    stream.named("metrics/one")
    s1 = scrape(w, w.token)
    expect(value(s1, "tether_cloud_events_in_total", source="api")
           == value(s0, "tether_cloud_events_in_total", source="api") + 1, "events_in{api} did not move by one")
    expect(value(s1, "tether_cloud_events_out_total", sink="stream")
           >= value(s0, "tether_cloud_events_out_total", sink="stream") + 1, "events_out{stream} did not move")
    # The event reaches the disk through the journal's sync thread within
    # SyncIntervalMsec (100 ms): the depth goes back to 0 and one more sync is timed.
    fsyncs = value(s0, "tether_cloud_journal_fsync_duration_seconds_count")

    def synced():
        s = scrape(w, w.token)
        return (value(s, "tether_cloud_journal_unsynced_events") == 0
                and value(s, "tether_cloud_journal_unsynced_bytes") == 0
                and value(s, "tether_cloud_journal_fsync_duration_seconds_count") > fsyncs)
    poll(synced, 10, "the journal's sync thread to sync the event")

    # The scraper's token: /metrics only; no token and a bad one: 401.
    expect(scrape(w, scraper), "the metrics token cannot scrape")
    for path in ("/v1/devices", f"/v1/devices/{dev}", "/v1/devices/events", "/v1/ota/jobs"):
        status, _, body = http(w, path, scraper)
        expect(status == 403 and "insufficient_scope" in body, f"metrics token on {path}: {status} {body}")
    status, _, _ = http(w, f"/v1/devices?access_token={scraper}")
    expect(status == 403, f"metrics token in the query: {status}")
    for token in (None, "wrong-token"):
        status, _, _ = http(w, "/metrics", token)
        expect(status == 401, f"/metrics with token {token!r}: {status}")
    status, _, _ = http(w, "/metrics", w.token, "POST", b"")
    expect(status == 405, f"POST /metrics: {status}")

    # The agent's counters after the call (and the event echo published).
    def counters():
        st = json.loads(w.tetherctl(a, "status", "--json").stdout)
        c = st["counters"]
        return c if c["events"]["acked"] >= 1 and c["loop_delay"]["samples"] >= 1 else None
    c = poll(counters, 10, "the agent to count an acknowledged event and a loop delay sample")
    expect(c["connect_attempts"] >= 1 and c["handshakes_completed"] == 1 and c["handshakes_failed"] == 0,
           f"connection counters: {c}")
    expect(c["reconnects"] == 0 and c["connected_sec_total"] > 0, f"connected time: {c}")
    expect(c["calls"]["ok"] == 1 and sum(c["calls"].values()) == 1 and sum(c["reads"].values()) == 0,
           f"calls served: {c}")
    expect(c["events"]["published"] >= 1 and c["events"]["queued"] >= 0 and c["events"]["refused"] == 0,
           f"events: {c}")
    expect(0 <= c["loop_delay"]["max_sec"] < 5 and c["loop_delay"]["mean_sec"] <= c["loop_delay"]["max_sec"],
           f"loop delay: {c['loop_delay']}")


def test_metrics_token_file_reload(w):
    """MetricsTokenFile= is read again on SIGHUP like TokenFile=."""
    path = w.path("metrics-tokens")
    with open(path, "w") as f:
        f.write("first-scraper-token\n")
    w.start_cloud(extra=f"[API]\nMetricsTokenFile={path}\n")
    expect(http(w, "/metrics", "first-scraper-token")[0] == 200, "first token refused")
    with open(path + ".tmp", "w") as f:
        f.write("second-scraper-token\n")
    os.rename(path + ".tmp", path)
    log = w.cloud.mark()
    w.cloud.signal(signal.SIGHUP)
    w.cloud.wait_line(r"Reloaded 1 metrics token\(s\)", start=log)
    expect(http(w, "/metrics", "first-scraper-token")[0] == 401, "removed metrics token still works")
    expect(http(w, "/metrics", "second-scraper-token")[0] == 200, "new metrics token refused")


if __name__ == "__main__":
    sys.exit(run([test_metrics, test_metrics_token_file_reload], emulated="ok"))
