"""The `cmtrace` command: the only place that wires the stages together.

Each subcommand lives in the module that does its work and registers itself here through
`register(subparsers)`, which adds an argparse sub-parser whose `func(args) -> int` runs it.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from cmtrace import __version__
from cmtrace.errors import EXIT_USAGE, CmtraceError

# Modules that provide subcommands, in the order --help lists them.
COMMAND_MODULES = (
    "cmtrace.record.session",  # `-p PID` and `run -- CMD`
    "cmtrace.cli.report",  # report
    "cmtrace.cli.plot",  # plot
    "cmtrace.cli.diff",  # diff
    "cmtrace.cli.export",  # export
    "cmtrace.cli.doctor",  # doctor
    "cmtrace.demo",  # demo
)


def add_site_output_options(parser: argparse.ArgumentParser, formats: tuple[str, ...]) -> None:
    """--format, -o/--output and --exclude, alike in every command that writes what it found
    about leak sites (report, diff), so they read and behave the same. formats[0] is the default.
    """
    parser.add_argument(
        "--format", choices=formats, default=formats[0], help=f"default: {formats[0]}"
    )
    parser.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")
    parser.add_argument(
        "--exclude", metavar="FILE", help="file of site patterns to ignore (FILE[:FUNC|LINE])"
    )


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on bad usage; cmtrace's contract says 1 (2 is the environment)."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
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
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # a stage not built yet: leave its command out
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `cmtrace -p PID ...` is the attach command; route it like a subcommand.
    if argv and (argv[0] in ("-p", "--pid") or argv[0].startswith("--pid=")):
        argv.insert(0, "attach")
    parser = build_parser()
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
