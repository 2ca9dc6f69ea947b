"""`--calls`: USDT function__entry/return evidence turns `with-exited-without-close` into
`exit-raised` / `enter-raised`, on every interpreter found here (tests/integration/targets.py).

Ground truth, independent of cmtrace's own ELF reader: binutils' `readelf -n` says whether a
build carries python:function__entry, and CPython's history says 3.11's never fire (gh-98894).
The program (programs/leaks/calls_causes.py) knows what it does: N raising __exit__, N raising
__enter__, 2N __exit__ that return (one forgets its fd, one closes it).
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import targets
from conftest import Target, Tracer, error_line, run_cmtrace

import cmtrace.analysis as cma
from cmtrace.interp import elfnotes

pytestmark = pytest.mark.usefixtures("bpf_ready")
PROGRAMS = Path(__file__).parents[1] / "programs" / "leaks"
FOUND, MISSING = targets.discover()
N = 2
NO_EVIDENCE = "with-exited-without-close"


def marked_causes(name: str = "calls_causes.py") -> dict[int, str]:
    return targets.marked_causes(PROGRAMS / name)


def copy_program(interpreter: targets.Target, name: str) -> str:
    """tests/programs/leaks/NAME as the interpreter sees it (copied into its chroot if any)."""
    return interpreter.program(name, PROGRAMS)


def programs_for(interpreter: targets.Target) -> tuple[str, str]:
    """attached.py and calls_causes.py as the interpreter sees them."""
    return copy_program(interpreter, "attached.py"), copy_program(interpreter, "calls_causes.py")


def _ask(interpreter: targets.Target, code: str) -> str:
    return subprocess.run(
        [interpreter.command, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()


def interpreter_files(interpreter: targets.Target) -> list[str]:
    """The executable and its libpython, as host paths."""
    paths = _ask(
        interpreter,
        "import sys, sysconfig, os; print(sys.executable); "
        "print(os.path.join(sysconfig.get_config_var('LIBDIR') or '', "
        "sysconfig.get_config_var('INSTSONAME') or ''))",
    ).splitlines()
    return [interpreter.host_path(p) for p in paths if Path(interpreter.host_path(p)).is_file()]


def probe_notes(path: str) -> list[dict]:
    """python:function__* probes of one ELF file, as readelf prints them."""
    out = subprocess.run(["readelf", "-n", path], capture_output=True, text=True).stdout
    notes = re.findall(
        r"Provider: python\s+Name: (function__\w+)\s+Location: (0x[0-9a-f]+), Base: 0x[0-9a-f]+, "
        r"Semaphore: (0x[0-9a-f]+)",
        out,
    )
    return [
        {"name": n, "location": int(loc, 16), "semaphore": int(sem, 16)} for n, loc, sem in notes
    ]


def fires_probes(interpreter: targets.Target) -> bool:
    if _ask(interpreter, "import sys; print(sys.version_info[1])") == "11":
        return False  # the notes are there, the interpreter never reaches them (gh-98894)
    return any(
        note["name"] == "function__entry"
        for path in interpreter_files(interpreter)
        for note in probe_notes(path)
    )


def check_trace(out: Path, program: str, fires: bool) -> None:
    trace = cma.load(out)
    leaks = trace.leaks()
    leaks = leaks[leaks["site_file"] == program]
    marked = marked_causes()
    assert sorted(set(leaks["site_line"].astype(int))) == sorted(marked), leaks[["site_line"]]
    for line, cause in marked.items():
        rows = leaks[leaks["site_line"].astype(int) == line]
        assert len(rows) == N, f"line {line}: {len(rows)} leaks"
        expected = cause if fires else NO_EVIDENCE
        assert set(rows["cause"].astype(str)) == {expected}, rows[["cause", "evidence"]]
    calls_state = {str(t.get("calls")) for t in trace.meta["python"] if t.get("python")}
    if not fires:
        assert all(s.startswith("not recorded") for s in calls_state), calls_state
        return
    assert any(s.startswith("recorded") for s in calls_state), calls_state
    calls = pd.read_parquet(out / "calls")
    mine = calls[(calls["file"] == program) & (calls["event"] == "return")]
    returns = mine.groupby(["function", "raised"], observed=True).size().to_dict()
    # the program's own count: Transaction.__exit__ raises N times, Lease and Clean return 2N;
    # Connection.__enter__ raises N times, the three others return 3N
    assert returns == {
        ("__exit__", True): N,
        ("__exit__", False): 2 * N,
        ("__enter__", True): N,
        ("__enter__", False): 3 * N,
    }, returns


def test_interpreters_listed() -> None:
    firing = [t.name for t in FOUND if fires_probes(t)]
    print(f"--calls evidence expected on: {', '.join(firing) or 'none'}")
    targets.require_found(FOUND, MISSING)


@pytest.mark.parametrize("interpreter", FOUND, ids=[t.name for t in FOUND])
def test_run_with_calls(tmp_path: Path, interpreter: targets.Target) -> None:
    _, program = programs_for(interpreter)
    out = tmp_path / "trace"
    result = run_cmtrace(
        "run", "--calls", "-o", str(out), "--", interpreter.command, program, str(N)
    )
    assert result.returncode == 0, result.stderr
    fires = fires_probes(interpreter)
    if not fires:
        assert "--calls in pid" in result.stderr, result.stderr  # the summary says why not
    check_trace(out, program, fires)


def read_semaphore(pid: int, address: int) -> int:
    with open(f"/proc/{pid}/mem", "rb") as mem:
        mem.seek(address)
        return struct.unpack("<H", mem.read(2))[0]


def non_pie_semaphores(interpreter: targets.Target) -> list[int]:
    """Semaphore addresses of a non-PIE executable (where the notes' addresses are final)."""
    exe = interpreter_files(interpreter)[0]
    header = subprocess.run(["readelf", "-h", exe], capture_output=True, text=True).stdout
    assert "EXEC (Executable file)" in header, f"{exe} is PIE: this check needs its load bias"
    return sorted({n["semaphore"] for n in probe_notes(exe) if n["name"].startswith("function")})


FIRING = [t for t in FOUND if fires_probes(t)]


@pytest.mark.parametrize("interpreter", FIRING, ids=[t.name for t in FIRING])
def test_attach_with_calls_arms_and_disarms(tmp_path: Path, interpreter: targets.Target) -> None:
    """`-p PID --calls`: the same evidence, and the probes' semaphores are raised while
    recording and back to 0 once the tracer has left (the target keeps running)."""
    attached, program = programs_for(interpreter)
    semaphores = non_pie_semaphores(interpreter)
    out = tmp_path / "trace"
    target = Target([interpreter.command, attached, program, str(N), "wait"], tmp_path)
    try:
        pid = target.expect("ready")["pid"]
        assert [read_semaphore(pid, a) for a in semaphores] == [0] * len(semaphores)
        tracer = Tracer(["-p", str(pid), "--calls", "-o", str(out)], cwd=tmp_path)
        assert tracer.wait_attached() == pid
        assert all(read_semaphore(pid, a) >= 1 for a in semaphores)
        target.send("go")
        target.expect("leaked")
        tracer.stop().check()
        assert [read_semaphore(pid, a) for a in semaphores] == [0] * len(semaphores)
        target.send("")
        assert target.finish() == 0, target.stderr_text()
    finally:
        target.kill()
    check_trace(out, program, fires=True)


def test_some_interpreter_fires_probes() -> None:
    """The scripts install Debian's 3.9 and 3.15, whose probes fire: without them the evidence
    above is untested, which this machine can do."""
    assert FIRING, f"no interpreter with firing USDT probes among {[t.name for t in FOUND]}"


def test_calls_needs_stacks(tmp_path: Path) -> None:
    result = run_cmtrace(
        "run", "--calls", "--no-python-stacks", "-o", str(tmp_path / "t"), "--", "true"
    )
    assert result.returncode == 1
    assert error_line(result).endswith("drop --no-python-stacks")


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("8@%r13", elfnotes.Arg(elfnotes.ARG_REG, elfnotes.REGISTERS["r13"])),
        ("-4@%eax", elfnotes.Arg(elfnotes.ARG_REG, elfnotes.REGISTERS["rax"])),
        ("-4@%r14d", elfnotes.Arg(elfnotes.ARG_REG, elfnotes.REGISTERS["r14"])),
        ("8@-16(%rbp)", elfnotes.Arg(elfnotes.ARG_MEM, elfnotes.REGISTERS["rbp"], -16)),
        ("8@(%rdi)", elfnotes.Arg(elfnotes.ARG_MEM, elfnotes.REGISTERS["rdi"], 0)),
        ("-4@$5", elfnotes.Arg(elfnotes.ARG_CONST, value=5)),
    ],
)
def test_usdt_argument_forms(spec: str, expected: elfnotes.Arg) -> None:
    """The operand forms gcc writes into stapsdt notes, as pt_regs slots (x86_64 order)."""
    assert elfnotes.parse_arg(spec) == expected


def test_usdt_notes_match_readelf() -> None:
    """cmtrace's note reader agrees with binutils on every interpreter that has probes."""
    for interpreter in FOUND:
        for path in interpreter_files(interpreter):
            ours = {(p.name, p.address, p.semaphore) for p in elfnotes.call_probes(path)}
            theirs = {(n["name"], n["location"], n["semaphore"]) for n in probe_notes(path)}
            assert ours == theirs, (interpreter.name, path)


@pytest.mark.parametrize("interpreter", FOUND, ids=[t.name for t in FOUND])
def test_doctor_says_whether_calls_work(tmp_path: Path, interpreter: targets.Target) -> None:
    attached, _ = programs_for(interpreter)
    target = Target([interpreter.command, attached, "/dev/null"], tmp_path)
    try:
        pid = target.expect("ready")["pid"]
        result = run_cmtrace("doctor", "-p", str(pid), "--format", "json")
        process = json.loads(result.stdout)["process"]
    finally:
        target.kill()
    if fires_probes(interpreter):
        assert process["calls"] == "available"
    else:
        assert process["calls"].startswith("CPython 3."), process["calls"]


@pytest.mark.parametrize("interpreter", FIRING, ids=[t.name for t in FIRING])
def test_async_managers_with_calls(tmp_path: Path, interpreter: targets.Target) -> None:
    """Coroutine methods fire an entry per resume: still one call per `async with`, so a
    raising __aexit__ is exit-raised and a forgetful one returned normally."""
    program = copy_program(interpreter, "calls_async.py")
    out = tmp_path / "trace"
    result = run_cmtrace(
        "run", "--calls", "-o", str(out), "--", interpreter.command, program, str(N)
    )
    assert result.returncode == 0, result.stderr
    leaks = cma.load(out).leaks()
    leaks = leaks[leaks["site_file"] == program]
    expected = marked_causes("calls_async.py")
    assert sorted(set(leaks["site_line"].astype(int))) == sorted(expected)
    for line, cause in expected.items():
        rows = leaks[leaks["site_line"].astype(int) == line]
        assert len(rows) == N and set(rows["cause"].astype(str)) == {cause}, rows[
            ["cause", "evidence"]
        ]
