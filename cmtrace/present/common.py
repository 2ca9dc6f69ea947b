"""Pieces every report format shares: the headline, the caveats, the totals line, a site's leaks.

The text report, the HTML report and the end-of-recording summary print the same sentences, so
they are written once here.
"""

from __future__ import annotations

from typing import Any, Callable

import pandas as pd

from cmtrace.analysis import Trace
from cmtrace.analysis.api import NO_STACK, fill_text
from cmtrace.analysis.services import describe_peer, port_of, service_of

# A row of Trace.sites() as itertuples() yields it (site_file, site_line, leaked, cause...).
SiteRow = Any


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


def headline(trace: Trace, leaks: pd.DataFrame, leaking: pd.DataFrame) -> str:
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
    (`127.0.0.1:5432 (PostgreSQL?)`), anything else as it is."""
    service = service_of(kind, path)
    return describe_peer(path, service) if service else str(path)


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
