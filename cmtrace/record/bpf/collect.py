"""The collector: loads the probes with bcc, filters on the traced pids, drains the ring buffer.

It knows nothing of pandas or reports. Records come out of the kernel in batches (the probes
submit without wake-ups, we consume every DRAIN_INTERVAL); fd records are decoded in bulk with
numpy into Arrow tables that follow cmtrace.trace.schema.EVENTS; Python stack and code records
(type >= 100) go to the symbolizer.
"""

from __future__ import annotations

import ctypes
import ipaddress
import mmap
import socket
import struct
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cmtrace.errors import EnvironmentProblem
from cmtrace.record import syscalls
from cmtrace.trace import schema

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
EV_CALL = 10  # --calls: an __enter__/__exit__ entry or return (decode_calls, not an fd event)

DRAIN_INTERVAL = 0.02  # seconds between ring-buffer drains
# Entry programs of their own for the hottest syscalls (see probes/fdtrace.bpf.c).
DEDICATED_ENTRY = {
    "close": "on_close_enter",
    "ioctl": "on_ioctl_enter",
    "openat": "on_openat_enter",
}


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


class RingReader:
    """Consumer of a BPF ring buffer through its mmap'ed pages, without a callback per record.

    The kernel maps the data area twice in a row, so a record that wraps around the end reads
    as one contiguous slice. A drain copies everything between the consumer and producer
    positions in one go, walks the 8-byte record headers (length with BUSY/DISCARD bits), stops
    at the first record still being written, and only then advances the consumer position.
    """

    BUSY = 1 << 31
    DISCARD = 1 << 30
    _HEAD = struct.Struct("<I20xH")  # record length, then the payload's `type` field

    def __init__(self, map_fd: int, size: int):
        page = mmap.PAGESIZE
        self.size = size
        self.mask = size - 1
        self._consumer = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._producer = mmap.mmap(
            map_fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page
        )
        self._page = page

    def read(self) -> tuple[bytes, list[int], list[bytes]]:
        """(copy of the new bytes, payload offsets of fd records in it, Python records)."""
        consumer = int.from_bytes(self._consumer[0:8], "little")
        producer = int.from_bytes(self._producer[0:8], "little")
        if producer == consumer:
            return b"", [], []
        start = self._page + (consumer & self.mask)
        buf = self._producer[start : start + (producer - consumer)]
        pos, end, fd_offsets, python_records = 0, len(buf), [], []
        busy, discard, unpack = self.BUSY, self.DISCARD, self._HEAD.unpack_from
        while pos < end:
            header, rtype = unpack(buf, pos)
            if header & busy:
                break
            length = header & ~(busy | discard)
            if not header & discard:
                if rtype >= PYTHON_RECORD_MIN_TYPE:
                    python_records.append(buf[pos + 8 : pos + 8 + length])
                else:
                    fd_offsets.append(pos + 8)
            pos += (length + 15) & ~7  # 8-byte header, payload rounded up to 8
        self._consumer[0:8] = (consumer + pos).to_bytes(8, "little")
        return buf, fd_offsets, python_records

    def close(self) -> None:
        self._consumer.close()
        self._producer.close()


@dataclass
class Batch:
    """fd records drained together: payloads start at `offsets` inside `buf`."""

    buf: bytes
    offsets: list[int]

    def __len__(self) -> int:
        return len(self.offsets)


@dataclass
class Collector:
    """Owns the loaded BPF program; `drain()` returns what arrived since the last call."""

    follow: bool = False
    ring_pages: int = 8192  # 32 MiB
    python_stacks: bool = True
    calls: bool = (
        False  # compile the --calls USDT program (cmtrace.record.bpf.usdt attaches it per process)
    )
    on_python_record: Callable[[bytes], None] | None = None
    boot_ns: int = field(default_factory=time.monotonic_ns)  # trace start, monotonic clock
    missing_tracepoints: list[str] = field(default_factory=list)
    stack_failure: str | None = None  # why Python stacks were given up at load, if they were

    def load(self) -> None:
        """Compile, load and attach the probes. If the kernel refuses the Python stack walker
        (an older verifier may find it too complex), record without stacks and say why."""
        bcc = import_bcc()
        if self.python_stacks:
            try:
                self._load(bcc, with_stacks=True)
                return
            except EnvironmentProblem as exc:
                self.stack_failure = f"the Python stack walker could not be loaded ({exc.detail})"
                self.python_stacks = False
        self._load(bcc, with_stacks=False)

    def _load(self, bcc, with_stacks: bool) -> None:
        cflags = [
            f"-DRINGBUF_PAGES={self.ring_pages}",
            "-DMAX_TRACED=8192",
            f"-I{probes_dir()}",
        ]
        source = (probes_dir() / "fdtrace.bpf.c").read_text()
        if with_stacks:
            from cmtrace.record.bpf.symbolize import inline_pystack  # noqa: PLC0415 (bcc quirk, see there)

            source = inline_pystack(source, probes_dir() / "pystack.h")
        if self.calls:
            cflags.append("-DCMTRACE_CALLS")
        self.missing_tracepoints = []
        try:
            self.bpf = bcc.BPF(text=source, cflags=cflags)
            self._attach_syscalls()
        except Exception as exc:  # bcc raises plain Exception on compile/load failures
            if getattr(self, "bpf", None) is not None:
                self.bpf.cleanup()
                self.bpf = None
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            problem = EnvironmentProblem(
                f"the BPF probes could not be loaded ({detail}): run `cmtrace doctor` to see "
                "what this kernel lacks (headers, BPF permission)"
            )
            problem.detail = detail
            raise problem from exc
        if self.follow:
            self.bpf["settings"][ctypes.c_int(0)] = ctypes.c_uint32(1)
        self.ring = RingReader(self.bpf["events"].map_fd, self.ring_pages * 4096)
        self.boot_ns = time.monotonic_ns()  # the trace starts when the probes are live

    def _attach_syscalls(self) -> None:
        have = available_syscall_tracepoints()
        for name in syscalls.EXIT_PROBED + syscalls.ENTER_ONLY:
            if f"sys_enter_{name}" not in have:
                self.missing_tracepoints.append(name)
                continue
            enter = DEDICATED_ENTRY.get(name, "on_sys_enter")
            self.bpf.attach_tracepoint(tp=f"syscalls:sys_enter_{name}", fn_name=enter)
            if name in syscalls.EXIT_PROBED:
                self.bpf.attach_tracepoint(tp=f"syscalls:sys_exit_{name}", fn_name="on_sys_exit")

    def trace_pid(self, pid: int) -> None:
        self.bpf["traced"][ctypes.c_uint32(pid)] = ctypes.c_uint8(1)

    def hold_at_exec(self, pid: int, python_children: bool = True) -> None:
        """Have the kernel stop pid (SIGSTOP) right after each of its execs, and, with
        `python_children`, any followed process right after it execs a python* image; the
        recorder sends SIGCONT when it has seen the exec event."""
        self.bpf["settings"][ctypes.c_int(1)] = ctypes.c_uint32(pid)
        self.bpf["settings"][ctypes.c_int(2)] = ctypes.c_uint32(int(python_children))

    def drain(self) -> Batch:
        """Consume everything the kernel has submitted; Python records go to the symbolizer."""
        buf, offsets, python_records = self.ring.read()
        if self.on_python_record is not None:
            for record in python_records:
                self.on_python_record(record)
        return Batch(buf, offsets)

    def lost_events(self) -> int:
        return int(sum(self.bpf["lost"][ctypes.c_int(0)]))

    def stop(self) -> None:
        """Stop new events at once (the filter empties) while the probes stay attached."""
        self.bpf["traced"].clear()

    def close(self) -> None:
        """Detach every probe. Each detach waits for an RCU grace period (~80 ms here), so
        they run in parallel threads (the ctypes calls release the GIL) and share them."""
        bpf = getattr(self, "bpf", None)
        if bpf is None:
            return
        self.ring.close()
        attached = list(bpf.tracepoint_fds)
        with ThreadPoolExecutor(max_workers=max(1, len(attached))) as pool:
            list(pool.map(bpf.detach_tracepoint, attached))
        bpf.cleanup()
        self.bpf = None


# ---- decoding ---------------------------------------------------------------------------------
# Decoding is vectorised with numpy: the kernel may send a few hundred thousand records a second
# and the collector must keep up on the second core. Only records with a data tail (a path or an
# address) and the rare multi-fd births (pipe, socketpair, SCM_RIGHTS) take a Python path.

STACK_FINALIZING = schema.STACK_FINALIZING
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


_HEADER_COLUMNS = np.arange(HEADER_SIZE)
# Dictionary-encoded columns are built straight from integer codes, never from Python strings.
_OP_VOCAB = pa.array([OP_BY_TYPE.get(t, "unknown") for t in range(PYTHON_RECORD_MIN_TYPE)])
_SYSCALL_VOCAB = pa.array(list(_SYSCALL_NAMES) + list(PROCESS_SYSCALL.values()))
_PROCESS_SYSCALL_CODE = {ev: _NR_SPACE + i for i, ev in enumerate(PROCESS_SYSCALL)}
_KIND_VOCAB = pa.array(list(schema.KINDS))
_KIND_CODE_BY_NR = np.array(
    [schema.KINDS.index(syscalls.birth_kind(nr)) for nr in range(_NR_SPACE)], np.int8
)
_SOCKET_KIND = schema.KINDS.index("socket")
_TEXT_TAIL_NRS = np.array(sorted(_TEXT_NRS | {_MEMFD_NR}))


def _headers(batch: Batch) -> tuple[np.ndarray, np.ndarray]:
    """The fixed 64-byte headers of a batch's records (one numpy gather), and their offsets."""
    raw = np.frombuffer(batch.buf, dtype=np.uint8)
    offsets = np.asarray(batch.offsets, dtype=np.int64)
    return raw[offsets[:, None] + _HEADER_COLUMNS].reshape(-1).view(RECORD_HEADER), offsets


def decode(batch: Batch, boot_ns: int) -> pa.Table:
    """Turn drained fd records into an Arrow table with the EVENTS schema (sorted by time)."""
    if not len(batch):
        return schema.EVENTS.empty_table()
    head, offsets = _headers(batch)
    etype = head["type"].astype(np.int64)
    nr = np.minimum(head["nr"].astype(np.int64), _NR_SPACE - 1)
    flags = head["flags"]
    is_birth = etype == EV_BIRTH
    multi = is_birth & np.isin(nr, list(_MULTI_FD_NRS))
    noop_dup2 = is_birth & (nr == _DUP2_NR) & (head["fd"] == head["fd2"])
    keep = ~(multi | noop_dup2 | (etype == EV_CALL))

    syscall_code = nr.copy()
    for ev, code in _PROCESS_SYSCALL_CODE.items():
        syscall_code[etype == ev] = code
    kind_code = np.where(etype == EV_ADDR, _SOCKET_KIND, _KIND_CODE_BY_NR[nr])
    kind_valid = is_birth | (etype == EV_FAIL) | (etype == EV_ADDR)
    cloexec = _ALWAYS_CLOEXEC[nr] | ((flags & _CLOEXEC_BIT[nr]) != 0)
    cloexec |= (nr == _FCNTL_NR) & (flags == syscalls.F_DUPFD_CLOEXEC)
    cloexec = np.where(etype == EV_CLOEXEC, head["arg"] != 0, cloexec)
    cloexec_valid = is_birth | (etype == EV_CLOEXEC)
    stack_flags = head["stack_flags"].astype(np.int64)
    columns = {
        "t_ns": head["ts"].astype(np.int64) - boot_ns,
        "pid": head["pid"].astype(np.int32),
        "tid": head["tid"].astype(np.int32),
        "op": np.minimum(etype, PYTHON_RECORD_MIN_TYPE - 1),
        "syscall": syscall_code,
        "fd": head["fd"],
        "src_fd": head["fd2"],
        "errno": head["err"],
        "kind": kind_code,
        "path": np.arange(len(head)),  # row numbers: paths are decoded from the tails below
        "flags": flags.view(np.int64),
        "cloexec": cloexec,
        "arg": head["arg"].view(np.int64),
        "stack_id": head["stack_id"].view(np.int64),
        "stack_flags": (stack_flags & ~STACK_FINALIZING).astype(np.int32),
        "finalizing": (stack_flags & STACK_FINALIZING) != 0,
    }
    masks = {"cloexec": ~cloexec_valid, "kind": ~kind_valid}
    paths = _decode_paths(batch, offsets, head, etype, nr)
    table = _to_table(columns, masks, paths, keep)
    rows = np.flatnonzero(multi)
    if len(rows):
        extra = _expand_multi_fd(columns, rows, batch, offsets, head)
        table = pa.concat_tables([table, _to_table(*extra)])
    return table.sort_by([("t_ns", "ascending")]) if len(table) > 1 else table


_CALL_EVENT_VOCAB = pa.array([schema.CALL_ENTRY, schema.CALL_RETURN])
_CALL_FUNCTION_VOCAB = pa.array(["?", *schema.CALL_FUNCTIONS])


def decode_calls(batch: Batch, boot_ns: int) -> pa.Table:
    """The --calls records of a batch as a CALLS table (few: only the four dunder methods)."""
    if not len(batch):
        return schema.CALLS.empty_table()
    head, offsets = _headers(batch)
    rows = np.flatnonzero(head["type"] == EV_CALL)
    if not len(rows):
        return schema.CALLS.empty_table()
    head, offsets = head[rows], offsets[rows]
    which = np.minimum(head["nr"], 1).astype(np.int8)
    function = np.clip(head["fd"], 0, len(schema.CALL_FUNCTIONS)).astype(np.int8)
    files = [
        _text(batch.buf[at + HEADER_SIZE : at + HEADER_SIZE + int(n)])
        for at, n in zip(offsets.tolist(), head["datalen"].tolist())
    ]
    raised = head["err"]
    return pa.Table.from_arrays(
        [
            pa.array(head["ts"].astype(np.int64) - boot_ns),
            pa.array(head["pid"].astype(np.int32)),
            pa.array(head["tid"].astype(np.int32)),
            pa.DictionaryArray.from_arrays(pa.array(which), _CALL_EVENT_VOCAB),
            pa.DictionaryArray.from_arrays(pa.array(function), _CALL_FUNCTION_VOCAB),
            pa.array(files, pa.string()),
            pa.array(head["fd2"].astype(np.int32)),
            # unknown (-1) at a return, and meaningless at an entry: null
            pa.array(raised == 1, mask=(raised < 0) | (which == 0)),
            pa.array(head["stack_id"].view(np.int64)),
            pa.array(head["stack_flags"].astype(np.int32)),
        ],
        schema=schema.CALLS,
    )


def _decode_paths(batch: Batch, offsets, head, etype, nr) -> pa.Array:
    """Paths as one Arrow string array: plain-text tails (file names) are sliced out of the
    batch in one gather; the few tails that need formatting (addresses, exec) go through
    Python."""
    datalen = head["datalen"].astype(np.int64)
    text = (datalen > 0) & np.isin(nr, _TEXT_TAIL_NRS) & ((etype == EV_BIRTH) | (etype == EV_FAIL))
    lengths = np.where(text, datalen, 0)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    total = int(ends[-1]) if len(ends) else 0
    source = np.repeat(offsets + HEADER_SIZE - starts, lengths) + np.arange(total)
    data = np.frombuffer(batch.buf, dtype=np.uint8)[source]
    value_offsets = np.concatenate([[0], ends]).astype(np.int32)
    binary = pa.Array.from_buffers(
        pa.binary(), len(head), [None, pa.py_buffer(value_offsets), pa.py_buffer(data.tobytes())]
    )
    try:
        paths = binary.cast(pa.string())
    except pa.ArrowInvalid:  # a name that is not UTF-8: escape its bytes instead
        paths = pa.array([_text(v) for v in binary.to_pylist()], pa.string())
    paths = pc.if_else(pa.array(text), paths, pa.scalar(None, pa.string()))
    memfd = np.flatnonzero(text & (nr == _MEMFD_NR))
    other = np.flatnonzero((datalen > 0) & ~text)
    if len(memfd) or len(other):
        values = paths.to_pylist()
        for i in memfd:
            values[i] = "memfd:" + values[i]
        for i in other:
            tail_at = int(offsets[i]) + HEADER_SIZE
            tail = batch.buf[tail_at : tail_at + int(datalen[i])]
            values[i] = _decode_tail(int(etype[i]), int(nr[i]), tail)
        paths = pa.array(values, pa.string())
    return paths


_VOCABS = {"op": _OP_VOCAB, "syscall": _SYSCALL_VOCAB, "kind": _KIND_VOCAB}


def _to_table(columns: dict, masks: dict, paths: pa.Array, keep: np.ndarray) -> pa.Table:
    arrays = []
    for fld in schema.EVENTS:
        if fld.name == "path":
            arrays.append(paths.filter(pa.array(keep)))
            continue
        values = columns[fld.name][keep]
        mask = masks[fld.name][keep] if fld.name in masks else None
        if pa.types.is_dictionary(fld.type):
            arrays.append(_dictionary_column(fld.type, values, mask, _VOCABS[fld.name]))
        else:
            numpy_type = fld.type.to_pandas_dtype()
            arrays.append(pa.array(values.astype(numpy_type, copy=False), fld.type, mask=mask))
    return pa.Table.from_arrays(arrays, schema=schema.EVENTS)


def _dictionary_column(arrow_type, codes: np.ndarray, mask, vocab: pa.Array) -> pa.Array:
    """Codes into a vocabulary, re-coded to the values present (small per-part dictionaries)."""
    present, compact = np.unique(codes, return_inverse=True)
    indices = pa.array(compact.astype(arrow_type.index_type.to_pandas_dtype()), mask=mask)
    return pa.DictionaryArray.from_arrays(indices, vocab.take(pa.array(present)))


def _expand_multi_fd(columns: dict, rows: np.ndarray, batch: Batch, offsets: np.ndarray, head):
    """pipe/pipe2/socketpair: one row per end naming its peer; recvmsg: one row per fd received.
    Returns _to_table's arguments for the new rows."""
    out: dict[str, list] = {name: [] for name in columns}
    unknown_kind = schema.KINDS.index("unknown")
    for i in rows:
        base = {name: col[i] for name, col in columns.items()}
        if int(head["nr"][i]) == syscalls.BY_NAME["recvmsg"].nr:
            tail_at = int(offsets[i]) + HEADER_SIZE
            tail = batch.buf[tail_at : tail_at + int(head["datalen"][i])]
            fds = [fd for (fd,) in struct.iter_unpack("<i", tail[: len(tail) // 4 * 4])]
            variants = [{"fd": fd, "kind": unknown_kind} for fd in fds]
        else:
            first, second = int(base["fd"]), int(base["src_fd"])
            variants = [{"fd": first, "src_fd": second}, {"fd": second, "src_fd": first}]
        for variant in variants:
            for name in columns:
                out[name].append(variant.get(name, base[name]))
    arrays = {name: np.array(values, dtype=columns[name].dtype) for name, values in out.items()}
    count = len(arrays["fd"])
    nothing = np.zeros(count, bool)
    paths = pa.nulls(count, pa.string())
    return arrays, {"cloexec": nothing, "kind": nothing}, paths, ~nothing


def _decode_tail(etype: int, nr: int, tail: bytes) -> str | None:
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
