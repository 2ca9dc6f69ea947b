"""Tests that leak file descriptors in each way `pytest --cmtrace` must attribute, and tests
that do not. `# LEAK:<label>` marks the line that opens one leaked fd, described by
expected.LEAKS[label]; `# WARN:<label>` one that a finalizer closes during its test
(expected.WARNINGS[label]: a warning of that test, no leak)."""

import os
import socket
import subprocess
import sys

import pytest
from held import HELD


def test_clean():
    with open(__file__) as f:
        assert f.read(1)


def test_body_leaks():
    HELD.append(open(__file__))  # LEAK:body


@pytest.fixture
def leaky_fixture():
    HELD.append(open(__file__))  # LEAK:function_fixture
    return HELD[-1]


def test_function_fixture_leaks(leaky_fixture):
    pass


def lines_of(path):
    with open(path) as f:  # LEAK:generator
        yield from f


def test_generator_left_suspended():
    lines = lines_of(__file__)
    next(lines)
    HELD.append(lines)


def test_popen_never_waited():
    proc = subprocess.Popen([sys.executable, "-c", "pass"], stdout=subprocess.PIPE)  # LEAK:popen
    HELD.append(proc)


@pytest.mark.parametrize("keep", [False, True], ids=["closes", "leaks"])
def test_parametrised(keep):
    f = open(__file__)  # LEAK:parametrised
    if keep:
        HELD.append(f)
    else:
        f.close()


def test_finalizer_closes():
    f = open(__file__)  # WARN:finalizer
    assert f.read(1)
    del f


@pytest.fixture(scope="session")
def server_socket():
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock
    sock.close()


def test_uses_server_a(server_socket):
    assert server_socket.getsockname()[1]


def test_uses_server_b(server_socket):
    with socket.create_connection(server_socket.getsockname()):
        pass


@pytest.mark.cmtrace(allow=1)
def test_allowed_one():
    HELD.append(open(__file__))  # LEAK:allowed


@pytest.mark.cmtrace(skip=True)
def test_not_checked():
    HELD.append(open(__file__))  # LEAK:not_checked


@pytest.mark.skipif(not os.environ.get("SUITE_FAIL"), reason="SUITE_FAIL=1 makes it fail")
def test_fails_without_leaking():
    pytest.fail("fails on purpose: exit status 1, outcome failed")
