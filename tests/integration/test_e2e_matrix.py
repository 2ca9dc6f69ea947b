"""Issue 4's matrix: every interpreter found here (tests/integration/targets.py), in both modes.

- `cmtrace run -- PY programs/leaks/stdlib_leaks.py N`: the program leaks through sqlite3,
  subprocess pipes, a socketpair, a thread and a >128-frame recursion, then leaves with
  os._exit(0) at once;
- `cmtrace -p PID` on attached.py running it with `wait` (the thread starts after the attach,
  the tracer stops while the program lives);
- `cmtrace run` of programs/leaks/all_causes.py (the six causes; test_causes_interpreters.py
  covers them with -p only);
- per chrooted interpreter, `cmtrace run -- unshare --pid --fork --mount-proc chroot ...`: the
  program in its own pid and mount namespace, where it is pid 1.

Every `# CAUSE:` line must leak exactly its count with its cause, and nothing else in the
program may be reported. Ground truth is the program's own: stdlib_leaks.py prints the fd
numbers each step left open (fstat before and after), which must be the reported fds.

Each recording is made once (module-scoped fixture) and several run at a time: they spend
most of their wall time loading probes and detaching, not on CPU.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import targets
from conftest import (
    Recorder,
    Target,
    Tracer,
    cell_left_out,
    interpreter_for,
    run_cmtrace,
    shared_tmpdir,
)

import cmtrace.analysis as cma
from cmtrace.trace import schema

pytestmark = pytest.mark.usefixtures("bpf_ready")
PROGRAMS = Path(__file__).parents[1] / "programs" / "leaks"
FOUND, MISSING = targets.discover()
CHROOTED = [t for t in FOUND if t.chroot is not None]
N = 2  # stdlib_leaks.py iterations
ALL_CAUSES_N = 2  # all_causes.py leaks each cause twice, whatever its arguments
DEEP_FRAMES = 128  # a stack must keep at least this many frames (issue 4)
PARALLEL = 4  # recordings made at once
MARK = re.compile(r"# CAUSE:([a-z-]+)(?: LEAK:(\w+) COUNT:(\d+))?(?: CLOSED:([a-z-]+))?$")
RUN, ATTACH, NAMESPACE = "run", "attach", "namespace"
STDLIB, ALL_CAUSES = "stdlib_leaks.py", "all_causes.py"


@dataclass(frozen=True)
class Mark:
    line: int
    cause: str
    label: str | None  # stdlib_leaks.py's key in the program's own report
    per_iteration: int
    closed_by: str | None = None  # how it is released, when not by the process ending


@dataclass
class Recording:
    trace: Path
    program: str  # the program's path as its interpreter sees it (the reported site file)
    truth: dict | None  # stdlib_leaks.py's JSON line: pid and the fds each step left open
    root_pid: int | None = None  # the pid cmtrace started or attached to
    still_running: bool = False  # -p stopped while the program lived (else it exited at once)
    seconds: float = 0.0


def marks(name: str) -> dict[int, Mark]:
    """line -> Mark, from the `# CAUSE:` comments of programs/leaks/NAME."""
    out = {}
    for number, text in enumerate((PROGRAMS / name).read_text().splitlines(), 1):
        match = MARK.search(text)
        if match:
            cause, label, count, closed_by = match.groups()
            out[number] = Mark(number, cause, label, int(count or 1), closed_by)
    return out


def expected_count(name: str, mark: Mark) -> int:
    return mark.per_iteration * (N if name == STDLIB else ALL_CAUSES_N)


def place(interpreter: targets.Target, name: str) -> str:
    """programs/leaks/NAME as the interpreter sees it (copied into its chroot if it has one)."""
    return interpreter.program(name, PROGRAMS)


def truth_line(stdout: str) -> dict:
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    found = [m for m in lines if m.get("event") == "leaked"]
    assert len(found) == 1, f"no (or several) 'leaked' line in the program's output:\n{stdout}"
    return found[0]


def record_run(argv: list[str], program: str, name: str, out: Path) -> Recording:
    """`cmtrace run -- ARGV` to the end; the program leaves with os._exit(0) as it leaks."""
    start = time.monotonic()
    result = run_cmtrace("run", "-q", "-o", str(out), "--", *argv, timeout=300)
    assert result.returncode == 0, f"cmtrace run exited {result.returncode}:\n{result.stderr}"
    truth = truth_line(result.stdout) if name == STDLIB else None
    root = int(json.loads((out / "meta.json").read_text())["targets"][0]["pid"])
    return Recording(out, program, truth, root, False, time.monotonic() - start)


def record_attached(argv: list[str], program: str, out: Path) -> Recording:
    """`cmtrace -p PID` on attached.py running ARGV: the program starts after the attach, and
    the tracer stops (SIGINT) while it still lives."""
    start = time.monotonic()
    target = Target(argv, out.parent)
    try:
        pid = target.expect("ready", timeout=300)["pid"]
        tracer = Tracer(["-p", str(pid), "-q", "-o", str(out)], cwd=out.parent)
        try:
            assert tracer.wait_attached(timeout=300) == pid
            target.send("go")
            truth = target.expect("leaked", timeout=300)
            tracer.stop(timeout=300).check()
        finally:
            tracer.kill()
        target.send("")
        assert target.finish() == 0, target.stderr_text()
    finally:
        target.kill()
    return Recording(out, program, truth, pid, True, time.monotonic() - start)


def namespace_argv(interpreter: targets.Target, program: str) -> list[str]:
    """The chrooted interpreter in a new pid and mount namespace (it is pid 1 there)."""
    wrapper = Path(interpreter.command).read_text()
    python = re.search(r"exec chroot \S+ (\S+)", wrapper).group(1)
    return ["unshare", "--pid", "--fork", "--mount-proc", "chroot", interpreter.chroot,
            python, program, str(N)]  # fmt: skip


def plan(workdir: Path, recorder: Recorder) -> dict[tuple[str, str, str], tuple]:
    """(interpreter, mode, program) -> (recording function, its arguments), for the cells of
    this recorder that the session runs (conftest.cell_left_out). Programs are copied into the
    chroots here, before any recording runs (they share the copies)."""
    jobs = {}
    kept = [interpreter_for(t) for t in FOUND if cell_left_out(recorder.name, t.name) is None]
    for interpreter in kept:
        for name in (STDLIB, ALL_CAUSES):
            program = place(interpreter, name)
            out = workdir / f"{interpreter.name}-{RUN}-{name}" / "trace"
            argv = [interpreter.command, program, str(N)]
            jobs[(interpreter.name, RUN, name)] = (record_run, argv, program, name, out)
        out = workdir / f"{interpreter.name}-{ATTACH}-{STDLIB}" / "trace"
        program = place(interpreter, STDLIB)
        argv = [interpreter.command, place(interpreter, "attached.py"), program, str(N), "wait"]
        jobs[(interpreter.name, ATTACH, STDLIB)] = (record_attached, argv, program, out)
    for interpreter in (t for t in kept if t.chroot is not None):
        program = place(interpreter, STDLIB)
        out = workdir / f"{interpreter.name}-{NAMESPACE}-{STDLIB}" / "trace"
        argv = namespace_argv(interpreter, program)
        jobs[(interpreter.name, NAMESPACE, STDLIB)] = (record_run, argv, program, STDLIB, out)
    for job in jobs.values():
        job[-1].parent.mkdir(parents=True)
        job[-1].parent.chmod(0o777)  # the recorder may run as nobody
    return jobs


@pytest.fixture(scope="module")
def recordings(recorder: Recorder, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Every recording of the matrix with one recorder, made once; a failed one holds its
    exception. As nobody, in a directory nobody can write."""
    workdir = shared_tmpdir("cmtrace-e2e-") if recorder.nobody else tmp_path_factory.mktemp("e2e")
    yield record_all(plan(workdir, recorder))
    if recorder.nobody:
        shutil.rmtree(workdir, ignore_errors=True)


def record_all(jobs: dict[tuple[str, str, str], tuple]) -> dict:
    start = time.monotonic()
    with ThreadPoolExecutor(PARALLEL) as pool:
        futures = {key: pool.submit(job[0], *job[1:]) for key, job in jobs.items()}
    done = {}
    for key, future in futures.items():
        error = future.exception()
        done[key] = error if error is not None else future.result()
    took = sorted((r.seconds, k) for k, r in done.items() if isinstance(r, Recording))
    print(f"\n{len(jobs)} recordings ({PARALLEL} at a time) in {time.monotonic() - start:.0f} s;"
          f" slowest {took[-1][0]:.0f} s {took[-1][1]}" if took else "")  # fmt: skip
    return done


def recording(recordings: dict, key: tuple[str, str, str]) -> Recording:
    found = recordings[key]
    if isinstance(found, BaseException):
        raise AssertionError(f"recording {key} failed: {found}") from found
    return found


# --- checks ---------------------------------------------------------------------------------------
def site_problems(rec: Recording, name: str, pid: int) -> list[str]:
    """Each marked line leaks its count with its cause (and, for stdlib_leaks.py, exactly the
    fds the program says it left open); no other line of the program leaks."""
    trace = cma.load(rec.trace)
    leaks = trace.leaks()
    mine = leaks[(leaks["site_file"].astype(str) == rec.program) & (leaks["pid"] == pid)]
    expected = marks(name)
    problems = []
    if trace.meta.get("lost_events") or trace.meta.get("status") != "complete":
        problems.append(f"status {trace.meta.get('status')}, {trace.meta.get('lost_events')} lost")
    for line, mark in expected.items():
        rows = mine[mine["site_line"] == line]
        causes = sorted(set(rows["cause"].astype(str)))
        want = expected_count(name, mark)
        if len(rows) != want or causes != [mark.cause]:
            problems.append(f"line {line}: want {want} x {mark.cause}, got {len(rows)} x {causes}")
        if rec.truth is not None and sorted(rows["fd"]) != sorted(rec.truth["leaked"][mark.label]):
            problems.append(f"line {line} ({mark.label}): reported fds {sorted(rows['fd'])}, the "
                            f"program left {rec.truth['leaked'][mark.label]} open")  # fmt: skip
    by_end = None if rec.still_running else "process-exit"  # still open, or the exit closed it
    for line, mark in expected.items():
        closed = set(mine.loc[mine["site_line"] == line, "closed_by"].astype(object))
        if {None if pd.isna(c) else c for c in closed} - {mark.closed_by or by_end}:
            problems.append(f"line {line}: closed by {sorted(closed, key=str)}")
    others = sorted(set(mine["site_line"].astype(int)) - set(expected))
    if others:
        problems.append(f"unmarked lines reported as leaking: {others}")
    return problems


def truth_problems(rec: Recording, pid: int) -> list[str]:
    """stdlib_leaks.py's own view: each step leaked its count, the clean steps nothing, and
    the process's reported leaks (any site) are exactly those fds."""
    problems = []
    for mark in marks(STDLIB).values():
        if len(rec.truth["leaked"][mark.label]) != expected_count(STDLIB, mark):
            problems.append(f"{mark.label}: the program itself left {rec.truth['leaked']} open")
    if any(rec.truth["clean"].values()):
        problems.append(f"a clean step left fds open: {rec.truth['clean']}")
    leaks = cma.load(rec.trace).leaks()
    reported = sorted(leaks[leaks["pid"] == pid]["fd"])
    truth = sorted(fd for fds in rec.truth["leaked"].values() for fd in fds)
    if reported != truth:
        problems.append(f"pid {pid} leaks fds {reported}, the program left {truth} open")
    return problems


def deep_problems(rec: Recording, pid: int) -> list[str]:
    """The recursion's leak keeps >= 128 frames, innermost first, and its birth event says the
    stack was truncated (the recursion is deeper than the walker keeps)."""
    deep = next(m for m in marks(STDLIB).values() if m.label == "deep")
    trace = cma.load(rec.trace)
    fds = trace.fds
    rows = fds[(fds["pid"] == pid) & (fds["site_line"] == deep.line) & fds["leak"]]
    events = pd.read_parquet(rec.trace / "events", columns=["pid", "fd", "op", "stack_flags"])
    births = events[(events["pid"] == pid) & (events["op"].astype(str) == schema.OP_BIRTH)]
    problems = []
    for row in rows.itertuples():
        frames = trace.stack(int(row.open_stack))
        if len(frames) < DEEP_FRAMES:
            problems.append(f"fd {row.fd}: {len(frames)} frames kept, want >= {DEEP_FRAMES}")
        if (frames[0]["function"], frames[0]["line"]) != ("open_deep", deep.line):
            problems.append(f"fd {row.fd}: innermost frame {frames[0]}")
        flags = births[births["fd"] == row.fd]["stack_flags"]
        if not (flags & schema.STACK_TRUNCATED).any():
            problems.append(f"fd {row.fd}: birth not flagged truncated ({list(flags)})")
    return problems


def thread_problems(rec: Recording, pid: int) -> list[str]:
    """The thread's fds were opened by a thread that is not the main one."""
    line = next(m for m in marks(STDLIB).values() if m.label == "thread").line
    leaks = cma.load(rec.trace).leaks()
    rows = leaks[(leaks["pid"] == pid) & (leaks["site_line"] == line)]
    return [f"fd {r.fd} opened by tid {r.tid}, the main thread" for r in rows.itertuples()
            if r.tid == pid]  # fmt: skip


def check_stdlib(rec: Recording, pid: int, where: str) -> None:
    problems = (
        site_problems(rec, STDLIB, pid)
        + truth_problems(rec, pid)
        + deep_problems(rec, pid)
        + thread_problems(rec, pid)
    )
    assert not problems, f"{where} (trace {rec.trace}): " + "; ".join(problems)


# --- tests ----------------------------------------------------------------------------------------
def test_interpreters_listed() -> None:
    print(f"tested: {', '.join(t.name for t in FOUND)}; namespaces: "
          f"{', '.join(t.name for t in CHROOTED) or 'none'}")  # fmt: skip
    targets.require_found(FOUND, MISSING)


def test_marks_are_complete() -> None:
    """Every step of stdlib_leaks.py has exactly one marked line (the test relies on it)."""
    labels = sorted(m.label for m in marks(STDLIB).values())
    assert labels == ["deep", "pipe", "socketpair", "sqlite", "thread"], labels
    assert len(marks(ALL_CAUSES)) == 7


@pytest.mark.parametrize("mode", [RUN, ATTACH])
@pytest.mark.parametrize("interpreter", FOUND, ids=[t.name for t in FOUND])
def test_stdlib_leaks(recordings: dict, interpreter: targets.Target, mode: str) -> None:
    rec = recording(recordings, (interpreter.name, mode, STDLIB))
    pid = rec.truth["pid"]
    assert pid == rec.root_pid  # run: the command itself; -p: attached.py's process
    check_stdlib(rec, pid, f"{interpreter.name} {mode}")


@pytest.mark.parametrize("interpreter", FOUND, ids=[t.name for t in FOUND])
def test_all_causes_run(recordings: dict, interpreter: targets.Target) -> None:
    rec = recording(recordings, (interpreter.name, RUN, ALL_CAUSES))
    problems = site_problems(rec, ALL_CAUSES, rec.root_pid)
    assert not problems, f"{interpreter.name} (trace {rec.trace}): " + "; ".join(problems)


def namespaced_pid(rec: Recording) -> int:
    """The host pid of the program: the child that `unshare --fork` (the traced command) made."""
    events = pd.read_parquet(rec.trace / "events", columns=["pid", "op", "arg"])
    forks = events[(events["op"].astype(str) == schema.OP_FORK) & (events["pid"] == rec.root_pid)]
    children = sorted(set(forks["arg"].astype(int)))
    assert len(children) == 1, f"unshare forked {children}"
    return children[0]


@pytest.mark.parametrize("interpreter", CHROOTED, ids=[t.name for t in CHROOTED])
def test_namespace_sites(recordings: dict, interpreter: targets.Target) -> None:
    rec = recording(recordings, (interpreter.name, NAMESPACE, STDLIB))
    assert rec.truth["pid"] == 1, rec.truth  # the program is init of its pid namespace
    pid = namespaced_pid(rec)
    assert pid != 1
    check_stdlib(rec, pid, f"{interpreter.name} in its own pid namespace")


def run_report(trace: Path) -> dict:
    result = run_cmtrace("report", str(trace), "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("interpreter", CHROOTED, ids=[t.name for t in CHROOTED])
def test_namespace_report_pids(recordings: dict, interpreter: targets.Target) -> None:
    """The JSON report gives the host pid of each leak and, as docs/DESIGN.md's contract says
    ("host pid/tid; ns_pid too when it differs"), the pid the program knows itself by."""
    rec = recording(recordings, (interpreter.name, NAMESPACE, STDLIB))
    pid = namespaced_pid(rec)
    mine = [leak for leak in run_report(rec.trace)["leaks"] if leak["site"]["file"] == rec.program]
    assert {leak["pid"] for leak in mine} == {pid}
    assert [leak.get("ns_pid") for leak in mine] == [rec.truth["pid"]] * len(mine)


def test_ground_truth_runs_untraced() -> None:
    """The program's own report, without cmtrace, on one interpreter: the counts the marks
    promise (so a failure above is cmtrace's, not the program's)."""
    interpreter = FOUND[0]
    program = place(interpreter, STDLIB)
    out = subprocess.run([interpreter.command, program, str(N)], capture_output=True, text=True,
                         timeout=120, check=True).stdout  # fmt: skip
    truth = truth_line(out)
    for mark in marks(STDLIB).values():
        assert len(truth["leaked"][mark.label]) == expected_count(STDLIB, mark), truth
    assert not any(truth["clean"].values()), truth
