"""Hand-built event tables -> fd lifetimes: every way an fd is born into a table and dies.

Each case is the events a kernel would report for a small program, and the lifetimes that
program had (worked out by hand from the table, DESIGN "Kernel side" and "What counts as a
leak"). Every case goes through build_lifetimes three ways (a pyarrow table, a DataFrame, and
a trace directory written by the recorder's writer and read back), which must agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest
from tracebuild import (
    PID,
    birth,
    close,
    close_range,
    events_table,
    exec_,
    exit_,
    fail,
    fork,
    preexisting_frame,
    set_cloexec,
    write_trace,
)

from cmtrace.analysis import build_lifetimes, load

CHILD = 200
CLOSE_RANGE_CLOEXEC = 4  # linux/close_range.h


@dataclass
class Case:
    events: list[dict]
    # One dict per expected lifetime; only the keys given are compared. died/death None: open
    # at the end of the trace.
    lives: list[dict]
    preexisting: list[dict] = field(default_factory=list)
    unknown_closes: int = 0


def life(pid: int, fd: int, born: int | None, died: int | None, death: str | None, **more):
    row = {"pid": pid, "fd": fd, "died_ns": died, "death": death, **more}
    if born is not None:
        row["born_ns"] = born
    return row


CASES = {
    "close ends the lifetime": Case(
        [birth(10, 3), close(20, 3)],
        [life(PID, 3, 10, 20, "close", inherited=False, preexisting=False)],
    ),
    "never closed: open at the end": Case([birth(10, 3)], [life(PID, 3, 10, None, None)]),
    "the same fd number reused after a close is a second lifetime": Case(
        [birth(10, 3), close(20, 3), birth(30, 3), close(40, 3)],
        [life(PID, 3, 10, 20, "close"), life(PID, 3, 30, 40, "close")],
    ),
    "dup2 onto a live fd ends it, the copy takes the source's kind": Case(
        [birth(10, 3), birth(11, 4, "socket", "socket"), birth(20, 3, "dup2", "unknown", src_fd=4)],
        [
            life(PID, 3, 10, 20, "dup2", kind="file"),
            life(PID, 4, 11, None, None, kind="socket"),
            life(PID, 3, 20, None, None, kind="socket", syscall="dup2", src_fd=4),
        ],
    ),
    "dup3 onto a live fd": Case(
        [birth(10, 5), birth(11, 6), birth(20, 5, "dup3", "unknown", src_fd=6)],
        [life(PID, 5, 10, 20, "dup3"), life(PID, 6, 11, None, None), life(PID, 5, 20, None, None)],
    ),
    "exec closes only the CLOEXEC fds, whether set at birth or by fcntl": Case(
        [
            birth(10, 3, cloexec=True),
            birth(11, 4),
            birth(12, 5),
            set_cloexec(15, 5, True),
            birth(16, 6, cloexec=True),
            set_cloexec(17, 6, False),
            exec_(20),
        ],
        [
            life(PID, 3, 10, 20, "exec"),
            life(PID, 4, 11, None, None),
            life(PID, 5, 12, 20, "exec"),
            life(PID, 6, 16, None, None),
        ],
    ),
    "process exit ends every fd still open": Case(
        [birth(10, 3), birth(11, 4), close(12, 4), exit_(30)],
        [life(PID, 3, 10, 30, "process-exit"), life(PID, 4, 11, 12, "close")],
    ),
    "a close during interpreter finalization is interpreter-shutdown": Case(
        [birth(10, 3), close(30, 3, finalizing=True)],
        [life(PID, 3, 10, 30, "interpreter-shutdown")],
    ),
    "close_range closes the fds in [first, last]": Case(
        [birth(10, 3), birth(11, 4), birth(12, 5), birth(13, 7), close_range(20, 4, 6)],
        [
            life(PID, 3, 10, None, None),
            life(PID, 4, 11, 20, "close_range"),
            life(PID, 5, 12, 20, "close_range"),
            life(PID, 7, 13, None, None),
        ],
    ),
    "close_range with CLOSE_RANGE_CLOEXEC only marks them: exec closes them": Case(
        [birth(10, 3), birth(11, 4), close_range(20, 4, 10, CLOSE_RANGE_CLOEXEC), exec_(30)],
        [life(PID, 3, 10, None, None), life(PID, 4, 11, 30, "exec")],
    ),
    "a fork child inherits the parent's live fds": Case(
        [
            birth(10, 3),
            birth(11, 4),
            close(12, 4),
            fork(20, CHILD),
            close(25, 3, pid=CHILD),
            birth(26, 5, pid=CHILD),
            exit_(30, pid=CHILD),
            exit_(40),
        ],
        [
            life(PID, 3, 10, 40, "process-exit", inherited=False),
            life(PID, 4, 11, 12, "close"),
            life(CHILD, 3, 20, 25, "close", inherited=True),
            life(CHILD, 5, 26, 30, "process-exit", inherited=False),
        ],
    ),
    "a grandchild inherits what its parent inherited": Case(
        [birth(10, 3), fork(20, CHILD), fork(30, CHILD + 1, pid=CHILD), exit_(40, pid=CHILD + 1)],
        [
            life(PID, 3, 10, None, None, inherited=False),
            life(CHILD, 3, 20, None, None, inherited=True),
            life(CHILD + 1, 3, 30, 40, "process-exit", inherited=True),
        ],
    ),
    "pre-existing fds are live from the start": Case(
        [close(10, 0), birth(11, 3)],
        [
            life(PID, 0, None, 10, "close", preexisting=True, kind="pipe"),
            life(PID, 1, None, None, None, preexisting=True),
            life(PID, 3, 11, None, None, preexisting=False),
        ],
        preexisting=[{"fd": 0, "kind": "pipe"}, {"fd": 1}],
    ),
    "a snapshot fd born during the trace before the snapshot is that birth, not pre-existing": Case(
        [birth(5, 7)],
        [life(PID, 7, 5, None, None, preexisting=False)],
        preexisting=[{"fd": 7, "t_ns": 8}],
    ),
    "failed births create nothing; a close of an unknown fd is counted": Case(
        [fail(10), fail(11, "socket", 24), close(12, 9), birth(13, 3)],
        [life(PID, 3, 13, None, None)],
        unknown_closes=1,
    ),
}


def _as_table(case: Case, tmp_path: Path):
    return events_table(case.events)


def _as_dataframe(case: Case, tmp_path: Path):
    return events_table(case.events).to_pandas()


def _as_trace_dir(case: Case, tmp_path: Path):
    return write_trace(tmp_path / "trace", case.events, case.preexisting)


SOURCES = {"table": _as_table, "dataframe": _as_dataframe, "trace-dir": _as_trace_dir}


def _records(lives: pd.DataFrame) -> list[dict]:
    """The lifetimes as plain dicts, nulls as None."""
    return [
        {k: None if pd.isna(v) else v for k, v in row.items()} for row in lives.to_dict("records")
    ]


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("name", CASES)
def test_lifetimes(name: str, source: str, tmp_path: Path) -> None:
    case = CASES[name]
    events = SOURCES[source](case, tmp_path)
    pre = preexisting_frame(case.preexisting) if case.preexisting else None
    lives, stats = build_lifetimes(events, pre)
    records = _records(lives)
    assert len(records) == len(case.lives), lives.to_string()
    for expected in case.lives:
        projected = [{k: row[k] for k in expected} for row in records]
        assert expected in projected, f"{expected} is not among:\n{lives.to_string()}"
    assert stats.unknown_closes == case.unknown_closes


def test_trace_fds_and_leaks_through_load(tmp_path: Path) -> None:
    """load() on a written trace: a fd left open and one released by exit are leaks; closed,
    pre-existing and inherited ones are not (DESIGN "What counts as a leak")."""
    events = [
        birth(10, 3),  # closed: not a leak
        close(11, 3),
        birth(12, 4),  # released only by exit: leak, closed_by process-exit
        fork(20, CHILD),  # the child inherits 4: inherited, not a leak
        birth(21, 6, pid=CHILD),  # the child's own, open at the end: leak
        exit_(30),
    ]
    trace = load(write_trace(tmp_path / "t", events, preexisting=[{"fd": 0}]))
    fds = trace.fds.set_index(["pid", "fd"])
    assert fds.loc[(PID, 3), "leak"] == False  # noqa: E712 (numpy bool)
    assert fds.loc[(PID, 4), "leak"] == True  # noqa: E712
    assert fds.loc[(PID, 4), "closed_by"] == "process-exit"
    assert fds.loc[(CHILD, 4), "leak"] == False  # noqa: E712
    assert fds.loc[(CHILD, 6), "leak"] == True  # noqa: E712
    assert fds.loc[(PID, 0), "leak"] == False  # noqa: E712
    assert sorted(zip(trace.leaks()["pid"], trace.leaks()["fd"])) == [(PID, 4), (CHILD, 6)]
    assert trace.status == "complete" and not trace.interrupted
