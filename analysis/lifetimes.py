"""The one model of fd tables: pair the recorded events into fd lifetimes.

The collector records only what the kernel saw (cmtrace.trace.schema: birth, close, close_range,
cloexec, addr, fork, exec, exit). This module derives everything implicit:

- a `close` ends the live lifetime of (pid, fd); a close of an fd never seen born is counted as an
  unknown close;
- a `birth` on a live (pid, fd) first ends that lifetime, with the birth's syscall as its death
  (this is how dup2/dup3 onto a live fd shows);
- `close_range` ends every live fd of the pid in [fd, arg], or only marks them CLOEXEC when its
  flags hold CLOSE_RANGE_CLOEXEC;
- `exec` ends the live CLOEXEC fds of the pid, `exit` ends all of them (death "process-exit");
- `fork` copies the parent's live fds into the child as inherited lifetimes;
- pre-existing fds (the attach-time snapshot) are live from the start.

It must scale to tens of millions of events, so the common events (births, closes, cloexec and
addr updates) are paired with vectorized numpy over a (pid, fd, time) sort; only the rare
process-wide events (fork, exec, exit, close_range) are applied one by one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypedDict

import numpy as np
import pandas as pd

from cmtrace.analysis.events import (
    CLOSE_RANGE,
    EXEC,
    EXIT,
    FORK,
    LOST,
    Events,
    EventSource,
    StackIds,
    Vocab,
    read_events,
)
from cmtrace.analysis.pairing import (
    DEATH_CODE,
    DEATH_VOCAB,
    DEATHS,
    NO_DEATH,
    Lives,
    PairingStats,
    pair,
)
from cmtrace.analysis.processes import (
    Table,
    add_children,
    apply_process_events,
    copy_dup_sources,
    merge_stats,
    preexisting_seed,
    rows_by_pid,
)
from cmtrace.trace import schema

STDIO_FDS = 3  # fds 0, 1, 2

# Deaths that mean "nobody closed it": the fd lived until its process or interpreter went away.
LEAK_DEATHS = ("process-exit", "interpreter-shutdown", "loop-shutdown")

# Columns of the lifetimes table (one row per fd lifetime).
LIFETIME_COLUMNS = (
    "pid", "fd", "tid", "kind", "path", "syscall", "born_ns", "died_ns", "death",
    "open_stack", "close_stack", "close_tid", "close_syscall", "src_fd", "cloexec",
    "inherited", "preexisting", "finalizing",
)  # fmt: skip
__all__ = [
    "DEATHS",
    "LEAK_DEATHS",
    "LIFETIME_COLUMNS",
    "PairingStats",
    "build_lifetimes",
    "is_leak",
]


def build_lifetimes(
    events: EventSource,
    preexisting: pd.DataFrame | None = None,
    release: bool = False,
    facts: dict | None = None,
) -> tuple[pd.DataFrame, PairingStats]:
    """Pair the trace's events into one row per fd lifetime (LIFETIME_COLUMNS).

    `events` is a table, a DataFrame, or the trace directory (read column by column, which
    bounds peak memory). `died_ns` and `death` are null for an fd still open at the end. With
    `release`, the caller hands the table over: it is freed once read. A `facts` dict gets
    the event stream's rows, last_ns, lost (records) and children (forked pids), so that a
    caller needs no second pass over the events.
    """
    ev = read_events(events)
    if release:
        del events
    total = PairingStats()
    fork_rows = np.flatnonzero(ev.op == FORK)
    children = np.unique(ev.arg[fork_rows]) if len(fork_rows) else np.zeros(0, np.int64)
    if facts is not None:
        facts.update(_event_facts(ev, children))
    in_child = np.isin(ev.pid, children)
    table = Table()
    process_ops = [CLOSE_RANGE, EXEC, EXIT]

    # Generation 0: every process not created by a traced fork, paired in one vectorized pass
    # (children's events are masked out, not copied: a copy would double the events' memory).
    pre_seed = preexisting_seed(preexisting, ev)
    root = ~in_child if in_child.any() else None
    seeds = [pre_seed] if pre_seed is not None else []
    lives, changes, stats = pair(ev, seeds, root)
    merge_stats(total, stats)
    copy_dup_sources(table, table.add(lives, changes), ev)
    pending = np.flatnonzero(~in_child & np.isin(ev.op, process_ops))
    apply_process_events(table, ev, pending, total)

    # Later generations: children whose parent is already modelled, all of a generation at once.
    todo = fork_rows.tolist()
    if todo:
        child_of = dict(zip(todo, ev.arg[fork_rows].tolist()))
        rows_of = rows_by_pid(ev, np.flatnonzero(in_child))
        processed_pids = set(pd.unique(ev.pid[~in_child]).tolist())
        child_set = set(children.tolist())
    while todo:
        ready = [
            r for r in todo if int(ev.pid[r]) in processed_pids or int(ev.pid[r]) not in child_set
        ]
        if not ready:  # a fork cycle can only come from pid reuse: model the rest from scratch
            ready = todo
        done = set(ready)
        todo = [r for r in todo if r not in done]
        windows = add_children(table, ev, [(r, child_of[r]) for r in ready], rows_of, total)
        processed_pids.update(child for child, _ in windows)
    total.forks = len(fork_rows)
    vocabs = (ev.kind_names, ev.path_names, ev.syscall_names, ev.stack_ids)
    del ev, in_child  # the event columns are no longer needed: free them before the frame
    return _to_frame(table.lives, *vocabs), total


class EventFacts(TypedDict):
    """Facts of the event stream reported beside the lifetimes."""

    rows: int
    last_ns: int  # the last event's time
    lost: int  # events the recorder counted as lost
    children: set[int]  # pids created by a traced fork


def _event_facts(ev: Events, children: np.ndarray) -> EventFacts:
    lost = ev.arg[np.flatnonzero(ev.op == LOST)]
    return {
        "rows": len(ev),
        "last_ns": int(ev.t[-1]) if len(ev) else 0,  # in time order
        "lost": int(lost.sum()),
        "children": set(children.tolist()),
    }


def _to_frame(
    lives: Lives | None, kinds: Vocab, paths: Vocab, syscalls: Vocab, stacks: StackIds
) -> pd.DataFrame:
    if lives is None or len(lives) == 0:
        return pd.DataFrame({c: pd.Series(dtype=_dtype(c)) for c in LIFETIME_COLUMNS})
    # Interpreter finalization closing an fd is a leak by definition (DESIGN: What counts).
    shutdown = lives.finalizing & (lives.death == DEATH_CODE[schema.OP_CLOSE])
    lives.death[shutdown] = DEATH_CODE["interpreter-shutdown"]
    # Each generation's lifetimes come out in (born, pid, fd) order (pair); with traced forks,
    # a stable sort on birth time merges the generations.
    born = lives.born
    in_order = len(born) < 2 or bool(np.all(born[1:] >= born[:-1]))  # no traced forks
    order = None if in_order else np.argsort(born, kind="stable")

    def take(name: str, convert: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
        """The column in frame order; the unsorted array is released at once (peak memory)."""
        values = getattr(lives, name)
        values = values if order is None else values[order]
        setattr(lives, name, None)
        return convert(values) if convert else values

    def int32(values: np.ndarray) -> np.ndarray:
        return values.astype(np.int32, copy=False)

    died = take("died")
    open_at_end = died == NO_DEATH
    died[open_at_end] = 0
    columns = {
        "pid": take("pid", int32),
        "fd": take("fd", int32),
        "tid": take("tid", int32),
        "kind": take("kind", kinds.categorical),
        "path": take("path", paths.categorical),
        "syscall": take("syscall", syscalls.categorical),
        "born_ns": take("born"),
        "died_ns": pd.arrays.IntegerArray(died, open_at_end),
        "death": take("death", lambda v: DEATH_VOCAB.categorical(v.astype(np.int32))),
        "open_stack": take("open_stack", stacks.decode),
        "close_stack": take("close_stack", stacks.decode),
        "close_tid": take("close_tid", int32),
        "close_syscall": take("close_syscall", syscalls.categorical),
        "src_fd": take("src_fd", int32),
        "cloexec": take("cloexec"),
        "inherited": take("inherited"),
        "preexisting": take("preexisting"),
        "finalizing": take("finalizing"),
    }
    frame = pd.DataFrame(columns, copy=False)
    frame.index.name = "life_id"
    return frame


def _dtype(column: str) -> str:
    return {
        "pid": "int32", "fd": "int32", "tid": "int32", "born_ns": "int64", "died_ns": "Int64",
        "open_stack": "int64", "close_stack": "int64", "close_tid": "int32", "src_fd": "int32",
        "cloexec": "bool", "inherited": "bool", "preexisting": "bool", "finalizing": "bool",
    }.get(column, "object")  # fmt: skip


def is_leak(lifetimes: pd.DataFrame, child_pids: set[int] | frozenset = frozenset()) -> pd.Series:
    """Which lifetimes are leaks (DESIGN "What counts as a leak").

    Born during the trace (not pre-existing, not inherited) and either still open at the end or
    released only by process exit, interpreter shutdown or event-loop shutdown. A child's stdio
    fds (0-2, typically dup2'ed pipes) released by its exit are not leaks.
    """
    born_here = ~(lifetimes["preexisting"] | lifetimes["inherited"])
    death = lifetimes["death"]
    released_late = death.isin(LEAK_DEATHS) | death.isna()
    child_stdio = (
        lifetimes["pid"].isin(list(child_pids))
        & (lifetimes["fd"] < STDIO_FDS)
        & (death == "process-exit")
    )
    return born_here & released_late & ~child_stdio
