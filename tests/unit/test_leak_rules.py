"""Issue 13's smaller rules, on hand-built traces: stdio closed by exit, atexit closes, dup
copies' kind and path, the site of finalizer warnings, missing-stack reasons counted.

Each trace states what the kernel would have recorded; the expectation is what the issue says
a reader should be told about it.
"""

from __future__ import annotations

from pathlib import Path

from tracebuild import PID, birth, close, exit_, write_trace

from cmtrace.analysis import load
from cmtrace.analysis.api import count_reasons
from cmtrace.present.common import caveats
from cmtrace.trace.sources import source_rows

APP = "/srv/app/main.py"
LOGGING = "/usr/lib/python3.11/logging/__init__.py"
TEMPFILE = "/usr/lib/python3.11/tempfile.py"
TEST_FILE = "/usr/lib/python3.11/test/test_subprocess.py"  # CPython's own test suite


def frames(stack_id: int, *rows: tuple[str, str, int]) -> list[dict]:
    """Stack rows (function, file, line), innermost first."""
    return [
        {"stack_id": stack_id, "pid": PID, "depth": depth, "function": function.rsplit(".")[-1],
         "qualname": function, "file": file, "line": line, "firstlineno": 1, "code_flags": 0,
         "lasti": 0}
        for depth, (function, file, line) in enumerate(rows)
    ]  # fmt: skip


def test_stdio_closed_by_its_process_exit_is_never_a_leak(tmp_path: Path) -> None:
    """The root process dup2's a log file onto its stdout: fd 1 is released by exit, as every
    process's stdio is, and is not a leak; fd 7, opened the same way, is."""
    events = [
        birth(10, 5, path="/srv/app/out.log", stack_id=0),
        birth(11, 1, syscall="dup2", kind="unknown", path=None, src_fd=5),
        close(12, 5),
        birth(13, 7, path="/srv/app/other.log"),
        exit_(20),
    ]
    fds = load(write_trace(tmp_path / "t", events)).fds.set_index("fd")
    assert not fds.loc[1, "leak"] and fds.loc[1, "death"] == "process-exit"
    assert fds.loc[7, "leak"]


def test_a_dup_takes_the_kind_and_path_of_its_source(tmp_path: Path) -> None:
    """dup2(5, 1), dup(1) -> 9, fcntl(F_DUPFD) of 9 -> 12: each copy is the file fd 5 opened."""
    events = [
        birth(10, 5, path="/srv/app/out.log"),
        birth(11, 1, syscall="dup2", kind="unknown", path=None, src_fd=5),
        birth(12, 9, syscall="dup", kind="unknown", path=None, src_fd=1),
        birth(13, 12, syscall="fcntl", kind="unknown", path=None, src_fd=9),
        birth(14, 4, syscall="dup", kind="unknown", path=None, src_fd=3),  # source never seen
        exit_(20),
    ]
    fds = load(write_trace(tmp_path / "t", events)).fds.set_index("fd")
    for fd in (1, 9, 12):
        assert (fds.loc[fd, "kind"], fds.loc[fd, "path"]) == ("file", "/srv/app/out.log"), fd
    assert fds.loc[4, "kind"] == "unknown"


def test_fds_closed_by_atexit_handlers_are_released_only_at_shutdown(tmp_path: Path) -> None:
    """logging.shutdown (an atexit handler) closing a handler's file made per request: to the
    program it lived until the end, so it is a leak closed by `atexit`; a handler closed by
    the program itself is not."""
    stacks = (
        frames(1, ("FileHandler.__init__", LOGGING, 1180), ("handle", APP, 5))
        + frames(2, ("FileHandler.close", LOGGING, 1190), ("shutdown", LOGGING, 2190))
        + frames(3, ("FileHandler.close", LOGGING, 1190), ("handle", APP, 8))
    )  # fmt: skip
    events = [
        birth(10, 3, path="/srv/app/req.log", stack_id=1),
        birth(11, 4, path="/srv/app/req.log", stack_id=1),
        close(12, 4, stack_id=3),
        close(30, 3, stack_id=2),
        exit_(40),
    ]
    trace = load(write_trace(tmp_path / "t", events, stacks=stacks))
    fds = trace.fds.set_index("fd")
    assert fds.loc[3, "leak"] and fds.loc[3, "closed_by"] == "atexit"
    assert not fds.loc[4, "leak"] and fds.loc[4, "death"] == "close"


def test_warnings_and_leaks_of_cpythons_test_suite_name_the_test_line(tmp_path: Path) -> None:
    """Under `python -m test`, the test files live in the standard library's directory; the fd
    tempfile opened for a test is told at the test's line, not at tempfile.py's."""
    stacks = frames(1, ("_mkstemp_inner", TEMPFILE, 256), ("mkstemp", TEMPFILE, 357),
                    ("TestCase.test_pipes", TEST_FILE, 42))  # fmt: skip
    stacks += frames(2, ("TestCase.test_pipes", TEST_FILE, 43))  # drops the last reference
    text = "\n" * 41 + "        f = open(tempfile.mkstemp()[1])\n        f = None\n"
    events = [
        birth(10, 3, path="/tmp/tmpab", stack_id=1),
        close(11, 3, stack_id=2),  # a finalizer close: a warning
        birth(12, 4, path="/tmp/tmpcd", stack_id=1),  # a leak
        exit_(20),
    ]
    trace = load(write_trace(tmp_path / "t", events, stacks=stacks,
                             sources=source_rows(TEST_FILE, text)))  # fmt: skip
    (site,) = trace.sites().itertuples(index=False)
    assert (site.site_file, site.site_line, site.leaked) == (TEST_FILE, 42, 1)
    assert trace.sites()["api"].tolist() == ["tempfile.mkstemp"]
    assert trace.warnings() == [{"kind": "finalizer-close", "count": 1, "site": {
        "file": TEST_FILE, "line": 42, "function": "TestCase.test_pipes"}}]  # fmt: skip


def test_missing_stack_reasons_are_counted_per_reason_on_one_line(tmp_path: Path) -> None:
    reasons = {str(pid): "the process exited before running Python" for pid in range(200, 600)}
    reasons["150"] = "not CPython (no _PyRuntime in the executable or a libpython)"
    trace = load(write_trace(tmp_path / "t", [exit_(10)],
                             degraded={"no_python_stacks": reasons}))  # fmt: skip
    (line,) = [c for c in caveats(trace) if c.startswith("no Python stacks")]
    assert line == (
        "no Python stacks: the process exited before running Python (400 processes); "
        "not CPython (no _PyRuntime in the executable or a libpython) (1 process)"
    )
    assert count_reasons(["pid 12 exited", "pid 13 exited"]) == "exited (2 processes)"
    assert count_reasons(["not CPython"]) == "not CPython"
    assert count_reasons([f"cannot read /proc/{pid}/exe: Permission denied"
                          for pid in (25659, 25660)]) == (
        "cannot read /proc/PID/exe: Permission denied (2 processes)")  # fmt: skip


def test_reasons_of_processes_gone_are_one_kind_and_long_ones_their_head() -> None:
    # what a CPython test-suite run recorded (80 `sh -c` children gone before they were read)
    reasons = [f"cannot read /proc/{pid}/maps: No such file or directory" for pid in range(80)]
    reasons += ["not CPython (no _PyRuntime in the executable or a libpython)"] * 2
    reasons += ["layout mismatch: walking the live stacks failed: [Errno 3] No such process: "
                "'/proc/10400/mem'", "cannot read the target's memory: No such file or directory",
                "no CPython runtime appeared",
                "layout mismatch: the thread states of this interpreter do not match the layout "
                "of CPython 3.11 (tstate.next at 0x8 is not a pointer)"]  # fmt: skip
    assert count_reasons(reasons) == (
        "exited before its interpreter was read (82 processes); "
        "not CPython (no _PyRuntime in the executable or a libpython) (2 processes); "
        "layout mismatch (1 process); no CPython runtime appeared (1 process)"
    )
