"""One of several traced processes: leaks a known number of fds at one line, churns at another.

    python targets_leaker.py TAG LEAKS [--peak N] [--setrlimit SOFT]

TAG only makes the command line unique (the --pgrep tests match it). Says
{"event": "ready", "fds"} and waits for "go" on stdin; then opens and closes this file 5 times
(CHURN), keeps LEAKS fds of /dev/null open (LEAK), with --peak holds N more fds of /dev/null
open at once and closes them (PEAK: its open count peaks there), with --setrlimit lowers its
soft RLIMIT_NOFILE to SOFT; then says {"event": "done", "fds", "leaked": [fd...], "peak":
the most fds it had open at once (its own count), "rlimit": [soft, hard]} and exits when
stdin ends.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys

from lineproto import fd_table, say

KEPT: list = []


def churn() -> None:
    for _ in range(5):
        with open(__file__, "rb") as f:  # CHURN
            f.read(1)


def leak(count: int) -> None:
    for _ in range(count):
        KEPT.append(open(os.devnull, "rb"))  # LEAK


def peak(count: int) -> int:
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(count)]  # PEAK
    most = len(fd_table())
    for fd in held:
        os.close(fd)
    return most


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("tag")
    parser.add_argument("leaks", type=int)
    parser.add_argument("--peak", type=int, default=0)
    parser.add_argument("--setrlimit", type=int)
    args = parser.parse_args()
    say("ready", fds=fd_table())
    if sys.stdin.readline().strip() != "go":
        return
    churn()
    leak(args.leaks)
    most = peak(args.peak) if args.peak else len(fd_table())
    if args.setrlimit is not None:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (args.setrlimit, hard))
    leaked = [f.fileno() for f in KEPT]
    say("done", fds=fd_table(), leaked=leaked, peak=most,
        rlimit=list(resource.getrlimit(resource.RLIMIT_NOFILE)))  # fmt: skip
    while sys.stdin.readline():
        pass


if __name__ == "__main__":
    main()
