"""Blocking fd syscalls interrupted by a stream of signals, and what the program saw of them.

    python sigops.py MODE run      do the calls, report, exit
    python sigops.py MODE serve    {"event": "ready", "pid", "fds"}, wait for "go" on stdin, do
                                   the calls, report, then wait for the end of stdin and exit
MODE: "restart" (the SIGALRM handler has SA_RESTART: the kernel restarts what it interrupted)
or "interrupt" (no SA_RESTART: the calls return EINTR; Python retries its own, PEP 475).

An interval timer fires SIGALRM every 2 ms while the main thread blocks in: read() on a pipe,
accept(), recvmsg() receiving an fd (SCM_RIGHTS), open() of a FIFO, select(), sleep(), and
read() and nanosleep() made straight into libc through ctypes (which count the EINTRs the kernel
returned: none for read with SA_RESTART, some without; always some for nanosleep). A helper
thread is each call's peer, after a delay. Every fd made stays open (the fd table is the
ground truth); the listener and one pipe are closed at the end. Reports
  {"event": "done", "pid", "results": [{"op", "result", "eintr"}], "fds": {fd: link},
   "start_fds": {fd: link} (what it inherited), "signals": N}
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import socket
import sys
import tempfile
import threading
import time

from lineproto import fd_table, say

LIBC = ctypes.CDLL(None, use_errno=True)
EINTR = 4
PEER_DELAY_S = 0.06
TICK_S = 0.002
KEPT: list = []  # every fd made stays open until the report
SIGNALS = [0]


class Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def later(action) -> threading.Thread:
    """Run action on a helper thread after PEER_DELAY_S; the helper blocks SIGALRM, so every
    signal interrupts the main thread's call."""

    def run() -> None:
        time.sleep(PEER_DELAY_S)
        action()

    thread = threading.Thread(target=run)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})  # inherited by the thread
    try:
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGALRM})
    return thread


def pipe_read() -> tuple[str, int]:
    r, w = os.pipe()
    KEPT.extend([r, w])
    peer = later(lambda: os.write(w, b"pipe-data"))
    data = os.read(r, 64)
    peer.join()
    return data.decode(), 0


def raw_read() -> tuple[str, int]:
    """libc read() once per EINTR, counting them."""
    r, w = os.pipe()
    KEPT.extend([r, w])
    peer = later(lambda: os.write(w, b"raw-data"))
    buf = ctypes.create_string_buffer(64)
    eintr = 0
    while (n := LIBC.read(r, buf, 64)) < 0:
        if ctypes.get_errno() != EINTR:
            raise OSError(ctypes.get_errno(), "read")
        eintr += 1
    peer.join()
    return buf.raw[:n].decode(), eintr


def accept() -> tuple[str, int]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    KEPT.append(listener)

    def connect() -> None:
        client = socket.create_connection(listener.getsockname())
        KEPT.append(client)
        client.sendall(b"accept-data")

    peer = later(connect)
    conn, _ = listener.accept()
    KEPT.append(conn)
    peer.join()
    return conn.recv(64).decode(), 0


def recv_fd() -> tuple[str, int]:
    ours, theirs = socket.socketpair()
    KEPT.extend([ours, theirs])
    passed = open(__file__, "rb")
    KEPT.append(passed)
    peer = later(lambda: socket.send_fds(theirs, [b"fd"], [passed.fileno()]))
    msg, fds, _, _ = socket.recv_fds(ours, 16, 4)
    KEPT.extend(fds)
    peer.join()
    got = os.readlink(f"/proc/self/fd/{fds[0]}") if len(fds) == 1 else f"{len(fds)} fds"
    return f"{msg.decode()} {got}", 0


def fifo_open(workdir: str) -> tuple[str, int]:
    path = os.path.join(workdir, f"fifo-{os.getpid()}")
    os.mkfifo(path)

    def write_end() -> None:
        KEPT.append(os.open(path, os.O_WRONLY))

    peer = later(write_end)
    fd = os.open(path, os.O_RDONLY)  # blocks until the writer opens
    KEPT.append(fd)
    peer.join()
    return os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).split("-")[0], 0


def select_readable() -> tuple[str, int]:
    r, w = os.pipe()
    KEPT.extend([r, w])
    peer = later(lambda: os.write(w, b"s"))
    readable, _, _ = select.select([r], [], [], 5.0)
    peer.join()
    return "readable" if readable == [r] else f"select returned {readable}", 0


def sleep() -> tuple[str, int]:
    started = time.monotonic()
    time.sleep(PEER_DELAY_S)
    return "slept" if time.monotonic() - started >= PEER_DELAY_S else "woke early", 0


def raw_nanosleep() -> tuple[str, int]:
    """nanosleep() through libc: a handler makes it return EINTR (never restarted)."""
    left = Timespec(0, int(PEER_DELAY_S * 1e9))
    eintr = 0
    while LIBC.nanosleep(ctypes.byref(left), ctypes.byref(left)) < 0:
        if ctypes.get_errno() != EINTR:
            raise OSError(ctypes.get_errno(), "nanosleep")
        eintr += 1
    return "slept", eintr


OPS = {"pipe-read": pipe_read, "raw-read": raw_read, "accept": accept, "recv-fd": recv_fd,
       "fifo-open": fifo_open, "select": select_readable, "sleep": sleep,
       "raw-nanosleep": raw_nanosleep}  # fmt: skip


def on_alarm(_sig, _frame) -> None:
    SIGNALS[0] += 1


def run_all(mode: str, workdir: str) -> list[dict]:
    signal.signal(signal.SIGALRM, on_alarm)
    signal.siginterrupt(signal.SIGALRM, mode == "interrupt")
    results = []
    for name, op in OPS.items():
        signal.setitimer(signal.ITIMER_REAL, TICK_S, TICK_S)
        try:
            result, eintr = op(workdir) if name == "fifo-open" else op()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0, 0)
        results.append({"op": name, "result": result, "eintr": eintr})
    os.close(KEPT.pop(0))  # the first pipe's read end, and the listener: deaths
    next(k for k in KEPT if isinstance(k, socket.socket)).close()
    return results


def main() -> None:
    mode, how = sys.argv[1], sys.argv[2]
    start_fds = fd_table()  # what it inherited
    workdir = tempfile.mkdtemp(prefix="sigops-")
    threading.excepthook = lambda args: os._exit(3)
    if how == "serve":
        say("ready", fds=fd_table())
        sys.stdin.readline()
    results = run_all(mode, workdir)
    say("done", results=results, fds=fd_table(), start_fds=start_fds, signals=SIGNALS[0])
    if how == "serve":
        while sys.stdin.readline():
            pass
    os._exit(0)


if __name__ == "__main__":
    main()
