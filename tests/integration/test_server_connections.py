"""Connections a server accepted and its handler never closed: the report names the server's
accept as their API (not `asyncio.runners.run`, the user's line under it only runs the loop)
and gives the handler's fix. Ground truth: the program prints the peer address of each
connection its handler kept, read from the socket itself (os._exit: the loop's own fds leak
too, with their own API), and the fds /proc/self/fd holds."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
from conftest import TARGET_PYTHON, report_json, run_cmtrace

pytestmark = [pytest.mark.usefixtures("bpf_ready", "backend")]

ACCEPT_API = "asyncio.selector_events.BaseSelectorEventLoop._accept_connection"
SERVER = textwrap.dedent(
    """
    import asyncio, json, os
    kept = []
    async def handle(reader, writer):
        writer.write(await reader.readline())
        await writer.drain()
        kept.append(writer)  # never closed

    async def clients(port, n):
        for _ in range(n):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"hi\\n")
            await reader.readline()
            writer.close()
            await writer.wait_closed()

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        async with server:
            await clients(server.sockets[0].getsockname()[1], 4)
            await asyncio.sleep(0.1)
        fds = {w.get_extra_info("socket").fileno(): "%s:%d" % w.get_extra_info("peername")
               for w in kept}
        on_proc = {fd: os.readlink(f"/proc/self/fd/{fd}").startswith("socket:") for fd in fds}
        print(json.dumps({"kept": fds, "sockets": on_proc}), flush=True)
        os._exit(0)

    asyncio.run(main())
    """
)


def test_accepted_connections_name_the_server_accept(tmp_path: Path) -> None:
    program = tmp_path / "server.py"
    program.write_text(SERVER)
    trace = tmp_path / "trace"
    done = run_cmtrace("run", "-q", "-o", str(trace), "--", TARGET_PYTHON, str(program))
    assert done.returncode == 0, done.stderr
    truth = json.loads(done.stdout.splitlines()[-1])
    kept = {int(fd): address for fd, address in truth["kept"].items()}
    assert len(kept) == 4 and all(truth["sockets"].values()), truth
    leaks = [x for x in report_json(trace)["leaks"] if x["api"] == ACCEPT_API]
    assert {x["fd"]: x["path"] for x in leaks} == kept, leaks  # (the loop's own fds: not these)
    assert all("writer.wait_closed()" in x["fix"] for x in leaks), leaks[0]["fix"]
    text = run_cmtrace("report", str(trace)).stdout
    assert f"api: {ACCEPT_API}" in text and os.path.basename(program) in text, text
