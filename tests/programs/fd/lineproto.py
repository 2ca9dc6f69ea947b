"""The JSON line protocol the fd programs speak to their tests, and the ground truth they report.

Each program here is run as a script, so this module is found beside it (sys.path[0]); it is
imported before the program says "ready", so its own file opens precede the traced part.
"""

from __future__ import annotations

import json
import os


def say(event: str, **data) -> None:
    """One JSON line on stdout: {"event": event, "pid": this pid, **data}; os.write, so it
    works in a child after fork and from a signal handler."""
    os.write(1, (json.dumps({"event": event, "pid": os.getpid(), **data}) + "\n").encode())


def fd_table() -> dict[str, str]:
    """This process's open fds as the kernel lists them: {fd: link target}."""
    table = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            table[name] = os.readlink(f"/proc/self/fd/{name}")
        except FileNotFoundError:
            pass  # listdir's own directory fd, closed by now
    return table
