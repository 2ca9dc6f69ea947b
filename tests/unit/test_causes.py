"""Contexts -> causes: classify() on hand-built stacks over a small program, one case per cause.

The program's source goes through the recorder's own fact extraction (source_rows, what a trace
holds); the stacks are written by hand, as the kernel walker would have seen them when the fd
was opened, and each case names the cause a reader of the program would give.
"""

from __future__ import annotations

import pandas as pd
import pytest

from cmtrace.analysis import CAUSES
from cmtrace.analysis.calls import Call, CallLog
from cmtrace.analysis.causes import Context, classify, refine_close
from cmtrace.analysis.code import Frame, SourceIndex
from cmtrace.trace import schema
from cmtrace.trace.sources import source_rows

APP = "/srv/app/leaky.py"
CONTEXTLIB = "/usr/lib/python3.11/contextlib.py"
RUNNERS = "/usr/lib/python3.11/asyncio/runners.py"
BASE_EVENTS = "/usr/lib/python3.11/asyncio/base_events.py"
LOGGING = "/usr/lib/python3.11/logging/__init__.py"
GEN = schema.CODE_GENERATOR
ASYNC_GEN = schema.CODE_ASYNC_GENERATOR

# Line numbers matter: the frames below point into this text (line 1 is "import os").
PROGRAM = """\
import os
from contextlib import contextmanager


def lines_of(path):
    with open(path) as f:
        yield from f


@contextmanager
def scratch_fd(path):
    fd = os.open(path, os.O_RDONLY)
    yield fd
    os.close(fd)


class Session:
    def __enter__(self):
        self.fd = os.open(__file__, os.O_RDONLY)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


class Handle:
    def __init__(self, path):
        self.fd = os.open(path, os.O_RDONLY)

    def __del__(self):
        os.close(self.fd)


def open_raw(path):
    return os.open(path, os.O_RDONLY)


def main():
    rows = lines_of(__file__)
    next(rows)
    with scratch_fd(__file__):
        raise ValueError
    session = Session()
    session.__enter__()
    Handle(__file__)
    with Session() as lease:
        pass
    open_raw(__file__)
    os.close(3)
    handle = None


async def dependency(path):
    with open(path) as conn:
        yield conn
"""


def at(text: str, nth: int = 0) -> int:
    """The line number of the nth line (from 0) whose stripped text is `text`."""
    lines = [n for n, line in enumerate(PROGRAM.splitlines(), start=1) if line.strip() == text]
    return lines[nth]


def frame(function: str, line: int, file: str = APP, flags: int = 0, qualname: str = "") -> Frame:
    return Frame(
        function=function, qualname=qualname or function, file=file, line=line,
        firstlineno=line, code_flags=flags,
    )  # fmt: skip


MAIN = "main"


@pytest.fixture(scope="module")
def src() -> SourceIndex:
    rows = source_rows(APP, PROGRAM)
    return SourceIndex.from_table(pd.DataFrame(rows), local_fallback=False)


# name -> (stack innermost first, context, expected cause)
SUSPENDED = [
    frame("lines_of", at("with open(path) as f:"), flags=GEN),
    frame(MAIN, at("next(rows)")),
]
CONTEXTMANAGER = [
    frame("scratch_fd", at("fd = os.open(path, os.O_RDONLY)"), flags=GEN),
    frame("__enter__", 135, CONTEXTLIB, qualname="_GeneratorContextManager.__enter__"),
    frame(MAIN, at("with scratch_fd(__file__):")),
]
# Session.__enter__ opens the fd; main calls it by hand (MANUAL) or in a with (WITH_EXITED).
SESSION_OPENS = frame(
    "__enter__", at("self.fd = os.open(__file__, os.O_RDONLY)"), qualname="Session.__enter__"
)
MANUAL = [SESSION_OPENS, frame(MAIN, at("session.__enter__()"))]
FINALIZER = [
    frame("__init__", at("self.fd = os.open(path, os.O_RDONLY)"), qualname="Handle.__init__"),
    frame(MAIN, at("Handle(__file__)")),
]
WITH_EXITED = [SESSION_OPENS, frame(MAIN, at("with Session() as lease:"))]
RAW = [
    frame("open_raw", at("return os.open(path, os.O_RDONLY)")),
    frame(MAIN, at("open_raw(__file__)")),
]
STDLIB_ONLY = [frame("open", 20, "/usr/lib/python3.11/json/__init__.py")]
OPENED = (1, 1, 1_000)  # (pid, tid, born_ns) of the fd


def calls(enter_raised: bool | None, exit_raised: bool | None) -> Context:
    """--calls evidence: Session.__enter__ around the birth, then (unless exit_raised is None)
    the __exit__ the with statement in main called."""
    method = frame("__enter__", at("def __enter__(self):"), qualname="Session.__enter__")
    with_stmt = frame(MAIN, at("with Session() as lease:"))
    log = [Call("__enter__", 900, 1_100, enter_raised, method, with_stmt)]
    if exit_raised is not None:
        exit_method = frame(
            "__exit__", at("def __exit__(self, *exc):"), qualname="Session.__exit__"
        )
        log.append(Call("__exit__", 2_000, 2_100, exit_raised, exit_method, with_stmt))
    return Context(calls=CallLog({(1, 1): log}, {1}), opened=OPENED)


CLASSIFY = {
    "suspended-generator": (SUSPENDED, Context()),
    "contextmanager-without-finally": (CONTEXTMANAGER, Context()),
    "manual-enter": (MANUAL, Context()),
    "finalizer-never-ran": (FINALIZER, Context()),
    "enter-raised": (WITH_EXITED, calls(enter_raised=True, exit_raised=None)),
    "exit-raised": (WITH_EXITED, calls(enter_raised=False, exit_raised=True)),
    "with-exited-without-close": (WITH_EXITED, Context()),
    "no-context-manager": (RAW, Context()),
    "unknown": (STDLIB_ONLY, Context()),
}


def test_every_cause_has_a_case() -> None:
    assert list(CLASSIFY) == list(CAUSES)


@pytest.mark.parametrize("cause", CLASSIFY)
def test_classify(cause: str, src: SourceIndex) -> None:
    frames, ctx = CLASSIFY[cause]
    verdict = classify(frames, src, ctx)
    assert verdict.cause == cause, verdict
    assert verdict.fix and verdict.evidence


def test_no_stack_is_unknown_and_says_why(src: SourceIndex) -> None:
    verdict = classify([], src, Context())
    assert verdict.cause == "unknown"
    assert "no Python stack" in verdict.evidence[0]


def test_generator_still_running_at_the_end_is_not_suspended(src: SourceIndex) -> None:
    """The end snapshot shows lines_of on a thread's stack inside its with block: it may still
    be using the fd, so no cause is claimed."""
    ctx = Context(still_running={(APP, "lines_of"): {at("yield from f")}}, snapshot_taken=True)
    verdict = classify(SUSPENDED, src, ctx)
    assert verdict.cause == "unknown", verdict
    assert any("still running" in line for line in verdict.evidence), verdict.evidence


def test_with_block_still_running_is_not_exited(src: SourceIndex) -> None:
    ctx = Context(still_running={(APP, MAIN): {at("pass")}}, snapshot_taken=True)
    assert classify(WITH_EXITED, src, ctx).cause == "unknown"


def test_exit_that_returned_normally_is_evidence_not_a_new_cause(src: SourceIndex) -> None:
    verdict = classify(WITH_EXITED, src, calls(enter_raised=False, exit_raised=False))
    assert verdict.cause == "with-exited-without-close"
    assert any("returned normally" in line for line in verdict.evidence), verdict.evidence


def test_async_generator_dependency_is_suspended(src: SourceIndex) -> None:
    frames = [frame("dependency", at("with open(path) as conn:"), flags=ASYNC_GEN)]
    ctx = Context(sibling_deaths={"loop-shutdown": 2})
    verdict = classify(frames, src, ctx)
    assert verdict.cause == "suspended-generator"
    assert "async generator" in verdict.fix


# How an explicit close happened, from the close's stack: (stack, death).
CLOSES = {
    "no stack": ([], "close"),
    "os.close in user code": ([frame(MAIN, at("os.close(3)"))], "close"),
    "inside __exit__": ([frame("__exit__", at("os.close(self.fd)"), qualname="Session.__exit__")], "exit"),
    "inside __del__": ([frame("__del__", at("os.close(self.fd)", 1), qualname="Handle.__del__")], "finalizer"),
    "the with line (a C-level __exit__)": ([frame(MAIN, at("with Session() as lease:"))], "exit"),
    "a line that only drops a reference": ([frame(MAIN, at("handle = None"))], "finalizer"),
    "asyncio.run shutting its loop down": (
        [frame("shutdown_asyncgens", 550, BASE_EVENTS), frame("run", 190, RUNNERS)],
        "loop-shutdown",
    ),
    "logging.shutdown, an atexit handler, closing a handler": (
        [frame("close", 1190, LOGGING, qualname="FileHandler.close"),
         frame("shutdown", 2190, LOGGING)],
        "atexit",
    ),
    "a handler closed by the program itself": (
        [frame("close", 1190, LOGGING, qualname="FileHandler.close"), frame(MAIN, at("os.close(3)"))],
        "close",
    ),
}  # fmt: skip


@pytest.mark.parametrize("how", CLOSES)
def test_refine_close(how: str, src: SourceIndex) -> None:
    frames, death = CLOSES[how]
    assert refine_close(frames, src) == death


# --- issue 13: the end-of-recording liveness check (cmtrace.interp.generators findings) ---
def found(state: str | None, line: int | None = None, error: str | None = None) -> dict:
    return {"pid": 1, "address": 0x7F0000001000, "code": 0x7F0000002000, "type": "generator",
            "state": state, "line": line, "error": error}  # fmt: skip


def test_suspended_inside_its_with_is_proven(src: SourceIndex) -> None:
    ctx = Context(liveness={0: [found("suspended", at("yield from f"))]})
    verdict = classify(SUSPENDED, src, ctx)
    assert verdict.cause == "suspended-generator", verdict
    assert any("a suspended generator of lines_of at 0x7f0000001000" in e
               for e in verdict.evidence), verdict.evidence  # fmt: skip


@pytest.mark.parametrize("state", ["finished", "gone", "created"])
def test_generator_that_ended_falls_through(state: str, src: SourceIndex) -> None:
    verdict = classify(SUSPENDED, src, Context(liveness={0: [found(state)]}))
    assert verdict.cause != "suspended-generator", verdict
    assert f"lines_of is no longer suspended there: {state} (read when recording stopped)" in (
        verdict.evidence), verdict.evidence  # fmt: skip


def test_suspended_outside_the_with_is_not_this_suspension(src: SourceIndex) -> None:
    """Suspended at a line after the block (another instance at a reused address, or the same
    one resumed past its with): not suspended inside the with that holds the fd."""
    ctx = Context(liveness={0: [found("suspended", at("with open(path) as f:") - 1)]})
    assert classify(SUSPENDED, src, ctx).cause != "suspended-generator"


@pytest.mark.parametrize(
    "findings", [{}, {0: [found(None, error="read failed: short read")]}], ids=["none", "error"]
)
def test_no_proof_keeps_the_verdict_and_says_unproven(findings: dict, src: SourceIndex) -> None:
    verdict = classify(SUSPENDED, src, Context(liveness=findings))
    assert verdict.cause == "suspended-generator", verdict
    assert any(e.startswith("unproven") for e in verdict.evidence), verdict.evidence


def test_without_a_check_the_evidence_is_todays(src: SourceIndex) -> None:
    verdict = classify(SUSPENDED, src, Context())
    assert verdict.cause == "suspended-generator"
    assert not any("unproven" in e or "suspended generator of" in e for e in verdict.evidence)
