"""Helpers of the real-world tests (test_realworld_*.py): services started from the venv that
the set-up installs requirements/services.txt into, spoken to over HTTP on loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import CMTRACE_PYTHON, REPO, wait_until

SERVICES = REPO / "tests" / "programs" / "services"
# The venv's interpreter is Debian's 3.11 with requirements/services.txt installed (set-up).
SERVICE_PYTHON = os.environ.get("CMTRACE_SERVICE_PYTHON", CMTRACE_PYTHON)
START_TIMEOUT = 60


def require_modules(*modules: str) -> None:
    """Skip, saying how to install them, when the service interpreter lacks `modules`."""
    probe = subprocess.run(
        [SERVICE_PYTHON, "-c", f"import {', '.join(modules)}"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        pytest.skip(f"services missing: run scripts/setup.sh ({probe.stderr.strip()})")


def marked_line(program: Path, marker: str) -> int:
    """The line that ends with the comment `# MARKER`."""
    for number, line in enumerate(program.read_text().splitlines(), start=1):
        if line.rstrip().endswith(f"# {marker}"):
            return number
    raise AssertionError(f"{program} has no {marker} marker")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def http_get(url: str) -> tuple[int, dict]:
    """Status and JSON body of a GET (errors such as 404 included)."""
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


def wait_for_health(url: str, proc: subprocess.Popen, log: Path) -> dict:
    """The first answer of `url` (a JSON object), waiting for the service to listen; fails at
    once if the service exits."""
    answer: dict = {}

    def healthy() -> bool:
        assert proc.poll() is None, f"service exited {proc.returncode}:\n{log.read_text()}"
        try:
            answer.update(http_get(url)[1])
        except OSError:
            return False
        return True

    wait_until(healthy, START_TIMEOUT, f"{url} to answer", interval=0.2)
    return answer


def stop_service(proc: subprocess.Popen, sig: int, timeout: float = 30) -> int | None:
    """Send `sig`, wait for the exit status; a service still running after `timeout` is killed
    (None)."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)
        return None
