"""--max-size and a full disk under `run --backend ptrace` (issue 11): run mode is fail-stop (the
command's seccomp filter fails its fd syscalls with ENOSYS without a tracer), so when the trace
can no longer grow the engine stops recording and serves the command's stops to its end: the
command runs to completion with every open working (its own output and exit status say so),
the trace is complete and readable up to the stop, and meta.json says why it stopped.

The program is growing.py's (test_trace_size.py runs it on bpf): it goes on opening files after
the stop, then prints "done N" and exits 3, so cmtrace's exit status is the command's."""

from __future__ import annotations

from pathlib import Path

from growing import check_stopped_by_a_full_disk, check_stopped_by_max_size, record, small_disk

__all__ = ["small_disk"]  # a fixture: imported for pytest to find


def test_max_size_stops_recording_and_the_command_runs_on(workdir: Path) -> None:
    trace = workdir / "trace"
    check_stopped_by_max_size(record(workdir, trace, "ptrace", "--max-size", "1M"), trace, "ptrace")


def test_full_disk_stops_recording_and_the_command_runs_on(workdir: Path, small_disk: Path):
    trace = small_disk / "trace"
    check_stopped_by_a_full_disk(record(workdir, trace, "ptrace"), trace)
