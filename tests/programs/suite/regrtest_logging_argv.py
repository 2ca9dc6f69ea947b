"""CPython's own regression tests (`python regrtest_logging_argv.py test_subprocess ...` runs
`-m test ...`) with an audit hook that logs the argv of every child this process starts
(subprocess.Popen, os.posix_spawn), one JSON list a line, to $ARGV_LOG: the ground truth for
the `python -c` programs a report names. The log stays open to the end: this process's one leak
(the line with LEAK below), so the report has a long-lived finding to list first."""

import json
import os
import runpy
import sys

LOG = open(os.environ["ARGV_LOG"], "a", buffering=1)  # LEAK


def argv_of(args: object) -> list[str] | None:
    if isinstance(args, (list, tuple)):
        return [os.fsdecode(a) if isinstance(a, (bytes, str)) else str(a) for a in args]
    return None


def log_children(event: str, args: tuple) -> None:
    if event in ("subprocess.Popen", "os.posix_spawn"):
        argv = argv_of(args[1])
        if argv:
            LOG.write(json.dumps(argv) + "\n")


sys.addaudithook(log_children)
sys.argv = ["python -m test", *sys.argv[1:]]
runpy.run_module("test", run_name="__main__", alter_sys=True)
