"""Every cause once per run, two leaked fds each; each site marked `# CAUSE:<cause>`.

Runs unchanged on CPython 3.8-3.15: the cross-interpreter test records it once per interpreter.
With the argument `wait` it then says {"event": "leaked"} and lives on until stdin closes, so the
tracer stops while it runs (the recorder then reads its source and thread stacks).
"""

import asyncio
import gc
import json
import os
import sys
from contextlib import contextmanager

HERE = os.path.abspath(__file__)
KEEP = []


def lines_of(path):
    with open(path) as f:  # CAUSE:suspended-generator
        yield from f


@contextmanager
def scratch_fd(path):
    fd = os.open(path, os.O_RDONLY)  # CAUSE:contextmanager-without-finally
    yield fd
    os.close(fd)


class Session:
    def __enter__(self):
        self.fd = os.open(HERE, os.O_RDONLY)  # CAUSE:manual-enter
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


class Handle:
    def __init__(self, path):
        self.fd = os.open(path, os.O_RDONLY)  # CAUSE:finalizer-never-ran
        self.me = self

    def __del__(self):
        os.close(self.fd)


class Lease:
    def __enter__(self):
        self.fd = os.open(HERE, os.O_RDONLY)  # CAUSE:with-exited-without-close
        return self

    def __exit__(self, *exc):
        self.released = True


async def db_dependency(path):
    """An async-generator dependency, FastAPI style: cleanup after the yield."""
    with open(path) as conn:  # CAUSE:suspended-generator CLOSED:loop-shutdown
        yield conn


async def handle_requests():
    for _ in range(2):
        dependency = db_dependency(HERE)
        await dependency.__anext__()  # the framework never resumes it, nor calls aclose()
        KEEP.append(dependency)


def open_raw(path):
    return os.open(path, os.O_RDONLY)  # CAUSE:no-context-manager


def main():
    gc.disable()
    for _ in range(2):
        rows = lines_of(HERE)
        next(rows)
        KEEP.append(rows)
        try:
            with scratch_fd(HERE):
                raise ValueError("block failed")
        except ValueError:
            pass
        session = Session()
        session.__enter__()
        KEEP.append(session)
        Handle(HERE)
        with Lease() as lease:
            KEEP.append(lease)
        open_raw(HERE)
    asyncio.run(handle_requests())  # shutting the loop down finalizes the dependencies
    if sys.argv[1:] == ["wait"]:
        print(json.dumps({"event": "leaked"}), flush=True)
        sys.stdin.read()
    os._exit(0)


main()
