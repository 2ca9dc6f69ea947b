#!/usr/bin/env python3
"""How hard the kernel's verifier works on each probe program: `processed N insns` per program
(exit 1 when the kernel refuses one).

The verifier gives up at 1,000,000 processed instructions (E2BIG, "Argument list too long"), and
older kernels prune fewer states than newer ones: a walker change that costs 30 % more on 6.18
can cost several times more on 6.1. This loads each program of the probes (with stacks) once
more, by hand, with the verifier's statistics log (BPF_LOG_STATS), and prints what it says, so a
change can be measured on the host and in the VM guest before it fails there.

    sudo /opt/cmtrace/venv/bin/python scripts/verifier-stats.py [--calls] [--aggregate]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import sys

from cmtrace.record.bpf import aggregate, loader

BPF_PROG_LOAD = 5
BPF_PROG_TYPE_TRACEPOINT = 5
BPF_LOG_STATS = 4
SYS_BPF = 321  # x86_64
VERIFIER_LIMIT = 1_000_000  # processed instructions (BPF_COMPLEXITY_LIMIT_INSNS)
RING_PAGES = 64  # sizes the ring map only: no effect on what the verifier explores
# the syscall programs loader.attach_syscalls attaches (the sched ones are small)
PROGRAMS = ("on_sys_enter", *loader.DEDICATED_ENTRY.values(), "on_sys_exit")


class ProgLoadAttr(ctypes.Structure):
    _fields_ = [
        ("prog_type", ctypes.c_uint32),
        ("insn_cnt", ctypes.c_uint32),
        ("insns", ctypes.c_uint64),
        ("license", ctypes.c_uint64),
        ("log_level", ctypes.c_uint32),
        ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_uint64),
        ("kern_version", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32),
        ("rest", ctypes.c_uint8 * 96),
    ]


def verify(insns: bytes) -> tuple[int, str]:
    """Load `insns` as a tracepoint program with the statistics log; (errno or 0, the log)."""
    libc = ctypes.CDLL(None, use_errno=True)
    code = ctypes.create_string_buffer(insns, len(insns))
    license_ = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(1 << 16)
    attr = ProgLoadAttr(
        prog_type=BPF_PROG_TYPE_TRACEPOINT,
        insn_cnt=len(insns) // 8,
        insns=ctypes.addressof(code),
        license=ctypes.addressof(license_),
        log_level=BPF_LOG_STATS,
        log_size=len(log),
        log_buf=ctypes.addressof(log),
    )
    fd = libc.syscall(SYS_BPF, BPF_PROG_LOAD, ctypes.byref(attr), ctypes.sizeof(attr))
    err = ctypes.get_errno() if fd < 0 else 0
    if fd >= 0:
        os.close(fd)
    return err, log.value.decode(errors="replace")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", action="store_true", help="the probes as --calls builds them")
    parser.add_argument("--aggregate", action="store_true", help="as --aggregate builds them")
    args = parser.parse_args()
    bcc = loader.import_bcc()
    extra = aggregate.AggregateSettings().cflags() if args.aggregate else ()
    bpf = bcc.BPF(
        text=loader.probe_source(True), cflags=loader.cflags(RING_PAGES, args.calls, tuple(extra))
    )
    worst, failed = 0, 0
    for name in PROGRAMS:
        try:
            insns = bpf.dump_func(name.encode())
        except Exception:  # bcc: no such function in this build
            continue
        err, log = verify(insns)
        found = re.search(r"processed (\d+) insns.*", log)
        processed = int(found.group(1)) if found else -1
        worst = max(worst, processed)
        status = "ok" if not err else os.strerror(err)
        failed += bool(err)
        print(
            f"{name:16} {len(insns) // 8:6} insns  {status:24} {found.group(0) if found else log[-200:]}"
        )
    print(f"worst: {worst} of {VERIFIER_LIMIT} processed instructions ({os.uname().release})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
