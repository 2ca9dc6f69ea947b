"""Every test imports the cmtrace of THIS checkout, whatever is installed.

pyproject.toml maps two top-level directories into the package (analysis/ is cmtrace.analysis,
probes/ is cmtrace.probes). Putting the checkout on sys.path finds its cmtrace/, but
`import cmtrace.analysis` would then fall through to an installed copy's finder (an editable
install of another tree, or site-packages). So, before any test module is imported, the
packages of that mapping are loaded from this checkout's directories, and the run fails if a
cmtrace module ends up coming from anywhere else.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

try:
    import tomllib
except ImportError:  # Python < 3.11: pytest itself depends on tomli there
    import tomli as tomllib

import pytest

CHECKOUT = Path(__file__).resolve().parents[1]
PACKAGE = "cmtrace"


def package_dirs(checkout: Path) -> dict[str, Path]:
    """Package name -> its directory in the checkout, from pyproject's [tool.setuptools]
    package-dir (the one place the mapping is written), parents before children."""
    config = tomllib.loads((checkout / "pyproject.toml").read_text())
    mapping = config["tool"]["setuptools"]["package-dir"]
    return {name: checkout / mapping[name] for name in sorted(mapping, key=lambda n: n.count("."))}


def _load_package(name: str, directory: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        name, directory / "__init__.py", submodule_search_locations=[str(directory)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)
    return module


def _use_checkout() -> None:
    for name in [n for n in sys.modules if n == PACKAGE or n.startswith(PACKAGE + ".")]:
        del sys.modules[name]  # imported from elsewhere before this conftest ran
    if str(CHECKOUT) not in sys.path:
        sys.path.insert(0, str(CHECKOUT))
    for name, directory in package_dirs(CHECKOUT).items():
        _load_package(name, directory)


def foreign_modules() -> list[str]:
    """cmtrace modules imported from outside this checkout."""
    return sorted(
        f"{name} from {module.__file__}"
        for name, module in list(sys.modules.items())
        if (name == PACKAGE or name.startswith(PACKAGE + "."))
        and getattr(module, "__file__", None)
        and not Path(module.__file__).resolve().is_relative_to(CHECKOUT)
    )


_use_checkout()
assert not foreign_modules(), foreign_modules()


def pytest_collection_finish(session: pytest.Session) -> None:
    """Test modules are imported now: any cmtrace module they pulled in must be this tree's."""
    foreign = foreign_modules()
    if foreign:
        raise pytest.UsageError(
            f"cmtrace modules imported from outside {CHECKOUT}: {', '.join(foreign)}"
        )
