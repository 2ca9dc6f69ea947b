"""Dumps (issue 15): --dump-on parsing, the instants triggers fire at over hand-built event
batches, the trace cut at an instant, and the dump files.

Each case states the events a kernel would have recorded and, from the case alone, when a
process had N fds open or first failed with EMFILE; nothing is derived from the code under test.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from tracebuild import PID, birth, close, events_table, exec_, fail, fork, write_trace

from cmtrace.analysis import load
from cmtrace.errors import UsageError
from cmtrace.present.dumps import (
    DumpObserver,
    Fired,
    Trigger,
    TriggerWatch,
    check_triggers,
    parse_trigger,
    write_dump,
)
from cmtrace.present.json import report_dict
from cmtrace.record.observe import Flushed

OTHER = PID + 1
FILE = "/srv/app/pool.py"


# ---- flags ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "trigger", "reason"),
    [
        ("emfile", Trigger("emfile"), "emfile"),
        ("EMFILE", Trigger("emfile"), "emfile"),
        ("100", Trigger("fds", 100), "fds-100"),
        ("1", Trigger("fds", 1), "fds-1"),
        ("50%", Trigger("pct", 50), "pct-50"),
        ("100%", Trigger("pct", 100), "pct-100"),
    ],
)
def test_dump_on_values(text: str, trigger: Trigger, reason: str) -> None:
    assert parse_trigger(text) == trigger
    assert trigger.reason == reason


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("0", "at least 1"),
        ("120%", "1% to 100%"),
        ("0%", "1% to 100%"),
        ("foo", "expected emfile"),
        ("-5", "expected emfile"),
        ("5.5%", "expected emfile"),
        ("", "expected emfile"),
    ],
)
def test_bad_dump_on_values_are_one_line_usage_errors(text: str, says: str) -> None:
    with pytest.raises(UsageError) as raised:
        parse_trigger(text)
    message = str(raised.value)
    assert message.startswith(f"--dump-on {text}:") and says in message
    assert "\n" not in message


def test_counting_triggers_are_refused_with_aggregate() -> None:
    check_triggers([Trigger("emfile")], aggregate=True)
    check_triggers([Trigger("fds", 5), Trigger("pct", 50)], aggregate=False)
    for trigger, spelled in ((Trigger("fds", 5), "5"), (Trigger("pct", 50), "50%")):
        with pytest.raises(UsageError, match=f"^--dump-on {spelled}: .*--aggregate"):
            check_triggers([Trigger("emfile"), trigger], aggregate=True)


def test_a_percent_is_rounded_up_from_the_soft_limit() -> None:
    assert Trigger("pct", 50).threshold(128) == 64
    assert Trigger("pct", 33).threshold(100) == 33
    assert Trigger("pct", 33).threshold(101) == 34  # 33.33 fds: the 34th reaches 33 %
    assert Trigger("pct", 1).threshold(10) == 1
    assert Trigger("pct", 50).threshold(None) is None  # unlimited: never
    assert Trigger("fds", 7).threshold(None) == 7


# ---- when triggers fire -----------------------------------------------------------------------
def watch(*triggers: Trigger, limits: dict[int, int] | None = None, preexisting: int = 3):
    """A TriggerWatch over a process that had fds 0..preexisting-1 open at attach."""
    w = TriggerWatch(list(triggers), lambda pid: (limits or {}).get(pid))
    w.preexisting(
        [
            {"pid": PID, "fd": fd, "kind": "file", "path": f"/pre/{fd}", "cloexec": False,
             "t_ns": 0}
            for fd in range(preexisting)
        ]
    )  # fmt: skip
    return w


def fired(w: TriggerWatch, rows: list[dict]) -> list[tuple[str, int, int]]:
    return [(f.reason, f.pid, f.t_ns) for f in w.feed(events_table(rows))]


def test_a_count_fires_at_the_birth_that_reaches_it_counting_preexisting_fds() -> None:
    w = watch(Trigger("fds", 6))  # 3 pre-existing: the 3rd birth makes 6
    rows = [birth(10, 3), birth(20, 4), close(30, 4), birth(40, 4), birth(50, 5), birth(60, 6)]
    assert fired(w, rows) == [("fds-6", PID, 50)]


def test_a_count_reached_in_a_later_batch_fires_there_and_only_once() -> None:
    w = watch(Trigger("fds", 5))
    assert fired(w, [birth(10, 3), close(15, 3), birth(20, 3)]) == []  # 4 open
    assert fired(w, [close(30, 1), birth(40, 1), birth(50, 4)]) == [("fds-5", PID, 50)]
    assert fired(w, [close(60, 4), birth(70, 4), birth(80, 9)]) == []  # fired already


def test_a_dup2_onto_a_live_fd_replaces_it_without_a_peak() -> None:
    w = watch(Trigger("fds", 5))  # 3 + 1 = 4 open; dup2(3, 0) ends fd 0 and starts a new one
    rows = [birth(10, 3), birth(20, 0, syscall="dup2", src_fd=3), birth(30, 2, syscall="dup3")]
    assert fired(w, rows) == []
    assert fired(w, [birth(40, 7)]) == [("fds-5", PID, 40)]


def test_exec_closes_cloexec_fds_and_a_child_counts_what_it_inherited() -> None:
    w = watch(Trigger("fds", 5))
    rows = [
        birth(10, 3, cloexec=True),  # 4 open
        fork(20, OTHER),  # the child inherits 4
        exec_(30),  # the parent's CLOEXEC fd 3 dies: 3 open
        birth(40, 3),  # parent: 4
        birth(50, 5, pid=OTHER, tid=OTHER),  # child: 5
        birth(60, 5),  # parent: 5
    ]
    assert fired(w, rows) == [("fds-5", OTHER, 50), ("fds-5", PID, 60)]


def test_a_target_joining_later_counts_its_own_snapshot_and_its_children() -> None:
    joiner, child = OTHER, OTHER + 1
    w = watch(Trigger("fds", 6))  # PID: 3 pre-existing
    assert fired(w, [birth(10, 3)]) == []  # PID: 4 open
    w.preexisting(  # --pgrep found `joiner` with 4 fds open, at t=15
        [{"pid": joiner, "fd": fd, "kind": "file", "path": None, "cloexec": False, "t_ns": 15}
         for fd in range(4)]
    )  # fmt: skip
    rows = [
        close(20, 0, pid=joiner, tid=joiner),  # a pre-existing fd closed: 3 open
        birth(30, 0, pid=joiner, tid=joiner),  # 4
        birth(40, 4, pid=joiner, tid=joiner),  # 5
        fork(50, child, pid=joiner, tid=joiner),  # the child inherits 5
        birth(60, 5, pid=child, tid=child),  # child: 6
        birth(70, 4),  # PID: 5
        birth(80, 5, pid=joiner, tid=joiner),  # joiner: 6
        birth(90, 5),  # PID: 6
    ]
    assert fired(w, rows) == [("fds-6", child, 60), ("fds-6", joiner, 80), ("fds-6", PID, 90)]


def test_a_percent_fires_on_each_process_s_own_limit() -> None:
    w = watch(Trigger("pct", 50), limits={PID: 10, OTHER: 4}, preexisting=0)
    rows = [
        fork(5, OTHER),
        *[birth(10 + i, i) for i in range(5)],  # the parent's 5th fd: 50 % of 10
        birth(30, 0, pid=OTHER, tid=OTHER),
        birth(31, 1, pid=OTHER, tid=OTHER),  # 2 of 4
    ]
    assert fired(w, rows) == [("pct-50", PID, 14), ("pct-50", OTHER, 31)]


def test_emfile_fires_at_each_process_s_first_emfile_or_enfile_only() -> None:
    w = watch(Trigger("emfile"))
    rows = [
        fail(10, errno=errno.ENOENT),
        fail(20, errno=errno.EMFILE),
        fail(25, errno=errno.EMFILE),
        fail(30, errno=errno.ENFILE, pid=OTHER, tid=OTHER),
    ]
    assert fired(w, rows) == [("emfile", PID, 20), ("emfile", OTHER, 30)]
    assert fired(w, [fail(40, errno=errno.EMFILE)]) == []


def test_no_trigger_no_counting() -> None:
    w = watch()
    assert fired(w, [birth(10, 3), fail(20, errno=errno.EMFILE)]) == []


# ---- the trace cut at an instant ---------------------------------------------------------------
def stack(stack_id: int, line: int) -> dict:
    return {"stack_id": stack_id, "pid": PID, "depth": 0, "function": "grab", "qualname": "grab",
            "file": FILE, "line": line, "firstlineno": 1, "code_flags": 0, "lasti": 0}  # fmt: skip


def cut_case(tmp_path: Path) -> Path:
    events = [
        birth(100, 3, stack_id=1),  # closed before the cut: not a leak then
        close(150, 3),
        birth(200, 4, stack_id=1),  # open at the cut, closed after: a leak then
        birth(300, 5, stack_id=2),  # open at the cut and at the end
        close(400, 0),  # the pre-existing fd 0 closed after the cut
        close(500, 4),
        birth(600, 6, stack_id=2),  # born after the cut
        fail(700, errno=errno.EMFILE),
    ]
    return write_trace(
        tmp_path / "t", events, preexisting=[{"fd": 0}, {"fd": 1}],
        stacks=[stack(1, 10), stack(2, 20)],
    )  # fmt: skip


def test_a_cut_trace_leaks_exactly_the_trace_born_fds_open_at_its_instant(tmp_path: Path) -> None:
    trace = load(cut_case(tmp_path), until_ns=300)
    leaks = trace.leaks()
    assert sorted(leaks["fd"].tolist()) == [4, 5]
    assert leaks["died_ns"].isna().all()
    assert trace.end_ns == 300
    live = trace.live_fds(at=300)
    assert sorted(live["fd"].tolist()) == [0, 1, 4, 5]
    assert len(trace.events) == 4
    sites = trace.sites().set_index("site_line")
    assert sites.loc[10, "opened"] == 2 and sites.loc[10, "leaked"] == 1
    assert sites.loc[20, "opened"] == 1 and sites.loc[20, "leaked"] == 1


def test_the_uncut_trace_is_unchanged(tmp_path: Path) -> None:
    trace = load(cut_case(tmp_path))
    assert sorted(trace.leaks()["fd"].tolist()) == [5, 6]


def test_a_dump_is_the_report_at_its_instant_plus_the_dump_object(tmp_path: Path) -> None:
    path = cut_case(tmp_path)
    written = write_dump(path, 1, Fired("fds-4", PID, 300, 4), wall=1.7e9, limit=128)
    assert written.json == path / "dumps" / "001-fds-4.json"
    document = json.loads(written.json.read_text())
    expected = json.loads(json.dumps(report_dict(load(path, until_ns=300)), default=str))
    assert {k: v for k, v in document.items() if k != "dump"} == expected
    assert sorted(leak["fd"] for leak in document["leaks"]) == [4, 5]
    assert document["dump"] == {
        "reason": "fds-4", "pid": PID, "t_ns": 300, "wall": "2023-11-14T22:13:20.000+00:00",
        "open_fds": 4, "limit": 128, "threshold": 4,
    }  # fmt: skip
    text = written.text.read_text()
    assert text.startswith(f"cmtrace dump 001-fds-4: pid {PID} at 0.000 s")
    assert f"{FILE}:10" in text and f"{FILE}:20" in text
    assert (written.json.stat().st_mode & 0o777) == 0o600


# ---- the observer -------------------------------------------------------------------------------
def recording_of(path: Path) -> SimpleNamespace:
    """What the observer reads of a session.Recording."""
    rec = SimpleNamespace(
        writer=SimpleNamespace(path=path, owner=None),
        backend=SimpleNamespace(start_ns=0),
        root_pids={PID},
        stop_reason="",
    )
    rec.request_stop = lambda reason: setattr(rec, "stop_reason", reason)
    return rec


def test_the_observer_writes_a_dump_one_flush_later_and_stops_when_asked(tmp_path: Path) -> None:
    path = cut_case(tmp_path)
    observer = DumpObserver([Trigger("emfile")], stop_after=True)
    said: list[str] = []
    observer.say = said.append
    rec = recording_of(path)
    observer.started(rec)
    batch = events_table([birth(100, 3), fail(700, errno=errno.EMFILE)])
    observer.flushed(rec, Flushed(batch, [], 0, final=False))
    assert not (path / "dumps").exists() and said == []
    observer.flushed(rec, Flushed(None, [], 0, final=False))
    observer.stopped(rec)  # waits for the dumps' thread
    assert (path / "dumps" / "001-emfile.json").is_file()
    assert (path / "dumps" / "001-emfile.txt").is_file()
    assert len(said) == 1 and said[0].startswith("dump 001-emfile written: ")
    assert rec.stop_reason == "dump 001-emfile written (--stop-after-dump)"
    dump = json.loads((path / "dumps" / "001-emfile.json").read_text())["dump"]
    assert dump["t_ns"] == 700 and dump["open_fds"] == 3  # fds 1, 5 and 6 (0 and 4 closed)
    assert sorted(leak["fd"] for leak in json.loads(
        (path / "dumps" / "001-emfile.json").read_text())["leaks"]) == [5, 6]  # fmt: skip


def test_a_manual_dump_on_the_last_flush_and_a_dump_that_cannot_be_written(
    tmp_path: Path,
) -> None:
    path = cut_case(tmp_path)
    observer = DumpObserver([])
    said: list[str] = []
    observer.say = said.append
    rec = recording_of(path)
    observer.started(rec)
    (path / "dumps").write_text("in the way")  # no directory can be made there
    observer.request_manual_dump()
    observer.flushed(rec, Flushed(None, [], 0, final=True))
    observer.stopped(rec)
    assert len(said) == 1
    assert said[0].startswith("dump 001-manual not written (") and "recording goes on" in said[0]
    (path / "dumps").unlink()
    observer.request_manual_dump()
    observer.flushed(rec, Flushed(None, [], 0, final=True))
    observer.stopped(rec)
    assert (path / "dumps" / "002-manual.json").is_file()
    assert said[1].startswith("dump 002-manual written: ")


def test_a_replaced_trace_loses_its_old_dumps_only(tmp_path: Path) -> None:
    path = cut_case(tmp_path)
    (path / "dumps").mkdir()
    for name in ("001-emfile.json", "001-emfile.txt", "012-manual.json", "notes.md"):
        (path / "dumps" / name).write_text("old")
    DumpObserver([]).started(recording_of(path))
    assert [p.name for p in (path / "dumps").iterdir()] == ["notes.md"]
