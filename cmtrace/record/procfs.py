"""What /proc says about a process: existence, kernel threads, descendants, open fds."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cmtrace.errors import TargetError

PF_KTHREAD = 0x00200000
O_CLOEXEC = 0o2000000

# readlink(/proc/PID/fd/N) prefixes -> kind (anon inodes name their type)
LINK_KINDS = (
    ("socket:", "socket"),
    ("pipe:", "pipe"),
    ("anon_inode:[eventfd]", "eventfd"),
    ("anon_inode:[eventpoll]", "epoll"),
    ("anon_inode:[signalfd]", "signalfd"),
    ("anon_inode:[timerfd]", "timerfd"),
    ("anon_inode:inotify", "inotify"),
    ("anon_inode:[fanotify]", "fanotify"),
    ("anon_inode:[pidfd]", "pidfd"),
    ("anon_inode:[userfaultfd]", "userfaultfd"),
    ("anon_inode:[perf_event]", "perf_event"),
    ("/memfd:", "memfd"),
    ("anon_inode:", "unknown"),
)


def stat_fields(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name (field 3 onwards)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text.rsplit(")", 1)[1].split()


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def command_comm(pid: int, command: list[str] | None) -> str:
    """comm of a process about to exec `command` (`run`'s child: until it execs, its comm is
    still cmtrace's), as the kernel will set it: the file's base name, 15 bytes at most."""
    return os.path.basename(command[0])[:15] if command else comm(pid)


def raw_cmdline(pid: int) -> bytes | None:
    """/proc/PID/cmdline as the kernel gives it (NUL-separated), None when unreadable: compared
    byte for byte to tell a reused pid or a new exec from the process that was configured."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None


def cmdline(pid: int) -> list[str]:
    raw = raw_cmdline(pid) or b""
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def check_traceable(pid: int) -> None:
    """Raise TargetError unless pid is a live user-space process."""
    try:
        fields = stat_fields(pid)
    except (FileNotFoundError, ProcessLookupError):
        raise TargetError(f"no process with pid {pid}: check the pid with `ps -p {pid}`") from None
    if int(fields[6]) & PF_KTHREAD:
        raise TargetError(
            f"pid {pid} ({comm(pid)}) is a kernel thread: it has no file descriptors to trace; "
            "give the pid of a user process"
        )
    if fields[0] == "Z":
        raise TargetError(f"pid {pid} is a zombie (already exited): nothing left to trace")


def is_alive(pid: int) -> bool:
    try:
        return stat_fields(pid)[0] not in ("Z", "X")
    except OSError:
        return False


def tgid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Tgid:"):
            return int(line.split()[1])
    return pid


def descendants(root: int) -> Iterator[int]:
    """root and all its live descendant processes."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(stat_fields(int(entry))[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    todo = [root]
    while todo:
        pid = todo.pop()
        yield pid
        todo.extend(children.get(pid, []))


def kind_of_link(target: str) -> str:
    for prefix, kind in LINK_KINDS:
        if target.startswith(prefix):
            return kind
    return "file"


def open_fds(pid: int) -> list[dict[str, Any]]:
    """The fds open in pid right now: fd, kind, path (readlink), cloexec (from fdinfo)."""
    rows: list[dict[str, Any]] = []
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return rows
    for name in names:
        fd = int(name)
        try:
            target = os.readlink(fd_dir / name)
        except OSError:
            continue  # closed meanwhile
        rows.append(
            {"pid": pid, "fd": fd, "kind": kind_of_link(target), "path": target,
             "cloexec": _fd_cloexec(pid, fd)}
        )  # fmt: skip
    rows.sort(key=lambda r: r["fd"])
    return rows


def _fd_cloexec(pid: int, fd: int) -> bool | None:
    try:
        for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
            if line.startswith("flags:"):
                return bool(int(line.split()[1], 8) & O_CLOEXEC)
    except OSError:
        pass
    return None


def pid_namespace(pid: int) -> tuple[int, int] | None:
    """(dev, inode) of pid's pid namespace, what bpf_get_ns_current_pid_tgid needs."""
    try:
        st = os.stat(f"/proc/{pid}/ns/pid")
    except OSError:
        return None
    return st.st_dev, st.st_ino


def ns_pid(pid: int) -> int | None:
    """pid as seen inside its own (innermost) pid namespace."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
    except OSError:
        pass
    return None


def rlimit_nofile(pid: int) -> tuple[int | None, int | None] | None:
    """pid's RLIMIT_NOFILE as (soft, hard), None for unlimited; None when it cannot be read
    (gone, or not ours). /proc/PID/limits is readable for any process we may ptrace."""
    try:
        text = Path(f"/proc/{pid}/limits").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return _limit(soft), _limit(hard)
    return None


def _limit(word: str) -> int | None:
    return None if word == "unlimited" else int(word)


def count_fds(pid: int) -> int | None:
    """How many fds pid has open now (all of them, pre-existing included); None if gone."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
