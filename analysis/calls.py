"""`--calls` evidence: the __enter__/__exit__ (and async) calls a trace recorded, paired.

The recorder writes one row per USDT function__entry or function__return of the four dunder
methods (schema.CALLS), each with the Python stack at the probe: frame 0 is the method itself,
frame 1 its caller (the function running the `with` statement). Here entries and returns are
paired per thread, so the causes can ask:

- which `__enter__` was running when an fd was born, and did it raise? (`enter-raised`)
- which `__exit__` did the `with` statement holding the fd call afterwards, and did it raise,
  return normally, or never run? (`exit-raised`, or evidence for `with-exited-without-close`)
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pandas as pd

from cmtrace.analysis.code import Frame
from cmtrace.trace import schema
from cmtrace.trace.reader import read_table

ENTERS = ("__enter__", "__aenter__")
EXITS = ("__exit__", "__aexit__")
ASYNC = ("__aenter__", "__aexit__")


@dataclass(frozen=True)
class Call:
    function: str
    entry_ns: int
    return_ns: int | None  # None: still running when recording stopped (or the process died)
    raised: bool | None  # None: not known (no return seen, or the layout cannot tell)
    method: Frame | None  # the dunder method's own frame
    caller: Frame | None  # the frame that called it

    def where(self) -> str:
        if self.method is None:
            return self.function
        return f"{self.method.qualname or self.function} ({self.method.file}:{self.method.firstlineno})"


class StackFrames(Protocol):
    """Stack id -> its frames, innermost first (`default` when not recorded): analysis.stacks."""

    def get(self, stack_id: int, default: list[Frame], /) -> list[Frame]: ...


class CallLog:
    """Paired calls, per (pid, tid), in entry order."""

    def __init__(self, by_thread: dict[tuple[int, int], list[Call]], pids: set[int]):
        self.by_thread = by_thread
        self.pids = pids  # processes in which --calls was armed (absence there is evidence)
        self._starts = {key: [c.entry_ns for c in calls] for key, calls in by_thread.items()}

    @classmethod
    def from_trace(cls, path: Path, meta: dict, frames: StackFrames) -> CallLog:
        """The calls of a trace directory (empty when it was recorded without --calls)."""
        armed = {
            int(t["pid"])
            for t in meta.get("python") or []
            if str(t.get("calls", "")).startswith("recorded")
        }
        if not armed:
            return cls({}, set())
        calls = read_table(path / "calls", schema.CALLS).to_pandas()
        # Only where the probes demonstrably fired is a missing __exit__ evidence.
        firing = armed & set(calls["pid"].astype(int).tolist())
        return cls.from_table(calls, frames, firing)

    @classmethod
    def from_table(cls, calls: pd.DataFrame, frames: StackFrames, armed_pids: set[int]) -> CallLog:
        by_thread: dict[tuple[int, int], list[Call]] = {}
        ordered = calls.sort_values("t_ns", kind="stable")
        for (pid, tid), rows in ordered.groupby(["pid", "tid"], sort=False):
            by_thread[(int(pid), int(tid))] = _pair(rows, frames)
        return cls(by_thread, armed_pids)

    def __bool__(self) -> bool:
        return bool(self.pids)

    def enter_around(self, pid: int, tid: int, t_ns: int) -> Call | None:
        """The innermost __enter__/__aenter__ running on the thread at t_ns."""
        calls = self.by_thread.get((pid, tid), [])
        stop = bisect_right(self._starts.get((pid, tid), []), t_ns)
        for call in reversed(calls[:stop]):
            if call.function in ENTERS and (call.return_ns is None or call.return_ns >= t_ns):
                return call
        return None

    def exit_after(
        self, pid: int, tid: int, t_ns: int, caller: Frame, span: tuple[int, int]
    ) -> Call | None:
        """The first __exit__/__aexit__ entered after t_ns by the `with` statement whose frame is
        `caller` (same file and function, line within the statement's span)."""
        calls = self.by_thread.get((pid, tid), [])
        start = bisect_right(self._starts.get((pid, tid), []), t_ns)
        for call in calls[start:]:
            if call.function in EXITS and _same_with(call.caller, caller, span):
                return call
        return None


def _pair(rows: pd.DataFrame, frames: StackFrames) -> list[Call]:
    """Entries and returns of one thread into calls: a return closes the latest open entry of
    the same method. A coroutine (__aenter__/__aexit__) fires an entry at every resume and a
    return at every suspension: an entry that does not start at the method's first line is a
    resume, and continues the latest call of that method instead of starting one."""
    open_calls: list[dict] = []
    done: list[dict] = []
    for event, function, t_ns, line, raised, stack in zip(
        rows["event"].astype(str),
        rows["function"].astype(str),
        rows["t_ns"].tolist(),
        rows["line"].tolist(),
        rows["raised"].tolist(),
        rows["stack_id"].tolist(),
    ):
        if event == schema.CALL_ENTRY:
            stack_frames = frames.get(int(stack), [])
            method = stack_frames[0] if stack_frames else None
            resumed = _resumed_call(done, function, method, line)
            if resumed is not None:
                if not any(c is resumed for c in open_calls):
                    open_calls.append(resumed)
                continue
            call = {"function": function, "entry_ns": int(t_ns), "return_ns": None,
                    "raised": None, "method": method,
                    "caller": stack_frames[1] if len(stack_frames) > 1 else None}  # fmt: skip
            open_calls.append(call)
            done.append(call)
            continue
        for i in range(len(open_calls) - 1, -1, -1):
            call = open_calls[i]
            if call["function"] == function:
                call["return_ns"] = int(t_ns)
                call["raised"] = None if pd.isna(raised) else bool(raised)
                del open_calls[i]
                break
    return [Call(**call) for call in done]


def _resumed_call(done: list[dict], function: str, method: Frame | None, line: Any) -> dict | None:
    """The suspended call of coroutine method `method` that an entry at `line` resumes."""
    if function not in ASYNC or method is None or pd.isna(line):
        return None
    fresh = int(line) == method.firstlineno  # a new call starts at its first line...
    for call in reversed(done):
        other = call["method"]
        if call["function"] != function or other is None:
            continue
        if other.file != method.file or other.firstlineno != method.firstlineno:
            continue
        if fresh:
            # ...except that 3.15 fires a first entry when the coroutine object is made and a
            # second when it starts running, with no return between: one call
            return call if call["return_ns"] is None else None
        return call if call["return_ns"] is not None else None
    return None


def _same_with(frame: Frame | None, holder: Frame, span: tuple[int, int]) -> bool:
    if frame is None or frame.file != holder.file:
        return False
    if (frame.qualname or frame.function) != (holder.qualname or holder.function):
        return False
    first, last = span
    return first <= frame.line <= last
