#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Provisioning tokens through the API and the CLI (docs/cloud.md,
"Provisioning tokens"; docs/cli.md): made, listed, shown, revoked; the
provision:write scope reaches /v1/provision and nothing else, and only
it (or admin) reaches /v1/provision; bad input is a 400 naming the field;
the token is shown once, never in a listing, the audit log or cloud.db;
`tether provision create|list|revoke` end to end."""

import datetime
import hashlib
import http.client
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import SLOW, expect, run  # noqa: E402

TOKEN_RE = re.compile(r"^tprov_[0-9a-f]{40}$")
ID_RE = re.compile(r"^prov-[0-9a-f]{8}$")


def api(w, method, path, token=None, body=None, raw=None, content_type="application/json"):
    """(status, parsed JSON or text) of one request."""
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
            return r.status, json.loads(text)
        except ValueError:
            return r.status, text
    finally:
        conn.close()


def make_token(w, scopes, **extra):
    status, body = api(w, "POST", "/v1/tokens", body={"scopes": scopes, **extra})
    expect(status == 200 and body.get("token"), f"POST /v1/tokens {scopes}: {status} {body}")
    return body


def test_create_list_get_revoke(w):
    w.start_cloud()
    status, made = api(w, "POST", "/v1/provision",
                       body={"uses": 5, "expires_in": 3600, "tags": {"site": "berlin", "rack": "7"},
                             "name": "line 3"})
    expect(status == 201 and TOKEN_RE.match(made.get("token", "")) and ID_RE.match(made.get("id", "")),
           f"POST /v1/provision: {status} {made}")
    expect(made["uses_max"] == 5 and made["uses"] == 0 and made["state"] == "active"
           and made["tags"] == {"site": "berlin", "rack": "7"} and made["name"] == "line 3"
           and made["created_by"].startswith("token:file-") and made["revoked_at"] is None, f"made: {made}")
    expect(made["id"] == "prov-" + hashlib.sha256(made["token"].encode()).hexdigest()[:8], f"id: {made}")
    exp = datetime.datetime.strptime(made["expires_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
    left = (exp - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
    expect(3500 < left <= 3601, f"expires_at {made['expires_at']}: {left} s left")

    # Defaults: one use, seven days, no tags; an empty body is fine.
    status, default = api(w, "POST", "/v1/provision")
    expect(status == 201 and default["uses_max"] == 1 and default["tags"] == {} and default["name"] == "",
           f"defaults: {status} {default}")
    exp = datetime.datetime.strptime(default["expires_at"], "%Y-%m-%dT%H:%M:%SZ")
    left = (exp.replace(tzinfo=datetime.timezone.utc) - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
    expect(7 * 86400 - 120 < left <= 7 * 86400 + 1, f"default expiry: {left} s")
    # expires_at as RFC 3339, with an offset.
    status, at = api(w, "POST", "/v1/provision", body={"expires_at": "2031-06-01T12:00:00+02:00"})
    expect(status == 201 and at["expires_at"] == "2031-06-01T10:00:00Z", f"expires_at: {status} {at}")
    # A form works too (without tags).
    status, form = api(w, "POST", "/v1/provision", raw=b"uses=3&name=by%20form",
                       content_type="application/x-www-form-urlencoded")
    expect(status == 201 and form["uses_max"] == 3 and form["name"] == "by form", f"form: {status} {form}")

    status, listed = api(w, "GET", "/v1/provision")
    expect(status == 200 and [x["id"] for x in listed] == [made["id"], default["id"], at["id"], form["id"]],
           f"GET /v1/provision: {status} {listed}")
    status, one = api(w, "GET", f"/v1/provision/{made['id']}")
    expect(status == 200 and one == {k: v for k, v in made.items() if k not in ("token", "ok")},
           f"GET /v1/provision/ID: {status} {one} vs {made}")
    for path in ("/v1/provision/prov-00000000", "/v1/provision/" + "x" * 300, "/v1/provision/a%20b"):
        status, body = api(w, "GET", path)
        expect(status == 404, f"GET {path[:40]}: {status} {body}")
    text = json.dumps(listed) + json.dumps(one)
    expect("tprov_" not in text and made["token"][6:] not in text, "a listing shows a token")

    status, body = api(w, "DELETE", f"/v1/provision/{made['id']}")
    expect(status == 200 and body == {"ok": True, "id": made["id"]}, f"DELETE: {status} {body}")
    status, body = api(w, "DELETE", f"/v1/provision/{made['id']}")
    expect(status == 409, f"DELETE again: {status} {body}")
    status, body = api(w, "DELETE", "/v1/provision/prov-00000000")
    expect(status == 404, f"DELETE unknown: {status} {body}")
    status, one = api(w, "GET", f"/v1/provision/{made['id']}")
    expect(one["state"] == "revoked" and one["revoked_at"] and one["revoked_by"].startswith("token:file-"),
           f"after DELETE: {one}")
    for method in ("PUT", "PATCH"):
        status, body = api(w, method, "/v1/provision", body={})
        expect(status == 405, f"{method} /v1/provision: {status} {body}")
    status, body = api(w, "POST", f"/v1/provision/{made['id']}", body={})
    expect(status == 405, f"POST /v1/provision/ID: {status} {body}")

    # The audit log: create with what it allows, revoke; never a token.
    status, recs = api(w, "GET", "/v1/audit?action=provision.")
    got = [(r["action"], r["target"], r["detail"].get("status")) for r in recs]
    want = [("provision.create", x["id"], 201) for x in (made, default, at, form)]
    want += [("provision.revoke", made["id"], 200), ("provision.revoke", made["id"], 409),
             ("provision.revoke", "prov-00000000", 404)]
    expect(got == want, f"audit:\n{got}\nwanted\n{want}")
    expect(recs[0]["detail"].get("uses_max") == 5 and recs[0]["detail"].get("tags") == made["tags"]
           and recs[0]["detail"].get("expires_at") == made["expires_at"], f"provision.create detail: {recs[0]}")
    status, everything = api(w, "GET", "/v1/audit?limit=1000")
    text = json.dumps(everything)
    for t in (made, default, at, form):
        expect(t["token"] not in text and t["token"][6:] not in text, "a provisioning token is in the audit log")

    # Nor in the database, where its digest is; all of it after a restart.
    w.cloud.stop()
    state = w.path("cloud-state")
    blobs = b""
    for name in os.listdir(state):
        if name.startswith("cloud.db"):
            with open(os.path.join(state, name), "rb") as f:
                blobs += f.read()
    expect(hashlib.sha256(made["token"].encode()).digest() in blobs, "the digest is not in cloud.db")
    for t in (made, default, at, form):
        expect(t["token"][6:].encode() not in blobs, "a provisioning token is in cloud.db")
    w.start_cloud()
    status, again = api(w, "GET", "/v1/provision")
    expect(status == 200 and len(again) == 4 and again[0]["state"] == "revoked" and again[1:] == listed[1:],
           f"after a restart: {again}")


def test_scopes(w):
    w.start_cloud()
    reader = make_token(w, ["devices:read"])["token"]
    prov = make_token(w, ["provision:write"], name="factory")
    expect(prov["scopes"] == ["provision:write"], f"scopes: {prov}")
    admin = make_token(w, ["admin"])["token"]
    for method, path, body in (("GET", "/v1/provision", None), ("POST", "/v1/provision", {}),
                               ("GET", "/v1/provision/prov-00000000", None),
                               ("DELETE", "/v1/provision/prov-00000000", None)):
        status, reply = api(w, method, path, reader, body)
        expect(status == 403 and reply.get("scope") == "provision:write", f"{method} {path} by a reader: "
               f"{status} {reply}")
    status, made = api(w, "POST", "/v1/provision", prov["token"], {"uses": 2})
    expect(status == 201 and made["created_by"] == f"token:{prov['id']}", f"POST by provision:write: {status} {made}")
    status, _ = api(w, "GET", "/v1/provision", prov["token"])
    expect(status == 200, f"GET by provision:write: {status}")
    status, _ = api(w, "GET", f"/v1/provision/{made['id']}", prov["token"])
    expect(status == 200, f"GET ID by provision:write: {status}")
    status, _ = api(w, "GET", "/v1/provision", admin)
    expect(status == 200, f"GET by admin: {status}")
    # provision:write gives nothing else.
    for method, path, body in (("GET", "/v1/tokens", None), ("POST", "/v1/tokens", {"scopes": ["admin"]}),
                               ("GET", "/v1/devices", None), ("GET", "/v1/devices/nosuchdev", None),
                               ("POST", "/v1/devices", {"id": "newdev"}), ("GET", "/v1/audit", None),
                               ("POST", "/v1/devices/events", {"name": "x"}), ("GET", "/v1/events", None),
                               ("GET", "/v1/ota/jobs", None), ("GET", "/metrics", None),
                               ("PUT", "/v1/devices/nosuchdev/revocation", {})):
        status, reply = api(w, method, path, prov["token"], body)
        expect(status == 403, f"{method} {path} by provision:write: {status} {reply}")
    status, _ = api(w, "DELETE", f"/v1/provision/{made['id']}", prov["token"])
    expect(status == 200, f"DELETE by provision:write: {status}")
    # It cannot be restricted to devices: it would let new ones in.
    status, reply = api(w, "POST", "/v1/tokens", body={"scopes": ["provision:write"], "devices": ["a"]})
    expect(status == 400 and "provision:write" in reply.get("error", ""), f"restricted: {status} {reply}")


def test_bad_input(w):
    w.start_cloud()
    cases = [
        ({"uses": 0}, "uses"), ({"uses": 1000001}, "uses"), ({"uses": -1}, "uses"), ({"uses": 1.5}, "uses"),
        ({"uses": "5x"}, "uses"), ({"uses": True}, "uses"), ({"uses": [1]}, "uses"),
        ({"expires_in": 0}, "expires_in"), ({"expires_in": 10 * 366 * 86400 + 1}, "expires_in"),
        ({"expires_in": "soon"}, "expires_in"),
        ({"expires_at": "2001-01-01T00:00:00Z"}, "expires_at"), ({"expires_at": "2999-01-01T00:00:00Z"}, "expires_at"),
        ({"expires_at": "2030-02-30T00:00:00Z"}, "expires_at"), ({"expires_at": "2030-01-01 00:00:00"}, "expires_at"),
        ({"expires_at": "2030-01-01T00:00:00"}, "expires_at"), ({"expires_at": 1900000000}, "expires_at"),
        ({"expires_in": 60, "expires_at": "2030-01-01T00:00:00Z"}, "not both"),
        ({"tags": "site=berlin"}, "tags"), ({"tags": ["a"]}, "tags"), ({"tags": {"bad key": "x"}}, "tag name"),
        ({"tags": {"k": 1}}, "'k'"), ({"tags": {"k": "v" * 257}}, "256"), ({"tags": {"k": "a\u001bb"}}, "control"),
        ({"tags": {f"t{i}": "v" for i in range(33)}}, "32"), ({"tags": {"x" * 65: "v"}}, "tag name"),
        ({"name": "n" * 129}, "name"), ({"name": "a\nb"}, "name"), ({"name": 5}, "name"),
        ({"color": "red"}, "Unknown parameter"),
    ]
    for body, word in cases:
        status, reply = api(w, "POST", "/v1/provision", body=body)
        expect(status == 400 and isinstance(reply, dict) and word in reply.get("error", ""),
               f"POST /v1/provision {json.dumps(body)[:80]}: {status} {reply}")
    status, reply = api(w, "POST", "/v1/provision", raw=b"[1]")
    expect(status == 400, f"a JSON array: {status} {reply}")
    status, listed = api(w, "GET", "/v1/provision")
    expect(listed == [], f"a bad request made a token: {listed}")


def test_cli(w):
    w.start_cloud()
    r = w.tether("provision", "create", "--uses", "3", "--expires", "12h", "--tag", "site=berlin", "--tag",
                 "rack=r 7", "--name", "cli")
    lines = r.stdout.splitlines()
    expect(len(lines) == 1 and TOKEN_RE.match(lines[0]), f"stdout of provision create: {r.stdout!r}")
    token = lines[0]
    tid = "prov-" + hashlib.sha256(token.encode()).hexdigest()[:8]
    expect(tid in r.stderr and "3 use(s)" in r.stderr and "rack=r 7,site=berlin" in r.stderr,
           f"stderr of provision create: {r.stderr!r}")
    status, one = api(w, "GET", f"/v1/provision/{tid}")
    expect(status == 200 and one["uses_max"] == 3 and one["tags"] == {"site": "berlin", "rack": "r 7"}
           and one["name"] == "cli", f"made by the CLI: {status} {one}")
    exp = datetime.datetime.strptime(one["expires_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
    left = (exp - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
    expect(12 * 3600 - 120 < left <= 12 * 3600 + 1, f"--expires 12h: {left} s")
    j = json.loads(w.tether("provision", "create", "--json").stdout)
    expect(TOKEN_RE.match(j["token"]) and j["uses_max"] == 1, f"--json: {j}")

    table = w.tether("provision", "list").stdout.splitlines()
    expect(table[0].split() == ["ID", "NAME", "USES", "EXPIRES", "STATE", "TAGS"] and len(table) == 3,
           f"provision list: {table}")
    expect(table[1].split()[:3] == [tid, "cli", "0/3"] and "active" in table[1] and
           "rack=r 7,site=berlin" in table[1], f"provision list row: {table[1]}")
    listed = json.loads(w.tether("provision", "list", "--json").stdout)
    expect([x["id"] for x in listed] == [tid, j["id"]] and "tprov_" not in json.dumps(listed), f"--json: {listed}")

    w.tether("provision", "revoke", tid)
    r = w.tether("provision", "revoke", tid, check=False)
    expect(r.returncode == 1 and "409" in r.stderr and "already revoked" in r.stderr, f"revoke twice: {r}")
    r = w.tether("provision", "revoke", "prov-00000000", check=False)
    expect(r.returncode == 3, f"revoke unknown: {r}")
    expect("revoked" in w.tether("provision", "list").stdout.splitlines()[1], "not revoked in the list")

    # A provision:write token is enough; a reader is refused (exit 5).
    prov = make_token(w, ["provision:write"])["token"]
    r = w.tether("provision", "create", token=prov)
    expect(TOKEN_RE.match(r.stdout.strip()), f"create with provision:write: {r}")
    reader = make_token(w, ["devices:read"])["token"]
    r = w.tether("provision", "list", token=reader, check=False)
    expect(r.returncode == 5 and "403" in r.stderr, f"list with devices:read: {r}")

    # The command line is checked before anything is sent.
    for args, word in ((["--expires", "1.5h"], "--expires"), (["--expires", "0"], "--expires"),
                       (["--expires", "10y"], "--expires"), (["--expires", "600w"], "10 years"),
                       (["--uses", "0"], "--uses"), (["--uses", "1000001"], "--uses"), (["--uses", "x"], "--uses"),
                       (["--tag", "novalue"], "NAME=VALUE"), (["--tag", "bad key=v"], "tag name"),
                       (["--tag", "a=1", "--tag", "a=2"], "twice"), (["--scope", "admin"], "--scope")):
        r = w.tether("provision", "create", *args, check=False)
        expect(r.returncode == 2 and word in r.stderr and not r.stdout, f"provision create {args}: {r}")
    for args in (["list", "--uses", "2"], ["revoke"], ["revoke", "nope"], ["frob"], []):
        r = w.tether("provision", *args, check=False)
        expect(r.returncode == 2, f"provision {args}: {r}")
    r = w.tether("list", "--uses", "2", check=False)
    expect(r.returncode == 2 and "--uses" in r.stderr, f"list --uses: {r}")
    # The cloud's own refusals come through with its words.
    r = w.tether("provision", "create", "--tag", "k=" + "v" * 257, check=False)
    expect(r.returncode == 1 and "400" in r.stderr and "256 bytes" in r.stderr, f"a long tag value: {r}")


if __name__ == "__main__":
    sys.exit(run([test_create_list_get_revoke, test_scopes, test_bad_input, test_cli], emulated="ok"))
