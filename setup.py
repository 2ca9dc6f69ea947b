"""Builds the ptrace engine (cmtrace/record/ptrace/engine.c) with the C compiler at install.

Everything else is declared in pyproject.toml. The engine is a helper binary, not a Python
extension: a C compiler is all it needs (no Python headers). An editable install or a checkout
builds it on first use instead (cmtrace.record.ptrace.build.engine_binary).
"""

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


def _engine_module():
    """cmtrace/record/ptrace/build.py, loaded by path: the package and its dependencies are
    not installed yet, and that module needs only the standard library."""
    spec = importlib.util.spec_from_file_location(
        "_cmtrace_engine_build", HERE / "cmtrace" / "record" / "ptrace" / "build.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildWithEngine(build_py):
    def run(self):
        super().run()
        if self.editable_mode:
            return  # built on first use, from the checkout's sources
        engine = _engine_module()
        target = Path(self.build_lib) / "cmtrace" / "record" / "ptrace" / engine.BINARY
        engine.build(target, include=HERE / "probes")


setup(cmdclass={"build_py": BuildWithEngine})
