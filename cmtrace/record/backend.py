"""The seam between the recording session and a recorder backend ("bpf" today, "ptrace" next).

The session (cmtrace.record.session) owns everything both backends share: which processes are
targets, following, the stop conditions, the dataset writer, flushing, end-of-trace evidence
(thread snapshots, source lines) and meta.json. A backend owns how fd events and Python stacks
are observed: it loads its machinery, traces pids, configures the Python stack walker per
process, and hands over what it saw as tables in the dataset's schema.

Threading: the session calls `drain`, `take_frames`, `take_new_files` and `watch_python` from
one thread at a time (it holds a lock around them); a backend may run threads of its own (for
instance to finish configuring a process whose interpreter is still loading) and reports their
outcome through the PythonTarget it returned.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Protocol

import pyarrow as pa


@dataclass
class PythonTarget:
    """What a backend found about the Python interpreter in one traced process.

    `status` "ok" (stacks recorded: `version`, `layout_source`), "pending" (the interpreter is
    still loading: the backend settles it from a thread, within milliseconds usually) or "none"
    (no stacks, `reason` says why). `done` is set once it has settled. `as_dict()` is the
    JSON form meta.json lists under "python", kept current while the target settles.
    """

    pid: int
    status: str  # "ok" | "pending" | "none"
    version: str | None = None
    layout_source: str | None = None
    reason: str | None = None
    calls: str | None = None  # --calls: "recorded (N USDT locations)" or "not recorded: why"
    generation: int = 0  # bumped at every install: records of an older image stop counting
    validated_frames: int = 0  # frames read from the live process that matched the layout
    cmdline: bytes | None = field(default=None, repr=False)  # the image the config is for
    failures: int = field(default=0, repr=False)  # validation failures in a row
    done: threading.Event = field(default_factory=threading.Event, repr=False)
    _view: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def failed(cls, pid: int, reason: str) -> PythonTarget:
        target = cls(pid=pid, status="none", reason=reason)
        target.as_dict()
        target.done.set()
        return target

    @property
    def python(self) -> str | None:
        """The interpreter's version while stacks are recorded for it, else None."""
        return self.version if self.status == "ok" else None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict for meta.json, kept current as a pending target settles."""
        self._view.update(
            pid=self.pid,
            status=self.status,
            python=self.python,
            layout=self.layout_source,
            reason=self.reason,
        )
        if self.calls is not None:
            self._view["calls"] = self.calls
        return self._view

    def settle(self, status: str, reason: str | None = None) -> None:
        self.status, self.reason = status, reason
        self.as_dict()

    def note_calls(self, outcome: str) -> None:
        self.calls = outcome
        self.as_dict()


@dataclass
class Records:
    """What one drain brought: fd events (cmtrace.trace.schema.EVENTS) and --calls records
    (schema.CALLS)."""

    events: pa.Table
    calls: pa.Table | None = None  # None: --calls is off


class Command(Protocol):
    """`cmtrace run`'s command, started by the backend (Backend.start_command): held before
    its first exec until release() (BPF), or held by the tracer at that exec (ptrace)."""

    pid: int

    def release(self) -> None:
        """Let the command exec (or run on past its exec), already traced."""

    def running(self) -> bool:
        """The command itself has not exited yet."""

    def exit_code(self) -> int:
        """Its status as a shell reports it (after running() turned false)."""

    def kill(self) -> None:
        """Kill it before it ran (the recording could not start)."""


class Backend(Protocol):
    """A recorder backend, as the session drives it. In call order:

    load() -> trace(pid) or start_command(), hold_at_exec(pid), watch_python(pid) -> while
    recording: drain(),
    take_frames(), take_new_files(), lost_events(), and at forks and execs inherit_python(),
    watch_python(), resume() -> stop() -> a last drain(), take_frames(final=True) -> close().

    Optional: wait_for_records(timeout) -> bool, waiting until records may be there (True) or
    `timeout` passed (False); a backend that has it lets the session's threads sleep while
    the target makes no fd syscall (ptrace: select on the engines' streams).
    """

    name: str  # "bpf" | "ptrace": recorded in meta.json as `backend`
    start_ns: int  # monotonic ns when the probes went live: t_ns 0 of the trace
    stacks: bool  # Python stacks are being recorded (asked for, and the backend could)
    stack_failure: str | None  # why stacks were given up at load, when they were
    missing_tracepoints: list[str]  # syscalls this kernel cannot observe (meta.json)
    attached_note: str  # words the "attached" line adds about this backend ("" for none)

    def load(self) -> None:
        """Make the backend ready to trace (compile and attach probes); raise CmtraceError
        subclasses with what to do when the host cannot."""

    def trace(self, pid: int) -> None:
        """Record this process's fd events from now on (children join when following)."""

    def start_command(self, command: list[str], user: Any) -> Command:
        """`run`: start command (as `user`, a pwd entry, when not None) so that its first exec
        is recorded; trace() need not be called for it."""

    def stats(self) -> dict[str, int]:
        """The backend's own counters for meta.json (`backend_stats`), e.g. ptrace stops."""

    def hold_at_exec(self, pid: int) -> None:
        """Stop `pid` (SIGSTOP) right after each exec, and any followed process right after it
        execs a python* image, until the session resumes it having seen the exec event; so
        the stack walker is configured before the new image runs its first line."""

    def resume(self, pid: int) -> None:
        """Let a process held at exec (see hold_at_exec) run on."""

    def watch_python(self, pid: int) -> PythonTarget:
        """Configure Python stacks for `pid` (at attach, or after it exec'd a new image: what
        was known of its previous image is dropped); may settle later (see PythonTarget).
        Called only while `stacks` is true."""

    def inherit_python(self, parent: PythonTarget, child: int) -> PythonTarget:
        """A followed fork of an "ok" target: the same interpreter, now in `child` (which may
        already have exited: this must not need to read it)."""

    def drain(self) -> Records | None:
        """Everything observed since the previous drain; None when no fd record arrived
        (Python stack records alone are kept for take_frames)."""

    def take_frames(self, final: bool = False) -> list[dict[str, Any]]:
        """schema.STACK_FRAMES rows of the stacks completed since the previous call; `final`:
        resolve those still waiting as well as can be (end of trace)."""

    def take_new_files(self) -> list[tuple[int, str]]:
        """(pid, co_filename) met since the previous call, so the session can read the sources
        while the process (and its mount namespace) still exists."""

    def lost_events(self) -> int:
        """Events dropped so far (a full ring buffer): counted, never silent."""

    def stop(self) -> None:
        """Observe nothing new from now on; what was already observed can still be drained."""

    def close(self) -> None:
        """Detach everything and free it; safe to call twice."""
