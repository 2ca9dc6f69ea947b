"""A site's block in the text report describes the fds that leaked there, not every fd opened
there: one line that opens five files (all closed) and two pipes (kept open) is `pipe` with no
paths, not `file` with the closed files' paths; a non-CPython child's site reads
`opened at <no Python stack>`, not `<no Python stack>:0 in `. Ground truth: the program prints
the fds it kept and /proc/self/fd at its end."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest
from conftest import TARGET_PYTHON, run_cmtrace

pytestmark = [pytest.mark.usefixtures("bpf_ready", "backend")]

MIXED = textwrap.dedent(
    """
    import json, os
    kept = []
    for i in range(7):
        fds = os.pipe() if i in (2, 5) else (os.open("/etc/hostname", os.O_RDONLY),)  # SITE
        if len(fds) == 2:
            kept.extend(fds)
        else:
            os.close(fds[0])
    kinds = {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in kept}
    print(json.dumps({"kept": kept, "kinds": kinds}), flush=True)
    os._exit(0)
    """
)


def test_site_kind_and_paths_are_the_leaked_fds(tmp_path: Path) -> None:
    program = tmp_path / "mixed.py"
    program.write_text(MIXED)
    site_line = next(n for n, text in enumerate(MIXED.splitlines(), 1) if "# SITE" in text)
    out = tmp_path / "trace"
    result = run_cmtrace("run", "-o", str(out), "--", TARGET_PYTHON, str(program))
    assert result.returncode == 0, result.stderr
    truth = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("{")))
    assert len(truth["kept"]) == 4 and all(k.startswith("pipe:") for k in truth["kinds"].values())
    text = run_cmtrace("report", str(out)).stdout
    head = re.search(
        rf"^#\d+ (\d+) leaked of (\d+) opened \S+  (\S+)  cause: .*\n"
        rf"   opened at {re.escape(str(program))}:{site_line} in <module>\n",
        text,
        re.M,
    )
    assert head, text
    assert (int(head[1]), int(head[2]), head[3]) == (4, 9, "pipe"), text
    block = text[head.start() : text.index("stack (innermost first)", head.start())]
    assert "paths:" not in block, text  # pipes have no path; the closed files' are not shown


def test_no_stack_site_has_no_line_or_function(tmp_path: Path) -> None:
    """A shell (not CPython) opens fd 3 and exits holding it: a leak with no Python stack."""
    program = tmp_path / "child.py"
    program.write_text("import subprocess\n"
                       "subprocess.run(['sh', '-c', 'exec 3</etc/hostname; exit 0'])\n")  # fmt: skip
    out = tmp_path / "trace"
    result = run_cmtrace("run", "-o", str(out), "--", TARGET_PYTHON, str(program))
    assert result.returncode == 0, result.stderr
    text = run_cmtrace("report", str(out)).stdout
    assert "<no Python stack>:0" not in text and " in \n" not in text, text
    assert re.search(r"^ +opened at <no Python stack>\n", text, re.M), text  # short-lived
