"""User-space walker of CPython frames over /proc/PID/mem.

Same layouts as the kernel walker (`cmtrace.interp.layouts`), used to:
- validate a layout against the live process before the kernel walker is configured
  (`validate`: every frame's code object must have type PyCode_Type and sane fields);
- read code objects the kernel could not copy (`read_code`);
- take an end-of-trace snapshot of every thread's stack (`snapshot_threads(pid)`), which tells
  the analysis whether a generator is still suspended or a `with` block still active.

Frame dicts have the keys of the STACK_FRAMES schema: function, qualname, file, line,
firstlineno, code_flags, lasti.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from cmtrace.interp import linetable
from cmtrace.interp.discover import Interpreter, NotPython, find_interpreter
from cmtrace.interp.layouts import FRAMES_HEAP, LINES_LNOTAB, NO_OFFSET, Layout, LayoutError

MAX_INTERPRETERS = 8
MAX_THREADS = 4096
MAX_FRAMES = 4096
MAX_STRING = 4096
MAX_LINETABLE = 1 << 20
GLIBC_PTHREAD_TID = 0x2D0  # offsetof(struct pthread, tid), glibc x86_64: maps pthread_t -> tid


# x86_64 user addresses end below 2**47 (4-level paging) or 2**56 (5-level); off_t is signed.
USER_SPACE_END = 1 << 63


class Memory:
    """Reads of another process's memory; short reads raise OSError."""

    def __init__(self, pid: int):
        self.pid = pid
        self._fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> Memory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read(self, addr: int, size: int) -> bytes:
        # A torn or stale pointer can be any 64-bit value: os.pread takes a signed off_t, so
        # anything past the user address space is a failed read, not an OverflowError.
        if not 0 < addr < USER_SPACE_END or size < 0:
            raise OSError(f"read at invalid address {addr:#x}")
        data = os.pread(self._fd, size, addr)
        if len(data) != size:
            raise OSError(f"short read at {addr:#x}")
        return data

    def u64(self, addr: int) -> int:
        return int(struct.unpack("<Q", self.read(addr, 8))[0])

    def i32(self, addr: int) -> int:
        return int(struct.unpack("<i", self.read(addr, 4))[0])

    def u8(self, addr: int) -> int:
        return self.read(addr, 1)[0]


@dataclass(frozen=True)
class RawFrame:
    code: int  # PyCodeObject address
    instr: int  # f_lasti (heap frames) or the instruction pointer (3.11+), as the kernel sends
    globals: int = 0  # f_globals


@dataclass(frozen=True)
class CodeInfo:
    name: str
    qualname: str
    filename: str
    firstlineno: int
    flags: int
    linetable: bytes


def thread_states(mem: Memory, interp: Interpreter) -> list[int]:
    """Addresses of every PyThreadState of every interpreter."""
    layout = interp.layout
    result: list[int] = []
    istate = mem.u64(interp.interpreters_head_addr)
    for _ in range(MAX_INTERPRETERS):
        if not istate:
            break
        tstate = mem.u64(istate + layout.interp_threads_head)
        while tstate and len(result) < MAX_THREADS:
            result.append(tstate)
            tstate = mem.u64(tstate + layout.tstate_next)
        istate = mem.u64(istate + layout.interp_next)
    return result


def top_frame(mem: Memory, layout: Layout, tstate: int) -> int:
    frame = mem.u64(tstate + layout.tstate_frame)
    if frame and layout.cframe_current_frame != NO_OFFSET:
        frame = mem.u64(frame + layout.cframe_current_frame)
    return frame


def walk(mem: Memory, interp: Interpreter, tstate: int) -> list[RawFrame]:
    """The thread's Python frames, innermost first (shim/entry frames skipped)."""
    layout, frames = interp.layout, []
    frame = top_frame(mem, layout, tstate)
    for _ in range(MAX_FRAMES):
        if not frame:
            break
        code = mem.u64(frame + layout.frame_code) & ~layout.code_tag_mask
        globals_ = mem.u64(frame + layout.frame_globals)
        if layout.frames == FRAMES_HEAP:
            instr = mem.i32(frame + layout.frame_instr)
            frames.append(RawFrame(code, instr, globals_))
        elif mem.u8(frame + layout.frame_owner) < layout.owner_not_python and code != interp.none:
            frames.append(RawFrame(code, mem.u64(frame + layout.frame_instr), globals_))
        frame = mem.u64(frame + layout.frame_previous)
    return frames


def read_str(mem: Memory, layout: Layout, addr: int) -> str:
    """A compact str object's text (co_name, co_filename... are always compact)."""
    length = mem.u64(addr + layout.unicode_length)
    state = struct.unpack("<I", mem.read(addr + layout.unicode_state, 4))[0]
    return decode_str(
        layout,
        state,
        mem.read(
            addr + str_data_offset(layout, state), min(length, MAX_STRING) * ((state >> 2) & 7 or 1)
        ),
    )


def str_data_offset(layout: Layout, state: int) -> int:
    ascii_compact = (state >> 5) & 3 == 3  # compact and ascii bits
    return layout.unicode_ascii_size if ascii_compact else layout.unicode_compact_size


def decode_str(layout: Layout, state: int, data: bytes) -> str:
    """Text of a compact str from its state bits and raw data (kind = bytes per character)."""
    kind = (state >> 2) & 7
    codec = {1: "latin-1", 2: "utf-16-le", 4: "utf-32-le"}.get(kind)
    if codec is None:
        raise LayoutError(f"str kind {kind} is not a compact kind")
    return data.decode(codec, errors="replace")


def read_bytes(mem: Memory, layout: Layout, addr: int) -> bytes:
    size = mem.u64(addr + layout.bytes_size)
    if size > MAX_LINETABLE:
        raise LayoutError(f"line table of {size} bytes")
    return mem.read(addr + layout.bytes_data, size) if size else b""


def read_code(mem: Memory, interp: Interpreter, addr: int) -> CodeInfo:
    """Name, file, first line and line table of the code object at `addr`."""
    layout = interp.layout
    if mem.u64(addr + layout.ob_type) != interp.code_type:
        raise LayoutError(f"object at {addr:#x} is not a code object")
    name = read_str(mem, layout, mem.u64(addr + layout.code_name))
    qualname = name
    if layout.code_qualname != NO_OFFSET:
        qualname = read_str(mem, layout, mem.u64(addr + layout.code_qualname))
    return CodeInfo(
        name=name,
        qualname=qualname,
        filename=read_str(mem, layout, mem.u64(addr + layout.code_filename)),
        firstlineno=mem.i32(addr + layout.code_firstlineno),
        flags=mem.i32(addr + layout.code_flags),
        linetable=read_bytes(mem, layout, mem.u64(addr + layout.code_linetable)),
    )


def bytecode_offset(layout: Layout, code_addr: int, instr: int) -> int:
    """Byte offset of the frame's instruction in its bytecode (negative: not started)."""
    if layout.frames == FRAMES_HEAP:
        signed = instr & 0xFFFFFFFF  # the kernel sends the 8 bytes at f_lasti, an int
        signed = signed - (1 << 32) if signed >= 1 << 31 else signed
        return signed if layout.lines == LINES_LNOTAB else signed * 2 if signed >= 0 else -1
    return instr - code_addr - layout.code_adaptive


def frame_dict(layout: Layout, code: CodeInfo, code_addr: int, instr: int) -> dict:
    offset = bytecode_offset(layout, code_addr, instr)
    line = linetable.line_for_offset(layout.lines, code.linetable, code.firstlineno, offset)
    return {
        "function": code.name,
        "qualname": code.qualname,
        "file": code.filename,
        "line": line,
        "firstlineno": code.firstlineno,
        "code_flags": code.flags,
        "lasti": offset // 2 if offset >= 0 else -1,
    }


def _check_code(code: CodeInfo) -> None:
    if not code.filename or not code.name or not 0 <= code.firstlineno < 10_000_000:
        raise LayoutError(f"implausible code object {code.name!r} in {code.filename!r}")


def _check_globals(mem: Memory, interp: Interpreter, raw: RawFrame) -> None:
    if interp.dict_type and mem.u64(raw.globals + interp.layout.ob_type) != interp.dict_type:
        raise LayoutError(f"f_globals of a frame of code {raw.code:#x} is not a dict")


def validate(interp: Interpreter) -> int:
    """Walk every thread's stack with the layout; return the number of frames that check out.

    The target runs on while we read, so a thread may change under us (a frame being set up,
    a thread exiting): such a thread is skipped. A wrong layout makes every frame fail, so
    LayoutError is raised only when frames were found and none was a proper code object."""
    good, failure = 0, None
    try:
        with Memory(interp.pid) as mem:
            for tstate in thread_states(mem, interp):
                try:
                    for raw in walk(mem, interp, tstate):
                        code = read_code(mem, interp, raw.code)
                        _check_code(code)
                        _check_globals(mem, interp, raw)
                        frame_dict(interp.layout, code, raw.code, raw.instr)
                        good += 1
                except (LayoutError, OSError, struct.error, UnicodeDecodeError, IndexError) as exc:
                    failure = exc
    except (OSError, struct.error) as exc:
        if not good:
            failure = exc
    if failure is not None and not good:
        raise LayoutError(f"walking the live stacks failed: {failure}")
    return good


def ns_tid_map(pid: int) -> dict[int, int]:
    """Thread ids as the target sees them (its pid namespace) -> host tids."""
    result = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            for line in (task / "status").read_text().splitlines():
                if line.startswith("NSpid:"):
                    result[int(line.split()[-1])] = int(task.name)
        except OSError:
            continue
    return result


def _host_tid(mem: Memory, layout: Layout, tstate: int, tids: dict[int, int]) -> int | None:
    if layout.tstate_native_thread_id != NO_OFFSET:
        ns_tid = mem.u64(tstate + layout.tstate_native_thread_id)
    else:  # <= 3.10: thread_id is pthread_self(); glibc keeps the tid inside struct pthread
        ns_tid = struct.unpack(
            "<i", mem.read(mem.u64(tstate + layout.tstate_thread_id) + GLIBC_PTHREAD_TID, 4)
        )[0]
    return tids.get(ns_tid)


def _thread_frames(mem: Memory, interp: Interpreter, tstate: int) -> list[dict]:
    """The thread's frames; a thread that changes under the reader keeps what was read."""
    frames = []
    try:
        for raw in walk(mem, interp, tstate):
            code = read_code(mem, interp, raw.code)
            frames.append(frame_dict(interp.layout, code, raw.code, raw.instr))
    except (OSError, LayoutError, struct.error, UnicodeDecodeError, IndexError):
        pass
    return frames


def snapshot_threads(pid: int) -> dict[int, list[dict]]:
    """{host tid: frames innermost first} for every Python thread of `pid` (empty if none)."""
    try:
        interp = find_interpreter(pid)
    except NotPython:
        return {}
    result: dict[int, list[dict]] = {}
    with Memory(pid) as mem:
        tids = ns_tid_map(pid)
        for tstate in thread_states(mem, interp):
            try:
                tid = _host_tid(mem, interp.layout, tstate, tids)
            except (OSError, struct.error):
                continue
            if tid is None:
                continue
            result[tid] = _thread_frames(mem, interp, tstate)
    return result
