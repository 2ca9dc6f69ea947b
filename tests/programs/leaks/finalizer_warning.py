"""No leak, two warnings: fds closed by finalizers during normal running (ResourceWarning's case).

N objects close their fd in __del__ when dropped, and N files are closed by deallocation when
the last reference goes (`f = None`), not by close() or a with statement.
"""

import os
import sys

N = int(sys.argv[1]) if len(sys.argv) > 1 else 3


class Handle:
    def __init__(self, path):
        self.fd = os.open(path, os.O_RDONLY)  # WARN-DEL

    def __del__(self):
        os.close(self.fd)


def main():
    for _ in range(N):
        handle = Handle(__file__)
        del handle
    for _ in range(N):
        f = open(__file__)  # WARN-DEALLOC
        f.read(1)
        f = None
    os._exit(0)


main()
