"""--aggregate: the user-space half of the kernel's aggregation (probes/fdtrace.bpf.c, "Aggregation").

The kernel keeps each live fd's birth record in `agg_live` and counts the closes of fds it never
shipped in `agg_pairs`, per (pid, death, open stack, close stack). This side, from the drain
thread:

- ships, out of `agg_live`, the births that must reach the trace: fds older than --min-age (a
  sweep once a second: agg_mark[0] is raised first, so the kernel knows to ship their closes),
  a process's fds at its exit (then forgets them), at its exec and close_range (births up to
  then, marked in traced[pid]), and every fd still open when recording stops;
- drops the second copy of a birth that both it and the kernel shipped (a close racing a sweep:
  the kernel flags births it ships out of the map with AGG_FROM_LIVE);
- decides each new pair once its close stack is known: AGG_PAIR_COUNT for ordinary closes,
  AGG_PAIR_SHIP when a frame of the close stack runs an atexit handler or winds an asyncio loop
  down (the analysis may call such a close a leak: each one must be in the trace);
- reads the pair counters once a second into COUNTERS rows (deltas since the previous row of
  the same pair), forgetting the pairs of processes that exited.

Bounds: the kernel maps hold AGG_LIVE_MAX live fds and AGG_PAIRS_MAX pairs; when one is full the
kernel falls back to full history for that fd and counts it (agg_full), which meta.json's
"aggregate" reports. This side holds O(live fds + pairs).
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from cmtrace.record.bpf.loader import BPF
from cmtrace.record.records import (
    EV_CLOSE,
    EV_CLOSE_RANGE,
    EV_EXEC,
    EV_EXIT,
    HEADER_SIZE,
    Batch,
)
from cmtrace.trace import schema

# Mirrors of probes/events.h (tests/unit/test_c_mirrors.py checks them).
AGG_FROM_LIVE = 0x100
AGG_HIST_BUCKETS = 32
AGG_HIST_MIN_SHIFT = 10
AGG_PAIR_NEW, AGG_PAIR_COUNT, AGG_PAIR_SHIP = 0, 1, 2
AGG_FULL_LIVE, AGG_FULL_PAIRS = 0, 1
DATA_LEN = 256
BIRTH_SIZE = HEADER_SIZE + DATA_LEN  # struct fd_event_data, the head of struct live_fd

SWEEP_INTERVAL_S = 1.0
U64 = (1 << 64) - 1
NR_CLOSE = 3
# Frames under which a close may make its fd a leak (cmtrace.analysis.causes: ATEXIT_HANDLERS,
# LOOP_SHUTDOWN_FUNCTIONS, LOOP_RUNNER; a unit test keeps them covered): (file suffix, function).
LEAK_CLOSE_FRAMES = (
    ("logging/__init__.py", "shutdown"),
    ("multiprocessing/util.py", "_exit_function"),
    ("concurrent/futures/thread.py", "_python_exit"),
    ("concurrent/futures/process.py", "_python_exit"),
    ("weakref.py", "_exitfunc"),
    ("asyncio/", "shutdown_asyncgens"),  # a directory: any file in it
    ("asyncio/", "_cancel_all_tasks"),
    ("asyncio/runners.py", "close"),
    ("asyncio/runners.py", "run"),
)
_LEAK_CLOSE_FUNCTIONS = {function for _, function in LEAK_CLOSE_FRAMES}


@dataclass(frozen=True)
class AggregateSettings:
    """What --aggregate was asked for: the age at which a live fd is shipped, the map sizes."""

    min_age_s: float = 10.0
    live_max: int = 65536  # live fds the kernel holds (a struct live_fd, 328 bytes, each)
    pairs_max: int = 65536  # (pid, open stack, close stack) counters (272 bytes each)

    def cflags(self) -> tuple[str, ...]:
        return (
            "-DCMTRACE_AGGREGATE",
            f"-DAGG_LIVE_MAX={self.live_max}",
            f"-DAGG_PAIRS_MAX={self.pairs_max}",
        )

    def meta(self) -> dict[str, Any]:
        return {
            "min_age_s": self.min_age_s,
            "live_max": self.live_max,
            "pairs_max": self.pairs_max,
            "counters": "deltas",
            "kernel_bytes": self.live_max * 328 + self.pairs_max * 272,
        }


def _is_leak_close_frame(row: dict[str, Any]) -> bool:
    file = str(row.get("file") or "")
    function = row.get("function")
    return any(
        (f in file if f.endswith("/") else file.endswith(f)) and function == name
        for f, name in LEAK_CLOSE_FRAMES
    )


class Aggregator:
    """The user-space side of one aggregated recording (see the module docstring)."""

    def __init__(self, bpf: BPF, settings: AggregateSettings, boot_ns: int) -> None:
        self.settings = settings
        self.boot_ns = boot_ns
        self._bpf = bpf
        self._live = bpf["agg_live"]
        self._pairs = bpf["agg_pairs"]
        self._next_sweep = 0.0
        # (pid, fd) -> birth time of the live-map birth shipped last (by a sweep or the kernel)
        self._shipped: dict[tuple[int, int], int] = {}
        self._known_stacks: set[int] = set()
        self._leak_close_stacks: set[int] = set()
        self._previous: dict[tuple[int, int, int, int], np.ndarray] = {}  # pair -> counts read
        self._exited: set[int] = set()
        self._undecided: set[tuple[int, int, int, int]] = set()  # pairs whose sample came
        self._rows: list[dict[str, Any]] = []
        self.swept = {"min_age": 0, "exit": 0, "exec": 0, "stop": 0, "duplicates": 0}

    # -- what the kernel sent
    def filter(self, batch: Batch) -> Batch:
        """The batch without births shipped twice; remembers which (pid, fd) were shipped."""
        if not len(batch):
            return batch
        head = batch.headers()
        keep: np.ndarray = np.ones(len(head), bool)
        from_live = np.flatnonzero((head["stack_flags"] & AGG_FROM_LIVE) != 0)
        closes = head["type"] == EV_CLOSE
        opened_by: dict[tuple[int, int], int] = {}  # (pid, fd) -> open stack of its birth here
        for row in from_live.tolist():
            key, born = (int(head["pid"][row]), int(head["fd"][row])), int(head["ts"][row])
            if self._shipped.get(key) == born:
                keep[row] = False
                self.swept["duplicates"] += 1
            self._shipped[key] = born
            opened_by[key] = int(head["stack_id"][row])
        for row in np.flatnonzero(closes).tolist():
            key = (int(head["pid"][row]), int(head["fd"][row]))
            self._shipped.pop(key, None)
            if key in opened_by:  # maybe a pair's first close: decide it as soon as can be
                pair = (key[0], NR_CLOSE, opened_by[key], int(head["stack_id"][row]))
                self._undecided.add(pair)
        offsets = np.asarray(batch.offsets, np.int64)[keep]
        return Batch(batch.buf, offsets, head[keep])

    def after(self, batch: Batch, stopping: bool = False) -> Batch | None:
        """The births to ship now: of processes that exited, exec'd or ran close_range in this
        batch, older than --min-age (once a second), and all of them when `stopping`."""
        records: list[bytes] = []
        if len(batch):
            head = batch.headers()
            for row in np.flatnonzero(np.isin(head["type"], [EV_EXIT, EV_EXEC, EV_CLOSE_RANGE])):
                records += self._process_event(int(head["type"][row]), int(head["pid"][row]),
                                               int(head["ts"][row]))  # fmt: skip
        self._decide_samples()
        now = time.monotonic()
        if stopping:
            records += self._sweep(lambda pid, born: True, "stop")
            self._read_counters()
        elif now >= self._next_sweep:
            self._next_sweep = now + SWEEP_INTERVAL_S
            mark = time.monotonic_ns() - int(self.settings.min_age_s * 1e9)
            self._bpf["agg_mark"][ctypes.c_int(0)] = ctypes.c_uint64(max(mark, 0))
            records += self._sweep(lambda pid, born: born <= mark, "min_age")
            self._read_counters()
        if not records:
            return None
        buf = b"".join(records)
        return Batch(buf, np.arange(len(records), dtype=np.int64) * BIRTH_SIZE)

    def _process_event(self, etype: int, pid: int, ts: int) -> list[bytes]:
        if etype == EV_EXIT:
            shipped = self._sweep(lambda p, born: p == pid, "exit", forget=True)
            self._exited.add(pid)
            for key in [k for k in self._shipped if k[0] == pid]:
                del self._shipped[key]
            return shipped
        traced = self._bpf["traced"]
        pid_key = ctypes.c_uint32(pid)
        try:  # first the mark (the kernel ships the closes of these fds), then the sweep
            traced[pid_key] = ctypes.c_uint64(max(int(traced[pid_key].value), ts))
        except KeyError:
            pass  # the process is gone: its exit sweeps it
        return self._sweep(lambda p, born: p == pid and born <= ts, "exec")

    def _sweep(self, wanted: Any, why: str, forget: bool = False) -> list[bytes]:
        """Births in agg_live that `wanted(pid, born)` selects and nobody shipped yet."""
        out: list[bytes] = []
        for key, value in list(self._live.items()):
            pid, fd, born = int(key.pid), int(key.fd), int(value.birth.e.ts)
            if not wanted(pid, born):
                continue
            if forget:
                self._live.pop(key, None)
            if value.shipped or self._shipped.get((pid, fd)) == born:
                continue
            self._shipped[(pid, fd)] = born
            out.append(bytes(value.birth)[:BIRTH_SIZE])
            self.swept[why] += 1
        return out

    # -- stacks and counters
    def note_frames(self, rows: list[dict[str, Any]]) -> None:
        """Stack frames the symbolizer completed: which close stacks may make a leak."""
        for row in rows:
            stack = int(row["stack_id"]) & U64  # the kernel's ids are unsigned
            self._known_stacks.add(stack)
            if row.get("function") in _LEAK_CLOSE_FUNCTIONS and _is_leak_close_frame(row):
                self._leak_close_stacks.add(stack)

    def _decide(self, close_stack: int) -> int:
        if close_stack in self._leak_close_stacks:
            return AGG_PAIR_SHIP
        if close_stack == 0 or close_stack in self._known_stacks:
            return AGG_PAIR_COUNT
        return AGG_PAIR_NEW

    def _decide_samples(self) -> None:
        """Pairs whose first close came in a batch: counted from now on once their close
        stack is known (Symbolizer.on_rows: within the drain that brought their first close)."""
        for pair in list(self._undecided):
            state = self._decide(pair[3])
            if state == AGG_PAIR_NEW:
                continue
            self._undecided.discard(pair)
            key = self._pairs.Key(*pair)
            try:
                value = self._pairs[key]
            except KeyError:
                continue  # a close that made no pair (finalizing, an fd shipped before)
            if value.state == AGG_PAIR_NEW:
                value.state = state
                self._pairs[key] = value

    def _read_counters(self) -> None:
        t_ns = time.monotonic_ns() - self.boot_ns
        for key, value in list(self._pairs.items()):
            pair = (int(key.pid), int(key.death), int(key.open_stack), int(key.close_stack))
            if value.state == AGG_PAIR_NEW:
                state = self._decide(pair[3])
                if state != AGG_PAIR_NEW:
                    value.state = state
                    self._pairs[key] = value
                continue
            counts = np.array([value.count, *value.hist], np.int64)
            delta = counts - self._previous.get(pair, 0)
            if delta[0]:
                self._previous[pair] = counts
                self._rows.append(_counter_row(t_ns, pair, delta))
            if pair[0] in self._exited:
                self._pairs.pop(key, None)
                self._previous.pop(pair, None)

    def take_counters(self) -> pa.Table | None:
        rows, self._rows = self._rows, []
        return pa.Table.from_pylist(rows, schema=schema.COUNTERS) if rows else None

    def full(self) -> dict[str, int]:
        counts = self._bpf["agg_full"]
        return {
            "live_full": int(sum(counts[ctypes.c_int(AGG_FULL_LIVE)])),
            "pairs_full": int(sum(counts[ctypes.c_int(AGG_FULL_PAIRS)])),
        }

    def meta(self) -> dict[str, Any]:
        return {**self.settings.meta(), **self.full(), "shipped": dict(self.swept)}


def _counter_row(t_ns: int, pair: tuple[int, int, int, int], delta: np.ndarray) -> dict[str, Any]:
    pid, death, open_stack, close_stack = (int(np.uint64(v).view(np.int64)) for v in pair)
    return {
        "t_ns": t_ns,
        "pid": pid,
        "stack_id": open_stack,
        "close_stack": close_stack,
        "death": "close" if death == NR_CLOSE else f"nr{death}",
        "opened": int(delta[0]),
        "closed": int(delta[0]),
        "lifetime_hist": delta[1:].tolist(),
    }
