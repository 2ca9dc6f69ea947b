"""Raw x86_64 Linux syscalls through ctypes, so a target program makes exactly the syscall a test
names (Python's `os` module picks its own: os.open is openat, os.pipe is pipe2, ...).

Every wrapper returns the syscall's return value, or -errno when it failed, so a program can
report the ground truth (fd numbers and errnos) the kernel gave it.
"""

from __future__ import annotations

import ctypes

# Not ctypes.util.find_library: it runs ldconfig in a subprocess, fds the tests do not expect.
_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long

# x86_64 syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl).
NR = {
    "ioctl": 16,
    "pipe": 22,
    "dup": 32,
    "dup2": 33,
    "close": 3,
    "open": 2,
    "socket": 41,
    "connect": 42,
    "accept": 43,
    "bind": 49,
    "listen": 50,
    "socketpair": 53,
    "fcntl": 72,
    "creat": 85,
    "epoll_create": 213,
    "inotify_init": 253,
    "openat": 257,
    "signalfd": 282,
    "timerfd_create": 283,
    "eventfd": 284,
    "accept4": 288,
    "signalfd4": 289,
    "eventfd2": 290,
    "epoll_create1": 291,
    "dup3": 292,
    "pipe2": 293,
    "inotify_init1": 294,
    "perf_event_open": 298,
    "fanotify_init": 300,
    "memfd_create": 319,
    "userfaultfd": 323,
    "pidfd_open": 434,
    "close_range": 436,
    "openat2": 437,
    "pidfd_getfd": 438,
}

AT_FDCWD = -100
O_RDONLY, O_WRONLY, O_RDWR = 0, 1, 2
O_CREAT = 0o100
O_TRUNC = 0o1000
O_CLOEXEC = 0o2000000
F_DUPFD, F_GETFD, F_SETFD, F_DUPFD_CLOEXEC = 0, 1, 2, 1030
FD_CLOEXEC = 1
FIONCLEX, FIOCLEX = 0x5450, 0x5451
CLOSE_RANGE_CLOEXEC = 1 << 2
AF_UNIX, AF_INET = 1, 2
SOCK_STREAM = 1
SOCK_CLOEXEC = O_CLOEXEC
CLOCK_MONOTONIC = 1
SIGUSR1 = 10


def syscall(name: str, *args) -> int:
    """Make syscall `name`; return its result or -errno."""
    converted = [a if not isinstance(a, int) else ctypes.c_long(a) for a in args]
    ret = _libc.syscall(ctypes.c_long(NR[name]), *converted)
    if ret < 0:
        return -ctypes.get_errno()
    return ret


def cstr(text: str) -> ctypes.c_char_p:
    return ctypes.c_char_p(text.encode())


def int_pair() -> ctypes.Array:
    return (ctypes.c_int * 2)()


class OpenHow(ctypes.Structure):
    """struct open_how of openat2(2)."""

    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class SockaddrIn(ctypes.Structure):
    _fields_ = [
        ("family", ctypes.c_uint16),
        ("port", ctypes.c_uint16),  # network byte order
        ("addr", ctypes.c_uint32),  # network byte order
        ("zero", ctypes.c_uint8 * 8),
    ]


class SockaddrUn(ctypes.Structure):
    _fields_ = [("family", ctypes.c_uint16), ("path", ctypes.c_char * 108)]


def loopback(port: int) -> SockaddrIn:
    """127.0.0.1:port as a struct sockaddr_in."""
    return SockaddrIn(AF_INET, int.from_bytes(port.to_bytes(2, "big"), "little"), 0x0100007F)


def unix_address(path: str) -> SockaddrUn:
    return SockaddrUn(AF_UNIX, path.encode())


def bound_port(fd: int) -> int:
    """The port the kernel chose for a socket bound to port 0 (getsockname)."""
    addr = SockaddrIn()
    size = ctypes.c_uint32(ctypes.sizeof(addr))
    if _libc.getsockname(fd, ctypes.byref(addr), ctypes.byref(size)) != 0:
        raise OSError(ctypes.get_errno(), "getsockname")
    return int.from_bytes(addr.port.to_bytes(2, "little"), "big")


def perf_attr_software_clock() -> ctypes.Array:
    """A 64-byte (PERF_ATTR_SIZE_VER0) perf_event_attr: software cpu-clock, disabled."""
    attr = (ctypes.c_uint8 * 64)()
    ctypes.c_uint32.from_buffer(attr, 0).value = 1  # type = PERF_TYPE_SOFTWARE
    ctypes.c_uint32.from_buffer(attr, 4).value = 64  # size
    ctypes.c_uint64.from_buffer(attr, 8).value = 0  # config = PERF_COUNT_SW_CPU_CLOCK
    ctypes.c_uint64.from_buffer(attr, 40).value = 1  # disabled
    return attr
