"""`cmtrace plot`: the trace's figure (cmtrace.present.plot) as PNG, SVG or PDF."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cmtrace.analysis import load
from cmtrace.cli.common import (
    add_exclude_option,
    add_output_option,
    add_top_option,
    add_trace_verb,
    exclude_patterns,
    write_output,
)
from cmtrace.errors import EXIT_OK, UsageError
from cmtrace.present.plot import FORMATS, TOP_SITES, render_image


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_trace_verb(
        subparsers,
        "plot",
        "One figure: live fds over time by site, lifetime histogram, leak rate.",
        run,
    )
    add_output_option(parser, help="FILE.png, FILE.svg or FILE.pdf (default: PNG on stdout)")
    add_top_option(parser, default=TOP_SITES, help="sites drawn")
    add_exclude_option(parser)


def run(args: argparse.Namespace) -> int:
    fmt = _format_of(args.output)
    if args.output is None and sys.stdout.isatty():
        raise UsageError("refusing to write an image to a terminal: give -o FILE.png")
    image = render_image(load(args.trace), fmt, top=args.top, exclude=exclude_patterns(args))
    write_output(image, args.output)
    return EXIT_OK


def _format_of(output: str | None) -> str:
    """The image format -o names by its suffix (PNG on stdout)."""
    if output is None:
        return "png"
    suffix = Path(output).suffix.lower().lstrip(".")
    if suffix not in FORMATS:
        raise UsageError(f"-o {output}: name the file .png, .svg or .pdf")
    return suffix
