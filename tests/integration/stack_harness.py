"""A small bcc program of our own around the kernel stack walker (probes/pystack.h), for the
walker's test (test_pystack.py) and its benchmark (benchmarks/bench_stacks.py).

Each adds its own tracepoints and the payload after the record header; what they share is
here: the ring `events` (the walker writes its stack and code records into it too), and
capture_event(), which takes the calling thread's Python stack and reserves a record for it.
"""

from __future__ import annotations

from pathlib import Path

from cmtrace.record.bpf.loader import inline_pystack
from cmtrace.record.records import PYTHON_RECORD_MIN_TYPE

PROBES = Path(__file__).resolve().parents[2] / "probes"

# The header is laid out like the walker's own records (type at byte 16, stack id at 24), so a
# reader tells them apart by type: the walker's are WALKER_RECORDS and up.
CAPTURE = r"""
#include "pystack.h"
BPF_PERCPU_ARRAY(lost, u64, 1);
struct stack_ev_head { u64 ts; u32 pid; u32 tid; u16 type; u16 pad; u32 flags; u64 stack_id; };
/* A reserved record of `size` bytes (a header, then the caller's payload) with the stack of
 * the calling thread, or 0: not a traced process, or the ring is full (counted in `lost`). */
static __always_inline struct stack_ev_head *capture_event(void *ctx, u16 type, u32 size) {
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tgid = pid_tgid >> 32;
    if (!py_targets.lookup(&tgid))
        return 0;
    u32 flags = 0;
    u64 id = capture_python_stack(ctx, pid_tgid, &flags, 1);  /* with the finalizing flag */
    struct stack_ev_head *e = events.ringbuf_reserve(size);
    if (!e) {
        u32 zero = 0;
        u64 *n = lost.lookup(&zero);
        if (n) __sync_fetch_and_add(n, 1);
        return 0;
    }
    e->ts = bpf_ktime_get_ns(); e->pid = tgid; e->tid = (u32)pid_tgid; e->type = type;
    e->flags = flags; e->stack_id = id;
    return e;
}
"""
WALKER_RECORDS = PYTHON_RECORD_MIN_TYPE  # from here up: the walker's stack and code records


def load(probes: str, ring_pages: int):
    """The harness with `probes` (tracepoints calling capture_event) compiled and attached."""
    import bcc  # only where BPF programs are loaded

    text = f"BPF_RINGBUF_OUTPUT(events, {ring_pages});\n" + CAPTURE + probes
    return bcc.BPF(text=inline_pystack(text), cflags=[f"-I{PROBES}", "-Wno-unused-function"])


def record_type(raw: bytes) -> int:
    return int.from_bytes(raw[16:18], "little")
