"""Record-time capture of the target's source: lines and the per-function facts causes need.

The recording session (cmtrace.record.session) keeps a SourceCollector, which reads each file
the first time a stack names it; at the end its rows (schema.SOURCES) go into the trace through
the writer, so a laptop analysing the trace later, with none of the target's files, gives the
same answer as the server that recorded it. The analysis layer (cmtrace.analysis.code) reads the
rows back and uses `file_facts` for files a trace lacks: the facts format is part of the dataset
contract, defined here once.

For each file there is one row per source line (text, enclosing function) and one row with
`line == 0` whose `facts` holds the file's facts as JSON (see `file_facts`).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

MAX_SOURCE_BYTES = 4 << 20  # a generated multi-megabyte module is not worth its space
FACTS_LINE = 0  # the row holding a file's facts
CONTEXTMANAGER_DECORATORS = {"contextmanager", "asynccontextmanager"}
COMMAND_FILE = "<string>"  # co_filename of a `python -c` program


def capture_sources(pid: int | None, files: Iterable[str]) -> list[dict]:
    """SOURCES rows for `files` (paths as the target saw them), read through its mount namespace."""
    rows: list[dict] = []
    for file in sorted(set(files)):
        text = read_source(pid, file)
        if text is not None:
            rows.extend(source_rows(file, text))
    return rows


class SourceCollector:
    """Reads each file the first time a stack names it, while its process still lives.

    A target in a container or chroot, or one that exits before recording stops, can only be
    read through /proc/PID/root while it runs: the recorder calls `add(pid, file)` as the
    symbolizer meets new files, and `rows()` at the end (retrying what could not be read).
    """

    def __init__(self) -> None:
        self._texts: dict[str, str | None] = {}
        self._roots: dict[int, str] = {}  # pid -> its root directory as this tracer sees it
        self._programs: dict[int, str] = {}  # pid -> the `python -c` program it runs
        self._text_bytes = 0  # of the files read so far

    def note_program(self, pid: int, argv: list[str] | None = None) -> None:
        """Keep the `-c` program of a Python process (its frames say `<string>`, a file no one
        can read later): called when the process is first seen or exec'd, while it lives, or
        with the command line a backend read while it held the process (`argv`)."""
        if argv is None:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = [a.decode(errors="replace") for a in f.read().split(b"\0")[:-1]]
            except OSError:
                return
        program = command_program(argv)
        if program is not None and len(program) <= MAX_SOURCE_BYTES:
            self._programs[pid] = program

    def note_root(self, pid: int) -> None:
        """Remember where a chrooted target's files are: once it has exited, /proc/PID/root is
        gone but its files are still under that directory (`chroot DIR python ...`)."""
        try:
            root = os.readlink(f"/proc/{pid}/root")
        except OSError:
            return
        if root != "/" and os.path.isdir(root):
            self._roots[pid] = root

    def add(self, pid: int | None, file: str) -> None:
        if self._texts.get(file) is None:
            self._texts[file] = read_source(pid, file, self._roots.get(pid or 0))
            self._text_bytes += len(self._texts[file] or "")

    def expected_part_bytes(self) -> int:
        """What the sources part will take on disk, for --max-size: it is written only at the
        end. Measured: 281 KB of source text (11 files, with their facts and function names)
        made a 130 KB part, so half the text is an upper estimate."""
        return (self._text_bytes + sum(map(len, self._programs.values()))) // 2

    def rows(self, pid: int | None = None) -> list[dict]:
        out: list[dict] = []
        roots = sorted(set(self._roots.values()))
        for file in sorted(self._texts):
            text = self._texts[file]
            for root in [None, *roots] if text is None else ():
                text = read_source(pid, file, root)
                if text is not None:
                    break
            if text is not None:
                out.extend(source_rows(file, text))
        return out + program_rows(self._programs)


def command_program(argv: list[str]) -> str | None:
    """The program a Python command line gives with -c (`python3 -I -c CODE ARGS`,
    `python -Sc CODE`), None for any other command line."""
    if not argv or not os.path.basename(argv[0]).startswith(("python", "pypy")):
        return None
    args = iter(argv[1:])
    for arg in args:
        if arg in ("-", "--") or not arg.startswith("-"):
            return None  # a script, stdin: no -c
        if arg.startswith("--"):
            if arg == "--check-hash-based-pycs":
                next(args, None)
            continue
        for i, flag in enumerate(arg[1:], start=1):
            if flag == "c":
                return arg[i + 1 :] or next(args, None)
            if flag == "m":
                return None
            if flag in "WX":  # takes the rest of the word, or the next one
                if i == len(arg) - 1:
                    next(args, None)
                break
    return None


def program_file(program: str) -> str:
    """The file name a `-c` program's text is stored under: `<string>#` and a digest of the
    text, so that the processes that ran the same program share it."""
    return f"{COMMAND_FILE}#{hashlib.sha1(program.encode()).hexdigest()[:8]}"


def program_rows(programs: dict[int, str]) -> list[dict]:
    """SOURCES rows of each distinct `-c` program; its facts also list the `pids` that ran it."""
    pids: dict[str, list[int]] = {}
    for pid, program in programs.items():
        pids.setdefault(program, []).append(pid)
    out: list[dict] = []
    for program, ran in pids.items():
        rows = source_rows(program_file(program), program)
        facts = json.loads(rows[0]["facts"])
        rows[0]["facts"] = json.dumps({**facts, "pids": sorted(ran)}, separators=(",", ":"))
        out.extend(rows)
    return out


def read_source(pid: int | None, file: str, root: str | None = None) -> str | None:
    """The text of `file` as process `pid` sees it (its root may be a container's); `root`:
    the directory it was chrooted to, tried when the process is gone."""
    if not file or file.startswith("<") or not file.endswith((".py", ".pyw")):
        return None
    candidates = [f"/proc/{pid}/root{file}"] if pid and file.startswith("/") else []
    if root and file.startswith("/"):
        candidates.append(root.rstrip("/") + file)
    candidates.append(file)
    for candidate in candidates:
        try:
            if os.path.getsize(candidate) > MAX_SOURCE_BYTES:
                return None
            return Path(candidate).read_bytes().decode("utf-8", errors="replace")
        except OSError:
            continue
    return None


def source_rows(file: str, text: str) -> list[dict]:
    facts = file_facts(text)
    owner = _line_owners(facts, text.count("\n") + 1)
    rows = [{"file": file, "line": FACTS_LINE, "text": None, "function": None,
             "facts": json.dumps(facts, separators=(",", ":"))}]  # fmt: skip
    for number, line in enumerate(text.splitlines(), start=1):
        rows.append(
            {
                "file": file,
                "line": number,
                "text": line.rstrip(),
                "function": owner.get(number),
                "facts": None,
            }  # fmt: skip
        )
    return rows


def _line_owners(facts: dict, n_lines: int) -> dict[int, str]:
    """Innermost function qualname of each line (functions listed outer before inner)."""
    owner: dict[int, str] = {}
    spans = sorted(facts["functions"].items(), key=lambda kv: (kv[1]["first"], -kv[1]["last"]))
    for qualname, fn in spans:
        for line in range(fn["first"], min(fn["last"], n_lines) + 1):
            owner[line] = qualname
    return owner


def file_facts(text: str) -> dict:
    """Facts of one module, as plain JSON-able data.

    - "with": [[first_line, header_last_line, body_last_line, is_async], ...] for every with
      statement (a frame executing a line in the header is evaluating the manager or entering it);
    - "functions": {qualname: {first, last, generator, async, contextmanager, yields,
      unprotected_yields, del_class}} where an unprotected yield is one outside any try/finally
      and any with block, so cleanup after it is skipped when the caller's block raises;
    - "classes": {qualname: {first, last, methods}};
    - "enter_calls": lines that call `__enter__`/`__aenter__` by hand;
    - "error": the syntax error, when the file does not parse;
    - "pids": for a `python -c` program (program_rows), the processes that ran it.
    """
    facts: dict = {"with": [], "functions": {}, "classes": {}, "enter_calls": []}
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError) as exc:
        facts["error"] = str(exc)
        return facts
    _FactVisitor(facts).visit(tree)
    return facts


def _decorator_name(node: ast.expr) -> str:
    if isinstance(node, ast.Call):
        node = node.func
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Name):
        return node.id
    return ""


class _FactVisitor(ast.NodeVisitor):
    def __init__(self, facts: dict):
        self.facts = facts
        self.scope: list[str] = []  # qualname parts
        self.function: list[dict] = []  # facts of the enclosing functions
        self.protection: list[int] = [0]  # try/finally + with depth, per function

    def _qualname(self, name: str) -> str:
        return ".".join(self.scope + [name])

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        methods = [
            n.name for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
        ]
        first = min([node.lineno] + [d.lineno for d in node.decorator_list])
        self.facts["classes"][self._qualname(node.name)] = {
            "first": first, "last": node.end_lineno, "methods": methods,
        }  # fmt: skip
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    def _visit_function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        decorators = {_decorator_name(d) for d in node.decorator_list}
        qualname = self._qualname(node.name)
        fn: dict[str, Any] = {
            "first": min([node.lineno] + [d.lineno for d in node.decorator_list]),
            "def": node.lineno,
            "last": node.end_lineno,
            "generator": False,
            "async": isinstance(node, ast.AsyncFunctionDef),
            "contextmanager": bool(decorators & CONTEXTMANAGER_DECORATORS),
            "yields": [],
            "unprotected_yields": [],
        }
        self.facts["functions"][qualname] = fn
        self.scope.extend([node.name, "<locals>"])
        self.function.append(fn)
        self.protection.append(0)
        for child in node.body:
            self.visit(child)
        self.protection.pop()
        self.function.pop()
        del self.scope[-2:]

    visit_FunctionDef = _visit_function
    visit_AsyncFunctionDef = _visit_function

    def visit_Lambda(self, node: ast.Lambda) -> None:
        return  # a lambda's yields are its own; it holds no with statements

    def _visit_with(self, node: ast.With | ast.AsyncWith) -> None:
        header_last = max(
            (item.optional_vars or item.context_expr).end_lineno or node.lineno
            for item in node.items
        )
        self.facts["with"].append(
            [node.lineno, header_last, node.end_lineno, isinstance(node, ast.AsyncWith)]
        )
        for item in node.items:
            self.visit(item)
        self.protection[-1] += 1
        for child in node.body:
            self.visit(child)
        self.protection[-1] -= 1

    visit_With = _visit_with
    visit_AsyncWith = _visit_with

    def _visit_try(self, node: ast.Try) -> None:
        protected = bool(node.finalbody)
        self.protection[-1] += protected
        for child in node.body + node.handlers + node.orelse:
            self.visit(child)
        self.protection[-1] -= protected
        for child in node.finalbody:
            self.visit(child)

    visit_Try = _visit_try
    visit_TryStar = _visit_try

    def _visit_yield(self, node: ast.Yield | ast.YieldFrom) -> None:
        if self.function:
            fn = self.function[-1]
            fn["generator"] = True
            fn["yields"].append(node.lineno)
            if self.protection[-1] == 0:
                fn["unprotected_yields"].append(node.lineno)
        self.generic_visit(node)

    visit_Yield = _visit_yield
    visit_YieldFrom = _visit_yield

    def visit_Call(self, node: ast.Call) -> None:
        if isinstance(node.func, ast.Attribute) and node.func.attr in ("__enter__", "__aenter__"):
            self.facts["enter_calls"].append(node.lineno)
        self.generic_visit(node)
