# SPDX-License-Identifier: Apache-2.0
"""A scriptable device for protocol-level tests of tether-cloudd: CoAP over
TLS over TCP (RFC 8323) written out by hand with Python's ssl module, so a
test can do what tetherd never would (stop reading, send garbage, answer
late or not at all) and see every byte the cloud sends.

Every read has a deadline; nothing sleeps.
"""

import json
import socket
import ssl
import time

from harness import SLOW, WRAPPER, Failure

# Codes (class << 5 | detail).
def code(c, d):
    return (c << 5) | d


GET, POST = code(0, 1), code(0, 2)
CREATED, CHANGED, CONTENT = code(2, 1), code(2, 4), code(2, 5)
CSM, PING, PONG = code(7, 1), code(7, 2), code(7, 3)

# Option numbers.
OBSERVE, URI_PATH, CONTENT_FORMAT, MAX_AGE, URI_QUERY = 6, 11, 12, 14, 15
CSM_MAX_MESSAGE_SIZE = 2

DEFAULT_DESCRIBE = {"agent": "fakedev", "version": "0", "plugins": [], "functions": ["f"],
                    "variables": {"v": "int32"}}


def codestr(c):
    return f"{c >> 5}.{c & 31:02d}"


def uint(v):
    """CoAP uint option value: shortest big-endian, empty for 0."""
    return v.to_bytes((v.bit_length() + 7) // 8, "big")


def enc_opts(opts):
    out = b""
    last = 0
    for num, val in sorted(opts, key=lambda o: o[0]):
        delta = num - last
        last = num

        def nib(v):
            if v < 13:
                return v, b""
            if v < 269:
                return 13, bytes([v - 13])
            return 14, (v - 269).to_bytes(2, "big")
        dn, de = nib(delta)
        ln, le = nib(len(val))
        out += bytes([(dn << 4) | ln]) + de + le + val
    return out


def frame(c, token=b"", opts=(), payload=b""):
    """One RFC 8323 message."""
    body = enc_opts(list(opts))
    if payload:
        body += b"\xff" + payload
    n = len(body)
    if n < 13:
        hdr = bytes([(n << 4) | len(token)])
    elif n < 269:
        hdr = bytes([(13 << 4) | len(token), n - 13])
    elif n < 65805:
        hdr = bytes([(14 << 4) | len(token)]) + (n - 269).to_bytes(2, "big")
    else:
        hdr = bytes([(15 << 4) | len(token)]) + (n - 65805).to_bytes(4, "big")
    return hdr + bytes([c]) + token + body


def path_opts(path):
    """"e/room/light" -> Uri-Path options; a trailing '/' gives an empty last segment."""
    return [(URI_PATH, seg.encode()) for seg in path.split("/")] if path else []


class Msg:
    def __init__(self, c, token, opts, payload):
        self.code, self.token, self.opts, self.payload = c, token, opts, payload

    def opt(self, num):
        return [v for n, v in self.opts if n == num]

    @property
    def path(self):
        return "/".join(v.decode(errors="replace") for v in self.opt(URI_PATH))

    def json(self):
        return json.loads(self.payload)

    def __repr__(self):
        return (f"Msg({codestr(self.code)} tok={self.token.hex()} path={self.path!r} "
                f"payload={self.payload[:80]!r})")


def tls_context(cert, key, ca, max_version=None):
    ctx = ssl.create_default_context(cafile=ca)
    ctx.check_hostname = False
    if cert:  # none: an anonymous client (enrollment)
        ctx.load_cert_chain(cert, key)
    if max_version:
        ctx.maximum_version = max_version
    return ctx


class Device:
    """One TLS connection to the cloud, speaking as the certificate's device.

    recv() answers the cloud's Pings by itself (auto_pong) unless told not
    to, so a test that is busy elsewhere still counts as alive."""

    def __init__(self, port, cert=None, key=None, ca=None, host="127.0.0.1", ctx=None, session=None,
                 rcvbuf=None, timeout=10):
        self.ctx = ctx or tls_context(cert, key, ca)
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        raw.settimeout(timeout * SLOW)
        raw.connect((host, port))
        self.s = self.ctx.wrap_socket(raw, session=session)
        self.buf = b""
        self.auto_pong = True
        self.pings = 0
        self.next_token = 1

    def close(self):
        try:
            self.s.close()
        except OSError:
            pass

    def send(self, data):
        self.s.sendall(data)

    def token(self):
        t = self.next_token.to_bytes(4, "big")
        self.next_token += 1
        return t

    def _need(self, n, deadline):
        while len(self.buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Failure(f"device: no message from the cloud in time ({len(self.buf)} bytes buffered)")
            self.s.settimeout(left)
            try:
                d = self.s.recv(65536)
            except socket.timeout:
                continue
            if not d:
                raise EOFError("the cloud closed the connection")
            self.buf += d

    def recv_raw(self, timeout=10):
        """The next message, Pings included."""
        deadline = time.monotonic() + timeout * SLOW
        self._need(1, deadline)
        b0 = self.buf[0]
        ln, tkl = b0 >> 4, b0 & 15
        ext = {13: 1, 14: 2, 15: 4}.get(ln, 0)
        self._need(1 + ext, deadline)
        if ln == 13:
            ln = self.buf[1] + 13
        elif ln == 14:
            ln = int.from_bytes(self.buf[1:3], "big") + 269
        elif ln == 15:
            ln = int.from_bytes(self.buf[1:5], "big") + 65805
        total = 1 + ext + 1 + tkl + ln
        self._need(total, deadline)
        m = self.buf[:total]
        self.buf = self.buf[total:]
        p = 1 + ext
        c = m[p]
        tok = m[p + 1:p + 1 + tkl]
        rest = m[p + 1 + tkl:]
        opts, num, i = [], 0, 0
        while i < len(rest):
            if rest[i] == 0xFF:
                i += 1
                break
            d, length = rest[i] >> 4, rest[i] & 15
            i += 1
            vals = []
            for v in (d, length):
                if v == 13:
                    v = rest[i] + 13
                    i += 1
                elif v == 14:
                    v = int.from_bytes(rest[i:i + 2], "big") + 269
                    i += 2
                vals.append(v)
            num += vals[0]
            opts.append((num, rest[i:i + vals[1]]))
            i += vals[1]
        return Msg(c, tok, opts, rest[i:])

    def recv(self, timeout=10):
        """The next message other than a Ping (answered if auto_pong)."""
        deadline = time.monotonic() + timeout * SLOW
        while True:
            m = self.recv_raw(max(deadline - time.monotonic(), 0.001) / SLOW)
            if m.code == PING:
                self.pings += 1
                if self.auto_pong:
                    self.send(frame(PONG))
                continue
            return m

    def wait_for(self, pred, timeout=10, what="message", seen=None):
        """Read until pred(msg); other messages are appended to seen."""
        deadline = time.monotonic() + timeout * SLOW
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Failure(f"device: timed out waiting for {what}")
            m = self.recv(left / SLOW)
            if pred(m):
                return m
            if seen is not None:
                seen.append(m)

    def handshake(self, describe=None, answer_describe=True, max_message_size=8 * 1024 * 1024):
        """Send our CSM; wait for the cloud's GET /d and answer it (unless
        told not to). Returns the GET /d request."""
        self.send(frame(CSM, b"", [(CSM_MAX_MESSAGE_SIZE, uint(max_message_size))]))
        m = self.wait_for(lambda m: m.code == GET and m.path == "d", what="GET /d")
        if answer_describe:
            self.answer(m, CONTENT, json.dumps(describe or DEFAULT_DESCRIBE).encode(), cf=50)
        return m

    def answer(self, req, c, payload=b"", cf=None):
        opts = [(CONTENT_FORMAT, uint(cf))] if cf is not None else []
        self.send(frame(c, req.token, opts, payload))

    def request(self, c, path, payload=b"", opts=(), token=None, query=()):
        """Send a request; returns its token."""
        token = token if token is not None else self.token()
        allopts = path_opts(path) + list(opts) + [(URI_QUERY, q.encode()) for q in query]
        self.send(frame(c, token, allopts, payload))
        return token

    def response(self, token, timeout=10, seen=None):
        return self.wait_for(lambda m: m.token == token and 2 <= (m.code >> 5) <= 5, timeout,
                             f"response to token {token.hex()}", seen)

    def publish(self, name, data=b"", ttl=None, private=False):
        opts = [(MAX_AGE, uint(ttl))] if ttl is not None else []
        t = self.request(POST, "e/" + name, data, opts, query=("private",) if private else ())
        return self.response(t)

    def subscribe(self, prefix, token=None):
        token = token or self.token()
        self.request(GET, "e/" + prefix if prefix else "e", opts=[(OBSERVE, b"")], token=token)
        return self.response(token), token

    def unsubscribe(self, prefix, token):
        self.request(GET, "e/" + prefix if prefix else "e", opts=[(OBSERVE, uint(1))], token=token)
        return self.response(token)


def connect(w, device=None, describe=None, **kw):
    """A fake device connected to the cloud of World w, described and
    online (X_TETHER_ONLINE seen). device is (id, cert, key) or None for a
    new one. Returns (Device, id)."""
    dev_id, cert, key = device or w.new_device()
    mark = w.notify.mark()
    d = Device(w.coap_port, cert, key, w.path("pki", "ca.crt"), **kw)
    d.handshake(describe)
    w.wait_online(dev_id, mark)
    d.id, d.cert, d.key = dev_id, cert, key
    return d, dev_id


# What a refused session raises, whichever side of the handshake sees it.
REFUSALS = (ssl.SSLError, EOFError, ConnectionError, OSError, Failure)


def refused(w, cert, key):
    """Try a session with cert; True if the cloud refused it (TLS 1.3:
    the refusal arrives after the client's side of the handshake, so it
    may come only with the CSM)."""
    try:
        d = Device(w.coap_port, cert, key, w.path("pki", "ca.crt"))
    except REFUSALS:
        return True
    try:
        d.handshake()
        return False
    except REFUSALS:
        return True
    finally:
        d.close()


def notifications(d, token, until, timeout=10):
    """Event notifications on subscription token until one named until;
    returns their event names, in order."""
    seen = []
    d.wait_for(lambda m: m.token == token and m.code == CONTENT and m.payload and m.json()["name"] == until,
               timeout, f"notification '{until}'", seen)
    return [m.json()["name"] for m in seen if m.token == token and m.payload] + [until]


def max_age(m):
    """A response's Max-Age in seconds (0 when it has none)."""
    return int.from_bytes(m.opt(MAX_AGE)[0], "big") if m.opt(MAX_AGE) else 0


def rss_kb(pid, field="VmRSS"):
    """Resident memory of a process, kB; field="VmHWM": its peak so far."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise Failure(f"no {field} for {pid}")


def memory_checks(pid):
    """False where memory figures mean nothing: under a wrapper
    (TETHER_TEST_WRAPPER, e.g. valgrind) or in a sanitizer build."""
    if WRAPPER:
        return False
    with open(f"/proc/{pid}/maps") as f:
        return not any("libasan" in line for line in f)
