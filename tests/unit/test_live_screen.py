"""The live view's numbers and screen from hand-built flushes (cmtrace.present.live).

Two flushes of a service: one site leaks (opened, never closed), another churns (each fd closed
at once), a third opens from library code under a user frame. The counts the test states are
the events it wrote; the screen is rendered by rich into a recording console.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys

import pytest
from rich.console import Console
from tracebuild import PID, birth, close, events_table

from cmtrace.cli.observers import build_live
from cmtrace.present.live import SiteRow, ViewState, Watch, _keys_of, render, status_line

APP = "/srv/app/handlers.py"
LIB = "/usr/lib/python3.11/socket.py"
LEAK, CHURN, LIBRARY = 11, 22, 33  # stack ids


def frame(stack_id: int, depth: int, function: str, file: str, line: int) -> dict:
    return {"stack_id": stack_id, "pid": PID, "depth": depth, "function": function,
            "qualname": function, "file": file, "line": line, "firstlineno": 1,
            "code_flags": 0, "lasti": 0}  # fmt: skip


FRAMES = [
    frame(LEAK, 0, "get_conn", APP, 40),
    frame(LEAK, 1, "handle", APP, 90),
    frame(CHURN, 0, "read_config", APP, 12),
    frame(LIBRARY, 0, "create_connection", LIB, 850),  # the library's frame is not the site
    frame(LIBRARY, 1, "connect_upstream", APP, 61),
]


def first_flush() -> list[dict]:
    """t = 0..1 s: one leaked fd, two churned, one library socket left open."""
    return [
        birth(100, 5, stack_id=LEAK, path="/var/db/app.sqlite"),
        birth(200, 6, stack_id=CHURN, path="/etc/app.conf"),
        close(300, 6),
        birth(400, 6, stack_id=CHURN, path="/etc/app.conf"),
        close(500, 6),
        birth(600, 7, syscall="socket", kind="socket", stack_id=LIBRARY, path="10.0.0.9:5432"),
    ]


def second_flush() -> list[dict]:
    """t = 30 s: two more leaked, two more churned, the library socket closed."""
    s = 30_000_000_000
    return [
        birth(s + 100, 8, stack_id=LEAK, path="/var/db/app.sqlite"),
        birth(s + 200, 9, stack_id=LEAK, path="/var/db/app.sqlite"),
        birth(s + 300, 10, stack_id=CHURN, path="/etc/app.conf"),
        close(s + 400, 10),
        birth(s + 500, 10, stack_id=CHURN, path="/etc/app.conf"),
        close(s + 600, 10),
        close(s + 700, 7),
    ]


def fed_watch() -> Watch:
    watch = Watch()
    watch.begin([os.getpid()])
    watch.feed(events_table(first_flush()), FRAMES, lost=0, now=1000.0)
    watch.feed(events_table(second_flush()), [], lost=3, now=1030.0)
    return watch


def by_site(watch: Watch) -> dict[str, SiteRow]:
    return {row.where: row for row in watch.sites}


def test_counts_per_site_are_the_events_written() -> None:
    sites = by_site(fed_watch())
    assert set(sites) == {f"{APP}:40", f"{APP}:12", f"{APP}:61"}
    leak, churn, library = sites[f"{APP}:40"], sites[f"{APP}:12"], sites[f"{APP}:61"]
    assert (leak.opened, leak.closed, leak.live) == (3, 0, 3)
    assert (churn.opened, churn.closed, churn.live) == (4, 4, 0)
    assert (library.opened, library.closed, library.live) == (1, 1, 0)
    assert (leak.function, library.function) == ("get_conn", "connect_upstream")
    assert (leak.kind, leak.sample) == ("file", "/var/db/app.sqlite")
    assert library.kind == "socket"


def test_growth_is_live_fds_per_minute_over_the_window() -> None:
    sites = by_site(fed_watch())
    # live 1 -> 3 in 30 s at the leak; churn 0 -> 0; the library socket 1 -> 0
    assert sites[f"{APP}:40"].growth == 4.0
    assert sites[f"{APP}:12"].growth == 0.0
    assert sites[f"{APP}:61"].growth == -2.0


def test_sort_orders() -> None:
    watch = fed_watch()
    assert [r.where for r in watch.sorted_sites("growth")][0] == f"{APP}:40"
    assert [r.where for r in watch.sorted_sites("opened")][0] == f"{APP}:12"


def test_targets_fds_against_the_limit() -> None:
    watch = fed_watch()
    target = watch.targets[os.getpid()]
    assert target.soft_limit == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert target.open_fds is not None and target.open_fds >= 3  # stdio at least
    assert watch.lost == 3 and watch.events == len(first_flush()) + len(second_flush())


def screen(watch: Watch, state: ViewState) -> str:
    console = Console(width=160, height=40, record=True, file=open(os.devnull, "w"))
    console.print(render(watch, state, height=40, title="pid 100 (app)"))
    return console.export_text()


def test_screen_shows_sites_header_and_selection() -> None:
    watch = fed_watch()
    text = screen(watch, ViewState())
    lines = text.splitlines()
    assert "lost 3" in lines[0] and "sorted by growth" in lines[0]
    assert f"pid {os.getpid()}" in lines[1] and "fds" in lines[1]
    leak_line = next(line for line in lines if "handlers.py:40 get_conn" in line)
    assert leak_line.split()[2:5] == ["3", "3", "0"]  # live, opened, closed
    assert "+4" in leak_line and "/var/db/app.sqlite" in leak_line
    assert leak_line.split()[-1] == "no-context-manager"  # open() outside a with, as report says
    churn_line = next(line for line in lines if "handlers.py:12 read_config" in line)
    assert churn_line.split()[2:6] == ["0", "4", "4", "+0"]
    assert lines.index(leak_line) < lines.index(churn_line)  # growth first


def test_enter_shows_the_selected_sites_stack() -> None:
    watch = fed_watch()
    text = screen(watch, ViewState(sort_by="growth", selected=0, show_stack=True))
    assert f"{APP}:40 in get_conn" in text and f"{APP}:90 in handle" in text
    text = screen(watch, ViewState(sort_by="growth", selected=2, show_stack=True))
    assert f"{LIB}:850 in create_connection" in text  # the library frame, unmarked
    assert f"  > {APP}:61 in connect_upstream" in text


def test_status_line_names_the_top_growing_site() -> None:
    line = status_line(fed_watch())
    assert line.startswith("cmtrace: ") and "13 events" in line
    assert f"top growing {APP}:40 get_conn +4/min (3 live)" in line


def test_keys_of_terminal_input() -> None:
    assert _keys_of("q") == ["q"]
    assert _keys_of("\x1b[A\x1b[Bj\r ") == ["up", "down", "j", "enter", " "]
    assert _keys_of("\x1b") == ["escape"]


class _Terminal:
    """stderr as a terminal, as far as choosing the view goes."""

    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("mode", "live", "quiet", "terminal", "expected"),
    [
        ("attach", None, False, True, "LiveView"),  # -p on a terminal: the screen
        ("attach", False, False, True, "StatusLine"),  # --no-live: the status line
        ("attach", None, False, False, "StatusLine"),  # a pipe, a log
        ("attach", True, False, False, "StatusLine"),  # --live without a terminal
        ("attach", None, True, False, None),  # -q
        ("run", None, False, True, None),  # the command owns the terminal
        ("run", True, False, True, "LiveView"),
        ("run", None, False, False, "StatusLine"),
    ],
)
def test_which_view_the_flags_choose(
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
    live: bool | None,
    quiet: bool,
    terminal: bool,
    expected: str | None,
) -> None:
    if terminal:
        monkeypatch.setattr(sys, "stderr", _Terminal())
    chosen = build_live(argparse.Namespace(live=live, quiet=quiet), mode)
    assert [type(o).__name__ for o in chosen] == ([expected] if expected else [])
