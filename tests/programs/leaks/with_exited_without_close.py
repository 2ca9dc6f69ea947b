"""Leak: the with block ends but the manager's __exit__ does not close what __enter__ opened."""

import os
import sys

N = int(sys.argv[1]) if len(sys.argv) > 1 else 3


class Lease:
    def __enter__(self):
        self.fd = os.open(__file__, os.O_RDONLY)  # LEAK-SITE
        return self

    def __exit__(self, *exc):
        self.released = True  # forgets os.close(self.fd)


def main():
    keep = []
    for _ in range(N):
        with Lease() as lease:  # WITH-LINE
            keep.append(lease)
    os._exit(0)


main()
