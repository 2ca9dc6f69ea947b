"""`cmtrace -p PID` and `cmtrace run -- CMD`: record a trace, then print what leaked.

Argparse only: the flags become a RecordOptions for the engine (cmtrace.record.session) and a
Summary for the report printed at the end; exit codes follow cmtrace.errors.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from cmtrace.cli import observers
from cmtrace.errors import EXIT_LEAKS, CmtraceError, TraceError, UsageError
from cmtrace.record import joining, session
from cmtrace.record.choose import BACKENDS
from cmtrace.record.options import RecordOptions


@dataclass(frozen=True)
class Summary:
    """What the end-of-recording summary shows, and whether leaks fail the command."""

    top: int = 10  # leak sites listed
    exclude: Path | None = None  # file of site patterns whose fds are expected to live
    fail_on_leak: bool = False  # exit 3 when leaks are found

    def validate(self) -> None:
        if self.exclude is not None and not self.exclude.is_file():
            raise UsageError(f"--exclude {self.exclude}: no such file (one site pattern a line)")


# ---- argparse ---------------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction) -> None:
    attach = sub.add_parser(
        "attach",
        help="attach to a running process (also: cmtrace -p PID)",
        usage="cmtrace (-p PID[,PID...] | --pgrep PATTERN | --all) [-o DIR] [--duration S] "
        "[-f] [options]",
        description=(
            "Attach to running processes and record the birth and death of every file "
            "descriptor, with the Python stack that made it, until every target has exited, "
            "--duration ends, or Ctrl-C / SIGTERM (the processes keep running untouched). "
            "Then print the fds that leaked."
        ),
    )
    attach.add_argument(
        "-p", "--pid", action="append", default=[], metavar="PID[,PID...]",
        help="process(es) to trace; repeatable",
    )  # fmt: skip
    attach.add_argument(
        "--pgrep", metavar="PATTERN",
        help="also every process whose command line matches the regular expression (as "
        "pgrep -f), those that start while recording included (/proc is scanned every "
        f"{joining.POLL_INTERVAL_S:g} s: fds a process opened before it was found are "
        "pre-existing, not leaks); cmtrace, its parents and children excluded. Recording "
        "waits for the first match, then stops when every target has exited",
    )  # fmt: skip
    attach.add_argument(
        "--all", action="store_true", dest="all_python",
        help="every CPython process on the host, and those that start (BPF only; found as "
        "--pgrep's are); records until --duration or Ctrl-C",
    )  # fmt: skip
    attach.add_argument(
        "-f", "--follow-children", action="store_true",
        help="also trace its child processes, existing descendants included",
    )  # fmt: skip
    attach.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    _add_recording_options(attach)
    observers.add_arguments(attach, "attach")
    attach.set_defaults(func=run_attach)

    run = sub.add_parser(
        "run",
        help="start a command under trace",
        usage="cmtrace run [-o DIR] [options] -- CMD [ARGS...]",
        description=(
            "Start CMD already traced (its first openat included), following its children. "
            "Its stdin/stdout/stderr pass through; under sudo it runs as $SUDO_USER. The "
            "summary goes to stderr and cmtrace exits with CMD's status. With the ptrace "
            "backend the command is killed if cmtrace is killed (PTRACE_O_EXITKILL: its fd "
            "syscalls would fail without the tracer), and children still running 2 s after it "
            "exits are killed with the recording; Ctrl-C and SIGTERM reach the command and "
            "cmtrace records to its end."
        ),
    )
    _add_recording_options(run)
    observers.add_arguments(run, "run")
    run.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    run.set_defaults(func=run_command)


def _add_recording_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-o", "--output", metavar="DIR", type=Path,
        help="trace directory (default ./cmtrace-PID-YYYYmmdd-HHMMSS); must not hold anything "
        "but a trace, which --force replaces",
    )  # fmt: skip
    parser.add_argument("--force", action="store_true", help="replace a trace in -o DIR")
    parser.add_argument(
        "--fail-on-leak", action="store_true", help="exit 3 when leaks are found (for CI)"
    )
    parser.add_argument(
        "--exclude", metavar="FILE", type=Path,
        help="file of site patterns (e.g. myapp/db.py:Pool.*) whose fds are expected to live",
    )  # fmt: skip
    parser.add_argument(
        "--no-python-stacks", action="store_true",
        help="record fds without walking Python stacks (cheapest)",
    )  # fmt: skip
    parser.add_argument(
        "--calls", action="store_true",
        help="also record __enter__/__exit__/__aenter__/__aexit__ entries and returns through "
        "the interpreter's USDT probes (builds that have them: Debian 3.8-3.10, 3.15+), so the "
        "report can prove an __exit__ or __enter__ raised; every Python call gets slower",
    )  # fmt: skip
    parser.add_argument(
        "--ring-mb", type=int, default=32, metavar="MB",
        help="kernel ring buffer size, a power of two (default 32)",
    )  # fmt: skip
    parser.add_argument(
        "--backend", choices=BACKENDS, default="auto",
        help="how to record: bpf (root or CAP_BPF+CAP_PERFMON; cheapest), ptrace (no "
        "privilege for run, ptrace permission for -p), or auto (default: bpf when it can, "
        "else ptrace; the attached line says which and why)",
    )  # fmt: skip
    _add_aggregate_options(parser)
    _add_max_size_option(parser)
    parser.add_argument("--top", type=int, default=10, help="leak sites shown in the summary")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")


def _add_aggregate_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--aggregate", action="store_true",
        help="BPF only: count short-lived fds in the kernel (per opening and closing stack, "
        "with a lifetime histogram) instead of recording each; fds that live --min-age or "
        "longer, are open at the end or die in a way that makes them leaks are recorded in "
        "full, so leaks are found as with full history, at a cost that grows with distinct "
        "stacks and long-lived fds, not with events",
    )  # fmt: skip
    parser.add_argument(
        "--min-age", type=float, default=10.0, metavar="S",
        help="--aggregate: record in full every fd still open after S seconds (default 10)",
    )  # fmt: skip
    # tests: a tiny kernel live-fd map, to see what a full one does
    parser.add_argument("--aggregate-live-max", type=int, default=65536, help=argparse.SUPPRESS)


# ---- --max-size -------------------------------------------------------------------------------
SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'500M', '2G', '1.5G', '800K', '1048576' (bytes; K/M/G/T are powers of 1024)."""
    number, unit = text.strip().upper().removesuffix("B"), ""
    if number[-1:] in SIZE_UNITS:
        number, unit = number[:-1], number[-1]
    try:
        size = float(number) * SIZE_UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a size such as 500M or 2G") from None
    return int(size)


def _add_max_size_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-size", type=parse_size, metavar="SIZE",
        help="stop recording before the trace takes more than SIZE on disk (500M, 2G: powers "
        "of 1024); the trace is complete and meta.json says why it stopped",
    )  # fmt: skip


def record_options(args: argparse.Namespace) -> RecordOptions:
    """The engine's options from either sub-parser's flags."""
    given = getattr(args, "command", None)  # run's CMD (attach's `command` is the verb name)
    command = list(given) if isinstance(given, list) else []
    if command[:1] == ["--"]:
        command = command[1:]
    pids = joining.parse_pids(getattr(args, "pid", None) or [])
    return RecordOptions(
        pid=pids[0] if pids else None,
        pids=pids[1:],
        pgrep=getattr(args, "pgrep", None),
        all_python=getattr(args, "all_python", False),
        command=tuple(command),
        follow_children=getattr(args, "follow_children", False),
        duration=getattr(args, "duration", None),
        output=args.output,
        force=args.force,
        python_stacks=not args.no_python_stacks,
        calls=args.calls,
        ring_mb=args.ring_mb,
        quiet=args.quiet,
        backend=args.backend,
        aggregate=args.aggregate,
        min_age=args.min_age,
        aggregate_live_max=args.aggregate_live_max,
        max_size=args.max_size,
    )


def summary_options(args: argparse.Namespace) -> Summary:
    return Summary(top=args.top, exclude=args.exclude, fail_on_leak=args.fail_on_leak)


# ---- the commands -----------------------------------------------------------------------------


def run_attach(args: argparse.Namespace) -> int:
    if not (args.pid or args.pgrep is not None or args.all_python):
        raise UsageError("say what to trace: -p PID[,PID...], --pgrep PATTERN or --all")
    return attach(record_options(args), summary_options(args), observers.build(args, "attach"))


def run_command(args: argparse.Namespace) -> int:
    return run(record_options(args), summary_options(args), observers.build(args, "run"))


def attach(
    options: RecordOptions, summary: Summary, watching: list[observers.Observer] | None = None
) -> int:
    """Record options.pid, print the summary to stdout; 3 for leaks under --fail-on-leak."""
    options.validate()  # bad options are refused before anything else is looked at
    summary.validate()
    done = session.attach(options, watching)
    leaks = _summarise(done, summary, sys.stdout)
    if done.stopped_early is not None:  # a full disk: the trace is kept, the exit says so
        return done.stopped_early.exit_code
    return EXIT_LEAKS if summary.fail_on_leak and leaks else 0


def run(
    options: RecordOptions, summary: Summary, watching: list[observers.Observer] | None = None
) -> int:
    """Record options.command, print the summary to stderr; exit with the command's status
    (3 for leaks under --fail-on-leak when the command itself succeeded)."""
    session.check_command(options.command)
    options.validate()
    summary.validate()
    done = session.run(options, watching)
    if done.failure is not None:
        return done.failure.exit_code
    leaks = _summarise(done, summary, sys.stderr)
    if done.stopped_early is not None:  # a full disk: the trace is kept, the exit says so
        return done.stopped_early.exit_code
    if summary.fail_on_leak and leaks and done.exit_code == 0:
        return EXIT_LEAKS
    return done.exit_code


def _summarise(done: session.Finished, summary: Summary, out: TextIO) -> int:
    """Print the leak report, say where the trace is, then detach; returns the leak count."""
    leaks = print_summary(done.path, summary, out)
    done.recording.progress(f"trace written to {done.path} ({done.recording.backend_reason})")
    done.recording.close()
    return leaks


def print_summary(path: Path, summary: Summary, out: TextIO) -> int:
    """Print the leak report of a finished trace; return the number of leaks."""
    from cmtrace.present import text  # noqa: PLC0415 (pandas: only once a trace is written)

    try:
        return text.print_summary(path, file=out, top=summary.top, exclude=summary.exclude)
    except CmtraceError:
        raise
    except Exception as exc:  # the trace is complete on disk whatever the analysis does
        raise TraceError(
            f"the trace in {path} is complete but could not be summarised "
            f"({type(exc).__name__}: {exc}); please report this bug with the trace attached"
        ) from exc
