"""The program `cmtrace demo` traces (cmtrace/demo/leaky.py); the verb is cmtrace.cli.demo."""

from __future__ import annotations

from pathlib import Path

LEAKY = Path(__file__).with_name("leaky.py")
