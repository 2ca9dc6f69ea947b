"""A small service that leaks file descriptors in the ways real code does.

Each function below is one pattern from the context-manager leaks guide; cmtrace should point
at the line that opened each leaked fd and say why its __exit__ never ran.
"""

import contextlib
import gc
import os
import tempfile

WORKDIR = tempfile.mkdtemp(prefix="cmtrace-leaky-")


def path(name):
    return os.path.join(WORKDIR, name)


def read_lines(name):
    """A generator suspended inside `with`: the file stays open while nobody resumes it."""
    with open(path(name), "w+") as fh:
        fh.write("a\nb\n")
        fh.seek(0)
        for line in fh:  # noqa: UP028 (explicit loop: the frame suspends on this line)
            yield line


class Connection:
    def __init__(self, name):
        self.fd = -1  # the fd __enter__ opens
        self.name = name

    def __enter__(self):
        self.fd = os.open(path(self.name), os.O_RDWR | os.O_CREAT)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


class Resource:
    """Relies on __del__ to close; a reference cycle keeps it alive."""

    def __init__(self, name):
        self.fh = open(path(name), "w")
        self.me = self  # the cycle

    def __del__(self):
        self.fh.close()


SESSIONS = []  # a registry of open sessions, as connection pools keep


@contextlib.contextmanager
def session(name):
    fh = open(path(name), "w")
    SESSIONS.append(fh)
    yield fh
    SESSIONS.remove(fh)  # skipped when the block raises: no try/finally
    fh.close()


def main():
    gc.disable()
    kept = []
    for i in range(3):
        lines = read_lines(f"gen{i}.txt")
        kept.append(next(lines))  # generator left suspended inside its with block

    conn = Connection("manual.db").__enter__()  # __enter__ by hand, never __exit__
    kept.append(conn)

    for i in range(2):
        Resource(f"cycle{i}.txt")

    try:
        with session("session.txt"):
            raise ValueError("boom")
    except ValueError:
        pass

    os.open(path("raw.bin"), os.O_WRONLY | os.O_CREAT)  # raw fd, never closed

    with open(path("clean.txt"), "w") as fh:  # the clean case: not a leak
        fh.write("ok")
    kept.append(lines)
    print(f"leaky: done, {len(kept)} objects kept alive", flush=True)
    os._exit(0)  # leave without finalizers, as a killed worker would


if __name__ == "__main__":
    main()
