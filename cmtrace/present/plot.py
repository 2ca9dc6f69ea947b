"""`cmtrace plot`: one figure with three panels that show where fds pile up.

1. live fds over time, stacked by opening site: the leak is the band that keeps rising;
2. fd lifetime histogram per site (closed fds), log scale;
3. leak rate per site (leaked fds per second of trace).
"""

from __future__ import annotations

import io
import os
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from cmtrace.analysis import Trace
from cmtrace.analysis.aggregate import HIST_EDGES_NS, lifetime_hist_per_stack, log2_buckets
from cmtrace.analysis.limits import headroom_text

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

TOP_SITES = 6
FORMATS = ("png", "svg", "pdf")
DPI = 110


def render_image(
    trace: Trace, fmt: str, top: int = TOP_SITES, exclude: list[str] | None = None
) -> bytes:
    """The figure as an image file's bytes, `fmt` one of FORMATS."""
    buffer = io.BytesIO()
    make_figure(trace, top=top, exclude=exclude).savefig(buffer, format=fmt, dpi=DPI)
    return buffer.getvalue()


def _short(label: str, width: int = 48) -> str:
    """file:line with the directories trimmed so the legend stays readable."""
    file, _, line = label.rpartition(":")
    name = os.path.basename(file) or file
    parent = os.path.basename(os.path.dirname(file))
    text = f"{parent}/{name}:{line}" if parent else f"{name}:{line}"
    return text if len(text) <= width else "..." + text[-width + 3 :]


def make_figure(trace: Trace, top: int = TOP_SITES, exclude: list[str] | None = None) -> Figure:
    # matplotlib is imported here, not at the top: it takes a second and only plot needs it.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = trace.sites(exclude)
    labels = [f"{s.site_file}:{s.site_line}" for s in sites.itertuples(index=False)][:top]
    figure, axes = plt.subplots(
        3, 1, figsize=(11, 12), constrained_layout=True, gridspec_kw={"height_ratios": [3, 2, 1.4]}
    )
    figure.suptitle(f"cmtrace: {trace.path}  ({trace.duration_s:.1f} s)", fontsize=13)
    _live_panel(axes[0], trace, labels)
    _limit_note(axes[0], trace)
    _lifetime_panel(axes[1], trace, labels)
    _rate_panel(axes[2], sites.head(top))
    return figure


def _live_panel(ax: Axes, trace: Trace, labels: list[str]) -> None:
    freq = f"{max(trace.end_ns // 300, 1_000_000)}ns"
    timeline = trace.timeline(by="site", freq=freq)
    ax.set_title("Live file descriptors by opening site (a leak keeps rising)")
    ax.set_xlabel("time since trace start (s)")
    ax.set_ylabel("open fds")
    if timeline.empty or not labels:
        ax.text(0.5, 0.5, "no fds opened during the trace", ha="center", transform=ax.transAxes)
        return
    seconds = timeline.index.total_seconds()
    shown = [label for label in labels if label in timeline.columns]
    others = timeline.drop(columns=shown).sum(axis=1)
    series = [timeline[label].to_numpy() for label in shown]
    names = [_short(label) for label in shown]
    if others.any():
        series.append(others.to_numpy())
        names.append("other sites")
    ax.stackplot(seconds, *series, labels=names, alpha=0.85, step="post")
    ax.legend(loc="upper left", fontsize=8, title="site (file:line)", title_fontsize=8)
    ax.grid(alpha=0.3)


def _limit_note(ax: Axes, trace: Trace, shown: int = 4) -> None:
    """How close the targets came to RLIMIT_NOFILE (the closest first), in the panel's corner:
    the bands above are trace-born fds only, the limit counts every open fd."""
    entries = [e for e in trace.process_limits() if e["rlimit_nofile"]]
    if not entries:
        return
    entries.sort(key=lambda e: -(e["peak_fraction"] or 0))
    lines = [f"pid {e['pid']}: {headroom_text(e)}" for e in entries[:shown]]
    if len(entries) > shown:
        lines.append(f"... and {len(entries) - shown} more processes")
    ax.text(0.99, 0.98, "RLIMIT_NOFILE\n" + "\n".join(lines), transform=ax.transAxes,
            ha="right", va="top", fontsize=8, family="monospace",
            bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.8})  # fmt: skip


def _site_numbers(fds: pd.DataFrame, rows: np.ndarray) -> tuple[np.ndarray, list[str | None]]:
    """A number per row naming its site, and the "file:line" label of each number: labels are
    made once per distinct site, not once per fd (millions of fds share a few sites)."""
    column = fds["site_file"]
    if isinstance(column.dtype, pd.CategoricalDtype):  # as the analysis builds it
        files, file_names = column.cat.codes.to_numpy()[rows], list(column.cat.categories)
    else:
        files, names = pd.factorize(column.to_numpy()[rows])
        file_names = list(names)
    lines = fds["site_line"].to_numpy(dtype=np.float64, na_value=0)[rows].astype(np.int64)
    width = int(lines.max(initial=0)) + 1
    numbers, pairs = pd.factorize(files.astype(np.int64) * width + lines)
    # A fd without a site (file code -1) has no label: no site drawn takes it.
    labels = [f"{file_names[k // width]}:{k % width}" if k >= 0 else None for k in pairs]
    return numbers, labels


def _lifetime_panel(ax: Axes, trace: Trace, labels: list[str]) -> None:
    fds = trace.fds
    closed = (fds["died_ns"].notna() & ~fds["preexisting"] & ~fds["inherited"]).to_numpy()
    rows = np.flatnonzero(closed)
    site, site_labels = _site_numbers(fds, rows)
    number_of = {label: i for i, label in enumerate(site_labels) if label is not None}
    ax.set_title("Lifetime of closed fds per site")
    ax.set_xlabel("lifetime (ms, log scale)")
    ax.set_ylabel("fds")
    died = fds["died_ns"].to_numpy(dtype=np.float64, na_value=np.nan)[rows]
    durations = (died - fds["born_ns"].to_numpy()[rows]) / 1e6
    if trace.aggregate is not None:  # most lifetimes are the kernel's log2 histogram
        stacks = fds["open_stack"].to_numpy()[rows]
        _counted_lifetimes(ax, trace, labels, durations * 1e6, site, number_of, stacks)
        return
    drawn = False
    low = max(float(durations.min()) if len(durations) else 1e-3, 1e-3)
    high = max(float(durations.max()) if len(durations) else 1.0, low * 10)
    bins = np.logspace(np.log10(low), np.log10(high), 40)
    for label in labels:
        values = durations[site == number_of.get(label, -2)].clip(min=low)
        if len(values):
            ax.hist(values, bins=bins, histtype="step", linewidth=1.6, label=_short(label))
            drawn = True
    if not drawn:
        ax.text(0.5, 0.5, "no fd of these sites was closed", ha="center", transform=ax.transAxes)
        return
    ax.set_xscale("log")
    ax.legend(fontsize=8, title="site (file:line)", title_fontsize=8)
    ax.grid(alpha=0.3)


def _counted_lifetimes(
    ax: Axes,
    trace: Trace,
    labels: list[str],
    lifetimes_ns: np.ndarray,
    site: np.ndarray,
    number_of: dict[str, int],
    stacks: np.ndarray,
) -> None:
    """--aggregate: per site, the recorded fds' lifetimes and the counted ones' (the kernel's
    log2 buckets, schema.COUNTERS lifetime_hist) in one histogram of those buckets."""
    ax.set_title("Lifetime of closed fds per site (recorded + counted, log2 buckets)")
    counted = lifetime_hist_per_stack(trace.counters)
    edges_ms = HIST_EDGES_NS / 1e6
    drawn: np.ndarray = np.zeros(len(edges_ms) - 1, bool)
    for label in labels:
        mine = site == number_of.get(label, -2)
        counts = log2_buckets(lifetimes_ns[mine])
        for stack in np.unique(stacks[mine]):
            counts = counts + counted.get(int(stack), 0)
        if counts.any():
            ax.stairs(counts, edges_ms, linewidth=1.6, label=_short(label))
            drawn |= counts > 0
    if not drawn.any():
        ax.text(0.5, 0.5, "no fd of these sites was closed", ha="center", transform=ax.transAxes)
        return
    used = np.flatnonzero(drawn)
    ax.set_xscale("log")
    ax.set_xlim(edges_ms[used[0]], edges_ms[used[-1] + 1])
    ax.legend(fontsize=8, title="site (file:line)", title_fontsize=8)
    ax.grid(alpha=0.3)


def _rate_panel(ax: Axes, sites: pd.DataFrame) -> None:
    ax.set_title("Leak rate per site")
    ax.set_xlabel("leaked fds per second of trace")
    leaking = sites[sites["leaked"] > 0]
    if leaking.empty:
        ax.text(0.5, 0.5, "no leaks", ha="center", transform=ax.transAxes)
        ax.set_yticks([])
        return
    names = [
        f"{_short(f'{s.site_file}:{s.site_line}')}  {s.cause or ''}"
        for s in leaking.itertuples(index=False)
    ][::-1]
    rates = leaking["leaks_per_s"].to_numpy()[::-1]
    bars = ax.barh(names, rates, color="#c0392b", height=0.5)
    ax.set_ylim(-0.75, max(len(names), 3) - 0.25)
    for bar, n in zip(bars, leaking["leaked"].to_numpy()[::-1]):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {int(n)} leaked",
                va="center", fontsize=8)  # fmt: skip
    ax.tick_params(axis="y", labelsize=8)
    ax.grid(axis="x", alpha=0.3)
