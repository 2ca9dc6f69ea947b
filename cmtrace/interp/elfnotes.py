"""USDT probes from an ELF file's SystemTap notes (`.note.stapsdt`), and CPython's call probes.

Pure ELF reading, no BPF: the recorder (`--calls`, cmtrace.record.bpf.calls) and `cmtrace doctor`
both read the notes here. Each note gives a probe's address, its semaphore (a u16 the program
checks before firing) and where its arguments live (`8@%r13`: an 8-byte value in r13).

CPython's python:function__entry / function__return fire in few builds (Debian's 3.8-3.10,
3.15+; 3.11 has them but they never fire, 3.12-3.14 have none; see README).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import BinaryIO

from elftools.elf.elffile import ELFFile

PROVIDER = "python"
ENTRY, RETURN = "function__entry", "function__return"
WHICH = {ENTRY: 0, RETURN: 1}
NT_STAPSDT = 3
ARG_REG, ARG_MEM, ARG_CONST = 0, 1, 2  # enum call_arg_kind in probes/events.h

# Index of each register's u64 slot in x86_64 struct pt_regs, sub-registers included.
_PT_REGS = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx",
            "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss")  # fmt: skip
_ALIASES = {
    "rax": ("eax", "ax", "al"), "rbx": ("ebx", "bx", "bl"), "rcx": ("ecx", "cx", "cl"),
    "rdx": ("edx", "dx", "dl"), "rsi": ("esi", "si", "sil"), "rdi": ("edi", "di", "dil"),
    "rbp": ("ebp", "bp", "bpl"), "rsp": ("esp", "sp", "spl"), "rip": ("eip",),
}  # fmt: skip
REGISTERS = {name: i for i, name in enumerate(_PT_REGS)}
REGISTERS.update({alias: REGISTERS[reg] for reg, names in _ALIASES.items() for alias in names})
REGISTERS.update({f"r{n}{suffix}": REGISTERS[f"r{n}"] for n in range(8, 16) for suffix in "dwb"})

_OPERAND = re.compile(r"^(?:%(?P<reg>\w+)|\$(?P<const>-?\d+)|(?P<off>-?\d*)\(%(?P<base>\w+)\))$")


# Builds whose notes describe the probes but whose interpreter never fires them.
NEVER_FIRE = {11: "CPython 3.11 has function__entry/return probes that never fire (gh-98894)"}


class UsdtError(Exception):
    """The probes cannot be read or used in this process; the message says why."""


@dataclass(frozen=True)
class Arg:
    kind: int
    reg: int = 0
    value: int = 0  # the constant, or the offset from the register for memory operands


@dataclass(frozen=True)
class Probe:
    provider: str
    name: str
    address: int  # link-time virtual address of the probe's nop
    semaphore: int  # link-time virtual address of its u16 semaphore, 0 if none
    args: tuple[Arg, ...]


def parse_arg(spec: str) -> Arg:
    """One argument of a stapsdt note: `8@%r13`, `-4@%eax`, `8@-16(%rbp)`, `-4@$5`."""
    _size, _, operand = spec.partition("@")
    match = _OPERAND.match(operand)
    if not match:
        raise UsdtError(f"unsupported USDT argument {spec!r}")
    if match["const"] is not None:
        return Arg(ARG_CONST, value=int(match["const"]))
    name = match["reg"] or match["base"]
    if name not in REGISTERS:
        raise UsdtError(f"unsupported register in USDT argument {spec!r}")
    if match["reg"]:
        return Arg(ARG_REG, REGISTERS[name])
    return Arg(ARG_MEM, REGISTERS[name], int(match["off"] or 0))


def _notes(data: bytes) -> Iterator[tuple[int, str, bytes]]:
    """(type, owner, desc) of each ELF note in a note section's bytes."""
    pos = 0
    while pos + 12 <= len(data):
        namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
        name_at = pos + 12
        desc_at = name_at + ((namesz + 3) & ~3)
        owner = data[name_at : name_at + namesz].rstrip(b"\0").decode("ascii", "replace")
        yield ntype, owner, data[desc_at : desc_at + descsz]
        pos = desc_at + ((descsz + 3) & ~3)


@lru_cache(maxsize=16)
def read_probes(path: str) -> tuple[Probe, ...]:
    """The USDT probes described in an ELF file's .note.stapsdt section."""
    with open(path, "rb") as f:
        return probes_in(f)


def probes_in(elf_file: BinaryIO) -> tuple[Probe, ...]:
    """The USDT probes of an open ELF file. Probes whose arguments we cannot read keep an
    empty argument tuple (they are still listed)."""
    elf = ELFFile(elf_file)
    notes = elf.get_section_by_name(".note.stapsdt")
    if notes is None:
        return ()
    base_section = elf.get_section_by_name(".stapsdt.base")
    actual_base = base_section["sh_addr"] if base_section is not None else None
    probes = []
    for ntype, owner, desc in _notes(notes.data()):
        if ntype != NT_STAPSDT or owner != "stapsdt" or len(desc) < 24:
            continue
        pc, base, semaphore = struct.unpack_from("<QQQ", desc)
        provider, name, args = (desc[24:].split(b"\0") + [b"", b""])[:3]
        if actual_base is not None and base:  # prelinked: notes keep link-time addresses
            pc += actual_base - base
            semaphore += actual_base - base if semaphore else 0
        try:
            parsed = tuple(parse_arg(a) for a in args.decode().split())
        except UsdtError:
            parsed = ()
        probes.append(Probe(provider.decode(), name.decode(), pc, semaphore, parsed))
    return tuple(probes)


def calls_unavailable(minor: int, probes: tuple[Probe, ...] | list[Probe]) -> str | None:
    """Why --calls cannot record in this interpreter (None: it can)."""
    if minor in NEVER_FIRE:
        return NEVER_FIRE[minor]
    if not any(is_call_probe(p) for p in probes):
        return (
            f"CPython 3.{minor} here has no python:function__entry/return USDT probes "
            "(CPython 3.12-3.14 removed them; pyenv/python.org builds lack them)"
        )
    return None


def is_call_probe(probe: Probe) -> bool:
    """python:function__entry/return with the three arguments we read."""
    return probe.provider == PROVIDER and probe.name in WHICH and len(probe.args) >= 3


def call_probes(path: str) -> list[Probe]:
    return [p for p in read_probes(path) if is_call_probe(p)]
