#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""API tokens with scopes, expiry and device restrictions, and the audit
log (docs/cloud.md, "Tokens and scopes", "Audit log"): each scope allows
exactly its routes, expired and revoked tokens get 401 saying so and
their open event streams end, tokens survive a restart and are stored
hashed, a token restricted to devices sees nothing of the others, and
every mutating call is in the audit log."""

import hashlib
import http.client
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import EMULATOR, SLOW, TETHER, Failure, expect, poll, run  # noqa: E402
import fakedev  # noqa: E402

SCOPES = ("devices:read", "functions:call", "events:read", "events:publish", "ota:write", "metrics:read",
          "admin", "provision:write", "devices:write")
SHA = "0" * 64


def api(w, method, path, token=None, body=None, stream=False):
    """(status, parsed JSON or text, headers) of one request; with stream,
    only the status line and headers are read (an event stream stays open
    until the connection closes)."""
    conn = http.client.HTTPConnection("127.0.0.1", w.api_port, timeout=10 * SLOW)
    headers = {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    try:
        conn.request(method, path, body=data, headers=headers)
        r = conn.getresponse()
        if stream and r.status == 200:
            return r.status, None, dict(r.getheaders())
        raw = r.read().decode(errors="replace")
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = raw
        return r.status, parsed, dict(r.getheaders())
    finally:
        conn.close()


def create(w, token=None, **params):
    status, body, _ = api(w, "POST", "/v1/tokens", token or w.token, params)
    expect(status == 200 and isinstance(body, dict) and body.get("token", "").startswith("tether_"),
           f"POST /v1/tokens {params}: {status} {body}")
    return body


# Every route with the scope it needs and what it answers when allowed
# (no device is "nosuchdev", so calls end at "not found" without waiting).
ROUTES = [
    ("devices:read", "GET", "/v1/devices", None),
    ("devices:read", "GET", "/v1/devices/nosuchdev", None),
    ("devices:read", "GET", "/v1/devices/nosuchdev/v", None),
    ("functions:call", "POST", "/v1/devices/nosuchdev/f", {"arg": "x"}),
    ("events:read", "GET", "/v1/events/scope-test", None),
    ("events:read", "GET", "/v1/devices/events/scope-test", None),
    ("events:read", "GET", "/v1/devices/nosuchdev/events", None),
    ("events:publish", "POST", "/v1/devices/events", {"name": "scope-test/x", "data": "1"}),
    ("ota:write", "PUT", "/v1/devices/nosuchdev", {"manifest": "x"}),
    ("ota:write", "POST", "/v1/ota/jobs", {"device": "nosuchdev", "manifest": "x"}),
    ("devices:write", "PUT", "/v1/devices/nosuchdev", {"name": "x"}),
    ("ota:write", "GET", "/v1/ota/jobs", None),
    ("ota:write", "PUT", f"/v1/ota/artifacts/{SHA}", None),
    ("metrics:read", "GET", "/metrics", None),
    ("admin", "GET", "/v1/tokens", None),
    ("admin", "POST", "/v1/tokens", {"scopes": ["devices:read"], "name": "made by the table"}),
    ("admin", "DELETE", "/v1/tokens/0123456789abcdef", None),
    ("admin", "GET", "/v1/audit", None),
    ("provision:write", "GET", "/v1/provision", None),
    ("provision:write", "POST", "/v1/provision", {"uses": 1}),
    ("provision:write", "GET", "/v1/provision/prov-00000000", None),
    ("provision:write", "DELETE", "/v1/provision/prov-00000000", None),
]


def test_scopes_allow_exactly_their_routes(w):
    w.start_cloud()
    tokens = {s: create(w, scopes=[s], name=f"only {s}")["token"] for s in SCOPES}
    tokens["file"] = w.token  # TokenFile= tokens are admin tokens
    expect(set(r[0] for r in ROUTES) == set(SCOPES), "the table misses a scope")
    checked = 0
    for need, method, path, body in ROUTES:
        for holder, token in tokens.items():
            allowed = holder in (need, "admin", "file")
            status, reply, _ = api(w, method, path, token, body, stream=True)
            what = f"{method} {path} with a {holder} token"
            if allowed:
                expect(status not in (401, 403), f"{what}: refused: {status} {reply}")
            else:
                expect(status == 403 and isinstance(reply, dict) and reply.get("error") == "insufficient_scope"
                       and reply.get("scope") == need and need in reply.get("error_description", ""),
                       f"{what}: {status} {reply}")
            checked += 1
    print(f"# {checked} route x token pairs checked")
    # Scopes are named exactly; a bad request makes nothing.
    for bad in ({"scopes": ["devices:writ"]}, {"scopes": []}, {"scopes": "admin,nope"}, {},
                {"scopes": ["admin"], "devices": ["a"]}, {"scopes": ["devices:read"], "expires_in": 0},
                {"scopes": ["devices:read"], "devices": ["bad id!"]}, {"scopes": ["devices:read"], "color": 1}):
        status, reply, _ = api(w, "POST", "/v1/tokens", w.token, bad)
        expect(status == 400 and reply.get("error"), f"POST /v1/tokens {bad}: {status} {reply}")
    # A form body works too (what curl -d sends).
    conn = http.client.HTTPConnection("127.0.0.1", w.api_port, timeout=10 * SLOW)
    conn.request("POST", "/v1/tokens", body="scopes=devices:read,events:read&name=form",
                 headers={"Authorization": f"Bearer {w.token}",
                          "Content-Type": "application/x-www-form-urlencoded"})
    r = conn.getresponse()
    reply = json.loads(r.read())
    conn.close()
    expect(r.status == 200 and reply["scopes"] == ["devices:read", "events:read"], f"form: {r.status} {reply}")


def test_expired_token_refused_and_its_stream_ends(w):
    w.start_cloud()
    t = create(w, scopes=["devices:read", "events:read"], expires_in=2)
    expect(t["expires_at"] is not None, f"no expiry: {t}")
    status, _, _ = api(w, "GET", "/v1/devices", t["token"])
    expect(status == 200, f"a fresh token is refused: {status}")
    sub = w.subscribe("x/", token=t["token"]).wait_ready()
    started = time.monotonic()

    def refused():
        s, body, _ = api(w, "GET", "/v1/devices", t["token"])
        return (s, body) if s != 200 else None
    status, body = poll(refused, 10, "the token to expire")
    expect(status == 401 and "expired" in body.get("error_description", ""), f"expired: {status} {body}")
    print(f"# refused {time.monotonic() - started:.1f} s after it was made (expires_in=2)")
    # Its stream ends at the next keep-alive round (every 10 s).
    rc = sub.wait_exit(15, "the stream of the expired token to end")
    expect(rc != 0 and any("closed by the server" in e for e in sub.errors), f"stream: {rc} {sub.errors}")
    tokens = json.loads(w.tether("tokens", "list", "--json").stdout)
    expect([x["state"] for x in tokens if x["id"] == t["id"]] == ["expired"], f"list: {tokens}")


def test_revoked_token_refused_and_its_stream_ends(w):
    w.start_cloud()
    out = w.tether("tokens", "create", "--scope", "events:read", "--scope", "devices:read", "--name", "doomed",
                   "--json").stdout
    t = json.loads(out)
    keep = create(w, scopes=["events:read"])
    gone = w.subscribe("x/", token=t["token"]).wait_ready()
    stays = w.subscribe("x/", token=keep["token"]).wait_ready()
    mark = w.cloud.mark()
    r = w.tether("tokens", "revoke", t["id"])
    expect(r.stdout == "", f"revoke printed {r.stdout!r}")
    w.cloud.wait_line(rf"API token '{t['id']}' revoked by 'token:file-[0-9a-f]{{8}}'; closed 1 event stream",
                      start=mark)
    rc = gone.wait_exit(10, "the revoked token's stream to end")
    expect(rc != 0 and any("closed by the server" in e for e in gone.errors), f"stream: {rc} {gone.errors}")
    status, body, _ = api(w, "GET", "/v1/devices", t["token"])
    expect(status == 401 and "revoked" in body.get("error_description", ""), f"revoked: {status} {body}")
    r = w.tether("list", token=t["token"], check=False)
    expect(r.returncode == 5 and "revoked" in r.stderr, f"tether list with it: {r.returncode} {r.stderr}")
    # The other stream goes on.
    w.tether("publish", "x/after", "1")
    stays.wait(lambda e: e.get("name") == "x/after", what="the event on the other stream")
    r = w.tether("tokens", "revoke", t["id"], check=False)
    expect(r.returncode == 1 and "already revoked" in r.stderr, f"revoke twice: {r.returncode} {r.stderr}")
    r = w.tether("tokens", "revoke", "0123456789abcdef", check=False)
    expect(r.returncode == 3, f"revoke unknown: {r.returncode} {r.stderr}")
    lines = w.tether("tokens", "list").stdout.splitlines()
    expect(lines[0].split()[:2] == ["ID", "STATE"] and any(t["id"] in x and "revoked" in x and "doomed" in x
                                                          for x in lines), f"tokens list: {lines}")


def test_tokens_persist_and_are_stored_hashed(w):
    w.start_cloud()
    t = json.loads(w.tether("tokens", "create", "--scope", "devices:read", "--expires", "1d", "--name", "kept",
                            "--json").stdout)
    revoked = create(w, scopes=["devices:read"])
    w.tether("tokens", "revoke", revoked["id"])
    expect(api(w, "GET", "/v1/devices", t["token"])[0] == 200, "the new token is refused")
    w.cloud.stop()
    state = w.path("cloud-state")
    blobs = b""
    for name in os.listdir(state):
        if name.startswith("cloud.db"):
            with open(os.path.join(state, name), "rb") as f:
                blobs += f.read()
    expect(hashlib.sha256(t["token"].encode()).digest() in blobs, "the token's digest is not in cloud.db")
    for secret in (t["token"], revoked["token"]):
        expect(secret.encode() not in blobs and secret[len("tether_"):].encode() not in blobs,
               "a token is in cloud.db in plain text")
    w.start_cloud()
    expect(api(w, "GET", "/v1/devices", t["token"])[0] == 200, "the token is refused after a restart")
    status, body, _ = api(w, "GET", "/v1/devices", revoked["token"])
    expect(status == 401 and "revoked" in body["error_description"], f"revoked after restart: {status} {body}")
    listed = {x["id"]: x for x in json.loads(w.tether("tokens", "list", "--json").stdout)}
    expect(listed[t["id"]]["name"] == "kept" and listed[t["id"]]["scopes"] == ["devices:read"]
           and listed[t["id"]]["expires_at"] and listed[revoked["id"]]["state"] == "revoked", f"list: {listed}")
    expect(not any("token" in x for x in listed.values()), "the list shows a secret")


def test_device_restriction(w):
    w.start_cloud()
    a, a_id = fakedev.connect(w)
    b, b_id = fakedev.connect(w)
    t = create(w, scopes=["devices:read", "events:read", "functions:call", "ota:write"], devices=[a_id])
    tok = t["token"]
    devices = api(w, "GET", "/v1/devices", tok)[1]
    expect([d["id"] for d in devices] == [a_id], f"restricted list: {devices}")
    paged = api(w, "GET", "/v1/devices?page=1&per_page=5", tok)[1]
    expect([d["id"] for d in paged["devices"]] == [a_id] and paged["meta"]["total"] == 1, f"page: {paged}")
    expect(api(w, "GET", f"/v1/devices/{a_id}", tok)[0] == 200, "its own device refused")
    for method, path in (("GET", f"/v1/devices/{b_id}"), ("POST", f"/v1/devices/{b_id}/f"),
                         ("GET", f"/v1/devices/{b_id}/v"), ("GET", f"/v1/devices/{b_id}/events"),
                         ("GET", "/v1/devices/nosuchdev"), ("GET", "/v1/ota/jobs")):
        status, body, _ = api(w, method, path, tok, stream=True)
        expect(status == 403, f"{method} {path} with a token for {a_id}: {status} {body}")
    # Its stream carries events from its device only: B's (and the API's)
    # come first in the journal, so they would have arrived before A's.
    sub = w.subscribe("r/", token=tok).wait_ready()
    b.publish("r/b", b"from b")
    w.tether("publish", "r/api", "from the api")
    a.publish("r/a", b"from a")
    sub.wait(lambda e: e.get("name") == "r/a", what="the event of its device")
    names = [e.get("name") for e in sub.snapshot()]
    expect(names == ["r/a"], f"a stream restricted to {a_id} got {names}")
    # A tag no device carries reaches none (test-token-tags.py: tags that match).
    tag = create(w, scopes=["devices:read"], tags=["lab"])["token"]
    expect(api(w, "GET", "/v1/devices", tag)[1] == [], "a tag token lists devices")
    expect(api(w, "GET", f"/v1/devices/{a_id}", tag)[0] == 403, "a tag token reaches a device")
    a.close()
    b.close()


def test_audit_log(w):
    w.start_cloud()
    file_id = "file-" + hashlib.sha256(w.token.encode()).hexdigest()[:8]
    pub = create(w, scopes=["events:publish"], name="publisher")
    reader = create(w, scopes=["devices:read"])
    expect(api(w, "POST", "/v1/devices/events", pub["token"], {"name": "audit/x", "data": "1"})[0] == 200,
           "publish refused")
    expect(api(w, "POST", "/v1/devices/events", reader["token"], {"name": "audit/y"})[0] == 403,
           "publish without the scope allowed")
    expect(api(w, "POST", "/v1/devices/nosuchdev/f", w.token, {"arg": "1"})[0] == 404, "call to nowhere")
    expect(api(w, "GET", "/v1/devices", reader["token"])[0] == 200, "a read")
    w.tether("tokens", "revoke", reader["id"])
    status, recs, _ = api(w, "GET", "/v1/audit", w.token)
    expect(status == 200 and isinstance(recs, list), f"GET /v1/audit: {status} {recs}")
    got = [(r["actor"], r["action"], r["target"], r["detail"].get("status"), r["address"]) for r in recs]
    want = [
        (f"token:{file_id}", "token.create", pub["id"], 200, "127.0.0.1"),
        (f"token:{file_id}", "token.create", reader["id"], 200, "127.0.0.1"),
        (f"token:{pub['id']}", "event.publish", "audit/x", 200, "127.0.0.1"),
        (f"token:{reader['id']}", "event.publish", "audit/y", 403, "127.0.0.1"),
        (f"token:{file_id}", "device.call", "nosuchdev", 404, "127.0.0.1"),
        (f"token:{file_id}", "token.revoke", reader["id"], 200, "127.0.0.1"),
    ]
    expect(got == want, f"audit records:\n{got}\nwanted\n{want}")
    expect(recs[0]["detail"].get("scopes") == ["events:publish"], f"token.create detail: {recs[0]}")
    text = json.dumps(recs)
    expect(w.token not in text and pub["token"] not in text, "a token is in the audit log")
    # Filters.
    only = api(w, "GET", "/v1/audit?action=token.&limit=2", w.token)[1]
    expect([r["action"] for r in only] == ["token.create", "token.create"], f"action filter: {only}")
    after = api(w, "GET", f"/v1/audit?after={only[1]['id']}&action=token.", w.token)[1]
    expect([r["action"] for r in after] == ["token.revoke"], f"after: {after}")
    by_target = api(w, "GET", f"/v1/audit?target={pub['id']}", w.token)[1]
    expect(len(by_target) == 1 and by_target[0]["action"] == "token.create", f"target filter: {by_target}")
    for bad in ("after=-1", "limit=0", "limit=1001", "after=x"):
        expect(api(w, "GET", f"/v1/audit?{bad}", w.token)[0] == 400, f"?{bad} accepted")
    expect(api(w, "GET", "/v1/audit", pub["token"])[0] == 403, "the audit log without admin")
    # The CLI: the same records, then --follow prints new ones.
    lines = w.tether("audit", "--json", "--action", "event.").stdout.splitlines()
    expect([json.loads(x)["target"] for x in lines] == ["audit/x", "audit/y"], f"tether audit: {lines}")
    env = dict(os.environ, TETHER_API=w.api, TETHER_TOKEN=w.token)
    follow = subprocess.Popen(EMULATOR + [TETHER, "audit", "--follow", "--json", "--after", str(recs[-1]["id"])],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in follow.stdout], daemon=True).start()
    try:
        w.tether("publish", "audit/followed", "1")
        try:
            line = lines.get(timeout=10 * SLOW)
        except queue.Empty:
            raise Failure("tether audit --follow printed nothing for the new record") from None
        expect(json.loads(line)["target"] == "audit/followed", f"tether audit --follow: {line!r}")
        follow.send_signal(signal.SIGINT)
        rc = follow.wait(10 * SLOW)
        expect(rc == 0, f"tether audit --follow exited {rc} on SIGINT: {follow.stderr.read()}")
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait()
    human = w.tether("audit").stdout.splitlines()
    expect(human[0].split()[:4] == ["ID", "TIME", "ACTOR", "ACTION"] and len(human) == len(recs) + 2,
           f"tether audit: {human}")
    # A name that is not UTF-8 (a form field may hold any bytes) is refused
    # and recorded without its bytes: the log still reads back as JSON.
    conn = http.client.HTTPConnection("127.0.0.1", w.api_port, timeout=10 * SLOW)
    conn.request("POST", "/v1/devices/events", body="name=%FF%FEx&data=1",
                 headers={"Authorization": f"Bearer {pub['token']}",
                          "Content-Type": "application/x-www-form-urlencoded"})
    r = conn.getresponse()
    r.read()
    conn.close()
    expect(r.status == 400, f"a name that is not UTF-8: {r.status}")
    status, last, _ = api(w, "GET", "/v1/audit?action=event.", w.token)
    expect(status == 200 and last[-1]["target"] == "(not UTF-8)" and last[-1]["detail"]["status"] == 400,
           f"the audit log after it: {status} {last}")


if __name__ == "__main__":
    sys.exit(run([test_scopes_allow_exactly_their_routes, test_expired_token_refused_and_its_stream_ends,
                  test_revoked_token_refused_and_its_stream_ends, test_tokens_persist_and_are_stored_hashed,
                  test_device_restriction, test_audit_log], emulated="ok"))
