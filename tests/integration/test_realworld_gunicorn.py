"""Real world: a pre-fork gunicorn whose WSGI app leaks through the standard library
(logging.FileHandler, subprocess.Popen, sqlite3.connect; tests/programs/services/wsgi_app.py),
traced the two ways a user would: `cmtrace -p MASTER -f` on a running server (its existing
workers included) and `cmtrace run -- gunicorn ...` from its start to a graceful SIGTERM.

Ground truth is the workers' own: every leaking route answers with the worker's pid and, where
the app knows it, the fd it left open; /proc/WORKER/fd, read while the server still runs, shows
each leaked log file, database and pipe.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import (
    Tracer,
    TracerResult,
    cmtrace_argv,
    proc_fds,
    report_json,
    wait_until,
)
from realworld import (
    SERVICE_PYTHON,
    SERVICES,
    START_TIMEOUT,
    free_port,
    http_get,
    marked_line,
    require_modules,
    stop_service,
    wait_for_health,
)

pytestmark = pytest.mark.usefixtures("bpf_ready", "backend")

APP = SERVICES / "wsgi_app.py"
WORKERS = 2
REQUESTS = ("log", "spawn", "db") * 3  # spread over the workers by the kernel's accept


@dataclass(frozen=True)
class Expected:
    """What the report should say of one route's leaks."""

    cause: str
    api: str
    fix_mentions: str  # a word only the API's own fix has
    closed_at_exit: frozenset[str]  # closed_by under run: what closed it as the worker ended


# The worker's leaks stay referenced from module globals (Popen, sqlite3) or from the logger
# (handlers): interpreter shutdown closes the former, atexit's logging.shutdown the latter.
AT_SHUTDOWN = frozenset({"interpreter-shutdown"})
EXPECTED = {
    "log": Expected("no-context-manager", "logging.FileHandler", "removeHandler",
                    frozenset({"atexit", "interpreter-shutdown"})),
    "spawn": Expected("no-context-manager", "subprocess.Popen", "wait()", AT_SHUTDOWN),
    "db": Expected("with-exited-without-close", "sqlite3.connect", "commit", AT_SHUTDOWN),
}  # fmt: skip
# Which of a worker's fds (/proc/PID/fd link) each route leaks; spawn's pipes are those the app
# reported (a worker has pipes of its own).
LEAKED_LINK = {"log": "requests.log", "db": "hits.sqlite"}


@dataclass
class Recording:
    mode: str  # "attach" (-p MASTER -f) or "run"
    report: dict
    answers: dict[str, list[dict]]  # route -> the JSON answers of its requests
    truth: dict[str, set[tuple[int, int]]]  # route -> (worker pid, fd) /proc shows leaked
    app_dir: Path

    def leaks_at(self, route: str) -> list[dict]:
        line = marked_line(APP, f"LEAK-SITE {route}")
        return [
            leak
            for leak in self.report["leaks"]
            if leak["site"] and (leak["site"]["file"], leak["site"]["line"]) == (str(APP), line)
        ]


def gunicorn_argv(port: int) -> list[str]:
    return [SERVICE_PYTHON, "-m", "gunicorn", "--workers", str(WORKERS),
            "--bind", f"127.0.0.1:{port}", "--chdir", str(SERVICES), "wsgi_app:app"]  # fmt: skip


def children_of(pid: int) -> set[int]:
    children: set[int] = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        text = Path(f"/proc/{pid}/task/{task}/children").read_text()
        children.update(int(child) for child in text.split())
    return children


def send_requests(base: str) -> dict[str, list[dict]]:
    answers: dict[str, list[dict]] = {route: [] for route in EXPECTED}
    for route in REQUESTS:
        status, answer = http_get(f"{base}/{route}")
        assert status == 200, (route, answer)
        answers[route].append(answer)
    return answers


def leaked_per_proc(app_dir: Path, answers: dict[str, list[dict]]) -> dict[str, set]:
    """route -> (pid, fd) of what it left open, from the workers' /proc/PID/fd."""
    workers = {answer["pid"] for route in answers.values() for answer in route}
    links = {pid: proc_fds(pid) for pid in workers}
    truth = {
        route: {(pid, fd) for pid in workers for fd, link in links[pid].items()
                if link == str(app_dir / name)}
        for route, name in LEAKED_LINK.items()
    }  # fmt: skip
    truth["spawn"] = {
        (answer["pid"], answer["fd"])
        for answer in answers["spawn"]
        if links[answer["pid"]].get(answer["fd"], "").startswith("pipe:")
    }
    return truth


def start_gunicorn(argv: list[str], app_dir: Path, log: Path) -> subprocess.Popen:
    with open(log, "w") as log_file:
        return subprocess.Popen(
            argv,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "APP_DIR": str(app_dir)},
            cwd=app_dir,
        )


def wait_for_workers(base: str, proc: subprocess.Popen, log: Path) -> int:
    """The master's pid, once it has all its workers."""
    master = int(wait_for_health(f"{base}/health", proc, log)["master"])
    wait_until(lambda: len(children_of(master)) == WORKERS, START_TIMEOUT, "gunicorn's workers")
    return master


@pytest.fixture(scope="module")
def attached(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Recording]:
    """gunicorn started untraced; `cmtrace -p MASTER -f`; requests; /proc; detach; SIGTERM."""
    require_modules("gunicorn")
    app_dir = tmp_path_factory.mktemp(f"gunicorn-attach-{backend}")
    port, log = free_port(), app_dir / "gunicorn.log"
    server = start_gunicorn(gunicorn_argv(port), app_dir, log)
    tracer = None
    try:
        base = f"http://127.0.0.1:{port}"
        master = wait_for_workers(base, server, log)
        assert master == server.pid
        tracer = Tracer(["-p", str(master), "-f", "-o", str(app_dir / "trace")], cwd=app_dir)
        assert tracer.wait_attached() == master
        answers = send_requests(base)
        truth = leaked_per_proc(app_dir, answers)
        tracer.stop().check()
        assert server.poll() is None, "detaching must leave gunicorn running"
        yield Recording("attach", report_json(app_dir / "trace"), answers, truth, app_dir)
    finally:
        if tracer:
            tracer.kill()
        stop_service(server, signal.SIGTERM)


@pytest.fixture(scope="module")
def ran(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Recording]:
    """`cmtrace run -- gunicorn ...`; requests; /proc; SIGTERM to the master; cmtrace ends with
    it (gunicorn's graceful stop: the workers run atexit and interpreter shutdown)."""
    require_modules("gunicorn")
    app_dir = tmp_path_factory.mktemp(f"gunicorn-run-{backend}")
    port, log = free_port(), app_dir / "gunicorn.log"
    trace = app_dir / "trace"
    recorder = start_gunicorn(cmtrace_argv("run", "-o", str(trace), "--", *gunicorn_argv(port)),
                              app_dir, log)  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        master = wait_for_workers(base, recorder, log)
        answers = send_requests(base)
        truth = leaked_per_proc(app_dir, answers)
        os.kill(master, signal.SIGTERM)  # graceful: cmtrace run then ends with gunicorn's status
        code = recorder.wait(timeout=120)
        TracerResult(code, "", log.read_text()).check()
        yield Recording("run", report_json(trace), answers, truth, app_dir)
    finally:
        stop_service(recorder, signal.SIGKILL)


@pytest.fixture(params=["attach", "run"])
def recording(request: pytest.FixtureRequest) -> Recording:
    return request.getfixturevalue({"attach": "attached", "run": "ran"}[request.param])


def by_mode_and_route(*marks: pytest.MarkDecorator) -> pytest.MarkDecorator:
    """Parametrize over (mode, route) with `marks` on each case."""
    cases = []
    for mode in ("attach", "run"):
        for route in EXPECTED:
            cases.append(pytest.param(mode, route, marks=list(marks), id=f"{mode}-{route}"))
    return pytest.mark.parametrize("mode,route", cases)


def test_ground_truth(recording: Recording) -> None:
    """The server did what the app says: one fd left open per leaking request, in the worker
    that answered (else the grading below would mean nothing)."""
    requested = Counter(REQUESTS)
    for route, answers in recording.answers.items():
        assert len(recording.truth[route]) == requested[route], (route, recording.truth)
        if route != "db":  # the app knows its handler's and its pipe's fd
            assert {(a["pid"], a["fd"]) for a in answers} == recording.truth[route]


@by_mode_and_route()
def test_every_leak_found(request: pytest.FixtureRequest, mode: str, route: str) -> None:
    """Each fd a route left open in a worker is one leak at the route's line, with the cause
    the program has; with -p they are open at the end, under run the workers' exit closed them."""
    recording: Recording = request.getfixturevalue({"attach": "attached", "run": "ran"}[mode])
    leaks = recording.leaks_at(route)
    assert sorted((leak["pid"], leak["fd"]) for leak in leaks) == sorted(recording.truth[route])
    assert {leak["cause"] for leak in leaks} == {EXPECTED[route].cause}, leaks
    closed_by = {leak["closed_by"] for leak in leaks}
    if mode == "attach":
        assert closed_by == {None}, leaks  # still open when the tracer detached
    else:
        assert closed_by <= EXPECTED[route].closed_at_exit, leaks


def test_no_other_leak_in_the_app(recording: Recording) -> None:
    """The app's only leaks are at its three leaking lines (gunicorn's own fds are not graded:
    its worker pipes live as long as the worker)."""
    lines = {marked_line(APP, f"LEAK-SITE {route}") for route in EXPECTED}
    in_app = [leak for leak in recording.report["leaks"]
              if leak["site"] and leak["site"]["file"] == str(APP)]  # fmt: skip
    assert {leak["site"]["line"] for leak in in_app} <= lines, in_app
    assert len(in_app) == sum(len(recording.leaks_at(route)) for route in EXPECTED)


@by_mode_and_route()
def test_api_and_fix(request: pytest.FixtureRequest, mode: str, route: str) -> None:
    """Each leak and its site name the standard-library API that opened the fd and its own fix."""
    recording: Recording = request.getfixturevalue({"attach": "attached", "run": "ran"}[mode])
    leaks = recording.leaks_at(route)
    assert leaks, f"no leak at the {route} line"
    for leak in leaks:
        assert leak["api"] == EXPECTED[route].api, leak
        assert EXPECTED[route].fix_mentions in leak["fix"], leak
    line = marked_line(APP, f"LEAK-SITE {route}")
    (site,) = [s for s in recording.report["sites"] if (s["file"], s["line"]) == (str(APP), line)]
    assert site["api"] == EXPECTED[route].api, site
