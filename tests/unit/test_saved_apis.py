"""The API of each leak in saved recordings of programs/leaks/stdlib_leaks.py (issue 13), by
Debian's 3.11 and by pyenv's 3.9, whose frames carry no qualified name: the class must be read
from the library source the trace captured, which no machine running this test needs to have.

The traces are tests/data/library_apis and library_apis_39 (tests/data/record.py). Each
leaking line of the program is marked `LEAK:<label>`; the API a reader of that line would
name is stated per label below, with words its fix must contain.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from tracebuild import LEAKS

from cmtrace.analysis import load

DATA = Path(__file__).resolve().parents[1] / "data"
PROGRAM = LEAKS / "stdlib_leaks.py"
# label -> (the API, words of its fix)
EXPECTED = {
    "sqlite": ("sqlite3.connect", "contextlib.closing"),
    "pipe": ("subprocess.Popen", "communicate()"),
    "socketpair": ("socket.socketpair", None),
    "thread": ("os.open", "os.close(fd)"),
    "deep": ("os.open", "os.close(fd)"),
}


def marked_lines() -> dict[int, str]:
    """line -> label of the program's `LEAK:<label>` comments."""
    lines = PROGRAM.read_text().splitlines()
    found = {n: re.search(r"LEAK:(\w+)", line) for n, line in enumerate(lines, 1)}
    return {n: match.group(1) for n, match in found.items() if match}


@pytest.mark.parametrize("name", ["library_apis", "library_apis_39"])
def test_each_leak_names_the_api_its_line_called(name: str) -> None:
    trace = load(DATA / name, local_sources=False)  # the trace's own sources only
    leaks = trace.leaks()
    at_marks = leaks[leaks["site_file"].astype(str).str.endswith("/stdlib_leaks.py")]
    labels = marked_lines()
    seen = set()
    for row in at_marks.itertuples(index=False):
        label = labels.get(int(row.site_line))
        if label is None:
            continue
        api, fix_words = EXPECTED[label]
        assert row.api == api, (label, row.api)
        assert fix_words is None or fix_words in str(row.fix), (label, row.fix)
        seen.add(label)
    assert seen == set(EXPECTED)
