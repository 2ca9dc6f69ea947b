"""Report states on real traces: a SIGKILLed tracer, a non-Python target, --exclude, summary."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from conftest import TARGET_PYTHON, Target, Tracer, run_cmtrace

import cmtrace.analysis as cma
from cmtrace.present.text import print_summary

pytestmark = pytest.mark.usefixtures("bpf_ready")
PROGRAMS = Path(__file__).parents[1] / "programs" / "leaks"


def test_killed_tracer_reads_as_interrupted(tmp_path: Path) -> None:
    out = tmp_path / "trace"
    target = Target([TARGET_PYTHON, str(PROGRAMS / "attached.py"), "-"], tmp_path)
    try:
        ready = target.expect("ready")
        tracer = Tracer(["-p", str(ready["pid"]), "-o", str(out)], cwd=tmp_path)
        tracer.wait_attached()
        tracer.kill()  # SIGKILL: the tracer cannot finish meta.json
    finally:
        target.kill()
    assert json.loads((out / "meta.json").read_text())["status"] == "recording"
    trace = cma.load(out)
    assert trace.interrupted
    result = run_cmtrace("report", str(out))
    assert result.returncode == 0, result.stderr
    assert "INTERRUPTED" in result.stdout
    assert json.loads(run_cmtrace("report", str(out), "--format", "json").stdout)["interrupted"]


def test_non_python_target_says_why_there_are_no_stacks(tmp_path: Path) -> None:
    out = tmp_path / "trace"
    script = "exec 3</etc/hostname; exit 0"
    result = run_cmtrace("run", "-o", str(out), "--", "/bin/sh", "-c", script)
    assert result.returncode == 0, result.stderr
    trace = cma.load(out)
    assert trace.no_python_reason
    leaks = trace.leaks()
    hostname = leaks[leaks["path"].astype(str) == "/etc/hostname"]
    assert len(hostname) == 1 and hostname.iloc[0]["closed_by"] == "process-exit"
    assert hostname.iloc[0]["cause"] == "unknown"
    text = run_cmtrace("report", str(out)).stdout
    assert f"no Python stacks: {trace.no_python_reason}" in text


def test_exclude_file_and_summary(tmp_path: Path) -> None:
    out = tmp_path / "trace"
    program = PROGRAMS / "no_context_manager.py"
    result = run_cmtrace("run", "-o", str(out), "--", TARGET_PYTHON, str(program), "3")
    assert result.returncode == 0, result.stderr
    stream = io.StringIO()
    leaks = print_summary(out, file=stream, top=5)
    assert leaks == len(cma.load(out).leaks()) >= 3
    assert "leaked" in stream.getvalue()
    trace = cma.load(out)
    sites = trace.sites()
    leaking = sites[sites["leaked"] > 0]
    patterns = tmp_path / "exclude.txt"
    lines = [f"{s.site_file}:{s.site_line}" for s in leaking.itertuples(index=False)]
    patterns.write_text("# everything we know leaks\n" + "\n".join(lines) + "\n")
    excluded = run_cmtrace("report", str(out), "--exclude", str(patterns), "--fail-on-leak")
    assert excluded.returncode == 0, excluded.stdout + excluded.stderr
    assert "no leaked file descriptors" in excluded.stdout
    assert run_cmtrace("report", str(out), "--exclude", str(tmp_path / "nope")).returncode == 1
