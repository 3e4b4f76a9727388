#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Inventory and tags (docs/fleet.md): PUT /v1/devices/ID changes a
device's name, notes and tags (a JSON merge patch), with the scope
devices:write, for an offline device too, one audit record and one event
tether/device/updated per change; names are unique and no other
device's id; every limit answers 400 with its reason; GET /v1/devices
filters by tag, package, connection, last heard and name; the agent
reports what it runs on ("system") and the CLI shows and changes it all.
POST /v1/ota/jobs is the OTA route, PUT with "manifest" its compatible
form."""
import json
import os
import sqlite3
import subprocess
import sys
import time
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import EventStream, api_json, expect, local_publish, poll, run  # noqa: E402
import hookkit  # noqa: E402

SECRET = "inventory-test-secret-0123456789"


def audit(w, action):
    def query():
        db = sqlite3.connect(w.path("cloud-state", "cloud.db"))
        try:
            return db.execute("SELECT actor, target, detail FROM audit WHERE action = ? ORDER BY id",
                              (action,)).fetchall()
        finally:
            db.close()
    return poll(query, 5, f"an audit record of {action}")


def register(w, *ids):
    for i in ids:
        s, b = api_json(w, "POST", "/v1/devices", {"id": i})
        expect(s in (200, 201), f"register {i}: {s} {b}")


def put(w, dev, body=None, token=None, form=None):
    return api_json(w, "PUT", f"/v1/devices/{dev}", body, token=token, form=form)


def token(w, scopes, devices=None):
    body = {"name": "t", "scopes": scopes}
    if devices:
        body["devices"] = devices
    s, b = api_json(w, "POST", "/v1/tokens", body)
    expect(s in (200, 201), f"token: {s} {b}")
    return b["token"]


def listing(w, query="", tok=None):
    s, b = api_json(w, "GET", "/v1/devices" + query, token=tok)
    expect(s == 200, f"GET /v1/devices{query}: {s} {b}")
    return b


def ids(devs):
    return [d["id"] for d in devs]


def test_update_api(w):
    w.start_cloud()
    register(w, "dev-a", "dev-b")
    events = EventStream(w, "tether/device/updated")

    s, b = put(w, "dev-a", {"name": "kitchen", "notes": "by the window\nsecond line",
                            "tags": {"room": "1", "floor": "ground"}})
    expect(s == 200 and b["ok"] is True and b["id"] == "dev-a" and b["name"] == "kitchen"
           and b["notes"] == "by the window\nsecond line" and b["tags"] == {"room": "1", "floor": "ground"}
           and b["updated_at"], f"PUT: {s} {b}")
    m = events.named("tether/device/updated")
    expect(m["data"]["coreid"] == "dev-a", f"event: {m}")
    data = json.loads(m["data"]["data"])
    expect(data["changed"] == {"name": "kitchen", "notes": "by the window\nsecond line",
                               "tags": {"room": "1", "floor": "ground"}} and data["device"] == "dev-a"
           and data["actor"].startswith("token:"), f"event data: {data}")

    # Merge patch: a string sets, null removes, others stay.
    s, b = put(w, "dev-a", {"tags": {"room": "2", "floor": None, "new": "x"}})
    expect(s == 200 and b["tags"] == {"room": "2", "new": "x"} and b["name"] == "kitchen", f"merge: {s} {b}")

    # The same again changes nothing: no event, the same answer.
    events.wait(lambda m: "new" in json.loads(m["data"]["data"])["changed"].get("tags", {}), 10, "the merge event")
    n = len(events.messages)
    s, b2 = put(w, "dev-a", {"tags": {"room": "2"}})
    expect(s == 200 and b2["tags"] == b["tags"] and b2["updated_at"] == b["updated_at"], f"no-op: {s} {b2}")

    # Clear with "" and null.
    s, b = put(w, "dev-a", {"name": "", "notes": None})
    expect(s == 200 and b["name"] is None and b["notes"] is None, f"clear: {s} {b}")
    events.wait(lambda m: json.loads(m["data"]["data"])["changed"] == {"name": None, "notes": None}, 10,
                "the clearing event")
    expect(len(events.messages) == n + 1, f"an event for the no-op: {events.messages[n:]}")

    # A form body (tags as JSON text).
    s, b = put(w, "dev-a", form=b"name=porch&tags=" + urllib.parse.quote('{"form":"yes"}').encode())
    expect(s == 200 and b["name"] == "porch" and b["tags"]["form"] == "yes", f"form: {s} {b}")

    # The device object.
    s, d = api_json(w, "GET", "/v1/devices/dev-a")
    expect(s == 200 and d["name"] == "porch" and d["notes"] is None and d["tags"]["form"] == "yes"
           and d["system"] is None and d["updated_at"], f"GET: {s} {d}")
    listed = {x["id"]: x for x in listing(w)}
    expect(listed["dev-b"]["name"] is None and listed["dev-b"]["tags"] == {} and listed["dev-b"]["notes"] is None
           and "system" in listed["dev-b"], f"list: {listed['dev-b']}")

    # Audit: one record per request, detail = what changed.
    recs = [json.loads(r[2]) for r in audit(w, "device.update") if r[1] == "dev-a"]
    expect(recs[0]["name"] == "kitchen" and recs[0]["status"] == 200, f"audit: {recs}")
    expect({"name": None, "notes": None, "status": 200} in recs, f"audit of the clearing: {recs}")


def test_update_errors(w):
    w.start_cloud()
    register(w, "dev-a", "dev-b")
    put(w, "dev-b", {"name": "taken"})
    cases = [
        ({}, 400, "nothing to change: name, notes or tags"),
        ({"access_token": "x", "development": True}, 400, "nothing to change: name, notes or tags"),
        ({"name": "taken"}, 409, "name 'taken' is taken by device dev-b"),
        ({"name": "dev-b"}, 409, "name 'dev-b' is taken by device dev-b"),
        ({"name": "a b"}, 400, "Invalid name: names are [A-Za-z0-9_.-]{1,64}"),
        ({"name": "x" * 65}, 400, "Invalid name: names are [A-Za-z0-9_.-]{1,64}"),
        ({"name": "a\u0000b"}, 400, "Invalid JSON body: a string holds a NUL character (\\u0000), which no "
         "parameter may hold (line 1, column 19)"),
        ({"name": 5}, 400, "\"name\" must be a string or null"),
        ({"notes": "n" * 4097}, 400, "\"notes\" is longer than 4096 bytes"),
        ({"notes": "a\u0000b"}, 400, None),
        ({"notes": []}, 400, "\"notes\" must be a string or null"),
        ({"tags": "x"}, 400, "\"tags\" must be a JSON object of names to a string (set) or null (remove)"),
        ({"tags": ["a"]}, 400, "\"tags\" must be a JSON object of names to a string (set) or null (remove)"),
        ({"tags": {"a b": "1"}}, 400, "Invalid tag name in \"tags\": names are [A-Za-z0-9_.-]{1,64}"),
        ({"tags": {"k": 1}}, 400, "The value of tag 'k' must be a string or null"),
        ({"tags": {"k": "v" * 257}}, 400, "The value of tag 'k' is longer than 256 bytes"),
        ({"tags": {"k": "a\nb"}}, 400, "The value of tag 'k' must be UTF-8 text without control characters"),
        ({"tags": {"k": "a\u0085b"}}, 400, "The value of tag 'k' must be UTF-8 text without control characters"),
        ({"tags": {f"t{i}": "v" for i in range(33)}}, 400, "\"tags\" would hold 33 tags, at most 32 are allowed"),
        ({"tags": {f"t{i}": "v" for i in range(2000)}}, 400,
         "\"tags\" would hold 2000 tags, at most 32 are allowed"),
        ({"tags": {f"t{i}": None for i in range(2000)}}, 200, None),
        # 10,000 tags: past the body limit before any of it is parsed.
        ({"tags": {f"t{i}": "v" for i in range(10000)}}, 413, None),
        ({"name": "ok", "manifest": "x"}, 400, None),
    ]
    for body, status, error in cases:
        s, b = put(w, "dev-a", body)
        expect(s == status and (error is None or b.get("error") == error),
               f"PUT {json.dumps(body)[:80]}: {s} {b}")
    # Nothing of it stuck.
    s, d = api_json(w, "GET", "/v1/devices/dev-a")
    expect(d["name"] is None and d["notes"] is None and d["tags"] == {}, f"after the errors: {d}")
    # 32 tags are fine; one more through a patch is not.
    s, b = put(w, "dev-a", {"tags": {f"t{i}": "v" for i in range(32)}})
    expect(s == 200 and len(b["tags"]) == 32, f"32 tags: {s}")
    s, b = put(w, "dev-a", {"tags": {"one-more": "v"}})
    expect(s == 400 and b["error"] == "\"tags\" would hold 33 tags, at most 32 are allowed", f"33rd: {s} {b}")
    s, b = put(w, "dev-a", {"tags": {"one-more": "v", "t0": None}})
    expect(s == 200 and "t0" not in b["tags"] and len(b["tags"]) == 32, f"swap: {s} {b}")
    # A name is its own again; an unknown device is 404.
    put(w, "dev-a", {"name": "mine"})
    s, b = put(w, "dev-a", {"name": "mine"})
    expect(s == 200 and b["name"] == "mine", f"own name: {s} {b}")
    s, b = put(w, "nosuch", {"name": "x"})
    expect(s == 404 and b["error"] == "Device not found", f"unknown: {s} {b}")


def test_update_scopes(w):
    w.start_cloud()
    register(w, "dev-a", "dev-b")
    reader = token(w, ["devices:read", "ota:write"])
    s, b = put(w, "dev-a", {"name": "x"}, token=reader)
    expect(s == 403 and b.get("scope") == "devices:write", f"without devices:write: {s} {b}")
    writer = token(w, ["devices:write"])
    s, b = put(w, "dev-a", {"name": "x"}, token=writer)
    expect(s == 200, f"devices:write: {s} {b}")
    s, b = put(w, "dev-a", {"manifest": "x"}, token=writer)
    expect(s == 403 and b.get("scope") == "ota:write", f"manifest without ota:write: {s} {b}")
    # Restricted to dev-a: dev-b is out of reach (as every device route),
    # and tags are not its to change.
    mine = token(w, ["devices:write", "devices:read"], devices=["dev-a"])
    s, b = put(w, "dev-b", {"name": "y"}, token=mine)
    expect(s == 403 and b.get("error") == "insufficient_scope", f"another device: {s} {b}")
    s, b = put(w, "nosuch", {"name": "y"}, token=mine)
    expect(s == 403, f"an unknown device: {s} {b}")
    s, b = put(w, "dev-a", {"name": "y"}, token=mine)
    expect(s == 200 and b["name"] == "y", f"its device: {s} {b}")
    s, b = put(w, "dev-a", {"tags": {"k": "v"}}, token=mine)
    expect(s == 403 and "may not change tags" in b.get("error_description", ""), f"tags: {s} {b}")
    # The new route for OTA jobs checks ota:write and the device.
    s, b = api_json(w, "POST", "/v1/ota/jobs", {"device": "dev-a", "manifest": "x"}, token=writer)
    expect(s == 403 and b.get("scope") == "ota:write", f"POST /v1/ota/jobs without ota:write: {s} {b}")
    s, b = api_json(w, "POST", "/v1/ota/jobs", {"manifest": "x"})
    expect(s == 400 and b["error"] == "\"device\" is required", f"no device: {s} {b}")
    s, b = api_json(w, "POST", "/v1/ota/jobs", {"device": "a/b", "manifest": "x"})
    expect(s == 400 and b["error"] == "\"device\" must be a device ID", f"bad device: {s} {b}")
    s, b = api_json(w, "POST", "/v1/ota/jobs", {"device": "dev-a", "manifest": "x"})
    expect(s == 400 and b["error"] == "Not a signed tether manifest", f"bad manifest: {s} {b}")


def test_filters(w):
    w.start_cloud()
    a = w.start_agent()
    register(w, "dev-a", "dev-b", "dev-c")
    put(w, "dev-a", {"name": "alpha", "tags": {"group": "a", "ring": "1"}})
    put(w, "dev-b", {"tags": {"group": "b"}})
    put(w, a.device_id, {"tags": {"group": "a"}})
    every = ids(listing(w))
    expect(ids(listing(w, "?tag=group=a")) == [i for i in every if i in (a.device_id, "dev-a")], "tag=group=a")
    expect(ids(listing(w, "?tag=group")) == [i for i in every if i in (a.device_id, "dev-a", "dev-b")], "tag=group")
    expect(ids(listing(w, "?tag=group=a&tag=ring=1")) == ["dev-a"], "two tags")
    expect(ids(listing(w, "?tag=group=a&connected=true")) == [a.device_id], "connected")
    expect(a.device_id not in ids(listing(w, "?connected=false")), "connected=false")
    expect(ids(listing(w, "?name=alpha")) == ["dev-a"], "name")
    expect(ids(listing(w, "?heard_within=60")) == [a.device_id], "heard_within")
    expect(a.device_id not in ids(listing(w, "?not_heard_within=60")), "not_heard_within")
    expect(set(ids(listing(w, "?not_heard_within=60"))) == {"dev-a", "dev-b", "dev-c"}, "never heard")
    page = listing(w, "?tag=group&per_page=2&page=2")
    expect(len(page["devices"]) == 1 and page["meta"]["total"] == 3 and page["meta"]["total_pages"] == 2,
           f"paged: {page}")
    bad = [("?tag=", "tag"), ("?tag=a%20b", "tag"), ("?tag=k=a%0Ab", "tag"), ("?connected=yes", "connected"),
           ("?connected=true&connected=false", "connected"), ("?heard_within=-1", "heard_within"),
           ("?heard_within=1e3", "heard_within"), ("?not_heard_within=", "not_heard_within"),
           ("?package=A", "package"), ("?package=x=1%202", "package"), ("?name=a'b", "name"),
           ("?name=" + "n" * 65, "name"), ("?" + "&".join(["tag=k"] * 17), "tag"), ("?tag=group%00x", "tag"),
           ("?tag", "tag"), ("?name=alpha%27%20OR%201=1", "name"), ("?tag=group=%1B[31m", "tag")]
    for q, what in bad:
        s, b = api_json(w, "GET", "/v1/devices" + q)
        expect(s == 400 and b["error"].startswith(f"Malformed filter '{what}'"), f"{q}: {s} {b}")
    # A restricted token's list is filtered within its reach.
    mine = token(w, ["devices:read"], devices=["dev-a", "dev-b"])
    expect(ids(listing(w, "?tag=group", tok=mine)) == ["dev-a", "dev-b"], "restricted")
    expect(ids(listing(w, "?tag=group=a", tok=mine)) == ["dev-a"], "restricted, filtered")


def test_cli(w):
    w.start_cloud()
    a = w.start_agent()
    register(w, "dev-b")
    dev = a.device_id
    r = w.tether("rename", dev, "gate-1")
    expect(r.stdout.strip() == f"{dev}: name 'gate-1', tags (none)", f"rename: {r.stdout!r}")
    r = w.tether("tag", dev, "group=a", "ring=1", "note=a b,c")
    out = r.stdout.strip()
    expect(out.startswith(f"{dev}: name 'gate-1', tags ")
           and sorted(out.split(", tags ")[1].replace("a b,c", "a_b,c").split()) == ["group=a", "note=a_b,c", "ring=1"],
           f"tag: {r.stdout!r}")
    r = w.tether("untag", dev, "note")
    expect(sorted(r.stdout.strip().split(", tags ")[1].split()) == ["group=a", "ring=1"], f"untag: {r.stdout!r}")
    r = w.tether("--json", "notes", dev, "rack 4\nshelf 2")
    expect(json.loads(r.stdout)["notes"] == "rack 4\nshelf 2", f"notes: {r.stdout!r}")
    # Notes are the writer's text, but not the writer's terminal escapes.
    w.tether("notes", dev, "a\x1b[31mred\x07\u0085x\ttab\nline 2")
    out = w.tether("describe", dev).stdout
    expect("notes:\n  a\\x1b[31mred\\x07\\x85x\ttab\n  line 2\n" in out and "\x1b" not in out, f"describe: {out!r}")
    w.tether("notes", dev, "rack 4\nshelf 2")
    r = w.tether("rename", "dev-b", "gate-1", check=False)
    expect(r.returncode == 1 and "name 'gate-1' is taken by device " + dev in r.stderr, f"taken: {r.stderr!r}")
    r = w.tether("tag", dev, "novalue", check=False)
    expect(r.returncode == 2 and "expected NAME=VALUE" in r.stderr, f"tag without =: {r.stderr!r}")
    r = w.tether("untag", dev, "a=b", check=False)
    expect(r.returncode == 2, f"untag with =: {r.stderr!r}")
    r = w.tether("tag", dev, "bad name=1", check=False)
    expect(r.returncode == 1 and "Invalid tag name" in r.stderr, f"bad tag name: {r.stderr!r}")
    r = w.tether("rename", "nosuch", "x", check=False)
    expect(r.returncode == 3, f"unknown device: {r.returncode} {r.stderr!r}")
    reader = token(w, ["devices:read"])
    r = w.tether("rename", dev, "y", token=reader, check=False)
    expect(r.returncode == 5 and "devices:write" in r.stderr, f"no scope: {r.returncode} {r.stderr!r}")

    lines = w.tether("list").stdout.splitlines()
    head = lines[0].split()
    expect(head[:4] == ["ID", "STATUS", "LAST", "HEARD"] and head[-5:] == ["NAME", "AGENT", "OS/ARCH", "TAGS", ]
           or head[-4:] == ["NAME", "AGENT", "OS/ARCH", "TAGS"], f"header: {lines[0]!r}")
    row = [x for x in lines if x.startswith(dev)][0]
    expect("gate-1" in row and sorted(row.split()[-1].split(",")) == ["group=a", "ring=1"] and " online " in row,
           f"row: {row!r}")
    rowb = [x for x in lines if x.startswith("dev-b")][0]
    expect(rowb.endswith(" -"), f"row without tags: {rowb!r}")
    ids_of = lambda *args: [x.split()[0] for x in w.tether("list", *args).stdout.splitlines()[1:]]  # noqa: E731
    expect(ids_of("--tag", "group=a") == [dev], "list --tag")
    expect(ids_of("--online") == [dev] and ids_of("--offline") == ["dev-b"], "--online/--offline")
    expect(ids_of("--heard-within", "1h") == [dev], "--heard-within")
    expect(ids_of("--not-heard-within", "1h") == ["dev-b"], "--not-heard-within")
    expect(ids_of("--tag", "group", "--online") == [dev], "two filters")
    r = w.tether("list", "--package", "Bad", check=False)
    expect(r.returncode == 1 and "Malformed filter 'package'" in r.stderr, f"--package Bad: {r.stderr!r}")
    r = w.tether("list", "--online", "--offline", check=False)
    expect(r.returncode == 2, f"--online --offline: {r.stderr!r}")
    r = w.tether("describe", dev, "--online", check=False)
    expect(r.returncode == 2, f"--online elsewhere: {r.stderr!r}")
    j = json.loads(w.tether("--json", "list", "--tag", "ring=1").stdout)
    expect([d["id"] for d in j] == [dev] and j[0]["tags"] == {"group": "a", "ring": "1"}, f"--json: {j}")


def test_agent_system(w):
    """The agent reports what it runs on; [Inventory] Packages= adds a
    package dpkg knows (dpkg itself, on any Debian); one not installed is
    left out."""
    w.start_cloud()
    a = w.start_agent(extra="[Inventory]\nPackages=dpkg no-such-package-here\n")
    dev = a.device_id

    def system():
        s, d = api_json(w, "GET", f"/v1/devices/{dev}")
        sysobj = d.get("system") or {}
        return sysobj if "arch" in sysobj or not os.path.exists("/usr/bin/dpkg") else None
    sysobj = poll(system, 10, "the agent's system")
    expect(sysobj.get("kernel") == os.uname().release, f"kernel: {sysobj}")
    pretty = None
    for path in ("/etc/os-release", "/usr/lib/os-release"):
        if os.path.exists(path):
            for line in open(path):
                if line.startswith("PRETTY_NAME="):
                    pretty = line.split("=", 1)[1].strip().strip('"')
            break
    expect(sysobj.get("os") == pretty, f"os: {sysobj} vs {pretty!r}")
    if not os.path.exists("/usr/bin/dpkg"):
        print("# no dpkg here: arch and packages are left out")
        expect("packages" not in sysobj or sysobj["packages"] == {}, f"packages without dpkg: {sysobj}")
        return
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True).stdout.strip()
    version = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "dpkg"], capture_output=True, text=True).stdout
    expect(sysobj["arch"] == arch and sysobj["packages"].get("dpkg") == version
           and "no-such-package-here" not in sysobj["packages"], f"system: {sysobj}")
    expect(ids(listing(w, f"?package=dpkg={urllib.parse.quote(version)}")) == [dev], "package=dpkg=VERSION")
    expect(ids(listing(w, "?package=dpkg")) == [dev], "package=dpkg")
    expect(ids(listing(w, "?package=dpkg=0.0")) == [], "package=dpkg=0.0")
    # The list and the CLI show it.
    row = [x for x in w.tether("list").stdout.splitlines() if x.startswith(dev)][0]
    expect(f"{pretty}/{arch}" in row, f"tether list: {row!r}")
    out = w.tether("describe", dev).stdout
    expect(f"  package:   dpkg {version}" in out and f"  arch:      {arch}" in out, f"describe: {out}")
    # Kept by the cloud across its restart (the registry has the describe
    # document), while the device is offline.
    a.stop()
    w.cloud.stop()
    w.daemons.remove(w.cloud)
    w.start_cloud()
    s, d = api_json(w, "GET", f"/v1/devices/{dev}")
    expect(d["connected"] is False and d["system"] == sysobj, f"after a restart: {d}")


def test_webhook_sees_new_tags(w):
    """A webhook with a tag selects a device by the tags it has now: a
    change through the API counts for the next event (the integrations'
    cache of tags is dropped), not some seconds later."""
    w.start_cloud()
    a = w.start_agent()
    recv = hookkit.Receiver(SECRET)
    w.cleanups.append(recv.close)
    s, b = api_json(w, "POST", "/v1/webhooks", {"url": recv.url, "name": "tagged", "prefix": "inv/",
                                                "tag": "group=x", "secret": SECRET})
    expect(s == 201, f"webhook: {s} {b}")
    sub = w.subscribe("inv/").wait_ready()
    local_publish(a, "inv/before", "1")  # not tagged: not sent (and its tags are cached)
    local_publish(a, "inv/other", "1")
    # Tag only once the webhook has read both: it judges an event by the
    # tags the device has when it reads the event.
    sub.wait(lambda e: e.get("name") == "inv/other", 10, "inv/other routed")

    def read_all():
        s, b = api_json(w, "GET", "/v1/webhooks/tagged")
        return s == 200 and b.get("backlog") == 0
    poll(read_all, 10, "the webhook to read both events")
    put(w, a.device_id, {"tags": {"group": "x"}})
    t0 = time.monotonic()
    local_publish(a, "inv/after", "2")
    recv.wait(lambda reqs: any(r.json.get("event") == "inv/after" for r in reqs), 10, "the event after tagging")
    took = time.monotonic() - t0
    expect(took < 8, f"the webhook saw the new tag {took:.1f} s later (a stale cache?)")
    got = [r.json.get("event") for r in recv.snapshot()]
    expect(got == ["inv/after"], f"the webhook got {got}")


if __name__ == "__main__":
    sys.exit(run([test_update_api, test_update_errors, test_update_scopes, test_filters, test_cli, test_agent_system,
                  test_webhook_sees_new_tags], emulated="ok"))
