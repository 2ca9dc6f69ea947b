"""`cmtrace report`: the leaks of a trace as text, JSON (DESIGN "Report contract") or HTML."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TextIO

import pandas as pd

from cmtrace.analysis import Trace, load, read_exclude_file
from cmtrace.errors import EXIT_LEAKS, EXIT_OK, UsageError

REPORT_SCHEMA = 1


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "report",
        help="explain the leaks of a recorded trace",
        description="Leak sites ranked by count and growth, each with its cause and fix.",
    )
    parser.add_argument("trace", metavar="TRACE", help="trace directory written by a recording")
    parser.add_argument("--format", choices=("text", "json", "html"), default="text")
    parser.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")
    parser.add_argument("--top", type=int, default=20, metavar="N", help="sites shown (text)")
    parser.add_argument(
        "--fail-on-leak", action="store_true", help="exit 3 when leaks are found (for CI)"
    )
    parser.add_argument(
        "--exclude", metavar="FILE", help="file of site patterns to ignore (FILE[:FUNC|LINE])"
    )
    parser.add_argument(
        "--strip-source", action="store_true", help="HTML: leave source lines out (for sharing)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    exclude = read_exclude_file(args.exclude) if args.exclude else None
    trace = load(args.trace)
    if args.format == "json":
        text = json.dumps(report_dict(trace, exclude=exclude), indent=1, default=_json_default)
    elif args.format == "html":
        text = render_html(trace, exclude=exclude, strip_source=args.strip_source)
    else:
        text = render_text(trace, top=args.top, exclude=exclude)
    _write(text, args.output)
    leaks = len(trace.leaks(exclude))
    return EXIT_LEAKS if args.fail_on_leak and leaks else EXIT_OK


def _write(text: str, output: str | None) -> None:
    if output:
        try:
            Path(output).write_text(text if text.endswith("\n") else text + "\n")
        except OSError as exc:
            raise UsageError(f"cannot write {output} ({exc.strerror}): choose another -o FILE")
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def print_summary(trace_dir: str | Path, file: TextIO = sys.stdout, top: int = 10) -> int:
    """The end-of-recording summary (text report of the top sites); returns the leak count."""
    trace = load(trace_dir)
    file.write(render_text(trace, top=top))
    return int(len(trace.leaks()))


# --- JSON ---------------------------------------------------------------------------------


def _value(value):
    if value is None or value is pd.NA or (isinstance(value, float) and value != value):
        return None
    return value.item() if hasattr(value, "item") else value


def _frame(file, line, function) -> dict | None:
    file = _value(file)
    if file is None:
        return None
    line = _value(line)
    return {"function": _value(function), "file": file, "line": int(line) if line else -1}


def report_dict(trace: Trace, exclude: list[str] | None = None) -> dict:
    leaks = trace.leaks(exclude)
    stacks = {int(s): trace.stack(int(s)) for s in leaks["open_stack"].unique()}
    out_leaks = []
    for row in leaks.itertuples(index=False):
        out_leaks.append(
            {
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
                "cause": _value(row.cause),
                "fix": _value(row.fix),
                "evidence": _value(row.evidence),
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
            }
            for s in sites.itertuples(index=False)
        ],
    }


# --- text ---------------------------------------------------------------------------------


def render_text(trace: Trace, top: int = 20, exclude: list[str] | None = None) -> str:
    lines: list[str] = []
    leaks = trace.leaks(exclude)
    sites = trace.sites(exclude)
    leaking = sites[sites["leaked"] > 0]
    lines.append(_headline(trace, leaks, leaking))
    lines.extend(_caveats(trace))
    for rank, site in enumerate(leaking.head(top).itertuples(index=False), start=1):
        lines.append("")
        lines.extend(_site_block(trace, leaks, site, rank))
    if len(leaking) > top:
        lines.append(f"\n... and {len(leaking) - top} more leaking sites (--top N shows more)")
    warnings = trace.warnings()
    if warnings:
        lines.append("")
        lines.append("warnings (closed by a finalizer, not by close()/with: like ResourceWarning):")
        for w in warnings[:top]:
            where = f"{w['site']['file']}:{w['site']['line']}" if w["site"] else "<no stack>"
            fn = w["site"]["function"] if w["site"] else ""
            lines.append(f"  {w['count']:>6} fds opened at {where} in {fn}")
    lines.append("")
    lines.append(_totals(trace, sites))
    return "\n".join(lines) + "\n"


def _headline(trace: Trace, leaks: pd.DataFrame, leaking: pd.DataFrame) -> str:
    pids = trace.fds["pid"].nunique()
    head = (
        f"cmtrace: {trace.path} ({trace.status}, {trace.duration_s:.1f} s, "
        f"{pids} process{'es' if pids != 1 else ''})"
    )
    if leaks.empty:
        return head + "\nno leaked file descriptors"
    kinds = leaks.groupby("kind", observed=True).size().sort_values(ascending=False)
    kind_text = ", ".join(f"{n} {k}" for k, n in kinds.items())
    return head + (
        f"\n{len(leaks)} leaked file descriptor{'s' if len(leaks) != 1 else ''} "
        f"({kind_text}) from {len(leaking)} site{'s' if len(leaking) != 1 else ''}"
    )


def _caveats(trace: Trace) -> list[str]:
    out = []
    if trace.interrupted:
        out.append(
            "INTERRUPTED: the tracer stopped without finishing; the last second may be missing"
        )
    if trace.lost_events:
        out.append(
            f"LOST EVENTS: {trace.lost_events} events were dropped by the kernel; counts may be off"
        )
    reason = trace.no_python_reason
    if reason:
        out.append(f"no Python stacks: {reason}")
    return out


def _site_block(trace: Trace, leaks: pd.DataFrame, site, rank: int) -> list[str]:
    rows = leaks[
        (leaks["site_file"].fillna("<no Python stack>") == site.site_file)
        & (leaks["site_line"].fillna(0).astype(int) == int(site.site_line))
    ]
    where = f"{site.site_file}:{site.site_line}"
    out = [
        f"#{rank} {int(site.leaked)} leaked of {int(site.opened)} opened "
        f"({site.leaks_per_s:.2f}/s)  {site.kind or ''}  cause: {site.cause or 'unknown'}",
        f"   opened at {where} in {site.site_function}",
    ]
    text = trace.src.text(site.site_file, int(site.site_line))
    if text:
        out.append(f"   {int(site.site_line):>6} | {text.strip()}")
    paths = [p for p in site.paths if p]
    if paths:
        out.append("   paths: " + ", ".join(paths))
    if not rows.empty:
        first = rows.iloc[0]
        if first["with_file"] is not None and not pd.isna(first["with_file"]):
            wtext = trace.src.text(first["with_file"], int(first["with_line"])) or ""
            out.append(f"   with statement: {first['with_file']}:{int(first['with_line'])}"
                       f"  {wtext.strip()}")  # fmt: skip
        closed_by = rows["closed_by"].fillna("still open at end").value_counts()
        out.append("   closed by: " + ", ".join(f"{k} ({n})" for k, n in closed_by.items()))
        stack = trace.user_stack(int(first["open_stack"]))
        if stack:
            out.append("   stack (innermost first):")
            for frame in stack[:8]:
                out.append(f"     {frame['file']}:{frame['line']} in {frame['function']}")
        if first["fix"]:
            out.append(f"   fix: {first['fix']}")
        if first["evidence"]:
            out.append(f"   evidence: {first['evidence']}")
    return out


def _totals(trace: Trace, sites: pd.DataFrame) -> str:
    opened = int(sites["opened"].sum()) if not sites.empty else 0
    leaked = int(sites["leaked"].sum()) if not sites.empty else 0
    text = (
        f"totals: {opened} fds opened during the trace, {opened - leaked} closed, "
        f"{leaked} leaked; {trace.lost_events} lost events"
    )
    if trace.pairing.unknown_closes:
        text += f"; {trace.pairing.unknown_closes} closes of fds opened before the trace"
    return text


# --- HTML ---------------------------------------------------------------------------------


def render_html(trace: Trace, exclude: list[str] | None = None, strip_source: bool = False) -> str:
    from cmtrace.htmlreport_stub import render  # replaced below once the template exists

    return render(trace, exclude, strip_source)
