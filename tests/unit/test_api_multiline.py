"""The API named for a call spread over several lines is the function it calls (issue 13).

Each snippet is run once with recorders in place of the callables it names: the recorder of
the API notes the line this interpreter reports for the calling frame while in the call (what
the stack walker records). api_of, given the snippet's source as a trace holds it, must name
the API at that line, and at every line of the call (interpreters before 3.10 report the line
where the call starts, later ones the line of the called name: `.epoll(` of a chained call).
"""

from __future__ import annotations

import sys
import textwrap
import types

import pandas as pd
import pytest

from cmtrace.analysis.apis import api_of
from cmtrace.analysis.code import Frame, SourceIndex
from cmtrace.trace.sources import source_rows

FILE = "/srv/app/snippet.py"

# (snippet, the API it calls, the snippet's lines any of which a frame in that call may show)
CASES = [
    (  # tests/programs/fd/passfds.py: was named socket.CMSG_SPACE
        """\
        _, ancillary, _, _ = channel.recvmsg(16, socket.CMSG_SPACE(8 * fds.itemsize),
                                             socket.MSG_CMSG_CLOEXEC)
        """,
        "channel.recvmsg",
        (1, 2),
    ),
    (
        """\
        db = sqlite3.connect(
            db_path,
            timeout=socket.getdefaulttimeout(),
        )
        """,
        "sqlite3.connect",
        (1, 2, 3, 4),
    ),
    (  # the opener on the second line of a user function's call: that function has not run
        """\
        total = summarize(db_path,
                          os.open(db_path, os.O_RDONLY))
        """,
        "os.open",
        (2,),
    ),
    (
        """\
        ep = (select
              .epoll(
                  len(fds)))
        """,
        "select.epoll",
        (1, 2, 3),
    ),
]


CONSTANTS = {"MSG_CMSG_CLOEXEC", "O_RDONLY"}


class Recorder:
    """Stands for a module or object of a snippet: any attribute is a callable recording the
    caller's line when it is the API, returning a plain value otherwise."""

    def __init__(self, prefix: str, api: str, seen: list[int]):
        self.prefix, self.api, self.seen = prefix, api, seen

    def __getattr__(self, name: str):
        dotted = f"{self.prefix}.{name}"
        if name in CONSTANTS:
            return 0

        def call(*args, **kwargs):
            if dotted == self.api:
                self.seen.append(sys._getframe(1).f_lineno)
            return (1, [], 0, None) if name == "recvmsg" else 1

        return call


def reported_line(code: str, api: str) -> int:
    """The line this interpreter reports for the snippet's frame while it calls `api`."""
    seen: list[int] = []
    names = {"channel", "socket", "sqlite3", "os", "select"}
    scope = {name: Recorder(name, api, seen) for name in names}
    scope.update(fds=types.SimpleNamespace(itemsize=4), db_path="/tmp/x", len=lambda _: 4)
    scope["summarize"] = lambda *args: 0
    exec(compile(code, FILE, "exec"), scope)
    assert len(seen) == 1, seen
    return seen[0]


@pytest.mark.parametrize("snippet,api,lines", CASES, ids=[c[1] for c in CASES])
def test_a_call_over_several_lines_is_named_by_what_it_calls(
    snippet: str, api: str, lines: tuple[int, ...]
) -> None:
    code = textwrap.dedent(snippet)
    src = SourceIndex.from_table(pd.DataFrame(source_rows(FILE, code)), local_fallback=False)

    def named_at(line: int) -> str | None:
        site = Frame(function="<module>", qualname="<module>", file=FILE, line=line,
                     firstlineno=1, code_flags=0)  # fmt: skip
        return api_of([site], src)

    line = reported_line(code, api)
    assert line in lines  # the case's lines are the interpreter's
    assert named_at(line) == api
    assert {named_at(n) for n in lines} == {api}
