"""Scale benchmark of the analysis: N events -> leak report, wall time and peak memory.

    /opt/cmtrace/venv/bin/python benchmarks/bench_analysis.py --events 10000000

    /opt/cmtrace/venv/bin/python benchmarks/bench_analysis.py --trace /tmp/t10m --rounds 3

Builds a trace with the dataset writer's layout (events in parts of 500k, zstd Parquet): 16
processes opening and closing fds at a few stack sites (fd numbers reused), with a steady 1 %
leak at one site. Then times `load()` + `leaks()` + `sites()` in a fresh process per round and
reports its peak RSS (VmHWM). The issue's target: 10 million events in < 10 s, < 2 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cmtrace.trace import schema

PIDS = 16
EVENTS_PER_PART = 500_000


def _column(values, field: pa.Field) -> pa.Array:
    if pa.types.is_dictionary(field.type):
        return pa.array(values, type=pa.string()).dictionary_encode().cast(field.type)
    return pa.array(values, type=field.type)


def make_trace(path: Path, n_events: int, seed: int = 7) -> None:
    """Open/close pairs per pid (fds reused like a kernel would), 1 % of opens leak."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    for sub in ("events", "stacks", "sources"):
        (path / sub).mkdir(exist_ok=True)
    pairs = n_events // 2
    pid = rng.integers(1000, 1000 + PIDS, pairs)
    t_open = np.sort(rng.integers(0, 60_000_000_000, pairs))
    leak = rng.random(pairs) < 0.01
    # fds: a per-pid counter modulo a window keeps numbers reused, leaks get their own range.
    fd = np.where(leak, 100_000 + np.arange(pairs), 3 + (np.arange(pairs) % 900))
    t_close = t_open + 1000  # closed 1 us later, before the fd number is reused
    stack = np.where(leak, 2, 1)
    t = np.concatenate([t_open, t_close[~leak]])
    order = np.argsort(t, kind="stable")
    n = len(t)
    is_open = np.zeros(n, dtype=bool)
    is_open[:pairs] = True
    cols = {
        "t_ns": t[order],
        "pid": np.concatenate([pid, pid[~leak]])[order],
        "fd": np.concatenate([fd, fd[~leak]])[order],
        "stack_id": np.concatenate([stack, np.full((~leak).sum(), 3)])[order],
    }
    is_open = is_open[order]
    cols["tid"] = cols["pid"]
    cols["op"] = np.where(is_open, "birth", "close")
    cols["syscall"] = np.where(is_open, "openat", "close")
    cols["kind"] = np.where(is_open, "file", None)
    cols["path"] = np.where(is_open, "/var/lib/app/data.db", None)
    for start in range(0, n, EVENTS_PER_PART):
        part = slice(start, start + EVENTS_PER_PART)
        size = len(cols["t_ns"][part])
        arrays = []
        for field in schema.EVENTS:
            if field.name in cols:
                arrays.append(_column(cols[field.name][part], field))
            elif field.name in ("src_fd",):
                arrays.append(pa.array(np.full(size, -1), type=field.type))
            elif field.name in ("cloexec", "finalizing"):
                arrays.append(pa.array(np.zeros(size, dtype=bool)))
            else:
                arrays.append(pa.array(np.zeros(size), type=field.type))
        table = pa.Table.from_arrays(arrays, schema=schema.EVENTS)
        pq.write_table(table, path / "events" / f"part-{start // EVENTS_PER_PART:06d}.parquet",
                       compression="zstd")  # fmt: skip
    frames = [
        {"stack_id": 1, "pid": 1000, "depth": 0, "function": "read", "qualname": "Store.read",
         "file": "/srv/app/store.py", "line": 10, "firstlineno": 8, "code_flags": 0, "lasti": 0},
        {"stack_id": 2, "pid": 1000, "depth": 0, "function": "connect", "qualname": "connect",
         "file": "/srv/app/db.py", "line": 22, "firstlineno": 20, "code_flags": 0, "lasti": 0},
        {"stack_id": 3, "pid": 1000, "depth": 0, "function": "read", "qualname": "Store.read",
         "file": "/srv/app/store.py", "line": 12, "firstlineno": 8, "code_flags": 0, "lasti": 0},
    ]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(frames, schema=schema.STACK_FRAMES),
                   path / "stacks" / "part-000000.parquet")  # fmt: skip
    meta = {"schema": 1, "status": "complete", "lost_events": 0, "events": n,
            "start_wall": 0.0, "end_wall": 60.0}  # fmt: skip
    (path / "meta.json").write_text(json.dumps(meta))


def measure(path: Path) -> dict:
    """Load + leak report in this process; returns timings and peak RSS."""
    import cmtrace.analysis as cma

    started = time.perf_counter()
    cpu_started = time.process_time()
    trace = cma.load(path)
    leaks = trace.leaks()
    sites = trace.sites()
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    peak_kb = _peak_rss_kb()
    return {
        "events": int(trace._summary["rows"]),
        "lifetimes": int(len(trace.fds)),
        "leaks": int(len(leaks)),
        "sites": int(len(sites)),
        "seconds": round(elapsed, 2),
        "cpu_seconds": round(cpu, 2),  # wall time suffers when other jobs share the cores
        "load_average": round(os.getloadavg()[0], 1),
        "peak_rss_mb": round(peak_kb / 1024, 1),
    }


def _peak_rss_kb() -> int:
    """This process's peak RSS. Not ru_maxrss: Linux carries that over fork and exec, so a
    child of the (large) trace generator would report the generator's peak as its own."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--trace", help="reuse (or create) this trace directory")
    parser.add_argument("--rounds", type=int, default=1, help="measure N times (spread)")
    parser.add_argument("--measure-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_only:
        print(json.dumps(measure(Path(args.trace))))
        return 0
    with tempfile.TemporaryDirectory(prefix="cmtrace-bench-") as tmp:
        path = Path(args.trace or Path(tmp) / "trace")
        if not (path / "meta.json").exists():
            started = time.perf_counter()
            make_trace(path, args.events)
            print(f"generated {args.events} events in {time.perf_counter() - started:.1f} s")
        results = [_measure_in_child(path) for _ in range(max(args.rounds, 1))]
        if len(results) > 1:
            for key in ("seconds", "cpu_seconds", "peak_rss_mb"):
                values = sorted(r[key] for r in results)
                print(
                    f"{key}: min {values[0]}  median {values[len(values) // 2]}  max {values[-1]}"
                )
        ok = all(r["seconds"] < 10 and r["peak_rss_mb"] < 2048 for r in results)
        print("target (< 10 s, < 2 GB):", "met" if ok else "NOT met", f"({len(results)} rounds)")
        return 0 if ok else 1


def _measure_in_child(path: Path) -> dict:
    """One round in a fresh process, so peak memory is the analysis's alone."""
    out = subprocess.run(
        [sys.executable, __file__, "--trace", str(path), "--measure-only"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    result = json.loads(out.stdout)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    sys.exit(main())
