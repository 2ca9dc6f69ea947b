"""The ptrace backend: the engine (engine.c, a helper process) stops the target at its fd
syscalls and reads the Python stack with process_vm_readv; no BPF, no root.

It implements cmtrace.record.backend.Backend over EngineRecording (driver.py), which holds the
policy both backends share: the walker configuration (bpf.targets.fill_config) after the layout
is validated on the live stacks, the decoder (bpf.decode) and the Symbolizer (bpf.stacks).

Run mode: the engine forks the command (so it is its parent: Yama's ptrace_scope 1 allows it),
installs a seccomp filter so only fd syscalls stop, and holds each exec until its image is
configured. The command dies with the engine (PTRACE_O_EXITKILL): a seccomp filter whose tracer
is gone would fail every later fd syscall with ENOSYS. Attach mode: the engine seizes every
thread, stops at every syscall and detaches on stop(), leaving the target running.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from cmtrace.errors import CmtraceError, EnvironmentProblem, TargetError
from cmtrace.record import permissions, procfs
from cmtrace.record.backend import PythonTarget, Records
from cmtrace.record.bpf import stacks, targets
from cmtrace.record.generators import BirthGenerators
from cmtrace.record.ptrace.driver import PENDING_POLL_S, REVALIDATE_S, EngineRecording
from cmtrace.record.ptrace.engine import EXIT_PTRACE_REFUSED, Engine, EngineUnavailable
from cmtrace.record.records import Batch

START_TIMEOUT_S = 30.0  # the engine seizing the target, or the command reaching its exec
FINISH_TIMEOUT_S = 30.0  # detaching every thread and writing the counters
LINGER_S = 2.0  # run: the command exited; how long its children may keep the engine alive
PENDING_BUDGET_S = 0.015  # one drain keeps polling this long while an exec is held


class PtraceBackend:
    """One engine per traced root (run: the command; attach: each pid given to trace())."""

    name = "ptrace"
    missing_tracepoints: list[str] = []
    stack_failure: str | None = None

    def __init__(
        self,
        follow: bool,
        python_stacks: bool = True,
        calls: bool = False,
        progress: Callable[[str], None] = lambda _text: None,
    ) -> None:
        self.follow = follow
        self.stacks = python_stacks
        self.progress = progress
        self.attached_note = ""
        self.start_ns = time.monotonic_ns()
        self.interpreters = targets.Interpreters()
        self.symbolizer = stacks.Symbolizer(self.interpreters, warm=False)  # no BPF: no BTF
        self.generators = BirthGenerators()  # each birth's generator frames (issue 13)
        self.recordings: list[EngineRecording] = []
        self.waiting: list[tuple[EngineRecording, Batch, list[bytes]]] = []  # read, not taken
        self.counters: dict[str, int] = {}
        self.stopped = False
        self.command: PtraceCommand | None = None  # run: the command the first engine started
        if calls:  # RecordOptions.validate refuses --calls with ptrace; here for other callers
            raise EnvironmentProblem("--calls needs USDT uprobes: use --backend bpf")

    # -- setup
    def load(self) -> None:
        """Find (or build) the engine binary; nothing is traced yet."""
        from cmtrace.record.ptrace.engine import engine_binary  # noqa: PLC0415

        try:
            self.binary = engine_binary()
        except EngineUnavailable as exc:
            raise EnvironmentProblem(f"--backend ptrace: {exc}") from None
        self.start_ns = time.monotonic_ns()

    def _recording(self, engine: Engine) -> EngineRecording:
        recording = EngineRecording(
            engine, boot_ns=self.start_ns, interpreters=self.interpreters, stacks=self.stacks
        )
        recording.symbolizer = self.symbolizer  # one id space for every engine's records
        recording.generators = self.generators
        self.recordings.append(recording)
        return recording

    def start_command(self, command: list[str], user: Any = None) -> PtraceCommand:
        """Run mode: the engine forks `command` (as `user` behind sudo) and holds it at exec."""
        argv = _as_user(command, user)
        env = None
        if user is not None:
            env = dict(os.environ, HOME=user.pw_dir, USER=user.pw_name, LOGNAME=user.pw_name)
        engine = Engine.run(argv, follow=True, hold_exec=True, binary=self.binary, env=env)
        recording = self._recording(engine)
        pid = self._await_exec(recording)
        self.command = PtraceCommand(self, recording, pid)
        return self.command

    def _await_exec(self, recording: EngineRecording) -> int:
        """Read until the command's first exec (held there by the engine): its pid."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and not recording.finished:
            batch, python_records = recording.engine.read(0.05)
            self.waiting.append((recording, batch, python_records))
            pids = recording._exec_pids(batch)
            if pids:
                return pids[0]
        stats = recording.wait(FINISH_TIMEOUT_S)
        raise EnvironmentProblem(
            f"the ptrace engine could not start the command (engine exit status "
            f"{stats.get('engine_status')})"
        )

    def trace(self, pid: int) -> None:
        """Attach mode: seize pid's threads (a pid a running engine already follows is kept)."""
        if any(r.engine.pid and _tracer_of(pid) == r.engine.pid for r in self.recordings):
            return
        engine = Engine.attach(pid, follow=self.follow, hold_exec=True, binary=self.binary)
        recording = self._recording(engine)
        deadline = time.monotonic() + START_TIMEOUT_S
        while _tracer_of(pid) != engine.pid:
            status = engine.process.poll()
            if status is not None:
                self.recordings.remove(recording)
                raise _attach_refused(pid, status)
            if time.monotonic() > deadline:
                raise EnvironmentProblem(f"the ptrace engine did not seize pid {pid} in time")
            time.sleep(0.005)
        engine.mark_running()

    def hold_at_exec(self, pid: int) -> None:
        """The engine holds every exec (-H) until the image is configured: nothing to ask."""

    def resume(self, pid: int) -> None:
        """Held execs are resumed by EngineRecording once configured (see driver.py)."""

    # -- Python targets
    def watch_python(self, pid: int) -> PythonTarget:
        for recording in self.recordings:
            target = recording.targets.get(pid)
            if target is not None:  # configured at its exec, or settling there
                return target
        owner = self._owner(pid)
        if owner is None:
            return PythonTarget.failed(pid, "not traced by the ptrace engine")
        return owner.watch(pid)

    def _owner(self, pid: int) -> EngineRecording | None:
        tracer = _tracer_of(pid)
        for recording in self.recordings:
            if recording.engine.pid == tracer:
                return recording
        return self.recordings[0] if self.recordings else None

    def inherit_python(self, parent: PythonTarget, child: int) -> PythonTarget:
        """The engine copies the parent's walker config to a followed child at fork."""
        interp = self.interpreters.installed(parent.pid, parent.generation)
        if interp is not None:
            from dataclasses import replace  # noqa: PLC0415

            self.interpreters.add_fork(child, parent.generation, replace(interp, pid=child))
        target = PythonTarget(pid=child, status="ok", version=parent.version,
                              layout_source=parent.layout_source, generation=parent.generation,
                              validated_frames=parent.validated_frames)  # fmt: skip
        target.cmdline = parent.cmdline
        target.as_dict()
        target.done.set()
        return target

    # -- records
    def drain(self) -> Records | None:
        tables = [recording.take(batch, records) for recording, batch, records in self.waiting]
        self.waiting = []
        deadline = time.monotonic() + PENDING_BUDGET_S
        for recording in self.recordings:
            tables.append(recording.poll(0.0))
            while recording._pending and time.monotonic() < deadline and not recording.finished:
                tables.append(recording.poll())  # a held exec: its next stop comes soon
        tables = [table for table in tables if len(table)]
        if not tables:
            return None
        return Records(pa.concat_tables(tables))

    def wait_for_records(self, timeout: float) -> bool:
        """Wait up to `timeout` for an engine to send something (or end its stream): True if
        one did, or if a drain has work to do anyway (records read and not taken, an exec
        held, a layout to check again soon). The session's threads sleep here while the
        target makes no fd syscall instead of waking every 20 ms."""
        if self.waiting:
            return True
        live = [r for r in self.recordings if not r.finished]
        if any(r._pending for r in live):
            timeout = min(timeout, PENDING_POLL_S)
        elif any(r._unvalidated for r in live):
            timeout = min(timeout, REVALIDATE_S)
        if not live:
            time.sleep(timeout)
            return False
        try:
            return bool(select.select([r.engine.records for r in live], [], [], timeout)[0])
        except (OSError, ValueError):  # an engine closed meanwhile: let the drain see it
            return True

    def take_frames(self, final: bool = False) -> list[dict[str, Any]]:
        if not self.stacks:
            return []
        return self.symbolizer.flush() if final else self.symbolizer.take_frames()

    def take_new_files(self) -> list[tuple[int, str]]:
        return self.symbolizer.take_new_files() if self.stacks else []

    def take_cmdlines(self) -> dict[int, list[str]]:
        """pid -> argv of every process that exec'd since the last call, read at its exec while
        the engine held it (a short-lived child may be gone when its exec event is drained)."""
        taken: dict[int, list[str]] = {}
        for recording in self.recordings:
            taken.update(recording.take_cmdlines())
        return taken

    def lost_events(self) -> int:
        """Records the engine could not write (counted at its end; backpressure otherwise)."""
        return self.counters.get("dropped", 0) + self.counters.get("write_errors", 0)

    def stats(self) -> dict[str, int]:
        """The engines' counters (stops, events, stacks, dropped...), summed: meta.json."""
        return dict(self.counters)

    # -- the end
    def stop(self) -> None:
        """Attach: detach every engine (the targets run on); run: the command has exited, its
        engine ends with its last traced process (see PtraceCommand.exit_code), or, stopped
        early (--max-size, a full disk), the engine stops recording, ends its stream and serves
        the command's stops until it exits (its seccomp filter needs a tracer: never ENOSYS).
        Whatever the engines still send is read, so they never block on a full pipe, and
        kept for drain."""
        if self.stopped:
            return
        self.stopped = True
        for recording in self.recordings:
            recording.engine.stop()
        for recording in self.recordings:
            self._read_to_end(recording)
            if self.command is not None and self.command.recording is recording:
                continue  # run: its counters come when the command has ended (exit_code)
            self._add_counters(recording.wait(FINISH_TIMEOUT_S))

    def _read_to_end(
        self, recording: EngineRecording, timeout: float = FINISH_TIMEOUT_S, kill: bool = True
    ) -> None:
        deadline = time.monotonic() + timeout
        while not recording.finished and time.monotonic() < deadline:
            batch, python_records = recording.engine.read(0.05)
            if len(batch) or python_records:
                self.waiting.append((recording, batch, python_records))
        if kill and not recording.finished:  # it did not end: kill it (run: its tracees too)
            recording.engine.process.kill()

    def _add_counters(self, stats: dict[str, Any]) -> None:
        for key, value in stats.items():
            if isinstance(value, int) and key not in ("exit_code", "engine_status"):
                self.counters[key] = self.counters.get(key, 0) + value

    def close(self) -> None:
        for recording in self.recordings:
            if recording.engine.process.poll() is None:
                recording.engine.process.kill()
                recording.engine.process.wait()
            try:
                recording.engine.close()
            except OSError:
                pass  # closed already
        self.recordings = []


class PtraceCommand:
    """`cmtrace run`'s command under the engine: the engine is its parent and reaps it."""

    def __init__(self, backend: PtraceBackend, recording: EngineRecording, pid: int) -> None:
        self.backend, self.recording, self.pid = backend, recording, pid
        self._exit_code: int | None = None

    def release(self) -> None:
        """Nothing to do: the first drain configures the held exec and resumes it."""

    def running(self) -> bool:
        """The engine reaps the command, so it runs while both are alive (the record stream
        may have ended before: recording stopped early and the command runs on)."""
        return self.recording.engine.process.poll() is None and procfs.is_alive(self.pid)

    def kill(self) -> None:
        """The engine's death takes the command with it (PTRACE_O_EXITKILL)."""
        self.recording.engine.process.send_signal(signal.SIGKILL)
        self.recording.engine.process.wait()

    def exit_code(self) -> int:
        """The command's status as a shell reports it, from the engine's counters (it reaped
        the command). Children still running LINGER_S after it are killed with the engine."""
        if self._exit_code is None:
            self.backend.stopped = True
            self.backend._read_to_end(self.recording, timeout=LINGER_S, kill=False)
            if not self._engine_ended(LINGER_S):
                self._kill_lingering()
            self.backend._read_to_end(self.recording)
            stats = self.recording.wait(FINISH_TIMEOUT_S)
            self.backend._add_counters(stats)
            death = _engine_death(stats)
            if death:
                raise CmtraceError(
                    f"the ptrace engine {death}, and the command was killed with it (run mode "
                    "is fail-stop: see the README); the trace so far is kept, marked interrupted",
                    exit_code=128 + signal.SIGKILL,
                )
            self._exit_code = int(stats.get("exit_code", 0))
        return self._exit_code

    def _engine_ended(self, timeout: float) -> bool:
        """Whether the engine has ended (waiting up to `timeout` when its stream has ended
        but not the engine: recording stopped early, and children of the command linger)."""
        if not self.recording.finished:
            return False
        try:
            self.recording.engine.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def _kill_lingering(self) -> None:
        """Children still traced after the command exited cannot run on without the engine
        (their seccomp filter would fail every fd syscall): kill them, so the engine ends by
        itself and reports the command's status."""
        lingering = _traced_by(self.recording.engine.pid)
        self.backend.progress(
            f"the command exited; killing its children still traced ({', '.join(map(str, lingering))}): "
            "with --backend ptrace a command's processes end with the recording"
        )
        for pid in lingering:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _engine_death(stats: dict[str, Any]) -> str | None:
    """How the engine ended, if not by itself: killed by a signal, or gone without writing
    its counters (an internal error). Its tracees were killed with it (PTRACE_O_EXITKILL)."""
    status = stats.get("engine_status")
    if isinstance(status, int) and status < 0:
        return f"was killed by {signal.Signals(-status).name}"
    if "stops" not in stats:
        return f"ended without its counters (exit status {status})"
    return None


def _traced_by(tracer: int) -> list[int]:
    """The processes whose main thread `tracer` traces."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _tracer_of(int(entry)) == tracer:
            pids.append(int(entry))
    return pids


def _as_user(command: list[str], user: Any) -> list[str]:
    """Under sudo the command runs as the user behind it (numeric ids: no lookups traced)."""
    if user is None:
        return list(command)
    groups = ",".join(str(g) for g in os.getgrouplist(user.pw_name, user.pw_gid))
    return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}",
            f"--groups={groups}", "--", *command]  # fmt: skip


def _tracer_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("TracerPid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _attach_refused(pid: int, status: int) -> Exception:
    """The engine ended before seizing pid: EPERM (77) is the one-line fix, else it is gone."""
    if status == EXIT_PTRACE_REFUSED:
        access = permissions.ptrace_attach_access(pid, probe=False)
        if access.allowed:
            return EnvironmentProblem(
                f"ptrace attach: the kernel refused to trace pid {pid} (EPERM): "
                f"{permissions.FIX_CAP_PTRACE}"
            )
        return EnvironmentProblem(access.message())
    if not procfs.is_alive(pid):
        return TargetError(f"pid {pid} exited before it could be traced: nothing recorded")
    return EnvironmentProblem(f"the ptrace engine failed to attach to pid {pid} (status {status})")
