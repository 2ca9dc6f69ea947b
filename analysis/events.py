"""The event columns the fd-table model reads, as numpy arrays in time order.

The events arrive as a trace directory (read part by part, which bounds peak memory), a pyarrow
Table or a pandas DataFrame. Strings become int32 codes of a vocabulary per column, stack ids
int32 codes, and `arg`/`flags` are kept only for the process events that read them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Union, overload

import numpy as np
import pandas as pd
import pyarrow as pa

from cmtrace.trace import schema
from cmtrace.trace.reader import CORE_EVENT_COLUMNS, event_parts, read_event_part

EventTable = Union[pa.Table, pd.DataFrame]  # events already in memory
EventSource = Union[EventTable, Path]  # or a trace directory


def _raw_column(events: EventTable, name: str) -> pd.Series | pa.ChunkedArray:
    if isinstance(events, pd.DataFrame):
        return events[name]
    return events.column(name)


def _column(events: EventTable, name: str) -> np.ndarray:
    """A numeric or boolean column as numpy (object dtype when it holds nulls)."""
    values: np.ndarray = _raw_column(events, name).to_numpy()  # a Series or a ChunkedArray
    return values


def _dictionary_codes(events: EventTable, name: str) -> tuple[np.ndarray, np.ndarray]:
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


class Vocab:
    """Strings as int32 codes (-1 = null): millions of lifetimes share a few kinds and paths."""

    def __init__(self, names: Iterable[object]) -> None:
        self.names: list[str] = [str(n) for n in names]
        self.index = {name: i for i, name in enumerate(self.names)}

    def code(self, name: object) -> int:
        if name is None or (isinstance(name, float) and name != name):
            return -1
        name = str(name)
        if name not in self.index:
            self.index[name] = len(self.names)
            self.names.append(name)
        return self.index[name]

    def encode(self, values: Iterable[object]) -> np.ndarray:
        codes: np.ndarray = np.array([self.code(v) for v in values], dtype=np.int32)
        return codes

    def categorical(self, codes: np.ndarray) -> pd.Categorical:
        categories = pd.Index(self.names, dtype=object)
        return pd.Categorical.from_codes(codes.astype(np.int32), categories=categories)


class StackIds:
    """Stack ids (64-bit hashes) as int32 codes: half-width codes save 4 bytes per event and 8
    per lifetime. Code 0 is id 0 ("no Python stack"), so zero-filled arrays mean the same in
    both. A deep trace has hundreds of thousands of distinct stacks: ids are looked up as
    arrays (a hash index), never one by one in Python."""

    def __init__(self) -> None:
        self.ids: np.ndarray = np.zeros(1, dtype=np.int64)
        self._index = pd.Index(self.ids)

    def encode(self, values: np.ndarray) -> np.ndarray:
        """Codes of a column of ids (hashing, no sort: each distinct id is looked up once)."""
        positions, uniques = pd.factorize(values)
        uniques = np.asarray(uniques, dtype=np.int64)
        codes = self._index.get_indexer(uniques)
        new = codes < 0
        if new.any():
            codes[new] = len(self.ids) + np.arange(int(new.sum()))
            self.ids = np.concatenate([self.ids, uniques[new]])
            self._index = pd.Index(self.ids)
        lookup = np.append(codes, 0).astype(np.int32)
        stack_codes: np.ndarray = lookup[positions]  # a null (position -1) becomes stack 0
        return stack_codes

    def decode(self, codes: np.ndarray) -> np.ndarray:
        ids: np.ndarray = self.ids[codes]
        return ids


class Sparse:
    """A column that matters on a few rows only: `arg` and `flags`, read for close_range, fork
    and lost events. Stored as (sorted rows, values), 0 elsewhere: not 16 bytes on every event."""

    def __init__(self, rows: np.ndarray, values: np.ndarray, length: int) -> None:
        self.rows = np.asarray(rows, dtype=np.int64)
        self.values = np.asarray(values, dtype=np.int64)
        self.length = length

    def __len__(self) -> int:
        return self.length

    @overload
    def __getitem__(self, index: int) -> int: ...
    @overload
    def __getitem__(self, index: np.ndarray) -> np.ndarray: ...
    def __getitem__(self, index: int | np.ndarray) -> int | np.ndarray:
        """The value at a row (an int), or at each row of an index array."""
        scalar = np.ndim(index) == 0
        wanted = np.atleast_1d(np.asarray(index, dtype=np.int64))
        out: np.ndarray = np.zeros(len(wanted), dtype=np.int64)
        if len(self.rows):
            position = np.minimum(np.searchsorted(self.rows, wanted), len(self.rows) - 1)
            found = self.rows[position] == wanted
            out[found] = self.values[position[found]]
        return int(out[0]) if scalar else out

    def take(self, index: np.ndarray) -> Sparse:
        """The column of the events `index` selects (a subset or a permutation of the rows)."""
        kept = np.flatnonzero(np.isin(index, self.rows))
        return Sparse(kept, self[index[kept]], len(index))


@dataclass
class Events:
    """The event columns the model needs, as numpy arrays in time order."""

    t: np.ndarray
    pid: np.ndarray
    tid: np.ndarray
    op: np.ndarray  # int8 codes into OP_CODES
    syscall: np.ndarray  # int32 codes into syscall_names
    syscall_names: Vocab
    fd: np.ndarray
    src_fd: np.ndarray
    kind: np.ndarray  # int32 codes into kind_names
    kind_names: Vocab
    path: np.ndarray  # int32 codes into path_names
    path_names: Vocab
    flags: Sparse  # close_range flags (kept for the same events as arg)
    cloexec: np.ndarray
    arg: Sparse  # close_range last fd, fork child pid, lost count (only those are kept)
    stack: np.ndarray  # int32 codes into stack_ids
    stack_ids: StackIds
    finalizing: np.ndarray

    SHARED = ("syscall_names", "kind_names", "path_names", "stack_ids")  # not per event

    def take(self, index: np.ndarray) -> Events:
        values = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            values[name] = value if name in self.SHARED else value[index]
        values["flags"], values["arg"] = self.flags.take(index), self.arg.take(index)
        return Events(**values)

    def __len__(self) -> int:
        return len(self.t)


OP_CODES = {op: i for i, op in enumerate(schema.OPS + (schema.OP_LOST,))}
BIRTH, CLOSE = OP_CODES[schema.OP_BIRTH], OP_CODES[schema.OP_CLOSE]
CLOEXEC, ADDR = OP_CODES[schema.OP_CLOEXEC], OP_CODES[schema.OP_ADDR]
CLOSE_RANGE, FORK = OP_CODES[schema.OP_CLOSE_RANGE], OP_CODES[schema.OP_FORK]
EXEC, EXIT = OP_CODES[schema.OP_EXEC], OP_CODES[schema.OP_EXIT]
LOST = OP_CODES[schema.OP_LOST]
# The events whose arg and flags are kept (the others' are left on disk).
_ARG_OPS = np.array([CLOSE_RANGE, FORK, LOST], dtype=np.int8)


def _filled(values: np.ndarray, fill: int, dtype: type) -> np.ndarray:
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


def _read_event_dir(path: Path) -> Events:
    """Read a trace's events part by part into preallocated arrays: each part is read once and
    freed, its string dictionaries are mapped onto one vocabulary per column, its stack ids onto
    int32 codes, and only the process events keep their arg and flags."""
    total, files = event_parts(path)
    numeric: dict[str, np.ndarray] = {
        c: np.empty(total, dtype=d) for c, (d, _) in _NUMERIC_EVENT_COLUMNS.items()
    }
    codes: dict[str, np.ndarray] = {
        c: np.empty(total, dtype=np.int32) for c in _TEXT_EVENT_COLUMNS if c != "op"
    }
    op: np.ndarray = np.empty(total, dtype=np.int8)  # op codes go straight to OP_CODES
    stack: np.ndarray = np.empty(total, dtype=np.int32)
    vocabs = {c: Vocab([]) for c in _TEXT_EVENT_COLUMNS}
    stack_ids = StackIds()
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

    def sparse(values: list[np.ndarray]) -> Sparse:
        return Sparse(rows, np.concatenate(values) if values else rows, total)

    cols = Events(
        t=numeric["t_ns"], pid=numeric["pid"], tid=numeric["tid"], op=op,
        syscall=codes["syscall"], syscall_names=vocabs["syscall"], fd=numeric["fd"],
        src_fd=numeric["src_fd"], kind=codes["kind"], kind_names=vocabs["kind"],
        path=codes["path"], path_names=vocabs["path"], flags=sparse(sparse_flags),
        cloexec=numeric["cloexec"], arg=sparse(sparse_arg), stack=stack, stack_ids=stack_ids,
        finalizing=numeric["finalizing"],
    )  # fmt: skip
    return _in_time_order(cols)


def _prefetched_parts(files: list[Path]) -> Iterator[pa.Table]:
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


def _in_time_order(cols: Events) -> Events:
    if len(cols.t) > 1 and not np.all(cols.t[1:] >= cols.t[:-1]):
        cols = cols.take(np.argsort(cols.t, kind="stable"))
    return cols


def _op_map(vocab: Vocab) -> np.ndarray:
    """Vocabulary code (last entry: null) -> OP_CODES code, -1 for an unknown op."""
    op_codes: np.ndarray = np.array(
        [OP_CODES.get(name, -1) for name in vocab.names] + [-1], dtype=np.int8
    )
    return op_codes


def _part_numbers(
    part: pa.Table, name: str, fill: int, rows: np.ndarray | None = None
) -> np.ndarray:
    """A part's numeric column as numpy, nulls filled (only `rows` of it when given)."""
    if name not in part.column_names:
        filler: np.ndarray = np.full(part.num_rows if rows is None else len(rows), fill)
        return filler
    column = part.column(name)
    if rows is not None:
        column = column.take(pa.array(rows, type=pa.int64()))
    if column.null_count:
        column = column.fill_null(fill)
    numbers: np.ndarray = column.to_numpy()
    return numbers


def _part_codes(part: pa.Table, name: str, vocab: Vocab) -> np.ndarray:
    """A part's string column as codes of `vocab` (-1 for null), via its own dictionary."""
    if name not in part.column_names:
        nulls: np.ndarray = np.full(part.num_rows, -1, dtype=np.int32)
        return nulls
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


def read_events(events: EventSource) -> Events:
    if isinstance(events, Path):
        return _read_event_dir(events)
    return _read_event_table(events)


def _read_event_table(events: EventTable) -> Events:
    op_codes, op_names = _dictionary_codes(events, "op")
    op = _op_map(Vocab(op_names))[op_codes]
    sys_codes, sys_names = _dictionary_codes(events, "syscall")
    kind_codes, kind_names = _dictionary_codes(events, "kind")
    path_codes, path_names = _dictionary_codes(events, "path")
    stack_ids = StackIds()
    with_arg = np.flatnonzero(np.isin(op, _ARG_OPS))

    def sparse(name: str) -> Sparse:
        values = _filled(_column(events, name), 0, np.int64)
        return Sparse(with_arg, values[with_arg], len(values))

    cols = Events(
        t=_filled(_column(events, "t_ns"), 0, np.int64),
        pid=_filled(_column(events, "pid"), -1, np.int32),
        tid=_filled(_column(events, "tid"), -1, np.int32),
        op=op,
        syscall=sys_codes,
        syscall_names=Vocab(sys_names),
        fd=_filled(_column(events, "fd"), -1, np.int32),
        src_fd=_filled(_column(events, "src_fd"), -1, np.int32),
        kind=kind_codes,
        kind_names=Vocab(kind_names),
        path=path_codes,
        path_names=Vocab(path_names),
        flags=sparse("flags"),
        cloexec=_filled(_column(events, "cloexec"), False, bool),
        arg=sparse("arg"),
        stack=stack_ids.encode(_filled(_column(events, "stack_id"), 0, np.int64)),
        stack_ids=stack_ids,
        finalizing=_filled(_column(events, "finalizing"), False, bool),
    )
    return _in_time_order(cols)
