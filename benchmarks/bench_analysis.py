"""Scale benchmark of the analysis: report time beside the time of reading the trace.

    /opt/cmtrace/venv/bin/python benchmarks/bench_analysis.py              # all three traces
    /opt/cmtrace/venv/bin/python benchmarks/bench_analysis.py --traces real,diverse --rounds 3

Three traces, each measured in fresh processes (so peak memory, VmHWM, is one analysis's alone):

- `simple`: 10M events of 16 processes opening and closing fds at three stacks (fd numbers
  reused), a steady 1 % leak at one site: the original scale benchmark (< 10 s, < 2 GB).
- `diverse`: 10M events with real stack diversity: 500,000 distinct stacks of 30-80 frames over
  2,000 files (user code, the standard library, site-packages), 1,000 processes forked by one
  root that each exec and exit, fd numbers reused, 1 % of opens leaked from 5,000 stacks.
- `real`: CPython's own test suite (test_tempfile test_subprocess test_socketserver
  test_selectors) recorded under `cmtrace run` with pyenv's 3.11, once: the recording is cached
  in ~/.cache/cmtrace-bench/ (needs root the first time).

For each: the floor (pd.read_parquet of events/ and stacks/ in one process), `cmtrace report
--format json` as a command and in-process (cmtrace.cli.main after the imports), the ratios
to the floor, and the peak memory of the floor and of the in-process report. Beside them, in
the same rounds (--outputs): every other output in-process, with its ratio to report json and
its peak memory: report text and html, the end-of-recording summary, plot, diff (the trace
against itself: two traces analysed), export (Perfetto JSON) and the pandas API (load(), .fds,
.leaks(), .sites(), .timeline(), each call timed).
Targets: real within 5x the floor and under 2 s; diverse within 10x, peak < 4 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cmtrace.trace import schema

PIDS = 16
EVENTS_PER_PART = 500_000
CACHE = Path(os.environ.get("CMTRACE_BENCH_CACHE", Path.home() / ".cache" / "cmtrace-bench"))
REAL_PYTHON = "/root/.pyenv/versions/3.11.7/bin/python3.11"
REAL_TESTS = ("test_tempfile", "test_subprocess", "test_socketserver", "test_selectors")


def _column(values, field: pa.Field) -> pa.Array:
    if pa.types.is_dictionary(field.type):
        return pa.array(values, type=pa.string()).dictionary_encode().cast(field.type)
    return pa.array(values, type=field.type)


def make_simple_trace(path: Path, n_events: int, seed: int = 7) -> None:
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
    _write_events(path, cols)
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


# --- diverse: deep, varied stacks from many processes -------------------------------------
FILES = 2_000
CODES_PER_FILE = 20  # functions per file
PROCESSES = 1_000  # one root and its forked children, each of which execs
LEAK_STACKS = 5_000
ROWS_PER_STACK_PART = 2_000_000


def _file_names() -> list[str]:
    """2,000 files: 60 % user code, 25 % standard library, 15 % site-packages."""
    names = []
    for i in range(FILES):
        if i % 20 < 12:
            names.append(f"/srv/app/pkg{i % 40}/module{i}.py")
        elif i % 20 < 17:
            names.append(f"/usr/lib/python3.11/lib{i % 30}/std{i}.py")
        else:
            names.append(f"/usr/lib/python3/dist-packages/vendor{i % 25}/lib{i}.py")
    return names


def _write_diverse_stacks(path: Path, rng, n_stacks: int) -> np.ndarray:
    """n_stacks distinct stacks of 30-80 frames; returns their ids (in the order written)."""
    ids = np.unique(rng.integers(1, 2**62, int(n_stacks * 1.01)))[:n_stacks]
    ids = rng.permutation(ids)  # hashes: written in no particular order, as the writer does
    lengths = rng.integers(30, 81, n_stacks)
    rows = int(lengths.sum())
    starts = np.cumsum(lengths) - lengths
    depth = np.arange(rows) - np.repeat(starts, lengths)
    codes = rng.integers(0, FILES * CODES_PER_FILE, rows)
    # The outer 12 frames come from 50 shared entry paths (a runner, a server's middleware).
    prefixes = rng.integers(0, FILES * CODES_PER_FILE, (50, 12))
    from_top = np.repeat(lengths, lengths) - 1 - depth
    shared = from_top < 12
    prefix_of = np.repeat(rng.integers(0, 50, n_stacks), lengths)
    codes[shared] = prefixes[prefix_of[shared], from_top[shared]]
    # The innermost frame is one of a few hundred library functions (open, socket, close...).
    library = np.flatnonzero(np.arange(FILES * CODES_PER_FILE) // CODES_PER_FILE % 20 >= 12)
    leaves = rng.choice(library, 300, replace=False)
    codes[starts] = leaves[rng.integers(0, len(leaves), n_stacks)]
    file_code = (codes // CODES_PER_FILE).astype(np.int32)
    function_code = (codes % CODES_PER_FILE).astype(np.int32)
    firstlineno = (10 + function_code * 40).astype(np.int32)
    line = firstlineno + rng.integers(1, 8, rows).astype(np.int32)
    flags = np.where(codes % 53 == 0, schema.CODE_GENERATOR, 0).astype(np.int32)
    files = pa.array(_file_names())
    functions = pa.array([f"handler_{j}" for j in range(CODES_PER_FILE)])
    qualnames = pa.array([f"Service.handler_{j}" for j in range(CODES_PER_FILE)])
    stack_id = np.repeat(ids, lengths)
    for number, start in enumerate(range(0, rows, ROWS_PER_STACK_PART)):
        part = slice(start, start + ROWS_PER_STACK_PART)

        def text(codes_part, dictionary):
            return pa.DictionaryArray.from_arrays(pa.array(codes_part), dictionary).cast(
                pa.string()
            )

        table = pa.Table.from_arrays(
            [pa.array(stack_id[part]), pa.array(np.full(len(stack_id[part]), 2000, np.int32)),
             pa.array(depth[part].astype(np.int16)), text(function_code[part], functions),
             text(function_code[part], qualnames), text(file_code[part], files),
             pa.array(line[part]), pa.array(firstlineno[part]), pa.array(flags[part]),
             pa.array(np.zeros(len(stack_id[part]), np.int32))],
            schema=schema.STACK_FRAMES,
        )  # fmt: skip
        pq.write_table(table, path / "stacks" / f"part-{number:06d}.parquet", compression="zstd")
    return ids


def make_diverse_trace(path: Path, n_events: int, seed: int = 11) -> None:
    """See the module docstring: 500k distinct deep stacks per 10M events, 1,000 processes."""
    rng = np.random.default_rng(seed)
    for sub in ("events", "stacks", "sources"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    stack_ids = _write_diverse_stacks(path, rng, max(n_events // 20, 1_000))
    leak_stacks = rng.choice(stack_ids, LEAK_STACKS, replace=False)
    span = 60_000_000_000
    root = 2000
    children = np.arange(root + 1, root + PROCESSES)
    forked = np.sort(rng.integers(0, span * 5 // 6, len(children)))
    execed, exited = forked + 1_000_000, forked + span // 6
    pairs = (n_events - 3 * len(children)) // 2
    proc = rng.integers(0, PROCESSES, pairs)  # 0: the root
    lo = np.where(proc == 0, 0, forked[np.maximum(proc - 1, 0)] + 2_000_000)
    hi = np.where(proc == 0, span, exited[np.maximum(proc - 1, 0)] - 1_000_000)
    t_open = lo + (rng.random(pairs) * (hi - lo - 10_000)).astype(np.int64)
    by_time = np.argsort(t_open, kind="stable")
    t_open, proc = t_open[by_time], proc[by_time]
    pid = np.where(proc == 0, root, root + proc).astype(np.int32)
    leak = rng.random(pairs) < 0.01
    fd = np.where(leak, 100_000 + np.arange(pairs), 3 + np.arange(pairs) % 900).astype(np.int32)
    open_stack = np.where(
        leak, leak_stacks[rng.integers(0, LEAK_STACKS, pairs)], rng.choice(stack_ids, pairs)
    )
    close_stack = rng.choice(stack_ids, pairs)
    t_close = t_open + 1000
    kept = ~leak
    n_proc = len(children)
    t = np.concatenate([t_open, t_close[kept], forked, execed, exited])
    op = np.concatenate([np.zeros(pairs, np.int8), np.ones(kept.sum(), np.int8),
                         np.full(n_proc, 2, np.int8), np.full(n_proc, 3, np.int8),
                         np.full(n_proc, 4, np.int8)])  # fmt: skip
    cols = {
        "t_ns": t,
        "pid": np.concatenate(
            [pid, pid[kept], np.full(n_proc, root, np.int32), children, children]
        ).astype(np.int32),  # fmt: skip
        "tid": None,
        "fd": np.concatenate([fd, fd[kept], np.full(3 * n_proc, -1, np.int32)]),
        "stack_id": np.concatenate([open_stack, close_stack[kept], np.zeros(3 * n_proc, np.int64)]),
        "arg": np.concatenate(
            [np.zeros(pairs + kept.sum(), np.int64), children, np.zeros(2 * n_proc, np.int64)]
        ),  # fmt: skip
        "cloexec": np.concatenate(
            [rng.random(pairs) < 0.5, np.zeros(kept.sum() + 3 * n_proc, bool)]
        ),
    }
    order = np.argsort(t, kind="stable")
    cols = {k: (v[order] if v is not None else None) for k, v in cols.items()}
    cols["tid"] = cols["pid"]
    op = op[order]
    names = np.array(["birth", "close", "fork", "exec", "exit"], dtype=object)
    syscalls = np.array(["openat", "close", "clone", "execve", "exit_group"], dtype=object)
    paths = np.array([f"/var/lib/app/data{i}.db" for i in range(1000)], dtype=object)
    path_code = rng.integers(0, len(paths), len(op))
    cols["op"] = names[op]
    cols["syscall"] = syscalls[op]
    cols["kind"] = np.where(op == 0, "file", None)
    cols["path"] = np.where(op == 0, paths[path_code], np.where(op == 3, "/usr/bin/python3", None))
    _write_events(path, cols)
    meta = {"schema": 1, "status": "complete", "lost_events": 0, "events": len(op),
            "start_wall": 0.0, "end_wall": 60.0}  # fmt: skip
    (path / "meta.json").write_text(json.dumps(meta))


def _write_events(path: Path, cols: dict) -> None:
    n = len(cols["t_ns"])
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
        name = f"part-{start // EVENTS_PER_PART:06d}.parquet"
        pq.write_table(table, path / "events" / name, compression="zstd")


# --- real: CPython's test suite under `cmtrace run` ------------------------------------------
def record_real_trace(path: Path) -> None:
    """Record the test-suite run once (root: cmtrace loads BPF probes)."""
    if not Path(REAL_PYTHON).exists():
        raise SystemExit(f"{REAL_PYTHON} is missing: install pyenv's 3.11.7 (it ships `test`)")
    command = ["cmtrace", "run", "-q", "-o", str(path), "--force", "--",
               REAL_PYTHON, "-m", "test", *REAL_TESTS]  # fmt: skip
    print("recording:", " ".join(command), flush=True)
    subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    if not (path / "meta.json").exists():
        raise SystemExit(f"the recording wrote no trace in {path} (run as root)")


# --- measurement --------------------------------------------------------------------------
def measure_floor(path: Path) -> dict:
    """The cost of reading the data: pd.read_parquet of events/ and stacks/."""
    import pandas as pd

    started = time.perf_counter()
    events = pd.read_parquet(path / "events")
    stacks = pd.read_parquet(path / "stacks")
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "peak_mb": _peak_rss_kb() / 1024, "events": len(events),
            "stack_rows": len(stacks), "stacks": int(stacks["stack_id"].nunique())}  # fmt: skip


def measure_report(path: Path) -> dict:
    """`cmtrace report --format json` in this process, after the imports."""
    from cmtrace.cli import (
        main,
        report,  # noqa: F401  (imported before the clock starts)
    )

    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-report-{os.getpid()}.json"
    started = time.perf_counter()
    cpu_started = time.process_time()
    main(["report", "--format", "json", str(path), "-o", str(out)])
    seconds = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    leaks = len(json.loads(out.read_text()).get("leaks", []))
    out.unlink()
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_mb": _peak_rss_kb() / 1024,
            "leaks": leaks}  # fmt: skip


def _cli_output(*argv: str, suffix: str = "out"):
    """An output made by the command line in this process: `cmtrace ARGV -o FILE`."""

    def measure(path: Path) -> dict:
        from cmtrace.cli import diff, export, main, plot, report  # noqa: F401 (before the clock)

        out = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-output-{os.getpid()}.{suffix}"
        words = [w.replace("TRACE", str(path)) for w in argv]
        return _timed(lambda: main([*words, "-o", str(out)]), cleanup=out)

    return measure


def measure_summary(path: Path) -> dict:
    """The summary `cmtrace run` and `-p` print at the end of a recording."""
    import io

    from cmtrace.present import text

    return _timed(lambda: text.print_summary(path, file=io.StringIO()))


def measure_api(path: Path) -> dict:
    """The pandas API, call by call in one process: load(), .fds, .leaks(), .sites(),
    .timeline() (each call's own time; .fds does the analysis the others reuse)."""
    from cmtrace.analysis import load

    steps = {}
    started = time.perf_counter()
    trace = load(path)
    calls = [("fds", lambda: trace.fds), ("leaks", trace.leaks), ("sites", trace.sites),
             ("timeline", trace.timeline)]  # fmt: skip
    steps["load"] = time.perf_counter() - started
    for name, call in calls:
        t0 = time.perf_counter()
        call()
        steps[name] = time.perf_counter() - t0
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "peak_mb": _peak_rss_kb() / 1024, "steps": steps}


def _timed(action, cleanup: Path | None = None) -> dict:
    started = time.perf_counter()
    action()
    seconds = time.perf_counter() - started
    if cleanup is not None:
        cleanup.unlink(missing_ok=True)
    return {"seconds": seconds, "peak_mb": _peak_rss_kb() / 1024}


# Every other output, each timed beside `report --format json` (in a fresh process each).
OUTPUTS = {
    "text": _cli_output("report", "--format", "text", "TRACE"),
    "html": _cli_output("report", "--format", "html", "TRACE", suffix="html"),
    "summary": measure_summary,
    "plot": _cli_output("plot", "TRACE", suffix="png"),
    "diff": _cli_output("diff", "--format", "json", "TRACE", "TRACE"),
    "export": _cli_output("export", "TRACE", suffix="json"),
    "api": measure_api,
}


def measure_command(path: Path) -> dict:
    started = time.perf_counter()
    subprocess.run([*_cmtrace(), "report", "--format", "json", str(path)], check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    return {"seconds": time.perf_counter() - started}


def _cmtrace() -> list[str]:
    found = shutil.which("cmtrace")
    return [found] if found else [sys.executable, "-m", "cmtrace"]


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


MEASURES = {"floor": measure_floor, "report": measure_report, **OUTPUTS}
GENERATED = {"simple": make_simple_trace, "diverse": make_diverse_trace}
TARGETS = {"real": (5, 2.0, None), "diverse": (10, None, 4096), "simple": (None, 10.0, 2048)}


def trace_path(name: str, events: int) -> Path:
    if name == "real":
        return CACHE / "cpython-tests-3.11"
    return CACHE / f"{name}-{events}-v2"


def prepare(name: str, events: int) -> Path:
    path = trace_path(name, events)
    if (path / "meta.json").exists():
        return path
    started = time.perf_counter()
    if name == "real":
        record_real_trace(path)
    else:
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        GENERATED[name](tmp, events)
        tmp.rename(path)
    print(f"{name}: made {path} in {time.perf_counter() - started:.1f} s", flush=True)
    return path


def _in_child(what: str, path: Path) -> dict:
    """One measurement in a fresh process, so its peak memory is its own."""
    out = subprocess.run(
        [sys.executable, __file__, "--measure", what, "--trace", str(path)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench(name: str, path: Path, rounds: int, outputs: list[str]) -> dict:
    runs: dict[str, list[dict]] = {"floor": [], "report": [], "command": []}
    runs.update({f"out_{o}": [] for o in outputs})
    for _ in range(rounds):
        runs["floor"].append(_in_child("floor", path))
        runs["report"].append(_in_child("report", path))
        runs["command"].append(measure_command(path))
        for output in outputs:  # interleaved with the report's rounds: the same machine load
            runs[f"out_{output}"].append(_in_child(output, path))
    row = {key: _median(values, "seconds") for key, values in runs.items()}
    for key, values in runs.items():  # the spread: a shared machine's load moves times
        row[f"{key}_min"] = min(v["seconds"] for v in values)
        row[f"{key}_max"] = max(v["seconds"] for v in values)
    for output in outputs:
        row[f"out_{output}_peak_mb"] = max(r["peak_mb"] for r in runs[f"out_{output}"])
    if "api" in outputs:
        steps = runs["out_api"][0]["steps"]
        row.update(
            {f"api_{step}": _median([r["steps"] for r in runs["out_api"]], step) for step in steps}
        )
    floor = runs["floor"][0]
    row.update(
        trace=name, events=floor["events"], stacks=floor["stacks"], stack_rows=floor["stack_rows"],
        leaks=runs["report"][0]["leaks"],
        floor_peak_mb=max(r["peak_mb"] for r in runs["floor"]),
        report_peak_mb=max(r["peak_mb"] for r in runs["report"]),
        cpu=_median(runs["report"], "cpu_seconds"),
    )  # fmt: skip
    row["ratio_inproc"] = row["report"] / row["floor"]
    row["ratio_command"] = row["command"] / row["floor"]
    return row


def _median(values: list[dict], key: str) -> float:
    ordered = sorted(v[key] for v in values)
    return ordered[len(ordered) // 2]


def _verdict(row: dict) -> str:
    ratio, seconds, peak = TARGETS[row["trace"]]
    problems = []
    if ratio is not None and row["ratio_inproc"] > ratio:
        problems.append(f"> {ratio}x floor")
    if seconds is not None and row["report"] > seconds:
        problems.append(f"> {seconds} s")
    # The memory target holds for every output measured (the pandas API too), not only json.
    peaks = [v for k, v in row.items() if k == "report_peak_mb" or k.endswith("_peak_mb")
             and k.startswith("out_")]  # fmt: skip
    if peak is not None and max(peaks) > peak:
        problems.append(f"> {peak} MB")
    return "met" if not problems else "NOT met: " + ", ".join(problems)


def print_table(rows: list[dict]) -> None:
    header = (f"{'trace':8} {'events':>10} {'stacks':>8} {'rows':>10} {'floor s':>8} "
              f"{'report s':>9} {'command s':>10} {'x floor':>8} {'x cmd':>6} {'floor MB':>9} "
              f"{'report MB':>10}  target")  # fmt: skip
    print(header)
    for r in rows:
        print(f"{r['trace']:8} {r['events']:>10,} {r['stacks']:>8,} {r['stack_rows']:>10,} "
              f"{r['floor']:>8.2f} {r['report']:>9.2f} {r['command']:>10.2f} "
              f"{r['ratio_inproc']:>8.1f} {r['ratio_command']:>6.1f} {r['floor_peak_mb']:>9.0f} "
              f"{r['report_peak_mb']:>10.0f}  {_verdict(r)}")  # fmt: skip


def print_outputs(rows: list[dict], outputs: list[str]) -> None:
    """Each output's time and its ratio to `report --format json` in-process, side by side."""
    if not outputs:
        return
    print(f"\n{'trace':8} {'output':10} {'seconds':>8} {'x json':>7} {'peak MB':>8}")
    for r in rows:
        print(f"{r['trace']:8} {'json':10} {r['report']:>8.2f} {1.0:>7.1f} "
              f"{r['report_peak_mb']:>8.0f}")  # fmt: skip
        for output in outputs:
            seconds = r[f"out_{output}"]
            print(f"{r['trace']:8} {output:10} {seconds:>8.2f} {seconds / r['report']:>7.1f} "
                  f"{r[f'out_{output}_peak_mb']:>8.0f}")  # fmt: skip
        for key in ("floor", "report", "command", *(f"out_{o}" for o in outputs)):
            print(f"{'':8} {key:10} min {r[f'{key}_min']:.2f} s, median {r[key]:.2f} s, "
                  f"max {r[f'{key}_max']:.2f} s")  # fmt: skip
        steps = [k for k in r if k.startswith("api_")]
        if steps:
            print(
                f"{'':8} api calls (median): " + ", ".join(f"{k[4:]} {r[k]:.2f} s" for k in steps)
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traces", default="real,simple,diverse", help="comma-separated")
    parser.add_argument("--events", type=int, default=10_000_000, help="generated traces")
    parser.add_argument("--rounds", type=int, default=1, help="medians over N rounds")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument(
        "--outputs",
        default=",".join(OUTPUTS),
        help=f"outputs timed beside report json, comma-separated (default: {','.join(OUTPUTS)};"
        " '' for none)",
    )
    parser.add_argument("--measure", choices=sorted(MEASURES), help=argparse.SUPPRESS)
    parser.add_argument("--trace", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(MEASURES[args.measure](Path(args.trace))))
        return 0
    names = [n for n in args.traces.split(",") if n]
    paths = {name: prepare(name, args.events) for name in names}
    outputs = [o for o in args.outputs.split(",") if o]
    unknown = sorted(set(outputs) - set(OUTPUTS))
    if unknown:
        parser.error(f"unknown outputs: {', '.join(unknown)}")
    rows = []
    for name in names:
        rows.append(bench(name, paths[name], max(args.rounds, 1), outputs))
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v
                          for k, v in rows[-1].items()}), flush=True)  # fmt: skip
    print(f"load average {os.getloadavg()[0]:.1f}; {os.cpu_count()} CPUs")
    print_table(rows)
    print_outputs(rows, outputs)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0 if all(_verdict(r) == "met" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
