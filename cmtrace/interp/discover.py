"""Find the CPython interpreter inside a live process: which ELF object, its load bias, version,
`_PyRuntime`, and the layout to walk its frames with (`cmtrace.interp.layouts`).

Works on unmodified interpreters without debug symbols: the names used (`_PyRuntime`,
`PyCode_Type`, `_Py_NoneStruct`, `Py_Version`) are exported in `.dynsym` of static and shared
builds alike. Mapped files are opened through `/proc/PID/map_files/` (falling back to
`/proc/PID/root/`), so interpreters in chroots, containers and deleted files work.

Used by both backends; imports neither bcc nor the collector. The BPF side (per-pid config of
probes/pystack.h) is `cmtrace.record.bpf.targets.PythonTargets`.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from cmtrace.interp import layouts
from cmtrace.interp.layouts import Layout, LayoutError

SYMBOLS = ("_PyRuntime", "PyCode_Type", "_Py_NoneStruct", "Py_Version", "PyDict_Type")
_NAME_VERSION = re.compile(rb"python3\.(\d+)")


class NotPython(Exception):
    """The process runs no CPython we can walk; str() is the reason for the summary."""


class NotReady(NotPython):
    """CPython will be there but is not mapped or initialised yet (just after exec)."""


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    offset: int
    path: str

    @property
    def map_file(self) -> str:
        return f"{self.start:x}-{self.end:x}"


@dataclass(frozen=True)
class Interpreter:
    """A CPython found in process `pid`; addresses are already relocated."""

    pid: int
    path: str  # as /proc/PID/maps names it
    version: str  # "3.11.2" when known, else "3.11"
    runtime: int  # &_PyRuntime
    code_type: int  # &PyCode_Type
    none: int  # &_Py_NoneStruct
    layout: Layout
    dict_type: int = 0  # &PyDict_Type (0: unknown), to check frames' f_globals
    bias: int = 0  # load bias of the ELF object that holds _PyRuntime (exe or libpython)
    opener: str = ""  # a path that opens that object from here (see _open_path)

    @property
    def finalizing_addr(self) -> int:
        return self.runtime + self.layout.runtime_finalizing

    @property
    def interpreters_head_addr(self) -> int:
        return self.runtime + self.layout.runtime_interpreters_head


def read_maps(pid: int) -> list[Mapping]:
    """File-backed mappings of `pid`, in address order."""
    try:
        text = Path(f"/proc/{pid}/maps").read_text()
    except OSError as exc:
        raise NotPython(f"cannot read /proc/{pid}/maps: {exc.strerror}") from exc
    result = []
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) == 6 and parts[5].startswith("/"):
            start, end = (int(x, 16) for x in parts[0].split("-"))
            result.append(Mapping(start, end, int(parts[2], 16), parts[5]))
    return result


def read_memory(pid: int, addr: int, size: int) -> bytes:
    """`size` bytes of the target's memory at `addr` (short or OSError when unmapped)."""
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        return os.pread(mem.fileno(), size, addr)


@dataclass(frozen=True)
class _ElfFacts:
    symbols: dict[str, int]  # defined dynamic symbols of interest -> unrelocated address
    needed_libpython: bool  # DT_NEEDED names a libpython (the exe is only a launcher)
    loads: tuple[tuple[int, int], ...]  # (p_offset, p_vaddr) of PT_LOAD segments


@lru_cache(maxsize=64)
def _elf_facts_cached(_key: tuple[int, int, int, int], opener: str) -> _ElfFacts:
    with open(opener, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        try:
            return _fast_elf_facts(data)
        except (ValueError, IndexError, KeyError, struct.error):
            pass
    return _pyelftools_facts(opener)  # no GNU hash table, or an unusual file


def _pyelftools_facts(opener: str) -> _ElfFacts:
    with open(opener, "rb") as f:
        elf = ELFFile(f)
        symbols = _lookup_symbols(elf)
        needed = False
        dynamic = elf.get_section_by_name(".dynamic")
        if dynamic is not None:
            needed = any(
                tag.entry.d_tag == "DT_NEEDED" and tag.needed.startswith("libpython")
                for tag in dynamic.iter_tags()
            )
        loads = tuple(
            (seg["p_offset"], seg["p_vaddr"])
            for seg in elf.iter_segments()
            if seg["p_type"] == "PT_LOAD"
        )
        return _ElfFacts(symbols, needed, loads)


_DT_NEEDED, _DT_STRTAB, _DT_SYMTAB, _DT_GNU_HASH = 1, 5, 6, 0x6FFFFEF5


def _fast_elf_facts(data) -> _ElfFacts:
    """ELF64 little-endian facts through the dynamic section and the GNU hash table: well
    under a millisecond, where a general ELF library takes several. A process that execs and
    exits within 20 ms must be configured before its first Python line runs."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a little-endian ELF64 file")
    phoff, phentsize, phnum = (
        struct.unpack_from("<Q", data, 0x20)[0],
        *struct.unpack_from("<HH", data, 0x36),
    )
    loads, dynamic = [], None
    for i in range(phnum):
        p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, phoff + i * phentsize
        )
        if p_type == 1:
            loads.append((p_offset, p_vaddr, p_filesz))
        elif p_type == 2:
            dynamic = (p_offset, p_filesz)
    if dynamic is None:
        raise ValueError("no dynamic section")

    def file_offset(vaddr: int) -> int:
        for p_offset, p_vaddr, p_filesz in loads:
            if p_vaddr <= vaddr < p_vaddr + p_filesz:
                return int(vaddr - p_vaddr + p_offset)
        raise ValueError(f"address {vaddr:#x} is not in the file")

    tags: dict[int, int] = {}
    needed_offsets = []
    for pos in range(dynamic[0], dynamic[0] + dynamic[1], 16):
        tag, value = struct.unpack_from("<qQ", data, pos)
        if tag == 0:
            break
        if tag == _DT_NEEDED:
            needed_offsets.append(value)
        tags.setdefault(tag, value)
    strtab, symtab = file_offset(tags[_DT_STRTAB]), file_offset(tags[_DT_SYMTAB])
    gnu_hash = file_offset(tags[_DT_GNU_HASH])

    def string(offset: int) -> bytes:
        return bytes(data[strtab + offset : data.find(b"\0", strtab + offset)])

    needed = any(string(off).startswith(b"libpython") for off in needed_offsets)
    symbols = {}
    for name in SYMBOLS:
        value = _gnu_hash_lookup(data, gnu_hash, symtab, string, name.encode())
        if value is not None:
            symbols[name] = value
    return _ElfFacts(symbols, needed, tuple((off, vaddr) for off, vaddr, _ in loads))


def _gnu_hash_lookup(data, table: int, symtab: int, string, name: bytes) -> int | None:
    """st_value of the defined dynamic symbol `name`, via DT_GNU_HASH."""
    nbuckets, symoffset, bloom_size, _shift = struct.unpack_from("<IIII", data, table)
    buckets = table + 16 + 8 * bloom_size
    chain = buckets + 4 * nbuckets
    h = 5381
    for byte in name:
        h = (h * 33 + byte) & 0xFFFFFFFF
    index = struct.unpack_from("<I", data, buckets + 4 * (h % nbuckets))[0]
    if index < symoffset:
        return None
    while True:
        link = struct.unpack_from("<I", data, chain + 4 * (index - symoffset))[0]
        if link | 1 == h | 1:
            st_name, _info, _other, shndx, value = struct.unpack_from(
                "<IBBHQ", data, symtab + 24 * index
            )
            if string(st_name) == name:
                return value if shndx != 0 else None
        if link & 1:
            return None
        index += 1


def _lookup_symbols(elf: ELFFile) -> dict[str, int]:
    """Defined dynamic symbols of interest -> unrelocated address.

    The GNU hash table finds them in ~2 ms; scanning .dynsym takes ~100 ms, too slow to
    configure a process that exits 20 ms after exec."""
    table = elf.get_section_by_name(".gnu.hash") or elf.get_section_by_name(".hash")
    found = {}
    for name in SYMBOLS:
        if table is not None:
            symbol = table.get_symbol(name)
        else:
            hits = (elf.get_section_by_name(".dynsym") or _NoSymbols).get_symbol_by_name(name)
            symbol = hits[0] if hits else None
        if symbol is not None and symbol["st_shndx"] != "SHN_UNDEF":
            found[name] = symbol["st_value"]
    return found


class _NoSymbols:
    @staticmethod
    def get_symbol_by_name(_name: str) -> None:
        return None


def _open_path(pid: int, mapping: Mapping) -> str:
    """A path that opens the mapped file from here, even across chroots and mount namespaces."""
    for candidate in (
        f"/proc/{pid}/map_files/{mapping.map_file}",
        f"/proc/{pid}/root{mapping.path}",
    ):
        if os.path.exists(candidate):
            return candidate
    return mapping.path


def _elf_facts(pid: int, mapping: Mapping) -> _ElfFacts | None:
    opener = _open_path(pid, mapping)
    try:
        st = os.stat(opener)
        return _elf_facts_cached((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns), opener)
    except (OSError, ELFError, ValueError):
        return None


def _load_bias(facts: _ElfFacts, first: Mapping) -> int:
    """Relocation of the object whose lowest mapping is `first`."""
    for p_offset, p_vaddr in facts.loads:
        if p_offset <= first.offset:
            return first.start - first.offset - (p_vaddr - p_offset)
    return first.start


def _objects(pid: int) -> list[Mapping]:
    """The lowest mapping of the main executable and of any libpython, exe first."""
    maps = read_maps(pid)
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError as exc:
        raise NotPython(f"cannot read /proc/{pid}/exe: {exc.strerror}") from exc
    exe = exe.removesuffix(" (deleted)")
    firsts: dict[str, Mapping] = {}
    for m in maps:
        name = os.path.basename(m.path)
        if m.path.removesuffix(" (deleted)") == exe or name.startswith("libpython3"):
            firsts.setdefault(m.path, m)
    return sorted(firsts.values(), key=lambda m: not m.path.startswith(exe))


def find_interpreter(pid: int) -> Interpreter:
    """Discover CPython in `pid`. Raises NotReady (retry later) or NotPython (give up)."""
    launcher_needs_lib = False
    for mapping in _objects(pid):
        facts = _elf_facts(pid, mapping)
        if facts is None:
            continue
        if "_PyRuntime" not in facts.symbols:
            launcher_needs_lib |= facts.needed_libpython
            continue
        bias = _load_bias(facts, mapping)
        addr = {name: value + bias for name, value in facts.symbols.items()}
        return _identify(pid, mapping, addr, bias)
    if launcher_needs_lib:
        raise NotReady("libpython is not mapped yet")
    raise NotPython("not CPython (no _PyRuntime in the executable or a libpython)")


def _identify(pid: int, mapping: Mapping, addr: dict[str, int], bias: int) -> Interpreter:
    runtime = addr["_PyRuntime"]
    layout, version = _layout_for(pid, mapping, addr)
    if "PyCode_Type" not in addr:
        raise NotPython("PyCode_Type is not exported")
    return Interpreter(
        pid=pid,
        path=mapping.path,
        version=version,
        runtime=runtime,
        code_type=addr["PyCode_Type"],
        none=addr.get("_Py_NoneStruct", 0),
        layout=layout,
        dict_type=addr.get("PyDict_Type", 0),
        bias=bias,
        opener=_open_path(pid, mapping),
    )


def _hex_version(value: int) -> str:
    return f"{value >> 24}.{(value >> 16) & 0xFF}.{(value >> 8) & 0xFF}"


def _layout_for(pid: int, mapping: Mapping, addr: dict[str, int]) -> tuple[Layout, str]:
    """3.13+: the live _Py_DebugOffsets; 3.11-3.12: Py_Version + table; older: the file name."""
    try:
        blob = read_memory(pid, addr["_PyRuntime"], layouts.DEBUG_OFFSETS_READ_SIZE)
    except OSError as exc:
        raise NotPython(f"cannot read the target's memory: {exc.strerror}") from exc
    try:
        if blob[:8] == layouts.DEBUG_COOKIE:
            return layouts.parse_debug_offsets(blob), _hex_version(
                struct.unpack_from("<Q", blob, 8)[0]
            )
        if "Py_Version" in addr:
            hexversion = struct.unpack("<I", read_memory(pid, addr["Py_Version"], 4))[0]
            return _checked_table(hexversion >> 24, (hexversion >> 16) & 0xFF), _hex_version(
                hexversion
            )
        match = _NAME_VERSION.search(os.path.basename(mapping.path).encode())
        if not match:
            raise NotPython(f"cannot tell the CPython version of {mapping.path}")
        minor = int(match.group(1))
        return _checked_table(3, minor), f"3.{minor}"
    except LayoutError as exc:
        raise NotPython(f"layout mismatch: {exc}") from exc


def _checked_table(major: int, minor: int) -> Layout:
    if major != 3 or not layouts.MIN_MINOR <= minor <= layouts.MAX_MINOR:
        raise NotPython(f"CPython {major}.{minor} is not supported (3.8-3.15 are)")
    return layouts.table_layout(minor)
