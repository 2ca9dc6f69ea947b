"""A program whose trace grows until --max-size or a full disk stops the recording, shared by
test_trace_size.py (bpf) and test_ptrace_trace_size.py (ptrace).

It leaks three fds at once (the LEAK line, 2), then opens ~4,000 files a second on fresh random
names (they do not compress), each closed 0.45 s later (older than --min-age 0.1, so
--aggregate records them too). It watches the trace's meta.json: once the recording has stopped
it goes on opening files for AFTER_STOP seconds (the opens must keep working: under ptrace an
ENOSYS would raise), then prints "done N" and exits COMMAND_EXIT. So a test lasts as long as
the trace takes to fill, and cmtrace's exit status is the command's where the command decides."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import read_meta, report_json, run_cmtrace

PYTHON = "/usr/bin/python3"
COMMAND_EXIT = 3
AFTER_STOP = 1.5  # seconds of opens after the recording stopped
LONGEST = 90  # seconds: the program gives up if the recording never stops

GROWING = f"""\
import json, os, sys, time
kept = [open("/etc/hostname") for _ in range(3)]  # LEAK
files, meta = sys.argv[1], os.path.join(sys.argv[2], "meta.json")
def recording():
    try:
        with open(meta) as f:
            return json.load(f).get("status") == "recording"
    except (OSError, ValueError):
        return True  # not written yet, or being rewritten
window, start, opened, stopped, checked = [], time.monotonic(), 0, None, 0.0
while time.monotonic() - start < {LONGEST}:
    for _ in range(40):
        window.append(open(os.path.join(files, os.urandom(60).hex()), "w"))  # GROW
        opened += 1
    while len(window) > 1800:
        f = window.pop(0)
        f.close()
        os.unlink(f.name)
    now = time.monotonic()
    if stopped is None and now - checked > 0.25:
        checked = now
        stopped = None if recording() else now
    if stopped is not None and now - stopped > {AFTER_STOP}:
        break
    time.sleep(0.01)
print("done", opened, flush=True)
sys.exit({COMMAND_EXIT})
"""


def record(workdir: Path, trace: Path, backend: str, *flags: str) -> subprocess.CompletedProcess:
    program = workdir / "grow.py"
    program.write_text(GROWING)
    files = workdir / "files"
    files.mkdir()
    return run_cmtrace(
        "run", "--backend", backend, *flags, "-o", str(trace), "--",
        PYTHON, str(program), str(files), str(trace), timeout=LONGEST + 60,
    )  # fmt: skip


def check_command_ran_on(done: subprocess.CompletedProcess) -> None:
    """The command went on opening files after the stop, and every open worked (an ENOSYS would
    have raised), to its own end."""
    assert "Function not implemented" not in done.stderr + done.stdout, done.stderr
    ends = [line for line in done.stdout.splitlines() if line.startswith("done ")]
    assert len(ends) == 1 and int(ends[0].split()[1]) > 1000, (done.stdout, done.stderr)


def check_readable_with_leak(trace: Path) -> None:
    report = report_json(trace)
    lines = {leak["site"]["line"] for leak in report["leaks"] if leak["site"]}
    assert 2 in lines, report["leaks"][:3]  # the LEAK line, recorded before the stop
    assert run_cmtrace("report", str(trace)).returncode == 0


def check_stopped_by_max_size(done: subprocess.CompletedProcess, trace: Path, backend: str) -> None:
    """--max-size 1M: the command's own status, one line saying so, meta.json's reason and
    bound, a trace recorded until near the bound and within it, readable."""
    assert done.returncode == COMMAND_EXIT, done.stderr  # the command's status: it ran to its end
    check_command_ran_on(done)
    meta = read_meta(trace)
    assert meta["status"] == "complete" and "--max-size" in meta["stop_reason"], meta
    assert meta["backend"] == backend and meta["max_size"] == 1 << 20, meta
    assert 300_000 < trace_bytes(trace) <= 1 << 20  # near the bound, not stopped at once
    said = [
        line
        for line in done.stderr.splitlines()
        if "--max-size 1M reached: recording stopped" in line
    ]
    assert len(said) == 1, done.stderr
    check_readable_with_leak(trace)


def check_stopped_by_a_full_disk(done: subprocess.CompletedProcess, trace: Path) -> None:
    """Exit 6, one line saying so, meta.json's reason, the reserve gone, the trace readable."""
    assert done.returncode == 6, done.stderr  # a full disk: cmtrace's own status (README)
    check_command_ran_on(done)
    meta = read_meta(trace)
    assert meta["status"] == "complete" and meta["stop_reason"] == "disk full", meta
    assert not (trace / ".cmtrace-reserve").exists()
    said = [line for line in done.stderr.splitlines() if "is full: recording stopped" in line]
    assert len(said) == 1, done.stderr
    check_readable_with_leak(trace)


def trace_bytes(trace: Path) -> int:
    return sum(f.stat().st_size for f in trace.rglob("*") if f.is_file())


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
