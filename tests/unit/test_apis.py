"""Library-aware explanations (issue 13): the API that opened each leak, its fix, socket services.

Stacks are written by hand as the walker records them (innermost first) over small programs
whose text goes through the recorder's own fact extraction; each case names the API a reader
of the program would: the library function the user's line called, or the C callable it names.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tracebuild import PID, birth, exit_, write_trace

from cmtrace.analysis import load
from cmtrace.analysis.apis import api_fix, api_of, called_name, explain, module_of
from cmtrace.analysis.code import Frame, SourceIndex
from cmtrace.analysis.services import describe_peer, service_of
from cmtrace.cli import main
from cmtrace.trace import schema
from cmtrace.trace.sources import source_rows

APP = "/srv/app/service.py"
# Line numbers matter: the stacks below point into this text (line 1 is "import logging").
PROGRAM = """\
import logging
import socket
import sqlite3


def log_request(path):
    handler = logging.FileHandler(path)
    return handler


def open_socket():
    sock = socket.socket()
    return sock


def record(db_path):
    with sqlite3.connect(db_path) as db:
        db.execute("SELECT 1")
    return db


async def checkout(pool):
    conn = await pool.acquire()
    return conn
"""
# A library file as an interpreter before 3.11 records it: co_name only, no co_qualname. Its
# path exists on no machine, so only the trace's copy of the text can name the class.
OLD_LOGGING = "/opt/py39/lib/python3.9/logging/__init__.py"
OLD_LOGGING_TEXT = """\
class Handler:
    pass


class FileHandler(Handler):
    def __init__(self, filename):
        self.stream = self._open()

    def _open(self):
        return open(self.baseFilename)
"""
LOGGING = "/usr/lib/python3.11/logging/__init__.py"
SOCKET = "/usr/lib/python3.11/socket.py"
POOL = "/venv/lib/python3.11/site-packages/asyncpg/pool.py"


def frame(qualname: str, file: str, line: int, first: int = 1, flags: int = 0) -> Frame:
    return Frame(function=qualname.rsplit(".", 1)[-1], qualname=qualname, file=file, line=line,
                 firstlineno=first, code_flags=flags)  # fmt: skip


def old_frame(function: str, file: str, line: int, first: int) -> Frame:
    """A frame of 3.8-3.10: the qualname column holds co_name."""
    return Frame(function=function, qualname=function, file=file, line=line, firstlineno=first,
                 code_flags=0)  # fmt: skip


@pytest.fixture
def src() -> SourceIndex:
    import pandas as pd

    rows = source_rows(APP, PROGRAM) + source_rows(OLD_LOGGING, OLD_LOGGING_TEXT)
    return SourceIndex.from_table(pd.DataFrame(rows), local_fallback=False)


# --- naming --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "file,module",
    [
        ("/usr/lib/python3.11/logging/__init__.py", "logging"),
        ("/usr/lib/python3.11/logging/handlers.py", "logging.handlers"),
        ("/root/.pyenv/versions/3.13.1/lib/python3.13t/subprocess.py", "subprocess"),
        ("/venv/lib/python3.11/site-packages/asyncpg/pool.py", "asyncpg.pool"),
        ("/usr/lib/python3/dist-packages/requests/sessions.py", "requests.sessions"),
        ("<frozen importlib._bootstrap>", "importlib._bootstrap"),
    ],
)
def test_module_of_a_library_file(file: str, module: str) -> None:
    assert module_of(file) == module


@pytest.mark.parametrize(
    "line,called",
    [
        ("fd = os.open(path, os.O_RDONLY)", "os.open"),
        ("with open(path) as f:  # CAUSE:suspended-generator", "open"),
        ("    with sqlite3.connect(DB_PATH) as db:  # LEAK-SITE db", "sqlite3.connect"),
        ("conn = await pool.acquire()  # LEAK-SITE", "pool.acquire"),
        ("async with pool.acquire() as conn:", "pool.acquire"),
        ("return json.load(open(path))", "open"),  # the well-known API of two calls
        ("ep = select.epoll(", "select.epoll"),  # the first line of a call spread over lines
        ("x = 1", None),
        ("", None),
    ],
)
def test_called_name_of_a_source_line(line: str, called: str | None) -> None:
    assert called_name(line) == called


def test_api_is_the_outermost_library_frame_without_init(src: SourceIndex) -> None:
    frames = [
        frame("FileHandler._open", LOGGING, 1210, 1200),
        frame("FileHandler.__init__", LOGGING, 1190, 1170),
        frame("log_request", APP, 7, 6),
        frame("<module>", APP, 30),
    ]
    assert api_of(frames, src) == "logging.FileHandler"


def test_api_before_311_takes_the_class_from_the_source(src: SourceIndex) -> None:
    frames = [
        old_frame("_open", OLD_LOGGING, 10, 9),
        old_frame("__init__", OLD_LOGGING, 7, 6),
        frame("log_request", APP, 7, 6),
    ]
    assert api_of(frames, src) == "logging.FileHandler"


def test_api_before_311_without_the_source_is_module_and_function(src: SourceIndex) -> None:
    frames = [old_frame("_open", "/opt/py39/lib/python3.9/gone.py", 10, 9),
              frame("log_request", APP, 7, 6)]  # fmt: skip
    assert api_of(frames, src) == "gone._open"
    # a constructor without its class: the class the line calls (`logging.FileHandler(path)`)
    frames = [old_frame("__init__", "/opt/py39/lib/python3.9/gone.py", 10, 9),
              frame("log_request", APP, 7, 6)]  # fmt: skip
    assert api_of(frames, src) == "gone.FileHandler"


def test_api_of_a_call_straight_into_c_is_named_on_the_line(src: SourceIndex) -> None:
    assert api_of([frame("record", APP, 17, 16)], src) == "sqlite3.connect"


def test_api_of_a_c_call_is_named_as_the_module_imported_it() -> None:
    import pandas as pd

    program = ("import sqlite3 as sq\nfrom os import open as raw_open\nimport select\n\n"
               "db = sq.connect(path)\nfd = raw_open(path, 0)\nep = select.epoll()\n")  # fmt: skip
    index = SourceIndex.from_table(pd.DataFrame(source_rows(APP, program)), local_fallback=False)
    named = [api_of([frame("<module>", APP, line)], index) for line in (5, 6, 7)]
    assert named == ["sqlite3.connect", "os.open", "select.epoll"]


def test_api_of_a_pool_checkout_is_the_public_method_called(src: SourceIndex) -> None:
    """asyncpg's Pool.acquire() leaves no frame: its awaitable runs Pool._acquire, under the
    user's `await pool.acquire()` (the frames a real trace of tests/programs/services has)."""
    frames = [
        frame("socket.__init__", SOCKET, 232, 220),
        frame("PoolConnectionHolder.acquire", POOL, 160, 150),
        frame("Pool._acquire.<locals>._acquire_impl", POOL, 860, 855),
        frame("Pool._acquire", POOL, 880, 850),
        frame("checkout", APP, 23, 22, flags=schema.CODE_COROUTINE),
    ]
    assert api_of(frames, src) == "asyncpg.pool.Pool.acquire"


def test_api_under_contextlib_is_the_managers_generator(src: SourceIndex) -> None:
    """`with pool.connection() as conn:` (psycopg_pool): contextlib's __enter__ only runs the
    pool's @contextmanager generator, which is the API."""
    pool = "/venv/lib/python3.11/site-packages/psycopg_pool/pool.py"
    frames = [
        frame("socket.__init__", SOCKET, 232, 220),
        frame("ConnectionPool.getconn", pool, 180, 170),
        frame("ConnectionPool.connection", pool, 150, 140, flags=schema.CODE_GENERATOR),
        frame("_GeneratorContextManager.__enter__", "/usr/lib/python3.11/contextlib.py", 137),
        frame("record", APP, 17, 16),
    ]
    assert api_of(frames, src) == "psycopg_pool.pool.ConnectionPool.connection"
    assert "with pool.connection()" in (api_fix(api_of(frames, src)) or "")


ASYNCIO_ACCEPT = [
    frame("socket.accept", SOCKET, 294, 285),
    frame("BaseSelectorEventLoop._accept_connection",
          "/usr/lib/python3.11/asyncio/selector_events.py", 165, 156),
    frame("BaseEventLoop.run_forever", "/usr/lib/python3.11/asyncio/base_events.py", 607, 590),
]  # fmt: skip


@pytest.mark.parametrize("user", [[frame("<module>", APP, 26)], []], ids=["site", "no-site"])
def test_api_of_a_connection_a_server_accepted_is_the_accept(src: SourceIndex, user) -> None:
    """The user's line under an accepted socket only runs the loop (`asyncio.run(main())`):
    the API is the server's accept, with the handler's fix, with or without a user frame."""
    api = api_of(ASYNCIO_ACCEPT + user, src)
    assert api == "asyncio.selector_events.BaseSelectorEventLoop._accept_connection"
    assert "writer.wait_closed()" in (api_fix(api) or "")


def test_no_user_frame_no_api(src: SourceIndex) -> None:
    assert api_of([frame("socket.__init__", SOCKET, 232)], src) is None


# --- fixes ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "api,words",
    [
        ("logging.FileHandler", "removeHandler"),
        ("logging.handlers.RotatingFileHandler", "removeHandler"),
        ("subprocess.Popen", "wait()"),
        ("sqlite3.connect", "contextlib.closing"),
        ("asyncpg.pool.Pool.acquire", "async with pool.acquire()"),
        ("httpx._client.Client", "create it once"),
        ("requests.sessions.Session", "create it once"),
        ("aiohttp.client.ClientSession", "create it once"),
        ("tempfile.mkstemp", "os.close(fd)"),
        ("selectors.DefaultSelector", "close()"),
        ("multiprocessing.context.BaseContext.Pool", "pool.join()"),
        ("zipfile.ZipFile", "with zipfile.ZipFile"),
        ("socket.socket", "with socket.socket"),
        ("open", "with open"),
    ],
)
def test_well_known_apis_have_their_own_fix(api: str, words: str) -> None:
    fix = api_fix(api)
    assert fix is not None and words in fix


def test_unknown_api_keeps_the_cause_fix() -> None:
    site = frame("f", APP, 7)
    assert api_fix("mylib.Thing") is None
    assert explain("no-context-manager", "generic", "mylib.Thing", site, None) == "generic"


def test_known_api_replaces_a_generic_fix_and_follows_a_structural_one() -> None:
    site = frame("f", APP, 7)
    replaced = explain("no-context-manager", "generic", "subprocess.Popen", site, None)
    assert replaced.startswith(f"{APP}:7: subprocess.Popen: ") and "generic" not in replaced
    followed = explain("suspended-generator", "the generator...", "asyncpg.pool.Pool.acquire",
                       site, None)  # fmt: skip
    assert followed.startswith("the generator...") and "pool.release(conn)" in followed
    # a plain opener adds nothing to a structural cause's fix
    assert explain("suspended-generator", "the generator...", "open", site, None) == (
        "the generator..."
    )
    # a with statement using the API itself: the API's own __exit__ did not close
    own = explain("with-exited-without-close", "manager...", "sqlite3.connect", site, site)
    assert own.startswith(f"{APP}:7: sqlite3.connect: ") and "commits" in own


# --- services ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kind,path,service",
    [
        ("socket", "127.0.0.1:5432", "postgresql"),
        ("socket", "[::1]:6379", "redis"),
        ("socket", "db.internal:3306", "mysql"),
        ("socket", "10.0.0.7:27017", "mongodb"),
        ("socket", "127.0.0.1:41234", None),
        ("socket", "/run/postgresql/.s.PGSQL.5432", None),  # a unix socket: no port
        ("file", "127.0.0.1:5432", None),
        ("socket", None, None),
    ],
)
def test_service_of_a_well_known_port(kind: str, path: str | None, service: str | None) -> None:
    assert service_of(kind, path) == service


def test_peer_is_described_with_its_service() -> None:
    assert describe_peer("127.0.0.1:5432", "postgresql") == "127.0.0.1:5432 (PostgreSQL?)"
    assert describe_peer("127.0.0.1:41234", None) == "127.0.0.1:41234"


# --- a whole trace through report ----------------------------------------------------------
def stack_rows(stack_id: int, frames: list[Frame]) -> list[dict]:
    return [
        {"stack_id": stack_id, "pid": PID, "depth": depth, "function": f.function,
         "qualname": f.qualname, "file": f.file, "line": f.line, "firstlineno": f.firstlineno,
         "code_flags": f.code_flags, "lasti": 0}
        for depth, f in enumerate(frames)
    ]  # fmt: skip


def addr(t: int, fd: int, path: str) -> dict:
    return {"t_ns": t, "op": schema.OP_ADDR, "syscall": "connect", "fd": fd, "path": path}


@pytest.fixture
def service_trace(tmp_path: Path) -> Path:
    """A handler, two connections to PostgreSQL's port and a sqlite3 connection, all left open
    until the process exits."""
    stacks = (
        stack_rows(1, [frame("FileHandler._open", LOGGING, 1210, 1200),
                       frame("FileHandler.__init__", LOGGING, 1190, 1170),
                       frame("log_request", APP, 7, 6)])
        + stack_rows(2, [frame("socket.__init__", SOCKET, 232, 220),
                         frame("open_socket", APP, 12, 11)])
        + stack_rows(3, [frame("record", APP, 17, 16)])
    )  # fmt: skip
    events = [
        birth(10, 3, path="/srv/app/requests.log", stack_id=1),
        birth(20, 4, syscall="socket", kind="socket", path=None, stack_id=2),
        addr(21, 4, "127.0.0.1:5432"),
        birth(30, 5, syscall="socket", kind="socket", path=None, stack_id=2),
        addr(31, 5, "127.0.0.1:5432"),
        birth(40, 6, path="/srv/app/hits.sqlite", stack_id=3),
        exit_(100),
    ]
    return write_trace(tmp_path / "t", events, stacks=stacks, sources=source_rows(APP, PROGRAM))


def report(trace: Path, tmp_path: Path, *options: str) -> str:
    out = tmp_path / "report.out"
    assert main(["report", str(trace), *options, "-o", str(out)]) == 0
    return out.read_text()


def test_json_leaks_and_sites_carry_api_service_and_fix(
    service_trace: Path, tmp_path: Path
) -> None:
    document = json.loads(report(service_trace, tmp_path, "--format", "json"))
    by_fd = {leak["fd"]: leak for leak in document["leaks"]}
    assert {fd: (leak["api"], leak["service"]) for fd, leak in by_fd.items()} == {
        3: ("logging.FileHandler", None),
        4: ("socket.socket", "postgresql"),
        5: ("socket.socket", "postgresql"),
        6: ("sqlite3.connect", None),
    }
    assert "removeHandler" in by_fd[3]["fix"]
    assert by_fd[6]["cause"] == "with-exited-without-close" and "commits" in by_fd[6]["fix"]
    sites = {site["line"]: site for site in document["sites"]}
    assert (sites[7]["api"], sites[12]["api"], sites[17]["api"]) == (
        "logging.FileHandler", "socket.socket", "sqlite3.connect")  # fmt: skip
    assert sites[12]["service"] == "postgresql"
    assert document["peers"] == [
        {"peer": "127.0.0.1:5432", "service": "postgresql", "leaked": 2, "still_open": 0,
         "sites": [{"file": APP, "line": 12, "function": "open_socket", "leaked": 2}]}
    ]  # fmt: skip


def test_text_names_the_api_and_the_peer(service_trace: Path, tmp_path: Path) -> None:
    text = report(service_trace, tmp_path, "--by-peer")
    assert "  2 connections to 127.0.0.1:5432 (PostgreSQL?)" in text.splitlines()
    assert "   api: logging.FileHandler" in text.splitlines()
    assert "   paths: 127.0.0.1:5432 (PostgreSQL?)" in text.splitlines()
    assert "socket leaks by peer" not in report(service_trace, tmp_path)


def test_html_names_the_api_and_the_peer(service_trace: Path, tmp_path: Path) -> None:
    html = report(service_trace, tmp_path, "--format", "html")
    assert "api: <code>logging.FileHandler</code>" in html
    assert "2 connections to 127.0.0.1:5432 (PostgreSQL?)" in html


def test_trace_api_column_is_per_lifetime(service_trace: Path) -> None:
    trace = load(service_trace, local_sources=False)
    apis = dict(zip(trace.fds["fd"].tolist(), trace.fds["api"].astype(object).tolist()))
    assert apis == {3: "logging.FileHandler", 4: "socket.socket", 5: "socket.socket",
                    6: "sqlite3.connect"}  # fmt: skip


def test_trace_api_through_contextlib_names_the_generator(tmp_path: Path) -> None:
    """The per-stack columns reach past contextlib's __enter__ as api_of does."""
    pool = "/venv/lib/python3.11/site-packages/psycopg_pool/pool.py"
    contextlib = "/usr/lib/python3.11/contextlib.py"
    stacks = stack_rows(1, [
        frame("socket.__init__", SOCKET, 232, 220),
        frame("ConnectionPool.connection", pool, 150, 140, flags=schema.CODE_GENERATOR),
        frame("_GeneratorContextManager.__enter__", contextlib, 137),
        frame("record", APP, 17, 16),
    ])  # fmt: skip
    events = [birth(10, 3, syscall="socket", kind="socket", path=None, stack_id=1),
              addr(11, 3, "127.0.0.1:5432"), exit_(20)]  # fmt: skip
    trace = load(write_trace(tmp_path / "t", events, stacks=stacks,
                             sources=source_rows(APP, PROGRAM)), local_sources=False)  # fmt: skip
    (leak,) = trace.leaks().itertuples(index=False)
    assert (leak.api, leak.service) == ("psycopg_pool.pool.ConnectionPool.connection",
                                        "postgresql")  # fmt: skip
    assert "with pool.connection()" in leak.fix
