"""Python stack and code records (probes/pystack.h) -> rows of schema.STACK_FRAMES.

`Symbolizer.on_record(raw)` takes every ring-buffer record of type >= 100 (stack and code
records); `take_frames()` returns the STACK_FRAMES rows of the stacks completed since the last
call, `flush()` the same at the end of a trace (unresolved frames become "<unknown code 0x...>"),
`take_new_files()` the (pid, co_filename) pairs met since the last call. Code records precede
the stacks that use them; a stack whose code objects were sent by a concurrent event on another
CPU waits for them (or is read from /proc/PID/mem).
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cmtrace.interp import walker
from cmtrace.interp.discover import Interpreter
from cmtrace.interp.layouts import LayoutError
from cmtrace.record.bpf.targets import Interpreters, warm_btf
from cmtrace.record.records import (
    CODE_HEAD,
    FILE_AT,
    FRAME,
    LINETABLE_AT,
    NAME_AT,
    QUALNAME_AT,
    REC_CODE,
    REC_STACK,
    STACK_HEAD,
    TYPE_OFFSET,
)

UNRESOLVED_AFTER_S = 2.0


@dataclass
class _Stack:
    pid: int
    generation: int
    stack_id: int
    frames: list[tuple[int, int]]
    received: float


def _decode_text(interp: Interpreter | None, state: int, data: bytes) -> str:
    kind = (state >> 2) & 7
    if interp is None or kind not in (1, 2, 4):
        return data.decode("utf-8", errors="replace")
    return walker.decode_str(interp.layout, state, data)


class Symbolizer:
    """Turns stack and code records into STACK_FRAMES rows (see the module docstring)."""

    def __init__(self, interpreters: Interpreters, warm: bool = True) -> None:
        """`warm`: start the BTF lookup the BPF walker needs (the ptrace backend does not)."""
        if warm:
            _warm_btf_once()
        self._interpreters = interpreters
        self._codes: dict[tuple[int, int, int], walker.CodeInfo] = {}
        # (pid, generation, code) -> instr -> the frame's fields: stacks share most frames (an
        # import's are importlib's, at the same instructions), and a 3.11+ location table is
        # decoded from its start for each line asked (0.9 ms a 25-frame stack without this,
        # most of the collector's work while a program starts). Dropped with the code's entry.
        self._frames: dict[tuple[int, int, int], dict[int, dict[str, Any]]] = {}
        self._truncated_tables: set[tuple[int, int, int]] = set()
        self._pending: list[_Stack] = []
        self._done: set[tuple[int, int]] = set()
        self._rows: list[dict[str, Any]] = []
        self._files: set[tuple[int, str]] = set()
        self._new_files: list[tuple[int, str]] = []
        # Called with each stack's rows the moment it resolves (the drain thread's records,
        # not the next flush): --aggregate decides a pair as soon as its close stack is known.
        self.on_rows: Callable[[list[dict[str, Any]]], None] | None = None

    def on_record(self, raw: bytes) -> None:
        rtype = struct.unpack_from("<H", raw, TYPE_OFFSET)[0]
        if rtype == REC_CODE:
            self._on_code(raw)
        elif rtype == REC_STACK:
            self._on_stack(raw)

    def _on_code(self, raw: bytes) -> None:
        (_ts, pid, _tid, _type, name_len, qual_len, file_len, code, gen, _ck, first, flags,
         _argc, name_st, qual_st, file_st, lt_len, lt_total) = CODE_HEAD.unpack_from(raw)  # fmt: skip
        interp = self._interpreters.lookup(pid, gen)
        name = _decode_text(interp, name_st, raw[NAME_AT : NAME_AT + name_len])
        qualname = _decode_text(interp, qual_st, raw[QUALNAME_AT : QUALNAME_AT + qual_len]) or name
        key = (pid, gen, code)
        filename = _decode_text(interp, file_st, raw[FILE_AT : FILE_AT + file_len])
        if filename and (pid, filename) not in self._files:
            self._files.add((pid, filename))
            self._new_files.append((pid, filename))
        self._frames.pop(key, None)
        self._codes[key] = walker.CodeInfo(
            name=name,
            qualname=qualname,
            filename=filename,
            firstlineno=first,
            flags=flags,
            linetable=raw[LINETABLE_AT : LINETABLE_AT + lt_len],
        )
        if lt_len < lt_total:
            self._truncated_tables.add(key)
        else:
            self._truncated_tables.discard(key)

    def _on_stack(self, raw: bytes) -> None:
        _ts, pid, _tid, _type, nframes, _flags, stack_id, gen, _pad = STACK_HEAD.unpack_from(raw)
        if (pid, stack_id) in self._done:
            return
        frames = [FRAME.unpack_from(raw, STACK_HEAD.size + 16 * i) for i in range(nframes)]
        stack = _Stack(pid, gen, stack_id, frames, time.monotonic())
        # Resolve now, while the code records that precede this stack in the ring are the
        # current ones: a code object freed later and its address reused by another (the
        # kernel then sends a new record) must not rename this stack's frames.
        if not self._resolve(stack, force=False):
            self._pending.append(stack)

    def _code(self, stack: _Stack, code: int, force: bool) -> walker.CodeInfo | None:
        key = (stack.pid, stack.generation, code)
        info = self._codes.get(key)
        if (info is None and force) or key in self._truncated_tables:
            info = self._read_live(stack, code) or info
        return info

    def _read_live(self, stack: _Stack, code: int) -> walker.CodeInfo | None:
        """Fallback while the target lives: read the code object from /proc/PID/mem."""
        interp = self._interpreters.lookup(stack.pid, stack.generation)
        if interp is None:
            return None
        try:
            with walker.Memory(stack.pid) as mem:
                info = walker.read_code(mem, interp, code)
        except (OSError, LayoutError, struct.error):
            return None
        key = (stack.pid, stack.generation, code)
        self._frames.pop(key, None)
        self._codes[key] = info
        self._truncated_tables.discard(key)
        return info

    def _resolve(self, stack: _Stack, force: bool) -> bool:
        infos = [self._code(stack, code, force) for code, _ in stack.frames]
        if any(info is None for info in infos) and not force:
            return False
        interp = self._interpreters.lookup(stack.pid, stack.generation)
        rows = [self._row(stack, depth, interp, code, instr, info, self._frames)
                for depth, ((code, instr), info) in enumerate(zip(stack.frames, infos))]  # fmt: skip
        self._rows.extend(rows)
        self._done.add((stack.pid, stack.stack_id))
        if self.on_rows is not None:
            self.on_rows(rows)
        return True

    @staticmethod
    def _row(
        stack: _Stack,
        depth: int,
        interp: Interpreter | None,
        code: int,
        instr: int,
        info: walker.CodeInfo | None,
        cache: dict[tuple[int, int, int], dict[int, dict[str, Any]]],
    ) -> dict[str, Any]:
        base = {"stack_id": _signed64(stack.stack_id), "pid": stack.pid, "depth": depth}
        if info is None or interp is None:
            return base | {"function": f"<unknown code {code:#x}>", "qualname": None, "file": None,
                           "line": -1, "firstlineno": -1, "code_flags": 0, "lasti": -1}  # fmt: skip
        known = cache.setdefault((stack.pid, stack.generation, code), {})
        fields = known.get(instr)
        if fields is None:
            fields = known[instr] = walker.frame_dict(interp.layout, info, code, instr)
        return base | fields

    def take_new_files(self) -> list[tuple[int, str]]:
        """(pid, co_filename) pairs met since the previous call, so that their sources can be
        read while the process (and its mount namespace) still exists."""
        new, self._new_files = self._new_files, []
        return new

    def take_frames(self) -> list[dict[str, Any]]:
        """STACK_FRAMES rows of every stack completed since the previous call."""
        now, waiting = time.monotonic(), []
        for stack in self._pending:
            if (stack.pid, stack.stack_id) in self._done:
                continue
            if not self._resolve(stack, force=now - stack.received > UNRESOLVED_AFTER_S):
                waiting.append(stack)
        self._pending = waiting
        rows, self._rows = self._rows, []
        return rows

    def flush(self) -> list[dict[str, Any]]:
        """Like take_frames, resolving everything still waiting (end of trace)."""
        for stack in self._pending:
            if (stack.pid, stack.stack_id) not in self._done:
                self._resolve(stack, force=True)
        self._pending = []
        rows, self._rows = self._rows, []
        return rows


_btf_warm_started = threading.Event()


def _warm_btf_once() -> None:
    """One warm-up per process: two Symbolizers parsing the same BTF at once cost 0.35 s of CPU
    each, taken from the target when tracer and target share a CPU."""
    if not _btf_warm_started.is_set():
        _btf_warm_started.set()
        threading.Thread(target=warm_btf, daemon=True).start()


def _signed64(value: int) -> int:
    """Stack ids are u64 in the kernel and int64 in the dataset (cmtrace.trace.schema)."""
    return value - (1 << 64) if value >= 1 << 63 else value
