"""Drained fd records -> Arrow tables that follow cmtrace.trace.schema (EVENTS, CALLS).

Decoding is vectorised with numpy: the kernel may send a few hundred thousand records a second
and the recorder must keep up on the second core. Only records with a data tail (a path or an
address) and the rare multi-fd births (pipe, socketpair, SCM_RIGHTS) take a Python path.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

import numpy as np
import pyarrow as pa

from cmtrace.record import syscalls
from cmtrace.record.records import (
    EV_ADDR,
    EV_BIRTH,
    EV_CALL,
    EV_CLOEXEC,
    EV_CLOSE,
    EV_CLOSE_RANGE,
    EV_EXEC,
    EV_EXIT,
    EV_FAIL,
    EV_FORK,
    HEADER_SIZE,
    PYTHON_RECORD_MIN_TYPE,
    Batch,
)
from cmtrace.trace import schema

OP_BY_TYPE = {
    EV_BIRTH: schema.OP_BIRTH, EV_CLOSE: schema.OP_CLOSE, EV_CLOSE_RANGE: schema.OP_CLOSE_RANGE,
    EV_FAIL: schema.OP_FAIL, EV_CLOEXEC: schema.OP_CLOEXEC, EV_ADDR: schema.OP_ADDR,
    EV_FORK: schema.OP_FORK, EV_EXEC: schema.OP_EXEC, EV_EXIT: schema.OP_EXIT,
}  # fmt: skip
PROCESS_SYSCALL = {EV_FORK: "fork", EV_EXEC: "execve", EV_EXIT: "exit"}

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
# connect and bind name the peer or local address; accept and accept4 the peer's
_SOCKADDR_NRS = {syscalls.BY_NAME[n].nr for n in ("connect", "bind", "accept", "accept4")}


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
# Tables indexed by syscall number or record type, so a batch is classified in one gather each
_TEXT_TAIL_BY_NR = np.isin(np.arange(_NR_SPACE), _TEXT_TAIL_NRS)
_MULTI_FD_BY_NR = np.isin(np.arange(_NR_SPACE), sorted(_MULTI_FD_NRS))
_PROCESS_SYSCALL_BY_TYPE: np.ndarray = np.full(PYTHON_RECORD_MIN_TYPE, -1, np.int64)
_PROCESS_SYSCALL_BY_TYPE[list(_PROCESS_SYSCALL_CODE)] = list(_PROCESS_SYSCALL_CODE.values())


def _headers(batch: Batch) -> tuple[np.ndarray, np.ndarray]:
    """The fixed 64-byte headers of a batch's records, and their offsets."""
    return batch.headers(), np.asarray(batch.offsets, dtype=np.int64)


def decode(batch: Batch, boot_ns: int) -> pa.Table:
    """Turn drained fd records into an Arrow table with the EVENTS schema (sorted by time)."""
    if not len(batch):
        return schema.EVENTS.empty_table()
    head, offsets = _headers(batch)
    etype: np.ndarray = head["type"].astype(np.int64)
    nr = np.minimum(head["nr"].astype(np.int64), _NR_SPACE - 1)
    flags = head["flags"]
    is_birth = etype == EV_BIRTH
    multi = is_birth & _MULTI_FD_BY_NR[nr]
    noop_dup2 = is_birth & (nr == _DUP2_NR) & (head["fd"] == head["fd2"])
    keep = ~(multi | noop_dup2 | (etype == EV_CALL))

    op = np.minimum(etype, PYTHON_RECORD_MIN_TYPE - 1)
    process_syscall = _PROCESS_SYSCALL_BY_TYPE[op]
    syscall_code = np.where(process_syscall >= 0, process_syscall, nr)
    kind_code = np.where(etype == EV_ADDR, _SOCKET_KIND, _KIND_CODE_BY_NR[nr])
    kind_valid = is_birth | (etype == EV_FAIL) | (etype == EV_ADDR)
    cloexec = _ALWAYS_CLOEXEC[nr] | ((flags & _CLOEXEC_BIT[nr]) != 0)
    cloexec |= (nr == _FCNTL_NR) & (flags == syscalls.F_DUPFD_CLOEXEC)
    cloexec = np.where(etype == EV_CLOEXEC, head["arg"] != 0, cloexec)
    cloexec_valid = is_birth | (etype == EV_CLOEXEC)
    stack_flags: np.ndarray = head["stack_flags"].astype(np.int64)
    columns = {
        "t_ns": head["ts"].astype(np.int64) - boot_ns,
        "pid": head["pid"].astype(np.int32),
        "tid": head["tid"].astype(np.int32),
        "op": op,
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
    if len(table) > 1 and not _in_time_order(table):
        table = table.sort_by([("t_ns", "ascending")])
    return table


def _in_time_order(table: pa.Table) -> bool:
    """The ptrace engine writes its records in time order: most batches need no sort."""
    t_ns = table.column("t_ns").to_numpy()
    return bool((t_ns[1:] >= t_ns[:-1]).all())


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


def _decode_paths(
    batch: Batch, offsets: np.ndarray, head: np.ndarray, etype: np.ndarray, nr: np.ndarray
) -> pa.Array:
    """Paths as one Arrow string array: plain-text tails (file names) are sliced out of the
    batch in one gather; the few tails that need formatting (addresses, exec) go through
    Python."""
    datalen: np.ndarray = head["datalen"].astype(np.int64)
    text = (datalen > 0) & _TEXT_TAIL_BY_NR[nr] & ((etype == EV_BIRTH) | (etype == EV_FAIL))
    lengths = np.where(text, datalen, 0)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    total = int(ends[-1]) if len(ends) else 0
    source = np.repeat(offsets + HEADER_SIZE - starts, lengths) + np.arange(total)
    data = np.frombuffer(batch.buf, dtype=np.uint8)[source]
    value_offsets = np.concatenate([[0], ends]).astype(np.int32)
    validity = pa.py_buffer(np.packbits(text, bitorder="little"))  # rows without text: null
    binary = pa.Array.from_buffers(
        pa.binary(), len(head), [validity, pa.py_buffer(value_offsets), pa.py_buffer(data)]
    )
    try:
        paths = binary.cast(pa.string())
    except pa.ArrowInvalid:  # a name that is not UTF-8: escape its bytes instead
        paths = pa.array([None if v is None else _text(v) for v in binary.to_pylist()], pa.string())
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


def _to_table(
    columns: dict[str, np.ndarray], masks: dict[str, np.ndarray], paths: pa.Array, keep: np.ndarray
) -> pa.Table:
    arrays = []
    every = bool(keep.all())  # the common case: no row is dropped, so no copy is made
    for fld in schema.EVENTS:
        if fld.name == "generators":  # BirthGenerators.attach fills the births that have them
            arrays.append(pa.nulls(int(keep.sum()) if not every else len(keep), fld.type))
            continue
        if fld.name == "path":
            arrays.append(paths if every else paths.filter(pa.array(keep)))
            continue
        values = columns[fld.name] if every else columns[fld.name][keep]
        mask = masks.get(fld.name)
        if mask is not None and not every:
            mask = mask[keep]
        if pa.types.is_dictionary(fld.type):
            arrays.append(_dictionary_column(fld.type, values, mask, _VOCABS[fld.name]))
        else:
            numpy_type = fld.type.to_pandas_dtype()
            arrays.append(pa.array(values.astype(numpy_type, copy=False), fld.type, mask=mask))
    return pa.Table.from_arrays(arrays, schema=schema.EVENTS)


def _dictionary_column(
    arrow_type: pa.DictionaryType, codes: np.ndarray, mask: np.ndarray | None, vocab: pa.Array
) -> pa.Array:
    """Codes into a vocabulary, re-coded to the values present (small per-part dictionaries)."""
    # counting, not sorting: the vocabularies are small and the codes many
    present = np.flatnonzero(np.bincount(codes, minlength=len(vocab)))
    recode: np.ndarray = np.zeros(len(vocab), np.int64)
    recode[present] = np.arange(len(present))
    compact = recode[codes]
    indices = pa.array(compact.astype(arrow_type.index_type.to_pandas_dtype()), mask=mask)
    return pa.DictionaryArray.from_arrays(indices, vocab.take(pa.array(present)))


def _expand_multi_fd(
    columns: dict[str, np.ndarray],
    rows: np.ndarray,
    batch: Batch,
    offsets: np.ndarray,
    head: np.ndarray,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], pa.Array, np.ndarray]:
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
    nothing: np.ndarray = np.zeros(count, bool)
    paths = pa.nulls(count, pa.string())
    return arrays, {"cloexec": nothing, "kind": nothing}, paths, ~nothing


def _decode_tail(etype: int, nr: int, tail: bytes) -> str | None:
    if etype in (EV_ADDR, EV_BIRTH) and nr in _SOCKADDR_NRS:
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
