#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""API tokens restricted by tags (docs/cloud.md, "Tokens and scopes"):
devices enrolled with provisioning tokens carry their tags, and a token
restricted to "NAME" or "NAME=VALUE" reaches exactly the devices whose
tags match, by every route (list, describe, calls, variables, event
streams of all devices and of one, OTA); a device whose tags change is
judged by its new tags at the next request and on streams already open;
restricted tokens cannot publish."""

import http.client
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fakedev import CHANGED, CONTENT, CONTENT_FORMAT, CREATED, CSM, CSM_MAX_MESSAGE_SIZE, POST, Device, codestr, connect, frame, \
    uint  # noqa: E402
from harness import EMULATOR, SLOW, TETHERCTL, Failure, expect, run, seconds  # noqa: E402

BUILTIN = "[Enroll]\nCACertificate={ca}\nCAKey={key}\n"


def api(w, method, path, token=None, body=None, form=None):
    """(status, parsed JSON or text) of one request; an event stream's
    answer is only its status (None for the body)."""
    conn = http.client.HTTPConnection("127.0.0.1", w.api_port, timeout=10 * SLOW)
    headers = {"Authorization": f"Bearer {token or w.token}"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    elif form is not None:
        data = form.encode()
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    try:
        conn.request(method, path, body=data, headers=headers)
        r = conn.getresponse()
        if r.status == 200 and "event-stream" in (r.getheader("Content-Type") or ""):
            return r.status, None
        raw = r.read().decode(errors="replace")
        try:
            return r.status, json.loads(raw)
        except ValueError:
            return r.status, raw
    finally:
        conn.close()


class Stream:
    """GET an event stream with token; collects the event names."""

    def __init__(self, w, path, token):
        self.conn = http.client.HTTPConnection("127.0.0.1", w.api_port, timeout=30 * SLOW)
        self.conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
        self.resp = self.conn.getresponse()
        if self.resp.status != 200:
            raise Failure(f"GET {path}: {self.resp.status} {self.resp.read()!r}")
        self.names = []
        self.first_id = None
        self.cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        try:
            for line in self.resp:
                line = line.decode(errors="replace").rstrip("\n")
                if line.startswith("id: ") and self.first_id is None:
                    with self.cond:
                        self.first_id = line[len("id: "):]
                        self.cond.notify_all()
                if line.startswith("event: "):
                    with self.cond:
                        self.names.append(line[len("event: "):])
                        self.cond.notify_all()
        except Exception:  # noqa: BLE001 - the stream was closed under the reader
            pass

    def wait(self, name):
        deadline = time.monotonic() + seconds(10)
        with self.cond:
            while name not in self.names:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Failure(f"no event {name!r} on the stream; got {self.names}")
                self.cond.wait(left)
            return list(self.names)

    def close(self):
        try:
            self.conn.sock.shutdown(2)
        except OSError:
            pass
        self.conn.close()


def create(w, **params):
    status, body = api(w, "POST", "/v1/tokens", body=params)
    expect(status == 200 and isinstance(body, dict) and body.get("token", "").startswith("tether_"),
           f"POST /v1/tokens {params}: {status} {body}")
    return body


def provision(w, tags):
    status, j = api(w, "POST", "/v1/provision", body={"uses": 1, "tags": tags})
    expect(status == 201, f"POST /v1/provision: {status} {j}")
    return j["token"]


def enroll_and_connect(w, dev_id, tags, name=None):
    """Enroll dev_id (a new key) with a provisioning token of tags, then
    connect it; returns the fake device."""
    name = name or dev_id
    key = w.path(name + ".key")
    subprocess.run(EMULATOR + [TETHERCTL, "genkey", key], check=True, capture_output=True)
    csr = subprocess.run(EMULATOR + [TETHERCTL, "csr", "--key", key, "--id", dev_id], check=True,
                         capture_output=True, text=True).stdout
    s = Device(w.coap_port, None, None, w.path("pki", "ca.crt"))
    s.send(frame(CSM, b"", [(CSM_MAX_MESSAGE_SIZE, uint(1 << 20))]))
    t = s.request(POST, "enroll", json.dumps({"token": provision(w, tags), "csr": csr}).encode(),
                  [(CONTENT_FORMAT, uint(50))])
    m = s.response(t, timeout=seconds(20))
    s.close()
    expect(m.code == CREATED, f"enroll {dev_id}: {codestr(m.code)} {m.payload!r}")
    crt = w.path(name + ".crt")
    with open(crt, "w") as f:
        f.write(m.json()["certificate"])
    d, _ = connect(w, (dev_id, crt, key))
    return d


def ids(body):
    return [d["id"] for d in (body["devices"] if isinstance(body, dict) else body)]


def test_token_tags(w):
    w.start_cloud(extra=BUILTIN.format(ca=w.path("pki", "ca.crt"), key=w.path("pki", "ca.key")))
    a = enroll_and_connect(w, "dev-a", {"site": "a", "room": "x, y z"})
    b = enroll_and_connect(w, "dev-b", {"site": "b"})
    n, n_id = connect(w)  # no tags: a certificate from the PKI, registered on connection

    # The format: NAME or NAME=VALUE, checked at creation.
    for bad in (["=a"], ["bad name=x"], ["a b"], ["site=" + "v" * 257], ["site=\u0001"], ["site=\u0085"], [1],
                {"site": "a"}, ["x" * 65], [f"t{i}" for i in range(65)], "site=a,=b"):
        status, reply = api(w, "POST", "/v1/tokens", body={"scopes": ["devices:read"], "tags": bad})
        expect(status == 400 and "tags" in reply.get("error", ""), f"tags {bad!r}: {status} {reply}")
    status, reply = api(w, "POST", "/v1/tokens", body={"scopes": ["devices:read", "events:publish"],
                                                         "tags": ["site=a"]})
    expect(status == 400 and "events:publish" in reply.get("error", ""), f"publish + tags: {status} {reply}")
    status, reply = api(w, "POST", "/v1/tokens", body={"scopes": ["events:publish"], "devices": ["dev-a"]})
    expect(status == 400, f"publish + devices: {status} {reply}")

    t = create(w, scopes=["devices:read", "events:read", "functions:call", "ota:write"], tags=["site=a"])
    expect(t["tags"] == ["site=a"], f"description: {t}")
    tok = t["token"]
    # The list: its devices only, whole or by page.
    expect(ids(api(w, "GET", "/v1/devices", tok)[1]) == ["dev-a"], "restricted list")
    page = api(w, "GET", "/v1/devices?page=1&per_page=5", tok)[1]
    expect(ids(page) == ["dev-a"] and page["meta"]["total"] == 1, f"page: {page}")
    expect(ids(api(w, "GET", "/v1/devices?page=2&per_page=1", tok)[1]) == [], "page 2")
    status, desc = api(w, "GET", "/v1/devices/dev-a", tok)
    expect(status == 200 and desc["tags"] == {"site": "a", "room": "x, y z"}, f"describe: {status} {desc}")
    # Its device: a call and a variable read, answered by the device.
    for method, path, want, answer, cf in (("POST", "/v1/devices/dev-a/f", "f/f", CHANGED, None),
                                            ("GET", "/v1/devices/dev-a/v", "v/v", CONTENT, 50)):
        res = {}
        thread = threading.Thread(target=lambda: res.update(r=api(w, method, path, tok, body={"arg": "1"}
                                                                    if method == "POST" else None)))
        thread.start()
        m = a.wait_for(lambda m: m.path == want, what=want)
        a.answer(m, answer, b"7", cf=cf)
        thread.join(seconds(10))
        status, reply = res.get("r", (None, None))
        expect(status == 200 and (reply.get("return_value") == 7 or reply.get("result") == 7),
               f"{method} {path}: {status} {reply}")
    expect(api(w, "GET", "/v1/devices/dev-a/events", tok)[0] == 200, "its device's stream")
    # Every other device, known or not, by every route: 403 before any lookup.
    for dev in ("dev-b", n_id, "nosuchdev"):
        for method, path, body in (("GET", f"/v1/devices/{dev}", None), ("POST", f"/v1/devices/{dev}/f", {"arg": "1"}),
                                   ("GET", f"/v1/devices/{dev}/v", None), ("GET", f"/v1/devices/{dev}/events", None),
                                   ("GET", f"/v1/devices/{dev}/events/r", None),
                                   ("PUT", f"/v1/devices/{dev}", {"manifest": "x"})):
            status, reply = api(w, method, path, tok, body=body)
            expect(status == 403 and "restricted" in reply.get("error_description", ""),
                   f"{method} {path} with a site=a token: {status} {reply}")
    expect(api(w, "GET", "/v1/ota/jobs", tok)[0] == 403, "the OTA job list")
    expect(api(w, "POST", "/v1/provision", tok, body={"uses": 1})[0] == 403, "provisioning")

    # Matching: NAME alone; a value with a comma and a blank (the array
    # form); "NAME=" is the empty value; any of several; IDs and tags.
    def reach(**params):
        k = create(w, scopes=["devices:read"], **params)["token"]
        return ids(api(w, "GET", "/v1/devices", k)[1])
    expect(reach(tags=["site"]) == ["dev-a", "dev-b"], "site")
    expect(reach(tags=["room=x, y z"]) == ["dev-a"], "room=x, y z")
    expect(reach(tags=["room=x"]) == [] and reach(tags=["site="]) == [] and reach(tags=["Site=a"]) == [],
           "partial, empty and other-case matches")
    expect(reach(tags="site=b, nosuch") == ["dev-b"], "a string of tags (a form's)")
    expect(reach(tags=["site=b", "site=a"]) == ["dev-a", "dev-b"], "either tag")
    expect(reach(devices=[n_id, "dev-b"], tags=["site=b"]) == [n_id, "dev-b"], "its IDs, then its tags, once each")
    status, reply = api(w, "POST", "/v1/tokens", form="scopes=devices:read&tags=site%3Da%2C%20room")
    expect(status == 200 and reply["tags"] == ["site=a", "room"], f"form: {status} {reply}")
    # The CLI sends JSON: a value with commas and blanks stays whole.
    made = json.loads(w.tether("tokens", "create", "--scope", "devices:read", "--tag", "room=x, y z", "--json").stdout)
    expect(made["tags"] == ["room=x, y z"], f"tether tokens create --tag: {made}")
    expect(ids(api(w, "GET", "/v1/devices", made["token"])[1]) == ["dev-a"], "the CLI's token")

    # Streams: of all devices, of every device, of its device; B's and the
    # API's events come first, so they would have arrived before A's.
    streams = [Stream(w, "/v1/events/r", tok), Stream(w, "/v1/devices/events/r", tok),
               Stream(w, "/v1/devices/dev-a/events/r", tok)]
    b.publish("r/b", b"from b")
    n.publish("r/n", b"from n")
    w.tether("publish", "r/api", "from the api")
    a.publish("r/a", b"from a")
    for s in streams:
        expect(s.wait("r/a") == ["r/a"], f"a site=a stream got {s.names}")
    # Catching up from the journal (Last-Event-ID 0: from the start) too.
    conn = http.client.HTTPConnection("127.0.0.1", w.api_port, timeout=10 * SLOW)
    epoch = streams[0].first_id.split("-")[0]
    conn.request("GET", "/v1/events/r", headers={"Authorization": f"Bearer {tok}", "Last-Event-ID": f"{epoch}-0"})
    replay = conn.getresponse()
    names = []
    while "r/a" not in names:
        line = replay.fp.readline().decode()
        expect(line != "", f"the replay ended: {names}")
        if line.startswith("event: "):
            names.append(line.strip()[len("event: "):])
    conn.close()
    expect(names == ["r/a"], f"a site=a replay got {names}")

    # B's tags change: revoked, unrevoked, enrolled again with site=a. The
    # next request and the open streams judge it by its new tags; the
    # streams of a token for site=b (and N) stop getting B's events.
    tb = create(w, scopes=["devices:read", "events:read"], devices=[n_id], tags=["site=b"])["token"]
    b_streams = [Stream(w, "/v1/devices/dev-b/events/r", tb), Stream(w, "/v1/events/r", tb)]
    b.publish("r/b1", b"site b")
    for s in b_streams:
        s.wait("r/b1")
    expect(api(w, "PUT", "/v1/devices/dev-b/revocation", body={"reason": "re-tag"})[0] == 200, "revoke")
    expect(api(w, "DELETE", "/v1/devices/dev-b/revocation")[0] == 200, "unrevoke")
    b.close()
    b = enroll_and_connect(w, "dev-b", {"site": "a"}, name="dev-b2")
    expect(ids(api(w, "GET", "/v1/devices", tok)[1]) == ["dev-a", "dev-b"], "B in the site=a list")
    expect(api(w, "GET", "/v1/devices/dev-b", tok)[0] == 200, "B with the site=a token")
    status, reply = api(w, "GET", "/v1/devices/dev-b", tb)
    expect(status == 403, f"B with the site=b token: {status} {reply}")
    expect(ids(api(w, "GET", "/v1/devices", tb)[1]) == [n_id], "the site=b list")
    b.publish("r/b2", b"site a now")
    a.publish("r/a2", b"mark")
    streams[0].wait("r/a2")
    expect(streams[0].names == ["r/a", "r/b2", "r/a2"], f"the site=a stream: {streams[0].names}")
    # N's event comes after B's on the same stream: B's did not come. The
    # stream of B alone was judged in the same round as the other.
    n.publish("r/n2", b"mark")
    expect(b_streams[1].wait("r/n2") == ["r/b1", "r/n2"], f"the site=b stream: {b_streams[1].names}")
    expect(b_streams[0].names == ["r/b1"], f"the site=b stream of B got {b_streams[0].names}")
    for s in streams + b_streams:
        s.close()

    # A restricted token with events:publish stored before they were
    # refused (written into the database): publishing is refused anyway.
    pub = create(w, scopes=["devices:read"], tags=["site=a"])
    w.cloud.stop()
    db = sqlite3.connect(os.path.join(w.path("cloud-state"), "cloud.db"))
    db.execute("UPDATE tokens SET scopes = 'devices:read events:publish' WHERE id = ?", (pub["id"],))
    db.commit()
    db.close()
    w.start_cloud(extra=BUILTIN.format(ca=w.path("pki", "ca.crt"), key=w.path("pki", "ca.key")))
    status, reply = api(w, "POST", "/v1/devices/events", pub["token"], body={"name": "r/x", "data": "1"})
    expect(status == 403 and "restricted" in reply.get("error_description", ""), f"publish: {status} {reply}")
    # Tags survive the restart, and the registry's are read from disk.
    expect(ids(api(w, "GET", "/v1/devices", pub["token"])[1]) == ["dev-a", "dev-b"], "after a restart")
    audit = api(w, "GET", f"/v1/audit?target={t['id']}")[1]
    expect(audit and audit[0]["detail"].get("tags") == ["site=a"], f"token.create audit: {audit}")
    for d in (a, b, n):
        d.close()


if __name__ == "__main__":
    sys.exit(run([test_token_tags], emulated="ok"))
