"""The recording flags that watch a trace as it is recorded (the live view, dumps), and the
observers (cmtrace.record.observe) they build for `cmtrace -p` and `cmtrace run`.

Each feature keeps its flags and its builder in its own section below; `add_arguments` and
`build` are what cmtrace.cli.record calls.
"""

from __future__ import annotations

import argparse
import sys

from cmtrace.record.observe import Observer


def add_arguments(parser: argparse.ArgumentParser, mode: str) -> None:
    """The watching flags of `cmtrace -p` (mode "attach") or `cmtrace run` (mode "run")."""
    add_live_arguments(parser, mode)
    add_dump_arguments(parser, mode)


def build(args: argparse.Namespace, mode: str) -> list[Observer]:
    """The observers the flags ask for, in the order the session should call them."""
    observers: list[Observer] = []
    observers += build_live(args, mode)
    observers += build_dumps(args, mode)
    wire_dump_key(observers)
    return observers


# ---- live view and status line (cmtrace.present.live) ---------------------------------------


def add_live_arguments(parser: argparse.ArgumentParser, mode: str) -> None:
    default = (
        "on by default when stderr is a terminal"
        if mode == "attach"
        else "off by default: the command owns the terminal"
    )
    parser.add_argument(
        "--live",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"a full-screen live view of the opening sites while recording ({default}); "
        "without it, one status line every 10 s on stderr (not for `run` on a terminal; "
        "-q: none)",
    )


def live_on(args: argparse.Namespace, mode: str) -> bool:
    """The screen needs a terminal on stderr; -p shows it there unless --no-live."""
    wanted: bool | None = getattr(args, "live", None)
    if wanted is None:
        wanted = mode == "attach"
    return wanted and sys.stderr.isatty()


def build_live(args: argparse.Namespace, mode: str) -> list[Observer]:
    from cmtrace.present import live  # noqa: PLC0415 (rich: only when watching)

    if live_on(args, mode):
        return [live.LiveView()]
    if getattr(args, "quiet", False) or (mode == "run" and sys.stderr.isatty()):
        return []  # `run` on a terminal: its command's output is not to be interleaved
    return [live.StatusLine()]


def wire_dump_key(observers: list[Observer]) -> None:
    """The live view's `d` asks the dump observer for a manual dump (as SIGUSR1 does)."""
    from cmtrace.present import dumps, live  # noqa: PLC0415

    views = [o for o in observers if isinstance(o, live.LiveView)]
    dumpers = [o for o in observers if isinstance(o, dumps.DumpObserver)]
    for view in views:
        if dumpers:
            view.on_dump = dumpers[0].request_manual_dump


# ---- dumps (cmtrace.present.dumps) -------------------------------------------------------------


def add_dump_arguments(parser: argparse.ArgumentParser, mode: str) -> None:
    parser.add_argument(
        "--dump-on",
        action="append",
        default=[],
        metavar="emfile|N|P%",
        help="write TRACE/dumps/NNN-REASON.json and .txt (the report at that instant) when a "
        "process first fails with EMFILE/ENFILE (emfile), has N fds open (pre-existing "
        "included), or P%% of its RLIMIT_NOFILE soft limit; repeatable, each fires once per "
        "process. SIGUSR1 to cmtrace dumps at once",
    )
    if mode == "attach":
        parser.add_argument(
            "--stop-after-dump",
            action="store_true",
            help="stop recording (and detach) once the first dump is written",
        )


def build_dumps(args: argparse.Namespace, mode: str) -> list[Observer]:
    from cmtrace.present import dumps  # noqa: PLC0415 (pandas: only when a recording starts)

    triggers = [dumps.parse_trigger(value) for value in getattr(args, "dump_on", None) or []]
    dumps.check_triggers(triggers, aggregate=getattr(args, "aggregate", False))
    observer = dumps.DumpObserver(triggers, stop_after=getattr(args, "stop_after_dump", False))
    observer.install_signal()
    return [observer]
