"""The text report (`cmtrace report`, and the summary a recording prints when it ends)."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import TextIO

import pandas as pd

from cmtrace.analysis import Trace, load, read_exclude_file
from cmtrace.analysis.children import SHORT_LIVED_S
from cmtrace.analysis.limits import headroom_text
from cmtrace.present.common import (
    Findings,
    SiteRow,
    caveats,
    findings,
    fit_lines,
    headline,
    leaked_kind,
    leaked_paths,
    leaks_by_site,
    peer_headline,
    peer_text,
    peers,
    program_line,
    short_lived_headline,
    shown_stack,
    shown_text,
    site_where,
    totals,
)
from cmtrace.trace.sources import COMMAND_FILE

STACK_FRAMES_SHOWN = 8  # innermost user frames printed per site


def render_text(
    trace: Trace,
    top: int = 20,
    exclude: list[str] | None = None,
    by_peer: bool = False,
    short_lived: float | None = SHORT_LIVED_S,
) -> str:
    """The leaking sites ranked (the `top` first), then those of short-lived children (that
    lived under `short_lived` s), finalizer warnings, then the totals; with `by_peer`, the
    socket leaks grouped by peer first. No line is longer than common.MAX_LINE."""
    lines: list[str] = []
    found = findings(trace, exclude, short_lived)
    leaks, leaking = found.leaks, found.leaking
    lines.append(headline(trace, leaks, leaking, apart=not found.short_leaks.empty))
    if not found.short_leaks.empty:
        lines.append(f"+ {short_lived_headline(found)}, listed after the others")
    lines.extend(caveats(trace))
    if by_peer:
        lines.extend(_peer_blocks(leaks, top))
    leaks_at = leaks_by_site(leaks)
    for rank, site in enumerate(leaking.head(top).itertuples(index=False), start=1):
        lines.append("")
        lines.extend(_site_block(trace, leaks_at(site), site, rank))
    if len(leaking) > top:
        lines.append(f"\n... and {len(leaking) - top} more leaking sites (--top N shows more)")
    lines.extend(_short_lived_blocks(trace, found, top))
    warnings = trace.warnings()
    if warnings:
        lines.append("")
        lines.append("warnings (closed by a finalizer, not by close()/with: like ResourceWarning):")
        for w in warnings[:top]:
            where = f"{w['site']['file']}:{w['site']['line']}" if w["site"] else "<no stack>"
            fn = w["site"]["function"] if w["site"] else ""
            lines.append(f"  {w['count']:>6} fds opened at {where} in {fn}")
    lines.extend(_limit_lines(trace, top))
    lines.append("")
    lines.append(totals(trace, found.all_sites))
    return "\n".join(fit_lines(lines)) + "\n"


def _limit_lines(trace: Trace, top: int) -> list[str]:
    """How close each target came to its RLIMIT_NOFILE, the closest first."""
    entries = [e for e in trace.process_limits() if e["rlimit_nofile"]]
    if not entries:
        return []
    entries.sort(key=lambda e: -(e["peak_fraction"] or 0))
    out = ["", "open fds vs RLIMIT_NOFILE (soft limit at the peak):"]
    for entry in entries[:top]:
        out.append(f"  pid {entry['pid']} ({entry['comm'] or '?'}): {headroom_text(entry)}")
    if len(entries) > top:
        out.append(f"  ... and {len(entries) - top} more processes")
    return out


def print_summary(
    trace_dir: str | Path,
    file: TextIO = sys.stdout,
    top: int = 10,
    exclude: str | Path | list[str] | None = None,
    short_lived: float | None = SHORT_LIVED_S,
) -> int:
    """The end-of-recording summary (text report of the top sites); returns the leak count
    of the long-lived processes.

    `exclude` is an exclude file (`--exclude FILE`) or its patterns; excluded sites are left
    out of the summary and of the count (which `--fail-on-leak` turns into exit code 3), and
    so are the leaks of short-lived children (listed apart).
    """
    if isinstance(exclude, (str, Path)):
        exclude = read_exclude_file(exclude)
    trace = load(trace_dir)
    file.write(render_text(trace, top=top, exclude=exclude, short_lived=short_lived))
    return int(len(findings(trace, exclude, short_lived).leaks))


def _site_block(trace: Trace, rows: pd.DataFrame, site: SiteRow, rank: int) -> list[str]:
    """One site's block; `rows` are its leaks."""
    kind = leaked_kind(site, rows)
    out = [
        f"#{rank} {int(site.leaked)} leaked of {int(site.opened)} opened "
        f"({site.leaks_per_s:.2f}/s)  {kind}  cause: {site.cause or 'unknown'}",
        f"   opened at {site_where(site)}",
    ]
    out.extend(_source_lines(trace, site, "   "))
    if site.api:
        out.append(f"   api: {site.api}")
    paths = [peer_text(kind, p) for p in leaked_paths(site, rows)]
    if paths:
        out.append("   paths: " + ", ".join(paths))
    if not rows.empty:
        out.extend(_leak_details(trace, rows))
    return out


def _source_lines(
    trace: Trace, site: SiteRow, indent: str, textless_program: bool = False
) -> list[str]:
    """The opening line's source and, for a `python -c` program, its text; with
    `textless_program`, a string-run site the trace has no text of says so."""
    out = []
    text = trace.src.text(site.site_file, int(site.site_line))
    if text:
        out.append(f"{indent}{int(site.site_line):>6} | {text.strip()}")
    program = program_line(trace, site.site_file)
    if program:
        out.append(f"{indent}program: {program}")
    elif textless_program and site.site_file == COMMAND_FILE:
        out.append(f"{indent}program: code run from a string (exec(), python -c) the trace has "
                   "no text of")  # fmt: skip
    return out


def _short_lived_blocks(trace: Trace, found: Findings, top: int) -> list[str]:
    """The short-lived children's leaking sites, a few lines each: which process ran what
    (a `python -c` program's own text), the line, the api and paths."""
    leaking = found.short_leaking
    if leaking.empty:
        return []
    out = ["", short_lived_headline(found, title=True)]
    leaks_at = leaks_by_site(found.short_leaks)
    for rank, site in enumerate(leaking.head(top).itertuples(index=False), start=1):
        rows = leaks_at(site)
        pids = rows["pid"].nunique()
        api = f"  api: {site.api}" if site.api else ""
        out.append(f"  #{rank} {int(site.leaked)} leaked in {pids} process"
                   f"{'es' if pids != 1 else ''}  {leaked_kind(site, rows)}{api}")  # fmt: skip
        out.append(f"     opened at {site_where(site)}")
        out.extend(_source_lines(trace, site, "     ", textless_program=True))
        paths = [peer_text(leaked_kind(site, rows), p) for p in leaked_paths(site, rows)]
        if paths:
            out.append("     paths: " + ", ".join(paths))
    if len(leaking) > top:
        out.append(f"  ... and {len(leaking) - top} more short-lived sites (--top N shows more)")
    return out


def _peer_blocks(leaks: pd.DataFrame, top: int) -> list[str]:
    """--by-peer: `10 connections to 127.0.0.1:5432 (PostgreSQL?)`, each with its sites."""
    groups = peers(leaks)
    out = ["", "socket leaks by peer:" if groups else "socket leaks by peer: none"]
    for peer in groups[:top]:
        out.append(f"  {peer_headline(peer)}")
        for site in peer["sites"][:STACK_FRAMES_SHOWN]:
            out.append(f"    {site['leaked']:>6} opened at {site['file']}:{site['line']} "
                       f"in {site['function']}")  # fmt: skip
    if len(groups) > top:
        out.append(f"  ... and {len(groups) - top} more peers (--top N shows more)")
    return out


def _leak_details(trace: Trace, rows: pd.DataFrame) -> list[str]:
    """With statement, how the fds died, the opening stack, fix and evidence: from the site's
    first leak (the rest share its site, hence its cause)."""
    out = []
    first = rows.iloc[0]
    if first["with_file"] is not None and not pd.isna(first["with_file"]):
        wtext = trace.src.text(first["with_file"], int(first["with_line"])) or ""
        out.append(f"   with statement: {first['with_file']}:{int(first['with_line'])}"
                   f"  {wtext.strip()}")  # fmt: skip
    closed_by = rows["closed_by"].fillna("still open at end").value_counts()
    out.append("   closed by: " + ", ".join(f"{k} ({n})" for k, n in closed_by.items()))
    stack = shown_stack(trace, first)
    if stack:
        out.append("   stack (innermost first):")
        for frame in stack[:STACK_FRAMES_SHOWN]:
            out.append(f"     {frame['file']}:{frame['line']} in {frame['function']}")
    if first["fix"]:
        out.extend(_wrapped("   fix: ", shown_text(first, "fix")))
    if first["evidence"]:
        out.extend(_wrapped("   evidence: ", shown_text(first, "evidence")))
    return out


def _wrapped(head: str, text: str, width: int = 100) -> list[str]:
    """Long explanations wrapped under their label, so a terminal shows them whole."""
    lines = textwrap.wrap(str(text), width - len(head), break_on_hyphens=False) or [""]
    return [head + lines[0]] + [" " * len(head) + line for line in lines[1:]]
