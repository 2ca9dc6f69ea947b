"""Which processes one recording traces, and the ones that join it while it records.

`-p PID[,PID...]` names targets; `--pgrep PATTERN` takes every process whose command line
matches (as `pgrep -f`) and `--all` every CPython process, at attach and later: /proc is
scanned every POLL_INTERVAL_S for processes that started (or exec'd into a match) since. A
process found that way is traced from then on; what it had open before is its pre-existing
snapshot, never a leak. cmtrace itself, the processes it runs under (sudo, a shell) and its
own children (the ptrace engine) are never targets.

The Watchlist also reads each watched process's RLIMIT_NOFILE when it joins and about once a
second after, keeping every change with its time (meta.json `rlimit_nofile`).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cmtrace.errors import CmtraceError, UsageError
from cmtrace.record import procfs, spawn

if TYPE_CHECKING:
    from cmtrace.record.options import RecordOptions
    from cmtrace.record.session import Recording

POLL_INTERVAL_S = 0.5  # /proc scanned for new --pgrep / --all matches this often
RLIMIT_INTERVAL_S = 1.0  # RLIMIT_NOFILE re-read this often
NAMES_SHOWN = 4  # the attached line names this many targets, then counts the rest


# ---- parsing ------------------------------------------------------------------------------------


def parse_pids(values: Iterable[str]) -> tuple[int, ...]:
    """`-p 12,13 -p 14` -> (12, 13, 14): in order, each once."""
    pids: list[int] = []
    for value in values:
        for word in value.split(","):
            word = word.strip()
            if not word.isdigit() or int(word) <= 0:
                raise UsageError(f"-p {value}: give process ids, e.g. -p 1234 or -p 1234,1240")
            if int(word) not in pids:
                pids.append(int(word))
    return tuple(pids)


def compile_pattern(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise UsageError(f"--pgrep {pattern!r}: not a regular expression ({exc})") from None


def command_line_text(raw: bytes) -> str:
    """/proc/PID/cmdline as pgrep -f matches it: the arguments joined by spaces."""
    return raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")


def cmdline_matches(pattern: re.Pattern[str], raw: bytes | None) -> bool:
    """pgrep -f: the pattern is found anywhere in the command line (empty ones never match:
    kernel threads and zombies)."""
    return bool(raw) and pattern.search(command_line_text(raw or b"")) is not None


def python_image(pid: int) -> bool:
    """Runs CPython, as far as a cheap look tells: its executable is a python* image
    (spawn.is_python_image, the kernel's own test) or it maps a libpython (uwsgi, embedders).
    The stack walker's discovery (cmtrace.interp.discover) has the last word on stacks."""
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return False
    if spawn.is_python_image(exe.removesuffix(" (deleted)")):
        return True
    try:
        with open(f"/proc/{pid}/maps") as maps:
            return any("/libpython3" in line for line in maps)
    except OSError:
        return False


# ---- /proc --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Process:
    pid: int
    ppid: int
    start: int  # start time in clock ticks since boot: a reused pid has another
    user_space: bool  # not a kernel thread, not a zombie


def scan() -> dict[int, Process]:
    """Every process /proc lists now."""
    found: dict[int, Process] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = procfs.stat_fields(int(entry))
        except (OSError, IndexError):
            continue
        user = fields[0] not in ("Z", "X") and not int(fields[6]) & procfs.PF_KTHREAD
        found[int(entry)] = Process(int(entry), int(fields[1]), int(fields[19]), user)
    return found


def own_family(processes: dict[int, Process], me: int) -> set[int]:
    """cmtrace, the processes it runs under and its descendants: never targets."""
    family = {me}
    pid = me
    while pid in processes and processes[pid].ppid > 1:
        pid = processes[pid].ppid
        family.add(pid)
    children: dict[int, list[int]] = {}
    for process in processes.values():
        children.setdefault(process.ppid, []).append(process.pid)
    todo = [me]
    while todo:
        for child in children.get(todo.pop(), []):
            family.add(child)
            todo.append(child)
    return family


# ---- the watchlist ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Selector:
    """What makes a process a target when it appears: a --pgrep pattern, or --all's CPython."""

    pattern: re.Pattern[str] | None = None
    all_python: bool = False

    @property
    def active(self) -> bool:
        return self.pattern is not None or self.all_python

    @property
    def found_by(self) -> str:
        return "all" if self.all_python else "pgrep"

    def wants(self, pid: int) -> bool:
        if self.pattern is not None:
            return cmdline_matches(self.pattern, procfs.raw_cmdline(pid))
        return self.all_python and python_image(pid)

    def meta(self) -> dict[str, Any]:
        """What meta.json says about how targets were chosen."""
        if self.pattern is not None:
            return {"pgrep": self.pattern.pattern}
        return {"all_python": True} if self.all_python else {}

    def describe(self) -> str:
        if self.pattern is not None:
            return f"processes matching {self.pattern.pattern!r}"
        return "CPython processes" if self.all_python else "no new processes"


def selector_of(options: RecordOptions) -> Selector:
    pattern = compile_pattern(options.pgrep) if options.pgrep is not None else None
    return Selector(pattern=pattern, all_python=options.all_python)


def first_match(selector: Selector) -> int | None:
    """A process the selector takes now (the backend is chosen by what it allows on one)."""
    processes = scan()
    family = own_family(processes, os.getpid())
    for process in sorted(processes.values(), key=lambda p: p.pid):
        if process.user_space and process.pid not in family and selector.wants(process.pid):
            return process.pid
    return None


@dataclass
class Limit:
    """One process's RLIMIT_NOFILE history: as it joined, then each change with its time."""

    soft: int | None
    hard: int | None
    t_ns: int
    changes: list[dict[str, int | None]] = field(default_factory=list)

    def current(self) -> tuple[int | None, int | None]:
        last = self.changes[-1] if self.changes else {"soft": self.soft, "hard": self.hard}
        return last["soft"], last["hard"]

    def as_meta(self) -> dict[str, Any]:
        return {"soft": self.soft, "hard": self.hard, "t_ns": self.t_ns, "changes": self.changes}


class Watchlist:
    """The targets of one recording: those it started with and those that join, whether any
    still lives, and each watched process's RLIMIT_NOFILE."""

    def __init__(self, rec: Recording, selector: Selector | None = None) -> None:
        self.rec = rec
        self.selector = selector or Selector()
        self.entries: dict[int, dict[str, Any]] = {}  # pid -> its meta.json `targets` entry
        self.limits: dict[int, Limit] = {}
        self.me = os.getpid()
        self.refused: set[tuple[int, int]] = set()  # (pid, start) we could not trace: not again
        self.known: set[tuple[int, int]] = set()  # (pid, start) of every target so far
        self.starts: dict[int, int] = {}
        self.not_python: dict[tuple[int, int], str | None] = {}  # --all: (pid, start) -> exe
        self._next_scan = 0.0
        self._next_limits = 0.0

    def now_ns(self) -> int:
        return time.monotonic_ns() - self.rec.backend.start_ns

    # -- joining
    def note_started(
        self, pids: list[int], found_by: str, cmdline: list[str] | None = None
    ) -> None:
        """Targets traced before recording began (the trace's t_ns 0 onwards)."""
        for pid in pids:
            self._note(pid, found_by, 0, cmdline)
        self._write_meta()

    def _note(self, pid: int, found_by: str, joined_ns: int, cmdline: list[str] | None) -> None:
        self.entries[pid] = {
            "pid": pid, "ns_pid": procfs.ns_pid(pid), "comm": procfs.command_comm(pid, cmdline),
            "cmdline": cmdline or procfs.cmdline(pid), "found_by": found_by,
            "joined_ns": joined_ns,
        }  # fmt: skip
        self._read_limit(pid)
        try:
            self.starts[pid] = int(procfs.stat_fields(pid)[19])
            self.known.add((pid, self.starts[pid]))
        except (OSError, IndexError):
            pass

    def join(self, pid: int, at_start: bool = False) -> bool:
        """Trace a process found while recording (or as it starts: `at_start`, joined_ns 0):
        kernel filter, Python stacks, the snapshot of what it has open (timed now: see
        analysis.processes.preexisting_seed). False when it cannot be traced (gone, or not
        ours to ptrace): it is left alone, and not tried again."""
        rec = self.rec
        pids = list(procfs.descendants(pid)) if rec.follow else [pid]
        try:
            with rec._lock:  # the drain thread calls the backend too
                for each in pids:
                    rec.add_target(each)
        except (CmtraceError, OSError) as exc:
            rec.progress(f"cannot trace {pid} ({procfs.comm(pid)}): {exc}; left alone")
            self.refused.add((pid, _start_of(pid)))
            return False
        rec.root_pids.add(pid)
        rec.snapshot_preexisting(pids)
        self._note(pid, self.selector.found_by, 0 if at_start else self.now_ns(), None)
        self._write_meta()
        if not at_start:
            rec.progress(f"joined {pid} ({rec.describe(pid)}): one of {self.selector.describe()}")
        return True

    def find_new(self) -> list[int]:
        """Processes the selector wants that are not traced yet (nor cmtrace's own)."""
        processes = scan()
        family = own_family(processes, self.me)
        traced = set(self.rec.targets) | set(self.entries)
        new = []
        for process in processes.values():
            key = (process.pid, process.start)
            if (
                not process.user_space
                or process.pid in family
                or key in self.known
                or key in self.refused
                or (process.pid in traced and self.starts.get(process.pid) == process.start)
                or (self.rec.follow and _has_ancestor_in(processes, process.pid, self.entries))
            ):
                continue
            if self._wanted(key):
                new.append(process.pid)
        return sorted(new)

    def _wanted(self, key: tuple[int, int]) -> bool:
        """The selector's verdict; --all's "not Python" is kept while the image is the same
        (reading every process's maps twice a second would cost more than the tracing)."""
        if not self.selector.all_python:
            return self.selector.wants(key[0])
        image = _image(key[0])
        if self.not_python.get(key) == image:
            return False
        if self.selector.wants(key[0]):
            return True
        self.not_python[key] = image
        return False

    # -- while recording (called by the session's watch loop, every few ms)
    def poll(self) -> bool:
        """Join new matches and re-read limits when due; True while a target lives (or, with
        a selector and none found yet, while waiting for the first)."""
        now = time.monotonic()
        if self.selector.active and now >= self._next_scan:
            self._next_scan = now + POLL_INTERVAL_S
            for pid in self.find_new():
                self.join(pid)
        if now >= self._next_limits:
            self._next_limits = now + RLIMIT_INTERVAL_S
            self.poll_limits()
        if self.selector.all_python:
            return True  # --all watches the host until --duration or a stop signal
        if not self.entries:
            return self.selector.active  # --pgrep: waiting for the first match
        return any(procfs.is_alive(pid) for pid in self.entries)

    def poll_limits_only(self) -> bool:
        """`run`: the limits when due (the command's end is the Command's to tell: it reaps
        it); always False."""
        now = time.monotonic()
        if now >= self._next_limits:
            self._next_limits = now + RLIMIT_INTERVAL_S
            self.poll_limits()
        return False

    def poll_limits(self) -> None:
        """Read RLIMIT_NOFILE of each live target and Python process; keep what changed."""
        changed = False
        for pid in {*self.entries, *self.rec.targets}:
            changed |= self._read_limit(pid)
        if changed:
            self._write_meta()

    def _read_limit(self, pid: int) -> bool:
        value = procfs.rlimit_nofile(pid)
        if value is None:
            return False
        soft, hard = value
        known = self.limits.get(pid)
        if known is None:
            self.limits[pid] = Limit(soft, hard, self.now_ns())
            return True
        if known.current() == (soft, hard):
            return False
        known.changes.append({"t_ns": self.now_ns(), "soft": soft, "hard": hard})
        return True

    def _write_meta(self) -> None:
        if self.rec.writer is None:
            return
        self.rec.writer.write_meta(
            targets=list(self.entries.values()),
            rlimit_nofile={str(pid): limit.as_meta() for pid, limit in self.limits.items()},
        )

    # -- the attached line
    def attached_line(self) -> str:
        pids = list(self.entries)
        if len(pids) == 1:
            return f"attached to {pids[0]} ({self.rec.describe(pids[0])})"
        if not pids:
            return (
                f"attached: waiting for {self.selector.describe()} (/proc is scanned every "
                f"{POLL_INTERVAL_S:g} s; {self.rec.backend_reason})"
            )
        # "attached to pids ...", never "attached to N ...": N would read as a pid
        named = ", ".join(f"{pid} ({procfs.comm(pid)})" for pid in pids[:NAMES_SHOWN])
        more = f" and {len(pids) - NAMES_SHOWN} more" if len(pids) > NAMES_SHOWN else ""
        joining = f"; joining {self.selector.describe()}" if self.selector.active else ""
        return f"attached to pids {named}{more} ({self.rec.backend_reason}{joining})"


def _image(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


def _start_of(pid: int) -> int:
    try:
        return int(procfs.stat_fields(pid)[19])
    except (OSError, IndexError):
        return -1


def _has_ancestor_in(processes: dict[int, Process], pid: int, roots: dict[int, Any]) -> bool:
    """With -f, a descendant of a target is followed already (forked after it joined) or was
    taken with it (procfs.descendants at join)."""
    seen = 0
    while pid in processes and seen < 64:
        pid, seen = processes[pid].ppid, seen + 1
        if pid in roots:
            return True
    return False
