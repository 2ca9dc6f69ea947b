"""Kernel struct member offsets from the running kernel's BTF (/sys/kernel/btf/vmlinux).

The installed kernel headers may not match the running kernel (here: 6.1 headers, 6.18 kernel),
so the one kernel offset the Python stack walker needs - `task_struct.thread.fsbase`, the
thread pointer that glibc/musl return as pthread_self() on x86_64 - is looked up here at run time.
"""

from __future__ import annotations

import struct
from functools import lru_cache
from pathlib import Path

VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")
BTF_MAGIC = 0xEB9F

KIND_INT, KIND_ARRAY, KIND_STRUCT, KIND_UNION, KIND_ENUM = 1, 3, 4, 5, 6
KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT = 8, 9, 10, 11
KIND_FUNC_PROTO, KIND_VAR, KIND_DATASEC, KIND_DECL_TAG, KIND_ENUM64 = 13, 14, 15, 17, 19
_QUALIFIERS = (KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT)


class BtfError(Exception):
    pass


def _trailing_size(kind: int, vlen: int) -> int:
    """Bytes of kind-specific data after each 12-byte btf_type."""
    if kind in (KIND_INT, KIND_VAR, KIND_DECL_TAG):
        return 4
    if kind == KIND_ARRAY:
        return 12
    if kind in (KIND_STRUCT, KIND_UNION, KIND_DATASEC, KIND_ENUM64):
        return 12 * vlen
    if kind in (KIND_ENUM, KIND_FUNC_PROTO):
        return 8 * vlen
    return 0


class Btf:
    """Just enough of a BTF reader to resolve struct members by name."""

    def __init__(self, data: bytes):
        magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != BTF_MAGIC:
            raise BtfError("not a BTF blob")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
        self._data = data
        self._strings = hdr_len + str_off
        self._types: list[int] = [0]  # type id -> byte position; id 0 is void
        pos, end = hdr_len + type_off, hdr_len + type_off + type_len
        while pos < end:
            self._types.append(pos)
            info = struct.unpack_from("<I", data, pos + 4)[0]
            pos += 12 + _trailing_size((info >> 24) & 0x1F, info & 0xFFFF)

    def _name(self, name_off: int) -> str:
        start = self._strings + name_off
        return self._data[start : self._data.index(b"\0", start)].decode()

    def _header(self, type_id: int) -> tuple[str, int, int, int, int]:
        pos = self._types[type_id]
        name_off, info, size_or_type = struct.unpack_from("<III", self._data, pos)
        kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
        return self._name(name_off), kind, vlen, info >> 31, size_or_type

    def find_struct(self, name: str) -> int:
        for type_id in range(1, len(self._types)):
            tname, kind, vlen, _, _ = self._header(type_id)
            if kind == KIND_STRUCT and tname == name and vlen:
                return type_id
        raise BtfError(f"struct {name} not in BTF")

    def _resolve(self, type_id: int) -> int:
        while True:
            _, kind, _, _, target = self._header(type_id)
            if kind not in _QUALIFIERS:
                return type_id
            type_id = target

    def member(self, type_id: int, name: str) -> tuple[int, int]:
        """(byte offset, member type id) of `name` in struct/union `type_id`, searching
        anonymous members too."""
        _, kind, vlen, kind_flag, _ = self._header(type_id)
        if kind not in (KIND_STRUCT, KIND_UNION):
            raise BtfError(f"type {type_id} is not a struct")
        pos = self._types[type_id] + 12
        for i in range(vlen):
            name_off, mtype, offset = struct.unpack_from("<III", self._data, pos + 12 * i)
            bits = offset & 0xFFFFFF if kind_flag else offset
            mname = self._name(name_off)
            if mname == name:
                return bits // 8, self._resolve(mtype)
            if not mname:
                try:
                    inner, inner_type = self.member(self._resolve(mtype), name)
                    return bits // 8 + inner, inner_type
                except BtfError:
                    continue
        raise BtfError(f"no member {name}")

    def offset_of(self, struct_name: str, path: str) -> int:
        """Byte offset of a dotted member path, e.g. offset_of("task_struct", "thread.fsbase")."""
        type_id, total = self.find_struct(struct_name), 0
        for part in path.split("."):
            offset, type_id = self.member(type_id, part)
            total += offset
        return total


@lru_cache(maxsize=1)
def task_fsbase_offset() -> int:
    """offsetof(struct task_struct, thread.fsbase) of the running kernel (x86_64)."""
    try:
        return Btf(VMLINUX_BTF.read_bytes()).offset_of("task_struct", "thread.fsbase")
    except (OSError, BtfError, struct.error) as exc:
        raise BtfError(f"cannot find task_struct.thread.fsbase in {VMLINUX_BTF}: {exc}") from exc
