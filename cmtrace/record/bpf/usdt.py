"""`--calls`: arm CPython's USDT probes python:function__entry / function__return per process.

Few builds fire them (Debian's 3.8-3.10, 3.15+; 3.11 has them but they never fire, 3.12-3.14
have none; see README), and every Python call then traps into the kernel, so this is opt-in
evidence, never needed for stacks. For each traced process whose interpreter has the probes:

- read the SystemTap notes (`.note.stapsdt`) of the ELF object that holds _PyRuntime: address,
  semaphore and argument locations (`8@%r13`: an 8-byte value in r13) of each probe;
- tell the kernel program (`on_python_call` in probes/fdtrace.bpf.c) where each location's
  arguments live, keyed by (pid, address), and attach a uprobe there for that pid;
- raise the probe's semaphore in the process (a u16 the interpreter checks before firing), and
  lower it again when recording stops.
"""

from __future__ import annotations

import ctypes
import os
import re
import struct
from dataclasses import dataclass
from functools import lru_cache

from elftools.elf.elffile import ELFFile

PROVIDER = "python"
ENTRY, RETURN = "function__entry", "function__return"
WHICH = {ENTRY: 0, RETURN: 1}
NT_STAPSDT = 3
ARG_REG, ARG_MEM, ARG_CONST = 0, 1, 2

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
    """The probes cannot be used in this process; the message says why."""


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


def _notes(data: bytes):
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


def probes_in(elf_file) -> tuple[Probe, ...]:
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


class CallProbes:
    """Arms and disarms the --calls probes of traced processes on one loaded BPF object."""

    def __init__(self, bpf) -> None:
        self.bpf = bpf
        # pid -> (identity of the image we armed, semaphore addresses raised in it)
        self.semaphores: dict[int, tuple[tuple, list[int]]] = {}

    def attach(self, pid: int, interp, inherited_from: int | None = None) -> int:
        """Arm the probes of `interp` (a cmtrace.interp.discover.Interpreter) in `pid`; returns
        the number of locations attached. Raises UsdtError when the build has none.
        `inherited_from`: pid is a fork of that armed process, whose raised semaphores it
        inherited: they are not raised again, only lowered when recording stops."""
        probes = call_probes(interp.opener or interp.path)
        reason = calls_unavailable(interp.layout.minor, probes)
        if reason:
            raise UsdtError(reason)
        self.forget(pid)
        sites = self.bpf["call_sites"]
        for probe in probes:
            key = sites.Key(pid, 0, probe.address + interp.bias)
            sites[key] = _site_leaf(sites.Leaf(), probe)
            self.bpf.attach_uprobe(
                name=interp.opener or interp.path,
                addr=probe.address,
                fn_name="on_python_call",
                pid=pid,
            )
        identity = _image_identity(pid)
        raised = []
        inherited = inherited_from is not None and inherited_from in self.semaphores
        for address in sorted({p.semaphore + interp.bias for p in probes if p.semaphore}):
            if not inherited:
                _add_to_semaphore(pid, address, +1)
            raised.append(address)
        self.semaphores[pid] = (identity, raised)
        return len(probes)

    def forget(self, pid: int) -> None:
        """A process that exec'd: its old image's semaphores went away with it."""
        self.semaphores.pop(pid, None)

    def disarm(self) -> None:
        """Lower the semaphores we raised in processes still alive and still running the image
        we armed (never write into a reused pid or a new exec); uprobes go with the BPF object."""
        for pid, (identity, addresses) in self.semaphores.items():
            try:
                if _image_identity(pid) != identity:
                    continue
                for address in addresses:
                    _add_to_semaphore(pid, address, -1)
            except OSError:
                pass  # the process is gone
        self.semaphores.clear()


def _site_leaf(leaf, probe: Probe):
    file, name, line = probe.args[:3]
    for field_name, arg in (("file", file), ("name", name), ("line", line)):
        slot = getattr(leaf, field_name)
        slot.kind, slot.reg, slot.value = arg.kind, arg.reg, ctypes.c_int64(arg.value).value
    leaf.which = WHICH[probe.name]
    return leaf


def _image_identity(pid: int) -> tuple:
    """(start time, executable's device and inode): changes with pid reuse and with exec."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        start = f.read().rsplit(b")", 1)[1].split()[19]
    st = os.stat(f"/proc/{pid}/exe")
    return start, st.st_dev, st.st_ino


def _add_to_semaphore(pid: int, address: int, delta: int) -> None:
    """The interpreter fires a probe only while its u16 semaphore is non-zero."""
    with open(f"/proc/{pid}/mem", "r+b", buffering=0) as mem:
        mem.seek(address)
        (value,) = struct.unpack("<H", mem.read(2))
        mem.seek(address)
        mem.write(struct.pack("<H", max(0, min(0xFFFF, value + delta))))
