"""Why an fd leaked: one cause per leak from the evidence in the trace, and how deaths happened.

The causes are tried in a fixed order and the first that fits wins, so two builds agree: that
order is the table _RULES (CAUSES lists every cause it can give, unknown last).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from cmtrace.analysis.calls import ENTERS, EXITS, Call, CallLog
from cmtrace.analysis.code import Frame, SourceIndex, innermost_user

ENTER_METHODS = ENTERS  # the dunder methods the context manager protocol calls
EXIT_METHODS = EXITS
# Lines whose only effect on an object can be to drop the last reference to it.
_DROPS_REFERENCE = re.compile(r"^\s*del\s|=\s*None\s*(#.*)?$|\bgc\.collect\(")
_CLOSING_CALL = re.compile(
    r"\b(?:close|aclose|closerange|close_range|shutdown|detach|terminate|kill|wait|communicate|"
    r"cleanup|release|dispose|_real_close|dup2)\b"
)


@dataclass
class Verdict:
    cause: str
    fix: str
    evidence: list[str] = field(default_factory=list)
    with_frame: Frame | None = None


@dataclass
class Context:
    """What is known beyond the opening stack."""

    # (file, function) -> lines those frames were executing when recording stopped (snapshot)
    still_running: dict[tuple[str, str], set[int]] = field(default_factory=dict)
    snapshot_taken: bool = False
    sibling_deaths: dict[str, int] = field(default_factory=dict)  # deaths of the site's other fds
    calls: CallLog | None = None  # --calls: paired __enter__/__exit__ calls of the trace
    opened: tuple[int, int, int] | None = None  # (pid, tid, born_ns) of one fd of the group
    # Issue 13's end-of-recording liveness check (cmtrace.interp.generators), per frame index of
    # the opening stack: the findings (Finding.as_dict()) of the group's fds for the generator
    # that frame ran. None: no check in this trace (today's verdicts, unchanged).
    liveness: dict[int, list[dict]] | None = None
    # what the check proved of generators that are not suspended any more (said by the verdict
    # the evidence falls through to)
    liveness_notes: list[str] = field(default_factory=list)


def with_frame(frames: list[Frame], src: SourceIndex) -> Frame | None:
    """The innermost user frame executing a with statement's header: the with holding the fd."""
    for frame in frames:
        if frame.is_user and src.with_at(frame.file, frame.line):
            return frame
    return None


def classify(frames: list[Frame], src: SourceIndex, ctx: Context) -> Verdict:
    """The first cause, in CAUSES order, that the evidence supports."""
    if not frames:
        return Verdict("unknown", "record with Python stacks to see the opening line",
                       ["no Python stack was captured when the fd was opened"])  # fmt: skip
    held_by = with_frame(frames, src)
    ctx.liveness_notes = []  # this stack's
    for _, rule in _RULES:
        verdict = rule(frames, src, ctx, held_by)
        if verdict is not None:
            verdict.with_frame = held_by
            verdict.evidence.extend(n for n in ctx.liveness_notes if n not in verdict.evidence)
            return verdict
    site = innermost_user(frames) or frames[0]
    evidence = [f"opened at {site.where()} in {site.qualname}"]
    if held_by is not None and _block_running(held_by, src, ctx):
        evidence.append(
            f"the with block at {held_by.where()} was still running when recording stopped: "
            "the fd may still be in use"
        )
    evidence.extend(ctx.liveness_notes)
    return Verdict("unknown", "inspect the evidence: the trace cannot tell why it stayed open",
                   evidence, held_by)  # fmt: skip


def _running_lines(frame: Frame, ctx: Context) -> set[int] | None:
    """Lines a frame of this function executed at the end snapshot; None when not on a stack."""
    for name in (frame.qualname, frame.function):
        lines = ctx.still_running.get((frame.file, name))
        if lines is not None:
            return lines
    return None


def _still_running(frame: Frame, ctx: Context) -> bool:
    """Is this function on a thread's stack at the end (a suspended generator is not)?"""
    return _running_lines(frame, ctx) is not None


def _block_running(frame: Frame, src: SourceIndex, ctx: Context) -> bool:
    """Was the with statement `frame` executes still inside its block when recording stopped?"""
    lines = _running_lines(frame, ctx)
    if not lines:
        return False
    stmt = src.with_at(frame.file, frame.line)
    first, last = (stmt[0], stmt[2]) if stmt else (frame.line, frame.line)
    return any(first <= line <= last for line in lines)


def _block_ended(frame: Frame, src: SourceIndex, ctx: Context) -> bool:
    """Did the with block of `frame` end? Without a final snapshot, the process ended it."""
    return not _block_running(frame, src, ctx)


def _manager_caller(frames: list[Frame], index: int) -> tuple[int, Frame] | None:
    """The frame that called the context manager whose generator/enter is frames[index]."""
    for j in range(index + 1, len(frames)):
        frame = frames[j]
        if frame.function in ENTER_METHODS and not frame.is_user:
            continue  # contextlib's _GeneratorContextManager.__enter__
        return j, frame
    return None


def _is_contextmanager(frame: Frame, src: SourceIndex) -> bool:
    found = src.function_at(frame.file, frame.line)
    return bool(found and found[1].get("contextmanager"))


def _suspended_generator(
    frames: list[Frame], src: SourceIndex, ctx: Context, held_by: Frame | None
) -> Verdict | None:
    site = innermost_user(frames)
    for index, gen in enumerate(frames):
        if not (gen.is_user and gen.is_generator):
            continue
        if _is_contextmanager(gen, src) or _called_by_contextlib(frames, index):
            caller = _manager_caller(frames, index)
            if caller is None or caller[1].is_user:
                continue  # a user with/enter drives it: later causes explain it
        holds_with = src.with_at(gen.file, gen.line) is not None
        only_coroutine = gen.code_flags & 0x280 == 0x80  # coroutine, not a generator
        if only_coroutine and not holds_with:
            continue  # a coroutine that opens an fd is ordinary code, not a suspension
        if gen is not site and not holds_with and not gen.code_flags & 0x220:
            continue
        if _still_running(gen, ctx) or _with_exited_per_calls(gen, src, ctx):
            continue
        proof = liveness_proof(index, gen, src, ctx)
        if proof is not None and proof[0] == LIVENESS_FINISHED:
            ctx.liveness_notes.append(proof[1] + " (read when recording stopped)")
            continue  # it ended (or was freed): the causes after this one explain the fd
        what = "async generator" if gen.code_flags & 0x200 else (
            "coroutine" if only_coroutine else "generator")  # fmt: skip
        held = f" inside its with statement at line {gen.line}" if holds_with else ""
        fix = (
            f"{gen.file}:{gen.line}: the {what} {gen.qualname} stops here{held} and is never "
            "resumed or closed. Put the yield in try/finally (or close the resource before "
            "yielding), and have the consumer finish it: `with contextlib.closing(gen)`, "
            "`gen.close()`, or `await agen.aclose()` for an async dependency."
        )
        evidence = [f"opened inside {what} {gen.qualname} ({gen.where()})"]
        if proof is not None:
            evidence.append(proof[1])
        if ctx.sibling_deaths.get("loop-shutdown"):
            evidence.append("sibling fds were closed only when the event loop shut down")
        return Verdict("suspended-generator", fix, evidence)
    return None


LIVENESS_PROVEN = "proven"
LIVENESS_FINISHED = "finished"
LIVENESS_UNPROVEN = "unproven"
_NOT_SUSPENDED = ("finished", "gone", "created")


def liveness_proof(
    index: int, gen: Frame, src: SourceIndex, ctx: Context
) -> tuple[str, str] | None:
    """What the liveness check says of the generator frames[index] ran: (LIVENESS_*, evidence),
    None when the trace has no check. Suspended at a line inside the frame's with block (or at
    the opening line) proves it; finished, freed, never started, or suspended elsewhere in every
    fd's check proves it is not suspended there; no finding or a failed read proves nothing."""
    if ctx.liveness is None:
        return None
    findings = ctx.liveness.get(index, [])
    stmt = src.with_at(gen.file, gen.line)
    first, last = (stmt[0], stmt[2]) if stmt else (gen.line, gen.line)
    for found in findings:
        line = found.get("line")
        if found.get("state") == "suspended" and line is not None and first <= line <= last:
            kind = (found.get("type") or "generator").replace("_", " ")
            return LIVENESS_PROVEN, (
                f"a suspended {kind} of {gen.qualname} at {found['address']:#x} resumes at line "
                f"{line} (read when recording stopped; addresses are reused, so a suspended one "
                "of this function)"
            )
    errors = [f.get("error") for f in findings if f.get("state") is None]
    if findings and not errors:
        states = sorted({str(f.get("state")) for f in findings})
        return (
            LIVENESS_FINISHED,
            f"{gen.qualname} is no longer suspended there: {', '.join(states)}",
        )
    why = errors[0] if errors else "no generator address was recorded with the birth"
    return LIVENESS_UNPROVEN, f"unproven that it is still suspended ({why})"


def _with_exited_per_calls(gen: Frame, src: SourceIndex, ctx: Context) -> bool:
    """--calls evidence that the with statement `gen` was suspended in later called its
    __exit__/__aexit__: the generator or coroutine was resumed past the block after all."""
    evidence = _call_evidence(ctx)
    return evidence is not None and _exit_call(gen, src, evidence, evidence.born) is not None


@dataclass
class _CallEvidence:
    """--calls evidence about one fd: the paired calls, and the thread and time that opened it."""

    calls: CallLog
    pid: int
    tid: int
    born: int


def _call_evidence(ctx: Context) -> _CallEvidence | None:
    """The --calls evidence, when --calls was recorded and its probes fired in the process that
    opened the fd (None otherwise)."""
    if not ctx.calls or ctx.opened is None or ctx.opened[0] not in ctx.calls.pids:
        return None
    return _CallEvidence(ctx.calls, *ctx.opened)


def _exit_call(holder: Frame, src: SourceIndex, evidence: _CallEvidence, after: int) -> Call | None:
    """The first __exit__/__aexit__ that the with statement `holder` executes called after
    `after` on the opening thread (None: none seen, or `holder` is not at a with statement)."""
    stmt = src.with_at(holder.file, holder.line)
    if not stmt:
        return None
    return evidence.calls.exit_after(evidence.pid, evidence.tid, after, holder, (stmt[0], stmt[2]))


def _called_by_contextlib(frames: list[Frame], index: int) -> bool:
    return (
        index + 1 < len(frames)
        and frames[index + 1].function in ENTER_METHODS
        and (frames[index + 1].file.endswith("contextlib.py"))
    )


def _contextmanager_without_finally(
    frames: list[Frame], src: SourceIndex, ctx: Context, held_by: Frame | None
) -> Verdict | None:
    for index, frame in enumerate(frames):
        if not frame.is_user:
            continue
        found = src.function_at(frame.file, frame.line)
        if not found or not found[1].get("contextmanager"):
            continue
        unprotected = found[1].get("unprotected_yields") or []
        caller = _manager_caller(frames, index)
        if not unprotected or caller is None:
            continue
        holder = held_by if held_by is not None and frames.index(held_by) > index else None
        if holder is None or not _block_ended(holder, src, ctx):
            continue
        yield_line = unprotected[0]
        fix = (
            f"{frame.file}:{yield_line}: the yield of @contextmanager {found[0]} is not inside "
            f"try/finally, so when the with block at {holder.where()} raises, the cleanup after "
            "the yield never runs. Wrap it: `try: yield res` / `finally: res.close()`."
        )
        evidence = [
            f"opened in @contextmanager {found[0]} ({frame.where()})",
            f"yield at line {yield_line} is outside any try/finally",
            f"entered by the with statement at {holder.where()}, which has ended",
        ]
        return Verdict("contextmanager-without-finally", fix, evidence)
    return None


def _manual_enter(
    frames: list[Frame], src: SourceIndex, ctx: Context, held_by: Frame | None
) -> Verdict | None:
    for index, frame in enumerate(frames):
        if frame.function not in ENTER_METHODS:
            continue
        if index + 1 >= len(frames):
            return None
        caller = frames[index + 1]
        if not caller.is_user or src.with_at(caller.file, caller.line):
            return None  # entered by a with statement (or by a framework's ExitStack)
        fix = (
            f"{caller.file}:{caller.line} calls {frame.qualname} by hand, so nothing guarantees "
            "__exit__: use a `with` statement, or contextlib.ExitStack with "
            "`stack.enter_context(...)`, so the exit runs on every path."
        )
        evidence = [f"{frame.qualname} ({frame.where()}) called directly at {caller.where()}"]
        return Verdict("manual-enter", fix, evidence)
    return None


def _finalizer_never_ran(
    frames: list[Frame], src: SourceIndex, ctx: Context, held_by: Frame | None
) -> Verdict | None:
    for frame in frames:
        if not frame.is_user:
            continue
        cls = src.class_of(frame.file, frame.qualname)
        if cls is None:
            found = src.function_at(frame.file, frame.line)
            cls = src.class_of(frame.file, found[0]) if found else None
        methods = set(cls.get("methods", [])) if cls else set()
        if "__del__" in methods and not methods & set(EXIT_METHODS):
            owner = frame.qualname.rsplit(".", 1)[0]
            fix = (
                f"{frame.file}:{frame.line}: {owner} closes its fd only in __del__, which never "
                "ran (a reference cycle, or gc never collected it). Give it close()/__exit__ "
                "and use it in a `with`; break the cycle (weakref) if it must rely on __del__."
            )
            evidence = [f"{owner} defines __del__ and no __exit__"]
            if ctx.sibling_deaths.get("finalizer"):
                evidence.append(f"{ctx.sibling_deaths['finalizer']} sibling fds closed by __del__")
            return Verdict("finalizer-never-ran", fix, evidence)
    return None


def _with_exited_without_close(
    frames: list[Frame], src: SourceIndex, ctx: Context, held_by: Frame | None
) -> Verdict | None:
    if held_by is None or not _block_ended(held_by, src, ctx):
        return None
    site = innermost_user(frames) or frames[0]
    fix = (
        f"{held_by.file}:{held_by.line}: the with block ended but its manager did not close the "
        f"fd opened at {site.file}:{site.line}: make __exit__ close it first and not raise "
        "before closing, or wrap the resource in contextlib.closing(...)."
    )
    evidence = [f"opened by the with statement at {held_by.where()}, whose block has ended"]
    if ctx.sibling_deaths.get("exit"):
        evidence.append(f"{ctx.sibling_deaths['exit']} sibling fds were closed by an __exit__")
    verdict = Verdict("with-exited-without-close", fix, evidence)
    return _refine_with_calls(verdict, site, src, ctx, held_by)


def _refine_with_calls(verdict: Verdict, site: Frame, src: SourceIndex, ctx: Context,
                       held_by: Frame) -> Verdict:  # fmt: skip
    """With --calls evidence: did the __enter__ that opened the fd raise (the with statement
    then never calls __exit__), or did the statement's __exit__ raise, return, or never run?"""
    evidence = _call_evidence(ctx)
    if evidence is None:
        return verdict
    enter = evidence.calls.enter_around(evidence.pid, evidence.tid, evidence.born)
    if enter is not None and enter.raised:
        return Verdict(
            "enter-raised",
            f"{_defined_at(enter, site)}: __enter__ raised after opening the fd at "
            f"{site.file}:{site.line}, and a with statement calls no __exit__ when __enter__ "
            "raises: release what __enter__ opened before letting the exception out "
            "(try: ... except BaseException: close; raise), or open the resource last.",
            [f"opened at {site.where()} inside {enter.where()}",
             "that __enter__ raised (USDT function__return with an exception set, --calls)",
             f"so the with statement at {held_by.where()} never ran its block or __exit__"],
        )  # fmt: skip
    after = enter.return_ns if enter is not None and enter.return_ns is not None else evidence.born
    exit_call = _exit_call(held_by, src, evidence, after)  # held_by is at a with statement
    if exit_call is None:
        verdict.evidence.append(f"--calls saw no __exit__ called by the with statement at "
                                f"{held_by.where()}")  # fmt: skip
    elif exit_call.raised:
        return Verdict(
            "exit-raised",
            f"{_defined_at(exit_call, site)}: __exit__ raised before closing the fd opened at "
            f"{site.file}:{site.line}: close first (try/finally inside __exit__) and do not let "
            "__exit__ raise.",
            [f"opened at {site.where()}; the with statement at {held_by.where()} called "
             f"{exit_call.where()}",
             "that __exit__ raised (USDT function__return with an exception set, --calls)"],
        )  # fmt: skip
    elif exit_call.raised is False:
        verdict.evidence.append(f"{exit_call.where()} ran and returned normally without closing "
                                "the fd (--calls)")  # fmt: skip
    return verdict


def _defined_at(call: Call, site: Frame) -> str:
    method = call.method
    return f"{method.file}:{method.firstlineno}" if method is not None else site.where()


def _no_context_manager(
    frames: list[Frame], src: SourceIndex, ctx: Context, held_by: Frame | None
) -> Verdict | None:
    if held_by is not None or any(f.function in ENTER_METHODS for f in frames):
        return None
    site = innermost_user(frames)
    if site is None:
        return None
    fix = (
        f"{site.file}:{site.line}: opened outside any context manager and never closed: open it "
        "in a `with` statement (or contextlib.closing(...) / try-finally), or close it "
        "explicitly when done."
    )
    return Verdict("no-context-manager", fix, [f"opened at {site.where()} in {site.qualname}"])


# The causes in the order they are tried: the first rule that fits wins, so two builds agree.
# enter-raised and exit-raised refine with-exited-without-close (its rule returns them when
# --calls evidence shows which call raised); unknown is what no rule fits.
_RULES = (
    ("suspended-generator", _suspended_generator),
    ("contextmanager-without-finally", _contextmanager_without_finally),
    ("manual-enter", _manual_enter),
    ("finalizer-never-ran", _finalizer_never_ran),
    ("with-exited-without-close", _with_exited_without_close),
    ("no-context-manager", _no_context_manager),
)
_REFINED_BY = {"with-exited-without-close": ("enter-raised", "exit-raised")}
CAUSES = tuple(cause for name, _ in _RULES for cause in (*_REFINED_BY.get(name, ()), name)) + (
    "unknown",
)


LOOP_SHUTDOWN_FUNCTIONS = ("shutdown_asyncgens", "_cancel_all_tasks")
LOOP_RUNNER = ("asyncio/runners.py", ("close", "run"))  # asyncio.Runner's methods that wind down


def winds_loop_down(frame: Frame, src: SourceIndex) -> bool:
    """Is this frame asyncio.run() winding its loop down? Its leftover tasks are cancelled and
    the async generators nobody closed are finalized (aclose scheduled by the loop's hook)."""
    if frame.function in LOOP_SHUTDOWN_FUNCTIONS and "asyncio" in frame.file:
        return True
    if frame.file.endswith(LOOP_RUNNER[0]) and frame.function in LOOP_RUNNER[1]:
        return "shutdown_asyncgens" in (src.text(frame.file, frame.line) or "")
    return False


# Functions the standard library registers with atexit, by the file that defines them: a close
# under one of them happened while the interpreter was shutting down.
ATEXIT_HANDLERS = (
    ("logging/__init__.py", "shutdown"),
    ("multiprocessing/util.py", "_exit_function"),
    ("concurrent/futures/thread.py", "_python_exit"),
    ("concurrent/futures/process.py", "_python_exit"),
    ("weakref.py", "_exitfunc"),
)


def runs_atexit(frame: Frame) -> bool:
    """Is this frame a standard atexit handler (logging.shutdown closing every handler)?"""
    return any(frame.file.endswith(file) and frame.function == function
               for file, function in ATEXIT_HANDLERS)  # fmt: skip


def runs_exit(frame: Frame) -> bool:
    return frame.function in EXIT_METHODS


def runs_finalizer(frame: Frame) -> bool:
    return frame.function == "__del__"


# The close-stack facts: (name, the function names it can hold for, the predicate). Stacks
# test the names on their distinct function names and call the predicate on those frames only.
CLOSE_FACTS = (
    (
        "at_exit",
        tuple(function for _, function in ATEXIT_HANDLERS),
        lambda frame, src: runs_atexit(frame),
    ),  # fmt: skip
    ("loop_shutdown", LOOP_SHUTDOWN_FUNCTIONS + LOOP_RUNNER[1], winds_loop_down),
    ("in_exit", EXIT_METHODS, lambda frame, src: runs_exit(frame)),
    ("in_finalizer", ("__del__",), lambda frame, src: runs_finalizer(frame)),
)


@dataclass(frozen=True)
class CloseStack:
    """What decides how an explicit close happened: the close stack's innermost frame and
    whether any of its frames runs an atexit handler, winds a loop down, runs an __exit__, or
    runs a __del__ (the
    predicates above, decided once per distinct frame by cmtrace.analysis.stacks)."""

    inner: Frame | None  # None: no Python stack at the close
    at_exit: bool = False
    loop_shutdown: bool = False
    in_exit: bool = False
    in_finalizer: bool = False

    @classmethod
    def of(cls, frames: list[Frame], src: SourceIndex) -> CloseStack:
        facts = {name: any(test(f, src) for f in frames) for name, _, test in CLOSE_FACTS}
        return cls(inner=frames[0] if frames else None, **facts)


def refine_close(frames: list[Frame], src: SourceIndex) -> str:
    """How an explicit close happened, from its stack: exit, close, finalizer, loop-shutdown or
    atexit."""
    return close_death(CloseStack.of(frames, src), src)


def close_death(close: CloseStack, src: SourceIndex) -> str:
    """refine_close from a close stack's facts."""
    inner = close.inner
    if inner is None:
        return "close"
    if close.at_exit:
        return "atexit"  # to the program it lived until the end: a leak (lifetimes.LEAK_DEATHS)
    if close.loop_shutdown:
        return "loop-shutdown"
    if close.in_exit:
        return "exit"
    if close.in_finalizer:
        return "finalizer"
    if src.with_at(inner.file, inner.line):
        return "exit"  # a C-level __exit__ (files, sockets) runs on the with line
    text = src.text(inner.file, inner.line) or ""
    if _CLOSING_CALL.search(text) or not _DROPS_REFERENCE.search(text):
        return "close"  # an explicit close, or C code (imports, libraries) closing its own fd
    return "finalizer"  # the line only dropped a reference: the object's deallocation closed it
