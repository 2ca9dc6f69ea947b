"""The syscalls cmtrace traces: numbers, what each creates, and which flag means CLOEXEC.

Data, not logic: the probes report the raw syscall number and flags argument; this table turns
them into the dataset's `syscall`, `kind` and `cloexec` columns. x86_64 numbers (the kernel's
`arch/x86/entry/syscalls/syscall_64.tbl`).
"""

from __future__ import annotations

from dataclasses import dataclass

O_CLOEXEC = 0o2000000
SOCK_CLOEXEC = O_CLOEXEC
MSG_CMSG_CLOEXEC = 0x40000000
CLOSE_RANGE_CLOEXEC = 4
F_DUPFD = 0
F_DUPFD_CLOEXEC = 1030


@dataclass(frozen=True)
class Syscall:
    name: str
    nr: int
    kind: str | None  # kind of the fd it creates; None = copies its source (dup) / not a birth
    cloexec_flag: int = 0  # bit of the flags argument that sets CLOEXEC (0 = never)
    always_cloexec: bool = False


# Births: every syscall that creates a descriptor.
BIRTHS = (
    Syscall("open", 2, "file", O_CLOEXEC),
    Syscall("openat", 257, "file", O_CLOEXEC),
    Syscall("openat2", 437, "file", O_CLOEXEC),
    Syscall("creat", 85, "file"),
    Syscall("socket", 41, "socket", SOCK_CLOEXEC),
    Syscall("socketpair", 53, "socket", SOCK_CLOEXEC),
    Syscall("accept", 43, "socket"),
    Syscall("accept4", 288, "socket", SOCK_CLOEXEC),
    Syscall("pipe", 22, "pipe"),
    Syscall("pipe2", 293, "pipe", O_CLOEXEC),
    Syscall("dup", 32, None),
    Syscall("dup2", 33, None),
    Syscall("dup3", 292, None, O_CLOEXEC),
    Syscall("fcntl", 72, None),  # F_DUPFD / F_DUPFD_CLOEXEC: cloexec decided from the command
    Syscall("eventfd", 284, "eventfd"),
    Syscall("eventfd2", 290, "eventfd", O_CLOEXEC),
    Syscall("epoll_create", 213, "epoll"),
    Syscall("epoll_create1", 291, "epoll", O_CLOEXEC),
    Syscall("memfd_create", 319, "memfd", 0x0001),  # MFD_CLOEXEC
    Syscall("signalfd", 282, "signalfd"),
    Syscall("signalfd4", 289, "signalfd", O_CLOEXEC),
    Syscall("timerfd_create", 283, "timerfd", O_CLOEXEC),
    Syscall("inotify_init", 253, "inotify"),
    Syscall("inotify_init1", 294, "inotify", O_CLOEXEC),
    Syscall("fanotify_init", 300, "fanotify", 0x0001),  # FAN_CLOEXEC
    Syscall("pidfd_open", 434, "pidfd", always_cloexec=True),
    Syscall("pidfd_getfd", 438, None, always_cloexec=True),  # kind of the remote fd: unknown
    Syscall("userfaultfd", 323, "userfaultfd", O_CLOEXEC),
    Syscall("perf_event_open", 298, "perf_event", 0x8),  # PERF_FLAG_FD_CLOEXEC
    Syscall("recvmsg", 47, None, MSG_CMSG_CLOEXEC),  # fds received with SCM_RIGHTS
)

# Other syscalls the probes attach to: deaths, CLOEXEC changes, addresses, process creation.
OTHERS = (
    Syscall("close", 3, None),
    Syscall("close_range", 436, None),
    Syscall("ioctl", 16, None),  # FIOCLEX / FIONCLEX only
    Syscall("connect", 42, None),
    Syscall("bind", 49, None),
    Syscall("clone", 56, None),
    Syscall("clone3", 435, None),
    Syscall("fork", 57, None),
    Syscall("vfork", 58, None),
    Syscall("execve", 59, None),
)

BY_NR: dict[int, Syscall] = {s.nr: s for s in BIRTHS + OTHERS}
BY_NAME: dict[str, Syscall] = {s.name: s for s in BIRTHS + OTHERS}

# Syscalls whose birth needs the exit probe (the fd is the return value), and those handled
# entirely at entry. Process-level events come from sched tracepoints.
EXIT_PROBED = tuple(s.name for s in BIRTHS) + ("clone", "clone3", "fork", "vfork")
ENTER_ONLY = ("close", "close_range", "ioctl", "connect", "bind")


def syscall_name(nr: int) -> str:
    entry = BY_NR.get(nr)
    return entry.name if entry else f"syscall_{nr}"


def birth_kind(nr: int) -> str:
    """Kind of an fd created by syscall `nr` ("unknown" for dup family: analysis copies it)."""
    entry = BY_NR.get(nr)
    return (entry.kind if entry else None) or "unknown"


def birth_cloexec(nr: int, flags: int) -> bool:
    """Whether an fd created by syscall `nr` with `flags` has its CLOEXEC bit set."""
    entry = BY_NR.get(nr)
    if entry is None:
        return False
    if entry.always_cloexec:
        return True
    if entry.name == "fcntl":
        return flags == F_DUPFD_CLOEXEC
    return bool(entry.cloexec_flag and flags & entry.cloexec_flag)
