"""Deep stacks recorded for real: the columnar analysis names the right site, with statement
and cause of every leak opened 60-120 frames down, in several threads of several processes.

The program (tests/programs/leaks/deep_stacks.py) recurses through 12 generated modules before
it leaks, and prints which fds each marked line left open in each process: the test's ground
truth is the program's own, not cmtrace's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import TARGET_PYTHON, run_cmtrace
from targets import marked_causes

import cmtrace.analysis as cma

pytestmark = pytest.mark.usefixtures("bpf_ready", "recorder")  # once per recorder

PROGRAM = Path(__file__).parents[1] / "programs" / "leaks" / "deep_stacks.py"
LAYERS = 12  # deep_stacks.LAYERS: files each leaking stack goes through
MIN_DEPTH = 60  # deep_stacks.DEPTHS[0]
PROCESSES, THREADS = 3, 3


@pytest.fixture(scope="module")
def recorded(cell_dir: Path) -> tuple[cma.Trace, list[dict]]:
    work = cell_dir
    out = work / "trace"
    result = run_cmtrace(
        "run", "-o", str(out), "--", TARGET_PYTHON, str(PROGRAM), str(work / "layers")
    )
    assert result.returncode == 0, result.stderr
    truth = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(truth) == PROCESSES, result.stdout
    return cma.load(out), truth


def with_lines() -> set[int]:
    """Marked lines that are with statements: the fd's with statement is the line itself."""
    lines = PROGRAM.read_text().splitlines()
    return {n for n in marked_causes(PROGRAM) if lines[n - 1].lstrip().startswith("with ")}


def test_every_leak_has_its_site_with_statement_and_cause(recorded) -> None:
    trace, truth = recorded
    causes, withs = marked_causes(PROGRAM), with_lines()
    leaks = trace.leaks()
    expected = 0
    for process in truth:
        assert sorted(int(line) for line in process["leaked"]) == sorted(causes)
        for line, fds in process["leaked"].items():
            line = int(line)
            assert len(fds) == THREADS, process
            for fd in fds:
                row = leaks[(leaks["pid"] == process["pid"]) & (leaks["fd"] == fd)]
                assert len(row) == 1, f"pid {process['pid']} fd {fd} (line {line}) not a leak"
                row = row.iloc[0]
                where = f"pid {process['pid']} fd {fd}"
                assert (row["site_file"], int(row["site_line"])) == (str(PROGRAM), line), where
                assert row["cause"] == causes[line], where
                if line in withs:
                    assert (row["with_file"], row["with_line"]) == (str(PROGRAM), line), where
                else:
                    assert pd.isna(row["with_line"]), where
                assert row["closed_by"] == "process-exit", where
                expected += 1
    ours = leaks[leaks["site_file"] == str(PROGRAM)]
    assert len(ours) == expected == PROCESSES * THREADS * len(causes)


def test_the_leaking_stacks_are_deep_and_varied(recorded) -> None:
    trace, _ = recorded
    ours = trace.leaks()
    ours = ours[ours["site_file"] == str(PROGRAM)]
    stacks = ours["open_stack"].unique()
    assert len(stacks) >= 2 * len(marked_causes(PROGRAM)), "one stack per depth and leaf"
    for stack in stacks:
        frames = trace.stack(int(stack))
        layers = {f["file"] for f in frames if Path(f["file"]).name.startswith("layer_")}
        assert len(frames) > MIN_DEPTH and len(layers) == LAYERS, (len(frames), len(layers))
