"""The kernel stack walker (probes/pystack.h) on every interpreter found here.

The harness program (stack_harness.py) attaches to sys_enter_openat, calls
capture_python_stack for the target's opens, and sends (path, stack id, flags) through the
same ring buffer as the walker's stack and code records. The target
(tests/programs/py/open_sites.py) opens marker paths at known lines; every stack must
symbolize to the expected function, file and `# MARK` line, innermost first.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import pytest
import stack_harness
import targets

from cmtrace.record.bpf.stacks import Symbolizer
from cmtrace.record.bpf.targets import PythonTargets
from cmtrace.trace import schema
from cmtrace.trace.schema import STACK_FINALIZING

bcc = pytest.importorskip("bcc", reason="bcc is not importable (run under /opt/cmtrace/venv)")
FOUND, MISSING = targets.discover()
print("\nkernel walker targets:", ", ".join(t.name for t in FOUND) or "none")
for reason in MISSING:
    print("kernel walker target not run:", reason)

OPENS = r"""
struct open_ev { struct stack_ev_head head; char path[64]; };
TRACEPOINT_PROBE(syscalls, sys_enter_openat) {
    struct open_ev *e = (struct open_ev *)capture_event(args, 1, sizeof(struct open_ev));
    if (!e)
        return 0;
    bpf_probe_read_user_str(e->path, sizeof(e->path), args->filename);
    events.ringbuf_submit(e, 0);
    return 0;
}
"""
MARK_PREFIX = "/nonexistent/cmtrace-mark-"


def signed64(value: int) -> int:
    """Stack ids are u64 in the kernel, int64 in the dataset."""
    return value - (1 << 64) if value >= 1 << 63 else value


class OpenEv(ctypes.Structure):
    _fields_ = [("ts", ctypes.c_uint64), ("pid", ctypes.c_uint32), ("tid", ctypes.c_uint32),
                ("type", ctypes.c_uint16), ("pad", ctypes.c_uint16), ("flags", ctypes.c_uint32),
                ("stack_id", ctypes.c_uint64), ("path", ctypes.c_char * 64)]  # fmt: skip


@pytest.fixture(scope="module")
def harness():
    if os.geteuid() != 0:
        pytest.skip("loading BPF programs needs root")
    bpf = stack_harness.load(OPENS, ring_pages=1024)
    bpf.handlers = []  # the ring buffer opens once per BPF object: records go to the last handler
    bpf.python_targets = PythonTargets(bpf)  # walker configs, and the interpreters they name
    bpf["events"].open_ring_buffer(lambda ctx, data, size: bpf.handlers[-1](ctx, data, size))
    return bpf


class Capture:
    """What the shared harness's ring buffer delivers to one test: the walker's records, fed to
    a Symbolizer and counted, and the opens of MARK_PREFIX paths by their label."""

    def __init__(self, bpf) -> None:
        self.bpf = bpf
        self.symbolizer = Symbolizer(bpf.python_targets.interpreters)
        self.opens: dict[str, list[OpenEv]] = defaultdict(list)  # label after MARK_PREFIX
        self.records: dict[tuple, int] = defaultdict(int)  # (type, pid, code or stack id) -> n
        self.stacks: dict[int, list[dict]] = {}  # signed stack id -> rows, innermost first
        bpf.handlers.append(self.on_record)

    def on_record(self, _ctx, data, size) -> None:
        raw = ctypes.string_at(data, size)
        rtype = stack_harness.record_type(raw)
        if rtype >= stack_harness.WALKER_RECORDS:
            self.symbolizer.on_record(raw)
            pid, key = int.from_bytes(raw[8:12], "little"), int.from_bytes(raw[24:32], "little")
            self.records[(rtype, pid, key)] += 1
        else:
            ev = OpenEv.from_buffer_copy(raw[: ctypes.sizeof(OpenEv)])
            path = ev.path.decode()
            if path.startswith(MARK_PREFIX):
                self.opens[path[len(MARK_PREFIX) :]].append(ev)

    def collect(self) -> None:
        """Take what is left in the ring, and symbolize every stack received."""
        self.bpf.ring_buffer_consume()
        stacks = defaultdict(list)
        for row in self.symbolizer.flush():
            stacks[row["stack_id"]].append(row)
        self.stacks = {sid: sorted(rows, key=lambda r: r["depth"]) for sid, rows in stacks.items()}

    def stack_of(self, label: str) -> tuple[OpenEv, list[dict]]:
        """The single open of `label` and its stack's rows, innermost first (after collect())."""
        (ev,) = self.opens[label]
        assert ev.stack_id, f"{label}: no stack (flags {ev.flags})"
        rows = self.stacks.get(signed64(ev.stack_id))
        assert rows, f"{label}: stack {ev.stack_id:#x} never symbolized"
        return ev, rows


def run_marked_program(bpf, command: list[str], interpreter_of=lambda proc: proc.pid):
    """Run a program that says "ready", waits for "go", opens its marks and exits: install the
    walker on its interpreter (`interpreter_of(proc)`, when the command forks it) in between.
    Returns (install result, interpreter pid)."""
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"ready\n"
        pid = interpreter_of(proc)
        found = bpf.python_targets.install(pid)
        assert found.status == "ok", found.reason
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        proc.wait()
    return found, pid


@pytest.mark.parametrize("target", FOUND, ids=[t.name for t in FOUND])
def test_kernel_stacks_name_every_site(harness, target):
    capture = Capture(harness)
    program = target.program("open_sites.py")
    found, pid = run_marked_program(harness, [target.command, program])
    capture.collect()
    opens, records = capture.opens, capture.records
    mark = targets.marks("open_sites.py")
    print(target.name, found.version, found.layout_source)

    def frames(label):
        ev, rows = capture.stack_of(label)
        return ev, [(r["function"], r["file"], r["line"]) for r in rows], rows

    ev, got, _ = frames("nested")
    assert got == [("mark", program, mark["mark"]), ("inner", program, mark["nested-inner"]),
                   ("middle", program, mark["nested-middle"]), ("<module>", program, mark["nested-module"])]  # fmt: skip
    assert ev.tid == pid and not ev.flags & (
        schema.STACK_TRUNCATED | schema.STACK_ERROR | STACK_FINALIZING
    )

    _, got, rows = frames("generator")
    assert got[1:] == [
        ("gen", program, mark["generator"]),
        ("<module>", program, mark["generator-loop"]),
    ]
    assert (
        rows[1]["code_flags"] & schema.CODE_GENERATOR
        and not rows[2]["code_flags"] & schema.CODE_GENERATOR
    )

    ev, got, _ = frames("thread")  # a thread started after attach: its own stack, not main's
    assert ev.tid != pid
    assert got[1] == ("thread_body", program, mark["thread"])
    assert "<module>" not in [f for f, _, _ in got] and got[-1][0] == "_bootstrap"

    ev, got, _ = frames("deep")  # 130 recursive frames + mark + recurse(0) + <module>: 133
    assert not ev.flags & schema.STACK_TRUNCATED
    assert got[1] == ("recurse", program, mark["deep"])
    assert got[2:132] == [("recurse", program, mark["recurse"])] * 130
    assert got[132:] == [("<module>", program, mark["deep-module"])]

    # the same stack three times: one id, one stack record; a code object is sent once
    repeat = opens["repeat"]
    assert len(repeat) == 3 and len({ev.stack_id for ev in repeat}) == 1
    assert records[(100, pid, repeat[0].stack_id)] == 1
    dups = {k: c for k, c in records.items() if k[0] == 101 and c > 1}
    assert not dups, [(hex(k[2]), c) for k, c in dups.items()]

    ev, got, _ = frames("too-deep")  # 200 recursive frames: cut at the walker's 136, flagged
    assert ev.flags & schema.STACK_TRUNCATED
    assert len(got) == 136
    assert got[0][0] == "mark" and {f for f, _, _ in got[1:]} == {"too_deep"}

    _, got, rows = frames("coroutine")  # a running coroutine shows with its awaiting caller
    assert got[1:3] == [
        ("coro_inner", program, mark["coroutine"]),
        ("coro_outer", program, mark["coroutine-outer"]),
    ]
    assert (
        rows[1]["code_flags"] & schema.CODE_COROUTINE
        and rows[2]["code_flags"] & schema.CODE_COROUTINE
    )
    assert got[-1] == ("<module>", program, mark["coroutine-module"])

    ev, got, _ = frames("final")  # __del__ run while the interpreter finalizes
    assert ev.flags & STACK_FINALIZING
    assert got[1] == ("__del__", program, mark["final"])


def held_child(command: list[str]):
    """Like `cmtrace run`: fork a child that execs `command` once released."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(write_end)
            if os.read(read_end, 1) == b"x":
                os.execv(command[0], command)
        finally:
            os._exit(127)
    os.close(read_end)
    return pid, lambda: (os.write(write_end, b"x"), os.close(write_end))


@pytest.mark.parametrize("target", FOUND, ids=[t.name for t in FOUND])
def test_program_that_exits_at_once_still_gets_its_stack(harness, target, request):
    """`python -c "..."` opens and exits within milliseconds of exec: the install made before
    exec must take effect in time, and the code records must survive the exit."""
    # This harness, unlike `cmtrace run`, does not stop the child at exec: it polls for the
    # exec, a race a loaded machine can lose (a shared libpython is also mapped only ~8 ms
    # after exec). The guarantee itself is tested end to end, on every interpreter, by
    # tests/test_run_exits_at_once.py; this keeps the race's odds visible.
    request.applymarker(
        pytest.mark.xfail(reason="racy without cmtrace run's exec hold", strict=False)
    )
    capture = Capture(harness)
    code = f"import os\ntry: os.open('{MARK_PREFIX}exit', 0)\nexcept OSError: pass"
    pid, release = held_child([target.command, "-c", code])
    found = harness.python_targets.install(pid)
    release()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert found.done.wait(15)
    assert found.status == "ok", found.reason
    capture.collect()
    # records of an earlier test's process may arrive late in this shared harness: keep ours
    opens = [o for o in capture.opens["exit"] if o.pid == pid]
    assert opens, "the open was not seen"
    ev = opens[0]
    assert all(other.stack_id == ev.stack_id for other in opens), [
        (o.tid, o.stack_id) for o in opens
    ]
    assert ev.stack_id, f"no stack (flags {ev.flags})"
    rows = capture.stacks.get(signed64(ev.stack_id), [])
    assert [(r["function"], r["file"], r["line"]) for r in rows] == [("<module>", "<string>", 2)]


def child_of(pid: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.01)
    raise AssertionError(f"{pid} started no child")


def namespaced_interpreter(proc: subprocess.Popen) -> int:
    """The python under `unshare --pid --fork` (past a chroot wrapper's shell, where there is
    one), checked to be in a pid namespace of its own."""
    python = child_of(proc.pid)
    while Path(f"/proc/{python}/exe").resolve().name in ("chroot", "dash", "sh"):
        if Path(f"/proc/{python}/task/{python}/children").read_text():
            python = child_of(python)
    ns_pids = Path(f"/proc/{python}/status").read_text().split("NSpid:")[1].split()[:2]
    assert ns_pids[0] != ns_pids[-1], "the target is not in its own pid namespace"
    return python


@pytest.mark.skipif(shutil.which("unshare") is None, reason="unshare(1) is not installed")
@pytest.mark.parametrize(
    "target",
    [t for t in FOUND if t.name in ("debian-3.11", "pyenv-3.9", "debian-3.14")],
    ids=lambda t: t.name,
)
def test_target_in_its_own_pid_namespace(harness, target):
    """In a pid namespace the interpreter's native_thread_id is the namespace's tid, not the
    host's; threads must still be matched (and <= 3.10, through fsbase, too)."""
    capture = Capture(harness)
    program = target.program("open_sites.py")
    command = ["unshare", "--pid", "--fork", "--mount-proc", target.command, program]
    run_marked_program(harness, command, interpreter_of=namespaced_interpreter)
    capture.collect()
    mark = targets.marks("open_sites.py")
    for label, function, key in (
        ("nested", "inner", "nested-inner"),
        ("thread", "thread_body", "thread"),
    ):
        _, rows = capture.stack_of(label)
        assert (rows[1]["function"], rows[1]["line"]) == (function, mark[key])


@pytest.mark.parametrize("target", FOUND, ids=[t.name for t in FOUND])
def test_module_bodies_sharing_a_code_address_keep_their_own_files(harness, target):
    capture = Capture(harness)
    modules = {m: target.program(f"reuse_{m}.py") for m in "abc"}
    run_marked_program(harness, [target.command, "-B", target.program("reuse_driver.py")])
    capture.collect()
    for m, path in modules.items():
        _, rows = capture.stack_of(f"reuse-{m}")
        (top,) = [r for r in rows if r["depth"] == 0]
        assert (top["function"], top["file"], top["line"]) == (
            "<module>",
            path,
            targets.marks(f"reuse_{m}.py")[f"reuse-{m}"],
        )
