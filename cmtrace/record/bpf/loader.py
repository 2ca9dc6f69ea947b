"""Compile, load and attach the probes (probes/fdtrace.bpf.c) with bcc; detach them again.

The compile runs in a short-lived child process (`load`): bcc compiles with clang and LLVM in
the process that calls it, which took the collector's RSS from ~110 MB to over 300 MB (its peak
for the whole recording) and left libLLVM/libclang mapped. The child compiles, loads and
attaches, sends the map fds (with bcc's description of their types), the tracepoints' perf
event fds and the program fds back over a socket (SCM_RIGHTS), and exits without detaching: an
attachment lives as long as its perf event fd, now the collector's, so nothing stays attached
once the collector is gone (even after kill -9). The collector reads the maps with bpf(2) (maps.py) and never
loads bcc. --calls attaches USDT probes with bcc's own code, so it loads in process.

The probe source is assembled here: bcc rewrites map method calls (`map.lookup(...)`) only in
the main file, so probes/pystack.h, which uses maps, is pasted over its `#include` line rather
than included; probes/events.h (types only) is a plain include found through -I.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import Any

import cmtrace
from cmtrace.errors import EnvironmentProblem
from cmtrace.record import syscalls
from cmtrace.record.bpf.maps import Table
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


class Probes:
    """Probes a child loaded (see the module docstring): the maps by name, as `bpf[name]` is
    with bcc, and the perf event fds that keep the programs attached."""

    def __init__(
        self, tables: dict[str, Table], tracepoint_fds: list[int], program_fds: list[int]
    ) -> None:
        self.tables = tables
        self.tracepoint_fds = tracepoint_fds
        # Held only so the programs show in this process's fdinfo (run_time_ns and run_cnt
        # with kernel.bpf_stats_enabled, as benchmarks/bench_overhead.py --bpf-stats reads
        # them) and beside its pid in `bpftool prog`; the perf events keep them loaded.
        self.program_fds = program_fds

    def __getitem__(self, name: str) -> Table:
        return self.tables[name]

    def close(self) -> None:
        """Detach (close the perf event fds, in parallel: each close waits for an RCU grace
        period, ~80 ms here, and the threads share them), then drop the maps."""
        fds, self.tracepoint_fds = self.tracepoint_fds, []
        with ThreadPoolExecutor(max_workers=max(1, min(len(fds), 64))) as pool:
            list(pool.map(os.close, fds))
        for table in self.tables.values():
            table.close()
        self.tables = {}
        for fd in self.program_fds:
            os.close(fd)
        self.program_fds = []


CHILD_MESSAGE_MAX = 1 << 20  # one message: the JSON (map type descriptions) and its fds
CHILD_FDS_PER_MESSAGE = 200  # below SCM_MAX_FD (253)


def load(ring_pages: int, with_stacks: bool, calls: bool, extra: tuple[str, ...] = ()) -> Loaded:
    """Compile, load and attach the probes: in a child (the collector keeps only fds), or in
    this process with --calls (its USDT probes are bcc's)."""
    if calls:
        return load_in_process(ring_pages, with_stacks, calls, extra)
    return load_in_child(ring_pages, with_stacks, extra)


def load_in_child(ring_pages: int, with_stacks: bool, extra: tuple[str, ...] = ()) -> Loaded:
    params = {"ring_pages": ring_pages, "with_stacks": with_stacks, "extra": list(extra)}
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    root = str(Path(cmtrace.__file__).resolve().parent.parent)  # this cmtrace, whatever the cwd
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    code = "import sys; from cmtrace.record.bpf.loader import child_main; child_main(sys.argv[1:])"
    with ours, theirs:
        child = subprocess.Popen(
            [sys.executable, "-c", code, str(theirs.fileno()), json.dumps(params)],
            pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        theirs.close()
        try:
            return _receive(ours)
        finally:
            child.wait()


def _receive(sock: socket.socket) -> Loaded:
    """What the child sends: messages of (JSON, fds), the last one {"done": ...} or an error."""
    tables: dict[str, Table] = {}
    perf_fds: list[int] = []
    program_fds: list[int] = []
    try:
        while True:
            data, fds, _flags, _addr = socket.recv_fds(
                sock, CHILD_MESSAGE_MAX, CHILD_FDS_PER_MESSAGE
            )
            if not data:
                raise ProbeLoadError("the process compiling the probes ended without a word")
            message = json.loads(data)
            for (name, map_type, key, leaf), fd in zip(message.get("maps", []), fds):
                tables[name] = Table(name, fd, map_type, key, leaf)
            rest = fds[len(message.get("maps", [])) :]
            (program_fds if message.get("programs") else perf_fds).extend(rest)
            if "error" in message:
                raise ProbeLoadError(message["error"])
            if "done" in message:
                return Loaded(Probes(tables, perf_fds, program_fds), message["done"])
    except BaseException:
        Probes(tables, perf_fds, program_fds).close()
        raise


def child_main(argv: list[str]) -> None:
    """The child's work (see load_in_child): load, send, and exit without detaching (bcc's
    exit handler would disable the perf events, which the collector now shares)."""
    sock = socket.socket(fileno=int(argv[0]))
    params = json.loads(argv[1])
    try:
        loaded = load_in_process(params["ring_pages"], params["with_stacks"], calls=False,
                                 extra=tuple(params["extra"]))  # fmt: skip
        for message, fds in _messages(loaded):
            socket.send_fds(sock, [json.dumps(message).encode()], fds)
    except ProbeLoadError as exc:
        sock.sendall(json.dumps({"error": exc.detail}).encode())
    except Exception as exc:  # anything else: said in the collector, not a traceback here
        sock.sendall(json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode())
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _messages(loaded: Loaded) -> list[tuple[dict[str, Any], list[int]]]:
    """The maps (name, type, key and value descriptions; fd), the perf event fds and the
    program fds, in messages of at most CHILD_FDS_PER_MESSAGE fds, the last one saying which
    syscalls lack a tracepoint."""
    bcc = import_bcc()
    lib, module = bcc.lib, loaded.bpf.module
    lib.bpf_num_tables.restype, lib.bpf_num_tables.argtypes = ctypes.c_size_t, [ctypes.c_void_p]
    lib.bpf_table_name.restype = ctypes.c_char_p
    lib.bpf_table_name.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    maps = []
    for index in range(lib.bpf_num_tables(module)):
        name = lib.bpf_table_name(module, index)
        table_id = lib.bpf_table_id(module, name)
        fd = lib.bpf_table_fd(module, name)
        key, leaf = lib.bpf_table_key_desc(module, name), lib.bpf_table_leaf_desc(module, name)
        if fd < 0 or not leaf:
            continue
        maps.append(([name.decode(), int(lib.bpf_table_type_id(module, table_id)),
                      json.loads(key or b'"int"'), json.loads(leaf)], fd))  # fmt: skip
    out: list[tuple[dict[str, Any], list[int]]] = []
    for start in range(0, len(maps), CHILD_FDS_PER_MESSAGE):
        chunk = maps[start : start + CHILD_FDS_PER_MESSAGE]
        out.append(({"maps": [m for m, _ in chunk]}, [fd for _, fd in chunk]))
    perf = list(loaded.bpf.tracepoint_fds.values())
    for start in range(0, len(perf), CHILD_FDS_PER_MESSAGE):
        out.append(({}, perf[start : start + CHILD_FDS_PER_MESSAGE]))
    programs = [f.fd for f in loaded.bpf.funcs.values()]
    for start in range(0, len(programs), CHILD_FDS_PER_MESSAGE):
        out.append(({"programs": True}, programs[start : start + CHILD_FDS_PER_MESSAGE]))
    out.append(({"done": loaded.missing_tracepoints}, []))
    return out


def load_in_process(
    ring_pages: int, with_stacks: bool, calls: bool, extra: tuple[str, ...] = ()
) -> Loaded:
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
    if isinstance(bpf, Probes):
        bpf.close()
        return
    attached = list(bpf.tracepoint_fds)
    with ThreadPoolExecutor(max_workers=max(1, len(attached))) as pool:
        list(pool.map(bpf.detach_tracepoint, attached))
    bpf.cleanup()
