"""Leaks through the standard library, a late thread and a deep stack; the same done cleanly.

    python stdlib_leaks.py [N] [wait]
N times (default 2) each: a sqlite3 connection left open by its `with` (Connection.__exit__
commits, it does not close), the parent's read end of a subprocess.Popen stdout pipe, both
ends of a socket.socketpair(), an os.open in a thread started only now (so under `cmtrace -p`
after the tracer attached), and an os.open at the bottom of a recursion deeper than the 128
frames a stack must keep. Then each of them once more, closed properly: none may be reported.

Each leaking line is marked `# CAUSE:<cause> LEAK:<label> COUNT:<fds leaked per iteration>`.
Ground truth comes from the program itself, not from cmtrace: the fds open before and after
each step (found with fstat, as a chroot has no /proc), printed as one JSON line
{"event": "leaked", "pid": ..., "leaked": {label: [fd, ...]}, "clean": {label: [fd, ...]}}.
Without `wait` it then leaves with os._exit(0) at once (a target that exits right after
leaking); with `wait` it waits for a line on stdin first, so `cmtrace -p` can stop while it
lives.
"""

import contextlib
import json
import os
import socket
import sqlite3
import sys
import tempfile
import threading
import time
from subprocess import PIPE, Popen

HERE = os.path.abspath(__file__)
N = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 2
WAIT = "wait" in sys.argv[1:]
DEPTH = 200  # frames of recursion: more than the kernel walker keeps (136)
MAX_FD = 1024
CHILD = [sys.executable, "-S", "-c", "pass"]
KEPT = []


def open_fds():
    """The fds open in this process now (fstat works where /proc is not mounted)."""
    found = set()
    for fd in range(MAX_FD):
        try:
            os.fstat(fd)
        except OSError:
            continue
        found.add(fd)
    return found


def new_fds(step, *args):
    """Run step(*args); the fds it left open."""
    before = open_fds()
    step(*args)
    return sorted(open_fds() - before)


def leak_sqlite(db):
    with sqlite3.connect(db) as conn:  # CAUSE:with-exited-without-close LEAK:sqlite COUNT:1
        conn.execute("create table if not exists t (x)")
        conn.execute("insert into t values (1)")
    KEPT.append(conn)


def clean_sqlite(db):
    with contextlib.closing(sqlite3.connect(db)) as conn:
        with conn:
            conn.execute("insert into t values (2)")


def leak_pipe():
    child = Popen(CHILD, stdout=PIPE)  # CAUSE:no-context-manager LEAK:pipe COUNT:1
    KEPT.append(child)  # never waited: its stdout pipe's read end stays open


def clean_pipe():
    with Popen(CHILD, stdout=PIPE) as child:
        child.communicate()


def leak_socketpair():
    pair = socket.socketpair()  # CAUSE:no-context-manager LEAK:socketpair COUNT:2
    KEPT.append(pair)


def clean_socketpair():
    left, right = socket.socketpair()
    with left, right:
        left.sendall(b"x")
        right.recv(1)


def open_raw(path, out):
    out.append(os.open(path, os.O_RDONLY))  # CAUSE:no-context-manager LEAK:thread COUNT:1


def open_and_close(path, out):
    fd = os.open(path, os.O_RDONLY)
    os.close(fd)


def wait_for_thread_exit(timeout=2.0):
    """Wait until this process is down to its main thread again.

    join() returns when the thread's Python work is done, before the C thread has exited; on
    3.8 the exit runs pthread_exit, and glibc's first pthread_exit opens libgcc_s.so.1 for a
    moment: an fd new_fds would see and count as left open (seen once in CI).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if len(os.listdir("/proc/self/task")) == 1:
                return
        except OSError:  # no /proc: give the thread a moment instead
            time.sleep(0.2)
            return
        time.sleep(0.005)


def in_new_thread(work):
    """Run work(HERE, out) in a thread started now, and keep what it returned."""
    out = []
    worker = threading.Thread(target=work, args=(HERE, out))
    worker.start()
    worker.join()
    wait_for_thread_exit()
    KEPT.extend(out)


def warm_up_threads():
    """Start and end one thread before counting fds, so glibc's one-time loads are done."""
    in_new_thread(lambda path, out: None)


def open_deep(depth):
    if depth:
        return open_deep(depth - 1)
    return os.open(HERE, os.O_RDONLY)  # CAUSE:no-context-manager LEAK:deep COUNT:1


def close_deep(depth):
    if depth:
        return close_deep(depth - 1)
    os.close(os.open(HERE, os.O_RDONLY))


def leak_deep():
    KEPT.append(open_deep(DEPTH))


def clean_deep():
    close_deep(DEPTH)


def main():
    db = os.path.join(tempfile.mkdtemp(prefix="cmtrace-stdlib-leaks-"), "leak.db")
    leaked = {"sqlite": [], "pipe": [], "socketpair": [], "thread": [], "deep": []}
    warm_up_threads()
    for _ in range(N):
        leaked["sqlite"] += new_fds(leak_sqlite, db)
        leaked["pipe"] += new_fds(leak_pipe)
        leaked["socketpair"] += new_fds(leak_socketpair)
        leaked["thread"] += new_fds(in_new_thread, open_raw)
        leaked["deep"] += new_fds(leak_deep)
    clean = {
        "sqlite": new_fds(clean_sqlite, db),
        "pipe": new_fds(clean_pipe),
        "socketpair": new_fds(clean_socketpair),
        "thread": new_fds(in_new_thread, open_and_close),
        "deep": new_fds(clean_deep),
    }
    os.unlink(db)
    os.rmdir(os.path.dirname(db))
    report = {"event": "leaked", "pid": os.getpid(), "leaked": leaked, "clean": clean}
    print(json.dumps(report), flush=True)
    if WAIT:
        sys.stdin.readline()
    os._exit(0)


main()
