"""fd-number reuse under thousands of opens and closes from 4 threads sharing one fd table."""

from __future__ import annotations

import re

import pytest
from conftest import assert_complete_and_lossless, leaks_of, read_events, read_meta, report_json
from fdhelpers import trace_scenario

# every test once per recorder: bpf, ptrace (root) and ptrace as nobody
pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("bpf_ready", "recorder")]

PER_THREAD = 2500


def pair_births_with_deaths(events) -> dict[int, object]:
    """Walk one process's events in time order like its fd table; returns what stays open.

    A birth of an fd number that is already open, or a close of one that is not, means an event
    was lost or misordered."""
    open_fds: dict[int, object] = {}
    for row in events.itertuples():
        if row.op == "birth":
            assert row.fd not in open_fds, f"fd {row.fd} born twice without a close: {row}"
            open_fds[row.fd] = row
        elif row.op == "close":
            assert row.fd in open_fds, f"close of fd {row.fd} that was not open: {row}"
            del open_fds[row.fd]
    return open_fds


def test_reuse_from_four_threads_pairs_every_birth_with_its_death(cell_dir):
    session, _ = trace_scenario("threads", cell_dir, scenario_args=(str(PER_THREAD),), timeout=180)
    pid, tids = session.target.pid, session.done["tids"]
    assert len(set(tids)) == 4
    events = read_events(session.trace)
    ours = events[(events.pid == pid) & events.tid.isin(tids)]
    for tid in tids:
        mine = ours[ours.tid == tid]
        births = mine[(mine.op == "birth") & (mine.syscall == "openat")]
        assert len(births) == PER_THREAD, f"tid {tid}: {len(births)} births"
        assert (births.path == "/dev/null").all()
        assert len(mine[mine.op == "close"]) == PER_THREAD, f"tid {tid}"
    # the fd numbers are reused across threads: few distinct numbers for 10,000 opens
    assert ours[ours.op == "birth"].fd.nunique() < 50
    still_open = pair_births_with_deaths(events[events.pid == pid])
    assert not [row for row in still_open.values() if row.tid in tids]
    assert leaks_of(report_json(session.trace), pid) == []


def test_lost_records_are_counted_never_silent(cell_dir):
    """A 1 MiB ring under a burst of opens from 4 threads: whatever the kernel could not queue
    is counted, so recorded + lost accounts for every event the target made."""
    per_thread = 20_000
    session, _ = trace_scenario(
        "threads", cell_dir, "--ring-mb", "1", "--no-python-stacks",
        scenario_args=(str(per_thread),), timeout=300, lossless=False,
    )  # fmt: skip
    meta = read_meta(session.trace)
    assert meta["status"] == "complete"
    lost = meta["lost_events"]
    events = read_events(session.trace)
    ours = events[(events.pid == session.target.pid) & events.tid.isin(session.done["tids"])]
    recorded = len(ours[ours.op.isin(["birth", "close"])])
    made = 2 * 4 * per_thread
    assert recorded <= made
    assert recorded + lost >= made, f"{made - recorded} events missing, {lost} counted lost"
    report = report_json(session.trace)
    assert report["lost_events"] == lost
    summary = session.result.stdout
    if lost:
        print(f"{lost} records lost with a 1 MiB ring; recorded {recorded} of {made}")
        assert re.search(rf"\b{lost}\b[^\n]*lost|lost[^\n]*\b{lost}\b", summary), summary
    else:
        assert_complete_and_lossless(session.trace, summary)
