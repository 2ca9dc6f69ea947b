"""`cmtrace demo`: trace a small program that leaks descriptors in the classic ways."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from cmtrace.cli import record
from cmtrace.demo import LEAKY
from cmtrace.record.options import RecordOptions


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "demo",
        help="trace a built-in program that leaks fds, and show the report",
        description=(
            "Run the built-in leaky program (cmtrace/demo/leaky.py: a generator suspended "
            "inside `with`, an __enter__ called by hand, a __del__ closer kept alive by a "
            "cycle, a @contextmanager without try/finally, a raw os.open) under `cmtrace run` "
            "and print what leaked and why."
        ),
    )
    parser.add_argument("-o", "--output", type=Path, help="trace directory (default: a temp dir)")
    parser.add_argument("--python", default=sys.executable, help="interpreter to run it with")
    parser.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    output = args.output or Path(tempfile.mkdtemp(prefix="cmtrace-demo-")) / "trace"
    options = RecordOptions(command=(args.python, str(LEAKY)), output=output, force=True)
    code = record.run(options, record.Summary())
    print(f"\nexplore it: cmtrace report {output}   cmtrace plot {output} -o leaks.png")
    return code
