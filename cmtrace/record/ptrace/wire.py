"""What the ptrace engine and Python exchange: probes/events.h's control messages and framing.

The engine writes the records of the BPF ring buffer (struct fd_event, py_stack_rec,
py_code_rec), each after an 8-byte header (u32 payload length, u32 zero) and padded to 8 bytes,
as the ring buffer lays them out; `split_frames` cuts a stream into them. Python sends
`struct ctl_msg` (kind, pid, struct py_config) on the control pipe and then SIGUSR1.
tests/unit/test_c_mirrors.py checks every layout here against the header.
"""

from __future__ import annotations

import ctypes
import struct

import numpy as np

from cmtrace.record import records

CTL_CONFIG, CTL_FORGET, CTL_RESUME, CTL_STOP, CTL_HOLD_NEXT = 1, 2, 3, 4, 5
FRAME_HEADER = 8
PYTHON_RECORD_MIN_TYPE = records.PYTHON_RECORD_MIN_TYPE
_FRAME_HEAD = struct.Struct("<II")
_TYPE_AT = 16  # the payload's `type` (u16), in every record kind

_U64 = ("interp_head_addr", "finalizing_addr", "code_type", "none_addr", "pidns_dev",
        "pidns_ino", "code_tag_mask")  # fmt: skip
_U8 = ("frames", "match_native_tid", "owner_not_python", "owner_generator")
_U16 = (
    "interp_next", "interp_threads_head", "ts_next", "ts_thread_id", "ts_native_thread_id",
    "ts_frame", "cframe_current_frame", "ts_chunk", "ts_top", "chunk_data", "fr_code",
    "fr_previous", "fr_instr", "fr_owner", "fr_globals", "co_flags", "co_firstlineno",
    "co_argcount", "co_filename", "co_name", "co_qualname", "co_linetable", "ob_type",
    "bytes_size", "bytes_data", "str_length", "str_state", "str_ascii", "str_compact",
    "ts_exception", "fr_gen", "gen_iframe",
)  # fmt: skip


class PyConfig(ctypes.Structure):
    """struct py_config: the walker configuration of one process (the BPF map's leaf type)."""

    _fields_ = (
        [(name, ctypes.c_uint64) for name in _U64]
        + [("generation", ctypes.c_uint32)]
        + [(name, ctypes.c_uint8) for name in _U8]
        + [(name, ctypes.c_uint16) for name in _U16]
    )


class CtlMsg(ctypes.Structure):
    """struct ctl_msg."""

    _fields_ = [("kind", ctypes.c_uint32), ("pid", ctypes.c_uint32), ("config", PyConfig)]


def control_message(kind: int, pid: int, config: PyConfig | None = None) -> bytes:
    msg = CtlMsg(kind=kind, pid=pid)
    if config is not None:
        msg.config = config
    return bytes(msg)


def split_frames(buf: bytes) -> tuple[int, np.ndarray, list[bytes]]:
    """(bytes consumed, payload offsets of fd records, Python records) of the whole frames at
    the start of `buf`; a frame not wholly there yet is left for the next read."""
    used, starts = frame_starts(buf)
    words = _u32(buf)
    kinds = (words[(starts + FRAME_HEADER + _TYPE_AT) // 4] & 0xFFFF) if len(starts) else starts
    python = starts[kinds >= PYTHON_RECORD_MIN_TYPE].tolist()
    python_records = [
        buf[at + FRAME_HEADER : at + FRAME_HEADER + int(words[at // 4])] for at in python
    ]
    return used, starts[kinds < PYTHON_RECORD_MIN_TYPE] + FRAME_HEADER, python_records


def frame_starts(buf: bytes) -> tuple[int, np.ndarray]:
    """(bytes consumed, offsets of the frame headers) of the whole frames at the start of `buf`.

    Vectorised: a Python loop per frame was a third of the collector's time. Every 8-byte slot
    that looks like a frame header (_header_slots) is a candidate, and the chain of frames from
    a known boundary is taken as far as each candidate's frame ends at the next candidate. A
    slot inside a payload that happens to look like a header, or a header that does not look
    like one, breaks the chain there and one frame is cut the slow way (_frame_length), so the
    result is always the sequential parse."""
    end = len(buf)
    slots = _header_slots(buf)
    frame_ends = slots + FRAME_HEADER + ((_u32(buf)[slots // 4].astype(np.int64) + 7) & ~7)
    breaks = np.flatnonzero(frame_ends[:-1] != slots[1:])  # chains end at these candidates
    pieces: list[np.ndarray] = []
    pos = 0
    while pos + FRAME_HEADER <= end:
        first = int(np.searchsorted(slots, pos))
        if first < len(slots) and slots[first] == pos:
            after = int(np.searchsorted(breaks, first))
            last = int(breaks[after]) if after < len(breaks) else len(slots) - 1
            complete = int(np.searchsorted(frame_ends[first : last + 1], end, side="right"))
            pieces.append(slots[first : first + complete])
            if complete <= last - first:
                if complete:
                    pos = int(frame_ends[first + complete - 1])
                break  # the next frame is not all there yet
            pos = int(frame_ends[last])
            continue
        framed = _frame_length(buf, pos)
        if pos + framed > end:
            break
        pieces.append(np.array([pos], np.int64))
        pos += framed
    starts = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
    return pos, starts


def _u32(buf: bytes) -> np.ndarray:
    """The whole 8-byte slots of `buf` as little-endian u32 words (no copy)."""
    words: np.ndarray = np.frombuffer(buf, "<u4", count=len(buf) // 8 * 2)
    return words


def _frame_length(buf: bytes, pos: int) -> int:
    length: int = _FRAME_HEAD.unpack_from(buf, pos)[0]
    return FRAME_HEADER + ((length + 7) & ~7)


# Word indices (u32) from a frame header: the payload's type, and an fd record's datalen
_TYPE_WORD = (FRAME_HEADER + _TYPE_AT) // 4
_DATALEN_WORD = (FRAME_HEADER + records.HEADER_SIZE - 4) // 4


def _header_slots(buf: bytes) -> np.ndarray:
    """Offsets of the 8-byte slots that look like a frame header: second word zero, then an fd
    record whose length is its header plus its datalen, or a Python record's type."""
    words = _u32(buf)
    count = max(0, (len(words) - _DATALEN_WORD - 1) // 2 + 1)
    if not count:
        return np.zeros(0, np.int64)
    length, zero = words[0 : 2 * count : 2], words[1 : 2 * count : 2]
    kind = words[_TYPE_WORD : _TYPE_WORD + 2 * count : 2] & 0xFFFF
    datalen = words[_DATALEN_WORD : _DATALEN_WORD + 2 * count : 2]
    fd_record = (
        (kind > 0) & (kind < PYTHON_RECORD_MIN_TYPE) & (length == datalen + records.HEADER_SIZE)
    )
    python_record = (kind >= PYTHON_RECORD_MIN_TYPE) & (kind <= records.PYTHON_RECORD_MAX_TYPE)
    slots: np.ndarray = np.flatnonzero((zero == 0) & (fd_record | python_record)) * 8
    return slots.astype(np.int64)
