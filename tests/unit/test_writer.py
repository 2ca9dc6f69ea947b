"""The trace writer round trip: what TraceWriter writes, the reader (and plain pyarrow) reads back.

The dataset is a contract (DESIGN "Trace dataset"): pandas, DuckDB and Spark read it as it is,
so the columns must come back exactly as written, with the schema's types, from every part.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tracebuild import PID, birth, close, events_table, fork

from cmtrace import __version__
from cmtrace.analysis import load
from cmtrace.errors import UsageError
from cmtrace.trace import schema
from cmtrace.trace.reader import read_events, read_table
from cmtrace.trace.writer import TraceWriter, prepare_output_dir

STACK_ROWS = [
    {"stack_id": 7, "pid": PID, "depth": 0, "function": "open_log", "qualname": "open_log",
     "file": "/srv/app/log.py", "line": 11, "firstlineno": 10, "code_flags": 3, "lasti": 8},
    {"stack_id": 7, "pid": PID, "depth": 1, "function": "<module>", "qualname": "<module>",
     "file": "/srv/app/log.py", "line": 20, "firstlineno": 1, "code_flags": 0, "lasti": 2},
]  # fmt: skip
SOURCE_ROWS = [
    {"file": "/srv/app/log.py", "line": 0, "text": None, "function": None, "facts": "{}"},
    {"file": "/srv/app/log.py", "line": 11, "text": "    fd = os.open(p, 0)",
     "function": "open_log", "facts": None},
]  # fmt: skip
PRE_ROWS = [{"pid": PID, "fd": 0, "kind": "pipe", "path": "pipe:[9]", "cloexec": False, "t_ns": 1}]


@pytest.fixture
def written(tmp_path: Path) -> tuple[Path, dict]:
    """A trace written in several parts, as a recording that lasted a few seconds would be."""
    path = tmp_path / "trace"
    prepare_output_dir(path)
    writer = TraceWriter(path, {"mode": "attach", "targets": [{"pid": PID}]})
    parts = [
        events_table([birth(10, 3, stack_id=7), birth(11, 4, "socket", "socket")]),
        events_table([close(20, 3), fork(21, PID + 1)]),
    ]
    for part in parts:
        writer.write_part("events", part)
    writer.write_rows("stacks", STACK_ROWS)
    writer.write_rows("sources", SOURCE_ROWS)
    writer.write_rows("calls", [])  # nothing to write: no part
    writer.write_preexisting(PRE_ROWS)
    writer.write_json("snapshot.json", {"threads": []})
    writer.finish(events=4)
    return path, {"events": pa.concat_tables(parts)}


def test_events_come_back_as_written(written) -> None:
    path, wrote = written
    back = read_events(path, columns=None)
    assert back.schema == schema.EVENTS
    assert back.to_pylist() == wrote["events"].to_pylist()


def test_every_part_has_the_contract_schema(written) -> None:
    """Plain pyarrow, as an outside reader would: one schema per table across all parts,
    including the empty part each table starts with."""
    path, _ = written
    for name, table_schema in {"events": schema.EVENTS, "stacks": schema.STACK_FRAMES,
                               "sources": schema.SOURCES, "calls": schema.CALLS}.items():  # fmt: skip
        parts = sorted((path / name).glob("part-*.parquet"))
        assert parts, name
        for part in parts:
            assert pq.read_schema(part).remove_metadata() == table_schema, part


@pytest.mark.parametrize(
    "name,rows,table_schema",
    [
        ("stacks", STACK_ROWS, schema.STACK_FRAMES),
        ("sources", SOURCE_ROWS, schema.SOURCES),
        ("preexisting.parquet", PRE_ROWS, schema.PREEXISTING),
    ],
)
def test_tables_come_back_as_written(written, name, rows, table_schema) -> None:
    path, _ = written
    assert read_table(path / name, table_schema).to_pylist() == rows


def test_meta(written) -> None:
    path, _ = written
    meta = json.loads((path / "meta.json").read_text())
    assert meta["schema"] == schema.SCHEMA_VERSION
    assert meta["cmtrace_version"] == __version__
    assert meta["status"] == schema.STATUS_COMPLETE
    assert meta["mode"] == "attach" and meta["events"] == 4
    assert meta["backend"] == "bpf"
    assert meta["end_wall"] >= meta["start_wall"]


def test_no_temporary_files_and_private_modes(written) -> None:
    path, _ = written
    everything = list(path.rglob("*"))
    assert not [p for p in everything if p.name.startswith(".")]
    for p in everything:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o700 if p.is_dir() else 0o600), (p, oct(mode))


def test_the_analysis_reads_it(written) -> None:
    path, _ = written
    trace = load(path)
    assert trace.snapshot == {"threads": []}
    fds = trace.fds.set_index(["pid", "fd"])
    assert fds.loc[(PID, 3), "death"] == "close"
    assert fds.loc[(PID, 3), "site_function"] == "open_log"
    assert bool(fds.loc[(PID, 0), "preexisting"])


def test_a_trace_just_started_is_readable(tmp_path: Path) -> None:
    """Before the first drain: only the empty parts and meta.json, status recording."""
    path = tmp_path / "t"
    prepare_output_dir(path)
    TraceWriter(path, {"mode": "run"})
    assert read_events(path, columns=None).num_rows == 0
    assert json.loads((path / "meta.json").read_text())["status"] == schema.STATUS_RECORDING


def test_output_dir_rules(tmp_path: Path) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="holds no trace"):
        prepare_output_dir(busy)
    trace = tmp_path / "trace"
    prepare_output_dir(trace)
    TraceWriter(trace, {}).finish()
    with pytest.raises(UsageError, match="--force"):
        prepare_output_dir(trace)
    prepare_output_dir(trace, force=True)
    assert not (trace / "meta.json").exists() and (busy / "notes.txt").exists()


def test_written_bytes_is_what_the_trace_takes_and_the_reserve_goes_at_the_end(
    tmp_path: Path,
) -> None:
    from cmtrace.trace.writer import RESERVE_NAME

    path = tmp_path / "trace"
    prepare_output_dir(path)
    writer = TraceWriter(path, {"mode": "run"}, max_bytes=1 << 20, reserve=64 << 10)
    assert (path / RESERVE_NAME).stat().st_size == 64 << 10
    for n in range(3):
        writer.start_flush()
        writer.write_part("events", events_table([birth(10 + n, 3), close(20 + n, 3)]))
        writer.write_meta(lost_events=n)
        writer.end_flush()
    on_disk = sum(
        f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name != RESERVE_NAME
    )
    assert writer.written_bytes == on_disk
    assert not writer.near_limit()  # a few KB of a MiB
    writer.max_bytes = on_disk + 1
    assert writer.near_limit()
    writer.finish()
    assert not (path / RESERVE_NAME).exists()
    assert len(load(path).fds) == 3
