"""The Python half of a ptrace recording: the engine's records -> EVENTS tables and stack rows.

Policy stays here, as with BPF: which interpreter runs in a process and its layout
(cmtrace.interp), the walker configuration (the same values symbolize writes into the BPF map),
validation of the layout against the live stacks (interp.walker.validate, before any frame is
trusted), decoding (bpf.decode.decode) and symbolisation (bpf.stacks.Symbolizer): the records
are the same bytes whichever backend wrote them. The engine holds each exec (-H) until the new
image is configured or declined, so even a short-lived command has stacks; an interpreter not
initialised yet at its exec (a shared libpython) is configured as soon as it is, retried at
every poll while the engine holds it at each stop.

    recording = EngineRecording.run(["python3", "app.py"])
    while not recording.finished:
        events = recording.poll()        # pyarrow tables with the EVENTS schema
    frames = recording.frames()          # STACK_FRAMES rows of every stack seen
    stats = recording.wait()
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from cmtrace.interp import walker
from cmtrace.interp.discover import Interpreter, NotPython, NotReady, find_interpreter
from cmtrace.interp.layouts import LayoutError
from cmtrace.record import procfs, records
from cmtrace.record.backend import PythonTarget
from cmtrace.record.bpf import decode, stacks, targets
from cmtrace.record.generators import BirthGenerators, is_generators_record
from cmtrace.record.ptrace import wire
from cmtrace.record.ptrace.engine import Engine

POLL_S = 0.02
PENDING_POLL_S = 0.001
PENDING_GIVE_UP_S = 10.0
VALIDATION_ATTEMPTS = 5  # a stack changing under the reader fails once; a wrong layout always
REVALIDATE_S = 0.05  # no Python frame yet to check the layout against: look again this often
REVALIDATE_GIVE_UP_S = 10.0
CMDLINES_KEPT = 4096  # argv read at exec, not taken yet
_EMPTY_EVENTS = decode.decode(records.Batch(b"", []), 0)  # what an idle poll returns


@dataclass
class EngineRecording:
    engine: Engine
    boot_ns: int = field(default_factory=time.monotonic_ns)
    interpreters: targets.Interpreters = field(default_factory=targets.Interpreters)
    symbolizer: stacks.Symbolizer = field(init=False)
    generators: BirthGenerators = field(default_factory=BirthGenerators)
    targets: dict[int, PythonTarget] = field(default_factory=dict)  # pid -> its interpreter
    stacks: bool = True  # configure Python stacks (off: fds only; execs are resumed at once)
    _pending: dict[int, float] = field(default_factory=dict)  # held pid -> since when
    _unvalidated: dict[int, tuple[Interpreter, float]] = field(default_factory=dict)
    _last_validation: float = 0.0
    # pid -> its argv, read at its exec while the engine still holds it: a short-lived child
    # (a `python -c` snippet) may be gone by the time the session looks at /proc (take_cmdlines)
    cmdlines: dict[int, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.symbolizer = stacks.Symbolizer(self.interpreters, warm=False)  # no BPF: no BTF

    @classmethod
    def run(cls, argv: list[str], follow: bool = True, stacks: bool = True,
            **engine: Any) -> EngineRecording:  # fmt: skip
        return cls(Engine.run(argv, follow=follow, hold_exec=True, **engine), stacks=stacks)

    @classmethod
    def attach(cls, pid: int, follow: bool = True, configure: bool = True,
               stacks: bool = True, **engine: Any) -> EngineRecording:  # fmt: skip
        recording = cls(Engine.attach(pid, follow=follow, hold_exec=True, **engine), stacks=stacks)
        if configure and stacks:
            recording.watch(pid)
        return recording

    @property
    def finished(self) -> bool:
        return self.engine.finished

    def poll(self, timeout: float = POLL_S) -> pa.Table:
        """The fd events that arrived (waiting up to `timeout`), configuring new images."""
        # a process held until its interpreter is loaded: look again at its next stop, soon
        batch, python_records = self.engine.read(PENDING_POLL_S if self._pending else timeout)
        return self.take(batch, python_records)

    def take(self, batch: records.Batch, python_records: list[bytes]) -> pa.Table:
        """Decode what the engine sent, configuring the images that exec'd in it."""
        if not len(batch) and not python_records:  # idle: no numpy/Arrow work per poll
            self._retry_pending()
            self._revalidate()
            return _EMPTY_EVENTS
        for record in python_records:
            if is_generators_record(record):
                self.generators.note(record)
            else:
                self.symbolizer.on_record(record)
        for pid in self._exec_pids(batch):
            self._on_exec(pid)
        self._retry_pending()
        self._revalidate()
        return self.generators.attach(decode.decode(batch, self.boot_ns), self.boot_ns)

    @staticmethod
    def _exec_pids(batch: records.Batch) -> list[int]:
        if not len(batch):
            return []
        head = batch.headers()  # gathered once: decode uses them too
        pids: list[int] = head["pid"][head["type"] == records.EV_EXEC].astype(int).tolist()
        return pids

    def _on_exec(self, pid: int) -> None:
        """The engine holds pid after its exec: configure it, or (CPython not loaded yet, as
        with a shared libpython) have it held again at each stop until it can be."""
        self.cmdlines[pid] = procfs.cmdline(pid)
        if len(self.cmdlines) > CMDLINES_KEPT:  # nobody takes them: keep only the latest
            del self.cmdlines[next(iter(self.cmdlines))]
        if not self.stacks:
            self.engine.resume(pid)
            return
        self._unvalidated.pop(pid, None)
        self.engine.forget(pid)  # what was known of the previous image went with it
        target = self._new_target(pid)
        if self._configure(target):
            self.engine.resume(pid)
        else:
            self._pending[pid] = time.monotonic()
            self.engine.hold_next(pid)

    def watch(self, pid: int) -> PythonTarget:
        """Configure pid's walker now (at attach); a process whose CPython is not ready yet is
        retried at every poll."""
        target = self._new_target(pid)
        if not self._configure(target):
            self._pending[pid] = time.monotonic()
        return target

    def _new_target(self, pid: int) -> PythonTarget:
        target = PythonTarget(pid=pid, status="pending", generation=0)
        target.as_dict()
        self.targets[pid] = target
        return target

    def _retry_pending(self) -> None:
        for pid, since in list(self._pending.items()):
            target = self.targets[pid]
            gone = not os.path.exists(f"/proc/{pid}")
            if gone or self._configure(target) or time.monotonic() - since > PENDING_GIVE_UP_S:
                self._pending.pop(pid, None)
                if target.status == "pending":
                    target.settle("none", "no CPython runtime appeared")
                target.done.set()
                self.engine.resume(pid)
            else:
                self.engine.hold_next(pid)

    def _configure(self, target: PythonTarget) -> bool:
        """Configure the walker of target.pid; False: not initialised yet (retry), True: done
        (status "ok", validated or to be validated) or declined (status "none", the reason)."""
        pid = target.pid
        try:
            interp = find_interpreter(pid)
            targets.check_reach(interp.layout)
        except NotReady:
            return False
        except (NotPython, LayoutError, OSError) as exc:
            reason = f"layout mismatch: {exc}" if isinstance(exc, LayoutError) else str(exc)
            target.settle("none", reason)
            target.done.set()
            return True
        target.version, target.layout_source = interp.version, interp.layout.source
        target.cmdline = procfs.raw_cmdline(pid)
        if not self._validate(target, interp, attempts=VALIDATION_ATTEMPTS):
            target.done.set()
            return True
        target.generation = self.interpreters.new_generation()
        config = wire.PyConfig()
        targets.fill_config(config, interp, target.generation)
        self.interpreters.add(pid, target.generation, interp)  # how the Symbolizer decodes
        self.engine.configure(pid, config)
        target.settle("ok")
        if not target.validated_frames:  # no Python frame yet (just after exec): later
            self._unvalidated[pid] = (interp, time.monotonic())
        target.done.set()
        return True

    def _validate(self, target: PythonTarget, interp: Interpreter, attempts: int = 1) -> bool:
        """Check the layout on the live stacks (as the BPF backend does); False: it does not
        match and the target is declined. A process with no Python frame yet passes for now."""
        for _ in range(attempts):
            try:
                target.validated_frames = walker.validate(interp)
                target.failures = 0
                return True
            except LayoutError as exc:
                if not os.path.exists(f"/proc/{target.pid}/mem"):
                    return True  # it exited while we looked: nothing was wrong with the layout
                target.failures += 1
                failure = exc
        target.settle("none", f"layout mismatch: {failure}")
        return False

    def _revalidate(self) -> None:
        """Targets configured before any Python frame existed: validate once one does; a
        layout that fails is removed from the engine, so no garbage frames are recorded."""
        now = time.monotonic()
        if not self._unvalidated or now - self._last_validation < REVALIDATE_S:
            return
        self._last_validation = now
        for pid, (interp, since) in list(self._unvalidated.items()):
            target = self.targets.get(pid)
            if target is None or target.status != "ok" or not os.path.exists(f"/proc/{pid}"):
                self._unvalidated.pop(pid, None)
                continue
            # as at configure time: a stack changing under the reader fails once, not always
            if not self._validate(target, interp, attempts=VALIDATION_ATTEMPTS):
                self.engine.forget(pid)
                self._unvalidated.pop(pid, None)
            elif target.validated_frames or now - since > REVALIDATE_GIVE_UP_S:
                self._unvalidated.pop(pid, None)

    def take_cmdlines(self) -> dict[int, list[str]]:
        """The argv of each process that exec'd since the last call, read while it was held."""
        taken, self.cmdlines = self.cmdlines, {}
        return taken

    def frames(self) -> list[dict[str, Any]]:
        return self.symbolizer.flush()

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        return self.engine.wait(timeout)
