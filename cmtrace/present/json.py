"""The JSON report: DESIGN "Report contract" (`cmtrace report --format json`).

Scripts and CI read this document: keys are added, never renamed or dropped, without a new
REPORT_SCHEMA.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd

from cmtrace.analysis import Trace
from cmtrace.analysis.children import SHORT_LIVED_S, is_program_file, program_text
from cmtrace.present.common import peers

REPORT_SCHEMA = 1


def render_json(
    trace: Trace,
    exclude: list[str] | None = None,
    extra: dict[str, Any] | None = None,
    short_lived: float | None = SHORT_LIVED_S,
) -> str:
    """The report as JSON text; `extra` keys are added at the top level (a dump's `dump`)."""
    report = {**report_dict(trace, exclude=exclude, short_lived=short_lived), **(extra or {})}
    return readable_json(report)


BROKEN_LEVELS = 2  # the document's keys, and one level under them, go one a line


def readable_json(value: Any, level: int = 0) -> str:
    """JSON a person can read and a script parses: the top-level keys one a line, and under each
    its list's elements (a leak, a site) or its dict's keys one a line; deeper values compact.

    Every piece is written by json's C encoder: with `indent=` json falls back to its
    pure-Python encoder, which took about half of a large report's time (issue 12)."""
    if level >= BROKEN_LEVELS or not value or not isinstance(value, (dict, list)):
        return _encode(value)
    inner = "\n" + " " * (level + 1)
    if isinstance(value, dict):
        items = [f"{_encode(k)}: {readable_json(v, level + 1)}" for k, v in value.items()]
        return "{" + inner + ("," + inner).join(items) + "\n" + " " * level + "}"
    items = [readable_json(v, level + 1) for v in value]
    return "[" + inner + ("," + inner).join(items) + "\n" + " " * level + "]"


def report_dict(
    trace: Trace, exclude: list[str] | None = None, short_lived: float | None = SHORT_LIVED_S
) -> dict[str, Any]:
    """The report (DESIGN "Report contract"). Leaks of short-lived children (that lived under
    `short_lived` s) stay in `leaks`, marked `short_lived: true`, and are summed up in
    `short_lived`."""
    leaks = trace.leaks(exclude)
    stacks = {int(s): trace.stack(int(s)) for s in leaks["open_stack"].unique()}
    ns_pids = _namespace_pids(trace.meta)
    short = (
        trace.short_lived(short_lived).loc[leaks.index].to_numpy()
        if short_lived
        else np.zeros(len(leaks), dtype=bool)
    )
    out_leaks = []
    for row, in_short in zip(leaks.itertuples(index=False), short.tolist()):
        extra = {"ns_pid": ns_pids[int(row.pid)]} if int(row.pid) in ns_pids else {}
        out_leaks.append(
            {
                **extra,
                "pid": int(row.pid),
                "tid": int(row.tid),
                "fd": int(row.fd),
                "kind": _value(row.kind),
                "path": _value(row.path),
                "opened_ns": int(row.born_ns),
                "closed_by": _value(row.closed_by),
                "stack": stacks.get(int(row.open_stack), []),
                "site": _frame(row.site_file, row.site_line, row.site_function),
                "with": _frame(row.with_file, row.with_line, row.with_function),
                "api": _value(row.api),
                "service": _value(row.service),
                "cause": _value(row.cause),
                "fix": _value(row.fix),
                "evidence": _value(row.evidence),
                "short_lived": in_short,
            }
        )
    sites = trace.sites(exclude)
    return {
        "schema": REPORT_SCHEMA,
        "trace": {**trace.meta, "path": str(trace.path)},
        "lost_events": trace.lost_events,
        "interrupted": trace.interrupted,
        "unknown_closes": trace.pairing.unknown_closes,
        "leaks": out_leaks,
        "warnings": trace.warnings(),
        "sites": [
            {
                "file": _value(s.site_file),
                "line": int(s.site_line),
                "function": _value(s.site_function),
                "leaked": int(s.leaked),
                "opened": int(s.opened),
                "closed": int(s.closed),
                "leaks_per_s": round(float(s.leaks_per_s), 3),
                "cause": _value(s.cause),
                "api": _value(s.api),
                "service": _value(s.service),
            }
            for s in sites.itertuples(index=False)
        ],
        "peers": peers(leaks),
        "short_lived": _short_lived(trace, leaks[short], short_lived),
        # each target's RLIMIT_NOFILE (and changes) and its peak of open fds against it
        "processes": trace.process_limits(),
        # --aggregate: what the trace cannot answer, said (absent from full-history reports)
        **({"aggregate_limits": trace.aggregate_limits()} if trace.aggregate else {}),
    }


def _short_lived(trace: Trace, leaks: pd.DataFrame, seconds: float | None) -> dict[str, Any]:
    """The short-lived children's leaks summed up, with the `python -c` programs they ran."""
    files = sorted({str(f) for f in leaks["site_file"].dropna() if is_program_file(f)})
    return {
        "threshold_s": seconds,
        "leaked": int(len(leaks)),
        "processes": int(leaks["pid"].nunique()),
        "programs": [
            {
                "file": file,
                "text": program_text(trace.src, file),
                "pids": sorted(int(p) for p in trace.src.file_facts(file).get("pids", [])),
                "leaked": int((leaks["site_file"] == file).sum()),
            }
            for file in files
        ],
    }


def _namespace_pids(meta: dict[str, Any]) -> dict[int, int]:
    """host pid -> pid in its own namespace, for the targets and the followed processes met in
    a pid namespace of their own (the leak then carries both)."""
    return {
        int(t["pid"]): int(t["ns_pid"])
        for t in [*(meta.get("targets") or []), *(meta.get("processes") or [])]
        if isinstance(t, dict) and t.get("ns_pid") not in (None, t.get("pid"))
    }


def _json_default(value: Any) -> Any:
    """numpy scalars as their Python value; anything else json cannot write, as text."""
    if hasattr(value, "item"):
        return value.item()
    return str(value)


_encode = json.JSONEncoder(default=_json_default).encode  # compact: the C encoder


def _value(value: Any) -> Any:
    """A cell as JSON: missing (None, pd.NA, NaN) is null, numpy scalars become Python ones."""
    if value is None or value is pd.NA or (isinstance(value, float) and value != value):
        return None
    return value.item() if hasattr(value, "item") else value


def _frame(file: Any, line: Any, function: Any) -> dict[str, Any] | None:
    file = _value(file)
    if file is None:
        return None
    line = _value(line)
    return {"function": _value(function), "file": file, "line": int(line) if line else -1}
