"""Python stacks from the kernel walker (probes/pystack.h) -> rows of schema.STACK_FRAMES.

The collector uses these:

``inline_pystack(source) -> str``
    The BPF source with probes/pystack.h pasted over its ``#include "pystack.h"`` line (bcc
    rewrites map calls only in the main file).

``install_python_target(bpf, pid, after_exec=None) -> PythonTarget``
    At attach, for every followed child at fork, and at exec. Finds CPython in `pid`
    (cmtrace.interp.discover), takes its layout (cmtrace.interp.layouts), validates it by walking the live
    stacks from /proc/PID/mem (cmtrace.interp.walker) and writes the per-pid config into the BPF map
    `py_targets`. Returns what it found: `status` "ok" (version, layout source), "pending"
    (right after exec libpython is not mapped / the runtime not started yet: a background
    thread finishes the job within a few ms of it appearing) or "none" with `reason` ("not
    CPython", "layout mismatch: ..."). Without a config the kernel records fds without stacks.
    A layout that fails validation later is removed, so no garbage frames are ever recorded.
    `as_dict()` is the JSON form for meta.json (kept current while a target settles); `done`
    is set once it has settled. `after_exec=True` (detected for a child this tracer holds
    before its exec) installs the moment the new image runs. The kernel drops a process's
    config at exec (python_forget_process); calling this again at exec re-installs it.

``Symbolizer``
    `on_record(raw)` takes every ring-buffer record of type >= 100 (stack and code records);
    `take_frames()` returns the STACK_FRAMES rows of the stacks completed since the last call,
    `flush()` the same at the end of a trace (unresolved frames become "<unknown code 0x...>"),
    `take_new_files()` the (pid, co_filename) pairs met since the last call.
    Code records precede the stacks that use them; a stack whose code objects were sent by a
    concurrent event on another CPU waits for them (or is read from /proc/PID/mem).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from cmtrace.interp import walker
from cmtrace.interp.discover import Interpreter, NotPython, NotReady, find_interpreter
from cmtrace.interp.layouts import FRAMES_HEAP, NO_OFFSET, Layout, LayoutError
from cmtrace.record.bpf import btf
from cmtrace.trace import schema

REC_STACK = 100
REC_CODE = 101
STACK_FINALIZING = schema.STACK_FINALIZING

# Sizes inside probes/pystack.h (PY_TSTATE_READ, PY_FRAME_READ, PY_CODE_READ, PY_STR_HEAD):
# every offset the kernel reads must fall inside them.
_READ_LIMITS = {"ts": 312, "frame": 104, "code": 152, "str": 32}
_NO = 0xFFFF
_STACK_HEAD = struct.Struct("<QIIHHIQII")
_FRAME = struct.Struct("<QQ")
_CODE_HEAD = struct.Struct("<QIIHHHHQIIiIIIIIII")
_NAME_AT, _QUALNAME_AT, _FILE_AT, _LINETABLE_AT = 72, 328, 584, 1608
PENDING_POLL_S = 0.001
EXEC_POLL_S = 0.0005
EXEC_WAIT_S = 60.0
VALIDATION_ATTEMPTS = 5
PENDING_GIVE_UP_S = 10.0
UNRESOLVED_AFTER_S = 2.0

_INCLUDE_LINE = '#include "pystack.h"'

_generations = itertools.count(1)
# (pid, generation) -> Interpreter, shared by install_python_target and the Symbolizer.
_installed: dict[tuple[int, int], Interpreter] = {}
# generation -> Interpreter: a forked child shares its parent's generation (the kernel copies
# the parent's config at fork), so its records resolve before user space has seen the fork.
_by_generation: dict[int, Interpreter] = {}


def _interpreter(pid: int, generation: int) -> Interpreter | None:
    return _installed.get((pid, generation)) or _by_generation.get(generation)


@dataclass
class PythonTarget:
    pid: int
    status: str  # "ok" | "pending" | "none"
    version: str | None = None
    layout_source: str | None = None
    reason: str | None = None
    generation: int = 0
    validated_frames: int = 0
    cmdline: bytes | None = field(default=None, repr=False)
    failures: int = field(default=0, repr=False)
    done: threading.Event = field(default_factory=threading.Event, repr=False)
    _view: dict = field(default_factory=dict, repr=False)

    def as_dict(self) -> dict:
        """A JSON-ready dict for meta.json, kept current as a pending target settles."""
        self._view.update(
            pid=self.pid,
            status=self.status,
            python=self.version if self.status == "ok" else None,
            layout=self.layout_source,
            reason=self.reason,
        )
        return self._view

    def settle(self, status: str, reason: str | None = None) -> None:
        self.status, self.reason = status, reason
        self.as_dict()


def inline_pystack(source: str, header: Path | None = None) -> str:
    """`source` with its `#include "pystack.h"` line replaced by the walker itself.

    bcc rewrites map method calls only in the main file, so the walker must be pasted in."""
    text = (header or _pystack_header()).read_text()
    return source.replace(_INCLUDE_LINE, "#define CMTRACE_PYSTACK_INLINED 1\n" + text, 1)


def _pystack_header() -> Path:
    from cmtrace import probes  # the installed package's copy (editable or not)

    return Path(probes.__file__).parent / "pystack.h"


def _u16(value: int) -> int:
    return _NO if value == NO_OFFSET else value


def _check_reach(layout: Layout) -> None:
    groups = {
        "ts": (layout.tstate_next, layout.tstate_thread_id, layout.tstate_native_thread_id,
               layout.tstate_frame, layout.tstate_datastack_chunk, layout.tstate_datastack_top),
        "frame": (layout.frame_code, layout.frame_previous, layout.frame_instr, layout.frame_owner,
                  layout.frame_globals),
        "code": (layout.ob_type, layout.code_flags, layout.code_firstlineno, layout.code_argcount,
                 layout.code_filename, layout.code_name, layout.code_qualname, layout.code_linetable),
        "str": (layout.unicode_length, layout.unicode_state),
    }  # fmt: skip
    for group, offsets in groups.items():
        if max(offsets) > _READ_LIMITS[group]:
            raise LayoutError(f"{group} offset {max(offsets)} beyond what the kernel walker reads")


def _fill_config(leaf, interp: Interpreter, generation: int) -> None:
    lay = interp.layout
    ns = os.stat(f"/proc/{interp.pid}/ns/pid")
    values = {
        "interp_head_addr": interp.interpreters_head_addr,
        "finalizing_addr": interp.finalizing_addr,
        "code_type": interp.code_type,
        "none_addr": interp.none or 1,
        "pidns_dev": ns.st_dev,
        "pidns_ino": ns.st_ino,
        "code_tag_mask": lay.code_tag_mask,
        "generation": generation,
        "frames": 1 if lay.frames == FRAMES_HEAP else 2,
        "match_native_tid": int(lay.tstate_native_thread_id != NO_OFFSET),
        "owner_not_python": min(lay.owner_not_python, 255),
        "interp_next": lay.interp_next,
        "interp_threads_head": lay.interp_threads_head,
        "ts_next": lay.tstate_next,
        "ts_thread_id": lay.tstate_thread_id,
        "ts_native_thread_id": _u16(lay.tstate_native_thread_id),
        "ts_frame": lay.tstate_frame,
        "cframe_current_frame": _u16(lay.cframe_current_frame),
        "ts_chunk": _u16(lay.tstate_datastack_chunk),
        "ts_top": _u16(lay.tstate_datastack_top),
        "chunk_data": max(lay.chunk_data, 0),
        "fr_code": lay.frame_code,
        "fr_previous": lay.frame_previous,
        "fr_globals": lay.frame_globals,
        "fr_instr": lay.frame_instr,
        # heap frames have no owner: point at ob_refcnt's top byte (0) and never skip
        "fr_owner": lay.frame_owner if lay.frame_owner != NO_OFFSET else 7,
        "co_flags": lay.code_flags,
        "co_firstlineno": lay.code_firstlineno,
        "co_argcount": lay.code_argcount,
        "co_filename": lay.code_filename,
        "co_name": lay.code_name,
        "co_qualname": _u16(lay.code_qualname),
        "co_linetable": lay.code_linetable,
        "ob_type": lay.ob_type,
        "bytes_size": lay.bytes_size,
        "bytes_data": lay.bytes_data,
        "str_length": lay.unicode_length,
        "str_state": lay.unicode_state,
        "str_ascii": lay.unicode_ascii_size,
        "str_compact": lay.unicode_compact_size,
        # beyond the thread-state bytes the walker reads: --calls cannot tell raise from return
        "ts_exception": _u16(lay.tstate_exception)
        if lay.tstate_exception <= _READ_LIMITS["ts"]
        else _NO,
    }
    for name, value in values.items():
        setattr(leaf, name, value)


def _write_config(bpf, interp: Interpreter, generation: int) -> None:
    _check_reach(interp.layout)
    if interp.layout.tstate_native_thread_id == NO_OFFSET:
        kconfig = bpf["py_kconfig"]
        kconfig[kconfig.Key(0)] = kconfig.Leaf(btf.task_fsbase_offset())
    table = bpf["py_targets"]
    leaf = table.Leaf()
    _fill_config(leaf, interp, generation)
    table[table.Key(interp.pid)] = leaf


def _remove_config(bpf, pid: int) -> None:
    table = bpf["py_targets"]
    try:
        del table[table.Key(pid)]
    except KeyError:
        pass


def install_python_target(bpf, pid: int, after_exec: bool | None = None) -> PythonTarget:
    """Configure the kernel walker for `pid` (see the module docstring).

    `after_exec`: `pid` is about to exec (a child this tracer holds before exec, as in
    `cmtrace run`): return at once and install the moment the new image runs, so even a
    program that lives a few milliseconds gets stacks. None: detect that case (a child of this
    process that still runs this process's command line)."""
    target = PythonTarget(pid=pid, status="pending", generation=next(_generations))
    target.as_dict()
    if after_exec is None:
        after_exec = _is_held_child(pid)
    if after_exec:
        threading.Thread(target=_install_after_exec, args=(bpf, target), daemon=True).start()
        return target
    try:
        _install(bpf, target)
    except NotReady:
        pass
    if _settled(target):
        target.done.set()
    else:  # not mapped yet, or no Python code has run yet to validate against
        threading.Thread(target=_finish_later, args=(bpf, target), daemon=True).start()
    return target


def installed_interpreter(target: PythonTarget) -> Interpreter | None:
    """The interpreter found in an installed target (None if it is not CPython)."""
    return _installed.get((target.pid, target.generation))


def inherit_python_target(parent: PythonTarget, child: int) -> PythonTarget:
    """A child forked by an installed target: the kernel already copied the parent's config
    (see python_inherit_process), so register the same interpreter under the child's pid,
    without reading the child's /proc (it may be gone already)."""
    interp = installed_interpreter(parent)
    target = PythonTarget(pid=child, status="ok", version=parent.version,
                          layout_source=parent.layout_source, generation=parent.generation,
                          validated_frames=parent.validated_frames)  # fmt: skip
    if interp is not None:
        _installed[(child, parent.generation)] = dataclasses.replace(interp, pid=child)
    target.cmdline = parent.cmdline
    target.as_dict()
    target.done.set()
    return target


def _cmdline(pid: int) -> bytes | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return None


def _is_held_child(pid: int) -> bool:
    try:
        ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return False
    return ppid == os.getpid() and _cmdline(pid) == _cmdline(os.getpid())


def _install_after_exec(bpf, target: PythonTarget) -> None:
    """Wait for an exec (the command line changes) into CPython, then install at once.

    Images that are not CPython (a shell wrapper, chroot, env) are waited through."""
    seen = _cmdline(target.pid)
    deadline = time.monotonic() + EXEC_WAIT_S
    while time.monotonic() < deadline:
        now = _cmdline(target.pid)
        if now is None:
            target.settle("none", "the process exited before running Python")
            target.done.set()
            return
        if now != seen:
            seen = now
            try:
                find_interpreter(target.pid)
                break
            except NotReady:
                break
            except NotPython:
                pass  # may exec again
        time.sleep(EXEC_POLL_S)
    _finish_later(bpf, target)


def _config_present(bpf, pid: int) -> bool:
    table = bpf["py_targets"]
    try:
        table[table.Key(pid)]
    except KeyError:
        return False
    return True


def _install(bpf, target: PythonTarget) -> None:
    """Find, configure (status "ok" from then on), validate; "none" with the reason when the
    process runs no CPython or the layout does not match. NotReady propagates: too early."""
    try:
        interp = find_interpreter(target.pid)
        target.version, target.layout_source = interp.version, interp.layout.source
        _write_config(bpf, interp, target.generation)
    except NotReady:
        raise
    except (NotPython, LayoutError, OSError) as exc:
        _give_up(bpf, target, exc)
        return
    target.cmdline = _cmdline(target.pid)
    _installed[(target.pid, target.generation)] = interp
    _by_generation[target.generation] = interp
    target.settle("ok")
    _validate(bpf, target, interp)


def _validate(bpf, target: PythonTarget, interp: Interpreter) -> None:
    """A wrong layout fails every time; a stack changing under the reader (startup, exit)
    fails once: give up only after VALIDATION_ATTEMPTS failures in a row."""
    try:
        target.validated_frames = walker.validate(interp)
        target.failures = 0
    except LayoutError as exc:
        if not os.path.exists(f"/proc/{target.pid}/mem"):
            return  # it exited while we looked: nothing was wrong with the layout
        target.failures += 1
        if target.failures >= VALIDATION_ATTEMPTS:
            _give_up(bpf, target, exc)


def _give_up(bpf, target: PythonTarget, exc: Exception) -> None:
    _remove_config(bpf, target.pid)
    reason = f"layout mismatch: {exc}" if isinstance(exc, LayoutError) else str(exc)
    target.settle("none", reason)


def _settled(target: PythonTarget) -> bool:
    return target.status == "none" or bool(target.validated_frames)


def _still_same_image(target: PythonTarget) -> bool:
    return target.cmdline is not None and _cmdline(target.pid) == target.cmdline


def _finish_later(bpf, target: PythonTarget) -> None:
    """Retry until the interpreter is mapped and has run Python code, or the process is gone.

    The kernel drops a process's config when it execs; an install that raced with the exec
    tracepoint is written again while the image is unchanged."""
    try:
        _retry_install(bpf, target)
    finally:  # whatever happened, whoever waits on `done` is released
        if target.status == "pending":
            target.settle("none", "no CPython runtime appeared")
        target.done.set()


def _retry_install(bpf, target: PythonTarget) -> None:
    start = time.monotonic()
    while (
        time.monotonic() - start < PENDING_GIVE_UP_S
        and os.path.exists(f"/proc/{target.pid}")
        and not _settled(target)
    ):
        try:
            if target.status == "pending":
                _install(bpf, target)
            else:
                interp = _installed[(target.pid, target.generation)]
                if not _config_present(bpf, target.pid) and _still_same_image(target):
                    _write_config(bpf, interp, target.generation)
                _validate(bpf, target, interp)
        except NotReady:
            pass
        except (OSError, LayoutError, struct.error, KeyError):
            return  # the process is gone, or a zombie whose memory reads come back short
        if not _settled(target):  # every ms while a fresh process starts, then calmer
            time.sleep(PENDING_POLL_S if time.monotonic() - start < 0.2 else 0.05)


def _warm_btf() -> None:
    try:
        btf.task_fsbase_offset()
    except btf.BtfError:
        pass  # reported when a <= 3.10 target needs it


# --- records -> frames ---------------------------------------------------------------------


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

    def __init__(self) -> None:
        # The BTF lookup (<= 3.10 thread matching) takes ~0.2 s: do it now, not while a
        # freshly exec'd target races past its first lines.
        threading.Thread(target=_warm_btf, daemon=True).start()
        self._codes: dict[tuple[int, int, int], walker.CodeInfo] = {}
        self._truncated_tables: set[tuple[int, int, int]] = set()
        self._pending: list[_Stack] = []
        self._done: set[tuple[int, int]] = set()
        self._rows: list[dict] = []
        self._files: set[tuple[int, str]] = set()
        self._new_files: list[tuple[int, str]] = []

    def on_record(self, raw: bytes) -> None:
        rtype = struct.unpack_from("<H", raw, 16)[0]
        if rtype == REC_CODE:
            self._on_code(raw)
        elif rtype == REC_STACK:
            self._on_stack(raw)

    def _on_code(self, raw: bytes) -> None:
        (_ts, pid, _tid, _type, name_len, qual_len, file_len, code, gen, _ck, first, flags,
         _argc, name_st, qual_st, file_st, lt_len, lt_total) = _CODE_HEAD.unpack_from(raw)  # fmt: skip
        interp = _interpreter(pid, gen)
        name = _decode_text(interp, name_st, raw[_NAME_AT : _NAME_AT + name_len])
        qualname = (
            _decode_text(interp, qual_st, raw[_QUALNAME_AT : _QUALNAME_AT + qual_len]) or name
        )
        key = (pid, gen, code)
        filename = _decode_text(interp, file_st, raw[_FILE_AT : _FILE_AT + file_len])
        if filename and (pid, filename) not in self._files:
            self._files.add((pid, filename))
            self._new_files.append((pid, filename))
        self._codes[key] = walker.CodeInfo(
            name=name,
            qualname=qualname,
            filename=filename,
            firstlineno=first,
            flags=flags,
            linetable=raw[_LINETABLE_AT : _LINETABLE_AT + lt_len],
        )
        if lt_len < lt_total:
            self._truncated_tables.add(key)
        else:
            self._truncated_tables.discard(key)

    def _on_stack(self, raw: bytes) -> None:
        _ts, pid, _tid, _type, nframes, _flags, stack_id, gen, _pad = _STACK_HEAD.unpack_from(raw)
        if (pid, stack_id) in self._done:
            return
        frames = [_FRAME.unpack_from(raw, _STACK_HEAD.size + 16 * i) for i in range(nframes)]
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
        interp = _interpreter(stack.pid, stack.generation)
        if interp is None:
            return None
        try:
            with walker.Memory(stack.pid) as mem:
                info = walker.read_code(mem, interp, code)
        except (OSError, LayoutError, struct.error):
            return None
        key = (stack.pid, stack.generation, code)
        self._codes[key] = info
        self._truncated_tables.discard(key)
        return info

    def _resolve(self, stack: _Stack, force: bool) -> bool:
        infos = [self._code(stack, code, force) for code, _ in stack.frames]
        if any(info is None for info in infos) and not force:
            return False
        interp = _interpreter(stack.pid, stack.generation)
        for depth, ((code, instr), info) in enumerate(zip(stack.frames, infos)):
            self._rows.append(self._row(stack, depth, interp, code, instr, info))
        self._done.add((stack.pid, stack.stack_id))
        return True

    @staticmethod
    def _row(stack: _Stack, depth: int, interp, code: int, instr: int, info) -> dict:
        base = {"stack_id": _signed64(stack.stack_id), "pid": stack.pid, "depth": depth}
        if info is None or interp is None:
            return base | {"function": f"<unknown code {code:#x}>", "qualname": None, "file": None,
                           "line": -1, "firstlineno": -1, "code_flags": 0, "lasti": -1}  # fmt: skip
        return base | walker.frame_dict(interp.layout, info, code, instr)

    def take_new_files(self) -> list[tuple[int, str]]:
        """(pid, co_filename) pairs met since the previous call, so that their sources can be
        read while the process (and its mount namespace) still exists."""
        new, self._new_files = self._new_files, []
        return new

    def take_frames(self) -> list[dict]:
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

    def flush(self) -> list[dict]:
        """Like take_frames, resolving everything still waiting (end of trace)."""
        for stack in self._pending:
            if (stack.pid, stack.stack_id) not in self._done:
                self._resolve(stack, force=True)
        self._pending = []
        rows, self._rows = self._rows, []
        return rows


def _signed64(value: int) -> int:
    """Stack ids are u64 in the kernel and int64 in the dataset (cmtrace.trace.schema)."""
    return value - (1 << 64) if value >= 1 << 63 else value
