"""Per-process configuration of the kernel Python stack walker (the BPF map `py_targets`).

`PythonTargets.install(pid)` runs at attach, for every followed child at fork, and at exec. It
finds CPython in `pid` (cmtrace.interp.discover), takes its layout (cmtrace.interp.layouts),
validates it by walking the live stacks from /proc/PID/mem (cmtrace.interp.walker) and writes the
per-pid config into `py_targets`. It returns a PythonTarget: "ok", "pending" (right after exec
libpython is not mapped / the runtime not started yet: a background thread finishes the job
within a few ms of it appearing) or "none" with the reason ("not CPython", "layout mismatch:
..."). Without a config the kernel records fds without stacks. A layout that fails validation
later is removed, so no garbage frames are ever recorded. The kernel drops a process's config at
exec (python_forget_process); installing again at exec re-installs it.

Every install gets a new generation, which the kernel stamps on the records it sends; the
`Interpreters` registry maps (pid, generation) to the interpreter the records came from, for
the Symbolizer (cmtrace.record.bpf.stacks).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import struct
import threading
import time
from pathlib import Path
from typing import Any

from cmtrace.interp import walker
from cmtrace.interp.discover import Interpreter, NotPython, NotReady, find_interpreter
from cmtrace.interp.layouts import FRAMES_HEAP, GENERATORS, NO_OFFSET, Layout, LayoutError
from cmtrace.record import procfs
from cmtrace.record.backend import PythonTarget
from cmtrace.record.bpf import btf
from cmtrace.record.bpf.loader import BPF
from cmtrace.record.records import CONFIG_NO_OFFSET, READ_LIMITS

PENDING_POLL_S = 0.001
EXEC_POLL_S = 0.0005
EXEC_WAIT_S = 60.0
VALIDATION_ATTEMPTS = 5
PENDING_GIVE_UP_S = 10.0


class Interpreters:
    """The interpreters configured in the kernel, by the generation their records carry."""

    def __init__(self) -> None:
        self._generations = itertools.count(1)
        self._installed: dict[tuple[int, int], Interpreter] = {}
        # generation -> Interpreter: a forked child shares its parent's generation (the kernel
        # copies the parent's config at fork), so its records resolve before user space has
        # seen the fork.
        self._by_generation: dict[int, Interpreter] = {}

    def new_generation(self) -> int:
        return next(self._generations)

    def add(self, pid: int, generation: int, interp: Interpreter) -> None:
        self._installed[(pid, generation)] = interp
        self._by_generation[generation] = interp

    def add_fork(self, child: int, generation: int, interp: Interpreter) -> None:
        self._installed[(child, generation)] = interp

    def installed(self, pid: int, generation: int) -> Interpreter | None:
        return self._installed.get((pid, generation))

    def lookup(self, pid: int, generation: int) -> Interpreter | None:
        """The interpreter that sent a record stamped (pid, generation), if known."""
        return self._installed.get((pid, generation)) or self._by_generation.get(generation)


def check_reach(layout: Layout) -> None:
    """Every offset the kernel reads must fall inside the bytes it reads (READ_LIMITS)."""
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
        if max(offsets) > READ_LIMITS[group]:
            raise LayoutError(f"{group} offset {max(offsets)} beyond what the kernel walker reads")


def _u16(value: int) -> int:
    return CONFIG_NO_OFFSET if value == NO_OFFSET else value


def config_values(interp: Interpreter, generation: int) -> dict[str, int]:
    """struct py_config (probes/events.h) for `interp`, field by field."""
    lay = interp.layout
    ns = os.stat(f"/proc/{interp.pid}/ns/pid")
    return {
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
        if lay.tstate_exception <= READ_LIMITS["ts"]
        else CONFIG_NO_OFFSET,
        **generator_values(lay.minor),
    }


def generator_values(minor: int) -> dict[str, int]:
    """Where the walker finds a frame's generator (issue 13's liveness check): f_gen (<= 3.10)
    or the embedded frame's offset and owner (3.11+); none of it for an unknown minor."""
    gen = GENERATORS.get(minor)
    if gen is None or gen.frame_gen > READ_LIMITS["frame"]:
        return {"fr_gen": CONFIG_NO_OFFSET, "gen_iframe": CONFIG_NO_OFFSET, "owner_generator": 255}
    owner = gen.owner_generator
    return {
        "fr_gen": _u16(gen.frame_gen),
        "gen_iframe": _u16(gen.gen_iframe),
        "owner_generator": 255 if owner == NO_OFFSET else owner,
    }


def fill_config(leaf: Any, interp: Interpreter, generation: int) -> None:
    """Set every field of a struct py_config (a ctypes leaf of `py_targets`, or the ptrace
    engine's copy of it)."""
    for name, value in config_values(interp, generation).items():
        setattr(leaf, name, value)


def _is_held_child(pid: int) -> bool:
    """A child of this process that still runs this process's command line: about to exec."""
    try:
        ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return False
    return ppid == os.getpid() and procfs.raw_cmdline(pid) == procfs.raw_cmdline(os.getpid())


def _settled(target: PythonTarget) -> bool:
    return target.status == "none" or bool(target.validated_frames)


def _still_same_image(target: PythonTarget) -> bool:
    return target.cmdline is not None and procfs.raw_cmdline(target.pid) == target.cmdline


class PythonTargets:
    """Writes, validates and removes per-pid walker configs on one loaded BPF object."""

    def __init__(self, bpf: BPF, interpreters: Interpreters | None = None) -> None:
        self.bpf = bpf
        self.interpreters = interpreters or Interpreters()

    def install(self, pid: int, after_exec: bool | None = None) -> PythonTarget:
        """Configure the kernel walker for `pid` (see the module docstring).

        `after_exec`: `pid` is about to exec (a child this tracer holds before exec, as in
        `cmtrace run`): return at once and install the moment the new image runs, so even a
        program that lives a few milliseconds gets stacks. None: detect that case (a child of
        this process that still runs this process's command line)."""
        target = PythonTarget(
            pid=pid, status="pending", generation=self.interpreters.new_generation()
        )
        target.as_dict()
        if after_exec is None:
            after_exec = _is_held_child(pid)
        if after_exec:
            self._in_thread(self._install_after_exec, target)
            return target
        try:
            self._install(target)
        except NotReady:
            pass
        if _settled(target):
            target.done.set()
        else:  # not mapped yet, or no Python code has run yet to validate against
            self._in_thread(self._finish_later, target)
        return target

    def installed_interpreter(self, target: PythonTarget) -> Interpreter | None:
        """The interpreter found in an installed target (None if it is not CPython)."""
        return self.interpreters.installed(target.pid, target.generation)

    def inherit(self, parent: PythonTarget, child: int) -> PythonTarget:
        """A child forked by an installed target: the kernel already copied the parent's config
        (see python_inherit_process), so register the same interpreter under the child's pid,
        without reading the child's /proc (it may be gone already)."""
        interp = self.installed_interpreter(parent)
        target = PythonTarget(pid=child, status="ok", version=parent.version,
                              layout_source=parent.layout_source, generation=parent.generation,
                              validated_frames=parent.validated_frames)  # fmt: skip
        if interp is not None:
            self.interpreters.add_fork(
                child, parent.generation, dataclasses.replace(interp, pid=child)
            )
        target.cmdline = parent.cmdline
        target.as_dict()
        target.done.set()
        return target

    # -- the kernel map
    def _write_config(self, interp: Interpreter, generation: int) -> None:
        check_reach(interp.layout)
        if interp.layout.tstate_native_thread_id == NO_OFFSET:
            kconfig = self.bpf["py_kconfig"]
            kconfig[kconfig.Key(0)] = kconfig.Leaf(btf.task_fsbase_offset())
        table = self.bpf["py_targets"]
        leaf = table.Leaf()
        fill_config(leaf, interp, generation)
        table[table.Key(interp.pid)] = leaf

    def _remove_config(self, pid: int) -> None:
        table = self.bpf["py_targets"]
        try:
            del table[table.Key(pid)]
        except KeyError:
            pass

    def _config_present(self, pid: int) -> bool:
        table = self.bpf["py_targets"]
        try:
            table[table.Key(pid)]
        except KeyError:
            return False
        return True

    # -- installing, validating, retrying
    @staticmethod
    def _in_thread(work: Any, target: PythonTarget) -> None:
        threading.Thread(target=work, args=(target,), daemon=True).start()

    def _install(self, target: PythonTarget) -> None:
        """Find, configure (status "ok" from then on), validate; "none" with the reason when the
        process runs no CPython or the layout does not match. NotReady propagates: too early."""
        try:
            interp = find_interpreter(target.pid)
            target.version, target.layout_source = interp.version, interp.layout.source
            self._write_config(interp, target.generation)
        except NotReady:
            raise
        except (NotPython, LayoutError, OSError) as exc:
            self._give_up(target, exc)
            return
        target.cmdline = procfs.raw_cmdline(target.pid)
        self.interpreters.add(target.pid, target.generation, interp)
        target.settle("ok")
        self._validate(target, interp)

    def _validate(self, target: PythonTarget, interp: Interpreter) -> None:
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
                self._give_up(target, exc)

    def _give_up(self, target: PythonTarget, exc: Exception) -> None:
        self._remove_config(target.pid)
        reason = f"layout mismatch: {exc}" if isinstance(exc, LayoutError) else str(exc)
        target.settle("none", reason)

    def _install_after_exec(self, target: PythonTarget) -> None:
        """Wait for an exec (the command line changes) into CPython, then install at once.

        Images that are not CPython (a shell wrapper, chroot, env) are waited through."""
        seen = procfs.raw_cmdline(target.pid)
        deadline = time.monotonic() + EXEC_WAIT_S
        while time.monotonic() < deadline:
            now = procfs.raw_cmdline(target.pid)
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
        self._finish_later(target)

    def _finish_later(self, target: PythonTarget) -> None:
        """Retry until the interpreter is mapped and has run Python code, or the process is
        gone. The kernel drops a process's config when it execs; an install that raced with
        the exec tracepoint is written again while the image is unchanged."""
        try:
            self._retry_install(target)
        finally:  # whatever happened, whoever waits on `done` is released
            if target.status == "pending":
                target.settle("none", "no CPython runtime appeared")
            target.done.set()

    def _retry_install(self, target: PythonTarget) -> None:
        start = time.monotonic()
        while (
            time.monotonic() - start < PENDING_GIVE_UP_S
            and os.path.exists(f"/proc/{target.pid}")
            and not _settled(target)
        ):
            try:
                if target.status == "pending":
                    self._install(target)
                else:
                    interp = self.interpreters.installed(target.pid, target.generation)
                    if interp is None:
                        raise KeyError(target.pid)
                    if not self._config_present(target.pid) and _still_same_image(target):
                        self._write_config(interp, target.generation)
                    self._validate(target, interp)
            except NotReady:
                pass
            except (OSError, LayoutError, struct.error, KeyError):
                return  # the process is gone, or a zombie whose memory reads come back short
            if not _settled(target):  # every ms while a fresh process starts, then calmer
                time.sleep(PENDING_POLL_S if time.monotonic() - start < 0.2 else 0.05)


def warm_btf() -> None:
    """The BTF lookup (<= 3.10 thread matching) takes ~0.2 s: do it before a freshly exec'd
    target races past its first lines."""
    try:
        btf.task_fsbase_offset()
    except btf.BtfError:
        pass  # reported when a <= 3.10 target needs it
