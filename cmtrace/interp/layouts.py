"""Where CPython keeps threads, frames and code objects: one layout per interpreter minor.

One source of truth for both walkers: `probes/pystack.h` (in the kernel, configured from a
`Layout` by `cmtrace.interp.discover`) and `cmtrace.interp.walker` (user space, /proc/PID/mem).

- 3.8-3.12 have no self-description: `TABLE` holds their offsets (x86_64, GIL builds), measured
  with `offsetof` against each minor's internal headers (pyenv 3.8.18, 3.9.18, 3.10.13, 3.11.7,
  3.12.1 and Debian 3.11.2 agree within a minor). `cmtrace.interp.walker.validate` checks them
  against the live process before any stack is recorded.
- 3.13+ publish `_Py_DebugOffsets` at the start of `_PyRuntime`. Its own shape changes between
  minors, so `DEBUG_OFFSET_POSITIONS` says where each needed field sits inside it, per minor
  (from the 3.13, 3.14 and 3.15 headers); the values themselves are read from the live process.
  The few facts it does not publish (co_flags, the data-stack top, the frame-owner enum, stack
  reference tag bits) are in `DEBUG_OFFSET_EXTRAS`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace

FRAMES_HEAP = "heap"  # <= 3.10: PyFrameObject on the heap, linked by f_back
FRAMES_INTERP = "interp"  # 3.11+: _PyInterpreterFrame on the thread's data stack

LINES_LNOTAB = "lnotab"  # <= 3.9 co_lnotab, f_lasti in bytes
LINES_310 = "linetable310"  # 3.10 co_linetable, f_lasti in code units
LINES_LOCATIONS = "locations"  # 3.11+ location table, lasti from the instruction pointer

SOURCE_TABLE = "table"
SOURCE_DEBUG_OFFSETS = "_Py_DebugOffsets"

DEBUG_COOKIE = b"xdebugpy"
NO_OFFSET = -1


@dataclass(frozen=True)
class Layout:
    """Offsets (bytes) of every field either walker reads; NO_OFFSET where a version lacks one."""

    minor: int
    source: str
    frames: str
    lines: str
    # _PyRuntimeState
    runtime_finalizing: int
    runtime_interpreters_head: int
    # PyInterpreterState
    interp_next: int
    interp_threads_head: int
    # PyThreadState
    tstate_next: int
    tstate_thread_id: int  # pthread_self() of the thread
    tstate_native_thread_id: int  # gettid() in the target's pid namespace (3.11+)
    tstate_frame: int  # frame (<=3.10), cframe (3.11-3.12), current_frame (3.13+)
    cframe_current_frame: int  # offset in _PyCFrame when tstate_frame is a cframe
    tstate_datastack_chunk: int
    tstate_datastack_top: int
    chunk_data: int  # _PyStackChunk.data
    # frames
    frame_code: int  # f_code / f_executable
    frame_previous: int  # f_back / previous
    frame_instr: int  # f_lasti (int, heap frames) / prev_instr / instr_ptr
    frame_owner: int  # u8 owner (3.11+)
    frame_globals: int  # f_globals: the module's dict, mixed into stack ids (see pystack.h)
    owner_not_python: int  # owners >= this are C-stack / interpreter shims, not Python frames
    code_tag_mask: int  # low bits of a tagged _PyStackRef f_executable (3.14+)
    # PyCodeObject
    code_flags: int
    code_firstlineno: int
    code_argcount: int
    code_filename: int
    code_name: int
    code_qualname: int
    code_linetable: int  # co_lnotab (<=3.9) / co_linetable
    code_adaptive: int  # co_code_adaptive: first code unit (3.11+)
    # The exception being raised: curexc_type (<= 3.11), current_exception (3.12+). Read only by
    # --calls, at a function's return, to tell a raise from a return.
    tstate_exception: int = NO_OFFSET
    # objects
    ob_type: int = 8
    bytes_size: int = 16  # PyVarObject.ob_size
    bytes_data: int = 32  # PyBytesObject.ob_sval
    unicode_length: int = 16
    unicode_state: int = 32
    unicode_ascii_size: int = 48  # sizeof(PyASCIIObject): compact ASCII data starts here
    unicode_compact_size: int = 72  # sizeof(PyCompactUnicodeObject): other compact data


def _heap_layout(minor: int, f_lasti: int, lines: str) -> Layout:
    return Layout(
        minor=minor, source=SOURCE_TABLE, frames=FRAMES_HEAP, lines=lines,
        runtime_finalizing=16, runtime_interpreters_head=32,
        interp_next=0, interp_threads_head=8,
        tstate_next=8, tstate_thread_id=176, tstate_native_thread_id=NO_OFFSET,
        tstate_frame=24, cframe_current_frame=NO_OFFSET,
        tstate_datastack_chunk=NO_OFFSET, tstate_datastack_top=NO_OFFSET, chunk_data=NO_OFFSET,
        frame_code=32, frame_previous=24, frame_instr=f_lasti, frame_owner=NO_OFFSET, frame_globals=48,
        owner_not_python=256, code_tag_mask=0,
        code_flags=36, code_firstlineno=40, code_argcount=16, code_filename=104, code_name=112,
        code_qualname=NO_OFFSET, code_linetable=120, code_adaptive=NO_OFFSET,
        tstate_exception=88,
    )  # fmt: skip


_LAYOUT_311 = Layout(
    minor=11,
    source=SOURCE_TABLE,
    frames=FRAMES_INTERP,
    lines=LINES_LOCATIONS,
    runtime_finalizing=24,
    runtime_interpreters_head=40,
    interp_next=0,
    interp_threads_head=16,
    tstate_next=8,
    tstate_thread_id=152,
    tstate_native_thread_id=160,
    tstate_frame=56,
    cframe_current_frame=8,
    tstate_datastack_chunk=296,
    tstate_datastack_top=304,
    chunk_data=24,
    frame_code=32,
    frame_previous=48,
    frame_instr=56,
    frame_owner=69,
    frame_globals=8,
    owner_not_python=3,
    code_tag_mask=0,
    code_flags=48,
    code_firstlineno=72,
    code_argcount=56,
    code_filename=112,
    code_name=120,
    code_qualname=128,
    code_linetable=136,
    code_adaptive=184,
    tstate_exception=96,
)  # fmt: skip


TABLE: dict[int, Layout] = {
    8: _heap_layout(8, f_lasti=104, lines=LINES_LNOTAB),
    9: _heap_layout(9, f_lasti=104, lines=LINES_LNOTAB),
    10: _heap_layout(10, f_lasti=96, lines=LINES_310),
    11: _LAYOUT_311,
    # 3.12: the same frame model; these fields moved (measured as for 3.11)
    12: replace(
        _LAYOUT_311,
        minor=12,
        interp_threads_head=72,
        tstate_thread_id=136,
        tstate_native_thread_id=144,
        cframe_current_frame=0,
        tstate_datastack_chunk=232,
        tstate_datastack_top=240,
        frame_code=0,
        frame_previous=8,
        frame_owner=70,
        frame_globals=24,
        code_firstlineno=68,
        code_argcount=52,
        code_adaptive=192,
        unicode_ascii_size=40,
        unicode_compact_size=56,
    ),  # fmt: skip
}

# Positions (byte offsets inside _Py_DebugOffsets) of the fields we read, per minor.
_DEBUG_FIELDS = (
    "runtime_finalizing", "runtime_interpreters_head", "interp_next", "interp_threads_head",
    "tstate_next", "tstate_frame", "tstate_thread_id", "tstate_native_thread_id",
    "tstate_datastack_chunk", "frame_previous", "frame_code", "frame_instr", "frame_owner",
    "code_filename", "code_name", "code_qualname", "code_linetable", "code_firstlineno",
    "code_argcount", "code_adaptive", "ob_type", "bytes_size", "bytes_data", "unicode_state",
    "unicode_length", "unicode_ascii_size",
)  # fmt: skip
DEBUG_OFFSET_POSITIONS: dict[int, tuple[int, ...]] = {
    13: (32, 40, 64, 72, 168, 184, 192, 200, 208, 232, 240, 248, 264,
         280, 288, 296, 304, 312, 320, 344, 360, 520, 528, 544, 552, 560),
    14: (32, 40, 64, 72, 192, 208, 216, 224, 232, 256, 264, 272, 288,
         320, 328, 336, 344, 352, 360, 384, 408, 600, 608, 624, 632, 640),
    15: (32, 40, 64, 72, 192, 208, 240, 248, 256, 320, 328, 336, 352,
         384, 392, 400, 408, 416, 424, 448, 472, 696, 704, 720, 728, 736),
}  # fmt: skip
DEBUG_OFFSETS_READ_SIZE = 760  # covers every position above (+8)

# What _Py_DebugOffsets does not publish. owner_not_python: 3.12-3.13 CSTACK = 3; 3.14
# INTERPRETER = 3, CSTACK = 4; 3.15 INTERPRETER = 3. code_tag_mask: 3.14+ f_executable is a
# _PyStackRef whose low bits are tags. datastack_top follows datastack_chunk in 3.11-3.15.
DEBUG_OFFSET_EXTRAS: dict[int, dict[str, int]] = {
    13: {"code_flags": 48, "owner_not_python": 3, "code_tag_mask": 0, "frame_globals": 24},
    14: {"code_flags": 48, "owner_not_python": 3, "code_tag_mask": 7, "frame_globals": 24},
    15: {"code_flags": 48, "owner_not_python": 3, "code_tag_mask": 7, "frame_globals": 24},
}
# Nor where PyThreadState.current_exception is (read only by --calls): bytes after
# current_frame. 3.13: the four profile/trace hook fields sit between (header); 3.15: measured
# here on Debian's 3.15.2 (the one word that is set only while a function raises). 3.14 has no
# function__return probe to read it at.
EXCEPTION_AFTER_FRAME: dict[int, int] = {13: 40, 15: 64}
MIN_MINOR, MAX_MINOR = 8, 15


class LayoutError(Exception):
    """The interpreter cannot be walked safely; the message says why (shown in the summary)."""


def table_layout(minor: int) -> Layout:
    """The per-minor table layout for 3.8-3.12."""
    try:
        return TABLE[minor]
    except KeyError:
        raise LayoutError(f"no layout table for CPython 3.{minor}") from None


def parse_debug_offsets(blob: bytes) -> Layout:
    """Build a Layout from the first DEBUG_OFFSETS_READ_SIZE bytes at &_PyRuntime (3.13+)."""
    if len(blob) < 24 or blob[:8] != DEBUG_COOKIE:
        raise LayoutError("no _Py_DebugOffsets cookie at _PyRuntime")
    version, free_threaded = struct.unpack_from("<QQ", blob, 8)
    major, minor = version >> 24, (version >> 16) & 0xFF
    if major != 3 or minor not in DEBUG_OFFSET_POSITIONS:
        raise LayoutError(f"unsupported _Py_DebugOffsets version {version:#x}")
    if free_threaded:
        raise LayoutError(f"free-threaded CPython 3.{minor} is not supported")
    positions = DEBUG_OFFSET_POSITIONS[minor]
    if len(blob) < max(positions) + 8:
        raise LayoutError("short read of _Py_DebugOffsets")
    values = {
        name: struct.unpack_from("<Q", blob, pos)[0] for name, pos in zip(_DEBUG_FIELDS, positions)
    }
    _check_debug_values(values)
    chunk = values["tstate_datastack_chunk"]
    after_frame = EXCEPTION_AFTER_FRAME.get(minor)
    exception = NO_OFFSET if after_frame is None else values["tstate_frame"] + after_frame
    ascii_size = values["unicode_ascii_size"]
    return Layout(
        minor=minor,
        source=SOURCE_DEBUG_OFFSETS,
        frames=FRAMES_INTERP,
        lines=LINES_LOCATIONS,
        cframe_current_frame=NO_OFFSET,
        tstate_datastack_top=chunk + 8,
        chunk_data=24,
        unicode_compact_size=ascii_size + 16,  # + utf8_length + utf8 pointer
        tstate_exception=exception,
        **values,
        **DEBUG_OFFSET_EXTRAS[minor],
    )


def _check_debug_values(values: dict[str, int]) -> None:
    """Offsets inside objects are small; anything else means we misread the struct."""
    for name, value in values.items():
        limit = 1 << 16 if name.startswith(("runtime_", "interp_")) else 4096
        if value >= limit:
            raise LayoutError(f"implausible _Py_DebugOffsets field {name}={value}")


# --- generator, coroutine and async generator objects (issue 13: liveness at the end) ---------
# Where a generator object keeps its frame, code and state, per minor (x86_64, GIL builds),
# measured on each interpreter of tests/integration/targets.py (ctypes over live generators
# created, suspended, inside `yield from`, running and finished: tests/programs/py/genstates.py
# prints them; test_liveness.py checks them from outside). 3.14+ also publish gi_iframe and
# gi_frame_state in _Py_DebugOffsets.gen_object, which cmtrace.interp.generators checks against.
GEN_CREATED = "created"
GEN_SUSPENDED = "suspended"
GEN_RUNNING = "running"
GEN_FINISHED = "finished"

_STATES_311 = {-2: GEN_CREATED, -1: GEN_SUSPENDED, 0: GEN_RUNNING, 1: GEN_FINISHED, 4: GEN_FINISHED}
# 3.13: FRAME_SUSPENDED_YIELD_FROM (-1) split off FRAME_SUSPENDED (-2)
_STATES_313 = {-3: GEN_CREATED, -2: GEN_SUSPENDED, -1: GEN_SUSPENDED, 0: GEN_RUNNING,
               1: GEN_FINISHED, 4: GEN_FINISHED}  # fmt: skip
# 3.15 renumbered them from 0 (CREATED 0, SUSPENDED 1, SUSPENDED_YIELD_FROM 2, its locked
# variant 3, EXECUTING 4, CLEARED 5: measured on Debian's 3.15.2)
_STATES_315 = {0: GEN_CREATED, 1: GEN_SUSPENDED, 2: GEN_SUSPENDED, 3: GEN_SUSPENDED,
               4: GEN_RUNNING, 5: GEN_FINISHED}  # fmt: skip


@dataclass(frozen=True)
class GeneratorLayout:
    """Offsets (bytes) in a PyGenObject (also PyCoroObject, PyAsyncGenObject: same head)."""

    minor: int
    gen_code: int  # gi_code (<= 3.11); NO_OFFSET: read the embedded frame's f_executable
    gen_frame: int  # gi_frame, a PyFrameObject* that is NULL once finished (<= 3.10)
    gen_iframe: int  # the embedded _PyInterpreterFrame (3.11+)
    gen_state: int  # int8 gi_frame_state (3.11+)
    frame_gen: int  # PyFrameObject.f_gen (<= 3.10): how a frame on a stack names its generator
    frame_stacktop: int  # f_stacktop (3.8-3.9): NULL while running
    frame_state: int  # int8 f_state (3.10)
    owner_generator: int  # _PyInterpreterFrame.owner of a generator's frame (3.11+)
    states: dict[int, str]  # gi_frame_state / f_state value -> GEN_*


def _heap_gen(minor: int, code: int, frame_gen: int, **kw: int) -> GeneratorLayout:
    fields = {"frame_stacktop": NO_OFFSET, "frame_state": NO_OFFSET, **kw}
    return GeneratorLayout(
        minor=minor, gen_code=code, gen_frame=16, gen_iframe=NO_OFFSET, gen_state=NO_OFFSET,
        frame_gen=frame_gen, owner_generator=NO_OFFSET,
        # 3.10 f_state (3.8-3.9 have none: see cmtrace.interp.generators); UNWINDING (2) runs
        states={-2: GEN_CREATED, -1: GEN_SUSPENDED, 0: GEN_RUNNING, 1: GEN_FINISHED,
                2: GEN_RUNNING, 3: GEN_FINISHED, 4: GEN_FINISHED},
        **fields,
    )  # fmt: skip


def _interp_gen(minor: int, code: int, iframe: int, state: int, states: dict[int, str]):
    return GeneratorLayout(
        minor=minor, gen_code=code, gen_frame=NO_OFFSET, gen_iframe=iframe, gen_state=state,
        frame_gen=NO_OFFSET, frame_stacktop=NO_OFFSET, frame_state=NO_OFFSET,
        owner_generator=1, states=states,
    )  # fmt: skip


GENERATORS: dict[int, GeneratorLayout] = {
    8: _heap_gen(8, code=32, frame_gen=96, frame_stacktop=72),
    9: _heap_gen(9, code=32, frame_gen=96, frame_stacktop=72),
    10: _heap_gen(10, code=24, frame_gen=88, frame_state=108),
    11: _interp_gen(11, code=16, iframe=80, state=75, states=_STATES_311),
    12: _interp_gen(12, code=NO_OFFSET, iframe=72, state=67, states=_STATES_311),
    13: _interp_gen(13, code=NO_OFFSET, iframe=72, state=67, states=_STATES_313),
    14: _interp_gen(14, code=NO_OFFSET, iframe=72, state=67, states=_STATES_313),
    15: _interp_gen(15, code=NO_OFFSET, iframe=72, state=67, states=_STATES_315),
}
# Byte position of _Py_DebugOffsets.gen_object {size, gi_name, gi_iframe, gi_frame_state}
# (u64 each), where the interpreter publishes it.
DEBUG_GEN_OBJECT: dict[int, int] = {14: 664, 15: 792}


def generator_layout(minor: int) -> GeneratorLayout:
    try:
        return GENERATORS[minor]
    except KeyError:
        raise LayoutError(f"no generator layout for CPython 3.{minor}") from None
