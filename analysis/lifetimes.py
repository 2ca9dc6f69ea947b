"""The one model of fd tables: pair the recorded events into fd lifetimes.

The collector records only what the kernel saw (cmtrace.trace.schema: birth, close, close_range,
cloexec, addr, fork, exec, exit). This module derives everything implicit:

- a `close` ends the live lifetime of (pid, fd); a close of an fd never seen born is counted as an
  unknown close;
- a `birth` on a live (pid, fd) first ends that lifetime, with the birth's syscall as its death
  (this is how dup2/dup3 onto a live fd shows);
- `close_range` ends every live fd of the pid in [fd, arg], or only marks them CLOEXEC when its
  flags hold CLOSE_RANGE_CLOEXEC;
- `exec` ends the live CLOEXEC fds of the pid, `exit` ends all of them (death "process-exit");
- `fork` copies the parent's live fds into the child as inherited lifetimes;
- pre-existing fds (the attach-time snapshot) are live from the start.

It must scale to tens of millions of events, so the common events (births, closes, cloexec and
addr updates) are paired with vectorized numpy over a (pid, fd, time) sort; only the rare
process-wide events (fork, exec, exit, close_range) are applied one by one. The model itself is
cmtrace.analysis.model.FdModel, which takes batches of events (a live view) or per-site
counters; `build_lifetimes` is one batch of the whole trace.
"""

from __future__ import annotations

import pandas as pd

from cmtrace.analysis.events import EventSource, read_events
from cmtrace.analysis.model import LIFETIME_COLUMNS, EventFacts, FdModel
from cmtrace.analysis.pairing import DEATHS, PairingStats

STDIO_FDS = 3  # fds 0, 1, 2

AT_EXIT = "atexit"  # the death of an fd closed by an atexit handler (logging.shutdown...)
# Deaths that mean "nobody closed it": the fd lived until its process or interpreter went away
# (an atexit handler runs when the program is over for it).
LEAK_DEATHS = ("process-exit", "interpreter-shutdown", "loop-shutdown", AT_EXIT)

__all__ = [
    "AT_EXIT",
    "DEATHS",
    "LEAK_DEATHS",
    "LIFETIME_COLUMNS",
    "EventFacts",
    "PairingStats",
    "build_lifetimes",
    "is_leak",
]


def build_lifetimes(
    events: EventSource,
    preexisting: pd.DataFrame | None = None,
    release: bool = False,
    facts: dict | None = None,
) -> tuple[pd.DataFrame, PairingStats]:
    """Pair the trace's events into one row per fd lifetime (LIFETIME_COLUMNS).

    `events` is a table, a DataFrame, or the trace directory (read column by column, which
    bounds peak memory). `died_ns` and `death` are null for an fd still open at the end. With
    `release`, the caller hands the table over: it is freed once read. A `facts` dict gets
    the event stream's rows, last_ns, lost (records) and children (forked pids), so that a
    caller needs no second pass over the events.
    """
    ev = read_events(events)
    if release:
        del events
    model = FdModel(preexisting)
    model.feed(ev)
    del ev  # the event columns are no longer needed: free them before the frame
    if facts is not None:
        facts.update(model.facts)
    return model.lifetimes(release=True), model.stats


def is_leak(lifetimes: pd.DataFrame) -> pd.Series:
    """Which lifetimes are leaks (DESIGN "What counts as a leak"): the one place that decides.

    Born during the trace (not pre-existing, not inherited) and either still open at the end or
    released only when the program was over for it: by process exit, interpreter shutdown,
    event-loop shutdown or an atexit handler (`logging.shutdown` closing handlers that piled up
    one per call). stdio (fds 0-2, typically dup2'ed pipes) released by its process's exit is
    never a leak, in any process.
    """
    born_here = ~(lifetimes["preexisting"] | lifetimes["inherited"])
    death = lifetimes["death"]
    released_late = death.isin(LEAK_DEATHS) | death.isna()
    stdio_at_exit = (lifetimes["fd"] < STDIO_FDS) & (death == "process-exit")
    leak: pd.Series = born_here & released_late & ~stdio_at_exit
    return leak
