"""`pytest --cmtrace`: which test leaked an fd, the line that opened it, and why.

Inert unless --cmtrace is given. Then the pytest the user started (the parent) runs nothing
itself: it re-executes the same pytest under `cmtrace run` (launcher.py), so the recorder is
outside the recorded process, and afterwards attributes every fd of the trace to the test or
fixture whose window held its birth (attribution.py) and prints the "file descriptor leaks"
section (results.py). The re-executed pytest (the child, MARKS_ENV set; xdist workers inherit
it) marks every phase boundary (boundaries.py) and, with --cmtrace-fail, fails a leaking test at
its teardown from an in-process /proc/self/fd diff.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest

from cmtrace.pytest_plugin.boundaries import (
    BEGIN,
    END,
    MARKS_ENV,
    TRACE_ENV,
    FdLedger,
    Marks,
    open_fds,
)

BACKENDS = ("auto", "bpf", "ptrace")
LEAK_FAILED = "cmtrace_leak_failed"  # user property of a teardown report failed for its fds
PHASES = ("setup", "call", "teardown")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("cmtrace", "file descriptor leaks per test (cmtrace)")
    group.addoption("--cmtrace", action="store_true", help="record the session, report fd leaks")
    group.addoption(
        "--cmtrace-backend",
        choices=BACKENDS,
        default="auto",
        help="recorder backend (default auto: BPF when permitted, else ptrace)",
    )
    group.addoption("--cmtrace-json", metavar="FILE", help="write the fd leaks per test as JSON")
    group.addoption("--cmtrace-trace", metavar="DIR", help="keep the trace for `cmtrace report`")
    group.addoption("--cmtrace-fail", action="store_true", help="fail every test that leaks an fd")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "cmtrace(allow=N, skip=False): tolerate N leaked fds in this test (pytest --cmtrace), "
        "or do not check it at all",
    )
    if config.getoption("cmtrace") and os.environ.get(MARKS_ENV):
        worker = os.environ.get("PYTEST_XDIST_WORKER")
        config.pluginmanager.register(RecordedSession(config, worker), "cmtrace-recorded")


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> int | None:
    """The parent: run the session under the recorder instead, then report."""
    if not config.getoption("cmtrace") or os.environ.get(MARKS_ENV):
        return None
    if any(config.getoption(name, None) for name in ("help", "version", "collectonly")):
        return None
    from cmtrace.pytest_plugin.launcher import record_session  # noqa: PLC0415 (only here)

    return record_session(config)


@pytest.hookimpl(tryfirst=True)
def pytest_report_teststatus(report: pytest.TestReport, config: pytest.Config):
    """A test failed for its fds shows L / FD LEAK and counts as failed (xdist's controller
    sees the user property the worker set)."""
    if report.when == "teardown" and report.failed and leak_failed(report):
        return "failed", "L", ("FD LEAK", {"red": True})
    return None


def leak_failed(report: pytest.TestReport) -> bool:
    return any(name == LEAK_FAILED for name, _ in report.user_properties)


def marker_options(item: pytest.Item) -> tuple[int, bool]:
    """(allow, skip) of the test's @pytest.mark.cmtrace."""
    marker = item.get_closest_marker("cmtrace")
    if marker is None:
        return 0, False
    allow = marker.kwargs.get("allow", marker.args[0] if marker.args else 0)
    return int(allow or 0), bool(marker.kwargs.get("skip", False))


class RecordedSession:
    """The child's hooks: boundary marks around every phase and fixture, and the verdict."""

    def __init__(self, config: pytest.Config, worker: str | None):
        self.fail = bool(config.getoption("cmtrace_fail"))
        self.marks = Marks(os.environ[MARKS_ENV], worker)
        self.ledger = FdLedger()
        self.instances = 0
        self.before: dict[str, dict] = {}  # nodeid -> its fds before setup
        self.reports: dict[str, list[pytest.TestReport]] = {}

    # --- test phases ----------------------------------------------------------------------
    @pytest.hookimpl(hookwrapper=True, tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> Generator[None, Any, None]:
        self.before[item.nodeid] = open_fds()
        item.stash[_FIRST_MARK] = self.marks.mark(
            BEGIN, kind="phase", nodeid=item.nodeid, phase="setup"
        )
        yield
        self.marks.mark(END, kind="phase", nodeid=item.nodeid, phase="setup")

    @pytest.hookimpl(hookwrapper=True, tryfirst=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Generator[None, Any, None]:
        self.marks.mark(BEGIN, kind="phase", nodeid=item.nodeid, phase="call")
        yield
        self.marks.mark(END, kind="phase", nodeid=item.nodeid, phase="call")

    @pytest.hookimpl(hookwrapper=True, tryfirst=True)
    def pytest_runtest_teardown(self, item: pytest.Item) -> Generator[None, Any, None]:
        self.marks.mark(BEGIN, kind="phase", nodeid=item.nodeid, phase="teardown")
        yield
        before = self.before.pop(item.nodeid, None)
        leaked = self.ledger.new_since(before) if before is not None else {}
        item.stash[_LEAKED] = leaked
        item.stash[_LAST_MARK] = self.marks.mark(
            END, kind="phase", nodeid=item.nodeid, phase="teardown"
        )

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call) -> Generator[None, Any, None]:
        outcome = yield
        report: pytest.TestReport = outcome.get_result()
        if report.when == "teardown":
            self._judge(item, report)
        self.reports.setdefault(item.nodeid, []).append(report)
        if report.when == "teardown":
            self._write_outcome(item)

    def _judge(self, item: pytest.Item, report: pytest.TestReport) -> None:
        """--cmtrace-fail: a test with more leaked fds than its marker allows fails here."""
        allow, skip = marker_options(item)
        leaked = item.stash.get(_LEAKED, {})
        if not self.fail or skip or len(leaked) <= allow:
            return
        text = self._failure_text(item, leaked, allow)
        if report.passed:
            report.outcome = "failed"
            report.longrepr = text
        else:  # the teardown failed anyway: its error first, then the fds
            report.sections.append(("cmtrace fd leaks", text))
        report.user_properties.append((LEAK_FAILED, True))

    def _failure_text(self, item: pytest.Item, leaked: dict, allow: int) -> str:
        """The fds, each with its opening line, cause and fix once the recorder has written
        the test's end marker (see live.py)."""
        explained = self._explain(item, {fd for fd, _, _ in leaked})
        lines = [f"{item.nodeid} leaked {len(leaked)} file descriptor(s) (allowed: {allow}):"]
        for (fd, _, _), target in sorted(leaked.items()):
            lines.append(f"  fd {fd}: {target}")
            lines.extend(f"      {line}" for line in explained.get(fd, []))
        if len(explained) < len(leaked):
            lines.append("  (the file descriptor leaks section after the session explains them)")
        return "\n".join(lines)

    def _explain(self, item: pytest.Item, fds: set[int]) -> dict[int, list[str]]:
        trace = os.environ.get(TRACE_ENV)
        if not trace or _FIRST_MARK not in item.stash or _LAST_MARK not in item.stash:
            return {}
        from cmtrace.pytest_plugin.live import explain  # noqa: PLC0415 (pyarrow, pandas)

        try:
            return explain(
                trace, self.marks.pid, fds, item.stash[_FIRST_MARK], item.stash[_LAST_MARK]
            )
        except Exception:  # noqa: BLE001 - an explanation must never break the session
            return {}

    def _write_outcome(self, item: pytest.Item) -> None:
        allow, skip = marker_options(item)
        reports = self.reports.pop(item.nodeid, [])
        self.marks.write(
            {
                "record": "test",
                "pid": self.marks.pid,
                "worker": self.marks.worker,
                "nodeid": item.nodeid,
                "outcome": final_outcome(reports),
                "allow": allow,
                "skip": skip,
                "leaked_in_process": len(item.stash.get(_LEAKED, {})),
            }
        )

    # --- fixtures -------------------------------------------------------------------------
    @pytest.hookimpl(hookwrapper=True, tryfirst=True)
    def pytest_fixture_setup(self, fixturedef, request) -> Generator[None, Any, None]:
        self.instances += 1
        window = {
            "kind": "fixture",
            "fixture": fixturedef.argname,
            "scope": fixturedef.scope,
            "instance": self.instances,
            "nodeid": getattr(request.node, "nodeid", None),
        }
        wider = fixturedef.scope != "function"
        before = open_fds() if wider else None
        # Finalizers run last-in first-out: this one, added before the fixture's own teardown,
        # runs after it; the one added after setup runs before it.
        fixturedef.addfinalizer(lambda: self.marks.mark(END, **window, phase="teardown"))
        self.marks.mark(BEGIN, **window, phase="setup")
        yield
        if before is not None:
            self.ledger.claim_for_fixture(before)
        self.marks.mark(END, **window, phase="setup")
        fixturedef.addfinalizer(lambda: self.marks.mark(BEGIN, **window, phase="teardown"))

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        self.marks.close()


_LEAKED = pytest.StashKey[dict]()
_FIRST_MARK = pytest.StashKey[int]()  # seq of the test's setup BEGIN
_LAST_MARK = pytest.StashKey[int]()  # seq of the test's teardown END


def final_outcome(reports: list[pytest.TestReport]) -> str:
    """pytest's outcome of a test from its phase reports: failed (its call, or its fds under
    --cmtrace-fail), error (setup/teardown), skipped, xfailed, xpassed or passed."""
    for report in reports:
        if report.failed:
            return "failed" if report.when == "call" or leak_failed(report) else "error"
    for report in reports:
        if hasattr(report, "wasxfail"):
            return "xfailed" if report.skipped else "xpassed"
        if report.skipped:
            return "skipped"
    return "passed"
