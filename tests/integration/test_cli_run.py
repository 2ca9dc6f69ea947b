"""`cmtrace run -- CMD`: stdio passes through, the exit status is the child's, the child's very
first openat is traced, non-CPython programs are traced, and under sudo the child runs as the
requesting user, who owns the 0600 trace."""

from __future__ import annotations

import json
import os
import pwd
import re
import signal
import stat
import subprocess
import textwrap
from pathlib import Path

import pytest
from conftest import (
    CMTRACE_PYTHON,
    FDPROGRAMS,
    TARGET_PYTHON,
    LineReader,
    assert_complete_and_lossless,
    cmtrace_argv,
    leaks_of,
    read_events,
    report_json,
    run_cmtrace,
)

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("bpf_ready", "backend")]

TEST_USER = "cmtrace-test"
NO_PYTHON = re.compile(r"no python", re.IGNORECASE)
DEFAULT_OUTPUT = re.compile(r"cmtrace-\d+-\d{8}-\d{6}")  # ./cmtrace-PID-YYYYmmdd-HHMMSS

ECHO_AND_LEAK = textwrap.dedent(
    """
    import json, os, sys
    data = sys.stdin.read()
    with open("/proc/self/comm") as f:
        comm = f.read().strip()
    leaked = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o600)
    print(json.dumps({"pid": os.getpid(), "upper": data.upper(), "fd": leaked, "comm": comm}),
          flush=True)
    print("marker-on-stderr", file=sys.stderr, flush=True)
    os._exit(7)
    """
)


def assert_private(trace: Path, uid: int) -> None:
    """Every file of the trace is 0600 and every directory 0700, owned by `uid`."""
    entries = [trace, *trace.rglob("*")]
    assert len(entries) > 3
    for entry in entries:
        info = entry.lstat()
        assert info.st_uid == uid, f"{entry} is owned by {info.st_uid}, not {uid}"
        mode = stat.S_IMODE(info.st_mode)
        want = 0o700 if entry.is_dir() else 0o600
        assert mode == want, f"{entry} has mode {oct(mode)}, want {oct(want)}"


def test_run_passes_stdio_through_and_returns_the_child_status(workdir):
    trace, leaked = workdir / "trace", workdir / "leaked.txt"
    result = run_cmtrace(
        "run", "-o", str(trace), "--", TARGET_PYTHON, "-c", ECHO_AND_LEAK, str(leaked),
        input="hello through cmtrace\n",
    )  # fmt: skip
    assert result.returncode == 7, result.stderr
    child = json.loads(result.stdout.splitlines()[0])
    assert child["upper"] == "HELLO THROUGH CMTRACE\n"
    assert "marker-on-stderr" in result.stderr
    assert_complete_and_lossless(trace, result.stderr)  # the summary goes to stderr
    assert_private(trace, os.geteuid())
    meta = json.loads((trace / "meta.json").read_text())
    assert [t["comm"] for t in meta["targets"]] == [child["comm"]], "the command's, not cmtrace's"

    events = read_events(trace)
    mine = events[events.pid == child["pid"]]
    opens = mine[mine.syscall == "openat"]
    assert opens.iloc[0].path == "/etc/ld.so.cache", "the dynamic loader's first openat is seen"
    leaks = leaks_of(report_json(trace), child["pid"])
    assert [(x["fd"], x["path"], x["closed_by"]) for x in leaks] == [
        (child["fd"], str(leaked), "process-exit")
    ]


def test_run_returns_128_plus_signal_and_traces_a_shell(workdir):
    """A child killed by SIGTERM gives 143; /bin/sh is no CPython and is traced all the same."""
    held = workdir / "held.txt"
    script = f"exec 3>{held}; kill -TERM $$"
    result = run_cmtrace("run", "--", "/bin/sh", "-c", script, cwd=workdir)  # no -o
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    (trace,) = [p for p in workdir.iterdir() if DEFAULT_OUTPUT.fullmatch(p.name)]
    assert_complete_and_lossless(trace, result.stderr)
    assert NO_PYTHON.search(result.stderr), (
        f"summary must say there are no Python stacks:\n{result.stderr}"
    )
    events = read_events(trace)
    shell_births = events[(events.op == "birth") & (events.path == str(held))]
    assert len(shell_births) == 1
    (pid,) = set(shell_births.pid)
    leaks = leaks_of(report_json(trace), pid)
    assert any(x["path"] == str(held) and x["closed_by"] == "process-exit" for x in leaks)


def test_run_traces_a_c_program(workdir):
    binary = workdir / "leaky"
    compiled = subprocess.run(
        ["gcc", "-O2", "-o", str(binary), str(FDPROGRAMS / "leaky.c")],
        capture_output=True,
        text=True,
    )
    assert compiled.returncode == 0, compiled.stderr
    files = [str(workdir / "a.out.txt"), str(workdir / "b.out.txt")]
    trace = workdir / "trace"
    result = run_cmtrace("run", "--fail-on-leak", "-o", str(trace), "--", str(binary), *files)
    assert result.returncode == 3, "the program exits 0 but leaks: --fail-on-leak exits 3"
    truth = {line.split()[1]: int(line.split()[0]) for line in result.stdout.splitlines()}
    assert set(truth) == set(files)
    assert_complete_and_lossless(trace, result.stderr)
    assert NO_PYTHON.search(result.stderr), result.stderr
    events = read_events(trace)
    births = events[(events.op == "birth") & events.path.isin(files)]
    (pid,) = set(births.pid)
    assert dict(zip(births.path, births.fd)) == truth
    leaks = leaks_of(report_json(trace), pid)
    assert {x["path"]: x["fd"] for x in leaks} == truth
    assert {x["closed_by"] for x in leaks} == {"process-exit"}
    assert run_cmtrace("report", str(trace)).returncode == 0
    assert run_cmtrace("report", "--fail-on-leak", str(trace)).returncode == 3


def test_run_forwards_sigint_and_records_until_the_child_exits(workdir):
    trace, late = workdir / "trace", workdir / "opened-after-sigint.txt"
    child_code = textwrap.dedent(
        f"""
        import os, signal, sys
        def on_int(*_):
            fd = os.open({str(late)!r}, os.O_WRONLY | os.O_CREAT, 0o600)
            os.close(fd)
            sys.exit(0)
        signal.signal(signal.SIGINT, on_int)
        print("ready", os.getpid(), flush=True)
        while True:
            signal.pause()
        """
    )
    proc = subprocess.Popen(
        cmtrace_argv("run", "-o", str(trace), "--", TARGET_PYTHON, "-c", child_code),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = LineReader(proc.stdout), LineReader(proc.stderr)
    try:
        out.wait_for(lambda line: line.startswith("ready"), 120, "the child's ready line")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0, err.text()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert_complete_and_lossless(trace, err.text())
    events = read_events(trace)
    assert len(events[(events.op == "birth") & (events.path == str(late))]) == 1


@pytest.fixture(scope="module")
def test_user() -> pwd.struct_passwd:
    """An unprivileged account to play $SUDO_USER (created once, left for later runs)."""
    try:
        return pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", TEST_USER],
            check=True,
        )
        return pwd.getpwnam(TEST_USER)


def test_run_under_sudo_runs_the_child_as_the_user_who_owns_the_trace(shared_dir, test_user):
    trace = shared_dir / "trace"
    sudo_env = dict(
        os.environ,
        SUDO_USER=test_user.pw_name,
        SUDO_UID=str(test_user.pw_uid),
        SUDO_GID=str(test_user.pw_gid),
    )  # what sudo sets for the command it runs as root
    code = "import json, os; print(json.dumps([os.getuid(), os.getgid()]))"
    result = run_cmtrace("run", "-o", str(trace), "--", TARGET_PYTHON, "-c", code, env=sudo_env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [test_user.pw_uid, test_user.pw_gid]
    assert_complete_and_lossless(trace, result.stderr)
    assert_private(trace, test_user.pw_uid)
    # the user can analyse the trace without root
    as_user = subprocess.run(
        ["runuser", "-u", test_user.pw_name, "--", CMTRACE_PYTHON, "-c",
         "import pandas, sys; print(len(pandas.read_parquet(sys.argv[1] + '/events')))",
         str(trace)],
        capture_output=True, text=True, timeout=120, cwd="/",
    )  # fmt: skip
    assert as_user.returncode == 0, as_user.stderr
    assert int(as_user.stdout) > 0


def test_run_follows_vfork_and_posix_spawn_children(workdir):
    """subprocess (vfork) and os.posix_spawn (clone3/CLONE_VFORK in glibc) children are followed
    from their first syscall: the programs they exec are traced under their own pids."""
    first, second = workdir / "first.txt", workdir / "second.txt"
    for path in (first, second):
        path.write_text("x\n")
    code = textwrap.dedent(
        f"""
        import json, os, subprocess
        a = subprocess.Popen(["/bin/cat", {str(first)!r}], stdout=subprocess.DEVNULL)
        b = os.posix_spawn("/bin/cat", ["cat", {str(second)!r}], dict(os.environ))
        a.wait(); os.waitpid(b, 0)
        print(json.dumps({{"parent": os.getpid(), "children": [a.pid, b]}}))
        """
    )
    trace = workdir / "trace"
    result = run_cmtrace("run", "-o", str(trace), "--", TARGET_PYTHON, "-c", code)
    assert result.returncode == 0, result.stderr
    truth = json.loads(result.stdout.splitlines()[-1])
    assert_complete_and_lossless(trace, result.stderr)
    events = read_events(trace)
    forks = events[(events.pid == truth["parent"]) & (events.op == "fork")]
    assert set(truth["children"]) <= set(forks.arg)
    for child, path in zip(truth["children"], (first, second)):
        mine = events[events.pid == child]
        assert list(mine[mine.op == "exec"].path) == ["/bin/cat"], mine
        opened = mine[(mine.op == "birth") & (mine.path == str(path))]
        assert len(opened) == 1, f"cat {path} (pid {child}) not traced"
        born = opened.iloc[0]
        later_closes = mine[(mine.op == "close") & (mine.fd == born.fd) & (mine.t_ns > born.t_ns)]
        assert len(later_closes) >= 1, "cat's close of the file is traced"
