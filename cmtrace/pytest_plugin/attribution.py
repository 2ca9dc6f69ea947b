"""Which test (or wider-scoped fixture) owns each fd, from the boundary timeline.

The timeline is the side files' marks (what each seq means) joined with the recorder's failed
births of the marker paths (when each seq happened, in order with the fds). Per process the
windows nest: a test's setup holds its function fixtures and may hold a session fixture's setup;
the innermost open window when an fd is born owns it. A test leaked an fd that it owned and that
was still open when its teardown ended; a wider-scoped fixture leaked one still open when its
finalizer ended. Pure functions over tables: unit-tested on hand-built timelines.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from cmtrace.pytest_plugin.boundaries import BEGIN

PHASE, FIXTURE = "phase", "fixture"  # the two kinds of window a mark opens or closes
FUNCTION_SCOPE = "function"
NEVER = np.inf  # the end of a window whose end marker was never seen: the end of the trace


@dataclass(frozen=True)
class Owner:
    """A test (kind "test": name = nodeid) or a wider-scoped fixture instance (kind "fixture")."""

    kind: str
    name: str
    scope: str = FUNCTION_SCOPE
    instance: int = 0  # a fixture set up again (per module, per class) is another owner
    pid: int = 0  # a fixture's process: each xdist worker numbers its instances from 1


@dataclass
class Window:
    owner: Owner
    phase: str  # setup | call | teardown (for fixtures: setup | teardown)
    fixture: str | None  # the function-scoped fixture being set up or finalized, if any


@dataclass
class Timeline:
    """One process's windows: `starts[i]` begins `windows[i]` (None: no window, outside tests);
    `ends` says when each owner's fds must be closed."""

    starts: list[int] = field(default_factory=list)
    windows: list[Window | None] = field(default_factory=list)
    ends: dict[Owner, float] = field(default_factory=dict)
    worker: str | None = None


def timed_marks(marks: Iterable[dict], times: dict[tuple[int, int], int]) -> list[dict]:
    """Marks with the recorder's time (`t_ns`) of their marker, in time order per process;
    marks the recorder did not see (lost events) are dropped."""
    out = []
    for mark in marks:
        t = times.get((int(mark["pid"]), int(mark["seq"])))
        if t is not None:
            out.append({**mark, "t_ns": int(t)})
    return sorted(out, key=lambda m: (m["pid"], m["t_ns"], m["seq"]))


def build_timelines(marks: list[dict]) -> dict[int, Timeline]:
    """pid -> Timeline, from timed marks (see timed_marks)."""
    timelines: dict[int, Timeline] = {}
    stacks: dict[int, list[Window]] = {}
    for mark in marks:
        pid = int(mark["pid"])
        line = timelines.setdefault(pid, Timeline(worker=mark.get("worker")))
        stack = stacks.setdefault(pid, [])
        if mark["edge"] == BEGIN:
            stack.append(_window_of(mark, stack))
        elif stack:
            closed = stack.pop()
            if _ends_owner(mark):
                line.ends[closed.owner] = mark["t_ns"]
        line.starts.append(mark["t_ns"])
        line.windows.append(stack[-1] if stack else None)
    return timelines


def _window_of(mark: dict, stack: list[Window]) -> Window:
    """The window a BEGIN mark opens: a wider fixture owns what it opens; a function fixture's
    fds belong to the test around it."""
    if mark["kind"] == FIXTURE and mark.get("scope", FUNCTION_SCOPE) != FUNCTION_SCOPE:
        instance = int(mark.get("instance", 0))
        owner = Owner("fixture", mark["fixture"], mark["scope"], instance, int(mark["pid"]))
        return Window(owner, mark["phase"], None)
    if mark["kind"] == FIXTURE:
        around = stack[-1] if stack else None
        if around is not None:
            return Window(around.owner, around.phase, mark["fixture"])
        return Window(Owner("test", mark.get("nodeid") or "?"), mark["phase"], mark["fixture"])
    return Window(Owner("test", mark["nodeid"]), mark["phase"], None)


def _ends_owner(mark: dict) -> bool:
    """Does this END close its owner's last window (a test's teardown, a wider fixture's
    finalizer)?"""
    if mark["phase"] != "teardown":
        return False
    return mark["kind"] == PHASE or mark.get("scope", FUNCTION_SCOPE) != FUNCTION_SCOPE


def attribute(fds: pd.DataFrame, timelines: dict[int, Timeline]) -> pd.DataFrame:
    """The fds born inside a window, each with its owner, phase, fixture, worker, the end of
    its owner and whether it outlived it (`leaked`). fds inherited or open before the trace
    are nobody's."""
    rows = []
    fresh = fds[~(fds["preexisting"].astype(bool) | fds["inherited"].astype(bool))]
    for pid, group in fresh.groupby("pid", sort=False):
        line = timelines.get(int(pid))
        if line is None or not line.starts:
            continue
        born = group["born_ns"].to_numpy(dtype=np.int64)
        where = np.searchsorted(np.asarray(line.starts, dtype=np.int64), born, side="right") - 1
        for position, row in zip(where.tolist(), group.itertuples(index=False)):
            window = line.windows[position] if position >= 0 else None
            if window is None:
                continue
            end = line.ends.get(window.owner, NEVER)
            rows.append(
                {
                    **row._asdict(),
                    "owner": window.owner,
                    "phase": window.phase,
                    "fixture": window.fixture,
                    "worker": line.worker,
                    "owner_end_ns": end,
                    "leaked": outlived(row, end),
                }
            )
    columns = list(fds.columns) + ["owner", "phase", "fixture", "worker", "owner_end_ns", "leaked"]
    return pd.DataFrame(rows, columns=columns, dtype=object).astype(
        {"born_ns": "int64", "leaked": bool}
    )


def outlived(row, end: float) -> bool:
    """Was the fd still open when its owner ended? An owner that never ended (its process died
    in the test) keeps the trace's own verdict: open when the process ended."""
    died = row.died_ns
    if died is None or pd.isna(died):
        return True
    if end == NEVER:
        return bool(getattr(row, "leak", False))
    return float(died) > end


# Code of the test harness itself: an fd whose innermost frame outside the standard library is
# here is pytest's (capture's dup2 onto fds 1 and 2, xdist's channel), never a test's.
HARNESS_DIRS = ("/_pytest/", "/pluggy/", "/xdist/", "/execnet/", "/cmtrace/pytest_plugin/")
_STDLIB = re.compile(r"^<frozen |/lib/python\d+\.\d+/(?!.*(?:site|dist)-packages/)")


def opened_by_harness(frames: list) -> bool:
    """Was the fd opened by pytest or a plugin of the harness, not by the code under test?
    `frames` innermost first, each with a `file`."""
    for frame in frames:
        if _STDLIB.search(frame.file or ""):
            continue
        return any(part in frame.file for part in HARNESS_DIRS)
    return False


def allowed_flags(leaked_count: int, allow: int | None, skip: bool) -> list[bool]:
    """Which of a test's leaked fds (in birth order) a marker tolerates: the first `allow`, or
    all of them with skip=True."""
    if skip:
        return [True] * leaked_count
    tolerated = max(int(allow or 0), 0)
    return [i < tolerated for i in range(leaked_count)]
