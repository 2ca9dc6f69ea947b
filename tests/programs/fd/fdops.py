"""Target program for the fd-lifecycle tests: it makes known syscalls and reports what it did.

    python fdops.py SCENARIO WORKDIR [ARG]

Protocol (one JSON object per line on stdout, written with os.write so forked children never
duplicate buffered output):
  {"event": "ready", "pid": N, ...}   setup done (pre-existing fds opened, children started)
  <the test sends "go\\n" on stdin once the tracer is attached>
  {"event": "done", ...}              the scenario's ground truth: fds, paths, errnos, tids
  then the scenario waits for stdin to close (or for "exec\\n" in the deaths scenario) so the test
  can look at /proc/PID/fd while the process still lives. Exit is os._exit: no interpreter
  shutdown closes anything behind the test's back.
"""

from __future__ import annotations

import ctypes
import os
import socket
import sys
import threading
import time

import sysfd
from lineproto import say
from sysfd import syscall


def wait_line() -> str:
    return sys.stdin.readline().strip()


def wait_for_eof_then_exit() -> None:
    while sys.stdin.readline():
        pass
    os._exit(0)


def must(result: int, what: str) -> int:
    if result < 0:
        raise OSError(-result, f"{what} failed")
    return result


def openat(path: str, flags: int = sysfd.O_RDONLY) -> int:
    return must(syscall("openat", sysfd.AT_FDCWD, sysfd.cstr(path), flags, 0o600), path)


def touch(path: str) -> str:
    with open(path, "w") as f:
        f.write("x\n")
    return path


# --- births ------------------------------------------------------------------------------------
class BirthLog:
    """Ground truth of the births scenario: every fd the kernel returned, and every failure."""

    def __init__(self) -> None:
        self.births: list[dict] = []
        self.fails: list[dict] = []
        self.addresses: list[dict] = []
        self.keep: list[object] = []  # Python socket objects that must not be collected

    def born(self, syscall_name: str, result: int, path: str | None = None, src: int = -1) -> int:
        entry = {"syscall": syscall_name, "fd": result, "path": path, "src_fd": src}
        if result < 0:
            entry["errno"] = -result
        self.births.append(entry)
        return result

    def born_pair(self, syscall_name: str, result: int, pair) -> tuple[int, int]:
        if result < 0:
            self.births.append({"syscall": syscall_name, "fd": -1, "errno": -result})
            return -1, -1
        for fd, peer in ((pair[0], pair[1]), (pair[1], pair[0])):
            self.births.append({"syscall": syscall_name, "fd": fd, "path": None, "src_fd": peer})
        return pair[0], pair[1]

    def failed(self, syscall_name: str, result: int) -> None:
        assert result < 0, f"{syscall_name} was expected to fail and returned {result}"
        self.fails.append({"syscall": syscall_name, "errno": -result})


def inet_births(log: BirthLog) -> None:
    listener = log.born("socket", syscall("socket", sysfd.AF_INET, sysfd.SOCK_STREAM, 0))
    must(syscall("bind", listener, ctypes.byref(sysfd.loopback(0)), 16), "bind")
    must(syscall("listen", listener, 8), "listen")
    port = sysfd.bound_port(listener)
    address = f"127.0.0.1:{port}"
    # bound to port 0: the syscall's argument says 127.0.0.1:0, the kernel chose `port`
    log.addresses.append(
        {"fd": listener, "call": "bind", "address": address, "given": "127.0.0.1:0"}
    )
    for accept_call in ("accept", "accept4"):
        client_type = sysfd.SOCK_STREAM | sysfd.SOCK_CLOEXEC
        client = log.born("socket", syscall("socket", sysfd.AF_INET, client_type, 0))
        must(syscall("connect", client, ctypes.byref(sysfd.loopback(port)), 16), "connect")
        log.addresses.append({"fd": client, "call": "connect", "address": address})
        if accept_call == "accept":
            log.born("accept", syscall("accept", listener, None, None))
        else:
            log.born("accept4", syscall("accept4", listener, None, None, sysfd.SOCK_CLOEXEC))


def unix_births(log: BirthLog, workdir: str) -> None:
    path = os.path.join(workdir, "u.sock")
    listener = log.born("socket", syscall("socket", sysfd.AF_UNIX, sysfd.SOCK_STREAM, 0))
    address = sysfd.unix_address(path)
    size = 2 + len(path) + 1
    must(syscall("bind", listener, ctypes.byref(address), size), "bind unix")
    must(syscall("listen", listener, 8), "listen unix")
    log.addresses.append({"fd": listener, "call": "bind", "address": path})
    client = log.born("socket", syscall("socket", sysfd.AF_UNIX, sysfd.SOCK_STREAM, 0))
    must(syscall("connect", client, ctypes.byref(address), size), "connect unix")
    log.addresses.append({"fd": client, "call": "connect", "address": path})


def file_births(log: BirthLog, workdir: str) -> int:
    path = os.path.join(workdir, "open.txt")
    flags = sysfd.O_WRONLY | sysfd.O_CREAT | sysfd.O_TRUNC
    first = log.born("open", syscall("open", sysfd.cstr(path), flags, 0o644), path)
    cloexec_ro = sysfd.O_RDONLY | sysfd.O_CLOEXEC
    log.born("openat", syscall("openat", sysfd.AT_FDCWD, sysfd.cstr(path), cloexec_ro, 0), path)
    how = sysfd.OpenHow(sysfd.O_RDONLY, 0, 0)
    result = syscall("openat2", sysfd.AT_FDCWD, sysfd.cstr(path), ctypes.byref(how), 24)
    log.born("openat2", result, path)
    creat_path = os.path.join(workdir, "creat.txt")
    log.born("creat", syscall("creat", sysfd.cstr(creat_path), 0o600), creat_path)
    return first


def dup_births(log: BirthLog, file_fd: int) -> None:
    pair = sysfd.int_pair()
    read_end, write_end = log.born_pair("pipe", syscall("pipe", pair), pair)
    sock = log.born("socket", syscall("socket", sysfd.AF_INET, sysfd.SOCK_STREAM, 0))
    log.born("dup", syscall("dup", sock), src=sock)
    log.born("dup2", syscall("dup2", read_end, 200), src=read_end)
    log.born("dup3", syscall("dup3", write_end, 201, sysfd.O_CLOEXEC), src=write_end)
    log.born("fcntl", syscall("fcntl", file_fd, sysfd.F_DUPFD, 300), src=file_fd)
    log.born("fcntl", syscall("fcntl", file_fd, sysfd.F_DUPFD_CLOEXEC, 310), src=file_fd)


def anon_inode_births(log: BirthLog) -> int:
    log.born("eventfd", syscall("eventfd", 0))
    event = log.born("eventfd2", syscall("eventfd2", 0, sysfd.O_CLOEXEC))
    log.born("epoll_create", syscall("epoll_create", 1))
    log.born("epoll_create1", syscall("epoll_create1", sysfd.O_CLOEXEC))
    log.born("memfd_create", syscall("memfd_create", sysfd.cstr("cmtrace-test"), 1))
    mask = ctypes.c_uint64(1 << (sysfd.SIGUSR1 - 1))
    log.born("signalfd", syscall("signalfd", -1, ctypes.byref(mask), 8))
    log.born("signalfd4", syscall("signalfd4", -1, ctypes.byref(mask), 8, sysfd.O_CLOEXEC))
    log.born("timerfd_create", syscall("timerfd_create", sysfd.CLOCK_MONOTONIC, 0))
    log.born("inotify_init", syscall("inotify_init"))
    log.born("inotify_init1", syscall("inotify_init1", sysfd.O_CLOEXEC))
    log.born("fanotify_init", syscall("fanotify_init", 0, sysfd.O_RDONLY))  # FAN_CLASS_NOTIF
    log.born("userfaultfd", syscall("userfaultfd", sysfd.O_CLOEXEC))
    attr = sysfd.perf_attr_software_clock()
    log.born("perf_event_open", syscall("perf_event_open", ctypes.byref(attr), 0, -1, -1, 8))
    return event


def pidfd_births(log: BirthLog, some_fd: int) -> None:
    pidfd = log.born("pidfd_open", syscall("pidfd_open", os.getpid(), 0))
    if pidfd >= 0:
        log.born("pidfd_getfd", syscall("pidfd_getfd", pidfd, some_fd, 0), src=some_fd)


def scm_rights_birth(log: BirthLog, some_fd: int) -> None:
    pair = sysfd.int_pair()
    left, right = log.born_pair(
        "socketpair", syscall("socketpair", sysfd.AF_UNIX, 1, 0, pair), pair
    )
    sender, receiver = socket.socket(fileno=left), socket.socket(fileno=right)
    log.keep += [sender, receiver]  # their finalizers would close the fds
    socket.send_fds(sender, [b"x"], [some_fd])
    _msg, fds, _flags, _addr = socket.recv_fds(receiver, 16, 4)
    log.born("recvmsg", fds[0], src=some_fd)


def failed_births(log: BirthLog, workdir: str) -> None:
    missing = os.path.join(workdir, "no-such-dir", "nothing.txt")
    log.failed("openat", syscall("openat", sysfd.AT_FDCWD, sysfd.cstr(missing), 0, 0))
    log.failed("socket", syscall("socket", 12345, sysfd.SOCK_STREAM, 0))
    log.failed("dup", syscall("dup", 987654))
    log.failed("pipe2", syscall("pipe2", sysfd.int_pair(), 1))  # 1 is no pipe2 flag: EINVAL
    log.failed("eventfd2", syscall("eventfd2", 0, 2))  # 2 is no eventfd flag: EINVAL
    log.failed("accept4", syscall("accept4", 0, None, None, 0))  # stdin is no socket


def scenario_births(workdir: str) -> None:
    say("ready")
    wait_line()
    log = BirthLog()
    file_fd = file_births(log, workdir)
    inet_births(log)
    unix_births(log, workdir)
    dup_births(log, file_fd)
    event_fd = anon_inode_births(log)
    pair = sysfd.int_pair()
    log.born_pair("pipe2", syscall("pipe2", pair, sysfd.O_CLOEXEC), pair)
    pidfd_births(log, event_fd)
    scm_rights_birth(log, event_fd)
    failed_births(log, workdir)
    say("done", births=log.births, fails=log.fails, addresses=log.addresses)
    wait_for_eof_then_exit()


# --- deaths ------------------------------------------------------------------------------------
def dup2_to(path: str, target_fd: int) -> int:
    """Open `path` and move it to fd number `target_fd` (so tests can use fixed numbers)."""
    fd = openat(path)
    must(syscall("dup2", fd, target_fd), "dup2")
    must(syscall("close", fd), "close")
    return target_fd


def scenario_deaths(workdir: str) -> None:
    paths = {name: touch(os.path.join(workdir, name + ".txt")) for name in DEATH_FILES}
    say("ready")
    wait_line()
    truth: dict[str, object] = {"paths": paths}

    closed = openat(paths["closed"])
    must(syscall("close", closed), "close")
    truth["closed"] = closed

    # close_range over 400..410 where 400..404 are open
    ranged = [dup2_to(paths["ranged"], 400 + i) for i in range(5)]
    must(syscall("close_range", 400, 410, 0), "close_range")
    truth["close_range"] = ranged

    # dup2/dup3 onto a live fd: the victim's file dies, the fd number lives on with the source's
    source, victim = openat(paths["dup2_source"]), openat(paths["dup2_victim"])
    must(syscall("dup2", source, victim), "dup2")
    source3, victim3 = openat(paths["dup3_source"]), openat(paths["dup3_victim"])
    must(syscall("dup3", source3, victim3, sysfd.O_CLOEXEC), "dup3")
    truth["dup2"] = {"source": source, "victim": victim}
    truth["dup3"] = {"source": source3, "victim": victim3}

    truth["cloexec"] = cloexec_setup(paths)
    say("done", **truth)
    wait_line()  # "exec"
    os.execv(sys.executable, [sys.executable, os.path.abspath(__file__), "after-exec", workdir])


DEATH_FILES = (
    "closed", "ranged", "dup2_source", "dup2_victim", "dup3_source", "dup3_victim",
    "A_ocloexec", "B_plain", "C_fsetfd", "D_fclear", "E_fioclex", "F_fionclex",
    "G_range_cloexec", "H_range_cloexec", "I_range_cloexec", "J_after_range",
)  # fmt: skip


def cloexec_setup(paths: dict[str, str]) -> dict[str, dict]:
    """fds whose CLOEXEC bit is set or cleared every way there is; `dies` = closed by exec."""
    fds = {
        "A_ocloexec": openat(paths["A_ocloexec"], sysfd.O_CLOEXEC),
        "B_plain": openat(paths["B_plain"]),
        "C_fsetfd": openat(paths["C_fsetfd"]),
        "D_fclear": openat(paths["D_fclear"], sysfd.O_CLOEXEC),
        "E_fioclex": openat(paths["E_fioclex"]),
        "F_fionclex": openat(paths["F_fionclex"], sysfd.O_CLOEXEC),
    }
    must(syscall("fcntl", fds["C_fsetfd"], sysfd.F_SETFD, sysfd.FD_CLOEXEC), "F_SETFD")
    must(syscall("fcntl", fds["D_fclear"], sysfd.F_SETFD, 0), "F_SETFD 0")
    must(syscall("ioctl", fds["E_fioclex"], sysfd.FIOCLEX), "FIOCLEX")
    must(syscall("ioctl", fds["F_fionclex"], sysfd.FIONCLEX), "FIONCLEX")
    for i, name in enumerate(("G_range_cloexec", "H_range_cloexec", "I_range_cloexec")):
        fds[name] = dup2_to(paths[name], 500 + i)
    fds["J_after_range"] = dup2_to(paths["J_after_range"], 503)
    must(syscall("close_range", 500, 502, sysfd.CLOSE_RANGE_CLOEXEC), "close_range cloexec")
    dying = {"A_ocloexec", "C_fsetfd", "E_fioclex", "G_range_cloexec", "H_range_cloexec"}
    dying.add("I_range_cloexec")
    return {name: {"fd": fd, "dies": name in dying} for name, fd in fds.items()}


def scenario_after_exec(_workdir: str) -> None:
    say("exec-ready")
    wait_for_eof_then_exit()


# --- fd-number reuse from threads ---------------------------------------------------------------
def scenario_threads(_workdir: str, per_thread: str = "2000") -> None:
    count = int(per_thread)
    say("ready")
    wait_line()
    start = threading.Barrier(4)
    tids: list[int] = []

    def churn() -> None:
        tids.append(threading.get_native_id())
        start.wait()
        for _ in range(count):
            os.close(os.open("/dev/null", os.O_RDONLY))  # openat + close

    threads = [threading.Thread(target=churn) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    say("done", tids=tids, per_thread=count)
    wait_for_eof_then_exit()


# --- attach to a process with open fds ----------------------------------------------------------
def scenario_preexisting(workdir: str) -> None:
    names = ("pre_X", "pre_Y", "pre_Z", "new_W")
    paths = {name: touch(os.path.join(workdir, name + ".txt")) for name in names}
    pre = {name: openat(paths[name]) for name in names[:3]}
    say("ready", pre=pre, paths=paths)
    wait_line()
    must(syscall("close", pre["pre_Y"]), "close")
    new = openat(paths["new_W"])
    say("done", pre=pre, closed=pre["pre_Y"], new=new, paths=paths)
    wait_for_eof_then_exit()


def scenario_blocked_accept(_workdir: str) -> None:
    """A server thread already blocked in accept4 when the tracer attaches (the syscall entered
    before the probes existed; the fd is born after)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    connections: list[socket.socket] = []
    ready = threading.Event()
    tids: list[int] = []

    def serve() -> None:
        tids.append(threading.get_native_id())
        ready.set()
        conn, _ = listener.accept()
        connections.append(conn)
        say("accepted", fd=conn.fileno())

    threading.Thread(target=serve, daemon=True).start()
    ready.wait()
    say("ready", port=listener.getsockname()[1], tid=tids[0])
    wait_for_eof_then_exit()


def scenario_exit_with_leaks(workdir: str) -> None:
    paths = {name: touch(os.path.join(workdir, name + ".txt")) for name in ("L1", "L2", "C")}
    say("ready")
    wait_line()
    leaked = [openat(paths["L1"]), openat(paths["L2"])]
    closed = openat(paths["C"])
    must(syscall("close", closed), "close")
    say("done", leaked=leaked, closed=closed, paths=paths)
    os._exit(0)


# --- fork ---------------------------------------------------------------------------------------
def scenario_fork(workdir: str) -> None:
    """A child exists before attach (an existing descendant); another is forked after `go`."""
    paths = {n: touch(os.path.join(workdir, n + ".txt")) for n in ("P", "Q", "R1", "R2")}
    inherited_before = openat(paths["P"])
    go_read, go_write = os.pipe()
    early = os.fork()
    if early == 0:
        os.read(go_read, 1)
        r1 = openat(paths["R1"])
        say("child", role="early", fd=r1)
        os._exit(0)
    say("ready", early_child=early, P=inherited_before)
    wait_line()
    q = openat(paths["Q"])
    os.write(go_write, b"g")
    late = os.fork()
    if late == 0:
        must(syscall("close", q), "close inherited")
        r2 = openat(paths["R2"])
        say("child", role="late", fd=r2, closed_inherited=q)
        os._exit(0)
    for child in (early, late):
        os.waitpid(child, 0)
    say("done", early_child=early, late_child=late, P=inherited_before, Q=q, paths=paths)
    wait_for_eof_then_exit()


# --- steady stream (tracer killed mid-trace) ----------------------------------------------------
def scenario_steady(_workdir: str) -> None:
    """openat+close of /dev/null every 5 ms until told "report"; then prints each open's time."""
    say("ready")
    wait_line()
    stop = threading.Event()
    threading.Thread(target=lambda: (wait_line(), stop.set()), daemon=True).start()
    times: list[float] = []
    while not stop.is_set():
        os.close(os.open("/dev/null", os.O_RDONLY))
        times.append(time.monotonic())
        time.sleep(0.005)
    say("done", times=times)
    wait_for_eof_then_exit()


def scenario_noisy(workdir: str) -> None:
    """Create, close and unlink files with long random names, forever: a stream of births whose
    paths do not compress, to fill a small disk under the tracer. Paced (~2000 a second) so that
    several parts get written before the disk is full."""
    say("ready")
    while True:
        for _ in range(10):
            name = os.path.join(workdir, os.urandom(100).hex())
            os.close(os.open(name, os.O_WRONLY | os.O_CREAT, 0o600))
            os.unlink(name)
        time.sleep(0.005)


SCENARIOS = {
    "births": scenario_births,
    "deaths": scenario_deaths,
    "after-exec": scenario_after_exec,
    "threads": scenario_threads,
    "preexisting": scenario_preexisting,
    "exit-with-leaks": scenario_exit_with_leaks,
    "blocked-accept": scenario_blocked_accept,
    "fork": scenario_fork,
    "steady": scenario_steady,
    "noisy": scenario_noisy,
}

if __name__ == "__main__":
    SCENARIOS[sys.argv[1]](*sys.argv[2:])
