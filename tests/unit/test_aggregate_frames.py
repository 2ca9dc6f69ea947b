"""--aggregate ships every close that the analysis may call a leak (atexit handlers, an asyncio
loop winding down): the collector's frame list must cover the analysis' (which needs pandas, so
the collector cannot import it)."""

from __future__ import annotations

from cmtrace.analysis import causes
from cmtrace.record.bpf.aggregate import LEAK_CLOSE_FRAMES


def test_every_atexit_handler_is_shipped() -> None:
    assert set(causes.ATEXIT_HANDLERS) <= set(LEAK_CLOSE_FRAMES)


def test_every_loop_shutdown_function_is_shipped() -> None:
    functions = {function for file, function in LEAK_CLOSE_FRAMES if "asyncio/" in file}
    assert set(causes.LOOP_SHUTDOWN_FUNCTIONS) <= functions
    runner_file, runner_functions = causes.LOOP_RUNNER
    assert {(runner_file, f) for f in runner_functions} <= set(LEAK_CLOSE_FRAMES)
