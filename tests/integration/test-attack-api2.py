#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Attacks on the HTTP API's provisioning tokens and tag-restricted tokens
(docs/cloud.md, "Tokens and scopes", "Provisioning tokens"): dead
provisioning tokens piling up without bound (every create and list pays
for them), a restriction given but empty (it must not make an
unrestricted token), a device ID listed twice, RFC 3339 times with blanks
in them, and tag values with SQL and JSON specials (the list's SQL and the
per-request check must agree on every one)."""

import hashlib
import importlib.util
import os
import sqlite3
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fakedev import connect  # noqa: E402
from harness import expect, run  # noqa: E402

_spec = importlib.util.spec_from_file_location(
    "token_tags", os.path.join(os.path.dirname(os.path.abspath(__file__)), "test-token-tags.py"))
tt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tt)
api, ids = tt.api, tt.ids

DEAD_KEPT = 1000  # provision.h, PROVISION_DEAD_MAX


def test_dead_provisioning_tokens_bounded(w):
    """A provision:write holder (no admin) makes tokens that die at once
    (expires_in 1, or revoked, or used up): at about 1000 a second. Kept
    for ever, they made every POST /v1/provision scan them all and GET
    /v1/provision list them all, on the cloud's loop (300000 of them: 5 s
    per list). Only the newest DEAD_KEPT dead ones are kept; live ones
    always."""
    w.start_cloud()
    pw = tt.create(w, scopes=["provision:write"])["token"]
    live = api(w, "POST", "/v1/provision", pw, body={"uses": 3, "name": "live"})[1]["id"]
    w.cloud.stop()
    db = sqlite3.connect(w.path("cloud-state", "cloud.db"))
    now = int(time.time())
    rows = []
    for i in range(3 * DEAD_KEPT):
        kind = i % 3  # revoked, used up, expired
        rows.append((f"prov-d{i:07x}", hashlib.sha256(b"dead %d" % i).digest(), f"dead {i}", 1, 1 if kind == 1 else 0,
                     now - 10 if kind == 2 else now + 86400, "{}", now - 100, "token:x",
                     now - 50 if kind == 0 else None))
    # Live ones among them (made before the dead, so oldest): all kept.
    for i in range(20):
        rows.insert(0, (f"prov-l{i:07x}", hashlib.sha256(b"live %d" % i).digest(), f"live {i}", 5, 0, now + 86400,
                        "{}", now - 200, "token:x", None))
    db.executemany("INSERT INTO provision_tokens (id, digest, name, uses_max, uses, expires_at, tags, created_at, "
                   "created_by, revoked_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    db.commit()
    db.close()
    w.start_cloud()
    status, made = api(w, "POST", "/v1/provision", pw, body={"uses": 1})
    expect(status == 201, f"POST /v1/provision: {status} {made}")
    status, listed = api(w, "GET", "/v1/provision", pw)
    expect(status == 200, f"GET /v1/provision: {status}")
    names = [t["name"] for t in listed]
    dead = [t for t in listed if t["state"] != "active"]
    expect(len(dead) == DEAD_KEPT, f"{len(dead)} dead provisioning tokens kept, not {DEAD_KEPT}")
    expect(all(f"live {i}" in names for i in range(20)) and "live" in names and made["id"] in
           [t["id"] for t in listed], "a live token was deleted")
    # The newest dead ones are kept, the oldest went.
    expect(f"dead {3 * DEAD_KEPT - 1}" in names and "dead 0" not in names, "the oldest dead tokens are deleted first")
    expect(api(w, "GET", f"/v1/provision/{live}", pw)[0] == 200, "the live token by its id")


def test_empty_restriction_refused(w):
    """"devices" or "tags" given but holding no entry ([] or a string of
    commas and blanks, as a form's empty field from a script's empty
    variable) made a token that reaches every device: refused."""
    w.start_cloud()
    d, dev_id = connect(w)
    for params in ({"devices": []}, {"tags": []}, {"devices": ""}, {"tags": ""}, {"tags": " , ,"},
                   {"devices": " ,\t"}, {"devices": [], "tags": []}):
        status, reply = api(w, "POST", "/v1/tokens", body={"scopes": ["devices:read"], **params})
        expect(status == 400 and "no entry" in reply.get("error", ""), f"{params}: {status} {reply}")
    for form in ("scopes=devices:read&tags=", "scopes=devices:read&devices=%20%2C"):
        status, reply = api(w, "POST", "/v1/tokens", form=form)
        expect(status == 400, f"form {form}: {status} {reply}")
    # null is "not given": an unrestricted token, as without it.
    k = tt.create(w, scopes=["devices:read"], devices=None, tags=None)
    expect(ids(api(w, "GET", "/v1/devices", k["token"])[1]) == [dev_id], "null restrictions")
    d.close()


def test_device_listed_twice(w):
    """A device ID given twice is one device: listed once, counted once."""
    w.start_cloud()
    d, dev_id = connect(w)
    k = tt.create(w, scopes=["devices:read"], devices=[dev_id, dev_id, "other", "other"])
    expect(k["devices"] == [dev_id, "other"], f"description: {k}")
    expect(ids(api(w, "GET", "/v1/devices", k["token"])[1]) == [dev_id], "the list")
    page = api(w, "GET", "/v1/devices?page=1&per_page=10", k["token"])[1]
    expect(page["meta"]["total"] == 1, f"page: {page}")
    d.close()


def test_expires_at_strict(w):
    """expires_at of a provisioning token is RFC 3339: every field its
    digits (glibc's strptime() takes blanks and single digits)."""
    w.start_cloud()
    for bad in ("2030-01- 1T00:00:00Z", "2030-01-01T 0:00:00Z", "2030-01-01T00: 0:00Z", "2030- 1-01T00:00:00Z",
                "2030-01-01T00:00:60Z", "2030-01-01T00:00:00+24:00", "2030-01-01T00:00:00.Z",
                "+030-01-01T00:00:00Z", "2030-01-01T00:00:00+2:000"):
        status, reply = api(w, "POST", "/v1/provision", body={"expires_at": bad})
        expect(status == 400 and "expires_at" in reply.get("error", ""), f"{bad!r}: {status} {reply}")
    for good, want in (("2030-01-01t00:00:00z", "2030-01-01T00:00:00Z"),
                       ("2030-01-01T00:00:00.123456-23:59", "2030-01-01T23:59:00Z")):
        status, reply = api(w, "POST", "/v1/provision", body={"expires_at": good})
        expect(status == 201 and reply["expires_at"] == want, f"{good!r}: {status} {reply}")


def test_tag_specials(w):
    """Tag values with quotes, %, _, backslashes, '=', JSON text, blanks,
    non-ASCII and 256 bytes; names with dots: the list (SQL, json_each)
    and a request about the device (C) agree, exactly, byte for byte."""
    w.start_cloud(extra=tt.BUILTIN.format(ca=w.path("pki", "ca.crt"), key=w.path("pki", "ca.key")))
    tags = {"q": 'a"b', "pct": "%", "us": "_", "bs": "a\\b", "u": "é😀", "eq": "x=y", "long": "v" * 256,
            "a.b": "dot", "e": "", "sp": " x ", "js": '{"a":1}', "arr": "[1]"}
    s = tt.enroll_and_connect(w, "dev-s", tags)
    o = tt.enroll_and_connect(w, "dev-o", {"pct": "x", "us": "y", "a": "b"})
    cases = {'q=a"b': "s", "q=a": "", 'q=a\\"b': "", "pct=%": "s", "pct=_": "", "us=_": "s", "us=%": "",
             "bs=a\\b": "s", "bs=a\\\\b": "", "u=é😀": "s", "u=e\u0301😀": "", "u=e": "", "eq=x=y": "s", "eq=x": "",
             "long=" + "v" * 256: "s", "a.b=dot": "s", "a.b": "s", "a": "o", "A.B": "", "a.b=DOT": "", "e=": "s",
             "sp= x ": "s", "sp=x": "", 'js={"a":1}': "s", "arr=[1]": "s", "pct": "os", "us": "os"}
    for tag, want in cases.items():
        k = tt.create(w, scopes=["devices:read"], tags=[tag])["token"]
        listed = sorted(ids(api(w, "GET", "/v1/devices", k)[1]))
        expect(listed == sorted("dev-" + c for c in want), f"{tag!r}: listed {listed}")
        for c in "so":
            status = api(w, "GET", f"/v1/devices/dev-{c}", k)[0]
            expect(status == (200 if c in want else 403), f"{tag!r}: dev-{c} {status}")
    s.close()
    o.close()


if __name__ == "__main__":
    sys.exit(run([test_dead_provisioning_tokens_bounded, test_empty_restriction_refused, test_device_listed_twice,
                  test_expires_at_strict, test_tag_specials], emulated="ok"))
