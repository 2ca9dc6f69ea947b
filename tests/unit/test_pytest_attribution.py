"""pytest --cmtrace's attribution on hand-built timelines: which test or fixture owns each fd,
whether it outlived its owner, what a marker allows, and which fds are pytest's own."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from cmtrace.pytest_plugin import final_outcome
from cmtrace.pytest_plugin.attribution import (
    Owner,
    allowed_flags,
    attribute,
    build_timelines,
    opened_by_harness,
    timed_marks,
)
from cmtrace.pytest_plugin.boundaries import BEGIN, END, marker_path, seq_of_marker
from cmtrace.pytest_plugin.results import finalizer_warnings

PID, WORKER2 = 100, 200
T1, T2 = "t.py::test_one", "t.py::test_two"
SESSION = Owner("fixture", "server", "session", 3, PID)


def phase(edge: str, nodeid: str, name: str) -> dict:
    return {"edge": edge, "kind": "phase", "nodeid": nodeid, "phase": name}


def fixture(edge: str, name: str, scope: str, step: str, instance: int) -> dict:
    return {"edge": edge, "kind": "fixture", "fixture": name, "scope": scope, "phase": step,
            "instance": instance}  # fmt: skip


def timeline(pid: int, worker: str | None, *steps: tuple[int, dict]) -> list[dict]:
    """Marks at the given times, numbered in order as one process writes them."""
    return [
        {**mark, "pid": pid, "seq": seq, "worker": worker, "t_ns": t}
        for seq, (t, mark) in enumerate(steps, 1)
    ]


# test_one: setup (function fixture `tmpfile` 12-18, session fixture `server` 20-30) 10-40,
# call 50-60, teardown 70-90 (function fixture finalized 72-75); test_two: 100-190; the session
# fixture is finalized 200-210, after the last test.
SESSION_MARKS = timeline(
    PID, None,
    (10, phase(BEGIN, T1, "setup")),
    (12, fixture(BEGIN, "tmpfile", "function", "setup", 1)),
    (18, fixture(END, "tmpfile", "function", "setup", 1)),
    (20, fixture(BEGIN, "server", "session", "setup", 3)),
    (30, fixture(END, "server", "session", "setup", 3)),
    (40, phase(END, T1, "setup")),
    (50, phase(BEGIN, T1, "call")),
    (60, phase(END, T1, "call")),
    (70, phase(BEGIN, T1, "teardown")),
    (72, fixture(BEGIN, "tmpfile", "function", "teardown", 1)),
    (75, fixture(END, "tmpfile", "function", "teardown", 1)),
    (90, phase(END, T1, "teardown")),
    (100, phase(BEGIN, T2, "setup")),
    (110, phase(END, T2, "setup")),
    (120, phase(BEGIN, T2, "call")),
    (130, phase(END, T2, "call")),
    (140, phase(BEGIN, T2, "teardown")),
    (190, phase(END, T2, "teardown")),
    (200, fixture(BEGIN, "server", "session", "teardown", 3)),
    (210, fixture(END, "server", "session", "teardown", 3)),
)  # fmt: skip


def fds(*rows: tuple) -> pd.DataFrame:
    """(pid, fd, born_ns, died_ns or None, death) rows as the analysis' lifetimes."""
    table = pd.DataFrame(rows, columns=["pid", "fd", "born_ns", "died_ns", "death"])
    table["died_ns"] = table["died_ns"].astype("float64")
    # the analysis' own verdict: open when its process ended
    table["leak"] = table["died_ns"].isna() | (table["death"] == "process-exit")
    table["preexisting"] = False
    table["inherited"] = False
    return table


def owned(table: pd.DataFrame, marks: list[dict]) -> dict[int, tuple]:
    """fd -> (owner, phase, fixture, leaked) of each attributed fd."""
    result = attribute(table, build_timelines(marks))
    return {
        int(r.fd): (r.owner, r.phase, r.fixture, r.leaked) for r in result.itertuples(index=False)
    }


def test_owner_phase_fixture_and_leak_of_each_fd() -> None:
    table = fds(
        (PID, 3, 5, None, None),  # before any test (collection): nobody's
        (PID, 4, 15, None, None),  # function fixture's setup, never closed: test_one's leak
        (PID, 5, 25, 205, "close"),  # session fixture's, closed by its finalizer: no leak
        (PID, 6, 55, 58, "close"),  # test_one's call, closed in it
        (PID, 7, 55, 95, "finalizer"),  # outlived test_one's teardown (90): a leak
        (PID, 8, 73, 74, "close"),  # the function fixture's teardown closes its own fd
        (PID, 9, 125, 180, "finalizer"),  # test_two, closed by a finalizer in its teardown
        (PID, 10, 95, None, None),  # between tests: nobody's
    )
    test_one, test_two = Owner("test", T1), Owner("test", T2)
    assert owned(table, SESSION_MARKS) == {
        4: (test_one, "setup", "tmpfile", True),
        5: (SESSION, "setup", None, False),
        6: (test_one, "call", None, False),
        7: (test_one, "call", None, True),
        8: (test_one, "teardown", "tmpfile", False),
        9: (test_two, "call", None, False),
    }


def test_wider_fixture_checked_at_its_own_teardown() -> None:
    """A session fixture's fd still open after its finalizer is the fixture's leak; one it
    closes after every test ended is no test's leak."""
    table = fds((PID, 5, 25, 215, "process-exit"), (PID, 6, 22, 150, "close"))
    assert owned(table, SESSION_MARKS) == {
        5: (SESSION, "setup", None, True),
        6: (SESSION, "setup", None, False),
    }


def test_owner_without_end_marker_keeps_fds_to_the_end() -> None:
    """A test whose teardown never ended (the worker crashed): what it opened is leaked."""
    marks = timeline(PID, None, (10, phase(BEGIN, T1, "setup")), (20, phase(END, T1, "setup")),
                     (30, phase(BEGIN, T1, "call")))  # fmt: skip
    table = fds((PID, 4, 35, 10_000, "process-exit"))
    assert owned(table, marks) == {4: (Owner("test", T1), "call", None, True)}


def test_workers_attributed_per_pid() -> None:
    """Two xdist workers run tests at the same time: each fd goes to its own process's test."""
    marks = timeline(
        PID, "gw0", (10, phase(BEGIN, T1, "call")), (50, phase(END, T1, "call")),
        (51, phase(BEGIN, T1, "teardown")), (52, phase(END, T1, "teardown")),
    ) + timeline(
        WORKER2, "gw1", (20, phase(BEGIN, T2, "call")), (60, phase(END, T2, "call")),
        (61, phase(BEGIN, T2, "teardown")), (62, phase(END, T2, "teardown")),
    )  # fmt: skip
    table = fds((PID, 4, 30, None, None), (WORKER2, 4, 30, 40, "close"), (300, 4, 30, None, None))
    result = attribute(table, build_timelines(sorted(marks, key=lambda m: m["t_ns"])))
    rows = {(r.pid, r.fd): (r.owner.name, r.worker, r.leaked) for r in result.itertuples()}
    assert rows == {(PID, 4): (T1, "gw0", True), (WORKER2, 4): (T2, "gw1", False)}


def test_inherited_and_preexisting_fds_are_nobodys() -> None:
    table = fds((PID, 4, 55, None, None), (PID, 5, 55, None, None))
    table.loc[0, "inherited"] = True
    table.loc[1, "preexisting"] = True
    assert owned(table, SESSION_MARKS) == {}


def test_timed_marks_drop_unseen_and_sort_per_process() -> None:
    marks = [
        {"pid": PID, "seq": 2, "edge": END},
        {"pid": PID, "seq": 1, "edge": BEGIN},
        {"pid": PID, "seq": 3, "edge": BEGIN},  # its marker was lost: dropped
        {"pid": 7, "seq": 1, "edge": BEGIN},
    ]
    times = {(PID, 1): 500, (PID, 2): 600, (7, 1): 100}
    assert [(m["pid"], m["seq"], m["t_ns"]) for m in timed_marks(marks, times)] == [
        (7, 1, 100),
        (PID, 1, 500),
        (PID, 2, 600),
    ]


@pytest.mark.parametrize(
    ("count", "allow", "skip", "flags"),
    [
        (2, 0, False, [False, False]),
        (2, 1, False, [True, False]),
        (1, 5, False, [True]),
        (2, 0, True, [True, True]),
        (0, 1, False, []),
    ],
)
def test_allowed_flags(count: int, allow: int, skip: bool, flags: list[bool]) -> None:
    assert allowed_flags(count, allow, skip) == flags


@pytest.mark.parametrize(
    ("files", "harness"),
    [
        (["/venv/lib/python3.11/site-packages/_pytest/capture.py"], True),
        (["/usr/lib/python3.11/tempfile.py", "/venv/lib/python3.11/site-packages/_pytest/tmpdir.py"], True),
        (["/usr/lib/python3.11/subprocess.py", "/src/tests/test_x.py", "/venv/x/_pytest/python.py"], False),
        (["/src/tests/test_x.py", "/venv/lib/python3.11/site-packages/_pytest/python.py"], False),
        (["/venv/lib/python3.11/site-packages/requests/api.py", "/venv/x/_pytest/python.py"], False),
        ([], False),
    ],
)  # fmt: skip
def test_opened_by_harness(files: list[str], harness: bool) -> None:
    assert opened_by_harness([SimpleNamespace(file=f) for f in files]) is harness


def test_marker_paths_round_trip() -> None:
    assert seq_of_marker(marker_path(42)) == 42
    assert seq_of_marker("/dev/null/.cmtrace/x") is None
    assert seq_of_marker("/etc/passwd") is None
    assert seq_of_marker(None) is None


def test_finalizer_warnings_per_line() -> None:
    rows = pd.DataFrame(
        {
            "death": pd.Categorical(["finalizer", "close", "finalizer", "finalizer"]),
            "site_file": ["a.py", "a.py", "a.py", "b.py"],
            "site_line": pd.array([3, 3, 3, 9], dtype="Int64"),
        }
    )
    assert finalizer_warnings(rows) == [
        {"file": "a.py", "line": 3, "count": 2},
        {"file": "b.py", "line": 9, "count": 1},
    ]


def report(when: str, outcome: str, **extra) -> pytest.TestReport:
    rep = pytest.TestReport("t.py::x", ("t.py", 1, "x"), {}, outcome, None, when)
    for key, value in extra.items():
        setattr(rep, key, value)
    return rep


@pytest.mark.parametrize(
    ("reports", "outcome"),
    [
        ([report("setup", "passed"), report("call", "passed"), report("teardown", "passed")], "passed"),
        ([report("setup", "passed"), report("call", "failed"), report("teardown", "passed")], "failed"),
        ([report("setup", "failed"), report("teardown", "passed")], "error"),
        ([report("setup", "passed"), report("call", "passed"), report("teardown", "failed")], "error"),
        ([report("setup", "passed"), report("call", "passed"),
          report("teardown", "failed", user_properties=[("cmtrace_leak_failed", True)])], "failed"),
        ([report("setup", "skipped"), report("teardown", "passed")], "skipped"),
        ([report("setup", "passed"), report("call", "skipped", wasxfail=""),
          report("teardown", "passed")], "xfailed"),
        ([report("setup", "passed"), report("call", "passed", wasxfail=""),
          report("teardown", "passed")], "xpassed"),
    ],
)  # fmt: skip
def test_final_outcome(reports: list[pytest.TestReport], outcome: str) -> None:
    assert final_outcome(reports) == outcome


def test_fixture_instances_of_two_workers_are_two_owners() -> None:
    """Each xdist worker numbers its fixture instances from 1: the pid tells them apart."""
    marks = [
        {**mark, "pid": pid, "seq": seq, "worker": worker, "t_ns": t}
        for pid, worker in ((PID, "gw0"), (WORKER2, "gw1"))
        for seq, (t, mark) in enumerate(
            ((10, fixture(BEGIN, "log", "module", "setup", 1)),
             (20, fixture(END, "log", "module", "setup", 1))), 1)
    ]  # fmt: skip
    table = fds((PID, 4, 15, None, None), (WORKER2, 4, 15, None, None))
    result = attribute(table, build_timelines(marks))
    assert sorted((r.owner.pid, r.worker) for r in result.itertuples()) == [
        (PID, "gw0"),
        (WORKER2, "gw1"),
    ]
    assert result["owner"].nunique() == 2


# --- live.py: the trace read while it is written ---------------------------------------------
def test_live_trace_reads_new_parts_and_finds_openings(tmp_path: Path) -> None:
    from tracebuild import birth, events_table, fail

    from cmtrace.pytest_plugin.live import LiveTrace
    from cmtrace.trace.writer import TraceWriter, prepare_output_dir

    prepare_output_dir(tmp_path / "t")
    writer = TraceWriter(tmp_path / "t", {"mode": "run"})
    writer.write_part("events", events_table([
        birth(5, 7, stack_id=70),  # before the window: fd 7 is born again inside it
        fail(10, path=marker_path(1), errno=20),
        birth(20, 7, stack_id=71),
        birth(30, 8, syscall="pipe2", kind="pipe", src_fd=9, stack_id=80),
        birth(35, 7, pid=999, stack_id=99),  # another process
    ]))  # fmt: skip
    live = LiveTrace(tmp_path / "t")
    assert live.wait_for(100, 2, timeout=0) is None  # the end marker is not written yet
    writer.write_part("events", events_table([
        birth(40, 10, syscall="dup", kind="unknown", src_fd=8, stack_id=90),
        fail(50, path=marker_path(2), errno=20),
        birth(60, 7, stack_id=72),  # after the window
    ]))  # fmt: skip
    assert live.wait_for(100, 2, timeout=0) == 50
    stacks = live.opening_stacks(100, {7, 8, 9}, since=live.markers[(100, 1)], until=50)
    assert stacks == {7: 71, 8: 80, 9: 80}  # both ends of the pipe; a dup's source is no birth


def test_explain_gives_line_cause_and_fix(tmp_path: Path) -> None:
    from tracebuild import FILE, birth, fail, write_trace

    from cmtrace.pytest_plugin.live import explain

    frame = {"stack_id": 5, "pid": 100, "depth": 0, "function": "handler", "qualname": "handler",
             "file": FILE, "line": 12, "firstlineno": 10, "code_flags": 0, "lasti": 4}  # fmt: skip
    write_trace(tmp_path / "t", [
        fail(10, path=marker_path(1), errno=20),
        birth(20, 7, stack_id=5),
        fail(30, path=marker_path(2), errno=20),
    ], stacks=[frame])  # fmt: skip
    lines = explain(str(tmp_path / "t"), 100, {7}, 1, 2)[7]
    assert lines[0] == f"opened at {FILE}:12 in handler"
    assert lines[1] == "cause: no-context-manager"
    assert lines[2].startswith(f"fix: {FILE}:12: opened outside any context")
