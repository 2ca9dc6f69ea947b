"""--max-size and a full disk: recording stops cleanly, the trace is complete and readable, the
leaks made so far are in it, and cmtrace says why it stopped (one line, meta.json, exit code).

Both hold for full history and --aggregate (parametrised): the program (growing.py) keeps a
moving window of long-lived fds on fresh paths, so even an aggregated trace grows (--min-age 0.1
ships them), and it runs on for a while after the recording stopped."""

from __future__ import annotations

from pathlib import Path

import pytest
from growing import check_stopped_by_a_full_disk, check_stopped_by_max_size, record, small_disk

pytestmark = pytest.mark.usefixtures("bpf_ready")
MODES = {"full": (), "aggregate": ("--aggregate", "--min-age", "0.1")}
__all__ = ["small_disk"]  # a fixture: imported for pytest to find


@pytest.fixture(params=list(MODES))
def mode(request: pytest.FixtureRequest) -> tuple[str, ...]:
    return MODES[request.param]


def test_max_size_stops_recording_with_a_complete_trace(workdir: Path, mode) -> None:
    trace = workdir / "trace"
    done = record(workdir, trace, "bpf", "--max-size", "1M", *mode)
    check_stopped_by_max_size(done, trace, "bpf")


def test_full_disk_stops_recording_and_keeps_the_trace(workdir: Path, small_disk: Path, mode):
    trace = small_disk / "trace"
    check_stopped_by_a_full_disk(record(workdir, trace, "bpf", *mode), trace)
