"""The trace's stacks as columns: distinct frames, and per-stack facts computed once.

A real trace holds tens of thousands of distinct stacks, 30-80 frames deep, that repeat a few
thousand distinct frames (a test runner's or a web framework's frames under every open). So the
`stacks/` rows are reduced to one int32 frame code per row, and every fact about a frame (user
code, generator flags, the with statement it executes, how a close there counts) is decided
once per distinct frame, then spread to whole stacks with numpy reductions over the rows of
each stack. Python `Frame` objects are made only for the stacks that are printed or classified.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Union

import numpy as np
import pandas as pd
import pyarrow as pa

from cmtrace.analysis.code import Frame, SourceIndex, is_user_file
from cmtrace.trace.reader import read_stacks

# The frame fields of schema.STACK_FRAMES that make up a Frame, with the value of a null.
TEXT_FIELDS = ("function", "qualname", "file")
NUMBER_FIELDS = {"line": -1, "firstlineno": -1, "code_flags": 0}
STACK_COLUMNS = ("stack_id", "depth", *TEXT_FIELDS, *NUMBER_FIELDS)
# Compressed stacks/ above this are read a column at a time (each part opened once per column,
# but one column held as Arrow at a time); below it, in one read.
ONE_READ_BYTES = 32 << 20


class Stacks:
    """Stack id -> frames (innermost first; the first recorded copy when several pids wrote
    the same stack), held as columns.

    - `ids`: the distinct stack ids, sorted; `starts[i]:starts[i + 1]` are the rows of ids[i];
    - `row_frame`: each row's distinct-frame code;
    - per distinct frame: `frame_file` (code into `files`), `frame_line`, `frame_text`
      (function, qualname, file as str), `frame_numbers`, `is_user`.
    """

    def __init__(self, source: StackSource):
        """From a stacks table, or from a trace directory: read a column at a time (the
        frame rows of a deep trace run to tens of millions)."""
        stack_id, depth, text_codes, texts, numbers = _columns(source)
        # Frame codes first, on the rows as read, so that reordering moves one int32 column.
        row_frame, first_row = _frame_codes([*text_codes.values(), *numbers.values()])
        self.files = np.asarray(texts["file"], dtype=object)
        self.frame_file = text_codes["file"][first_row]
        self.function_names = texts["function"]
        self.frame_function = text_codes["function"][first_row]  # -1: null (reads False)
        self.frame_line = numbers["line"][first_row]
        self.frame_text = {k: _decode(texts[k], v[first_row]) for k, v in text_codes.items()}
        self.frame_numbers = {k: v[first_row] for k, v in numbers.items()}
        del text_codes, numbers  # the per-row columns: only row_frame is kept
        order = _stack_order(stack_id, depth)
        if order is not None:
            stack_id, row_frame = stack_id[order], row_frame[order]
        del depth, order
        self.ids, self.starts = _stack_starts(stack_id)
        self.row_frame = row_frame
        user_file = np.array([is_user_file(f) for f in self.files] + [False], dtype=bool)
        self.is_user = user_file[self.frame_file]  # code -1 (null file) reads the last entry
        self._objects: list[Frame | None] = [None] * len(first_row)
        self._lists: dict[int, list[Frame]] = {}
        self._memo: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.ids)

    # --- Python objects, for what is printed or classified ---------------------------------
    def frame(self, code: int) -> Frame:
        """The Frame of a distinct-frame code (made once)."""
        made = self._objects[code]
        if made is None:
            text, numbers = self.frame_text, self.frame_numbers
            function = text["function"][code]
            made = Frame(
                function=function,
                qualname=text["qualname"][code] or function,
                file=text["file"][code],
                line=int(numbers["line"][code]),
                firstlineno=int(numbers["firstlineno"][code]),
                code_flags=int(numbers["code_flags"][code]),
            )
            self._objects[code] = made
        return made

    def get(self, stack_id: int, default: list[Frame] | None = None) -> list[Frame]:
        """The frames of a stack, innermost first (`default`, or [], when not recorded)."""
        stack_id = int(stack_id)
        frames = self._lists.get(stack_id)
        if frames is None:
            position = self.positions(np.array([stack_id]))[0]
            if position < 0:
                return [] if default is None else default
            rows = self.row_frame[self.starts[position] : self.starts[position + 1]]
            frames = self._lists[stack_id] = [self.frame(code) for code in rows.tolist()]
        return frames

    # --- columns: per-frame facts spread to stacks -----------------------------------------
    def positions(self, stack_ids: np.ndarray) -> np.ndarray:
        """Index into `ids` of each stack id, -1 for an id without recorded frames (0...)."""
        stack_ids = np.asarray(stack_ids, dtype=np.int64)
        where = np.searchsorted(self.ids, stack_ids)
        where = np.minimum(where, max(len(self.ids) - 1, 0))
        found = (self.ids[where] == stack_ids) if len(self.ids) else np.zeros(len(where), bool)
        positions: np.ndarray = np.where(found, where, -1)
        return positions

    def frame_facts(
        self, name: str, functions: tuple[str, ...], test: Callable[[Frame], bool]
    ) -> np.ndarray:
        """A boolean fact of every distinct frame that can hold only for frames of the given
        function names: the names are matched on the dictionary, `test` called once per
        distinct frame of those functions."""
        if name not in self._memo:
            named = np.append(np.isin(np.asarray(self.function_names, dtype=object), functions),
                              False)  # fmt: skip
            fact: np.ndarray = np.zeros(len(self._objects), dtype=bool)
            for code in np.flatnonzero(named[self.frame_function]).tolist():
                fact[code] = bool(test(self.frame(code)))
            self._memo[name] = fact
        return self._memo[name]

    def first_frame(self, per_frame: np.ndarray) -> np.ndarray:
        """Per stack (in `ids` order): the code of its innermost frame where `per_frame` holds,
        -1 when none does."""
        if not len(self.ids):
            return np.zeros(0, dtype=np.int64)
        rows = len(self.row_frame)
        # The rows where it holds, then each stack's first of them by a binary search: no
        # per-row position array (8 bytes a row, tens of millions of rows).
        hits = np.append(np.flatnonzero(per_frame[self.row_frame]), rows)
        after_start = hits[np.searchsorted(hits, self.starts[:-1])]
        first = np.where(after_start < self.starts[1:], after_start, rows)
        padded = np.append(self.row_frame, -1)
        frames: np.ndarray = padded[first]
        return frames

    def any_frame(self, per_frame: np.ndarray) -> np.ndarray:
        """Per stack: does any of its frames hold `per_frame`?"""
        held: np.ndarray = self.first_frame(per_frame) >= 0
        return held

    def innermost(self) -> np.ndarray:
        """Per stack: the code of its innermost frame (depth 0)."""
        return self.row_frame[self.starts[:-1]] if len(self.ids) else np.zeros(0, np.int64)

    def site_frames(self) -> np.ndarray:
        """Per stack: its opening site, the innermost user frame, else the innermost frame."""
        if "site" not in self._memo:
            user = self.first_frame(self.is_user)
            self._memo["site"] = np.where(user >= 0, user, self.innermost())
        return self._memo["site"]

    def with_frames(self, src: SourceIndex) -> np.ndarray:
        """Per stack: the innermost user frame executing a with statement's header, -1: none
        (the with statement holding an fd opened there)."""
        if "with" not in self._memo:
            at_with: np.ndarray = np.zeros(len(self._objects), dtype=bool)
            user = np.flatnonzero(self.is_user)
            by_file = pd.Series(user).groupby(self.frame_file[user])
            for file_code, codes in by_file:
                codes = codes.to_numpy()
                file = str(self.files[file_code])
                at_with[codes] = src.with_lines(file, self.frame_line[codes])
            self._memo["with"] = self.first_frame(at_with)
        return self._memo["with"]

    def frame_cells(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(file, line, qualname-or-function) of each frame code; None and NaN where it is -1."""
        codes = np.asarray(codes, dtype=np.int64)
        known = codes >= 0
        if not len(self._objects):
            none: np.ndarray = np.full(len(codes), None, dtype=object)
            return none, np.full(len(codes), np.nan), none.copy()
        safe = np.where(known, codes, 0)
        text = {k: np.asarray(v, dtype=object)[safe] for k, v in self.frame_text.items()}
        label = np.where(text["qualname"] != "", text["qualname"], text["function"])
        line = np.where(known, self.frame_line[safe].astype(float), np.nan)
        return np.where(known, text["file"], None), line, np.where(known, label, None)

    def site_place(self) -> np.ndarray:
        """Per distinct frame: a code of its (file, line), the key of a site."""
        if "place" not in self._memo:
            key = (self.frame_file.astype(np.int64) + 1) << 32
            key |= self.frame_line.astype(np.int64) & 0xFFFFFFFF
            self._memo["place"] = pd.factorize(key)[0] if len(key) else key
        return self._memo["place"]


StackSource = Union[pa.Table, pd.DataFrame, Path, None]  # None: no stacks recorded


def _columns(
    source: StackSource,
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], dict[str, list], dict[str, np.ndarray]]:
    """The stack columns as numpy: ids, depths, text codes (-1: null) with their dictionaries,
    and the number fields with nulls filled."""
    column = _column_reader(source)
    stack_id = _numbers(column("stack_id"), 0, np.int64)
    depth = _numbers(column("depth"), 0, np.int32, len(stack_id))
    text_codes, texts = {}, {}
    for name in TEXT_FIELDS:
        text_codes[name], texts[name] = _text_codes(column(name), len(stack_id))
    numbers = {
        name: _numbers(column(name), fill, np.int32, len(stack_id))
        for name, fill in NUMBER_FIELDS.items()
    }
    return stack_id, depth, text_codes, texts, numbers


def _column_reader(source: StackSource) -> Callable[[str], pa.ChunkedArray | None]:
    """name -> that column of the stacks (None when absent); from a trace directory, each
    column is read from disk when asked for, so only one is held as Arrow at a time."""
    if isinstance(source, Path):
        trace = source
        on_disk = sum(f.stat().st_size for f in (trace / "stacks").glob("*.parquet"))
        if on_disk > ONE_READ_BYTES:
            return lambda name: read_stacks(trace, [name]).column(name)
        source = read_stacks(trace, STACK_COLUMNS)  # small: one read of every part
    if source is None:
        return lambda name: pa.chunked_array([], pa.int64()) if name == "stack_id" else None
    table: pa.Table = (
        pa.Table.from_pandas(source, preserve_index=False)
        if isinstance(source, pd.DataFrame)
        else source
    )
    return lambda name: table.column(name) if name in table.column_names else None


def _numbers(column: pa.ChunkedArray | None, fill: int, dtype: type, rows: int = 0) -> np.ndarray:
    if column is None:
        nothing: np.ndarray = np.full(rows, fill, dtype=dtype)
        return nothing
    if column.null_count:
        column = column.fill_null(fill)
    numbers: np.ndarray = column.to_numpy()
    return numbers.astype(dtype, copy=False)


def _text_codes(column: pa.ChunkedArray | None, rows: int) -> tuple[np.ndarray, list]:
    """(int32 codes, dictionary) of a text column, -1 for null; one dictionary for all chunks."""
    if column is None or rows == 0:
        return np.full(rows, -1, dtype=np.int32), []
    if not pa.types.is_dictionary(column.type):
        column = column.dictionary_encode()
    column = column.unify_dictionaries()
    dictionary = column.chunk(0).dictionary.to_pylist() if column.num_chunks else []
    codes = pa.chunked_array([c.indices.cast(pa.int32()) for c in column.chunks], pa.int32())
    return codes.fill_null(-1).to_numpy(), dictionary


def _decode(dictionary: list, codes: np.ndarray) -> list[str]:
    """Text of each code, "" for null (as Frame holds it)."""
    lookup: np.ndarray = np.array(
        [("" if v is None else str(v)) for v in dictionary] + [""], dtype=object
    )
    texts: list[str] = lookup[codes].tolist()
    return texts


def _stack_order(stack_id: np.ndarray, depth: np.ndarray) -> np.ndarray | None:
    """The rows to keep, in (stack id, depth) order, with the first copy of each (stack id,
    depth); None when the rows can be used as they are (already in that order, no copies)."""
    n = len(stack_id)
    if n < 2:
        return None
    new_id = stack_id[1:] != stack_id[:-1]
    if np.all(stack_id[1:] >= stack_id[:-1]) and np.all(new_id | (depth[1:] > depth[:-1])):
        return None
    blocks = _whole_blocks(stack_id, depth, new_id)
    if blocks is not None:
        return blocks
    order = np.lexsort((np.arange(n), depth, stack_id))  # stable: the first copy comes first
    sid, dep = stack_id[order], depth[order]
    first: np.ndarray = np.ones(n, dtype=bool)
    first[1:] = (sid[1:] != sid[:-1]) | (dep[1:] != dep[:-1])
    kept: np.ndarray = order[first]
    return kept


def _whole_blocks(stack_id: np.ndarray, depth: np.ndarray, new_id: np.ndarray) -> np.ndarray | None:
    """The common layout, sorted without a sort of the rows: the writer puts each stack's
    frames together, depth 0, 1, 2...; the same stack may come again (another pid). Then the
    first block of each id, in id order, is the answer; None for any other layout."""
    n = len(stack_id)
    starts = np.flatnonzero(np.concatenate([[True], new_id | (depth[1:] != depth[:-1] + 1)]))
    if np.any(depth[starts] != 0):
        return None
    lengths = np.diff(np.append(starts, n))
    ids = stack_id[starts]
    by_id = np.lexsort((np.arange(len(ids)), ids))  # blocks only: thousands, not millions
    first: np.ndarray = np.ones(len(by_id), dtype=bool)
    first[1:] = ids[by_id][1:] != ids[by_id][:-1]
    kept = by_id[first]
    # A later copy longer than the first would add depths: leave that to the general path.
    longest = np.maximum.reduceat(lengths[by_id], np.flatnonzero(first))
    if np.any(longest > lengths[kept]):
        return None
    offsets: np.ndarray = np.repeat(
        starts[kept] - np.cumsum(lengths[kept]) + lengths[kept], lengths[kept]
    )
    rows: np.ndarray = offsets + np.arange(int(lengths[kept].sum()))
    return rows


def _stack_starts(stack_id: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct ids, row offsets) of rows sorted by stack id."""
    if not len(stack_id):
        return np.zeros(0, dtype=np.int64), np.zeros(1, dtype=np.int64)
    new: np.ndarray = np.ones(len(stack_id), dtype=bool)
    new[1:] = stack_id[1:] != stack_id[:-1]
    starts = np.flatnonzero(new)
    return stack_id[starts], np.append(starts, len(stack_id)).astype(np.int64)


def _frame_codes(columns: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """A code per row for its combination of column values, and the first row of each code.

    Columns are packed into one int64 key while their value ranges fit in 63 bits; a full key
    is hashed to dense codes (pd.factorize), which then start the next key."""
    n = len(columns[0]) if columns else 0
    if n == 0:
        return np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int64)
    key: np.ndarray = np.zeros(n, dtype=np.int64)
    bits_used = 0
    for column in columns:
        low = int(column.min())
        width = int(column.max()) - low + 1
        bits = max(width - 1, 1).bit_length()
        if bits_used + bits > 62:
            key = pd.factorize(key)[0].astype(np.int64, copy=False)
            bits_used = max(int(key.max()), 1).bit_length()
        # In place: the key is 8 bytes a row over tens of millions of rows, and each
        # temporary of the expression form would be as large.
        key <<= bits
        narrow = column.dtype.itemsize <= 4 and width < 2**31  # column - low fits int32
        key |= (column - np.int32(low)) if narrow else (column.astype(np.int64) - low)
        bits_used += bits
    codes = pd.factorize(key)[0]
    del key
    frame_codes = codes.astype(np.int32)
    # Codes are given in order of first appearance: the running maximum rises exactly there.
    np.maximum.accumulate(codes, out=codes)
    first_row = np.flatnonzero(np.concatenate([[True], codes[1:] != codes[:-1]]))
    return frame_codes, first_row
