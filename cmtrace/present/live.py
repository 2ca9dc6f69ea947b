"""Watching a recording as it happens: the full-screen live view and the status line.

Both are observers (cmtrace.record.observe) fed at each flush with the events and stack frames
just written. Their numbers come from the report's own fd-table model
(cmtrace.analysis.model.FdModel, fed one batch at a time), and their sites are named as the
report names them: the innermost user-code frame of the opening stack (analysis.code).

- `Watch` holds what both show: the model, the stacks seen so far, per-site rows with their
  growth over the last minute, the targets' open fds against RLIMIT_NOFILE, events/s.
- `render` draws a Watch into a rich renderable (pure: the unit tests call it).
- `LiveView` owns the terminal: rich's alternate screen, keys read from /dev/tty in cbreak
  mode in a thread, stderr held (and shown in the footer) while the screen is up.
- `StatusLine` prints one line every 10 s on stderr instead, when there is no screen.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import termios
import threading
import time
import tty
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from cmtrace.analysis.causes import Context, classify
from cmtrace.analysis.code import Frame, SourceIndex, innermost_user
from cmtrace.analysis.model import FdModel
from cmtrace.record import procfs
from cmtrace.record.observe import BaseObserver, Flushed
from cmtrace.trace import schema
from cmtrace.trace.reader import read_meta

if TYPE_CHECKING:
    from cmtrace.record.session import Recording

GROWTH_WINDOW = 60.0  # seconds: growth is measured over the last minute
RATE_WINDOW = 5.0  # seconds: events/s over the last few flushes
FD_COUNT_INTERVAL = 1.0  # seconds between reads of /proc/PID/fd (a big table is slow to list)
SITES_INTERVAL = 1.0  # seconds between two tallies of the sites (every flush is fed; a tally
# of a busy trace costs as much as feeding it)
STATUS_INTERVAL = 10.0  # seconds between status lines
NO_STACK = "<no Python stack>"  # pre-existing fds (the attach snapshot) are counted here too
SORT_KEYS = {"g": "growth", "l": "live", "o": "opened"}  # key -> the column it sorts by
HEADER_LINES = 6  # header, one line per target (up to 3), column titles, footer
SHOWN_TARGETS = 3


@dataclass
class SiteRow:
    """One opening site: every stack whose innermost user frame is at file:line."""

    where: str  # file:line, or NO_STACK
    function: str
    live: int = 0
    opened: int = 0
    closed: int = 0
    growth: float = 0.0  # live fds per minute over the last minute
    kind: str = ""
    sample: str = ""  # a path or peer of one of its fds
    cause: str = ""
    stack_id: int = 0  # the stack holding most of its live fds (Enter shows it)


@dataclass
class TargetFds:
    """A target's open fds (all of them, as /proc says) against its soft RLIMIT_NOFILE."""

    pid: int
    comm: str
    open_fds: int | None = None
    soft_limit: int | None = None
    per_minute: float = 0.0
    history: deque[tuple[float, int]] = field(default_factory=deque)

    def sample(self, now: float) -> None:
        count = procfs.count_fds(self.pid)
        limits = procfs.rlimit_nofile(self.pid)
        if limits is not None:
            self.soft_limit = limits[0]
        self.open_fds = count
        if count is not None:
            _trim(self.history, now)
            self.history.append((now, count))
            self.per_minute = _slope(self.history)

    def minutes_to_limit(self) -> float | None:
        """At the current rate, when the soft limit is reached (None: never, or unknown)."""
        if self.open_fds is None or self.soft_limit is None or self.per_minute <= 0:
            return None
        return max(self.soft_limit - self.open_fds, 0) / self.per_minute


class Watch:
    """What the live view and the status line show, fed one flush at a time."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.stopped: float | None = None  # when the recording ended (cmtrace top)
        self.model: FdModel | None = None
        self._preexisting: list[dict[str, Any]] = []
        self.stacks: dict[int, list[Frame]] = {}
        self._samples: dict[int, tuple[str, str]] = {}  # stack id -> (kind, path) of a birth
        self._causes: dict[int, str] = {}
        self._sources = SourceIndex()  # the sources on this machine's disk, read when needed
        self._history: deque[tuple[float, dict[str, int]]] = deque()  # (time, live per site)
        self._rates: deque[tuple[float, int]] = deque()  # (time, events so far)
        self.sites: list[SiteRow] = []
        self.targets: dict[int, TargetFds] = {}
        self.events = 0
        self.events_per_s = 0.0
        self.lost = 0
        self._fds_read = self._sites_tallied = -float("inf")

    # --- input ----------------------------------------------------------------------------
    def add_preexisting(self, rows: list[dict[str, Any]]) -> None:
        """The attach snapshot: it seeds the model's first batch (later ones are not
        modelled: their fds are pre-existing, never a site's)."""
        if self.model is None:
            self._preexisting.extend(rows)

    def begin(self, pids: list[int]) -> None:
        """Recording has begun (elapsed counts from here) on these targets."""
        self.started = time.monotonic()
        self.watch_targets(pids)

    def watch_targets(self, pids: list[int]) -> None:
        for pid in pids:
            if pid not in self.targets:
                self.targets[pid] = TargetFds(pid, procfs.comm(pid))

    def feed(
        self,
        events: pa.Table | None,
        frames: list[dict[str, Any]],
        lost: int,
        now: float | None = None,
    ) -> None:
        """One flush: the events just written, the stacks completed, the lost count so far
        (`now`, a monotonic time, for tests that stand in for the clock)."""
        now = time.monotonic() if now is None else now
        self._add_frames(frames)
        if events is not None and len(events):
            if self.model is None:
                self.model = FdModel(self._preexisting_frame(), keep_lifetimes=False)
            self.model.feed(events)
            self._add_samples(events)
            self.events += len(events)
        self.lost = lost
        _trim(self._rates, now, RATE_WINDOW)
        self._rates.append((now, self.events))
        self.events_per_s = _slope(self._rates) / 60
        if now - self._fds_read >= FD_COUNT_INTERVAL:
            self._fds_read = now
            for target in self.targets.values():
                target.sample(now)
        if now - self._sites_tallied >= SITES_INTERVAL:
            self._sites_tallied = now
            self.sites = self._site_rows(now)

    def feed_counters(self, counters: pa.Table | None) -> None:
        """--aggregate: the kernel's counter rows of a flush (fds counted, never shipped), so
        a site's OPENED and CLOSED are the report's; their LIVE is 0 (each closed already)."""
        if counters is None or not len(counters):
            return
        if self.model is None:
            self.model = FdModel(self._preexisting_frame(), keep_lifetimes=False)
        self.model.feed_counters(
            counters.select(["pid", "stack_id", "opened", "closed"]).to_pandas()
        )

    def _preexisting_frame(self) -> pd.DataFrame | None:
        if not self._preexisting:
            return None
        table = pa.Table.from_pylist(self._preexisting, schema=schema.PREEXISTING)
        self._preexisting = []
        return table.to_pandas()

    def _add_frames(self, rows: list[dict[str, Any]]) -> None:
        """STACK_FRAMES rows: a stack's rows come in one flush (one pid's copy is kept)."""
        by_stack: dict[int, list[dict[str, Any]]] = {}
        first_pid: dict[int, int] = {}
        for row in rows:
            stack_id = int(row["stack_id"])
            if stack_id in self.stacks or first_pid.setdefault(stack_id, row["pid"]) != row["pid"]:
                continue
            by_stack.setdefault(stack_id, []).append(row)
        for stack_id, stack_rows in by_stack.items():
            stack_rows.sort(key=lambda r: r["depth"])
            self.stacks[stack_id] = [_frame(r) for r in stack_rows]

    def _add_samples(self, events: pa.Table) -> None:
        """The kind and path of each stack's last birth in the batch (only those rows are
        turned into Python objects: a busy batch has hundreds of thousands)."""
        births = events.filter(_is_op(events.column("op"), schema.OP_BIRTH))
        if not len(births):
            return
        stack_ids = births.column("stack_id").to_numpy()
        _, from_end = np.unique(stack_ids[::-1], return_index=True)
        last = births.take(pa.array(len(stack_ids) - 1 - from_end))
        for row in last.select(["stack_id", "kind", "path"]).to_pylist():
            self._samples[int(row["stack_id"])] = (str(row["kind"] or ""), str(row["path"] or ""))

    # --- sites ----------------------------------------------------------------------------
    def site_of(self, stack_id: int) -> tuple[str, str]:
        """(file:line, function) of a stack's opening site, as the report names it."""
        frames = self.stacks.get(stack_id)
        if not frames:
            return (NO_STACK, "") if stack_id == 0 else (f"<stack {stack_id:x}>", "")
        site = innermost_user(frames) or frames[0]
        return site.where(), site.qualname or site.function

    def _site_rows(self, now: float) -> list[SiteRow]:
        if self.model is None:
            return []
        counters = self.model.site_counters()
        counters = counters.groupby("stack_id")[["opened", "closed", "live"]].sum()
        rows: dict[str, SiteRow] = {}
        best: dict[str, int] = {}  # site -> live fds of its chosen stack
        for stack_id, opened, closed, live in counters.itertuples():
            where, function = self.site_of(int(stack_id))
            row = rows.setdefault(where, SiteRow(where, function))
            row.opened += int(opened)
            row.closed += int(closed)
            row.live += int(live)
            if best.get(where, -1) < live:
                best[where] = int(live)
                row.stack_id = int(stack_id)
        self._add_growth(rows, now)
        for row in rows.values():
            row.kind, row.sample = self._samples.get(row.stack_id, ("", ""))
            if row.live and row.stack_id:
                row.cause = self._cause(row.stack_id)
        return list(rows.values())

    def _add_growth(self, rows: dict[str, SiteRow], now: float) -> None:
        _trim(self._history, now)
        self._history.append((now, {w: r.live for w, r in rows.items() if r.live}))
        then, before = self._history[0]
        if now - then < 1.0:
            return
        for where, row in rows.items():
            row.growth = (row.live - before.get(where, 0)) / (now - then) * 60

    def _cause(self, stack_id: int) -> str:
        """The cause the opening stack alone supports (no end-of-trace evidence yet)."""
        if stack_id not in self.stacks:
            return ""  # its frames come with a later flush
        if stack_id not in self._causes:
            try:
                cause = classify(self.stacks.get(stack_id, []), self._sources, Context()).cause
            except Exception:  # a guess for the screen: never stop the view over it
                cause = "?"
            self._causes[stack_id] = cause
        return self._causes[stack_id]

    def sorted_sites(self, by: str) -> list[SiteRow]:
        def key(row: SiteRow) -> tuple[float, int, int]:
            return (getattr(row, by), row.live, row.opened)

        return sorted(self.sites, key=key, reverse=True)

    def elapsed(self) -> float:
        return (self.stopped or time.monotonic()) - self.started


def _is_op(column: pa.ChunkedArray, name: str) -> pa.ChunkedArray:
    """Rows whose dictionary-coded op is `name`, compared on the codes (no string per row)."""
    masks = []
    for chunk in column.chunks:
        codes = chunk.dictionary.to_pylist()
        code = codes.index(name) if name in codes else -1
        masks.append(pc.equal(chunk.indices, pa.scalar(code, chunk.indices.type)) if code >= 0
                     else pa.array(np.zeros(len(chunk), bool)))  # fmt: skip
    return pa.chunked_array(masks, pa.bool_())


def _frame(row: dict[str, Any]) -> Frame:
    function = row.get("function") or "?"
    return Frame(
        function=function,
        qualname=row.get("qualname") or function,
        file=row.get("file") or "?",
        line=int(row["line"] if row.get("line") is not None else -1),
        firstlineno=int(row["firstlineno"] if row.get("firstlineno") is not None else -1),
        code_flags=int(row.get("code_flags") or 0),
    )


def _trim(history: deque[Any], now: float, window: float = GROWTH_WINDOW) -> None:
    """Drop samples older than the window, keeping one at or before its start as a base."""
    while len(history) > 1 and history[1][0] <= now - window:
        history.popleft()


def _slope(history: deque[tuple[float, int]]) -> float:
    """Change per minute between the oldest and the newest sample."""
    (t0, v0), (t1, v1) = history[0], history[-1]
    return (v1 - v0) / (t1 - t0) * 60 if t1 - t0 >= 1.0 else 0.0


# ---- drawing ----------------------------------------------------------------------------------


@dataclass
class ViewState:
    """What the keys change."""

    sort_by: str = "growth"
    paused: bool = False
    selected: int = 0
    show_stack: bool = False
    message: str = ""  # the last line held from stderr, or what a key did


def render(watch: Watch, state: ViewState, height: int = 40, title: str = "") -> RenderableType:
    """The whole screen: header, then the sites table or the selected site's stack."""
    sites = watch.sorted_sites(state.sort_by)
    state.selected = max(0, min(state.selected, len(sites) - 1))
    header = _header(watch, state, title)
    footer = Text(_KEY_HELP + (f"   {state.message}" if state.message else ""), style="dim")
    room = max(height - len(header) - 4, 1)
    if state.show_stack and sites:
        body: RenderableType = _stack(watch, sites[state.selected], room)
    else:
        body = _sites_table(sites, state, room)
    return Group(*header, body, footer)


_KEY_HELP = "g/l/o sort  space pause  enter stack  j/k select  d dump  q quit"


def _header(watch: Watch, state: ViewState, title: str) -> list[Text]:
    flags = "  PAUSED" if state.paused else ""
    lines = [
        Text.assemble(
            ("cmtrace live", "bold"),
            f"  {title}  elapsed {_duration(watch.elapsed())}  "
            f"events {watch.events:,} ({watch.events_per_s:,.0f}/s)  lost {watch.lost:,}  "
            f"sites {len(watch.sites)}  sorted by {state.sort_by}",
            (flags, "bold reverse"),
        )
    ]
    for target in list(watch.targets.values())[:SHOWN_TARGETS]:
        lines.append(_target_line(target))
    return lines


def _target_line(target: TargetFds) -> Text:
    if target.open_fds is None:
        return Text(f"pid {target.pid} {target.comm}: gone")
    limit = target.soft_limit
    used = (
        f"{target.open_fds:,} / {limit:,} fds ({target.open_fds / limit:.0%})"
        if limit
        else (f"{target.open_fds:,} fds (no limit)")
    )
    minutes = target.minutes_to_limit()
    reach = f", limit in {_duration(minutes * 60)}" if minutes is not None else ""
    style = "bold red" if limit and target.open_fds >= 0.8 * limit else ""
    rate = f"{target.per_minute:+,.0f}/min"
    return Text(f"pid {target.pid} {target.comm}: {used}  {rate}{reach}", style=style)


_COLUMNS = ("SITE", "LIVE", "OPENED", "CLOSED", "+/MIN", "KIND", "SAMPLE", "CAUSE?")
_NUMBERS = ("LIVE", "OPENED", "CLOSED", "+/MIN")


def _sites_table(sites: list[SiteRow], state: ViewState, room: int) -> Table:
    table = Table(box=None, pad_edge=False, expand=True, show_edge=False)
    for name in _COLUMNS:
        table.add_column(
            name,
            justify="right" if name in _NUMBERS else "left",
            no_wrap=True,
            ratio={"SITE": 3, "SAMPLE": 2}.get(name),
            min_width=32 if name == "SITE" else None,
            overflow="ellipsis",
        )
    first = max(0, state.selected - room + 1)
    for index, row in enumerate(sites[first : first + room], start=first):
        table.add_row(
            f"{_short(row.where)} {row.function}", f"{row.live:,}", f"{row.opened:,}",
            f"{row.closed:,}", f"{row.growth:+,.0f}", row.kind, row.sample, row.cause,
            style="reverse" if index == state.selected else None,
        )  # fmt: skip
    return table


def _stack(watch: Watch, site: SiteRow, room: int) -> Text:
    frames = watch.stacks.get(site.stack_id, [])
    lines = [f"opening stack of {site.where} {site.function} (innermost first; enter: back)"]
    lines += [
        f"  {'>' if frame.is_user else ' '} {frame.where()} in {frame.qualname}"
        for frame in frames[: room - 1]
    ] or ["  (no frames recorded for this site)"]
    return Text("\n".join(lines))


def _short(where: str, keep: int = 2) -> str:
    """A file path cut to its last few components: the screen has room for the line."""
    parts = where.split("/")
    return where if len(parts) <= keep + 1 else ".../" + "/".join(parts[-keep:])


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def status_line(watch: Watch) -> str:
    """One line for a log: elapsed, events, each target's open fds, the top growing site."""
    fds = ", ".join(
        f"pid {t.pid} {t.open_fds if t.open_fds is not None else 'gone'}"
        + (f"/{t.soft_limit}" if t.soft_limit else "")
        for t in list(watch.targets.values())[:SHOWN_TARGETS]
    )
    top = watch.sorted_sites("growth")
    growing = (
        f"top growing {top[0].where} {top[0].function} {top[0].growth:+,.0f}/min "
        f"({top[0].live:,} live)"
        if top and top[0].growth > 0
        else "no site growing"
    )
    return (
        f"cmtrace: {_duration(watch.elapsed())} elapsed, {watch.events:,} events, "
        f"open fds {fds or '?'}; {growing}"
    )


# ---- the observers ----------------------------------------------------------------------------


class StatusLine(BaseObserver):
    """One status line on stderr every 10 s (the view without a terminal).

    The flushes between two lines are modelled when the line is due, not as they come: the
    model's work (pandas, ~10 ms a flush) would otherwise run every 0.5 s beside the target,
    and a command's first seconds (its start-up's records) would pay for a line it never
    prints when it ends sooner. At most PENDING_ROWS events wait (memory stays bounded)."""

    PENDING_ROWS = 100_000

    def __init__(self, interval: float = STATUS_INTERVAL) -> None:
        self.watch = Watch()
        self.interval = interval
        self._printed = time.monotonic()
        self._pending: list[tuple[Flushed, float]] = []
        self._pending_rows = 0

    def started(self, recording: Recording) -> None:
        self.watch.begin(sorted(recording.root_pids))
        self._printed = time.monotonic()

    def preexisting(self, rows: list[dict[str, Any]]) -> None:
        self.watch.add_preexisting(rows)

    def flushed(self, recording: Recording, flushed: Flushed) -> None:
        if flushed.final:
            return  # no line after the last flush: the summary follows
        now = time.monotonic()
        self._pending.append((flushed, now))
        self._pending_rows += len(flushed.events) if flushed.events is not None else 0
        due = now - self._printed >= self.interval
        if due or self._pending_rows >= self.PENDING_ROWS:
            self.watch.watch_targets(sorted(recording.root_pids))
            self.catch_up()
        if due:
            self._printed = now
            print(status_line(self.watch), file=sys.stderr, flush=True)

    def catch_up(self) -> None:
        """Model the flushes that waited, in order, at the times they came."""
        pending, self._pending, self._pending_rows = self._pending, [], 0
        for flushed, at in pending:
            self.watch.feed_counters(flushed.counters)
            self.watch.feed(flushed.events, flushed.frames, flushed.lost_events, now=at)


class _HeldStderr:
    """Stands in for sys.stderr while the screen is up: lines are kept, and shown after."""

    def __init__(self, on_line: Callable[[str], None]) -> None:
        self.lines: list[str] = []
        self._partial = ""
        self._on_line = on_line

    def write(self, text: str) -> int:
        self._partial += text
        *done, self._partial = self._partial.split("\n")
        for line in done:
            self.lines.append(line)
            self._on_line(line)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


class LiveView(BaseObserver):
    """The full-screen view on the terminal of stderr, until recording ends.

    `on_dump`, when given, is what `d` calls (a manual dump): from the keys' thread, so it
    should only ask for one (the dump observer writes it at its next flush and says so on
    stderr, which the footer shows)."""

    def __init__(self, on_dump: Callable[[], object] | None = None) -> None:
        self.watch = Watch()
        self.state = ViewState()
        self.on_dump = on_dump
        self._recording: Recording | None = None
        self._terminal: IO[str] = sys.stderr
        self._console: Console | None = None
        self._live: Live | None = None
        self._held: _HeldStderr | None = None
        self._tty: int | None = None
        self._saved_termios: list[Any] | None = None
        self._keys: threading.Thread | None = None
        self._stop_keys = threading.Event()
        self._draw_lock = threading.Lock()
        self._title = ""
        self._on_quit: Callable[[], None] = lambda: None

    # --- observer -------------------------------------------------------------------------
    def started(self, recording: Recording) -> None:
        self._recording = recording
        pids = sorted(recording.root_pids)
        self.watch.begin(pids)
        names = ", ".join(f"{pid} ({procfs.comm(pid)})" for pid in pids[:SHOWN_TARGETS])
        self.open(f"pid {names}  {recording.backend.name}", self._quit)

    def preexisting(self, rows: list[dict[str, Any]]) -> None:
        self.watch.add_preexisting(rows)

    def flushed(self, recording: Recording, flushed: Flushed) -> None:
        self.watch.feed_counters(flushed.counters)
        self.show(flushed.events, flushed.frames, flushed.lost_events, recording.root_pids)

    def closed(self, recording: Recording) -> None:
        self.close()

    # --- the terminal ---------------------------------------------------------------------
    def open(self, title: str, on_quit: Callable[[], None]) -> None:
        """Take the terminal of stderr: the screen, the keys (`q` calls on_quit)."""
        self._title, self._on_quit = title, on_quit
        self._terminal = sys.stderr
        self._console = Console(file=self._terminal, force_terminal=True)
        self._held = _HeldStderr(self._show_message)
        # progress lines wait for the end (the footer shows the last one)
        sys.stderr = self._held
        with self._closing_on_error():
            self._live = Live(console=self._console, screen=True, auto_refresh=False,
                              redirect_stdout=False, redirect_stderr=False)  # fmt: skip
            self._live.start()
            self._start_keys()
            self._draw()

    def show(
        self, events: pa.Table | None, frames: list[dict[str, Any]], lost: int, pids: Iterable[int]
    ) -> None:
        """Feed what was just written, and redraw unless paused."""
        with self._closing_on_error():
            self.watch.watch_targets(sorted(pids))
            self.watch.feed(events, frames, lost)
            if not self.state.paused:
                self._draw()

    @contextmanager
    def _closing_on_error(self) -> Iterator[None]:
        """A view that fails gives the terminal back first: the session then drops it (and
        never calls its closed()), saying why on the restored stderr."""
        try:
            yield
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Terminal back as it was (termios, main screen, cursor), then the held lines."""
        self._stop_keys.set()
        if self._keys is not None:
            self._keys.join(timeout=1.0)
            self._keys = None
        if self._tty is not None:
            if self._saved_termios is not None:
                termios.tcsetattr(self._tty, termios.TCSADRAIN, self._saved_termios)
            os.close(self._tty)
            self._tty = None
        if self._live is not None:
            live, self._live = self._live, None
            with self._draw_lock:
                live.stop()
        if self._held is not None:
            held, self._held = self._held, None
            sys.stderr = self._terminal
            for line in held.lines:
                print(line, file=sys.stderr)
            sys.stderr.flush()

    # --- screen ---------------------------------------------------------------------------
    def _draw(self) -> None:
        with self._draw_lock:
            if self._live is None or self._console is None:
                return
            height = self._console.size.height
            self._live.update(render(self.watch, self.state, height, self._title), refresh=True)

    def _show_message(self, line: str) -> None:
        self.state.message = line.removeprefix("cmtrace: ")

    def _dump(self) -> None:
        if self.on_dump is None:
            self.state.message = "dumps are not available in this build"
            return
        try:
            self.on_dump()
            self.state.message = "dump requested"
        except Exception as exc:  # a failed dump is said, never the end of the view
            self.state.message = f"dump failed: {type(exc).__name__}: {exc}"

    # --- keys -----------------------------------------------------------------------------
    def _start_keys(self) -> None:
        try:
            self._tty = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
            self._saved_termios = termios.tcgetattr(self._tty)
            tty.setcbreak(self._tty)  # keys one at a time; Ctrl-C still sends SIGINT
        except OSError:  # no controlling terminal: the view shows, keys do nothing
            if self._tty is not None:
                os.close(self._tty)
            self._tty = None
            return
        self._keys = threading.Thread(target=self._read_keys, name="cmtrace-keys", daemon=True)
        self._keys.start()

    def _read_keys(self) -> None:
        assert self._tty is not None
        while not self._stop_keys.is_set():
            ready, _, _ = select.select([self._tty], [], [], 0.2)
            if ready:
                data = os.read(self._tty, 16).decode(errors="replace")
                for key in _keys_of(data):
                    self.press(key)

    def press(self, key: str) -> None:
        """Act on one key (names from _keys_of)."""
        state = self.state
        if key == "q":
            self.state.message = "stopping ..."
            self._on_quit()
        elif key in SORT_KEYS:
            state.sort_by, state.selected = SORT_KEYS[key], 0
        elif key == " ":
            state.paused = not state.paused
        elif key in ("down", "j"):
            state.selected += 1
        elif key in ("up", "k"):
            state.selected = max(state.selected - 1, 0)
        elif key == "enter":
            state.show_stack = not state.show_stack
        elif key == "escape":
            state.show_stack = False
        elif key == "d":
            self._dump()
        self._draw()

    def _quit(self) -> None:
        """Stop as Ctrl-C would: `run` hands SIGINT to its command and records to its end."""
        rec = self._recording
        if rec is None:
            return
        if rec.writer is not None and rec.writer.meta.get("mode") == "run":
            for pid in rec.root_pids:
                try:
                    os.kill(pid, signal.SIGINT)
                except ProcessLookupError:
                    pass
        else:
            rec.request_stop("q pressed in the live view")


_ESCAPES = {"\x1b[A": "up", "\x1b[B": "down", "\x1bOA": "up", "\x1bOB": "down"}


def _keys_of(data: str) -> list[str]:
    """Key names in what the terminal sent: arrows, enter, escape, or the character."""
    keys = []
    while data:
        escape = next((e for e in _ESCAPES if data.startswith(e)), None)
        if escape:
            keys.append(_ESCAPES[escape])
            data = data[len(escape) :]
            continue
        char, data = data[0], data[1:]
        keys.append({"\r": "enter", "\n": "enter", "\x1b": "escape"}.get(char, char))
    return keys


# ---- cmtrace top TRACE: a recording directory followed as it grows -----------------------------


_NO_COUNTERS = schema.COUNTERS.empty_table()


class TraceFollower:
    """A trace directory read as the recorder writes it: parts appear whole (written under a
    dot-name, then renamed), so each poll reads the parts not read yet."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._read: dict[str, set[str]] = {"events": set(), "stacks": set(), "counters": set()}
        self.counters: pa.Table = _NO_COUNTERS  # --aggregate: the counter rows of the last poll

    def meta(self) -> dict[str, Any]:
        try:
            meta: dict[str, Any] = json.loads((self.path / "meta.json").read_text())
        except (OSError, ValueError):
            return {}
        return meta

    def preexisting(self) -> list[dict[str, Any]]:
        snapshot = self.path / "preexisting.parquet"
        rows: list[dict[str, Any]] = (
            pq.read_table(snapshot).to_pylist() if snapshot.is_file() else []
        )
        return rows

    def poll(self) -> tuple[pa.Table | None, list[dict[str, Any]]]:
        """The events of the new parts (time order) and the stack frames of the new parts."""
        events = self._new_parts("events")
        frames = [row for table in self._new_parts("stacks") for row in table.to_pylist()]
        self.counters = pa.concat_tables(self._new_parts("counters") or [_NO_COUNTERS])
        if not events:
            return None, frames
        table = pa.concat_tables(events).sort_by([("t_ns", "ascending")])
        return table, frames

    def _new_parts(self, name: str) -> list[pa.Table]:
        seen = self._read[name]
        new = sorted(p for p in (self.path / name).glob("part-*.parquet") if p.name not in seen)
        tables = [pq.read_table(p) for p in new]
        seen.update(p.name for p in new)
        return tables


def follow(path: Path, interval: float = 0.5) -> int:
    """`cmtrace top TRACE`: the live view of a recording directory, until `q` (a finished
    trace stays on screen); without a terminal, one status line of what is written so far."""
    read_meta(path)  # a missing or corrupt trace is one line and exit 5, as for report
    follower = TraceFollower(path)
    meta = follower.meta() or {}
    view = LiveView()
    view.watch.begin(_meta_pids(meta))
    _clock_from(view.watch, meta)
    view.watch.add_preexisting(follower.preexisting())
    if not sys.stderr.isatty():
        events, frames = follower.poll()
        view.watch.feed_counters(follower.counters)
        view.watch.feed(events, frames, int(meta.get("lost_events") or 0))
        _clock_from(view.watch, follower.meta() or meta)
        print(status_line(view.watch), file=sys.stderr)
        return 0
    quit_requested = threading.Event()
    view.open(f"{path}  (following)", quit_requested.set)
    try:
        while not quit_requested.is_set():
            events, frames = follower.poll()
            view.watch.feed_counters(follower.counters)
            meta = follower.meta() or meta
            view.show(events, frames, int(meta.get("lost_events") or 0), _meta_pids(meta))
            if _clock_from(view.watch, meta) and not view.state.message:
                view.state.message = f"recording ended ({meta.get('status')}): q quits"
            quit_requested.wait(interval)
    except KeyboardInterrupt:
        pass
    finally:
        view.close()
    return 0


def _clock_from(watch: Watch, meta: dict[str, Any]) -> bool:
    """Elapsed as the recording's wall clock says (start_wall, end_wall once it ended, which
    it returns): the view may start long after the recording did."""
    start, end = meta.get("start_wall"), meta.get("end_wall")
    if start:
        watch.started = time.monotonic() - (time.time() - float(start))
        if end:
            watch.stopped = watch.started + float(end) - float(start)
    return bool(end) and meta.get("status") != schema.STATUS_RECORDING


def _meta_pids(meta: dict[str, Any]) -> list[int]:
    return [int(t["pid"]) for t in meta.get("targets", []) if t.get("pid")]
