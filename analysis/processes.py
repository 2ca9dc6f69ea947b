"""Process-wide events: close_range, exec and exit, fork inheritance, pre-existing fds.

The lifetimes of every process live in one Table (per-pid lookup, the CLOEXEC change log);
children are modelled a generation at a time, once their parent's fd table is known.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cmtrace.analysis.events import BIRTH, CLOSE_RANGE, EXEC, EXIT, Events, Vocab
from cmtrace.analysis.pairing import (
    DEATH_CODE,
    Lives,
    PairingStats,
    Seed,
    cloexec_changes,
    pair,
)
from cmtrace.trace import schema

CLOSE_RANGE_CLOEXEC = 4  # linux/close_range.h: mark the range CLOEXEC instead of closing it
DUP_SYSCALLS = frozenset({"dup", "dup2", "dup3", "fcntl"})  # births that copy src_fd's file


class Table:
    """All lifetimes built so far, with per-pid lookup and the CLOEXEC change log."""

    def __init__(self) -> None:
        self._lives: Lives | None = None  # until the first add
        self._by_pid: dict[int, np.ndarray] = {}
        self._unindexed: list[np.ndarray] = []  # lifetimes added since by_pid was last read
        self.change_log: np.recarray = cloexec_changes(
            np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, bool)
        )

    @property
    def lives(self) -> Lives:
        """Every lifetime added so far (the model reads them only after the first add)."""
        if self._lives is None:
            raise ValueError("no lifetimes added to the table yet")
        return self._lives

    def add(self, lives: Lives, changes: np.recarray) -> np.ndarray:
        """Append lifetimes; return their global indices."""
        offset = len(self._lives) if self._lives is not None else 0
        self._lives = lives if self._lives is None else Lives.concat([self._lives, lives])
        changes = cloexec_changes(changes.life + offset, changes.t, changes.value)
        self.change_log = np.rec.array(np.concatenate([self.change_log, changes]))
        new: np.ndarray = np.arange(offset, offset + len(lives))
        if len(new):
            self._unindexed.append(new)
        return new

    @property
    def by_pid(self) -> dict[int, np.ndarray]:
        """pid -> global indices of its lifetimes, in the order added. Built when first read:
        a trace without process events or dups never needs it (millions of lifetimes)."""
        for new in self._unindexed:
            pids = self.lives.pid[new]
            order = np.argsort(pids, kind="stable")
            uniq, starts = np.unique(pids[order], return_index=True)
            for pid, chunk in zip(uniq, np.split(new[order], starts[1:])):
                old = self._by_pid.get(int(pid))
                self._by_pid[int(pid)] = chunk if old is None else np.concatenate([old, chunk])
        self._unindexed = []
        return self._by_pid

    def live_at(self, pid: int, t: int) -> np.ndarray:
        """Global indices of the lifetimes of pid open at time t (born before, not yet dead)."""
        cand = self.by_pid.get(int(pid))
        if cand is None or self._lives is None:
            return np.zeros(0, dtype=np.int64)
        lv = self._lives
        born, died = lv.born[cand], lv.died[cand]
        # An inherited fd is born at the fork instant, so "at t" includes it.
        started = (born < t) | ((born == t) & lv.inherited[cand])
        live: np.ndarray = cand[started & (died > t)]
        return live

    def cloexec_at(self, lives_idx: np.ndarray, t: int) -> np.ndarray:
        """CLOEXEC state of each lifetime at time t: its last change at or before t."""
        state: np.ndarray = self.lives.cloexec[lives_idx].copy()
        log = self.change_log
        if len(log) and len(lives_idx):
            sel = np.isin(log.life, lives_idx) & (log.t <= t)
            position = {life: i for i, life in enumerate(lives_idx)}
            for life, value in zip(log.life[sel], log.value[sel]):  # in time order
                state[position[life]] = value
        return state

    def end(
        self, lives_idx: np.ndarray, t: int, death: str, ev: Events, row: int, stats: PairingStats
    ) -> None:
        """End lifetimes at t (a process-wide event). The pairing may have ended them later, at
        a close or a birth on the fd, and applied CLOEXEC changes up to then: that close is
        now of an fd not live (unknown), that birth no missed close, those changes orphans."""
        lives = self.lives
        stats.unknown_closes += int(lives.death_is_close_event[lives_idx].sum())
        stats.missed_closes -= int(lives.death_is_missed_close[lives_idx].sum())
        lives.died[lives_idx] = t
        lives.death[lives_idx] = DEATH_CODE[death]
        lives.close_stack[lives_idx] = ev.stack[row]
        lives.close_tid[lives_idx] = ev.tid[row]
        lives.close_syscall[lives_idx] = ev.syscall[row]
        lives.finalizing[lives_idx] = ev.finalizing[row]
        lives.death_is_close_event[lives_idx] = False
        lives.death_is_missed_close[lives_idx] = False
        log = self.change_log
        if len(log) and len(lives_idx):
            after = np.isin(log.life, lives_idx) & (log.t >= t)
            if after.any():
                stats.orphan_updates += int(after.sum())
                self.change_log = np.rec.array(log[~after])


def last_cloexec(table: Table, lives_idx: np.ndarray) -> np.ndarray:
    """CLOEXEC state of each lifetime after every change logged (Table.cloexec_at after the
    last event, for all of them at once: the last entry per lifetime in log order wins)."""
    state: np.ndarray = table.lives.cloexec[lives_idx].copy()
    log = table.change_log
    if not (len(log) and len(lives_idx)):
        return state
    position: np.ndarray = np.full(len(table.lives), -1, dtype=np.int64)
    position[lives_idx] = np.arange(len(lives_idx))
    at = position[log.life.astype(np.int64)]
    mine = np.flatnonzero(at >= 0)
    # The last entry of each lifetime: first in the reversed log.
    reversed_at = at[mine][::-1]
    _, first = np.unique(reversed_at, return_index=True)
    entries = mine[::-1][first]
    state[at[entries]] = log.value[entries]
    return state


def apply_process_events(table: Table, ev: Events, rows: np.ndarray, stats: PairingStats) -> None:
    """Apply close_range, exec and exit events (rows in time order) to the lifetimes table."""
    args, flags = ev.arg[rows], ev.flags[rows]  # sparse columns: looked up at once
    for i, row in enumerate(rows):
        pid, t, op = int(ev.pid[row]), int(ev.t[row]), ev.op[row]
        live = table.live_at(pid, t)
        if op == CLOSE_RANGE:
            lo, hi = ev.fd[row], args[i]
            in_range = live[(table.lives.fd[live] >= lo) & (table.lives.fd[live] <= hi)]
            if flags[i] & CLOSE_RANGE_CLOEXEC:
                marks = cloexec_changes(
                    in_range, np.full(len(in_range), t), np.ones(len(in_range), bool)
                )
                table.change_log = np.rec.array(np.concatenate([table.change_log, marks]))
            else:
                table.end(in_range, t, schema.OP_CLOSE_RANGE, ev, row, stats)
        elif op == EXEC:
            stats.execs += 1
            doomed = live[table.cloexec_at(live, t)]
            table.end(doomed, t, schema.OP_EXEC, ev, row, stats)
        elif op == EXIT:
            stats.exits += 1
            table.end(live, t, "process-exit", ev, row, stats)


def inherited_seed(table: Table, parent: int, child: int, t: int, ev_syscalls: Vocab) -> Seed:
    live = table.live_at(parent, t)
    lv = table.lives
    return Seed(
        pid=np.full(len(live), child, dtype=np.int64),
        fd=lv.fd[live],
        t=np.full(len(live), t, dtype=np.int64),
        kind=lv.kind[live],
        path=lv.path[live],
        cloexec=table.cloexec_at(live, t),
        open_stack=lv.open_stack[live],
        syscall=np.full(len(live), ev_syscalls.code("fork"), dtype=np.int32),
        tid=np.full(len(live), child, dtype=np.int64),
        inherited=True,
        preexisting=False,
    )


def copy_dup_sources(table: Table, new: np.ndarray, ev: Events) -> None:
    """dup/dup2/dup3/fcntl births refer to src_fd's file: copy its kind and path.

    The source is the lifetime of (pid, src_fd) live at the dup, found with an as-of join on
    birth time; a dup of a dup resolves over a few rounds.
    """
    lv = table.lives
    dup_codes = [ev.syscall_names.code(name) for name in sorted(DUP_SYSCALLS)]
    dups = new[np.isin(lv.syscall[new], dup_codes) & (lv.src_fd[new] >= 0)]
    if not len(dups):
        return
    pids = np.unique(lv.pid[dups])
    cand = np.concatenate([table.by_pid[int(p)] for p in pids if int(p) in table.by_pid])
    cand = cand[np.isin(lv.fd[cand], np.unique(lv.src_fd[dups]))]  # only fds dup'ed from
    sources = pd.DataFrame(
        {"pid": lv.pid[cand], "fd": lv.fd[cand], "born": lv.born[cand], "src": cand}
    ).sort_values("born", kind="stable")
    wanted = pd.DataFrame(
        {"pid": lv.pid[dups], "fd": lv.src_fd[dups], "born": lv.born[dups], "dup": dups}
    ).sort_values("born", kind="stable")
    match = pd.merge_asof(wanted, sources, on="born", by=["pid", "fd"], direction="backward")
    match = match.dropna(subset=["src"])
    dup = match["dup"].to_numpy(np.int64)
    src = match["src"].to_numpy(np.int64)
    alive = (lv.died[src] >= lv.born[dup]) & (src != dup)
    dup, src = dup[alive], src[alive]
    for _ in range(3):
        unknown = (lv.kind[dup] < 0) | (lv.kind[dup] == ev.kind_names.code("unknown"))
        unknown &= lv.kind[src] >= 0
        lv.kind[dup[unknown]] = lv.kind[src[unknown]]
        nopath = (lv.path[dup] < 0) & (lv.path[src] >= 0)
        lv.path[dup[nopath]] = lv.path[src[nopath]]
        if not (unknown.any() or nopath.any()):
            break


def preexisting_seed(pre: pd.DataFrame | None, ev: Events) -> Seed | None:
    if pre is None or len(pre) == 0:
        return None
    pre = pre.reset_index(drop=True)
    pid = pre["pid"].to_numpy(np.int64)
    fd = pre["fd"].to_numpy(np.int64)
    snap_t = pre["t_ns"].fillna(0).to_numpy(np.int64) if "t_ns" in pre else np.zeros(len(pre))
    # Births of the snapshot's (pid, fd)s only: a trace has millions of births, a snapshot few.
    births = (ev.op == BIRTH) & np.isin(ev.fd, np.unique(fd)) & np.isin(ev.pid, np.unique(pid))
    if births.any():
        # A birth of the same (pid, fd) before the snapshot: the snapshot saw that new fd.
        born = pd.DataFrame({"pid": ev.pid[births], "fd": ev.fd[births], "t": ev.t[births]})
        first = born.groupby(["pid", "fd"])["t"].min()
        key = pd.MultiIndex.from_arrays([pid, fd])
        first_birth = first.reindex(key).to_numpy(dtype=float)
        keep = ~(first_birth < snap_t)
        pre, pid, fd = pre[keep].reset_index(drop=True), pid[keep], fd[keep]
    n = len(pre)
    none: np.ndarray = np.full(n, -1, dtype=np.int32)
    return Seed(
        pid=pid,
        fd=fd,
        t=np.full(n, -1, dtype=np.int64),  # live from before the trace started
        kind=ev.kind_names.encode(pre["kind"].astype(object)) if "kind" in pre else none,
        path=ev.path_names.encode(pre["path"].astype(object)) if "path" in pre else none,
        cloexec=pre["cloexec"].fillna(False).to_numpy(bool)
        if "cloexec" in pre
        else np.zeros(n, bool),
        open_stack=np.zeros(n, dtype=np.int32),  # stack code 0: no stack
        syscall=none,
        tid=pid,
        inherited=False,
        preexisting=True,
    )


def rows_by_pid(ev: Events, rows: np.ndarray) -> dict[int, np.ndarray]:
    """The event indices of each pid among `rows` (in time order)."""
    order = np.argsort(ev.pid[rows], kind="stable")
    pids = ev.pid[rows][order]
    uniq, starts = np.unique(pids, return_index=True)
    return {int(p): rows[chunk] for p, chunk in zip(uniq, np.split(order, starts[1:]))}


def add_children(
    table: Table,
    ev: Events,
    forks: list[tuple[int, int]],
    rows_of: dict[int, np.ndarray],
    total: PairingStats,
) -> list[tuple[int, int]]:
    """Model the children of `forks` ((fork event, child pid)); return their (pid, fork time)."""
    seeds, windows = [], []
    for r, child in sorted(forks, key=lambda fork: ev.t[fork[0]]):
        parent, t = int(ev.pid[r]), int(ev.t[r])
        seeds.append(inherited_seed(table, parent, child, t, ev.syscall_names))
        windows.append((child, t))
    # Each child's own events: those of its pid from its fork on (up to a later fork of the same
    # pid number, which would be a reused pid).
    keep = []
    for child, t in windows:
        later = [t2 for c2, t2 in windows if c2 == child and t2 > t]
        end = min(later) if later else np.iinfo(np.int64).max
        rows = rows_of.get(child, np.zeros(0, dtype=np.int64))
        keep.append(rows[(ev.t[rows] >= t) & (ev.t[rows] < end)])
    # The children's rows in event order: a mask over the events, not a sort of the rows.
    chosen: np.ndarray = np.zeros(len(ev), dtype=bool)
    for rows in keep:
        chosen[rows] = True
    select = np.flatnonzero(chosen)
    lives, changes, stats = pair(ev, seeds, select)
    merge_stats(total, stats)
    copy_dup_sources(table, table.add(lives, changes), ev)
    pending = select[np.isin(ev.op[select], [CLOSE_RANGE, EXEC, EXIT])]
    apply_process_events(table, ev, pending, total)
    return windows


def merge_stats(total: PairingStats, part: PairingStats) -> None:
    total.unknown_closes += part.unknown_closes
    total.missed_closes += part.missed_closes
    total.orphan_updates += part.orphan_updates
