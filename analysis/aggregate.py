"""Traces recorded with --aggregate: the kernel's counters, and what such a trace cannot tell.

An aggregated trace (meta.json "aggregate") holds as events only the fds that had to be
recorded in full (older than min_age_s, open at the end, ended by process exit, interpreter or
loop shutdown or atexit, the first close of each (opening stack, closing stack) pair); every
other fd was counted in the kernel per (pid, opening stack, closing stack) into the counters
table (cmtrace.trace.schema.COUNTERS). Each counted pair has one recorded sample with the same
stacks, so every verdict that depends on stacks only (site, cause, death) is the same as with
full history, and counts per site add the counters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cmtrace.trace import schema


def aggregate_meta(meta: dict[str, Any]) -> dict[str, Any] | None:
    """meta.json's "aggregate" facts, None for a full-history trace."""
    facts = meta.get("aggregate")
    return facts if isinstance(facts, dict) else None


def read_counters(path: str | Path) -> pd.DataFrame:
    """Every counter row of the trace (schema.COUNTERS; empty for a full-history trace)."""
    parts = sorted((Path(path) / "counters").glob("part-*.parquet"))
    tables = [pq.read_table(p, schema=schema.COUNTERS) for p in parts]
    table = pa.concat_tables(tables) if tables else schema.COUNTERS.empty_table()
    return table.to_pandas()


def counted_per_group(
    counters: pd.DataFrame, open_stacks: np.ndarray, group: np.ndarray, count: int
) -> np.ndarray:
    """Counted fds per group (site) number: `group[i]` is the group of the recorded fds with
    opening stack `open_stacks[i]`. Counters of stacks no recorded fd has are left out."""
    out: np.ndarray = np.zeros(count, np.int64)
    if counters.empty or not len(open_stacks):
        return out
    group_of_stack = pd.Series(group, index=open_stacks)
    group_of_stack = group_of_stack[~group_of_stack.index.duplicated()]
    opened = counters.groupby("stack_id")["opened"].sum()
    where = group_of_stack.reindex(opened.index)
    known = where.notna().to_numpy()
    np.add.at(out, where.to_numpy()[known].astype(np.int64), opened.to_numpy()[known])
    return out


def limits(facts: dict[str, Any]) -> list[str]:
    """What an aggregated trace cannot answer, said (reports print it; the API documents it)."""
    age = facts.get("min_age_s")
    out = [
        f"aggregated trace (--aggregate, --min-age {age}): fds that lived less than {age} s "
        "and ended by an ordinary close were counted, not recorded: live_fds(at=) and per-fd "
        "lifetimes do not include them (sites' opened/closed counts and warnings do; "
        "timeline() adds them from the once-a-second counters, as an expected share of each "
        "bin; the plot's lifetime histogram uses the kernel's log2 buckets)"
    ]
    full = {k: int(facts.get(k) or 0) for k in ("live_full", "pairs_full")}
    if any(full.values()):
        out.append(
            f"the kernel's aggregation maps were full ({full['live_full']} fds beyond "
            f"{facts.get('live_max')} live ones, {full['pairs_full']} closes beyond "
            f"{facts.get('pairs_max')} stack pairs): those were recorded in full instead"
        )
    return out


# --- timelines and lifetime histograms of the counted fds --------------------------------------
SAMPLE_INTERVAL_NS = 1_000_000_000  # a counter row holds the closes of about the second before it
# lifetime_hist[b] counts lives in [2^(b+10), 2^(b+11)) ns: the bucket edges, and a life per bucket
HIST_EDGES_NS = 2.0 ** np.arange(
    schema.LIFETIME_HIST_MIN_SHIFT,
    schema.LIFETIME_HIST_MIN_SHIFT + schema.LIFETIME_HIST_BUCKETS + 1,
)
HIST_MIDDLES_NS = np.sqrt(HIST_EDGES_NS[:-1] * HIST_EDGES_NS[1:])  # geometric middles


def label_of_stacks(open_stacks: np.ndarray, codes: np.ndarray) -> dict[int, int]:
    """open stack -> the label code of the first recorded fd with it (each counted pair has a
    recorded sample fd with the same opening stack: its site, kind, path and pid)."""
    first = pd.Series(codes, index=open_stacks)
    first = first[~first.index.duplicated()]
    return {int(k): int(v) for k, v in first.items()}


def counted_timeline(
    counters: pd.DataFrame, label_of: dict[int, int], step_ns: int, bins: int, columns: int
) -> np.ndarray:
    """The counted fds in a timeline's bins (bins x columns), as full history would count them
    there: each fd in every bin its life touches. Their births are known to the second (the
    counter row's), so each row's fds are spread evenly over the bins of that second, each
    counting 1 + lifetime/step bins (lifetimes from the row's log2 buckets, at their middles).
    An expectation, not a count of each instant: timelines say so (aggregate_limits)."""
    out: np.ndarray = np.zeros((bins, max(columns, 1)), np.float64)
    if counters.empty or not bins:
        return out
    label = counters["stack_id"].map(label_of)
    known = label.notna().to_numpy()
    rows = counters[known]
    hist = np.array(rows["lifetime_hist"].tolist(), np.float64).reshape(len(rows), -1)
    spans = rows["opened"].to_numpy(np.float64) + hist @ HIST_MIDDLES_NS[: hist.shape[1]] / step_ns
    end = rows["t_ns"].to_numpy(np.int64)
    first = np.clip((end - SAMPLE_INTERVAL_NS) // step_ns, 0, bins - 1)
    last = np.clip(end // step_ns, 0, bins - 1)
    for lo, hi, code, span in zip(first, last, label[known].astype(np.int64), spans):
        out[lo : hi + 1, code] += span / (hi - lo + 1)
    return out


def lifetime_hist_per_stack(counters: pd.DataFrame) -> dict[int, np.ndarray]:
    """The kernel's log2 lifetime histogram of the counted fds, summed per opening stack."""
    out: dict[int, np.ndarray] = {}
    for stack, hist in zip(counters["stack_id"].to_numpy(), counters["lifetime_hist"]):
        counts = np.asarray(hist, np.int64)
        out[int(stack)] = out[int(stack)] + counts if int(stack) in out else counts
    return out


def log2_buckets(lifetimes_ns: np.ndarray) -> np.ndarray:
    """Recorded lifetimes counted in the kernel's buckets (shorter ones in the first, longer in
    the last), so a site's recorded and counted fds make one histogram."""
    shift = schema.LIFETIME_HIST_MIN_SHIFT
    safe = np.maximum(np.asarray(lifetimes_ns, np.float64), 1.0)
    bucket = np.clip(np.floor(np.log2(safe)).astype(np.int64) - shift, 0,
                     schema.LIFETIME_HIST_BUCKETS - 1)  # fmt: skip
    counts: np.ndarray = np.bincount(bucket, minlength=schema.LIFETIME_HIST_BUCKETS)
    return counts
