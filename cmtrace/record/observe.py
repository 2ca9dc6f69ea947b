"""What watches a recording while it runs (the live view, dumps, status lines): the Observer
protocol the session calls, and what it hands over at each flush.

The session calls observers from its watching thread only (never the drain thread), in this
order: `started` once recording has begun (the attached line is printed), `preexisting` with the
snapshot of fds open at attach (once per target, possibly later for targets that join),
`flushed` after every write of the dataset (about twice a second, also when nothing new came),
`closed` as soon as recording ends (give the terminal back before the summary is printed; may
come twice), then `stopped` after the last flush. An observer asks the recording to stop with
`recording.request_stop(reason)`. One that raises anything but a CmtraceError is dropped with a
warning: watching must never cost the trace.

Observers see the same records the trace holds (the schema's EVENTS table, STACK_FRAMES rows),
so whatever they compute agrees with `cmtrace report` on the finished trace.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import pyarrow as pa

if TYPE_CHECKING:
    from cmtrace.record.session import Recording


@dataclass(frozen=True)
class Flushed:
    """One flush: the events just written (time order; None when none came), the stack frames
    completed since the previous flush, the recorder's lost-event count so far, and whether
    this is the last flush of the trace; with --aggregate, the kernel's counter rows written."""

    events: pa.Table | None
    frames: list[dict[str, Any]]
    lost_events: int
    final: bool
    counters: pa.Table | None = None  # --aggregate: the counter rows just written (COUNTERS)


class Observer(Protocol):
    def started(self, recording: Recording) -> None: ...

    def preexisting(self, rows: list[dict[str, Any]]) -> None: ...

    def flushed(self, recording: Recording, flushed: Flushed) -> None: ...

    def closed(self, recording: Recording) -> None: ...

    def stopped(self, recording: Recording) -> None: ...


class BaseObserver:
    """An observer that does nothing: subclass and override what you need."""

    def started(self, recording: Recording) -> None:
        pass

    def preexisting(self, rows: list[dict[str, Any]]) -> None:
        pass

    def flushed(self, recording: Recording, flushed: Flushed) -> None:
        pass

    def closed(self, recording: Recording) -> None:
        pass

    def stopped(self, recording: Recording) -> None:
        pass
