"""The probes' maps through bpf(2) itself (ctypes), for a collector that never loads bcc.

The probes are compiled and loaded in a short-lived child (loader.load_in_child), which hands
back each map's fd with bcc's description of its key and value types (the JSON of
`bpf_table_key_desc`). `Table` rebuilds those ctypes types and offers the part of bcc's
table API the collector uses: `t[key]`, `t[key] = value`, `del t[key]`, `pop`, `items`, `clear`,
`Key`, `Leaf`, `map_fd`; a per-CPU array's value is the list of each possible CPU's value,
as bcc gives it.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

SYS_BPF = 321  # x86_64 (cmtrace's BPF backend is x86_64 only: see btf.task_fsbase_offset)
BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM, BPF_MAP_DELETE_ELEM, BPF_MAP_GET_NEXT_KEY = 1, 2, 3, 4
BPF_MAP_GET_FD_BY_ID = 14
# enum bpf_map_type values whose value is one per possible CPU
PERCPU_TYPES = {5, 6, 10}  # PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH
ARRAY_TYPES = {2, 6}  # ARRAY, PERCPU_ARRAY: entries cannot be deleted (clear zeroes them)

# The C type names bcc's descriptions use
C_TYPES: dict[str, Any] = {
    "_Bool": ctypes.c_bool,
    "char": ctypes.c_char,
    "signed char": ctypes.c_byte,
    "unsigned char": ctypes.c_ubyte,
    "short": ctypes.c_short,
    "unsigned short": ctypes.c_ushort,
    "int": ctypes.c_int,
    "unsigned int": ctypes.c_uint,
    "long": ctypes.c_long,
    "unsigned long": ctypes.c_ulong,
    "long long": ctypes.c_longlong,
    "unsigned long long": ctypes.c_ulonglong,
    "float": ctypes.c_float,
    "double": ctypes.c_double,
    "__int128": ctypes.c_int64 * 2,
    "unsigned __int128": ctypes.c_uint64 * 2,
}
_KINDS = {"struct": ctypes.Structure, "struct_packed": ctypes.Structure, "union": ctypes.Union}


class _ElemAttr(ctypes.Structure):
    """union bpf_attr for the element commands."""

    _fields_ = [
        ("map_fd", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("key", ctypes.c_uint64),
        ("value", ctypes.c_uint64),  # or next_key
        ("flags", ctypes.c_uint64),
    ]


class _GetIdAttr(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint32), ("next_id", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _bpf(cmd: int, attr: ctypes.Structure) -> int:
    ret = int(_libc.syscall(SYS_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr)))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def decode_type(desc: Any) -> Any:
    """The ctypes type of one of bcc's JSON type descriptions (as bcc's own decoder reads them:
    a C type name, or [name, [fields], kind] with fields [name, type], [name, type, [count]],
    [name, type, bits] or a nested struct/union)."""
    if isinstance(desc, str):
        return C_TYPES[desc]
    anonymous: list[str] = []
    fields: list[tuple[Any, ...]] = []
    for field in desc[1]:
        if len(field) == 2:
            fields.append((field[0], decode_type(field[1])))
        elif isinstance(field[2], list):
            fields.append((field[0], decode_type(field[1]) * field[2][0]))
        elif isinstance(field[2], int):
            fields.append((field[0], decode_type(field[1]), field[2]))
        elif field[2] in _KINDS:
            name = field[0] or f"__anon{len(anonymous)}"
            if not field[0]:
                anonymous.append(name)
            fields.append((name, decode_type(field)))
        else:
            raise ValueError(f"unknown type description {field!r}")
    kind = desc[2] if len(desc) > 2 else "struct"
    attrs: dict[str, Any] = {"_anonymous_": anonymous, "_fields_": fields}
    if kind == "struct_packed":
        attrs["_pack_"] = 1
    return type(str(desc[0]), (_KINDS[kind],), attrs)


@lru_cache(maxsize=1)
def possible_cpus() -> int:
    """How many values a per-CPU map holds: /sys/devices/system/cpu/possible (e.g. 0-3)."""
    count = 0
    for part in Path("/sys/devices/system/cpu/possible").read_text().strip().split(","):
        low, _, high = part.partition("-")
        count += int(high or low) - int(low) + 1
    return count


class Table:
    """One map of the probes, by its fd (owned: close() closes it)."""

    def __init__(self, name: str, map_fd: int, map_type: int, key_desc: Any, leaf_desc: Any):
        self.name = name
        self.map_fd = map_fd
        self.map_type = map_type
        self.Key = decode_type(key_desc)  # noqa: N815 (bcc's spelling, which callers use)
        self.Leaf = decode_type(leaf_desc)  # noqa: N815
        self._percpu = map_type in PERCPU_TYPES
        self._simple = issubclass(self.Leaf, ctypes._SimpleCData)  # noqa: SLF001
        self._stride = (ctypes.sizeof(self.Leaf) + 7) & ~7  # per-CPU values are 8-byte aligned

    def _attr(self, key: Any, value: Any = None, flags: int = 0) -> _ElemAttr:
        return _ElemAttr(self.map_fd, 0, ctypes.addressof(key),
                         ctypes.addressof(value) if value is not None else 0, flags)  # fmt: skip

    def _key(self, key: Any) -> Any:
        return key if ctypes.sizeof(key) == ctypes.sizeof(self.Key) else self.Key(key)

    def __getitem__(self, key: Any) -> Any:
        key = self._key(key)
        if not self._percpu:
            value = self.Leaf()
            self._lookup(key, value)
            return value
        raw = ctypes.create_string_buffer(self._stride * possible_cpus())
        self._lookup(key, raw)
        values = [self.Leaf.from_buffer(raw, cpu * self._stride) for cpu in range(possible_cpus())]
        # bcc gives a C number as a Python int (an array of them reads so), a struct as is
        return [v.value for v in values] if self._simple else values

    def _lookup(self, key: Any, value: Any) -> None:
        try:
            _bpf(BPF_MAP_LOOKUP_ELEM, self._attr(key, value))
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise KeyError(key) from None
            raise

    def __setitem__(self, key: Any, value: Any) -> None:
        if self._percpu:
            raise NotImplementedError("per-CPU maps are only read here")
        if ctypes.sizeof(value) != ctypes.sizeof(self.Leaf):  # c_uint32(x) for a u64 value
            value = self.Leaf(value.value)
        _bpf(BPF_MAP_UPDATE_ELEM, self._attr(self._key(key), value))

    def __delitem__(self, key: Any) -> None:
        try:
            _bpf(BPF_MAP_DELETE_ELEM, self._attr(self._key(key)))
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise KeyError(key) from None
            raise

    def pop(self, key: Any, default: Any = None) -> Any:
        try:
            value = self[key]
            del self[key]
        except KeyError:
            return default
        return value

    def keys(self) -> Iterator[Any]:
        """Each key once (the next key is asked of the one before; a key deleted meanwhile
        restarts a hash's walk, as with bcc)."""
        key, previous = self.Key(), None
        while True:
            start = ctypes.addressof(previous) if previous is not None else 0  # None: the first
            attr = _ElemAttr(self.map_fd, 0, start, ctypes.addressof(key), 0)
            try:
                _bpf(BPF_MAP_GET_NEXT_KEY, attr)
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    return
                raise
            current = self.Key.from_buffer_copy(key)
            yield current
            previous = current

    def items(self) -> list[tuple[Any, Any]]:
        out = []
        for key in list(self.keys()):
            try:
                out.append((key, self[key]))
            except KeyError:
                continue  # deleted by the kernel since
        return out

    def clear(self) -> None:
        if self.map_type in ARRAY_TYPES:
            for key in list(self.keys()):
                self[key] = self.Leaf()
            return
        for key in list(self.keys()):
            self.pop(key)

    def close(self) -> None:
        os.close(self.map_fd)


def map_exists(map_id: int) -> bool:
    """Whether the kernel still holds the map with this id (tests: nothing left after a kill)."""
    try:
        os.close(_bpf(BPF_MAP_GET_FD_BY_ID, _GetIdAttr(map_id, 0, 0)))
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True
