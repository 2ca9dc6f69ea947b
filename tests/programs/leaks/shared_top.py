"""Births whose stacks agree at the top and differ below: one opening line reached through two
callers of equal frame size (their frames land at the same addresses), at two depths, and
through a recursion whose call sites differ only deep down (same depth, same code at every
address, other instructions). Each fd stays open; the program prints, per fd, the stack it
was opened on as it sees it (function, line; innermost first) - the test's ground truth.
"""

import json
import os
import sys

opened: dict[int, list[list]] = {}


def stack_of_caller() -> list[list]:
    frame, frames = sys._getframe(1), []
    while frame is not None:
        frames.append([frame.f_code.co_name, frame.f_lineno])
        frame = frame.f_back
    return frames


def opener() -> None:
    fd = os.open("/dev/null", os.O_RDONLY)
    frames = stack_of_caller()
    frames[0][1] -= 1  # the open is the line above
    opened[fd] = frames


def via_a() -> None:
    here = 1
    opener()
    del here


def via_b() -> None:
    there = 2
    opener()
    del there


def recurse(n: int, leaf) -> None:
    if n:
        return recurse(n - 1, leaf)
    return leaf()


def branch(n: int, bits: int, leaf) -> None:
    if n == 0:
        return leaf()
    if bits & 1:
        return branch(n - 1, bits >> 1, leaf)
    return branch(n - 1, bits >> 1, leaf)


def main() -> None:
    for depth in (4, 4, 11):
        for via in (via_a, via_b, via_a, via_b):
            recurse(depth, via)
    for bits in (0b0000000, 0b1000000, 0b0000001, 0b1000000, 0b0101010):
        branch(7, bits, opener)
    print(json.dumps({"pid": os.getpid(), "opened": opened}), flush=True)


if __name__ == "__main__":
    main()
