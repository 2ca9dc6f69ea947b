"""Leaks at the bottom of deep stacks: 60-120 frames through many files, threads, processes.

    python deep_stacks.py MODULE_DIR

Writes LAYERS small modules into MODULE_DIR (layer_00.py ... each calls the next), then in
each of PROCESSES processes (the first, and children made with os.fork) and in THREADS threads
of each, recurses to a depth between 60 and 120 frames through those modules and leaks at the
bottom once per leaking line below (so a deep trace holds many distinct stacks per line).

Each leaking line is marked `# CAUSE:<cause>`; the with statement that holds the fd, when
there is one, is the marked line itself. Ground truth comes from the program: every process
prints one JSON line {"event": "leaked", "pid": ..., "leaked": {line: [fd, ...]}} with the fds
each marked line left open (from the fds open before and after, found with fstat). The parent
waits for its children; every process then leaves with os._exit(0), so the fds die with it.
"""

import json
import os
import re
import sys
import threading

LAYERS = 12  # files the recursion goes through
PROCESSES = 3
THREADS = 3
DEPTHS = (60, 75, 90, 105, 120)  # frames of recursion, before the leaf
MAX_FD = 1024
KEPT = []  # what must stay referenced: suspended generators, keepers
LOCK = threading.Lock()

LAYER_SOURCE = """
import layer_{next:02d} as below


def down(depth, leaf):
    if depth <= 0:
        return leaf()
    return below.down(depth - 1, leaf)
"""


def write_layers(directory):
    os.makedirs(directory, exist_ok=True)
    for number in range(LAYERS):
        text = LAYER_SOURCE.format(next=(number + 1) % LAYERS)
        with open(os.path.join(directory, f"layer_{number:02d}.py"), "w") as out:
            out.write(text)
    sys.path.insert(0, directory)


class Keeper:
    """A context manager that holds an fd and does not close it on exit."""

    def __init__(self, fd):
        self.fd = fd

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def leak_plain():
    KEPT.append(os.open(os.devnull, os.O_RDONLY))  # CAUSE:no-context-manager


def leak_with():
    with Keeper(os.open(os.devnull, os.O_RDONLY)) as keeper:  # CAUSE:with-exited-without-close
        KEPT.append(keeper)


def reader():
    with open(os.devnull, "rb") as stream:  # CAUSE:suspended-generator
        yield stream.read(0)
        yield stream.read(0)


def leak_generator():
    generator = reader()
    next(generator)
    KEPT.append(generator)  # never resumed, never closed


# Each leaf, and the function whose marked line opens its fd.
LEAFS = {leak_plain: leak_plain, leak_with: leak_with, leak_generator: reader}


def open_fds():
    found = set()
    for fd in range(MAX_FD):
        try:
            os.fstat(fd)
        except OSError:
            continue
        found.add(fd)
    return found


def leak_deep(leaf, depth, leaked):
    import layer_00

    with LOCK:  # one leak at a time: the fds it adds are its own
        before = open_fds()
        layer_00.down(depth, leaf)
        opener = LEAFS[leaf].__code__.co_firstlineno
        leaked.setdefault(opener, []).extend(sorted(open_fds() - before))


def worker(index, leaked):
    for number, leaf in enumerate(LEAFS):
        leak_deep(leaf, DEPTHS[(index + number) % len(DEPTHS)], leaked)


def run_process(index):
    leaked = {}
    threads = [
        threading.Thread(target=worker, args=(index * THREADS + t, leaked)) for t in range(THREADS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    by_line = {str(marked_line(line)): fds for line, fds in leaked.items()}
    line = json.dumps({"event": "leaked", "pid": os.getpid(), "leaked": by_line}) + "\n"
    os.write(1, line.encode())  # one write: the processes' lines do not interleave


def marked_line(first_line):
    """The marked line of the function starting at first_line."""
    with open(__file__) as source:
        lines = source.read().splitlines()
    for number in range(first_line, len(lines) + 1):
        if re.search(r"# CAUSE:[a-z-]+$", lines[number - 1]):
            return number
    raise AssertionError(f"no CAUSE marker after line {first_line}")


def main():
    write_layers(sys.argv[1])
    children = []
    for index in range(1, PROCESSES):
        pid = os.fork()
        if pid == 0:
            run_process(index)
            os._exit(0)
        children.append(pid)
    run_process(0)
    for pid in children:
        os.waitpid(pid, 0)
    os._exit(0)


if __name__ == "__main__":
    main()
