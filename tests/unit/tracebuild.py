"""Hand-built traces for the unit tests: event rows by name, written through the real writer.

A test states the events a kernel would have recorded (birth, close, fork, ...), and the fd
lifetimes it expects from them; nothing here derives an expectation from the code under test.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa

from cmtrace.trace import schema  # noqa: E402
from cmtrace.trace.writer import TraceWriter, prepare_output_dir  # noqa: E402

# The `# CAUSE:` markers of the leak programs have one parser, the integration tests' own.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from targets import marked_causes  # noqa: E402, F401 (re-exported for the unit tests)

LEAKS = Path(__file__).resolve().parents[1] / "programs" / "leaks"
ALL_CAUSES = LEAKS / "all_causes.py"
PID = 100
FILE = "/srv/app/handlers.py"  # a user file: not stdlib, not site-packages, not cmtrace

# Every EVENTS column, as the recorder fills it when the event does not set it.
EVENT_DEFAULTS = {
    "t_ns": 0, "pid": PID, "tid": PID, "op": None, "syscall": None, "fd": -1, "src_fd": -1,
    "errno": 0, "kind": None, "path": None, "flags": 0, "cloexec": False, "arg": 0,
    "stack_id": 0, "stack_flags": 0, "finalizing": False,
}  # fmt: skip


def birth(t: int, fd: int, syscall: str = "openat", kind: str = "file", **fields) -> dict:
    path = fields.pop("path", f"/data/{fd}-{t}")
    return {"t_ns": t, "op": schema.OP_BIRTH, "syscall": syscall, "fd": fd, "kind": kind,
            "path": path, **fields}  # fmt: skip


def close(t: int, fd: int, **fields) -> dict:
    return {"t_ns": t, "op": schema.OP_CLOSE, "syscall": "close", "fd": fd, **fields}


def fail(t: int, syscall: str = "openat", errno: int = 2, **fields) -> dict:
    return {"t_ns": t, "op": schema.OP_FAIL, "syscall": syscall, "errno": errno, **fields}


def close_range(t: int, first: int, last: int, flags: int = 0, **fields) -> dict:
    return {"t_ns": t, "op": schema.OP_CLOSE_RANGE, "syscall": "close_range", "fd": first,
            "arg": last, "flags": flags, **fields}  # fmt: skip


def set_cloexec(t: int, fd: int, on: bool = True, **fields) -> dict:
    return {"t_ns": t, "op": schema.OP_CLOEXEC, "syscall": "fcntl", "fd": fd, "cloexec": on,
            **fields}  # fmt: skip


def fork(t: int, child: int, **fields) -> dict:
    return {"t_ns": t, "op": schema.OP_FORK, "syscall": "clone", "arg": child, **fields}


def exec_(t: int, path: str = "/usr/bin/true", **fields) -> dict:
    return {"t_ns": t, "op": schema.OP_EXEC, "syscall": "execve", "path": path, **fields}


def exit_(t: int, **fields) -> dict:
    return {"t_ns": t, "op": schema.OP_EXIT, **fields}


def events_table(rows: list[dict]) -> pa.Table:
    """The rows as the recorder writes them: every column of schema.EVENTS, in time order."""
    full = [{**EVENT_DEFAULTS, "tid": row.get("pid", PID), **row} for row in rows]
    full.sort(key=lambda row: row["t_ns"])
    return pa.Table.from_pylist(full, schema=schema.EVENTS)


def preexisting_frame(rows: list[dict]) -> pd.DataFrame:
    defaults = {"pid": PID, "kind": "file", "path": None, "cloexec": False, "t_ns": 0}
    table = pa.Table.from_pylist([{**defaults, **r} for r in rows], schema=schema.PREEXISTING)
    return table.to_pandas()


def write_trace(
    path: Path,
    events: list[dict],
    preexisting: list[dict] = (),
    stacks: list[dict] = (),
    sources: list[dict] = (),
    **meta,
) -> Path:
    """A complete trace directory holding these rows, written by the recorder's TraceWriter."""
    prepare_output_dir(path)
    writer = TraceWriter(path, {"mode": "run", "targets": [{"pid": PID}], **meta})
    writer.write_part("events", events_table(events))
    writer.write_rows("stacks", stacks)
    writer.write_rows("sources", sources)
    defaults = {"pid": PID, "kind": "file", "path": None, "cloexec": False, "t_ns": 0}
    writer.write_preexisting([{**defaults, **row} for row in preexisting])
    writer.finish(events=len(events))
    return path
