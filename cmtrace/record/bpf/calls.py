"""`--calls`: arm CPython's USDT probes python:function__entry / function__return per process.

Every Python call then traps into the kernel, so this is opt-in evidence, never needed for
stacks. For each traced process whose interpreter has the probes (cmtrace.interp.elfnotes reads
them from the ELF object that holds _PyRuntime):

- tell the kernel program (`on_python_call` in probes/fdtrace.bpf.c) where each location's
  arguments live, keyed by (pid, address), and attach a uprobe there for that pid;
- raise the probe's semaphore in the process (a u16 the interpreter checks before firing), and
  lower it again when recording stops.
"""

from __future__ import annotations

import ctypes
import os
import struct
from typing import Any

from cmtrace.interp.discover import Interpreter
from cmtrace.interp.elfnotes import WHICH, Probe, UsdtError, call_probes, calls_unavailable

# (process start time, executable device, executable inode): see _image_identity
ImageIdentity = tuple[bytes, int, int]


class CallProbes:
    """Arms and disarms the --calls probes of traced processes on one loaded BPF object."""

    def __init__(self, bpf: Any) -> None:  # a loaded bcc.BPF (bcc ships no types)
        self.bpf = bpf
        # pid -> (identity of the image we armed, semaphore addresses raised in it)
        self.semaphores: dict[int, tuple[ImageIdentity, list[int]]] = {}

    def attach(self, pid: int, interp: Interpreter, inherited_from: int | None = None) -> int:
        """Arm the probes of `interp` in `pid`; returns
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


def _site_leaf(leaf: Any, probe: Probe) -> Any:  # a ctypes leaf of the call_sites map
    file, name, line = probe.args[:3]
    for field_name, arg in (("file", file), ("name", name), ("line", line)):
        slot = getattr(leaf, field_name)
        slot.kind, slot.reg, slot.value = arg.kind, arg.reg, ctypes.c_int64(arg.value).value
    leaf.which = WHICH[probe.name]
    return leaf


def _image_identity(pid: int) -> ImageIdentity:
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
