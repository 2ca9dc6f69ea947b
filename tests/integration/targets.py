"""The interpreters the walker tests run on, and how to run a test program under each.

Found: pyenv builds (/root/.pyenv/versions/3.8-3.13), Debian's /usr/bin/python3.11, and the
wrappers of scripts/install-interpreters.sh ($CMTRACE_PYTHONS or /opt/cmtrace/pythons/bin).
A chrooted wrapper (`exec chroot DIR ...`) sees only DIR, so programs are copied into DIR/tmp.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parents[1] / "programs" / "py"  # the interpreter-side programs
PYENV = Path("/root/.pyenv/versions")
PYTHONS_BIN = Path(os.environ.get("CMTRACE_PYTHONS", "/opt/cmtrace/pythons")) / "bin"
WANTED = {
    "pyenv-3.8": "3.8.*", "pyenv-3.9": "3.9.*", "pyenv-3.10": "3.10.*", "pyenv-3.11": "3.11.*",
    "pyenv-3.12": "3.12.*", "pyenv-3.13": "3.13.*",
}  # fmt: skip
DEBIAN = {"debian-3.9": "python3.9", "debian-3.13": "python3.13", "debian-3.14": "python3.14",
          "debian-3.15": "python3.15"}  # fmt: skip


@dataclass(frozen=True)
class Target:
    name: str
    command: str
    chroot: str | None = None  # the wrapper's chroot directory
    shared_libpython: bool = False  # the interpreter lives in libpython*.so (pyenv builds)

    def program(self, name: str, source: Path = HERE) -> str:
        """Path of SOURCE/NAME (default tests/programs/py) as this interpreter sees it: copied
        into its chroot, if it has one, under /tmp/cmtrace-tests/<source dir name>."""
        if self.chroot is None:
            return str(source / name)
        inside = f"/tmp/cmtrace-tests/{source.name}"
        dest = Path(self.chroot + inside)
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / name, dest / name)
        return f"{inside}/{name}"

    def host_path(self, path: str) -> str:
        return path if self.chroot is None else self.chroot + path


def _chroot_of(wrapper: Path) -> str | None:
    match = re.search(r"exec chroot (\S+)", wrapper.read_text(errors="replace"))
    return match.group(1) if match else None


def discover() -> tuple[list[Target], list[str]]:
    """(targets that run, "name: reason" for those that do not)."""
    found, missing = [], []
    for name, pattern in WANTED.items():
        hits = sorted(PYENV.glob(f"{pattern}/bin/python3"))
        if hits:
            found.append(Target(name, str(hits[-1]), shared_libpython=True))
        else:
            missing.append(f"{name}: not installed under {PYENV}")
    if Path("/usr/bin/python3.11").exists():
        found.append(Target("debian-3.11", "/usr/bin/python3.11"))
    else:
        missing.append("debian-3.11: /usr/bin/python3.11 missing")
    for name, exe in DEBIAN.items():
        wrapper = PYTHONS_BIN / exe
        if not wrapper.exists():
            missing.append(f"{name}: {wrapper} missing (run `make interpreters`)")
            continue
        ok = subprocess.run([str(wrapper), "-c", "pass"], capture_output=True).returncode == 0
        if ok:
            found.append(Target(name, str(wrapper), _chroot_of(wrapper)))
        else:
            missing.append(f"{name}: {wrapper} does not run")
    return found, missing


def require_found(found: list[Target], missing: list[str]) -> None:
    """Print which interpreters a test file cannot run on, and why; fail if none runs."""
    for reason in missing:
        print(f"interpreter not tested: {reason}")
    assert found, "no interpreter to test"


def marked_causes(program: Path) -> dict[int, str]:
    """line -> cause, from the `# CAUSE:<cause>` comments (optionally followed by a
    ` CLOSED:<closed_by>` note) of a leak program."""
    out = {}
    for number, line in enumerate(program.read_text().splitlines(), 1):
        match = re.search(r"# CAUSE:([a-z-]+)(?: CLOSED:[a-z-]+)?$", line)
        if match:
            out[number] = match.group(1)
    return out


def marks(name: str) -> dict[str, int]:
    """`# MARK:<label>` comments of tests/programs/py/NAME -> line numbers."""
    result = {}
    for number, line in enumerate((HERE / name).read_text().splitlines(), 1):
        match = re.search(r"# MARK:(\S+)", line)
        if match:
            result[match.group(1)] = number
    return result


# An unprivileged user with no capability at all, as the ptrace backend's tests run cmtrace.
AS_NOBODY = (
    "setpriv",
    "--reuid",
    "nobody",
    "--regid",
    "nogroup",
    "--clear-groups",
    "--inh-caps=-all",
    "--bounding-set=-all",
)


def unprivileged() -> tuple[list[Target], list[str]]:
    """(targets an unprivileged user can run, "name: reason" for the others). The pyenv builds
    run through their copies outside /root (wrappers PYTHONS_BIN/pyenv-3.X, written by
    scripts/install-interpreters.sh); chroot wrappers need root; each one is tried as nobody."""
    found, missing = discover()
    candidates = []
    for target in found:
        if target.chroot is not None:
            missing.append(f"{target.name}: its wrapper chroots, which needs root")
        elif target.name.startswith("pyenv-"):
            wrapper = PYTHONS_BIN / target.name
            if wrapper.exists():
                candidates.append(Target(target.name, str(wrapper), shared_libpython=True))
            else:
                missing.append(f"{target.name}: no copy outside /root (run `make interpreters`)")
        else:
            candidates.append(target)
    usable = []
    for target in candidates:
        as_user = AS_NOBODY if os.geteuid() == 0 else ()
        argv = [*as_user, target.command, "-c", "pass"]
        if subprocess.run(argv, capture_output=True, cwd="/").returncode == 0:
            usable.append(target)
        else:
            missing.append(f"{target.name}: {target.command} does not run as nobody")
    return usable, missing
