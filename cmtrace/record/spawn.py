"""Starting `cmtrace run`'s command: held until traced, as the user behind sudo, resumed at exec."""

from __future__ import annotations

import os
import pwd
import signal
from collections.abc import Callable

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def requesting_user() -> tuple[int, int] | None:
    """(uid, gid) of the user behind sudo, who should own the trace; None = ourselves."""
    uid, gid = os.environ.get("SUDO_UID"), os.environ.get("SUDO_GID")
    if uid and gid and os.geteuid() == 0:
        return int(uid), int(gid)
    return None


def run_as_user() -> pwd.struct_passwd | None:
    """The account `sudo cmtrace run` came from: the command runs as that user, not root."""
    user = os.environ.get("SUDO_USER")
    if os.geteuid() != 0 or not user or user == "root":
        return None
    try:
        return pwd.getpwnam(user)
    except KeyError:
        return None


def spawn_held(
    command: list[str], user: pwd.struct_passwd | None
) -> tuple[int, Callable[[], None]]:
    """Fork a child that waits, with nothing but stdio open, until release() lets it exec."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(write_end)
            os.closerange(3, read_end)
            os.closerange(read_end + 1, 65536)
            if user is not None:
                os.initgroups(user.pw_name, user.pw_gid)
                os.setgid(user.pw_gid)
                os.setuid(user.pw_uid)
                os.environ.update(HOME=user.pw_dir, USER=user.pw_name, LOGNAME=user.pw_name)
            for sig in STOP_SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            if os.read(read_end, 1) != b"x":
                os._exit(127)  # the tracer went away before releasing us
            os.execvp(command[0], command)
        except OSError as exc:
            os.write(2, f"cmtrace: error: cannot run {command[0]}: {exc.strerror}\n".encode())
        os._exit(127)
    os.close(read_end)

    def release() -> None:
        os.write(write_end, b"x")
        os.close(write_end)

    return pid, release


class HeldChild:
    """run's command forked by this process (spawn_held): a Backend's start_command for
    recorders that watch from outside (BPF); cmtrace waits for it."""

    def __init__(self, command: list[str], user: pwd.struct_passwd | None) -> None:
        self.pid, self.release = spawn_held(command, user)
        self._status: int | None = None

    def running(self) -> bool:
        if self._status is not None:
            return False
        done, status = os.waitpid(self.pid, os.WNOHANG)
        if done:
            self._status = status
        return not done

    def exit_code(self) -> int:
        return exit_code(self._status) if self._status is not None else 0

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)


def is_python_image(path: str | None) -> bool:
    """The kernel's test for exec'd images it holds (is_python_image in fdtrace.bpf.c)."""
    return bool(path) and os.path.basename(path or "").startswith("python")


def resume(pid: int) -> None:
    """Let a process the kernel stopped at exec (SIGSTOP) run on."""
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


def exit_code(status: int) -> int:
    """A wait status as a shell reports it: the exit status, or 128 + the killing signal."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)
