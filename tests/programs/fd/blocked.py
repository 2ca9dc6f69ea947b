"""Threads blocked in accept() and in read() on a pipe, while a tracer attaches and detaches.

    python blocked.py

Four threads block at once: socket.accept() and os.read() (Python retries EINTR by itself,
PEP 475), and the same two calls made straight into libc through ctypes, which hand back
whatever the kernel returned: an EINTR that a careless detach lets through shows up there as
an error. Protocol (one JSON line per message on stdout):
  {"event": "ready", "pid", "ports": {who: port}, "pipes": {who: write fd}, "tids": {who: tid},
   "fds": {fd: link}}                  the four threads are started (the test waits, through
                                       /proc/PID/task/TID/syscall, until they are in the kernel)
  {"event": "woke", "who", "ok", "data" or "error"}   one per thread, once its peer connected
                                       and sent (accept) or wrote (read) its bytes
  stdin "check" -> {"event": "checked", "ok": true or an error, "fds": {fd: link}}: fd syscalls
                                       after the detach
  end of stdin: exit.
"""

from __future__ import annotations

import ctypes
import os
import socket
import sys
import threading

from lineproto import fd_table, say

LIBC = ctypes.CDLL(None, use_errno=True)
READ_SIZE = 64
KEPT: list = []  # accepted connections stay open: the fd table is the one the test reads


def raw_error(what: str) -> str:
    err = ctypes.get_errno()
    return f"{what}: {os.strerror(err)} (errno {err})"


def python_accept(listener: socket.socket) -> bytes:
    conn, _ = listener.accept()
    KEPT.append(conn)
    return conn.recv(READ_SIZE)


def raw_accept(listener: socket.socket) -> bytes:
    fd = LIBC.accept(listener.fileno(), None, None)  # one call, no retry: EINTR would show
    if fd < 0:
        raise OSError(raw_error("accept"))
    conn = socket.socket(fileno=fd)
    KEPT.append(conn)
    return conn.recv(READ_SIZE)


def python_read(fd: int) -> bytes:
    return os.read(fd, READ_SIZE)


def raw_read(fd: int) -> bytes:
    buf = ctypes.create_string_buffer(READ_SIZE)
    n = LIBC.read(fd, buf, READ_SIZE)
    if n < 0:
        raise OSError(raw_error("read"))
    return buf.raw[:n]


def blocked(who: str, call, arg, tids: dict[str, int], started: threading.Barrier) -> None:
    tids[who] = threading.get_native_id()
    started.wait()
    try:
        data = call(arg)
    except OSError as exc:
        say("woke", who=who, ok=False, error=str(exc))
        return
    say("woke", who=who, ok=True, data=data.decode(errors="replace"))


def check() -> bool | str:
    try:
        with open(__file__, "rb") as f:
            f.read(1)
        r, w = os.pipe()
        os.write(w, b"x")
        ok = os.read(r, 1) == b"x"
        os.close(r)
        os.close(w)
        probe = socket.socket()
        probe.close()
    except OSError as exc:
        return str(exc)
    return ok


def main() -> None:
    listeners = {}
    for who in ("python-accept", "raw-accept"):
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listeners[who] = listener
    pipes = {who: os.pipe() for who in ("python-read", "raw-read")}
    calls = {
        "python-accept": (python_accept, listeners["python-accept"]),
        "raw-accept": (raw_accept, listeners["raw-accept"]),
        "python-read": (python_read, pipes["python-read"][0]),
        "raw-read": (raw_read, pipes["raw-read"][0]),
    }
    tids: dict[str, int] = {}
    started = threading.Barrier(len(calls) + 1)
    for who, (call, arg) in calls.items():
        threading.Thread(target=blocked, args=(who, call, arg, tids, started), daemon=True).start()
    started.wait()
    ports = {who: listener.getsockname()[1] for who, listener in listeners.items()}
    say("ready", ports=ports, pipes={who: w for who, (_, w) in pipes.items()}, tids=tids,
        fds=fd_table())  # fmt: skip
    for line in sys.stdin:
        if line.strip() == "check":
            say("checked", ok=check(), fds=fd_table())
    os._exit(0)


if __name__ == "__main__":
    main()
