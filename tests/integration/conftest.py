"""Shared fixtures of the real-eBPF tests: run `cmtrace`, start target programs, read traces.

Nothing here imitates bcc or the kernel. Tests load the real probes into the running kernel, so
they need root, bcc and tracefs; where this machine cannot do that, they are skipped with the
reason printed. Every wait is on a condition with a timeout (no fixed sleeps), because the
suite runs on loaded 2-core machines.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FDPROGRAMS = REPO / "tests" / "programs" / "fd"
# The venv's interpreter runs cmtrace (`python -m cmtrace`, the editable install of this tree);
# targets run under Debian's interpreter, the one users trace.
CMTRACE_PYTHON = os.environ.get("CMTRACE_PYTHON", sys.executable)
TARGET_PYTHON = os.environ.get("CMTRACE_TARGET_PYTHON", "/usr/bin/python3")

ATTACH_TIMEOUT = 120  # bcc compiles the probes at attach: 1-2 s idle, much more when loaded
EXIT_TIMEOUT = 120
ATTACHED = re.compile(r"attached to (\d+)")


# --- markers (registered in pyproject.toml) ------------------------------------------------------
# Every test here is written for root: it starts the recorder, reads other processes' memory, or
# runs interpreters through chroot wrappers. Tests that take the bpf_ready fixture load BPF, and
# so do these modules through their own harness (test_pystack) or doctor's load test.
LOADS_BPF_WITHOUT_FIXTURE = {"test_pystack", "test_doctor"}
SLOW_MODULES = {"test_e2e_matrix"}  # every interpreter x every leak program, in run and -p
HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE not in item.path.parents:
            continue  # this hook sees the whole session: tests/unit is left alone
        module = item.path.stem
        item.add_marker(pytest.mark.root)
        if "bpf_ready" in item.fixturenames or module in LOADS_BPF_WITHOUT_FIXTURE:
            item.add_marker(pytest.mark.bpf)
        if module in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
    deselect_cells(config, items)


# --- environment ---------------------------------------------------------------------------------
def bpf_unavailable_reason() -> str | None:
    """Why this machine cannot load BPF programs, or None when it can."""
    if os.geteuid() != 0:
        return "needs root to load BPF programs"
    probe = subprocess.run(
        [CMTRACE_PYTHON, "-c", "import bcc"], capture_output=True, text=True, timeout=60
    )
    if probe.returncode != 0:
        return f"bcc is not importable by {CMTRACE_PYTHON}"
    return None


@pytest.fixture(scope="session")
def bpf_ready() -> None:
    reason = bpf_unavailable_reason()
    if reason:
        print(f"skipping real-eBPF test: {reason}")
        pytest.skip(reason)


# --- which backend records, as which user --------------------------------------------------------
@dataclass(frozen=True)
class Recorder:
    """One way of recording: a backend, run as root or as an unprivileged user (cmtrace and the
    programs it attaches to both drop to that user; `cmtrace run` starts its command as it)."""

    name: str  # the cell's id in test names
    backend: str
    nobody: bool = False
    flags: tuple[str, ...] = ()  # recording flags of the cell (bpf-aggregate: --aggregate)


RECORDERS = {r.name: r for r in (Recorder("bpf", "bpf"), Recorder("ptrace", "ptrace"),
                                 Recorder("ptrace-nobody", "ptrace", nobody=True),
                                 Recorder("bpf-aggregate", "bpf", flags=("--aggregate",)))}  # fmt: skip
# --aggregate must find the same leaks as full history: the modules that check leaks run it
# (it records short-lived fds as counters, so tests of every single event do not apply)
AGGREGATE_MODULES = (
    "test_e2e_matrix.py",
    "test_causes_interpreters.py",
    "test_aggregate.py",
    "test_shared_top_stacks.py",
)
AGGREGATE_SLICE = ("debian-3.11", "pyenv-3.10")  # its interpreters in CI (all in test-full)
BACKENDS = ("bpf", "ptrace")  # the `backend` fixture's cells: root only
_active: list[Recorder] = []  # set by the `backend`/`recorder` fixture of the running module


@contextmanager
def recording_with(recorder: Recorder) -> Iterator[Recorder]:
    _active[:] = [recorder]
    try:
        yield recorder
    finally:
        _active.clear()


def active_recorder() -> Recorder | None:
    return _active[0] if _active else None


def as_nobody() -> bool:
    return bool(_active) and _active[0].nobody


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run the module's tests once per recorder backend, as root: every `cmtrace run` /
    `cmtrace -p` the helpers here build gets `--backend NAME` (a module opts in with
    usefixtures("backend"); a module-scoped fixture that records takes `backend` too, so it
    records once per backend). Module scope: pytest runs all of one backend, then the other."""
    with recording_with(RECORDERS[request.param]):
        yield request.param


@pytest.fixture(scope="module", params=list(RECORDERS))
def recorder(request: pytest.FixtureRequest) -> Iterator[Recorder]:
    """Like `backend`, plus the ptrace backend as user nobody (no capability at all): cmtrace
    and every target the helpers start run under targets.AS_NOBODY, in directories that user
    can write. For modules whose tests hold for an ordinary user too."""
    with recording_with(RECORDERS[request.param]) as chosen:
        yield chosen


# --- the CI slice of the recorder x interpreter matrix ---------------------------------------------
# `make test` (CI) runs every interpreter on BPF as root, and every recorder on these: Debian's
# own 3.11 (static, the one users trace), a 3.8-3.10 heap-frame build (shared libpython) and a
# 3.12+ one in a chroot (so the pid-namespace cells run on ptrace too). `make test-full`
# (CMTRACE_TEST_FULL=1) runs every cell.
SLICE_INTERPRETERS = ("debian-3.11", "pyenv-3.10", "debian-3.13")
FULL_MATRIX = os.environ.get("CMTRACE_TEST_FULL", "") not in ("", "0")
INTERPRETER_PARAMS = ("interpreter", "target")  # the parameter names of targets.Target cells


def cell_left_out(recorder: str, interpreter: str) -> str | None:
    """Why the (recorder, interpreter) cell is not run in this session, or None when it is.
    The one decision: the collection hook deselects by it, and module-scoped fixtures that
    record a whole matrix at once (test_e2e_matrix) record only the cells it keeps."""
    if RECORDERS[recorder].nobody and interpreter not in nobody_runnable():
        return "user nobody cannot run this interpreter (chroot needs root; root runs it)"
    if RECORDERS[recorder].flags and not FULL_MATRIX and interpreter not in AGGREGATE_SLICE:
        return f"bpf-aggregate runs on {', '.join(AGGREGATE_SLICE)} in CI: make test-full"
    if FULL_MATRIX or RECORDERS[recorder].backend == "bpf" or interpreter in SLICE_INTERPRETERS:
        return None
    return (
        f"outside the CI slice (bpf x all, all x {', '.join(SLICE_INTERPRETERS)}): make test-full"
    )


_nobody_runnable: list[set[str]] = []


def nobody_runnable() -> set[str]:
    """Names of the interpreters user nobody can run (tried once per session)."""
    import targets

    if not _nobody_runnable:
        _nobody_runnable.append({t.name for t in targets.unprivileged()[0]})
    return _nobody_runnable[0]


def interpreter_for(target):  # -> targets.Target
    """The interpreter as the active recorder's user runs it: nobody runs the pyenv builds
    through their copies outside /root (targets.unprivileged); root runs them where they are."""
    import targets

    if not as_nobody():
        return target
    return next(t for t in targets.unprivileged()[0] if t.name == target.name)


def _cell(item: pytest.Item) -> tuple[str, str] | None:
    params = getattr(getattr(item, "callspec", None), "params", {})
    recorder = params.get("recorder", params.get("backend"))
    interpreter = next((params[n] for n in INTERPRETER_PARAMS if n in params), None)
    if recorder not in RECORDERS or not hasattr(interpreter, "command"):
        return None
    return recorder, interpreter.name


def deselect_cells(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Drop the cells cell_left_out rejects (deselected, not skipped), saying how many and why."""
    kept, dropped, reasons = [], [], {}
    for item in items:
        cell = _cell(item) if HERE in item.path.parents else None
        reason = (cell_left_out(*cell) if cell else None) or _aggregate_left_out(item)
        if reason is None:
            kept.append(item)
        else:
            dropped.append(item)
            reasons[reason] = reasons.get(reason, 0) + 1
    if not dropped:
        return
    config.hook.pytest_deselected(items=dropped)
    items[:] = kept
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    for reason, count in reasons.items():
        line = f"cmtrace matrix: {count} cells deselected: {reason}"
        reporter.write_line(line) if reporter else print(line)


def _aggregate_left_out(item: pytest.Item) -> str | None:
    """bpf-aggregate cells outside the leak-checking modules are not run."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    name = params.get("recorder", params.get("backend"))
    if name in RECORDERS and RECORDERS[name].flags and item.path.name not in AGGREGATE_MODULES:
        return "bpf-aggregate runs the modules that check leaks (AGGREGATE_MODULES)"
    return None


def with_backend(args: tuple[str, ...] | list[str]) -> list[str]:
    """args with `--backend NAME` after `run` or `-p PID` when a backend is chosen."""
    args = list(args)
    if not _active or not args:
        return args
    flag = ["--backend", _active[0].backend, *_active[0].flags]
    if args[0] in ("run", "attach"):
        return [args[0], *flag, *args[1:]]
    if args[0] in ("-p", "--pid") and len(args) > 1:
        return [*args[:2], *flag, *args[2:]]
    return args


_nobody_home: list[Path] = []


def nobody_home() -> Path:
    """A HOME (and XDG cache, where the ptrace engine is built) user nobody can write."""
    if not _nobody_home:
        _nobody_home.append(shared_tmpdir("cmtrace-nobody-home-"))
    return _nobody_home[0]


def user_prefix() -> list[str]:
    """What runs a command as the active recorder's user (nothing for root)."""
    if not as_nobody():
        return []
    import targets

    home = nobody_home()
    return [*targets.AS_NOBODY, "env", f"HOME={home}", f"XDG_CACHE_HOME={home / 'cache'}"]


def shared_tmpdir(prefix: str) -> Path:
    """A fresh directory under /tmp every user can write (pytest's are private to root)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o777)
    return path


def cmtrace_argv(*args: str) -> list[str]:
    return [*user_prefix(), CMTRACE_PYTHON, "-m", "cmtrace", *with_backend(args)]


def run_cmtrace(
    *args: str,
    timeout: float = EXIT_TIMEOUT,
    input: str | None = None,
    env: dict | None = None,
    prefix: tuple[str, ...] = (),
    cwd: str | Path | None = None,
) -> subprocess.CompletedProcess:
    """Run `cmtrace ARGS` to completion (optionally under a wrapper such as runuser)."""
    return subprocess.run(
        [*prefix, *cmtrace_argv(*args)],
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
    )


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one-line error a bad input must produce (progress lines may precede it; a traceback
    or a multi-line message fails)."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("cmtrace: error")]
    assert len(errors) == 1, f"expected one error line, got stderr:\n{result.stderr}"
    assert lines[-1] == errors[0], f"the error must be the last line:\n{result.stderr}"
    return errors[0]


# --- processes with a line protocol ---------------------------------------------------------------
class LineReader:
    """Collects a pipe's lines on a thread so a test can wait for one with a timeout."""

    def __init__(self, stream) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.all: list[str] = []
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream) -> None:
        for line in stream:
            self.all.append(line)
            self.lines.put(line)
        self.lines.put("")  # EOF marker

    def wait_for(self, predicate, timeout: float, what: str) -> str:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line == "":
                self.lines.put("")
                raise AssertionError(f"stream ended while waiting for {what}")
            if predicate(line):
                return line

    def text(self) -> str:
        self._thread.join(timeout=30)
        return "".join(self.all)


class Target:
    """A program from tests/programs/fd speaking the ready/go/done JSON line protocol."""

    def __init__(self, argv: list[str], cwd: Path, user: str | None = None) -> None:
        # started as the active recorder's user (nobody attaches only to nobody's processes)
        prefix = ["runuser", "-u", user, "--"] if user else user_prefix()
        self.stderr_path = cwd / f"target-{time.monotonic_ns()}.stderr"
        self._stderr = open(self.stderr_path, "w")
        self.proc = subprocess.Popen(
            [*prefix, *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            cwd=cwd,
            bufsize=1,
        )
        self.pid = self.proc.pid
        self.out = LineReader(self.proc.stdout)
        self.messages: list[dict] = []

    def expect(self, event: str, timeout: float = 60) -> dict:
        """Wait for the JSON message whose "event" is `event`."""
        for message in self.messages:
            if message["event"] == event:
                self.messages.remove(message)
                return message

        def matches(line: str) -> bool:
            message = json.loads(line)
            if message["event"] == event:
                self.messages.insert(0, message)
                return True
            self.messages.append(message)
            return False

        try:
            self.out.wait_for(matches, timeout, f"target message {event!r}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; target stderr:\n{self.stderr_text()}") from None
        return self.messages.pop(0)

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float = 60) -> int:
        """Close stdin (the protocol's "you may exit") and wait for the exit status."""
        if self.proc.stdin and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
        return self.proc.wait(timeout=timeout)

    def stderr_text(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self._stderr.close()


def fdops(scenario: str, workdir: Path, *args: str) -> list[str]:
    return [TARGET_PYTHON, str(FDPROGRAMS / "fdops.py"), scenario, str(workdir), *args]


class Tracer:
    """`cmtrace -p PID ...` running in the background."""

    def __init__(self, args: list[str], cwd: Path | None = None) -> None:
        self.proc = subprocess.Popen(
            cmtrace_argv(*args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=cwd,
        )
        self.err = LineReader(self.proc.stderr)
        self.out = LineReader(self.proc.stdout)

    def wait_attached(self, timeout: float = ATTACH_TIMEOUT) -> int:
        try:
            line = self.err.wait_for(ATTACHED.search, timeout, "'cmtrace: attached to PID'")
        except AssertionError as exc:
            self.proc.kill()
            raise AssertionError(f"{exc}; tracer stderr:\n{self.err.text()}") from None
        return int(ATTACHED.search(line).group(1))

    def stop(self, sig: int = signal.SIGINT, timeout: float = EXIT_TIMEOUT) -> TracerResult:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.wait(timeout)

    def wait(self, timeout: float = EXIT_TIMEOUT) -> TracerResult:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"cmtrace did not exit within {timeout} s") from None
        return TracerResult(code, self.out.text(), self.err.text())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


@dataclass
class TracerResult:
    returncode: int
    stdout: str
    stderr: str

    def check(self) -> TracerResult:
        assert self.returncode == 0, f"cmtrace exited {self.returncode}:\n{self.stderr}"
        return self


@dataclass
class Session:
    """One traced run of a target: what it reported, and where its trace is."""

    trace: Path
    target: Target
    tracer: Tracer
    ready: dict = field(default_factory=dict)
    done: dict = field(default_factory=dict)
    result: TracerResult | None = None


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    """The test's directory; one nobody can write when the module's recorder runs as nobody
    (the module-scoped `recorder` fixture is active before any function-scoped one)."""
    yield from recording_dir(active_recorder(), lambda: tmp_path)


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fdtrace")


@pytest.fixture(scope="module")
def cell_dir(recorder: Recorder, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """module_dir for one recorder cell (a module-scoped recording per cell keeps its traces
    here): one nobody can write when the recorder runs as nobody."""
    yield from recording_dir(recorder, lambda: tmp_path_factory.mktemp("cell"))


def recording_dir(recorder: Recorder | None, private) -> Iterator[Path]:
    """pytest's own directory (`private()`), or one nobody can write, removed after use."""
    if recorder is not None and recorder.nobody:
        path = shared_tmpdir("cmtrace-test-")
        yield path
        shutil.rmtree(path, ignore_errors=True)
    else:
        yield private()


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory other users can traverse (pytest's tmp dirs are private to root)."""
    path = Path(tempfile.mkdtemp(prefix="cmtrace-test-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


_trace_numbers = itertools.count()  # tests sharing a module directory get distinct traces


def start_traced(
    scenario: str, workdir: Path, *tracer_args: str, scenario_args: tuple[str, ...] = ()
) -> Session:
    """Start a target, wait for its "ready", attach `cmtrace -p` to it and wait for "attached"."""
    target = Target(fdops(scenario, workdir, *scenario_args), workdir)
    try:
        ready = target.expect("ready")
        trace = workdir / f"trace-{scenario}-{next(_trace_numbers)}"
        tracer = Tracer(["-p", str(target.pid), "-o", str(trace), *tracer_args], cwd=workdir)
        attached = tracer.wait_attached()
    except BaseException:
        target.kill()
        raise
    assert attached == target.pid, f"attached to {attached}, expected {target.pid}"
    return Session(trace, target, tracer, ready=ready)


def trace_until_leaked(command: list[str], workdir: Path, out: Path) -> Target:
    """Start `command` (a program under tests/programs' attached.py), attach `cmtrace -p -o out`
    at its "ready", send "go", and at its "leaked" stop the tracer (SIGINT while the target
    lives: source, stacks and generators are read then). The target is returned still running."""
    target = Target(command, workdir)
    try:
        ready = target.expect("ready")
        tracer = Tracer(["-p", str(ready["pid"]), "-o", str(out)], cwd=workdir)
        assert tracer.wait_attached() == ready["pid"]
        target.send("go")
        target.expect("leaked")
        tracer.stop().check()
    except BaseException:
        target.kill()
        raise
    return target


# --- reading a trace -------------------------------------------------------------------------------
def read_meta(trace: Path) -> dict:
    return json.loads((trace / "meta.json").read_text())


def read_events(trace: Path):
    """The events table as pandas reads it (dictionary columns turned into plain strings)."""
    import pandas as pd

    events = pd.read_parquet(trace / "events")
    for column in ("op", "syscall", "kind"):
        events[column] = events[column].astype("object")
    return events.sort_values("t_ns", kind="stable").reset_index(drop=True)


def read_preexisting(trace: Path):
    import pandas as pd

    return pd.read_parquet(trace / "preexisting.parquet")


def report_json(trace: Path) -> dict:
    result = run_cmtrace("report", str(trace), "--format", "json")
    assert result.returncode == 0, f"report exited {result.returncode}: {result.stderr}"
    return json.loads(result.stdout)


def leaks_of(report: dict, pid: int) -> list[dict]:
    return [leak for leak in report["leaks"] if leak["pid"] == pid]


LOST_ZERO = re.compile(r"\b0 lost|lost[^\n\d]*\b0\b", re.IGNORECASE)


def assert_complete_and_lossless(trace: Path, summary: str | None = None) -> dict:
    """meta.json says complete with 0 lost events, and so does the summary when given."""
    meta = read_meta(trace)
    assert meta["status"] == "complete", meta
    assert meta["lost_events"] == 0, meta
    if summary is not None:
        assert LOST_ZERO.search(summary), f"summary does not report 0 lost events:\n{summary}"
    return meta


def proc_fds(pid: int) -> dict[int, str]:
    """Ground truth from the kernel: fd number -> readlink of /proc/PID/fd/N."""
    fds = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except FileNotFoundError:
            pass
    return fds


def proc_cloexec(pid: int, fd: int) -> bool:
    """CLOEXEC bit of an fd as the kernel has it (/proc/PID/fdinfo flags are octal)."""
    for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("flags:"):
            return bool(int(line.split()[1], 8) & 0o2000000)
    raise AssertionError(f"no flags in /proc/{pid}/fdinfo/{fd}")


def kind_from_link(link: str) -> str:
    """The schema's kind for what /proc/PID/fd/N links to."""
    anon = {
        "anon_inode:[eventfd]": "eventfd",
        "anon_inode:[eventpoll]": "epoll",
        "anon_inode:[signalfd]": "signalfd",
        "anon_inode:[timerfd]": "timerfd",
        "anon_inode:inotify": "inotify",
        "anon_inode:[fanotify]": "fanotify",
        "anon_inode:[pidfd]": "pidfd",
        "anon_inode:[userfaultfd]": "userfaultfd",
        "anon_inode:[perf_event]": "perf_event",
    }
    if link in anon:
        return anon[link]
    if link.startswith("socket:"):
        return "socket"
    if link.startswith("pipe:"):
        return "pipe"
    if link.startswith("/memfd:"):
        return "memfd"
    return "file"


def wait_until(condition, timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
