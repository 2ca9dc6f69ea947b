"""`cmtrace -p PID`: attach to a process that already has fds, stop on SIGTERM / target exit /
--duration, and survive being SIGKILLed mid-trace with a readable dataset."""

from __future__ import annotations

import json
import signal
import socket
import time
from pathlib import Path

import pytest
from conftest import (
    Target,
    Tracer,
    assert_complete_and_lossless,
    fdops,
    leaks_of,
    read_events,
    read_meta,
    read_preexisting,
    report_json,
    run_cmtrace,
    start_traced,
    wait_until,
)
from fdhelpers import ops_of, trace_scenario

# every test once per recorder: bpf, ptrace (root) and ptrace as nobody
pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("bpf_ready", "recorder")]


def test_preexisting_fds_are_listed_and_never_leaks(workdir):
    # SIGTERM stops the tracer like Ctrl-C, and leaves the target running: it exits normally
    session, _ = trace_scenario("preexisting", workdir, stop_signal=signal.SIGTERM)
    target, done = session.target, session.done
    pre = read_preexisting(session.trace)
    pre = pre[pre.pid == target.pid]
    listed = dict(zip(pre.fd, pre.path))
    for name, fd in done["pre"].items():
        assert listed.get(fd) == done["paths"][name], (name, listed)
    for stdio in (0, 1, 2):
        assert stdio in listed
    events = read_events(session.trace)
    closes = ops_of(events, target.pid, "close")
    assert done["closed"] in set(closes.fd), "the close of a pre-existing fd is recorded"
    leaks = leaks_of(report_json(session.trace), target.pid)
    assert [(x["fd"], x["path"]) for x in leaks] == [(done["new"], done["paths"]["new_W"])]


def test_target_exit_stops_the_tracer_and_completes_the_trace(workdir):
    session = start_traced("exit-with-leaks", workdir)
    try:
        session.target.send("go")
        done = session.target.expect("done")
        result = session.tracer.wait().check()  # nobody stops it: the target's exit does
    finally:
        session.tracer.kill()
        session.target.kill()
    meta = assert_complete_and_lossless(session.trace, result.stdout)
    pid = session.target.pid
    assert str(pid) in json.dumps(meta["targets"] if "targets" in meta else meta)
    events = read_events(session.trace)
    assert len(ops_of(events, pid, "exit")) == 1
    leaks = leaks_of(report_json(session.trace), pid)
    assert sorted(x["fd"] for x in leaks) == sorted(done["leaked"])
    assert {x["path"] for x in leaks} == {done["paths"]["L1"], done["paths"]["L2"]}
    assert {x["closed_by"] for x in leaks} == {"process-exit"}
    for path in (done["paths"]["L1"], done["paths"]["L2"]):
        assert path in result.stdout, f"summary names the leaked file {path}"


def test_duration_ends_the_trace_and_leaves_the_target_running(workdir):
    target = Target(fdops("preexisting", workdir), workdir)
    try:
        target.expect("ready")
        trace = workdir / "trace"
        tracer = Tracer(["-p", str(target.pid), "-o", str(trace), "--duration", "2"])
        tracer.wait_attached()
        attached_at = time.monotonic()
        result = tracer.wait().check()
        assert time.monotonic() - attached_at >= 1.5
        assert target.proc.poll() is None
        assert_complete_and_lossless(trace, result.stdout)
    finally:
        target.kill()


def count_rows(trace) -> int:
    import pyarrow.dataset as ds

    try:
        return ds.dataset(trace / "events", format="parquet").count_rows()
    except (FileNotFoundError, OSError):
        return 0


def test_sigkilled_tracer_leaves_a_readable_trace_missing_at_most_a_second(workdir):
    session = start_traced("steady", workdir)
    target, trace = session.target, session.trace
    try:
        target.send("go")
        # let several flushes happen (the target makes ~150 events a second)
        wait_until(lambda: count_rows(trace) >= 400, 60, "flushed event parts")
        killed_at = time.monotonic()
        session.tracer.proc.kill()
        session.tracer.proc.wait(timeout=30)
        target.send("report")
        times = target.expect("done")["times"]
    finally:
        session.tracer.kill()
        target.finish()
    events = read_events(trace)  # pandas reads it as it is
    opens = ops_of(events, target.pid, "birth")
    opens = opens[opens.path == "/dev/null"]
    before_last_second = sum(t <= killed_at - 1.5 for t in times)  # 1 s flush + slack
    assert before_last_second <= len(opens) <= len(times)

    import duckdb

    parts = str(trace / "events" / "part-*.parquet")
    (count,) = duckdb.connect().execute(f"SELECT count(*) FROM read_parquet('{parts}')").fetchone()
    assert count == len(events)

    assert read_meta(trace)["status"] == "recording"  # a killed tracer could write nothing
    report = report_json(trace)
    assert report["trace"]["status"] == "interrupted"
    text = run_cmtrace("report", str(trace))
    assert text.returncode == 0 and "interrupted" in text.stdout.lower(), text.stdout


def in_syscall(pid: int, tid: int, name: str) -> bool:
    """Whether thread tid is blocked in syscall `name` (/proc/PID/task/TID/syscall)."""
    numbers = {"accept4": "288", "accept": "43"}
    try:
        fields = Path(f"/proc/{pid}/task/{tid}/syscall").read_text().split()
    except OSError:
        return False
    return bool(fields) and fields[0] == numbers[name]


def test_accept_blocked_before_attach_still_records_the_birth(workdir):
    """Attaching to a server that waits in accept(): the connection accepted after attach is a
    birth, although the syscall entered before the probes existed."""
    target = Target(fdops("blocked-accept", workdir), workdir)
    try:
        ready = target.expect("ready")
        wait_until(lambda: in_syscall(target.pid, ready["tid"], "accept4"), 60, "accept4")
        trace = workdir / "trace"
        tracer = Tracer(["-p", str(target.pid), "-o", str(trace)])
        tracer.wait_attached()
        with socket.create_connection(("127.0.0.1", ready["port"]), timeout=30):
            accepted = target.expect("accepted")
            result = tracer.stop().check()
    finally:
        target.kill()
    assert_complete_and_lossless(trace, result.stdout)
    events = read_events(trace)
    births = ops_of(events, target.pid, "birth")
    assert list(zip(births.syscall, births.fd, births.tid)) == [
        ("accept4", accepted["fd"], ready["tid"])
    ]
    assert births.iloc[0].kind == "socket"
