"""End to end: real leak programs traced with `cmtrace run`, one per cause.

Each asserts the leak count and `closed_by` against the program's own ground truth (it leaks N
fds then leaves with os._exit), and, when the trace has Python stacks, the cause, the opening
site (the line marked LEAK-SITE) and the with statement.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TARGET_PYTHON, Target, Tracer, run_cmtrace

import cmtrace.analysis as cma

pytestmark = pytest.mark.usefixtures("bpf_ready", "backend")

PROGRAMS = Path(__file__).parents[1] / "programs" / "leaks"
# (program, its arguments, cause, leaked fds, closed_by)
CASES = [
    ("suspended_generator.py", ("4",), "suspended-generator", 4, "process-exit"),
    ("suspended_generator.py", ("3", "normal"), "suspended-generator", 3, "interpreter-shutdown"),
    ("async_generator.py", ("3",), "suspended-generator", 3, "loop-shutdown"),
    ("contextmanager_without_finally.py", ("3",), "contextmanager-without-finally", 3,
     "process-exit"),
    ("manual_enter.py", ("3",), "manual-enter", 3, "process-exit"),
    ("finalizer_never_ran.py", ("3",), "finalizer-never-ran", 3, "process-exit"),
    ("with_exited_without_close.py", ("3",), "with-exited-without-close", 3, "process-exit"),
    ("no_context_manager.py", ("3",), "no-context-manager", 3, "process-exit"),
]  # fmt: skip


def marked_line(program: Path, marker: str) -> int:
    for number, line in enumerate(program.read_text().splitlines(), start=1):
        if f"# {marker}" in line:
            return number
    raise AssertionError(f"{program} has no {marker} marker")


def record(tmp_path: Path, program: Path, *args: str) -> Path:
    """`cmtrace run` the program; the trace directory."""
    out = tmp_path / f"trace-{program.stem}-{'-'.join(args) or 'default'}"
    result = run_cmtrace("run", "-o", str(out), "--", TARGET_PYTHON, str(program), *args)
    assert result.returncode == 0, result.stderr
    return out


def record_attached(tmp_path: Path, program: Path, *args: str) -> Path:
    """`cmtrace -p` a running interpreter that then runs the program; the trace directory."""
    out = tmp_path / f"trace-p-{program.stem}"
    target = Target([TARGET_PYTHON, str(PROGRAMS / "attached.py"), str(program), *args], tmp_path)
    try:
        ready = target.expect("ready")
        tracer = Tracer(["-p", str(ready["pid"]), "-o", str(out)], cwd=tmp_path)
        assert tracer.wait_attached() == ready["pid"]
        target.send("go")
        assert target.finish() == 0, target.stderr_text()
        tracer.wait().check()  # stops by itself: the target exited
    finally:
        target.kill()
    return out


def program_leaks(trace: cma.Trace, program: Path):
    """Leaks whose opening stack is in the program, or, without stacks, of kind file."""
    leaks = trace.leaks()
    if trace.no_python_reason:
        return leaks[leaks["path"].astype(str) == str(program)]
    return leaks[leaks["site_file"] == str(program)]


@pytest.mark.parametrize(
    "name,args,cause,count,closed_by", CASES, ids=[f"{c[2]}-{c[4]}" for c in CASES]
)
def test_leak_program(
    tmp_path: Path, name: str, args: tuple, cause: str, count: int, closed_by: str
) -> None:
    program = PROGRAMS / name
    trace = cma.load(record_attached(tmp_path, program, *args))
    leaks = program_leaks(trace, program)
    assert len(leaks) == count, leaks
    if closed_by == "process-exit" or not trace.no_python_reason:
        assert set(leaks["closed_by"]) == {closed_by}, leaks[["closed_by", "death"]]
    if trace.no_python_reason:
        print(f"cause and site not checked: no Python stacks: {trace.no_python_reason}")
        pytest.skip(f"trace has no Python stacks: {trace.no_python_reason}")
    assert set(leaks["cause"]) == {cause}, leaks[["cause", "evidence"]]
    assert set(leaks["site_line"]) == {marked_line(program, "LEAK-SITE")}
    assert all(str(program) in fix for fix in leaks["fix"])
    if "WITH-LINE" in program.read_text():
        assert set(leaks["with_line"]) == {marked_line(program, "WITH-LINE")}


def test_report_json_contract(tmp_path: Path) -> None:
    """`cmtrace report --format json` of a real trace has the DESIGN contract's fields."""
    program = PROGRAMS / "no_context_manager.py"
    trace_dir = record(tmp_path, program, "2")
    result = run_cmtrace("report", str(trace_dir), "--format", "json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["schema"] == 1 and report["lost_events"] == 0
    assert report["trace"]["status"] == "complete"
    mine = [leak for leak in report["leaks"] if leak["path"] == str(program)]
    assert len(mine) == 2
    for leak in mine:
        assert set(leak) >= {"pid", "tid", "fd", "kind", "path", "opened_ns", "closed_by",
                             "stack", "site", "with", "cause"}  # fmt: skip
        assert leak["closed_by"] == "process-exit" and leak["kind"] == "file"
    assert {"warnings", "sites"} <= set(report)
    failing = run_cmtrace("report", str(trace_dir), "--fail-on-leak")
    assert failing.returncode == 3


def test_report_unreadable_trace(tmp_path: Path) -> None:
    result = run_cmtrace("report", str(tmp_path / "missing"))
    assert result.returncode == 5
    assert result.stderr.startswith("cmtrace: error:") and len(result.stderr.splitlines()) == 1
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "meta.json").write_text("{not json")
    assert run_cmtrace("report", str(tmp_path / "bad")).returncode == 5


def test_finalizer_closes_are_warnings(tmp_path: Path) -> None:
    program = PROGRAMS / "finalizer_warning.py"
    trace = cma.load(record_attached(tmp_path, program, "3"))
    if trace.no_python_reason:
        pytest.skip(f"trace has no Python stacks: {trace.no_python_reason}")
    mine = trace.fds[trace.fds["site_file"] == str(program)]
    assert not mine["leak"].any()
    warnings = {
        w["site"]["line"]: w["count"]
        for w in trace.warnings()
        if w["site"] and w["site"]["file"] == str(program)
    }
    assert warnings == {
        marked_line(program, "WARN-DEL"): 3,
        marked_line(program, "WARN-DEALLOC"): 3,
    }
    text = run_cmtrace("report", str(trace.path)).stdout
    assert "closed by a finalizer" in text
