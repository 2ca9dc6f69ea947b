"""Writing the trace dataset: a directory of Parquet parts plus meta.json (layout: schema.py).

The recording session (cmtrace.record) is the one writer: it creates the directory with
`prepare_output_dir`, then a TraceWriter, which writes meta.json and one empty part of each
table at once, appends events/stacks/calls parts as the session drains them, the sources
(cmtrace.trace.sources) and pre-existing fds, and finally `finish()` sets the status.
cmtrace.trace.reader reads what this writes; nothing here needs pandas.

Writers append parts atomically (written under a dot-name, then renamed: pyarrow and DuckDB skip
dot-files, so a reader never sees half a part), at least once a second, so a SIGKILLed tracer
leaves a readable trace missing at most its last second. meta.json is replaced atomically too.
Everything is created 0600 (directories 0700) and handed to the user who asked for the trace.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from cmtrace import __version__
from cmtrace.errors import TraceError, UsageError
from cmtrace.trace import schema

TABLES = {
    "events": schema.EVENTS,
    "stacks": schema.STACK_FRAMES,
    "sources": schema.SOURCES,
    "calls": schema.CALLS,
    "counters": schema.COUNTERS,
}


class DiskFull(TraceError):
    """Writing a part failed for lack of space: recording stops, what is written stays readable."""


def is_trace_dir(path: Path) -> bool:
    return (path / "meta.json").is_file()


def prepare_output_dir(path: Path, force: bool = False) -> None:
    """Refuse a directory that holds something else; accept a missing or empty one."""
    try:
        _check_output_dir(path, force)
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        probe = path / ".cmtrace-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:  # e.g. a parent this user may not search: stat() itself fails
        raise UsageError(
            f"cannot write to {path} ({exc.strerror}): choose a writable -o DIR"
        ) from exc


def _check_output_dir(path: Path, force: bool) -> None:
    if path.exists() and not path.is_dir():
        raise UsageError(f"{path} exists and is not a directory: choose another -o DIR")
    if path.is_dir() and any(path.iterdir()):
        if not is_trace_dir(path):
            raise UsageError(
                f"{path} is not empty and holds no trace: choose a new or empty -o DIR"
            )
        if not force:
            raise UsageError(f"{path} already holds a trace: pass --force to replace it")
        _remove_trace(path)


def _remove_trace(path: Path) -> None:
    for sub in list(TABLES) + []:
        for part in (path / sub).glob("*.parquet") if (path / sub).is_dir() else []:
            part.unlink()
    for name in ("meta.json", "preexisting.parquet", "snapshot.json"):
        (path / name).unlink(missing_ok=True)


class TraceWriter:
    """Appends parts to a trace directory and keeps its meta.json current."""

    def __init__(self, path: Path, meta: dict, owner: tuple[int, int] | None = None):
        self.path = Path(path)
        self.owner = owner
        self._seq = {name: 0 for name in TABLES}
        self.meta = {
            "schema": schema.SCHEMA_VERSION,
            "cmtrace_version": __version__,
            "status": schema.STATUS_RECORDING,
            "tracer_pid": os.getpid(),
            "boot_id": schema.boot_id(),
            "kernel": platform.release(),
            "start_wall": time.time(),
            "end_wall": None,
            "lost_events": 0,
            "backend": "bpf",
            **meta,
        }
        self._own(self.path)
        for name in TABLES:
            self._mkdir(self.path / name)
        self.write_meta()
        for name, table_schema in TABLES.items():  # readers always find the schema
            self.write_part(name, table_schema.empty_table())

    def _mkdir(self, path: Path) -> None:
        path.mkdir(mode=0o700, exist_ok=True)
        self._own(path)

    def _own(self, path: Path) -> None:
        if self.owner is not None:
            os.chown(path, *self.owner)

    def _atomic_write(self, final: Path, write: Callable[[BinaryIO], object]) -> None:
        tmp = final.with_name("." + final.name + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with open(fd, "wb") as fh:
                write(fh)
                fh.flush()
            self._own(tmp)
            os.replace(tmp, final)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(
                    f"the disk holding {self.path} is full: recording stopped; the trace "
                    "written so far is kept - free space or record to another -o DIR"
                ) from exc
            raise TraceError(f"cannot write {final}: {exc.strerror}") from exc

    def write_part(self, name: str, table: pa.Table) -> None:
        seq = self._seq[name]
        self._seq[name] += 1
        final = self.path / name / f"part-{seq:06d}.parquet"
        self._atomic_write(final, lambda fh: pq.write_table(table, fh, compression="zstd"))

    def write_rows(self, name: str, rows: Iterable[dict]) -> None:
        rows = list(rows)
        if rows:
            self.write_part(name, pa.Table.from_pylist(rows, schema=TABLES[name]))

    def write_preexisting(self, rows: list[dict]) -> None:
        table = pa.Table.from_pylist(rows, schema=schema.PREEXISTING)
        self._atomic_write(self.path / "preexisting.parquet", lambda fh: pq.write_table(table, fh))

    def write_json(self, name: str, data: Any) -> None:
        text = json.dumps(data, indent=1, default=str).encode()
        self._atomic_write(self.path / name, lambda fh: fh.write(text))

    def write_meta(self, **updates: Any) -> None:
        self.meta.update(updates)
        self.write_json("meta.json", self.meta)

    def finish(self, status: str = schema.STATUS_COMPLETE, **updates: Any) -> None:
        self.write_meta(status=status, end_wall=time.time(), **updates)
