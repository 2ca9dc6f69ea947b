"""Which library API opened a leaked fd, and the fix that API needs (issue 13).

The API of an opening stack is the outermost library frame under the site (the innermost user
frame): the function the user's line called, as `module.Qualified.name` without `.__init__`
(`logging.FileHandler`, `subprocess.Popen`, `asyncpg.pool.Pool.acquire`). Where the user's line
calls straight into C and leaves no Python frame (`open`, `os.open`, `sqlite3.connect`,
`select.epoll`), it is the callable named on the site's source line. Otherwise there is none.

API_FIXES is the table of well-known APIs (a shell-style pattern over the API name -> the fix
that API needs); the first pattern that matches wins. An API not in it keeps the cause's fix.
"""

from __future__ import annotations

import ast
import fnmatch
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from cmtrace.analysis.code import Frame, SourceIndex

if TYPE_CHECKING:
    from cmtrace.analysis.stacks import Stacks

# Where a module's dotted name starts in a file name: after site-/dist-packages, or after the
# standard library's directory.
_PACKAGE_ROOT = re.compile(r".*/(?:site|dist)-packages/|.*/lib(?:64)?/python\d+\.\d+t?/")
_FROZEN = re.compile(r"^<frozen (?P<module>[\w.]+)>$")

_HANDLER = (
    "a logging handler made per call stays on its logger with its file open: create it once "
    "(at start-up) and reuse it, or when done call `logger.removeHandler(handler)` and then "
    "`handler.close()`."
)
_POPEN = (
    "reap the child and close its pipes: `proc.communicate()`, or `proc.wait()` and close "
    "proc.stdout/stdin/stderr; `with subprocess.Popen(...) as proc:` does both, and "
    "subprocess.run() needs neither."
)
_SQLITE = (
    "`with sqlite3.connect(...) as db:` only commits (or rolls back) and does not close the "
    "connection: use `with contextlib.closing(sqlite3.connect(...)) as db:` or call "
    "`db.close()` when done."
)
_POOL = (
    "a connection checked out of a pool and never given back: use `async with pool.acquire() "
    "as conn:` (`with pool.connection()` for sync pools), or give it back with "
    "`pool.release(conn)` in a finally."
)
_DB_CONNECT = (
    "a database connection made per call and never closed: close it in a finally "
    "(`conn.close()`, `await conn.close()`), or use a pool created once."
)
_HTTP_CLIENT = (
    "a client made per call opens its own connection pool: create it once, reuse it for every "
    "request and close it at shutdown, or use `with`/`async with` around it."
)
_TEMPFILE = (
    "use it in a `with tempfile.TemporaryFile()`/`NamedTemporaryFile()` statement, or close() "
    "it; tempfile.mkstemp() returns an open fd besides the name: `os.close(fd)` it."
)
_MKSTEMP = (
    "mkstemp() returns an open fd besides the name: `os.close(fd)` it, or wrap it as "
    "`with os.fdopen(fd) as f:`."
)
_SELECTOR = (
    "a selector or event loop holds an epoll fd (a loop also its self-pipe) until closed: "
    "`selector.close()` / `loop.close()`, `with selectors.DefaultSelector() as sel:`, or let "
    "asyncio.run() make and close the loop."
)
_MULTIPROCESSING = (
    "pools, queues and pipes hold pipes and semaphores until closed: `with "
    "multiprocessing.Pool() as pool:`, or `pool.close(); pool.join()`; close Connections and "
    "`queue.close()` when done."
)
_ARCHIVE = (
    "open the archive in a with statement (`with zipfile.ZipFile(...) as z:`, `with "
    "tarfile.open(...) as t:`), or close() it when done."
)
_SOCKET = (
    "close the socket on every path: `with socket.socket(...) as s:` / `with "
    "socket.create_connection(...) as s:`, or `s.close()` in a finally."
)
_OPEN = "open it in a with statement: `with open(...) as f:`, or close() it in a finally."
_OS_FD = (
    "an os-level fd is a plain int that nothing closes for you: `os.close(fd)` in a finally, "
    "or hand it to `with os.fdopen(fd) as f:`."
)
_SERVER_CONNECTION = (
    "a connection the server accepted and handed to its handler, which never closed it: close "
    "it on every path of the handler, `writer.close()` and `await writer.wait_closed()` in a "
    "finally (asyncio.start_server), `transport.close()` (a Protocol), `request.close()` "
    "(socketserver, when a mixin or override skips shutdown_request); closing the server "
    "does not close the connections its handlers keep."
)
_URLOPEN = "use the response in a with statement: `with urllib.request.urlopen(...) as r:`."

# Library APIs: pattern over the API name (fnmatch, case-sensitive) -> its fix; first wins.
# Their fix is worth saying whatever the cause (a handler made per call leaks the same way in a
# generator as in plain code).
LIBRARY_FIXES: tuple[tuple[str, str], ...] = (
    ("asyncio.selector_events.*._accept_connection", _SERVER_CONNECTION),
    ("socketserver.*.get_request", _SERVER_CONNECTION),
    ("logging.*Handler", _HANDLER),
    ("logging.handlers.*", _HANDLER),
    ("logging.basicConfig", _HANDLER),
    ("subprocess.Popen", _POPEN),
    ("subprocess.*", _POPEN),
    ("asyncio.*create_subprocess_*", _POPEN),
    ("sqlite3.connect", _SQLITE),
    ("sqlite3.dbapi2.connect", _SQLITE),
    ("*.pool.*.acquire", _POOL),
    ("*pool*.getconn", _POOL),
    ("*pool*.connection", _POOL),
    ("sqlalchemy.*.connect", _POOL),
    ("asyncpg.connect", _DB_CONNECT),
    ("asyncpg.connection.connect", _DB_CONNECT),
    ("psycopg*.connect", _DB_CONNECT),
    ("pymysql*.connect", _DB_CONNECT),
    ("httpx.*Client", _HTTP_CLIENT),
    ("requests.*Session", _HTTP_CLIENT),
    ("requests.session", _HTTP_CLIENT),
    ("aiohttp.*ClientSession", _HTTP_CLIENT),
    ("urllib3.*PoolManager", _HTTP_CLIENT),
    ("tempfile.mkstemp", _MKSTEMP),
    ("tempfile.*", _TEMPFILE),
    ("selectors.*", _SELECTOR),
    ("select.epoll", _SELECTOR),
    ("select.kqueue", _SELECTOR),
    ("select.devpoll", _SELECTOR),
    ("asyncio.*new_event_loop", _SELECTOR),
    ("asyncio.*EventLoop", _SELECTOR),
    ("asyncio.*get_event_loop", _SELECTOR),
    ("multiprocessing.*", _MULTIPROCESSING),
    ("concurrent.futures.*ProcessPoolExecutor", _MULTIPROCESSING),
    ("zipfile.*", _ARCHIVE),
    ("tarfile.*", _ARCHIVE),
    ("urllib.request.urlopen", _URLOPEN),
)

# Plain openers: their fix replaces only a generic one (GENERIC_FIX_CAUSES); after a
# structural cause's fix ("the generator stops inside its with") it would say nothing new.
OPENER_FIXES: tuple[tuple[str, str], ...] = (
    ("socket.*", _SOCKET),
    ("open", _OPEN),
    ("io.open", _OPEN),
    ("builtins.open", _OPEN),
    ("codecs.open", _OPEN),
    ("gzip.*", _OPEN),
    ("bz2.*", _OPEN),
    ("lzma.*", _OPEN),
    ("pathlib.*Path.open", _OPEN),
    ("pathlib.*Path.read_*", _OPEN),
    ("os.fdopen", _OPEN),
    ("os.open", _OS_FD),
    ("os.pipe*", _OS_FD),
    ("os.dup*", _OS_FD),
    ("os.memfd_create", _OS_FD),
    ("os.eventfd", _OS_FD),
    ("os.pidfd_open", _OS_FD),
    ("os.openpty", _OS_FD),
    ("pty.*", _OS_FD),
)
API_FIXES = LIBRARY_FIXES + OPENER_FIXES

# Causes whose own fix is generic: a known API's fix replaces it. The other causes explain a
# structure of the user's code (a generator, a @contextmanager, a hand-called __enter__...):
# their fix stays and the API's fix follows it.
GENERIC_FIX_CAUSES = frozenset({"no-context-manager", "unknown"})


@lru_cache(maxsize=1 << 12)
def api_fix(api: str | None) -> str | None:
    """The fix of the first API_FIXES pattern matching `api` (None: not a well-known API)."""
    return _first_match(api, API_FIXES)


@lru_cache(maxsize=1 << 12)
def module_of(file: str) -> str | None:
    """The dotted module name of a library file (`.../lib/python3.11/logging/__init__.py` ->
    `logging`), or the file's stem for a file under neither root; None without a file."""
    if not file:
        return None
    frozen = _FROZEN.match(file)
    if frozen:
        return frozen.group("module")
    root = _PACKAGE_ROOT.match(file)
    rest = file[root.end() :] if root else file.rsplit("/", 1)[-1]
    rest = re.sub(r"\.(?:py|pyc|pyw)$", "", rest)
    parts = [p for p in rest.split("/") if p]
    if parts and parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts) or None


def qualified_name(frame: Frame, src: SourceIndex) -> str:
    """The frame's qualified name: co_qualname where recorded (3.11+); before 3.11 only the
    function's name is recorded, so the class is taken from the source's facts (the function
    defined at the frame's first line), else the bare name."""
    if frame.qualname and frame.qualname != frame.function:
        return frame.qualname
    for qualname, fn in src.file_facts(frame.file).get("functions", {}).items():
        if fn.get("first") == frame.firstlineno and qualname.rsplit(".", 1)[-1] == frame.function:
            return str(qualname)
    return frame.function


def frame_api(frame: Frame, src: SourceIndex, called: str | None = None) -> str | None:
    """`module.qualname` of a library frame, without `.__init__`. A private method called
    through its public twin (`pool.acquire()` running `Pool._acquire`) is named by the twin the
    user's line called (`called`, the callable named on the site's line)."""
    module = module_of(frame.file)
    if module is None:
        return None
    name = qualified_name(frame, src)
    public = called.rsplit(".", 1)[-1] if called else ""
    if name == "__init__" or name.endswith(".__init__"):
        name = name[: -len(".__init__")] if name != "__init__" else ""
        if public[:1].isupper() and "." not in name and public != name:
            # the class the line names: a subclass inheriting __init__ (selectors.DefaultSelector),
            # or the class a pre-3.11 frame could not tell without the library's source
            name = public
    owner, _, last = name.rpartition(".")
    if last.startswith("_") and not last.startswith("__") and last.lstrip("_") == public:
        name = f"{owner}.{public}" if owner else public
    return f"{module}.{name}" if name and name != "<module>" else module


# Names the tables above match that open no fd: a line calling one inside an opener's
# arguments (`sock.recvmsg(16, socket.CMSG_SPACE(n))`) is named by the opener, not by it.
NOT_OPENERS = (
    "socket.CMSG_*", "socket.inet_*", "socket.hton*", "socket.ntoh*", "socket.if_*",
    "socket.gethostname", "socket.*defaulttimeout", "os.path.*", "os.fspath", "os.get*",
)  # fmt: skip


@dataclass(frozen=True)
class Call:
    """A call expression of a source text: its lines, the lines of the expression it calls
    (`a.b` of `a.b(...)`) and the dotted name of that expression."""

    first: int
    last: int
    func_first: int
    func_last: int
    name: str


def called_name(line: str | None) -> str | None:
    """The dotted name of the call a source line makes (`fd = os.open(p)` -> `os.open`): a
    well-known opener where the line makes several calls, else the outermost call. Lines that
    are a compound statement's header (`with open(p) as f:`) or part of one parse too."""
    tree = _parse_line(line)
    if tree is None:
        return None
    return pick_call(_calls(tree), line=2)  # the line is the body of `async def _():`


def called_at(src: SourceIndex, file: str, line: int) -> str | None:
    """The dotted name of the call a frame executing `file:line` makes, read from the whole
    statement around the line: a call spread over several lines is named by what it calls,
    whichever of its lines the interpreter reports (where the call starts before 3.10, the
    line of the called name since). The line alone where the file is not whole."""
    by_line = _calls_by_line(src, file)
    if by_line is None:
        return called_name(src.text(file, line))
    return pick_call(by_line.get(line, []), line)


def pick_call(calls: list[Call], line: int) -> str | None:
    """Of the calls whose lines hold `line` (outer before inner), the one that opened the fd:
    a well-known opener first (`json.load(open(p))`: open; a user function called with it has
    not run yet), then a call whose name is on the line, then the outermost."""

    def rank(call: Call) -> tuple[bool, bool]:
        return (not is_opener(call.name), not call.func_first <= line <= call.func_last)

    ranked = sorted(calls, key=rank)  # stable: outer before inner within a rank
    return ranked[0].name if ranked else None


def is_opener(name: str) -> bool:
    """Is `name` a well-known API that opens fds (in API_FIXES, not in NOT_OPENERS)?"""
    return api_fix(name) is not None and not any(
        fnmatch.fnmatchcase(name, pattern) for pattern in NOT_OPENERS
    )


def _calls(tree: ast.AST) -> list[Call]:
    """The named calls of a tree, outer before inner (ast.walk is breadth first)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name:
                out.append(Call(node.lineno, node.end_lineno or node.lineno, node.func.lineno,
                                node.func.end_lineno or node.func.lineno, name))  # fmt: skip
    return out


# The calls of each file of the last SourceIndex asked, by line: per site, the file's text is
# parsed once (a site file is asked for thousands of stacks).
_FILE_CALLS: tuple[SourceIndex | None, dict[str, dict[int, list[Call]] | None]] = (None, {})


def _calls_by_line(src: SourceIndex, file: str) -> dict[int, list[Call]] | None:
    """line -> the calls whose lines hold it, for one file of `src`; None without its text (or
    when it does not parse)."""
    global _FILE_CALLS
    if _FILE_CALLS[0] is not src:
        _FILE_CALLS = (src, {})
    cache = _FILE_CALLS[1]
    if file not in cache:
        cache[file] = _index_calls(_whole_text(src, file))
    return cache[file]


def _whole_text(src: SourceIndex, file: str) -> str | None:
    lines: list[str] = []
    while (text := src.text(file, len(lines) + 1)) is not None:
        lines.append(text)
    return "\n".join(lines) if lines else None


def _index_calls(text: str | None) -> dict[int, list[Call]] | None:
    if text is None:
        return None
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return None
    by_line: dict[int, list[Call]] = {}
    for call in _calls(tree):
        for line in range(call.first, call.last + 1):
            by_line.setdefault(line, []).append(call)
    return by_line


@lru_cache(maxsize=1 << 14)
def _parse_line(line: str | None) -> ast.AST | None:
    """One source line as the body of an async function (so await, async with, return and
    yield parse), completed into a statement where it is a header or an open bracket."""
    if not line or not line.strip():
        return None
    body = "async def _():\n    " + line.strip()
    opened = sum(line.count(c) for c in "([{") - sum(line.count(c) for c in ")]}")
    for variant in (body, body + "\n        pass", body + ")" * max(opened, 0),
                    body + ")" * max(opened, 0) + ":\n        pass"):  # fmt: skip
        try:
            return ast.parse(variant)
        except (SyntaxError, ValueError):
            continue
    return None


def _dotted(node: ast.expr) -> str | None:
    """`a.b.c` of a Name/Attribute chain; None for anything else (`f()()`, `x[0].m`)."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return ".".join(reversed(parts))


# Library frames that only pass a call on (file suffix, function names): the API is the frame
# they called. `with pool.connection():` runs contextlib's __enter__, which runs the pool's
# @contextmanager generator: that generator is the API.
PLUMBING = (
    ("/contextlib.py", ("__enter__", "__aenter__", "enter_context", "enter_async_context")),
)


# Library frames that accept connections for a server the user's code set up: the innermost
# frames of an accepted socket's stack (under socket.socket.accept, ACCEPT_DEPTH). Their API
# is that frame (the user's line under it only runs the event loop, `asyncio.run(main())`, or
# the server's serve_forever()).
SERVER_ACCEPTS = (
    ("/asyncio/selector_events.py", ("_accept_connection",)),
    ("/socketserver.py", ("get_request",)),
)
ACCEPT_DEPTH = 2  # the accept frame, or the one socket.accept was called from


def _frame_in(frame: Frame, table: tuple[tuple[str, tuple[str, ...]], ...]) -> bool:
    """Is the frame one of a (file suffix, function names) table's?"""
    return any(frame.file.endswith(file) and frame.function in functions
               for file, functions in table)  # fmt: skip


def is_server_accept(frame: Frame) -> bool:
    return _frame_in(frame, SERVER_ACCEPTS)


def is_plumbing(frame: Frame) -> bool:
    return _frame_in(frame, PLUMBING)


def api_of(frames: list[Frame], src: SourceIndex) -> str | None:
    """The API of an opening stack (innermost first): see the module's docstring."""
    accept = next((f for f in frames[:ACCEPT_DEPTH] if is_server_accept(f)), None)
    if accept is not None:
        return frame_api(accept, src)
    site = next((i for i, f in enumerate(frames) if f.is_user), None)
    if site is None:
        return None
    library = site - 1
    while library > 0 and is_plumbing(frames[library]):
        library -= 1
    return _api(frames[library] if library >= 0 else None, frames[site], src)


def call_api(src: SourceIndex, file: str, line: int) -> str | None:
    """The API a line of user code calls straight into C (no library frame under it)."""
    called = called_at(src, file, line)
    return _imported_name(called, src.imports(file)) if called else None


def _api(library: Frame | None, site: Frame, src: SourceIndex) -> str | None:
    return _api_of_call(library, called_at(src, site.file, site.line), site.file, src)


def _api_of_call(library: Frame | None, called: str | None, site_file: str,
                 src: SourceIndex) -> str | None:  # fmt: skip
    """The API of a site whose line calls `called`, over the library frame under it."""
    if library is None:
        return _imported_name(called, src.imports(site_file)) if called else None
    return frame_api(library, src, called)


def _imported_name(called: str, imports: dict[str, str]) -> str:
    """A called name by what its first part was imported as (`sq.connect` -> `sqlite3.connect`
    after `import sqlite3 as sq`; `connect` -> `sqlite3.connect` after `from sqlite3 import
    connect`)."""
    first, dot, rest = called.partition(".")
    real = imports.get(first)
    return f"{real}{dot}{rest}" if real else called


def api_per_stack(stacks: Stacks, src: SourceIndex, wanted: np.ndarray | None = None) -> np.ndarray:
    """Per stack of a cmtrace.analysis.stacks.Stacks (in its `ids` order): its API or None,
    named only for the stacks at positions `wanted` (all when None; opening stacks, say).

    The site row and the row under it are found with one reduction over the stack rows; the
    name is made once per distinct (library frame, site frame) pair."""
    count = len(stacks.ids)
    out: np.ndarray = np.full(count, None, dtype=object)
    if not count:
        return out
    rows = len(stacks.row_frame)
    user_row = np.where(stacks.is_user[stacks.row_frame], np.arange(rows), rows)
    first_user = np.minimum.reduceat(user_row, stacks.starts[:-1])
    has_site = first_user < stacks.starts[1:]
    inner = first_user > stacks.starts[:-1]
    padded = np.append(stacks.row_frame, -1)
    site_code = np.where(has_site, padded[np.minimum(first_user, rows)], -1)
    library_code = np.where(has_site & inner, padded[np.maximum(first_user - 1, 0)], -1)
    asked: np.ndarray = np.ones(count, dtype=bool)
    if wanted is not None:
        asked[:] = False
        asked[wanted[wanted >= 0]] = True
    named = asked & has_site
    namer = _PairNamer(stacks, src)
    # a server's accept among the innermost frames: decided once per distinct frame code
    not_yet = asked.copy()
    for depth in range(ACCEPT_DEPTH):
        row: np.ndarray = stacks.starts[:-1] + depth
        frame_code = np.where(row < stacks.starts[1:], padded[np.minimum(row, rows)], -1)
        for code in np.unique(frame_code[not_yet]).tolist():
            name = namer.server_accept(int(code))
            if name is not None:
                hit = not_yet & (frame_code == code)
                out[hit], not_yet[hit], named[hit] = name, False, False
    for i in np.flatnonzero(named).tolist():
        library = int(library_code[i])
        if namer.plumbing(library):
            out[i] = api_of(stacks.get(int(stacks.ids[i])), src)  # rare: the whole stack
        else:
            out[i] = namer.name(library, int(site_code[i]))
    return out


class _PairNamer:
    """The API of (library frame code, site frame code) pairs, each part decided once: a
    varied trace has hundreds of thousands of distinct pairs over a few hundred library
    frames, and the site's called name depends on its line alone."""

    def __init__(self, stacks: Stacks, src: SourceIndex) -> None:
        self.stacks, self.src = stacks, src
        self._plumbing: dict[int, bool] = {}
        self._calls: dict[int, tuple[str | None, str]] = {}
        self._names: dict[tuple[int, str | None, str], str | None] = {}
        self._accepts: dict[int, str | None] = {}

    def server_accept(self, innermost: int) -> str | None:
        """The API of a server's accept frame (SERVER_ACCEPTS), None for any other frame."""
        if innermost < 0:
            return None
        if innermost not in self._accepts:
            frame = self.stacks.frame(innermost)
            self._accepts[innermost] = (
                frame_api(frame, self.src) if is_server_accept(frame) else None
            )
        return self._accepts[innermost]

    def plumbing(self, library: int) -> bool:
        if library < 0:
            return False
        if library not in self._plumbing:
            self._plumbing[library] = is_plumbing(self.stacks.frame(library))
        return self._plumbing[library]

    def name(self, library: int, site: int) -> str | None:
        if site not in self._calls:
            frame = self.stacks.frame(site)
            self._calls[site] = (called_at(self.src, frame.file, frame.line), frame.file)
        called, file = self._calls[site]
        key = (library, called, file if library < 0 else "")  # imports matter without a library
        if key not in self._names:
            under = self.stacks.frame(library) if library >= 0 else None
            self._names[key] = _api_of_call(under, called, file, self.src)
        return self._names[key]


def explain(cause: str, fix: str, api: str | None, site: Frame | None,
            held_by: Frame | None) -> str:  # fmt: skip
    """The fix of a leak whose cause gave `fix`, knowing the API that opened it.

    A known API's fix replaces a generic one (GENERIC_FIX_CAUSES, and a with statement that
    used the API itself, whose own __exit__ did not close: `with sqlite3.connect() as db`); it
    follows any other cause's fix."""
    specific = api_fix(api)
    if specific is None:
        return fix
    where = f"{site.file}:{site.line}: " if site is not None else ""
    own_with = held_by is not None and site is not None and held_by == site
    if cause in GENERIC_FIX_CAUSES or (cause == "with-exited-without-close" and own_with):
        return f"{where}{api}: {specific}"
    if _first_match(api, LIBRARY_FIXES) is None:
        return fix  # a plain opener under a structural cause: the cause's fix says it all
    return f"{fix} About {api}: {specific}"


def _first_match(api: str | None, table: tuple[tuple[str, str], ...]) -> str | None:
    for pattern, fix in table:
        if api and fnmatch.fnmatchcase(api, pattern):
            return fix
    return None
