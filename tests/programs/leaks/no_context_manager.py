"""Leak: raw fds opened outside any context manager and never closed; one fd closed properly."""

import os
import sys

N = int(sys.argv[1]) if len(sys.argv) > 1 else 3
FIXED = len(sys.argv) > 2 and sys.argv[2] == "fixed"


def open_log(path):
    fd = os.open(path, os.O_RDONLY)  # LEAK-SITE
    if FIXED:
        os.close(fd)
    return fd


def main():
    for _ in range(N):
        open_log(__file__)
    with open(__file__) as f:  # closed by its with: not a leak
        f.read()
    os._exit(0)


main()
