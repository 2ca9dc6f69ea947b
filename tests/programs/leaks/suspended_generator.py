"""Leak: a generator suspended inside its with block, never resumed or closed."""

import os
import sys

N = int(sys.argv[1]) if len(sys.argv) > 1 else 4
AT_EXIT = sys.argv[2] if len(sys.argv) > 2 else "os._exit"
KEPT = []  # module globals live until interpreter shutdown


def first_lines(path):
    with open(path) as f:  # LEAK-SITE
        yield from f


def main():
    for _ in range(N):
        rows = first_lines(__file__)
        next(rows)
        KEPT.append(rows)  # suspended at the yield, never finished
    if AT_EXIT == "os._exit":
        os._exit(0)  # the process ends without closing them: closed_by process-exit
    # else return normally: interpreter shutdown finalizes the generators (interpreter-shutdown)


main()
