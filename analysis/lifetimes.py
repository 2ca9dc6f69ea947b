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

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import pandas as pd
import pyarrow as pa

from cmtrace.trace import schema
from cmtrace.trace.reader import (
    CORE_EVENT_COLUMNS,
    event_parts,
    read_event_part,
)

CLOSE_RANGE_CLOEXEC = 4  # linux/close_range.h: mark the range CLOEXEC instead of closing it
DUP_SYSCALLS = frozenset({"dup", "dup2", "dup3", "fcntl"})  # births that copy src_fd's file
STDIO_FDS = 3  # fds 0, 1, 2

# Deaths that mean "nobody closed it": the fd lived until its process or interpreter went away.
LEAK_DEATHS = ("process-exit", "interpreter-shutdown", "loop-shutdown")

# Every value of `death` (null = open at the end); the analysis refines "close" from the stack.
DEATHS = (
    "close", "exit", "finalizer", "dup2", "dup3", "fcntl", "close_range", "exec",
    "process-exit", "interpreter-shutdown", "loop-shutdown", "unknown",
)  # fmt: skip

# Columns of the lifetimes table (one row per fd lifetime).
LIFETIME_COLUMNS = (
    "pid", "fd", "tid", "kind", "path", "syscall", "born_ns", "died_ns", "death",
    "open_stack", "close_stack", "close_tid", "close_syscall", "src_fd", "cloexec",
    "inherited", "preexisting", "finalizing",
)  # fmt: skip


@dataclass
class PairingStats:
    """What the pairing could not explain, so reports can say how complete the picture is."""

    unknown_closes: int = 0  # closes of fds never seen born (pre-attach, io_uring, lost events)
    missed_closes: int = 0  # births on a live fd by a non-dup syscall: its close was not seen
    orphan_updates: int = 0  # cloexec/addr events of fds not live at that time
    forks: int = 0
    execs: int = 0
    exits: int = 0


# --------------------------------------------------------------------------------------------
# Column access: the events arrive as a pyarrow Table (fast) or a pandas DataFrame (tests).


EventSource = Union[pa.Table, pd.DataFrame, Path]


def _raw_column(events: EventSource, name: str):
    if isinstance(events, pd.DataFrame):
        return events[name]
    return events.column(name)


def _column(events: EventSource, name: str) -> np.ndarray:
    """A numeric or boolean column as numpy (object dtype when it holds nulls)."""
    column = _raw_column(events, name)
    if isinstance(column, pd.Series):
        return column.to_numpy()
    return column.to_numpy()


def _dictionary_codes(events: EventSource, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(codes, categories) of a low-cardinality string column; code -1 for null."""
    col = _raw_column(events, name)
    if isinstance(col, pd.Series):
        cat = pd.Categorical(col)
        return np.asarray(cat.codes, dtype=np.int32), np.asarray(cat.categories, dtype=object)
    if not pa.types.is_dictionary(col.type):
        col = col.dictionary_encode()
    col = col.unify_dictionaries() if col.num_chunks > 1 else col
    if col.num_chunks == 0:
        return np.zeros(0, dtype=np.int32), np.zeros(0, dtype=object)
    dictionary = col.chunk(0).dictionary
    codes = pa.chunked_array(
        [c.indices.cast(pa.int32()) for c in col.chunks], type=pa.int32()
    ).fill_null(-1)
    return codes.to_numpy(), np.asarray(dictionary.to_pylist(), dtype=object)


class _Vocab:
    """Strings as int32 codes (-1 = null): millions of lifetimes share a few kinds and paths."""

    def __init__(self, names) -> None:
        self.names: list[str] = [str(n) for n in names]
        self.index = {name: i for i, name in enumerate(self.names)}

    def code(self, name) -> int:
        if name is None or (isinstance(name, float) and name != name):
            return -1
        name = str(name)
        if name not in self.index:
            self.index[name] = len(self.names)
            self.names.append(name)
        return self.index[name]

    def encode(self, values) -> np.ndarray:
        return np.array([self.code(v) for v in values], dtype=np.int32)

    def categorical(self, codes: np.ndarray) -> pd.Categorical:
        categories = pd.Index(self.names, dtype=object)
        return pd.Categorical.from_codes(codes.astype(np.int32), categories=categories)


DEATH_VOCAB = _Vocab(DEATHS)
DEATH_CODE = {name: i for i, name in enumerate(DEATHS)}
REPLACING = frozenset({"dup2", "dup3", "fcntl"})  # births that may land on a live fd


class _StackIds:
    """Stack ids (64-bit hashes) as int32 codes: a trace has thousands of distinct stacks, not
    millions, and half-width codes save 4 bytes per event and 8 per lifetime. Code 0 is id 0
    ("no Python stack"), so zero-filled arrays mean the same in both."""

    def __init__(self) -> None:
        self.ids: list[int] = [0]
        self.index: dict[int, int] = {0: 0}

    def encode(self, values: np.ndarray) -> np.ndarray:
        """Codes of a column of ids (hashing, no sort: each distinct id is looked up once)."""
        positions, uniques = pd.factorize(values)
        lookup = np.array([self._code(int(u)) for u in uniques] + [0], dtype=np.int32)
        return lookup[positions]  # a null (position -1) becomes stack 0

    def _code(self, stack_id: int) -> int:
        if stack_id not in self.index:
            self.index[stack_id] = len(self.ids)
            self.ids.append(stack_id)
        return self.index[stack_id]

    def decode(self, codes: np.ndarray) -> np.ndarray:
        return np.asarray(self.ids, dtype=np.int64)[codes]


class _Sparse:
    """A column that matters on a few rows only: `arg` and `flags`, read for close_range, fork
    and lost events. Stored as (sorted rows, values), 0 elsewhere: not 16 bytes on every event."""

    def __init__(self, rows: np.ndarray, values: np.ndarray, length: int) -> None:
        self.rows = np.asarray(rows, dtype=np.int64)
        self.values = np.asarray(values, dtype=np.int64)
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index):
        """The value at a row (an int), or at each row of an index array."""
        scalar = np.ndim(index) == 0
        wanted = np.atleast_1d(np.asarray(index, dtype=np.int64))
        out = np.zeros(len(wanted), dtype=np.int64)
        if len(self.rows):
            position = np.minimum(np.searchsorted(self.rows, wanted), len(self.rows) - 1)
            found = self.rows[position] == wanted
            out[found] = self.values[position[found]]
        return int(out[0]) if scalar else out

    def take(self, index: np.ndarray) -> _Sparse:
        """The column of the events `index` selects (a subset or a permutation of the rows)."""
        kept = np.flatnonzero(np.isin(index, self.rows))
        return _Sparse(kept, self[index[kept]], len(index))


@dataclass
class _Events:
    """The event columns the model needs, as numpy arrays in time order."""

    t: np.ndarray
    pid: np.ndarray
    tid: np.ndarray
    op: np.ndarray  # int8 codes into OP_CODES
    syscall: np.ndarray  # int32 codes into syscall_names
    syscall_names: _Vocab
    fd: np.ndarray
    src_fd: np.ndarray
    kind: np.ndarray  # int32 codes into kind_names
    kind_names: _Vocab
    path: np.ndarray  # int32 codes into path_names
    path_names: _Vocab
    flags: _Sparse  # close_range flags (kept for the same events as arg)
    cloexec: np.ndarray
    arg: _Sparse  # close_range last fd, fork child pid, lost count (only those are kept)
    stack: np.ndarray  # int32 codes into stack_ids
    stack_ids: _StackIds
    finalizing: np.ndarray

    SHARED = ("syscall_names", "kind_names", "path_names", "stack_ids")  # not per event

    def take(self, index: np.ndarray) -> _Events:
        values = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            values[name] = value if name in self.SHARED else value[index]
        values["flags"], values["arg"] = self.flags.take(index), self.arg.take(index)
        return _Events(**values)

    def __len__(self) -> int:
        return len(self.t)


OP_CODES = {op: i for i, op in enumerate(schema.OPS + (schema.OP_LOST,))}
_BIRTH, _CLOSE = OP_CODES[schema.OP_BIRTH], OP_CODES[schema.OP_CLOSE]
_CLOEXEC, _ADDR = OP_CODES[schema.OP_CLOEXEC], OP_CODES[schema.OP_ADDR]
_CLOSE_RANGE, _FORK = OP_CODES[schema.OP_CLOSE_RANGE], OP_CODES[schema.OP_FORK]
_EXEC, _EXIT = OP_CODES[schema.OP_EXEC], OP_CODES[schema.OP_EXIT]
_LOST = OP_CODES[schema.OP_LOST]
# The events whose arg and flags are kept (the others' are left on disk).
_ARG_OPS = np.array([_CLOSE_RANGE, _FORK, _LOST], dtype=np.int8)


def _filled(values: np.ndarray, fill, dtype) -> np.ndarray:
    if values.dtype == object:
        values = np.where(pd.isna(values), fill, values)
    elif np.issubdtype(values.dtype, np.floating):
        values = np.nan_to_num(values, nan=fill)
    return values.astype(dtype, copy=False)


_NUMERIC_EVENT_COLUMNS = {
    # column: (numpy dtype, value for nulls); arg and flags are kept sparse, stack_id as codes
    "t_ns": (np.int64, 0), "pid": (np.int32, -1), "tid": (np.int32, -1),
    "fd": (np.int32, -1), "src_fd": (np.int32, -1), "cloexec": (bool, False),
    "finalizing": (bool, False),
}  # fmt: skip
_TEXT_EVENT_COLUMNS = ("op", "syscall", "kind", "path")


def _read_event_dir(path: Path) -> _Events:
    """Read a trace's events part by part into preallocated arrays: each part is read once and
    freed, its string dictionaries are mapped onto one vocabulary per column, its stack ids onto
    int32 codes, and only the process events keep their arg and flags."""
    total, files = event_parts(path, CORE_EVENT_COLUMNS)
    numeric = {c: np.empty(total, dtype=d) for c, (d, _) in _NUMERIC_EVENT_COLUMNS.items()}
    codes = {c: np.empty(total, dtype=np.int32) for c in _TEXT_EVENT_COLUMNS if c != "op"}
    op = np.empty(total, dtype=np.int8)  # op codes go straight to OP_CODES
    stack = np.empty(total, dtype=np.int32)
    vocabs = {c: _Vocab([]) for c in _TEXT_EVENT_COLUMNS}
    stack_ids = _StackIds()
    sparse_rows, sparse_arg, sparse_flags = [], [], []
    position = 0
    for part in _prefetched_parts(files):
        end = position + part.num_rows
        for name, (_, fill) in _NUMERIC_EVENT_COLUMNS.items():
            numeric[name][position:end] = _part_numbers(part, name, fill)
        for name in codes:
            codes[name][position:end] = _part_codes(part, name, vocabs[name])
        op_codes = _part_codes(part, "op", vocabs["op"])  # grows the vocabulary: first
        op[position:end] = _op_map(vocabs["op"])[op_codes]
        stack[position:end] = stack_ids.encode(_part_numbers(part, "stack_id", 0))
        rows = np.flatnonzero(np.isin(op[position:end], _ARG_OPS))
        sparse_rows.append(rows + position)
        sparse_arg.append(_part_numbers(part, "arg", 0, rows))
        sparse_flags.append(_part_numbers(part, "flags", 0, rows))
        position = end
        del part
    rows = np.concatenate(sparse_rows) if sparse_rows else np.zeros(0, np.int64)

    def sparse(values: list[np.ndarray]) -> _Sparse:
        return _Sparse(rows, np.concatenate(values) if values else rows, total)

    cols = _Events(
        t=numeric["t_ns"], pid=numeric["pid"], tid=numeric["tid"], op=op,
        syscall=codes["syscall"], syscall_names=vocabs["syscall"], fd=numeric["fd"],
        src_fd=numeric["src_fd"], kind=codes["kind"], kind_names=vocabs["kind"],
        path=codes["path"], path_names=vocabs["path"], flags=sparse(sparse_flags),
        cloexec=numeric["cloexec"], arg=sparse(sparse_arg), stack=stack, stack_ids=stack_ids,
        finalizing=numeric["finalizing"],
    )  # fmt: skip
    return _in_time_order(cols)


def _prefetched_parts(files: list[Path]):
    """The events parts in order, the next one read (Parquet decoding, which releases the GIL)
    in a thread while the caller converts the current one: one part more in memory."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cmtrace-read") as pool:
        ahead = [pool.submit(read_event_part, file, CORE_EVENT_COLUMNS) for file in files[:1]]
        for i in range(len(files)):
            part = ahead.pop().result()
            if i + 1 < len(files):
                ahead.append(pool.submit(read_event_part, files[i + 1], CORE_EVENT_COLUMNS))
            yield part
            del part


def _in_time_order(cols: _Events) -> _Events:
    if len(cols.t) > 1 and not np.all(cols.t[1:] >= cols.t[:-1]):
        cols = cols.take(np.argsort(cols.t, kind="stable"))
    return cols


def _op_map(vocab: _Vocab) -> np.ndarray:
    """Vocabulary code (last entry: null) -> OP_CODES code, -1 for an unknown op."""
    return np.array([OP_CODES.get(name, -1) for name in vocab.names] + [-1], dtype=np.int8)


def _part_numbers(part: pa.Table, name: str, fill, rows: np.ndarray | None = None) -> np.ndarray:
    """A part's numeric column as numpy, nulls filled (only `rows` of it when given)."""
    if name not in part.column_names:
        return np.full(part.num_rows if rows is None else len(rows), fill)
    column = part.column(name)
    if rows is not None:
        column = column.take(pa.array(rows, type=pa.int64()))
    if column.null_count:
        column = column.fill_null(fill)
    return column.to_numpy()


def _part_codes(part: pa.Table, name: str, vocab: _Vocab) -> np.ndarray:
    """A part's string column as codes of `vocab` (-1 for null), via its own dictionary."""
    if name not in part.column_names:
        return np.full(part.num_rows, -1, dtype=np.int32)
    out = []
    for chunk in part.column(name).chunks:
        if not pa.types.is_dictionary(chunk.type):
            chunk = chunk.dictionary_encode()
        lookup = np.array(
            [vocab.code(v) for v in chunk.dictionary.to_pylist()] + [-1], dtype=np.int32
        )
        indices = chunk.indices.fill_null(len(lookup) - 1).to_numpy(zero_copy_only=False)
        out.append(lookup[indices])
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int32)


def _read_events(events: EventSource) -> _Events:
    if isinstance(events, Path):
        return _read_event_dir(events)
    op_codes, op_names = _dictionary_codes(events, "op")
    op = _op_map(_Vocab(op_names))[op_codes]
    sys_codes, sys_names = _dictionary_codes(events, "syscall")
    kind_codes, kind_names = _dictionary_codes(events, "kind")
    path_codes, path_names = _dictionary_codes(events, "path")
    stack_ids = _StackIds()
    with_arg = np.flatnonzero(np.isin(op, _ARG_OPS))

    def sparse(name: str) -> _Sparse:
        values = _filled(_column(events, name), 0, np.int64)
        return _Sparse(with_arg, values[with_arg], len(values))

    cols = _Events(
        t=_filled(_column(events, "t_ns"), 0, np.int64),
        pid=_filled(_column(events, "pid"), -1, np.int32),
        tid=_filled(_column(events, "tid"), -1, np.int32),
        op=op,
        syscall=sys_codes,
        syscall_names=_Vocab(sys_names),
        fd=_filled(_column(events, "fd"), -1, np.int32),
        src_fd=_filled(_column(events, "src_fd"), -1, np.int32),
        kind=kind_codes,
        kind_names=_Vocab(kind_names),
        path=path_codes,
        path_names=_Vocab(path_names),
        flags=sparse("flags"),
        cloexec=_filled(_column(events, "cloexec"), False, bool),
        arg=sparse("arg"),
        stack=stack_ids.encode(_filled(_column(events, "stack_id"), 0, np.int64)),
        stack_ids=stack_ids,
        finalizing=_filled(_column(events, "finalizing"), False, bool),
    )
    return _in_time_order(cols)


# --------------------------------------------------------------------------------------------
# Pairing: births, closes and per-fd updates of a set of processes, vectorized.


@dataclass
class _Lives:
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

    @classmethod
    def concat(cls, parts: list[_Lives]) -> _Lives:
        return cls(
            **{
                name: np.concatenate([getattr(p, name) for p in parts])
                for name in cls.__dataclass_fields__
            }
        )

    def __len__(self) -> int:
        return len(self.pid)


NO_DEATH = np.iinfo(np.int64).max


@dataclass
class _Seed:
    """Lifetimes that start outside the event stream: pre-existing and inherited fds."""

    pid: np.ndarray
    fd: np.ndarray
    t: np.ndarray
    kind: np.ndarray
    path: np.ndarray
    cloexec: np.ndarray
    open_stack: np.ndarray
    syscall: np.ndarray
    tid: np.ndarray
    inherited: bool
    preexisting: bool


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


_FD_OPS = np.array([_BIRTH, _CLOSE, _CLOEXEC, _ADDR], dtype=np.int8)


def _sorted_rows(ev: _Events, seeds: list[_Seed], select: np.ndarray | None) -> _Rows:
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
    op = np.concatenate([np.full(n_seed, _BIRTH, np.int8), ev.op[idx]])[order]
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
    new_group = np.zeros(len(order), dtype=bool)
    new_group[np.cumsum(sizes)[:-1]] = True
    new_group[:1] = True
    return order, new_group


def _owners(rows: _Rows) -> tuple[np.ndarray, np.ndarray]:
    """(births, owner_life): the birth rows, and each row's lifetime index (-1: none).

    births_so_far[row] - 1 is the lifetime of the last birth at or before the row; the row
    belongs to it when that birth is in the row's own (pid, fd) group.
    """
    is_birth = rows.op == _BIRTH
    n = len(is_birth)
    births_so_far = np.cumsum(is_birth, dtype=np.int64 if n >= 2**31 else np.int32)
    before_group = np.where(rows.new_group, births_so_far - is_birth, 0)
    np.maximum.accumulate(before_group, out=before_group)
    owner_life = np.where(births_so_far > before_group, births_so_far - 1, -1)
    return np.flatnonzero(is_birth).astype(rows.index_type), owner_life


def _first_closes(rows: _Rows, owner_life: np.ndarray, n_lives: int, stats: PairingStats):
    """Row of the close that ends each lifetime (-1: none); other closes are unknown closes.

    Rows are sorted, so the owners of close rows never decrease: a lifetime's first close is
    where the owner changes (no sort needed).
    """
    is_close = rows.op == _CLOSE
    close_rows = np.flatnonzero(is_close & (owner_life >= 0)).astype(rows.index_type)
    close_lives = owner_life[close_rows]
    first = np.ones(len(close_rows), dtype=bool)
    first[1:] = close_lives[1:] != close_lives[:-1]
    stats.unknown_closes = int(is_close.sum() - first.sum())
    closed_at_row = np.full(n_lives, -1, dtype=rows.index_type)
    closed_at_row[close_lives[first]] = close_rows[first]
    return closed_at_row


def _next_births(rows: _Rows, births: np.ndarray) -> np.ndarray:
    """Row of the next birth of the same (pid, fd) after each birth (-1: none)."""
    next_birth = np.full(len(births), -1, dtype=rows.index_type)
    if len(births) > 1:
        group_of_birth = np.cumsum(rows.new_group, dtype=rows.index_type)[births]
        same = group_of_birth[1:] == group_of_birth[:-1]
        next_birth[:-1] = np.where(same, births[1:], -1)
    return next_birth


def _pair(
    ev: _Events, seeds: list[_Seed], select: np.ndarray | None = None
) -> tuple[_Lives, np.ndarray, PairingStats]:
    """Pair the fd events of `ev` (births, closes, cloexec, addr) plus seed lifetimes.

    `select` (a mask over `ev`, or sorted event indices) restricts the pairing to some
    processes' events without copying them. Returns the lifetimes, a table of CLOEXEC changes
    (life index, t, value) for exec, and the counts of what could not be paired.
    """
    stats = PairingStats()
    rows = _sorted_rows(ev, seeds, select)
    if len(ev) == 0:
        ev = _empty_like(ev)
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
    del birth_src, born
    _apply_closes(lives, ev, closer)
    _apply_replacements(lives, ev, (closer < 0) & (replacer >= 0), replacer, stats)
    changes = _apply_updates(lives, ev, updates, rank, stats)
    return lives, changes, stats


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
        which = np.flatnonzero((rows.op == _CLOEXEC) | (rows.op == _ADDR))
        return cls(rows.src[which], owner_life[which], rows.op[which] == _ADDR)


def _source_rows(order: np.ndarray, n_seed: int, idx: np.ndarray) -> np.ndarray:
    """Map each sorted row to its event index in `ev`, or -(seed index + 1) for a seed."""
    if not len(idx):
        return -(order + 1)  # seeds only: negative numbers (order's dtype is wide enough)
    src = idx[np.maximum(order - n_seed, 0)]
    if n_seed:  # few rows: fix them rather than a where() over all rows
        seed_rows = np.flatnonzero(order < n_seed)
        src[seed_rows] = -(order[seed_rows] + 1)
    return src


def _seed_field(seeds: list[_Seed], name: str) -> np.ndarray:
    if not seeds:
        return np.zeros(0, dtype=object)
    return np.concatenate([np.asarray(getattr(s, name)) for s in seeds])


def _seed_flag(seeds: list[_Seed], name: str) -> np.ndarray:
    if not seeds:
        return np.zeros(0, dtype=bool)
    return np.concatenate([np.full(len(s.pid), getattr(s, name), dtype=bool) for s in seeds])


def _pick(event_values: np.ndarray, rows: np.ndarray, seeds: list[_Seed], seed_name: str, dtype):
    """A value per birth row (`rows`: event indices, or -(seed index + 1) for seeds)."""
    out = np.asarray(event_values[np.maximum(rows, 0)], dtype=dtype)
    from_seed = np.flatnonzero(rows < 0)
    if len(from_seed):  # few rows: assign them rather than a where() over all rows
        seed_values = np.asarray(_seed_field(seeds, seed_name), dtype=dtype)
        out[from_seed] = seed_values[-rows[from_seed] - 1]
    return out


def _lives_from_births(
    ev: _Events, seeds: list[_Seed], rows: np.ndarray, born: np.ndarray
) -> _Lives:
    """One lifetime per birth row (`rows`: event indices, or -(seed index + 1) for seeds)."""
    rows = rows.astype(np.intp)  # index once at full width, not once per column gathered
    from_seed = np.flatnonzero(rows < 0)

    def pick(event_values: np.ndarray, seed_name: str, dtype) -> np.ndarray:
        return _pick(event_values, rows, seeds, seed_name, dtype)

    def pick_flag(name: str) -> np.ndarray:
        """A seed's flag (inherited, preexisting), False for lifetimes born from events."""
        out = np.zeros(len(rows), dtype=bool)
        out[from_seed] = _seed_flag(seeds, name)[-rows[from_seed] - 1]
        return out

    def src_fd() -> np.ndarray:
        out = ev.src_fd[np.maximum(rows, 0)].astype(np.int32)
        out[from_seed] = -1
        return out

    count = len(rows)
    return _Lives(
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
    )


def _empty_like(ev: _Events) -> _Events:
    """A one-row dummy so fancy indexing of an empty event set works (never selected)."""
    values = {}
    for name in ev.__dataclass_fields__:
        value = getattr(ev, name)
        if name in _Events.SHARED:
            values[name] = value
        elif isinstance(value, _Sparse):
            values[name] = _Sparse(np.zeros(0, np.int64), np.zeros(0, np.int64), 1)
        else:
            values[name] = np.zeros(1, dtype=value.dtype)
    values["kind"] = values["path"] = values["syscall"] = np.full(1, -1, dtype=np.int32)
    return _Events(**values)


def _apply_closes(lives: _Lives, ev: _Events, closer: np.ndarray) -> None:
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
    lives: _Lives,
    ev: _Events,
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
    stats.missed_closes += int((~is_dup).sum())


def _apply_updates(
    lives: _Lives,
    ev: _Events,
    updates: _Updates,
    rank: np.ndarray,
    stats: PairingStats,
) -> np.ndarray:
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
    return np.rec.fromarrays([life[cx], t[cx], ev.cloexec[ev_rows[cx]]], names="life,t,value")


# --------------------------------------------------------------------------------------------
# Process-wide events: close_range, exec, exit (one by one), fork (inheritance, by generation).


class _Table:
    """All lifetimes built so far, with per-pid lookup and the CLOEXEC change log."""

    def __init__(self) -> None:
        self.parts: list[_Lives] = []
        self.changes: list[np.ndarray] = []
        self.lives: _Lives | None = None
        self.by_pid: dict[int, np.ndarray] = {}
        self.change_log = np.rec.fromarrays(
            [np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, bool)],
            names="life,t,value",
        )

    def add(self, lives: _Lives, changes: np.ndarray) -> np.ndarray:
        """Append lifetimes; return their global indices."""
        offset = len(self.lives) if self.lives is not None else 0
        self.lives = lives if self.lives is None else _Lives.concat([self.lives, lives])
        changes = np.rec.fromarrays(
            [changes.life + offset, changes.t, changes.value], names="life,t,value"
        )
        self.change_log = np.rec.array(np.concatenate([self.change_log, changes]))
        new = np.arange(offset, offset + len(lives))
        if len(new):
            pids = lives.pid
            order = np.argsort(pids, kind="stable")
            uniq, starts = np.unique(pids[order], return_index=True)
            for pid, chunk in zip(uniq, np.split(new[order], starts[1:])):
                old = self.by_pid.get(int(pid))
                self.by_pid[int(pid)] = chunk if old is None else np.concatenate([old, chunk])
        return new

    def live_at(self, pid: int, t: int) -> np.ndarray:
        """Global indices of the lifetimes of pid open at time t (born before, not yet dead)."""
        cand = self.by_pid.get(int(pid))
        if cand is None or self.lives is None:
            return np.zeros(0, dtype=np.int64)
        lv = self.lives
        born, died = lv.born[cand], lv.died[cand]
        # An inherited fd is born at the fork instant, so "at t" includes it.
        started = (born < t) | ((born == t) & lv.inherited[cand])
        return cand[started & (died > t)]

    def cloexec_at(self, lives_idx: np.ndarray, t: int) -> np.ndarray:
        """CLOEXEC state of each lifetime at time t: its last change at or before t."""
        state = self.lives.cloexec[lives_idx].copy()
        log = self.change_log
        if len(log) and len(lives_idx):
            sel = np.isin(log.life, lives_idx) & (log.t <= t)
            position = {life: i for i, life in enumerate(lives_idx)}
            for life, value in zip(log.life[sel], log.value[sel]):  # in time order
                state[position[life]] = value
        return state

    def end(self, lives_idx: np.ndarray, t: int, death: str, ev: _Events, row: int) -> int:
        """End lifetimes at t; return how many paired close events this made unknown."""
        lives = self.lives
        later_closes = int(lives.death_is_close_event[lives_idx].sum())
        lives.died[lives_idx] = t
        lives.death[lives_idx] = DEATH_CODE[death]
        lives.close_stack[lives_idx] = ev.stack[row]
        lives.close_tid[lives_idx] = ev.tid[row]
        lives.close_syscall[lives_idx] = ev.syscall[row]
        lives.finalizing[lives_idx] = ev.finalizing[row]
        lives.death_is_close_event[lives_idx] = False
        return later_closes


def _apply_process_events(table: _Table, ev: _Events, rows: np.ndarray, stats: PairingStats):
    """Apply close_range, exec and exit events (rows in time order) to the lifetimes table."""
    args, flags = ev.arg[rows], ev.flags[rows]  # sparse columns: looked up at once
    for i, row in enumerate(rows):
        pid, t, op = int(ev.pid[row]), int(ev.t[row]), ev.op[row]
        live = table.live_at(pid, t)
        if op == _CLOSE_RANGE:
            lo, hi = ev.fd[row], args[i]
            in_range = live[(table.lives.fd[live] >= lo) & (table.lives.fd[live] <= hi)]
            if flags[i] & CLOSE_RANGE_CLOEXEC:
                marks = np.rec.fromarrays(
                    [in_range, np.full(len(in_range), t), np.ones(len(in_range), bool)],
                    names="life,t,value",
                )
                table.change_log = np.rec.array(np.concatenate([table.change_log, marks]))
            else:
                stats.unknown_closes += table.end(in_range, t, schema.OP_CLOSE_RANGE, ev, row)
        elif op == _EXEC:
            stats.execs += 1
            doomed = live[table.cloexec_at(live, t)]
            stats.unknown_closes += table.end(doomed, t, schema.OP_EXEC, ev, row)
        elif op == _EXIT:
            stats.exits += 1
            stats.unknown_closes += table.end(live, t, "process-exit", ev, row)


def _inherited_seed(table: _Table, parent: int, child: int, t: int, ev_syscalls: _Vocab) -> _Seed:
    live = table.live_at(parent, t)
    lv = table.lives
    return _Seed(
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


def _copy_dup_sources(table: _Table, new: np.ndarray, ev: _Events) -> None:
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


def _preexisting_seed(pre: pd.DataFrame | None, ev: _Events) -> _Seed | None:
    if pre is None or len(pre) == 0:
        return None
    pre = pre.reset_index(drop=True)
    pid = pre["pid"].to_numpy(np.int64)
    fd = pre["fd"].to_numpy(np.int64)
    snap_t = pre["t_ns"].fillna(0).to_numpy(np.int64) if "t_ns" in pre else np.zeros(len(pre))
    # Births of the snapshot's (pid, fd)s only: a trace has millions of births, a snapshot few.
    births = (ev.op == _BIRTH) & np.isin(ev.fd, np.unique(fd)) & np.isin(ev.pid, np.unique(pid))
    if births.any():
        # A birth of the same (pid, fd) before the snapshot: the snapshot saw that new fd.
        born = pd.DataFrame({"pid": ev.pid[births], "fd": ev.fd[births], "t": ev.t[births]})
        first = born.groupby(["pid", "fd"])["t"].min()
        key = pd.MultiIndex.from_arrays([pid, fd])
        first_birth = first.reindex(key).to_numpy(dtype=float)
        keep = ~(first_birth < snap_t)
        pre, pid, fd = pre[keep].reset_index(drop=True), pid[keep], fd[keep]
    n = len(pre)
    none = np.full(n, -1, dtype=np.int32)
    return _Seed(
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
    ev = _read_events(events)
    if release:
        del events
    total = PairingStats()
    fork_rows = np.flatnonzero(ev.op == _FORK)
    children = np.unique(ev.arg[fork_rows]) if len(fork_rows) else np.zeros(0, np.int64)
    if facts is not None:
        facts.update(_event_facts(ev, children))
    in_child = np.isin(ev.pid, children)
    table = _Table()
    process_ops = [_CLOSE_RANGE, _EXEC, _EXIT]

    # Generation 0: every process not created by a traced fork, paired in one vectorized pass
    # (children's events are masked out, not copied: a copy would double the events' memory).
    pre_seed = _preexisting_seed(preexisting, ev)
    root = ~in_child if in_child.any() else None
    seeds = [pre_seed] if pre_seed is not None else []
    lives, changes, stats = _pair(ev, seeds, root)
    _merge_stats(total, stats)
    _copy_dup_sources(table, table.add(lives, changes), ev)
    pending = np.flatnonzero(~in_child & np.isin(ev.op, process_ops))
    _apply_process_events(table, ev, pending, total)

    # Later generations: children whose parent is already modelled, all of a generation at once.
    todo = fork_rows.tolist()
    if todo:
        child_of = dict(zip(todo, ev.arg[fork_rows].tolist()))
        rows_of = _rows_by_pid(ev, np.flatnonzero(in_child))
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
        windows = _add_children(table, ev, [(r, child_of[r]) for r in ready], rows_of, total)
        processed_pids.update(child for child, _ in windows)
    total.forks = len(fork_rows)
    vocabs = (ev.kind_names, ev.path_names, ev.syscall_names, ev.stack_ids)
    del ev, in_child  # the event columns are no longer needed: free them before the frame
    return _to_frame(table.lives, *vocabs), total


def _event_facts(ev: _Events, children: np.ndarray) -> dict:
    lost = ev.arg[np.flatnonzero(ev.op == _LOST)]
    return {
        "rows": len(ev),
        "last_ns": int(ev.t[-1]) if len(ev) else 0,  # in time order
        "lost": int(lost.sum()),
        "children": set(children.tolist()),
    }


def _rows_by_pid(ev: _Events, rows: np.ndarray) -> dict[int, np.ndarray]:
    """The event indices of each pid among `rows` (in time order)."""
    order = np.argsort(ev.pid[rows], kind="stable")
    pids = ev.pid[rows][order]
    uniq, starts = np.unique(pids, return_index=True)
    return {int(p): rows[chunk] for p, chunk in zip(uniq, np.split(order, starts[1:]))}


def _add_children(
    table: _Table,
    ev: _Events,
    forks: list[tuple[int, int]],
    rows_of: dict[int, np.ndarray],
    total: PairingStats,
) -> list[tuple[int, int]]:
    """Model the children of `forks` ((fork event, child pid)); return their (pid, fork time)."""
    seeds, windows = [], []
    for r, child in sorted(forks, key=lambda fork: ev.t[fork[0]]):
        parent, t = int(ev.pid[r]), int(ev.t[r])
        seeds.append(_inherited_seed(table, parent, child, t, ev.syscall_names))
        windows.append((child, t))
    # Each child's own events: those of its pid from its fork on (up to a later fork of the same
    # pid number, which would be a reused pid).
    keep = []
    for child, t in windows:
        later = [t2 for c2, t2 in windows if c2 == child and t2 > t]
        end = min(later) if later else np.iinfo(np.int64).max
        rows = rows_of.get(child, np.zeros(0, dtype=np.int64))
        keep.append(rows[(ev.t[rows] >= t) & (ev.t[rows] < end)])
    select = np.unique(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)
    lives, changes, stats = _pair(ev, seeds, select)
    _merge_stats(total, stats)
    _copy_dup_sources(table, table.add(lives, changes), ev)
    pending = select[np.isin(ev.op[select], [_CLOSE_RANGE, _EXEC, _EXIT])]
    _apply_process_events(table, ev, pending, total)
    return windows


def _merge_stats(total: PairingStats, part: PairingStats) -> None:
    total.unknown_closes += part.unknown_closes
    total.missed_closes += part.missed_closes
    total.orphan_updates += part.orphan_updates


def _to_frame(
    lives: _Lives | None, kinds: _Vocab, paths: _Vocab, syscalls: _Vocab, stacks: _StackIds
) -> pd.DataFrame:
    if lives is None or len(lives) == 0:
        return pd.DataFrame({c: pd.Series(dtype=_dtype(c)) for c in LIFETIME_COLUMNS})
    # Interpreter finalization closing an fd is a leak by definition (DESIGN: What counts).
    shutdown = lives.finalizing & (lives.death == DEATH_CODE[schema.OP_CLOSE])
    lives.death[shutdown] = DEATH_CODE["interpreter-shutdown"]
    # Each generation's lifetimes come out in (born, pid, fd) order (_pair); with traced forks,
    # a stable sort on birth time merges the generations.
    born = lives.born
    in_order = len(born) < 2 or bool(np.all(born[1:] >= born[:-1]))  # no traced forks
    order = None if in_order else np.argsort(born, kind="stable")

    def take(name: str, convert=None):
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
