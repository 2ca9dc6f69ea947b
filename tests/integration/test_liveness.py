"""The liveness check of issue 13 on every interpreter of the matrix: generators, coroutines and
async generators left in known states by tests/programs/py/genstates.py, read from outside by
cmtrace.interp.generators, graded against what the program itself says (its objects' frames)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import pytest
import targets

from cmtrace.interp import generators, layouts

FOUND, MISSING = targets.discover()


@pytest.fixture(scope="module", params=FOUND, ids=[t.name for t in FOUND])
def live(request: pytest.FixtureRequest) -> Iterator[tuple[int, dict]]:
    """(pid, the program's own description of its objects), while they are alive."""
    target = request.param
    proc = subprocess.Popen([target.command, target.program("genstates.py")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        yield proc.pid, json.loads(proc.stdout.readline())
    finally:
        if proc.stdin:
            proc.stdin.close()
        proc.wait(timeout=30)


def findings(pid: int, wanted: dict) -> dict[str, generators.Finding]:
    found = generators.check(pid, [(w["address"], w["code"]) for w in wanted.values()])
    return dict(zip(wanted, found))


def test_matrix_is_complete() -> None:
    assert not MISSING, MISSING


def test_states_and_lines_are_the_programs(live: tuple[int, dict]) -> None:
    pid, wanted = live
    for name, finding in findings(pid, wanted).items():
        expected = wanted[name]
        assert finding.error is None, (name, finding)
        if name == "gen_freed":  # freed: its memory is anything now, never a suspended one
            assert finding.state in (generators.GEN_GONE, layouts.GEN_FINISHED), finding
            continue
        assert (finding.state, finding.line) == (expected["state"], expected["line"]), name
        kind = name.split("_")[0]
        assert finding.type == {"gen": "generator", "coro": "coroutine",
                                "agen": "async_generator"}[kind], finding  # fmt: skip


def test_wrong_code_is_gone(live: tuple[int, dict]) -> None:
    """An address whose generator runs another code object is not the one that opened the fd."""
    pid, wanted = live
    other = wanted["gen_finished"]["code"]
    (finding,) = generators.check(pid, [(wanted["gen_suspended"]["address"], other + 16)])
    assert finding.state == generators.GEN_GONE, finding


def test_gone_process_is_an_error_not_a_verdict() -> None:
    """No process (a pid above pid_max's default): no proof either way."""
    (finding,) = generators.check(2**22 + 12345, [(0x1000, 0x2000)])
    assert finding.state is None and finding.error, finding
