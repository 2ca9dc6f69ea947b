"""--max-size and a full disk: recording stops cleanly, the trace is complete and readable, the
leaks made so far are in it, and cmtrace says why it stopped (one line, meta.json, exit code).

Both hold for full history and --aggregate (parametrised): the program keeps a moving window of
long-lived fds on fresh paths, so even an aggregated trace grows (--min-age 0.1 ships them)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import read_meta, report_json, run_cmtrace

pytestmark = pytest.mark.usefixtures("bpf_ready")
PYTHON = "/usr/bin/python3"
MODES = {"full": (), "aggregate": ("--aggregate", "--min-age", "0.1")}

# Leaks three fds at once, then opens ~2,000 files a second on fresh random names (they do not
# compress), each closed 0.45 s later (older than --min-age 0.1: --aggregate records them too).
GROWING = """\
import os, sys, time
kept = [open("/etc/hostname") for _ in range(3)]  # LEAK
window, start = [], time.monotonic()
while time.monotonic() - start < float(sys.argv[2]):
    for _ in range(20):
        window.append(open(os.path.join(sys.argv[1], os.urandom(60).hex()), "w"))  # GROW
    while len(window) > 900:
        f = window.pop(0)
        f.close()
        os.unlink(f.name)
    time.sleep(0.01)
"""


@pytest.fixture(params=list(MODES))
def mode(request: pytest.FixtureRequest) -> tuple[str, ...]:
    return MODES[request.param]


def record(workdir: Path, trace: Path, seconds: float, flags: tuple[str, ...]):
    program = workdir / "grow.py"
    program.write_text(GROWING)
    files = workdir / "files"
    files.mkdir()
    return run_cmtrace(
        "run", "--backend", "bpf", *flags, "-o", str(trace), "--",
        PYTHON, str(program), str(files), str(seconds), timeout=180,
    )  # fmt: skip


def check_readable_with_leak(trace: Path) -> None:
    report = report_json(trace)
    lines = {leak["site"]["line"] for leak in report["leaks"] if leak["site"]}
    assert 2 in lines, report["leaks"][:3]  # the LEAK line, recorded before the stop
    assert run_cmtrace("report", str(trace)).returncode == 0


def trace_bytes(trace: Path) -> int:
    return sum(f.stat().st_size for f in trace.rglob("*") if f.is_file())


def test_max_size_stops_recording_with_a_complete_trace(workdir: Path, mode) -> None:
    trace = workdir / "trace"
    done = record(workdir, trace, 40, ("--max-size", "1M", *mode))
    assert done.returncode == 0, done.stderr  # the command's status: it ran to its end
    meta = read_meta(trace)
    assert meta["status"] == "complete" and "--max-size" in meta["stop_reason"]
    assert meta["max_size"] == 1 << 20
    assert trace_bytes(trace) <= 1 << 20
    assert trace_bytes(trace) > 300_000  # it recorded until near the bound, not stopped at once
    said = [
        line
        for line in done.stderr.splitlines()
        if "--max-size 1M reached: recording stopped" in line
    ]
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


def test_full_disk_stops_recording_and_keeps_the_trace(workdir: Path, small_disk: Path, mode):
    trace = small_disk / "trace"
    done = record(workdir, trace, 40, mode)
    assert done.returncode == 6, done.stderr
    meta = read_meta(trace)
    assert meta["status"] == "complete" and meta["stop_reason"] == "disk full", meta
    assert not (trace / ".cmtrace-reserve").exists()
    said = [line for line in done.stderr.splitlines() if "is full: recording stopped" in line]
    assert len(said) == 1, done.stderr
    check_readable_with_leak(trace)
