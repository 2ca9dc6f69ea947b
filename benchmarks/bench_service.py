"""What tracing costs a request/response service: uvicorn under each recorder, side by side.

    sudo /opt/cmtrace/venv/bin/python benchmarks/bench_service.py [--rounds 3] [--pin both]

The service is uvicorn serving one ASGI route that, per request, reads a small file and creates
and closes a UDP socket connected to localhost (two fd births and two deaths: what a handler
that reads a template and talks to a backend does). A load generator in another process keeps
--concurrency keep-alive HTTP/1.1 connections busy for --seconds after a warm-up, and reports
requests/s and the p50/p99 latency of each request. Ways to run the service:

  bare           nothing attached
  bpf-attach     `cmtrace -p PID` (BPF backend, Python stacks on)
  ptrace-run     `cmtrace run --backend ptrace -- SERVICE` (Python stacks on)
  ptrace-attach  `cmtrace -p PID --backend ptrace`

Rounds are interleaved (every way once per round, in turn). Pinned: the service and its tracer
under `taskset -c 0`, the load generator under `taskset -c 1`; unpinned: nothing pinned. Each
row gives median, min and max over the rounds and the ratio of the median to bare's with the
same pinning. Every traced run must have recorded at least one fd birth per request served
(the benchmark fails otherwise: a tracer that records nothing would look cheap).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
from bench_overhead import trace_counts  # noqa: E402 (the same trace check as the loop's)

DEFAULT_PYTHON = "/opt/cmtrace/venv/bin/python"  # uvicorn is in the project's venv
MODES = ("bare", "bpf-attach", "ptrace-run", "ptrace-attach")
PINS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {  # (service + tracer, client)
    "unpinned": ((), ()),
    "pinned": (("taskset", "-c", "0"), ("taskset", "-c", "1")),
}
ATTACH_FLAGS = {"bpf-attach": ("--backend", "bpf"), "ptrace-attach": ("--backend", "ptrace")}
START_TIMEOUT_S = 180  # bcc compiles the probes at attach: much more than 2 s when loaded
PAYLOAD = b"x" * 512


# ---- the service (runs in the traced process) -----------------------------------------------
PAYLOAD_PATH = ""  # set by serve()


async def app(scope: dict, receive: Any, send: Any) -> None:
    """One route: read a small file, make and close a UDP socket; answer with the byte count."""
    if scope["type"] != "http":
        return
    with open(PAYLOAD_PATH, "rb") as payload:
        answer = str(len(payload.read())).encode()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.connect(("127.0.0.1", 9))
    headers = [(b"content-length", str(len(answer)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": answer})


def serve(port: int, payload: str) -> None:
    import uvicorn

    global PAYLOAD_PATH
    PAYLOAD_PATH = payload
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False,
                lifespan="off")  # fmt: skip


# ---- the load generator (another process) ---------------------------------------------------
async def client(port: int, deadline: float, latencies: list[float], measure_from: float) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = b"GET / HTTP/1.1\r\nhost: bench\r\n\r\n"
    try:
        while time.monotonic() < deadline:
            start = time.monotonic()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length"))  # fmt: skip
            await reader.readexactly(length)
            if start >= measure_from:
                latencies.append(time.monotonic() - start)
    finally:
        writer.close()


async def load(port: int, concurrency: int, warmup: float, seconds: float) -> dict[str, float]:
    measure_from = time.monotonic() + warmup
    deadline = measure_from + seconds
    latencies: list[float] = []
    await asyncio.gather(*(client(port, deadline, latencies, measure_from)
                           for _ in range(concurrency)))  # fmt: skip
    latencies.sort()
    return {
        "requests": len(latencies),
        "rps": len(latencies) / seconds,
        "p50_ms": latencies[len(latencies) // 2] * 1e3,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1e3,
    }


# ---- the driver ---------------------------------------------------------------------------------
@dataclass
class Config:
    python: str
    cmtrace_python: str
    concurrency: int
    warmup: float
    seconds: float
    workdir: Path
    payload: Path
    results: dict = field(default_factory=dict)  # (mode, pin) -> [dict]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_listening(port: int, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the service exited {process.returncode}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"the service did not listen on {port} within {timeout} s")


def cmtrace(config: Config, *args: str) -> list[str]:
    return [config.cmtrace_python, "-m", "cmtrace", *args]


def start_service(config: Config, mode: str, pin: str, port: int, trace: Path):
    """(the service's process, its pid, the tracer's process or None)."""
    service = [config.python, str(HERE), "--serve", str(port), str(config.payload)]
    pinned = PINS[pin][0]
    log = open(trace.with_suffix(".log"), "w")
    if mode == "ptrace-run":
        argv = [*pinned, *cmtrace(config, "run", "--backend", "ptrace", "-q", "-o", str(trace),
                                  "--", *service)]  # fmt: skip
        run = subprocess.Popen(argv, stdout=log, stderr=log)
        wait_listening(port, run, START_TIMEOUT_S)
        return run, uvicorn_pid(run.pid), None
    process = subprocess.Popen([*pinned, *service], stdout=log, stderr=log)
    wait_listening(port, process, START_TIMEOUT_S)
    if mode == "bare":
        return process, process.pid, None
    argv = [*pinned, *cmtrace(config, "-p", str(process.pid), *ATTACH_FLAGS[mode], "-o",
                              str(trace))]  # fmt: skip
    tracer = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    for line in tracer.stderr:  # "cmtrace: attached to PID (...)"
        if "attached to" in line:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"{mode}: no 'attached to' within {START_TIMEOUT_S} s")
    else:
        raise RuntimeError(f"{mode}: cmtrace exited {tracer.wait()} before attaching")
    return process, process.pid, tracer


def uvicorn_pid(tracer_pid: int) -> int:
    """The service under `cmtrace run`: the descendant whose argv is the service's own (those
    of cmtrace and of its engine hold it too, further on)."""
    for _ in range(200):
        for pid in descendants(tracer_pid):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv[1:3] == [str(HERE).encode(), b"--serve"]:
                return pid
        time.sleep(0.05)
    raise RuntimeError("no service process under cmtrace run")


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def run_load(config: Config, pin: str, port: int) -> dict[str, float]:
    argv = [*PINS[pin][1], sys.executable, str(HERE), "--load", str(port),
            str(config.concurrency), str(config.warmup), str(config.seconds)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=config.seconds * 10 + 60)
    if done.returncode != 0:
        raise RuntimeError(f"the load generator failed: {done.stderr[-2000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def stop(process: subprocess.Popen, tracer: subprocess.Popen | None) -> None:
    """Detach the tracer (SIGINT: it writes the trace), then end the service."""
    if tracer is not None:
        tracer.send_signal(signal.SIGINT)
        tracer.wait(timeout=180)
    process.send_signal(signal.SIGINT)  # uvicorn (and `cmtrace run`, forwarding it) exit
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def run_once(config: Config, mode: str, pin: str, seq: int) -> dict[str, float]:
    port = free_port()
    trace = config.workdir / f"{mode}-{pin}-{seq}"
    process, pid, tracer = start_service(config, mode, pin, port, trace)
    try:
        result = run_load(config, pin, port)
    finally:
        stop(process, tracer)
    if mode != "bare":
        lost, births = trace_counts(trace, pid)
        result["lost"], result["births"] = lost, births
        if births < result["requests"]:
            raise RuntimeError(f"{mode} {pin}: {births} births for {result['requests']} requests")
        shutil.rmtree(trace, ignore_errors=True)
    return result


def summarize(config: Config, modes: list[str], pins: list[str]) -> list[dict]:
    rows = []
    for pin in pins:
        bare = config.results[("bare", pin)]
        bare_rps = statistics.median(r["rps"] for r in bare)
        bare_p99 = statistics.median(r["p99_ms"] for r in bare)
        for mode in modes:
            samples = config.results[(mode, pin)]
            rps = [r["rps"] for r in samples]
            row: dict[str, Any] = {"mode": mode, "pin": pin, "rounds": len(samples)}
            for key in ("rps", "p50_ms", "p99_ms"):
                values = [r[key] for r in samples]
                row[key] = round(statistics.median(values), 2)
                row[f"{key}_min"], row[f"{key}_max"] = round(min(values), 2), round(max(values), 2)
            row["rps_x_bare"] = round(statistics.median(rps) / bare_rps, 3)
            row["p99_x_bare"] = round(row["p99_ms"] / bare_p99, 2)
            row["lost_max"] = max((r.get("lost", 0) for r in samples), default=0)
            rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'mode':14} {'pin':8} {'req/s (min-max)':>24} {'x bare':>7} {'p50 ms':>15} "
          f"{'p99 ms (min-max)':>22} {'p99 x':>6} {'lost':>5}")  # fmt: skip
    for r in rows:
        rps = f"{r['rps']:.0f} ({r['rps_min']:.0f}-{r['rps_max']:.0f})"
        p50 = f"{r['p50_ms']:.2f}"
        p99 = f"{r['p99_ms']:.2f} ({r['p99_ms_min']:.2f}-{r['p99_ms_max']:.2f})"
        print(f"{r['mode']:14} {r['pin']:8} {rps:>24} {r['rps_x_bare']:6.3f}x {p50:>15} "
              f"{p99:>22} {r['p99_x_bare']:5.2f}x {r['lost_max']:>5}")  # fmt: skip


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--pin", choices=("unpinned", "pinned", "both"), default="both")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds not measured")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds measured")
    parser.add_argument("--python", default=DEFAULT_PYTHON, help="the service's interpreter")
    parser.add_argument("--cmtrace-python", default=DEFAULT_PYTHON)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--serve"]:
        serve(int(argv[1]), argv[2])
        return 0
    if argv[:1] == ["--load"]:
        port, concurrency, warmup, seconds = int(argv[1]), int(argv[2]), *map(float, argv[3:5])
        print(json.dumps(asyncio.run(load(port, concurrency, warmup, seconds))))
        return 0
    args = parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if "bare" not in modes:
        modes.insert(0, "bare")
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        print(f"bench_service: unknown mode {unknown[0]} (modes: {', '.join(MODES)})",
              file=sys.stderr)  # fmt: skip
        return 2
    if os.geteuid() != 0 and "bpf-attach" in modes:
        print("bench_service: bpf-attach needs root: run it with sudo", file=sys.stderr)
        return 2
    pins = list(PINS) if args.pin == "both" else [args.pin]
    with tempfile.TemporaryDirectory(prefix="cmtrace-service-") as tmp:
        payload = Path(tmp) / "payload.html"
        payload.write_bytes(PAYLOAD)
        config = Config(args.python, args.cmtrace_python, args.concurrency, args.warmup,
                        args.seconds, Path(tmp), payload)  # fmt: skip
        load_before = os.getloadavg()
        for round_no in range(args.rounds):
            for mode in modes:
                for pin in pins:
                    result = run_once(config, mode, pin, round_no)
                    config.results.setdefault((mode, pin), []).append(result)
                    print(f"  round {round_no + 1}/{args.rounds} {mode:14} {pin:8} "
                          f"{result['rps']:8.0f} req/s  p50 {result['p50_ms']:.2f} ms  "
                          f"p99 {result['p99_ms']:.2f} ms", file=sys.stderr, flush=True)  # fmt: skip
        load_after = os.getloadavg()
    rows = summarize(config, modes, pins)
    print(f"uvicorn on {args.python}, {args.concurrency} connections, {args.seconds:g} s measured "
          f"after {args.warmup:g} s, {args.rounds} rounds interleaved; medians")  # fmt: skip
    print(f"load average before {' '.join(f'{x:.2f}' for x in load_before)}, "
          f"after {' '.join(f'{x:.2f}' for x in load_after)}")  # fmt: skip
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "load_before": load_before,
                                         "load_after": load_after}, indent=1) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
