"""The recording flags that watch a trace as it is recorded (the live view, dumps), and the
observers (cmtrace.record.observe) they build for `cmtrace -p` and `cmtrace run`.

Each feature keeps its flags and its builder in its own section below; `add_arguments` and
`build` are what cmtrace.cli.record calls.
"""

from __future__ import annotations

import argparse

from cmtrace.record.observe import Observer


def add_arguments(parser: argparse.ArgumentParser, mode: str) -> None:
    """The watching flags of `cmtrace -p` (mode "attach") or `cmtrace run` (mode "run")."""


def build(args: argparse.Namespace, mode: str) -> list[Observer]:
    """The observers the flags ask for, in the order the session should call them."""
    observers: list[Observer] = []
    return observers
