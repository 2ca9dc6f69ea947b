"""The HTML report: one self-contained file (`cmtrace report --format html`).

Inline CSS, inline JS (table sorting), inline SVG timelines. No network, so it can be mailed or
attached to a ticket; strip_source leaves the code out.
"""

from __future__ import annotations

from html import escape

import pandas as pd

from cmtrace.analysis import Trace
from cmtrace.analysis.children import SHORT_LIVED_S
from cmtrace.present.common import (
    SiteRow,
    caveats,
    findings,
    headline,
    leaks_by_site,
    peer_headline,
    peer_text,
    peers,
    program_line,
    short_lived_headline,
    shown_stack,
    shown_text,
    totals,
)

SITE_HEADINGS = ("site", "function", "leaked", "opened", "closed", "leaks/s", "cause", "kind",
                 "live fds over time")  # fmt: skip

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


def render_html(
    trace: Trace,
    exclude: list[str] | None = None,
    strip_source: bool = False,
    short_lived: float | None = SHORT_LIVED_S,
) -> str:
    """The sites of the long-lived processes, then those of short-lived children (that lived
    under `short_lived` s) in a table of their own, peers, warnings and totals."""
    found = findings(trace, exclude, short_lived)
    sites, leaks = found.sites, found.leaks
    curves = _site_curves(trace)
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>cmtrace report: {escape(str(trace.path))}</title>",
        f"<style>{_HTML_STYLE}</style></head><body>",
        f"<h1>cmtrace report: {escape(str(trace.path))}</h1>",
        f"<p>{escape(headline(trace, leaks, found.leaking, apart=not found.short_leaks.empty))}</p>",
    ]
    parts += [f"<p class='caveat'>{escape(c)}</p>" for c in caveats(trace)]
    parts.append(_site_table("sites", trace, sites, leaks, curves, strip_source))
    if not found.short_leaks.empty:
        parts.append("<h2>Short-lived processes</h2>")
        parts.append(f"<p>{escape(short_lived_headline(found, title=True))}</p>")
        parts.append(_site_table("short-lived", trace, found.short_leaking, found.short_leaks,
                                 curves, strip_source))  # fmt: skip
    groups = peers(leaks)
    if groups:
        parts.append("<h2>Socket leaks by peer</h2><ul>")
        for peer in groups:
            where = ", ".join(f"{s['file']}:{s['line']} ({s['leaked']})" for s in peer["sites"])
            parts.append(f"<li>{escape(peer_headline(peer))}: <code>{escape(where)}</code></li>")
        parts.append("</ul>")
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
    parts.append(f"<p>{escape(totals(trace, found.all_sites))}</p>")
    parts.append(f"<script>{_HTML_SCRIPT}</script></body></html>")
    return "".join(parts)


def _site_table(
    name: str,
    trace: Trace,
    sites: pd.DataFrame,
    leaks: pd.DataFrame,
    curves: dict[str, list[int]],
    strip_source: bool,
) -> str:
    """A sortable table of sites (`id` name; 'sites' under the heading Sites), a row each."""
    parts = ["<h2>Sites</h2>" if name == "sites" else "",
             f"<table class='sortable' id='{name}'><thead><tr>"]  # fmt: skip
    parts += [f"<th>{title}</th>" for title in SITE_HEADINGS]
    parts.append("</tr></thead><tbody>")
    leaks_at = leaks_by_site(leaks)
    for site in sites.itertuples(index=False):
        parts.append(_html_site_row(trace, leaks_at(site), site, curves, strip_source))
    parts.append("</tbody></table>")
    return "".join(parts)


def _site_curves(trace: Trace) -> dict[str, list[int]]:
    """Live fds over time per site (about 200 samples), for the sparklines."""
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


def _html_site_row(
    trace: Trace,
    rows: pd.DataFrame,
    site: SiteRow,
    curves: dict[str, list[int]],
    strip_source: bool,
) -> str:
    """One site's row; `rows` are its leaks."""
    where = f"{site.site_file}:{site.site_line}"
    detail = [f"<code>{escape(where)}</code>"]
    text = None if strip_source else trace.src.text(site.site_file, int(site.site_line))
    if text:
        detail.append(f"<pre class='src'>{int(site.site_line):>5} | {escape(text.strip())}</pre>")
    program = None if strip_source else program_line(trace, site.site_file)
    if program:
        detail.append(f"<div>program: <code>{escape(program)}</code></div>")
    if not rows.empty:
        first = rows.iloc[0]
        stack = shown_stack(trace, first)
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
        if site.api:
            detail.append(f"<div>api: <code>{escape(str(site.api))}</code></div>")
        if first["fix"]:
            detail.append(f"<div>fix: {escape(shown_text(first, 'fix'))}</div>")
        paths = ", ".join(peer_text(site.kind, p) for p in site.paths if p)
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
