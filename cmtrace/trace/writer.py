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
from cmtrace.errors import EXIT_DISK_FULL, TraceError, UsageError
from cmtrace.trace import schema

TABLES = {
    "events": schema.EVENTS,
    "stacks": schema.STACK_FRAMES,
    "sources": schema.SOURCES,
    "calls": schema.CALLS,
    "counters": schema.COUNTERS,
}


RESERVE_NAME = ".cmtrace-reserve"  # a dot-file: readers skip it
RESERVE_BYTES = 2 << 20  # room kept for the end of a trace cut short by a full disk


class DiskFull(TraceError):
    """Writing a part failed for lack of space: recording stops, what is written stays readable."""

    exit_code = EXIT_DISK_FULL


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
    for name in ("meta.json", "preexisting.parquet", "snapshot.json", "generators.json",
                 RESERVE_NAME):  # fmt: skip
        (path / name).unlink(missing_ok=True)


class TraceWriter:
    """Appends parts to a trace directory and keeps its meta.json current.

    Sizes: `written_bytes` is what the trace holds on disk (every part, meta.json and the rest,
    as last written). A recording bounded by --max-size stops once `near_limit()`; one cut
    short by a full disk (DiskFull) calls `release_reserve()`, which frees the `reserve` bytes
    set aside at the start (a file of zeros), rewrites the part that failed, and leaves room
    for the end of the trace (the last flush, stacks, sources, meta.json)."""

    def __init__(
        self,
        path: Path,
        meta: dict,
        owner: tuple[int, int] | None = None,
        max_bytes: int | None = None,
        reserve: int = 0,
    ):
        self.path = Path(path)
        self.owner = owner
        self.max_bytes = max_bytes
        self._parts_bytes = 0  # every part written (parts are never rewritten)
        self._files: dict[str, int] = {}  # meta.json and the other files replaced as they change
        self._largest_flush = 0  # bytes written by the largest flush (see near_limit)
        self._flush_start = 0
        self._failed: tuple[Path, Callable[[BinaryIO], object]] | None = None
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
        self._reserve = self._make_reserve(reserve) if reserve else None
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
            self._count(final)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                self._failed = (final, write)
                raise DiskFull(
                    f"the disk holding {self.path} is full: recording stopped; the trace "
                    "written so far is kept - free space or record to another -o DIR"
                ) from exc
            raise TraceError(f"cannot write {final}: {exc.strerror}") from exc

    # -- sizes: --max-size, a full disk
    def _count(self, final: Path) -> None:
        """Add a written file to written_bytes (memory: one number for the parts, however
        many a recording of hours writes)."""
        size = final.stat().st_size
        if final.parent == self.path:
            self._files[final.name] = size
        else:
            self._parts_bytes += size

    @property
    def written_bytes(self) -> int:
        return self._parts_bytes + sum(self._files.values())

    def start_flush(self) -> None:
        self._flush_start = self.written_bytes

    def end_flush(self) -> None:
        self._largest_flush = max(self._largest_flush, self.written_bytes - self._flush_start)

    def near_limit(self, end_bytes: int = 0) -> bool:
        """True once two more flushes as large as the largest so far could cross max_bytes
        (one for the flush in progress when recording stops, one for the end of the trace),
        with `end_bytes` more for the parts only the end writes (sources)."""
        if self.max_bytes is None:
            return False
        return self.written_bytes + 2 * self._largest_flush + end_bytes >= self.max_bytes

    def _make_reserve(self, size: int) -> Path | None:
        """`size` bytes set aside for the end of the trace (None: not even that much room)."""
        path = self.path / RESERVE_NAME
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.posix_fallocate(fd, 0, size)
            finally:
                os.close(fd)
        except OSError:
            path.unlink(missing_ok=True)
            return None
        return path

    def release_reserve(self) -> None:
        """After a DiskFull: free the reserve and write the part that failed again (a second
        DiskFull means even that did not fit: the trace ends interrupted)."""
        if self._reserve is not None:
            self._reserve.unlink(missing_ok=True)
            self._reserve = None
        failed, self._failed = self._failed, None
        if failed is not None:
            self._atomic_write(*failed)

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
        if self._reserve is not None:  # unused: the trace ends without it
            self._reserve.unlink(missing_ok=True)
            self._reserve = None
        self.write_meta(status=status, end_wall=time.time(), **updates)
