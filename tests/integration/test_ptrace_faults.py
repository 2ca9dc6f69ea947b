"""The ptrace backend's faults (issue 11): what tracing must never change in the target.

Real processes, no mocks, each checked against the program's own knowledge, /proc/PID and a
bare run of the same program:
- detaching (Ctrl-C, --duration) while threads are blocked in accept() and read(): the calls
  complete when their peers come, no EINTR reaches the program (libc calls made through ctypes
  would see one), TracerPid is 0 and later fd syscalls work;
- signals interrupting traced syscalls (interval timers with SA_RESTART handlers and without,
  while the program blocks in read/accept/recvmsg/open of a FIFO/select/sleep): the program's
  results equal a bare run's, and the trace's open fds equal /proc/PID/fd;
- vfork + exec (os.posix_spawn, subprocess with close_fds) under `run -f`;
- job control: SIGSTOP/SIGCONT of the traced command stops it for real and the trace goes on;
- SCM_RIGHTS fd passing and close_range.
(tracer kill -9, EPERM and the engine's death with cmtrace: test_ptrace_backend.py.)
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    EXIT_TIMEOUT,
    FDPROGRAMS,
    TARGET_PYTHON,
    Target,
    Tracer,
    cmtrace_argv,
    kind_from_link,
    read_events,
    read_meta,
    report_json,
    wait_until,
)

PTRACE = ("--backend", "ptrace")
NR = {"read": 0, "accept": 43, "accept4": 288}  # x86_64, as /proc/PID/task/TID/syscall shows


def program(name: str) -> str:
    return str(FDPROGRAMS / name)


def status_field(pid: int, field: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def tracers_of(pid: int) -> dict[int, int]:
    """TracerPid of every thread of pid."""
    return {int(tid): int(status_field(int(tid), "TracerPid"))
            for tid in os.listdir(f"/proc/{pid}/task")}  # fmt: skip


def all_traced(pid: int) -> bool:
    """Every thread of pid has the same tracer."""
    tracers = set(tracers_of(pid).values())
    return len(tracers) == 1 and 0 not in tracers


def syscall_of(pid: int, tid: int) -> int | None:
    """The syscall the thread is blocked in (None: running, or not in a syscall)."""
    try:
        fields = Path(f"/proc/{pid}/task/{tid}/syscall").read_text().split()
    except OSError:
        return None
    return int(fields[0]) if fields and fields[0].lstrip("-").isdigit() else None


def leaks_by_fd(trace: Path, pid: int) -> dict[int, dict]:
    return {leak["fd"]: leak for leak in report_json(trace)["leaks"] if leak["pid"] == pid}


def assert_open_fds_match(trace: Path, pid: int, fds: dict[str, str], before: dict[str, str]):
    """The fds the trace leaves open in pid (its leaks) are those /proc/PID/fd shows that were
    not there before the trace, each of the kind the kernel links it to."""
    expected = {int(fd): link for fd, link in fds.items() if fd not in before}
    leaks = leaks_by_fd(trace, pid)
    assert set(leaks) == set(expected), (sorted(leaks), expected)
    for fd, link in expected.items():
        assert leaks[fd]["kind"] in (kind_from_link(link), "unknown"), (fd, link, leaks[fd])


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


# ---- 1. detach while threads are blocked in accept() and read() -----------------------------
BLOCKED_CALLS = {"python-accept": {NR["accept"], NR["accept4"]}, "raw-accept": {NR["accept"]},
                 "python-read": {NR["read"]}, "raw-read": {NR["read"]}}  # fmt: skip


@pytest.fixture
def blocked_target(workdir: Path) -> Iterator[Target]:
    target = Target([TARGET_PYTHON, program("blocked.py")], workdir)
    yield target
    target.kill()


def wait_blocked(pid: int, tids: dict[str, int]) -> None:
    """Every thread sits in its blocking syscall (in the kernel, not on its way there)."""
    for who, tid in tids.items():
        calls = BLOCKED_CALLS[who]
        wait_until(lambda t=tid, c=calls: syscall_of(pid, t) in c, 30, f"{who} to block")


def wake_everyone(ready: dict) -> dict[str, bytes]:
    """Be each blocked thread's peer: connect and send, or write into its pipe (opened anew
    through /proc, as another process would). Returns what each must have received."""
    sent = {}
    for who, port in ready["ports"].items():
        sent[who] = f"hello {who}".encode()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as peer:
            peer.sendall(sent[who])
    for who, fd in ready["pipes"].items():
        sent[who] = f"bytes for {who}".encode()
        with open(f"/proc/{ready['pid']}/fd/{fd}", "wb", buffering=0) as pipe:
            pipe.write(sent[who])
    return sent


def assert_blocked_calls_complete(target: Target, ready: dict) -> None:
    sent = wake_everyone(ready)
    woke = {}
    for _ in sent:
        message = target.expect("woke", timeout=30)
        woke[message["who"]] = message
    for who, data in sent.items():
        assert woke[who]["ok"] and woke[who]["data"] == data.decode(), woke[who]
    target.send("check")
    checked = target.expect("checked")
    assert checked["ok"] is True, checked


@pytest.mark.parametrize("detach", ["ctrl-c", "duration"])
def test_detach_while_blocked_in_accept_and_read(workdir, blocked_target, detach):
    ready = blocked_target.expect("ready")
    pid = ready["pid"]
    wait_blocked(pid, ready["tids"])
    duration = ("--duration", "3") if detach == "duration" else ()
    trace = workdir / f"trace-{detach}"
    tracer = Tracer(["-p", str(pid), *PTRACE, "-o", str(trace), *duration], cwd=workdir)
    try:
        tracer.wait_attached()
        wait_until(lambda: all_traced(pid), 30, "every thread to be seized")
        wait_blocked(pid, ready["tids"])  # back in their calls, under the tracer now
        result = tracer.wait(EXIT_TIMEOUT) if duration else tracer.stop(signal.SIGINT)
    finally:
        tracer.kill()
    assert result.returncode == 0, result.stderr
    assert tracers_of(pid) == dict.fromkeys(tracers_of(pid), 0)
    assert status_field(pid, "State")[0] == "S", status_field(pid, "State")  # still blocked
    wait_blocked(pid, ready["tids"])
    assert_blocked_calls_complete(blocked_target, ready)
    meta = read_meta(trace)
    assert meta["status"] == "complete" and meta["backend"] == "ptrace", meta


# ---- 2. signals interrupting traced syscalls ------------------------------------------------
SIGNAL_MODES = ("restart", "interrupt")  # SA_RESTART handlers, and handlers without it


def done_of(stdout: str) -> dict:
    return next(json.loads(line) for line in stdout.splitlines() if '"done"' in line)


def behaviour(done: dict) -> list[tuple[str, str, bool]]:
    """What the program saw: each call's result, and whether libc handed it an EINTR (how many
    depends on timing; whether any does not)."""
    return [(r["op"], r["result"], r["eintr"] > 0) for r in done["results"]]


@pytest.fixture(scope="module")
def bare_signal_runs() -> dict[str, dict]:
    """The programs' results untraced, once per mode."""
    runs = {}
    for mode in SIGNAL_MODES:
        result = subprocess.run([TARGET_PYTHON, program("sigops.py"), mode, "run"],
                                capture_output=True, text=True, timeout=EXIT_TIMEOUT)  # fmt: skip
        assert result.returncode == 0, result.stderr
        runs[mode] = done_of(result.stdout)
    return runs


@pytest.mark.parametrize("mode", SIGNAL_MODES)
def test_signals_interrupting_syscalls_under_run(workdir, bare_signal_runs, mode):
    trace = workdir / f"trace-{mode}"
    result = subprocess.run(
        [*cmtrace_run(trace), TARGET_PYTHON, program("sigops.py"), mode, "run"],
        capture_output=True, text=True, timeout=EXIT_TIMEOUT, cwd=workdir,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    done = done_of(result.stdout)
    assert done["signals"] > 0
    assert behaviour(done) == behaviour(bare_signal_runs[mode])
    assert_open_fds_match(trace, done["pid"], done["fds"], before=done["start_fds"])
    assert_lossless(trace)


@pytest.mark.parametrize("mode", SIGNAL_MODES)
def test_signals_interrupting_syscalls_under_attach(workdir, bare_signal_runs, mode):
    target = Target([TARGET_PYTHON, program("sigops.py"), mode, "serve"], workdir)
    trace = workdir / f"trace-attach-{mode}"
    try:
        ready = target.expect("ready")
        tracer = Tracer(["-p", str(target.pid), *PTRACE, "-o", str(trace)], cwd=workdir)
        tracer.wait_attached()
        target.send("go")
        done = target.expect("done", timeout=EXIT_TIMEOUT)
        stopped = tracer.stop(signal.SIGINT)
        assert stopped.returncode == 0, stopped.stderr
        assert target.finish() == 0, target.stderr_text()
    finally:
        target.kill()
    assert behaviour(done) == behaviour(bare_signal_runs[mode])
    assert_open_fds_match(trace, done["pid"], done["fds"], before=ready["fds"])
    assert_lossless(trace)


@pytest.mark.parametrize("after_s", [0.05, 0.2, 0.35])
@pytest.mark.parametrize("mode", SIGNAL_MODES)
def test_detach_in_a_signal_storm(workdir, bare_signal_runs, mode, after_s):
    """Ctrl-C while the calls are being interrupted every 2 ms: the program still sees what
    a bare run sees (no EINTR let through to a restarting read, no signal lost or doubled so
    that a call hangs or returns early)."""
    target = Target([TARGET_PYTHON, program("sigops.py"), mode, "serve"], workdir)
    try:
        target.expect("ready")
        tracer = Tracer(["-p", str(target.pid), *PTRACE, "-o", str(workdir / "trace")],
                        cwd=workdir)  # fmt: skip
        tracer.wait_attached()
        target.send("go")
        time.sleep(after_s)  # the storm runs for about 0.5 s: detach somewhere in it
        assert tracer.stop(signal.SIGINT).returncode == 0
        done = target.expect("done", timeout=EXIT_TIMEOUT)
        assert set(tracers_of(target.pid).values()) == {0}
        assert target.finish() == 0, target.stderr_text()
    finally:
        target.kill()
    assert behaviour(done) == behaviour(bare_signal_runs[mode])


def cmtrace_run(trace: Path, *options: str) -> list[str]:
    return cmtrace_argv("run", *PTRACE, "-o", str(trace), *options, "--")


def assert_lossless(trace: Path) -> dict:
    meta = read_meta(trace)
    assert meta["status"] == "complete" and meta["lost_events"] == 0, meta
    assert meta["backend"] == "ptrace" and meta["backend_stats"]["dropped"] == 0, meta
    return meta


# ---- 3. vfork + exec ------------------------------------------------------------------------
CLONE_VFORK = 0x4000
SPAWNED_FD = 7  # spawns.py's posix_spawn file action


def marked_line(path: str, marker: str) -> int:
    lines = Path(path).read_text().splitlines()
    return next(n for n, line in enumerate(lines, 1) if f"# {marker}" in line)


def messages(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_vfork_children_under_run(workdir):
    """posix_spawn (clone with CLONE_VFORK) and subprocess (vfork, close_range): each child's
    fd syscalls before its exec, the exec, its own leaks and its exit are recorded; the parent
    goes on, and its stacks (at the spawns and after) are whole."""
    spawns = program("spawns.py")
    trace = workdir / "trace-vfork"
    result = subprocess.run([*cmtrace_run(trace), TARGET_PYTHON, spawns], capture_output=True,
                            text=True, timeout=EXIT_TIMEOUT, cwd=workdir)  # fmt: skip
    assert result.returncode == 0, result.stderr
    said = messages(result.stdout)
    done = next(m for m in said if m["event"] == "done")
    children = {m["pid"]: m for m in said if m["event"] == "child"}
    assert done["status"] == {"posix_spawn": 0, "subprocess": 0}, done
    assert set(children) == set(done["children"].values()), (children, done)
    assert_lossless(trace)

    from cmtrace.analysis import api  # noqa: PLC0415 (pandas: only for the tests that read)

    loaded = api.load(trace)
    events = read_events(trace)
    forks = events[(events.pid == done["pid"]) & (events.op == "fork")]
    by_child = {int(row.arg): row for row in forks.itertuples()}
    assert set(by_child) == set(children), forks
    for how, marker in (("posix_spawn", "POSIX-SPAWN"), ("subprocess", "SUBPROCESS")):
        fork = by_child[done["children"][how]]
        assert int(fork.flags) & CLONE_VFORK, (how, fork)
        frames = loaded.stack(int(fork.stack_id))
        ours = [(f["file"], f["line"]) for f in frames if f["file"] == spawns]
        assert ours and ours[0] == (spawns, marked_line(spawns, marker)), (how, frames)
    for pid in children:
        ops = events[events.pid == pid].op.tolist()
        assert "exec" in ops and ops[-1] == "exit", (pid, ops)
        before_exec = ops[: ops.index("exec")]
        assert "close" in before_exec or "close_range" in before_exec, (pid, ops)

    posix, sub = (children[done["children"][how]] for how in ("posix_spawn", "subprocess"))
    # the ground truth: each child's fds as it printed them; the file action's fd and its own
    # leak are its leaks; the fd it inherited with pass_fds is the parent's
    assert set(posix["fds"]) - {"0", "1", "2"} == {str(SPAWNED_FD), str(posix["leaked"])}
    assert set(sub["fds"]) - {"0", "1", "2"} == {str(done["passed"]), str(sub["leaked"])}
    leaks = {pid: set(leaks_by_fd(trace, pid)) for pid in (posix["pid"], sub["pid"])}
    assert leaks == {posix["pid"]: {SPAWNED_FD, posix["leaked"]}, sub["pid"]: {sub["leaked"]}}
    parent_leaks = leaks_by_fd(trace, done["pid"])
    assert_open_fds_match(trace, done["pid"], done["fds"], before=done["start_fds"])
    lines = {leak["site"]["line"] for leak in parent_leaks.values()}
    assert lines == {marked_line(spawns, "PARENT-BEFORE"), marked_line(spawns, "PARENT-AFTER")}


# ---- 4. job control: SIGSTOP / SIGCONT of the traced process --------------------------------
TICKER = program("ticker.py")
STOPPED_STATES = ("T", "t")  # stopped; "tracing stop" while a tracer holds the group stop
QUIET_S = 0.6  # a stopped ticker prints nothing for this long (it ticks every 20 ms)


def thread_states(pid: int) -> dict[int, str]:
    states = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        states[int(tid)] = stat.rsplit(")", 1)[1].split()[0]
    return states


def is_dead(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except FileNotFoundError:
        return True


def all_stopped(pid: int) -> bool:
    return all(state in STOPPED_STATES for state in thread_states(pid).values())


def lines_within(target: Target, seconds: float) -> list[str]:
    """The lines the target prints within `seconds`."""
    got, deadline = [], time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = target.out.lines.get(timeout=left)
        except queue.Empty:
            break
        if line == "":
            target.out.lines.put("")
            break
        got.append(line)
    return got


def stop_and_continue(target: Target, pid: int, reaper: Target | None = None) -> None:
    """SIGSTOP: every thread stops and nothing is printed; the parent (reaper: the test,
    under -p) is told it stopped; SIGCONT: the ticks come again."""
    target.expect("tick", timeout=30)
    os.kill(pid, signal.SIGSTOP)
    wait_until(lambda: all_stopped(pid), 30, "every thread to stop")
    lines_within(target, 0.1)  # a tick written just before the stop
    assert lines_within(target, QUIET_S) == [], "a stopped process printed"
    assert all_stopped(pid), thread_states(pid)
    if reaper is not None:
        _, status = os.waitpid(pid, os.WUNTRACED | os.WNOHANG)
        assert os.WIFSTOPPED(status) and os.WSTOPSIG(status) == signal.SIGSTOP, status
    os.kill(pid, signal.SIGCONT)
    target.messages.clear()
    target.expect("tick", timeout=30)
    assert not all_stopped(pid), thread_states(pid)


def assert_ticks_recorded(trace: Path, done: dict, before: dict[str, str]) -> None:
    """Every tick's open is in the trace, once (none lost while stopped, none doubled), and the
    fds left open are the program's own."""
    from cmtrace.analysis import api  # noqa: PLC0415

    fds = api.load(trace).fds
    tick_line = marked_line(TICKER, "TICK")
    ours = fds[(fds.pid == done["pid"]) & (fds.site_line == tick_line)]
    assert len(ours) == done["ticks"], (len(ours), done["ticks"])
    pipes = fds[(fds.pid == done["pid"]) & (fds.kind == "pipe")]
    assert len(pipes) >= 2 * done["pipes"], (len(pipes), done["pipes"])
    assert_open_fds_match(trace, done["pid"], done["fds"], before=before)


def test_sigstop_sigcont_under_run(workdir):
    trace = workdir / "trace-jobs-run"
    target = Target([*cmtrace_run(trace), TARGET_PYTHON, TICKER], workdir)
    try:
        ready = target.expect("ready", timeout=EXIT_TIMEOUT)
        stop_and_continue(target, ready["pid"])
        stop_and_continue(target, ready["pid"])  # and again
        target.send("finish")
        done = target.expect("done")
        assert target.finish(timeout=EXIT_TIMEOUT) == 0, target.stderr_text()
    finally:
        target.kill()
    assert_lossless(trace)
    assert_ticks_recorded(trace, done, before=done["start_fds"])


@pytest.mark.parametrize("detach", ["running", "stopped"])
def test_sigstop_sigcont_under_attach(workdir, detach):
    """The group stop is the target's: its parent sees it stopped; detaching while it is
    stopped leaves it stopped (untraced), and SIGCONT then resumes it."""
    target = Target([TARGET_PYTHON, TICKER], workdir)
    trace = workdir / f"trace-jobs-attach-{detach}"
    try:
        ready = target.expect("ready")
        pid = ready["pid"]
        tracer = Tracer(["-p", str(pid), *PTRACE, "-o", str(trace)], cwd=workdir)
        tracer.wait_attached()
        stop_and_continue(target, pid, reaper=target)
        if detach == "stopped":
            os.kill(pid, signal.SIGSTOP)
            wait_until(lambda: all_stopped(pid), 30, "every thread to stop")
        stopped = tracer.stop(signal.SIGINT)
        assert stopped.returncode == 0, stopped.stderr
        assert set(tracers_of(pid).values()) == {0}
        if detach == "stopped":
            assert set(thread_states(pid).values()) == {"T"}, thread_states(pid)
            lines_within(target, 0.1)
            assert lines_within(target, QUIET_S) == [], "a stopped process printed"
            os.kill(pid, signal.SIGCONT)
        target.messages.clear()
        target.expect("tick", timeout=30)
        target.send("finish")
        target.expect("done")
        assert target.finish() == 0, target.stderr_text()
    finally:
        target.kill()
    assert_lossless(trace)


# ---- 5. SCM_RIGHTS and close_range ----------------------------------------------------------
PASSFDS = program("passfds.py")


def assert_fd_flags_match(trace: Path, done: dict) -> None:
    """The received fds are births of the receiver, and every fd left open has the CLOEXEC
    bit /proc/PID/fdinfo shows (MSG_CMSG_CLOEXEC, set_inheritable, close_range's
    CLOSE_RANGE_CLOEXEC, which closes nothing)."""
    from cmtrace.analysis import api  # noqa: PLC0415

    fds = api.load(trace).fds
    left = fds[(fds.pid == done["pid"]) & fds.leak]
    assert sorted(left[left.syscall == "recvmsg"].fd) == sorted(done["received"]), left
    cloexec = {int(row.fd): bool(row.cloexec) for row in left.itertuples()}
    truth = {int(fd): int(fd) in done["cloexec"] for fd in done["fds"]
             if fd not in done["start_fds"]}  # fmt: skip
    assert cloexec == truth


def test_scm_rights_and_close_range_under_run(workdir):
    trace = workdir / "trace-passfds"
    result = subprocess.run([*cmtrace_run(trace), TARGET_PYTHON, PASSFDS, "run"],
                            capture_output=True, text=True, timeout=EXIT_TIMEOUT, cwd=workdir)  # fmt: skip
    assert result.returncode == 0, result.stderr
    done = done_of(result.stdout)
    assert_lossless(trace)
    assert_open_fds_match(trace, done["pid"], done["fds"], before=done["start_fds"])
    assert_fd_flags_match(trace, done)
    child_leaks = leaks_by_fd(trace, done["child"])  # what it sent, still open at its _exit
    assert sorted(leak["kind"] for leak in child_leaks.values()) == ["pipe", "pipe", "socket"]


def test_scm_rights_and_close_range_under_attach(workdir):
    target = Target([TARGET_PYTHON, PASSFDS, "serve"], workdir)
    trace = workdir / "trace-passfds-attach"
    try:
        ready = target.expect("ready")
        tracer = Tracer(["-p", str(target.pid), *PTRACE, "-o", str(trace)], cwd=workdir)
        tracer.wait_attached()
        target.send("go")
        done = target.expect("done")
        assert tracer.stop(signal.SIGINT).returncode == 0
        assert target.finish() == 0, target.stderr_text()
    finally:
        target.kill()
    assert_lossless(trace)
    assert_open_fds_match(trace, done["pid"], done["fds"], before=ready["fds"])
    assert_fd_flags_match(trace, done)


def test_run_through_more_processes_than_the_engine_holds_at_once(workdir):
    """9,000 short-lived children one after the other (a test suite's subprocesses): the
    engine's process table (8,192 slots) was never freed, and it crashed on the 8,192nd."""
    forker = program("forker.py")
    trace = workdir / "trace-many"
    result = subprocess.run([*cmtrace_run(trace), TARGET_PYTHON, forker, "many", "9000"],
                            capture_output=True, text=True, timeout=EXIT_TIMEOUT, cwd=workdir)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    done = done_of(result.stdout)
    meta = assert_lossless(trace)
    assert meta["backend_stats"]["processes"] == 9001 and meta["backend_stats"]["untracked"] == 0
    leaks = leaks_by_fd(trace, done["pid"])
    assert set(leaks) == {done["fd"]}, leaks
    assert leaks[done["fd"]]["site"]["line"] == marked_line(forker, "MANY-LEAK")
    exits = read_events(trace).query("op == 'exit'")
    assert len(exits) == 9001, len(exits)


# ---- the engine dies under `cmtrace run` -----------------------------------------------------
def test_engine_killed_during_run_is_an_error_and_an_interrupted_trace(workdir):
    """The engine (not cmtrace) dies: the command dies with it (PTRACE_O_EXITKILL), cmtrace says
    so in one line, exits as a shell reports a SIGKILLed command, and keeps the trace so far,
    marked interrupted (it said "complete" and exited 245 after the engine's SIGSEGV)."""
    trace = workdir / "trace-engine-killed"
    target = Target([*cmtrace_run(trace), TARGET_PYTHON, TICKER], workdir)
    try:
        ready = target.expect("ready", timeout=EXIT_TIMEOUT)
        for _ in range(3):
            target.expect("tick", timeout=30)
        engine = int(status_field(ready["pid"], "TracerPid"))
        os.kill(engine, signal.SIGKILL)
        code = target.proc.wait(timeout=EXIT_TIMEOUT)
        stderr = target.stderr_text()
    finally:
        target.kill()
    wait_until(lambda: is_dead(ready["pid"]), 30, "the command to die with the engine")
    assert code == 128 + signal.SIGKILL, stderr
    errors = [line for line in stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "the ptrace engine was killed by SIGKILL" in errors[0], stderr
    assert "Traceback" not in stderr
    meta = read_meta(trace)
    assert meta["status"] == "interrupted" and "engine" in meta["stop_reason"], meta
    assert report_json(trace)["interrupted"]
    assert len(read_events(trace)) > 0


# ---- children of an attached process ----------------------------------------------------------
@pytest.mark.parametrize("follow", [False, True], ids=["no-f", "f"])
def test_attach_traces_children_only_with_f(workdir, follow):
    """Without -f a child is not recorded, so it must not be traced either (every one of its
    syscalls would stop); with -f it is traced and its fds are recorded."""
    target = Target([TARGET_PYTHON, program("forker.py")], workdir)
    trace = workdir / f"trace-forker-{follow}"
    flags = ("-f",) if follow else ()
    try:
        target.expect("ready")
        tracer = Tracer(["-p", str(target.pid), *PTRACE, *flags, "-o", str(trace)], cwd=workdir)
        tracer.wait_attached()
        target.send("fork")
        child = target.expect("child")
        forked = target.expect("forked")
        engine = int(status_field(target.pid, "TracerPid"))
        assert forked["status"] == 0 and child["ppid"] == target.pid, (child, forked)
        assert child["tracer"] == (engine if follow else 0), (child, engine)
        assert tracer.stop(signal.SIGINT).returncode == 0
        assert target.finish() == 0, target.stderr_text()
    finally:
        target.kill()
    assert_lossless(trace)
    events = read_events(trace)
    child_ops = set(events[events.pid == child["pid"]].op)
    assert child_ops == ({"birth", "close", "exit"} if follow else set()), child_ops
