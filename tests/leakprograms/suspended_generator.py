"""Leak: a generator suspended inside its with block, never resumed or closed."""

import os
import sys

N = int(sys.argv[1]) if len(sys.argv) > 1 else 4


def first_lines(path):
    with open(path) as f:  # LEAK-SITE
        yield from f


def main():
    kept = []
    for _ in range(N):
        rows = first_lines(__file__)
        next(rows)
        kept.append(rows)  # suspended at the yield, never finished
    os._exit(0)  # the process ends without closing them: closed_by process-exit


main()
