"""fds passed with SCM_RIGHTS, and fds closed (or marked CLOEXEC) with close_range().

    python passfds.py run      do it all, report, exit
    python passfds.py serve    {"event": "ready", "pid", "fds"}, wait for "go" on stdin, do it
                               all, report, wait for the end of stdin, exit

1. a forked child opens a file, a pipe and a socket and sends the four fds to the parent in one
   message, then one more fd in a second one, received with MSG_CMSG_CLOEXEC; then MANY fds in
   one message to a socket with SO_PASSCRED (credentials come first);
2. close_range(first, last, 0) closes a block of fds opened for it (with a hole in it);
   close_range(first, ~0U, CLOSE_RANGE_CLOEXEC) only marks the (inheritable) ones after it
   CLOEXEC;
   os.closerange() closes another block.
Reports {"event": "done", "pid", "child", "received": [fd...], "fds": {fd: link},
"cloexec": [fd...] (from /proc/self/fdinfo), "start_fds": {fd: link}}.
"""

from __future__ import annotations

import array
import ctypes
import os
import socket
import sys

from lineproto import fd_table, say

LIBC = ctypes.CDLL(None, use_errno=True)
NR_CLOSE_RANGE = 436  # x86_64
CLOSE_RANGE_CLOEXEC = 4
ALL = 0xFFFFFFFF  # ~0U: to the last fd
MANY = 20  # fds in one message: more than the 16 a first version recorded
KEPT: list = []


def cloexec_fds() -> list[int]:
    marked = []
    for name in fd_table():
        try:
            flags = open(f"/proc/self/fdinfo/{name}").read().split("flags:")[1].split()[0]
        except (FileNotFoundError, IndexError):
            continue
        if int(flags, 8) & 0o2000000:
            marked.append(int(name))
    return sorted(marked)


def close_range(first: int, last: int, flags: int) -> None:
    if LIBC.syscall(NR_CLOSE_RANGE, first, last, flags) != 0:
        raise OSError(ctypes.get_errno(), "close_range")


def child_sends(channel: socket.socket) -> None:
    r, w = os.pipe()
    s = socket.socket()
    with open(__file__, "rb") as f:
        socket.send_fds(channel, [b"four"], [f.fileno(), r, w, s.fileno()])
    with open("/dev/null", "rb") as f:
        socket.send_fds(channel, [b"one"], [f.fileno()])
    os._exit(0)


def receive_from_a_child() -> tuple[int, list[int]]:
    ours, theirs = socket.socketpair()
    KEPT.extend([ours, theirs])
    child = os.fork()
    if child == 0:
        child_sends(theirs)
    _, received, _, _ = socket.recv_fds(ours, 16, 8)
    received.extend(recv_cloexec(ours))
    os.waitpid(child, 0)
    return child, received


def recv_cloexec(channel: socket.socket) -> list[int]:
    """recvmsg(MSG_CMSG_CLOEXEC) (socket.recv_fds ignores its flags before 3.13)."""
    fds = array.array("i")
    _, ancillary, _, _ = channel.recvmsg(16, socket.CMSG_SPACE(8 * fds.itemsize),
                                         socket.MSG_CMSG_CLOEXEC)  # fmt: skip
    for level, kind, data in ancillary:
        if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return list(fds)


def receive_with_credentials() -> list[int]:
    """MANY fds in one message to a socket with SO_PASSCRED: the kernel puts SCM_CREDENTIALS
    before SCM_RIGHTS."""
    ours, theirs = socket.socketpair()
    KEPT.extend([ours, theirs])
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    with open(__file__, "rb") as f:
        socket.send_fds(theirs, [b"many"], [f.fileno()] * MANY)
    fds = array.array("i")
    space = socket.CMSG_SPACE(MANY * fds.itemsize) + socket.CMSG_SPACE(12)  # + ucred
    _, ancillary, _, _ = ours.recvmsg(16, space)
    kinds = [kind for _, kind, _ in ancillary]
    assert kinds == [socket.SCM_CREDENTIALS, socket.SCM_RIGHTS], kinds
    fds.frombytes(ancillary[1][2])
    return list(fds)


def open_block(count: int) -> list[int]:
    return [os.open(__file__, os.O_RDONLY) for _ in range(count)]


def close_blocks() -> None:
    block = open_block(5)
    os.close(block[2])  # a hole: close_range goes over it
    close_range(block[0], block[-1], 0)
    marked = open_block(3)  # the last fds: inheritable, then marked CLOEXEC again, left open
    for fd in marked:
        os.set_inheritable(fd, True)
    close_range(marked[0], ALL, CLOSE_RANGE_CLOEXEC)
    block = open_block(4)
    os.closerange(block[0], block[-1] + 1)


def main() -> None:
    start = fd_table()
    if sys.argv[1] == "serve":
        say("ready", fds=start)
        sys.stdin.readline()
    child, received = receive_from_a_child()
    received += receive_with_credentials()
    close_blocks()
    say("done", child=child, received=received, fds=fd_table(), cloexec=cloexec_fds(),
        start_fds=start)  # fmt: skip
    if sys.argv[1] == "serve":
        while sys.stdin.readline():
            pass
    os._exit(0)


if __name__ == "__main__":
    main()
