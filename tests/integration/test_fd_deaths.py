"""Descriptor deaths: close, close_range, dup2/dup3 onto a live fd, exec with CLOEXEC and
non-CLOEXEC fds (O_CLOEXEC, fcntl F_SETFD, ioctl FIOCLEX/FIONCLEX, close_range CLOEXEC).

One traced run of fdops.py `deaths`: the target does each death, reports the fd numbers, then
execs itself (same pid) and waits. Ground truth is /proc/PID/fd before and after the exec.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from conftest import Session, proc_cloexec, proc_fds
from fdhelpers import ScenarioRun, scenario_run_fields, trace_scenario

# every test once per recorder: bpf, ptrace (root) and ptrace as nobody
pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("bpf_ready", "recorder")]

CLOSE_RANGE_CLOEXEC = 4


@dataclass
class DeathsRun(ScenarioRun):
    before_exec: dict  # fd -> link
    cloexec_before: dict  # fd -> bool
    after_exec: dict

    def leak_paths(self) -> set:
        return {leak["path"] for leak in self.leaks()}


def fds_around_exec(session: Session) -> tuple[dict, dict, dict]:
    """The target's fds (and their CLOEXEC bits) before it execs itself, and its fds after."""
    target = session.target
    before = proc_fds(target.pid)
    cloexec = {fd: proc_cloexec(target.pid, fd) for fd in before}
    target.send("exec")
    target.expect("exec-ready")
    return before, cloexec, proc_fds(target.pid)


@pytest.fixture(scope="module")
def deaths(cell_dir, bpf_ready) -> DeathsRun:
    session, (before, cloexec, after) = trace_scenario(
        "deaths", cell_dir, while_alive=fds_around_exec
    )
    return DeathsRun(
        **scenario_run_fields(session), before_exec=before, cloexec_before=cloexec, after_exec=after
    )


def test_close(deaths: DeathsRun):
    closes = deaths.ops("close")
    assert deaths.done["closed"] in set(closes.fd)
    assert deaths.done["paths"]["closed"] not in deaths.leak_paths()


def test_close_range_over_a_range(deaths: DeathsRun):
    ranged = deaths.done["close_range"]
    assert not set(ranged) & set(deaths.before_exec), "ground truth: close_range closed them"
    calls = deaths.ops("close_range")
    plain = calls[(calls.fd == 400) & (calls.arg == 410)]
    assert len(plain) == 1, calls
    assert not plain.iloc[0]["flags"] & CLOSE_RANGE_CLOEXEC
    assert deaths.done["paths"]["ranged"] not in deaths.leak_paths()


@pytest.mark.parametrize("call", ["dup2", "dup3"])
def test_dup_onto_a_live_fd_kills_the_old_file(deaths: DeathsRun, call: str):
    source, victim = deaths.done[call]["source"], deaths.done[call]["victim"]
    paths = deaths.done["paths"]
    births = deaths.ops("birth")
    reborn = births[(births.syscall == call) & (births.fd == victim)]
    assert len(reborn) == 1 and reborn.iloc[0].src_fd == source, reborn
    # the victim's original file died at the dup: it is no leak, whatever happens to its number
    assert paths[f"{call}_victim"] not in deaths.leak_paths()
    if call == "dup2":  # survives the exec: the fd number now holds the source's file
        assert deaths.after_exec[victim] == paths["dup2_source"]
        leak = next(x for x in deaths.leaks() if x["fd"] == victim)
        assert leak["path"] in (paths["dup2_source"], None)
    else:  # dup3 O_CLOEXEC: the copy dies at exec, its source survives
        assert victim not in deaths.after_exec and source in deaths.after_exec


@pytest.mark.parametrize(
    "name,syscall,cloexec",
    [
        ("C_fsetfd", "fcntl", True),
        ("D_fclear", "fcntl", False),
        ("E_fioclex", "ioctl", True),
        ("F_fionclex", "ioctl", False),
    ],
)
def test_cloexec_changes_are_recorded(deaths: DeathsRun, name: str, syscall: str, cloexec: bool):
    fd = deaths.done["cloexec"][name]["fd"]
    assert deaths.cloexec_before[fd] == cloexec, "ground truth from /proc/PID/fdinfo"
    changes = deaths.ops("cloexec")
    rows = changes[changes.fd == fd]
    assert len(rows) == 1, changes
    assert rows.iloc[0].syscall == syscall and bool(rows.iloc[0].cloexec) == cloexec


def test_close_range_cloexec_only_marks(deaths: DeathsRun):
    calls = deaths.ops("close_range")
    marking = calls[(calls.fd == 500) & (calls.arg == 502)]
    assert len(marking) == 1 and marking.iloc[0]["flags"] & CLOSE_RANGE_CLOEXEC, calls
    for name in ("G_range_cloexec", "H_range_cloexec", "I_range_cloexec"):
        fd = deaths.done["cloexec"][name]["fd"]
        assert fd in deaths.before_exec and deaths.cloexec_before[fd], "still open, marked"


def test_exec_closes_exactly_the_cloexec_fds(deaths: DeathsRun):
    assert len(deaths.ops("exec")) == 1
    for name, entry in deaths.done["cloexec"].items():
        fd, path = entry["fd"], deaths.done["paths"][name]
        assert deaths.before_exec[fd] == path
        if entry["dies"]:
            assert fd not in deaths.after_exec or deaths.after_exec[fd] != path, name
            assert path not in deaths.leak_paths(), f"{name} died at exec: no leak"
        else:
            assert deaths.after_exec[fd] == path, name
            leak = [x for x in deaths.leaks() if x["fd"] == fd]
            assert len(leak) == 1 and leak[0]["closed_by"] is None, (name, leak)


def test_leaks_are_exactly_the_fds_open_at_the_end(deaths: DeathsRun):
    alive = set(deaths.after_exec) - {0, 1, 2}  # stdio was open before the trace
    assert {leak["fd"] for leak in deaths.leaks()} == alive
