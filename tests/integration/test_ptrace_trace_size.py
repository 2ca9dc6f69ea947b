"""--max-size and a full disk under `run --backend ptrace` (issue 11): run mode is fail-stop (the
command's seccomp filter fails its fd syscalls with ENOSYS without a tracer), so when the trace
can no longer grow the engine stops recording and serves the command's stops to its end: the
command runs to completion with every open working (its own output and exit status say so),
the trace is complete and readable up to the stop, and meta.json says why it stopped.

The program is test_trace_size.py's (a moving window of long-lived fds on fresh paths) with an
end of its own: it prints "done" and exits 3, so cmtrace's exit status is the command's."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import read_meta, report_json, run_cmtrace

PYTHON = "/usr/bin/python3"
COMMAND_EXIT = 3
GROWING = """\
import os, sys, time
kept = [open("/etc/hostname") for _ in range(3)]  # LEAK
window, start, opened = [], time.monotonic(), 0
while time.monotonic() - start < float(sys.argv[2]):
    for _ in range(20):
        window.append(open(os.path.join(sys.argv[1], os.urandom(60).hex()), "w"))  # GROW
        opened += 1
    while len(window) > 900:
        f = window.pop(0)
        f.close()
        os.unlink(f.name)
    time.sleep(0.01)
print("done", opened, flush=True)
sys.exit(3)
"""


def record(workdir: Path, trace: Path, seconds: float, *flags: str):
    program = workdir / "grow.py"
    program.write_text(GROWING)
    files = workdir / "files"
    files.mkdir()
    return run_cmtrace(
        "run", "--backend", "ptrace", *flags, "-o", str(trace), "--",
        PYTHON, str(program), str(files), str(seconds), timeout=240,
    )  # fmt: skip


def check_command_ran_to_its_end(done: subprocess.CompletedProcess) -> None:
    """Every open of the command worked to its end (an ENOSYS would have raised)."""
    assert "Function not implemented" not in done.stderr + done.stdout, done.stderr
    ends = [line for line in done.stdout.splitlines() if line.startswith("done ")]
    assert len(ends) == 1 and int(ends[0].split()[1]) > 1000, (done.stdout, done.stderr)


def check_readable_with_leak(trace: Path) -> None:
    report = report_json(trace)
    lines = {leak["site"]["line"] for leak in report["leaks"] if leak["site"]}
    assert 2 in lines, report["leaks"][:3]  # the LEAK line, recorded before the stop
    assert run_cmtrace("report", str(trace)).returncode == 0


def trace_bytes(trace: Path) -> int:
    return sum(f.stat().st_size for f in trace.rglob("*") if f.is_file())


def test_max_size_stops_recording_and_the_command_runs_on(workdir: Path) -> None:
    trace = workdir / "trace"
    done = record(workdir, trace, 25, "--max-size", "1M")
    assert done.returncode == COMMAND_EXIT, done.stderr  # the command's status: it ran to its end
    check_command_ran_to_its_end(done)
    meta = read_meta(trace)
    assert meta["status"] == "complete" and "--max-size" in meta["stop_reason"], meta
    assert meta["backend"] == "ptrace"
    assert 300_000 < trace_bytes(trace) <= 1 << 20
    said = [line for line in done.stderr.splitlines() if "--max-size 1M reached" in line]
    assert len(said) == 1, done.stderr
    check_readable_with_leak(trace)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs (the trace keeps 2 MiB of it in reserve for its end)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4M,mode=0755", "tmpfs", str(mount)],
                   check=True)  # fmt: skip
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_full_disk_stops_recording_and_the_command_runs_on(workdir: Path, small_disk: Path):
    trace = small_disk / "trace"
    done = record(workdir, trace, 45)
    assert done.returncode == 6, done.stderr  # a full disk: cmtrace's own status (README)
    check_command_ran_to_its_end(done)
    meta = read_meta(trace)
    assert meta["status"] == "complete" and meta["stop_reason"] == "disk full", meta
    assert not (trace / ".cmtrace-reserve").exists()
    said = [line for line in done.stderr.splitlines() if "is full: recording stopped" in line]
    assert len(said) == 1, done.stderr
    check_readable_with_leak(trace)
