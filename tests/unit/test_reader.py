"""Reading a trace that is broken, unfinished or from elsewhere: the right TraceError or status.

Every failure must be one TraceError naming the file and what to do (the CLI prints it as one
line), never a pyarrow or JSON traceback.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from tracebuild import ALL_CAUSES, birth, marked_causes, write_trace

from cmtrace.analysis import load
from cmtrace.errors import TraceError
from cmtrace.trace import schema

DATA = Path(__file__).resolve().parents[1] / "data"
BOOT_ID = Path("/proc/sys/kernel/random/boot_id").read_text().strip()


@pytest.fixture
def trace(tmp_path: Path) -> Path:
    """A good trace to break: a copy of a saved recording."""
    copy = tmp_path / "trace"
    shutil.copytree(DATA / "leak_before", copy)
    return copy


def _meta(trace: Path) -> dict:
    return json.loads((trace / "meta.json").read_text())


def _set_meta(trace: Path, **changes) -> None:
    (trace / "meta.json").write_text(json.dumps({**_meta(trace), **changes}))


def _load_everything(path: Path) -> None:
    """What `cmtrace report` reads: the lifetimes and their causes."""
    trace = load(path)
    trace.leaks()


def test_saved_trace_loads(trace: Path) -> None:
    assert load(trace).status == schema.STATUS_COMPLETE


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="does not exist"):
        load(tmp_path / "nope")


def test_a_file_is_not_a_trace(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(TraceError, match="not a directory"):
        load(tmp_path / "f")


def test_missing_meta(trace: Path) -> None:
    (trace / "meta.json").unlink()
    with pytest.raises(TraceError, match="no meta.json"):
        load(trace)


@pytest.mark.parametrize("text", ["{not json", "", "\x00\x01"])
def test_unreadable_meta(trace: Path, text: str) -> None:
    (trace / "meta.json").write_text(text)
    with pytest.raises(TraceError, match="meta.json is unreadable"):
        load(trace)


def test_meta_that_is_not_an_object(trace: Path) -> None:
    (trace / "meta.json").write_text("[1, 2]")
    with pytest.raises(TraceError, match="not a JSON object"):
        load(trace)


@pytest.mark.parametrize("table", ["events", "stacks", "sources"])
@pytest.mark.parametrize("damage", ["truncated", "foreign"])
def test_corrupt_part(trace: Path, table: str, damage: str) -> None:
    part = max((trace / table).glob("part-*.parquet"), key=lambda p: p.stat().st_size)
    data = part.read_bytes()
    part.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not parquet at all")
    with pytest.raises(TraceError, match=f"{part.name} is not readable Parquet"):
        _load_everything(trace)


def test_corrupt_preexisting(trace: Path) -> None:
    (trace / "preexisting.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(TraceError, match="preexisting.parquet is not readable Parquet"):
        _load_everything(trace)


def test_half_written_part_is_invisible(trace: Path) -> None:
    """A tracer killed while writing leaves a dot-file: readers skip it."""
    (trace / "events" / ".part-000099.parquet.tmp").write_bytes(b"half a part")
    _load_everything(trace)


def test_column_of_an_incompatible_type(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = write_trace(tmp_path / "t", [birth(10, 3)])
    bad = pa.table({"stack_id": pa.array(["one"]), "depth": pa.array([0], pa.int16())})
    pq.write_table(bad, path / "stacks" / "part-000009.parquet")
    with pytest.raises(TraceError, match="column stack_id has type string"):
        _load_everything(path)


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


@pytest.mark.parametrize(
    "how",
    ["tracer pid gone", "recorded on another boot", "no tracer pid"],
)
def test_recording_whose_tracer_is_gone_reads_as_interrupted(trace: Path, how: str) -> None:
    changes = {
        "tracer pid gone": {"tracer_pid": _dead_pid(), "boot_id": BOOT_ID},
        "recorded on another boot": {"tracer_pid": 1, "boot_id": "another-boot"},
        "no tracer pid": {"tracer_pid": None, "boot_id": BOOT_ID},
    }[how]
    _set_meta(trace, status=schema.STATUS_RECORDING, **changes)
    loaded = load(trace)
    assert loaded.status == schema.STATUS_INTERRUPTED and loaded.interrupted


def test_saved_interrupted_trace() -> None:
    """tests/data/interrupted: `cmtrace -p` SIGKILLed while all_causes.py waited (record.py).
    Its meta.json still says recording, and its sources were never written. Every fd the
    program opened at a marked line and never closed is still open at the end; the two its
    asyncio.run closed at loop shutdown are closed (telling that shutdown needs the sources)."""
    assert _meta(DATA / "interrupted")["status"] == schema.STATUS_RECORDING
    trace = load(DATA / "interrupted", local_sources=False)
    assert trace.interrupted
    recorded_as = trace.fds["site_file"].astype(str)  # the path of the checkout that recorded it
    fds = trace.fds[recorded_as.str.endswith("/tests/programs/leaks/all_causes.py")]
    loop_closed = {
        n for n, line in enumerate(ALL_CAUSES.read_text().splitlines(), 1) if "CLOSED:" in line
    }
    for line in marked_causes(ALL_CAUSES):
        at_line = fds[fds["site_line"] == line]
        assert len(at_line) == 2, (line, fds)
        open_at_end = at_line["died_ns"].isna().all()
        assert open_at_end == (line not in loop_closed), (line, at_line)
        if open_at_end:
            assert at_line["leak"].all(), at_line


def test_current_schema_version_loads(trace: Path) -> None:
    assert _meta(trace)["schema"] == schema.SCHEMA_VERSION
    assert load(trace).meta["schema"] == schema.SCHEMA_VERSION


def test_newer_schema_version_is_refused(trace: Path) -> None:
    _set_meta(trace, schema=schema.SCHEMA_VERSION + 1)
    with pytest.raises(TraceError, match="schema"):
        load(trace)
