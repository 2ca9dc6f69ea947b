"""Pairing: the births, closes and per-fd updates of a set of processes into lifetimes, vectorized.

Rows are sorted by (pid, fd) then time; a close ends the lifetime of the last birth before it in
its group, a birth on a live fd ends it (dup2/dup3 replace, anything else is a missed close),
and cloexec/addr updates land on the lifetime live at their time. No Python loop per event.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from cmtrace.analysis.events import ADDR, BIRTH, CLOEXEC, CLOSE, Events, Sparse, Vocab
from cmtrace.trace import schema

# Every value of `death` (null = open at the end); the analysis refines "close" from the stack.
DEATHS = (
    "close", "exit", "finalizer", "dup2", "dup3", "fcntl", "close_range", "exec",
    "process-exit", "interpreter-shutdown", "loop-shutdown", "unknown",
)  # fmt: skip
DEATH_VOCAB = Vocab(DEATHS)
DEATH_CODE = {name: i for i, name in enumerate(DEATHS)}
REPLACING = frozenset({"dup2", "dup3", "fcntl"})  # births that may land on a live fd


@dataclass
class PairingStats:
    """What the pairing could not explain, so reports can say how complete the picture is."""

    unknown_closes: int = 0  # closes of fds never seen born (pre-attach, io_uring, lost events)
    missed_closes: int = 0  # births on a live fd by a non-dup syscall: its close was not seen
    orphan_updates: int = 0  # cloexec/addr events of fds not live at that time
    forks: int = 0
    execs: int = 0
    exits: int = 0


@dataclass
class Lives:
    """Lifetimes under construction, as parallel numpy arrays (one entry per lifetime)."""

    pid: np.ndarray
    fd: np.ndarray
    tid: np.ndarray
    kind: np.ndarray  # int32 codes (ev.kind_names)
    path: np.ndarray  # int32 codes (ev.path_names)
    syscall: np.ndarray  # int32 codes (ev.syscall_names)
    born: np.ndarray  # int64
    died: np.ndarray  # int64, NO_DEATH when open at the end
    death: np.ndarray  # int8 codes into DEATHS, -1 while open
    open_stack: np.ndarray
    close_stack: np.ndarray
    close_tid: np.ndarray
    close_syscall: np.ndarray  # int32 codes (ev.syscall_names)
    src_fd: np.ndarray
    cloexec: np.ndarray
    inherited: np.ndarray
    preexisting: np.ndarray
    finalizing: np.ndarray
    death_is_close_event: np.ndarray  # the death came from a paired close event
    death_is_missed_close: np.ndarray  # the death came from a birth on the live fd (no dup)

    @classmethod
    def concat(cls, parts: list[Lives]) -> Lives:
        return cls(
            **{
                name: np.concatenate([getattr(p, name) for p in parts])
                for name in cls.__dataclass_fields__
            }
        )

    def __len__(self) -> int:
        return len(self.pid)


NO_DEATH = np.iinfo(np.int64).max


def cloexec_changes(life: np.ndarray, t: np.ndarray, value: np.ndarray) -> np.recarray:
    """A table of CLOEXEC changes: (life index, t, new value) records, field types as given."""
    table: np.recarray = np.rec.fromarrays(  # type: ignore[call-overload]  # stubs want formats=
        [life, t, value], names="life,t,value"
    )
    return table


@dataclass
class Seed:
    """Lifetimes that start outside the event stream: pre-existing and inherited fds, and the
    fds a batched model carries open from one batch of events into the next (cmtrace.analysis
    .model): those keep their birth time, dup source and flags, and their CLOEXEC state now."""

    pid: np.ndarray
    fd: np.ndarray
    t: np.ndarray  # the lifetime's birth time
    kind: np.ndarray
    path: np.ndarray
    cloexec: np.ndarray  # at birth (the lifetimes table's column)
    open_stack: np.ndarray
    syscall: np.ndarray
    tid: np.ndarray
    inherited: bool | np.ndarray  # one flag for the seed, or one per row
    preexisting: bool | np.ndarray
    src_fd: np.ndarray | None = None  # None: -1 (not a dup)
    cloexec_now: np.ndarray | None = None  # None: unchanged since birth


@dataclass
class _Rows:
    """The fd events plus seeds, sorted by (pid, fd) and time: the pairing's working set.

    Only what the pairing needs of every row is kept (op, group starts and where the row came
    from); anything else is read from the events through `src` for the few rows that need it.
    """

    src: np.ndarray  # sorted row -> its event index in `ev`, or -(seed index + 1) for a seed
    op: np.ndarray
    new_group: np.ndarray  # first row of a (pid, fd)
    n_seed: int
    index_type: type


_FD_OPS = np.array([BIRTH, CLOSE, CLOEXEC, ADDR], dtype=np.int8)


def _sorted_rows(ev: Events, seeds: list[Seed], select: np.ndarray | None) -> _Rows:
    """Seeds first (as births), then the selected events in time order; one stable sort on
    (pid, fd) keeps time order inside each fd's rows, with the seeds first: they start before."""
    small = len(ev) < 2**31 - 2**20  # int32 row numbers halve the pairing's temporaries
    index_type = np.int32 if small else np.int64
    if select is None or select.dtype == bool:  # all events, or a mask over them
        fd_rows = np.isin(ev.op, _FD_OPS) & (ev.fd >= 0)
        if select is not None:
            fd_rows &= select
        idx = np.flatnonzero(fd_rows).astype(index_type)
        del fd_rows
    else:  # the (sorted) indices of a few processes' events
        idx = select[np.isin(ev.op[select], _FD_OPS) & (ev.fd[select] >= 0)].astype(index_type)
    n_seed = sum(len(s.pid) for s in seeds)
    order, new_group = _group_order(
        np.concatenate([s.pid for s in seeds] + [ev.pid[idx]]),
        np.concatenate([s.fd for s in seeds] + [ev.fd[idx]]),
    )
    order = order.astype(index_type)
    op = np.concatenate([np.full(n_seed, BIRTH, np.int8), ev.op[idx]])[order]
    src = _source_rows(order, n_seed, idx)
    return _Rows(src, op, new_group, n_seed, index_type)


def _group_order(pid: np.ndarray, fd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A stable sort of rows by (pid, fd), and the first row of each (pid, fd) in that order.

    The keys are hashed to dense group numbers in key order, which numpy's stable sort orders
    with a radix sort, 16 bits a pass: twice as fast as a comparison sort of 64-bit keys.
    """
    key = pid.astype(np.int64) << 32
    key |= fd.astype(np.int64) & 0xFFFFFFFF
    groups, uniques = pd.factorize(key, sort=True)
    del key
    n_groups = len(uniques)
    order = np.argsort((groups & 0xFFFF).astype(np.uint16), kind="stable")
    if n_groups > 1 << 16:  # group numbers < 2**31: a second pass on the high 16 bits
        high = (groups[order] >> 16).astype(np.uint16)
        order = order[np.argsort(high, kind="stable")]
        del high
    sizes = np.bincount(groups, minlength=n_groups)
    del groups
    new_group: np.ndarray = np.zeros(len(order), dtype=bool)
    new_group[np.cumsum(sizes)[:-1]] = True
    new_group[:1] = True
    return order, new_group


def _owners(rows: _Rows) -> tuple[np.ndarray, np.ndarray]:
    """(births, owner_life): the birth rows, and each row's lifetime index (-1: none).

    births_so_far[row] - 1 is the lifetime of the last birth at or before the row; the row
    belongs to it when that birth is in the row's own (pid, fd) group.
    """
    is_birth = rows.op == BIRTH
    n = len(is_birth)
    births_so_far = np.cumsum(is_birth, dtype=np.int64 if n >= 2**31 else np.int32)
    before_group = np.where(rows.new_group, births_so_far - is_birth, 0)
    np.maximum.accumulate(before_group, out=before_group)
    owner_life = np.where(births_so_far > before_group, births_so_far - 1, -1)
    return np.flatnonzero(is_birth).astype(rows.index_type), owner_life


def _first_closes(
    rows: _Rows, owner_life: np.ndarray, n_lives: int, stats: PairingStats
) -> np.ndarray:
    """Row of the close that ends each lifetime (-1: none); other closes are unknown closes.

    Rows are sorted, so the owners of close rows never decrease: a lifetime's first close is
    where the owner changes (no sort needed).
    """
    is_close = rows.op == CLOSE
    close_rows = np.flatnonzero(is_close & (owner_life >= 0)).astype(rows.index_type)
    close_lives = owner_life[close_rows]
    first: np.ndarray = np.ones(len(close_rows), dtype=bool)
    first[1:] = close_lives[1:] != close_lives[:-1]
    stats.unknown_closes = int(is_close.sum() - first.sum())
    closed_at_row: np.ndarray = np.full(n_lives, -1, dtype=rows.index_type)
    closed_at_row[close_lives[first]] = close_rows[first]
    return closed_at_row


def _next_births(rows: _Rows, births: np.ndarray) -> np.ndarray:
    """Row of the next birth of the same (pid, fd) after each birth (-1: none)."""
    next_birth: np.ndarray = np.full(len(births), -1, dtype=rows.index_type)
    if len(births) > 1:
        group_of_birth = np.cumsum(rows.new_group, dtype=rows.index_type)[births]
        same = group_of_birth[1:] == group_of_birth[:-1]
        next_birth[:-1] = np.where(same, births[1:], -1)
    return next_birth


def pair(
    ev: Events, seeds: list[Seed], select: np.ndarray | None = None
) -> tuple[Lives, np.recarray, PairingStats]:
    """Pair the fd events of `ev` (births, closes, cloexec, addr) plus seed lifetimes.

    `select` (a mask over `ev`, or sorted event indices) restricts the pairing to some
    processes' events without copying them. Returns the lifetimes, a table of CLOEXEC changes
    (life index, t, value) for exec, and the counts of what could not be paired.
    """
    stats = PairingStats()
    rows = _sorted_rows(ev, seeds, select)
    if len(ev) == 0:
        ev = empty_like(ev)
    births, owner_life = _owners(rows)
    closer = _first_closes(rows, owner_life, len(births), stats)
    # A lifetime without a close ends at the next birth of the same (pid, fd), if any.
    replacer = _next_births(rows, births)
    updates = _Updates.of(rows, owner_life)
    # From here on, events by their index in `ev`: the sorted rows are freed before the
    # lifetimes are built (the peak of the pairing's memory).
    del owner_life
    birth_src = rows.src[births]
    del births
    _to_events(closer, rows.src)
    _to_events(replacer, rows.src)  # a seed (-1 and below) replaces nothing, as "none" (-1)
    del rows
    # Lifetimes are numbered in birth-time order (ties: pid, fd), the frame's order: the few
    # per-lifetime arrays here are permuted once instead of every column of the frame later.
    born = _pick(ev.t, birth_src, seeds, "t", np.int64)
    by_birth = np.argsort(born, kind="stable")
    born, birth_src = born[by_birth], birth_src[by_birth]
    closer, replacer = closer[by_birth], replacer[by_birth]
    rank = np.empty(len(by_birth), dtype=birth_src.dtype)
    rank[by_birth] = np.arange(len(by_birth), dtype=birth_src.dtype)
    del by_birth
    lives = _lives_from_births(ev, seeds, birth_src, born)
    carried = _seed_cloexec_changes(seeds, birth_src, born)
    del birth_src, born
    _apply_closes(lives, ev, closer)
    _apply_replacements(lives, ev, (closer < 0) & (replacer >= 0), replacer, stats)
    changes = _apply_updates(lives, ev, updates, rank, stats)
    if len(carried):  # first: a seed's state precedes the events' changes
        changes = _join_changes([carried, changes])
    return lives, changes, stats


def _join_changes(parts: list[np.recarray]) -> np.recarray:
    return cloexec_changes(
        np.concatenate([p.life.astype(np.int64) for p in parts]),
        np.concatenate([p.t.astype(np.int64) for p in parts]),
        np.concatenate([p.value.astype(bool) for p in parts]),
    )


def _seed_cloexec_changes(
    seeds: list[Seed], birth_src: np.ndarray, born: np.ndarray
) -> np.recarray:
    """CLOEXEC changes of seeds whose state now differs from their state at birth (fds carried
    over from an earlier batch), dated at their birth so that every later change follows."""
    lives = np.flatnonzero(birth_src < 0)
    if not len(lives) or all(s.cloexec_now is None for s in seeds):
        return cloexec_changes(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, bool))
    at_birth: np.ndarray = _seed_field(seeds, "cloexec").astype(bool)
    now = np.concatenate(
        [np.asarray(s.cloexec if s.cloexec_now is None else s.cloexec_now, bool) for s in seeds]
    )
    seed_of = -birth_src[lives].astype(np.int64) - 1
    changed = now[seed_of] != at_birth[seed_of]
    lives = lives[changed].astype(np.int64)
    return cloexec_changes(lives, born[lives], now[seed_of[changed]])


def _to_events(row_of_life: np.ndarray, src: np.ndarray) -> None:
    """Replace sorted row numbers (-1: none) by the events' indices, in place."""
    some = np.flatnonzero(row_of_life >= 0)
    row_of_life[some] = src[row_of_life[some]]


@dataclass
class _Updates:
    """The cloexec and addr events of a pairing, with the lifetime each belongs to."""

    event: np.ndarray  # index in `ev`
    life: np.ndarray  # lifetime number in (pid, fd) order, -1: none
    is_addr: np.ndarray

    @classmethod
    def of(cls, rows: _Rows, owner_life: np.ndarray) -> _Updates:
        which = np.flatnonzero((rows.op == CLOEXEC) | (rows.op == ADDR))
        return cls(rows.src[which], owner_life[which], rows.op[which] == ADDR)


def _source_rows(order: np.ndarray, n_seed: int, idx: np.ndarray) -> np.ndarray:
    """Map each sorted row to its event index in `ev`, or -(seed index + 1) for a seed."""
    if not len(idx):
        return -(order + 1)  # seeds only: negative numbers (order's dtype is wide enough)
    src = idx[np.maximum(order - n_seed, 0)]
    if n_seed:  # few rows: fix them rather than a where() over all rows
        seed_rows = np.flatnonzero(order < n_seed)
        src[seed_rows] = -(order[seed_rows] + 1)
    return src


def _seed_field(seeds: list[Seed], name: str) -> np.ndarray:
    if not seeds:
        return np.zeros(0, dtype=object)
    values: np.ndarray = np.concatenate([np.asarray(getattr(s, name)) for s in seeds])
    return values


def _seed_flag(seeds: list[Seed], name: str) -> np.ndarray:
    """A flag per seed row (a seed holds one flag for all its rows, or one per row)."""
    if not seeds:
        return np.zeros(0, dtype=bool)
    flags: np.ndarray = np.concatenate(
        [np.broadcast_to(np.asarray(getattr(s, name), dtype=bool), len(s.pid)) for s in seeds]
    )
    return flags


def _seed_src_fd(seeds: list[Seed]) -> np.ndarray:
    values: np.ndarray = np.concatenate(
        [np.full(len(s.pid), -1, np.int32) if s.src_fd is None else s.src_fd for s in seeds]
    ).astype(np.int32)
    return values


def _pick(
    event_values: np.ndarray, rows: np.ndarray, seeds: list[Seed], seed_name: str, dtype: type
) -> np.ndarray:
    """A value per birth row (`rows`: event indices, or -(seed index + 1) for seeds)."""
    out: np.ndarray = np.asarray(event_values[np.maximum(rows, 0)], dtype=dtype)
    from_seed = np.flatnonzero(rows < 0)
    if len(from_seed):  # few rows: assign them rather than a where() over all rows
        seed_values = np.asarray(_seed_field(seeds, seed_name), dtype=dtype)
        out[from_seed] = seed_values[-rows[from_seed] - 1]
    return out


def _lives_from_births(ev: Events, seeds: list[Seed], rows: np.ndarray, born: np.ndarray) -> Lives:
    """One lifetime per birth row (`rows`: event indices, or -(seed index + 1) for seeds)."""
    rows = rows.astype(np.intp)  # index once at full width, not once per column gathered
    from_seed = np.flatnonzero(rows < 0)

    def pick(event_values: np.ndarray, seed_name: str, dtype: type) -> np.ndarray:
        return _pick(event_values, rows, seeds, seed_name, dtype)

    def pick_flag(name: str) -> np.ndarray:
        """A seed's flag (inherited, preexisting), False for lifetimes born from events."""
        out: np.ndarray = np.zeros(len(rows), dtype=bool)
        out[from_seed] = _seed_flag(seeds, name)[-rows[from_seed] - 1]
        return out

    def src_fd() -> np.ndarray:
        out: np.ndarray = ev.src_fd[np.maximum(rows, 0)].astype(np.int32)
        if len(from_seed):
            out[from_seed] = _seed_src_fd(seeds)[-rows[from_seed] - 1]
        return out

    count = len(rows)
    return Lives(
        pid=pick(ev.pid, "pid", np.int32),
        fd=pick(ev.fd, "fd", np.int32),
        tid=pick(ev.tid, "tid", np.int32),
        kind=pick(ev.kind, "kind", np.int32),
        path=pick(ev.path, "path", np.int32),
        syscall=pick(ev.syscall, "syscall", np.int32),
        born=born,
        died=np.full(count, NO_DEATH, dtype=np.int64),
        death=np.full(count, -1, dtype=np.int8),
        open_stack=pick(ev.stack, "open_stack", np.int32),
        close_stack=np.zeros(count, dtype=np.int32),
        close_tid=np.full(count, -1, dtype=np.int32),
        close_syscall=np.full(count, -1, dtype=np.int32),
        src_fd=src_fd(),
        cloexec=pick(ev.cloexec, "cloexec", bool),
        inherited=pick_flag("inherited"),
        preexisting=pick_flag("preexisting"),
        finalizing=np.zeros(count, dtype=bool),
        death_is_close_event=np.zeros(count, dtype=bool),
        death_is_missed_close=np.zeros(count, dtype=bool),
    )


def empty_like(ev: Events) -> Events:
    """A one-row dummy so fancy indexing of an empty event set works (never selected)."""
    values = {}
    for name in ev.__dataclass_fields__:
        value = getattr(ev, name)
        if name in Events.SHARED:
            values[name] = value
        elif isinstance(value, Sparse):
            values[name] = Sparse(np.zeros(0, np.int64), np.zeros(0, np.int64), 1)
        else:
            values[name] = np.zeros(1, dtype=value.dtype)
    values["kind"] = values["path"] = values["syscall"] = np.full(1, -1, dtype=np.int32)
    return Events(**values)


def _apply_closes(lives: Lives, ev: Events, closer: np.ndarray) -> None:
    """End lifetimes at their close event (`closer`: event index per lifetime, -1: none)."""
    closed = np.flatnonzero(closer >= 0)
    ev_rows = closer[closed].astype(np.intp)
    lives.died[closed] = ev.t[ev_rows]
    lives.death[closed] = DEATH_CODE[schema.OP_CLOSE]
    lives.close_stack[closed] = ev.stack[ev_rows]
    lives.close_tid[closed] = ev.tid[ev_rows]
    lives.close_syscall[closed] = ev.syscall[ev_rows]
    lives.finalizing[closed] = ev.finalizing[ev_rows]
    lives.death_is_close_event[closed] = True


def _apply_replacements(
    lives: Lives,
    ev: Events,
    replaced: np.ndarray,
    replacer: np.ndarray,
    stats: PairingStats,
) -> None:
    """A birth on a live fd ends it: dup2/dup3 replace it; any other syscall means a lost close.

    `replacer`: the event index of the next birth on each lifetime's (pid, fd), -1: none.
    """
    which = np.flatnonzero(replaced)
    ev_rows = replacer[which].astype(np.intp)
    codes = ev.syscall[ev_rows]
    # Map each syscall code to its death code: dup2/dup3/fcntl replace, anything else is a
    # birth on an fd whose close was never seen.
    to_death = np.array(
        [DEATH_CODE.get(n, DEATH_CODE["unknown"]) if n in REPLACING else DEATH_CODE["unknown"]
         for n in ev.syscall_names.names] + [DEATH_CODE["unknown"]],
        dtype=np.int8,
    )  # fmt: skip
    deaths = to_death[np.where(codes < 0, len(to_death) - 1, codes)]
    is_dup = deaths != DEATH_CODE["unknown"]
    lives.died[which] = ev.t[ev_rows]
    lives.death[which] = deaths
    lives.close_stack[which] = ev.stack[ev_rows]
    lives.close_tid[which] = ev.tid[ev_rows]
    lives.close_syscall[which] = codes
    lives.death_is_missed_close[which] = ~is_dup
    stats.missed_closes += int((~is_dup).sum())


def _apply_updates(
    lives: Lives,
    ev: Events,
    updates: _Updates,
    rank: np.ndarray,
    stats: PairingStats,
) -> np.recarray:
    """Apply addr (socket address) and cloexec updates; return the CLOEXEC change table.

    Updates name lifetimes in (pid, fd) order; `rank` maps those numbers to the lives' order.
    """
    life = np.where(updates.life >= 0, rank[np.maximum(updates.life, 0)], -1)
    ev_rows = updates.event
    t = ev.t[ev_rows]
    died = np.where(life >= 0, lives.died[np.maximum(life, 0)], 0)
    live = (life >= 0) & (t < died)
    stats.orphan_updates = int((~live).sum())
    life, ev_rows, t, addr = life[live], ev_rows[live], t[live], updates.is_addr[live]
    addr_paths = ev.path[ev_rows[addr]]
    known = addr_paths >= 0
    # Rows are in time order per lifetime, so the last write wins (connect after bind).
    targets = life[addr][known]
    lives.path[targets] = addr_paths[known]
    socket = ev.kind_names.code("socket")
    lives.kind[targets] = np.where(lives.kind[targets] < 0, socket, lives.kind[targets])
    cx = ~addr
    return cloexec_changes(life[cx], t[cx], ev.cloexec[ev_rows[cx]])
