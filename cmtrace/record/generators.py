"""The generator frames of each birth (probes/pywalk.h's PY_REC_GENS records), both backends.

A birth whose stack has generator, coroutine or async generator frames is preceded, in the ring
buffer or the engine's stream, by one PY_REC_GENS record of the same thread: the words
`frame index << 48 | generator address` and the code object each of those frames ran. They are
not part of the interned stack (one stack id meets many generator objects).

`BirthGenerators.note(raw)` takes those records; `attach(table, boot_ns)` fills the events
column `generators` of the births they precede (the first fd record of that thread at or after
the record's time: a birth of the same stack id, else the record is dropped, as when the birth
itself was lost); `wanted()` lists what issue 13's liveness check reads when recording stops.
"""

from __future__ import annotations

import threading
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cmtrace.record.records import (
    GEN_CODES_AT,
    GEN_INDEX_SHIFT,
    GENS_AT,
    GENS_HEAD,
    REC_GENS,
    TYPE_OFFSET,
)
from cmtrace.trace import schema

ADDRESS_MASK = (1 << GEN_INDEX_SHIFT) - 1
MAX_WANTED = 100_000  # (pid, stack, frame, generator) kept for the end check, the newest
MAX_PENDING = 256  # records per thread waiting for their birth (it comes in the next drain)


def is_generators_record(raw: bytes) -> bool:
    return int.from_bytes(raw[TYPE_OFFSET : TYPE_OFFSET + 2], "little") == REC_GENS


def split_word(word: int) -> tuple[int, int]:
    """(frame index, generator address) of one `generators` word."""
    return word >> GEN_INDEX_SHIFT, word & ADDRESS_MASK


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


class BirthGenerators:
    """Joins PY_REC_GENS records to births; remembers what the end-of-recording check needs."""

    def __init__(self) -> None:
        # (pid, tid) -> [(ts, stack id, words)], in arrival (= time) order
        self._pending: dict[tuple[int, int], list[tuple[int, int, list[int]]]] = defaultdict(list)
        # (pid, stack id, word) -> code: insertion order is recency (re-inserted when seen again)
        self._wanted: dict[tuple[int, int, int], int] = {}
        self._lock = threading.Lock()  # the session reads wanted() from its finishing thread

    def note(self, raw: bytes) -> None:
        ts, pid, tid, _type, n, _pad, stack_id = GENS_HEAD.unpack_from(raw)
        n = min(n, (len(raw) - GEN_CODES_AT) // 8)
        words = list(np.frombuffer(raw, "<u8", count=n, offset=GENS_AT).tolist())
        codes = np.frombuffer(raw, "<u8", count=n, offset=GEN_CODES_AT).tolist()
        stack = _signed64(stack_id)
        waiting = self._pending[(pid, tid)]
        waiting.append((ts, stack, words))
        del waiting[:-MAX_PENDING]
        with self._lock:
            for word, code in zip(words, codes):
                key = (pid, stack, word)
                self._wanted.pop(key, None)
                self._wanted[key] = code
            while len(self._wanted) > MAX_WANTED:
                del self._wanted[next(iter(self._wanted))]

    def wanted(self) -> list[tuple[int, int, int, int]]:
        """(pid, stack id, word, code) of the generator frames births had, newest last."""
        with self._lock:
            return [(pid, stack, word, code) for (pid, stack, word), code in self._wanted.items()]

    def attach(self, table: pa.Table, boot_ns: int) -> pa.Table:
        """`table` (schema.EVENTS) with the `generators` of the births that records precede."""
        if not self._pending or not len(table):
            return table
        pids = table.column("pid").to_numpy()
        tids = table.column("tid").to_numpy()
        keys = set(self._pending)
        waiting_tids = pa.array([tid for _, tid in keys], pa.int32())
        in_waiting = pc.is_in(table.column("tid"), waiting_tids)
        candidates = np.flatnonzero(in_waiting.to_numpy(zero_copy_only=False))
        if not len(candidates):
            return table
        t_ns = table.column("t_ns").to_numpy()
        ops = table.column("op").cast(pa.string())
        births = pc.fill_null(pc.equal(ops, schema.OP_BIRTH), False).to_numpy(zero_copy_only=False)
        stacks = table.column("stack_id").to_numpy()
        values: dict[int, list[int]] = {}
        for key in list(keys):
            mine = candidates[(pids[candidates] == key[0]) & (tids[candidates] == key[1])]
            if not len(mine):
                continue
            mine = mine[np.argsort(t_ns[mine], kind="stable")]
            times = t_ns[mine]
            left = []
            for ts, stack, words in self._pending[key]:
                at = int(np.searchsorted(times, ts - boot_ns, side="left"))
                if at == len(mine):
                    left.append((ts, stack, words))  # its birth comes in a later drain
                    continue
                first = int(mine[at])
                if births[first] and stacks[first] == stack:
                    same = mine[(times == times[at]) & births[mine]]  # both ends of a pipe
                    for row in same.tolist():
                        values[row] = words
            if left:
                self._pending[key] = left
            else:
                del self._pending[key]
        if not values:
            return table
        column = [values.get(i) for i in range(len(table))]
        index = table.schema.get_field_index("generators")
        array = pa.array(column, schema.EVENTS.field("generators").type)
        return table.set_column(index, schema.EVENTS.field("generators"), array)
