"""Short-lived children on a real recording (issue 13): a parent with one leak of its own
spawns 20 `python -c` children of one program and 5 of another, each leaving fds to its exit.

Ground truth is the programs' own: each child prints its pid and the fds it left open, the
parent the fd it keeps. The report must list the parent's leak first and alone among the
long-lived ones, every child's fds in the short-lived section, each program apart with its
text and line, with no line over 300 characters; --fail-on-leak counts the parent's only.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TARGET_PYTHON, run_cmtrace

pytestmark = pytest.mark.usefixtures("bpf_ready", "backend")
PROGRAM = Path(__file__).parents[1] / "programs" / "children" / "spawns_snippets.py"
CHILDREN = 20


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, backend: str) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("short-lived") / "trace"
    result = run_cmtrace("run", "-o", str(out), "--", TARGET_PYTHON, str(PROGRAM), str(CHILDREN))
    assert result.returncode == 0, result.stderr
    return out, json.loads(result.stdout.strip().splitlines()[-1])


def report(trace: Path, *args: str) -> str:
    result = run_cmtrace("report", str(trace), *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def kept_line() -> int:
    lines = PROGRAM.read_text().splitlines()
    return next(n for n, line in enumerate(lines, 1) if "LONG-LIVED LEAK" in line)


def children_fds(truth: dict) -> set[tuple[int, int]]:
    return {(int(pid), fd) for program in truth["programs"].values()
            for pid, fds in program["pids"].items() for fd in fds}  # fmt: skip


def test_json_tells_the_parents_leak_from_the_childrens(recorded) -> None:
    trace, truth = recorded
    document = json.loads(report(trace, "--format", "json"))
    long_lived = {(leak["pid"], leak["fd"]) for leak in document["leaks"]
                  if not leak["short_lived"]}  # fmt: skip
    short = {(leak["pid"], leak["fd"]) for leak in document["leaks"] if leak["short_lived"]}
    assert long_lived == {(truth["pid"], truth["kept"])}
    assert short == children_fds(truth)
    summary = document["short_lived"]
    assert summary["leaked"] == len(short) == CHILDREN + 2 * (CHILDREN // 4)
    assert summary["processes"] == CHILDREN + CHILDREN // 4


def test_each_c_program_is_named_apart_with_its_text(recorded) -> None:
    trace, truth = recorded
    programs = json.loads(report(trace, "--format", "json"))["short_lived"]["programs"]
    by_text = {p["text"].strip(): p for p in programs}
    missed = 0
    for name, program in truth["programs"].items():
        captured = by_text[program["text"].strip()]
        ran = {int(pid): fds for pid, fds in program["pids"].items()}
        assert set(captured["pids"]) <= set(ran), name  # no process named by another's text
        assert captured["leaked"] == sum(len(ran[pid]) for pid in captured["pids"]), name
        missed += len(ran) - len(captured["pids"])
    assert missed == 0  # every child's -c text was read (held at its exec: bpf and ptrace)


def test_text_report_lists_the_long_lived_leak_first(recorded) -> None:
    trace, truth = recorded
    text = report(trace, "--top", "50")
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 300
    first = lines.index(next(line for line in lines if line.startswith("#1 ")))
    assert lines[first + 1].endswith(f"{PROGRAM}:{kept_line()} in main")
    assert not any(line.startswith("#2 ") for line in lines)  # the parent's one site only
    section = next(i for i, line in enumerate(lines) if line.startswith("short-lived processes"))
    assert section > first
    below = "\n".join(lines[section:])
    for program in json.loads(report(trace, "--format", "json"))["short_lived"]["programs"]:
        pids = len(program["pids"])  # the processes whose -c text was read: a site each
        assert f"{program['leaked']} leaked in {pids} process{'es' if pids > 1 else ''}" in below
    assert below.count('program: python -c "import os, json; ') == 2


def test_text_report_shows_each_programs_leaking_line(recorded) -> None:
    trace, _ = recorded
    text = report(trace, "--top", "50")
    below = text[text.index("short-lived processes") :]
    assert "| fd = os.open(" in below and "| r, w = os.pipe()" in below


def test_fail_on_leak_counts_the_long_lived_processes_only(recorded, tmp_path: Path) -> None:
    trace, _ = recorded
    assert run_cmtrace("report", str(trace), "--fail-on-leak").returncode == 3
    patterns = tmp_path / "exclude"
    patterns.write_text(f"{PROGRAM.name}:main\n")  # the parent's own leak
    gate = ["report", str(trace), "--fail-on-leak", "--exclude", str(patterns)]
    assert run_cmtrace(*gate).returncode == 0  # the children's leaks do not fail it
    assert run_cmtrace(*gate, "--short-lived", "0").returncode == 3  # unless not split
