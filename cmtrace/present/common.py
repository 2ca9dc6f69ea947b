"""Pieces every report format shares: the headline, the caveats, the totals line, a site's leaks.

The text report, the HTML report and the end-of-recording summary print the same sentences, so
they are written once here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import pandas as pd

from cmtrace.analysis import Trace
from cmtrace.analysis.api import NO_STACK, fill_text
from cmtrace.analysis.children import SHORT_LIVED_S, is_program_file, program_text
from cmtrace.analysis.services import describe_peer, port_of, service_of
from cmtrace.trace.sources import COMMAND_FILE

# A row of Trace.sites() as itertuples() yields it (site_file, site_line, leaked, cause...).
SiteRow = Any
MAX_LINE = 300  # no report line is longer (a test suite's paths and peers are elided)
PATH_CHARS = 120  # one path or peer in a list of them
PROGRAM_CHARS = 160  # a `python -c` program shown on one line


@dataclass
class Findings:
    """A report's leaks: the long-lived processes' first, the short-lived children's apart
    (see Trace.short_lived). `sites` are the long-lived processes' (every site, leaking or
    not), `short_sites` the children's leaking sites."""

    leaks: pd.DataFrame
    sites: pd.DataFrame
    short_leaks: pd.DataFrame
    short_sites: pd.DataFrame
    seconds: float | None  # the threshold; None: no split asked for

    @property
    def leaking(self) -> pd.DataFrame:
        return self.sites[self.sites["leaked"] > 0]

    @property
    def short_leaking(self) -> pd.DataFrame:
        return self.short_sites[self.short_sites["leaked"] > 0]

    @property
    def all_sites(self) -> pd.DataFrame:
        """Every site of either kind of process (for the totals)."""
        return pd.concat([self.sites, self.short_sites], ignore_index=True)


def findings(
    trace: Trace, exclude: list[str] | None = None, short_lived: float | None = SHORT_LIVED_S
) -> Findings:
    """The leaks and sites of a report, split at `short_lived` seconds (None or 0: no split)."""
    leaks = trace.leaks(exclude)
    if not short_lived:
        return Findings(leaks, trace.sites(exclude), leaks.iloc[:0], trace.sites().iloc[:0], None)
    short = trace.short_lived(short_lived)
    in_short = short.loc[leaks.index].to_numpy()
    return Findings(
        leaks=leaks[~in_short],
        sites=trace.sites(exclude, keep=~short),
        short_leaks=leaks[in_short],
        short_sites=trace.sites(exclude, keep=short),
        seconds=short_lived,
    )


def short_lived_headline(found: Findings, title: bool = False) -> str:
    """`20 leaked fds in 20 short-lived processes`; as a section's `title`, with the threshold
    and the sites: `short-lived processes (lived < 1 s, their fds closed by their exit): 20
    leaked fds in 20 processes, from 2 sites`."""
    n, pids = len(found.short_leaks), found.short_leaks["pid"].nunique()
    fds = f"{n} leaked fd{'s' if n != 1 else ''}"
    processes = f"{pids} process{'es' if pids != 1 else ''}"
    if not title:
        return f"{fds} in {pids} short-lived process{'es' if pids != 1 else ''}"
    sites = len(found.short_leaking)
    return (
        f"short-lived processes (lived < {found.seconds:g} s, their fds closed by their exit): "
        f"{fds} in {processes}, from {sites} site{'s' if sites != 1 else ''}"
    )


def shown_stack(trace: Trace, leak: Any) -> list[dict]:
    """A leak's opening stack trimmed to user code, as reports print it: where its site is a
    `python -c` program, the program's `<string>` frames are named by the program's file
    (their lines are that text's)."""
    stack = trace.user_stack(int(leak["open_stack"]))
    site = leak["site_file"]
    if not is_program_file(site):
        return stack
    return [{**f, "file": site} if f["file"] == COMMAND_FILE else f for f in stack]


def shown_text(leak: Any, column: str) -> str:
    """A leak's fix or evidence as reports print it: `<string>:6` of a `python -c` program's
    site is named by the program's file, as its site is."""
    text, site = str(leak[column] or ""), leak["site_file"]
    return text.replace(f"{COMMAND_FILE}:", f"{site}:") if is_program_file(site) else text


def program_line(trace: Trace, file: Any) -> str | None:
    """A `python -c` program's text on one line (`python -c 'import os; ...'`), elided; None
    for a site in any other file."""
    if not is_program_file(file):
        return None
    text = "; ".join(ln.strip() for ln in program_text(trace.src, str(file)).splitlines() if ln)
    return "python -c " + repr(elide(text, PROGRAM_CHARS))


def elide(text: str, width: int) -> str:
    """`text` cut to `width` characters by dropping its middle (a path keeps its root and its
    file name): `/very/long/.../name.txt`."""
    if len(text) <= width:
        return text
    keep = width - 3
    return text[: keep - keep // 2] + "..." + text[len(text) - keep // 2 :]


def fit_lines(lines: list[str], width: int = MAX_LINE) -> list[str]:
    """Every line at most `width` characters (elided in the middle)."""
    return [elide(line, width) for line in lines]


def leaked_kind(site: SiteRow, rows: pd.DataFrame) -> str:
    """The kind a site's block shows: the most common kind of the fds that leaked there (a
    multiprocessing.Pool's site opens files, /etc/ld.so.cache, but leaks pipes), else the
    site's own (the most common of all it opened)."""
    if not rows.empty and "kind" in rows:
        kinds = rows["kind"].dropna().astype(str)
        if not kinds.empty:
            return str(kinds.value_counts(sort=True).index[0])
    return str(site.kind or "")


def leaked_paths(site: SiteRow, rows: pd.DataFrame, n: int = 3) -> list[str]:
    """The paths a site's block shows: the n most common of the fds that leaked there (a
    Pool's leaked pipes have none, not its closed /etc/ld.so.cache), else the site's own."""
    if not rows.empty and "path" in rows:
        return [str(p) for p in rows["path"].dropna().astype(str).value_counts().index[:n] if p]
    return [str(p) for p in site.paths if p]


def site_where(site: SiteRow) -> str:
    """`file:line in function`, or the bare NO_STACK marker for fds opened without a Python
    stack (a child that is not CPython), not `<no Python stack>:0 in `."""
    if str(site.site_file) == NO_STACK or (not site.site_line and not site.site_function):
        return str(site.site_file or NO_STACK)
    return f"{site.site_file}:{site.site_line} in {site.site_function}"


def leaks_by_site(leaks: pd.DataFrame) -> Callable[[SiteRow], pd.DataFrame]:
    """A function from a site to the leaked lifetimes opened there (same file and line; fds
    without a stack share the NO_STACK site). The leaks are grouped once: the HTML report asks
    for every site, and a filter of all leaks per site was quadratic on 75,000 sites."""
    files = fill_text(leaks["site_file"], NO_STACK).astype(str).to_numpy()
    lines = leaks["site_line"].fillna(0).astype(int).to_numpy()
    rows = pd.Series(range(len(leaks))).groupby([files, lines], sort=False).indices
    none = leaks.iloc[:0]

    def at(site: SiteRow) -> pd.DataFrame:
        found = rows.get((str(site.site_file), int(site.site_line)))
        return none if found is None else leaks.iloc[found]

    return at


def headline(trace: Trace, leaks: pd.DataFrame, leaking: pd.DataFrame, apart: bool = False) -> str:
    """The trace, its state, and the leaks counted by kind; `apart`: short-lived children's
    leaks are counted apart (none here does not mean none at all)."""
    pids = trace.fds["pid"].nunique()
    head = (
        f"cmtrace: {trace.path} ({trace.status}, {trace.duration_s:.1f} s, "
        f"{pids} process{'es' if pids != 1 else ''})"
    )
    if leaks.empty:
        return head + "\nno leaked file descriptors" + (" in long-lived processes" if apart else "")
    kinds = leaks.groupby("kind", observed=True).size().sort_values(ascending=False)
    kind_text = ", ".join(f"{n} {k}" for k, n in kinds.items())
    return head + (
        f"\n{len(leaks)} leaked file descriptor{'s' if len(leaks) != 1 else ''} "
        f"({kind_text}) from {len(leaking)} site{'s' if len(leaking) != 1 else ''}"
    )


def caveats(trace: Trace) -> list[str]:
    """What makes the counts less than certain: an interrupted tracer, lost events, no stacks."""
    out = []
    if trace.interrupted:
        out.append(
            "INTERRUPTED: the tracer stopped without finishing; the last second may be missing"
        )
    if trace.lost_events:
        out.append(
            f"LOST EVENTS: {trace.lost_events} events were dropped by the kernel; counts may be off"
        )
    out.extend(trace.aggregate_limits())  # --aggregate: what the trace cannot answer
    reason = trace.no_python_reason
    if reason:
        out.append(f"no Python stacks: {reason}")
    for target in trace.meta.get("python") or []:
        calls = str(target.get("calls") or "")
        if calls.startswith("not recorded"):  # --calls asked for, but this interpreter cannot
            out.append(f"--calls in pid {target.get('pid')}: {calls}")
    return out


def totals(trace: Trace, sites: pd.DataFrame) -> str:
    opened = int(sites["opened"].sum()) if not sites.empty else 0
    leaked = int(sites["leaked"].sum()) if not sites.empty else 0
    text = (
        f"totals: {opened} fds opened during the trace, {opened - leaked} closed, "
        f"{leaked} leaked; {trace.lost_events} lost events"
    )
    if trace.pairing.unknown_closes:
        text += f"; {trace.pairing.unknown_closes} closes of fds opened before the trace"
    return text


def peer_text(kind: Any, path: Any) -> str:
    """A path as reports print it: a socket's peer with what it probably is
    (`127.0.0.1:5432 (PostgreSQL?)`), anything else as it is; elided to PATH_CHARS."""
    service = service_of(kind, path)
    return elide(describe_peer(path, service) if service else str(path), PATH_CHARS)


def peers(leaks: pd.DataFrame) -> list[dict[str, Any]]:
    """Socket leaks grouped by peer, most leaks first: peer, service, leaked, still_open, and
    the opening sites ({file, line, function, leaked}) in order of leaks. `cmtrace report
    --by-peer` prints them ("10 connections to 127.0.0.1:5432 (PostgreSQL?)")."""
    sockets = leaks[(leaks["kind"] == "socket").to_numpy()]
    if sockets.empty:
        return []
    keys = sockets["path"].astype(object).where(sockets["path"].notna(), None)
    out = []
    for peer, rows in sockets.groupby(keys.fillna(""), sort=False):
        where = pd.DataFrame({
            "file": fill_text(rows["site_file"], NO_STACK).astype(str),
            "line": rows["site_line"].fillna(0).astype(int),
            "function": fill_text(rows["site_function"], "").astype(str),
        })  # fmt: skip
        counted = where.value_counts(sort=True).reset_index(name="leaked")
        address = peer or None
        out.append({
            "peer": address,
            "service": service_of("socket", address),
            "leaked": int(len(rows)),
            "still_open": int(rows["died_ns"].isna().sum()),
            "sites": [
                {"file": r.file, "line": int(r.line), "function": r.function,
                 "leaked": int(r.leaked)}
                for r in counted.itertuples(index=False)
            ],
        })  # fmt: skip
    return sorted(out, key=lambda p: (-p["leaked"], str(p["peer"])))


def peer_headline(peer: dict[str, Any]) -> str:
    """`10 connections to 127.0.0.1:5432 (PostgreSQL?)`: an IP peer's sockets are connections."""
    n = peer["leaked"]
    noun = "connection" if port_of(peer["peer"]) is not None else "socket"
    target = describe_peer(peer["peer"], peer["service"])
    text = f"{n} {noun}{'s' if n != 1 else ''} to {target}"
    if peer["peer"] is None:
        text = f"{n} {noun}{'s' if n != 1 else ''} without a recorded address"
    if peer["still_open"]:
        text += f", {peer['still_open']} still open at the end"
    return text
