"""`cmtrace demo`: trace a small program that leaks descriptors in the classic ways."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from cmtrace.record import session

LEAKY = Path(__file__).with_name("leaky.py")


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
    argv = ["run", "-o", str(output), "--force", "--", args.python, str(LEAKY)]
    parser = argparse.ArgumentParser(prog="cmtrace")
    session.register(parser.add_subparsers())
    run_args = parser.parse_args(argv)
    code = run_args.func(run_args)
    print(f"\nexplore it: cmtrace report {output}   cmtrace plot {output} -o leaks.png")
    return code
