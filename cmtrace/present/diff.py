"""`cmtrace diff`: leaked fds per opening site in two traces (DESIGN "Diff contract").

Sites are matched by file, function and the opening line's source text, so a fix that shifts
line numbers still matches.
"""

from __future__ import annotations

import json
from typing import Any

from cmtrace.analysis import Trace

DIFF_SCHEMA = 1

# (file, function, source text or "line N"): what identifies a site across two traces.
SiteKey = tuple[str, str, str]


def render_json(result: dict[str, Any]) -> str:
    return json.dumps(result, indent=1)


def _site_table(trace: Trace, exclude: list[str] | None) -> dict[SiteKey, dict[str, Any]]:
    """(file, function, source text or line) -> the site's leak figures."""
    out: dict[SiteKey, dict[str, Any]] = {}
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


def diff_traces(before: Trace, after: Trace, exclude: list[str] | None = None) -> dict[str, Any]:
    old, new = _site_table(before, exclude), _site_table(after, exclude)
    sites = []
    for key in list(old) + [k for k in new if k not in old]:
        b, a = old.get(key), new.get(key)
        leaked_before = b["leaked"] if b else 0
        leaked_after = a["leaked"] if a else 0
        if not (leaked_before or leaked_after):
            continue
        ref = b or a
        assert ref is not None  # the key came from one of the two tables
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


def _verdict(site: dict[str, Any]) -> str:
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


def render_text(result: dict[str, Any]) -> str:
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
