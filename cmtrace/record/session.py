"""The recording session: one trace recorded over a Backend, until the target exits, the
duration ends, or SIGINT/SIGTERM arrives.

A Recording wires a backend (cmtrace.record.backend.Backend: BPF or ptrace, picked by
cmtrace.record.choose from --backend, and never asked which it is) to the dataset
writer and runs the drain/flush loop; it owns what both backends share: the targets and their
Python interpreters, following forks and execs, stopping, flushing and the end-of-trace
evidence (thread snapshots, source lines, meta.json). `attach(options)` and `run(options)` are
the two ways to record; they return a Finished recording whose probes are still attached, so
the caller can summarise the trace before `close()`. Nothing here parses arguments or prints a
report.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from cmtrace.errors import CmtraceError, TargetError, UsageError
from cmtrace.record import joining, procfs, spawn
from cmtrace.record.backend import Backend, Command, PythonTarget
from cmtrace.record.choose import Choice, choose_backend
from cmtrace.record.environment import check_environment
from cmtrace.record.observe import Flushed, Observer
from cmtrace.record.options import RecordOptions
from cmtrace.trace import schema
from cmtrace.trace.sources import SourceCollector
from cmtrace.trace.writer import RESERVE_BYTES, DiskFull, TraceWriter, prepare_output_dir

DRAIN_INTERVAL = 0.02  # seconds between drains of the backend (the kernel's ring buffer)
FLUSH_INTERVAL = 0.5  # seconds: a killed tracer loses at most this much (1 s is the promise)
# A backend that can tell when records arrive (Backend.wait_for_records: ptrace) lets both
# threads sleep this long while the target makes no fd syscall; each 20 ms wake-up of the two
# threads cost ~0.2 ms of CPU (cold caches), ~2-3 % of a CPU taken from a target that shares it.
IDLE_WAIT_S = 0.25


def default_output(pid: int | str) -> Path:
    """./cmtrace-PID-YYYYmmdd-HHMMSS (or cmtrace-pgrep-..., cmtrace-all-...)."""
    return Path(f"cmtrace-{pid}-{datetime.now():%Y%m%d-%H%M%S}")


def make_backend(
    options: RecordOptions, follow: bool, progress: Callable[[str], None], backend: str
) -> Backend:
    """The backend that records, by name (bcc or the engine is loaded only when it loads)."""
    if backend == "ptrace":
        if options.all_python:  # auto chose ptrace (no BPF here)
            raise UsageError("--all needs the BPF backend, which this host cannot use")
        if options.aggregate:  # auto chose ptrace (no BPF here)
            raise UsageError("--aggregate needs the BPF backend, which this host cannot use")
        from cmtrace.record.ptrace.backend import PtraceBackend  # noqa: PLC0415

        return PtraceBackend(
            follow=follow, python_stacks=options.python_stacks, calls=options.calls,
            progress=progress,
        )  # fmt: skip
    from cmtrace.record.bpf.backend import BpfBackend  # noqa: PLC0415 (numpy, bcc: recording only)

    return BpfBackend(
        follow=follow,
        ring_pages=options.ring_pages(),
        python_stacks=options.python_stacks,
        calls=options.calls,
        progress=progress,
        aggregate=_aggregate_settings(options),
    )


def _aggregate_settings(options: RecordOptions) -> Any:
    """--aggregate's settings for the BPF backend (None: full history)."""
    if not options.aggregate:
        return None
    from cmtrace.record.bpf.aggregate import AggregateSettings  # noqa: PLC0415

    return AggregateSettings(min_age_s=options.min_age, live_max=options.aggregate_live_max)


def choose(options: RecordOptions, mode: str, pid: int | None = None) -> Choice:
    """The backend for this recording (--backend, or auto: BPF when it can, else ptrace);
    BPF's own environment checks (kernel, tracefs, headers) run only when BPF is chosen."""
    choice = choose_backend(options.backend, mode, pid)
    if choice.backend == "bpf":
        check_environment()
    return choice


# ---- the recording loop -----------------------------------------------------------------------


class Recording:
    """One trace being recorded: a backend + the writer, and the drain/flush loop."""

    def __init__(
        self,
        options: RecordOptions,
        follow: bool,
        backend: Backend | None = None,
        choice: Choice | None = None,
        observers: list[Observer] | None = None,
    ):
        self.options = options
        # what watches the recording as it goes (live view, dumps): fed at each flush
        self.observers: list[Observer] = list(observers or [])
        self.follow = follow
        self.quiet = options.quiet
        self.backend = backend or make_backend(
            options, follow, self.progress, choice.backend if choice else "bpf"
        )
        # the words the attached line, the summary and meta.json give for the backend
        self.backend_reason = choice.reason if choice else f"backend {self.backend.name}"
        self.targets: dict[int, PythonTarget] = {}  # pid -> its interpreter, as found
        self.writer: TraceWriter | None = None
        self.pending: list[pa.Table] = []
        self.pending_calls: list[pa.Table] = []
        self.stop_reason = ""
        self._stop = False
        self.root_pids: set[int] = set()
        self.events_written = 0
        self.failure: CmtraceError | None = None  # what stopped the recording, if it failed
        self.disk_full: DiskFull | None = None  # the disk filled up: stopped, trace completed
        self.stopped_early = ""  # --max-size or a full disk stopped recording: the line saying so
        self.held_pid = 0  # `run`: the backend stops this pid after each exec until resumed
        self.ns_pids: dict[int, int] = {}  # processes whose pid namespace is not ours
        self.sources = SourceCollector()
        self.preexisting_rows: list[dict[str, Any]] = []  # every target's, as each joined
        self._lock = threading.Lock()  # the drain thread's state: pending, backend, sources
        self._draining = threading.Event()
        self._drained = threading.Event()  # records (or the stream's end) came: look now
        self._drain_error: Exception | None = None

    @property
    def stacks(self) -> bool:
        return self.backend.stacks

    # -- setup
    def load(self) -> None:
        self.backend.load()
        if self.backend.stack_failure:
            self.progress(f"{self.backend.stack_failure}: recording without Python stacks")

    def open_writer(
        self,
        path: Path,
        targets: list[int],
        extra_meta: dict[str, Any],
        cmdline: list[str] | None = None,
    ) -> None:
        meta = {
            "targets": [
                {
                    "pid": pid,
                    "ns_pid": procfs.ns_pid(pid),
                    "comm": procfs.command_comm(pid, cmdline),
                    "cmdline": cmdline or procfs.cmdline(pid),
                }
                for pid in targets
            ],
            "start_monotonic_ns": self.backend.start_ns,
            "follow_children": self.follow,
            "missing_tracepoints": self.backend.missing_tracepoints,
            "backend": self.backend.name,
            "backend_reason": self.backend_reason,
            **self._backend_meta(),
            **extra_meta,
        }
        if self.options.max_size is not None:
            meta["max_size"] = self.options.max_size
        self.writer = TraceWriter(
            path, meta, owner=spawn.requesting_user(), max_bytes=self.options.max_size,
            reserve=RESERVE_BYTES,
        )  # fmt: skip

    def _backend_meta(self) -> dict[str, Any]:
        """Facts a backend adds to meta.json (--aggregate's settings and counts)."""
        facts = getattr(self.backend, "trace_meta", None)
        return facts() if facts is not None else {}

    def add_target(self, pid: int) -> None:
        """Trace pid: kernel filter first, then the snapshot of what it already has open."""
        self.backend.trace(pid)
        self.install_python(pid)

    def note_process(self, pid: int) -> None:
        """A process seen to fork or exec: remember its pid inside its own namespace."""
        inner = procfs.ns_pid(pid)
        if inner is not None and inner != pid:
            self.ns_pids[pid] = inner

    def install_python(self, pid: int) -> None:
        self.note_process(pid)
        if not self.stacks:
            return
        self.sources.note_root(pid)
        self.sources.note_program(pid)  # a `python -c` program: its text, while it runs
        try:
            target = self.backend.watch_python(pid)
        except Exception as exc:  # never let stack support stop fd recording
            target = PythonTarget.failed(pid, f"stack support failed: {type(exc).__name__}: {exc}")
        self.targets[pid] = target

    def inherit_python(self, parent: int, child: int) -> None:
        """A followed fork: the child has its parent's walker configuration (it may already
        have run and exited); record it as the same interpreter."""
        target = self.targets.get(parent)
        if not self.stacks or target is None or target.status != "ok":
            self.install_python(child)  # notes the process too
            return
        self.note_process(child)
        self.targets[child] = self.backend.inherit_python(target, child)

    def snapshot_preexisting(self, pids: list[int]) -> None:
        t_ns = time.monotonic_ns() - self.backend.start_ns
        rows = [dict(row, t_ns=t_ns) for pid in pids for row in procfs.open_fds(pid)]
        self.preexisting_rows += rows  # a target joining later adds its own, timed then
        self._writer().write_preexisting(self.preexisting_rows)
        for observer in self.observers:
            observer.preexisting(rows)

    def _writer(self) -> TraceWriter:
        assert self.writer is not None, "open_writer() comes first"
        return self.writer

    def start_observers(self) -> None:
        """Recording has begun (the attached line is out): observers may take the screen."""
        for observer in self.observers:
            observer.started(self)

    def close_observers(self) -> None:
        """Give the terminal back (a live view) before anything else is printed; twice is safe."""
        for observer in self.observers:
            observer.closed(self)

    # -- loop
    def request_stop(self, reason: str) -> None:
        if not self._stop:
            self._stop, self.stop_reason = True, reason

    def loop(self, still_running: Callable[[], bool], deadline: float | None = None) -> None:
        """Flush and watch for the end here; a second thread keeps draining the backend, so a
        slow Parquet write (or a busy machine) does not let the kernel's ring buffer fill up."""
        self._draining.set()
        drainer = threading.Thread(target=self._drain_continuously, name="cmtrace-drain")
        drainer.start()
        try:
            self._watch(still_running, deadline)
        finally:
            self._draining.clear()
            drainer.join()
        if self._drain_error is not None:
            raise self._drain_error

    def _watch(self, still_running: Callable[[], bool], deadline: float | None) -> None:
        last_flush = time.monotonic()
        idles = hasattr(self.backend, "wait_for_records")
        while not self._stop:
            if idles:  # woken by the drain thread when records come; the flush when due
                due = last_flush + FLUSH_INTERVAL - time.monotonic()
                self._drained.wait(min(IDLE_WAIT_S, max(due, DRAIN_INTERVAL)))
                self._drained.clear()
            else:
                time.sleep(DRAIN_INTERVAL)
            now = time.monotonic()
            if now - last_flush >= FLUSH_INTERVAL:
                try:
                    self.flush()
                except DiskFull as exc:
                    self._stop_for_disk_full(exc)
                    return
                last_flush = now
                if self._writer().near_limit(self.sources.expected_part_bytes()):
                    self._stop_for_max_size()
                    return
            if deadline is not None and now >= deadline:
                self.request_stop("duration reached")
            elif not still_running():
                self.request_stop("target exited")

    # -- stopping early: --max-size, a full disk (the trace is completed either way)
    def _stop_for_max_size(self) -> None:
        size = _megabytes(self._writer().written_bytes)
        self.request_stop(f"--max-size {_size_flag(self.options.max_size or 0)} reached")
        self.stopped_early = (
            f"{self.stop_reason}: recording stopped, the trace is complete ({size})"
        )

    def _stop_for_disk_full(self, exc: DiskFull) -> None:
        self.disk_full = exc
        self.request_stop("disk full")
        self.stopped_early = str(exc)

    def say_why_stopped_early(self) -> None:
        """The one line saying --max-size or a full disk ended recording (even with -q)."""
        if self.stopped_early:
            print(f"cmtrace: {self.stopped_early}", file=sys.stderr, flush=True)

    def _drain_continuously(self) -> None:
        wait = getattr(self.backend, "wait_for_records", None)
        last = 0.0
        while self._draining.is_set():
            if wait is None:
                time.sleep(DRAIN_INTERVAL)
            elif wait(IDLE_WAIT_S):
                self._drained.set()  # the watcher looks too (the stream may have ended)
                # at most one drain per DRAIN_INTERVAL while records flow, but the first
                # records after a quiet spell at once: a program's start-up is then decoded
                # while it starts up, not during what it does next
                time.sleep(max(0.0, last + DRAIN_INTERVAL - time.monotonic()))
            last = time.monotonic()
            try:
                with self._lock:
                    self._drain()
            except Exception as exc:  # surfaced by loop() once the watcher has stopped
                self._drain_error = exc
                self.request_stop("the collector failed")
                return

    def _drain(self) -> None:
        records = self.backend.drain()
        if records is None:
            return
        self.pending.append(records.events)
        if records.calls is not None and len(records.calls):
            self.pending_calls.append(records.calls)
        self._react_to_processes(records.events)
        self._read_new_sources()

    def _react_to_processes(self, table: pa.Table) -> None:
        """Load Python layouts for followed children and for processes that exec'd."""
        ops = table.column("op")
        interesting = pc.is_in(ops.cast(pa.string()), pa.array([schema.OP_FORK, schema.OP_EXEC]))
        if not pc.any(interesting).as_py():
            return
        for row in table.filter(interesting).to_pylist():
            if row["op"] == schema.OP_FORK and self.follow:
                self.inherit_python(int(row["pid"]), int(row["arg"]))
            elif row["op"] == schema.OP_EXEC:
                pid = int(row["pid"])
                self.install_python(pid)
                if self.held_pid and (pid == self.held_pid or spawn.is_python_image(row["path"])):
                    self.backend.resume(pid)  # held at this exec (see Backend.hold_at_exec)

    def flush(self, final: bool = False) -> None:
        writer = self._writer()
        writer.start_flush()
        lost = self.backend.lost_events()
        frames = None
        with self._lock:  # take what the drain thread gathered; write without holding it
            tables, self.pending = self.pending, []
            calls, self.pending_calls = self.pending_calls, []
            if self.stacks:
                frames = self.backend.take_frames(final)
        events = None
        if tables:
            events = pa.concat_tables(tables).sort_by([("t_ns", "ascending")])
            writer.write_part("events", events)
            self.events_written += len(events)
        if calls:
            table = pa.concat_tables(calls).sort_by([("t_ns", "ascending")])
            writer.write_part("calls", table)
        if frames is not None:
            writer.write_rows("stacks", frames)
        counters = self._write_counters(writer)
        if lost != writer.meta.get("lost_events"):
            writer.write_meta(lost_events=lost)
        writer.end_flush()
        self._tell_observers(Flushed(events, frames or [], lost, final, counters))

    def _write_counters(self, writer: TraceWriter) -> pa.Table | None:
        """--aggregate: the kernel's counters read since the last flush (schema.COUNTERS)."""
        take = getattr(self.backend, "take_counters", None)
        table = take() if take is not None else None
        if table is None or not len(table):
            return None
        writer.write_part("counters", table)
        return table

    def _tell_observers(self, flushed: Flushed) -> None:
        """Hand what was just written to each observer; one that fails is dropped with a
        warning, never the recording."""
        for observer in list(self.observers):
            try:
                observer.flushed(self, flushed)
            except CmtraceError:
                raise
            except Exception as exc:
                self.observers.remove(observer)
                self.progress(f"{type(observer).__name__} stopped: {type(exc).__name__}: {exc}")

    def abandon(self) -> None:
        """Stop recording after a write failure: detach, and mark the trace if we still can."""
        self.backend.close()
        try:
            self._writer().finish(status=schema.STATUS_INTERRUPTED, stop_reason=str(self.failure))
        except CmtraceError:
            pass  # meta.json stays 'recording' and readers report the trace interrupted

    def finish(self, interrupted: str | None = None) -> None:
        """Write what is left and meta.json: complete, or `interrupted` (why) when the recorder
        died before the end."""
        if self.failure is not None:
            self.abandon()
            raise self.failure
        try:
            self._finish(interrupted)
        except DiskFull as exc:  # even the reserve was not enough: keep what is written
            self.failure = exc
            self.abandon()
            raise

    def _finish(self, interrupted: str | None) -> None:
        if self.disk_full is not None:
            self._writer().release_reserve()  # room for the end of the trace
        self.backend.stop()
        time.sleep(DRAIN_INTERVAL)  # let records reserved before the stop be committed
        self._drain()
        self.flush(final=True)
        self._snapshot_threads()
        self._check_generators()
        self._capture_sources()
        for observer in self.observers:
            observer.stopped(self)
        self._writer().finish(
            status=schema.STATUS_INTERRUPTED if interrupted else schema.STATUS_COMPLETE,
            lost_events=self.backend.lost_events(),
            stop_reason=interrupted or self.stop_reason,
            events=self.events_written,
            python=[target.as_dict() for target in self.targets.values()],
            processes=[{"pid": pid, "ns_pid": inner} for pid, inner in self.ns_pids.items()],
            degraded=self._degraded(),
            backend_stats=self.backend.stats(),
            **self._backend_meta(),
        )

    def close(self) -> None:
        """Detach the backend (after the summary: detaching takes a while)."""
        self.backend.close()

    def _snapshot_threads(self) -> None:
        """Every live target's thread stacks as recording stops: the analysis reads from them
        whether a `with` block is still active (see cmtrace.analysis.causes)."""
        if not self.stacks:
            return
        from cmtrace.interp import walker  # noqa: PLC0415

        writer = self._writer()
        threads = []
        for pid, target in self.targets.items():
            if not target.python or not procfs.is_alive(pid):
                continue
            try:
                stacks = walker.snapshot_threads(pid)
            except Exception as exc:  # evidence only: never lose the trace over it
                writer.meta.setdefault("warnings", []).append(f"snapshot of {pid}: {exc}")
                continue
            threads += [
                {"pid": pid, "tid": tid, "frames": frames} for tid, frames in stacks.items()
            ]
        if threads:
            writer.write_json("snapshot.json", {"threads": threads})

    def _check_generators(self) -> None:
        """Issue 13's liveness check, while the targets still live: what became of each
        generator, coroutine and async generator a birth's stack ran in (generators.json).
        A few reads of /proc/PID/mem per address, the target not stopped."""
        births = getattr(self.backend, "generators", None)
        if not self.stacks or births is None:
            return
        from cmtrace.interp import generators  # noqa: PLC0415
        from cmtrace.record.generators import split_word  # noqa: PLC0415

        by_pid: dict[int, list[tuple[int, int, int]]] = {}
        for pid, stack, word, code in births.wanted():
            by_pid.setdefault(pid, []).append((stack, word, code))
        if not by_pid:
            return
        processes: dict[str, str | None] = {}
        rows = []
        for pid, wanted in by_pid.items():
            if not procfs.is_alive(pid):
                processes[str(pid)] = "the process had ended when recording stopped"
                continue
            try:
                found = generators.check(pid, [(split_word(w)[1], c) for _, w, c in wanted])
            except Exception as exc:  # evidence only: never lose the trace over it
                processes[str(pid)] = f"check failed: {type(exc).__name__}: {exc}"
                continue
            processes[str(pid)] = None
            at = {(f.address, f.code): f for f in found}
            for stack, word, code in wanted:
                frame, address = split_word(word)
                finding = at.get((address, code))
                if finding is not None:
                    rows.append({**finding.as_dict(), "stack_id": stack, "frame": frame})
        self._writer().write_json("generators.json", {"processes": processes, "generators": rows})

    def _read_new_sources(self) -> None:
        """Read each source file when a stack first names it: a target in a container or
        chroot can only be read through /proc/PID/root while it lives."""
        if not self.stacks:
            return
        for pid, file in self.backend.take_new_files():
            self.sources.add(pid, file)
        # argv read at each exec while the backend held the process (ptrace): a short-lived
        # `python -c` child may be gone before its exec is drained and /proc read
        for pid, argv in getattr(self.backend, "take_cmdlines", dict)().items():
            self.sources.note_program(pid, argv)

    def _capture_sources(self) -> None:
        if not self.stacks:
            return
        self._read_new_sources()
        alive = [pid for pid in self.root_pids if procfs.is_alive(pid)]
        writer = self._writer()
        try:
            writer.write_rows("sources", self.sources.rows(alive[0] if alive else None))
        except CmtraceError:
            raise
        except Exception as exc:  # sources only enrich the report; keep the trace
            writer.meta.setdefault("warnings", []).append(f"source capture failed: {exc}")

    def _degraded(self) -> dict[str, dict[str, str | None]]:
        reasons: dict[str, str | None] = {
            str(t.pid): t.reason for t in self.targets.values() if t.reason
        }
        if not self.stacks:
            reasons["*"] = (
                "Python stacks disabled (--no-python-stacks)"
                if not self.options.python_stacks
                else self.backend.stack_failure
                or "Python stack support not available in this build"
            )
        return {"no_python_stacks": reasons}

    def describe(self, pid: int) -> str:
        """What the "attached" line says about pid: its name and its Python."""
        name = procfs.comm(pid)
        target = self.targets.get(pid)
        if target and target.python:
            text = f"{name}, Python {target.python}"
        elif target and target.reason:
            text = f"{name}, no Python stacks: {target.reason}"
        else:
            text = name
        notes = [note for note in (self.backend.attached_note, self.backend_reason) if note]
        return ", ".join([text, *notes])

    def progress(self, text: str) -> None:
        if not self.quiet:
            print(f"cmtrace: {text}", file=sys.stderr, flush=True)


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def _size_flag(size: int) -> str:
    """A size as --max-size takes it: 500M, 2G (bytes when it is no whole number of those)."""
    for unit, scale in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if size % scale == 0:
            return f"{size // scale}{unit}"
    return str(size)


@dataclass
class Finished:
    """A recording that stopped: its trace is written (unless `failure`), its backend still
    attached until `recording.close()`."""

    recording: Recording
    path: Path
    exit_code: int = 0  # run: the command's exit status as a shell reports it
    failure: CmtraceError | None = None  # run: recording failed; the command ran on untraced
    # the trace is complete but recording stopped early for this (disk full: exit code 6)
    stopped_early: CmtraceError | None = None


# ---- stop signals -----------------------------------------------------------------------------


def _install_stop_signals(rec: Recording, forward_to: int | None = None) -> None:
    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if forward_to is None:
            rec.request_stop(f"signal {signal.Signals(signum).name}")
        elif signum != signal.SIGINT or not _sigint_reached_child_too():
            try:
                os.kill(forward_to, signum)
            except ProcessLookupError:
                pass

    for sig in spawn.STOP_SIGNALS:
        signal.signal(sig, on_signal)


def _sigint_reached_child_too() -> bool:
    """A Ctrl-C at the terminal reaches the whole foreground group: don't send it twice."""
    try:
        return os.isatty(0) and os.tcgetpgrp(0) == os.getpgrp()
    except OSError:
        return False


# ---- cmtrace -p PID ---------------------------------------------------------------------------


def attach(options: RecordOptions, observers: list[Observer] | None = None) -> Finished:
    """Record running processes (-p's pids, --pgrep's matches, --all's CPython processes; the
    last two also as they appear) until every target has exited, the duration ends, or a
    stop signal; the processes keep running untouched."""
    assert options.attaching, "attach needs pids, --pgrep or --all"
    options.validate()
    pids = [_checked_tgid(pid) for pid in options.attach_pids]
    selector = joining.selector_of(options)
    sample = pids[0] if pids else joining.first_match(selector)
    # no match yet (--pgrep): whether this user may trace at all; each joiner is checked then
    choice = choose(options, "attach", sample) if sample else choose(options, "run")
    label = pids[0] if pids else "all" if options.all_python else "pgrep"
    output = options.output or default_output(label)
    prepare_output_dir(output, options.force)
    rec = Recording(options, follow=options.follow_children, choice=choice, observers=observers)
    watch = joining.Watchlist(rec, selector)
    rec.progress(f"loading probes for {', '.join(map(str, pids)) or watch.selector.describe()} ...")
    rec.load()
    family = [t for pid in pids for t in (procfs.descendants(pid) if rec.follow else [pid])]
    targets = list(dict.fromkeys(family))
    rec.root_pids = set(pids)
    rec.open_writer(output, targets, {"mode": "attach", **watch.selector.meta()})
    for target in targets:
        rec.add_target(target)
    rec.snapshot_preexisting(targets)
    watch.note_started(pids, "pid")
    for pid in watch.find_new():  # --pgrep/--all: those running now (one may fail: skipped)
        watch.join(pid, at_start=True)
    if pids and not watch.selector.active and not any(map(procfs.is_alive, pids)):
        raise TargetError(f"pid {pids[0]} exited before the probes were live: nothing recorded")
    _install_stop_signals(rec)
    print(f"cmtrace: {watch.attached_line()}", file=sys.stderr, flush=True)
    rec.start_observers()
    deadline = time.monotonic() + options.duration if options.duration else None
    try:
        rec.loop(watch.poll, deadline)
    finally:
        rec.close_observers()
    rec.say_why_stopped_early()
    rec.progress(f"stopping: {rec.stop_reason}")
    rec.finish()
    return Finished(rec, output, stopped_early=rec.disk_full)


def _checked_tgid(pid: int) -> int:
    procfs.check_traceable(pid)
    return procfs.tgid_of(pid)


# ---- cmtrace run -- CMD -----------------------------------------------------------------------


def check_command(command: list[str] | tuple[str, ...]) -> None:
    if not command:
        raise UsageError("no command given: cmtrace run [options] -- CMD [ARGS...]")
    if shutil.which(command[0]) is None:
        raise UsageError(f"command not found: {command[0]}")


def run(options: RecordOptions, observers: list[Observer] | None = None) -> Finished:
    """Start options.command already traced (its first openat included), following its
    children, and record until it exits; stop signals are forwarded to it."""
    command = list(options.command)
    check_command(command)
    options.validate()
    choice = choose(options, "run")
    rec = Recording(options, follow=True, choice=choice, observers=observers)
    rec.progress("loading probes ...")
    rec.load()
    started: Command = rec.backend.start_command(command, spawn.run_as_user())
    child = started.pid
    output = options.output or default_output(child)
    try:
        prepare_output_dir(output, options.force)
    except CmtraceError:
        started.kill()
        raise
    rec.root_pids = {child}
    rec.open_writer(output, [child], {"mode": "run", "command": command}, cmdline=command)
    watch = joining.Watchlist(rec)  # the command's RLIMIT_NOFILE and its Python processes'
    watch.note_started([child], "command", cmdline=command)
    if rec.stacks:
        rec.held_pid = child
        rec.backend.hold_at_exec(child)
    rec.snapshot_preexisting([child])
    _install_stop_signals(rec, forward_to=child)
    rec.progress(f"running {os.path.basename(command[0])} (pid {child}, {rec.backend_reason})")
    rec.start_observers()
    started.release()  # the child execs CMD now (or runs on past its exec), already traced
    try:
        rec.loop(lambda: watch.poll_limits_only() or started.running())
    finally:
        rec.close_observers()
    if rec.failure is not None:  # the command runs on, untraced; wait for it as promised
        rec.abandon()
        print(f"cmtrace: error: {rec.failure}", file=sys.stderr, flush=True)
        _wait_for_command(started)
        return Finished(rec, output, failure=rec.failure)
    rec.say_why_stopped_early()
    if rec.stopped_early:  # --max-size or a full disk: the trace ends, the command runs on
        rec.finish()
        if started.running():
            rec.progress(f"{os.path.basename(command[0])} runs on untraced; waiting for it")
        _wait_for_command(started)
        return Finished(rec, output, started.exit_code(), stopped_early=rec.disk_full)
    try:
        exit_code = started.exit_code()  # ptrace: the engine reaped it and says how it ended
    except CmtraceError as exc:  # the recorder died (ptrace: its command with it)
        rec.finish(interrupted=str(exc))
        print(f"cmtrace: error: {exc}", file=sys.stderr, flush=True)
        return Finished(rec, output, failure=exc)
    rec.finish()
    return Finished(rec, output, exit_code=exit_code)


def _wait_for_command(started: Command) -> None:
    """`run` whose recording ended before its command: wait for the command, as promised."""
    while started.running():
        time.sleep(0.2)
