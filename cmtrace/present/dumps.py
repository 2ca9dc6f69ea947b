"""Dumps: the report as it stood at the instant a process hit EMFILE, reached a number of open
fds, or the user asked (SIGUSR1, the live view's `d`), written while recording goes on.

`--dump-on emfile|N|P%` (repeatable) are Triggers; a TriggerWatch finds, in each batch of
flushed events, the exact event time each trigger fired for each process (once per process):
the first EMFILE/ENFILE failure, or the birth at which its open fds (pre-existing included,
counted by the one fd-table model, cmtrace.analysis.model.FdModel) reached N. The DumpObserver
then writes TRACE/dumps/NNN-REASON.json (the `cmtrace report --format json` document of the
trace cut at that instant, cmtrace.analysis `until_ns`, plus a `dump` object) and a .txt
beside it (the text report). A dump is written one flush after it fired, so the stack frames and
the events up to its instant are on disk; the last flush writes whatever is still pending, so a
process that dies of its EMFILE still gets its dump. Failing to write one costs a stderr line,
never the trace.
"""

from __future__ import annotations

import errno
import math
import os
import queue
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cmtrace.errors import UsageError
from cmtrace.record import procfs
from cmtrace.record.observe import BaseObserver, Flushed
from cmtrace.trace import schema

if TYPE_CHECKING:
    import pandas as pd

    from cmtrace.analysis.model import FdModel
    from cmtrace.record.session import Recording

EMFILE_ERRNOS = (errno.EMFILE, errno.ENFILE)  # per-process and system-wide fd table full
DUMPS_DIR = "dumps"
MANUAL = "manual"
_COUNT = re.compile(r"[0-9]+")
_PERCENT = re.compile(r"([0-9]+)%")
TRIGGER_HELP = "emfile, a count of open fds (e.g. 1000) or a percent of RLIMIT_NOFILE (e.g. 80%)"


# ---- triggers ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Trigger:
    """One --dump-on: `emfile`, `fds` (value: open fds) or `pct` (value: percent of the soft
    RLIMIT_NOFILE)."""

    kind: str
    value: int = 0

    @property
    def reason(self) -> str:
        """The dump's REASON: emfile, fds-100, pct-50."""
        return self.kind if self.kind == "emfile" else f"{self.kind}-{self.value}"

    @property
    def spelling(self) -> str:
        """As --dump-on takes it: emfile, 100, 50%."""
        return {"fds": str(self.value), "pct": f"{self.value}%"}.get(self.kind, self.kind)

    def threshold(self, soft_limit: int | None) -> int | None:
        """The open-fd count that fires it in a process with this soft limit (None: never)."""
        if self.kind == "fds":
            return self.value
        if self.kind == "pct" and soft_limit:
            return max(1, math.ceil(soft_limit * self.value / 100))
        return None


def parse_trigger(text: str) -> Trigger:
    """A --dump-on value, or a one-line UsageError saying what is accepted."""
    word = text.strip().lower()
    if word == "emfile":
        return Trigger("emfile")
    if _COUNT.fullmatch(word):
        if int(word) < 1:
            raise UsageError(f"--dump-on {text}: a count of open fds must be at least 1")
        return Trigger("fds", int(word))
    percent = _PERCENT.fullmatch(word)
    if percent:
        if not 1 <= int(percent.group(1)) <= 100:
            raise UsageError(f"--dump-on {text}: a percent of RLIMIT_NOFILE is 1% to 100%")
        return Trigger("pct", int(percent.group(1)))
    raise UsageError(f"--dump-on {text}: expected {TRIGGER_HELP}")


def check_triggers(triggers: list[Trigger], aggregate: bool) -> None:
    """Count triggers need every birth as it happens; --aggregate ships an fd only once it is
    older than --min-age, so the counts (and the instant) would be wrong: refuse them."""
    counted = [t for t in triggers if t.kind != "emfile"]
    if aggregate and counted:
        raise UsageError(
            f"--dump-on {counted[0].spelling}: counting open fds needs every birth as it "
            "happens, which --aggregate does not ship: use --dump-on emfile or SIGUSR1"
        )


@dataclass(frozen=True)
class Fired:
    """A dump to write: why (a trigger's reason or `manual`), for which process, as of when
    (ns since the trace's start), and the threshold crossed (fds and pct)."""

    reason: str
    pid: int
    t_ns: int
    threshold: int | None = None


# ---- finding the instants -----------------------------------------------------------------------
class TriggerWatch:
    """Which triggers fire in each batch of flushed events, and at which event time.

    The open-fd counts come from FdModels fed batch by batch (only when a count trigger is
    asked for): one seeded with the snapshot taken at attach, and one per target that joined
    later (--pgrep), seeded with its own snapshot, counting it and the children it forks.
    """

    def __init__(self, triggers: list[Trigger], limit_of: Callable[[int], int | None]) -> None:
        self.triggers = list(dict.fromkeys(triggers))
        self.limit_of = limit_of  # pid -> its soft RLIMIT_NOFILE now (None: unlimited/unknown)
        self.fired: set[tuple[str, int]] = set()  # (reason, pid): once per process
        self._counting = [t for t in self.triggers if t.kind != "emfile"]
        self.needs_limits = any(t.kind == "pct" for t in self.triggers)
        self._seeds: list[list[dict[str, Any]]] = [[]]  # each model's pre-existing fds
        self._models: dict[int, FdModel] = {}  # seed number -> its model, once fed
        self._owner: dict[int, int] = {}  # pid -> its seed number, for all but the first's

    def preexisting(self, rows: list[dict[str, Any]]) -> None:
        """A snapshot of fds open as targets were attached (before the first batch) or joined."""
        if not self._models:
            self._seeds[0].extend(rows)
            return
        self._seeds.append(list(rows))
        for pid in {int(row["pid"]) for row in rows}:
            self._owner[pid] = len(self._seeds) - 1

    def feed(self, events: pa.Table) -> list[Fired]:
        """The triggers this batch fires, in time order."""
        fired = self._emfiles(events) + self._counts(events)
        fired.sort(key=lambda f: f.t_ns)
        for f in fired:
            self.fired.add((f.reason, f.pid))
        return fired

    def _emfiles(self, events: pa.Table) -> list[Fired]:
        if Trigger("emfile") not in self.triggers or not len(events):
            return []
        failed = pc.and_(
            pc.equal(events.column("op").cast(pa.string()), schema.OP_FAIL),
            pc.is_in(events.column("errno"), pa.array(EMFILE_ERRNOS, pa.int32())),
        )
        first: dict[int, int] = {}
        for row in events.filter(failed).select(["pid", "t_ns"]).to_pylist():
            first.setdefault(int(row["pid"]), int(row["t_ns"]))
        return [
            Fired("emfile", pid, t) for pid, t in first.items() if ("emfile", pid) not in self.fired
        ]

    def _counts(self, events: pa.Table) -> list[Fired]:
        if not self._counting or not len(events):
            return []
        self._adopt_children(events)
        out: list[Fired] = []
        for number in range(len(self._seeds)):
            mine = self._events_of(number, events)
            if len(mine):
                out += self._crossings(self._fed(number, mine).batch_lifetimes())
        return out

    def _crossings(self, lives: pd.DataFrame) -> list[Fired]:
        """The count triggers not fired yet that these processes' open fds reached."""
        out = []
        for pid, rows in lives.groupby("pid", sort=True):
            steps = OpenFdSteps.of(rows)
            limit = self.limit_of(int(pid))
            for trigger in self._counting:
                wanted = trigger.threshold(limit)
                if wanted is None or (trigger.reason, int(pid)) in self.fired:
                    continue
                t = steps.first_reaching(wanted)
                if t is not None:
                    out.append(Fired(trigger.reason, int(pid), t, wanted))
        return out

    def _adopt_children(self, events: pa.Table) -> None:
        """A child is counted by its parent's model (it inherits the parent's fds)."""
        if not self._owner:
            return
        forks = events.filter(pc.equal(events.column("op").cast(pa.string()), schema.OP_FORK))
        for row in forks.select(["pid", "arg"]).to_pylist():
            parent = self._owner.get(int(row["pid"]))
            if parent is not None:
                self._owner[int(row["arg"])] = parent

    def _events_of(self, number: int, events: pa.Table) -> pa.Table:
        """The events of the processes seed `number`'s model counts."""
        if not self._owner:
            return events
        pids = pa.array([p for p, n in self._owner.items() if n == number or number == 0])
        owned = pc.is_in(events.column("pid"), pids.cast(events.column("pid").type))
        return events.filter(pc.invert(owned) if number == 0 else owned)

    def _fed(self, number: int, events: pa.Table) -> FdModel:
        from cmtrace.analysis.model import FdModel  # noqa: PLC0415 (the analysis: only when counting)

        if number not in self._models:
            rows = self._seeds[number]
            seed = pa.Table.from_pylist(rows, schema=schema.PREEXISTING).to_pandas()
            # only the last batch's lifetimes are read: memory follows the open fds
            self._models[number] = FdModel(seed, keep_lifetimes=False)
        self._models[number].feed(events)
        return self._models[number]


@dataclass(frozen=True)
class OpenFdSteps:
    """One process's open-fd count as a step function of time, from lifetimes: +1 at each
    birth, -1 at each death; at one instant deaths come first (a dup2 onto a live fd ends one
    and starts one: the count never peaks)."""

    times: np.ndarray
    counts: np.ndarray  # the count right after the change at times[i]

    @classmethod
    def of(cls, lives: pd.DataFrame) -> OpenFdSteps:
        born = lives["born_ns"].to_numpy(dtype=np.int64)
        dead = lives["died_ns"].dropna().to_numpy(dtype=np.int64)
        times = np.concatenate([born, dead])
        deltas = np.concatenate([np.ones(len(born), np.int64), -np.ones(len(dead), np.int64)])
        order = np.lexsort((deltas, times))
        return cls(times[order], np.cumsum(deltas[order]))

    def first_reaching(self, count: int) -> int | None:
        """The first time the count is at least `count` (None: never in these lifetimes)."""
        reached = np.flatnonzero(self.counts >= count)
        return int(self.times[reached[0]]) if len(reached) else None


# ---- writing a dump ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Written:
    json: Path
    text: Path
    open_fds: int
    limit: int | None


def write_dump(
    trace_dir: Path,
    number: int,
    fired: Fired,
    wall: float,
    limit: int | None,
    owner: tuple[int, int] | None = None,
) -> Written:
    """Write dumps/NNN-REASON.json and .txt for the trace as it stood at fired.t_ns. Raises
    OSError when they cannot be written (nothing half-written is left)."""
    from cmtrace.analysis import load  # noqa: PLC0415
    from cmtrace.present.json import render_json  # noqa: PLC0415
    from cmtrace.present.text import render_text  # noqa: PLC0415

    trace = load(trace_dir, until_ns=fired.t_ns)
    live = trace.live_fds(at=fired.t_ns)
    open_fds = int((live["pid"] == fired.pid).sum())
    dump = {
        "reason": fired.reason,
        "pid": fired.pid,
        "t_ns": fired.t_ns,
        "wall": datetime.fromtimestamp(wall, timezone.utc).isoformat(timespec="milliseconds"),
        "open_fds": open_fds,
        "limit": limit,
        "threshold": fired.threshold,
    }
    name = f"{number:03d}-{fired.reason}"
    folder = trace_dir / DUMPS_DIR
    folder.mkdir(mode=0o700, exist_ok=True)
    if owner is not None:
        os.chown(folder, *owner)
    heading = (
        f"cmtrace dump {name}: pid {fired.pid} at {fired.t_ns / 1e9:.3f} s ({dump['wall']}), "
        f"{open_fds} open fds{f' of {limit}' if limit else ''}\n\n"
    )
    text = heading + render_text(trace)
    paths = folder / f"{name}.json", folder / f"{name}.txt"
    _write_atomically(paths[0], render_json(trace, extra={"dump": dump}), owner)
    _write_atomically(paths[1], text, owner)
    return Written(paths[0], paths[1], open_fds, limit)


def _write_atomically(final: Path, text: str, owner: tuple[int, int] | None) -> None:
    tmp = final.with_name(f".{final.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with open(fd, "w") as fh:
            fh.write(text)
        if owner is not None:
            os.chown(tmp, *owner)
        os.replace(tmp, final)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


# ---- the observer -----------------------------------------------------------------------------
@dataclass
class _Pending:
    fired: Fired
    seen_at_flush: int  # written at a later flush (its frames and events are all on disk)


class DumpObserver(BaseObserver):
    """Writes the dumps of a recording: on its triggers, on SIGUSR1 and on
    request_manual_dump(); with `stop_after`, stops the recording after the first.

    Dumps are written by a thread of their own, in order: analysing a long trace takes seconds,
    and the recording's flushes (and a live view) must not wait for it. `stopped` waits for
    the dumps still being written, so they are all on disk before the summary.
    """

    def __init__(self, triggers: list[Trigger], stop_after: bool = False) -> None:
        self.watch = TriggerWatch(triggers, self._soft_limit)
        self.stop_after = stop_after
        self.say: Callable[[str], None] = _to_stderr  # a live view may show them instead
        self.messages: list[str] = []
        self.written: list[Written] = []
        self._number = 0
        self._flushes = 0
        self._pending: list[_Pending] = []
        self._manual = threading.Event()
        self._jobs: queue.Queue[tuple[int, Fired] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._limits: dict[int, int | None] = {}
        self._start_ns = 0  # the recording's t_ns 0, in monotonic ns
        self._wall_minus_mono = time.time() - time.monotonic_ns() / 1e9

    def install_signal(self) -> None:
        """SIGUSR1 asks for a dump at once (installed before attaching: its default action
        would kill cmtrace)."""
        signal.signal(signal.SIGUSR1, self._on_sigusr1)

    def _on_sigusr1(self, _signum: int, _frame: FrameType | None) -> None:
        self.request_manual_dump()

    def request_manual_dump(self) -> None:
        """A dump of the trace as it stands now (the live view's `d`); thread- and
        signal-safe: the next flush takes it."""
        self._manual.set()

    # -- Observer
    def started(self, recording: Recording) -> None:
        self._start_ns = recording.backend.start_ns
        if recording.writer is not None:  # a trace replaced with --force: its dumps go too
            for stale in (recording.writer.path / DUMPS_DIR).glob("[0-9][0-9][0-9]-*.*"):
                if stale.suffix in (".json", ".txt"):
                    stale.unlink(missing_ok=True)

    def preexisting(self, rows: list[dict[str, Any]]) -> None:
        self.watch.preexisting(rows)

    def flushed(self, recording: Recording, flushed: Flushed) -> None:
        self._flushes += 1
        self._note_limits(recording, flushed.events)
        if flushed.events is not None:
            for fired in self.watch.feed(flushed.events):
                self._pending.append(_Pending(fired, self._flushes))
        if self._manual.is_set():
            self._manual.clear()
            now = time.monotonic_ns() - self._start_ns
            self._pending.append(_Pending(Fired(MANUAL, _main_pid(recording), now), self._flushes))
        due = [p for p in self._pending if flushed.final or p.seen_at_flush < self._flushes]
        for pending in due:
            self._pending.remove(pending)
            self._number += 1
            self._start_thread(recording)
            self._jobs.put((self._number, pending.fired))

    def stopped(self, recording: Recording) -> None:
        """The last flush is done: wait for the dumps still being written."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None

    # -- writing, on the dumps' own thread
    def _start_thread(self, recording: Recording) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._write_queued, args=(recording,), name="cmtrace-dumps", daemon=True
            )
            self._thread.start()

    def _write_queued(self, recording: Recording) -> None:
        while (job := self._jobs.get()) is not None:
            self._write(recording, *job)

    def _write(self, recording: Recording, number: int, fired: Fired) -> None:
        name = f"{number:03d}-{fired.reason}"
        assert recording.writer is not None, "dumps come after the writer opened"
        wall = self._wall_minus_mono + (self._start_ns + fired.t_ns) / 1e9
        try:
            written = write_dump(
                recording.writer.path, number, fired, wall,
                self._limits.get(fired.pid), recording.writer.owner,
            )  # fmt: skip
        except Exception as exc:  # a dump that cannot be written must never cost the trace
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self._tell(f"dump {name} not written ({type(exc).__name__}: {why}); recording goes on")
            return
        self.written.append(written)
        limit = f" of {written.limit}" if written.limit else ""
        self._tell(
            f"dump {name} written: {written.json} (pid {fired.pid}, {written.open_fds} open "
            f"fds{limit} at {fired.t_ns / 1e9:.3f} s)"
        )
        if self.stop_after:
            recording.request_stop(f"dump {name} written (--stop-after-dump)")

    def _tell(self, text: str) -> None:
        self.messages.append(text)
        self.say(text)

    def _note_limits(self, recording: Recording, events: pa.Table | None) -> None:
        """The soft limit of each process flushed (and of the targets), read while it lives: a
        dying one keeps its last. A process that lived less than a flush is not read here;
        what the recording sampled of it (`rlimit_nofile`, when it keeps one) is used then."""
        pids = set(recording.root_pids)
        if events is not None:
            flushed = pc.unique(events.column("pid")).to_pylist()
            # a P% trigger needs each process's limit now; else a first reading will do
            pids.update(p for p in flushed if self.watch.needs_limits or p not in self._limits)
        sampled = getattr(recording, "rlimit_nofile", None) or {}
        for pid in pids:
            limits = procfs.rlimit_nofile(int(pid)) or sampled.get(int(pid))
            if limits is not None:
                self._limits[int(pid)] = limits[0]

    def _soft_limit(self, pid: int) -> int | None:
        return self._limits.get(pid)


def _main_pid(recording: Recording) -> int:
    """A manual dump's process: the first target (the one `-p` or `run` named)."""
    return min(recording.root_pids) if recording.root_pids else 0


def _to_stderr(text: str) -> None:
    print(f"cmtrace: {text}", file=sys.stderr, flush=True)
