"""Hours at bounded cost: full history vs --aggregate at a fixed fd rate, side by side.

    sudo /opt/cmtrace/venv/bin/python benchmarks/bench_aggregate.py [--duration 600] [--rate 20000]

The target (Debian's python3 by default) opens and closes `--rate` fds a second, round robin over
50 distinct opening lines (`with open('/dev/null', 'rb', buffering=0)`, each in its own
function), and leaks one fd a minute (plus one at the start). `cmtrace -p` records it once with
full history, once with --aggregate (the two runs one after the other). Printed per mode: the
rate reached, the trace's size on disk, the collector's CPU time (user+sys, and as a share of
the run), its peak RSS (VmHWM), events written, and the leaks the report finds (it must find
every one the target made, in both modes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve()
LINES = 50
BATCH_S = 0.01  # the target does a tick's worth of opens every 10 ms
LEAK_EVERY_S = 60.0
MODES = {"full": [], "aggregate": ["--aggregate"]}


# ---- the target ---------------------------------------------------------------------------------
def target_source() -> str:
    """50 functions, one opening line each (distinct stacks), and the leak line."""
    ops = [
        f"def op{i}():\n    with open('/dev/null', 'rb', buffering=0):\n        pass\n"
        for i in range(LINES)
    ]
    return (
        "\n".join(ops)
        + "\nOPS = ["
        + ", ".join(f"op{i}" for i in range(LINES))
        + "]\n"
        + ("KEPT = []\n\ndef leak():\n    KEPT.append(open('/dev/null', 'rb'))  # LEAK\n")
    )


def target_main(workdir: Path, rate: int, duration: float) -> None:
    module = workdir / "fdrate.py"
    module.write_text(target_source())
    sys.path.insert(0, str(workdir))
    import fdrate  # noqa: PLC0415  (written above: real source lines for the report)

    print("ready", flush=True)
    sys.stdin.readline()
    per_tick = max(1, int(rate * BATCH_S))
    done = leaks = 0
    start = time.monotonic()
    next_leak = start
    tick = start
    while (now := time.monotonic()) - start < duration:
        if now >= next_leak:
            fdrate.leak()
            leaks += 1
            next_leak += LEAK_EVERY_S
        for k in range(per_tick):
            fdrate.OPS[(done + k) % LINES]()
        done += per_tick
        tick += BATCH_S
        time.sleep(max(0.0, tick - time.monotonic()))
    seconds = time.monotonic() - start
    print(json.dumps({"opens": done, "seconds": seconds, "leaks": leaks}), flush=True)
    sys.stdin.readline()


# ---- the driver ---------------------------------------------------------------------------------
def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def wait_attached(tracer: subprocess.Popen, timeout: float = 180) -> None:
    seen = threading.Event()
    lines: list[str] = []

    def pump() -> None:
        for line in tracer.stderr:
            lines.append(line)
            if "attached to" in line:
                seen.set()
        seen.set()

    threading.Thread(target=pump, daemon=True).start()
    if not seen.wait(timeout) or not any("attached to" in line for line in lines):
        raise RuntimeError(f"cmtrace did not attach: {''.join(lines)[-2000:]}")


def run_mode(args: argparse.Namespace, mode: str, workdir: Path) -> dict:
    trace = workdir / f"trace-{mode}"
    target = subprocess.Popen(
        [args.python, str(HERE), "--target", str(workdir), str(args.rate), str(args.duration)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert target.stdout.readline().strip() == "ready"
    tracer = subprocess.Popen(
        [args.cmtrace_python, "-m", "cmtrace", "-p", str(target.pid), "-o", str(trace),
         *MODES[mode]],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_attached(tracer)
        cpu_before = proc_cpu_s(tracer.pid)
        target.stdin.write("go\n")
        target.stdin.flush()
        result = json.loads(target.stdout.readline())
        cpu = proc_cpu_s(tracer.pid) - cpu_before
        hwm = proc_hwm_mb(tracer.pid)
        target.stdin.close()
        target.wait(timeout=60)
        tracer.wait(timeout=300)
    finally:
        for proc in (target, tracer):
            if proc.poll() is None:
                proc.kill()
    report = subprocess.run(
        [args.cmtrace_python, "-m", "cmtrace", "report", str(trace), "--format", "json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    found = json.loads(report.stdout)
    at_leak_line = [lk for lk in found["leaks"] if "# LEAK" in _line_text(lk)]
    meta = json.loads((trace / "meta.json").read_text())
    return {
        "mode": mode,
        "rate_per_s": round(result["opens"] / result["seconds"]),
        "seconds": round(result["seconds"], 1),
        "trace_mb": round(dir_mb(trace), 2),
        "collector_cpu_s": round(cpu, 1),
        "collector_cpu_share": round(cpu / result["seconds"], 3),
        "collector_hwm_mb": round(hwm, 1),
        "events": meta.get("events"),
        "leaks_made": result["leaks"],
        "leaks_found": len(at_leak_line),
        "opened_reported": sum(s["opened"] for s in found["sites"]),
        "lost_events": meta.get("lost_events"),
    }


def _line_text(leak: dict) -> str:
    site = leak.get("site") or {}
    try:
        return Path(site["file"]).read_text().splitlines()[int(site["line"]) - 1]
    except (KeyError, OSError, IndexError, ValueError):
        return ""


def main(argv: list[str]) -> int:
    if argv[:1] == ["--target"]:
        target_main(Path(argv[1]), int(argv[2]), float(argv[3]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds per mode")
    parser.add_argument("--rate", type=int, default=20_000, help="fd opens+closes a second")
    parser.add_argument("--python", default="/usr/bin/python3", help="target interpreter")
    parser.add_argument("--cmtrace-python", default="/opt/cmtrace/venv/bin/python")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    print(f"load average before: {os.getloadavg()}", file=sys.stderr)
    rows = []
    with tempfile.TemporaryDirectory(prefix="cmtrace-bench-agg-") as tmp:
        os.chmod(tmp, 0o755)
        for mode in args.modes.split(","):
            row = run_mode(args, mode, Path(tmp))
            print(json.dumps(row), file=sys.stderr, flush=True)
            rows.append(row)
    print(f"load average after: {os.getloadavg()}", file=sys.stderr)
    keys = list(rows[0])
    print(" ".join(f"{k:>18}" for k in keys))
    for row in rows:
        print(" ".join(f"{row[k]!s:>18}" for k in keys))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
