"""A test-suite-like parent: one long-lived leak of its own, and short-lived `python -c`
children that each leave fds open to their exit.

    python spawns_snippets.py [N]

Runs N children of program A (os.open of this file) and N // 4 of program B (os.pipe), one at
a time, each printing its pid and the fds it left open; then prints one JSON line: the
parent's pid and its own leaked fd, and per program its text and each child's pid -> fds.
"""

import json
import os
import subprocess
import sys

PROGRAMS = {
    "A": f"import os, json\nfd = os.open({__file__!r}, os.O_RDONLY)\n"
    "print(json.dumps({'pid': os.getpid(), 'fds': [fd]}))\n",
    "B": "import os, json\nr, w = os.pipe()\nprint(json.dumps({'pid': os.getpid(), 'fds': [r, w]}))\n",
}


def run_child(program: str) -> dict:
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          check=True)  # fmt: skip
    return json.loads(done.stdout)


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    kept = os.open(__file__, os.O_RDONLY)  # LONG-LIVED LEAK: never closed
    children: dict = {name: {"text": text, "pids": {}} for name, text in PROGRAMS.items()}
    for name, runs in (("A", count), ("B", count // 4)):
        for _ in range(runs):
            child = run_child(PROGRAMS[name])
            children[name]["pids"][child["pid"]] = child["fds"]
    print(json.dumps({"pid": os.getpid(), "kept": kept, "programs": children}))


if __name__ == "__main__":
    main()
