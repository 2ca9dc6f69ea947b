"""Leak files at one line until EMFILE, saying how many fds are open at each step.

    prlimit --nofile=128 python dump_emfile.py DIR [--wait] [--pause-at N] [--startup S]

Speaks the tests' JSON line protocol on stdout: {"event": "ready", "pid", "open"} (the fds open
at start, counted in /proc/self/fd), then waits for "go" on stdin (so `cmtrace -p` can attach
first) unless stdin says otherwise; after each leaked open {"event": "step", "open", "held"};
at EMFILE {"event": "emfile", "open", "held"}. `--pause-at N`: once N fds are open, say
{"event": "paused", ...} and wait for a line on stdin before going on. After EMFILE it exits at
once (the process dies of it), or with `--wait` waits for stdin to close. stdout is a pipe the
test reads: printing opens nothing.
"""

import errno
import json
import os
import resource
import sys
import time

DIR = sys.argv[1]
WAIT = "--wait" in sys.argv
PAUSE_AT = int(sys.argv[sys.argv.index("--pause-at") + 1]) if "--pause-at" in sys.argv else 0
STARTUP = float(sys.argv[sys.argv.index("--startup") + 1]) if "--startup" in sys.argv else 0


def say(event: str, **fields: int) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def open_now() -> int:
    """The fds open now: /proc/self/fd less the one listdir itself holds while reading it."""
    return len(os.listdir("/proc/self/fd")) - 1


held = []
base = open_now()
say("ready", pid=os.getpid(), open=base, limit=resource.getrlimit(resource.RLIMIT_NOFILE)[0])
if sys.stdin.readline().strip() != "go":
    sys.exit("dump_emfile.py: expected 'go' on stdin")
time.sleep(STARTUP)  # a service's start-up: the tracer sees it alive before it leaks
while True:
    try:
        held.append(open(os.path.join(DIR, f"leak-{len(held)}"), "w"))  # LEAK
    except OSError as exc:
        if exc.errno != errno.EMFILE:
            raise
        say("emfile", open=base + len(held), held=len(held))
        break
    say("step", open=base + len(held), held=len(held))
    if base + len(held) == PAUSE_AT:
        say("paused", open=base + len(held), held=len(held))
        sys.stdin.readline()
if WAIT:
    sys.stdin.read()
