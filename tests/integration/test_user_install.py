"""An ordinary user installs cmtrace without root and records with the ptrace backend.

As nobody (no capabilities): a virtualenv of Debian's python3, `pip install` of a copy of this
checkout (the tracked files only, as a clone would have them), which must build the ptrace
engine into the installed package with the C compiler alone; then `cmtrace run` of a one-liner
that leaks an fd. The run-time dependencies come from the set-up's virtualenv through a .pth file
(`--no-deps`); pip's isolated build environment takes setuptools from PyPI, as any user's
install does."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import CMTRACE_PYTHON, REPO
from targets import AS_NOBODY

SYSTEM_PYTHON = "/usr/bin/python3"
LEAK = "import os; os.open('/etc/hostname', os.O_RDONLY)"


def as_nobody(*command: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = f"HOME={cwd}", f"XDG_CACHE_HOME={cwd}/cache", "PATH=/usr/bin:/bin"
    return subprocess.run(
        [*AS_NOBODY, "env", "-i", *env, *command],
        cwd=cwd, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


@pytest.fixture(scope="module")
def home() -> Path:
    where = Path(tempfile.mkdtemp(prefix="cmtrace-user-install-"))
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in filter(None, tracked):
        source = REPO / name.decode()
        if source.is_file():
            dest = where / "src" / name.decode()
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest)
    subprocess.run(["chown", "-R", "nobody:nogroup", str(where)], check=True)
    yield where
    shutil.rmtree(where, ignore_errors=True)


def project_site_packages() -> str:
    return subprocess.run(
        [CMTRACE_PYTHON, "-c", "import pyarrow, os; print(os.path.dirname(pyarrow.__path__[0]))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip


def test_pip_install_builds_the_engine_and_run_records_with_ptrace(home: Path) -> None:
    venv = home / "venv"
    made = as_nobody(SYSTEM_PYTHON, "-m", "venv", str(venv), cwd=home)
    assert made.returncode == 0, made.stderr
    purelib = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    pth = f"import site; site.addsitedir({project_site_packages()!r})\n"
    Path(purelib, "deps.pth").write_text(pth)
    pip = (str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps")
    installed = as_nobody(*pip, str(home / "src"), cwd=home)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    engine = Path(purelib, "cmtrace", "record", "ptrace", "cmtrace-ptrace-engine")
    assert engine.is_file() and engine.stat().st_mode & 0o111, "the engine is built at install"

    trace = home / "trace"
    done = as_nobody(
        str(venv / "bin" / "cmtrace"), "run", "-o", str(trace), "--", SYSTEM_PYTHON, "-c", LEAK,
        cwd=home,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "backend ptrace: not root" in done.stderr, done.stderr
    meta = json.loads((trace / "meta.json").read_text())
    assert (meta["status"], meta["backend"], meta["lost_events"]) == ("complete", "ptrace", 0)
    report = as_nobody(
        str(venv / "bin" / "cmtrace"), "report", "--format", "json", str(trace), cwd=home
    )
    assert report.returncode == 0, report.stderr
    leaks = json.loads(report.stdout)["leaks"]
    opened = [leak for leak in leaks if leak["path"] == "/etc/hostname"]
    assert len(opened) == 1, leaks
    site = opened[0]["site"]  # a python -c program: <string>#DIGEST of its captured text
    assert site["file"].startswith("<string>") and site["line"] == 1, opened
