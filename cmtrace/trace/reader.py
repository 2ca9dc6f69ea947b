"""Reading a trace directory: meta.json and the Parquet tables, each possibly absent or empty.

The analysis layer (cmtrace.analysis.api's `load`) is the reader's one caller in cmtrace; it
reads what cmtrace.trace.writer wrote, in this cmtrace's schema (schema.py) or an older one.
Only pyarrow (and pandas for two small tables): a laptop without BPF reads a trace recorded on a
server. Every way a trace can be unreadable is a TraceError (exit 5) that says what to do.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cmtrace import __version__
from cmtrace.errors import TraceError
from cmtrace.trace import schema

# The event columns the lifetimes model reads (errno and stack_flags are left on disk).
CORE_EVENT_COLUMNS = (
    "t_ns", "pid", "tid", "op", "syscall", "fd", "src_fd", "kind", "path", "flags", "cloexec",
    "arg", "stack_id", "finalizing",
)  # fmt: skip


# Text columns of stacks/ read dictionary-encoded: millions of frame rows repeat a few thousand
# function names and files.
STACK_TEXT_COLUMNS = ("function", "qualname", "file")


@dataclass
class RawTrace:
    path: Path
    meta: dict[str, Any]
    stacks: pa.Table | None  # STACK_FRAMES, STACK_TEXT_COLUMNS dictionary-encoded; None: on disk
    sources: pd.DataFrame
    preexisting: pd.DataFrame
    snapshot: dict[str, Any] | None  # end-of-trace thread stacks, when the recorder wrote them
    generators: dict[str, Any] | None = None  # issue 13's liveness check (generators.json)


def read_trace(path: str | Path, stacks: bool = True) -> RawTrace:
    """The trace's small tables and meta; `stacks=False` leaves stacks/ on disk (None), for a
    reader that reads its columns one at a time (read_stacks)."""
    path = Path(path)
    meta = read_meta(path)
    check_parts(path / "events")  # a corrupt part fails now, with the trace's other errors
    return RawTrace(
        path=path,
        meta=meta,
        stacks=read_stacks(path) if stacks else None,
        sources=read_table(path / "sources", schema.SOURCES).to_pandas(),
        preexisting=read_table(path / "preexisting.parquet", schema.PREEXISTING).to_pandas(),
        snapshot=_read_json(path / "snapshot.json"),
        generators=_read_json(path / "generators.json"),
    )


def read_meta(path: Path) -> dict[str, Any]:
    """meta.json, with status "interrupted" when a recording's tracer is gone."""
    if not path.exists():
        raise TraceError(f"{path} does not exist: give the directory a recording wrote")
    if not path.is_dir():
        raise TraceError(f"{path} is not a directory: give the trace directory `cmtrace -o` wrote")
    try:
        meta = json.loads((path / "meta.json").read_text())
    except FileNotFoundError:
        raise TraceError(
            f"{path} is not a cmtrace trace (no meta.json): give the directory a recording wrote"
        ) from None
    except (OSError, ValueError) as exc:
        raise TraceError(
            f"{path}/meta.json is unreadable ({exc}): the trace is corrupt, record it again"
        ) from exc
    if not isinstance(meta, dict):
        raise TraceError(f"{path}/meta.json is not a JSON object: the trace is corrupt")
    check_schema_version(path, meta)
    if meta.get("status") == schema.STATUS_RECORDING and not tracer_alive(meta):
        meta["status"] = schema.STATUS_INTERRUPTED
    return meta


def check_schema_version(path: Path, meta: dict[str, Any]) -> None:
    """Refuse a trace whose schema major is newer than this cmtrace's: its columns may mean
    something this reader does not know. Older ones are read (parts are conformed); a meta.json
    without the key predates it and is version 1."""
    version = meta.get("schema", 1)
    major = _schema_major(version)
    if major is None:
        raise TraceError(
            f"{path}/meta.json: schema {version!r} is not a version number: the trace is corrupt"
        )
    if major > schema.SCHEMA_VERSION:
        writer = meta.get("cmtrace_version") or "a newer cmtrace"
        raise TraceError(
            f"{path} has trace schema {version} (written by cmtrace {writer}); this cmtrace "
            f"{__version__} reads schema {schema.SCHEMA_VERSION} and older: upgrade cmtrace "
            "to read it"
        )


def _schema_major(version: object) -> int | None:
    """1 -> 1, "2.1" -> 2; None when it is no version at all."""
    if isinstance(version, bool):
        return None
    if isinstance(version, int):
        return version
    if isinstance(version, str) and version.split(".")[0].isdigit():
        return int(version.split(".")[0])
    return None


def tracer_alive(meta: dict[str, Any]) -> bool:
    """Is the tracer that wrote this meta.json still running (same boot, pid alive)?"""
    if meta.get("boot_id") and meta.get("boot_id") != schema.boot_id():
        return False  # recorded on another boot or another machine: nobody is writing it
    pid = meta.get("tracer_pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        return b"cmtrace" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@contextmanager
def _parquet_part(file: Path) -> Iterator[None]:
    """Reading `file`: whatever pyarrow or the OS raise becomes the one TraceError for a part
    that is not readable Parquet."""
    try:
        yield
    except (OSError, pa.ArrowException) as exc:
        raise TraceError(
            f"{file} is not readable Parquet ({exc}): the trace is corrupt; delete that part "
            "to analyse the rest"
        ) from exc


def check_parts(path: Path) -> None:
    """Read every part's footer (cheap): a truncated or foreign file is reported at load."""
    for file in _part_files(path):
        with _parquet_part(file):
            pq.read_metadata(file)


def event_parts(path: Path) -> tuple[int, list[Path]]:
    """(total rows, part files) of a trace's events, from the Parquet footers only."""
    files = _part_files(path / "events")
    total = 0
    for file in files:
        with _parquet_part(file):
            total += pq.read_metadata(file).num_rows
    return total, files


def read_event_part(file: Path, columns: Sequence[str]) -> pa.Table:
    """One events part, only `columns` (those it has), strings as read (dictionary-encoded)."""
    with _parquet_part(file):
        present = set(pq.read_schema(file).names)
        names = [c for c in columns if c in present]
        textual = [
            c for c in names
            if pa.types.is_string(schema.EVENTS.field(c).type)
            or pa.types.is_dictionary(schema.EVENTS.field(c).type)
        ]  # fmt: skip
        return pq.read_table(file, columns=names, read_dictionary=textual)


def _part_files(path: Path) -> list[Path]:
    """The finished parts of a table directory, in order (dot-files are parts being written)."""
    if not path.is_dir():
        return []
    return sorted(p for p in path.glob("*.parquet") if not p.name.startswith("."))


def _subset(table_schema: pa.Schema, names: Sequence[str]) -> pa.Schema:
    return pa.schema([table_schema.field(name) for name in names])


def read_events(path: Path, columns: Sequence[str] | None = CORE_EVENT_COLUMNS) -> pa.Table:
    """The events table (all parts), only `columns` (None: all of them)."""
    names = columns or schema.EVENTS.names
    return read_table(path / "events", _subset(schema.EVENTS, names))


def read_stacks(path: Path, columns: Sequence[str] | None = None) -> pa.Table:
    """stacks/ (STACK_FRAMES, only `columns` when given), its STACK_TEXT_COLUMNS as
    dictionary<int32, string>, one dictionary per column over all parts.
    `.cast(schema.STACK_FRAMES)` gives plain strings."""
    encoded = pa.schema(
        [
            pa.field(f.name, pa.dictionary(pa.int32(), pa.string()))
            if f.name in STACK_TEXT_COLUMNS
            else f
            for f in schema.STACK_FRAMES
            if columns is None or f.name in columns
        ]
    )
    return read_table(path / "stacks", encoded, dictionary=STACK_TEXT_COLUMNS)


def read_table(path: Path, table_schema: pa.Schema, dictionary: Sequence[str] = ()) -> pa.Table:
    """All parts of a table (a directory of parts or one file); the empty table when absent.
    Columns named in `dictionary` are read dictionary-encoded (table_schema says so too)."""
    if path.is_dir():
        files = _part_files(path)
    elif path.is_file():
        files = [path]
    else:
        files = []
    tables = [_read_part(f, table_schema, dictionary) for f in files]
    tables = [t for t in tables if t.num_rows] or [table_schema.empty_table()]
    table = pa.concat_tables(tables)
    return table.unify_dictionaries()


def _read_part(file: Path, table_schema: pa.Schema, dictionary: Sequence[str] = ()) -> pa.Table:
    with _parquet_part(file):
        present = pq.read_schema(file).names
        names = [n for n in table_schema.names if n in present]
        encoded = [n for n in names if n in dictionary] or None
        table = pq.read_table(file, columns=names, read_dictionary=encoded)
    return _conform(table, table_schema, file)


def _conform(table: pa.Table, table_schema: pa.Schema, file: Path) -> pa.Table:
    """Give a part exactly the contract's columns: missing ones become nulls, extra ones go."""
    columns = []
    for field in table_schema:
        if field.name in table.column_names:
            column = table.column(field.name)
            if column.type != field.type:
                try:
                    column = column.cast(field.type)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                    raise TraceError(
                        f"{file}: column {field.name} has type {column.type}, expected "
                        f"{field.type}: the trace was written by an incompatible cmtrace"
                    ) from exc
            columns.append(column)
        else:
            columns.append(pa.nulls(table.num_rows, field.type))
    return pa.Table.from_arrays(columns, schema=table_schema)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else None
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None  # a snapshot is optional evidence: a broken one only removes that evidence
