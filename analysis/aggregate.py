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
        "lifetimes do not include them (sites' opened/closed counts and warnings do)"
    ]
    full = {k: int(facts.get(k) or 0) for k in ("live_full", "pairs_full")}
    if any(full.values()):
        out.append(
            f"the kernel's aggregation maps were full ({full['live_full']} fds beyond "
            f"{facts.get('live_max')} live ones, {full['pairs_full']} closes beyond "
            f"{facts.get('pairs_max')} stack pairs): those were recorded in full instead"
        )
    return out
