"""Bad input: each case gets a one-line error on stderr that says what to do, its exit code
(DESIGN.md: 1 usage, 2 environment, 4 target, 5 trace unreadable), and nothing already recorded
is lost. Environments are really broken (dropped capabilities, an interpreter without bcc,
headers or tracefs hidden in a private mount namespace, a full tmpfs), never imitated."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
import venv
from pathlib import Path

import pytest
from conftest import (
    CMTRACE_PYTHON,
    Target,
    assert_complete_and_lossless,
    cmtrace_argv,
    error_line,
    fdops,
    read_events,
    read_meta,
    run_cmtrace,
    wait_until,
)

EXIT_USAGE, EXIT_ENVIRONMENT, EXIT_TARGET, EXIT_TRACE = 1, 2, 4, 5


@pytest.fixture
def sleeper():
    """A live process to point cmtrace at."""
    proc = subprocess.Popen(["sleep", "600"])
    yield proc.pid
    proc.kill()
    proc.wait()


def unused_pid() -> int:
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    for pid in range(pid_max - 1, 1, -1):
        if not os.path.exists(f"/proc/{pid}"):
            return pid
    raise AssertionError("no free pid")


# --- target ----------------------------------------------------------------------------------------
def test_no_such_pid(tmp_path):
    pid = unused_pid()
    result = run_cmtrace("-p", str(pid), "-o", str(tmp_path / "t"))
    assert result.returncode == EXIT_TARGET, result.stderr
    assert str(pid) in error_line(result)
    assert not (tmp_path / "t").exists(), "nothing is created for a target that does not exist"


def test_kernel_thread():
    assert Path("/proc/2/comm").read_text().strip() == "kthreadd"
    result = run_cmtrace("-p", "2", "-o", "/tmp/cmtrace-never-created")
    assert result.returncode == EXIT_TARGET, result.stderr
    assert "kernel" in error_line(result).lower()


def test_zombie():
    child = subprocess.Popen(["true"])
    try:
        wait_until(
            lambda: Path(f"/proc/{child.pid}/stat").read_text().split()[2] == "Z", 30, "zombie"
        )
        result = run_cmtrace("-p", str(child.pid), "-o", "/tmp/cmtrace-never-created")
        assert result.returncode == EXIT_TARGET, result.stderr
        error_line(result)
    finally:
        child.wait()


# --- usage ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv",
    [["-p", "not-a-number"], ["run"], ["run", "--", "/no/such/program"], ["--no-such-option"]],
    ids=["pid-not-a-number", "run-without-command", "run-missing-program", "unknown-option"],
)
def test_usage_errors(argv):
    result = run_cmtrace(*argv)
    assert result.returncode == EXIT_USAGE, result.stderr
    assert result.stderr.strip(), "a usage error says what is wrong"


def test_output_dir_holding_something_else_is_refused(tmp_path, sleeper):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    result = run_cmtrace("-p", str(sleeper), "-o", str(out))
    assert result.returncode == EXIT_USAGE, result.stderr
    assert "-o" in error_line(result)
    assert os.listdir(out) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine\n"
    a_file = tmp_path / "plain-file"
    a_file.write_text("x")
    result = run_cmtrace("-p", str(sleeper), "-o", str(a_file))
    assert result.returncode == EXIT_USAGE and a_file.read_text() == "x"
    error_line(result)


def in_private_mounts(shell: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run a shell script in a private mount namespace: its mounts vanish with it."""
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", shell],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def cmtrace_shell(*args: str) -> str:
    return shlex.join(cmtrace_argv(*args))


def test_output_dir_not_writable(tmp_path, sleeper):
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    script = (
        f"mount --bind {readonly} {readonly} && mount -o remount,bind,ro {readonly} && "
        + cmtrace_shell("-p", str(sleeper), "-o", str(readonly / "trace"))
    )
    result = in_private_mounts(script)
    assert result.returncode == EXIT_USAGE, result.stderr
    assert "writable" in error_line(result)


def test_output_dir_this_user_cannot_reach(tmp_path):
    """A parent nobody may not search: stat() itself fails, still one line and exit 1."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    result = run_cmtrace(
        "run", "--backend", "ptrace", "-o", str(private / "trace"), "--", "true",
        prefix=("runuser", "-u", "nobody", "--"), cwd="/",
    )  # fmt: skip
    assert result.returncode == EXIT_USAGE, result.stderr
    assert "writable" in error_line(result)
    assert "Traceback" not in result.stderr


# --- environment -----------------------------------------------------------------------------------
@pytest.mark.usefixtures("bpf_ready")
def test_not_root(shared_dir, sleeper):
    result = run_cmtrace(
        "-p", str(sleeper), "-o", str(shared_dir / "t"),
        prefix=("runuser", "-u", "nobody", "--"), cwd="/",
    )  # fmt: skip
    assert result.returncode == EXIT_ENVIRONMENT, result.stderr
    assert "sudo" in error_line(result) or "root" in error_line(result)


@pytest.mark.usefixtures("bpf_ready")
def test_bpf_not_permitted(tmp_path, sleeper):
    """root without capabilities (as in an unprivileged container): the load is refused."""
    drop = ("setpriv", "--inh-caps=-all", "--bounding-set=-all", "--")
    result = run_cmtrace("-p", str(sleeper), "-o", str(tmp_path / "t"), prefix=drop)
    assert result.returncode == EXIT_ENVIRONMENT, result.stderr
    line = error_line(result)
    assert "BPF" in line or "permi" in line, line


@pytest.fixture(scope="module")
def python_without_bcc(tmp_path_factory) -> str:
    """Debian's interpreter in a venv that does not see the system's dist-packages (where bcc
    lives) but does see the project's venv (pyarrow, pandas, cmtrace itself)."""
    home = tmp_path_factory.mktemp("nobcc")
    venv.EnvBuilder(system_site_packages=False, with_pip=False).create(home)
    python = home / "bin" / "python"
    project_site = subprocess.run(
        [CMTRACE_PYTHON, "-c", "import pyarrow, os; print(os.path.dirname(pyarrow.__path__[0]))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    Path(site, "project-venv.pth").write_text(f"import site; site.addsitedir({project_site!r})\n")
    check = subprocess.run([str(python), "-c", "import bcc"], capture_output=True)
    assert check.returncode != 0, "the bcc-less interpreter must not import bcc"
    return str(python)


@pytest.mark.usefixtures("bpf_ready")
def test_bcc_missing(tmp_path, sleeper, python_without_bcc):
    """--backend bpf without bcc: exit 2 naming bcc; auto falls back to ptrace and says why."""
    command = [python_without_bcc, "-m", "cmtrace", "-p", str(sleeper)]
    result = subprocess.run(
        [*command, "--backend", "bpf", "-o", str(tmp_path / "t")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == EXIT_ENVIRONMENT, result.stderr
    assert "bcc" in error_line(result).lower()
    trace = tmp_path / "auto"
    result = subprocess.run(
        [*command, "--duration", "1", "-o", str(trace)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "backend ptrace: bcc missing" in result.stderr, result.stderr
    assert_complete_and_lossless(trace, result.stdout)


@pytest.mark.usefixtures("bpf_ready")
def test_kernel_headers_missing(tmp_path, sleeper):
    modules = f"/lib/modules/{os.uname().release}"
    empty = tmp_path / "empty"
    empty.mkdir()
    trace = tmp_path / "t"
    script = f"mount --bind {empty} {modules} && " + cmtrace_shell(
        "-p", str(sleeper), "-o", str(trace), "--duration", "1"
    )
    result = in_private_mounts(script)
    if result.returncode == 0:  # bcc found headers elsewhere: then the trace must be whole
        assert_complete_and_lossless(trace, result.stdout)
        return
    assert result.returncode == EXIT_ENVIRONMENT, result.stderr
    assert "header" in error_line(result).lower()


@pytest.mark.vm
@pytest.mark.usefixtures("bpf_ready")
def test_tracefs_unmounted_is_mounted_or_explained(tmp_path, sleeper):
    trace = tmp_path / "t"
    script = (
        "umount /sys/kernel/tracing 2>/dev/null; umount /sys/kernel/debug/tracing 2>/dev/null; "
        "test ! -d /sys/kernel/tracing/events && "
        + cmtrace_shell("-p", str(sleeper), "-o", str(trace), "--duration", "1")
    )
    result = in_private_mounts(script)
    if result.returncode == 0:  # cmtrace mounted it itself
        assert_complete_and_lossless(trace, result.stdout)
    else:
        assert result.returncode == EXIT_ENVIRONMENT, result.stderr
        assert "mount -t tracefs" in error_line(result)
    assert Path("/sys/kernel/tracing/events").is_dir(), "the host's tracefs is untouched"


# --- existing traces ---------------------------------------------------------------------------------
@pytest.mark.vm
@pytest.mark.usefixtures("bpf_ready")
def test_existing_trace_is_kept_unless_forced(tmp_path, sleeper):
    trace = tmp_path / "t"
    first = run_cmtrace("-p", str(sleeper), "-o", str(trace), "--duration", "0.5")
    assert first.returncode == 0, first.stderr
    meta_before = read_meta(trace)
    again = run_cmtrace("-p", str(sleeper), "-o", str(trace), "--duration", "0.5")
    assert again.returncode == EXIT_USAGE, again.stderr
    assert "--force" in error_line(again)
    assert read_meta(trace) == meta_before, "the refused run must not touch the trace"
    forced = run_cmtrace("-p", str(sleeper), "-o", str(trace), "--duration", "0.5", "--force")
    assert forced.returncode == 0, forced.stderr
    assert read_meta(trace)["start_wall"] != meta_before["start_wall"]
    assert_complete_and_lossless(trace, forced.stdout)


@pytest.mark.vm
@pytest.mark.usefixtures("bpf_ready")
def test_disk_full_while_recording(tmp_path):
    """A 512 KiB tmpfs fills up under a target that opens files with long random names: the
    tracer stops with a clear error, and the parts already written stay readable."""
    target = Target(fdops("noisy", tmp_path), tmp_path)
    copy = tmp_path / "copy"
    try:
        target.expect("ready")
        small = tmp_path / "small"
        small.mkdir()
        recorder = cmtrace_shell("-p", str(target.pid), "-o", str(small / "t"), "--duration", "60")
        script = (
            f"mount -t tmpfs -o size=512k tmpfs {small} && {{ {recorder}; rc=$?; "
            f"cp -a {small}/t {copy}; exit $rc; }}"
        )
        started = time.monotonic()
        result = in_private_mounts(script, timeout=240)
    finally:
        target.kill()
    assert result.returncode not in (0, None), result.stdout + result.stderr
    assert time.monotonic() - started < 200, "the tracer stops when the disk is full"
    lines = [line for line in result.stderr.splitlines() if line.startswith("cmtrace: error")]
    assert len(lines) == 1 and ("full" in lines[0] or "space" in lines[0]), result.stderr
    events = read_events(copy)
    assert len(events[events.pid == target.pid]) > 0, "what was written before is readable"
    meta = json.loads((copy / "meta.json").read_text())
    assert meta["status"] in ("recording", "interrupted", "complete")


# --- report on what is not a trace -------------------------------------------------------------------
def corrupt_trace(path: Path, how: str) -> Path:
    path.mkdir()
    if how == "missing":
        path.rmdir()
    elif how == "bad-meta":
        (path / "meta.json").write_text("{not json")
        (path / "events").mkdir()
    elif how == "bad-part":
        (path / "meta.json").write_text(json.dumps({"schema": 1, "status": "complete"}))
        (path / "events").mkdir()
        (path / "events" / "part-000000.parquet").write_bytes(b"PAR1 this is no parquet")
    return path


@pytest.mark.parametrize("how", ["missing", "empty", "bad-meta", "bad-part"])
def test_report_on_missing_or_corrupt_trace(tmp_path, how):
    trace = corrupt_trace(tmp_path / "t", how)
    result = run_cmtrace("report", str(trace), "--format", "json")
    assert result.returncode == EXIT_TRACE, result.stderr
    assert result.stdout == ""
    assert str(trace) in error_line(result) or "trace" in error_line(result)
