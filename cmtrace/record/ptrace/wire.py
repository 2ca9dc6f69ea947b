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

CTL_CONFIG, CTL_FORGET, CTL_RESUME, CTL_STOP, CTL_HOLD_NEXT = 1, 2, 3, 4, 5
FRAME_HEADER = 8
PYTHON_RECORD_MIN_TYPE = 100
_FRAME_HEAD = struct.Struct("<II")
_TYPE_AT = 16  # the payload's `type` (u16), in every record kind

_U64 = ("interp_head_addr", "finalizing_addr", "code_type", "none_addr", "pidns_dev",
        "pidns_ino", "code_tag_mask")  # fmt: skip
_U8 = ("frames", "match_native_tid", "owner_not_python", "pad")
_U16 = (
    "interp_next", "interp_threads_head", "ts_next", "ts_thread_id", "ts_native_thread_id",
    "ts_frame", "cframe_current_frame", "ts_chunk", "ts_top", "chunk_data", "fr_code",
    "fr_previous", "fr_instr", "fr_owner", "fr_globals", "co_flags", "co_firstlineno",
    "co_argcount", "co_filename", "co_name", "co_qualname", "co_linetable", "ob_type",
    "bytes_size", "bytes_data", "str_length", "str_state", "str_ascii", "str_compact",
    "ts_exception",
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


def split_frames(buf: bytes) -> tuple[int, list[int], list[bytes]]:
    """(bytes consumed, payload offsets of fd records, Python records) of the whole frames at
    the start of `buf`; a frame not wholly there yet is left for the next read."""
    pos, end, fd_offsets, python_records = 0, len(buf), [], []
    unpack = _FRAME_HEAD.unpack_from
    while pos + FRAME_HEADER <= end:
        length, _ = unpack(buf, pos)
        framed = FRAME_HEADER + ((length + 7) & ~7)
        if pos + framed > end:
            break
        payload = pos + FRAME_HEADER
        rtype = struct.unpack_from("<H", buf, payload + _TYPE_AT)[0]
        if rtype >= PYTHON_RECORD_MIN_TYPE:
            python_records.append(buf[payload : payload + length])
        else:
            fd_offsets.append(payload)
        pos += framed
    return pos, fd_offsets, python_records
