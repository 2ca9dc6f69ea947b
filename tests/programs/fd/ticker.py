"""A heartbeat of fd syscalls, for job control: SIGSTOP must stop it, SIGCONT resume it.

    python ticker.py

Every TICK_S the main thread opens and closes this file and prints {"event": "tick", "n"};
a second thread does the same with a pipe (a stop must stop every thread), and every
KEEP_EVERY-th tick keeps its file open. Commands on stdin:
  finish -> {"event": "done", "pid", "ticks": N, "pipes": M, "fds": {fd: link},
             "start_fds": {fd: link}}, then wait for the end of stdin and exit
"""

from __future__ import annotations

import os
import select
import sys
import threading

from lineproto import fd_table, say

TICK_S = 0.02
KEEP_EVERY = 10
KEPT: list = []


def pipes(count: list[int], stop: threading.Event) -> None:
    while not stop.wait(TICK_S):
        r, w = os.pipe()
        os.close(r)
        os.close(w)
        count[0] += 1


def main() -> None:
    start = fd_table()
    stop, piped = threading.Event(), [0]
    worker = threading.Thread(target=pipes, args=(piped, stop))
    worker.start()
    say("ready", fds=start, tid=worker.native_id)
    ticks = 0
    while True:
        readable, _, _ = select.select([sys.stdin], [], [], TICK_S)
        if readable and sys.stdin.readline().strip() == "finish":
            break
        ticks += 1
        f = open(__file__, "rb")  # TICK
        if ticks % KEEP_EVERY:
            f.close()
        else:
            KEPT.append(f)
        say("tick", n=ticks)
    stop.set()
    worker.join()
    say("done", ticks=ticks, pipes=piped[0], fds=fd_table(), start_fds=start)
    while sys.stdin.readline():
        pass
    os._exit(0)


if __name__ == "__main__":
    main()
