"""Dumps (issue 15): `--dump-on emfile|N|P%` and SIGUSR1 write TRACE/dumps/NNN-REASON.json and
.txt, the report as it stood at that instant, while the recording goes on.

The target (tests/programs/leaks/dump_emfile.py) runs under `prlimit --nofile=128`, leaks a
file at one line until EMFILE and prints how many fds it has open after each step: each dump's
open-fd count and its leaks at that line are checked against what the program knew then.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import (
    ATTACH_TIMEOUT,
    EXIT_TIMEOUT,
    TARGET_PYTHON,
    Target,
    Tracer,
    cmtrace_argv,
    error_line,
    read_meta,
    run_cmtrace,
)

PROGRAM = Path(__file__).resolve().parents[1] / "programs" / "leaks" / "dump_emfile.py"
LEAK_LINE = next(
    n for n, text in enumerate(PROGRAM.read_text().splitlines(), 1) if text.endswith("# LEAK")
)
LIMIT = 128
DUMP_TIMEOUT = 120  # a dump is written one flush after its instant; a loaded machine is slow


def start_target(workdir: Path, *args: str) -> tuple[Target, dict]:
    target = Target(
        ["prlimit", f"--nofile={LIMIT}", TARGET_PYTHON, str(PROGRAM), str(workdir), *args],
        workdir,
    )
    ready = target.expect("ready")
    assert ready["limit"] == LIMIT
    return target, ready


def attach(target: Target, trace: Path, *flags: str) -> Tracer:
    tracer = Tracer(["-p", str(target.pid), "-o", str(trace), *flags])
    try:
        tracer.wait_attached(ATTACH_TIMEOUT)
    except BaseException:
        target.kill()
        raise
    return tracer


def steps_until(target: Target, event: str) -> list[dict]:
    """The program's step messages up to and including `event`."""
    last = target.expect(event)
    steps = [m for m in target.messages if m["event"] == "step"]
    target.messages.clear()
    return [*steps, last]


def wait_dumped(tracer: Tracer, count: int) -> None:
    tracer.err.wait_for(
        lambda line: f"dump {count:03d}-" in line and " written: " in line,
        DUMP_TIMEOUT,
        f"dump {count:03d} written",
    )


def read_dump(trace: Path, name: str) -> tuple[dict, str]:
    return (
        json.loads((trace / "dumps" / f"{name}.json").read_text()),
        (trace / "dumps" / f"{name}.txt").read_text(),
    )


def leaks_at_the_line(dump: dict) -> int:
    return sum(
        1
        for leak in dump["leaks"]
        if leak["site"]
        and leak["site"]["file"] == str(PROGRAM)
        and leak["site"]["line"] == LEAK_LINE
    )


def check_dump(trace: Path, name: str, pid: int, at: dict) -> dict:
    """The dump `name` was taken when the program had at["open"] fds open, at["held"] of them
    leaked at LEAK_LINE; every leak it lists is one of those."""
    dump, text = read_dump(trace, name)
    info = dump["dump"]
    assert (info["reason"], info["pid"], info["limit"]) == (name.split("-", 1)[1], pid, LIMIT)
    assert info["open_fds"] == at["open"], (name, info, at)
    assert leaks_at_the_line(dump) == at["held"] == len(dump["leaks"]), name
    assert dump["schema"] == 1 and dump["sites"][0]["line"] == LEAK_LINE
    assert dump["sites"][0]["leaked"] == at["held"]
    assert f"{PROGRAM}:{LEAK_LINE}" in text and f"{at['held']} leaked" in text
    assert text.startswith(f"cmtrace dump {name}: pid {pid} at ")
    return info


def step_with(steps: list[dict], open_fds: int) -> dict:
    return next(s for s in steps if s["open"] == open_fds)


@pytest.mark.usefixtures("bpf_ready")
def test_emfile_a_count_and_a_percent_each_dump_once_and_recording_goes_on(workdir: Path) -> None:
    target, ready = start_target(workdir, "--wait")
    trace = workdir / "trace"
    tracer = attach(
        target, trace, "--backend", "bpf", "--dump-on", "emfile", "--dump-on", "100",
        "--dump-on", "50%",
    )  # fmt: skip
    try:
        target.send("go")
        steps = steps_until(target, "emfile")
        wait_dumped(tracer, 3)
        target.finish()
        result = tracer.wait(EXIT_TIMEOUT).check()
    finally:
        target.kill()
        tracer.kill()
    emfile = steps[-1]
    assert emfile["open"] == LIMIT  # fds 0-2 and 125 leaks: every fd number below the limit
    half = check_dump(trace, "001-pct-50", target.pid, step_with(steps, LIMIT // 2))
    hundred = check_dump(trace, "002-fds-100", target.pid, step_with(steps, 100))
    full = check_dump(trace, "003-emfile", target.pid, emfile)
    assert half["t_ns"] < hundred["t_ns"] < full["t_ns"]
    assert sorted(p.name for p in (trace / "dumps").iterdir()) == [
        f"{n}.{ext}" for n in ("001-pct-50", "002-fds-100", "003-emfile") for ext in ("json", "txt")
    ]
    assert result.stderr.count(" written: ") == 3
    # the recording went on to the target's exit: the full trace holds every leak
    assert read_meta(trace)["status"] == "complete"
    final = json.loads(
        subprocess.run(
            cmtrace_argv("report", str(trace), "--format", "json"),
            capture_output=True, text=True, check=True,
        ).stdout
    )  # fmt: skip
    assert leaks_at_the_line(final) == emfile["held"]


# --aggregate ships a live fd once it is --min-age old (0: at the sweep, once a second)
AGGREGATE = ("--aggregate", "--min-age", "0")


@pytest.mark.usefixtures("bpf_ready")
@pytest.mark.parametrize("flags", [(), AGGREGATE], ids=["full", "aggregate"])
def test_sigusr1_dumps_at_once_and_stop_after_dump_detaches(workdir: Path, flags) -> None:
    target, ready = start_target(workdir, "--pause-at", "40", "--wait")
    trace = workdir / "trace"
    tracer = attach(target, trace, "--backend", "bpf", "--stop-after-dump", *flags)
    try:
        target.send("go")
        paused = steps_until(target, "paused")[-1]
        tracer.proc.send_signal(signal.SIGUSR1)
        wait_dumped(tracer, 1)
        result = tracer.wait(EXIT_TIMEOUT).check()  # stopped by itself after the dump
        assert target.proc.poll() is None  # the target runs on, untraced
        target.send("")
        assert target.expect("emfile")["open"] == LIMIT
        assert target.finish() == 0
    finally:
        target.kill()
        tracer.kill()
    check_dump(trace, "001-manual", target.pid, paused)
    assert "--stop-after-dump" in read_meta(trace)["stop_reason"]
    assert read_meta(trace)["status"] == "complete"
    assert [p.name for p in sorted((trace / "dumps").iterdir())] == [
        "001-manual.json",
        "001-manual.txt",
    ]
    assert "dump 001-manual written: " in result.stderr


@pytest.mark.parametrize("backend", ["bpf", "ptrace"])
def test_a_dump_is_written_when_the_target_dies_of_its_emfile(
    workdir: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    """`cmtrace run`: the command exits at its EMFILE; both of its dumps are written."""
    if backend == "bpf":
        request.getfixturevalue("bpf_ready")
    trace = workdir / "trace"
    command = ["prlimit", f"--nofile={LIMIT}", TARGET_PYTHON, str(PROGRAM), str(workdir),
               "--startup", "1.5"]  # fmt: skip
    result = subprocess.run(
        cmtrace_argv(
            "run", "--backend", backend, "-o", str(trace), "--dump-on", "emfile", "--dump-on",
            "100", "--", *command,
        ),
        input="go\n", capture_output=True, text=True, timeout=EXIT_TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    messages = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    pid = messages[0]["pid"]
    steps = [m for m in messages if m["event"] in ("step", "emfile")]
    check_dump(trace, "001-fds-100", pid, step_with(steps, 100))
    check_dump(trace, "002-emfile", pid, steps[-1])
    assert result.stderr.count(" written: ") == 2, result.stderr


@pytest.mark.usefixtures("bpf_ready")
def test_a_dump_that_cannot_be_written_is_one_line_and_the_trace_is_kept(workdir: Path) -> None:
    target, ready = start_target(workdir, "--pause-at", "20", "--wait")
    trace = workdir / "trace"
    tracer = attach(target, trace, "--backend", "bpf", "--dump-on", "10")
    (trace / "dumps").write_text("in the way: no directory can be made here")
    try:
        target.send("go")
        steps_until(target, "paused")
        tracer.err.wait_for(lambda line: "dump 001-fds-10 not written" in line, DUMP_TIMEOUT,
                            "the failed dump's line")  # fmt: skip
        target.send("")
        steps_until(target, "emfile")
        target.finish()
        result = tracer.wait(EXIT_TIMEOUT).check()
    finally:
        target.kill()
        tracer.kill()
    failed = [line for line in result.stderr.splitlines() if "not written" in line]
    assert len(failed) == 1 and "recording goes on" in failed[0], result.stderr
    assert "Traceback" not in result.stderr
    assert read_meta(trace)["status"] == "complete"


@pytest.mark.parametrize(
    ("value", "says"),
    [("0", "at least 1"), ("120%", "1% to 100%"), ("foo", "expected emfile")],
)
@pytest.mark.parametrize("verb", [("-p", "1"), ("run", "--", "true")])
def test_bad_dump_on_values_are_refused_in_one_line(value: str, says: str, verb: tuple) -> None:
    where = 2 if verb[0] == "-p" else 1  # after `-p PID`, or after `run`
    result = run_cmtrace(*verb[:where], "--dump-on", value, *verb[where:])
    assert result.returncode == 1
    line = error_line(result)
    assert line.startswith(f"cmtrace: error: --dump-on {value}: ") and says in line
