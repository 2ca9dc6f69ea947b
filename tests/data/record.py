"""Re-record the saved traces the unit tests read (tests/data/<name>/), then their goldens.

    sudo /opt/cmtrace/venv/bin/python tests/data/record.py [NAME...]   # default: all of them
    /opt/cmtrace/venv/bin/python -m pytest tests/unit    # then: UPDATE_GOLDEN=1 to regenerate

Needs root and a working recorder (`cmtrace doctor`): this is the one place tests/data is
written by the real BPF recorder. Each trace is one run of a program from tests/programs/leaks
under Debian's /usr/bin/python3, recorded once and checked in; the unit tests never record.
Recording replaces the trace directory, so after re-recording, regenerate the goldens
(UPDATE_GOLDEN=1 make unit) and review their diff: it is what changed in the report.

What the traces hold, machine facts included (they are data, not secrets): the absolute paths of
the programs and of the stdlib files in their stacks (this checkout's path when recorded), the
captured source of those files (so `cmtrace report` gives the same answer on any machine), the
kernel release, boot id, tracer pid, wall-clock times and the command lines.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
LEAKS = REPO / "tests" / "programs" / "leaks"
TARGET_PYTHON = "/usr/bin/python3"  # Debian's interpreter, the one users trace
# An interpreter before 3.11: its frames carry co_name only, no co_qualname (library APIs).
PYTHON_39 = "/opt/cmtrace/pythons/bin/pyenv-3.9"
CMTRACE = [sys.executable, "-m", "cmtrace"]
TIMEOUT = 300  # bcc compiles the probes at attach: slow on a loaded machine


def run(out: Path, program: str, *args: str, python: str = TARGET_PYTHON) -> None:
    """`cmtrace run -- python3 PROGRAM ARGS`: the leaks are released by process exit."""
    command = [*CMTRACE, "run", "-q", "-o", str(out), "--", python, str(LEAKS / program)]
    subprocess.run([*command, *args], check=True, timeout=TIMEOUT, stdout=subprocess.DEVNULL)


class Attached:
    """attached.py running all_causes.py `wait` under `cmtrace -p`: it reports "ready", is
    attached to, is told "go", reports "leaked" and lives on until its stdin closes."""

    def __init__(self, out: Path) -> None:
        self.target = subprocess.Popen(
            [TARGET_PYTHON, str(LEAKS / "attached.py"), str(LEAKS / "all_causes.py"), "wait"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        ready = json.loads(self.target.stdout.readline())
        self.tracer = subprocess.Popen(
            [*CMTRACE, "-p", str(ready["pid"]), "-o", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + TIMEOUT
        for line in self.tracer.stderr:  # progress lines until "attached to PID"
            if "attached to" in line or time.monotonic() > deadline:
                break
        self.target.stdin.write("go\n")
        self.target.stdin.flush()
        message = json.loads(self.target.stdout.readline())
        assert message["event"] == "leaked", message

    def stop(self, sig: int) -> None:
        """Stop the tracer with `sig` while the target still runs, then let the target exit."""
        if sig == signal.SIGKILL:
            time.sleep(2.5)  # the writer flushes a part at least once a second
        self.tracer.send_signal(sig)
        self.tracer.wait(timeout=TIMEOUT)
        self.target.stdin.close()
        self.target.wait(timeout=TIMEOUT)


def attach(out: Path) -> None:
    """`cmtrace -p`, stopped by SIGINT while the program runs: pre-existing fds, the end
    snapshot of running stacks, the leaks still open at the end."""
    Attached(out).stop(signal.SIGINT)


def interrupted(out: Path) -> None:
    """`cmtrace -p` killed with SIGKILL: meta.json still says "recording" and its tracer is gone,
    which a reader must show as interrupted."""
    Attached(out).stop(signal.SIGKILL)


# name -> how it is recorded (what each covers: see tests/unit/test_golden.py).
TRACES: dict[str, Callable[[Path], None]] = {
    "all_causes": lambda out: run(out, "all_causes.py"),  # every cause, released by exit
    "all_causes_attach": attach,
    "fdtable": lambda out: run(out, "fdtable.py"),  # dup2 onto a live fd, pipes, a fork
    "finalizer_warning": lambda out: run(out, "finalizer_warning.py", "2"),  # warnings, no leak
    "leak_before": lambda out: run(out, "no_context_manager.py", "3"),  # a diff's BEFORE
    "leak_fixed": lambda out: run(out, "no_context_manager.py", "3", "fixed"),  # and its AFTER
    "interrupted": interrupted,
    # the API each leak went through (sqlite3, subprocess, socket, os), 3.11 and 3.9
    "library_apis": lambda out: run(out, "stdlib_leaks.py", "1"),
    "library_apis_39": lambda out: run(out, "stdlib_leaks.py", "1", python=PYTHON_39),
}


def record(name: str) -> None:
    final = HERE / name
    with tempfile.TemporaryDirectory(prefix=f"cmtrace-record-{name}-") as tmp:
        out = Path(tmp) / name
        TRACES[name](out)
        shutil.rmtree(final, ignore_errors=True)
        shutil.copytree(out, final)
    for path in [final, *final.rglob("*")]:  # the recorder writes 0600/0700: tests run as anyone
        path.chmod(0o755 if path.is_dir() else 0o644)
        os.chown(path, *_checkout_owner())
    print(f"recorded {final.relative_to(REPO)}", file=sys.stderr)


def _checkout_owner() -> tuple[int, int]:
    info = REPO.stat()
    return info.st_uid, info.st_gid


def main(names: list[str]) -> int:
    unknown = [n for n in names if n not in TRACES]
    if unknown:
        print(f"record.py: unknown trace {unknown}; known: {', '.join(TRACES)}", file=sys.stderr)
        return 1
    if os.geteuid() != 0:
        print("record.py: run as root: the recorder loads BPF programs", file=sys.stderr)
        return 2
    for name in names or list(TRACES):
        record(name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
