"""After the session: the trace and the side files -> leaks per test, as text and JSON.

The JSON (`--cmtrace-json`) is the issue's contract: {"backend", "lost_events", "tests":
[{"nodeid", "outcome", "leaks": [LEAK], "warnings": [{"file", "line", "count"}]}], "fixtures":
[{"name", "scope", "leaks": [LEAK]}]}, LEAK = {"fd", "kind", "path", "file", "line", "function",
"api", "cause", "fix", "phase", "allowed"} (plus "fixture", "closed_by" and "worker").
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from cmtrace.analysis import Trace, load
from cmtrace.analysis.apis import api_of
from cmtrace.analysis.causes import Context, classify
from cmtrace.pytest_plugin.attribution import (
    Owner,
    allowed_flags,
    attribute,
    build_timelines,
    opened_by_harness,
    timed_marks,
)
from cmtrace.pytest_plugin.boundaries import seq_of_marker
from cmtrace.trace import schema


def report_session(config: pytest.Config, trace_dir: Path, marks_dir: Path) -> dict:
    """Print the section, write --cmtrace-json; return the JSON document and whether the
    recording covered the whole session ("complete")."""
    trace = load(trace_dir)
    document = session_document(trace, read_side_files(marks_dir))
    sys.stdout.write(render_text(document, trace))
    json_path = config.getoption("cmtrace_json")
    if json_path:
        out = Path(config.invocation_params.dir, json_path)
        out.write_text(json.dumps(document, indent=2) + "\n")
    return {**document, "complete": trace.status == schema.STATUS_COMPLETE}


def read_side_files(marks_dir: Path) -> list[dict]:
    records = []
    for file in sorted(marks_dir.glob("marks-*.jsonl")):
        for line in file.read_text().splitlines():
            if line.strip():
                records.append(json.loads(line))
    return records


def marker_times(trace: Trace) -> dict[tuple[int, int], int]:
    """(pid, seq) -> t_ns of each boundary marker the recorder saw."""
    events = trace.events
    failed = events[events["op"] == schema.OP_FAIL]
    out = {}
    for pid, path, t in zip(failed["pid"], failed["path"], failed["t_ns"]):
        seq = seq_of_marker(path)
        if seq is not None:
            out[(int(pid), seq)] = int(t)
    return out


def session_document(trace: Trace, side: list[dict]) -> dict:
    marks = timed_marks((r for r in side if "edge" in r), marker_times(trace))
    owned = attribute(code_under_test(trace), build_timelines(marks))
    tests = [r for r in side if r.get("record") == "test"]
    started = {m["nodeid"]: m["t_ns"] for m in reversed(marks) if m["kind"] == "phase"}
    tests.sort(key=lambda r: (started.get(r["nodeid"], float("inf")), r["nodeid"]))
    explain = Explainer(trace)
    by_owner = {owner: rows for owner, rows in owned.groupby("owner", sort=False)}
    return {
        "backend": trace.meta.get("backend", "bpf"),
        "lost_events": int(trace.lost_events),
        "tests": [_test_entry(t, by_owner.get(Owner("test", t["nodeid"])), explain) for t in tests],
        "fixtures": _fixture_entries(by_owner, explain),
    }


def code_under_test(trace: Trace) -> pd.DataFrame:
    """The trace's fds minus those the harness opened (opened_by_harness), decided once per
    opening stack."""
    fds = trace.fds
    stacks = pd.unique(fds["open_stack"].to_numpy())
    harness = {s for s in stacks.tolist() if opened_by_harness(trace.frames.get(int(s), []))}
    return fds[~fds["open_stack"].isin(harness).to_numpy()]


def _test_entry(test: dict, rows: pd.DataFrame | None, explain: Explainer) -> dict:
    entry = {
        "nodeid": test["nodeid"],
        "outcome": test["outcome"],
        "leaks": [],
        "warnings": [],
        "worker": test.get("worker"),
    }
    if rows is None:
        return entry
    rows = rows.sort_values("born_ns")
    leaked = rows[rows["leaked"]]
    allowed = allowed_flags(len(leaked), test.get("allow"), bool(test.get("skip")))
    entry["leaks"] = [
        {**explain.leak(row), "allowed": flag}
        for row, flag in zip(leaked.itertuples(index=False), allowed)
    ]
    entry["warnings"] = finalizer_warnings(rows[~rows["leaked"]])
    return entry


def _fixture_entries(by_owner: dict, explain: Explainer) -> list[dict]:
    out = []
    for owner, rows in by_owner.items():
        if owner.kind != "fixture":
            continue
        leaked = rows[rows["leaked"]].sort_values("born_ns")
        if leaked.empty:
            continue
        leaks = [{**explain.leak(row), "allowed": False} for row in leaked.itertuples(index=False)]
        worker = leaks[0]["worker"]
        out.append({"name": owner.name, "scope": owner.scope, "leaks": leaks, "worker": worker})
    return out


def finalizer_warnings(rows: pd.DataFrame) -> list[dict]:
    """fds of a test closed by a finalizer before its teardown ended, per opening line."""
    closed = rows[rows["death"].astype(object) == "finalizer"]
    counts: dict[tuple, int] = {}
    for file, line in zip(closed["site_file"], closed["site_line"]):
        key = (None if pd.isna(file) else str(file), None if pd.isna(line) else int(line))
        counts[key] = counts.get(key, 0) + 1
    return [{"file": f, "line": n, "count": c} for (f, n), c in counts.items()]


class Explainer:
    """Opening line, API, cause and fix of an fd, as `cmtrace report` gives them."""

    def __init__(self, trace: Trace):
        self.trace = trace

    def leak(self, row) -> dict:
        cause, fix = _text(row.cause), _text(row.fix)
        frames = self.trace.frames.get(int(row.open_stack), [])
        if cause is None:  # outlived its test but not the trace: the analysis did not judge it
            verdict = classify(frames, self.trace.src, Context())
            cause, fix = verdict.cause, verdict.fix
        return {
            "fd": int(row.fd),
            "kind": _text(row.kind),
            "path": _text(row.path),
            "file": _text(row.site_file),
            "line": None if pd.isna(row.site_line) else int(row.site_line),
            "function": _text(row.site_function),
            "api": api_of(frames, self.trace.src),  # as cmtrace report names it
            "cause": cause,
            "fix": fix,
            "phase": row.phase,
            "fixture": _text(row.fixture),
            "closed_by": None if pd.isna(row.died_ns) else _text(row.death),
            "worker": _text(row.worker),
        }


def _text(value) -> str | None:
    return None if value is None or (not isinstance(value, str) and pd.isna(value)) else str(value)


# --- the terminal section ------------------------------------------------------------------
def render_text(document: dict, trace: Trace) -> str:
    lines = [
        "",
        f"{' file descriptor leaks (cmtrace) ':=^100}",
        f"backend {document['backend']}, {document['lost_events']} lost events",
    ]
    for test in document["tests"]:
        if test["leaks"]:
            lines.append("")
            lines.extend(_leak_block(test["nodeid"], test["leaks"], trace, test["worker"]))
    for fixture in document["fixtures"]:
        lines.append("")
        name = f"fixture {fixture['name']} ({fixture['scope']} scope)"
        lines.extend(_leak_block(name, fixture["leaks"], trace, fixture["worker"]))
    warned = [t for t in document["tests"] if t["warnings"]]
    if warned:
        lines.append("")
        lines.append("warnings (closed by a finalizer, not by close()/with: like ResourceWarning):")
        for test in warned:
            for w in test["warnings"]:
                lines.append(
                    f"  {test['nodeid']}: {w['count']} fd(s) opened at {w['file']}:{w['line']}"
                )
    lines.append("")
    lines.append(_totals(document))
    return "\n".join(lines) + "\n"


def _leak_block(title: str, leaks: list[dict], trace: Trace, worker: str | None) -> list[str]:
    out = [f"{title}: {len(leaks)} leaked fd(s)" + (f" (xdist worker {worker})" if worker else "")]
    for leak in leaks:
        tolerated = "  (allowed by marker)" if leak["allowed"] else ""
        where = f" fixture {leak['fixture']}" if leak.get("fixture") else ""
        out.append(f"  fd {leak['fd']} {leak['kind']} {leak['path'] or ''}  "
                   f"[{leak['phase']}{where}]{tolerated}")  # fmt: skip
        if leak["file"] is None:
            out.append("     opened without a Python stack")
            continue
        api = f" by {leak['api']}" if leak["api"] else ""
        out.append(f"     opened at {leak['file']}:{leak['line']} in {leak['function']}{api}")
        source = trace.src.text(leak["file"], leak["line"])
        if source:
            out.append(f"     {leak['line']:>6} | {source.strip()}")
        out.append(f"     cause: {leak['cause']}"
                   + (f", closed later by {leak['closed_by']}" if leak["closed_by"] else ""))  # fmt: skip
        if leak["fix"]:
            out.extend(_wrapped("     fix: ", leak["fix"]))
    return out


def _totals(document: dict) -> str:
    tests = document["tests"]
    leaking = [t for t in tests if any(not leak["allowed"] for leak in t["leaks"])]
    fds = sum(len(t["leaks"]) for t in tests)
    allowed = sum(leak["allowed"] for t in tests for leak in t["leaks"])
    warnings = sum(w["count"] for t in tests for w in t["warnings"])
    fixture_fds = sum(len(f["leaks"]) for f in document["fixtures"])
    return (
        f"totals: {len(tests)} tests, {len(leaking)} leaking; {fds} fds leaked by tests "
        f"({allowed} allowed), {fixture_fds} by wider-scoped fixtures; "
        f"{warnings} finalizer warnings; {document['lost_events']} lost events"
    )


def _wrapped(head: str, text: str, width: int = 100) -> list[str]:
    lines = textwrap.wrap(str(text), width - len(head), break_on_hyphens=False) or [""]
    return [head + lines[0]] + [" " * len(head) + line for line in lines[1:]]
