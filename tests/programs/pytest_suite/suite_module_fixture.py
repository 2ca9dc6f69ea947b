"""A module-scoped fixture that leaks: the fd is the fixture's (checked when it is torn down),
not the test's in whose setup it was opened (`# LEAK:<label>`, see expected.py)."""

import pytest
from held import HELD


@pytest.fixture(scope="module")
def module_log():
    HELD.append(open(__file__))  # LEAK:module_log
    return HELD[-1]


def test_with_module_log(module_log):
    pass


def test_with_module_log_again(module_log):
    pass
