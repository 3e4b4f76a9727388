#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""The web console (docs/console.md): the cloud serving its files
(/console/, path checks, security headers, ETags), GET
/v1/access_tokens/current, and the console itself driven in Debian's
chromium by tests/browser/console.test.mjs against a real cloud and two
real agents."""

import http.client
import json
import os
import re
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import SRC, Skip, api_json, expect, run, seconds  # noqa: E402

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cache-control": "no-cache",
}
CONSOLE_SRC = os.path.join(SRC, "console")
BROWSER_DIR = os.path.join(SRC, "tests", "browser")
CHROMIUM = os.environ.get("TETHER_CHROMIUM", "/usr/bin/chromium")
XSS = "<img src=x onerror=alert(1)>"


def fetch(w, method, path, headers=None, body=None):
    """(status, lower-cased headers, body bytes) of one request sent as is
    (http.client does not normalise the path: dots and escapes reach the
    server as written)."""
    c = http.client.HTTPConnection("127.0.0.1", w.api_port, timeout=seconds(10))
    try:
        c.putrequest(method, path, skip_accept_encoding=True)
        for k, v in (headers or {}).items():
            c.putheader(k, v)
        if body is not None:
            c.putheader("Content-Length", str(len(body)))
        c.endheaders(body)
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


def expect_headers(h, what):
    for k, v in SECURITY_HEADERS.items():
        expect(h.get(k) == v, f"{what}: header {k} is {h.get(k)!r}, not {v!r}")
    expect("access-control-allow-origin" not in h, f"{what}: a CORS header: {h}")


def scratch_console(w):
    """A console directory with a file of every kind the server must
    refuse next to the ones it serves."""
    d = w.path("console")
    os.makedirs(os.path.join(d, "sub"))
    files = {"index.html": b"<!doctype html><title>t</title>\n", "app.js": b"export const x = 1;\n",
             "console.css": b"body{}\n", "icon.svg": b"<svg/>", "notes.md": b"# x\n", "x.txt": b"text\n",
             ".hidden.js": b"hidden\n", "sub/inner.js": b"inner\n", "a" * 129 + ".js": b"long\n",
             "a" * 124 + ".js": b"long-ok\n"}
    for name, data in files.items():
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)
    with open(os.path.join(d, "big.js"), "wb") as f:
        f.truncate(4 * 1024 * 1024 + 1)
    with open(os.path.join(d, "max.js"), "wb") as f:
        f.truncate(4 * 1024 * 1024)
    with open(w.path("secret.js"), "w") as f:
        f.write("secret\n")
    os.symlink(w.path("secret.js"), os.path.join(d, "link.js"))
    os.symlink("app.js", os.path.join(d, "rel.js"))
    os.mkfifo(os.path.join(d, "fifo.js"))
    os.mkdir(os.path.join(d, "dir.js"))
    return d


def test_console_files(w):
    """GET and HEAD of the console's files: only regular files directly
    in the directory, never through a symlink, a '..' (plain or
    encoded), a subdirectory, a FIFO or a name off the rules; every answer
    with the security headers; no token asked; 304 for a matching ETag;
    a changed file served at once."""
    d = scratch_console(w)
    w.start_cloud(extra=f"[API]\nConsole={d}\n")

    st, h, body = fetch(w, "GET", "/console")
    expect(st == 301 and h.get("location") == "/console/", f"/console: {st} {h}")
    expect_headers(h, "/console")
    st, h, body = fetch(w, "GET", "/console/")
    expect(st == 200 and body.startswith(b"<!doctype html>"), f"/console/: {st} {body[:80]!r}")
    expect(h.get("content-type") == "text/html; charset=utf-8", f"index type: {h}")
    expect_headers(h, "/console/")
    st, h, body = fetch(w, "HEAD", "/console/")
    expect(st == 200 and body == b"" and h.get("content-length") == str(len(b"<!doctype html><title>t</title>\n")),
           f"HEAD /console/: {st} {h} {body!r}")
    expect_headers(h, "HEAD /console/")
    for name, ctype in (("app.js", "text/javascript; charset=utf-8"), ("console.css", "text/css; charset=utf-8"),
                        ("icon.svg", "image/svg+xml"), ("notes.md", "text/plain; charset=utf-8"),
                        ("index.html", "text/html; charset=utf-8"), ("a" * 124 + ".js", None)):
        st, h, body = fetch(w, "GET", "/console/" + name)
        expect(st == 200 and (ctype is None or h.get("content-type") == ctype), f"{name}: {st} {h}")
        expect_headers(h, name)
    st, h, body = fetch(w, "GET", "/console/max.js")
    expect(st == 200 and len(body) == 4 * 1024 * 1024, f"a file of 4 MiB: {st} {len(body)}")
    # a query string is no part of the name
    st, h, body = fetch(w, "GET", "/console/app.js?v=1")
    expect(st == 200 and body == b"export const x = 1;\n", f"with a query: {st} {body!r}")

    refused = ["/console/x.txt", "/console/.hidden.js", "/console/sub/inner.js", "/console/sub",
               "/console/sub/", "/console/link.js", "/console/rel.js", "/console/fifo.js", "/console/dir.js",
               "/console/big.js", "/console/missing.js", "/console/" + "a" * 129 + ".js",
               "/console/" + "a" * 5000 + ".js", "/console/../secret.js", "/console/%2e%2e/secret.js",
               "/console/%2E%2E/console/app.js", "/console/.%2e/secret.js", "/console/..", "/console/%2e%2e",
               "/console/./app.js", "/console//app.js", "/console/app.js/", "/console/app%20.js",
               "/console/app.js%00.html", "/console/%2fetc%2fpasswd", "/console/..%2fsecret.js",
               "/console/..%5csecret.js", "/console/app.js;.html", "/console/%C0%AE%C0%AE/secret.js",
               "/console/.", "/console/index.html%2f", "/consolex", "/console.js", "/v1/../console/app.js"]
    for path in refused:
        st, h, body = fetch(w, "GET", path)
        # outside /console/: the API's (401 without a token)
        expect(st in (400, 404) or (st == 401 and not path.startswith("/console/")),
               f"GET {path}: {st} {body[:100]!r}")
        expect(b"secret" not in body and b"inner" not in body and b"long" not in body,
               f"GET {path} answered a file: {body[:100]!r}")
        if st == 404 and path.startswith("/console/"):
            expect_headers(h, f"GET {path}")
        st, h, body = fetch(w, "HEAD", path)
        expect((st in (400, 404) or (st == 401 and not path.startswith("/console/"))) and body == b"",
               f"HEAD {path}: {st}")
    st, h, body = fetch(w, "POST", "/console/", body=b"x=1")
    expect(st == 405 and h.get("allow") == "GET, HEAD", f"POST: {st} {h}")
    expect_headers(h, "POST /console/")
    for method in ("PUT", "DELETE", "OPTIONS"):
        st, h, body = fetch(w, method, "/console/app.js")
        expect(st == 405, f"{method}: {st}")

    # a token is not needed, and a bad one changes nothing
    st, h, body = fetch(w, "GET", "/console/app.js", {"Authorization": "Bearer nonsense"})
    expect(st == 200, f"with a bad token: {st}")

    # ETag: 304 for a match, 200 once the file changes
    st, h, body = fetch(w, "GET", "/console/app.js")
    etag = h.get("etag")
    expect(etag and etag.startswith('"'), f"ETag: {h}")
    st, h, body = fetch(w, "GET", "/console/app.js", {"If-None-Match": etag})
    expect(st == 304 and body == b"", f"If-None-Match: {st} {body!r}")
    expect_headers(h, "304")
    st, h, body = fetch(w, "GET", "/console/app.js", {"If-None-Match": f'"x", {etag}'})
    expect(st == 304, f"If-None-Match in a list: {st}")
    st, h, body = fetch(w, "GET", "/console/app.js", {"If-None-Match": '"other"'})
    expect(st == 200, f"another ETag: {st}")
    with open(os.path.join(d, "app.js"), "w") as f:
        f.write("export const x = 2; // changed\n")
    st, h, body = fetch(w, "GET", "/console/app.js", {"If-None-Match": etag})
    expect(st == 200 and b"changed" in body and h.get("etag") != etag, f"changed file: {st} {body!r}")

    # the API keeps answering without CORS headers, whoever asks
    st, h, body = fetch(w, "GET", "/v1/devices", {"Authorization": f"Bearer {w.token}",
                                                  "Origin": "https://evil.example"})
    expect(st == 200 and not any(k.startswith("access-control-") for k in h), f"CORS: {st} {h}")
    st, h, body = fetch(w, "OPTIONS", "/v1/devices", {"Origin": "https://evil.example",
                                                      "Access-Control-Request-Method": "GET"})
    expect(not any(k.startswith("access-control-") for k in h), f"preflight: {st} {h}")


def test_console_off(w):
    """Console= empty: every /console URL answers 404; the API works."""
    w.start_cloud(extra="[API]\nConsole=\n")
    for path in ("/console/", "/console/index.html", "/console"):
        st, h, body = fetch(w, "GET", path)
        expect(st == 404, f"{path}: {st}")
    st, _ = api_json(w, "GET", "/v1/devices")
    expect(st == 200, f"API: {st}")


def test_access_token_current(w):
    """GET /v1/access_tokens/current: what the calling token may do,
    for a file token, a restricted one and one with an expiry; never the
    secret; 401 without a good token."""
    metrics = "metrics-token-for-the-test-0123456789"
    with open(w.path("metrics-tokens"), "w") as f:
        f.write(metrics + "\n")
    w.start_cloud(extra=f"[API]\nConsole=\nMetricsTokenFile={w.path('metrics-tokens')}\n")
    st, b = api_json(w, "GET", "/v1/access_tokens/current", token=metrics)
    expect(st == 200 and b["id"].startswith("metrics-") and b["scopes"] == ["metrics:read"] and
           b["name"] == "[API] MetricsTokenFile=", f"metrics token: {st} {b}")
    st, b = api_json(w, "GET", "/v1/access_tokens/current")
    expect(st == 200 and b.get("ok") is True and b["id"].startswith("file-") and b["scopes"] == ["admin"] and
           b["expires_at"] is None and b["devices"] is None and b["tags"] is None, f"file token: {st} {b}")
    expect(w.token not in json.dumps(b), "the secret in the answer")
    st, made = api_json(w, "POST", "/v1/tokens", {"name": XSS, "scopes": ["devices:read", "events:read"],
                                                  "devices": ["0123456789abcdef01234567"], "tags": ["site=b"],
                                                  "expires_in": 3600})
    expect(st in (200, 201), f"POST /v1/tokens: {st} {made}")
    secret = made.get("token") or made.get("access_token")
    expect(secret, f"no secret in {made}")
    st, b = api_json(w, "GET", "/v1/access_tokens/current", token=secret)
    expect(st == 200 and b["name"] == XSS and sorted(b["scopes"]) == ["devices:read", "events:read"] and
           b["devices"] == ["0123456789abcdef01234567"] and b["tags"] == ["site=b"] and
           re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", b["expires_at"] or ""), f"restricted: {st} {b}")
    expect(secret not in json.dumps(b), "the secret in the answer")
    for tok in ("nonsense", None):
        hdr = {"Authorization": f"Bearer {tok}"} if tok else {}
        st, h, body = fetch(w, "GET", "/v1/access_tokens/current", hdr)
        expect(st == 401, f"token {tok}: {st} {body!r}")
    st, h, body = fetch(w, "POST", "/v1/access_tokens/current", {"Authorization": f"Bearer {w.token}"}, b"")
    expect(st == 404, f"POST: {st}")


def test_console_static_check(w):
    """The console's code never builds HTML from strings, nor evaluates
    any (console/*.js)."""
    if not os.path.isdir(CONSOLE_SRC):
        raise Skip(f"no console in {CONSOLE_SRC}")
    bad = re.compile(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|\beval\s*\(|new\s+Function\b")
    found = []
    names = sorted(n for n in os.listdir(CONSOLE_SRC) if n.endswith(".js"))
    expect(names, f"no JS in {CONSOLE_SRC}")
    for n in names:
        with open(os.path.join(CONSOLE_SRC, n)) as f:
            for i, line in enumerate(f, 1):
                if bad.search(line):
                    found.append(f"{n}:{i}: {line.strip()}")
    expect(not found, "console code that builds HTML or evaluates strings:\n" + "\n".join(found))
    # every file of console/ is installed (Makefile.am's dist_console_DATA)
    with open(os.path.join(SRC, "Makefile.am")) as f:
        m = re.search(r"^dist_console_DATA =((?:.*\\\n)*.*)$", f.read(), re.M)
    expect(m, "no dist_console_DATA in Makefile.am")
    listed = set(re.findall(r"console/([^\s\\]+)", m.group(1)))
    present = set(n for n in os.listdir(CONSOLE_SRC) if not n.startswith("."))
    expect(listed == present, f"dist_console_DATA lists {sorted(listed - present)} not in console/, "
           f"and misses {sorted(present - listed)}")


def test_console_unreachable_names(w):
    """A device names its functions and variables: the console requests
    none whose /v1/devices/ID/NAME is no such path (console/api.js
    deviceNameReachable()): a browser drops the dot segments "." and "..",
    and the API keeps tunnel, logs, tunnels (and a GET of events, a stream
    that never ends) for itself. The routes checked on a real cloud, the
    function in node."""
    if not shutil.which("node"):
        raise Skip("node is not installed")
    w.start_cloud()
    dev = w.new_device()[0]
    for name, method, want in (("tunnel", "GET", 405), ("tunnels", "POST", 405), ("logs", "POST", 405)):
        status, _, _ = fetch(w, method, f"/v1/devices/{dev}/{name}", {"Authorization": f"Bearer {w.token}"})
        expect(status == want, f"{method} /v1/devices/ID/{name}: {status}, wanted {want}")
    c = http.client.HTTPConnection("127.0.0.1", w.api_port, timeout=seconds(10))
    c.request("GET", f"/v1/devices/{dev}/events", headers={"Authorization": f"Bearer {w.token}"})
    r = c.getresponse()
    expect(r.status == 200 and r.getheader("Content-Type", "").startswith("text/event-stream"),
           f"GET /v1/devices/ID/events: {r.status} {r.getheader('Content-Type')}")
    c.close()
    script = ("import { deviceNameReachable as r } from " + json.dumps("file://" + os.path.join(CONSOLE_SRC, "api.js"))
              + ";\nconst out = {};\nfor (const n of ['.', '..', 'tunnel', 'logs', 'tunnels', 'events', 'temp', "
              "'...', '.x', 'log', 'events2'])\n  out[n] = [r(n, false), r(n, true)];\n"
              "console.log(JSON.stringify(out));\n")
    res = subprocess.run(["node", "--input-type=module", "-e", script], capture_output=True, text=True,
                         timeout=seconds(30))
    expect(res.returncode == 0, f"node: {res.stderr}")
    got = json.loads(res.stdout)
    want = {".": [False, False], "..": [False, False], "tunnel": [False, False], "logs": [False, False],
            "tunnels": [False, False], "events": [True, False], "temp": [True, True], "...": [True, True],
            ".x": [True, True], "log": [True, True], "events2": [True, True]}
    expect(got == want, f"deviceNameReachable: {got}")
    # device.js asks deviceNameReachable() before each request built from a name.
    with open(os.path.join(CONSOLE_SRC, "device.js")) as f:
        src = f.read()
    expect(src.count("deviceNameReachable(name, false)") == 1 and src.count("deviceNameReachable(name, true)") == 2,
           "console/device.js: a function or variable request without deviceNameReachable()")


def browser_prerequisites():
    if not os.access(CHROMIUM, os.X_OK):
        raise Skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    if not shutil.which("node"):
        raise Skip("node is not installed")
    if not os.path.isdir(os.path.join(BROWSER_DIR, "node_modules", "puppeteer-core")):
        raise Skip(f"puppeteer-core is not installed: run npm ci in {BROWSER_DIR}")
    if not os.path.exists(os.path.join(CONSOLE_SRC, "index.html")):
        raise Skip(f"no console in {CONSOLE_SRC}")


def test_console_browser(w):
    """The console in chromium (tests/browser/console.test.mjs): login,
    fleet, a call, live events, tags, a campaign on two agents to
    committed, revocation, hostile text, scopes, CSP, no other origin,
    375 px; screenshots into TETHER_SCREENSHOTS (default the scratch
    directory)."""
    browser_prerequisites()
    import importlib
    campaign = importlib.import_module("test-campaign")
    from otakit import plugin_deb
    f = campaign.Fleet(w)
    for n in range(2):
        node = campaign.Node(f, n)
        # a string variable holding markup (the example plugin's label)
        node.extra = f"\n[Plugin example]\nLabel={XSS}\n"
        f.nodes.append(node)
    f.start_cloud(extra=f"[API]\nConsole={CONSOLE_SRC}\n")
    for node in f.nodes:
        node.start()
    a, b = f.nodes
    # names are [A-Za-z0-9_.-]: markup goes in B's notes and a tag value
    st, body = api_json(w, "PUT", f"/v1/devices/{b.id}", {"notes": XSS, "tags": {"note": XSS}})
    expect(st == 200, f"notes: {st} {body}")
    v2 = plugin_deb(f.debs, "2.0")
    manifest = f.manifest(v2, [a.id, b.id])
    mpath = w.path("campaign-manifest.json")
    with open(mpath, "w") as fh:
        fh.write(manifest)
    st, ro = api_json(w, "POST", "/v1/tokens", {"name": "read-only", "scopes": ["devices:read", "events:read",
                                                                                 "functions:call"]})
    expect(st in (200, 201), f"token: {st} {ro}")
    shots = os.environ.get("TETHER_SCREENSHOTS") or w.path("screenshots")
    os.makedirs(shots, exist_ok=True)
    env = dict(os.environ, TETHER_API=w.api, TETHER_TOKEN=w.token,
               TETHER_TOKEN_RO=ro.get("token") or ro.get("access_token"), TETHER_DEVICE_A=a.id,
               TETHER_DEVICE_B=b.id, TETHER_MANIFEST=mpath, TETHER_SCREENSHOTS=shots, TETHER_CHROMIUM=CHROMIUM,
               TETHER_TIMEOUT_MS=str(int(seconds(30) * 1000)), TETHER_XSS=XSS)
    r = subprocess.run(["node", os.path.join(BROWSER_DIR, "console.test.mjs")], env=env, cwd=BROWSER_DIR,
                       capture_output=True, text=True, timeout=seconds(240))
    for line in (r.stdout + r.stderr).splitlines():
        print(f"# {line}")
    expect(r.returncode == 0, f"console.test.mjs exited {r.returncode}")
    print(f"# screenshots in {shots}")


if __name__ == "__main__":
    sys.exit(run([test_console_files, test_console_off, test_access_token_current, test_console_static_check,
                  test_console_unreachable_names, test_console_browser], emulated="node and chromium are the build machine's"))
