"""Generators, coroutines and async generators left in known states, for the liveness check
(cmtrace.interp.generators) to read from outside. Runs on CPython 3.8-3.15.

Prints one JSON object: name -> {address, code, state, line}, where state and line are the
program's own knowledge (the line from the object's frame, as Python itself reports it), then
waits until stdin closes so the test can read the live objects.
"""

import json
import sys
import types


def with_yield(path):
    with open(path, "rb") as f:
        yield f  # suspended here, inside the with
        f.read()


def inner():
    yield 1


def delegating():
    yield from inner()


@types.coroutine
def bare_wait():
    yield


async def awaiting():
    await bare_wait()
    return 1


async def agen():
    yield 1
    yield 2


def exhaust(async_gen):
    """Run an async generator to its end without an event loop (it awaits nothing)."""
    while True:
        step = async_gen.__anext__()
        try:
            step.send(None)
        except StopIteration:
            continue  # one item produced
        except StopAsyncIteration:
            return


def code_of(obj):
    return getattr(obj, "gi_code", None) or getattr(obj, "cr_code", None) or obj.ag_code


def frame_of(obj):
    for name in ("gi_frame", "cr_frame", "ag_frame"):
        if hasattr(obj, name):
            return getattr(obj, name)
    return None


def describe(obj, state):
    frame = frame_of(obj)
    return {
        "address": id(obj),
        "code": id(code_of(obj)),
        "state": state,
        "line": frame.f_lineno if state == "suspended" else None,
    }


def main():
    keep = {}
    out = {}
    g = with_yield(sys.executable)
    next(g)
    keep["gen_suspended"] = g
    done = with_yield(sys.executable)
    list(done)
    keep["gen_finished"] = done
    d = delegating()
    next(d)
    keep["gen_yield_from"] = d
    created = inner()
    keep["gen_created"] = created
    c = awaiting()
    c.send(None)
    keep["coro_suspended"] = c
    c2 = awaiting()
    try:
        c2.send(None)
        c2.send(None)
    except StopIteration:
        pass
    keep["coro_finished"] = c2
    a = agen()
    try:
        a.__anext__().send(None)
    except StopIteration:
        pass
    keep["agen_suspended"] = a
    a2 = agen()
    exhaust(a2)
    keep["agen_finished"] = a2
    states = {
        "gen_suspended": "suspended",
        "gen_finished": "finished",
        "gen_yield_from": "suspended",
        "gen_created": "created",
        "coro_suspended": "suspended",
        "coro_finished": "finished",
        "agen_suspended": "suspended",
        "agen_finished": "finished",
    }
    for name, obj in keep.items():
        out[name] = describe(obj, states[name])
    gone = inner()
    next(gone)
    out["gen_freed"] = describe(gone, "gone")
    out["gen_freed"]["line"] = None
    del gone
    print(json.dumps(out), flush=True)
    sys.stdin.read()


main()
