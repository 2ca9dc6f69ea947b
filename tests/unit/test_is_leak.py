"""lifetimes.is_leak, the one place that decides what a leak is, over a hand-built table of
lifetimes (one row per case, its expected verdict beside it)."""

from __future__ import annotations

import pandas as pd

from cmtrace.analysis.lifetimes import is_leak

# (fd, death, preexisting, inherited, expected leak): why, in the comment of each row.
CASES = [
    (5, None, False, False, True),  # still open at the end
    (5, "close", False, False, False),  # closed by the program
    (5, "process-exit", False, False, True),  # released only by its process's exit
    (5, "interpreter-shutdown", False, False, True),
    (5, "loop-shutdown", False, False, True),
    (5, "atexit", False, False, True),  # logging.shutdown closing a handler made per call
    (5, "finalizer", False, False, False),  # closed during the run: a warning, not a leak
    (1, "process-exit", False, False, False),  # stdio released by exit: never, in any process
    (2, None, False, False, True),  # stdio still open at the end is
    (5, None, True, False, False),  # pre-existing
    (5, "atexit", False, True, False),  # inherited at fork
]


def test_is_leak_decides_every_rule_in_one_place() -> None:
    table = pd.DataFrame(
        [c[:4] for c in CASES], columns=["fd", "death", "preexisting", "inherited"]
    ).astype({"death": "category"})
    assert is_leak(table).tolist() == [c[4] for c in CASES]
