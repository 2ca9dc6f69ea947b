"""Leak: @contextmanager whose cleanup after yield is skipped when the with block raises."""

import os
import sys
from contextlib import contextmanager

N = int(sys.argv[1]) if len(sys.argv) > 1 else 3


@contextmanager
def scratch_fd(path):
    fd = os.open(path, os.O_RDONLY)  # LEAK-SITE
    yield fd
    os.close(fd)  # skipped when the block raises: no try/finally


def main():
    for _ in range(N):
        try:
            with scratch_fd(__file__):  # WITH-LINE
                raise ValueError("request failed")
        except ValueError:
            pass
    os._exit(0)


main()
