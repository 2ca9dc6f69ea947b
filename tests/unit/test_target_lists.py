"""Several targets: -p lists, --pgrep matching as pgrep -f does, cmtrace's own family left out,
and the usage errors of --all/--pgrep. Real processes and /proc, no mocks."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cmtrace.errors import UsageError
from cmtrace.record import joining
from cmtrace.record.options import RecordOptions


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (["12"], (12,)),
        (["12,13", "14"], (12, 13, 14)),
        (["12, 13", "12"], (12, 13)),  # each once, in the order given
    ],
)
def test_pid_lists(values, expected):
    assert joining.parse_pids(values) == expected


@pytest.mark.parametrize("bad", ["", "12,", "abc", "0", "-3", "1.5"])
def test_bad_pid_lists_are_usage_errors(bad):
    with pytest.raises(UsageError, match="give process ids"):
        joining.parse_pids([bad])


def test_command_line_matches_like_pgrep_f():
    raw = b"/usr/bin/python3\0-m\0uvicorn\0app:main\0--workers\x004\0"
    assert joining.command_line_text(raw) == "/usr/bin/python3 -m uvicorn app:main --workers 4"
    pattern = joining.compile_pattern(r"uvicorn app:\w+")
    assert joining.cmdline_matches(pattern, raw)  # across argument boundaries, as pgrep -f
    assert not joining.cmdline_matches(joining.compile_pattern("^uvicorn"), raw)
    assert not joining.cmdline_matches(pattern, b"")  # a kernel thread or a zombie
    assert not joining.cmdline_matches(pattern, None)


def test_bad_pattern_is_a_usage_error():
    with pytest.raises(UsageError, match="not a regular expression"):
        RecordOptions(pgrep="worker[").validate()


@pytest.mark.parametrize(
    "options",
    [
        RecordOptions(all_python=True, pid=1),
        RecordOptions(all_python=True, pgrep="x"),
        RecordOptions(all_python=True, command=("true",)),
        RecordOptions(all_python=True, backend="ptrace"),
    ],
)
def test_all_refuses_other_targets_and_ptrace(options):
    with pytest.raises(UsageError, match="--all"):
        options.validate()


def test_attach_pids_keep_order_and_drop_repeats():
    assert RecordOptions(pid=5, pids=(7, 5, 9)).attach_pids == (5, 7, 9)


def test_pgrep_finds_a_real_process_and_never_cmtraces_family():
    tag = f"cmtrace-unit-{os.getpid()}-target"
    # a process started here is a child of this one: it stands for cmtrace's own child
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()", tag],
                             stdin=subprocess.PIPE)  # fmt: skip
    try:
        processes = joining.scan()
        assert child.pid in processes and processes[child.pid].ppid == os.getpid()
        family = joining.own_family(processes, os.getpid())
        assert {os.getpid(), os.getppid(), child.pid} <= family
        selector = joining.Selector(pattern=joining.compile_pattern(tag))
        assert selector.wants(child.pid)
        assert not selector.wants(os.getpid())  # this command line has no tag
        # seen from a sibling (standing for a cmtrace started beside it), it is a target
        sibling = subprocess.Popen(["sleep", "30"])
        try:
            family = joining.own_family(joining.scan(), sibling.pid)
            assert os.getpid() in family and child.pid not in family
        finally:
            sibling.kill()
            sibling.wait()
        assert joining.python_image(child.pid)
        assert not joining.python_image(1) or "python" in os.readlink("/proc/1/exe")
    finally:
        child.communicate(b"")
