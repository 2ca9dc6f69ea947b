"""bpf.decode.decode on records built field by field: every column says what the record said.

The decoder is vectorised (lookup tables by syscall number, dictionary columns by counting, no
sort when the records come in time order, headers gathered as 8-byte words or bytes); these
tests pack records with known values, the way both backends write them, and read them back.
"""

from __future__ import annotations

import os

import numpy as np

from cmtrace.record import records, syscalls
from cmtrace.record.bpf import decode
from cmtrace.record.records import Batch

OPENAT = syscalls.BY_NAME["openat"].nr
CLOSE = syscalls.BY_NAME["close"].nr
PIPE2 = syscalls.BY_NAME["pipe2"].nr
O_CLOEXEC = os.O_CLOEXEC


def record(ts: int, kind: int, nr: int, fd: int = -1, fd2: int = -1, err: int = 0,
           flags: int = 0, tail: bytes = b"", pid: int = 40) -> bytes:  # fmt: skip
    head = np.zeros(1, records.RECORD_HEADER)
    head["ts"], head["pid"], head["tid"], head["type"], head["nr"] = ts, pid, pid + 1, kind, nr
    head["fd"], head["fd2"], head["err"], head["flags"] = fd, fd2, err, flags
    head["stack_id"], head["datalen"] = 1000 + ts, len(tail)
    return head.tobytes() + tail


def batch_of(raw_records: list[bytes], misalign: int = 0) -> Batch:
    """Records laid out 8-byte aligned as both transports do (misalign: shift them off it)."""
    buf, offsets = bytearray(b"\0" * misalign), []
    for raw in raw_records:
        offsets.append(len(buf))
        buf += raw + b"\0" * (-len(raw) % 8)
    return Batch(bytes(buf), offsets)


LOOP = [
    record(100, records.EV_BIRTH, OPENAT, fd=3, flags=O_CLOEXEC, tail=b"/dev/null"),
    record(200, records.EV_CLOSE, CLOSE, fd=3),
    record(300, records.EV_FAIL, OPENAT, err=2, tail=b"/nonexistent"),
    record(400, records.EV_BIRTH, OPENAT, fd=4, tail=b"caf\xc3\xa9"),
    record(500, records.EV_EXEC, 59, tail=b"/usr/bin/python3"),
]


def test_every_column_of_a_loop():
    table = decode.decode(batch_of(LOOP), boot_ns=50).to_pydict()
    assert table["t_ns"] == [50, 150, 250, 350, 450]
    assert table["op"] == ["birth", "close", "fail", "birth", "exec"]
    assert table["syscall"] == ["openat", "close", "openat", "openat", "execve"]
    assert table["fd"] == [3, 3, -1, 4, -1]
    assert table["errno"] == [0, 0, 2, 0, 0]
    assert table["path"] == ["/dev/null", None, "/nonexistent", "café", "/usr/bin/python3"]
    assert table["kind"] == ["file", None, "file", "file", None]
    assert table["cloexec"] == [True, None, None, False, None]
    assert table["stack_id"] == [1100, 1200, 1300, 1400, 1500]
    assert table["pid"] == [40] * 5 and table["tid"] == [41] * 5


def test_unaligned_records_decode_the_same():
    aligned = decode.decode(batch_of(LOOP), boot_ns=0)
    assert decode.decode(batch_of(LOOP, misalign=3), boot_ns=0).equals(aligned)


def test_records_out_of_time_order_are_sorted():
    table = decode.decode(batch_of(LOOP[::-1]), boot_ns=0).to_pydict()
    assert table["t_ns"] == [100, 200, 300, 400, 500]
    assert table["path"][0] == "/dev/null"


def test_a_pipe_is_one_row_per_end_naming_its_peer():
    raw = [
        record(10, records.EV_BIRTH, PIPE2, fd=5, fd2=6),
        record(20, records.EV_CLOSE, CLOSE, fd=5),
    ]
    table = decode.decode(batch_of(raw), boot_ns=0).to_pydict()
    assert table["op"] == ["birth", "birth", "close"]
    assert sorted(zip(table["fd"][:2], table["src_fd"][:2])) == [(5, 6), (6, 5)]
    assert table["kind"][:2] == ["pipe", "pipe"]


def test_a_path_that_is_not_utf8_keeps_its_bytes_escaped():
    raw = [record(10, records.EV_BIRTH, OPENAT, fd=3, tail=b"/tmp/\xff"), *LOOP[1:2]]
    table = decode.decode(batch_of(raw), boot_ns=0).to_pydict()
    assert table["path"] == ["/tmp/\\xff", None]


def test_dictionaries_hold_only_the_values_present():
    table = decode.decode(batch_of(LOOP[:2]), boot_ns=0)
    assert sorted(table.column("op").chunk(0).dictionary.to_pylist()) == ["birth", "close"]
    assert sorted(table.column("syscall").chunk(0).dictionary.to_pylist()) == ["close", "openat"]
