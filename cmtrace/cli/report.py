"""`cmtrace report`: the leaks of a trace as text, JSON (DESIGN "Report contract") or HTML."""

from __future__ import annotations

import argparse

from cmtrace.analysis import load
from cmtrace.analysis.children import SHORT_LIVED_S
from cmtrace.cli.common import (
    add_fail_on_leak_option,
    add_site_output_options,
    add_top_option,
    add_trace_verb,
    exclude_patterns,
    write_output,
)
from cmtrace.errors import EXIT_LEAKS, EXIT_OK
from cmtrace.present.common import findings
from cmtrace.present.html import render_html
from cmtrace.present.json import render_json
from cmtrace.present.text import render_text


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_trace_verb(
        subparsers,
        "report",
        "Leak sites ranked by count and growth, each with its cause and fix.",
        run,
    )
    add_site_output_options(parser, formats=("text", "json", "html"))
    add_top_option(parser, default=20, help="sites shown (text)")
    add_fail_on_leak_option(parser)
    parser.add_argument(
        "--strip-source", action="store_true", help="HTML: leave source lines out (for sharing)"
    )
    parser.add_argument(
        "--by-peer",
        action="store_true",
        help="text: group socket leaks by peer first ('10 connections to 127.0.0.1:5432 "
        "(PostgreSQL?)'); JSON always has them as `peers`",
    )
    parser.add_argument(
        "--short-lived",
        type=float,
        default=SHORT_LIVED_S,
        metavar="S",
        help="children that exited less than S seconds after their fork (python -c snippets, "
        "subprocess helpers) are short-lived: their leaks are listed apart, after the others, "
        f"and do not make --fail-on-leak exit 3 (default {SHORT_LIVED_S:g}; 0: no split). "
        "JSON keeps them in `leaks` with `short_lived: true`",
    )


def run(args: argparse.Namespace) -> int:
    exclude = exclude_patterns(args)
    trace = load(args.trace)
    short_lived = args.short_lived
    if args.format == "json":
        text = render_json(trace, exclude=exclude, short_lived=short_lived)
    elif args.format == "html":
        text = render_html(trace, exclude=exclude, strip_source=args.strip_source,
                           short_lived=short_lived)  # fmt: skip
    else:
        text = render_text(trace, top=args.top, exclude=exclude, by_peer=args.by_peer,
                           short_lived=short_lived)  # fmt: skip
    write_output(text, args.output)
    leaks = len(findings(trace, exclude, short_lived).leaks)  # the long-lived processes'
    return EXIT_LEAKS if args.fail_on_leak and leaks else EXIT_OK
