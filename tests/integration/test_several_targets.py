"""Several targets in one trace: `-p A,B -p C`, `--pgrep PATTERN` with processes that start
after recording began, `--all` (BPF), and each target's RLIMIT_NOFILE and peak of open fds.

Ground truth: each program reports the fds it leaked and the most it held at once; the leaked
fds are checked in /proc/PID/fd before the programs exit."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import uuid
from pathlib import Path

import conftest
import pytest
from conftest import (
    FDPROGRAMS,
    RECORDERS,
    TARGET_PYTHON,
    Target,
    Tracer,
    assert_complete_and_lossless,
    error_line,
    leaks_of,
    proc_fds,
    read_events,
    read_meta,
    read_preexisting,
    recording_with,
    report_json,
    run_cmtrace,
    wait_until,
)

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("bpf_ready")]

LEAKER = FDPROGRAMS / "targets_leaker.py"
LEAK_LINE = next(
    n for n, line in enumerate(LEAKER.read_text().splitlines(), 1) if line.endswith("# LEAK")
)
ATTACHED_MANY = re.compile(r"cmtrace: attached")


def leaker(workdir: Path, tag: str, leaks: int, *args: str, wrap: tuple[str, ...] = ()) -> Target:
    return Target([*wrap, TARGET_PYTHON, str(LEAKER), tag, str(leaks), *args], workdir)


def wait_attached(tracer: Tracer) -> str:
    try:
        return tracer.err.wait_for(ATTACHED_MANY.search, 120, "the attached line")
    except AssertionError as exc:
        tracer.kill()
        raise AssertionError(f"{exc}; tracer stderr:\n{tracer.err.text()}") from None


def wait_joined(tracer: Tracer, pid: int) -> None:
    tracer.err.wait_for(lambda line: f"joined {pid} " in line, 60, f"'joined {pid}'")


def run_leak(target: Target) -> dict:
    """go -> done; the leaked fds are checked against /proc/PID/fd while it still runs."""
    target.send("go")
    done = target.expect("done")
    table = proc_fds(target.pid)
    assert all(table.get(fd) == "/dev/null" for fd in done["leaked"]), (done, table)
    return done


def assert_leaks(report: dict, pid: int, done: dict, stacks: bool = True) -> None:
    leaks = leaks_of(report, pid)
    assert sorted(leak["fd"] for leak in leaks) == sorted(done["leaked"]), leaks
    if stacks:
        assert {leak["site"]["line"] for leak in leaks} == {LEAK_LINE}, leaks


@pytest.mark.usefixtures("recorder")
def test_pid_lists_trace_each_process_and_stop_when_all_exited(workdir):
    tag = f"several-{uuid.uuid4().hex[:8]}"
    targets = [leaker(workdir, f"{tag}-{i}", leaks) for i, leaks in enumerate((2, 3, 4))]
    trace = workdir / "trace"
    tracer = None
    try:
        for target in targets:
            target.expect("ready")
        a, b, c = (t.pid for t in targets)
        tracer = Tracer(["-p", f"{a},{b}", "-p", str(c), "-o", str(trace)], cwd=workdir)
        line = wait_attached(tracer)
        assert all(str(pid) in line for pid in (a, b, c)), line
        done = [run_leak(target) for target in targets]
        for target in targets:
            assert target.finish() == 0
        result = tracer.wait().check()  # nobody stops it: the last target's exit does
    finally:
        for target in targets:
            target.kill()
        if tracer:
            tracer.kill()
    meta = assert_complete_and_lossless(trace, result.stdout)
    assert meta["stop_reason"] == "target exited", meta
    assert [(t["pid"], t["found_by"]) for t in meta["targets"]] == [(a, "pid"), (b, "pid"),
                                                                    (c, "pid")]  # fmt: skip
    report = report_json(trace)
    for target, facts in zip(targets, done):
        assert_leaks(report, target.pid, facts)
    assert len(report["leaks"]) == 2 + 3 + 4


@pytest.mark.usefixtures("recorder")
def test_pgrep_joins_processes_that_start_later_and_leaves_others(workdir):
    tag = f"pgrep-{uuid.uuid4().hex[:8]}"
    early = leaker(workdir, f"{tag}-early", 2)
    trace = workdir / "trace"
    late = other = tracer = None
    try:
        early.expect("ready")
        tracer = Tracer(["attach", "--pgrep", f"{tag}-(early|late)", "-o", str(trace)],
                        cwd=workdir)  # fmt: skip
        assert str(early.pid) in wait_attached(tracer)
        other = leaker(workdir, f"{tag}-other", 1)  # does not match: never traced
        late = leaker(workdir, f"{tag}-late", 3)
        other.expect("ready")
        late.expect("ready")
        wait_joined(tracer, late.pid)
        done = {t.pid: run_leak(t) for t in (early, late, other)}
        for target in (early, late):
            assert target.finish() == 0
        result = tracer.wait().check()  # every match exited (`other` still runs)
        assert other.proc.poll() is None
    finally:
        for target in (early, late, other):
            if target:
                target.kill()
        if tracer:
            tracer.kill()
    meta = assert_complete_and_lossless(trace, result.stdout)
    by_pid = {t["pid"]: t for t in meta["targets"]}
    assert set(by_pid) == {early.pid, late.pid}, by_pid
    assert by_pid[late.pid]["found_by"] == "pgrep" and by_pid[late.pid]["joined_ns"] > 0
    assert meta["pgrep"] == f"{tag}-(early|late)"
    assert other.pid not in set(read_events(trace)["pid"])
    # the late process's fds from before it joined are its pre-existing ones, timed then
    pre = read_preexisting(trace)
    late_pre = pre[pre.pid == late.pid]
    assert {0, 1, 2} <= set(late_pre.fd)
    assert (late_pre.t_ns >= by_pid[late.pid]["joined_ns"] - 1_000_000_000).all()
    report = report_json(trace)
    assert_leaks(report, early.pid, done[early.pid])
    assert_leaks(report, late.pid, done[late.pid])
    assert not leaks_of(report, other.pid)


@pytest.mark.usefixtures("recorder")
def test_rlimit_at_join_its_change_and_the_peak(workdir):
    tag = f"rlimit-{uuid.uuid4().hex[:8]}"
    # prlimit execs the program: the pid is the program's
    target = leaker(workdir, tag, 5, "--peak", "40", "--setrlimit", "50",
                    wrap=("prlimit", "--nofile=64:128"))  # fmt: skip
    trace = workdir / "trace"
    tracer = None
    try:
        target.expect("ready")
        tracer = Tracer(["-p", str(target.pid), "-o", str(trace)], cwd=workdir)
        wait_attached(tracer)
        done = run_leak(target)
        assert done["rlimit"][0] == 50
        wait_until(lambda: _limit_changes(trace, target.pid), 10, "the limit change in meta")
        assert target.finish() == 0
        result = tracer.wait().check()
    finally:
        target.kill()
        if tracer:
            tracer.kill()
    meta = assert_complete_and_lossless(trace, result.stdout)
    limit = meta["rlimit_nofile"][str(target.pid)]
    assert (limit["soft"], limit["hard"]) == (64, 128), limit
    assert [(c["soft"], c["hard"]) for c in limit["changes"]] == [(50, 128)], limit
    (entry,) = [p for p in report_json(trace)["processes"] if p["pid"] == target.pid]
    assert entry["rlimit_nofile"]["changes"][0]["t_ns"] > 0
    # the program counted its fds with os.listdir, whose own fd the trace sees open too
    assert entry["peak_fds"] == done["peak"] + 1, (entry, done)
    assert entry["soft_at_peak"] == 64  # the peak came before the change
    text = run_cmtrace("report", str(trace)).stdout
    percent = round(100 * entry["peak_fds"] / 64)
    assert f"peak {entry['peak_fds']} of 64 fds ({percent}%); soft limit 64 -> 50" in text, text


def _limit_changes(trace: Path, pid: int) -> bool:
    try:
        meta = json.loads((trace / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(meta.get("rlimit_nofile", {}).get(str(pid), {}).get("changes"))


@pytest.fixture
def as_root_bpf():
    """--all is BPF's, as root: whichever recorder cell ran the module's tests before."""
    active = conftest.active_recorder()
    with recording_with(RECORDERS["bpf"]):
        yield
    if active is not None:  # the module's recorder cell goes on for the tests after this one
        conftest._active[:] = [active]


@pytest.mark.usefixtures("as_root_bpf")
def test_all_joins_a_new_python_and_ignores_other_programs(tmp_path):
    workdir = tmp_path
    tag = f"all-{uuid.uuid4().hex[:8]}"
    trace = workdir / "trace"
    tracer = Tracer(["attach", "--all", "-o", str(trace)], cwd=workdir)
    target = None
    shell = subprocess.Popen(["sleep", "120"])  # not Python: never a target
    try:
        wait_attached(tracer)
        target = leaker(workdir, tag, 2)
        target.expect("ready")
        wait_joined(tracer, target.pid)
        done = run_leak(target)
        assert target.finish() == 0
        wait_until(lambda: target.proc.poll() is not None, 30, "the target's exit")
        result = tracer.stop(signal.SIGINT).check()
    finally:
        shell.kill()
        shell.wait()
        if target:
            target.kill()
        tracer.kill()
    meta = read_meta(trace)
    assert meta["status"] == "complete" and meta["all_python"] is True, meta
    by_pid = {t["pid"]: t for t in meta["targets"]}
    assert by_pid[target.pid]["found_by"] == "all"
    assert shell.pid not in by_pid
    assert tracer.proc.pid not in by_pid  # cmtrace itself
    assert shell.pid not in set(read_events(trace)["pid"])
    assert "stopping: signal SIGINT" in result.stderr
    assert_leaks(report_json(trace), target.pid, done)


@pytest.mark.parametrize(
    "args",
    [["--all", "-p", "1"], ["--all", "--pgrep", "x"], ["attach", "--all", "--backend", "ptrace"],
     ["attach", "--pgrep", "a["], ["attach"], ["-p", "1,x"]],
)  # fmt: skip
def test_target_usage_errors(args):
    result = run_cmtrace(*args)
    assert result.returncode == 1, result
    assert error_line(result)
