"""The collector: loads the probes with bcc, filters on the traced pids, drains the ring buffer.

It knows nothing of pandas or reports. Records come out of the kernel in batches (the probes
submit without wake-ups, we consume every DRAIN_INTERVAL); fd records are decoded in bulk with
numpy into Arrow tables that follow cmtrace.schema.EVENTS; Python stack and code records
(type >= 100) go to the symbolizer.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import pyarrow as pa

from cmtrace import schema, syscalls
from cmtrace.errors import EnvironmentProblem

TRACEFS = Path("/sys/kernel/tracing")
RECORD_HEADER = np.dtype(
    [
        ("ts", "<u8"), ("pid", "<u4"), ("tid", "<u4"), ("type", "<u2"), ("nr", "<u2"),
        ("fd", "<i4"), ("fd2", "<i4"), ("err", "<i4"), ("flags", "<u8"), ("arg", "<u8"),
        ("stack_id", "<u8"), ("stack_flags", "<u4"), ("datalen", "<u4"),
    ]
)  # fmt: skip
HEADER_SIZE = RECORD_HEADER.itemsize  # 64, struct fd_event in probes/fdtrace.bpf.c
PYTHON_RECORD_MIN_TYPE = 100

EV_BIRTH, EV_CLOSE, EV_CLOSE_RANGE, EV_FAIL, EV_CLOEXEC, EV_ADDR, EV_FORK, EV_EXEC, EV_EXIT = range(
    1, 10
)
OP_BY_TYPE = {
    EV_BIRTH: schema.OP_BIRTH, EV_CLOSE: schema.OP_CLOSE, EV_CLOSE_RANGE: schema.OP_CLOSE_RANGE,
    EV_FAIL: schema.OP_FAIL, EV_CLOEXEC: schema.OP_CLOEXEC, EV_ADDR: schema.OP_ADDR,
    EV_FORK: schema.OP_FORK, EV_EXEC: schema.OP_EXEC, EV_EXIT: schema.OP_EXIT,
}  # fmt: skip
PROCESS_SYSCALL = {EV_FORK: "fork", EV_EXEC: "execve", EV_EXIT: "exit"}

DRAIN_INTERVAL = 0.02  # seconds between ring-buffer drains


def probes_dir() -> Path:
    return Path(str(resources.files("cmtrace.probes")))


def import_bcc():
    """Import bcc lazily: only recording needs it, and its absence deserves a clear message."""
    try:
        import bcc  # noqa: PLC0415
    except ImportError as exc:
        raise EnvironmentProblem(
            "the bcc Python module is missing: run `make install` (or `apt-get install "
            "python3-bpfcc`) and use /opt/cmtrace/venv/bin/python or the cmtrace command"
        ) from exc
    return bcc


def available_syscall_tracepoints() -> set[str]:
    root = TRACEFS / "events" / "syscalls"
    return {p.name for p in root.iterdir()} if root.is_dir() else set()


@dataclass
class Collector:
    """Owns the loaded BPF program; `drain()` returns what arrived since the last call."""

    follow: bool = False
    ring_pages: int = 4096  # 16 MiB
    python_stacks: bool = True
    on_python_record: Callable[[bytes], None] | None = None
    boot_ns: int = field(default_factory=time.monotonic_ns)  # trace start, monotonic clock
    missing_tracepoints: list[str] = field(default_factory=list)
    _chunks: list[bytes] = field(default_factory=list)
    _lost_seen: int = 0

    def load(self) -> None:
        bcc = import_bcc()
        cflags = [
            f"-DRINGBUF_PAGES={self.ring_pages}",
            "-DMAX_TRACED=8192",
            f"-I{probes_dir()}",
        ]
        if self.python_stacks and (probes_dir() / "pystack.h").exists():
            cflags.append("-DCMTRACE_PYSTACK")
        source = (probes_dir() / "fdtrace.bpf.c").read_text()
        try:
            self.bpf = bcc.BPF(text=source, cflags=cflags)
            self._attach_syscalls()
        except Exception as exc:  # bcc raises plain Exception on compile/load failures
            raise EnvironmentProblem(
                f"the BPF probes could not be loaded ({str(exc).splitlines()[0]}): run "
                "`cmtrace doctor` to see what this kernel lacks (headers, BPF permission)"
            ) from exc
        if self.follow:
            self.bpf["settings"][ctypes.c_int(0)] = ctypes.c_uint32(1)
        self.bpf["events"].open_ring_buffer(self._on_record)

    def _attach_syscalls(self) -> None:
        have = available_syscall_tracepoints()
        for name in syscalls.EXIT_PROBED + syscalls.ENTER_ONLY:
            if f"sys_enter_{name}" not in have:
                self.missing_tracepoints.append(name)
                continue
            self.bpf.attach_tracepoint(tp=f"syscalls:sys_enter_{name}", fn_name="on_sys_enter")
            if name in syscalls.EXIT_PROBED:
                self.bpf.attach_tracepoint(tp=f"syscalls:sys_exit_{name}", fn_name="on_sys_exit")

    def trace_pid(self, pid: int) -> None:
        self.bpf["traced"][ctypes.c_uint32(pid)] = ctypes.c_uint8(1)

    def untrace_pid(self, pid: int) -> None:
        try:
            del self.bpf["traced"][ctypes.c_uint32(pid)]
        except KeyError:
            pass

    def _on_record(self, _ctx, data, size) -> None:
        self._chunks.append(ctypes.string_at(data, size))

    def drain(self) -> list[bytes]:
        """Consume everything the kernel has submitted; return the raw fd records."""
        self.bpf.ring_buffer_consume()
        chunks, self._chunks = self._chunks, []
        if self.on_python_record is None:
            return [c for c in chunks if _record_type(c) < PYTHON_RECORD_MIN_TYPE]
        fd_records = []
        for chunk in chunks:
            if _record_type(chunk) >= PYTHON_RECORD_MIN_TYPE:
                self.on_python_record(chunk)
            else:
                fd_records.append(chunk)
        return fd_records

    def lost_events(self) -> int:
        return int(sum(self.bpf["lost"][ctypes.c_int(0)]))

    def close(self) -> None:
        bpf = getattr(self, "bpf", None)
        if bpf is not None:
            bpf.cleanup()
            self.bpf = None


def _record_type(chunk: bytes) -> int:
    return chunk[16] | (chunk[17] << 8)


# ---- decoding ---------------------------------------------------------------------------------


def decode(records: list[bytes], boot_ns: int) -> pa.Table:
    """Turn raw fd records into an Arrow table with the EVENTS schema."""
    if not records:
        return schema.EVENTS.empty_table()
    head = np.frombuffer(b"".join(r[:HEADER_SIZE] for r in records), dtype=RECORD_HEADER)
    rows = _Rows()
    for i, rec in enumerate(head):
        tail = records[i][HEADER_SIZE : HEADER_SIZE + int(rec["datalen"])]
        _decode_one(rec, tail, boot_ns, rows)
    return rows.table()


class _Rows:
    def __init__(self) -> None:
        self.cols: dict[str, list] = {name: [] for name in schema.EVENTS.names}

    def add(self, **values) -> None:
        for name, column in self.cols.items():
            column.append(values.get(name))

    def table(self) -> pa.Table:
        arrays = []
        for fld in schema.EVENTS:
            values = self.cols[fld.name]
            if pa.types.is_dictionary(fld.type):
                arrays.append(pa.array(values, pa.string()).dictionary_encode().cast(fld.type))
            else:
                arrays.append(pa.array(values, fld.type))
        return pa.Table.from_arrays(arrays, schema=schema.EVENTS)


def _decode_one(rec, tail: bytes, boot_ns: int, rows: _Rows) -> None:
    etype, nr = int(rec["type"]), int(rec["nr"])
    flags, arg = int(rec["flags"]), int(rec["arg"])
    base = dict(
        t_ns=int(rec["ts"]) - boot_ns,
        pid=int(rec["pid"]),
        tid=int(rec["tid"]),
        op=OP_BY_TYPE.get(etype, f"type{etype}"),
        syscall=PROCESS_SYSCALL.get(etype) or syscalls.syscall_name(nr),
        fd=int(rec["fd"]),
        src_fd=int(rec["fd2"]),
        errno=int(rec["err"]),
        kind=None,
        path=None,
        flags=flags,
        cloexec=None,
        arg=_signed64(arg),
        stack_id=_signed64(int(rec["stack_id"])),
        stack_flags=int(rec["stack_flags"]) & 0x7FFFFFFF,
        finalizing=bool(int(rec["stack_flags"]) & STACK_FINALIZING),
    )
    if etype == EV_BIRTH:
        _decode_birth(base, nr, flags, tail, rows)
        return
    if etype == EV_FAIL:
        base.update(kind=syscalls.birth_kind(nr), path=_text(tail) or None, fd=-1)
    elif etype == EV_CLOEXEC:
        base.update(cloexec=bool(arg))
    elif etype == EV_ADDR:
        base.update(kind="socket", path=format_sockaddr(tail))
    elif etype == EV_EXEC:
        base.update(path=_text(tail))
    elif etype == EV_EXIT:
        base.update(path=_text(tail.split(b"\0", 1)[0]))
    rows.add(**base)


STACK_FINALIZING = 8


def _decode_birth(base: dict, nr: int, flags: int, tail: bytes, rows: _Rows) -> None:
    name = syscalls.syscall_name(nr)
    kind = syscalls.birth_kind(nr)
    cloexec = syscalls.birth_cloexec(nr, flags)
    if name == "recvmsg":  # one row per fd received with SCM_RIGHTS
        for (fd,) in struct.iter_unpack("<i", tail[: len(tail) // 4 * 4]):
            rows.add(**{**base, "fd": fd, "kind": "unknown", "cloexec": cloexec})
        return
    if name in ("pipe", "pipe2", "socketpair"):  # both ends, each naming its peer
        first, second = base["fd"], base["src_fd"]
        rows.add(**{**base, "fd": first, "src_fd": second, "kind": kind, "cloexec": cloexec})
        rows.add(**{**base, "fd": second, "src_fd": first, "kind": kind, "cloexec": cloexec})
        return
    if name == "dup2" and base["fd"] == base["src_fd"]:
        return  # dup2(fd, fd) is a no-op
    if name in ("open", "openat", "openat2", "creat"):
        path = _text(tail)
    elif name == "memfd_create":
        path = "memfd:" + _text(tail)
    elif name in ("accept", "accept4"):
        path = format_sockaddr(tail) if tail else None
    else:
        path = None
    rows.add(**{**base, "kind": kind, "path": path, "cloexec": cloexec})


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "backslashreplace")


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def format_sockaddr(raw: bytes) -> str | None:
    """`127.0.0.1:5432`, `[::1]:80`, a unix path (`@name` for abstract), or None."""
    if len(raw) < 2:
        return None
    family = struct.unpack_from("<H", raw)[0]
    if family == socket.AF_INET and len(raw) >= 8:
        port = struct.unpack_from(">H", raw, 2)[0]
        return f"{ipaddress.IPv4Address(raw[4:8])}:{port}"
    if family == socket.AF_INET6 and len(raw) >= 24:
        port = struct.unpack_from(">H", raw, 2)[0]
        return f"[{ipaddress.IPv6Address(raw[8:24])}]:{port}"
    if family == socket.AF_UNIX:
        path = raw[2:]
        if path[:1] == b"\0":
            return "@" + _text(path[1:].rstrip(b"\0"))
        return _text(path.split(b"\0", 1)[0]) or "unix:(unnamed)"
    if family == socket.AF_NETLINK:
        return "netlink"
    return f"family{family}"
