"""The lifetimes model on a real recording: dup2 onto a live fd, pipes, fork inheritance, exit.

programs/leaks/fdtable.py prints the fd numbers it used; the trace must tell the same story.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TARGET_PYTHON, run_cmtrace

import cmtrace.analysis as cma

pytestmark = pytest.mark.usefixtures("bpf_ready", "backend")
PROGRAM = Path(__file__).parents[1] / "programs" / "leaks" / "fdtable.py"


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, backend: str) -> tuple[cma.Trace, dict]:
    out = tmp_path_factory.mktemp("lifetimes") / "trace"
    result = run_cmtrace("run", "-o", str(out), "--", TARGET_PYTHON, str(PROGRAM))
    assert result.returncode == 0, result.stderr
    truth = json.loads(result.stdout.strip().splitlines()[-1])
    return cma.load(out), truth


def lives(trace: cma.Trace, pid: int, fd: int):
    fds = trace.fds
    return fds[(fds["pid"] == pid) & (fds["fd"] == fd)].sort_values("born_ns")


def test_dup2_onto_live_fd_ends_it(recorded) -> None:
    trace, truth = recorded
    f = lives(trace, truth["pid"], truth["f"])
    born_here = f[~f["preexisting"]]
    assert list(born_here["kind"].astype(str)) == ["file", "pipe"]
    assert born_here.iloc[0]["death"] == "dup2"
    assert born_here.iloc[0]["path"] == str(PROGRAM)
    assert born_here.iloc[1]["death"] == "close"


def test_fork_inherits_and_child_exit_is_not_a_leak(recorded) -> None:
    trace, truth = recorded
    child = trace.fds[trace.fds["pid"] == truth["child"]]
    inherited = child[child["inherited"]]
    assert {truth["r"], truth["w"], truth["f"], truth["kept"]} <= set(inherited["fd"])
    w = inherited[inherited["fd"] == truth["w"]].iloc[0]
    assert w["death"] == "close"
    assert not inherited["leak"].any()
    others = inherited[inherited["fd"] != truth["w"]]
    assert set(others["death"]) == {"process-exit"}


def test_leaks_are_the_unclosed_fds(recorded) -> None:
    trace, truth = recorded
    leaks = trace.leaks()
    leaked = set(zip(leaks["pid"], leaks["fd"]))
    assert (truth["pid"], truth["kept"]) in leaked
    child_leaks = leaks[leaks["pid"] == truth["child"]]
    assert len(child_leaks) == 1 and child_leaks.iloc[0]["closed_by"] == "process-exit"
    assert trace.pairing.unknown_closes >= 0


def test_live_fds_and_timeline(recorded) -> None:
    trace, truth = recorded
    kept = lives(trace, truth["pid"], truth["kept"]).iloc[-1]
    table = trace.live_fds(at=int(kept["born_ns"]))
    assert truth["kept"] in set(table[table["pid"] == truth["pid"]]["fd"])
    before = trace.live_fds(at=int(kept["born_ns"]) - 1)
    assert not (
        (before["pid"] == truth["pid"]) & (before["fd"] == truth["kept"]) & ~before["preexisting"]
    ).any()
    timeline = trace.timeline(by="kind", freq="10ms")
    assert timeline.to_numpy().min() >= 0
    assert timeline["file"].max() >= 1
