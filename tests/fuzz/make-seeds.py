#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Write the binary seed files of the fuzz corpora for the outbox and the
event journal (tests/fuzz/corpus/fuzz-{outbox,journal}/): small valid
files in the formats of agent/outbox.c and cloud/journal.c (both
versions: 1, as older daemons wrote them, and 2, whose events carry the
publish time or the receive time), and a few damaged ones. Run from
anywhere; the files are in the tree already."""

import os
import struct
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))


def record(magic, payload):
    length = struct.pack("<I", len(payload))
    crc = zlib.crc32(length + payload) & 0xffffffff
    return struct.pack("<I", magic) + length + struct.pack("<I", crc) + payload


def blob(b):
    return struct.pack("<I", len(b)) + b


OUTBOX = 0x31424f54  # "TOB1"
JOURNAL = 0x314a4354  # "TCJ1"


def outbox_event(seq, name, data, ttl=60, flags=0, time=None):
    tail = struct.pack("<Q", time) if time is not None else b""
    return record(OUTBOX, b"E" + struct.pack("<QII", seq, ttl, flags) + blob(name) + blob(data) + tail)


def outbox_files():
    head = record(OUTBOX, b"H" + bytes([1]) + struct.pack("<QQ", 0x0123456789abcdef, 1))
    ack = lambda h: record(OUTBOX, b"A" + struct.pack("<Q", h))  # noqa: E731
    events = b"".join(outbox_event(i, b"pump/n", str(i).encode()) for i in range(1, 6))
    yield "queue", head + ack(1) + events
    yield "acked", head + ack(1) + events + ack(4)
    yield "torn-tail", head + events + outbox_event(6, b"pump/n", b"6")[:20]
    middle = bytearray(head + events)
    middle[len(head) + 60] ^= 0xff
    yield "damaged-middle", bytes(middle)
    yield "no-header", events
    head2 = record(OUTBOX, b"H" + bytes([2]) + struct.pack("<QQ", 0x0123456789abcdef, 1))
    timed = b"".join(outbox_event(i, b"pump/n", str(i).encode(), time=1764064800000 + i) for i in range(1, 4))
    yield "queue-v2", head2 + ack(1) + timed + outbox_event(4, b"pump/n", b"4")


def journal_event(eid, coreid, epoch, seq, name, data, private=0, received_at=None):
    tail = blob(received_at) if received_at is not None else b""
    return record(JOURNAL, b"E" + struct.pack("<Q", eid) + blob(coreid) + struct.pack("<QQI", epoch, seq, 60) +
                  bytes([private]) + blob(b"2026-11-25T23:59:59.123Z") + blob(name) +
                  bytes([data is not None]) + blob(data or b"") + tail)


def journal_files():
    head = record(JOURNAL, b"H" + bytes([1]) + struct.pack("<QQ", 0x5f0c2a9e8d7b6a51, 1))
    state = record(JOURNAL, b"S" + blob(b"0a1b2c3d4e5f60718293a4b5") + struct.pack("<QQ", 7, 100))
    events = b"".join(journal_event(i, b"0a1b2c3d4e5f60718293a4b5", 7, 100 + i, b"room/light", b"on")
                      for i in range(1, 4))
    api = journal_event(4, b"api", 0, 0, b"cmd/all", None, 1)
    yield "journal", head + state + events + api
    yield "torn-tail", head + events + api[:30]
    damaged = bytearray(head + state + events)
    damaged[len(head) + len(state) + 40] ^= 0x55
    yield "damaged-middle", bytes(damaged)
    head2 = record(JOURNAL, b"H" + bytes([2]) + struct.pack("<QQ", 0x5f0c2a9e8d7b6a51, 1))
    received = b"".join(journal_event(i, b"0a1b2c3d4e5f60718293a4b5", 7, 100 + i, b"room/light", b"on",
                                      received_at=b"2026-11-26T00:10:00.000Z") for i in range(1, 3))
    yield "journal-v2", head2 + state + received + journal_event(3, b"api", 0, 0, b"cmd/all", b"x")


for target, files in (("fuzz-outbox", outbox_files()), ("fuzz-journal", journal_files())):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    for name, data in files:
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)
