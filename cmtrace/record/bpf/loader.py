"""Compile, load and attach the probes (probes/fdtrace.bpf.c) with bcc; detach them again.

The probe source is assembled here: bcc rewrites map method calls (`map.lookup(...)`) only in
the main file, so probes/pystack.h, which uses maps, is pasted over its `#include` line rather
than included; probes/events.h (types only) is a plain include found through -I.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import Any

from cmtrace.errors import EnvironmentProblem
from cmtrace.record import syscalls
from cmtrace.record.environment import available_syscall_tracepoints

MAX_TRACED = 8192  # processes the kernel filter holds at once
PYSTACK_INCLUDE = '#include "pystack.h"'
# Entry programs of their own for the hottest syscalls (see probes/fdtrace.bpf.c).
DEDICATED_ENTRY = {
    "close": "on_close_enter",
    "ioctl": "on_ioctl_enter",
    "openat": "on_openat_enter",
}

# bcc.BPF: bcc ships no type information, so the loaded object is typed Any wherever it goes.
BPF = Any


class ProbeLoadError(EnvironmentProblem):
    """The kernel or compiler refused the probes; `detail` is the first line of what it said."""

    def __init__(self, detail: str):
        super().__init__(
            f"the BPF probes could not be loaded ({detail}): run `cmtrace doctor` to see "
            "what this kernel lacks (headers, BPF permission)"
        )
        self.detail = detail


def probes_dir() -> Path:
    return Path(str(resources.files("cmtrace.probes")))


def import_bcc() -> ModuleType:
    """Import bcc lazily: only recording needs it, and its absence deserves a clear message."""
    try:
        import bcc  # noqa: PLC0415
    except ImportError as exc:
        raise EnvironmentProblem(
            "the bcc Python module is missing: run `make install` (or `apt-get install "
            "python3-bpfcc`) and use /opt/cmtrace/venv/bin/python or the cmtrace command"
        ) from exc
    return bcc  # type: ignore[no-any-return]  # bcc has no type information


def inline_pystack(source: str, header: Path | None = None) -> str:
    """`source` with its `#include "pystack.h"` line replaced by the walker itself."""
    text = (header or probes_dir() / "pystack.h").read_text()
    return source.replace(PYSTACK_INCLUDE, "#define CMTRACE_PYSTACK_INLINED 1\n" + text, 1)


def probe_source(with_stacks: bool) -> str:
    """fdtrace.bpf.c, with the stack walker pasted in (else its stubs serve)."""
    source = (probes_dir() / "fdtrace.bpf.c").read_text()
    return inline_pystack(source) if with_stacks else source


def cflags(ring_pages: int, calls: bool, extra: tuple[str, ...] = ()) -> list[str]:
    """The compiler flags of the probes; `extra`: a feature's own (--aggregate's map sizes)."""
    flags = [f"-DRINGBUF_PAGES={ring_pages}", f"-DMAX_TRACED={MAX_TRACED}", f"-I{probes_dir()}"]
    if calls:
        flags.append("-DCMTRACE_CALLS")
    return flags + list(extra)


@dataclass
class Loaded:
    """A loaded, attached probe program."""

    bpf: BPF
    missing_tracepoints: list[str] = field(default_factory=list)  # syscalls this kernel lacks


def load(ring_pages: int, with_stacks: bool, calls: bool, extra: tuple[str, ...] = ()) -> Loaded:
    """Compile and load the probes and attach them to every syscall tracepoint there is."""
    bcc = import_bcc()
    bpf = None
    try:
        bpf = bcc.BPF(text=probe_source(with_stacks), cflags=cflags(ring_pages, calls, extra))
        return Loaded(bpf, attach_syscalls(bpf))
    except Exception as exc:  # bcc raises plain Exception on compile/load failures
        if bpf is not None:
            bpf.cleanup()
        raise ProbeLoadError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from exc


def attach_syscalls(bpf: BPF) -> list[str]:
    """Attach entry (and, for births, exit) programs; returns the syscalls with no tracepoint."""
    have = available_syscall_tracepoints()
    missing = []
    for name in syscalls.EXIT_PROBED + syscalls.ENTER_ONLY:
        if f"sys_enter_{name}" not in have:
            missing.append(name)
            continue
        enter = DEDICATED_ENTRY.get(name, "on_sys_enter")
        bpf.attach_tracepoint(tp=f"syscalls:sys_enter_{name}", fn_name=enter)
        if name in syscalls.EXIT_PROBED:
            bpf.attach_tracepoint(tp=f"syscalls:sys_exit_{name}", fn_name="on_sys_exit")
    return missing


def detach(bpf: BPF) -> None:
    """Detach every probe. Each detach waits for an RCU grace period (~80 ms here), so they run
    in parallel threads (the ctypes calls release the GIL) and share them."""
    attached = list(bpf.tracepoint_fds)
    with ThreadPoolExecutor(max_workers=max(1, len(attached))) as pool:
        list(pool.map(bpf.detach_tracepoint, attached))
    bpf.cleanup()
