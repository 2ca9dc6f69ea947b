"""Forks children on demand and lets each say whether something traces it.

python forker.py     {"event": "ready", "pid", "fds"}, then a command a line on stdin:
    fork -> a child opens and closes a file, reads its own TracerPid from /proc/self/status
            and exits: {"event": "child", "pid", "tracer", "ppid"}; then the parent says
            {"event": "forked", "child", "status"}
    (end of input: exit)
"""

from __future__ import annotations

import os
import sys

from lineproto import say


def tracer_pid() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("TracerPid:"):
                return int(line.split()[1])
    return -1


def child() -> None:
    with open(__file__, "rb") as f:
        f.read(1)
    say("child", tracer=tracer_pid(), ppid=os.getppid())
    os._exit(0)


def fork_many(count: int) -> None:
    for _ in range(count):
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
    leaked = open(__file__, "rb")  # MANY-LEAK
    say("done", children=count, fd=leaked.fileno())
    os._exit(0)


def main() -> None:
    if sys.argv[1:2] == ["many"]:
        fork_many(int(sys.argv[2]))
    say("ready", fds=sorted(os.listdir("/proc/self/fd")))
    for line in sys.stdin:
        if line.strip() == "fork":
            pid = os.fork()
            if pid == 0:
                child()
            _, status = os.waitpid(pid, 0)
            say("forked", child=pid, status=os.waitstatus_to_exitcode(status))
    os._exit(0)


if __name__ == "__main__":
    main()
