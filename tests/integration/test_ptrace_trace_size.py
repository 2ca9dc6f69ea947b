"""--max-size and a full disk under `run --backend ptrace` (issue 11): run mode is fail-stop (the
command's seccomp filter fails its fd syscalls with ENOSYS without a tracer), so when the trace
can no longer grow the engine stops recording and serves the command's stops to its end: the
command runs to completion with every open working (its own output and exit status say so),
the trace is complete and readable up to the stop, and meta.json says why it stopped.

The program is growing.py's (test_trace_size.py runs it on bpf): it goes on opening files after
the stop, then prints "done N" and exits 3, so cmtrace's exit status is the command's."""

from __future__ import annotations

from pathlib import Path

from conftest import read_meta
from growing import (
    COMMAND_EXIT,
    check_command_ran_on,
    check_readable_with_leak,
    check_stopped_by_a_full_disk,
    record,
    small_disk,
    trace_bytes,
)

__all__ = ["small_disk"]  # a fixture: imported for pytest to find


def test_max_size_stops_recording_and_the_command_runs_on(workdir: Path) -> None:
    trace = workdir / "trace"
    done = record(workdir, trace, "ptrace", "--max-size", "1M")
    assert done.returncode == COMMAND_EXIT, done.stderr  # the command's status: it ran to its end
    check_command_ran_on(done)
    meta = read_meta(trace)
    assert meta["status"] == "complete" and "--max-size" in meta["stop_reason"], meta
    assert meta["backend"] == "ptrace"
    assert 300_000 < trace_bytes(trace) <= 1 << 20
    said = [line for line in done.stderr.splitlines() if "--max-size 1M reached" in line]
    assert len(said) == 1, done.stderr
    check_readable_with_leak(trace)


def test_full_disk_stops_recording_and_the_command_runs_on(workdir: Path, small_disk: Path):
    trace = small_disk / "trace"
    check_stopped_by_a_full_disk(record(workdir, trace, "ptrace"), trace)
