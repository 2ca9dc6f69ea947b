"""--cmtrace-fail's explanation while the session runs: the opening line and cause of a leaked
fd, read from the trace being written, once the recorder has passed the test's end marker.

Only a leaking test waits (the recorder writes a part every FLUSH_INTERVAL, 0.5 s; at most
WAIT_S here). Anything unreadable (the trace is root's under sudo, the wait ran out) leaves
the failure without the explanation, which the section after the session gives anyway.
"""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

from cmtrace.pytest_plugin.boundaries import seq_of_marker
from cmtrace.trace import schema

WAIT_S = 2.0
POLL_S = 0.05
COLUMNS = ("t_ns", "pid", "op", "syscall", "fd", "src_fd", "path", "stack_id")
PAIR_SYSCALLS = ("pipe", "pipe2", "socketpair")  # births of two fds: fd and src_fd


class LiveTrace:
    """The events of a trace being recorded, read a new part at a time."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.read: set[Path] = set()
        self.markers: dict[tuple[int, int], int] = {}  # (pid, seq) -> t_ns
        self.births: list = []  # DataFrames of birth rows, one per part

    def refresh(self) -> None:
        from cmtrace.trace.reader import event_parts, read_event_part  # noqa: PLC0415 (pyarrow)

        for file in event_parts(self.path)[1]:
            if file in self.read:
                continue
            part = read_event_part(file, COLUMNS).to_pandas()
            self.read.add(file)
            op = part["op"].astype(object)
            for pid, path, t in part.loc[op == schema.OP_FAIL, ["pid", "path", "t_ns"]].itertuples(
                index=False
            ):
                seq = seq_of_marker(path)
                if seq is not None:
                    self.markers[(int(pid), seq)] = int(t)
            self.births.append(part[op == schema.OP_BIRTH])

    def wait_for(self, pid: int, seq: int, timeout: float = WAIT_S) -> int | None:
        """t_ns of marker `seq` of `pid` once it is written (None if not within timeout)."""
        self.refresh()  # the first read imports pyarrow: not counted in the wait
        deadline = time.monotonic() + timeout
        while True:
            if (pid, seq) in self.markers or time.monotonic() > deadline:
                return self.markers.get((pid, seq))
            time.sleep(POLL_S)
            self.refresh()

    def opening_stacks(self, pid: int, fds: set[int], since: int, until: int) -> dict[int, int]:
        """fd -> stack id of its last birth in pid between two times."""
        out: dict[int, tuple[int, int]] = {}
        for part in self.births:
            rows = part[(part["pid"] == pid) & (part["t_ns"] >= since) & (part["t_ns"] <= until)]
            for t, syscall, fd, peer, stack in rows[
                ["t_ns", "syscall", "fd", "src_fd", "stack_id"]
            ].itertuples(index=False):
                created = [int(fd)] + ([int(peer)] if str(syscall) in PAIR_SYSCALLS else [])
                for number in created:
                    if number in fds and (number not in out or out[number][0] <= t):
                        out[number] = (int(t), int(stack))
        return {fd: stack for fd, (_, stack) in out.items()}


def explain(trace_dir: str, pid: int, fds: set[int], begin_seq: int, end_seq: int) -> dict:
    """fd -> lines saying where and why it was opened (empty when the trace cannot tell yet)."""
    from cmtrace.analysis.causes import Context, classify  # noqa: PLC0415 (pandas)
    from cmtrace.analysis.code import SourceIndex, innermost_user  # noqa: PLC0415
    from cmtrace.analysis.stacks import Stacks  # noqa: PLC0415

    live = LiveTrace(trace_dir)
    until = live.wait_for(pid, end_seq)
    since = live.markers.get((pid, begin_seq))
    if until is None or since is None:
        return {}
    stacks = live.opening_stacks(pid, fds, since, until)
    frames_of = Stacks(Path(trace_dir))
    deadline = time.monotonic() + WAIT_S
    # A stack's frames are written once its code objects are read: the first time a code
    # path runs, a flush after its events.
    while any(not frames_of.get(s) for s in stacks.values()) and time.monotonic() < deadline:
        time.sleep(POLL_S * 4)
        frames_of = Stacks(Path(trace_dir))
    src = SourceIndex(local_fallback=True)
    out = {}
    for fd, stack in stacks.items():
        frames = frames_of.get(stack, [])
        site = innermost_user(frames) or (frames[0] if frames else None)
        if site is None:
            continue
        verdict = classify(frames, src, Context())
        text = (src.text(site.file, site.line) or "").strip()
        out[fd] = [
            f"opened at {site.file}:{site.line} in {site.qualname or site.function}",
            *([f"{site.line:>6} | {text}"] if text else []),
            f"cause: {verdict.cause}",
            *wrapped("fix: ", verdict.fix),
        ]
    return out


def wrapped(head: str, text: str, width: int = 90) -> list[str]:
    lines = textwrap.wrap(str(text), width - len(head), break_on_hyphens=False) or [""]
    return [head + lines[0]] + [" " * len(head) + line for line in lines[1:]]
