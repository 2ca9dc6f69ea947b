"""fork with -f: children are tracked as their own pid (existing descendants included), fds
they inherit are inherited, not born in them, and never their leaks."""

from __future__ import annotations

import pytest
from conftest import leaks_of, read_events, read_preexisting, report_json
from fdhelpers import ops_of, trace_scenario

# every test once per recorder: bpf, ptrace (root) and ptrace as nobody
pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("bpf_ready", "recorder")]


def test_follow_children_tracks_each_child_as_its_own_pid(workdir):
    session, _ = trace_scenario("fork", workdir, "-f")
    target, done = session.target, session.done
    # the children's messages came before "done": the target kept them for expect()
    children = {m["role"]: m for m in (target.expect("child"), target.expect("child"))}
    parent, early, late = target.pid, done["early_child"], done["late_child"]
    assert children["early"]["pid"] == early and children["late"]["pid"] == late

    events = read_events(session.trace)
    forks = ops_of(events, parent, "fork")
    assert list(forks.arg) == [late], "the fork after attach is recorded with the child's pid"

    paths = done["paths"]
    early_births, late_births = (ops_of(events, pid, "birth") for pid in (early, late))
    assert list(early_births.path) == [paths["R1"]], "the existing child is followed"
    assert list(late_births.path) == [paths["R2"]], "the forked child is its own pid"
    late_closes = ops_of(events, late, "close")
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
    session, _ = trace_scenario("fork", workdir)
    target = session.target
    children = [target.expect("child")["pid"], target.expect("child")["pid"]]
    events = read_events(session.trace)
    assert not set(events.pid) & set(children), "children were traced without -f"
    assert len(ops_of(events, target.pid, "birth")) == 1  # Q
