"""Cost of the in-kernel Python stack walker (probes/pystack.h), side by side with bare runs.

Runs the target loop `with open('/dev/null', 'rb')` at 3 and at 48 Python frames, and a
Python-call-heavy loop with no fd syscalls, each bare and with a stack capture at every
openat (exit) and close (enter) of the target, records going to a ring buffer drained in
batches. Prints ns per iteration and the ratio to bare; interleaves runs and keeps medians.

    /opt/cmtrace/venv/bin/python benchmarks/bench_stacks.py [--python /usr/bin/python3.11]
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "integration"))  # stack_harness: the walker test's program

import stack_harness  # noqa: E402

from cmtrace.record.bpf.stacks import Symbolizer  # noqa: E402
from cmtrace.record.bpf.targets import PythonTargets  # noqa: E402

PROBES = r"""
struct ev { struct stack_ev_head head; s64 fd; };
static __always_inline int emit(void *ctx, u16 type, s64 fd) {
    struct ev *e = (struct ev *)capture_event(ctx, type, sizeof(struct ev));
    if (!e)
        return 0;
    e->fd = fd;
    events.ringbuf_submit(e, BPF_RB_NO_WAKEUP);
    return 0;
}
TRACEPOINT_PROBE(syscalls, sys_exit_openat) { return emit(args, 1, args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_close) { return emit(args, 2, args->fd); }
"""

WORKLOAD = r"""
import sys, time
kind, depth, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def loop_open():
    for _ in range(n):
        with open('/dev/null', 'rb'):
            pass
def f(x):
    return x + 1
def loop_calls():
    for i in range(n):
        f(i)
def nest(d):
    if d <= 0:
        sys.stdin.readline()  # the tracer is attached now
        t = time.perf_counter_ns()
        (loop_open if kind == 'open' else loop_calls)()
        return time.perf_counter_ns() - t
    return nest(d - 1)
print(nest(depth) / n, flush=True)
"""


STATS_SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")
PROGRAMS = (b"tracepoint__syscalls__sys_exit_openat", b"tracepoint__syscalls__sys_enter_close")


def bpf_time(bpf) -> tuple[int, int]:
    """(run_time_ns, run_cnt) summed over our programs: time spent inside BPF, which the
    machine's load does not inflate the way it inflates wall-clock ratios."""
    total_ns = total_cnt = 0
    for name in PROGRAMS:
        fd = bpf.load_func(name, bpf.TRACEPOINT).fd
        for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
            key, _, value = line.partition(":")
            if key == "run_time_ns":
                total_ns += int(value)
            elif key == "run_cnt":
                total_cnt += int(value)
    return total_ns, total_cnt


def run_once(
    bpf, targets: PythonTargets, python: str, kind: str, frames: int, n: int, traced: bool
) -> float:
    depth = frames - 3  # <module> -> nest(...)* -> loop -> (open: C; calls: f)
    proc = subprocess.Popen(
        [python, "-c", WORKLOAD, kind, str(depth), str(n)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    time.sleep(0.3)  # let it reach nest(0) and block
    if traced:
        target = targets.install(proc.pid)
        assert target.status in ("ok", "pending"), target.reason
    out, _ = proc.communicate(b"go\n", timeout=600)
    return float(out)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--python", default="/usr/bin/python3.11")
    parser.add_argument("-n", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    bpf = stack_harness.load(PROBES, ring_pages=4096)
    received = [0]
    targets = PythonTargets(bpf)
    symbolizer = Symbolizer(targets.interpreters)

    def on_record(_ctx, data, size):
        raw = ctypes.string_at(data, size)
        if stack_harness.record_type(raw) >= stack_harness.WALKER_RECORDS:
            symbolizer.on_record(raw)
        else:
            received[0] += 1

    bpf["events"].open_ring_buffer(on_record)
    stop = threading.Event()

    def drain():
        while not stop.is_set():
            bpf.ring_buffer_consume()
            time.sleep(0.02)

    drainer = threading.Thread(target=drain, daemon=True)
    drainer.start()
    cases = [("open", 3), ("open", 48), ("calls", 3)]
    results = {case: {"bare": [], "traced": [], "bpf_ns": []} for case in cases}
    stats_before = STATS_SYSCTL.read_text()
    STATS_SYSCTL.write_text("1\n")
    try:
        for _ in range(args.rounds):
            for case in cases:
                for traced in (False, True):
                    before = bpf_time(bpf)
                    took = run_once(bpf, targets, args.python, *case, n=args.n, traced=traced)
                    results[case]["traced" if traced else "bare"].append(took)
                    ns, cnt = (a - b for a, b in zip(bpf_time(bpf), before))
                    if traced and cnt:
                        results[case]["bpf_ns"].append(ns / cnt)
    finally:
        STATS_SYSCTL.write_text(stats_before)
    stop.set()
    drainer.join()
    bpf.ring_buffer_consume()
    lost = sum(bpf["lost"][ctypes.c_int(0)])
    print(f"interpreter {args.python}, n={args.n}, rounds={args.rounds}, median ns/iteration")
    for (kind, frames), runs in results.items():
        bare, traced = statistics.median(runs["bare"]), statistics.median(runs["traced"])
        in_bpf = f"{statistics.median(runs['bpf_ns']):6.0f}" if runs["bpf_ns"] else "     -"
        print(
            f"  {kind:5} {frames:2} frames: bare {bare:8.0f}  stacks {traced:8.0f}  "
            f"ratio {traced / bare:.2f}x  in-BPF ns/event {in_bpf}"
        )
    print(f"  events received {received[0]}, lost {lost}, stack rows {len(symbolizer.flush())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
