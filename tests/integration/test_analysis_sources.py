"""Record-time source facts (cmtrace.trace.sources) on real source text, and exclude patterns."""

from __future__ import annotations

import json
import os
from pathlib import Path

from cmtrace.analysis import site_matches
from cmtrace.analysis.code import SourceIndex, is_user_file
from cmtrace.trace.sources import FACTS_LINE, capture_sources, file_facts

PROGRAMS = Path(__file__).parents[1] / "programs" / "leaks"


def line_of(path: Path, marker: str) -> int:
    lines = path.read_text().splitlines()
    return next(i for i, text in enumerate(lines, start=1) if marker in text)


def test_contextmanager_yield_outside_finally() -> None:
    path = PROGRAMS / "contextmanager_without_finally.py"
    facts = file_facts(path.read_text())
    fn = facts["functions"]["scratch_fd"]
    assert fn["contextmanager"] and fn["generator"]
    assert fn["unprotected_yields"] == [line_of(path, "yield fd")]
    with_line = line_of(path, "# WITH-LINE")
    assert any(stmt[0] == with_line for stmt in facts["with"])


def test_yield_protected_by_finally_or_with() -> None:
    source = (
        "from contextlib import contextmanager\n"
        "@contextmanager\n"
        "def a():\n"
        "    f = open('x')\n"
        "    try:\n"
        "        yield f\n"
        "    finally:\n"
        "        f.close()\n"
        "def b():\n"
        "    with open('x') as f:\n"
        "        yield f\n"
        "    yield None\n"
    )
    facts = file_facts(source)
    assert facts["functions"]["a"]["unprotected_yields"] == []
    assert facts["functions"]["b"]["unprotected_yields"] == [12]
    assert facts["functions"]["b"]["contextmanager"] is False
    assert facts["with"] == [[10, 10, 11, False]]


def test_classes_methods_and_manual_enter_calls() -> None:
    facts = file_facts((PROGRAMS / "finalizer_never_ran.py").read_text())
    assert "__del__" in facts["classes"]["Handle"]["methods"]
    assert "Handle.__init__" in facts["functions"]
    manual = PROGRAMS / "manual_enter.py"
    assert file_facts(manual.read_text())["enter_calls"] == [line_of(manual, "# ENTER-CALL")]


def test_syntax_error_is_a_fact_not_a_crash() -> None:
    assert "error" in file_facts("def broken(:\n")


def test_capture_sources_through_proc_root() -> None:
    path = PROGRAMS / "manual_enter.py"
    rows = capture_sources(os.getpid(), [str(path), "<frozen importlib._bootstrap>"])
    assert {row["file"] for row in rows} == {str(path)}
    facts_row = next(row for row in rows if row["line"] == FACTS_LINE)
    assert "Session.__enter__" in json.loads(facts_row["facts"])["functions"]
    site = line_of(path, "# LEAK-SITE")
    row = next(row for row in rows if row["line"] == site)
    assert "os.open" in row["text"] and row["function"] == "Session.__enter__"


def test_source_index_prefers_the_trace_over_the_disk(tmp_path: Path) -> None:
    import pandas as pd

    rows = capture_sources(None, [str(PROGRAMS / "manual_enter.py")])
    moved = [{**row, "file": "/gone/app.py"} for row in rows]
    index = SourceIndex.from_table(pd.DataFrame(moved), local_fallback=False)
    site = line_of(PROGRAMS / "manual_enter.py", "# LEAK-SITE")
    assert "os.open" in index.text("/gone/app.py", site)
    assert index.function_at("/gone/app.py", site)[0] == "Session.__enter__"
    assert index.text("/elsewhere.py", 1) is None


def test_user_code_classification() -> None:
    assert is_user_file("/srv/app/db.py")
    assert not is_user_file("/usr/lib/python3.11/contextlib.py")
    assert not is_user_file("/usr/lib/python3/dist-packages/requests/api.py")
    assert not is_user_file("/opt/venv/lib/python3.12/site-packages/x.py")
    assert not is_user_file("<frozen runpy>")


def test_exclude_patterns() -> None:
    assert site_matches("myapp/db.py:Pool.*", "/srv/myapp/db.py", 10, "Pool.connect")
    assert not site_matches("myapp/db.py:Pool.*", "/srv/myapp/db.py", 10, "connect")
    assert site_matches("app.py:42", "/srv/app.py", 42, "f")
    assert not site_matches("app.py:42", "/srv/app.py", 43, "f")
    assert site_matches("*/logging/*", "/usr/lib/python3.11/logging/__init__.py", 1, "x")


def test_source_collector_reads_while_the_process_lives() -> None:
    import subprocess

    from cmtrace.trace.sources import SourceCollector

    program = PROGRAMS / "manual_enter.py"
    child = subprocess.Popen(["/bin/sleep", "30"])
    try:
        collector = SourceCollector()
        collector.add(child.pid, str(program))
    finally:
        child.kill()
        child.wait()
    rows = collector.rows(pid=None)
    assert {row["file"] for row in rows} == {str(program)}
    assert any(row["line"] == FACTS_LINE for row in rows)
