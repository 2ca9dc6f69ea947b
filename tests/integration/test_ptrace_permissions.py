"""permissions' verdicts against the real kernel: each case is judged from /proc alone (probes
off) and then PTRACE_SEIZE is tried from a separate process of the same user, the way the
engine would; the two must agree, and a denial must name the right check.

Users: root, and `nobody` with no capability at all (targets.AS_NOBODY). Targets: sleeping
Debian python3 processes, of either user, made non-dumpable with prctl, or already traced by a
small ptrace holder. The sandbox case runs in `unshare --user --map-root-user --pid --fork
--mount-proc` as nobody: root inside, nothing outside, so BPF is impossible and auto must pick
ptrace; there the ground truth is loading a tracepoint BPF program and seizing a child.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import targets  # noqa: E402  (tests/integration is not a package)

CMTRACE_PYTHON = sys.executable
TARGET_PYTHON = "/usr/bin/python3"
TIMEOUT = 60
EPERM = 1

# Ground truth, written apart from the code under test: PTRACE_SEIZE of argv[1]; prints errno.
# The probe exits at once, and the kernel detaches a dead tracer's tracees.
SEIZE = textwrap.dedent(
    """
    import ctypes, sys
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    rc = libc.ptrace(0x4206, int(sys.argv[1]), None, None)  # PTRACE_SEIZE
    print(0 if rc == 0 else ctypes.get_errno())
    """
)
# A target: optionally not dumpable, says ready, sleeps until its stdin closes.
SLEEPER = textwrap.dedent(
    """
    import ctypes, sys
    if sys.argv[1] == "undumpable":
        assert ctypes.CDLL(None).prctl(4, 0, 0, 0, 0) == 0  # PR_SET_DUMPABLE 0
    print("ready", flush=True)
    sys.stdin.read()
    """
)
# A tracer that holds argv[1] (seized, left running) until its stdin closes.
HOLDER = textwrap.dedent(
    """
    import ctypes, sys
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    if libc.ptrace(0x4206, int(sys.argv[1]), None, None) != 0:
        sys.exit(f"seize failed: errno {ctypes.get_errno()}")
    print("held", flush=True)
    sys.stdin.read()
    """
)
# What permissions says from /proc alone (no probe), as JSON.
VERDICT = textwrap.dedent(
    """
    import json, sys
    from cmtrace.record import permissions
    access = permissions.ptrace_attach_access(int(sys.argv[1]), probe=False)
    denial = access.denial
    print(json.dumps({"allowed": access.allowed, "check": denial and denial.check,
                      "message": access.message()}))
    """
)


def as_user(user: str) -> tuple[str, ...]:
    return targets.AS_NOBODY if user == "nobody" else ()


def run_python(user: str, python: str, code: str, *args: str) -> str:
    done = subprocess.run(
        [*as_user(user), python, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd="/",
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@contextmanager
def started(argv: list[str], ready: str) -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/")
    try:
        assert proc.stdout.readline().strip() == ready, f"{argv} did not say {ready}"
        yield proc
    finally:
        proc.stdin.close()
        proc.wait(timeout=TIMEOUT)


def sleeper(user: str, undumpable: bool = False):
    kind = "undumpable" if undumpable else "plain"
    return started([*as_user(user), TARGET_PYTHON, "-c", SLEEPER, kind], "ready")


def holder(user: str, pid: int):
    return started([*as_user(user), TARGET_PYTHON, "-c", HOLDER, str(pid)], "held")


def verdict_and_truth(tracer: str, pid: int) -> tuple[dict, int]:
    verdict = json.loads(run_python(tracer, CMTRACE_PYTHON, VERDICT, str(pid)))
    return verdict, int(run_python(tracer, TARGET_PYTHON, SEIZE, str(pid)))


def assert_agree(verdict: dict, seize_errno: int, denied_by: str | None) -> None:
    assert verdict["allowed"] == (seize_errno == 0), (verdict, seize_errno)
    assert verdict["check"] == denied_by, verdict
    if denied_by is not None:
        assert seize_errno == EPERM
        assert "\n" not in verdict["message"] and ": " in verdict["message"], verdict


@pytest.mark.parametrize(
    ("tracer", "owner", "undumpable", "denied_by"),
    [
        ("root", "root", False, None),
        ("root", "nobody", False, None),
        ("root", "nobody", True, None),  # CAP_SYS_PTRACE overrides dumpable
        ("nobody", "nobody", False, None),
        ("nobody", "root", False, "target user"),
        ("nobody", "nobody", True, "dumpable"),
    ],
)
def test_attach_verdict_matches_the_kernel(tracer, owner, undumpable, denied_by):
    with sleeper(owner, undumpable) as target:
        verdict, seize_errno = verdict_and_truth(tracer, target.pid)
        assert_agree(verdict, seize_errno, denied_by)


@pytest.mark.parametrize("tracer", ["root", "nobody"])
def test_an_already_traced_target_is_refused_even_to_root(tracer):
    with sleeper("nobody") as target, holder("nobody", target.pid) as held:
        verdict, seize_errno = verdict_and_truth(tracer, target.pid)
        assert_agree(verdict, seize_errno, "tracer")
        assert f"already traced by pid {held.pid}" in verdict["message"]


def test_nobody_attach_to_root_is_exit_2_with_the_fix():
    code = textwrap.dedent(
        """
        import sys
        from cmtrace.errors import CmtraceError
        from cmtrace.record.choose import choose_backend
        try:
            choose_backend("ptrace", "attach", int(sys.argv[1]))
        except CmtraceError as exc:
            print(exc.exit_code, exc)
        """
    )
    with sleeper("root") as target:
        out = run_python("nobody", CMTRACE_PYTHON, code, str(target.pid))
    assert out.startswith("2 --backend ptrace: ptrace attach: target uid 0/0/0"), out
    assert out.endswith("run cmtrace as the target's user, or with sudo"), out


def test_nobody_run_mode_is_allowed_and_auto_says_why():
    code = textwrap.dedent(
        """
        import json
        from cmtrace.record import permissions
        from cmtrace.record.choose import choose_backend
        choice = choose_backend("auto", "run")
        print(json.dumps({"reason": choice.reason, "probe": permissions.probe_run()}))
        """
    )
    result = json.loads(run_python("nobody", CMTRACE_PYTHON, code))
    assert result == {"reason": "backend ptrace: not root", "probe": [0, 0]}


# In the sandbox: what choose says, and what the kernel does: load a tracepoint BPF program
# (r0 = 0; exit) and seize a forked child.
SANDBOX = textwrap.dedent(
    """
    import ctypes, json, os, signal, struct
    from cmtrace.record.choose import choose_backend
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    insns = ctypes.create_string_buffer(bytes.fromhex("b700000000000000" "9500000000000000"))
    license = ctypes.create_string_buffer(b"GPL")
    attr = struct.pack("IIQQ", 5, 2, ctypes.addressof(insns), ctypes.addressof(license))
    attr = ctypes.create_string_buffer(attr.ljust(128, b"\\0"), 128)
    fd = libc.syscall(321, 5, attr, 128)  # bpf(BPF_PROG_LOAD), BPF_PROG_TYPE_TRACEPOINT
    bpf_errno = 0 if fd >= 0 else ctypes.get_errno()
    child = os.fork()
    if child == 0:
        signal.pause()
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    seize = libc.ptrace(0x4206, child, None, None)
    seize_errno = 0 if seize == 0 else ctypes.get_errno()
    os.kill(child, signal.SIGKILL)
    os.waitpid(child, 0)
    choice = choose_backend("auto", "run")
    print(json.dumps({"euid": os.geteuid(), "backend": choice.backend, "reason": choice.reason,
                      "bpf_errno": bpf_errno, "seize_errno": seize_errno}))
    """
)


def test_in_a_user_namespace_sandbox_auto_picks_ptrace():
    sandbox = ("unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount-proc")
    done = subprocess.run(
        [*targets.AS_NOBODY, *sandbox, CMTRACE_PYTHON, "-c", SANDBOX],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd="/",
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["euid"] == 0  # root inside, with every capability of the namespace
    assert result["bpf_errno"] == EPERM  # yet the kernel refuses BPF
    assert result["seize_errno"] == 0  # and ptrace of a child works
    assert (result["backend"], result["reason"]) == (
        "ptrace",
        "backend ptrace: in a user namespace",
    )


def test_root_in_the_initial_namespace_gets_bpf_and_the_kernel_agrees():
    out = json.loads(run_python("root", CMTRACE_PYTHON, SANDBOX))
    assert (out["bpf_errno"], out["backend"], out["reason"]) == (0, "bpf", "backend bpf")


# A container-like sandbox: a seccomp filter that makes ptrace(2) fail with EPERM (as Docker's
# profile did before 4.8), installed under no_new_privs, then exec of argv[1:]. x86_64 numbers.
NO_PTRACE_FILTER = textwrap.dedent(
    """
    import ctypes, os, struct, sys
    libc = ctypes.CDLL(None, use_errno=True)
    code = [(0x20, 0, 0, 0),            # A = seccomp_data.nr
            (0x15, 0, 1, 101),          # A == __NR_ptrace ?
            (0x06, 0, 0, 0x00050001),   #   SECCOMP_RET_ERRNO | EPERM
            (0x06, 0, 0, 0x7FFF0000)]   # SECCOMP_RET_ALLOW
    insns = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in code))
    prog = ctypes.create_string_buffer(struct.pack("HxxxxxxQ", len(code), ctypes.addressof(insns)))
    assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
    assert libc.prctl(22, 2, prog, 0, 0) == 0, ctypes.get_errno()  # PR_SET_SECCOMP, FILTER
    os.execv(sys.argv[1], sys.argv[1:])
    """
)
FILTERED_VERDICTS = textwrap.dedent(
    """
    import json, sys
    from cmtrace.record import permissions
    run = permissions.ptrace_run_access()  # probes: a filter is installed
    attach = permissions.ptrace_attach_access(int(sys.argv[1]))
    print(json.dumps({name: [access.allowed, access.denial and access.denial.short]
                      for name, access in (("run", run), ("attach", attach))}))
    """
)


def test_a_seccomp_filter_refusing_ptrace_is_found_by_the_probe():
    with sleeper("root") as target:
        filtered = [TARGET_PYTHON, "-c", NO_PTRACE_FILTER]
        truth = run_python(
            "root", filtered[0], filtered[2], TARGET_PYTHON, "-c", SEIZE, str(target.pid)
        )
        out = run_python(
            "root",
            filtered[0],
            filtered[2],
            CMTRACE_PYTHON,
            "-c",
            FILTERED_VERDICTS,
            str(target.pid),
        )
    assert int(truth) == EPERM  # the filter works: root itself cannot seize
    refused = [False, "ptrace blocked by seccomp"]
    assert json.loads(out) == {"run": refused, "attach": refused}
