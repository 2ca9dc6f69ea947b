"""What each recording backend needs from the kernel, and whether this process has it.

Everything here reads /proc and /sys; nothing changes the machine. Each check returns a Verdict
(a status, a one-line reason and the fix); a backend's verdicts for one mode form an Access.
`probe_run` and `probe_seize` are the only places that call ptrace: a seccomp filter and Yama's
PR_SET_PTRACER exceptions cannot be read from anywhere, so there the kernel's answer is the truth.

The kernel's rules for PTRACE_SEIZE (kernel/ptrace.c `__ptrace_may_access`, PTRACE_MODE_ATTACH_
REALCREDS, then security/yama):
- the tracer's *real* uid and gid equal the target's real, effective and saved uid and gid, or
  the tracer has CAP_SYS_PTRACE in the target's user namespace;
- a target that is not dumpable (prctl(PR_SET_DUMPABLE, 0), or it changed credentials: setuid,
  setgid, file capabilities) also needs CAP_SYS_PTRACE, even from its own uid;
- a target that is already traced cannot be seized by anyone, root included;
- a target holding a permitted capability the tracer lacks needs CAP_SYS_PTRACE (commoncap);
- Yama's kernel.yama.ptrace_scope (below) restricts attaching further.
BPF needs CAP_BPF+CAP_PERFMON (or CAP_SYS_ADMIN) in the *initial* user namespace: the full
capability set of `unshare --user --map-root-user` counts for nothing there.
"""

from __future__ import annotations

import dataclasses
import errno
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cmtrace.errors import TargetError
from cmtrace.record import environment
from cmtrace.record.procfs import PF_KTHREAD

PROC = Path("/proc")
OK, WARN, FAIL, INFO = "ok", "warn", "fail", "info"  # the statuses of cmtrace doctor

# Capability bit numbers (linux/capability.h).
CAP_SYS_PTRACE = 19
CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39

# What to tell the user, by situation (one wording, used by every check and by choose.py).
FIX_SUDO = "run cmtrace with sudo"
FIX_SAME_USER = "run cmtrace as the target's user, or with sudo"
FIX_CAP_PTRACE = "grant CAP_SYS_PTRACE (docker run --cap-add SYS_PTRACE), or run with sudo"
FIX_YAMA = "echo 0 | sudo tee /proc/sys/kernel/yama/ptrace_scope (or run with sudo)"
FIX_BPF_CAPS = (
    "run with sudo; in a container grant CAP_BPF and CAP_PERFMON "
    "(docker run --cap-add BPF --cap-add PERFMON), or use --backend ptrace"
)

# kernel.yama.ptrace_scope: value -> (meaning, the capability that overrides it, or None when
# nothing does). Run mode's engine is the command's parent, which scope 1 allows.
YAMA_SCOPES = {
    0: ("classic: a process may attach to any process of its uid", CAP_SYS_PTRACE),
    1: ("restricted: only a parent may attach to its descendants", CAP_SYS_PTRACE),
    2: ("admin-only: attaching needs CAP_SYS_PTRACE", CAP_SYS_PTRACE),
    3: ("no attach: nobody may ptrace, not even root (cannot be lowered until reboot)", None),
}


# ---- what /proc says --------------------------------------------------------------------------
@dataclass(frozen=True)
class Ids:
    """The four ids of a Uid:/Gid: line of /proc/PID/status."""

    real: int
    effective: int
    saved: int
    fs: int

    @property
    def uniform(self) -> bool:
        return self.real == self.effective == self.saved


@dataclass(frozen=True)
class ProcStatus:
    """The fields of /proc/PID/status that decide ptrace and BPF permissions."""

    pid: int
    name: str
    ppid: int
    uid: Ids
    gid: Ids
    cap_eff: int
    cap_prm: int = 0
    tracer_pid: int = 0
    seccomp: int = 0  # 0 none, 1 strict, 2 filter
    no_new_privs: bool = False

    def has_cap(self, bit: int) -> bool:
        return bool(self.cap_eff >> bit & 1)


def _field(text: str, name: str) -> str | None:
    match = re.search(rf"^{name}:\s*(.*)$", text, re.M)
    return match.group(1).strip() if match else None


def _ids(text: str, name: str) -> Ids:
    values = [int(v) for v in (_field(text, name) or "0 0 0 0").split()]
    return Ids(*values[:4])


def parse_status(text: str) -> ProcStatus:
    """A ProcStatus from the text of /proc/PID/status (fields a kernel lacks read as 0)."""
    return ProcStatus(
        pid=int(_field(text, "Pid") or 0),
        name=_field(text, "Name") or "?",
        ppid=int(_field(text, "PPid") or 0),
        uid=_ids(text, "Uid"),
        gid=_ids(text, "Gid"),
        cap_eff=int(_field(text, "CapEff") or "0", 16),
        cap_prm=int(_field(text, "CapPrm") or "0", 16),
        tracer_pid=int(_field(text, "TracerPid") or 0),
        seccomp=int(_field(text, "Seccomp") or 0),
        no_new_privs=(_field(text, "NoNewPrivs") or "0") == "1",
    )


def read_status(pid: int | str = "self", proc: Path = PROC) -> ProcStatus:
    return parse_status((proc / str(pid) / "status").read_text())


def yama_scope(proc: Path = PROC) -> int | None:
    """kernel.yama.ptrace_scope, or None when the Yama LSM is not active (no restriction)."""
    try:
        return int((proc / "sys/kernel/yama/ptrace_scope").read_text())
    except (OSError, ValueError):
        return None


def in_initial_user_namespace(pid: int | str = "self", proc: Path = PROC) -> bool:
    """The initial user namespace maps every uid to itself: uid_map is `0 0 4294967295`."""
    try:
        fields = (proc / str(pid) / "uid_map").read_text().split()
    except OSError:
        return True  # kernels without user namespaces have only the initial one
    return fields == ["0", "0", "4294967295"]


def capabilities_reach(pid: int, proc: Path = PROC) -> bool:
    """Whether our capabilities apply to pid: true from the initial user namespace, or when pid
    is in ours (a namespace nested below ours also would; not told apart here)."""
    if in_initial_user_namespace("self", proc):
        return True
    try:
        return os.stat(proc / "self/ns/user").st_ino == os.stat(proc / str(pid) / "ns/user").st_ino
    except OSError:
        return False


def dump_owner(pid: int, proc: Path = PROC) -> int:
    """The owner of /proc/PID/environ. /proc/PID/status has no dumpable field, but the kernel
    gives every /proc/PID file to root (of the target's user namespace) while the process is
    not dumpable (fs/proc/base.c task_dump_owner), and to its euid otherwise."""
    return (proc / str(pid) / "environ").stat().st_uid


def is_dumpable(target: ProcStatus, owner_uid: int) -> bool | None:
    """Whether target is dumpable, from dump_owner(); None when its euid is root, because a
    root process's files are root's either way (and only CAP_SYS_PTRACE may attach to it)."""
    if target.uid.effective == 0:
        return None
    return owner_uid != 0


def is_kernel_thread(pid: int, proc: Path = PROC) -> bool:
    fields = (proc / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    return bool(int(fields[6]) & PF_KTHREAD)


def process_name(pid: int, proc: Path = PROC) -> str:
    try:
        return (proc / str(pid) / "comm").read_text().strip()
    except OSError:
        return "?"


# ---- verdicts -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Verdict:
    """One check: `status` (ok, warn, fail, info), a one-line `reason`, the `fix` when it
    fails, and `short`: the few words the backend line uses ("not root")."""

    check: str
    status: str
    reason: str
    fix: str = ""
    short: str = ""

    @property
    def passed(self) -> bool:
        return self.status != FAIL


@dataclass(frozen=True)
class Access:
    """Whether one backend can record in one mode ("run" or "attach"), with every check."""

    backend: str
    mode: str
    verdicts: tuple[Verdict, ...] = field(default_factory=tuple)

    @property
    def allowed(self) -> bool:
        return all(v.passed for v in self.verdicts)

    @property
    def denial(self) -> Verdict | None:
        return next((v for v in self.verdicts if not v.passed), None)

    def message(self) -> str:
        """The one-line error when denied: what is wrong, then the fix."""
        denial = self.denial
        if denial is None:
            return f"backend {self.backend} can {self.mode}"
        fix = f": {denial.fix}" if denial.fix else ""
        return f"{self.backend} {self.mode}: {denial.reason}{fix}"


def who(me: ProcStatus) -> str:
    return (
        f"uid {me.uid.real}"
        if me.uid.real == me.uid.effective
        else (f"uid {me.uid.real} (euid {me.uid.effective})")
    )


def check_bpf_privilege(me: ProcStatus, initial_userns: bool) -> Verdict:
    """Loading BPF programs and attaching tracepoints needs CAP_BPF and CAP_PERFMON, or
    CAP_SYS_ADMIN, counted in the initial user namespace only."""
    has = me.has_cap(CAP_SYS_ADMIN) or (me.has_cap(CAP_BPF) and me.has_cap(CAP_PERFMON))
    if has and initial_userns:
        return Verdict("bpf privilege", OK, f"{who(me)} may load BPF programs")
    if has:
        return Verdict(
            "bpf privilege",
            FAIL,
            "in a user namespace: its capabilities do not reach the kernel's BPF checks",
            "run cmtrace outside the user namespace with sudo, or use --backend ptrace",
            "in a user namespace",
        )
    short = "not root" if me.uid.effective != 0 else "no CAP_BPF/CAP_PERFMON"
    return Verdict(
        "bpf privilege",
        FAIL,
        f"{who(me)} lacks CAP_BPF+CAP_PERFMON (or CAP_SYS_ADMIN)",
        FIX_BPF_CAPS,
        short,
    )


def check_tracefs(events: Path = environment.SYSCALL_EVENTS) -> Verdict:
    """The probes attach to tracefs's syscall tracepoints: it must be mounted and searchable."""
    if os.access(events, os.R_OK | os.X_OK):
        return Verdict("tracefs", OK, f"{events} readable")
    if events.parent.parent.is_dir() and not os.access(events.parent.parent, os.X_OK):
        reason, short = (
            f"{events.parent.parent} is not accessible to this user",
            "no tracefs access",
        )
    else:
        reason, short = f"{events} missing (tracefs not mounted?)", "tracefs not mounted"
    return Verdict(
        "tracefs", FAIL, reason, "mount -t tracefs tracefs /sys/kernel/tracing (as root)", short
    )


def check_seccomp(me: ProcStatus, probe_errno: int | None = None) -> Verdict:
    """A seccomp filter on this process (a container's profile) may refuse ptrace; only trying
    says, so probe_errno is the result of probe_run() when a filter is present."""
    nnp = "; no_new_privs set" if me.no_new_privs else ""
    if me.seccomp == 0:
        return Verdict("seccomp", OK, f"no seccomp filter on this process{nnp}")
    if me.seccomp == 1:
        return Verdict("seccomp", FAIL, "strict seccomp mode: no ptrace", "run outside the sandbox")
    if probe_errno is None:
        return Verdict("seccomp", WARN, f"a seccomp filter is installed (not probed){nnp}")
    if probe_errno == 0:
        return Verdict("seccomp", OK, f"a seccomp filter is installed and allows ptrace{nnp}")
    return Verdict(
        "seccomp",
        FAIL,
        f"a seccomp filter refuses ptrace ({errno_name(probe_errno)})",
        "in Docker: --security-opt seccomp=unconfined or a profile allowing ptrace "
        "(kernels >= 4.8 allow it by default), or --cap-add SYS_PTRACE",
        "ptrace blocked by seccomp",
    )


def check_yama(me: ProcStatus, scope: int | None, mode: str) -> Verdict:
    """Yama restricts PTRACE_SEIZE. In run mode the engine seizes its own child: scope 1 allows
    that, scope 2 wants CAP_SYS_PTRACE, scope 3 refuses everyone."""
    if scope is None:
        return Verdict("ptrace_scope", OK, "no Yama LSM: no extra ptrace restriction")
    meaning, override = YAMA_SCOPES.get(scope, (f"unknown value {scope}", None))
    text = f"kernel.yama.ptrace_scope={scope} ({meaning})"
    if scope == 0 or (scope == 1 and mode == "run"):
        return Verdict("ptrace_scope", OK, text)
    if override is not None and me.has_cap(override):
        return Verdict("ptrace_scope", OK, f"{text}; this process has CAP_SYS_PTRACE")
    if scope == 3:
        return Verdict(
            "ptrace_scope",
            FAIL,
            text,
            "reboot with kernel.yama.ptrace_scope <= 2",
            "ptrace_scope 3",
        )
    if scope == 1:
        # A target may have named us with prctl(PR_SET_PTRACER): only probe_seize can tell.
        return Verdict(
            "ptrace_scope",
            FAIL,
            f"{text}; the target is not the engine's child",
            FIX_YAMA,
            "ptrace_scope 1",
        )
    return Verdict("ptrace_scope", FAIL, text, FIX_CAP_PTRACE, f"ptrace_scope {scope}")


def check_credentials(me: ProcStatus, target: ProcStatus) -> Verdict:
    """Our real uid/gid against the target's real, effective and saved ones."""
    theirs = f"target uid {target.uid.real}/{target.uid.effective}/{target.uid.saved}"
    same = {me.uid.real} == {target.uid.real, target.uid.effective, target.uid.saved} and {
        me.gid.real
    } == {target.gid.real, target.gid.effective, target.gid.saved}
    if same:
        return Verdict("target user", OK, f"{theirs} (real/effective/saved) is ours")
    if me.has_cap(CAP_SYS_PTRACE):
        return Verdict("target user", OK, f"{theirs}, ours {me.uid.real}: CAP_SYS_PTRACE allows")
    if not target.uid.uniform or not target.gid.uniform:
        reason = f"{theirs}: it changed user (setuid), so only CAP_SYS_PTRACE may attach"
        return Verdict("target user", FAIL, reason, FIX_SUDO, "target changed uid")
    return Verdict(
        "target user",
        FAIL,
        f"{theirs}, ours is {me.uid.real}",
        FIX_SAME_USER,
        "another user's process",
    )


def check_capability_subset(me: ProcStatus, target: ProcStatus) -> Verdict:
    """security/commoncap.c: a target whose permitted capabilities are not all ours (a program
    with file capabilities, such as ping) needs CAP_SYS_PTRACE, whatever the uids."""
    extra = target.cap_prm & ~me.cap_prm
    if not extra:
        return Verdict("target capabilities", OK, "the target holds no capability we lack")
    if me.has_cap(CAP_SYS_PTRACE):
        return Verdict(
            "target capabilities",
            OK,
            f"the target holds capabilities we lack ({extra:#x}); CAP_SYS_PTRACE allows",
        )
    return Verdict(
        "target capabilities",
        FAIL,
        f"the target holds capabilities we lack (mask {extra:#x})",
        FIX_CAP_PTRACE,
        "target has more capabilities",
    )


def check_dumpable(me: ProcStatus, target: ProcStatus, dumpable: bool | None) -> Verdict:
    if dumpable is None:
        return Verdict("dumpable", INFO, "target runs as root: dumpable flag not visible")
    if dumpable:
        return Verdict("dumpable", OK, "target is dumpable")
    if me.has_cap(CAP_SYS_PTRACE):
        return Verdict("dumpable", OK, "target is not dumpable; CAP_SYS_PTRACE allows")
    return Verdict(
        "dumpable",
        FAIL,
        "target is not dumpable (prctl PR_SET_DUMPABLE 0, or it changed credentials): "
        "/proc/PID files are root's",
        FIX_CAP_PTRACE,
        "target not dumpable",
    )


def check_existing_tracer(target: ProcStatus, proc: Path = PROC) -> Verdict:
    """A process has at most one tracer; nobody, not even root, can seize a traced one."""
    if target.tracer_pid == 0:
        return Verdict("tracer", OK, "not traced by anyone")
    name = process_name(target.tracer_pid, proc)
    return Verdict(
        "tracer",
        FAIL,
        f"already traced by pid {target.tracer_pid} ({name})",
        f"stop or detach {name} (pid {target.tracer_pid}) first: a process has one tracer",
        "already traced",
    )


# ---- probes: the kernel's own answer ---------------------------------------------------------
# Runs in a throwaway interpreter so a seccomp filter that kills on ptrace kills only the probe.
# argv[1] = pid to seize, or 0: fork a child that installs an allow-all seccomp filter under
# NO_NEW_PRIVS (what run mode's child does) and seize that child. Prints "seize filter" errnos.
_PROBE = r"""
import ctypes, os, signal, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
pid, filter_errno = int(sys.argv[1]), 0
if pid == 0:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        insn = (ctypes.c_ubyte * 8).from_buffer_copy(struct.pack("HBBI", 6, 0, 0, 0x7FFF0000))
        prog = struct.pack("HxxxxxxQ", 1, ctypes.addressof(insn))
        buf = ctypes.create_string_buffer(prog, len(prog))
        err = 0
        # PR_SET_NO_NEW_PRIVS, then PR_SET_SECCOMP with SECCOMP_MODE_FILTER (RET_ALLOW only)
        if libc.prctl(38, 1, None, 0, 0) != 0 or libc.prctl(22, 2, buf, 0, 0) != 0:
            err = ctypes.get_errno()
        os.write(w, b"%d\n" % err)
        signal.pause()
        os._exit(0)
    filter_errno = int(os.read(r, 32))
    child = pid
else:
    child = None
rc = libc.ptrace(0x4206, pid, None, None)  # PTRACE_SEIZE, no options: the target runs on
seize_errno = 0 if rc == 0 else ctypes.get_errno()
if child is not None:
    os.kill(child, signal.SIGKILL)
    os.waitpid(child, 0)
print(seize_errno, filter_errno)
"""
PROBE_KILLED = -1  # the probe died (a filter that kills on ptrace)


def _run_probe(pid: int) -> tuple[int, int]:
    """(seize errno, filter errno) from the probe; a seize of a running target that succeeds is
    undone when the probe exits (the kernel detaches a dead tracer's tracees)."""
    done = subprocess.run(
        [sys.executable, "-S", "-c", _PROBE, str(pid)], capture_output=True, text=True, timeout=30
    )
    try:
        seize, filter_ = (int(v) for v in done.stdout.split())
    except ValueError:
        return PROBE_KILLED, 0
    return seize, filter_


def probe_run() -> tuple[int, int]:
    """(errno of PTRACE_SEIZE of a fresh child, errno of its seccomp filter install); 0 = ok."""
    return _run_probe(0)


def probe_seize(pid: int) -> int:
    """errno of PTRACE_SEIZE of pid from a separate process (as the engine would be); 0 = it
    would work. Seizing does not stop the target, and the probe's exit detaches it."""
    return _run_probe(pid)[0]


def errno_name(number: int) -> str:
    if number == PROBE_KILLED:
        return "the probe was killed"
    return errno.errorcode.get(number, str(number))


# ---- one backend, one mode ---------------------------------------------------------------------
def bpf_access(
    mode: str = "run", proc: Path = PROC, events: Path = environment.SYSCALL_EVENTS
) -> Access:
    """The BPF backend's permissions (the same in both modes: BPF sees every process)."""
    me = read_status("self", proc)
    release = environment.kernel_release()
    verdicts = (
        check_bpf_privilege(me, in_initial_user_namespace("self", proc)),
        check_tracefs(events),
        check_kernel(release),
        check_headers(release),
        check_bcc(),
    )
    return Access("bpf", mode, verdicts)


def check_kernel(release: str) -> Verdict:
    if environment.kernel_new_enough(release):
        return Verdict("kernel", OK, f"{release} has the BPF ring buffer (>= 5.8)")
    return Verdict(
        "kernel",
        FAIL,
        f"kernel {release} is older than 5.8 (no BPF ring buffer)",
        "boot a kernel >= 5.8, or use --backend ptrace",
        "kernel older than 5.8",
    )


def check_headers(release: str) -> Verdict:
    headers = environment.kernel_headers(release)
    if headers is not None:
        return Verdict("kernel headers", OK, f"{headers.path}")
    return Verdict(
        "kernel headers",
        FAIL,
        f"no kernel headers for {release}",
        f"apt-get install linux-headers-{release} (or make install)",
        "no kernel headers",
    )


def check_bcc() -> Verdict:
    """Found, not imported: importing bcc loads libbcc (slow, and a broken one may crash)."""
    spec = importlib.util.find_spec("bcc")
    if spec is not None:
        return Verdict("bcc", OK, f"bcc at {spec.origin}")
    return Verdict(
        "bcc",
        FAIL,
        "the bcc Python module is not importable",
        "apt install python3-bpfcc in a venv with --system-site-packages",
        "bcc missing",
    )


def check_filter_install(filter_errno: int) -> Verdict:
    if filter_errno == 0:
        return Verdict("seccomp filter", OK, "the command can install run mode's seccomp filter")
    return Verdict(
        "seccomp filter",
        FAIL,
        f"installing a seccomp filter fails ({errno_name(filter_errno)})",
        "allow seccomp(2)/prctl(PR_SET_SECCOMP) in the container's profile",
        "no seccomp filters",
    )


def check_engine(installed: Path | None = None) -> Verdict:
    """The ptrace backend runs a C helper: installed with cmtrace (`installed`, by default next
    to engine.py), or built on first use, which needs a C compiler (the same lookup as
    build.build)."""
    from cmtrace.record.ptrace import build  # noqa: PLC0415 (only the ptrace checks need it)

    if installed is None:
        installed = Path(build.__file__).with_name(build.BINARY)
    if os.access(installed, os.X_OK):
        return Verdict("engine", OK, f"{installed}")
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler:
        return Verdict("engine", OK, f"built from engine.c on first use with {compiler}")
    return Verdict(
        "engine",
        FAIL,
        "the ptrace engine is not installed and no C compiler can build it",
        "install gcc (or set CC) and retry, or reinstall cmtrace with a compiler present",
        "no ptrace engine",
    )


def seccomp_verdicts(me: ProcStatus, probe: bool | None) -> list[Verdict]:
    """Whether a seccomp filter on us lets ptrace (and installing run mode's filter) through.
    probe: True always tries, None only when a filter is present (nothing else can say)."""
    if not (probe or (probe is None and me.seccomp != 0)):
        return [check_seccomp(me)]
    seize_errno, filter_errno = probe_run()
    if seize_errno != 0:
        return [check_seccomp(me, seize_errno)]
    return [check_seccomp(me, seize_errno), check_filter_install(filter_errno)]


def ptrace_run_access(proc: Path = PROC, probe: bool | None = None) -> Access:
    """Run mode: the engine forks the command and seizes it. Only a seccomp filter on us or
    Yama >= 2 stands in the way. probe: True always tries, None only when a filter is present
    (nothing else can say), False never."""
    me = read_status("self", proc)
    verdicts = [check_engine(), check_yama(me, yama_scope(proc), "run")]
    verdicts += seccomp_verdicts(me, probe)
    if me.uid.effective != 0 and not me.has_cap(CAP_SYS_ADMIN):
        verdicts.append(
            Verdict(
                "no_new_privs",
                INFO,
                "the command runs with no_new_privs (the seccomp filter needs it): "
                "setuid programs it starts do not gain privileges",
            )
        )
    return Access("ptrace", "run", tuple(verdicts))


def ptrace_attach_access(pid: int, proc: Path = PROC, probe: bool | None = None) -> Access:
    """Attach mode: every rule of the kernel, read from /proc. probe: True always tries
    PTRACE_SEIZE, None only where /proc cannot decide (a seccomp filter on us, Yama 1's
    PR_SET_PTRACER), False never. Raises TargetError if pid is no user process."""
    target = read_target(pid, proc)
    me = read_status("self", proc)
    if not capabilities_reach(pid, proc):
        # CAP_SYS_PTRACE counts in the target's user namespace only: from inside a sandbox's
        # namespace, a process outside it is judged as if we had no such capability.
        me = dataclasses.replace(me, cap_eff=me.cap_eff & ~(1 << CAP_SYS_PTRACE))
    verdicts = [
        check_yama(me, yama_scope(proc), "attach"),
        seccomp_verdicts(me, probe)[0],
        check_engine(),
        check_credentials(me, target),
        check_capability_subset(me, target),
        check_dumpable(me, target, is_dumpable(target, dump_owner(pid, proc))),
        check_existing_tracer(target, proc),
    ]
    undecided = any(v.check in GUESSED and v.status in (FAIL, WARN) for v in verdicts)
    if probe or (probe is None and undecided):
        verdicts = reconcile(verdicts, probe_seize(pid))
    return Access("ptrace", "attach", tuple(verdicts))


# Checks whose denial /proc can only guess: a target may have named us with PR_SET_PTRACER
# (Yama 1), and a seccomp filter's rules are not readable. The probe overrules them.
GUESSED = ("ptrace_scope", "seccomp")


def reconcile(verdicts: list[Verdict], seize_errno: int) -> list[Verdict]:
    """The verdicts with the probe's answer added: a guessed denial the kernel did not make
    becomes a warning; a refusal no verdict predicted fails on its own."""
    if seize_errno == 0:
        softened = [
            Verdict(v.check, WARN, f"{v.reason}; but PTRACE_SEIZE works (the target allows us)")
            if v.check in GUESSED and not v.passed
            else v
            for v in verdicts
        ]
        return [*softened, Verdict("seize probe", OK, "PTRACE_SEIZE from a separate process works")]
    result = f"PTRACE_SEIZE fails ({errno_name(seize_errno)})"
    if any(not v.passed for v in verdicts):
        return [*verdicts, Verdict("seize probe", INFO, result)]
    unexplained = Verdict(
        "seize probe",
        FAIL,
        f"{result} for a reason /proc does not show (AppArmor, SELinux?)",
        FIX_SUDO,
        "ptrace refused",
    )
    return [*verdicts, unexplained]


def read_target(pid: int, proc: Path = PROC) -> ProcStatus:
    """The target's status, or TargetError (exit 4) when there is no user process to trace."""
    try:
        if is_kernel_thread(pid, proc):
            raise TargetError(
                f"pid {pid} ({process_name(pid, proc)}) is a kernel thread: "
                "give the pid of a user process"
            )
        status = read_status(pid, proc)
    except (FileNotFoundError, ProcessLookupError):
        raise TargetError(f"no process with pid {pid}: check the pid with `ps -p {pid}`") from None
    if status.pid == os.getpid() or pid == os.getpid():
        raise TargetError(f"pid {pid} is cmtrace itself: give another process")
    return status


def ptrace_access(
    mode: str, pid: int | None = None, proc: Path = PROC, probe: bool | None = None
) -> Access:
    if mode == "attach":
        if pid is None:
            raise ValueError("attach needs a pid")
        return ptrace_attach_access(pid, proc, probe)
    return ptrace_run_access(proc, probe)
