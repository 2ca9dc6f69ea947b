"""The fd-table model, fed in batches: events (or per-site counters) in, fd lifetimes out.

One model serves the whole trace and the live view alike: `build_lifetimes` is one `feed` of the
whole trace, a live view feeds each new batch of events as it arrives. Between batches the model
keeps only what the next batch can change:

- the fds open at the end of the batch (their birth, flags, dup source and CLOEXEC state now),
  which seed the next batch's pairing, so a close in batch 5 ends a birth of batch 2;
- the lifetimes already ended, appended as chunks (concatenated once, when asked for);
- the pairing counts, the event facts (rows, last time, lost records, forked pids);
- per-site counters (opened / closed / live per (pid, open stack)), folded from the lifetimes
  chunk by chunk when asked for, plus whatever counter rows `feed_counters` was given (a trace
  aggregated by the recorder has counters, not events).

Inside a batch the events are paired with vectorized numpy (cmtrace.analysis.pairing); the rare
process-wide events (close_range, exec, exit) and forks go through cmtrace.analysis.processes,
one generation of children at a time.

Batches come in time order. Events of a pid before its fork, in the same batch, are not modelled
(a reused pid, or a child's event stamped before its parent's fork record); in an earlier batch
they are, as the model cannot know that pid will be forked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
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
    NO_DEATH,
    Lives,
    PairingStats,
    Seed,
    pair,
)
from cmtrace.analysis.processes import (
    Table,
    add_children,
    apply_process_events,
    copy_dup_sources,
    last_cloexec,
    merge_stats,
    preexisting_seed,
    rows_by_pid,
)
from cmtrace.trace import schema

# Columns of the lifetimes table (one row per fd lifetime).
LIFETIME_COLUMNS = (
    "pid", "fd", "tid", "kind", "path", "syscall", "born_ns", "died_ns", "death",
    "open_stack", "close_stack", "close_tid", "close_syscall", "src_fd", "cloexec",
    "inherited", "preexisting", "finalizing",
)  # fmt: skip
# Columns of the per-site counters (`site_counters`, and the rows `feed_counters` takes).
COUNTER_COLUMNS = ("pid", "stack_id", "opened", "closed", "live")
_PROCESS_OPS = [CLOSE_RANGE, EXEC, EXIT]


class EventFacts(TypedDict):
    """Facts of the event stream reported beside the lifetimes."""

    rows: int
    last_ns: int  # the last event's time
    lost: int  # events the recorder counted as lost
    children: set[int]  # pids created by a traced fork


class FdModel:
    """The fd tables of every traced process, built from batches of events in time order."""

    def __init__(
        self, preexisting: pd.DataFrame | None = None, keep_lifetimes: bool = True
    ) -> None:
        """`keep_lifetimes=False`: a watcher that needs only the counters and the open fds
        (a live view left on a busy service for hours): ended lifetimes are folded into the
        counters batch by batch and dropped, so memory follows the open fds and the distinct
        sites, not every fd ever opened; `lifetimes()` is then refused."""
        self.keep_lifetimes = keep_lifetimes
        self.stats = PairingStats()
        self.facts: EventFacts = {"rows": 0, "last_ns": 0, "lost": 0, "children": set()}
        self._preexisting = preexisting  # seeds the first batch only
        self._vocabs: tuple[Vocab, Vocab, Vocab, StackIds] | None = None
        self._ended: list[Lives] = []  # lifetimes of earlier batches, all ended
        self._last: Table | None = None  # the last batch's lifetimes, open ones included
        self._counted = 0  # how many of _ended the counters hold
        self._counters = _empty_counters()  # opened/closed of the ended chunks counted so far
        self._fed_counters = _empty_counters()  # rows from feed_counters

    # --- input ----------------------------------------------------------------------------
    def feed(self, events: EventSource | Events) -> None:
        """Model one batch of events (a table, a DataFrame, a trace directory or Events), all
        of them later than the previous batch's."""
        ev = self._shared_vocabs(events if isinstance(events, Events) else read_events(events))
        del events
        seeds = [self._carried_seed()]
        if self._preexisting is not None:
            # The snapshot's fds born during the trace before it are looked for in the first
            # batch: it must hold the events up to the snapshot (the attach time).
            seeds.append(preexisting_seed(self._preexisting, ev))
            self._preexisting = None
        self._last = _model_batch(ev, [s for s in seeds if s is not None], self.stats, self.facts)

    def feed_counters(self, rows: pd.DataFrame) -> None:
        """Add per-site counter rows (pid, stack_id, opened, closed: counts since the site's
        previous row) from a trace the recorder aggregated; `live` is opened - closed."""
        wanted = ["pid", "stack_id", "opened", "closed"]
        missing = [c for c in wanted if c not in rows]
        if missing:
            raise ValueError(f"counter rows lack {', '.join(missing)}")
        self._fed_counters = _sum_counters([self._fed_counters, rows[wanted]])

    # --- output ---------------------------------------------------------------------------
    def lifetimes(self, release: bool = False) -> pd.DataFrame:
        """Every lifetime so far (LIFETIME_COLUMNS), open ones with null died_ns and death.
        With `release` the model's lifetimes are handed over (freed column by column, which
        bounds peak memory): feed nothing after that."""
        if not self.keep_lifetimes:
            raise ValueError("this FdModel keeps no ended lifetimes (keep_lifetimes=False)")
        parts = self._ended + ([self._last.lives] if self._last is not None else [])
        if release:
            self._ended, self._last = [], None
        kinds, paths, syscalls, stacks = self._vocabs or _empty_vocabs()
        return _to_frame(parts, kinds, paths, syscalls, stacks, copy=not release)

    def open_fds(self) -> pd.DataFrame:
        """The lifetimes open now (LIFETIME_COLUMNS), CLOEXEC as it is now."""
        kinds, paths, syscalls, stacks = self._vocabs or _empty_vocabs()
        if self._last is None:
            return _to_frame([], kinds, paths, syscalls, stacks, copy=False)
        table = self._last
        still_open = np.flatnonzero(table.lives.died == NO_DEATH)
        lives = _take(table.lives, still_open)
        lives.cloexec = last_cloexec(table, still_open)
        return _to_frame([lives], kinds, paths, syscalls, stacks, copy=False)

    def batch_lifetimes(self) -> pd.DataFrame:
        """The lifetimes the last batch could change (LIFETIME_COLUMNS): those open when it
        began and those born in it, ended or not. A watcher steps through their births and
        deaths to know each process's open fds at any instant of the batch, without
        re-reading the lifetimes of earlier batches."""
        kinds, paths, syscalls, stacks = self._vocabs or _empty_vocabs()
        parts = [self._last.lives] if self._last is not None else []
        return _to_frame(parts, kinds, paths, syscalls, stacks, copy=True)

    def site_counters(self) -> pd.DataFrame:
        """Per (pid, open stack id): lifetimes opened, closed (ended in any way) and live now
        (COUNTER_COLUMNS), from the events and the counter rows fed."""
        self._fold_ended()
        parts = [self._counters, self._fed_counters]
        if self._last is not None:
            parts.append(self._lives_counters(self._last.lives))
        counters = _sum_counters(parts)
        counters["live"] = counters["opened"] - counters["closed"]
        return counters.reset_index()[list(COUNTER_COLUMNS)]

    # --- between batches ------------------------------------------------------------------
    def _shared_vocabs(self, ev: Events) -> Events:
        """The batch's codes in the model's vocabularies (the first batch's become them)."""
        if self._vocabs is None:
            self._vocabs = (ev.kind_names, ev.path_names, ev.syscall_names, ev.stack_ids)
            return ev
        kinds, paths, syscalls, stacks = self._vocabs
        return replace(
            ev,
            kind=_recode(ev.kind, ev.kind_names, kinds),
            kind_names=kinds,
            path=_recode(ev.path, ev.path_names, paths),
            path_names=paths,
            syscall=_recode(ev.syscall, ev.syscall_names, syscalls),
            syscall_names=syscalls,
            stack=stacks.encode(ev.stack_ids.decode(ev.stack)),
            stack_ids=stacks,
        )

    def _carried_seed(self) -> Seed | None:
        """The last batch's open lifetimes as the next batch's seed; its ended ones move to
        the ended chunks."""
        table, self._last = self._last, None
        if table is None:
            return None
        lives = table.lives
        still_open = lives.died == NO_DEATH
        ended = _take(lives, np.flatnonzero(~still_open))
        if self.keep_lifetimes:
            self._ended.append(ended)
        else:  # counted now, then dropped
            self._counters = _sum_counters([self._counters, self._lives_counters(ended)])
        rows = np.flatnonzero(still_open)
        return Seed(
            pid=lives.pid[rows], fd=lives.fd[rows], t=lives.born[rows], kind=lives.kind[rows],
            path=lives.path[rows], cloexec=lives.cloexec[rows],
            open_stack=lives.open_stack[rows], syscall=lives.syscall[rows],
            tid=lives.tid[rows], inherited=lives.inherited[rows],
            preexisting=lives.preexisting[rows], src_fd=lives.src_fd[rows],
            cloexec_now=last_cloexec(table, rows),
        )  # fmt: skip

    def _fold_ended(self) -> None:
        new = self._ended[self._counted :]
        if new:
            self._counters = _sum_counters([self._counters, *map(self._lives_counters, new)])
            self._counted = len(self._ended)

    def _lives_counters(self, lives: Lives) -> pd.DataFrame:
        stacks = self._vocabs[3] if self._vocabs else StackIds()
        frame = pd.DataFrame(
            {
                "pid": lives.pid.astype(np.int64),
                "stack_id": stacks.decode(lives.open_stack),
                "opened": 1,
                "closed": (lives.died != NO_DEATH).astype(np.int64),
            }
        )
        return _sum_counters([frame])


def _model_batch(ev: Events, seeds: list[Seed], total: PairingStats, facts: EventFacts) -> Table:
    """Pair one batch of events plus the seeds: generation 0 (every process not forked in this
    batch) in one vectorized pass, then the forked children a generation at a time."""
    fork_rows = np.flatnonzero(ev.op == FORK)
    children = np.unique(ev.arg[fork_rows]) if len(fork_rows) else np.zeros(0, np.int64)
    _add_facts(facts, ev, children)
    in_child = np.isin(ev.pid, children)
    table = Table()
    # Children's events are masked out, not copied: a copy would double the events' memory.
    lives, changes, stats = pair(ev, seeds, ~in_child if in_child.any() else None)
    merge_stats(total, stats)
    copy_dup_sources(table, table.add(lives, changes), ev)
    pending = np.flatnonzero(~in_child & np.isin(ev.op, _PROCESS_OPS))
    apply_process_events(table, ev, pending, total)
    if len(fork_rows):
        _model_children(table, ev, fork_rows, in_child, total)
    total.forks += len(fork_rows)
    return table


def _model_children(
    table: Table, ev: Events, fork_rows: np.ndarray, in_child: np.ndarray, total: PairingStats
) -> None:
    """Children whose parent is already modelled, all of a generation at once."""
    todo = fork_rows.tolist()
    child_of = dict(zip(todo, ev.arg[fork_rows].tolist()))
    rows_of = rows_by_pid(ev, np.flatnonzero(in_child))
    processed_pids = set(pd.unique(ev.pid[~in_child]).tolist())
    child_set = set(child_of.values())
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


def _add_facts(facts: EventFacts, ev: Events, children: np.ndarray) -> None:
    lost = ev.arg[np.flatnonzero(ev.op == LOST)]
    facts["rows"] += len(ev)
    if len(ev):
        facts["last_ns"] = int(ev.t[-1])  # in time order
    facts["lost"] += int(lost.sum())
    facts["children"].update(children.tolist())


def _recode(codes: np.ndarray, names: Vocab, into: Vocab) -> np.ndarray:
    """Codes of `names` as codes of `into` (-1, null, stays -1)."""
    lookup = np.append(into.encode(names.names), -1).astype(np.int32)
    recoded: np.ndarray = lookup[codes]
    return recoded


def _take(lives: Lives, rows: np.ndarray) -> Lives:
    return Lives(**{name: getattr(lives, name)[rows] for name in Lives.__dataclass_fields__})


def _empty_vocabs() -> tuple[Vocab, Vocab, Vocab, StackIds]:
    return Vocab([]), Vocab([]), Vocab([]), StackIds()


def _empty_counters() -> pd.DataFrame:
    index = pd.MultiIndex.from_arrays(
        [np.zeros(0, np.int64), np.zeros(0, np.int64)], names=["pid", "stack_id"]
    )
    return pd.DataFrame({"opened": np.zeros(0, np.int64), "closed": np.zeros(0, np.int64)}, index)


def _sum_counters(parts: list[pd.DataFrame]) -> pd.DataFrame:
    """opened and closed summed per (pid, stack_id), as a frame indexed by those two."""
    flat = [p.reset_index() if isinstance(p.index, pd.MultiIndex) else p for p in parts]
    rows = pd.concat([f[["pid", "stack_id", "opened", "closed"]] for f in flat], ignore_index=True)
    rows = rows.astype(np.int64)
    return rows.groupby(["pid", "stack_id"], sort=True)[["opened", "closed"]].sum()


def _to_frame(
    parts: list[Lives],
    kinds: Vocab,
    paths: Vocab,
    syscalls: Vocab,
    stacks: StackIds,
    copy: bool,
) -> pd.DataFrame:
    """The lifetimes of `parts` as one frame in (born, pid, fd) order. Without `copy`, each
    part's arrays are released as soon as their column is built (peak memory)."""
    parts = [p for p in parts if len(p)]
    if not parts:
        return pd.DataFrame({c: pd.Series(dtype=_dtype(c)) for c in LIFETIME_COLUMNS})
    order = _frame_order(parts)

    def take(name: str, convert: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
        """The column in frame order; the parts' arrays are released at once (peak memory)."""
        pieces = [getattr(p, name) for p in parts]
        values = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        if order is not None:
            values = values[order]
        elif copy and len(pieces) == 1:
            values = values.copy()
        if not copy:
            for p in parts:
                setattr(p, name, None)
        return convert(values) if convert else values

    def int32(values: np.ndarray) -> np.ndarray:
        return values.astype(np.int32, copy=False)

    def deaths(values: np.ndarray) -> pd.Categorical:
        # Interpreter finalization closing an fd is a leak by definition (DESIGN: What counts).
        values = values.astype(np.int32)
        values[(values == DEATH_CODE[schema.OP_CLOSE]) & finalizing] = DEATH_CODE[
            "interpreter-shutdown"
        ]
        return DEATH_VOCAB.categorical(values)

    died = take("died")
    open_at_end = died == NO_DEATH
    died[open_at_end] = 0
    finalizing = take("finalizing")
    columns = {
        "pid": take("pid", int32),
        "fd": take("fd", int32),
        "tid": take("tid", int32),
        "kind": take("kind", kinds.categorical),
        "path": take("path", paths.categorical),
        "syscall": take("syscall", syscalls.categorical),
        "born_ns": take("born"),
        "died_ns": pd.arrays.IntegerArray(died, open_at_end),
        "death": take("death", deaths),
        "open_stack": take("open_stack", stacks.decode),
        "close_stack": take("close_stack", stacks.decode),
        "close_tid": take("close_tid", int32),
        "close_syscall": take("close_syscall", syscalls.categorical),
        "src_fd": take("src_fd", int32),
        "cloexec": take("cloexec"),
        "inherited": take("inherited"),
        "preexisting": take("preexisting"),
        "finalizing": finalizing,
    }
    frame = pd.DataFrame(columns, copy=False)
    frame.index.name = "life_id"
    return frame


def _frame_order(parts: list[Lives]) -> np.ndarray | None:
    """The permutation into (born, pid, fd) order, None when the rows are in it already.

    Each pairing numbers its lifetimes in that order; generations of forked children and
    batches each add a run of their own, merged here. Only rows tied on birth time are keyed
    when checking (millions of lifetimes, a few ties).
    """

    def column(name: str) -> np.ndarray:
        values: np.ndarray = (
            np.concatenate([getattr(p, name) for p in parts])
            if len(parts) > 1
            else getattr(parts[0], name)
        )
        return values

    born = column("born")
    if len(born) < 2:
        return None
    not_later = np.flatnonzero(born[1:] <= born[:-1])
    if not len(not_later):
        return None

    def key(rows: np.ndarray | None = None) -> np.ndarray:
        pid, fd = column("pid"), column("fd")
        if rows is not None:
            pid, fd = pid[rows], fd[rows]
        keys: np.ndarray = (pid.astype(np.int64) << 32) | (fd.astype(np.int64) & 0xFFFFFFFF)
        return keys

    tied = bool((born[not_later + 1] == born[not_later]).all())
    if tied and bool((key(not_later + 1) > key(not_later)).all()):
        return None
    order: np.ndarray = np.lexsort((key(), born))
    return order


def _dtype(column: str) -> str:
    return {
        "pid": "int32", "fd": "int32", "tid": "int32", "born_ns": "int64", "died_ns": "Int64",
        "open_stack": "int64", "close_stack": "int64", "close_tid": "int32", "src_fd": "int32",
        "cloexec": "bool", "inherited": "bool", "preexisting": "bool", "finalizing": "bool",
    }.get(column, "object")  # fmt: skip
