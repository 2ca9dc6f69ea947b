"""What the verbs share: the options they spell alike, the exclude file, writing the output.

The verb modules import this, never cmtrace.cli itself (which imports them).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from cmtrace.errors import UsageError


def add_trace_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("trace", metavar="TRACE", help="trace directory written by a recording")


def add_trace_verb(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    description: str,
    run: Callable[[argparse.Namespace], int],
) -> argparse.ArgumentParser:
    """The sub-parser of a verb that reads one trace (report, plot, export): TRACE, then the
    verb's own options, which the caller adds to the parser returned; `run` runs the verb."""
    parser = subparsers.add_parser(name, description=description)
    add_trace_argument(parser)
    parser.set_defaults(func=run)
    return parser


def add_output_option(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("-o", "--output", metavar="FILE", help=help)


def add_exclude_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--exclude", metavar="FILE", help="file of site patterns to ignore (FILE[:FUNC|LINE])"
    )


def add_top_option(parser: argparse.ArgumentParser, default: int, help: str) -> None:
    parser.add_argument("--top", type=int, default=default, metavar="N", help=help)


def add_fail_on_leak_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--fail-on-leak", action="store_true", help="exit 3 when leaks are found (for CI)"
    )


def add_site_output_options(parser: argparse.ArgumentParser, formats: tuple[str, ...]) -> None:
    """--format, -o/--output and --exclude, alike in every command that writes what it found
    about leak sites (report, diff), so they read and behave the same. formats[0] is the default.
    """
    parser.add_argument(
        "--format", choices=formats, default=formats[0], help=f"default: {formats[0]}"
    )
    add_output_option(parser, help="write here instead of stdout")
    add_exclude_option(parser)


def exclude_patterns(args: argparse.Namespace) -> list[str] | None:
    """The site patterns of --exclude FILE, or None without it."""
    from cmtrace.analysis import read_exclude_file  # pandas: only once a verb runs

    return read_exclude_file(args.exclude) if args.exclude else None


def write_output(data: str | bytes, output: str | None) -> None:
    """Text or image bytes to -o FILE, or to stdout without -o. Text always ends with a newline,
    in a file as on stdout; bytes are written as they are."""
    if isinstance(data, str) and not data.endswith("\n"):
        data = data + "\n"
    if output is None:
        if isinstance(data, bytes):
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
        else:
            sys.stdout.write(data)
        return
    try:
        if isinstance(data, bytes):
            Path(output).write_bytes(data)
        else:
            Path(output).write_text(data)
    except OSError as exc:
        raise UsageError(
            f"cannot write {output} ({exc.strerror}): choose another -o FILE"
        ) from None
