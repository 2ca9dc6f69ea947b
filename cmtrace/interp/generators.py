"""Is a generator, coroutine or async generator still suspended? Read from outside the process.

Issue 13's targeted check: each fd birth inside a generator frame carries the address of that
generator object (probes/pywalk.h); when recording stops and the target still lives, each
address of an fd still open is read here, a few reads per address over /proc/PID/mem, without
stopping the target:

    ob_type      one of PyGen_Type, PyCoro_Type, PyAsyncGen_Type (ELF symbols): else "gone"
    code         must be the code object the frame ran at the birth: else "gone"
    state        gi_frame_state (3.11+), f_state (3.10), gi_frame/f_stacktop/f_lasti (3.8-3.9)
    line         the line it would resume at (suspended only)

"gone" means the object at that address is no longer a generator of that code: the one that
opened the fd was freed, and a generator is freed only after its frame is cleared, so it is not
suspended any more. Freelists and the allocator reuse addresses, so a suspended answer proves
only that *a* generator of this function at this address is suspended at that line. A read that
fails (process gone, unmapped, layout not validated) is an error: no proof either way.

Offsets are data (cmtrace.interp.layouts.GENERATORS); on 3.14+ they are checked against the
interpreter's own _Py_DebugOffsets.gen_object, and a mismatch fails every check (closed).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from cmtrace.interp import layouts
from cmtrace.interp.discover import Interpreter, NotPython, find_interpreter, read_memory
from cmtrace.interp.layouts import (
    FRAMES_HEAP,
    GEN_CREATED,
    GEN_FINISHED,
    GEN_RUNNING,
    GEN_SUSPENDED,
    NO_OFFSET,
    GeneratorLayout,
    LayoutError,
)
from cmtrace.interp.walker import Memory, frame_dict, read_code

GEN_GONE = "gone"  # no longer a generator of the birth's code: the one that opened the fd is freed
TYPE_SYMBOLS = {"PyGen_Type": "generator", "PyCoro_Type": "coroutine",
                "PyAsyncGen_Type": "async_generator"}  # fmt: skip
MAX_CHECKS = 100_000  # addresses read per process at most (a few reads each)


@dataclass(frozen=True)
class Finding:
    """What one generator address held when recording stopped (one row of generators.json)."""

    pid: int
    address: int
    code: int  # the code object the birth's frame ran (what the generator had to run)
    type: str | None = None  # generator, coroutine, async_generator (None: not read)
    state: str | None = None  # GEN_* or GEN_GONE (None: read failed, see error)
    line: int | None = None  # line it resumes at, when suspended
    error: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class GenReader:
    """Everything needed to read generators of one process."""

    interp: Interpreter
    layout: GeneratorLayout
    types: dict[int, str]  # &PyGen_Type... -> kind


def type_addresses(interp: Interpreter) -> dict[int, str]:
    """Relocated addresses of the three generator types, from the ELF object holding
    _PyRuntime (they are exported data, like PyCode_Type)."""
    found: dict[int, str] = {}
    with open(interp.opener, "rb") as f:
        elf = ELFFile(f)
        table = elf.get_section_by_name(".gnu.hash") or elf.get_section_by_name(".hash")
        dynsym = elf.get_section_by_name(".dynsym")
        for name, kind in TYPE_SYMBOLS.items():
            if table is not None:
                symbol = table.get_symbol(name)
            else:
                hits = dynsym.get_symbol_by_name(name) if dynsym is not None else None
                symbol = hits[0] if hits else None
            if symbol is not None and symbol["st_shndx"] != "SHN_UNDEF":
                found[symbol["st_value"] + interp.bias] = kind
    if len(found) != len(TYPE_SYMBOLS):
        raise LayoutError("the generator types are not exported")
    return found


def check_debug_offsets(interp: Interpreter, layout: GeneratorLayout) -> None:
    """3.14+: the table's gi_iframe and gi_frame_state must be what the interpreter publishes."""
    position = layouts.DEBUG_GEN_OBJECT.get(layout.minor)
    if position is None or interp.layout.source != layouts.SOURCE_DEBUG_OFFSETS:
        return
    blob = read_memory(interp.pid, interp.runtime + position, 32)
    if len(blob) != 32:
        raise LayoutError("short read of _Py_DebugOffsets.gen_object")
    _size, _name, iframe, state = struct.unpack("<4Q", blob)
    if (iframe, state) != (layout.gen_iframe, layout.gen_state):
        raise LayoutError(
            f"_Py_DebugOffsets.gen_object says gi_iframe={iframe} gi_frame_state={state}, "
            f"the table {layout.gen_iframe}/{layout.gen_state}"
        )


def reader_for(pid: int) -> GenReader:
    """Find and check what reading this process's generators needs (LayoutError, NotPython,
    OSError when it cannot be done safely)."""
    interp = find_interpreter(pid)
    layout = layouts.generator_layout(interp.layout.minor)
    check_debug_offsets(interp, layout)
    try:
        types = type_addresses(interp)
    except (ELFError, ValueError) as exc:
        raise LayoutError(f"cannot read the generator types: {exc}") from exc
    return GenReader(interp, layout, types)


def _heap_state(mem: Memory, reader: GenReader, frame: int) -> tuple[str, int]:
    """(GEN_*, f_lasti) of a <= 3.10 generator's live frame."""
    layout, lay = reader.layout, reader.interp.layout
    lasti = mem.i32(frame + lay.frame_instr)
    if layout.frame_state != NO_OFFSET:  # 3.10
        value = struct.unpack("<b", mem.read(frame + layout.frame_state, 1))[0]
        return _named_state(layout, value), lasti
    if lasti < 0:  # 3.8-3.9: not started yet
        return GEN_CREATED, lasti
    running = mem.u64(frame + layout.frame_stacktop) == 0  # NULL while it executes
    return (GEN_RUNNING if running else GEN_SUSPENDED), lasti


def _named_state(layout: GeneratorLayout, value: int) -> str:
    try:
        return layout.states[value]
    except KeyError:
        raise LayoutError(f"unknown generator state {value}") from None


def _read_one(mem: Memory, reader: GenReader, address: int, code: int) -> Finding:
    interp, layout = reader.interp, reader.layout
    lay = interp.layout
    kind = reader.types.get(mem.u64(address + lay.ob_type))
    base = Finding(pid=interp.pid, address=address, code=code, type=kind)
    if kind is None:
        return _with(base, state=GEN_GONE)
    if lay.frames == FRAMES_HEAP:
        if mem.u64(address + layout.gen_code) != code:
            return _with(base, state=GEN_GONE)
        frame = mem.u64(address + layout.gen_frame)
        if not frame:
            return _with(base, state=GEN_FINISHED)  # gi_frame is cleared when it ends
        state, instr = _heap_state(mem, reader, frame)
    else:
        iframe = address + layout.gen_iframe
        if layout.gen_code != NO_OFFSET:
            own_code = mem.u64(address + layout.gen_code)
        else:
            own_code = mem.u64(iframe + lay.frame_code) & ~lay.code_tag_mask
        if own_code != code:
            return _with(base, state=GEN_GONE)
        value = struct.unpack("<b", mem.read(address + layout.gen_state, 1))[0]
        state = _named_state(layout, value)
        instr = mem.u64(iframe + lay.frame_instr)
    if state != GEN_SUSPENDED:
        return _with(base, state=state)
    info = read_code(mem, interp, code)
    return _with(base, state=state, line=frame_dict(lay, info, code, instr)["line"])


def _with(base: Finding, **changes: object) -> Finding:
    return Finding(**{**asdict(base), **changes})


def check(pid: int, wanted: Iterable[tuple[int, int]]) -> list[Finding]:
    """One Finding per (generator address, code address) of `pid`: what is there now."""
    wanted = list(dict.fromkeys(wanted))[:MAX_CHECKS]
    try:
        reader = reader_for(pid)
    except (NotPython, LayoutError, OSError) as exc:
        return [Finding(pid, a, c, error=f"not checked: {exc}") for a, c in wanted]
    out = []
    try:
        mem = Memory(pid)
    except OSError as exc:
        return [Finding(pid, a, c, error=f"not checked: {exc}") for a, c in wanted]
    with mem:
        for address, code in wanted:
            try:
                out.append(_read_one(mem, reader, address, code))
            except (OSError, LayoutError, struct.error, UnicodeDecodeError, IndexError) as exc:
                out.append(Finding(pid, address, code, error=f"read failed: {exc}"))
    return out


SUSPENDED_STATES = (GEN_SUSPENDED,)
NOT_SUSPENDED_STATES = (GEN_FINISHED, GEN_GONE, GEN_CREATED)
RUNNING_STATES = (GEN_RUNNING,)
