"""`cmtrace run -- python -c "import os; os.open('/etc/hostname', 0)"` on every interpreter.

The program opens a file on its first line and exits within milliseconds: the leak must still
be reported at `<string>` line 1 (issue 4). `cmtrace run` stops its command at each exec until
the new image's layout is loaded, and code records travel with the stack, so nothing depends
on the process still being alive when the trace is read.
"""

from __future__ import annotations

import pytest
from conftest import report_json, run_cmtrace
from pyprograms import targets

FOUND, MISSING = targets.discover()  # Debian's /usr/bin/python3.11 included, where present
ONE_LINER = "import os; os.open('/etc/hostname', 0)"


def test_interpreters_found():
    print("ran on:", ", ".join(t.name for t in FOUND))
    print("could not run:", "; ".join(MISSING) or "none")
    assert FOUND


@pytest.mark.parametrize("target", FOUND, ids=[t.name for t in FOUND])
def test_one_liner_leak_has_its_line(bpf_ready, tmp_path, target):
    trace = tmp_path / "trace"
    result = run_cmtrace("run", "-q", "-o", str(trace), "--", target.command, "-c", ONE_LINER)
    assert result.returncode == 0, result.stderr
    leaks = [leak for leak in report_json(trace)["leaks"] if leak["path"] == "/etc/hostname"]
    assert len(leaks) == 1, leaks
    site = leaks[0]["site"]
    assert (site["file"], site["line"]) == ("<string>", 1), leaks[0]
    assert leaks[0]["closed_by"] == "process-exit"
