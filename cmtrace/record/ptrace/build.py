"""Build the ptrace engine (engine.c, a helper binary) with the C compiler.

Standard library only: setup.py loads this file by path while the package's dependencies
(numpy, pyarrow) are not installed yet, so `pip install --user .` can build the engine into the
wheel; a checkout or an editable install builds it on first use into the user's cache.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import subprocess
from pathlib import Path

BINARY = "cmtrace-ptrace-engine"
SOURCE = Path(__file__).with_name("engine.c")
CFLAGS = ("-O2", "-Wall", "-Wextra", "-std=gnu11")


class EngineUnavailable(Exception):
    """The engine binary is missing and cannot be built here; str() says why and what to do."""


def probes_dir() -> Path:
    """probes/ as installed (cmtrace.probes) or, from a checkout, beside cmtrace/."""
    # imported by name: mypy cannot see cmtrace.probes (setuptools maps it from probes/)
    probes = importlib.import_module("cmtrace.probes")
    return Path(str(probes.__file__)).parent


def _sources() -> list[Path]:
    return [SOURCE, probes_dir() / "events.h", probes_dir() / "pywalk.h"]


def _source_digest() -> str:
    digest = hashlib.sha256()
    for path in _sources():
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def build(output: Path, compiler: str | None = None, include: Path | None = None) -> Path:
    """Compile engine.c into `output` (setup.py at install, with the checkout's probes/ as
    `include`; engine_binary on first use)."""
    cc = compiler or os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise EngineUnavailable(
            "the ptrace engine needs a C compiler to be built: install gcc (or set CC)"
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + f".{os.getpid()}.tmp")
    command = [cc, *CFLAGS, f"-I{include or probes_dir()}", "-o", str(tmp), str(SOURCE)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise EngineUnavailable(f"building the ptrace engine failed:\n{done.stderr.strip()}")
    os.replace(tmp, output)
    return output


def engine_binary() -> Path:
    """The engine to run: installed next to this module, else built once per source version
    into the user's cache (a checkout or an editable install)."""
    installed = Path(__file__).with_name(BINARY)
    if os.access(installed, os.X_OK) and not _older_than_sources(installed):
        return installed
    if not SOURCE.exists():
        raise EngineUnavailable(f"{installed} is missing: reinstall cmtrace")
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cmtrace"
    built = cache / f"{BINARY}-{_source_digest()}"
    if not built.exists():
        build(built)
    return built


def _older_than_sources(binary: Path) -> bool:
    """A checkout's build (scripts/setup.sh) after engine.c or a header changed: stale."""
    built = binary.stat().st_mtime
    return any(path.exists() and path.stat().st_mtime > built for path in _sources())


if __name__ == "__main__":  # scripts/setup.sh: `python -m cmtrace.record.ptrace.build`
    print(build(Path(__file__).with_name(BINARY)))
