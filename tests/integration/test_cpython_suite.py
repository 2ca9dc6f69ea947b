"""The report of a real test suite, CPython's own (issue 13's done-when): `cmtrace run` of
`python -m test test_subprocess` (pyenv's 3.11, which ships the `test` package): ~380
processes, ~270 of them `python -c` children, most gone within milliseconds.

Ground truth is the suite's: tests/programs/suite/regrtest_logging_argv.py runs it with an
audit hook that logs the argv of every child the test process starts, and keeps its log open
(its one leak, whose fd it logs first). The report must list the long-lived process's finding
first, name each `python -c` program apart with the text its children were started with, count
the processes without stacks per kind on one short line, and have no line over 300 characters.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import run_cmtrace
from targets import PYENV

pytestmark = pytest.mark.usefixtures("bpf_ready")
WRAPPER = Path(__file__).parents[1] / "programs" / "suite" / "regrtest_logging_argv.py"
SUITE = ("test_subprocess",)
MAX_LINE = 300


def suite_python() -> Path:
    for python in sorted(PYENV.glob("3.11.*/bin/python3")):
        if (python.parents[1] / "lib" / "python3.11" / "test" / "test_subprocess.py").is_file():
            return python
    pytest.skip(f"no pyenv 3.11 with CPython's test package under {PYENV} (make interpreters)")


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> tuple[Path, list[list[str]], int]:
    """(trace, the argv of each child the test process started, the test process's pid)."""
    work = tmp_path_factory.mktemp("cpython-suite")
    log = work / "argv.log"
    env = {**os.environ, "ARGV_LOG": str(log)}
    argv = ["run", "-q", "-o", str(work / "trace"), "--", str(suite_python()), str(WRAPPER), *SUITE]
    result = run_cmtrace(*argv, env=env, cwd=work, timeout=600)
    assert result.returncode in (0, 2), result.stderr[-3000:]  # 2: a test of the suite failed
    children = [json.loads(line) for line in log.read_text().splitlines()]
    assert sum("-c" in child for child in children) > 100  # the suite did run its -c children
    return work / "trace", children, kept_pid(work / "trace")


def kept_pid(trace: Path) -> int:
    """The test process: the one that ran the wrapper (the command's own pid)."""
    meta = json.loads((trace / "meta.json").read_text())
    return int(meta["targets"][0]["pid"])


def report(trace: Path, *args: str) -> str:
    result = run_cmtrace("report", str(trace), *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def c_texts(children: list[list[str]]) -> set[str]:
    return {argv[argv.index("-c") + 1] for argv in children if "-c" in argv[:-1]}


def wrapper_line() -> int:
    lines = WRAPPER.read_text().splitlines()
    return next(n for n, line in enumerate(lines, 1) if line.rstrip().endswith("# LEAK"))


def test_the_long_lived_finding_comes_first(recorded) -> None:
    trace, _, test_pid = recorded
    lines = report(trace).splitlines()
    site = f"opened at {WRAPPER}:{wrapper_line()} in <module>"
    first = next(i for i, line in enumerate(lines) if line.startswith("#1 "))
    short = next(i for i, line in enumerate(lines) if line.startswith("short-lived processes"))
    assert first < short
    long_lived = "\n".join(lines[first:short])
    assert site in long_lived
    document = json.loads(report(trace, "--format", "json"))
    mine = [
        leak for leak in document["leaks"] if leak["path"] and leak["path"].endswith("argv.log")
    ]
    assert [(leak["pid"], leak["short_lived"]) for leak in mine] == [(test_pid, False)]


def test_no_line_is_over_300_characters(recorded) -> None:
    trace, _, _ = recorded
    for args in ((), ("--top", "50"), ("--by-peer",)):
        lines = report(trace, *args).splitlines()
        assert max(len(line) for line in lines) <= MAX_LINE, args
        assert not [line for line in lines if " (?): peak" in line]  # each named by its exec


def test_missing_stacks_are_counted_per_kind_on_one_short_line(recorded) -> None:
    trace, _, _ = recorded
    (line,) = [line for line in report(trace).splitlines() if line.startswith("no Python stacks")]
    assert "exited before its interpreter was read (" in line  # the children gone in ms
    assert "/proc/" not in line and "..." not in line and len(line) <= 200


def test_each_c_program_is_named_apart_with_its_text(recorded) -> None:
    trace, children, _ = recorded
    started = c_texts(children)
    document = json.loads(report(trace, "--format", "json"))
    programs = document["short_lived"]["programs"]
    assert programs, "the suite's short-lived -c children leave fds to their exit"
    texts = [program["text"] for program in programs]
    assert len(set(texts)) == len(texts)  # one entry per program
    assert len({program["file"] for program in programs}) == len(programs)  # a file name each
    for program in programs:  # the text the child was started with (or one of its own -c's)
        text = program["text"]
        assert text in started or any(text in parent for parent in started), text[:200]
    by_file = {program["file"]: set(program["pids"]) for program in programs}
    for leak in document["leaks"]:
        file = (leak["site"] or {}).get("file", "")
        if file.startswith("<string>"):
            assert leak["short_lived"] and leak["pid"] in by_file[file], leak
