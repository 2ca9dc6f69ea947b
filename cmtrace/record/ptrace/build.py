"""Build the ptrace engine (engine.c, a helper binary) with the C compiler.

Standard library only: setup.py loads this file by path while the package's dependencies
(numpy, pyarrow) are not installed yet, so `pip install --user .` can build the engine into the
wheel; a checkout or an editable install builds it on first use into the user's cache.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
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
    return cached_engine()


def cached_engine() -> Path:
    """The engine built once per source version in the first cache directory that works."""
    name = f"{BINARY}-{_source_digest()}"
    for cache in _cache_dirs():
        built = cache / name
        try:  # exists() raises too: a HOME we may not enter (setpriv keeps HOME=/root)
            return built if built.exists() else build(built)
        except OSError:
            continue  # a HOME that does not exist or is not ours (nobody): the next place
    raise EngineUnavailable(
        "the ptrace engine must be built on first use and no cache directory is writable: "
        "set XDG_CACHE_HOME to a directory of yours"
    )


def _cache_dirs() -> Iterator[Path]:
    """Where a checkout's engine is built: the user's cache, else (made only when the first
    fails) a private directory under the temporary directory, used only if it is ours and no
    one else can write to it: a binary planted there would run as us."""
    yield Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cmtrace"
    try:  # HOME may be another user's (sudo -E, setpriv): the home of the uid we run as
        own_home = Path(pwd.getpwuid(os.getuid()).pw_dir)
    except KeyError:
        own_home = None
    if own_home is not None and own_home != Path.home():
        yield own_home / ".cache" / "cmtrace"
    private = Path(tempfile.gettempdir()) / f"cmtrace-{os.getuid()}"
    try:
        private.mkdir(mode=0o700, exist_ok=True)
        info = private.lstat()
    except OSError:
        return
    if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o022:
        yield private


def _older_than_sources(binary: Path) -> bool:
    """A checkout's build (scripts/setup.sh) after engine.c or a header changed: stale."""
    built = binary.stat().st_mtime
    return any(path.exists() and path.stat().st_mtime > built for path in _sources())


if __name__ == "__main__":  # scripts/setup.sh: `python -m cmtrace.record.ptrace.build`
    print(build(Path(__file__).with_name(BINARY)))
