"""Leaks a file, a pipe and a socket at marked lines and prints its own /proc/self/fd.

    python fdtruth.py run      leak, print {"event": "truth", "pid", "fds"} and exit
    python fdtruth.py serve    {"event": "ready", "pid", "fds"}, then a command a line on stdin:
        leak  -> leak again, reply "truth" (the fd table as the kernel has it)
        check -> open, read, close, pipe, write, read: reply {"event": "checked", "ok": ...}
        (end of input: exit)

The fd table comes from the kernel (readlink of /proc/self/fd/N), not from the program's own
bookkeeping, so a test compares the trace with the ground truth.
"""

import os
import socket
import sys

from lineproto import fd_table, say

KEPT = []  # what leaks stays referenced: closed only by the process exit


def leak_file():
    return open(__file__, "rb")  # LEAK-FILE


def leak_pipe():
    return os.pipe()  # LEAK-PIPE


def leak_socket():
    return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # LEAK-SOCKET


def closed_properly():
    with open(__file__, "rb") as f:
        f.read(1)


def leak_everything():
    closed_properly()
    KEPT.extend([leak_file(), leak_pipe(), leak_socket()])


def check():
    """fd syscalls that fail (ENOSYS, EPERM) if a tracer left the process in a bad state."""
    try:
        closed_properly()
        r, w = os.pipe()
        os.write(w, b"x")
        ok = os.read(r, 1) == b"x"
        os.close(r)
        os.close(w)
    except OSError as exc:
        return str(exc)
    return ok


if sys.argv[1] == "run":
    leak_everything()
    say("truth", fds=fd_table())
else:
    say("ready", fds=fd_table())
    for line in sys.stdin:
        if line.strip() == "leak":
            leak_everything()
            say("truth", fds=fd_table())
        elif line.strip() == "check":
            say("checked", ok=check())
