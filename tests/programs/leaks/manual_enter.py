"""Leak: __enter__ called by hand, so nothing ever calls __exit__."""

import os
import sys

N = int(sys.argv[1]) if len(sys.argv) > 1 else 3


class Session:
    def __enter__(self):
        self.fd = os.open(__file__, os.O_RDONLY)  # LEAK-SITE
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


def main():
    sessions = []
    for _ in range(N):
        s = Session()
        s.__enter__()  # ENTER-CALL
        sessions.append(s)
    os._exit(0)


main()
