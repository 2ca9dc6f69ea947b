"""What tracing costs the traced program: cmtrace vs strace vs tracemalloc, side by side.

    sudo /opt/cmtrace/venv/bin/python benchmarks/bench_overhead.py [--rounds 3] [--json FILE]
    sudo ... bench_overhead.py --pin both --rounds 5 --workloads raw@3,calls@3 \
        --modes bare,strace-f,strace-seccomp,strace,ptrace-run,ptrace-attach

Workloads (each run in a fresh target process, Debian's /usr/bin/python3 by default):
  open@3    200,000 x `with open('/dev/null', 'rb'): pass`, 3 Python frames on the stack
  raw@3     200,000 x `with open('/dev/null', 'rb', buffering=0): pass` (openat, fstat, close:
            the ptrace backend's target loop)
  open@48   the same loop with 48 Python frames on the stack
  raw@48    the raw loop with 48 Python frames on the stack
  calls@3   10,000,000 Python function calls, no fd syscall at all (3 frames)
  calls@48  the same with 48 frames
Ways to run each workload:
  bare              nothing attached
  cmtrace           `cmtrace -p PID` attached before the loop starts (defaults: Python stacks on)
  cmtrace-nostacks  `cmtrace -p PID --no-python-stacks` (the fd lifecycle alone)
  cmtrace-calls     `cmtrace -p PID --calls` (not a default mode: needs an interpreter whose
                    USDT probes fire, e.g. --python /opt/cmtrace/pythons/bin/python3.9)
  cmtrace-aggregate `cmtrace -p PID --aggregate` (short-lived fds counted in the kernel)
  floor-map         benchmarks/floor_probes.py map: a BPF program that only keeps the live fds
                    in a kernel map (openat exit, close entry); the cost of knowing what is open
  floor-ring        floor_probes.py ring: the same plus one ring record per event, drained in
                    batches: the least that shipping every event costs
  cmtrace-live      `cmtrace -p PID --live`, its live view drawn into a pseudo-terminal
                    (160x40, read and thrown away; no controlling terminal, so no keys)
  strace            `strace -f -e trace=openat,close -p PID` (fewer iterations by default,
                    because each one costs ~90x: per-iteration times stay comparable)
  strace-f          `strace -f -qq -e trace=openat,close -o /dev/null CMD` (strace starts it)
  strace-seccomp    the same with --seccomp-bpf: only openat and close stop the target
  ptrace-run        `cmtrace run --backend ptrace -- CMD` (Python stacks on)
  ptrace-attach     `cmtrace -p PID --backend ptrace`; both ptrace modes are skipped, saying
                    "not built yet", while `cmtrace run` has no --backend option
  tracemalloc       `python -X dev -X tracemalloc=25`
The strace and ptrace modes run on the raw@3, open@3 and calls@3 workloads only.
--pin pinned|unpinned|both: pinned runs the whole tool (tracer and target) under `taskset -c 0`,
as a user would pin it; ratios are to bare with the same pinning. Each row gives the median,
min and max over the rounds, and the load average is printed before and after (a ptrace stop
is two wake-ups, and a wake-up across CPUs costs 20-60 us on a loaded 2-CPU guest).
Rounds are interleaved (every workload and mode once per round, in turn) and the median of the
rounds is reported, because absolute times drift on a shared 2-core machine. Ratios are to bare
in the same run. For cmtrace runs, lost events come from the trace's meta.json, and the number of
fd births recorded for the target is checked against the loop count (a tracer that records
nothing would look very cheap).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]
DEFAULT_TARGET_PYTHON = "/usr/bin/python3"
DEFAULT_CMTRACE_PYTHON = "/opt/cmtrace/venv/bin/python"
WORKLOADS = {  # name -> (loop, frames)
    "open@3": ("open", 3),
    "raw@3": ("raw", 3),
    "open@48": ("open", 48),
    "raw@48": ("raw", 48),
    "calls@3": ("calls", 3),
    "calls@48": ("calls", 48),
}
MODES = ("bare", "cmtrace", "cmtrace-nostacks", "strace", "tracemalloc")
# opt-in with --modes
EXTRA_MODES = (
    "cmtrace-aggregate",
    "floor-map",
    "floor-ring",
    "cmtrace-calls",
    "cmtrace-live",
    "strace-f",
    "strace-seccomp",
    "ptrace-run",
    "ptrace-attach",
)
STRACE_RUN = ("strace", "-f", "-qq", "-e", "trace=openat,close", "-o", "/dev/null")
# Modes where the tool starts the target (the rest attach to a running one), as a prefix argv.
RUN_PREFIXES = {
    "strace-f": STRACE_RUN,
    "strace-seccomp": (*STRACE_RUN[:1], "--seccomp-bpf", *STRACE_RUN[1:]),
}
BPF_MODES = ("cmtrace", "cmtrace-nostacks", "cmtrace-calls", "cmtrace-live", "cmtrace-aggregate")
FLOOR_MODES = ("floor-map", "floor-ring")  # benchmarks/floor_probes.py (root too)
PTRACE_MODES = ("ptrace-run", "ptrace-attach")
TRACE_MODES = BPF_MODES + PTRACE_MODES  # write a cmtrace trace (lost events, births checked)
TOOL_MODES = ("strace", "strace-f", "strace-seccomp", *PTRACE_MODES)  # 3 workloads only
TOOL_WORKLOADS = ("raw@3", "open@3", "calls@3")
PINS = {"unpinned": (), "pinned": ("taskset", "-c", "0")}
CALLS_PER_OPEN = 50  # the call loop runs 50x the iterations (~0.5 s): each call is ~50 ns


# ---- the target side (runs inside the traced process) ----------------------------------------
def open_loop(n: int) -> None:
    for _ in range(n):
        with open("/dev/null", "rb"):
            pass


def raw_open_loop(n: int) -> None:
    for _ in range(n):
        with open("/dev/null", "rb", buffering=0):
            pass


def add_one(x: int) -> int:
    return x + 1


def call_loop(n: int) -> None:
    x = 0
    for _ in range(n):
        x = add_one(x)


def nest(levels: int, loop, n: int) -> float:
    """Run loop(n) with `levels` more frames of this function below it; return its seconds."""
    if levels > 0:
        return nest(levels - 1, loop, n)
    start = time.perf_counter()
    loop(n)
    return time.perf_counter() - start


def child_main(kind: str, frames: int, n: int) -> None:
    """<module> -> child_main -> nest x (frames - 3) -> loop: `frames` frames at the syscall."""
    loop = {"open": open_loop, "raw": raw_open_loop, "calls": call_loop}[kind]
    print("ready", flush=True)
    sys.stdin.readline()  # the tracer is attached
    seconds = nest(frames - 3, loop, n)
    print(json.dumps({"seconds": seconds, "iterations": n, "pid": os.getpid()}), flush=True)
    sys.stdin.readline()  # stay traced until the driver has read the tracer's counters


# ---- the driver --------------------------------------------------------------------------------
@dataclass
class Sample:
    per_iteration_ns: float
    lost_events: int | None = None
    births_recorded: int | None = None
    kernel_ns: float | None = None  # BPF programs' run time per iteration (--bpf-stats)
    kernel_ns_by_program: dict[str, float] = field(default_factory=dict)  # the same per program


@dataclass
class Config:
    target_python: str
    cmtrace_python: str
    iterations: int
    strace_iterations: int
    workdir: Path
    bpf_stats: bool = False
    results: dict = field(default_factory=dict)  # (workload, mode, pin) -> [Sample]


def iterations_for(config: Config, workload: str, mode: str) -> int:
    n = config.strace_iterations if mode.startswith("strace") else config.iterations
    return n * CALLS_PER_OPEN if WORKLOADS[workload][0] == "calls" else n


def run_prefix(config: Config, mode: str, trace: Path) -> list[str]:
    """The tool that starts the target in run modes (none for the attaching ones)."""
    if mode == "ptrace-run":
        return [
            config.cmtrace_python,
            "-m",
            "cmtrace",
            "run",
            "--backend",
            "ptrace",
            "-q",
            "-o",
            str(trace),
            "--",
        ]
    return list(RUN_PREFIXES.get(mode, ()))


def start_target(
    config: Config, workload: str, mode: str, n: int, pin: str, trace: Path
) -> subprocess.Popen:
    kind, frames = WORKLOADS[workload]
    flags = ["-X", "dev", "-X", "tracemalloc=25"] if mode == "tracemalloc" else []
    child = [config.target_python, *flags, str(HERE), "--child", kind, str(frames), str(n)]
    argv = [*PINS[pin], *run_prefix(config, mode, trace), *child]
    stderr = open(trace.with_suffix(".stderr"), "w")  # the tool's own messages, for errors
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True
    )
    stderr.close()
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError(f"target {argv} did not start: {read_stderr(trace)}")
    return proc


def read_stderr(trace: Path) -> str:
    try:
        return trace.with_suffix(".stderr").read_text()[-2000:]
    except OSError:
        return ""


def wait_for_line(stream, needle: str, timeout: float) -> list[str]:
    """Read `stream` on a thread until a line contains `needle`; keep reading it afterwards
    (so the writer never blocks on a full pipe). Returns the list the lines go into."""
    lines: list[str] = []
    seen = threading.Event()

    def pump() -> None:
        for line in stream:
            lines.append(line)
            if needle in line:
                seen.set()
        seen.set()

    threading.Thread(target=pump, daemon=True).start()
    if not seen.wait(timeout) or not any(needle in line for line in lines):
        raise RuntimeError(f"no {needle!r} within {timeout} s: {''.join(lines)[-2000:]}")
    return lines


def attach(config: Config, mode: str, pid: int, trace: Path, pin: str) -> subprocess.Popen:
    if mode == "strace":
        argv = ["strace", "-f", "-e", "trace=openat,close", "-o", str(trace), "-p", str(pid)]
        needle = "attached"
    elif mode in FLOOR_MODES:
        argv = [config.cmtrace_python, str(HERE.with_name("floor_probes.py")),
                mode.removeprefix("floor-"), str(pid)]  # fmt: skip
        needle = "floor: attached to"
    else:
        argv = [config.cmtrace_python, "-m", "cmtrace", "-p", str(pid), "-o", str(trace), "-q"]
        if mode == "cmtrace-nostacks":
            argv.append("--no-python-stacks")
        elif mode == "cmtrace-calls":
            argv.append("--calls")
        elif mode == "ptrace-attach":
            argv += ["--backend", "ptrace"]
        elif mode == "cmtrace-live":
            argv.append("--live")
        elif mode == "cmtrace-aggregate":
            argv.append("--aggregate")
        needle = "cmtrace: attached to"
    argv = [*PINS[pin], *argv]
    if mode == "cmtrace-live":
        return attach_on_pty(argv, needle)
    tracer = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    tracer.lines = wait_for_line(tracer.stderr, needle, timeout=180)
    return tracer


def attach_on_pty(argv: list[str], needle: str) -> subprocess.Popen:
    """The tracer with stderr on a 160x40 pseudo-terminal (its live view draws there), without
    our controlling terminal (it reads no keys from it). Not in a session of its own: with
    sched_autogroup a new session is a new CPU group, and the modes would not compare."""
    import fcntl  # noqa: PLC0415
    import pty  # noqa: PLC0415
    import struct  # noqa: PLC0415
    import termios  # noqa: PLC0415

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    tracer = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=slave,
                              preexec_fn=_drop_controlling_terminal)  # fmt: skip
    os.close(slave)
    lines: list[str] = []
    seen = threading.Event()

    def pump() -> None:  # read the screen as it is drawn, so the tracer never blocks on it
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the tracer closed its end
                data = b""
            if not data:
                break
            lines.append(data.decode(errors="replace"))
            if needle in "".join(lines[-2:]):
                seen.set()
        os.close(master)
        seen.set()

    threading.Thread(target=pump, daemon=True).start()
    if not seen.wait(180) or needle not in "".join(lines):
        raise RuntimeError(f"no {needle!r} within 180 s: {''.join(lines)[-2000:]}")
    tracer.lines = lines
    return tracer


def _drop_controlling_terminal() -> None:
    """TIOCNOTTY: a process that leads no session just loses its controlling terminal."""
    import fcntl  # noqa: PLC0415
    import termios  # noqa: PLC0415

    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError:
        return  # none to drop
    try:
        fcntl.ioctl(fd, termios.TIOCNOTTY)
    finally:
        os.close(fd)


def bpf_prog_time(pid: int) -> dict[str, int]:
    """Run time (ns) per BPF program name, over the programs process pid holds (their fdinfo
    carries the counters while kernel.bpf_stats_enabled is 1); "" when a name cannot be read."""
    times: dict[str, int] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:bpf-prog":
                continue
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
        name = bpf_prog_name(pid, int(fd))
        times[name] = times.get(name, 0) + int(fields.get("run_time_ns", "0"))
    return times


_LIBC = ctypes.CDLL(None, use_errno=True)
SYS_PIDFD_OPEN, SYS_PIDFD_GETFD, SYS_BPF = 434, 438, 321  # x86_64
BPF_OBJ_GET_INFO_BY_FD = 15
PROG_INFO_SIZE, PROG_NAME_AT, PROG_NAME_LEN = 256, 64, 16  # struct bpf_prog_info: name[16] at 64


def bpf_prog_name(pid: int, fd: int) -> str:
    """The name of process pid's BPF program fd (pidfd_getfd, then BPF_OBJ_GET_INFO_BY_FD)."""
    pidfd = _LIBC.syscall(SYS_PIDFD_OPEN, pid, 0)
    if pidfd < 0:
        return ""
    try:
        ours = _LIBC.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        if ours < 0:
            return ""
        try:
            info = ctypes.create_string_buffer(PROG_INFO_SIZE)
            attr = struct.pack("<IIQ", ours, PROG_INFO_SIZE, ctypes.addressof(info))
            attr_buf = ctypes.create_string_buffer(attr, 64)
            if _LIBC.syscall(SYS_BPF, BPF_OBJ_GET_INFO_BY_FD, attr_buf, 64) < 0:
                return ""
            raw = info.raw[PROG_NAME_AT : PROG_NAME_AT + PROG_NAME_LEN]
            return raw.split(b"\0", 1)[0].decode(errors="replace")
        finally:
            os.close(ours)
    finally:
        os.close(pidfd)


def attaches(mode: str) -> bool:
    return mode not in ("bare", "tracemalloc", "ptrace-run", *RUN_PREFIXES)


def run_once(config: Config, workload: str, mode: str, pin: str, seq: int) -> Sample:
    n = iterations_for(config, workload, mode)
    trace = config.workdir / f"{workload.replace('@', '-')}-{mode}-{pin}-{seq}"
    target = start_target(config, workload, mode, n, pin, trace)
    tracer = None
    kernel_ns = None
    try:
        if attaches(mode):
            tracer = attach(config, mode, target.pid, trace, pin)
        counting = config.bpf_stats and mode in BPF_MODES + FLOOR_MODES
        before = bpf_prog_time(tracer.pid) if counting else {}
        target.stdin.write("go\n")
        target.stdin.flush()
        result = json.loads(target.stdout.readline())
        per_program = {}
        if counting:
            after = bpf_prog_time(tracer.pid)
            per_program = {name: (ns - before.get(name, 0)) / result["iterations"]
                           for name, ns in after.items()}  # fmt: skip
            kernel_ns = sum(per_program.values())
        target.stdin.close()  # the target may exit now
        if target.wait(timeout=120) != 0 and not attaches(mode):
            raise RuntimeError(f"{mode} exited {target.returncode}: {read_stderr(trace)}")
        if tracer is not None and tracer.wait(timeout=120) != 0:
            complain_about(mode, tracer, trace)
    finally:
        for proc in (target, tracer):
            if proc is not None and proc.poll() is None:
                proc.kill()
    sample = Sample(result["seconds"] / result["iterations"] * 1e9, kernel_ns=kernel_ns)
    sample.kernel_ns_by_program = {k: v for k, v in per_program.items() if v >= 0.5}
    if mode in TRACE_MODES:
        sample.lost_events, sample.births_recorded = trace_counts(trace, result["pid"])
        shutil.rmtree(trace, ignore_errors=True)
    return sample


def complain_about(mode: str, tracer: subprocess.Popen, trace: Path) -> None:
    """A tracer that failed: fatal unless it is cmtrace's summary that failed after the trace
    was completed (the timing is then still valid; say so)."""
    tail = "".join(tracer.lines).strip().splitlines()[-1:]
    meta = trace / "meta.json"
    if mode in TRACE_MODES and meta.is_file():
        if json.loads(meta.read_text()).get("status") == "complete":
            print(
                f"  warning: {mode} exited {tracer.returncode} after completing the trace: {tail}",
                file=sys.stderr,
            )
            return
    raise RuntimeError(f"{mode} exited {tracer.returncode}: {''.join(tracer.lines)}")


def trace_counts(trace: Path, pid: int) -> tuple[int, int]:
    """(lost events from meta.json, fd births of pid recorded in the trace)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    meta = json.loads((trace / "meta.json").read_text())
    events = ds.dataset(trace / "events", format="parquet").to_table(columns=["pid", "op"])
    births = pc.and_(pc.equal(events["pid"], pid), pc.equal(events["op"].cast("string"), "birth"))
    recorded = int(pc.sum(births).as_py() or 0)
    if (trace / "counters").is_dir():  # --aggregate: fds counted in the kernel were born too
        counters = ds.dataset(trace / "counters", format="parquet").to_table()
        if counters.num_rows:
            mine = pc.equal(counters["pid"], pid)
            recorded += int(pc.sum(counters.filter(mine)["opened"]).as_py() or 0)
    return int(meta["lost_events"]), recorded


def applicable(workload: str, mode: str) -> bool:
    return mode not in TOOL_MODES or workload in TOOL_WORKLOADS


def run_rounds(
    config: Config, workloads: list[str], modes: list[str], pins: list[str], rounds: int
) -> None:
    for round_no in range(rounds):
        for workload in workloads:
            for mode in modes:
                if not applicable(workload, mode):
                    continue
                for pin in pins:
                    run_and_note(config, workload, mode, pin, round_no, rounds)


def run_and_note(
    config: Config, workload: str, mode: str, pin: str, round_no: int, rounds: int
) -> None:
    sample = run_once(config, workload, mode, pin, round_no)
    config.results.setdefault((workload, mode, pin), []).append(sample)
    print(
        f"  round {round_no + 1}/{rounds} {workload:9} {mode:17} {pin:8} "
        f"{sample.per_iteration_ns:10.1f} ns/iter"
        + (f"  lost {sample.lost_events}" if sample.lost_events is not None else ""),
        file=sys.stderr,
        flush=True,
    )


def summarize(
    config: Config, workloads: list[str], modes: list[str], pins: list[str]
) -> list[dict]:
    rows = []
    for workload in workloads:
        for pin in pins:
            for mode in modes:
                row = summary_row(config, workload, mode, pin)
                if row is not None:
                    rows.append(row)
    return rows


def summary_row(config: Config, workload: str, mode: str, pin: str) -> dict | None:
    bare_samples = config.results[(workload, "bare", pin)]
    bare = statistics.median(s.per_iteration_ns for s in bare_samples)
    samples = config.results.get((workload, mode, pin))
    if not samples:
        return None
    times = [s.per_iteration_ns for s in samples]
    median = statistics.median(times)
    lost = [s.lost_events for s in samples if s.lost_events is not None]
    births = [s.births_recorded for s in samples if s.births_recorded is not None]
    kernel = [s.kernel_ns for s in samples if s.kernel_ns is not None]
    return {
        "workload": workload,
        "mode": mode,
        "pin": pin,
        "iterations": iterations_for(config, workload, mode),
        "per_iteration_ns": round(median, 1),
        "ratio_to_bare": round(median / bare, 2),
        "min_ratio": round(min(times) / bare, 2),
        "max_ratio": round(max(times) / bare, 2),
        "rounds_ns": [round(t, 1) for t in times],
        "lost_events_max": max(lost) if lost else None,
        "births_recorded_min": min(births) if births else None,
        "bpf_ns_per_iteration": round(statistics.median(kernel), 1) if kernel else None,
        "bpf_ns_by_program": median_by_program(samples),
    }


def median_by_program(samples: list[Sample]) -> dict[str, float]:
    """Each BPF program's median ns per iteration over the rounds (the costliest first)."""
    names = {name for s in samples for name in s.kernel_ns_by_program}
    medians = {n: statistics.median(s.kernel_ns_by_program.get(n, 0.0) for s in samples)
               for n in names}  # fmt: skip
    return {n: round(v, 1) for n, v in sorted(medians.items(), key=lambda kv: -kv[1])}


def print_programs(rows: list[dict]) -> None:
    """--bpf-stats: where each mode's BPF time goes, per program (median ns per iteration)."""
    rows = [row for row in rows if row.get("bpf_ns_by_program")]
    if rows:
        print("BPF ns per iteration by program (median over the rounds):")
    for row in rows:
        parts = ", ".join(
            f"{name or '?'} {ns:.0f}" for name, ns in row["bpf_ns_by_program"].items()
        )
        print(f"  {row['workload']:10} {row['mode']:17} {row['pin']:8} {parts}")


def print_table(rows: list[dict]) -> None:
    print(
        f"{'workload':10} {'mode':17} {'pin':8} {'iterations':>10} {'per iter':>11} "
        f"{'x bare':>7} {'min-max x':>13} {'lost':>5} {'BPF ns/iter':>11}"
    )
    for row in rows:
        unit = "us" if row["per_iteration_ns"] >= 1000 else "ns"
        value = row["per_iteration_ns"] / (1000 if unit == "us" else 1)
        lost = "" if row["lost_events_max"] is None else str(row["lost_events_max"])
        bpf = "" if row["bpf_ns_per_iteration"] is None else f"{row['bpf_ns_per_iteration']:.0f}"
        spread = f"{row['min_ratio']:.2f}-{row['max_ratio']:.2f}"
        print(
            f"{row['workload']:10} {row['mode']:17} {row['pin']:8} {row['iterations']:>10} "
            f"{value:8.2f} {unit} {row['ratio_to_bare']:6.2f}x {spread:>13} {lost:>5} {bpf:>11}"
        )


def check_recorded(rows: list[dict]) -> list[str]:
    """cmtrace runs of the open loop must have recorded (at least) one birth per iteration."""
    problems = []
    for row in rows:
        opens = WORKLOADS[row["workload"]][0] in ("open", "raw")
        if row["births_recorded_min"] is not None and opens:
            if row["births_recorded_min"] < row["iterations"]:
                problems.append(
                    f"{row['workload']} {row['mode']}: only {row['births_recorded_min']} births "
                    f"recorded for {row['iterations']} opens"
                )
    return problems


def ptrace_backend_built(cmtrace_python: str) -> bool:
    """Whether this cmtrace offers the ptrace backend (`cmtrace run --backend ptrace`)."""
    done = subprocess.run(
        [cmtrace_python, "-m", "cmtrace", "run", "--help"], capture_output=True, text=True
    )
    return done.returncode == 0 and "--backend" in done.stdout and "ptrace" in done.stdout


def format_load(load: tuple[float, float, float]) -> str:
    return " ".join(f"{x:.2f}" for x in load)


@contextlib.contextmanager
def bpf_stats(enable: bool):
    """kernel.bpf_stats_enabled=1 for the duration, then back to what it was."""
    knob = Path("/proc/sys/kernel/bpf_stats_enabled")
    previous = knob.read_text().strip() if enable else None
    if enable:
        knob.write_text("1\n")
    try:
        yield
    finally:
        if previous is not None:
            knob.write_text(previous + "\n")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=200_000)
    parser.add_argument("--strace-iterations", type=int, default=20_000)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument(
        "--pin",
        choices=("unpinned", "pinned", "both"),
        default="unpinned",
        help="pinned: the whole tool under taskset -c 0",
    )
    parser.add_argument("--python", default=DEFAULT_TARGET_PYTHON, help="target interpreter")
    parser.add_argument("--cmtrace-python", default=DEFAULT_CMTRACE_PYTHON)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--bpf-stats",
        action="store_true",
        help="set kernel.bpf_stats_enabled=1 during the run (restored after) and report the "
        "BPF programs' own run time per iteration: the tracer's in-kernel cost, which does not "
        "depend on how loaded the machine is (the counting itself adds ~20 ns a program)",
    )
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child"]:
        child_main(argv[1], int(argv[2]), int(argv[3]))
        return 0
    args = parse_args(argv)
    workloads, modes = args.workloads.split(","), args.modes.split(",")
    pins = list(PINS) if args.pin == "both" else [args.pin]
    if "bare" not in modes:
        modes.insert(0, "bare")
    unknown = sorted(set(modes) - set(MODES) - set(EXTRA_MODES))
    if unknown:
        print(
            f"bench_overhead: unknown mode {unknown[0]} (modes: {', '.join(MODES + EXTRA_MODES)})",
            file=sys.stderr,
        )
        return 2
    if os.geteuid() != 0 and any(m in BPF_MODES + FLOOR_MODES for m in modes):
        print("bench_overhead: the BPF modes need root: run it with sudo", file=sys.stderr)
        return 2
    if any(m in PTRACE_MODES for m in modes) and not ptrace_backend_built(args.cmtrace_python):
        for mode in [m for m in modes if m in PTRACE_MODES]:
            print(
                f"bench_overhead: {mode}: not built yet (`cmtrace run` has no --backend ptrace)",
                file=sys.stderr,
            )
            modes.remove(mode)
    if any(m.startswith("strace") for m in modes) and shutil.which("strace") is None:
        print("bench_overhead: strace is missing: apt-get install strace", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="cmtrace-bench-") as tmp, bpf_stats(args.bpf_stats):
        config = Config(
            args.python,
            args.cmtrace_python,
            args.iterations,
            args.strace_iterations,
            Path(tmp),
            bpf_stats=args.bpf_stats,
        )
        load_before = os.getloadavg()
        run_rounds(config, workloads, modes, pins, args.rounds)
        load_after = os.getloadavg()
    rows = summarize(config, workloads, modes, pins)
    print(f"python {args.python}, {args.rounds} rounds interleaved, median per iteration")
    print(f"load average before {format_load(load_before)}, after {format_load(load_after)}")
    print_table(rows)
    print_programs(rows)
    if args.json:
        doc = {"load_before": load_before, "load_after": load_after, "rows": rows}
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    problems = check_recorded(rows)
    for problem in problems:
        print(f"bench_overhead: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
