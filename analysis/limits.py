"""How close each process came to its RLIMIT_NOFILE: the most fds it had open at once
(pre-existing + births - deaths, from the same lifetimes as every verdict) against the soft
limit in force at that instant (meta.json `rlimit_nofile`: the value at join and each change).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd


def fd_peaks(fds: pd.DataFrame) -> pd.DataFrame:
    """Per pid: `peak` (most fds open at once) and `peak_ns` (when first reached). A death at
    the instant of a birth counts first (dup2 onto an open fd never holds both)."""
    if fds.empty:
        return pd.DataFrame({"pid": [], "peak": [], "peak_ns": []}).astype(np.int64)
    pid = fds["pid"].to_numpy(np.int64)
    born = fds["born_ns"].to_numpy(np.int64)
    died = fds["died_ns"].to_numpy(dtype=np.float64, na_value=np.nan)
    dead = ~np.isnan(died)
    pids = np.concatenate([pid, pid[dead]])
    times = np.concatenate([born, died[dead].astype(np.int64)])
    steps = np.concatenate([np.ones(len(pid), np.int64), -np.ones(int(dead.sum()), np.int64)])
    order = np.lexsort((steps, times, pids))  # by pid, then time, deaths (-1) first
    pids, times, steps = pids[order], times[order], steps[order]
    running = np.cumsum(steps)
    first = np.r_[True, pids[1:] != pids[:-1]]
    before = np.maximum.accumulate(np.where(first, np.arange(len(pids)), 0))
    open_now = running - (running[before] - steps[before])  # the count within each pid
    table = pd.DataFrame({"pid": pids, "open": open_now, "t": times})
    best = table.groupby("pid")["open"].idxmax()  # the first row holding the maximum
    peaks = table.loc[best.to_numpy()]
    return pd.DataFrame(
        {"pid": peaks["pid"].to_numpy(), "peak": peaks["open"].to_numpy(),
         "peak_ns": np.maximum(peaks["t"].to_numpy(), 0)}
    )  # fmt: skip


def soft_limit_at(limit: dict[str, Any], t_ns: int) -> int | None:
    """The soft limit in force at t_ns: the last change at or before it, else the first."""
    soft = limit.get("soft")
    for change in limit.get("changes") or []:
        if change["t_ns"] <= t_ns:
            soft = change["soft"]
    return soft


def process_limits(fds: pd.DataFrame, meta: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per target and per process whose limit was recorded (the Python ones): pid,
    comm, `rlimit_nofile` (soft, hard, changes), `peak_fds`, `peak_ns`, `soft_at_peak` and
    `peak_fraction` (of it; None when unlimited or unknown), and on an --aggregate trace
    `peak_lower_bound` (it holds no lifetime of an fd shorter than its min_age). By pid."""
    limits = {int(pid): value for pid, value in (meta.get("rlimit_nofile") or {}).items()}
    targets = {int(t["pid"]): t for t in meta.get("targets") or [] if isinstance(t, dict)}
    peaks = {int(row.pid): row for row in fd_peaks(fds).itertuples(index=False)}
    out = []
    for pid in sorted(set(limits) | set(targets)):
        limit, peak = limits.get(pid), peaks.get(pid)
        count = int(peak.peak) if peak is not None else None
        at = int(peak.peak_ns) if peak is not None else 0
        soft = soft_limit_at(limit, at) if limit else None
        out.append(
            {
                "pid": pid,
                "comm": targets.get(pid, {}).get("comm"),
                "rlimit_nofile": _limit_view(limit),
                "peak_fds": count,
                "peak_ns": at if peak is not None else None,
                "soft_at_peak": soft,
                "peak_fraction": round(count / soft, 4) if count is not None and soft else None,
                **({"peak_lower_bound": True} if meta.get("aggregate") else {}),
            }
        )
    return out


def _limit_view(limit: dict[str, Any] | None) -> dict[str, Any] | None:
    if not limit:
        return None
    return {"soft": limit.get("soft"), "hard": limit.get("hard"),
            "changes": list(limit.get("changes") or [])}  # fmt: skip


def headroom_text(entry: dict[str, Any]) -> str:
    """ "peak 120 of 128 fds (94%)": how close the process came to its soft limit."""
    peak, soft = entry["peak_fds"], entry["soft_at_peak"]
    if peak is None:
        return "no fds seen"
    if soft is None:
        unlimited = entry["rlimit_nofile"] is not None
        return f"peak {peak} fds ({'no limit' if unlimited else 'limit unknown'})"
    least = "at least " if entry.get("peak_lower_bound") else ""
    text = f"peak {least}{peak} of {soft} fds ({100 * peak / soft:.0f}%)"
    changes = (entry["rlimit_nofile"] or {}).get("changes") or []
    if changes:
        first = entry["rlimit_nofile"]["soft"]
        steps = " -> ".join(str(c["soft"]) for c in changes)
        text += f"; soft limit {first} -> {steps}"
    return text
