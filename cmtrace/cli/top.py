"""`cmtrace top TRACE`: the live view (cmtrace.present.live) of a recording directory, followed
as the recorder writes it: from another terminal, or again after the recording's own view was
closed."""

from __future__ import annotations

import argparse
from pathlib import Path

from cmtrace.cli.common import add_trace_verb


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    add_trace_verb(
        subparsers,
        "top",
        "The live view of a trace being recorded (or finished), read as its parts appear; "
        "q quits. Without a terminal on stderr: one status line of what is written so far.",
        run,
    )


def run(args: argparse.Namespace) -> int:
    from cmtrace.present.live import follow  # noqa: PLC0415 (rich, pandas: only when run)

    return follow(Path(args.trace))
