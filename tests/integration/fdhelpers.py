"""Helpers of the tests that trace a tests/programs/fd/fdops.py scenario under `cmtrace -p`.

Each such test starts the target, attaches, sends "go", waits for the scenario's "done", reads
what only a living target can tell (/proc/PID/fd), stops the tracer and lets the target exit:
`trace_scenario` is that sequence once, so a test keeps only what it checks.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from conftest import (
    Session,
    assert_complete_and_lossless,
    leaks_of,
    read_events,
    report_json,
    start_traced,
)

Seen = TypeVar("Seen")


def trace_scenario(
    scenario: str,
    workdir: Path,
    *tracer_args: str,
    scenario_args: tuple[str, ...] = (),
    timeout: float = 60,
    while_alive: Callable[[Session], Seen] | None = None,
    stop_signal: int = signal.SIGINT,
    lossless: bool = True,
) -> tuple[Session, Seen | None]:
    """Trace one fdops scenario from "go" to "done", then stop the tracer while the target lives.

    `while_alive(session)` runs after "done" (session.done is set) and before the stop; what it
    returns comes back as the second value. Stopping the tracer must leave the target running
    (cmtrace detaches, it never kills), and the target must then exit 0 when told to. With
    `lossless`, the trace must be complete with no lost events, in meta.json and the summary.
    Returns the session with `done` and `result` set.
    """
    session = start_traced(scenario, workdir, *tracer_args, scenario_args=scenario_args)
    target = session.target
    try:
        target.send("go")
        session.done = target.expect("done", timeout=timeout)
        seen = while_alive(session) if while_alive else None
        session.result = session.tracer.stop(stop_signal).check()
        assert target.proc.poll() is None, "stopping the tracer must leave the target running"
    finally:
        session.tracer.kill()
        exit_code = target.finish()
    assert exit_code == 0, f"{scenario} exited {exit_code}:\n{target.stderr_text()}"
    if lossless:
        assert_complete_and_lossless(session.trace, session.result.stdout)
    return session, seen


def ops_of(events, pid: int, op: str):
    """The rows of one process's events with operation `op` (birth, close, fail, exec, ...)."""
    return events[(events.pid == pid) & (events.op == op)]


@dataclass
class ScenarioRun:
    """What a traced scenario left for its module's tests to check (a subclass adds its truth)."""

    pid: int
    done: dict  # the target's "done" message: the scenario's ground truth
    events: Any  # pandas DataFrame of the whole trace
    report: dict  # `cmtrace report --format json`

    def ops(self, op: str):
        return ops_of(self.events, self.pid, op)

    def leaks(self) -> list[dict]:
        return leaks_of(self.report, self.pid)


def scenario_run_fields(session: Session) -> dict:
    """ScenarioRun's fields read from a finished session, as keywords for a subclass."""
    return {
        "pid": session.target.pid,
        "done": session.done,
        "events": read_events(session.trace),
        "report": report_json(session.trace),
    }
