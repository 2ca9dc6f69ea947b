"""`cmtrace diff BEFORE AFTER`: which opening sites leak less, more, or no longer (prove a fix).

Sites are matched by file, function and the opening line's source text, so a fix that shifts
line numbers still matches (DESIGN "Diff contract").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cmtrace.analysis import Trace, load, read_exclude_file
from cmtrace.cli import add_site_output_options
from cmtrace.errors import EXIT_OK, UsageError

DIFF_SCHEMA = 1


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "diff",
        help="compare the leaks of two traces (before and after a fix)",
        description="Leaked fds per opening site in BEFORE and AFTER.",
    )
    parser.add_argument("before", metavar="BEFORE", help="trace directory before the change")
    parser.add_argument("after", metavar="AFTER", help="trace directory after the change")
    add_site_output_options(parser, formats=("text", "json"))
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    exclude = read_exclude_file(args.exclude) if args.exclude else None
    result = diff_traces(load(args.before), load(args.after), exclude)
    text = json.dumps(result, indent=1) if args.format == "json" else render_text(result)
    if args.output:
        try:
            Path(args.output).write_text(text + "\n")
        except OSError as exc:
            raise UsageError(f"cannot write {args.output} ({exc.strerror})") from None
    else:
        sys.stdout.write(text + "\n")
    return EXIT_OK


def _site_table(trace: Trace, exclude: list[str] | None) -> dict[tuple, dict]:
    """(file, function, source text or line) -> the site's leak figures."""
    out: dict[tuple, dict] = {}
    for site in trace.sites(exclude).itertuples(index=False):
        text = trace.src.text(site.site_file, int(site.site_line))
        anchor = text.strip() if text else f"line {int(site.site_line)}"
        key = (site.site_file, site.site_function, anchor)
        entry = out.setdefault(
            key,
            {"file": site.site_file, "line": int(site.site_line),
             "function": site.site_function, "cause": site.cause, "leaked": 0, "opened": 0},
        )  # fmt: skip
        entry["leaked"] += int(site.leaked)
        entry["opened"] += int(site.opened)
        entry["cause"] = entry["cause"] or site.cause
    return out


def diff_traces(before: Trace, after: Trace, exclude: list[str] | None = None) -> dict:
    old, new = _site_table(before, exclude), _site_table(after, exclude)
    sites = []
    for key in list(old) + [k for k in new if k not in old]:
        b, a = old.get(key), new.get(key)
        leaked_before = b["leaked"] if b else 0
        leaked_after = a["leaked"] if a else 0
        if not (leaked_before or leaked_after):
            continue
        ref = b or a
        sites.append(
            {
                "file": ref["file"],
                "line": ref["line"],
                "function": ref["function"],
                "cause": (b and b["cause"]) or (a and a["cause"]),
                "before": leaked_before,
                "after": leaked_after,
                "opened_before": b["opened"] if b else 0,
                "opened_after": a["opened"] if a else 0,
            }
        )
    sites.sort(key=lambda s: (s["after"] - s["before"], -s["before"]))
    return {"schema": DIFF_SCHEMA, "before": str(before.path), "after": str(after.path),
            "sites": sites}  # fmt: skip


def _verdict(site: dict) -> str:
    before, after = site["before"], site["after"]
    if after == 0:
        return "fixed"
    if before == 0:
        return "new leak"
    if after < before:
        return "leaks less"
    if after > before:
        return "leaks more"
    return "unchanged"


def render_text(result: dict) -> str:
    lines = [f"cmtrace diff: {result['before']} -> {result['after']}"]
    if not result["sites"]:
        lines.append("no leaks in either trace")
        return "\n".join(lines)
    lines.append(f"{'before':>7} {'after':>7}  {'verdict':<11} site")
    for s in result["sites"]:
        lines.append(
            f"{s['before']:>7} {s['after']:>7}  {_verdict(s):<11} {s['file']}:{s['line']} "
            f"in {s['function']} ({s['cause'] or 'unknown'})"
        )
    total_b = sum(s["before"] for s in result["sites"])
    total_a = sum(s["after"] for s in result["sites"])
    lines.append(f"total leaked: {total_b} -> {total_a}")
    return "\n".join(lines)
