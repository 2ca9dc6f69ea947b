"""Children started the vfork way: os.posix_spawn (glibc: clone(CLONE_VM | CLONE_VFORK)) and
subprocess with close_fds (CPython's _posixsubprocess vforks, then close_range()s).

    python spawns.py            the parent
    python spawns.py child      a child: leaks a file, prints its own fd table, exits

Every process prints one JSON line with os.write (no shared buffers):
  child:  {"event": "child", "pid", "fds": {fd: link}, "leaked": the CHILD-LEAK fd}
  parent: {"event": "done", "pid", "fds": {fd: link}, "start_fds": {fd: link}, "passed": fd,
           "children": {"posix_spawn": pid, "subprocess": pid}, "status": {how: exit status}}
The parent leaks a file before the children and one after them, at marked lines; the
posix_spawn child gets an extra fd from a file action (SPAWNED_FD), the subprocess one an fd
passed with pass_fds while close_fds closes the rest.
"""

from __future__ import annotations

import os
import subprocess
import sys

from lineproto import fd_table, say

SPAWNED_FD = 7  # opened by posix_spawn's file action, in the vfork child
KEPT: list = []


def child() -> None:
    leaked = open(__file__, "rb")  # CHILD-LEAK
    KEPT.append(leaked)
    say("child", fds=fd_table(), leaked=leaked.fileno())
    os._exit(0)


def spawn_the_posix_way(passed: int) -> int:
    actions = [(os.POSIX_SPAWN_OPEN, SPAWNED_FD, __file__, os.O_RDONLY, 0),
               (os.POSIX_SPAWN_CLOSE, passed)]  # fmt: skip
    argv = [sys.executable, __file__, "child"]
    return os.posix_spawn(sys.executable, argv, os.environ, file_actions=actions)  # POSIX-SPAWN


def parent() -> None:
    start = fd_table()
    passed = open(__file__, "rb")  # PARENT-BEFORE
    KEPT.append(passed)
    spawned = spawn_the_posix_way(passed.fileno())
    status = {"posix_spawn": os.waitstatus_to_exitcode(os.waitpid(spawned, 0)[1])}
    argv = [sys.executable, __file__, "child"]
    sub = subprocess.Popen(argv, close_fds=True, pass_fds=[passed.fileno()])  # SUBPROCESS
    status["subprocess"] = sub.wait()
    KEPT.append(open(__file__, "rb"))  # PARENT-AFTER
    say("done", fds=fd_table(), start_fds=start, status=status, passed=passed.fileno(),
        children={"posix_spawn": spawned, "subprocess": sub.pid})  # fmt: skip
    os._exit(0)


if __name__ == "__main__":
    child() if sys.argv[1:] == ["child"] else parent()
