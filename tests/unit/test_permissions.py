"""permissions and choose on hand-written /proc trees: every rule of the kernel the checks model.

Each test writes the few /proc files a check reads (status, uid_map, stat, comm, environ, the
Yama sysctl) under a temporary directory and points the functions at it. Nothing calls ptrace
here (probes are off, or the fake status has no seccomp filter); the integration test
tests/integration/test_ptrace_permissions.py compares the verdicts with the real kernel.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cmtrace.errors import EXIT_ENVIRONMENT, EXIT_TARGET, EnvironmentProblem, TargetError
from cmtrace.record import choose, permissions
from cmtrace.record.permissions import (
    CAP_BPF,
    CAP_PERFMON,
    CAP_SYS_ADMIN,
    CAP_SYS_PTRACE,
    FAIL,
    INFO,
    OK,
)
from cmtrace.record.procfs import PF_KTHREAD

ALL_CAPS = (1 << 41) - 1
IDENTITY_MAP = "         0          0 4294967295\n"
USERNS_MAP = "         0       1000          1\n"
ME = 4242  # the pid of "self" in the fake tree
TARGET = 777


def status_text(
    pid: int,
    uid: tuple[int, ...],
    gid: tuple[int, ...] | None = None,
    cap_eff: int = 0,
    cap_prm: int | None = None,
    tracer: int = 0,
    seccomp: int = 0,
    nnp: int = 0,
    name: str = "python3",
) -> str:
    """A /proc/PID/status as Linux 6.x writes it (fields the checks skip included)."""
    uid = uid if len(uid) == 4 else uid * 4
    gid = gid or uid
    gid = gid if len(gid) == 4 else gid * 4
    prm = cap_eff if cap_prm is None else cap_prm
    return "\n".join(
        [
            f"Name:\t{name}",
            "Umask:\t0022",
            "State:\tS (sleeping)",
            f"Tgid:\t{pid}",
            f"Pid:\t{pid}",
            "PPid:\t1",
            f"TracerPid:\t{tracer}",
            "Uid:\t" + "\t".join(map(str, uid)),
            "Gid:\t" + "\t".join(map(str, gid)),
            "CapInh:\t0000000000000000",
            f"CapPrm:\t{prm:016x}",
            f"CapEff:\t{cap_eff:016x}",
            f"CapBnd:\t{ALL_CAPS:016x}",
            f"NoNewPrivs:\t{nnp}",
            f"Seccomp:\t{seccomp}",
            "Seccomp_filters:\t0",
            "",
        ]
    )


class FakeProc:
    """A /proc with "self" and any number of processes."""

    def __init__(self, root: Path):
        self.root = root
        (root / "sys/kernel").mkdir(parents=True)

    def process(
        self,
        pid: int | str,
        status: str,
        uid_map: str = IDENTITY_MAP,
        flags: int = 0,
        comm: str = "python3",
    ) -> Path:
        directory = self.root / str(pid)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "status").write_text(status)
        (directory / "uid_map").write_text(uid_map)
        (directory / "comm").write_text(comm + "\n")
        (directory / "stat").write_text(f"{pid} ({comm}) S 1 1 1 0 -1 {flags} 0 0 0 0\n")
        (directory / "environ").write_text("")
        return directory

    def me(self, uid: int, cap_eff: int = 0, uid_map: str = IDENTITY_MAP, **kw) -> None:
        self.process("self", status_text(ME, (uid,), cap_eff=cap_eff, **kw), uid_map)

    def yama(self, scope: int) -> None:
        (self.root / "sys/kernel/yama").mkdir(parents=True, exist_ok=True)
        (self.root / "sys/kernel/yama/ptrace_scope").write_text(f"{scope}\n")


@pytest.fixture
def proc(tmp_path: Path) -> FakeProc:
    return FakeProc(tmp_path / "proc")


def caps(*bits: int) -> int:
    return sum(1 << b for b in bits)


# ---- parsing ---------------------------------------------------------------------------------
def test_parse_status_reads_ids_caps_tracer_and_seccomp():
    text = status_text(
        31,
        (1000, 0, 0, 0),
        (100, 100, 100, 100),
        cap_eff=caps(CAP_SYS_PTRACE),
        cap_prm=caps(CAP_SYS_PTRACE, CAP_BPF),
        tracer=12,
        seccomp=2,
        nnp=1,
    )
    status = permissions.parse_status(text)
    assert (status.pid, status.name, status.ppid) == (31, "python3", 1)
    assert status.uid == permissions.Ids(1000, 0, 0, 0)
    assert not status.uid.uniform and status.gid.uniform
    assert status.has_cap(CAP_SYS_PTRACE) and not status.has_cap(CAP_BPF)
    assert status.cap_prm == caps(CAP_SYS_PTRACE, CAP_BPF)
    assert (status.tracer_pid, status.seccomp, status.no_new_privs) == (12, 2, True)


def test_parse_status_of_a_kernel_without_seccomp_fields():
    text = "Name:\tx\nPid:\t5\nUid:\t1\t1\t1\t1\nGid:\t1\t1\t1\t1\nCapEff:\t0\n"
    status = permissions.parse_status(text)
    assert (status.seccomp, status.no_new_privs, status.tracer_pid) == (0, False, 0)


def test_yama_scope_absent_means_no_yama(proc: FakeProc):
    assert permissions.yama_scope(proc.root) is None
    proc.yama(2)
    assert permissions.yama_scope(proc.root) == 2


def test_initial_user_namespace_is_the_identity_map(proc: FakeProc):
    proc.me(0)
    assert permissions.in_initial_user_namespace("self", proc.root)
    proc.me(0, uid_map=USERNS_MAP)
    assert not permissions.in_initial_user_namespace("self", proc.root)


@pytest.mark.parametrize(
    ("euid", "owner", "dumpable"),
    [(1000, 1000, True), (1000, 0, False), (0, 0, None)],
)
def test_dumpable_from_the_owner_of_proc_files(euid, owner, dumpable):
    target = permissions.parse_status(status_text(TARGET, (euid,)))
    assert permissions.is_dumpable(target, owner) is dumpable


# ---- one check at a time -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("scope", "mode", "cap", "status"),
    [
        (None, "attach", 0, OK),
        (0, "attach", 0, OK),
        (1, "run", 0, OK),  # the engine is the command's parent
        (1, "attach", 0, FAIL),
        (1, "attach", CAP_SYS_PTRACE, OK),
        (2, "run", 0, FAIL),
        (2, "attach", CAP_SYS_PTRACE, OK),
        (3, "run", CAP_SYS_PTRACE, FAIL),  # nothing overrides 3
        (3, "attach", CAP_SYS_PTRACE, FAIL),
    ],
)
def test_yama_scopes(scope, mode, cap, status):
    me = permissions.parse_status(status_text(ME, (1000,), cap_eff=caps(cap) if cap else 0))
    verdict = permissions.check_yama(me, scope, mode)
    assert verdict.status == status, verdict
    if status == FAIL:
        assert verdict.fix and verdict.short.startswith("ptrace_scope")


def test_yama_1_fix_is_the_sysctl():
    me = permissions.parse_status(status_text(ME, (1000,)))
    assert "ptrace_scope" in permissions.check_yama(me, 1, "attach").fix


@pytest.mark.parametrize(
    ("mine", "cap", "theirs", "status", "short"),
    [
        ((1000,), 0, (1000,), OK, ""),
        ((1000,), 0, (1001,), FAIL, "another user's process"),
        ((1000,), CAP_SYS_PTRACE, (0,), OK, ""),
        ((1000,), 0, (1000, 0, 0, 0), FAIL, "target changed uid"),  # a setuid program
        ((1000,), 0, (1000, 1000, 0, 1000), FAIL, "target changed uid"),  # saved uid differs
    ],
)
def test_credentials(mine, cap, theirs, status, short):
    me = permissions.parse_status(status_text(ME, mine, cap_eff=caps(cap) if cap else 0))
    target = permissions.parse_status(status_text(TARGET, theirs))
    verdict = permissions.check_credentials(me, target)
    assert (verdict.status, verdict.short) == (status, short), verdict


def test_credentials_compare_real_gid_too():
    me = permissions.parse_status(status_text(ME, (1000,), (1000,)))
    target = permissions.parse_status(status_text(TARGET, (1000,), (1000, 5, 5, 5)))
    assert permissions.check_credentials(me, target).status == FAIL


def test_a_target_with_capabilities_we_lack_needs_cap_sys_ptrace():
    me = permissions.parse_status(status_text(ME, (1000,)))
    ping = permissions.parse_status(status_text(TARGET, (1000,), cap_eff=0, cap_prm=caps(13)))
    assert permissions.check_capability_subset(me, ping).status == FAIL
    strong = permissions.parse_status(status_text(ME, (1000,), cap_eff=caps(CAP_SYS_PTRACE)))
    assert permissions.check_capability_subset(strong, ping).status == OK


def test_dumpable_check():
    me = permissions.parse_status(status_text(ME, (1000,)))
    target = permissions.parse_status(status_text(TARGET, (1000,)))
    assert permissions.check_dumpable(me, target, True).status == OK
    assert permissions.check_dumpable(me, target, None).status == INFO
    denied = permissions.check_dumpable(me, target, False)
    assert denied.status == FAIL and "SYS_PTRACE" in denied.fix
    root = permissions.parse_status(status_text(ME, (0,), cap_eff=ALL_CAPS))
    assert permissions.check_dumpable(root, target, False).status == OK


def test_an_existing_tracer_is_named(proc: FakeProc):
    proc.process(99, status_text(99, (0,)), comm="strace")
    traced = permissions.parse_status(status_text(TARGET, (1000,), tracer=99))
    verdict = permissions.check_existing_tracer(traced, proc.root)
    assert verdict.status == FAIL and "pid 99 (strace)" in verdict.reason
    assert verdict.short == "already traced"


@pytest.mark.parametrize(
    ("uid", "cap", "uid_map", "status", "short"),
    [
        (0, ALL_CAPS, IDENTITY_MAP, OK, ""),
        (1000, caps(CAP_BPF, CAP_PERFMON), IDENTITY_MAP, OK, ""),
        (1000, caps(CAP_SYS_ADMIN), IDENTITY_MAP, OK, ""),
        (1000, caps(CAP_BPF), IDENTITY_MAP, FAIL, "not root"),
        (1000, 0, IDENTITY_MAP, FAIL, "not root"),
        (0, caps(CAP_SYS_PTRACE), IDENTITY_MAP, FAIL, "no CAP_BPF/CAP_PERFMON"),
        (0, ALL_CAPS, USERNS_MAP, FAIL, "in a user namespace"),  # unshare --map-root-user
    ],
)
def test_bpf_privilege(uid, cap, uid_map, status, short):
    me = permissions.parse_status(status_text(ME, (uid,), cap_eff=cap))
    verdict = permissions.check_bpf_privilege(me, uid_map == IDENTITY_MAP)
    assert (verdict.status, verdict.short) == (status, short), verdict


def test_tracefs_check(tmp_path: Path):
    events = tmp_path / "tracing/events/syscalls"
    assert permissions.check_tracefs(events).status == FAIL
    events.mkdir(parents=True)
    assert permissions.check_tracefs(events).status == OK


def test_seccomp_check_uses_the_probe_when_a_filter_is_installed():
    plain = permissions.parse_status(status_text(ME, (1000,)))
    assert permissions.check_seccomp(plain).status == OK
    filtered = permissions.parse_status(status_text(ME, (1000,), seccomp=2, nnp=1))
    assert permissions.check_seccomp(filtered).status == permissions.WARN  # not probed
    assert permissions.check_seccomp(filtered, 0).status == OK
    refused = permissions.check_seccomp(filtered, 1)  # EPERM
    assert refused.status == FAIL and "EPERM" in refused.reason


def test_engine_needs_an_installed_binary_or_a_compiler(monkeypatch, tmp_path: Path):
    missing = tmp_path / "not-installed"  # as on a checkout before the first build
    monkeypatch.setenv("CC", "/usr/bin/some-cc")
    assert permissions.check_engine(missing).status == OK
    monkeypatch.delenv("CC")
    monkeypatch.setenv("PATH", str(tmp_path))  # no cc, no gcc
    verdict = permissions.check_engine(missing)
    assert (verdict.status, verdict.short) == (FAIL, "no ptrace engine") and "gcc" in verdict.fix
    installed = tmp_path / "engine"
    installed.write_text("#!/bin/sh\n")
    installed.chmod(0o755)
    assert permissions.check_engine(installed).status == OK  # no compiler needed


def test_reconcile_lets_the_probe_overrule_a_guess():
    scope1 = permissions.Verdict("ptrace_scope", FAIL, "scope 1", "fix", "ptrace_scope 1")
    allowed = permissions.reconcile([scope1], 0)
    assert [v.status for v in allowed] == [permissions.WARN, OK]
    unexplained = permissions.reconcile([permissions.Verdict("tracer", OK, "none")], 1)
    assert unexplained[-1].status == FAIL and "EPERM" in unexplained[-1].reason


# ---- whole modes on a fake /proc -------------------------------------------------------------
def test_attach_to_another_users_process_is_denied_with_the_fix(proc: FakeProc):
    proc.me(1000)
    proc.process(TARGET, status_text(TARGET, (1001,)))
    access = permissions.ptrace_attach_access(TARGET, proc.root, probe=False)
    assert not access.allowed
    assert access.denial.check == "target user"
    assert access.message() == (
        "ptrace attach: target uid 1001/1001/1001, ours is 1000: " + permissions.FIX_SAME_USER
    )


def test_attach_to_own_dumpable_process_is_allowed(proc: FakeProc):
    directory = proc.process(TARGET, status_text(TARGET, (0,)))
    owner = os.stat(directory / "environ").st_uid  # whoever runs the test owns the fake files
    (directory / "status").write_text(status_text(TARGET, (owner,)))
    proc.me(owner, cap_eff=0)
    access = permissions.ptrace_attach_access(TARGET, proc.root, probe=False)
    dumpable = next(v for v in access.verdicts if v.check == "dumpable")
    assert dumpable.status == (OK if owner != 0 else INFO)
    assert access.allowed, access


def test_attach_refuses_kernel_threads_and_missing_pids(proc: FakeProc):
    proc.me(0, cap_eff=ALL_CAPS)
    proc.process(2, status_text(2, (0,)), flags=PF_KTHREAD, comm="kthreadd")
    with pytest.raises(TargetError, match="kernel thread"):
        permissions.ptrace_attach_access(2, proc.root, probe=False)
    with pytest.raises(TargetError, match="no process") as info:
        permissions.ptrace_attach_access(31337, proc.root, probe=False)
    assert info.value.exit_code == EXIT_TARGET


def test_run_mode_under_yama_2_needs_the_capability(proc: FakeProc):
    proc.me(1000)
    proc.yama(2)
    access = permissions.ptrace_run_access(proc.root, probe=False)
    assert access.denial.short == "ptrace_scope 2"
    assert any(v.check == "no_new_privs" for v in access.verdicts)


# ---- choose_backend -----------------------------------------------------------------------------
def test_auto_falls_back_to_ptrace_and_says_why(proc: FakeProc):
    proc.me(1000)
    choice = choose.choose_backend("auto", "run", proc=proc.root)
    assert (choice.backend, choice.reason) == ("ptrace", "backend ptrace: not root")
    assert [a.backend for a in choice.access] == ["bpf", "ptrace"]


def test_auto_in_a_user_namespace_picks_ptrace(proc: FakeProc):
    proc.me(0, cap_eff=ALL_CAPS, uid_map=USERNS_MAP)
    choice = choose.choose_backend("auto", "run", proc=proc.root)
    assert choice.reason == "backend ptrace: in a user namespace"


def test_bpf_requested_without_privilege_is_exit_2(proc: FakeProc):
    proc.me(1000)
    with pytest.raises(EnvironmentProblem) as info:
        choose.choose_backend("bpf", "run", proc=proc.root)
    assert info.value.exit_code == EXIT_ENVIRONMENT
    message = str(info.value)
    assert "\n" not in message and "sudo" in message and message.startswith("--backend bpf")


def test_ptrace_attach_to_a_traced_process_is_exit_2_with_the_fix(proc: FakeProc):
    proc.me(1000, cap_eff=caps(CAP_SYS_PTRACE))
    proc.process(99, status_text(99, (1000,)), comm="strace")
    proc.process(TARGET, status_text(TARGET, (1000,), tracer=99))
    for requested in ("ptrace", "auto"):
        with pytest.raises(EnvironmentProblem, match=r"already traced by pid 99 \(strace\)"):
            choose.choose_backend(requested, "attach", TARGET, proc=proc.root)


def test_auto_attach_to_no_process_is_exit_4(proc: FakeProc):
    proc.me(1000)
    with pytest.raises(TargetError):
        choose.choose_backend("auto", "attach", 31337, proc=proc.root)


def test_unknown_backend_is_a_usage_error():
    with pytest.raises(choose.UsageError):
        choose.choose_backend("dtrace", "run")


def test_doctor_rows_warn_where_another_backend_records(proc: FakeProc):
    proc.me(1000)
    rows = {row["name"]: row for row in choose.doctor_rows(proc=proc.root)}
    assert rows["bpf: bpf privilege"]["status"] == "warn"  # ptrace still records
    assert rows["backend auto (run)"] == {
        "name": "backend auto (run)",
        "status": "ok",
        "fix": "",
        "detail": "backend ptrace: not root",
    }


def test_doctor_rows_fail_when_nothing_records(proc: FakeProc):
    proc.me(1000)
    proc.process(TARGET, status_text(TARGET, (1001,)))
    rows = {row["name"]: row for row in choose.doctor_rows(TARGET, proc=proc.root)}
    assert rows["ptrace attach: target user"]["status"] == FAIL
    auto = rows["backend auto (attach)"]
    assert auto["status"] == FAIL and auto["fix"] == permissions.FIX_SAME_USER
