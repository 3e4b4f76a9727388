#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Webhooks through the API and the CLI (docs/integrations.md, "API and
CLI"; docs/cli.md): made, listed, shown and deleted with raw HTTP and
with `tether webhooks`; the secret is shown once and nowhere else (list,
audit log, URL credentials); admin only; bad values are a 400 with the
configuration file's own text; a name in use is a 409; a webhook of the
configuration file is listed and cannot be deleted; one whose receiver
is dead shows it; they survive a restart of the cloud. Hostile input:
names with '/', '..', too long, not ASCII; bodies past the limit."""

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import CLOUDD, EMULATOR, SLOW, expect, poll, run, seconds  # noqa: E402

SECRET_RE = re.compile(r"^[0-9a-f]{64}$")
NAME_RE = re.compile(r"^hook-[0-9a-f]{8}$")
CFG_SECRET = "config-file-secret-0123456789"


def api(w, method, path, token=None, body=None, raw=None, content_type="application/json"):
    """(status, parsed JSON or text, raw text) of one request."""
    conn = http.client.HTTPConnection("127.0.0.1", w.api_port, timeout=10 * SLOW)
    headers = {"Authorization": f"Bearer {token or w.token}"}
    data = raw
    if body is not None:
        data = json.dumps(body).encode()
    if data is not None:
        headers["Content-Type"] = content_type
    try:
        conn.request(method, path, body=data, headers=headers)
        r = conn.getresponse()
        text = r.read().decode(errors="replace")
        try:
            return r.status, json.loads(text), text
        except ValueError:
            return r.status, text, text
    finally:
        conn.close()


def dead_port():
    """A loopback port nothing listens on (bound, then closed: connecting
    is refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(w, port=None):
    """The cloud with one webhook in its configuration file, cfg1, to a
    dead receiver."""
    port = port or dead_port()
    w.cfg_port = port
    return w.start_cloud(extra=f"""[Webhook cfg1]
URL=http://127.0.0.1:{port}/cfg
Secret={CFG_SECRET}
Prefix=cfg/
""")


def by_name(listing, name):
    found = [x for x in listing if x.get("name") == name]
    return found[0] if found else None


def test_create_list_delete(w):
    start(w)
    receiver = f"http://127.0.0.1:{dead_port()}/hook"

    # The configuration file's webhook is listed, as such.
    status, listing, text = api(w, "GET", "/v1/webhooks")
    expect(status == 200 and isinstance(listing, list), f"GET /v1/webhooks: {status} {listing}")
    cfg = by_name(listing, "cfg1")
    expect(cfg and cfg["source"] == "config" and cfg["kind"] == "webhook" and cfg["prefix"] == "cfg/",
           f"cfg1: {listing}")
    expect(CFG_SECRET not in text, f"the configuration's secret is listed: {text}")

    # Made with raw HTTP (JSON): 201 with the secret, once.
    status, made, _ = api(w, "POST", "/v1/webhooks", body={"url": receiver, "name": "h1", "prefix": "temp",
                                                           "tag": "site=berlin", "timeout": 5})
    expect(status == 201 and made.get("ok") is True and made["name"] == "h1" and made["source"] == "api"
           and made["kind"] == "webhook" and made["prefix"] == "temp" and made["tag"] == "site=berlin"
           and SECRET_RE.match(made.get("secret", "")), f"POST /v1/webhooks: {status} {made}")
    expect(made.get("created_by", "").startswith("token:file-") and made.get("created_at"), f"made: {made}")
    secret = made["secret"]

    status, listing, text = api(w, "GET", "/v1/webhooks")
    h1 = by_name(listing, "h1")
    expect(status == 200 and h1 and h1["source"] == "api" and "secret" not in h1, f"listing: {listing}")
    expect(secret not in text, "the secret is in the listing")
    status, one, text = api(w, "GET", "/v1/webhooks/h1")
    expect(status == 200 and one["name"] == "h1" and "secret" not in one and secret not in text, f"GET h1: {one}")
    status, one, _ = api(w, "GET", "/v1/webhooks/cfg1")
    expect(status == 200 and one["source"] == "config", f"GET cfg1: {status} {one}")
    status, err, _ = api(w, "GET", "/v1/webhooks/nope")
    expect(status == 404 and err.get("ok") is False, f"GET unknown: {status} {err}")

    # A name in use, from the API or the file: 409.
    for name in ("h1", "cfg1"):
        status, err, _ = api(w, "POST", "/v1/webhooks", body={"url": receiver, "name": name})
        expect(status == 409 and err.get("ok") is False and name in err.get("error", ""),
               f"POST duplicate {name}: {status} {err}")

    # A form, Particle's "event", no name and no secret: both generated.
    status, form, _ = api(w, "POST", "/v1/webhooks", raw=f"url={receiver}&event=door%2F".encode(),
                          content_type="application/x-www-form-urlencoded")
    expect(status == 201 and NAME_RE.match(form["name"]) and form["prefix"] == "door/"
           and SECRET_RE.match(form["secret"]) and form["secret"] != secret, f"form: {status} {form}")

    # Every integration.
    status, every, _ = api(w, "GET", "/v1/integrations")
    expect(status == 200 and {"cfg1", "h1", form["name"]} <= {x["name"] for x in every}, f"integrations: {every}")

    # Deleting: the file's is refused, an API one goes (once).
    status, err, _ = api(w, "DELETE", "/v1/webhooks/cfg1")
    expect(status == 409 and "configuration file" in err.get("error", ""), f"DELETE cfg1: {status} {err}")
    status, ok, _ = api(w, "DELETE", "/v1/webhooks/h1")
    expect(status == 200 and ok == {"ok": True, "name": "h1"}, f"DELETE h1: {status} {ok}")
    status, err, _ = api(w, "DELETE", "/v1/webhooks/h1")
    expect(status == 404, f"DELETE h1 again: {status} {err}")
    status, listing, _ = api(w, "GET", "/v1/webhooks")
    expect(not by_name(listing, "h1") and by_name(listing, "cfg1"), f"after delete: {listing}")
    # The name is free again.
    status, again, _ = api(w, "POST", "/v1/webhooks", body={"url": receiver, "name": "h1"})
    expect(status == 201 and again["secret"] != secret, f"h1 again: {status} {again}")

    # The audit log: both, with the name; never a secret.
    status, records, text = api(w, "GET", "/v1/audit?action=webhook.")
    actions = [(r["action"], r["target"], r["detail"].get("status")) for r in records]
    expect(("webhook.create", "h1", 201) in actions and ("webhook.delete", "h1", 200) in actions
           and ("webhook.delete", "cfg1", 409) in actions, f"audit: {actions}")
    for s in (secret, form["secret"], again["secret"]):
        expect(s not in text, "a secret is in the audit log")


def test_cli(w):
    start(w)
    receiver = f"http://127.0.0.1:{dead_port()}/cli"

    r = w.tether("webhooks", "create", receiver, "--prefix", "temp", "--tag", "site=a", "--name", "cli1")
    secret = r.stdout.strip()
    expect(SECRET_RE.match(secret) and r.stdout.count("\n") == 1, f"create: stdout {r.stdout!r}")
    expect("shown only now" in r.stderr and "cli1" in r.stderr and "'temp*'" in r.stderr, f"stderr: {r.stderr!r}")

    r = w.tether("webhooks", "create", receiver, "--name", "cli2", "--secret", "s" * 20, "--json")
    made = json.loads(r.stdout)
    expect(made["name"] == "cli2" and made["secret"] == "s" * 20, f"--json: {made}")

    r = w.tether("webhooks", "list")
    lines = r.stdout.splitlines()
    expect(lines[0].split()[:3] == ["NAME", "SOURCE", "STATE"], f"list header: {lines}")
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    expect(rows.get("cli1", [None, None])[1] == "api" and rows.get("cfg1", [None, None])[1] == "config"
           and "cli2" in rows, f"list: {r.stdout}")
    expect(secret not in r.stdout and "s" * 20 not in r.stdout, "the secret is in 'webhooks list'")
    r = w.tether("webhooks", "list", "--json")
    expect(secret not in r.stdout and {x["name"] for x in json.loads(r.stdout)} >= {"cli1", "cli2", "cfg1"},
           f"list --json: {r.stdout}")

    r = w.tether("integrations", "list")
    lines = r.stdout.splitlines()
    expect(lines[0].split()[:5] == ["NAME", "KIND", "STATE", "BACKLOG", "DELIVERED"], f"integrations: {lines}")
    expect({line.split()[0] for line in lines[1:]} >= {"cli1", "cli2", "cfg1"}, f"integrations: {r.stdout}")

    # Errors: the cloud's text, the documented exit codes.
    r = w.tether("webhooks", "create", receiver, "--name", "cli1", check=False)
    expect(r.returncode == 1 and "409" in r.stderr and "cli1" in r.stderr, f"duplicate: {r.returncode} {r.stderr}")
    r = w.tether("webhooks", "create", "ftp://example.com/x", check=False)
    expect(r.returncode == 1 and "Invalid webhook (HTTP 400): URL= must be https://" in r.stderr,
           f"bad URL: {r.returncode} {r.stderr}")
    r = w.tether("webhooks", "create", receiver, "--secret", "short", check=False)
    expect(r.returncode == 1 and "Secret= must be 16 to 256 bytes" in r.stderr, f"short secret: {r.stderr}")
    r = w.tether("webhooks", "delete", "cfg1", check=False)
    expect(r.returncode == 1 and "configuration file" in r.stderr, f"delete cfg1: {r.returncode} {r.stderr}")
    r = w.tether("webhooks", "delete", "a/b", check=False)
    expect(r.returncode == 2, f"delete a/b: {r.returncode} {r.stderr}")
    r = w.tether("webhooks", "create", receiver, "--tag", "a", "--tag", "b", check=False)
    expect(r.returncode == 2 and "once" in r.stderr, f"two tags: {r.returncode} {r.stderr}")
    r = w.tether("webhooks", "list", "--prefix", "x", check=False)
    expect(r.returncode == 2, f"list --prefix: {r.returncode}")

    r = w.tether("webhooks", "delete", "cli1")
    expect(r.stdout == "", f"delete: {r.stdout!r}")
    r = w.tether("webhooks", "delete", "cli1", check=False)
    expect(r.returncode == 3, f"delete again: {r.returncode} {r.stderr}")


def test_admin_only(w):
    start(w)
    status, tok, _ = api(w, "POST", "/v1/tokens", body={"scopes": ["devices:read", "events:read", "events:publish",
                                                                   "functions:call", "ota:write",
                                                                   "provision:write"]})
    expect(status == 200, f"token: {status} {tok}")
    other = tok["token"]
    receiver = f"http://127.0.0.1:{dead_port()}/x"
    for method, path, body in (("GET", "/v1/webhooks", None), ("GET", "/v1/webhooks/cfg1", None),
                               ("POST", "/v1/webhooks", {"url": receiver}), ("DELETE", "/v1/webhooks/cfg1", None),
                               ("GET", "/v1/integrations", None)):
        status, err, _ = api(w, method, path, token=other, body=body)
        expect(status == 403 and err.get("scope") == "admin", f"{method} {path}: {status} {err}")
    r = w.tether("webhooks", "list", token=other, check=False)
    expect(r.returncode == 5, f"tether webhooks list, not admin: {r.returncode} {r.stderr}")
    status, listing, _ = api(w, "GET", "/v1/webhooks")
    expect([x["name"] for x in listing] == ["cfg1"], f"made by a non-admin: {listing}")


def config_error(w, section):
    """What tether-cloudd says of a configuration with section in it (it
    refuses to start)."""
    conf = w.path("bad.conf")
    with open(w.path("cloud.conf")) as f:
        text = f.read()
    text = text.replace(w.path("cloud-state"), w.path("bad-state"))
    with open(conf, "w") as f:
        f.write(text + section)
    env = w.env(notify=False)
    p = subprocess.run(EMULATOR + [CLOUDD, "--config", conf], capture_output=True, text=True, env=env,
                       timeout=30 * SLOW)
    expect(p.returncode != 0, f"tether-cloudd started with {section!r}")
    return p.stderr


def test_validation(w):
    start(w)
    receiver = f"http://127.0.0.1:{dead_port()}/x"

    # The same texts as the configuration file's.
    for params, key in (({"url": "ftp://example.com/x"}, "URL="), ({"url": "http://example.com/x"}, "URL="),
                        ({"url": receiver, "secret": "too-short"}, "Secret="),
                        ({"url": receiver, "timeout": 301}, "Timeout="),
                        ({"url": receiver, "prefix": "bad prefix"}, "Prefix="),
                        ({"url": receiver, "tag": "no spaces=x"}, "Tag=")):
        status, err, _ = api(w, "POST", "/v1/webhooks", body=params)
        expect(status == 400 and err.get("ok") is False and key in err.get("error", ""),
               f"POST {params}: {status} {err}")
        if key in ("URL=", "Secret="):
            lines = [f"{'URL' if k == 'url' else k.capitalize()}={v}" for k, v in params.items()]
            if "secret" not in params:
                lines.append("Secret=0123456789abcdef0123")
            said = config_error(w, "[Webhook bad]\n" + "\n".join(lines) + "\n")
            expect(err["error"] in said, f"the file's text for {params}: {said!r}, the API's {err['error']!r}")

    # Other shapes.
    for params, what in (({}, "URL= is required"), ({"url": receiver, "nope": 1}, "Unknown parameter"),
                         ({"url": receiver, "prefix": "a", "event": "b"}, "not both"),
                         ({"url": ["x"]}, "must be text"), ({"url": receiver, "timeout": "ten"}, "Timeout="),
                         ({"url": receiver, "timeout": 0}, "Timeout=")):
        status, err, _ = api(w, "POST", "/v1/webhooks", body=params)
        expect(status == 400 and what in err.get("error", ""), f"POST {params}: {status} {err}")
    status, err, _ = api(w, "POST", "/v1/webhooks", raw=b"[1]")
    expect(status == 400, f"a JSON array: {status} {err}")
    status, err, _ = api(w, "POST", "/v1/webhooks", raw=b"url=x%00y", content_type="application/x-www-form-urlencoded")
    expect(status == 400 and "NUL" in err.get("error", ""), f"a NUL byte: {status} {err}")

    # Hostile names: refused on creation, unknown (or a bad path) on use.
    for name in ("a/b", "..", "../x", "x" * 65, "hoök", "名前", "a b", "a\nb", ""):
        status, err, _ = api(w, "POST", "/v1/webhooks", body={"url": receiver, "name": name})
        if name == "":
            expect(status == 201 and NAME_RE.match(err["name"]), f"empty name: {status} {err}")
            continue
        expect(status == 400 and "name" in err.get("error", ""), f"name {name!r}: {status} {err}")
    for path in ("/v1/webhooks/..", "/v1/webhooks/%2E%2E", "/v1/webhooks/" + "x" * 3000, "/v1/webhooks/ho%C3%B6k",
                 "/v1/webhooks/a/b"):
        for method in ("GET", "DELETE"):
            status, err, _ = api(w, method, path)
            expect(status in (404, 414, 431), f"{method} {path[:40]}: {status} {err}")
    status, err, _ = api(w, "DELETE", "/v1/webhooks/cfg1%2Fx")
    expect(status == 400, f"%2F: {status} {err}")

    # A body past the limit: 413, nothing made.
    big = {"url": receiver, "name": "big", "secret": "s" * 200000}
    status, err, _ = api(w, "POST", "/v1/webhooks", body=big)
    expect(status == 413, f"huge body: {status} {err}")
    status, listing, _ = api(w, "GET", "/v1/webhooks")
    expect(not by_name(listing, "big"), f"huge body made it: {listing}")

    # Credentials in the URL: sent to the receiver, never shown.
    port = dead_port()
    creds = f"http://alice:pa55word@127.0.0.1:{port}/c"
    status, made, text = api(w, "POST", "/v1/webhooks", body={"url": creds, "name": "creds"})
    expect(status == 201 and "pa55word" not in text.replace(made["secret"], ""), f"creds, 201: {text}")
    status, listing, text = api(w, "GET", "/v1/webhooks")
    expect("pa55word" not in text and "alice" not in text, f"credentials listed: {text}")
    expect(by_name(listing, "creds").get("url") == f"http://127.0.0.1:{port}/c", f"the URL listed: {listing}")
    status, records, text = api(w, "GET", "/v1/audit?action=webhook.")
    expect("pa55word" not in text and made["secret"] not in text, f"credentials in the audit log: {text}")
    r = w.tether("webhooks", "list")
    expect("pa55word" not in r.stdout, f"credentials in 'tether webhooks list': {r.stdout}")


def test_dead_receiver(w):
    start(w)
    status, made, _ = api(w, "POST", "/v1/webhooks", body={"url": f"http://127.0.0.1:{dead_port()}/dead",
                                                           "name": "dead", "prefix": "temp"})
    expect(status == 201, f"POST: {status} {made}")
    expect(made["state"] == "ok" and made["failures"] == 0, f"new: {made}")
    for i in range(3):
        status, body, _ = api(w, "POST", "/v1/devices/events", body={"name": f"temp/{i}", "data": str(i)})
        expect(status == 200, f"publish: {status} {body}")

    def state():
        status, one, _ = api(w, "GET", "/v1/webhooks/dead")
        expect(status == 200, f"GET dead: {status} {one}")
        return one

    first = poll(lambda: (lambda o: o if o["state"] in ("retrying", "failing") and o["failures"] >= 1 else None)(
        state()), 20, "the dead receiver's webhook to retry")
    expect(first["backlog"] >= 3 and first["delivered"] == 0 and first["last_error"], f"retrying: {first}")
    grown = poll(lambda: (lambda o: o if o["failures"] > first["failures"] else None)(state()), 30,
                 "the failures to grow")
    expect(grown["state"] in ("retrying", "failing") and grown["backlog"] >= 3, f"grown: {grown}")
    r = w.tether("integrations", "list")
    row = [line.split() for line in r.stdout.splitlines() if line.startswith("dead ")]
    expect(row and row[0][2] in ("retrying", "failing") and int(row[0][3]) >= 3, f"integrations list: {r.stdout}")
    # And in /metrics, for whoever watches the cloud with Prometheus.
    with urllib.request.urlopen(urllib.request.Request(w.api + "/metrics",
                                                       headers={"Authorization": f"Bearer {w.token}"}),
                                timeout=seconds(10)) as resp:
        metrics = dict(line.rsplit(" ", 1) for line in resp.read().decode().splitlines()
                       if line and not line.startswith("#"))
    failed = float(metrics.get('tether_cloud_integration_events_total{outcome="failed"}', 0))
    delivered = float(metrics.get('tether_cloud_integration_events_total{outcome="delivered"}', -1))
    backlog = float(metrics.get("tether_cloud_integration_backlog_events", 0))
    expect(failed >= grown["failures"] and delivered == 0 and backlog >= 3,
           f"metrics: failed {failed}, delivered {delivered}, backlog {backlog}")


def test_restart(w):
    cloud = start(w)
    receiver = f"http://127.0.0.1:{dead_port()}/r"
    status, made, _ = api(w, "POST", "/v1/webhooks", body={"url": receiver, "name": "keep", "prefix": "p",
                                                           "tag": "site", "timeout": 7})
    expect(status == 201, f"POST keep: {status} {made}")
    status, gone, _ = api(w, "POST", "/v1/webhooks", body={"url": receiver, "name": "gone"})
    expect(status == 201, f"POST gone: {status} {gone}")
    status, _, _ = api(w, "DELETE", "/v1/webhooks/gone")
    expect(status == 200, "DELETE gone")

    cloud.stop()
    start(w, port=w.cfg_port)
    status, listing, text = api(w, "GET", "/v1/webhooks")
    keep = by_name(listing, "keep")
    expect(keep and keep["source"] == "api" and keep["prefix"] == "p" and keep["tag"] == "site"
           and keep["created_at"] == made["created_at"] and keep["created_by"] == made["created_by"],
           f"after the restart: {listing}")
    expect(not by_name(listing, "gone") and by_name(listing, "cfg1"), f"after the restart: {listing}")
    expect(made["secret"] not in text, "the secret is listed after the restart")
    status, err, _ = api(w, "POST", "/v1/webhooks", body={"url": receiver, "name": "keep"})
    expect(status == 409, f"duplicate after the restart: {status} {err}")
    status, ok, _ = api(w, "DELETE", "/v1/webhooks/keep")
    expect(status == 200, f"DELETE keep after the restart: {status} {ok}")


def test_limit(w):
    """At most 64 integrations, the file's and the API's together: the
    65th is a 409 that says so, and leaves no row behind; a timeout that
    overflows or is no whole number is a 400."""
    start(w)
    receiver = f"http://127.0.0.1:{dead_port()}/hook"
    for timeout in (0, 301, -1, 4294967297, 2**63 - 1, 1.5, "10x", "0300", True, [10]):
        status, err, _ = api(w, "POST", "/v1/webhooks", body={"url": receiver, "name": "t", "timeout": timeout})
        expect(status == 400 and "Timeout=" in err.get("error", ""), f"timeout {timeout!r}: {status} {err}")
    for i in range(63):
        status, made, _ = api(w, "POST", "/v1/webhooks", body={"url": receiver, "name": f"n{i}",
                                                               "prefix": "never/"})
        expect(status == 201, f"webhook {i + 2} of 64: {status} {made}")
    status, err, _ = api(w, "POST", "/v1/webhooks", body={"url": receiver, "name": "one-too-many"})
    expect(status == 409 and "At most 64" in err.get("error", ""), f"the 65th: {status} {err}")
    status, listing, _ = api(w, "GET", "/v1/webhooks")
    expect(len(listing) == 64 and not by_name(listing, "one-too-many"), f"{len(listing)} listed")
    status, _, _ = api(w, "DELETE", "/v1/webhooks/n0")
    expect(status == 200, f"DELETE n0: {status}")
    status, made, _ = api(w, "POST", "/v1/webhooks", body={"url": receiver, "name": "one-too-many"})
    expect(status == 201, f"after a deletion: {status} {made}")


if __name__ == "__main__":
    sys.exit(run([test_create_list_delete, test_cli, test_admin_only, test_validation, test_dead_receiver,
                  test_restart, test_limit], emulated="ok"))
