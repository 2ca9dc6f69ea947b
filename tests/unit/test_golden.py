"""Golden renders: `cmtrace report` (text and JSON) and `cmtrace diff` of the saved traces.

The traces in tests/data were recorded once by the real recorder (tests/data/record.py); the
files in tests/data/golden are what this code printed for them, checked in. Any change in the
report, the JSON contract or the analysis under them fails here, showing the difference. When
the change is intended, regenerate and review the goldens' diff in the commit:

    UPDATE_GOLDEN=1 make unit

The commands run in-process through cmtrace.cli.main, from inside tests/data with relative
trace paths, so the output does not depend on where the checkout is.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path

import pytest
from tracebuild import ALL_CAUSES, marked_causes

from cmtrace.cli import main

DATA = Path(__file__).resolve().parents[1] / "data"
GOLDEN = DATA / "golden"
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"

# Saved traces whose sources were captured (the interrupted one has none: its tracer was
# killed before writing them, so its report would read this machine's files; see test_reader).
REPORTED = ["all_causes", "all_causes_attach", "fdtable", "finalizer_warning", "leak_before",
            "leak_fixed"]  # fmt: skip
DIFFS = [("leak_before", "leak_fixed"), ("all_causes", "all_causes_attach")]
RENDERS = {"txt": ["--format", "text"], "json": ["--format", "json"]}


def run_cli(argv: list[str], out: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.chdir(DATA)
    code = main([*argv, "-o", str(out)])
    assert code == 0, f"cmtrace {' '.join(argv)} exited {code}"
    return out.read_text()


def check_golden(name: str, text: str) -> None:
    golden = GOLDEN / name
    if UPDATE:
        GOLDEN.mkdir(exist_ok=True)
        golden.write_text(text)
        return
    assert golden.exists(), f"{golden} is missing: run UPDATE_GOLDEN=1 make unit, then review it"
    expected = golden.read_text()
    if text != expected:
        diff = "".join(
            difflib.unified_diff(
                expected.splitlines(True), text.splitlines(True), f"golden/{name}", "now"
            )
        )
        pytest.fail(f"output differs from tests/data/golden/{name}:\n{diff}", pytrace=False)


@pytest.mark.parametrize("fmt", RENDERS)
@pytest.mark.parametrize("trace", REPORTED)
def test_report(trace: str, fmt: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = run_cli(["report", trace, *RENDERS[fmt]], tmp_path / "out", monkeypatch)
    if fmt == "json":
        json.loads(text)
    check_golden(f"report-{trace}.{fmt}", text)


@pytest.mark.parametrize("fmt", RENDERS)
@pytest.mark.parametrize("before,after", DIFFS)
def test_diff(
    before: str, after: str, fmt: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = run_cli(["diff", before, after, *RENDERS[fmt]], tmp_path / "out", monkeypatch)
    check_golden(f"diff-{before}-{after}.{fmt}", text)


def test_no_stale_goldens() -> None:
    """Every golden file belongs to a render above (a renamed trace leaves none behind)."""
    wanted = {f"report-{t}.{f}" for t in REPORTED for f in RENDERS}
    wanted |= {f"diff-{b}-{a}.{f}" for b, a in DIFFS for f in RENDERS}
    present = {p.name for p in GOLDEN.iterdir()} if GOLDEN.is_dir() else set()
    assert present <= wanted, f"stale goldens: {sorted(present - wanted)}"


# Ground truth from the programs (tests/programs/leaks), not from the code: what each trace
# must show however the renders change.
ALL_CAUSES_SITES = 7  # CAUSE: markers in all_causes.py, two leaked fds each


def _report(trace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    return json.loads(run_cli(["report", trace, "--format", "json"], tmp_path / "r", monkeypatch))


@pytest.mark.parametrize("trace", ["all_causes", "all_causes_attach"])
def test_all_causes_finds_every_marked_cause(trace, tmp_path, monkeypatch) -> None:
    report = _report(trace, tmp_path, monkeypatch)
    marked = marked_causes(ALL_CAUSES)
    assert len(marked) == ALL_CAUSES_SITES
    found: dict[int, list[str]] = {}
    for leak in report["leaks"]:
        assert leak["site"]["file"].endswith("tests/programs/leaks/all_causes.py"), leak["site"]
        found.setdefault(leak["site"]["line"], []).append(leak["cause"])
    assert found == {line: [cause, cause] for line, cause in marked.items()}


def test_fork_trace_has_the_childs_own_leak_only(tmp_path, monkeypatch) -> None:
    """fdtable.py: `kept` leaks in the parent, `leaked_in_child` in the child; the child's
    inherited copies (closed by its exit) are not leaks."""
    report = _report("fdtable", tmp_path, monkeypatch)
    pids = {leak["pid"] for leak in report["leaks"]}
    assert len(report["leaks"]) == 2 and len(pids) == 2, report["leaks"]


def test_finalizer_warning_warns_and_does_not_leak(tmp_path, monkeypatch) -> None:
    report = _report("finalizer_warning", tmp_path, monkeypatch)
    assert report["leaks"] == []
    assert sum(w["count"] for w in report["warnings"]) == 4, report["warnings"]  # 2 + 2 (argv)


def test_diff_of_a_fix_shows_the_site_gone(tmp_path, monkeypatch) -> None:
    argv = ["diff", "leak_before", "leak_fixed", "--format", "json"]
    diff = json.loads(run_cli(argv, tmp_path / "d", monkeypatch))
    assert [(s["function"], s["before"], s["after"]) for s in diff["sites"]] == [("open_log", 3, 0)]
