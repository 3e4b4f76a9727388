#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""CoAP messages split over tiny TLS records (docs/design/libcoap.md, "Trap C:
a header split over TLS records"): a device that sends each byte as its own
TLS record, or cuts a message's header at any position, is answered, and the
session keeps answering what follows.

The device is fakedev.Device with its TLS done through ssl.MemoryBIO, so the
test sees the bytes of every record it writes (and checks that one write is
one record) and can wait until the cloud has read each record before it
sends the next, which makes the cloud read them one by one, on every run."""

import os
import socket
import ssl
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import SLOW, Failure, expect, run, server_connections  # noqa: E402
from fakedev import CHANGED, CREATED, POST, Device, code, codestr, frame, path_opts, tls_context  # noqa: E402

APPLICATION_DATA = 23
MAX_RECORD = 16384
REQUEST_ENTITY_TOO_LARGE = code(4, 13)


class RecordDevice(Device):
    """A Device whose send() writes the TLS records that self.cut chooses:
    cut(data) returns the lengths of the records to write data in (None:
    one record). With self.sync, each record is written only once the cloud
    has read the one before from its socket."""

    def __init__(self, port, cert, key, ca, timeout=10):
        self.port = port
        self.raw = socket.create_connection(("127.0.0.1", port), timeout * SLOW)
        self.raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.peer = "%s:%d" % self.raw.getsockname()
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = tls_context(cert, key, ca).wrap_bio(self.incoming, self.outgoing)
        self.sent = 0
        self.records = 0
        deadline = time.monotonic() + timeout * SLOW
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                self._fill(deadline)
        self._flush()
        self.buf = b""
        self.auto_pong = True
        self.pings = 0
        self.next_token = 1
        self.cut = None
        self.sync = False

    def close(self):
        self.raw.close()

    def _flush(self):
        data = self.outgoing.read()
        if data:
            self.raw.sendall(data)
            self.sent += len(data)

    def _fill(self, deadline):
        left = deadline - time.monotonic()
        if left <= 0:
            raise Failure(f"device: no data from the cloud in time ({len(self.buf)} bytes buffered)")
        self.raw.settimeout(left)
        try:
            d = self.raw.recv(65536)
        except socket.timeout:
            return
        if not d:
            raise EOFError("the cloud closed the connection")
        self.incoming.write(d)

    def _need(self, n, deadline):
        while len(self.buf) < n:
            try:
                d = self.tls.read(65536)
                if not d:
                    raise EOFError("the cloud closed the TLS session")
                self.buf += d
            except ssl.SSLWantReadError:
                self._fill(deadline)
            except ssl.SSLZeroReturnError:
                raise EOFError("the cloud closed the TLS session")

    def record(self, data):
        """Write data as one TLS record (checked; as few as TLS allows
        over 16 KiB) and send it."""
        self.tls.write(data)
        out = self.outgoing.read()
        n, i = 0, 0
        while i + 5 <= len(out) and out[i] == APPLICATION_DATA:
            i += 5 + int.from_bytes(out[i + 3:i + 5], "big")
            n += 1
        want = (len(data) + MAX_RECORD - 1) // MAX_RECORD
        expect(i == len(out) and n == want,
               f"one write of {len(data)} bytes made {n} records, not {want}: {out[:16].hex()}…")
        self.raw.sendall(out)
        self.sent += len(out)
        self.records += n
        if self.sync:
            self.wait_read()

    def wait_read(self, timeout=10):
        """Until the cloud has read every byte we sent from its socket."""
        deadline = time.monotonic() + timeout * SLOW
        while True:
            got, unread = server_connections(self.port).get(self.peer, (-1, -1))
            if got == self.sent and unread == 0:
                return
            if time.monotonic() > deadline:
                raise Failure(f"the cloud did not read our {self.sent} bytes (kernel: received {got}, "
                              f"unread {unread})")
            time.sleep(0.005)

    def send(self, data):
        lengths = self.cut(data) if self.cut else None
        if not lengths:
            self.record(data)
            return
        expect(sum(lengths) == len(data), f"cut {lengths} does not cover {len(data)} bytes")
        i = 0
        for n in lengths:
            self.record(data[i:i + n])
            i += n


def bytewise(data):
    return [1] * len(data)


def connect_records(w, cut=None, sync=True):
    """A RecordDevice online at the cloud of World w; its CSM and its
    answer to GET /d go out cut by cut."""
    dev_id, cert, key = w.new_device()
    mark = w.notify.mark()
    d = RecordDevice(w.coap_port, cert, key, w.path("pki", "ca.crt"))
    d.cut, d.sync = cut, sync
    d.handshake()
    w.wait_online(dev_id, mark)
    d.cut, d.sync = None, False
    return d, dev_id


def publish_answered(d, name, payload, want=(CREATED, CHANGED)):
    m = d.publish(name, payload)
    expect(m.code in want, f"publish {name} ({len(payload)} bytes): {codestr(m.code)} {m.payload[:80]!r}")


def later_requests_answered(d, n=5):
    """The session still answers whole messages afterwards."""
    for i in range(n):
        publish_answered(d, f"after/{i}", b"x" * (10 + 40 * i))


def header_size(msg):
    return 2 + {13: 1, 14: 2, 15: 4}.get(msg[0] >> 4, 0)


def test_one_byte_per_record(w):
    """Every byte of the CSM, the GET /d answer and requests with 2-, 3-
    and 4-byte headers is its own TLS record, each read by the cloud before
    the next is sent."""
    w.start_cloud()
    d, _ = connect_records(w, cut=bytewise, sync=True)
    d.cut, d.sync = bytewise, True
    for size in (5, 13, 40, 300):
        publish_answered(d, f"bytewise/{size}", b"p" * size)
    records, pongs = d.records, d.pings
    d.cut, d.sync = None, False
    later_requests_answered(d)
    # The cloud's Pings are answered in records of their own.
    expect(d.records - (d.pings - pongs) == records + 5,
           f"{d.records - records} records for 5 whole requests and {d.pings - pongs} Pong(s)")
    d.close()


def test_one_byte_per_record_back_to_back(w):
    """The same records written without waiting: the cloud may read
    several at once."""
    w.start_cloud()
    d, _ = connect_records(w, cut=bytewise, sync=False)
    d.cut = bytewise
    for size in (5, 13, 40, 300):
        publish_answered(d, f"burst/{size}", b"p" * size)
    d.cut = None
    later_requests_answered(d)
    d.close()


def test_header_split_at_each_position(w):
    """For headers of 2, 3, 4 and 6 bytes, a record boundary at each
    position in the header (the rest of the message in one record), and
    every header byte in a record of its own; each followed by whole
    requests."""
    w.start_cloud()
    d, _ = connect_records(w)
    d.sync = True
    headers = set()
    for size in (1, 20, 400, 66000):
        msg = frame(POST, b"\x00\x00\x00\x01", path_opts("e/s"), b"s" * size)
        h = header_size(msg)
        cuts = [[pos, len(msg) - pos] for pos in range(1, h + 1)]
        cuts.append([1] * (h + 1) + [len(msg) - h - 1])
        for cut in cuts:
            d.cut = lambda data, cut=cut: cut if len(data) == len(msg) else None
            # Over MaxPayload (66000 bytes) the answer is 4.13, which shows as well that the message was read whole.
            want = (CREATED, CHANGED) if size <= 16384 else (REQUEST_ENTITY_TOO_LARGE,)
            publish_answered(d, "s", b"s" * size, want)
            d.cut = None
            publish_answered(d, "split/after", b"a" * 30)
        print(f"# header of {h} bytes: {len(cuts)} cuts answered")
        headers.add(h)
    expect(headers == {2, 3, 4, 6}, f"header sizes tried: {sorted(headers)}")
    d.close()


if __name__ == "__main__":
    sys.exit(run([test_one_byte_per_record, test_one_byte_per_record_back_to_back,
                  test_header_split_at_each_position], emulated="ok"))
