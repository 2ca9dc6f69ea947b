"""Every cause on every interpreter found here (tests/integration/targets.py): one recording of
programs/leaks/all_causes.py per interpreter, stopped while it runs, each marked site checked for
its cause and count."""

from __future__ import annotations

from pathlib import Path

import pytest
import targets
from conftest import interpreter_for, trace_until_leaked

import cmtrace.analysis as cma

# every recorder on every interpreter (the CI slice of conftest.cell_left_out in `make test`)
pytestmark = pytest.mark.usefixtures("bpf_ready")
PROGRAMS = Path(__file__).parents[1] / "programs" / "leaks"
FOUND, MISSING = targets.discover()
LEAKS_PER_CAUSE = 2


def marked_sites() -> dict[int, str]:
    """line -> cause, from the `# CAUSE:<cause>` comments of all_causes.py."""
    return targets.marked_causes(PROGRAMS / "all_causes.py")


def closed_sites() -> set[int]:
    """Lines marked `CLOSED:` (released by asyncio.run's loop shutdown, before the stop)."""
    lines = (PROGRAMS / "all_causes.py").read_text().splitlines()
    return {n for n, line in enumerate(lines, 1) if " CLOSED:loop-shutdown" in line}


def programs_for(interpreter: targets.Target) -> tuple[str, str]:
    """Paths of attached.py and all_causes.py as the interpreter sees them."""
    return interpreter.program("attached.py", PROGRAMS), interpreter.program(
        "all_causes.py", PROGRAMS
    )


def test_interpreters_listed() -> None:
    targets.require_found(FOUND, MISSING)


@pytest.mark.parametrize("interpreter", FOUND, ids=[t.name for t in FOUND])
def test_all_causes(recorder, workdir: Path, interpreter: targets.Target) -> None:
    interpreter = interpreter_for(interpreter)  # nobody runs the pyenv builds' copies
    attached, program = programs_for(interpreter)
    out = workdir / "trace"
    target = trace_until_leaked([interpreter.command, attached, program, "wait"], workdir, out)
    try:
        assert target.finish() == 0, target.stderr_text()
    finally:
        target.kill()
    trace = cma.load(out)
    if trace.no_python_reason:
        pytest.skip(f"{interpreter.name}: no Python stacks: {trace.no_python_reason}")
    leaks = trace.leaks()
    mine = leaks[leaks["site_file"].astype(str) == program]
    found = mine.groupby("site_line")["cause"].agg(lambda c: sorted(set(c)))
    counts = mine.groupby("site_line").size()
    expected = marked_sites()
    problems = []
    for line, cause in expected.items():
        if found.get(line) != [cause] or counts.get(line) != LEAKS_PER_CAUSE:
            problems.append(f"line {line}: want {LEAKS_PER_CAUSE} x {cause}, got "
                            f"{counts.get(line, 0)} x {found.get(line)}")  # fmt: skip
    assert not problems, f"{interpreter.name}: " + "; ".join(problems)
    assert len(mine) == LEAKS_PER_CAUSE * len(expected)
    # still open when recording stopped, but for what the program itself released at the end
    closed = mine.loc[mine["closed_by"].notna(), "site_line"].astype(int)
    assert set(closed) <= closed_sites(), mine[["site_line", "closed_by"]]
    assert (mine.loc[mine["closed_by"].notna(), "closed_by"] == "loop-shutdown").all()
