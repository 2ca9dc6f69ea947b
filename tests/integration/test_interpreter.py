"""Interpreter discovery, layouts and the user-space walker on every interpreter found here.

Each target runs tests/programs/py/blocked_threads.py (two threads blocked in syscalls with the
GIL released); the walker must name every expected function and `# MARK` line, innermost first.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest
import targets

from cmtrace.interp import discover, walker

FOUND, MISSING = targets.discover()
print("\nwalker targets:", ", ".join(t.name for t in FOUND) or "none")
for reason in MISSING:
    print("walker target not run:", reason)

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="reading /proc/PID/mem of another process needs root"
)


def wait_blocked_in_stdin_read(pid: int, timeout: float = 10.0) -> None:
    """ "ready" is printed just before the read(0, ...) the test expects the stack to be in."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/syscall") as f:
            if f.read().startswith("0 0x0 "):  # read(0, ...)
                return
        time.sleep(0.005)
    raise AssertionError("the target never blocked in read(0)")


@pytest.fixture(params=FOUND, ids=[t.name for t in FOUND])
def blocked(request):
    target = request.param
    proc = subprocess.Popen(
        [target.command, target.program("blocked_threads.py")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout.readline() == b"ready\n"
    wait_blocked_in_stdin_read(proc.pid)
    yield target, proc
    proc.stdin.close()
    assert proc.wait(timeout=30) == 0


@needs_root
def test_discovery_names_version_and_layout_source(blocked):
    target, proc = blocked
    found = discover.find_interpreter(proc.pid)
    minor = int(target.name.rsplit(".", 1)[1])
    assert found.layout.minor == minor
    assert found.version.startswith(f"3.{minor}")
    assert found.layout.source == ("_Py_DebugOffsets" if minor >= 13 else "table")
    assert walker.validate(found) >= 9


@needs_root
def test_snapshot_gives_each_thread_its_own_stack(blocked):
    target, proc = blocked
    mark = targets.marks("blocked_threads.py")
    program = target.program("blocked_threads.py")
    snapshot = walker.snapshot_threads(proc.pid)
    assert set(snapshot) == {int(t) for t in os.listdir(f"/proc/{proc.pid}/task")}
    main = snapshot[proc.pid]
    assert [(f["function"], f["file"], f["line"]) for f in main] == [
        ("inner", program, mark["inner"]),
        ("middle", program, mark["middle"]),
        ("outer", program, mark["outer"]),
        ("<module>", program, mark["module"]),
    ]
    (worker,) = [frames for tid, frames in snapshot.items() if tid != proc.pid]
    assert [(f["function"], f["line"]) for f in worker[:2]] == [
        ("ticker", mark["gen-block"]),
        ("worker", mark["worker"]),
    ]
    assert worker[0]["code_flags"] & 0x20  # CO_GENERATOR: the analysis needs it
    assert not worker[1]["code_flags"] & 0x20
    assert worker[-1]["function"] == "_bootstrap"


@needs_root
def test_non_python_process_is_refused_with_a_reason():
    proc = subprocess.Popen(["sleep", "30"])
    try:
        with pytest.raises(discover.NotPython, match="not CPython"):
            discover.find_interpreter(proc.pid)
    finally:
        proc.kill()
        proc.wait()
