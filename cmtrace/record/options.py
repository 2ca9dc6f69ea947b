"""What a recording is asked to do: the engine's one input, built by `cmtrace -p`/`run`,
`cmtrace demo`, or any other front end (never an argparse Namespace)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cmtrace.errors import UsageError
from cmtrace.record.joining import compile_pattern

MIN_MAX_SIZE = 1 << 20  # --max-size: a trace's first parts and meta.json take ~100 KB
PAGE_SIZE = 4096  # the ring buffer is sized in pages (RINGBUF_PAGES in probes/fdtrace.bpf.c)


@dataclass(frozen=True)
class RecordOptions:
    """Either `pid` (attach to a running process) or `command` (start it under trace)."""

    pid: int | None = None  # attach to this process (`cmtrace -p PID`)
    command: tuple[str, ...] = ()  # start this command already traced (`cmtrace run -- CMD`)
    follow_children: bool = False  # -p: its descendants too (run always follows)
    duration: float | None = None  # -p: stop after this many seconds
    output: Path | None = None  # trace directory; None: ./cmtrace-PID-YYYYmmdd-HHMMSS
    force: bool = False  # replace a trace already in `output`
    python_stacks: bool = True  # walk Python stacks in the kernel (off: fds only, cheapest)
    calls: bool = False  # also record __enter__/__exit__ calls through USDT probes
    ring_mb: int = 32  # kernel ring buffer, MiB, a power of two
    quiet: bool = False  # no progress lines on stderr
    backend: str = "auto"  # "auto" (BPF when it can, else ptrace) | "bpf" | "ptrace"
    # --aggregate (BPF): count short-lived fds in the kernel, ship those older than min_age
    aggregate: bool = False
    min_age: float = 10.0  # seconds
    aggregate_live_max: int = 65536  # live fds the kernel map holds (hidden flag: tests)
    max_size: int | None = None  # --max-size: bytes the trace may take on disk (None: no bound)
    # several targets (cmtrace.record.joining): more pids, and processes that join
    pids: tuple[int, ...] = ()  # -p PID[,PID...] beyond `pid`
    pgrep: str | None = None  # every process whose command line matches (pgrep -f)
    all_python: bool = False  # --all: every CPython process on the host (BPF)

    def validate(self) -> None:
        """Refuse contradictory or impossible options before anything is attached or started."""
        if self.calls and not self.python_stacks:
            raise UsageError(
                "--calls needs Python stacks (they tie each __exit__ to its with statement): "
                "drop --no-python-stacks"
            )
        if self.calls and self.backend == "ptrace":
            raise UsageError("--calls needs the BPF backend's USDT probes: drop --backend ptrace")
        self._validate_aggregate()
        self._validate_targets()
        if self.max_size is not None and self.max_size < MIN_MAX_SIZE:
            raise UsageError(f"--max-size must be at least {MIN_MAX_SIZE >> 20}M")
        self.ring_pages()

    @property
    def attach_pids(self) -> tuple[int, ...]:
        """The processes -p names, in order."""
        return tuple(dict.fromkeys([*([self.pid] if self.pid else []), *self.pids]))

    @property
    def attaching(self) -> bool:
        return bool(self.attach_pids or self.pgrep is not None or self.all_python)

    def _validate_targets(self) -> None:
        if self.all_python and (self.attach_pids or self.pgrep is not None or self.command):
            raise UsageError("--all traces every CPython process: drop -p, --pgrep and run")
        if self.all_python and self.backend == "ptrace":
            raise UsageError(
                "--all needs the BPF backend (ptrace would stop every Python process on the "
                "host at each fd syscall): drop --backend ptrace"
            )
        if self.pgrep is not None:
            compile_pattern(self.pgrep)

    def _validate_aggregate(self) -> None:
        if not self.aggregate:
            return
        if self.backend == "ptrace":
            raise UsageError(
                "--aggregate counts fds in the kernel and needs the BPF backend: drop "
                "--backend ptrace (or --aggregate, to record full history with ptrace)"
            )
        if self.min_age < 0 or self.aggregate_live_max < 1:
            raise UsageError("--min-age must be >= 0 seconds (and the live map at least 1 fd)")

    def ring_pages(self) -> int:
        megabytes = self.ring_mb
        if megabytes <= 0 or megabytes & (megabytes - 1):
            raise UsageError(f"--ring-mb {megabytes}: give a power of two such as 16 or 64")
        return megabytes * 1024 * 1024 // PAGE_SIZE
