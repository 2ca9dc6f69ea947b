"""fd lifetimes as Chrome trace-event JSON (`cmtrace export --format perfetto`).

One track per pid/thread; each fd an async slice from birth to death named by its opening site,
which the Perfetto UI (ui.perfetto.dev) and chrome://tracing open.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pandas as pd

from cmtrace.analysis import Trace

CATEGORY = "fd"


def render_perfetto(trace: Trace) -> str:
    return json.dumps(perfetto_trace(trace), separators=(",", ":"))


def _label(row: Any) -> str:
    """The slice name: the opening site, or the fd's kind and number without a stack."""
    if row.site_file is None or pd.isna(row.site_file):
        return f"{row.kind} fd {row.fd}"
    return f"{os.path.basename(str(row.site_file))}:{int(row.site_line)} {row.site_function}"


def _us(ns: float) -> float:
    return round(float(ns) / 1000.0, 3)


def perfetto_trace(trace: Trace) -> dict[str, Any]:
    """The trace-event document: metadata names, then a b/e pair per fd lifetime."""
    fds = trace.fds[~trace.fds["preexisting"]]
    events: list[dict[str, Any]] = []
    commands = {
        int(t["pid"]): " ".join(t.get("cmdline") or []) or str(t["pid"])
        for t in trace.meta.get("targets", [])
        if isinstance(t, dict) and "pid" in t
    }
    for pid in sorted(set(fds["pid"].astype(int))):
        name = commands.get(pid, f"pid {pid}")
        events.append({"ph": "M", "name": "process_name", "pid": pid, "tid": pid,
                       "args": {"name": name}})  # fmt: skip
    for pid, tid in sorted(set(zip(fds["pid"].astype(int), fds["tid"].astype(int)))):
        events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid,
                       "args": {"name": f"thread {tid}"}})  # fmt: skip
    end = trace.end_ns
    for life_id, row in zip(fds.index, fds.itertuples(index=False)):
        name = _label(row)
        died = end if pd.isna(row.died_ns) else int(row.died_ns)
        ident = f"0x{int(life_id):x}"
        common = {"cat": CATEGORY, "name": name, "id": ident, "pid": int(row.pid),
                  "tid": int(row.tid)}  # fmt: skip
        args = {
            "fd": int(row.fd),
            "kind": None if pd.isna(row.kind) else str(row.kind),
            "path": None if pd.isna(row.path) else str(row.path),
            "death": None if pd.isna(row.death) else str(row.death),
            "leak": bool(row.leak),
            "cause": None if row.cause is None or pd.isna(row.cause) else str(row.cause),
        }
        events.append({**common, "ph": "b", "ts": _us(max(int(row.born_ns), 0)), "args": args})
        events.append({**common, "ph": "e", "ts": _us(max(died, int(row.born_ns), 0))})
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {"cmtrace_trace": str(trace.path), "lost_events": trace.lost_events},
    }
