"""`cmtrace export --format perfetto`: fd lifetimes for other tools (cmtrace.present.perfetto)."""

from __future__ import annotations

import argparse

from cmtrace.analysis import load
from cmtrace.cli.common import add_output_option, add_trace_argument, write_output
from cmtrace.errors import EXIT_OK
from cmtrace.present.perfetto import render_perfetto

# --format value -> renderer; one format today, the option is there for the next.
RENDERERS = {"perfetto": render_perfetto}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        description="Chrome trace-event JSON with one async slice per fd lifetime.",
    )
    add_trace_argument(parser)
    parser.add_argument(
        "--format", choices=tuple(RENDERERS), default="perfetto", help="default: perfetto"
    )
    add_output_option(parser, help="default: stdout")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    write_output(RENDERERS[args.format](load(args.trace)), args.output)
    return EXIT_OK
