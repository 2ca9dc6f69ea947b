"""The Trace object: a recorded trace as pandas tables, its leaks, sites and timelines."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterator
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from cmtrace.analysis.aggregate import (
    aggregate_meta,
    counted_per_group,
    counted_timeline,
    label_of_stacks,
    limits,
    read_counters,
)
from cmtrace.analysis.apis import api_per_stack, explain
from cmtrace.analysis.calls import CallLog
from cmtrace.analysis.causes import (
    CLOSE_FACTS,
    CloseStack,
    Context,
    Verdict,
    classify,
    close_death,
)
from cmtrace.analysis.children import (
    SHORT_LIVED_S,
    is_program_file,
    lifespans,
    name_program_apis,
    name_programs,
    program_files,
    short_lived_pids,
)
from cmtrace.analysis.code import SourceIndex, innermost_user
from cmtrace.analysis.lifetimes import EventFacts, PairingStats, build_lifetimes, is_leak
from cmtrace.analysis.limits import process_limits
from cmtrace.analysis.services import service_of
from cmtrace.analysis.stacks import Stacks
from cmtrace.trace import schema
from cmtrace.trace.reader import (
    RawTrace,
    event_parts,
    read_event_part,
    read_events,
    read_stacks,
    read_trace,
)

NO_STACK = "<no Python stack>"  # the site of fds opened without a captured Python stack
SITE_COLUMNS = ["site_file", "site_line", "site_function"]
WITH_COLUMNS = ["with_file", "with_line", "with_function"]
# Columns of `sites()`, one row per opening site.
SITE_TABLE_COLUMNS = SITE_COLUMNS + [
    "opened", "closed", "leaked", "leaks_per_s", "cause", "kind", "paths", "with_file",
    "with_line", "first_ns", "last_ns", "api", "service",
]  # fmt: skip


def load(path: str | Path, local_sources: bool = True, until_ns: int | None = None) -> Trace:
    """Load a trace directory. `local_sources=False` uses only the source captured in the trace.
    `until_ns` cuts it at that instant (ns since its start; see Trace)."""
    return Trace(read_trace(path, stacks=False), local_sources=local_sources, until_ns=until_ns)


class Trace:
    """A recorded trace. Tables are built on first use and cached.

    - `events`: one row per recorded event (schema.EVENTS), `stacks`: frames per stack id,
      `sources`, `preexisting`, `meta` (meta.json).
    - `fds`: one row per fd lifetime: pid, fd, kind, path, born_ns, died_ns, death, open_stack,
      close_stack, inherited, preexisting, site_*, with_*, api, service, leak, closed_by,
      cause, fix.
    - `leaks()`, `sites()`, `warnings()`, `live_fds(at=ns)`, `timeline(by="site", freq=...)`.

    With `until_ns` the trace is read as it stood at that instant (a dump taken while
    recording): only events at or before it count, the trace ends there, and its leaks are the
    fds born during the trace and still open then.
    """

    def __init__(self, raw: RawTrace, local_sources: bool = True, until_ns: int | None = None):
        self.until_ns = until_ns
        self.raw = raw
        self.path = raw.path
        self.meta = raw.meta
        self.sources = raw.sources
        self.preexisting = raw.preexisting
        self.snapshot = raw.snapshot
        self.generators = raw.generators  # the liveness check's findings (None: no check)
        self.src = SourceIndex.from_table(raw.sources, local_fallback=local_sources)
        self.pairing = PairingStats()
        self._stack_api: dict[int, str | None] = {}  # open stack -> API (filled with fds)

    # --- basic facts ----------------------------------------------------------------------
    @property
    def status(self) -> str:
        return str(self.meta.get("status", "unknown"))

    @property
    def interrupted(self) -> bool:
        return self.status == schema.STATUS_INTERRUPTED

    @cached_property
    def _summary(self) -> EventFacts:
        """Facts of the event stream needed beside the lifetimes (three columns read, a part at
        a time: whole columns would cost hundreds of MB on a large trace)."""
        rows, last, lost, children = 0, [], 0, set()
        for part in self._event_parts(("t_ns", "op", "arg")):
            part = part.unify_dictionaries()
            rows += part.num_rows
            if "t_ns" in part.column_names and pc.max(part.column("t_ns")).is_valid:
                last.append(pc.max(part.column("t_ns")).as_py())
            if not part.num_rows or "op" not in part.column_names:
                continue
            codes, names = _op_codes(part)
            arg = _numbers(part, "arg")
            lost += int(np.nansum(arg[codes == _index_of(names, schema.OP_LOST)]))
            forked = arg[codes == _index_of(names, schema.OP_FORK)]
            children.update(forked[~np.isnan(forked)].astype(int).tolist())
        return {"rows": rows, "last_ns": max(last, default=0), "lost": lost, "children": children}

    def _event_parts(self, columns: tuple[str, ...]) -> Iterator[pa.Table]:
        """The events, a part at a time (only `columns`); a cut trace's as one table."""
        if self.until_ns is not None:
            yield self._events_until.select(
                [c for c in columns if c in self._events_until.column_names]
            )
            return
        for file in event_parts(self.path)[1]:
            yield read_event_part(file, columns)

    @cached_property
    def _events_until(self) -> pa.Table:
        """The events of a cut trace: those at or before until_ns (core columns)."""
        table = read_events(self.path)
        return table.filter(pc.less_equal(table.column("t_ns"), self.until_ns))

    @property
    def lost_events(self) -> int:
        return max(int(self.meta.get("lost_events") or 0), self._summary["lost"])

    @cached_property
    def end_ns(self) -> int:
        """The end of the trace in ns since its start (last event, or the recorded duration;
        the cut of a cut trace)."""
        if self.until_ns is not None:
            return self.until_ns
        for key in ("end_ns", "duration_ns"):
            if isinstance(self.meta.get(key), (int, float)):
                return int(self.meta[key])
        start, end = self.meta.get("start_wall"), self.meta.get("end_wall")
        last = self._summary["last_ns"]
        if isinstance(start, (int, float)) and isinstance(end, (int, float)):
            return max(last, int((end - start) * 1e9))
        return last

    @property
    def duration_s(self) -> float:
        return max(self.end_ns, 1) / 1e9

    @property
    def no_python_reason(self) -> str | None:
        """Why the trace has no Python stacks (the target is not CPython...), if meta says so."""
        reasons = (self.meta.get("degraded") or {}).get("no_python_stacks") or {}
        if isinstance(reasons, str):
            return reasons
        return count_reasons([str(r) for r in reasons.values() if r]) or None

    @cached_property
    def events(self) -> pd.DataFrame:
        """Every recorded event (schema.EVENTS), read from disk on first use."""
        table = read_events(self.path, columns=None)
        if self.until_ns is not None:
            table = table.filter(pc.less_equal(table.column("t_ns"), self.until_ns))
        return table.to_pandas()

    @cached_property
    def stacks(self) -> pd.DataFrame:
        """Frames per stack id (schema.STACK_FRAMES), as recorded."""
        table = self.raw.stacks if self.raw.stacks is not None else read_stacks(self.path)
        return table.cast(schema.STACK_FRAMES).to_pandas()

    @cached_property
    def frames(self) -> Stacks:
        """Stack id -> frames (`.get(stack_id, [])`), held as columns (cmtrace.analysis.stacks)."""
        return Stacks(self.raw.stacks if self.raw.stacks is not None else self.path)

    @property
    def child_pids(self) -> set[int]:
        return self._summary["children"]

    @cached_property
    def exec_names(self) -> dict[int, str]:
        """pid -> the name of the last image it exec'd (its path's last component): what to call
        a process meta.json has no comm for (a child gone before it was looked at)."""
        names: dict[int, str] = {}
        for part in self._event_parts(("pid", "op", "path")):
            if not part.num_rows or not {"op", "path"} <= set(part.column_names):
                continue
            codes, ops = _op_codes(part.unify_dictionaries())
            execs = part.filter(pa.array(codes == _index_of(ops, schema.OP_EXEC)))
            for pid, path in zip(execs.column("pid").to_pylist(), execs.column("path").to_pylist()):
                if path:
                    names[int(pid)] = str(path).rsplit("/", 1)[-1]
        return names

    def process_limits(self) -> list[dict[str, Any]]:
        """limits.process_limits of this trace, processes without a comm named by their exec
        (the events' paths are read only when one lacks it)."""
        entries = process_limits(self.fds, self.meta)
        if any(entry["comm"] is None for entry in entries):
            for entry in entries:
                entry["comm"] = entry["comm"] or self.exec_names.get(entry["pid"])
        return entries

    # --- lifetimes ------------------------------------------------------------------------
    @cached_property
    def fds(self) -> pd.DataFrame:
        facts: dict = {}
        events = self.path if self.until_ns is None else self._events_until
        fds, self.pairing = build_lifetimes(events, self.preexisting, facts=facts)
        self.__dict__.setdefault("_summary", facts)  # read with the events: no second pass
        self._refine_deaths(fds)
        self._add_sites(fds)
        name_programs(fds, program_files(self.src), self.frames)  # a `python -c` program each
        self._add_apis(fds)
        self._stack_api.update(name_program_apis(fds, self.src))  # their fixes know it too
        fds["service"] = _services(fds)
        fds["leak"] = is_leak(fds)
        if self.until_ns is not None:  # at a cut, a leak is an fd still open then
            fds["leak"] &= fds["died_ns"].isna().to_numpy()
        death = fds["death"].astype(object)
        fds["closed_by"] = death.where(fds["leak"] & death.notna(), None)
        self._add_causes(fds)
        return fds

    def _refine_deaths(self, fds: pd.DataFrame) -> None:
        """Split explicit closes into exit / close / finalizer / loop-shutdown by close stack.

        The per-frame facts are decided once per distinct frame and spread to stacks as
        columns; the decision is made once per distinct (innermost frame, facts), and only
        rows whose death changes are written.
        """
        rows = np.flatnonzero((fds["death"] == schema.OP_CLOSE).to_numpy())
        if not len(rows):
            return
        stacks = self.frames
        number, distinct = pd.factorize(fds["close_stack"].to_numpy()[rows])
        position = stacks.positions(np.asarray(distinct))
        recorded = position >= 0
        at = np.where(recorded, position, 0)

        def spread(per_stack: np.ndarray, fill: object) -> np.ndarray:
            spread_out: np.ndarray = (
                np.where(recorded, per_stack[at], fill)
                if len(per_stack)
                else np.full(len(at), fill)
            )
            return spread_out

        inner = spread(stacks.innermost(), -1)
        facts = [
            spread(stacks.any_frame(stacks.frame_facts(name, functions, test)), False)
            for name, functions, test in (
                (name, functions, partial(test, src=self.src))
                for name, functions, test in CLOSE_FACTS
            )
        ]
        key = inner.astype(np.int64) << len(facts)
        for bit, fact in enumerate(facts):
            key |= fact.astype(np.int64) << (len(facts) - 1 - bit)
        group, keys = pd.factorize(key)
        refined = np.array([self._close_death(int(k)) for k in keys], dtype=object)
        per_row = refined[group][number]
        changed = per_row != schema.OP_CLOSE
        if changed.any():
            new_deaths = set(per_row[changed].tolist()) - set(fds["death"].cat.categories)
            if new_deaths:  # atexit is not a pairing death: the close stack tells it
                fds["death"] = fds["death"].cat.add_categories(sorted(new_deaths))
            column = fds.columns.get_loc("death")
            fds.iloc[rows[changed], column] = per_row[changed]

    def _close_death(self, key: int) -> str:
        """close_death of a key of _refine_deaths: the innermost frame's code, then one bit
        per CLOSE_FACTS entry."""
        count = len(CLOSE_FACTS)
        code = key >> count
        facts = {
            name: bool(key >> (count - 1 - bit) & 1) for bit, (name, _, _) in enumerate(CLOSE_FACTS)
        }
        inner = self.frames.frame(code) if code >= 0 else None
        return close_death(CloseStack(inner=inner, **facts), self.src)

    def _add_sites(self, fds: pd.DataFrame) -> None:
        """Site (innermost user frame) and with statement of every open stack.

        Computed per distinct stack from the stack columns and spread with categorical codes:
        millions of rows share their stacks, and categoricals keep filtering cheap.
        """
        position, distinct = pd.factorize(fds["open_stack"].to_numpy())
        stacks = self.frames
        where = stacks.positions(np.asarray(distinct))
        recorded = where >= 0
        at = np.where(recorded, where, 0)
        cells: list[np.ndarray] = []
        for per_stack in (stacks.site_frames(), stacks.with_frames(self.src)):
            codes = np.where(recorded, per_stack[at], -1) if len(per_stack) else where
            cells.extend(stacks.frame_cells(codes))
        for column, per_stack in zip(SITE_COLUMNS + WITH_COLUMNS, cells):
            if column.endswith("_line"):
                fds[column] = pd.array(per_stack[position], dtype="Int64")
            else:
                categories = pd.Categorical(per_stack)
                fds[column] = pd.Categorical.from_codes(
                    categories.codes[position], categories=categories.categories
                )

    def _add_apis(self, fds: pd.DataFrame) -> None:
        """The API through which each open stack's site opened its fd (cmtrace.analysis.apis),
        decided once per distinct stack and spread as a categorical."""
        position, distinct = pd.factorize(fds["open_stack"].to_numpy())
        stacks = self.frames
        where = stacks.positions(np.asarray(distinct))
        per_stack = api_per_stack(stacks, self.src, wanted=where)
        apis: np.ndarray = np.full(len(distinct), None, dtype=object)
        if len(per_stack):
            recorded = where >= 0
            apis[recorded] = per_stack[where[recorded]]
        self._stack_api = dict(zip(np.asarray(distinct).tolist(), apis.tolist()))
        categories = pd.Categorical(apis)
        fds["api"] = pd.Categorical.from_codes(
            categories.codes[position], categories=categories.categories
        )

    def _add_causes(self, fds: pd.DataFrame) -> None:
        """cause, fix and evidence of every leak, spread as categoricals.

        One verdict per evidence group (open stack, pid, still open), where the pid is kept
        only when evidence is known per process (the end snapshot for an fd still open, --calls
        where it fired): 10,000 fds leaked by one line in 100 processes cost one verdict.
        """
        leaks = np.flatnonzero(fds["leak"].to_numpy())
        keys = self._evidence_keys(fds, leaks)
        verdicts = self._verdicts(fds, leaks, keys) if len(leaks) else {}
        distinct = list(dict.fromkeys(keys))
        number = {key: i for i, key in enumerate(distinct)}
        group = np.array([number[key] for key in keys], dtype=np.int64)
        for column, value in (
            ("cause", lambda v: v.cause),
            ("fix", lambda v: v.fix),
            ("evidence", lambda v: "; ".join(v.evidence)),
        ):
            texts = np.array([value(verdicts[k]) for k in distinct], dtype=object)
            categories = pd.Index(sorted(set(texts.tolist())), dtype=object)
            codes: np.ndarray = np.full(len(fds), -1, dtype=np.int32)
            codes[leaks] = categories.get_indexer(texts)[group] if len(leaks) else []
            fds[column] = pd.Categorical.from_codes(codes, categories=categories)

    def _evidence_keys(self, fds: pd.DataFrame, leaks: np.ndarray) -> list[tuple]:
        """(open stack, pid or -1, still open) of each leaked row (see _add_causes)."""
        stacks = fds["open_stack"].to_numpy()[leaks].tolist()
        pids = fds["pid"].to_numpy()[leaks].tolist()
        still_open = fds["died_ns"].isna().to_numpy()[leaks].tolist()
        per_process = set(self._still_running()) | self._checked_pids()
        # --calls evidence, and a liveness check that could not read the process (to say so),
        # are per process whether the fd was still open or not
        always = set(self.calls.pids) if self.calls else set()
        always |= self._checked_pids(readable=False)
        return [
            (stack, pid if (open_ and pid in per_process) or pid in always else -1, open_)
            for stack, pid, open_ in zip(stacks, pids, still_open)
        ]

    def _verdicts(
        self, fds: pd.DataFrame, leaks: np.ndarray, keys: list[tuple]
    ) -> dict[tuple, Verdict]:
        siblings = self._sibling_deaths(fds)
        running = self._still_running()
        verdicts: dict[tuple, Verdict] = {}
        opened = self._one_birth_per_key(fds, leaks, keys) if self.calls else {}
        liveness = self._liveness(fds, leaks, keys) if self.generators else {}
        distinct = list(dict.fromkeys(keys))
        sites = self._site_keys(np.array([stack for stack, _, _ in distinct], dtype=np.int64))
        for (stack, pid, open_at_end), site in zip(distinct, sites):
            ctx = Context(
                still_running=running.get(pid, {}) if open_at_end else {},
                snapshot_taken=self.snapshot is not None,
                sibling_deaths=siblings.get(site, {}),
                calls=self.calls,
                opened=opened.get((stack, pid, open_at_end)),
                liveness=liveness.get((stack, pid, open_at_end)),
            )
            frames = self.frames.get(stack, [])
            verdict = classify(frames, self.src, ctx)
            verdict.fix = explain(verdict.cause, verdict.fix, self._stack_api.get(stack),
                                  innermost_user(frames), verdict.with_frame)  # fmt: skip
            verdicts[(stack, pid, open_at_end)] = verdict
        return verdicts

    def _checked_pids(self, readable: bool = True) -> set[int]:
        """Processes the liveness check read when recording stopped (`readable`), or those it
        could not (they had ended, the check failed)."""
        processes = (self.generators or {}).get("processes") or {}
        return {int(pid) for pid, why_not in processes.items() if (why_not is None) == readable}

    def _birth_generators(self) -> dict[tuple[int, int, int], list[int]]:
        """(pid, tid, t_ns) of each birth that ran in generator frames -> its `generators`."""
        out: dict[tuple[int, int, int], list[int]] = {}
        columns = ("t_ns", "pid", "tid", "generators")
        for part in self._event_parts(columns):
            if "generators" not in part.column_names:
                continue
            part = part.filter(pc.is_valid(part.column("generators")))
            for t, pid, tid, words in zip(*(part.column(c).to_pylist() for c in columns)):
                out[(pid, tid, t)] = words
        return out

    def _liveness(
        self, fds: pd.DataFrame, leaks: np.ndarray, keys: list[tuple]
    ) -> dict[tuple, dict[int, list[dict]]]:
        """Context.liveness of each verdict key of an fd still open in a process the check
        read: per frame index of the opening stack, what became of the generator that frame
        ran, for each fd of the key (a finding of generators.json, or why there is none)."""
        assert self.generators is not None
        processes = self.generators.get("processes") or {}
        found = {
            (row["pid"], row["stack_id"], row["frame"], row["address"]): row
            for row in self.generators.get("generators") or []
        }
        words_of = self._birth_generators()
        mask = (1 << schema.GENERATOR_INDEX_SHIFT) - 1
        out: dict[tuple, dict[int, list[dict]]] = {}
        pids = fds["pid"].to_numpy()[leaks].tolist()
        tids = fds["tid"].to_numpy()[leaks].tolist()
        born = fds["born_ns"].to_numpy()[leaks].tolist()
        for key, pid, tid, t in zip(keys, pids, tids, born):
            stack, key_pid, open_at_end = key
            why_not = processes.get(str(key_pid), "")
            if key_pid < 0 or why_not == "" or (not open_at_end and why_not is None):
                continue  # closed while the process lived (loop shutdown...): no check needed
            per_frame = out.setdefault(key, {})
            for word in words_of.get((pid, tid, int(t)), []):
                frame, address = word >> schema.GENERATOR_INDEX_SHIFT, word & mask
                row = found.get((pid, stack, frame, address)) if why_not is None else None
                if row is None:
                    row = {"pid": pid, "address": address, "state": None,
                           "error": why_not or "not read when recording stopped"}  # fmt: skip
                per_frame.setdefault(frame, []).append(row)
        return out

    @cached_property
    def calls(self) -> CallLog:
        """--calls evidence: paired __enter__/__exit__ calls (empty without --calls)."""
        return CallLog.from_trace(self.path, self.meta, self.frames)

    @staticmethod
    def _one_birth_per_key(
        fds: pd.DataFrame, leaks: np.ndarray, keys: list[tuple]
    ) -> dict[tuple, tuple]:
        """(pid, tid, born_ns) of the first leaked fd of each verdict key: --calls evidence is
        read around one birth (the fds of one key come from the same code path)."""
        out: dict[tuple, tuple] = {}
        pids = fds["pid"].to_numpy()[leaks].tolist()
        tids = fds["tid"].to_numpy()[leaks].tolist()
        born = fds["born_ns"].to_numpy()[leaks].tolist()
        for key, pid, tid, t in zip(keys, pids, tids, born):
            out.setdefault(key, (int(pid), int(tid), int(t)))
        return out

    def _site_keys(self, stack_ids: np.ndarray) -> list[tuple]:
        """(site file, site line) of each stack, (None, None) for a stack without frames."""
        stacks = self.frames
        where = stacks.positions(stack_ids)
        site = stacks.site_frames()
        codes = np.where(where >= 0, site[np.maximum(where, 0)], -1) if len(site) else where
        files, lines, _ = stacks.frame_cells(codes)
        return [
            (file, int(line)) if file is not None else (None, None)
            for file, line in zip(files.tolist(), lines.tolist())
        ]

    def _sibling_deaths(self, fds: pd.DataFrame) -> dict[tuple, dict[str, int]]:
        """(site file, line) -> how the fds opened there that did not leak died, with counts.

        Counted per (open stack, death) on codes, then summed per site: a site is a function
        of the open stack, and millions of rows share their stacks."""
        death = fds["death"].array
        closed = np.flatnonzero(~fds["leak"].to_numpy() & (death.codes >= 0))
        stack_number, stacks = pd.factorize(fds["open_stack"].to_numpy()[closed])
        kinds = len(death.categories)
        counts = pd.Series(stack_number * kinds + death.codes[closed]).value_counts(sort=False)
        pairs = counts.index.to_numpy()
        sites = self._site_keys(np.asarray(stacks, dtype=np.int64)) if len(stacks) else []
        names = death.categories.tolist()
        out: dict[tuple, dict[str, int]] = {}
        for pair, n in zip(pairs.tolist(), counts.to_numpy().tolist()):
            site = sites[pair // kinds]
            if site[0] is None:
                continue  # fds without a site have no siblings
            by_death = out.setdefault(site, {})
            name = names[pair % kinds]
            by_death[name] = by_death.get(name, 0) + int(n)
        return out

    def _still_running(self) -> dict[int, dict[tuple[str, str], set[int]]]:
        """By pid: (file, function) -> lines being executed when recording stopped."""
        out: dict[int, dict[tuple[str, str], set[int]]] = {}
        for thread in (self.snapshot or {}).get("threads", []):
            frames_of_pid = out.setdefault(int(thread.get("pid", 0)), {})
            for frame in thread.get("frames", []):
                name = frame.get("qualname") or frame.get("function")
                line = frame.get("line")
                lines = frames_of_pid.setdefault((frame.get("file"), name), set())
                if isinstance(line, int):
                    lines.add(line)
        return out

    # --- public queries -------------------------------------------------------------------
    def leaks(self, exclude: list[str] | None = None) -> pd.DataFrame:
        """Leaked fd lifetimes (see DESIGN "What counts as a leak"), minus excluded sites."""
        leaks = self.fds[self.fds["leak"]]
        if exclude:
            leaks = leaks[~_excluded(leaks, exclude)]
        return leaks

    # --- short-lived children (cmtrace.analysis.children) -----------------------------------
    @cached_property
    def lifespans(self) -> pd.DataFrame:
        """Per process forked during the trace: pid, forked_ns, exited_ns (NaN: not seen to
        exit), from its fd lifetimes (cmtrace.analysis.children.lifespans)."""
        return lifespans(self.fds, self.child_pids)

    def short_lived(self, seconds: float = SHORT_LIVED_S) -> pd.Series:
        """Which fd lifetimes are a short-lived child's: a process forked during the trace that
        exited less than `seconds` later (aligned with `fds`). Reports list its leaks apart."""
        return self.fds["pid"].isin(short_lived_pids(self.lifespans, seconds))

    def short_lived_leaks(
        self, seconds: float = SHORT_LIVED_S, exclude: list[str] | None = None
    ) -> pd.DataFrame:
        """The leaks of short-lived children (see short_lived), minus excluded sites."""
        leaks = self.leaks(exclude)
        return leaks[self.short_lived(seconds).loc[leaks.index].to_numpy()]

    def stack(self, stack_id: int) -> list[dict]:
        return [f.as_dict() for f in self.frames.get(int(stack_id), [])]

    def user_stack(self, stack_id: int) -> list[dict]:
        """The opening stack trimmed to user code (all frames when none is user code)."""
        frames = self.frames.get(int(stack_id), [])
        user = [f for f in frames if f.is_user]
        return [f.as_dict() for f in (user or frames)]

    def sites(
        self, exclude: list[str] | None = None, keep: pd.Series | np.ndarray | None = None
    ) -> pd.DataFrame:
        """Per opening site: opened, closed, leaked, leak rate, most common cause, kinds, paths.

        Sites in order of leaks, leak rate and opened fds (ties: order of first opening).
        `keep`: only the fds it marks count (a mask over `fds`, e.g. `~short_lived()`).
        """
        fds = self.fds
        chosen = ~(fds["preexisting"] | fds["inherited"]).to_numpy()
        if keep is not None:
            chosen &= np.asarray(keep, dtype=bool)
        if exclude:
            chosen &= ~_excluded(fds, exclude).to_numpy()
        rows = np.flatnonzero(chosen)
        if not len(rows):
            return pd.DataFrame(columns=SITE_TABLE_COLUMNS)
        site, table = _site_groups(fds, rows)
        count = len(table)
        leak = fds["leak"].to_numpy()[rows]
        table["opened"] = np.bincount(site, minlength=count)
        table["opened"] += self._counted_per_site(rows, site, count)  # --aggregate: never leaks
        table["leaked"] = np.bincount(site[leak], minlength=count)
        table["closed"] = table["opened"] - table["leaked"]
        table["leaks_per_s"] = table["leaked"] / self.duration_s
        born = pd.Series(fds["born_ns"].to_numpy()[rows]).groupby(site)
        table["first_ns"], table["last_ns"] = born.min().to_numpy(), born.max().to_numpy()
        first_with = fds[["with_file", "with_line"]].iloc[rows].groupby(site, sort=False).first()
        table["with_file"] = first_with["with_file"].array
        table["with_line"] = first_with["with_line"].array
        causes = _top_values(site[leak], count, fds["cause"].array[rows[leak]], 1)
        table["cause"] = pd.Series([c[0] if c else None for c in causes], dtype=object)
        kinds = _top_values(site, count, fds["kind"].array[rows], 1)
        table["kind"] = pd.Series([k[0] if k else None for k in kinds])  # inferred, as before
        table["paths"] = _top_values(site, count, fds["path"].array[rows], 3)
        for column in ("api", "service"):  # the leaks' most common, else all the fds'
            top = _top_values(site[leak], count, fds[column].array[rows[leak]], 1)
            every = _top_values(site, count, fds[column].array[rows], 1)
            table[column] = pd.Series([(t or e or [None])[0] for t, e in zip(top, every)],
                                      dtype=object)  # fmt: skip
        table = table.sort_values(["leaked", "leaks_per_s", "opened"], ascending=False)
        return table.reset_index(drop=True)[SITE_TABLE_COLUMNS]

    def warnings(self) -> list[dict]:
        """Finalizer closes during normal running: like ResourceWarning, with the opening line."""
        fds = self.fds
        finalized = fds[(fds["death"] == "finalizer") & ~fds["leak"]]
        counted = self._counted_finalizers()
        out = []
        keys = ["site_file", "site_line", "site_function"]
        for (file, line, function), group in finalized.groupby(keys, dropna=False):
            out.append(
                {
                    "kind": "finalizer-close",
                    "site": _site_dict(file, line, function),
                    "count": int(len(group)) + counted.get((file, line, function), 0),
                }
            )
        return sorted(out, key=lambda w: -w["count"])

    # --- --aggregate (cmtrace.analysis.aggregate) -------------------------------------------
    @property
    def aggregate(self) -> dict[str, Any] | None:
        """meta.json's --aggregate facts (min_age_s, map sizes, full counts); None: full
        history. Aggregated, `fds`, `leaks()` and `live_fds(at=)` hold only the fds recorded
        in full; `sites()` and `warnings()` count the counted ones too (aggregate_limits)."""
        return aggregate_meta(self.meta)

    def aggregate_limits(self) -> list[str]:
        """What this trace cannot answer because it was aggregated (empty: full history)."""
        facts = self.aggregate
        return limits(facts) if facts else []

    @cached_property
    def counters(self) -> pd.DataFrame:
        """--aggregate: fds counted per (pid, open stack, close stack) (schema.COUNTERS), with
        `death` refined from the close stack as for recorded closes (exit, close, finalizer)."""
        counters = read_counters(self.path)
        deaths = pd.DataFrame({
            "death": pd.Categorical([schema.OP_CLOSE] * len(counters)),
            "close_stack": counters["close_stack"].to_numpy(),
        })  # fmt: skip
        self._refine_deaths(deaths)
        counters["death"] = deaths["death"].astype(str).to_numpy()
        return counters

    def _counted_per_site(self, rows: np.ndarray, site: np.ndarray, count: int) -> np.ndarray:
        if self.aggregate is None:
            return np.zeros(count, np.int64)
        stacks = self.fds["open_stack"].to_numpy()[rows]
        counters = self.counters  # only the processes of `rows` (reports split by process)
        counters = counters[counters["pid"].isin(np.unique(self.fds["pid"].to_numpy()[rows]))]
        return counted_per_group(counters, stacks, site, count)

    def _counted_finalizers(self) -> dict[tuple, int]:
        """--aggregate: counted finalizer closes per (site file, line, function)."""
        if self.aggregate is None or self.counters.empty:
            return {}
        counters = self.counters
        per_stack = counters[counters["death"] == "finalizer"].groupby("stack_id")["closed"].sum()
        fds = self.fds
        sites = fds.drop_duplicates("open_stack").set_index("open_stack")[SITE_COLUMNS]
        out: dict[tuple, int] = {}
        for stack, n in per_stack.items():
            if stack in sites.index:
                key = tuple(sites.loc[stack].tolist())
                out[key] = out.get(key, 0) + int(n)
        return out

    def live_fds(self, at: int) -> pd.DataFrame:
        """The fd table at `at` ns since trace start: lifetimes born at or before it, not dead.
        On an aggregated trace, fds that lived less than its min_age and were counted are not
        in it (aggregate_limits says so)."""
        fds = self.fds
        died = fds["died_ns"].astype("float64")
        alive = (fds["born_ns"] <= at) & (died.isna() | (died > at))
        return fds[alive.to_numpy()]

    def timeline(
        self, by: str = "site", freq: str = "100ms", leaks_only: bool = False
    ) -> pd.DataFrame:
        """Live fd counts over time, one column per site (or kind/pid/path), one row per bin.
        Aggregated, the counted fds are added from the counter rows (once a second): their
        expected share of each bin (cmtrace.analysis.aggregate.counted_timeline)."""
        keep = ~(self.fds["preexisting"] | self.fds["inherited"])
        if leaks_only:
            keep &= self.fds["leak"]
        wanted = ["born_ns", "died_ns", *(["site_file", "site_line"] if by == "site" else [by])]
        fds = self.fds.loc[keep, wanted]  # only the columns counted: millions of rows
        codes, names = _label_codes(fds, by)
        step = pd.Timedelta(freq).value
        bins = int(self.end_ns // step) + 1
        born_bin = np.clip(fds["born_ns"].to_numpy() // step, 0, bins - 1).astype(np.int64)
        died = fds["died_ns"].astype("float64").to_numpy()
        died_bin = np.where(np.isnan(died), bins, np.ceil(np.nan_to_num(died) / step))
        died_bin = np.clip(died_bin.astype(np.int64), 0, bins)
        ncols = max(len(names), 1)
        size = (bins + 1) * ncols  # counts per (bin, label)
        # One (bins + 1) x labels table, changed in place: with 10^5 sites it is
        # hundreds of MB, and a difference, a cumsum and the DataFrame would each copy it.
        live = np.bincount(born_bin * ncols + codes, minlength=size)
        np.subtract.at(live, died_bin * ncols + codes, 1)  # no second table (numpy >= 1.25: fast)
        live = live.reshape(bins + 1, ncols)
        np.cumsum(live, axis=0, out=live)
        live = live[:bins]
        if self.aggregate is not None and not leaks_only:  # the counted fds (never leaks)
            stacks = self.fds.loc[keep, "open_stack"].to_numpy()
            counted = counted_timeline(self.counters, label_of_stacks(stacks, codes), step, bins,
                                       ncols)  # fmt: skip
            live = live + np.rint(counted).astype(np.int64)
        index = pd.to_timedelta(np.arange(bins) * step, unit="ns")
        return pd.DataFrame(live[:, : len(names)], index=index, columns=list(names), copy=False)


def count_reasons(reasons: list[str]) -> str:
    """Reasons given per process, counted per kind on one short line, the most common first:
    `exited before its interpreter was read (394 processes); not CPython (1 process)`. A reason
    naming its process (`pid 12 exited...`) is counted with the others of its kind; one saying
    the process was gone when it was read (_GONE) is `exited before...`, whatever was being
    read; a long one is cut to its head (`layout mismatch: walking ... failed: ...` ->
    `layout mismatch`): meta.json keeps each process's whole text."""
    counts: dict[str, int] = {}
    for reason in reasons:
        kind = reason_kind(reason)
        counts[kind] = counts.get(kind, 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    if len(ranked) == 1 and ranked[0][1] == 1:
        return ranked[0][0]
    return "; ".join(f"{kind} ({n} process{'es' if n != 1 else ''})" for kind, n in ranked)


def reason_kind(reason: str) -> str:
    """The kind under which count_reasons counts one process's reason."""
    if _GONE.search(reason):
        return GONE_KIND
    kind = _PROC_PATH.sub("/proc/PID/", _PID_IN_REASON.sub("", reason)).strip(" :;,") or reason
    if len(kind) > REASON_KIND_MAX and ": " in kind:
        kind = kind.split(": ", 1)[0]
    return kind


# What a reader of /proc/PID/... or the process's memory says of a process that has exited:
# a short-lived child gone before cmtrace read its interpreter (a test suite makes hundreds).
_GONE = re.compile(
    r"No such process|/proc/\d+/\S*: No such file or directory|"
    r"target's memory: No such file or directory"
)
GONE_KIND = "exited before its interpreter was read"
REASON_KIND_MAX = 70
_PID_IN_REASON = re.compile(r"\b(?:pid|process)\s+\d+\b")
_PROC_PATH = re.compile(r"/proc/\d+/")  # `cannot read /proc/25659/exe: ...`, one per child


def _services(fds: pd.DataFrame) -> pd.Categorical:
    """What each socket's peer probably is (cmtrace.analysis.services), decided once per
    distinct address."""
    sockets = np.flatnonzero((fds["kind"] == "socket").to_numpy())
    services: np.ndarray = np.full(len(fds), None, dtype=object)
    if len(sockets):
        number, paths = pd.factorize(fds["path"].to_numpy(dtype=object)[sockets])
        named = np.array([service_of("socket", p) for p in paths] + [None], dtype=object)
        services[sockets] = named[number]  # number -1 (no address) reads the last entry
    return pd.Categorical(services)


def fill_text(series: pd.Series, value: str) -> pd.Series:
    """fillna for text columns, categorical or not."""
    if isinstance(series.dtype, pd.CategoricalDtype) and value not in series.cat.categories:
        series = series.cat.add_categories([value])
    return series.fillna(value)


def _site_groups(
    fds: pd.DataFrame, rows: np.ndarray | None = None
) -> tuple[np.ndarray, pd.DataFrame]:
    """(site number of each row, the sites' SITE_COLUMNS) for `rows` (all rows when None).

    The one grouping of lifetimes by opening site. Sites are numbered in order of first
    appearance and filled (NO_STACK, line 0, function ""). A site is a function of the opening
    stack (_add_sites), so rows are grouped by hashing open_stack, one column of a few thousand
    distinct values, rather than three columns over millions of rows; and of the site file where
    `python -c` programs were told apart (children.name_programs: one `<string>` stack, one
    site per program).
    """
    stacks = fds["open_stack"].to_numpy()
    picked = np.arange(len(fds)) if rows is None else rows
    stack_number, distinct = pd.factorize(stacks[picked])
    site_files = fds["site_file"]
    if any(map(is_program_file, site_files.cat.categories)):
        file_code = np.asarray(site_files.cat.codes, dtype=np.int64)[picked] + 1
        pairs = stack_number.astype(np.int64) * (len(site_files.cat.categories) + 1) + file_code
        stack_number = pd.factorize(pairs)[0]
    # Numbers are given in order of first appearance: the running maximum rises exactly there.
    first_row = np.flatnonzero(np.diff(np.maximum.accumulate(stack_number), prepend=-1) > 0)
    sample = fds.iloc[picked[first_row]]
    files = fill_text(sample["site_file"], NO_STACK)
    functions = fill_text(sample["site_function"], "")
    keys = list(zip(files, sample["site_line"].fillna(0).astype(int), functions))
    number: dict[tuple, int] = {}
    site_of_stack = np.array([number.setdefault(k, len(number)) for k in keys], dtype=np.int64)
    table = pd.DataFrame(list(number), columns=SITE_COLUMNS)
    for column, filled in (("site_file", files), ("site_function", functions)):
        table[column] = pd.Categorical(table[column], categories=filled.cat.categories)
    return site_of_stack[stack_number], table


def _top_values(site: np.ndarray, count: int, values: pd.Categorical, n: int) -> list[list]:
    """The n most common values of a categorical column per site (ties in alphabetical
    order), as lists, counted on the categorical codes (no strings built per row)."""
    codes = np.asarray(values.codes, dtype=np.int64)
    names = np.asarray(values.categories.astype(str), dtype=object)
    width = max(len(names), 1)
    known = codes >= 0
    counts = pd.Series(site[known].astype(np.int64) * width + codes[known]).value_counts()
    pairs = counts.index.to_numpy()
    where, code, count_of = pairs // width, pairs % width, counts.to_numpy()
    alphabetical: np.ndarray = np.empty(width, dtype=np.int64)
    alphabetical[np.argsort(names.astype(str), kind="stable")] = np.arange(len(names))
    order = np.lexsort((alphabetical[code], -count_of, where))  # by site, count, name
    where, code = where[order], code[order]
    starts = np.flatnonzero(np.diff(where, prepend=-1) != 0)
    rank = np.arange(len(where)) - np.repeat(starts, np.diff(np.append(starts, len(where))))
    kept = rank < n  # only the top n of each site become Python strings
    out: list[list] = [[] for _ in range(count)]
    for site_number, name in zip(where[kept].tolist(), names[code[kept]].tolist()):
        out[site_number].append(name)
    return out


def _op_codes(table: pa.Table) -> tuple[np.ndarray, list[str]]:
    column = table.column("op")
    if not pa.types.is_dictionary(column.type):
        column = column.dictionary_encode()
    if column.num_chunks == 0:
        return np.zeros(0, dtype=np.int32), []
    names = column.chunk(0).dictionary.to_pylist()
    codes = pa.chunked_array([c.indices.cast(pa.int32()) for c in column.chunks], pa.int32())
    return codes.fill_null(-1).to_numpy(), names


def _numbers(part: pa.Table, name: str) -> np.ndarray:
    """A numeric column as float64, NaN for nulls (and everywhere when the part lacks it)."""
    if name not in part.column_names:
        nothing: np.ndarray = np.full(part.num_rows, np.nan)
        return nothing
    numbers: np.ndarray = part.column(name).to_numpy(zero_copy_only=False)
    return numbers.astype(np.float64, copy=False)


def _index_of(names: list[str], value: str) -> int:
    return names.index(value) if value in names else -2


def _label_codes(fds: pd.DataFrame, by: str) -> tuple[np.ndarray, list[str]]:
    """A code per row and the sorted labels they index: "file:line" per site (each label made
    once per distinct site, not once per row), else the column's text."""
    if by != "site":
        codes, names = pd.factorize(fds[by].astype(str), sort=True)
        return codes.astype(np.int64), list(names)
    file_codes, files = pd.factorize(fill_text(fds["site_file"], NO_STACK).astype(str))
    lines = fds["site_line"].fillna(0).astype(np.int64).to_numpy()
    width = int(lines.max(initial=0)) + 1
    numbers, pairs = pd.factorize(file_codes.astype(np.int64) * width + lines)
    labels = [f"{files[k // width]}:{k % width}" for k in pairs]
    order = np.argsort(np.array(labels, dtype=object), kind="stable")
    rank: np.ndarray = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return rank[numbers], [labels[i] for i in order]


def _site_dict(file: object, line: Any, function: object) -> dict | None:
    if file is None or (isinstance(file, float) and np.isnan(file)):
        return None
    return {"function": function, "file": file, "line": int(line)}


def read_exclude_file(path: str | Path) -> list[str]:
    """Site patterns, one a line (`myapp/db.py:Pool.*`, `*/logging/*`, `app.py:42`); # comments."""
    from cmtrace.errors import UsageError

    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise UsageError(
            f"cannot read exclude file {path} ({exc.strerror}): check the path"
        ) from None
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def site_matches(pattern: str, file: str | None, line: Any, function: str | None) -> bool:
    """Does a site match an exclude pattern `FILE[:FUNCTION_OR_LINE]` (shell-style globs)?"""
    file_pat, _, rest = pattern.partition(":")
    file = file if isinstance(file, str) else NO_STACK
    function = function if isinstance(function, str) else ""
    if not (fnmatch.fnmatch(file, file_pat) or fnmatch.fnmatch(file, "*/" + file_pat)):
        return False
    if not rest:
        return True
    if rest.isdigit():
        return line is not None and not pd.isna(line) and int(line) == int(rest)
    return fnmatch.fnmatch(function, rest)


def _excluded(fds: pd.DataFrame, patterns: list[str]) -> pd.Series:
    """Which rows' sites match an exclude pattern (decided once per distinct site)."""
    if fds.empty:
        return pd.Series(False, index=fds.index, dtype=bool)
    site, sites = _site_groups(fds)
    hit = np.array(
        [any(site_matches(p, *key) for p in patterns) for key in sites.itertuples(index=False)],
        dtype=bool,
    )
    return pd.Series(hit[site], index=fds.index, dtype=bool)
