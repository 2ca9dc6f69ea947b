"""The `cmtrace` command: the only place that wires the stages together.

VERBS lists every subcommand: its name, the module that implements it, and the one-line summary
`cmtrace --help` shows. `cmtrace --help` reads only this table, so it imports neither pandas nor
bcc; the module of a verb is imported when that verb runs (or prints its own --help). A verb
module has `register(subparsers)`, which adds its sub-parser (the summary comes from VERBS: do
not pass help=) and sets `func(args) -> int`. An import error in a verb module is a bug and is
raised as one.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from typing import Any, NoReturn

from cmtrace import __version__
from cmtrace.errors import EXIT_USAGE, CmtraceError


@dataclass(frozen=True)
class Verb:
    name: str
    module: str  # defines register(subparsers); several verbs may share one module
    summary: str  # the line `cmtrace --help` shows for it


# In the order --help lists them.
VERBS = (
    Verb("attach", "cmtrace.cli.record", "attach to a running process (also: cmtrace -p PID)"),
    Verb("run", "cmtrace.cli.record", "start a command under trace"),
    Verb("report", "cmtrace.cli.report", "explain the leaks of a recorded trace"),
    Verb("top", "cmtrace.cli.top", "watch a trace being recorded: the live view of its directory"),
    Verb("plot", "cmtrace.cli.plot", "plot live fds per site, lifetimes and leak rates"),
    Verb("diff", "cmtrace.cli.diff", "compare the leaks of two traces (before and after a fix)"),
    Verb("export", "cmtrace.cli.export", "export fd lifetimes for other tools (Perfetto)"),
    Verb(
        "doctor",
        "cmtrace.cli.doctor",
        "check what this machine (and a process) offers cmtrace, and how to fix what lacks",
    ),
    Verb(
        "demo", "cmtrace.cli.demo", "trace a built-in program that leaks fds, and show the report"
    ),
)
SUMMARIES = {verb.name: verb.summary for verb in VERBS}
PID_OPTIONS = ("-p", "--pid", "--pgrep", "--all")  # `cmtrace -p PID ...` is the attach verb


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on bad usage; cmtrace's contract says 1 (2 is the environment)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


class _VerbParsers(argparse._SubParsersAction):
    """Sub-parsers whose --help summary is the one in VERBS, whichever module adds them."""

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        if name in SUMMARIES:
            kwargs["help"] = SUMMARIES[name]
        parser: argparse.ArgumentParser = super().add_parser(name, **kwargs)
        return parser


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The parser, with the full sub-parser of `verb` (its module imported) and, for every
    other verb, a stub that only names it and its summary."""
    parser = _Parser(
        prog="cmtrace",
        description=(
            "Find the Python lines that open file descriptors which are never closed, and why "
            "the __exit__ that should have closed them never ran."
        ),
        epilog=(
            "examples:\n"
            "  sudo cmtrace -p 1234                 attach to a running process until Ctrl-C\n"
            "  sudo cmtrace run -- python app.py    start a program under trace\n"
            "  cmtrace report cmtrace-1234-*/       explain the leaks of a recorded trace\n"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"cmtrace {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", action=_VerbParsers)
    chosen = next((v.module for v in VERBS if v.name == verb), None)
    for entry in VERBS:
        if entry.name in sub.choices:  # added with another verb of its module
            continue
        if entry.module == chosen:
            importlib.import_module(entry.module).register(sub)
        else:
            sub.add_parser(entry.name)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and (argv[0] in PID_OPTIONS or argv[0].startswith(("--pid=", "--pgrep="))):
        argv.insert(0, "attach")
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except CmtraceError as exc:
        print(f"cmtrace: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
