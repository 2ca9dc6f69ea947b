"""cmtrace.record.generators: PY_REC_GENS records joined to the births they precede, from
records built byte for byte as probes/events.h lays them out (records.GENS_HEAD), decoded fd
records alike (decode.decode of a Batch)."""

from __future__ import annotations

import struct

import numpy as np

from cmtrace.record import records
from cmtrace.record.bpf import decode
from cmtrace.record.generators import BirthGenerators, split_word

PID, TID = 41, 42


def gens_record(ts: int, stack: int, pairs: list[tuple[int, int, int]], tid: int = TID) -> bytes:
    """(frame index, generator address, code) per generator frame."""
    words = [index << records.GEN_INDEX_SHIFT | address for index, address, _ in pairs]
    codes = [code for _, _, code in pairs]
    pad = [0] * (records.MAX_GENS - len(pairs))
    head = records.GENS_HEAD.pack(ts, PID, tid, records.REC_GENS, len(pairs), 0, stack)
    return head + struct.pack(f"<{2 * records.MAX_GENS}Q", *words, *pad, *codes, *pad)


def fd_record(ts: int, etype: int, fd: int, stack: int, tid: int = TID) -> bytes:
    header = np.zeros(1, records.RECORD_HEADER)
    header[0] = (ts, PID, tid, etype, 257, fd, -1, 0, 0, 0, stack, 0, 0)
    return header.tobytes()


def batch(*raw: bytes) -> records.Batch:
    offsets, at = [], 0
    for r in raw:
        offsets.append(at)
        at += len(r)
    return records.Batch(b"".join(raw), offsets)


def generators_of(table) -> dict[int, list[int] | None]:
    return dict(zip(table.column("fd").to_pylist(), table.column("generators").to_pylist()))


def test_each_birth_gets_the_record_just_before_it() -> None:
    """One stack, two generator objects: each birth has its own, not the latest."""
    joiner = BirthGenerators()
    joiner.note(gens_record(100, 7, [(0, 0xA000, 0xC0DE)]))
    joiner.note(gens_record(300, 7, [(0, 0xB000, 0xC0DE)]))
    table = decode.decode(
        batch(fd_record(110, records.EV_BIRTH, 5, 7), fd_record(200, records.EV_CLOSE, 3, 0),
              fd_record(310, records.EV_BIRTH, 6, 7)), boot_ns=0)  # fmt: skip
    got = generators_of(joiner.attach(table, boot_ns=0))
    assert [split_word(w) for w in got[5]] == [(0, 0xA000)]
    assert [split_word(w) for w in got[6]] == [(0, 0xB000)]
    assert got[3] is None
    assert sorted(joiner.wanted()) == [(PID, 7, 0xA000, 0xC0DE), (PID, 7, 0xB000, 0xC0DE)]


def test_a_record_whose_birth_was_lost_is_dropped() -> None:
    """The thread's next fd record is not a birth of that stack: the record is not its."""
    joiner = BirthGenerators()
    joiner.note(gens_record(100, 7, [(1, 0xA000, 0xC0DE)]))
    table = decode.decode(
        batch(fd_record(120, records.EV_CLOSE, 5, 7), fd_record(130, records.EV_BIRTH, 6, 7)),
        boot_ns=0,
    )
    assert generators_of(joiner.attach(table, boot_ns=0)) == {5: None, 6: None}


def test_the_birth_may_come_in_the_next_drain() -> None:
    joiner = BirthGenerators()
    joiner.note(gens_record(1_000, 9, [(2, 0xA000, 0xC0DE)]))
    other_thread = decode.decode(batch(fd_record(1_100, records.EV_BIRTH, 4, 9, tid=43)), 0)
    assert generators_of(joiner.attach(other_thread, boot_ns=0)) == {4: None}
    later = decode.decode(batch(fd_record(1_200, records.EV_BIRTH, 8, 9)), boot_ns=500)
    (words,) = generators_of(joiner.attach(later, boot_ns=500)).values()
    assert [split_word(w) for w in words] == [(2, 0xA000)]
