"""`cmtrace run -- python -c "import os; os.open('/etc/hostname', 0)"` on every interpreter,
run directly, by a shell, and in its own pid and mount namespace.

The program opens a file on its first line and exits within milliseconds: the leak must still
be reported at `<string>` line 1 (issue 4). `cmtrace run` stops its command at each exec until
the new image's layout is loaded, and code records travel with the stack, so nothing depends
on the process still being alive when the trace is read. Followed processes that exec a
python* image are held the same way, so the interpreter may also be a grandchild.
"""

from __future__ import annotations

import re
import shlex

import pytest
import targets
from conftest import report_json, run_cmtrace

pytestmark = pytest.mark.usefixtures("backend")  # every test: once per recorder backend

FOUND, MISSING = targets.discover()  # Debian's /usr/bin/python3.11 included, where present
ONE_LINER = "import os; os.open('/etc/hostname', 0)"


def is_command_program(file: str) -> bool:
    """A `python -c` program's file: `<string>#DIGEST` when the recorder captured its text
    (each program a site of its own), plain `<string>` otherwise."""
    return re.fullmatch(r"<string>(#[0-9a-f]{8})?", file) is not None


def test_interpreters_found():
    print("ran on:", ", ".join(t.name for t in FOUND))
    print("could not run:", "; ".join(MISSING) or "none")
    assert FOUND


def one_liner_leak(trace, *command: str) -> dict:
    """Record `command` (which runs the one-liner somewhere); the one leak of /etc/hostname."""
    result = run_cmtrace("run", "-q", "-o", str(trace), "--", *command)
    assert result.returncode == 0, result.stderr
    leaks = [leak for leak in report_json(trace)["leaks"] if leak["path"] == "/etc/hostname"]
    assert len(leaks) == 1, leaks
    site = leaks[0]["site"]
    assert is_command_program(site["file"]) and site["line"] == 1, leaks[0]
    assert leaks[0]["closed_by"] == "process-exit"
    return leaks[0]


@pytest.mark.parametrize("target", FOUND, ids=[t.name for t in FOUND])
def test_one_liner_leak_has_its_line(bpf_ready, tmp_path, target):
    one_liner_leak(tmp_path / "trace", target.command, "-c", ONE_LINER)


@pytest.mark.parametrize("target", FOUND, ids=[t.name for t in FOUND])
def test_one_liner_started_by_a_shell(bpf_ready, tmp_path, target):
    """The interpreter is the shell's child (`; true` keeps the shell from exec'ing it)."""
    script = f"{shlex.quote(target.command)} -c {shlex.quote(ONE_LINER)}; true"
    leak = one_liner_leak(tmp_path / "trace", "sh", "-c", script)
    assert leak["pid"] != 0


FORK_LINER = (
    "import os\nif os.fork() == 0:\n    os.open('/etc/hostname', 0)\n    os._exit(0)\nos.wait()"
)


@pytest.mark.parametrize("target", FOUND, ids=[t.name for t in FOUND])
def test_forked_child_that_exits_at_once(bpf_ready, tmp_path, target):
    """A fork()ed child opens and leaves within a millisecond: it inherits its parent's walker
    configuration in the kernel, so its leak still has its line (3 of the -c program)."""
    trace = tmp_path / "trace"
    result = run_cmtrace("run", "-q", "-o", str(trace), "--", target.command, "-c", FORK_LINER)
    assert result.returncode == 0, result.stderr
    report = report_json(trace)
    leaks = [leak for leak in report["leaks"] if leak["path"] == "/etc/hostname"]
    assert len(leaks) == 1, leaks
    site = leaks[0]["site"]
    assert is_command_program(site["file"]) and site["line"] == 3, leaks[0]
    parent = report["trace"]["targets"][0]["pid"]
    assert leaks[0]["pid"] != parent


@pytest.mark.parametrize("target", FOUND, ids=[t.name for t in FOUND])
def test_one_liner_in_its_own_pid_namespace(bpf_ready, tmp_path, target):
    """`unshare --pid --fork --mount-proc` (the sid interpreters also chroot): the leak has the
    host pid and, as the report contract says, the pid 1 the program knows itself by."""
    command = ["unshare", "--pid", "--fork", "--mount-proc", target.command, "-c", ONE_LINER]
    leak = one_liner_leak(tmp_path / "trace", *command)
    assert leak["pid"] != 1 and leak.get("ns_pid") == 1, leak
