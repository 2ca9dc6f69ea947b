"""The live view in a real terminal (tmux), over a service that leaks one fd every 100 ms.

tests/programs/leaks/live_leaker.py leaks at its `# LEAK` line and opens-and-closes at its
`# CHURN` line. cmtrace runs in a tmux pane of 160x40; the test reads the screen with
capture-pane and presses keys with send-keys. Ground truth: the program's own fds in
/proc/PID/fd, the terminal's settings (`stty -g`) before and after, and the finished trace's
report.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ATTACH_TIMEOUT, CMTRACE_PYTHON, REPO, TARGET_PYTHON, Tracer, run_cmtrace

LEAKER = REPO / "tests" / "programs" / "leaks" / "live_leaker.py"
ROW = r"live_leaker\.py:{line} (\w+)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)\s+([+-][\d,]+)"

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")


def marked_line(marker: str) -> int:
    lines = LEAKER.read_text().splitlines()
    return next(n for n, text in enumerate(lines, 1) if f"# {marker}" in text)


LEAK_LINE, CHURN_LINE = marked_line("LEAK"), marked_line("CHURN")


class Pane:
    """One tmux pane on a private server (-L): its screen, its keys, its terminal flags."""

    def __init__(self, name: str, command: str) -> None:
        self.tmux = ["tmux", "-L", name]
        subprocess.run([*self.tmux, "kill-server"], capture_output=True)
        subprocess.run([*self.tmux, "new-session", "-d", "-x", "160", "-y", "40", command],
                       check=True)  # fmt: skip

    def screen(self) -> str:
        return subprocess.run([*self.tmux, "capture-pane", "-p"], capture_output=True,
                              text=True, check=True).stdout  # fmt: skip

    def flag(self, name: str) -> str:
        return subprocess.run([*self.tmux, "display-message", "-p", f"#{{{name}}}"],
                              capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip

    def send(self, *keys: str) -> None:
        subprocess.run([*self.tmux, "send-keys", *keys], check=True)

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.screen())
            if found:
                return found
            time.sleep(0.3)
        raise AssertionError(f"{pattern!r} not on screen within {timeout} s:\n{self.screen()}")

    def close(self) -> None:
        subprocess.run([*self.tmux, "kill-server"], capture_output=True)


def row(pane: Pane, line: int) -> tuple[str, int, int, int, int]:
    """(function, live, opened, closed, growth/min) of the site at live_leaker.py:line."""
    found = pane.wait_for(ROW.format(line=line), 10)
    function, *numbers = found.groups()
    live, opened, closed, growth = (int(n.replace(",", "")) for n in numbers)
    return function, live, opened, closed, growth


@pytest.fixture
def leaker(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """The leaking service, run 300 s at most; its pid is its first line."""
    proc = subprocess.Popen([TARGET_PYTHON, str(LEAKER), "300"], stdout=subprocess.PIPE,
                            text=True, cwd=tmp_path)  # fmt: skip
    assert proc.stdout is not None
    assert int(proc.stdout.readline()) == proc.pid
    yield proc
    proc.kill()
    proc.wait(timeout=30)


def devnull_fds(pid: int) -> int:
    """The program's own leaked fds, as its fd table has them."""
    fd_dir = Path(f"/proc/{pid}/fd")
    return sum(1 for fd in fd_dir.iterdir() if os.readlink(fd) == os.devnull)


def in_pane(tmp_path: Path, cmtrace_args: list[str], argv0: list[str] | None = None) -> Pane:
    """cmtrace in a tmux pane, between two `stty -g` of its terminal; its exit code goes
    to tmp_path/rc; the pane stays open (sleep) so its screen can still be read."""
    # the pane's own size, not the COLUMNS/LINES pytest's environment may carry
    cmtrace = argv0 or [CMTRACE_PYTHON, "-m", "cmtrace"]
    argv = shlex.join(["env", "-u", "COLUMNS", "-u", "LINES", *cmtrace, *cmtrace_args])
    script = (
        f"cd {tmp_path}; stty -g > before; {argv}; echo $? > rc.tmp; stty -g > after; "
        "mv rc.tmp rc; sleep 600"
    )
    return Pane(f"cmtrace-live-{os.getpid()}", f"sh -c {shlex.quote(script)}")


def wait_exit(tmp_path: Path, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while not (tmp_path / "rc").exists():
        assert time.monotonic() < deadline, f"cmtrace did not exit within {timeout} s"
        time.sleep(0.3)
    return int((tmp_path / "rc").read_text())


def report(trace: Path) -> dict:
    result = run_cmtrace("report", str(trace), "--format", "json")
    assert result.returncode in (0, 1), result.stderr
    parsed: dict = json.loads(result.stdout)
    return parsed


# How the view's recording is made: each backend, and --aggregate (its sweep ships the leaked
# fds each second with --min-age 0; the churn's counts come from the kernel's counters)
RECORDINGS = {
    "bpf": ("--backend", "bpf"),
    "ptrace": ("--backend", "ptrace"),
    "aggregate": ("--backend", "bpf", "--aggregate", "--min-age", "0"),
}


@pytest.mark.parametrize("recording", list(RECORDINGS))
def test_live_view_shows_the_leak_growing_and_q_finishes_the_trace(
    recording: str, leaker: subprocess.Popen[str], tmp_path: Path
) -> None:
    trace = tmp_path / "trace"
    flags = RECORDINGS[recording]
    pane = in_pane(tmp_path, ["-p", str(leaker.pid), *flags, "-o", str(trace)])
    try:
        pane.wait_for(rf"live_leaker\.py:{LEAK_LINE} leak", ATTACH_TIMEOUT)
        assert pane.flag("alternate_on") == "1"  # a full screen, not lines scrolling
        assert f"pid {leaker.pid}" in pane.screen()
        first, first_churn = row(pane, LEAK_LINE), row(pane, CHURN_LINE)
        time.sleep(2.5)
        second, second_churn = row(pane, LEAK_LINE), row(pane, CHURN_LINE)
        assert second[1] >= first[1] + 10, (first, second)  # 10 a second leak
        assert second[1] == second[2] and second[3] == 0  # live = opened, none closed
        assert 300 <= second[4] <= 900, second  # ~600 fds/min
        assert first_churn[0] == "churn" and second_churn[1] == 0 and second_churn[4] == 0
        assert second_churn[2] > first_churn[2]  # it keeps opening, and closing
        assert second_churn[2] == second_churn[3]
        pane.send("q")
        assert wait_exit(tmp_path) == 0
        on_exit = devnull_fds(leaker.pid)  # it keeps leaking, untraced, from here on
        assert (tmp_path / "before").read_text() == (tmp_path / "after").read_text()
        assert pane.flag("alternate_on") == "0" and pane.flag("cursor_flag") == "1"
        after = pane.screen()
        assert "stopping: q pressed in the live view" in after
        assert f"live_leaker.py:{LEAK_LINE} in leak" in after  # the summary, after the screen
    finally:
        pane.close()
    meta = json.loads((trace / "meta.json").read_text())
    assert meta["status"] == "complete" and meta["stop_reason"] == "q pressed in the live view"
    sites = report(trace)["sites"]
    leak = next(s for s in sites if s["line"] == LEAK_LINE)
    assert leak["function"] == "leak" and leak["cause"] == "no-context-manager"
    assert second[1] < leak["leaked"] <= on_exit
    # the churn's fd is at most one, when q came between its open and its close
    assert sum(s["leaked"] for s in sites if s["line"] == CHURN_LINE) <= 1


def test_run_live_q_interrupts_the_command_and_keys_sort_and_show_the_stack(
    tmp_path: Path,
) -> None:
    """`run --live`: the command owns the terminal, so the screen is opt-in; q reaches the
    command as Ctrl-C would (it dies of it) and the trace is complete."""
    trace = tmp_path / "trace"
    command = [TARGET_PYTHON, str(LEAKER), "300"]
    pane = in_pane(tmp_path, ["run", "--backend", "bpf", "--live", "-o", str(trace), "--",
                              *command])  # fmt: skip
    try:
        pane.wait_for(rf"live_leaker\.py:{LEAK_LINE} leak", ATTACH_TIMEOUT)
        time.sleep(1.5)
        pane.send("o")  # churn opens the most
        pane.wait_for(r"sorted by opened", 5)
        lines = pane.screen().splitlines()
        churn = next(i for i, t in enumerate(lines) if f"live_leaker.py:{CHURN_LINE}" in t)
        leak = next(i for i, t in enumerate(lines) if f"live_leaker.py:{LEAK_LINE}" in t)
        assert churn < leak
        pane.send("g")
        pane.wait_for(r"sorted by growth", 5)
        pane.send("Enter")  # the top site's stack: the leak, called from the module
        pane.wait_for(rf"opening stack of .*live_leaker\.py:{LEAK_LINE} leak", 5)
        pane.wait_for(r"live_leaker\.py:\d+ in <module>", 5)
        pane.send("Enter")
        pane.send(" ")
        pane.wait_for(r"PAUSED", 5)
        pane.send("q")
        rc = wait_exit(tmp_path)
        # Python dies of the SIGINT after a KeyboardInterrupt; cmtrace exits as a shell says
        assert rc == 128 + signal.SIGINT, (rc, pane.screen())
        assert (tmp_path / "before").read_text() == (tmp_path / "after").read_text()
        assert pane.flag("alternate_on") == "0"
    finally:
        pane.close()
    assert json.loads((trace / "meta.json").read_text())["status"] == "complete"
    leak_site = next(s for s in report(trace)["sites"] if s["line"] == LEAK_LINE)
    assert leak_site["leaked"] >= 15


def test_without_a_terminal_a_status_line_every_10_s(
    leaker: subprocess.Popen[str], tmp_path: Path
) -> None:
    trace = tmp_path / "trace"
    tracer = Tracer(["-p", str(leaker.pid), "--backend", "bpf", "-o", str(trace)])
    try:
        tracer.wait_attached()
        attached = time.monotonic()
        line = tracer.err.wait_for(lambda text: "elapsed" in text, 20, "a status line")
        waited = time.monotonic() - attached
        truth = devnull_fds(leaker.pid)
    finally:
        result = tracer.stop(signal.SIGINT)
    assert 8 <= waited <= 14, waited
    found = re.search(
        rf"cmtrace: 0:00:1\d elapsed, ([\d,]+) events, open fds pid {leaker.pid} (\d+)/(\d+); "
        rf"top growing \S+live_leaker\.py:{LEAK_LINE} leak \+([\d,]+)/min \(([\d,]+) live\)",
        line,
    )
    assert found, line
    events, open_fds, limit, growth, live = (int(g.replace(",", "")) for g in found.groups())
    assert 300 <= growth <= 900 and 60 <= live <= truth
    assert open_fds <= truth + 10 and open_fds >= live  # /proc counted a moment before
    assert limit == int(Path(f"/proc/{leaker.pid}/limits").read_text().split("Max open files")[1]
                        .split()[0])  # fmt: skip
    assert events >= 10 * live  # 11 events a leak: 6 opens, 5 closes
    assert result.returncode == 0 and result.stderr.count("elapsed") == 1
    assert "\x1b[" not in result.stderr  # no screen drawn into a pipe


def top_argv0() -> list[str]:
    return [CMTRACE_PYTHON, "-m", "cmtrace", "top"]


@pytest.mark.parametrize("recording", ["bpf", "aggregate"])
def test_top_follows_a_recording_directory_until_q(
    recording: str, leaker: subprocess.Popen[str], tmp_path: Path
) -> None:
    """A second terminal watches a recording made without a view: the leak grows there as
    its parts appear; the end of the recording is said; q quits, the terminal restored."""
    trace = tmp_path / "trace"
    tracer = Tracer(["-p", str(leaker.pid), *RECORDINGS[recording], "--no-live", "-q", "-o",
                     str(trace)])  # fmt: skip
    pane = None
    try:
        tracer.wait_attached()
        pane = in_pane(tmp_path, [str(trace)], top_argv0())
        first = row(pane, LEAK_LINE)
        time.sleep(2.0)
        second = row(pane, LEAK_LINE)
        assert second[1] >= first[1] + 10, (first, second)
        assert row(pane, CHURN_LINE)[1] == 0
        result = tracer.stop(signal.SIGINT)
        assert result.returncode == 0, result.stderr
        pane.wait_for(r"recording ended \(complete\): q quits", 10)
        final = row(pane, LEAK_LINE)
        leaked = next(s for s in report(trace)["sites"] if s["line"] == LEAK_LINE)["leaked"]
        assert final[1] == leaked  # the whole trace read: the report's count
        pane.send("q")
        assert wait_exit(tmp_path) == 0
        assert (tmp_path / "before").read_text() == (tmp_path / "after").read_text()
        assert pane.flag("alternate_on") == "0"
    finally:
        tracer.kill()
        if pane is not None:
            pane.close()
