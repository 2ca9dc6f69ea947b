"""Each birth gets its own stack when stacks agree at the top and differ below.

The program (tests/programs/leaks/shared_top.py) opens fds on one line through two callers
whose frames land at the same data-stack addresses, at two depths, and through a recursion whose
call sites differ only far below the top. It prints the stack of every fd as it saw it
(function and line, innermost first); each leaked fd's recorded opening stack must be exactly
that. A walker that reused a thread's previous stack id on unchanged top frames would fail here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TARGET_PYTHON, run_cmtrace

import cmtrace.analysis as cma

pytestmark = pytest.mark.usefixtures("bpf_ready", "recorder")  # once per recorder

PROGRAM = Path(__file__).parents[1] / "programs" / "leaks" / "shared_top.py"


def test_every_birth_has_the_stack_the_program_saw(cell_dir: Path) -> None:
    out = cell_dir / "trace"
    result = run_cmtrace("run", "-o", str(out), "--", TARGET_PYTHON, str(PROGRAM))
    assert result.returncode == 0, result.stderr
    truth = json.loads(result.stdout.splitlines()[-1])
    trace = cma.load(out)
    leaks = trace.leaks()
    seen_stacks = set()
    for fd, expected in truth["opened"].items():
        row = leaks[(leaks["pid"] == truth["pid"]) & (leaks["fd"] == int(fd))]
        assert len(row) == 1, f"fd {fd} is not a leak"
        stack = int(row.iloc[0]["open_stack"])
        frames = [[f["function"], int(f["line"])] for f in trace.stack(stack)]
        assert frames[: len(expected)] == expected, f"fd {fd}"
        seen_stacks.add(stack)
    # (an id names one stack; the same frames may come with two ids: instruction offsets
    # within one line are hashed, lines are what the program can see)
    distinct = {json.dumps(stack) for stack in truth["opened"].values()}
    assert len(seen_stacks) >= len(distinct) >= 8
