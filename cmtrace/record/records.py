"""Python mirrors of probes/events.h: the records a recorder backend hands to user space.

Plain module-level constants, one place, so tests/unit/test_c_mirrors.py can compare every one
of them with what a C compiler says about the header. Both backends write these records (the
BPF probes through the ring buffer; the ptrace engine the same bytes through a pipe).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

# struct fd_event: the 64-byte header of every fd record, then `datalen` bytes of tail.
RECORD_HEADER: np.dtype[np.void] = np.dtype(
    [
        ("ts", "<u8"), ("pid", "<u4"), ("tid", "<u4"), ("type", "<u2"), ("nr", "<u2"),
        ("fd", "<i4"), ("fd2", "<i4"), ("err", "<i4"), ("flags", "<u8"), ("arg", "<u8"),
        ("stack_id", "<u8"), ("stack_flags", "<u4"), ("datalen", "<u4"),
    ]
)  # fmt: skip
HEADER_SIZE = RECORD_HEADER.itemsize  # 64
TYPE_OFFSET = 16  # offsetof(type) in every record, fd and Python alike

# enum event_type: fd records
EV_BIRTH, EV_CLOSE, EV_CLOSE_RANGE, EV_FAIL, EV_CLOEXEC, EV_ADDR, EV_FORK, EV_EXEC, EV_EXIT = range(
    1, 10
)
EV_CALL = 10  # --calls: an __enter__/__exit__ entry or return (decode_calls, not an fd event)

# Python records (probes/pystack.h): PY_REC_*
REC_STACK = 100
REC_CODE = 101
REC_GENS = 102  # the generator frames of the birth that follows (issue 13's liveness check)
PYTHON_RECORD_MIN_TYPE = REC_STACK  # PY_REC_MIN: fd records are below, Python records from here
PYTHON_RECORD_MAX_TYPE = REC_GENS  # the highest Python record type there is

# struct py_stack_rec: head, then `nframes` struct py_frame (code, instr)
STACK_HEAD = struct.Struct("<QIIHHIQII")
FRAME = struct.Struct("<QQ")
# struct py_code_rec: head, then fixed-size name, qualname, file and line table buffers
CODE_HEAD = struct.Struct("<QIIHHHHQIIiIIIIIII")
NAME_AT, QUALNAME_AT, FILE_AT, LINETABLE_AT = 72, 328, 584, 1608
# struct py_gens_rec: head, then PY_MAX_GENS words (frame index << 48 | generator address),
# then PY_MAX_GENS code object addresses; `ngens` of each are used
GENS_HEAD = struct.Struct("<QIIHHIQ")
MAX_GENS = 16  # PY_MAX_GENS
GEN_INDEX_SHIFT = 48  # PY_GEN_INDEX_SHIFT
GENS_AT = GENS_HEAD.size
GEN_CODES_AT = GENS_AT + 8 * MAX_GENS

# Bytes the kernel walker reads of each object (PY_TSTATE_READ, PY_FRAME_READ, PY_CODE_READ,
# PY_STR_HEAD) less 8: an offset names an 8-byte field read from that buffer, so this is the
# largest offset a layout may give.
READ_LIMITS = {"ts": 312, "frame": 104, "code": 152, "str": 32}
CONFIG_NO_OFFSET = 0xFFFF  # PY_NO_OFFSET: in struct py_config, a field this interpreter lacks

# enum settings_index: slots of the BPF `settings` array
SETTING_FOLLOW = 0  # follow children
SETTING_HOLD_PID = 1  # pid to stop at each exec
SETTING_HOLD_PYTHON = 2  # also stop followed processes that exec a python* image


@dataclass
class Batch:
    """fd records read together (from the ring buffer, or the ptrace engine's pipe): their
    payloads start at `offsets` inside `buf`. cmtrace.record.bpf.decode turns one into Arrow."""

    buf: bytes
    offsets: list[int] | np.ndarray
    _headers: np.ndarray | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.offsets)

    def headers(self) -> np.ndarray:
        """The fixed 64-byte headers of the records (RECORD_HEADER), gathered once."""
        if self._headers is None:
            self._headers = gather_headers(self.buf, np.asarray(self.offsets, np.int64))
        return self._headers


_HEADER_BYTES = np.arange(HEADER_SIZE)
_HEADER_WORDS = np.arange(HEADER_SIZE // 8)


def gather_headers(buf: bytes, offsets: np.ndarray) -> np.ndarray:
    """RECORD_HEADER rows of the records at `offsets` in one numpy gather: of 8-byte words
    when every record is 8-byte aligned (both transports align them), else of bytes."""
    if not len(offsets):
        return np.zeros(0, RECORD_HEADER)
    whole_words = len(buf) // 8
    if not (offsets & 7).any() and int(offsets.max()) + HEADER_SIZE <= whole_words * 8:
        words = np.frombuffer(buf, "<u8", count=whole_words)
        rows = words[(offsets >> 3)[:, None] + _HEADER_WORDS]
    else:
        rows = np.frombuffer(buf, np.uint8)[offsets[:, None] + _HEADER_BYTES]
    headers: np.ndarray = rows.reshape(-1).view(RECORD_HEADER)
    return headers
