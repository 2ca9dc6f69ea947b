"""The ptrace backend through `cmtrace run` and `cmtrace -p`, as an ordinary user.

Real processes, no mocks: the tests run as root and drop to `nobody` (setpriv with no
capabilities at all), the way a CI job or a laptop without sudo runs cmtrace. programs/fd/
fdtruth.py leaks a file, a pipe and a socket at marked lines and prints its own fd table from
/proc/self/fd; the trace must name exactly those fds as leaks, at those lines. `--backend auto`
must pick ptrace for nobody and inside a user namespace (no capability counts outside it), and
say so. Attached with -p, Ctrl-C detaches and the target's syscalls keep working; so they do
when the tracer is killed with SIGKILL. Attaching to another user's process is refused with one
line and exit 2.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import targets
from conftest import (
    ATTACH_TIMEOUT,
    CMTRACE_PYTHON,
    EXIT_TIMEOUT,
    TARGET_PYTHON,
    LineReader,
    Target,
    cmtrace_argv,
    error_line,
    kind_from_link,
    read_events,
    read_meta,
    report_json,
    wait_until,
)

from cmtrace.record import procfs

PROGRAM = Path(__file__).parents[1] / "programs" / "fd" / "fdtruth.py"
NOBODY = ("setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups",
          "--inh-caps=-all", "--bounding-set=-all")  # fmt: skip
USERNS = ("unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount-proc")
MARKERS = {"file": "LEAK-FILE", "pipe": "LEAK-PIPE", "socket": "LEAK-SOCKET"}
UNPRIVILEGED, NOT_RUNNABLE = targets.unprivileged()

if shutil.which("setpriv") is None:
    pytest.skip("needs setpriv (util-linux)", allow_module_level=True)


def marked_line(marker: str) -> int:
    lines = PROGRAM.read_text().splitlines()
    return next(n for n, line in enumerate(lines, 1) if f"# {marker}" in line)


@pytest.fixture(scope="module")
def nobody_dir() -> Iterator[Path]:
    """Where nobody writes traces and keeps its engine build (XDG_CACHE_HOME)."""
    path = Path(tempfile.mkdtemp(prefix="cmtrace-ptrace-", dir="/tmp"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def nobody_env(where: Path) -> dict[str, str]:
    return dict(os.environ, XDG_CACHE_HOME=str(where / "cache"), HOME=str(where))


def trace_dir(where: Path, name: str) -> Path:
    return where / f"{name}-{os.urandom(4).hex()}"


def run_as_nobody(where: Path, *args: str, wrapper: tuple[str, ...] = ()):
    return subprocess.run(
        [*NOBODY, *wrapper, *cmtrace_argv(*args)], capture_output=True, text=True,
        timeout=EXIT_TIMEOUT, cwd=where, env=nobody_env(where),
    )  # fmt: skip


def truth_of(stdout: str) -> dict:
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return next(line for line in lines if line["event"] == "truth")


def assert_leaks_match(trace: Path, pid: int, fds: dict[str, str], before: dict[str, str]) -> None:
    """The trace's leaks of pid are the fds the program holds (and did not hold before the
    trace), with their kinds, each at the line that opened it."""
    expected = {int(fd): link for fd, link in fds.items() if fd not in before}
    leaks = {leak["fd"]: leak for leak in report_json(trace)["leaks"] if leak["pid"] == pid}
    assert set(leaks) == set(expected), (leaks, expected)
    for fd, link in expected.items():
        kind = kind_from_link(link)
        leak = leaks[fd]
        assert leak["kind"] == kind, (fd, link, leak)
        assert (leak["site"]["file"], leak["site"]["line"]) == (
            str(PROGRAM),
            marked_line(MARKERS[kind]),
        ), leak


def assert_ptrace_meta(trace: Path, reason: str) -> dict:
    meta = read_meta(trace)
    assert meta["status"] == "complete" and meta["lost_events"] == 0, meta
    assert (meta["backend"], meta["backend_reason"]) == ("ptrace", reason), meta
    assert meta["backend_stats"]["stops"] > 0 and meta["backend_stats"]["dropped"] == 0, meta
    return meta


# ---- cmtrace run as nobody ------------------------------------------------------------------
def test_unprivileged_interpreters_found():
    print("as nobody:", ", ".join(t.name for t in UNPRIVILEGED))
    print("not as nobody:", "; ".join(NOT_RUNNABLE) or "none")
    assert UNPRIVILEGED


@pytest.mark.parametrize("target", UNPRIVILEGED, ids=[t.name for t in UNPRIVILEGED])
def test_run_as_nobody_records_the_leaks_at_their_lines(nobody_dir, target):
    """auto picks ptrace (not root) and the trace matches the program's own fd table."""
    trace = trace_dir(nobody_dir, f"run-{target.name}")
    result = run_as_nobody(nobody_dir, "run", "-o", str(trace), "--", target.command,
                           str(PROGRAM), "run")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "backend ptrace: not root" in result.stderr, result.stderr
    truth = truth_of(result.stdout)
    assert_leaks_match(trace, truth["pid"], truth["fds"], before={"0": "", "1": "", "2": ""})
    assert_ptrace_meta(trace, "backend ptrace: not root")


def test_run_as_nobody_with_another_users_home(nobody_dir):
    """setpriv and `sudo -E` keep HOME: nobody with HOME=/root (which it may not even stat)
    and no XDG_CACHE_HOME gets its engine built in its private temporary directory, not a
    PermissionError traceback."""
    private = Path(tempfile.gettempdir()) / "cmtrace-65534"  # nobody's, as build.py names it
    shutil.rmtree(private, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k != "XDG_CACHE_HOME"} | {"HOME": "/root"}
    trace = trace_dir(nobody_dir, "home-root")
    result = subprocess.run(
        [*NOBODY, *cmtrace_argv("run", "-o", str(trace), "--", TARGET_PYTHON, str(PROGRAM), "run")],
        capture_output=True, text=True, timeout=EXIT_TIMEOUT, cwd=nobody_dir, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    # an install (or a fresh checkout's set-up) has its engine beside the module, so that run
    # need not have built one: build the cache's, as a checkout whose engine is stale would
    cached = subprocess.run(
        [*NOBODY, CMTRACE_PYTHON, "-c",
         "from cmtrace.record.ptrace.build import cached_engine; print(cached_engine())"],
        capture_output=True, text=True, timeout=EXIT_TIMEOUT, cwd=nobody_dir, env=env,
    )  # fmt: skip
    assert cached.returncode == 0, cached.stderr
    assert Path(cached.stdout.strip()).parent == private, cached.stdout
    built = list(private.glob("cmtrace-ptrace-engine-*"))
    assert built and all(path.stat().st_uid == 65534 for path in built), built
    truth = truth_of(result.stdout)
    assert_leaks_match(trace, truth["pid"], truth["fds"], before={"0": "", "1": "", "2": ""})


def test_auto_picks_ptrace_in_a_user_namespace(nobody_dir):
    """root of its own user namespace, with every capability there and none outside."""
    trace = trace_dir(nobody_dir, "userns")
    result = run_as_nobody(nobody_dir, "run", "-o", str(trace), "--", TARGET_PYTHON,
                           str(PROGRAM), "run", wrapper=USERNS)  # fmt: skip
    assert result.returncode == 0, result.stderr
    running = [line for line in result.stderr.splitlines() if "cmtrace: running" in line]
    assert running and "backend ptrace: " in running[0], result.stderr
    reason = running[0].split(", ", 1)[1].rstrip(")")
    assert "user namespace" in reason, reason  # uid 0 in there, but not in the initial one
    truth = truth_of(result.stdout)
    meta = assert_ptrace_meta(trace, reason)
    assert meta["targets"][0]["pid"] == truth["pid"]  # pids as the namespace sees them
    assert_leaks_match(trace, truth["pid"], truth["fds"], before={"0": "", "1": "", "2": ""})


# ---- cmtrace -p as nobody -------------------------------------------------------------------
class NobodyTracer:
    """`cmtrace -p PID` as nobody, in the background."""

    def __init__(self, where: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [*NOBODY, *cmtrace_argv(*args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, cwd=where, env=nobody_env(where),
        )  # fmt: skip
        self.err = LineReader(self.proc.stderr)
        self.out = LineReader(self.proc.stdout)

    def wait_attached(self) -> str:
        return self.err.wait_for(lambda line: "attached to" in line, ATTACH_TIMEOUT, "attached")

    def wait(self) -> int:
        try:
            return self.proc.wait(timeout=EXIT_TIMEOUT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


def tracer_pid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("TracerPid:"):
            return int(line.split()[1])
    raise AssertionError(f"no TracerPid in /proc/{pid}/status")


@pytest.fixture
def nobody_target(nobody_dir) -> Iterator[Target]:
    target = Target([*NOBODY, TARGET_PYTHON, str(PROGRAM), "serve"], nobody_dir)
    yield target
    target.kill()


def assert_runs_untraced(target: Target) -> None:
    """Nobody traces it any more and its fd syscalls work (no ENOSYS, no stop)."""
    wait_until(lambda: tracer_pid_of(target.pid) == 0, 30, "the target to be detached")
    target.send("check")
    assert target.expect("checked")["ok"] is True


def test_attach_as_nobody_then_ctrl_c_detaches(nobody_dir, nobody_target):
    ready = nobody_target.expect("ready")
    trace = trace_dir(nobody_dir, "attach")
    tracer = NobodyTracer(nobody_dir, "-p", str(ready["pid"]), "-o", str(trace))
    line = tracer.wait_attached()
    assert f"attached to {ready['pid']} (python3, Python " in line, line
    assert line.rstrip().endswith(", backend ptrace: not root)"), line
    nobody_target.send("leak")
    truth = nobody_target.expect("truth")
    tracer.proc.send_signal(signal.SIGINT)
    assert tracer.wait() == 0, tracer.err.text()
    assert_runs_untraced(nobody_target)
    assert_leaks_match(trace, ready["pid"], truth["fds"], before=ready["fds"])
    assert_ptrace_meta(trace, "backend ptrace: not root")


def test_tracer_killed_during_attach_leaves_the_target_running(nobody_dir, nobody_target):
    ready = nobody_target.expect("ready")
    trace = trace_dir(nobody_dir, "killed")
    tracer = NobodyTracer(nobody_dir, "-p", str(ready["pid"]), "-o", str(trace))
    tracer.wait_attached()
    assert tracer_pid_of(ready["pid"]) != 0
    nobody_target.send("leak")
    nobody_target.expect("truth")
    tracer.proc.kill()  # SIGKILL: no detach, no flush
    tracer.wait()
    assert_runs_untraced(nobody_target)
    nobody_target.send("leak")  # and again: fds still open and close as they should
    assert nobody_target.expect("truth")["fds"]


@pytest.mark.parametrize("backend_flag", ["ptrace", "auto"])
def test_attach_to_another_users_process_is_one_line_and_exit_2(nobody_dir, backend_flag):
    root_target = Target([TARGET_PYTHON, str(PROGRAM), "serve"], nobody_dir)
    try:
        pid = root_target.expect("ready")["pid"]
        result = run_as_nobody(nobody_dir, "-p", str(pid), "--backend", backend_flag)
        assert result.returncode == 2, result.stderr
        line = error_line(result)
        assert "ptrace attach: target uid 0/0/0, ours is 65534" in line, line
        assert "run cmtrace as the target's user, or with sudo" in line, line
        assert tracer_pid_of(pid) == 0
    finally:
        root_target.kill()


# ---- cmtrace run killed ---------------------------------------------------------------------
def test_tracer_killed_during_run_takes_the_command_and_leaves_a_readable_trace(nobody_dir):
    """run is fail-stop: a seccomp filter without its tracer would fail every fd syscall with
    ENOSYS, so the command dies with cmtrace (its engine dies with it: PTRACE_O_EXITKILL)."""
    trace = trace_dir(nobody_dir, "run-killed")
    tracer = subprocess.Popen(
        [*NOBODY, *cmtrace_argv("run", "--backend", "ptrace", "-o", str(trace), "--",
                                TARGET_PYTHON, str(PROGRAM), "serve")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=nobody_dir, env=nobody_env(nobody_dir), bufsize=1,
    )  # fmt: skip
    out = LineReader(tracer.stdout)
    try:
        command = json.loads(out.wait_for(lambda line: '"ready"' in line, ATTACH_TIMEOUT, "ready"))
        tracer.stdin.write("leak\n")
        tracer.stdin.flush()
        out.wait_for(lambda line: '"truth"' in line, ATTACH_TIMEOUT, "truth")
        wait_until(lambda: any((trace / "events").glob("*.parquet")), 30, "a flushed part")
        tracer.kill()
        tracer.wait(timeout=30)
        wait_until(lambda: not Path(f"/proc/{command['pid']}").exists(), 30, "the command to die")
    finally:
        if tracer.poll() is None:
            tracer.kill()
            tracer.wait(timeout=30)
    report = report_json(trace)
    assert report["interrupted"], report["trace"]


def test_run_exit_status_comes_through_and_lingering_children_end_with_it(nobody_dir):
    """A child left running when the command exits cannot outlive the engine (its filter):
    it is killed, said, and cmtrace still exits with the command's own status."""
    trace = trace_dir(nobody_dir, "linger")
    result = run_as_nobody(nobody_dir, "run", "--backend", "ptrace", "-o", str(trace), "--",
                           "/bin/sh", "-c", "sleep 60 & echo $!; exit 3")  # fmt: skip
    assert result.returncode == 3, result.stderr
    child = int(result.stdout.split()[0])
    assert f"killing its children still traced ({child})" in result.stderr, result.stderr

    def gone() -> bool:
        try:
            return Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except FileNotFoundError:
            return True

    wait_until(gone, 30, "the lingering child to be killed")
    assert_ptrace_meta(trace, "backend ptrace")


FORKS_AT_ONCE = """
import json, os, sys
print(json.dumps({"event": "ready", "pid": os.getpid()}), flush=True)
sys.stdin.readline()
kids = []
for _ in range(3):
    kid = os.fork()
    if kid == 0:
        held = open("/etc/hostname")  # left open: a leak at the child's exit
        os._exit(0)
    kids.append(kid)
for kid in kids:
    os.waitpid(kid, 0)
print(json.dumps({"event": "done", "kids": kids}), flush=True)
"""


def test_attach_f_records_the_first_open_of_children_forked_at_once(nobody_dir):
    """A child's first stop can come before its parent's fork event: it must wait for that
    event instead of running unrecorded (its openat was lost in about 1 run of 4)."""
    program = nobody_dir / "forks_at_once.py"  # a file: a site in `<string>` is not reported
    program.write_text(FORKS_AT_ONCE)
    for attempt in range(5):
        target = Target([*NOBODY, TARGET_PYTHON, str(program)], nobody_dir)
        try:
            pid = target.expect("ready")["pid"]
            trace = trace_dir(nobody_dir, "forks")
            tracer = NobodyTracer(nobody_dir, "-p", str(pid), "-f", "--backend", "ptrace",
                                  "-o", str(trace))  # fmt: skip
            tracer.wait_attached()
            target.send("go")
            kids = target.expect("done")["kids"]
            assert tracer.wait() == 0, tracer.err.text()  # the target exits: so does cmtrace
        finally:
            target.kill()
        leaks = report_json(trace)["leaks"]
        assert sorted(leak["pid"] for leak in leaks) == sorted(kids), (attempt, leaks, kids)


# ---- -p -f: every existing descendant -------------------------------------------------------
# A tree that exists before the attach: root -> 2 children -> 1 grandchild each, every process
# with a second thread; every thread opens and closes /dev/null every 20 ms until the root is
# told to stop (it then waits for its tree: any process that failed makes it exit non-zero).
TREE_PROGRAM = r"""
import json, os, sys, threading, time

stop_file = sys.argv[1]
report_r, report_w = os.pipe()
PROCESSES = 5  # the root, 2 children, 2 grandchildren


def churn():
    while not os.path.exists(stop_file):
        os.close(os.open("/dev/null", os.O_RDONLY))
        time.sleep(0.02)


def node(depth):
    kids = []
    for _ in range({0: 2, 1: 1}.get(depth, 0)):  # fork before any thread starts
        kid = os.fork()
        if kid == 0:
            node(depth + 1)
        kids.append(kid)
    extra = threading.Thread(target=churn)
    extra.start()
    line = [os.getpid(), threading.get_native_id(), extra.native_id]
    os.write(report_w, (json.dumps(line) + "\n").encode())
    if depth == 0:
        with os.fdopen(report_r) as reports:
            tree = [json.loads(reports.readline()) for _ in range(PROCESSES)]
        threads = {pid: tids for pid, *tids in tree}
        print(json.dumps({"event": "ready", "pid": os.getpid(), "threads": threads}), flush=True)
    churn()
    extra.join()
    failed = sum(os.waitstatus_to_exitcode(os.waitpid(kid, 0)[1]) != 0 for kid in kids)
    if depth:
        os._exit(1 if failed else 0)
    print(json.dumps({"event": "done", "failed": failed}), flush=True)


node(0)
"""


def tracer_pid_of_task(pid: int, tid: str) -> int:
    for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
        if line.startswith("TracerPid:"):
            return int(line.split()[1])
    raise AssertionError(f"no TracerPid for task {tid} of {pid}")


def test_attach_f_traces_every_existing_descendant(nobody_dir):
    program = nobody_dir / "tree.py"
    program.write_text(TREE_PROGRAM)
    stop_file = nobody_dir / f"stop-{os.urandom(4).hex()}"
    target = Target([*NOBODY, TARGET_PYTHON, str(program), str(stop_file)], nobody_dir)
    try:
        ready = target.expect("ready")
        root, tids_of = ready["pid"], {int(pid): tids for pid, tids in ready["threads"].items()}
        assert set(procfs.descendants(root)) == set(tids_of), "the tree as /proc sees it"
        trace = trace_dir(nobody_dir, "tree")
        tracer = NobodyTracer(nobody_dir, "-p", str(root), "-f", "--backend", "ptrace",
                              "-o", str(trace))  # fmt: skip
        tracer.wait_attached()
        tracers = {(pid, tid): tracer_pid_of_task(pid, tid) for pid in tids_of
                   for tid in os.listdir(f"/proc/{pid}/task")}  # fmt: skip
        assert all(tracers.values()), f"untraced threads: {tracers}"
        engines = set(tracers.values())
        parents = {int(procfs.stat_fields(engine)[1]) for engine in engines}
        assert parents == {tracer.proc.pid}, "the tracers are cmtrace's engines"
        time.sleep(0.5)  # every thread opens /dev/null meanwhile
        tracer.proc.send_signal(signal.SIGINT)
        assert tracer.wait() == 0, tracer.err.text()
        for pid in tids_of:
            assert tracer_pid_of(pid) == 0, f"{pid} still traced after the detach"
        stop_file.write_text("")
        assert target.expect("done")["failed"] == 0
        assert target.finish() == 0
    finally:
        stop_file.write_text("")
        target.kill()
    events = read_events(trace)
    births = events[(events["op"] == "birth") & (events["path"] == "/dev/null")]
    for pid, tids in tids_of.items():
        seen = set(births[births["pid"] == pid]["tid"])
        assert set(tids) <= seen, f"pid {pid}: births from threads {seen}, threads {tids}"
    assert len(engines) in (1, len(tids_of)), engines  # one engine for all, or one per process
