"""fork with -f: children are tracked as their own pid (existing descendants included), fds
they inherit are inherited, not born in them, and never their leaks."""

from __future__ import annotations

import pytest
from conftest import (
    assert_complete_and_lossless,
    leaks_of,
    read_events,
    read_preexisting,
    report_json,
    start_traced,
)

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("bpf_ready")]


def test_follow_children_tracks_each_child_as_its_own_pid(workdir):
    session = start_traced("fork", workdir, "-f")
    target = session.target
    try:
        target.send("go")
        children = {m["role"]: m for m in (target.expect("child"), target.expect("child"))}
        done = target.expect("done")
        result = session.tracer.stop().check()
    finally:
        session.tracer.kill()
        target.finish()
    assert_complete_and_lossless(session.trace, result.stdout)
    parent, early, late = target.pid, done["early_child"], done["late_child"]
    assert children["early"]["pid"] == early and children["late"]["pid"] == late

    events = read_events(session.trace)
    forks = events[(events.pid == parent) & (events.op == "fork")]
    assert list(forks.arg) == [late], "the fork after attach is recorded with the child's pid"

    def births_in(pid):
        return events[(events.pid == pid) & (events.op == "birth")]

    paths = done["paths"]
    assert list(births_in(early).path) == [paths["R1"]], "the existing child is followed"
    assert list(births_in(late).path) == [paths["R2"]], "the forked child is its own pid"
    late_closes = events[(events.pid == late) & (events.op == "close")]
    assert list(late_closes.fd) == [done["Q"]], "the child's close of an inherited fd"

    pre = read_preexisting(session.trace)
    assert done["P"] in set(pre[pre.pid == early].fd), "the existing child's fds are listed"

    report = report_json(session.trace)
    by_pid = {pid: {x["fd"]: x for x in leaks_of(report, pid)} for pid in (parent, early, late)}
    assert set(by_pid[early]) == {children["early"]["fd"]}
    assert set(by_pid[late]) == {children["late"]["fd"]}, "inherited P and Q are no leaks"
    for pid in (early, late):
        assert {x["closed_by"] for x in by_pid[pid].values()} == {"process-exit"}
    assert set(by_pid[parent]) == {done["Q"]}, "the parent still holds Q; P pre-existed"
    assert by_pid[parent][done["Q"]]["closed_by"] is None


def test_without_follow_children_are_not_traced(workdir):
    session = start_traced("fork", workdir)
    target = session.target
    try:
        target.send("go")
        children = [target.expect("child")["pid"], target.expect("child")["pid"]]
        target.expect("done")
        result = session.tracer.stop().check()
    finally:
        session.tracer.kill()
        target.finish()
    assert_complete_and_lossless(session.trace, result.stdout)
    events = read_events(session.trace)
    assert not set(events.pid) & set(children), "children were traced without -f"
    assert len(events[(events.pid == target.pid) & (events.op == "birth")]) == 1  # Q
