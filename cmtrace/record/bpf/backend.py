"""The BPF backend: syscall tracepoints and the in-kernel Python stack walker (compiled and
loaded by bcc in a child process, loader.py; the maps read with bpf(2), maps.py).

It implements cmtrace.record.backend.Backend over the pieces of this package: the loader
(probes), the ring reader, the decoder (records -> Arrow), the walker configs (targets), the
Symbolizer (stacks) and the --calls USDT probes (calls).
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from cmtrace.record import procfs, spawn
from cmtrace.record.backend import PythonTarget, Records
from cmtrace.record.bpf import loader
from cmtrace.record.bpf.aggregate import AggregateSettings, Aggregator
from cmtrace.record.bpf.calls import CallProbes
from cmtrace.record.bpf.decode import decode, decode_calls
from cmtrace.record.bpf.loader import BPF, ProbeLoadError
from cmtrace.record.bpf.memory import release_compiler_memory
from cmtrace.record.bpf.ring import RingReader
from cmtrace.record.bpf.stacks import Symbolizer
from cmtrace.record.bpf.targets import Interpreters, PythonTargets
from cmtrace.record.generators import BirthGenerators, is_generators_record
from cmtrace.record.options import PAGE_SIZE
from cmtrace.record.records import SETTING_FOLLOW, SETTING_HOLD_PID, SETTING_HOLD_PYTHON, Batch

CALLS_READY_WAIT_S = 30  # --calls: how long to wait for a pending interpreter before arming


class BpfBackend:
    """One loaded probe program: the kernel filter, the ring buffer and the Python targets."""

    name = "bpf"
    attached_note = ""

    def __init__(
        self,
        follow: bool,
        ring_pages: int,
        python_stacks: bool = True,
        calls: bool = False,
        progress: Callable[[str], None] = lambda _text: None,
        aggregate: AggregateSettings | None = None,
    ) -> None:
        self.follow = follow
        self.ring_pages = ring_pages
        self.stacks = python_stacks
        self.calls = calls
        self.progress = progress
        self.start_ns = time.monotonic_ns()
        self.missing_tracepoints: list[str] = []
        self.stack_failure: str | None = None
        self.bpf: BPF = None
        self.ring: RingReader | None = None
        self.targets: PythonTargets | None = None
        self.interpreters = Interpreters()
        # Made now, not after the compile: it starts the BTF warm-up (see warm_btf).
        self.symbolizer = Symbolizer(self.interpreters) if python_stacks else None
        self.generators = BirthGenerators()  # each birth's generator frames (issue 13)
        self.call_probes: CallProbes | None = None
        self.aggregate = (
            aggregate  # --aggregate: counted in the kernel (cmtrace.record.bpf.aggregate)
        )
        self.aggregator: Aggregator | None = None
        self._stopping = False

    # -- setup
    def load(self) -> None:
        """Compile, load and attach the probes. If the kernel refuses the Python stack walker
        (an older verifier may find it too complex), record without stacks and say why."""
        loaded = None
        extra = self.aggregate.cflags() if self.aggregate else ()
        if self.stacks:
            try:
                loaded = loader.load(self.ring_pages, with_stacks=True, calls=self.calls,
                                     extra=extra)  # fmt: skip
            except ProbeLoadError as exc:
                self.stack_failure = f"the Python stack walker could not be loaded ({exc.detail})"
                self.stacks = False
                self.symbolizer = None
        if loaded is None:
            loaded = loader.load(self.ring_pages, with_stacks=False, calls=self.calls, extra=extra)
        self.bpf, self.missing_tracepoints = loaded.bpf, loaded.missing_tracepoints
        if self.follow:
            self._set(SETTING_FOLLOW, 1)
        self.ring = RingReader(self.bpf["events"].map_fd, self.ring_pages * PAGE_SIZE)
        self.start_ns = time.monotonic_ns()  # the trace starts when the probes are live
        if self.stacks:
            self.targets = PythonTargets(self.bpf, self.interpreters)
        if self.calls:
            self.call_probes = CallProbes(self.bpf)
        if self.aggregate:
            self.aggregator = Aggregator(self.bpf, self.aggregate, self.start_ns)
            if self.symbolizer is not None:  # pairs decided within a drain of their first close
                self.symbolizer.on_rows = self.aggregator.note_frames
        if not isinstance(self.bpf, loader.Probes):  # --calls: compiled here (memory.py)
            release_compiler_memory()

    def _set(self, index: int, value: int) -> None:
        self.bpf["settings"][ctypes.c_int(index)] = ctypes.c_uint32(value)

    def trace(self, pid: int) -> None:
        self.bpf["traced"][ctypes.c_uint32(pid)] = ctypes.c_uint64(0)  # see `traced` in the probes

    def start_command(self, command: list[str], user: Any) -> spawn.HeldChild:
        """run: the command forked here, held before its exec until release()."""
        child = spawn.HeldChild(command, user)
        self.trace(child.pid)
        return child

    def stats(self) -> dict[str, int]:
        return {}

    def hold_at_exec(self, pid: int, python_children: bool = True) -> None:
        """The kernel stops pid (SIGSTOP) right after each of its execs, and, with
        `python_children`, any followed process right after it execs a python* image."""
        self._set(SETTING_HOLD_PID, pid)
        self._set(SETTING_HOLD_PYTHON, int(python_children))

    def resume(self, pid: int) -> None:
        spawn.resume(pid)  # the probe stopped it with SIGSTOP

    # -- Python targets
    def watch_python(self, pid: int) -> PythonTarget:
        if self.targets is None:
            return PythonTarget.failed(pid, self.stack_failure or "Python stacks are off")
        if self.call_probes is not None:
            self.call_probes.forget(pid)  # an exec: the old image's semaphores went with it
        target = self.targets.install(pid)
        self._arm_calls(target)
        return target

    def inherit_python(self, parent: PythonTarget, child: int) -> PythonTarget:
        if self.targets is None:
            return PythonTarget.failed(child, self.stack_failure or "Python stacks are off")
        target = self.targets.inherit(parent, child)
        self._arm_calls(target, inherited_from=parent.pid)
        return target

    def _arm_calls(self, target: PythonTarget, inherited_from: int | None = None) -> None:
        """--calls: arm the USDT probes once the target's interpreter is known (at once, or
        from a thread when the interpreter is still loading)."""
        if self.call_probes is None:
            return
        if target.done.is_set() or target.status != "pending":
            self._arm_calls_now(target, inherited_from)
        else:
            threading.Thread(target=self._arm_calls_when_ready, args=(target,), daemon=True).start()

    def _arm_calls_when_ready(self, target: PythonTarget) -> None:
        target.done.wait(timeout=CALLS_READY_WAIT_S)
        self._arm_calls_now(target)

    def _arm_calls_now(self, target: PythonTarget, inherited_from: int | None = None) -> None:
        assert self.call_probes is not None and self.targets is not None
        interp = self.targets.installed_interpreter(target)
        if interp is None:
            target.note_calls("not recorded: " + (target.reason or "no CPython found"))
            return
        try:
            count = self.call_probes.attach(target.pid, interp, inherited_from)
        except Exception as exc:  # evidence only (UsdtError, OSError, bcc): fds still recorded
            why = str(exc)
            if not procfs.is_alive(target.pid):
                why = "the process ended before its probes could be armed"
            target.note_calls(f"not recorded: {why}")
            self.progress(f"--calls in pid {target.pid}: {why}")
            return
        target.note_calls(f"recorded ({count} USDT locations)")

    # -- records
    def drain(self) -> Records | None:
        """Consume everything the kernel has submitted; Python records go to the symbolizer."""
        assert self.ring is not None
        buf, offsets, python_records = self.ring.read()
        if self.symbolizer is not None:
            for record in python_records:
                if is_generators_record(record):
                    self.generators.note(record)
                else:
                    self.symbolizer.on_record(record)
        batch = Batch(buf, offsets)
        shipped = None
        if self.aggregator is not None:
            batch = self.aggregator.filter(batch)
            shipped = self.aggregator.after(batch, stopping=self._stopping)
        if not len(batch) and shipped is None:
            return None
        calls = decode_calls(batch, self.start_ns) if self.call_probes is not None else None
        events = self.generators.attach(decode(batch, self.start_ns), self.start_ns)
        if shipped is not None:  # births out of the kernel's live map, with their own times
            events = pa.concat_tables([events, decode(shipped, self.start_ns)])
            events = events.sort_by([("t_ns", "ascending")])
        return Records(events, calls)

    def take_counters(self) -> pa.Table | None:
        """--aggregate: the counter rows read since the last call (schema.COUNTERS)."""
        return self.aggregator.take_counters() if self.aggregator is not None else None

    def trace_meta(self) -> dict[str, Any]:
        """meta.json facts of this backend: --aggregate's settings and what it counted."""
        return {"aggregate": self.aggregator.meta()} if self.aggregator is not None else {}

    def take_frames(self, final: bool = False) -> list[dict[str, Any]]:
        if self.symbolizer is None:
            return []
        # At the end, stacks still waiting for a code record are resolved as well as can be.
        return self.symbolizer.flush() if final else self.symbolizer.take_frames()

    def take_new_files(self) -> list[tuple[int, str]]:
        return self.symbolizer.take_new_files() if self.symbolizer is not None else []

    def lost_events(self) -> int:
        return int(sum(self.bpf["lost"][ctypes.c_int(0)]))

    # -- the end
    def stop(self) -> None:
        """Stop new events at once (the filter empties) while the probes stay attached; lower
        the --calls semaphores raised in processes still running."""
        self.bpf["traced"].clear()
        self._stopping = True  # the next drain ships every fd still in the live map
        if self.call_probes is not None:
            self.call_probes.disarm()

    def close(self) -> None:
        if self.bpf is None:
            return
        if self.ring is not None:
            self.ring.close()
        loader.detach(self.bpf)
        self.bpf = None
