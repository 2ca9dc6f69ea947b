"""The cost floors of an eBPF fd tracer, for bench_overhead.py's floor-map and floor-ring modes.

    sudo /opt/cmtrace/venv/bin/python benchmarks/floor_probes.py map|ring PID

`map`: a BPF program that only keeps the live fds of PID in a kernel hash map (openat's exit
adds, close's entry deletes): what any tracer that knows which fds are open pays. `ring`: the
same plus one ring-buffer record per event, drained in batches as cmtrace drains its ring: what
shipping every event costs at least. No stacks, no paths. Prints "floor: attached to PID" when
the probes are live and runs until PID exits.
"""

from __future__ import annotations

import os
import sys
import time

from cmtrace.record.bpf.loader import import_bcc
from cmtrace.record.bpf.ring import RingReader

RING_PAGES = 1024
SOURCE = r"""
struct rec {
    u64 ts;
    u32 pid;
    s32 fd;
    u32 type;
    u32 pad;
};

BPF_HASH(traced, u32, u8, 16);
BPF_HASH(live, u64, u64, 65536);
BPF_RINGBUF_OUTPUT(events, RING_PAGES);

static __always_inline int ship(u32 pid, s32 fd, u32 type, u64 ts) {
#ifdef WITH_RING
    struct rec r = {.ts = ts, .pid = pid, .fd = fd, .type = type};
    events.ringbuf_output(&r, sizeof(r), BPF_RB_NO_WAKEUP);
#endif
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_openat) {
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    if (!traced.lookup(&pid) || args->ret < 0)
        return 0;
    u64 key = ((u64)pid << 32) | (u32)args->ret;
    u64 ts = bpf_ktime_get_ns();
    live.update(&key, &ts);
    return ship(pid, args->ret, 1, ts);
}

TRACEPOINT_PROBE(syscalls, sys_enter_close) {
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    if (!traced.lookup(&pid))
        return 0;
    u64 key = ((u64)pid << 32) | (u32)args->fd;
    live.delete(&key);
    return ship(pid, args->fd, 2, bpf_ktime_get_ns());
}
"""


def main(kind: str, pid: int) -> int:
    import ctypes  # noqa: PLC0415

    bcc = import_bcc()
    flags = [f"-DRING_PAGES={RING_PAGES}"] + (["-DWITH_RING"] if kind == "ring" else [])
    bpf = bcc.BPF(text=SOURCE, cflags=flags)
    bpf["traced"][ctypes.c_uint32(pid)] = ctypes.c_uint8(1)
    ring = RingReader(bpf["events"].map_fd, RING_PAGES * 4096)
    print(f"floor: attached to {pid}", file=sys.stderr, flush=True)
    while os.path.exists(f"/proc/{pid}"):
        ring.read()  # consume in batches, as cmtrace does (no per-record callback)
        time.sleep(0.02)
    ring.close()
    bpf.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
