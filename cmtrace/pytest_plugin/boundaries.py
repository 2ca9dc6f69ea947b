"""The recorded pytest's side: phase boundaries the recorder sees, and the in-process fd diff.

A boundary is a failing `os.open` of MARKER_DIR/<seq>: /dev/null is no directory, so the call
fails with ENOTDIR at once, and the recorder logs it as a failed birth of this pid, in order with
every fd event, whatever the backend. What the seq means (test, phase, fixture) goes to a side
file of this process, MARKS_ENV/marks-<pid>.jsonl, opened before any test runs so its writes
create no fd inside a window.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

MARKER_DIR = "/dev/null/.cmtrace"  # never a directory: every open below it fails at once
MARKS_ENV = "CMTRACE_PYTEST_MARKS"  # set by the parent: the directory of the side files
TRACE_ENV = "CMTRACE_PYTEST_TRACE"  # set by the parent: the trace being recorded
BEGIN, END = "begin", "end"


def marker_path(seq: int) -> str:
    return f"{MARKER_DIR}/{seq}"


def seq_of_marker(path: str) -> int | None:
    """The seq of a marker path, None for any other path."""
    prefix = MARKER_DIR + "/"
    if not isinstance(path, str) or not path.startswith(prefix):
        return None
    tail = path[len(prefix) :]
    return int(tail) if tail.isdigit() else None


class Marks:
    """This process's boundary log: each `mark` is one failed open plus one side-file line."""

    def __init__(self, directory: str | Path, worker: str | None):
        self.pid = os.getpid()
        self.worker = worker
        self.seq = 0
        path = Path(directory) / f"marks-{self.pid}.jsonl"
        self.out: IO[str] = open(path, "a", buffering=1)  # noqa: SIM115 (open for the session)

    def mark(self, edge: str, **what: Any) -> int:
        """One boundary: `edge` is BEGIN or END; `what` says of which window (kind, nodeid,
        phase, fixture, scope, instance)."""
        self.seq += 1
        self.write({"seq": self.seq, "pid": self.pid, "worker": self.worker, "edge": edge, **what})
        try:
            os.open(marker_path(self.seq), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            pass  # the point: a failed birth, logged with its path by the recorder
        else:  # pragma: no cover - only if /dev/null were a directory
            raise RuntimeError(f"{MARKER_DIR} is a directory: phase markers would open fds")
        return self.seq

    def write(self, record: dict) -> None:
        """A side-file line (marks and per-test facts such as the outcome)."""
        self.out.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self.out.close()


FdKey = tuple[int, int, int]  # (fd, st_dev, st_ino): an fd number reused for another file differs


def open_fds() -> dict[FdKey, str]:
    """This process's fds now, each with what it refers to (readlink of /proc/self/fd/N)."""
    out: dict[FdKey, str] = {}
    listing = os.listdir("/proc/self/fd")
    for name in listing:
        fd = int(name)
        try:
            st = os.fstat(fd)
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the listing's own directory fd, closed by now
        out[(fd, st.st_dev, st.st_ino)] = target
    return out


@dataclass
class FdLedger:
    """The in-process verdict: fds that appeared during a window and are still open after it.

    fds that wider-scoped fixtures opened are theirs, not the tests' in whose setup the fixture
    happened to be set up."""

    fixture_fds: set[FdKey] = field(default_factory=set)

    def new_since(self, before: dict[FdKey, str]) -> dict[FdKey, str]:
        now = open_fds()
        return {k: v for k, v in now.items() if k not in before and k not in self.fixture_fds}

    def claim_for_fixture(self, before: dict[FdKey, str]) -> None:
        self.fixture_fds.update(self.new_since(before))

    def release_fixture(self, keys: set[FdKey]) -> None:
        self.fixture_fds.difference_update(keys)
