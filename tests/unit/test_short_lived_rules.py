"""Short-lived children and their `python -c` programs (issue 13), on hand-built traces.

The parent leaks one fd at its own line; children forked during the trace run `python -c`
programs (two run the same text, one another) and leave an fd each to their exit; one child
lives 2 s, one never exits. The expectations are what each process did, stated per process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tracebuild import PID, birth, exit_, fork, write_trace

from cmtrace.analysis import load
from cmtrace.cli import main
from cmtrace.trace.sources import (
    SourceCollector,
    command_program,
    program_file,
    program_rows,
    source_rows,
)

APP = "/srv/app/suite.py"
APP_TEXT = "import subprocess\n" * 9 + "log = open('/srv/app/log')\n" + "pass\n" * 9 + "x = 1\n"
LEAK_A = "import os\nfd = os.open('/etc/hosts', os.O_RDONLY)\n"
LEAK_B = "import os\nr, w = os.pipe()\n"
SECOND = 1_000_000_000
# child pid -> (forked at, lived for (None: never exits), program)
CHILDREN = {
    201: (1 * SECOND // 10, SECOND * 3 // 10, LEAK_A),
    202: (2 * SECOND // 10, SECOND * 2 // 10, LEAK_A),
    203: (3 * SECOND // 10, SECOND // 10, LEAK_B),
    204: (4 * SECOND // 10, 2 * SECOND, None),
    205: (5 * SECOND // 10, None, None),
}


def frame(stack_id: int, file: str, line: int, depth: int = 0, function: str = "<module>") -> dict:
    return {"stack_id": stack_id, "pid": PID, "depth": depth, "function": function,
            "qualname": function, "file": file, "line": line, "firstlineno": 1,
            "code_flags": 0, "lasti": 0}  # fmt: skip


@pytest.fixture
def trace_dir(tmp_path: Path) -> Path:
    events = [birth(10, 5, path="/srv/app/log", stack_id=1)]
    for child, (at, lived, program) in CHILDREN.items():
        events.append(fork(at, child))
        stack = 2 if program else 1  # every `<string>` frame at line 2 is one stack
        events.append(birth(at + 1000, 7, pid=child, tid=child, stack_id=stack))
        if program:  # a .pth line site.py exec()s at start-up: `<string>` too, not the program
            events.append(birth(at + 500, 8, pid=child, tid=child, stack_id=3))
        if lived is not None:
            events.append(exit_(at + lived, pid=child, tid=child))
    events.append(exit_(5 * SECOND))
    programs = {child: p for child, (_, _, p) in CHILDREN.items() if p}
    sources = source_rows(APP, APP_TEXT) + program_rows(programs)
    stacks = [frame(1, APP, 10), frame(2, "<string>", 2),
              frame(3, "<string>", 1), frame(3, "<frozen site>", 192, 1, "addpackage")]  # fmt: skip
    return write_trace(tmp_path / "t", events, stacks=stacks, sources=sources)


def test_children_that_lived_under_the_threshold_are_short_lived(trace_dir: Path) -> None:
    trace = load(trace_dir)
    assert sorted(trace.short_lived_leaks()["pid"]) == [201, 201, 202, 202, 203, 203]
    long_lived = trace.leaks()[~trace.short_lived().loc[trace.leaks().index].to_numpy()]
    assert sorted(long_lived["pid"]) == [PID, 204, 205]
    assert set(trace.short_lived_leaks(seconds=3)["pid"]) == {201, 202, 203, 204}
    assert trace.short_lived_leaks(seconds=0.05).empty


def test_each_c_program_is_a_site_of_its_own_with_its_line(trace_dir: Path) -> None:
    trace = load(trace_dir)
    sites = trace.sites(keep=trace.short_lived())
    leaking = sites[sites["leaked"] > 0]
    got = {(s.site_file, s.site_line, s.leaked, s.api) for s in leaking.itertuples()}
    assert got == {
        (program_file(LEAK_A), 2, 2, "os.open"),
        (program_file(LEAK_B), 2, 1, "os.pipe"),
        ("<string>", 1, 3, None),  # the .pth code of the three children: no program of theirs
    }
    assert trace.src.text(program_file(LEAK_A), 2) == LEAK_A.splitlines()[1]
    long_sites = trace.sites(keep=~trace.short_lived())
    assert list(long_sites.loc[long_sites["leaked"] > 0, "site_file"]) == [APP]


@pytest.mark.parametrize(
    "argv,program",
    [
        (["python3", "-c", "x=1"], "x=1"),
        (["/usr/bin/python3.11", "-I", "-Sc", "import os"], "import os"),
        (["python3", "-W", "ignore", "-c", "y"], "y"),
        (["python3", "-Wignore", "-cZ"], "Z"),
        (["python3", "-X", "dev", "-c", "q", "arg"], "q"),
        (["python3", "script.py", "-c", "no"], None),
        (["python3", "-m", "mod", "-c", "no"], None),
        (["bash", "-c", "ls"], None),
        ([], None),
    ],
)
def test_the_c_program_of_a_command_line(argv: list[str], program: str | None) -> None:
    assert command_program(argv) == program


def report(trace_dir: Path, tmp_path: Path, *args: str) -> tuple[int, str]:
    out = tmp_path / "report.out"
    code = main(["report", str(trace_dir), *args, "-o", str(out)])
    return code, out.read_text()


def test_every_format_lists_the_children_apart(trace_dir: Path, tmp_path: Path) -> None:
    code, text = report(trace_dir, tmp_path, "--fail-on-leak")
    assert code == 3  # the parent's leak and child 204's (lived 2 s) fail the gate
    lines = text.splitlines()
    section = lines.index(next(line for line in lines if line.startswith("short-lived")))
    assert lines[section].endswith("6 leaked fds in 3 processes, from 3 sites")
    ranked = [line for line in lines[:section] if line.startswith("#")]
    assert ranked[0].startswith("#1 3 leaked")  # the parent, 204 and 205
    assert """program: python -c "import os; fd = os.open('/etc/hosts', os.O_RDONLY)\"""" in text
    document = json.loads(report(trace_dir, tmp_path, "--format", "json")[1])
    flagged = sorted(leak["pid"] for leak in document["leaks"] if leak["short_lived"])
    assert flagged == [201, 201, 202, 202, 203, 203]
    programs = {p["text"]: (p["pids"], p["leaked"]) for p in document["short_lived"]["programs"]}
    assert programs == {LEAK_A.strip(): ([201, 202], 2), LEAK_B.strip(): ([203], 1)}
    html = report(trace_dir, tmp_path, "--format", "html")[1]
    assert html.index("id='sites'") < html.index("<h2>Short-lived processes</h2>")
    assert html.count("program: <code>python -c") == 2


def test_no_split_with_short_lived_zero(trace_dir: Path, tmp_path: Path) -> None:
    text = report(trace_dir, tmp_path, "--short-lived", "0")[1]
    assert "short-lived" not in text
    document = json.loads(report(trace_dir, tmp_path, "--format", "json", "--short-lived", "0")[1])
    assert not any(leak["short_lived"] for leak in document["leaks"])


def test_the_collector_keeps_a_running_processs_c_program() -> None:
    """Read from /proc/PID/cmdline of a real `python -c` process while it runs, stored as the
    program's file with the pid in its facts; a process without -c adds nothing."""
    program = "import sys\nsys.stdin.read()\n"
    child = subprocess.Popen([sys.executable, "-c", program], stdin=subprocess.PIPE)
    plain = subprocess.Popen([sys.executable, "-"], stdin=subprocess.PIPE)
    try:
        collector = SourceCollector()
        collector.note_program(child.pid)
        collector.note_program(plain.pid)
        collector.note_program(4242, argv=["python3", "-c", "pass"])  # as a backend read it
    finally:
        for process in (child, plain):
            process.communicate(b"")
    rows = collector.rows()
    files = {row["file"] for row in rows}
    assert files == {program_file(program), program_file("pass")}
    facts = next(r for r in rows if r["file"] == program_file(program) and r["line"] == 0)
    assert json.loads(facts["facts"])["pids"] == [child.pid]
    assert [r["text"] for r in rows if r["file"] == program_file(program) and r["line"]] == [
        "import sys", "sys.stdin.read()"]  # fmt: skip


def test_a_long_lived_programs_site_shows_its_program_and_stack(tmp_path: Path) -> None:
    """A `python -c` child that lives 2 s is long-lived: its site leads the report, with the
    program's line, its text, and its stack and fix under the program's file."""
    child = 301
    events = [birth(10, 5, path="/srv/app/log", stack_id=1), fork(100, child),
              birth(200, 7, pid=child, tid=child, stack_id=2),
              exit_(2 * SECOND + 100, pid=child, tid=child), exit_(3 * SECOND)]  # fmt: skip
    sources = source_rows(APP, APP_TEXT) + program_rows({child: LEAK_A})
    stacks = [frame(1, APP, 10), frame(2, "<string>", 2)]
    trace_dir = write_trace(tmp_path / "t", events, stacks=stacks, sources=sources)
    lines = report(trace_dir, tmp_path, "--top", "5")[1].splitlines()
    block = lines[lines.index(f"   opened at {program_file(LEAK_A)}:2 in <module>") :]
    assert block[1].endswith("| fd = os.open('/etc/hosts', os.O_RDONLY)")
    assert block[2].startswith("   program: python -c ")
    assert f"     {program_file(LEAK_A)}:2 in <module>" in block
    assert any(line.startswith(f"   fix: {program_file(LEAK_A)}:2: os.open: ") for line in block)
    assert not any(line.startswith("short-lived") for line in lines)
