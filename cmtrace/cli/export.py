"""`cmtrace export --format perfetto`: fd lifetimes for other tools (cmtrace.present.perfetto)."""

from __future__ import annotations

import argparse

from cmtrace.analysis import load
from cmtrace.cli.common import add_output_option, add_trace_verb, write_output
from cmtrace.errors import EXIT_OK
from cmtrace.present.perfetto import render_perfetto

# --format value -> renderer; one format today, the option is there for the next.
RENDERERS = {"perfetto": render_perfetto}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_trace_verb(
        subparsers,
        "export",
        "Chrome trace-event JSON with one async slice per fd lifetime.",
        run,
    )
    parser.add_argument(
        "--format", choices=tuple(RENDERERS), default="perfetto", help="default: perfetto"
    )
    add_output_option(parser, help="default: stdout")


def run(args: argparse.Namespace) -> int:
    write_output(RENDERERS[args.format](load(args.trace)), args.output)
    return EXIT_OK
