"""Leak: cleanup only in __del__, and a reference cycle keeps the objects alive (gc off)."""

import gc
import os
import sys

N = int(sys.argv[1]) if len(sys.argv) > 1 else 3


class Handle:
    def __init__(self, path):
        self.fd = os.open(path, os.O_RDONLY)  # LEAK-SITE
        self.me = self  # a cycle: refcounting never frees it

    def __del__(self):
        os.close(self.fd)


def main():
    gc.disable()
    for _ in range(N):
        Handle(__file__)
    os._exit(0)


main()
