"""The test tree itself: pytest's default (prepend) import mode refuses two test modules of
one basename, and that error only shows when the whole tree is collected (make test, CI)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_no_two_test_modules_share_a_basename() -> None:
    names = Counter(path.name for path in TESTS.rglob("test_*.py"))
    assert [name for name, count in names.items() if count > 1] == []
