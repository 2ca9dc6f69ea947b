"""`cmtrace diff BEFORE AFTER`: which opening sites leak less, more, or no longer (prove a fix)."""

from __future__ import annotations

import argparse

from cmtrace.analysis import load
from cmtrace.cli.common import add_site_output_options, exclude_patterns, write_output
from cmtrace.errors import EXIT_OK
from cmtrace.present.diff import diff_traces, render_json, render_text


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "diff",
        description="Leaked fds per opening site in BEFORE and AFTER.",
    )
    parser.add_argument("before", metavar="BEFORE", help="trace directory before the change")
    parser.add_argument("after", metavar="AFTER", help="trace directory after the change")
    add_site_output_options(parser, formats=("text", "json"))
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    result = diff_traces(load(args.before), load(args.after), exclude_patterns(args))
    write_output(render_json(result) if args.format == "json" else render_text(result), args.output)
    return EXIT_OK
