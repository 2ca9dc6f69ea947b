"""Real world: issue 13's incident, a FastAPI service on uvicorn with asyncpg against a real
PostgreSQL server, traced with `cmtrace -p` as one would trace a service in production.

The test starts its own PostgreSQL cluster (Debian's server binaries, initdb/pg_ctl as the
unprivileged `postgres` user, in a temporary directory) listening on a free loopback address at
the standard port 5432, so the report can name the service. tests/programs/services/pg_app.py
leaks one pooled connection per 404: its @asynccontextmanager has no try/finally, so the
HTTPException thrown into it skips the commit and the release.

Ground truth comes from the server and the kernel, not from cmtrace: pg_stat_activity lists the
service's connections "idle in transaction", each with its client port, and the service's
/proc/PID/fd and /proc/PID/net/tcp say which of its fds are those connections.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Tracer, leaks_of, report_json, run_cmtrace
from realworld import (
    SERVICE_PYTHON,
    SERVICES,
    START_TIMEOUT,
    free_port,
    http_get,
    marked_line,
    require_modules,
    stop_service,
    wait_for_health,
)

pytestmark = pytest.mark.usefixtures("bpf_ready", "backend")

APP = SERVICES / "pg_app.py"
PG_BIN = Path("/usr/lib/postgresql")
PG_USER = "postgres"  # Debian's package creates it; the cluster runs unprivileged as it
PG_PORT = 5432  # the well-known port, on a loopback address of our own
APP_NAME = "cmtrace-realworld"
MISSING_ITEMS = (101, 102, 103, 104, 105)  # each request: a 404, one leaked connection


# --- a PostgreSQL cluster of our own ---------------------------------------------------------
def pg_bindir() -> Path | None:
    """The newest installed server's bin directory (Debian: /usr/lib/postgresql/VERSION/bin)."""
    versions = sorted(PG_BIN.glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return versions[-1].parent if versions else None


def free_loopback_address(port: int) -> str:
    """A 127.x.y.z address where nothing listens on `port` (loopback is all of 127/8 on Linux,
    so the cluster gets 5432 even when the machine's own PostgreSQL has 127.0.0.1:5432)."""
    for last in range(1, 250):
        address = f"127.55.{os.getpid() % 250}.{last}"
        with socket.socket() as probe:
            try:
                probe.bind((address, port))
            except OSError:
                continue
            return address
    raise AssertionError(f"no free loopback address for port {port}")


@dataclass
class Cluster:
    bindir: Path
    datadir: Path
    host: str
    port: int

    @property
    def dsn(self) -> str:
        return f"postgresql://{PG_USER}@{self.host}:{self.port}/postgres"

    def sql(self, query: str) -> list[list[str]]:
        """Rows of `query` through psql (unaligned, tab-separated)."""
        result = subprocess.run(
            [self.bindir / "psql", "-X", "-At", "-F", "\t", "-d", self.dsn, "-c", query],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 0, result.stderr
        return [line.split("\t") for line in result.stdout.splitlines()]


def as_pg_user(*argv: str | Path) -> subprocess.CompletedProcess:
    result = subprocess.run(
        ["runuser", "-u", PG_USER, "--", *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"{argv[0]} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def postgres() -> Iterator[Cluster]:
    bindir = pg_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries missing: run scripts/setup.sh (postgresql)")
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        pytest.skip(f"no {PG_USER} user: run scripts/setup.sh (postgresql)")
    top = Path(tempfile.mkdtemp(prefix="cmtrace-pg-", dir="/tmp"))
    shutil.chown(top, user=PG_USER)
    cluster = Cluster(bindir, top / "data", free_loopback_address(PG_PORT), PG_PORT)
    as_pg_user(bindir / "initdb", "-D", cluster.datadir, "-A", "trust", "-U", PG_USER,
               "--no-sync", "-E", "UTF8")  # fmt: skip
    options = (f"-c listen_addresses={cluster.host} -c port={cluster.port} "
               f"-c unix_socket_directories={top} -c fsync=off")  # fmt: skip
    as_pg_user(bindir / "pg_ctl", "-D", cluster.datadir, "-l", top / "server.log", "-w",
               "-t", str(START_TIMEOUT), "-o", options, "start")  # fmt: skip
    try:
        cluster.sql("CREATE TABLE items (id int PRIMARY KEY, name text);"
                    "INSERT INTO items VALUES (1, 'one'), (2, 'two')")  # fmt: skip
        yield cluster
    finally:
        as_pg_user(bindir / "pg_ctl", "-D", cluster.datadir, "-m", "immediate", "stop")
        shutil.rmtree(top, ignore_errors=True)


# --- the service -------------------------------------------------------------------------------
def tcp_sockets_to(pid: int, host: str, port: int) -> dict[int, int]:
    """fd -> local port of the process's TCP sockets connected to host:port, from the kernel
    (/proc/PID/net/tcp rows matched to /proc/PID/fd links by inode)."""
    remote = f"{socket.inet_aton(host)[::-1].hex().upper()}:{port:04X}"
    local_port_of_inode = {}
    for row in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = row.split()
        if fields[2] == remote:
            local_port_of_inode[fields[9]] = int(fields[1].split(":")[1], 16)
    found = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        link = os.readlink(f"/proc/{pid}/fd/{name}")
        inode = link[len("socket:[") : -1] if link.startswith("socket:[") else None
        if inode in local_port_of_inode:
            found[int(name)] = local_port_of_inode[inode]
    return found


@dataclass
class Incident:
    pid: int
    cluster: Cluster
    trace: Path
    report: dict
    idle_in_transaction: set[int]  # client ports pg_stat_activity says so, before the stop
    app_connections: int  # every connection of the service pg_stat_activity lists
    sockets: dict[int, int]  # the service's fds connected to the server -> local port

    def leaks(self) -> list[dict]:
        return leaks_of(self.report, self.pid)


@pytest.fixture(scope="module")
def incident(
    backend: str, postgres: Cluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Incident]:
    """Start the service, attach `cmtrace -p`, send the 404s, read the ground truth while the
    service lives, stop the tracer, then stop the service. Once per backend."""
    require_modules("asyncpg", "fastapi", "uvicorn")
    workdir = tmp_path_factory.mktemp(f"pg-{backend}")
    port = free_port()
    log = workdir / "service.log"
    env = {**os.environ, "PG_DSN": postgres.dsn, "APP_NAME": APP_NAME}
    with open(log, "w") as log_file:
        service = subprocess.Popen(
            [SERVICE_PYTHON, "-m", "uvicorn", "pg_app:app", "--app-dir", str(SERVICES),
             "--host", "127.0.0.1", "--port", str(port), "--no-access-log"],
            stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=workdir,
        )  # fmt: skip
    tracer = None
    try:
        base = f"http://127.0.0.1:{port}"
        assert wait_for_health(f"{base}/health", service, log)["pid"] == service.pid
        trace = workdir / "trace"
        tracer = Tracer(["-p", str(service.pid), "-o", str(trace)], cwd=workdir)
        assert tracer.wait_attached() == service.pid
        for item in MISSING_ITEMS:
            assert http_get(f"{base}/items/{item}") == (404, {"detail": "no such item"})
        rows = postgres.sql(
            f"SELECT state, client_port FROM pg_stat_activity WHERE application_name = '{APP_NAME}'"
        )
        sockets = tcp_sockets_to(service.pid, postgres.host, postgres.port)
        tracer.stop().check()
        assert service.poll() is None, "detaching must leave the service running"
        yield Incident(
            pid=service.pid,
            cluster=postgres,
            trace=trace,
            report=report_json(trace),
            idle_in_transaction={int(p) for state, p in rows if state == "idle in transaction"},
            app_connections=len(rows),
            sockets=sockets,
        )
    finally:
        if tracer:
            tracer.kill()
        stop_service(service, signal.SIGTERM)


def test_ground_truth_is_the_incident(incident: Incident) -> None:
    """The service did what issue 13 says (else the grading below would mean nothing): one
    connection idle in transaction per 404, each an open socket of the service, and no other."""
    assert len(incident.idle_in_transaction) == len(MISSING_ITEMS), incident
    assert incident.app_connections == len(MISSING_ITEMS), incident
    assert set(incident.sockets.values()) == incident.idle_in_transaction, incident


def test_every_leaked_connection_found(incident: Incident) -> None:
    """Each connection the server has idle in transaction is one leak, at the line that checked
    it out, inside the route's `async with`; nothing else of the service leaked."""
    leaks = incident.leaks()
    leaked_fds = {
        fd for fd, port in incident.sockets.items() if port in incident.idle_in_transaction
    }
    assert sorted(leak["fd"] for leak in leaks) == sorted(leaked_fds), leaks
    peer = peer_of(incident)
    for leak in leaks:
        assert (leak["kind"], leak["path"], leak["closed_by"]) == ("socket", peer, None), leak
        assert leak["site"] == {"file": str(APP), "line": marked_line(APP, "LEAK-SITE"),
                                "function": "transaction"}, leak  # fmt: skip
        assert leak["with"] == {"file": str(APP), "line": marked_line(APP, "WITH-LINE"),
                                "function": "read_item"}, leak  # fmt: skip
    sites = [site for site in incident.report["sites"] if site["file"] == str(APP)]
    assert [(s["line"], s["leaked"]) for s in sites] == [
        (marked_line(APP, "LEAK-SITE"), len(leaks))
    ]


def test_cause_is_contextmanager_without_finally(incident: Incident) -> None:
    """The route coroutine finished long ago (its 404 was answered): the cleanup after the yield
    was skipped, the coroutine is not suspended. The liveness check read it when the tracer
    stopped (generators.json), so the report on another machine says the same."""
    assert {leak["cause"] for leak in incident.leaks()} == {"contextmanager-without-finally"}
    for leak in incident.leaks():
        assert "read_item is no longer suspended there" in leak["evidence"], leak
    checked = json.loads((incident.trace / "generators.json").read_text())
    assert checked["processes"] == {str(incident.pid): None}, checked
    assert not [row for row in checked["generators"] if row["error"]], checked


def test_api_fix_and_service(incident: Incident) -> None:
    """The report names the pool checkout, its specific fix, and what the peer is."""
    for leak in incident.leaks():
        assert leak["api"] == "asyncpg.pool.Pool.acquire", leak
        assert "release(" in leak["fix"] or "async with pool.acquire()" in leak["fix"], leak
        assert leak["service"] == "postgresql", leak
    (site,) = [site for site in incident.report["sites"] if site["file"] == str(APP)]
    assert site["api"] == "asyncpg.pool.Pool.acquire", site


def peer_of(incident: Incident) -> str:
    return f"{incident.cluster.host}:{incident.cluster.port}"


def test_text_report_names_the_service(incident: Incident) -> None:
    text = run_cmtrace("report", str(incident.trace)).stdout
    assert f"{peer_of(incident)} (PostgreSQL?)" in text, text


def test_report_by_peer(incident: Incident) -> None:
    """Sockets grouped by peer: the leaked connections are counted as one group."""
    result = run_cmtrace("report", "--by-peer", str(incident.trace))
    assert result.returncode == 0, result.stderr
    assert f"{len(MISSING_ITEMS)} connections to {peer_of(incident)}" in result.stdout
