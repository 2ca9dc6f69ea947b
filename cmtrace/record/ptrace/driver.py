"""The Python half of a ptrace recording: the engine's records -> EVENTS tables and stack rows.

Policy stays here, as with BPF: which interpreter runs in a process and its layout
(cmtrace.interp), the walker configuration (the same values symbolize writes into the BPF map),
decoding (bpf.decode.decode) and symbolisation (bpf.stacks.Symbolizer): the records are the
same bytes whichever backend wrote them. The engine holds each exec
(-H) until the new image is configured or declined, so even a short-lived command has stacks;
an interpreter not initialised yet at its exec (a shared libpython) is configured as soon as it
is, retried at every poll.

    recording = EngineRecording.run(["python3", "app.py"])
    while not recording.finished:
        events = recording.poll()        # pyarrow tables with the EVENTS schema
    frames = recording.frames()          # STACK_FRAMES rows of every stack seen
    stats = recording.wait()
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from cmtrace.interp.discover import NotPython, NotReady, find_interpreter
from cmtrace.interp.layouts import LayoutError
from cmtrace.record import records
from cmtrace.record.bpf import decode, stacks, targets
from cmtrace.record.ptrace import wire
from cmtrace.record.ptrace.engine import Engine

POLL_S = 0.02
PENDING_POLL_S = 0.001
PENDING_GIVE_UP_S = 10.0


@dataclass
class EngineRecording:
    engine: Engine
    boot_ns: int = field(default_factory=time.monotonic_ns)
    interpreters: targets.Interpreters = field(default_factory=targets.Interpreters)
    symbolizer: stacks.Symbolizer = field(init=False)
    targets: dict[int, str] = field(default_factory=dict)  # pid -> "ok" / reason
    _pending: dict[int, float] = field(default_factory=dict)  # pid -> since when

    def __post_init__(self) -> None:
        self.symbolizer = stacks.Symbolizer(self.interpreters)

    @classmethod
    def run(cls, argv: list[str], follow: bool = True, **engine) -> EngineRecording:
        return cls(Engine.run(argv, follow=follow, hold_exec=True, **engine))

    @classmethod
    def attach(cls, pid: int, follow: bool = True, **engine) -> EngineRecording:
        recording = cls(Engine.attach(pid, follow=follow, hold_exec=True, **engine))
        recording._configure(pid)
        return recording

    @property
    def finished(self) -> bool:
        return self.engine.finished

    def poll(self, timeout: float = POLL_S) -> pa.Table:
        """The fd events that arrived (waiting up to `timeout`), configuring new images."""
        # a process held until its interpreter is loaded: look again at its next stop, soon
        batch, python_records = self.engine.read(PENDING_POLL_S if self._pending else timeout)
        for record in python_records:
            self.symbolizer.on_record(record)
        if len(batch):
            head = np.frombuffer(batch.buf, np.uint8)[
                np.asarray(batch.offsets)[:, None] + np.arange(records.HEADER_SIZE)
            ]
            for row in head.reshape(-1).view(records.RECORD_HEADER):
                if row["type"] == records.EV_EXEC:
                    self._on_exec(int(row["pid"]))
        for pid, since in list(self._pending.items()):
            if self._configure(pid) or time.monotonic() - since > PENDING_GIVE_UP_S:
                self._pending.pop(pid, None)
                self.engine.resume(pid)
            else:
                self.engine.hold_next(pid)
        return decode.decode(batch, self.boot_ns)

    def _on_exec(self, pid: int) -> None:
        """The engine holds pid after its exec: configure it, or (CPython not loaded yet, as
        with a shared libpython) have it held again at each stop until it can be."""
        if self._configure(pid):
            self.engine.resume(pid)
        else:
            self._pending[pid] = time.monotonic()
            self.engine.hold_next(pid)

    def _configure(self, pid: int) -> bool:
        """Configure pid's walker; False: not initialised yet (retry), True: done or declined."""
        try:
            interp = find_interpreter(pid)
            targets.check_reach(interp.layout)
        except NotReady:
            return False
        except (NotPython, LayoutError, OSError) as exc:
            self.targets[pid] = str(exc)
            return True
        generation = self.interpreters.new_generation()
        config = wire.PyConfig()
        targets.fill_config(config, interp, generation)
        self.interpreters.add(pid, generation, interp)  # how the Symbolizer decodes its records
        self.engine.configure(pid, config)
        self.targets[pid] = "ok"
        return True

    def frames(self) -> list[dict]:
        return self.symbolizer.flush()

    def wait(self, timeout: float | None = None) -> dict:
        return self.engine.wait(timeout)
