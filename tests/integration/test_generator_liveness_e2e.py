"""Issue 13's liveness check end to end: `cmtrace -p` a program whose generators hold open fds
inside a `with` when the tracer stops (programs/leaks/generator_liveness.py), on every recorder
and interpreter. The suspended ones stay `suspended-generator`, now with the check's proof; the
finished one is what its @contextmanager without try/finally left behind.

Ground truth is the program's: it keeps both kinds alive and says which is which by its marks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import targets
from conftest import interpreter_for, trace_until_leaked

import cmtrace.analysis as cma

pytestmark = pytest.mark.usefixtures("bpf_ready")
PROGRAMS = Path(__file__).parents[1] / "programs" / "leaks"
PROGRAM = PROGRAMS / "generator_liveness.py"
FOUND, _MISSING = targets.discover()
LEAKS_PER_SITE = 2


def record(workdir: Path, interpreter: targets.Target) -> tuple[Path, str]:
    """Trace the program, stopping while it lives; (trace, the program's path as it ran)."""
    interpreter = interpreter_for(interpreter)
    attached = interpreter.program("attached.py", PROGRAMS)
    program = interpreter.program(PROGRAM.name, PROGRAMS)
    out = workdir / "trace"
    # stopped while the generators are alive: they are read then
    trace_until_leaked([interpreter.command, attached, program], workdir, out).kill()
    return out, program


@pytest.mark.parametrize("interpreter", FOUND, ids=[t.name for t in FOUND])
def test_suspended_and_finished_generators(
    recorder, workdir: Path, interpreter: targets.Target
) -> None:
    out, program = record(workdir, interpreter)
    trace = cma.load(out)
    if trace.no_python_reason:
        pytest.skip(f"{interpreter.name}: no Python stacks: {trace.no_python_reason}")
    leaks = trace.leaks()
    mine = leaks[leaks["site_file"].astype(str) == program]
    got = {
        int(line): sorted(set(group["cause"].astype(str)))
        for line, group in mine.groupby("site_line", observed=True)
    }
    expected = targets.marked_causes(PROGRAM)
    assert got == {line: [cause] for line, cause in expected.items()}, mine[
        ["site_line", "cause", "evidence"]
    ]
    assert (mine.groupby("site_line", observed=True).size() == LEAKS_PER_SITE).all()
    suspended_line = next(n for n, c in expected.items() if c == "suspended-generator")
    evidence = mine.loc[mine["site_line"] == suspended_line, "evidence"].astype(str)
    assert evidence.str.contains("a suspended generator of suspended at 0x").all(), evidence
    assert evidence.str.contains(f"resumes at line {suspended_line + 1}").all(), evidence
    finished_line = next(n for n, c in expected.items() if c != "suspended-generator")
    evidence = mine.loc[mine["site_line"] == finished_line, "evidence"].astype(str)
    assert evidence.str.contains("finished is no longer suspended there").all(), evidence
    # what the report reads was recorded in the trace (a laptop's report gives the same)
    checked = json.loads((out / "generators.json").read_text())
    states = {row["state"] for row in checked["generators"]}
    assert "suspended" in states and states & {"finished", "gone"}, checked
