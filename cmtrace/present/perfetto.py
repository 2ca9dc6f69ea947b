"""fd lifetimes as Chrome trace-event JSON (`cmtrace export --format perfetto`).

One track per pid/thread; each fd an async slice from birth to death named by its opening site,
which the Perfetto UI (ui.perfetto.dev) and chrome://tracing open.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import pandas as pd

from cmtrace.analysis import Trace

CATEGORY = "fd"


def render_perfetto(trace: Trace) -> str:
    """The trace-event document as compact JSON: metadata names, then a b/e pair per fd.

    Millions of fds share a few sites, kinds, paths and causes: each distinct value is
    encoded once, and each fd's two events are one formatted string (no dict per event).
    """
    fds = trace.fds[~trace.fds["preexisting"]]
    meta = _metadata(trace, fds)
    slices = _slices(fds, trace.end_ns)
    other = _json({"cmtrace_trace": str(trace.path), "lost_events": trace.lost_events})
    events = ",".join([*map(_json, meta), *slices])
    return f'{{"traceEvents":[{events}],"displayTimeUnit":"ms","otherData":{other}}}'


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _metadata(trace: Trace, fds: pd.DataFrame) -> list[dict[str, Any]]:
    """process_name and thread_name events: one per pid and per (pid, tid)."""
    events: list[dict[str, Any]] = []
    commands = {
        int(t["pid"]): " ".join(t.get("cmdline") or []) or str(t["pid"])
        for t in trace.meta.get("targets", [])
        if isinstance(t, dict) and "pid" in t
    }
    pids, tids = fds["pid"].to_numpy(np.int64), fds["tid"].to_numpy(np.int64)
    for pid in np.unique(pids).tolist():
        name = commands.get(pid, f"pid {pid}")
        events.append({"ph": "M", "name": "process_name", "pid": pid, "tid": pid,
                       "args": {"name": name}})  # fmt: skip
    pairs = np.unique(np.stack([pids, tids], axis=1), axis=0) if len(pids) else []
    for pid, tid in (tuple(pair) for pair in np.asarray(pairs).tolist()):
        events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid,
                       "args": {"name": f"thread {tid}"}})  # fmt: skip
    return events


def _encoded(column: pd.Series) -> np.ndarray:
    """Each row's value as JSON (null for a missing one), encoded once per distinct value."""
    codes, uniques = pd.factorize(column.astype(object), use_na_sentinel=True)
    texts = [_json(None if value is None or pd.isna(value) else str(value)) for value in uniques]
    lookup: np.ndarray = np.array([*texts, "null"], dtype=object)
    encoded: np.ndarray = lookup[codes]  # code -1 (missing) picks the trailing null
    return encoded


def _names(fds: pd.DataFrame) -> np.ndarray:
    """The slice name of each fd as JSON: its opening site, or its kind and number; made once
    per distinct (file, line, function)."""
    columns = [
        fds[c].astype(object).to_numpy() for c in ("site_file", "site_line", "site_function")
    ]
    key: np.ndarray = np.zeros(len(fds), dtype=np.int64)
    for values in columns:  # one number per distinct triple (NaN a value of its own)
        codes, uniques = pd.factorize(values, use_na_sentinel=False)
        key = key * (len(uniques) + 1) + codes
    number, first = _first_rows(key)
    texts = []
    for row in first.tolist():
        file, line, function = (values[row] for values in columns)
        texts.append(
            None
            if file is None or pd.isna(file)
            else _json(f"{os.path.basename(str(file))}:{int(line)} {function}")
        )
    names: np.ndarray = np.array(texts, dtype=object)[number]
    no_site = np.flatnonzero(pd.isna(names))
    if len(no_site):
        kinds = fds["kind"].astype(object).to_numpy()[no_site]
        numbers = fds["fd"].to_numpy()[no_site].tolist()
        names[no_site] = [_json(f"{kind} fd {fd}") for kind, fd in zip(kinds, numbers)]
    return names


def _first_rows(key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(number of each row's distinct key, first row of each distinct key)."""
    number, uniques = pd.factorize(key)
    first: np.ndarray = np.full(len(uniques), -1, dtype=np.int64)
    first[number[::-1]] = np.arange(len(key) - 1, -1, -1)  # the last write is the first row
    return number, first


def _microseconds(ns: np.ndarray) -> list[str]:
    """ns as JSON numbers of microseconds, rounded to 3 decimals as Python's round does."""
    return [repr(round(us, 3)) for us in (ns.astype(np.float64) / 1000.0).tolist()]


def _slices(fds: pd.DataFrame, end_ns: int) -> list[str]:
    """A b event (with the fd's facts) and an e event per lifetime, as JSON text."""
    born = np.maximum(fds["born_ns"].to_numpy(np.int64), 0)
    died = fds["died_ns"].to_numpy(dtype=np.float64, na_value=np.nan)
    died_ns = np.where(np.isnan(died), end_ns, np.nan_to_num(died)).astype(np.int64)
    ends = np.maximum(died_ns, born)
    cause = fds["cause"] if "cause" in fds else pd.Series(None, index=fds.index, dtype=object)
    columns = zip(
        _names(fds),
        fds.index.to_numpy(np.int64).tolist(),
        fds["pid"].to_numpy(np.int64).tolist(),
        fds["tid"].to_numpy(np.int64).tolist(),
        _microseconds(born),
        _microseconds(ends),
        fds["fd"].to_numpy(np.int64).tolist(),
        _encoded(fds["kind"]),
        _encoded(fds["path"]),
        _encoded(fds["death"]),
        np.where(fds["leak"].to_numpy(bool), "true", "false").tolist(),
        _encoded(cause),
    )
    out = []
    for name, life, pid, tid, ts, te, fd, kind, path, death, leak, why in columns:
        common = f'{{"cat":"{CATEGORY}","name":{name},"id":"0x{life:x}","pid":{pid},"tid":{tid}'
        out.append(
            f'{common},"ph":"b","ts":{ts},"args":{{"fd":{fd},"kind":{kind},"path":{path},'
            f'"death":{death},"leak":{leak},"cause":{why}}}}},{common},"ph":"e","ts":{te}}}'
        )
    return out
