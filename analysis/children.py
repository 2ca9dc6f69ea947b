"""Short-lived children and the programs they ran (issue 13).

A test suite or a pre-fork server starts many processes that live a moment (`python -c`
snippets, subprocess helpers); the fds they leave open die with them. Reports list those leaks
apart, after the long-lived processes' own: a short-lived child is a process forked during
the trace that exited less than `seconds` after its fork.

A `python -c` program's frames all say `<string>`: the recorder captures the `-c` argument of
each process (cmtrace.trace.sources.command_program) and stores its text as a source file of its
own, `<string>#DIGEST`, whose facts list the pids that ran it. Sites in `<string>` of those pids
are named by that file, so each program is a site of its own and shows its line.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cmtrace.analysis.apis import call_api
from cmtrace.analysis.code import SourceIndex
from cmtrace.analysis.stacks import Stacks
from cmtrace.trace.sources import COMMAND_FILE

SHORT_LIVED_S = 1.0  # default of `cmtrace report --short-lived S`


def lifespans(fds: pd.DataFrame, children: set[int]) -> pd.DataFrame:
    """Per child forked during the trace: pid, forked_ns, exited_ns (NaN when its exit is not
    known: still running at the end), read off its fd lifetimes rather than the events again
    (a test suite's trace has hundreds of parts): a child's inherited fds are born at its fork,
    and whatever it holds at its exit dies there (`process-exit`). A child that inherited
    nothing, or held nothing at its exit, has no span here: it is never short-lived, and one
    that held nothing left nothing to its exit anyway."""
    of_child = fds["pid"].isin(children).to_numpy()
    inherited = fds.loc[of_child & fds["inherited"].to_numpy(), ["pid", "born_ns"]]
    at_exit = fds.loc[of_child & (fds["death"] == "process-exit").to_numpy(), ["pid", "died_ns"]]
    forked = inherited.groupby("pid")["born_ns"].min().rename("forked_ns")
    exited = at_exit["died_ns"].astype("float64").groupby(at_exit["pid"]).max().rename("exited_ns")
    spans = pd.concat([forked, exited], axis=1, join="outer").dropna(subset=["forked_ns"])
    spans = spans.rename_axis("pid").reset_index()
    return spans.astype({"pid": np.int64, "forked_ns": np.int64, "exited_ns": np.float64})


def short_lived_pids(spans: pd.DataFrame, seconds: float) -> set[int]:
    """The children that exited less than `seconds` after their fork."""
    lived = spans["exited_ns"] - spans["forked_ns"]
    return set(spans.loc[lived.notna() & (lived < seconds * 1e9), "pid"].astype(int).tolist())


def program_files(src: SourceIndex) -> dict[int, str]:
    """pid -> the source file holding the `-c` program it ran (as the recorder stored it)."""
    out: dict[int, str] = {}
    for file, facts in src.facts.items():
        if is_program_file(file):
            out.update((int(pid), file) for pid in facts.get("pids") or ())
    return out


def program_text(src: SourceIndex, file: str) -> str:
    """The whole text of a captured program, as stored."""
    lines: list[str] = []
    while (line := src.text(file, len(lines) + 1)) is not None:
        lines.append(line)
    return "\n".join(lines)


def name_program_apis(fds: pd.DataFrame, src: SourceIndex) -> dict[int, str]:
    """The api of fds opened at a program's line, where its `<string>` frame could not tell it:
    the callable named on that line of the captured text (in place). Returns open stack ->
    api for the stacks whose rows all name one (the causes' fixes are made per stack)."""
    rows = np.flatnonzero(
        fds["site_file"].map(is_program_file).to_numpy(dtype=bool) & fds["api"].isna().to_numpy()
    )
    if not len(rows):
        return {}
    files = fds["site_file"].to_numpy()[rows]
    lines = fds["site_line"].to_numpy()[rows]
    named = {key: call_api(src, *key) for key in set(zip(files.tolist(), lines.tolist()))}
    apis = [named[key] for key in zip(files.tolist(), lines.tolist())]
    new = sorted({a for a in apis if a} - set(fds["api"].cat.categories))
    if new:
        fds["api"] = fds["api"].cat.add_categories(new)
    fds.iloc[rows, fds.columns.get_loc("api")] = apis
    per_stack: dict[int, set[str | None]] = {}
    for stack, api in zip(fds["open_stack"].to_numpy()[rows].tolist(), apis):
        per_stack.setdefault(int(stack), set()).add(api)
    agreed = {stack: next(iter(one)) for stack, one in per_stack.items() if len(one) == 1}
    return {stack: api for stack, api in agreed.items() if api is not None}


def name_programs(fds: pd.DataFrame, programs: dict[int, str], stacks: Stacks) -> None:
    """Site files `<string>` of processes whose `-c` program was captured become that
    program's file (in place): each program a site of its own, with its text. Only stacks that
    start in `<string>` run the program: code that site.py exec()s from a `.pth` file says
    `<string>` too, above site's frames."""
    if not programs or "site_file" not in fds:
        return
    files = fds["site_file"]
    rows = np.flatnonzero((files == COMMAND_FILE).to_numpy() & fds["pid"].isin(programs).to_numpy())
    rows = rows[_starts_in_program(stacks, fds["open_stack"].to_numpy()[rows])]
    if not len(rows):
        return
    named = fds["pid"].to_numpy()[rows]
    new = sorted(set(programs.values()) - set(files.cat.categories))
    fds["site_file"] = files.cat.add_categories(new) if new else files
    column = fds.columns.get_loc("site_file")
    fds.iloc[rows, column] = [programs[int(pid)] for pid in named.tolist()]


def _starts_in_program(stacks: Stacks, stack_ids: np.ndarray) -> np.ndarray:
    """Whether each stack's outermost frame is in `<string>` (a -c program's module)."""
    where = stacks.positions(stack_ids)
    found = where >= 0
    outer = stacks.starts[np.where(found, where, 0) + 1] - 1
    codes = stacks.row_frame[outer] if len(stacks.row_frame) else np.zeros(0, np.int64)
    files = np.asarray(stacks.frame_text["file"], dtype=object)
    starts: np.ndarray = found & (files[codes] == COMMAND_FILE) if len(codes) else found
    return starts


def is_program_file(file: object) -> bool:
    """Is this a `python -c` program's file as name_programs names it?"""
    return isinstance(file, str) and file.startswith(COMMAND_FILE + "#")
