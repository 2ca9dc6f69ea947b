"""Every descriptor birth in DESIGN.md's list, made with the exact syscall, recorded as it happened.

One traced run of tests/programs/fd/fdops.py `births` makes every birth syscall (and a few that
fail) and keeps every fd open; the tracer is stopped while the target still lives. Ground truth
is what the target says the kernel returned, and /proc/PID/fd + fdinfo read by the test.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

import pytest
from conftest import Session, kind_from_link, proc_cloexec, proc_fds
from fdhelpers import ScenarioRun, scenario_run_fields, trace_scenario

# every test once per recorder: bpf, ptrace (root) and ptrace as nobody
pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("bpf_ready", "recorder")]

BIRTH_SYSCALLS = (
    "open", "openat", "openat2", "creat", "socket", "socketpair", "accept", "accept4", "pipe",
    "pipe2", "dup", "dup2", "dup3", "fcntl", "eventfd", "eventfd2", "epoll_create",
    "epoll_create1", "memfd_create", "signalfd", "signalfd4", "timerfd_create", "inotify_init",
    "inotify_init1", "fanotify_init", "pidfd_open", "pidfd_getfd", "userfaultfd",
    "perf_event_open", "recvmsg",
)  # fmt: skip

# births whose fd copies another (the dup family) or arrives from elsewhere
COPIES = ("dup", "dup2", "dup3", "fcntl", "recvmsg", "pidfd_getfd")


@dataclass
class BirthsRun(ScenarioRun):
    links: dict  # fd -> /proc readlink while the target lived
    cloexec: dict  # fd -> CLOEXEC bit from /proc fdinfo
    summary: str


def fds_held(session: Session) -> tuple[dict, dict]:
    """Ground truth while the target still holds them: each fd's link, and its CLOEXEC bit."""
    pid = session.target.pid
    born = [b["fd"] for b in session.done["births"] if b["fd"] >= 0]
    return proc_fds(pid), {fd: proc_cloexec(pid, fd) for fd in born}


@pytest.fixture(scope="module")
def births(cell_dir, bpf_ready) -> BirthsRun:
    session, (links, cloexec) = trace_scenario("births", cell_dir, while_alive=fds_held)
    return BirthsRun(
        **scenario_run_fields(session), links=links, cloexec=cloexec, summary=session.result.stdout
    )


def truth_for(run: BirthsRun, syscall: str) -> list[dict]:
    entries = [b for b in run.done["births"] if b["syscall"] == syscall]
    assert entries, f"the target made no {syscall}"
    refused = [b for b in entries if b["fd"] < 0]
    if refused:
        # the kernel refused it (not built in, or not permitted): then it must be a recorded
        # failure, and the birth itself cannot be tested on this machine
        code = refused[0]["errno"]
        assert_failure_recorded(run, syscall, code)
        pytest.skip(f"this kernel refused {syscall}: {errno.errorcode.get(code, code)}")
    return entries


def births_of(run: BirthsRun, syscall: str):
    births = run.ops("birth")
    return births[births.syscall == syscall]


def truth_and_rows(run: BirthsRun, syscall: str) -> list[tuple[dict, object]]:
    """Each birth of `syscall` the target reported, with the row recorded for its fd."""
    recorded = births_of(run, syscall)
    pairs = []
    for truth in truth_for(run, syscall):
        rows = recorded[recorded.fd == truth["fd"]]
        assert len(rows) == 1, f"{syscall} fd {truth['fd']}: {len(rows)} birth rows"
        pairs.append((truth, rows.iloc[0]))
    return pairs


def assert_failure_recorded(run: BirthsRun, syscall: str, code: int) -> None:
    fails = run.ops("fail")
    fails = fails[fails.syscall == syscall]
    assert code in set(fails.errno), f"no failed {syscall} with errno {code}:\n{fails}"


@pytest.mark.parametrize("syscall", BIRTH_SYSCALLS)
def test_birth_recorded_with_fd_kind_and_cloexec(births: BirthsRun, syscall: str):
    recorded = births_of(births, syscall)
    assert sorted(recorded.fd) == sorted(b["fd"] for b in truth_for(births, syscall)), recorded
    for truth, row in truth_and_rows(births, syscall):
        link = births.links[truth["fd"]]
        want_kind = kind_from_link(link)
        if syscall in COPIES:
            # the kernel records what happened; the copy's kind is the analysis' to derive
            # (from its source: see test_report_lists_exactly_the_fds_left_open)
            assert row.kind in (want_kind, "unknown"), (row.kind, link)
        else:
            assert row.kind == want_kind, (row.kind, link)
        assert bool(row.cloexec) == births.cloexec[truth["fd"]], f"cloexec of fd {truth['fd']}"
        assert row.tid > 0 and row.errno == 0


@pytest.mark.parametrize("syscall", ["open", "openat", "openat2", "creat"])
def test_file_births_carry_the_path(births: BirthsRun, syscall: str):
    for truth, row in truth_and_rows(births, syscall):
        assert row.path == truth["path"] == births.links[truth["fd"]]


@pytest.mark.parametrize("syscall", ["pipe", "pipe2", "socketpair"])
def test_pair_births_name_their_peer(births: BirthsRun, syscall: str):
    for truth, row in truth_and_rows(births, syscall):
        assert row.src_fd == truth["src_fd"]


@pytest.mark.parametrize("syscall", ["dup", "dup2", "dup3", "fcntl"])
def test_dup_births_name_their_source(births: BirthsRun, syscall: str):
    for truth, row in truth_and_rows(births, syscall):
        assert row.src_fd == truth["src_fd"]


def test_failed_calls_are_failures_not_births(births: BirthsRun):
    fails = births.ops("fail")
    for truth in births.done["fails"]:
        assert_failure_recorded(births, truth["syscall"], truth["errno"])
    assert (fails.fd == -1).all(), fails
    # every birth row is one the kernel really returned: no failure slipped in as a birth
    recorded = births.ops("birth")
    real = {(b["syscall"], b["fd"]) for b in births.done["births"] if b["fd"] >= 0}
    assert set(zip(recorded.syscall, recorded.fd)) == real


@pytest.mark.parametrize("call", ["bind", "connect"])
def test_socket_addresses(births: BirthsRun, call: str):
    addrs = births.ops("addr")
    recorded = dict(zip(addrs.fd, addrs.path))
    expected = [a for a in births.done["addresses"] if a["call"] == call]
    assert any(a["address"].startswith("127.0.0.1:") for a in expected)
    assert any(a["address"].startswith("/") for a in expected)  # unix path
    for truth in expected:
        # a bind to port 0 may show the argument (127.0.0.1:0) or the port the kernel chose
        assert recorded.get(truth["fd"]) in (truth["address"], truth.get("given")), addrs


def test_report_lists_exactly_the_fds_left_open(births: BirthsRun):
    """Every fd born during the trace is still open at its end: each one is a leak, and nothing
    else is (stdio and other pre-existing fds never are)."""
    leaks = births.leaks()
    assert births.report["lost_events"] == 0
    born = {b["fd"] for b in births.done["births"] if b["fd"] >= 0}
    assert born <= set(births.links), "ground truth: the target still holds every fd it made"
    assert sorted(leak["fd"] for leak in leaks) == sorted(born)
    arrived = {b["fd"] for b in births.done["births"] if b["syscall"] in ("recvmsg", "pidfd_getfd")}
    for leak in leaks:
        assert leak["closed_by"] is None  # still open when the trace ended
        assert leak["kind"] == kind_from_link(births.links[leak["fd"]]) or leak["fd"] in arrived
    socket_leak = next(leak for leak in leaks if leak["path"] and "127.0.0.1:" in leak["path"])
    assert socket_leak["kind"] == "socket"


def test_summary_groups_leaks_by_kind(births: BirthsRun):
    for kind in ("socket", "pipe", "eventfd", "file"):
        assert kind in births.summary, births.summary


def test_report_json_follows_the_contract(births: BirthsRun):
    report = births.report
    assert report["schema"] == 1 and report["trace"]["status"] == "complete"
    assert {"leaks", "warnings", "sites", "lost_events"} <= set(report)
    contract = {"pid", "tid", "fd", "kind", "path", "opened_ns", "closed_by", "stack", "site"}
    contract |= {"with", "cause"}
    for leak in births.leaks():
        assert contract <= set(leak), sorted(contract - set(leak))
        assert leak["tid"] == births.pid  # the target is single-threaded
        assert isinstance(leak["opened_ns"], int) and leak["opened_ns"] >= 0
