"""Stacks and source facts: which frame is user code, the opening site, the `with` statement.

"User code" is what the developer can change: not the standard library, not an installed
package (site-packages/dist-packages), not cmtrace itself. CPython's own test suite
(`lib/pythonX.Y/test/`) is user code: whoever runs `python -m test` is working on it, and its
fds should be told at the test's line, not at the stdlib's (`tempfile.py:256`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import pandas as pd

from cmtrace.trace import schema
from cmtrace.trace.sources import FACTS_LINE, file_facts, read_source

_STDLIB = re.compile(r"/lib(?:64)?/python\d+\.\d+t?/|^<frozen |/lib/pypy")
_TEST_SUITE = re.compile(r"/lib(?:64)?/python\d+\.\d+t?/test/")
_INSTALLED = re.compile(r"/(?:site|dist)-packages/")
_CMTRACE = re.compile(r"/cmtrace/(?:analysis/|probes/)?\w+\.py$")
GENERATOR_FLAGS = (
    schema.CODE_GENERATOR
    | schema.CODE_COROUTINE
    | schema.CODE_ITERABLE_COROUTINE
    | schema.CODE_ASYNC_GENERATOR
)


@lru_cache(maxsize=1 << 16)
def is_user_file(file: str | None) -> bool:
    """Decided once per file name: a deep stack asks it for every frame."""
    if not file:
        return False
    if _INSTALLED.search(file) or _CMTRACE.search(file):
        return False
    return not _STDLIB.search(file) or bool(_TEST_SUITE.search(file))


@dataclass(frozen=True)
class Frame:
    function: str
    qualname: str
    file: str
    line: int
    firstlineno: int
    code_flags: int

    @property
    def is_user(self) -> bool:
        return is_user_file(self.file)

    @property
    def is_generator(self) -> bool:
        return bool(self.code_flags & GENERATOR_FLAGS)

    def where(self) -> str:
        return f"{self.file}:{self.line}"

    def as_dict(self) -> dict:
        return {"function": self.qualname or self.function, "file": self.file, "line": self.line}


def innermost_user(frames: list[Frame]) -> Frame | None:
    return next((f for f in frames if f.is_user), None)


@dataclass
class SourceIndex:
    """Source lines and file facts: from the trace first, from the local disk as a fallback."""

    lines: dict[tuple[str, int], str] = field(default_factory=dict)
    facts: dict[str, dict] = field(default_factory=dict)
    local_fallback: bool = True
    read_locally: set[str] = field(default_factory=set)
    _imports: dict[str, dict[str, str]] = field(default_factory=dict, repr=False)
    _by_file: dict[str, list[str]] | None = field(default=None, repr=False)  # see imports()

    @classmethod
    def from_table(cls, sources: pd.DataFrame, local_fallback: bool = True) -> SourceIndex:
        index = cls(local_fallback=local_fallback)
        if sources is None or sources.empty:
            return index
        has_facts = sources["line"] == FACTS_LINE
        for file, text in sources.loc[has_facts, ["file", "facts"]].itertuples(index=False):
            try:
                index.facts[file] = json.loads(text) if text else {}
            except ValueError:
                index.facts[file] = {}
        body = sources.loc[~has_facts, ["file", "line", "text"]]
        texts = body["text"].astype(object).where(body["text"].notna(), "")
        keys = zip(body["file"].tolist(), body["line"].astype("int64").tolist())
        index.lines = dict(zip(keys, texts.tolist()))  # columns to lists: no row objects
        return index

    def _load_local(self, file: str) -> None:
        if file in self.facts or file in self.read_locally or not self.local_fallback:
            return
        self.read_locally.add(file)
        text = read_source(None, file)
        if text is None:
            return
        self.facts[file] = file_facts(text)
        for number, line in enumerate(text.splitlines(), start=1):
            self.lines[(file, number)] = line.rstrip()
        if self._by_file is not None:
            self._by_file[file] = [line.rstrip() for line in text.splitlines()]

    def imports(self, file: str) -> dict[str, str]:
        """Names a module's imports bind -> what they name (`sq` -> `sqlite3` for `import sqlite3
        as sq`, `connect` -> `sqlite3.connect` for `from sqlite3 import connect`), so a call
        named on a line can be told by its real name. Made once per file from its lines."""
        found = self._imports.get(file)
        if found is None:
            self._load_local(file)
            if self._by_file is None:  # one pass over every line, the first time only
                numbered: dict[str, list[tuple[int, str]]] = {}
                for (name, number), line in self.lines.items():
                    numbered.setdefault(name, []).append((number, line))
                self._by_file = {
                    name: [line for _, line in sorted(rows)] for name, rows in numbered.items()
                }
            found = self._imports[file] = _import_names("\n".join(self._by_file.get(file, [])))
        return found

    def text(self, file: str, line: int) -> str | None:
        self._load_local(file)
        return self.lines.get((file, line))

    def file_facts(self, file: str) -> dict:
        self._load_local(file)
        return self.facts.get(file) or {}

    def with_at(self, file: str, line: int) -> list | None:
        """The innermost with statement whose header holds `line`, as [first, header_last, ...]."""
        found = None
        for stmt in self.file_facts(file).get("with", []):
            if stmt[0] <= line <= stmt[1] and (found is None or stmt[0] >= found[0]):
                found = stmt
        if found is None:
            text = (self.text(file, line) or "").lstrip()
            if text.startswith(("with ", "async with ")):  # no facts: trust the text
                return [line, line, line, text.startswith("async")]
        return found

    def with_lines(self, file: str, lines: np.ndarray) -> np.ndarray:
        """`with_at(file, line) is not None` for many lines of one file at once."""
        lines = np.asarray(lines, dtype=np.int64)
        spans = [stmt[:2] for stmt in self.file_facts(file).get("with", [])]
        held: np.ndarray = np.zeros(len(lines), dtype=bool)
        if spans:
            first, last = np.array(spans, dtype=np.int64).T
            held = ((first <= lines[:, None]) & (lines[:, None] <= last)).any(axis=1)
        for i in np.flatnonzero(~held).tolist():  # no statement holds it: the text decides
            text = (self.lines.get((file, int(lines[i]))) or "").lstrip()
            held[i] = text.startswith(("with ", "async with "))
        return held

    def function_at(self, file: str, line: int) -> tuple[str, dict] | None:
        """The innermost function (qualname, facts) whose lines hold `line`."""
        best = None
        for qualname, fn in self.file_facts(file).get("functions", {}).items():
            if fn["first"] <= line <= fn["last"]:
                if best is None or fn["first"] >= best[1]["first"]:
                    best = (qualname, fn)
        return best

    def class_of(self, file: str, qualname: str) -> dict | None:
        """The class a method belongs to (by qualname prefix), with its facts."""
        classes: dict[str, dict] = self.file_facts(file).get("classes", {})
        owner = qualname.rsplit(".", 1)[0] if "." in qualname else ""
        return classes.get(owner)

    def is_enter_call(self, file: str, line: int) -> bool:
        if line in self.file_facts(file).get("enter_calls", []):
            return True
        return bool(re.search(r"\.__a?enter__\(", self.text(file, line) or ""))


def _import_names(text: str) -> dict[str, str]:
    """The import statements' bindings of a module's text (see SourceIndex.imports), those that
    rename: a plain `import os` binds os to itself. {} when the text does not parse."""
    import ast

    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return {}
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    names[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names
