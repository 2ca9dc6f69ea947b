"""--aggregate against ground truth: a program that counts what each of its lines opened and
closed, the --min-age boundary, a full kernel map, and the ptrace usage error.

The counts come from the program itself (it prints them as JSON on stderr); the trace's sites
(events + the kernel's counters) must equal them, with its leaks and warnings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Tracer, read_meta, report_json, run_cmtrace, wait_until

import cmtrace.analysis as cma
from cmtrace.record.bpf.maps import map_exists

pytestmark = pytest.mark.usefixtures("bpf_ready")
PYTHON = "/usr/bin/python3"

# Each marked line opens (and, but for LEAK, closes) its fds; the program counts them.
COUNTING = """\
import json, os, sys, time
counts = {"with": 0, "os": 0, "del": 0}
kept = []
def by_del():
    f = open("/dev/null", "rb")  # DEL: closed by its finalizer at the next line
    del f
start = time.monotonic()
while time.monotonic() - start < float(sys.argv[1]):
    with open("/dev/null", "rb", buffering=0):  # WITH
        counts["with"] += 1
    os.close(os.open("/dev/null", os.O_RDONLY))  # OS
    counts["os"] += 1
    by_del()
    counts["del"] += 1
    time.sleep(0.0005)
for _ in range(3):
    kept.append(open("/etc/hostname"))  # LEAK
counts["leak"] = 3
print(json.dumps(counts), file=sys.stderr)
"""

# hold(s): one fd opened and closed s seconds later, always by the same two lines (one pair).
HOLDING = """\
import sys, time
def hold(seconds):
    f = open("/dev/null", "rb")  # HOLD
    time.sleep(seconds)
    f.close()
def plan():
    start = time.monotonic()
    while time.monotonic() - start < 2.0:  # the pair is counted from its first second on
        yield 0.001
    yield float(sys.argv[1])
    yield float(sys.argv[2])
for seconds in plan():
    hold(seconds)  # one call line: one opening stack
"""


# Keeps N fds open at once (more than a tiny live map holds), all leaked.
MANY_OPEN = """\
import sys, time
kept = [open("/etc/hostname") for _ in range(int(sys.argv[1]))]  # MANY
time.sleep(0.3)
"""


def bpf_fds(pid: int) -> tuple[set[int], int]:
    """The ids of the BPF maps process pid holds, and how many perf event fds it has
    (/proc/PID/fdinfo and the fd links: what the kernel says the process keeps)."""
    map_ids, perf_events = set(), 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        perf_events += link == "anon_inode:[perf_event]"
        map_ids |= {
            int(line.split()[1]) for line in info.splitlines() if line.startswith("map_id:")
        }
    return map_ids, perf_events


def line_of(program: str, mark: str) -> int:
    return next(n for n, text in enumerate(program.splitlines(), 1) if f"# {mark}" in text)


def record(tmp: Path, program: str, *args: str, flags: tuple[str, ...] = ()) -> tuple[Path, str]:
    path = tmp / "prog.py"
    path.write_text(program)
    trace = tmp / "trace"
    done = run_cmtrace(
        "run", "--backend", "bpf", "--aggregate", *flags, "-o", str(trace), "--",
        PYTHON, str(path), *args, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return trace, done.stderr


def sites_by_line(report: dict, program: Path) -> dict[int, dict]:
    return {s["line"]: s for s in report["sites"] if s["file"] == str(program)}


def test_counts_per_line_equal_the_program_s(workdir: Path) -> None:
    trace, stderr = record(workdir, COUNTING, "3")
    truth = json.loads(next(line for line in stderr.splitlines() if line.startswith("{")))
    report = report_json(trace)
    sites = sites_by_line(report, workdir / "prog.py")
    for mark, key in (("WITH", "with"), ("OS", "os"), ("DEL", "del")):
        site = sites[line_of(COUNTING, mark)]
        assert (site["opened"], site["closed"], site["leaked"]) == (truth[key], truth[key], 0)
    leak = sites[line_of(COUNTING, "LEAK")]
    assert (leak["opened"], leak["leaked"]) == (3, 3)
    assert {lk["site"]["line"] for lk in report["leaks"]} == {line_of(COUNTING, "LEAK")}
    warned = {w["site"]["line"]: w["count"] for w in report["warnings"]}
    assert warned[line_of(COUNTING, "DEL")] == truth["del"]
    # aggregated for real: most fds were counted in the kernel, not recorded
    trace_api = cma.load(trace)
    counted = int(trace_api.counters["opened"].sum())
    assert counted > (truth["with"] + truth["os"] + truth["del"]) // 2
    assert len(trace_api.fds) < truth["with"]
    assert read_meta(trace)["aggregate"]["min_age_s"] == 10.0
    assert trace_api.aggregate_limits()
    assert report["aggregate_limits"] == trace_api.aggregate_limits()  # said in JSON too


def test_timeline_plot_and_diff_count_the_counted_fds(workdir: Path) -> None:
    """The timeline adds the counter rows (each fd in the bin of its second), the plot's
    lifetime histogram adds the kernel's buckets: both hold every fd the program opened at a
    line, not only the recorded ones; diff reads two aggregated traces."""
    from cmtrace.present.plot import make_figure

    trace, stderr = record(workdir, COUNTING, "3")
    truth = json.loads(next(line for line in stderr.splitlines() if line.startswith("{")))
    t = cma.load(trace)
    program = workdir / "prog.py"
    with_site = f"{program}:{line_of(COUNTING, 'WITH')}"
    per_second = t.timeline(freq="1s")[with_site]
    # fds of microseconds touch one bin each: the sum is what the line opened (bins rounded)
    assert abs(int(per_second.sum()) - truth["with"]) <= 0.01 * truth["with"] + len(per_second)
    assert len(t.fds[t.fds["site_line"] == line_of(COUNTING, "WITH")]) < truth["with"] // 2
    lifetimes = make_figure(t).axes[1]
    drawn = {p.get_label(): p.get_data().values for p in lifetimes.patches if p.get_label()}
    with_bars = next(
        v for label, v in drawn.items() if label.endswith(f":{line_of(COUNTING, 'WITH')}")
    )
    assert int(with_bars.sum()) == truth["with"]  # recorded + counted, every closed fd once
    done = run_cmtrace("diff", str(trace), str(trace), "--format", "json")
    assert done.returncode == 0, done.stderr
    (leak,) = json.loads(done.stdout)["sites"]
    assert (leak["line"], leak["before"], leak["after"]) == (line_of(COUNTING, "LEAK"), 3, 3)


def test_min_age_boundary(workdir: Path) -> None:
    """With --min-age 1, an fd that lived 0.5 s is counted (in its lifetime bucket), one that
    lived 2 s is recorded in full."""
    trace, _ = record(workdir, HOLDING, "0.5", "2.0", flags=("--min-age", "1"))
    t = cma.load(trace)
    line = line_of(HOLDING, "HOLD")
    here = t.fds[(t.fds["site_line"] == line).fillna(False).to_numpy(bool)]
    lived = (here["died_ns"] - here["born_ns"]).to_numpy() / 1e9
    assert ((lived > 1.9) & (lived < 3.0)).sum() == 1  # the 2 s fd, recorded
    assert not ((lived > 0.3) & (lived < 1.0)).any()  # the 0.5 s fd is not
    counters = t.counters[t.counters["stack_id"].isin(here["open_stack"])]
    hist = [sum(col) for col in zip(*counters["lifetime_hist"])]
    half_second = int(0.5e9).bit_length() - 1 - 10  # the log2 bucket of 0.5 s
    assert sum(hist[half_second - 1 : half_second + 2]) == 1
    opened = t.sites().set_index("site_line").loc[line, "opened"]
    assert opened == counters["opened"].sum() + len(here)


def test_full_live_map_is_counted_and_reported(workdir: Path) -> None:
    trace, _ = record(workdir, MANY_OPEN, "10", flags=("--aggregate-live-max", "4"))
    facts = read_meta(trace)["aggregate"]
    assert facts["live_max"] == 4 and facts["live_full"] >= 6
    report = report_json(trace)
    many = [lk for lk in report["leaks"] if lk["site"]["line"] == line_of(MANY_OPEN, "MANY")]
    assert len(many) == 10  # a full map falls back to full history: nothing is lost
    text = run_cmtrace("report", str(trace)).stdout
    assert "maps were full" in text


def test_aggregate_with_ptrace_is_a_usage_error(workdir: Path) -> None:
    done = run_cmtrace("run", "--backend", "ptrace", "--aggregate", "--", sys.executable, "-c", "0")
    assert done.returncode == 1
    assert "--aggregate" in done.stderr and "BPF" in done.stderr


def test_sigkilled_collector_leaves_nothing_attached(workdir: Path) -> None:
    """The probes are compiled in a child that hands the collector the maps and the perf event
    fds that keep them attached: once the collector is killed (no detach code runs), the
    kernel must drop the maps, and the target runs on."""
    target = subprocess.Popen([PYTHON, "-c", "import time\nwhile True:\n"
                               "    open('/dev/null').close(); time.sleep(0.01)"])  # fmt: skip
    try:
        tracer = Tracer(["-p", str(target.pid), "--backend", "bpf", "--aggregate",
                         "-o", str(workdir / "trace")])  # fmt: skip
        tracer.wait_attached()
        map_ids, perf_events = bpf_fds(tracer.proc.pid)
        assert map_ids and perf_events > 50, (map_ids, perf_events)  # one per syscall tracepoint
        assert all(map_exists(i) for i in map_ids)
        tracer.proc.kill()
        tracer.proc.wait(timeout=30)
        wait_until(lambda: not any(map_exists(i) for i in map_ids), 30, "the maps released")
        assert target.poll() is None, "the target runs on"
    finally:
        target.kill()
        target.wait()
