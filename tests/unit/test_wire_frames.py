"""wire.split_frames: the vectorised cut of the ptrace engine's stream equals the sequential one.

The engine frames each record as the BPF ring buffer does (u32 payload length, u32 zero, the
payload padded to 8 bytes). split_frames guesses the frame headers from their looks and checks
the chain; these tests build streams of real record layouts, including payloads that contain
bytes looking like frame headers and records whose header does not look like one, and compare
every cut with a plain loop over the frames that follows the definition of the framing.
"""

from __future__ import annotations

import random
import struct

import numpy as np
import pytest

from cmtrace.record import records
from cmtrace.record.ptrace import wire


def sequential_split(buf: bytes) -> tuple[int, list[int], list[bytes]]:
    """The framing by its definition: one frame after the other from the start."""
    pos, fd_offsets, python_records = 0, [], []
    while pos + wire.FRAME_HEADER <= len(buf):
        (length,) = struct.unpack_from("<I", buf, pos)
        framed = wire.FRAME_HEADER + ((length + 7) & ~7)
        if pos + framed > len(buf):
            break
        payload = pos + wire.FRAME_HEADER
        (kind,) = struct.unpack_from("<H", buf, payload + records.TYPE_OFFSET)
        if kind >= records.PYTHON_RECORD_MIN_TYPE:
            python_records.append(buf[payload : payload + length])
        else:
            fd_offsets.append(payload)
        pos += framed
    return pos, fd_offsets, python_records


def frame(payload: bytes) -> bytes:
    padding = b"\0" * (-len(payload) % 8)
    return struct.pack("<II", len(payload), 0) + payload + padding


def fd_record(kind: int, tail: bytes, datalen: int | None = None, fd: int = 3) -> bytes:
    head = np.zeros(1, records.RECORD_HEADER)
    head["ts"], head["pid"], head["tid"], head["type"], head["nr"] = 10, 7, 7, kind, 257
    head["fd"], head["datalen"] = fd, len(tail) if datalen is None else datalen
    return head.tobytes() + tail


def stack_record(frames: list[tuple[int, int]]) -> bytes:
    head = records.STACK_HEAD.pack(5, 7, 7, records.REC_STACK, len(frames), 0, 99, 1, 0)
    return head + b"".join(records.FRAME.pack(code, instr) for code, instr in frames)


def code_record(linetable: bytes) -> bytes:
    head = records.CODE_HEAD.pack(5, 7, 7, records.REC_CODE, 1, 1, 1, 0xABC, 1, 0, 1, 0, 0,
                                  0, 0, 0, len(linetable), len(linetable))  # fmt: skip
    body = bytearray(records.LINETABLE_AT + 64)
    body[: len(head)] = head
    body[records.LINETABLE_AT : records.LINETABLE_AT + len(linetable)] = linetable
    return bytes(body)


def looks_like_a_header() -> bytes:
    """Bytes that pass every check of wire._header_slots when they sit at an 8-byte slot."""
    return frame(fd_record(records.EV_CLOSE, b""))[:80]


def random_stream(rng: random.Random, count: int) -> bytes:
    parts = []
    for _ in range(count):
        choice = rng.random()
        if choice < 0.5:
            tail = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40)))
            parts.append(frame(fd_record(rng.choice([1, 2, 4, 7, 8, 9]), tail)))
        elif choice < 0.6:  # a path whose bytes are a whole frame header (and more)
            parts.append(frame(fd_record(records.EV_BIRTH, b"\0" * 4 + looks_like_a_header())))
        elif choice < 0.7:  # a record whose datalen does not say its length
            parts.append(frame(fd_record(records.EV_BIRTH, b"abc", datalen=1)))
        elif choice < 0.85:
            frames = [(rng.getrandbits(48), rng.randrange(400)) for _ in range(rng.randrange(6))]
            parts.append(frame(stack_record(frames)))
        else:
            parts.append(frame(code_record(looks_like_a_header() + rng.randbytes(9))))
    return b"".join(parts)


def assert_same_cut(buf: bytes) -> None:
    used, offsets, python_records = wire.split_frames(buf)
    expected = sequential_split(buf)
    assert (used, list(offsets), python_records) == expected


@pytest.mark.parametrize("seed", range(20))
def test_a_stream_is_cut_as_the_sequential_parse(seed):
    buf = random_stream(random.Random(seed), 200)
    assert_same_cut(buf)
    used, offsets, python_records = wire.split_frames(buf)
    assert used == len(buf)
    assert len(offsets) + len(python_records) == 200


@pytest.mark.parametrize("seed", range(5))
def test_a_stream_cut_anywhere_leaves_the_incomplete_frame(seed):
    buf = random_stream(random.Random(100 + seed), 12)
    for end in range(len(buf) + 1):
        assert_same_cut(buf[:end])


def test_fake_headers_in_every_payload_change_nothing():
    fake = looks_like_a_header()
    buf = b"".join(frame(fd_record(records.EV_BIRTH, fake * 3)) for _ in range(50))
    used, offsets, python_records = wire.split_frames(buf)
    assert used == len(buf) and len(offsets) == 50 and python_records == []
    assert_same_cut(buf)


def test_nothing_and_a_lone_header():
    assert_same_cut(b"")
    assert_same_cut(struct.pack("<II", 64, 0))
    used, offsets, python_records = wire.split_frames(struct.pack("<II", 64, 0))
    assert (used, len(offsets), python_records) == (0, 0, [])


def test_fd_offsets_point_at_the_records():
    tails = [b"/dev/null", b"", b"/tmp/x\xff"]
    buf = b"".join(
        frame(fd_record(records.EV_BIRTH, tail, fd=10 + i)) for i, tail in enumerate(tails)
    )
    _used, offsets, _python = wire.split_frames(buf)
    heads = records.gather_headers(buf, np.asarray(offsets))
    assert heads["fd"].tolist() == [10, 11, 12]
    assert heads["datalen"].tolist() == [len(t) for t in tails]
