"""`cmtrace report`: the leaks of a trace as text, JSON (DESIGN "Report contract") or HTML."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TextIO

import pandas as pd

from cmtrace.analysis import Trace, load, read_exclude_file
from cmtrace.analysis.api import NO_STACK, fill_text
from cmtrace.cli import add_site_output_options
from cmtrace.errors import EXIT_LEAKS, EXIT_OK, UsageError

REPORT_SCHEMA = 1


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "report",
        help="explain the leaks of a recorded trace",
        description="Leak sites ranked by count and growth, each with its cause and fix.",
    )
    parser.add_argument("trace", metavar="TRACE", help="trace directory written by a recording")
    add_site_output_options(parser, formats=("text", "json", "html"))
    parser.add_argument("--top", type=int, default=20, metavar="N", help="sites shown (text)")
    parser.add_argument(
        "--fail-on-leak", action="store_true", help="exit 3 when leaks are found (for CI)"
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
            raise UsageError(
                f"cannot write {output} ({exc.strerror}): choose another -o FILE"
            ) from None
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def print_summary(
    trace_dir: str | Path,
    file: TextIO = sys.stdout,
    top: int = 10,
    exclude: str | Path | list[str] | None = None,
) -> int:
    """The end-of-recording summary (text report of the top sites); returns the leak count.

    `exclude` is an exclude file (`--exclude FILE`) or its patterns; excluded sites are left
    out of the summary and of the count (which `--fail-on-leak` turns into exit code 3).
    """
    if isinstance(exclude, (str, Path)):
        exclude = read_exclude_file(exclude)
    trace = load(trace_dir)
    file.write(render_text(trace, top=top, exclude=exclude))
    return int(len(trace.leaks(exclude)))


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
    ns_pids = {  # the targets, and followed processes met in a pid namespace of their own
        int(t["pid"]): int(t["ns_pid"])
        for t in [*(trace.meta.get("targets") or []), *(trace.meta.get("processes") or [])]
        if isinstance(t, dict) and t.get("ns_pid") not in (None, t.get("pid"))
    }
    out_leaks = []
    for row in leaks.itertuples(index=False):
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
    for target in trace.meta.get("python") or []:
        calls = str(target.get("calls") or "")
        if calls.startswith("not recorded"):  # --calls asked for, but this interpreter cannot
            out.append(f"--calls in pid {target.get('pid')}: {calls}")
    return out


def _site_block(trace: Trace, leaks: pd.DataFrame, site, rank: int) -> list[str]:
    rows = leaks[
        (fill_text(leaks["site_file"], NO_STACK) == site.site_file)
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
            out.extend(_wrapped("   fix: ", first["fix"]))
        if first["evidence"]:
            out.extend(_wrapped("   evidence: ", first["evidence"]))
    return out


def _wrapped(head: str, text: str, width: int = 100) -> list[str]:
    """Long explanations wrapped under their label, so a terminal shows them whole."""
    import textwrap

    lines = textwrap.wrap(str(text), width - len(head), break_on_hyphens=False) or [""]
    return [head + lines[0]] + [" " * len(head) + line for line in lines[1:]]


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
# One self-contained file: inline CSS, inline JS (table sorting), inline SVG timelines. No
# network, so it can be mailed or attached to a ticket; --strip-source leaves the code out.

_HTML_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222}
h1{font-size:20px}h2{font-size:16px;margin-top:28px}
table{border-collapse:collapse;width:100%}
th,td{border-bottom:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
th{cursor:pointer;background:#f3f3f3;user-select:none}th:after{content:" \\2195";color:#aaa}
td.n{text-align:right;font-variant-numeric:tabular-nums}
code,pre{font:12px/1.35 ui-monospace,monospace}pre{background:#f7f7f7;padding:6px;margin:4px 0}
td:first-child{max-width:34em}td code{word-break:break-all}pre{white-space:pre-wrap}
.cause{font-weight:600;color:#a40000}.warn{color:#8a5a00}.caveat{color:#a40000;font-weight:600}
details summary{cursor:pointer;color:#0550ae}svg{vertical-align:middle}
"""

_HTML_SCRIPT = """
document.querySelectorAll('table.sortable th').forEach(function(th){
  th.addEventListener('click', function(){
    var table = th.closest('table'), body = table.tBodies[0], col = th.cellIndex;
    var rows = Array.prototype.slice.call(body.rows);
    var asc = th.dataset.asc !== '1'; th.dataset.asc = asc ? '1' : '0';
    rows.sort(function(a, b){
      var x = a.cells[col].dataset.v || a.cells[col].textContent;
      var y = b.cells[col].dataset.v || b.cells[col].textContent;
      var nx = parseFloat(x), ny = parseFloat(y);
      var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
      return asc ? c : -c;
    });
    rows.forEach(function(r){ body.appendChild(r); });
  });
});
"""


def render_html(trace: Trace, exclude: list[str] | None = None, strip_source: bool = False) -> str:
    from html import escape

    sites = trace.sites(exclude)
    leaks = trace.leaks(exclude)
    curves = _site_curves(trace, exclude)
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>cmtrace report: {escape(str(trace.path))}</title>",
        f"<style>{_HTML_STYLE}</style></head><body>",
        f"<h1>cmtrace report: {escape(str(trace.path))}</h1>",
        f"<p>{escape(_headline(trace, leaks, sites[sites['leaked'] > 0]))}</p>",
    ]
    parts += [f"<p class='caveat'>{escape(c)}</p>" for c in _caveats(trace)]
    parts.append("<h2>Sites</h2><table class='sortable' id='sites'><thead><tr>")
    for title in ("site", "function", "leaked", "opened", "closed", "leaks/s", "cause", "kind",
                  "live fds over time"):  # fmt: skip
        parts.append(f"<th>{title}</th>")
    parts.append("</tr></thead><tbody>")
    for site in sites.itertuples(index=False):
        parts.append(_html_site_row(trace, leaks, site, curves, strip_source))
    parts.append("</tbody></table>")
    warnings = trace.warnings()
    if warnings:
        parts.append("<h2>Warnings</h2><ul>")
        for w in warnings:
            where = f"{w['site']['file']}:{w['site']['line']}" if w["site"] else "no stack"
            parts.append(
                f"<li class='warn'>{w['count']} fds opened at <code>{escape(where)}</code> "
                "were closed by a finalizer, not by close() or a with statement</li>"
            )
        parts.append("</ul>")
    parts.append(f"<p>{escape(_totals(trace, sites))}</p>")
    parts.append(f"<script>{_HTML_SCRIPT}</script></body></html>")
    return "".join(parts)


def _site_curves(trace: Trace, exclude) -> dict[str, list[int]]:
    freq = f"{max(trace.end_ns // 200, 1_000_000)}ns"
    timeline = trace.timeline(by="site", freq=freq)
    return {str(c): timeline[c].tolist() for c in timeline.columns}


def _sparkline(values: list[int], width: int = 160, height: int = 36) -> str:
    if not values:
        return ""
    top = max(max(values), 1)
    step = width / max(len(values) - 1, 1)
    points = " ".join(
        f"{i * step:.1f},{height - 2 - v / top * (height - 14):.1f}" for i, v in enumerate(values)
    )
    return (
        f"<svg width='{width}' height='{height}' role='img' aria-label='live fds, max {top}'>"
        f"<polyline fill='none' stroke='#c00' stroke-width='1.5' points='{points}'/>"
        f"<text x='{width - 2}' y='10' font-size='9' text-anchor='end'>max {top}</text></svg>"
    )


def _html_site_row(trace: Trace, leaks, site, curves, strip_source: bool) -> str:
    from html import escape

    where = f"{site.site_file}:{site.site_line}"
    detail = [f"<code>{escape(where)}</code>"]
    text = None if strip_source else trace.src.text(site.site_file, int(site.site_line))
    if text:
        detail.append(f"<pre class='src'>{int(site.site_line):>5} | {escape(text.strip())}</pre>")
    rows = leaks[
        (fill_text(leaks["site_file"], NO_STACK) == site.site_file)
        & (leaks["site_line"].fillna(0).astype(int) == int(site.site_line))
    ]
    if not rows.empty:
        first = rows.iloc[0]
        stack = trace.user_stack(int(first["open_stack"]))
        lines = []
        for frame in stack:
            line = f"{frame['file']}:{frame['line']} in {frame['function']}"
            src = None if strip_source else trace.src.text(frame["file"], frame["line"])
            code = f"\n      <span class='src'>{escape(src.strip())}</span>" if src else ""
            lines.append(escape(line) + code)
        if lines:
            detail.append(
                "<details><summary>opening stack</summary><pre>"
                + "\n".join(lines)
                + "</pre></details>"
            )
        if first["fix"]:
            detail.append(f"<div>fix: {escape(str(first['fix']))}</div>")
        paths = ", ".join(p for p in site.paths if p)
        if paths:
            detail.append(f"<div>paths: <code>{escape(paths)}</code></div>")
    curve = curves.get(where, [])
    cells = [
        f"<td data-v='{escape(where)}'>{''.join(detail)}</td>",
        f"<td>{escape(str(site.site_function))}</td>",
        f"<td class='n'>{int(site.leaked)}</td>",
        f"<td class='n'>{int(site.opened)}</td>",
        f"<td class='n'>{int(site.closed)}</td>",
        f"<td class='n'>{site.leaks_per_s:.2f}</td>",
        f"<td class='cause'>{escape(str(site.cause or ''))}</td>",
        f"<td>{escape(str(site.kind or ''))}</td>",
        f"<td data-v='{max(curve) if curve else 0}'>{_sparkline(curve)}</td>",
    ]
    return "<tr>" + "".join(cells) + "</tr>"
