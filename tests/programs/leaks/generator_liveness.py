"""Generators holding an open fd inside a `with` when recording stops (issue 13's liveness).

Two of each, alive while the tracer stops (the program waits on stdin after saying "leaked"):
- `suspended` stays suspended at its yield inside `with open()`: truly a suspended generator;
- `finished` ran to its end: an exception thrown into it at its yield went through
  `with lease(...)`, whose @contextmanager has no try/finally, so the os.close after its yield
  never ran: the fd leaked, but no generator is suspended any more.
Runs unchanged on CPython 3.8-3.15.
"""

import gc
import json
import os
import sys
from contextlib import contextmanager

HERE = os.path.abspath(__file__)
KEEP = []


def suspended(path):
    with open(path) as f:  # CAUSE:suspended-generator
        yield f


@contextmanager
def lease(path):
    fd = os.open(path, os.O_RDONLY)  # CAUSE:contextmanager-without-finally
    yield fd
    os.close(fd)


def finished(path):
    with lease(path) as fd:
        yield fd


def main():
    gc.disable()
    for _ in range(2):
        gen = suspended(HERE)
        next(gen)
        KEEP.append(gen)
        done = finished(HERE)
        next(done)
        try:
            done.throw(ValueError("the consumer gave up"))
        except ValueError:
            pass
        KEEP.append(done)  # kept: finished, not freed (its address says "finished")
    print(json.dumps({"event": "leaked"}), flush=True)
    sys.stdin.read()
    os._exit(0)


main()
