"""The fd-table model fed in batches equals the model fed the whole trace at once.

The live view feeds cmtrace.analysis.model.FdModel a batch at a time; the report feeds it the
whole trace (build_lifetimes). Both must give the same lifetimes, counts and facts however the
events are cut: here at random points (between a birth and its death, around forks, execs,
exits and close_range), on the traces recorded in tests/data and on the hand-built cases of
test_lifetimes. The open fds midway are checked against a plain replay of the events, one at a
time, with a dict per process: the textbook fd table the vectorized model must agree with.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from test_lifetimes import CASES
from tracebuild import (
    PID,
    birth,
    close,
    close_range,
    events_table,
    exec_,
    exit_,
    fork,
    preexisting_frame,
    set_cloexec,
)

from cmtrace.analysis import build_lifetimes, load
from cmtrace.analysis.model import COUNTER_COLUMNS, FdModel
from cmtrace.trace import schema
from cmtrace.trace.reader import read_events

DATA = Path(__file__).resolve().parents[1] / "data"
SAVED = sorted(p.name for p in DATA.iterdir() if (p / "events").is_dir())
CLOSE_RANGE_CLOEXEC = 4  # linux/close_range.h
CHILD, GRANDCHILD = 200, 300


def _saved(name: str) -> tuple[pa.Table, pd.DataFrame | None]:
    path = DATA / name
    events = read_events(path, columns=None)
    order = np.argsort(events.column("t_ns").to_numpy(), kind="stable")
    return events.take(pa.array(order)), load(path).preexisting


def _batches(events: pa.Table, cuts: list[int], as_frames: bool) -> list[pa.Table | pd.DataFrame]:
    """The events cut at these rows; as DataFrames each batch has its own vocabularies (its
    own categories of kind, path and syscall), as the live view's reads would."""
    edges = [0, *sorted(cuts), len(events)]
    parts = [events.slice(a, b - a) for a, b in zip(edges, edges[1:])]
    return [p.to_pandas() for p in parts] if as_frames else parts


def _fed(batches: list, pre: pd.DataFrame | None) -> FdModel:
    model = FdModel(pre)
    for batch in batches:
        model.feed(batch)
    return model


def _values(lives: pd.DataFrame) -> pd.DataFrame:
    """The lifetimes with text columns as plain strings: the order of a categorical's
    categories is the order strings were first met, which batches change."""
    text = lives.select_dtypes("category").columns
    return lives.astype({c: object for c in text})


def _assert_same_model(one: tuple[pd.DataFrame, object, dict], model: FdModel) -> None:
    whole, stats, facts = one
    pd.testing.assert_frame_equal(_values(model.lifetimes()), _values(whole))
    assert model.stats == stats
    assert model.facts == facts


def _whole(events: pa.Table, pre: pd.DataFrame | None) -> tuple[pd.DataFrame, object, dict]:
    facts: dict = {}
    lives, stats = build_lifetimes(events, pre, facts=facts)
    return lives, stats, facts


# --- random cuts of recorded and hand-built traces -------------------------------------------
@pytest.mark.parametrize("name", SAVED)
def test_saved_trace_in_random_batches(name: str) -> None:
    events, pre = _saved(name)
    one = _whole(events, pre)
    rng = np.random.default_rng(len(events))
    for round_ in range(12):
        cuts = rng.integers(0, len(events) + 1, int(rng.integers(1, 40))).tolist()
        _assert_same_model(one, _fed(_batches(events, cuts, as_frames=round_ % 2 == 1), pre))


@pytest.mark.parametrize("name", SAVED)
def test_saved_trace_one_event_at_a_time(name: str) -> None:
    events, pre = _saved(name)
    one = _whole(events, pre)
    _assert_same_model(one, _fed(_batches(events, list(range(1, len(events))), False), pre))


@pytest.mark.parametrize("name", CASES)
def test_built_case_cut_everywhere(name: str) -> None:
    """Every hand-built case cut at every row, in two batches and in one-row batches."""
    case = CASES[name]
    events = events_table(case.events)
    pre = preexisting_frame(case.preexisting) if case.preexisting else None
    one = _whole(events, pre)
    # The first batch holds the events up to the attach-time snapshot (FdModel.feed).
    first = 1 if case.preexisting and any(r.get("t_ns") for r in case.preexisting) else 0
    for cut in range(first, len(events) + 1):
        _assert_same_model(one, _fed(_batches(events, [cut], as_frames=cut % 2 == 0), pre))
    _assert_same_model(one, _fed(_batches(events, list(range(1, len(events))), True), pre))


def _busy_process_tree(rng: np.random.Generator, n: int) -> list[dict]:
    """A parent, a child and a grandchild opening, dup2'ing, closing, marking CLOEXEC and
    close_range'ing fds at random, the child forked with fds open, exec and exit mid-way."""
    rows: list[dict] = []
    t = 0

    def ops(pid: int, count: int) -> None:
        nonlocal t
        for _ in range(count):
            t += 1
            fd = int(rng.integers(3, 12))
            choice = rng.random()
            if choice < 0.4:
                rows.append(birth(t, fd, pid=pid, stack_id=int(rng.integers(1, 6))))
            elif choice < 0.5:
                rows.append(birth(t, fd, "dup2", pid=pid, src_fd=int(rng.integers(3, 12))))
            elif choice < 0.8:
                rows.append(close(t, fd, pid=pid, stack_id=int(rng.integers(6, 9))))
            elif choice < 0.9:
                rows.append(set_cloexec(t, fd, bool(rng.random() < 0.7), pid=pid))
            elif choice < 0.95:
                flags = CLOSE_RANGE_CLOEXEC if rng.random() < 0.5 else 0
                rows.append(close_range(t, fd, fd + 3, flags, pid=pid))

    ops(PID, n)
    t += 1
    rows.append(fork(t, CHILD))
    ops(CHILD, n)
    ops(PID, n)
    t += 1
    rows.append(fork(t, GRANDCHILD, pid=CHILD))
    t += 1
    rows.append(exec_(t, pid=CHILD))
    ops(GRANDCHILD, n)
    ops(CHILD, n)
    t += 1
    rows.append(exit_(t, pid=GRANDCHILD))
    ops(PID, n)
    t += 1
    rows.append(exit_(t, pid=CHILD))
    return rows


@pytest.mark.parametrize("seed", range(6))
def test_process_tree_in_random_batches(seed: int) -> None:
    rng = np.random.default_rng(seed)
    events = events_table(_busy_process_tree(rng, 40))
    pre = preexisting_frame([{"fd": 0}, {"fd": 1}, {"fd": 5, "cloexec": True}])
    one = _whole(events, pre)
    for round_ in range(10):
        cuts = rng.integers(0, len(events) + 1, int(rng.integers(1, 30))).tolist()
        _assert_same_model(one, _fed(_batches(events, cuts, as_frames=round_ % 2 == 0), pre))


# --- the open fds midway, against a replay of the events one at a time ----------------------
def _replay(rows: list[dict], pre: pd.DataFrame | None) -> dict[tuple[int, int], bool]:
    """(pid, fd) -> CLOEXEC of every open fd after these events, applied one at a time."""
    table: dict[tuple[int, int], bool] = {}
    if pre is not None:
        for r in pre.itertuples():
            table[(int(r.pid), int(r.fd))] = bool(r.cloexec)
    for e in rows:
        pid, fd, op = int(e["pid"]), int(e["fd"]), e["op"]
        if op == schema.OP_BIRTH:
            table[(pid, fd)] = bool(e["cloexec"])
        elif op == schema.OP_CLOSE:
            table.pop((pid, fd), None)
        elif op == schema.OP_CLOEXEC and (pid, fd) in table:
            table[(pid, fd)] = bool(e["cloexec"])
        elif op == schema.OP_CLOSE_RANGE:
            for key in [k for k in table if k[0] == pid and fd <= k[1] <= int(e["arg"])]:
                if int(e["flags"]) & CLOSE_RANGE_CLOEXEC:
                    table[key] = True
                else:
                    del table[key]
        elif op == schema.OP_FORK:
            child = int(e["arg"])
            table.update({(child, k[1]): v for k, v in list(table.items()) if k[0] == pid})
        elif op == schema.OP_EXEC:
            table = {k: v for k, v in table.items() if k[0] != pid or not v}
        elif op == schema.OP_EXIT:
            table = {k: v for k, v in table.items() if k[0] != pid}
    return table


def _open_now(model: FdModel) -> dict[tuple[int, int], bool]:
    fds = model.open_fds()
    return {(int(p), int(f)): bool(c) for p, f, c in zip(fds["pid"], fds["fd"], fds["cloexec"])}


@pytest.mark.parametrize("name", [*SAVED, "tree-0", "tree-1", "tree-2"])
def test_open_fds_midway_match_a_replay(name: str) -> None:
    if name.startswith("tree-"):
        rng = np.random.default_rng(int(name[-1]))
        events = events_table(_busy_process_tree(rng, 40))
        pre = preexisting_frame([{"fd": 0}, {"fd": 5, "cloexec": True}])
    else:
        events, pre = _saved(name)
    rows = events.to_pylist()
    rng = np.random.default_rng(3)
    cuts = sorted(set(rng.integers(1, len(events), 8).tolist()))
    model = FdModel(pre)
    for batch, end in zip(_batches(events, cuts, as_frames=False), [*cuts, len(events)]):
        model.feed(batch)
        assert _open_now(model) == _replay(rows[:end], pre), f"after {end} events"


# --- per-site counters -------------------------------------------------------------------
@pytest.mark.parametrize("name", SAVED)
def test_site_counters_add_up_to_the_lifetimes(name: str) -> None:
    events, pre = _saved(name)
    whole, _, _ = _whole(events, pre)
    expected = (
        whole.assign(closed=whole["died_ns"].notna().astype(np.int64))
        .groupby(["pid", "open_stack"])
        .agg(opened=("fd", "size"), closed=("closed", "sum"))
    )
    model = _fed(_batches(events, [len(events) // 3, len(events) // 2], False), pre)
    counters = model.site_counters().set_index(["pid", "stack_id"])
    assert list(model.site_counters().columns) == list(COUNTER_COLUMNS)
    assert counters["opened"].to_dict() == expected["opened"].to_dict()
    assert counters["closed"].to_dict() == expected["closed"].to_dict()
    assert (counters["live"] == counters["opened"] - counters["closed"]).all()
    assert counters["live"].sum() == whole["died_ns"].isna().sum()


@pytest.mark.parametrize("name", SAVED)
def test_a_model_keeping_no_lifetimes_counts_the_same(name: str) -> None:
    """keep_lifetimes=False (the live view's model) folds ended lifetimes into the counters
    and drops them: the counters and open fds still equal those of a model keeping them."""
    events, pre = _saved(name)
    cuts = sorted(set(np.random.default_rng(5).integers(1, len(events), 6).tolist()))
    keeping, lean = FdModel(pre), FdModel(pre, keep_lifetimes=False)
    for batch in _batches(events, cuts, as_frames=False):
        keeping.feed(batch)
        lean.feed(batch)
        pd.testing.assert_frame_equal(lean.site_counters(), keeping.site_counters())
        assert _open_now(lean) == _open_now(keeping)
    assert lean._ended == []
    with pytest.raises(ValueError, match="keep_lifetimes"):
        lean.lifetimes()


def test_counter_rows_of_an_aggregated_trace_add_to_the_events() -> None:
    model = FdModel()
    model.feed(events_table([birth(1, 3, stack_id=7), birth(2, 4, stack_id=7), close(3, 3)]))
    model.feed_counters(
        pd.DataFrame(
            {"pid": [PID, PID, 9], "stack_id": [7, 8, 8], "opened": [10, 5, 2], "closed": [4, 5, 0]}
        )  # fmt: skip
    )
    model.feed_counters(pd.DataFrame({"pid": [9], "stack_id": [8], "opened": [1], "closed": [3]}))
    got = model.site_counters().set_index(["pid", "stack_id"]).to_dict("index")
    assert got == {
        (PID, 7): {"opened": 12, "closed": 5, "live": 7},
        (PID, 8): {"opened": 5, "closed": 5, "live": 0},
        (9, 8): {"opened": 3, "closed": 3, "live": 0},
    }
    with pytest.raises(ValueError, match="closed"):
        model.feed_counters(pd.DataFrame({"pid": [1], "stack_id": [1], "opened": [1]}))
