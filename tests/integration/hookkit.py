# SPDX-License-Identifier: Apache-2.0
"""A webhook receiver for the tests and the benchmark: Python's
ThreadingHTTPServer, HTTPS with its own CA (made with openssl in the
test's scratch directory) or plain HTTP, that records every request,
checks its signature (X-Tether-Signature: sha256=HMAC-SHA256(secret,
body)), answers a status the test sets (200, 503...) and can be stopped
(listening socket and every open connection closed) and started again on
the same port."""

import hashlib
import hmac
import http.server
import json
import os
import socket
import ssl
import subprocess
import threading
import time

from harness import Failure, TIME_FACTOR


def make_pki(d):
    """A CA and a certificate for localhost and 127.0.0.1 it signed, in
    directory d: returns (ca.crt, server.crt, server.key)."""
    os.makedirs(d, exist_ok=True)
    ca_key, ca_crt = os.path.join(d, "ca.key"), os.path.join(d, "ca.crt")
    key, csr, crt = os.path.join(d, "server.key"), os.path.join(d, "server.csr"), os.path.join(d, "server.crt")
    ext = os.path.join(d, "server.ext")
    with open(ext, "w") as f:
        f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
                "basicConstraints=critical,CA:FALSE\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    for argv in (["openssl", "req", "-x509", *ec, "-keyout", ca_key, "-out", ca_crt, "-days", "2",
                  "-subj", "/CN=tether test webhook CA", "-addext", "basicConstraints=critical,CA:TRUE",
                  "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
                 ["openssl", "req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=localhost"],
                 ["openssl", "x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key, "-CAcreateserial",
                  "-out", crt, "-days", "2", "-extfile", ext]):
        r = subprocess.run(argv, capture_output=True, text=True)
        if r.returncode != 0:
            raise Failure(f"{' '.join(argv[:3])} failed: {r.stderr.strip()}")
    return ca_crt, crt, key


class Request:
    """One request as the receiver saw it."""

    def __init__(self, path, headers, body, status, sig_ok):
        self.path, self.headers, self.body, self.status, self.sig_ok = path, headers, body, status, sig_ok
        try:
            self.json = json.loads(body)
        except ValueError:
            self.json = None
        self.key = headers.get("Idempotency-Key")
        # Ticks of the receiver's clock (one counter for both): when the
        # body was read, and when the answer was begun.
        self.arrived = self.seq = 0

    def __repr__(self):
        return f"<{self.status} {self.key} {self.body[:120]!r}>"


class Receiver:
    """Records every request answered in .requests, in the order the
    answers were begun (not the order the handler threads get to record
    them: a thread can be descheduled between sending its answer and
    recording it, while the client already sent the next request on
    another connection and that one was recorded); answers .status (a
    number, or a function of the Request giving one). A request whose
    answer could not be written (the connection closed) is not recorded.
    keep=False
    stores no bodies (the benchmark): only .count and .delivered grow.
    .gate cleared holds every request unanswered until it is set again."""

    def __init__(self, secret, cert=None, key=None, port=0, keep=True):
        self.secret = secret.encode()
        self.ctx = None
        if cert:
            self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.ctx.load_cert_chain(cert, key)
        self.keep = keep
        # Cleared: requests wait (in flight, unanswered) until it is set.
        self.gate = threading.Event()
        self.gate.set()
        self.status = 200
        self.requests = []
        self.count = self.delivered = self.bad_signatures = self.ticks = 0
        self.cond = threading.Condition()
        self.conns = set()
        self.server = None
        self.port = port
        self.start()

    @property
    def url(self):
        return f"{'https' if self.ctx else 'http'}://localhost:{self.port}/hook"

    def start(self):
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as libcurl wants it
            # The status line and the body go out in two writes: without
            # this, Nagle's algorithm holds the body for the client's
            # delayed ACK (40 ms a request).
            disable_nagle_algorithm = True

            def do_POST(self):  # noqa: N802 - http.server's name
                n = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(n)
                receiver.handle(self, body)

            def log_message(self, *args):
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

            def finish_request(self, request, client_address):
                # The TLS handshake in the connection's thread, not in accept().
                with receiver.cond:
                    receiver.conns.add(request)
                conn = request
                try:
                    if receiver.ctx:
                        conn = receiver.ctx.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
                        with receiver.cond:
                            receiver.conns.discard(request)
                            receiver.conns.add(conn)
                        conn.do_handshake()
                    super().finish_request(conn, client_address)
                except (OSError, ssl.SSLError):
                    pass
                finally:
                    with receiver.cond:
                        receiver.conns.discard(conn)

            def handle_error(self, request, client_address):
                pass

        self.server = Server(("127.0.0.1", self.port), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def stop(self):
        """Close the listening socket and every connection: the port
        refuses connections until start()."""
        if not self.server:
            return
        self.server.shutdown()
        self.server.server_close()
        with self.cond:
            conns = list(self.conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.thread.join(10)
        self.server = None

    def handle(self, h, body):
        sig = h.headers.get("X-Tether-Signature", "")
        want = "sha256=" + hmac.new(self.secret, body, hashlib.sha256).hexdigest()
        sig_ok = hmac.compare_digest(sig, want)
        with self.cond:
            self.ticks += 1
            arrived = self.ticks
        self.gate.wait()
        with self.cond:
            status = self.status
            # The answer's place in .requests, taken before the answer
            # goes out: the client can send what depends on this answer
            # (the next event of a device) only after it, so its request
            # gets a later place even if this thread records later.
            self.ticks += 1
            seq = self.ticks
        if callable(status):
            status = status(body)
        req = Request(h.path, dict(h.headers), body, status, sig_ok)
        req.arrived, req.seq = arrived, seq
        h.send_response(status)
        h.send_header("Content-Length", "2")
        h.send_header("Content-Type", "text/plain")
        h.end_headers()
        h.wfile.write(b"ok")
        with self.cond:
            self.count += 1
            if not sig_ok:
                self.bad_signatures += 1
            if 200 <= status <= 299:
                self.delivered += 1
            if self.keep:
                i = len(self.requests)
                while i > 0 and self.requests[i - 1].seq > seq:
                    i -= 1
                self.requests.insert(i, req)
            self.cond.notify_all()

    def set_status(self, status):
        with self.cond:
            self.status = status

    def snapshot(self):
        with self.cond:
            return list(self.requests)

    def wait(self, pred, timeout, what):
        """Wait until pred(requests so far) is true (deadline: timeout
        times TIME_FACTOR); returns pred's value."""
        deadline = time.monotonic() + timeout * TIME_FACTOR
        with self.cond:
            while True:
                v = pred(self.requests)
                if v:
                    return v
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Failure(f"timed out waiting for {what}; the receiver got {len(self.requests)} requests, "
                                  f"the last {self.requests[-3:]}")
                self.cond.wait(min(left, 0.5))

    def close(self):
        self.stop()
