"""`cmtrace -p PID` and `cmtrace run -- CMD`: record a trace, then print what leaked.

A Recording wires the collector (kernel side), the symbolizer (Python stacks, when the
interpreter is CPython) and the dataset writer, and runs the drain/flush loop until the target
exits, the duration ends, or SIGINT/SIGTERM arrives.
"""

from __future__ import annotations

import argparse
import os
import platform
import pwd
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from cmtrace.errors import (
    EXIT_LEAKS,
    CmtraceError,
    EnvironmentProblem,
    TargetError,
    TraceError,
    UsageError,
)
from cmtrace.record import procfs
from cmtrace.record.bpf.collect import DRAIN_INTERVAL, Collector, decode, decode_calls
from cmtrace.trace import schema
from cmtrace.trace.sources import SourceCollector
from cmtrace.trace.writer import DiskFull, TraceWriter, prepare_output_dir

FLUSH_INTERVAL = 0.5  # seconds: a killed tracer loses at most this much (the issue allows 1 s)
MIN_KERNEL = (5, 8)  # BPF ring buffer


# ---- command line -----------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction) -> None:
    attach = sub.add_parser(
        "attach",
        help="attach to a running process (also: cmtrace -p PID)",
        usage="cmtrace -p PID [-o DIR] [--duration S] [-f] [options]",
        description=(
            "Attach to a running process and record the birth and death of every file "
            "descriptor, with the Python stack that made it, until the process exits, "
            "--duration ends, or Ctrl-C / SIGTERM (the process keeps running untouched). "
            "Then print the fds that leaked."
        ),
    )
    attach.add_argument("-p", "--pid", type=int, required=True, help="process to trace")
    attach.add_argument(
        "-f", "--follow-children", action="store_true",
        help="also trace its child processes, existing descendants included",
    )  # fmt: skip
    attach.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    _add_recording_options(attach)
    attach.set_defaults(func=run_attach)

    run = sub.add_parser(
        "run",
        help="start a command under trace",
        usage="cmtrace run [-o DIR] [options] -- CMD [ARGS...]",
        description=(
            "Start CMD already traced (its first openat included), following its children. "
            "Its stdin/stdout/stderr pass through; under sudo it runs as $SUDO_USER. The "
            "summary goes to stderr and cmtrace exits with CMD's status."
        ),
    )
    _add_recording_options(run)
    run.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    run.set_defaults(func=run_command)


def _add_recording_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-o", "--output", metavar="DIR", type=Path,
        help="trace directory (default ./cmtrace-PID-YYYYmmdd-HHMMSS); must not hold anything "
        "but a trace, which --force replaces",
    )  # fmt: skip
    parser.add_argument("--force", action="store_true", help="replace a trace in -o DIR")
    parser.add_argument(
        "--fail-on-leak", action="store_true", help="exit 3 when leaks are found (for CI)"
    )
    parser.add_argument(
        "--exclude", metavar="FILE", type=Path,
        help="file of site patterns (e.g. myapp/db.py:Pool.*) whose fds are expected to live",
    )  # fmt: skip
    parser.add_argument(
        "--no-python-stacks", action="store_true",
        help="record fds without walking Python stacks (cheapest)",
    )  # fmt: skip
    parser.add_argument(
        "--calls", action="store_true",
        help="also record __enter__/__exit__/__aenter__/__aexit__ entries and returns through "
        "the interpreter's USDT probes (builds that have them: Debian 3.8-3.10, 3.15+), so the "
        "report can prove an __exit__ or __enter__ raised; every Python call gets slower",
    )  # fmt: skip
    parser.add_argument(
        "--ring-mb", type=int, default=32, metavar="MB",
        help="kernel ring buffer size, a power of two (default 32)",
    )  # fmt: skip
    parser.add_argument("--top", type=int, default=10, help="leak sites shown in the summary")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")


# ---- environment checks -----------------------------------------------------------------------


def check_environment() -> None:
    if os.geteuid() != 0:
        raise EnvironmentProblem(
            "recording needs root (BPF and tracepoints): run `sudo cmtrace ...`"
        )
    release = platform.release()
    version = tuple(int(x) for x in release.split("-")[0].split(".")[:2])
    if version < MIN_KERNEL:
        raise EnvironmentProblem(
            f"kernel {release} is older than 5.8 (no BPF ring buffer): cmtrace needs 5.8 or newer"
        )
    ensure_tracefs()
    ensure_kernel_headers()


def ensure_kernel_headers() -> None:
    """bcc compiles the probes against kernel headers (or the kheaders module)."""
    release = platform.release()
    if Path(f"/lib/modules/{release}/build/include").exists():
        return
    if Path("/sys/kernel/kheaders.tar.xz").exists():
        return
    raise EnvironmentProblem(
        f"no kernel headers for {release}: run `make install` (links the closest Debian "
        f"headers) or `apt-get install linux-headers-{release}`"
    )


def ensure_tracefs() -> None:
    events = Path("/sys/kernel/tracing/events/syscalls")
    if events.is_dir():
        return
    result = subprocess.run(
        ["mount", "-t", "tracefs", "tracefs", "/sys/kernel/tracing"],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0 or not events.is_dir():
        raise EnvironmentProblem(
            "tracefs is not mounted and could not be mounted: run `mount -t tracefs tracefs "
            "/sys/kernel/tracing` (and check the kernel has CONFIG_FTRACE_SYSCALLS)"
        )


def requesting_user() -> tuple[int, int] | None:
    """(uid, gid) of the user behind sudo, who should own the trace; None = ourselves."""
    uid, gid = os.environ.get("SUDO_UID"), os.environ.get("SUDO_GID")
    if uid and gid and os.geteuid() == 0:
        return int(uid), int(gid)
    return None


def default_output(pid: int) -> Path:
    return Path(f"cmtrace-{pid}-{datetime.now():%Y%m%d-%H%M%S}")


# ---- the recording loop -----------------------------------------------------------------------


class Recording:
    """One trace being recorded: collector + symbolizer + writer, and the drain/flush loop."""

    def __init__(self, args: argparse.Namespace, follow: bool):
        self.args = args
        self.follow = follow
        self.quiet = args.quiet
        self.collector = Collector(
            follow=follow,
            ring_pages=_ring_pages(args.ring_mb),
            python_stacks=not args.no_python_stacks,
            calls=getattr(args, "calls", False),
        )
        self.call_probes = None  # cmtrace.record.bpf.usdt.CallProbes when --calls is on
        self.pending_calls: list[pa.Table] = []
        self.symbolizer = None
        self.python_targets: dict[int, dict] = {}
        self._installed_targets: dict[int, object] = {}  # pid -> symbolize.PythonTarget
        self.writer: TraceWriter | None = None
        self.pending: list[pa.Table] = []
        self.stop_reason = ""
        self._stop = False
        self.root_pids: set[int] = set()
        self.events_written = 0
        self.failure: CmtraceError | None = None  # what stopped the recording, if it failed
        self.held_pid = 0  # `run`: the kernel stops this pid after each exec until resumed
        self.ns_pids: dict[int, int] = {}  # processes whose pid namespace is not ours
        self.sources = SourceCollector()
        self._lock = threading.Lock()  # the drain thread's state: pending, symbolizer, sources
        self._draining = threading.Event()
        self._drain_error: Exception | None = None

    # -- setup
    def load(self) -> None:
        self._make_symbolizer()
        self.collector.load()
        if self.collector.stack_failure:
            self.symbolizer = None
            self.collector.on_python_record = None
            self.progress(f"{self.collector.stack_failure}: recording without Python stacks")
        if self.collector.calls:
            from cmtrace.record.bpf.usdt import CallProbes  # noqa: PLC0415

            self.call_probes = CallProbes(self.collector.bpf)

    def _make_symbolizer(self) -> None:
        if self.args.no_python_stacks:
            return
        try:
            from cmtrace.record.bpf import symbolize  # noqa: PLC0415
        except ImportError:
            return
        self.symbolizer = symbolize.Symbolizer()
        self.collector.on_python_record = self.symbolizer.on_record

    def open_writer(
        self, path: Path, targets: list[int], extra_meta: dict, cmdline: list[str] | None = None
    ) -> None:
        meta = {
            "targets": [
                {
                    "pid": pid,
                    "ns_pid": procfs.ns_pid(pid),
                    "comm": procfs.comm(pid),
                    "cmdline": cmdline or procfs.cmdline(pid),
                }
                for pid in targets
            ],
            "start_monotonic_ns": self.collector.boot_ns,
            "follow_children": self.follow,
            "missing_tracepoints": self.collector.missing_tracepoints,
            **extra_meta,
        }
        self.writer = TraceWriter(path, meta, owner=requesting_user())

    def add_target(self, pid: int) -> None:
        """Trace pid: kernel filter first, then the snapshot of what it already has open."""
        self.collector.trace_pid(pid)
        self.install_python(pid)

    def note_process(self, pid: int) -> None:
        """A process seen to fork or exec: remember its pid inside its own namespace."""
        inner = procfs.ns_pid(pid)
        if inner is not None and inner != pid:
            self.ns_pids[pid] = inner

    def install_python(self, pid: int) -> None:
        self.note_process(pid)
        if self.symbolizer is None:
            return
        self.sources.note_root(pid)
        from cmtrace.record.bpf import symbolize  # noqa: PLC0415

        try:
            target = symbolize.install_python_target(self.collector.bpf, pid)
        except Exception as exc:  # never let stack support stop fd recording
            reason = f"stack support failed: {type(exc).__name__}: {exc}"
            target = {"pid": pid, "python": None, "reason": reason}
        self._register_target(pid, target)

    def _register_target(self, pid: int, target, inherited_from: int | None = None) -> None:
        self.python_targets[pid] = _as_dict(target)
        if isinstance(target, dict):
            return
        self._installed_targets[pid] = target
        if self.call_probes is not None:
            self._arm_calls(target, inherited_from)

    def inherit_python(self, parent: int, child: int) -> None:
        """A followed fork: the kernel gave the child its parent's walker configuration (it may
        already have run and exited); record it as the same interpreter."""
        target = self._installed_targets.get(parent)
        if self.symbolizer is None or target is None or target.status != "ok":
            self.install_python(child)  # notes the process too
            return
        self.note_process(child)
        from cmtrace.record.bpf import symbolize  # noqa: PLC0415

        self._register_target(child, symbolize.inherit_python_target(target, child), parent)

    def _arm_calls(self, target, inherited_from: int | None = None) -> None:
        """--calls: arm the USDT probes once the target's interpreter is known (at once, or
        from a thread when the interpreter is still loading)."""
        if target.done.is_set() or target.status != "pending":
            self._arm_calls_now(target, inherited_from)
        else:
            threading.Thread(target=self._arm_calls_when_ready, args=(target,), daemon=True).start()

    def _arm_calls_when_ready(self, target) -> None:
        target.done.wait(timeout=30)
        self._arm_calls_now(target)

    def _arm_calls_now(self, target, inherited_from: int | None = None) -> None:
        from cmtrace.record.bpf import symbolize  # noqa: PLC0415

        view = _as_dict(target)
        interp = symbolize.installed_interpreter(target)
        if interp is None:
            view["calls"] = "not recorded: " + (view.get("reason") or "no CPython found")
            return
        try:
            count = self.call_probes.attach(target.pid, interp, inherited_from)
        except Exception as exc:  # evidence only (UsdtError, OSError, bcc): fds still recorded
            why = str(exc)
            if not procfs.is_alive(target.pid):
                why = "the process ended before its probes could be armed"
            view["calls"] = f"not recorded: {why}"
            self.progress(f"--calls in pid {target.pid}: {why}")
            return
        view["calls"] = f"recorded ({count} USDT locations)"

    def snapshot_preexisting(self, pids: list[int]) -> None:
        t_ns = time.monotonic_ns() - self.collector.boot_ns
        rows = [dict(row, t_ns=t_ns) for pid in pids for row in procfs.open_fds(pid)]
        self.writer.write_preexisting(rows)

    # -- loop
    def request_stop(self, reason: str) -> None:
        if not self._stop:
            self._stop, self.stop_reason = True, reason

    def loop(self, still_running, deadline: float | None = None) -> None:
        """Flush and watch for the end here; a second thread keeps draining the ring, so a slow
        Parquet write (or a busy machine) does not let the kernel's ring buffer fill up."""
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

    def _watch(self, still_running, deadline: float | None) -> None:
        last_flush = time.monotonic()
        while not self._stop:
            time.sleep(DRAIN_INTERVAL)
            now = time.monotonic()
            if now - last_flush >= FLUSH_INTERVAL:
                try:
                    self.flush()
                except DiskFull as exc:
                    self.failure = exc
                    self.request_stop("disk full")
                    return
                last_flush = now
            if deadline is not None and now >= deadline:
                self.request_stop("duration reached")
            elif not still_running():
                self.request_stop("target exited")

    def _drain_continuously(self) -> None:
        while self._draining.is_set():
            time.sleep(DRAIN_INTERVAL)
            try:
                with self._lock:
                    self._drain()
            except Exception as exc:  # surfaced by loop() once the watcher has stopped
                self._drain_error = exc
                self.request_stop("the collector failed")
                return

    def _drain(self) -> None:
        batch = self.collector.drain()
        if not len(batch):
            return
        table = decode(batch, self.collector.boot_ns)
        self.pending.append(table)
        if self.call_probes is not None:
            calls = decode_calls(batch, self.collector.boot_ns)
            if len(calls):
                self.pending_calls.append(calls)
        self._react_to_processes(table)
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
                if self.call_probes is not None:
                    self.call_probes.forget(pid)
                self.install_python(pid)
                if self.held_pid and (pid == self.held_pid or is_python_image(row["path"])):
                    _resume(pid)  # the kernel stopped it at this exec (see hold_at_exec)

    def flush(self, final: bool = False) -> None:
        lost = self.collector.lost_events()
        frames = None
        with self._lock:  # take what the drain thread gathered; write without holding it
            tables, self.pending = self.pending, []
            calls, self.pending_calls = self.pending_calls, []
            if self.symbolizer is not None:
                # At the end, stacks still waiting for a code record are resolved as well as
                # can be.
                frames = self.symbolizer.flush() if final else self.symbolizer.take_frames()
        if tables:
            table = pa.concat_tables(tables).sort_by([("t_ns", "ascending")])
            self.writer.write_part("events", table)
            self.events_written += len(table)
        if calls:
            table = pa.concat_tables(calls).sort_by([("t_ns", "ascending")])
            self.writer.write_part("calls", table)
        if frames is not None:
            self.writer.write_rows("stacks", frames)
        if lost != self.writer.meta.get("lost_events"):
            self.writer.write_meta(lost_events=lost)

    def abandon(self) -> None:
        """Stop recording after a write failure: detach, and mark the trace if we still can."""
        self.collector.close()
        try:
            self.writer.finish(status=schema.STATUS_INTERRUPTED, stop_reason=str(self.failure))
        except CmtraceError:
            pass  # meta.json stays 'recording' and readers report the trace interrupted

    def finish(self) -> None:
        if self.failure is not None:
            self.abandon()
            raise self.failure
        self.collector.stop()
        if self.call_probes is not None:
            self.call_probes.disarm()
        time.sleep(DRAIN_INTERVAL)  # let records reserved before the stop be committed
        self._drain()
        self.flush(final=True)
        self._snapshot_threads()
        self._capture_sources()
        self.writer.finish(
            lost_events=self.collector.lost_events(),
            stop_reason=self.stop_reason,
            events=self.events_written,
            python=list(self.python_targets.values()),
            processes=[{"pid": pid, "ns_pid": inner} for pid, inner in self.ns_pids.items()],
            degraded=self._degraded(),
        )

    def _snapshot_threads(self) -> None:
        """Every live target's thread stacks as recording stops: the analysis reads from them
        whether a `with` block is still active (see cmtrace.analysis.causes)."""
        if self.symbolizer is None:
            return
        from cmtrace.interp import walker  # noqa: PLC0415

        threads = []
        for pid, target in self.python_targets.items():
            if not target.get("python") or not procfs.is_alive(pid):
                continue
            try:
                stacks = walker.snapshot_threads(pid)
            except Exception as exc:  # evidence only: never lose the trace over it
                self.writer.meta.setdefault("warnings", []).append(f"snapshot of {pid}: {exc}")
                continue
            threads += [
                {"pid": pid, "tid": tid, "frames": frames} for tid, frames in stacks.items()
            ]
        if threads:
            self.writer.write_json("snapshot.json", {"threads": threads})

    def _read_new_sources(self) -> None:
        """Read each source file when a stack first names it: a target in a container or
        chroot can only be read through /proc/PID/root while it lives."""
        if self.symbolizer is None:
            return
        for pid, file in self.symbolizer.take_new_files():
            self.sources.add(pid, file)

    def _capture_sources(self) -> None:
        if self.symbolizer is None:
            return
        self._read_new_sources()
        alive = [pid for pid in self.root_pids if procfs.is_alive(pid)]
        try:
            self.writer.write_rows("sources", self.sources.rows(alive[0] if alive else None))
        except CmtraceError:
            raise
        except Exception as exc:  # sources only enrich the report; keep the trace
            self.writer.meta.setdefault("warnings", []).append(f"source capture failed: {exc}")

    def _degraded(self) -> dict:
        reasons = {
            str(t["pid"]): t.get("reason") for t in self.python_targets.values() if t.get("reason")
        }
        if self.symbolizer is None:
            reasons["*"] = (
                "Python stacks disabled (--no-python-stacks)"
                if self.args.no_python_stacks
                else self.collector.stack_failure
                or "Python stack support not available in this build"
            )
        return {"no_python_stacks": reasons}

    def progress(self, text: str) -> None:
        if not self.quiet:
            print(f"cmtrace: {text}", file=sys.stderr, flush=True)


def is_python_image(path: str | None) -> bool:
    """The kernel's test for exec'd images it holds (is_python_image in fdtrace.bpf.c)."""
    return bool(path) and os.path.basename(path).startswith("python")


def _resume(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


def _as_dict(target) -> dict:
    if isinstance(target, dict):
        return target
    if hasattr(target, "as_dict"):
        return target.as_dict()
    return dict(vars(target))


def _ring_pages(megabytes: int) -> int:
    if megabytes <= 0 or megabytes & (megabytes - 1):
        raise UsageError(f"--ring-mb {megabytes}: give a power of two such as 16 or 64")
    return megabytes * 1024 * 1024 // 4096


# ---- summary ----------------------------------------------------------------------------------


def print_summary(path: Path, args: argparse.Namespace, out) -> int:
    """Print the leak report of a finished trace; return the number of leaks."""
    try:
        from cmtrace.cli import report  # noqa: PLC0415
    except ImportError:
        print(f"trace written to {path}", file=out)
        return 0
    try:
        return report.print_summary(path, file=out, top=args.top, exclude=args.exclude)
    except CmtraceError:
        raise
    except Exception as exc:  # the trace is complete on disk whatever the analysis does
        raise TraceError(
            f"the trace in {path} is complete but could not be summarised "
            f"({type(exc).__name__}: {exc}); please report this bug with the trace attached"
        ) from exc


def _finish_with_summary(rec: Recording, path: Path, out) -> int:
    rec.finish()
    leaks = print_summary(path, rec.args, out)
    rec.progress(f"trace written to {path}")
    rec.collector.close()
    return leaks


def _install_stop_signals(rec: Recording, forward_to: int | None = None) -> None:
    def on_signal(signum, _frame):
        if forward_to is None:
            rec.request_stop(f"signal {signal.Signals(signum).name}")
        elif signum != signal.SIGINT or not _sigint_reached_child_too():
            try:
                os.kill(forward_to, signum)
            except ProcessLookupError:
                pass

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)


def _sigint_reached_child_too() -> bool:
    """A Ctrl-C at the terminal reaches the whole foreground group: don't send it twice."""
    try:
        return os.isatty(0) and os.tcgetpgrp(0) == os.getpgrp()
    except OSError:
        return False


# ---- cmtrace -p PID ---------------------------------------------------------------------------


def check_options(args: argparse.Namespace) -> None:
    """Refuse bad options before anything is attached or started."""
    if getattr(args, "calls", False) and args.no_python_stacks:
        raise UsageError(
            "--calls needs Python stacks (they tie each __exit__ to its with statement): "
            "drop --no-python-stacks"
        )
    if args.exclude is not None and not args.exclude.is_file():
        raise UsageError(f"--exclude {args.exclude}: no such file (one site pattern a line)")
    _ring_pages(args.ring_mb)


def run_attach(args: argparse.Namespace) -> int:
    check_options(args)
    procfs.check_traceable(args.pid)
    check_environment()
    pid = procfs.tgid_of(args.pid)
    output = args.output or default_output(pid)
    prepare_output_dir(output, args.force)
    rec = Recording(args, follow=args.follow_children)
    rec.progress(f"loading probes for pid {pid} ...")
    rec.load()
    targets = list(procfs.descendants(pid)) if args.follow_children else [pid]
    rec.root_pids = {pid}
    rec.open_writer(output, targets, {"mode": "attach"})
    for target in targets:
        rec.add_target(target)
    rec.snapshot_preexisting(targets)
    if not procfs.is_alive(pid):
        raise TargetError(f"pid {pid} exited before the probes were live: nothing recorded")
    _install_stop_signals(rec)
    print(f"cmtrace: attached to {pid} ({_describe(rec, pid)})", file=sys.stderr, flush=True)
    deadline = time.monotonic() + args.duration if args.duration else None
    rec.loop(lambda: procfs.is_alive(pid), deadline)
    rec.progress(f"stopping: {rec.stop_reason}")
    leaks = _finish_with_summary(rec, output, sys.stdout)
    return EXIT_LEAKS if args.fail_on_leak and leaks else 0


def _describe(rec: Recording, pid: int) -> str:
    name = procfs.comm(pid)
    target = rec.python_targets.get(pid)
    if target and target.get("python"):
        return f"{name}, Python {target['python']}"
    if target and target.get("reason"):
        return f"{name}, no Python stacks: {target['reason']}"
    return name


# ---- cmtrace run -- CMD -----------------------------------------------------------------------


def run_command(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise UsageError("no command given: cmtrace run [options] -- CMD [ARGS...]")
    if shutil.which(command[0]) is None:
        raise UsageError(f"command not found: {command[0]}")
    check_options(args)
    check_environment()
    rec = Recording(args, follow=True)
    rec.progress("loading probes ...")
    rec.load()
    child, release = spawn_held(command, _run_as_user())
    output = args.output or default_output(child)
    try:
        prepare_output_dir(output, args.force)
    except CmtraceError:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        raise
    rec.root_pids = {child}
    rec.open_writer(output, [child], {"mode": "run", "command": command}, cmdline=command)
    rec.collector.trace_pid(child)
    if rec.symbolizer is not None:
        rec.held_pid = child
        rec.collector.hold_at_exec(child)
    rec.snapshot_preexisting([child])
    _install_stop_signals(rec, forward_to=child)
    release()  # the child execs CMD now, already traced
    status: list[int] = []

    def child_running() -> bool:
        if status:
            return False
        done, st = os.waitpid(child, os.WNOHANG)
        if done:
            status.append(st)
        return not done

    rec.loop(child_running)
    if rec.failure is not None:  # the command runs on, untraced; wait for it as promised
        rec.abandon()
        print(f"cmtrace: error: {rec.failure}", file=sys.stderr, flush=True)
        while child_running():
            time.sleep(0.2)
        return rec.failure.exit_code
    leaks = _finish_with_summary(rec, output, sys.stderr)
    code = _exit_code(status[0]) if status else 0
    if args.fail_on_leak and leaks and code == 0:
        return EXIT_LEAKS
    return code


def _exit_code(status: int) -> int:
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def _run_as_user() -> pwd.struct_passwd | None:
    user = os.environ.get("SUDO_USER")
    if os.geteuid() != 0 or not user or user == "root":
        return None
    try:
        return pwd.getpwnam(user)
    except KeyError:
        return None


def spawn_held(command: list[str], user: pwd.struct_passwd | None):
    """Fork a child that waits, with nothing but stdio open, until release() lets it exec."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(write_end)
            os.closerange(3, read_end)
            os.closerange(read_end + 1, 65536)
            if user is not None:
                os.initgroups(user.pw_name, user.pw_gid)
                os.setgid(user.pw_gid)
                os.setuid(user.pw_uid)
                os.environ.update(HOME=user.pw_dir, USER=user.pw_name, LOGNAME=user.pw_name)
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            if os.read(read_end, 1) != b"x":
                os._exit(127)  # the tracer went away before releasing us
            os.execvp(command[0], command)
        except OSError as exc:
            os.write(2, f"cmtrace: error: cannot run {command[0]}: {exc.strerror}\n".encode())
        os._exit(127)
    os.close(read_end)

    def release() -> None:
        os.write(write_end, b"x")
        os.close(write_end)

    return pid, release
