"""`pytest --cmtrace` on a suite written for it (tests/programs/pytest_suite), recorded for real.

The suite marks each line that opens a leaked fd (`# LEAK:<label>`) and each fd a finalizer
closes (`# WARN:<label>`); expected.py says whose it is and what the plugin must report. The
JSON is checked whole: every test of the session, every leak's fields, the fixtures."""

from __future__ import annotations

import ast
import json
import os
import re
import runpy
import shutil
import subprocess
import tempfile
from pathlib import Path

from conftest import CMTRACE_PYTHON, REPO
from targets import AS_NOBODY

SUITE = REPO / "tests" / "programs" / "pytest_suite"
EXPECTED = runpy.run_path(str(SUITE / "expected.py"))
TIMEOUT = 300
MODULE_FIXTURE_FILE = "suite_module_fixture.py"


def run_suite(*args: str, env: dict | None = None, prefix: tuple[str, ...] = ()):
    return subprocess.run(
        [*prefix, CMTRACE_PYTHON, "-m", "pytest", *args],
        cwd=SUITE,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={**os.environ, **(env or {})},
    )


def marked_lines() -> dict[str, tuple[Path, int, str]]:
    """label -> (file, line, enclosing function) of every `# LEAK:`/`# WARN:` comment."""
    out = {}
    for file in sorted(SUITE.glob("suite_*.py")):
        text = file.read_text()
        for number, line in enumerate(text.splitlines(), 1):
            match = re.search(r"# (?:LEAK|WARN):(\w+)$", line)
            if match:
                out[match.group(1)] = (file, number, enclosing_function(text, number))
    return out


def enclosing_function(text: str, line: int) -> str:
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.FunctionDef) and node.lineno <= line <= node.end_lineno:
            return node.name
    raise AssertionError(f"line {line} is in no function")


def collected_nodeids() -> list[str]:
    done = run_suite("--collect-only", "-q")
    assert done.returncode == 0, done.stdout + done.stderr
    return [line for line in done.stdout.splitlines() if "::" in line]


def expected_leak(label: str, worker: str | None) -> dict:
    file, line, function = marked_lines()[label]
    spec = EXPECTED["LEAKS"][label]
    return {
        "fd": int,
        "kind": spec["kind"],
        "path": str(file) if spec["kind"] == "file" else None,
        "file": str(file),
        "line": line,
        "function": function,
        "api": spec["api"],
        "cause": spec["cause"],
        "fix": f"{file}:{line}: ",  # the fix of cmtrace report names the line first
        "phase": spec["phase"],
        "allowed": spec["allowed"],
        "fixture": spec["fixture"],
        "closed_by": "interpreter-shutdown",  # held to the end of the session
        "worker": worker,
    }


def nodeid_of(label_spec: dict, file: Path) -> str:
    return f"{file.name}::{label_spec['test']}"


def expected_tests(document: dict, outcomes: dict[str, str]) -> dict[str, dict]:
    """nodeid -> the test entry the plugin must write (workers taken from the document: xdist
    decides which worker runs a test)."""
    workers = {t["nodeid"]: t["worker"] for t in document["tests"]}
    marks = marked_lines()
    tests = {
        nodeid: {
            "nodeid": nodeid,
            "outcome": outcomes.get(nodeid, "passed"),
            "leaks": [],
            "warnings": [],
            "worker": workers.get(nodeid),
        }
        for nodeid in collected_nodeids()
    }
    for label, spec in EXPECTED["LEAKS"].items():
        if "test" in spec:
            nodeid = nodeid_of(spec, marks[label][0])
            tests[nodeid]["leaks"].append(expected_leak(label, workers.get(nodeid)))
    for label, spec in EXPECTED["WARNINGS"].items():
        file, line, _ = marks[label]
        nodeid = nodeid_of(spec, file)
        tests[nodeid]["warnings"].append({"file": str(file), "line": line, "count": spec["count"]})
    return tests


def assert_matches(actual, expected, where: str) -> None:
    """Equal, except that a type stands for any value of it and a fix is checked by prefix."""
    if isinstance(expected, type):
        assert isinstance(actual, expected), f"{where}: {actual!r} is no {expected.__name__}"
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and set(actual) == set(expected), (
            f"{where}: keys {sorted(actual)} != {sorted(expected)}"
        )
        for key, value in expected.items():
            if key == "fix":
                assert actual[key].startswith(value), f"{where}.fix: {actual[key]!r}"
            else:
                assert_matches(actual[key], value, f"{where}.{key}")
    elif isinstance(expected, list):
        assert len(actual) == len(expected), f"{where}: {actual!r} != {expected!r}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_matches(a, e, f"{where}[{i}]")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def check_document(
    document: dict, outcomes: dict[str, str] | None = None, backend: str = "bpf"
) -> None:
    assert document["backend"] == backend
    assert document["lost_events"] == 0
    assert set(document) == {"backend", "lost_events", "tests", "fixtures"}
    nodeids = [t["nodeid"] for t in document["tests"]]
    assert len(nodeids) == len(set(nodeids)), "a test listed twice"
    expected = expected_tests(document, outcomes or {})
    assert sorted(nodeids) == sorted(expected), "every test of the session, once"
    for test in document["tests"]:
        assert_matches(test, expected[test["nodeid"]], test["nodeid"])
    check_fixtures(document)


def check_fixtures(document: dict) -> None:
    """module_log leaks once per worker that ran its module (once without xdist)."""
    ran_module = {
        t["worker"] for t in document["tests"] if t["nodeid"].startswith(MODULE_FIXTURE_FILE)
    }
    label = "module_log"
    spec = EXPECTED["LEAKS"][label]
    expected = [
        {
            "name": spec["fixture_name"],
            "scope": spec["fixture_scope"],
            "leaks": [expected_leak(label, worker)],
            "worker": worker,
        }
        for worker in sorted(ran_module, key=str)
    ]
    actual = sorted(document["fixtures"], key=lambda f: str(f["worker"]))
    assert_matches(actual, expected, "fixtures")


def test_json_of_every_test_exact(bpf_ready, tmp_path: Path) -> None:
    out, trace = tmp_path / "leaks.json", tmp_path / "trace"
    done = run_suite("--cmtrace", f"--cmtrace-json={out}", f"--cmtrace-trace={trace}")
    assert done.returncode == 0, done.stdout + done.stderr
    skipped = "suite_leaks.py::test_fails_without_leaking"
    check_document(json.loads(out.read_text()), {skipped: "skipped"})
    # the section: one block per leaking test, with the opening line and its source
    section = done.stdout[done.stdout.index("file descriptor leaks (cmtrace)") :]
    assert "suite_leaks.py::test_body_leaks: 1 leaked fd(s)" in section
    assert "HELD.append(open(__file__))  # LEAK:body" in section
    assert "cause: suspended-generator" in section
    assert "suite_leaks.py::test_finalizer_closes: 1 fd(s) opened at" in section
    assert "suite_leaks.py::test_clean" not in section
    assert "totals: 15 tests, 5 leaking; 7 fds leaked by tests (2 allowed)" in section
    assert (trace / "meta.json").exists(), "--cmtrace-trace keeps the trace"


def test_fail_gate_fails_leaking_tests_only(bpf_ready, tmp_path: Path) -> None:
    out = tmp_path / "leaks.json"
    done = run_suite(
        "--cmtrace", "--cmtrace-fail", f"--cmtrace-json={out}", env={"SUITE_FAIL": "1"}
    )
    assert done.returncode == 1, done.stdout + done.stderr  # pytest's status for failed tests
    failing = {f"suite_leaks.py::{name}" for name in EXPECTED["FAIL_UNDER_GATE"]}
    failing.add("suite_leaks.py::test_fails_without_leaking")
    check_document(json.loads(out.read_text()), dict.fromkeys(failing, "failed"))
    summary = done.stdout.splitlines()
    # pytest's short summary: FD LEAK for a test failed for its fds, FAILED for the other
    listed = {m.group(2) for m in (re.match(r"(FAILED|FD LEAK) (\S+)", ln) for ln in summary) if m}
    assert listed == failing, done.stdout
    assert any(ln.startswith("FAILED suite_leaks.py::test_fails_without_leaking") for ln in summary)
    # each failure explains its fds, read from the trace while the session runs
    marks = marked_lines()
    for label, spec in EXPECTED["LEAKS"].items():
        if spec.get("test") and not spec["allowed"]:
            file, line, function = marks[label]
            failure = failure_text(done.stdout, spec["test"])
            assert f"{spec['test']} leaked 1 file descriptor(s) (allowed: 0)" in failure, failure
            assert f"opened at {file}:{line} in {function}" in failure, failure
            assert f"cause: {spec['cause']}" in failure, failure


def failure_text(stdout: str, test: str) -> str:
    """The FAILURES block of one test."""
    heading = re.search(rf"^_+ {re.escape(test)} _+$", stdout, re.M)
    assert heading, f"no failure block for {test}"
    rest = stdout[heading.end() :]
    end = re.search(r"^(_+ \S+ _+|=+ .* =+)$", rest, re.M)
    return rest[: end.start()] if end else rest


def test_xdist_workers_attributed(bpf_ready, tmp_path: Path) -> None:
    out = tmp_path / "leaks.json"
    done = run_suite("--cmtrace", f"--cmtrace-json={out}", "-n", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    document = json.loads(out.read_text())
    assert {t["worker"] for t in document["tests"]} == {"gw0", "gw1"}
    check_document(document, {"suite_leaks.py::test_fails_without_leaking": "skipped"})


def test_inert_without_the_flag() -> None:
    done = run_suite("-q")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "file descriptor leaks" not in done.stdout


def test_no_usable_backend_is_a_usage_error() -> None:
    """As nobody, BPF is not permitted: exit 4, saying why, before anything runs."""
    done = run_suite("--cmtrace", "--cmtrace-backend", "bpf", prefix=AS_NOBODY)
    assert done.returncode == 4, done.stdout + done.stderr
    assert "pytest --cmtrace: no usable recorder backend: --backend bpf:" in done.stderr
    assert "passed" not in done.stdout  # no test ran


def test_an_ordinary_user_records_with_ptrace() -> None:
    """As nobody (no capabilities): auto picks the ptrace backend and the JSON is the same as
    root's with BPF, every test attributed."""
    work = Path(tempfile.mkdtemp(prefix="cmtrace-plugin-"))
    try:
        work.chmod(0o777)  # nobody writes the JSON (and may build the engine) here
        out = work / "leaks.json"
        done = run_suite(
            "-p", "no:cacheprovider", "--cmtrace", f"--cmtrace-json={out}",
            env={"XDG_CACHE_HOME": str(work)}, prefix=AS_NOBODY,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        document = json.loads(out.read_text())
        check_document(
            document, {"suite_leaks.py::test_fails_without_leaking": "skipped"}, backend="ptrace"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_under_sudo_the_tests_run_as_the_user(bpf_ready, tmp_path: Path) -> None:
    """`sudo pytest --cmtrace`: cmtrace run starts pytest as $SUDO_USER, which must still be
    able to write its boundary marks (every test attributed as before)."""
    out = tmp_path / "leaks.json"
    done = run_suite("--cmtrace", f"--cmtrace-json={out}", env={"SUDO_USER": "nobody"})
    assert done.returncode == 0, done.stdout + done.stderr
    check_document(
        json.loads(out.read_text()), {"suite_leaks.py::test_fails_without_leaking": "skipped"}
    )
