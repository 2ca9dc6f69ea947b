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
# Decoding is vectorised with numpy: the kernel may send a few hundred thousand records a second
# and the collector must keep up on the second core. Only records with a data tail (a path or an
# address) and the rare multi-fd births (pipe, socketpair, SCM_RIGHTS) take a Python path.

STACK_FINALIZING = 8
_NR_SPACE = 1024
_SYSCALL_NAMES = np.array([syscalls.syscall_name(nr) for nr in range(_NR_SPACE)], dtype=object)
_KIND_BY_NR = np.array([syscalls.birth_kind(nr) for nr in range(_NR_SPACE)], dtype=object)
_CLOEXEC_BIT = np.array(
    [getattr(syscalls.BY_NR.get(nr), "cloexec_flag", 0) for nr in range(_NR_SPACE)], np.uint64
)
_ALWAYS_CLOEXEC = np.array(
    [getattr(syscalls.BY_NR.get(nr), "always_cloexec", False) for nr in range(_NR_SPACE)], bool
)
_OP_NAMES = np.array([OP_BY_TYPE.get(t, f"type{t}") for t in range(PYTHON_RECORD_MIN_TYPE)], object)
_TEXT_NRS = {syscalls.BY_NAME[n].nr for n in ("open", "openat", "openat2", "creat")}
_MULTI_FD_NRS = {syscalls.BY_NAME[n].nr for n in ("pipe", "pipe2", "socketpair", "recvmsg")}
_MEMFD_NR = syscalls.BY_NAME["memfd_create"].nr
_FCNTL_NR = syscalls.BY_NAME["fcntl"].nr
_DUP2_NR = syscalls.BY_NAME["dup2"].nr


def decode(records: list[bytes], boot_ns: int) -> pa.Table:
    """Turn raw fd records into an Arrow table with the EVENTS schema (sorted by time)."""
    if not records:
        return schema.EVENTS.empty_table()
    head = np.frombuffer(b"".join(r[:HEADER_SIZE] for r in records), dtype=RECORD_HEADER)
    etype = head["type"].astype(np.int64)
    nr = np.minimum(head["nr"].astype(np.int64), _NR_SPACE - 1)
    flags = head["flags"]
    is_birth = etype == EV_BIRTH
    multi = is_birth & np.isin(nr, list(_MULTI_FD_NRS))
    noop_dup2 = is_birth & (nr == _DUP2_NR) & (head["fd"] == head["fd2"])
    keep = ~(multi | noop_dup2)

    syscall = _SYSCALL_NAMES[nr]
    for ev, name in PROCESS_SYSCALL.items():
        syscall[etype == ev] = name
    kind = np.where(is_birth | (etype == EV_FAIL), _KIND_BY_NR[nr], None)
    kind[etype == EV_ADDR] = "socket"
    cloexec = _ALWAYS_CLOEXEC[nr] | ((flags & _CLOEXEC_BIT[nr]) != 0)
    cloexec |= (nr == _FCNTL_NR) & (flags == syscalls.F_DUPFD_CLOEXEC)
    cloexec_valid = is_birth | (etype == EV_CLOEXEC)
    cloexec = np.where(etype == EV_CLOEXEC, head["arg"] != 0, cloexec)
    paths = np.full(len(head), None, dtype=object)
    for i in np.flatnonzero(head["datalen"] > 0):
        paths[i] = _decode_tail(int(etype[i]), int(nr[i]), records[i], int(head["datalen"][i]))

    stack_flags = head["stack_flags"].astype(np.int64)
    columns = {
        "t_ns": head["ts"].astype(np.int64) - boot_ns,
        "pid": head["pid"].astype(np.int32),
        "tid": head["tid"].astype(np.int32),
        "op": _OP_NAMES[np.minimum(etype, PYTHON_RECORD_MIN_TYPE - 1)],
        "syscall": syscall,
        "fd": head["fd"],
        "src_fd": head["fd2"],
        "errno": head["err"],
        "kind": kind,
        "path": paths,
        "flags": flags.view(np.int64),
        "cloexec": cloexec,
        "arg": head["arg"].view(np.int64),
        "stack_id": head["stack_id"].view(np.int64),
        "stack_flags": (stack_flags & ~STACK_FINALIZING).astype(np.int32),
        "finalizing": (stack_flags & STACK_FINALIZING) != 0,
    }
    masks = {"cloexec": ~cloexec_valid}
    table = _to_table(
        {k: v[keep] for k, v in columns.items()}, {k: m[keep] for k, m in masks.items()}
    )
    extra = _expand_multi_fd(columns, np.flatnonzero(multi), records, head)
    if extra is not None:
        table = pa.concat_tables([table, extra]).sort_by([("t_ns", "ascending")])
    elif len(table) > 1:
        table = table.sort_by([("t_ns", "ascending")])
    return table


def _to_table(columns: dict, masks: dict) -> pa.Table:
    arrays = []
    for fld in schema.EVENTS:
        values = columns[fld.name]
        if pa.types.is_dictionary(fld.type):
            arr = pa.array(values, pa.string()).dictionary_encode()
            arrays.append(arr.cast(fld.type))
        elif fld.name in masks:
            arrays.append(pa.array(values, fld.type, mask=masks[fld.name]))
        elif values.dtype == object:
            arrays.append(pa.array(values, fld.type))
        else:
            arrays.append(pa.array(values.astype(fld.type.to_pandas_dtype(), copy=False)))
    return pa.Table.from_arrays(arrays, schema=schema.EVENTS)


def _expand_multi_fd(
    columns: dict, rows: np.ndarray, records: list[bytes], head
) -> pa.Table | None:
    """pipe/pipe2/socketpair: one row per end naming its peer; recvmsg: one row per fd received."""
    if len(rows) == 0:
        return None
    out: dict[str, list] = {name: [] for name in columns}
    for i in rows:
        base = {name: col[i] for name, col in columns.items()}
        if base["syscall"] == "recvmsg":
            tail = records[i][HEADER_SIZE : HEADER_SIZE + int(head["datalen"][i])]
            fds = [fd for (fd,) in struct.iter_unpack("<i", tail[: len(tail) // 4 * 4])]
            variants = [{"fd": fd, "kind": "unknown"} for fd in fds]
        else:
            first, second = int(base["fd"]), int(base["src_fd"])
            variants = [{"fd": first, "src_fd": second}, {"fd": second, "src_fd": first}]
        for variant in variants:
            for name in columns:
                out[name].append(variant.get(name, base[name]))
    arrays = {name: np.array(values, dtype=columns[name].dtype) for name, values in out.items()}
    return _to_table(arrays, {})


def _decode_tail(etype: int, nr: int, record: bytes, datalen: int) -> str | None:
    tail = record[HEADER_SIZE : HEADER_SIZE + datalen]
    if etype in (EV_ADDR, EV_BIRTH) and nr in (42, 49, 43, 288):  # connect, bind, accept*
        return format_sockaddr(tail)
    if etype == EV_EXIT:
        return _text(tail.split(b"\0", 1)[0])
    if nr == _MEMFD_NR:
        return "memfd:" + _text(tail)
    if nr in _TEXT_NRS or etype == EV_EXEC:
        return _text(tail)
    return None


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "backslashreplace")


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
