"""The parent pytest: re-execute the session under `cmtrace run`, then report per test.

The recorder must be outside the recorded process (a process cannot trace itself, and its own
files must never be charged to a test), so the parent only starts `cmtrace run -- python -m
pytest ARGS` with MARKS_ENV set and waits. cmtrace's own stderr (its end-of-recording summary
of the whole process tree) is kept apart and shown only when the recording failed; pytest's
stderr reaches the terminal through a descriptor handed to the child.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from cmtrace.errors import EXIT_TARGET, CmtraceError
from cmtrace.pytest_plugin.boundaries import MARKS_ENV, TRACE_ENV

STDERR_ENV = "CMTRACE_PYTEST_STDERR"  # the parent's stderr as /proc/PID/fd/2
# Runs first in the recorded process (cmtrace closes every fd above 2 it does not own): reopens
# the terminal's stderr through /proc (a tty, pipe or file), else sends stderr to stdout, then
# becomes pytest.
_EXEC_PYTEST = (
    "import os, sys\n"
    "try:\n"
    f"    fd = os.open(os.environ.pop({STDERR_ENV!r}), os.O_WRONLY | os.O_APPEND)\n"
    "except OSError:\n"
    "    fd = os.dup(1)\n"
    "os.dup2(fd, 2)\n"
    "os.close(fd)\n"
    "os.execv(sys.executable, [sys.executable, '-m', 'pytest', *sys.argv[1:]])\n"
)


class NoBackend(Exception):
    """No recorder backend this process may use: pytest's usage error (exit 4), saying why."""


def record_session(config: pytest.Config) -> int:
    """Run the session recorded; print the fd leaks section; pytest's exit status."""
    try:
        backend_args = backend_arguments(config.getoption("cmtrace_backend"))
    except NoBackend as exc:
        sys.stderr.write(f"pytest --cmtrace: {exc}\n")
        return int(pytest.ExitCode.USAGE_ERROR)
    work = Path(tempfile.mkdtemp(prefix="cmtrace-pytest-"))
    try:
        marks = work / "marks"
        marks.mkdir()
        hand_to_recorded_user(work, marks)
        kept = config.getoption("cmtrace_trace")
        trace = Path(kept).resolve() if kept else work / "trace"
        status, recorder_errors = run_recorded(config, backend_args, marks, trace)
        if not (trace / "meta.json").exists():
            sys.stderr.write(recorder_errors)
            sys.stderr.write("pytest --cmtrace: the recording failed (see above)\n")
            return status or int(pytest.ExitCode.INTERNAL_ERROR)
        from cmtrace.pytest_plugin.results import report_session  # noqa: PLC0415 (pandas)

        complete = report_session(config, trace, marks)["complete"]
        if not complete:
            sys.stderr.write(recorder_errors)
            sys.stderr.write(
                "pytest --cmtrace: the recording stopped before the session ended (see above): "
                "the leaks reported are incomplete\n"
            )
            status = status or int(pytest.ExitCode.INTERNAL_ERROR)
        if kept:
            sys.stdout.write(f"cmtrace: trace kept in {trace} (cmtrace report {trace})\n")
        return status
    finally:
        shutil.rmtree(work, ignore_errors=True)


def hand_to_recorded_user(*directories: Path) -> None:
    """Under sudo, `cmtrace run` runs pytest as $SUDO_USER: its side files must be writable."""
    from cmtrace.record.spawn import run_as_user  # noqa: PLC0415

    user = run_as_user()
    for directory in directories if user is not None else ():
        os.chown(directory, user.pw_uid, user.pw_gid)


def backend_arguments(requested: str) -> list[str]:
    """`cmtrace run` flags for the backend, after checking it may be used here."""
    supports_choice = "--backend" in _run_help()
    if not supports_choice and requested == "ptrace":
        raise NoBackend(
            "--cmtrace-backend ptrace: this cmtrace has no ptrace backend yet; "
            "use --cmtrace-backend bpf (as root)"
        )
    from cmtrace.record.choose import choose_backend  # noqa: PLC0415 (reads /proc)

    try:
        choice = choose_backend(requested if supports_choice else "bpf", "run")
    except CmtraceError as exc:
        raise NoBackend(f"no usable recorder backend: {exc}") from None
    return ["--backend", choice.backend] if supports_choice else []


def _run_help() -> str:
    done = subprocess.run(
        [sys.executable, "-m", "cmtrace", "run", "--help"], capture_output=True, text=True
    )
    return done.stdout


def run_recorded(
    config: pytest.Config, backend_args: list[str], marks: Path, trace: Path
) -> tuple[int, str]:
    """(pytest's exit status, cmtrace's stderr) of the session run under `cmtrace run`."""
    args = [str(a) for a in config.invocation_params.args]
    env = {
        **os.environ,
        MARKS_ENV: str(marks),
        TRACE_ENV: str(trace),
        STDERR_ENV: f"/proc/{os.getpid()}/fd/2",
    }
    command = [
        sys.executable, "-m", "cmtrace", "run", "-q", "--top", "0", "-o", str(trace), "--force",
        *backend_args, "--", sys.executable, "-c", _EXEC_PYTEST, *args,
    ]  # fmt: skip
    with tempfile.TemporaryFile("w+") as errors:
        done = subprocess.run(command, cwd=config.invocation_params.dir, env=env, stderr=errors)
        errors.seek(0)
        text = errors.read()
    if done.returncode == EXIT_TARGET and not (trace / "meta.json").exists():
        return int(pytest.ExitCode.USAGE_ERROR), text
    return done.returncode, text
