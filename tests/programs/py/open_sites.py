"""Target for the kernel walker tests: opens marker paths at known lines (`# MARK:<label>`).

Prints "ready", waits for a line on stdin (the tracer is attached by then), then opens
/nonexistent/cmtrace-mark-<label> from each site: nested functions, a generator, a thread
started after attach, a 130-deep recursion, the same site three times, a 200-deep recursion
(beyond the walker's 136 frames) and a __del__ run at interpreter shutdown.
The opens fail (ENOENT) but each still enters openat with its path.
"""

import asyncio
import os
import sys
import threading


def mark(label):
    try:
        os.close(os.open("/nonexistent/cmtrace-mark-" + label, os.O_RDONLY))  # MARK:mark
    except OSError:
        pass


def inner():
    mark("nested")  # MARK:nested-inner


def middle():
    inner()  # MARK:nested-middle


def gen():
    mark("generator")  # MARK:generator
    yield 1


def thread_body():
    mark("thread")  # MARK:thread


def recurse(depth):
    if depth == 0:
        mark("deep")  # MARK:deep
        return
    recurse(depth - 1)  # MARK:recurse


async def coro_inner():
    mark("coroutine")  # MARK:coroutine


async def coro_outer():
    await coro_inner()  # MARK:coroutine-outer


class ClosesAtExit:
    def __del__(self):
        mark("final")  # MARK:final


keep = ClosesAtExit()
sys.stdout.write("ready\n")
sys.stdout.flush()
sys.stdin.readline()
middle()  # MARK:nested-module
for _ in gen():  # MARK:generator-loop
    pass
t = threading.Thread(target=thread_body)
t.start()
t.join()
recurse(130)  # MARK:deep-module
for _ in range(3):
    mark("repeat")  # MARK:repeat


def too_deep(depth):
    if depth == 0:
        mark("too-deep")
        return
    too_deep(depth - 1)


too_deep(200)
asyncio.run(coro_outer())  # MARK:coroutine-module
